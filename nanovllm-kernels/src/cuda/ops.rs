//! Launchers of the memory-bound kernels (`cuda/norm.cu`, `rope.cu` (q/k norm + rope, alone
//! or fused with the KV-cache store), `kvcache.cu`, `activation.cu`, `embedding.cu`) and of
//! the sampler (`cuda/sampling.cu`), called by [`CudaBackend`]'s `Backend` methods.
//!
//! Each launcher checks every buffer's length against the dimensions it was given (an
//! [`Error::Shape`] names the op and the buffer), turns the dimensions into the kernel's
//! integer types, picks the grid, and queues the kernel on the backend's stream. The
//! comments at the top of each `.cu` file explain the thread layout chosen here.

use cudarc::driver::{CudaFunction, CudaSlice, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use nanovllm_utils::{Error, Result};

use super::launch::Launch;
use super::{check_len, driver_err, CudaBackend, CudaBuf};
use crate::backend::{AttnParams, SamplingBufs};

/// `a * b` elements, or an error naming the op and tensor when it overflows.
pub(super) fn numel(op: &'static str, tensor: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::Other(format!(
            "op {op}: tensor `{tensor}` of {a} x {b} elements is larger than memory"
        ))
    })
}

/// A dimension as the kernels' `int`.
fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Other(format!(
            "op {op}: {what} = {v} exceeds what the CUDA kernels index (2^31 - 1)"
        ))
    })
}

/// A grid dimension.
fn grid(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::Other(format!("op {op}: {what} = {v} is too many CUDA blocks")))
}

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launch_err(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| driver_err(&format!("{op}: kernel launch"), e)
}

/// Threads per row of the RMSNorm kernels: enough for VPT = 4 vectors of 8 elements each
/// (`VPT` in norm.cu), a whole number of warps; 256 on the scalar path. The fused all-reduce +
/// add-norm of custom_ar.cu sums in the same groups of threads.
pub(super) fn norm_threads(hidden: usize) -> u32 {
    const VPT: usize = 4;
    if hidden.is_multiple_of(8) && hidden / 8 <= VPT * 1024 {
        (hidden / 8).div_ceil(VPT).div_ceil(32).clamp(1, 32) as u32 * 32
    } else {
        256
    }
}

/// 16-byte vectors of a row copy kernel: enough warps for a row of `width` bf16, at most 128.
fn row_threads(width: usize) -> u32 {
    let vecs = if width.is_multiple_of(8) {
        width / 8
    } else {
        width
    };
    (vecs.div_ceil(32).clamp(1, 4) * 32) as u32
}

/// Checks the head layout of an op on `qkv` rows.
fn check_heads(op: &'static str, attn: &AttnParams) -> Result<()> {
    if attn.num_heads == 0 || attn.num_kv_heads == 0 || attn.head_dim == 0 {
        return Err(Error::Other(format!(
            "op {op}: num_heads ({}), num_kv_heads ({}) and head_dim ({}) must all be positive",
            attn.num_heads, attn.num_kv_heads, attn.head_dim
        )));
    }
    if !attn.num_heads.is_multiple_of(attn.num_kv_heads) {
        return Err(Error::Other(format!(
            "op {op}: num_heads ({}) is not a multiple of num_kv_heads ({})",
            attn.num_heads, attn.num_kv_heads
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn embedding(
    be: &CudaBackend,
    ids: &CudaBuf<u32>,
    n: usize,
    weight: &CudaBuf<bf16>,
    vocab_start: usize,
    vocab_rows: usize,
    hidden: usize,
    out: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "embedding";
    check_len(OP, "ids", ids, n)?;
    check_len(
        OP,
        "weight",
        weight,
        numel(OP, "weight", vocab_rows, hidden)?,
    )?;
    check_len(OP, "out", out, numel(OP, "out", n, hidden)?)?;
    if n == 0 || hidden == 0 {
        return Ok(());
    }
    let start = u32::try_from(vocab_start)
        .map_err(|_| Error::Other(format!("op {OP}: vocab_start {vocab_start} exceeds u32")))?;
    let rows = u32::try_from(vocab_rows)
        .map_err(|_| Error::Other(format!("op {OP}: vocab_rows {vocab_rows} exceeds u32")))?;
    let h = int(OP, "hidden", hidden)?;
    let mut b = Launch::new(be.stream(), &be.kernels.embedding);
    b.arg(ids.raw())
        .arg(weight.raw())
        .arg(&start)
        .arg(&rows)
        .arg(&h)
        .arg(out.raw_mut());
    // SAFETY: arguments match `embedding` in embedding.cu; block i reads ids[i] (n checked),
    // a weight row only when the id lies in [vocab_start, vocab_start + vocab_rows) (the
    // weight holds vocab_rows rows), and writes row i of out (n rows checked).
    unsafe { b.launch(cfg(grid(OP, "n", n)?, row_threads(hidden))) }.map_err(launch_err(OP))?;
    Ok(())
}

pub(super) fn rms_norm(
    be: &CudaBackend,
    x: &CudaBuf<bf16>,
    weight: &CudaBuf<bf16>,
    n: usize,
    hidden: usize,
    eps: f32,
    out: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "rms_norm";
    let len = numel(OP, "x", n, hidden)?;
    check_len(OP, "x", x, len)?;
    check_len(OP, "weight", weight, hidden)?;
    check_len(OP, "out", out, len)?;
    if len == 0 {
        return Ok(());
    }
    let h = int(OP, "hidden", hidden)?;
    let mut b = Launch::new(be.stream(), &be.kernels.rms_norm);
    b.arg(x.raw())
        .arg(weight.raw())
        .arg(out.raw_mut())
        .arg(&h)
        .arg(&eps);
    // SAFETY: arguments match `rms_norm` in norm.cu; block i reads and writes row i of
    // x and out (n rows of hidden checked) and the hidden weights.
    unsafe { b.launch(cfg(grid(OP, "n", n)?, norm_threads(hidden))) }.map_err(launch_err(OP))?;
    Ok(())
}

/// The buffer checks of `add_rms_norm` (and of its fusion with the all-reduce, which takes the
/// same arguments): x and residual hold `n` rows of `hidden`, weight `hidden`. Returns
/// `n * hidden`.
pub(super) fn check_add_rms_norm(
    op: &'static str,
    x: &CudaBuf<bf16>,
    residual: &CudaBuf<bf16>,
    weight: &CudaBuf<bf16>,
    n: usize,
    hidden: usize,
) -> Result<usize> {
    let len = numel(op, "x", n, hidden)?;
    check_len(op, "x", x, len)?;
    check_len(op, "residual", residual, len)?;
    check_len(op, "weight", weight, hidden)?;
    Ok(len)
}

pub(super) fn add_rms_norm(
    be: &CudaBackend,
    x: &mut CudaBuf<bf16>,
    residual: &mut CudaBuf<bf16>,
    weight: &CudaBuf<bf16>,
    n: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    // SAFETY: no received sums to vouch for.
    unsafe { add_rms_norm_with(be, x, residual, weight, n, hidden, eps, None) }
}

/// What `add_rms_norm_recv` (norm.cu) takes beyond `add_rms_norm`'s arguments: the peer's
/// partial sums, written by its copy engine, and the flag that says they have arrived
/// (copy_ar.rs).
pub(super) struct Received<'a> {
    /// The kernel (`add_rms_norm_recv` of the norm module).
    pub func: &'a CudaFunction,
    /// Device address of the peer's partial sums, laid out as `x`.
    pub recv: u64,
    /// Device address of the flag the peer raises to `epoch`.
    pub flag: u64,
    pub epoch: u32,
    /// Set by a wait that gave up on the peer (one u32).
    pub stuck: &'a CudaSlice<u32>,
    /// Device address of the host-mapped u32 the host reads after each step.
    pub timed_out: u64,
    /// The first row: the kernel runs on rows `first..first + n` of x, residual and `recv`
    /// (a rank's own rows where a prefill step's rows are shared out: copy_ar.rs; 0 otherwise).
    pub first: usize,
    /// Where the rows are shared out, the device address of row 0 of the peer's x, into which
    /// `add_rms_norm_recv_push` stores each result row too; 0 otherwise.
    pub peer_x: u64,
}

/// `add_rms_norm`, or with `received` its fusion with the end of the copy-engine all-reduce:
/// `x = bf16(x + recv)` first, once the peer's flag has reached the epoch, on its rows
/// `first..first + n`, each result row also stored to the peer's x where `peer_x` is given.
///
/// # Safety
/// Where `received` is given, `recv` addresses at least `(first + n) * hidden` bf16 that
/// nothing writes during the kernel, `flag` a u32 and `timed_out` a host-mapped u32, and a
/// nonzero `peer_x` as many bf16 whose rows `first..first + n` nothing else touches during the
/// kernel, all alive until the kernel has run.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn add_rms_norm_with(
    be: &CudaBackend,
    x: &mut CudaBuf<bf16>,
    residual: &mut CudaBuf<bf16>,
    weight: &CudaBuf<bf16>,
    n: usize,
    hidden: usize,
    eps: f32,
    received: Option<&Received>,
) -> Result<()> {
    let op: &'static str = match received {
        None => "add_rms_norm",
        Some(r) if r.peer_x != 0 => "add_rms_norm_recv_push",
        Some(_) => "add_rms_norm_recv",
    };
    let first = received.map_or(0, |r| r.first);
    let rows = first
        .checked_add(n)
        .ok_or_else(|| Error::Other(format!("op {op}: rows {first} + {n} overflow")))?;
    check_add_rms_norm(op, x, residual, weight, rows, hidden)?;
    if n == 0 || hidden == 0 {
        return Ok(());
    }
    let h = int(op, "hidden", hidden)?;
    let func = received.map_or(&be.kernels.add_rms_norm, |r| r.func);
    let mut b = Launch::new(be.stream(), func);
    // The first row's offset in bytes (inside x and residual: checked above).
    let at = (first * hidden * std::mem::size_of::<bf16>()) as u64;
    let (px, pr) = (be.dptr(x) + at, be.dptr(residual) + at);
    b.arg(&px).arg(&pr).arg(weight.raw()).arg(&h).arg(&eps);
    let recv = received.map_or(0, |r| r.recv + at);
    let peer_x = received.map_or(0, |r| r.peer_x + at);
    if let Some(r) = received {
        b.arg(&recv)
            .arg(&r.flag)
            .arg(&r.epoch)
            .arg(r.stuck)
            .arg(&r.timed_out);
        if r.peer_x != 0 {
            b.arg(&peer_x);
        }
    }
    // SAFETY: arguments match `add_rms_norm` / `add_rms_norm_recv` / `add_rms_norm_recv_push`
    // in norm.cu; block i reads and writes row first + i of x and residual (first + n rows of
    // hidden checked; distinct buffers, as &mut guarantees), reads row first + i of recv and
    // writes that of the peer's x, which the caller vouches for.
    unsafe { b.launch(cfg(grid(op, "n", n)?, norm_threads(hidden))) }.map_err(launch_err(op))?;
    Ok(())
}

/// The kernel arguments shared by `qk_norm_rope` and `qk_norm_rope_store` in rope.cu, after
/// the checks both ops make.
pub(super) struct RopeArgs {
    pub(super) n: i32,
    pub(super) qkv_width: i32,
    pub(super) num_heads: i32,
    pub(super) num_kv_heads: i32,
    pub(super) head_dim: i32,
    pub(super) max_position: i32,
}

/// Checks the head layout and the buffers of a q/k norm + rope op on `n` rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn rope_args(
    op: &'static str,
    qkv: &CudaBuf<bf16>,
    n: usize,
    attn: &AttnParams,
    q_norm: &CudaBuf<bf16>,
    k_norm: &CudaBuf<bf16>,
    positions: &CudaBuf<i32>,
    cos_sin: &CudaBuf<f32>,
) -> Result<RopeArgs> {
    check_heads(op, attn)?;
    let d = attn.head_dim;
    // One head per d/8 lanes of a warp, the rotation partner in lane ^ (d/16).
    if !d.is_multiple_of(16) || !(d / 8).is_power_of_two() || d / 8 > 32 {
        return Err(Error::Other(format!(
            "op {op}: head_dim {d} is not supported by the CUDA kernel (16, 32, 64, 128 or 256)"
        )));
    }
    let width = attn.qkv_width();
    check_len(op, "qkv", qkv, numel(op, "qkv", n, width)?)?;
    check_len(op, "q_norm", q_norm, d)?;
    check_len(op, "k_norm", k_norm, d)?;
    check_len(op, "positions", positions, n)?;
    check_len(op, "cos_sin", cos_sin, d)?;
    Ok(RopeArgs {
        n: int(op, "n", n)?,
        qkv_width: int(op, "qkv width", width)?,
        num_heads: int(op, "num_heads", attn.num_heads)?,
        num_kv_heads: int(op, "num_kv_heads", attn.num_kv_heads)?,
        head_dim: int(op, "head_dim", d)?,
        max_position: int(op, "cos_sin rows", cos_sin.len() / d)?,
    })
}

/// Threads per block of the rope kernels.
const ROPE_THREADS: usize = 256;

/// Blocks for `heads` (token, head) tasks of `head_dim`, `32 / (head_dim / 8)` per warp.
fn rope_blocks(op: &'static str, heads: usize, head_dim: usize) -> Result<u32> {
    let heads_per_warp = 32 / (head_dim / 8);
    grid(
        op,
        "blocks",
        heads.div_ceil(heads_per_warp).div_ceil(ROPE_THREADS / 32),
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn qk_norm_rope(
    be: &CudaBackend,
    qkv: &mut CudaBuf<bf16>,
    n: usize,
    attn: &AttnParams,
    q_norm: &CudaBuf<bf16>,
    k_norm: &CudaBuf<bf16>,
    eps: f32,
    positions: &CudaBuf<i32>,
    cos_sin: &CudaBuf<f32>,
) -> Result<()> {
    const OP: &str = "qk_norm_rope";
    let a = rope_args(OP, qkv, n, attn, q_norm, k_norm, positions, cos_sin)?;
    if n == 0 {
        return Ok(());
    }
    let tasks = numel(OP, "heads", n, attn.num_heads + attn.num_kv_heads)?;
    let blocks = rope_blocks(OP, tasks, attn.head_dim)?;
    let mut b = Launch::new(be.stream(), &be.kernels.qk_norm_rope);
    b.arg(qkv.raw_mut())
        .arg(&a.n)
        .arg(&a.qkv_width)
        .arg(&a.num_heads)
        .arg(&a.num_kv_heads)
        .arg(&a.head_dim)
        .arg(q_norm.raw())
        .arg(k_norm.raw())
        .arg(&eps)
        .arg(positions.raw())
        .arg(cos_sin.raw())
        .arg(&a.max_position);
    // SAFETY: arguments match `qk_norm_rope` in rope.cu; tasks beyond n * (num_heads +
    // num_kv_heads) touch no memory; each task reads and writes one q or k head of a row of
    // qkv (n rows checked), d weights, positions[token] (n checked) and one cos/sin row,
    // clamped to the max_position rows cos_sin holds.
    unsafe { b.launch(cfg(blocks, ROPE_THREADS as u32)) }.map_err(launch_err(OP))?;
    Ok(())
}

/// Rows of the `[slots, kv_width]` view both caches hold, after checking `slot_mapping`.
pub(super) fn cache_slots(
    op: &'static str,
    attn: &AttnParams,
    n: usize,
    slot_mapping: &CudaBuf<i32>,
    k_cache: &CudaBuf<bf16>,
    v_cache: &CudaBuf<bf16>,
) -> Result<(usize, i64)> {
    let kv_width = numel(op, "k", attn.num_kv_heads, attn.head_dim)?;
    check_len(op, "slot_mapping", slot_mapping, n)?;
    Ok((
        kv_width,
        (k_cache.len().min(v_cache.len()) / kv_width) as i64,
    ))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn qk_norm_rope_store(
    be: &CudaBackend,
    qkv: &mut CudaBuf<bf16>,
    n: usize,
    attn: &AttnParams,
    q_norm: &CudaBuf<bf16>,
    k_norm: &CudaBuf<bf16>,
    eps: f32,
    positions: &CudaBuf<i32>,
    cos_sin: &CudaBuf<f32>,
    slot_mapping: &CudaBuf<i32>,
    k_cache: &mut CudaBuf<bf16>,
    v_cache: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "qk_norm_rope_store";
    let a = rope_args(OP, qkv, n, attn, q_norm, k_norm, positions, cos_sin)?;
    let (_, num_slots) = cache_slots(OP, attn, n, slot_mapping, k_cache, v_cache)?;
    if n == 0 {
        return Ok(());
    }
    let tasks = numel(OP, "heads", n, attn.num_heads + 2 * attn.num_kv_heads)?;
    let blocks = rope_blocks(OP, tasks, attn.head_dim)?;
    let mut b = Launch::new(be.stream(), &be.kernels.qk_norm_rope_store);
    b.arg(qkv.raw_mut())
        .arg(&a.n)
        .arg(&a.qkv_width)
        .arg(&a.num_heads)
        .arg(&a.num_kv_heads)
        .arg(&a.head_dim)
        .arg(q_norm.raw())
        .arg(k_norm.raw())
        .arg(&eps)
        .arg(positions.raw())
        .arg(cos_sin.raw())
        .arg(&a.max_position)
        .arg(slot_mapping.raw())
        .arg(k_cache.raw_mut())
        .arg(v_cache.raw_mut())
        .arg(&num_slots);
    // SAFETY: arguments match `qk_norm_rope_store` in rope.cu; tasks beyond n * (num_heads +
    // 2 * num_kv_heads) touch no memory; each task reads and writes one head of a row of qkv
    // (n rows checked), d weights, positions[token] and slot_mapping[token] (n checked) and
    // one cos/sin row, clamped to the max_position rows cos_sin holds, and writes one head of
    // one cache row only when the slot lies in [0, num_slots), the rows both caches hold.
    unsafe { b.launch(cfg(blocks, ROPE_THREADS as u32)) }.map_err(launch_err(OP))?;
    Ok(())
}

pub(super) fn store_kvcache(
    be: &CudaBackend,
    qkv: &CudaBuf<bf16>,
    n: usize,
    attn: &AttnParams,
    slot_mapping: &CudaBuf<i32>,
    k_cache: &mut CudaBuf<bf16>,
    v_cache: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "store_kvcache";
    check_heads(OP, attn)?;
    let width = attn.qkv_width();
    check_len(OP, "qkv", qkv, numel(OP, "qkv", n, width)?)?;
    let (kv_width, num_slots) = cache_slots(OP, attn, n, slot_mapping, k_cache, v_cache)?;
    if n == 0 {
        return Ok(());
    }
    let (w_i, koff, kvw) = (
        int(OP, "qkv width", width)?,
        int(OP, "k offset", attn.num_heads * attn.head_dim)?,
        int(OP, "kv width", kv_width)?,
    );
    let mut b = Launch::new(be.stream(), &be.kernels.store_kvcache);
    b.arg(qkv.raw())
        .arg(&w_i)
        .arg(&koff)
        .arg(&kvw)
        .arg(slot_mapping.raw())
        .arg(k_cache.raw_mut())
        .arg(v_cache.raw_mut())
        .arg(&num_slots);
    // SAFETY: arguments match `store_kvcache` in kvcache.cu; block i reads slot_mapping[i]
    // and row i of qkv (n checked) and writes one slot row of each cache only when the slot
    // lies in [0, num_slots), the rows both caches hold.
    unsafe { b.launch(cfg(grid(OP, "n", n)?, 128)) }.map_err(launch_err(OP))?;
    Ok(())
}

pub(super) fn silu_and_mul(
    be: &CudaBackend,
    gate_up: &CudaBuf<bf16>,
    n: usize,
    inter: usize,
    out: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "silu_and_mul";
    let len = numel(OP, "out", n, inter)?;
    check_len(OP, "gate_up", gate_up, numel(OP, "gate_up", len, 2)?)?;
    check_len(OP, "out", out, len)?;
    if len == 0 {
        return Ok(());
    }
    let (threads, per_row) = if inter.is_multiple_of(8) {
        (128u32, (inter / 8).div_ceil(128))
    } else {
        (256u32, inter.div_ceil(256).min(1024))
    };
    let (n_i, inter_i) = (int(OP, "n", n)?, int(OP, "inter", inter)?);
    let mut b = Launch::new(be.stream(), &be.kernels.silu_and_mul);
    b.arg(gate_up.raw())
        .arg(out.raw_mut())
        .arg(&n_i)
        .arg(&inter_i);
    let config = LaunchConfig {
        grid_dim: (
            grid(OP, "blocks per row", per_row)?,
            n.min(65_535) as u32,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match `silu_and_mul` in activation.cu; rows < n of gate_up (2 * inter
    // each) and out (inter each) are touched, both checked.
    unsafe { b.launch(config) }.map_err(launch_err(OP))?;
    Ok(())
}

pub(super) fn gather_rows(
    be: &CudaBackend,
    x: &CudaBuf<bf16>,
    indices: &CudaBuf<i32>,
    n: usize,
    width: usize,
    out: &mut CudaBuf<bf16>,
) -> Result<()> {
    const OP: &str = "gather_rows";
    check_len(OP, "indices", indices, n)?;
    check_len(OP, "out", out, numel(OP, "out", n, width)?)?;
    if n == 0 || width == 0 {
        return Ok(());
    }
    let x_rows = (x.len() / width) as i64;
    let w_i = int(OP, "width", width)?;
    let mut b = Launch::new(be.stream(), &be.kernels.gather_rows);
    b.arg(x.raw())
        .arg(&x_rows)
        .arg(indices.raw())
        .arg(&w_i)
        .arg(out.raw_mut());
    // SAFETY: arguments match `gather_rows` in embedding.cu; block i reads indices[i] (n
    // checked), row indices[i] of x only when it lies in [0, x_rows) (the rows x holds), and
    // writes row i of out (n rows checked).
    unsafe { b.launch(cfg(grid(OP, "n", n)?, row_threads(width))) }.map_err(launch_err(OP))?;
    Ok(())
}

/// Threads of a sampler block (`THREADS` in sampling.cu).
const SAMPLE_THREADS: u32 = 512;

pub(super) fn sample(
    be: &CudaBackend,
    logits: &CudaBuf<bf16>,
    rows: usize,
    vocab: usize,
    params: &SamplingBufs<'_, CudaBackend>,
    out: &mut CudaBuf<u32>,
) -> Result<()> {
    const OP: &str = "sample";
    check_len(OP, "out", out, rows)?;
    launch_sample(
        OP,
        be,
        logits,
        rows,
        vocab,
        None,
        params,
        Dest::Tokens(out.raw_mut()),
    )
}

/// One rank's part of sampling rows split by columns (`Backend::sample_shard`): its slice
/// `logits` (`[rows, width]`, columns `col0 ..` of the whole rows), each row's best (key,
/// column) into `parts[slot * 2 * rows ..]` (keys as f32 bits, then columns).
#[allow(clippy::too_many_arguments)]
pub(super) fn sample_shard(
    be: &CudaBackend,
    logits: &CudaBuf<bf16>,
    rows: usize,
    width: usize,
    col0: usize,
    params: &SamplingBufs<'_, CudaBackend>,
    parts: &mut CudaBuf<u32>,
    slot: usize,
) -> Result<()> {
    const OP: &str = "sample_shard";
    let at = numel(OP, "parts", slot, 2 * rows)?;
    check_len(OP, "parts", parts, numel(OP, "parts", slot + 1, 2 * rows)?)?;
    if !(col0.is_multiple_of(8) && width.is_multiple_of(8)) {
        return Err(Error::Other(format!(
            "op {OP}: {width} columns from {col0} (start and width must be multiples of 8)"
        )));
    }
    // The part's keys and columns, `rows` u32 each (the buffers are bytes).
    let region = parts.raw_mut().slice_mut(U32 * at..U32 * (at + 2 * rows));
    let mut halves = region.chunks_exact_mut(U32 * rows.max(1));
    let dest = match (halves.next(), halves.next()) {
        (Some(keys), Some(cols)) => Dest::Part(keys, cols),
        _ if rows == 0 => return Ok(()),
        _ => return Err(Error::Other(format!("op {OP}: no room for {rows} rows"))),
    };
    launch_sample(OP, be, logits, rows, width, Some(col0), params, dest)
}

/// Folds `ranks` parts of [`sample_shard`] (`parts[q * 2 * rows ..]`, rank q's) into one token
/// per row.
pub(super) fn sample_combine(
    be: &CudaBackend,
    parts: &CudaBuf<u32>,
    rows: usize,
    ranks: usize,
    out: &mut CudaBuf<u32>,
) -> Result<()> {
    const OP: &str = "sample_combine";
    check_len(OP, "parts", parts, numel(OP, "parts", ranks, 2 * rows)?)?;
    check_len(OP, "out", out, rows)?;
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, ranks_i, one, stride) = (
        int(OP, "rows", rows)?,
        int(OP, "ranks", ranks)?,
        1i32,
        int(OP, "2 * rows", 2 * rows)?,
    );
    // The buffers are bytes: the indices start `rows` u32 after the keys.
    let p = parts.raw();
    let (keys, idx) = (p.slice(0..), p.slice(U32 * rows..));
    let mut r = Launch::new(be.stream(), &be.kernels.sample_reduce);
    r.arg(&keys)
        .arg(&idx)
        .arg(&rows_i)
        .arg(&ranks_i)
        .arg(&one)
        .arg(&stride)
        .arg(out.raw_mut());
    // SAFETY: arguments match `sample_reduce`; thread r < rows reads keys[r + q * 2 * rows]
    // and indices[r + q * 2 * rows] for q < ranks, inside `parts` (ranks * 2 * rows checked;
    // the indices start `rows` later, still below (q + 1) * 2 * rows), and writes out[r]
    // (rows checked).
    unsafe { r.launch(cfg(grid(OP, "rows", rows.div_ceil(128))?, 128)) }.map_err(launch_err(OP))?;
    Ok(())
}

/// Bytes of a u32 (buffers are byte slices; offsets into them count bytes).
const U32: usize = std::mem::size_of::<u32>();

/// Where a sampler launch puts its result: tokens, or each row's best (key, column) in a
/// part's keys and columns.
enum Dest<'a> {
    Tokens(&'a mut CudaSlice<u8>),
    Part(CudaViewMut<'a, u8>, CudaViewMut<'a, u8>),
}

/// The `sample` kernel (and `sample_reduce` / `sample_reduce_part` when rows are split over
/// several blocks), on whole rows (`col0` None) or on a slice of them in shard mode. `dest`
/// holds `rows` tokens, or `rows` keys and `rows` columns (checked by the caller).
#[allow(clippy::too_many_arguments)]
fn launch_sample(
    op: &'static str,
    be: &CudaBackend,
    logits: &CudaBuf<bf16>,
    rows: usize,
    vocab: usize,
    col0: Option<usize>,
    params: &SamplingBufs<'_, CudaBackend>,
    mut dest: Dest<'_>,
) -> Result<()> {
    check_len(op, "logits", logits, numel(op, "logits", rows, vocab)?)?;
    check_len(op, "temperatures", params.temperatures, rows)?;
    check_len(op, "top_k", params.top_k, rows)?;
    check_len(op, "top_p", params.top_p, rows)?;
    check_len(op, "seeds", params.seeds, rows)?;
    check_len(op, "steps", params.steps, rows)?;
    if rows == 0 {
        return Ok(());
    }
    if vocab == 0 {
        return Err(Error::Other(format!("op {op}: vocab must be positive")));
    }
    let vocab_i = int(op, "vocab", vocab)?;
    let shard = col0.is_some() as i32;
    let col0 = col0.unwrap_or(0);
    let col0_i = int(op, "first column", col0)?;
    // Columns are indexed as i32 in the kernel.
    int(op, "last column", col0.saturating_add(vocab))?;
    // Few rows leave most SMs idle: split each row over several blocks (about two blocks per
    // SM in all), each still scanning at least one vector per thread.
    let per_block_min = SAMPLE_THREADS as usize * 8;
    let splits = if rows >= be.num_sms() {
        1
    } else {
        (2 * be.num_sms())
            .div_ceil(rows)
            .min((vocab / per_block_min).max(1))
    };
    let blocks = numel(op, "blocks", rows, splits)?;
    let splits_i = int(op, "splits", splits)?;
    let mut scratch = be.sample_parts(blocks)?;
    let scratch = &mut *scratch;
    let mut b = Launch::new(be.stream(), &be.kernels.sample);
    b.arg(logits.raw())
        .arg(&vocab_i)
        .arg(&col0_i)
        .arg(&shard)
        .arg(params.temperatures.raw())
        .arg(params.top_k.raw())
        .arg(params.top_p.raw())
        .arg(params.seeds.raw())
        .arg(params.steps.raw())
        .arg(&splits_i);
    match &mut dest {
        Dest::Tokens(t) => b.arg(&mut **t).arg(&mut scratch.key).arg(&mut scratch.idx),
        // Shard mode never writes `out`. With one split each row's (key, column) goes straight
        // to the part; with several, to the scratch, folded into the part below.
        Dest::Part(keys, cols) => match splits {
            1 => b.arg(&scratch.idx).arg(keys).arg(cols),
            _ => b.arg(cols).arg(&mut scratch.key).arg(&mut scratch.idx),
        },
    };
    // SAFETY: arguments match `sample` in sampling.cu; block j works row j / splits, reading
    // that row of logits (`rows * vocab` checked; in shard mode the kernel offsets its row
    // pointer by -col0 and reads columns col0 .. col0 + vocab only) and of each parameter
    // buffer (rows checked), and writes either out[row] (whole rows, one split: `out` holds
    // rows), or (key, index) j of its partial buffers: the scratch (at least rows * splits
    // entries), or with one split in shard mode the part's keys and columns, `rows` entries
    // each at the caller's checked offset.
    unsafe { b.launch(cfg(grid(op, "blocks", blocks)?, SAMPLE_THREADS)) }
        .map_err(launch_err(op))?;
    if splits > 1 {
        let (rows_i, one) = (int(op, "rows", rows)?, 1i32);
        let kernel = match dest {
            Dest::Tokens(_) => &be.kernels.sample_reduce,
            Dest::Part(..) => &be.kernels.sample_reduce_part,
        };
        let mut r = Launch::new(be.stream(), kernel);
        r.arg(&scratch.key)
            .arg(&scratch.idx)
            .arg(&rows_i)
            .arg(&splits_i)
            .arg(&splits_i)
            .arg(&one);
        match &mut dest {
            Dest::Tokens(t) => r.arg(&mut **t),
            Dest::Part(keys, cols) => r.arg(keys).arg(cols),
        };
        // SAFETY: arguments match `sample_reduce` (tokens: out[r]) or `sample_reduce_part`
        // (the part's keys and columns, entry r); thread r < rows reads partials
        // [r * splits, (r + 1) * splits) of the scratch, written by the launch above (same
        // stream), and writes entry r of its outputs (`rows` checked).
        unsafe { r.launch(cfg(grid(op, "rows", rows.div_ceil(128))?, 128)) }
            .map_err(launch_err(op))?;
    }
    Ok(())
}
