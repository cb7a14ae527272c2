//! The [`Backend`] trait: buffers, copies and the ops of the forward pass.
//!
//! Conventions shared by every op:
//! * Tensors are row-major and dense. Activations and weights are bf16; accumulation is f32.
//! * An op gets whole buffers plus the dimensions it works on; a buffer may be larger than
//!   needed (activation buffers are sized once for `max_num_batched_tokens`), and only its
//!   prefix is read or written. A buffer shorter than the dimensions need is an
//!   [`Error::Shape`](nanovllm_utils::Error::Shape), never a panic or an out-of-bounds access.
//! * `qkv` is the fused output of the QKV projection: one row per token of
//!   `(num_heads + 2 * num_kv_heads) * head_dim` values, q heads first, then k heads, then v.
//! * The KV cache of one layer is two buffers (K and V), each
//!   `[num_blocks, block_size, num_kv_heads, head_dim]`. Slot `s` is row `s` of the flattened
//!   `[num_blocks * block_size, num_kv_heads * head_dim]` view (block `s / block_size`, offset
//!   `s % block_size`). `block_tables` is `[num_seqs, max_blocks_per_seq]` of i32 block ids
//!   (unused entries -1).
//! * Ops are asynchronous on the CUDA backend: they are queued on the backend's stream, and
//!   only [`Backend::dtoh`] and [`Backend::synchronize`] wait.

use half::bf16;
use nanovllm_utils::Result;

/// Element types a buffer can hold.
pub trait Elem: bytemuck::Pod + Default + Send + Sync + std::fmt::Debug + 'static {}
impl Elem for bf16 {}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for u32 {}
impl Elem for u64 {}
impl Elem for u8 {}

/// Metadata of one attention call, shared by the prefill and decode ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Query heads on this rank.
    pub num_heads: usize,
    /// Key/value heads on this rank (`num_heads % num_kv_heads == 0`).
    pub num_kv_heads: usize,
    /// Dimension of one head (128 for Qwen3; 64 supported).
    pub head_dim: usize,
    /// Tokens per KV-cache block (a power of two, at most 256).
    pub block_size: usize,
    /// Columns of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Softmax scale, `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl AttnParams {
    /// Width of one row of the fused `qkv` buffer.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
}

/// Per-row sampling inputs, in device buffers so that a CUDA graph can replay them.
pub struct SamplingBufs<'a, B: Backend> {
    /// `[rows]` temperature; 0 means greedy (argmax, lowest index on ties).
    pub temperatures: &'a B::Buf<f32>,
    /// `[rows]` top-k; 0 (or >= vocab) means no top-k cut.
    pub top_k: &'a B::Buf<i32>,
    /// `[rows]` top-p in (0, 1]; 1 means no top-p cut.
    pub top_p: &'a B::Buf<f32>,
    /// `[rows]` the request's seed.
    pub seeds: &'a B::Buf<u64>,
    /// `[rows]` the draw's step (how many tokens the request has generated so far): with the
    /// seed it keys the random stream, so a fixed seed draws the same tokens on every run and at
    /// every batch position.
    pub steps: &'a B::Buf<u32>,
}

/// Qwen3's per-head q/k RMSNorm weights and rotary table for one step: the inputs
/// [`Backend::qk_norm_rope`] takes besides `qkv`, bundled for [`Backend::decode_attention_rope`].
pub struct QkNormRope<'a, B: Backend> {
    /// `[head_dim]` weight of the q heads' RMSNorm.
    pub q_norm: &'a B::Buf<bf16>,
    /// `[head_dim]` weight of the k heads' RMSNorm.
    pub k_norm: &'a B::Buf<bf16>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Position of each row (its row of `cos_sin`).
    pub positions: &'a B::Buf<i32>,
    /// `[max_position, head_dim]` rotary table: each row `[cos(head_dim / 2), sin(head_dim / 2)]`.
    pub cos_sin: &'a B::Buf<f32>,
}

/// [`Backend::decode_attention_rope`] as its two ops, `qk_norm_rope_store` then
/// `decode_attention`: the trait's default, and what a backend that fuses them falls back to.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_rope_unfused<B: Backend>(
    be: &B,
    qkv: &mut B::Buf<bf16>,
    rope: &QkNormRope<'_, B>,
    slot_mapping: &B::Buf<i32>,
    (k_cache, v_cache): (&mut B::Buf<bf16>, &mut B::Buf<bf16>),
    (context_lens, block_tables): (&B::Buf<i32>, &B::Buf<i32>),
    num_seqs: usize,
    max_context_len: usize,
    attn: &AttnParams,
    out: &mut B::Buf<bf16>,
) -> Result<()> {
    be.qk_norm_rope_store(
        qkv,
        num_seqs,
        attn,
        rope.q_norm,
        rope.k_norm,
        rope.eps,
        rope.positions,
        rope.cos_sin,
        slot_mapping,
        k_cache,
        v_cache,
    )?;
    be.decode_attention(
        qkv,
        k_cache,
        v_cache,
        context_lens,
        block_tables,
        num_seqs,
        max_context_len,
        attn,
        out,
    )
}

/// A device (CPU or GPU) and the ops the engine runs on it.
///
/// Layers and models are generic over this trait; the CPU implementation is the reference
/// for the CUDA one.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A buffer of `T` in this backend's memory.
    type Buf<T: Elem>: Send + Sync;

    /// Short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;

    // ---- memory ----

    /// A buffer of `len` elements. Its contents are unspecified (not necessarily zero).
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    /// A buffer of `len` zeros.
    fn zeros<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    /// Number of elements of `buf`.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// A new buffer holding `src`.
    #[allow(clippy::wrong_self_convention)] // `self` is the device the buffer is made on.
    fn from_host<T: Elem>(&self, src: &[T]) -> Result<Self::Buf<T>>;
    /// Copies `src` into the first `src.len()` elements of `dst`.
    fn htod<T: Elem>(&self, src: &[T], dst: &mut Self::Buf<T>) -> Result<()>;
    /// Copies the first `dst.len()` elements of `src` into `dst`, waiting for queued work.
    fn dtoh<T: Elem>(&self, src: &Self::Buf<T>, dst: &mut [T]) -> Result<()>;
    /// Waits until every queued op has finished.
    fn synchronize(&self) -> Result<()>;
    /// `(free, total)` bytes of device memory (host memory for the CPU backend).
    fn memory_info(&self) -> Result<(usize, usize)>;

    // ---- ops of the forward pass ----

    /// `out[i, :] = weight[ids[i] - vocab_start, :]` for `i < n`, or zeros when `ids[i]` is
    /// outside `[vocab_start, vocab_start + vocab_rows)` (the vocab-parallel mask).
    /// `weight` is `[vocab_rows, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding(
        &self,
        ids: &Self::Buf<u32>,
        n: usize,
        weight: &Self::Buf<bf16>,
        vocab_start: usize,
        vocab_rows: usize,
        hidden: usize,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// RMSNorm of `n` rows of width `hidden`:
    /// `out = bf16(x / sqrt(mean(x^2) + eps)) * weight`, statistics in f32.
    fn rms_norm(
        &self,
        x: &Self::Buf<bf16>,
        weight: &Self::Buf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// Residual add fused with RMSNorm, in place:
    /// `residual = bf16(x + residual)`, then `x = rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        x: &mut Self::Buf<bf16>,
        residual: &mut Self::Buf<bf16>,
        weight: &Self::Buf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()>;

    /// Qwen3's per-head q/k RMSNorm followed by rotary embedding (neox layout: the two halves
    /// of each head are rotated against each other), in place on the q and k heads of `n`
    /// rows of `qkv` (v untouched). `q_norm` and `k_norm` are `[head_dim]`;
    /// `positions` is `[n]`; `cos_sin` is `[max_position, head_dim]` f32, each row
    /// `cos(p * f_0..f_{d/2})` then `sin(p * f_0..f_{d/2})`.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope(
        &self,
        qkv: &mut Self::Buf<bf16>,
        n: usize,
        attn: &AttnParams,
        q_norm: &Self::Buf<bf16>,
        k_norm: &Self::Buf<bf16>,
        eps: f32,
        positions: &Self::Buf<i32>,
        cos_sin: &Self::Buf<f32>,
    ) -> Result<()>;

    /// Writes the k and v heads of `n` rows of `qkv` to their slots of the KV cache;
    /// `slot_mapping[i] == -1` skips row `i`.
    #[allow(clippy::too_many_arguments)]
    fn store_kvcache(
        &self,
        qkv: &Self::Buf<bf16>,
        n: usize,
        attn: &AttnParams,
        slot_mapping: &Self::Buf<i32>,
        k_cache: &mut Self::Buf<bf16>,
        v_cache: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// [`Backend::qk_norm_rope`] then [`Backend::store_kvcache`] on the same `n` rows of `qkv`,
    /// as one op: the q and k heads are normed and rotated in place, and each row's k heads
    /// (normed and rotated) and v heads are written to slot `slot_mapping[i]` of the KV cache
    /// (`-1`: row `i` is still normed and rotated, nothing is stored). Every layer runs this
    /// right after its QKV projection.
    ///
    /// The results are those of the two ops in sequence, bit for bit; this default runs them
    /// one after the other, and a backend may override it with one pass that reads `qkv` once
    /// (the CUDA backend does, one launch instead of two). On an error the default may
    /// already have rotated `qkv` (for example when a slot lies outside the cache).
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_store(
        &self,
        qkv: &mut Self::Buf<bf16>,
        n: usize,
        attn: &AttnParams,
        q_norm: &Self::Buf<bf16>,
        k_norm: &Self::Buf<bf16>,
        eps: f32,
        positions: &Self::Buf<i32>,
        cos_sin: &Self::Buf<f32>,
        slot_mapping: &Self::Buf<i32>,
        k_cache: &mut Self::Buf<bf16>,
        v_cache: &mut Self::Buf<bf16>,
    ) -> Result<()> {
        self.qk_norm_rope(qkv, n, attn, q_norm, k_norm, eps, positions, cos_sin)?;
        self.store_kvcache(qkv, n, attn, slot_mapping, k_cache, v_cache)
    }

    /// [`Backend::qk_norm_rope_store`] on the `num_seqs` rows of `qkv` followed by
    /// [`Backend::decode_attention`], as one op: a decode step's attention block after its QKV
    /// projection. The results (`out` and the cache) are those of the two ops in sequence, bit
    /// for bit; the contents of `qkv` afterwards are unspecified (this default leaves the q/k
    /// heads normed and rotated, a fused kernel may leave them as they were).
    ///
    /// The CUDA backend can run it as one kernel per layer (opt-in, `NANOVLLM_ATTN_ROPE=1`):
    /// every decode CTA norms and rotates its own query heads, and the CTA that reads a
    /// sequence's last cache row stores that row first.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention_rope(
        &self,
        qkv: &mut Self::Buf<bf16>,
        rope: &QkNormRope<'_, Self>,
        slot_mapping: &Self::Buf<i32>,
        k_cache: &mut Self::Buf<bf16>,
        v_cache: &mut Self::Buf<bf16>,
        context_lens: &Self::Buf<i32>,
        block_tables: &Self::Buf<i32>,
        num_seqs: usize,
        max_context_len: usize,
        attn: &AttnParams,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()> {
        decode_attention_rope_unfused(
            self,
            qkv,
            rope,
            slot_mapping,
            (k_cache, v_cache),
            (context_lens, block_tables),
            num_seqs,
            max_context_len,
            attn,
            out,
        )
    }

    /// `out = silu(gate) * up` for `n` rows; each row of `gate_up` is `[gate(inter), up(inter)]`,
    /// each row of `out` is `[inter]`.
    fn silu_and_mul(
        &self,
        gate_up: &Self::Buf<bf16>,
        n: usize,
        inter: usize,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// `out[m, n] = x[m, k] . w[n, k]^T` (the layout of a PyTorch Linear weight), bf16 in and
    /// out, f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: &Self::Buf<bf16>,
        w: &Self::Buf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// The MLP's activation and down projection: `out[m, n] = act[m, inter] . w[n, inter]^T`
    /// with `act = silu(gate) * up` of `gate_up` (`[m, 2 * inter]`), i.e.
    /// [`silu_and_mul`](Self::silu_and_mul) into `act` followed by [`gemm`](Self::gemm), which
    /// is what this default does. A backend may instead fuse the activation into the product
    /// (the CUDA backend does for a few rows) and leave `act` unwritten; `out` is the same
    /// either way up to the rounding of the sum's order.
    #[allow(clippy::too_many_arguments)]
    fn silu_and_mul_gemm(
        &self,
        gate_up: &Self::Buf<bf16>,
        w: &Self::Buf<bf16>,
        m: usize,
        n: usize,
        inter: usize,
        act: &mut Self::Buf<bf16>,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()> {
        self.silu_and_mul(gate_up, m, inter, act)?;
        self.gemm(act, w, m, n, inter, out)
    }

    /// Varlen causal attention for prefill, keys and values read from the paged cache (so
    /// that cached prefixes and chunked prefill work): for sequence `s`, its queries are rows
    /// `cu_seqlens_q[s]..cu_seqlens_q[s+1]` of `qkv` and its keys the first
    /// `len_k = cu_seqlens_k[s+1] - cu_seqlens_k[s]` tokens found through `block_tables[s]`;
    /// query `i` (of `len_q`) attends keys `0..=len_k - len_q + i`.
    /// `out` is `[cu_seqlens_q[num_seqs], num_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn prefill_attention(
        &self,
        qkv: &Self::Buf<bf16>,
        k_cache: &Self::Buf<bf16>,
        v_cache: &Self::Buf<bf16>,
        cu_seqlens_q: &Self::Buf<i32>,
        cu_seqlens_k: &Self::Buf<i32>,
        block_tables: &Self::Buf<i32>,
        num_seqs: usize,
        max_seqlen_q: usize,
        max_seqlen_k: usize,
        attn: &AttnParams,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// Paged attention for decode: one query per sequence (row `s` of `qkv`) against the
    /// first `context_lens[s]` tokens of its cache (its own, just stored, included).
    /// `max_context_len` bounds every `context_lens[s]` (the CUDA backend sizes its split-K
    /// work from it; `max_model_len` is always valid, so graphs may capture it).
    /// `out` is `[num_seqs, num_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention(
        &self,
        qkv: &Self::Buf<bf16>,
        k_cache: &Self::Buf<bf16>,
        v_cache: &Self::Buf<bf16>,
        context_lens: &Self::Buf<i32>,
        block_tables: &Self::Buf<i32>,
        num_seqs: usize,
        max_context_len: usize,
        attn: &AttnParams,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// `out[i, :] = x[indices[i], :]` for `i < n` (rows of width `width`); the LM head's
    /// last-token gather during prefill.
    fn gather_rows(
        &self,
        x: &Self::Buf<bf16>,
        indices: &Self::Buf<i32>,
        n: usize,
        width: usize,
        out: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// Records the ops `f` queues into a replayable graph (a CUDA graph). Backends without
    /// graphs return `Ok(None)` and the caller runs eagerly. Every buffer the ops touch must
    /// exist before capture; replays read whatever those buffers hold at replay time.
    fn capture_graph(
        &self,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Box<dyn GraphExec>>> {
        let _ = f;
        Ok(None)
    }

    /// Draws one token per row of `logits` (`[rows, vocab]`) into `out`.
    ///
    /// Row `r` with temperature 0 takes the argmax (lowest index on ties). Otherwise the
    /// candidates are the `top_k` most likely tokens (all when 0), cut further to the smallest
    /// most-likely set whose probability (softmax of `logits / temperature` over the
    /// candidates) reaches `top_p`; the token is then the Gumbel-max
    /// `argmax_i (logits_i / T - ln(-ln(u_i)))` over the candidates (lowest index on ties),
    /// where `u_i = philox_uniform(seeds[r], steps[r], i)` (see
    /// [`crate::backend::philox_uniform`]: one Philox call serves four consecutive tokens).
    ///
    /// The key is defined in f32 as `fl(fl(l_i / T) - fl(ln(fl(-ln(u_i)))))`, IEEE division and
    /// the platform's `ln`. Backends only evaluate it for tokens that could still win: a draw
    /// `u_i` so small (or a logit so low) that the key must trail the best one found is
    /// skipped by a bound with a margin far above rounding, so skipping never changes the
    /// token. Backends agree token for token except where two keys lie within a few ulps of
    /// each other and the `ln` of two platforms (CUDA's `logf`, the C library's) round
    /// differently, or where top-p's softmax sums, computed in another order (on CUDA partly
    /// with fast exponentials), fall on the other side of `top_p`: rare near-ties, not a
    /// difference in distribution.
    fn sample(
        &self,
        logits: &Self::Buf<bf16>,
        rows: usize,
        vocab: usize,
        params: &SamplingBufs<'_, Self>,
        out: &mut Self::Buf<u32>,
    ) -> Result<()>;

    /// One rank's part of [`Backend::sample`] over rows split by columns (tensor parallelism:
    /// each rank holds a vocabulary slice of the logits). `logits` is `[rows, width]`, columns
    /// `col0 .. col0 + width` of the whole rows (`col0` and `width` multiples of 8). For each
    /// row `r` it writes the slice's best candidate into `parts[slot * 2 * rows ..]`: at `r`
    /// its score's f32 bits (the logit when greedy, the Gumbel key otherwise), at `rows + r`
    /// its column in the whole row. Scores and draws are those of the whole row's columns, so
    /// [`Backend::sample_combine`] over every rank's part gives the token `sample` draws from
    /// the whole rows, bit for bit. Top-k and top-p are ignored: rows with a cut need the
    /// whole row, and the caller samples them with `sample` instead.
    #[allow(clippy::too_many_arguments)]
    fn sample_shard(
        &self,
        logits: &Self::Buf<bf16>,
        rows: usize,
        width: usize,
        col0: usize,
        params: &SamplingBufs<'_, Self>,
        parts: &mut Self::Buf<u32>,
        slot: usize,
    ) -> Result<()>;

    /// The token of each of `rows` rows from the `ranks` parts of [`Backend::sample_shard`]
    /// laid out one after another in `parts` (rank `q`'s at `parts[q * 2 * rows ..]`): the best
    /// score, the lowest column on ties.
    fn sample_combine(
        &self,
        parts: &Self::Buf<u32>,
        rows: usize,
        ranks: usize,
        out: &mut Self::Buf<u32>,
    ) -> Result<()>;
}

/// A captured graph of ops, replayed on the backend's stream.
pub trait GraphExec: Send {
    /// Queues one replay of the graph.
    fn replay(&self) -> Result<()>;
}

/// Philox4x32-10 round constants.
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32-10 of counter `ctr` under key `key`: the counter-based RNG behind sampling.
/// The CUDA kernels implement the same function; this is its definition.
pub fn philox4x32(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let p0 = (PHILOX_M0 as u64) * (ctr[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (ctr[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
        key[0] = key[0].wrapping_add(PHILOX_W0);
        key[1] = key[1].wrapping_add(PHILOX_W1);
    }
    ctr
}

/// The uniform draw in (0, 1) for token `index` at `step` of a request seeded with `seed`:
/// Philox4x32-10 keyed by the seed (`[seed as u32, (seed >> 32) as u32]`), counter
/// `(index / 4, step, 0, 0)`, word `x = out[index % 4]`, as `((x >> 9) + 0.5) / 2^23` in f32.
/// One Philox call thus serves the four consecutive tokens `4c..4c + 4`, which is how the
/// samplers evaluate it (see [`philox_uniform4`]). Every step of the conversion is exact, so
/// the result lies in `[2^-24, 1 - 2^-24]`: never 0, never 1. (With 24 bits,
/// `(2^24 - 1) + 0.5` would round to `2^24` and give exactly 1, whose Gumbel noise
/// `-ln(-ln(u))` is infinite.)
pub fn philox_uniform(seed: u64, step: u32, index: u32) -> f32 {
    philox_uniform4(seed, step, index / 4)[(index % 4) as usize]
}

/// The draws of tokens `4 * group .. 4 * group + 4` (see [`philox_uniform`]): one
/// Philox4x32-10 call, its four words in order.
pub fn philox_uniform4(seed: u64, step: u32, group: u32) -> [f32; 4] {
    philox4x32([group, step, 0, 0], [seed as u32, (seed >> 32) as u32]).map(uniform_from_bits)
}

/// `((x >> 9) + 0.5) / 2^23` in f32: the top 23 bits of `x` as the centre of one of 2^23
/// equal cells of (0, 1).
pub(crate) fn uniform_from_bits(x: u32) -> f32 {
    (((x >> 9) as f32) + 0.5) * (1.0 / 8_388_608.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer test from the Random123 distribution (philox4x32_10, kat_vectors).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }

    /// Four consecutive tokens share one Philox call, word `index % 4` each (a regression
    /// check of the definition against the known answer above: seed 0, step 0, tokens 0..4).
    #[test]
    fn uniform_uses_every_word_of_a_call() {
        let words = [0x6627_e8d5u32, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8];
        for (i, &w) in words.iter().enumerate() {
            assert_eq!(philox_uniform(0, 0, i as u32), uniform_from_bits(w));
        }
        let r = philox4x32([1, 9, 0, 0], [5, 0]);
        for i in 4..8 {
            assert_eq!(
                philox_uniform(5, 9, i),
                uniform_from_bits(r[i as usize - 4])
            );
        }
        assert_eq!(
            philox_uniform4(5, 9, 1),
            std::array::from_fn(|l| philox_uniform(5, 9, 4 + l as u32))
        );
        // Distinct words: the draws of a group are not copies of one another.
        assert_ne!(philox_uniform(5, 9, 4), philox_uniform(5, 9, 5));
    }

    #[test]
    fn uniform_is_open_interval() {
        for i in 0..10_000 {
            let u = philox_uniform(42, 7, i);
            assert!(u > 0.0 && u < 1.0);
        }
        // The extreme words, which 10,000 draws are unlikely to hit.
        assert!(uniform_from_bits(0) > 0.0);
        assert!(uniform_from_bits(u32::MAX) < 1.0);
    }
}
