//! Pinned host memory that the backend's small host <-> device copies go through.
//!
//! A copy between pageable host memory and the GPU makes the driver stage it through pinned
//! memory of its own, which costs several microseconds of host time per call; a decode step
//! uploads a dozen small arrays (token ids, positions, slots, block tables, sampling
//! parameters) and downloads its sampled tokens, all while the GPU waits. Here the backend
//! copies the bytes into one pinned buffer of its own with `memcpy` and queues an asynchronous
//! DMA from there.
//!
//! The buffer is a bump allocator that is reset whenever the stream is known to be idle (after
//! a `dtoh` or `synchronize`, which wait for every queued copy): a region is never reused while
//! a copy that reads it may still be queued. A copy that does not fit in what is left takes the
//! driver's pageable path, so correctness never depends on the size.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DriverError};

/// Bytes of pinned memory per backend: a decode step of 512 sequences with 64-block tables
/// needs ~150 KB; a 16,384-token prefill ~450 KB.
pub(super) const STAGING_BYTES: usize = 4 << 20;

/// Alignment of each staged copy (a cache line).
const ALIGN: usize = 64;

/// The pinned buffer and how much of it queued copies may still be reading.
pub(super) struct Staging {
    ptr: *mut u8,
    cap: usize,
    used: usize,
    stream: Arc<CudaStream>,
}

// SAFETY: the buffer is plain host memory owned by this value; the backend only touches it
// under its mutex.
unsafe impl Send for Staging {}

impl Staging {
    /// Allocates `cap` bytes of pinned host memory for copies on `stream`.
    pub(super) fn new(stream: &Arc<CudaStream>, cap: usize) -> Result<Self, DriverError> {
        stream.context().bind_to_thread()?;
        // SAFETY: a plain pinned allocation of `cap` bytes; freed in Drop.
        let ptr = unsafe { result::malloc_host(cap, 0) }? as *mut u8;
        Ok(Staging {
            ptr,
            cap,
            used: 0,
            stream: stream.clone(),
        })
    }

    /// Queues the copy of `src` to device address `dst` through the pinned buffer; returns
    /// false (nothing queued) when `src` does not fit in what is left of it.
    pub(super) fn htod(&mut self, src: &[u8], dst: CUdeviceptr) -> Result<bool, DriverError> {
        let Some(at) = self.reserve(src.len()) else {
            return Ok(false);
        };
        // SAFETY: `at .. at + len` lies inside the buffer (reserve), no queued copy reads it
        // (it was free), and `src` is a valid slice of that length.
        let staged = unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len());
            std::slice::from_raw_parts(self.ptr.add(at), src.len())
        };
        // SAFETY: `dst` is a device buffer of at least `src.len()` bytes (the caller checked),
        // and the staged bytes stay untouched until the stream is idle (see the module docs).
        unsafe { result::memcpy_htod_async(dst, staged, self.stream.cu_stream()) }?;
        Ok(true)
    }

    /// Copies `dst.len()` bytes from device address `src` into `dst` through the pinned
    /// buffer and waits for the stream (so every earlier copy is done: the buffer is reset).
    /// Returns false (nothing done) when `dst` does not fit.
    pub(super) fn dtoh(&mut self, src: CUdeviceptr, dst: &mut [u8]) -> Result<bool, DriverError> {
        let Some(at) = self.reserve(dst.len()) else {
            return Ok(false);
        };
        // SAFETY: the region lies inside the buffer and is free; `src` holds at least
        // `dst.len()` bytes (the caller checked).
        unsafe {
            let staged = std::slice::from_raw_parts_mut(self.ptr.add(at), dst.len());
            result::memcpy_dtoh_async(staged, src, self.stream.cu_stream())?;
        }
        self.stream.synchronize()?;
        // SAFETY: the copy into the region has completed (the stream is idle).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), dst.as_mut_ptr(), dst.len()) };
        self.used = 0;
        Ok(true)
    }

    /// The stream has been waited for: every staged copy is done.
    pub(super) fn idle(&mut self) {
        self.used = 0;
    }

    /// The offset of `len` free bytes, if there are that many left.
    fn reserve(&mut self, len: usize) -> Option<usize> {
        let at = self.used.next_multiple_of(ALIGN);
        let end = at.checked_add(len).filter(|&e| e <= self.cap)?;
        self.used = end;
        Some(at)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Queued copies may still read the buffer: wait for them before freeing it.
        let _ = self.stream.synchronize();
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: `ptr` came from malloc_host and no copy reads it any more.
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}
