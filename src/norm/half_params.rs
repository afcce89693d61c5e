//! Parameters, running statistics and parameter gradients stored as f16 or
//! bf16 (SPEC.md §5: "the input's dtype or F32"; §4: gradients of
//! parameters have the parameter's dtype).
//!
//! Every kernel reads γ, β and the running statistics as f32 and writes the
//! running statistics and parameter gradients as f32, so a pass over
//! half-precision ones works on f32 working copies: each is widened on the
//! device before the pass (exactly), and what the pass wrote is narrowed
//! back after it (rounded once, to nearest even), in the pass's own
//! encoder, with no read-back. One small dispatch before the pass (for up
//! to four tensors), and one after it when it writes running statistics or
//! gradients, is the cost: the tensors are one value per channel or per
//! normalized element. A layer keeps its copies (and the casts' bind
//! groups) with its saved forward and reuses them, so a steady model
//! allocates them once.

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

/// The bind group of one cast dispatch: its `(half, copy)` pairs.
#[derive(Debug, Clone)]
pub(crate) struct CastBinding {
    cast: Cast,
    pairs: Vec<(GpuTensor, GpuTensor)>,
    group: wgpu::BindGroup,
}

impl CastBinding {
    fn binds(&self, cast: Cast, pairs: &[(&GpuTensor, &GpuTensor)]) -> bool {
        let same = |a: &GpuTensor, b: &GpuTensor| {
            a.same_buffer(b) && a.offset() == b.offset() && a.numel() == b.numel()
        };
        self.cast == cast
            && self.pairs.len() == pairs.len()
            && self
                .pairs
                .iter()
                .zip(pairs)
                .all(|((h, c), (h2, c2))| same(h, h2) && same(c, c2))
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
        let used = record_casts(ctx, encoder, Cast::Widen, &pairs, &self.bindings);
        self.keep(Cast::Widen, used);
    }

    /// Records narrowing the running statistics' copies, which the pass
    /// updated, back into the layer's half-precision tensors.
    pub(crate) fn record_narrow_running(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        running: &RunningStats,
    ) {
        let pairs = [
            (Some(&running.mean), self.mean.as_ref()),
            (Some(&running.var), self.var.as_ref()),
        ];
        let used = record_casts(ctx, encoder, Cast::Narrow, &pairs, &self.bindings);
        self.keep(Cast::Narrow, used);
    }

    /// Keeps the bind groups a `cast` just used in place of that
    /// direction's earlier ones: a layer whose tensors were replaced lets
    /// the old ones go.
    fn keep(&mut self, cast: Cast, used: Vec<CastBinding>) {
        self.bindings.retain(|b| b.cast != cast);
        self.bindings.extend(used);
    }
}

/// The working copy of `t` when it is half-precision: `reuse` when it has
/// `t`'s length, else a fresh f32 tensor. Its size was checked by
/// [`check_params`] (gradients have their parameter's length).
pub(crate) fn copy_for(
    ctx: &Context,
    t: Option<&GpuTensor>,
    reuse: Option<GpuTensor>,
) -> Result<Option<GpuTensor>> {
    match t {
        Some(t) if t.dtype() != DType::F32 => match reuse {
            Some(copy) if copy.numel() == t.numel() => Ok(Some(copy)),
            _ => ctx.zeros(t.shape(), DType::F32).map(Some),
        },
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
/// Pairs one cast dispatch takes (γ, β, running mean and variance), so a
/// pass widens with one dispatch: lavapipe pays per dispatch. A 64x256
/// LayerNorm forward with f16 γ and β took about 200 µs with f32 ones,
/// +130 µs with a dispatch per tensor, +50 µs with one for both.
const CAST_SLOTS: usize = 4;

/// The cast pipelines: halves (bindings 1–4) and their f32 copies (5–8),
/// read-only on the side a direction reads.
pub(crate) struct CastPipelines {
    widen: kernels::PipelineSet<Cast>,
    narrow: kernels::PipelineSet<Cast>,
}

impl std::fmt::Debug for CastPipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CastPipelines")
    }
}

impl CastPipelines {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        let (r, w) = (false, true);
        CastPipelines {
            widen: kernels::PipelineSet::new(
                device,
                "gpunorm parameter widen",
                [r, r, r, r, w, w, w, w],
            ),
            narrow: kernels::PipelineSet::new(
                device,
                "gpunorm parameter narrow",
                [w, w, w, w, r, r, r, r],
            ),
        }
    }

    fn set(&self, cast: Cast) -> &kernels::PipelineSet<Cast> {
        match cast {
            Cast::Widen => &self.widen,
            Cast::Narrow => &self.narrow,
        }
    }
}

/// The WGSL of `cast`: param_cast.wgsl with its four slots spelled out
/// (WGSL cannot index bindings) and the access modes of `cast`'s layout.
fn cast_source(cast: Cast) -> String {
    let (halves, copies) = match cast {
        Cast::Widen => ("read", "read_write"),
        Cast::Narrow => ("read_write", "read"),
    };
    let mut slots = String::new();
    for i in 0..CAST_SLOTS {
        slots += &format!(
            "@group(0) @binding({}) var<storage, {halves}> half{i}: array<u32>;\n\
             @group(0) @binding({}) var<storage, {copies}> copy{i}: array<f32>;\n",
            i + 1,
            i + 1 + CAST_SLOTS
        );
        let template = match cast {
            Cast::Widen => WIDEN_SLOT,
            Cast::Narrow => NARROW_SLOT,
        };
        slots += &template.replace("{i}", &i.to_string());
    }
    format!(
        "{}\n{}\n{slots}",
        kernels::HALF_CONVERT,
        include_str!("../../shaders/param_cast.wgsl")
    )
}

/// Widens word w of slot {i} (`bf16` picks the format).
const WIDEN_SLOT: &str = "
fn cast_slot{i}(w: u32, bf16: bool) {
    let len = params.len[{i}];
    if (2u * w >= len) {
        return;
    }
    let pair = widen_word(half{i}[w], bf16);
    copy{i}[2u * w] = pair.x;
    if (2u * w + 1u < len) {
        copy{i}[2u * w + 1u] = pair.y;
    }
}
";

/// Narrows word w of slot {i}; the last word of an odd length keeps its
/// high half.
const NARROW_SLOT: &str = "
fn cast_slot{i}(w: u32, bf16: bool) {
    let len = params.len[{i}];
    if (2u * w >= len) {
        return;
    }
    let odd = min(2u * w + 1u, len - 1u);
    let bits = narrow_pair(vec2<f32>(copy{i}[2u * w], copy{i}[odd]), bf16);
    var high = bits.y;
    if (2u * w + 1u >= len) {
        high = half{i}[w] >> 16u;
    }
    half{i}[w] = bits.x | (high << 16u);
}
";

/// Records one `cast` dispatch per half dtype over the `(half, copy)` pairs
/// that have a copy (none when there is nothing to cast), in one compute
/// pass, with the bind groups of `reuse` where they bind the same tensors.
/// Returns the bind groups used.
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
    let set = ctx.casts.set(cast);
    // One dtype per dispatch (a pass's half tensors share one: check_params).
    let bindings: Vec<(DType, CastBinding)> = [DType::F16, DType::BF16]
        .into_iter()
        .flat_map(|dtype| {
            let same: Vec<_> = pairs
                .iter()
                .copied()
                .filter(|(h, _)| h.dtype() == dtype)
                .collect();
            same.chunks(CAST_SLOTS)
                .map(|chunk| (dtype, cast_binding(ctx, set, cast, chunk, reuse)))
                .collect::<Vec<_>>()
        })
        .collect();
    if bindings.is_empty() {
        return Vec::new();
    }
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("gpunorm parameter cast"),
        timestamp_writes: None,
    });
    for (dtype, binding) in &bindings {
        let entry_point = if *dtype == DType::BF16 {
            "cast_bf16"
        } else {
            "cast_f16"
        };
        let pipeline = set.get(&ctx.device, cast, *dtype, entry_point, &[], || {
            cast_source(cast)
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &binding.group, &[]);
        // A half-precision tensor fits one storage binding (check_params),
        // so its length fits a u32.
        let longest = binding
            .pairs
            .iter()
            .map(|(h, _)| h.numel())
            .max()
            .unwrap_or(0) as u32;
        let (gx, gy) = kernels::grid(longest.div_ceil(2).div_ceil(CAST_WG));
        pass.dispatch_workgroups(gx, gy, 1);
    }
    drop(pass);
    bindings.into_iter().map(|(_, b)| b).collect()
}

/// The bind group of one dispatch over `pairs` (at most [`CAST_SLOTS`]):
/// `reuse`'s when it binds the same tensors, else a new one with
/// placeholders in the unused slots.
fn cast_binding(
    ctx: &Context,
    set: &kernels::PipelineSet<Cast>,
    cast: Cast,
    pairs: &[(&GpuTensor, &GpuTensor)],
    reuse: &[CastBinding],
) -> CastBinding {
    if let Some(b) = reuse.iter().find(|b| b.binds(cast, pairs)) {
        return b.clone();
    }
    let mut lens = [0u32; CAST_SLOTS];
    for (len, (half, _)) in lens.iter_mut().zip(pairs) {
        *len = half.numel() as u32;
    }
    let uniform = kernels::uniform_buffer(
        &ctx.device,
        "gpunorm parameter cast",
        bytemuck::bytes_of(&lens),
    );
    // Distinct placeholders: no two writable bindings of a dispatch alias.
    let halves = |i: usize| GpuTensor::binding_or(pairs.get(i).map(|p| p.0), &ctx.dummies[i]);
    let copies =
        |i: usize| GpuTensor::binding_or(pairs.get(i).map(|p| p.1), &ctx.dummies[CAST_SLOTS + i]);
    let group = set.bind_group(
        &ctx.device,
        "gpunorm parameter cast",
        &uniform,
        [
            halves(0),
            halves(1),
            halves(2),
            halves(3),
            copies(0),
            copies(1),
            copies(2),
            copies(3),
        ],
    );
    CastBinding {
        cast,
        pairs: pairs.iter().map(|&(h, c)| (h.clone(), c.clone())).collect(),
        group,
    }
}
