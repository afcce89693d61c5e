//! LayerNorm (torch `LayerNorm`, Keras `LayerNormalization` over trailing axes)
//! and RMSNorm (torch `RMSNorm`, Keras `RMSNormalization`): both normalize
//! each row of the trailing `normalized_shape` elements.

use crate::context::Context;
use crate::engine::{Dispatch, ForwardSpec, StatsSource};
use crate::error::{Error, Result};
use crate::norm::{
    check_eps, check_input_dtype, check_vector, forward_into_new, record_layer, Affine, Mode, Saved,
};
use crate::tensor::GpuTensor;
use crate::view::{check_normalized_shape, View};

/// Hyper-parameters of a [`LayerNorm`] or [`RmsNorm`].
#[derive(Debug, Clone, PartialEq)]
pub struct RowNormConfig {
    /// Added to the variance (mean square for RMSNorm) inside the root.
    pub eps: f32,
    /// Learnable γ of `normalized_shape`.
    pub weight: bool,
    /// Learnable β (never for RMSNorm).
    pub bias: bool,
}

impl RowNormConfig {
    /// torch `LayerNorm` defaults: eps 1e-5, weight and bias.
    pub fn torch_layer_norm() -> Self {
        RowNormConfig {
            eps: 1e-5,
            weight: true,
            bias: true,
        }
    }

    /// Keras `LayerNormalization` defaults: epsilon 1e-3, gamma and beta.
    pub fn keras_layer_norm() -> Self {
        RowNormConfig {
            eps: 1e-3,
            weight: true,
            bias: true,
        }
    }

    /// torch `RMSNorm(eps=None)`: f32's machine epsilon for every input
    /// dtype (measured on torch 2.15, SPEC.md §2), a weight, no bias.
    pub fn torch_rms_norm() -> Self {
        RowNormConfig {
            eps: f32::EPSILON,
            weight: true,
            bias: false,
        }
    }

    /// Keras `RMSNormalization` defaults: epsilon 1e-6, a `scale`.
    pub fn keras_rms_norm() -> Self {
        RowNormConfig {
            eps: 1e-6,
            weight: true,
            bias: false,
        }
    }

    /// torch's `elementwise_affine`: γ and β together.
    pub fn elementwise_affine(mut self, on: bool) -> Self {
        self.weight = on;
        self.bias = on;
        self
    }
}

/// Shared body of LayerNorm and RMSNorm.
#[derive(Debug)]
struct RowNorm {
    normalized_shape: Vec<usize>,
    config: RowNormConfig,
    rms: bool,
    affine: Affine,
    saved: Option<Saved>,
}

impl RowNorm {
    fn new(
        ctx: &Context,
        normalized_shape: &[usize],
        config: RowNormConfig,
        rms: bool,
    ) -> Result<Self> {
        check_eps(config.eps)?;
        if normalized_shape.is_empty() || normalized_shape.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "normalized_shape must be non-empty with positive sizes, got {normalized_shape:?}"
            )));
        }
        if rms && config.bias {
            return Err(Error::InvalidArgument("RMSNorm has no bias".into()));
        }
        let (len, _) = crate::tensor::checked_size(normalized_shape, crate::DType::F32)?;
        Ok(RowNorm {
            normalized_shape: normalized_shape.to_vec(),
            affine: Affine::new(ctx, len, config.weight, config.bias)?,
            config,
            rms,
            saved: None,
        })
    }

    fn len(&self) -> usize {
        self.normalized_shape.iter().product()
    }

    fn spec(&self, x: &GpuTensor) -> Result<ForwardSpec> {
        check_input_dtype(x)?;
        check_normalized_shape(x.shape(), &self.normalized_shape)?;
        self.affine.check(self.len())?;
        Ok(ForwardSpec {
            dtype: x.dtype(),
            view: View::layer_norm(x.shape(), self.len()),
            rms: self.rms,
            eps: self.config.eps,
            source: StatsSource::Batch,
            update: None,
            bump_counter: false,
            empty_batch_nan: false,
            zero_rstd: false,
        })
    }

    fn record(
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

    fn forward(&mut self, ctx: &Context, x: &GpuTensor) -> Result<GpuTensor> {
        self.spec(x)?;
        forward_into_new(
            self,
            |l| &mut l.saved,
            ctx,
            x,
            |l, encoder, y| l.record(ctx, encoder, x, y),
        )
    }

    fn set(&mut self, which: &str, t: Option<GpuTensor>) -> Result<()> {
        if let Some(t) = &t {
            check_vector(which, t, self.len())?;
        }
        if which == "weight" {
            self.affine.weight = t;
        } else {
            self.affine.bias = t;
        }
        Ok(())
    }
}

macro_rules! row_norm_layer {
    ($name:ident, $rms:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug)]
        pub struct $name(RowNorm);

        impl $name {
            /// A layer over the trailing `normalized_shape` dims, γ = 1, β = 0.
            pub fn new(
                ctx: &Context,
                normalized_shape: &[usize],
                config: RowNormConfig,
            ) -> Result<Self> {
                RowNorm::new(ctx, normalized_shape, config, $rms).map($name)
            }

            /// The trailing dims normalized together.
            pub fn normalized_shape(&self) -> &[usize] {
                &self.0.normalized_shape
            }

            /// The configuration.
            pub fn config(&self) -> &RowNormConfig {
                &self.0.config
            }

            /// γ and β.
            pub fn affine(&self) -> &Affine {
                &self.0.affine
            }

            /// Replaces γ (`None` removes it); it must have
            /// `normalized_shape`'s element count.
            pub fn set_weight(&mut self, weight: Option<GpuTensor>) -> Result<()> {
                self.0.set("weight", weight)
            }

            /// Normalizes `x`; `mode` changes nothing (there are no running
            /// statistics) and exists for symmetry with torch's `train()`.
            pub fn forward(
                &mut self,
                ctx: &Context,
                x: &GpuTensor,
                _mode: Mode,
            ) -> Result<GpuTensor> {
                self.0.forward(ctx, x)
            }

            /// Records the forward pass into the caller's encoder, writing `y`.
            pub fn record(
                &mut self,
                ctx: &Context,
                encoder: &mut wgpu::CommandEncoder,
                x: &GpuTensor,
                y: &GpuTensor,
            ) -> Result<Vec<Dispatch>> {
                self.0.record(ctx, encoder, x, y)
            }
        }
    };
}

row_norm_layer!(
    LayerNorm,
    false,
    "Layer normalization of each row of the trailing `normalized_shape` elements.\n\n```\nuse gpunorm::{Context, LayerNorm, RowNormConfig, Mode};\nlet ctx = Context::new()?;\nlet mut ln = LayerNorm::new(&ctx, &[4], RowNormConfig::torch_layer_norm())?;\nlet x = ctx.upload(&[1.0, 2.0, 3.0, 4.0], &[1, 4])?;\nlet y = ctx.download(&ln.forward(&ctx, &x, Mode::Train)?)?;\nassert!((y[0] + 1.3416).abs() < 1e-3);\n# Ok::<(), gpunorm::Error>(())\n```"
);
row_norm_layer!(
    RmsNorm,
    true,
    "RMS normalization: `y = x / sqrt(mean(x²) + eps) · γ` over the trailing `normalized_shape` elements."
);

impl LayerNorm {
    /// Replaces β (`None` removes it, torch's `bias=False`).
    pub fn set_bias(&mut self, bias: Option<GpuTensor>) -> Result<()> {
        self.0.set("bias", bias)
    }
}

crate::norm::impl_backward!(LayerNorm, |s| s.0.saved.as_ref(), &s.0.affine);

crate::norm::impl_backward!(RmsNorm, |s| s.0.saved.as_ref(), &s.0.affine);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ForwardBindings;
    use crate::DType;

    fn recorded(
        ctx: &Context,
        ln: &mut LayerNorm,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> ForwardBindings {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ln.record(ctx, &mut encoder, x, y).unwrap();
        ctx.queue().submit([encoder.finish()]);
        ln.0.saved.as_ref().unwrap().bindings.clone().unwrap()
    }

    #[test]
    fn recording_the_same_buffers_again_reuses_the_bind_groups() {
        let ctx = Context::new().unwrap();
        let mut ln = LayerNorm::new(&ctx, &[8], RowNormConfig::torch_layer_norm()).unwrap();
        let values: Vec<f32> = (0..16).map(|i| (i * i % 7) as f32).collect();
        let x = ctx.upload(&values, &[2, 8]).unwrap();
        let y = ctx.zeros(&[2, 8], DType::F32).unwrap();
        let first = recorded(&ctx, &mut ln, &x, &y);
        let again = recorded(&ctx, &mut ln, &x, &y);
        assert_eq!(again.groups(), first.groups());
        // Another output: new bind groups on the same parameters, and the
        // same result.
        let y2 = ctx.zeros(&[2, 8], DType::F32).unwrap();
        let other = recorded(&ctx, &mut ln, &x, &y2);
        assert_ne!(other.groups(), first.groups());
        assert_eq!(other.uniforms(), first.uniforms());
        assert_eq!(ctx.download(&y2).unwrap(), ctx.download(&y).unwrap());
        // New γ: new bind groups; another shape: new parameters.
        ln.set_weight(Some(ctx.upload(&[2.0; 8], &[8]).unwrap()))
            .unwrap();
        assert_ne!(recorded(&ctx, &mut ln, &x, &y2).groups(), other.groups());
        let doubled: Vec<f32> = ctx.download(&y).unwrap().iter().map(|v| 2.0 * v).collect();
        assert_eq!(ctx.download(&y2).unwrap(), doubled);
        let x3 = ctx.upload(&values[..8], &[1, 8]).unwrap();
        let y3 = ctx.zeros(&[1, 8], DType::F32).unwrap();
        assert_ne!(
            recorded(&ctx, &mut ln, &x3, &y3).uniforms(),
            first.uniforms()
        );
        // A layer without parameters on another context (whose wgpu ids may
        // coincide with this one's): neither its bind groups nor its
        // statistics buffer are reused there.
        let config = RowNormConfig::torch_layer_norm().elementwise_affine(false);
        let mut plain = LayerNorm::new(&ctx, &[8], config).unwrap();
        let here = recorded(&ctx, &mut plain, &x, &y);
        let other_ctx = Context::new().unwrap();
        let x_other = other_ctx.upload(&values, &[2, 8]).unwrap();
        let y_other = other_ctx.zeros(&[2, 8], DType::F32).unwrap();
        let elsewhere = recorded(&other_ctx, &mut plain, &x_other, &y_other);
        assert_ne!(elsewhere.uniforms(), here.uniforms());
        assert_eq!(
            other_ctx.download(&y_other).unwrap(),
            ctx.download(&y).unwrap()
        );
    }
}
