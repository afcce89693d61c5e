//! `gpunorm demo`: every op at a default size on the chosen adapter, checked
//! against the f64 host reference, with time and bandwidth.

use std::process::ExitCode;
use std::time::Instant;

use gpunorm::{
    reference, BatchNorm, BatchNormConfig, Context, ContextOptions, DType, GpuTensor, GroupNorm,
    GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, Result, RmsNorm,
    RowNormConfig, View,
};

use crate::bench::data;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Use the adapter whose name contains this.
    #[arg(long, value_name = "S")]
    pub adapter: Option<String>,
    /// Timed repetitions per op (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
}

/// One op's forward on an input, with its layer captured.
type ForwardFn = Box<dyn FnMut(&Context, &GpuTensor) -> Result<GpuTensor>>;

struct Case {
    op: &'static str,
    shape: Vec<usize>,
    view: View,
    rms: bool,
    eps: f32,
    run: ForwardFn,
}

fn cases(ctx: &Context) -> Result<Vec<Case>> {
    let mut bn = BatchNorm::new(ctx, 64, BatchNormConfig::torch_2d())?;
    let mut ln = LayerNorm::new(ctx, &[1024], RowNormConfig::torch_layer_norm())?;
    let mut rms = RmsNorm::new(ctx, &[1024], RowNormConfig::torch_rms_norm())?;
    let mut inorm = InstanceNorm::new(ctx, 32, InstanceNormConfig::torch())?;
    let mut gn = GroupNorm::new(ctx, 8, 64, GroupNormConfig::torch())?;
    let bn_shape = vec![16, 64, 32, 32];
    let in_shape = vec![8, 32, 64, 64];
    let gn_shape = vec![8, 64, 32, 32];
    Ok(vec![
        Case {
            op: "batch-norm (train)",
            view: View::batch_norm(&bn_shape, 1),
            shape: bn_shape,
            rms: false,
            eps: 1e-5,
            run: Box::new(move |ctx, x| bn.forward(ctx, x, Mode::Train)),
        },
        Case {
            op: "layer-norm",
            shape: vec![1024, 1024],
            view: View::layer_norm(&[1024, 1024], 1024),
            rms: false,
            eps: 1e-5,
            run: Box::new(move |ctx, x| ln.forward(ctx, x, Mode::Train)),
        },
        Case {
            op: "rms-norm",
            shape: vec![1024, 1024],
            view: View::layer_norm(&[1024, 1024], 1024),
            rms: true,
            eps: f32::EPSILON,
            run: Box::new(move |ctx, x| rms.forward(ctx, x, Mode::Train)),
        },
        Case {
            op: "instance-norm",
            view: View::instance_norm(&in_shape),
            shape: in_shape,
            rms: false,
            eps: 1e-5,
            run: Box::new(move |ctx, x| inorm.forward(ctx, x, Mode::Train)),
        },
        Case {
            op: "group-norm (8 groups)",
            view: View::group_norm(&gn_shape, 8),
            shape: gn_shape,
            rms: false,
            eps: 1e-5,
            run: Box::new(move |ctx, x| gn.forward(ctx, x)),
        },
    ])
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let ctx = Context::with_options(ContextOptions {
        adapter_name: args.adapter.clone(),
        ..Default::default()
    })?;
    let adapter = ctx
        .adapter()
        .map(|a| format!("{} ({}, {})", a.name, a.backend, a.device_type))
        .unwrap_or_default();
    outln!("adapter: {adapter}")?;
    outln!(
        "{:<22} {:<18} {:<5} {:>12} {:>10} {:>9}  check",
        "op",
        "shape",
        "dtype",
        "max error",
        "time ms",
        "GB/s"
    )?;
    let mut failures = 0;
    for (i, mut case) in cases(&ctx)?.into_iter().enumerate() {
        let n: usize = case.shape.iter().product();
        let host = data(n, 0x5eed + i as u64, 100.0);
        let x = ctx.upload(&host, &case.shape)?;
        let y = (case.run)(&ctx, &x)?;
        let got = ctx.download(&y)?;
        let mut times = Vec::new();
        for _ in 0..args.iters.max(1) {
            let start = Instant::now();
            let y = (case.run)(&ctx, &x)?;
            ctx.device()
                .poll(gpunorm::wgpu::PollType::wait_indefinitely())
                .map_err(|e| gpunorm::Error::Device(e.to_string()))?;
            times.push(start.elapsed().as_secs_f64());
            drop(y);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let expected = reference::forward(&host, &case.view, case.rms, case.eps as f64, None, None);
        let max_err = worst(
            got.iter()
                .zip(&expected)
                .map(|(&g, &e)| (g as f64 - e).abs()),
        );
        // SPEC.md §6: 1e-5·(1 + |y|) on unit-scale data; the offset of 100
        // costs ~3 more bits, so allow 1e-4.
        let tolerance = 1e-4 * (1.0 + expected.iter().fold(0.0f64, |m, v| m.max(v.abs())));
        let ok = max_err <= tolerance;
        if !ok {
            failures += 1;
        }
        let gbps = (2 * n * 4) as f64 / median / 1e9;
        outln!(
            "{:<22} {:<18} {:<5} {:>12.3e} {:>10.3} {:>9.2}  {}",
            case.op,
            format!("{:?}", case.shape),
            "f32",
            max_err,
            median * 1e3,
            gbps,
            if ok { "ok" } else { "FAILED" }
        )?;
    }
    failures += extra_checks(&ctx)?;
    if failures > 0 {
        outln!("{failures} op(s) out of tolerance")?;
        return Ok(ExitCode::FAILURE);
    }
    outln!("all ops within tolerance of the f64 reference (time: wall clock of forward incl. submit and wait)")?;
    Ok(ExitCode::SUCCESS)
}

/// Half-precision storage and the backward pass, checked the same way: a
/// LayerNorm in f16 (within 2 ulp of the f64 result rounded once, SPEC §6)
/// and the backward of LayerNorm and BatchNorm (within 5e-4 + 1e-3·|ref| of
/// the f64 autograd result). Returns how many are out of tolerance.
fn extra_checks(ctx: &Context) -> Result<usize> {
    let mut failures = 0;
    let mut report = |what: &str, shape: &[usize], dtype: &str, err: f64, ok: bool| -> Result<()> {
        if !ok {
            failures += 1;
        }
        outln!(
            "{:<22} {:<18} {:<5} {:>12.3e} {:>10} {:>9}  {}",
            what,
            format!("{shape:?}"),
            dtype,
            err,
            "-",
            "-",
            if ok { "ok" } else { "FAILED" }
        )
    };

    // f16 storage: stored inputs, f64 reference, at most 2 ulp.
    let shape = [1024, 1024];
    let host: Vec<f32> = data(1 << 20, 0xf16, 100.0)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let x = ctx.upload_as(&host, &shape, DType::F16)?;
    let mut ln = LayerNorm::new(ctx, &[1024], RowNormConfig::torch_layer_norm())?;
    let got = ctx.download(&ln.forward(ctx, &x, Mode::Train)?)?;
    let view = View::layer_norm(&shape, 1024);
    let want = reference::forward(&host, &view, false, 1e-5, None, None);
    let ulps = worst(got.iter().zip(&want).map(|(&g, &w)| {
        let ulp = 2f64.powi(w.abs().max(2f64.powi(-14)).log2().floor() as i32 - 10);
        (g as f64 - w).abs() / ulp
    }));
    report("layer-norm, in ulp", &shape, "f16", ulps, ulps <= 2.0)?;

    // Backward passes against f64 autograd.
    let dy_host = data(1 << 20, 0xd1, 0.0);
    let x = ctx.upload(&data(1 << 20, 0xb1, 3.0), &shape)?;
    let x_host = ctx.download(&x)?;
    let dy = ctx.upload(&dy_host, &shape)?;
    ln.forward(ctx, &x, Mode::Train)?;
    let grads = ln.backward(ctx, &dy)?;
    let want = reference::backward(
        &x_host,
        &dy_host,
        &view,
        false,
        1e-5,
        Some(&vec![1.0; 1024]),
        None,
    );
    let err = grad_error(&ctx.download(&grads.grad_input)?, &want.grad_input);
    report("layer-norm bwd, /tol", &shape, "f32", err, err <= 1.0)?;

    let bn_shape = [16, 64, 32, 32];
    let mut bn = BatchNorm::new(ctx, 64, BatchNormConfig::torch_2d())?;
    let x = ctx.upload(&x_host, &bn_shape)?;
    let dy = ctx.upload(&dy_host, &bn_shape)?;
    bn.forward(ctx, &x, Mode::Train)?;
    let grads = bn.backward(ctx, &dy)?;
    let bn_view = View::batch_norm(&bn_shape, 1);
    let want = reference::backward(
        &x_host,
        &dy_host,
        &bn_view,
        false,
        1e-5,
        Some(&vec![1.0; 64]),
        None,
    );
    let err = grad_error(&ctx.download(&grads.grad_input)?, &want.grad_input);
    report("batch-norm bwd, /tol", &bn_shape, "f32", err, err <= 1.0)?;
    Ok(failures)
}

/// Largest |got − want| / (5e-4 + 1e-3·|want|): at most 1 passes.
fn grad_error(got: &[f32], want: &[f64]) -> f64 {
    worst(
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs() / (5e-4 + 1e-3 * w.abs())),
    )
}

/// The largest error, a NaN counting as infinitely wrong (f64::max would
/// skip it and report a NaN output as in tolerance).
fn worst(errors: impl Iterator<Item = f64>) -> f64 {
    errors
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .fold(0.0, f64::max)
}
