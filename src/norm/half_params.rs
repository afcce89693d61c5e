//! Parameters, running statistics and parameter gradients stored as f16 or
//! bf16 (SPEC.md §5: "the input's dtype or F32"; §4: gradients of
//! parameters have the parameter's dtype).
//!
//! Every kernel reads γ, β and the running statistics as f32 and writes the
//! running statistics and parameter gradients as f32, so a pass over
//! half-precision ones works on f32 working copies: each is widened on the
//! device before the pass (exactly), and what the pass wrote is narrowed
//! back after it (rounded once, to nearest even), in the pass's own
//! encoder, with no read-back. One more small dispatch per tensor is the
//! cost: the tensors are one value per channel or per normalized element.
//! A layer keeps its copies with its saved forward and reuses them, so a
//! steady model allocates them once.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels;
use crate::norm::{Affine, RunningStats};
use crate::tensor::{DType, GpuTensor};

/// Checks the parameters and running statistics a pass binds: all of one
/// dtype, f32 or the input's (SPEC.md §5; torch refuses a mix too: "expected
/// scalar type Half but found Float"), and each small enough that its f32
/// form (the tensor itself, or its working copy) fits one storage binding.
pub(crate) fn check_params(
    ctx: &Context,
    input: DType,
    affine: &Affine,
    running: Option<&RunningStats>,
) -> Result<()> {
    let present: Vec<(&str, &GpuTensor)> = [
        ("weight", affine.weight.as_ref()),
        ("bias", affine.bias.as_ref()),
        ("running_mean", running.map(|r| &r.mean)),
        ("running_var", running.map(|r| &r.var)),
    ]
    .into_iter()
    .filter_map(|(name, t)| t.map(|t| (name, t)))
    .collect();
    for &(name, t) in &present {
        if t.dtype() != DType::F32 && t.dtype() != input {
            return Err(Error::Dtype(format!(
                "expected {name} of dtype f32 or the input's {input}, got {}",
                t.dtype()
            )));
        }
        ctx.check_whole_binding(name, f32_bytes(t))?;
    }
    if let Some(&(first, a)) = present.first() {
        if let Some(&(other, b)) = present.iter().find(|(_, b)| b.dtype() != a.dtype()) {
            return Err(Error::Dtype(format!(
                "expected the parameters and running statistics in one dtype (f32, or the input's {input}), got {first} of {} and {other} of {}",
                a.dtype(),
                b.dtype()
            )));
        }
    }
    Ok(())
}

/// Bytes of `t` as f32 (its working copy's, when it is half-precision).
fn f32_bytes(t: &GpuTensor) -> u64 {
    4 * t.numel() as u64
}

/// f32 working copies of a layer's half-precision tensors: `None` where the
/// tensor is f32 (the pass binds it as it is) or absent.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkingCopies {
    pub weight: Option<GpuTensor>,
    pub bias: Option<GpuTensor>,
    pub mean: Option<GpuTensor>,
    pub var: Option<GpuTensor>,
    /// The bind groups of the casts recorded so far, for the next pass
    /// over the same tensors: a steady layer then creates no buffer and no
    /// bind group per pass, as with f32 parameters.
    pub bindings: Vec<CastBinding>,
}

/// The bind group of the casts between `half` and `copy` (both directions
/// bind the same two tensors; the pipeline says which way).
#[derive(Debug, Clone)]
pub(crate) struct CastBinding {
    half: GpuTensor,
    copy: GpuTensor,
    group: wgpu::BindGroup,
}

impl CastBinding {
    fn binds(&self, half: &GpuTensor, copy: &GpuTensor) -> bool {
        self.half.same_buffer(half)
            && self.half.offset() == half.offset()
            && self.half.numel() == half.numel()
            && self.copy.same_buffer(copy)
    }
}

impl WorkingCopies {
    /// Copies for the half-precision tensors among `affine` and `running`:
    /// `reuse`'s where the length matches, fresh ones otherwise. Records
    /// nothing (it may allocate), so a refused pass changes nothing.
    pub(crate) fn for_tensors(
        ctx: &Context,
        affine: &Affine,
        running: Option<&RunningStats>,
        reuse: Option<&WorkingCopies>,
    ) -> Result<Self> {
        let reuse = reuse.cloned().unwrap_or_default();
        Ok(WorkingCopies {
            weight: copy_for(ctx, affine.weight.as_ref(), reuse.weight)?,
            bias: copy_for(ctx, affine.bias.as_ref(), reuse.bias)?,
            mean: copy_for(ctx, running.map(|r| &r.mean), reuse.mean)?,
            var: copy_for(ctx, running.map(|r| &r.var), reuse.var)?,
            bindings: reuse.bindings,
        })
    }

    /// `affine` with each half-precision tensor replaced by its copy.
    pub(crate) fn affine(&self, affine: &Affine) -> Affine {
        Affine {
            weight: self.weight.clone().or_else(|| affine.weight.clone()),
            bias: self.bias.clone().or_else(|| affine.bias.clone()),
        }
    }

    /// `running` with each half-precision statistic replaced by its copy
    /// (the counter is the layer's own).
    pub(crate) fn running(&self, running: &RunningStats) -> RunningStats {
        RunningStats {
            mean: self.mean.clone().unwrap_or_else(|| running.mean.clone()),
            var: self.var.clone().unwrap_or_else(|| running.var.clone()),
            counter: running.counter.clone(),
            context: running.context,
        }
    }

    /// Records widening every half-precision tensor into its copy.
    pub(crate) fn record_widen(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        affine: &Affine,
        running: Option<&RunningStats>,
    ) {
        let pairs = [
            (affine.weight.as_ref(), self.weight.as_ref()),
            (affine.bias.as_ref(), self.bias.as_ref()),
            (running.map(|r| &r.mean), self.mean.as_ref()),
            (running.map(|r| &r.var), self.var.as_ref()),
        ];
        // Only the bindings of this pass's tensors are kept: a layer whose
        // tensors were replaced lets the old ones go.
        self.bindings = record_casts(ctx, encoder, Cast::Widen, &pairs, &self.bindings);
    }

    /// Records narrowing the running statistics' copies, which the pass
    /// updated, back into the layer's half-precision tensors.
    pub(crate) fn record_narrow_running(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        running: &RunningStats,
    ) {
        let pairs = [
            (Some(&running.mean), self.mean.as_ref()),
            (Some(&running.var), self.var.as_ref()),
        ];
        record_casts(ctx, encoder, Cast::Narrow, &pairs, &self.bindings);
    }
}

/// The working copy of `t` when it is half-precision: `reuse` when it has
/// `t`'s length, else a fresh f32 tensor.
pub(crate) fn copy_for(
    ctx: &Context,
    t: Option<&GpuTensor>,
    reuse: Option<GpuTensor>,
) -> Result<Option<GpuTensor>> {
    match t {
        Some(t) if t.dtype() != DType::F32 => {
            ctx.check_whole_binding("the f32 copy of a half-precision parameter", f32_bytes(t))?;
            match reuse {
                Some(copy) if copy.numel() == t.numel() => Ok(Some(copy)),
                _ => ctx.zeros(t.shape(), DType::F32).map(Some),
            }
        }
        _ => Ok(None),
    }
}

/// Which way a cast goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Cast {
    /// f16/bf16 → f32 (exact).
    Widen,
    /// f32 → f16/bf16 (rounded to nearest even).
    Narrow,
}

/// Invocations per workgroup of param_cast.wgsl (one packed word each).
const CAST_WG: u32 = 64;

/// The cast pipelines: the half-precision tensor (1) and its f32 copy (2),
/// both writable (each direction writes one of them).
pub(crate) struct CastPipelines(kernels::PipelineSet<Cast, 2>);

impl std::fmt::Debug for CastPipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CastPipelines")
    }
}

impl CastPipelines {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        CastPipelines(kernels::PipelineSet::new(
            device,
            "gpunorm parameter cast",
            [true, true],
        ))
    }
}

/// Records one cast per `(half, copy)` pair that has a copy, in one compute
/// pass (none when there is nothing to cast), with the bind groups of
/// `reuse` where they bind the same tensors. Returns the bind groups used.
pub(crate) fn record_casts(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    cast: Cast,
    pairs: &[(Option<&GpuTensor>, Option<&GpuTensor>)],
    reuse: &[CastBinding],
) -> Vec<CastBinding> {
    let pairs: Vec<(&GpuTensor, &GpuTensor)> = pairs
        .iter()
        .filter_map(|&(half, copy)| half.zip(copy))
        .filter(|(half, _)| half.numel() > 0)
        .collect();
    if pairs.is_empty() {
        return Vec::new();
    }
    let set = &ctx.casts.0;
    let bindings: Vec<CastBinding> = pairs
        .iter()
        .map(
            |&(half, copy)| match reuse.iter().find(|b| b.binds(half, copy)) {
                Some(b) => b.clone(),
                None => {
                    // A half-precision tensor fits one storage binding (checked
                    // by `copy_for`), so its length fits a u32.
                    let len = half.numel() as u32;
                    let uniform = kernels::uniform_buffer(
                        &ctx.device,
                        "gpunorm parameter cast",
                        bytemuck::bytes_of(&[len, 0, 0, 0]),
                    );
                    let group = set.bind_group(
                        &ctx.device,
                        "gpunorm parameter cast",
                        &uniform,
                        [half.binding(), copy.binding()],
                    );
                    CastBinding {
                        half: half.clone(),
                        copy: copy.clone(),
                        group,
                    }
                }
            },
        )
        .collect();
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("gpunorm parameter cast"),
        timestamp_writes: None,
    });
    for binding in &bindings {
        let half = &binding.half;
        let len = half.numel() as u32;
        let entry_point = match (cast, half.dtype()) {
            (Cast::Widen, DType::BF16) => "widen_bf16",
            (Cast::Widen, _) => "widen_f16",
            (Cast::Narrow, DType::BF16) => "narrow_bf16",
            (Cast::Narrow, _) => "narrow_f16",
        };
        let pipeline = set.get(&ctx.device, cast, half.dtype(), entry_point, &[], || {
            format!(
                "{}\n{}",
                kernels::HALF_CONVERT,
                include_str!("../../shaders/param_cast.wgsl")
            )
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &binding.group, &[]);
        let (gx, gy) = kernels::grid(len.div_ceil(2).div_ceil(CAST_WG));
        pass.dispatch_workgroups(gx, gy, 1);
    }
    drop(pass);
    bindings
}
