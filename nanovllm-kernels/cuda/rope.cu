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
#include "common.cuh"

// The lane's 8 cos and 8 sin values for its elements of a head (`sub`: its index within the
// head), from the cos/sin row `cs` of the token's position; zeros when `cs` is null.
__device__ __forceinline__ void load_cos_sin(const float* __restrict__ cs, int sub, int head_dim,
                                             float (&cosv)[8], float (&sinv)[8]) {
    const int half = head_dim >> 1;
    const int c = sub * 8 < half ? sub * 8 : sub * 8 - half;  // index into the cos and sin halves
    if (cs != nullptr) {
        const float4 c0 = *reinterpret_cast<const float4*>(cs + c);
        const float4 c1 = *reinterpret_cast<const float4*>(cs + c + 4);
        const float4 s0 = *reinterpret_cast<const float4*>(cs + half + c);
        const float4 s1 = *reinterpret_cast<const float4*>(cs + half + c + 4);
        cosv[0] = c0.x; cosv[1] = c0.y; cosv[2] = c0.z; cosv[3] = c0.w;
        cosv[4] = c1.x; cosv[5] = c1.y; cosv[6] = c1.z; cosv[7] = c1.w;
        sinv[0] = s0.x; sinv[1] = s0.y; sinv[2] = s0.z; sinv[3] = s0.w;
        sinv[4] = s1.x; sinv[5] = s1.y; sinv[6] = s1.z; sinv[7] = s1.w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) cosv[k] = sinv[k] = 0.f;
    }
}

// Normalizes and rotates one head spread over `lanes` lanes, 8 elements per lane in `x`, in
// place, with the lane's 8 elements of the norm weight `w` (16 bytes as loaded) and its cos
// and sin values (load_cos_sin). `sub` is the lane's index within its head. Every lane of the
// warp must call it together (the reductions and the rotation shuffle across lanes); a lane
// without a head to work on passes zeros everywhere and ignores the result. Its inputs come
// in as arguments so that the kernels request them before the reductions: the weight before
// waiting for the previous kernel, the cos/sin values together with the row.
__device__ __forceinline__ void norm_rope8(float (&x)[8], const uint4& w, const float (&cosv)[8],
                                           const float (&sinv)[8], int sub, int lanes,
                                           int head_dim, float eps) {
    const int half = head_dim >> 1;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += x[k] * x[k];
    for (int o = lanes >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / (float)head_dim + eps);

    float wv[8];
    unpack8(w, wv);
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = round_bf16(round_bf16(x[k] * inv) * wv[k]);

    const bool first = sub * 8 < half;
    float y[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float other = __shfl_xor_sync(0xffffffffu, x[k], lanes >> 1);
        // first half: x1*cos - x2*sin; second half: x2*cos + x1*sin
        y[k] = first ? x[k] * cosv[k] - other * sinv[k] : x[k] * cosv[k] + other * sinv[k];
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = y[k];
}

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
