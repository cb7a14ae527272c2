//! The `LLM` API, as nano-vLLM's `LLM(path, **cfg)` and `generate(prompts, sampling_params)`.
//!
//! `LLM::new` resolves the model (a folder with config.json and weights, or a built-in name
//! such as `qwen3-0.6b` for dummy weights), picks the device, builds the
//! [`nanovllm_engine::model_runner::ModelRunner`] and the engine loop, and loads
//! the tokenizer. `generate` runs prompts to completion with a progress bar showing prefill and
//! decode throughput; `add_request` + `step` is the streaming form.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use nanovllm_engine::block_manager::PrefixCacheStats;
use nanovllm_engine::llm_engine::{LLMEngine, RunnerProfile, StepOutput, StepRunner};
use nanovllm_engine::model_runner::{LoadFormat, ModelRunner, RunnerStats};
use nanovllm_engine::sampling_params::SamplingParams;
use nanovllm_engine::scheduler::SchedulerConfig;
use nanovllm_engine::sequence::FinishReason;
use nanovllm_kernels::cpu::CpuBackend;
use nanovllm_kernels::Backend;
use nanovllm_models::qwen3::KvCache;
use nanovllm_utils::{EngineConfig, Error, GenerationConfig, ModelConfig, Result};

use crate::tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};

/// Which device runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The first CUDA GPU when there is one, else the CPU.
    #[default]
    Auto,
    /// CUDA GPU with this ordinal.
    Cuda(usize),
    /// The CPU reference backend.
    Cpu,
}

/// How weights are loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsFormat {
    /// Safetensors from the model folder; dummy weights for a built-in model name.
    #[default]
    Auto,
    /// Safetensors from the model folder.
    Safetensors,
    /// Seeded random weights from config.json alone.
    Dummy,
}

/// Options of [`LLM::new`]: the engine's knobs plus device and weight loading.
#[derive(Clone, Debug, Default)]
pub struct EngineArgs {
    /// Scheduler, memory and parallelism knobs (nano-vLLM's `Config`).
    pub config: EngineConfig,
    /// Device to run on.
    pub device: Device,
    /// Weight loading.
    pub load_format: WeightsFormat,
    /// Seed of dummy weights.
    pub dummy_seed: u64,
    /// With `tensor_parallel_size > 1`: the executable the worker processes are started from
    /// (it must have the `nanovllm` CLI's `worker` subcommand). Default: the
    /// `NANOVLLM_WORKER_EXE` environment variable, else this process's executable.
    pub worker_exe: Option<PathBuf>,
}

/// One prompt: text (tokenized by the model's tokenizer) or token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::Tokens(ids)
    }
}

/// The result of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Generated text (empty when the model has no tokenizer).
    pub text: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// What start-up did and how long it took.
#[derive(Clone, Debug)]
pub struct LoadInfo {
    /// The device, in words.
    pub device: String,
    /// Seconds from `LLM::new` being called to ready.
    pub startup_seconds: f64,
    /// The model runner's report (weights, KV cache, graphs).
    pub runner: RunnerStats,
}

/// A new token of a running request (the streaming form).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamEvent {
    /// The request, as `add_request` returned it.
    pub request_id: u64,
    /// Newly generated tokens since the last step.
    pub new_token_ids: Vec<u32>,
    /// `Some` when the request finished in this step.
    pub finish_reason: Option<FinishReason>,
}

/// An LLM ready to generate: model, engine loop and tokenizer.
pub struct LLM {
    engine: LLMEngine<Box<dyn StepRunner + Send>>,
    tokenizer: Option<Tokenizer>,
    model_config: ModelConfig,
    generation_config: GenerationConfig,
    memory_info: MemoryInfo,
    is_cpu: bool,
    step_stats: StepStats,
    info: LoadInfo,
}

/// Where a model comes from.
pub(crate) struct ModelSource {
    pub(crate) dir: Option<PathBuf>,
    pub(crate) config: ModelConfig,
    pub(crate) generation_config: GenerationConfig,
    pub(crate) dummy: bool,
}

pub(crate) fn resolve_model(model: &str, format: WeightsFormat) -> Result<ModelSource> {
    let path = Path::new(model);
    if path.is_dir() {
        let config = ModelConfig::from_model_dir(path)?;
        let generation_config = GenerationConfig::from_model_dir(path)?;
        return Ok(ModelSource {
            dir: Some(path.to_path_buf()),
            config,
            generation_config,
            dummy: format == WeightsFormat::Dummy,
        });
    }
    if path.is_file() && path.file_name().is_some_and(|f| f == "config.json") {
        let config = ModelConfig::from_file(path)?;
        return Ok(ModelSource {
            dir: None,
            config,
            generation_config: GenerationConfig::default(),
            dummy: true,
        });
    }
    match ModelConfig::builtin(&model.to_ascii_lowercase()) {
        Ok(config) if format != WeightsFormat::Safetensors => Ok(ModelSource {
            dir: None,
            config,
            generation_config: GenerationConfig::default(),
            dummy: true,
        }),
        _ => Err(Error::Config {
            file: path.to_path_buf(),
            msg: format!(
                "no model folder at `{model}`; pass a folder with config.json and *.safetensors, \
                 or one of the built-in names {:?} for dummy weights",
                ModelConfig::builtin_names()
            ),
        }),
    }
}

impl LLM {
    /// Loads `model` (a folder, a config.json, or a built-in name for dummy weights) and makes
    /// the engine ready.
    pub fn new(model: &str, args: EngineArgs) -> Result<Self> {
        let t0 = Instant::now();
        let src = resolve_model(model, args.load_format)?;
        let mut config = args.config.clone();
        config.validate(&src.config)?;
        let load_format = if src.dummy {
            LoadFormat::Dummy {
                seed: args.dummy_seed,
            }
        } else {
            LoadFormat::Safetensors
        };
        let tokenizer = match &src.dir {
            Some(dir) if dir.join("tokenizer.json").is_file() => Some(Tokenizer::from_dir(dir)?),
            Some(_) => None,
            None => Some(crate::builtin::qwen3_tokenizer()?),
        };
        let built = build_runner(model, &args, &src, &mut config, &load_format)?;
        let mut eos = src.config.eos_token_ids.clone();
        for id in src.generation_config.eos_token_ids.iter().copied().chain(
            tokenizer
                .as_ref()
                .map(|t| t.eos_token_ids().to_vec())
                .unwrap_or_default(),
        ) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let r = &built.stats;
        eprintln!(
            "nanovllm: {} on {}: weights {:.2} GiB, KV cache {} blocks of {} tokens ({:.2} GiB), \
             {} decode graphs",
            model,
            built.device,
            r.weight_bytes as f64 / (1u64 << 30) as f64,
            r.num_kvcache_blocks,
            config.kvcache_block_size,
            r.kvcache_bytes as f64 / (1u64 << 30) as f64,
            r.graph_batch_sizes.len()
        );
        let engine = LLMEngine::new(
            built.runner,
            &SchedulerConfig::from(&config),
            src.config.vocab_size,
            eos,
        )?;
        Ok(LLM {
            engine,
            tokenizer,
            model_config: src.config,
            generation_config: src.generation_config,
            memory_info: built.memory_info,
            is_cpu: built.is_cpu,
            step_stats: StepStats::default(),
            info: LoadInfo {
                device: built.device,
                startup_seconds: t0.elapsed().as_secs_f64(),
                runner: built.stats,
            },
        })
    }

    /// What start-up did.
    pub fn info(&self) -> &LoadInfo {
        &self.info
    }

    /// Whether the model runs on the CPU backend.
    pub fn is_cpu(&self) -> bool {
        self.is_cpu
    }

    /// The model's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    /// The tokenizer, when the model folder has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Device memory in use now, in bytes.
    pub fn memory_used_bytes(&self) -> Result<usize> {
        let (free, total) = (self.memory_info)()?;
        Ok(total.saturating_sub(free))
    }

    /// Time spent in prefill and decode steps since the last [`reset_step_stats`](Self::reset_step_stats).
    pub fn step_stats(&self) -> StepStats {
        self.step_stats
    }

    /// Where the model runner's time went since start-up.
    pub fn runner_profile(&self) -> RunnerProfile {
        self.engine.runner().profile()
    }

    /// Process ids of the tensor-parallel worker processes (empty at `tensor_parallel_size`
    /// 1). They end when the `LLM` is dropped.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.engine.runner().worker_pids()
    }

    /// Zeroes the step statistics.
    pub fn reset_step_stats(&mut self) {
        self.step_stats = StepStats::default();
    }

    /// Sampling defaults from the model's generation_config.json (temperature, top_k, top_p),
    /// else [`SamplingParams::default`].
    pub fn default_sampling_params(&self) -> SamplingParams {
        let g = &self.generation_config;
        let mut p = SamplingParams::default();
        if let Some(t) = g.temperature {
            p.temperature = t;
        }
        if let Some(k) = g.top_k {
            p.top_k = k;
        }
        if let Some(t) = g.top_p {
            p.top_p = t;
        }
        p
    }

    fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(
                "the model folder has no tokenizer.json; pass prompts as token ids".into(),
            )
        })
    }

    /// Renders `messages` with the model's chat template, ending with the assistant's turn.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        enable_thinking: bool,
    ) -> Result<String> {
        self.require_tokenizer()?
            .apply_chat_template(messages, true, enable_thinking)
    }

    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Text(text) => self.require_tokenizer()?.encode(text, false),
        }
    }

    /// Runs `prompts` to completion and returns their outputs in prompt order. `params` holds
    /// one `SamplingParams` for all prompts or one per prompt. `progress` shows a progress bar
    /// with prefill and decode throughput.
    pub fn generate(
        &mut self,
        prompts: &[Prompt],
        params: &[SamplingParams],
        progress: bool,
    ) -> Result<Vec<RequestOutput>> {
        let ids = prompts
            .iter()
            .map(|p| self.prompt_ids(p))
            .collect::<Result<Vec<_>>>()?;
        let bar = progress.then(|| {
            let bar = ProgressBar::new(prompts.len() as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "Generating {percent:>3}% |{bar:30}| {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        let mut stats = self.step_stats;
        let mut last = Instant::now();
        let (mut prefill_tps, mut decode_tps) = (0.0, 0.0);
        let (engine, tokenizer) = (&mut self.engine, self.tokenizer.as_ref());
        // Finished sequences are detokenized on a thread of their own while the engine steps
        // on (overlapping the GPU's work), not all at the end.
        let (outputs, texts) = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u32>)>();
            let decoder = tokenizer.map(|t| {
                scope.spawn(move || -> Result<HashMap<u64, String>> {
                    rx.into_iter()
                        .map(|(id, ids)| Ok((id, t.decode(&ids, true)?)))
                        .collect()
                })
            });
            let outputs = engine.generate_with(ids, params, |step| {
                let dt = last.elapsed().as_secs_f64();
                last = Instant::now();
                stats.record(step, dt);
                if decoder.is_some() {
                    for f in &step.finished {
                        // A send fails only when the decoder stopped on an error, which
                        // its join below reports.
                        let _ = tx.send((f.seq_id, f.token_ids.clone()));
                    }
                }
                if let Some(bar) = &bar {
                    let tps = step.num_tokens as f64 / dt.max(1e-9);
                    if step.is_prefill {
                        prefill_tps = tps;
                    } else {
                        decode_tps = tps;
                    }
                    bar.set_message(format!(
                        "Prefill={prefill_tps:.0}tok/s, Decode={decode_tps:.0}tok/s"
                    ));
                    bar.inc(step.finished.len() as u64);
                }
            });
            drop(tx);
            let texts = match decoder {
                Some(d) => d
                    .join()
                    .unwrap_or_else(|_| Err(Error::Tokenizer("the detokenizer panicked".into()))),
                None => Ok(HashMap::new()),
            };
            (outputs, texts)
        });
        self.step_stats = stats;
        if let Some(bar) = bar {
            bar.finish();
        }
        let mut texts = texts?;
        Ok(outputs?
            .into_iter()
            .map(|o| RequestOutput {
                text: texts.remove(&o.seq_id).unwrap_or_default(),
                prompt_token_ids: o.prompt_token_ids,
                token_ids: o.token_ids,
                finish_reason: o.finish_reason,
            })
            .collect())
    }

    /// Queues one request (the streaming form); its tokens come out of [`step`](Self::step).
    pub fn add_request(&mut self, prompt: &Prompt, params: SamplingParams) -> Result<u64> {
        let ids = self.prompt_ids(prompt)?;
        self.engine.add_request(ids, params)
    }

    /// Runs one engine step and reports each request's new tokens.
    pub fn step(&mut self) -> Result<Vec<StreamEvent>> {
        let t = Instant::now();
        let out = self.engine.step()?;
        self.step_stats.record(&out, t.elapsed().as_secs_f64());
        let mut events: Vec<StreamEvent> = Vec::new();
        let mut index: HashMap<u64, usize> = HashMap::new();
        for &(id, token) in &out.new_tokens {
            let i = *index.entry(id).or_insert_with(|| {
                events.push(StreamEvent {
                    request_id: id,
                    new_token_ids: Vec::new(),
                    finish_reason: None,
                });
                events.len() - 1
            });
            events[i].new_token_ids.push(token);
        }
        for f in &out.finished {
            match index.get(&f.seq_id) {
                Some(&i) => events[i].finish_reason = Some(f.finish_reason),
                None => events.push(StreamEvent {
                    request_id: f.seq_id,
                    new_token_ids: Vec::new(),
                    finish_reason: Some(f.finish_reason),
                }),
            }
        }
        Ok(events)
    }

    /// Teacher-forced logits of every position of `tokens` (`[len, vocab]`, row `i`
    /// predicting token `i + 1`), for checking the model against a reference. Needs an idle
    /// engine.
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if !self.engine.is_finished() {
            return Err(Error::InvalidRequest("score needs an idle engine".into()));
        }
        self.engine.runner_mut().score(tokens)
    }

    /// Whether no request is waiting or running.
    pub fn is_finished(&self) -> bool {
        self.engine.is_finished()
    }

    /// Drops a request and frees its KV blocks; false when it is unknown or already finished.
    pub fn abort(&mut self, request_id: u64) -> bool {
        self.engine.abort(request_id)
    }

    /// The engine's load at this moment, for monitoring (e.g. the server's `/metrics`).
    pub fn metrics(&self) -> EngineMetrics {
        let scheduler = self.engine.scheduler();
        let blocks = scheduler.block_manager();
        EngineMetrics {
            num_running: scheduler.num_running(),
            num_waiting: scheduler.num_waiting(),
            kv_blocks_used: blocks.num_used_blocks(),
            kv_blocks_total: blocks.num_blocks(),
            prefix_cache: blocks.prefix_cache_stats(),
        }
    }

    /// Longest sequence (prompt + output) the engine accepts, after capping by the model.
    pub fn max_model_len(&self) -> usize {
        self.engine.config().max_model_len
    }

    /// Generates for one prompt, calling `on_text` with each newly completed piece of text
    /// (never half a character), and returns the whole text.
    pub fn stream_text(
        &mut self,
        prompt: Prompt,
        params: SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<String> {
        self.require_tokenizer()?;
        let id = self.add_request(&prompt, params)?;
        let mut tokens = Vec::new();
        let mut finished = false;
        let tokenizer = self
            .tokenizer
            .take()
            .ok_or_else(|| Error::Tokenizer("no tokenizer".into()))?;
        let result = (|| {
            let mut decoder = IncrementalDecoder::new(&tokenizer, true);
            let mut text = String::new();
            while !finished {
                for ev in self.step()? {
                    if ev.request_id != id {
                        continue;
                    }
                    for &t in &ev.new_token_ids {
                        tokens.push(t);
                        if let Some(piece) = decoder.push(t)? {
                            on_text(&piece);
                            text.push_str(&piece);
                        }
                    }
                    finished |= ev.finish_reason.is_some();
                }
            }
            let rest = decoder.finish()?;
            on_text(&rest);
            text.push_str(&rest);
            Ok(text)
        })();
        self.tokenizer = Some(tokenizer);
        if result.is_err() {
            self.abort(id);
        }
        result
    }
}

/// The engine's load at one moment: sequences and KV-cache blocks in use, prefix-cache hits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    /// Sequences in the running batch.
    pub num_running: usize,
    /// Sequences waiting for their (first or next) prefill.
    pub num_waiting: usize,
    /// KV-cache blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV-cache blocks in all.
    pub kv_blocks_total: usize,
    /// Prefix-cache counters since start-up.
    pub prefix_cache: PrefixCacheStats,
}

/// Time spent in prefill and decode steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Seconds in prefill steps.
    pub prefill_seconds: f64,
    /// Prompt tokens computed.
    pub prefill_tokens: usize,
    /// Seconds in decode steps.
    pub decode_seconds: f64,
    /// Decode steps.
    pub decode_steps: usize,
    /// Tokens decoded.
    pub decode_tokens: usize,
}

impl StepStats {
    fn record(&mut self, step: &StepOutput, seconds: f64) {
        if step.num_tokens == 0 {
            return;
        }
        if step.is_prefill {
            self.prefill_seconds += seconds;
            self.prefill_tokens += step.num_tokens;
        } else {
            self.decode_seconds += seconds;
            self.decode_steps += 1;
            self.decode_tokens += step.num_tokens;
        }
    }
}

pub(crate) type MemoryInfo = Box<dyn Fn() -> Result<(usize, usize)> + Send + Sync>;

/// A model runner ready to use, with what the facade needs to know of it.
pub(crate) struct BuiltRunner {
    pub(crate) runner: Box<dyn StepRunner + Send>,
    pub(crate) device: String,
    pub(crate) stats: RunnerStats,
    pub(crate) memory_info: MemoryInfo,
    pub(crate) is_cpu: bool,
}

/// KV-cache budget of the CPU backend when `num_kvcache_blocks` is not given: host memory is
/// shared with everything else, so the engine takes at most 2 GiB (less when `max_num_seqs`
/// sequences of `max_model_len` tokens need less) rather than a fraction.
const CPU_KV_CACHE_BYTES: usize = 2 << 30;

fn runner_on<B: Backend>(
    be: Arc<B>,
    src: &ModelSource,
    config: &EngineConfig,
    load_format: &LoadFormat,
    is_cpu: bool,
) -> Result<BuiltRunner> {
    let runner = ModelRunner::new(
        be.clone(),
        &src.config,
        config,
        src.dir.as_deref(),
        load_format,
    )?;
    let device = be.name();
    Ok(BuiltRunner::new(runner, be, device, is_cpu))
}

impl BuiltRunner {
    /// Wraps `runner` (on backend `be`, described as `device`) for the facade.
    pub(crate) fn new<B: Backend>(
        runner: ModelRunner<B>,
        be: Arc<B>,
        device: String,
        is_cpu: bool,
    ) -> Self {
        BuiltRunner {
            stats: runner.stats().clone(),
            runner: Box::new(runner),
            device,
            memory_info: Box::new(move || be.memory_info()),
            is_cpu,
        }
    }
}

fn build_runner(
    model: &str,
    args: &EngineArgs,
    src: &ModelSource,
    config: &mut EngineConfig,
    load_format: &LoadFormat,
) -> Result<BuiltRunner> {
    let device = args.device;
    let ordinal = match device {
        Device::Cpu => None,
        Device::Cuda(i) => Some(i),
        Device::Auto => cfg!(feature = "cuda").then_some(0),
    };
    if config.tensor_parallel_size > 1 {
        #[cfg(feature = "cuda")]
        let ordinal = match (device, ordinal) {
            // Auto: the GPUs when the driver reports any, else the CPU backend.
            (Device::Auto, Some(i)) => nanovllm_kernels::cuda::device_count()
                .ok()
                .filter(|&n| n > 0)
                .map(|_| i),
            _ => ordinal,
        };
        if ordinal.is_none() {
            cpu_kv_blocks(src, config);
        }
        return crate::tp::build_tp_runner(
            model,
            args.load_format,
            args.dummy_seed,
            args.worker_exe.as_deref(),
            src,
            config,
            ordinal,
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(ordinal) = ordinal {
        match nanovllm_kernels::cuda::CudaBackend::new(ordinal) {
            Ok(be) => {
                let kernels = be.kernel_code();
                let mut built = runner_on(Arc::new(be), src, config, load_format, false)?;
                built.device = format!("{} (kernels: {kernels})", built.device);
                return Ok(built);
            }
            Err(e) if device == Device::Auto => {
                eprintln!("nanovllm: no usable GPU ({e}); running on the CPU backend");
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if let (Some(_), Device::Cuda(_)) = (ordinal, device) {
        return Err(Error::Cuda(
            "this build has no CUDA support (built without the `cuda` feature); use --device cpu"
                .into(),
        ));
    }
    let _ = ordinal;
    cpu_kv_blocks(src, config);
    runner_on(Arc::new(CpuBackend::new()), src, config, load_format, true)
}

/// Sizes the CPU backend's KV cache when the options leave it open (see
/// [`CPU_KV_CACHE_BYTES`]); with tensor parallelism each rank holds its share of every block.
fn cpu_kv_blocks(src: &ModelSource, config: &mut EngineConfig) {
    if config.num_kvcache_blocks.is_none() {
        let tp = config.tensor_parallel_size.max(1);
        let block_bytes =
            KvCache::<CpuBackend>::bytes_per_block(&src.config, tp, config.kvcache_block_size);
        let min_blocks = config.max_model_len.div_ceil(config.kvcache_block_size);
        let all_seqs_full = config.max_num_seqs * min_blocks;
        config.num_kvcache_blocks = Some(
            (CPU_KV_CACHE_BYTES / block_bytes)
                .min(all_seqs_full)
                .max(min_blocks),
        );
    }
}
