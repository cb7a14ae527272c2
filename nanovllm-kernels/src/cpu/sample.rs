//! The CPU sampler: one token per row of logits, greedy or by the Gumbel-max trick over the
//! top-k / top-p candidates, with the counter-based Philox draws the CUDA sampler uses, so that
//! both backends draw the same token for the same (seed, step).
//!
//! The Gumbel noise `-ln(-ln(u))` is bounded above ([`GUMBEL_MAX`]) because `u` never exceeds
//! `1 - 2^-24`, so a token whose `logit / T` trails the best score found so far by more than
//! that bound cannot win and its draw is skipped. The result is exactly the full argmax;
//! with a peaked distribution most of the vocabulary is skipped.

use half::bf16;
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

use super::simd::f32_of;
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
    let vocab = row.len();
    // Candidates first by descending logit, then by ascending index (ties at the top-k
    // boundary keep the lowest indices).
    let by_rank = |a: &u32, b: &u32| logit(row, *b).total_cmp(&logit(row, *a)).then(a.cmp(b));
    let score = |i: u32| logit(row, i) / t - (-philox_uniform(seed, step, i).ln()).ln();

    if k == vocab && top_p >= 1.0 {
        let top = argmax(row);
        return gumbel_max(0..vocab as u32, top, row, t, &score);
    }
    let mut cand: Vec<u32> = (0..vocab as u32).collect();
    if k < vocab {
        cand.select_nth_unstable_by(k - 1, by_rank);
        cand.truncate(k);
    }
    if top_p < 1.0 {
        cand.sort_unstable_by(by_rank);
        let top = logit(row, cand[0]) / t;
        if top.is_finite() {
            // Softmax at temperature t over the candidates, in rank order; keep a token while
            // the probability of those before it is below top_p (so at least one).
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
    }
    let top = *cand.iter().min_by(|a, b| by_rank(a, b)).unwrap_or(&0);
    gumbel_max(cand.into_iter(), top, row, t, &score)
}

/// `argmax_i score(i)` over `cands` (lowest index on ties), skipping draws that cannot win;
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

#[cfg(test)]
mod tests {
    use super::*;

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
