//! The one-shot all-reduce of `cuda/custom_ar.cu` for decode-sized messages between the GPUs
//! of one host: each rank shares one allocation of receive slots with its peers through CUDA
//! IPC (the handles travel through NCCL), and a call is one short kernel instead of NCCL's
//! ring, in which every rank pushes its values into its peers' slots and waits for theirs in
//! its own.
//! [`super::NcclComm`] uses it for messages up to [`CustomAllReduce::capacity`] elements
//! when every rank could set it up, and NCCL otherwise.
//!
//! The same kernel protocol also runs the all-reduce fused with the residual add + RMSNorm that
//! follows it in a decoder layer ([`CustomAllReduce::all_reduce_add_rms_norm`], kernel
//! `ar_add_rms_norm`): one launch instead of the all-reduce and `add_rms_norm`, with the same
//! bits. Both kernels share each lane's slots and epochs.

use cudarc::driver::sys::{self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags};
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};
use half::bf16;
use nanovllm_utils::{Error, Result};

use super::launch::Launch;
use super::{driver_err, CudaBackend, CudaBuf};

/// Most ranks this path takes (each rank holds a receive slot per rank and parity).
pub(crate) const MAX_RANKS: usize = 8;
/// Elements of each receive slot: 8 MiB of bf16, a decode step's hidden states at batch 512
/// and width 8,192.
const CAPACITY: usize = 4 << 20;
/// Elements of each receive slot of the small-message lane (batch <= 16 at width 4,096).
const SMALL_CAPACITY: usize = 64 << 10;
/// Blocks of every launch of a lane: fixed, so that block b owns the same elements in every
/// call. Messages up to SMALL_CAPACITY go through a lane of few blocks (less to schedule),
/// larger ones through one that spreads the copy over the GPU. Each lane has its own slots and
/// counters, so the two never share memory. The counts are measured (perf-notes.md, "Push
/// all-reduce"): 16 small blocks beat 8 by ~1 us at 16 rows of 4,096, and the fused kernel at
/// 256 rows of 4,096 is fastest with 128 big blocks (two rows each).
const BLOCKS: u32 = 128;
const SMALL_BLOCKS: u32 = 16;
/// Threads per block of both kernels (`AR_THREADS` in custom_ar.cu).
const THREADS: u32 = 512;
/// Widest rows `ar_add_rms_norm` takes: 8 bf16 times `AR_CHUNK` in custom_ar.cu.
const MAX_FUSED_HIDDEN: usize = 8 * 2 * THREADS as usize;
const ELEM: usize = std::mem::size_of::<bf16>();
/// The bytes of the empty mark (`AR_EMPTY` in custom_ar.cu: every bf16 0xFFFF).
const EMPTY_BYTE: u8 = 0xff;
pub(crate) const HANDLE_BYTES: usize = 64;

/// Offset of the small lane's slots in the shared allocation of a `world`-rank group (the big
/// lane's start at 0), and the allocation's size: each lane holds slots [parity][rank][cap].
fn layout(world: usize) -> (usize, usize) {
    let small_at = 2 * world * CAPACITY * ELEM;
    (small_at, small_at + 2 * world * SMALL_CAPACITY * ELEM)
}

/// This rank's side of the one-shot all-reduce.
pub(crate) struct CustomAllReduce {
    /// Our shared allocation (layout: [`layout`]).
    local: CUdeviceptr,
    /// Peer allocations opened through IPC (closed on drop).
    opened: Vec<CUdeviceptr>,
    /// Device addresses of each lane's slots, by rank: big lane, small lane (`world` each).
    ptrs: CudaSlice<u64>,
    /// Per-block call counters of each lane (device memory, so graph replays advance them).
    epochs: CudaSlice<u32>,
    small_epochs: CudaSlice<u32>,
    /// Set by a wait that gave up on a peer; later waits are skipped.
    stuck: CudaSlice<u32>,
    /// Host-mapped copy of `stuck` for the host to read cheaply: (host, device) addresses.
    timed_out: (*mut u32, CUdeviceptr),
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    kernel: CudaFunction,
    /// `ar_add_rms_norm`: the all-reduce fused with the residual add + RMSNorm.
    fused: CudaFunction,
}

pub(crate) fn cu(what: &str, r: sys::CUresult) -> Result<()> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(Error::Cuda(format!("custom all-reduce: {what}: {e:?}"))),
    }
}

impl CustomAllReduce {
    /// Allocates this rank's receive slots for a group of `world` ranks, all marked empty, and
    /// returns the allocation and its IPC handle; [`Self::connect`] finishes once every rank's
    /// handle is known.
    pub(crate) fn allocate(
        _be: &CudaBackend,
        world: usize,
    ) -> Result<(CUdeviceptr, [u8; HANDLE_BYTES])> {
        if !(2..=MAX_RANKS).contains(&world) {
            return Err(Error::Cuda(format!(
                "custom all-reduce: {world} ranks; 2..={MAX_RANKS} supported"
            )));
        }
        ipc_alloc(layout(world).1, EMPTY_BYTE)
    }

    /// Opens every peer's allocation from `handles` (indexed by rank) and readies the kernels.
    pub(crate) fn connect(
        be: &CudaBackend,
        local: CUdeviceptr,
        handles: &[[u8; HANDLE_BYTES]],
        rank: usize,
    ) -> Result<Self> {
        let world = handles.len();
        let free_local = |e: Error| {
            // SAFETY: our allocation from `allocate`, not yet owned by a CustomAllReduce.
            let _ = unsafe { cudarc::driver::result::free_sync(local) };
            e
        };
        if !(2..=MAX_RANKS).contains(&world) || rank >= world {
            return Err(free_local(Error::Cuda(format!(
                "custom all-reduce: {world} ranks (rank {rank}); 2..={MAX_RANKS} supported"
            ))));
        }
        let alloc = |n: usize| -> Result<CudaSlice<u32>> {
            be.stream()
                .alloc_zeros(n)
                .map_err(|e| driver_err("custom all-reduce: alloc", e))
        };
        let parts = (|| {
            Ok::<_, Error>((
                be.stream()
                    .alloc_zeros::<u64>(2 * world)
                    .map_err(|e| driver_err("custom all-reduce: alloc", e))?,
                alloc(BLOCKS as usize)?,
                alloc(SMALL_BLOCKS as usize)?,
                alloc(1)?,
                be.func("custom_ar", "ar_one_shot")?,
                be.func("custom_ar", "ar_add_rms_norm")?,
            ))
        })();
        let (ptrs, epochs, small_epochs, stuck, kernel, fused) = parts.map_err(free_local)?;
        let timed_out = host_flag().map_err(free_local)?;
        // From here on `ar` owns `local` and frees it on every path.
        let mut ar = CustomAllReduce {
            local,
            opened: Vec::new(),
            ptrs,
            epochs,
            small_epochs,
            stuck,
            timed_out,
            stream: be.stream().clone(),
            rank,
            world,
            kernel,
            fused,
        };
        let mut bases = vec![0u64; world];
        for (r, h) in handles.iter().enumerate() {
            if r == rank {
                bases[r] = local;
                continue;
            }
            let ptr = ipc_open(h)?;
            ar.opened.push(ptr);
            bases[r] = ptr;
        }
        let small_at = layout(world).0 as u64;
        let mut table = bases.clone();
        table.extend(bases.iter().map(|b| b + small_at));
        be.stream()
            .memcpy_htod(&table, &mut ar.ptrs)
            .map_err(|e| driver_err("custom all-reduce: upload pointers", e))?;
        be.stream()
            .synchronize()
            .map_err(|e| driver_err("custom all-reduce: synchronize", e))?;
        Ok(ar)
    }

    /// Largest message (elements) this path takes.
    pub(crate) fn capacity(&self) -> usize {
        CAPACITY
    }

    /// Whether a wait gave up on a peer: the results since are wrong.
    pub(crate) fn timed_out(&self) -> bool {
        // SAFETY: a live host allocation of one u32, written by the device; a volatile read
        // sees the device's write once it is visible.
        unsafe { std::ptr::read_volatile(self.timed_out.0) != 0 }
    }

    /// The lane a message of `len` elements goes through.
    fn lane(&self, len: usize) -> Lane<'_> {
        let w = self.world;
        let (first, cap, blocks, epochs) = match len <= SMALL_CAPACITY {
            true => (w, SMALL_CAPACITY, SMALL_BLOCKS, &self.small_epochs),
            false => (0, CAPACITY, BLOCKS, &self.epochs),
        };
        Lane {
            slots: self.ptrs.slice(first..first + w),
            epochs,
            cap: cap as i64,
            cfg: LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        }
    }

    /// In place over `buf[..len]` (`len <= capacity()`), queued on the backend's stream.
    pub(crate) fn all_reduce(&self, buf: &mut CudaBuf<bf16>, len: usize) -> Result<()> {
        let (rank, world, n) = (self.rank as i32, self.world as i32, len as i64);
        let lane = self.lane(len);
        let mut b = Launch::new(&self.stream, &self.kernel);
        b.arg(buf.raw_mut())
            .arg(&lane.slots)
            .arg(lane.epochs)
            .arg(&rank)
            .arg(&world)
            .arg(&lane.cap)
            .arg(&n)
            .arg(&self.stuck)
            .arg(&self.timed_out.1);
        // SAFETY: matches ar_one_shot; it reads and writes len <= cap elements of `buf`
        // (checked by the caller against CAPACITY, and SMALL_CAPACITY picks the small lane),
        // as many of slot [parity][rank] of each peer's lane and of slots [parity][peer] of
        // ours (each slot holds cap; every lane holds 2 * world slots), and one epoch per block
        // (the lane's counters hold `blocks`).
        unsafe { b.launch(lane.cfg) }.map_err(|e| driver_err("custom all-reduce", e))?;
        Ok(())
    }

    /// Whether [`Self::all_reduce_add_rms_norm`] takes `n` rows of `hidden`: the message fits
    /// the capacity and the rows are made of 16-byte vectors and fit the kernel's chunk
    /// (`hidden % 8 == 0`, `8 <= hidden <= 8192`: every Qwen3 size). Otherwise the caller runs
    /// the all-reduce and `add_rms_norm` one after the other.
    pub(crate) fn fuses(&self, n: usize, hidden: usize) -> bool {
        norm_threads(hidden).is_some() && n.checked_mul(hidden).is_some_and(|l| l <= CAPACITY)
    }

    /// All-reduce of `x[..n * hidden]` fused with the residual add + RMSNorm after it, in
    /// place, queued on the backend's stream: `x` (this rank's partial sums) is summed over
    /// the ranks and rounded to bf16, `residual = bf16(sum + residual)`, then
    /// `x = rms_norm(residual) * weight`; the same bits as [`Self::all_reduce`] followed by
    /// `add_rms_norm`. Every rank calls it with the same `n` and `hidden`, which
    /// [`Self::fuses`] must accept.
    pub(crate) fn all_reduce_add_rms_norm(
        &self,
        x: &mut CudaBuf<bf16>,
        residual: &mut CudaBuf<bf16>,
        weight: &CudaBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "custom all_reduce_add_rms_norm";
        let len = super::ops::check_add_rms_norm(OP, x, residual, weight, n, hidden)?;
        let nt = norm_threads(hidden)
            .filter(|_| len <= CAPACITY)
            .ok_or_else(|| {
                Error::Other(format!(
                    "op {OP}: {n} rows of {hidden} are not fused (hidden % 8 == 0, \
                     8 <= hidden <= {MAX_FUSED_HIDDEN}, n * hidden <= {CAPACITY} needed)"
                ))
            })?;
        let (rank, world) = (self.rank as i32, self.world as i32);
        // All fit an i32: len <= CAPACITY.
        let (rows, width) = (n as i32, hidden as i32);
        let lane = self.lane(len);
        let mut b = Launch::new(&self.stream, &self.fused);
        b.arg(x.raw_mut())
            .arg(residual.raw_mut())
            .arg(weight.raw())
            .arg(&lane.slots)
            .arg(lane.epochs)
            .arg(&rank)
            .arg(&world)
            .arg(&lane.cap)
            .arg(&rows)
            .arg(&width)
            .arg(&nt)
            .arg(&eps)
            .arg(&self.stuck)
            .arg(&self.timed_out.1);
        // SAFETY: matches ar_add_rms_norm. Block b reads and writes rows b, b + blocks, ...
        // of x and residual (n rows of hidden, checked above; distinct buffers, as &mut
        // guarantees) and reads hidden weights (checked); it writes n * hidden <= cap elements
        // of slot [parity][rank] of each peer's lane and reads and writes as many of slots
        // [parity][peer] of ours (each slot holds cap: the lane is picked by the same len as in
        // `all_reduce`), and one epoch per block (the lane's counters hold `blocks`).
        // `norm_threads` gives the kernel's layout: hidden % 8 == 0, hidden / 8 <= AR_CHUNK and
        // <= NORM_VPT * nt, nt a multiple of 32 and at most THREADS; the block is THREADS, its
        // __launch_bounds__.
        unsafe { b.launch(lane.cfg) }
            .map_err(|e| driver_err("custom all_reduce_add_rms_norm", e))?;
        Ok(())
    }
}

/// One lane's side of a launch: its slots' addresses by rank, its per-block epochs, the
/// elements of each slot, and its fixed grid.
struct Lane<'s> {
    slots: CudaView<'s, u64>,
    epochs: &'s CudaSlice<u32>,
    cap: i64,
    cfg: LaunchConfig,
}

/// The threads of `add_rms_norm`'s block for rows of `hidden` (`norm_threads` in ops.rs), whose
/// order of summation `ar_add_rms_norm` repeats to give the same bits, or `None` when such rows
/// are not fused (`add_rms_norm` would not take its vector path, or the rows are wider than the
/// fused kernel's chunk).
fn norm_threads(hidden: usize) -> Option<i32> {
    // Rows this narrow are always on add_rms_norm's vector path (hidden / 8 <= VPT * 1024).
    (hidden != 0 && hidden.is_multiple_of(8) && hidden <= MAX_FUSED_HIDDEN)
        .then(|| super::ops::norm_threads(hidden) as i32)
}

impl Drop for CustomAllReduce {
    fn drop(&mut self) {
        for &p in &self.opened {
            // SAFETY: each pointer came from cuIpcOpenMemHandle and is closed once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(p) };
        }
        // SAFETY: our own allocation, no longer used by queued work once the owner has
        // synchronised its stream (NcclComm's drop does).
        let _ = unsafe { cudarc::driver::result::free_sync(self.local) };
        // SAFETY: the pinned flag from `host_flag`, freed once.
        let _ = unsafe { cudarc::driver::result::free_host(self.timed_out.0 as *mut _) };
    }
}

/// A device allocation of `bytes` filled with `fill`, to share with other processes, and its
/// IPC handle. The caller frees it with `free_sync` (after every importer closed it).
pub(crate) fn ipc_alloc(bytes: usize, fill: u8) -> Result<(CUdeviceptr, [u8; HANDLE_BYTES])> {
    // SAFETY: a plain synchronous allocation (IPC needs cuMemAlloc memory, not the stream
    // pool); the context is bound to this thread by the backend.
    let local = unsafe { cudarc::driver::result::malloc_sync(bytes) }
        .map_err(|e| driver_err("IPC buffer: alloc", e))?;
    let mut handle = std::mem::MaybeUninit::<CUipcMemHandle>::uninit();
    let got = (|| {
        // SAFETY: `local` is a live allocation of `bytes`, filled before any peer can know the
        // handle.
        unsafe {
            cudarc::driver::result::memset_d8_sync(local, fill, bytes)
                .map_err(|e| driver_err("IPC buffer: fill", e))?;
            cu(
                "get IPC handle",
                sys::cuIpcGetMemHandle(handle.as_mut_ptr(), local),
            )?;
            Ok::<_, Error>(handle.assume_init())
        }
    })();
    match got {
        Ok(h) => {
            let mut out = [0u8; HANDLE_BYTES];
            for (o, c) in out.iter_mut().zip(h.reserved) {
                *o = c as u8;
            }
            Ok((local, out))
        }
        Err(e) => {
            // SAFETY: freeing the allocation made above, used by nobody.
            let _ = unsafe { cudarc::driver::result::free_sync(local) };
            Err(e)
        }
    }
}

/// Maps a peer's allocation from its IPC handle (from [`ipc_alloc`] in the peer's process);
/// close it with `cuIpcCloseMemHandle`.
pub(crate) fn ipc_open(h: &[u8; HANDLE_BYTES]) -> Result<CUdeviceptr> {
    let mut handle = CUipcMemHandle {
        reserved: [0; HANDLE_BYTES],
    };
    for (d, s) in handle.reserved.iter_mut().zip(h) {
        *d = *s as _;
    }
    let mut ptr: CUdeviceptr = 0;
    // SAFETY: the handle came from cuIpcGetMemHandle in the peer's process, which keeps the
    // allocation alive until after this process closed it (communicators are torn down
    // together); `ptr` is a valid out-pointer.
    cu("open IPC handle", unsafe {
        sys::cuIpcOpenMemHandle_v2(
            &mut ptr,
            handle,
            CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
        )
    })?;
    Ok(ptr)
}

/// One zeroed u32 of pinned host memory mapped into the device: (host, device) addresses.
pub(crate) fn host_flag() -> Result<(*mut u32, CUdeviceptr)> {
    // SAFETY: allocates 4 bytes of pinned, device-mapped host memory and asks for its device
    // address; both pointers stay valid until `free_host`.
    unsafe {
        let host = cudarc::driver::result::malloc_host(4, sys::CU_MEMHOSTALLOC_DEVICEMAP)
            .map_err(|e| driver_err("custom all-reduce: host flag", e))?
            as *mut u32;
        host.write_volatile(0);
        let mut dev: CUdeviceptr = 0;
        if let Err(e) = cu(
            "map host flag",
            sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut _, 0),
        ) {
            let _ = cudarc::driver::result::free_host(host as *mut _);
            return Err(e);
        }
        Ok((host, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16-byte vectors per thread and row of `add_rms_norm` (`AR_VPT` in custom_ar.cu, `VPT`
    /// in norm.cu).
    const NORM_VPT: usize = 4;

    /// The fused kernel sums like add_rms_norm's block (ops.rs `norm_threads`), and only
    /// takes rows of 16-byte vectors that fit its chunk.
    #[test]
    fn norm_threads_match_the_norm_kernel() {
        assert_eq!(norm_threads(1024), Some(32)); // Qwen3-0.6B
        assert_eq!(norm_threads(2048), Some(64));
        assert_eq!(norm_threads(2560), Some(96)); // Qwen3-4B
        assert_eq!(norm_threads(4096), Some(128)); // Qwen3-8B
        assert_eq!(norm_threads(5120), Some(160)); // Qwen3-14B, 32B
        assert_eq!(norm_threads(8), Some(32));
        assert_eq!(norm_threads(8192), Some(256));
        for hidden in [0, 4, 100, 4100, 8200, 16384] {
            assert_eq!(norm_threads(hidden), None, "hidden {hidden}");
        }
        for hidden in (8..=MAX_FUSED_HIDDEN).step_by(8) {
            let nt = norm_threads(hidden).unwrap() as usize;
            // ops.rs's formula, and the kernel's layout.
            let want = (hidden / 8).div_ceil(NORM_VPT).div_ceil(32).clamp(1, 32) * 32;
            assert_eq!(nt, want);
            assert!(hidden / 8 <= NORM_VPT * nt && nt <= THREADS as usize && nt.is_multiple_of(32));
        }
    }
}
