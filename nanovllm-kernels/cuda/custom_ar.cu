// One-shot all-reduce for small messages between the GPUs of one host (decode steps), faster
// than NCCL's ring there because it is one short kernel and one pass over NVLink; and the same
// all-reduce fused with the residual add + RMSNorm that follows it in every decoder layer.
//
// Every rank owns one IPC-shared allocation: two data buffers (used alternately, by call
// parity) and a flags area where peers write. The kernels always run the same fixed grid, so
// block b of every rank owns the same element positions in every call of a kernel. Block b:
//   1. bumps its own epoch counter and copies its elements of the input into this rank's
//      buffer[epoch & 1];
//   2. tells block b of every peer "my elements for this epoch are ready" (a release store
//      into the peer's flag slot [b][rank], after a system-wide fence), and waits until every
//      peer's block b said the same (spinning on the local flags, with a time limit);
//   3. reads its elements of every rank's buffer (peers' over NVLink), sums in f32 in rank
//      order and writes bf16 into the input in place: every rank gets the same bits.
// Two buffers make one barrier per call enough: block b overwrites its elements of the buffer
// of call k only in call k + 2, after the barrier of call k + 1, which no peer's block b
// passes before finishing call k. The counters live in device memory, so the kernel can be
// captured in a CUDA graph and replayed. A peer that never arrives (its process died) ends the
// wait after about five seconds and sets `stuck` (device memory: every later wait is skipped,
// so a dead peer costs one timeout, not one per call) and `timed_out` (host-mapped memory,
// which the host reads after each step and turns into an error).
//
// ar_one_shot is that all-reduce, block b owning a grid-stride range of elements.
//
// ar_add_rms_norm is all_reduce_sum followed by add_rms_norm (norm.cu) in one kernel, with the
// same bits as the two: x (this rank's partial sums, [rows, hidden]) is summed over the ranks
// as above (f32 in rank order, rounded once to bf16), then residual = bf16(sum + residual) and
// x = rms_norm(residual) * w. The norm needs whole rows, so block b owns rows b, b + gridDim,
// ... (steps 1 and 3 move those rows), and a block with no row still bumps its epoch and takes
// part in the barrier. Both kernels share each lane's buffers, flags and epochs, and a lane's
// calls may alternate between them, which maps element i to different blocks from one call to
// the next. The two-buffer argument still holds because it never needed "the same block" but
// only these two facts, both true for every call of either kernel:
//   a. every block of the lane's fixed grid bumps its epoch exactly once per call, so all
//      blocks (of all ranks) agree on the call count and on the parity of every call: the
//      previous use of the buffer that call k writes is call k - 2, whatever blocks wrote and
//      read which elements in it;
//   b. every block takes part in every barrier: when rank R's call k starts, R's call k - 1
//      has completed (stream order; under programmatic dependent launch a call may be
//      scheduled early, but each kernel's pdl_begin() holds it until its predecessor, and so
//      every earlier kernel, has completed), so every block b' of R passed barrier k - 1, so every
//      peer's block b' had started call k - 1 and had therefore finished call k - 2, including
//      every read it made of R's buffer.
// So nothing still reads a buffer element when a later call overwrites it, whichever kernel
// and block read it. (A block that skipped a call with no work would break both: its epoch
// parity would drift from the others', and its missing barrier would leave its peers' reads
// of call k - 2 unordered.)
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

#include "pdl.cuh"

#define AR_MAX_RANKS 8
#define AR_TIMEOUT_NS 5000000000ull
// ar_add_rms_norm: 16-byte vectors per thread and row of add_rms_norm (VPT in norm.cu); its
// threads per block; vectors per thread and chunk; 16-byte vectors of a chunk (so rows of
// hidden <= 8 * AR_CHUNK).
#define AR_VPT 4
#define AR_THREADS 512
#define AR_K 2
#define AR_CHUNK (AR_K * AR_THREADS)

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

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

// Step 2: after this block pushed its elements for epoch `e`, waits until block blockIdx.x of
// every peer has pushed its own (or the time limit ran out). Every thread of the block calls
// it; thread t < world (t != rank) signals and waits for peer t.
__device__ __forceinline__ void barrier(const uint64_t* __restrict__ flags, int rank, int world, uint32_t e,
                                        uint32_t* stuck, volatile uint32_t* timed_out) {
    __syncthreads();
    const int t = threadIdx.x;
    if (t < world && t != rank) {
        // The block's pushed elements are visible system-wide before the flag is.
        __threadfence_system();
        store_release_sys(reinterpret_cast<uint32_t*>(flags[t]) + blockIdx.x * AR_MAX_RANKS + rank, e);
        const uint32_t* slot = reinterpret_cast<const uint32_t*>(flags[rank]) + blockIdx.x * AR_MAX_RANKS + t;
        const uint64_t start = global_ns();
        while (*((volatile uint32_t*)stuck) == 0 && load_acquire_sys(slot) != e) {
            if (global_ns() - start > AR_TIMEOUT_NS) {
                *((volatile uint32_t*)stuck) = 1u;
                *timed_out = 1u;
                __threadfence_system();
                break;
            }
        }
    }
    __syncthreads();
}

extern "C" __global__ void ar_one_shot(__nv_bfloat16* __restrict__ data, const uint64_t* __restrict__ bufs,
                                       const uint64_t* __restrict__ flags, uint32_t* epochs, int rank, int world,
                                       long long cap, long long n, uint32_t* stuck, volatile uint32_t* timed_out) {
    pdl_begin();
    const uint32_t e = next_epoch(epochs);
    const long long off = (long long)(e & 1) * cap;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = (n & 7) == 0;
    __nv_bfloat16* mine = reinterpret_cast<__nv_bfloat16*>(bufs[rank]) + off;
    if (vec) {
        const uint4* s = reinterpret_cast<const uint4*>(data);
        uint4* d = reinterpret_cast<uint4*>(mine);
        for (long long i = i0; i < n / 8; i += stride) d[i] = s[i];
    } else {
        for (long long i = i0; i < n; i += stride) mine[i] = data[i];
    }
    barrier(flags, rank, world, e, stuck, timed_out);
    if (vec) {
        for (long long i = i0; i < n / 8; i += stride) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int r = 0; r < world; ++r) {
                const uint4* src = reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(bufs[r]) + off);
                uint4 v = __ldcv(src + i);
                const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
                for (int k = 0; k < 8; ++k) acc[k] += __bfloat162float(h[k]);
            }
            uint4 o;
            __nv_bfloat16* oh = reinterpret_cast<__nv_bfloat16*>(&o);
#pragma unroll
            for (int k = 0; k < 8; ++k) oh[k] = __float2bfloat16(acc[k]);
            reinterpret_cast<uint4*>(data)[i] = o;
        }
    } else {
        for (long long i = i0; i < n; i += stride) {
            float acc = 0.f;
            for (int r = 0; r < world; ++r) {
                const __nv_bfloat16* src = reinterpret_cast<const __nv_bfloat16*>(bufs[r]) + off;
                acc += __bfloat162float(__ldcv(src + i));
            }
            data[i] = __float2bfloat16(acc);
        }
    }
}

// The f32 instructions norm.cu gets from --use_fast_math (see the top of the file). Written
// without a rounding modifier where norm.cu's PTX has none, so that ptxas treats them alike: it
// contracts div.approx's multiply by 1/hidden and the add of eps into one FFMA.FTZ in both
// kernels (checked in the SASS of both).
__device__ __forceinline__ float add_ftz(float a, float b) {
    float d;
    asm("add.ftz.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
    float d;
    asm("mul.ftz.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

__device__ __forceinline__ float fma_ftz(float a, float b, float c) {
    float d;
    asm("fma.rn.ftz.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}

// rsqrt(ss / hidden + eps) as norm.cu computes it.
__device__ __forceinline__ float inv_rms_ftz(float ss, float hidden, float eps) {
    float d;
    asm("{\n\t.reg .f32 q, m;\n\t"
        "div.approx.ftz.f32 q, %1, %2;\n\t"
        "add.ftz.f32 m, q, %3;\n\t"
        "rsqrt.approx.ftz.f32 %0, m;\n\t}"
        : "=f"(d)
        : "f"(ss), "f"(hidden), "f"(eps));
    return d;
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
// f = t + k * AR_THREADS over the chunk's rows), with their residual and weight loads and the
// loads of two ranks at a time in flight together; it stores the rounded residual sums in shared
// memory. Then thread group g (threads g * nt .. g * nt + nt - 1) takes chunk row g and does
// exactly what a block of add_rms_norm does with its row (thread tt: vectors tt + j * nt, j <
// AR_VPT; the reduction of block_sum over the group's warps), and each thread scales the
// vectors it holds.
extern "C" __global__ void __launch_bounds__(AR_THREADS)
    ar_add_rms_norm(__nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,
                    const __nv_bfloat16* __restrict__ w, const uint64_t* __restrict__ bufs,
                    const uint64_t* __restrict__ flags, uint32_t* epochs, int rank, int world, long long cap,
                    int rows, int hidden, int nt, float eps, uint32_t* stuck, volatile uint32_t* timed_out) {
    __shared__ uint4 sums[AR_CHUNK];  // the chunk's rows of bf16(sum + residual)
    __shared__ float scratch[32];
    __shared__ float inv[AR_THREADS / 32];  // 1 / rms of each chunk row
    pdl_begin();
    const uint32_t e = next_epoch(epochs);
    const long long off = (long long)(e & 1) * cap;
    const int t = threadIdx.x, nvec = hidden >> 3;
    const int G = gridDim.x, b = blockIdx.x;
    const int my_rows = rows > b ? (rows - 1 - b) / G + 1 : 0;  // rows b, b + G, ...
    uint4* xv = reinterpret_cast<uint4*>(x);
    uint4* rv = reinterpret_cast<uint4*>(residual);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    // 1. Push this block's rows of x (possibly none), four loads in flight per thread.
    uint4* mine = reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(bufs[rank]) + off);
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
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (f0 + t + k * AR_THREADS < total) mine[at[k]] = v[k];
    }
    const int chunk = min(AR_THREADS / nt, AR_CHUNK / nvec);
    const int g = t / nt, tt = t - g * nt, nw = nt >> 5, lane = t & 31;
    // 2. happens in the first pass of the loop (which every block makes, rows or not), once
    // this thread's first residual and weight loads are on their way.
    bool waited = false;
    for (int q0 = 0; q0 < my_rows || !waited; q0 += chunk) {
        const int n_rows = max(min(chunk, my_rows - q0), 0);
        const int cv = n_rows * nvec;
        long long at[AR_K];
        int col[AR_K], crow[AR_K];
        uint4 v[AR_K], wk[AR_K];  // v: the residual, then the rounded sum
#pragma unroll
        for (int k = 0; k < AR_K; ++k) {
            const int f = t + k * AR_THREADS;
            if (f < cv) {
                crow[k] = f / nvec;
                col[k] = f - crow[k] * nvec;
                at[k] = (long long)(b + (q0 + crow[k]) * G) * nvec + col[k];
                v[k] = rv[at[k]];
                wk[k] = __ldg(wv + col[k]);
            }
        }
        if (!waited) {
            barrier(flags, rank, world, e, stuck, timed_out);
            waited = true;
        }
        // 3. Sum over the ranks in rank order (as ar_one_shot), two ranks' loads at a time.
        float acc[AR_K][8];
#pragma unroll
        for (int k = 0; k < AR_K; ++k)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[k][j] = 0.f;
        for (int r = 0; r < world; r += 2) {
            const uint4* s0 = reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(bufs[r]) + off);
            const uint4* s1 = r + 1 < world
                                  ? reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(bufs[r + 1]) + off)
                                  : s0;
            uint4 p0[AR_K], p1[AR_K];
#pragma unroll
            for (int k = 0; k < AR_K; ++k) {
                if (t + k * AR_THREADS < cv) {
                    p0[k] = __ldcv(s0 + at[k]);
                    if (r + 1 < world) p1[k] = __ldcv(s1 + at[k]);
                }
            }
#pragma unroll
            for (int k = 0; k < AR_K; ++k) {
                if (t + k * AR_THREADS < cv) {
                    const __nv_bfloat16* h0 = reinterpret_cast<const __nv_bfloat16*>(&p0[k]);
                    const __nv_bfloat16* h1 = reinterpret_cast<const __nv_bfloat16*>(&p1[k]);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[k][j] += __bfloat162float(h0[j]);
                    if (r + 1 < world) {
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[k][j] += __bfloat162float(h1[j]);
                    }
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
