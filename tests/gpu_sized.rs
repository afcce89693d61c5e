//! The kernels a GPU gets, run on the machine's own adapter.
//!
//! CI has no GPU, and on a CPU adapter (lavapipe) the crate picks kernels
//! and sizes of its own: blocks of rows per subgroup, held channels-last
//! columns, runs walked by subgroups. Without this file the choices a GPU
//! gets (a row per subgroup, tiles, column strips, per-invocation partials)
//! would run in no test. A context with `size_for_gpu` makes them on
//! lavapipe; each case checks y, the running statistics' effect through
//! eval, and the gradients against the f64 reference, and that the plan is
//! the GPU's.

mod common;
use common::{assert_close, gpu_sized, normal};
use gpunorm::engine::Dispatch;
use gpunorm::kernels::Kernel;
use gpunorm::{
    reference, Affine, BatchNorm, BatchNormConfig, Context, DType, GpuTensor, Gradients, GroupNorm,
    GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, RmsNorm, RowNormConfig,
    View,
};

const TOL: f64 = 1e-5;
/// Backward: as tests/backward.rs (dx mixes sums of thousands of terms).
const BACKWARD_TOL: f64 = 1e-4;

enum AnyNorm {
    Batch(BatchNorm),
    Layer(LayerNorm),
    Rms(RmsNorm),
    Instance(InstanceNorm),
    Group(GroupNorm),
}

impl AnyNorm {
    fn record(
        &mut self,
        ctx: &Context,
        encoder: &mut gpunorm::wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
        mode: Mode,
    ) -> Vec<Dispatch> {
        match self {
            AnyNorm::Batch(l) => l.record(ctx, encoder, x, y, mode),
            AnyNorm::Layer(l) => l.record(ctx, encoder, x, y),
            AnyNorm::Rms(l) => l.record(ctx, encoder, x, y),
            AnyNorm::Instance(l) => l.record(ctx, encoder, x, y, mode),
            AnyNorm::Group(l) => l.record(ctx, encoder, x, y),
        }
        .unwrap()
    }

    fn backward(&self, ctx: &Context, dy: &GpuTensor) -> Gradients {
        match self {
            AnyNorm::Batch(l) => l.backward(ctx, dy),
            AnyNorm::Layer(l) => l.backward(ctx, dy),
            AnyNorm::Rms(l) => l.backward(ctx, dy),
            AnyNorm::Instance(l) => l.backward(ctx, dy),
            AnyNorm::Group(l) => l.backward(ctx, dy),
        }
        .unwrap()
    }

    fn set_affine(&mut self, w: Option<GpuTensor>, b: Option<GpuTensor>) {
        match self {
            AnyNorm::Batch(l) => l.set_weight(w).and_then(|_| l.set_bias(b)),
            AnyNorm::Layer(l) => l.set_weight(w).and_then(|_| l.set_bias(b)),
            AnyNorm::Rms(l) => l.set_weight(w),
            AnyNorm::Instance(l) => l.set_affine(Affine { weight: w, bias: b }),
            AnyNorm::Group(l) => l.set_affine(Affine { weight: w, bias: b }),
        }
        .unwrap()
    }
}

/// One forward (batch statistics) and its backward on `ctx`, checked
/// against the f64 reference; returns the forward's kernels.
fn check_case(
    ctx: &Context,
    what: &str,
    mut layer: AnyNorm,
    shape: &[usize],
    view: View,
    rms: bool,
    eps: f64,
) -> Vec<Kernel> {
    let n = view.numel();
    let seed = n as u64 + view.b as u64;
    let x = normal(n, seed, 3.0, 2.0);
    let dy = normal(n, seed + 1, 0.0, 1.0);
    let w = normal(view.affine_len, seed + 2, 1.0, 0.5);
    let b = (!rms).then(|| normal(view.affine_len, seed + 3, 0.0, 0.5));
    let up = |v: &[f32], s: &[usize]| ctx.upload(v, s).unwrap();
    layer.set_affine(
        Some(up(&w, &[view.affine_len])),
        b.as_ref().map(|b| up(b, &[view.affine_len])),
    );
    let xt = up(&x, shape);
    let y = ctx.zeros(shape, DType::F32).unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let plan = layer.record(ctx, &mut encoder, &xt, &y, Mode::Train);
    ctx.submit_and_wait(encoder).unwrap();
    let want = reference::forward(&x, &view, rms, eps, Some(&w), b.as_deref());
    assert_close(
        &format!("{what} y"),
        &ctx.download(&y).unwrap(),
        &want,
        TOL,
        TOL,
    );

    let got = layer.backward(ctx, &up(&dy, shape));
    let want = reference::backward(&x, &dy, &view, rms, eps, Some(&w), None);
    assert_close(
        &format!("{what} grad_input"),
        &ctx.download(&got.grad_input).unwrap(),
        &want.grad_input,
        BACKWARD_TOL,
        BACKWARD_TOL,
    );
    let terms = (n / view.affine_len).max(1) as f64;
    let atol = BACKWARD_TOL * terms.sqrt();
    let gw = got.grad_weight.as_ref().expect("γ has a gradient");
    assert_close(
        &format!("{what} grad_weight"),
        &ctx.download(gw).unwrap(),
        &want.grad_weight,
        atol,
        BACKWARD_TOL,
    );
    if let Some(gb) = &got.grad_bias {
        assert_close(
            &format!("{what} grad_bias"),
            &ctx.download(gb).unwrap(),
            &want.grad_bias,
            atol,
            BACKWARD_TOL,
        );
    }
    plan.iter().map(|d| d.kernel).collect()
}

fn row_norms(ctx: &Context) -> Vec<Kernel> {
    let mut kernels = Vec::new();
    for (rows, len) in [
        (64, 256),
        (48, 2048),
        (5, 16384),
        (4100, 264),
        (64, 16400),
        (2, 20000),
        (7, 33),
    ] {
        let layer = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
        let view = View::layer_norm(&[rows, len], len);
        let what = format!("layer norm {rows}x{len}");
        kernels.extend(check_case(
            ctx,
            &what,
            AnyNorm::Layer(layer),
            &[rows, len],
            view,
            false,
            1e-5,
        ));
    }
    let layer = RmsNorm::new(ctx, &[1000], RowNormConfig::torch_rms_norm()).unwrap();
    let view = View::layer_norm(&[16, 1000], 1000);
    let eps = f32::EPSILON as f64;
    kernels.extend(check_case(
        ctx,
        "rms norm 16x1000",
        AnyNorm::Rms(layer),
        &[16, 1000],
        view,
        true,
        eps,
    ));
    kernels
}

fn channel_norms(ctx: &Context) -> Vec<Kernel> {
    let mut kernels = Vec::new();
    for (shape, axis, config) in [
        (vec![8, 16, 20, 20], 1, BatchNormConfig::torch_2d()),
        (vec![8, 10, 10, 64], 3, BatchNormConfig::keras()),
        (vec![4, 6, 6, 136], 3, BatchNormConfig::keras()),
    ] {
        let eps = config.eps as f64;
        let layer = BatchNorm::new(ctx, shape[axis], config).unwrap();
        let view = View::batch_norm(&shape, axis);
        let what = format!("batch norm {shape:?}");
        kernels.extend(check_case(
            ctx,
            &what,
            AnyNorm::Batch(layer),
            &shape,
            view,
            false,
            eps,
        ));
    }
    let shape = [4, 6, 30, 30];
    let layer = InstanceNorm::new(ctx, 6, InstanceNormConfig::torch()).unwrap();
    let view = View::instance_norm(&shape);
    kernels.extend(check_case(
        ctx,
        "instance norm",
        AnyNorm::Instance(layer),
        &shape,
        view,
        false,
        1e-5,
    ));
    for (shape, config, view) in [
        (
            [4, 16, 10, 10],
            GroupNormConfig::torch(),
            View::group_norm(&[4, 16, 10, 10], 4),
        ),
        (
            [4, 8, 8, 32],
            GroupNormConfig::keras(),
            View::group_norm_channels_last(&[4, 8, 8, 32], 4),
        ),
    ] {
        let eps = config.eps as f64;
        let channels = if config.convention == gpunorm::Convention::Keras {
            shape[3]
        } else {
            shape[1]
        };
        let layer = GroupNorm::new(ctx, 4, channels, config).unwrap();
        let what = format!("group norm {shape:?}");
        kernels.extend(check_case(
            ctx,
            &what,
            AnyNorm::Group(layer),
            &shape,
            view,
            false,
            eps,
        ));
    }
    kernels
}

#[test]
fn row_norms_sized_for_a_gpu_match_f64() {
    let kernels = row_norms(gpu_sized());
    // A GPU holds 8 vectors per lane of a subgroup, rows up to 16384 in a
    // workgroup, walks longer rows one per subgroup, and spreads a few very
    // long rows over tiles.
    for k in [
        Kernel::RowsHeld,
        Kernel::RowsWorkgroupHeld,
        Kernel::RowsSubgroup,
        Kernel::Rows,
        Kernel::PartialsEach,
        Kernel::NormalizeRuns,
    ] {
        assert!(kernels.contains(&k), "{k:?} not in {kernels:?}");
    }
}

#[test]
fn channel_norms_sized_for_a_gpu_match_f64() {
    let kernels = channel_norms(gpu_sized());
    // The GPU's tiles and column strips, not the CPU's subgroup walks.
    for k in [
        Kernel::PartialsColumns,
        Kernel::NormalizeColumns,
        Kernel::NormalizeRuns,
    ] {
        assert!(kernels.contains(&k), "{k:?} not in {kernels:?}");
    }
    for k in [
        Kernel::PartialsRuns,
        Kernel::NormalizeRunsSubgroup,
        Kernel::PartialsColumnsHeld,
        Kernel::NormalizeColumnsHeld,
    ] {
        assert!(!kernels.contains(&k), "a CPU kernel, {k:?}, in {kernels:?}");
    }
}
