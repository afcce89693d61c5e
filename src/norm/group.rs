//! GroupNorm (torch `GroupNorm`, channels-first; Keras `GroupNormalization`,
//! channels-last): statistics per (sample, group of contiguous channels).

use crate::context::Context;
use crate::engine::{Dispatch, ForwardSpec, StatsSource};
use crate::error::{Error, Result};
use crate::norm::{
    check_eps, check_input_dtype, forward_into_new, record_layer, Affine, Convention, Saved,
};
use crate::tensor::GpuTensor;
use crate::view::View;

/// Hyper-parameters of a [`GroupNorm`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNormConfig {
    /// Channels-first (torch) or channels-last (Keras).
    pub convention: Convention,
    /// Added to the variance inside the square root.
    pub eps: f32,
    /// Learnable γ (torch `affine`, Keras `scale`).
    pub weight: bool,
    /// Learnable β (torch `affine`, Keras `center`).
    pub bias: bool,
}

impl GroupNormConfig {
    /// torch's defaults: eps 1e-5, affine, channels-first `[N, C, *S]`.
    pub fn torch() -> Self {
        GroupNormConfig {
            convention: Convention::Torch,
            eps: 1e-5,
            weight: true,
            bias: true,
        }
    }

    /// Keras's defaults: epsilon 1e-3, center and scale, channels-last.
    pub fn keras() -> Self {
        GroupNormConfig {
            convention: Convention::Keras,
            eps: 1e-3,
            weight: true,
            bias: true,
        }
    }
}

/// Group normalization: `num_channels` split in `num_groups` contiguous blocks.
#[derive(Debug)]
pub struct GroupNorm {
    num_groups: usize,
    num_channels: usize,
    config: GroupNormConfig,
    affine: Affine,
    saved: Option<Saved>,
}

impl GroupNorm {
    /// A layer of `num_groups` groups over `num_channels` channels.
    pub fn new(
        ctx: &Context,
        num_groups: usize,
        num_channels: usize,
        config: GroupNormConfig,
    ) -> Result<Self> {
        check_eps(config.eps)?;
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            return Err(Error::InvalidArgument(format!(
                "num_channels must be divisible by num_groups, got num_channels={num_channels} and num_groups={num_groups}"
            )));
        }
        Ok(GroupNorm {
            num_groups,
            num_channels,
            affine: Affine::new(ctx, num_channels, config.weight, config.bias)?,
            config,
            saved: None,
        })
    }

    /// Groups.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// Channels.
    pub fn num_channels(&self) -> usize {
        self.num_channels
    }

    /// The configuration.
    pub fn config(&self) -> &GroupNormConfig {
        &self.config
    }

    /// γ and β.
    pub fn affine(&self) -> &Affine {
        &self.affine
    }

    /// Replaces γ and β (each optional).
    pub fn set_affine(&mut self, affine: Affine) -> Result<()> {
        affine.check(self.num_channels)?;
        self.affine = affine;
        Ok(())
    }

    fn spec(&self, x: &GpuTensor) -> Result<ForwardSpec> {
        check_input_dtype(x)?;
        let shape = x.shape();
        if shape.len() < 2 {
            return Err(Error::Shape(format!(
                "expected an input of at least 2D, got size {shape:?}"
            )));
        }
        let channels_last = self.config.convention == Convention::Keras;
        let c = if channels_last {
            shape[shape.len() - 1]
        } else {
            shape[1]
        };
        if !c.is_multiple_of(self.num_groups) {
            return Err(Error::Shape(format!(
                "Expected number of channels in input to be divisible by num_groups, but got input of shape {shape:?} and num_groups={}",
                self.num_groups
            )));
        }
        if c != self.num_channels {
            return Err(Error::Shape(format!(
                "expected input with {} channels, got input of size {shape:?}",
                self.num_channels
            )));
        }
        self.affine.check(self.num_channels)?;
        if !channels_last {
            check_torch_group_sizes(shape, self.num_groups)?;
        }
        let view = if channels_last {
            View::group_norm_channels_last(shape, self.num_groups)
        } else {
            View::group_norm(shape, self.num_groups)
        };
        Ok(ForwardSpec {
            dtype: x.dtype(),
            view,
            rms: false,
            eps: self.config.eps,
            source: StatsSource::Batch,
            update: None,
            bump_counter: false,
            empty_batch_nan: false,
            zero_rstd: false,
        })
    }

    /// Normalizes `x` (records, submits, returns the output).
    pub fn forward(&mut self, ctx: &Context, x: &GpuTensor) -> Result<GpuTensor> {
        self.spec(x)?;
        forward_into_new(
            self,
            |l| &mut l.saved,
            ctx,
            x,
            |l, encoder, y| l.record(ctx, encoder, x, y),
        )
    }

    /// Records the forward pass into the caller's encoder, writing `y`.
    pub fn record(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<Vec<Dispatch>> {
        let spec = self.spec(x)?;
        record_layer(
            ctx,
            encoder,
            spec,
            x,
            y,
            &self.affine,
            None,
            &mut self.saved,
        )
    }
}

crate::norm::impl_backward!(GroupNorm, |s| s.saved.as_ref(), &s.affine);

/// torch's own checks of a GroupNorm input `[N, C, *S]`, in train and eval
/// mode alike: a zero spatial size (`HxW`), and a single value in all the
/// groups of the batch together (torch counts N·C/G·∏S, so N = 1, C = G and
/// ∏S = 1 is refused but N = 2 is not). Keras checks neither.
fn check_torch_group_sizes(shape: &[usize], groups: usize) -> Result<()> {
    let hxw: usize = shape[2..].iter().product();
    if hxw == 0 {
        return Err(Error::Shape(format!(
            "Expected HxW to be greater than 0, got 0 (input of size {shape:?})"
        )));
    }
    if shape[0] * (shape[1] / groups) * hxw == 1 {
        let mut size = vec![shape[0] * shape[1] / groups, groups];
        size.extend_from_slice(&shape[2..]);
        return Err(Error::Shape(format!(
            "Expected more than 1 value per channel when training, got input size {size:?}"
        )));
    }
    Ok(())
}
