//! Porting BatchNorm between Keras and PyTorch: the same data through a
//! Keras-convention and a torch-convention layer, what differs, and how to
//! configure one to reproduce the other.
//!
//! * momentum: torch's is the weight of the *new* batch statistic
//!   (`new = (1 − m)·old + m·batch`, default 0.1); Keras's is the weight of
//!   the *old* value (`new = m·old + (1 − m)·batch`, default 0.99). torch
//!   `momentum = m` is Keras `momentum = 1 − m`.
//! * epsilon: torch 1e-5, Keras 1e-3.
//! * running variance: torch updates it with the unbiased batch variance
//!   (÷ (n − 1)), Keras with the biased one (÷ n); both normalize the batch
//!   with the biased one. No setting of either framework changes this, so a
//!   ported running variance differs by `m · (var_unbiased − var_biased)`
//!   per step, which you can convert exactly.
//! * layout: Keras is channels-last (`axis = -1`), torch channels-first.
//!
//! ```sh
//! cargo run --example keras_port
//! ```

use gpunorm::{BatchNorm, BatchNormConfig, Context, Mode};

const N: usize = 8;
const H: usize = 5;
const W: usize = 5;
const C: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run()
}

/// Deterministic NHWC data, channel c around 2·c with spread 1 + c.
fn nhwc() -> Vec<f32> {
    let mut s = 0x9e3779b97f4a7c15u64;
    (0..N * H * W * C)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let c = (i % C) as f32;
            2.0 * c + (1.0 + c) * ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

/// NHWC → NCHW on the host (what a ported model's first layer sees).
fn to_nchw(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for n in 0..N {
        for h in 0..H {
            for w in 0..W {
                for c in 0..C {
                    y[((n * C + c) * H + h) * W + w] = x[((n * H + h) * W + w) * C + c];
                }
            }
        }
    }
    y
}

/// Largest |a − b|; a NaN counts as infinitely far (f32::max would skip it).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// Output, running mean and running variance after one train step.
type Step = (Vec<f32>, Vec<f32>, Vec<f32>);

/// One train step of a fresh layer.
fn step(
    ctx: &Context,
    config: BatchNormConfig,
    data: &[f32],
    shape: &[usize],
) -> Result<Step, gpunorm::Error> {
    let mut bn = BatchNorm::new(ctx, C, config)?;
    let x = ctx.upload(data, shape)?;
    let y = ctx.download(&bn.forward(ctx, &x, Mode::Train)?)?;
    let r = bn.running_stats().expect("tracked");
    Ok((y, ctx.download(&r.mean)?, ctx.download(&r.var)?))
}

fn show(name: &str, v: &[f32]) {
    let v: Vec<String> = v.iter().map(|x| format!("{x:.5}")).collect();
    println!("  {name:<22} [{}]", v.join(", "));
}

pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::new()?;
    let x_nhwc = nhwc();
    let x_nchw = to_nchw(&x_nhwc);
    let n = (N * H * W) as f32; // values per channel

    // 1. Each framework's defaults on the same batch.
    let keras = BatchNormConfig::keras(); // momentum 0.99, eps 1e-3, axis -1
    let torch = BatchNormConfig::torch_2d(); // momentum 0.1, eps 1e-5, axis 1
    let (ky, kmean, kvar) = step(&ctx, keras.clone(), &x_nhwc, &[N, H, W, C])?;
    let (ty, tmean, tvar) = step(&ctx, torch.clone(), &x_nchw, &[N, C, H, W])?;
    println!("defaults, one train step on the same {N}x{H}x{W}x{C} batch:");
    println!(
        "  Keras: momentum {:?} (weight of the old value), epsilon {}",
        keras.momentum, keras.eps
    );
    println!(
        "  torch: momentum {:?} (weight of the new value), eps {}",
        torch.momentum, torch.eps
    );
    show("Keras moving_mean", &kmean);
    show("torch running_mean", &tmean);
    show("Keras moving_variance", &kvar);
    show("torch running_var", &tvar);
    println!(
        "  outputs differ by up to {:.2e} (epsilon 1e-3 vs 1e-5)",
        max_diff(&ky, &to_nhwc_from(&ty))
    );

    // 2. torch configured to reproduce Keras: momentum 1 − 0.99, eps 1e-3.
    let torch_as_keras = BatchNormConfig {
        momentum: Some(1.0 - keras.momentum.unwrap_or(0.99)),
        eps: keras.eps,
        ..BatchNormConfig::torch_2d()
    };
    let (cy, cmean, cvar) = step(&ctx, torch_as_keras.clone(), &x_nchw, &[N, C, H, W])?;
    let m = torch_as_keras.momentum.unwrap_or(0.01);
    // torch's unbiased update → Keras's biased one: the batch part of the
    // update is m·var_u; Keras adds m·var_b = m·var_u·(n−1)/n. Recover var_u
    // from torch's update (init 1): var_u = (running_var − (1 − m)) / m.
    let converted: Vec<f32> = cvar
        .iter()
        .map(|&rv| {
            let var_u = (rv - (1.0 - m)) / m;
            (1.0 - m) + m * var_u * (n - 1.0) / n
        })
        .collect();
    let out_diff = max_diff(&ky, &to_nhwc_from(&cy));
    let mean_diff = max_diff(&kmean, &cmean);
    let raw_var_diff = max_diff(&kvar, &cvar);
    let var_diff = max_diff(&kvar, &converted);
    println!(
        "\ntorch with momentum = 1 − {} = {m:.2}, eps = {}:",
        keras.momentum.unwrap_or(0.99),
        torch_as_keras.eps
    );
    println!("  output       max |Keras − torch| = {out_diff:.2e}");
    println!("  running mean max |Keras − torch| = {mean_diff:.2e}");
    println!("  running var  max |Keras − torch| = {raw_var_diff:.2e} (torch's is unbiased: ÷ (n−1) = ÷ {})", n - 1.0);
    show("torch running_var", &cvar);
    show("converted to biased", &converted);
    show("Keras moving_variance", &kvar);
    println!("  after the (n−1)/n conversion:     {var_diff:.2e}");

    // 3. Keras configured to reproduce torch's layer on NCHW data: axis 1,
    // momentum 1 − 0.1, epsilon 1e-5. Outputs and means agree; the variance
    // again differs by the biased/unbiased rule only.
    let keras_as_torch = BatchNormConfig {
        axis: 1,
        momentum: Some(1.0 - torch.momentum.unwrap_or(0.1)),
        eps: torch.eps,
        ..BatchNormConfig::keras()
    };
    let (ry, rmean, rvar) = step(&ctx, keras_as_torch, &x_nchw, &[N, C, H, W])?;
    let unbiased: Vec<f32> = rvar
        .iter()
        .map(|&mv| {
            let m = 0.1f32;
            let var_b = (mv - (1.0 - m)) / m;
            (1.0 - m) + m * var_b * n / (n - 1.0)
        })
        .collect();
    let back_out = max_diff(&ry, &ty);
    let back_mean = max_diff(&rmean, &tmean);
    let back_var = max_diff(&unbiased, &tvar);
    println!(
        "\nKeras with axis=1, momentum = 1 − 0.1 = 0.9, epsilon = 1e-5, on torch's NCHW data:"
    );
    println!("  output       max |torch − Keras| = {back_out:.2e}");
    println!("  running mean max |torch − Keras| = {back_mean:.2e}");
    println!("  running var  after n/(n−1):       {back_var:.2e}");

    let tol = 1e-5;
    for (what, d) in [
        ("output", out_diff),
        ("running mean", mean_diff),
        ("converted running var", var_diff),
        ("output (keras as torch)", back_out),
        ("running mean (keras as torch)", back_mean),
        ("converted running var (keras as torch)", back_var),
    ] {
        if d > tol {
            return Err(format!("{what} differs by {d:.2e} after the conversion").into());
        }
    }
    if raw_var_diff < 1e-4 {
        return Err("expected torch's unbiased running var to differ from Keras's".into());
    }
    println!("\nall agree within {tol:e} after the conversion");
    Ok(())
}

/// NCHW → NHWC, to compare outputs element by element.
fn to_nhwc_from(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for n in 0..N {
        for c in 0..C {
            for h in 0..H {
                for w in 0..W {
                    y[((n * H + h) * W + w) * C + c] = x[((n * C + c) * H + h) * W + w];
                }
            }
        }
    }
    y
}
