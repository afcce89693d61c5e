//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::OnceLock;

use gpunorm::Context;

/// One context per test binary: building pipelines is the slow part on
/// lavapipe, and the cache is shared.
pub fn ctx() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| Context::new().expect("a wgpu adapter (run scripts/ensure-vulkan)"))
}

/// A context that chooses and sizes kernels as for a GPU on whatever
/// adapter the machine has (`ContextOptions::size_for_gpu`): on lavapipe it
/// runs the kernels CI could not otherwise reach.
pub fn gpu_sized() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        Context::with_options(gpunorm::ContextOptions {
            size_for_gpu: true,
            ..Default::default()
        })
        .expect("a wgpu adapter (run scripts/ensure-vulkan)")
    })
}

/// Deterministic pseudo-random normal values (xorshift + Box-Muller).
pub fn normal(n: usize, seed: u64, mean: f32, std: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
            (mean as f64 + std as f64 * z) as f32
        })
        .collect()
}

/// Stored values of `dtype` as f32 (what the GPU actually reads).
pub fn stored(values: &[f32], dtype: gpunorm::DType) -> Vec<f32> {
    gpunorm::tensor::decode(&gpunorm::tensor::encode(values, dtype), dtype)
}

/// Largest |a − b| / (atol + rtol·|b|) over all elements; ≤ 1 passes.
pub fn worst(actual: &[f32], expected: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length");
    actual
        .iter()
        .zip(expected)
        .map(|(&a, &e)| {
            let a = a as f64;
            if (a.is_nan() && e.is_nan()) || a == e {
                0.0
            } else {
                let ratio = (a - e).abs() / (atol + rtol * e.abs());
                // A NaN where a number was expected (or the reverse) fails.
                if ratio.is_nan() {
                    f64::INFINITY
                } else {
                    ratio
                }
            }
        })
        .fold(0.0, f64::max)
}

pub fn assert_close(what: &str, actual: &[f32], expected: &[f64], atol: f64, rtol: f64) {
    let w = worst(actual, expected, atol, rtol);
    assert!(
        w <= 1.0,
        "{what}: error is {w}x the tolerance (atol {atol}, rtol {rtol})"
    );
}

/// A LayerNorm of `config` (γ = 1, β = 0) over rows of `len` on `ctx`, read
/// back.
pub fn layer_norm_on(
    ctx: &Context,
    x: &[f32],
    rows: usize,
    len: usize,
    config: gpunorm::RowNormConfig,
) -> Vec<f32> {
    let mut ln = gpunorm::LayerNorm::new(ctx, &[len], config).unwrap();
    let xt = ctx.upload(x, &[rows, len]).unwrap();
    ctx.download(&ln.forward(ctx, &xt, gpunorm::Mode::Train).unwrap())
        .unwrap()
}

/// The f64 reference of a LayerNorm without affine over rows of `len`.
pub fn layer_norm_reference(x: &[f32], rows: usize, len: usize, eps: f64) -> Vec<f64> {
    let view = gpunorm::View::layer_norm(&[rows, len], len);
    gpunorm::reference::forward(x, &view, false, eps, None, None)
}

/// Asserts that a LayerNorm/RMSNorm forward of `rows` rows of `len` takes
/// the subgroup row kernel four rows per step on `ctx` when it is a CPU
/// adapter with subgroups (lavapipe), the case the callers mean to cover;
/// other adapters plan other kernels for the same rows.
pub fn assert_four_rows_per_step_on_a_cpu(ctx: &Context, rows: usize, len: usize) {
    let caps = ctx.caps();
    if !(caps.cpu && caps.subgroups) {
        return;
    }
    let view = gpunorm::View::layer_norm(&[rows, len], len);
    let spec = gpunorm::engine::ForwardSpec {
        view,
        dtype: gpunorm::DType::F32,
        rms: false,
        eps: 1e-5,
        source: gpunorm::engine::StatsSource::Batch,
        update: None,
        bump_counter: false,
        empty_batch_nan: false,
        zero_rstd: false,
    };
    let chunks = gpunorm::engine::Chunks::whole(view.numel());
    let plan = gpunorm::engine::plan_forward_chunked(&spec, &chunks, &caps);
    assert!(
        plan.iter()
            .all(|d| d.kernel == gpunorm::kernels::Kernel::RowsSubgroup),
        "{rows}x{len}: {plan:?}"
    );
    assert_eq!(
        gpunorm::engine::rows_per_step(&view, &caps),
        4,
        "{rows}x{len}"
    );
}
