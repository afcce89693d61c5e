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
