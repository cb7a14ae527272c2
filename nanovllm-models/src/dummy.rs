//! Dummy weights (vLLM's `--load-format dummy`): a [`WeightSource`] that makes up every tensor
//! a model asks for from a seed, so that a model can be built and benchmarked from its
//! `config.json` alone.
//!
//! Values follow Hugging Face's initializer: normal(0, 0.02) for linear and embedding weights,
//! ones for norm weights (names ending in `norm.weight`). Element `i` of tensor `name` is a pure
//! function of `(seed, name, i)`: the SplitMix64 hash of the pair index `i / 2` under a key
//! made of the seed and the name gives two uniforms, and Box-Muller turns them into the pair's
//! two normals. So a rank that asks for its shard gets exactly the elements of the whole tensor
//! it would have sliced, the same model comes out under any tensor-parallel size, and the work
//! splits into independent chunks that run in parallel (rayon).
//!
//! Speed matters (Qwen3-0.6B has 596 M parameters, and a benchmark should not wait on its
//! weights): the logarithm and the sine/cosine of Box-Muller are short polynomials accurate to
//! about 1e-7, far below the bf16 rounding of the result, instead of libm calls; the staging
//! buffers come zeroed from the allocator so that the parallel fill, not a serial memset, takes
//! the page faults.

use half::bf16;
use nanovllm_layers::loader::{host_zeros, WeightSource};
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

/// Standard deviation of linear and embedding weights (Hugging Face's `initializer_range`).
pub const DUMMY_STD: f32 = 0.02;

/// Elements generated per parallel task.
const CHUNK: usize = 1 << 16;

/// Seeded made-up tensors of any name and shape.
#[derive(Clone, Copy, Debug)]
pub struct DummyWeights {
    seed: u64,
    std: f32,
}

impl DummyWeights {
    /// Weights drawn from `seed`, linear and embedding weights with std [`DUMMY_STD`].
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            std: DUMMY_STD,
        }
    }

    /// The hash key of tensor `name`: the seed mixed with an FNV-1a hash of the name, so each
    /// tensor draws an independent stream.
    fn key(&self, name: &str) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        splitmix64(h ^ splitmix64(self.seed))
    }

    /// Fills `out` with elements of tensor `name` (`shape`) narrowed to `start..start + len`
    /// along `dim`, in parallel chunks.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        out: &mut [bf16],
    ) -> Result<()> {
        let Some(&extent) = shape.get(dim) else {
            return Err(self.err(name, format!("cannot narrow dim {dim} of shape {shape:?}")));
        };
        if start.checked_add(len).is_none_or(|end| end > extent) {
            return Err(self.err(
                name,
                format!("slice {start}..{start}+{len} is outside dim {dim} of shape {shape:?}"),
            ));
        }
        let inner: usize = shape[dim + 1..].iter().product();
        let total = self.narrowed_len(name, shape, dim, len)?;
        if out.len() != total {
            return Err(self.err(
                name,
                format!(
                    "a slice {start}..{start}+{len} of dim {dim} of shape {shape:?} has {total} \
                     elements, the buffer {}",
                    out.len()
                ),
            ));
        }
        if name.ends_with("norm.weight") {
            out.par_iter_mut().for_each(|x| *x = bf16::ONE);
            return Ok(());
        }
        let run = len * inner; // contiguous output elements per outer index
        if run == 0 {
            return Ok(());
        }
        let (key, std) = (self.key(name), self.std);
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                // Output element `o` is element `(a * extent + start) * inner + off` of the whole
                // tensor, with `a = o / run` and `off = o % run`.
                let mut o = c * CHUNK;
                let mut done = 0;
                while done < chunk.len() {
                    let (a, off) = (o / run, o % run);
                    let first = (a * extent + start) * inner + off;
                    let take = (run - off).min(chunk.len() - done);
                    fill_range(key, std, first, &mut chunk[done..done + take]);
                    done += take;
                    o += take;
                }
            });
        Ok(())
    }

    /// Elements of `shape` with dimension `dim` cut to `len`, or an error if that overflows.
    fn narrowed_len(&self, name: &str, shape: &[usize], dim: usize, len: usize) -> Result<usize> {
        shape
            .iter()
            .enumerate()
            .try_fold(1usize, |acc, (d, &n)| {
                acc.checked_mul(if d == dim { len } else { n })
            })
            .ok_or_else(|| self.err(name, format!("shape {shape:?} has too many elements")))
    }

    fn err(&self, name: &str, msg: String) -> Error {
        Error::Weights {
            file: self.location(),
            msg: format!("tensor `{name}`: {msg}"),
        }
    }
}

/// SplitMix64's output function: a bijective 64-bit mix, good enough to turn a counter into
/// independent-looking bits.
#[inline]
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `ln(u)` for `u` in `(0, 1]`, to about 1e-7 absolute: `u = 2^e * m` with `m` in
/// `[sqrt(1/2), sqrt(2))`, and `ln(m) = 2 atanh(s)`, `s = (m - 1) / (m + 1)`, by its series to
/// `s^7` (`|s| < 0.172`, so the first term left out is below 4e-8). Branch-free, so that the
/// loops calling it vectorise.
#[inline(always)]
fn fast_ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { 0.5 * m } else { m };
    let e = e + big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let atanh = s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0))));
    e as f32 * std::f32::consts::LN_2 + 2.0 * atanh
}

/// `(sin, cos)` of `2 pi t` for `t` in `[0, 1)`, to about 1e-7: the nearest quarter turn `q`
/// and the remainder `x` in `[-pi/4, pi/4]` by Taylor series to `x^7` / `x^8`, rotated by `q`
/// quarter turns (swap for odd `q`, signs from its bits). Branch-free, like [`fast_ln`].
#[inline(always)]
fn fast_sin_cos_turns(t: f32) -> (f32, f32) {
    let quarters = 4.0 * t;
    let q = (quarters + 0.5) as i32; // round half up; `quarters` is never negative
    let x = (quarters - q as f32) * std::f32::consts::FRAC_PI_2;
    let x2 = x * x;
    let s = x * (1.0 - x2 / 6.0 * (1.0 - x2 / 20.0 * (1.0 - x2 / 42.0)));
    let c = 1.0 - x2 / 2.0 * (1.0 - x2 / 12.0 * (1.0 - x2 / 30.0 * (1.0 - x2 / 56.0)));
    // Rotating (sin x, cos x) by q quarter turns: q = 1 gives (cos x, -sin x), q = 2
    // (-sin x, -cos x), q = 3 (-cos x, sin x). One of each product pair is exactly zero.
    let odd = (q & 1) as f32;
    let (a, b) = (s * (1.0 - odd) + c * odd, c * (1.0 - odd) + s * odd);
    let sign_sin = 1.0 - 2.0 * ((q >> 1) & 1) as f32;
    let sign_cos = 1.0 - 2.0 * (((q + 1) >> 1) & 1) as f32;
    (sign_sin * a, sign_cos * b)
}

/// `x` rounded to the nearest bf16, ties to even (`x` is finite here).
#[inline(always)]
fn to_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    bf16::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
}

/// Box-Muller pairs made per block: enough for the loops over a block to vectorise.
const PAIRS: usize = 128;

/// Standard normals `2 * j0 .. 2 * (j0 + PAIRS)` of the tensor keyed `key`: pair `j`'s two
/// uniforms are the top and middle 24 bits of `splitmix64(key ^ j * odd constant)`, and
/// Box-Muller makes elements `2j` (cosine) and `2j + 1` (sine) of them.
fn normal_block(key: u64, j0: u64, out: &mut [f32; 2 * PAIRS]) {
    let mut u1 = [0f32; PAIRS];
    let mut u2 = [0f32; PAIRS];
    for k in 0..PAIRS {
        let h = splitmix64(key ^ (j0 + k as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
        u1[k] = ((h >> 40) as f32 + 0.5) * (1.0 / 16_777_216.0); // (0, 1)
        u2[k] = ((h >> 16) & 0xff_ffff) as f32 * (1.0 / 16_777_216.0); // [0, 1)
    }
    let mut radius = [0f32; PAIRS];
    for k in 0..PAIRS {
        radius[k] = (-2.0 * fast_ln(u1[k])).sqrt();
    }
    for k in 0..PAIRS {
        let (s, c) = fast_sin_cos_turns(u2[k]);
        out[2 * k] = radius[k] * c;
        out[2 * k + 1] = radius[k] * s;
    }
}

/// Writes elements `first..first + out.len()` of the tensor keyed by `key`, times `std`, into
/// `out`.
fn fill_range(key: u64, std: f32, first: usize, out: &mut [bf16]) {
    let mut block = [0f32; 2 * PAIRS];
    let mut i = first;
    let mut k = 0;
    while k < out.len() {
        normal_block(key, (i / 2) as u64, &mut block);
        let lane = i % 2;
        let n = (2 * PAIRS - lane).min(out.len() - k);
        for (o, x) in out[k..k + n].iter_mut().zip(&block[lane..lane + n]) {
            *o = to_bf16(x * std);
        }
        i += n;
        k += n;
    }
}

impl WeightSource for DummyWeights {
    fn location(&self) -> std::path::PathBuf {
        format!("<dummy weights, seed {}>", self.seed).into()
    }

    /// Every tensor exists.
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        match shape.first() {
            Some(&rows) => self.load_narrow(name, shape, 0, 0, rows),
            None => self.load_narrow(name, &[1], 0, 0, 1),
        }
    }

    fn load_narrow(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<bf16>> {
        let mut out = host_zeros(self.narrowed_len(name, shape, dim, len)?)?;
        self.fill(name, shape, dim, start, len, &mut out)?;
        Ok(out)
    }

    fn load_narrow_into(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        out: &mut [bf16],
    ) -> Result<()> {
        self.fill(name, shape, dim, start, len, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_slices_of_the_whole_tensor() {
        let d = DummyWeights::new(7);
        let shape = [6, 10];
        let full = d.load("w", &shape).unwrap();
        // Rows 2..5 (dim 0).
        assert_eq!(d.load_narrow("w", &shape, 0, 2, 3).unwrap(), full[20..50]);
        // Columns 3..8 (dim 1), every row.
        let cols = d.load_narrow("w", &shape, 1, 3, 5).unwrap();
        let by_hand: Vec<bf16> = (0..6)
            .flat_map(|r| full[r * 10 + 3..r * 10 + 8].iter().copied())
            .collect();
        assert_eq!(cols, by_hand);
    }

    #[test]
    fn chunks_agree_with_one_pass() {
        // Longer than one parallel chunk, narrowed along dim 1 so runs straddle chunks.
        let d = DummyWeights::new(3);
        let shape = [3, 2 * CHUNK + 10];
        let full = d.load("big", &shape).unwrap();
        let mut one_pass = vec![bf16::ZERO; full.len()];
        fill_range(d.key("big"), d.std, 0, &mut one_pass);
        assert_eq!(full, one_pass);
        let part = d.load_narrow("big", &shape, 1, 5, CHUNK + 3).unwrap();
        for r in 0..3 {
            let row = &full[r * shape[1] + 5..r * shape[1] + 5 + CHUNK + 3];
            assert_eq!(&part[r * (CHUNK + 3)..(r + 1) * (CHUNK + 3)], row);
        }
    }

    #[test]
    fn statistics_match_the_initializer() {
        let d = DummyWeights::new(11);
        let w = d
            .load("model.layers.0.mlp.up_proj.weight", &[256, 1024])
            .unwrap();
        let n = w.len() as f64;
        let mean = w.iter().map(|x| x.to_f64()).sum::<f64>() / n;
        let var = w.iter().map(|x| (x.to_f64() - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        // Ones for norms; a different stream per name and per seed.
        assert!(d
            .load("model.norm.weight", &[8])
            .unwrap()
            .iter()
            .all(|&x| x == bf16::ONE));
        let other = d
            .load("model.layers.0.mlp.gate_proj.weight", &[256, 1024])
            .unwrap();
        assert_ne!(w, other);
        let reseeded = DummyWeights::new(12)
            .load("model.layers.0.mlp.up_proj.weight", &[256, 1024])
            .unwrap();
        assert_ne!(w, reseeded);
    }

    #[test]
    fn fast_math_matches_libm() {
        for i in 1..=100_000u32 {
            let u = i as f32 / 100_000.0;
            assert!((fast_ln(u) - u.ln()).abs() < 1e-6, "ln({u})");
            let t = (i - 1) as f32 / 100_000.0;
            let (s, c) = fast_sin_cos_turns(t);
            let (ws, wc) = (std::f32::consts::TAU * t).sin_cos();
            assert!(
                (s - ws).abs() < 1e-6 && (c - wc).abs() < 1e-6,
                "sin_cos({t})"
            );
        }
        // The extremes Box-Muller can meet.
        let tiny = 0.5 / 16_777_216.0f32;
        assert!((fast_ln(tiny) - tiny.ln()).abs() < 1e-5);
        assert_eq!(fast_ln(1.0), 0.0);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        for i in 0..1_000_000u32 {
            let x = f32::from_bits(i.wrapping_mul(2_654_435_761) & 0x7f7f_ffff) * 1e-30;
            for v in [x, -x] {
                assert_eq!(to_bf16(v), bf16::from_f32(v), "{v:e}");
            }
        }
        assert_eq!(
            to_bf16(1.0 + 1.0 / 256.0),
            bf16::from_f32(1.0 + 1.0 / 256.0)
        ); // tie
    }

    #[test]
    fn values_are_normally_distributed() {
        let d = DummyWeights::new(1);
        let n = 1 << 20;
        let w = d.load("w", &[n]).unwrap();
        let z: Vec<f64> = w.iter().map(|x| x.to_f64() / 0.02).collect();
        let within = |k: f64| z.iter().filter(|x| x.abs() < k).count() as f64 / n as f64;
        // Standard normal: 68.27 %, 95.45 %, 99.73 % within 1, 2, 3 sigma.
        assert!((within(1.0) - 0.6827).abs() < 4e-3, "{}", within(1.0));
        assert!((within(2.0) - 0.9545).abs() < 2e-3, "{}", within(2.0));
        assert!((within(3.0) - 0.9973).abs() < 5e-4, "{}", within(3.0));
        // Neighbours (the two halves of a Box-Muller pair included) are uncorrelated.
        let corr = z.windows(2).map(|p| p[0] * p[1]).sum::<f64>() / n as f64;
        assert!(corr.abs() < 5e-3, "lag-1 correlation {corr}");
    }

    #[test]
    fn out_of_range_narrow_is_an_error() {
        let d = DummyWeights::new(0);
        let err = d
            .load_narrow("w", &[4, 4], 0, 3, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`w`") && err.contains("outside"), "{err}");
        assert!(d.load_narrow("w", &[4, 4], 2, 0, 1).is_err());
        assert!(d
            .load_narrow("w", &[usize::MAX, 4], 0, 0, usize::MAX)
            .is_err());
        let mut short = vec![bf16::ZERO; 3];
        assert!(d
            .load_narrow_into("w", &[4, 4], 0, 0, 1, &mut short)
            .is_err());
    }
}
