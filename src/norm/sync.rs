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
use crate::norm::{check_output, submit_scoped, Mode, Saved};
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
        for part in parts {
            let n = acc.count + part.count;
            if n == 0.0 {
                continue;
            }
            for c in 0..channels {
                let delta = part.mean[c] - acc.mean[c];
                acc.mean[c] += delta * part.count / n;
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
            engine::scratch_bytes(&spec.view, &chunks),
        )?;
        let y = ctx.zeros(x.shape(), x.dtype())?;
        let none = crate::norm::Affine::default();
        submit_scoped(ctx, |encoder| {
            let bufs = ForwardBuffers {
                x,
                y: &y,
                weight: none.weight.as_ref(),
                bias: none.bias.as_ref(),
                running_mean: None,
                running_var: None,
                counter: None,
                scratch: &scratch,
            };
            engine::record_forward(ctx, encoder, &spec, &bufs);
            Ok(())
        })?;
        let bytes = pollster::block_on(ctx.read_buffer(&scratch, 0, 16 * channels as u64))?;
        let stats: &[[f32; 4]] = bytemuck::cast_slice(&bytes);
        Ok(ReplicaStats {
            count,
            mean: stats.iter().map(|s| s[0] as f64 + s[1] as f64).collect(),
            m2: stats.iter().map(|s| s[3] as f64 * count).collect(),
            shift: stats.iter().map(|s| s[0]).collect(),
        })
    }

    /// Normalizes this replica's `x` with the global statistics; in train
    /// mode the running statistics take the global mean and the unbiased
    /// variance over the global count (torch's SyncBatchNorm).
    pub fn forward_synced(
        &mut self,
        ctx: &Context,
        x: &GpuTensor,
        local: &ReplicaStats,
        global: &GlobalStats,
        mode: Mode,
    ) -> Result<GpuTensor> {
        let spec = self.spec_with(x, mode, false)?;
        let channels = self.num_features;
        if global.mean.len() != channels || local.shift.len() != channels {
            return Err(Error::Shape(format!(
                "expected statistics of {channels} channels, got {} (global) and {} (local)",
                global.mean.len(),
                local.shift.len()
            )));
        }
        if spec.source != StatsSource::Batch {
            // Eval with running statistics: nothing to synchronize.
            return self.forward(ctx, x, mode);
        }
        // The global count decides the unbiased correction and the
        // one-value-per-channel rule, not the shard's.
        if self.config.convention == crate::Convention::Torch
            && global.count <= 1.0
            && spec.view.numel() > 0
        {
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
        let scratch = std::sync::Arc::new(ctx.create_buffer(
            "gpunorm statistics",
            engine::scratch_bytes(&spec.view, &chunks),
        )?);
        submit_scoped(ctx, |encoder| {
            let bufs = ForwardBuffers {
                x,
                y: &y,
                weight: self.affine.weight.as_ref(),
                bias: self.affine.bias.as_ref(),
                running_mean: running.map(|r| &r.mean),
                running_var: running.map(|r| &r.var),
                counter: running.and_then(|r| r.counter.as_deref()),
                scratch: &scratch,
            };
            engine::record_forward_preset(ctx, encoder, &spec, &bufs, &preset);
            Ok(())
        })?;
        self.saved = Some(Saved {
            spec,
            scratch,
            x: x.clone(),
        });
        Ok(y)
    }
}
