//! The row-wise ops of the forward pass that move or combine values without reducing them:
//! the vocab-parallel embedding lookup, SiLU-and-mul of the MLP, and the row gather that picks
//! each prefill sequence's last token for the LM head.

use half::bf16;
use nanovllm_utils::Result;
use rayon::prelude::*;

use super::simd::f32_of;
use super::{index_error, numel, prefix, prefix_mut};

/// Rows handed to one rayon task at least.
const MIN_ROWS_PER_TASK: usize = 8;

/// `out[i] = weight[ids[i] - vocab_start]`, or zeros outside this rank's vocab rows (see
/// [`crate::Backend::embedding`]).
pub(super) fn embedding(
    ids: &[u32],
    n: usize,
    weight: &[bf16],
    vocab_start: usize,
    vocab_rows: usize,
    hidden: usize,
    out: &mut [bf16],
) -> Result<()> {
    const OP: &str = "embedding";
    let ids = prefix(OP, "ids", ids, n)?;
    let weight = prefix(
        OP,
        "weight",
        weight,
        numel(OP, "weight", &[vocab_rows, hidden])?,
    )?;
    let out = prefix_mut(OP, "out", out, numel(OP, "out", &[n, hidden])?)?;
    if hidden == 0 {
        return Ok(());
    }
    out.par_chunks_mut(hidden)
        .zip(ids.par_iter())
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(o, &id)| {
            // Ids below vocab_start wrap to huge values and fall outside the range too.
            let row = (id as usize).wrapping_sub(vocab_start);
            if row < vocab_rows {
                o.copy_from_slice(&weight[row * hidden..(row + 1) * hidden]);
            } else {
                o.fill(bf16::ZERO);
            }
        });
    Ok(())
}

/// `out = bf16(bf16(silu(gate)) * up)` for `n` rows of `[gate(inter), up(inter)]`, the SiLU in
/// f32 (Hugging Face's `act_fn(gate) * up` on bf16 tensors rounds after each of the two ops).
pub(super) fn silu_and_mul(
    gate_up: &[bf16],
    n: usize,
    inter: usize,
    out: &mut [bf16],
) -> Result<()> {
    const OP: &str = "silu_and_mul";
    let gate_up = prefix(
        OP,
        "gate_up",
        gate_up,
        numel(OP, "gate_up", &[n, 2, inter])?,
    )?;
    let out = prefix_mut(OP, "out", out, numel(OP, "out", &[n, inter])?)?;
    if inter == 0 {
        return Ok(());
    }
    out.par_chunks_mut(inter)
        .zip(gate_up.par_chunks(2 * inter))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(o, gu)| {
            let (gate, up) = gu.split_at(inter);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                let g = f32_of(g);
                let act = bf16::from_f32(g / (1.0 + (-g).exp()));
                *o = bf16::from_f32(f32_of(act) * f32_of(u));
            }
        });
    Ok(())
}

/// `out[i] = x[indices[i]]` for `n` rows of width `width`.
pub(super) fn gather_rows(
    x: &[bf16],
    indices: &[i32],
    n: usize,
    width: usize,
    out: &mut [bf16],
) -> Result<()> {
    const OP: &str = "gather_rows";
    let indices = prefix(OP, "indices", indices, n)?;
    let out = prefix_mut(OP, "out", out, numel(OP, "out", &[n, width])?)?;
    if width == 0 {
        return Ok(());
    }
    let rows = x.len() / width;
    for (i, &idx) in indices.iter().enumerate() {
        if idx < 0 || idx as usize >= rows {
            return Err(index_error(
                OP,
                format!("indices[{i}] (rows of x)"),
                idx as i64,
                rows,
            ));
        }
    }
    out.par_chunks_mut(width)
        .zip(indices.par_iter())
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(o, &idx)| {
            let r = idx as usize;
            o.copy_from_slice(&x[r * width..(r + 1) * width]);
        });
    Ok(())
}
