//! The shared memory of a tensor-parallel group: one file in /dev/shm, mapped by every rank's
//! process, holding a small header of atomics, an error message per rank, the command payload
//! rank 0 writes for the workers, and one slot per rank for the CPU backend's collectives.
//!
//! Waiting is a short spin (at most half a millisecond) and then a futex wait on the header word that changes (the futex
//! is the shared kind, so a wake in one process reaches a waiter in another). Every wait wakes
//! at least every [`POLL`] to ask a liveness check whether the other side is still there, so
//! a dead process turns into an error, never a hang.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memmap2::MmapRaw;
use nanovllm_utils::{Error, Result};

/// Most ranks a group may have.
pub const MAX_RANKS: usize = 64;
/// How often a waiter wakes to run its liveness check.
pub const POLL: Duration = Duration::from_millis(20);
/// How long a waiter spins before it sleeps on the futex. A worker waits for rank 0's next
/// command only for rank 0's host work between steps (a few hundred microseconds), so it
/// usually never sleeps during generation and never pays the futex wake-up latency; an idle
/// worker sleeps.
const SPIN: Duration = Duration::from_micros(500);
const MAGIC: u64 = 0x6e61_6e6f_766c_6c6d; // "nanovllm"
const HEADER_BYTES: usize = 8192;
/// Bytes of each rank's error message area.
const ERROR_BYTES: usize = 2048;

/// A check run while waiting: an error ends the wait (a peer process died).
pub type Liveness = Arc<dyn Fn() -> Result<()> + Send + Sync>;

/// The header at the start of the region. Every field is written by one side and read by the
/// other through atomics; the sizes are fixed at creation.
#[repr(C)]
pub struct Header {
    magic: AtomicU64,
    /// Ranks in the group.
    pub size: AtomicU32,
    /// Sequence number of the last command rank 0 wrote (futex word).
    pub call_seq: AtomicU32,
    /// Bytes of that command's payload.
    pub call_len: AtomicU64,
    /// Arrivals at collective barriers so far (futex word).
    pub arrive: AtomicU32,
    /// Sequence number of the last command each rank copied out (futex word per rank).
    pub acked: [AtomicU32; MAX_RANKS],
    /// Each worker's state (futex word per rank): see [`WorkerState`].
    pub state: [AtomicU32; MAX_RANKS],
    /// A value each worker reports with its state (KV-cache blocks when ready).
    pub value: [AtomicU64; MAX_RANKS],
    call_capacity: AtomicU64,
    slot_bytes: AtomicU64,
}

/// Where a worker process is in its life, as it reports it in the header.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, not yet past its device set-up.
    Starting = 0,
    /// Its device is up; it is joining the communicator and loading weights.
    Started = 1,
    /// Model loaded, KV cache allocated, graphs captured; serving commands.
    Ready = 2,
    /// It failed; its error message is in the region.
    Failed = 3,
}

/// The mapped region. The process that creates it owns the file and removes it (at the latest
/// when the region is dropped); the others only map it.
pub struct ShmRegion {
    map: MmapRaw,
    path: PathBuf,
    owner: bool,
    call_offset: usize,
    call_capacity: usize,
    slots_offset: usize,
    slot_bytes: usize,
}

// SAFETY: the mapping stays valid for the region's life; all shared state is accessed through
// atomics or through copies whose ordering the atomics establish.
unsafe impl Send for ShmRegion {}
// SAFETY: as above.
unsafe impl Sync for ShmRegion {}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Worker(format!("shared memory {what} {}: {e}", path.display()))
}

fn layout(size: usize, call_capacity: usize, slot_bytes: usize) -> (usize, usize, usize) {
    let round = |n: usize| n.div_ceil(4096) * 4096;
    let call_offset = HEADER_BYTES + round(MAX_RANKS * ERROR_BYTES);
    let slots_offset = call_offset + round(call_capacity);
    (
        call_offset,
        slots_offset,
        slots_offset + size * round(slot_bytes),
    )
}

impl ShmRegion {
    /// Creates a region for `size` ranks with room for commands of `call_capacity` bytes and
    /// collective slots of `slot_bytes` bytes per rank, in /dev/shm (or the temp folder where
    /// there is no /dev/shm). Pages are only backed by memory once touched.
    pub fn create(size: usize, call_capacity: usize, slot_bytes: usize) -> Result<Self> {
        if !(1..=MAX_RANKS).contains(&size) {
            return Err(Error::EngineConfig {
                option: "tensor_parallel_size",
                msg: format!("{size} ranks; at most {MAX_RANKS} are supported"),
            });
        }
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!("nanovllm-{}-{nanos:09}", std::process::id()));
        let slot_bytes = slot_bytes.div_ceil(64) * 64;
        let (call_offset, slots_offset, total) = layout(size, call_capacity, slot_bytes);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err("create", &path, e))?;
        let region = (|| {
            file.set_len(total as u64)
                .map_err(|e| io_err("size", &path, e))?;
            let map = MmapRaw::map_raw(&file).map_err(|e| io_err("map", &path, e))?;
            Ok(ShmRegion {
                map,
                path: path.clone(),
                owner: true,
                call_offset,
                call_capacity,
                slots_offset,
                slot_bytes,
            })
        })();
        let region = match region {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let h = region.header();
        h.size.store(size as u32, Ordering::Relaxed);
        h.call_capacity
            .store(call_capacity as u64, Ordering::Relaxed);
        h.slot_bytes.store(slot_bytes as u64, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(region)
    }

    /// Maps a region another process created.
    pub fn open(path: &Path) -> Result<Self> {
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open", path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat", path, e))?.len() as usize;
        if len < HEADER_BYTES {
            return Err(Error::Worker(format!(
                "shared memory {} is {len} bytes, too short for a header",
                path.display()
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| io_err("map", path, e))?;
        let mut region = ShmRegion {
            map,
            path: path.to_path_buf(),
            owner: false,
            call_offset: 0,
            call_capacity: 0,
            slots_offset: 0,
            slot_bytes: 0,
        };
        let h = region.header();
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(Error::Worker(format!(
                "{} is not a nanovllm shared-memory region",
                path.display()
            )));
        }
        let size = h.size.load(Ordering::Relaxed) as usize;
        let call_capacity = h.call_capacity.load(Ordering::Relaxed) as usize;
        let slot_bytes = h.slot_bytes.load(Ordering::Relaxed) as usize;
        let (call_offset, slots_offset, total) = layout(size, call_capacity, slot_bytes);
        if total > len || size > MAX_RANKS {
            return Err(Error::Worker(format!(
                "shared memory {} is {len} bytes; its header describes {total}",
                path.display()
            )));
        }
        region.call_offset = call_offset;
        region.call_capacity = call_capacity;
        region.slots_offset = slots_offset;
        region.slot_bytes = slot_bytes;
        Ok(region)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least HEADER_BYTES long (checked at
        // creation and open), Header is smaller than that and made only of atomics, which any
        // bit pattern (zeroed file pages included) initialises validly.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.header().size.load(Ordering::Relaxed) as usize
    }

    /// The file behind the region.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes available to one command.
    pub fn call_capacity(&self) -> usize {
        self.call_capacity
    }

    /// Bytes of each rank's collective slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Removes the file; the mappings stay valid. Done by the owner as soon as every worker
    /// has mapped the region, so that nothing is left behind however the processes end.
    pub fn unlink(&self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn check_range(&self, what: &str, offset: usize, len: usize, end: usize) -> Result<()> {
        if offset + len > end {
            return Err(Error::Worker(format!(
                "shared memory: {what} of {len} bytes does not fit ({} available)",
                end.saturating_sub(offset)
            )));
        }
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    fn write_at(&self, offset: usize, src: &[u8]) {
        // SAFETY: callers check `offset + src.len()` against the mapping's sections; the
        // protocol (acks, barriers) guarantees no other process touches those bytes now.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                src.len(),
            )
        }
    }

    /// Copies `dst.len()` bytes of the region at `offset` into `dst`.
    fn read_at(&self, offset: usize, dst: &mut [u8]) {
        // SAFETY: as in `write_at`: bounds checked by callers, no concurrent writer by protocol.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// Writes the command payload (rank 0, once every worker acknowledged the previous one).
    pub fn write_call(&self, payload: &[u8]) -> Result<()> {
        self.check_range("a command", 0, payload.len(), self.call_capacity)?;
        self.write_at(self.call_offset, payload);
        self.header()
            .call_len
            .store(payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the current command payload out.
    pub fn read_call(&self) -> Result<Vec<u8>> {
        let len = self.header().call_len.load(Ordering::Relaxed) as usize;
        self.check_range("a command", 0, len, self.call_capacity)?;
        let mut out = vec![0u8; len];
        self.read_at(self.call_offset, &mut out);
        Ok(out)
    }

    /// Writes `src` at the start of `rank`'s collective slot.
    pub fn write_slot(&self, rank: usize, src: &[u8]) -> Result<()> {
        self.check_range("a collective", 0, src.len(), self.slot_bytes)?;
        self.write_at(self.slots_offset + rank * self.slot_bytes_rounded(), src);
        Ok(())
    }

    /// Reads the start of `rank`'s collective slot into `dst`.
    pub fn read_slot(&self, rank: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range("a collective", 0, dst.len(), self.slot_bytes)?;
        self.read_at(self.slots_offset + rank * self.slot_bytes_rounded(), dst);
        Ok(())
    }

    fn slot_bytes_rounded(&self) -> usize {
        self.slot_bytes.div_ceil(4096) * 4096
    }

    /// Records `rank`'s error message (cut to fit).
    pub fn write_error(&self, rank: usize, msg: &str) {
        if rank >= MAX_RANKS {
            return;
        }
        let mut bytes = msg.as_bytes();
        let room = ERROR_BYTES - 4;
        if bytes.len() > room {
            let mut cut = room;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            bytes = &bytes[..cut];
        }
        let at = HEADER_BYTES + rank * ERROR_BYTES;
        self.write_at(at, &(bytes.len() as u32).to_le_bytes());
        self.write_at(at + 4, bytes);
    }

    /// `rank`'s error message, if it wrote one.
    pub fn read_error(&self, rank: usize) -> Option<String> {
        if rank >= MAX_RANKS {
            return None;
        }
        let at = HEADER_BYTES + rank * ERROR_BYTES;
        let mut len = [0u8; 4];
        self.read_at(at, &mut len);
        let len = (u32::from_le_bytes(len) as usize).min(ERROR_BYTES - 4);
        if len == 0 {
            return None;
        }
        let mut msg = vec![0u8; len];
        self.read_at(at + 4, &mut msg);
        Some(String::from_utf8_lossy(&msg).into_owned())
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Blocks until `word` wakes waiters: a futex wait (shared between processes) for as long as
/// `word` still holds `expected`, at most `timeout`.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `word` is an aligned u32 that outlives the call (it lives in a mapping held
        // by the caller); the kernel only reads it and the timespec.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (word, expected);
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
    }
}

/// Wakes every process waiting on `word`.
pub fn futex_wake(word: &AtomicU32) {
    #[cfg(target_os = "linux")]
    // SAFETY: as in `futex_wait`; FUTEX_WAKE does not even read the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = word;
}

/// Waits until `done(word)` holds: spins briefly, then sleeps on the futex, running `alive`
/// every [`POLL`]; its error ends the wait.
pub fn wait_until(
    word: &AtomicU32,
    done: impl Fn(u32) -> bool,
    alive: Option<&Liveness>,
) -> Result<()> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if done(word.load(Ordering::Acquire)) {
            return Ok(());
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) && start.elapsed() > SPIN {
            break;
        }
    }
    loop {
        let v = word.load(Ordering::Acquire);
        if done(v) {
            return Ok(());
        }
        futex_wait(word, v, POLL);
        if !done(word.load(Ordering::Acquire)) {
            if let Some(alive) = alive {
                alive()?;
            }
        }
    }
}

/// `a >= b` for counters that wrap around u32.
pub fn reached(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_round_trips_between_two_mappings() {
        let a = ShmRegion::create(2, 1000, 256).unwrap();
        let b = ShmRegion::open(a.path()).unwrap();
        assert_eq!(b.size(), 2);
        a.write_call(b"hello").unwrap();
        assert_eq!(b.read_call().unwrap(), b"hello");
        b.write_slot(1, &[7; 256]).unwrap();
        let mut out = [0u8; 256];
        a.read_slot(1, &mut out).unwrap();
        assert_eq!(out, [7; 256]);
        assert!(a.write_slot(0, &[0; 257]).is_err());
        assert!(a.write_call(&[0; 1001]).is_err());
        assert_eq!(a.read_error(1), None);
        b.write_error(1, &"é".repeat(2000));
        let msg = a.read_error(1).unwrap();
        assert!(
            msg.len() <= ERROR_BYTES - 4 && msg.starts_with('é'),
            "{}",
            msg.len()
        );
        let path = a.path().to_path_buf();
        a.unlink();
        assert!(!path.exists());
        // The mappings outlive the file.
        a.write_call(b"after").unwrap();
        assert_eq!(b.read_call().unwrap(), b"after");
    }

    #[test]
    fn open_rejects_a_foreign_file() {
        let dir = std::env::temp_dir().join(format!("nanovllm-shm-test-{}", std::process::id()));
        std::fs::write(&dir, vec![1u8; HEADER_BYTES]).unwrap();
        let err = ShmRegion::open(&dir).err().unwrap().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(err.contains("not a nanovllm"), "{err}");
    }

    #[test]
    fn wait_wakes_on_change_and_stops_on_a_dead_peer() {
        let r = Arc::new(ShmRegion::create(1, 64, 64).unwrap());
        let r2 = Arc::clone(&r);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            r2.header().arrive.store(5, Ordering::Release);
            futex_wake(&r2.header().arrive);
        });
        wait_until(&r.header().arrive, |v| reached(v, 5), None).unwrap();
        t.join().unwrap();
        let dead: Liveness = Arc::new(|| Err(Error::Worker("peer died".into())));
        let err = wait_until(&r.header().arrive, |v| reached(v, 6), Some(&dead)).unwrap_err();
        assert!(err.to_string().contains("peer died"));
        assert!(reached(1, u32::MAX) && !reached(u32::MAX, 1));
    }
}
