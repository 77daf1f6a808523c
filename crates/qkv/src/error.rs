//! The library's error type. Every variant names the offending value and where it occurred.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{input}: token id {value} at batch row {row}, position {pos} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        input: &'static str,
        value: u32,
        row: usize,
        pos: usize,
        vocab: usize,
    },

    #[error("{input}: label {value} at batch row {row} is outside 0..{n_classes}")]
    LabelOutOfRange {
        input: &'static str,
        value: u32,
        row: usize,
        n_classes: usize,
    },

    #[error("{input}: sequence length {len} exceeds the positional table (max_len {max_len})")]
    SequenceTooLong {
        input: &'static str,
        len: usize,
        max_len: usize,
    },

    /// An input text longer than the model (or a service) accepts; `index` counts from 0.
    #[error("input {index} has {len} tokens, more than the limit of {limit}")]
    InputTooLong {
        index: usize,
        len: usize,
        limit: usize,
    },

    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    #[error("non-finite value ({value}) in {what}")]
    NonFinite { what: String, value: f32 },

    #[error("invalid config: {0}")]
    Config(String),

    /// Data-parallel training: a rank that did not arrive, or a transport failure.
    #[error("data-parallel training: {0}")]
    Distributed(String),

    /// An API called out of order (e.g. `backward` after decoding replaced the activations).
    #[error("{0}")]
    Usage(String),

    /// A user's file (a job config, labels, decoding settings) that cannot be used.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    #[error("{path}:{line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    // Neither wraps its error as a `source`: the message already holds it, and a report that
    // walks the chain (anyhow's "Caused by") would print it twice.
    #[error("scoring: {0}")]
    Metric(crate::metrics::sacrebleu::MetricError),

    #[error("{0}")]
    Cuda(crate::cuda::CudaError),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<crate::metrics::sacrebleu::MetricError> for Error {
    fn from(e: crate::metrics::sacrebleu::MetricError) -> Self {
        Error::Metric(e)
    }
}

impl From<crate::cuda::CudaError> for Error {
    fn from(e: crate::cuda::CudaError) -> Self {
        Error::Cuda(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err(
    what: impl Into<String>,
    expected: impl ToString,
    got: impl ToString,
) -> Error {
    Error::Shape {
        what: what.into(),
        expected: expected.to_string(),
        got: got.to_string(),
    }
}
