//! `gpunorm bench`: device time of one op at one shape, with the copy
//! references of the same adapter measured in the same run (CLI.md). The
//! clock, the copy kernel and the byte model live in `gpunorm::timing`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use gpunorm::timing::{self, CopyReference, Timer, Timing};
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Context, ContextOptions, DType, Error, GpuTensor,
    GroupNorm, GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, Result, RmsNorm,
    RowNormConfig, RunningStats,
};
use serde::Serialize;

use crate::apply::{
    check_flags, keras_normalized_shape, parse_f32, parse_list, resolve_axis, ApplyArgs,
    ConventionArg, ModeArg, Op, OpFlags,
};
use crate::sweep;

/// Timed iterations of the op, then of each copy reference, per round of
/// [`Bench::measure`].
const ROUND_ITERS: usize = 5;

/// Storage dtype of the benchmarked tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Timed iterations when `--iters` is not given.
pub const DEFAULT_ITERS: usize = 50;
/// Untimed runs before the timed ones: pipelines built, caches and the
/// driver's lazy allocations warm.
pub const WARMUP: usize = 3;

/// Flags of `gpunorm bench` (CLI.md).
#[derive(Debug, clap::Args)]
#[command(after_help = timing::BYTE_MODEL)]
pub struct BenchArgs {
    /// batch-norm | layer-norm | instance-norm | group-norm | rms-norm
    /// (required without --sweep; with --sweep, default: every op)
    #[arg(long, value_enum, required_unless_present = "sweep")]
    pub op: Option<Op>,
    /// The input's shape, D1,D2,... (the op's layout, as for apply)
    #[arg(
        long,
        value_name = "D1,D2,...",
        required_unless_present = "sweep",
        conflicts_with = "sweep"
    )]
    pub shape: Option<String>,
    /// Storage dtype of the input and output
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// train | eval, as torch's train()/eval()
    #[arg(long, value_enum, default_value = "train")]
    pub mode: ModeArg,
    /// Time the backward pass (after one forward) instead of the forward
    #[arg(long)]
    pub backward: bool,
    /// Timed iterations after the warm-up [default: 50; 5 per point with --sweep]
    #[arg(long, value_name = "N")]
    pub iters: Option<usize>,
    /// One compact JSON object per measurement, one per line
    #[arg(long)]
    pub json: bool,
    /// Vary the row (or spatial) length from 256 to 65536 at a fixed total
    /// size, for one op or all of them
    #[arg(long)]
    pub sweep: bool,
    /// With --sweep: write an SVG plot of GB/s against length
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// With --sweep: write a CSV of GB/s against length
    #[arg(long, value_name = "FILE.csv")]
    pub csv: Option<PathBuf>,
    /// The op's hyper-parameters and the adapter, as for apply.
    #[command(flatten)]
    pub flags: OpFlags,
}

impl BenchArgs {
    /// The op flags as `apply` takes them, to share its checks.
    pub fn op_flags(&self, op: Op) -> ApplyArgs {
        ApplyArgs {
            op,
            input: PathBuf::new(),
            output: PathBuf::new(),
            mode: self.mode,
            flags: self.flags.clone(),
        }
    }

    pub fn mode(&self) -> Mode {
        match self.mode {
            ModeArg::Train => Mode::Train,
            ModeArg::Eval => Mode::Eval,
        }
    }
}

/// The CLI name of an op (`layer-norm`, ...).
pub fn op_name(op: Op) -> String {
    op.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// One measurement, with exactly the fields of CLI.md in its order.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub op: String,
    pub shape: Vec<usize>,
    pub dtype: &'static str,
    pub mode: &'static str,
    pub backward: bool,
    pub adapter: String,
    pub backend: String,
    pub timing: &'static str,
    pub iters: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub bytes: u64,
    pub gbps: f64,
    pub copy_gbps: f64,
    pub transfer_gbps: f64,
    pub fraction_of_copy: f64,
    pub dispatches: usize,
}

impl Measurement {
    /// The human-readable line printed without `--json`.
    pub fn line(&self) -> String {
        format!(
            "{} {:?} {} {} {}: median {:.3} ms (min {:.3}), {} bytes, {:.2} GB/s = {:.2} of copy \
             (copy kernel {:.2} GB/s, copy_buffer_to_buffer {:.2} GB/s), {} dispatch{}, {} clock, {} iters, {} ({})",
            self.op,
            self.shape,
            self.dtype,
            self.mode,
            if self.backward { "backward" } else { "forward" },
            self.median_ms,
            self.min_ms,
            self.bytes,
            self.gbps,
            self.fraction_of_copy,
            self.copy_gbps,
            self.transfer_gbps,
            self.dispatches,
            if self.dispatches == 1 { "" } else { "es" },
            self.timing,
            self.iters,
            self.adapter,
            self.backend,
        )
    }

    /// Prints the measurement (a closed stdout is an error, not a panic).
    pub fn print(&self, json: bool) -> Result<()> {
        let line = if json {
            serde_json::to_string(self).map_err(|e| Error::File(e.to_string()))?
        } else {
            self.line()
        };
        outln!("{line}")
    }
}

/// What every measurement of a run shares.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub dtype: DType,
    pub mode: Mode,
    pub backward: bool,
    /// Timed iterations.
    pub iters: usize,
    /// Untimed runs first.
    pub warmup: usize,
}

/// The device, its clock and its copy kernel, set up once per run.
pub struct Bench {
    pub ctx: Context,
    timer: Timer,
    copy: CopyReference,
    adapter: String,
    backend: String,
}

impl Bench {
    pub fn new(adapter: Option<String>) -> Result<Self> {
        let ctx = Context::with_options(ContextOptions {
            adapter_name: adapter,
            ..Default::default()
        })?;
        let (adapter, backend) = ctx
            .adapter()
            .map(|a| (a.name.clone(), a.backend.clone()))
            .unwrap_or_default();
        Ok(Bench {
            timer: Timer::new(&ctx),
            copy: CopyReference::new(&ctx),
            ctx,
            adapter,
            backend,
        })
    }

    /// Times `flags.op` on a fresh input of `shape`, then the copy references
    /// for the same bytes.
    pub fn measure(&self, flags: &ApplyArgs, shape: &[usize], s: &Settings) -> Result<Measurement> {
        let Settings {
            dtype,
            mode,
            backward,
            iters,
            warmup,
        } = *s;
        let ctx = &self.ctx;
        let mut layer = BenchLayer::build(ctx, flags, shape)?;
        let n: usize = shape.iter().product();
        let x = ctx.upload_as(&data(n, 0x5eed, 0.0), shape, dtype)?;
        let y = ctx.zeros(shape, dtype)?;
        let mut dispatches = 0;
        let dy = if backward {
            let dy = ctx.upload_as(&data(n, 0xd1ff, 0.0), shape, dtype)?;
            let mut encoder = ctx
                .device()
                .create_command_encoder(&wgpu_encoder_descriptor());
            layer.record(ctx, &mut encoder, &x, &y, mode)?;
            ctx.submit_and_wait(encoder)?;
            // Gradients allocated once, as a training loop would: the
            // timed passes only record and run the kernels.
            let grads = gpunorm::Gradients::zeros(ctx, shape, dtype, layer.affine())?;
            Some((dy, grads))
        } else {
            None
        };
        let bytes = match dy {
            Some(_) => timing::backward_bytes(
                n,
                dtype,
                layer.backward_param_bytes(),
                8 * layer.groups(shape) as u64,
            ),
            None => timing::forward_bytes(
                n,
                dtype,
                layer.forward_param_bytes(),
                layer.forward_stats_bytes(mode),
            ),
        };
        let mut record = |encoder: &mut gpunorm::wgpu::CommandEncoder| {
            dispatches = match &dy {
                Some((dy, grads)) => layer.record_backward(ctx, encoder, dy, grads)?,
                None => layer.record(ctx, encoder, &x, &y, mode)?,
            };
            Ok(())
        };
        // The op and the copy references alternate in rounds of a few
        // iterations, so that a machine whose speed drifts (lavapipe on a
        // shared CPU: its copy kernel ran anywhere from 4.6 to 9.6 GB/s
        // within minutes) slows both alike and the fraction holds.
        let (mut op_s, mut copy_s, mut transfer_s) = (Vec::new(), Vec::new(), Vec::new());
        let mut clock = self.timer.clock();
        while op_s.len() < iters.max(1) {
            let round = (iters - op_s.len()).clamp(1, ROUND_ITERS);
            let warm = if op_s.is_empty() { warmup } else { 0 };
            let time = self.timer.time(ctx, warm, round, &mut record)?;
            clock = time.clock;
            op_s.extend(time.samples_s);
            let (copy, transfer) = self.copy.measure(ctx, &self.timer, bytes, warm, round)?;
            copy_s.extend(copy.samples_s);
            transfer_s.extend(transfer.samples_s);
        }
        let time = Timing::from_samples(clock, op_s);
        let copy = Timing::from_samples(clock, copy_s);
        let transfer = Timing::from_samples(clock, transfer_s);
        let gbps = time.gbps(bytes);
        let copy_gbps = copy.gbps(bytes);
        Ok(Measurement {
            op: op_name(flags.op),
            shape: shape.to_vec(),
            dtype: dtype.name(),
            mode: match mode {
                Mode::Train => "train",
                Mode::Eval => "eval",
            },
            backward,
            adapter: self.adapter.clone(),
            backend: self.backend.clone(),
            timing: time.clock.name(),
            iters: time.samples_s.len(),
            median_ms: time.median_s * 1e3,
            min_ms: time.min_s * 1e3,
            bytes,
            gbps,
            copy_gbps,
            transfer_gbps: transfer.gbps(bytes),
            fraction_of_copy: gbps / copy_gbps,
            dispatches,
        })
    }
}

fn wgpu_encoder_descriptor() -> gpunorm::wgpu::CommandEncoderDescriptor<'static> {
    gpunorm::wgpu::CommandEncoderDescriptor {
        label: Some("gpunorm bench"),
    }
}

/// Deterministic values in [-1.5, 1.5) plus `offset` (xorshift), so runs
/// compare; a common offset makes the demo's check cover the large-mean
/// case that naive kernels get wrong.
pub fn data(n: usize, seed: u64, offset: f32) -> Vec<f32> {
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

/// A layer of any op, built with the convention's defaults (affine terms
/// present where the framework's default has them, running statistics
/// tracked for batch-norm) and the op flags.
enum BenchLayer {
    Batch(BatchNorm, bool),
    Layer(LayerNorm),
    Rms(RmsNorm),
    Group(GroupNorm, usize),
    Instance(InstanceNorm),
}

fn bytes_of(t: Option<&GpuTensor>) -> u64 {
    t.map(GpuTensor::byte_len).unwrap_or(0)
}

fn eps_or(flags: &ApplyArgs, default: f32) -> Result<f32> {
    match &flags.flags.eps {
        Some(s) => parse_f32("--eps", s),
        None => Ok(default),
    }
}

fn momentum_or(flags: &ApplyArgs, default: Option<f32>) -> Result<Option<f32>> {
    match flags.flags.momentum.as_deref().map(str::trim) {
        None => Ok(default),
        Some(s) if s.eq_ignore_ascii_case("none") => Ok(None),
        Some(s) => parse_f32("--momentum", s).map(Some),
    }
}

fn need_rank(op: Op, shape: &[usize], rank: usize, layout: &str) -> Result<()> {
    if shape.len() < rank {
        return Err(Error::Shape(format!(
            "{} expects an input {layout} of at least {rank}D, got size {shape:?}",
            op_name(op)
        )));
    }
    Ok(())
}

impl BenchLayer {
    fn build(ctx: &Context, flags: &ApplyArgs, shape: &[usize]) -> Result<Self> {
        check_flags(flags)?;
        let keras = flags.flags.convention == ConventionArg::Keras;
        Ok(match flags.op {
            Op::LayerNorm | Op::RmsNorm => {
                let dims = if keras {
                    keras_normalized_shape(flags.op, flags.flags.axis.as_deref(), shape)?
                } else {
                    match &flags.flags.normalized_shape {
                        Some(s) => parse_list("--normalized-shape", s)?,
                        None => shape.last().map(|&d| vec![d]).unwrap_or_default(),
                    }
                };
                let config = match (flags.op, keras) {
                    (Op::LayerNorm, false) => RowNormConfig::torch_layer_norm(),
                    (Op::LayerNorm, true) => RowNormConfig::keras_layer_norm(),
                    (_, false) => RowNormConfig::torch_rms_norm(),
                    (_, true) => RowNormConfig::keras_rms_norm(),
                };
                let config = RowNormConfig {
                    eps: eps_or(flags, config.eps)?,
                    ..config
                };
                if flags.op == Op::LayerNorm {
                    BenchLayer::Layer(LayerNorm::new(ctx, &dims, config)?)
                } else {
                    BenchLayer::Rms(RmsNorm::new(ctx, &dims, config)?)
                }
            }
            Op::BatchNorm => {
                need_rank(flags.op, shape, 2, "[N, C, *S]")?;
                let mut config = if keras {
                    let axis: Vec<i64> = match &flags.flags.axis {
                        Some(s) => parse_list("--axis", s)?,
                        None => vec![-1],
                    };
                    if axis.len() != 1 {
                        return Err(Error::InvalidArgument(format!(
                            "batch-norm takes one --axis, got {axis:?}"
                        )));
                    }
                    BatchNormConfig {
                        axis: axis[0] as isize,
                        ..BatchNormConfig::keras()
                    }
                } else {
                    BatchNormConfig::torch()
                };
                let axis = resolve_axis(config.axis as i64, shape.len())?;
                config.eps = eps_or(flags, config.eps)?;
                config.momentum = momentum_or(flags, config.momentum)?;
                BenchLayer::Batch(BatchNorm::new(ctx, shape[axis], config)?, keras)
            }
            Op::InstanceNorm => {
                need_rank(flags.op, shape, 3, "[N, C, *S]")?;
                let mut config = InstanceNormConfig::torch();
                config.eps = eps_or(flags, config.eps)?;
                config.momentum = momentum_or(flags, config.momentum)?;
                BenchLayer::Instance(InstanceNorm::new(ctx, shape[1], config)?)
            }
            Op::GroupNorm => {
                need_rank(
                    flags.op,
                    shape,
                    2,
                    if keras { "[N, *S, C]" } else { "[N, C, *S]" },
                )?;
                let channels = if keras {
                    shape[shape.len() - 1]
                } else {
                    shape[1]
                };
                let groups: i64 = match (&flags.flags.groups, keras) {
                    (Some(s), _) => s.trim().parse().map_err(|_| {
                        Error::InvalidArgument(format!("--groups expects an integer, got {s:?}"))
                    })?,
                    (None, true) => 32,
                    (None, false) => {
                        return Err(Error::InvalidArgument(
                            "--groups is required for group-norm with --convention torch".into(),
                        ))
                    }
                };
                let groups = match groups {
                    -1 if keras => channels,
                    g if g >= 1 => g as usize,
                    g => {
                        return Err(Error::InvalidArgument(format!(
                            "--groups must be a positive integer{}, got {g}",
                            if keras { " or -1" } else { "" }
                        )))
                    }
                };
                let mut config = if keras {
                    GroupNormConfig::keras()
                } else {
                    GroupNormConfig::torch()
                };
                config.eps = eps_or(flags, config.eps)?;
                BenchLayer::Group(GroupNorm::new(ctx, groups, channels, config)?, groups)
            }
        })
    }

    /// Records one forward; returns the number of dispatches.
    fn record(
        &mut self,
        ctx: &Context,
        encoder: &mut gpunorm::wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
        mode: Mode,
    ) -> Result<usize> {
        let dispatches = match self {
            BenchLayer::Batch(l, _) => l.record(ctx, encoder, x, y, mode)?,
            BenchLayer::Layer(l) => l.record(ctx, encoder, x, y)?,
            BenchLayer::Rms(l) => l.record(ctx, encoder, x, y)?,
            BenchLayer::Group(l, _) => l.record(ctx, encoder, x, y)?,
            BenchLayer::Instance(l) => l.record(ctx, encoder, x, y, mode)?,
        };
        Ok(dispatches.len())
    }

    /// Records the backward of the last forward; returns the number of
    /// dispatches.
    fn record_backward(
        &self,
        ctx: &Context,
        encoder: &mut gpunorm::wgpu::CommandEncoder,
        dy: &GpuTensor,
        grads: &gpunorm::Gradients,
    ) -> Result<usize> {
        let dispatches = match self {
            BenchLayer::Batch(l, _) => l.record_backward_into(ctx, encoder, dy, grads)?,
            BenchLayer::Layer(l) => l.record_backward_into(ctx, encoder, dy, grads)?,
            BenchLayer::Rms(l) => l.record_backward_into(ctx, encoder, dy, grads)?,
            BenchLayer::Group(l, _) => l.record_backward_into(ctx, encoder, dy, grads)?,
            BenchLayer::Instance(l) => l.record_backward_into(ctx, encoder, dy, grads)?,
        };
        Ok(dispatches.len())
    }

    fn affine(&self) -> &Affine {
        match self {
            BenchLayer::Batch(l, _) => l.affine(),
            BenchLayer::Layer(l) => l.affine(),
            BenchLayer::Rms(l) => l.affine(),
            BenchLayer::Group(l, _) => l.affine(),
            BenchLayer::Instance(l) => l.affine(),
        }
    }

    fn running(&self) -> Option<&RunningStats> {
        match self {
            BenchLayer::Batch(l, _) => l.running_stats(),
            BenchLayer::Instance(l) => l.running_stats(),
            _ => None,
        }
    }

    /// Whether a forward in `mode` updates the running statistics.
    fn updates_running(&self, mode: Mode) -> bool {
        mode == Mode::Train
            && match self {
                BenchLayer::Batch(l, _) => l.running_stats().is_some() && l.config().trainable,
                BenchLayer::Instance(l) => {
                    l.running_stats().is_some() && l.config().momentum.is_some()
                }
                _ => false,
            }
    }

    /// Whether the layer keeps torch's num_batches_tracked.
    fn has_counter(&self) -> bool {
        match self {
            BenchLayer::Batch(_, keras) => !keras,
            BenchLayer::Instance(_) => true,
            _ => false,
        }
    }

    /// γ and β, read once.
    fn forward_param_bytes(&self) -> u64 {
        let a = self.affine();
        bytes_of(a.weight.as_ref()) + bytes_of(a.bias.as_ref())
    }

    /// Running statistics read (eval) or read and written (train update).
    fn forward_stats_bytes(&self, mode: Mode) -> u64 {
        let Some(r) = self.running() else { return 0 };
        let both = r.mean.byte_len() + r.var.byte_len();
        if self.updates_running(mode) {
            2 * both + if self.has_counter() { 16 } else { 0 }
        } else if mode == Mode::Eval {
            both
        } else {
            0
        }
    }

    /// γ read, and the gradient of each affine term written.
    fn backward_param_bytes(&self) -> u64 {
        let a = self.affine();
        2 * bytes_of(a.weight.as_ref()) + bytes_of(a.bias.as_ref())
    }

    /// Statistics groups (rows, channels, (sample, group) pairs).
    fn groups(&self, shape: &[usize]) -> usize {
        let n: usize = shape.iter().product();
        match self {
            BenchLayer::Batch(l, _) => l.num_features(),
            BenchLayer::Layer(l) => n / l.normalized_shape().iter().product::<usize>().max(1),
            BenchLayer::Rms(l) => n / l.normalized_shape().iter().product::<usize>().max(1),
            BenchLayer::Group(_, groups) => shape[0] * groups,
            BenchLayer::Instance(_) => shape[0] * shape[1],
        }
    }
}

/// Parses `--shape`: positive sizes.
fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let shape: Vec<usize> = parse_list("--shape", s)?;
    if shape.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "--shape expects positive sizes, got {s:?}"
        )));
    }
    Ok(shape)
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if args.iters == Some(0) {
        return Err(Error::InvalidArgument(
            "--iters expects a positive number of timed iterations, got 0".into(),
        ));
    }
    if args.sweep {
        return sweep::run(&args);
    }
    for (flag, given) in [
        ("--plot", args.plot.is_some()),
        ("--csv", args.csv.is_some()),
    ] {
        if given {
            return Err(Error::InvalidArgument(format!(
                "{flag} applies to --sweep only"
            )));
        }
    }
    let (Some(op), Some(shape)) = (args.op, args.shape.as_deref()) else {
        return Err(Error::InvalidArgument(
            "bench needs --op and --shape (or --sweep)".into(),
        ));
    };
    let shape = parse_shape(shape)?;
    let flags = args.op_flags(op);
    check_flags(&flags)?;
    let bench = Bench::new(args.flags.adapter.clone())?;
    let settings = Settings {
        dtype: args.dtype.dtype(),
        mode: args.mode(),
        backward: args.backward,
        iters: args.iters.unwrap_or(DEFAULT_ITERS),
        warmup: WARMUP,
    };
    let m = bench.measure(&flags, &shape, &settings)?;
    m.print(args.json)?;
    Ok(ExitCode::SUCCESS)
}
