// Row gathers: the token embedding (Backend::embedding, first op of the forward pass, with
// the vocab-parallel mask) and the last-token gather before the LM head (Backend::gather_rows).
//
// Layout: one block per output row, 16-byte vectors when the width is a multiple of 8.
// An id outside the table (embedding: outside this rank's vocab shard; gather: outside x)
// gives a row of zeros; for the embedding that is the tensor-parallel mask (the all-reduce
// then sums the one rank that holds the row), for the gather it keeps a bad index from
// reading out of bounds.
#include "common.cuh"

__device__ __forceinline__ void copy_row(const bf16* __restrict__ src, bf16* __restrict__ dst,
                                         int width) {
    if ((width & 7) == 0) {
        for (int i = threadIdx.x; i < (width >> 3); i += blockDim.x) {
            const uint4 v = src ? ld16_stream(src + (size_t)i * 8) : make_uint4(0, 0, 0, 0);
            st16(dst + (size_t)i * 8, v);
        }
    } else {
        for (int i = threadIdx.x; i < width; i += blockDim.x)
            dst[i] = src ? src[i] : __float2bfloat16_rn(0.f);
    }
}

extern "C" __global__ void embedding(const unsigned int* __restrict__ ids,
                                     const bf16* __restrict__ weight, unsigned int vocab_start,
                                     unsigned int vocab_rows, int hidden, bf16* __restrict__ out) {
    pdl_begin();
    const unsigned int id = ids[blockIdx.x];
    // `id - vocab_start` wraps for ids below the shard, so one comparison covers both ends.
    const unsigned int local = id - vocab_start;
    const bf16* src = local < vocab_rows ? weight + (size_t)local * hidden : nullptr;
    copy_row(src, out + (size_t)blockIdx.x * hidden, hidden);
}

extern "C" __global__ void gather_rows(const bf16* __restrict__ x, long long x_rows,
                                       const int* __restrict__ indices, int width,
                                       bf16* __restrict__ out) {
    pdl_begin();
    const int idx = indices[blockIdx.x];
    const bf16* src = (idx >= 0 && idx < x_rows) ? x + (size_t)idx * width : nullptr;
    copy_row(src, out + (size_t)blockIdx.x * width, width);
}
