//! Rotary position embedding (nano-vLLM's `layers/rotary_embedding.py`), neox layout: the two
//! halves of each q/k head are rotated against each other by `position * inv_freq`.
//!
//! The cos/sin table is computed once in f32 for every position up to
//! `max_position_embeddings` and uploaded once; one table serves every layer (as nano-vLLM's
//! cached `get_rope`). Applying it is fused with Qwen3's per-head q/k RMSNorm in one op,
//! [`RotaryEmbedding::forward_with_qk_norm`], in place on the fused `qkv` rows.

use half::bf16;
use nanovllm_kernels::cpu::rope_cos_sin_cache;
use nanovllm_kernels::{AttnParams, Backend};
use nanovllm_utils::{Error, Result};

use crate::layernorm::RMSNorm;

/// The cos/sin table of one head size and base.
pub struct RotaryEmbedding<B: Backend> {
    head_dim: usize,
    max_position: usize,
    cos_sin: B::Buf<f32>,
}

impl<B: Backend> RotaryEmbedding<B> {
    /// Computes and uploads the `[max_position, head_dim]` table (`cos` of the `head_dim / 2`
    /// angles, then their `sin`) for `inv_freq_i = base^(-2i / head_dim)`.
    /// Errors when `head_dim` is zero or odd or `base` is not a positive number.
    pub fn new(be: &B, head_dim: usize, max_position: usize, base: f64) -> Result<Self> {
        let table = rope_cos_sin_cache(head_dim, max_position, base)?;
        Ok(Self {
            head_dim,
            max_position,
            cos_sin: be.from_host(&table)?,
        })
    }

    /// Qwen3's q/k per-head RMSNorm, then the rotation, in place on the q and k heads of `n`
    /// rows of `qkv` (laid out as `attn` says), row `i` rotated by `positions[i]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_qk_norm(
        &self,
        be: &B,
        qkv: &mut B::Buf<bf16>,
        n: usize,
        attn: &AttnParams,
        q_norm: &RMSNorm<B>,
        k_norm: &RMSNorm<B>,
        positions: &B::Buf<i32>,
    ) -> Result<()> {
        if attn.head_dim != self.head_dim
            || q_norm.hidden_size() != self.head_dim
            || k_norm.hidden_size() != self.head_dim
        {
            return Err(Error::Other(format!(
                "qk_norm_rope: head_dim mismatch (attention {}, rotary table {}, q_norm {}, \
                 k_norm {})",
                attn.head_dim,
                self.head_dim,
                q_norm.hidden_size(),
                k_norm.hidden_size()
            )));
        }
        be.qk_norm_rope(
            qkv,
            n,
            attn,
            q_norm.weight(),
            k_norm.weight(),
            q_norm.eps(),
            positions,
            &self.cos_sin,
        )
    }

    /// Positions the table covers (`0..max_position`).
    pub fn max_position(&self) -> usize {
        self.max_position
    }

    /// The `[max_position, head_dim]` f32 table.
    pub fn cos_sin(&self) -> &B::Buf<f32> {
        &self.cos_sin
    }
}
