//! InstanceNorm (torch `InstanceNorm1d/2d/3d`): statistics per (sample,
//! channel) over the spatial dims, with torch's optional running statistics.

use crate::context::Context;
use crate::engine::{Dispatch, ForwardSpec, RunningUpdate, StatsSource};
use crate::error::{Error, Result};
use crate::norm::{
    check_eps, check_input_dtype, check_momentum, forward_into_new, record_layer, Affine,
    Convention, Mode, RunningStats, Saved,
};
use crate::tensor::GpuTensor;
use crate::view::View;

/// Hyper-parameters of an [`InstanceNorm`] (torch's defaults in
/// [`InstanceNormConfig::torch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceNormConfig {
    /// Added to the variance inside the square root.
    pub eps: f32,
    /// Weight of the new value in the running update; `None` is torch's
    /// momentum 0 for instance norm (SPEC.md §3): the running statistics
    /// keep their values, but a NaN or inf in the batch still reaches
    /// them (0·NaN), as in torch.
    pub momentum: Option<f32>,
    /// Learnable γ and β.
    pub affine: bool,
    /// Keep running statistics (used in eval mode).
    pub track_running_stats: bool,
    /// torch's `InstanceNorm1d/2d/3d`: `Some(k)` takes `[N, C, *S]` and the
    /// unbatched `[C, *S]` with `k` spatial dims, normalizing an unbatched
    /// input as a batch of one, and refuses other ranks. `None` takes any
    /// batched `[N, C, *S]` of at least one spatial dim.
    pub spatial_dims: Option<usize>,
}

impl InstanceNormConfig {
    /// torch's defaults: eps 1e-5, momentum 0.1, no affine, no running stats;
    /// any batched rank of at least 3.
    pub fn torch() -> Self {
        InstanceNormConfig {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: false,
            track_running_stats: false,
            spatial_dims: None,
        }
    }

    /// torch `InstanceNorm1d`: `[N, C, L]` or unbatched `[C, L]`.
    pub fn torch_1d() -> Self {
        Self::torch_spatial(1)
    }

    /// torch `InstanceNorm2d`: `[N, C, H, W]` or unbatched `[C, H, W]`.
    pub fn torch_2d() -> Self {
        Self::torch_spatial(2)
    }

    /// torch `InstanceNorm3d`: `[N, C, D, H, W]` or unbatched `[C, D, H, W]`.
    pub fn torch_3d() -> Self {
        Self::torch_spatial(3)
    }

    fn torch_spatial(k: usize) -> Self {
        InstanceNormConfig {
            spatial_dims: Some(k),
            ..Self::torch()
        }
    }
}

/// Instance normalization of `[N, C, *S]` inputs (and unbatched `[C, *S]`
/// with [`InstanceNormConfig::spatial_dims`]).
#[derive(Debug)]
pub struct InstanceNorm {
    num_features: usize,
    config: InstanceNormConfig,
    affine: Affine,
    running: Option<RunningStats>,
    saved: Option<Saved>,
}

impl InstanceNorm {
    /// A layer for `num_features` channels.
    pub fn new(ctx: &Context, num_features: usize, config: InstanceNormConfig) -> Result<Self> {
        check_eps(config.eps)?;
        if let Some(m) = config.momentum {
            check_momentum(m)?;
        }
        let affine = Affine::new(ctx, num_features, config.affine, config.affine)?;
        let running = if config.track_running_stats {
            Some(RunningStats::new(ctx, num_features, true)?)
        } else {
            None
        };
        Ok(InstanceNorm {
            num_features,
            config,
            affine,
            running,
            saved: None,
        })
    }

    /// Channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The configuration.
    pub fn config(&self) -> &InstanceNormConfig {
        &self.config
    }

    /// γ and β.
    pub fn affine(&self) -> &Affine {
        &self.affine
    }

    /// Replaces γ and β (each optional).
    pub fn set_affine(&mut self, affine: Affine) -> Result<()> {
        affine.check(self.num_features)?;
        self.affine = affine;
        Ok(())
    }

    /// The running statistics, when tracked.
    pub fn running_stats(&self) -> Option<&RunningStats> {
        self.running.as_ref()
    }

    /// Replaces (or with `None` drops) the running statistics and counter.
    pub fn set_running_stats(
        &mut self,
        ctx: &Context,
        stats: Option<(GpuTensor, GpuTensor, Option<i64>)>,
    ) -> Result<()> {
        self.running = match stats {
            None => None,
            Some((mean, var, count)) => Some(RunningStats::from_tensors(
                ctx,
                Convention::Torch,
                self.num_features,
                mean,
                var,
                count,
            )?),
        };
        Ok(())
    }

    /// `x`'s shape as `[N, C, *S]`: an unbatched input is a batch of one.
    fn batched_shape(&self, x: &GpuTensor) -> Result<Vec<usize>> {
        let shape = x.shape();
        let rank = shape.len();
        match self.config.spatial_dims {
            None if rank < 3 => Err(Error::Shape(format!(
                "expected a batched input [N, C, *S] of at least 3D (got {rank}D input of size {shape:?})"
            ))),
            None => Ok(shape.to_vec()),
            Some(k) if rank == k + 2 => Ok(shape.to_vec()),
            Some(k) if rank == k + 1 => Ok([&[1], shape].concat()),
            Some(k) => Err(Error::Shape(format!(
                "expected {}D or {}D input (got {rank}D input of size {shape:?})",
                k + 1,
                k + 2
            ))),
        }
    }

    fn spec(&self, x: &GpuTensor, mode: Mode) -> Result<ForwardSpec> {
        check_input_dtype(x)?;
        let shape = &self.batched_shape(x)?[..];
        if shape[1] != self.num_features {
            return Err(Error::Shape(format!(
                "expected input with {} channels, got input of size {:?}",
                self.num_features,
                x.shape()
            )));
        }
        self.affine.check(self.num_features)?;
        if let Some(r) = &self.running {
            r.check(self.num_features)?;
        }
        let view = View::instance_norm(shape);
        let train = mode == Mode::Train;
        let batch_stats = train || self.running.is_none();
        // torch checks the spatial size alone, so an empty batch of one
        // spatial element is refused too.
        if batch_stats && view.b == 1 {
            return Err(Error::Shape(format!(
                "Expected more than 1 spatial element when training, got input size {shape:?}"
            )));
        }
        // torch's InstanceNorm passes momentum None on as 0.0.
        let update = match (&self.running, train) {
            (Some(_), true) => {
                let m = self.config.momentum.unwrap_or(0.0);
                Some(RunningUpdate {
                    keep: 1.0 - m,
                    take: m,
                    cumulative: false,
                    unbiased: true,
                })
            }
            _ => None,
        };
        Ok(ForwardSpec {
            dtype: x.dtype(),
            view,
            rms: false,
            eps: self.config.eps,
            source: if batch_stats {
                StatsSource::Batch
            } else {
                StatsSource::Running
            },
            update,
            bump_counter: false,
            // torch averages the updated statistics over the N instances,
            // with any momentum (None too): over none they are NaN. An
            // empty spatial size leaves them alone.
            empty_batch_nan: self.running.is_some() && train && shape[0] == 0,
            // torch runs instance norm through its batch-norm kernel, whose
            // rstd is 0 for zero variance with eps 0.
            zero_rstd: true,
        })
    }

    /// Normalizes `x` (records, submits, returns the output).
    pub fn forward(&mut self, ctx: &Context, x: &GpuTensor, mode: Mode) -> Result<GpuTensor> {
        self.spec(x, mode)?;
        forward_into_new(
            self,
            |l| &mut l.saved,
            ctx,
            x,
            |l, encoder, y| l.record(ctx, encoder, x, y, mode),
        )
    }

    /// Records the forward pass into the caller's encoder, writing `y`.
    pub fn record(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
        mode: Mode,
    ) -> Result<Vec<Dispatch>> {
        let spec = self.spec(x, mode)?;
        let running = self.running.as_ref();
        record_layer(
            ctx,
            encoder,
            spec,
            x,
            y,
            &self.affine,
            running,
            &mut self.saved,
        )
    }
}

crate::norm::impl_backward!(InstanceNorm, |s| s.saved.as_ref(), &s.affine);
