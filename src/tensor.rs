//! Tensors on the device: a buffer, a shape and a storage dtype.

use std::sync::Arc;

use crate::error::{Error, Result};

/// Bindings of x and y cover whole 16-byte vectors (the kernels load and
/// store `vec4<f32>`, or four packed halves): buffers are padded to a
/// multiple of this, and a wrapped buffer needs that much room past its data.
pub const BINDING_ALIGN: u64 = 16;

/// Elements of `shape` and their bytes in `dtype`, or a typed error when the
/// product overflows (a shape from user input must never panic).
pub fn checked_size(shape: &[usize], dtype: DType) -> Result<(usize, u64)> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::Shape(format!(
                "shape {shape:?} has more elements than fit in memory"
            ))
        })?;
    let bytes = numel.checked_mul(dtype.size()).ok_or_else(|| {
        Error::Shape(format!("shape {shape:?} has more bytes than fit in memory"))
    })?;
    Ok((numel, bytes as u64))
}

/// Storage type of a tensor's elements. Arithmetic is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name as the CLI and bench report it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor living in a device buffer.
///
/// Cloning is cheap: clones share the buffer. A tensor may wrap a buffer the
/// caller owns (see [`GpuTensor::from_buffer`]), so an application can
/// normalize its own activations without copying them.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    buffer: Arc<wgpu::Buffer>,
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
    /// The uid of the [`crate::Context`] that allocated the buffer; `None`
    /// for a wrapped buffer, whose device wgpu cannot tell us.
    owner: Option<u64>,
}

impl GpuTensor {
    /// Wraps `buffer` (from byte `offset` on) as a tensor of `shape`.
    ///
    /// The buffer needs `STORAGE` usage (and `COPY_SRC` to be downloaded);
    /// the offset must be a multiple of the device's storage-buffer offset
    /// alignment (256 on most adapters). Use the tensor only with the
    /// context of the device that created the buffer: wgpu does not say
    /// which device a buffer belongs to, so this one cannot be checked
    /// (tensors the crate allocates are, and another context refuses them).
    pub fn from_buffer(
        buffer: Arc<wgpu::Buffer>,
        offset: u64,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        checked_size(shape, dtype)?;
        let tensor = GpuTensor {
            buffer,
            offset,
            shape: shape.to_vec(),
            dtype,
            owner: None,
        };
        let end = offset + tensor.binding_size();
        if end > tensor.buffer.size() {
            return Err(Error::Shape(format!(
                "a tensor of shape {shape:?} ({dtype}) at offset {offset} needs {end} bytes (its data rounded up to 16 bytes), but the buffer has {}",
                tensor.buffer.size()
            )));
        }
        if !offset.is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "a tensor's offset must be a multiple of 4 bytes, got {offset}"
            )));
        }
        // Without STORAGE every pass binding it would fail in wgpu, after
        // the caller's encoder had taken the recorded work.
        if !tensor.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::InvalidArgument(format!(
                "a tensor's buffer needs STORAGE usage, got {:?}",
                tensor.buffer.usage()
            )));
        }
        Ok(tensor)
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of data (without the padding to a multiple of 4).
    pub fn byte_len(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &Arc<wgpu::Buffer> {
        &self.buffer
    }

    /// Byte offset of the first element in the buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The bytes a binding of this tensor covers: its data rounded up to a
    /// multiple of [`BINDING_ALIGN`] (storage bindings must be a multiple of
    /// 4), at least one.
    pub(crate) fn binding_size(&self) -> u64 {
        self.byte_len().div_ceil(BINDING_ALIGN).max(1) * BINDING_ALIGN
    }

    /// A binding of this tensor's bytes.
    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.binding_size()),
        })
    }

    /// A binding of `tensor`, or of the placeholder `fallback` where the
    /// layer has no such tensor (every binding of a layout must be bound).
    pub(crate) fn binding_or<'a>(
        tensor: Option<&'a GpuTensor>,
        fallback: &'a wgpu::Buffer,
    ) -> wgpu::BindingResource<'a> {
        tensor.map_or_else(|| fallback.as_entire_binding(), |t| t.binding())
    }

    /// A binding of elements `lo..hi` (an even `lo` at an aligned offset for
    /// the chunked path), rounded up to whole 16-byte vectors, at least one.
    pub(crate) fn binding_elements(&self, lo: usize, hi: usize) -> wgpu::BindingResource<'_> {
        let size = self.dtype.size() as u64;
        let start = self.offset + lo as u64 * size;
        let bytes = ((hi - lo) as u64 * size).div_ceil(BINDING_ALIGN).max(1) * BINDING_ALIGN;
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: start,
            size: wgpu::BufferSize::new(bytes),
        })
    }

    /// Marks the tensor as allocated by the context of uid `context`.
    pub(crate) fn owned_by(mut self, context: u64) -> Self {
        self.owner = Some(context);
        self
    }

    /// The uid of the context that allocated the buffer, if known.
    pub(crate) fn owner(&self) -> Option<u64> {
        self.owner
    }

    /// Whether two tensors share a buffer (used to refuse aliasing). wgpu
    /// buffers compare by identity, so two clones of one buffer wrapped in
    /// separate `Arc`s are the same buffer too.
    pub(crate) fn same_buffer(&self, other: &GpuTensor) -> bool {
        *self.buffer == *other.buffer
    }
}

/// Converts f32 values to the bytes of `dtype`, rounding to nearest even.
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Converts the little-endian bytes of `dtype` to f32 values (exactly).
pub fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}
