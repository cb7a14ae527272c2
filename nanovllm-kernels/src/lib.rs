//! The op set: every computation of the Qwen3 forward pass and of the sampler, behind one
//! [`Backend`] trait with two implementations.
//!
//! * [`cpu::CpuBackend`]: plain Rust, f32 accumulation. The reference every CUDA kernel is
//!   tested against, and what runs the whole engine in CI and on machines without a GPU.
//! * `cuda::CudaBackend` (feature `cuda`): CUDA C kernels compiled to PTX by nvcc, launched
//!   through cudarc, with cuBLASLt for GEMMs.
//!
//! Layers and models are written once, generic over `B: Backend`.
//!
//! ```
//! use nanovllm_kernels::{bf16, cpu::CpuBackend, Backend};
//!
//! let be = CpuBackend::new();
//! let x = be.from_host(&[bf16::from_f32(3.0), bf16::from_f32(4.0)])?;
//! let weight = be.from_host(&[bf16::ONE; 2])?;
//! let mut out = be.alloc::<bf16>(2)?;
//! be.rms_norm(&x, &weight, 1, 2, 1e-6, &mut out)?;
//! let mut host = [bf16::ZERO; 2];
//! be.dtoh(&out, &mut host)?;
//! let rms = (12.5f32).sqrt(); // sqrt((3^2 + 4^2) / 2)
//! assert!((host[1].to_f32() - 4.0 / rms).abs() < 1e-2);
//! # Ok::<(), nanovllm_utils::Error>(())
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use backend::{philox_uniform, AttnParams, Backend, Elem, GraphExec, QkNormRope, SamplingBufs};
pub use half::bf16;
