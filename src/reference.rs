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

/// Gradients of the f64 reference backward (SPEC.md §4).
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardReference {
    /// ∂L/∂x for L = Σ y·dy.
    pub grad_input: Vec<f64>,
    /// ∂L/∂γ per affine index (`Σ dy·x̂`), computed whether or not γ exists.
    pub grad_weight: Vec<f64>,
    /// ∂L/∂β per affine index (`Σ dy`).
    pub grad_bias: Vec<f64>,
}

/// Forward in f64 from f64 inputs (for finite differences of
/// [`backward`]): batch statistics, or `running` (mean, var) per channel g
/// as constants.
pub fn forward_f64(
    x: &[f64],
    view: &View,
    rms: bool,
    eps: f64,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    running: Option<(&[f64], &[f64])>,
) -> Vec<f64> {
    let stats = stats_f64(x, view, rms, running);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let (group, c) = locate(view, i);
            let (mean, var) = stats[group];
            let mut y = (v - mean) / (var + eps).sqrt();
            if let Some(w) = weight {
                y *= w[c];
            }
            if let Some(b) = bias {
                y += b[c];
            }
            y
        })
        .collect()
}

/// (stats group, affine index) of flat element `i`.
fn locate(view: &View, i: usize) -> (usize, usize) {
    let b = i % view.b;
    let g = (i / view.b) % view.g;
    let p = i / (view.a * view.g * view.b);
    (p * view.g + g, (g * view.b + b) / view.affine_div.max(1))
}

fn stats_f64(
    x: &[f64],
    view: &View,
    rms: bool,
    running: Option<(&[f64], &[f64])>,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(view.groups());
    for p in 0..view.p {
        for g in 0..view.g {
            if let Some((rm, rv)) = running {
                out.push((rm[g], rv[g]));
                continue;
            }
            let idx = |j: usize| ((p * view.a + j / view.b) * view.g + g) * view.b + j % view.b;
            let n = view.group_len();
            let mean = if rms {
                0.0
            } else {
                (0..n).map(|j| x[idx(j)]).sum::<f64>() / n as f64
            };
            let var = (0..n).map(|j| (x[idx(j)] - mean).powi(2)).sum::<f64>() / n as f64;
            out.push((mean, var));
        }
    }
    out
}

/// The backward pass in f64 (SPEC.md §4) from f64 inputs: batch statistics
/// (`dx = rstd/n·(n·g − Σg − x̂·Σg·x̂)`; RMS without the `Σg` term), or
/// `running` (mean, var) per channel as constants (`dx = g·rstd`).
pub fn backward_f64(
    x: &[f64],
    dy: &[f64],
    view: &View,
    rms: bool,
    eps: f64,
    weight: Option<&[f64]>,
    running: Option<(&[f64], &[f64])>,
) -> BackwardReference {
    let stats = stats_f64(x, view, rms, running);
    let rstd: Vec<f64> = stats.iter().map(|&(_, v)| 1.0 / (v + eps).sqrt()).collect();
    let xhat = |i: usize| {
        let (group, _) = locate(view, i);
        (x[i] - stats[group].0) * rstd[group]
    };
    let gamma = |c: usize| weight.map_or(1.0, |w| w[c]);
    let mut sum_g = vec![0.0; view.groups()];
    let mut sum_gx = vec![0.0; view.groups()];
    let mut grad_weight = vec![0.0; view.affine_len];
    let mut grad_bias = vec![0.0; view.affine_len];
    for (i, &d) in dy.iter().enumerate() {
        let (group, c) = locate(view, i);
        let g = d * gamma(c);
        let xh = xhat(i);
        sum_g[group] += g;
        sum_gx[group] += g * xh;
        grad_weight[c] += d * xh;
        grad_bias[c] += d;
    }
    let n = view.group_len() as f64;
    let grad_input = (0..x.len())
        .map(|i| {
            let (group, c) = locate(view, i);
            let g = dy[i] * gamma(c);
            let r = rstd[group];
            if running.is_some() {
                g * r
            } else if rms {
                r / n * (n * g - xhat(i) * sum_gx[group])
            } else {
                r / n * (n * g - sum_g[group] - xhat(i) * sum_gx[group])
            }
        })
        .collect();
    BackwardReference {
        grad_input,
        grad_weight,
        grad_bias,
    }
}

/// [`backward_f64`] from the stored f32 inputs: the accuracy truth of the
/// GPU backward.
pub fn backward(
    x: &[f32],
    dy: &[f32],
    view: &View,
    rms: bool,
    eps: f64,
    weight: Option<&[f32]>,
    running: Option<(&[f32], &[f32])>,
) -> BackwardReference {
    let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    let weight = weight.map(wide);
    let running = running.map(|(m, v)| (wide(m), wide(v)));
    backward_f64(
        &wide(x),
        &wide(dy),
        view,
        rms,
        eps,
        weight.as_deref(),
        running.as_ref().map(|(m, v)| (m.as_slice(), v.as_slice())),
    )
}
