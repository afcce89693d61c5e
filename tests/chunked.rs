//! Tensors larger than one storage binding: a context with an artificially
//! small binding limit forces the chunked path on small data.

mod common;
use common::{assert_close, layer_norm_on, layer_norm_reference, normal};
use gpunorm::{
    reference, BatchNorm, BatchNormConfig, Context, ContextOptions, DType, Error, InstanceNorm,
    InstanceNormConfig, Mode, RowNormConfig, View,
};

/// A context that binds at most `bytes` per storage buffer.
fn binding_limited_ctx(bytes: u64) -> Context {
    Context::with_options(ContextOptions {
        max_storage_binding: Some(bytes),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn chunked_batch_norm_channels_first_matches_f64_and_updates_running_stats() {
    let ctx = binding_limited_ctx(4096);
    let shape = [6, 5, 11, 13]; // 4290 elements: 5 chunks, channels straddle them
    let x = normal(4290, 21, 1e3, 2.0);
    let mut bn = BatchNorm::new(&ctx, 5, BatchNormConfig::torch_2d()).unwrap();
    let y = ctx
        .download(
            &bn.forward(&ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
                .unwrap(),
        )
        .unwrap();
    let view = View::batch_norm(&shape, 1);
    let want = reference::forward(&x, &view, false, 1e-5, None, None);
    assert_close("chunked bn", &y, &want, 1e-4, 1e-5);
    let stats = reference::group_stats(&x, &view, false);
    let n = (6 * 11 * 13) as f64;
    let rm: Vec<f64> = stats.iter().map(|s| 0.1 * s.0).collect();
    let rv: Vec<f64> = stats
        .iter()
        .map(|s| 0.9 + 0.1 * s.1 * n / (n - 1.0))
        .collect();
    let r = bn.running_stats().unwrap();
    assert_close(
        "running_mean",
        &ctx.download(&r.mean).unwrap(),
        &rm,
        1e-4,
        1e-5,
    );
    assert_close(
        "running_var",
        &ctx.download(&r.var).unwrap(),
        &rv,
        1e-4,
        1e-5,
    );
    assert_eq!(
        r.num_batches_tracked(&ctx).unwrap(),
        Some(1),
        "one batch, however many chunks"
    );
    // Eval mode, chunked normalize only, with the running statistics just
    // checked (the f32 values on the device).
    let y = ctx
        .download(
            &bn.forward(&ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Eval)
                .unwrap(),
        )
        .unwrap();
    let r = bn.running_stats().unwrap();
    let running: Vec<(f64, f64)> = ctx
        .download(&r.mean)
        .unwrap()
        .iter()
        .zip(ctx.download(&r.var).unwrap())
        .map(|(&m, v)| (m as f64, v as f64))
        .collect();
    let want = reference::normalize(&x, &view, &running, 1e-5, None, None);
    assert_close("chunked bn eval", &y, &want, 1e-4, 1e-5);
}

#[test]
fn chunked_channels_last_and_long_rows_match_f64() {
    // 4096 f32 per chunk; the scratch of 65 channels must fit one binding too.
    let ctx = binding_limited_ctx(16384);
    let shape = [20, 9, 65];
    let x = normal(20 * 9 * 65, 22, -50.0, 3.0);
    let mut bn = BatchNorm::new(&ctx, 65, BatchNormConfig::keras()).unwrap();
    let y = ctx
        .download(
            &bn.forward(&ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
                .unwrap(),
        )
        .unwrap();
    let want = reference::forward(&x, &View::batch_norm(&shape, 2), false, 1e-3, None, None);
    assert_close("chunked channels-last bn", &y, &want, 1e-4, 1e-5);

    let (rows, len) = (3, 5000); // rows longer than a chunk
    let x = normal(rows * len, 23, 7.0, 1.0);
    let y = layer_norm_on(&ctx, &x, rows, len, RowNormConfig::torch_layer_norm());
    let want = layer_norm_reference(&x, rows, len, 1e-5);
    assert_close("chunked layer norm", &y, &want, 1e-4, 1e-5);
}

#[test]
fn chunked_half_storage_and_instance_norm_match_f64() {
    let ctx = binding_limited_ctx(4096);
    let shape = [3, 4, 1001]; // odd spatial size, 2048 halves per chunk
    let x: Vec<f32> = normal(3 * 4 * 1001, 24, 3.0, 1.0)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let mut cfg = InstanceNormConfig::torch();
    cfg.affine = true;
    let mut inorm = InstanceNorm::new(&ctx, 4, cfg).unwrap();
    let xt = ctx.upload_as(&x, &shape, DType::F16).unwrap();
    let y = ctx
        .download(&inorm.forward(&ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let want = reference::forward(&x, &View::instance_norm(&shape), false, 1e-5, None, None);
    // 2 ulp of f16 at |y| < 4 is at most 2^-8.
    assert_close("chunked f16 instance norm", &y, &want, 4e-3, 0.0);
}

#[test]
fn a_tensor_beyond_the_buffer_limit_is_a_typed_error_not_a_driver_abort() {
    let ctx = Context::with_options(ContextOptions {
        max_buffer_size: Some(1024),
        ..Default::default()
    })
    .unwrap();
    match ctx.upload(&normal(1024, 1, 0.0, 1.0), &[4, 256]) {
        Err(Error::TooLarge { limit_name, .. }) => assert_eq!(limit_name, "max_buffer_size"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// What one chunked backward case checks against the f64 backward.
struct BackwardCase<'a> {
    what: &'a str,
    dtype: DType,
    shape: &'a [usize],
    view: View,
    rms: bool,
    eps: f64,
    weight: Option<&'a [f32]>,
    running: Option<(&'a [f32], &'a [f32])>,
    /// Bytes per storage binding (4 KiB unless the forward's scratch needs
    /// more).
    binding: u64,
}

impl<'a> BackwardCase<'a> {
    /// A train-mode case with eps 1e-5 and γ `weight` (set `rms`, `eps`,
    /// `running` on the result for others).
    fn new(
        what: &'a str,
        dtype: DType,
        shape: &'a [usize],
        view: View,
        weight: &'a [f32],
        binding: u64,
    ) -> Self {
        BackwardCase {
            what,
            dtype,
            shape,
            view,
            rms: false,
            eps: 1e-5,
            weight: Some(weight),
            running: None,
            binding,
        }
    }
}

/// Runs `layer` (a forward, then the backward of `dy`) on a context binding
/// at most `case.binding` bytes per storage buffer, so x, grad_output and
/// grad_input are split in three or more chunks, and checks the gradients
/// against the f64 backward of the stored inputs.
fn chunked_backward_matches_f64(
    case: BackwardCase,
    layer: impl FnOnce(&Context, &gpunorm::GpuTensor, &gpunorm::GpuTensor) -> gpunorm::Gradients,
) {
    let ctx = binding_limited_ctx(case.binding);
    let dtype = case.dtype;
    let n: usize = case.shape.iter().product();
    assert!(
        n * dtype.size() > 2 * case.binding as usize,
        "{}: three chunks or more",
        case.what
    );
    let stored = |v: Vec<f32>| gpunorm::tensor::decode(&gpunorm::tensor::encode(&v, dtype), dtype);
    let x = stored(normal(n, 31, 3.0, 2.0));
    let dy = stored(normal(n, 32, 0.0, 1.0));
    let g = layer(
        &ctx,
        &ctx.upload_as(&x, case.shape, dtype).unwrap(),
        &ctx.upload_as(&dy, case.shape, dtype).unwrap(),
    );
    let want = reference::backward(
        &x,
        &dy,
        &case.view,
        case.rms,
        case.eps,
        case.weight,
        case.running,
    );
    // grad_input is rounded once to the storage dtype; the sums are f32.
    let tol_dx = if dtype == DType::F32 { 1e-4 } else { 8e-3 };
    let what = case.what;
    assert_close(
        &format!("{what} grad_input"),
        &ctx.download(&g.grad_input).unwrap(),
        &want.grad_input,
        tol_dx,
        tol_dx,
    );
    if let Some(w) = &g.grad_weight {
        assert_close(
            &format!("{what} grad_weight"),
            &ctx.download(w).unwrap(),
            &want.grad_weight,
            1e-3,
            1e-4,
        );
    }
    if let Some(b) = &g.grad_bias {
        assert_close(
            &format!("{what} grad_bias"),
            &ctx.download(b).unwrap(),
            &want.grad_bias,
            1e-3,
            1e-4,
        );
    }
}

/// A torch LayerNorm over the last `gamma.len()` elements with γ `gamma`,
/// after a training forward of `x`.
fn trained_layer_norm(ctx: &Context, x: &gpunorm::GpuTensor, gamma: &[f32]) -> gpunorm::LayerNorm {
    let len = gamma.len();
    let mut ln = gpunorm::LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_weight(Some(ctx.upload(gamma, &[len]).unwrap()))
        .unwrap();
    ln.forward(ctx, x, Mode::Train).unwrap();
    ln
}

/// A torch GroupNorm(2, 8) with γ `gamma` and β 0, after a forward of `x`.
fn trained_group_norm(ctx: &Context, x: &gpunorm::GpuTensor, gamma: &[f32]) -> gpunorm::GroupNorm {
    let mut gn = gpunorm::GroupNorm::new(ctx, 2, 8, gpunorm::GroupNormConfig::torch()).unwrap();
    gn.set_affine(gpunorm::Affine {
        weight: Some(ctx.upload(gamma, &[8]).unwrap()),
        bias: Some(ctx.zeros(&[8], DType::F32).unwrap()),
    })
    .unwrap();
    gn.forward(ctx, x).unwrap();
    gn
}

#[test]
fn chunked_backward_of_batch_norm_matches_f64_in_train_and_eval() {
    let gamma = normal(5, 40, 1.0, 0.5);
    for (shape, axis, what) in [
        (vec![6, 5, 11, 13], 1, "BatchNorm2d NCHW"),
        (vec![6, 11, 13, 5], 3, "BatchNorm NHWC"),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let config = BatchNormConfig {
                axis,
                ..BatchNormConfig::torch_2d()
            };
            let view = View::batch_norm(&shape, axis as usize);
            let case = BackwardCase::new(what, dtype, &shape, view, &gamma, 4096);
            chunked_backward_matches_f64(case, |ctx, x, dy| {
                let mut bn = BatchNorm::new(ctx, 5, config.clone()).unwrap();
                bn.set_weight(Some(ctx.upload(&gamma, &[5]).unwrap()))
                    .unwrap();
                bn.forward(ctx, x, Mode::Train).unwrap();
                bn.backward(ctx, dy).unwrap()
            });
        }
    }
    // Eval: running statistics as constants.
    let shape = [6, 5, 11, 13];
    let (mean, var) = (normal(5, 41, 3.0, 0.5), vec![2.5, 4.0, 1.5, 3.0, 5.0]);
    let case = BackwardCase {
        running: Some((&mean, &var)),
        ..BackwardCase::new(
            "BatchNorm2d eval",
            DType::F32,
            &shape,
            View::batch_norm(&shape, 1),
            &gamma,
            4096,
        )
    };
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        let mut bn = BatchNorm::new(ctx, 5, BatchNormConfig::torch_2d()).unwrap();
        bn.set_weight(Some(ctx.upload(&gamma, &[5]).unwrap()))
            .unwrap();
        let stats = (
            ctx.upload(&mean, &[5]).unwrap(),
            ctx.upload(&var, &[5]).unwrap(),
            Some(0),
        );
        bn.set_running_stats(ctx, Some(stats)).unwrap();
        bn.forward(ctx, x, Mode::Eval).unwrap();
        bn.backward(ctx, dy).unwrap()
    });
}

#[test]
fn chunked_backward_of_row_norms_and_groups_matches_f64() {
    // Rows of 1000 and samples of 8x9x9 fit 8 KiB: the tensors split
    // between rows (samples), and each chunk runs the unsplit kernels, its
    // affine gradients added to the chunks' before.
    row_norm_and_group_backwards_match_f64((10, 1000), [8, 8, 9, 9], 8192, true);
    // Rows of 3000 and samples of 8x20x20 do not: the tensors split within
    // rows, for the generic kernels. LayerNorm and RMSNorm take γ per
    // column (the [1, R, K, 1] reduction), channels-first GroupNorm γ per
    // channel of H·W elements ([1, R, K, D]) and InstanceNorm γ per
    // channel, from the group sums.
    row_norm_and_group_backwards_match_f64((3, 3000), [3, 8, 20, 20], 8192, false);
}

/// LayerNorm and RMSNorm (f32, f16) of `rows` rows of `len`, and
/// GroupNorm(2, 8) and InstanceNorm of `samples`, split in `binding`-byte
/// bindings between blocks (`whole_blocks`) or within them.
fn row_norm_and_group_backwards_match_f64(
    (rows, len): (usize, usize),
    samples: [usize; 4],
    binding: u64,
    whole_blocks: bool,
) {
    let split = |view: &View, dtype: DType| {
        let align = binding_limited_ctx(binding).storage_offset_alignment();
        let blocks = gpunorm::engine::Chunks::of_blocks(view, dtype, binding, align);
        assert_eq!(blocks.is_some(), whole_blocks, "{view:?} {dtype:?}");
    };
    let shape = [rows, len];
    let gamma = normal(len, 42, 1.0, 0.5);
    for (rms, what) in [(false, "LayerNorm"), (true, "RMSNorm")] {
        let config = if rms {
            RowNormConfig::torch_rms_norm()
        } else {
            RowNormConfig::torch_layer_norm()
        };
        for dtype in [DType::F32, DType::F16] {
            let view = View::layer_norm(&shape, len);
            split(&view, dtype);
            let case = BackwardCase {
                rms,
                eps: config.eps as f64,
                ..BackwardCase::new(what, dtype, &shape, view, &gamma, binding)
            };
            chunked_backward_matches_f64(case, |ctx, x, dy| {
                let weight = Some(ctx.upload(&gamma, &[len]).unwrap());
                if rms {
                    let mut l = gpunorm::RmsNorm::new(ctx, &[len], config.clone()).unwrap();
                    l.set_weight(weight).unwrap();
                    l.forward(ctx, x, Mode::Train).unwrap();
                    l.backward(ctx, dy).unwrap()
                } else {
                    let mut l = gpunorm::LayerNorm::new(ctx, &[len], config.clone()).unwrap();
                    l.set_weight(weight).unwrap();
                    l.forward(ctx, x, Mode::Train).unwrap();
                    l.backward(ctx, dy).unwrap()
                }
            });
        }
    }
    let shape = samples;
    let gamma = normal(8, 43, 1.0, 0.5);
    split(&View::group_norm(&shape, 2), DType::F32);
    split(&View::instance_norm(&shape), DType::F32);
    let case = BackwardCase::new(
        "GroupNorm(2, 8)",
        DType::F32,
        &shape,
        View::group_norm(&shape, 2),
        &gamma,
        binding,
    );
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        trained_group_norm(ctx, x, &gamma)
            .backward(ctx, dy)
            .unwrap()
    });
    let case = BackwardCase::new(
        "InstanceNorm2d",
        DType::F32,
        &shape,
        View::instance_norm(&shape),
        &gamma,
        binding,
    );
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        let config = InstanceNormConfig {
            affine: true,
            ..InstanceNormConfig::torch_2d()
        };
        let mut inorm = InstanceNorm::new(ctx, 8, config).unwrap();
        inorm
            .set_affine(gpunorm::Affine {
                weight: Some(ctx.upload(&gamma, &[8]).unwrap()),
                bias: Some(ctx.zeros(&[8], DType::F32).unwrap()),
            })
            .unwrap();
        inorm.forward(ctx, x, Mode::Train).unwrap();
        inorm.backward(ctx, dy).unwrap()
    });
}

#[test]
fn chunked_sync_batch_norm_backward_matches_a_local_batch_norm() {
    // One replica holding the whole batch: forward_synced/backward_synced
    // (grad_input from preset group sums, chunk by chunk) give what a
    // local BatchNorm gives, both split across bindings.
    let ctx = binding_limited_ctx(4096);
    let shape = [6, 5, 11, 13];
    let x = ctx.upload(&normal(4290, 33, 1.0, 2.0), &shape).unwrap();
    let dy = ctx.upload(&normal(4290, 34, 0.0, 1.0), &shape).unwrap();
    let mut local = BatchNorm::new(&ctx, 5, BatchNormConfig::torch_2d()).unwrap();
    let mut synced = BatchNorm::new(&ctx, 5, BatchNormConfig::torch_2d()).unwrap();
    local.forward(&ctx, &x, Mode::Train).unwrap();
    let want = local.backward(&ctx, &dy).unwrap();
    let stats = synced.replica_stats(&ctx, &x).unwrap();
    let global = gpunorm::ReplicaStats::merge(std::slice::from_ref(&stats)).unwrap();
    synced
        .forward_synced(&ctx, &x, &stats, &global, Mode::Train)
        .unwrap();
    let sums = synced.replica_grad_sums(&ctx, &dy).unwrap();
    let got = synced.backward_synced(&ctx, &dy, &sums, &sums).unwrap();
    let close = |a: &gpunorm::GpuTensor, b: &gpunorm::GpuTensor, what: &str| {
        let want: Vec<f64> = ctx.download(b).unwrap().iter().map(|&v| v as f64).collect();
        assert_close(what, &ctx.download(a).unwrap(), &want, 1e-5, 1e-4);
    };
    close(&got.grad_input, &want.grad_input, "grad_input");
    close(
        got.grad_weight.as_ref().unwrap(),
        want.grad_weight.as_ref().unwrap(),
        "grad_weight",
    );
}

#[test]
fn many_small_groups_of_a_split_tensor_fit_their_scratch_forward_and_backward() {
    // One sample of InstanceNorm1d over 60 channels of 70, in 1024-element
    // chunks: most channels straddle two chunks, the last ones sit in the
    // last chunk. With a partial per group and chunk the scratch (60 × 6
    // vec4, 5760 bytes) outgrew the 4 KiB binding and was refused; each
    // group keeps two chunks' now. (With more samples that fit a binding
    // the tensor splits between samples instead.)
    let ctx = binding_limited_ctx(4096);
    let (channels, len) = (60, 70);
    let shape = [1, channels, len];
    let x = normal(channels * len, 24, -3.0, 2.0);
    let gamma = normal(channels, 44, 1.0, 0.5);
    let instance_norm = |ctx: &Context| {
        let config = InstanceNormConfig {
            affine: true,
            ..InstanceNormConfig::torch_1d()
        };
        let mut inorm = InstanceNorm::new(ctx, channels, config).unwrap();
        inorm
            .set_affine(gpunorm::Affine {
                weight: Some(ctx.upload(&gamma, &[channels]).unwrap()),
                bias: Some(ctx.zeros(&[channels], DType::F32).unwrap()),
            })
            .unwrap();
        inorm
    };
    // The layer's scratch first holds another forward's statistics and
    // partials, reused as large enough, so a slot this one failed to
    // write would show.
    let mut inorm = instance_norm(&ctx);
    let other = ctx
        .upload(&normal(channels * 91, 25, 5.0, 1.0), &[1, channels, 91])
        .unwrap();
    inorm.forward(&ctx, &other, Mode::Train).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let yt = ctx.zeros(&shape, DType::F32).unwrap();
    let plan = recorded_plan(&ctx, |e| {
        inorm.record(&ctx, e, &xt, &yt, Mode::Train).unwrap()
    });
    assert!(
        plan.iter()
            .any(|&(kernel, chunk)| kernel == gpunorm::kernels::Kernel::Shifts && chunk > 0),
        "split within groups: {plan:?}"
    );
    let view = View::instance_norm(&shape);
    let want = reference::forward(&x, &view, false, 1e-5, Some(&gamma), None);
    assert_close(
        "chunked small groups",
        &ctx.download(&yt).unwrap(),
        &want,
        1e-4,
        1e-5,
    );
    let case = BackwardCase::new(
        "InstanceNorm1d of 60 channels of 70",
        DType::F32,
        &shape,
        view,
        &gamma,
        4096,
    );
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        let mut inorm = instance_norm(ctx);
        inorm.forward(ctx, x, Mode::Train).unwrap();
        // Twice: the second finds the first's partials in the context's
        // shared scratch, where a slot left unwritten would show.
        inorm.backward(ctx, dy).unwrap();
        inorm.backward(ctx, dy).unwrap()
    });
}

#[test]
fn a_split_backward_whose_scratch_outgrows_a_buffer_is_a_typed_error() {
    // LayerNorm's dγ over a tensor split within rows (rows longer than a
    // binding) keeps a partial per column and chunk it reaches: 3 rows of
    // 3000 in 2048-element chunks, four slots for each of 3000 columns
    // (192 KB), more than the 64 KiB this context's buffers hold. The
    // backward says so before recording anything. (Shorter rows split
    // between rows, and each chunk needs only its own column sums.)
    let ctx = Context::with_options(ContextOptions {
        max_storage_binding: Some(8192),
        max_buffer_size: Some(65536),
        ..Default::default()
    })
    .unwrap();
    let (rows, len) = (3, 3000);
    let mut ln = gpunorm::LayerNorm::new(&ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
    let x = ctx
        .upload(&normal(rows * len, 26, 0.0, 1.0), &[rows, len])
        .unwrap();
    ln.forward(&ctx, &x, Mode::Train).unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    match ln.record_backward(&ctx, &mut encoder, &x) {
        Err(Error::TooLarge { what, .. }) => assert_eq!(what, "the backward scratch"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    ctx.submit_and_wait(encoder).unwrap();
}

#[test]
fn a_split_backward_of_one_long_row_or_one_sample_keeps_each_reductions_slots() {
    // A single row (LayerNorm) or sample (channels-first GroupNorm): the
    // dγ reduction's view has one row, so each chunk's dispatch skips the
    // columns without elements in it; their slots must not hold the group
    // sums' partials (a reviewer's repro: errors of 1e4x the tolerance).
    let shape = [1, 3000];
    let gamma = normal(3000, 45, 1.0, 0.5);
    let view = View::layer_norm(&shape, 3000);
    let case = BackwardCase::new(
        "LayerNorm of one row",
        DType::F32,
        &shape,
        view,
        &gamma,
        4096,
    );
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        trained_layer_norm(ctx, x, &gamma)
            .backward(ctx, dy)
            .unwrap()
    });
    let shape = [1, 8, 24, 24];
    let gamma = normal(8, 46, 1.0, 0.5);
    let view = View::group_norm(&shape, 2);
    let case = BackwardCase::new(
        "GroupNorm(2, 8) of one sample",
        DType::F32,
        &shape,
        view,
        &gamma,
        4096,
    );
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        trained_group_norm(ctx, x, &gamma)
            .backward(ctx, dy)
            .unwrap()
    });
}

/// Records `forward` into a fresh encoder, submits it, and returns the
/// dispatches' kernels and chunks.
fn recorded_plan(
    ctx: &Context,
    forward: impl FnOnce(&mut gpunorm::wgpu::CommandEncoder) -> Vec<gpunorm::engine::Dispatch>,
) -> Vec<(gpunorm::kernels::Kernel, u32)> {
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let plan = forward(&mut encoder);
    ctx.submit_and_wait(encoder).unwrap();
    plan.iter().map(|d| (d.kernel, d.chunk)).collect()
}

/// Asserts that `plan` runs one row kernel once per chunk, in order.
fn assert_row_kernel_per_chunk(what: &str, plan: &[(gpunorm::kernels::Kernel, u32)], chunks: u32) {
    use gpunorm::kernels::Kernel;
    let kernel = plan[0].0;
    assert!(
        matches!(
            kernel,
            Kernel::RowsHeld | Kernel::RowsSubgroup | Kernel::RowsWorkgroupHeld | Kernel::Rows
        ),
        "{what}: {plan:?}"
    );
    let want: Vec<_> = (0..chunks).map(|c| (kernel, c)).collect();
    assert_eq!(plan, want, "{what}");
}

/// A weight and a bias of `n` random values.
fn affine_of(ctx: &Context, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, gpunorm::Affine) {
    let w = normal(n, seed, 1.0, 0.5);
    let b = normal(n, seed + 1, 0.0, 0.5);
    let affine = gpunorm::Affine {
        weight: Some(ctx.upload(&w, &[n]).unwrap()),
        bias: Some(ctx.upload(&b, &[n]).unwrap()),
    };
    (w, b, affine)
}

#[test]
fn a_split_row_norm_runs_the_row_kernels_on_chunks_of_whole_rows() {
    // 37 rows of 1000 f32 (4000 bytes) in 16 KiB bindings: chunks of 4 rows
    // (whole rows whose starts, and whose statistics' starts, are aligned),
    // the last one a single row.
    let ctx = binding_limited_ctx(16384);
    let (rows, len) = (37, 1000);
    let x = normal(rows * len, 60, 40.0, 3.0);
    let (w, b, affine) = affine_of(&ctx, len, 61);
    let mut ln = gpunorm::LayerNorm::new(&ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_weight(affine.weight).unwrap();
    ln.set_bias(affine.bias).unwrap();
    let xt = ctx.upload(&x, &[rows, len]).unwrap();
    let yt = ctx.zeros(&[rows, len], DType::F32).unwrap();
    let plan = recorded_plan(&ctx, |e| ln.record(&ctx, e, &xt, &yt).unwrap());
    let chunks = gpunorm::engine::Chunks::of_blocks(
        &View::layer_norm(&[rows, len], len),
        DType::F32,
        16384,
        ctx.storage_offset_alignment(),
    )
    .unwrap();
    assert!(chunks.whole_blocks && chunks.count >= 10, "{chunks:?}");
    assert_row_kernel_per_chunk("LayerNorm", &plan, chunks.count as u32);
    let want = reference::forward(
        &x,
        &View::layer_norm(&[rows, len], len),
        false,
        1e-5,
        Some(&w),
        Some(&b),
    );
    assert_close(
        "split LayerNorm",
        &ctx.download(&yt).unwrap(),
        &want,
        1e-4,
        1e-5,
    );

    // RMSNorm of rows of 70 halves (140 bytes: not whole vectors, so the
    // workgroup row kernel), and bf16 LayerNorm of rows of 256, in 4 KiB.
    let ctx = binding_limited_ctx(4096);
    for (dtype, rms, rows, len) in [(DType::F16, true, 61, 70), (DType::BF16, false, 50, 256)] {
        let round = |v: f32| match dtype {
            DType::F16 => half::f16::from_f32(v).to_f32(),
            _ => half::bf16::from_f32(v).to_f32(),
        };
        let x: Vec<f32> = normal(rows * len, 62, 2.0, 1.5)
            .into_iter()
            .map(round)
            .collect();
        let w: Vec<f32> = normal(len, 63, 1.0, 0.5).into_iter().map(round).collect();
        let config = if rms {
            RowNormConfig::torch_rms_norm()
        } else {
            RowNormConfig::torch_layer_norm()
        };
        let xt = ctx.upload_as(&x, &[rows, len], dtype).unwrap();
        let yt = ctx.zeros(&[rows, len], dtype).unwrap();
        let weight = Some(ctx.upload_as(&w, &[len], dtype).unwrap());
        let plan = if rms {
            let mut norm = gpunorm::RmsNorm::new(&ctx, &[len], config).unwrap();
            norm.set_weight(weight).unwrap();
            recorded_plan(&ctx, |e| norm.record(&ctx, e, &xt, &yt).unwrap())
        } else {
            let mut norm = gpunorm::LayerNorm::new(&ctx, &[len], config).unwrap();
            norm.set_weight(weight).unwrap();
            norm.set_bias(None).unwrap();
            recorded_plan(&ctx, |e| norm.record(&ctx, e, &xt, &yt).unwrap())
        };
        let view = View::layer_norm(&[rows, len], len);
        let chunks =
            gpunorm::engine::Chunks::of_blocks(&view, dtype, 4096, ctx.storage_offset_alignment())
                .unwrap();
        assert!(chunks.count > 2, "{dtype:?}: {chunks:?}");
        assert_row_kernel_per_chunk(&format!("{dtype:?}"), &plan, chunks.count as u32);
        let eps = if rms { f32::EPSILON as f64 } else { 1e-5 };
        let want = reference::forward(&x, &view, rms, eps, Some(&w), None);
        // 2 ulp of f16 (bf16) at |y| < 8 is at most 2^-7 (2^-4).
        let atol = if dtype == DType::F16 { 8e-3 } else { 6.3e-2 };
        assert_close(
            &format!("split {dtype:?}"),
            &ctx.download(&yt).unwrap(),
            &want,
            atol,
            0.0,
        );
    }
}

#[test]
fn split_group_and_instance_norms_run_the_row_kernels_on_chunks_of_whole_samples() {
    // Samples of GroupNorm(3, 6) over 5x7 (840 bytes) and of InstanceNorm
    // over 64 (1280 bytes) in 4 KiB: each chunk starts at a sample, so a
    // group's index within its chunk still names its channels' γ and β.
    let ctx = binding_limited_ctx(4096);
    let shape = [9, 6, 5, 7];
    let x = normal(9 * 6 * 35, 64, -7.0, 2.0);
    let (w, b, affine) = affine_of(&ctx, 6, 65);
    let mut gn = gpunorm::GroupNorm::new(&ctx, 3, 6, gpunorm::GroupNormConfig::torch()).unwrap();
    gn.set_affine(affine).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let yt = ctx.zeros(&shape, DType::F32).unwrap();
    let plan = recorded_plan(&ctx, |e| gn.record(&ctx, e, &xt, &yt).unwrap());
    let view = View::group_norm(&shape, 3);
    let chunks =
        gpunorm::engine::Chunks::of_blocks(&view, DType::F32, 4096, ctx.storage_offset_alignment())
            .unwrap();
    assert!(chunks.count >= 3, "{chunks:?}");
    assert_row_kernel_per_chunk("GroupNorm", &plan, chunks.count as u32);
    let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
    assert_close(
        "split GroupNorm",
        &ctx.download(&yt).unwrap(),
        &want,
        1e-4,
        1e-5,
    );

    let shape = [7, 5, 64];
    let x = normal(7 * 5 * 64, 66, 3.0, 0.5);
    let (w, b, affine) = affine_of(&ctx, 5, 67);
    let mut cfg = InstanceNormConfig::torch();
    cfg.affine = true;
    let mut inorm = InstanceNorm::new(&ctx, 5, cfg).unwrap();
    inorm.set_affine(affine).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let yt = ctx.zeros(&shape, DType::F32).unwrap();
    let plan = recorded_plan(&ctx, |e| {
        inorm.record(&ctx, e, &xt, &yt, Mode::Train).unwrap()
    });
    let view = View::instance_norm(&shape);
    let chunks =
        gpunorm::engine::Chunks::of_blocks(&view, DType::F32, 4096, ctx.storage_offset_alignment())
            .unwrap();
    assert!(chunks.count >= 3, "{chunks:?}");
    assert_row_kernel_per_chunk("InstanceNorm", &plan, chunks.count as u32);
    let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
    assert_close(
        "split InstanceNorm",
        &ctx.download(&yt).unwrap(),
        &want,
        1e-4,
        1e-5,
    );
}

#[test]
fn a_backward_split_within_rows_reads_zero_where_a_chunk_leaves_a_slot_unwritten() {
    // Rows of 3000 in 2048-element chunks: each row keeps partials for the
    // three chunks from its first, and row 0 reaches only two, so its third
    // slot must read zero (cleared before the pass). A backward of other
    // rows first leaves its partials in the context's shared scratch, where
    // an uncleared slot would add them in.
    let ctx = binding_limited_ctx(8192);
    let backward_of = |rows: usize, len: usize, seed: u64| {
        let gamma = normal(len, seed, 1.0, 0.5);
        let x = normal(rows * len, seed + 1, 2.0, 3.0);
        let dy = normal(rows * len, seed + 2, 0.5, 1.0);
        let mut ln =
            gpunorm::LayerNorm::new(&ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
        ln.set_weight(Some(ctx.upload(&gamma, &[len]).unwrap()))
            .unwrap();
        ln.forward(&ctx, &ctx.upload(&x, &[rows, len]).unwrap(), Mode::Train)
            .unwrap();
        let g = ln
            .backward(&ctx, &ctx.upload(&dy, &[rows, len]).unwrap())
            .unwrap();
        let view = View::layer_norm(&[rows, len], len);
        let want = reference::backward(&x, &dy, &view, false, 1e-5, Some(&gamma), None);
        let what = format!("{rows} rows of {len}");
        assert_close(
            &format!("{what}: grad_input"),
            &ctx.download(&g.grad_input).unwrap(),
            &want.grad_input,
            1e-4,
            1e-4,
        );
        for (got, want, name) in [
            (&g.grad_weight, &want.grad_weight, "grad_weight"),
            (&g.grad_bias, &want.grad_bias, "grad_bias"),
        ] {
            let got = ctx.download(got.as_ref().unwrap()).unwrap();
            assert_close(&format!("{what}: {name}"), &got, want, 1e-3, 1e-4);
        }
    };
    backward_of(7, 2500, 70);
    backward_of(3, 3000, 80);
}

#[test]
fn a_split_channels_last_group_norm_runs_each_chunk_of_samples_as_a_tensor_of_its_own() {
    // Keras GroupNormalization(3) on [N, 5, 7, 6]: a sample is 840 bytes,
    // its groups strided across it (A = 35), so not the row kernels; in
    // 4 KiB bindings each chunk of four samples runs the plan of a tensor
    // in one binding, forward and backward.
    let ctx = binding_limited_ctx(4096);
    let shape = [12, 5, 7, 6];
    let view = View::group_norm_channels_last(&shape, 3);
    let x = normal(12 * 5 * 7 * 6, 68, 4.0, 2.0);
    let (w, b, affine) = affine_of(&ctx, 6, 69);
    let mut gn = gpunorm::GroupNorm::new(&ctx, 3, 6, gpunorm::GroupNormConfig::keras()).unwrap();
    gn.set_affine(affine).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let yt = ctx.zeros(&shape, DType::F32).unwrap();
    let plan = recorded_plan(&ctx, |e| gn.record(&ctx, e, &xt, &yt).unwrap());
    let chunks =
        gpunorm::engine::Chunks::of_blocks(&view, DType::F32, 4096, ctx.storage_offset_alignment())
            .unwrap();
    assert_eq!(chunks.count, 3);
    let chunk_of_each: Vec<u32> = plan.iter().map(|&(_, chunk)| chunk).collect();
    assert!(chunk_of_each.windows(2).all(|w| w[0] <= w[1]), "{plan:?}");
    assert_eq!(chunk_of_each.last(), Some(&2), "{plan:?}");
    assert!(
        plan.iter()
            .all(|&(kernel, _)| kernel != gpunorm::kernels::Kernel::Shifts),
        "not split within groups: {plan:?}"
    );
    let want = reference::forward(&x, &view, false, 1e-3, Some(&w), Some(&b));
    assert_close(
        "split Keras GroupNorm",
        &ctx.download(&yt).unwrap(),
        &want,
        1e-4,
        1e-5,
    );
    let gamma = normal(6, 70, 1.0, 0.5);
    let case = BackwardCase {
        eps: 1e-3,
        ..BackwardCase::new("Keras GroupNorm(3)", DType::F32, &shape, view, &gamma, 4096)
    };
    chunked_backward_matches_f64(case, |ctx, x, dy| {
        let mut gn = gpunorm::GroupNorm::new(ctx, 3, 6, gpunorm::GroupNormConfig::keras()).unwrap();
        gn.set_affine(gpunorm::Affine {
            weight: Some(ctx.upload(&gamma, &[6]).unwrap()),
            bias: Some(ctx.zeros(&[6], DType::F32).unwrap()),
        })
        .unwrap();
        gn.forward(ctx, x).unwrap();
        gn.backward(ctx, dy).unwrap()
    });
}
