//! State import and export: each layer's parameters and running statistics
//! to and from safetensors files, under torch's or Keras's names (SPEC.md §7).
//!
//! A [`StateDict`] is a name → [`HostTensor`] map held in host memory, read
//! from and written to safetensors. Layers move their state in and out of it
//! through the [`Stateful`] trait, optionally under a key prefix, so one file
//! holds a whole model: a torch `model.state_dict()` saved with
//! `safetensors.torch.save_file` has keys like `bn1.weight`, which
//! `bn.load_state(ctx, &dict, "bn1", Convention::Torch)` reads.
//!
//! | | torch | Keras |
//! |---|---|---|
//! | scale | `weight` | `gamma` (RMSNorm: `scale`) |
//! | shift | `bias` | `beta` |
//! | running mean | `running_mean` | `moving_mean` |
//! | running variance | `running_var` | `moving_variance` |
//! | counter | `num_batches_tracked` (I64, shape `[]`) | — |
//!
//! Dtypes: as torch's `load_state_dict`, a load converts each tensor to the
//! dtype of the layer's own (f32 for a fresh layer; f16 or bf16 where the
//! caller set half-precision ones): F32, F16 and BF16 values are taken
//! exactly where that dtype holds them and rounded to nearest even where it
//! does not, F64 values are rounded to f32 first; any other dtype is an
//! [`Error::Dtype`]. The counter is read from an I64 (or I32) scalar.
//! Export writes each tensor in its own dtype (and the counter as an I64
//! scalar of shape `[]`), so a state round-trips bit-exactly.
//!
//! Loading is all or nothing, like torch's strict `load_state_dict`: every
//! tensor the layer has must be present with the layer's shape, and no
//! tensor the layer lacks may be present under the prefix (a `bias` for a
//! layer without β is an error, as is `running_mean` without `running_var`,
//! or a misspelled `weights`). With an empty prefix the layer's keys are
//! those without the convention's separator (`.` or `/`), so other layers'
//! keys in a whole model's file are left to them. On any error the layer is
//! left exactly as it was.
//!
//! ```
//! use gpunorm::state::{StateDict, Stateful};
//! use gpunorm::{BatchNorm, BatchNormConfig, Context, Convention};
//!
//! let ctx = Context::new()?;
//! let bn = BatchNorm::new(&ctx, 3, BatchNormConfig::torch_2d())?;
//! let mut dict = StateDict::new();
//! bn.save_state(&ctx, &mut dict, "bn1", Convention::Torch)?;
//! assert!(dict.get("bn1.running_var").is_some());
//!
//! let bytes = dict.to_bytes()?; // or dict.save(path)
//! let mut copy = BatchNorm::new(&ctx, 3, BatchNormConfig::torch_2d())?;
//! copy.load_state(&ctx, &StateDict::from_bytes(&bytes)?, "bn1", Convention::Torch)?;
//! # Ok::<(), gpunorm::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::norm::batch::BatchNorm;
use crate::norm::group::GroupNorm;
use crate::norm::instance::InstanceNorm;
use crate::norm::layer::{LayerNorm, RmsNorm};
use crate::norm::{Affine, Convention, RunningStats};
use crate::tensor::{decode, DType, GpuTensor};

/// One tensor of a state file, kept in its file dtype until a layer reads it
/// (so tensors of other layers, whatever their dtype, survive a load and a
/// save untouched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl HostTensor {
    /// A tensor from raw little-endian bytes; their length must match the
    /// shape and dtype.
    pub fn new(dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Result<Self> {
        safetensors::tensor::TensorView::new(dtype, shape.to_vec(), &data).map_err(|e| {
            Error::Shape(format!(
                "{} bytes do not hold a {dtype:?} tensor of shape {shape:?}: {e}",
                data.len()
            ))
        })?;
        Ok(HostTensor {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    /// An F32 tensor of `shape` holding `values` (bit for bit).
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Result<Self> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        HostTensor::new(Dtype::F32, shape, bytes)
    }

    /// An I64 tensor of `shape` holding `values`.
    pub fn from_i64(shape: &[usize], values: &[i64]) -> Result<Self> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        HostTensor::new(Dtype::I64, shape, bytes)
    }

    /// An I64 scalar of shape `[]`, as torch stores `num_batches_tracked`.
    pub fn scalar_i64(value: i64) -> Self {
        HostTensor {
            dtype: Dtype::I64,
            shape: Vec::new(),
            data: value.to_le_bytes().to_vec(),
        }
    }

    /// The file dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The dimensions, outermost first (`[]` for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The values as f32: F32 exactly, F16 and BF16 widened exactly, F64
    /// rounded to nearest; other dtypes are an [`Error::Dtype`].
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            Dtype::F32 => decode(&self.data, DType::F32),
            Dtype::F16 => decode(&self.data, DType::F16),
            Dtype::BF16 => decode(&self.data, DType::BF16),
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(Error::Dtype(format!(
                    "expected a floating-point tensor (F32, F16, BF16 or F64), got {other:?}"
                )))
            }
        })
    }

    /// The values as i64: I64 exactly, I32 widened; other dtypes are an
    /// [`Error::Dtype`].
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        Ok(match self.dtype {
            Dtype::I64 => self
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => self
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
                .collect(),
            other => {
                return Err(Error::Dtype(format!(
                    "expected an integer tensor (I64 or I32), got {other:?}"
                )))
            }
        })
    }
}

/// Named tensors, as a safetensors file or a torch `state_dict()` holds them.
///
/// Keys are kept sorted; every tensor of a loaded file is kept (not only the
/// ones a layer understands), so loading a model's checkpoint, updating one
/// layer and saving writes every other tensor back unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateDict {
    tensors: BTreeMap<String, HostTensor>,
}

impl StateDict {
    /// An empty dictionary.
    pub fn new() -> Self {
        StateDict::default()
    }

    /// Reads a safetensors file. Malformed files (bad header, lengths that
    /// do not match the data) are an [`Error::File`]; nothing larger than
    /// the file itself is allocated.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::File(format!("cannot read {}: {e}", path.display())))?;
        StateDict::from_bytes(&bytes).map_err(|e| match e {
            Error::File(msg) => Error::File(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses the bytes of a safetensors file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::File(format!("not a valid safetensors file: {e}")))?;
        let tensors = st
            .iter()
            .map(|(name, view)| {
                (
                    name.to_string(),
                    HostTensor {
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        data: view.data().to_vec(),
                    },
                )
            })
            .collect();
        Ok(StateDict { tensors })
    }

    /// The bytes of a safetensors file holding every tensor.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        safetensors::serialize(self.views()?, None)
            .map_err(|e| Error::File(format!("cannot serialize the state: {e}")))
    }

    /// Writes a safetensors file. The bytes are built first and written to a
    /// temporary file next to `path`, then renamed over it, so a failure
    /// leaves an existing file as it was.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let written = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::File(format!("cannot write {}: {e}", path.display()))
        })
    }

    fn views(&self) -> Result<Vec<(&str, safetensors::tensor::TensorView<'_>)>> {
        self.tensors
            .iter()
            .map(|(name, t)| {
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| Error::File(format!("tensor {name}: {e}")))
            })
            .collect()
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// Adds or replaces a tensor, returning the one it replaced.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) -> Option<HostTensor> {
        self.tensors.insert(name.into(), tensor)
    }

    /// Removes a tensor.
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensors with their names, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// The key of `name` under `prefix`: torch joins with `.` (`bn1.weight`),
/// Keras with `/` (`batch_normalization/gamma`); a prefix that already ends
/// in `.` or `/` is used as given, and an empty prefix adds nothing.
pub fn key(prefix: &str, name: &str, convention: Convention) -> String {
    if prefix.is_empty() || prefix.ends_with('.') || prefix.ends_with('/') {
        format!("{prefix}{name}")
    } else {
        format!("{prefix}{}{name}", separator(convention))
    }
}

/// What joins a prefix and a name: `.` for torch, `/` for Keras.
fn separator(convention: Convention) -> char {
    match convention {
        Convention::Torch => '.',
        Convention::Keras => '/',
    }
}

/// A layer whose parameters and running statistics can be loaded from and
/// saved to a [`StateDict`] under torch or Keras names (SPEC.md §7).
///
/// The `convention` argument picks the names only; the layer's own config
/// keeps deciding its semantics. A layer that keeps a `num_batches_tracked`
/// counter loaded from Keras names (which have none) gets a counter of 0; a
/// layer without a counter saved under torch names writes 0, so torch's
/// strict `load_state_dict` accepts the file.
pub trait Stateful {
    /// Replaces the layer's parameters and running statistics with the
    /// tensors under `prefix`. All or nothing: on error the layer is
    /// unchanged ([`Error::State`] for a missing, unexpected or partial
    /// tensor set, [`Error::Shape`] for a shape that is not the layer's,
    /// [`Error::Dtype`] for a dtype that is not a float, or a counter that
    /// is not an integer).
    fn load_state(
        &mut self,
        ctx: &Context,
        state: &StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()>;

    /// Adds the layer's parameters and running statistics to `state` under
    /// `prefix` (each in its own dtype, the counter as an I64 scalar),
    /// replacing tensors of
    /// the same names. Waits for the device to read them back.
    fn save_state(
        &self,
        ctx: &Context,
        state: &mut StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()>;

    /// The layer's state alone, without a prefix.
    fn state(&self, ctx: &Context, convention: Convention) -> Result<StateDict> {
        let mut dict = StateDict::new();
        self.save_state(ctx, &mut dict, "", convention)?;
        Ok(dict)
    }
}

/// What a layer holds, described for import and export.
struct Layout<'a> {
    /// Shape of γ and β (`[C]`, or `normalized_shape` for row norms).
    param_shape: Vec<usize>,
    affine: &'a Affine,
    running: Option<&'a RunningStats>,
    /// RMSNorm: Keras calls γ `scale`.
    rms: bool,
    /// BatchNorm and InstanceNorm: running statistics are part of the state
    /// (whether or not this layer tracks them).
    has_running_slots: bool,
}

/// Validated, uploaded tensors waiting to be installed in a layer.
struct Loaded {
    weight: Option<GpuTensor>,
    bias: Option<GpuTensor>,
    /// Mean, variance and, when the layer keeps one, the counter.
    running: Option<(GpuTensor, GpuTensor, Option<i64>)>,
}

fn names(convention: Convention, rms: bool) -> [&'static str; 5] {
    match convention {
        Convention::Torch => [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ],
        Convention::Keras => [
            if rms { "scale" } else { "gamma" },
            "beta",
            "moving_mean",
            "moving_variance",
            "",
        ],
    }
}

/// The tensor under `key`, uploaded in `dtype` (the layer's own tensor's,
/// as torch's `load_state_dict` copies into the existing parameter).
fn read_floats(
    ctx: &Context,
    state: &StateDict,
    key: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<Option<GpuTensor>> {
    let Some(t) = state.get(key) else {
        return Ok(None);
    };
    if t.shape() != shape {
        return Err(Error::Shape(format!(
            "size mismatch for {key}: the file holds shape {:?}, the layer expects {shape:?}",
            t.shape()
        )));
    }
    let values = t
        .to_f32()
        .map_err(|e| Error::Dtype(format!("{key}: {e}")))?;
    let len = values.len();
    ctx.upload_as(&values, &[len], dtype).map(Some)
}

fn read_counter(state: &StateDict, key: &str) -> Result<Option<i64>> {
    let Some(t) = state.get(key) else {
        return Ok(None);
    };
    if t.numel() != 1 || t.shape().len() > 1 {
        return Err(Error::Shape(format!(
            "expected {key} as a scalar of shape [] or [1], got shape {:?}",
            t.shape()
        )));
    }
    let values = t
        .to_i64()
        .map_err(|e| Error::Dtype(format!("{key}: {e}")))?;
    Ok(values.first().copied())
}

fn missing(key: &str) -> Error {
    Error::State(format!("missing {key} in the state"))
}

fn unexpected(key: &str, why: &str) -> Error {
    Error::State(format!("unexpected {key} in the state: {why}"))
}

/// Refuses a tensor under the layer's prefix that no layer of its kind has
/// (a misspelled `weights`, a `running_variance`, a `running_mean` for a
/// LayerNorm, a counter for a BatchNorm without running statistics), as
/// torch's strict `load_state_dict` does. With an empty prefix the layer's
/// keys are those without the convention's separator: a whole model's file
/// loads one layer by its prefix, and the others' keys are theirs.
/// Tensors a layer of the kind has but this one lacks (a bias without β)
/// are refused by [`read_layout`], with the reason.
fn check_no_stray_keys(
    layout: &Layout,
    state: &StateDict,
    prefix: &str,
    convention: Convention,
) -> Result<()> {
    let [w, b, m, v, n] = names(convention, layout.rms);
    let mut known = vec![w, b];
    if layout.has_running_slots {
        known.extend([m, v]);
        // torch names write a counter for every tracked layer (0 for one
        // made under the Keras convention, which reads it back as nothing).
        if convention == Convention::Torch && layout.running.is_some() {
            known.push(n);
        }
    }
    let head = key(prefix, "", convention);
    let sep = separator(convention);
    for name in state.keys() {
        let Some(rest) = name.strip_prefix(head.as_str()) else {
            continue;
        };
        if head.is_empty() && rest.contains(sep) {
            continue;
        }
        if !known.contains(&rest) {
            let why = if !n.is_empty() && rest == n && layout.has_running_slots {
                "the layer does not track running statistics"
            } else {
                "this layer has no tensor of that name"
            };
            return Err(unexpected(name, why));
        }
    }
    Ok(())
}

/// Reads and uploads everything the layer needs, checking that the set of
/// tensors matches the layer; touches nothing of the layer.
fn read_layout(
    ctx: &Context,
    layout: &Layout,
    state: &StateDict,
    prefix: &str,
    convention: Convention,
) -> Result<Loaded> {
    let [w, b, m, v, n] = names(convention, layout.rms);
    let k = |name: &str| key(prefix, name, convention);
    check_no_stray_keys(layout, state, prefix, convention)?;
    let one = |name: &str, own: Option<&GpuTensor>, what: &str| -> Result<Option<GpuTensor>> {
        let key = k(name);
        match (own, state.get(&key).is_some()) {
            (Some(t), true) => read_floats(ctx, state, &key, &layout.param_shape, t.dtype()),
            (Some(_), false) => Err(missing(&key)),
            (None, true) => Err(unexpected(&key, what)),
            (None, false) => Ok(None),
        }
    };
    let weight = one(
        w,
        layout.affine.weight.as_ref(),
        "the layer has no weight (scale)",
    )?;
    let bias = one(
        b,
        layout.affine.bias.as_ref(),
        "the layer has no bias (center)",
    )?;
    let running = if layout.has_running_slots {
        let (mk, vk) = (k(m), k(v));
        let (has_m, has_v) = (state.get(&mk).is_some(), state.get(&vk).is_some());
        if has_m != has_v {
            let (have, lack) = if has_m { (&mk, &vk) } else { (&vk, &mk) };
            return Err(Error::State(format!(
                "partial state: {have} without {lack}"
            )));
        }
        match (layout.running, has_m) {
            (None, false) => None,
            (None, true) => {
                return Err(unexpected(
                    &mk,
                    "the layer does not track running statistics",
                ))
            }
            (Some(_), false) => return Err(missing(&mk)),
            (Some(r), true) => {
                let channels = [layout.param_shape.iter().product()];
                let count = match (r.counter.is_some(), convention) {
                    (false, _) => None,
                    (true, Convention::Keras) => Some(0),
                    (true, Convention::Torch) => {
                        let nk = k(n);
                        match read_counter(state, &nk)? {
                            Some(c) => Some(c),
                            None => {
                                return Err(Error::State(format!(
                                    "partial state: {mk} and {vk} without {nk} (the torch convention needs the counter)"
                                )))
                            }
                        }
                    }
                };
                let read = |key: &String, own: &GpuTensor| {
                    read_floats(ctx, state, key, &channels, own.dtype())?
                        .ok_or_else(|| missing(key))
                };
                let mean = read(&mk, &r.mean)?;
                let var = read(&vk, &r.var)?;
                Some((mean, var, count))
            }
        }
    } else {
        None
    };
    Ok(Loaded {
        weight,
        bias,
        running,
    })
}

fn download_into(
    ctx: &Context,
    state: &mut StateDict,
    key: String,
    tensor: &GpuTensor,
    shape: &[usize],
) -> Result<()> {
    let dtype = match tensor.dtype() {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    };
    state.insert(
        key,
        HostTensor::new(dtype, shape, ctx.download_bytes(tensor)?)?,
    );
    Ok(())
}

/// Downloads everything first, then inserts, so a failed read-back leaves
/// `state` as it was.
fn write_layout(
    ctx: &Context,
    layout: &Layout,
    state: &mut StateDict,
    prefix: &str,
    convention: Convention,
) -> Result<()> {
    let [w, b, m, v, n] = names(convention, layout.rms);
    let k = |name: &str| key(prefix, name, convention);
    let mut out = StateDict::new();
    if let Some(t) = &layout.affine.weight {
        download_into(ctx, &mut out, k(w), t, &layout.param_shape)?;
    }
    if let Some(t) = &layout.affine.bias {
        download_into(ctx, &mut out, k(b), t, &layout.param_shape)?;
    }
    if let Some(r) = layout.running {
        let channels = [layout.param_shape.iter().product()];
        download_into(ctx, &mut out, k(m), &r.mean, &channels)?;
        download_into(ctx, &mut out, k(v), &r.var, &channels)?;
        if convention == Convention::Torch {
            let count = r.num_batches_tracked(ctx)?.unwrap_or(0);
            out.insert(k(n), HostTensor::scalar_i64(count));
        }
    }
    state.tensors.extend(out.tensors);
    Ok(())
}

impl Stateful for BatchNorm {
    fn load_state(
        &mut self,
        ctx: &Context,
        state: &StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        let loaded = read_layout(ctx, &self.layout(), state, prefix, convention)?;
        // The running statistics first: the only setter that can fail
        // (allocating the counter) runs before anything is replaced.
        if let Some(stats) = loaded.running {
            self.set_running_stats(ctx, Some(stats))?;
        }
        // Each is `Some` exactly when the layer has that parameter.
        self.set_weight(loaded.weight)?;
        self.set_bias(loaded.bias)
    }

    fn save_state(
        &self,
        ctx: &Context,
        state: &mut StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        write_layout(ctx, &self.layout(), state, prefix, convention)
    }
}

impl BatchNorm {
    fn layout(&self) -> Layout<'_> {
        Layout {
            param_shape: vec![self.num_features()],
            affine: self.affine(),
            running: self.running_stats(),
            rms: false,
            has_running_slots: true,
        }
    }
}

impl Stateful for InstanceNorm {
    fn load_state(
        &mut self,
        ctx: &Context,
        state: &StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        let loaded = read_layout(ctx, &self.layout(), state, prefix, convention)?;
        if let Some(stats) = loaded.running {
            self.set_running_stats(ctx, Some(stats))?;
        }
        self.set_affine(Affine {
            weight: loaded.weight,
            bias: loaded.bias,
        })
    }

    fn save_state(
        &self,
        ctx: &Context,
        state: &mut StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        write_layout(ctx, &self.layout(), state, prefix, convention)
    }
}

impl InstanceNorm {
    fn layout(&self) -> Layout<'_> {
        Layout {
            param_shape: vec![self.num_features()],
            affine: self.affine(),
            running: self.running_stats(),
            rms: false,
            has_running_slots: true,
        }
    }
}

impl Stateful for GroupNorm {
    fn load_state(
        &mut self,
        ctx: &Context,
        state: &StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        let loaded = read_layout(ctx, &self.layout(), state, prefix, convention)?;
        self.set_affine(Affine {
            weight: loaded.weight,
            bias: loaded.bias,
        })
    }

    fn save_state(
        &self,
        ctx: &Context,
        state: &mut StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        write_layout(ctx, &self.layout(), state, prefix, convention)
    }
}

impl GroupNorm {
    fn layout(&self) -> Layout<'_> {
        Layout {
            param_shape: vec![self.num_channels()],
            affine: self.affine(),
            running: None,
            rms: false,
            has_running_slots: false,
        }
    }
}

impl Stateful for LayerNorm {
    fn load_state(
        &mut self,
        ctx: &Context,
        state: &StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        let loaded = read_layout(ctx, &self.layout(), state, prefix, convention)?;
        self.set_weight(loaded.weight)?;
        self.set_bias(loaded.bias)
    }

    fn save_state(
        &self,
        ctx: &Context,
        state: &mut StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        write_layout(ctx, &self.layout(), state, prefix, convention)
    }
}

impl LayerNorm {
    fn layout(&self) -> Layout<'_> {
        Layout {
            param_shape: self.normalized_shape().to_vec(),
            affine: self.affine(),
            running: None,
            rms: false,
            has_running_slots: false,
        }
    }
}

impl Stateful for RmsNorm {
    fn load_state(
        &mut self,
        ctx: &Context,
        state: &StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        let loaded = read_layout(ctx, &self.layout(), state, prefix, convention)?;
        self.set_weight(loaded.weight)
    }

    fn save_state(
        &self,
        ctx: &Context,
        state: &mut StateDict,
        prefix: &str,
        convention: Convention,
    ) -> Result<()> {
        write_layout(ctx, &self.layout(), state, prefix, convention)
    }
}

impl RmsNorm {
    fn layout(&self) -> Layout<'_> {
        Layout {
            param_shape: self.normalized_shape().to_vec(),
            affine: self.affine(),
            running: None,
            rms: true,
            has_running_slots: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_with_the_convention_separator() {
        assert_eq!(key("", "weight", Convention::Torch), "weight");
        assert_eq!(key("bn1", "weight", Convention::Torch), "bn1.weight");
        assert_eq!(key("bn1.", "weight", Convention::Torch), "bn1.weight");
        assert_eq!(key("bn", "gamma", Convention::Keras), "bn/gamma");
        assert_eq!(
            key("model/bn/", "gamma", Convention::Keras),
            "model/bn/gamma"
        );
    }

    #[test]
    fn host_tensors_convert_half_and_double_to_f32() {
        let h = HostTensor::new(
            Dtype::F16,
            &[2],
            [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .unwrap();
        assert_eq!(h.to_f32().unwrap(), vec![1.5, -2.0]);
        let d = HostTensor::new(Dtype::F64, &[1], 0.1f64.to_le_bytes().to_vec()).unwrap();
        assert_eq!(d.to_f32().unwrap(), vec![0.1f32]);
        assert!(matches!(
            HostTensor::scalar_i64(3).to_f32(),
            Err(Error::Dtype(_))
        ));
        assert!(HostTensor::new(Dtype::F32, &[3], vec![0; 8]).is_err());
    }

    #[test]
    fn state_dicts_round_trip_through_bytes() {
        let mut d = StateDict::new();
        d.insert(
            "a.weight",
            HostTensor::from_f32(&[2], &[1.0, -0.0]).unwrap(),
        );
        d.insert("a.num_batches_tracked", HostTensor::scalar_i64(7));
        let back = StateDict::from_bytes(&d.to_bytes().unwrap()).unwrap();
        assert_eq!(back, d);
        assert!(matches!(
            StateDict::from_bytes(b"garbage"),
            Err(Error::File(_))
        ));
    }
}
