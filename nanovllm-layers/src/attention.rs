//! Paged attention of one layer (nano-vLLM's `layers/attention.py`): write this step's keys and
//! values into the KV cache at `slot_mapping`, then attend.
//!
//! Prefill runs varlen causal attention with keys and values read back from the paged cache, so
//! a prompt whose prefix is cached (prefix caching) or that arrives in chunks (chunked prefill)
//! attends to all its earlier tokens; decode runs one query per sequence against its
//! `context_lens[s]` cached tokens.
//!
//! Qwen3's attention block calls [`Attention::forward_with_qk_norm_rope`], which applies the
//! q/k norms and RoPE to `qkv` and stores the keys and values in one op
//! ([`Backend::qk_norm_rope_store`]: one kernel launch per layer fewer than the two ops, which
//! matters in small-batch decode), then attends; in decode all of it is one op
//! ([`Backend::decode_attention_rope`], which a backend may run as one kernel).
//! [`Attention::forward`] is the form for a `qkv` whose q/k heads are already normed and
//! rotated.

use half::bf16;
use nanovllm_kernels::{AttnParams, Backend, QkNormRope};
use nanovllm_utils::{Error, Result};

use crate::context::Context;
use crate::layernorm::RMSNorm;
use crate::rotary_embedding::RotaryEmbedding;

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
        self.attend(be, qkv, ctx, &params, k_cache, v_cache, out)
    }

    /// Qwen3's per-head q/k RMSNorm and RoPE (the table of `rope`, row `ctx.positions[i]` for
    /// row `i`) in place on the step's `ctx.num_tokens` rows of `qkv`, the k/v heads stored
    /// into this layer's cache at `ctx.slot_mapping`, all in one op; then the attention output
    /// `[num_tokens, num_heads * head_dim]` is written to `out`.
    ///
    /// In decode the whole block is one op ([`Backend::decode_attention_rope`]), after which
    /// the contents of `qkv` are unspecified (normed and rotated, or left as they were).
    ///
    /// Errors when the norms or the rotary table are not `head_dim` wide.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_qk_norm_rope<B: Backend>(
        &self,
        be: &B,
        qkv: &mut B::Buf<bf16>,
        ctx: &Context<'_, B>,
        rope: &RotaryEmbedding<B>,
        q_norm: &RMSNorm<B>,
        k_norm: &RMSNorm<B>,
        k_cache: &mut B::Buf<bf16>,
        v_cache: &mut B::Buf<bf16>,
        block_size: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        let d = self.head_dim;
        let table_width = be.len(rope.cos_sin()) / rope.max_position().max(1);
        if q_norm.hidden_size() != d || k_norm.hidden_size() != d || table_width != d {
            return Err(Error::Other(format!(
                "qk_norm_rope_store: head_dim mismatch (attention {d}, rotary table {}, q_norm \
                 {}, k_norm {})",
                table_width,
                q_norm.hidden_size(),
                k_norm.hidden_size()
            )));
        }
        let params = self.params(block_size, ctx.max_blocks_per_seq);
        if !ctx.is_prefill {
            self.check_decode_rows(ctx)?;
            let rope = QkNormRope {
                q_norm: q_norm.weight(),
                k_norm: k_norm.weight(),
                eps: q_norm.eps(),
                positions: ctx.positions,
                cos_sin: rope.cos_sin(),
            };
            return be.decode_attention_rope(
                qkv,
                &rope,
                ctx.slot_mapping,
                k_cache,
                v_cache,
                ctx.context_lens,
                ctx.block_tables,
                ctx.num_seqs,
                ctx.max_context_len,
                &params,
                out,
            );
        }
        be.qk_norm_rope_store(
            qkv,
            ctx.num_tokens,
            &params,
            q_norm.weight(),
            k_norm.weight(),
            q_norm.eps(),
            ctx.positions,
            rope.cos_sin(),
            ctx.slot_mapping,
            k_cache,
            v_cache,
        )?;
        self.attend(be, qkv, ctx, &params, k_cache, v_cache, out)
    }

    /// Decode computes one token per sequence.
    fn check_decode_rows<B: Backend>(&self, ctx: &Context<'_, B>) -> Result<()> {
        if ctx.num_tokens != ctx.num_seqs {
            return Err(Error::Other(format!(
                "decode attention: {} rows for {} sequences (decode computes one token per \
                 sequence)",
                ctx.num_tokens, ctx.num_seqs
            )));
        }
        Ok(())
    }

    /// Prefill or decode attention of the step's rows of `qkv` over the cache just written.
    #[allow(clippy::too_many_arguments)]
    fn attend<B: Backend>(
        &self,
        be: &B,
        qkv: &B::Buf<bf16>,
        ctx: &Context<'_, B>,
        params: &AttnParams,
        k_cache: &B::Buf<bf16>,
        v_cache: &B::Buf<bf16>,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
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
                params,
                out,
            )
        } else {
            self.check_decode_rows(ctx)?;
            be.decode_attention(
                qkv,
                k_cache,
                v_cache,
                ctx.context_lens,
                ctx.block_tables,
                ctx.num_seqs,
                ctx.max_context_len,
                params,
                out,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::host::HostWeights;
    use crate::testutil::rand_bf16;
    use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};

    /// Everything one call of either attention path reads and writes.
    struct Step {
        qkv: CpuBuf<bf16>,
        k_cache: CpuBuf<bf16>,
        v_cache: CpuBuf<bf16>,
        out: CpuBuf<bf16>,
    }

    /// The fused path (one op for norm, rope and store) gives, bit for bit, the queries, cache
    /// and output of RoPE with the q/k norms followed by `forward`, on a prefill of 6 tokens
    /// through a block table [1, 0] with one row skipped (slot -1, its cache slot keeps the
    /// older key and value).
    #[test]
    fn fused_path_matches_rope_then_forward() {
        let be = CpuBackend::new();
        let (nh, nkv, d, bs, n) = (4, 2, 16, 4, 6);
        let attn = Attention::new(nh, nkv, d);
        let rope = RotaryEmbedding::new(&be, d, 64, 10_000.0).unwrap();
        // Distinct q and k weights, so that swapping them shows.
        let mut w = HostWeights::default();
        w.insert("q", &[d], rand_bf16(d, 1));
        w.insert("k", &[d], rand_bf16(d, 2));
        let mut q_norm = RMSNorm::new(&be, d, 1e-6).unwrap();
        let mut k_norm = RMSNorm::new(&be, d, 1e-6).unwrap();
        q_norm.load(&be, &w, "q").unwrap();
        k_norm.load(&be, &w, "k").unwrap();

        let positions = CpuBuf::from_vec(vec![3, 4, 5, 6, 7, 8]);
        // Token t goes to block bt[t / 4], offset t % 4; row 2 is skipped.
        let slot_mapping = CpuBuf::from_vec(vec![4, 5, -1, 7, 0, 1]);
        let cu = CpuBuf::from_vec(vec![0, n as i32]);
        let block_tables = CpuBuf::from_vec(vec![1, 0]);
        let unused = CpuBuf::from_vec(vec![0; 2]);
        let ctx = Context {
            is_prefill: true,
            num_tokens: n,
            num_seqs: 1,
            positions: &positions,
            slot_mapping: &slot_mapping,
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
            max_seqlen_q: n,
            max_seqlen_k: n,
            context_lens: &unused,
            max_context_len: 0,
            block_tables: &block_tables,
            max_blocks_per_seq: 2,
            logits_indices: &unused,
            num_logits: 0,
        };
        let cache_len = 2 * bs * nkv * d;
        let fresh = || Step {
            qkv: CpuBuf::from_vec(rand_bf16(n * (nh + 2 * nkv) * d, 3)),
            k_cache: CpuBuf::from_vec(rand_bf16(cache_len, 4)),
            v_cache: CpuBuf::from_vec(rand_bf16(cache_len, 5)),
            out: CpuBuf::from_vec(vec![bf16::NAN; n * nh * d]),
        };

        let mut two = fresh();
        let params = attn.params(bs, 2);
        rope.forward_with_qk_norm(&be, &mut two.qkv, n, &params, &q_norm, &k_norm, &positions)
            .unwrap();
        attn.forward(
            &be,
            &two.qkv,
            &ctx,
            &mut two.k_cache,
            &mut two.v_cache,
            bs,
            &mut two.out,
        )
        .unwrap();

        let mut one = fresh();
        attn.forward_with_qk_norm_rope(
            &be,
            &mut one.qkv,
            &ctx,
            &rope,
            &q_norm,
            &k_norm,
            &mut one.k_cache,
            &mut one.v_cache,
            bs,
            &mut one.out,
        )
        .unwrap();

        let bits = |b: &CpuBuf<bf16>| b.as_slice().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let same = |a: &CpuBuf<bf16>, b: &CpuBuf<bf16>, what: &str| {
            let first = bits(a).iter().zip(bits(b)).position(|(x, y)| *x != y);
            assert_eq!(first, None, "{what}: first difference at this index");
        };
        same(&one.qkv, &two.qkv, "qkv");
        same(&one.k_cache, &two.k_cache, "k_cache");
        same(&one.v_cache, &two.v_cache, "v_cache");
        same(&one.out, &two.out, "out");
        // The step did something: rows were rotated and slots written, the skipped slot not.
        let before = fresh();
        assert_ne!(bits(&one.qkv), bits(&before.qkv));
        let slot = nkv * d;
        assert_ne!(
            bits(&one.k_cache)[4 * slot..5 * slot],
            bits(&before.k_cache)[4 * slot..5 * slot]
        );
        assert_eq!(
            bits(&one.v_cache)[6 * slot..7 * slot],
            bits(&before.v_cache)[6 * slot..7 * slot]
        );
        assert!(one.out.as_slice().iter().all(|x| x.is_finite()));

        // A rotary table of another head size is refused before anything runs.
        let other = RotaryEmbedding::new(&be, 2 * d, 64, 10_000.0).unwrap();
        let mut bad = fresh();
        let err = attn
            .forward_with_qk_norm_rope(
                &be,
                &mut bad.qkv,
                &ctx,
                &other,
                &q_norm,
                &k_norm,
                &mut bad.k_cache,
                &mut bad.v_cache,
                bs,
                &mut bad.out,
            )
            .unwrap_err();
        assert!(err.to_string().contains("head_dim mismatch"), "{err}");
        assert_eq!(bits(&bad.qkv), bits(&before.qkv));
    }
}
