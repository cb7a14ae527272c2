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
//
// add_rms_norm_recv is add_rms_norm after the receiving end of the copy-engine all-reduce
// (custom_ar.cu's ar_copy_reduce), in one kernel: x holds this rank's partial sums and `recv`
// the peer's, which its copy engine wrote before raising `*flag` to `epoch`; each block waits
// for the flag (flag.cuh), takes x = bf16(x + recv) as ar_copy_reduce computes it (f32 add and
// rounding without flush-to-zero: that file is compiled without fast math, so the instructions
// are spelled out here), and goes on as add_rms_norm. The results are bit for bit those of the
// two kernels, with one read and one write of the rows fewer.
#include "common.cuh"
#include "flag.cuh"

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
// With a `peer` row (add_rms_norm_recv_push), each result vector is also stored there.
__device__ __forceinline__ void scale_store(const uint4 (&v)[VPT], float ss, const uint4 (&wv)[VPT],
                                            bf16* __restrict__ orow, int hidden, float eps,
                                            float* scratch, bf16* peer = nullptr) {
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
            const uint4 o = pack8(f);
            st16(orow + (size_t)i * 8, o);
            if (peer != nullptr) st16(peer + (size_t)i * 8, o);
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

// The two-rank sum ar_copy_reduce writes for 8 bf16 pairs: bf16(f32(a) + f32(b)), with an
// add and a rounding that do not flush subnormals (this file is compiled with fast math).
__device__ __forceinline__ uint4 sum8_exact(const uint4& a, const uint4& b) {
    float x[8], y[8];
    unpack8(a, x);
    unpack8(b, y);
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        float lo, hi;
        asm("add.rn.f32 %0, %1, %2;" : "=f"(lo) : "f"(x[2 * k]), "f"(y[2 * k]));
        asm("add.rn.f32 %0, %1, %2;" : "=f"(hi) : "f"(x[2 * k + 1]), "f"(y[2 * k + 1]));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(hi), "f"(lo));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ bf16 sum1_exact(bf16 a, bf16 b) {
    float s;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(s) : "f"(bf16_to_f32(a)), "f"(bf16_to_f32(b)));
    uint16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(s));
    return __ushort_as_bfloat16(h);
}

// residual = bf16(x + residual); x = rms_norm(residual), both in place; with RECV, x is first
// replaced by bf16(x + recv) (see add_rms_norm_recv at the top); with a `peer` (the same rows of
// the peer's x), the result rows are stored there too.
template <bool RECV>
__device__ __forceinline__ void add_rms_norm_row(bf16* __restrict__ x, bf16* __restrict__ residual,
                                                 const bf16* __restrict__ w, int hidden, float eps,
                                                 const bf16* __restrict__ recv, const uint32_t* flag,
                                                 uint32_t epoch, uint32_t* stuck,
                                                 volatile uint32_t* timed_out,
                                                 bf16* __restrict__ peer = nullptr) {
    pdl_launch_dependents();
    __shared__ float scratch[32];
    bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* rr = residual + (size_t)blockIdx.x * hidden;
    const bf16* pr = RECV ? recv + (size_t)blockIdx.x * hidden : nullptr;
    bf16* qr = peer != nullptr ? peer + (size_t)blockIdx.x * hidden : nullptr;
    if (vector_path(hidden)) {
        const int nvec = hidden >> 3;
        uint4 v[VPT], r[VPT], wv[VPT];
        load_weight(w, nvec, wv);
        pdl_wait();
        if (RECV) wait_peer_flag(flag, epoch, stuck, timed_out);
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < nvec) {
                v[j] = ld16_stream(xr + (size_t)i * 8);
                r[j] = ld16_stream(rr + (size_t)i * 8);
                if (RECV) v[j] = sum8_exact(v[j], __ldcg(reinterpret_cast<const uint4*>(pr) + i));
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
        scale_store(v, ss, wv, xr, hidden, eps, scratch, qr);
    } else {
        pdl_wait();
        if (RECV) wait_peer_flag(flag, epoch, stuck, timed_out);
        float ss = 0.f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const bf16 xi = RECV ? sum1_exact(xr[i], __ldcg(pr + i)) : xr[i];
            const float s = round_bf16(bf16_to_f32(xi) + bf16_to_f32(rr[i]));
            rr[i] = __float2bfloat16_rn(s);
            ss += s * s;
        }
        const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
        // Each thread re-reads only the elements it wrote itself: no barrier needed.
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const bf16 o = __float2bfloat16_rn(round_bf16(bf16_to_f32(rr[i]) * inv) * bf16_to_f32(w[i]));
            xr[i] = o;
            if (qr != nullptr) qr[i] = o;
        }
    }
}

extern "C" __global__ void add_rms_norm(bf16* __restrict__ x, bf16* __restrict__ residual,
                                        const bf16* __restrict__ w, int hidden, float eps) {
    add_rms_norm_row<false>(x, residual, w, hidden, eps, nullptr, nullptr, 0u, nullptr, nullptr);
}

// recv: [rows, hidden] like x; flag, epoch, stuck, timed_out: as ar_copy_reduce's.
extern "C" __global__ void add_rms_norm_recv(bf16* __restrict__ x, bf16* __restrict__ residual,
                                             const bf16* __restrict__ w, int hidden, float eps,
                                             const bf16* __restrict__ recv, const uint32_t* flag,
                                             uint32_t epoch, uint32_t* stuck,
                                             volatile uint32_t* timed_out) {
    add_rms_norm_row<true>(x, residual, w, hidden, eps, recv, flag, epoch, stuck, timed_out);
}

// add_rms_norm_recv on this rank's own rows of a prefill step whose rows the two ranks share out
// (copy_ar.rs): the same bits, and each result row is also stored into the same row of the
// peer's x (`peer`, the peer's buffer mapped through CUDA IPC), so that both ranks end with every
// row of the normalised output while each adds and normalises only half of them.
extern "C" __global__ void add_rms_norm_recv_push(bf16* __restrict__ x, bf16* __restrict__ residual,
                                                  const bf16* __restrict__ w, int hidden, float eps,
                                                  const bf16* __restrict__ recv, const uint32_t* flag,
                                                  uint32_t epoch, uint32_t* stuck,
                                                  volatile uint32_t* timed_out, bf16* __restrict__ peer) {
    add_rms_norm_row<true>(x, residual, w, hidden, eps, recv, flag, epoch, stuck, timed_out, peer);
}

// One thread waits for the peer's flag to reach `epoch` (flag.cuh), so that the kernels after it
// in the stream read what the peer stored before raising it (add_rms_norm_recv_push's rows).
extern "C" __global__ void wait_peer(const uint32_t* flag, uint32_t epoch, uint32_t* stuck,
                                     volatile uint32_t* timed_out) {
    pdl_begin();
    wait_peer_flag(flag, epoch, stuck, timed_out);
}
