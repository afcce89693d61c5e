//! Reading and writing the safetensors files of `apply`.
//!
//! Large files are never copied whole: the input stays memory-mapped and is
//! uploaded in pieces, and the large outputs are streamed from the device to
//! the file, so the peak resident memory of `apply` stays near the input, the
//! output and the device copies (which on lavapipe live in host memory).

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::Arc;

use gpunorm::{Context, DType, Error, GpuTensor, Result};
use safetensors::{Dtype, SafeTensors};

/// The bytes of a tensor: in memory, or a range of the mapped input file.
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped(Arc<memmap2::Mmap>, Range<usize>),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(map, range) => &map[range.clone()],
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes::Owned(v)
    }
}

/// One tensor of a file.
pub struct HostTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl HostTensor {
    /// The storage dtype, if it is a float type the engine takes.
    pub fn float_dtype(&self, name: &str) -> Result<DType> {
        match self.dtype {
            Dtype::F32 => Ok(DType::F32),
            Dtype::F16 => Ok(DType::F16),
            Dtype::BF16 => Ok(DType::BF16),
            other => Err(Error::Dtype(format!(
                "expected {name} of dtype F32, F16 or BF16, got {other:?}"
            ))),
        }
    }

    /// Uploads a float tensor.
    pub fn upload(&self, ctx: &Context, name: &str) -> Result<GpuTensor> {
        let dtype = self.float_dtype(name)?;
        ctx.upload_bytes(&self.data, &self.shape, dtype)
    }

    /// Uploads a parameter or running statistic in its own dtype, which
    /// must be F32 or the input's (SPEC.md §5; the library checks the same
    /// rule, this names the tensor as the file does).
    pub fn upload_param(&self, ctx: &Context, name: &str, input: DType) -> Result<GpuTensor> {
        let dtype = self.float_dtype(name)?;
        if dtype != DType::F32 && dtype != input {
            return Err(Error::Dtype(format!(
                "expected {name} of dtype F32 or the input's {input}, got {dtype}"
            )));
        }
        ctx.upload_bytes(&self.data, &self.shape, dtype)
    }

    /// Reads an i64 scalar (`[]` or `[1]`), as num_batches_tracked is stored.
    pub fn i64_scalar(&self, name: &str) -> Result<i64> {
        let numel: usize = self.shape.iter().product();
        if self.dtype != Dtype::I64 || numel != 1 || self.shape.len() > 1 {
            return Err(Error::Dtype(format!(
                "expected {name} as an I64 scalar of shape [] or [1], got {:?} of shape {:?}",
                self.dtype, self.shape
            )));
        }
        Ok(i64::from_le_bytes(
            self.data[..8].try_into().unwrap_or([0; 8]),
        ))
    }
}

/// Reads every tensor of a safetensors file (mapped, not copied).
pub fn read(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::File(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: the map is read-only; like safetensors' own readers we accept
    // that a file truncated by another process while we run would fault.
    let map = Arc::new(
        unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::File(format!("cannot read {}: {e}", path.display())))?,
    );
    let st = SafeTensors::deserialize(&map).map_err(|e| {
        Error::File(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let base = map.as_ptr() as usize;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let start = view.data().as_ptr() as usize - base;
            let t = HostTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: Bytes::Mapped(map.clone(), start..start + view.data().len()),
            };
            (name, t)
        })
        .collect())
}

/// A tensor to write: from host memory, or streamed from the device.
pub enum Source<'a> {
    Host(&'a HostTensor),
    Device(&'a GpuTensor),
}

fn st_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

impl Source<'_> {
    fn meta(&self) -> (Dtype, Vec<usize>, u64) {
        match self {
            Source::Host(t) => (t.dtype, t.shape.clone(), t.data.len() as u64),
            Source::Device(t) => (st_dtype(t.dtype()), t.shape().to_vec(), t.byte_len()),
        }
    }
}

/// Writes tensors to `path` in the safetensors format, atomically: to a
/// temporary file beside it, then renamed, so a failure never leaves a
/// partial output. Device tensors are streamed in pieces.
pub fn write(ctx: &Context, path: &Path, tensors: &BTreeMap<String, Source<'_>>) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let fail = |e: std::io::Error| Error::File(format!("cannot write {}: {e}", path.display()));
    let result = (|| {
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        for (name, source) in tensors {
            let (dtype, shape, len) = source.meta();
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": format!("{dtype:?}"),
                    "shape": shape,
                    "data_offsets": [offset, offset + len],
                }),
            );
            offset += len;
        }
        let mut header = serde_json::to_vec(&header)
            .map_err(|e| Error::File(format!("cannot encode the header: {e}")))?;
        // The format pads the header with spaces to a multiple of 8 bytes.
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let file = std::fs::File::create(&tmp).map_err(fail)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(fail)?;
        out.write_all(&header).map_err(fail)?;
        for source in tensors.values() {
            match source {
                Source::Host(t) => out.write_all(&t.data).map_err(fail)?,
                Source::Device(t) => ctx.download_to(t, &mut out)?,
            }
        }
        out.into_inner()
            .map_err(|e| fail(e.into_error()))?
            .sync_all()
            .map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A downloaded f32 tensor stored as `dtype` (rounded once, to nearest even).
pub fn download_as(ctx: &Context, t: &GpuTensor, dtype: Dtype) -> Result<HostTensor> {
    let values = ctx.download(t)?;
    let (dtype, storage) = match dtype {
        Dtype::F16 => (Dtype::F16, DType::F16),
        Dtype::BF16 => (Dtype::BF16, DType::BF16),
        _ => (Dtype::F32, DType::F32),
    };
    Ok(HostTensor {
        dtype,
        shape: t.shape().to_vec(),
        data: gpunorm::tensor::encode(&values, storage).into(),
    })
}
