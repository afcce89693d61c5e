//! The README's library example, runnable: BatchNorm with torch's and Keras's
//! semantics, and a LayerNorm recorded into your own encoder.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use gpunorm::{BatchNorm, BatchNormConfig, Context, LayerNorm, Mode, RowNormConfig};

fn main() -> Result<(), gpunorm::Error> {
    run()
}

/// Deterministic data in [-1.5, 1.5) with an offset (xorshift).
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

pub fn run() -> Result<(), gpunorm::Error> {
    let ctx = Context::new()?; // discrete GPU > integrated > software
    if let Some(a) = ctx.adapter() {
        println!("adapter: {} ({})", a.name, a.backend);
    }

    // torch semantics: BatchNorm2d(64), train mode.
    let data = data(32 * 64 * 56 * 56, 1, 3.0);
    let x = ctx.upload(&data, &[32, 64, 56, 56])?; // GpuTensor (f32)
    let mut bn = BatchNorm::new(&ctx, 64, BatchNormConfig::torch_2d())?;
    let y = bn.forward(&ctx, &x, Mode::Train)?; // running stats updated on the device
    let host: Vec<f32> = ctx.download(&y)?; // the only call that waits
    let mean = host.iter().map(|&v| v as f64).sum::<f64>() / host.len() as f64;
    println!("BatchNorm2d output: {} values, mean {mean:.2e}", host.len());
    let running = bn.running_stats().expect("tracked by default");
    let running_mean = ctx.download(&running.mean)?;
    println!(
        "running_mean[0] = {:.4} (0.9·0 + 0.1·batch mean), num_batches_tracked = {:?}",
        running_mean[0],
        running.num_batches_tracked(&ctx)?
    );
    assert!(mean.abs() < 1e-3, "normalized output has mean ~0");
    assert!(
        (running_mean[0] - 0.3).abs() < 0.05,
        "0.1 × a batch mean near 3"
    );

    // Keras semantics: momentum 0.99 as decay, biased moving variance, eps 1e-3,
    // channels-last.
    let x_nhwc = ctx.upload(&data, &[32, 56, 56, 64])?;
    let mut kbn = BatchNorm::new(&ctx, 64, BatchNormConfig::keras())?;
    let ky = ctx.download(&kbn.forward(&ctx, &x_nhwc, Mode::Train)?)?;
    let moving_mean = ctx.download(&kbn.running_stats().expect("tracked").mean)?;
    println!(
        "Keras BatchNormalization: y[0] = {:.4}, moving_mean[0] = {:.4} (0.99·0 + 0.01·batch mean)",
        ky[0], moving_mean[0]
    );

    // Record into your own encoder (no submit, no read-back):
    let x2 = ctx.upload(&data[..1024 * 1024], &[1024, 1024])?;
    let y2 = ctx.zeros(&[1024, 1024], gpunorm::DType::F32)?;
    let mut ln = LayerNorm::new(&ctx, &[1024], RowNormConfig::torch_layer_norm())?;
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor::default());
    let dispatches = ln.record(&ctx, &mut encoder, &x2, &y2)?;
    ctx.submit_and_wait(encoder)?; // your submit
    let row = &ctx.download(&y2)?[..1024];
    let row_mean = row.iter().sum::<f32>() / 1024.0;
    println!(
        "LayerNorm recorded in {} dispatch(es); row 0 mean {row_mean:.2e}",
        dispatches.len()
    );
    assert!(row_mean.abs() < 1e-4);
    Ok(())
}
