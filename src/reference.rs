//! An f64 host reference of every forward pass, computed from the stored
//! inputs: the accuracy truth of SPEC.md §6 (the exact result, rounded once).

use crate::view::View;

/// Per-group (mean, biased variance) in f64, with exact two-pass sums.
pub fn group_stats(x: &[f32], view: &View, rms: bool) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(view.groups());
    for p in 0..view.p {
        for g in 0..view.g {
            let idx = |j: usize| ((p * view.a + j / view.b) * view.g + g) * view.b + j % view.b;
            let n = view.group_len();
            let mean = if rms {
                0.0
            } else {
                (0..n).map(|j| x[idx(j)] as f64).sum::<f64>() / n as f64
            };
            let var = (0..n)
                .map(|j| {
                    let d = x[idx(j)] as f64 - mean;
                    d * d
                })
                .sum::<f64>()
                / n as f64;
            out.push((mean, var));
        }
    }
    out
}

/// y = (x − mean)·rstd·γ + β from per-group statistics.
pub fn normalize(
    x: &[f32],
    view: &View,
    stats: &[(f64, f64)],
    eps: f64,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let b = i % view.b;
            let g = (i / view.b) % view.g;
            let p = i / (view.a * view.g * view.b);
            let (mean, var) = stats[p * view.g + g];
            let c = (g * view.b + b) / view.affine_div.max(1);
            let mut y = (v as f64 - mean) / (var + eps).sqrt();
            if let Some(w) = weight {
                y *= w[c] as f64;
            }
            if let Some(bb) = bias {
                y += bb[c] as f64;
            }
            y
        })
        .collect()
}

/// The whole forward with batch statistics.
pub fn forward(
    x: &[f32],
    view: &View,
    rms: bool,
    eps: f64,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let stats = group_stats(x, view, rms);
    normalize(x, view, &stats, eps, weight, bias)
}
