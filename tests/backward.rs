//! The backward pass (SPEC.md §4): the f64 host reference checked by finite
//! differences, then every op's GPU backward checked against that reference.

mod common;
use common::{assert_close, ctx, gpu_sized, normal};
use gpunorm::backward::{plan_backward_on, BackwardKernel};
use gpunorm::reference::{self, backward_f64, forward_f64};
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Context, Convention, DType, Error, GpuTensor, Gradients,
    GroupNorm, GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, RmsNorm,
    RowNormConfig, View,
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
    // Without the subgroup kernel the source needs no subgroup capability.
    let without_subgroups = naga::valid::Capabilities::all()
        - naga::valid::Capabilities::SUBGROUP
        - naga::valid::Capabilities::SUBGROUP_BARRIER;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (subgroups, caps, paired) in [
            (true, naga::valid::Capabilities::all(), false),
            (true, naga::valid::Capabilities::all(), true),
            (false, without_subgroups, false),
        ] {
            let src = gpunorm::backward::source(dtype, subgroups, paired);
            let what = format!("backward {dtype} subgroups={subgroups} paired={paired}");
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            // Every kernel's entry point is there (the subgroup ones only
            // with subgroups).
            for kernel in BackwardKernel::ALL {
                let wanted = subgroups || !kernel.uses_subgroups();
                let found = module
                    .entry_points
                    .iter()
                    .any(|e| e.name == kernel.entry_point());
                assert_eq!(found, wanted, "{kernel:?} subgroups={subgroups}");
            }
        }
    }
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

/// The backward of an f32 `view` with γ, batch statistics and both affine
/// gradients, as the modules plan it.
fn affine_batch_spec(view: View) -> gpunorm::backward::BackwardSpec {
    gpunorm::backward::BackwardSpec {
        view,
        dtype: DType::F32,
        rms: false,
        source: gpunorm::engine::StatsSource::Batch,
        weight: true,
        grad_weight: true,
        grad_bias: true,
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
    check_on(ctx(), what, got, want, weight, bias, terms);
}

/// `check` of gradients computed on `ctx`.
fn check_on(
    ctx: &Context,
    what: &str,
    got: &Gradients,
    want: &reference::BackwardReference,
    weight: bool,
    bias: bool,
    terms: usize,
) {
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
    layer_norm_case_on(ctx(), rows, len, weight, bias, offset);
}

fn layer_norm_case_on(
    ctx: &Context,
    rows: usize,
    len: usize,
    weight: bool,
    bias: bool,
    offset: f32,
) {
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
    check_on(
        ctx,
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
fn layer_norm_backward_column_sums_match_f64_for_every_column_strip() {
    // Rows of pairs of vectors (two vectors per column-kernel invocation),
    // of whole vectors only (one), and of odd length (one column).
    for len in [24, 20, 33] {
        layer_norm_case(100, len, true, true, 0.5);
    }
}

#[test]
fn layer_norm_backward_uses_the_statistics_of_rows_walked_four_at_a_time() {
    // The forward and the backward walk 67 rows of 2048 four at a time on
    // lavapipe (the last step repeats row 66): every row's saved statistics
    // must be its own, and the backward's per-step column sums (dγ, dβ)
    // must count row 66 once.
    common::assert_four_rows_per_step_on_a_cpu(ctx(), 67, 2048);
    layer_norm_case(67, 2048, true, true, 0.5);
}

#[test]
fn layer_norm_backward_of_rows_held_in_blocks_matches_f64() {
    // On lavapipe rows up to 1024 are held in registers and walked in
    // blocks of rows/64 (here 17), whose column sums give dγ and dβ: the
    // last block has one row, and rows of 1020 leave the last slot of the
    // last octet to some lanes only.
    layer_norm_case(1089, 36, true, true, 0.5);
    layer_norm_case(1030, 1020, true, false, -2.0);
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
fn workgroup_row_kernel_backward_matches_f64_where_subgroups_are_disabled() {
    // Lavapipe has subgroups, so the default context runs the subgroup row
    // kernel wherever rows are whole vectors; this one runs the
    // workgroup-memory kernel (vector and scalar paths) on the same cases.
    let ctx = Context::with_options(gpunorm::ContextOptions {
        disable_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    layer_norm_case_on(&ctx, 64, 1024, true, true, 1e4);
    layer_norm_case_on(&ctx, 300, 8, true, false, 0.0);
    layer_norm_case_on(&ctx, 7, 33, true, true, 0.0);
    instance_norm_case_on(&ctx, &[3, 4, 50, 50], Mode::Train, false);
    group_norm_case_on(
        &ctx,
        "group norm, workgroup rows",
        &[2, 8, 64, 64],
        2,
        GroupNormConfig::torch(),
    );
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
    batch_norm_case_on(ctx(), what, shape, config, axis, mode, running, 1.0);
}

/// batch_norm_case on the context `ctx`, with x drawn around `offset`.
#[allow(clippy::too_many_arguments)]
fn batch_norm_case_on(
    ctx: &Context,
    what: &str,
    shape: &[usize],
    config: BatchNormConfig,
    axis: usize,
    mode: Mode,
    running: bool,
    offset: f32,
) {
    let c = shape[axis];
    let d = inputs(shape, c, shape.iter().sum::<usize>() as u64, offset);
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
    check_on(ctx, what, &got, &want, true, true, view.group_len());
}

#[test]
fn batch_norm_train_backward_over_channels_of_several_tiles_matches_f64() {
    // 8·40·40 = 12,800 elements per channel: more than one tile of 4096.
    // lavapipe sums them run by run (PartialsRuns); GPU sizes take the
    // per-invocation tiles over a strided channel (PartialsEach).
    let view = View::batch_norm(&[8, 3, 40, 40], 1);
    let plan = plan_backward_on(&affine_batch_spec(view), &gpu_sized().caps());
    assert!(
        plan.iter()
            .any(|d| d.kernel == BackwardKernel::PartialsEach),
        "{plan:?}"
    );
    for ctx in [ctx(), gpu_sized()] {
        batch_norm_case_on(
            ctx,
            "batch norm 2d train",
            &[8, 3, 40, 40],
            BatchNormConfig::torch_2d(),
            1,
            Mode::Train,
            true,
            1.0,
        );
    }
    // grad_input by runs is regrouped around a value of the channel: a
    // large common offset costs no digits.
    batch_norm_case_on(
        ctx(),
        "batch norm 2d train, offset 1e3",
        &[8, 3, 40, 40],
        BatchNormConfig::torch_2d(),
        1,
        Mode::Train,
        true,
        1e3,
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

#[test]
fn channels_last_backward_of_whole_vector_channels_matches_f64() {
    // Channel counts of whole vectors take the per-channel strip kernels:
    // eight channels per strip, an odd vector count (12 channels), one row
    // block (few rows) and many, train and eval, a large common offset.
    // On CPU adapters with subgroups, rows of 132 to 256 channels go a
    // subgroup per row block, each lane holding its channels' statistics:
    // 256 channels fill a lane's eight slots, over 70 rows (a block of 64
    // and a partial one). Rows of 1024 channels take the strips. (At an
    // offset of 1e3 from the running mean, eval's dγ = Σdy·x̂ sums 70 terms
    // near 1e3 per channel; one of 1024 channels cancels to -1.7, which f32
    // products miss by 2e-3, past this test's tolerance: an f32 limit of
    // any kernel, so that row width is checked at offset 1.)
    for (shape, offset) in [
        (&[4usize, 10, 10, 8][..], 1.0f32),
        (&[2, 3, 3, 12], 1.0),
        (&[8, 20, 20, 16], 1e3),
        (&[2, 5, 7, 256], 1e3),
        (&[2, 5, 7, 1024], 1.0),
    ] {
        for mode in [Mode::Train, Mode::Eval] {
            batch_norm_case_on(
                ctx(),
                &format!("channels-last batch norm {shape:?} {mode:?}"),
                shape,
                BatchNormConfig::keras(),
                3,
                mode,
                true,
                offset,
            );
        }
    }
    batch_norm_case(
        "batch norm 1d (N, C)",
        &[300, 16],
        BatchNormConfig::torch_1d(),
        1,
        Mode::Train,
        true,
    );
}

#[test]
fn channels_last_backward_merges_hundreds_of_row_blocks_serially_on_a_cpu() {
    // 32768 rows of 32 channels: 512 row blocks per channel on a CPU
    // adapter, 1024 sized for a GPU. A CPU merges up to
    // kernels::FINALIZE_SERIAL_MAX_CPU partials in one invocation, a GPU up
    // to FINALIZE_SERIAL_MAX (256): one serial workgroup for the 32 channels
    // on a CPU, a workgroup tree per channel on a GPU. 65536 rows of 4
    // channels make 2048 blocks, a tree everywhere.
    for ctx in [ctx(), gpu_sized()] {
        for shape in [[8usize, 64, 64, 32], [16, 64, 64, 4]] {
            let channels = shape[3];
            let serial = ctx.caps().cpu && channels == 32;
            let spec = affine_batch_spec(View::batch_norm(&shape, 3));
            let finalize: Vec<u32> = plan_backward_on(&spec, &ctx.caps())
                .iter()
                .filter(|d| d.kernel == BackwardKernel::Finalize)
                .map(|d| d.workgroups)
                .collect();
            assert_eq!(
                finalize,
                [if serial { 1 } else { channels as u32 }],
                "{shape:?}, cpu: {}",
                ctx.caps().cpu
            );
            batch_norm_case_on(
                ctx,
                &format!("channels-last batch norm {shape:?}"),
                &shape,
                BatchNormConfig::keras(),
                3,
                Mode::Train,
                true,
                1.0,
            );
        }
    }
}

fn group_norm_case(what: &str, shape: &[usize], groups: usize, config: GroupNormConfig) {
    group_norm_case_on(ctx(), what, shape, groups, config);
}

fn group_norm_case_on(
    ctx: &Context,
    what: &str,
    shape: &[usize],
    groups: usize,
    config: GroupNormConfig,
) {
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
    check_on(ctx, what, &got, &want, true, true, view.numel() / c);
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
    // Whole vectors of channels: the channels-last strip kernels, with many
    // row blocks per sample (groups of 2 channels) and groups of 8.
    group_norm_case(
        "keras group norm, row blocks",
        &[4, 24, 24, 16],
        8,
        GroupNormConfig::keras(),
    );
    group_norm_case(
        "keras group norm, groups of 8",
        &[2, 10, 10, 32],
        4,
        GroupNormConfig::keras(),
    );
    // Rows a subgroup walks holding each lane's channels: 34 vectors, 5 per
    // lane of 8, the fifth live in two lanes only, 63 rows per sample; and
    // groups of 6 channels, so vectors straddle two groups.
    group_norm_case(
        "keras group norm, 136 channels",
        &[2, 9, 7, 136],
        17,
        GroupNormConfig::keras(),
    );
    group_norm_case(
        "keras group norm, 192 channels in groups of 6",
        &[3, 5, 13, 192],
        32,
        GroupNormConfig::keras(),
    );
}

fn instance_norm_case(shape: &[usize], mode: Mode, tracked: bool) {
    instance_norm_case_on(ctx(), shape, mode, tracked);
}

fn instance_norm_case_on(ctx: &Context, shape: &[usize], mode: Mode, tracked: bool) {
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
    check_on(
        ctx,
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
    // Runs of 144: on lavapipe dγ/dβ and grad_input go run by run on
    // subgroups, each run's partial that of its own (sample, channel).
    instance_norm_case(&[3, 5, 12, 12], Mode::Eval, true);
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
fn backward_refuses_a_misaligned_grad_output_before_recording() {
    // A wrapped grad_output at offset 4 (allowed by from_buffer, not by
    // the adapter's storage offset alignment): refused with a typed error,
    // and the caller's encoder still submits.
    let ctx = ctx();
    let mut ln = LayerNorm::new(ctx, &[4], RowNormConfig::torch_layer_norm()).unwrap();
    ln.forward(ctx, &up(ctx, &[1.0, 2.0, 3.0, 5.0], &[1, 4]), Mode::Train)
        .unwrap();
    let buffer = ctx
        .device()
        .create_buffer(&gpunorm::wgpu::BufferDescriptor {
            label: None,
            size: 64,
            usage: gpunorm::wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    let dy = GpuTensor::from_buffer(std::sync::Arc::new(buffer), 4, &[1, 4], DType::F32).unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let e = ln.record_backward(ctx, &mut encoder, &dy).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("offset"), "{e}");
    ctx.submit_and_wait(encoder).unwrap();
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
    // A CPU with subgroups (lavapipe) walks runs of 40² on subgroups.
    let caps = ctx.caps();
    let (partials, grad_input) = if caps.cpu && caps.subgroups {
        (BackwardKernel::PartialsRuns, BackwardKernel::GradInputRuns)
    } else {
        (BackwardKernel::PartialsEach, BackwardKernel::GradInput)
    };
    assert_eq!(
        dispatches.iter().map(|d| d.kernel).collect::<Vec<_>>(),
        [partials, BackwardKernel::Finalize, grad_input]
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
    let spec_plan = plan_backward_on(&affine_batch_spec(view), &ctx.caps());
    assert_eq!(spec_plan, dispatches);
}

#[test]
fn record_backward_into_writes_the_callers_gradients_step_after_step() {
    // Gradients allocated once and filled with NaN: each step overwrites
    // every element (nothing needs zeroing), for the held rows of a
    // LayerNorm (with its column sums) and the channels of a Keras
    // GroupNorm, whose γ and β it has and whose inputs change every step.
    let ctx = ctx();
    let nan = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        ctx.upload(&vec![f32::NAN; n], shape).unwrap()
    };
    let ln_shape = [300, 64];
    let mut ln = LayerNorm::new(ctx, &[64], RowNormConfig::torch_layer_norm()).unwrap();
    let ln_grads = Gradients {
        grad_input: nan(&ln_shape),
        grad_weight: Some(nan(&[64])),
        grad_bias: Some(nan(&[64])),
    };
    let gn_shape = [2, 9, 7, 136];
    let mut gn = GroupNorm::new(ctx, 17, 136, GroupNormConfig::keras()).unwrap();
    let gn_grads = Gradients {
        grad_input: nan(&gn_shape),
        grad_weight: Some(nan(&[136])),
        grad_bias: Some(nan(&[136])),
    };
    for step in 0..2u64 {
        let a = inputs(&ln_shape, 64, 50 + step, 0.5);
        ln.set_weight(Some(up(ctx, &a.w, &[64]))).unwrap();
        let b = inputs(&gn_shape, 136, 60 + step, -1.0);
        gn.set_affine(Affine {
            weight: Some(up(ctx, &b.w, &[136])),
            bias: Some(up(ctx, &b.b, &[136])),
        })
        .unwrap();
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        let ln_y = ctx.zeros(&ln_shape, DType::F32).unwrap();
        ln.record(ctx, &mut encoder, &up(ctx, &a.x, &ln_shape), &ln_y)
            .unwrap();
        ln.record_backward_into(ctx, &mut encoder, &up(ctx, &a.dy, &ln_shape), &ln_grads)
            .unwrap();
        let gn_y = ctx.zeros(&gn_shape, DType::F32).unwrap();
        gn.record(ctx, &mut encoder, &up(ctx, &b.x, &gn_shape), &gn_y)
            .unwrap();
        gn.record_backward_into(ctx, &mut encoder, &up(ctx, &b.dy, &gn_shape), &gn_grads)
            .unwrap();
        ctx.submit_and_wait(encoder).unwrap();
        let ln_view = View::layer_norm(&ln_shape, 64);
        let want = reference::backward(&a.x, &a.dy, &ln_view, false, 1e-5, Some(&a.w), None);
        check(
            &format!("layer norm, step {step}"),
            &ln_grads,
            &want,
            true,
            true,
            300,
        );
        let gn_view = View::group_norm_channels_last(&gn_shape, 17);
        let want = reference::backward(&b.x, &b.dy, &gn_view, false, 1e-3, Some(&b.w), None);
        check_on(
            ctx,
            &format!("group norm, step {step}"),
            &gn_grads,
            &want,
            true,
            true,
            126,
        );
    }
}

#[test]
fn record_backward_into_refuses_gradients_that_do_not_fit() {
    let ctx = ctx();
    let shape = [8, 3, 5, 5];
    let d = inputs(&shape, 3, 43, 0.0);
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
    let dy = up(ctx, &d.dy, &shape);
    bn.forward(ctx, &up(ctx, &d.x, &shape), Mode::Train)
        .unwrap();
    let fits = || Gradients {
        grad_input: ctx.zeros(&shape, DType::F32).unwrap(),
        grad_weight: Some(ctx.zeros(&[3], DType::F32).unwrap()),
        grad_bias: Some(ctx.zeros(&[3], DType::F32).unwrap()),
    };
    let other = Context::new().unwrap();
    let shared = ctx.zeros(&[64], DType::F32).unwrap();
    let align = ctx.storage_offset_alignment();
    let in_shared = |offset: u64| {
        GpuTensor::from_buffer(shared.buffer().clone(), offset, &[3], DType::F32).unwrap()
    };
    type Case = (&'static str, Gradients, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            "grad_input of another shape",
            Gradients {
                grad_input: ctx.zeros(&[8, 3, 25], DType::F32).unwrap(),
                ..fits()
            },
            |e| matches!(e, Error::Shape(_)),
        ),
        (
            "grad_input of another dtype",
            Gradients {
                grad_input: ctx.zeros(&shape, DType::F16).unwrap(),
                ..fits()
            },
            |e| matches!(e, Error::Shape(_)),
        ),
        (
            "grad_weight of the wrong length",
            Gradients {
                grad_weight: Some(ctx.zeros(&[4], DType::F32).unwrap()),
                ..fits()
            },
            |e| matches!(e, Error::Shape(_)),
        ),
        (
            "no grad_weight for γ",
            Gradients {
                grad_weight: None,
                ..fits()
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        ),
        (
            "grad_input sharing grad_output's buffer",
            Gradients {
                grad_input: GpuTensor::from_buffer(dy.buffer().clone(), 0, &shape, DType::F32)
                    .unwrap(),
                ..fits()
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        ),
        (
            "grad_weight and grad_bias in one buffer",
            Gradients {
                grad_weight: Some(in_shared(0)),
                grad_bias: Some(in_shared(align)),
                ..fits()
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        ),
        (
            "grad_input of another context",
            Gradients {
                grad_input: other.zeros(&shape, DType::F32).unwrap(),
                ..fits()
            },
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("another Context")),
        ),
    ];
    for (what, grads, kind) in cases {
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        let err = bn
            .record_backward_into(ctx, &mut encoder, &dy, &grads)
            .expect_err(what);
        assert!(kind(&err), "{what}: {err:?}");
    }
    // Without affine, parameter gradients must be absent.
    let mut plain = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d().affine(false)).unwrap();
    plain
        .forward(ctx, &up(ctx, &d.x, &shape), Mode::Train)
        .unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let err = plain
        .record_backward_into(ctx, &mut encoder, &dy, &fits())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

#[test]
fn backward_passes_recorded_into_one_encoder_share_the_scratch_safely() {
    // The backward scratch is one buffer per context: two layers' passes
    // (the second smaller, so the buffer is not regrown between them)
    // recorded in one encoder must each see only their own sums.
    let ctx = ctx();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let ln_shape = [300, 64];
    let a = inputs(&ln_shape, 64, 7, 0.5);
    let mut ln = LayerNorm::new(ctx, &[64], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_weight(Some(up(ctx, &a.w, &[64]))).unwrap();
    let ln_x = up(ctx, &a.x, &ln_shape);
    let ln_y = ctx.zeros(&ln_shape, DType::F32).unwrap();
    ln.record(ctx, &mut encoder, &ln_x, &ln_y).unwrap();
    let (ln_grads, _) = ln
        .record_backward(ctx, &mut encoder, &up(ctx, &a.dy, &ln_shape))
        .unwrap();
    let bn_shape = [4, 3, 10, 10];
    let b = inputs(&bn_shape, 3, 8, 1.0);
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
    let bn_x = up(ctx, &b.x, &bn_shape);
    let bn_y = ctx.zeros(&bn_shape, DType::F32).unwrap();
    bn.record(ctx, &mut encoder, &bn_x, &bn_y, Mode::Train)
        .unwrap();
    let (bn_grads, _) = bn
        .record_backward(ctx, &mut encoder, &up(ctx, &b.dy, &bn_shape))
        .unwrap();
    ctx.submit_and_wait(encoder).unwrap();
    let ln_view = View::layer_norm(&ln_shape, 64);
    let want = reference::backward(&a.x, &a.dy, &ln_view, false, 1e-5, Some(&a.w), None);
    check("layer norm, first pass", &ln_grads, &want, true, true, 300);
    let bn_view = View::batch_norm(&bn_shape, 1);
    let want = reference::backward(&b.x, &b.dy, &bn_view, false, 1e-5, None, None);
    check(
        "batch norm, second pass",
        &bn_grads,
        &want,
        true,
        true,
        bn_view.group_len(),
    );
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

// ---------------------------------------------------------------------------
// f16 and bf16 storage: x, grad_output and grad_input share the input's
// dtype, every sum is f32, grad_input is rounded once at the store, and the
// parameter gradients stay f32.
//
// Tolerance of grad_input, against the f64 reference computed from the
// stored (already rounded) half inputs:
//   |got − ref| ≤ 2·ulp(max(|ref|, 2^-14)) + K·2^-24·S
// The first term is SPEC §6's half tolerance (rounding once costs ½ ulp).
// The second is the f32 arithmetic before that rounding: the value
// rstd·((g − Σg/n) − x̂·Σg·x̂/n) is formed from terms of size
// S = rstd·(|g| + mean|g| + |x̂|·mean|g·x̂|) (S = rstd·|g| with running
// statistics), each carrying a relative f32 error of a few units of 2^-24
// (x̂ from the saved mean/rstd, the products) plus the error of the f32 sums
// (≤ 16 sequential adds per invocation, an 8-level tree, a few merges: well
// under 2^5 units relative to Σ|term|). K = 32 covers that with room; it
// only matters where dx cancels to far below its terms (|ref| ≪ S), where a
// half ulp of the result is smaller than the f32 noise of computing it.

/// Values as `dtype` stores them (what the GPU reads), as f32.
fn stored(values: &[f32], dtype: DType) -> Vec<f32> {
    gpunorm::tensor::decode(&gpunorm::tensor::encode(values, dtype), dtype)
}

/// ulp of |v| in `dtype`, floored at 2^-14 (SPEC §6).
fn half_ulp(v: f64, dtype: DType) -> f64 {
    let mantissa = if dtype == DType::BF16 { 7 } else { 10 };
    2f64.powi(v.abs().max(2f64.powi(-14)).log2().floor() as i32 - mantissa)
}

/// f32 units of the accumulation slack (see above).
const F32_SLACK_UNITS: f64 = 32.0;

/// One half-precision case: inputs rounded to the storage dtype.
struct Half {
    what: String,
    dtype: DType,
    shape: Vec<usize>,
    view: View,
    rms: bool,
    eps: f64,
    x: Vec<f32>,
    dy: Vec<f32>,
    /// γ and β (uploaded as f32).
    w: Vec<f32>,
    b: Vec<f32>,
    /// Running (mean, var) per channel, constants of an eval backward.
    running: Option<(Vec<f32>, Vec<f32>)>,
}

impl Half {
    fn new(what: &str, dtype: DType, shape: &[usize], view: View, seed: u64, offset: f32) -> Half {
        let n = view.numel();
        Half {
            what: format!("{what} {dtype} {shape:?}"),
            dtype,
            shape: shape.to_vec(),
            view,
            rms: false,
            eps: 1e-5,
            x: stored(&normal(n, seed, offset, 2.0), dtype),
            dy: stored(&normal(n, seed + 1, 0.0, 1.0), dtype),
            w: normal(view.affine_len, seed + 2, 1.0, 0.5),
            b: normal(view.affine_len, seed + 3, 0.0, 0.5),
            running: None,
        }
    }

    fn upload(&self, ctx: &Context, v: &[f32]) -> GpuTensor {
        ctx.upload_as(v, &self.shape, self.dtype).unwrap()
    }

    fn affine(&self, ctx: &Context, bias: bool) -> Affine {
        let len = self.view.affine_len;
        Affine {
            weight: Some(up(ctx, &self.w, &[len])),
            bias: bias.then(|| up(ctx, &self.b, &[len])),
        }
    }

    /// Per element, the size S of the terms grad_input is formed from.
    fn f32_scale(&self) -> Vec<f64> {
        let v = &self.view;
        let stats: Vec<(f64, f64)> = match &self.running {
            Some((m, var)) => (0..v.groups())
                .map(|k| (m[k % v.g] as f64, var[k % v.g] as f64))
                .collect(),
            None => reference::group_stats(&self.x, v, self.rms),
        };
        let rstd: Vec<f64> = stats
            .iter()
            .map(|&(_, var)| 1.0 / (var + self.eps).sqrt())
            .collect();
        let locate = |i: usize| {
            let b = i % v.b;
            let g = (i / v.b) % v.g;
            let p = i / (v.a * v.g * v.b);
            (p * v.g + g, (g * v.b + b) / v.affine_div.max(1))
        };
        let terms = |i: usize| {
            let (k, c) = locate(i);
            let g = self.dy[i] as f64 * self.w[c] as f64;
            let xhat = (self.x[i] as f64 - stats[k].0) * rstd[k];
            (k, g.abs(), (g * xhat).abs(), xhat.abs())
        };
        let mut mean_g = vec![0.0; v.groups()];
        let mut mean_gx = vec![0.0; v.groups()];
        let n = v.group_len() as f64;
        for i in 0..v.numel() {
            let (k, g, gx, _) = terms(i);
            mean_g[k] += g / n;
            mean_gx[k] += gx / n;
        }
        (0..v.numel())
            .map(|i| {
                let (k, g, _, xhat) = terms(i);
                if self.running.is_some() {
                    rstd[k] * g
                } else {
                    rstd[k] * (g + mean_g[k] + xhat * mean_gx[k])
                }
            })
            .collect()
    }

    /// Checks the GPU gradients against the f64 reference from the stored
    /// inputs; returns the worst grad_input error in half ulps.
    fn check(&self, ctx: &Context, got: &Gradients, bias: bool) -> f64 {
        let what = &self.what;
        assert_eq!(
            got.grad_input.dtype(),
            self.dtype,
            "{what}: grad_input dtype"
        );
        assert_eq!(got.grad_input.shape(), &self.shape[..], "{what}");
        let running = self
            .running
            .as_ref()
            .map(|(m, v)| (m.as_slice(), v.as_slice()));
        let want = reference::backward(
            &self.x,
            &self.dy,
            &self.view,
            self.rms,
            self.eps,
            Some(&self.w),
            running,
        );
        let dx = ctx.download(&got.grad_input).unwrap();
        let scale = self.f32_scale();
        let mut worst_ulps = 0.0f64;
        for (i, (&g, &w)) in dx.iter().zip(&want.grad_input).enumerate() {
            let ulp = half_ulp(w, self.dtype);
            let err = (g as f64 - w).abs();
            let tol = 2.0 * ulp + F32_SLACK_UNITS * 2f64.powi(-24) * scale[i];
            assert!(
                err <= tol,
                "{what}: grad_input[{i}] = {g}, reference {w}: {} ulp, tolerance {} ulp",
                err / ulp,
                tol / ulp
            );
            worst_ulps = worst_ulps.max(err / ulp);
        }
        let terms = self.view.numel() / self.view.affine_len;
        let param_atol = ATOL * (terms as f64).sqrt().max(1.0);
        let gw = got.grad_weight.as_ref().expect("grad_weight");
        assert_eq!(gw.dtype(), DType::F32, "{what}: grad_weight stays f32");
        assert_close(
            &format!("{what} grad_weight"),
            &ctx.download(gw).unwrap(),
            &want.grad_weight,
            param_atol,
            RTOL,
        );
        assert_eq!(got.grad_bias.is_some(), bias, "{what}: grad_bias");
        if let Some(gb) = &got.grad_bias {
            assert_eq!(gb.dtype(), DType::F32, "{what}: grad_bias stays f32");
            assert_close(
                &format!("{what} grad_bias"),
                &ctx.download(gb).unwrap(),
                &want.grad_bias,
                param_atol,
                RTOL,
            );
        }
        worst_ulps
    }
}

const HALVES: [DType; 2] = [DType::F16, DType::BF16];

fn half_layer_norm(dtype: DType, rows: usize, len: usize, rms: bool, offset: f32) -> f64 {
    half_layer_norm_on(ctx(), dtype, rows, len, rms, offset)
}

fn half_layer_norm_on(
    ctx: &Context,
    dtype: DType,
    rows: usize,
    len: usize,
    rms: bool,
    offset: f32,
) -> f64 {
    let shape = [rows, len];
    let name = if rms { "rms norm" } else { "layer norm" };
    let mut h = Half::new(
        name,
        dtype,
        &shape,
        View::layer_norm(&shape, len),
        (rows * 31 + len) as u64,
        offset,
    );
    h.rms = rms;
    let affine = h.affine(ctx, !rms);
    let got = if rms {
        h.eps = f32::EPSILON as f64;
        let mut m = RmsNorm::new(ctx, &[len], RowNormConfig::torch_rms_norm()).unwrap();
        m.set_weight(affine.weight).unwrap();
        m.forward(ctx, &h.upload(ctx, &h.x), Mode::Train).unwrap();
        m.backward(ctx, &h.upload(ctx, &h.dy)).unwrap()
    } else {
        let mut m = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
        m.set_weight(affine.weight).unwrap();
        m.set_bias(affine.bias).unwrap();
        m.forward(ctx, &h.upload(ctx, &h.x), Mode::Train).unwrap();
        m.backward(ctx, &h.upload(ctx, &h.dy)).unwrap()
    };
    h.check(ctx, &got, !rms)
}

#[test]
fn half_layer_norm_backward_matches_f64_within_2_ulp() {
    for dtype in HALVES {
        // Held rows of whole pairs of vectors (256; 144, where some lanes
        // hold a dead pair) move in 16-byte accesses, of an odd count of
        // vectors (260) singly; rows of 33 (odd): the tiled path, and an odd
        // total whose last word is half padding; 3000: too long to hold,
        // in pairs; 68 rows of 1040 walk four at a time (singly) with column
        // sums for dγ and dβ.
        for (rows, len) in [
            (16, 256),
            (9, 144),
            (9, 260),
            (7, 33),
            (3, 3000),
            (68, 1040),
        ] {
            let u = half_layer_norm(dtype, rows, len, false, 0.0);
            eprintln!("layer norm {dtype} {rows}x{len}: {u:.3} ulp");
        }
    }
    // An offset input (the f16 forward test's 300).
    let u = half_layer_norm(DType::F16, 8, 512, false, 300.0);
    eprintln!("layer norm f16 offset 300: {u:.3} ulp");
    // A GPU's rows held by a workgroup: 3 vectors per invocation of 256, the
    // third live in 4 invocations.
    for dtype in HALVES {
        for rms in [false, true] {
            let u = half_layer_norm_on(gpu_sized(), dtype, 6, 2064, rms, 0.5);
            eprintln!("gpu-sized rms={rms} {dtype} 6x2064: {u:.3} ulp");
        }
    }
}

#[test]
fn half_rms_norm_backward_matches_f64_within_2_ulp() {
    for dtype in HALVES {
        for (rows, len) in [(5, 32), (9, 33), (4, 1000)] {
            let u = half_layer_norm(dtype, rows, len, true, 0.3);
            eprintln!("rms norm {dtype} {rows}x{len}: {u:.3} ulp");
        }
    }
}

fn half_batch_norm(dtype: DType, shape: &[usize], mode: Mode) -> f64 {
    let ctx = ctx();
    let c = shape[1];
    let mut h = Half::new(
        &format!("batch norm {mode:?}"),
        dtype,
        shape,
        View::batch_norm(shape, 1),
        shape.iter().product::<usize>() as u64,
        1.0,
    );
    let rm = normal(c, 5, 0.5, 0.5);
    let rv: Vec<f32> = normal(c, 6, 0.0, 1.0).iter().map(|a| 0.5 + a * a).collect();
    let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::torch()).unwrap();
    let affine = h.affine(ctx, true);
    bn.set_weight(affine.weight).unwrap();
    bn.set_bias(affine.bias).unwrap();
    bn.set_running_stats(ctx, Some((up(ctx, &rm, &[c]), up(ctx, &rv, &[c]), Some(0))))
        .unwrap();
    bn.forward(ctx, &h.upload(ctx, &h.x), mode).unwrap();
    let got = bn.backward(ctx, &h.upload(ctx, &h.dy)).unwrap();
    if mode == Mode::Eval {
        h.running = Some((rm, rv));
    }
    h.check(ctx, &got, true)
}

#[test]
fn half_batch_norm_train_and_eval_backward_match_f64_within_2_ulp() {
    for dtype in HALVES {
        // [3, 5, 7]: odd channels of 21 elements, odd total; [4, 3, 40, 40]:
        // channels of several tiles; (N, C) with whole vectors of channels:
        // the channels-last kernels.
        for shape in [&[3, 5, 7][..], &[4, 3, 40, 40], &[6, 4], &[40, 12]] {
            for mode in [Mode::Train, Mode::Eval] {
                let u = half_batch_norm(dtype, shape, mode);
                eprintln!("batch norm {dtype} {shape:?} {mode:?}: {u:.3} ulp");
            }
        }
    }
}

fn half_group_norm(
    ctx: &Context,
    dtype: DType,
    shape: &[usize],
    groups: usize,
    keras: bool,
) -> f64 {
    let c = if keras {
        shape[shape.len() - 1]
    } else {
        shape[1]
    };
    let (view, config) = if keras {
        (
            View::group_norm_channels_last(shape, groups),
            GroupNormConfig::keras(),
        )
    } else {
        (View::group_norm(shape, groups), GroupNormConfig::torch())
    };
    let mut h = Half::new(
        &format!("group norm ({groups} groups, keras {keras})"),
        dtype,
        shape,
        view,
        700 + groups as u64,
        -0.5,
    );
    h.eps = config.eps as f64;
    let mut gn = GroupNorm::new(ctx, groups, c, config).unwrap();
    gn.set_affine(h.affine(ctx, true)).unwrap();
    gn.forward(ctx, &h.upload(ctx, &h.x)).unwrap();
    let got = gn.backward(ctx, &h.upload(ctx, &h.dy)).unwrap();
    h.check(ctx, &got, true)
}

#[test]
fn half_group_norm_backward_matches_f64_within_2_ulp() {
    for dtype in HALVES {
        for (shape, groups, keras) in [
            (&[2, 12, 9, 9][..], 3, false), // groups of 324 (row kernel)
            (&[2, 8, 4, 4], 2, false),      // channels of 16: in pairs
            (&[2, 8, 3, 4], 2, false),      // groups of 48, channels of 12: singly
            (&[2, 6, 3, 3], 2, false),      // groups of 27 (odd: tiled)
            (&[3, 6, 5], 6, false),         // one channel per group, odd
            (&[2, 5, 5, 12], 4, true),      // channels-last
            (&[2, 7, 6], 6, true),          // channels-last, one per group
        ] {
            let u = half_group_norm(ctx(), dtype, shape, groups, keras);
            eprintln!("group norm {dtype} {shape:?}/{groups}: {u:.3} ulp");
        }
        // A GPU's workgroup per group of 4 channels of 100, with a sum per
        // channel.
        let u = half_group_norm(gpu_sized(), dtype, &[2, 8, 10, 10], 2, false);
        eprintln!("gpu-sized group norm {dtype}: {u:.3} ulp");
    }
}

fn half_instance_norm(
    ctx: &Context,
    dtype: DType,
    shape: &[usize],
    mode: Mode,
    tracked: bool,
) -> f64 {
    let c = shape[1];
    let mut h = Half::new(
        &format!("instance norm {mode:?} tracked {tracked}"),
        dtype,
        shape,
        View::instance_norm(shape),
        900 + c as u64,
        0.0,
    );
    let rm = normal(c, 7, 0.5, 0.5);
    let rv: Vec<f32> = normal(c, 8, 0.0, 1.0).iter().map(|a| 0.5 + a * a).collect();
    let config = InstanceNormConfig {
        affine: true,
        track_running_stats: tracked,
        ..InstanceNormConfig::torch()
    };
    let mut inorm = InstanceNorm::new(ctx, c, config).unwrap();
    inorm.set_affine(h.affine(ctx, true)).unwrap();
    if tracked {
        inorm
            .set_running_stats(ctx, Some((up(ctx, &rm, &[c]), up(ctx, &rv, &[c]), Some(0))))
            .unwrap();
    }
    inorm.forward(ctx, &h.upload(ctx, &h.x), mode).unwrap();
    let got = inorm.backward(ctx, &h.upload(ctx, &h.dy)).unwrap();
    if mode == Mode::Eval && tracked {
        h.running = Some((rm, rv));
    }
    h.check(ctx, &got, true)
}

#[test]
fn half_instance_norm_backward_matches_f64_within_2_ulp() {
    for dtype in HALVES {
        for (shape, mode, tracked) in [
            (&[2, 3, 8, 8][..], Mode::Train, false), // even: row kernel
            (&[3, 4, 7, 7], Mode::Train, false),     // odd: tiled
            (&[2, 3, 5, 5], Mode::Eval, true),       // running stats
        ] {
            let u = half_instance_norm(ctx(), dtype, shape, mode, tracked);
            eprintln!("instance norm {dtype} {shape:?} {mode:?}: {u:.3} ulp");
        }
        // A GPU's workgroup per group of 1600.
        let u = half_instance_norm(gpu_sized(), dtype, &[2, 3, 40, 40], Mode::Train, false);
        eprintln!("gpu-sized instance norm {dtype}: {u:.3} ulp");
    }
}

#[test]
fn half_grad_input_overflows_to_infinity_and_keeps_nan() {
    // BatchNorm eval: grad_input = dy·γ·rstd elementwise (running var 1), so
    // γ of channel 0 pushes it past the dtype's largest finite value.
    let ctx = ctx();
    for (dtype, big) in [(DType::F16, 1e5f32), (DType::BF16, 3.4e38)] {
        let shape = [4, 2];
        let x = stored(&[0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0, 3.0], dtype);
        let dy = stored(&[1.0, 0.5, -1.0, f32::NAN, 0.25, -2.0, 1e-3, 3.0], dtype);
        let w = [big, 1.0];
        let (rm, rv) = (vec![0.0f32; 2], vec![1.0f32; 2]);
        let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch()).unwrap();
        bn.set_weight(Some(up(ctx, &w, &[2]))).unwrap();
        bn.set_running_stats(ctx, Some((up(ctx, &rm, &[2]), up(ctx, &rv, &[2]), Some(0))))
            .unwrap();
        let xt = ctx.upload_as(&x, &shape, dtype).unwrap();
        bn.forward(ctx, &xt, Mode::Eval).unwrap();
        let dyt = ctx.upload_as(&dy, &shape, dtype).unwrap();
        let got = ctx
            .download(&bn.backward(ctx, &dyt).unwrap().grad_input)
            .unwrap();
        let want = reference::backward(
            &x,
            &dy,
            &View::batch_norm(&shape, 1),
            false,
            1e-5,
            Some(&w),
            Some((&rm, &rv)),
        );
        // The reference rounded once to the storage dtype.
        let once: Vec<f64> = want
            .grad_input
            .iter()
            .map(|&v| match dtype {
                DType::F16 => half::f16::from_f64(v).to_f64(),
                _ => half::bf16::from_f64(v).to_f64(),
            })
            .collect();
        assert!(once[0].is_infinite() && once[2].is_infinite(), "{once:?}");
        for (i, (&g, &o)) in got.iter().zip(&once).enumerate() {
            if o.is_nan() {
                assert!(g.is_nan(), "{dtype} [{i}]: {g}, expected NaN");
            } else if o.is_infinite() {
                assert_eq!(g as f64, o, "{dtype} [{i}]: expected overflow to {o}");
            } else {
                assert!(
                    (g as f64 - o).abs() <= half_ulp(o, dtype),
                    "{dtype} [{i}]: {g} vs {o}"
                );
            }
        }
    }
}

#[test]
fn affine_gradients_sum_every_sample_of_a_large_batch() {
    // An InstanceNorm over 30,000 samples and a LayerNorm over 30,000 rows
    // of one element: each affine gradient sums 30,000 groups' partials.
    // lavapipe runs at most 65,535 loop iterations per invocation and
    // silently stops after them: the finalize's workgroup tree per group,
    // in a loop over groups, lost every group past 6,554 (a fuzzing find),
    // and a loop over groups around one over tiles every group past 21,845.
    let ctx = ctx();
    let n = 30_000;
    for (what, shape, view) in [
        (
            "InstanceNorm [30000, 1, 2]",
            vec![n, 1, 2],
            View::instance_norm(&[n, 1, 2]),
        ),
        (
            "LayerNorm [30000, 1]",
            vec![n, 1],
            View::layer_norm(&[n, 1], 1),
        ),
    ] {
        let numel = view.numel();
        let x = normal(numel, 93, 1.0, 2.0);
        let dy = normal(numel, 94, 0.5, 1.0);
        let xt = ctx.upload(&x, &shape).unwrap();
        let dyt = ctx.upload(&dy, &shape).unwrap();
        let affine = Affine {
            weight: Some(ctx.upload(&[1.5], &[1]).unwrap()),
            bias: Some(ctx.upload(&[0.25], &[1]).unwrap()),
        };
        let g = if shape.len() == 3 {
            let config = InstanceNormConfig {
                affine: true,
                ..InstanceNormConfig::torch_1d()
            };
            let mut inorm = InstanceNorm::new(ctx, 1, config).unwrap();
            inorm.set_affine(affine).unwrap();
            inorm.forward(ctx, &xt, Mode::Train).unwrap();
            inorm.backward(ctx, &dyt).unwrap()
        } else {
            let mut ln = LayerNorm::new(ctx, &[1], RowNormConfig::torch_layer_norm()).unwrap();
            ln.set_weight(affine.weight).unwrap();
            ln.set_bias(affine.bias).unwrap();
            ln.forward(ctx, &xt, Mode::Train).unwrap();
            ln.backward(ctx, &dyt).unwrap()
        };
        let want = reference::backward(&x, &dy, &view, false, 1e-5, Some(&[1.5]), None);
        for (got, want, name) in [
            (&g.grad_weight, &want.grad_weight, "grad_weight"),
            (&g.grad_bias, &want.grad_bias, "grad_bias"),
        ] {
            let got = ctx.download(got.as_ref().unwrap()).unwrap();
            assert_close(&format!("{what}: {name}"), &got, want, 1e-2, 1e-4);
        }
        assert_close(
            &format!("{what}: grad_input"),
            &ctx.download(&g.grad_input).unwrap(),
            &want.grad_input,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn an_empty_batch_writes_its_affine_gradients_too() {
    // No element: dγ and dβ are sums over nothing, 0, also where the
    // caller's buffers held other values (record_backward_into needs no
    // zeroing; they kept them). Keras's BatchNormalization trained on an
    // empty batch gives a NaN dγ: its γ gradient meets the NaN moments
    // (Keras 3.15 on torch; dβ stays 0, and eval mode gives 0).
    let ctx = ctx();
    let nan = f32::NAN;
    for (config, shape, mode, dw) in [
        (BatchNormConfig::torch_2d(), [0, 4, 3, 3], Mode::Train, 0.0),
        (BatchNormConfig::keras(), [0, 3, 3, 4], Mode::Train, nan),
        (BatchNormConfig::keras(), [0, 3, 3, 4], Mode::Eval, 0.0),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let mut bn = BatchNorm::new(ctx, 4, config.clone()).unwrap();
            let param = |v: f32| Some(ctx.upload_as(&[v; 4], &[4], dtype).unwrap());
            bn.set_weight(param(1.0)).unwrap();
            bn.set_bias(param(0.0)).unwrap();
            let count = (config.convention == Convention::Torch).then_some(0);
            let stats = (param(0.0).unwrap(), param(1.0).unwrap(), count);
            bn.set_running_stats(ctx, Some(stats)).unwrap();
            let sevens = || ctx.upload_as(&[7.0; 4], &[4], dtype).unwrap();
            let grads = Gradients {
                grad_input: ctx.zeros(&shape, dtype).unwrap(),
                grad_weight: Some(sevens()),
                grad_bias: Some(sevens()),
            };
            let x = ctx.upload_as(&[], &shape, dtype).unwrap();
            let mut encoder = ctx
                .device()
                .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
            let y = ctx.zeros(&shape, dtype).unwrap();
            bn.record(ctx, &mut encoder, &x, &y, mode).unwrap();
            bn.record_backward_into(ctx, &mut encoder, &x, &grads)
                .unwrap();
            ctx.submit_and_wait(encoder).unwrap();
            let got_w = ctx.download(grads.grad_weight.as_ref().unwrap()).unwrap();
            let got_b = ctx.download(grads.grad_bias.as_ref().unwrap()).unwrap();
            let what = format!("{:?} {mode:?} {dtype}", config.convention);
            assert!(
                got_w
                    .iter()
                    .all(|&g| g == dw || (g.is_nan() && dw.is_nan())),
                "{what}: dγ {got_w:?}"
            );
            assert_eq!(got_b, vec![0.0; 4], "{what}: dβ");
        }
    }
}
