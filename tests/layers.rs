//! Layer behaviour: running statistics, recording into the caller's
//! encoder, and the guarantee that a failing call changes nothing.

mod common;
use common::{assert_close, ctx, gpu_sized, normal};
use gpunorm::kernels::Kernel;
use gpunorm::{
    reference, BatchNorm, BatchNormConfig, DType, Error, GpuTensor, InstanceNorm,
    InstanceNormConfig, LayerNorm, Mode, RowNormConfig, View,
};

fn running(bn: &BatchNorm) -> (Vec<f32>, Vec<f32>, Option<i64>) {
    let ctx = ctx();
    let r = bn.running_stats().unwrap();
    (
        ctx.download(&r.mean).unwrap(),
        ctx.download(&r.var).unwrap(),
        r.num_batches_tracked(ctx).unwrap(),
    )
}

/// Per-channel (mean, biased var) of an NCHW tensor in f64.
fn channel_stats(x: &[f32], shape: &[usize]) -> Vec<(f64, f64)> {
    reference::group_stats(x, &View::batch_norm(shape, 1), false)
}

#[test]
fn batch_norm_train_updates_running_var_with_unbiased_variance() {
    let ctx = ctx();
    let shape = [4, 3, 5, 5];
    let x = normal(300, 1, 2.0, 3.0);
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
    bn.forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
        .unwrap();
    let (mean, var, count) = running(&bn);
    let n = 100.0;
    let expected_mean: Vec<f64> = channel_stats(&x, &shape)
        .iter()
        .map(|s| 0.1 * s.0)
        .collect();
    let expected_var: Vec<f64> = channel_stats(&x, &shape)
        .iter()
        .map(|s| 0.9 + 0.1 * s.1 * n / (n - 1.0))
        .collect();
    assert_close("running_mean", &mean, &expected_mean, 1e-6, 1e-5);
    assert_close("running_var", &var, &expected_var, 1e-6, 1e-5);
    assert_eq!(count, Some(1));
}

#[test]
fn batch_norm_momentum_none_is_a_cumulative_average() {
    let ctx = ctx();
    let shape = [8, 2, 4];
    let mut cfg = BatchNormConfig::torch_1d();
    cfg.momentum = None;
    let mut bn = BatchNorm::new(ctx, 2, cfg).unwrap();
    let a = normal(64, 2, 1.0, 1.0);
    let b = normal(64, 3, -1.0, 2.0);
    bn.forward(ctx, &ctx.upload(&a, &shape).unwrap(), Mode::Train)
        .unwrap();
    bn.forward(ctx, &ctx.upload(&b, &shape).unwrap(), Mode::Train)
        .unwrap();
    let (mean, _, count) = running(&bn);
    let (sa, sb) = (channel_stats(&a, &shape), channel_stats(&b, &shape));
    let expected: Vec<f64> = (0..2).map(|c| (sa[c].0 + sb[c].0) / 2.0).collect();
    assert_close("cumulative running_mean", &mean, &expected, 1e-6, 1e-5);
    assert_eq!(count, Some(2));
}

#[test]
fn batch_norm_eval_uses_running_stats_and_changes_nothing() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    let rm = [0.5f32, -1.0];
    let rv = [2.0f32, 0.25];
    bn.set_running_stats(
        ctx,
        Some((
            ctx.upload(&rm, &[2]).unwrap(),
            ctx.upload(&rv, &[2]).unwrap(),
            Some(7),
        )),
    )
    .unwrap();
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let y = ctx
        .download(
            &bn.forward(ctx, &ctx.upload(&x, &[2, 2]).unwrap(), Mode::Eval)
                .unwrap(),
        )
        .unwrap();
    let expected: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as f64 - rm[i % 2] as f64) / (rv[i % 2] as f64 + 1e-5).sqrt())
        .collect();
    assert_close("eval output", &y, &expected, 1e-6, 1e-6);
    assert_eq!(running(&bn), (rm.to_vec(), rv.to_vec(), Some(7)));
}

#[test]
fn train_forward_recorded_into_the_callers_encoder_updates_running_stats_without_readback() {
    let ctx = ctx();
    let shape = [4, 2, 3];
    let x = normal(24, 9, 5.0, 2.0);
    let xt = ctx.upload(&x, &shape).unwrap();
    let y = ctx.zeros(&shape, gpunorm::DType::F32).unwrap();
    let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let dispatches = bn.record(ctx, &mut encoder, &xt, &y, Mode::Train).unwrap();
    assert!(
        dispatches.len() <= 3,
        "BatchNorm train records at most three dispatches"
    );
    // Nothing ran yet: the caller owns submission.
    assert_eq!(running(&bn).2, Some(0));
    ctx.queue().submit([encoder.finish()]);
    let stats = channel_stats(&x, &shape);
    let expected: Vec<f64> = stats.iter().map(|s| 0.1 * s.0).collect();
    assert_close("running_mean", &running(&bn).0, &expected, 1e-6, 1e-5);
    assert_eq!(running(&bn).2, Some(1));
    let want = reference::forward(&x, &View::batch_norm(&shape, 1), false, 1e-5, None, None);
    assert_close("output", &ctx.download(&y).unwrap(), &want, 1e-5, 1e-5);
}

/// Runs a failing forward and checks the running statistics are untouched.
fn fails_and_changes_nothing(bn: &mut BatchNorm, x: &GpuTensor, mode: Mode) -> Error {
    let before = running(bn);
    let err = bn.forward(ctx(), x, mode).unwrap_err();
    assert_eq!(
        running(bn),
        before,
        "running stats changed after error {err}"
    );
    err
}

#[test]
fn batch_norm_errors_leave_running_stats_unchanged() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 4, BatchNormConfig::torch_1d()).unwrap();
    bn.forward(
        ctx,
        &ctx.upload(&normal(16, 4, 0.0, 1.0), &[4, 4]).unwrap(),
        Mode::Train,
    )
    .unwrap();
    let one_per_channel = ctx.upload(&[1.0; 4], &[1, 4]).unwrap();
    let e = fails_and_changes_nothing(&mut bn, &one_per_channel, Mode::Train);
    assert_eq!(
        e.to_string(),
        "Expected more than 1 value per channel when training, got input size [1, 4]"
    );
    // Eval with running stats is fine with one value per channel.
    bn.forward(ctx, &one_per_channel, Mode::Eval).unwrap();
    let wrong_channels = ctx.upload(&[1.0; 6], &[2, 3]).unwrap();
    assert!(matches!(
        fails_and_changes_nothing(&mut bn, &wrong_channels, Mode::Train),
        Error::Shape(_)
    ));
    let wrong_rank = ctx.upload(&[1.0; 64], &[2, 4, 2, 2, 2]).unwrap();
    assert!(matches!(
        fails_and_changes_nothing(&mut bn, &wrong_rank, Mode::Train),
        Error::Shape(_)
    ));
    // A half-precision weight is taken, but an f32 input refuses it:
    // parameters are f32 or the input's dtype (SPEC.md §5).
    let half_weight = ctx.upload_as(&[1.0; 4], &[4], gpunorm::DType::F16).unwrap();
    bn.set_weight(Some(half_weight)).unwrap();
    let x = ctx.upload(&normal(16, 4, 0.0, 1.0), &[4, 4]).unwrap();
    assert!(matches!(
        fails_and_changes_nothing(&mut bn, &x, Mode::Train),
        Error::Dtype(_)
    ));
}

#[test]
fn output_aliasing_the_input_is_refused_before_recording() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    let x = ctx.upload(&normal(8, 5, 0.0, 1.0), &[4, 2]).unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let before = running(&bn);
    assert!(matches!(
        bn.record(ctx, &mut encoder, &x, &x, Mode::Train),
        Err(Error::InvalidArgument(_))
    ));
    ctx.queue().submit([encoder.finish()]);
    assert_eq!(running(&bn), before);
}

#[test]
fn invalid_hyper_parameters_are_typed_errors() {
    let ctx = ctx();
    let mut cfg = BatchNormConfig::torch();
    cfg.eps = -1.0;
    assert!(matches!(
        BatchNorm::new(ctx, 2, cfg),
        Err(Error::InvalidArgument(_))
    ));
    let mut cfg = BatchNormConfig::torch();
    cfg.momentum = Some(2.0);
    assert!(matches!(
        BatchNorm::new(ctx, 2, cfg),
        Err(Error::InvalidArgument(_))
    ));
    let mut cfg = RowNormConfig::torch_layer_norm();
    cfg.eps = f32::NAN;
    assert!(matches!(
        LayerNorm::new(ctx, &[4], cfg),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn boundary_hyper_parameters_are_accepted_and_mean_what_they_say() {
    // SPEC §5: momentum in [0, 1] and eps = 0 are valid. momentum 1 takes
    // the batch's statistics, 0 keeps the running ones; eps = 0 on a
    // constant channel gives NaN, as torch does where it allows eps = 0.
    let ctx = ctx();
    let x = [1.0f32, 5.0, 2.0, 5.0, 3.0, 5.0, 6.0, 5.0];
    for (momentum, mean, var) in [(1.0f32, 3.0f32, 14.0 / 3.0), (0.0, 0.0, 1.0)] {
        let config = BatchNormConfig {
            momentum: Some(momentum),
            eps: 0.0,
            ..BatchNormConfig::torch_1d()
        };
        let mut bn = BatchNorm::new(ctx, 2, config).unwrap();
        let y = bn
            .forward(ctx, &ctx.upload(&x, &[4, 2]).unwrap(), Mode::Train)
            .unwrap();
        let y = ctx.download(&y).unwrap();
        assert!(y.iter().step_by(2).all(|v| v.is_finite()), "{y:?}");
        assert!(y.iter().skip(1).step_by(2).all(|v| v.is_nan()), "{y:?}");
        let (m, v, n) = running(&bn);
        assert_eq!(n, Some(1));
        assert!(
            (m[0] - mean).abs() < 1e-6 && (v[0] - var).abs() < 1e-5,
            "{m:?} {v:?}"
        );
    }
}

#[test]
fn empty_batch_returns_empty_output_and_still_counts_the_batch() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 4, BatchNormConfig::torch_2d()).unwrap();
    let x = ctx.upload(&[], &[0, 4, 3, 3]).unwrap();
    let y = bn.forward(ctx, &x, Mode::Train).unwrap();
    assert_eq!(y.shape(), &[0, 4, 3, 3]);
    assert_eq!(running(&bn), (vec![0.0; 4], vec![1.0; 4], Some(1)));
}

#[test]
fn training_on_an_empty_batch_makes_keras_and_tracked_instance_norm_statistics_nan() {
    // Keras BatchNormalization moves its moving statistics toward the
    // moments of no values, and torch's tracked InstanceNorm averages its
    // update over no instances: NaN, written on the device in the caller's
    // encoder. The running buffers are the caller's, with only the usages
    // GpuTensor::from_buffer asks for (STORAGE, COPY_SRC): no copy into them.
    let ctx = ctx();
    let storage_only = |values: &[f32]| {
        let buffer = ctx
            .device()
            .create_buffer(&gpunorm::wgpu::BufferDescriptor {
                label: Some("running"),
                size: 4 * values.len() as u64,
                usage: gpunorm::wgpu::BufferUsages::STORAGE | gpunorm::wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            });
        buffer
            .slice(..)
            .get_mapped_range_mut()
            .unwrap()
            .copy_from_slice(bytemuck::cast_slice(values));
        buffer.unmap();
        let shape = [values.len()];
        GpuTensor::from_buffer(std::sync::Arc::new(buffer), 0, &shape, DType::F32).unwrap()
    };
    let stats = || (storage_only(&[0.5; 4]), storage_only(&[2.0; 4]));
    let record = |f: &mut dyn FnMut(&mut gpunorm::wgpu::CommandEncoder)| {
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        f(&mut encoder);
        ctx.submit_and_wait(encoder).unwrap();
    };
    let nan = |t: &GpuTensor| ctx.download(t).unwrap().iter().all(|v| v.is_nan());

    let mut kbn = BatchNorm::new(ctx, 4, BatchNormConfig::keras()).unwrap();
    let (mm, mv) = stats();
    kbn.set_running_stats(ctx, Some((mm, mv, None))).unwrap();
    let x = ctx.upload(&[], &[0, 4]).unwrap();
    let y = ctx.zeros(&[0, 4], DType::F32).unwrap();
    record(&mut |e| {
        let plan = kbn.record(ctx, e, &x, &y, Mode::Train).unwrap();
        assert_eq!(
            plan.iter().map(|d| d.kernel).collect::<Vec<_>>(),
            [Kernel::RunningNan]
        );
    });
    let r = kbn.running_stats().unwrap();
    assert!(nan(&r.mean) && nan(&r.var), "keras batch norm");

    let config = InstanceNormConfig {
        track_running_stats: true,
        momentum: None,
        ..InstanceNormConfig::torch_2d()
    };
    let mut inorm = InstanceNorm::new(ctx, 4, config).unwrap();
    let (rm, rv) = stats();
    inorm
        .set_running_stats(ctx, Some((rm, rv, Some(3))))
        .unwrap();
    let x = ctx.upload(&[], &[0, 4, 3, 3]).unwrap();
    let y = ctx.zeros(&[0, 4, 3, 3], DType::F32).unwrap();
    // Eval, and a batch of empty instances, leave them alone.
    for (x, y, mode) in [
        (&x, &y, Mode::Eval),
        (
            &ctx.upload(&[], &[2, 4, 0]).unwrap(),
            &ctx.zeros(&[2, 4, 0], DType::F32).unwrap(),
            Mode::Train,
        ),
    ] {
        let mut untouched = InstanceNorm::new(ctx, 4, InstanceNormConfig::torch()).unwrap();
        let (rm, rv) = stats();
        untouched
            .set_running_stats(ctx, Some((rm, rv, Some(3))))
            .unwrap();
        record(&mut |e| {
            untouched.record(ctx, e, x, y, mode).unwrap();
        });
        let r = untouched.running_stats().unwrap();
        assert_eq!(
            ctx.download(&r.mean).unwrap(),
            [0.5; 4],
            "{mode:?} {:?}",
            x.shape()
        );
    }
    record(&mut |e| {
        inorm.record(ctx, e, &x, &y, Mode::Train).unwrap();
    });
    let r = inorm.running_stats().unwrap();
    assert!(nan(&r.mean) && nan(&r.var), "instance norm");
    assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(3));
}

/// torch's tracked InstanceNorm after one training step from running stats
/// (0, 1), momentum 0.1: per channel, 0.1·the mean over the samples of each
/// instance's mean, and 0.9 + 0.1·that of its unbiased variance.
fn instance_norm_first_update(x: &[f32], shape: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let view = View::instance_norm(shape);
    let stats = reference::group_stats(x, &view, false);
    let (samples, channels) = (shape[0], shape[1]);
    let n = view.b as f64;
    let average = |f: &dyn Fn(&(f64, f64)) -> f64| -> Vec<f64> {
        (0..channels)
            .map(|c| {
                (0..samples)
                    .map(|p| f(&stats[p * channels + c]))
                    .sum::<f64>()
                    / samples as f64
            })
            .collect()
    };
    (
        average(&|s| 0.1 * s.0),
        average(&|s| 0.9 + 0.1 * s.1 * n / (n - 1.0)),
    )
}

/// Asserts that `inorm`'s running statistics are the first update from
/// `x` ([`instance_norm_first_update`]).
fn assert_first_update(
    what: &str,
    inorm: &InstanceNorm,
    x: &[f32],
    shape: &[usize],
    atol: f64,
    rtol: f64,
) {
    let ctx = ctx();
    let (mean, var) = instance_norm_first_update(x, shape);
    let r = inorm.running_stats().unwrap();
    let got = |t: &GpuTensor| ctx.download(t).unwrap();
    assert_close(
        &format!("{what} running_mean"),
        &got(&r.mean),
        &mean,
        atol,
        rtol,
    );
    assert_close(
        &format!("{what} running_var"),
        &got(&r.var),
        &var,
        atol,
        rtol,
    );
}

#[test]
fn tracked_instance_norm_averages_instances_and_leaves_the_counter() {
    let ctx = ctx();
    let shape = [3, 2, 10];
    let x = normal(60, 11, 1.0, 2.0);
    let mut cfg = InstanceNormConfig::torch();
    cfg.track_running_stats = true;
    let mut inorm = InstanceNorm::new(ctx, 2, cfg).unwrap();
    inorm
        .forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
        .unwrap();
    let (_, expected) = instance_norm_first_update(&x, &shape);
    let r = inorm.running_stats().unwrap();
    assert_close(
        "running_var",
        &ctx.download(&r.var).unwrap(),
        &expected,
        1e-6,
        1e-5,
    );
    assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(0));
}

#[test]
fn instance_norm_2d_takes_an_unbatched_input_as_a_batch_of_one_and_refuses_other_ranks() {
    // torch InstanceNorm2d: [C, H, W] is normalized as [1, C, H, W], with
    // the running update of a batch of one; [H, W] and [N, C, D, H, W] are
    // errors that change nothing.
    let ctx = ctx();
    let x = normal(3 * 5 * 4, 17, 2.0, 3.0);
    let view = View::instance_norm(&[1, 3, 5, 4]);
    let want = reference::forward(&x, &view, false, 1e-5, None, None);
    let (want_rm, _) = instance_norm_first_update(&x, &[1, 3, 5, 4]);
    let config = InstanceNormConfig {
        track_running_stats: true,
        ..InstanceNormConfig::torch_2d()
    };
    let mut inorm = InstanceNorm::new(ctx, 3, config).unwrap();
    let y = inorm
        .forward(ctx, &ctx.upload(&x, &[3, 5, 4]).unwrap(), Mode::Train)
        .unwrap();
    assert_eq!(y.shape(), &[3, 5, 4]);
    assert_close("unbatched", &ctx.download(&y).unwrap(), &want, 1e-5, 1e-5);
    let dy = normal(60, 18, 0.0, 1.0);
    let grads = inorm
        .backward(ctx, &ctx.upload(&dy, &[3, 5, 4]).unwrap())
        .unwrap();
    assert_eq!(grads.grad_input.shape(), &[3, 5, 4]);
    let want_dx = reference::backward(&x, &dy, &view, false, 1e-5, None, None).grad_input;
    let dx = ctx.download(&grads.grad_input).unwrap();
    assert_close("unbatched grad_input", &dx, &want_dx, 1e-4, 1e-4);
    let running_mean = |l: &InstanceNorm| ctx.download(&l.running_stats().unwrap().mean).unwrap();
    let rm = running_mean(&inorm);
    assert_close("running_mean", &rm, &want_rm, 1e-6, 1e-5);
    for shape in [&[5usize, 4][..], &[1, 3, 2, 5, 2]] {
        let n: usize = shape.iter().product();
        let bad = ctx.upload(&x[..n], shape).unwrap();
        let err = inorm.forward(ctx, &bad, Mode::Train).unwrap_err();
        assert!(
            err.to_string().starts_with("expected 3D or 4D input"),
            "{shape:?}: {err}"
        );
        assert_eq!(running_mean(&inorm), rm, "{shape:?}");
    }
    // The generic config takes any batched rank of at least 3 only.
    let mut any = InstanceNorm::new(ctx, 3, InstanceNormConfig::torch()).unwrap();
    let two_d = ctx.upload(&x[..15], &[3, 5]).unwrap();
    assert!(matches!(
        any.forward(ctx, &two_d, Mode::Train),
        Err(Error::Shape(_))
    ));
}

#[test]
fn keras_batch_norm_that_is_not_trainable_normalizes_with_its_moving_statistics_in_training() {
    // Keras `trainable=False` (fine-tuning with frozen BatchNormalization):
    // training=True runs in inference mode and moves nothing. Checked
    // against Keras 3.15 (torch backend) on [8, 3]: y = (x − mm)/√(mv + eps).
    let ctx = ctx();
    let shape = [8, 3];
    let x = normal(24, 23, 1.0, 2.0);
    let (mm, mv) = ([0.5f32, -1.0, 2.0], [2.0f32, 0.5, 1.5]);
    let config = BatchNormConfig {
        trainable: false,
        ..BatchNormConfig::keras()
    };
    let mut bn = BatchNorm::new(ctx, 3, config).unwrap();
    let moving = (
        ctx.upload(&mm, &[3]).unwrap(),
        ctx.upload(&mv, &[3]).unwrap(),
    );
    bn.set_running_stats(ctx, Some((moving.0, moving.1, None)))
        .unwrap();
    let y = bn
        .forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
        .unwrap();
    let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let (x64, mm64, mv64) = (wide(&x), wide(&mm), wide(&mv));
    let view = View::batch_norm(&shape, 1);
    let moving64 = Some((mm64.as_slice(), mv64.as_slice()));
    let want = reference::forward_f64(&x64, &view, false, 1e-3, None, None, moving64);
    assert_close("frozen", &ctx.download(&y).unwrap(), &want, 1e-6, 1e-5);
    assert_eq!(
        running(&bn),
        (mm.to_vec(), mv.to_vec(), None),
        "moving statistics moved"
    );
}

#[test]
fn batch_norm_with_long_spatial_runs_matches_f64_in_train_and_eval() {
    // Spatial size 576 >= RUNS_MIN_LEN: the run-by-run normalize kernel.
    let ctx = ctx();
    let shape = [2, 3, 24, 24];
    let x = normal(2 * 3 * 576, 61, 50.0, 2.0);
    let w = [0.5f32, -2.0, 1.5];
    let b = [1.0f32, 0.0, -3.0];
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
    bn.set_weight(Some(ctx.upload(&w, &[3]).unwrap())).unwrap();
    bn.set_bias(Some(ctx.upload(&b, &[3]).unwrap())).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let view = View::batch_norm(&shape, 1);
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
    assert_close("train", &y, &want, 1e-5, 1e-5);
    let (rm, rv, _) = running(&bn);
    let stats: Vec<(f64, f64)> = rm
        .iter()
        .zip(&rv)
        .map(|(&m, &v)| (m as f64, v as f64))
        .collect();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Eval).unwrap())
        .unwrap();
    let want = reference::normalize(&x, &view, &stats, 1e-5, Some(&w), Some(&b));
    assert_close("eval", &y, &want, 1e-5, 1e-5);
}

/// A Keras BatchNorm over channels-last `shape`, train then eval, against
/// the f64 reference, with its moving statistics.
fn channels_last_batch_norm_case(shape: &[usize], seed: u64) {
    let ctx = ctx();
    let c = shape[shape.len() - 1];
    let x = normal(shape.iter().product(), seed, -30.0, 3.0);
    let w: Vec<f32> = (0..c).map(|c| 0.5 + c as f32 * 0.01).collect();
    let b: Vec<f32> = (0..c).map(|c| c as f32 * 0.1 - 8.0).collect();
    let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::keras()).unwrap();
    bn.set_weight(Some(ctx.upload(&w, &[c]).unwrap())).unwrap();
    bn.set_bias(Some(ctx.upload(&b, &[c]).unwrap())).unwrap();
    let xt = ctx.upload(&x, shape).unwrap();
    let view = View::batch_norm(shape, shape.len() - 1);
    let what = format!("channels-last {shape:?}");
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let want = reference::forward(&x, &view, false, 1e-3, Some(&w), Some(&b));
    assert_close(&format!("{what} train"), &y, &want, 1e-5, 1e-5);
    let stats = reference::group_stats(&x, &view, false);
    let (rm, rv, count) = running(&bn);
    let want_rm: Vec<f64> = stats.iter().map(|s| 0.01 * s.0).collect();
    let want_rv: Vec<f64> = stats.iter().map(|s| 0.99 + 0.01 * s.1).collect();
    assert_close(&format!("{what} moving_mean"), &rm, &want_rm, 1e-6, 1e-5);
    assert_close(
        &format!("{what} moving_variance"),
        &rv,
        &want_rv,
        1e-6,
        1e-5,
    );
    assert_eq!(count, None);
    let stats: Vec<(f64, f64)> = rm
        .iter()
        .zip(&rv)
        .map(|(&m, &v)| (m as f64, v as f64))
        .collect();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Eval).unwrap())
        .unwrap();
    let want = reference::normalize(&x, &view, &stats, 1e-3, Some(&w), Some(&b));
    assert_close(&format!("{what} eval"), &y, &want, 1e-5, 1e-5);
}

#[test]
fn channels_last_batch_norm_matches_f64_in_train_and_eval() {
    // C = 16 columns: the column partials and the fixed-column normalize.
    channels_last_batch_norm_case(&[5, 7, 9, 16], 71);
    // On lavapipe (subgroups of 8), 36 to 256 channels go a subgroup per
    // row block, each lane holding its columns: 256 channels fill a lane's
    // eight slots over 306 rows (partials blocks of 256 and 50 rows,
    // normalize blocks of 128, 128 and 50); 136 channels give a lane 5
    // slots, the fifth live in two lanes only.
    channels_last_batch_norm_case(&[2, 9, 17, 256], 72);
    channels_last_batch_norm_case(&[3, 7, 11, 136], 73);
    // 64 channels: 2 vectors per lane, the fewest the forward holds.
    channels_last_batch_norm_case(&[4, 9, 11, 64], 76);
}

#[test]
fn column_statistics_keep_their_digits_when_the_shift_is_an_outlier() {
    // Each column's shift is a value of the column (the median of its
    // first, middle and last); here first and last lie 3σ from the mean,
    // so sums shifted by them alone lose a digit of the variance to
    // cancellation, which γ = 1.7 and β = 4.2 turn into y off by 2e-5.
    // Each block's sums are centred on its first rows instead.
    let ctx = ctx();
    for c in [16usize, 136] {
        let rows = 400;
        let mut x = normal(rows * c, 75, -30.0, 3.0);
        for ch in 0..c {
            x[ch] = -21.0;
            x[(rows - 1) * c + ch] = -21.0;
        }
        let (w, b) = (vec![1.7f32; c], vec![4.2f32; c]);
        let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::keras()).unwrap();
        bn.set_weight(Some(ctx.upload(&w, &[c]).unwrap())).unwrap();
        bn.set_bias(Some(ctx.upload(&b, &[c]).unwrap())).unwrap();
        let y = ctx
            .download(
                &bn.forward(ctx, &ctx.upload(&x, &[rows, c]).unwrap(), Mode::Train)
                    .unwrap(),
            )
            .unwrap();
        let view = View::batch_norm(&[rows, c], 1);
        let want = reference::forward(&x, &view, false, 1e-3, Some(&w), Some(&b));
        assert_close(&format!("{c} channels"), &y, &want, 1e-5, 1e-5);
    }
}

#[test]
fn batch_norm_1d_over_held_columns_counts_the_batch_and_tracks_unbiased_variance() {
    // torch BatchNorm1d over (N, C) is channels-last with one row per
    // sample: 192 channels are held columns on lavapipe. The counter bump
    // rides on the partials pass; without affine the scale is the rstd.
    let ctx = ctx();
    let (n, c) = (300, 192);
    let x = normal(n * c, 74, 5.0, 2.0);
    let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::torch_1d().affine(false)).unwrap();
    let xt = ctx.upload(&x, &[n, c]).unwrap();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let view = View::batch_norm(&[n, c], 1);
    let want = reference::forward(&x, &view, false, 1e-5, None, None);
    assert_close("batch norm 1d", &y, &want, 1e-5, 1e-5);
    let stats = reference::group_stats(&x, &view, false);
    let (rm, rv, tracked) = running(&bn);
    let unbiased = n as f64 / (n - 1) as f64;
    let want_rm: Vec<f64> = stats.iter().map(|s| 0.1 * s.0).collect();
    let want_rv: Vec<f64> = stats.iter().map(|s| 0.9 + 0.1 * s.1 * unbiased).collect();
    assert_close("running_mean", &rm, &want_rm, 1e-6, 1e-5);
    assert_close("running_var", &rv, &want_rv, 1e-6, 1e-5);
    assert_eq!(tracked, Some(1));
}

#[test]
fn channels_last_group_norm_matches_f64() {
    // Keras's GroupNormalization layout: samples of HxW positions, channels
    // in groups of 2 (column partials) or 8 (tiled partials); the
    // fixed-column normalize with statistics per sample in both. On
    // lavapipe 36 to 256 channels go a subgroup per row block holding its
    // columns: 256 in groups of 8 over 270 rows a sample, 136 in groups of
    // 8 (a fifth slot live in two lanes), 192 in groups of 6 (vectors
    // straddle groups), 64 in groups of 8.
    let ctx = ctx();
    for (shape, groups) in [
        ([4usize, 6, 6, 16], 8usize),
        ([2, 5, 5, 32], 4),
        ([3, 9, 30, 256], 32),
        ([2, 11, 13, 136], 17),
        ([2, 7, 7, 192], 32),
        ([2, 9, 9, 64], 8),
    ] {
        let c = shape[3];
        let x = normal(shape.iter().product(), 73, 20.0, 3.0);
        let w: Vec<f32> = (0..c).map(|c| 0.5 + c as f32 * 0.01).collect();
        let b: Vec<f32> = (0..c).map(|c| c as f32 * 0.1 - 8.0).collect();
        let mut gn =
            gpunorm::GroupNorm::new(ctx, groups, c, gpunorm::GroupNormConfig::keras()).unwrap();
        gn.set_affine(gpunorm::Affine {
            weight: Some(ctx.upload(&w, &[c]).unwrap()),
            bias: Some(ctx.upload(&b, &[c]).unwrap()),
        })
        .unwrap();
        let xt = ctx.upload(&x, &shape).unwrap();
        let view = View::group_norm_channels_last(&shape, groups);
        let y = ctx.download(&gn.forward(ctx, &xt).unwrap()).unwrap();
        let want = reference::forward(&x, &view, false, 1e-3, Some(&w), Some(&b));
        assert_close(
            &format!("group norm channels-last {shape:?}"),
            &y,
            &want,
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn batch_norm_over_small_planes_matches_f64() {
    // 16 channels of 4x4: runs of 16 too short for normalize_runs, so the
    // normalize pass goes by fixed columns of 256 elements per row.
    let ctx = ctx();
    let shape = [6, 16, 4, 4];
    let x = normal(6 * 16 * 16, 89, -3.0, 1.5);
    let mut bn = BatchNorm::new(ctx, 16, BatchNormConfig::torch_2d()).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let view = View::batch_norm(&shape, 1);
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let want = reference::forward(&x, &view, false, 1e-5, None, None);
    assert_close("train", &y, &want, 1e-5, 1e-5);
}

#[test]
fn batch_norm_over_14x14_planes_normalizes_run_by_run_and_matches_f64() {
    // Runs of 196 elements (49 vectors, an odd count): on GPU sizes
    // normalize_runs, which pairs vectors, with most of its workgroup idle
    // rather than the flat kernel; on lavapipe a subgroup per run.
    let shape = [4, 8, 14, 14];
    let x = normal(4 * 8 * 196, 97, 2.0, 1.5);
    let w: Vec<f32> = (0..8).map(|c| 0.5 + c as f32 * 0.25).collect();
    let b: Vec<f32> = (0..8).map(|c| c as f32 - 4.0).collect();
    let view = View::batch_norm(&shape, 1);
    let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
    for ctx in [ctx(), gpu_sized()] {
        let mut bn = BatchNorm::new(ctx, 8, BatchNormConfig::torch_2d()).unwrap();
        bn.set_weight(Some(ctx.upload(&w, &[8]).unwrap())).unwrap();
        bn.set_bias(Some(ctx.upload(&b, &[8]).unwrap())).unwrap();
        let xt = ctx.upload(&x, &shape).unwrap();
        let yt = ctx.zeros(&shape, DType::F32).unwrap();
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        let plan = bn.record(ctx, &mut encoder, &xt, &yt, Mode::Train).unwrap();
        ctx.submit_and_wait(encoder).unwrap();
        let caps = ctx.caps();
        let normalize = if caps.cpu && caps.subgroups {
            Kernel::NormalizeRunsSubgroup
        } else {
            Kernel::NormalizeRuns
        };
        assert!(plan.iter().any(|d| d.kernel == normalize), "{plan:?}");
        assert_close("train", &ctx.download(&yt).unwrap(), &want, 1e-5, 1e-5);
    }
}

#[test]
fn runs_walked_by_subgroups_in_blocks_match_f64_and_update_running_stats() {
    // 16·70 = 1120 runs of 144 elements: on lavapipe a subgroup per run, in
    // blocks of 17 contiguous runs (the last block 15), a partial per run
    // (16 per channel), and the normalize run by run with γ and β.
    let ctx = ctx();
    let shape = [16, 70, 12, 12];
    let x = normal(16 * 70 * 144, 5, -1.0, 3.0);
    let w: Vec<f32> = (0..70).map(|c| 1.0 + c as f32 * 0.01).collect();
    let b: Vec<f32> = (0..70).map(|c| c as f32 * -0.1).collect();
    let mut bn = BatchNorm::new(ctx, 70, BatchNormConfig::torch_2d()).unwrap();
    bn.set_weight(Some(ctx.upload(&w, &[70]).unwrap())).unwrap();
    bn.set_bias(Some(ctx.upload(&b, &[70]).unwrap())).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let view = View::batch_norm(&shape, 1);
    let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
    assert_close("train", &y, &want, 1e-5, 1e-5);
    let n = (16 * 144) as f64;
    let stats = channel_stats(&x, &shape);
    let (rm, rv, tracked) = running(&bn);
    let want_rm: Vec<f64> = stats.iter().map(|s| 0.1 * s.0).collect();
    let want_rv: Vec<f64> = stats
        .iter()
        .map(|s| 0.9 + 0.1 * s.1 * n / (n - 1.0))
        .collect();
    assert_close("running_mean", &rm, &want_rm, 1e-6, 1e-5);
    assert_close("running_var", &rv, &want_rv, 1e-6, 1e-5);
    assert_eq!(tracked, Some(1));

    // InstanceNorm with running statistics takes the partials path too,
    // with P = 3 samples: each run's partial is its own (sample, channel).
    let shape = [3, 5, 16, 16];
    let x = normal(3 * 5 * 256, 6, 4.0, 0.5);
    let mut cfg = InstanceNormConfig::torch();
    cfg.track_running_stats = true;
    let mut inorm = InstanceNorm::new(ctx, 5, cfg).unwrap();
    let y = ctx
        .download(
            &inorm
                .forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
                .unwrap(),
        )
        .unwrap();
    let view = View::instance_norm(&shape);
    let want = reference::forward(&x, &view, false, 1e-5, None, None);
    assert_close("instance norm", &y, &want, 1e-5, 1e-5);
    // The update averages the three samples' statistics per channel:
    // 0.1·mean and 0.9 + 0.1·(unbiased var), and leaves the counter.
    assert_first_update("in", &inorm, &x, &shape, 1e-6, 1e-5);
    let r = inorm.running_stats().unwrap();
    assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(0));
}

#[test]
fn group_norm_with_one_group_holds_rows_and_finds_each_channels_parameters() {
    // One group: every row has the same parameters (G = 1), so lavapipe
    // holds rows of up to 1024 elements in registers, with γ and β one per
    // channel of H·W elements: 4x4 planes (whole vectors: a parameter per
    // vector) and 5x6 planes (a vector across two channels: per element).
    for shape in [[3, 4, 4, 4], [2, 6, 5, 6]] {
        let c = shape[1];
        let x = normal(shape.iter().product(), 29, -2.0, 1.5);
        let w: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
        let b: Vec<f32> = (0..c).map(|i| i as f32 - 2.0).collect();
        let view = View::group_norm(&shape, 1);
        let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
        let ctx = ctx();
        let mut gn = gpunorm::GroupNorm::new(ctx, 1, c, gpunorm::GroupNormConfig::torch()).unwrap();
        gn.set_affine(gpunorm::Affine {
            weight: Some(ctx.upload(&w, &[c]).unwrap()),
            bias: Some(ctx.upload(&b, &[c]).unwrap()),
        })
        .unwrap();
        let y = ctx
            .download(&gn.forward(ctx, &ctx.upload(&x, &shape).unwrap()).unwrap())
            .unwrap();
        assert_close(&format!("group norm {shape:?}"), &y, &want, 1e-5, 1e-5);
    }
}

#[test]
fn batch_norm_with_many_partials_per_channel_matches_f64() {
    // 65·64·64 = 266240 rows of 4 channels: 1040 column blocks per channel
    // on a CPU adapter (256 rows each), 4160 sized for a GPU (64 rows each).
    // That is more than one invocation merges on either
    // (kernels::FINALIZE_SERIAL_MAX_CPU, FINALIZE_SERIAL_MAX), so the
    // finalize pass reduces them in a workgroup tree: the plan must say so.
    let shape = [65, 64, 64, 4];
    let x = normal(shape.iter().product(), 79, 5.0, 2.0);
    let view = View::batch_norm(&shape, 3);
    let want = reference::forward(&x, &view, false, 1e-3, None, None);
    let stats = reference::group_stats(&x, &view, false);
    let want_rm: Vec<f64> = stats.iter().map(|s| 0.01 * s.0).collect();
    let want_rv: Vec<f64> = stats.iter().map(|s| 0.99 + 0.01 * s.1).collect();
    for ctx in [ctx(), gpu_sized()] {
        let mut bn = BatchNorm::new(ctx, 4, BatchNormConfig::keras()).unwrap();
        let xt = ctx.upload(&x, &shape).unwrap();
        let y = ctx.zeros(&shape, gpunorm::DType::F32).unwrap();
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        let plan = bn.record(ctx, &mut encoder, &xt, &y, Mode::Train).unwrap();
        ctx.submit_and_wait(encoder).unwrap();
        assert!(
            plan.iter().any(|d| d.kernel == Kernel::Finalize),
            "no tree finalize in {plan:?}"
        );
        assert_close("train", &ctx.download(&y).unwrap(), &want, 1e-5, 1e-5);
        let r = bn.running_stats().unwrap();
        let rm = ctx.download(&r.mean).unwrap();
        let rv = ctx.download(&r.var).unwrap();
        assert_close("moving_mean", &rm, &want_rm, 1e-6, 1e-5);
        assert_close("moving_variance", &rv, &want_rv, 1e-6, 1e-5);
    }
}

#[test]
fn channels_first_group_norm_with_channels_of_whole_vectors_matches_f64() {
    // 4 channels per group: one γ and β per aligned vector
    // (AFFINE_PER_QUAD), on the subgroup and the workgroup row kernels.
    // Channels of 4x6 take γ and β vector by vector; channels of 8x10 (20
    // vectors, longer than a lavapipe subgroup step) channel by channel.
    let no_subgroups = gpunorm::Context::with_options(gpunorm::ContextOptions {
        disable_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for shape in [[3, 8, 4, 6], [3, 8, 8, 10]] {
        let x = normal(shape.iter().product(), 83, 3.0, 2.0);
        let w: Vec<f32> = (0..8).map(|c| 0.5 + c as f32 * 0.25).collect();
        let b: Vec<f32> = (0..8).map(|c| c as f32 - 4.0).collect();
        let view = View::group_norm(&shape, 2);
        let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
        for ctx in [ctx(), &no_subgroups] {
            let mut gn =
                gpunorm::GroupNorm::new(ctx, 2, 8, gpunorm::GroupNormConfig::torch()).unwrap();
            gn.set_affine(gpunorm::Affine {
                weight: Some(ctx.upload(&w, &[8]).unwrap()),
                bias: Some(ctx.upload(&b, &[8]).unwrap()),
            })
            .unwrap();
            let y = ctx
                .download(&gn.forward(ctx, &ctx.upload(&x, &shape).unwrap()).unwrap())
                .unwrap();
            assert_close(&format!("group norm {shape:?}"), &y, &want, 1e-5, 1e-5);
        }
    }
}

#[test]
fn batch_norm_whose_runs_fit_held_columns_matches_f64() {
    // Runs of 128 to 256 elements in rows of at most 256 columns: the
    // forward takes the held-column partials on a CPU, and its finalize
    // merged them as per-run partials (a fuzzing find: [2, 1, 128] of
    // 0..255 normalized with mean 64.5).
    let ctx = ctx();
    for (shape, seed) in [
        ([2usize, 1, 128], 90u64),
        ([2, 2, 128], 91),
        ([23, 1, 144], 92),
    ] {
        let n: usize = shape.iter().product();
        let x = normal(n, seed, 5.0, 2.0);
        let mut bn = BatchNorm::new(ctx, shape[1], BatchNormConfig::torch_1d()).unwrap();
        let xt = ctx.upload(&x, &shape).unwrap();
        let y = ctx
            .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
            .unwrap();
        let view = View::batch_norm(&shape, 1);
        let want = reference::forward(&x, &view, false, 1e-5, None, None);
        assert_close(&format!("{shape:?}"), &y, &want, 1e-5, 1e-5);
        let (mean, _, _) = running(&bn);
        for (c, (m, _)) in channel_stats(&x, &shape).iter().enumerate() {
            assert!(
                (mean[c] as f64 - 0.1 * m).abs() < 1e-5,
                "{shape:?} running_mean"
            );
        }
    }
}

#[test]
fn tracked_instance_norm_over_a_large_batch_averages_every_instance() {
    // 9000 instances of two channels: each running channel averages 9000
    // groups. The finalize merged them with a workgroup tree per group, in
    // a loop, and on lavapipe every group past about 5,000 was lost.
    let ctx = ctx();
    let shape = [9000, 2, 3];
    let x = normal(9000 * 6, 95, 2.0, 1.0);
    let mut cfg = InstanceNormConfig::torch();
    cfg.track_running_stats = true;
    let mut inorm = InstanceNorm::new(ctx, 2, cfg).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let y = ctx
        .download(&inorm.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let want = reference::forward(&x, &View::instance_norm(&shape), false, 1e-5, None, None);
    assert_close("output", &y, &want, 1e-4, 1e-4);
    assert_first_update("tracked", &inorm, &x, &shape, 1e-6, 1e-5);
}

#[test]
fn batch_norm_over_one_long_run_writes_every_output() {
    // One 4096x4096 plane: a run of 16M elements. lavapipe runs at most
    // 65,535 loop iterations per invocation and silently stops after them;
    // a subgroup walking the run normalized its first quarter and left the
    // rest unwritten.
    let ctx = ctx();
    let shape = [1, 1, 4096, 4096];
    let n = 4096 * 4096;
    let x = normal(n, 96, -1.0, 3.0);
    let mut bn = BatchNorm::new(ctx, 1, BatchNormConfig::torch_2d()).unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let want = reference::forward(&x, &View::batch_norm(&shape, 1), false, 1e-5, None, None);
    assert_close("BatchNorm2d of one 4096x4096 plane", &y, &want, 1e-4, 1e-4);
}

#[test]
fn tracked_instance_norm_with_momentum_none_keeps_its_statistics_but_takes_nan_as_torch() {
    // torch passes InstanceNorm's momentum None on as 0.0: the running
    // statistics become 1·running + 0·batch, so they keep their values on
    // finite input and turn NaN where the batch has a NaN (a fuzzing find:
    // they stayed frozen).
    let ctx = ctx();
    let config = InstanceNormConfig {
        track_running_stats: true,
        momentum: None,
        ..InstanceNormConfig::torch_1d()
    };
    let mut inorm = InstanceNorm::new(ctx, 2, config).unwrap();
    let (mean, var) = (vec![0.5f32, -1.0], vec![2.0f32, 3.0]);
    let stats = (
        ctx.upload(&mean, &[2]).unwrap(),
        ctx.upload(&var, &[2]).unwrap(),
        Some(0),
    );
    inorm.set_running_stats(ctx, Some(stats)).unwrap();
    let finite = normal(3 * 2 * 5, 97, 1.0, 2.0);
    let mut with_nan = finite.clone();
    with_nan[5] = f32::NAN; // sample 0, channel 1
    inorm
        .forward(ctx, &ctx.upload(&finite, &[3, 2, 5]).unwrap(), Mode::Train)
        .unwrap();
    let running = |inorm: &InstanceNorm| {
        let r = inorm.running_stats().unwrap();
        (
            ctx.download(&r.mean).unwrap(),
            ctx.download(&r.var).unwrap(),
        )
    };
    assert_eq!(running(&inorm), (mean.clone(), var.clone()));
    inorm
        .forward(
            ctx,
            &ctx.upload(&with_nan, &[3, 2, 5]).unwrap(),
            Mode::Train,
        )
        .unwrap();
    let (m, v) = running(&inorm);
    assert_eq!((m[0], v[0]), (mean[0], var[0]), "channel 0 has no NaN");
    assert!(m[1].is_nan() && v[1].is_nan(), "channel 1: {m:?} {v:?}");
}

#[test]
fn instance_norm_with_eps_zero_gives_beta_on_a_constant_group_as_torch_does() {
    // torch's InstanceNorm runs its batch-norm kernel, whose rstd is 0 where
    // variance and eps are both 0: a constant group gives β and zero
    // gradients (torch 2.15: F.instance_norm(ones(2, 3, 4) * 0.7, eps=0)
    // is 0, its grad 0). Its GroupNorm gives NaN there, and so do we (a
    // fuzzing find: InstanceNorm gave NaN too).
    let ctx = ctx();
    let shape = [2, 3, 4];
    let mut x = vec![0.7f32; 24];
    // Channel 1 of sample 1 varies; every other group is constant.
    for (k, v) in x[16..20].iter_mut().enumerate() {
        *v = k as f32;
    }
    let config = InstanceNormConfig {
        eps: 0.0,
        affine: true,
        ..InstanceNormConfig::torch_1d()
    };
    let mut inorm = InstanceNorm::new(ctx, 3, config).unwrap();
    let beta = [0.1f32, 0.2, 0.3];
    inorm
        .set_affine(gpunorm::Affine {
            weight: Some(ctx.upload(&[1.0, 2.0, 3.0], &[3]).unwrap()),
            bias: Some(ctx.upload(&beta, &[3]).unwrap()),
        })
        .unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let y = ctx
        .download(&inorm.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let view = View::instance_norm(&shape);
    let want = reference::forward(&x, &view, false, 0.0, Some(&[1.0, 2.0, 3.0]), Some(&beta));
    for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
        let group = i / 4;
        if group == 4 {
            assert!((got as f64 - want).abs() < 1e-5, "{i}: {got} vs {want}");
        } else {
            assert_eq!(got, beta[group % 3], "{i}: constant group");
        }
    }
    let dy = normal(24, 98, 0.0, 1.0);
    let g = inorm
        .backward(ctx, &ctx.upload(&dy, &shape).unwrap())
        .unwrap();
    let dx = ctx.download(&g.grad_input).unwrap();
    assert!(
        dx.iter()
            .enumerate()
            .all(|(i, &d)| (i / 4 == 4) || d == 0.0),
        "{dx:?}"
    );
    assert!(dx[16..20].iter().any(|&d| d != 0.0));

    let mut gn = gpunorm::GroupNorm::new(
        ctx,
        3,
        3,
        gpunorm::GroupNormConfig {
            eps: 0.0,
            ..gpunorm::GroupNormConfig::torch()
        },
    )
    .unwrap();
    let y = ctx.download(&gn.forward(ctx, &xt).unwrap()).unwrap();
    assert!(
        y[..4].iter().all(|v| v.is_nan()),
        "GroupNorm: {:?}",
        &y[..4]
    );
}

#[test]
fn tracked_instance_norm_of_two_long_instances_counts_every_element() {
    // Two instances of 4M elements: 65,536 partials each. One invocation
    // merging each instance's partials passed lavapipe's 65,535 loop
    // iterations and left the second half of each out of the running
    // statistics (found in review).
    let ctx = ctx();
    let len = 1 << 22;
    let shape = [2, 1, len];
    let mut x = normal(2 * len, 99, 0.0, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        if i % len >= len / 2 {
            *v += 5.0;
        }
    }
    let mut cfg = InstanceNormConfig::torch();
    cfg.track_running_stats = true;
    let mut inorm = InstanceNorm::new(ctx, 1, cfg).unwrap();
    inorm
        .forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
        .unwrap();
    assert_first_update("tracked", &inorm, &x, &shape, 1e-5, 1e-4);
}
