//! Ground floor of the nanovllm workspace: the error type every crate returns, model and
//! engine configuration, and safetensors weight loading.
//!
//! Nothing here touches a GPU; every other crate depends on this one.
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod weights;

pub use config::{EngineConfig, GenerationConfig, ModelConfig};
pub use error::{Error, Result};
pub use weights::Weights;
