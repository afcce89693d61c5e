//! One truly large tensor: 300 MB, more than lavapipe's 128 MiB storage
//! binding, so the chunked path runs for real.

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
}
