// One-shot all-reduce for small messages between the GPUs of one host (decode steps), faster
// than NCCL's ring there because it is one short kernel and one pass over NVLink.
//
// Every rank owns one IPC-shared allocation: two data buffers (used alternately, by call
// parity) and a flags area where peers write. The kernel always runs the same fixed grid, so
// block b of every rank owns the same element positions in every call. Block b:
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
#include <cuda_bf16.h>
#include <stdint.h>

#define AR_MAX_RANKS 8
#define AR_TIMEOUT_NS 5000000000ull

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

extern "C" __global__ void ar_one_shot(__nv_bfloat16* __restrict__ data, const uint64_t* __restrict__ bufs,
                                       const uint64_t* __restrict__ flags, uint32_t* epochs, int rank, int world,
                                       long long cap, long long n, uint32_t* stuck, volatile uint32_t* timed_out) {
    __shared__ uint32_t e;
    if (threadIdx.x == 0) {
        e = epochs[blockIdx.x] + 1;
        epochs[blockIdx.x] = e;
    }
    __syncthreads();
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
