//! ModelRunner: turns a scheduled batch of sequences into one forward pass and one sampled
//! token per sequence.
//!
//! Flow: `LLMEngine::step` -> `Scheduler::schedule` -> [`ModelRunner::run_step`] ->
//! `prepare_prefill` / `prepare_decode` (host vectors copied into fixed device buffers) ->
//! `Qwen3ForCausalLM::forward` -> `compute_logits` -> `Sampler` -> token ids back to the host.
//!
//! Everything the hot path touches is allocated once in [`ModelRunner::new`], sized from the
//! engine config (`max_num_batched_tokens`, `max_num_seqs`, `max_model_len`): the KV cache, the
//! activations, the step's input buffers. Decode steps on a backend with graphs replay a CUDA
//! graph captured per batch-size bucket (1, 2, 4, 8, 16, 32, ..., as nano-vLLM), after copying the
//! step's inputs into the same buffers the graph was captured with.
//!
//! With tensor parallelism every rank has a `ModelRunner` over its shard ([`ModelRunner::new_tp`]).
//! Rank 0's also holds the [`WorkerGroup`]: after preparing a step's inputs it sends them to the
//! workers, whose runners ([`ModelRunner::serve`]) upload them and run the same forward pass;
//! the collectives inside meet across ranks, and only rank 0 samples.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use half::bf16;
use nanovllm_kernels::{Backend, Elem, GraphExec, SamplingBufs};
use nanovllm_layers::context::Context;
use nanovllm_layers::tp::{SingleRank, TpComm};
use nanovllm_models::qwen3::{KvCache, Qwen3ForCausalLM, Workspace};
use nanovllm_utils::{EngineConfig, Error, ModelConfig, Result, Weights};

use crate::llm_engine::{RunnerProfile, StepRunner};
use crate::sequence::Sequence;
use crate::worker::{Call, StepCall, StepKind, WorkerEndpoint, WorkerGroup};

/// Where the weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadFormat {
    /// Safetensors files in the model folder.
    Safetensors,
    /// Seeded random weights from config.json alone (as vLLM's `--load-format dummy`).
    Dummy {
        /// Seed of the weight RNG.
        seed: u64,
    },
}

/// Memory kept free on the device beside weights, activations and KV cache: cuBLASLt's
/// workspace, the attention split-K scratch, CUDA graphs and the driver's own needs.
const RESERVED_BYTES: usize = 768 << 20;

/// The step's inputs on the device: fixed buffers, rewritten every step.
struct StepBuffers<B: Backend> {
    input_ids: B::Buf<u32>,
    positions: B::Buf<i32>,
    slot_mapping: B::Buf<i32>,
    cu_seqlens_q: B::Buf<i32>,
    cu_seqlens_k: B::Buf<i32>,
    context_lens: B::Buf<i32>,
    block_tables: B::Buf<i32>,
    logits_indices: B::Buf<i32>,
    temperatures: B::Buf<f32>,
    top_k: B::Buf<i32>,
    top_p: B::Buf<f32>,
    seeds: B::Buf<u64>,
    steps: B::Buf<u32>,
}

/// Input arrays of a step command ([`HostInputs::as_bytes`]).
const STEP_ARRAYS: usize = 13;

/// The same inputs on the host, reused from step to step.
#[derive(Debug, Default, PartialEq)]
struct HostInputs {
    input_ids: Vec<u32>,
    positions: Vec<i32>,
    slot_mapping: Vec<i32>,
    cu_seqlens_q: Vec<i32>,
    cu_seqlens_k: Vec<i32>,
    context_lens: Vec<i32>,
    block_tables: Vec<i32>,
    logits_indices: Vec<i32>,
    temperatures: Vec<f32>,
    top_k: Vec<i32>,
    top_p: Vec<f32>,
    seeds: Vec<u64>,
    steps: Vec<u32>,
}

impl HostInputs {
    fn clear(&mut self) {
        self.input_ids.clear();
        self.positions.clear();
        self.slot_mapping.clear();
        self.cu_seqlens_q.clear();
        self.cu_seqlens_k.clear();
        self.context_lens.clear();
        self.block_tables.clear();
        self.logits_indices.clear();
        self.temperatures.clear();
        self.top_k.clear();
        self.top_p.clear();
        self.seeds.clear();
        self.steps.clear();
    }

    fn push_sampling(&mut self, seq: &Sequence) {
        let p = &seq.params;
        self.temperatures.push(p.temperature);
        self.top_k.push(p.top_k.min(i32::MAX as usize) as i32);
        self.top_p.push(p.top_p);
        self.seeds.push(seq.seed);
        self.steps.push(seq.num_completion_tokens() as u32);
    }

    /// The inputs as plain bytes, in the order [`HostInputs::take_call`] reads them.
    fn as_bytes(&self) -> [&[u8]; STEP_ARRAYS] {
        use bytemuck::cast_slice as b;
        [
            b(&self.input_ids),
            b(&self.positions),
            b(&self.slot_mapping),
            b(&self.cu_seqlens_q),
            b(&self.cu_seqlens_k),
            b(&self.context_lens),
            b(&self.block_tables),
            b(&self.logits_indices),
            b(&self.temperatures),
            b(&self.top_k),
            b(&self.top_p),
            b(&self.seeds),
            b(&self.steps),
        ]
    }

    /// Takes the inputs of a command from rank 0 into the vectors of the previous step (no
    /// allocation once they are large enough); returns the batch's shape.
    fn take_call(&mut self, call: &StepCall<'_>) -> Result<BatchShape> {
        if call.arrays.len() != STEP_ARRAYS {
            return Err(Error::Worker(format!(
                "step command with {} input arrays, expected {STEP_ARRAYS}",
                call.arrays.len()
            )));
        }
        let a = &call.arrays;
        fill_pod(&mut self.input_ids, a[0])?;
        fill_pod(&mut self.positions, a[1])?;
        fill_pod(&mut self.slot_mapping, a[2])?;
        fill_pod(&mut self.cu_seqlens_q, a[3])?;
        fill_pod(&mut self.cu_seqlens_k, a[4])?;
        fill_pod(&mut self.context_lens, a[5])?;
        fill_pod(&mut self.block_tables, a[6])?;
        fill_pod(&mut self.logits_indices, a[7])?;
        fill_pod(&mut self.temperatures, a[8])?;
        fill_pod(&mut self.top_k, a[9])?;
        fill_pod(&mut self.top_p, a[10])?;
        fill_pod(&mut self.seeds, a[11])?;
        fill_pod(&mut self.steps, a[12])?;
        let [num_tokens, num_seqs, max_seqlen_q, max_seqlen_k, num_logits] =
            call.shape.map(|v| v as usize);
        Ok(BatchShape {
            num_tokens,
            num_seqs,
            max_seqlen_q,
            max_seqlen_k,
            num_logits,
        })
    }

    /// Whether a row draws with a top-k or top-p cut (over a vocabulary of `vocab`): such a
    /// row needs its whole logits, so a tensor-parallel group gathers them to rank 0 instead
    /// of sampling each rank's slice (see [`ModelRunner::run_ops`]).
    fn has_cut(&self, vocab: usize) -> bool {
        self.temperatures
            .iter()
            .zip(self.top_k.iter().zip(&self.top_p))
            .any(|(&t, (&k, &p))| t > 0.0 && ((k > 0 && (k as usize) < vocab) || p < 1.0))
    }

    /// Pads decode inputs to `rows` rows with harmless rows: token 0, slot -1, context 0.
    fn pad_decode(&mut self, rows: usize, max_blocks_per_seq: usize) {
        let n = self.input_ids.len();
        self.input_ids.resize(rows, 0);
        self.positions.resize(rows, 0);
        self.slot_mapping.resize(rows, -1);
        self.context_lens.resize(rows, 0);
        self.block_tables.resize(rows * max_blocks_per_seq, -1);
        self.logits_indices.clear();
        self.logits_indices.extend(0..rows as i32);
        self.temperatures.resize(rows, 0.0);
        self.top_k.resize(rows, 0);
        self.top_p.resize(rows, 1.0);
        self.seeds.resize(rows, 0);
        self.steps.resize(rows, 0);
        debug_assert!(n <= rows);
    }
}

/// The shape of one step's batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct BatchShape {
    num_tokens: usize,
    num_seqs: usize,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    /// Rows of logits: one per sequence, or every token when scoring.
    num_logits: usize,
}

/// The smallest prefill [`ModelRunner::warm_up_prefill`] runs: the smallest product the CUDA
/// backend tunes as a prefill (`GemmTuning::WhereItPays`).
const PREFILL_WARM_UP_MIN: usize = 1024;

/// Sizes fixed at start-up that shape every step.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_num_tokens: usize,
    max_num_seqs: usize,
    max_model_len: usize,
    block_size: usize,
    max_blocks_per_seq: usize,
}

/// What [`ModelRunner::new`] found and set up, for logs and the benchmark report.
#[derive(Clone, Debug, Default)]
pub struct RunnerStats {
    /// Bytes of model weights on this rank.
    pub weight_bytes: usize,
    /// KV-cache blocks allocated.
    pub num_kvcache_blocks: usize,
    /// Bytes of KV cache allocated.
    pub kvcache_bytes: usize,
    /// Decode batch sizes with a captured graph.
    pub graph_batch_sizes: Vec<usize>,
    /// Seconds spent loading or generating weights.
    pub load_seconds: f64,
    /// Seconds spent capturing graphs.
    pub capture_seconds: f64,
    /// Seconds spent in the start-up prefills (one per GEMM tuning size; see `ModelRunner::new`).
    pub prefill_warm_up_seconds: f64,
}

/// Runs the model for the engine: owns the backend, the model, the KV cache and the step
/// buffers (nano-vLLM's `ModelRunner`).
pub struct ModelRunner<B: Backend> {
    be: Arc<B>,
    model: Qwen3ForCausalLM<B>,
    kv: KvCache<B>,
    ws: Workspace<B>,
    bufs: StepBuffers<B>,
    sampled: B::Buf<u32>,
    host: HostInputs,
    /// The bytes each step input buffer last received ([`HostInputs::as_bytes`] order).
    uploaded: [Vec<u8>; STEP_ARRAYS],
    sampled_host: Vec<u32>,
    limits: Limits,
    vocab_size: usize,
    /// Captured decode graphs, ascending by batch size. With tensor parallelism they sample
    /// each rank's vocabulary slice; the variants that gather whole rows (for batches with a
    /// top-k / top-p cut) are captured the first time a batch needs one, in
    /// `whole_row_graphs`.
    graphs: Vec<(usize, Box<dyn GraphExec>)>,
    whole_row_graphs: Vec<(usize, Box<dyn GraphExec>)>,
    /// With tensor parallelism: every rank's best candidates of each row,
    /// `[tp, 2, max_num_seqs]` ([`Backend::sample_shard`]).
    sample_parts: B::Buf<u32>,
    stats: RunnerStats,
    profile: RunnerProfile,
    /// Rank 0 of a tensor-parallel group: the other ranks' processes, and the buffer each
    /// step's command is encoded into.
    workers: Option<WorkerGroup>,
    call_buf: Vec<u8>,
}

impl<B: Backend> StepBuffers<B> {
    fn new(be: &B, l: &Limits) -> Result<Self> {
        let (t, s) = (l.max_num_tokens, l.max_num_seqs);
        Ok(StepBuffers {
            input_ids: be.zeros(t)?,
            positions: be.zeros(t)?,
            slot_mapping: be.zeros(t)?,
            cu_seqlens_q: be.zeros(s + 1)?,
            cu_seqlens_k: be.zeros(s + 1)?,
            context_lens: be.zeros(s)?,
            block_tables: be.zeros(s * l.max_blocks_per_seq)?,
            logits_indices: be.zeros(s)?,
            temperatures: be.zeros(s)?,
            top_k: be.zeros(s)?,
            top_p: be.zeros(s)?,
            seeds: be.zeros(s)?,
            steps: be.zeros(s)?,
        })
    }
}

impl<B: Backend> ModelRunner<B> {
    /// Loads the model onto `be`, sizes and allocates the KV cache, runs one warm-up prefill
    /// per GEMM tuning size (backends with graphs only: their GEMMs time cuBLASLt's candidates
    /// on a shape's first call), and captures the decode graphs (unless `config.enforce_eager`
    /// or the backend has none).
    pub fn new(
        be: Arc<B>,
        model_config: &ModelConfig,
        config: &EngineConfig,
        weights_dir: Option<&Path>,
        load_format: &LoadFormat,
    ) -> Result<Self> {
        let comm: Arc<dyn TpComm<B>> = Arc::new(SingleRank);
        Self::new_tp(be, comm, model_config, config, weights_dir, load_format)
    }

    /// [`ModelRunner::new`] for one rank of a tensor-parallel group: loads this rank's shard,
    /// agrees with the other ranks on the KV-cache size (the smallest any rank can hold), and
    /// captures the graphs (collectives included). Every rank must call it with the same
    /// arguments but its own `be` and `comm`.
    pub fn new_tp(
        be: Arc<B>,
        comm: Arc<dyn TpComm<B>>,
        model_config: &ModelConfig,
        config: &EngineConfig,
        weights_dir: Option<&Path>,
        load_format: &LoadFormat,
    ) -> Result<Self> {
        let tp = comm.size();
        let mut model = Qwen3ForCausalLM::new(&*be, model_config, comm)?;
        let t = Instant::now();
        match load_format {
            LoadFormat::Dummy { seed } => model.load_dummy(&*be, *seed)?,
            LoadFormat::Safetensors => {
                let dir = weights_dir.ok_or_else(|| {
                    Error::Other("the safetensors load format needs a model folder".into())
                })?;
                model.load_weights(&*be, &Weights::open(dir)?)?;
            }
        }
        be.synchronize()?;
        let load_seconds = t.elapsed().as_secs_f64();

        let block_size = config.kvcache_block_size;
        let max_model_len = config.max_model_len;
        let limits = Limits {
            max_num_tokens: config.max_num_batched_tokens.max(max_model_len),
            max_num_seqs: config.max_num_seqs,
            max_model_len,
            block_size,
            max_blocks_per_seq: max_model_len.div_ceil(block_size),
        };
        let ws = Workspace::new(&*be, &model, limits.max_num_tokens, limits.max_num_seqs)?;
        let bufs = StepBuffers::new(&*be, &limits)?;
        let sampled = be.zeros(limits.max_num_seqs)?;
        let sample_parts = be.zeros(if tp > 1 {
            tp * 2 * limits.max_num_seqs
        } else {
            1
        })?;

        let block_bytes = KvCache::<B>::bytes_per_block(model_config, tp, block_size);
        let mut num_blocks = match config.num_kvcache_blocks {
            Some(n) => n,
            None => {
                let (free, total) = be.memory_info()?;
                let used = total.saturating_sub(free);
                let budget = (total as f64 * config.gpu_memory_utilization as f64) as usize;
                budget.saturating_sub(used + RESERVED_BYTES) / block_bytes
            }
        };
        if tp > 1 {
            let agreed = model.comm().all_reduce_min(&*be, num_blocks as u64)?;
            num_blocks = agreed as usize;
        }
        let need = limits.max_blocks_per_seq;
        if config.num_kvcache_blocks.is_some() && num_blocks < need {
            return Err(Error::EngineConfig {
                option: "num_kvcache_blocks",
                msg: format!(
                    "{num_blocks} blocks of {block_size} tokens cannot hold one sequence of \
                     max_model_len {max_model_len}, which needs {need}"
                ),
            });
        }
        if num_blocks < need {
            let (free, total) = be.memory_info()?;
            return Err(Error::OutOfMemory(format!(
                "the KV cache needs at least {need} blocks ({:.2} GiB) to hold one sequence of \
                 max_model_len {max_model_len}, but only {num_blocks} fit on {} ({:.2} of \
                 {:.2} GiB free after weights and activations); lower --max-model-len or \
                 --max-num-batched-tokens, or raise --gpu-memory-utilization",
                gib(need * block_bytes),
                be.name(),
                gib(free),
                gib(total),
            )));
        }
        let kv = KvCache::new(&*be, model_config, tp, num_blocks, block_size)?;

        let mut runner = ModelRunner {
            be,
            model,
            kv,
            ws,
            bufs,
            sampled,
            host: HostInputs::default(),
            uploaded: Default::default(),
            sampled_host: Vec::new(),
            limits,
            vocab_size: model_config.vocab_size,
            graphs: Vec::new(),
            whole_row_graphs: Vec::new(),
            sample_parts,
            profile: RunnerProfile::default(),
            workers: None,
            call_buf: Vec::new(),
            stats: RunnerStats {
                weight_bytes: nanovllm_models::qwen3::weight_bytes_per_rank(model_config, tp),
                num_kvcache_blocks: num_blocks,
                kvcache_bytes: num_blocks * block_bytes,
                load_seconds,
                ..Default::default()
            },
        };
        // A backend without graphs (the CPU) answers an empty capture with `None`: it tunes
        // nothing and replays nothing, so it skips both the warm-up and the capture.
        if runner.be.capture_graph(&mut || Ok(()))?.is_some() {
            runner.warm_up_prefill()?;
            if !config.enforce_eager {
                runner.capture_graphs()?;
            }
        }
        Ok(runner)
    }

    /// Runs one eager prefill per power-of-two token count from [`PREFILL_WARM_UP_MIN`] up to
    /// the step limit (and the limit itself), as nano-vLLM's `warmup_model` runs one of the
    /// limit: each of those sizes is a GEMM tuning bucket (see `GemmTuning` in the CUDA
    /// backend), whose first product times cuBLASLt's candidates, tens of milliseconds per
    /// bucket that the first real prefills would otherwise pay. Sequences of at most
    /// `max_model_len` tokens, token 0, slots -1 (nothing is written to the KV cache), greedy
    /// sampling. Called only on backends with graphs (the GPU): the CPU backend tunes nothing.
    fn warm_up_prefill(&mut self) -> Result<()> {
        let t = Instant::now();
        let Limits {
            max_num_tokens,
            max_num_seqs,
            max_model_len,
            max_blocks_per_seq,
            ..
        } = self.limits;
        let mut sizes: Vec<usize> = std::iter::successors(Some(PREFILL_WARM_UP_MIN), |&n| {
            Some(n * 2).filter(|&n| n < max_num_tokens)
        })
        .filter(|&n| n < max_num_tokens)
        .collect();
        sizes.push(max_num_tokens);
        for tokens in sizes {
            let seq_len = max_model_len.min(tokens);
            let num_seqs = tokens.div_ceil(seq_len).min(max_num_seqs);
            let tokens = tokens.min(num_seqs * seq_len);
            let h = &mut self.host;
            h.clear();
            h.cu_seqlens_q.push(0);
            h.cu_seqlens_k.push(0);
            for i in 0..num_seqs {
                let len = seq_len.min(tokens - i * seq_len);
                h.input_ids.extend(std::iter::repeat_n(0, len));
                h.positions.extend(0..len as i32);
                h.slot_mapping.extend(std::iter::repeat_n(-1, len));
                let end = h.cu_seqlens_q.last().copied().unwrap_or(0) + len as i32;
                h.cu_seqlens_q.push(end);
                h.cu_seqlens_k.push(end);
                h.logits_indices.push(end - 1);
                h.block_tables
                    .extend(std::iter::repeat_n(-1, max_blocks_per_seq));
                h.temperatures.push(0.0);
                h.top_k.push(0);
                h.top_p.push(1.0);
                h.seeds.push(0);
                h.steps.push(0);
            }
            let shape = BatchShape {
                num_tokens: tokens,
                num_seqs,
                max_seqlen_q: seq_len,
                max_seqlen_k: seq_len,
                num_logits: num_seqs,
            };
            self.check_fits(&shape)?;
            self.upload(true)?;
            let sharded = self.shards_sampling();
            self.run_ops(true, shape, sharded)?;
        }
        self.be.synchronize()?;
        self.stats.prefill_warm_up_seconds = t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Makes this runner rank 0 of a tensor-parallel group: every later step is sent to
    /// `workers` first. Call once every rank's runner is ready.
    pub fn attach_workers(&mut self, workers: WorkerGroup) {
        self.workers = Some(workers);
    }

    /// The worker processes of rank 0 of a tensor-parallel group.
    pub fn workers(&self) -> Option<&WorkerGroup> {
        self.workers.as_ref()
    }

    /// Sends this step's prepared inputs to the workers, if any, then copies them to this
    /// rank's device: the workers' wake-up and copies overlap this rank's.
    fn send_and_upload(&mut self, kind: StepKind, shape: &BatchShape) -> Result<()> {
        self.send(kind, shape)?;
        self.upload(matches!(kind, StepKind::Prefill | StepKind::Score))
    }

    /// Sends this step's prepared inputs to the workers, if any.
    fn send(&mut self, kind: StepKind, shape: &BatchShape) -> Result<()> {
        if let Some(w) = &mut self.workers {
            let call = Call::Step(StepCall {
                kind,
                shape: [
                    shape.num_tokens as u64,
                    shape.num_seqs as u64,
                    shape.max_seqlen_q as u64,
                    shape.max_seqlen_k as u64,
                    shape.num_logits as u64,
                ],
                arrays: self.host.as_bytes().to_vec(),
            });
            call.encode_into(&mut self.call_buf);
            w.send(&self.call_buf)?;
        }
        Ok(())
    }

    /// A worker's command loop: runs each step rank 0 sends until it says exit. The steps'
    /// collectives meet rank 0's; nothing comes back through the shared memory.
    pub fn serve(&mut self, endpoint: &mut WorkerEndpoint) -> Result<()> {
        loop {
            let payload = endpoint.recv()?;
            let call = match Call::decode(&payload)? {
                Call::Exit => return Ok(()),
                Call::Step(call) => call,
            };
            let kind = call.kind;
            let shape = self.host.take_call(&call)?;
            self.check_fits(&shape)?;
            let is_prefill = matches!(kind, StepKind::Prefill | StepKind::Score);
            let sharded = self.shards_sampling();
            match kind {
                StepKind::DecodeGraph(bs) => {
                    // The same graph as rank 0's: both decide from the same inputs.
                    let graph = self.decode_graph(bs, sharded)?.ok_or_else(|| {
                        Error::Worker(format!(
                            "rank 0 replays a graph of batch {bs} this rank lacks"
                        ))
                    })?;
                    self.upload(false)?;
                    self.graph(graph).replay()?;
                }
                StepKind::Score => {
                    self.upload(true)?;
                    self.forward_logits(true, shape, true)?;
                }
                _ => {
                    self.upload(is_prefill)?;
                    self.run_ops(is_prefill, shape, sharded)?;
                }
            }
            self.be.synchronize()?;
        }
    }

    /// What start-up found and set up.
    pub fn stats(&self) -> &RunnerStats {
        &self.stats
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &Arc<B> {
        &self.be
    }

    /// Decode batch-size buckets as nano-vLLM: 1, 2, 4, 8, then multiples of 16 up to
    /// `max_num_seqs` (which is always a bucket).
    pub fn graph_batch_sizes(max_num_seqs: usize) -> Vec<usize> {
        let mut sizes: Vec<usize> = [1, 2, 4, 8]
            .into_iter()
            .filter(|&b| b <= max_num_seqs)
            .collect();
        sizes.extend((16..=max_num_seqs).step_by(16));
        if sizes.last() != Some(&max_num_seqs) {
            sizes.push(max_num_seqs);
        }
        sizes
    }

    /// Captures one decode graph per batch bucket, largest first. Each bucket runs once
    /// eagerly before its capture so that libraries finish their lazy set-up and scratch
    /// buffers reach their final size. Graphs are captured with `max_context_len =
    /// max_model_len`, which bounds every later step.
    fn capture_graphs(&mut self) -> Result<()> {
        let t = Instant::now();
        let mut graphs = Vec::new();
        // Padding rows are greedy (no cut): these graphs sample slices where steps can.
        let sharded = self.can_shard_sampling();
        for &bs in Self::graph_batch_sizes(self.limits.max_num_seqs)
            .iter()
            .rev()
        {
            match self.capture_decode(bs, sharded)? {
                Some(g) => graphs.push((bs, g)),
                None => return Ok(()),
            }
        }
        self.be.synchronize()?;
        graphs.reverse();
        self.stats.graph_batch_sizes = graphs.iter().map(|(b, _)| *b).collect();
        self.graphs = graphs;
        self.stats.capture_seconds = t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Captures the decode graph of batch `bs` (sampling rank slices or whole rows), after one
    /// eager run of it. Overwrites the host and device step inputs.
    fn capture_decode(&mut self, bs: usize, sharded: bool) -> Result<Option<Box<dyn GraphExec>>> {
        self.host.clear();
        self.host.pad_decode(bs, self.limits.max_blocks_per_seq);
        self.upload(false)?;
        let shape = self.graph_shape(bs);
        self.run_ops(false, shape, sharded)?;
        let be = self.be.clone();
        be.capture_graph(&mut || self.run_ops(false, shape, sharded))
    }

    /// Where the decode graph of bucket `bs` lives for a batch that samples rank slices
    /// (`sharded`) or whole rows: `Some((in whole_row_graphs, index))`, `None` when `bs` has no
    /// graph. A whole-row graph with tensor parallelism is captured here the first time a batch
    /// needs it (every rank reaches this at the same step); the step's host inputs are kept,
    /// and the caller uploads them afterwards.
    fn decode_graph(&mut self, bs: usize, sharded: bool) -> Result<Option<(bool, usize)>> {
        let Some(i) = self.graphs.iter().position(|(b, _)| *b == bs) else {
            return Ok(None);
        };
        if sharded == self.can_shard_sampling() {
            return Ok(Some((false, i)));
        }
        if let Some(j) = self.whole_row_graphs.iter().position(|(b, _)| *b == bs) {
            return Ok(Some((true, j)));
        }
        let host = std::mem::take(&mut self.host);
        let captured = self.capture_decode(bs, false);
        self.host = host;
        let graph = captured?.ok_or_else(|| {
            Error::Other(format!(
                "the backend captured the decode graphs but not batch {bs}'s whole-row variant"
            ))
        })?;
        self.whole_row_graphs.push((bs, graph));
        Ok(Some((true, self.whole_row_graphs.len() - 1)))
    }

    /// The graph [`Self::decode_graph`] found.
    fn graph(&self, (whole_rows, i): (bool, usize)) -> &dyn GraphExec {
        if whole_rows {
            &*self.whole_row_graphs[i].1
        } else {
            &*self.graphs[i].1
        }
    }

    /// Whether this step's rows are sampled by each rank on its vocabulary slice (see
    /// [`Self::can_shard_sampling`]; no row with a top-k / top-p cut) rather than gathered to
    /// rank 0.
    fn shards_sampling(&self) -> bool {
        self.can_shard_sampling() && !self.host.has_cut(self.vocab_size)
    }

    /// Whether rows without a cut are sampled on each rank's vocabulary slice: tensor
    /// parallelism, with slices of whole 8-column groups as the sampler draws them. The decode
    /// graphs captured at start-up sample that way.
    fn can_shard_sampling(&self) -> bool {
        let tp = self.model.comm().size();
        tp > 1 && (self.vocab_size / tp).is_multiple_of(8)
    }

    fn graph_shape(&self, bs: usize) -> BatchShape {
        BatchShape {
            num_tokens: bs,
            num_seqs: bs,
            max_seqlen_q: 1,
            max_seqlen_k: self.limits.max_model_len,
            num_logits: bs,
        }
    }

    /// Copies the host inputs of this step into the device buffers (every rank samples, or at
    /// least may: see [`Self::run_ops`]). An array whose bytes equal what its buffer last
    /// received is not copied again: in steady decode the sampling parameters, the logits rows
    /// and most steps' block tables repeat, and each copy costs the host microseconds while
    /// the GPU waits. Only this function writes these buffers, so `uploaded` is exact.
    fn upload(&mut self, is_prefill: bool) -> Result<()> {
        let be = &*self.be;
        let h = &self.host;
        let b = &mut self.bufs;
        let [ids, pos, slots, cu_q, cu_k, ctx, tables, rows, temps, top_k, top_p, seeds, steps] =
            &mut self.uploaded;
        htod_changed(be, &h.input_ids, &mut b.input_ids, ids)?;
        htod_changed(be, &h.positions, &mut b.positions, pos)?;
        htod_changed(be, &h.slot_mapping, &mut b.slot_mapping, slots)?;
        if is_prefill {
            htod_changed(be, &h.cu_seqlens_q, &mut b.cu_seqlens_q, cu_q)?;
            htod_changed(be, &h.cu_seqlens_k, &mut b.cu_seqlens_k, cu_k)?;
        } else {
            htod_changed(be, &h.context_lens, &mut b.context_lens, ctx)?;
        }
        htod_changed(be, &h.block_tables, &mut b.block_tables, tables)?;
        htod_changed(be, &h.logits_indices, &mut b.logits_indices, rows)?;
        htod_changed(be, &h.temperatures, &mut b.temperatures, temps)?;
        htod_changed(be, &h.top_k, &mut b.top_k, top_k)?;
        htod_changed(be, &h.top_p, &mut b.top_p, top_p)?;
        htod_changed(be, &h.seeds, &mut b.seeds, seeds)?;
        htod_changed(be, &h.steps, &mut b.steps, steps)?;
        Ok(())
    }

    /// nano-vLLM's `prepare_prefill`: the scheduled tokens of each sequence, their positions
    /// and slots, cu_seqlens, block tables, and the row of each sequence's last token.
    /// Returns the batch's shape; the inputs stay on the host (see [`Self::send_and_upload`]).
    fn prepare_prefill(&mut self, seqs: &[&Sequence]) -> Result<BatchShape> {
        let Limits {
            block_size,
            max_blocks_per_seq,
            ..
        } = self.limits;
        let h = &mut self.host;
        h.clear();
        h.cu_seqlens_q.push(0);
        h.cu_seqlens_k.push(0);
        let mut shape = BatchShape {
            num_seqs: seqs.len(),
            ..Default::default()
        };
        for seq in seqs {
            let start = seq.num_cached_tokens;
            let end = start + seq.num_scheduled_tokens;
            h.input_ids.extend_from_slice(&seq.token_ids[start..end]);
            for pos in start..end {
                h.positions.push(pos as i32);
                h.slot_mapping
                    .push(slot(&seq.block_table, pos, block_size)?);
            }
            let q_total = h.cu_seqlens_q.last().copied().unwrap_or(0) + (end - start) as i32;
            let k_total = h.cu_seqlens_k.last().copied().unwrap_or(0) + end as i32;
            h.cu_seqlens_q.push(q_total);
            h.cu_seqlens_k.push(k_total);
            h.logits_indices.push(q_total - 1);
            shape.max_seqlen_q = shape.max_seqlen_q.max(end - start);
            shape.max_seqlen_k = shape.max_seqlen_k.max(end);
            push_block_table(&mut h.block_tables, &seq.block_table, max_blocks_per_seq)?;
            h.push_sampling(seq);
        }
        shape.num_tokens = h.input_ids.len();
        shape.num_logits = shape.num_seqs;
        self.check_fits(&shape)?;
        Ok(shape)
    }

    /// nano-vLLM's `prepare_decode`: each sequence's last token, its position and slot, its
    /// context length and block table; `padded` rows in all (padding rows are harmless:
    /// slot -1, context 0).
    fn prepare_decode(&mut self, seqs: &[&Sequence], padded: usize) -> Result<BatchShape> {
        let Limits {
            block_size,
            max_blocks_per_seq,
            ..
        } = self.limits;
        let h = &mut self.host;
        h.clear();
        let mut max_context_len = 0;
        for seq in seqs {
            let len = seq.token_ids.len();
            h.input_ids.push(seq.token_ids[len - 1]);
            h.positions.push(len as i32 - 1);
            h.slot_mapping
                .push(slot(&seq.block_table, len - 1, block_size)?);
            h.context_lens.push(len as i32);
            push_block_table(&mut h.block_tables, &seq.block_table, max_blocks_per_seq)?;
            h.push_sampling(seq);
            max_context_len = max_context_len.max(len);
        }
        h.pad_decode(padded, max_blocks_per_seq);
        let shape = BatchShape {
            num_tokens: padded,
            num_seqs: padded,
            max_seqlen_q: 1,
            max_seqlen_k: max_context_len,
            num_logits: padded,
        };
        self.check_fits(&shape)?;
        Ok(shape)
    }

    fn check_fits(&self, shape: &BatchShape) -> Result<()> {
        if shape.num_tokens > self.limits.max_num_tokens
            || shape.num_seqs > self.limits.max_num_seqs
            || shape.max_seqlen_k > self.limits.max_model_len
        {
            return Err(Error::Other(format!(
                "batch of {} tokens / {} sequences / context {} exceeds the runner's limits \
                 {} / {} / {}",
                shape.num_tokens,
                shape.num_seqs,
                shape.max_seqlen_k,
                self.limits.max_num_tokens,
                self.limits.max_num_seqs,
                self.limits.max_model_len
            )));
        }
        Ok(())
    }

    /// Queues the forward pass, the LM head and the sampler for a batch whose inputs are
    /// already on the device. The sampled ids land in `sampled` on rank 0. With tensor
    /// parallelism and `sharded`, every rank samples its vocabulary slice of the logits and
    /// the ranks exchange each row's best candidate (a few bytes per row instead of gathering
    /// the logits; the same tokens, see [`Backend::sample_shard`]); otherwise the logits are
    /// gathered and rank 0 samples whole rows (needed for a top-k / top-p cut).
    fn run_ops(&mut self, is_prefill: bool, shape: BatchShape, sharded: bool) -> Result<()> {
        let comm = self.model.comm().clone();
        let (rank, tp) = (comm.rank(), comm.size());
        let sharded = sharded && tp > 1;
        self.forward_logits(is_prefill, shape, !sharded)?;
        if !sharded && rank != 0 {
            return Ok(());
        }
        let ModelRunner {
            be,
            ws,
            bufs: b,
            sampled,
            sample_parts,
            vocab_size,
            ..
        } = self;
        let params = SamplingBufs::<B> {
            temperatures: &b.temperatures,
            top_k: &b.top_k,
            top_p: &b.top_p,
            seeds: &b.seeds,
            steps: &b.steps,
        };
        let rows = shape.num_seqs;
        if !sharded {
            return be.sample(ws.logits(), rows, *vocab_size, &params, sampled);
        }
        let width = *vocab_size / tp;
        be.sample_shard(
            ws.logits_part(),
            rows,
            width,
            rank * width,
            &params,
            sample_parts,
            rank,
        )?;
        comm.all_gather_u32(be, sample_parts, 2 * rows)?;
        if rank == 0 {
            be.sample_combine(sample_parts, rows, tp, sampled)?;
        }
        Ok(())
    }

    /// Queues the forward pass and the LM head; the logits stay in the workspace (gathered to
    /// rank 0 with `gather`, each rank's slice otherwise).
    fn forward_logits(&mut self, is_prefill: bool, shape: BatchShape, gather: bool) -> Result<()> {
        let ModelRunner {
            be,
            model,
            kv,
            ws,
            bufs: b,
            limits,
            ..
        } = self;
        let be = &**be;
        let ctx = Context {
            is_prefill,
            num_tokens: shape.num_tokens,
            num_seqs: shape.num_seqs,
            positions: &b.positions,
            slot_mapping: &b.slot_mapping,
            cu_seqlens_q: &b.cu_seqlens_q,
            cu_seqlens_k: &b.cu_seqlens_k,
            max_seqlen_q: shape.max_seqlen_q,
            max_seqlen_k: shape.max_seqlen_k,
            context_lens: &b.context_lens,
            max_context_len: shape.max_seqlen_k,
            block_tables: &b.block_tables,
            max_blocks_per_seq: limits.max_blocks_per_seq,
            logits_indices: &b.logits_indices,
            num_logits: shape.num_logits,
        };
        model.forward(be, &b.input_ids, &ctx, kv, ws)?;
        model.compute_logits(be, &ctx, ws, gather)?;
        Ok(())
    }

    /// One step: prefill chunks or one decode token per sequence; one sampled token per
    /// sequence comes back, in the order of `seqs`. A decode batch runs with its longest
    /// contexts first (`NANOVLLM_DECODE_LONGEST_FIRST=0` keeps the given order).
    pub fn run_step(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>> {
        if is_prefill || !longest_first_enabled() || is_longest_first(seqs) {
            return self.run_step_in_order(seqs, is_prefill);
        }
        // Decode attention gives each sequence its own CTAs, which the GPU starts in batch
        // order; with the longest contexts first, the short ones fill in behind them instead
        // of leaving a long one to run on after the rest (docs/perf-notes.md, "Decode
        // attention's balance"). The tokens go back in the caller's order.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let sorted: Vec<&Sequence> = order.iter().map(|&i| seqs[i]).collect();
        let tokens = self.run_step_in_order(&sorted, false)?;
        let mut out = vec![0; tokens.len()];
        for (&i, &t) in order.iter().zip(&tokens) {
            out[i] = t;
        }
        Ok(out)
    }

    /// [`Self::run_step`] with the batch in the order given.
    fn run_step_in_order(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>> {
        let n = seqs.len();
        let t0 = Instant::now();
        let prepared_before = self.profile.prepare_seconds;
        if is_prefill {
            let shape = self.prepare_prefill(seqs)?;
            self.send_and_upload(StepKind::Prefill, &shape)?;
            self.profile.prepare_seconds += t0.elapsed().as_secs_f64();
            let sharded = self.shards_sampling();
            self.run_ops(true, shape, sharded)?;
        } else {
            let bucket = self.graphs.iter().find(|(bs, _)| *bs >= n).map(|g| g.0);
            match bucket {
                Some(bs) => {
                    let shape = self.prepare_decode(seqs, bs)?;
                    let sharded = self.shards_sampling();
                    self.send(StepKind::DecodeGraph(bs), &shape)?;
                    // Workers find (or capture) the same graph from the same inputs.
                    let graph = self
                        .decode_graph(bs, sharded)?
                        .ok_or_else(|| Error::Other(format!("no decode graph of batch {bs}")))?;
                    self.upload(false)?;
                    self.profile.prepare_seconds += t0.elapsed().as_secs_f64();
                    self.graph(graph).replay()?;
                }
                None => {
                    let shape = self.prepare_decode(seqs, n)?;
                    self.send_and_upload(StepKind::Decode, &shape)?;
                    self.profile.prepare_seconds += t0.elapsed().as_secs_f64();
                    let sharded = self.shards_sampling();
                    self.run_ops(false, shape, sharded)?;
                }
            }
        }
        self.sampled_host.resize(n, 0);
        self.be.dtoh(&self.sampled, &mut self.sampled_host)?;
        if let Some(w) = &self.workers {
            // After an NCCL abort the copy may have "succeeded" with garbage.
            w.check()?;
        }
        let prepare = self.profile.prepare_seconds - prepared_before;
        self.profile.execute_seconds += t0.elapsed().as_secs_f64() - prepare;
        Ok(self.sampled_host.clone())
    }
}

impl<B: Backend> ModelRunner<B> {
    /// Teacher-forced logits of every position of `tokens` (row `i` predicts token `i + 1`),
    /// `[tokens.len(), vocab]` as f32: one prefill over blocks `0..` of the cache, outside the
    /// block manager, so the engine must be idle. For checking the model against a reference;
    /// `tokens.len()` is bounded by `max_num_seqs` (the rows of the logits buffer).
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let n = tokens.len();
        let Limits {
            block_size,
            max_blocks_per_seq,
            max_num_seqs,
            ..
        } = self.limits;
        let blocks = n.div_ceil(block_size);
        if n == 0 || n > max_num_seqs || blocks > self.kv.num_blocks || blocks > max_blocks_per_seq
        {
            return Err(Error::InvalidRequest(format!(
                "score needs 1..={} tokens within the KV cache; got {n}",
                max_num_seqs.min(self.kv.num_blocks * block_size)
            )));
        }
        let h = &mut self.host;
        h.clear();
        h.input_ids.extend_from_slice(tokens);
        h.positions.extend(0..n as i32);
        h.slot_mapping.extend(0..n as i32);
        h.cu_seqlens_q.extend([0, n as i32]);
        h.cu_seqlens_k.extend([0, n as i32]);
        let table: Vec<u32> = (0..blocks as u32).collect();
        push_block_table(&mut h.block_tables, &table, max_blocks_per_seq)?;
        h.logits_indices.extend(0..n as i32);
        let shape = BatchShape {
            num_tokens: n,
            num_seqs: 1,
            max_seqlen_q: n,
            max_seqlen_k: n,
            num_logits: n,
        };
        self.send_and_upload(StepKind::Score, &shape)?;
        self.forward_logits(true, shape, true)?;
        let logits = self.ws.logits();
        let mut out = vec![bf16::ZERO; n * self.vocab_size];
        self.be.dtoh(logits, &mut out)?;
        if let Some(w) = &self.workers {
            w.check()?;
        }
        Ok(out.into_iter().map(f32::from).collect())
    }
}

impl<B: Backend> StepRunner for ModelRunner<B> {
    fn run(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>> {
        self.run_step(seqs, is_prefill)
    }

    fn num_kvcache_blocks(&self) -> usize {
        self.stats.num_kvcache_blocks
    }

    fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        ModelRunner::score(self, tokens)
    }

    fn profile(&self) -> RunnerProfile {
        self.profile
    }

    fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .as_ref()
            .map(WorkerGroup::pids)
            .unwrap_or_default()
    }
}

/// Whether a decode batch runs with its longest contexts first (`NANOVLLM_DECODE_LONGEST_FIRST`,
/// on unless `0`).
fn longest_first_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| nanovllm_utils::env_switch("NANOVLLM_DECODE_LONGEST_FIRST", true))
}

/// Whether no sequence of `seqs` is longer than the one before it.
fn is_longest_first(seqs: &[&Sequence]) -> bool {
    seqs.windows(2).all(|w| w[0].len() >= w[1].len())
}

/// `dst` = the `T`s in plain bytes (reusing its allocation); an error when they are not a
/// whole number of `T`.
fn fill_pod<T: bytemuck::Pod>(dst: &mut Vec<T>, bytes: &[u8]) -> Result<()> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::Worker(format!(
            "step command array of {} bytes is not a whole number of {size}-byte elements",
            bytes.len()
        )));
    }
    dst.clear();
    dst.resize(bytes.len() / size, T::zeroed());
    bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(bytes);
    Ok(())
}

/// The cache slot of token `pos` of a sequence with `block_table`.
fn slot(block_table: &[u32], pos: usize, block_size: usize) -> Result<i32> {
    let block = block_table.get(pos / block_size).ok_or_else(|| {
        Error::Other(format!(
            "token {pos} has no KV block (block table of {} blocks)",
            block_table.len()
        ))
    })?;
    Ok((*block as usize * block_size + pos % block_size) as i32)
}

/// Appends one sequence's block table, padded with -1 to `width` entries.
/// `be.htod(src, dst)` unless `last` (the bytes `dst` last received from here) equals `src`;
/// then `last` holds `src`'s bytes.
fn htod_changed<B: Backend, T: Elem + bytemuck::Pod>(
    be: &B,
    src: &[T],
    dst: &mut B::Buf<T>,
    last: &mut Vec<u8>,
) -> Result<()> {
    let bytes: &[u8] = bytemuck::cast_slice(src);
    if last.as_slice() == bytes {
        return Ok(());
    }
    // Forget the old contents first: if the copy fails, the next upload copies again.
    last.clear();
    be.htod(src, dst)?;
    last.extend_from_slice(bytes);
    Ok(())
}

fn push_block_table(dst: &mut Vec<i32>, table: &[u32], width: usize) -> Result<()> {
    if table.len() > width {
        return Err(Error::Other(format!(
            "block table of {} blocks exceeds the {width} of max_model_len",
            table.len()
        )));
    }
    dst.extend(table.iter().map(|&b| b as i32));
    dst.extend(std::iter::repeat_n(-1, width - table.len()));
    Ok(())
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanovllm_kernels::cpu::CpuBackend;

    #[test]
    fn graph_buckets_follow_nano_vllm() {
        type R = ModelRunner<CpuBackend>;
        assert_eq!(R::graph_batch_sizes(1), vec![1]);
        assert_eq!(R::graph_batch_sizes(6), vec![1, 2, 4, 6]);
        assert_eq!(R::graph_batch_sizes(40), vec![1, 2, 4, 8, 16, 32, 40]);
        let full = R::graph_batch_sizes(512);
        assert_eq!(full.len(), 4 + 32);
        assert_eq!(full[4..8], [16, 32, 48, 64]);
        assert_eq!(full.last(), Some(&512));
    }

    #[test]
    fn step_inputs_survive_the_trip_to_a_worker() {
        let mut h = HostInputs::default();
        h.input_ids.extend([5, 151_935, 0]);
        h.positions.extend([0, 1, -2]);
        h.slot_mapping.extend([7, -1, 300]);
        h.cu_seqlens_q.extend([0, 2, 3]);
        h.cu_seqlens_k.extend([0, 9, 12]);
        h.context_lens.extend([9, 3]);
        h.block_tables.extend([4, -1, 2, 1]);
        h.logits_indices.extend([1, 2]);
        h.temperatures.extend([0.6, 0.0]);
        h.top_k.extend([0, 50]);
        h.top_p.extend([1.0, 0.95]);
        h.seeds.extend([u64::MAX, 3]);
        h.steps.extend([0, 17]);
        let shape = BatchShape {
            num_tokens: 3,
            num_seqs: 2,
            max_seqlen_q: 2,
            max_seqlen_k: 9,
            num_logits: 2,
        };
        let call = Call::Step(StepCall {
            kind: StepKind::Prefill,
            shape: [3, 2, 2, 9, 2],
            arrays: h.as_bytes().to_vec(),
        });
        let bytes = call.encode();
        let Call::Step(call) = Call::decode(&bytes).unwrap() else {
            panic!("not a step");
        };
        assert_eq!(call.kind, StepKind::Prefill);
        let mut w = HostInputs::default();
        let got = w.take_call(&call).unwrap();
        assert_eq!(got, shape);
        assert_eq!(w, h);
        // A command missing arrays, or with a torn array, is an error, not a panic.
        let mut short = call.clone();
        short.arrays.truncate(3);
        assert!(w.take_call(&short).is_err());
        let mut torn = call;
        torn.arrays[1] = &torn.arrays[1][..3];
        assert!(w.take_call(&torn).is_err());
    }

    /// Only a sampled row with a real top-k or top-p cut needs whole rows: greedy rows ignore
    /// their cut, and a top-k of the whole vocabulary (or more) is none.
    #[test]
    fn a_cut_is_a_sampled_row_that_drops_tokens() {
        let vocab = 1000;
        let rows = |rows: &[(f32, i32, f32)]| {
            let mut h = HostInputs::default();
            for &(t, k, p) in rows {
                h.temperatures.push(t);
                h.top_k.push(k);
                h.top_p.push(p);
            }
            h.has_cut(vocab)
        };
        assert!(!rows(&[]));
        assert!(!rows(&[
            (0.0, 5, 0.5),
            (0.7, 0, 1.0),
            (1.0, 1000, 1.0),
            (1.0, 4000, 1.0)
        ]));
        assert!(!rows(&[(0.6, -1, 1.0)]));
        assert!(rows(&[(0.7, 0, 1.0), (1.0, 999, 1.0)]));
        assert!(rows(&[(0.7, 0, 0.95)]));
    }

    #[test]
    fn slots_and_block_tables() {
        assert_eq!(slot(&[7, 3], 0, 16).unwrap(), 7 * 16);
        assert_eq!(slot(&[7, 3], 17, 16).unwrap(), 3 * 16 + 1);
        assert!(slot(&[7, 3], 32, 16).is_err());
        let mut t = Vec::new();
        push_block_table(&mut t, &[5, 9], 4).unwrap();
        assert_eq!(t, [5, 9, -1, -1]);
        assert!(push_block_table(&mut t, &[1, 2, 3], 2).is_err());
    }
}
