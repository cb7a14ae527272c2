// Writes the k and v heads of each new token into the paged KV cache (Backend::store_kvcache),
// once per layer before attention. Slot s is row s of the [num_blocks * block_size,
// num_kv_heads * head_dim] view of each cache; slot_mapping[i] == -1 (a token whose KV is
// already cached, or padding) skips row i. Slots beyond the cache are skipped too: a kernel
// cannot return an error, and the CPU reference refuses them.
//
// Layout: one block per token; its threads copy the row's k heads then its v heads in 16-byte
// vectors (head_dim % 8 == 0), each warp moving 512 contiguous bytes.
#include "common.cuh"

extern "C" __global__ void store_kvcache(const bf16* __restrict__ qkv, int qkv_width, int k_offset,
                                         int kv_width, const int* __restrict__ slot_mapping,
                                         bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                         long long num_slots) {
    pdl_begin();
    const int slot = slot_mapping[blockIdx.x];
    if (slot < 0 || slot >= num_slots) return;
    const bf16* k = qkv + (size_t)blockIdx.x * qkv_width + k_offset;
    const bf16* v = k + kv_width;
    bf16* kd = k_cache + (size_t)slot * kv_width;
    bf16* vd = v_cache + (size_t)slot * kv_width;
    if ((kv_width & 7) == 0 && (qkv_width & 7) == 0 && (k_offset & 7) == 0) {
        const int nvec = kv_width >> 3;
        for (int i = threadIdx.x; i < 2 * nvec; i += blockDim.x) {
            if (i < nvec) st16(kd + (size_t)i * 8, ld16_stream(k + (size_t)i * 8));
            else st16(vd + (size_t)(i - nvec) * 8, ld16_stream(v + (size_t)(i - nvec) * 8));
        }
    } else {
        for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
            kd[i] = k[i];
            vd[i] = v[i];
        }
    }
}
