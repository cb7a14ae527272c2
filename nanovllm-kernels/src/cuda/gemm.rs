//! `Backend::gemm` on the GPU: `out[m, n] = x[m, k] . w[n, k]^T` in bf16 with f32
//! accumulation, used by every linear layer (QKV, O, gate/up, down) and the LM head.
//!
//! Three paths, picked per call by the [`GemmPolicy`] and the GPU (measured on an H100 in
//! docs/perf-notes.md, "GEMM for decode shapes" and "A TMA + wgmma GEMM with programmatic
//! dependent launch"):
//!
//! * **Skinny kernel** (`cuda/gemv.cu`) for decode: M up to [`GemmPolicy::skinny_max_m`] rows
//!   (K a multiple of 8). There the product is one pass over the weight; the kernel streams it
//!   with 16-byte loads and tensor-core arithmetic, one shared-memory reduction per CTA, no
//!   workspace and no allocation, so it is captured into CUDA graphs as is. The launcher here
//!   picks the kernel (M <= 8, 16, 32) and the warps per CTA ([`skinny_warps`]). At M = 1 it
//!   takes 62-94% of the time cuBLASLt's heuristic choice does on the Qwen3 layers.
//! * **TMA + wgmma kernel** (`cuda/gemm_tma.cu`, H100 / H200) for M = 17..[`TMA_MAX_M`]:
//!   weight and x tiles loaded by TMA into a ring, warpgroup MMAs, split-K over a thread-block
//!   cluster where the product has few tiles. Launched with programmatic dependent launch, it
//!   fetches its first weight tiles while the previous kernel finishes. `NANOVLLM_GEMM_TMA=0`
//!   leaves these sizes to cuBLASLt.
//! * **cuBLASLt** for everything else. The trait's row-major product is, in cuBLAS's
//!   column-major terms, `out^T = op(w^T) . x^T` with `op` = transpose: A = w (stored k x n,
//!   ld k, transposed), B = x (stored k x m, ld k), C = D = out (n x m, ld n): the "TN" layout
//!   its Hopper kernels prefer. Each (m, n, k) gets a plan once (descriptors, layouts,
//!   algorithm), so a call costs one `cublasLtMatmul`. The workspace is one fixed 32 MiB buffer
//!   (what NVIDIA recommends for Hopper), so calls can be captured into CUDA graphs.
//!
//! cuBLASLt's algorithm: its heuristic proposes up to [`CANDIDATES`]; for the shapes
//! [`GemmPolicy::tuning`] covers, each is timed on the shape's first call with a cold L2
//! (before every timed run, `l2_flush` reads a buffer of twice the L2's size, leaving L2 full
//! of clean lines of other data, as the model leaves it: every weight is read once per step,
//! long after its last read), [`ROUNDS`] runs each, and the fastest kept if it beats the
//! heuristic's first choice by [`MIN_GAIN`]. Timing back to back instead keeps a small weight
//! in L2 and picks algorithms that are fast only then. Choices are kept per (M rounded up to a
//! power of two, n, k): prefill steps come with every M, and a shape reuses its bucket's choice
//! when the heuristic offers it too, so only the first M of a bucket pays for timing. A shape
//! first seen during CUDA graph capture keeps the heuristic's choice untimed; run each shape
//! once before capturing it (the model runner's warm-up does, once per decode batch bucket).

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::{
    self as dsys, CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUstreamCaptureStatus,
};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use nanovllm_utils::{Error, Result};

use super::launch::Launch;
use super::{driver_err, CudaBackend};

/// The workspace cuBLASLt may use per call.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Algorithms asked of the heuristic (and timed, when tuning).
const CANDIDATES: usize = 8;

/// Timed cold runs per candidate; the score is the mean without the fastest and slowest run
/// (CUDA events tick in about half a microsecond, a tenth of a decode GEMM: the mean of 9
/// brings that under 2%).
const ROUNDS: usize = 11;

/// How much faster than the heuristic's first choice a candidate must time to replace it
/// (above the timing noise; with 3%, equal algorithms were swapped for 3-5% slower ones).
const MIN_GAIN: f32 = 0.05;

/// The largest M the skinny kernels take (`gemv_m32`).
pub const SKINNY_LIMIT: usize = 32;

/// The skinny kernels of `cuda/gemv.cu`: (name, most rows M, k tiles of 32 a thread has in
/// flight (`U` there), most warps per CTA (its launch bound / 32)).
const SKINNY_KERNELS: [SkinnyKernel; 3] = [
    ("gemv_m8", 8, 8, 16),
    ("gemv_m16", 16, 4, 24),
    ("gemv_m32", 32, 4, 16),
];

/// The skinny kernel of the MLP's down projection with its activation fused (gemv.cu): x is
/// gate_up, `[m, 2k]`; 4 k tiles per batch keep the gate and up loads in registers, and up to
/// 24 warps request a weight of Qwen3-0.6B's size in one batch.
const SKINNY_SILU_KERNEL: SkinnyKernel = ("gemv_m8_silu", 8, 4, 24);

/// A skinny kernel: name in gemv.cu, most rows, k tiles per thread and batch, most warps.
type SkinnyKernel = (&'static str, usize, usize, usize);

/// Warps per CTA of the skinny kernel when a weight is too large to request at once (see
/// [`skinny_warps`]).
const STREAM_WARPS: usize = 4;

/// How [`Backend::gemm`](crate::Backend::gemm) picks its kernel on a [`CudaBackend`]
/// ([`CudaBackend::set_gemm_policy`]). The default is what measured fastest on an H100 for the
/// Qwen3-0.6B and Qwen3-8B shapes (docs/perf-notes.md, "GEMM for decode shapes"); the other
/// settings exist to compare the paths (`examples/op_bench.rs`) and to check each
/// (`examples/op_check.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPolicy {
    /// Products of at most this many rows (M, at most [`SKINNY_LIMIT`]) with K a multiple of 8
    /// run the skinny kernel of `cuda/gemv.cu`; the others go to cuBLASLt. 0: always cuBLASLt.
    pub skinny_max_m: usize,
    /// Which cuBLASLt shapes time the heuristic's candidates on their first call.
    pub tuning: GemmTuning,
}

impl Default for GemmPolicy {
    fn default() -> Self {
        GemmPolicy {
            skinny_max_m: 16,
            tuning: GemmTuning::WhereItPays,
        }
    }
}

/// Which cuBLASLt shapes are tuned: their candidate algorithms timed once with a cold L2 and
/// the fastest kept (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTuning {
    /// None: the heuristic's first algorithm everywhere.
    Off,
    /// Where tuning measured a gain: prefill-sized products (M >= 1024: 1-4% per Qwen3 layer)
    /// and weights of 32 MiB or more (Qwen3-8B's layers and LM heads: up to 4% at M = 256).
    /// The small weights of Qwen3-0.6B at decode sizes measured within noise of the heuristic,
    /// so start-up does not pay for timing them.
    WhereItPays,
    /// Every shape.
    All,
}

impl GemmTuning {
    /// Whether a shape of this many rows and this weight is tuned.
    fn covers(self, m: usize, n: usize, k: usize) -> bool {
        match self {
            GemmTuning::Off => false,
            GemmTuning::WhereItPays => {
                m >= 1024 || n.saturating_mul(k).saturating_mul(2) >= TUNE_MIN_WEIGHT_BYTES
            }
            GemmTuning::All => true,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            GemmTuning::Off => 0,
            GemmTuning::WhereItPays => 1,
            GemmTuning::All => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => GemmTuning::Off,
            1 => GemmTuning::WhereItPays,
            _ => GemmTuning::All,
        }
    }
}

/// The smallest weight [`GemmTuning::WhereItPays`] tunes at decode sizes.
const TUNE_MIN_WEIGHT_BYTES: usize = 32 << 20;

fn blas_err(what: &str, e: lt::CublasError) -> Error {
    Error::Cuda(format!("gemm: {what}: {e:?}"))
}

/// The cuBLASLt objects of one problem shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan and is destroyed once, here.
        // Errors cannot be reported from drop; a failed destroy leaks a few bytes.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A shape's plan and the algorithms tuning chose, per (M rounded up to a power of two, n, k).
struct Plans {
    plans: HashMap<(usize, usize, usize), Plan>,
    tuned: HashMap<(usize, usize, usize), sys::cublasLtMatmulAlgo_t>,
}

/// The cuBLASLt handle, its workspace, the plans made so far and the policy.
pub(super) struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    state: Mutex<Plans>,
    skinny_max_m: AtomicUsize,
    /// `GemmTuning::to_u8` of the policy's tuning.
    tuning: AtomicU8,
}

// SAFETY: the handle and the plans' descriptors are plain host objects of cuBLASLt. Every use
// (planning and matmul) happens with the `state` lock held, so no two threads use them at
// once; the handle itself may move between threads.
unsafe impl Send for Gemm {}
// SAFETY: as above: shared access goes through the `state` mutex.
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once; the plans (dropped
        // after this body) do not need the handle.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// `Backend::gemm` once the caller checked the buffers: `x`, `w` and `out` are device
/// addresses of at least `m * k`, `n * k` and `m * n` bf16 used on the backend's stream, and
/// m, n, k are positive. Queues the skinny kernel or a cuBLASLt matmul, per the policy.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    be: &CudaBackend,
    x: u64,
    w: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    if skinny_fits(be, m, x, w, n, k, k) {
        let kernel = SKINNY_KERNELS
            .iter()
            .find(|kernel| m <= kernel.1)
            .ok_or_else(|| {
                Error::Other(format!("op gemm: m = {m} is beyond the skinny kernels"))
            })?;
        return skinny(be, *kernel, x, w, out, m, n, k);
    }
    if tma_fits(be, m, n, k, x, w)? {
        return tma_gemm(be, x, w, out, m, n, k);
    }
    be.blas.matmul(be, x, w, out, m, n, k)
}

/// The kernels of `cuda/gemm_tma.cu`: (MMA warpgroups, token tile = wgmma's N, name). A
/// product of M rows takes the first of its warpgroup count whose tile holds M.
const TMA_KERNELS: [(usize, usize, &str); 8] = [
    (1, 16, "gemm_tma_n16"),
    (1, 32, "gemm_tma_n32"),
    (1, 64, "gemm_tma_n64"),
    (1, 128, "gemm_tma_n128"),
    (1, 256, "gemm_tma_n256"),
    (2, 64, "gemm_tma2_n64"),
    (2, 128, "gemm_tma2_n128"),
    (2, 256, "gemm_tma2_n256"),
];

/// The largest M `gemm` gives the TMA kernel. It beats cuBLASLt on most Qwen3-8B decode shapes
/// up to M = 64, is within ~1 us of it at M = 128 and up to 2x slower at 256, where every CTA
/// re-reads the whole x tile from L2 for its 64 weight rows (docs/perf-notes.md, "A TMA + wgmma
/// GEMM with programmatic dependent launch" and "Decode attention's balance").
const TMA_MAX_M: usize = 64;

/// Dynamic shared memory budget of one `gemm_tma` CTA in KiB.
const TMA_SMEM_KB: usize = 224;

/// The TMA kernel's switches, read once per process: `NANOVLLM_GEMM_TMA` (on unless `0`), and
/// for experiments `NANOVLLM_GEMM_TMA_MAX_M` (the largest M, at most 256; default
/// [`TMA_MAX_M`]), `NANOVLLM_GEMM_TMA_WG` (1 or 2 MMA warpgroups) and `NANOVLLM_GEMM_TMA_SPLIT`
/// (CTAs per tile), where unset or 0 means the launcher's choice, and
/// `NANOVLLM_GEMM_TMA_SMEM_KB` (the dynamic shared-memory budget of a CTA, 64..227 KiB; default
/// [`TMA_SMEM_KB`]).
struct TmaSettings {
    enabled: bool,
    max_m: usize,
    warpgroups: usize,
    split: usize,
    smem_budget: usize,
}

/// The [`TmaSettings`]; a value that is not a number is an error naming its variable.
fn tma_settings() -> Result<&'static TmaSettings> {
    static SETTINGS: OnceLock<std::result::Result<TmaSettings, String>> = OnceLock::new();
    super::env_once(&SETTINGS, || {
        let count = nanovllm_utils::env_count;
        Ok(TmaSettings {
            enabled: nanovllm_utils::env_switch("NANOVLLM_GEMM_TMA", true),
            max_m: count("NANOVLLM_GEMM_TMA_MAX_M", TMA_MAX_M, "rows")?.min(256),
            warpgroups: count("NANOVLLM_GEMM_TMA_WG", 0, "warpgroups (0: automatic)")?,
            split: count("NANOVLLM_GEMM_TMA_SPLIT", 0, "CTAs per tile (0: automatic)")?,
            smem_budget: count("NANOVLLM_GEMM_TMA_SMEM_KB", TMA_SMEM_KB, "KiB")?.clamp(64, 227)
                * 1024,
        })
    })
}

/// MMA warpgroups of the TMA kernel for a product of `m` rows and `n` weight rows on a GPU of
/// `num_sms` SMs: two (128 weight rows per CTA, half the x traffic per weight row) above 64
/// tokens when the 128-row tiles alone give at least two thirds of the SMs a CTA, else one (64
/// rows, split-K through distributed shared memory where the tiles are few; the two-warpgroup
/// kernel's split-K goes through a global workspace and measured slow). `forced` (1 or 2, else
/// automatic) overrides it, two only above 32 tokens (the two-warpgroup kernels take tiles of
/// 64 tokens or more).
fn tma_warpgroups(forced: usize, m: usize, n: usize, num_sms: usize) -> usize {
    match forced {
        2 if m > 32 => 2,
        1 => 1,
        _ if m > 64 && 3 * n.div_ceil(2 * TMA_W_ROWS) >= 2 * num_sms => 2,
        _ => 1,
    }
}

/// Weight rows (output columns) per MMA warpgroup of `gemm_tma.cu` (wgmma's M).
const TMA_W_ROWS: usize = 64;

/// Most CTAs of `gemm_tma` with `wg` MMA warpgroups and `nt` tokens that split one tile's K
/// (with one warpgroup, what the receive area beside the ring holds).
fn tma_max_split(nt: usize, wg: usize) -> usize {
    match (wg, nt) {
        (2, _) => 8,
        (_, ..=64) => 4,
        _ => 2,
    }
}

/// Bytes of `gemm_tma`'s split-K receive area with `wg` MMA warpgroups and `nt` tokens: with
/// one warpgroup the f32 sums of up to `tma_max_split - 1` other CTAs; two use a global
/// workspace.
fn tma_recv_bytes(nt: usize, wg: usize) -> usize {
    if wg == 1 {
        (tma_max_split(nt, wg) - 1) * 64 * nt * 4
    } else {
        0
    }
}

/// Ring stages of `gemm_tma` with `wg` MMA warpgroups and `nt` tokens within a dynamic
/// shared-memory budget of `budget` bytes: as many 64-wide k stages of a (64 * wg)-row weight
/// tile and an nt-row x tile as fit beside the receive area and 1 KiB of alignment, at most 16
/// (`MAX_STAGES` in the kernel), at least 2.
fn tma_stages(nt: usize, wg: usize, budget: usize) -> usize {
    let stage = (TMA_W_ROWS * wg + nt) * 64 * 2;
    let ring = budget.saturating_sub(tma_recv_bytes(nt, wg) + 1024);
    (ring / stage).clamp(2, 16)
}

/// Dynamic shared memory of `gemm_tma` with `wg` MMA warpgroups, `nt` tokens and `stages` ring
/// stages (`TmaCfg` in the kernel): the ring, the receive area, 1 KiB to align the ring to
/// 1,024 bytes.
fn tma_smem_bytes(nt: usize, wg: usize, stages: usize) -> usize {
    stages * (TMA_W_ROWS * wg + nt) * 64 * 2 + tma_recv_bytes(nt, wg) + 1024
}

/// CTAs that share one tile of `gemm_tma` (a cluster, each a range of K): `forced` (at most the
/// kernel's limit) when not 0, else the most, up to that limit, that keep every tile's CTAs
/// within one wave on the GPU and give each at least two k tiles.
fn tma_split(num_sms: usize, forced: usize, nt: usize, wg: usize, n: usize, k: usize) -> usize {
    let max = tma_max_split(nt, wg);
    if forced > 0 {
        return forced.min(max);
    }
    let (tiles, ktiles) = (n.div_ceil(TMA_W_ROWS * wg), k.div_ceil(64));
    (1..=max)
        .rev()
        .find(|&s| tiles * s <= num_sms && ktiles >= 2 * s)
        .unwrap_or(1)
}

/// Whether `gemm` takes the TMA + wgmma kernel: unless `NANOVLLM_GEMM_TMA=0`, for M up to
/// [`TMA_MAX_M`] (the skinny kernel keeps the smallest M its policy gives it), K a multiple of
/// 8 and x, w 16-byte aligned (what TMA needs of a row-major bf16 matrix), on a GPU that
/// loaded it.
fn tma_fits(be: &CudaBackend, m: usize, n: usize, k: usize, x: u64, w: u64) -> Result<bool> {
    let s = tma_settings()?;
    Ok(s.enabled
        && m <= s.max_m
        && k.is_multiple_of(8)
        && x.is_multiple_of(16)
        && w.is_multiple_of(16)
        && i32::try_from(n).is_ok()
        && i32::try_from(k).is_ok()
        && be.has_module("gemm_tma"))
}

/// A TMA descriptor of a row-major `[rows, k]` bf16 matrix at `ptr`, read in boxes of 64 k by
/// `box_rows` rows with the 128-byte swizzle wgmma's descriptors expect; rows and k beyond the
/// matrix read as zeros.
fn tensor_map(ptr: u64, rows: usize, k: usize, box_rows: usize) -> Result<dsys::CUtensorMap> {
    let dims = [k as u64, rows as u64];
    let strides = [(k * 2) as u64];
    let boxes = [64u32, box_rows as u32];
    let steps = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<dsys::CUtensorMap>::zeroed();
    // SAFETY: every array holds the two dimensions the call is told of (one stride: the
    // outer dimension's); `map` is writable memory of the map's size; the driver only encodes
    // the address, it does not access it.
    unsafe {
        dsys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| driver_err("gemm_tma: tensor map", e))?;
        Ok(map.assume_init())
    }
}

/// Queues the `gemm_tma.cu` kernel for `out = x . w^T` (see [`tma_fits`]).
#[allow(clippy::too_many_arguments)]
fn tma_gemm(
    be: &CudaBackend,
    x: u64,
    w: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let settings = tma_settings()?;
    let wg = tma_warpgroups(settings.warpgroups, m, n, be.num_sms);
    let &(_, nt, name) = TMA_KERNELS
        .iter()
        .find(|&&(g, t, _)| g == wg && m <= t)
        .ok_or_else(|| Error::Other(format!("op gemm: m = {m} is beyond the TMA kernels")))?;
    let f = be.func("gemm_tma", name)?;
    let stages = tma_stages(nt, wg, settings.smem_budget);
    let smem = tma_smem_bytes(nt, wg, stages);
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| driver_err("gemm_tma: shared memory size", e))?;
    let tw = tensor_map(w, n, k, TMA_W_ROWS * wg)?;
    let tx = tensor_map(x, m, k, nt)?;
    let split = tma_split(be.num_sms, settings.split, nt, wg, n, k);
    let tiles = n.div_ceil(TMA_W_ROWS * wg);
    // Two warpgroups hand split-K sums over in global memory: (split - 1) x nt / 2 floats per
    // MMA thread and tile. One warpgroup never touches it (null).
    let ws = if wg == 2 && split > 1 {
        Some(be.scratch_f32((split - 1) * tiles * (nt / 2) * 256)?)
    } else {
        None
    };
    let ws_ptr = ws.as_ref().map_or(0, |g| g.device_ptr(be.stream()).0);
    let cfg = LaunchConfig {
        grid_dim: ((tiles * split) as u32, 1, 1),
        block_dim: (128 * wg as u32 + 32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (m, n, k, stages) = (m as i32, n as i32, k as i32, stages as i32);
    // SAFETY: gemm_tma{,2}_n{nt}(TensorMap w, TensorMap x, bf16* out, float* ws, int m, int n,
    // int k, int stages): the maps describe the caller's w ([n, k]) and x ([m, k]), out holds
    // m * n bf16 (checked by the caller), ws the split-K sums where the kernel uses it (locked
    // in `ws` until after the launch), m <= nt, and the shared memory holds `stages` (2..=16)
    // stages beside the receive area.
    unsafe {
        Launch::new(be.stream(), &f)
            .arg_struct(&tw)
            .arg_struct(&tx)
            .arg(&out)
            .arg(&ws_ptr)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&stages)
            .cluster(split as u32)
            .launch(cfg)
    }
    .map_err(|e| driver_err(name, e))
}

/// `Backend::silu_and_mul_gemm` fused into one skinny kernel (`gemv_m8_silu`), when it applies:
/// at most 8 rows, the skinny kernels allowed for `m` by the policy, `k % 8 == 0`, 16-byte
/// aligned operands, a weight the kernel requests in one batch (see [`skinny_warps`]; Qwen3-0.6B's
/// down projection is one, Qwen3-8B's is not), and `NANOVLLM_FUSED_SILU` not set to 0. Returns
/// whether it queued the kernel; on false the caller runs silu_and_mul and gemm. The buffers are
/// checked by the caller as for [`gemm`], `gate_up` holding `m * 2k` elements.
///
/// Why only one batch: the kernel computes the activation between a batch's loads and its
/// products, so a CTA that loops over batches waits that long once per batch; on Qwen3-8B's
/// down projection at tp 2 (N = 4096, K = 6144) it took twice the unfused kernel's time
/// (H100, 2026-11-27).
#[allow(clippy::too_many_arguments)]
pub(super) fn silu_gemm(
    be: &CudaBackend,
    gate_up: u64,
    w: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
) -> Result<bool> {
    let (_, rows, tiles, max_warps) = SKINNY_SILU_KERNEL;
    // skinny_warps' choice is one batch: it needs no more warps than the kernel has, and
    // does not stream.
    let warps = one_batch_warps(k, tiles);
    let one_batch = warps <= max_warps && !streams(warps, n.div_ceil(8), be.num_sms());
    let fits = fused_silu_enabled()
        && one_batch
        && m <= rows
        && skinny_fits(be, m, gate_up, w, n, k, 2 * k);
    if fits {
        skinny(be, SKINNY_SILU_KERNEL, gate_up, w, out, m, n, k)?;
    }
    Ok(fits)
}

/// Whether the MLP's activation is fused into its down projection where it can be: on unless
/// the environment sets `NANOVLLM_FUSED_SILU=0` (read once per process; for A/B timing).
fn fused_silu_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| nanovllm_utils::env_switch("NANOVLLM_FUSED_SILU", true))
}

/// Queues skinny `kernel` (an entry of [`SKINNY_KERNELS`] or [`SKINNY_SILU_KERNEL`], taking
/// `m` rows) on x (or gate_up) and w (see `cuda/gemv.cu`).
#[allow(clippy::too_many_arguments)]
fn skinny(
    be: &CudaBackend,
    kernel: SkinnyKernel,
    x: u64,
    w: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let (name, _, tiles, max_warps) = kernel;
    let func = be.func("gemv", name)?;
    let ctas = n.div_ceil(8);
    let warps = skinny_warps(k, ctas, tiles, max_warps, be.num_sms());
    let grid = u32::try_from(ctas)
        .map_err(|_| Error::Other(format!("op gemm: n = {n} is too many CUDA blocks")))?;
    let dim = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    let (mi, ni, ki) = (dim(m), dim(n), dim(k));
    let mut b = Launch::new(be.stream(), &func);
    b.arg(&x).arg(&w).arg(&out).arg(&mi).arg(&ni).arg(&ki);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (warps as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `gemv_m*` in gemv.cu (pointers, then M, N, K as int; n and
    // k were checked to fit, m to be within the kernel's rows, the block within its launch
    // bound). The caller checked that x, w and out hold m * k (m * 2k for gemv_m8_silu's
    // gate_up), n * k and m * n bf16; x and w are 16-byte aligned and k % 8 == 0, as the
    // kernel's 16-byte loads need. Block b writes only out[.., 8b..8b+8].
    unsafe { b.launch(cfg) }.map_err(|e| driver_err("gemm: skinny kernel launch", e))?;
    Ok(())
}

/// Warps per CTA of the skinny kernel: enough that each warp's share of K is one batch of
/// `tiles` k tiles per thread, so the whole of a small weight is requested at once (Qwen3-0.6B:
/// 4-24 warps). When that takes more than 8 warps while there are at least two CTAs per SM
/// anyway (large K and N, as in Qwen3-8B), such CTAs would fit once per SM and run in waves of
/// load, wait, reduce; 4-warp CTAs that loop over their share instead fit several per SM and
/// keep the loads of some in flight while others reduce.
fn skinny_warps(k: usize, ctas: usize, tiles: usize, max_warps: usize, sms: usize) -> usize {
    let one_batch = one_batch_warps(k, tiles).clamp(1, max_warps);
    if streams(one_batch, ctas, sms) {
        STREAM_WARPS
    } else {
        one_batch
    }
}

/// Warps that request K = `k` in one batch of `tiles` k tiles of 32 per thread.
fn one_batch_warps(k: usize, tiles: usize) -> usize {
    k.div_ceil(32).div_ceil(tiles)
}

/// Whether CTAs of `warps` warps give way to 4-warp CTAs that loop over batches (see
/// [`skinny_warps`]).
fn streams(warps: usize, ctas: usize, sms: usize) -> bool {
    warps > 8 && ctas >= 2 * sms
}

/// Whether the skinny kernels take an `m`-row product with these operands under the current
/// policy: `m` within `skinny_max_m`, `k % 8 == 0`, 16-byte aligned x and w (the kernels'
/// 16-byte loads), and N and the x row width `x_width` fitting the kernels' ints.
fn skinny_fits(
    be: &CudaBackend,
    m: usize,
    x: u64,
    w: u64,
    n: usize,
    k: usize,
    x_width: usize,
) -> bool {
    m <= be.blas.skinny_max_m.load(Ordering::Relaxed)
        && k.is_multiple_of(8)
        && x.is_multiple_of(16)
        && w.is_multiple_of(16)
        && i32::try_from(n).is_ok()
        && i32::try_from(x_width).is_ok()
}

impl CudaBackend {
    /// How `gemm` currently picks its kernel.
    pub fn gemm_policy(&self) -> GemmPolicy {
        GemmPolicy {
            skinny_max_m: self.blas.skinny_max_m.load(Ordering::Relaxed),
            tuning: GemmTuning::from_u8(self.blas.tuning.load(Ordering::Relaxed)),
        }
    }

    /// Sets how `gemm` picks its kernel, and forgets every cuBLASLt plan and tuning result, so
    /// that the next call of each shape plans (and tunes) again under the new policy. Set it
    /// before capturing CUDA graphs: graphs keep the kernels they captured.
    pub fn set_gemm_policy(&self, policy: GemmPolicy) -> Result<()> {
        if policy.skinny_max_m > SKINNY_LIMIT {
            return Err(Error::Other(format!(
                "gemm policy: skinny_max_m = {} exceeds what the skinny kernels take ({SKINNY_LIMIT})",
                policy.skinny_max_m
            )));
        }
        let mut state = self.blas.lock()?;
        state.plans.clear();
        state.tuned.clear();
        self.blas
            .skinny_max_m
            .store(policy.skinny_max_m, Ordering::Relaxed);
        self.blas
            .tuning
            .store(policy.tuning.to_u8(), Ordering::Relaxed);
        Ok(())
    }
}

impl Gemm {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle =
            lt::create_handle().map_err(|e| blas_err("creating the cuBLASLt handle", e))?;
        // SAFETY: cuBLASLt uses the workspace as scratch; its contents do not matter.
        let workspace = match unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) } {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above, not used anywhere else.
                unsafe {
                    let _ = lt::destroy_handle(handle);
                }
                return Err(driver_err("gemm: cuBLASLt workspace", e));
            }
        };
        let policy = GemmPolicy::default();
        Ok(Gemm {
            handle,
            workspace,
            state: Mutex::new(Plans {
                plans: HashMap::new(),
                tuned: HashMap::new(),
            }),
            skinny_max_m: AtomicUsize::new(policy.skinny_max_m),
            tuning: AtomicU8::new(policy.tuning.to_u8()),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Plans>> {
        self.state
            .lock()
            .map_err(|_| Error::Cuda("gemm: plan cache lock poisoned by a panic".into()))
    }

    /// The descriptors of a shape and the heuristic's candidate algorithms, best guess first.
    fn plan(&self, m: usize, n: usize, k: usize) -> Result<(Plan, Vec<sys::cublasLtMatmulAlgo_t>)> {
        let dt = sys::cudaDataType_t::CUDA_R_16BF;
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let ld = |v: usize| -> Result<i64> {
            i64::try_from(v).map_err(|_| Error::Other(format!("op gemm: dimension {v} too large")))
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| blas_err("matmul descriptor", e))?;
        // The plan owns each object from creation on, so an early return frees them.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: an all-zero algo struct is a valid placeholder; it is overwritten by
            // the heuristic's choice below before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        let trans_a: i32 = 1; // CUBLAS_OP_T
        let trans_b: i32 = 0; // CUBLAS_OP_N
                              // SAFETY: `desc` is live; each attribute is an int32 as cuBLASLt documents.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans_a as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(|e| blas_err("transa", e))?;
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &trans_b as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(|e| blas_err("transb", e))?;
        }
        plan.a = lt::create_matrix_layout(dt, k64, n64, ld(k)?)
            .map_err(|e| blas_err("layout of w", e))?;
        plan.b = lt::create_matrix_layout(dt, k64, m64, ld(k)?)
            .map_err(|e| blas_err("layout of x", e))?;
        plan.c = lt::create_matrix_layout(dt, n64, m64, ld(n)?)
            .map_err(|e| blas_err("layout of out", e))?;
        let pref = lt::create_matmul_pref().map_err(|e| blas_err("preference", e))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: an all-zero result array is valid memory for cuBLASLt to fill.
        let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] =
            unsafe { std::mem::zeroed() };
        let mut found: std::ffi::c_int = 0;
        // SAFETY: `pref` is live until destroyed below; the attribute is a u64 byte count;
        // every descriptor passed to the heuristic is live, and `results` holds CANDIDATES
        // entries, the count asked for.
        let status = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            );
            let h = set.and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    CANDIDATES as std::ffi::c_int,
                    results.as_mut_ptr(),
                    &mut found,
                )
                .result()
            });
            let _ = lt::destroy_matmul_pref(pref);
            h
        };
        let what = || format!("no cuBLASLt algorithm for m={m} n={n} k={k}");
        status.map_err(|e| blas_err(&what(), e))?;
        let candidates: Vec<_> = results[..(found.max(0) as usize).min(CANDIDATES)]
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        let first = *candidates
            .first()
            .ok_or_else(|| Error::Cuda(format!("gemm: {}", what())))?;
        plan.algo = first;
        Ok((plan, candidates))
    }

    /// Queues one `cublasLtMatmul` of `plan` with `algo`.
    ///
    /// # Safety
    /// `x`, `w` and `out` are device buffers of at least the plan's m * k, n * k and m * n
    /// bf16, used on `stream`.
    unsafe fn launch(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        (x, w, out): (u64, u64, u64),
    ) -> std::result::Result<(), lt::CublasError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (ws, _sync) = self.workspace.device_ptr(stream);
        // beta = 0, so C (= out) is not read.
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            w as *const c_void,
            plan.a,
            x as *const c_void,
            plan.b,
            out as *const c_void,
            plan.c,
            out as *mut c_void,
            plan.c,
            algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            stream.cu_stream() as sys::cudaStream_t,
        )
    }

    /// Times each candidate with a cold L2 on the call's buffers and returns the fastest, or
    /// the heuristic's first choice (`candidates[0]`) unless another beats it by
    /// [`MIN_GAIN`]. Candidates that fail to launch are skipped. When the flush buffer cannot
    /// be allocated (device memory full), nothing is timed and the first choice is returned.
    fn tune(
        &self,
        be: &CudaBackend,
        plan: &Plan,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        bufs: (u64, u64, u64),
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let stream = be.stream();
        // One untimed run each: drops the candidates that cannot run this shape and finishes
        // any lazy set-up before the timed runs.
        let usable: Vec<_> = candidates
            .iter()
            // SAFETY: the caller checked the buffers against the plan's shape (see `gemm`).
            .filter(|algo| unsafe { self.launch(stream, plan, algo, bufs) }.is_ok())
            .copied()
            .collect();
        if usable.len() < 2 {
            return Ok(usable.first().copied().unwrap_or(plan.algo));
        }
        let ctx = stream.context();
        let ev = |what: &str, e| driver_err(&format!("gemm tuning: {what}"), e);
        let l2 = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| ev("L2 size", e))?
            .max(0) as usize;
        let flush_bytes = (2 * l2).max(64 << 20);
        // SAFETY: the flush buffer is only read (its contents do not matter).
        let Ok(mut flush) = (unsafe { stream.alloc::<u8>(flush_bytes) }) else {
            return Ok(usable[0]);
        };
        let new_event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| ev("event", e))
        };
        let mut marks: Vec<Vec<(CudaEvent, CudaEvent)>> =
            usable.iter().map(|_| Vec::new()).collect();
        // Rounds outside, candidates inside: a drift in clocks spreads over all of them.
        for _ in 0..ROUNDS {
            for (algo, marks) in usable.iter().zip(marks.iter_mut()) {
                be.read_through(&mut flush)?;
                let (start, end) = (new_event()?, new_event()?);
                start.record(stream).map_err(|e| ev("record", e))?;
                // SAFETY: as for the untimed runs above.
                unsafe { self.launch(stream, plan, algo, bufs) }
                    .map_err(|e| blas_err("timing a candidate", e))?;
                end.record(stream).map_err(|e| ev("record", e))?;
                marks.push((start, end));
            }
        }
        let mut scores = Vec::with_capacity(usable.len());
        for marks in &marks {
            let mut t = marks
                .iter()
                .map(|(s, e)| s.elapsed_ms(e))
                .collect::<std::result::Result<Vec<f32>, _>>()
                .map_err(|e| ev("elapsed time", e))?;
            t.sort_by(f32::total_cmp);
            let inner = &t[1..t.len() - 1];
            scores.push(inner.iter().sum::<f32>() / inner.len() as f32);
        }
        drop(flush);
        let (best, best_t) = scores
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, scores[0]));
        Ok(if best_t < scores[0] * (1.0 - MIN_GAIN) {
            usable[best]
        } else {
            usable[0]
        })
    }

    /// Queues `out = x . w^T` through cuBLASLt on the backend's stream; the pointers are
    /// device addresses of buffers the caller checked to hold `m * k`, `n * k` and `m * n`
    /// bf16. Plans (and, per the policy, tunes) the shape on its first call.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        be: &CudaBackend,
        x: u64,
        w: u64,
        out: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let stream = be.stream();
        let mut state = self.lock()?;
        let Plans { plans, tuned } = &mut *state;
        let bufs = (x, w, out);
        let plan = match plans.entry((m, n, k)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let (mut plan, candidates) = self.plan(m, n, k)?;
                let capturing = stream
                    .capture_status()
                    .map_err(|e| driver_err("gemm: capture status", e))?
                    != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
                let tuning = GemmTuning::from_u8(self.tuning.load(Ordering::Relaxed));
                if !capturing && candidates.len() > 1 && tuning.covers(m, n, k) {
                    match tuned.entry((m.next_power_of_two(), n, k)) {
                        Entry::Occupied(best) => {
                            let best = best.get();
                            if candidates.iter().any(|c| c.data == best.data) {
                                plan.algo = *best;
                            }
                        }
                        Entry::Vacant(slot) => {
                            plan.algo = self.tune(be, &plan, &candidates, bufs)?;
                            slot.insert(plan.algo);
                        }
                    }
                }
                e.insert(plan)
            }
        };
        // SAFETY: the plan's descriptors describe exactly the buffers behind x, w and out
        // (checked by the caller to be large enough), the workspace holds WORKSPACE_BYTES,
        // and everything is queued on `stream`, the stream every buffer is used on.
        unsafe { self.launch(stream, plan, &plan.algo, bufs) }
            .map_err(|e| blas_err(&format!("cublasLtMatmul m={m} n={n} k={k}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every TMA kernel variant fits the 227 KiB of shared memory an H100 CTA may have, with a
    /// ring of at least three stages.
    #[test]
    fn tma_kernels_fit_shared_memory() {
        for (wg, nt, _) in TMA_KERNELS {
            let stages = tma_stages(nt, wg, TMA_SMEM_KB * 1024);
            let bytes = tma_smem_bytes(nt, wg, stages);
            assert!(bytes <= 227 * 1024, "n{nt} x{wg}: {bytes} bytes");
            assert!(stages >= 3, "n{nt} x{wg}: too few stages");
            // A smaller budget gives fewer stages, never more bytes than it allows (down to
            // the two stages the ring needs).
            let small = tma_stages(nt, wg, 160 * 1024);
            assert!(small <= stages);
            assert!(small == 2 || tma_smem_bytes(nt, wg, small) <= 160 * 1024);
        }
    }

    /// Two warpgroups only above 64 tokens and for weights whose 128-row tiles fill the GPU
    /// without split-K (Qwen3-8B's gate_up and LM head at tp 1 and tp 2 on 132 SMs), one for
    /// the rest; a forced count wins where its kernels exist.
    #[test]
    fn tma_warpgroups_take_two_only_for_wide_weights_above_64_tokens() {
        let wg = |m, n| tma_warpgroups(0, m, n, 132);
        assert_eq!(wg(64, 24_576), 1);
        assert_eq!(wg(65, 24_576), 2); // gate_up: 192 tiles
        assert_eq!(wg(256, 12_288), 2); // tp 2 gate_up: 96 tiles
        assert_eq!(wg(128, 151_936), 2); // LM head
        assert_eq!(wg(256, 4096), 1); // o, down: 32 tiles
        assert_eq!(wg(256, 6144), 1); // qkv: 48 tiles
        assert_eq!(tma_warpgroups(2, 64, 4096, 132), 2);
        assert_eq!(tma_warpgroups(2, 32, 4096, 132), 1);
        assert_eq!(tma_warpgroups(1, 256, 24_576, 132), 1);
    }

    /// Split-K spreads the few tiles of the Qwen3-8B tp 2 shapes over the 132 SMs of an H100
    /// within one wave, and leaves shapes with enough tiles (or too short a K) whole.
    #[test]
    fn tma_split_fills_one_wave() {
        let split = |n, k| tma_split(132, 0, 64, 1, n, k);
        assert_eq!(split(4096, 2048), 2); // o: 64 tiles
        assert_eq!(split(3072, 4096), 2); // qkv: 48 tiles
        assert_eq!(split(12_288, 4096), 1); // gate_up: 192 tiles
        assert_eq!(split(1024, 3072), 4); // Qwen3-0.6B down: 16 tiles, the kernel's most
        assert_eq!(split(1024, 128), 1); // two k tiles: nothing to split
        assert_eq!(tma_split(132, 0, 128, 2, 4096, 2048), 4); // 32 tiles of 128 rows
    }

    /// The launch shapes measured on an H100 (132 SMs): one batch per warp for the Qwen3-0.6B
    /// layers, 4-warp looping CTAs for the large K and N of Qwen3-8B.
    #[test]
    fn skinny_warps_pick_one_batch_for_small_weights_and_streaming_ctas_for_large() {
        let sms = 132;
        let m8 = |k, n: usize| skinny_warps(k, n.div_ceil(8), 8, 16, sms);
        let m16 = |k, n: usize| skinny_warps(k, n.div_ceil(8), 4, 24, sms);
        // Qwen3-0.6B: qkv, o, gate_up, down, lm_head.
        assert_eq!(m8(1024, 4096), 4);
        assert_eq!(m8(2048, 1024), 8);
        assert_eq!(m8(1024, 6144), 4);
        assert_eq!(m8(3072, 1024), 12);
        assert_eq!(m8(1024, 151_936), 4);
        assert_eq!(m16(1024, 4096), 8);
        assert_eq!(m16(3072, 1024), 24);
        // Qwen3-8B: qkv, down.
        assert_eq!(m8(4096, 6144), STREAM_WARPS);
        assert_eq!(m16(12_288, 4096), STREAM_WARPS);
        // Few CTAs keep one batch per warp, up to the launch bound.
        assert_eq!(m8(12_288, 1024), 16);
        assert_eq!(m8(8, 5), 1);
    }

    /// `WhereItPays` tunes prefill sizes and large weights, not Qwen3-0.6B's decode shapes.
    #[test]
    fn where_it_pays_tunes_prefill_and_large_weights_only() {
        let t = GemmTuning::WhereItPays;
        for (n, k) in [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)] {
            assert!(!t.covers(512, n, k), "0.6B decode {n} x {k}");
            assert!(t.covers(1024, n, k), "0.6B prefill {n} x {k}");
        }
        assert!(t.covers(32, 4096, 4096), "8B o: exactly 32 MiB");
        assert!(t.covers(64, 151_936, 1024), "0.6B LM head");
        assert!(!GemmTuning::Off.covers(16_384, 151_936, 4096));
        assert!(GemmTuning::All.covers(1, 8, 8));
        for t in [GemmTuning::Off, GemmTuning::WhereItPays, GemmTuning::All] {
            assert_eq!(GemmTuning::from_u8(t.to_u8()), t);
        }
    }
}
