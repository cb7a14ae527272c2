// nvcc-flags: --use_fast_math
//
// SiLU-and-multiply of the MLP (Backend::silu_and_mul): out = silu(gate) * up, where each row
// of gate_up is [gate(inter), up(inter)], the output of the fused gate/up projection.
//
// Layout: blockIdx.y walks rows, blockIdx.x * blockDim.x + threadIdx.x is a 16-byte vector
// of the row (8 elements): each thread reads one vector of gate and the matching vector of
// up and writes one vector of out, all coalesced. inter % 8 != 0 takes a scalar path.
//
// Numerics (the CPU reference's): silu(g) = g / (1 + exp(-g)) in f32, rounded to bf16 (the
// activation's output dtype), times up in f32, rounded to bf16 (silu_mul in common.cuh, which
// the down projection's fused form in gemv.cu shares).
#include "common.cuh"

extern "C" __global__ void silu_and_mul(const bf16* __restrict__ gate_up, bf16* __restrict__ out,
                                        int n, int inter) {
    pdl_begin();
    for (int row = blockIdx.y; row < n; row += gridDim.y) {
        const bf16* g = gate_up + (size_t)row * 2 * inter;
        const bf16* u = g + inter;
        bf16* o = out + (size_t)row * inter;
        if ((inter & 7) == 0) {
            const int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < (inter >> 3)) {
                float a[8], b[8];
                unpack8(ld16_stream(g + (size_t)i * 8), a);
                unpack8(ld16_stream(u + (size_t)i * 8), b);
#pragma unroll
                for (int k = 0; k < 8; ++k) a[k] = silu_mul(a[k], b[k]);
                st16(o + (size_t)i * 8, pack8(a));
            }
        } else {
            for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += gridDim.x * blockDim.x)
                o[i] = __float2bfloat16_rn(silu_mul(bf16_to_f32(g[i]), bf16_to_f32(u[i])));
        }
    }
}
