//! The step's attention metadata (nano-vLLM's `Context`): built by the model runner from the
//! scheduled batch, read by every attention layer and by the LM head during one forward pass.
//!
//! All buffers live on the device and are the runner's fixed step buffers (sized once), so a
//! decode step captured in a graph replays with whatever the runner last copied into them.

use nanovllm_kernels::Backend;

/// Metadata of one forward pass.
///
/// Prefill: `num_tokens` rows of `num_seqs` sequences packed back to back; sequence `s` owns
/// query rows `cu_seqlens_q[s]..cu_seqlens_q[s+1]` and attends its first
/// `cu_seqlens_k[s+1] - cu_seqlens_k[s]` cached tokens (more than its queries when a prefix is
/// cached or the prompt is prefilled in chunks). Decode: one row per sequence
/// (`num_tokens == num_seqs`), attending `context_lens[s]` cached tokens.
pub struct Context<'a, B: Backend> {
    /// Prefill (varlen, causal) or decode (one query per sequence).
    pub is_prefill: bool,
    /// Rows of the batch (tokens this step computes).
    pub num_tokens: usize,
    /// Sequences in the batch.
    pub num_seqs: usize,
    /// `[num_tokens]` position of each row in its sequence (the RoPE angle).
    pub positions: &'a B::Buf<i32>,
    /// `[num_tokens]` KV-cache slot each row's k/v are written to; -1 skips the row.
    pub slot_mapping: &'a B::Buf<i32>,
    /// `[num_seqs + 1]` prefix sums of the query lengths (prefill only).
    pub cu_seqlens_q: &'a B::Buf<i32>,
    /// `[num_seqs + 1]` prefix sums of the key lengths (prefill only).
    pub cu_seqlens_k: &'a B::Buf<i32>,
    /// Longest query length of the batch (prefill only).
    pub max_seqlen_q: usize,
    /// Longest key length of the batch (prefill only).
    pub max_seqlen_k: usize,
    /// `[num_seqs]` tokens in each sequence's cache, the new one included (decode only).
    pub context_lens: &'a B::Buf<i32>,
    /// Bound on every `context_lens[s]` (decode only).
    pub max_context_len: usize,
    /// `[num_seqs, max_blocks_per_seq]` KV-cache block ids of each sequence, -1 where unused.
    pub block_tables: &'a B::Buf<i32>,
    /// Columns of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// `[num_logits]` rows whose logits are wanted: the last token of each sequence during
    /// prefill, every row during decode.
    pub logits_indices: &'a B::Buf<i32>,
    /// Number of entries of `logits_indices` in use.
    pub num_logits: usize,
}
