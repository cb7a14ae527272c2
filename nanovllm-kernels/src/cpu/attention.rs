//! The CPU attention ops: writing k/v to the paged KV cache (`store_kvcache`), varlen causal
//! prefill attention over the cache (cached prefixes and chunked prefill included) and paged
//! decode attention.
//!
//! Both attention ops share one core, [`attend`], which computes a tile of consecutive queries
//! of one sequence, for a range of KV heads, against the keys the tile can see. It works like
//! flash attention:
//! * the queries are widened to f32 once and stacked one row per (KV head, token, head of the
//!   GQA group), so that the rows of one KV head are contiguous and their causal limit never
//!   decreases down the rows;
//! * keys and values are read in bf16 straight from the cache (no gather, no copy), a block of
//!   [`KEY_BLOCK`] keys at a time, walking each run of keys that share a cache block at the
//!   cache's slot stride; a slot holds every KV head side by side, so the heads are the inner
//!   loop and the cache is read in order;
//! * scores are scaled in f32, the softmax is the online one (running max and sum per row,
//!   probabilities kept in f32), and the output is divided by the sum and rounded to bf16 once
//!   at the end. Rows that see no key of a block skip it, so the causal mask costs nothing
//!   beyond the diagonal block.
//!
//! Prefill work items are (sequence, tile of queries), each owning a contiguous block of output
//! rows; decode items are sequences, split into pieces of KV heads when there are fewer
//! sequences than threads. rayon runs the items in parallel.

use std::cell::RefCell;

use half::bf16;
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

use super::simd::{bcast_rows, exp_f32, f32_of, multiversion, widen, Isa, LANES};
use super::{check_attn, index_error, numel, prefix, prefix_mut};
use crate::backend::AttnParams;

/// Keys scored at a time: the tile's scores for them (at most 256 rows x 128 f32) stay in L2
/// between the softmax and the product with the values.
const KEY_BLOCK: usize = 128;

/// Query rows (tokens times heads) per prefill work item: with head_dim 128 their f32 copy,
/// scores and outputs take 384 KiB, which stays in L2 while the keys stream past.
const TILE_ROWS: usize = 256;

/// The KV cache of one layer, with its geometry.
struct PagedKv<'a> {
    k: &'a [bf16],
    v: &'a [bf16],
    block_size: usize,
    head_dim: usize,
    /// Elements of one slot: `num_kv_heads * head_dim`.
    slot_width: usize,
}

impl PagedKv<'_> {
    /// Offset in `k`/`v` of key `j` of KV head `kh`, for a sequence whose block table is
    /// `table` (checked against the cache before any work started).
    #[inline(always)]
    fn offset(&self, table: &[i32], j: usize, kh: usize) -> usize {
        let block = table[j / self.block_size] as usize;
        (block * self.block_size + j % self.block_size) * self.slot_width + kh * self.head_dim
    }
}

/// One work item: consecutive queries of one sequence.
struct Tile<'a> {
    /// The tile's rows of `qkv`, starting at its first query.
    q: &'a [bf16],
    /// Queries in the tile.
    rows: usize,
    /// Query `t` of the tile attends keys `0..base + t + 1`.
    base: usize,
    /// The sequence's row of `block_tables` (checked against the cache).
    table: &'a [i32],
    /// KV heads to compute.
    kv_heads: std::ops::Range<usize>,
}

/// Per-thread f32 working set of [`attend`], grown on demand and reused between calls.
#[derive(Default)]
struct Scratch {
    /// Stacked queries, `rows x head_dim`.
    q: Vec<f32>,
    /// Scores, then probabilities: `rows x KEY_BLOCK`.
    s: Vec<f32>,
    /// Unnormalised outputs, `rows x head_dim`.
    o: Vec<f32>,
    /// Running max of each row's scores.
    m: Vec<f32>,
    /// Running sum of each row's probabilities.
    l: Vec<f32>,
}

impl Scratch {
    fn reserve(&mut self, rows: usize, d: usize) {
        for (v, len) in [
            (&mut self.q, rows * d),
            (&mut self.s, rows * KEY_BLOCK),
            (&mut self.o, rows * d),
            (&mut self.m, rows),
            (&mut self.l, rows),
        ] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (or a fresh one if it is in use further up the stack).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

multiversion! {
    /// Attention of one tile: for each query `t` and each query head `h` of the groups of
    /// `tile.kv_heads`, `out[t * ldo + (h - h0) * d..][..d]`, `h0` being the first of those
    /// heads.
    fn attend = attend_impl / attend_avx2(
        tile: &Tile<'_>,
        kv: &PagedKv<'_>,
        attn: &AttnParams,
        out: &mut [bf16],
        ldo: usize,
        sc: &mut Scratch,
    )
}

/// Scores of one key against the stacked query rows `rows` (all of one KV head):
/// `s[r * KEY_BLOCK + col] = q[r] . key`, four rows at a time where it can.
#[inline(always)]
fn score_rows<I: Isa>(
    isa: I,
    q: &[f32],
    d: usize,
    rows: std::ops::Range<usize>,
    key: &[bf16],
    s: &mut [f32],
    col: usize,
) {
    let mut r = rows.start;
    while r < rows.end {
        let x = &q[r * d..];
        r += match rows.end - r {
            4.. => {
                for (i, v) in isa.dots::<4>(x, d, key).into_iter().enumerate() {
                    s[(r + i) * KEY_BLOCK + col] = v;
                }
                4
            }
            2 | 3 => {
                for (i, v) in isa.dots::<2>(x, d, key).into_iter().enumerate() {
                    s[(r + i) * KEY_BLOCK + col] = v;
                }
                2
            }
            _ => {
                let [v] = isa.dots::<1>(x, d, key);
                s[r * KEY_BLOCK + col] = v;
                1
            }
        };
    }
}

#[inline(always)]
fn attend_impl<I: Isa>(
    isa: I,
    tile: &Tile<'_>,
    kv: &PagedKv<'_>,
    attn: &AttnParams,
    out: &mut [bf16],
    ldo: usize,
    sc: &mut Scratch,
) {
    let d = attn.head_dim;
    let group = attn.num_heads / attn.num_kv_heads;
    let kh0 = tile.kv_heads.start;
    let nk = tile.kv_heads.len();
    // Rows of one KV head: (token t, head hg of the group) at t * group + hg.
    let head_rows = tile.rows * group;
    let nrows = nk * head_rows;
    let kmax = tile.base + tile.rows;
    let qkv_width = attn.qkv_width();
    let (bs, sw) = (kv.block_size, kv.slot_width);
    let vec_cols = d - d % LANES;
    sc.reserve(nrows, d);
    let Scratch { q, s, o, m, l } = sc;

    for ki in 0..nk {
        for t in 0..tile.rows {
            for hg in 0..group {
                let h = (kh0 + ki) * group + hg;
                widen(
                    &tile.q[t * qkv_width + h * d..][..d],
                    &mut q[(ki * head_rows + t * group + hg) * d..][..d],
                );
            }
        }
    }
    m[..nrows].fill(f32::NEG_INFINITY);
    l[..nrows].fill(0.0);
    o[..nrows * d].fill(0.0);

    for j0 in (0..kmax).step_by(KEY_BLOCK) {
        let kb = KEY_BLOCK.min(kmax - j0);
        // Query t sees a key of this block when base + t + 1 > j0: rows of earlier tokens
        // skip the block.
        let skip = j0.saturating_sub(tile.base) * group;
        let head_range = |ki: usize| ki * head_rows + skip..(ki + 1) * head_rows;

        // Scores, one run of keys sharing a cache block at a time; a slot holds the keys of
        // every KV head side by side, so the heads are the inner loop.
        let mut jj = 0;
        while jj < kb {
            let run = (bs - (j0 + jj) % bs).min(kb - jj);
            let first = kv.offset(tile.table, j0 + jj, kh0);
            for t in 0..run {
                for ki in 0..nk {
                    let at = first + t * sw + ki * d;
                    score_rows(isa, q, d, head_range(ki), &kv.k[at..at + d], s, jj + t);
                }
            }
            jj += run;
        }

        // Online softmax: scale, new running max, probabilities, rescale the output.
        for r in (0..nk).flat_map(head_range) {
            let t = (r % head_rows) / group;
            let visible = (tile.base + t + 1 - j0).min(kb);
            let row = &mut s[r * KEY_BLOCK..][..kb];
            let mut block_max = f32::NEG_INFINITY;
            for x in &mut row[..visible] {
                *x *= attn.scale;
                // Not f32::max, whose NaN rule keeps the loop scalar.
                block_max = if *x > block_max { *x } else { block_max };
            }
            let m_old = m[r];
            let m_new = m_old.max(block_max);
            if m_new == f32::NEG_INFINITY {
                // Every score so far is -inf: nothing to add yet.
                row.fill(0.0);
                continue;
            }
            for x in &mut row[..visible] {
                *x = exp_f32(*x - m_new);
            }
            let sum: f32 = row[..visible].iter().sum();
            row[visible..].fill(0.0);
            let alpha = (m_old - m_new).exp();
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            if alpha != 1.0 {
                for x in &mut o[r * d..][..d] {
                    *x *= alpha;
                }
            }
        }

        // Probabilities times values, by the same runs of keys.
        let mut jj = 0;
        while jj < kb {
            let run = (bs - (j0 + jj) % bs).min(kb - jj);
            let first = kv.offset(tile.table, j0 + jj, kh0);
            let probs = &s[jj..];
            for ki in 0..nk {
                let vals = &kv.v[first + ki * d..];
                for cb in (0..vec_cols).step_by(LANES) {
                    let b = &vals[cb..];
                    bcast_rows(
                        isa,
                        probs,
                        KEY_BLOCK,
                        head_range(ki),
                        run,
                        b,
                        sw,
                        |r, acc| {
                            for (x, &a) in o[r * d + cb..r * d + cb + LANES].iter_mut().zip(acc) {
                                *x += a;
                            }
                        },
                    );
                }
                for c in vec_cols..d {
                    for r in head_range(ki) {
                        let mut acc = 0f32;
                        for t in 0..run {
                            acc += probs[r * KEY_BLOCK + t] * f32_of(vals[t * sw + c]);
                        }
                        o[r * d + c] += acc;
                    }
                }
            }
            jj += run;
        }
    }

    for ki in 0..nk {
        for t in 0..tile.rows {
            for hg in 0..group {
                let r = ki * head_rows + t * group + hg;
                let col = (ki * group + hg) * d;
                let dst = &mut out[t * ldo + col..t * ldo + col + d];
                for (y, &x) in dst.iter_mut().zip(&o[r * d..][..d]) {
                    *y = bf16::from_f32(x / l[r]);
                }
            }
        }
    }
}

/// Checks `k_cache`/`v_cache` against the geometry and returns the paged view and the number
/// of whole blocks they hold.
fn paged_kv<'a>(
    op: &'static str,
    attn: &AttnParams,
    k_cache: &'a [bf16],
    v_cache: &'a [bf16],
) -> Result<(PagedKv<'a>, usize)> {
    let slot_width = numel(op, "k_cache", &[attn.num_kv_heads, attn.head_dim])?;
    let block_elems = numel(op, "k_cache", &[attn.block_size, slot_width])?;
    let num_blocks = k_cache.len().min(v_cache.len()) / block_elems;
    Ok((
        PagedKv {
            k: k_cache,
            v: v_cache,
            block_size: attn.block_size,
            head_dim: attn.head_dim,
            slot_width,
        },
        num_blocks,
    ))
}

/// Checks that the first blocks of `table` (sequence `seq`'s row of `block_tables`) cover
/// `len_k` keys with block ids inside the cache.
fn check_table(
    op: &'static str,
    seq: usize,
    table: &[i32],
    len_k: usize,
    attn: &AttnParams,
    num_blocks: usize,
) -> Result<()> {
    let needed = len_k.div_ceil(attn.block_size);
    if needed > table.len() {
        return Err(Error::Other(format!(
            "op {op}: sequence {seq} has {len_k} keys, which need {needed} blocks of \
             {}, more than max_blocks_per_seq = {}",
            attn.block_size,
            table.len()
        )));
    }
    for (j, &b) in table[..needed].iter().enumerate() {
        if b < 0 || b as usize >= num_blocks {
            return Err(index_error(
                op,
                format!("block_tables[{seq}][{j}]"),
                b as i64,
                num_blocks,
            ));
        }
    }
    Ok(())
}

/// Reads `cu[s]..cu[s + 1]` of a cumulative-length array as a checked range.
fn seq_range(
    op: &'static str,
    name: &'static str,
    cu: &[i32],
    s: usize,
) -> Result<std::ops::Range<usize>> {
    let (a, b) = (cu[s], cu[s + 1]);
    if a < 0 {
        return Err(Error::Other(format!(
            "op {op}: {name}[{s}] = {a} is negative"
        )));
    }
    if b < a {
        return Err(Error::Other(format!(
            "op {op}: {name} decreases from {a} at index {s} to {b} at index {}",
            s + 1
        )));
    }
    Ok(a as usize..b as usize)
}

/// Writes the k and v heads of `n` rows of `qkv` to the slots `slot_mapping` names.
pub(super) fn store_kvcache(
    qkv: &[bf16],
    n: usize,
    attn: &AttnParams,
    slot_mapping: &[i32],
    k_cache: &mut [bf16],
    v_cache: &mut [bf16],
) -> Result<()> {
    const OP: &str = "store_kvcache";
    check_attn(OP, attn)?;
    let width = attn.qkv_width();
    let qkv = prefix(OP, "qkv", qkv, numel(OP, "qkv", &[n, width])?)?;
    let slots = prefix(OP, "slot_mapping", slot_mapping, n)?;
    let slot_width = attn.num_kv_heads * attn.head_dim;
    let num_slots = k_cache.len().min(v_cache.len()) / slot_width;
    for (i, &slot) in slots.iter().enumerate() {
        if slot != -1 && (slot < 0 || slot as usize >= num_slots) {
            return Err(index_error(
                OP,
                format!("slot_mapping[{i}]"),
                slot as i64,
                num_slots,
            ));
        }
    }
    let k_start = attn.num_heads * attn.head_dim;
    let v_start = k_start + slot_width;
    for (row, &slot) in qkv.chunks_exact(width).zip(slots) {
        if slot < 0 {
            continue;
        }
        let dst = slot as usize * slot_width..(slot as usize + 1) * slot_width;
        k_cache[dst.clone()].copy_from_slice(&row[k_start..v_start]);
        v_cache[dst].copy_from_slice(&row[v_start..v_start + slot_width]);
    }
    Ok(())
}

/// Varlen causal prefill attention over the paged cache (see
/// [`crate::Backend::prefill_attention`]); `simd` allows the AVX2 kernels.
#[allow(clippy::too_many_arguments)]
pub(super) fn prefill_attention(
    simd: bool,
    qkv: &[bf16],
    k_cache: &[bf16],
    v_cache: &[bf16],
    cu_seqlens_q: &[i32],
    cu_seqlens_k: &[i32],
    block_tables: &[i32],
    num_seqs: usize,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    attn: &AttnParams,
    out: &mut [bf16],
) -> Result<()> {
    const OP: &str = "prefill_attention";
    check_attn(OP, attn)?;
    let cu_q = prefix(OP, "cu_seqlens_q", cu_seqlens_q, num_seqs + 1)?;
    let cu_k = prefix(OP, "cu_seqlens_k", cu_seqlens_k, num_seqs + 1)?;
    let mbps = attn.max_blocks_per_seq;
    let tables = prefix(
        OP,
        "block_tables",
        block_tables,
        numel(OP, "block_tables", &[num_seqs, mbps])?,
    )?;
    let (kv, num_blocks) = paged_kv(OP, attn, k_cache, v_cache)?;
    if num_seqs == 0 {
        return Ok(());
    }

    // Check every sequence before any work starts.
    let mut seqs = Vec::with_capacity(num_seqs);
    for s in 0..num_seqs {
        let rq = seq_range(OP, "cu_seqlens_q", cu_q, s)?;
        let rk = seq_range(OP, "cu_seqlens_k", cu_k, s)?;
        let (len_q, len_k) = (rq.len(), rk.len());
        if len_q > max_seqlen_q || len_k > max_seqlen_k {
            return Err(Error::Other(format!(
                "op {OP}: sequence {s} has {len_q} queries and {len_k} keys, more than \
                 max_seqlen_q = {max_seqlen_q} or max_seqlen_k = {max_seqlen_k}"
            )));
        }
        if len_k < len_q {
            return Err(Error::Other(format!(
                "op {OP}: sequence {s} has {len_q} queries but only {len_k} keys (its keys \
                 include its queries)"
            )));
        }
        let table = &tables[s * mbps..(s + 1) * mbps];
        check_table(OP, s, table, len_k, attn, num_blocks)?;
        seqs.push((rq, len_k, table));
    }
    let (first_row, total_q) = (cu_q[0] as usize, cu_q[num_seqs] as usize);
    let width = attn.qkv_width();
    let qkv = prefix(OP, "qkv", qkv, numel(OP, "qkv", &[total_q, width])?)?;
    let ow = attn.num_heads * attn.head_dim;
    let out = prefix_mut(OP, "out", out, numel(OP, "out", &[total_q, ow])?)?;

    // Work items in row order, each with its own rows of `out`.
    let tile_rows = (TILE_ROWS / attn.num_heads).max(1);
    let mut items = Vec::new();
    let mut rest = &mut out[first_row * ow..];
    for (rq, len_k, table) in seqs {
        let len_q = rq.len();
        for t0 in (0..len_q).step_by(tile_rows) {
            let rows = tile_rows.min(len_q - t0);
            let row0 = rq.start + t0;
            let tile = Tile {
                q: &qkv[row0 * width..(row0 + rows) * width],
                rows,
                base: len_k - len_q + t0,
                table,
                kv_heads: 0..attn.num_kv_heads,
            };
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(rows * ow);
            rest = tail;
            items.push((tile, chunk));
        }
    }
    items.into_par_iter().for_each(|(tile, chunk)| {
        with_scratch(|sc| attend(simd, &tile, &kv, attn, chunk, ow, sc));
    });
    Ok(())
}

/// Paged decode attention, one query per sequence (see [`crate::Backend::decode_attention`]).
/// A sequence with `context_lens[s] == 0` (padding of a batch) gets a row of zeros; `simd`
/// allows the AVX2 kernels.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention(
    simd: bool,
    qkv: &[bf16],
    k_cache: &[bf16],
    v_cache: &[bf16],
    context_lens: &[i32],
    block_tables: &[i32],
    num_seqs: usize,
    max_context_len: usize,
    attn: &AttnParams,
    out: &mut [bf16],
) -> Result<()> {
    const OP: &str = "decode_attention";
    check_attn(OP, attn)?;
    let lens = prefix(OP, "context_lens", context_lens, num_seqs)?;
    let mbps = attn.max_blocks_per_seq;
    let tables = prefix(
        OP,
        "block_tables",
        block_tables,
        numel(OP, "block_tables", &[num_seqs, mbps])?,
    )?;
    let (kv, num_blocks) = paged_kv(OP, attn, k_cache, v_cache)?;
    for (s, &len) in lens.iter().enumerate() {
        if len < 0 || len as usize > max_context_len {
            return Err(Error::Other(format!(
                "op {OP}: context_lens[{s}] = {len} is negative or above max_context_len = \
                 {max_context_len}"
            )));
        }
        check_table(
            OP,
            s,
            &tables[s * mbps..(s + 1) * mbps],
            len as usize,
            attn,
            num_blocks,
        )?;
    }
    let width = attn.qkv_width();
    let qkv = prefix(OP, "qkv", qkv, numel(OP, "qkv", &[num_seqs, width])?)?;
    let ow = attn.num_heads * attn.head_dim;
    let out = prefix_mut(OP, "out", out, numel(OP, "out", &[num_seqs, ow])?)?;

    // One item per sequence, or per piece of a sequence's KV heads when there are fewer
    // sequences than threads (the heads of a piece are a contiguous part of its output row).
    let group_width = ow / attn.num_kv_heads;
    let pieces = (2 * rayon::current_num_threads())
        .div_ceil(num_seqs.max(1))
        .clamp(1, attn.num_kv_heads);
    let heads_per_item = attn.num_kv_heads.div_ceil(pieces);
    let mut items = Vec::new();
    for (s, row) in out.chunks_mut(ow).enumerate() {
        let len = lens[s] as usize;
        for (p, chunk) in row.chunks_mut(heads_per_item * group_width).enumerate() {
            let kh = p * heads_per_item;
            let tile = Tile {
                q: &qkv[s * width..(s + 1) * width],
                rows: 1,
                base: len.saturating_sub(1),
                table: &tables[s * mbps..(s + 1) * mbps],
                kv_heads: kh..kh + chunk.len() / group_width,
            };
            items.push((tile, len, chunk));
        }
    }
    items.into_par_iter().for_each(|(tile, len, chunk)| {
        if len == 0 {
            chunk.fill(bf16::ZERO);
        } else {
            with_scratch(|sc| attend(simd, &tile, &kv, attn, chunk, ow, sc));
        }
    });
    Ok(())
}
