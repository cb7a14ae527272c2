//! RMSNorm (nano-vLLM's `layers/layernorm.py`): the norm before attention and before the MLP
//! of every decoder layer, the final norm, and (per head) Qwen3's q/k norms.
//!
//! The residual add is fused into the norm ([`RMSNorm::add_forward`]), as in nano-vLLM: the
//! decoder keeps the residual stream in its own buffer and each norm both adds the previous
//! block's output into it and normalises the sum, in one pass.

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_utils::Result;

use crate::linear::upload;
use crate::loader::WeightSource;

/// `y = x / sqrt(mean(x^2) + eps) * weight` over rows of `hidden_size`.
pub struct RMSNorm<B: Backend> {
    hidden_size: usize,
    eps: f32,
    weight: B::Buf<bf16>,
}

impl<B: Backend> RMSNorm<B> {
    /// Allocates the (uninitialised) `[hidden_size]` weight.
    pub fn new(be: &B, hidden_size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            hidden_size,
            eps: eps as f32,
            weight: be.alloc(hidden_size)?,
        })
    }

    /// Loads checkpoint tensor `name`, `[hidden_size]` (replicated on every rank).
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        let data = src.load(name, &[self.hidden_size])?;
        upload(be, name, &data, &mut self.weight)
    }

    /// `out = rms_norm(x)` for `n` rows.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        be.rms_norm(x, &self.weight, n, self.hidden_size, self.eps, out)
    }

    /// The fused residual form, in place: `residual += x`, then `x = rms_norm(residual)`.
    pub fn add_forward(
        &self,
        be: &B,
        x: &mut B::Buf<bf16>,
        residual: &mut B::Buf<bf16>,
        n: usize,
    ) -> Result<()> {
        be.add_rms_norm(x, residual, &self.weight, n, self.hidden_size, self.eps)
    }

    /// The `[hidden_size]` weight.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Width of the rows it normalises.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}
