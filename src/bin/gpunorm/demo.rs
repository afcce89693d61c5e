//! `gpunorm demo`: every op at a default size on the chosen adapter, checked
//! against the f64 host reference, with time and bandwidth.

use std::process::ExitCode;
use std::time::Instant;

use gpunorm::{
    reference, BatchNorm, BatchNormConfig, Context, ContextOptions, GpuTensor, GroupNorm,
    GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, Result, RmsNorm,
    RowNormConfig, View,
};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Use the adapter whose name contains this.
    #[arg(long, value_name = "S")]
    pub adapter: Option<String>,
    /// Timed repetitions per op (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
}

/// Deterministic inputs with a common offset, so the check covers the
/// large-mean case that naive kernels get wrong.
fn data(n: usize, seed: u64, offset: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            offset + ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
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
    println!("adapter: {adapter}");
    println!(
        "{:<22} {:<18} {:<5} {:>12} {:>10} {:>9}  check",
        "op", "shape", "dtype", "max error", "time ms", "GB/s"
    );
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
        let max_err = got
            .iter()
            .zip(&expected)
            .map(|(&g, &e)| (g as f64 - e).abs())
            .fold(0.0, f64::max);
        // SPEC.md §6: 1e-5·(1 + |y|) on unit-scale data; the offset of 100
        // costs ~3 more bits, so allow 1e-4.
        let tolerance = 1e-4 * (1.0 + expected.iter().fold(0.0f64, |m, v| m.max(v.abs())));
        let ok = max_err <= tolerance;
        if !ok {
            failures += 1;
        }
        let gbps = (2 * n * 4) as f64 / median / 1e9;
        println!(
            "{:<22} {:<18} {:<5} {:>12.3e} {:>10.3} {:>9.2}  {}",
            case.op,
            format!("{:?}", case.shape),
            "f32",
            max_err,
            median * 1e3,
            gbps,
            if ok { "ok" } else { "FAILED" }
        );
    }
    if failures > 0 {
        println!("{failures} op(s) out of tolerance");
        return Ok(ExitCode::FAILURE);
    }
    println!("all ops within tolerance of the f64 reference (time: wall clock of forward incl. submit and wait)");
    Ok(ExitCode::SUCCESS)
}
