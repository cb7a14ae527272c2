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
//!
//! A row-parallel product of prefill size ([`NcclComm::gemm_all_reduce`]) on two ranks is split
//! into parts of rows: each part's product runs on the backend's stream, and its exchange with
//! the peer on a second stream through the copy engines (`copy_ar.rs`), overlapping the next
//! part's product; only the last part's exchange and the final add are left exposed.
//! `NANOVLLM_AR_OVERLAP_ROWS` sets the rows per part (default [`OVERLAP_ROWS`]; 0 turns the
//! overlap off: the product, then NCCL's all-reduce).
//!
//! Rows shared out: where the product's output is a buffer the group shares with the peer
//! ([`NcclComm::alloc_shared`], the model's activations) and the residual add + RMSNorm
//! follows, the two ranks split the step's rows in two halves instead of each finishing all of
//! them. A rank's product writes the peer's half of the rows straight into the peer's receive
//! buffer, raises the peer's flag, and computes its own half locally; each rank then adds the
//! peer's sums, the residual and the norm on its own half only, storing each result row into
//! the peer's buffer as well (`add_rms_norm_recv_push`), raises a second flag and waits for the
//! peer's. Against the copy-engine exchange of every row, that halves the rows each rank adds
//! and normalises and skips the copy's read of the message, with the same bits; the residual
//! stream then holds only the rank's own rows, which is all the next norm reads. On two H100s
//! it takes ~0.03 s off the Qwen3-8B workload's prefill (docs/perf-notes.md, "Prefill's rows
//! shared out"); `NANOVLLM_AR_SHARE_ROWS=0` turns it off.

use std::ffi::{c_char, c_void};
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{CUdeviceptr, CUstreamCaptureStatus};
use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use half::bf16;
use nanovllm_utils::{Error, Result};

use super::copy_ar::CopyAllReduce;
use super::custom_ar::{ipc_alloc, ipc_open, CustomAllReduce};
use super::{driver_err, CudaBackend, CudaBuf};
use crate::backend::Backend;

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// Rows per part of [`NcclComm::gemm_all_reduce`]'s overlap unless `NANOVLLM_AR_OVERLAP_ROWS`
/// says otherwise: products of 2,048 rows keep cuBLASLt near its large-M efficiency, and a
/// part's exchange (16 MiB at Qwen3-8B's width) is what stays exposed at the end.
pub const OVERLAP_ROWS: usize = 2048;

/// The copy-engine all-reduce of [`Overlap`]: set up by the first call that needs it (every
/// rank makes the same calls, so every rank sets it up at the same one), again when a larger
/// message comes, and off for good when a rank could not set it up.
enum CopyState {
    Unset,
    Ready(CopyAllReduce),
    Off,
}

/// What [`NcclComm::gemm_all_reduce`] overlaps with: a second stream for the parts' copies to
/// the peer (and the write of its flag), two events that order it against the backend's
/// stream, and the copy-engine all-reduce. Each event is recorded again for every part or
/// call; a wait queued on an event waits for the record before it, so one of each suffices.
struct Overlap {
    stream: Arc<CudaStream>,
    /// Recorded on the backend's stream after a part's product; the side stream waits on it
    /// before copying the part.
    product_done: CudaEvent,
    /// Recorded on the side stream after the last part's copy; the backend's stream waits on
    /// it.
    sums_done: CudaEvent,
    /// Rows per part, at most ([`overlap_parts`]).
    rows: usize,
    copy: Mutex<CopyState>,
    /// Whether [`NcclComm::gemm_all_reduce_for_norm`] leaves the last step of the sum to the
    /// norm's kernel (`NANOVLLM_AR_NORM_FUSED=0` turns it off, to compare).
    fuse_norm: bool,
    /// The call that [`NcclComm::gemm_all_reduce_for_norm`] left open: its number, its receive
    /// buffer, and the output's device address and length.
    pending: Mutex<Option<Pending>>,
}

/// A copy-engine all-reduce whose sums arrived (or are arriving) in a receive buffer, not yet
/// added: see [`NcclComm::gemm_all_reduce_for_norm`].
#[derive(Clone, Debug)]
struct Pending {
    call: u32,
    buf: u64,
    out: u64,
    len: usize,
    /// Rows shared out: this rank's rows, and the device address of the peer's copy of the
    /// output (see the module docs).
    shared: Option<(std::ops::Range<usize>, u64)>,
}

/// An allocation of this rank that the peer has mapped, and the peer's that this rank has
/// ([`NcclComm::alloc_shared`]). Dropped with the group: the mapping is closed, the
/// allocation freed.
struct SharedBuf {
    local: CUdeviceptr,
    bytes: usize,
    peer: CUdeviceptr,
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping came from cuIpcOpenMemHandle and the allocation from ipc_alloc;
        // each is released once, after the owner synchronised its streams.
        unsafe {
            let _ = cudarc::driver::sys::cuIpcCloseMemHandle(self.peer);
            let _ = cudarc::driver::result::free_sync(self.local);
        }
    }
}

impl Overlap {
    /// The overlap with parts of at most `rows` rows.
    fn new(be: &CudaBackend, rows: usize) -> Result<Self> {
        let ctx = be.ctx();
        let (_, highest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(|e| driver_err("NCCL overlap: stream priorities", e))?;
        let stream = ctx
            .new_stream_with_priority(highest)
            .map_err(|e| driver_err("NCCL overlap: stream", e))?;
        let event = || {
            ctx.new_event(None)
                .map_err(|e| driver_err("NCCL overlap: event", e))
        };
        Ok(Overlap {
            stream,
            product_done: event()?,
            sums_done: event()?,
            rows,
            copy: Mutex::new(CopyState::Unset),
            fuse_norm: nanovllm_utils::env_switch("NANOVLLM_AR_NORM_FUSED", true),
            pending: Mutex::new(None),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, CopyState>> {
        self.copy.lock().map_err(|_| poisoned())
    }
}

/// The parts of `m` rows for parts of at most `rows` rows: `ceil(m / rows)` of them, of equal
/// size but for the first `m % parts`, which take one row more. Every part then holds at least
/// `rows / 2` rows (of `m > rows`), so for `rows` a power of two the parts' products fall in the
/// `rows` bucket of the GEMM tuning (`rows / 2` for exactly half), which the start-up warm-up's
/// prefills of `rows / 2` and `rows` tokens tune.
fn overlap_parts(m: usize, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let parts = m.div_ceil(rows.max(1)).max(1);
    let (base, extra) = (m / parts, m % parts);
    (0..parts).map(move |i| {
        let start = i * base + i.min(extra);
        start..start + base + usize::from(i < extra)
    })
}

fn poisoned() -> Error {
    Error::Cuda("NCCL overlap: lock poisoned".into())
}

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
    /// The overlap of prefill products with their all-reduces; `None` when off.
    overlap: Option<Overlap>,
    /// Whether [`Self::alloc_shared`] shares its buffers (`NANOVLLM_AR_SHARE_ROWS`).
    share_rows: bool,
    /// The buffers [`Self::alloc_shared`] shared.
    shared: Mutex<Vec<SharedBuf>>,
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
            overlap: None,
            share_rows: false,
            shared: Mutex::new(Vec::new()),
        };
        let wanted = nanovllm_utils::env_switch("NANOVLLM_CUSTOM_ALLREDUCE", true);
        if wanted && size > 1 {
            nccl.custom = nccl.setup_custom(be)?;
        }
        let rows = nanovllm_utils::env_count(
            "NANOVLLM_AR_OVERLAP_ROWS",
            OVERLAP_ROWS,
            "rows (0: no overlap)",
        )?;
        if rows > 0 && size == 2 {
            nccl.overlap = Some(Overlap::new(be, rows)?);
            nccl.share_rows = nanovllm_utils::env_switch("NANOVLLM_AR_SHARE_ROWS", true);
        }
        Ok(nccl)
    }

    /// A buffer of `len` bf16 for the activations that row-parallel products write and the
    /// norms after them finish in prefill-sized steps: on a two-rank group that shares rows
    /// out, an allocation shared with the peer through CUDA IPC (the peer stores its finished
    /// rows into it: see the module docs); `None` otherwise. A collective: every rank calls it
    /// at the same point.
    pub fn alloc_shared(&self, be: &CudaBackend, len: usize) -> Result<Option<CudaBuf<bf16>>> {
        if !self.share_rows || self.size != 2 {
            return Ok(None);
        }
        let bytes = super::padded(
            len.checked_mul(std::mem::size_of::<bf16>())
                .ok_or_else(|| Error::OutOfMemory(format!("alloc_shared: {len} elements")))?,
        );
        let shared = self.share_ipc(ipc_alloc(bytes, 0), |local, handles| {
            match ipc_open(&handles[1 - self.rank]) {
                Ok(peer) => Ok(SharedBuf { local, bytes, peer }),
                Err(e) => {
                    // SAFETY: our allocation from ipc_alloc, used by nobody.
                    let _ = unsafe { cudarc::driver::result::free_sync(local) };
                    Err(e)
                }
            }
        })?;
        let Some(buf) = shared else {
            return Ok(None);
        };
        // SAFETY: `buf.local` is a live allocation of `bytes` (len elements rounded up to 16
        // bytes) that `self.shared` frees only when the group is dropped, after its streams.
        let out = unsafe { be.borrow_buf(buf.local, len) };
        self.shared.lock().map_err(|_| poisoned())?.push(buf);
        Ok(Some(out))
    }

    /// The device address, in this process, of the peer's copy of `buf` (its start), when
    /// `buf` lies in a buffer of [`Self::alloc_shared`].
    fn peer_of(&self, be: &CudaBackend, buf: &CudaBuf<bf16>) -> Option<u64> {
        let at = be.dptr(buf);
        let end = at + (buf.len() * std::mem::size_of::<bf16>()) as u64;
        let shared = self.shared.lock().ok()?;
        shared
            .iter()
            .find(|s| s.local <= at && end <= s.local + s.bytes as u64)
            .map(|s| s.peer + (at - s.local))
    }

    /// Sets up the one-shot all-reduce on every rank or on none (see [`Self::share_ipc`]).
    fn setup_custom(&self, be: &CudaBackend) -> Result<Option<CustomAllReduce>> {
        self.share_ipc(
            CustomAllReduce::allocate(be, self.size),
            |local, handles| CustomAllReduce::connect(be, local, handles, self.rank),
        )
    }

    /// Shares an IPC allocation on every rank or on none: each rank's `allocated` (its
    /// allocation and IPC handle) is exchanged through NCCL, `connect` opens the peers' from
    /// every rank's handle, and the ranks agree (a min over "it worked") before anyone uses it.
    /// Every rank makes the same collective calls whatever fails locally; a rank that cannot
    /// connect because another failed frees its allocation.
    fn share_ipc<T>(
        &self,
        allocated: Result<(CUdeviceptr, [u8; 64])>,
        connect: impl FnOnce(CUdeviceptr, &[[u8; 64]]) -> Result<T>,
    ) -> Result<Option<T>> {
        let mine = allocated.as_ref().map(|(_, h)| *h).unwrap_or([0; 64]);
        let handles = self.all_gather_64(&mine)?;
        let all_allocated = self.all_reduce_min(allocated.is_ok() as u64)? == 1;
        let connected = match allocated {
            Ok((local, _)) if all_allocated => connect(local, &handles).ok(),
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
        let custom = self.custom.as_ref().is_some_and(|ar| ar.timed_out());
        let copy = self.overlap.as_ref().is_some_and(|o| {
            o.lock()
                .is_ok_and(|c| matches!(&*c, CopyState::Ready(ar) if ar.timed_out()))
        });
        if custom || copy {
            return Err(Error::Worker(
                "a peer GPU did not reach an all-reduce within 5 s (its process died or hangs)"
                    .into(),
            ));
        }
        Ok(())
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

    /// Whether [`Self::gemm_all_reduce`] overlaps at `m` rows of `n` outputs: when the
    /// overlap is on (two ranks, its copy-engine all-reduce not given up), the rows make at
    /// least two parts (`m` above the rows per part), and the one-shot kernel would not take
    /// the message (a decode step's all-reduce is cheapest fused with the norm that follows).
    pub fn overlaps_gemm_all_reduce(&self, m: usize, n: usize) -> bool {
        let Some(overlap) = &self.overlap else {
            return false;
        };
        let one_shot = self
            .custom
            .as_ref()
            .is_some_and(|ar| m.saturating_mul(n) <= ar.capacity());
        let off = overlap
            .lock()
            .map_or(true, |c| matches!(*c, CopyState::Off));
        m > overlap.rows && !one_shot && !off
    }

    /// `out[m, n] = sum over ranks of x[m, k] . w[n, k]^T` (the product rounded to bf16, then
    /// summed as [`Self::all_reduce_sum`] sums: the same bits). Where
    /// [`Self::overlaps_gemm_all_reduce`] and the stream is not being captured, the rows are
    /// split into parts: each part's product on the backend's stream, its copy to the peer on
    /// the overlap stream once the product is done, and at the end the add of the peer's
    /// parts on the backend's stream (see `copy_ar.rs`). Otherwise the product and the
    /// all-reduce run in a row.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_all_reduce(
        &self,
        be: &CudaBackend,
        x: &CudaBuf<bf16>,
        w: &CudaBuf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaBuf<bf16>,
    ) -> Result<()> {
        match self.gemm_send(be, x, w, m, n, k, out, None)? {
            None => Ok(()),
            Some(p) => self.with_copy(|copy| copy.reduce(be, out, p.len, p.call, p.buf)),
        }
    }

    /// [`Self::gemm_all_reduce`] for a residual add + RMSNorm that follows: where the product
    /// overlaps its all-reduce, the peer's sums are left in the receive buffer, and the answer
    /// is `true`; then [`Self::finish_all_reduce_add_rms_norm`] on `out` must be the group's
    /// next call, and adds them in the norm's kernel (one pass over the rows fewer). `false`:
    /// `out` holds the sum.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_all_reduce_for_norm(
        &self,
        be: &CudaBackend,
        x: &CudaBuf<bf16>,
        w: &CudaBuf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaBuf<bf16>,
    ) -> Result<bool> {
        if !self.overlap.as_ref().is_some_and(|o| o.fuse_norm) {
            self.gemm_all_reduce(be, x, w, m, n, k, out)?;
            return Ok(false);
        }
        let peer_out = self.peer_of(be, out);
        let Some(p) = self.gemm_send(be, x, w, m, n, k, out, peer_out)? else {
            return Ok(false);
        };
        if let Some(overlap) = &self.overlap {
            *overlap.pending.lock().map_err(|_| poisoned())? = Some(p);
        }
        Ok(true)
    }

    /// The end of the all-reduce [`Self::gemm_all_reduce_for_norm`] left open on `x`
    /// (`n * hidden` elements, its `out`), fused with [`Backend::add_rms_norm`]:
    /// `x = bf16(x + the peer's sums)`, then `residual = bf16(x + residual)`,
    /// `x = rms_norm(residual) * weight`; the bits of the all-reduce and the norm in a row.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_all_reduce_add_rms_norm(
        &self,
        be: &CudaBackend,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "nccl finish_all_reduce_add_rms_norm";
        let pending = match &self.overlap {
            Some(o) => o.pending.lock().map_err(|_| poisoned())?.take(),
            None => None,
        };
        let Some(p) = pending else {
            return Err(Error::Other(format!(
                "{OP}: no all-reduce was left open by gemm_all_reduce_for_norm"
            )));
        };
        self.check_open(be, x, n, hidden, &p)?;
        self.with_copy(|copy| match p.shared.clone() {
            None => {
                copy.reduce_add_rms_norm(be, x, residual, weight, n, hidden, eps, p.call, p.buf)
            }
            // SAFETY: `peer_x` is the peer's copy of x (`peer_of`: a buffer of alloc_shared,
            // as long as x); the peer touches its rows `mine` only after this call's flag.
            Some((mine, peer_x)) => unsafe {
                copy.reduce_add_rms_norm_push(
                    be, x, residual, weight, mine, hidden, eps, p.call, p.buf, peer_x,
                )
            },
        })
    }

    /// Checks that `x` (`n` rows of `hidden`) is the output the open call `p` was left in.
    fn check_open(
        &self,
        be: &CudaBackend,
        x: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        p: &Pending,
    ) -> Result<()> {
        const OP: &str = "nccl finish_all_reduce_add_rms_norm";
        let len = super::ops::numel(OP, "x", n, hidden)?;
        if be.dptr(x) != p.out || len != p.len {
            return Err(Error::Other(format!(
                "{OP}: x ({len} elements) is not the output the open all-reduce was left in \
                 ({} elements)",
                p.len
            )));
        }
        Ok(())
    }

    /// `f` on the copy-engine all-reduce that an overlapped call used.
    fn with_copy(&self, f: impl FnOnce(&CopyAllReduce) -> Result<()>) -> Result<()> {
        let state = match &self.overlap {
            Some(o) => o.lock()?,
            None => return Err(Error::Other("NCCL: the overlap is off".into())),
        };
        match &*state {
            CopyState::Ready(copy) => f(copy),
            _ => Err(Error::Other(
                "NCCL: the copy-engine all-reduce is not set up".into(),
            )),
        }
    }

    /// The product and, where it overlaps ([`Self::overlaps_gemm_all_reduce`], the stream not
    /// being captured), its parts' copies to the peer and the flag after them, leaving the add
    /// of what the peer sent: `Some` of the open call, for [`CopyAllReduce::reduce`] or its
    /// fusion with the norm. `None`: the product and a whole all-reduce ran, `out` holds the
    /// sum. With `peer_out` (the peer's copy of `out`), the rows are shared out (module docs):
    /// the peer's half goes straight into its receive buffer.
    #[allow(clippy::too_many_arguments)]
    fn gemm_send(
        &self,
        be: &CudaBackend,
        x: &CudaBuf<bf16>,
        w: &CudaBuf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaBuf<bf16>,
        peer_out: Option<u64>,
    ) -> Result<Option<Pending>> {
        const OP: &str = "nccl gemm_all_reduce";
        let len = super::ops::numel(OP, "out", m, n)?;
        let capturing = be
            .stream()
            .capture_status()
            .map_err(|e| driver_err("gemm_all_reduce: capture status", e))?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let overlap = match &self.overlap {
            Some(o) if k > 0 && !capturing && self.overlaps_gemm_all_reduce(m, n) => o,
            _ => {
                be.gemm(x, w, m, n, k, out)?;
                self.all_reduce_sum(out, len)?;
                return Ok(None);
            }
        };
        super::check_len(OP, "x", x, super::ops::numel(OP, "x", m, k)?)?;
        super::check_len(OP, "w", w, super::ops::numel(OP, "w", n, k)?)?;
        super::check_len(OP, "out", out, len)?;
        let mut state = overlap.lock()?;
        let Some(copy) = self.copy_for(be, overlap, &mut state, len)? else {
            drop(state);
            be.gemm(x, w, m, n, k, out)?;
            self.all_reduce_sum(out, len)?;
            return Ok(None);
        };
        let elem = std::mem::size_of::<bf16>();
        let (px, pw, po) = (be.dptr(x), be.dptr(w), be.dptr(out));
        let (main, side) = (be.stream(), &overlap.stream);
        let ev = |what: &str, e| driver_err(&format!("{OP}: {what}"), e);
        let (call, buf) = copy.begin();
        // Rows `rows` of the product into the output whose row 0 is at `to`.
        let product = |rows: &std::ops::Range<usize>, to: u64| {
            let (at_x, at_out) = (rows.start * k * elem, rows.start * n * elem);
            super::gemm::gemm(
                be,
                px + at_x as u64,
                pw,
                to + at_out as u64,
                rows.len(),
                n,
                k,
            )
        };
        if let Some(peer_out) = peer_out {
            let parts: Vec<_> = overlap_parts(m, overlap.rows).collect();
            // Rank 0 finishes the first half of the parts, rank 1 the rest (two parts at least:
            // the overlap needs m above the rows per part).
            let split = parts[parts.len() / 2].start;
            let mine = if self.rank == 0 { 0..split } else { split..m };
            // The peer's rows first, straight into its receive buffer `buf`, which holds `len`
            // elements (`copy_for`) and which it reads only after the flag below.
            let peer_recv = copy.peer_buffer(buf)?;
            for rows in parts.iter().filter(|r| !mine.contains(&r.start)) {
                product(rows, peer_recv)?;
            }
            copy.signal(main, call)?;
            for rows in parts.iter().filter(|r| mine.contains(&r.start)) {
                product(rows, po)?;
            }
            return Ok(Some(Pending {
                call,
                buf,
                out: po,
                len,
                shared: Some((mine, peer_out)),
            }));
        }
        for rows in overlap_parts(m, overlap.rows) {
            let at_out = (rows.start * n * elem) as u64;
            product(&rows, po)?;
            overlap
                .product_done
                .record(main)
                .map_err(|e| ev("record", e))?;
            side.wait(&overlap.product_done)
                .map_err(|e| ev("wait", e))?;
            // SAFETY: rows `rows` of `out` (inside it: its length was checked above) are
            // complete on the side stream (the event above), and the backend's stream writes
            // them again only after the wait below; they land at the same offset of a receive
            // buffer of `copy`, which holds `len` elements (`copy_for`).
            unsafe { copy.send(side, po + at_out, buf, at_out, rows.len() * n * elem) }?;
        }
        copy.signal(side, call)?;
        overlap
            .sums_done
            .record(side)
            .map_err(|e| ev("record", e))?;
        main.wait(&overlap.sums_done).map_err(|e| ev("wait", e))?;
        Ok(Some(Pending {
            call,
            buf,
            out: po,
            len,
            shared: None,
        }))
    }

    /// The copy-engine all-reduce for messages of `len` elements: the one set up, or a new one
    /// when there is none yet or its buffers are smaller (every rank gets here at the same
    /// call, so the collectives of the set-up match); `None` when a rank could not set it up,
    /// for good. Synchronises both streams before replacing buffers.
    fn copy_for<'a>(
        &self,
        be: &CudaBackend,
        overlap: &Overlap,
        state: &'a mut CopyState,
        len: usize,
    ) -> Result<Option<&'a CopyAllReduce>> {
        let usable = match &*state {
            CopyState::Ready(c) => c.capacity() >= len,
            CopyState::Off => return Ok(None),
            CopyState::Unset => false,
        };
        if !usable {
            be.synchronize()?;
            overlap
                .stream
                .synchronize()
                .map_err(|e| driver_err("NCCL overlap: synchronize", e))?;
            if let CopyState::Ready(old) = state {
                old.close_peer();
                // Every rank closes its mapping of the others' buffers before any frees its own.
                self.all_reduce_min(1)?;
            }
            // The old buffers go (freed) before the new ones are allocated.
            *state = CopyState::Unset;
            *state = self.setup_copy(be, len.next_multiple_of(8))?;
        }
        Ok(match &*state {
            CopyState::Ready(c) => Some(c),
            _ => None,
        })
    }

    /// Sets up the copy-engine all-reduce with receive buffers of `cap` elements on every rank
    /// or on none (see [`Self::share_ipc`]).
    fn setup_copy(&self, be: &CudaBackend, cap: usize) -> Result<CopyState> {
        let shared = self.share_ipc(CopyAllReduce::allocate(cap), |local, handles| {
            CopyAllReduce::connect(be, local, cap, &handles[1 - self.rank])
        })?;
        Ok(shared.map_or(CopyState::Off, CopyState::Ready))
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
            // Work queued on the streams may still use the communicator or the shared buffers.
            let _ = self.stream.synchronize();
            if let Some(overlap) = &self.overlap {
                let _ = overlap.stream.synchronize();
            }
            self.custom = None;
            // SAFETY: the handle is live (not aborted) and no other reference to it remains.
            let _ = unsafe { result::comm_destroy(comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::overlap_parts;

    #[test]
    fn overlap_parts_cover_the_rows_once_in_near_equal_parts() {
        for (m, rows) in [
            (4096, 2048),
            (5000, 2048),
            (16_384, 2048),
            (2049, 2048),
            (7, 3),
            (2, 5),
        ] {
            let parts: Vec<_> = overlap_parts(m, rows).collect();
            assert_eq!(parts.len(), m.div_ceil(rows), "m {m} rows {rows}");
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, m);
            for pair in parts.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            let (lo, hi) = (m / parts.len(), m.div_ceil(parts.len()));
            assert!(
                parts.iter().all(|p| (lo..=hi).contains(&p.len())),
                "{parts:?}"
            );
            assert!(parts
                .iter()
                .all(|p| p.len() <= rows && 2 * p.len() >= rows.min(m)));
        }
        assert_eq!(
            overlap_parts(5000, 2048).collect::<Vec<_>>(),
            [0..1667, 1667..3334, 3334..5000]
        );
    }
}
