//! `gpunorm apply`: one normalization of the tensor `input` of a safetensors
//! file, with the layer's state read from and written to the same names as
//! torch's or Keras's (CLI.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Context, ContextOptions, Error, Gradients, GroupNorm,
    GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, Result, RmsNorm,
    RowNormConfig, RunningStats,
};
use safetensors::Dtype;

use crate::tensors::{self, HostTensor};

/// The normalization to apply (variant names are the CLI values).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    BatchNorm,
    LayerNorm,
    InstanceNorm,
    GroupNorm,
    RmsNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Train,
    Eval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConventionArg {
    Torch,
    Keras,
}

/// Flags of `gpunorm apply` (CLI.md). Numbers are parsed by hand so that
/// negative values work as `--axis -1` and `--axis=-2,-1`.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// batch-norm | layer-norm | instance-norm | group-norm | rms-norm
    #[arg(long, value_enum)]
    pub op: Op,
    /// Input safetensors file (tensor `input`, optional state and `grad_output`).
    #[arg(long = "in", value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Output safetensors file (`output`, updated state, gradients).
    #[arg(long = "out", value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// train | eval, as torch's train()/eval()
    #[arg(long, value_enum, default_value = "train")]
    pub mode: ModeArg,
    /// The op's hyper-parameters and the adapter.
    #[command(flatten)]
    pub flags: OpFlags,
}

/// The flags `apply` and `bench` share (CLI.md): convention, op
/// hyper-parameters, adapter.
#[derive(Debug, Clone, clap::Args)]
pub struct OpFlags {
    /// torch | keras
    #[arg(long, value_enum, default_value = "torch")]
    pub convention: ConventionArg,
    /// Default: the convention's default for the op.
    #[arg(long, allow_hyphen_values = true, value_name = "F")]
    pub eps: Option<String>,
    /// F or `none` (batch-norm, instance-norm). Default 0.1 torch, 0.99 keras.
    #[arg(long, allow_hyphen_values = true, value_name = "F|none")]
    pub momentum: Option<String>,
    /// torch layer-norm/rms-norm: D1[,D2...]. Default: weight's shape (apply), else the last dim.
    #[arg(
        long = "normalized-shape",
        allow_hyphen_values = true,
        value_name = "D1[,D2...]"
    )]
    pub normalized_shape: Option<String>,
    /// keras: channel axis of batch-norm (default -1); normalized axes of layer-norm/rms-norm (default -1).
    #[arg(long, allow_hyphen_values = true, value_name = "K[,K...]")]
    pub axis: Option<String>,
    /// group-norm: required with torch; keras default 32, -1 means one group per channel.
    #[arg(long, allow_hyphen_values = true, value_name = "G")]
    pub groups: Option<String>,
    /// Use the adapter whose name contains this.
    #[arg(long, value_name = "S")]
    pub adapter: Option<String>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

pub(crate) fn parse_f32(flag: &str, s: &str) -> Result<f32> {
    s.trim()
        .parse::<f32>()
        .map_err(|_| invalid(format!("{flag} expects a number, got {s:?}")))
}

pub(crate) fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|p| {
            p.trim().parse::<T>().map_err(|_| {
                invalid(format!(
                    "{flag} expects a comma-separated list of integers, got {s:?}"
                ))
            })
        })
        .collect()
}

/// Refuses flags that do not apply to the op and convention (CLI.md).
pub(crate) fn check_flags(a: &ApplyArgs) -> Result<()> {
    let keras = a.flags.convention == ConventionArg::Keras;
    let reject = |flag: &str, why: &str| -> Result<()> {
        Err(invalid(format!("{flag} does not apply {why}")))
    };
    if a.flags.momentum.is_some() && !matches!(a.op, Op::BatchNorm | Op::InstanceNorm) {
        reject(
            "--momentum",
            "to this op (only batch-norm and instance-norm have running statistics)",
        )?;
    }
    if a.flags.normalized_shape.is_some() {
        if keras {
            reject("--normalized-shape", "with --convention keras (use --axis)")?;
        }
        if !matches!(a.op, Op::LayerNorm | Op::RmsNorm) {
            reject(
                "--normalized-shape",
                "to this op (only layer-norm and rms-norm)",
            )?;
        }
    }
    if a.flags.axis.is_some() {
        if !keras {
            reject("--axis", "with --convention torch (torch's channel axis is 1; use --normalized-shape for layer-norm)")?;
        }
        if !matches!(a.op, Op::BatchNorm | Op::LayerNorm | Op::RmsNorm) {
            reject(
                "--axis",
                "to this op (only batch-norm, layer-norm and rms-norm)",
            )?;
        }
    }
    if a.flags.groups.is_some() && a.op != Op::GroupNorm {
        reject("--groups", "to this op (only group-norm)")?;
    }
    if keras && a.op == Op::InstanceNorm {
        return Err(invalid(
            "Keras has no instance-norm layer; use --op group-norm --groups=-1 (GroupNormalization(groups=-1))".into(),
        ));
    }
    if let Some(m) = &a.flags.momentum {
        if m.trim().eq_ignore_ascii_case("none") && keras {
            reject(
                "--momentum none",
                "with --convention keras (Keras momentum is a number)",
            )?;
        }
    }
    Ok(())
}

/// The names a file may hold for this op and convention.
fn allowed_names(op: Op, keras: bool) -> Vec<&'static str> {
    let mut names = vec!["input", "grad_output"];
    let (scale, shift) = match (keras, op) {
        (true, Op::RmsNorm) => ("scale", ""),
        (true, _) => ("gamma", "beta"),
        (false, _) => ("weight", "bias"),
    };
    names.push(scale);
    if op != Op::RmsNorm {
        names.push(shift);
    }
    if matches!(op, Op::BatchNorm | Op::InstanceNorm) {
        if keras {
            names.extend(["moving_mean", "moving_variance"]);
        } else {
            names.extend(["running_mean", "running_var", "num_batches_tracked"]);
        }
    }
    names
}

/// The state tensors of the input file, by role.
struct State<'a> {
    files: &'a BTreeMap<String, HostTensor>,
    keras: bool,
    ctx: &'a Context,
    /// Parameters may be stored as F32 or as this dtype.
    input_dtype: gpunorm::DType,
}

impl<'a> State<'a> {
    fn get(&self, name: &str) -> Option<&'a HostTensor> {
        self.files.get(name)
    }

    fn upload(&self, name: &str) -> Result<Option<gpunorm::GpuTensor>> {
        self.get(name)
            .map(|t| t.upload_param(self.ctx, name, self.input_dtype))
            .transpose()
    }

    fn scale_name(&self, op: Op) -> &'static str {
        match (self.keras, op) {
            (true, Op::RmsNorm) => "scale",
            (true, _) => "gamma",
            (false, _) => "weight",
        }
    }

    fn shift_name(&self) -> &'static str {
        if self.keras {
            "beta"
        } else {
            "bias"
        }
    }

    fn affine(&self, op: Op) -> Result<Affine> {
        Ok(Affine {
            weight: self.upload(self.scale_name(op))?,
            bias: if op == Op::RmsNorm {
                None
            } else {
                self.upload(self.shift_name())?
            },
        })
    }

    /// Refuses a parameter or running statistic of the file whose shape is
    /// not `expected`, naming it as the file does: torch's
    /// `load_state_dict` refuses a size mismatch, and the library checks
    /// only the element count.
    fn check_shapes(&self, op: Op, expected: &[usize]) -> Result<()> {
        let (mean, var) = self.running_names();
        let shift = (op != Op::RmsNorm).then(|| self.shift_name());
        for name in [Some(self.scale_name(op)), shift, Some(mean), Some(var)]
            .into_iter()
            .flatten()
        {
            match self.get(name) {
                Some(t) if t.shape != expected => {
                    return Err(Error::Shape(format!(
                        "expected {name} of shape {expected:?}, got shape {:?}",
                        t.shape
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn running_names(&self) -> (&'static str, &'static str) {
        if self.keras {
            ("moving_mean", "moving_variance")
        } else {
            ("running_mean", "running_var")
        }
    }

    /// Running mean, variance and counter; `None` when not tracked. One
    /// without the other is an error, and so are torch stats without a counter.
    #[allow(clippy::type_complexity)]
    fn running(&self) -> Result<Option<(gpunorm::GpuTensor, gpunorm::GpuTensor, Option<i64>)>> {
        let (mean_name, var_name) = self.running_names();
        let counter = self
            .get("num_batches_tracked")
            .map(|t| t.i64_scalar("num_batches_tracked"))
            .transpose()?;
        match (self.get(mean_name), self.get(var_name)) {
            (None, None) => {
                if counter.is_some() {
                    return Err(Error::State(format!(
                        "num_batches_tracked was given without {mean_name} and {var_name}"
                    )));
                }
                Ok(None)
            }
            (Some(_), None) | (None, Some(_)) => Err(Error::State(format!(
                "{mean_name} and {var_name} must be given together (running statistics are tracked only when both are present)"
            ))),
            (Some(m), Some(v)) => {
                if !self.keras && counter.is_none() {
                    return Err(Error::State(format!(
                        "{mean_name} and {var_name} were given without num_batches_tracked (an I64 of shape [])"
                    )));
                }
                Ok(Some((
                    m.upload_param(self.ctx, mean_name, self.input_dtype)?,
                    v.upload_param(self.ctx, var_name, self.input_dtype)?,
                    counter,
                )))
            }
        }
    }
}

/// Normalizes a possibly negative axis of a rank-`rank` tensor.
pub(crate) fn resolve_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(invalid(format!(
            "axis {axis} is out of range for an input of rank {rank}"
        )));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

/// The dims a Keras layer-norm/rms-norm normalizes: those of `--axis`
/// (default -1), which must be the trailing ones.
pub(crate) fn keras_normalized_shape(
    op: Op,
    axis: Option<&str>,
    shape: &[usize],
) -> Result<Vec<usize>> {
    let axes: Vec<i64> = match axis {
        Some(s) => parse_list("--axis", s)?,
        None => vec![-1],
    };
    let mut resolved = axes
        .iter()
        .map(|&k| resolve_axis(k, shape.len()))
        .collect::<Result<Vec<_>>>()?;
    resolved.sort_unstable();
    resolved.dedup();
    let first = resolved[0];
    let trailing: Vec<usize> = (first..shape.len()).collect();
    if resolved != trailing {
        return Err(invalid(format!(
            "Keras {} is supported over trailing, contiguous axes only; got axis {axes:?} for an input of rank {}",
            op.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
            shape.len()
        )));
    }
    Ok(shape[first..].to_vec())
}

/// The trailing dims a layer-norm/rms-norm normalizes.
fn normalized_shape(a: &ApplyArgs, st: &State, op: Op, shape: &[usize]) -> Result<Vec<usize>> {
    if st.keras {
        return keras_normalized_shape(op, a.flags.axis.as_deref(), shape);
    }
    // CLI.md: the weight's shape, else the last dimension (a bias alone
    // does not set it; check_shapes then holds it to that shape).
    let param_shape = st.get(st.scale_name(op)).map(|t| t.shape.clone());
    match (&a.flags.normalized_shape, param_shape) {
        (Some(s), param) => {
            let flag: Vec<usize> = parse_list("--normalized-shape", s)?;
            if let Some(p) = param {
                if p != flag {
                    return Err(Error::Shape(format!(
                        "--normalized-shape {flag:?} disagrees with the shape {p:?} of {}",
                        st.scale_name(op)
                    )));
                }
            }
            Ok(flag)
        }
        (None, Some(p)) => Ok(p),
        (None, None) => Ok(shape.last().map(|&d| vec![d]).unwrap_or_default()),
    }
}

fn eps_or(a: &ApplyArgs, default: f32) -> Result<f32> {
    a.flags
        .eps
        .as_deref()
        .map(|s| parse_f32("--eps", s))
        .transpose()
        .map(|e| e.unwrap_or(default))
}

/// `Some(m)`, or `None` for `--momentum none`; the convention's default when absent.
fn momentum_or(a: &ApplyArgs, default: f32) -> Result<Option<f32>> {
    match a.flags.momentum.as_deref().map(str::trim) {
        None => Ok(Some(default)),
        Some(s) if s.eq_ignore_ascii_case("none") => Ok(None),
        Some(s) => parse_f32("--momentum", s).map(Some),
    }
}

/// What `apply` writes: small tensors read back already, and the large ones
/// (`output`, `grad_input`) left on the device to be streamed to the file.
struct Outputs {
    tensors: BTreeMap<String, HostTensor>,
    streamed: BTreeMap<String, gpunorm::GpuTensor>,
}

impl Outputs {
    fn stream(&mut self, name: &str, t: &gpunorm::GpuTensor) {
        self.streamed.insert(name.to_string(), t.clone());
    }

    /// Writes every output to `path` (atomically).
    fn write(&self, ctx: &Context, path: &std::path::Path) -> Result<()> {
        let mut all: BTreeMap<String, tensors::Source<'_>> = self
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), tensors::Source::Host(t)))
            .collect();
        for (name, t) in &self.streamed {
            all.insert(name.clone(), tensors::Source::Device(t));
        }
        tensors::write(ctx, path, &all)
    }

    /// `grad_input` (the input's dtype) and `grad_<name>` of each affine
    /// tensor present, in that tensor's dtype (CLI.md).
    fn add_gradients(&mut self, ctx: &Context, st: &State, op: Op, g: &Gradients) -> Result<()> {
        self.stream("grad_input", &g.grad_input);
        let params = [
            (st.scale_name(op), g.grad_weight.as_ref()),
            (st.shift_name(), g.grad_bias.as_ref()),
        ];
        for (name, grad) in params {
            if let (Some(t), Some(orig)) = (grad, st.get(name)) {
                self.tensors.insert(
                    format!("grad_{name}"),
                    tensors::download_as(ctx, t, orig.dtype)?,
                );
            }
        }
        Ok(())
    }

    fn add_running(
        &mut self,
        ctx: &Context,
        st: &State,
        running: Option<&RunningStats>,
    ) -> Result<()> {
        let Some(r) = running else { return Ok(()) };
        let (mean_name, var_name) = st.running_names();
        // Written back in the dtype they came in.
        for (name, t) in [(mean_name, &r.mean), (var_name, &r.var)] {
            let dtype = st.get(name).map(|h| h.dtype).unwrap_or(Dtype::F32);
            self.tensors
                .insert(name.to_string(), tensors::download_as(ctx, t, dtype)?);
        }
        if let (Some(n), Some(orig)) = (r.num_batches_tracked(ctx)?, st.get("num_batches_tracked"))
        {
            self.tensors.insert(
                "num_batches_tracked".into(),
                HostTensor {
                    dtype: Dtype::I64,
                    shape: orig.shape.clone(),
                    data: n.to_le_bytes().to_vec().into(),
                },
            );
        }
        Ok(())
    }
}

/// `grad_output` must have the shape and dtype of `input` (SPEC.md §5).
fn check_grad_output(input: &HostTensor, dy: &HostTensor) -> Result<()> {
    let dtype = dy.float_dtype("grad_output")?;
    let input_dtype = input.float_dtype("input")?;
    if dy.shape != input.shape {
        return Err(Error::Shape(format!(
            "expected grad_output of the input's shape {:?}, got {:?}",
            input.shape, dy.shape
        )));
    }
    if dtype != input_dtype {
        return Err(Error::Dtype(format!(
            "expected grad_output of the input's dtype {input_dtype}, got {dtype}"
        )));
    }
    Ok(())
}

pub fn run(a: ApplyArgs) -> Result<ExitCode> {
    check_flags(&a)?;
    let files = tensors::read(&a.input)?;
    let keras = a.flags.convention == ConventionArg::Keras;
    let allowed = allowed_names(a.op, keras);
    for name in files.keys() {
        if !allowed.contains(&name.as_str()) {
            return Err(Error::File(format!(
                "unexpected tensor {name:?} in {}; this op and convention take {allowed:?}",
                a.input.display()
            )));
        }
    }
    let input = files.get("input").ok_or_else(|| {
        Error::File(format!(
            "{} has no tensor named \"input\"",
            a.input.display()
        ))
    })?;
    input.float_dtype("input")?;
    if let Some(dy) = files.get("grad_output") {
        check_grad_output(input, dy)?;
    }
    let ctx = Context::with_options(ContextOptions {
        adapter_name: a.flags.adapter.clone(),
        ..Default::default()
    })?;
    let st = State {
        files: &files,
        keras,
        ctx: &ctx,
        input_dtype: input.float_dtype("input")?,
    };
    let shape = input.shape.clone();
    let x = input.upload(&ctx, "input")?;
    let mode = match a.mode {
        ModeArg::Train => Mode::Train,
        ModeArg::Eval => Mode::Eval,
    };
    let mut out = Outputs {
        tensors: BTreeMap::new(),
        streamed: BTreeMap::new(),
    };
    let affine = st.affine(a.op)?;
    let dy = files
        .get("grad_output")
        .map(|t| t.upload(&ctx, "grad_output"))
        .transpose()?;
    let grads: Option<Gradients>;
    let y = match a.op {
        Op::BatchNorm => {
            let (mut config, channel_axis) = if keras {
                let axis: Vec<i64> = match &a.flags.axis {
                    Some(s) => parse_list("--axis", s)?,
                    None => vec![-1],
                };
                if axis.len() != 1 {
                    return Err(invalid(format!(
                        "batch-norm takes one --axis, got {axis:?}"
                    )));
                }
                (BatchNormConfig::keras(), axis[0])
            } else {
                (BatchNormConfig::torch(), 1)
            };
            if shape.len() < 2 {
                return Err(Error::Shape(format!(
                    "expected an input of at least 2D, got size {shape:?}"
                )));
            }
            let axis_index = resolve_axis(channel_axis, shape.len())?;
            st.check_shapes(a.op, &shape[axis_index..=axis_index])?;
            config.axis = channel_axis as isize;
            config.eps = eps_or(&a, config.eps)?;
            config.momentum = momentum_or(&a, config.momentum.unwrap_or(0.1))?;
            config.weight = false;
            config.bias = false;
            config.track_running_stats = false;
            let mut bn = BatchNorm::new(&ctx, shape[axis_index], config)?;
            bn.set_weight(affine.weight)?;
            bn.set_bias(affine.bias)?;
            bn.set_running_stats(&ctx, st.running()?)?;
            let y = bn.forward(&ctx, &x, mode)?;
            grads = dy.as_ref().map(|dy| bn.backward(&ctx, dy)).transpose()?;
            out.add_running(&ctx, &st, bn.running_stats())?;
            y
        }
        Op::InstanceNorm => {
            if shape.len() < 3 {
                return Err(Error::Shape(format!(
                    "instance-norm expects a batched input [N, C, *S] of at least 3D, got size {shape:?}"
                )));
            }
            st.check_shapes(a.op, &shape[1..2])?;
            let mut config = InstanceNormConfig::torch();
            config.eps = eps_or(&a, config.eps)?;
            config.momentum = momentum_or(&a, 0.1)?;
            let mut inorm = InstanceNorm::new(&ctx, shape[1], config)?;
            inorm.set_affine(affine)?;
            inorm.set_running_stats(&ctx, st.running()?)?;
            let y = inorm.forward(&ctx, &x, mode)?;
            grads = dy.as_ref().map(|dy| inorm.backward(&ctx, dy)).transpose()?;
            out.add_running(&ctx, &st, inorm.running_stats())?;
            y
        }
        Op::GroupNorm => {
            if shape.len() < 2 {
                return Err(Error::Shape(format!(
                    "group-norm expects an input of at least 2D, got size {shape:?}"
                )));
            }
            let mut config = if keras {
                GroupNormConfig::keras()
            } else {
                GroupNormConfig::torch()
            };
            config.eps = eps_or(&a, config.eps)?;
            let channels = if keras {
                shape[shape.len() - 1]
            } else {
                shape[1]
            };
            let groups: i64 = match (&a.flags.groups, keras) {
                (Some(s), _) => s
                    .trim()
                    .parse()
                    .map_err(|_| invalid(format!("--groups expects an integer, got {s:?}")))?,
                (None, true) => 32,
                (None, false) => {
                    return Err(invalid(
                        "--groups is required for group-norm with --convention torch".into(),
                    ))
                }
            };
            let groups = match groups {
                -1 if keras => channels,
                g if g >= 1 => g as usize,
                g => {
                    return Err(invalid(format!(
                        "--groups must be a positive integer{}, got {g}",
                        if keras { " or -1" } else { "" }
                    )))
                }
            };
            if !channels.is_multiple_of(groups) {
                return Err(Error::Shape(format!(
                    "Expected number of channels in input to be divisible by num_groups, but got input of shape {shape:?} and num_groups={groups}"
                )));
            }
            st.check_shapes(a.op, &[channels])?;
            let mut gn = GroupNorm::new(&ctx, groups, channels, config)?;
            gn.set_affine(affine)?;
            let y = gn.forward(&ctx, &x)?;
            grads = dy.as_ref().map(|dy| gn.backward(&ctx, dy)).transpose()?;
            y
        }
        Op::LayerNorm | Op::RmsNorm => {
            let dims = normalized_shape(&a, &st, a.op, &shape)?;
            st.check_shapes(a.op, &dims)?;
            let (config, rms) = match (a.op, keras) {
                (Op::LayerNorm, false) => (RowNormConfig::torch_layer_norm(), false),
                (Op::LayerNorm, true) => (RowNormConfig::keras_layer_norm(), false),
                (_, false) => (RowNormConfig::torch_rms_norm(), true),
                (_, true) => (RowNormConfig::keras_rms_norm(), true),
            };
            let config = RowNormConfig {
                eps: eps_or(&a, config.eps)?,
                weight: false,
                bias: false,
            };
            if rms {
                let mut layer = RmsNorm::new(&ctx, &dims, config)?;
                layer.set_weight(affine.weight)?;
                let y = layer.forward(&ctx, &x, mode)?;
                grads = dy.as_ref().map(|dy| layer.backward(&ctx, dy)).transpose()?;
                y
            } else {
                let mut layer = LayerNorm::new(&ctx, &dims, config)?;
                layer.set_weight(affine.weight)?;
                layer.set_bias(affine.bias)?;
                let y = layer.forward(&ctx, &x, mode)?;
                grads = dy.as_ref().map(|dy| layer.backward(&ctx, dy)).transpose()?;
                y
            }
        }
    };
    out.stream("output", &y);
    if let Some(g) = &grads {
        out.add_gradients(&ctx, &st, a.op, g)?;
    }
    out.write(&ctx, &a.output)?;
    Ok(ExitCode::SUCCESS)
}
