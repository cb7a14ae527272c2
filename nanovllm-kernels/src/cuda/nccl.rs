//! NCCL through cudarc: the collectives tensor parallelism needs (sum all-reduce of bf16
//! activations, gather of LM-head slices to rank 0, a min over one integer per rank), queued
//! on a [`CudaBackend`]'s stream so that they are ordered with its ops and captured with them
//! into CUDA graphs.
//!
//! One [`NcclComm`] per process (rank). Rank 0 makes the id with [`nccl_unique_id`] and hands
//! its 128 bytes to the other ranks; every rank then calls [`NcclComm::new`] with it (the call
//! returns once all ranks have joined). [`NcclComm::abort`] may be called from another thread
//! to unblock a rank waiting on a dead peer; every later call errors.
//!
//! All-reduces small enough for the one-shot kernel of `custom_ar.cu` (decode steps) go
//! through it when every rank could map its peers' memory (GPUs of one host with peer
//! access); `NANOVLLM_CUSTOM_ALLREDUCE=0` keeps everything on NCCL. The all-reduce that feeds a
//! residual add + RMSNorm ([`NcclComm::all_reduce_add_rms_norm`]) runs fused with it in one
//! kernel of that file when it would take the one-shot path, and as the all-reduce followed by
//! `add_rms_norm` otherwise; both give the same bits.

use std::ffi::{c_char, c_void};
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use half::bf16;
use nanovllm_utils::{Error, Result};

use super::custom_ar::CustomAllReduce;
use super::{driver_err, CudaBackend, CudaBuf};
use crate::backend::Backend;

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

fn nccl_err(what: &str, e: result::NcclError) -> Error {
    Error::Cuda(format!("NCCL {what}: {:?}", e.0))
}

/// Runs `f`, turning a panic of cudarc's dynamic loader (libnccl missing) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::Cuda(format!(
            "NCCL {what}: the NCCL library could not be loaded ({msg})"
        )))
    })
}

/// A fresh NCCL unique id (rank 0 makes it; the other ranks receive its bytes).
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    guarded("get unique id", || {
        let id = result::get_uniqueid().map_err(|e| nccl_err("get unique id", e))?;
        Ok(id.internal.map(|c| c as u8))
    })
}

/// One rank's NCCL communicator, bound to its backend's stream.
pub struct NcclComm {
    /// `None` once aborted; every collective locks it, so an abort from another thread never
    /// frees the communicator under a call in flight.
    comm: Mutex<Option<ncclComm_t>>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// The one-shot all-reduce, when every rank set it up.
    custom: Option<CustomAllReduce>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls do not overlap;
// the mutex around the handle serialises them (ncclCommAbort included).
unsafe impl Send for NcclComm {}
// SAFETY: as above: shared references only reach the handle through the mutex.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the group of `size` ranks named by `id` as `rank`; returns once every rank has
    /// joined. Collectives run on `be`'s stream.
    pub fn new(
        be: &CudaBackend,
        rank: usize,
        size: usize,
        id: &[u8; NCCL_ID_BYTES],
    ) -> Result<Self> {
        if rank >= size {
            return Err(Error::Other(format!(
                "NCCL: rank {rank} outside a group of {size}"
            )));
        }
        be.ctx()
            .bind_to_thread()
            .map_err(|e| driver_err("NCCL init: bind context", e))?;
        let id = ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        let comm = guarded("init", || {
            let mut comm = MaybeUninit::<ncclComm_t>::uninit();
            // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId on rank 0;
            // rank and size were checked above and fit an i32 for any real group.
            unsafe {
                result::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32)
                    .map_err(|e| nccl_err("init (ncclCommInitRank)", e))?;
                Ok(comm.assume_init())
            }
        })?;
        let mut nccl = NcclComm {
            comm: Mutex::new(Some(comm)),
            stream: be.stream().clone(),
            rank,
            size,
            custom: None,
        };
        let wanted = nanovllm_utils::env_switch("NANOVLLM_CUSTOM_ALLREDUCE", true);
        if wanted && size > 1 {
            nccl.custom = nccl.setup_custom(be)?;
        }
        Ok(nccl)
    }

    /// Sets up the one-shot all-reduce on every rank or on none: each rank shares an
    /// allocation, the IPC handles are exchanged through NCCL, and the ranks agree (a min over
    /// "it worked") before anyone uses it. Every rank makes the same collective calls whatever
    /// fails locally.
    fn setup_custom(&self, be: &CudaBackend) -> Result<Option<CustomAllReduce>> {
        let allocated = CustomAllReduce::allocate(be, self.size);
        let mine = allocated.as_ref().map(|(_, h)| *h).unwrap_or([0; 64]);
        let handles = self.all_gather_64(&mine)?;
        let all_allocated = self.all_reduce_min(allocated.is_ok() as u64)? == 1;
        let connected = match allocated {
            Ok((local, _)) if all_allocated => {
                CustomAllReduce::connect(be, local, &handles, self.rank).ok()
            }
            Ok((local, _)) => {
                // SAFETY: our own allocation from `allocate`, used by nobody.
                let _ = unsafe { cudarc::driver::result::free_sync(local) };
                None
            }
            Err(_) => None,
        };
        let everyone = self.all_reduce_min(connected.is_some() as u64)? == 1;
        Ok(if everyone { connected } else { None })
    }

    /// Whether all-reduces of up to the one-shot kernel's capacity bypass NCCL.
    pub fn uses_custom_all_reduce(&self) -> bool {
        self.custom.is_some()
    }

    /// An error when a one-shot all-reduce gave up waiting for a peer (its results are wrong):
    /// cheap (a read of host memory), meant for after each step.
    pub fn check(&self) -> Result<()> {
        match &self.custom {
            Some(ar) if ar.timed_out() => Err(Error::Worker(
                "a peer GPU did not reach an all-reduce within 5 s (its process died or hangs)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Every rank's 64 bytes, by rank (synchronises the stream).
    fn all_gather_64(&self, mine: &[u8; 64]) -> Result<Vec<[u8; 64]>> {
        let src = self
            .stream
            .clone_htod(mine)
            .map_err(|e| driver_err("nccl all_gather: upload", e))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(64 * self.size)
            .map_err(|e| driver_err("nccl all_gather: alloc", e))?;
        {
            let (sp, _s) = src.device_ptr(&self.stream);
            let (dp, _d) = dst.device_ptr_mut(&self.stream);
            self.with("all_gather", |comm| {
                // SAFETY: `src` holds 64 bytes and `dst` 64 per rank, both alive until after
                // the synchronising download below.
                unsafe {
                    result::all_gather(
                        sp as *const c_void,
                        dp as *mut c_void,
                        64,
                        ncclDataType_t::ncclUint8,
                        comm,
                        self.raw_stream(),
                    )
                }
                .map(|_| ())
                .map_err(|e| nccl_err("all_gather", e))
            })?;
        }
        let host = self
            .stream
            .clone_dtoh(&dst)
            .map_err(|e| driver_err("nccl all_gather: download", e))?;
        Ok(host
            .chunks_exact(64)
            .map(|c| c.try_into().unwrap_or([0; 64]))
            .collect())
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` with the live communicator, or errors when it was aborted.
    fn with<T>(&self, what: &str, f: impl FnOnce(ncclComm_t) -> Result<T>) -> Result<T> {
        let guard = self
            .comm
            .lock()
            .map_err(|_| Error::Cuda(format!("NCCL {what}: lock poisoned")))?;
        match *guard {
            Some(comm) => f(comm),
            None => Err(Error::Worker(format!(
                "NCCL {what}: the communicator was aborted because a rank died"
            ))),
        }
    }

    fn raw_stream(&self) -> cudarc::nccl::sys::cudaStream_t {
        self.stream.cu_stream() as _
    }

    /// In place over `buf[..len]`: every rank ends with the element-wise sum.
    pub fn all_reduce_sum(&self, buf: &mut CudaBuf<bf16>, len: usize) -> Result<()> {
        super::check_len("nccl all_reduce", "buf", buf, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(ar) = self.custom.as_ref().filter(|ar| len <= ar.capacity()) {
            // Refused after an abort, like the NCCL calls.
            return self.with("all_reduce", |_| ar.all_reduce(buf, len));
        }
        let (ptr, _sync) = buf.raw_mut().device_ptr_mut(&self.stream);
        self.with("all_reduce", |comm| {
            // SAFETY: `ptr` addresses at least `len` bf16 elements (checked above) that live
            // as long as `buf`; the op is queued on the stream every user of `buf` orders on.
            unsafe {
                result::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    ncclDataType_t::ncclBfloat16,
                    ncclRedOp_t::ncclSum,
                    comm,
                    self.raw_stream(),
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce", e))
        })
    }

    /// The all-reduce of `x[..n * hidden]` (this rank's partial sums, summed over the ranks
    /// and rounded to bf16 as [`Self::all_reduce_sum`] does) followed by the residual add +
    /// RMSNorm of [`Backend::add_rms_norm`], in place: `residual = bf16(sum + residual)`,
    /// `x = rms_norm(residual) * weight`. One kernel when the one-shot all-reduce is active and
    /// takes the message (decode steps of usual widths: see `CustomAllReduce::fuses`), the two
    /// ops one after the other otherwise (NCCL for the all-reduce when the message is larger,
    /// any number of rows); the result is the same either way.
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_add_rms_norm(
        &self,
        be: &CudaBackend,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "nccl all_reduce_add_rms_norm";
        let len = super::ops::numel(OP, "x", n, hidden)?;
        // Lengths are checked by whichever path runs: the fused kernel's launcher, or
        // all_reduce_sum and add_rms_norm.
        if len > 0 {
            if let Some(ar) = self.custom.as_ref().filter(|ar| ar.fuses(n, hidden)) {
                // Refused after an abort, like the NCCL calls.
                return self.with("all_reduce_add_rms_norm", |_| {
                    ar.all_reduce_add_rms_norm(x, residual, weight, n, hidden, eps)
                });
            }
        }
        if self.size > 1 {
            self.all_reduce_sum(x, len)?;
        }
        be.add_rms_norm(x, residual, weight, n, hidden, eps)
    }

    /// Gathers `part[..len]` of every rank into rank 0's `full`, rank `r`'s at
    /// `full[r * stride..]` with `stride = full.len() / size`; other ranks' `full` is untouched.
    pub fn gather_rank0(
        &self,
        part: &CudaBuf<bf16>,
        len: usize,
        full: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        super::check_len("nccl gather", "part", part, len)?;
        if len == 0 {
            return Ok(());
        }
        let stride = full.len() / self.size;
        if self.rank == 0 && len > stride {
            return Err(Error::Shape {
                op: "nccl gather",
                tensor: "full",
                expected: len * self.size,
                found: full.len(),
            });
        }
        let elem = std::mem::size_of::<bf16>();
        let (src, _s) = part.raw().device_ptr(&self.stream);
        let (dst, _d) = full.raw_mut().device_ptr_mut(&self.stream);
        let stream = self.raw_stream();
        self.with("gather", |comm| {
            let bf = ncclDataType_t::ncclBfloat16;
            result::group_start().map_err(|e| nccl_err("group start", e))?;
            // SAFETY: every pointer addresses `len` elements inside its buffer (`part` was
            // checked above, `full` holds `size` strides of at least `len`); the ops are
            // queued on the stream that orders every use of both buffers.
            let queued = unsafe {
                if self.rank == 0 {
                    (1..self.size).try_for_each(|r| {
                        let at = dst + (r * stride * elem) as u64;
                        result::recv(at as *mut c_void, len, bf, r as i32, comm, stream).map(|_| ())
                    })
                } else {
                    result::send(src as *const c_void, len, bf, 0, comm, stream).map(|_| ())
                }
            };
            let ended = result::group_end();
            queued.map_err(|e| nccl_err("gather send/recv", e))?;
            ended.map_err(|e| nccl_err("group end", e))?;
            Ok(())
        })?;
        if self.rank == 0 {
            // SAFETY: copies `len` elements from `part` to the start of `full`, both checked
            // to hold them, on the stream that orders every use of both.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst,
                    src,
                    len * elem,
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| driver_err("nccl gather: own part", e))?;
        }
        Ok(())
    }

    /// In place over `buf[..size * count]`: rank `r`'s `count` elements at `buf[r * count..]`
    /// reach every rank (queued on the stream).
    pub fn all_gather_u32(&self, buf: &mut CudaBuf<u32>, count: usize) -> Result<()> {
        let all = self.size.saturating_mul(count);
        super::check_len("nccl all_gather", "buf", buf, all)?;
        if count == 0 {
            return Ok(());
        }
        let elem = std::mem::size_of::<u32>();
        let (ptr, _sync) = buf.raw_mut().device_ptr_mut(&self.stream);
        let mine = ptr + (self.rank * count * elem) as u64;
        self.with("all_gather", |comm| {
            // SAFETY: `buf` holds size * count u32 (checked above); this rank's count of them
            // start at `mine`, the in-place position NCCL asks for (recvbuff + rank * count);
            // the op is queued on the stream every user of `buf` orders on.
            unsafe {
                result::all_gather(
                    mine as *const c_void,
                    ptr as *mut c_void,
                    count,
                    ncclDataType_t::ncclUint32,
                    comm,
                    self.raw_stream(),
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("all_gather", e))
        })
    }

    /// The smallest `value` over all ranks (synchronises the stream).
    pub fn all_reduce_min(&self, value: u64) -> Result<u64> {
        let mut buf = self
            .stream
            .clone_htod(&[value])
            .map_err(|e| driver_err("nccl min: upload", e))?;
        {
            let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
            self.with("all_reduce min", |comm| {
                // SAFETY: `ptr` addresses the one u64 of `buf`, alive until after the
                // synchronising download below.
                unsafe {
                    result::all_reduce(
                        ptr as *const c_void,
                        ptr as *mut c_void,
                        1,
                        ncclDataType_t::ncclUint64,
                        ncclRedOp_t::ncclMin,
                        comm,
                        self.raw_stream(),
                    )
                }
                .map(|_| ())
                .map_err(|e| nccl_err("all_reduce min", e))
            })?;
        }
        let out = self
            .stream
            .clone_dtoh(&buf)
            .map_err(|e| driver_err("nccl min: download", e))?;
        Ok(out[0])
    }

    /// Aborts the communicator: NCCL kernels waiting on a dead peer return, and every later
    /// call on this communicator errors. Safe to call from another thread, and more than once.
    pub fn abort(&self) {
        let mut guard = match self.comm.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(comm) = guard.take() {
            // SAFETY: the handle came from ncclCommInitRank and is taken out of the mutex, so
            // no other call can use it after this one.
            let _ = unsafe { result::comm_abort(comm) };
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = match self.comm.get_mut() {
            Ok(c) => c.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(comm) = comm {
            // Work queued on the stream may still use the communicator or the shared buffers.
            let _ = self.stream.synchronize();
            self.custom = None;
            // SAFETY: the handle is live (not aborted) and no other reference to it remains.
            let _ = unsafe { result::comm_destroy(comm) };
        }
    }
}
