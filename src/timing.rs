//! Device timing for benchmarks: a [`Timer`] that reads timestamp queries
//! where the adapter has them (wall clock around submit-and-wait otherwise),
//! the copy references a figure is compared with ([`CopyReference`]), and the
//! byte model that turns a time into GB/s ([`forward_bytes`],
//! [`backward_bytes`]).
//!
//! `gpunorm bench` and the forward criterion bench (`benches/norms.rs`)
//! share this module, so both read the same clock and count the same bytes;
//! `benches/backward.rs` reports its own throughput (x, dy and grad_input).
//!
//! ```
//! use gpunorm::timing::{CopyReference, Timer};
//! use gpunorm::Context;
//!
//! let ctx = Context::new()?;
//! let timer = Timer::new(&ctx);
//! let copy = CopyReference::new(&ctx);
//! let (kernel, transfer) = copy.measure(&ctx, &timer, 1 << 16, 1, 3)?;
//! assert!(kernel.median_s > 0.0 && transfer.min_s > 0.0);
//! # Ok::<(), gpunorm::Error>(())
//! ```

use std::time::Instant;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Which clock a [`Timing`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Timestamp queries written by the device around the recorded work.
    Timestamp,
    /// The host's clock around recording, submitting and waiting.
    Wall,
}

impl Clock {
    /// `"timestamp"` or `"wall"`, as `gpunorm bench` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Clock::Timestamp => "timestamp",
            Clock::Wall => "wall",
        }
    }
}

/// Per-iteration times of one measurement, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// The clock the samples come from.
    pub clock: Clock,
    /// Median over the timed iterations (the mean of the middle two for an
    /// even count).
    pub median_s: f64,
    /// Fastest timed iteration.
    pub min_s: f64,
    /// Every timed iteration, in the order run.
    pub samples_s: Vec<f64>,
}

impl Timing {
    /// Summarizes samples (at least one).
    pub fn from_samples(clock: Clock, samples_s: Vec<f64>) -> Self {
        let mut sorted = samples_s.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median_s = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
        };
        Timing {
            clock,
            median_s,
            min_s: sorted.first().copied().unwrap_or(f64::NAN),
            samples_s,
        }
    }

    /// GB/s for `bytes` moved per iteration, at the median time.
    pub fn gbps(&self, bytes: u64) -> f64 {
        bytes as f64 / self.median_s / 1e9
    }
}

/// How a [`Timer`] brackets the recorded work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marks {
    /// `CommandEncoder::write_timestamp` (`TIMESTAMP_QUERY_INSIDE_ENCODERS`).
    Encoder,
    /// Empty compute passes with timestamp writes (`TIMESTAMP_QUERY` alone,
    /// the WebGPU baseline).
    Passes,
    /// No timestamps: wall clock.
    Wall,
}

/// Most iterations resolved from one query set (two queries each).
const ITERS_PER_QUERY_SET: usize = (wgpu::QUERY_SET_MAX_QUERIES / 2) as usize;

/// Times recorded work on a [`Context`]'s device.
///
/// Each iteration is recorded into its own encoder and submitted alone. With
/// timestamps, the device writes one before and one after the iteration's
/// commands and the submissions run back to back; on the wall clock, each
/// iteration is recorded, submitted and waited for in turn, so its time
/// includes the recording and the submission.
#[derive(Debug)]
pub struct Timer {
    marks: Marks,
    period_ns: f64,
}

impl Timer {
    /// Timestamps where the device was created with `TIMESTAMP_QUERY` (the
    /// [`Context`] asks for it, and for `TIMESTAMP_QUERY_INSIDE_ENCODERS`,
    /// whenever the adapter offers them), else the wall clock.
    pub fn new(ctx: &Context) -> Self {
        let features = ctx.device().features();
        let marks = if features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS) {
            Marks::Encoder
        } else if features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            Marks::Passes
        } else {
            Marks::Wall
        };
        Timer {
            marks,
            period_ns: ctx.queue().get_timestamp_period() as f64,
        }
    }

    /// A timer on the wall clock whatever the device offers.
    pub fn wall() -> Self {
        Timer {
            marks: Marks::Wall,
            period_ns: 1.0,
        }
    }

    /// The clock this timer reads.
    pub fn clock(&self) -> Clock {
        match self.marks {
            Marks::Wall => Clock::Wall,
            Marks::Encoder | Marks::Passes => Clock::Timestamp,
        }
    }

    /// Runs `record` `warmup` times untimed, then `iters` (at least 1) times
    /// timed, each call in its own encoder and submission. The first error
    /// `record` returns ends the measurement before anything is submitted
    /// for that call; a wgpu validation or out-of-memory error becomes
    /// [`Error::Wgpu`].
    pub fn time<F>(
        &self,
        ctx: &Context,
        warmup: usize,
        iters: usize,
        mut record: F,
    ) -> Result<Timing>
    where
        F: FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
    {
        let iters = iters.max(1);
        scoped(ctx, || {
            for _ in 0..warmup {
                let mut encoder = new_encoder(ctx);
                record(&mut encoder)?;
                ctx.queue.submit([encoder.finish()]);
            }
            wait(ctx)?;
            let mut samples = Vec::with_capacity(iters);
            while samples.len() < iters {
                let batch = (iters - samples.len()).min(ITERS_PER_QUERY_SET);
                let more = match self.marks {
                    Marks::Wall => time_wall(ctx, batch, &mut record)?,
                    Marks::Encoder | Marks::Passes => self.time_queries(ctx, batch, &mut record)?,
                };
                samples.extend(more);
            }
            Ok(Timing::from_samples(self.clock(), samples))
        })
    }

    /// One batch of iterations bracketed by timestamp queries.
    fn time_queries<F>(&self, ctx: &Context, iters: usize, record: &mut F) -> Result<Vec<f64>>
    where
        F: FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
    {
        let count = 2 * iters as u32;
        let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("gpunorm timer"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = count as u64 * wgpu::QUERY_SIZE as u64;
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gpunorm timer resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        for i in 0..iters as u32 {
            let mut encoder = new_encoder(ctx);
            self.mark(&mut encoder, &set, 2 * i, true);
            record(&mut encoder)?;
            self.mark(&mut encoder, &set, 2 * i + 1, false);
            ctx.queue.submit([encoder.finish()]);
        }
        let mut encoder = new_encoder(ctx);
        encoder.resolve_query_set(&set, 0..count, &resolve, 0);
        ctx.queue.submit([encoder.finish()]);
        let raw = pollster::block_on(ctx.read_buffer(&resolve, 0, bytes))?;
        let ticks: &[u64] = bytemuck::cast_slice(&raw);
        ticks
            .chunks_exact(2)
            .map(|pair| {
                if pair[1] < pair[0] {
                    return Err(Error::Device(format!(
                        "the device's timestamps went backwards ({} then {})",
                        pair[0], pair[1]
                    )));
                }
                Ok((pair[1] - pair[0]) as f64 * self.period_ns * 1e-9)
            })
            .collect()
    }

    /// Writes timestamp `index`, before (`start`) or after the work.
    fn mark(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        set: &wgpu::QuerySet,
        index: u32,
        start: bool,
    ) {
        match self.marks {
            Marks::Encoder => encoder.write_timestamp(set, index),
            Marks::Passes => {
                let _ = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("gpunorm timer mark"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: start.then_some(index),
                        end_of_pass_write_index: (!start).then_some(index),
                    }),
                });
            }
            Marks::Wall => {}
        }
    }
}

fn new_encoder(ctx: &Context) -> wgpu::CommandEncoder {
    ctx.device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("gpunorm timed"),
        })
}

fn wait(ctx: &Context) -> Result<()> {
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| Error::Device(e.to_string()))
}

/// Iterations on the host clock, each recorded, submitted and waited for.
fn time_wall<F>(ctx: &Context, iters: usize, record: &mut F) -> Result<Vec<f64>>
where
    F: FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
{
    (0..iters)
        .map(|_| {
            let start = Instant::now();
            let mut encoder = new_encoder(ctx);
            record(&mut encoder)?;
            ctx.queue.submit([encoder.finish()]);
            wait(ctx)?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}

/// Runs `f` inside validation and out-of-memory error scopes.
fn scoped<T>(ctx: &Context, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let result = f();
    let validation_error = pollster::block_on(validation.pop());
    let oom_error = pollster::block_on(oom.pop());
    let value = result?;
    match validation_error.or(oom_error) {
        Some(e) => Err(Error::Wgpu(e.to_string())),
        None => Ok(value),
    }
}

/// The copy references of a measurement: a `vec4` WGSL copy kernel
/// (`shaders/copy.wgsl`, the ceiling of any shader on the adapter) and
/// `copy_buffer_to_buffer` (the transfer engine; a host `memcpy` on lavapipe).
///
/// Both are timed for the same *traffic* as the op: copying `n` bytes reads
/// `n` and writes `n`, so a reference for `bytes` of traffic copies
/// `bytes / 2` (rounded up to 16 bytes).
pub struct CopyReference {
    layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
}

/// Invocations per workgroup of the copy kernel (its `COPY_WG` default).
const COPY_WG: u64 = 256;
/// `vec4`s each copy invocation moves (its `COPY_PER_THREAD` default).
const COPY_PER_THREAD: u64 = 8;

impl CopyReference {
    /// Builds the copy kernel's pipeline.
    pub fn new(ctx: &Context) -> Self {
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let device = &ctx.device;
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("gpunorm copy"),
            entries: &[storage(0, true), storage(1, false)],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("gpunorm copy"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("gpunorm copy"),
            source: wgpu::ShaderSource::Wgsl(COPY_SOURCE.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("gpunorm copy"),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("copy"),
            compilation_options: Default::default(),
            cache: None,
        });
        CopyReference { layout, pipeline }
    }

    /// Records the copy kernel copying the first `bytes` (a positive multiple
    /// of 16) of `src` to `dst`; both need `STORAGE` usage.
    ///
    /// A copy larger than one storage binding runs as one dispatch per
    /// piece of at most a binding, as the ops split such tensors (so a bench
    /// of a tensor beyond `max_storage_buffer_binding_size` has its
    /// reference too).
    pub fn record(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<()> {
        if bytes == 0 || !bytes.is_multiple_of(16) || bytes > src.size() || bytes > dst.size() {
            return Err(Error::InvalidArgument(format!(
                "the copy kernel copies a positive multiple of 16 bytes within both buffers, got {bytes}"
            )));
        }
        let piece = copy_piece(ctx.max_storage_binding(), ctx.storage_offset_alignment());
        if piece == 0 {
            return Err(Error::TooLarge {
                what: "a piece of the copy reference".into(),
                bytes: ctx.storage_offset_alignment().max(16),
                limit: ctx.max_storage_binding(),
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        fn binding(buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> wgpu::BindingResource<'_> {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: wgpu::BufferSize::new(bytes),
            })
        }
        let mut pieces = Vec::new();
        for offset in (0..bytes).step_by(piece as usize) {
            let len = piece.min(bytes - offset);
            let workgroups = u32::try_from((len / 16).div_ceil(COPY_WG * COPY_PER_THREAD))
                .map_err(|_| Error::TooLarge {
                    what: "the copy reference".into(),
                    bytes: len,
                    limit: u32::MAX as u64,
                    limit_name: "workgroup count",
                })?;
            let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("gpunorm copy"),
                layout: &self.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: binding(src, offset, len),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: binding(dst, offset, len),
                    },
                ],
            });
            pieces.push((bind_group, crate::kernels::grid(workgroups)));
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("gpunorm copy"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        for (bind_group, (gx, gy)) in &pieces {
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(*gx, *gy, 1);
        }
        Ok(())
    }

    /// Times the copy kernel and `copy_buffer_to_buffer` for `traffic_bytes`
    /// of traffic: `(kernel, transfer)`.
    pub fn measure(
        &self,
        ctx: &Context,
        timer: &Timer,
        traffic_bytes: u64,
        warmup: usize,
        iters: usize,
    ) -> Result<(Timing, Timing)> {
        let half = (traffic_bytes / 2).div_ceil(16).max(1) * 16;
        let src = ctx.create_buffer("gpunorm copy source", half)?;
        let dst = ctx.create_buffer("gpunorm copy destination", half)?;
        // Something other than zeros, written once.
        let pattern: Vec<u8> = (0..half).map(|i| (i % 251) as u8).collect();
        ctx.queue.write_buffer(&src, 0, &pattern);
        let kernel = timer.time(ctx, warmup, iters, |encoder| {
            self.record(ctx, encoder, &src, &dst, half)
        })?;
        let transfer = timer.time(ctx, warmup, iters, |encoder| {
            encoder.copy_buffer_to_buffer(&src, 0, &dst, 0, half);
            Ok(())
        })?;
        Ok((kernel, transfer))
    }
}

/// The bytes one dispatch of the copy kernel binds: the largest multiple of
/// both 16 and the offset alignment (powers of two) within a binding, so
/// that every piece but the last starts aligned. Zero when no such piece
/// fits.
fn copy_piece(max_binding: u64, offset_alignment: u64) -> u64 {
    let unit = offset_alignment.max(16);
    max_binding / unit * unit
}

/// Source of the copy kernel (`shaders/copy.wgsl`).
pub const COPY_SOURCE: &str = include_str!("../shaders/copy.wgsl");

/// The byte model of `gpunorm bench` (CLI.md), for `--help` and docs.
pub const BYTE_MODEL: &str = "\
Byte model (`bytes`): the traffic the op cannot avoid.
  forward:  the input read once + the output written once
            + the affine parameters read (weight/gamma, bias/beta)
            + running statistics: read in eval mode; read and written (and
              num_batches_tracked, 8 bytes, read and written) when train mode
              updates them.
  backward: input and grad_output read once + grad_input written once
            + weight/gamma read (no bias is needed) and the affine
              gradients written
            + the saved mean and rstd read (8 bytes per group).
  A kernel that reads the input twice still counts it once: re-reading is
  the kernel's cost. gbps = bytes / median / 1e9.
  The copy references move the same bytes: they copy bytes/2 (read once,
  written once). copy_gbps: a vec4 WGSL copy kernel, the ceiling of any
  shader on the adapter and the base of fraction_of_copy = gbps / copy_gbps;
  transfer_gbps: copy_buffer_to_buffer (a host memcpy on lavapipe).";

/// Bytes a forward pass cannot avoid moving: `numel` elements of `dtype` read
/// and written once, plus `param_bytes` of affine parameters read and
/// `stats_bytes` of running statistics read or written (see [`BYTE_MODEL`]).
pub fn forward_bytes(numel: usize, dtype: DType, param_bytes: u64, stats_bytes: u64) -> u64 {
    2 * (numel * dtype.size()) as u64 + param_bytes + stats_bytes
}

/// Bytes a backward pass cannot avoid moving: input and grad_output read,
/// grad_input written, plus `param_bytes` (γ read, the affine gradients
/// written) and `stats_bytes` (saved statistics read).
pub fn backward_bytes(numel: usize, dtype: DType, param_bytes: u64, stats_bytes: u64) -> u64 {
    3 * (numel * dtype.size()) as u64 + param_bytes + stats_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ContextOptions;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let t = Timing::from_samples(Clock::Wall, vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(t.median_s, 2.5);
        assert_eq!(t.min_s, 1.0);
        assert_eq!(t.samples_s, vec![4.0, 1.0, 3.0, 2.0]);
    }

    #[test]
    fn byte_model_counts_the_tensor_once_each_way_plus_parameters() {
        assert_eq!(forward_bytes(4096 * 1024, DType::F32, 8192, 0), 33_562_624);
        assert_eq!(forward_bytes(10, DType::F16, 0, 0), 40);
        assert_eq!(backward_bytes(10, DType::F32, 16, 8), 144);
    }

    #[test]
    fn copy_shader_validates_with_naga() {
        let module = naga::front::wgsl::parse_str(COPY_SOURCE)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(COPY_SOURCE)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{e:?}"));
    }

    fn timestamps_in(ctx: &Context, marks: Marks) -> Option<Timer> {
        let timer = Timer {
            marks,
            period_ns: ctx.queue().get_timestamp_period() as f64,
        };
        let needed = match marks {
            Marks::Encoder => wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
            _ => wgpu::Features::TIMESTAMP_QUERY,
        };
        ctx.device().features().contains(needed).then_some(timer)
    }

    #[test]
    fn every_clock_times_the_copy_kernel_with_positive_durations() {
        let ctx = Context::new().expect("an adapter");
        let copy = CopyReference::new(&ctx);
        let mut timers = vec![Timer::wall()];
        timers.extend(timestamps_in(&ctx, Marks::Encoder));
        timers.extend(timestamps_in(&ctx, Marks::Passes));
        for timer in timers {
            let (kernel, transfer) = copy.measure(&ctx, &timer, 1 << 20, 1, 3).unwrap();
            for t in [&kernel, &transfer] {
                assert_eq!(t.samples_s.len(), 3, "{:?}", timer.marks);
                assert!(
                    t.min_s > 0.0 && t.min_s <= t.median_s,
                    "{:?}: {t:?}",
                    timer.marks
                );
                assert!(t.median_s < 10.0, "{:?}: {t:?}", timer.marks);
            }
        }
    }

    /// Copies `bytes` of a pattern with the copy kernel on `ctx` and checks
    /// every byte, and that nothing past them was written.
    fn assert_copies_every_byte(ctx: &Context, bytes: u64) {
        let src = ctx.create_buffer("src", bytes).unwrap();
        let dst = ctx.create_buffer("dst", bytes + 16).unwrap();
        let pattern: Vec<u8> = (0..bytes).map(|i| (i * 7 % 253) as u8).collect();
        ctx.queue.write_buffer(&src, 0, &pattern);
        let mut encoder = new_encoder(ctx);
        CopyReference::new(ctx)
            .record(ctx, &mut encoder, &src, &dst, bytes)
            .unwrap();
        ctx.submit_and_wait(encoder).unwrap();
        let got = pollster::block_on(ctx.read_buffer(&dst, 0, bytes + 16)).unwrap();
        assert!(got[..bytes as usize] == pattern[..], "copied bytes differ");
        assert_eq!(&got[bytes as usize..], &[0; 16], "wrote past the end");
    }

    #[test]
    fn copy_kernel_copies_every_byte_of_a_size_spanning_a_partial_workgroup() {
        let ctx = Context::new().expect("an adapter");
        assert_copies_every_byte(&ctx, (COPY_WG * COPY_PER_THREAD * 16) * 3 + 48);
    }

    #[test]
    fn a_copy_larger_than_a_binding_runs_in_pieces_and_copies_every_byte() {
        // Bindings of 4 KiB: a copy of 3 pieces and a bit.
        let ctx = Context::with_options(ContextOptions {
            max_storage_binding: Some(4096),
            ..Default::default()
        })
        .expect("an adapter");
        let piece = copy_piece(4096, ctx.storage_offset_alignment());
        assert!(piece > 0 && piece <= 4096);
        assert_copies_every_byte(&ctx, piece * 3 + 48);
    }

    #[test]
    fn copy_pieces_are_aligned_and_within_a_binding() {
        assert_eq!(copy_piece(134_217_728, 256), 134_217_728);
        assert_eq!(copy_piece(1000, 256), 768);
        assert_eq!(copy_piece(1000, 4), 992);
        assert_eq!(copy_piece(100, 256), 0);
    }

    #[test]
    fn an_error_from_the_recorded_work_ends_the_measurement() {
        let ctx = Context::new().expect("an adapter");
        let err = Timer::new(&ctx)
            .time(&ctx, 1, 3, |_| Err(Error::InvalidArgument("no".into())))
            .unwrap_err();
        assert_eq!(err, Error::InvalidArgument("no".into()));
    }
}
