//! Launchers of the attention kernels (`cuda/attention.cu`): paged decode with flash-decoding
//! splits, and varlen causal prefill on tensor cores, both reading K/V from the paged cache.
//!
//! Called by [`CudaBackend`]'s `prefill_attention` and `decode_attention` (the model's attention
//! layer, once per layer and step). Each launcher checks buffer lengths against the dimensions it
//! was given (an [`Error::Shape`] names the buffer), picks the kernel for the head size (and, for
//! decode, the GQA group size), and queues it on the backend's stream. Values inside device
//! buffers (sequence lengths, block ids) cannot be checked without a device round trip; the
//! kernels clamp them so that bad metadata gives wrong numbers, never an out-of-bounds access.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;
use nanovllm_utils::{Error, Result};

use super::launch::Launch;
use super::{check_len, driver_err, CudaBackend, CudaBuf};
use crate::backend::{AttnParams, QkNormRope};

/// Threads of a decode CTA (4 warps), as `DEC_THREADS` in the kernel source.
const DECODE_THREADS: u32 = 128;
/// A split's token count is a multiple of this (a whole number of warp chunks for every head
/// size and group size).
const SPLIT_GRANULE: usize = 128;
/// Fewest tokens worth a split of their own: below this a CTA's fixed cost (loading q and the
/// block table, merging warps, the partial write) is no longer small against its K/V reads.
/// The kernel spreads each sequence's context over the launch's splits with the same two
/// numbers (`DEC_SPLIT_GRANULE`, `DEC_MIN_SPLIT_TOKENS` in attention.cu).
const MIN_SPLIT_TOKENS: usize = 256;
/// Most block-table entries one decode CTA stages in shared memory (16 KiB of i32).
const MAX_SPLIT_BLOCKS: usize = 4096;
/// Queries of a prefill CTA (`PF_BM`) and keys of one K/V tile (`PF_BN`) in the kernel source.
const PREFILL_BM: usize = 64;
const PREFILL_BN: usize = 64;
/// Threads of a prefill CTA (4 warps of 16 query rows).
const PREFILL_THREADS: u32 = 128;

/// `log2(e)`: the kernels exponentiate in base 2, so scores are scaled by `scale * log2(e)`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

fn cuda_err(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| driver_err(what, e)
}

fn bad_params(op: &'static str, msg: String) -> Error {
    Error::Other(format!("op {op}: {msg}"))
}

/// Checks the head layout and block size both attention kernels need, and returns
/// `log2(block_size)`.
fn check_params(op: &'static str, attn: &AttnParams) -> Result<i32> {
    if attn.num_heads == 0
        || attn.num_kv_heads == 0
        || !attn.num_heads.is_multiple_of(attn.num_kv_heads)
    {
        return Err(bad_params(
            op,
            format!(
                "num_heads ({}) must be a positive multiple of num_kv_heads ({})",
                attn.num_heads, attn.num_kv_heads
            ),
        ));
    }
    if attn.head_dim != 64 && attn.head_dim != 128 {
        return Err(bad_params(
            op,
            format!(
                "head_dim {} is not supported by the CUDA kernels (64 or 128)",
                attn.head_dim
            ),
        ));
    }
    if !attn.block_size.is_power_of_two() || attn.block_size > 256 {
        return Err(bad_params(
            op,
            format!(
                "block_size {} must be a power of two no larger than 256",
                attn.block_size
            ),
        ));
    }
    // The kernels take the softmax max over raw scores, which needs a positive scale.
    if !(attn.scale > 0.0 && attn.scale.is_finite()) {
        return Err(bad_params(
            op,
            format!("softmax scale {} must be positive and finite", attn.scale),
        ));
    }
    Ok(attn.block_size.trailing_zeros() as i32)
}

/// `a * b`, or a shape error on `tensor` when the product overflows.
fn mul(op: &'static str, tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            bad_params(
                op,
                format!("tensor `{tensor}` with dimensions {dims:?} is too large"),
            )
        })
}

/// Converts a host-side dimension to the `int` a kernel takes.
fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad_params(op, format!("{what} = {v} does not fit in an i32")))
}

/// Checks the K/V caches (whole blocks of `[block_size, num_kv_heads, head_dim]`, the same
/// count in both) and returns the number of blocks.
fn check_cache(
    op: &'static str,
    k_cache: &CudaBuf<bf16>,
    v_cache: &CudaBuf<bf16>,
    attn: &AttnParams,
) -> Result<usize> {
    let block_elems = mul(
        op,
        "k_cache",
        &[attn.block_size, attn.num_kv_heads, attn.head_dim],
    )?;
    let num_blocks = k_cache.len() / block_elems;
    check_len(op, "k_cache", k_cache, block_elems)?;
    check_len(op, "v_cache", v_cache, num_blocks * block_elems)?;
    Ok(num_blocks)
}

/// How a decode call is cut into flash-decoding splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeSplits {
    /// Splits per (sequence, kv head); 1 means no reduce pass.
    pub num_splits: usize,
    /// Most tokens of a split (a multiple of [`SPLIT_GRANULE`]; what sizes the block-table
    /// slice a CTA stages). The kernel gives each sequence splits of its own size: its context
    /// spread evenly over the `num_splits` (whole granules, at least [`MIN_SPLIT_TOKENS`],
    /// at most this), so that in a CUDA graph captured for the model's longest context a
    /// shorter one still keeps several splits busy.
    pub tokens_per_split: usize,
}

/// Picks the split of a decode call. A function of its arguments alone, so that a CUDA graph
/// captured with `max_context_len = max_model_len` stays valid for every shorter context.
///
/// `base` CTAs (one per sequence and kv head) are enough when they reach `wave`, the CTAs to
/// aim for (`num_sms * ctas_per_sm` resident CTAs times [`DECODE_WAVES`]); otherwise each
/// context is cut into as many splits as keep the CTA count within `wave` (never splits
/// shorter than [`MIN_SPLIT_TOKENS`]), since decode is bound by memory bandwidth: a full wave
/// keeps every SM's loads in flight, and a second one lets SMs that drew short contexts take
/// more work.
pub(crate) fn decode_splits(
    num_seqs: usize,
    num_kv_heads: usize,
    max_context_len: usize,
    block_size: usize,
    wave: usize,
) -> DecodeSplits {
    let base = (num_seqs * num_kv_heads).max(1);
    let max_ctx = max_context_len.max(1);
    let by_len = max_ctx.div_ceil(MIN_SPLIT_TOKENS).max(1);
    let want = if base >= wave { 1 } else { wave / base };
    let mut splits = want.clamp(1, by_len);
    let max_tps = (((MAX_SPLIT_BLOCKS - 1) * block_size) / SPLIT_GRANULE).max(1) * SPLIT_GRANULE;
    let tokens_per_split = max_ctx
        .div_ceil(splits)
        .next_multiple_of(SPLIT_GRANULE)
        .min(max_tps);
    splits = max_ctx.div_ceil(tokens_per_split);
    DecodeSplits {
        num_splits: splits,
        tokens_per_split,
    }
}

/// Waves of resident CTAs decode attention aims for: splits are added until `num_seqs *
/// num_kv_heads * splits` fills this many. One wave is enough when every context is equally
/// long; with the mixed lengths of real batches a CTA per sequence leaves the SMs that got
/// short contexts idle while the longest run on, and more, shorter CTAs even that out (a long
/// context is cut into more splits, a short one keeps its one): two waves measured best on the
/// Qwen3-8B workload (docs/perf-notes.md, "Decode attention's balance").
/// `NANOVLLM_ATTN_WAVES` overrides it.
const DECODE_WAVES: usize = 2;

/// Most waves `NANOVLLM_ATTN_WAVES` may ask for (splits are capped by the context anyway).
const MAX_DECODE_WAVES: usize = 64;

/// [`DECODE_WAVES`], or `NANOVLLM_ATTN_WAVES` where set, within 1..=[`MAX_DECODE_WAVES`] (an
/// error when it is not a number).
fn decode_waves() -> Result<usize> {
    static WAVES: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    super::env_once(&WAVES, || {
        nanovllm_utils::env_count("NANOVLLM_ATTN_WAVES", DECODE_WAVES, "waves")
            .map(|w| w.clamp(1, MAX_DECODE_WAVES))
    })
    .copied()
}

/// The kernel names `<prefix>_hd{64,128}_g{1..8}` of one family, by [head size 64 / 128]
/// [query heads per kv head - 1].
macro_rules! by_head_and_group {
    ($p:literal) => {
        [
            [
                concat!($p, "_hd64_g1"),
                concat!($p, "_hd64_g2"),
                concat!($p, "_hd64_g3"),
                concat!($p, "_hd64_g4"),
                concat!($p, "_hd64_g5"),
                concat!($p, "_hd64_g6"),
                concat!($p, "_hd64_g7"),
                concat!($p, "_hd64_g8"),
            ],
            [
                concat!($p, "_hd128_g1"),
                concat!($p, "_hd128_g2"),
                concat!($p, "_hd128_g3"),
                concat!($p, "_hd128_g4"),
                concat!($p, "_hd128_g5"),
                concat!($p, "_hd128_g6"),
                concat!($p, "_hd128_g7"),
                concat!($p, "_hd128_g8"),
            ],
        ]
    };
}

/// Decode kernels by [head size 64 / 128][group size - 1].
const DECODE_KERNELS: [[&str; 8]; 2] = by_head_and_group!("attn_decode");

/// The decode kernels with Qwen3's q/k norm, RoPE and K/V store folded in, by the same index
/// as [`DECODE_KERNELS`].
const DECODE_ROPE_KERNELS: [[&str; 8]; 2] = by_head_and_group!("attn_decode_rope");

/// The balanced decode kernels, by the same index as [`DECODE_KERNELS`].
const BALANCED_KERNELS: [[&str; 8]; 2] = by_head_and_group!("attn_decode_bal");

/// Resident CTAs per SM of each decode kernel (same index as [`DECODE_KERNELS`]), asked of
/// the driver once; 0 until then. The kernels are the same PTX on every GPU of a process.
static DECODE_CTAS_PER_SM: [[AtomicU32; 8]; 2] = [const { [const { AtomicU32::new(0) }; 8] }; 2];

/// Loads a kernel of the attention module.
fn func(be: &CudaBackend, name: &str) -> Result<CudaFunction> {
    be.func("attention", name)
}

/// Paged decode attention; see [`crate::Backend::decode_attention`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
    be: &CudaBackend,
    qkv: &CudaBuf<bf16>,
    k_cache: &CudaBuf<bf16>,
    v_cache: &CudaBuf<bf16>,
    context_lens: &CudaBuf<i32>,
    block_tables: &CudaBuf<i32>,
    num_seqs: usize,
    max_context_len: usize,
    attn: &AttnParams,
    out: &mut CudaBuf<bf16>,
) -> Result<()> {
    decode(
        be,
        "decode_attention",
        qkv,
        (k_cache, v_cache),
        (context_lens, block_tables),
        num_seqs,
        max_context_len,
        attn,
        out,
        None,
    )
}

/// Whether decode attention folds in Qwen3's q/k norm, RoPE and K/V store
/// ([`decode_attention_rope`]): `NANOVLLM_ATTN_ROPE=1`. Off by default: it saves a kernel per
/// layer but its CTAs start later, and the Qwen3-8B workload measured 1-5 % slower with it on
/// two H100s and two H200s (docs/perf-notes.md, "Qwen3's q/k norm and RoPE inside decode
/// attention").
fn rope_decode() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| nanovllm_utils::env_switch("NANOVLLM_ATTN_ROPE", false))
}

/// The checked q/k norm + RoPE + store arguments of an `attn_decode_rope_hd*_g*` launch.
struct RopeLaunch<'a> {
    rope: &'a QkNormRope<'a, CudaBackend>,
    slot_mapping: &'a CudaBuf<i32>,
    max_position: i32,
    num_slots: i64,
}

/// Decode attention with Qwen3's q/k norm, RoPE and K/V store folded in, one
/// `attn_decode_rope_hd*_g*` launch (plus the split reduce where there are splits); see
/// [`crate::Backend::decode_attention_rope`]. Returns `false`, having queued nothing, where the
/// fused kernel is off (the default, see [`rope_decode`]; or the balanced kernel chosen): the
/// caller then runs `qk_norm_rope_store` and `decode_attention`. The splits are those of the
/// plain kernel, so both forms give the same bits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention_rope(
    be: &CudaBackend,
    qkv: &CudaBuf<bf16>,
    rope: &QkNormRope<'_, CudaBackend>,
    slot_mapping: &CudaBuf<i32>,
    k_cache: &mut CudaBuf<bf16>,
    v_cache: &mut CudaBuf<bf16>,
    (context_lens, block_tables): (&CudaBuf<i32>, &CudaBuf<i32>),
    num_seqs: usize,
    max_context_len: usize,
    attn: &AttnParams,
    out: &mut CudaBuf<bf16>,
) -> Result<bool> {
    const OP: &str = "decode_attention_rope";
    if balanced_decode() || !rope_decode() {
        return Ok(false);
    }
    let r = super::ops::rope_args(
        OP,
        qkv,
        num_seqs,
        attn,
        rope.q_norm,
        rope.k_norm,
        rope.positions,
        rope.cos_sin,
    )?;
    let (_, num_slots) =
        super::ops::cache_slots(OP, attn, num_seqs, slot_mapping, k_cache, v_cache)?;
    // The kernel writes the caches through these addresses; the exclusive borrows above are
    // held until it is queued.
    let caches = (&*k_cache, &*v_cache);
    decode(
        be,
        OP,
        qkv,
        caches,
        (context_lens, block_tables),
        num_seqs,
        max_context_len,
        attn,
        out,
        Some(RopeLaunch {
            rope,
            slot_mapping,
            max_position: r.max_position,
            num_slots,
        }),
    )?;
    Ok(true)
}

/// The launch behind [`decode_attention`] and [`decode_attention_rope`] (`rope`: the fused
/// kernel's extra arguments, checked by the caller).
#[allow(clippy::too_many_arguments)]
fn decode(
    be: &CudaBackend,
    op: &'static str,
    qkv: &CudaBuf<bf16>,
    (k_cache, v_cache): (&CudaBuf<bf16>, &CudaBuf<bf16>),
    (context_lens, block_tables): (&CudaBuf<i32>, &CudaBuf<i32>),
    num_seqs: usize,
    max_context_len: usize,
    attn: &AttnParams,
    out: &mut CudaBuf<bf16>,
    rope: Option<RopeLaunch<'_>>,
) -> Result<()> {
    let log2_bs = check_params(op, attn)?;
    let group = attn.num_heads / attn.num_kv_heads;
    if group > 8 {
        return Err(bad_params(
            op,
            format!(
                "{} query heads per kv head is not supported (at most 8)",
                group
            ),
        ));
    }
    let qkv_width = attn.qkv_width();
    let out_width = attn.num_heads * attn.head_dim;
    check_len(op, "qkv", qkv, mul(op, "qkv", &[num_seqs, qkv_width])?)?;
    check_len(op, "out", out, mul(op, "out", &[num_seqs, out_width])?)?;
    check_len(op, "context_lens", context_lens, num_seqs)?;
    check_len(
        op,
        "block_tables",
        block_tables,
        mul(op, "block_tables", &[num_seqs, attn.max_blocks_per_seq])?,
    )?;
    let num_blocks = check_cache(op, k_cache, v_cache, attn)?;
    // No context can be longer than its block_tables row addresses: the kernels never look
    // past it.
    let max_context_len = max_context_len.min(mul(
        op,
        "block_tables",
        &[attn.max_blocks_per_seq, attn.block_size],
    )?);
    if num_seqs == 0 {
        return Ok(());
    }
    if rope.is_none() && balanced_decode() {
        let a = DecodeArgs {
            qkv,
            k_cache,
            v_cache,
            context_lens,
            block_tables,
            num_seqs,
            max_context_len,
            num_blocks,
            log2_bs,
        };
        if decode_attention_balanced(be, &a, attn, out)? {
            return Ok(());
        }
    }

    let hd_index = usize::from(attn.head_dim == 128);
    let family = match rope {
        Some(_) => DECODE_ROPE_KERNELS,
        None => DECODE_KERNELS,
    };
    let kernel = func(be, family[hd_index][group - 1])?;
    let cached = &DECODE_CTAS_PER_SM[hd_index][group - 1];
    let mut ctas_per_sm = cached.load(Ordering::Relaxed);
    if ctas_per_sm == 0 {
        // Occupancy with the largest block-table slice a split can stage, of the plain kernel
        // (the splits, and so the bits, must not depend on which of the two runs).
        ctas_per_sm = func(be, DECODE_KERNELS[hd_index][group - 1])?
            .occupancy_max_active_blocks_per_multiprocessor(
                DECODE_THREADS,
                MAX_SPLIT_BLOCKS * 4,
                None,
            )
            .map_err(cuda_err("decode_attention: occupancy query"))?
            .max(1);
        cached.store(ctas_per_sm, Ordering::Relaxed);
    }
    let wave = be.num_sms() * ctas_per_sm as usize * decode_waves()?;
    let splits = decode_splits(
        num_seqs,
        attn.num_kv_heads,
        max_context_len,
        attn.block_size,
        wave,
    );
    let smem_bytes = (splits.tokens_per_split.div_ceil(attn.block_size) + 1) * 4;

    let stream: &Arc<CudaStream> = be.stream();
    let qkv_stride = to_i32(op, "qkv row width", qkv_width)?;
    let mbps = to_i32(op, "max_blocks_per_seq", attn.max_blocks_per_seq)?;
    let nkv = to_i32(op, "num_kv_heads", attn.num_kv_heads)?;
    let scale_log2 = attn.scale * LOG2_E;
    let tps = to_i32(op, "tokens_per_split", splits.tokens_per_split)?;
    let nsplit = to_i32(op, "num_splits", splits.num_splits)?;
    let max_ctx = to_i32(op, "max_context_len", max_context_len)?;
    let nblocks = to_i32(op, "num_blocks", num_blocks)?;
    let cfg = LaunchConfig {
        grid_dim: (
            attn.num_kv_heads as u32,
            num_seqs as u32,
            splits.num_splits as u32,
        ),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    };

    if splits.num_splits == 1 {
        // The kernel writes `out` directly; the partial pointers are never read.
        let mut b = Launch::new(stream, &kernel);
        b.arg(qkv.raw())
            .arg(&qkv_stride)
            .arg(k_cache.raw())
            .arg(v_cache.raw())
            .arg(context_lens.raw())
            .arg(block_tables.raw())
            .arg(&mbps)
            .arg(&nkv)
            .arg(&nblocks)
            .arg(&log2_bs)
            .arg(&scale_log2)
            .arg(&max_ctx)
            .arg(&tps)
            .arg(&nsplit)
            .arg(out.raw_mut())
            .arg(&0u64)
            .arg(&0u64)
            .arg(&0u64);
        if let Some(r) = &rope {
            push_rope(&mut b, r);
        }
        // SAFETY: the argument list matches `attn_decode_hd*_g*` (pointers, then ints/floats in
        // the kernel's order); every buffer was checked above to hold the elements the grid
        // touches (num_seqs rows of qkv/out/context_lens/block_tables), cache reads are bounded
        // by the clamped block ids, and with one split the null partial and counter pointers
        // are unused. With `rope`, the fused kernel's further arguments (checked by
        // `decode_attention_rope`): d-element norms, num_seqs positions and slots, cos/sin
        // rows clamped to max_position, and its K/V stores go only to slots in
        // [0, num_slots), rows both caches hold.
        unsafe { b.launch(cfg) }.map_err(cuda_err("decode_attention: launch"))?;
        return Ok(());
    }

    let parts = num_seqs * attn.num_heads * splits.num_splits;
    let ml_len = 2 * parts;
    let mut scratch = be.scratch_f32(ml_len + parts * attn.head_dim)?;
    let (mut part_ml, mut part_o) = scratch.split_at_mut(ml_len);
    let fused = fused_split_reduce();
    let mut counters = if fused {
        Some(be.split_counters(num_seqs * attn.num_kv_heads)?)
    } else {
        None
    };
    let mut b = Launch::new(stream, &kernel);
    b.arg(qkv.raw())
        .arg(&qkv_stride)
        .arg(k_cache.raw())
        .arg(v_cache.raw())
        .arg(context_lens.raw())
        .arg(block_tables.raw())
        .arg(&mbps)
        .arg(&nkv)
        .arg(&nblocks)
        .arg(&log2_bs)
        .arg(&scale_log2)
        .arg(&max_ctx)
        .arg(&tps)
        .arg(&nsplit)
        .arg(out.raw_mut())
        .arg(&mut part_ml)
        .arg(&mut part_o);
    match counters.as_deref_mut() {
        Some(c) => b.arg(c),
        None => b.arg(&0u64),
    };
    if let Some(r) = &rope {
        push_rope(&mut b, r);
    }
    // SAFETY: as above; the scratch holds 2 floats of (max, sum) and head_dim floats of output
    // for every (sequence, head, split) the grid writes; the counters (when passed) hold one
    // zeroed u32 per (sequence, kv head), each reset by the CTA that counts last; `rope` as
    // for one split.
    unsafe { b.launch(cfg) }.map_err(cuda_err("decode_attention: launch"))?;
    if fused {
        return Ok(());
    }

    let reduce = func(be, "attn_decode_reduce")?;
    let hd = attn.head_dim as i32;
    let rcfg = LaunchConfig {
        grid_dim: (attn.num_heads as u32, num_seqs as u32, 1),
        block_dim: (attn.head_dim as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = Launch::new(stream, &reduce);
    b.arg(&mut part_ml)
        .arg(&mut part_o)
        .arg(context_lens.raw())
        .arg(&max_ctx)
        .arg(&tps)
        .arg(&nsplit)
        .arg(&hd)
        .arg(out.raw_mut());
    // SAFETY: `attn_decode_reduce` reads the partials the launch above wrote (same stream, so
    // ordered after it) for num_seqs x num_heads x num_splits entries, and writes num_seqs rows
    // of num_heads * head_dim to `out`, checked above.
    unsafe { b.launch(rcfg) }.map_err(cuda_err("decode_attention: reduce launch"))?;
    Ok(())
}

/// Appends the arguments `attn_decode_rope_hd*_g*` takes after the plain kernel's.
fn push_rope<'a>(b: &mut Launch<'a>, r: &'a RopeLaunch<'a>) {
    b.arg(r.rope.q_norm.raw())
        .arg(r.rope.k_norm.raw())
        .arg(&r.rope.eps)
        .arg(r.rope.positions.raw())
        .arg(r.rope.cos_sin.raw())
        .arg(&r.max_position)
        .arg(r.slot_mapping.raw())
        .arg(&r.num_slots);
}

/// The checked inputs of one decode attention call, for the balanced launcher.
struct DecodeArgs<'a> {
    qkv: &'a CudaBuf<bf16>,
    k_cache: &'a CudaBuf<bf16>,
    v_cache: &'a CudaBuf<bf16>,
    context_lens: &'a CudaBuf<i32>,
    block_tables: &'a CudaBuf<i32>,
    num_seqs: usize,
    /// Already clamped to what a block-table row addresses.
    max_context_len: usize,
    num_blocks: usize,
    log2_bs: i32,
}

/// Fewest tokens of a balanced decode CTA's range (a multiple of the kernel's
/// `DEC_BAL_GRANULE`, 32): with few tokens in the batch, fewer CTAs get more than one warp
/// chunk each rather than every CTA a sliver.
const BALANCED_MIN_CHUNK: usize = 256;

/// Sequences whose prefix sums the balanced kernel's occupancy is asked with (its shared
/// memory holds one i32 per sequence); a larger batch asks again.
const BALANCED_OCCUPANCY_SEQS: usize = 1024;

/// Resident CTAs per SM of each balanced decode kernel (head size, group size), as
/// [`DECODE_CTAS_PER_SM`].
static BALANCED_CTAS_PER_SM: [[AtomicU32; 8]; 2] = [const { [const { AtomicU32::new(0) }; 8] }; 2];

/// Decode attention by `attn_decode_bal_hd*_g*`: a whole number of waves of CTAs, each
/// reading the same number of K/V tokens of the batch's contexts laid end to end (the kernel
/// source describes the partition). Returns `false`, having queued nothing, where a batch is
/// too large for its positions to fit an i32 or its prefix sums to fit shared memory; the
/// split kernel then runs instead.
fn decode_attention_balanced(
    be: &CudaBackend,
    a: &DecodeArgs<'_>,
    attn: &AttnParams,
    out: &mut CudaBuf<bf16>,
) -> Result<bool> {
    const OP: &str = "decode_attention";
    let group = attn.num_heads / attn.num_kv_heads;
    let smem_bytes = (a.num_seqs + 1) * 4;
    if smem_bytes > 32 * 1024 {
        return Ok(false);
    }
    let hd_index = usize::from(attn.head_dim == 128);
    let kernel = func(be, BALANCED_KERNELS[hd_index][group - 1])?;
    let cached = &BALANCED_CTAS_PER_SM[hd_index][group - 1];
    let occupancy = |seqs: usize| {
        kernel
            .occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, (seqs + 1) * 4, None)
            .map_err(cuda_err("decode_attention: occupancy query"))
            .map(|c| c.max(1))
    };
    let ctas_per_sm = if a.num_seqs <= BALANCED_OCCUPANCY_SEQS {
        let mut c = cached.load(Ordering::Relaxed);
        if c == 0 {
            c = occupancy(BALANCED_OCCUPANCY_SEQS)?;
            cached.store(c, Ordering::Relaxed);
        }
        c
    } else {
        occupancy(a.num_seqs)?
    };
    let (waves, piece_cost) = balanced_tuning()?;
    // A whole number of chunks, each one CTA per kv head.
    let nchunks = (be.num_sms() * ctas_per_sm as usize * waves / attn.num_kv_heads).max(1);
    let grid = nchunks * attn.num_kv_heads;
    // Every position the kernel forms (a CTA's range, rounded up) stays within an i32.
    let total = (a.num_seqs as u64) * (a.max_context_len as u64 + piece_cost as u64);
    if 2 * total + (grid as u64 + 1) * (BALANCED_MIN_CHUNK as u64 + 32) > i32::MAX as u64 {
        return Ok(false);
    }
    let num_slots = nchunks + a.num_seqs;
    let entries = attn.num_heads * num_slots;
    let ml_len = 2 * entries;
    let mut scratch = be.scratch_f32(ml_len + entries * attn.head_dim)?;
    let (mut part_ml, mut part_o) = scratch.split_at_mut(ml_len);
    let mut counters = be.split_counters(a.num_seqs * attn.num_kv_heads)?;

    let qkv_stride = to_i32(OP, "qkv row width", attn.qkv_width())?;
    let mbps = to_i32(OP, "max_blocks_per_seq", attn.max_blocks_per_seq)?;
    let nkv = to_i32(OP, "num_kv_heads", attn.num_kv_heads)?;
    let scale_log2 = attn.scale * LOG2_E;
    let max_ctx = to_i32(OP, "max_context_len", a.max_context_len)?;
    let nblocks = to_i32(OP, "num_blocks", a.num_blocks)?;
    let nseqs = to_i32(OP, "num_seqs", a.num_seqs)?;
    let min_chunk = BALANCED_MIN_CHUNK as i32;
    let cost = to_i32(OP, "piece cost", piece_cost)?;
    let slots = to_i32(OP, "partial slots", num_slots)?;
    let cfg = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    };
    let mut b = Launch::new(be.stream(), &kernel);
    b.arg(a.qkv.raw())
        .arg(&qkv_stride)
        .arg(a.k_cache.raw())
        .arg(a.v_cache.raw())
        .arg(a.context_lens.raw())
        .arg(a.block_tables.raw())
        .arg(&mbps)
        .arg(&nkv)
        .arg(&nblocks)
        .arg(&a.log2_bs)
        .arg(&scale_log2)
        .arg(&max_ctx)
        .arg(&nseqs)
        .arg(&min_chunk)
        .arg(&cost)
        .arg(&slots)
        .arg(out.raw_mut())
        .arg(&mut part_ml)
        .arg(&mut part_o)
        .arg(&mut *counters);
    // SAFETY: the argument list matches `attn_decode_bal_hd*_g*`; the caller checked that
    // qkv, out, context_lens and block_tables hold num_seqs rows and that the caches hold
    // num_blocks blocks (block ids and contexts are clamped in the kernel); the scratch holds
    // (max, sum) and head_dim floats for num_heads x num_slots entries (slots as the kernel
    // numbers them: one per chunk plus one per sequence), the counters one zeroed u32 per
    // (sequence, kv head), each reset by the CTA that counts last, and the dynamic shared
    // memory num_seqs + 1 i32.
    unsafe { b.launch(cfg) }.map_err(cuda_err("decode_attention: launch"))?;
    Ok(true)
}

/// Waves of CTAs of the balanced decode kernel (`NANOVLLM_ATTN_BAL_WAVES`, default 1, at most
/// 16) and the tokens of K/V a piece's fixed cost is counted as (`NANOVLLM_ATTN_BAL_COST`,
/// default 32, at most 4096).
fn balanced_tuning() -> Result<(usize, usize)> {
    static T: OnceLock<std::result::Result<(usize, usize), String>> = OnceLock::new();
    super::env_once(&T, || {
        let waves = nanovllm_utils::env_count("NANOVLLM_ATTN_BAL_WAVES", 1, "waves")?;
        let cost = nanovllm_utils::env_count("NANOVLLM_ATTN_BAL_COST", 32, "tokens")?;
        Ok((waves.clamp(1, 16), cost.min(4096)))
    })
    .copied()
}

/// Whether decode attention runs balanced (`attn_decode_bal_hd*_g*`): `NANOVLLM_ATTN_BALANCED`,
/// off by default. It beats the split kernel on mixed context lengths in no particular order;
/// the engine runs a batch longest context first, which brings the split kernel to the copy
/// bandwidth, and there the balanced one measured slower (docs/perf-notes.md, "Balanced decode
/// attention").
fn balanced_decode() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| nanovllm_utils::env_switch("NANOVLLM_ATTN_BALANCED", false))
}

/// Whether the last split CTA of decode attention combines the splits itself instead of a
/// separate reduce kernel: `NANOVLLM_ATTN_FUSED_REDUCE=1`. Off by default: it passes op_check
/// but measured no faster on an H100 (docs/perf-notes.md).
fn fused_split_reduce() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| nanovllm_utils::env_switch("NANOVLLM_ATTN_FUSED_REDUCE", false))
}

/// Varlen causal prefill attention over the paged cache; see [`crate::Backend::prefill_attention`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefill_attention(
    be: &CudaBackend,
    qkv: &CudaBuf<bf16>,
    k_cache: &CudaBuf<bf16>,
    v_cache: &CudaBuf<bf16>,
    cu_seqlens_q: &CudaBuf<i32>,
    cu_seqlens_k: &CudaBuf<i32>,
    block_tables: &CudaBuf<i32>,
    num_seqs: usize,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    attn: &AttnParams,
    out: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "prefill_attention";
    let log2_bs = check_params(OP, attn)?;
    let qkv_width = attn.qkv_width();
    let out_width = attn.num_heads * attn.head_dim;
    // Every query row lies in the first cu_seqlens_q[num_seqs] rows, which the host cannot see;
    // a batch holds at least its longest sequence, and the kernel skips rows past the buffers.
    check_len(OP, "qkv", qkv, mul(OP, "qkv", &[max_seqlen_q, qkv_width])?)?;
    check_len(OP, "out", out, mul(OP, "out", &[max_seqlen_q, out_width])?)?;
    check_len(OP, "cu_seqlens_q", cu_seqlens_q, num_seqs + 1)?;
    check_len(OP, "cu_seqlens_k", cu_seqlens_k, num_seqs + 1)?;
    check_len(
        OP,
        "block_tables",
        block_tables,
        mul(OP, "block_tables", &[num_seqs, attn.max_blocks_per_seq])?,
    )?;
    let num_blocks = check_cache(OP, k_cache, v_cache, attn)?;
    let max_seqlen_k = max_seqlen_k.min(mul(
        OP,
        "block_tables",
        &[attn.max_blocks_per_seq, attn.block_size],
    )?);
    if num_seqs == 0 || max_seqlen_q == 0 {
        return Ok(());
    }

    let kernel = func(
        be,
        if attn.head_dim == 128 {
            "attn_prefill_hd128"
        } else {
            "attn_prefill_hd64"
        },
    )?;
    // Two stages of K and V tiles; Q passes through K's second stage (PREFILL_BM <= PREFILL_BN).
    let smem_bytes = 4 * PREFILL_BN * attn.head_dim * 2;
    kernel
        .set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_bytes as i32,
        )
        .map_err(cuda_err("prefill_attention: shared-memory limit"))?;
    let q_rows = (qkv.len() / qkv_width).min(out.len() / out_width);
    let q_tiles = max_seqlen_q.div_ceil(PREFILL_BM);
    let cfg = LaunchConfig {
        grid_dim: (attn.num_heads as u32, num_seqs as u32, q_tiles as u32),
        block_dim: (PREFILL_THREADS, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    };
    let qkv_stride = to_i32(OP, "qkv row width", qkv_width)?;
    let q_rows = to_i32(OP, "rows of qkv", q_rows)?;
    let mbps = to_i32(OP, "max_blocks_per_seq", attn.max_blocks_per_seq)?;
    let nkv = to_i32(OP, "num_kv_heads", attn.num_kv_heads)?;
    let nblocks = to_i32(OP, "num_blocks", num_blocks)?;
    let max_k = to_i32(OP, "max_seqlen_k", max_seqlen_k)?;
    let scale_log2 = attn.scale * LOG2_E;
    let stream = be.stream();
    let mut b = Launch::new(stream, &kernel);
    b.arg(qkv.raw())
        .arg(&qkv_stride)
        .arg(&q_rows)
        .arg(k_cache.raw())
        .arg(v_cache.raw())
        .arg(cu_seqlens_q.raw())
        .arg(cu_seqlens_k.raw())
        .arg(block_tables.raw())
        .arg(&mbps)
        .arg(&nkv)
        .arg(&nblocks)
        .arg(&max_k)
        .arg(&log2_bs)
        .arg(&scale_log2)
        .arg(out.raw_mut());
    // SAFETY: the argument list matches `attn_prefill_hd*`; the cu_seqlens and block_tables
    // rows the grid reads were checked above, query rows are bounded by q_rows (the rows both
    // qkv and out hold), key counts by max_seqlen_k (within a block_tables row) and block ids
    // are clamped to the cache's num_blocks; the dynamic shared memory was raised to what the
    // kernel uses.
    unsafe { b.launch(cfg) }.map_err(cuda_err("prefill_attention: launch"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every decode kernel the launchers name is an entry of the attention module's PTX (the
    /// shipped one, or nvcc's), so no name in the tables is misspelt.
    #[test]
    fn decode_kernel_names_are_ptx_entries() {
        let ptx = super::super::KERNEL_MODULES
            .iter()
            .find(|(name, _, _)| *name == "attention")
            .map(|(_, ptx, _)| *ptx)
            .expect("the attention module is built");
        let tables = [DECODE_KERNELS, DECODE_ROPE_KERNELS, BALANCED_KERNELS];
        for name in tables.iter().flatten().flatten() {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} is not a kernel of attention.ptx"
            );
        }
        assert!(
            !ptx.contains(".entry attn_decode_hd96_g1("),
            "the check can fail"
        );
    }

    #[test]
    fn large_batches_do_not_split() {
        let s = decode_splits(256, 8, 1024, 256, 132 * 4);
        assert_eq!(s.num_splits, 1);
        assert!(s.tokens_per_split >= 1024);
    }

    /// Two waves (the default) split the contexts of a tp 2 rank of Qwen3-8B (4 KV heads) at
    /// batch 128 in two, where one wave (512 of 528 resident CTAs) left them whole; 256
    /// sequences on 8 KV heads fill both waves unsplit.
    #[test]
    fn two_waves_split_a_batch_that_one_wave_holds() {
        let wave = 132 * 4;
        assert_eq!(decode_splits(128, 4, 4096, 256, wave).num_splits, 1);
        assert_eq!(
            decode_splits(128, 4, 4096, 256, wave * DECODE_WAVES).num_splits,
            2
        );
        assert_eq!(
            decode_splits(256, 8, 4096, 256, wave * DECODE_WAVES).num_splits,
            1
        );
    }

    #[test]
    fn small_batches_split_long_contexts_to_fill_a_wave() {
        let s = decode_splits(16, 8, 8192, 256, 132 * 4);
        assert_eq!(s.num_splits, 4);
        assert_eq!(s.tokens_per_split, 2048);
        // One sequence: as many splits as the context allows, none shorter than the minimum.
        let s = decode_splits(1, 8, 8192, 16, 132 * 4);
        assert_eq!(s.num_splits, 32);
        assert_eq!(s.tokens_per_split, 256);
        let s = decode_splits(1, 8, 100, 16, 132 * 4);
        assert_eq!(
            s,
            DecodeSplits {
                num_splits: 1,
                tokens_per_split: 128
            }
        );
    }

    #[test]
    fn splits_cover_the_context_and_fit_the_block_table_slice() {
        for &(n, ctx, bs) in &[
            (1, 200_000, 16),
            (3, 40_960, 16),
            (7, 5_000, 256),
            (512, 1, 16),
        ] {
            let s = decode_splits(n, 8, ctx, bs, 528);
            assert!(s.num_splits * s.tokens_per_split >= ctx);
            assert!((s.num_splits - 1) * s.tokens_per_split < ctx);
            assert_eq!(s.tokens_per_split % SPLIT_GRANULE, 0);
            assert!(s.tokens_per_split.div_ceil(bs) < MAX_SPLIT_BLOCKS);
        }
    }
}
