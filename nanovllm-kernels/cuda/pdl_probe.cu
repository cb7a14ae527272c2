// A producer for checking that a kernel launched after it with programmatic dependent launch
// really waits for it (src/cuda/gemm.rs checks cuBLASLt's kernels this way before letting them
// start early in a CUDA graph). It lets its dependents be scheduled at once, then sleeps for
// `delay_ns` and only then writes x[i] = pattern(i): a dependent that read x before its
// griddepcontrol.wait (or never waits) sees the old contents instead.
#include "common.cuh"
#include "flag.cuh"

// A value per index that no stale buffer holds by chance: (i * 2654435761 mod 2^32) mapped to
// [-0.5, 0.5) in steps of 1/256 (exact in bf16).
__device__ __forceinline__ float probe_pattern(unsigned long long i) {
    const uint32_t h = (uint32_t)i * 2654435761u;
    return (float)(h >> 24) / 256.0f - 0.5f;
}

extern "C" __global__ void pdl_late_fill(bf16* x, unsigned long long n, unsigned long long delay_ns) {
    pdl_begin();
    if (threadIdx.x == 0) {
        const uint64_t start = global_ns();
        while (global_ns() - start < delay_ns) {
        }
    }
    __syncthreads();
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        x[i] = __float2bfloat16_rn(probe_pattern(i));
}

// The deliberately broken consumer the check is shown to catch: copies x to out without
// waiting for its predecessor (scripts/check-pdl.sh exempts kernels named *_nowait).
extern "C" __global__ void pdl_copy_nowait(const bf16* x, bf16* out, unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = x[i];
}

// The same copy done right (waits first): the control that must pass.
extern "C" __global__ void pdl_copy(const bf16* x, bf16* out, unsigned long long n) {
    pdl_begin();
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = x[i];
}
