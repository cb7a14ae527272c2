//! The CPU sampler: one token per row of logits, greedy or by the Gumbel-max trick over the
//! top-k / top-p candidates, with the counter-based Philox draws the CUDA sampler uses, so that
//! both backends draw the same token for the same (seed, step).
//!
//! Two exact shortcuts keep it cheap without changing the result (the argmax over every
//! candidate's score):
//! * The Gumbel noise `-ln(-ln(u))` is bounded above ([`GUMBEL_MAX`]) because `u` never
//!   exceeds `1 - 2^-24`, so a token whose `logit / T` trails the best score found so far by
//!   more than that bound cannot win: with a peaked distribution most of the vocabulary is
//!   skipped.
//! * Over the whole vocabulary (no top-k or top-p cut), the draws are computed 8 at a time in
//!   vector registers, and a draw too small to win even for the most likely token
//!   ([`draw_floor`]) skips its two logarithms: with a flat distribution (random weights)
//!   nearly every draw is skipped that way.

use half::bf16;
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

use super::simd::{f32_of, multiversion, Isa};
use super::{numel, prefix, prefix_mut};
use crate::backend::philox_uniform;

/// Upper bound of the Gumbel noise `-ln(-ln(u))` over every `u` that
/// [`philox_uniform`] returns (at most `1 - 2^-24`, where the noise is 16.64).
const GUMBEL_MAX: f32 = 17.0;

/// The per-row sampling inputs, as host slices.
pub(super) struct SampleParams<'a> {
    pub(super) temperatures: &'a [f32],
    pub(super) top_k: &'a [i32],
    pub(super) top_p: &'a [f32],
    pub(super) seeds: &'a [u64],
    pub(super) steps: &'a [u32],
}

/// Draws one token per row of `logits` (see [`crate::Backend::sample`]).
///
/// `temperatures[r]` must be finite and `>= 0` and `top_p[r]` in `(0, 1]`; `top_k[r] <= 0`
/// means no top-k cut, like 0.
pub(super) fn sample(
    logits: &[bf16],
    rows: usize,
    vocab: usize,
    params: SampleParams<'_>,
    out: &mut [u32],
) -> Result<()> {
    const OP: &str = "sample";
    let logits = prefix(OP, "logits", logits, numel(OP, "logits", &[rows, vocab])?)?;
    let temperatures = prefix(OP, "temperatures", params.temperatures, rows)?;
    let top_k = prefix(OP, "top_k", params.top_k, rows)?;
    let top_p = prefix(OP, "top_p", params.top_p, rows)?;
    let seeds = prefix(OP, "seeds", params.seeds, rows)?;
    let steps = prefix(OP, "steps", params.steps, rows)?;
    let out = prefix_mut(OP, "out", out, rows)?;
    if rows == 0 {
        return Ok(());
    }
    if vocab == 0 || u32::try_from(vocab).is_err() {
        return Err(Error::Other(format!(
            "op {OP}: vocab ({vocab}) must be between 1 and 2^32 - 1"
        )));
    }
    for r in 0..rows {
        let t = temperatures[r];
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::Other(format!(
                "op {OP}: temperatures[{r}] = {t} must be finite and >= 0"
            )));
        }
        let p = top_p[r];
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::Other(format!(
                "op {OP}: top_p[{r}] = {p} must be in (0, 1]"
            )));
        }
    }
    out.par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .for_each(|(r, (o, row))| {
            *o = if temperatures[r] == 0.0 {
                argmax(row)
            } else {
                let k = match usize::try_from(top_k[r]) {
                    Ok(k) if k > 0 && k < vocab => k,
                    _ => vocab,
                };
                sample_row(row, temperatures[r], k, top_p[r], seeds[r], steps[r])
            };
        });
    Ok(())
}

/// A logit as f32, NaN read as -inf so that every comparison is a total order.
#[inline]
fn logit(row: &[bf16], i: u32) -> f32 {
    let v = f32_of(row[i as usize]);
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// Index of the largest logit, the lowest one on ties.
fn argmax(row: &[bf16]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for i in 0..row.len() as u32 {
        let v = logit(row, i);
        if v > best.0 {
            best = (v, i);
        }
    }
    best.1
}

/// Gumbel-max over the candidates of one row (top-k cut to `k`, top-p cut to `top_p`).
fn sample_row(row: &[bf16], t: f32, k: usize, top_p: f32, seed: u64, step: u32) -> u32 {
    if k == row.len() && top_p >= 1.0 {
        return gumbel_max_all(true, row, t, seed, step);
    }
    let mut cand = ranked(row, k);
    let top = logit(row, cand[0]) / t;
    if top_p < 1.0 && top.is_finite() {
        // Softmax at temperature t over the candidates, in rank order; keep a token while the
        // probability of those before it is below top_p (so at least one).
        let e: Vec<f32> = cand
            .iter()
            .map(|&i| (logit(row, i) / t - top).exp())
            .collect();
        let z: f32 = e.iter().sum();
        let mut before = e[0];
        let mut keep = 1;
        while keep < cand.len() && before / z < top_p {
            before += e[keep];
            keep += 1;
        }
        cand.truncate(keep);
    }
    let draw = |i: u32| score(row, t, i, philox_uniform(seed, step, i));
    gumbel_max(cand.iter().copied(), cand[0], row, t, &draw)
}

/// The rank of a logit as a 16-bit key, smaller first: descending value, with NaN ranked as
/// -inf and -0 as +0 (the order [`logit`] compares in).
#[inline]
fn rank_key(x: bf16) -> u16 {
    let bits = match x.to_bits() {
        _ if x.is_nan() => bf16::NEG_INFINITY.to_bits(),
        0x8000 => 0,
        b => b,
    };
    // Sign-magnitude to an increasing unsigned code, then reversed.
    let ascending = if bits & 0x8000 != 0 {
        !bits
    } else {
        bits | 0x8000
    };
    !ascending
}

/// The `k` (at least 1) highest-ranked tokens of `row`, in rank order: descending logit, then
/// ascending index (so ties at the top-k boundary keep the lowest indices). A counting sort
/// over the 2^16 bf16 values: two passes over the row, no comparisons.
fn ranked(row: &[bf16], k: usize) -> Vec<u32> {
    let mut start = vec![0u32; 1 << 16];
    for &x in row {
        start[rank_key(x) as usize] += 1;
    }
    // Counts to first positions, up to the key in which the k-th token falls.
    let mut last = 0;
    let mut placed = 0u32;
    for (key, slot) in start.iter_mut().enumerate() {
        let count = *slot;
        *slot = placed;
        placed += count;
        if placed as usize >= k {
            last = key;
            break;
        }
    }
    let mut out = vec![0u32; k];
    for (i, &x) in row.iter().enumerate() {
        let key = rank_key(x) as usize;
        if key <= last {
            let pos = start[key] as usize;
            if pos < k {
                out[pos] = i as u32;
                start[key] += 1;
            }
        }
    }
    out
}

/// `argmax_i score(i)` over `cands` (lowest index on ties), skipping tokens that cannot win;
/// `top` is a candidate with the largest logit, scored first so that skipping starts early.
fn gumbel_max(
    cands: impl Iterator<Item = u32>,
    top: u32,
    row: &[bf16],
    t: f32,
    score: &impl Fn(u32) -> f32,
) -> u32 {
    let mut best = (score(top), top);
    for i in cands {
        if logit(row, i) / t + GUMBEL_MAX < best.0 {
            continue;
        }
        let s = score(i);
        if s > best.0 || (s == best.0 && i < best.1) {
            best = (s, i);
        }
    }
    best.1
}

/// Philox4x32-10 round constants (as in [`crate::backend::philox4x32`]).
const PHILOX_M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const PHILOX_W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

/// [`philox_uniform`] for the 8 indices `i0..i0 + 8`, computed in lockstep so that the
/// compiler vectorizes the rounds; bit-for-bit the same values.
#[inline(always)]
fn philox_uniform_x8(seed: u64, step: u32, i0: u32) -> [f32; 8] {
    let mut c: [[u32; 8]; 4] = [
        std::array::from_fn(|l| i0.wrapping_add(l as u32)),
        [step; 8],
        [0; 8],
        [0; 8],
    ];
    let mut key = [seed as u32, (seed >> 32) as u32];
    for _ in 0..10 {
        for l in 0..8 {
            let p0 = PHILOX_M[0] as u64 * c[0][l] as u64;
            let p1 = PHILOX_M[1] as u64 * c[2][l] as u64;
            let next = [
                (p1 >> 32) as u32 ^ c[1][l] ^ key[0],
                p1 as u32,
                (p0 >> 32) as u32 ^ c[3][l] ^ key[1],
                p0 as u32,
            ];
            for (w, n) in c.iter_mut().zip(next) {
                w[l] = n;
            }
        }
        key[0] = key[0].wrapping_add(PHILOX_W[0]);
        key[1] = key[1].wrapping_add(PHILOX_W[1]);
    }
    c[0].map(|x| ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0))
}

/// The Gumbel-max score of token `i`: `logit / t - ln(-ln(u_i))` in f32.
#[inline(always)]
fn score(row: &[bf16], t: f32, i: u32, u: f32) -> f32 {
    logit(row, i) / t - (-u.ln()).ln()
}

/// A draw below which no token can beat the score `best` when no `logit / t` exceeds
/// `top`: the score is increasing in the draw, and `logit / t + G(u) < best` for every token
/// once `G(u) = -ln(-ln u) < best - top`. The margin (far above the few ulps the f32 score
/// can be off by) keeps the skip exact; the result is rounded down.
fn draw_floor(best: f32, top: f32) -> f32 {
    let margin = 1e-3 + 1e-5 * (best.abs() as f64 + top.abs() as f64);
    let g = best as f64 - top as f64 - margin;
    let u = (-(-g).exp()).exp();
    let f = u as f32;
    if f as f64 > u {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    }
}

multiversion! {
    /// Gumbel-max over the whole vocabulary of `row` (no top-k or top-p cut).
    fn gumbel_max_all = gumbel_max_all_impl / gumbel_max_all_avx2(
        row: &[bf16],
        t: f32,
        seed: u64,
        step: u32,
    ) -> u32
}

/// Draws come 8 at a time; a draw below [`draw_floor`] of the best score so far (or a token
/// whose `logit / t` trails it by more than [`GUMBEL_MAX`]) cannot win, so its logarithms are
/// skipped. The best score starts at the most likely token's, so that few draws survive.
#[inline(always)]
fn gumbel_max_all_impl<I: Isa>(_isa: I, row: &[bf16], t: f32, seed: u64, step: u32) -> u32 {
    let vocab = row.len();
    let top = argmax(row);
    let top_a = logit(row, top) / t;
    let mut best = (score(row, t, top, philox_uniform(seed, step, top)), top);
    let mut floor = draw_floor(best.0, top_a);
    for i0 in (0..vocab).step_by(8) {
        let draws = philox_uniform_x8(seed, step, i0 as u32);
        for (l, &u) in draws.iter().enumerate().take(vocab - i0) {
            let i = (i0 + l) as u32;
            if u < floor || logit(row, i) / t + GUMBEL_MAX < best.0 {
                continue;
            }
            let s = score(row, t, i, u);
            if s > best.0 || (s == best.0 && i < best.1) {
                best = (s, i);
                floor = draw_floor(best.0, top_a);
            }
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_philox_matches_the_definition() {
        for (seed, step) in [
            (0u64, 0u32),
            (42, 7),
            (u64::MAX, u32::MAX),
            (0x1234_5678_9abc, 99),
        ] {
            for i0 in [0u32, 8, 1000, u32::MAX - 7] {
                let got = philox_uniform_x8(seed, step, i0);
                for (l, &u) in got.iter().enumerate() {
                    assert_eq!(u, philox_uniform(seed, step, i0 + l as u32));
                }
            }
        }
    }

    #[test]
    fn draws_below_the_floor_cannot_win() {
        for &(best, top) in &[
            (3.0f32, 1.0f32),
            (20.0, 5.0),
            (-40.0, -55.0),
            (1e4, 1e4 - 12.0),
        ] {
            let floor = draw_floor(best, top);
            assert!(floor > 0.0 && floor < 1.0);
            // The largest draw below the floor scores below best even for the top token.
            let u = f32::from_bits(floor.to_bits() - 1);
            assert!(top - (-u.ln()).ln() < best, "best {best} top {top}");
        }
        assert_eq!(draw_floor(0.0, 100.0), 0.0);
    }

    /// The largest uniform Philox can return is `(2^23 - 0.5) / 2^23`; its Gumbel noise must
    /// stay below the bound the sampler skips draws with.
    #[test]
    fn gumbel_noise_is_below_the_skip_bound() {
        let u_max = (8_388_607.0f32 + 0.5) / 8_388_608.0;
        assert!(u_max < 1.0);
        let g = -(-u_max.ln()).ln();
        assert!(g.is_finite() && g < GUMBEL_MAX, "noise {g}");
    }
}
