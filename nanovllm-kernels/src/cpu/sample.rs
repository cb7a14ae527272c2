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
//! * A draw too small to win even for the most likely candidate ([`draw_floor`]) skips its
//!   two logarithms: with a flat distribution (random weights) nearly every draw is skipped
//!   that way.
//!
//! Over the whole vocabulary, or when the top-k / top-p cut keeps many candidates, the row is
//! swept in index order with the draws of 32 tokens (8 Philox calls of 4 words each) computed
//! in lockstep in vector registers; a short candidate list draws per candidate instead.

use half::bf16;
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

use super::simd::{f32_of, multiversion, Isa};
use super::{numel, prefix, prefix_mut};
use crate::backend::{philox_uniform, uniform_from_bits};

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
    check_temperatures(OP, temperatures)?;
    for (r, &p) in top_p.iter().enumerate() {
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

/// One rank's part of sampling rows split by columns (see [`crate::Backend::sample_shard`]):
/// `logits` holds columns `col0 .. col0 + width` of each row; each row's best (score, column)
/// goes to `parts[slot * 2 * rows ..]`, the score's bits at `r`, the column at `rows + r`.
#[allow(clippy::too_many_arguments)]
pub(super) fn sample_shard(
    logits: &[bf16],
    rows: usize,
    width: usize,
    col0: usize,
    params: SampleParams<'_>,
    parts: &mut [u32],
    slot: usize,
) -> Result<()> {
    const OP: &str = "sample_shard";
    let logits = prefix(OP, "logits", logits, numel(OP, "logits", &[rows, width])?)?;
    let temperatures = prefix(OP, "temperatures", params.temperatures, rows)?;
    let seeds = prefix(OP, "seeds", params.seeds, rows)?;
    let steps = prefix(OP, "steps", params.steps, rows)?;
    let at = numel(OP, "parts", &[slot, 2, rows])?;
    let part = prefix_mut(
        OP,
        "parts",
        parts,
        numel(OP, "parts", &[slot + 1, 2, rows])?,
    )?;
    let (keys, cols) = part[at..].split_at_mut(rows);
    if rows == 0 {
        return Ok(());
    }
    let end = col0.checked_add(width).and_then(|e| u32::try_from(e).ok());
    if width == 0 || end.is_none() {
        return Err(Error::Other(format!(
            "op {OP}: {width} columns from {col0} must be a non-empty range below 2^32"
        )));
    }
    check_temperatures(OP, temperatures)?;
    keys.par_iter_mut()
        .zip(cols.par_iter_mut())
        .zip(logits.par_chunks(width))
        .enumerate()
        .for_each(|(r, ((k, c), row))| {
            let (score, col) = slice_best(row, col0 as u32, temperatures[r], seeds[r], steps[r]);
            *k = score.to_bits();
            *c = col;
        });
    Ok(())
}

/// The token of each row from `ranks` parts of [`sample_shard`]: the best score, the lowest
/// column on ties (see [`crate::Backend::sample_combine`]).
pub(super) fn sample_combine(
    parts: &[u32],
    rows: usize,
    ranks: usize,
    out: &mut [u32],
) -> Result<()> {
    const OP: &str = "sample_combine";
    let parts = prefix(OP, "parts", parts, numel(OP, "parts", &[ranks, 2, rows])?)?;
    let out = prefix_mut(OP, "out", out, rows)?;
    for (r, o) in out.iter_mut().enumerate() {
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        for part in parts.chunks_exact(2 * rows) {
            let (k, c) = (f32::from_bits(part[r]), part[rows + r]);
            if k > best.0 || (k == best.0 && c < best.1) {
                best = (k, c);
            }
        }
        *o = if best.1 == u32::MAX { 0 } else { best.1 };
    }
    Ok(())
}

/// The best (score, column) of a slice of one row whose first column is `col0`: the largest
/// logit when greedy, else the largest Gumbel key `logit / t - ln(-ln u)` with the whole row's
/// draw of each column; the lowest column on ties. The same shortcuts as [`gumbel_max`], which
/// never change the result.
fn slice_best(row: &[bf16], col0: u32, t: f32, seed: u64, step: u32) -> (f32, u32) {
    let top = argmax(row);
    if t == 0.0 {
        return (logit(row, top), col0 + top);
    }
    let (score, i) = gumbel_best(top, 0..row.len() as u32, row, col0, t, seed, step);
    (score, col0 + i)
}

/// Every temperature finite and `>= 0`.
fn check_temperatures(op: &str, temperatures: &[f32]) -> Result<()> {
    for (r, &t) in temperatures.iter().enumerate() {
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::Other(format!(
                "op {op}: temperatures[{r}] = {t} must be finite and >= 0"
            )));
        }
    }
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

/// Candidate lists at least this fraction of the vocabulary (1 / n) are drawn by a sweep over
/// the row ([`gumbel_sweep`]) rather than one Philox call per candidate.
const SWEEP_FRACTION: usize = 16;

/// Gumbel-max over the candidates of one row (top-k cut to `k`, top-p cut to `top_p`).
fn sample_row(row: &[bf16], t: f32, k: usize, top_p: f32, seed: u64, step: u32) -> u32 {
    if k == row.len() && top_p >= 1.0 {
        return gumbel_sweep(true, row, t, seed, step, argmax(row), None);
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
    if cand.len() >= row.len() / SWEEP_FRACTION {
        let mut member = vec![false; row.len()];
        for &i in &cand {
            member[i as usize] = true;
        }
        return gumbel_sweep(true, row, t, seed, step, cand[0], Some(&member));
    }
    gumbel_max(&cand, row, t, seed, step)
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

/// `argmax_i score(i)` over `cands` (lowest index on ties), `cands[0]` a candidate with the
/// largest logit, scored first so that skipping starts early; tokens that cannot win (a logit
/// too low, or a draw below [`draw_floor`]) skip their logarithms.
fn gumbel_max(cands: &[u32], row: &[bf16], t: f32, seed: u64, step: u32) -> u32 {
    gumbel_best(cands[0], cands.iter().copied(), row, 0, t, seed, step).1
}

/// [`gumbel_max`]'s (best score, index) over `cands` with `top` among them, for a row whose
/// element `i` is column `col0 + i` of the whole row (the column keys its draw).
fn gumbel_best(
    top: u32,
    cands: impl Iterator<Item = u32>,
    row: &[bf16],
    col0: u32,
    t: f32,
    seed: u64,
    step: u32,
) -> (f32, u32) {
    let top_a = logit(row, top) / t;
    let mut best = (
        score(row, t, top, philox_uniform(seed, step, col0 + top)),
        top,
    );
    let mut floor = draw_floor(best.0, top_a);
    for i in cands {
        if logit(row, i) / t + GUMBEL_MAX < best.0 {
            continue;
        }
        let u = philox_uniform(seed, step, col0 + i);
        if u < floor {
            continue;
        }
        let s = score(row, t, i, u);
        if s > best.0 || (s == best.0 && i < best.1) {
            best = (s, i);
            floor = draw_floor(best.0, top_a);
        }
    }
    best
}

/// Philox4x32-10 round constants (as in [`crate::backend::philox4x32`]).
const PHILOX_M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const PHILOX_W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

/// Tokens whose draws one [`philox_uniform_x32`] call yields.
const SWEEP_TOKENS: usize = 32;

/// [`philox_uniform`] for the 32 tokens `4 * g0 .. 4 * g0 + 32`: the 8 Philox calls of groups
/// `g0..g0 + 8` computed in lockstep so that the compiler vectorizes the rounds, then word `w`
/// of call `l` as token `4 * (g0 + l) + w`; bit-for-bit the same values.
#[inline(always)]
fn philox_uniform_x32(seed: u64, step: u32, g0: u32) -> [f32; SWEEP_TOKENS] {
    let mut c: [[u32; 8]; 4] = [
        std::array::from_fn(|l| g0.wrapping_add(l as u32)),
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
    std::array::from_fn(|j| uniform_from_bits(c[j % 4][j / 4]))
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
    /// Gumbel-max over the tokens of `row` marked in `member` (all when `None`); `top` is a
    /// member with the largest logit among them.
    fn gumbel_sweep = gumbel_sweep_impl / gumbel_sweep_avx2(
        row: &[bf16],
        t: f32,
        seed: u64,
        step: u32,
        top: u32,
        member: Option<&[bool]>,
    ) -> u32
}

/// Draws come 32 at a time; a draw below [`draw_floor`] of the best score so far (or a token
/// whose `logit / t` trails it by more than [`GUMBEL_MAX`]) cannot win, so its logarithms are
/// skipped. The best score starts at `top`'s, so that few draws survive.
#[inline(always)]
fn gumbel_sweep_impl<I: Isa>(
    _isa: I,
    row: &[bf16],
    t: f32,
    seed: u64,
    step: u32,
    top: u32,
    member: Option<&[bool]>,
) -> u32 {
    let vocab = row.len();
    let top_a = logit(row, top) / t;
    let mut best = (score(row, t, top, philox_uniform(seed, step, top)), top);
    let mut floor = draw_floor(best.0, top_a);
    for i0 in (0..vocab).step_by(SWEEP_TOKENS) {
        // i0 < vocab <= u32::MAX, so the group index i0 / 4 fits.
        let draws = philox_uniform_x32(seed, step, (i0 / 4) as u32);
        for (l, &u) in draws.iter().enumerate().take(vocab - i0) {
            let i = i0 + l;
            if u < floor
                || member.is_some_and(|m| !m[i])
                || logit(row, i as u32) / t + GUMBEL_MAX < best.0
            {
                continue;
            }
            let s = score(row, t, i as u32, u);
            if s > best.0 || (s == best.0 && (i as u32) < best.1) {
                best = (s, i as u32);
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
            for g0 in [0u32, 8, 1000, u32::MAX / 4 - 7] {
                let got = philox_uniform_x32(seed, step, g0);
                for (l, &u) in got.iter().enumerate() {
                    assert_eq!(u, philox_uniform(seed, step, 4 * g0 + l as u32));
                }
            }
        }
    }

    /// SplitMix64 from `seed`: the tests' random numbers.
    fn splitmix(mut z: u64) -> impl FnMut() -> u64 {
        move || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        }
    }

    /// Gumbel-max without any skipping: every candidate scored.
    fn brute_force(row: &[bf16], t: f32, seed: u64, step: u32, cands: &[u32]) -> u32 {
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        for &i in cands {
            let s = score(row, t, i, philox_uniform(seed, step, i));
            if s > best.0 || (s == best.0 && i < best.1) {
                best = (s, i);
            }
        }
        best.1
    }

    /// The sweep over a member mask, the per-candidate loop and the unskipped rule agree, on
    /// flat rows (where draws are skipped) and peaked ones (where logits are), with a vocabulary
    /// that is no multiple of the 32-token sweep.
    #[test]
    fn skipping_paths_agree_with_brute_force() {
        let mut next = splitmix(0x1234_5678);
        let vocab = 3001;
        for case in 0..24 {
            let scale = if case % 2 == 0 { 1.0 } else { 20.0 };
            let row: Vec<bf16> = (0..vocab)
                .map(|_| bf16::from_f32(((next() >> 40) as f32 / 16_777_216.0 - 0.5) * scale))
                .collect();
            let (seed, step, t) = (next(), (next() % 5000) as u32, [0.4f32, 1.0, 1.9][case % 3]);
            // Every token, then a random third of them with the largest first.
            let all: Vec<u32> = (0..vocab as u32).collect();
            let mut cands: Vec<u32> = all
                .iter()
                .copied()
                .filter(|_| next().is_multiple_of(3))
                .collect();
            let by_logit = |set: &[u32]| {
                let mut best = set[0];
                for &i in set {
                    if logit(&row, i) > logit(&row, best) {
                        best = i;
                    }
                }
                best
            };
            let want_all = brute_force(&row, t, seed, step, &all);
            assert_eq!(
                gumbel_sweep(true, &row, t, seed, step, by_logit(&all), None),
                want_all
            );
            let top = by_logit(&cands);
            let pos = cands.iter().position(|&i| i == top).unwrap_or(0);
            cands.swap(0, pos);
            let mut member = vec![false; vocab];
            for &i in &cands {
                member[i as usize] = true;
            }
            let want = brute_force(&row, t, seed, step, &cands);
            assert_eq!(gumbel_max(&cands, &row, t, seed, step), want, "case {case}");
            let got = gumbel_sweep(true, &row, t, seed, step, top, Some(&member));
            assert_eq!(got, want, "case {case}");
            assert_eq!(
                gumbel_sweep(false, &row, t, seed, step, top, Some(&member)),
                want
            );
        }
    }

    /// Sampling rows split by columns over 2-4 ranks (each rank's best, then the fold) gives
    /// the token of the whole rows, greedy and Gumbel, flat and peaked rows, with ties, NaN
    /// and -inf logits, and an all-NaN slice.
    #[test]
    fn shards_give_the_whole_rows_token() {
        let mut next = splitmix(0x0bad_cafe);
        for (case, (ranks, width)) in [(2, 1000), (3, 64), (4, 256), (2, 8)]
            .into_iter()
            .enumerate()
        {
            let (rows, vocab) = (9, ranks * width);
            let mut logits: Vec<bf16> = (0..rows * vocab)
                .map(|_| {
                    let scale = if case % 2 == 0 { 1.0 } else { 20.0 };
                    // Coarse values: many exact ties.
                    bf16::from_f32(((next() % 64) as f32 / 64.0 - 0.5) * scale)
                })
                .collect();
            logits[3] = bf16::NAN;
            logits[vocab + 1] = bf16::NEG_INFINITY;
            // Row 2's first slice all NaN.
            for x in &mut logits[2 * vocab..2 * vocab + width] {
                *x = bf16::NAN;
            }
            let temperatures: Vec<f32> = (0..rows).map(|r| [0.0, 0.6, 1.3][r % 3]).collect();
            let seeds: Vec<u64> = (0..rows).map(|_| next()).collect();
            let steps: Vec<u32> = (0..rows).map(|_| (next() % 1000) as u32).collect();
            let (top_k, top_p) = (vec![0i32; rows], vec![1.0f32; rows]);
            let params = || SampleParams {
                temperatures: &temperatures,
                top_k: &top_k,
                top_p: &top_p,
                seeds: &seeds,
                steps: &steps,
            };
            let mut want = vec![0u32; rows];
            sample(&logits, rows, vocab, params(), &mut want).unwrap();
            let mut parts = vec![0u32; ranks * 2 * rows];
            for q in 0..ranks {
                let slice: Vec<bf16> = logits
                    .chunks(vocab)
                    .flat_map(|row| row[q * width..(q + 1) * width].iter().copied())
                    .collect();
                sample_shard(&slice, rows, width, q * width, params(), &mut parts, q).unwrap();
            }
            let mut got = vec![u32::MAX; rows];
            sample_combine(&parts, rows, ranks, &mut got).unwrap();
            assert_eq!(got, want, "case {case}: {ranks} ranks of {width} columns");
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
