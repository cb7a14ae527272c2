//! Tensor parallelism from the facade: how `LLM::new` with `tensor_parallel_size > 1` starts
//! the worker processes and builds rank 0's runner, and what a worker process (`nanovllm
//! worker`, started by rank 0, never by hand) runs.
//!
//! Start-up, on rank 0: check the devices (enough GPUs, NCCL loads) before any weight is read;
//! create the shared memory and write the start-up message (`WorkerInit`: model, device,
//! engine options, NCCL id) as its first command; start ranks 1..N-1; build rank 0's runner
//! while the workers build theirs (the KV-cache size is agreed inside); wait until every
//! worker is ready. The shared-memory file is removed as soon as every worker has mapped it
//! (the mappings live on), so no way of ending the processes leaves it behind. On the GPU the
//! collectives are NCCL's; on the CPU backend they go through the shared memory
//! ([`nanovllm_engine::shm_comm::ShmComm`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanovllm_engine::model_runner::{LoadFormat, ModelRunner};
use nanovllm_engine::shm::WorkerState;
use nanovllm_engine::shm_comm::ShmComm;
use nanovllm_engine::worker::{default_worker_exe, WorkerEndpoint, WorkerGroup};
use nanovllm_kernels::cpu::CpuBackend;
use nanovllm_kernels::Backend;
use nanovllm_layers::tp::TpComm;
use nanovllm_utils::{EngineConfig, Error, ModelConfig, Result};
use serde::{Deserialize, Serialize};

use crate::llm::{resolve_model, BuiltRunner, ModelSource, WeightsFormat};

/// The first command every worker receives: enough to build the same runner as rank 0.
#[derive(Serialize, Deserialize)]
struct WorkerInit {
    model: String,
    load_format: WeightsFormat,
    dummy_seed: u64,
    config: EngineConfig,
    /// GPU ordinal of rank 0 (rank r uses `cuda_base + r`); `None` on the CPU backend.
    cuda_base: Option<usize>,
    /// NCCL unique id from rank 0 (GPU only).
    nccl_id: Vec<u8>,
}

fn load_format(src: &ModelSource, seed: u64) -> LoadFormat {
    if src.dummy {
        LoadFormat::Dummy { seed }
    } else {
        LoadFormat::Safetensors
    }
}

/// Bytes of the largest command rank 0 sends: every per-token and per-sequence input array
/// at its limit, plus the start-up message.
fn call_capacity(config: &EngineConfig) -> usize {
    let t = config.max_num_batched_tokens.max(config.max_model_len);
    let s = config.max_num_seqs;
    let blocks = config.max_model_len.div_ceil(config.kvcache_block_size);
    let words = 3 * t + 2 * (s + 1) + s * blocks + 8 * s;
    words * 4 + s * 8 + 4096 + (64 << 10)
}

/// Bytes of one rank's collective slot on the CPU backend: the largest all-reduce (the
/// residual stream of a full step) or logits gather.
fn slot_bytes(model: &ModelConfig, config: &EngineConfig) -> usize {
    let t = config.max_num_batched_tokens.max(config.max_model_len);
    let rows = config.max_num_seqs;
    let tp = config.tensor_parallel_size;
    2 * (t * model.hidden_size).max(rows * model.vocab_size.div_ceil(tp)) + 64
}

/// Rank 0: starts the workers and builds this process's runner. `cuda_base` is the GPU of
/// rank 0 (`None`: the CPU backend).
pub(crate) fn build_tp_runner(
    model: &str,
    format: WeightsFormat,
    dummy_seed: u64,
    worker_exe: Option<&Path>,
    src: &ModelSource,
    config: &EngineConfig,
    cuda_base: Option<usize>,
) -> Result<BuiltRunner> {
    let tp = config.tensor_parallel_size;
    let exe: PathBuf = match worker_exe {
        Some(p) => p.to_path_buf(),
        None => default_worker_exe()?,
    };
    let init = |nccl_id: Vec<u8>| -> Result<Vec<u8>> {
        serde_json::to_vec(&WorkerInit {
            model: model.to_string(),
            load_format: format,
            dummy_seed,
            config: config.clone(),
            cuda_base,
            nccl_id,
        })
        .map_err(|e| Error::Other(format!("encoding the worker start-up message: {e}")))
    };
    let lf = load_format(src, dummy_seed);
    match cuda_base {
        None => {
            let group = WorkerGroup::spawn(
                &exe,
                tp,
                call_capacity(config),
                slot_bytes(&src.config, config),
                &init(Vec::new())?,
            )?;
            group.wait_for(WorkerState::Started)?;
            group.region().unlink();
            let comm = ShmComm::new(Arc::clone(group.region()), 0, Some(group.liveness()))?;
            let be = Arc::new(CpuBackend::new());
            finish(be, Arc::new(comm), src, config, &lf, group, true)
        }
        Some(base) => cuda_rank0(base, &exe, init, src, config, &lf),
    }
}

#[cfg(feature = "cuda")]
fn cuda_rank0(
    base: usize,
    exe: &Path,
    init: impl Fn(Vec<u8>) -> Result<Vec<u8>>,
    src: &ModelSource,
    config: &EngineConfig,
    lf: &LoadFormat,
) -> Result<BuiltRunner> {
    use nanovllm_kernels::cuda::{device_count, nccl_unique_id, CudaBackend, NcclComm};
    let tp = config.tensor_parallel_size;
    let count = device_count()?;
    if base + tp > count {
        return Err(Error::EngineConfig {
            option: "tensor_parallel_size",
            msg: format!(
                "--tp {tp} from cuda:{base} needs GPUs {base}..{} but the driver reports {count}",
                base + tp - 1
            ),
        });
    }
    let be = Arc::new(CudaBackend::new(base)?);
    let id = nccl_unique_id()?;
    let group = WorkerGroup::spawn(exe, tp, call_capacity(config), 0, &init(id.to_vec())?)?;
    // Every worker has its GPU up before anyone blocks in the NCCL rendezvous.
    group.wait_for(WorkerState::Started)?;
    group.region().unlink();
    // ncclCommInitRank waits for every rank: it runs on its own thread while this one watches
    // the workers, so a worker that dies in the rendezvous is an error here, not a hang (the
    // blocked thread is left behind).
    let (tx, rx) = std::sync::mpsc::channel();
    let init_be = Arc::clone(&be);
    std::thread::spawn(move || {
        let _ = tx.send(NcclComm::new(&init_be, 0, tp, &id));
    });
    let comm = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(20)) {
            Ok(comm) => break Arc::new(comm?),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => group.check()?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Cuda(
                    "NCCL init: the init thread ended without a result".into(),
                ))
            }
        }
    };
    let aborter = Arc::clone(&comm);
    group.on_worker_death(move || aborter.abort());
    finish(be, comm, src, config, lf, group, false)
}

#[cfg(not(feature = "cuda"))]
fn cuda_rank0(
    _base: usize,
    _exe: &Path,
    _init: impl Fn(Vec<u8>) -> Result<Vec<u8>>,
    _src: &ModelSource,
    _config: &EngineConfig,
    _lf: &LoadFormat,
) -> Result<BuiltRunner> {
    Err(Error::Cuda(
        "this build has no CUDA support (built without the `cuda` feature); use --device cpu"
            .into(),
    ))
}

/// Builds rank 0's runner, waits for the workers, and hands them to the runner.
fn finish<B: Backend>(
    be: Arc<B>,
    comm: Arc<dyn TpComm<B>>,
    src: &ModelSource,
    config: &EngineConfig,
    lf: &LoadFormat,
    group: WorkerGroup,
    is_cpu: bool,
) -> Result<BuiltRunner> {
    let mut runner = ModelRunner::new_tp(
        Arc::clone(&be),
        comm,
        &src.config,
        config,
        src.dir.as_deref(),
        lf,
    )?;
    group.wait_for(WorkerState::Ready)?;
    runner.attach_workers(group);
    let device = format!(
        "{} (+{} workers)",
        be.name(),
        config.tensor_parallel_size - 1
    );
    Ok(BuiltRunner::new(runner, be, device, is_cpu))
}

/// A worker process: maps the shared memory at `shm` as `rank`, builds its shard of the model
/// as the start-up message says, and serves rank 0's commands until told to exit. A failure
/// is reported to rank 0 (which turns it into its own error) before this returns it.
pub fn run_worker(shm: &Path, rank: usize) -> Result<()> {
    let mut ep = WorkerEndpoint::open(shm, rank)?;
    let result = serve_worker(&mut ep);
    if let Err(e) = &result {
        ep.fail(&e.to_string());
    }
    result
}

fn serve_worker(ep: &mut WorkerEndpoint) -> Result<()> {
    let init: WorkerInit = serde_json::from_slice(&ep.recv()?)
        .map_err(|e| Error::Worker(format!("bad start-up message: {e}")))?;
    let src = resolve_model(&init.model, init.load_format)?;
    let lf = load_format(&src, init.dummy_seed);
    let rank = ep.rank();
    match init.cuda_base {
        None => {
            let comm = ShmComm::new(Arc::clone(ep.region()), rank, None)?;
            ep.report(WorkerState::Started, 0);
            serve_rank(
                Arc::new(CpuBackend::new()),
                Arc::new(comm),
                &src,
                &init.config,
                &lf,
                ep,
            )
        }
        Some(base) => cuda_worker(base, &init, &src, &lf, ep),
    }
}

#[cfg(feature = "cuda")]
fn cuda_worker(
    base: usize,
    init: &WorkerInit,
    src: &ModelSource,
    lf: &LoadFormat,
    ep: &mut WorkerEndpoint,
) -> Result<()> {
    use nanovllm_kernels::cuda::{CudaBackend, NcclComm, NCCL_ID_BYTES};
    let rank = ep.rank();
    let be = Arc::new(CudaBackend::new(base + rank)?);
    ep.report(WorkerState::Started, 0);
    let id: [u8; NCCL_ID_BYTES] = init
        .nccl_id
        .as_slice()
        .try_into()
        .map_err(|_| Error::Worker(format!("NCCL id of {} bytes", init.nccl_id.len())))?;
    let comm = Arc::new(NcclComm::new(
        &be,
        rank,
        init.config.tensor_parallel_size,
        &id,
    )?);
    serve_rank(be, comm, src, &init.config, lf, ep)
}

#[cfg(not(feature = "cuda"))]
fn cuda_worker(
    _base: usize,
    _init: &WorkerInit,
    _src: &ModelSource,
    _lf: &LoadFormat,
    _ep: &mut WorkerEndpoint,
) -> Result<()> {
    Err(Error::Cuda("this build has no CUDA support".into()))
}

fn serve_rank<B: Backend>(
    be: Arc<B>,
    comm: Arc<dyn TpComm<B>>,
    src: &ModelSource,
    config: &EngineConfig,
    lf: &LoadFormat,
    ep: &mut WorkerEndpoint,
) -> Result<()> {
    let mut runner = ModelRunner::new_tp(be, comm, &src.config, config, src.dir.as_deref(), lf)?;
    ep.report(WorkerState::Ready, runner.stats().num_kvcache_blocks as u64);
    runner.serve(ep)
}
