//! The statistics engine: plans and records one forward pass of any
//! normalization on its `[P, A, G, B]` view (DESIGN.md, "data flow").
//!
//! The plan is a pure function of the view and the mode ([`plan_forward`]), so
//! tests and the bench can see which kernels run without a device.

use wgpu::util::DeviceExt;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::{self, Kernel};
use crate::tensor::GpuTensor;
use crate::view::View;

/// Where a forward pass takes its mean and variance from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsSource {
    /// The statistics of the batch itself.
    Batch,
    /// The running statistics (eval mode).
    Running,
}

/// How the running statistics are updated after a batch-statistics forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningUpdate {
    /// new = keep·old + take·batch.
    pub keep: f32,
    /// Weight of the batch value.
    pub take: f32,
    /// torch's `momentum=None`: take = 1 / num_batches_tracked.
    pub cumulative: bool,
    /// Update the running variance with the unbiased (n-1) variance.
    pub unbiased: bool,
}

/// Everything the engine needs to know about one forward call, besides the
/// buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardSpec {
    pub view: View,
    /// RMSNorm: no centering, rstd = 1/sqrt(mean(x²) + eps).
    pub rms: bool,
    pub eps: f32,
    pub source: StatsSource,
    /// Running-stat update (batch statistics only).
    pub update: Option<RunningUpdate>,
    /// Increment num_batches_tracked on the device.
    pub bump_counter: bool,
}

/// One recorded dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    pub kernel: Kernel,
    pub workgroups: u32,
}

/// Tiles of the partials pass for a group of `len` elements.
fn tiles_for(len: usize) -> u32 {
    len.div_ceil(kernels::STATS_TILE as usize).max(1) as u32
}

/// Whether the single-dispatch row kernel handles this forward.
pub fn uses_row_kernel(spec: &ForwardSpec) -> bool {
    let v = &spec.view;
    spec.source == StatsSource::Batch
        && spec.update.is_none()
        && v.a == 1
        && (v.b <= kernels::ROWS_MAX_LEN as usize
            || v.groups() >= kernels::ROWS_MIN_FOR_LONG as usize)
}

/// The dispatches of one forward pass, in order.
pub fn plan_forward(spec: &ForwardSpec) -> Vec<Dispatch> {
    let v = &spec.view;
    let d = |kernel, workgroups: usize| Dispatch {
        kernel,
        workgroups: workgroups as u32,
    };
    let normalize_wg = v
        .numel()
        .div_ceil((kernels::NORMALIZE_WG * kernels::NORMALIZE_PER_THREAD) as usize);
    if v.numel() == 0 {
        return if spec.bump_counter {
            vec![d(Kernel::BumpCounter, 1)]
        } else {
            Vec::new()
        };
    }
    match spec.source {
        StatsSource::Running => vec![
            d(
                Kernel::EvalStats,
                v.groups().div_ceil(kernels::FINALIZE_WG as usize),
            ),
            d(Kernel::Normalize, normalize_wg),
        ],
        StatsSource::Batch if uses_row_kernel(spec) => vec![d(Kernel::Rows, v.groups())],
        StatsSource::Batch => {
            let tiles = tiles_for(v.group_len()) as usize;
            let finalize_wg = if spec.update.is_some() {
                v.g
            } else {
                v.groups()
            };
            vec![
                d(Kernel::Partials, v.groups() * tiles),
                d(Kernel::Finalize, finalize_wg),
                d(Kernel::Normalize, normalize_wg),
            ]
        }
    }
}

/// Bytes of scratch (statistics and partials) a forward of `view` needs.
pub fn scratch_bytes(view: &View) -> u64 {
    let groups = view.groups() as u64;
    let tiles = tiles_for(view.group_len()) as u64;
    16 * (groups + groups * tiles).max(1)
}

/// The buffers of one forward call.
pub(crate) struct ForwardBuffers<'a> {
    pub x: &'a GpuTensor,
    pub y: &'a GpuTensor,
    pub weight: Option<&'a GpuTensor>,
    pub bias: Option<&'a GpuTensor>,
    pub running_mean: Option<&'a GpuTensor>,
    pub running_var: Option<&'a GpuTensor>,
    pub counter: Option<&'a wgpu::Buffer>,
    /// Statistics (first `groups` vec4) and partials; at least
    /// [`scratch_bytes`] long.
    pub scratch: &'a wgpu::Buffer,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    p: u32,
    a: u32,
    g: u32,
    b: u32,
    n_groups: u32,
    total: u32,
    tiles: u32,
    tile_len: u32,
    affine_div: u32,
    flags: u32,
    eps: f32,
    keep: f32,
    take: f32,
    partials_offset: u32,
    _pad: [u32; 2],
}

const FLAG_WEIGHT: u32 = 1;
const FLAG_BIAS: u32 = 2;
const FLAG_RMS: u32 = 4;
const FLAG_UPDATE_RUNNING: u32 = 8;
const FLAG_CUMULATIVE: u32 = 16;
const FLAG_UNBIASED: u32 = 32;
const FLAG_BUMP_COUNTER: u32 = 64;

fn to_u32(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::TooLarge {
        what: what.to_string(),
        bytes: n as u64,
        limit: u32::MAX as u64,
        limit_name: "u32 element indexing",
    })
}

/// Checks the sizes the shaders index with u32 and the bindings' limits.
pub(crate) fn check_limits(ctx: &Context, spec: &ForwardSpec, x: &GpuTensor) -> Result<()> {
    let v = &spec.view;
    to_u32("the input's element count", v.numel())?;
    let tiles = tiles_for(v.group_len()) as usize;
    to_u32("the partials count", v.groups() * tiles + v.groups())?;
    ctx.check_size("the input", x.byte_len())?;
    ctx.check_size("the statistics scratch", scratch_bytes(v))?;
    Ok(())
}

/// Records the dispatches of one forward pass into `encoder`. The caller has
/// validated shapes, dtypes and sizes ([`check_limits`]).
pub(crate) fn record_forward(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    spec: &ForwardSpec,
    bufs: &ForwardBuffers<'_>,
) -> Vec<Dispatch> {
    let plan = plan_forward(spec);
    if plan.is_empty() {
        return plan;
    }
    let v = &spec.view;
    let mut flags = 0;
    let mut set = |cond: bool, f: u32| {
        if cond {
            flags |= f;
        }
    };
    set(bufs.weight.is_some(), FLAG_WEIGHT);
    set(bufs.bias.is_some(), FLAG_BIAS);
    set(spec.rms, FLAG_RMS);
    set(spec.bump_counter, FLAG_BUMP_COUNTER);
    let (keep, take) = match spec.update {
        Some(u) => {
            set(true, FLAG_UPDATE_RUNNING);
            set(u.cumulative, FLAG_CUMULATIVE);
            set(u.unbiased, FLAG_UNBIASED);
            (u.keep, u.take)
        }
        None => (1.0, 0.0),
    };
    let params = Params {
        p: v.p as u32,
        a: v.a as u32,
        g: v.g as u32,
        b: v.b as u32,
        n_groups: v.groups() as u32,
        total: v.numel() as u32,
        tiles: tiles_for(v.group_len()),
        tile_len: kernels::STATS_TILE,
        affine_div: v.affine_div.max(1) as u32,
        flags,
        eps: spec.eps,
        keep,
        take,
        partials_offset: v.groups() as u32,
        _pad: [0; 2],
    };
    let uniform = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("gpunorm params"),
            contents: bytemuck::bytes_of(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let dummy = |i: usize| ctx.dummies[i].as_entire_binding();
    fn tensor_or<'a>(
        t: Option<&'a GpuTensor>,
        fallback: wgpu::BindingResource<'a>,
    ) -> wgpu::BindingResource<'a> {
        t.map(|t| t.binding()).unwrap_or(fallback)
    }
    let resources = [
        uniform.as_entire_binding(),
        bufs.x.binding(),
        bufs.y.binding(),
        tensor_or(bufs.weight, dummy(3)),
        tensor_or(bufs.bias, dummy(4)),
        tensor_or(bufs.running_mean, dummy(5)),
        tensor_or(bufs.running_var, dummy(6)),
        bufs.counter
            .map(|c| c.as_entire_binding())
            .unwrap_or_else(|| dummy(7)),
        bufs.scratch.as_entire_binding(),
    ];
    let entries: Vec<wgpu::BindGroupEntry> = resources
        .into_iter()
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("gpunorm forward"),
        layout: &ctx.pipelines.bind_group_layout,
        entries: &entries,
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("gpunorm forward"),
        timestamp_writes: None,
    });
    pass.set_bind_group(0, &bind_group, &[]);
    for dispatch in &plan {
        let pipeline = ctx
            .pipelines
            .get(&ctx.device, dispatch.kernel, bufs.x.dtype());
        pass.set_pipeline(&pipeline);
        let (gx, gy) = kernels::grid(dispatch.workgroups);
        pass.dispatch_workgroups(gx, gy, 1);
    }
    plan
}
