//! Model definitions over the nanovllm layers (nano-vLLM's `models/`): Qwen3, its checkpoint
//! name mapping, seeded dummy weights and the paged KV cache the model runner allocates.
//!
//! The model runner (in the engine) builds a [`qwen3::Qwen3ForCausalLM`], loads it
//! ([`qwen3::Qwen3ForCausalLM::load_weights`] or [`qwen3::Qwen3ForCausalLM::load_dummy`]),
//! allocates a [`qwen3::Workspace`] and a [`qwen3::KvCache`] once, and then per step calls
//! `forward` and `compute_logits`.
//!
//! ```
//! use nanovllm_models::qwen3::{param_count, KvCache};
//! use nanovllm_kernels::cpu::CpuBackend;
//! use nanovllm_utils::ModelConfig;
//!
//! let config = ModelConfig::builtin("qwen3-0.6b")?;
//! let params = param_count(&config);
//! assert!((590_000_000..610_000_000).contains(&params), "{params}");
//! // 28 layers x (K, V) x 8 heads x 128 dims x 2 bytes x 256 tokens per block
//! assert_eq!(KvCache::<CpuBackend>::bytes_per_block(&config, 1, 256), 114_688 * 256);
//! # Ok::<(), nanovllm_utils::Error>(())
//! ```
#![deny(missing_docs)]

pub mod dummy;
pub mod kv_cache;
pub mod qwen3;

pub use dummy::DummyWeights;
pub use kv_cache::KvCache;
pub use qwen3::{Qwen3ForCausalLM, Workspace};
