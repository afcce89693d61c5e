//! One truly large tensor: 300 MB, more than lavapipe's 128 MiB storage
//! binding, so the chunked path runs for real, forward and backward.

mod common;
use common::ctx;
use gpunorm::{BatchNorm, BatchNormConfig, Mode};

#[test]
fn batch_norm_2d_of_300_mb_matches_the_f64_reference() {
    let ctx = ctx();
    let shape = [16, 64, 250, 300];
    let n: usize = shape.iter().product();
    let per_channel = 250 * 300;
    // Cheap deterministic data with a per-channel offset.
    let x: Vec<f32> = (0..n)
        .map(|i| {
            let c = (i / per_channel) % 64;
            let h = (i as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 40;
            c as f32 * 10.0 + (h as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect();
    let xt = ctx.upload(&x, &shape).unwrap();
    let mut bn = BatchNorm::new(ctx, 64, BatchNormConfig::torch_2d()).unwrap();
    let y = ctx
        .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let m = (n / 64) as f64;
    let mut stats = vec![(0.0f64, 0.0f64); 64];
    for (i, &v) in x.iter().enumerate() {
        stats[(i / per_channel) % 64].0 += v as f64;
    }
    for s in &mut stats {
        s.0 /= m;
    }
    for (i, &v) in x.iter().enumerate() {
        let s = &mut stats[(i / per_channel) % 64];
        s.1 += (v as f64 - s.0).powi(2);
    }
    let mut worst = 0.0f64;
    for (i, (&v, &got)) in x.iter().zip(&y).enumerate() {
        let (mean, m2) = stats[(i / per_channel) % 64];
        let want = (v as f64 - mean) / (m2 / m + 1e-5).sqrt();
        worst = worst.max((got as f64 - want).abs());
    }
    assert!(worst < 1e-4, "max error {worst}");
    let r = bn.running_stats().unwrap();
    assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(1));
    let rm = ctx.download(&r.mean).unwrap();
    for (c, s) in stats.iter().enumerate() {
        assert!((rm[c] as f64 - 0.1 * s.0).abs() < 1e-4, "running_mean[{c}]");
    }

    // The backward, as split as the forward: the per-channel sums against
    // f64, and grad_input on every 997th element.
    let dy_host: Vec<f32> = (0..n)
        .map(|i| {
            ((i as u64).wrapping_mul(0xD1B54A32D192ED03) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let dy = ctx.upload(&dy_host, &shape).unwrap();
    drop(xt);
    let g = bn.backward(ctx, &dy).unwrap();
    let rstd: Vec<f64> = stats
        .iter()
        .map(|&(_, m2)| 1.0 / (m2 / m + 1e-5).sqrt())
        .collect();
    let xhat = |i: usize| {
        let c = (i / per_channel) % 64;
        (x[i] as f64 - stats[c].0) * rstd[c]
    };
    let mut sums = vec![(0.0f64, 0.0f64); 64];
    for (i, &d) in dy_host.iter().enumerate() {
        let s = &mut sums[(i / per_channel) % 64];
        s.0 += d as f64;
        s.1 += d as f64 * xhat(i);
    }
    let grad_weight = ctx.download(g.grad_weight.as_ref().unwrap()).unwrap();
    let grad_bias = ctx.download(g.grad_bias.as_ref().unwrap()).unwrap();
    for c in 0..64 {
        let (sum_dy, sum_dy_xhat) = sums[c];
        assert!(
            (grad_weight[c] as f64 - sum_dy_xhat).abs() < 1e-4 * m,
            "grad_weight[{c}]"
        );
        assert!((grad_bias[c] as f64 - sum_dy).abs() < 1.0, "grad_bias[{c}]");
    }
    let grad_input = ctx.download(&g.grad_input).unwrap();
    let mut worst = 0.0f64;
    for i in (0..n).step_by(997) {
        let c = (i / per_channel) % 64;
        let (sum_dy, sum_dy_xhat) = sums[c];
        let want = rstd[c] * (dy_host[i] as f64 - sum_dy / m - xhat(i) * sum_dy_xhat / m);
        worst = worst.max((grad_input[i] as f64 - want).abs());
    }
    assert!(worst < 1e-4, "grad_input: max error {worst}");
    assert!(grad_input.iter().step_by(997).any(|v| v.abs() > 0.1));
}
