//! LayerNorm and RMSNorm forward against the f64 host reference.

mod common;
use common::{
    assert_close, assert_four_rows_per_step_on_a_cpu, ctx, layer_norm_on, layer_norm_reference,
    normal,
};
use gpunorm::{reference, LayerNorm, Mode, RmsNorm, RowNormConfig, View};

fn layer_norm_matches_reference(rows: usize, len: usize, offset: f32, atol: f64, rtol: f64) {
    let ctx = ctx();
    let x = normal(rows * len, (rows * 31 + len) as u64, offset, 1.0);
    let w = normal(len, 7, 1.0, 0.5);
    let b = normal(len, 8, 0.0, 0.5);
    let mut ln = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_weight(Some(ctx.upload(&w, &[len]).unwrap()))
        .unwrap();
    ln.set_bias(Some(ctx.upload(&b, &[len]).unwrap())).unwrap();
    let xt = ctx.upload(&x, &[rows, len]).unwrap();
    let y = ctx
        .download(&ln.forward(ctx, &xt, Mode::Train).unwrap())
        .unwrap();
    let expected = reference::forward(
        &x,
        &View::layer_norm(&[rows, len], len),
        false,
        1e-5,
        Some(&w),
        Some(&b),
    );
    assert_close(
        &format!("layer norm {rows}x{len} offset {offset}"),
        &y,
        &expected,
        atol,
        rtol,
    );
}

#[test]
fn layer_norm_short_rows_match_f64() {
    layer_norm_matches_reference(3000, 8, 0.0, 1e-5, 1e-5);
}

#[test]
fn layer_norm_rows_of_1024_match_f64() {
    layer_norm_matches_reference(64, 1024, 0.0, 1e-5, 1e-5);
}

#[test]
fn layer_norm_large_offset_rows_stay_within_1e_3() {
    layer_norm_matches_reference(64, 1024, 1e4, 1e-3, 0.0);
}

#[test]
fn layer_norm_rows_walked_four_at_a_time_with_a_partial_last_step_match_f64() {
    // With 64 rows or more, too long to hold (over 1024 elements on
    // lavapipe), the subgroup row kernel walks rows four at a time; 67 rows
    // leave a last step of three (it repeats the last row), 65 rows one,
    // and 257 vectors per row leave lanes idle at each row's end.
    for (rows, len) in [(67, 2048), (65, 1028)] {
        assert_four_rows_per_step_on_a_cpu(ctx(), rows, len);
        layer_norm_matches_reference(rows, len, 1.0, 1e-5, 1e-5);
    }
}

#[test]
fn layer_norm_rows_held_in_registers_match_f64() {
    // Lavapipe's subgroups of 8 hold rows of up to 1024 elements, at most
    // 32 vectors per lane in four octets: rows of 20 leave three lanes
    // idle; rows of 100, 252 and 1020 a last slot that only some lanes
    // fill, in the first, the first and the last octet.
    for (rows, len) in [
        (129, 20),
        (70, 100),
        (33, 252),
        (16, 4),
        (9, 1020),
        (40, 520),
    ] {
        layer_norm_matches_reference(rows, len, 2.0, 1e-5, 1e-5);
    }
    // The held mean is corrected by the mean of x − mean: a common offset
    // of 1e4 costs no digits (without the correction the error is ~1e-3).
    layer_norm_matches_reference(300, 256, 1e4, 1e-5, 1e-5);
}

#[test]
fn held_rows_without_affine_parameters_match_f64() {
    let ctx = ctx();
    let (rows, len) = (40, 128);
    let x = normal(rows * len, 11, -3.0, 2.0);
    let expected = layer_norm_reference(&x, rows, len, 1e-5);
    for (weight, bias) in [(false, false), (true, false)] {
        let config = RowNormConfig {
            weight,
            bias,
            ..RowNormConfig::torch_layer_norm()
        };
        let y = layer_norm_on(ctx, &x, rows, len, config);
        assert_close(
            &format!("weight {weight} bias {bias}"),
            &y,
            &expected,
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn layer_norm_rows_of_70000_use_the_tiled_path_and_match_f64() {
    layer_norm_matches_reference(2, 70_000, 0.0, 1e-5, 1e-5);
}

#[test]
fn layer_norm_odd_rows_match_f64() {
    layer_norm_matches_reference(7, 333, 3.0, 1e-5, 1e-5);
}

#[test]
fn layer_norm_constant_row_gives_bias_exactly() {
    let ctx = ctx();
    // Rows of 16384 take the subgroup row kernel on lavapipe, whose shift
    // is rounded to a grid (coarse_shift): a constant row must keep its own
    // value as the shift, or x − shift of 3.3e20 squares past f32's range.
    for (len, value) in [(16, 10000.3f32), (16384, 10000.3), (16384, 3.3e20)] {
        let mut ln = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
        let b: Vec<f32> = (0..len).map(|i| (i % 16) as f32 * 0.25).collect();
        ln.set_bias(Some(ctx.upload(&b, &[len]).unwrap())).unwrap();
        let x = ctx.upload(&vec![value; 2 * len], &[2, len]).unwrap();
        let y = ctx
            .download(&ln.forward(ctx, &x, Mode::Train).unwrap())
            .unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, b[i % len], "rows of {len} of {value}, element {i}");
        }
    }
}

#[test]
fn rms_norm_matches_f64() {
    let ctx = ctx();
    // 66 rows of 2048: four at a time on lavapipe, with a last step of two.
    for (rows, len) in [(33, 96), (66, 2048)] {
        if rows == 66 {
            assert_four_rows_per_step_on_a_cpu(ctx, rows, len);
        }
        let x = normal(rows * len, 5, 0.5, 2.0);
        let w = normal(len, 6, 1.0, 0.3);
        let mut rms = RmsNorm::new(ctx, &[len], RowNormConfig::torch_rms_norm()).unwrap();
        rms.set_weight(Some(ctx.upload(&w, &[len]).unwrap()))
            .unwrap();
        let xt = ctx.upload(&x, &[rows, len]).unwrap();
        let y = ctx
            .download(&rms.forward(ctx, &xt, Mode::Train).unwrap())
            .unwrap();
        let expected = reference::forward(
            &x,
            &View::layer_norm(&[rows, len], len),
            true,
            f32::EPSILON as f64,
            Some(&w),
            None,
        );
        assert_close("rms norm", &y, &expected, 1e-5, 1e-5);
    }
}

#[test]
fn workgroup_memory_row_kernel_matches_f64_where_subgroups_are_disabled() {
    // Lavapipe has subgroups, so the default context runs the subgroup row
    // kernel; this one runs the workgroup-memory fallback on the same data.
    let ctx = gpunorm::Context::with_options(gpunorm::ContextOptions {
        disable_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for (rows, len, offset) in [(64, 1024, 1e4f32), (300, 8, 0.0), (5, 4096, 3.0)] {
        let x = normal(rows * len, len as u64, offset, 1.0);
        let y = layer_norm_on(&ctx, &x, rows, len, RowNormConfig::torch_layer_norm());
        let expected = layer_norm_reference(&x, rows, len, 1e-5);
        assert_close("workgroup row kernel", &y, &expected, 1e-4, 1e-5);
    }
}
