//! `Backend::gemm` on the GPU: bf16 matrix products through cuBLASLt with f32 accumulation,
//! used by every linear layer (QKV, O, gate/up, down) and the LM head.
//!
//! The trait's product is row-major `out[m, n] = x[m, k] . w[n, k]^T`. cuBLAS is column-major,
//! where the same memory reads as `out^T [n, m]`, `x^T [k, m]` and `w^T [k, n]`; so the call
//! is the column-major `out^T = op(w^T) . x^T` with `op` = transpose: A = w (stored k x n,
//! ld k, transposed), B = x (stored k x m, ld k), C = D = out (n x m, ld n). That is the
//! "TN" layout cuBLASLt's Hopper kernels prefer.
//!
//! Each (m, n, k) gets a plan once - descriptors, layouts and an algorithm - so a call costs
//! one `cublasLtMatmul`. The algorithm: cuBLASLt's heuristic proposes up to [`CANDIDATES`];
//! for shapes where it pays ([`worth_tuning`]) each is timed on the shape's first call, on the
//! call's own buffers (a few runs between CUDA events), and the fastest kept; otherwise the
//! heuristic's first choice is used. The workspace is one fixed 32 MiB buffer (what NVIDIA recommends for Hopper), so calls can be
//! captured into CUDA graphs. A shape first seen during capture keeps the heuristic's choice
//! untimed; run each shape once before capturing it (the model runner's warm-up does).

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use nanovllm_utils::{Error, Result};

use super::driver_err;

/// The workspace cuBLASLt may use per call.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Algorithms asked of the heuristic and timed on a shape's first call.
const CANDIDATES: usize = 8;

/// Whether timing the heuristic's candidates finds a faster algorithm for this shape.
///
/// Back-to-back timing runs keep a small weight in L2, so they rank algorithms by hot-cache
/// speed, while in the model every weight is read cold once per step. Measured on an H100
/// (`op_bench`, Qwen3-0.6B shapes): tuning won 5-15% where the weight cannot stay in the 50 MB
/// L2 (the 311 MB LM head at every M) or the product is compute-bound (M = 16384), and lost up
/// to 50% on the decode shapes with weights of 4-12 MB (M <= 512), where the heuristic's first
/// choice was the fastest cold.
fn worth_tuning(m: usize, n: usize, k: usize) -> bool {
    m >= 1024 || n.saturating_mul(k).saturating_mul(2) >= 64 << 20
}

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

/// The cuBLASLt handle, its workspace and the plans made so far.
pub(super) struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<(usize, usize, usize), Plan>>,
    /// The algorithm tuning chose per (M rounded up to a power of two, n, k). Prefill steps
    /// come with every M, so tuning each exact shape would stall every new step on timing
    /// runs; a shape reuses its bucket's choice when the heuristic offers it too.
    tuned: Mutex<HashMap<(usize, usize, usize), sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle and the plans' descriptors are plain host objects of cuBLASLt. Every use
// (planning and matmul) happens with the `plans` lock held, so no two threads use them at
// once; the handle itself may move between threads.
unsafe impl Send for Gemm {}
// SAFETY: as above: shared access goes through the `plans` mutex.
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
        Ok(Gemm {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            tuned: Mutex::new(HashMap::new()),
        })
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

    /// Times each candidate on the call's buffers and keeps the fastest in `plan.algo`.
    /// Candidates that fail to launch are skipped.
    fn tune(
        &self,
        stream: &Arc<CudaStream>,
        plan: &mut Plan,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        bufs: (u64, u64, u64),
    ) -> Result<()> {
        let ctx = stream.context();
        let ev = |what: &str, e| driver_err(&format!("gemm tuning: {what}"), e);
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| ev("event", e))?;
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| ev("event", e))?;
        let mut best = (f32::INFINITY, plan.algo);
        for algo in candidates {
            // SAFETY: the caller checked the buffers against the plan's shape (see matmul).
            if unsafe { self.launch(stream, plan, algo, bufs) }.is_err() {
                continue;
            }
            start.record(stream).map_err(|e| ev("record", e))?;
            for _ in 0..3 {
                // SAFETY: as above.
                unsafe { self.launch(stream, plan, algo, bufs) }
                    .map_err(|e| blas_err("timing a candidate", e))?;
            }
            end.record(stream).map_err(|e| ev("record", e))?;
            end.synchronize().map_err(|e| ev("synchronize", e))?;
            let t = start.elapsed_ms(&end).map_err(|e| ev("elapsed", e))?;
            if t < best.0 {
                best = (t, *algo);
            }
        }
        plan.algo = best.1;
        Ok(())
    }

    /// Queues `out = x . w^T` on `stream`; the pointers are device addresses of buffers the
    /// caller checked to hold `m * k`, `n * k` and `m * n` bf16.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        &self,
        stream: &Arc<CudaStream>,
        x: u64,
        w: u64,
        out: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| Error::Cuda("gemm: plan cache lock poisoned by a panic".into()))?;
        let bufs = (x, w, out);
        let plan = match plans.entry((m, n, k)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let (mut plan, candidates) = self.plan(m, n, k)?;
                let capturing = stream
                    .capture_status()
                    .map_err(|e| driver_err("gemm: capture status", e))?
                    != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
                if !capturing && candidates.len() > 1 && worth_tuning(m, n, k) {
                    let mut tuned = self
                        .tuned
                        .lock()
                        .map_err(|_| Error::Cuda("gemm: tuning lock poisoned".into()))?;
                    match tuned.entry((m.next_power_of_two(), n, k)) {
                        Entry::Occupied(best) => {
                            let best = best.get();
                            if candidates.iter().any(|c| c.data == best.data) {
                                plan.algo = *best;
                            }
                        }
                        Entry::Vacant(slot) => {
                            self.tune(stream, &mut plan, &candidates, bufs)?;
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
