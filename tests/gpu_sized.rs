//! The kernels a GPU gets, run on the machine's own adapter.
//!
//! CI has no GPU, and on a CPU adapter (lavapipe) the crate picks kernels
//! and sizes of its own: blocks of rows per subgroup, held channels-last
//! columns, runs walked by subgroups. Without this file the choices a GPU
//! gets (a row per subgroup, tiles, column strips, per-invocation partials)
//! would run in no test. A context with `size_for_gpu` makes them on
//! lavapipe; each case checks y and the gradients of a train-mode forward
//! against the f64 reference, and each test that the kernels were the
//! GPU's.

mod common;
use common::{assert_close, gpu_sized, normal};
use gpunorm::backward::BackwardKernel;
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

    /// The backward, recorded and submitted, with its kernels.
    fn backward(&self, ctx: &Context, dy: &GpuTensor) -> (Gradients, Vec<BackwardKernel>) {
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        let (grads, plan) = match self {
            AnyNorm::Batch(l) => l.record_backward(ctx, &mut encoder, dy),
            AnyNorm::Layer(l) => l.record_backward(ctx, &mut encoder, dy),
            AnyNorm::Rms(l) => l.record_backward(ctx, &mut encoder, dy),
            AnyNorm::Instance(l) => l.record_backward(ctx, &mut encoder, dy),
            AnyNorm::Group(l) => l.record_backward(ctx, &mut encoder, dy),
        }
        .unwrap();
        ctx.submit_and_wait(encoder).unwrap();
        (grads, plan.iter().map(|d| d.kernel).collect())
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

/// The kernels of the forwards and backwards a test ran.
#[derive(Default)]
struct Ran {
    forward: Vec<Kernel>,
    backward: Vec<BackwardKernel>,
}

/// One forward (batch statistics) and its backward on `ctx`, checked
/// against the f64 reference, its kernels added to `ran`.
#[allow(clippy::too_many_arguments)]
fn check_case(
    ctx: &Context,
    what: &str,
    mut layer: AnyNorm,
    shape: &[usize],
    view: View,
    rms: bool,
    eps: f64,
    ran: &mut Ran,
) {
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

    let (got, backward) = layer.backward(ctx, &up(&dy, shape));
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
    assert_eq!(got.grad_bias.is_some(), b.is_some(), "{what}: grad_bias");
    if let Some(gb) = &got.grad_bias {
        assert_close(
            &format!("{what} grad_bias"),
            &ctx.download(gb).unwrap(),
            &want.grad_bias,
            atol,
            BACKWARD_TOL,
        );
    }
    ran.forward.extend(plan.iter().map(|d| d.kernel));
    ran.backward.extend(backward);
}

fn row_norms(ctx: &Context) -> Ran {
    let mut ran = Ran::default();
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
        let layer = AnyNorm::Layer(layer);
        check_case(ctx, &what, layer, &[rows, len], view, false, 1e-5, &mut ran);
    }
    let layer = AnyNorm::Rms(RmsNorm::new(ctx, &[1000], RowNormConfig::torch_rms_norm()).unwrap());
    let view = View::layer_norm(&[16, 1000], 1000);
    let eps = f32::EPSILON as f64;
    check_case(
        ctx,
        "rms norm",
        layer,
        &[16, 1000],
        view,
        true,
        eps,
        &mut ran,
    );
    ran
}

fn channel_norms(ctx: &Context) -> Ran {
    let mut ran = Ran::default();
    for (shape, axis, config) in [
        (vec![8, 16, 20, 20], 1, BatchNormConfig::torch_2d()),
        (vec![8, 10, 10, 64], 3, BatchNormConfig::keras()),
        (vec![4, 6, 6, 136], 3, BatchNormConfig::keras()),
    ] {
        let eps = config.eps as f64;
        let layer = AnyNorm::Batch(BatchNorm::new(ctx, shape[axis], config).unwrap());
        let view = View::batch_norm(&shape, axis);
        let what = format!("batch norm {shape:?}");
        check_case(ctx, &what, layer, &shape, view, false, eps, &mut ran);
    }
    // Groups of 900 and 9216 (a workgroup each, forward and backward); 4
    // groups of 16900, too long to hold, spread over tiles in the backward.
    for shape in [[4, 6, 30, 30], [2, 4, 96, 96], [2, 2, 130, 130]] {
        let config = InstanceNormConfig::torch();
        let layer = AnyNorm::Instance(InstanceNorm::new(ctx, shape[1], config).unwrap());
        let view = View::instance_norm(&shape);
        let what = format!("instance norm {shape:?}");
        check_case(ctx, &what, layer, &shape, view, false, 1e-5, &mut ran);
    }
    // Channels-first groups of 4 channels of 100 (channels straddle the
    // workgroup's invocations) and of 34 channels (more than the
    // workgroup-held backward sums one by one: the subgroup row kernel);
    // Keras's channels-last groups.
    for (shape, groups, config) in [
        ([4, 16, 10, 10], 4, GroupNormConfig::torch()),
        ([2, 34, 8, 8], 1, GroupNormConfig::torch()),
        ([4, 8, 8, 32], 4, GroupNormConfig::keras()),
    ] {
        let eps = config.eps as f64;
        let keras = config.convention == gpunorm::Convention::Keras;
        let (channels, view) = if keras {
            (shape[3], View::group_norm_channels_last(&shape, groups))
        } else {
            (shape[1], View::group_norm(&shape, groups))
        };
        let layer = AnyNorm::Group(GroupNorm::new(ctx, groups, channels, config).unwrap());
        let what = format!("group norm {shape:?}");
        check_case(ctx, &what, layer, &shape, view, false, eps, &mut ran);
    }
    ran
}

/// Whether the kernel checks apply. They pin the GPU sizes of
/// src/kernels.rs; scripts/gpu-pack builds variants with other sizes, whose
/// kernels differ by design, and runs this file with
/// GPUNORM_TEST_ANY_KERNELS=1 to check their results alone.
fn kernels_pinned() -> bool {
    std::env::var_os("GPUNORM_TEST_ANY_KERNELS").is_none()
}

/// Every kernel of `want` is in `ran` (unless [`kernels_pinned`] is off).
fn assert_ran<K: PartialEq + std::fmt::Debug>(ran: &[K], want: &[K]) {
    if !kernels_pinned() {
        return;
    }
    for k in want {
        assert!(ran.contains(k), "{k:?} not in {ran:?}");
    }
}

/// No kernel of `never` is in `ran`. For kernels a context cannot pick
/// whatever its GPU sizes (CPU-only ones, subgroup ones without subgroups),
/// so it holds with [`kernels_pinned`] off too.
fn assert_not_ran<K: PartialEq + std::fmt::Debug>(ran: &[K], never: &[K]) {
    for k in never {
        assert!(!ran.contains(k), "{k:?} in {ran:?}");
    }
}

#[test]
fn row_norms_sized_for_a_gpu_match_f64() {
    let ran = row_norms(gpu_sized());
    // A GPU holds 8 vectors per lane of a subgroup, rows up to 16384 in a
    // workgroup, walks longer rows one per subgroup, and spreads a few very
    // long rows over tiles.
    assert_ran(
        &ran.forward,
        &[
            Kernel::RowsHeld,
            Kernel::RowsWorkgroupHeld,
            Kernel::RowsSubgroup,
            Kernel::Rows,
            Kernel::PartialsEach,
            Kernel::NormalizeRuns,
        ],
    );
    // The backward: held rows, workgroup-held rows, tiles for the 64 rows
    // of 16400 (too few for subgroups to fill a GPU), and the column kernel
    // for dγ and dβ.
    assert_ran(
        &ran.backward,
        &[
            BackwardKernel::RowsHeld,
            BackwardKernel::RowsWorkgroupHeld,
            BackwardKernel::Rows,
            BackwardKernel::GradInput,
            BackwardKernel::Cols,
        ],
    );
}

#[test]
fn channel_norms_sized_for_a_gpu_match_f64() {
    let ran = channel_norms(gpu_sized());
    // The GPU's tiles and column strips, not the CPU's subgroup walks.
    assert_ran(
        &ran.forward,
        &[
            Kernel::PartialsColumns,
            Kernel::NormalizeColumns,
            Kernel::NormalizeRuns,
            Kernel::RowsWorkgroupHeld,
        ],
    );
    assert_ran(
        &ran.backward,
        &[
            BackwardKernel::PartialsEach,
            BackwardKernel::GradInput,
            BackwardKernel::ChannelCols,
            BackwardKernel::ChannelGradInput,
            BackwardKernel::RowsWorkgroupHeld,
            BackwardKernel::RowsSubgroup,
        ],
    );
    // CPU-only kernels, whatever the GPU sizes.
    assert_not_ran(
        &ran.forward,
        &[
            Kernel::PartialsRuns,
            Kernel::NormalizeRunsSubgroup,
            Kernel::PartialsColumnsHeld,
            Kernel::NormalizeColumnsHeld,
        ],
    );
    assert_not_ran(
        &ran.backward,
        &[
            BackwardKernel::PartialsRuns,
            BackwardKernel::GradInputRuns,
            BackwardKernel::ChannelColsHeld,
            BackwardKernel::ChannelGradInputHeld,
        ],
    );
}

#[test]
fn row_norms_sized_for_a_gpu_without_subgroups_match_f64() {
    // A GPU without subgroups (WebGPU in a browser, some GL drivers) holds
    // rows up to 16384 in a workgroup too, and walks the others with the
    // workgroup-memory row kernel, forward and backward.
    let ctx = gpunorm::Context::with_options(gpunorm::ContextOptions {
        size_for_gpu: true,
        disable_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    let ran = row_norms(&ctx);
    assert_ran(&ran.forward, &[Kernel::RowsWorkgroupHeld, Kernel::Rows]);
    assert_ran(&ran.backward, &[BackwardKernel::Rows]);
    assert_not_ran(&ran.forward, &[Kernel::RowsSubgroup]);
    assert_not_ran(&ran.backward, &[BackwardKernel::RowsWorkgroupHeld]);
}
