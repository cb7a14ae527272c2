// nvcc-flags: --use_fast_math
//
// Qwen3's per-head q/k RMSNorm fused with rotary embedding (Backend::qk_norm_rope), in place on
// the q and k heads of the fused qkv rows, right after the QKV projection of every layer.
//
// Layout: one head of one token is handled by L = head_dim / 8 consecutive lanes of a warp
// (16 lanes for head_dim 128), each holding 8 elements in one 16-byte load; a warp covers
// 32 / L heads. The sum of squares is reduced over those L lanes by xor-shuffles, and the
// neox rotation pairs element e with e + head_dim/2, which sits in lane ^ (L/2) at the same
// register index: one shuffle per element, no shared memory. The q and k heads of a row are
// contiguous (num_heads + num_kv_heads heads), so a "task" is simply (token, head). Each lane
// reads its 8 cos and 8 sin values as two pairs of 16-byte loads from the f32 table.
//
// Numerics (the CPU reference's): RMSNorm as in norm.cu, rounded to bf16; rotation in f32 on
// the rounded values (x1*cos - x2*sin, x2*cos + x1*sin), rounded to bf16.
// Positions outside the cos/sin table are clamped to its last row (the table covers
// max_position_embeddings; the engine never asks beyond it).
#include "common.cuh"

extern "C" __global__ void qk_norm_rope(bf16* __restrict__ qkv, int n, int qkv_width,
                                        int num_heads, int num_kv_heads, int head_dim,
                                        const bf16* __restrict__ q_norm,
                                        const bf16* __restrict__ k_norm, float eps,
                                        const int* __restrict__ positions,
                                        const float* __restrict__ cos_sin, int max_position) {
    const int lanes = head_dim >> 3;  // lanes per head: a power of two in 2..32
    const int half = head_dim >> 1;
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

    float x[8];
    if (valid) {
        unpack8(ld16(p), x);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += x[k] * x[k];
    for (int o = lanes >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / (float)head_dim + eps);

    float w[8];
    if (valid) {
        unpack8(ld16((head < num_heads ? q_norm : k_norm) + sub * 8), w);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = round_bf16(round_bf16(x[k] * inv) * w[k]);

    const bool first = sub * 8 < half;
    const int c = first ? sub * 8 : sub * 8 - half;  // index into the cos and sin halves
    int pos = valid ? positions[token] : 0;
    pos = min(max(pos, 0), max_position - 1);
    const float* cs = cos_sin + (size_t)pos * head_dim;
    float cosv[8], sinv[8];
    if (valid) {
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
    float y[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float other = __shfl_xor_sync(0xffffffffu, x[k], lanes >> 1);
        // first half: x1*cos - x2*sin; second half: x2*cos + x1*sin
        y[k] = first ? x[k] * cosv[k] - other * sinv[k] : x[k] * cosv[k] + other * sinv[k];
    }
    if (valid) st16(p, pack8(y));
}
