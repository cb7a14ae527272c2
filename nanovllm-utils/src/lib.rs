//! Ground floor of the nanovllm workspace: the error type every crate returns, model and
//! engine configuration, and safetensors weight loading.
//!
//! Nothing here touches a GPU; every other crate depends on this one.
//!
//! ```
//! use nanovllm_utils::{EngineConfig, ModelConfig};
//!
//! let model = ModelConfig::builtin("qwen3-0.6b")?;
//! assert_eq!((model.num_attention_heads, model.num_key_value_heads), (16, 8));
//! let mut engine = EngineConfig::default();
//! engine.validate(&model)?; // caps max_model_len by max_position_embeddings, checks the rest
//! assert_eq!(engine.kvcache_block_size, 256);
//! # Ok::<(), nanovllm_utils::Error>(())
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod weights;

pub use config::{EngineConfig, GenerationConfig, ModelConfig};
pub use error::{Error, Result};
pub use weights::Weights;
