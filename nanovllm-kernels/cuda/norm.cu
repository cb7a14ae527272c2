// nvcc-flags: --use_fast_math
//
// RMSNorm and the fused residual-add + RMSNorm (Backend::rms_norm, Backend::add_rms_norm).
// Called twice per decoder layer and once at the end of the model, on [tokens, hidden] rows.
//
// Layout: one block per row. With hidden % 8 == 0 each thread first requests its up to VPT
// 16-byte vectors of the weight (before waiting for the previous kernel: see load_weight),
// then loads its up to VPT 16-byte vectors of the row into registers (vector i of the row
// goes to thread i % blockDim, so a warp's loads are contiguous), the block reduces the sum of
// squares, and the thread scales the vectors it already holds: the row is read from memory
// once and written once. The launcher
// picks blockDim = ceil(hidden / 8 / VPT) rounded up to a warp (32 threads for hidden 1024,
// 128 for 4096), so each thread keeps VPT loads in flight. Other widths take a scalar path
// that reads the row twice (the second read hits L1/L2).
//
// Numerics (the CPU reference's): statistics in f32 over the bf16 inputs;
// out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight); for the fused op the residual sum is
// rounded to bf16 first and the statistics are taken over the rounded sum.
#include "common.cuh"

#define VPT 4

// Vector path: the thread's VPT vectors of the weight, requested before the kernel waits for
// its predecessor (no kernel writes weights; pdl.cuh), so that their latency is off the path
// that follows the wait; the rest of the thread's registers are free until then.
__device__ __forceinline__ void load_weight(const bf16* __restrict__ w, int nvec, uint4 (&wv)[VPT]) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) wv[j] = ld_weight(w + (size_t)i * 8);
    }
}

// Vector path of both kernels: `v` holds the row (already rounded sums for add_rms_norm), `wv`
// the weight (load_weight).
__device__ __forceinline__ void scale_store(const uint4 (&v)[VPT], float ss, const uint4 (&wv)[VPT],
                                            bf16* __restrict__ orow, int hidden, float eps,
                                            float* scratch) {
    const int nvec = hidden >> 3;
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
            float f[8], g[8];
            unpack8(v[j], f);
            unpack8(wv[j], g);
#pragma unroll
            for (int k = 0; k < 8; ++k) f[k] = round_bf16(f[k] * inv) * g[k];
            st16(orow + (size_t)i * 8, pack8(f));
        }
    }
}

__device__ __forceinline__ bool vector_path(int hidden) {
    return (hidden & 7) == 0 && (hidden >> 3) <= VPT * (int)blockDim.x;
}

extern "C" __global__ void rms_norm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                    bf16* __restrict__ out, int hidden, float eps) {
    pdl_launch_dependents();
    __shared__ float scratch[32];
    const bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* orow = out + (size_t)blockIdx.x * hidden;
    if (vector_path(hidden)) {
        const int nvec = hidden >> 3;
        uint4 v[VPT], wv[VPT];
        load_weight(w, nvec, wv);
        pdl_wait();
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < nvec) v[j] = ld16_stream(xr + (size_t)i * 8);
        }
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < nvec) {
                float f[8];
                unpack8(v[j], f);
#pragma unroll
                for (int k = 0; k < 8; ++k) ss += f[k] * f[k];
            }
        }
        scale_store(v, ss, wv, orow, hidden, eps, scratch);
    } else {
        pdl_wait();
        float ss = 0.f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const float f = bf16_to_f32(xr[i]);
            ss += f * f;
        }
        const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            orow[i] = __float2bfloat16_rn(round_bf16(bf16_to_f32(xr[i]) * inv) * bf16_to_f32(w[i]));
    }
}

// residual = bf16(x + residual); x = rms_norm(residual), both in place.
extern "C" __global__ void add_rms_norm(bf16* __restrict__ x, bf16* __restrict__ residual,
                                        const bf16* __restrict__ w, int hidden, float eps) {
    pdl_launch_dependents();
    __shared__ float scratch[32];
    bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* rr = residual + (size_t)blockIdx.x * hidden;
    if (vector_path(hidden)) {
        const int nvec = hidden >> 3;
        uint4 v[VPT], r[VPT], wv[VPT];
        load_weight(w, nvec, wv);
        pdl_wait();
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < nvec) {
                v[j] = ld16_stream(xr + (size_t)i * 8);
                r[j] = ld16_stream(rr + (size_t)i * 8);
            }
        }
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < nvec) {
                float a[8], b[8];
                unpack8(v[j], a);
                unpack8(r[j], b);
#pragma unroll
                for (int k = 0; k < 8; ++k) a[k] = a[k] + b[k];
                v[j] = pack8(a);  // the rounded sum: what the residual stream holds
                st16(rr + (size_t)i * 8, v[j]);
                unpack8(v[j], a);
#pragma unroll
                for (int k = 0; k < 8; ++k) ss += a[k] * a[k];
            }
        }
        scale_store(v, ss, wv, xr, hidden, eps, scratch);
    } else {
        pdl_wait();
        float ss = 0.f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const float s = round_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(rr[i]));
            rr[i] = __float2bfloat16_rn(s);
            ss += s * s;
        }
        const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
        // Each thread re-reads only the elements it wrote itself: no barrier needed.
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            xr[i] = __float2bfloat16_rn(round_bf16(bf16_to_f32(rr[i]) * inv) * bf16_to_f32(w[i]));
    }
}
