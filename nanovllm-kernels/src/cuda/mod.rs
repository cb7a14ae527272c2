//! The CUDA backend: [`CudaBackend`] runs every op of the [`Backend`] trait on one NVIDIA GPU.
//!
//! Where it sits: the model runner creates one `CudaBackend` per GPU (rank) and every layer of
//! the model queues its ops on it; the CPU backend ([`crate::cpu`]) is the reference its
//! results are checked against (`examples/op_check.rs`).
//!
//! * Kernels are CUDA C (`cuda/*.cu`, one file per family), compiled by `build.rs` to PTX and
//!   to sm_90 machine code, both embedded in the binary. On compute capability 9.0 (H100,
//!   H200) the backend loads the machine code, which takes milliseconds; elsewhere, or with
//!   `NANOVLLM_CUBIN=0`, the driver JIT-compiles the PTX (seconds per large module on a
//!   machine whose driver cache is empty; cached afterwards). Module name = file stem.
//! * GEMMs go through a skinny kernel of `cuda/gemv.cu` for decode's few rows and cuBLASLt
//!   with a fixed workspace otherwise (`gemm`, [`GemmPolicy`]), attention through the
//!   kernels of `cuda/attention.cu` (`attention`).
//! * Everything runs on one non-default stream, so all work is ordered by the stream alone:
//!   cudarc's per-buffer event tracking is switched off for the backend's context, and the
//!   stream can be captured into CUDA graphs ([`CudaBackend::capture`]).
//! * Our kernels are launched with programmatic dependent launch (`launch`, [`pdl_enabled`]):
//!   each may start while its predecessor finishes, and waits for it before touching memory.
//! * Ops are asynchronous; only [`Backend::dtoh`] and [`Backend::synchronize`] wait.
//!
//! Values inside device buffers (token ids, slots, positions, indices, sampling parameters)
//! cannot be validated without a device round trip; the kernels clamp or skip values outside
//! their range (see each kernel file) so that bad metadata never reads or writes out of
//! bounds. Buffer lengths are checked on the host before every launch.

mod attention;
mod copy_ar;
mod custom_ar;
mod gemm;
mod launch;
mod nccl;
mod ops;
mod staging;

pub use gemm::{GemmPolicy, GemmTuning, SKINNY_LIMIT};
pub use launch::pdl_enabled;
pub use nccl::{nccl_unique_id, NcclComm, NCCL_ID_BYTES};

use std::collections::HashMap;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys::{
    CUdevice_attribute, CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode,
    CUstreamCaptureStatus,
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, DriverError, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::bf16;
use nanovllm_utils::{Error, Result};

use crate::backend::{AttnParams, Backend, Elem, GraphExec, QkNormRope, SamplingBufs};

include!(concat!(env!("OUT_DIR"), "/ptx_modules.rs"));

/// A buffer of `T` in device memory: byte storage (the [`Elem`] trait knows nothing of
/// cudarc) plus the element count. Allocations are rounded up to 16 bytes, so a kernel's
/// 16-byte vector access at the end of a buffer stays inside it.
#[derive(Debug)]
pub struct CudaBuf<T> {
    data: ManuallyDrop<CudaSlice<u8>>,
    len: usize,
    /// Memory that another owner frees (an allocation the NCCL group shares with its peer:
    /// [`NcclComm::alloc_shared`]); dropping the buffer leaves it alone.
    borrowed: bool,
    _elem: PhantomData<T>,
}

/// The bytes a buffer of `bytes` bytes takes: rounded up to 16 (see [`CudaBuf`]), at least 16.
pub(crate) fn padded(bytes: usize) -> usize {
    bytes.div_ceil(16).max(1) * 16
}

impl<T> Drop for CudaBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `data` is taken once, here, and not used after.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        if self.borrowed {
            data.leak();
        }
    }
}

impl<T: Elem> CudaBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device memory, to pass to a kernel that reads it.
    pub(crate) fn raw(&self) -> &CudaSlice<u8> {
        &self.data
    }

    /// The device memory, to pass to a kernel that writes it.
    pub(crate) fn raw_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.data
    }
}

/// The kernels this file's ops launch, looked up once when the backend starts.
struct Kernels {
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    qk_norm_rope: CudaFunction,
    qk_norm_rope_store: CudaFunction,
    store_kvcache: CudaFunction,
    silu_and_mul: CudaFunction,
    embedding: CudaFunction,
    gather_rows: CudaFunction,
    sample: CudaFunction,
    sample_reduce: CudaFunction,
    sample_reduce_part: CudaFunction,
}

/// Per-split partial results of the sampler: (best key, its index) per block.
struct SampleParts {
    key: CudaSlice<f32>,
    idx: CudaSlice<u32>,
}

/// One NVIDIA GPU: its context, the stream every op is queued on, the loaded kernel modules
/// and the cuBLASLt state.
pub struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    funcs: Mutex<HashMap<String, HashMap<String, CudaFunction>>>,
    kernels: Kernels,
    num_sms: usize,
    blas: gemm::Gemm,
    scratch: Mutex<CudaSlice<f32>>,
    /// Pinned host memory for `htod` / `dtoh` (see `staging.rs`).
    staging: Mutex<staging::Staging>,
    sample_parts: Mutex<SampleParts>,
    /// Arrival counters of decode attention's splits (zero between launches).
    split_counters: Mutex<CudaSlice<u32>>,
    /// Scratch buffers replaced by larger ones, kept until the backend is dropped: a CUDA
    /// graph captured before the growth still reads and writes the old address.
    retired: Mutex<Vec<Box<dyn std::any::Any + Send>>>,
    /// Whether every kernel module was loaded from its sm_90 machine code (else from PTX).
    machine_code: bool,
}

/// `Error::Cuda` for a failed driver call, naming what was being done.
pub(crate) fn driver_err(what: &str, e: DriverError) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: {e:?}"))
    } else {
        Error::Cuda(format!("{what}: {e:?}"))
    }
}

fn no_driver(ordinal: usize, why: &str) -> Error {
    Error::Cuda(format!(
        "no CUDA driver found for cuda:{ordinal} ({why}); use --device cpu"
    ))
}

/// Settings a launcher reads from the environment once per process: `read`'s value, kept in
/// `cell`, or its error, kept as text so that every later call reports it too.
pub(crate) fn env_once<T>(
    cell: &'static OnceLock<std::result::Result<T, String>>,
    read: impl FnOnce() -> Result<T>,
) -> Result<&'static T> {
    cell.get_or_init(|| read().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Other(e.clone()))
}

fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>> {
    m.lock()
        .map_err(|_| Error::Cuda(format!("{what}: lock poisoned by a panic")))
}

/// Number of CUDA GPUs the driver reports; an error when there is no driver.
pub fn device_count() -> Result<usize> {
    let probe = || -> Result<usize> {
        // SAFETY: only tries to open the shared library; no symbol is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(no_driver(0, "libcuda.so cannot be loaded"));
        }
        cudarc::driver::result::init()
            .map_err(|e| no_driver(0, &format!("cuInit failed: {e:?}")))?;
        let count = cudarc::driver::result::device::get_count()
            .map_err(|e| no_driver(0, &format!("cuDeviceGetCount failed: {e:?}")))?;
        Ok(count.max(0) as usize)
    };
    catch_unwind(AssertUnwindSafe(probe))
        .unwrap_or_else(|_| Err(no_driver(0, "loading the CUDA driver library failed")))
}

/// Starts (`active`) or stops the data collection of an attached profiler (Nsight Compute or
/// Systems started with `--profile-from-start off`) for the CUDA context current on this
/// thread, the one a [`CudaBackend`] made on it binds. Without a profiler it does nothing.
pub fn profiler_range(active: bool) -> Result<()> {
    // SAFETY: plain driver calls without arguments; they act on the thread's current context
    // and report an error code when there is none.
    let code = unsafe {
        if active {
            cudarc::driver::sys::cuProfilerStart()
        } else {
            cudarc::driver::sys::cuProfilerStop()
        }
    };
    code.result()
        .map_err(|e| driver_err("profiler range (is a CUDA context current?)", e))
}

impl CudaBackend {
    /// Opens GPU `ordinal`: creates its context and a stream, loads every kernel module and
    /// creates the cuBLASLt handle. A machine without a driver or GPU gets an `Error::Cuda`
    /// saying so (never a panic).
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc's dynamic loader panics when a library or symbol is missing.
        match catch_unwind(AssertUnwindSafe(|| Self::init(ordinal))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("loading the CUDA libraries failed");
                Err(no_driver(ordinal, msg))
            }
        }
    }

    fn init(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to open the shared library; no symbol is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(no_driver(ordinal, "libcuda.so cannot be loaded"));
        }
        cudarc::driver::result::init()
            .map_err(|e| no_driver(ordinal, &format!("cuInit failed: {e:?}")))?;
        let count = cudarc::driver::result::device::get_count()
            .map_err(|e| no_driver(ordinal, &format!("cuDeviceGetCount failed: {e:?}")))?;
        if count <= 0 {
            return Err(Error::Cuda(format!(
                "no CUDA GPU found (the driver reports {count}) for cuda:{ordinal}; use --device cpu"
            )));
        }
        if ordinal >= count as usize {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal} requested but the driver reports {count} GPU(s) (ordinals 0..{count})"
            )));
        }
        // SAFETY: only tries to open the shared library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal}: libcublasLt (CUDA 13) cannot be loaded; install the CUDA 13 \
                 cuBLAS libraries or use --device cpu"
            )));
        }
        let what = |s: &str| format!("cuda:{ordinal}: {s}");
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&what("context"), e))?;
        // SAFETY: every buffer and launch of this backend goes to its one stream, whose order
        // already orders every access, so no event tracking is needed; it must be off before
        // the first allocation (buffers created with it on record events on every use, which
        // graph capture rejects).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err(&what("stream"), e))?;
        let cc = |a| {
            ctx.attribute(a)
                .map_err(|e| driver_err(&what("compute capability"), e))
        };
        let sm_90 = cc(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? == 9
            && cc(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? == 0;
        let use_cubin = sm_90 && nanovllm_utils::env_switch("NANOVLLM_CUBIN", true);
        let mut modules = HashMap::new();
        let mut machine_code = true;
        for &(name, ptx, cubin) in KERNEL_MODULES {
            // Modules built for sm_90a (wgmma) load only on compute capability 9.0; elsewhere,
            // or where the driver refuses them, they are left out and their kernels are never
            // picked (see `has_module`): they are faster paths, not needed ones.
            let optional = ptx.contains(".target sm_90a");
            if optional && !sm_90 {
                continue;
            }
            // The machine code first where it fits the GPU; the PTX when there is none or the
            // driver refuses it (then the PTX's error is the one reported).
            let loaded = (use_cubin && !cubin.is_empty())
                .then(|| ctx.load_module(Ptx::from_binary(cubin.to_vec())).ok())
                .flatten();
            let module = match loaded {
                Some(m) => m,
                None => match ctx.load_module(Ptx::from_src(ptx)) {
                    Ok(m) => {
                        machine_code = false;
                        m
                    }
                    Err(_) if optional => continue,
                    Err(e) => {
                        return Err(driver_err(
                            &what(&format!("loading kernel module {name}")),
                            e,
                        ))
                    }
                },
            };
            modules.insert(name, module);
        }
        let get = |module: &str, name: &str| -> Result<CudaFunction> {
            modules
                .get(module)
                .ok_or_else(|| Error::Cuda(what(&format!("kernel module {module} is missing"))))?
                .load_function(name)
                .map_err(|e| driver_err(&what(&format!("kernel {module}.{name}")), e))
        };
        let kernels = Kernels {
            rms_norm: get("norm", "rms_norm")?,
            add_rms_norm: get("norm", "add_rms_norm")?,
            qk_norm_rope: get("rope", "qk_norm_rope")?,
            qk_norm_rope_store: get("rope", "qk_norm_rope_store")?,
            store_kvcache: get("kvcache", "store_kvcache")?,
            silu_and_mul: get("activation", "silu_and_mul")?,
            embedding: get("embedding", "embedding")?,
            gather_rows: get("embedding", "gather_rows")?,
            sample: get("sampling", "sample")?,
            sample_reduce: get("sampling", "sample_reduce")?,
            sample_reduce_part: get("sampling", "sample_reduce_part")?,
        };
        let num_sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err(&what("multiprocessor count"), e))?
            .max(1) as usize;
        let blas = gemm::Gemm::new(&stream).map_err(|e| match e {
            Error::Cuda(m) => Error::Cuda(what(&m)),
            other => other,
        })?;
        // SAFETY (the three allocations): scratch contents are unspecified until a kernel
        // writes them, and every kernel writes its scratch before reading it.
        let scratch =
            unsafe { stream.alloc::<f32>(1024) }.map_err(|e| driver_err(&what("scratch"), e))?;
        let sample_parts = SampleParts {
            key: unsafe { stream.alloc::<f32>(1024) }
                .map_err(|e| driver_err(&what("sampler scratch"), e))?,
            idx: unsafe { stream.alloc::<u32>(1024) }
                .map_err(|e| driver_err(&what("sampler scratch"), e))?,
        };
        let staging = staging::Staging::new(&stream, staging::STAGING_BYTES)
            .map_err(|e| driver_err(&what("pinned staging memory"), e))?;
        let split_counters = stream
            .alloc_zeros::<u32>(1024)
            .map_err(|e| driver_err(&what("split counters"), e))?;
        Ok(CudaBackend {
            ordinal,
            ctx,
            stream,
            modules,
            funcs: Mutex::new(HashMap::new()),
            kernels,
            num_sms,
            blas,
            scratch: Mutex::new(scratch),
            staging: Mutex::new(staging),
            sample_parts: Mutex::new(sample_parts),
            split_counters: Mutex::new(split_counters),
            retired: Mutex::new(Vec::new()),
            machine_code,
        })
    }

    /// How the kernels were loaded: `"sm_90 machine code"` when every module's shipped machine
    /// code loaded, else `"PTX (driver JIT)"`.
    pub fn kernel_code(&self) -> &'static str {
        if self.machine_code {
            "sm_90 machine code"
        } else {
            "PTX (driver JIT)"
        }
    }

    /// The pinned staging buffer of `htod` / `dtoh`.
    fn staging(&self) -> Result<MutexGuard<'_, staging::Staging>> {
        self.staging
            .lock()
            .map_err(|_| Error::Cuda("staging buffer lock poisoned by a panic".into()))
    }

    /// Whether the stream is being captured into a graph.
    fn capturing(&self) -> Result<bool> {
        Ok(self
            .stream
            .capture_status()
            .map_err(|e| driver_err("capture status", e))?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// The GPU's name as the driver reports it ("NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> Result<String> {
        self.ctx
            .name()
            .map_err(|e| driver_err("cuda: device name", e))
    }

    /// The GPU's context (for NCCL communicators and other libraries working on this GPU).
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this backend is queued on; work from other libraries (NCCL)
    /// queued on it is ordered with the ops, and captured with them into CUDA graphs.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Seconds the device takes for the work `f` queues on the stream, between two events
    /// recorded around it (waits for that work; for benchmarks).
    pub fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let err =
            |what: &'static str| move |e| driver_err(&format!("cuda: timing events: {what}"), e);
        let new = || {
            self.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err("create"))
        };
        let (start, end) = (new()?, new()?);
        start.record(&self.stream).map_err(err("record"))?;
        f()?;
        end.record(&self.stream).map_err(err("record"))?;
        end.synchronize().map_err(err("wait"))?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(err("elapsed"))?) * 1e-3)
    }

    /// Number of streaming multiprocessors (132 on an H100 SXM).
    pub(crate) fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// Queues one read of every byte of `buf` (gemv.cu's `l2_flush`: 16-byte loads over a
    /// grid of 4 x 512-thread CTAs per SM), for measuring the device's read bandwidth
    /// (op_bench's ceiling). The kernel keeps an XOR of what it reads and, only if that equals
    /// a fixed constant, writes it over the first 8 KiB (so the loads cannot be optimised
    /// away): `buf` is taken mutably and must hold at least 8 KiB.
    pub fn read_all(&self, buf: &mut CudaBuf<u8>) -> Result<()> {
        if buf.len < 8192 {
            return Err(Error::Other(format!(
                "read_all: a buffer of {} bytes; it needs at least 8,192",
                buf.len
            )));
        }
        self.read_through(&mut buf.data)
    }

    /// [`CudaBackend::read_all`] on a raw device slice of at least 8 KiB (also the gemm
    /// tuner's L2 flush).
    pub(crate) fn read_through(&self, buf: &mut CudaSlice<u8>) -> Result<()> {
        if buf.len() < 8192 {
            return Err(Error::Other(format!(
                "l2_flush: a buffer of {} bytes; it needs at least 8,192",
                buf.len()
            )));
        }
        let f = self.func("gemv", "l2_flush")?;
        let n16 = (buf.len() / 16) as u64;
        let never: u32 = 0x9E37_79B9;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (self.num_sms as u32 * 4, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(buf).arg(&n16).arg(&never);
        // SAFETY: matches `l2_flush(uint4* buf, u64 n16, u32 never)` in gemv.cu: it reads n16
        // 16-byte vectors, all inside `buf`, and may write its first 512 vectors (8 KiB,
        // checked above); `buf` is borrowed mutably for the call.
        unsafe { b.launch(cfg) }.map_err(|e| driver_err("l2_flush", e))?;
        Ok(())
    }

    /// Whether kernel module `module` (the `.cu` file stem) was loaded: those built for sm_90a
    /// are only on compute capability 9.0.
    pub(crate) fn has_module(&self, module: &str) -> bool {
        self.modules.contains_key(module)
    }

    /// Kernel `name` of module `module` (the `.cu` file stem), looked up once and cached.
    pub(crate) fn func(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let mut funcs = lock(&self.funcs, "cuda: kernel cache")?;
        if let Some(f) = funcs.get(module).and_then(|m| m.get(name)) {
            return Ok(f.clone());
        }
        let m = self.modules.get(module).ok_or_else(|| {
            Error::Cuda(format!(
                "kernel module `{module}` does not exist (modules: {:?})",
                self.modules.keys().collect::<Vec<_>>()
            ))
        })?;
        let f = m
            .load_function(name)
            .map_err(|e| driver_err(&format!("kernel {module}.{name}"), e))?;
        funcs
            .entry(module.to_string())
            .or_default()
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// A device scratch buffer of at least `len` f32 (split-K partial results), locked for
    /// the caller while the guard lives. Its contents are unspecified.
    ///
    /// It grows (a new allocation; the old one is kept alive, see [`Self::retire`]) only when
    /// asked for more than it holds. Growing is refused while the stream is being captured into
    /// a CUDA graph: run each shape once before capturing it (the model runner's warm-up does),
    /// so that the buffer has the size that graph needs.
    pub(crate) fn scratch_f32(&self, len: usize) -> Result<MutexGuard<'_, CudaSlice<f32>>> {
        let mut g = lock(&self.scratch, "cuda: scratch buffer")?;
        if g.len() < len {
            self.refuse_growth_in_capture("scratch_f32", g.len(), len)?;
            let new_len = len.max(2 * g.len());
            // SAFETY: scratch contents are unspecified; kernels write before they read.
            let new = unsafe { self.stream.alloc::<f32>(new_len) }
                .map_err(|e| driver_err(&format!("scratch_f32: {new_len} floats"), e))?;
            self.retire(std::mem::replace(&mut *g, new))?;
        }
        Ok(g)
    }

    /// Zeroed u32 counters, at least `len` of them, for kernels that count arrivals and reset
    /// their counter to zero before they end (decode attention's splits). Growing is refused
    /// during capture, as for [`Self::scratch_f32`].
    pub(crate) fn split_counters(&self, len: usize) -> Result<MutexGuard<'_, CudaSlice<u32>>> {
        let mut g = lock(&self.split_counters, "cuda: split counters")?;
        if g.len() < len {
            self.refuse_growth_in_capture("split_counters", g.len(), len)?;
            let new_len = len.max(2 * g.len());
            let new = self
                .stream
                .alloc_zeros::<u32>(new_len)
                .map_err(|e| driver_err(&format!("split_counters: {new_len} counters"), e))?;
            self.retire(std::mem::replace(&mut *g, new))?;
        }
        Ok(g)
    }

    /// The sampler's per-block partials, grown to hold `len` entries.
    fn sample_parts(&self, len: usize) -> Result<MutexGuard<'_, SampleParts>> {
        let mut g = lock(&self.sample_parts, "cuda: sampler scratch")?;
        if g.key.len() < len {
            self.refuse_growth_in_capture("sample", g.key.len(), len)?;
            let new_len = len.max(2 * g.key.len());
            // SAFETY: as in scratch_f32.
            let key = unsafe { self.stream.alloc::<f32>(new_len) }
                .map_err(|e| driver_err("sample: partial keys", e))?;
            // SAFETY: as in scratch_f32.
            let idx = unsafe { self.stream.alloc::<u32>(new_len) }
                .map_err(|e| driver_err("sample: partial indices", e))?;
            self.retire(std::mem::replace(&mut g.key, key))?;
            self.retire(std::mem::replace(&mut g.idx, idx))?;
        }
        Ok(g)
    }

    /// Keeps a scratch buffer that a larger one replaced alive until the backend is dropped.
    /// Decode graphs are captured largest batch first, each after an eager run that sizes the
    /// scratch; a smaller batch may need more (more attention splits per sequence), and the
    /// graphs captured before it still point at the old buffer. Freeing it would let a later
    /// allocation take that memory while those graphs write into it. The buffers only double,
    /// so what is kept is at most the size of the live one.
    fn retire<T: std::any::Any + Send>(&self, old: T) -> Result<()> {
        lock(&self.retired, "cuda: retired scratch")?.push(Box::new(old));
        Ok(())
    }

    fn refuse_growth_in_capture(&self, what: &str, have: usize, want: usize) -> Result<()> {
        let status = self
            .stream
            .capture_status()
            .map_err(|e| driver_err("cuda: stream capture status", e))?;
        if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Err(Error::Cuda(format!(
                "{what}: scratch must grow from {have} to {want} elements during CUDA graph \
                 capture; run this batch shape once before capturing it"
            )));
        }
        Ok(())
    }

    /// Records the ops `f` queues on this backend into a CUDA graph, without running them.
    ///
    /// Every buffer the ops touch must exist before capture (an allocation inside would
    /// become part of the graph), and each shape should have run once eagerly first so that
    /// cuBLASLt and the scratch buffers have finished their lazy setup. Replays read whatever
    /// the captured buffers hold at replay time.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraphHandle> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| driver_err("capture_graph: begin", e))?;
        let body = f();
        // Always end the capture, also when `f` failed, or the stream stays unusable.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        body?;
        let graph = graph
            .map_err(|e| driver_err("capture_graph: end", e))?
            .ok_or_else(|| Error::Cuda("capture_graph: the captured ops queued no work".into()))?;
        graph
            .upload()
            .map_err(|e| driver_err("capture_graph: upload", e))?;
        Ok(CudaGraphHandle { graph })
    }

    /// The raw device address of a buffer (for cuBLASLt, which takes plain pointers).
    pub(crate) fn dptr<T: Elem>(&self, buf: &CudaBuf<T>) -> u64 {
        let (p, _sync) = buf.data.device_ptr(&self.stream);
        p
    }

    /// A buffer of `len` elements over device memory that another owner allocated and frees
    /// (dropping the buffer leaves the memory alone).
    ///
    /// # Safety
    /// `ptr` addresses at least `len * size_of::<T>()` bytes, rounded up to 16, of device
    /// memory usable in this backend's context, which stays allocated as long as the buffer
    /// is used.
    pub(crate) unsafe fn borrow_buf<T: Elem>(&self, ptr: u64, len: usize) -> CudaBuf<T> {
        let bytes = padded(len * std::mem::size_of::<T>());
        // SAFETY: per the contract; the slice is leaked, never freed, on drop (`borrowed`).
        let data = unsafe { self.stream.upgrade_device_ptr::<u8>(ptr, bytes) };
        CudaBuf {
            data: ManuallyDrop::new(data),
            len,
            borrowed: true,
            _elem: PhantomData,
        }
    }
}

/// A captured CUDA graph of ops (see [`CudaBackend::capture`]), replayed on the backend's
/// stream.
pub struct CudaGraphHandle {
    graph: CudaGraph,
}

// SAFETY: a CUDA graph exec may be launched from any thread; what it must not be is used
// from two threads at once, and the handle is not Sync (replay takes &self, so sharing it
// across threads would need Sync).
unsafe impl Send for CudaGraphHandle {}

impl CudaGraphHandle {
    /// Queues one replay of the graph on the backend's stream.
    pub fn replay(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| driver_err("graph replay", e))
    }
}

impl GraphExec for CudaGraphHandle {
    fn replay(&self) -> Result<()> {
        CudaGraphHandle::replay(self)
    }
}

/// Checks that `buf` holds at least `expected` elements.
pub(crate) fn check_len<T: Elem>(
    op: &'static str,
    tensor: &'static str,
    buf: &CudaBuf<T>,
    expected: usize,
) -> Result<()> {
    if buf.len < expected {
        return Err(Error::Shape {
            op,
            tensor,
            expected,
            found: buf.len,
        });
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Buf<T: Elem> = CudaBuf<T>;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<CudaBuf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            Error::OutOfMemory(format!("alloc: {len} elements overflow the address space"))
        })?;
        let cap = padded(bytes);
        // SAFETY: the trait leaves a new buffer's contents unspecified; they are plain bytes.
        let data = unsafe { self.stream.alloc::<u8>(cap) }.map_err(|e| {
            driver_err(
                &format!(
                    "{}: allocating {len} x {} ({bytes} bytes)",
                    self.name(),
                    std::any::type_name::<T>()
                ),
                e,
            )
        })?;
        Ok(CudaBuf {
            data: ManuallyDrop::new(data),
            len,
            borrowed: false,
            _elem: PhantomData,
        })
    }

    fn zeros<T: Elem>(&self, len: usize) -> Result<CudaBuf<T>> {
        let mut buf = self.alloc::<T>(len)?;
        self.stream
            .memset_zeros(&mut *buf.data)
            .map_err(|e| driver_err("zeros: memset", e))?;
        Ok(buf)
    }

    fn len<T: Elem>(&self, buf: &CudaBuf<T>) -> usize {
        buf.len
    }

    fn from_host<T: Elem>(&self, src: &[T]) -> Result<CudaBuf<T>> {
        let mut buf = self.alloc::<T>(src.len())?;
        self.htod(src, &mut buf)?;
        Ok(buf)
    }

    fn htod<T: Elem>(&self, src: &[T], dst: &mut CudaBuf<T>) -> Result<()> {
        check_len("htod", "dst", dst, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let bytes: &[u8] = bytemuck::cast_slice(src);
        // A copy captured into a graph must not read the staging buffer (replays would read
        // whatever it holds then): the driver's own path refuses or handles capture.
        if !self.capturing()? {
            let (ptr, _sync) = dst.data.device_ptr_mut(&self.stream);
            let staged = self
                .staging()?
                .htod(bytes, ptr)
                .map_err(|e| driver_err("htod (pinned)", e))?;
            if staged {
                return Ok(());
            }
        }
        let mut view = dst.data.slice_mut(0..bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(|e| driver_err("htod", e))
    }

    fn dtoh<T: Elem>(&self, src: &CudaBuf<T>, dst: &mut [T]) -> Result<()> {
        if src.len < dst.len() {
            return Err(Error::Shape {
                op: "dtoh",
                tensor: "src",
                expected: dst.len(),
                found: src.len,
            });
        }
        if dst.is_empty() {
            return self.synchronize();
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        if !self.capturing()? {
            let (ptr, _sync) = src.data.device_ptr(&self.stream);
            let staged = self
                .staging()?
                .dtoh(ptr, bytes)
                .map_err(|e| driver_err("dtoh (pinned)", e))?;
            if staged {
                return Ok(());
            }
        }
        let view = src.data.slice(0..bytes.len());
        self.stream
            .memcpy_dtoh(&view, bytes)
            .map_err(|e| driver_err("dtoh", e))?;
        // The copy into pageable memory is synchronous already; this makes it so for any
        // host memory.
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        // Held across the wait, so that no copy is staged between the wait and the reset.
        let mut staging = self.staging()?;
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))?;
        staging.idle();
        Ok(())
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_err("memory_info", e))
    }

    fn embedding(
        &self,
        ids: &CudaBuf<u32>,
        n: usize,
        weight: &CudaBuf<bf16>,
        vocab_start: usize,
        vocab_rows: usize,
        hidden: usize,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        ops::embedding(self, ids, n, weight, vocab_start, vocab_rows, hidden, out)
    }

    fn rms_norm(
        &self,
        x: &CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        ops::rms_norm(self, x, weight, n, hidden, eps, out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        ops::add_rms_norm(self, x, residual, weight, n, hidden, eps)
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CudaBuf<bf16>,
        n: usize,
        attn: &AttnParams,
        q_norm: &CudaBuf<bf16>,
        k_norm: &CudaBuf<bf16>,
        eps: f32,
        positions: &CudaBuf<i32>,
        cos_sin: &CudaBuf<f32>,
    ) -> Result<()> {
        ops::qk_norm_rope(self, qkv, n, attn, q_norm, k_norm, eps, positions, cos_sin)
    }

    /// One launch of `qk_norm_rope_store` (rope.cu) instead of the default's two.
    fn qk_norm_rope_store(
        &self,
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
        ops::qk_norm_rope_store(
            self,
            qkv,
            n,
            attn,
            q_norm,
            k_norm,
            eps,
            positions,
            cos_sin,
            slot_mapping,
            k_cache,
            v_cache,
        )
    }

    fn store_kvcache(
        &self,
        qkv: &CudaBuf<bf16>,
        n: usize,
        attn: &AttnParams,
        slot_mapping: &CudaBuf<i32>,
        k_cache: &mut CudaBuf<bf16>,
        v_cache: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        ops::store_kvcache(self, qkv, n, attn, slot_mapping, k_cache, v_cache)
    }

    fn silu_and_mul(
        &self,
        gate_up: &CudaBuf<bf16>,
        n: usize,
        inter: usize,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        ops::silu_and_mul(self, gate_up, n, inter, out)
    }

    fn gemm(
        &self,
        x: &CudaBuf<bf16>,
        w: &CudaBuf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        const OP: &str = "gemm";
        let mk = ops::numel(OP, "x", m, k)?;
        let nk = ops::numel(OP, "w", n, k)?;
        let mn = ops::numel(OP, "out", m, n)?;
        check_len(OP, "x", x, mk)?;
        check_len(OP, "w", w, nk)?;
        check_len(OP, "out", out, mn)?;
        if mn == 0 {
            return Ok(());
        }
        if k == 0 {
            // An empty sum: cuBLASLt refuses k = 0, the result is zeros.
            let mut view = out.data.slice_mut(0..mn * 2);
            return self
                .stream
                .memset_zeros(&mut view)
                .map_err(|e| driver_err("gemm: zero fill", e));
        }
        let (px, pw, po) = (self.dptr(x), self.dptr(w), self.dptr(out));
        gemm::gemm(self, px, pw, po, m, n, k)
    }

    fn silu_and_mul_gemm(
        &self,
        gate_up: &CudaBuf<bf16>,
        w: &CudaBuf<bf16>,
        m: usize,
        n: usize,
        inter: usize,
        act: &mut CudaBuf<bf16>,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        const OP: &str = "silu_and_mul_gemm";
        let mk = ops::numel(OP, "act", m, inter)?;
        check_len(OP, "gate_up", gate_up, ops::numel(OP, "gate_up", mk, 2)?)?;
        check_len(OP, "w", w, ops::numel(OP, "w", n, inter)?)?;
        check_len(OP, "out", out, ops::numel(OP, "out", m, n)?)?;
        check_len(OP, "act", act, mk)?;
        let (pg, pw, po) = (self.dptr(gate_up), self.dptr(w), self.dptr(out));
        if m > 0 && n > 0 && gemm::silu_gemm(self, pg, pw, po, m, n, inter)? {
            return Ok(());
        }
        self.silu_and_mul(gate_up, m, inter, act)?;
        self.gemm(act, w, m, n, inter, out)
    }

    fn prefill_attention(
        &self,
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
        attention::prefill_attention(
            self,
            qkv,
            k_cache,
            v_cache,
            cu_seqlens_q,
            cu_seqlens_k,
            block_tables,
            num_seqs,
            max_seqlen_q,
            max_seqlen_k,
            attn,
            out,
        )
    }

    fn decode_attention(
        &self,
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
        attention::decode_attention(
            self,
            qkv,
            k_cache,
            v_cache,
            context_lens,
            block_tables,
            num_seqs,
            max_context_len,
            attn,
            out,
        )
    }

    fn decode_attention_rope(
        &self,
        qkv: &mut CudaBuf<bf16>,
        rope: &QkNormRope<'_, Self>,
        slot_mapping: &CudaBuf<i32>,
        k_cache: &mut CudaBuf<bf16>,
        v_cache: &mut CudaBuf<bf16>,
        context_lens: &CudaBuf<i32>,
        block_tables: &CudaBuf<i32>,
        num_seqs: usize,
        max_context_len: usize,
        attn: &AttnParams,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        let fused = attention::decode_attention_rope(
            self,
            qkv,
            rope,
            slot_mapping,
            k_cache,
            v_cache,
            (context_lens, block_tables),
            num_seqs,
            max_context_len,
            attn,
            out,
        )?;
        if fused {
            return Ok(());
        }
        crate::backend::decode_attention_rope_unfused(
            self,
            qkv,
            rope,
            slot_mapping,
            (k_cache, v_cache),
            (context_lens, block_tables),
            num_seqs,
            max_context_len,
            attn,
            out,
        )
    }

    fn gather_rows(
        &self,
        x: &CudaBuf<bf16>,
        indices: &CudaBuf<i32>,
        n: usize,
        width: usize,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        ops::gather_rows(self, x, indices, n, width, out)
    }

    fn capture_graph(
        &self,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Box<dyn GraphExec>>> {
        Ok(Some(Box::new(self.capture(f)?)))
    }

    fn sample(
        &self,
        logits: &CudaBuf<bf16>,
        rows: usize,
        vocab: usize,
        params: &SamplingBufs<'_, Self>,
        out: &mut CudaBuf<u32>,
    ) -> Result<()> {
        ops::sample(self, logits, rows, vocab, params, out)
    }

    fn sample_shard(
        &self,
        logits: &CudaBuf<bf16>,
        rows: usize,
        width: usize,
        col0: usize,
        params: &SamplingBufs<'_, Self>,
        parts: &mut CudaBuf<u32>,
        slot: usize,
    ) -> Result<()> {
        ops::sample_shard(self, logits, rows, width, col0, params, parts, slot)
    }

    fn sample_combine(
        &self,
        parts: &CudaBuf<u32>,
        rows: usize,
        ranks: usize,
        out: &mut CudaBuf<u32>,
    ) -> Result<()> {
        ops::sample_combine(self, parts, rows, ranks, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI) opening the backend is an error that tells the user what to do;
    /// with one it works. Either way it must not panic.
    #[test]
    fn new_reports_a_missing_gpu_as_an_error() {
        match CudaBackend::new(0) {
            Ok(be) => assert_eq!(be.name(), "cuda:0"),
            Err(Error::Cuda(msg)) => assert!(msg.contains("cuda:0"), "unhelpful error: {msg}"),
            Err(other) => panic!("expected Error::Cuda, got {other:?}"),
        }
        // An ordinal no machine has is an error too, never a panic.
        assert!(CudaBackend::new(1 << 20).is_err());
    }
}
