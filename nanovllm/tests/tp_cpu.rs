//! Tensor parallelism across processes on the CPU backend: `--tp 2` starts a worker process of
//! the `nanovllm` binary, the collectives go through shared memory, and the results equal
//! tensor parallelism 1 and HF's. Also the lifecycle: dropping the `LLM` or Ctrl-C ends the
//! workers and leaves no shared memory; a killed or failing worker is an error on rank 0 within
//! seconds, never a hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{assert_matches_hf, cases, fixture, greedy, prompts};
use nanovllm::{Device, EngineArgs, EngineConfig, Error, LLM};

/// The tests look at process-wide state (children, /dev/shm), so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nanovllm"))
}

fn args(tp: usize, worker_exe: &Path, tweak: impl FnOnce(&mut EngineConfig)) -> EngineArgs {
    let mut config = EngineConfig {
        num_kvcache_blocks: Some(64),
        kvcache_block_size: 16,
        max_num_batched_tokens: 1024,
        max_num_seqs: 16,
        tensor_parallel_size: tp,
        ..Default::default()
    };
    tweak(&mut config);
    EngineArgs {
        config,
        device: Device::Cpu,
        worker_exe: Some(worker_exe.to_path_buf()),
        ..Default::default()
    }
}

fn llm(tp: usize, tweak: impl FnOnce(&mut EngineConfig)) -> LLM {
    LLM::new(fixture().to_str().unwrap(), args(tp, &exe(), tweak)).unwrap()
}

/// Shared-memory files this process created and did not remove.
fn leftover_shm() -> Vec<PathBuf> {
    shm_files_of(std::process::id())
}

fn shm_files_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("nanovllm-{pid}-");
    let mut found = Vec::new();
    for dir in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.trim().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

/// Whether `/proc/{pid}` exists at all (zombies included).
fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn tp2_matches_tp1_and_hf_in_every_mode() {
    let _g = serial();
    let cases = cases();
    let n = cases[0].greedy.len();
    let mut one = llm(1, |_| {});
    let reference: Vec<Vec<u32>> = one
        .generate(&prompts(&cases), &[greedy(n)], false)
        .unwrap()
        .into_iter()
        .map(|o| o.token_ids)
        .collect();
    let scored_one = one.score(&cases[0].prompt).unwrap();
    drop(one);

    type Tweak = Box<dyn Fn(&mut EngineConfig)>;
    let modes: Vec<(&str, Tweak)> = vec![
        ("default", Box::new(|_| {})),
        (
            "chunked prefill",
            Box::new(|c| c.max_num_batched_tokens = 8),
        ),
        (
            "preemption",
            Box::new(|c| {
                c.num_kvcache_blocks = Some(5);
                c.max_model_len = 64;
            }),
        ),
    ];
    for (name, tweak) in modes {
        let mut two = llm(2, tweak);
        assert_eq!(two.worker_pids().len(), 1, "{name}");
        let outputs = two.generate(&prompts(&cases), &[greedy(n)], false).unwrap();
        for ((out, case), r) in outputs.iter().zip(&cases).zip(&reference) {
            assert_matches_hf(&out.token_ids, case, name);
            assert_eq!(&out.token_ids, r, "{name}: tp 2 differs from tp 1");
        }
        if name == "default" {
            // Teacher-forced logits through the sharded layers, the shared-memory all-reduce
            // and the gather: equal to tp 1 up to bf16 rounding of the partial sums.
            let scored = two.score(&cases[0].prompt).unwrap();
            assert_eq!(scored.len(), scored_one.len());
            let worst = scored
                .iter()
                .zip(&scored_one)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.1, "tp 2 logits differ from tp 1 by {worst}");
            let spread = scored_one.iter().map(|x| x.abs()).fold(0f32, f32::max);
            assert!(spread > 1.0, "logits too flat to compare ({spread})");
        }
    }
}

/// Without a top-k / top-p cut each rank samples its vocabulary slice and the ranks exchange
/// their best candidates; a cut makes them gather the logits to rank 0 instead. On the same
/// logits both draw the same tokens: a top-k of vocab - 1 forces the gather and drops only the
/// least likely token, which these seeded draws never pick.
#[test]
fn tp2_samples_vocabulary_slices_as_it_samples_whole_rows() {
    let _g = serial();
    let cases = cases();
    let mut two = llm(2, |_| {});
    let vocab = two.model_config().vocab_size;
    let sampled = |top_k: usize| nanovllm::SamplingParams {
        temperature: 1.5,
        top_k,
        max_tokens: 24,
        ignore_eos: true,
        seed: Some(11),
        ..Default::default()
    };
    let tokens = |llm: &mut LLM, params| -> Vec<Vec<u32>> {
        llm.generate(&prompts(&cases), &[params], false)
            .unwrap()
            .into_iter()
            .map(|o| o.token_ids)
            .collect()
    };
    let slices = tokens(&mut two, sampled(0));
    let whole = tokens(&mut two, sampled(vocab - 1));
    assert_eq!(
        slices, whole,
        "sampled slices differ from sampled whole rows"
    );
    // Random draws, not the greedy path in disguise.
    let greedy = tokens(&mut two, greedy(24));
    assert_ne!(slices, greedy);
}

#[test]
fn dropping_the_llm_ends_the_workers_and_leaves_no_shared_memory() {
    let _g = serial();
    let mut two = llm(2, |_| {});
    let pids = two.worker_pids();
    assert_eq!(pids.len(), 1);
    assert!(running(pids[0]), "worker {} is not running", pids[0]);
    // The file is removed as soon as the workers have mapped it.
    assert_eq!(leftover_shm(), Vec::<PathBuf>::new());
    two.generate(&prompts(&cases()[..1]), &[greedy(4)], false)
        .unwrap();
    let t = Instant::now();
    drop(two);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t.elapsed()
    );
    // Reaped, not a zombie: the process entry is gone.
    assert!(
        !exists(pids[0]),
        "worker {} still exists after drop",
        pids[0]
    );
    assert_eq!(leftover_shm(), Vec::<PathBuf>::new());
}

#[test]
fn a_killed_worker_is_an_error_on_rank_0_within_seconds() {
    let _g = serial();
    let mut two = llm(2, |c| c.max_model_len = 512);
    let pid = two.worker_pids()[0];
    let params = nanovllm::SamplingParams {
        temperature: 0.0,
        max_tokens: 400,
        ignore_eos: true,
        ..Default::default()
    };
    let p = &prompts(&cases()[..1])[0];
    two.add_request(p, params).unwrap();
    for _ in 0..3 {
        two.step().unwrap();
    }
    // Killed between steps, while rank 0 will next wait on it in a collective.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    // Stepping runs on its own thread so that a hang fails the test instead of stalling it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let err = loop {
            match two.step() {
                Ok(_) if t.elapsed() < Duration::from_secs(10) => continue,
                Ok(_) => panic!("still stepping 10 s after the worker was killed"),
                Err(e) => break e,
            }
        };
        let _ = tx.send((err, two));
    });
    let (err, mut two) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("rank 0 hung after its worker was killed");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(matches!(err, Error::Worker(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("rank 1") && msg.contains(&pid.to_string()),
        "{msg}"
    );
    // The engine stays an error, and dropping it does not hang.
    assert!(two.step().is_err() || two.is_finished());
    let t = Instant::now();
    drop(two);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(leftover_shm(), Vec::<PathBuf>::new());
}

#[test]
fn a_worker_that_cannot_start_is_a_clear_error() {
    let _g = serial();
    let t = Instant::now();
    // An executable without the worker subcommand exits at once.
    let false_exe = Path::new("/bin/false");
    let err = LLM::new(fixture().to_str().unwrap(), args(2, false_exe, |_| {}))
        .err()
        .expect("a worker that exits must fail start-up");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains("worker rank 1") && msg.contains("exited"),
        "{msg}"
    );
    // No executable at all.
    let err = LLM::new(
        fixture().to_str().unwrap(),
        args(2, Path::new("/nonexistent/nanovllm"), |_| {}),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("cannot start"), "{err}");
    // A group size that does not divide the heads is refused before anything starts.
    let err = LLM::new(fixture().to_str().unwrap(), args(3, &exe(), |_| {}))
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not divide"), "{err}");
    assert_eq!(leftover_shm(), Vec::<PathBuf>::new());
}

#[test]
fn interrupting_the_cli_ends_its_workers() {
    let _g = serial();
    // A generation long enough to be interrupted in the middle (dummy Qwen3-0.6B, as the
    // tiny fixture has no tokenizer).
    let mut child = Command::new(exe())
        .args([
            "generate",
            "--device",
            "cpu",
            "--tp",
            "2",
            "--model",
            "qwen3-0.6b",
        ])
        .args(["--max-model-len", "2048", "--max-num-seqs", "4"])
        .args([
            "--max-num-batched-tokens",
            "2048",
            "--num-kvcache-blocks",
            "8",
        ])
        .args(["--prompt", "Hello", "--max-tokens", "2000", "--ignore-eos"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rank0 = child.id();
    let worker = || -> Option<u32> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == rank0).then_some(pid)
        })
    };
    let mut wpid = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            wpid = worker();
            wpid.is_some()
        }),
        "no worker process appeared"
    );
    let wpid = wpid.unwrap();
    // Let start-up finish and generation begin.
    std::thread::sleep(Duration::from_millis(4000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the benchmark ended too soon to test"
    );
    Command::new("kill")
        .args(["-INT", &rank0.to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        wait_until(Duration::from_secs(5), || !running(wpid)),
        "worker {wpid} outlived rank 0"
    );
    assert_eq!(shm_files_of(rank0), Vec::<PathBuf>::new());
}
