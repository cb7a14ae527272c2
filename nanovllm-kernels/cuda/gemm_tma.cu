// nvcc-arch: sm_90a
//
// Backend::gemm for decode-sized products, out[m, n] = x[m, k] . w[n, k]^T, with Hopper's tensor
// memory accelerator (TMA) and warpgroup MMA (wgmma, which needs sm_90a). src/cuda/gemm.rs runs
// it instead of cuBLASLt for M = 17..64 (`NANOVLLM_GEMM_TMA=0` turns it off). Its point is
// programmatic dependent launch: cuBLASLt's kernels read their inputs before they could wait
// for their predecessor (docs/perf-notes.md, "cuBLASLt and programmatic dependent launch"), so
// each starts only once the kernel before it has drained; this one fetches its first weight
// tiles (which no kernel writes) while the predecessor finishes, and waits only before it loads
// x.
//
// Layout: a CTA computes 64 * WG output columns (weight rows, wgmma's M: 64 per warpgroup) for
// every token (wgmma's N = NT, the token count rounded up to 16, 32, 64, 128 or 256). Warps
// 0..4 WG - 1 are the MMA warpgroups; one thread of the last warp issues the loads. Each stage
// of the ring holds a (64 * WG) x 64 tile of w and an NT x 64 tile of x (64 bf16 = 128 bytes of
// k per row, stored with TMA's 128-byte swizzle, the layout wgmma's descriptors read), filled by
// two TMA loads that complete on the stage's `full` barrier; the MMA warps release a stage on
// its `empty` barrier once their MMAs of it are done. Rows and k beyond the tensors read as
// zeros. Where a product has too few tiles to fill the GPU, the CTAs of a thread-block cluster
// share a tile, each a contiguous range of K (split-K), and CTA 0 of the cluster adds the
// others' f32 sums in rank order before it rounds to bf16 and stores from registers.
//
// WG = 1 is what the engine runs; WG = 2 (`NANOVLLM_GEMM_TMA_WG=2`, for M > 64, its split-K sums
// through a global workspace) is an experiment that measured slower than cuBLASLt on the split
// shapes (perf-notes.md).
#include "common.cuh"

#define W_ROWS 64
#define K_TILE 64
#define MAX_STAGES 16

// A CUtensorMap made on the host (cuTensorMapEncodeTiled), passed by value.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

// Shared memory of a kernel with WG MMA warpgroups (64 * WG weight rows) and NT tokens (mirrored
// by tma_smem_bytes in src/cuda/gemm.rs): the ring of `stages` stages (a launch argument: the
// launcher sizes it to its shared-memory budget, at most MAX_STAGES), then, with one warpgroup,
// the receive area of split-K (the f32 accumulators of the other CTAs of the cluster, at most
// tma_max_split - 1 of them; with two, those go through a global workspace), with 1 KiB to
// align the ring.
template <int NT, int WG>
struct TmaCfg {
    static constexpr int W_BYTES = W_ROWS * WG * K_TILE * 2;
    static constexpr int X_BYTES = NT * K_TILE * 2;
    static constexpr int STAGE = W_BYTES + X_BYTES;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
    }
}

// One TMA load of a 2D box at (c0 = k, c1 = row) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const TensorMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
}

// wgmma shared-memory descriptor of a K-major tile with 128-byte swizzle: 128-byte rows, groups
// of 8 rows 1024 bytes apart (the stride byte offset), the tile 1024-byte aligned; the start
// address moves by 32 bytes per 16-wide k step inside the 128-byte row.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
           (1ull << 62);
}

template <int NT>
__device__ __forceinline__ void wgmma_bf16(float* d, uint64_t a, uint64_t b);

__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ uint32_t cluster_size() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The address of this CTA's shared-memory `p` in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ uint32_t map_to_rank(const void* p, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem_u32(p)), "r"(rank));
    return r;
}

template <>
__device__ __forceinline__ void wgmma_bf16<16>(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<32>(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<64>(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<128>(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<256>(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b), "r"(1));
}

template <int NT, int WG>
__device__ __forceinline__ void gemm_tma_body(const TensorMap* tw, const TensorMap* tx, bf16* out, float* ws, int m,
                                              int n, int k, int stages) {
    using C = TmaCfg<NT, WG>;
    constexpr int MT = 128 * WG;  // MMA threads
    extern __shared__ uint8_t smem_raw[];
    __shared__ uint64_t full_bar[MAX_STAGES], empty_bar[MAX_STAGES], recv_bar;
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    float* recv = reinterpret_cast<float*>(smem + stages * C::STAGE);
    const int tid = threadIdx.x;
    // Split-K: the CTAs of a cluster share one tile of 64 * WG rows, each a contiguous range of
    // k tiles; CTA 0 of the cluster adds the others' sums (in rank order) and stores the tile.
    const uint32_t rank = cluster_rank(), split = cluster_size();
    const int tile = blockIdx.x / split;
    const int n0 = tile * W_ROWS * WG;
    const int kall = (k + K_TILE - 1) / K_TILE;
    const int kbegin = kall * rank / split, kend = kall * (rank + 1) / split;
    const int ktiles = kend - kbegin;
    auto w_tile = [&](int s) { return smem + s * C::STAGE; };
    auto x_tile = [&](int s) { return smem + s * C::STAGE + C::W_BYTES; };

    pdl_launch_dependents();
    if (tid == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full_bar[s], 1);
            mbar_init(&empty_bar[s], 4 * WG);  // one arrival per MMA warp
        }
        mbar_init(&recv_bar, (split - 1) * MT);  // every MMA thread of the other CTAs
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // The other CTAs arrive on recv_bar only after it is initialised.
    if (split > 1) {
        cluster_sync();
    } else {
        __syncthreads();
    }

    if (tid >= MT) {
        if (tid == MT) {
            asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tw)) : "memory");
            asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tx)) : "memory");
            const int first = ktiles < stages ? ktiles : stages;
            // The weight needs no wait: no kernel writes it.
            for (int kt = 0; kt < first; ++kt) {
                mbar_expect_tx(&full_bar[kt], C::STAGE);
                tma_load(w_tile(kt), tw, (kbegin + kt) * K_TILE, n0, &full_bar[kt]);
            }
            pdl_wait();
            for (int kt = 0; kt < first; ++kt) tma_load(x_tile(kt), tx, (kbegin + kt) * K_TILE, 0, &full_bar[kt]);
            // Stage s of k tile kt is refilled once the MMAs released its previous use (tile
            // kt - stages), the (kt / stages - 1)-th completion of its `empty` barrier.
            for (int kt = first, s = 0, phase = 0; kt < ktiles; ++kt) {
                mbar_wait(&empty_bar[s], phase);
                mbar_expect_tx(&full_bar[s], C::STAGE);
                tma_load(w_tile(s), tw, (kbegin + kt) * K_TILE, n0, &full_bar[s]);
                tma_load(x_tile(s), tx, (kbegin + kt) * K_TILE, 0, &full_bar[s]);
                if (++s == stages) s = 0, phase ^= 1;
            }
        } else {
            pdl_wait();
        }
        return;
    }

    pdl_wait();
    float acc[NT / 2];
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) acc[i] = 0.f;
    // One k tile's MMAs stay in flight while the next tile's are issued (wgmma.wait_group 1);
    // a stage is released once the MMAs that read it are done.
    for (int kt = 0, s = 0, phase = 0, prev = -1; kt < ktiles; ++kt) {
        mbar_wait(&full_bar[s], phase);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        const uint32_t wa = smem_u32(w_tile(s)) + (tid >> 7) * (W_ROWS * K_TILE * 2), xa = smem_u32(x_tile(s));
#pragma unroll
        for (int kk = 0; kk < K_TILE / 16; ++kk) wgmma_bf16<NT>(acc, sw128_desc(wa + kk * 32), sw128_desc(xa + kk * 32));
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        if (prev >= 0 && (tid & 31) == 0) mbar_arrive(&empty_bar[prev]);
        prev = s;
        if (++s == stages) s = 0, phase ^= 1;
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");

    if (split > 1) {
        // The other CTAs' sums, per CTA r (1..split-1) NT / 2 of each MMA thread t at
        // [(r - 1) * NT / 2 + i] * MT + t (stores of one i by the MMA threads are contiguous):
        // one warpgroup sends them into CTA 0's shared memory, two through the global
        // workspace (that tile's part of it). The release of the arrival orders them before.
        float* wsp = ws + static_cast<size_t>(tile) * (split - 1) * (NT / 2) * MT;
        if (rank != 0) {
            if (WG == 1) {
                const uint32_t dst = map_to_rank(recv, 0) + 4u * ((rank - 1) * (NT / 2) * MT + tid);
#pragma unroll
                for (int i = 0; i < NT / 2; ++i)
                    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(dst + 4u * i * MT), "f"(acc[i]) : "memory");
            } else {
#pragma unroll
                for (int i = 0; i < NT / 2; ++i) __stcg(wsp + ((rank - 1) * (NT / 2) + i) * MT + tid, acc[i]);
            }
            asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(map_to_rank(&recv_bar, 0))
                         : "memory");
            return;
        }
        uint32_t done = 0;
        while (!done) {
            asm volatile(
                "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n"
                "selp.u32 %0, 1, 0, p;\n}\n"
                : "=r"(done)
                : "r"(smem_u32(&recv_bar))
                : "memory");
        }
        for (uint32_t r = 1; r < split; ++r) {
#pragma unroll
            for (int i = 0; i < NT / 2; ++i)
                acc[i] += WG == 1 ? recv[((r - 1) * (NT / 2) + i) * MT + tid]
                                  : __ldcg(wsp + ((r - 1) * (NT / 2) + i) * MT + tid);
        }
    }

    // Accumulator fragment of m64nNTk16: warp w of warpgroup g holds rows 64g + 16w.. + 15
    // (weight rows: output columns), lane l rows l/4 and l/4 + 8, columns (tokens) 8j + 2(l%4)
    // and the next.
    const int warp = (tid >> 5) & 3, lane = tid & 31, g = tid >> 7;
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) {
        const int j = i >> 2, q = i & 3;
        const int row = 64 * g + 16 * warp + (lane >> 2) + 8 * (q >> 1);
        const int tok = 8 * j + 2 * (lane & 3) + (q & 1);
        if (tok < m && n0 + row < n) out[static_cast<size_t>(tok) * n + n0 + row] = __float2bfloat16_rn(acc[i]);
    }
}

// gemm_tma_n<NT>: one MMA warpgroup (64 weight rows per CTA); gemm_tma2_n<NT>: two (128).
#define GEMM_TMA(NAME, NT, WG)                                                                            \
    extern "C" __global__ void __launch_bounds__(128 * WG + 32, 1)                                        \
        NAME(const __grid_constant__ TensorMap tw, const __grid_constant__ TensorMap tx, bf16* out, float* ws, \
             int m, int n, int k, int stages) {                                                           \
        gemm_tma_body<NT, WG>(&tw, &tx, out, ws, m, n, k, stages);                                        \
    }

GEMM_TMA(gemm_tma_n16, 16, 1)
GEMM_TMA(gemm_tma_n32, 32, 1)
GEMM_TMA(gemm_tma_n64, 64, 1)
GEMM_TMA(gemm_tma_n128, 128, 1)
GEMM_TMA(gemm_tma_n256, 256, 1)
GEMM_TMA(gemm_tma2_n64, 64, 2)
GEMM_TMA(gemm_tma2_n128, 128, 2)
GEMM_TMA(gemm_tma2_n256, 256, 2)
