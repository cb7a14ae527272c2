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
//!
//! ```
//! use nanovllm_kernels::{bf16, cpu::CpuBackend, Backend};
//! use nanovllm_layers::layernorm::RMSNorm;
//! use nanovllm_utils::weights::{save_bf16, Weights};
//!
//! // A one-tensor checkpoint, loaded the way a model loads its norms.
//! let dir = std::env::temp_dir().join(format!("nanovllm-layers-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let w = [bf16::from_f32(2.0); 4];
//! save_bf16(&dir.join("model.safetensors"), &[("norm.weight", &[4], &w)])?;
//! let be = CpuBackend::new();
//! let mut norm = RMSNorm::new(&be, 4, 1e-6)?;
//! norm.load(&be, &Weights::open(&dir)?, "norm.weight")?;
//! let x = be.from_host(&[bf16::ONE; 4])?;
//! let mut out = be.alloc::<bf16>(4)?;
//! norm.forward(&be, &x, 1, &mut out)?;
//! assert_eq!(out.as_slice(), &[bf16::from_f32(2.0); 4]);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), nanovllm_utils::Error>(())
//! ```
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
