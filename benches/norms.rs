//! Forward of every op at the shapes of issue 7, timed on the device by
//! `gpunorm::timing` (timestamp queries where the adapter has them, wall
//! clock otherwise) and reported as bytes of the `gpunorm bench` byte model.
//!
//! ```sh
//! cargo bench --bench norms
//! ```
//!
//! lavapipe is slow (tens of ms a call), so each benchmark takes 10 flat
//! samples after a short warm-up, within a 2 s measurement time (criterion
//! picks the calls per sample).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use gpunorm::timing::{forward_bytes, Timer};
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Context, DType, GpuTensor, GroupNorm, GroupNormConfig,
    InstanceNorm, InstanceNormConfig, LayerNorm, Mode, Result, RmsNorm, RowNormConfig,
};

/// Deterministic values in [-1.5, 1.5) (xorshift).
fn data(n: usize) -> Vec<f32> {
    let mut s = 0x5eedu64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

type Record =
    Box<dyn FnMut(&Context, &mut wgpu::CommandEncoder, &GpuTensor, &GpuTensor) -> Result<()>>;

struct Case {
    name: String,
    shape: Vec<usize>,
    /// Parameter and running-statistics bytes of the byte model.
    extra_bytes: u64,
    record: Record,
}

fn affine_bytes(a: &Affine) -> u64 {
    a.weight.as_ref().map_or(0, |t| t.byte_len()) + a.bias.as_ref().map_or(0, |t| t.byte_len())
}

fn cases(ctx: &Context) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for (rows, len) in [(4096, 1024), (1024, 16384), (65536, 256)] {
        let mut ln = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm())?;
        cases.push(Case {
            name: format!("layer_norm/{rows}x{len}"),
            shape: vec![rows, len],
            extra_bytes: affine_bytes(ln.affine()),
            record: Box::new(move |ctx, e, x, y| ln.record(ctx, e, x, y).map(drop)),
        });
    }
    let mut rms = RmsNorm::new(ctx, &[4096], RowNormConfig::torch_rms_norm())?;
    cases.push(Case {
        name: "rms_norm/4096x4096".into(),
        shape: vec![4096, 4096],
        extra_bytes: affine_bytes(rms.affine()),
        record: Box::new(move |ctx, e, x, y| rms.record(ctx, e, x, y).map(drop)),
    });
    let running = 2 * 64 * 4; // running mean and var, f32
    for (layout, shape, config) in [
        ("nchw", vec![32, 64, 56, 56], BatchNormConfig::torch_2d()),
        (
            "channels_last",
            vec![32, 56, 56, 64],
            BatchNormConfig {
                axis: -1,
                ..BatchNormConfig::torch()
            },
        ),
    ] {
        for mode in [Mode::Train, Mode::Eval] {
            let mut bn = BatchNorm::new(ctx, 64, config.clone())?;
            // train: running stats read and written, counter read and written;
            // eval: running stats read.
            let stats = match mode {
                Mode::Train => 2 * running + 16,
                Mode::Eval => running,
            };
            cases.push(Case {
                name: format!(
                    "batch_norm_2d_{}/{layout}/32x64x56x56",
                    if mode == Mode::Train { "train" } else { "eval" }
                ),
                shape: shape.clone(),
                extra_bytes: affine_bytes(bn.affine()) + stats,
                record: Box::new(move |ctx, e, x, y| bn.record(ctx, e, x, y, mode).map(drop)),
            });
        }
    }
    let mut gn = GroupNorm::new(ctx, 32, 256, GroupNormConfig::torch())?;
    cases.push(Case {
        name: "group_norm_32_groups/8x256x32x32".into(),
        shape: vec![8, 256, 32, 32],
        extra_bytes: affine_bytes(gn.affine()),
        record: Box::new(move |ctx, e, x, y| gn.record(ctx, e, x, y).map(drop)),
    });
    let mut inorm = InstanceNorm::new(ctx, 64, InstanceNormConfig::torch())?;
    cases.push(Case {
        name: "instance_norm_2d/8x64x128x128".into(),
        shape: vec![8, 64, 128, 128],
        extra_bytes: affine_bytes(inorm.affine()),
        record: Box::new(move |ctx, e, x, y| inorm.record(ctx, e, x, y, Mode::Train).map(drop)),
    });
    Ok(cases)
}

fn forward(c: &mut Criterion) {
    let ctx = Context::new().expect("a wgpu adapter (run scripts/ensure-vulkan)");
    let timer = Timer::new(&ctx);
    let mut group = c.benchmark_group(format!("forward_{}", timer.clock().name()));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for mut case in cases(&ctx).expect("layers") {
        let n: usize = case.shape.iter().product();
        let x = ctx.upload(&data(n), &case.shape).expect("input");
        let y = ctx.zeros(&case.shape, DType::F32).expect("output");
        group.throughput(Throughput::Bytes(forward_bytes(
            n,
            DType::F32,
            0,
            case.extra_bytes,
        )));
        group.bench_function(&case.name, |b| {
            b.iter_custom(|iters| {
                let t = timer
                    .time(&ctx, 0, iters as usize, |e| (case.record)(&ctx, e, &x, &y))
                    .expect("timed run");
                Duration::from_secs_f64(t.samples_s.iter().sum())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
