//! The CPU GEMM behind every linear layer: `out[m, n] = bf16(sum_k x[m, k] * w[n, k])`, bf16 in
//! and out, f32 accumulation.
//!
//! Two paths, chosen by `m` (tokens in the step):
//! * Decode and small batches (`m <= SMALL_M`): rayon splits the output columns; each weight
//!   row is read once, in bf16 straight from memory, and dotted with four rows of `x` at a time
//!   ([`Isa::dots`]). This is bound by streaming the weights, so nothing is packed or copied.
//! * Prefill (larger `m`): `x` (in blocks of `M_BLOCK` rows) and `w` (in panels of a few
//!   hundred rows, sized to stay in cache) are widened to f32 and multiplied by
//!   `matrixmultiply::sgemm`, which packs, blocks for cache and uses its own threads; each
//!   panel of the result is rounded to bf16 into its columns of `out`.
//!
//! `SMALL_M` is where the two measured about even on two cores of a Xeon (AVX2 kernels,
//! Qwen3-0.6B shapes): below it, widening a weight panel costs more than sgemm saves.

use std::cell::RefCell;

use half::bf16;
use nanovllm_utils::Result;
use rayon::prelude::*;

use super::simd::{multiversion, widen, Isa};
use super::{numel, prefix, prefix_mut};

const OP: &str = "gemm";

/// Up to this many rows of `x`, the dot-product path is faster than widening `w` for sgemm.
const SMALL_M: usize = 32;

/// f32 elements of `x` the dot-product path keeps in L1 at a time (32 KiB).
const X_BLOCK_ELEMS: usize = 8192;

/// Rows of `x` widened at a time on the sgemm path (bounds the f32 copy of `x`).
const M_BLOCK: usize = 1024;

/// Elements of one f32 panel of `w` on the sgemm path (2 MiB: it stays in L2/L3 while sgemm
/// reads it).
const PANEL_ELEMS: usize = 1 << 19;

/// `out[..m * n] = bf16(x[..m * k] . w[..n * k]^T)`; `simd` allows the AVX2 kernels.
pub(super) fn gemm(
    simd: bool,
    x: &[bf16],
    w: &[bf16],
    m: usize,
    n: usize,
    k: usize,
    out: &mut [bf16],
) -> Result<()> {
    let x = prefix(OP, "x", x, numel(OP, "x", &[m, k])?)?;
    let w = prefix(OP, "w", w, numel(OP, "w", &[n, k])?)?;
    let out = prefix_mut(OP, "out", out, numel(OP, "out", &[m, n])?)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(bf16::ZERO);
        return Ok(());
    }
    if m <= SMALL_M {
        gemm_small(simd, x, w, m, n, k, out);
    } else {
        gemm_sgemm(x, w, m, n, k, out);
    }
    Ok(())
}

/// The decode path: rayon over chunks of output columns, each chunk's weights read once.
fn gemm_small(simd: bool, x: &[bf16], w: &[bf16], m: usize, n: usize, k: usize, out: &mut [bf16]) {
    let mut xf = vec![0f32; m * k];
    widen(x, &mut xf);
    // Enough chunks for load balance, each a few dozen weight rows.
    let cols_per_task = (n / (8 * rayon::current_num_threads())).clamp(8, 256);
    // Each task returns its tile of `out` (rows of `cols` columns), rounded to bf16.
    let tiles: Vec<Vec<bf16>> = w
        .par_chunks(cols_per_task * k)
        .map(|wc| {
            let mut tile = vec![0f32; m * (wc.len() / k)];
            small_tile(simd, &xf, m, k, wc, &mut tile);
            tile.into_iter().map(bf16::from_f32).collect()
        })
        .collect();
    for (t, tile) in tiles.iter().enumerate() {
        let j0 = t * cols_per_task;
        let cols = tile.len() / m;
        for (i, row) in tile.chunks_exact(cols).enumerate() {
            out[i * n + j0..i * n + j0 + cols].copy_from_slice(row);
        }
    }
}

multiversion! {
    /// `tile[i * cols + j] = xf[i, :] . wc[j, :]` for the `cols = wc.len() / k` weight rows of
    /// `wc`: each weight row is read once, for four rows of `xf` at a time.
    fn small_tile = small_tile_impl / small_tile_avx2(
        xf: &[f32],
        m: usize,
        k: usize,
        wc: &[bf16],
        tile: &mut [f32],
    )
}

#[inline(always)]
fn small_tile_impl<I: Isa>(isa: I, xf: &[f32], m: usize, k: usize, wc: &[bf16], tile: &mut [f32]) {
    let cols = wc.len() / k;
    // Blocks of rows of x (a multiple of 4, about 32 KiB) stay in L1 while the chunk's weight
    // rows (in L2 after the first block) stream past.
    let block = (X_BLOCK_ELEMS / k / 4 * 4).clamp(4, 16);
    for i0 in (0..m).step_by(block) {
        let i1 = (i0 + block).min(m);
        for (j, wr) in wc.chunks_exact(k).enumerate() {
            let mut i = i0;
            while i + 4 <= i1 {
                let d = isa.dots::<4>(&xf[i * k..], k, wr);
                for (r, v) in d.into_iter().enumerate() {
                    tile[(i + r) * cols + j] = v;
                }
                i += 4;
            }
            while i < i1 {
                let [v] = isa.dots::<1>(&xf[i * k..], k, wr);
                tile[i * cols + j] = v;
                i += 1;
            }
        }
    }
}

/// Scratch of the sgemm path, kept per thread so that a step allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    xf: Vec<f32>,
    wf: Vec<f32>,
    cf: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Grows `v` to at least `len` elements and returns its first `len`.
fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The prefill path: widen blocks of `x` and panels of `w` to f32, multiply with sgemm.
fn gemm_sgemm(x: &[bf16], w: &[bf16], m: usize, n: usize, k: usize, out: &mut [bf16]) {
    // A gemm called from inside another one's parallel loop (a rayon worker that steals work
    // while waiting) finds the scratch borrowed and uses its own.
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => gemm_sgemm_with(&mut s, x, w, m, n, k, out),
        Err(_) => gemm_sgemm_with(&mut Scratch::default(), x, w, m, n, k, out),
    });
}

fn gemm_sgemm_with(
    s: &mut Scratch,
    x: &[bf16],
    w: &[bf16],
    m: usize,
    n: usize,
    k: usize,
    out: &mut [bf16],
) {
    let panel_rows = (PANEL_ELEMS / k).max(16).min(n);
    for i0 in (0..m).step_by(M_BLOCK) {
        let rows = M_BLOCK.min(m - i0);
        let xf = grow(&mut s.xf, rows * k);
        xf.par_chunks_mut(k)
            .zip(x[i0 * k..(i0 + rows) * k].par_chunks(k))
            .for_each(|(dst, src)| widen(src, dst));
        for j0 in (0..n).step_by(panel_rows) {
            let cols = panel_rows.min(n - j0);
            let wf = grow(&mut s.wf, cols * k);
            wf.par_chunks_mut(k)
                .zip(w[j0 * k..(j0 + cols) * k].par_chunks(k))
                .for_each(|(dst, src)| widen(src, dst));
            let cf = grow(&mut s.cf, rows * cols);
            // SAFETY: a = xf is rows x k with row stride k; b = wf^T is k x cols (element
            // (p, j) at wf[j * k + p]); c = cf is rows x cols with row stride cols. All three
            // slices hold exactly those elements and c aliases neither a nor b.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    k,
                    cols,
                    1.0,
                    xf.as_ptr(),
                    k as isize,
                    1,
                    wf.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    cf.as_mut_ptr(),
                    cols as isize,
                    1,
                );
            }
            out[i0 * n..(i0 + rows) * n]
                .par_chunks_mut(n)
                .zip(cf.par_chunks(cols))
                .for_each(|(o, c)| {
                    for (d, &v) in o[j0..j0 + cols].iter_mut().zip(c) {
                        *d = bf16::from_f32(v);
                    }
                });
        }
    }
}
