// One-shot all-reduce for small messages between the GPUs of one host (decode steps), faster
// than NCCL's ring there because it is one short kernel and one crossing of NVLink; and the
// same all-reduce fused with the residual add + RMSNorm that follows it in every decoder layer.
//
// Push protocol, with the data as its own flag. Every rank owns one IPC-shared allocation with
// receive slots [parity][source rank][cap] of bf16 per lane, all holding the bit pattern
// 0xFFFF ("empty", AR_EMPTY: a NaN that no sender stores: senders replace it with the NaN
// 0x7FFF, so NaN stays NaN and every other value keeps its bits). The kernels always run the
// same fixed grid, and every block bumps its own epoch counter once per call, so all blocks of
// all ranks agree on the call count and on its parity p. In call k, block b of each rank:
//   1. pushes its elements of the input into slot [p][rank] of every peer (plain stores to the
//      peer's memory over NVLink, which need no reply);
//   2. for each of its elements and each peer q, reads its own slot [p][q] until no half of
//      the 16-byte vector is AR_EMPTY (the stores of one vector may land in parts; each part
//      is checked), takes the value and writes AR_EMPTY back;
//   3. sums every rank's value in f32 in rank order (its own from the input) and writes bf16
//      into the input in place: every rank gets the same bits, those of NCCL's two-rank sum.
// No flag, fence or barrier: a value waits one NVLink crossing, where a pull protocol waits for
// a flag to cross and then for a read to go there and back.
//
// Why a slot is empty and read before a peer writes it again (two parities are enough):
// peer q writes its element i into my slot [p][q] in calls k, k + 2, ... When q starts call
// k + 2, its call k + 1 has completed (stream order; under programmatic dependent launch each
// kernel's pdl_begin() holds it until its predecessor has completed), and that call waited for
// my pushes of call k + 1 (each of q's threads waits until my value of each of its elements
// arrives, and every call has at least one element), which I make only after my call k has
// completed, my read of element i and the AR_EMPTY written back after it included. The
// counters live in device memory, so the kernels can be captured in a CUDA graph and replayed.
// A peer that never sends (its process died) ends the wait after about five seconds and sets
// `stuck` (device memory: every later wait is skipped, so a dead peer costs one timeout, not
// one per call) and `timed_out` (host-mapped memory, which the host reads after each step and
// turns into an error).
//
// ar_one_shot is that all-reduce, block b owning a grid-stride range of 16-byte vectors (or of
// elements, when the length is not a multiple of 8).
//
// ar_add_rms_norm is the all-reduce followed by add_rms_norm (norm.cu) in one kernel, with the
// same bits as the two: x (this rank's partial sums, [rows, hidden]) is summed over the ranks
// as above (f32 in rank order, rounded once to bf16), then residual = bf16(sum + residual) and
// x = rms_norm(residual) * w. The norm needs whole rows, so block b owns rows b, b + gridDim,
// ... (steps 1 and 2 move those rows), and a block with no row still bumps its epoch. Both
// kernels share each lane's slots and epochs, and a lane's calls may alternate between them,
// which maps element i to different blocks from one call to the next; the argument above never
// needed "the same block", only that every block bumps its epoch once per call and that a call
// completes only once every pushed element has been taken.
//
// Numerics of the norm part: bit for bit those of add_rms_norm in norm.cu, which is compiled
// with --use_fast_math while this file is not (ar_one_shot's sum must not flush subnormals).
// So the fused kernel spells out the instructions fast math gives norm.cu, in inline PTX:
// add.ftz for the residual add and the reductions, fma.rn.ftz for the sum of squares,
// div.approx.ftz / add.ftz / rsqrt.approx.ftz for the inverse RMS, mul.ftz for the scaling. It
// also keeps norm.cu's order of every f32 sum: each row's statistics are taken by a group of
// as many threads as the block add_rms_norm runs with (norm_threads in src/cuda/ops.rs,
// mirrored by the launcher), thread t of the group sums the squares of vectors t + j * nt
// (j < AR_VPT = norm.cu's VPT) in that order, and the group reduces as common.cuh's block_sum
// does. A change to either of those in norm.cu, ops.rs or common.cuh must be made here too.
// Only rows with hidden % 8 == 0 and hidden <= 8192 (8 * AR_CHUNK) are fused; the launcher
// leaves other widths to the unfused sequence.
#include <cuda_bf16.h>
#include <stdint.h>

#include "flag.cuh"
#include "ftz.cuh"
#include "pdl.cuh"

// ar_add_rms_norm: 16-byte vectors per thread and row of add_rms_norm (VPT in norm.cu); its
// threads per block; vectors per thread and chunk; 16-byte vectors of a chunk (so rows of
// hidden <= 8 * AR_CHUNK).
#define AR_VPT 4
#define AR_THREADS 512
#define AR_K 2
#define AR_CHUNK (AR_K * AR_THREADS)

// Step 1's counter: this block's epoch for this call (the same in every thread).
__device__ __forceinline__ uint32_t next_epoch(uint32_t* epochs) {
    __shared__ uint32_t e;
    if (threadIdx.x == 0) {
        e = epochs[blockIdx.x] + 1;
        epochs[blockIdx.x] = e;
    }
    __syncthreads();
    return e;
}

// Strong (relaxed, system scope) 16-byte and 2-byte accesses: a peer's store becomes visible
// to the polling loads, and the loads are not merged or hoisted out of the loop. Each 32-bit
// word of a vector access is single-copy atomic, so no bf16 half is ever seen torn.
__device__ __forceinline__ void st_sys(uint4* p, uint4 v) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ uint4 ld_sys(const uint4* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

__device__ __forceinline__ void st_sys(uint16_t* p, uint16_t v) {
    asm volatile("st.volatile.global.u16 [%0], %1;" ::"l"(p), "h"(v) : "memory");
}

__device__ __forceinline__ uint16_t ld_sys(const uint16_t* p) {
    uint16_t v;
    asm volatile("ld.volatile.global.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
    return v;
}

// The empty mark, and what a sender stores instead of it (both NaN).
#define AR_EMPTY 0xFFFFu
#define AR_NAN 0x7FFFu

__device__ __forceinline__ bool full(uint16_t h) { return h != AR_EMPTY; }
__device__ __forceinline__ bool full(uint4 v) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    bool ok = true;
#pragma unroll
    for (int k = 0; k < 4; ++k) ok &= (w[k] & 0xffffu) != AR_EMPTY && (w[k] >> 16) != AR_EMPTY;
    return ok;
}

__device__ __forceinline__ uint16_t sendable(uint16_t h) { return h == AR_EMPTY ? (uint16_t)AR_NAN : h; }
__device__ __forceinline__ uint4 sendable(uint4 v) {
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if ((w[k] & 0xffffu) == AR_EMPTY) w[k] = (w[k] & 0xffff0000u) | AR_NAN;
        if ((w[k] >> 16) == AR_EMPTY) w[k] = (w[k] & 0xffffu) | (AR_NAN << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint16_t empty_like(uint16_t) { return (uint16_t)AR_EMPTY; }
__device__ __forceinline__ uint4 empty_like(uint4) { return make_uint4(~0u, ~0u, ~0u, ~0u); }

// Slot [parity][src] of a lane on the rank whose lane base is `base`, as T (uint4 or uint16_t).
template <typename T>
__device__ __forceinline__ T* slot(uint64_t base, long long cap, uint32_t parity, int world, int src) {
    return reinterpret_cast<T*>(reinterpret_cast<__nv_bfloat16*>(base) + ((long long)parity * world + src) * cap);
}

// Step 2 for one value: `v` is a first read of `p` (issued early, with others in flight); reads
// again until it is full or the wait gives up, then marks the slot empty for the next use.
template <typename T>
__device__ __forceinline__ T take(T* p, T v, uint32_t* stuck, volatile uint32_t* timed_out) {
    if (!full(v)) {
        const uint64_t start = global_ns();
        while (*((volatile uint32_t*)stuck) == 0) {
            v = ld_sys(p);
            if (full(v)) break;
            if (global_ns() - start > AR_TIMEOUT_NS) {
                *((volatile uint32_t*)stuck) = 1u;
                *timed_out = 1u;
                __threadfence_system();
                break;
            }
        }
    }
    st_sys(p, empty_like(v));
    return v;
}

// The all-reduce of data[0..n) over T-sized units (uint4: 8 bf16, n % 8 == 0; uint16_t: one).
template <typename T>
__device__ __forceinline__ void one_shot(__nv_bfloat16* __restrict__ data, const uint64_t* __restrict__ bufs,
                                         uint32_t e, int rank, int world, long long cap, long long units,
                                         uint32_t* stuck, volatile uint32_t* timed_out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    T* d = reinterpret_cast<T*>(data);
    // 1. Push.
    for (long long i = i0; i < units; i += stride) {
        const T v = sendable(d[i]);
        for (int q = 0; q < world; ++q)
            if (q != rank) st_sys(slot<T>(bufs[q], cap, e & 1, world, rank) + i, v);
    }
    // 2 and 3. Take, sum in rank order, write back.
    for (long long i = i0; i < units; i += stride) {
        const T own = d[i];
        float acc[sizeof(T) / 2];
#pragma unroll
        for (int j = 0; j < (int)(sizeof(T) / 2); ++j) acc[j] = 0.f;
        for (int r = 0; r < world; ++r) {
            T v = own;
            if (r != rank) {
                T* p = slot<T>(bufs[rank], cap, e & 1, world, r) + i;
                v = take(p, ld_sys(p), stuck, timed_out);
            }
            const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
            for (int j = 0; j < (int)(sizeof(T) / 2); ++j) acc[j] += __bfloat162float(h[j]);
        }
        T o;
        __nv_bfloat16* oh = reinterpret_cast<__nv_bfloat16*>(&o);
#pragma unroll
        for (int j = 0; j < (int)(sizeof(T) / 2); ++j) oh[j] = __float2bfloat16(acc[j]);
        d[i] = o;
    }
}

// bufs: every rank's lane base, by rank.
extern "C" __global__ void ar_one_shot(__nv_bfloat16* __restrict__ data, const uint64_t* __restrict__ bufs,
                                       uint32_t* epochs, int rank, int world, long long cap, long long n,
                                       uint32_t* stuck, volatile uint32_t* timed_out) {
    pdl_begin();
    const uint32_t e = next_epoch(epochs);
    if ((n & 7) == 0)
        one_shot<uint4>(data, bufs, e, rank, world, cap, n / 8, stuck, timed_out);
    else
        one_shot<uint16_t>(data, bufs, e, rank, world, cap, n, stuck, timed_out);
}

// common.cuh's warp_sum with add.ftz (block_sum is spelled out in the kernel, per row group).
__device__ __forceinline__ float warp_sum_ftz(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = add_ftz(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// 8 bf16 <-> f32 (low half of a word = lower address), rounding to nearest even.
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// x: [rows, hidden] partial sums in, normalised rows out; residual: [rows, hidden] in and out;
// w: [hidden]. Launched with the lane's fixed grid and AR_THREADS threads; `nt` is the block
// size add_rms_norm runs with for this width (a multiple of 32, nvec = hidden / 8 <= AR_VPT * nt)
// and nvec <= AR_CHUNK (the launcher checks both). `cap` >= rows * hidden.
//
// Layout: the block's rows go through in chunks of up to min(AR_THREADS / nt, AR_CHUNK / nvec)
// rows. For a chunk, every thread holds up to AR_K of its 16-byte vectors (flattened index
// f = t + k * AR_THREADS over the chunk's rows), with their residual, weight and own-value loads
// and then the first reads of each peer's values in flight together; it stores the rounded
// residual sums in shared memory. Then thread group g (threads g * nt .. g * nt + nt - 1) takes chunk row g and does
// exactly what a block of add_rms_norm does with its row (thread tt: vectors tt + j * nt, j <
// AR_VPT; the reduction of block_sum over the group's warps), and each thread scales the
// vectors it holds.
extern "C" __global__ void __launch_bounds__(AR_THREADS)
    ar_add_rms_norm(__nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,
                    const __nv_bfloat16* __restrict__ w, const uint64_t* __restrict__ bufs,
                    uint32_t* epochs, int rank, int world, long long cap,
                    int rows, int hidden, int nt, float eps, uint32_t* stuck, volatile uint32_t* timed_out) {
    __shared__ uint4 sums[AR_CHUNK];  // the chunk's rows of bf16(sum + residual)
    __shared__ float scratch[32];
    __shared__ float inv[AR_THREADS / 32];  // 1 / rms of each chunk row
    pdl_begin();
    const uint32_t e = next_epoch(epochs);
    const int t = threadIdx.x, nvec = hidden >> 3;
    const int G = gridDim.x, b = blockIdx.x;
    const int my_rows = rows > b ? (rows - 1 - b) / G + 1 : 0;  // rows b, b + G, ...
    uint4* xv = reinterpret_cast<uint4*>(x);
    uint4* rv = reinterpret_cast<uint4*>(residual);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    // 1. Push this block's rows of x (possibly none) to every peer, four loads in flight per
    // thread.
    const int total = my_rows * nvec;
    for (int f0 = 0; f0 < total; f0 += 4 * AR_THREADS) {
        uint4 v[4];
        long long at[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int f = f0 + t + k * AR_THREADS;
            if (f < total) {
                const int q = f / nvec;
                at[k] = (long long)(b + q * G) * nvec + (f - q * nvec);
                v[k] = xv[at[k]];
            }
        }
        for (int q = 0; q < world; ++q) {
            if (q == rank) continue;
            uint4* to = slot<uint4>(bufs[q], cap, e & 1, world, rank);
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (f0 + t + k * AR_THREADS < total) st_sys(to + at[k], sendable(v[k]));
        }
    }
    const int chunk = min(AR_THREADS / nt, AR_CHUNK / nvec);
    const int g = t / nt, tt = t - g * nt, nw = nt >> 5, lane = t & 31;
    for (int q0 = 0; q0 < my_rows; q0 += chunk) {
        const int n_rows = min(chunk, my_rows - q0);
        const int cv = n_rows * nvec;
        long long at[AR_K];
        int col[AR_K], crow[AR_K];
        uint4 v[AR_K], wk[AR_K], own[AR_K];  // v: the residual, then the rounded sum
#pragma unroll
        for (int k = 0; k < AR_K; ++k) {
            const int f = t + k * AR_THREADS;
            if (f < cv) {
                crow[k] = f / nvec;
                col[k] = f - crow[k] * nvec;
                at[k] = (long long)(b + (q0 + crow[k]) * G) * nvec + col[k];
                v[k] = rv[at[k]];
                wk[k] = __ldg(wv + col[k]);
                own[k] = xv[at[k]];
            }
        }
        // 2 and 3. Take the peers' values (first reads of all of them in flight together) and
        // sum over the ranks in rank order (as ar_one_shot).
        float acc[AR_K][8];
#pragma unroll
        for (int k = 0; k < AR_K; ++k)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[k][j] = 0.f;
        for (int r = 0; r < world; ++r) {
            uint4 p[AR_K];
            uint4* from = slot<uint4>(bufs[rank], cap, e & 1, world, r);
#pragma unroll
            for (int k = 0; k < AR_K; ++k)
                if (t + k * AR_THREADS < cv) p[k] = r == rank ? own[k] : ld_sys(from + at[k]);
#pragma unroll
            for (int k = 0; k < AR_K; ++k) {
                if (t + k * AR_THREADS < cv) {
                    if (r != rank) p[k] = take(from + at[k], p[k], stuck, timed_out);
                    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&p[k]);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[k][j] += __bfloat162float(h[j]);
                }
            }
        }
        // The all-reduce's bf16 result, then add_rms_norm's residual add.
#pragma unroll
        for (int k = 0; k < AR_K; ++k) {
            const int f = t + k * AR_THREADS;
            if (f < cv) {
                float s[8], rsd[8];
                unpack8(v[k], rsd);
#pragma unroll
                for (int j = 0; j < 8; ++j) s[j] = add_ftz(round_bf16(acc[k][j]), rsd[j]);
                v[k] = pack8(s);  // the rounded sum: what the residual stream holds
                rv[at[k]] = v[k];
                sums[f] = v[k];
            }
        }
        __syncthreads();
        // add_rms_norm's statistics of chunk row g, by group g in add_rms_norm's order.
        float ss = 0.f;
        if (g < n_rows) {
#pragma unroll
            for (int j = 0; j < AR_VPT; ++j) {
                const int i = tt + j * nt;
                if (i < nvec) {
                    float a[8];
                    unpack8(sums[g * nvec + i], a);
#pragma unroll
                    for (int m = 0; m < 8; ++m) ss = fma_ftz(a[m], a[m], ss);
                }
            }
        }
        // block_sum over the group's nw warps (the group's warps are g * nw .. g * nw + nw - 1).
        float tot = warp_sum_ftz(ss);
        if (nw > 1) {
            if (lane == 0) scratch[t >> 5] = tot;
            __syncthreads();
            tot = warp_sum_ftz(lane < nw ? scratch[g * nw + lane] : 0.f);
        }
        if (tt == 0 && g < n_rows) inv[g] = inv_rms_ftz(tot, (float)hidden, eps);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < AR_K; ++k) {
            if (t + k * AR_THREADS < cv) {
                float f[8], gw[8];
                unpack8(v[k], f);
                unpack8(wk[k], gw);
                const float s = inv[crow[k]];
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = mul_ftz(round_bf16(mul_ftz(f[j], s)), gw[j]);
                xv[at[k]] = pack8(f);
            }
        }
        __syncthreads();  // sums, scratch and inv are reused by the next chunk
    }
}

// ar_copy_reduce: the receiving end of the two-rank all-reduce through the copy engines
// (src/cuda/copy_ar.rs), which prefill's row-parallel products use so that the exchange of one
// part of the rows overlaps the product of the next without taking SMs from it. The peer's
// copy engine has written its partial sums into `recv` and then, behind a memory barrier,
// `epoch` into `*flag` (a stream write of the peer's stream). Each block waits until the flag
// reaches `epoch` (wait_peer_flag in flag.cuh), then adds: data = bf16(f32(data) + f32(recv)),
// over 16-byte vectors when n % 8 == 0. Two f32 values sum to the same bits in either order, so both ranks end with the
// same sum, the one NCCL's two-rank all-reduce gives.
extern "C" __global__ void ar_copy_reduce(__nv_bfloat16* __restrict__ data, const __nv_bfloat16* __restrict__ recv,
                                          long long n, const uint32_t* flag, uint32_t epoch, uint32_t* stuck,
                                          volatile uint32_t* timed_out) {
    pdl_begin();
    wait_peer_flag(flag, epoch, stuck, timed_out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if ((n & 7) == 0) {
        uint4* d = reinterpret_cast<uint4*>(data);
        const uint4* r = reinterpret_cast<const uint4*>(recv);
        for (long long i = i0; i < n / 8; i += stride) {
            uint4 a = d[i];
            const uint4 b = __ldcg(r + i);
            __nv_bfloat16* ah = reinterpret_cast<__nv_bfloat16*>(&a);
            const __nv_bfloat16* bh = reinterpret_cast<const __nv_bfloat16*>(&b);
#pragma unroll
            for (int j = 0; j < 8; ++j) ah[j] = __float2bfloat16(__bfloat162float(ah[j]) + __bfloat162float(bh[j]));
            d[i] = a;
        }
    } else {
        for (long long i = i0; i < n; i += stride)
            data[i] = __float2bfloat16(__bfloat162float(data[i]) + __bfloat162float(__ldcg(recv + i)));
    }
}
