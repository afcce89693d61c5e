//! f16 and bf16 storage: loads, the hand-written round-to-nearest-even
//! stores (overflow, NaN, subnormals), packed words at odd lengths.

mod common;
use common::{ctx, gpu_sized, normal, stored};
use gpunorm::{
    reference, Affine, BatchNorm, BatchNormConfig, Context, DType, GpuTensor, GroupNorm,
    GroupNormConfig, LayerNorm, Mode, RowNormConfig, View,
};

/// ulp of |v| in `dtype`, floored at 2^-14 (SPEC §6).
fn ulp(v: f64, dtype: DType) -> f64 {
    let mantissa = if dtype == DType::BF16 { 7 } else { 10 };
    2f64.powi(v.abs().max(2f64.powi(-14)).log2().floor() as i32 - mantissa)
}

fn assert_within_ulps(what: &str, got: &[f32], want: &[f64], dtype: DType, ulps: f64) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: {g}, expected NaN");
        } else if w.is_infinite() {
            assert_eq!(g as f64, w, "{what}[{i}]");
        } else {
            let d = (g as f64 - w).abs();
            assert!(
                d <= ulps * ulp(w, dtype),
                "{what}[{i}]: {g} vs {w} ({} ulp)",
                d / ulp(w, dtype)
            );
        }
    }
}

fn layer_norm(
    dtype: DType,
    rows: usize,
    len: usize,
    x: &[f32],
    weight: Option<&[f32]>,
) -> (Vec<f32>, Vec<f64>) {
    layer_norm_on(ctx(), dtype, rows, len, x, weight)
}

fn layer_norm_on(
    ctx: &Context,
    dtype: DType,
    rows: usize,
    len: usize,
    x: &[f32],
    weight: Option<&[f32]>,
) -> (Vec<f32>, Vec<f64>) {
    let x = stored(x, dtype);
    let mut ln = LayerNorm::new(
        ctx,
        &[len],
        RowNormConfig::torch_layer_norm().elementwise_affine(false),
    )
    .unwrap();
    if let Some(w) = weight {
        ln.set_weight(Some(ctx.upload(w, &[len]).unwrap())).unwrap();
    }
    let xt = ctx.upload_as(&x, &[rows, len], dtype).unwrap();
    let y: GpuTensor = ln.forward(ctx, &xt, Mode::Train).unwrap();
    assert_eq!(y.dtype(), dtype);
    let want = reference::forward(
        &x,
        &View::layer_norm(&[rows, len], len),
        false,
        1e-5,
        weight,
        None,
    );
    (ctx.download(&y).unwrap(), want)
}

#[test]
fn f16_and_bf16_layer_norm_round_once_within_2_ulp() {
    for dtype in [DType::F16, DType::BF16] {
        let (got, want) = layer_norm(dtype, 16, 256, &normal(16 * 256, 3, 300.0, 1.0), None);
        assert_within_ulps(&format!("{dtype} offset 300"), &got, &want, dtype, 2.0);
    }
}

#[test]
fn half_rows_held_by_a_workgroup_round_once_within_2_ulp() {
    // The GPU's workgroup-held rows: 3 vectors per invocation of 256, the
    // third live in 4 invocations (2064 elements: 516 vectors).
    for dtype in [DType::F16, DType::BF16] {
        let x = normal(6 * 2064, 5, -20.0, 3.0);
        let (got, want) = layer_norm_on(gpu_sized(), dtype, 6, 2064, &x, None);
        assert_within_ulps(&format!("{dtype} 6x2064"), &got, &want, dtype, 2.0);
    }
}

#[test]
fn half_rows_in_pairs_or_singly_round_once_within_2_ulp() {
    // Held rows of 8 to 1024 elements: whole pairs of vectors (8, 144, 264,
    // 1024; 144 and 264 leave a pair of slots dead in some lanes) take
    // paired 16-byte accesses, rows of an odd count of vectors (260) single
    // ones; on the GPU-sized context, workgroup-held rows of 2064 (paired)
    // and 2068 (single). Rows too long to hold (3000 in pairs, 3004
    // singly) go through the subgroup row kernel.
    for dtype in [DType::F16, DType::BF16] {
        for (ctx, rows, len) in [
            (ctx(), 5, 8),
            (ctx(), 9, 144),
            (ctx(), 9, 264),
            (ctx(), 9, 260),
            (ctx(), 5, 1024),
            (ctx(), 3, 3000),
            (ctx(), 3, 3004),
            (gpu_sized(), 9, 264),
            (gpu_sized(), 3, 2064),
            (gpu_sized(), 3, 2068),
        ] {
            let x = normal(rows * len, len as u64, 4.0, 2.0);
            let w = normal(len, 7, 1.0, 0.5);
            let (got, want) = layer_norm_on(ctx, dtype, rows, len, &x, Some(&w));
            assert_within_ulps(&format!("{dtype} {rows}x{len}"), &got, &want, dtype, 2.0);
        }
    }
}

#[test]
fn half_group_norm_rows_in_pairs_or_singly_match_f64() {
    // Rows too long to hold, or with γ of their own, go through the
    // subgroup row kernel, in pairs of vectors where rows are a multiple of
    // 8 elements: channels of 256 (γ once per channel), of 40 (γ per
    // vector), one channel per group (one γ per row); rows of 90 singly.
    for dtype in [DType::F16, DType::BF16] {
        for (shape, groups) in [
            ([2usize, 8, 16, 16], 4),
            ([2, 6, 5, 8], 3),
            ([2, 6, 5, 8], 6),
            ([2, 6, 5, 6], 2),
        ] {
            let c = shape[1];
            let n: usize = shape.iter().product();
            let x = stored(&normal(n, n as u64, -3.0, 2.0), dtype);
            let w = normal(c, 3, 1.0, 0.5);
            let b = normal(c, 4, 0.0, 1.0);
            let ctx = ctx();
            let mut gn = GroupNorm::new(ctx, groups, c, GroupNormConfig::torch()).unwrap();
            gn.set_affine(Affine {
                weight: Some(ctx.upload(&w, &[c]).unwrap()),
                bias: Some(ctx.upload(&b, &[c]).unwrap()),
            })
            .unwrap();
            let xt = ctx.upload_as(&x, &shape, dtype).unwrap();
            let y = ctx.download(&gn.forward(ctx, &xt).unwrap()).unwrap();
            let view = View::group_norm(&shape, groups);
            let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
            assert_within_ulps(
                &format!("{dtype} {shape:?} / {groups}"),
                &y,
                &want,
                dtype,
                2.0,
            );
        }
    }
}

#[test]
fn half_batch_norm_channels_first_runs_in_pairs_or_singly_match_f64() {
    // Runs of H·W at least 128 long go run by run on lavapipe's subgroups
    // (partials per run, then the normalize with γ and β folded per run):
    // in pairs of vectors where runs are a multiple of 8 elements (256),
    // singly otherwise (132). Train normalizes with the batch's statistics,
    // eval with the running ones it left.
    for dtype in [DType::F16, DType::BF16] {
        for shape in [[2usize, 3, 16, 16], [2, 3, 12, 11]] {
            let c = shape[1];
            let n: usize = shape.iter().product();
            let x = stored(&normal(n, n as u64, 2.0, 3.0), dtype);
            let w = normal(c, 5, 1.0, 0.5);
            let b = normal(c, 6, 0.0, 1.0);
            let ctx = ctx();
            let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::torch_2d()).unwrap();
            bn.set_weight(Some(ctx.upload(&w, &[c]).unwrap())).unwrap();
            bn.set_bias(Some(ctx.upload(&b, &[c]).unwrap())).unwrap();
            let xt = ctx.upload_as(&x, &shape, dtype).unwrap();
            let view = View::batch_norm(&shape, 1);
            let train = ctx
                .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
                .unwrap();
            let want = reference::forward(&x, &view, false, 1e-5, Some(&w), Some(&b));
            assert_within_ulps(
                &format!("{dtype} train {shape:?}"),
                &train,
                &want,
                dtype,
                2.0,
            );
            let running = bn.running_stats().unwrap();
            let mean = ctx.download(&running.mean).unwrap();
            let var = ctx.download(&running.var).unwrap();
            let eval = ctx
                .download(&bn.forward(ctx, &xt, Mode::Eval).unwrap())
                .unwrap();
            let stats: Vec<(f64, f64)> = mean
                .iter()
                .zip(&var)
                .map(|(&m, &v)| (m as f64, v as f64))
                .collect();
            let want = reference::normalize(&x, &view, &stats, 1e-5, Some(&w), Some(&b));
            assert_within_ulps(&format!("{dtype} eval {shape:?}"), &eval, &want, dtype, 2.0);
        }
    }
}

#[test]
fn odd_row_lengths_keep_packed_words_whole() {
    for dtype in [DType::F16, DType::BF16] {
        // Odd rows go through the tiled path; the odd total pads the last word.
        let (got, want) = layer_norm(dtype, 7, 33, &normal(7 * 33, 4, 0.0, 2.0), None);
        assert_within_ulps(&format!("{dtype} 7x33"), &got, &want, dtype, 2.0);
    }
}

#[test]
fn f16_stores_overflow_to_infinity_and_keep_nan() {
    let len = 8;
    let mut x: Vec<f32> = (0..len).map(|i| i as f32).collect();
    x.extend([f32::NAN, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
    // γ = 1e5 pushes |y| beyond 65504 for most elements; one γ keeps y near
    // the f16 maximum.
    let mut w = vec![1e5f32; len];
    w[4] = 65504.0 / 0.2182;
    let (got, want) = layer_norm(DType::F16, 2, len, &x, Some(&w));
    let want16: Vec<f64> = want
        .iter()
        .map(|&v| half::f16::from_f64(v).to_f64())
        .collect();
    assert!(
        got[..len].iter().any(|v| v.is_infinite()),
        "expected overflow to inf: {got:?}"
    );
    assert_within_ulps("f16 overflow", &got[..len], &want16[..len], DType::F16, 1.0);
    assert!(
        got[len..].iter().all(|v| v.is_nan()),
        "a NaN poisons its row: {:?}",
        &got[len..]
    );
}

#[test]
fn f16_subnormal_outputs_round_correctly() {
    let len = 64;
    let x = normal(len * 4, 9, 0.0, 1.0);
    let w = vec![1e-6f32; len]; // |y| ~ 1e-6: f16 subnormals (below 6.1e-5)
    let (got, want) = layer_norm(DType::F16, 4, len, &x, Some(&w));
    let exact: Vec<f64> = want
        .iter()
        .map(|&v| half::f16::from_f64(v).to_f64())
        .collect();
    for (i, (&g, &e)) in got.iter().zip(&exact).enumerate() {
        let step = 2f64.powi(-24);
        assert!((g as f64 - e).abs() <= step, "[{i}] {g} vs {e}");
    }
}

#[test]
fn half_batch_norm_channels_last_matches_f64() {
    // 6 channels (not whole vectors) take the tiles and the flat
    // normalize; 8 channels the column kernels; 36 to 192 channels (5 or 6
    // vectors per lane of 8) rows walked by subgroups holding their columns
    // on lavapipe, and the GPU's strips on a context sized for one.
    for (ctx, dtype, shape) in [
        (ctx(), DType::BF16, [4usize, 5, 5, 6]),
        (ctx(), DType::BF16, [4, 5, 5, 8]),
        (ctx(), DType::BF16, [2, 5, 7, 192]),
        (ctx(), DType::F16, [2, 5, 7, 192]),
        // Held columns in pairs with dead pairs in some lanes (40 and 72
        // channels: 10 and 18 vectors), and singly (36 channels: 9).
        (ctx(), DType::F16, [2, 5, 7, 40]),
        (ctx(), DType::BF16, [2, 5, 7, 72]),
        (ctx(), DType::BF16, [2, 5, 7, 36]),
        (gpu_sized(), DType::F16, [2, 5, 7, 192]),
    ] {
        let c = shape[3];
        let n: usize = shape.iter().product();
        let offset = if dtype == DType::BF16 { 1e3 } else { 30.0 };
        let x = stored(&normal(n, 12, offset, 3.0), dtype);
        let mut bn = BatchNorm::new(ctx, c, BatchNormConfig::keras()).unwrap();
        let xt = ctx.upload_as(&x, &shape, dtype).unwrap();
        let y = ctx
            .download(&bn.forward(ctx, &xt, Mode::Train).unwrap())
            .unwrap();
        let want = reference::forward(&x, &View::batch_norm(&shape, 3), false, 1e-3, None, None);
        assert_within_ulps(
            &format!("{dtype} keras bn {shape:?}"),
            &y,
            &want,
            dtype,
            2.0,
        );
    }
}
