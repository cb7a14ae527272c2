// Helpers shared by the kernel files: bf16 <-> f32 in 16-byte vectors, warp and block
// reductions. Every memory-bound kernel moves data as `uint4` (8 bf16 = 16 bytes per thread),
// the widest access one thread can issue, so that a warp reads 512 contiguous bytes at once.
//
// Rounding: bf16 values widen to f32 exactly; f32 narrows to bf16 by round-to-nearest-even
// (`__float2bfloat16_rn`), the same as `half::bf16::from_f32` in the CPU reference.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "pdl.cuh"

typedef __nv_bfloat16 bf16;

// The low half of a 32-bit word is the element with the lower address.
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ float bf16_to_f32(bf16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Rounds an f32 to bf16 and back: the value a bf16 intermediate holds.
__device__ __forceinline__ float round_bf16(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
}

// 16 bytes of a weight: not kept in L1 (read once per CTA), the L2 fetching 256-byte blocks.
// A coherent load (not ld.global.nc), so that ptxas keeps it where the source puts it; its SASS
// form (LDG.E.NA.LTC256B) is the one scripts/check-pdl.sh allows before pdl_wait(): use it for
// weights alone, which no kernel writes, so that a kernel can request them before it waits for
// its predecessor (pdl.cuh).
__device__ __forceinline__ uint4 ld_weight(const bf16* p) {
    uint4 v;
    asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// silu(g) * u as the MLP's activation computes it: silu(g) = g / (1 + exp(-g)) with the fast
// exponential and division (flush-to-zero), rounded to bf16, times u. Written out in PTX so
// that every file computes the same bits whatever its compile flags (activation.cu builds with
// --use_fast_math, gemv.cu without), which lets the down projection fuse it (gemv.cu).
__device__ __forceinline__ float silu_mul(float g, float u) {
    float e, s, r;
    asm("mul.ftz.f32 %0, %1, 0fBFB8AA3B;" : "=f"(e) : "f"(g));  // -g * log2(e)
    asm("ex2.approx.ftz.f32 %0, %0;" : "+f"(e));
    asm("add.ftz.f32 %0, %0, 0f3F800000;" : "+f"(e));  // + 1
    asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(s) : "f"(g), "f"(e));
    s = round_bf16(s);
    asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(u), "f"(s));
    return r;
}

__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
    f[0] = bf16_lo(v.x); f[1] = bf16_hi(v.x);
    f[2] = bf16_lo(v.y); f[3] = bf16_hi(v.y);
    f[4] = bf16_lo(v.z); f[5] = bf16_hi(v.z);
    f[6] = bf16_lo(v.w); f[7] = bf16_hi(v.w);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 v;
    v.x = pack_bf16x2(f[0], f[1]);
    v.y = pack_bf16x2(f[2], f[3]);
    v.z = pack_bf16x2(f[4], f[5]);
    v.w = pack_bf16x2(f[6], f[7]);
    return v;
}

// 16-byte loads and stores. `p` must be 16-byte aligned (the launchers take the vector
// path only when every row starts on a multiple of 8 elements; buffers are 256-byte aligned).
__device__ __forceinline__ uint4 ld16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
// Read-only, no reuse expected: stream through L1.
__device__ __forceinline__ uint4 ld16_stream(const bf16* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void st16(bf16* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats. Ends with a
// barrier-protected read, so `scratch` may be reused right after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (nwarps == 1) return v;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(t);
}
