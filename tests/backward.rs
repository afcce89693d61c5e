//! The backward pass (SPEC.md §4): the f64 host reference checked by finite
//! differences, then every op's GPU backward checked against that reference.

mod common;
use common::{assert_close, ctx, normal};
use gpunorm::backward::{plan_backward, BackwardKernel};
use gpunorm::reference::{self, backward_f64, forward_f64};
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Context, DType, Error, GpuTensor, Gradients, GroupNorm,
    GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, RmsNorm, RowNormConfig,
    View,
};

// ---------------------------------------------------------------------------
// The f64 reference against finite differences of the f64 forward.

struct FdCase {
    view: View,
    rms: bool,
    weight: bool,
    bias: bool,
    running: bool,
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// Checks backward_f64 against central differences of L = Σ y·dy.
fn reference_matches_finite_differences(name: &str, c: FdCase) {
    let v = c.view;
    let n = v.numel();
    let eps = 1e-5;
    let x = wide(&normal(n, 11 + n as u64, 0.5, 1.5));
    let dy = wide(&normal(n, 12 + n as u64, 0.0, 1.0));
    let w = wide(&normal(v.affine_len, 13, 1.0, 0.5));
    let b = wide(&normal(v.affine_len, 14, 0.0, 0.5));
    let rm = wide(&normal(v.g, 15, 0.2, 0.5));
    let rv: Vec<f64> = wide(&normal(v.g, 16, 0.0, 0.5))
        .iter()
        .map(|a| 0.5 + a * a)
        .collect();
    let running = c.running.then_some((rm.as_slice(), rv.as_slice()));
    let weight = c.weight.then_some(w.as_slice());
    let bias = c.bias.then_some(b.as_slice());
    let loss = |x: &[f64], w: Option<&[f64]>, b: Option<&[f64]>| -> f64 {
        forward_f64(x, &v, c.rms, eps, w, b, running)
            .iter()
            .zip(&dy)
            .map(|(y, d)| y * d)
            .sum()
    };
    let h = 1e-6;
    let diff = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
    let got = backward_f64(&x, &dy, &v, c.rms, eps, weight, running);
    let check = |what: &str, k: usize, fd: f64, analytic: f64| {
        assert!(
            (fd - analytic).abs() <= 1e-6 * (1.0 + analytic.abs()),
            "{name}: {what}[{k}] is {analytic}, finite differences say {fd}"
        );
    };
    for i in 0..n {
        let fd = diff(&|d| {
            let mut xp = x.clone();
            xp[i] += d;
            loss(&xp, weight, bias)
        });
        check("grad_input", i, fd, got.grad_input[i]);
    }
    for k in 0..v.affine_len {
        if c.weight {
            let fd = diff(&|d| {
                let mut wp = w.clone();
                wp[k] += d;
                loss(&x, Some(&wp), bias)
            });
            check("grad_weight", k, fd, got.grad_weight[k]);
        }
        if c.bias {
            let fd = diff(&|d| {
                let mut bp = b.clone();
                bp[k] += d;
                loss(&x, weight, Some(&bp))
            });
            check("grad_bias", k, fd, got.grad_bias[k]);
        }
    }
}

#[test]
fn reference_backward_of_layer_norm_matches_finite_differences() {
    reference_matches_finite_differences(
        "layer norm",
        FdCase {
            view: View::layer_norm(&[3, 7], 7),
            rms: false,
            weight: true,
            bias: true,
            running: false,
        },
    );
}

#[test]
fn reference_backward_of_rms_norm_matches_finite_differences() {
    reference_matches_finite_differences(
        "rms norm",
        FdCase {
            view: View::layer_norm(&[3, 6], 6),
            rms: true,
            weight: true,
            bias: false,
            running: false,
        },
    );
}

#[test]
fn reference_backward_of_batch_norm_train_and_eval_matches_finite_differences() {
    for running in [false, true] {
        reference_matches_finite_differences(
            "batch norm",
            FdCase {
                view: View::batch_norm(&[3, 2, 4], 1),
                rms: false,
                weight: true,
                bias: true,
                running,
            },
        );
    }
}

#[test]
fn reference_backward_of_group_and_instance_norm_matches_finite_differences() {
    for (name, view) in [
        ("group norm", View::group_norm(&[2, 6, 3], 3)),
        (
            "group norm channels-last",
            View::group_norm_channels_last(&[2, 3, 6], 2),
        ),
        ("instance norm", View::instance_norm(&[2, 3, 5])),
    ] {
        reference_matches_finite_differences(
            name,
            FdCase {
                view,
                rms: false,
                weight: true,
                bias: true,
                running: false,
            },
        );
    }
}

#[test]
fn backward_source_validates_with_naga() {
    let src = gpunorm::backward::source();
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("backward: {}", e.emit_to_string(&src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("backward: {e:?}"));
    assert_eq!(BackwardKernel::ALL.len(), 5);
}

// ---------------------------------------------------------------------------
// GPU against the f64 reference.

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

struct Inputs {
    x: Vec<f32>,
    dy: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
}

fn inputs(shape: &[usize], affine_len: usize, seed: u64, offset: f32) -> Inputs {
    let n: usize = shape.iter().product();
    Inputs {
        x: normal(n, seed, offset, 2.0),
        dy: normal(n, seed + 1, 0.0, 1.0),
        w: normal(affine_len, seed + 2, 1.0, 0.5),
        b: normal(affine_len, seed + 3, 0.0, 0.5),
    }
}

fn up(ctx: &Context, v: &[f32], shape: &[usize]) -> GpuTensor {
    ctx.upload(v, shape).unwrap()
}

/// Compares GPU gradients with the reference; grad sums are scaled by the
/// number of terms each one adds up.
fn check(
    what: &str,
    got: &Gradients,
    want: &reference::BackwardReference,
    weight: bool,
    bias: bool,
    terms: usize,
) {
    let ctx = ctx();
    let dx = ctx.download(&got.grad_input).unwrap();
    assert_close(
        &format!("{what} grad_input"),
        &dx,
        &want.grad_input,
        ATOL,
        RTOL,
    );
    let param_atol = ATOL * (terms as f64).sqrt().max(1.0);
    assert_eq!(got.grad_weight.is_some(), weight, "{what}: grad_weight");
    assert_eq!(got.grad_bias.is_some(), bias, "{what}: grad_bias");
    if let Some(gw) = &got.grad_weight {
        let gw = ctx.download(gw).unwrap();
        assert_close(
            &format!("{what} grad_weight"),
            &gw,
            &want.grad_weight,
            param_atol,
            RTOL,
        );
    }
    if let Some(gb) = &got.grad_bias {
        let gb = ctx.download(gb).unwrap();
        assert_close(
            &format!("{what} grad_bias"),
            &gb,
            &want.grad_bias,
            param_atol,
            RTOL,
        );
    }
}

fn layer_norm_case(rows: usize, len: usize, weight: bool, bias: bool, offset: f32) {
    let ctx = ctx();
    let shape = [rows, len];
    let d = inputs(&shape, len, (rows * 7 + len) as u64, offset);
    let mut ln = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_weight(weight.then(|| up(ctx, &d.w, &[len])))
        .unwrap();
    ln.set_bias(bias.then(|| up(ctx, &d.b, &[len]))).unwrap();
    ln.forward(ctx, &up(ctx, &d.x, &shape), Mode::Train)
        .unwrap();
    let got = ln.backward(ctx, &up(ctx, &d.dy, &shape)).unwrap();
    let view = View::layer_norm(&shape, len);
    let want = reference::backward(
        &d.x,
        &d.dy,
        &view,
        false,
        1e-5,
        weight.then_some(d.w.as_slice()),
        None,
    );
    check(
        &format!("layer norm {rows}x{len}"),
        &got,
        &want,
        weight,
        bias,
        rows,
    );
}

#[test]
fn layer_norm_backward_on_rows_of_3072_matches_f64() {
    layer_norm_case(16, 3072, true, true, 0.0);
}

#[test]
fn layer_norm_backward_on_3000_short_rows_sums_grad_weight_over_all_rows() {
    layer_norm_case(3000, 8, true, true, 0.0);
}

#[test]
fn layer_norm_backward_without_affine_or_with_weight_only_matches_f64() {
    layer_norm_case(40, 48, false, false, 0.0);
    layer_norm_case(40, 48, true, false, 0.0);
}

#[test]
fn layer_norm_backward_of_a_few_very_long_rows_uses_tiles_and_matches_f64() {
    // Rows longer than the row kernel takes with few rows: partials path.
    layer_norm_case(2, 20_000, true, true, 0.0);
}

#[test]
fn layer_norm_backward_with_a_large_offset_matches_f64() {
    layer_norm_case(64, 1024, true, true, 1e4);
}

#[test]
fn rms_norm_backward_matches_f64() {
    let ctx = ctx();
    for (rows, len) in [(64, 3000), (5, 32)] {
        let shape = [rows, len];
        let d = inputs(&shape, len, 99 + len as u64, 0.3);
        let mut rms = RmsNorm::new(ctx, &[len], RowNormConfig::torch_rms_norm()).unwrap();
        rms.set_weight(Some(up(ctx, &d.w, &[len]))).unwrap();
        rms.forward(ctx, &up(ctx, &d.x, &shape), Mode::Train)
            .unwrap();
        let got = rms.backward(ctx, &up(ctx, &d.dy, &shape)).unwrap();
        let view = View::layer_norm(&shape, len);
        let want = reference::backward(
            &d.x,
            &d.dy,
            &view,
            true,
            f32::EPSILON as f64,
            Some(&d.w),
            None,
        );
        check(
            &format!("rms norm {rows}x{len}"),
            &got,
            &want,
            true,
            false,
            rows,
        );
    }
}

fn batch_norm_case(
    what: &str,
    shape: &[usize],
    config: BatchNormConfig,
    axis: usize,
    mode: Mode,
    running: bool,
) {
    let ctx = ctx();
    let c = shape[axis];
    let d = inputs(shape, c, shape.iter().sum::<usize>() as u64, 1.0);
    let rm = normal(c, 5, 0.5, 0.5);
    let rv: Vec<f32> = normal(c, 6, 0.0, 1.0).iter().map(|a| 0.5 + a * a).collect();
    let eps = config.eps as f64;
    let torch = config.convention == gpunorm::Convention::Torch;
    let mut bn = BatchNorm::new(ctx, c, config).unwrap();
    bn.set_weight(Some(up(ctx, &d.w, &[c]))).unwrap();
    bn.set_bias(Some(up(ctx, &d.b, &[c]))).unwrap();
    if running {
        bn.set_running_stats(
            ctx,
            Some((up(ctx, &rm, &[c]), up(ctx, &rv, &[c]), torch.then_some(0))),
        )
        .unwrap();
    } else {
        bn.set_running_stats(ctx, None).unwrap();
    }
    bn.forward(ctx, &up(ctx, &d.x, shape), mode).unwrap();
    let got = bn.backward(ctx, &up(ctx, &d.dy, shape)).unwrap();
    let view = View::batch_norm(shape, axis);
    let constants = (mode == Mode::Eval && running).then_some((rm.as_slice(), rv.as_slice()));
    let want = reference::backward(&d.x, &d.dy, &view, false, eps, Some(&d.w), constants);
    check(what, &got, &want, true, true, view.group_len());
}

#[test]
fn batch_norm_train_backward_over_channels_of_several_tiles_matches_f64() {
    // 8·40·40 = 12,800 elements per channel: more than one tile of 4096.
    batch_norm_case(
        "batch norm 2d train",
        &[8, 3, 40, 40],
        BatchNormConfig::torch_2d(),
        1,
        Mode::Train,
        true,
    );
}

#[test]
fn batch_norm_eval_backward_treats_running_stats_as_constants() {
    batch_norm_case(
        "batch norm 2d eval",
        &[4, 3, 20, 20],
        BatchNormConfig::torch_2d(),
        1,
        Mode::Eval,
        true,
    );
}

#[test]
fn batch_norm_eval_without_running_stats_backward_uses_batch_stats() {
    batch_norm_case(
        "batch norm 1d eval untracked",
        &[16, 5],
        BatchNormConfig::torch_1d(),
        1,
        Mode::Eval,
        false,
    );
}

#[test]
fn batch_norm_channels_last_backward_matches_f64() {
    for mode in [Mode::Train, Mode::Eval] {
        batch_norm_case(
            "keras batch norm channels-last",
            &[4, 10, 10, 6],
            BatchNormConfig::keras(),
            3,
            mode,
            true,
        );
    }
}

fn group_norm_case(what: &str, shape: &[usize], groups: usize, config: GroupNormConfig) {
    let ctx = ctx();
    let keras = config.convention == gpunorm::Convention::Keras;
    let c = if keras {
        shape[shape.len() - 1]
    } else {
        shape[1]
    };
    let d = inputs(shape, c, 300 + groups as u64, -0.5);
    let eps = config.eps as f64;
    let mut gn = GroupNorm::new(ctx, groups, c, config).unwrap();
    gn.set_affine(Affine {
        weight: Some(up(ctx, &d.w, &[c])),
        bias: Some(up(ctx, &d.b, &[c])),
    })
    .unwrap();
    gn.forward(ctx, &up(ctx, &d.x, shape)).unwrap();
    let got = gn.backward(ctx, &up(ctx, &d.dy, shape)).unwrap();
    let view = if keras {
        View::group_norm_channels_last(shape, groups)
    } else {
        View::group_norm(shape, groups)
    };
    let want = reference::backward(&d.x, &d.dy, &view, false, eps, Some(&d.w), None);
    check(what, &got, &want, true, true, view.numel() / c);
}

#[test]
fn group_norm_backward_matches_f64() {
    group_norm_case("group norm", &[2, 12, 9, 9], 3, GroupNormConfig::torch());
    group_norm_case(
        "group norm, long groups",
        &[2, 8, 64, 64],
        2,
        GroupNormConfig::torch(),
    );
}

#[test]
fn group_norm_channels_last_backward_matches_f64() {
    group_norm_case(
        "keras group norm",
        &[2, 5, 5, 12],
        4,
        GroupNormConfig::keras(),
    );
    group_norm_case(
        "keras group norm, one group per channel",
        &[2, 7, 6],
        6,
        GroupNormConfig::keras(),
    );
}

fn instance_norm_case(shape: &[usize], mode: Mode, tracked: bool) {
    let ctx = ctx();
    let c = shape[1];
    let d = inputs(shape, c, 500, 0.0);
    let rm = normal(c, 7, 0.5, 0.5);
    let rv: Vec<f32> = normal(c, 8, 0.0, 1.0).iter().map(|a| 0.5 + a * a).collect();
    let config = InstanceNormConfig {
        affine: true,
        track_running_stats: tracked,
        ..InstanceNormConfig::torch()
    };
    let mut inorm = InstanceNorm::new(ctx, c, config).unwrap();
    inorm
        .set_affine(Affine {
            weight: Some(up(ctx, &d.w, &[c])),
            bias: Some(up(ctx, &d.b, &[c])),
        })
        .unwrap();
    if tracked {
        inorm
            .set_running_stats(ctx, Some((up(ctx, &rm, &[c]), up(ctx, &rv, &[c]), Some(0))))
            .unwrap();
    }
    inorm.forward(ctx, &up(ctx, &d.x, shape), mode).unwrap();
    let got = inorm.backward(ctx, &up(ctx, &d.dy, shape)).unwrap();
    let view = View::instance_norm(shape);
    let constants = (mode == Mode::Eval && tracked).then_some((rm.as_slice(), rv.as_slice()));
    let want = reference::backward(&d.x, &d.dy, &view, false, 1e-5, Some(&d.w), constants);
    check(
        &format!("instance norm {shape:?} {mode:?}"),
        &got,
        &want,
        true,
        true,
        view.numel() / c,
    );
}

#[test]
fn instance_norm_backward_matches_f64() {
    instance_norm_case(&[3, 4, 50, 50], Mode::Train, false);
}

#[test]
fn tracked_instance_norm_eval_backward_treats_running_stats_as_constants() {
    instance_norm_case(&[2, 3, 7, 7], Mode::Eval, true);
}

// ---------------------------------------------------------------------------
// API behaviour.

#[test]
fn backward_before_any_forward_is_a_state_error() {
    let ctx = ctx();
    let ln = LayerNorm::new(ctx, &[4], RowNormConfig::torch_layer_norm()).unwrap();
    let dy = up(ctx, &[0.0; 8], &[2, 4]);
    assert!(matches!(ln.backward(ctx, &dy), Err(Error::State(_))));
}

#[test]
fn backward_refuses_grad_output_of_another_shape_or_dtype() {
    let ctx = ctx();
    let mut ln = LayerNorm::new(ctx, &[4], RowNormConfig::torch_layer_norm()).unwrap();
    ln.forward(ctx, &up(ctx, &[1.0, 2.0, 3.0, 5.0], &[1, 4]), Mode::Train)
        .unwrap();
    let e = ln.backward(ctx, &up(ctx, &[0.0; 8], &[2, 4])).unwrap_err();
    assert!(matches!(e, Error::Shape(_)), "{e}");
    assert!(e.to_string().contains("[1, 4]"), "{e}");
    let half = ctx.upload_as(&[0.0; 4], &[1, 4], DType::F16).unwrap();
    assert!(matches!(ln.backward(ctx, &half), Err(Error::Dtype(_))));
}

#[test]
fn backward_of_an_empty_batch_gives_zero_parameter_gradients() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 4, BatchNormConfig::torch_2d()).unwrap();
    bn.forward(
        ctx,
        &ctx.zeros(&[0, 4, 3, 3], DType::F32).unwrap(),
        Mode::Train,
    )
    .unwrap();
    let g = bn
        .backward(ctx, &ctx.zeros(&[0, 4, 3, 3], DType::F32).unwrap())
        .unwrap();
    assert_eq!(g.grad_input.shape(), &[0, 4, 3, 3]);
    assert_eq!(
        ctx.download(g.grad_weight.as_ref().unwrap()).unwrap(),
        [0.0; 4]
    );
    assert_eq!(
        ctx.download(g.grad_bias.as_ref().unwrap()).unwrap(),
        [0.0; 4]
    );
}

#[test]
fn record_backward_records_into_the_callers_encoder_and_reports_its_dispatches() {
    let ctx = ctx();
    let shape = [8, 3, 40, 40];
    let d = inputs(&shape, 3, 42, 0.0);
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
    let x = up(ctx, &d.x, &shape);
    let y = ctx.zeros(&shape, DType::F32).unwrap();
    let dy = up(ctx, &d.dy, &shape);
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    bn.record(ctx, &mut encoder, &x, &y, Mode::Train).unwrap();
    let (grads, dispatches) = bn.record_backward(ctx, &mut encoder, &dy).unwrap();
    assert_eq!(
        dispatches.iter().map(|d| d.kernel).collect::<Vec<_>>(),
        [
            BackwardKernel::Partials,
            BackwardKernel::Finalize,
            BackwardKernel::GradInput
        ]
    );
    ctx.submit_and_wait(encoder).unwrap();
    let view = View::batch_norm(&shape, 1);
    let want = reference::backward(&d.x, &d.dy, &view, false, 1e-5, None, None);
    // γ = 1: the same gradients as without affine.
    check(
        "recorded batch norm",
        &grads,
        &want,
        true,
        true,
        view.group_len(),
    );
    let spec_plan = plan_backward(&gpunorm::backward::BackwardSpec {
        view,
        rms: false,
        source: gpunorm::engine::StatsSource::Batch,
        weight: true,
        grad_weight: true,
        grad_bias: true,
    });
    assert_eq!(spec_plan, dispatches);
}

#[test]
fn a_later_forward_replaces_the_saved_state() {
    let ctx = ctx();
    let mut ln = LayerNorm::new(ctx, &[6], RowNormConfig::torch_layer_norm()).unwrap();
    let a = normal(12, 1, 0.0, 1.0);
    let b = normal(18, 2, 3.0, 2.0);
    ln.forward(ctx, &up(ctx, &a, &[2, 6]), Mode::Train).unwrap();
    ln.forward(ctx, &up(ctx, &b, &[3, 6]), Mode::Train).unwrap();
    let dy = normal(18, 3, 0.0, 1.0);
    let got = ln.backward(ctx, &up(ctx, &dy, &[3, 6])).unwrap();
    let want = reference::backward(
        &b,
        &dy,
        &View::layer_norm(&[3, 6], 6),
        false,
        1e-5,
        Some(&[1.0; 6]),
        None,
    );
    check("second forward", &got, &want, true, true, 3);
}
