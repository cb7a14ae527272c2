// nvcc-flags: --use_fast_math
//
// Qwen3's per-head q/k RMSNorm fused with rotary embedding, in place on the q and k heads of the
// fused qkv rows, right after the QKV projection of every layer: `qk_norm_rope`
// (Backend::qk_norm_rope) alone, and `qk_norm_rope_store` (Backend::qk_norm_rope_store), which
// also writes each row's k heads (normed and rotated) and v heads into the paged KV cache, the
// work of store_kvcache in kvcache.cu, so that a layer queues one launch instead of two.
//
// Layout: one head of one token is handled by L = head_dim / 8 consecutive lanes of a warp
// (16 lanes for head_dim 128), each holding 8 elements in one 16-byte load; a warp covers
// 32 / L heads. The sum of squares is reduced over those L lanes by xor-shuffles, and the
// neox rotation pairs element e with e + head_dim/2, which sits in lane ^ (L/2) at the same
// register index: one shuffle per element, no shared memory. The heads of a row are
// contiguous, so a "task" is simply (token, head): q and k heads for qk_norm_rope, q, k and v
// heads for qk_norm_rope_store. Each lane reads its 8 cos and 8 sin values as two pairs of
// 16-byte loads from the f32 table.
//
// Numerics (the CPU reference's): RMSNorm as in norm.cu, rounded to bf16; rotation in f32 on
// the rounded values (x1*cos - x2*sin, x2*cos + x1*sin), rounded to bf16. Both kernels run the
// same device function on each head, so qk_norm_rope_store's q/k results, in place and in the
// cache, are bit-identical to qk_norm_rope followed by store_kvcache; v heads are copied bit
// for bit. Positions outside the cos/sin table are clamped to its last row (the table covers
// max_position_embeddings; the engine never asks beyond it).
#include "qk_rope.cuh"

// The cos/sin row of token `token`'s position, clamped into the table. `positions` (and
// `slot_mapping`) are not __restrict__: ptxas moves the ld.global.nc loads that makes of them
// above pdl_wait(), and only weights may be read there (pdl.cuh).
__device__ __forceinline__ const float* cos_sin_row(const float* __restrict__ cos_sin,
                                                    const int* positions, int token,
                                                    int head_dim, int max_position) {
    const int pos = min(max(positions[token], 0), max_position - 1);
    return cos_sin + (size_t)pos * head_dim;
}

// The lane's 16 bytes of the norm weight of its head (q_norm for q heads, k_norm for k heads),
// requested before the kernel waits for its predecessor (no kernel writes weights; pdl.cuh);
// zeros for a lane without a q or k head.
__device__ __forceinline__ uint4 norm_weight(bool rope, bool is_q, const bf16* __restrict__ q_norm,
                                             const bf16* __restrict__ k_norm, int sub) {
    return rope ? ld_weight((is_q ? q_norm : k_norm) + sub * 8) : make_uint4(0u, 0u, 0u, 0u);
}

extern "C" __global__ void qk_norm_rope(bf16* __restrict__ qkv, int n, int qkv_width,
                                        int num_heads, int num_kv_heads, int head_dim,
                                        const bf16* __restrict__ q_norm,
                                        const bf16* __restrict__ k_norm, float eps,
                                        const int* positions,
                                        const float* __restrict__ cos_sin, int max_position) {
    pdl_launch_dependents();
    const int lanes = head_dim >> 3;  // lanes per head: a power of two in 2..32
    const int lane = threadIdx.x & 31;
    const int sub = lane & (lanes - 1);  // lane within the head
    const int heads_per_row = num_heads + num_kv_heads;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long task = warp * (32 / lanes) + lane / lanes;
    const bool valid = task < (long long)n * heads_per_row;
    // Invalid lanes still take part in the shuffles (with zeros) and skip memory.
    const int token = valid ? (int)(task / heads_per_row) : 0;
    const int head = valid ? (int)(task % heads_per_row) : 0;
    bf16* p = qkv + (size_t)token * qkv_width + (size_t)head * head_dim + sub * 8;
    const uint4 w = norm_weight(valid, head < num_heads, q_norm, k_norm, sub);
    pdl_wait();

    float x[8], cosv[8], sinv[8];
    if (valid) {
        unpack8(ld16(p), x);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = 0.f;
    }
    load_cos_sin(valid ? cos_sin_row(cos_sin, positions, token, head_dim, max_position) : nullptr,
                 sub, head_dim, cosv, sinv);
    norm_rope8(x, w, cosv, sinv, sub, lanes, head_dim, eps);
    if (valid) st16(p, pack8(x));
}

// qk_norm_rope and store_kvcache in one pass over the q, k and v heads of n rows. A q head is
// normed and rotated in place; a k head is normed, rotated, written in place and to its row's
// slot of k_cache; a v head is copied to its row's slot of v_cache. Slot s is row s of the
// [num_slots, num_kv_heads * head_dim] view of each cache; slot_mapping[i] == -1 (a token whose
// KV is already cached, or padding) stores nothing for row i, and slots beyond the cache are
// skipped too (a kernel cannot return an error; the CPU reference refuses them).
extern "C" __global__ void qk_norm_rope_store(
    bf16* __restrict__ qkv, int n, int qkv_width, int num_heads, int num_kv_heads, int head_dim,
    const bf16* __restrict__ q_norm, const bf16* __restrict__ k_norm, float eps,
    const int* positions, const float* __restrict__ cos_sin, int max_position,
    const int* slot_mapping, bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
    long long num_slots) {
    pdl_launch_dependents();
    const int lanes = head_dim >> 3;
    const int lane = threadIdx.x & 31;
    const int sub = lane & (lanes - 1);
    const int v_start = num_heads + num_kv_heads;  // first v head of a row
    const int heads_per_row = v_start + num_kv_heads;
    const int kv_width = num_kv_heads * head_dim;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long task = warp * (32 / lanes) + lane / lanes;
    const bool valid = task < (long long)n * heads_per_row;
    const int token = valid ? (int)(task / heads_per_row) : 0;
    const int head = valid ? (int)(task % heads_per_row) : 0;
    const bool is_v = head >= v_start;
    const bool rope = valid && !is_v;
    bf16* p = qkv + (size_t)token * qkv_width + (size_t)head * head_dim + sub * 8;
    const uint4 w = norm_weight(rope, head < num_heads, q_norm, k_norm, sub);
    pdl_wait();
    // Every load this lane needs, unconditional (an idle lane reads token 0, head 0, which
    // exist: n >= 1) and in one basic block, so that they go out together: its 16 bytes of
    // the row, its token's slot and position; then the position's cos/sin values. Two memory
    // latencies after the wait (the weight came before it).
    const uint4 row = ld16(p);
    const int slot_of_token = slot_mapping[token];
    const int pos = min(max(positions[token], 0), max_position - 1);

    const uint4 raw = valid ? row : make_uint4(0u, 0u, 0u, 0u);
    const int slot = valid && head >= num_heads ? slot_of_token : -1;
    float x[8], cosv[8], sinv[8];
    load_cos_sin(rope ? cos_sin + (size_t)pos * head_dim : nullptr, sub, head_dim, cosv, sinv);
    // The cache row offset of this k or v head, or -1 when nothing is stored.
    long long dst = -1;
    if (slot >= 0 && slot < num_slots) {
        const int kv_head = is_v ? head - v_start : head - num_heads;
        dst = (long long)slot * kv_width + (long long)kv_head * head_dim + sub * 8;
    }

    // A warp of v heads (and idle lanes) only copies: it skips the shuffles as a whole.
    if (__all_sync(0xffffffffu, !valid || is_v)) {
        if (dst >= 0) st16(v_cache + dst, raw);
        return;
    }
    // Mixed warps: v lanes take part in the shuffles with zeros, like idle lanes.
    if (rope) {
        unpack8(raw, x);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = 0.f;
    }
    norm_rope8(x, w, cosv, sinv, sub, lanes, head_dim, eps);
    if (rope) {
        const uint4 y = pack8(x);
        st16(p, y);
        if (dst >= 0) st16(k_cache + dst, y);
    } else if (is_v && dst >= 0) {
        st16(v_cache + dst, raw);
    }
}
