// nvcc-flags:
//
// Token sampling (Backend::sample): one token per row of [rows, vocab] bf16 logits, the last
// step of every forward pass. Built WITHOUT --use_fast_math: the Gumbel keys must be the
// CPU reference's bit for bit (IEEE division, full-precision logf), or near-ties would flip.
//
// Per row, with T = temperature, k = top_k, p = top_p (logits that are NaN count as -inf):
// * T == 0 (or any T that is not > 0): argmax, lowest index on ties.
// * T > 0, no cut (k <= 0 or k >= vocab, p >= 1): the Gumbel-max
//   argmax_i (l_i / T - ln(-ln(u_i))), u_i = Philox4x32-10 uniform keyed by (seed, step, i),
//   in one pass over the row. The noise is at most 16.64 (u <= 1 - 2^-24), so an element whose
//   l_i / T + 17 trails the best key found so far cannot win and its draw is skipped; the
//   best key is shared through shared memory so that every thread skips against the block's
//   best. With a flat distribution (random weights) nearly every element still needs its
//   draw, and the pass is bound by Philox's integer multiplies rather than by memory.
// * T > 0 with a cut: the candidate set is found by radix selection on the 16-bit order key
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

// First word of Philox4x32-10 of counter (index, step, 0, 0) under key (k0, k1); the same
// function as backend::philox4x32.
__device__ __forceinline__ uint32_t philox_first(uint32_t index, uint32_t step, uint32_t k0,
                                                 uint32_t k1) {
    uint32_t c0 = index, c1 = step, c2 = 0, c3 = 0;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        const uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        const uint32_t n1 = (uint32_t)p1;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        const uint32_t n3 = (uint32_t)p0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    return c0;
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

// ln(-ln(u)) for the draw of element i: u = ((x >> 9) + 0.5) / 2^23 in f32, x the first
// Philox word (backend::philox_uniform). Not inlined: the callers sit in unrolled loops, and
// one copy of the ~110 instructions keeps the module small (its JIT time at startup).
__device__ __noinline__ float gumbel_log(uint32_t i, uint32_t step, uint32_t k0, uint32_t k1) {
    const uint32_t r = philox_first(i, step, k0, k1);
    const float u = ((float)(r >> 9) + 0.5f) * (1.0f / 8388608.0f);
    return logf(-logf(u));
}

// The Gumbel-max draw of one row: key(i) = l_i / T - ln(-ln(u_i)).
struct Gumbel {
    float t;
    uint32_t step, k0, k1;
    int* best;  // shared: the block's best key so far, as ord_of

    // Folds element i (logit l) into the thread's (bk, bi), skipping the draw when even the
    // largest noise could not lift it above the block's best key.
    __device__ __forceinline__ void visit(int i, float l, float& bk, uint32_t& bi) const {
        const float q = __fdiv_rn(l, t);
        const float bound = fmaxf(bk, float_of(*(volatile int*)best));
        if (q + GUMBEL_MAX < bound) return;
        const float key = q - gumbel_log((uint32_t)i, step, k0, k1);
        if (key > bk || (key == bk && (uint32_t)i < bi)) {
            bk = key;
            bi = (uint32_t)i;
            atomicMax(best, ord_of(key));
        }
    }
};

// Monotone map of bf16 bits to 16-bit unsigned keys: the order of f32::total_cmp, which
// the CPU reference ranks candidates by (so -0 < +0).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t b = __float_as_uint(x) >> 16;
    return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
    const uint32_t b = (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
    return __uint_as_float(b << 16);
}

struct Smem {
    union {
        int count[BINS];
        float mass[BINS];
    } hist;
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
    // Per-warp queue of Gumbel candidates (index, logit): at most 31 left over plus 32 new.
    int queue_idx[THREADS / 32][64];
    float queue_val[THREADS / 32][64];
};

// A bf16 logit as f32, NaN read as -inf (the CPU reference's total order).
__device__ __forceinline__ float logit_of(float x) { return isnan(x) ? -INFINITY : x; }

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

// Element j (0..7) of a group, as a logit; j may be a run-time value.
__device__ __forceinline__ float elem(const uint4& v, int j) {
    const uint32_t w = j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w;
    return logit_of((j & 1) ? bf16_hi(w) : bf16_lo(w));
}

// Logits below this cannot win against `bound` (the best key known): l < thr implies
// fl(l / t) + GUMBEL_MAX < bound, with margins (0.5 and a relative 1e-5) for rounding.
// With bound = +inf (a +inf logit) only +inf logits stay, so that ties keep the lowest index.
__device__ __forceinline__ float skip_threshold(float bound, float t) {
    if (isinf(bound)) return bound;
    return (bound - (GUMBEL_MAX + 0.5f) - 1e-5f * fabsf(bound)) * t;
}

// The Gumbel-max over the candidates in [lo, hi): key > t_key, or key == t_key and among the
// first r_tie such elements by index (all of them when r_tie < 0).
//
// Thread tid takes the 8 elements [base + 8 tid, + 8) of each chunk of 8 * blockDim (so ties
// count in index order with one block scan per chunk), loading the next group before scoring
// the current one. A group whose largest logit is below the skip threshold of the block's best
// key costs one comparison. Elements that survive are queued per warp in shared memory and
// drawn 32 at a time, so a warp runs Philox with all lanes busy instead of once per lane that
// happens to need it.
__device__ void gumbel_pass(const bf16* __restrict__ row, int lo, int hi, bool vec,
                            const Gumbel& g, uint32_t t_key, int r_tie, float& bk, uint32_t& bi,
                            Smem& sm) {
    const int stride = blockDim.x * 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t lanes_below = (1u << lane) - 1u;
    int* qi = sm.queue_idx[warp];
    float* qv = sm.queue_val[warp];
    int qn = 0;  // queued entries, the same in every lane of the warp
    int running = 0;
    uint4 nxt = load8(row, lo + threadIdx.x * 8, hi, vec);
    for (int base = lo; base < hi; base += stride) {
        const int i0 = base + threadIdx.x * 8;
        const uint4 cur = nxt;
        if (base + stride < hi) nxt = load8(row, i0 + stride, hi, vec);
        int rank = 0;
        if (r_tie >= 0) {
            int ties = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) ties += (i0 + j < hi && order_key(elem(cur, j)) == t_key);
            int total;
            rank = running + block_excl_scan(ties, sm.iscan, total);
            running += total;
        }
        const float thr = skip_threshold(fmaxf(bk, float_of(*(volatile int*)g.best)), g.t);
        float gmax = -INFINITY;
        uint32_t kmax = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float x = elem(cur, j);
            gmax = fmaxf(gmax, x);
            kmax = max(kmax, order_key(x));
        }
        // i0 >= hi: the group is padding (-inf keys) and never holds a member.
        const bool maybe = i0 < hi && gmax >= thr && kmax >= t_key;
        if (!__any_sync(0xffffffffu, maybe)) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int i = i0 + j;
            const float x = elem(cur, j);
            const uint32_t key = order_key(x);
            bool member = i < hi && key >= t_key;
            if (member && key == t_key && r_tie >= 0) member = rank++ < r_tie;
            const bool cand = member && x >= thr;
            const uint32_t ballot = __ballot_sync(0xffffffffu, cand);
            if (cand) {
                const int pos = qn + __popc(ballot & lanes_below);
                qi[pos] = i;
                qv[pos] = x;
            }
            qn += __popc(ballot);
            if (qn >= 32) {  // draw 32 queued candidates, one per lane
                __syncwarp();
                g.visit(qi[qn - 32 + lane], qv[qn - 32 + lane], bk, bi);
                qn -= 32;
                __syncwarp();
            }
        }
    }
    __syncwarp();
    if (lane < qn) g.visit(qi[lane], qv[lane], bk, bi);
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

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    sample(const bf16* __restrict__ logits, int vocab, const float* __restrict__ temperatures,
           const int* __restrict__ top_k, const float* __restrict__ top_p,
           const unsigned long long* __restrict__ seeds, const unsigned int* __restrict__ steps,
           int splits, unsigned int* __restrict__ out, float* __restrict__ part_key,
           unsigned int* __restrict__ part_idx) {
    __shared__ Smem sm;
    const int row = blockIdx.x / splits, split = blockIdx.x % splits;
    const bf16* r = logits + (size_t)row * vocab;
    const bool vec = (vocab & 7) == 0;
    const float t = temperatures[row];
    const int k = top_k[row];
    const float p = top_p[row];
    const bool greedy = !(t > 0.f);
    const bool filtered = !greedy && ((k > 0 && k < vocab) || p < 1.f);
    const unsigned long long seed = seeds[row];
    const Gumbel g{t, steps[row], (uint32_t)seed, (uint32_t)(seed >> 32), &sm.best};
    if (threadIdx.x == 0) sm.best = ord_of(-INFINITY);
    __syncthreads();

    float bk = -INFINITY;
    uint32_t bi = 0xffffffffu;
    const int chunk = (((vocab + splits - 1) / splits) + 7) & ~7;
    const int lo = min(vocab, split * chunk), hi = min(vocab, lo + chunk);
    if (greedy) {
        for_each<4>(r, lo, hi, vec, [&](int i, float x) { better(x, (uint32_t)i, bk, bi); });
    } else if (!filtered) {
        gumbel_pass(r, lo, hi, vec, g, 0u, -1, bk, bi, sm);  // key >= 0: every element
    } else if (split == 0) {
        uint32_t t_key;
        int r_tie;
        select_candidates(r, vocab, vec, t, k, p, sm, t_key, r_tie);
        gumbel_pass(r, 0, vocab, vec, g, t_key, r_tie, bk, bi, sm);
    }
    block_argmax(bk, bi, sm);
    if (threadIdx.x == 0) {
        if (splits == 1) {
            out[row] = bi == 0xffffffffu ? 0u : bi;
        } else {
            part_key[blockIdx.x] = bk;
            part_idx[blockIdx.x] = bi;
        }
    }
}

// Folds the per-split (key, index) partials of each row, in split order.
extern "C" __global__ void sample_reduce(const float* __restrict__ part_key,
                                         const unsigned int* __restrict__ part_idx, int rows,
                                         int splits, unsigned int* __restrict__ out) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float bk = -INFINITY;
    uint32_t bi = 0xffffffffu;
    for (int s = 0; s < splits; ++s)
        better(part_key[row * splits + s], part_idx[row * splits + s], bk, bi);
    out[row] = bi == 0xffffffffu ? 0u : bi;
}
