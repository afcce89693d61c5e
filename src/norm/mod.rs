//! The public layers, one file each, and what they share: modes,
//! conventions, parameter and running-state buffers, argument checks.

pub mod batch;
pub mod group;
pub(crate) mod half_params;
pub mod instance;
pub mod layer;
pub mod sync;

use std::sync::Arc;

use crate::context::Context;
use crate::engine::{self, Dispatch, ForwardBuffers, ForwardSpec};
use crate::error::{Error, Result};
use crate::tensor::{DType, GpuTensor};
use half_params::WorkingCopies;

/// torch's `module.train()` / `module.eval()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Batch statistics; running statistics are updated.
    Train,
    /// Running statistics where the layer tracks them; nothing is updated.
    Eval,
}

/// Which framework's semantics a config follows (SPEC.md §2–3, §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Convention {
    /// PyTorch: momentum is the weight of the new value, running variance
    /// unbiased, a `num_batches_tracked` counter.
    #[default]
    Torch,
    /// Keras 3: momentum is the weight of the old value, moving variance
    /// biased, no counter.
    Keras,
}

/// Checks eps: finite and not negative (zero is allowed, SPEC.md §5).
pub(crate) fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "eps must be a finite number >= 0, got {eps}"
        )))
    }
}

/// Checks a momentum: finite and within [0, 1] (torch accepts 2.0; we
/// refuse it on purpose, SPEC.md §5).
pub(crate) fn check_momentum(momentum: f32) -> Result<()> {
    if momentum.is_finite() && (0.0..=1.0).contains(&momentum) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "momentum must be a finite number in [0, 1], got {momentum}"
        )))
    }
}

/// Checks that an input tensor has a dtype the engine can read.
///
/// Every [`DType`] is accepted today (f32, f16, bf16 storage with f32
/// arithmetic); the check stays the one place to refuse a future storage type.
pub(crate) fn check_input_dtype(x: &GpuTensor) -> Result<()> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
    }
}

/// A per-channel (or per-element) parameter vector: length check. Any
/// [`DType`] is taken here; a pass checks it against its input's
/// ([`half_params::check_params`]: f32 or the input's dtype, one for all).
pub(crate) fn check_vector(name: &str, t: &GpuTensor, len: usize) -> Result<()> {
    if t.numel() != len {
        return Err(Error::Shape(format!(
            "expected {name} with {len} elements, got shape {:?}",
            t.shape()
        )));
    }
    Ok(())
}

/// Running statistics kept on the device.
#[derive(Debug, Clone)]
pub struct RunningStats {
    /// Running (moving) mean, one per channel.
    pub mean: GpuTensor,
    /// Running (moving) variance, one per channel.
    pub var: GpuTensor,
    /// torch's `num_batches_tracked` as an i64 in two u32 words (low,
    /// high); `None` under the Keras convention.
    pub(crate) counter: Option<Arc<wgpu::Buffer>>,
    /// The uid of the context that created the counter.
    pub(crate) context: u64,
}

impl RunningStats {
    /// Fresh running statistics: mean 0, variance 1, counter 0.
    pub(crate) fn new(ctx: &Context, channels: usize, with_counter: bool) -> Result<Self> {
        let mean = ctx.filled(0.0, channels)?;
        let var = ctx.filled(1.0, channels)?;
        let counter = if with_counter {
            Some(Arc::new(ctx.create_buffer("num_batches_tracked", 8)?))
        } else {
            None
        };
        Ok(RunningStats {
            mean,
            var,
            counter,
            context: ctx.uid,
        })
    }

    /// Wraps existing tensors; under torch the counter is required
    /// (SPEC.md §5, partial state), under Keras it must be absent.
    pub(crate) fn from_tensors(
        ctx: &Context,
        convention: Convention,
        channels: usize,
        mean: GpuTensor,
        var: GpuTensor,
        count: Option<i64>,
    ) -> Result<Self> {
        check_vector("running_mean", &mean, channels)?;
        check_vector("running_var", &var, channels)?;
        ctx.check_owned("running_mean", &mean)?;
        ctx.check_owned("running_var", &var)?;
        let counter = match (convention, count) {
            (Convention::Torch, Some(n)) => {
                let buffer = ctx.create_buffer("num_batches_tracked", 8)?;
                ctx.queue.write_buffer(&buffer, 0, &n.to_le_bytes());
                Some(Arc::new(buffer))
            }
            (Convention::Torch, None) => {
                return Err(Error::State(
                    "running statistics under the torch convention need num_batches_tracked".into(),
                ))
            }
            (Convention::Keras, Some(_)) => {
                return Err(Error::State(
                    "the Keras convention has no num_batches_tracked".into(),
                ))
            }
            (Convention::Keras, None) => None,
        };
        Ok(RunningStats {
            mean,
            var,
            counter,
            context: ctx.uid,
        })
    }

    /// Refuses running statistics another context created.
    pub(crate) fn check_context(&self, ctx: &Context) -> Result<()> {
        ctx.check_owned("running_mean", &self.mean)?;
        ctx.check_owned("running_var", &self.var)?;
        ctx.check_context("the running statistics", self.context)
    }

    pub(crate) fn check(&self, channels: usize) -> Result<()> {
        check_vector("running_mean", &self.mean, channels)?;
        check_vector("running_var", &self.var, channels)
    }

    /// Reads `num_batches_tracked` (waits for the device). `None` when the
    /// convention has no counter.
    pub fn num_batches_tracked(&self, ctx: &Context) -> Result<Option<i64>> {
        self.check_context(ctx)?;
        match &self.counter {
            None => Ok(None),
            Some(buffer) => {
                let bytes = pollster::block_on(ctx.read_buffer(buffer, 0, 8))?;
                Ok(Some(i64::from_le_bytes(
                    bytes[..8].try_into().unwrap_or([0; 8]),
                )))
            }
        }
    }

    /// Sets `num_batches_tracked` (queued before the next submission).
    pub fn set_num_batches_tracked(&self, ctx: &Context, value: i64) -> Result<()> {
        self.check_context(ctx)?;
        match &self.counter {
            None => Err(Error::State(
                "this layer has no num_batches_tracked (Keras convention)".into(),
            )),
            Some(buffer) => {
                ctx.queue.write_buffer(buffer, 0, &value.to_le_bytes());
                Ok(())
            }
        }
    }
}

/// Scale and shift, each optional (Keras's `scale`/`center` are independent).
#[derive(Debug, Clone, Default)]
pub struct Affine {
    /// γ (`weight` / `gamma`).
    pub weight: Option<GpuTensor>,
    /// β (`bias` / `beta`).
    pub bias: Option<GpuTensor>,
}

impl Affine {
    /// γ = 1 and β = 0 of `len` elements, each only if asked for.
    pub(crate) fn new(ctx: &Context, len: usize, weight: bool, bias: bool) -> Result<Self> {
        Ok(Affine {
            weight: if weight {
                Some(ctx.filled(1.0, len)?)
            } else {
                None
            },
            bias: if bias {
                Some(ctx.filled(0.0, len)?)
            } else {
                None
            },
        })
    }

    pub(crate) fn check(&self, len: usize) -> Result<()> {
        if let Some(w) = &self.weight {
            check_vector("weight", w, len)?;
        }
        if let Some(b) = &self.bias {
            check_vector("bias", b, len)?;
        }
        Ok(())
    }

    /// Refuses parameters another context allocated.
    pub(crate) fn check_context(&self, ctx: &Context) -> Result<()> {
        for (name, t) in [("weight", &self.weight), ("bias", &self.bias)] {
            if let Some(t) = t {
                ctx.check_owned(name, t)?;
            }
        }
        Ok(())
    }
}

/// Statistics a forward pass saved for the backward pass.
#[derive(Debug, Clone)]
pub(crate) struct Saved {
    /// The context the forward ran on ([`Context`]'s uid): its buffers are
    /// only reused there.
    pub context: u64,
    pub spec: ForwardSpec,
    pub scratch: Arc<wgpu::Buffer>,
    /// The forward's input (a cheap clone sharing its buffer).
    pub x: GpuTensor,
    /// The forward's bind groups, for the next forward to reuse when it
    /// binds the same (they keep the buffers they bind, the output
    /// included, alive until the next forward replaces them).
    pub bindings: Option<engine::ForwardBindings>,
    /// The forward normalized with statistics merged over replicas
    /// ([`BatchNorm::forward_synced`]): its backward needs them too.
    pub synced: bool,
    /// f32 working copies of the half-precision parameters and running
    /// statistics, for the next pass to reuse.
    pub copies: WorkingCopies,
}

/// Refuses a forward whose tensors or layer state another context created:
/// checked before anything is recorded, so a refused call changes nothing.
pub(crate) fn check_forward_context(
    ctx: &Context,
    x: &GpuTensor,
    y: Option<&GpuTensor>,
    affine: &Affine,
    running: Option<&RunningStats>,
) -> Result<()> {
    ctx.check_owned("the input", x)?;
    if let Some(y) = y {
        ctx.check_owned("the output", y)?;
    }
    affine.check_context(ctx)?;
    running.map_or(Ok(()), |r| r.check_context(ctx))
}

/// Refuses an output that aliases a tensor the pass reads.
pub(crate) fn check_output(
    x: &GpuTensor,
    y: &GpuTensor,
    others: &[Option<&GpuTensor>],
) -> Result<()> {
    if y.shape() != x.shape() {
        return Err(Error::Shape(format!(
            "expected an output of shape {:?} (the input's), got {:?}",
            x.shape(),
            y.shape()
        )));
    }
    if y.dtype() != x.dtype() {
        return Err(Error::Dtype(format!(
            "expected an output of dtype {} (the input's), got {}",
            x.dtype(),
            y.dtype()
        )));
    }
    let aliased = y.same_buffer(x) || others.iter().flatten().any(|t| y.same_buffer(t));
    if aliased {
        return Err(Error::InvalidArgument(
            "the output must not share a buffer with the input, parameters or running statistics"
                .into(),
        ));
    }
    Ok(())
}

/// Refuses a tensor a pass binds whose offset is not a multiple of the
/// adapter's storage offset alignment (wgpu would refuse the bind group
/// after the caller's encoder had taken the pass).
pub(crate) fn check_bound_offsets(ctx: &Context, bound: &[Option<&GpuTensor>]) -> Result<()> {
    let align = ctx.storage_offset_alignment();
    match bound
        .iter()
        .flatten()
        .find(|t| !t.offset().is_multiple_of(align))
    {
        Some(t) => Err(Error::InvalidArgument(format!(
            "a tensor bound to a shader must start at a multiple of {align} bytes (the adapter's storage offset alignment), got offset {}",
            t.offset()
        ))),
        None => Ok(()),
    }
}

/// Records a validated forward of a layer: refuses an aliased output,
/// records the passes, and keeps what the backward pass needs in `saved`.
/// The layer's previous scratch serves again when large enough: only the
/// last forward is differentiable, and passes recorded in order use it in
/// order, so a layer allocates once for a steady shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_layer(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    spec: ForwardSpec,
    x: &GpuTensor,
    y: &GpuTensor,
    affine: &Affine,
    running: Option<&RunningStats>,
    saved: &mut Option<Saved>,
) -> Result<Vec<Dispatch>> {
    check_forward_context(ctx, x, Some(y), affine, running)?;
    half_params::check_params(ctx, x.dtype(), affine, running)?;
    check_output(
        x,
        y,
        &[
            affine.weight.as_ref(),
            affine.bias.as_ref(),
            running.map(|r| &r.mean),
            running.map(|r| &r.var),
        ],
    )?;
    engine::check_limits(ctx, &spec, x)?;
    check_bound_offsets(
        ctx,
        &[
            Some(x),
            Some(y),
            affine.weight.as_ref(),
            affine.bias.as_ref(),
            running.map(|r| &r.mean),
            running.map(|r| &r.var),
        ],
    )?;
    let chunks = engine::chunks_for(ctx, &spec);
    let bytes = engine::forward_scratch_bytes(&spec, &chunks, &ctx.caps());
    let own = saved.as_ref().filter(|s| s.context == ctx.uid);
    let scratch = match own {
        Some(s) if s.scratch.size() >= bytes => s.scratch.clone(),
        _ => Arc::new(ctx.create_buffer("gpunorm statistics", bytes)?),
    };
    let mut copies = WorkingCopies::for_tensors(ctx, affine, running, own.map(|s| &s.copies))?;
    let wide_affine = copies.affine(affine);
    let wide_running = running.map(|r| copies.running(r));
    copies.record_widen(ctx, encoder, affine, running);
    let bufs = ForwardBuffers::new(x, y, &wide_affine, wide_running.as_ref(), &scratch);
    let previous = saved.as_ref().and_then(|s| s.bindings.as_ref());
    let (dispatches, bindings) = engine::record_forward(ctx, encoder, &spec, &bufs, previous);
    if let Some(r) = running.filter(|_| spec.updates_running()) {
        copies.record_narrow_running(ctx, encoder, r);
    }
    *saved = Some(Saved {
        context: ctx.uid,
        spec,
        scratch,
        x: x.clone(),
        bindings,
        synced: false,
        copies,
    });
    Ok(dispatches)
}

/// A forward that allocates its output, records with `record`, and submits.
/// When the submission fails (wgpu refused a buffer it could not check
/// before recording, such as a wrapped buffer of another device), the
/// layer's saved forward is put back: a failed call changes nothing.
pub(crate) fn forward_into_new<L>(
    layer: &mut L,
    saved: fn(&mut L) -> &mut Option<Saved>,
    ctx: &Context,
    x: &GpuTensor,
    record: impl FnOnce(&mut L, &mut wgpu::CommandEncoder, &GpuTensor) -> Result<Vec<Dispatch>>,
) -> Result<GpuTensor> {
    let y = ctx.zeros(x.shape(), x.dtype())?;
    let previous = saved(layer).clone();
    match submit_scoped(ctx, |encoder| record(layer, encoder, &y)) {
        Ok(_) => Ok(y),
        Err(e) => {
            *saved(layer) = previous;
            Err(e)
        }
    }
}

/// The backward methods every layer has, from where it keeps its saved
/// forward and its affine parameters.
macro_rules! impl_backward {
    ($layer:ty, |$s:ident| $saved:expr, $affine:expr) => {
        impl $layer {
            /// The backward pass of the last forward (SPEC.md §4):
            /// `grad_input` and the gradient of each affine parameter
            /// present, computed on the device from the statistics that
            /// forward saved, then submitted. Only the last forward is
            /// differentiable (it replaces the saved state, like torch's
            /// graph). Errors when no forward ran or `dy` differs from that
            /// forward's input in shape or dtype.
            pub fn backward(
                &self,
                ctx: &$crate::Context,
                dy: &$crate::GpuTensor,
            ) -> $crate::Result<$crate::backward::Gradients> {
                let $s = self;
                $crate::backward::run_backward(ctx, $saved, $affine, dy)
            }

            /// Records the backward pass into the caller's encoder (nothing
            /// is submitted) and returns the freshly allocated gradients
            /// with the dispatches recorded.
            pub fn record_backward(
                &self,
                ctx: &$crate::Context,
                encoder: &mut wgpu::CommandEncoder,
                dy: &$crate::GpuTensor,
            ) -> $crate::Result<($crate::backward::Gradients, Vec<$crate::backward::Dispatch>)>
            {
                let $s = self;
                $crate::backward::record_backward(ctx, encoder, $saved, $affine, dy)
            }

            /// Records the backward pass into the caller's encoder, writing
            /// the caller's gradients (allocated once, say, and reused every
            /// step): `grad_input` of the forward input's shape and dtype,
            /// and `grad_weight` and `grad_bias` (the parameters' sizes and
            /// dtypes) exactly where the layer has γ and β. Each must have its
            /// buffer to itself among the tensors of the pass; they need not
            /// be zeroed. A refused call records nothing.
            pub fn record_backward_into(
                &self,
                ctx: &$crate::Context,
                encoder: &mut wgpu::CommandEncoder,
                dy: &$crate::GpuTensor,
                grads: &$crate::backward::Gradients,
            ) -> $crate::Result<Vec<$crate::backward::Dispatch>> {
                let $s = self;
                $crate::backward::record_backward_into(
                    ctx, encoder, $saved, $affine, dy, None, grads,
                )
            }
        }
    };
}
pub(crate) use impl_backward;

/// Runs `record` in its own encoder inside error scopes, submits it, and
/// turns any wgpu error into [`Error::Wgpu`].
pub(crate) fn submit_scoped<T>(
    ctx: &Context,
    record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<T>,
) -> Result<T> {
    let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("gpunorm"),
        });
    let result = record(&mut encoder);
    if result.is_ok() {
        ctx.queue.submit([encoder.finish()]);
    }
    let validation_error = pollster::block_on(validation.pop());
    let oom_error = pollster::block_on(oom.pop());
    let value = result?;
    if let Some(e) = validation_error.or(oom_error) {
        return Err(Error::Wgpu(e.to_string()));
    }
    Ok(value)
}
