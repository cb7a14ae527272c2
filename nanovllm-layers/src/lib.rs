//! Tensor-parallel layers of the forward pass (nano-vLLM's `layers/`), generic over the op-set
//! [`Backend`]: the model crate assembles Qwen3 from these, the model runner builds the
//! [`context::Context`] they read.
//!
//! Each layer holds its weights in backend buffers (this rank's shard only), knows how to read
//! that shard from a [`loader::WeightSource`], and runs its part of a step with backend ops on
//! buffers the caller allocated once. Flow of one decoder layer:
//! [`layernorm::RMSNorm`] -> [`linear::QKVParallelLinear`] ->
//! [`rotary_embedding::RotaryEmbedding`] (with the q/k norms) -> [`attention::Attention`] ->
//! [`linear::RowParallelLinear`] -> [`layernorm::RMSNorm`] ->
//! [`linear::MergedColumnParallelLinear`] -> [`activation::SiluAndMul`] ->
//! [`linear::RowParallelLinear`].
#![deny(missing_docs)]

pub mod activation;
pub mod attention;
pub mod context;
pub mod embed_head;
pub mod layernorm;
pub mod linear;
pub mod loader;
pub mod rotary_embedding;
pub mod sampler;
pub mod tp;

#[cfg(test)]
mod testutil;

pub use nanovllm_kernels::Backend;
