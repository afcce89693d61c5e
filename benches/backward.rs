//! Criterion benches of each op's backward pass (SPEC.md §4) at the sizes of
//! the performance table. One iteration records the backward of a saved
//! forward into an encoder, submits it and waits for the device.
//!
//! Throughput counts x and dy read once and grad_input written once. The
//! time is the host's clock around recording, submitting and waiting, so
//! it includes the submission and the fence: its GB/s are lower bounds, not
//! comparable with a copy kernel's on a fast GPU (`gpunorm bench --backward`
//! times the device). Sample sizes are small: lavapipe takes a fair
//! fraction of a second per call at these sizes.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Context, GpuTensor, GroupNorm, GroupNormConfig,
    InstanceNorm, InstanceNormConfig, LayerNorm, Mode, RmsNorm, RowNormConfig,
};

fn values(n: usize, seed: u32) -> Vec<f32> {
    // Cheap deterministic values in [-2, 2): the bench measures bandwidth,
    // not accuracy.
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            (h >> 8) as f32 / (1u32 << 22) as f32 - 2.0
        })
        .collect()
}

fn tensor(ctx: &Context, shape: &[usize], seed: u32) -> GpuTensor {
    let n = shape.iter().product();
    ctx.upload(&values(n, seed), shape).expect("upload")
}

/// Runs `backward` (which records into the encoder) once per iteration.
fn bench_op(
    c: &mut Criterion,
    ctx: &Context,
    name: &str,
    shape: &[usize],
    mut backward: impl FnMut(&mut gpunorm::wgpu::CommandEncoder),
) {
    let numel: usize = shape.iter().product();
    let mut group = c.benchmark_group("backward");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(3 * 4 * numel as u64));
    let label = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x");
    group.bench_function(BenchmarkId::new(name, label), |b| {
        b.iter(|| {
            let mut encoder = ctx
                .device()
                .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
            backward(&mut encoder);
            ctx.submit_and_wait(encoder).expect("submit");
        })
    });
    group.finish();
}

fn affine(ctx: &Context, len: usize, bias: bool) -> Affine {
    Affine {
        weight: Some(tensor(ctx, &[len], 1)),
        bias: bias.then(|| tensor(ctx, &[len], 2)),
    }
}

fn backward_benches(c: &mut Criterion) {
    gpunorm::ensure_runtime_dir();
    let ctx = Context::new().expect("a wgpu adapter");
    let ctx = &ctx;

    let shape = [4096, 1024];
    let mut ln = LayerNorm::new(ctx, &[1024], RowNormConfig::torch_layer_norm()).unwrap();
    ln.forward(ctx, &tensor(ctx, &shape, 3), Mode::Train)
        .unwrap();
    let dy = tensor(ctx, &shape, 4);
    bench_op(c, ctx, "layer_norm", &shape, |e| {
        ln.record_backward(ctx, e, &dy).unwrap();
    });

    let shape = [4096, 4096];
    let mut rms = RmsNorm::new(ctx, &[4096], RowNormConfig::torch_rms_norm()).unwrap();
    rms.forward(ctx, &tensor(ctx, &shape, 5), Mode::Train)
        .unwrap();
    let dy = tensor(ctx, &shape, 6);
    bench_op(c, ctx, "rms_norm", &shape, |e| {
        rms.record_backward(ctx, e, &dy).unwrap();
    });

    let shape = [32, 64, 56, 56];
    let mut bn = BatchNorm::new(ctx, 64, BatchNormConfig::torch_2d()).unwrap();
    let a = affine(ctx, 64, true);
    bn.set_weight(a.weight).unwrap();
    bn.set_bias(a.bias).unwrap();
    bn.forward(ctx, &tensor(ctx, &shape, 7), Mode::Train)
        .unwrap();
    let dy = tensor(ctx, &shape, 8);
    bench_op(c, ctx, "batch_norm2d_train", &shape, |e| {
        bn.record_backward(ctx, e, &dy).unwrap();
    });

    let shape = [8, 256, 32, 32];
    let mut gn = GroupNorm::new(ctx, 32, 256, GroupNormConfig::torch()).unwrap();
    gn.set_affine(affine(ctx, 256, true)).unwrap();
    gn.forward(ctx, &tensor(ctx, &shape, 9)).unwrap();
    let dy = tensor(ctx, &shape, 10);
    bench_op(c, ctx, "group_norm_32", &shape, |e| {
        gn.record_backward(ctx, e, &dy).unwrap();
    });

    let shape = [8, 64, 128, 128];
    let config = InstanceNormConfig {
        affine: true,
        ..InstanceNormConfig::torch()
    };
    let mut inorm = InstanceNorm::new(ctx, 64, config).unwrap();
    inorm
        .forward(ctx, &tensor(ctx, &shape, 11), Mode::Train)
        .unwrap();
    let dy = tensor(ctx, &shape, 12);
    bench_op(c, ctx, "instance_norm2d", &shape, |e| {
        inorm.record_backward(ctx, e, &dy).unwrap();
    });
}

criterion_group!(benches, backward_benches);
criterion_main!(benches);
