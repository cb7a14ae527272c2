// Skinny GEMM for decode (Backend::gemm with few rows): out[m, n] = sum_k x[m, k] * w[n, k] for
// M <= 32 token rows, bf16 in and out, f32 accumulation, rounded once to bf16 at the end. At
// these M the product is a pass over the weight (n * k * 2 bytes) with a few FLOP per byte, so
// the kernel is built to stream w at copy bandwidth; cuBLASLt's tiles waste most of their
// 64..128 rows here.
//
// Work split: CTA b owns the 8 output features n0 = 8b .. 8b+7 (8 rows of w) over the whole K;
// its warps split K into contiguous ranges of 32-wide k tiles. In one k tile, lane (g, t) =
// (lane / 4, lane % 4) loads one 16-byte vector: w[n0 + g][32 kt + 8t .. + 8]. A warp's load
// instruction thus covers 8 rows x 64 contiguous bytes, and each thread issues U such loads (and
// its x loads) before it waits for any. The launcher picks enough warps that a warp's range is
// one batch of U tiles, so the whole weight is requested at once for the small matrices of
// Qwen3-0.6B; for large K and N (Qwen3-8B) it launches 4-warp CTAs, several per SM, whose
// warps loop over batches.
//
// Arithmetic on tensor cores: mma.sync m16n8k16 with A = x (16 token rows, zero past M) and
// B = w^T (8 features), f32 accumulators. The sum over k does not depend on the order of k, so
// the 8 contiguous k a thread loaded stand in for the k positions its fragments hold: with
// logical k l of the mma's 16 mapped to the physical k 8 * ((l % 8) / 2) + 4 s + 2 (l / 8) +
// l % 2 of the 32-wide tile (s = which of the tile's two mma steps), the B fragment of lane
// (g, t) is exactly its 16-byte w vector (step 0: .x .y; step 1: .z .w) and its A fragment is
// the 16-byte vectors x[g][32 kt + 8t ..] and x[g + 8][...] (rows >= M read as zero). So
// every operand comes straight from one 16-byte load, no shuffles and no shared memory.
// x is small and read by every CTA: it goes through L1 (a coherent load, since it is the
// previous kernel's output; see pdl.cuh); w bypasses L1. The first batch of w is requested
// before the kernel waits for its predecessor, so that its DRAM latency overlaps the
// predecessor's end under programmatic dependent launch (src/cuda/launch.rs).
//
// Reduction: each warp writes its 16 x 8 accumulator tile(s) to shared memory in fragment
// order; after one barrier the CTA's threads sum the warps' tiles in a fixed order (so the
// result does not depend on timing) and store the 8 x M outputs as bf16.
//
// One kernel each for M <= 8 (the A fragment's upper rows are known zero: half the x loads and
// registers), M <= 16 and M <= 32 (two m16 tiles). Requirements (checked by the launcher,
// src/cuda/gemm.rs): K % 8 == 0 and x, w 16-byte aligned (every row then starts on a 16-byte
// boundary); any N >= 1; blockDim.x a multiple of 32 within the kernel's launch bound.
//
// Also here: l2_flush, which reads a buffer larger than L2 so that the next kernel finds no
// weight in L2 (cold-cache timing of cuBLASLt's candidate algorithms, gemm.rs).
#include "common.cuh"

// A named namespace: an anonymous one puts a hash of the file's path into the PTX names of its
// shared arrays, so the shipped PTX would differ with the checkout's location.
namespace gemv_impl {

constexpr int ROWS = 8;          // output features per CTA (the mma's N)
constexpr int KT = 32;           // k per tile: 4 lanes x 8 elements
constexpr int RED_FLOAT4 = 1024; // shared-memory reduction buffer: 16 KB

// w comes in through ld_weight (common.cuh): not kept in L1, L2 fetches of 256 bytes (which the
// warp's next loads along the row use), and allowed before pdl_wait().

// 16 bytes of x: shared by every CTA, cached in L1.
__device__ __forceinline__ uint4 ld_act(const bf16* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// d += a * b for one m16n8k16 tile (bf16 operands, f32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// MROWS = the most rows of x the kernel takes: 8 (the A fragment's upper 8 rows are zero and
// never loaded), 16 or 32 (MT = 2 m16 tiles). U = k tiles whose loads a thread issues before
// it waits for any (one batch). SILU: x is the MLP's gate_up, [M, 2K] rows of [gate, up], and
// the product takes silu(gate) * up (silu_mul, as silu_and_mul computes it) as its x row.
template <int MROWS, int U, bool SILU = false>
__device__ __forceinline__ void gemv(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                     bf16* __restrict__ out, int M, int N, int K) {
    constexpr int MT = MROWS <= 16 ? 1 : MROWS / 16;  // m16 tiles
    constexpr bool HI = MROWS > 8;                    // rows g + 8 of a tile can be < M
    static_assert(RED_FLOAT4 % (MT * 32) == 0, "reduction buffer");
    static_assert(!SILU || !HI, "the fused activation takes at most 8 rows");
    const size_t xstride = SILU ? 2 * (size_t)K : (size_t)K;  // elements per x row
    __shared__ float4 red[RED_FLOAT4];  // [warp][MT][lane] accumulator fragments
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;  // <= RED_FLOAT4 / (32 MT), launcher's promise
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * ROWS;
    const int ktiles = (K + KT - 1) / KT;
    const int per = (ktiles + nwarps - 1) / nwarps;
    const int kt_begin = warp * per;
    const int kt_end = min(ktiles, kt_begin + per);
    // Rows past N read row N - 1 (valid memory); their outputs are not stored.
    const bf16* wrow = w + (size_t)min(n0 + g, N - 1) * K + 8 * t;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const uint32_t never = (uint32_t)(M >> 31);  // 0 for every valid M (>= 1)
    pdl_launch_dependents();

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

    for (int kt0 = kt_begin; kt0 < kt_end; kt0 += U) {
        // Every load of the U tiles first (w, the DRAM stream, before x, which L1 or L2
        // serves), then the mma: one memory latency per U tiles.
        uint4 wv[U], xl[U][MT], xh[U][MT], xu[U][MT];
        bool in[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // K % 8 == 0: a lane's 8-element chunk lies wholly inside or outside K.
            in[u] = kt0 + u < kt_end && (kt0 + u) * KT + 8 * t < K;
            wv[u] = in[u] ? ld_weight(wrow + (size_t)(kt0 + u) * KT) : zero;
        }
        // No kernel writes w, so the first batch of it is requested before waiting for the
        // previous kernel (programmatic dependent launch): its DRAM latency overlaps that
        // kernel's end. x, the previous kernel's output, is read only after the wait.
        if (kt0 == kt_begin) pdl_wait();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (kt0 + u) * KT + 8 * t;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int lo = 16 * mt + g, hi = lo + 8;
                xl[u][mt] = in[u] && lo < M ? ld_act(x + lo * xstride + k) : zero;
                xh[u][mt] = HI && in[u] && hi < M ? ld_act(x + hi * xstride + k) : zero;
                // The up half of the row (SILU): K elements after the gate.
                xu[u][mt] = SILU && in[u] && lo < M ? ld_act(x + lo * xstride + K + k) : zero;
            }
        }
        // ptxas schedules each load next to its first use (one memory latency per tile, half
        // the bandwidth, seen at M = 1) whatever the source order. So the first mma is made to
        // depend on every load: `dep & never` is 0 at run time (M >= 1), but ptxas cannot know
        // it, so all loads are issued before the thread waits for any.
        uint32_t dep = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            dep |= wv[u].x;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) dep |= xl[u][mt].x | xh[u][mt].x | xu[u][mt].x;
        }
        wv[0].x |= dep & never;
        if constexpr (SILU) {
            // Rows past M and chunks past K hold zeros in both halves: silu(0) * 0 = 0.
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    float gf[8], uf[8];
                    unpack8(xl[u][mt], gf);
                    unpack8(xu[u][mt], uf);
#pragma unroll
                    for (int e = 0; e < 8; ++e) gf[e] = silu_mul(gf[e], uf[e]);
                    xl[u][mt] = pack8(gf);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint4 a = xl[u][mt], b = xh[u][mt];
                mma_bf16(acc[mt], a.x, b.x, a.y, b.y, wv[u].x, wv[u].y);
                mma_bf16(acc[mt], a.z, b.z, a.w, b.w, wv[u].z, wv[u].w);
            }
        }
    }

    pdl_wait();  // warps without k tiles wait here, before `out` is written
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        red[(warp * MT + mt) * 32 + lane] = make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]);
    __syncthreads();
    const float* redf = reinterpret_cast<const float*>(red);
    for (int j = threadIdx.x; j < MT * 128; j += blockDim.x) {
        // j = (mt, lane l, accumulator i): row (token) 16 mt + l / 4 + 8 (i / 2), column
        // (feature) n0 + 2 (l % 4) + i % 2, the m16n8 accumulator layout.
        const int mt = j >> 7, l = (j >> 2) & 31, i = j & 3;
        float s = 0.f;
        for (int wp = 0; wp < nwarps; ++wp) s += redf[(wp * MT * 32) * 4 + j];
        const int m = 16 * mt + (l >> 2) + ((i & 2) ? 8 : 0);
        const int n = n0 + 2 * (l & 3) + (i & 1);
        if (m < M && n < N) out[(size_t)m * N + n] = __float2bfloat16_rn(s);
    }
}

}  // namespace gemv_impl

using gemv_impl::gemv;

// Launch: grid ceil(N / 8), block 32 * nwarps threads within the launch bound. U = 8 for M <= 8
// (94 registers) and 4 above (72 and 114 registers): measured fastest on an H100 for each.
extern "C" __global__ void __launch_bounds__(512) gemv_m8(const bf16* __restrict__ x,
                                                          const bf16* __restrict__ w,
                                                          bf16* __restrict__ out, int M, int N,
                                                          int K) {
    gemv<8, 8>(x, w, out, M, N, K);
}

// The MLP's down projection with its activation: out = (silu(gate) * up) . w^T for M <= 8
// rows of gate_up ([M, 2K]); U = 4, so that the gate and up loads of a batch fit in registers,
// and up to 24 warps, so that a weight of Qwen3-0.6B's size is still requested in one batch.
extern "C" __global__ void __launch_bounds__(768) gemv_m8_silu(const bf16* __restrict__ gate_up,
                                                               const bf16* __restrict__ w,
                                                               bf16* __restrict__ out, int M,
                                                               int N, int K) {
    gemv<8, 4, true>(gate_up, w, out, M, N, K);
}

extern "C" __global__ void __launch_bounds__(768) gemv_m16(const bf16* __restrict__ x,
                                                           const bf16* __restrict__ w,
                                                           bf16* __restrict__ out, int M, int N,
                                                           int K) {
    gemv<16, 4>(x, w, out, M, N, K);
}

extern "C" __global__ void __launch_bounds__(512) gemv_m32(const bf16* __restrict__ x,
                                                           const bf16* __restrict__ w,
                                                           bf16* __restrict__ out, int M, int N,
                                                           int K) {
    gemv<32, 4>(x, w, out, M, N, K);
}

// Reads n16 16-byte vectors of buf (grid-stride) and discards them; writes only when the
// XOR of everything read equals `never` (which the caller picks so that it does not happen in
// practice; the buffer is scratch either way), so the loads cannot be optimised away.
extern "C" __global__ void l2_flush(uint4* buf, unsigned long long n16, unsigned int never) {
    pdl_begin();
    uint32_t acc = 0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16;
         i += stride) {
        const uint4 v = __ldcg(buf + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == never) buf[threadIdx.x] = make_uint4(acc, acc, acc, acc);
}
