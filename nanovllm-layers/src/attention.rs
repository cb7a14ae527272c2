//! Paged attention of one layer (nano-vLLM's `layers/attention.py`): write this step's keys and
//! values into the KV cache at `slot_mapping`, then attend.
//!
//! Prefill runs varlen causal attention with keys and values read back from the paged cache, so
//! a prompt whose prefix is cached (prefix caching) or that arrives in chunks (chunked prefill)
//! attends to all its earlier tokens; decode runs one query per sequence against its
//! `context_lens[s]` cached tokens. The caller (Qwen3's attention block) has already applied
//! the q/k norms and RoPE to `qkv`.

use half::bf16;
use nanovllm_kernels::{AttnParams, Backend};
use nanovllm_utils::{Error, Result};

use crate::context::Context;

/// Attention over this rank's heads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    /// Query heads on this rank.
    pub num_heads: usize,
    /// Key/value heads on this rank.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Softmax scale (`head_dim^-0.5`).
    pub scale: f32,
}

impl Attention {
    /// Attention over `num_heads` query and `num_kv_heads` key/value heads of `head_dim`.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
        }
    }

    /// The op metadata for caches of `block_size` tokens per block and this step's block tables.
    pub fn params(&self, block_size: usize, max_blocks_per_seq: usize) -> AttnParams {
        AttnParams {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            block_size,
            max_blocks_per_seq,
            scale: self.scale,
        }
    }

    /// Stores the k/v heads of the step's `ctx.num_tokens` rows of `qkv` into this layer's
    /// cache, then writes the attention output `[num_tokens, num_heads * head_dim]` to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        qkv: &B::Buf<bf16>,
        ctx: &Context<'_, B>,
        k_cache: &mut B::Buf<bf16>,
        v_cache: &mut B::Buf<bf16>,
        block_size: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        let params = self.params(block_size, ctx.max_blocks_per_seq);
        be.store_kvcache(
            qkv,
            ctx.num_tokens,
            &params,
            ctx.slot_mapping,
            k_cache,
            v_cache,
        )?;
        if ctx.is_prefill {
            be.prefill_attention(
                qkv,
                k_cache,
                v_cache,
                ctx.cu_seqlens_q,
                ctx.cu_seqlens_k,
                ctx.block_tables,
                ctx.num_seqs,
                ctx.max_seqlen_q,
                ctx.max_seqlen_k,
                &params,
                out,
            )
        } else {
            if ctx.num_tokens != ctx.num_seqs {
                return Err(Error::Other(format!(
                    "decode attention: {} rows for {} sequences (decode computes one token \
                     per sequence)",
                    ctx.num_tokens, ctx.num_seqs
                )));
            }
            be.decode_attention(
                qkv,
                k_cache,
                v_cache,
                ctx.context_lens,
                ctx.block_tables,
                ctx.num_seqs,
                ctx.max_context_len,
                &params,
                out,
            )
        }
    }
}
