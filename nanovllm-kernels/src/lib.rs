//! The op set: every computation of the Qwen3 forward pass and of the sampler, behind one
//! [`Backend`] trait with two implementations.
//!
//! * [`cpu::CpuBackend`]: plain Rust, f32 accumulation. The reference every CUDA kernel is
//!   tested against, and what runs the whole engine in CI and on machines without a GPU.
//! * `cuda::CudaBackend` (feature `cuda`): CUDA C kernels compiled to PTX by nvcc, launched
//!   through cudarc, with cuBLASLt for GEMMs.
//!
//! Layers and models are written once, generic over `B: Backend`.
#![deny(missing_docs)]

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use backend::{philox_uniform, AttnParams, Backend, Elem, GraphExec, SamplingBufs};
pub use half::bf16;
