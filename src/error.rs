//! The crate's error type.
//!
//! Every fallible call returns [`Error`]; none panics on bad input. Messages
//! say what was expected and what was given, in the spirit of torch's.

/// What went wrong, typed so callers can react to the kind of failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// No adapter could be found (or none matched the requested name).
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    /// The device could not be created or was lost.
    #[error("device error: {0}")]
    Device(String),
    /// A shape does not fit the op (rank, channel count, normalized shape...).
    #[error("{0}")]
    Shape(String),
    /// A hyper-parameter is invalid (eps, momentum, groups...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tensor has a dtype the op does not accept.
    #[error("{0}")]
    Dtype(String),
    /// The layer's state is inconsistent (running mean without variance...).
    #[error("{0}")]
    State(String),
    /// A tensor is larger than the adapter can bind or hold.
    #[error(
        "{what} needs {bytes} bytes, more than the adapter's limit of {limit} bytes ({limit_name})"
    )]
    TooLarge {
        /// Which tensor or buffer.
        what: String,
        /// Bytes it would need.
        bytes: u64,
        /// The adapter's limit.
        limit: u64,
        /// Name of the wgpu limit that was exceeded.
        limit_name: &'static str,
    },
    /// wgpu reported a validation or out-of-memory error while recording.
    #[error("wgpu error: {0}")]
    Wgpu(String),
    /// A file could not be read or written, or its contents are malformed.
    #[error("{0}")]
    File(String),
}

/// Short for `std::result::Result<T, gpunorm::Error>`.
pub type Result<T> = std::result::Result<T, Error>;
