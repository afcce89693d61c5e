//! The device a [`crate::GpuTensor`] lives on: adapter choice, limits, the
//! pipeline cache, uploads and downloads.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::PipelineCache;
use crate::tensor::{decode, encode, DType, GpuTensor};

/// Bytes moved per piece by uploads and [`Context::download_to`]: large
/// enough to amortize a submission, small next to any tensor worth
/// streaming.
pub const TRANSFER_CHUNK: usize = 16 << 20;

/// Environment variable that picks an adapter by (part of) its name.
pub const ADAPTER_ENV: &str = "GPUNORM_ADAPTER";

/// How [`Context::with_options`] picks and configures its device.
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// Use the first adapter whose name contains this (case-insensitive).
    /// When `None`, the `GPUNORM_ADAPTER` environment variable is read.
    pub adapter_name: Option<String>,
    /// Pretend the adapter binds at most this many bytes per storage buffer,
    /// so tests exercise the chunked path for large tensors on small data.
    pub max_storage_binding: Option<u64>,
    /// Pretend the adapter's buffers hold at most this many bytes (for tests
    /// of the too-large error on small data).
    pub max_buffer_size: Option<u64>,
    /// Use the workgroup-memory kernels even where the adapter has
    /// subgroups (so tests cover both paths on one adapter).
    pub disable_subgroups: bool,
    /// Choose and size kernels as for a GPU even where the adapter is a
    /// CPU (lavapipe), so tests on a machine without a GPU run the kernels
    /// and dispatch sizes a GPU gets (see [`crate::engine::Caps::cpu`]).
    pub size_for_gpu: bool,
}

/// What the context knows of its adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// The adapter's name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Backend, lower case (`vulkan`, `metal`, ...).
    pub backend: String,
    /// Device type (`DiscreteGpu`, `Cpu`, ...).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
}

impl AdapterSummary {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend).to_lowercase(),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
        }
    }
}

/// A wgpu device and queue with the crate's pipelines.
///
/// Build one with [`Context::new`] (picks the best adapter: a discrete GPU,
/// then an integrated one, then a software rasterizer such as lavapipe) or
/// embed in a device you already have with [`Context::from_wgpu`].
pub struct Context {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) pipelines: PipelineCache,
    /// Pipelines of the backward pass.
    pub(crate) backward: crate::backward::BackwardCache,
    /// Pipelines of the half-precision parameter casts.
    pub(crate) casts: crate::norm::half_params::CastPipelines,
    adapter: Option<AdapterSummary>,
    max_storage_binding: u64,
    max_buffer: u64,
    /// Subgroup operations are enabled on the device and wanted.
    subgroups: bool,
    /// Largest subgroup size the adapter may use (dispatch sizing only).
    subgroup_max: u32,
    /// Smallest subgroup size the adapter may use: how many lanes a row
    /// held in registers can count on (rows_held.wgsl).
    subgroup_min: u32,
    /// The adapter is a CPU (lavapipe): a few workgroups in flight fill it.
    cpu: bool,
    /// Placeholder buffers bound where an op has no tensor (no weight, no
    /// running stats): one per binding slot, so no two writable bindings of
    /// one dispatch alias.
    pub(crate) dummies: [wgpu::Buffer; 9],
    /// Distinct for every context of the process: what a layer keeps from
    /// one context (its bind groups) is never reused on another, whose
    /// wgpu ids may coincide with this one's.
    pub(crate) uid: u64,
}

/// Rank of an adapter: lower is better.
fn adapter_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (device, backend)
}

/// The one wgpu instance behind every context [`Context::new`] makes on a
/// primary backend (Vulkan, Metal, DX12).
///
/// wgpu's resource ids are per instance: with an instance per context, a
/// buffer wrapped on one context and bound on another would name an
/// unrelated buffer (or none: a panic inside wgpu). Sharing one turns that
/// misuse into a validation error the caller gets back.
fn primary_instance() -> &'static wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| instance_for(wgpu::Backends::PRIMARY))
}

/// A fresh instance for the backends of the environment that are in `only`.
fn instance_for(only: wgpu::Backends) -> wgpu::Instance {
    ensure_runtime_dir();
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends &= only;
    wgpu::Instance::new(descriptor)
}

/// Every adapter wgpu can see, best first.
///
/// GL adapters come from an instance of their own on every call, as before
/// the primary instance was shared: wgpu's GL adapters of one instance share
/// one EGL context, which only one thread may hold current, so contexts made
/// on parallel threads from one GL instance fail inside wgpu (measured: the
/// test suite's threads panicked in `make_current`).
pub fn enumerate_adapters() -> Vec<wgpu::Adapter> {
    let mut adapters =
        pollster::block_on(primary_instance().enumerate_adapters(wgpu::Backends::PRIMARY));
    let secondary = instance_for(wgpu::Backends::SECONDARY);
    adapters.extend(pollster::block_on(
        secondary.enumerate_adapters(wgpu::Backends::SECONDARY),
    ));
    adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
    adapters
}

impl Context {
    /// A context on the best adapter (or the one `GPUNORM_ADAPTER` names).
    pub fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default())
    }

    /// A context configured by `options`.
    pub fn with_options(options: ContextOptions) -> Result<Self> {
        let wanted = options
            .adapter_name
            .clone()
            .or_else(|| std::env::var(ADAPTER_ENV).ok().filter(|s| !s.is_empty()));
        let adapters = enumerate_adapters();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let adapter = match &wanted {
            Some(name) => {
                let lower = name.to_lowercase();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&lower))
                    .ok_or_else(|| {
                        Error::NoAdapter(format!(
                            "no adapter name contains {name:?}; available: {names:?}"
                        ))
                    })?
            }
            None => adapters.into_iter().next().ok_or_else(|| {
                Error::NoAdapter(
                    "wgpu found no adapter (is a Vulkan driver such as mesa-vulkan-drivers installed? run scripts/ensure-vulkan)"
                        .into(),
                )
            })?,
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let wanted_features = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::SUBGROUP
            | wgpu::Features::SHADER_F16;
        let features = adapter.features() & wanted_features;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("gpunorm"),
            required_features: features,
            required_limits: limits,
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(e.to_string()))?;
        // Errors outside our error scopes must not abort the caller's process.
        device.on_uncaptured_error(Arc::new(|e| {
            eprintln!("gpunorm: uncaptured wgpu error: {e}");
        }));
        let mut ctx = Self::build(device, queue, Some(AdapterSummary::from_info(&info)));
        ctx.subgroup_max = info.subgroup_max_size.max(1);
        ctx.subgroup_min = info.subgroup_min_size.max(1);
        ctx.cpu = info.device_type == wgpu::DeviceType::Cpu && !options.size_for_gpu;
        if options.disable_subgroups {
            ctx.subgroups = false;
        }
        if let Some(limit) = options.max_storage_binding {
            ctx.max_storage_binding = ctx.max_storage_binding.min(limit);
        }
        if let Some(limit) = options.max_buffer_size {
            ctx.max_buffer = ctx.max_buffer.min(limit);
        }
        Ok(ctx)
    }

    /// Embeds in a device the caller already has (created with the same
    /// `wgpu` version: use [`crate::wgpu`]). Limits are read from the device.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        Self::build(device, queue, None)
    }

    fn build(device: wgpu::Device, queue: wgpu::Queue, adapter: Option<AdapterSummary>) -> Self {
        let limits = device.limits();
        let pipelines = PipelineCache::new(&device);
        let backward = crate::backward::BackwardCache::new(&device);
        let casts = crate::norm::half_params::CastPipelines::new(&device);
        let dummies = std::array::from_fn(|i| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("gpunorm placeholder {i}")),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
                mapped_at_creation: false,
            })
        });
        let subgroups = device.features().contains(wgpu::Features::SUBGROUP);
        static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Context {
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            subgroups,
            // Unknown for a borrowed device: the extremes wgpu allows.
            subgroup_max: wgpu::MAXIMUM_SUBGROUP_MAX_SIZE,
            subgroup_min: wgpu::MINIMUM_SUBGROUP_MIN_SIZE,
            // Unknown for a borrowed device: sized for a GPU.
            cpu: false,
            device,
            queue,
            pipelines,
            backward,
            casts,
            adapter,
            dummies,
        }
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The adapter, when the context picked it (not for [`Context::from_wgpu`]).
    pub fn adapter(&self) -> Option<&AdapterSummary> {
        self.adapter.as_ref()
    }

    /// What kernel choice may rely on.
    pub fn caps(&self) -> crate::engine::Caps {
        crate::engine::Caps {
            subgroups: self.subgroups,
            subgroup_max: self.subgroup_max,
            subgroup_min: self.subgroup_min,
            cpu: self.cpu,
        }
    }

    /// Largest storage binding, in bytes.
    pub fn max_storage_binding(&self) -> u64 {
        self.max_storage_binding
    }

    /// Required alignment of a storage binding's offset, in bytes.
    pub fn storage_offset_alignment(&self) -> u64 {
        self.device.limits().min_storage_buffer_offset_alignment as u64
    }

    /// Checks that a buffer of `bytes` can be created.
    pub(crate) fn check_buffer_size(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.max_buffer {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: self.max_buffer,
                limit_name: "max_buffer_size",
            });
        }
        Ok(())
    }

    /// Checks that a buffer of `bytes` can be created and bound whole.
    pub(crate) fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        self.check_buffer_size(what, bytes)?;
        if bytes > self.max_storage_binding {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: self.max_storage_binding,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        Ok(())
    }

    /// Checks that `bytes` fit one storage binding of the device itself,
    /// whatever [`ContextOptions::max_storage_binding`] pretends: for
    /// tensors always bound whole (parameter vectors), never split.
    pub(crate) fn check_whole_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let limit = self.device.limits().max_storage_buffer_binding_size;
        if bytes > limit {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        self.check_buffer_size(what, bytes)
    }

    /// Creates a zero-filled device buffer of at least `bytes` (rounded up to
    /// a multiple of [`crate::tensor::BINDING_ALIGN`], at least one) usable as
    /// storage and copy source/target.
    pub(crate) fn create_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_buffer_size(label, bytes)?;
        let size =
            bytes.div_ceil(crate::tensor::BINDING_ALIGN).max(1) * crate::tensor::BINDING_ALIGN;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Wgpu(format!(
                "allocating {bytes} bytes for {label}: {e}"
            )));
        }
        Ok(buffer)
    }

    /// A zero-filled tensor.
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<GpuTensor> {
        let (_, bytes) = crate::tensor::checked_size(shape, dtype)?;
        let buffer = self.create_buffer("gpunorm tensor", bytes)?;
        Ok(GpuTensor::from_buffer(Arc::new(buffer), 0, shape, dtype)?.owned_by(self.uid))
    }

    /// Refuses a tensor another context allocated: its buffer lives on
    /// another device (or another wgpu instance, whose resource ids would
    /// name unrelated buffers here), so binding it could not work.
    pub(crate) fn check_owned(&self, what: &str, tensor: &GpuTensor) -> Result<()> {
        match tensor.owner() {
            Some(owner) if owner != self.uid => self.foreign(what),
            _ => Ok(()),
        }
    }

    /// Refuses state (a layer's saved forward, its step counter) that
    /// another context created.
    pub(crate) fn check_context(&self, what: &str, context: u64) -> Result<()> {
        if context == self.uid {
            Ok(())
        } else {
            self.foreign(what)
        }
    }

    fn foreign<T>(&self, what: &str) -> Result<T> {
        Err(Error::InvalidArgument(format!(
            "{what} belongs to another Context: use it with the context that created it (download and upload it to move it)"
        )))
    }

    /// A vector of `len` copies of `value` (f32), checked against the
    /// adapter's limits before anything is allocated on the host.
    pub(crate) fn filled(&self, value: f32, len: usize) -> Result<GpuTensor> {
        let (_, bytes) = crate::tensor::checked_size(&[len], DType::F32)?;
        self.check_buffer_size("a parameter vector", bytes)?;
        self.upload(&vec![value; len], &[len])
    }

    /// Uploads f32 values as a tensor of `shape`, stored as f32.
    pub fn upload(&self, values: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_as(values, shape, DType::F32)
    }

    /// Uploads f32 values as a tensor of `shape` stored as `dtype` (rounded to
    /// nearest even).
    pub fn upload_as(&self, values: &[f32], shape: &[usize], dtype: DType) -> Result<GpuTensor> {
        let (n, _) = crate::tensor::checked_size(shape, dtype)?;
        if n != values.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {n} elements, but {} values were given",
                values.len()
            )));
        }
        self.upload_bytes(&encode(values, dtype), shape, dtype)
    }

    /// Uploads raw little-endian bytes of `dtype`.
    pub fn upload_bytes(&self, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<GpuTensor> {
        let (n, _) = crate::tensor::checked_size(shape, dtype)?;
        if n * dtype.size() != bytes.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} of {dtype} needs {} bytes, but {} were given",
                n * dtype.size(),
                bytes.len()
            )));
        }
        let tensor = self.zeros(shape, dtype)?;
        self.write(&tensor, bytes);
        Ok(tensor)
    }

    /// Overwrites a tensor's bytes. Large tensors are written in pieces of
    /// [`TRANSFER_CHUNK`] bytes, waiting for each batch of pieces, so the
    /// staging memory stays bounded (on lavapipe device memory is host
    /// memory, and a whole-tensor staging copy would double it).
    pub(crate) fn write(&self, tensor: &GpuTensor, bytes: &[u8]) {
        let mut offset = 0;
        while offset < bytes.len() {
            let end = (offset + TRANSFER_CHUNK).min(bytes.len());
            let piece = &bytes[offset..end];
            let mut padded;
            let data = if piece.len().is_multiple_of(4) {
                piece
            } else {
                padded = piece.to_vec();
                padded.resize(piece.len().div_ceil(4) * 4, 0);
                &padded
            };
            self.queue
                .write_buffer(tensor.buffer(), tensor.offset() + offset as u64, data);
            offset = end;
            if bytes.len() > TRANSFER_CHUNK {
                self.queue.submit([]);
                let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
            }
        }
    }

    /// Streams a tensor's raw bytes to `sink` in pieces of at most
    /// [`TRANSFER_CHUNK`] bytes (waits for the device), so reading back a
    /// large tensor never holds a second full copy in memory.
    pub fn download_to(&self, tensor: &GpuTensor, sink: &mut dyn std::io::Write) -> Result<()> {
        self.check_owned("the tensor to download", tensor)?;
        let len = tensor.byte_len();
        let mut offset = 0u64;
        while offset < len {
            let end = (offset + TRANSFER_CHUNK as u64).min(len);
            let size = (end - offset).div_ceil(4) * 4;
            let bytes = pollster::block_on(self.read_buffer(
                tensor.buffer(),
                tensor.offset() + offset,
                size,
            ))?;
            sink.write_all(&bytes[..(end - offset) as usize])
                .map_err(|e| Error::File(format!("writing tensor data: {e}")))?;
            offset = end;
        }
        Ok(())
    }

    /// Reads a tensor back as f32 values (waits for the device).
    pub fn download(&self, tensor: &GpuTensor) -> Result<Vec<f32>> {
        Ok(decode(&self.download_bytes(tensor)?, tensor.dtype()))
    }

    /// Reads a tensor's raw bytes back (waits for the device).
    pub fn download_bytes(&self, tensor: &GpuTensor) -> Result<Vec<u8>> {
        pollster::block_on(self.download_bytes_async(tensor))
    }

    /// Reads a tensor's raw bytes back without blocking the thread.
    pub async fn download_bytes_async(&self, tensor: &GpuTensor) -> Result<Vec<u8>> {
        self.check_owned("the tensor to download", tensor)?;
        let len = tensor.byte_len();
        if len == 0 {
            return Ok(Vec::new());
        }
        let size = tensor.binding_size();
        self.read_buffer(tensor.buffer(), tensor.offset(), size)
            .await
            .map(|mut bytes| {
                bytes.truncate(len as usize);
                bytes
            })
    }

    /// Copies `size` bytes of `buffer` from `offset` into host memory.
    pub(crate) async fn read_buffer(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        size: u64,
    ) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gpunorm download"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("gpunorm download"),
            });
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(Error::Wgpu(e.to_string()));
        }
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            sender.send(r).ok();
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(e.to_string()))?;
        match receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Device(e.to_string())),
            None => return Err(Error::Device("buffer mapping was cancelled".into())),
        }
        let bytes = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Device(e.to_string()))?;
            view.to_vec()
        };
        staging.unmap();
        Ok(bytes)
    }

    /// Submits recorded work and waits until the device has finished it.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit([encoder.finish()]);
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Device(e.to_string()))
    }
}

/// Mesa prints `error: XDG_RUNTIME_DIR is invalid` on every start when the
/// variable is unset; point it at a private temporary directory first.
pub fn ensure_runtime_dir() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    // One directory per user, reused by every run (a per-process one would
    // pile up in the temporary directory).
    #[cfg(unix)]
    let owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self")
            .map(|m| m.uid().to_string())
            .unwrap_or_else(|_| "user".into())
    };
    #[cfg(not(unix))]
    let owner = "user";
    let dir = std::env::temp_dir().join(format!("gpunorm-runtime-{owner}"));
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // Done before any wgpu instance (and its threads) exists.
        std::env::set_var("XDG_RUNTIME_DIR", dir);
    }
}
