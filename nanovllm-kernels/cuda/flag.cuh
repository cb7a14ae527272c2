// Waiting for a peer GPU's flag, shared by the kernels that receive what a peer's copy engine
// wrote (custom_ar.cu's ar_copy_reduce, norm.cu's add_rms_norm_recv) and the one-shot
// all-reduce's polling loads: the peer writes `epoch` into `*flag` (a stream memory write of
// its stream, behind a barrier that makes its copies visible first). A peer that never writes
// (its process died) ends the wait after AR_TIMEOUT_NS and raises `stuck` (device memory:
// every later wait is skipped, so a dead peer costs one timeout, not one per call) and
// `timed_out` (host-mapped memory, which the host reads after each step and turns into an
// error).
#pragma once

#include <stdint.h>

#define AR_TIMEOUT_NS 5000000000ull

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Thread 0 of the block waits until `*flag` has reached `epoch` (or the wait gives up); the
// block's barrier then orders every thread's reads of the received data after it. Every
// thread of the block calls it.
__device__ __forceinline__ void wait_peer_flag(const uint32_t* flag, uint32_t epoch, uint32_t* stuck,
                                               volatile uint32_t* timed_out) {
    if (threadIdx.x == 0) {
        const uint64_t start = global_ns();
        while (*((volatile uint32_t*)stuck) == 0) {
            uint32_t f;
            asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(f) : "l"(flag) : "memory");
            if ((int32_t)(f - epoch) >= 0) break;
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
