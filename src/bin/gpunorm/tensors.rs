//! Reading and writing the safetensors files of `apply`.

use std::collections::BTreeMap;
use std::path::Path;

use gpunorm::{Context, DType, Error, GpuTensor, Result};
use safetensors::{Dtype, SafeTensors};

/// One tensor of the input file, owned.
pub struct HostTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
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

/// Reads every tensor of a safetensors file.
pub fn read(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::File(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: the map is read-only and dropped before we return; a file
    // truncated under us would fault, which safetensors' own readers accept.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::File(format!("cannot read {}: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| {
        Error::File(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = HostTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            (name, t)
        })
        .collect())
}

/// Writes tensors to `path` atomically: to a temporary file beside it, then
/// renamed, so a failure never leaves a partial output.
pub fn write(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::File(format!("cannot encode {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| Error::File(format!("cannot write {}: {e}", path.display())))
        .and_then(|_| {
            std::fs::rename(&tmp, path)
                .map_err(|e| Error::File(format!("cannot write {}: {e}", path.display())))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A downloaded tensor in the dtype it had.
pub fn download(ctx: &Context, t: &GpuTensor) -> Result<HostTensor> {
    Ok(HostTensor {
        dtype: match t.dtype() {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        },
        shape: t.shape().to_vec(),
        data: ctx.download_bytes(t)?,
    })
}
