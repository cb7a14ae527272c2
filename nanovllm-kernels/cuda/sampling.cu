// nvcc-flags:
//
// Token sampling (Backend::sample): one token per row of [rows, vocab] bf16 logits, the last
// step of every forward pass. Built WITHOUT --use_fast_math: the Gumbel keys that decide the
// token are evaluated with IEEE division and full-precision logf, as the CPU reference does;
// only the bounds that skip elements use the fast exponentials, with margins.
//
// Per row, with T = temperature, k = top_k, p = top_p (logits that are NaN count as -inf):
// * T == 0 (or any T that is not > 0): argmax, lowest index on ties.
// * T > 0: the Gumbel-max argmax_i (l_i / T - ln(-ln(u_i))) over the candidates (every
//   element without a cut), u_i = word i % 4 of Philox4x32-10 of counter (i / 4, step, 0, 0)
//   keyed by the seed (backend::philox_uniform): each thread takes groups of 8 consecutive
//   logits (one 16-byte load) and draws them with two Philox calls.
//   Two exact bounds keep most elements from their logarithms. The noise is at most 16.64
//   (u <= 1 - 2^-24), so a group whose largest l / T + 17 trails the block's best key cannot
//   win; and an element can only reach the best key b when ln(-ln u) <= l / T - b, so a draw
//   below exp(-exp(gmax / T - b)) (gmax the group's largest logit) is skipped on its Philox
//   word alone. With the best key shared through shared memory, a few elements per row are
//   scored exactly; each thread first scores the largest logit of its first group, so that
//   the bounds skip from the first chunk on. Without a cut the logit bound is tested per half
//   group (the 4 draws of one Philox call, max of the 4 logits), and a warp in which most
//   lanes have a half to draw (a flat distribution: random weights) runs both Philox calls of
//   every lane's group in place and tests the draw floor with one comparison per group; in
//   sparser warps (and with a cut) the groups that pass are queued per warp and drawn 32 at
//   a time, so that with a peaked distribution (a trained model's) only the few groups near
//   the top run Philox, with every lane busy.
// * T > 0 with top-k (k <= 512, top-p or not): the elements at or above a bound on the k-th
//   largest logit (the k-th largest of the threads' maxima) are collected into shared memory
//   in a second pass, ranked there, cut, and drawn (sample_collected). Top-p alone does the
//   same with the 128 most likely tokens when its nucleus lies among them (a trained model's
//   usual case), with the softmax denominator of the whole row from the first pass.
// * Otherwise, with a cut: the candidate set is found by radix selection on the 16-bit order key
//   of the bf16 logits (a 4096-bin histogram of the top 12 bits in shared memory, then 16
//   bins of the low 4 bits inside the chosen bin), by count for top-k and by probability
//   mass softmax((l - max) / T) for top-p; the set is then "key > t, plus the first r
//   elements (by index) whose key equals t", exactly a prefix of the row sorted by
//   (logit desc, index asc), as the CPU reference sorts it. A last pass draws the Gumbel-max
//   over the members, counting ties at t in index order with a block scan.
//
// Layout: blocks of 512 threads. With many rows, one block per row. With fewer rows than
// twice the SM count the unfiltered rows are split over `splits` blocks, each writing its
// (key, index) to a partial buffer that sample_reduce folds; a filtered row is worked by
// its first block alone.
//
// Tensor parallelism (Backend::sample_shard / sample_combine): each rank runs `sample` in shard
// mode on its vocabulary slice of rows without a cut, which gives each row's best (key,
// column) of the slice (sample_reduce_part folds the splits); the ranks exchange those, and
// sample_reduce folds them into the token. The Gumbel-max over the whole row is the best of
// the slices' best keys (lowest column on ties), and every key is computed from the column's
// own draw, so the token is the one the whole row gives, bit for bit.
#include "common.cuh"

#define THREADS 512
#define BINS 4096  // first radix level: the top 12 bits of the 16-bit order key

// Upper bound of the Gumbel noise -ln(-ln(u)) for every u the uniform below returns (16.64 at
// u = 1 - 2^-24); the CPU reference skips with the same bound.
#define GUMBEL_MAX 17.0f

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

// Philox4x32-10 of counter (group, step, 0, 0) under key (k0, k1), all four words: the draws
// of elements 4 group .. 4 group + 3 (backend::philox4x32 / philox_uniform).
__device__ __forceinline__ uint4 philox4(uint32_t group, uint32_t step, uint32_t k0, uint32_t k1) {
    uint32_t c0 = group, c1 = step, c2 = 0, c3 = 0;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint32_t n0 = __umulhi(PHILOX_M1, c2) ^ c1 ^ k0;
        const uint32_t n1 = PHILOX_M1 * c2;
        const uint32_t n2 = __umulhi(PHILOX_M0, c0) ^ c3 ^ k1;
        const uint32_t n3 = PHILOX_M0 * c0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ uint32_t word(const uint4& w, int j) {
    return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
}

// Float <-> int mapping that preserves order under signed integer comparison (atomicMax).
__device__ __forceinline__ int ord_of(float f) {
    const int i = __float_as_int(f);
    return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float float_of(int i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

__device__ __forceinline__ void better(float k, uint32_t i, float& bk, uint32_t& bi) {
    if (k > bk || (k == bk && i < bi)) {
        bk = k;
        bi = i;
    }
}

// The Gumbel key of a logit l whose draw is the Philox word x: l / T - ln(-ln(u)) with
// u = ((x >> 9) + 0.5) / 2^23, in IEEE f32 as the CPU reference computes it. Not inlined: it
// runs for few elements, and one copy keeps the module small (its JIT time at startup).
__device__ __noinline__ float gumbel_key(float l, float t, uint32_t x) {
    const float u = ((float)(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
    return __fdiv_rn(l, t) - logf(-logf(u));
}

// A Philox word below which an element whose logit is at most gmax cannot reach the key
// `bound` (0: no skipping). Its key is l / T - ln(-ln u) < bound once
// u < exp(-exp(gmax / T - bound)); the fast exponentials (a few ulps off) and the rounding of
// the exact key are covered by a margin of 1e-3 + 1e-5 (|gmax / T| + |bound|) on the exponent
// and 1e-6 on the draw. u = (k + 0.5) / 2^23 with k = x >> 9 lies below thr whenever
// k < floor(thr 2^23), i.e. x < floor(thr 2^23) << 9.
__device__ __forceinline__ uint32_t draw_floor_word(float gmax, float inv_t, float bound) {
    const float q = gmax * inv_t;
    const float a = q - bound + 1e-3f + 1e-5f * (fabsf(q) + fabsf(bound));
    if (!(a < 20.f)) return 0u;  // also NaN (infinite q or bound): no skipping
    const float thr = __expf(-__expf(a)) - 1e-6f;
    if (!(thr > 0.f)) return 0u;
    return __float2uint_rd(thr * 8388608.f) << 9;  // thr < 1 - 1e-6: fits in 32 bits
}

// A bf16 logit as f32, NaN read as -inf (the CPU reference's total order).
__device__ __forceinline__ float logit_of(float x) { return isnan(x) ? -INFINITY : x; }

// Element j (0..7) of a group, as a logit; j may be a run-time value.
__device__ __forceinline__ float elem(const uint4& v, int j) {
    const uint32_t w = j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w;
    return logit_of((j & 1) ? bf16_hi(w) : bf16_lo(w));
}

// The Gumbel-max draw of one row.
struct Gumbel {
    float t, inv_t;
    uint32_t step, k0, k1;
    int* best;  // shared: the block's best key so far, as ord_of

    __device__ __forceinline__ float bound(float bk) const {
        return fmaxf(bk, float_of(*(volatile int*)best));
    }

    // Folds the members (bits of `mask`) of the group of 8 logits `v` at element i0 (a
    // multiple of 8) into the thread's (bk, bi), given the Philox words of its two halves
    // (wa: elements i0 .. i0 + 3, wb: i0 + 4 .. i0 + 7; a half without members may hold
    // anything) and gmax, the largest member logit (NaN as -inf). An element is scored
    // exactly only when its word reaches the draw floor of the best key known; when no member
    // word of the group does (nearly always), that takes one comparison.
    __device__ __forceinline__ void settle(int i0, uint32_t mask, const uint4& v, const uint4& wa,
                                           const uint4& wb, float gmax, float& bk,
                                           uint32_t& bi) const {
        uint32_t min_word = draw_floor_word(gmax, inv_t, bound(bk));
        const uint32_t ta = (mask & 0x0fu) ? max(max(wa.x, wa.y), max(wa.z, wa.w)) : 0u;
        const uint32_t tb = (mask & 0xf0u) ? max(max(wb.x, wb.y), max(wb.z, wb.w)) : 0u;
        if (mask == 0u || max(ta, tb) < min_word) return;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (!(mask >> j & 1u)) continue;
            const uint32_t x = word(j < 4 ? wa : wb, j & 3);
            if (x < min_word) continue;
            const float key = gumbel_key(elem(v, j), t, x);
            const uint32_t i = (uint32_t)(i0 + j);
            if (key > bk || (key == bk && i < bi)) {
                bk = key;
                bi = i;
                atomicMax(best, ord_of(key));
                min_word = draw_floor_word(gmax, inv_t, bound(bk));
            }
        }
    }

    // Draws the members (bits of `mask`) of the group of 8 logits `v` at element i0: each half
    // of the group is one Philox call, made only when the mask has a member there.
    __device__ __forceinline__ void draw(int i0, uint32_t mask, const uint4& v, float& bk,
                                         uint32_t& bi) const {
        float gmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (mask >> j & 1u) gmax = fmaxf(gmax, elem(v, j));
        const uint32_t g0 = (uint32_t)i0 >> 2;
        const bool lo = (mask & 0x0fu) != 0u;
        const uint4 wa = philox4(lo ? g0 : g0 + 1u, step, k0, k1);
        uint4 wb = wa;
        if (lo && (mask & 0xf0u)) wb = philox4(g0 + 1u, step, k0, k1);
        settle(i0, mask, v, wa, wb, gmax, bk, bi);
    }
};

// Monotone map of bf16 bits to 16-bit unsigned keys, larger logit first: the order the CPU
// reference ranks candidates by (-0 ranks as +0; callers map NaN to -inf first).
__device__ __forceinline__ uint32_t order_key(float x) {
    uint32_t b = __float_as_uint(x) >> 16;
    if (b == 0x8000u) b = 0u;
    return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
    const uint32_t b = (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
    return __uint_as_float(b << 16);
}

// The top-k path that collects its candidates (sample_collected): at most COLLECT_K, out of at
// most COLLECT_CAP elements collected above a bound.
#define COLLECT_K 512
#define COLLECT_CAP 1024
// Top-p alone first looks for the nucleus among the TOPP_COLLECT most likely tokens.
#define TOPP_COLLECT 128

// gumbel_pass keeps STAGES - 1 of each thread's 16-byte groups in flight (cp.async into
// shared memory, so that no registers wait on them).
#define STAGES 4

struct Smem {
    union {
        int count[BINS];
        float mass[BINS];
        struct {
            uint2 coll[COLLECT_CAP];   // (index, order key) of each collected element
            uint2 sorted[COLLECT_K];   // the top k of them in rank order
            float e[COLLECT_K];        // their softmax weights, for top-p
        } top;
        uint4 ring[STAGES][THREADS];   // gumbel_pass: each thread's groups in flight
    } hist;
    int n_coll;
    int keep;
    int count16[16];
    float mass16[16];
    int iscan[33];
    float fscan[33];
    float red_key[32];
    uint32_t red_idx[32];
    int bin;
    int iabove;
    float fabove;
    uint32_t t_key;
    int r_tie;
    float m;
    int best;  // Gumbel::best
    // Per-warp queue of groups to draw (first element, member mask): at most 31 left over plus
    // 32 new.
    int queue_i0[THREADS / 32][64];
    uint8_t queue_mask[THREADS / 32][64];
};

// f(i, x) for every element i in [lo, hi) of the row, each thread taking 16-byte vectors
// (lo and hi multiples of 8 when vec) with UNROLL loads in flight.
template <int UNROLL, typename F>
__device__ __forceinline__ void for_each(const bf16* __restrict__ row, int lo, int hi, bool vec,
                                         F&& f) {
    if (vec) {
        const int stride = blockDim.x * 8;
        int base = lo + threadIdx.x * 8;
        for (; base + (UNROLL - 1) * stride < hi; base += UNROLL * stride) {
            uint4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = ld16(row + base + u * stride);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float x[8];
                unpack8(v[u], x);
#pragma unroll
                for (int k = 0; k < 8; ++k) f(base + u * stride + k, logit_of(x[k]));
            }
        }
        for (; base < hi; base += stride) {
            float x[8];
            unpack8(ld16(row + base), x);
#pragma unroll
            for (int k = 0; k < 8; ++k) f(base + k, logit_of(x[k]));
        }
    } else {
        for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) f(i, logit_of(bf16_to_f32(row[i])));
    }
}

template <typename T>
__device__ __forceinline__ T warp_incl_scan(T v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
// s holds 33 values.
template <typename T>
__device__ __forceinline__ T block_excl_scan(T v, T* s, T& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const T incl = warp_incl_scan(v);
    T excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = T(0);
    __syncthreads();
    if (lane == 31) s[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const T w = lane < nwarps ? s[lane] : T(0);
        const T wi = warp_incl_scan(w);
        T we = __shfl_up_sync(0xffffffffu, wi, 1);
        if (lane == 0) we = T(0);
        s[lane] = we;
        if (lane == 31) s[32] = wi;
    }
    __syncthreads();
    total = s[32];
    return s[warp] + excl;
}

__device__ __forceinline__ float block_max(float v, float* s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    v = -INFINITY;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) v = fmaxf(v, s[w]);
    return v;
}

template <typename T>
__device__ __forceinline__ T block_total(const T* h, int n, T* s) {
    T local = T(0);
    for (int b = threadIdx.x; b < n; b += blockDim.x) local += h[b];
    T total;
    block_excl_scan(local, s, total);
    return total;
}

// The highest bin b of h[BINS] with sum(h[b..]) >= target; `above` = sum(h[b+1..]).
// When float rounding leaves the target unmet, the lowest non-empty bin.
template <typename T>
__device__ int find_from_top(const T* h, T target, T& above, T* scan, int* s_bin, T* s_above) {
    const int per = BINS / THREADS;
    T local = T(0);
    for (int j = 0; j < per; ++j) local += h[BINS - 1 - (threadIdx.x * per + j)];
    T total;
    T prefix = block_excl_scan(local, scan, total);
    if (threadIdx.x == 0) *s_bin = -1;
    __syncthreads();
    for (int j = 0; j < per; ++j) {
        const int b = BINS - 1 - (threadIdx.x * per + j);
        const T next = prefix + h[b];
        if (prefix < target && next >= target) {
            *s_bin = b;
            *s_above = prefix;
        }
        prefix = next;
    }
    __syncthreads();
    if (*s_bin < 0 && threadIdx.x == 0) {
        T acc = T(0), before = T(0);
        int last = BINS - 1;
        for (int b = BINS - 1; b >= 0; --b)
            if (h[b] > T(0)) {
                last = b;
                before = acc;
                acc += h[b];
            }
        *s_bin = last;
        *s_above = before;
    }
    __syncthreads();
    above = *s_above;
    return *s_bin;
}

// The candidate set of a row under top-k / top-p: every element with key > t_key, plus the
// first r_tie (by index) with key == t_key; r_tie < 0 means all of those.
__device__ void select_candidates(const bf16* __restrict__ row, int vocab, bool vec, float t,
                                  int k, float p, Smem& sm, uint32_t& t_key_out,
                                  int& r_tie_out) {
    const bool use_k = k > 0 && k < vocab;
    const bool use_p = p < 1.f;

    // Pass 1: the row max, and for top-k the count histogram of the top 12 key bits.
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) sm.hist.count[b] = 0;
    __syncthreads();
    float m = -INFINITY;
    for_each<4>(row, 0, vocab, vec, [&](int, float x) {
        m = fmaxf(m, x);
        if (use_k) atomicAdd(&sm.hist.count[order_key(x) >> 4], 1);
    });
    m = block_max(m, sm.fscan);

    // Candidates so far: key > t_key, plus the first r_tie (by index) with key == t_key;
    // r_tie < 0 means every element with key == t_key.
    uint32_t t_key = 0;
    int r_tie = -1;
    if (use_k) {
        int above1;
        const int b1 = find_from_top(sm.hist.count, k, above1, sm.iscan, &sm.bin, &sm.iabove);
        if (threadIdx.x < 16) sm.count16[threadIdx.x] = 0;
        __syncthreads();
        for_each<4>(row, 0, vocab, vec, [&](int, float x) {
            const uint32_t key = order_key(x);
            if ((int)(key >> 4) == b1) atomicAdd(&sm.count16[key & 15], 1);
        });
        __syncthreads();
        if (threadIdx.x == 0) {
            int above = above1, s = 15;
            for (; s > 0; --s) {
                if (above + sm.count16[s] >= k) break;
                above += sm.count16[s];
            }
            const int r = k - above;
            sm.t_key = ((uint32_t)b1 << 4) | (uint32_t)s;
            sm.r_tie = r >= sm.count16[s] ? -1 : r;
        }
        __syncthreads();
        t_key = sm.t_key;
        r_tie = sm.r_tie;
        __syncthreads();
    }

    if (use_p) {
        // Pass 3: probability mass per bin over the candidates.
        for (int b = threadIdx.x; b < BINS; b += blockDim.x) sm.hist.mass[b] = 0.f;
        __syncthreads();
        const float e_t = expf((key_value(t_key) - m) / t);
        for_each<4>(row, 0, vocab, vec, [&](int, float x) {
            const uint32_t key = order_key(x);
            if (key > t_key || (key == t_key && r_tie < 0)) {
                const float e = expf((x - m) / t);
                if (e > 0.f) atomicAdd(&sm.hist.mass[key >> 4], e);  // most of a peaked row is 0
            }
        });
        __syncthreads();
        if (threadIdx.x == 0 && r_tie >= 0) sm.hist.mass[t_key >> 4] += (float)r_tie * e_t;
        __syncthreads();
        const float z = block_total(sm.hist.mass, BINS, sm.fscan);
        const float target = p * z;
        float above2;
        const int b2 = find_from_top(sm.hist.mass, target, above2, sm.fscan, &sm.bin, &sm.fabove);
        // Pass 4: mass and count of each exact key inside that bin.
        if (threadIdx.x < 16) {
            sm.mass16[threadIdx.x] = 0.f;
            sm.count16[threadIdx.x] = 0;
        }
        __syncthreads();
        for_each<4>(row, 0, vocab, vec, [&](int, float x) {
            const uint32_t key = order_key(x);
            if ((int)(key >> 4) == b2 && (key > t_key || (key == t_key && r_tie < 0))) {
                atomicAdd(&sm.mass16[key & 15], expf((x - m) / t));
                atomicAdd(&sm.count16[key & 15], 1);
            }
        });
        __syncthreads();
        if (threadIdx.x == 0) {
            if (r_tie >= 0 && (int)(t_key >> 4) == b2) {
                sm.mass16[t_key & 15] += (float)r_tie * e_t;
                sm.count16[t_key & 15] += r_tie;
            }
            float cum = above2;
            int s = -1, lowest = -1;
            for (int j = 15; j >= 0; --j) {
                if (sm.count16[j] == 0) continue;
                lowest = j;
                if (cum + sm.mass16[j] >= target) {
                    s = j;
                    break;
                }
                cum += sm.mass16[j];
            }
            if (s < 0) {  // rounding: take the whole bin
                s = lowest;
                cum -= sm.mass16[s];
            }
            const uint32_t tp = ((uint32_t)b2 << 4) | (uint32_t)s;
            const float e_p = expf((key_value(tp) - m) / t);
            int need = (int)ceilf((target - cum) / e_p);
            need = max(1, min(need, sm.count16[s]));
            // At t_key with a partial tie set the members are the first r_tie ties, so
            // "all of count16" still means "the first r_tie", not every tie.
            const bool partial_base = tp == t_key && r_tie >= 0;
            sm.t_key = tp;
            sm.r_tie = (!partial_base && need >= sm.count16[s]) ? -1 : need;
        }
        __syncthreads();
        t_key = sm.t_key;
        r_tie = sm.r_tie;
        __syncthreads();
    }

    t_key_out = t_key;
    r_tie_out = r_tie;
}

// One 16-byte group of 8 logits starting at element i (all -inf past hi).
__device__ __forceinline__ uint4 load8(const bf16* __restrict__ row, int i, int hi, bool vec) {
    if (vec && i + 8 <= hi) return ld16(row + i);
    const unsigned short* r = reinterpret_cast<const unsigned short*>(row);
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t lo = i + 2 * j < hi ? r[i + 2 * j] : 0xff80u;
        const uint32_t up = i + 2 * j + 1 < hi ? r[i + 2 * j + 1] : 0xff80u;
        w[j] = lo | (up << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Top-k (k <= COLLECT_K), with or without top-p, or top-p alone (all: k is then the number
// of most likely tokens the nucleus is looked for in), from a collected candidate list: two
// passes over the row instead of the histogram passes of select_candidates. Returns false,
// having drawn nothing, when more than COLLECT_CAP elements pass the bound (many equal
// logits), or (all) when the nucleus reaches past the k most likely tokens or the largest
// logit / T is infinite; the caller then takes the histogram path.
//
// Pass 1: each thread's largest order key (and, for top-p alone, its running max and sum of
// exp(l / T - max), which give the softmax denominator over the whole row). The k-th largest
// of the thread maxima is the k-th largest of k distinct elements, so it cannot exceed the
// k-th largest key of the row: every top-k element has a key at or above the lowest key t0
// of its 12-bit bin (found with the bin histogram of the maxima, 512 atomics). Pass 2
// collects the elements with key >= t0, which is a prefix of the row in rank order. In
// shared memory: each collected element's rank (logit desc, index asc) by counting, the
// first k in rank order, the top-p cut over them as the CPU reference computes it (weights
// exp(l / T - top) in rank order; with top-k their sum in sequence, alone the whole row's;
// keep while the mass before a token is below p), and the Gumbel-max over the members, one
// per thread.
__device__ bool sample_collected(const bf16* __restrict__ row, int vocab, bool vec, int k, float p,
                                 bool all, const Gumbel& g, float& bk, uint32_t& bi, Smem& sm) {
    uint32_t tmax = 0;
    bool any = false;
    float qmax = -INFINITY, qsum = 0.f;  // all: running max of l / T and sum of exp(l / T - it)
    for_each<4>(row, 0, vocab, vec, [&](int, float x) {
        tmax = max(tmax, order_key(x));
        any = true;
        if (all) {
            const float q = x * g.inv_t;
            if (q > qmax) {
                qsum = qsum * __expf(qmax - q) + 1.f;
                qmax = q;
            } else if (q > -INFINITY) {
                qsum += __expf(q - qmax);
            }
        }
    });
    float z_all = 0.f;
    if (all) {
        const float m = block_max(qmax, sm.fscan);
        if (!isfinite(m)) return false;  // uniform; the CPU reference makes no cut then
        float total;
        block_excl_scan(qmax > -INFINITY ? qsum * __expf(qmax - m) : 0.f, sm.fscan, total);
        z_all = total;
    }
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) sm.hist.count[b] = 0;
    if (threadIdx.x == 0) sm.n_coll = 0;
    __syncthreads();
    if (any) atomicAdd(&sm.hist.count[tmax >> 4], 1);
    const int holders = __syncthreads_count(any);
    uint32_t t0 = 0;  // fewer threads than k hold elements: collect everything
    if (holders >= k) {
        int above;
        t0 = (uint32_t)find_from_top(sm.hist.count, k, above, sm.iscan, &sm.bin, &sm.iabove) << 4;
    }
    __syncthreads();  // the histogram's space becomes the collection

    for_each<4>(row, 0, vocab, vec, [&](int i, float x) {
        const uint32_t key = order_key(x);
        if (key >= t0) {
            const int slot = atomicAdd(&sm.n_coll, 1);
            if (slot < COLLECT_CAP) sm.hist.top.coll[slot] = make_uint2((uint32_t)i, key);
        }
    });
    __syncthreads();
    const int n = sm.n_coll;
    if (n > COLLECT_CAP) return false;  // uniform: every thread read the same count

    const int kk = min(k, n);
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const uint2 me = sm.hist.top.coll[c];
        int rank = 0;
        for (int d = 0; d < n; ++d) {
            const uint2 o = sm.hist.top.coll[d];
            rank += (o.y > me.y || (o.y == me.y && o.x < me.x));
        }
        if (rank < kk) sm.hist.top.sorted[rank] = me;
    }
    __syncthreads();

    int keep = kk;
    const float top = __fdiv_rn(key_value(sm.hist.top.sorted[0].y), g.t);
    __syncthreads();  // every thread has read sorted[0] before a fallback reuses the space
    if (all && !isfinite(top)) return false;  // uniform: no cut then, every token a candidate
    if (p < 1.f && isfinite(top)) {
        for (int r = threadIdx.x; r < kk; r += blockDim.x)
            sm.hist.top.e[r] = expf(__fdiv_rn(key_value(sm.hist.top.sorted[r].y), g.t) - top);
        __syncthreads();
        if (threadIdx.x == 0) {
            float z = z_all;
            if (!all)
                for (int r = 0; r < kk; ++r) z += sm.hist.top.e[r];
            float before = sm.hist.top.e[0];
            int m = 1;
            while (m < kk && __fdiv_rn(before, z) < p) before += sm.hist.top.e[m++];
            // All: the nucleus is only known to end here if it ended before the last token
            // collected (or every token was collected).
            sm.keep = all && kk < vocab && !(__fdiv_rn(before, z) >= p) ? -1 : m;
        }
        __syncthreads();
        keep = sm.keep;
        if (keep < 0) return false;
    }
    for (int r = threadIdx.x; r < keep; r += blockDim.x) {
        const uint2 c = sm.hist.top.sorted[r];
        const uint4 w = philox4(c.x >> 2, g.step, g.k0, g.k1);
        better(gumbel_key(key_value(c.y), g.t, word(w, c.x & 3)), c.x, bk, bi);
    }
    return true;
}

// Logits below this cannot win against `bound` (the best key known): l < thr implies
// fl(l / t) + GUMBEL_MAX < bound, with margins (0.5 and a relative 1e-5) for rounding.
// With bound = +inf (a +inf logit) only +inf logits stay, so that ties keep the lowest index.
__device__ __forceinline__ float skip_threshold(float bound, float t) {
    if (isinf(bound)) return bound;
    return (bound - (GUMBEL_MAX + 0.5f) - 1e-5f * fabsf(bound)) * t;
}

// 16-byte copy global -> shared that completes in the background (cp.async, cached in L1
// so that Gumbel::draw's re-read of a queued group usually hits it); commit closes a group
// of copies, wait<N> waits until at most N of this thread's groups are still pending.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A warp's queue of groups to draw (shared memory, one per warp): lanes with a group push it
// (i0 and member mask) in lane order; every 32 groups the warp draws them, one per lane
// (Gumbel::draw, which reloads the group's logits). `qn` is the same in every lane.
struct WarpQueue {
    int* qi;
    uint8_t* qm;
    int qn;
    int lane;
    uint32_t lanes_below;

    __device__ __forceinline__ WarpQueue(Smem& sm, int warp, int lane_)
        : qi(sm.queue_i0[warp]), qm(sm.queue_mask[warp]), qn(0), lane(lane_),
          lanes_below((1u << lane_) - 1u) {}

    // Every lane calls it with its group (mask 0: none) and the warp's ballot of mask != 0.
    __device__ __forceinline__ void push(int i0, uint32_t mask, uint32_t ballot,
                                         const bf16* __restrict__ row, int hi, bool vec,
                                         const Gumbel& g, float& bk, uint32_t& bi) {
        if (mask) {
            const int pos = qn + __popc(ballot & lanes_below);
            qi[pos] = i0;
            qm[pos] = (uint8_t)mask;
        }
        qn += __popc(ballot);
        if (qn >= 32) {  // draw 32 queued groups, one per lane
            __syncwarp();
            const int e = qn - 32 + lane;
            g.draw(qi[e], qm[e], load8(row, qi[e], hi, vec), bk, bi);
            qn -= 32;
            __syncwarp();
        }
    }

    // The groups left at the end of a pass.
    __device__ __forceinline__ void drain(const bf16* __restrict__ row, int hi, bool vec,
                                          const Gumbel& g, float& bk, uint32_t& bi) {
        __syncwarp();
        if (lane < qn) g.draw(qi[lane], qm[lane], load8(row, qi[lane], hi, vec), bk, bi);
    }
};

// The Gumbel-max over the candidates in [lo, hi) (lo a multiple of 8) under a top-k / top-p
// cut: key > t_key, or key == t_key and among the first r_tie such elements by index (all of
// them when r_tie < 0).
//
// Thread tid takes the group of 8 elements [base + 8 tid, + 8) of each chunk of 8 * blockDim
// (so ties count in index order with one block scan per chunk). With 16-byte rows the groups
// of the next STAGES - 1 chunks are in flight into the thread's own slots of a shared ring
// (no barrier needed: each thread reads only what it copied). Its members at or above the
// logit skip threshold of the block's best key form a mask; a group with any is queued per
// warp in shared memory, and the warp draws 32 queued groups at a time, one per lane
// (Gumbel::draw, which reloads the group's logits).
__device__ void gumbel_pass(const bf16* __restrict__ row, int lo, int hi, bool vec,
                            const Gumbel& g, uint32_t t_key, int r_tie, float& bk, uint32_t& bi,
                            Smem& sm) {
    const int stride = blockDim.x * 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    WarpQueue queue(sm, warp, lane);
    int running = 0;
    const int chunks = (hi - lo + stride - 1) / stride;
    // Starts the copy of this thread's group of chunk c (one commit group, empty past the end).
    auto issue = [&](int c) {
        const int i = lo + c * stride + threadIdx.x * 8;
        if (c < chunks && i < hi) cp_async16(&sm.hist.ring[c % STAGES][threadIdx.x], row + i);
        cp_async_commit();
    };
    if (vec) {
#pragma unroll
        for (int c = 0; c < STAGES - 1; ++c) issue(c);
    }
    for (int c = 0; c < chunks; ++c) {
        const int i0 = lo + c * stride + threadIdx.x * 8;
        uint4 cur;
        if (vec) {
            issue(c + STAGES - 1);  // into the slot read in iteration c - 1
            cp_async_wait<STAGES - 1>();
            cur = i0 < hi ? sm.hist.ring[c % STAGES][threadIdx.x]
                          : make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u);
        } else {
            cur = load8(row, i0, hi, false);
        }
        int rank = 0;
        if (r_tie >= 0) {
            int ties = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) ties += (i0 + j < hi && order_key(elem(cur, j)) == t_key);
            int total;
            rank = running + block_excl_scan(ties, sm.iscan, total);
            running += total;
        }
        const float thr = skip_threshold(g.bound(bk), g.t);
        uint32_t mask = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float x = elem(cur, j);
            const uint32_t key = order_key(x);
            bool member = i0 + j < hi && key >= t_key;
            if (member && key == t_key && r_tie >= 0) member = rank++ < r_tie;
            if (member && x >= thr) mask |= 1u << j;
        }
        const uint32_t ballot = __ballot_sync(0xffffffffu, mask != 0u);
        queue.push(i0, mask, ballot, row, hi, vec, g, bk, bi);
    }
    cp_async_wait<0>();  // the ring's space is the histogram's again after the pass
    queue.drain(row, hi, vec, g, bk, bi);
}

// Elementwise maximum of two bf16 pairs; a NaN yields the other operand.
__device__ __forceinline__ uint32_t bf16x2_max(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// The largest of the 4 logits in the words a and b, NaN ignored (NaN when all 4 are).
__device__ __forceinline__ float quad_max(uint32_t a, uint32_t b) {
    const uint32_t m = bf16x2_max(a, b);
    return fmaxf(bf16_lo(m), bf16_hi(m));
}

// A warp draws its chunk in place (gumbel_pass_all) when at least this many of its lanes have
// a group to draw; fewer are queued.
#define DENSE_LANES 20

// The Gumbel-max over every element of [lo, hi) (lo a multiple of 8), without a cut.
//
// The chunks, the ring and the per-warp queue are those of gumbel_pass. First every thread
// scores the largest logit of its first group exactly, and the block's best key is shared
// before the sweep, so that the bounds skip from the first chunk on. The members of a group
// are its halves (4 elements, one Philox call) whose largest logit reaches the logit skip
// threshold (a superset of the elements that can still win, which the exact tests below
// narrow). A warp in which at least DENSE_LANES lanes have members (a flat distribution, or
// the start of the row) draws in place: every lane runs both Philox calls of its group
// straight from the registers it loaded, and settles them with one comparison against the
// draw floor. Sparser warps queue their groups as gumbel_pass does (a peaked distribution,
// where a few groups per row pass).
__device__ void gumbel_pass_all(const bf16* __restrict__ row, int lo, int hi, bool vec,
                                const Gumbel& g, float& bk, uint32_t& bi, Smem& sm) {
    const int stride = blockDim.x * 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    WarpQueue queue(sm, warp, lane);
    const int chunks = (hi - lo + stride - 1) / stride;
    // This thread's group of chunk c is element lo + c * stride + 8 tid; its copy goes to
    // ring slot c % STAGES (one commit group per chunk, empty past the end).
    const bf16* src = row + lo + threadIdx.x * 8;
    uint4* slots = &sm.hist.ring[0][threadIdx.x];
    if (vec) {
#pragma unroll
        for (int c = 0; c < STAGES - 1; ++c) {
            if (lo + c * stride + (int)threadIdx.x * 8 < hi)
                cp_async16(slots + c * THREADS, src + c * stride);
            cp_async_commit();
        }
    }
    {
        const int i0 = lo + threadIdx.x * 8;
        if (i0 < hi) {
            const uint4 v = load8(row, i0, hi, vec);
            int jm = 0;
            float xm = elem(v, 0);
#pragma unroll
            for (int j = 1; j < 8; ++j) {
                const float x = elem(v, j);
                if (i0 + j < hi && x > xm) {
                    xm = x;
                    jm = j;
                }
            }
            const uint32_t i = (uint32_t)(i0 + jm);
            const uint4 w = philox4(i >> 2, g.step, g.k0, g.k1);
            better(gumbel_key(xm, g.t, word(w, (int)(i & 3u))), i, bk, bi);
            atomicMax(g.best, ord_of(bk));
        }
        __syncthreads();
    }
    for (int c = 0; c < chunks; ++c) {
        const int i0 = lo + c * stride + threadIdx.x * 8;
        uint4 cur;
        if (vec) {
            // Chunk c + STAGES - 1 into the slot read in iteration c - 1.
            if (i0 + (STAGES - 1) * stride < hi)
                cp_async16(slots + ((c + STAGES - 1) % STAGES) * THREADS,
                           src + (c + STAGES - 1) * stride);
            cp_async_commit();
            cp_async_wait<STAGES - 1>();
            cur = slots[(c % STAGES) * THREADS];  // stale past hi, where the mask is empty
        } else {
            cur = load8(row, i0, hi, false);
        }
        const float thr = skip_threshold(g.bound(bk), g.t);
        const float fa = quad_max(cur.x, cur.y), fb = quad_max(cur.z, cur.w);
        uint32_t mask = (fa < thr ? 0u : 0x0fu) | (fb < thr ? 0u : 0xf0u);
        if (i0 + 8 > hi) mask &= i0 < hi ? (1u << (hi - i0)) - 1u : 0u;
        const uint32_t ballot = __ballot_sync(0xffffffffu, mask != 0u);
        if (__popc(ballot) >= DENSE_LANES) {
            const uint32_t g0 = (uint32_t)i0 >> 2;
            const uint4 wa = philox4(g0, g.step, g.k0, g.k1);
            const uint4 wb = philox4(g0 + 1u, g.step, g.k0, g.k1);
            const float gmax =
                fmaxf((mask & 0x0fu) ? fa : -INFINITY, (mask & 0xf0u) ? fb : -INFINITY);
            g.settle(i0, mask, cur, wa, wb, gmax, bk, bi);
        } else {
            queue.push(i0, mask, ballot, row, hi, vec, g, bk, bi);
        }
    }
    cp_async_wait<0>();  // the ring's space is the histogram's again after the pass
    queue.drain(row, hi, vec, g, bk, bi);
}

// Block-wide (max key, lowest index on ties); thread 0 gets the result.
__device__ __forceinline__ void block_argmax(float& bk, uint32_t& bi, Smem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float k2 = __shfl_xor_sync(0xffffffffu, bk, o);
        const uint32_t i2 = __shfl_xor_sync(0xffffffffu, bi, o);
        better(k2, i2, bk, bi);
    }
    __syncthreads();
    if (lane == 0) {
        sm.red_key[warp] = bk;
        sm.red_idx[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        bk = lane < nwarps ? sm.red_key[lane] : -INFINITY;
        bi = lane < nwarps ? sm.red_idx[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float k2 = __shfl_xor_sync(0xffffffffu, bk, o);
            const uint32_t i2 = __shfl_xor_sync(0xffffffffu, bi, o);
            better(k2, i2, bk, bi);
        }
    }
}

// logits: [rows, vocab]. With `shard`, the rows are columns col0 .. col0 + vocab of wider rows
// (tensor parallelism: this rank's vocabulary slice, col0 a multiple of 8): every draw and
// index is that of the whole row's column, top-k / top-p are ignored (the caller samples rows
// with a cut from whole rows), and each row's best (key, column) goes to the partials even
// with one split; folded over the ranks' slices they give the token of the whole row.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    sample(const bf16* __restrict__ logits, int vocab, int col0, int shard, const float* __restrict__ temperatures,
           const int* __restrict__ top_k, const float* __restrict__ top_p,
           const unsigned long long* __restrict__ seeds, const unsigned int* __restrict__ steps,
           int splits, unsigned int* __restrict__ out, float* __restrict__ part_key,
           unsigned int* __restrict__ part_idx) {
    pdl_begin();
    __shared__ Smem sm;
    const int row = blockIdx.x / splits, split = blockIdx.x % splits;
    // r[i] is the logit of column i (only columns col0 .. col0 + vocab are read).
    const bf16* r = logits + (size_t)row * vocab - col0;
    const bool vec = ((vocab | col0) & 7) == 0;
    const float t = temperatures[row];
    const int k = top_k[row];
    const float p = top_p[row];
    const bool greedy = !(t > 0.f);
    const bool filtered = !shard && !greedy && ((k > 0 && k < vocab) || p < 1.f);
    const unsigned long long seed = seeds[row];
    const Gumbel g{t, 1.f / t, steps[row], (uint32_t)seed, (uint32_t)(seed >> 32), &sm.best};
    if (threadIdx.x == 0) sm.best = ord_of(-INFINITY);
    __syncthreads();

    float bk = -INFINITY;
    uint32_t bi = 0xffffffffu;
    const int chunk = (((vocab + splits - 1) / splits) + 7) & ~7;
    const int lo = col0 + min(vocab, split * chunk), hi = col0 + min(vocab, split * chunk + chunk);
    if (greedy) {
        for_each<4>(r, lo, hi, vec, [&](int i, float x) { better(x, (uint32_t)i, bk, bi); });
    } else if (!filtered) {
        gumbel_pass_all(r, lo, hi, vec, g, bk, bi, sm);
    } else if (split == 0) {
        const bool cut_k = k > 0 && k < vocab;
        const bool collected =
            cut_k ? k <= COLLECT_K && sample_collected(r, vocab, vec, k, p, false, g, bk, bi, sm)
                  : sample_collected(r, vocab, vec, TOPP_COLLECT, p, true, g, bk, bi, sm);
        if (!collected) {
            uint32_t t_key;
            int r_tie;
            select_candidates(r, vocab, vec, t, k, p, sm, t_key, r_tie);
            gumbel_pass(r, 0, vocab, vec, g, t_key, r_tie, bk, bi, sm);
        }
    }
    block_argmax(bk, bi, sm);
    if (threadIdx.x == 0) {
        if (splits == 1 && !shard) {
            out[row] = bi == 0xffffffffu ? 0u : bi;
        } else {
            part_key[blockIdx.x] = bk;
            part_idx[blockIdx.x] = bi;
        }
    }
}

// The best of the n partials (key, index) of a row: partial s of row r at r * row_step +
// s * part_step (the splits of a row, or the ranks' slices of it).
__device__ __forceinline__ void fold(const float* __restrict__ part_key, const unsigned int* __restrict__ part_idx,
                                     int row, int n, int row_step, int part_step, float& bk, uint32_t& bi) {
    bk = -INFINITY;
    bi = 0xffffffffu;
    for (int s = 0; s < n; ++s) {
        const long long at = (long long)row * row_step + (long long)s * part_step;
        better(part_key[at], part_idx[at], bk, bi);
    }
}

// The token of each of `rows` rows from its n partials.
extern "C" __global__ void sample_reduce(const float* __restrict__ part_key,
                                         const unsigned int* __restrict__ part_idx, int rows, int n,
                                         int row_step, int part_step, unsigned int* __restrict__ out) {
    pdl_begin();
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float bk;
    uint32_t bi;
    fold(part_key, part_idx, row, n, row_step, part_step, bk, bi);
    out[row] = bi == 0xffffffffu ? 0u : bi;
}

// The best (key, index) of each of `rows` rows from its n partials: a rank's slice of the row.
extern "C" __global__ void sample_reduce_part(const float* __restrict__ part_key,
                                              const unsigned int* __restrict__ part_idx, int rows, int n,
                                              int row_step, int part_step, float* __restrict__ out_key,
                                              unsigned int* __restrict__ out_idx) {
    pdl_begin();
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float bk;
    uint32_t bi;
    fold(part_key, part_idx, row, n, row_step, part_step, bk, bi);
    out_key[row] = bk;
    out_idx[row] = bi;
}
