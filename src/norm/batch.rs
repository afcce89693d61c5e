//! BatchNorm (torch `BatchNorm1d/2d/3d`, Keras `BatchNormalization`).

use crate::context::Context;
use crate::engine::{Dispatch, ForwardSpec, RunningUpdate, StatsSource};
use crate::error::{Error, Result};
use crate::norm::{
    check_eps, check_input_dtype, check_momentum, check_vector, forward_into_new, record_layer,
    Affine, Convention, Mode, RunningStats, Saved,
};
use crate::tensor::GpuTensor;
use crate::view::View;

/// Hyper-parameters of a [`BatchNorm`]. Start from [`BatchNormConfig::torch`]
/// or [`BatchNormConfig::keras`], which hold each framework's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormConfig {
    /// Whose momentum and running-variance rules apply.
    pub convention: Convention,
    /// Added to the variance inside the square root.
    pub eps: f32,
    /// torch: weight of the new value (0.1), `None` for the cumulative
    /// average; Keras: weight of the old value (0.99), never `None`.
    pub momentum: Option<f32>,
    /// Learnable γ (torch `affine`, Keras `scale`).
    pub weight: bool,
    /// Learnable β (torch `affine`, Keras `center`).
    pub bias: bool,
    /// Keep running statistics (torch `track_running_stats`).
    pub track_running_stats: bool,
    /// The channel axis: 1 for torch (channels-first), -1 for Keras.
    pub axis: isize,
    /// Ranks the layer accepts (torch's BatchNorm1d takes 2 or 3, 2d takes
    /// 4, 3d takes 5); empty means any rank ≥ 2.
    pub ranks: Vec<usize>,
    /// Keras `trainable=False`: always inference, even in train mode.
    pub trainable: bool,
}

impl BatchNormConfig {
    /// torch's defaults: eps 1e-5, momentum 0.1, affine, tracked, channel
    /// axis 1, any rank ≥ 2.
    pub fn torch() -> Self {
        BatchNormConfig {
            convention: Convention::Torch,
            eps: 1e-5,
            momentum: Some(0.1),
            weight: true,
            bias: true,
            track_running_stats: true,
            axis: 1,
            ranks: Vec::new(),
            trainable: true,
        }
    }

    /// torch `BatchNorm1d`: `[N, C]` or `[N, C, L]`.
    pub fn torch_1d() -> Self {
        BatchNormConfig {
            ranks: vec![2, 3],
            ..Self::torch()
        }
    }

    /// torch `BatchNorm2d`: `[N, C, H, W]`.
    pub fn torch_2d() -> Self {
        BatchNormConfig {
            ranks: vec![4],
            ..Self::torch()
        }
    }

    /// torch `BatchNorm3d`: `[N, C, D, H, W]`.
    pub fn torch_3d() -> Self {
        BatchNormConfig {
            ranks: vec![5],
            ..Self::torch()
        }
    }

    /// Keras's defaults: epsilon 1e-3, momentum 0.99 (decay), channel axis -1,
    /// center and scale on, biased moving variance.
    pub fn keras() -> Self {
        BatchNormConfig {
            convention: Convention::Keras,
            eps: 1e-3,
            momentum: Some(0.99),
            weight: true,
            bias: true,
            track_running_stats: true,
            axis: -1,
            ranks: Vec::new(),
            trainable: true,
        }
    }

    /// Turns γ and β on or off together (torch's `affine`).
    pub fn affine(mut self, on: bool) -> Self {
        self.weight = on;
        self.bias = on;
        self
    }

    fn validate(&self) -> Result<()> {
        check_eps(self.eps)?;
        match (self.momentum, self.convention) {
            (Some(m), _) => check_momentum(m),
            (None, Convention::Torch) => Ok(()),
            (None, Convention::Keras) => Err(Error::InvalidArgument(
                "Keras BatchNormalization needs a momentum; the cumulative average (momentum=None) is torch's"
                    .into(),
            )),
        }
    }
}

/// Batch normalization over one channel axis.
///
/// ```
/// use gpunorm::{BatchNorm, BatchNormConfig, Context, Mode};
/// let ctx = Context::new()?;
/// let mut bn = BatchNorm::new(&ctx, 2, BatchNormConfig::torch_1d())?;
/// let x = ctx.upload(&[1.0, 10.0, 3.0, 30.0], &[2, 2])?;
/// let y = ctx.download(&bn.forward(&ctx, &x, Mode::Train)?)?;
/// assert!((y[0] + 1.0).abs() < 1e-3 && (y[1] + 1.0).abs() < 1e-3);
/// # Ok::<(), gpunorm::Error>(())
/// ```
#[derive(Debug)]
pub struct BatchNorm {
    pub(crate) num_features: usize,
    pub(crate) config: BatchNormConfig,
    pub(crate) affine: Affine,
    pub(crate) running: Option<RunningStats>,
    pub(crate) saved: Option<Saved>,
}

impl BatchNorm {
    /// A layer for `num_features` channels with γ = 1, β = 0, running mean 0,
    /// running variance 1 (as the config asks).
    pub fn new(ctx: &Context, num_features: usize, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        if num_features == 0 {
            return Err(Error::InvalidArgument(
                "num_features must be positive, got 0".into(),
            ));
        }
        let affine = Affine::new(ctx, num_features, config.weight, config.bias)?;
        let running = if config.track_running_stats {
            Some(RunningStats::new(
                ctx,
                num_features,
                config.convention == Convention::Torch,
            )?)
        } else {
            None
        };
        Ok(BatchNorm {
            num_features,
            config,
            affine,
            running,
            saved: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// γ and β.
    pub fn affine(&self) -> &Affine {
        &self.affine
    }

    /// Replaces γ (`None` removes it). Checked: `num_features` long; f32 or
    /// the input's dtype, checked by each pass.
    pub fn set_weight(&mut self, weight: Option<GpuTensor>) -> Result<()> {
        if let Some(w) = &weight {
            check_vector("weight", w, self.num_features)?;
        }
        self.affine.weight = weight;
        Ok(())
    }

    /// Replaces β (`None` removes it).
    pub fn set_bias(&mut self, bias: Option<GpuTensor>) -> Result<()> {
        if let Some(b) = &bias {
            check_vector("bias", b, self.num_features)?;
        }
        self.affine.bias = bias;
        Ok(())
    }

    /// The running statistics, when tracked.
    pub fn running_stats(&self) -> Option<&RunningStats> {
        self.running.as_ref()
    }

    /// Replaces the running mean and variance (and, under torch, the
    /// counter); `None` stops tracking (torch `track_running_stats=False`).
    pub fn set_running_stats(
        &mut self,
        ctx: &Context,
        stats: Option<(GpuTensor, GpuTensor, Option<i64>)>,
    ) -> Result<()> {
        let Some((mean, var, count)) = stats else {
            self.running = None;
            return Ok(());
        };
        self.running = Some(RunningStats::from_tensors(
            ctx,
            self.config.convention,
            self.num_features,
            mean,
            var,
            count,
        )?);
        Ok(())
    }

    /// Validates `x` for `mode` and returns the engine's plan of the pass.
    pub(crate) fn spec(&self, x: &GpuTensor, mode: Mode) -> Result<ForwardSpec> {
        self.spec_with(x, mode, true)
    }

    /// [`BatchNorm::spec`], with torch's one-value-per-channel check on this
    /// input optional (SyncBatchNorm checks the global count instead).
    pub(crate) fn spec_with(
        &self,
        x: &GpuTensor,
        mode: Mode,
        check_batch_size: bool,
    ) -> Result<ForwardSpec> {
        check_input_dtype(x)?;
        let shape = x.shape();
        let rank = shape.len();
        let ranks = &self.config.ranks;
        if (ranks.is_empty() && rank < 2) || (!ranks.is_empty() && !ranks.contains(&rank)) {
            let expected = if ranks.is_empty() {
                "at least 2D".to_string()
            } else {
                ranks
                    .iter()
                    .map(|r| format!("{r}D"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            };
            return Err(Error::Shape(format!(
                "expected {expected} input (got {rank}D input of size {shape:?})"
            )));
        }
        let axis = self.config.axis;
        let axis_index = if axis < 0 { axis + rank as isize } else { axis };
        if axis_index < 0 || axis_index >= rank as isize {
            return Err(Error::InvalidArgument(format!(
                "axis {axis} is out of range for an input of rank {rank}"
            )));
        }
        let axis_index = axis_index as usize;
        if shape[axis_index] != self.num_features {
            return Err(Error::Shape(format!(
                "expected input with {} channels on axis {axis}, got input of size {shape:?}",
                self.num_features
            )));
        }
        self.affine.check(self.num_features)?;
        if let Some(r) = &self.running {
            r.check(self.num_features)?;
        }
        let view = View::batch_norm(shape, axis_index);
        let frozen = self.config.convention == Convention::Keras && !self.config.trainable;
        let train = mode == Mode::Train && !frozen;
        let batch_stats = train || self.running.is_none();
        let torch = self.config.convention == Convention::Torch;
        if check_batch_size && torch && batch_stats && view.group_len() == 1 {
            return Err(Error::Shape(format!(
                "Expected more than 1 value per channel when training, got input size {shape:?}"
            )));
        }
        let update = match (&self.running, train) {
            (Some(_), true) => Some(match (self.config.convention, self.config.momentum) {
                (Convention::Torch, Some(m)) => RunningUpdate {
                    keep: 1.0 - m,
                    take: m,
                    cumulative: false,
                    unbiased: true,
                },
                (Convention::Torch, None) => RunningUpdate {
                    keep: 0.0,
                    take: 1.0,
                    cumulative: true,
                    unbiased: true,
                },
                (Convention::Keras, m) => {
                    let m = m.unwrap_or(0.99);
                    RunningUpdate {
                        keep: m,
                        take: 1.0 - m,
                        cumulative: false,
                        unbiased: false,
                    }
                }
            }),
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
            bump_counter: update.is_some() && torch,
            // Keras moves its moving statistics toward the batch moments
            // even when the batch is empty: they become NaN. torch leaves
            // them alone.
            empty_batch_nan: update.is_some() && !torch,
            zero_rstd: false,
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

    /// Records the forward pass into the caller's encoder, writing `y`. Train
    /// mode updates the running statistics on the device in the same
    /// commands; nothing is submitted and nothing waits.
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

crate::norm::impl_backward!(BatchNorm, |s| s.saved.as_ref(), &s.affine);
