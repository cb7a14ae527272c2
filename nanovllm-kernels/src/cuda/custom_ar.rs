//! The one-shot all-reduce of `cuda/custom_ar.cu` for decode-sized messages between the GPUs
//! of one host: each rank shares one allocation with its peers through CUDA IPC (the handles
//! travel through NCCL), and a call is one short kernel instead of NCCL's ring.
//! [`super::NcclComm`] uses it for messages up to [`CustomAllReduce::capacity`] elements
//! when every rank could set it up, and NCCL otherwise.

use cudarc::driver::sys::{self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags};
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;
use nanovllm_utils::{Error, Result};

use super::{driver_err, CudaBackend, CudaBuf};

/// Most ranks the kernels handle (`AR_MAX_RANKS` in custom_ar.cu).
pub(crate) const MAX_RANKS: usize = 8;
/// Elements of each of the two data buffers: 8 MiB of bf16, a decode step's hidden states at
/// batch 512 and width 8,192.
const CAPACITY: usize = 4 << 20;
/// Elements of each data buffer of the small-message lane (batch <= 16 at width 4,096).
const SMALL_CAPACITY: usize = 64 << 10;
/// Blocks of every launch of a lane: fixed, so that block b owns the same elements in every
/// call. Messages up to SMALL_CAPACITY go through a lane of few blocks (less to schedule and
/// synchronise), larger ones through one that spreads the copy over the GPU. Each lane has its
/// own buffers, flags and counters, so the two never share memory.
const BLOCKS: u32 = 128;
const SMALL_BLOCKS: u32 = 8;
/// Threads per block.
const THREADS: u32 = 512;
/// Bytes of each lane's flags: one u32 per block and rank.
const FLAG_BYTES: usize = BLOCKS as usize * MAX_RANKS * 4;
const SMALL_FLAG_BYTES: usize = SMALL_BLOCKS as usize * MAX_RANKS * 4;
const ELEM: usize = std::mem::size_of::<bf16>();
/// Offsets in the shared allocation: big data, small data, big flags, small flags; total.
const SMALL_DATA_AT: usize = 2 * CAPACITY * ELEM;
const FLAGS_AT: usize = SMALL_DATA_AT + 2 * SMALL_CAPACITY * ELEM;
const SMALL_FLAGS_AT: usize = FLAGS_AT + FLAG_BYTES;
const SHARED_BYTES: usize = SMALL_FLAGS_AT + SMALL_FLAG_BYTES;
const HANDLE_BYTES: usize = 64;

/// This rank's side of the one-shot all-reduce.
pub(crate) struct CustomAllReduce {
    /// Our shared allocation (layout: the `*_AT` offsets).
    local: CUdeviceptr,
    /// Peer allocations opened through IPC (closed on drop).
    opened: Vec<CUdeviceptr>,
    /// Device addresses, by rank: big data, big flags, small data, small flags (`world` each).
    ptrs: CudaSlice<u64>,
    /// Per-block call counters of each lane (device memory, so graph replays advance them).
    epochs: CudaSlice<u32>,
    small_epochs: CudaSlice<u32>,
    /// Set by a barrier that gave up waiting; later barriers skip their wait.
    stuck: CudaSlice<u32>,
    /// Host-mapped copy of `stuck` for the host to read cheaply: (host, device) addresses.
    timed_out: (*mut u32, CUdeviceptr),
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    kernel: CudaFunction,
}

fn cu(what: &str, r: sys::CUresult) -> Result<()> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(Error::Cuda(format!("custom all-reduce: {what}: {e:?}"))),
    }
}

impl CustomAllReduce {
    /// Allocates this rank's shared buffers and returns its IPC handle; [`Self::connect`]
    /// finishes once every rank's handle is known.
    pub(crate) fn allocate(_be: &CudaBackend) -> Result<(CUdeviceptr, [u8; HANDLE_BYTES])> {
        let bytes = SHARED_BYTES;
        // SAFETY: a plain synchronous allocation (IPC needs cuMemAlloc memory, not the stream
        // pool); the context is bound to this thread by the backend.
        let local = unsafe { cudarc::driver::result::malloc_sync(bytes) }
            .map_err(|e| driver_err("custom all-reduce: alloc", e))?;
        let mut handle = std::mem::MaybeUninit::<CUipcMemHandle>::uninit();
        let got = (|| {
            // SAFETY: `local` is a live allocation of `bytes`; the flags start zeroed.
            unsafe {
                cudarc::driver::result::memset_d8_sync(local, 0, bytes)
                    .map_err(|e| driver_err("custom all-reduce: zero", e))?;
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
                    .alloc_zeros::<u64>(4 * world)
                    .map_err(|e| driver_err("custom all-reduce: alloc", e))?,
                alloc(BLOCKS as usize)?,
                alloc(SMALL_BLOCKS as usize)?,
                alloc(1)?,
                be.func("custom_ar", "ar_one_shot")?,
            ))
        })();
        let (ptrs, epochs, small_epochs, stuck, kernel) = parts.map_err(free_local)?;
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
        };
        let mut bases = vec![0u64; world];
        for (r, h) in handles.iter().enumerate() {
            if r == rank {
                bases[r] = local;
                continue;
            }
            let mut handle = CUipcMemHandle {
                reserved: [0; HANDLE_BYTES],
            };
            for (d, s) in handle.reserved.iter_mut().zip(h) {
                *d = *s as _;
            }
            let mut ptr: CUdeviceptr = 0;
            // SAFETY: the handle came from cuIpcGetMemHandle in rank r's process, which keeps
            // the allocation alive until after this rank closed it (communicators are torn
            // down together); `ptr` is a valid out-pointer.
            cu("open IPC handle", unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &mut ptr,
                    handle,
                    CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            })?;
            ar.opened.push(ptr);
            bases[r] = ptr;
        }
        let mut table = bases.clone();
        for at in [FLAGS_AT, SMALL_DATA_AT, SMALL_FLAGS_AT] {
            table.extend(bases.iter().map(|b| b + at as u64));
        }
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

    /// Whether a barrier gave up waiting for a peer: the results since are wrong.
    pub(crate) fn timed_out(&self) -> bool {
        // SAFETY: a live host allocation of one u32, written by the device; a volatile read
        // sees the device's write once it is visible.
        unsafe { std::ptr::read_volatile(self.timed_out.0) != 0 }
    }

    /// In place over `buf[..len]` (`len <= capacity()`), queued on the backend's stream.
    pub(crate) fn all_reduce(&self, buf: &mut CudaBuf<bf16>, len: usize) -> Result<()> {
        let (rank, world) = (self.rank as i32, self.world as i32);
        let w = self.world;
        let small = len <= SMALL_CAPACITY;
        let (lane, cap, blocks, epochs) = match small {
            true => (2 * w, SMALL_CAPACITY, SMALL_BLOCKS, &self.small_epochs),
            false => (0, CAPACITY, BLOCKS, &self.epochs),
        };
        let (cap, n) = (cap as i64, len as i64);
        let bufs = self.ptrs.slice(lane..lane + w);
        let flags = self.ptrs.slice(lane + w..lane + 2 * w);
        let mut b = self.stream.launch_builder(&self.kernel);
        b.arg(buf.raw_mut())
            .arg(&bufs)
            .arg(&flags)
            .arg(epochs)
            .arg(&rank)
            .arg(&world)
            .arg(&cap)
            .arg(&n)
            .arg(&self.stuck)
            .arg(&self.timed_out.1);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches ar_one_shot; it reads and writes len <= cap elements of `buf`
        // (checked by the caller against CAPACITY, and SMALL_CAPACITY picks the small lane),
        // as many of each rank's lane buffer (each holds cap), one epoch per block (the lane's
        // counters hold `blocks`) and flags [block][rank] inside the lane's flag area.
        unsafe { b.launch(cfg) }.map_err(|e| driver_err("custom all-reduce", e))?;
        Ok(())
    }
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

/// One zeroed u32 of pinned host memory mapped into the device: (host, device) addresses.
fn host_flag() -> Result<(*mut u32, CUdeviceptr)> {
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
