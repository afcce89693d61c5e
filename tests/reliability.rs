//! Adversarial numerics, limits, sharing across threads, malformed files.

mod common;
use common::{assert_close, ctx, gpu_sized, layer_norm_on, layer_norm_reference, normal};
use gpunorm::{
    reference, BatchNorm, BatchNormConfig, Context, LayerNorm, Mode, RowNormConfig, View,
};

fn layer_norm_f32(x: &[f32], rows: usize, len: usize) -> Vec<f32> {
    layer_norm_on(ctx(), x, rows, len, RowNormConfig::torch_layer_norm())
}

#[test]
fn large_offsets_cost_no_accuracy_against_the_stored_inputs() {
    for offset in [1e4f32, 1e5, 1e6] {
        let (rows, len) = (8, 1024);
        let x = normal(rows * len, offset as u64, offset, 1.0);
        let want = layer_norm_reference(&x, rows, len, 1e-5);
        // Shifting by the row's first element keeps x - shift exact, so the
        // error stays near f32 rounding of y itself, far below SPEC's 1e-3.
        assert_close(
            &format!("offset {offset}"),
            &layer_norm_f32(&x, rows, len),
            &want,
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn values_whose_squares_overflow_f32_still_normalize() {
    let (rows, len) = (4, 512);
    let x: Vec<f32> = normal(rows * len, 77, 0.0, 1.0)
        .iter()
        .map(|z| 3e19 + 1e17 * z)
        .collect();
    let want = layer_norm_reference(&x, rows, len, 1e-5);
    assert_close(
        "3e19 ± 1e17",
        &layer_norm_f32(&x, rows, len),
        &want,
        1e-4,
        1e-4,
    );
}

#[test]
fn an_infinite_value_makes_its_channels_running_mean_infinite_like_torch() {
    // torch: running_mean [.., inf, -inf] and running_var NaN for channels
    // holding +inf and -inf (the mean of the values is ±inf). Merging a
    // partial with an infinite mean into a finite one used to compute
    // inf − inf. 4096 rows of 3 channels, the infs in different row blocks.
    let (rows, c) = (4096, 3);
    let mut x = normal(rows * c, 9, 0.0, 1.0);
    x[2000 * c + 1] = f32::INFINITY;
    x[5 * c + 2] = f32::NEG_INFINITY;
    for ctx in [ctx(), gpu_sized()] {
        let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::torch_1d()).unwrap();
        bn.forward(ctx, &ctx.upload(&x, &[rows, c]).unwrap(), Mode::Train)
            .unwrap();
        let r = bn.running_stats().unwrap();
        let (mean, var) = (
            ctx.download(&r.mean).unwrap(),
            ctx.download(&r.var).unwrap(),
        );
        assert!(
            mean[0].is_finite() && var[0].is_finite(),
            "{mean:?} {var:?}"
        );
        assert_eq!(
            (mean[1], mean[2]),
            (f32::INFINITY, f32::NEG_INFINITY),
            "{mean:?}"
        );
        assert!(var[1].is_nan() && var[2].is_nan(), "{var:?}");
    }
}

#[test]
fn tiny_variance_with_tiny_eps_stays_finite_and_accurate() {
    let ctx = ctx();
    let (rows, len) = (4, 256);
    let x: Vec<f32> = normal(rows * len, 5, 1.0, 1e-3);
    let mut cfg = RowNormConfig::torch_layer_norm();
    cfg.eps = 1e-12;
    let y = layer_norm_on(ctx, &x, rows, len, cfg);
    let want = layer_norm_reference(&x, rows, len, 1e-12);
    assert_close("tiny variance", &y, &want, 1e-4, 1e-4);
}

#[test]
fn nan_and_inf_propagate_to_their_row_like_torch() {
    let len = 16;
    let mut x = normal(3 * len, 8, 0.0, 1.0);
    x[3] = f32::NAN;
    x[len + 5] = f32::INFINITY;
    let y = layer_norm_f32(&x, 3, len);
    assert!(
        y[..2 * len].iter().all(|v| v.is_nan()),
        "rows with NaN or inf become NaN"
    );
    assert!(
        y[2 * len..].iter().all(|v| v.is_finite()),
        "other rows are untouched"
    );
}

#[test]
fn context_and_layers_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Context>();
    assert_send_sync::<BatchNorm>();
    assert_send_sync::<LayerNorm>();
    // Every thread runs on the one shared test context (ctx()).
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                s.spawn(move || {
                    let (rows, len) = (16 + t, 64);
                    let x = normal(rows * len, 100 + t as u64, t as f32, 1.0);
                    for _ in 0..5 {
                        let y = layer_norm_f32(&x, rows, len);
                        let want = layer_norm_reference(&x, rows, len, 1e-5);
                        assert_close("threaded", &y, &want, 1e-5, 1e-5);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn many_alternating_forwards_reuse_nothing_they_should_not() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 4, BatchNormConfig::torch_1d()).unwrap();
    let host = normal(32, 3, 0.0, 1.0);
    let x = ctx.upload(&host, &[8, 4]).unwrap();
    let mut last_eval = Vec::new();
    for i in 0..200 {
        let mode = if i % 2 == 0 { Mode::Train } else { Mode::Eval };
        let y = bn.forward(ctx, &x, mode).unwrap();
        if i == 199 {
            last_eval = ctx.download(&y).unwrap();
        }
    }
    let r = bn.running_stats().unwrap();
    assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(100));
    // 100 updates toward the same batch: mean (1 − 0.9^100)·m, and the
    // last eval normalized by the running statistics, not the batch's.
    let view = View::batch_norm(&[8, 4], 1);
    let stats = reference::group_stats(&host, &view, false);
    let k = 1.0 - 0.9f64.powi(100);
    let want_mean: Vec<f64> = stats.iter().map(|s| k * s.0).collect();
    let mean = ctx.download(&r.mean).unwrap();
    assert_close("running_mean", &mean, &want_mean, 1e-6, 1e-5);
    let var = ctx.download(&r.var).unwrap();
    let running: Vec<(f64, f64)> = mean
        .iter()
        .zip(&var)
        .map(|(&m, &v)| (m as f64, v as f64))
        .collect();
    let want = reference::normalize(&host, &view, &running, 1e-5, None, None);
    assert_close("last eval", &last_eval, &want, 1e-5, 1e-5);
}

fn apply(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gpunorm"))
        .arg("apply")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn malformed_safetensors_files_are_rejected_with_one_error_line() {
    let dir = std::env::temp_dir().join(format!("gpunorm-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.safetensors");
    // A header that declares 2^60 bytes, random bytes, a truncated file.
    let mut lying = (1u64 << 60).to_le_bytes().to_vec();
    lying.extend_from_slice(b"{}");
    let mut truncated = 64u64.to_le_bytes().to_vec();
    truncated
        .extend_from_slice(br#"{"input":{"dtype":"F32","shape":[1024],"data_offsets":[0,4096]}}"#);
    let cases: [(&str, Vec<u8>); 4] = [
        ("lying", lying),
        (
            "random",
            (0..997u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("truncated", truncated),
        ("empty", Vec::new()),
    ];
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let o = apply(&[
            "--op",
            "layer-norm",
            "--in",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: accepted");
        assert!(
            stderr.starts_with("error:") && !stderr.contains("panicked"),
            "{name}: {stderr}"
        );
        assert!(!out.exists(), "{name}: wrote an output");
    }
    let o = apply(&[
        "--op",
        "layer-norm",
        "--in",
        dir.join("missing").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error:"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn constant_groups_give_beta_exactly_and_finite_gradients() {
    let ctx = ctx();
    let shape = [4, 2, 6];
    // Channel 0 is constant (a large value), channel 1 is not.
    let x: Vec<f32> = (0..48)
        .map(|i| {
            if (i / 6) % 2 == 0 {
                10000.3
            } else {
                i as f32 * 0.5
            }
        })
        .collect();
    let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    bn.set_bias(Some(ctx.upload(&[0.25, -1.0], &[2]).unwrap()))
        .unwrap();
    let xt = ctx.upload(&x, &shape).unwrap();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    for (i, v) in y.iter().enumerate() {
        if (i / 6) % 2 == 0 {
            assert_eq!(*v, 0.25, "a constant channel gives beta exactly");
        }
    }
    let dy = normal(48, 5, 0.0, 1.0);
    let g = bn.backward(ctx, &ctx.upload(&dy, &shape).unwrap()).unwrap();
    let dx = ctx.download(&g.grad_input).unwrap();
    assert!(
        dx.iter().all(|v| v.is_finite()),
        "finite grad_input: {dx:?}"
    );
    // On the constant channel x̂ = 0 and rstd = 1/√eps: dx = (dy − mean dy)/√eps.
    let view = View::batch_norm(&shape, 1);
    let want = reference::backward(&x, &dy, &view, false, 1e-5, Some(&[1.0, 1.0]), None);
    assert_close("grad_input", &dx, &want.grad_input, 1e-4, 1e-4);
    let db = ctx.download(g.grad_bias.as_ref().unwrap()).unwrap();
    assert_close("grad_bias", &db, &want.grad_bias, 1e-5, 1e-5);
    let dw = ctx.download(g.grad_weight.as_ref().unwrap()).unwrap();
    assert_eq!(dw[0], 0.0, "x̂ is zero on a constant channel");
    assert!(dw[1].is_finite());
}

#[test]
fn shapes_whose_size_overflows_are_typed_errors_not_panics() {
    let ctx = ctx();
    assert!(matches!(
        ctx.upload(&[1.0, 2.0], &[usize::MAX, 2]),
        Err(gpunorm::Error::Shape(_))
    ));
    assert!(ctx.zeros(&[1 << 62, 8], gpunorm::DType::F32).is_err());
    assert!(LayerNorm::new(ctx, &[usize::MAX, 2], RowNormConfig::torch_layer_norm()).is_err());
    assert!(BatchNorm::new(ctx, 1 << 40, BatchNormConfig::torch()).is_err());
}

#[test]
fn odd_rows_and_first_element_outliers_normalize_accurately() {
    // Odd f32 rows start at odd indices (the row kernel's pair stores), and a
    // group whose first element is far from the rest must not cost digits.
    for (rows, len) in [(6, 5), (3, 1023), (4, 1024), (2, 100_000)] {
        let mut x = normal(rows * len, len as u64 + 3, 1e4, 1.0);
        for r in 0..rows {
            x[r * len] = 0.0;
        }
        let want = layer_norm_reference(&x, rows, len, 1e-5);
        assert_close(
            &format!("{rows}x{len}"),
            &layer_norm_f32(&x, rows, len),
            &want,
            1e-3,
            0.0,
        );
    }
    let ctx = ctx();
    let shape = [64, 2, 1024];
    let mut x = normal(64 * 2 * 1024, 9, 1e4, 1.0);
    x[0] = 0.0;
    x[1024] = 0.0;
    let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    let y = ctx
        .download(
            &bn.forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
                .unwrap(),
        )
        .unwrap();
    let want = reference::forward(&x, &View::batch_norm(&shape, 1), false, 1e-5, None, None);
    assert_close("batch norm with an outlier first", &y, &want, 1e-3, 0.0);
}

#[test]
fn a_stdout_that_cannot_be_written_is_an_error_line_not_a_panic() {
    // /dev/full refuses every write (ENOSPC), as a closed pipe or a full
    // disk would. Every command that prints reports it and exits 1.
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("no /dev/full here: skipped");
        return;
    };
    for args in [
        &["adapters"][..],
        &["demo", "--iters", "1"],
        &[
            "bench",
            "--op",
            "layer-norm",
            "--shape",
            "8,64",
            "--iters",
            "2",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpunorm"))
            .args(args)
            .stdout(full.try_clone().unwrap())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: cannot write to stdout") && stderr.lines().count() == 1,
            "{args:?}: {stderr}"
        );
    }
}
