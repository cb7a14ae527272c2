//! Tensor-parallel worker processes, as nano-vLLM's: rank 0 (the engine's process) starts
//! ranks 1..N-1 from an executable that has a `worker` subcommand, and before each model-runner
//! call writes the call and its inputs into the group's shared memory ([`crate::shm`]); every
//! worker copies it out, acknowledges it, and runs the same call on its shard of the model.
//!
//! * [`WorkerGroup`] is rank 0's side: it spawns the processes, sends commands, and runs a
//!   watchdog thread that notices a worker that exited (its error message, if it wrote one,
//!   becomes rank 0's error) and then runs the abort hooks that unblock collectives (NCCL).
//!   Dropping it asks the workers to exit, kills those that do not within a few seconds, reaps
//!   them all and removes the shared-memory file.
//! * [`WorkerEndpoint`] is a worker's side: it receives commands and reports its state; a
//!   thread ends the worker process as soon as rank 0's process is gone, so no worker outlives
//!   the engine.
//!
//! The first command is an opaque start-up message (the facade's: model, device, engine
//! options, NCCL id); after it come [`Call`]s encoded by [`Call::encode`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nanovllm_utils::{Error, Result};

use crate::shm::{futex_wake, reached, wait_until, Liveness, ShmRegion, WorkerState, POLL};

/// How long a dropped group waits for its workers to exit before killing them.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// What rank 0 knows of its workers' health, shared with the watchdog.
#[derive(Default)]
struct Health {
    dead: AtomicBool,
    why: Mutex<Option<String>>,
}

type AbortHook = Box<dyn Fn() + Send + Sync>;

/// Rank 0's handle on the worker processes of a tensor-parallel group.
pub struct WorkerGroup {
    region: Arc<ShmRegion>,
    children: Arc<Mutex<Vec<Child>>>,
    health: Arc<Health>,
    /// The check rank 0's waits run: an error once a worker died.
    alive: Liveness,
    hooks: Arc<Mutex<Vec<AbortHook>>>,
    stop: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
    seq: u32,
}

impl WorkerGroup {
    /// Creates the shared memory for `size` ranks (commands up to `call_capacity` bytes,
    /// collective slots of `slot_bytes`), writes `init` as the first command, and starts
    /// `exe worker --shm PATH --rank R` for ranks 1..size.
    pub fn spawn(
        exe: &Path,
        size: usize,
        call_capacity: usize,
        slot_bytes: usize,
        init: &[u8],
    ) -> Result<Self> {
        let region = Arc::new(ShmRegion::create(
            size,
            call_capacity.max(init.len()),
            slot_bytes,
        )?);
        region.write_call(init)?;
        let h = region.header();
        h.call_seq.store(1, Ordering::Release);
        let mut children = Vec::new();
        for rank in 1..size {
            let child = Command::new(exe)
                .arg("worker")
                .arg("--shm")
                .arg(region.path())
                .arg("--rank")
                .arg(rank.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn();
            match child {
                Ok(c) => children.push(c),
                Err(e) => {
                    for mut c in children {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(Error::Worker(format!(
                        "cannot start the tensor-parallel worker {}: {e}",
                        exe.display()
                    )));
                }
            }
        }
        let health = Arc::new(Health::default());
        let watched = Arc::clone(&health);
        let mut group = WorkerGroup {
            region,
            children: Arc::new(Mutex::new(children)),
            health,
            alive: Arc::new(move || check_health(&watched)),
            hooks: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            watchdog: None,
            seq: 1,
        };
        group.watchdog = Some(group.start_watchdog());
        Ok(group)
    }

    /// Polls the children every [`POLL`]; the first that exited marks the group dead, runs
    /// the abort hooks and wakes every waiter.
    fn start_watchdog(&self) -> JoinHandle<()> {
        let (children, health, hooks, stop, region) = (
            Arc::clone(&self.children),
            Arc::clone(&self.health),
            Arc::clone(&self.hooks),
            Arc::clone(&self.stop),
            Arc::clone(&self.region),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(POLL);
                let exited = {
                    let mut kids = match children.lock() {
                        Ok(k) => k,
                        Err(_) => return,
                    };
                    kids.iter_mut()
                        .enumerate()
                        .find_map(|(i, c)| match c.try_wait() {
                            Ok(Some(status)) => Some((i + 1, c.id(), status.to_string())),
                            Ok(None) => None,
                            Err(e) => Some((i + 1, c.id(), format!("cannot be waited for: {e}"))),
                        })
                };
                let Some((rank, pid, status)) = exited else {
                    continue;
                };
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let detail = region
                    .read_error(rank)
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                let why = format!(
                    "tensor-parallel worker rank {rank} (pid {pid}) exited ({status}){detail}"
                );
                if let Ok(mut w) = health.why.lock() {
                    *w = Some(why);
                }
                health.dead.store(true, Ordering::Release);
                if let Ok(hooks) = hooks.lock() {
                    for hook in hooks.iter() {
                        hook();
                    }
                }
                let h = region.header();
                futex_wake(&h.arrive);
                for r in 0..region.size() {
                    futex_wake(&h.acked[r]);
                    futex_wake(&h.state[r]);
                }
                return;
            }
        })
    }

    /// The shared memory (for the CPU backend's [`crate::shm_comm::ShmComm`]).
    pub fn region(&self) -> &Arc<ShmRegion> {
        &self.region
    }

    /// Ranks in the group, rank 0 included.
    pub fn size(&self) -> usize {
        self.region.size()
    }

    /// An error when a worker has died.
    pub fn check(&self) -> Result<()> {
        check_health(&self.health)
    }

    /// The check waits on rank 0 run (a dead worker ends them).
    pub fn liveness(&self) -> Liveness {
        Arc::clone(&self.alive)
    }

    /// Registers `hook`, run once by the watchdog when a worker dies (an NCCL abort, so that
    /// rank 0's collectives return instead of waiting for the dead peer).
    pub fn on_worker_death(&self, hook: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut hooks) = self.hooks.lock() {
            hooks.push(Box::new(hook));
        }
        // A worker that died before the hook was registered.
        if self.check().is_err() {
            if let Ok(hooks) = self.hooks.lock() {
                if let Some(hook) = hooks.last() {
                    hook();
                }
            }
        }
    }

    /// Waits until every worker reports `state` (or a later one); `Failed` or an exit is an
    /// error. Returns each worker's reported value (index 0 is rank 1).
    pub fn wait_for(&self, state: WorkerState) -> Result<Vec<u64>> {
        let h = self.region.header();
        (1..self.size())
            .map(|r| {
                wait_until(
                    &h.state[r],
                    |s| s >= state as u32 || s == WorkerState::Failed as u32,
                    Some(&self.alive),
                )?;
                if h.state[r].load(Ordering::Acquire) == WorkerState::Failed as u32 {
                    // The process is about to exit; its message says why.
                    let msg = self.region.read_error(r).unwrap_or_default();
                    return Err(Error::Worker(format!(
                        "tensor-parallel worker rank {r} failed: {msg}"
                    )));
                }
                Ok(h.value[r].load(Ordering::Acquire))
            })
            .collect()
    }

    /// Sends one command: waits until every worker has copied the previous one out, writes
    /// `payload`, and wakes them.
    pub fn send(&mut self, payload: &[u8]) -> Result<()> {
        self.check()?;
        let h = self.region.header();
        for r in 1..self.size() {
            wait_until(&h.acked[r], |a| reached(a, self.seq), Some(&self.alive))?;
        }
        self.region.write_call(payload)?;
        self.seq = self.seq.wrapping_add(1);
        h.call_seq.store(self.seq, Ordering::Release);
        futex_wake(&h.call_seq);
        Ok(())
    }

    /// Process ids of the workers (rank 1 first).
    pub fn pids(&self) -> Vec<u32> {
        match self.children.lock() {
            Ok(k) => k.iter().map(Child::id).collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn check_health(health: &Health) -> Result<()> {
    if health.dead.load(Ordering::Acquire) {
        let why = health
            .why
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .unwrap_or_else(|| "a tensor-parallel worker died".into());
        return Err(Error::Worker(why));
    }
    Ok(())
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if self.check().is_ok() {
            // Ask politely; a worker busy in a collective that will never complete is killed.
            let _ = self.region.write_call(&Call::Exit.encode());
            self.seq = self.seq.wrapping_add(1);
            let h = self.region.header();
            h.call_seq.store(self.seq, Ordering::Release);
            futex_wake(&h.call_seq);
        }
        if let Ok(mut kids) = self.children.lock() {
            let deadline = Instant::now() + EXIT_GRACE;
            for c in kids.iter_mut() {
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
        }
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        self.region.unlink();
    }
}

/// A worker's side of the group.
pub struct WorkerEndpoint {
    region: Arc<ShmRegion>,
    rank: usize,
    seq: u32,
}

impl WorkerEndpoint {
    /// Maps the group's shared memory as `rank`, and starts the thread that ends this process
    /// when its parent (rank 0) is gone.
    pub fn open(path: &Path, rank: usize) -> Result<Self> {
        let region = Arc::new(ShmRegion::open(path)?);
        if rank == 0 || rank >= region.size() {
            return Err(Error::Worker(format!(
                "worker rank {rank} outside 1..{}",
                region.size()
            )));
        }
        watch_parent();
        Ok(WorkerEndpoint {
            region,
            rank,
            seq: 0,
        })
    }

    /// The shared memory (for the CPU backend's [`crate::shm_comm::ShmComm`]).
    pub fn region(&self) -> &Arc<ShmRegion> {
        &self.region
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Waits for the next command, copies it out and acknowledges it.
    pub fn recv(&mut self) -> Result<Vec<u8>> {
        let h = self.region.header();
        let next = self.seq.wrapping_add(1);
        wait_until(&h.call_seq, |s| reached(s, next), None)?;
        let payload = self.region.read_call()?;
        self.seq = next;
        h.acked[self.rank].store(next, Ordering::Release);
        futex_wake(&h.acked[self.rank]);
        Ok(payload)
    }

    /// Reports `state` with `value` to rank 0.
    pub fn report(&self, state: WorkerState, value: u64) {
        let h = self.region.header();
        h.value[self.rank].store(value, Ordering::Release);
        h.state[self.rank].store(state as u32, Ordering::Release);
        futex_wake(&h.state[self.rank]);
    }

    /// Records `msg` for rank 0 and reports the failure; the caller exits next.
    pub fn fail(&self, msg: &str) {
        self.region.write_error(self.rank, msg);
        self.report(WorkerState::Failed, 0);
    }
}

/// Ends this process (exit code 1) once its parent process is gone: a worker never outlives
/// the engine, whatever killed it.
fn watch_parent() {
    #[cfg(unix)]
    {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        std::thread::spawn(move || loop {
            std::thread::sleep(POLL * 5);
            // SAFETY: as above.
            if unsafe { libc::getppid() } != parent {
                std::process::exit(1);
            }
        });
    }
}

/// The executable workers are started from: `NANOVLLM_WORKER_EXE` when set, else this
/// process's own executable (the `nanovllm` CLI has the `worker` subcommand; a program that
/// embeds the engine points the variable or the engine option at it).
pub fn default_worker_exe() -> Result<PathBuf> {
    if let Some(exe) = std::env::var_os("NANOVLLM_WORKER_EXE") {
        return Ok(PathBuf::from(exe));
    }
    std::env::current_exe()
        .map_err(|e| Error::Worker(format!("cannot find this executable to start workers: {e}")))
}

/// What rank 0 asks its workers to run. A decoded call borrows its arrays from the payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Call<'a> {
    /// One model-runner step (or a score pass) over inputs rank 0 already prepared.
    Step(StepCall<'a>),
    /// Leave the command loop and exit.
    Exit,
}

/// Which model-runner call a [`StepCall`] repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A prefill step.
    Prefill,
    /// A decode step, eager.
    Decode,
    /// A decode step replaying the graph captured for this batch size.
    DecodeGraph(usize),
    /// A teacher-forced scoring pass.
    Score,
}

/// A step and the host-side inputs rank 0 prepared for it, which every rank uploads to its
/// own device.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCall<'a> {
    /// Which call.
    pub kind: StepKind,
    /// Tokens, sequences, longest query, longest key, logits rows.
    pub shape: [u64; 5],
    /// The input arrays as plain (native-endian) bytes, in the order the model runner lists
    /// them; the runner knows each one's element type.
    pub arrays: Vec<&'a [u8]>,
}

const TAG_STEP: u8 = 1;
const TAG_EXIT: u8 = 2;

impl Call<'_> {
    /// Plain bytes: a tag, then for a step its kind, shape, and each array as a byte length
    /// and the bytes. Written into `out` (cleared first), so a caller can reuse one buffer.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Call::Exit => out.push(TAG_EXIT),
            Call::Step(s) => {
                out.push(TAG_STEP);
                let (kind, bs) = match s.kind {
                    StepKind::Prefill => (0u8, 0u64),
                    StepKind::Decode => (1, 0),
                    StepKind::DecodeGraph(bs) => (2, bs as u64),
                    StepKind::Score => (3, 0),
                };
                out.push(kind);
                out.extend_from_slice(&bs.to_le_bytes());
                for v in s.shape {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&(s.arrays.len() as u64).to_le_bytes());
                for a in &s.arrays {
                    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    out.extend_from_slice(a);
                }
            }
        }
    }

    /// [`Call::encode_into`] a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

impl<'a> Call<'a> {
    /// Reads what [`Call::encode_into`] wrote; anything else is an error.
    pub fn decode(bytes: &'a [u8]) -> Result<Call<'a>> {
        let mut r = Reader { bytes, at: 0 };
        match r.take(1)?[0] {
            TAG_EXIT => Ok(Call::Exit),
            TAG_STEP => {
                let kind = r.take(1)?[0];
                let bs = r.u64()? as usize;
                let kind = match kind {
                    0 => StepKind::Prefill,
                    1 => StepKind::Decode,
                    2 => StepKind::DecodeGraph(bs),
                    3 => StepKind::Score,
                    k => return Err(Error::Worker(format!("unknown step kind {k}"))),
                };
                let mut shape = [0u64; 5];
                for v in &mut shape {
                    *v = r.u64()?;
                }
                let n = r.u64()? as usize;
                let arrays = (0..n)
                    .map(|_| {
                        let len = r.u64()? as usize;
                        r.take(len)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Call::Step(StepCall {
                    kind,
                    shape,
                    arrays,
                }))
            }
            t => Err(Error::Worker(format!("unknown command tag {t}"))),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            Error::Worker(format!(
                "command truncated: {n} bytes wanted at {} of {}",
                self.at,
                self.bytes.len()
            ))
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_and_garbage_is_an_error() {
        let owned: Vec<Vec<u32>> = (0..12u32).map(|i| vec![i; i as usize]).collect();
        let seeds = [u64::MAX, 7];
        let mut arrays: Vec<&[u8]> = owned.iter().map(|a| bytemuck::cast_slice(a)).collect();
        arrays.push(bytemuck::cast_slice(&seeds));
        let step = Call::Step(StepCall {
            kind: StepKind::DecodeGraph(48),
            shape: [3, 3, 1, 700, 3],
            arrays,
        });
        let bytes = step.encode();
        assert_eq!(Call::decode(&bytes).unwrap(), step);
        assert_eq!(Call::decode(&Call::Exit.encode()).unwrap(), Call::Exit);
        for cut in [0, 1, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(Call::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(Call::decode(&[9]).is_err());
    }
}
