//! # gpunorm
//!
//! Neural-network normalization — BatchNorm, LayerNorm, InstanceNorm,
//! GroupNorm, RMSNorm; forward and backward; f32, f16 and bf16 storage — on
//! any GPU through WGSL compute shaders and [`wgpu`], with PyTorch's and
//! Keras's semantics down to momentum conventions, running-variance bias,
//! eps defaults and error cases (see `SPEC.md` of the project).
//!
//! Every normalization is statistics per group of an `[P, A, G, B]` view of
//! the input plus a fused normalize-scale-shift ([`View`]); one engine serves
//! them all. Work is recorded into a `wgpu::CommandEncoder`: `forward` records
//! and submits, `record` leaves submission to you, and neither waits for
//! the device: reading results back does ([`Context::download`] and the
//! few other calls whose docs say they wait, such as
//! `RunningStats::num_batches_tracked` or `Stateful::save_state`).
//!
//! ```
//! use gpunorm::{BatchNorm, BatchNormConfig, Context, Mode};
//!
//! let ctx = Context::new()?; // best adapter: GPU, else software (lavapipe)
//! let x = ctx.upload(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[2, 2, 2])?;
//! let mut bn = BatchNorm::new(&ctx, 2, BatchNormConfig::torch_1d())?;
//! let y = bn.forward(&ctx, &x, Mode::Train)?; // running stats updated on the device
//! let host = ctx.download(&y)?;
//! assert!((host.iter().sum::<f32>()).abs() < 1e-4);
//! # Ok::<(), gpunorm::Error>(())
//! ```

pub mod backward;
pub mod context;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod norm;
pub mod reference;
pub mod state;
pub mod tensor;
pub mod timing;
pub mod view;

pub use backward::Gradients;
pub use context::{ensure_runtime_dir, AdapterSummary, Context, ContextOptions};
pub use error::{Error, Result};
pub use norm::batch::{BatchNorm, BatchNormConfig};
pub use norm::group::{GroupNorm, GroupNormConfig};
pub use norm::instance::{InstanceNorm, InstanceNormConfig};
pub use norm::layer::{LayerNorm, RmsNorm, RowNormConfig};
pub use norm::sync::{GlobalStats, ReplicaGradSums, ReplicaStats};
pub use norm::{Affine, Convention, Mode, RunningStats};
pub use state::{HostTensor, StateDict, Stateful};
pub use tensor::{DType, GpuTensor};
pub use view::View;
/// The wgpu version this crate is built on, so callers create devices with it.
pub use wgpu;
