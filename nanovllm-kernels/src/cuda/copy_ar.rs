//! The all-reduce of prefill-sized row-parallel products between two GPUs of one host through
//! the copy engines, so that it overlaps the products instead of competing with them for SMs.
//!
//! [`super::NcclComm::gemm_all_reduce`] splits the product's rows into parts. Each part's
//! product runs on the backend's stream; once it is done, a second stream has the copy engine
//! write the part into the peer's receive buffer (a plain device-to-device copy over NVLink:
//! no kernel, no SM), while the next part's product runs. After the last part the second stream
//! writes the call's number into the peer's flag (a stream memory write, behind a barrier that
//! makes the copies visible first), and the backend's stream, once its own copies are out,
//! runs `ar_copy_reduce` (`cuda/custom_ar.cu`): it waits for the peer's flag to reach the call
//! and adds the received partial sums to its own, in place. NCCL's all-reduce of the same
//! message would take SMs from the products beside it; measured on two H200s, products and
//! NCCL on two streams ran no faster than one after the other.
//!
//! Every rank holds one IPC-shared allocation: two receive buffers (the call's parity picks
//! one) of [`CopyAllReduce::capacity`] bf16 each, then the flag. A peer writes buffer `p`
//! again only two calls later, after a call whose reduce waited for this rank's flag, which
//! this rank writes only after its own reduce of the earlier call (stream order): the buffer
//! has been read by then. A dead peer never writes its flag: the reduce gives up after about
//! five seconds and raises the same `timed_out` flag as the one-shot kernels.
//!
//! Two ranks only (the sum of two values has the same bits in either order, so both ranks end
//! with NCCL's); larger groups keep NCCL.

use std::sync::atomic::{AtomicU32, Ordering};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;
use nanovllm_utils::Result;

use super::custom_ar::{cu, host_flag, ipc_alloc, ipc_open, HANDLE_BYTES};
use super::launch::Launch;
use super::{driver_err, CudaBackend, CudaBuf};

const ELEM: usize = std::mem::size_of::<bf16>();
/// Threads per block of `ar_copy_reduce`.
const THREADS: u32 = 512;

/// Bytes of the shared allocation for receive buffers of `cap` elements: two buffers, then the
/// flag (a u32 at offset `2 * cap * ELEM`, 16-byte aligned when `cap` is a multiple of 4), then
/// the flag of the rows a peer shares out (4 bytes after it; see
/// [`CopyAllReduce::reduce_add_rms_norm_push`]).
fn flag_at(cap: usize) -> usize {
    2 * cap * ELEM
}

/// Byte offset of the second flag (see [`flag_at`]).
fn rows_flag_at(cap: usize) -> usize {
    flag_at(cap) + 4
}

/// This rank's side of the copy-engine all-reduce of a two-rank group.
pub(crate) struct CopyAllReduce {
    /// Our shared allocation (receive buffers and flag).
    local: CUdeviceptr,
    /// The peer's allocation, opened through IPC (closed on drop).
    peer: CUdeviceptr,
    /// Elements of each receive buffer.
    cap: usize,
    /// Calls so far (the flag value of the last one).
    calls: AtomicU32,
    /// Set by a reduce that gave up on the peer; later waits are skipped.
    stuck: CudaSlice<u32>,
    /// Host-mapped copy of `stuck`: (host, device) addresses.
    timed_out: (*mut u32, CUdeviceptr),
    reduce: CudaFunction,
    /// `add_rms_norm_recv` (norm.cu): the reduce fused with the residual add + RMSNorm.
    reduce_norm: CudaFunction,
    /// `add_rms_norm_recv_push` (norm.cu): `add_rms_norm_recv` on this rank's rows, storing
    /// them to the peer too.
    reduce_norm_push: CudaFunction,
    /// `wait_peer` (norm.cu): the wait for the rows the peer shares out.
    wait: CudaFunction,
    /// SMs of the GPU (the reduce's grid).
    sms: u32,
}

// SAFETY: the raw pointers are a device allocation, a peer mapping and a pinned host flag, all
// owned by this value; the host flag is only read with volatile reads.
unsafe impl Send for CopyAllReduce {}
// SAFETY: as above; shared access only reads them (the call counter is atomic).
unsafe impl Sync for CopyAllReduce {}

impl CopyAllReduce {
    /// Allocates this rank's receive buffers of `cap` elements each (a multiple of 8) and a
    /// zero flag; returns the allocation and its IPC handle for [`Self::connect`].
    pub(crate) fn allocate(cap: usize) -> Result<(CUdeviceptr, [u8; HANDLE_BYTES])> {
        ipc_alloc(flag_at(cap) + 16, 0)
    }

    /// Opens the peer's allocation (`handle`) and readies the kernel; takes ownership of
    /// `local` (freed on error too).
    pub(crate) fn connect(
        be: &CudaBackend,
        local: CUdeviceptr,
        cap: usize,
        handle: &[u8; HANDLE_BYTES],
    ) -> Result<Self> {
        let parts = (|| {
            let stuck = be
                .stream()
                .alloc_zeros::<u32>(1)
                .map_err(|e| driver_err("copy all-reduce: alloc", e))?;
            let reduce = be.func("custom_ar", "ar_copy_reduce")?;
            let norm = [
                be.func("norm", "add_rms_norm_recv")?,
                be.func("norm", "add_rms_norm_recv_push")?,
                be.func("norm", "wait_peer")?,
            ];
            let sms = be
                .ctx()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| driver_err("copy all-reduce: SM count", e))?;
            let timed_out = host_flag()?;
            Ok((stuck, reduce, norm, sms.max(1) as u32, timed_out))
        })();
        let (stuck, reduce, [reduce_norm, reduce_norm_push, wait], sms, timed_out) = match parts {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: our allocation from `allocate`, used by nobody yet.
                let _ = unsafe { cudarc::driver::result::free_sync(local) };
                return Err(e);
            }
        };
        // From here on `ar` owns `local` and the host flag and frees them on every path.
        let mut ar = CopyAllReduce {
            local,
            peer: 0,
            cap,
            calls: AtomicU32::new(0),
            stuck,
            timed_out,
            reduce,
            reduce_norm,
            reduce_norm_push,
            wait,
            sms,
        };
        ar.peer = ipc_open(handle)?;
        Ok(ar)
    }

    /// Closes the mapping of the peer's allocation (before the peer frees it: every rank
    /// closes, then the ranks meet, then they drop). Later calls must not send.
    pub(crate) fn close_peer(&mut self) {
        if self.peer != 0 {
            // SAFETY: the mapping came from cuIpcOpenMemHandle and is closed once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.peer) };
            self.peer = 0;
        }
    }

    /// Elements of each receive buffer: the largest message this path takes.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Whether a reduce gave up on the peer: the results since are wrong.
    pub(crate) fn timed_out(&self) -> bool {
        // SAFETY: a live host allocation of one u32, written by the device; a volatile read
        // sees the device's write once it is visible.
        unsafe { std::ptr::read_volatile(self.timed_out.0) != 0 }
    }

    /// Starts a call: its number (the flag value that ends it) and the byte offset of its
    /// receive buffer.
    pub(crate) fn begin(&self) -> (u32, u64) {
        let call = self.calls.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        (call, (u64::from(call & 1) * (self.cap * ELEM) as u64))
    }

    /// Queues on `side` the copy of `bytes` bytes at device address `src` (this rank's partial
    /// sums) to byte `at` of the peer's receive buffer `buf` (from [`Self::begin`]).
    ///
    /// # Safety
    /// `src` addresses `bytes` readable bytes that nothing writes until the copy is done, and
    /// `buf + at + bytes` lies within one receive buffer (`at + bytes <= capacity() * 2`).
    pub(crate) unsafe fn send(
        &self,
        side: &CudaStream,
        src: u64,
        buf: u64,
        at: u64,
        bytes: usize,
    ) -> Result<()> {
        // SAFETY: per the contract; the peer mapping lives as long as `self`.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                self.peer + buf + at,
                src,
                bytes,
                side.cu_stream(),
            )
        }
        .map_err(|e| driver_err("copy all-reduce: copy to the peer", e))
    }

    /// Queues on `side`, after the call's copies, the write of `call` into the peer's flag
    /// (behind the barrier of a default stream write, which makes the copies visible first).
    pub(crate) fn signal(&self, side: &CudaStream, call: u32) -> Result<()> {
        self.write_peer_flag(side, flag_at(self.cap), call)
    }

    /// `call` into the flag at byte `at` of the peer's allocation, behind everything queued on
    /// `stream` before (the default stream write's barrier also makes the stores of earlier
    /// kernels, to the peer's memory included, visible first).
    fn write_peer_flag(&self, stream: &CudaStream, at: usize, call: u32) -> Result<()> {
        if self.peer == 0 {
            return Err(nanovllm_utils::Error::Other(
                "copy all-reduce: the peer's buffers are closed".into(),
            ));
        }
        // SAFETY: both flags lie inside the peer's allocation (`allocate` reserved them),
        // alive as long as `self`; flags 0 asks for the default, ordered write.
        cu("write the peer's flag", unsafe {
            sys::cuStreamWriteValue32_v2(stream.cu_stream(), self.peer + at as u64, call, 0)
        })
    }

    /// Device address of receive buffer `buf` (from [`Self::begin`]) in the peer's allocation:
    /// where a product may store the peer's rows directly (see `NcclComm`'s rows shared out).
    pub(crate) fn peer_buffer(&self, buf: u64) -> Result<u64> {
        match self.peer {
            0 => Err(nanovllm_utils::Error::Other(
                "copy all-reduce: the peer's buffers are closed".into(),
            )),
            p => Ok(p + buf),
        }
    }

    /// Queues on the backend's stream the wait for the peer's flag to reach `call` and then
    /// `out[..len] += received` (f32 sum rounded to bf16) from receive buffer `buf`.
    pub(crate) fn reduce(
        &self,
        be: &CudaBackend,
        out: &mut CudaBuf<bf16>,
        len: usize,
        call: u32,
        buf: u64,
    ) -> Result<()> {
        super::check_len("copy all-reduce", "out", out, len)?;
        if len > self.cap {
            return Err(nanovllm_utils::Error::Other(format!(
                "copy all-reduce: {len} elements beyond the receive buffers' {}",
                self.cap
            )));
        }
        let n = len as i64;
        let recv = self.local + buf;
        let flag = self.local + flag_at(self.cap) as u64;
        let units = if len.is_multiple_of(8) { len / 8 } else { len };
        let blocks = (units.div_ceil(THREADS as usize) as u32).clamp(1, 4 * self.sms);
        let mut b = Launch::new(be.stream(), &self.reduce);
        b.arg(out.raw_mut())
            .arg(&recv)
            .arg(&n)
            .arg(&flag)
            .arg(&call)
            .arg(&self.stuck)
            .arg(&self.timed_out.1);
        // SAFETY: matches ar_copy_reduce; it reads and writes len elements of `out` (checked
        // above), reads len <= cap elements of receive buffer `buf` (one of ours) and the flag
        // after them, and reads and writes `stuck` (one u32) and the host-mapped flag.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| driver_err("copy all-reduce: reduce", e))?;
        Ok(())
    }

    /// [`Self::reduce`] fused with the residual add + RMSNorm of `Backend::add_rms_norm` that
    /// follows it in a decoder layer, in one kernel (`add_rms_norm_recv` in norm.cu): `x`
    /// (`n` rows of `hidden`: this rank's partial sums) becomes the sum with the peer's, then
    /// `residual = bf16(sum + residual)` and `x = rms_norm(residual) * weight`, with the bits
    /// of the two ops in a row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reduce_add_rms_norm(
        &self,
        be: &CudaBackend,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
        call: u32,
        buf: u64,
    ) -> Result<()> {
        // SAFETY: no peer buffer to vouch for.
        unsafe { self.norm_received(be, x, residual, weight, 0..n, hidden, eps, call, buf, 0) }
    }

    /// `add_rms_norm_recv` on rows `rows` of `x` and `residual`, the peer's sums for them in
    /// receive buffer `buf` (flag `call`); with a nonzero `peer_x`, `add_rms_norm_recv_push`,
    /// which also stores each result row into the same row of the peer's x.
    ///
    /// # Safety
    /// A nonzero `peer_x` is as [`Self::reduce_add_rms_norm_push`] requires.
    #[allow(clippy::too_many_arguments)]
    unsafe fn norm_received(
        &self,
        be: &CudaBackend,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        rows: std::ops::Range<usize>,
        hidden: usize,
        eps: f32,
        call: u32,
        buf: u64,
        peer_x: u64,
    ) -> Result<()> {
        if rows.end.saturating_mul(hidden) > self.cap {
            return Err(nanovllm_utils::Error::Other(format!(
                "copy all-reduce: {} x {hidden} elements beyond the receive buffers' {}",
                rows.end, self.cap
            )));
        }
        let received = super::ops::Received {
            func: if peer_x == 0 {
                &self.reduce_norm
            } else {
                &self.reduce_norm_push
            },
            recv: self.local + buf,
            flag: self.local + flag_at(self.cap) as u64,
            epoch: call,
            stuck: &self.stuck,
            timed_out: self.timed_out.1,
            first: rows.start,
            peer_x,
        };
        // SAFETY: receive buffer `buf` (one of ours, from `begin`) holds cap >= rows.end *
        // hidden elements, which the peer wrote before raising the flag and does not write
        // again before this rank's next signal; the flag follows the buffers in our
        // allocation; the host-mapped flag is ours; all live as long as `self`; the caller
        // vouches for `peer_x`.
        unsafe {
            super::ops::add_rms_norm_with(
                be,
                x,
                residual,
                weight,
                rows.len(),
                hidden,
                eps,
                Some(&received),
            )
        }
    }
}

/// The rows of a prefill step shared out between the two ranks (`NcclComm`'s module docs).
impl CopyAllReduce {
    /// The end of a call whose rows are shared out: on rows `rows` of `x` (this rank's partial
    /// sums there; the peer's for those rows arrive in receive buffer `buf`, flag `call`), the
    /// sum and the residual add + RMSNorm of [`Self::reduce_add_rms_norm`], each result row
    /// also stored into the same row of the peer's x (`peer_x`, its row 0); then the write of
    /// `call` into the peer's second flag and the wait for this rank's to reach it, so that the
    /// kernels after this call read every row of `x`. `residual`'s other rows are left as
    /// they were.
    ///
    /// # Safety
    /// `peer_x` is the device address (in this process) of the peer's buffer that plays `x`'s
    /// part there, of at least `x`'s length, whose rows `rows` the peer neither reads nor
    /// writes until it has waited for this call's flag.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn reduce_add_rms_norm_push(
        &self,
        be: &CudaBackend,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        rows: std::ops::Range<usize>,
        hidden: usize,
        eps: f32,
        call: u32,
        buf: u64,
        peer_x: u64,
    ) -> Result<()> {
        if peer_x == 0 {
            return Err(nanovllm_utils::Error::Other(
                "copy all-reduce: rows shared out without the peer's buffer".into(),
            ));
        }
        // SAFETY: the caller vouches for `peer_x`.
        unsafe {
            self.norm_received(
                be, x, residual, weight, rows, hidden, eps, call, buf, peer_x,
            )
        }?;
        self.write_peer_flag(be.stream(), rows_flag_at(self.cap), call)?;
        let flag = self.local + rows_flag_at(self.cap) as u64;
        let mut b = Launch::new(be.stream(), &self.wait);
        b.arg(&flag)
            .arg(&call)
            .arg(&self.stuck)
            .arg(&self.timed_out.1);
        // SAFETY: matches wait_peer in norm.cu: it reads our second flag and reads and writes
        // `stuck` and the host-mapped flag, all alive as long as `self`.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| driver_err("copy all-reduce: wait for the peer's rows", e))
    }
}

impl Drop for CopyAllReduce {
    fn drop(&mut self) {
        self.close_peer();
        // SAFETY: our own allocation; the owner synchronised its streams, and the peer closed
        // its mapping first (`NcclComm` makes the ranks meet in between when it replaces the
        // buffers; at the end of the process both sides go).
        let _ = unsafe { cudarc::driver::result::free_sync(self.local) };
        // SAFETY: the pinned flag from `host_flag`, freed once.
        let _ = unsafe { cudarc::driver::result::free_host(self.timed_out.0 as *mut _) };
    }
}
