// Attention kernels of the CUDA backend: paged decode (flash-decoding) and varlen causal prefill
// (FlashAttention-2 style), both reading K/V from the paged cache through block tables.
//
// Launched from src/cuda/attention.rs; the CPU reference is CpuBackend::{prefill,decode}_attention.
// Layouts (see src/backend.rs): qkv rows of (num_heads + 2 * num_kv_heads) * head_dim bf16, q heads
// first; K and V caches [num_blocks, block_size, num_kv_heads, head_dim] bf16; block_tables
// [num_seqs, max_blocks_per_seq] i32. Softmax runs in base 2: scores are multiplied by
// scale * log2(e) and exponentiated with exp2f, all in f32.

#include <cuda_bf16.h>
#include <stdint.h>

#include "qk_rope.cuh"

#define NEG_INF (-__int_as_float(0x7f800000))

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

// 16-byte streaming load: K/V are read once per kernel, so keep them out of L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// A split's token count is a multiple of DEC_SPLIT_GRANULE and, unless the launch's own size is
// smaller, at least DEC_MIN_SPLIT_TOKENS (SPLIT_GRANULE and MIN_SPLIT_TOKENS in
// src/cuda/attention.rs).
#define DEC_SPLIT_GRANULE 128
#define DEC_MIN_SPLIT_TOKENS 256

// Tokens of each split of a sequence of `ctx` tokens in a launch of `num_splits` splits of at
// most `tokens_per_split` tokens (the size the host derived from the longest context the launch
// may see, which a CUDA graph fixes at the model's length): the sequence's own context spread
// over the splits, so that a context shorter than that longest one still keeps several splits
// busy instead of filling the first. A function of the sequence alone, so every CTA of a
// (sequence, kv head) and the reduce agree on it.
__device__ __forceinline__ int seq_split_tokens(int ctx, int tokens_per_split, int num_splits) {
    if (num_splits <= 1) return tokens_per_split;
    int t = (max(ctx, 1) + num_splits - 1) / num_splits;
    t = (t + DEC_SPLIT_GRANULE - 1) / DEC_SPLIT_GRANULE * DEC_SPLIT_GRANULE;
    return min(max(t, DEC_MIN_SPLIT_TOKENS), tokens_per_split);
}

// Number of splits of a sequence of `ctx` tokens that hold some of them (`tps`: its
// seq_split_tokens).
__device__ __forceinline__ int splits_with_tokens(int ctx, int tps, int num_splits) {
    return ctx <= 0 ? 0 : min(num_splits, (ctx + tps - 1) / tps);
}

// Output element d of one (sequence, head) from its nv split partials (normalised output, and
// max and sum of the scores in log2 units) starting at entry `base`. Shared by
// attn_decode_reduce and the in-kernel reduce of the last split (same order, same bits). The
// partials are read through L2 (__ldcg): other CTAs of the same kernel may have written them.
__device__ __forceinline__ float combine_splits(const float* part_ml, const float* part_o, size_t base,
                                                int nv, int head_dim, int d) {
    float mx = NEG_INF;
    for (int i = 0; i < nv; ++i) mx = fmaxf(mx, __ldcg(part_ml + 2 * (base + i)));
    const float mu = (mx == NEG_INF) ? 0.f : mx;
    float sum = 0.f, o = 0.f;
    for (int i = 0; i < nv; ++i) {
        const float w = __ldcg(part_ml + 2 * (base + i) + 1) * exp2f(__ldcg(part_ml + 2 * (base + i)) - mu);
        sum += w;
        o += w * __ldcg(part_o + (base + i) * head_dim + d);
    }
    return sum > 0.f ? o / sum : 0.f;
}

// With `counters` (one u32 per (sequence, kv head), zero between launches): every split CTA of
// a (sequence, kv head) arrives here once it has written its partials (or found no tokens); the
// last to arrive combines the splits for the G heads of the group, as attn_decode_reduce
// would, and resets the counter. Saves the reduce kernel's launch and its gap in the graph.
// `tps`: the sequence's split size (seq_split_tokens).
template <int HD, int G>
__device__ __forceinline__ void last_split_reduces(
    unsigned int* counters, const float* part_ml, const float* part_o, int ctx,
    int tps, int num_splits, int num_kv_heads, int kvh, int seq,
    __nv_bfloat16* __restrict__ out)
{
    __shared__ bool s_last;
    // Every thread's partial writes are visible device-wide before the arrival is counted.
    __threadfence();
    __syncthreads();
    unsigned int* c = counters + (size_t)seq * num_kv_heads + kvh;
    if (threadIdx.x == 0) s_last = atomicAdd(c, 1u) == (unsigned)(num_splits - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // the other splits' partials, counted before our arrival, are read after it
    const int num_heads = num_kv_heads * G;
    const int nv = splits_with_tokens(ctx, tps, num_splits);
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        const int h = kvh * G + i / HD, d = i % HD;
        const size_t base = ((size_t)seq * num_heads + h) * num_splits;
        out[((size_t)seq * num_heads + h) * HD + d] =
            __float2bfloat16(combine_splits(part_ml, part_o, base, nv, HD, d));
    }
    if (threadIdx.x == 0) *c = 0u;
}

// ---------------------------------------------------------------------------------------------
// Decode: one query token per sequence against its paged context.
//
// Grid (num_kv_heads, num_seqs, num_splits), 128 threads. A CTA owns one (sequence, kv head,
// split) and every query head of that kv head's GQA group, so each K/V row is read from memory
// once for the whole group. A K/V row of one token and one kv head is head_dim * 2 bytes,
// contiguous: LPK = head_dim / 8 lanes each load 16 bytes of it, so one warp load instruction
// covers KPI = 32 / LPK tokens. A warp takes chunks of U load instructions (U * KPI tokens), all
// K and V loads of a chunk issued before the first use; the four warps take chunks in turn.
//
// Each group of LPK lanes keeps its own online-softmax state (m, l, acc) over the tokens it saw,
// so the hot loop needs no communication beyond the LPK-lane dot-product reduction; the states
// are merged once at the end (shuffles across lane groups, then shared memory across warps).
//
// With one split the CTA writes bf16 output. With several (flash-decoding, chosen on the host
// when num_seqs * num_kv_heads CTAs would not fill the GPU; each sequence's context spread
// evenly over them, seq_split_tokens) it writes its normalised partial
// output and (max, sum) to scratch, and the splits are combined either by attn_decode_reduce
// or, when the launcher passes `counters`, by the last split CTA of each (sequence, kv head)
// to finish (last_split_reduces: one kernel less per layer, the same bits). A split past a
// short sequence's context writes nothing (it still counts its arrival); the combine only
// reads splits that hold tokens.
// ---------------------------------------------------------------------------------------------

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)

// The online-softmax state one group of LPK lanes keeps over the tokens it has seen: running
// max and sum of the scores (log2 units) and the unnormalised output, for each head of the group.
template <int G>
struct DecState {
    float m[G], l[G], acc[G][8];
};

template <int G>
__device__ __forceinline__ void dec_init(DecState<G>& st) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        st.m[g] = NEG_INF;
        st.l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) st.acc[g][j] = 0.f;
    }
}

// q of every head of the group of kv head `kvh` (the 8 dims `sub` of each), pre-scaled so that
// scores come out in log2 units.
template <int HD, int G>
__device__ __forceinline__ void dec_load_q(const __nv_bfloat16* __restrict__ qkv, int qkv_stride,
                                           int seq, int kvh, int sub, float scale_log2,
                                           float (&q)[G][8]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const uint4 r = *reinterpret_cast<const uint4*>(
            qkv + (size_t)seq * qkv_stride + (size_t)(kvh * G + g) * HD + sub * 8);
        unpack8(r, q[g]);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[g][j] *= scale_log2;
    }
}

// What the attn_decode_rope kernels need besides the decode arguments: Qwen3's q/k norms, the
// rotary table, and where this step's K/V rows go (qk_norm_rope_store's arguments, rope.cu).
struct DecRope {
    const __nv_bfloat16* q_norm;
    const __nv_bfloat16* k_norm;
    float eps;
    const int* positions;
    const float* cos_sin;
    int max_position;
    const int* slot_mapping;
    long long num_slots;
    __nv_bfloat16* k_cache;  // the caches the decode reads, written here
    __nv_bfloat16* v_cache;
};

// This lane's cos/sin values of position `pos` (clamped into the table, as rope.cu).
template <int HD>
__device__ __forceinline__ void dec_cos_sin(const DecRope& rope, int pos, int sub, float (&cosv)[8],
                                            float (&sinv)[8]) {
    pos = min(max(pos, 0), rope.max_position - 1);
    load_cos_sin(rope.cos_sin + (size_t)pos * HD, sub, HD, cosv, sinv);
}

// dec_load_q for a qkv row whose q heads are not yet normed and rotated: each head normed and
// rotated as qk_norm_rope_store does (norm_rope8 over the LPK lanes of the group, rounded to
// bf16 as its store rounds), then pre-scaled: the same values dec_load_q reads after it.
template <int HD, int G>
__device__ __forceinline__ void dec_load_q_rope(const __nv_bfloat16* __restrict__ qkv, int qkv_stride,
                                                int seq, int kvh, int sub, float scale_log2,
                                                const DecRope& rope, const float (&cosv)[8],
                                                const float (&sinv)[8], float (&q)[G][8]) {
    const uint4 w = ld_weight(rope.q_norm + sub * 8);
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const uint4 r = *reinterpret_cast<const uint4*>(
            qkv + (size_t)seq * qkv_stride + (size_t)(kvh * G + g) * HD + sub * 8);
        unpack8(r, q[g]);
        norm_rope8(q[g], w, cosv, sinv, sub, HD / 8, HD, rope.eps);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[g][j] = round_bf16(q[g][j]) * scale_log2;
    }
}

// Sequence `seq`'s k head `kvh` normed and rotated (rounded to bf16 as qk_norm_rope_store
// stores it) and its v head as it is, written to `s_new` (shared memory: the k row's LPK
// 16-byte vectors, then the v row's) and, with `slot_ok`, to cache slot `slot`. Called by one
// whole warp (norm_rope8 shuffles); its first LPK lanes write.
template <int HD>
__device__ __forceinline__ void dec_new_kv_rope(const __nv_bfloat16* __restrict__ qkv, int qkv_stride,
                                                int seq, int kvh, int num_heads, int num_kv_heads,
                                                int sub, const DecRope& rope, const float (&cosv)[8],
                                                const float (&sinv)[8], bool slot_ok, int slot,
                                                uint4* s_new) {
    const __nv_bfloat16* row = qkv + (size_t)seq * qkv_stride;
    const uint4 w = ld_weight(rope.k_norm + sub * 8);
    const uint4 kraw = ld16(row + (size_t)(num_heads + kvh) * HD + sub * 8);
    const uint4 v = ld16(row + (size_t)(num_heads + num_kv_heads + kvh) * HD + sub * 8);
    float x[8];
    unpack8(kraw, x);
    norm_rope8(x, w, cosv, sinv, sub, HD / 8, HD, rope.eps);
    const uint4 k = pack8(x);
    if ((threadIdx.x & 31) < HD / 8) {
        s_new[sub] = k;
        s_new[HD / 8 + sub] = v;
        if (slot_ok) {
            const size_t dst = (size_t)slot * num_kv_heads * HD + (size_t)kvh * HD + sub * 8;
            st16(rope.k_cache + dst, k);
            st16(rope.v_cache + dst, v);
        }
    }
}

// Folds tokens [t0, t1) of one (sequence, kv head) into the lane group's state. `s_bt` holds
// the block ids of the blocks from b0 on that cover the range; `head_off` is the kv head's and
// lane's offset within a cache row. The warps take chunks of CK tokens in turn. NEW: token
// t_new (if in the range) takes its K/V row from `s_new` (dec_new_kv_rope's layout) instead of
// the cache (the attn_decode_rope kernels: this step's row, which the kernel itself writes).
template <int HD, int G, bool NEW = false>
__device__ __forceinline__ void dec_attend(
    const float (&q)[G][8], DecState<G>& st, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const int* s_bt, int b0, int t0, int t1,
    int log2_bs, size_t row_stride, size_t head_off, int t_new = -1,
    const uint4* s_new = nullptr)
{
    constexpr int LPK = HD / 8;           // lanes per K/V row
    constexpr int KPI = 32 / LPK;         // tokens per warp load instruction
    constexpr int U = (G <= 2) ? 8 : ((G <= 4) ? 4 : 2);  // load instructions per chunk
    constexpr int CK = U * KPI;           // tokens per warp chunk
    const int warp = threadIdx.x >> 5, grp = (threadIdx.x & 31) / LPK;
    const int bs_mask = (1 << log2_bs) - 1;

    for (int c0 = t0 + warp * CK; c0 < t1; c0 += DEC_WARPS * CK) {
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // Past the end, re-read the last token (masked below): no branch between loads.
            const int t = min(c0 + u * KPI + grp, t1 - 1);
            const int blk = s_bt[(t >> log2_bs) - b0];
            const size_t off =
                ((size_t)blk * (bs_mask + 1) + (t & bs_mask)) * row_stride + head_off;
            kr[u] = ld_stream16(k_cache + off);
            vr[u] = ld_stream16(v_cache + off);
        }
        if (NEW) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (c0 + u * KPI + grp == t_new) {
                    const int sub = (threadIdx.x & 31) % LPK;
                    kr[u] = s_new[sub];
                    vr[u] = s_new[LPK + sub];
                }
            }
        }

        float sc[G][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[8];
            unpack8(kr[u], kf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float d = 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j) d = fmaf(q[g][j], kf[j], d);
                sc[g][u] = d;
            }
        }
#pragma unroll
        for (int off = LPK / 2; off >= 1; off >>= 1) {
#pragma unroll
            for (int g = 0; g < G; ++g)
#pragma unroll
                for (int u = 0; u < U; ++u)
                    sc[g][u] += __shfl_xor_sync(0xffffffffu, sc[g][u], off);
        }

#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c0 + u * KPI + grp >= t1) {
#pragma unroll
                for (int g = 0; g < G; ++g) sc[g][u] = NEG_INF;
            }
        }

#pragma unroll
        for (int g = 0; g < G; ++g) {
            float mx = st.m[g];
#pragma unroll
            for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[g][u]);
            const float mu = (mx == NEG_INF) ? 0.f : mx;
            const float alpha = exp2f(st.m[g] - mu);
            st.m[g] = mx;
            st.l[g] *= alpha;
#pragma unroll
            for (int j = 0; j < 8; ++j) st.acc[g][j] *= alpha;
#pragma unroll
            for (int u = 0; u < U; ++u) sc[g][u] = exp2f(sc[g][u] - mu);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float vf[8];
            unpack8(vr[u], vf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                st.l[g] += sc[g][u];
#pragma unroll
                for (int j = 0; j < 8; ++j) st.acc[g][j] = fmaf(sc[g][u], vf[j], st.acc[g][j]);
            }
        }
    }
}

// Merges the lane groups' states (shuffles within each warp, then shared memory across the
// warps) and hands each of the group's G * HD outputs to `emit(g, d, r, mx, sum)`: the
// normalised output r of head g, element d, and the max and sum of the scores. Thread i emits
// elements i, i + DEC_THREADS, ... A kernel may call it again after a __syncthreads().
template <int HD, int G, class Emit>
__device__ __forceinline__ void dec_merge(DecState<G>& st, Emit emit) {
    constexpr int LPK = HD / 8;
    __shared__ float s_m[DEC_WARPS][G], s_l[DEC_WARPS][G];
    __shared__ float s_o[DEC_WARPS][G][HD];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int sub = lane % LPK, grp = lane / LPK;

#pragma unroll
    for (int off = 16; off >= LPK; off >>= 1) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float mo = __shfl_xor_sync(0xffffffffu, st.m[g], off);
            const float lo = __shfl_xor_sync(0xffffffffu, st.l[g], off);
            const float mx = fmaxf(st.m[g], mo);
            const float mu = (mx == NEG_INF) ? 0.f : mx;
            const float a = exp2f(st.m[g] - mu), b = exp2f(mo - mu);
            st.l[g] = st.l[g] * a + lo * b;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float ao = __shfl_xor_sync(0xffffffffu, st.acc[g][j], off);
                st.acc[g][j] = st.acc[g][j] * a + ao * b;
            }
            st.m[g] = mx;
        }
    }
    if (grp == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (sub == 0) {
                s_m[warp][g] = st.m[g];
                s_l[warp][g] = st.l[g];
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) s_o[warp][g][sub * 8 + j] = st.acc[g][j];
        }
    }
    __syncthreads();

    for (int i = tid; i < G * HD; i += DEC_THREADS) {
        const int g = i / HD, d = i % HD;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, s_m[w][g]);
        const float mu = (mx == NEG_INF) ? 0.f : mx;
        float sum = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float a = exp2f(s_m[w][g] - mu);
            sum += s_l[w][g] * a;
            o += s_o[w][g][d] * a;
        }
        emit(g, d, sum > 0.f ? o / sum : 0.f, mx, sum);
    }
}

// ROPE (the attn_decode_rope kernels): q is normed and rotated here (dec_load_q_rope); in the
// CTA whose split holds the sequence's last token (split 0 for an empty context) warp 0 computes
// this step's K/V row (dec_new_kv_rope) and stores it in the cache and in shared memory, and
// the last token is attended from shared memory rather than from the cache (which the kernel
// reads through the non-coherent path, undefined for data it writes itself). The results are
// those of qk_norm_rope_store followed by the plain kernel, bit for bit.
template <int HD, int G, bool ROPE>
__device__ __forceinline__ void decode_body(
    const __nv_bfloat16* __restrict__ qkv, int qkv_stride,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int* context_lens, const int* block_tables,
    int max_blocks_per_seq, int num_kv_heads, int num_blocks, int log2_bs, float scale_log2,
    int max_context_len, int tokens_per_split, int num_splits,
    __nv_bfloat16* __restrict__ out, float* part_ml, float* part_o, unsigned int* counters,
    const DecRope& rope)
{
    extern __shared__ int s_bt[];         // this split's slice of the block table

    const int kvh = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x;
    const int sub = (tid & 31) % (HD / 8);  // which 8 dims of a K/V row this lane loads
    const int num_heads = num_kv_heads * G;
    const int out_stride = num_heads * HD;

    // Lengths past max_context_len (which the host checked against the block table width) or
    // block ids outside the cache are contract violations: clamp them rather than read out of
    // bounds.
    const int ctx = min(context_lens[seq], max_context_len);
    const int pos = ROPE ? rope.positions[seq] : 0;  // requested together with the length
    const int slot = ROPE ? rope.slot_mapping[seq] : -1;
    // Whether this step's row goes to the cache (not for slot -1 or one beyond the cache): only
    // then is it attended from s_new; otherwise the cache's row, as the two ops would read it.
    const bool slot_ok = slot >= 0 && slot < rope.num_slots;
    const int tps = seq_split_tokens(ctx, tokens_per_split, num_splits);
    const int t0 = split * tps;
    const int t1 = min(ctx, t0 + tps);
    const bool stores = ROPE && split == (ctx > 0 ? min((ctx - 1) / tps, num_splits - 1) : 0);
    float cosv[8], sinv[8];
    if (ROPE) dec_cos_sin<HD>(rope, pos, sub, cosv, sinv);
    __shared__ uint4 s_new[ROPE ? 2 * (HD / 8) : 1];  // this step's K/V row (dec_new_kv_rope)
    if (stores && tid < 32)
        dec_new_kv_rope<HD>(qkv, qkv_stride, seq, kvh, num_heads, num_kv_heads, sub, rope, cosv,
                            sinv, slot_ok, slot, s_new);
    if (t0 >= t1) {
        // No tokens here. With one split this CTA still owns the output (an empty context
        // gives zeros); with several the reduce kernel skips this split.
        if (num_splits == 1) {
            for (int i = tid; i < G * HD; i += DEC_THREADS)
                out[(size_t)seq * out_stride + (size_t)kvh * G * HD + i] = __float2bfloat16(0.f);
        } else if (counters != nullptr) {
            last_split_reduces<HD, G>(counters, part_ml, part_o, ctx, tps, num_splits,
                                      num_kv_heads, kvh, seq, out);
        }
        return;
    }

    const int b0 = t0 >> log2_bs;
    const int nb = ((t1 - 1) >> log2_bs) - b0 + 1;
    const int* bt = block_tables + (size_t)seq * max_blocks_per_seq;
    for (int i = tid; i < nb; i += DEC_THREADS)
        s_bt[i] = min((unsigned)bt[b0 + i], (unsigned)(num_blocks - 1));

    float q[G][8];
    if (ROPE)
        dec_load_q_rope<HD, G>(qkv, qkv_stride, seq, kvh, sub, scale_log2, rope, cosv, sinv, q);
    else
        dec_load_q<HD, G>(qkv, qkv_stride, seq, kvh, sub, scale_log2, q);
    __syncthreads();  // the block-table slice, and s_new

    DecState<G> st;
    dec_init(st);
    dec_attend<HD, G, ROPE>(q, st, k_cache, v_cache, s_bt, b0, t0, t1, log2_bs,
                            (size_t)num_kv_heads * HD, (size_t)kvh * HD + sub * 8,
                            stores && slot_ok ? ctx - 1 : -1, s_new);

    dec_merge<HD, G>(st, [&](int g, int d, float r, float mx, float sum) {
        const int h = kvh * G + g;
        if (num_splits == 1) {
            out[(size_t)seq * out_stride + (size_t)h * HD + d] = __float2bfloat16(r);
        } else {
            const size_t p = ((size_t)seq * num_heads + h) * num_splits + split;
            part_o[p * HD + d] = r;
            if (d == 0) {
                part_ml[2 * p] = mx;
                part_ml[2 * p + 1] = sum;
            }
        }
    });
    if (num_splits > 1 && counters != nullptr)
        last_split_reduces<HD, G>(counters, part_ml, part_o, ctx, tps, num_splits,
                                  num_kv_heads, kvh, seq, out);
}

// Resident CTAs per SM the attn_decode_rope kernels are compiled for: as many as the plain
// kernel of the same shape gets, so that both see the same occupancy (the launcher sizes the
// splits from the plain kernel's). Without the cap the extra registers of the norm and
// rotation cost a CTA per SM at hd 128, g 4 (Qwen3-8B at tp 1 and tp 2).
#define DEC_ROPE_MIN_CTAS(HD, G) ((G) <= 4 ? 4 : ((G) <= 6 ? 3 : 2))

#define DECODE_KERNEL(HD, G)                                                                  \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_hd##HD##_g##G(      \
        const __nv_bfloat16* __restrict__ qkv, int qkv_stride,                               \
        const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache, \
        const int* context_lens, const int* block_tables,                                     \
        int max_blocks_per_seq, int num_kv_heads, int num_blocks, int log2_bs,               \
        float scale_log2, int max_context_len, int tokens_per_split, int num_splits,          \
        __nv_bfloat16* __restrict__ out, float* part_ml, float* part_o,                      \
        unsigned int* counters) {                                                            \
        pdl_begin();                                                                         \
        const DecRope none = {};                                                             \
        decode_body<HD, G, false>(qkv, qkv_stride, k_cache, v_cache, context_lens,           \
                                  block_tables, max_blocks_per_seq, num_kv_heads, num_blocks, \
                                  log2_bs, scale_log2, max_context_len, tokens_per_split,    \
                                  num_splits, out, part_ml, part_o, counters, none);         \
    }                                                                                        \
    /* The same with Qwen3's q/k norm, RoPE and the K/V store of qk_norm_rope_store folded     \
       in (decode_body's ROPE): the cache is written, so its pointers carry no __restrict__. */ \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, DEC_ROPE_MIN_CTAS(HD, G))       \
        attn_decode_rope_hd##HD##_g##G(                                                      \
        const __nv_bfloat16* __restrict__ qkv, int qkv_stride, __nv_bfloat16* k_cache,       \
        __nv_bfloat16* v_cache, const int* context_lens, const int* block_tables,            \
        int max_blocks_per_seq, int num_kv_heads, int num_blocks, int log2_bs,               \
        float scale_log2, int max_context_len, int tokens_per_split, int num_splits,          \
        __nv_bfloat16* __restrict__ out, float* part_ml, float* part_o,                      \
        unsigned int* counters, const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,    \
        float eps, const int* positions, const float* cos_sin, int max_position,            \
        const int* slot_mapping, long long num_slots) {                                      \
        pdl_begin();                                                                         \
        const DecRope rope = {q_norm,       k_norm,    eps,     positions, cos_sin,          \
                              max_position, slot_mapping, num_slots, k_cache, v_cache};     \
        decode_body<HD, G, true>(qkv, qkv_stride, k_cache, v_cache, context_lens,            \
                                 block_tables, max_blocks_per_seq, num_kv_heads, num_blocks,  \
                                 log2_bs, scale_log2, max_context_len, tokens_per_split,     \
                                 num_splits, out, part_ml, part_o, counters, rope);          \
    }

DECODE_KERNEL(64, 1)
DECODE_KERNEL(64, 2)
DECODE_KERNEL(64, 3)
DECODE_KERNEL(64, 4)
DECODE_KERNEL(64, 5)
DECODE_KERNEL(64, 6)
DECODE_KERNEL(64, 7)
DECODE_KERNEL(64, 8)
DECODE_KERNEL(128, 1)
DECODE_KERNEL(128, 2)
DECODE_KERNEL(128, 3)
DECODE_KERNEL(128, 4)
DECODE_KERNEL(128, 5)
DECODE_KERNEL(128, 6)
DECODE_KERNEL(128, 7)
DECODE_KERNEL(128, 8)

// ---------------------------------------------------------------------------------------------
// Decode, balanced: every CTA of a fixed grid reads the same number of K/V tokens.
// Opt-in (NANOVLLM_ATTN_BALANCED=1): faster than attn_decode_hd*_g* on mixed context lengths in
// no particular order, slower on the engine's batches, which run longest context first
// (docs/perf-notes.md, "Balanced decode attention").
//
// The batch's sequences are laid end to end on a line, each as piece_cost + its context tokens
// (piece_cost stands for the fixed cost of starting a piece: loading q, merging the warps;
// an empty sequence takes no room). The line is cut into gridDim.x / num_kv_heads chunks of
// equal length (whole DEC_BAL_GRANULE tokens, at least min_chunk), and CTA cta takes chunk
// cta / num_kv_heads for kv head cta % num_kv_heads: the CTAs of a chunk are neighbours in
// launch order, so they run together and read the same cache rows (a row holds every kv head
// of one token). A chunk may cover the end of one sequence, several whole ones and the start
// of another: the CTA attends each part ("piece") in turn. A sequence that lies within one
// chunk is written to `out` directly; one cut by chunk borders leaves a partial per piece, and
// the last piece to finish (counted in `counters`, one per (sequence, kv head), reset by that
// last CTA) combines them in piece order, as last_split_reduces does.
//
// Everything follows from the context lengths, which each CTA sums itself (a prefix sum over
// the batch in shared memory), so a CUDA graph captured once serves every step. The partials
// of sequence i live at slots first(i) + i .. last(i) + i, where first and last are the chunks
// holding its first and last token: one slot per (chunk, sequence) pair that meets, nchunks +
// num_seqs slots in all (`num_slots`), for each head a (max, sum) pair and HD floats,
// head-major: entry (head, slot) at head * num_slots + slot. A sequence with no context (batch
// padding) gets zeros, from CTA seq % gridDim.x.
// ---------------------------------------------------------------------------------------------

// Granule of the balanced chunk (tokens), and most block ids a CTA stages at once.
#define DEC_BAL_GRANULE 32
#define DEC_BAL_BT 64
// Resident CTAs per SM the balanced kernels are compiled for (registers capped to fit): the
// grid is a whole number of waves of them, so fewer would leave SMs short of loads in flight.
#define DEC_BAL_MIN_CTAS(G) ((G) <= 4 ? 4 : 2)

template <int HD, int G>
__device__ __forceinline__ void decode_balanced_body(
    const __nv_bfloat16* __restrict__ qkv, int qkv_stride,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int* context_lens, const int* block_tables,
    int max_blocks_per_seq, int num_kv_heads, int num_blocks, int log2_bs, float scale_log2,
    int max_context_len, int num_seqs, int min_chunk, int piece_cost, int num_slots,
    __nv_bfloat16* __restrict__ out, float* part_ml, float* part_o, unsigned int* counters)
{
    extern __shared__ int s_pre[];        // num_seqs + 1 prefix sums of the segment lengths
    __shared__ int s_bt[DEC_BAL_BT];
    __shared__ int s_warp[DEC_WARPS];
    __shared__ bool s_last;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int sub = lane % (HD / 8);
    const int num_heads = num_kv_heads * G;
    const int out_stride = num_heads * HD;

    // Prefix sums of the (clamped) contexts: thread t sums a run of `per` sequences, a scan
    // over the threads gives each run's start.
    const int per = (num_seqs + DEC_THREADS - 1) / DEC_THREADS;
    const int j0 = min(num_seqs, tid * per), j1 = min(num_seqs, j0 + per);
    // A segment's length in the line: its context plus piece_cost (none for an empty one).
    auto seg_len = [&](int j) {
        const int c = min(max(context_lens[j], 0), max_context_len);
        return c > 0 ? c + piece_cost : 0;
    };
    int run = 0;
    for (int j = j0; j < j1; ++j) run += seg_len(j);
    int incl = run;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    int acc = incl - run;
    for (int w = 0; w < warp; ++w) acc += s_warp[w];
    for (int j = j0; j < j1; ++j) {
        s_pre[j] = acc;
        acc += seg_len(j);
    }
    if (tid == DEC_THREADS - 1) s_pre[num_seqs] = acc;
    __syncthreads();

    const int nctas = gridDim.x, cta = blockIdx.x;
    // Padding rows (no context) get zeros.
    for (int i = cta; i < num_seqs; i += nctas) {
        if (s_pre[i + 1] != s_pre[i]) continue;
        for (int e = tid; e < out_stride; e += DEC_THREADS)
            out[(size_t)i * out_stride + e] = __float2bfloat16(0.f);
    }

    // CTA cta takes chunk c = cta / num_kv_heads of the line for kv head cta % num_kv_heads:
    // the CTAs of one chunk are neighbours in launch order, so they run together and read the
    // same cache rows (a row holds every kv head of one token).
    // The host keeps the total + gridDim.x * chunk within an int.
    const int kvh = cta % num_kv_heads;
    const int nchunks = nctas / num_kv_heads, c = cta / num_kv_heads;
    const int total = s_pre[num_seqs];
    int chunk = (total + nchunks - 1) / nchunks;
    chunk = max(min_chunk, (chunk + DEC_BAL_GRANULE - 1) / DEC_BAL_GRANULE * DEC_BAL_GRANULE);
    int pos = c * chunk;
    const int end = min(total, pos + chunk);
    if (c >= nchunks || pos >= end) return;

    // The sequence holding `pos`: the last i with s_pre[i] <= pos.
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_pre[mid] <= pos) lo = mid; else hi = mid - 1;
    }
    int i = lo;
    const size_t row_stride = (size_t)num_kv_heads * HD;
    while (pos < end) {
        while (s_pre[i + 1] <= pos) ++i;
        const int seg0 = s_pre[i], seg_end = s_pre[i + 1];  // the sequence's part of the line
        const int real0 = seg0 + piece_cost;                 // its first token
        if (end <= real0) break;  // only the cost of the next sequence's start is left
        const int t0 = max(pos, real0) - real0, t1 = min(end, seg_end) - real0;
        const int first = real0 / chunk, last = (seg_end - 1) / chunk;
        const int seg = i * num_kv_heads + kvh;

        float q[G][8];
        dec_load_q<HD, G>(qkv, qkv_stride, i, kvh, sub, scale_log2, q);
        DecState<G> st;
        dec_init(st);
        const int* bt = block_tables + (size_t)i * max_blocks_per_seq;
        for (int a = t0; a < t1;) {
            const int b0 = a >> log2_bs;
            const int e = min(t1, (b0 + DEC_BAL_BT) << log2_bs);
            const int nb = ((e - 1) >> log2_bs) - b0 + 1;
            __syncthreads();  // the previous range's (or piece's) reads of s_bt are done
            for (int b = tid; b < nb; b += DEC_THREADS)
                s_bt[b] = min((unsigned)bt[b0 + b], (unsigned)(num_blocks - 1));
            __syncthreads();
            dec_attend<HD, G>(q, st, k_cache, v_cache, s_bt, b0, a, e, log2_bs, row_stride,
                              (size_t)kvh * HD + sub * 8);
            a = e;
        }
        __syncthreads();  // dec_merge's shared state is free again

        // One emitter for both cases: each instantiation of dec_merge has shared arrays of its own.
        const bool whole = first == last;
        const int slot = c + i;
        dec_merge<HD, G>(st, [&](int g, int d, float r, float mx, float sum) {
            if (whole) {
                out[(size_t)i * out_stride + (size_t)(kvh * G + g) * HD + d] =
                    __float2bfloat16(r);
                return;
            }
            const size_t p = (size_t)(kvh * G + g) * num_slots + slot;
            part_o[p * HD + d] = r;
            if (d == 0) {
                part_ml[2 * p] = mx;
                part_ml[2 * p + 1] = sum;
            }
        });
        if (!whole) {
            // Every thread's partial writes are visible device-wide before the arrival counts.
            __threadfence();
            __syncthreads();
            if (tid == 0) s_last = atomicAdd(counters + seg, 1u) == (unsigned)(last - first);
            __syncthreads();
            if (s_last) {
                __threadfence();  // the other pieces' partials are read after their arrivals
                for (int e = tid; e < G * HD; e += DEC_THREADS) {
                    const int h = kvh * G + e / HD, d = e % HD;
                    const size_t base = (size_t)h * num_slots + first + i;
                    out[(size_t)i * out_stride + (size_t)h * HD + d] = __float2bfloat16(
                        combine_splits(part_ml, part_o, base, last - first + 1, HD, d));
                }
                if (tid == 0) counters[seg] = 0u;
            }
        }
        pos = min(end, seg_end);
    }
}

#define DECODE_BALANCED_KERNEL(HD, G)                                                         \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, DEC_BAL_MIN_CTAS(G))            \
    attn_decode_bal_hd##HD##_g##G(                                                           \
        const __nv_bfloat16* __restrict__ qkv, int qkv_stride,                               \
        const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache, \
        const int* context_lens, const int* block_tables,                                     \
        int max_blocks_per_seq, int num_kv_heads, int num_blocks, int log2_bs,               \
        float scale_log2, int max_context_len, int num_seqs, int min_chunk, int piece_cost,   \
        int num_slots,                                                                       \
        __nv_bfloat16* __restrict__ out, float* part_ml, float* part_o,                      \
        unsigned int* counters) {                                                            \
        pdl_begin();                                                                         \
        decode_balanced_body<HD, G>(qkv, qkv_stride, k_cache, v_cache, context_lens,         \
                                    block_tables, max_blocks_per_seq, num_kv_heads,          \
                                    num_blocks, log2_bs, scale_log2, max_context_len,        \
                                    num_seqs, min_chunk, piece_cost, num_slots, out,         \
                                    part_ml, part_o,                                         \
                                    counters);                                               \
    }

DECODE_BALANCED_KERNEL(64, 1)
DECODE_BALANCED_KERNEL(64, 2)
DECODE_BALANCED_KERNEL(64, 3)
DECODE_BALANCED_KERNEL(64, 4)
DECODE_BALANCED_KERNEL(64, 5)
DECODE_BALANCED_KERNEL(64, 6)
DECODE_BALANCED_KERNEL(64, 7)
DECODE_BALANCED_KERNEL(64, 8)
DECODE_BALANCED_KERNEL(128, 1)
DECODE_BALANCED_KERNEL(128, 2)
DECODE_BALANCED_KERNEL(128, 3)
DECODE_BALANCED_KERNEL(128, 4)
DECODE_BALANCED_KERNEL(128, 5)
DECODE_BALANCED_KERNEL(128, 6)
DECODE_BALANCED_KERNEL(128, 7)
DECODE_BALANCED_KERNEL(128, 8)

// Combines the splits of one (sequence, head): grid (num_heads, num_seqs), head_dim threads.
// Split i holds tokens [i * tps, (i + 1) * tps) (tps = seq_split_tokens of the sequence's
// context_lens[seq] tokens); only the splits that hold some of them were written.
// No __restrict__ on its inputs: `const __restrict__` loads may become ld.global.nc, which
// ptxas is free to move above pdl_wait() (scripts/check-pdl.sh checks every kernel).
extern "C" __global__ void attn_decode_reduce(
    const float* part_ml, const float* part_o, const int* context_lens, int max_context_len, int tokens_per_split,
    int num_splits, int head_dim, __nv_bfloat16* __restrict__ out)
{
    pdl_begin();
    const int h = blockIdx.x, seq = blockIdx.y, num_heads = gridDim.x;
    const int ctx = min(context_lens[seq], max_context_len);
    const int tps = seq_split_tokens(ctx, tokens_per_split, num_splits);
    const int nv = splits_with_tokens(ctx, tps, num_splits);
    const size_t base = ((size_t)seq * num_heads + h) * num_splits;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        out[((size_t)seq * num_heads + h) * head_dim + d] =
            __float2bfloat16(combine_splits(part_ml, part_o, base, nv, head_dim, d));
}

// ---------------------------------------------------------------------------------------------
// Prefill: varlen causal flash attention, K/V read from the paged cache.
//
// Grid (num_heads, num_seqs, num_q_tiles), one CTA per PF_BM-query tile of one head of one
// sequence, one warp per 16 query rows; z runs the tiles last-first, so the CTAs with the most
// keys start first and the short ones fill the tail. Q (64 x HD) passes
// through shared memory once and is held in registers as mma A fragments; K and V tiles of 64
// keys stream through a two-stage cp.async ring (the next tile loads while this one is
// computed; its block ids were fetched a tile earlier). S = Q K^T
// and O += P V run on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate) with operands
// from ldmatrix (V through .trans). Shared-memory rows are XOR-swizzled in 16-byte units
// (chunk ^ (row & 7)) so that the eight rows one ldmatrix phase reads hit distinct banks.
// Key tiles past the causal limit of the tile's last query are never loaded; only tiles that
// cross the diagonal or the end of the keys are masked.
// ---------------------------------------------------------------------------------------------

// Tile sizes and the occupancy hint are macros so that variants can be built for timing
// (`nvcc -DPF_BN=32 ...`); the launcher in src/cuda/attention.rs assumes these defaults.
#ifndef PF_BM
#define PF_BM 64
#endif
#ifndef PF_BN
#define PF_BN 64
#endif
#ifndef PF_MIN_BLOCKS
#define PF_MIN_BLOCKS 1
#endif
#define PF_THREADS (PF_BM / 16 * 32)  // one warp per 16 query rows

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;  // 0 bytes read: the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// ldmatrix from a shared-memory address (a u32 from __cvta_generic_to_shared).
__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a * b for one m16n8k16 tile (bf16 operands, f32 accumulators).
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x in one MUFU op (x = -inf gives 0); exp2f would add range fix-ups around it.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Swizzled tiles: row r of a [rows, HD] bf16 tile starts at byte r * HD * 2, and its 16-byte
// chunk c sits at chunk position c ^ (r & 7). For an ldmatrix lane whose row has r & 7 == lr
// and whose chunk is 2 * k + b (b in {0, 1}), the byte offset in the row is
// ((2k + b) ^ lr) * 16 = (k * 32) ^ ((b ^ lr) * 16): a per-lane constant XOR a compile-time
// one, so each ldmatrix address is one LOP3 plus an immediate row offset.
template <int HD>
__device__ __forceinline__ int swz(int r, int c) {
    return r * HD + ((c ^ (r & 7)) << 3);
}

template <int HD>
__device__ __forceinline__ void prefill_body(
    const __nv_bfloat16* __restrict__ qkv, int qkv_stride, int q_rows,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
    const int* __restrict__ block_tables, int max_blocks_per_seq, int num_kv_heads,
    int num_blocks, int max_seqlen_k, int log2_bs, float scale_log2,
    __nv_bfloat16* __restrict__ out)
{
    constexpr int CH = HD / 8;                     // 16-byte chunks per row
    constexpr int ROWS_PER_PASS = PF_THREADS / CH; // rows one cp.async pass covers
    constexpr int PASSES = PF_BN / ROWS_PER_PASS;  // K/V rows per thread
    constexpr int NT = PF_BN / 8;                  // n-tiles of S
    constexpr int OT = HD / 8;                     // n-tiles of O
    constexpr int KS = HD / 16;                    // k-steps of Q K^T
    constexpr int ROW_BYTES = HD * 2;
    constexpr int TILE_BYTES = PF_BN * ROW_BYTES;

    extern __shared__ __align__(128) uint8_t pf_smem[];
    // Layout: K stage 0 | K stage 1 | V stage 0 | V stage 1 (4 * PF_BN * HD * 2 bytes). Q
    // (PF_BM rows) is staged in K stage 1 when it fits there, else after V stage 1, and moved
    // to registers before the first load into K stage 1.
    constexpr bool Q_IN_K1 = PF_BM <= PF_BN;
    __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(pf_smem);
    __nv_bfloat16* sV = sK + 2 * PF_BN * HD;
    __nv_bfloat16* sQ = Q_IN_K1 ? sK + PF_BN * HD : sK + 4 * PF_BN * HD;
    const uint32_t sK_addr = (uint32_t)__cvta_generic_to_shared(sK);
    const uint32_t sV_addr = sK_addr + 2 * TILE_BYTES;
    const uint32_t sQ_addr = (uint32_t)__cvta_generic_to_shared(sQ);

    const int h = blockIdx.x, seq = blockIdx.y;
    const int qt = gridDim.z - 1 - blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int num_heads = gridDim.x;
    const int kvh = h / (num_heads / num_kv_heads);

    // Metadata the host could not check is clamped: rows past the buffers (q_rows) are neither
    // read nor written, keys past max_seqlen_k (within a block_tables row) are ignored, block
    // ids are clamped into the cache.
    const int q_start = cu_seqlens_q[seq];
    const int len_q = min(cu_seqlens_q[seq + 1], q_rows) - q_start;
    const int len_k = min(cu_seqlens_k[seq + 1] - cu_seqlens_k[seq], max_seqlen_k);
    const int q0 = qt * PF_BM;
    if (q_start < 0 || q0 >= len_q) return;
    const int diag = len_k - len_q;                // query i sees keys 0..=diag + i
    const int kv_end = min(len_k, diag + q0 + PF_BM);
    const int n_tiles = kv_end > 0 ? (kv_end + PF_BN - 1) / PF_BN : 0;
    const int out_stride = num_heads * HD;

    // ---- async loads: this thread's chunk ch of rows rr + p * ROWS_PER_PASS ----
    const int ch = tid % CH, rr = tid / CH;
    const int dst_off = swz<HD>(rr, ch);           // + p * ROWS_PER_PASS * HD (same swizzle)
#pragma unroll
    for (int p = 0; p < PF_BM / ROWS_PER_PASS; ++p) {
        const int r = rr + p * ROWS_PER_PASS;
        const bool valid = q0 + r < len_q;
        const __nv_bfloat16* src =
            valid ? qkv + (size_t)(q_start + q0 + r) * qkv_stride + (size_t)h * HD + ch * 8 : qkv;
        cp_async16(sQ + dst_off + p * ROWS_PER_PASS * HD, src, valid);
    }
    cp_async_commit();

    const int bs_mask = (1 << log2_bs) - 1;
    const int* bt = block_tables + (size_t)seq * max_blocks_per_seq;
    const size_t row_stride = (size_t)num_kv_heads * HD;
    const size_t head_off = (size_t)kvh * HD + ch * 8;
    // Block ids of this thread's rows of a tile, fetched a tile ahead of their use so that the
    // table lookup's latency hides behind a tile of mma work.
    int ids[PASSES];
    auto fetch_ids = [&](int tile) {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int key = max(min(tile * PF_BN + rr + p * ROWS_PER_PASS, len_k - 1), 0);
            ids[p] = __ldg(bt + (key >> log2_bs));
        }
    };
    auto issue_kv = [&](int tile, int stage) {
        __nv_bfloat16* dk = sK + stage * PF_BN * HD + dst_off;
        __nv_bfloat16* dv = sV + stage * PF_BN * HD + dst_off;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int key = tile * PF_BN + rr + p * ROWS_PER_PASS;
            const unsigned blk = min((unsigned)ids[p], (unsigned)(num_blocks - 1));
            const size_t off =
                ((size_t)blk * (bs_mask + 1) + (key & bs_mask)) * row_stride + head_off;
            const bool valid = key < len_k;
            cp_async16(dk + p * ROWS_PER_PASS * HD, k_cache + off, valid);
            cp_async16(dv + p * ROWS_PER_PASS * HD, v_cache + off, valid);
        }
    };
    if (n_tiles > 0) {
        fetch_ids(0);
        issue_kv(0, 0);
        cp_async_commit();
        if (n_tiles > 1) fetch_ids(1);
    }

    // ---- per-warp state: rows g and g + 8 of the warp's 16 ----
    const int g = lane >> 2, t4 = lane & 3;
    const int row0 = q0 + warp * 16 + g;           // query index (within the sequence) of row g
    // ldmatrix lane roles: matrix mi = lane / 8, row lr = lane % 8 of it.
    const int mi = lane >> 3, lr = lane & 7;

    uint32_t qf[KS][4];
    {
        cp_async_wait<1>();                        // Q has landed (tile 0 may still be in flight)
        __syncthreads();
        const uint32_t q_row = sQ_addr + (warp * 16 + (mi & 1) * 8 + lr) * ROW_BYTES;
        const uint32_t q_x = (((mi >> 1) ^ lr) << 4);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) ldsm_x4(qf[kk], q_row + (q_x ^ (kk << 5)));
        __syncthreads();                           // K stage 1 is free for tile 1
    }

    // K operand: key row np * 16 + (mi >> 1) * 8 + lr, chunk 2 kk + (mi & 1).
    const uint32_t k_lane = ((mi >> 1) * 8 + lr) * ROW_BYTES;
    const uint32_t k_x = (((mi & 1) ^ lr) << 4);
    // V operand (transposed): key row kk * 16 + (mi & 1) * 8 + lr, chunk 2 dp + (mi >> 1).
    const uint32_t v_lane = ((mi & 1) * 8 + lr) * ROW_BYTES;
    const uint32_t v_x = (((mi >> 1) ^ lr) << 4);

    float o[OT][4];
#pragma unroll
    for (int i = 0; i < OT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    // Running max of raw (unscaled) scores and running sum, rows g and g + 8.
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

    for (int j = 0; j < n_tiles; ++j) {
        const int stage = j & 1;
        if (j + 1 < n_tiles) {
            issue_kv(j + 1, stage ^ 1);
            cp_async_commit();
            if (j + 2 < n_tiles) fetch_ids(j + 2);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const uint32_t tk = sK_addr + stage * TILE_BYTES + k_lane;
        const uint32_t tv = sV_addr + stage * TILE_BYTES + v_lane;
        const int k0 = j * PF_BN;
        // A warp whose 16 rows all end before this tile (the CTA's later rows need it) skips
        // its arithmetic but still takes part in the barriers.
        if (k0 <= diag + q0 + warp * 16 + 15) {
            // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
            float s[NT][4];
#pragma unroll
            for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const uint32_t a = tk + (k_x ^ (kk << 5));
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    uint32_t b[4];
                    ldsm_x4(b, a + np * 16 * ROW_BYTES);
                    mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
                    mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
                }
            }

            // Mask keys past the causal limit or the end (only tiles crossing the diagonal).
            if ((k0 + PF_BN - 1 > diag + q0 + warp * 16) || (k0 + PF_BN > len_k)) {
#pragma unroll
                for (int i = 0; i < NT; ++i) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = k0 + i * 8 + 2 * t4 + (e & 1);
                        const int qi = row0 + ((e >> 1) << 3);
                        if (key > diag + qi || key >= len_k) s[i][e] = NEG_INF;
                    }
                }
            }

            // Online softmax on raw scores: p = 2^(s * scale_log2 - m * scale_log2), one FFMA and
            // one MUFU per score (scale_log2 > 0, so the max of raw scores is the max of scaled).
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = m[r];
#pragma unroll
                for (int i = 0; i < NT; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mu = (mx == NEG_INF) ? 0.f : mx * scale_log2;
                alpha[r] = ex2(m[r] * scale_log2 - mu);
                m[r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    s[i][2 * r] = ex2(fmaf(s[i][2 * r], scale_log2, -mu));
                    s[i][2 * r + 1] = ex2(fmaf(s[i][2 * r + 1], scale_log2, -mu));
                    sum += s[i][2 * r] + s[i][2 * r + 1];
                }
                l[r] = l[r] * alpha[r] + sum;
            }
            // Rescale O only when some row's max moved (after the first tiles it rarely does).
            if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
                for (int i = 0; i < OT; ++i) {
                    o[i][0] *= alpha[0];
                    o[i][1] *= alpha[0];
                    o[i][2] *= alpha[1];
                    o[i][3] *= alpha[1];
                }
            }

            // O += P V: P's accumulator layout is the A-fragment layout of the next mma.
#pragma unroll
            for (int kk = 0; kk < PF_BN / 16; ++kk) {
                uint32_t a[4];
                a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
                a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
                a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
                const uint32_t vrow = tv + kk * 16 * ROW_BYTES;
#pragma unroll
                for (int dp = 0; dp < HD / 16; ++dp) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, vrow + (v_x ^ (dp << 5)));
                    mma_bf16(o[2 * dp], a, b[0], b[1]);
                    mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // this stage is overwritten by the loads of iteration j + 1
    }
    cp_async_wait<0>();  // nothing may be in flight at exit

    // Finish: row sums across the quad, normalise, store (an empty row stores zeros).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int qi = row0 + r * 8;
        if (qi < len_q) {
            __nv_bfloat16* dst = out + (size_t)(q_start + qi) * out_stride + (size_t)h * HD;
#pragma unroll
            for (int i = 0; i < OT; ++i) {
                *reinterpret_cast<uint32_t*>(dst + i * 8 + 2 * t4) =
                    pack_bf16x2(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
            }
        }
    }
}

#define PREFILL_KERNEL(HD)                                                                    \
    extern "C" __global__ void __launch_bounds__(PF_THREADS, PF_MIN_BLOCKS) attn_prefill_hd##HD(             \
        const __nv_bfloat16* __restrict__ qkv, int qkv_stride, int q_rows,                   \
        const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache, \
        const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,          \
        const int* __restrict__ block_tables, int max_blocks_per_seq, int num_kv_heads,      \
        int num_blocks, int max_seqlen_k, int log2_bs, float scale_log2,                     \
        __nv_bfloat16* __restrict__ out) {                                                   \
        pdl_begin();                                                                         \
        prefill_body<HD>(qkv, qkv_stride, q_rows, k_cache, v_cache, cu_seqlens_q,            \
                         cu_seqlens_k, block_tables, max_blocks_per_seq, num_kv_heads,       \
                         num_blocks, max_seqlen_k, log2_bs, scale_log2, out);                \
    }

PREFILL_KERNEL(64)
PREFILL_KERNEL(128)
