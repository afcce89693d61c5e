//! SyncBatchNorm (SPEC.md §8): BatchNorm whose statistics span every
//! replica of a batch split across devices or processes.
//!
//! Each replica computes per-channel `(count, mean, M2)` on its device
//! ([`BatchNorm::replica_stats`]); any transport (MPI, NCCL, a second GPU in
//! the same process) carries those few numbers; [`ReplicaStats::merge`]
//! combines them with Chan's formula; each replica then normalizes with the
//! global statistics ([`BatchNorm::forward_synced`]), and the running
//! variance uses the unbiased variance over the global count.

use crate::context::Context;
use crate::engine::{self, ForwardBuffers, PresetStat, StatsSource};
use crate::error::{Error, Result};
use crate::norm::batch::BatchNorm;
use crate::norm::half_params::{self, WorkingCopies};
use crate::norm::{check_output, submit_scoped, Affine, Mode, Saved};
use crate::tensor::DType;
use crate::tensor::GpuTensor;

/// Per-channel statistics of one replica's shard, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStats {
    /// Elements per channel in this shard.
    pub count: f64,
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel sum of squared deviations from the mean.
    pub m2: Vec<f64>,
    /// This replica's per-channel shift (its first element); kept so the
    /// normalize pass loses no digits to a large offset.
    pub shift: Vec<f32>,
}

/// Statistics merged over every replica.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalStats {
    /// Elements per channel over all replicas.
    pub count: f64,
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel sum of squared deviations.
    pub m2: Vec<f64>,
}

impl GlobalStats {
    /// Biased variance per channel (what normalizes).
    pub fn variance(&self) -> Vec<f64> {
        self.m2.iter().map(|m2| m2 / self.count).collect()
    }
}

impl ReplicaStats {
    /// Chan's parallel merge: associative, order-independent up to rounding.
    pub fn merge(parts: &[ReplicaStats]) -> Result<GlobalStats> {
        let first = parts
            .first()
            .ok_or_else(|| Error::InvalidArgument("no replica statistics to merge".into()))?;
        let channels = first.mean.len();
        if parts
            .iter()
            .any(|p| p.mean.len() != channels || p.m2.len() != channels)
        {
            return Err(Error::Shape(
                "replicas disagree on the number of channels".into(),
            ));
        }
        let mut acc = GlobalStats {
            count: 0.0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        };
        // Empty replicas add nothing (torch drops them): their mean of 0
        // against an infinite one would make delta·0 a NaN.
        for part in parts.iter().filter(|p| p.count > 0.0) {
            let n = acc.count + part.count;
            for c in 0..channels {
                let delta = part.mean[c] - acc.mean[c];
                let mut mean = acc.mean[c] + delta * part.count / n;
                // As chan_merge (common.wgsl): an infinite mean merged with
                // a finite one keeps its ±inf through the weighted sum.
                if mean.is_nan() && !acc.mean[c].is_nan() && !part.mean[c].is_nan() {
                    mean = acc.mean[c] * (acc.count / n) + part.mean[c] * (part.count / n);
                }
                acc.mean[c] = mean;
                acc.m2[c] += part.m2[c] + delta * delta * acc.count * part.count / n;
            }
            acc.count = n;
        }
        Ok(acc)
    }
}

impl BatchNorm {
    /// This replica's per-channel statistics of `x` (one small read-back).
    pub fn replica_stats(&self, ctx: &Context, x: &GpuTensor) -> Result<ReplicaStats> {
        let mut spec = self.spec_with(x, Mode::Eval, false)?;
        crate::norm::check_forward_context(ctx, x, None, &Affine::default(), None)?;
        spec.source = StatsSource::Batch;
        spec.update = None;
        spec.bump_counter = false;
        let channels = self.num_features;
        let count = spec.view.group_len() as f64;
        if spec.view.numel() == 0 {
            return Ok(ReplicaStats {
                count: 0.0,
                mean: vec![0.0; channels],
                m2: vec![0.0; channels],
                shift: vec![0.0; channels],
            });
        }
        engine::check_limits(ctx, &spec, x)?;
        let chunks = engine::chunks_for(ctx, &spec);
        let scratch = ctx.create_buffer(
            "gpunorm statistics",
            engine::forward_scratch_bytes(&spec, &chunks, &ctx.caps()),
        )?;
        let y = ctx.zeros(x.shape(), x.dtype())?;
        let none = crate::norm::Affine::default();
        submit_scoped(ctx, |encoder| {
            let bufs = ForwardBuffers::new(x, &y, &none, None, &scratch);
            engine::record_forward(ctx, encoder, &spec, &bufs, None);
            Ok(())
        })?;
        let bytes = pollster::block_on(ctx.read_buffer(&scratch, 0, 16 * channels as u64))?;
        let stats: Vec<[f32; 4]> = bytemuck::pod_collect_to_vec(&bytes);
        Ok(ReplicaStats {
            count,
            mean: stats.iter().map(|s| s[0] as f64 + s[1] as f64).collect(),
            m2: stats.iter().map(|s| s[3] as f64 * count).collect(),
            shift: stats.iter().map(|s| s[0]).collect(),
        })
    }

    /// Normalizes this replica's `x` with the global statistics; in train
    /// mode the running statistics take the global mean and the unbiased
    /// variance over the global count (torch's SyncBatchNorm). Eval mode is
    /// a local [`BatchNorm::forward`], as torch synchronizes training only.
    pub fn forward_synced(
        &mut self,
        ctx: &Context,
        x: &GpuTensor,
        local: &ReplicaStats,
        global: &GlobalStats,
        mode: Mode,
    ) -> Result<GpuTensor> {
        let spec = self.spec_with(x, mode, false)?;
        crate::norm::check_forward_context(ctx, x, None, &self.affine, self.running.as_ref())?;
        half_params::check_params(ctx, x.dtype(), &self.affine, self.running.as_ref())?;
        let channels = self.num_features;
        if global.mean.len() != channels || local.shift.len() != channels {
            return Err(Error::Shape(format!(
                "expected statistics of {channels} channels, got {} (global) and {} (local)",
                global.mean.len(),
                local.shift.len()
            )));
        }
        if mode == Mode::Eval || spec.source != StatsSource::Batch {
            // torch synchronizes training only ("Don't sync batchnorm stats
            // in inference mode"): eval, with running statistics or without
            // (then the shard's own batch statistics, with the shard's
            // one-value-per-channel check), is a local forward.
            return self.forward(ctx, x, mode);
        }
        // The global count decides the unbiased correction and the
        // one-value-per-channel rule, not the shard's: every replica,
        // an empty one too, refuses the step, so their states stay equal.
        if self.config.convention == crate::Convention::Torch && global.count == 1.0 {
            return Err(Error::Shape(format!(
                "Expected more than 1 value per channel when training, got {} values per channel over all replicas",
                global.count
            )));
        }
        let preset: Vec<PresetStat> = (0..channels)
            .map(|c| PresetStat {
                count: global.count,
                mean: global.mean[c],
                m2: global.m2[c],
                shift: local.shift[c],
            })
            .collect();
        engine::check_limits(ctx, &spec, x)?;
        let y = ctx.zeros(x.shape(), x.dtype())?;
        let running = self.running.as_ref();
        check_output(
            x,
            &y,
            &[self.affine.weight.as_ref(), self.affine.bias.as_ref()],
        )?;
        let chunks = engine::chunks_for(ctx, &spec);
        // The preset statistics take a partial per group after the groups'
        // statistics (engine::record_forward_preset), whatever kernels a
        // forward of this view would take: scratch_bytes leaves room for
        // them where forward_scratch_bytes gives row kernels none.
        let scratch = std::sync::Arc::new(ctx.create_buffer(
            "gpunorm statistics",
            engine::scratch_bytes(&spec.view, &chunks, &ctx.caps()),
        )?);
        let own = self.saved.as_ref().filter(|s| s.context == ctx.uid);
        let mut copies =
            WorkingCopies::for_tensors(ctx, &self.affine, running, own.map(|s| &s.copies))?;
        let wide_affine = copies.affine(&self.affine);
        let wide_running = running.map(|r| copies.running(r));
        submit_scoped(ctx, |encoder| {
            copies.record_widen(ctx, encoder, &self.affine, running);
            let bufs = ForwardBuffers::new(x, &y, &wide_affine, wide_running.as_ref(), &scratch);
            engine::record_forward_preset(ctx, encoder, &spec, &bufs, &preset);
            if let Some(r) = running.filter(|_| spec.updates_running()) {
                copies.record_narrow_running(ctx, encoder, r);
            }
            Ok(())
        })?;
        self.saved = Some(Saved {
            context: ctx.uid,
            spec,
            scratch,
            x: x.clone(),
            bindings: None,
            synced: true,
            copies,
        });
        Ok(y)
    }
}

/// One replica's per-channel backward sums `Σdy` and `Σdy·x̂` (x̂ with the
/// global statistics of [`BatchNorm::forward_synced`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaGradSums {
    /// Elements per channel in this shard.
    pub count: f64,
    /// Per-channel Σdy (this replica's dβ).
    pub sum_dy: Vec<f64>,
    /// Per-channel Σdy·x̂ (this replica's dγ).
    pub sum_dy_xhat: Vec<f64>,
}

impl ReplicaGradSums {
    /// The sums over every replica (what torch's SyncBatchNorm all-reduces).
    pub fn all_reduce(parts: &[ReplicaGradSums]) -> Result<ReplicaGradSums> {
        let first = parts
            .first()
            .ok_or_else(|| Error::InvalidArgument("no replica sums to reduce".into()))?;
        let channels = first.sum_dy.len();
        if parts
            .iter()
            .any(|p| p.sum_dy.len() != channels || p.sum_dy_xhat.len() != channels)
        {
            return Err(Error::Shape(
                "replicas disagree on the number of channels".into(),
            ));
        }
        let mut total = ReplicaGradSums {
            count: 0.0,
            sum_dy: vec![0.0; channels],
            sum_dy_xhat: vec![0.0; channels],
        };
        for part in parts {
            total.count += part.count;
            for c in 0..channels {
                total.sum_dy[c] += part.sum_dy[c];
                total.sum_dy_xhat[c] += part.sum_dy_xhat[c];
            }
        }
        Ok(total)
    }
}

impl BatchNorm {
    /// This replica's backward sums for `dy` (a few numbers per channel read
    /// back), after [`BatchNorm::forward_synced`].
    pub fn replica_grad_sums(&self, ctx: &Context, dy: &GpuTensor) -> Result<ReplicaGradSums> {
        let channels = self.num_features;
        let saved = self.saved.as_ref().ok_or_else(|| {
            Error::State("backward was called before any forward: run forward_synced first".into())
        })?;
        let count = saved.spec.view.group_len() as f64;
        // dγ = Σdy·x̂ and dβ = Σdy do not depend on γ's values: probe with a
        // γ and a β so both are computed whatever the layer's affine, both
        // f32 so the sums come back unrounded whatever the parameters' dtype.
        let probe = Affine {
            weight: Some(match &self.affine.weight {
                Some(w) if w.dtype() == DType::F32 => w.clone(),
                _ => ctx.upload(&vec![1.0; channels], &[channels])?,
            }),
            bias: Some(ctx.zeros(&[channels], DType::F32)?),
        };
        let grads = crate::backward::run_backward(ctx, Some(saved), &probe, dy)?;
        let read = |t: &Option<GpuTensor>| -> Result<Vec<f64>> {
            match t {
                Some(t) => Ok(ctx.download(t)?.iter().map(|&v| v as f64).collect()),
                None => Ok(vec![0.0; channels]),
            }
        };
        Ok(ReplicaGradSums {
            count,
            sum_dy: read(&grads.grad_bias)?,
            sum_dy_xhat: read(&grads.grad_weight)?,
        })
    }

    /// The backward of [`BatchNorm::forward_synced`] with the all-reduced
    /// sums: grad_input uses the global `(Σg, Σg·x̂)` and count; dγ and dβ are
    /// this replica's own (torch's SyncBatchNorm leaves their reduction to the
    /// data-parallel wrapper).
    pub fn backward_synced(
        &self,
        ctx: &Context,
        dy: &GpuTensor,
        local: &ReplicaGradSums,
        global: &ReplicaGradSums,
    ) -> Result<crate::backward::Gradients> {
        let channels = self.num_features;
        let saved = self.saved.as_ref().ok_or_else(|| {
            Error::State("backward was called before any forward: run forward_synced first".into())
        })?;
        if !saved.synced || saved.spec.source != StatsSource::Batch {
            // A local forward (eval): a local backward.
            return self.backward(ctx, dy);
        }
        for sums in [local, global] {
            if sums.sum_dy.len() != channels || sums.sum_dy_xhat.len() != channels {
                return Err(Error::Shape(format!(
                    "expected backward sums of {channels} channels, got {}",
                    sums.sum_dy.len()
                )));
            }
        }
        let gamma: Vec<f64> = match &self.affine.weight {
            Some(w) => ctx.download(w)?.iter().map(|&v| v as f64).collect(),
            None => vec![1.0; channels],
        };
        // The shader divides the group sums by the local count: scale the
        // global sums so that it gets Σ_global / N_global.
        let scale = if global.count > 0.0 {
            local.count / global.count
        } else {
            0.0
        };
        let sums: Vec<[f32; 4]> = (0..channels)
            .map(|c| {
                [
                    (gamma[c] * global.sum_dy[c] * scale) as f32,
                    (gamma[c] * global.sum_dy_xhat[c] * scale) as f32,
                    0.0,
                    0.0,
                ]
            })
            .collect();
        let mut grads = submit_scoped(ctx, |encoder| {
            crate::backward::record_backward_with(
                ctx,
                encoder,
                Some(saved),
                &self.affine,
                dy,
                Some(&sums),
            )
            .map(|(g, _)| g)
        })?;
        // In the parameter's dtype (SPEC.md §4).
        let local_param = |values: &[f64], param: &GpuTensor| -> Result<GpuTensor> {
            let v: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            ctx.upload_as(&v, &[channels], param.dtype())
        };
        if let Some(w) = &self.affine.weight {
            grads.grad_weight = Some(local_param(&local.sum_dy_xhat, w)?);
        }
        if let Some(b) = &self.affine.bias {
            grads.grad_bias = Some(local_param(&local.sum_dy, b)?);
        }
        Ok(grads)
    }
}
