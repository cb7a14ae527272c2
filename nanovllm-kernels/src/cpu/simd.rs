//! Inner loops of the CPU backend's GEMM and attention, and the switch that runs them compiled
//! for AVX2+FMA when the CPU has it.
//!
//! The workspace builds for the baseline x86-64 target (SSE2), so a hot function is written
//! once, generic over an [`Isa`] token, and [`multiversion!`] compiles it twice: with
//! [`Plain`], and with [`Avx2`] inside a `#[target_feature(enable = "avx2,fma")]` wrapper,
//! picking one at run time. An `Avx2` token exists only once the CPU has been checked, which is
//! what makes its intrinsics sound to call.
//!
//! The two kernels read their bf16 operand straight from the weights or the KV cache and widen
//! it in registers (a 16-bit shift), accumulating in f32:
//! * [`Isa::dots`] (GEMM for decode, attention scores): dot products of up to 4 f32 rows with
//!   one bf16 row; the bf16 row is loaded once for all of them.
//! * [`Isa::bcast`] (probabilities times values): up to 4 f32 rows times a 16-column strip of a
//!   bf16 matrix, each `a[i][t]` broadcast against row `t` of the strip, 4x16 accumulators in
//!   registers.
//!
//! The AVX2 versions use intrinsics: the auto-vectorizer turns both shapes into shuffles and
//! spills. The plain versions are simple loops (correct on any CPU, not tuned).

use half::bf16;

/// Columns of one [`bcast_rows`] block: two AVX2 vectors of f32.
pub(crate) const LANES: usize = 16;

/// The instruction set a kernel is compiled for.
pub(crate) trait Isa: Copy + Send + Sync {
    /// `out[i] = x[i * ldx..][..w.len()] . w` for `i < ROWS` (1 to 4), accumulated in f32.
    fn dots<const ROWS: usize>(self, x: &[f32], ldx: usize, w: &[bf16]) -> [f32; ROWS];

    /// `out[i][c] = sum_{t < len} a[i][t] * b[t * ldb + c]` for `i < ROWS` (1 to 4) and
    /// `c < 16`, accumulated in f32.
    fn bcast<const ROWS: usize>(
        self,
        a: [&[f32]; ROWS],
        b: &[bf16],
        ldb: usize,
        len: usize,
    ) -> [[f32; LANES]; ROWS];
}

/// Any CPU: plain loops.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plain;

impl Isa for Plain {
    #[inline(always)]
    fn dots<const ROWS: usize>(self, x: &[f32], ldx: usize, w: &[bf16]) -> [f32; ROWS] {
        std::array::from_fn(|i| {
            let mut acc = 0f32;
            for (&a, &b) in x[i * ldx..i * ldx + w.len()].iter().zip(w) {
                acc += a * f32_of(b);
            }
            acc
        })
    }

    #[inline(always)]
    fn bcast<const ROWS: usize>(
        self,
        a: [&[f32]; ROWS],
        b: &[bf16],
        ldb: usize,
        len: usize,
    ) -> [[f32; LANES]; ROWS] {
        let mut out = [[0f32; LANES]; ROWS];
        for t in 0..len {
            let bt = &b[t * ldb..t * ldb + LANES];
            for (o, a) in out.iter_mut().zip(&a) {
                let s = a[t];
                for (o, &b) in o.iter_mut().zip(bt) {
                    *o += s * f32_of(b);
                }
            }
        }
        out
    }
}

/// A CPU with AVX2 and FMA; only [`Avx2::detect`] makes one.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token, if this CPU has AVX2 and FMA (std caches the check).
    #[inline]
    pub(crate) fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Avx2(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    #[inline(always)]
    fn dots<const ROWS: usize>(self, x: &[f32], ldx: usize, w: &[bf16]) -> [f32; ROWS] {
        assert!(ROWS > 0 && x.len() >= (ROWS - 1) * ldx + w.len());
        // SAFETY: the token proves the CPU has AVX2 and FMA; the lengths dots reads were
        // asserted just above.
        unsafe { x86::dots::<ROWS>(x, ldx, w) }
    }

    #[inline(always)]
    fn bcast<const ROWS: usize>(
        self,
        a: [&[f32]; ROWS],
        b: &[bf16],
        ldb: usize,
        len: usize,
    ) -> [[f32; LANES]; ROWS] {
        if len == 0 {
            return [[0f32; LANES]; ROWS];
        }
        assert!(a.iter().all(|r| r.len() >= len) && b.len() >= (len - 1) * ldb + LANES);
        // SAFETY: the token proves the CPU has AVX2 and FMA; the lengths bcast reads were
        // asserted just above.
        unsafe { x86::bcast::<ROWS>(a, b, ldb, len) }
    }
}

/// Defines `$name(simd, args)`, which runs `$imp(isa, args)` compiled for AVX2+FMA with the
/// [`Avx2`] token when `simd` is on and the CPU has both, else with [`Plain`].
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident = $imp:ident / $avx:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $(#[$doc])*
        $vis fn $name(simd: bool, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if let Some(isa) = $crate::cpu::simd::Avx2::detect().filter(|_| simd) {
                // SAFETY: the token exists, so the CPU supports AVX2 and FMA: the only
                // requirement of a `target_feature` function.
                return unsafe { $avx(isa, $($arg),*) };
            }
            let _ = simd;
            $imp($crate::cpu::simd::Plain, $($arg),*)
        }

        /// The AVX2+FMA compilation of the same function.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx(isa: $crate::cpu::simd::Avx2, $($arg: $ty),*) $(-> $ret)? {
            $imp(isa, $($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` in f32 for softmax weights, branch-free so that a loop of it vectorizes: Cody-Waite
/// reduction `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6 Taylor polynomial for `e^r`
/// (relative error below 5e-7 over the whole range, checked by a test) and `2^n` built in the
/// exponent bits.
/// Inputs below -87 (where `e^x` leaves the normal range) give 0; inputs are at most 0 here
/// (scores minus their running max), larger ones are clamped to 88.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        p * scale
    }
}

/// bf16 to f32 by a shift (exact; branch-free so that it vectorizes).
#[inline(always)]
pub(crate) fn f32_of(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// `dst[i] = f32(src[i])`.
#[inline(always)]
pub(crate) fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_of(s);
    }
}

/// For each row `r` in `rows` of `a` (row `r` at `a[r * lda..][..len]`), computes
/// `acc = sum_{t < len} a[r][t] * b[t * ldb..][..16]` and calls `f(r, &acc)`, four rows at a
/// time where it can. `b` must hold `(len - 1) * ldb + 16` elements.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn bcast_rows<I: Isa>(
    isa: I,
    a: &[f32],
    lda: usize,
    rows: std::ops::Range<usize>,
    len: usize,
    b: &[bf16],
    ldb: usize,
    mut f: impl FnMut(usize, &[f32; LANES]),
) {
    let row = |r: usize| &a[r * lda..r * lda + len];
    let mut r = rows.start;
    while r < rows.end {
        match rows.end - r {
            4.. => {
                let acc = isa.bcast::<4>([row(r), row(r + 1), row(r + 2), row(r + 3)], b, ldb, len);
                for (i, acc) in acc.iter().enumerate() {
                    f(r + i, acc);
                }
                r += 4;
            }
            2 | 3 => {
                let acc = isa.bcast::<2>([row(r), row(r + 1)], b, ldb, len);
                for (i, acc) in acc.iter().enumerate() {
                    f(r + i, acc);
                }
                r += 2;
            }
            _ => {
                let [acc] = isa.bcast::<1>([row(r)], b, ldb, len);
                f(r, &acc);
                r += 1;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{f32_of, LANES};

    /// 8 bf16 at `p` as 8 f32 lanes.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at p; loadu has no
        // alignment requirement.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }

    /// Sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot products of `ROWS` f32 rows (`x[i * ldx..][..k]`) with one bf16 row `w[..k]`,
    /// `k = w.len()`.
    ///
    /// # Safety
    /// `x` must hold `(ROWS - 1) * ldx + k` elements; the CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots<const ROWS: usize>(x: &[f32], ldx: usize, w: &[bf16]) -> [f32; ROWS] {
        let k = w.len();
        let mut lo = [_mm256_setzero_ps(); ROWS];
        let mut hi = [_mm256_setzero_ps(); ROWS];
        let body = k - k % 16;
        let mut p = 0;
        while p < body {
            // SAFETY: p + 16 <= k, so the 16 elements read from w and from each row of x are
            // inside the lengths the caller guarantees.
            unsafe {
                let wl = load_bf16x8(w.as_ptr().add(p));
                let wh = load_bf16x8(w.as_ptr().add(p + 8));
                for i in 0..ROWS {
                    let xr = x.as_ptr().add(i * ldx + p);
                    lo[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), wl, lo[i]);
                    hi[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), wh, hi[i]);
                }
            }
            p += 16;
        }
        let mut out = [0f32; ROWS];
        for i in 0..ROWS {
            // SAFETY: register-only AVX operations (safe to call from Rust 1.87 on).
            let mut s = unsafe { hsum(_mm256_add_ps(lo[i], hi[i])) };
            for q in body..k {
                s = x[i * ldx + q].mul_add(f32_of(w[q]), s);
            }
            out[i] = s;
        }
        out
    }

    /// `out[i][c] = sum_{t < len} a[i][t] * b[t * ldb + c]` for `i < ROWS`, `c < 16`.
    ///
    /// # Safety
    /// Each `a[i]` must hold `len` elements and `b` `(len - 1) * ldb + 16`; the CPU must
    /// support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bcast<const ROWS: usize>(
        a: [&[f32]; ROWS],
        b: &[bf16],
        ldb: usize,
        len: usize,
    ) -> [[f32; LANES]; ROWS] {
        let mut lo = [_mm256_setzero_ps(); ROWS];
        let mut hi = [_mm256_setzero_ps(); ROWS];
        for t in 0..len {
            // SAFETY: t < len, so row t of b (16 elements at t * ldb) and a[i][t] are inside
            // the lengths the caller guarantees.
            unsafe {
                let bp = b.as_ptr().add(t * ldb);
                let (bl, bh) = (load_bf16x8(bp), load_bf16x8(bp.add(8)));
                for i in 0..ROWS {
                    let s = _mm256_set1_ps(*a[i].get_unchecked(t));
                    lo[i] = _mm256_fmadd_ps(s, bl, lo[i]);
                    hi[i] = _mm256_fmadd_ps(s, bh, hi[i]);
                }
            }
        }
        let mut out = [[0f32; LANES]; ROWS];
        for i in 0..ROWS {
            // SAFETY: out[i] holds 16 f32: two unaligned 8-lane stores.
            unsafe {
                _mm256_storeu_ps(out[i].as_mut_ptr(), lo[i]);
                _mm256_storeu_ps(out[i].as_mut_ptr().add(8), hi[i]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both compilations of both kernels against plain loops, with lengths that are not
    /// multiples of the vector width.
    fn check_kernels<I: Isa>(isa: I) {
        let (m, k, ldx) = (4, 37, 40);
        let x: Vec<f32> = (0..m * ldx).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<bf16> = (0..k)
            .map(|i| bf16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let want: Vec<f32> = (0..m)
            .map(|i| (0..k).map(|p| x[i * ldx + p] * w[p].to_f32()).sum())
            .collect();
        let d4 = isa.dots::<4>(&x, ldx, &w);
        let d2 = isa.dots::<2>(&x[2 * ldx..], ldx, &w);
        let d1 = isa.dots::<1>(&x[ldx..], ldx, &w);
        for (got, want) in d4.iter().zip(&want).chain(d2.iter().zip(&want[2..])) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        assert!((d1[0] - want[1]).abs() < 1e-4);

        let (len, ldb) = (5, 20);
        let b: Vec<bf16> = (0..len * ldb)
            .map(|i| bf16::from_f32((i as f32 * 0.3).sin()))
            .collect();
        let mut seen = Vec::new();
        bcast_rows(isa, &x, ldx, 0..7usize.min(m), len, &b, ldb, |r, acc| {
            seen.push(r);
            for (c, &got) in acc.iter().enumerate() {
                let want: f32 = (0..len)
                    .map(|t| x[r * ldx + t] * b[t * ldb + c].to_f32())
                    .sum();
                assert!((got - want).abs() < 1e-4, "row {r} col {c}");
            }
        });
        assert_eq!(seen, (0..m).collect::<Vec<_>>());
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn kernels_match_plain_loops() {
        check_kernels(Plain);
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = Avx2::detect() {
            check_kernels(isa);
        }
    }
}
