//! Host time to record one forward into an encoder (no submit, no device
//! time): what an application that records a layer every frame pays on the
//! CPU. A layer reuses its last forward's bind groups when it binds the same
//! buffers again, and its parameter uniforms when only the output is new.
//!
//! ```sh
//! cargo bench --bench record
//! ```

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gpunorm::{Context, DType, LayerNorm, RowNormConfig};

fn record(c: &mut Criterion) {
    let ctx = Context::new().expect("a wgpu adapter");
    let mut ln = LayerNorm::new(&ctx, &[64], RowNormConfig::torch_layer_norm()).unwrap();
    let x = ctx.upload(&[0.5f32; 256], &[4, 64]).unwrap();
    let y = ctx.zeros(&[4, 64], DType::F32).unwrap();
    let mut group = c.benchmark_group("record LayerNorm 4x64");
    group.bench_function("same buffers", |b| {
        b.iter(|| {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            ln.record(&ctx, &mut encoder, &x, &y).unwrap();
            encoder.finish()
        })
    });
    group.bench_function("new output each call", |b| {
        // The output is made outside the timed routine: this times the
        // recording with new bind groups, not the allocation.
        b.iter_batched(
            || ctx.zeros(&[4, 64], DType::F32).unwrap(),
            |y| {
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                ln.record(&ctx, &mut encoder, &x, &y).unwrap();
                encoder.finish()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
