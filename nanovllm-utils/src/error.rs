//! The one error type of the workspace. Each variant names what was wrong (the file, the field,
//! the tensor, the op) so that a user can act on the message without reading code.

use std::path::PathBuf;

/// Result alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error a nanovllm crate can return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file is missing, unreadable, or lacks a field.
    #[error("config {file}: {msg}")]
    Config {
        /// The file that was read (config.json, generation_config.json, ...).
        file: PathBuf,
        /// What is wrong with it, naming the field.
        msg: String,
    },
    /// An engine option is out of range.
    #[error("invalid engine option `{option}`: {msg}")]
    EngineConfig {
        /// The option's name, as the CLI and `EngineConfig` spell it.
        option: &'static str,
        /// Why the value was refused.
        msg: String,
    },
    /// A weight file is missing, truncated or holds a tensor of the wrong shape or dtype.
    #[error("weights {file}: {msg}")]
    Weights {
        /// The weight file (or folder) concerned.
        file: PathBuf,
        /// What is wrong, naming the tensor, what was expected and what was found.
        msg: String,
    },
    /// The tokenizer or chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request or sampling parameter was refused.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An op was called with buffers that do not match the dimensions it was given.
    #[error("op {op}: buffer `{tensor}` has {found} elements, needs at least {expected}")]
    Shape {
        /// The op's name.
        op: &'static str,
        /// The buffer's role in the op.
        tensor: &'static str,
        /// Elements needed.
        expected: usize,
        /// Elements present.
        found: usize,
    },
    /// The CUDA driver, cuBLAS(Lt), NCCL or a kernel launch failed.
    #[error("cuda: {0}")]
    Cuda(String),
    /// Not enough device memory for what was asked.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A tensor-parallel worker died or the channel to it broke.
    #[error("worker: {0}")]
    Worker(String),
    /// Any I/O error, with the path it concerned.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, said in words.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Shorthand for an [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
