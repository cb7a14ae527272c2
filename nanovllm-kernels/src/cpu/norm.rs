//! RMSNorm (plain and fused with the residual add), Qwen3's per-head q/k RMSNorm fused with
//! rotary embedding, and the cos/sin table RoPE reads.
//!
//! The rounding follows Hugging Face's `Qwen3RMSNorm`: statistics in f32, the normalised
//! value rounded to bf16, then multiplied by the bf16 weight and rounded again
//! (`bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w)`). Rotary embedding is nano-vLLM's: the neox
//! halves of the bf16 head rotated in f32 by the f32 table, rounded once.

use half::bf16;
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

use super::simd::f32_of;
use super::{check_attn, index_error, numel, prefix, prefix_mut};
use crate::backend::AttnParams;

/// Rows handed to one rayon task at least (a row is a few KiB: smaller tasks cost more to
/// schedule than to run).
const MIN_ROWS_PER_TASK: usize = 4;

/// `1 / sqrt(mean(x^2) + eps)`, the sum in f32.
#[inline]
fn inv_rms(x: &[bf16], eps: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let mut sum = 0.0f32;
    for &v in chunks.remainder() {
        let v = f32_of(v);
        sum += v * v;
    }
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = f32_of(v);
            *a += v * v;
        }
    }
    sum += acc.iter().sum::<f32>();
    1.0 / (sum / x.len() as f32 + eps).sqrt()
}

/// `out = bf16(bf16(x * inv_rms(x)) * w)` for one row.
#[inline]
fn rms_row(x: &[bf16], w: &[bf16], eps: f32, out: &mut [bf16]) {
    let r = inv_rms(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        let normed = bf16::from_f32(f32_of(xi) * r);
        *o = bf16::from_f32(f32_of(normed) * f32_of(wi));
    }
}

/// RMSNorm of `n` rows of width `hidden` (see [`crate::Backend::rms_norm`]).
pub(super) fn rms_norm(
    x: &[bf16],
    weight: &[bf16],
    n: usize,
    hidden: usize,
    eps: f32,
    out: &mut [bf16],
) -> Result<()> {
    const OP: &str = "rms_norm";
    let len = numel(OP, "x", &[n, hidden])?;
    let x = prefix(OP, "x", x, len)?;
    let w = prefix(OP, "weight", weight, hidden)?;
    let out = prefix_mut(OP, "out", out, len)?;
    if len == 0 {
        return Ok(());
    }
    out.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(o, xr)| rms_row(xr, w, eps, o));
    Ok(())
}

/// `residual = bf16(x + residual)`, then `x = rms_norm(residual)`, for `n` rows.
pub(super) fn add_rms_norm(
    x: &mut [bf16],
    residual: &mut [bf16],
    weight: &[bf16],
    n: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "add_rms_norm";
    let len = numel(OP, "x", &[n, hidden])?;
    let x = prefix_mut(OP, "x", x, len)?;
    let residual = prefix_mut(OP, "residual", residual, len)?;
    let w = prefix(OP, "weight", weight, hidden)?;
    if len == 0 {
        return Ok(());
    }
    x.par_chunks_mut(hidden)
        .zip(residual.par_chunks_mut(hidden))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(xr, rr)| {
            for (r, &xi) in rr.iter_mut().zip(xr.iter()) {
                *r = bf16::from_f32(f32_of(xi) + f32_of(*r));
            }
            rms_row(rr, w, eps, xr);
        });
    Ok(())
}

/// Per-head RMSNorm then neox RoPE of the q and k heads of `n` rows of `qkv`, in place (see
/// [`crate::Backend::qk_norm_rope`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn qk_norm_rope(
    qkv: &mut [bf16],
    n: usize,
    attn: &AttnParams,
    q_norm: &[bf16],
    k_norm: &[bf16],
    eps: f32,
    positions: &[i32],
    cos_sin: &[f32],
) -> Result<()> {
    const OP: &str = "qk_norm_rope";
    check_attn(OP, attn)?;
    let d = attn.head_dim;
    if !d.is_multiple_of(2) {
        return Err(Error::Other(format!(
            "op {OP}: head_dim ({d}) must be even for rotary embedding"
        )));
    }
    let width = attn.qkv_width();
    let qkv = prefix_mut(OP, "qkv", qkv, numel(OP, "qkv", &[n, width])?)?;
    let q_norm = prefix(OP, "q_norm", q_norm, d)?;
    let k_norm = prefix(OP, "k_norm", k_norm, d)?;
    let positions = prefix(OP, "positions", positions, n)?;
    let max_position = cos_sin.len() / d;
    for (i, &p) in positions.iter().enumerate() {
        if p < 0 || p as usize >= max_position {
            return Err(index_error(
                OP,
                format!("positions[{i}] (rows of cos_sin)"),
                p as i64,
                max_position,
            ));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let half = d / 2;
    let normed_heads = attn.num_heads + attn.num_kv_heads;
    qkv.par_chunks_mut(width)
        .zip(positions.par_iter())
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(row, &p)| {
            let table = &cos_sin[p as usize * d..(p as usize + 1) * d];
            let (cos, sin) = table.split_at(half);
            for (h, head) in row[..normed_heads * d].chunks_exact_mut(d).enumerate() {
                let w = if h < attn.num_heads { q_norm } else { k_norm };
                // The RMSNorm output is bf16, so it can be stored in place.
                let r = inv_rms(head, eps);
                for (x, &wi) in head.iter_mut().zip(w) {
                    let normed = bf16::from_f32(f32_of(*x) * r);
                    *x = bf16::from_f32(f32_of(normed) * f32_of(wi));
                }
                let (x1, x2) = head.split_at_mut(half);
                for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                    let (fa, fb) = (f32_of(*a), f32_of(*b));
                    *a = bf16::from_f32(fa * c - fb * s);
                    *b = bf16::from_f32(fb * c + fa * s);
                }
            }
        });
    Ok(())
}

/// The table [`crate::Backend::qk_norm_rope`] reads: `max_position` rows of `head_dim` f32,
/// row `p` holding `cos(p * f_i)` for `i < head_dim / 2` then `sin(p * f_i)`, with
/// `f_i = theta^(-2i / head_dim)` (Qwen3: `theta` is `rope_theta` of config.json).
///
/// Computed in f32 as Hugging Face and nano-vLLM do: `inv_freq = 1 / theta^(2i / d)`, then
/// `p * inv_freq` and its cosine and sine, all in f32 (so large positions round the same way).
/// Errors when `head_dim` is zero or odd, or `theta` is not a positive finite number.
pub fn rope_cos_sin_cache(head_dim: usize, max_position: usize, theta: f64) -> Result<Vec<f32>> {
    const OP: &str = "rope_cos_sin_cache";
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::Other(format!(
            "{OP}: head_dim ({head_dim}) must be even and positive"
        )));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::Other(format!(
            "{OP}: rope theta ({theta}) must be a positive finite number"
        )));
    }
    let len = numel(OP, "cos_sin", &[max_position, head_dim])?;
    let half = head_dim / 2;
    let base = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut table = vec![0f32; len];
    table
        .par_chunks_mut(head_dim)
        .enumerate()
        .with_min_len(64)
        .for_each(|(p, row)| {
            let (cos, sin) = row.split_at_mut(half);
            for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&inv_freq) {
                let angle = p as f32 * f;
                *c = angle.cos();
                *s = angle.sin();
            }
        });
    Ok(table)
}
