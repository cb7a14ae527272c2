// Qwen3's per-head q/k RMSNorm and rotary embedding of one head held by a group of lanes, shared
// by rope.cu (qk_norm_rope, qk_norm_rope_store) and attention.cu (the decode kernels that norm,
// rotate and store the step's token themselves), so that both give the same bits.
//
// The arithmetic is spelled out in PTX (ftz.cuh), the instructions rope.cu's --use_fast_math
// gives the plain C++ (fma.rn.ftz / add.ftz for the sum of squares, div.approx.ftz, add.ftz and
// rsqrt.approx.ftz for the inverse RMS, mul.ftz for the scaling, mul.ftz + fma.rn.ftz for the
// rotation), so the results do not depend on the flags of the file that includes it
// (attention.cu is compiled without fast math).
#pragma once

#include "common.cuh"
#include "ftz.cuh"

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
//
// Numerics (the CPU reference's): RMSNorm rounded to bf16 twice as norm.cu does (x * inv, then
// times the weight); rotation in f32 on the rounded values (x1*cos - x2*sin, x2*cos + x1*sin),
// left unrounded for the caller to pack.
__device__ __forceinline__ void norm_rope8(float (&x)[8], const uint4& w, const float (&cosv)[8],
                                           const float (&sinv)[8], int sub, int lanes,
                                           int head_dim, float eps) {
    const int half = head_dim >> 1;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss = fma_ftz(x[k], x[k], ss);
    for (int o = lanes >> 1; o > 0; o >>= 1) ss = add_ftz(ss, __shfl_xor_sync(0xffffffffu, ss, o));
    const float inv = inv_rms_ftz(ss, (float)head_dim, eps);

    float wv[8];
    unpack8(w, wv);
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = round_bf16(mul_ftz(round_bf16(mul_ftz(inv, x[k])), wv[k]));

    const bool first = sub * 8 < half;
    float y[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float other = __shfl_xor_sync(0xffffffffu, x[k], lanes >> 1);
        const float t = mul_ftz(sinv[k], other);
        // first half: x1*cos - x2*sin; second half: x2*cos + x1*sin
        y[k] = fma_ftz(x[k], cosv[k], first ? -t : t);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = y[k];
}
