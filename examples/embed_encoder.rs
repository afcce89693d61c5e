//! Embedding gpunorm in an application that owns its wgpu device: every
//! "frame" the app's own compute pass writes activations into the app's own
//! buffer, and a LayerNorm of them is recorded into the app's encoder, in the
//! same submission, with no read-back. Only at the end is the last frame read
//! back and checked against a host computation.
//!
//! ```sh
//! cargo run --example embed_encoder
//! ```

use std::sync::Arc;

use gpunorm::wgpu;
use gpunorm::{Context, DType, GpuTensor, LayerNorm, RowNormConfig};

const ROWS: usize = 256;
const COLS: usize = 1024;
const FRAMES: u32 = 30;

/// The app's kernel: activations of frame `f` are
/// `10 + (1 + i % 7) · sin(0.001 · i + f)`.
const APP_SHADER: &str = r#"
@group(0) @binding(0) var<uniform> frame: vec4<u32>;
@group(0) @binding(1) var<storage, read_write> act: array<f32>;

@compute @workgroup_size(256)
fn produce(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i < arrayLength(&act)) {
        act[i] = 10.0 + f32(1u + i % 7u) * sin(0.001 * f32(i) + f32(frame.x));
    }
}
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run()
}

fn activation(i: usize, frame: u32) -> f64 {
    let x = 0.001f32 * i as f32 + frame as f32;
    10.0 + (1 + i % 7) as f64 * (x as f64).sin()
}

pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    // The app's own device (here: the first adapter wgpu lists, best first).
    let adapter = gpunorm::context::enumerate_adapters()
        .into_iter()
        .next()
        .ok_or("no wgpu adapter (run scripts/ensure-vulkan)")?;
    println!("adapter: {}", adapter.get_info().name);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("app"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;

    // The app's pipeline and buffers.
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("app"),
        source: wgpu::ShaderSource::Wgsl(APP_SHADER.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("app"),
        layout: None,
        module: &module,
        entry_point: Some("produce"),
        compilation_options: Default::default(),
        cache: None,
    });
    let frame_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app frame"),
        size: 16,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let act = Arc::new(device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app activations"),
        size: (ROWS * COLS * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    }));
    let normalized = Arc::new(device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app normalized"),
        size: (ROWS * COLS * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    }));
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("app"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: frame_buf.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: act.as_entire_binding(),
            },
        ],
    });

    // gpunorm on the same device, over the app's buffers: no copies.
    let ctx = Context::from_wgpu(device.clone(), queue.clone());
    let x = GpuTensor::from_buffer(act.clone(), 0, &[ROWS, COLS], DType::F32)?;
    let y = GpuTensor::from_buffer(normalized.clone(), 0, &[ROWS, COLS], DType::F32)?;
    let mut ln = LayerNorm::new(&ctx, &[COLS], RowNormConfig::torch_layer_norm())?;

    let mut dispatches = 0;
    for frame in 0..FRAMES {
        queue.write_buffer(&frame_buf, 0, bytemuck::cast_slice(&[frame, 0, 0, 0]));
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("app frame"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups((ROWS * COLS).div_ceil(256) as u32, 1, 1);
        }
        dispatches = ln.record(&ctx, &mut encoder, &x, &y)?.len();
        queue.submit([encoder.finish()]); // no wait, no read-back
    }

    // Only now: read the last frame back and check it on the host.
    let got = ctx.download(&y)?;
    let last = FRAMES - 1;
    let mut worst = 0.0f64;
    for r in 0..ROWS {
        let row: Vec<f64> = (0..COLS).map(|c| activation(r * COLS + c, last)).collect();
        let mean = row.iter().sum::<f64>() / COLS as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / COLS as f64;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        for c in 0..COLS {
            let expected = (row[c] - mean) * rstd;
            worst = worst.max((got[r * COLS + c] as f64 - expected).abs());
        }
    }
    println!(
        "{FRAMES} frames of [{ROWS}, {COLS}] activations normalized in the app's encoder \
         ({dispatches} dispatch(es) a frame); last frame max |error| {worst:.2e}"
    );
    if worst > 1e-3 {
        return Err(format!("LayerNorm of the last frame is off by {worst:.2e}").into());
    }
    Ok(())
}
