//! Tensor-parallel layers of the forward pass, generic over the op-set [`Backend`].
#![deny(missing_docs)]

pub use nanovllm_kernels::Backend;
