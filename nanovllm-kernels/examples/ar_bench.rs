//! ar_bench: times the tensor-parallel collectives of a decode step on the GPUs of one host,
//! at the sizes the Qwen3 models send: the all-reduce after a row-parallel linear (`rows x
//! hidden` bf16), the same followed by `add_rms_norm`, and the two fused in one kernel
//! (`NcclComm::all_reduce_add_rms_norm`). Run on a machine with two GPUs or more
//! (`scripts/gpu/tp.sh`, part `ar`).
//!
//! Rank 0 (the process started by hand) makes the NCCL id and starts ranks 1..N-1 as child
//! processes of the same executable (`--rank R --ranks N --id HEX`): the one-shot all-reduce
//! shares memory through CUDA IPC, which needs one process per GPU. Every rank then runs the
//! same calls: for each shape and op, warm-up calls, `CALLS` calls captured into one CUDA graph
//! (as a decode step captures them), and the graph replayed between CUDA events; rank 0 prints
//! the median time per call. `NANOVLLM_CUSTOM_ALLREDUCE=0` in the environment (inherited by
//! the children) times NCCL alone; `NANOVLLM_PDL=0` turns off programmatic dependent launch.
//! `AR_BENCH_RANKS` sets N (default 2).
//!
//! A second table times prefill-sized row-parallel products of Qwen3-8B at tp 2 (eagerly, as
//! prefill runs them): the product alone, its all-reduce alone, the two in a row, and
//! `NcclComm::gemm_all_reduce`, which overlaps the parts' all-reduces with the next parts'
//! products through the copy engines (parts of `NANOVLLM_AR_OVERLAP_ROWS` rows).
//! `AR_BENCH_TABLES` picks the tables (`decode`, `prefill`; default both).
//!
//! The calls repeat on the same buffers, so the values grow without bound (to inf and NaN):
//! only the time is meaningful here; `scripts/gpu/tp.sh` (part `equal`) checks the values.

use std::process::{Child, Command};

use nanovllm_kernels::cuda::{device_count, nccl_unique_id, CudaBackend, NcclComm, NCCL_ID_BYTES};
use nanovllm_kernels::{bf16, Backend};
use nanovllm_utils::{Error, Result};

/// (m, n, k) of the prefill table: Qwen3-8B's o_proj and down_proj at tp 2.
const PREFILL_SHAPES: [(usize, usize, usize); 4] = [
    (4096, 4096, 2048),
    (4096, 4096, 6144),
    (16_384, 4096, 2048),
    (16_384, 4096, 6144),
];

/// Collective calls per captured graph: about one decode step of Qwen3-8B (two per layer).
const CALLS: usize = 72;
/// Timed replays of the graph; the median is reported.
const REPLAYS: usize = 15;
/// (rows, hidden): decode batches of Qwen3-8B (hidden 4096) and Qwen3-0.6B (hidden 1024), then
/// prefill steps of Qwen3-8B (1,024 rows: the one-shot kernel's largest message; 4,096 and
/// 16,384 rows: NCCL's).
const SHAPES: [(usize, usize); 11] = [
    (1, 4096),
    (16, 4096),
    (64, 4096),
    (256, 4096),
    (512, 4096),
    (1, 1024),
    (64, 1024),
    (256, 1024),
    (1024, 4096),
    (4096, 4096),
    (16_384, 4096),
];

fn main() {
    if let Err(e) = real_main() {
        eprintln!("ar_bench: {e}");
        std::process::exit(1);
    }
}

/// `--rank R --ranks N --id HEX` for a child; `None` for rank 0.
fn child_args() -> Result<Option<(usize, usize, [u8; NCCL_ID_BYTES])>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::Other(format!(
            "usage: ar_bench [--rank R --ranks N --id HEX], got {args:?}"
        ))
    };
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .ok_or_else(bad)
    };
    let rank = value("--rank")?.parse().map_err(|_| bad())?;
    let ranks = value("--ranks")?.parse().map_err(|_| bad())?;
    let hex = value("--id")?;
    let mut id = [0u8; NCCL_ID_BYTES];
    if hex.len() != 2 * NCCL_ID_BYTES {
        return Err(bad());
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(Some((rank, ranks, id)))
}

fn real_main() -> Result<()> {
    let (rank, ranks, id, mut children) = match child_args()? {
        Some((rank, ranks, id)) => (rank, ranks, id, Vec::new()),
        None => {
            let ranks: usize = std::env::var("AR_BENCH_RANKS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2);
            let have = device_count()?;
            if ranks < 2 || ranks > have {
                return Err(Error::Other(format!(
                    "{ranks} ranks need as many GPUs (2 at least); the driver reports {have}"
                )));
            }
            let id = nccl_unique_id()?;
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let exe = std::env::current_exe()
                .map_err(|e| Error::Other(format!("cannot find this executable: {e}")))?;
            let children: Vec<Child> = (1..ranks)
                .map(|r| {
                    Command::new(&exe)
                        .args(["--rank", &r.to_string(), "--ranks", &ranks.to_string()])
                        .args(["--id", &hex])
                        .spawn()
                        .map_err(|e| Error::Other(format!("cannot start rank {r}: {e}")))
                })
                .collect::<Result<_>>()?;
            (0, ranks, id, children)
        }
    };
    let result = run(rank, ranks, &id);
    for c in children.iter_mut() {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(Error::Other(format!("a child rank ended with {s}"))),
            Err(e) => return Err(Error::Other(format!("waiting for a child rank: {e}"))),
        }
    }
    result
}

fn run(rank: usize, ranks: usize, id: &[u8; NCCL_ID_BYTES]) -> Result<()> {
    let be = CudaBackend::new(rank)?;
    let comm = NcclComm::new(&be, rank, ranks, id)?;
    let tables = std::env::var("AR_BENCH_TABLES").unwrap_or_else(|_| "decode prefill".into());
    if tables.contains("decode") {
        decode_table(&be, &comm, rank, ranks)?;
    }
    if tables.contains("prefill") {
        prefill_table(&be, &comm, rank)?;
    }
    comm.check()
}

/// The prefill table (see the module documentation).
fn prefill_table(be: &CudaBackend, comm: &NcclComm, rank: usize) -> Result<()> {
    if rank == 0 {
        println!(
            "prefill products at tp 2, median of {REPLAYS} eager calls; \
             NANOVLLM_AR_OVERLAP_ROWS={}",
            env_or_dash("NANOVLLM_AR_OVERLAP_ROWS"),
        );
        println!(
            "{:>6} {:>6} {:>6} {:>11} {:>11} {:>11} {:>11}",
            "m", "n", "k", "gemm", "all-reduce", "in a row", "overlapped"
        );
    }
    for (m, n, k) in PREFILL_SHAPES {
        let host = |len: usize, seed: usize| -> Vec<bf16> {
            (0..len)
                .map(|i| bf16::from_f32(((i * 7919 + seed * 104_729) % 2001) as f32 / 1e5))
                .collect()
        };
        let x = be.from_host(&host(m * k, rank))?;
        let w = be.from_host(&host(n * k, 7 + rank))?;
        let mut out = be.alloc::<bf16>(m * n)?;
        let gemm = time_eager(be, &mut || be.gemm(&x, &w, m, n, k, &mut out))?;
        let ar = time_eager(be, &mut || comm.all_reduce_sum(&mut out, m * n))?;
        let row = time_eager(be, &mut || {
            be.gemm(&x, &w, m, n, k, &mut out)?;
            comm.all_reduce_sum(&mut out, m * n)
        })?;
        let overlapped = time_eager(be, &mut || {
            comm.gemm_all_reduce(be, &x, &w, m, n, k, &mut out)
        })?;
        if rank == 0 {
            let us = |s: f64| format!("{:.1} us", s * 1e6);
            println!(
                "{m:>6} {n:>6} {k:>6} {:>11} {:>11} {:>11} {:>11}",
                us(gemm),
                us(ar),
                us(row),
                us(overlapped)
            );
        }
    }
    Ok(())
}

fn env_or_dash(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| "-".into())
}

/// Median seconds of one eager call of `f` (every rank makes the same calls).
fn time_eager(be: &CudaBackend, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    be.synchronize()?;
    median(be, 1, f)
}

/// Median over `REPLAYS` runs of `run`, timed between CUDA events, of the seconds per call when
/// each run makes `calls` calls.
fn median(be: &CudaBackend, calls: usize, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(REPLAYS);
    for _ in 0..REPLAYS {
        times.push(be.time(run)? / calls as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[REPLAYS / 2])
}

/// The decode table (see the module documentation).
fn decode_table(be: &CudaBackend, comm: &NcclComm, rank: usize, ranks: usize) -> Result<()> {
    if rank == 0 {
        println!(
            "ar_bench: {ranks} x {}, {} all-reduce, PDL {}; {CALLS} calls per graph, median of \
             {REPLAYS} replays",
            be.device_name()?,
            if comm.uses_custom_all_reduce() {
                "one-shot (custom)"
            } else {
                "NCCL"
            },
            if nanovllm_kernels::cuda::pdl_enabled() {
                "on"
            } else {
                "off"
            },
        );
        println!(
            "{:>6} {:>7} {:>12} {:>12} {:>12} {:>12}",
            "rows", "hidden", "all-reduce", "+add_norm", "fused", "add_norm"
        );
    }
    for (rows, hidden) in SHAPES {
        let len = rows * hidden;
        let host: Vec<bf16> = (0..len)
            .map(|i| bf16::from_f32(((i * 7919 + rank * 104_729) % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        let mut x = be.from_host(&host)?;
        let mut residual = be.from_host(&host)?;
        let weight = be.from_host(&host[..hidden])?;
        let eps = 1e-6;
        let ar = time(be, &mut || comm.all_reduce_sum(&mut x, len))?;
        let pair = time(be, &mut || {
            comm.all_reduce_sum(&mut x, len)?;
            be.add_rms_norm(&mut x, &mut residual, &weight, rows, hidden, eps)
        })?;
        let fused = time(be, &mut || {
            comm.all_reduce_add_rms_norm(be, &mut x, &mut residual, &weight, rows, hidden, eps)
        })?;
        let norm = time(be, &mut || {
            be.add_rms_norm(&mut x, &mut residual, &weight, rows, hidden, eps)
        })?;
        if rank == 0 {
            let us = |s: f64| format!("{:.2} us", s * 1e6);
            println!(
                "{rows:>6} {hidden:>7} {:>12} {:>12} {:>12} {:>12}",
                us(ar),
                us(pair),
                us(fused),
                us(norm)
            );
        }
    }
    Ok(())
}

/// Median seconds per call of `f`, replayed from a CUDA graph of `CALLS` calls. Every rank
/// makes the same calls in the same order.
fn time(be: &CudaBackend, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    be.synchronize()?;
    let graph = be.capture(|| (0..CALLS).try_for_each(|_| f()))?;
    graph.replay()?;
    be.synchronize()?;
    median(be, CALLS, &mut || graph.replay())
}
