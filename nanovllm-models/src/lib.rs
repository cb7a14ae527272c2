//! Model definitions over the nanovllm layers (nano-vLLM's `models/`): Qwen3, its checkpoint
//! name mapping, seeded dummy weights and the paged KV cache the model runner allocates.
//!
//! The model runner (in the engine) builds a [`qwen3::Qwen3ForCausalLM`], loads it
//! ([`qwen3::Qwen3ForCausalLM::load_weights`] or [`qwen3::Qwen3ForCausalLM::load_dummy`]),
//! allocates a [`qwen3::Workspace`] and a [`qwen3::KvCache`] once, and then per step calls
//! `forward` and `compute_logits`.
#![deny(missing_docs)]

pub mod dummy;
pub mod kv_cache;
pub mod qwen3;

pub use dummy::DummyWeights;
pub use kv_cache::KvCache;
pub use qwen3::{Qwen3ForCausalLM, Workspace};
