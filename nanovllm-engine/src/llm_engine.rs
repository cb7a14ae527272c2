//! The engine loop: requests in, one scheduler + model-runner step at a time, finished
//! sequences out.
//!
//! Flow: [`LLMEngine::add_request`] validates a request and queues it as a [`Sequence`];
//! [`LLMEngine::step`] runs `Scheduler::schedule` -> [`StepRunner::run`] ->
//! `Scheduler::postprocess` and reports new and finished tokens; [`LLMEngine::generate`] loops
//! `step` until its prompts are done (nano-vLLM's `llm_engine.py`, without the tokenizer, which
//! lives in the facade). The engine is written against the [`StepRunner`] trait, so it runs with
//! the GPU runner, the CPU runner, or a fake one in tests.

use crate::sampling_params::SamplingParams;
use crate::scheduler::{ScheduledBatch, Scheduler, SchedulerConfig};
use crate::sequence::{FinishReason, Sequence};
use nanovllm_utils::{Error, Result};

/// Computes one step on the model and samples one token per sequence: what the engine loop
/// needs of a model runner. [`crate::model_runner::ModelRunner`] is the real one; tests use
/// fakes.
pub trait StepRunner {
    /// Runs one step on `seqs` (prefill chunks or one decode token each) and returns one sampled
    /// token per sequence (ignored for sequences whose prompt is not yet fully computed).
    ///
    /// For each sequence the step computes tokens `[num_cached_tokens, num_cached_tokens +
    /// num_scheduled_tokens)` of `token_ids`, writing their KV into the blocks of `block_table`.
    fn run(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>>;

    /// KV-cache blocks the runner allocated.
    fn num_kvcache_blocks(&self) -> usize;

    /// Teacher-forced logits of every position of `tokens` (`[len, vocab]` f32), for checking
    /// a model against a reference. Runners without a model refuse.
    fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let _ = tokens;
        Err(Error::Other(
            "this model runner cannot score prompts".into(),
        ))
    }

    /// Where the runner's time went so far (zeros for runners that do not measure).
    fn profile(&self) -> RunnerProfile {
        RunnerProfile::default()
    }

    /// Process ids of the tensor-parallel worker processes (none without tensor parallelism).
    fn worker_pids(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// Where a model runner's time went, accumulated over its steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunnerProfile {
    /// Seconds building the step's inputs on the host and copying them to the device.
    pub prepare_seconds: f64,
    /// Seconds from queuing the step's device work to having its tokens on the host.
    pub execute_seconds: f64,
}

impl<R: StepRunner + ?Sized> StepRunner for Box<R> {
    fn run(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>> {
        (**self).run(seqs, is_prefill)
    }

    fn num_kvcache_blocks(&self) -> usize {
        (**self).num_kvcache_blocks()
    }

    fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        (**self).score(tokens)
    }

    fn profile(&self) -> RunnerProfile {
        (**self).profile()
    }

    fn worker_pids(&self) -> Vec<u32> {
        (**self).worker_pids()
    }
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceOutput {
    /// The id `add_request` returned.
    pub seq_id: u64,
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// The generated token ids (the stop token included, as in nano-vLLM).
    pub token_ids: Vec<u32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

impl SequenceOutput {
    fn from_finished(seq: Sequence) -> Self {
        let mut prompt_token_ids = seq.token_ids;
        let token_ids = prompt_token_ids.split_off(seq.num_prompt_tokens);
        Self {
            seq_id: seq.seq_id,
            prompt_token_ids,
            token_ids,
            // `postprocess` only returns sequences with a reason.
            finish_reason: seq.finish_reason.unwrap_or(FinishReason::Length),
        }
    }
}

/// What one [`LLMEngine::step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// Requests that finished this step, in batch order.
    pub finished: Vec<SequenceOutput>,
    /// `(seq_id, token_id)` for every token generated this step (for streaming), finishing
    /// tokens included; prefill chunks that stop short of the prompt's end generate none.
    pub new_tokens: Vec<(u64, u32)>,
    /// Whether the step was a prefill step.
    pub is_prefill: bool,
    /// Prompt tokens computed (prefill) or sequences decoded (decode); 0 when idle.
    pub num_tokens: usize,
}

/// The inference engine over a model runner `R` (nano-vLLM's `LLMEngine`).
pub struct LLMEngine<R: StepRunner> {
    runner: R,
    scheduler: Scheduler,
    config: SchedulerConfig,
    vocab_size: usize,
    next_seq_id: u64,
    /// The step's batch, kept to reuse its buffers.
    batch: ScheduledBatch,
}

impl<R: StepRunner> std::fmt::Debug for LLMEngine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LLMEngine")
            .field("config", &self.config)
            .field("vocab_size", &self.vocab_size)
            .field("num_kvcache_blocks", &self.runner.num_kvcache_blocks())
            .field("num_waiting", &self.scheduler.num_waiting())
            .field("num_running", &self.scheduler.num_running())
            .finish()
    }
}

/// SplitMix64: turns a sequence id into a well-mixed default seed.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<R: StepRunner> LLMEngine<R> {
    /// An engine over `runner`, whose KV cache holds `runner.num_kvcache_blocks()` blocks of
    /// `config.block_size` tokens. A generated token in `eos_token_ids` ends a request unless it
    /// sets `ignore_eos`.
    ///
    /// # Errors
    /// [`Error::EngineConfig`] when a limit of `config` is 0, `vocab_size` is 0, or the runner
    /// has no KV-cache block.
    pub fn new(
        runner: R,
        config: &SchedulerConfig,
        vocab_size: usize,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self> {
        if vocab_size == 0 {
            return Err(Error::EngineConfig {
                option: "vocab_size",
                msg: "is 0, expected at least 1 token".to_string(),
            });
        }
        let scheduler = Scheduler::new(config, runner.num_kvcache_blocks(), eos_token_ids)?;
        Ok(Self {
            runner,
            scheduler,
            config: config.clone(),
            vocab_size,
            next_seq_id: 0,
            batch: ScheduledBatch::default(),
        })
    }

    /// Queues a request and returns its sequence id (increasing in the order of acceptance).
    ///
    /// `max_tokens` is clamped so that prompt plus generated tokens fit in `max_model_len`: a
    /// request asking for more still runs, and ends with [`FinishReason::Length`] when it reaches
    /// `max_model_len` (as vLLM does). A prompt that leaves no room for one generated token is
    /// refused.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`], with nothing queued and requests in flight untouched, when:
    /// a sampling parameter is out of range; the prompt is empty; a prompt or stop token id is
    /// `>= vocab_size`; the prompt has `max_model_len` tokens or more; or the request could
    /// need more KV-cache blocks than the cache has in total.
    pub fn add_request(
        &mut self,
        prompt_token_ids: Vec<u32>,
        mut params: SamplingParams,
    ) -> Result<u64> {
        params.validate()?;
        if prompt_token_ids.is_empty() {
            return Err(Error::InvalidRequest(
                "prompt has no tokens, expected at least 1".to_string(),
            ));
        }
        let vocab = self.vocab_size;
        if let Some((i, &t)) = prompt_token_ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(Error::InvalidRequest(format!(
                "prompt token {i} is {t}, expected an id below vocab_size {vocab}"
            )));
        }
        if let Some(&t) = params.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "sampling parameter `stop_token_ids` holds {t}, expected ids below vocab_size \
                 {vocab}"
            )));
        }
        let max_model_len = self.config.max_model_len;
        let prompt_len = prompt_token_ids.len();
        if prompt_len >= max_model_len {
            return Err(Error::InvalidRequest(format!(
                "prompt has {prompt_len} tokens, expected fewer than max_model_len \
                 {max_model_len} to leave room for at least one generated token"
            )));
        }
        params.max_tokens = params.max_tokens.min(max_model_len - prompt_len);
        let mut prompt_token_ids = prompt_token_ids;
        // Room for every generated token, so decode steps never grow the vector.
        prompt_token_ids.reserve_exact(params.max_tokens);
        let seq_id = self.next_seq_id;
        let seed = params.seed.unwrap_or_else(|| splitmix64(seq_id));
        let seq = Sequence::new(seq_id, prompt_token_ids, params, seed)?;
        self.scheduler.add(seq)?;
        self.next_seq_id += 1;
        Ok(seq_id)
    }

    /// Runs one step: schedule, run the model, apply the sampled tokens. An idle engine returns
    /// an empty output.
    ///
    /// # Errors
    /// The runner's error, or [`Error::Other`] when it returns the wrong number of tokens or a
    /// token id `>= vocab_size`. The step's sequences are then aborted (their blocks freed), so
    /// the engine stays consistent and the other requests go on.
    pub fn step(&mut self) -> Result<StepOutput> {
        let mut out = StepOutput::default();
        self.step_into(&mut out)?;
        Ok(out)
    }

    /// [`step`](Self::step) into `out`, whose vectors are cleared and reused: a loop that keeps
    /// one `StepOutput` allocates nothing per step for it.
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn step_into(&mut self, out: &mut StepOutput) -> Result<()> {
        out.finished.clear();
        out.new_tokens.clear();
        out.is_prefill = false;
        out.num_tokens = 0;
        if !self.scheduler.schedule_into(&mut self.batch)? {
            return Ok(());
        }
        let batch = &self.batch;
        let seqs = self.scheduler.seqs(batch);
        let checked = self
            .runner
            .run(&seqs, batch.is_prefill())
            .and_then(|token_ids| {
                if token_ids.len() != seqs.len() {
                    return Err(Error::Other(format!(
                        "model runner returned {} tokens for a batch of {} sequences",
                        token_ids.len(),
                        seqs.len()
                    )));
                }
                if let Some(&t) = token_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
                    return Err(Error::Other(format!(
                        "model runner returned token {t}, expected an id below vocab_size {}",
                        self.vocab_size
                    )));
                }
                Ok(token_ids)
            });
        let token_ids = match checked {
            Ok(token_ids) => token_ids,
            Err(e) => {
                for &seq_id in batch.seq_ids() {
                    self.scheduler.abort(seq_id);
                }
                return Err(e);
            }
        };
        if batch.is_prefill() {
            out.new_tokens.extend(
                seqs.iter()
                    .zip(&token_ids)
                    .filter(|(seq, _)| seq.completes_prefill())
                    .map(|(seq, &t)| (seq.seq_id, t)),
            );
        } else {
            // Every decoding sequence gets its token.
            out.new_tokens.extend(
                seqs.iter()
                    .map(|seq| seq.seq_id)
                    .zip(token_ids.iter().copied()),
            );
        }
        let finished = self.scheduler.postprocess(batch, &token_ids)?;
        out.finished
            .extend(finished.into_iter().map(SequenceOutput::from_finished));
        out.is_prefill = batch.is_prefill();
        out.num_tokens = batch.num_tokens();
        Ok(())
    }

    /// Whether no request is waiting or running.
    pub fn is_finished(&self) -> bool {
        self.scheduler.is_finished()
    }

    /// Drops a waiting or running request, freeing its KV blocks. Returns whether it existed.
    pub fn abort(&mut self, seq_id: u64) -> bool {
        self.scheduler.abort(seq_id).is_some()
    }

    /// Generates for every prompt and returns the outputs in prompt order. `params` holds one
    /// entry for all prompts or one per prompt.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when requests are already in flight (use `add_request` and
    /// `step` to mix the two), when `params` has neither 1 nor `prompts.len()` entries, or when
    /// a prompt is refused (the message names its index; none of the prompts is run). A step's
    /// error aborts all of this call's requests and is returned.
    pub fn generate(
        &mut self,
        prompts: Vec<Vec<u32>>,
        params: &[SamplingParams],
    ) -> Result<Vec<SequenceOutput>> {
        self.generate_with(prompts, params, |_| {})
    }

    /// [`generate`](Self::generate), calling `on_step` after each step (for progress and
    /// throughput reporting).
    ///
    /// # Errors
    /// As [`generate`](Self::generate).
    pub fn generate_with(
        &mut self,
        prompts: Vec<Vec<u32>>,
        params: &[SamplingParams],
        mut on_step: impl FnMut(&StepOutput),
    ) -> Result<Vec<SequenceOutput>> {
        if !self.is_finished() {
            return Err(Error::InvalidRequest(format!(
                "generate needs an idle engine, but {} requests are waiting and {} running",
                self.scheduler.num_waiting(),
                self.scheduler.num_running()
            )));
        }
        let n = prompts.len();
        if params.len() != 1 && params.len() != n {
            return Err(Error::InvalidRequest(format!(
                "generate got {} sampling parameter sets for {n} prompts, expected 1 or {n}",
                params.len()
            )));
        }
        let first_id = self.next_seq_id;
        for (i, prompt) in prompts.into_iter().enumerate() {
            let p = params.get(i).unwrap_or(&params[0]).clone();
            if let Err(e) = self.add_request(prompt, p) {
                self.abort_range(first_id, i);
                return Err(match e {
                    Error::InvalidRequest(msg) => {
                        Error::InvalidRequest(format!("prompt {i}: {msg}"))
                    }
                    other => other,
                });
            }
        }
        let mut outputs: Vec<Option<SequenceOutput>> = vec![None; n];
        let mut out = StepOutput::default();
        while !self.is_finished() {
            if let Err(e) = self.step_into(&mut out) {
                self.abort_range(first_id, n);
                return Err(e);
            }
            on_step(&out);
            for f in out.finished.drain(..) {
                // Ids are consecutive from `first_id`, in prompt order.
                if let Some(slot) = outputs.get_mut((f.seq_id - first_id) as usize) {
                    *slot = Some(f);
                }
            }
        }
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| Error::Other(format!("generate: prompt {i} produced no output")))
            })
            .collect()
    }

    /// Aborts the `count` requests with ids from `first_id`.
    fn abort_range(&mut self, first_id: u64, count: usize) {
        for seq_id in first_id..first_id + count as u64 {
            self.scheduler.abort(seq_id);
        }
    }

    /// The scheduler (queue lengths, block manager counters).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The model runner.
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// The model runner, mutably.
    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }

    /// The scheduler limits the engine was built with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The vocabulary size prompts are checked against.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: usize = 1000;
    const EOS: u32 = 999;

    /// `(seq_id, num_cached_tokens, num_scheduled_tokens)` of each sequence of a call.
    type CallLog = Vec<(u64, usize, usize)>;

    /// Returns `(last token + 1) % 998` for each sequence; emits EOS once a sequence has
    /// `eos_after` generated tokens (if set). Records every call.
    struct FakeRunner {
        blocks: usize,
        eos_after: Option<usize>,
        calls: Vec<(bool, CallLog)>,
        fail: bool,
    }

    impl FakeRunner {
        fn new(blocks: usize) -> Self {
            Self {
                blocks,
                eos_after: None,
                calls: Vec::new(),
                fail: false,
            }
        }
    }

    impl StepRunner for FakeRunner {
        fn run(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>> {
            if self.fail {
                return Err(Error::Cuda("injected".to_string()));
            }
            self.calls.push((
                is_prefill,
                seqs.iter()
                    .map(|s| (s.seq_id, s.num_cached_tokens, s.num_scheduled_tokens))
                    .collect(),
            ));
            Ok(seqs
                .iter()
                .map(|s| match self.eos_after {
                    Some(n) if s.num_completion_tokens() + 1 >= n => EOS,
                    _ => (s.last_token + 1) % 998,
                })
                .collect())
        }

        fn num_kvcache_blocks(&self) -> usize {
            self.blocks
        }
    }

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            max_num_batched_tokens: 16,
            max_num_seqs: 4,
            max_model_len: 64,
            block_size: 4,
            enable_prefix_caching: true,
        }
    }

    fn engine(blocks: usize) -> LLMEngine<FakeRunner> {
        LLMEngine::new(FakeRunner::new(blocks), &config(), VOCAB, vec![EOS]).unwrap()
    }

    fn params(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    fn refused(r: Result<u64>, needle: &str) {
        match r {
            Err(Error::InvalidRequest(msg)) => {
                assert!(msg.contains(needle), "`{msg}` lacks `{needle}`")
            }
            other => panic!("expected InvalidRequest with `{needle}`, got {other:?}"),
        }
    }

    #[test]
    fn generate_returns_outputs_in_prompt_order() {
        let mut e = engine(64);
        let prompts = vec![(0..30).collect(), vec![5], (10..20).collect()];
        let out = e
            .generate(prompts, &[params(3), params(1), params(5)])
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].token_ids, vec![30, 31, 32]);
        assert_eq!(out[1].token_ids, vec![6]);
        assert_eq!(out[2].token_ids, vec![20, 21, 22, 23, 24]);
        assert_eq!(out[2].prompt_token_ids, (10..20).collect::<Vec<_>>());
        assert!(out.iter().all(|o| o.finish_reason == FinishReason::Length));
        assert!(e.is_finished());
        assert_eq!(e.scheduler().block_manager().num_used_blocks(), 0);
        // The 30-token prompt was chunked by the 16-token budget.
        assert_eq!(e.runner().calls[0], (true, vec![(0, 0, 16)]));
    }

    #[test]
    fn eos_stops_unless_ignored() {
        let mut e = engine(64);
        e.runner_mut().eos_after = Some(2);
        let ignore = SamplingParams {
            ignore_eos: true,
            ..params(4)
        };
        let out = e
            .generate(vec![vec![1, 2], vec![1, 2]], &[params(4), ignore])
            .unwrap();
        assert_eq!(out[0].token_ids, vec![3, EOS]);
        assert_eq!(out[0].finish_reason, FinishReason::Stop);
        assert_eq!(out[1].token_ids.len(), 4);
        assert_eq!(out[1].finish_reason, FinishReason::Length);
    }

    #[test]
    fn step_reports_streaming_tokens_and_throughput_counts() {
        let mut e = engine(64);
        let a = e.add_request((0..20).collect(), params(2)).unwrap();
        let b = e.add_request(vec![7], params(2)).unwrap();
        let s1 = e.step().unwrap();
        assert_eq!((s1.is_prefill, s1.num_tokens), (true, 16));
        assert!(s1.new_tokens.is_empty(), "partial chunk generates nothing");
        let s2 = e.step().unwrap();
        assert_eq!((s2.is_prefill, s2.num_tokens), (true, 5));
        assert_eq!(s2.new_tokens, vec![(a, 20), (b, 8)]);
        let s3 = e.step().unwrap();
        assert_eq!((s3.is_prefill, s3.num_tokens), (false, 2));
        assert_eq!(s3.new_tokens, vec![(a, 21), (b, 9)]);
        assert_eq!(s3.finished.len(), 2);
        assert_eq!(e.step().unwrap(), StepOutput::default());
    }

    #[test]
    fn every_refusal_names_its_cause_and_loses_nothing() {
        let mut e = engine(8); // 8 blocks of 4 tokens = 32 KV slots
        let running = e.add_request(vec![1, 2, 3], params(3)).unwrap();
        e.step().unwrap();

        refused(e.add_request(vec![], params(3)), "no tokens");
        refused(e.add_request(vec![1, 1000], params(3)), "token 1 is 1000");
        refused(
            e.add_request(
                vec![1],
                SamplingParams {
                    stop_token_ids: vec![5000],
                    ..params(3)
                },
            ),
            "`stop_token_ids` holds 5000",
        );
        refused(
            e.add_request(
                vec![1],
                SamplingParams {
                    temperature: -1.0,
                    ..params(3)
                },
            ),
            "`temperature`",
        );
        refused(e.add_request(vec![1; 64], params(1)), "has 64 tokens");
        refused(e.add_request(vec![1; 65], params(1)), "has 65 tokens");
        // 30 + 10 tokens fit max_model_len 64 but need 39 KV slots = 10 blocks > 8.
        refused(e.add_request(vec![1; 30], params(10)), "10 KV-cache blocks");

        // Nothing was queued, ids were not consumed, the running request is intact.
        assert_eq!(e.scheduler().num_waiting() + e.scheduler().num_running(), 1);
        let next = e.add_request(vec![4], params(1)).unwrap();
        assert_eq!(next, running + 1);
        let mut finished = Vec::new();
        while !e.is_finished() {
            finished.extend(e.step().unwrap().finished);
        }
        assert_eq!(finished.len(), 2);
        let first = finished.iter().find(|o| o.seq_id == running).unwrap();
        assert_eq!(first.token_ids, vec![4, 5, 6]);
        let second = finished.iter().find(|o| o.seq_id == next).unwrap();
        assert_eq!(second.token_ids, vec![5]);
    }

    #[test]
    fn max_tokens_is_clamped_to_max_model_len() {
        let mut e = LLMEngine::new(FakeRunner::new(64), &config(), VOCAB, vec![]).unwrap();
        let id = e.add_request(vec![1; 60], params(100)).unwrap();
        assert_eq!(e.scheduler().get(id).unwrap().params.max_tokens, 4);
        let mut done = Vec::new();
        while !e.is_finished() {
            done.extend(e.step().unwrap().finished);
        }
        assert_eq!(done[0].token_ids.len(), 4);
        assert_eq!(done[0].finish_reason, FinishReason::Length);
        assert_eq!(done[0].prompt_token_ids.len() + done[0].token_ids.len(), 64);
    }

    #[test]
    fn generate_refuses_bad_input_without_running_anything() {
        let mut e = engine(64);
        let r = e.generate(vec![vec![1], vec![]], &[params(2)]);
        assert!(matches!(r, Err(Error::InvalidRequest(ref m)) if m.starts_with("prompt 1:")));
        assert!(e.is_finished());
        let r = e.generate(vec![vec![1], vec![2]], &[params(2), params(2), params(2)]);
        assert!(matches!(r, Err(Error::InvalidRequest(_))));
        e.add_request(vec![1], params(2)).unwrap();
        let r = e.generate(vec![vec![1]], &[params(2)]);
        assert!(matches!(r, Err(Error::InvalidRequest(ref m)) if m.contains("idle engine")));
        assert!(e.runner().calls.is_empty());
    }

    #[test]
    fn runner_failure_aborts_the_batch_only() {
        let mut e = engine(64);
        let a = e.add_request(vec![1, 2], params(2)).unwrap();
        e.step().unwrap();
        e.runner_mut().fail = true;
        assert!(matches!(e.step(), Err(Error::Cuda(_))));
        assert!(e.is_finished());
        assert_eq!(e.scheduler().block_manager().num_used_blocks(), 0);
        assert!(!e.abort(a));
        e.runner_mut().fail = false;
        let out = e.generate(vec![vec![3]], &[params(1)]).unwrap();
        assert_eq!(out[0].token_ids, vec![4]);
    }

    #[test]
    fn seeds_are_resolved_per_request() {
        let mut e = engine(64);
        let a = e.add_request(vec![1], params(1)).unwrap();
        let b = e.add_request(vec![1], params(1)).unwrap();
        let c = e
            .add_request(
                vec![1],
                SamplingParams {
                    seed: Some(42),
                    ..params(1)
                },
            )
            .unwrap();
        let seed = |id| e.scheduler().get(id).unwrap().seed;
        assert_ne!(seed(a), seed(b));
        assert_eq!(seed(c), 42);
        assert_eq!(seed(a), splitmix64(a));
    }
}
