//! Randomized end-to-end simulation of the engine loop (scheduler + block manager + engine)
//! with a fake model runner, under KV budgets small enough to force preemption and with prompts
//! that share prefixes.
//!
//! The fake runner plays a model honestly enough to catch scheduling bugs:
//! - it keeps a fake KV cache whose slot for position `p` of a sequence holds a hash of the
//!   sequence's tokens `0..=p` (what a real K/V vector depends on), written through the
//!   sequence's `block_table` when a step computes that position, and checks on every step that
//!   all positions below `num_cached_tokens` hold the right value, so a prefix-cache hit on the
//!   wrong block, a lost chunk, or a block freed while in use shows up at once;
//! - its next token is a function of the whole token sequence, so every request's output must
//!   equal the output of generating it alone, whatever the chunking and preemption;
//! - it checks each batch against the scheduler's limits.

use nanovllm_engine::{
    FinishReason, LLMEngine, SamplingParams, SchedulerConfig, Sequence, StepRunner,
};
use nanovllm_utils::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

const VOCAB: usize = 512;
const EOS: u32 = 511;

fn mix(h: u64, t: u32) -> u64 {
    let mut z = (h ^ u64::from(t)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of `tokens[0..=p]` for every `p`.
fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut h = 1;
    tokens
        .iter()
        .map(|&t| {
            h = mix(h, t);
            h
        })
        .collect()
}

/// The fake model's next token after a sequence whose last prefix hash is `h`: EOS one time in
/// eight, otherwise an ordinary token.
fn next_token(h: u64) -> u32 {
    let r = mix(h, 7);
    if r & 7 == 0 {
        EOS
    } else {
        (r % (VOCAB as u64 - 1)) as u32
    }
}

/// What a request generates when run alone.
fn expected_output(prompt: &[u32], p: &SamplingParams, max_model_len: usize) -> Vec<u32> {
    let max_tokens = p.max_tokens.min(max_model_len - prompt.len());
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    loop {
        let t = next_token(*prefix_hashes(&tokens).last().unwrap());
        tokens.push(t);
        out.push(t);
        if (!p.ignore_eos && t == EOS) || p.stop_token_ids.contains(&t) || out.len() >= max_tokens {
            return out;
        }
    }
}

struct FakeRunner {
    config: SchedulerConfig,
    num_blocks: usize,
    /// One slot per token position of every block: the prefix hash written there, 0 if none.
    kv: Vec<u64>,
    steps: usize,
    prefill_steps: usize,
    /// Prefills of sequences that already had generated tokens: recomputation after preemption.
    recomputes: usize,
    /// Chunk sizes seen for each sequence's prefill, for the chunking checks.
    chunks: HashMap<u64, Vec<usize>>,
}

impl FakeRunner {
    fn new(config: &SchedulerConfig, num_blocks: usize) -> Self {
        Self {
            config: config.clone(),
            num_blocks,
            kv: vec![0; num_blocks * config.block_size],
            steps: 0,
            prefill_steps: 0,
            recomputes: 0,
            chunks: HashMap::new(),
        }
    }
}

impl StepRunner for FakeRunner {
    fn run(&mut self, seqs: &[&Sequence], is_prefill: bool) -> Result<Vec<u32>> {
        let bs = self.config.block_size;
        self.steps += 1;
        assert!(!seqs.is_empty() && seqs.len() <= self.config.max_num_seqs);
        let total: usize = seqs.iter().map(|s| s.num_scheduled_tokens).sum();
        if is_prefill {
            self.prefill_steps += 1;
            assert!(total <= self.config.max_num_batched_tokens, "token budget");
        }
        // Check every sequence's cached positions before writing any: the batch is computed as
        // one forward pass, so no sequence may rely on KV that this same step writes.
        let hashes: Vec<Vec<u64>> = seqs.iter().map(|s| prefix_hashes(&s.token_ids)).collect();
        for (s, hashes) in seqs.iter().zip(&hashes) {
            assert!(s.block_table.len() * bs >= s.num_cached_tokens + s.num_scheduled_tokens);
            for (p, &h) in hashes.iter().enumerate().take(s.num_cached_tokens) {
                let slot = s.block_table[p / bs] as usize * bs + p % bs;
                assert_eq!(
                    self.kv[slot], h,
                    "seq {}: cached KV of position {p} is not its own",
                    s.seq_id
                );
            }
        }
        let mut out = Vec::with_capacity(seqs.len());
        for (i, (s, hashes)) in seqs.iter().zip(&hashes).enumerate() {
            let (start, n) = (s.num_cached_tokens, s.num_scheduled_tokens);
            assert!(n > 0, "seq {} scheduled with no token", s.seq_id);
            assert!(start + n <= s.num_tokens);
            assert!(s
                .block_table
                .iter()
                .all(|&b| (b as usize) < self.num_blocks));
            if is_prefill {
                assert!(
                    i == 0 || s.completes_prefill(),
                    "only the first may be chunked"
                );
                if !s.completes_prefill() {
                    // A chunk is cut only by the budget, which it then uses up alone.
                    assert_eq!((seqs.len(), n), (1, self.config.max_num_batched_tokens));
                }
                if s.num_completion_tokens() > 0 {
                    self.recomputes += 1;
                }
                self.chunks.entry(s.seq_id).or_default().push(n);
            } else {
                assert_eq!(n, 1);
                assert_eq!(start + 1, s.num_tokens, "decode computes the last token");
            }
            let slot = |p: usize| s.block_table[p / bs] as usize * bs + p % bs;
            for (p, &h) in hashes.iter().enumerate().skip(start).take(n) {
                self.kv[slot(p)] = h;
            }
            out.push(next_token(hashes[start + n - 1]));
        }
        Ok(out)
    }

    fn num_kvcache_blocks(&self) -> usize {
        self.num_blocks
    }
}

struct Request {
    prompt: Vec<u32>,
    params: SamplingParams,
}

/// Prompts drawn from a few shared "system prompts" cut at various lengths, followed by short
/// random tails; some are exact repeats.
fn random_request(rng: &mut StdRng, systems: &[Vec<u32>], ignore_eos_all: bool) -> Request {
    let mut prompt = if rng.gen_bool(0.8) {
        let sys = &systems[rng.gen_range(0..systems.len())];
        sys[..rng.gen_range(1..=sys.len())].to_vec()
    } else {
        Vec::new()
    };
    let tail = if rng.gen_bool(0.2) {
        0
    } else {
        rng.gen_range(1..12)
    };
    prompt.extend((0..tail).map(|_| rng.gen_range(0..EOS)));
    if prompt.is_empty() {
        prompt.push(rng.gen_range(0..EOS));
    }
    let params = SamplingParams {
        max_tokens: rng.gen_range(1..40),
        ignore_eos: ignore_eos_all || rng.gen_bool(0.5),
        stop_token_ids: if rng.gen_bool(0.1) { vec![7] } else { vec![] },
        temperature: 0.0,
        ..Default::default()
    };
    Request { prompt, params }
}

struct SimReport {
    steps: usize,
    preempt_recomputes: usize,
    hit_tokens: u64,
    finished: usize,
    aborted: usize,
}

/// Feeds `num_requests` random requests into an engine over `num_blocks` blocks, a few at a
/// time between steps, aborting some; checks every output against a lone run.
fn simulate(
    seed: u64,
    config: SchedulerConfig,
    num_blocks: usize,
    num_requests: usize,
    ignore_eos_all: bool,
) -> SimReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let systems: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            let n = rng.gen_range(config.block_size..8 * config.block_size);
            (0..n).map(|_| rng.gen_range(0..EOS)).collect()
        })
        .collect();
    let runner = FakeRunner::new(&config, num_blocks);
    let mut engine = LLMEngine::new(runner, &config, VOCAB, vec![EOS]).unwrap();
    let mut requests: BTreeMap<u64, Request> = BTreeMap::new();
    let mut streamed: HashMap<u64, Vec<u32>> = HashMap::new();
    let (mut added, mut finished, mut aborted) = (0, 0, 0);
    let max_steps = 50 * num_requests + 1000;
    let mut steps = 0;
    while added < num_requests || !engine.is_finished() {
        if added < num_requests && rng.gen_bool(0.5) {
            for _ in 0..rng.gen_range(1..6).min(num_requests - added) {
                let r = random_request(&mut rng, &systems, ignore_eos_all);
                let id = engine
                    .add_request(r.prompt.clone(), r.params.clone())
                    .unwrap();
                requests.insert(id, r);
                added += 1;
            }
        }
        if !ignore_eos_all && rng.gen_bool(0.02) && !requests.is_empty() {
            let id = *requests.keys().next().unwrap();
            if engine.abort(id) {
                requests.remove(&id);
                streamed.remove(&id);
                aborted += 1;
            }
        }
        let out = engine.step().unwrap();
        steps += 1;
        assert!(steps <= max_steps, "no progress after {steps} steps");
        for (id, t) in out.new_tokens {
            streamed.entry(id).or_default().push(t);
        }
        for f in out.finished {
            let r = requests.remove(&f.seq_id).expect("finished once");
            assert_eq!(f.prompt_token_ids, r.prompt);
            let expected = expected_output(&r.prompt, &r.params, config.max_model_len);
            assert_eq!(f.token_ids, expected, "request {}", f.seq_id);
            assert_eq!(streamed.remove(&f.seq_id).unwrap_or_default(), f.token_ids);
            if r.params.ignore_eos && r.params.stop_token_ids.is_empty() {
                assert_eq!(f.token_ids.len(), r.params.max_tokens);
                assert_eq!(f.finish_reason, FinishReason::Length);
            }
            finished += 1;
        }
        let bm = engine.scheduler().block_manager();
        assert_eq!(bm.num_free_blocks() + bm.num_used_blocks(), num_blocks);
    }
    assert!(
        requests.is_empty(),
        "{} requests never finished",
        requests.len()
    );
    let bm = engine.scheduler().block_manager();
    assert_eq!(
        bm.num_used_blocks(),
        0,
        "blocks held after the last request"
    );
    assert_eq!(bm.num_free_blocks(), num_blocks);
    SimReport {
        steps,
        preempt_recomputes: engine.runner().recomputes,
        hit_tokens: bm.prefix_cache_stats().num_hit_tokens,
        finished,
        aborted,
    }
}

fn small_config(block_size: usize, enable_prefix_caching: bool) -> SchedulerConfig {
    SchedulerConfig {
        // Not a multiple of the block size, so chunks end inside blocks.
        max_num_batched_tokens: 45,
        max_num_seqs: 16,
        max_model_len: 96,
        block_size,
        enable_prefix_caching,
    }
}

#[test]
fn ignore_eos_requests_get_exactly_max_tokens_under_preemption() {
    let r = simulate(1, small_config(4, true), 40, 1500, true);
    assert_eq!(r.finished, 1500);
    assert!(r.preempt_recomputes > 0, "the budget must force preemption");
    assert!(r.hit_tokens > 0, "shared prefixes must hit the cache");
    assert!(r.steps < 1500 * 50);
}

#[test]
fn mixed_stops_aborts_and_prefix_sharing() {
    let r = simulate(2, small_config(8, true), 24, 1500, false);
    assert_eq!(r.finished + r.aborted, 1500);
    assert!(r.aborted > 0);
    assert!(r.preempt_recomputes > 0);
    assert!(r.hit_tokens > 0);
}

#[test]
fn without_prefix_caching_outputs_are_the_same() {
    let r = simulate(3, small_config(4, false), 40, 800, true);
    assert_eq!(r.finished, 800);
    assert_eq!(r.hit_tokens, 0);
    assert!(r.preempt_recomputes > 0);
}

#[test]
fn roomy_cache_never_preempts() {
    let r = simulate(4, small_config(4, true), 4096, 500, true);
    assert_eq!(r.finished, 500);
    assert_eq!(r.preempt_recomputes, 0);
}

#[test]
fn long_prompt_is_prefilled_in_budget_sized_chunks() {
    let config = SchedulerConfig {
        max_num_batched_tokens: 16,
        ..small_config(4, true)
    };
    let mut engine =
        LLMEngine::new(FakeRunner::new(&config, 64), &config, VOCAB, vec![EOS]).unwrap();
    let prompt: Vec<u32> = (0..70).map(|i| i % 300).collect();
    let params = SamplingParams {
        max_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    let id = engine.add_request(prompt.clone(), params.clone()).unwrap();
    let short = engine.add_request(vec![1, 2, 3], params.clone()).unwrap();
    let out = engine.generate_with(vec![], std::slice::from_ref(&params), |_| {});
    assert!(out.is_err(), "generate refuses a busy engine");
    let mut finished = Vec::new();
    while !engine.is_finished() {
        finished.extend(engine.step().unwrap().finished);
    }
    // 70 tokens in chunks of 16; the last 6-token chunk shares its step with the short prompt.
    assert_eq!(engine.runner().chunks[&id], vec![16, 16, 16, 16, 6]);
    assert_eq!(engine.runner().chunks[&short], vec![3]);
    assert_eq!(finished.len(), 2);
    let expected = expected_output(&prompt, &params, config.max_model_len);
    assert_eq!(
        finished.iter().find(|f| f.seq_id == id).unwrap().token_ids,
        expected
    );
}

#[test]
fn a_block_is_shared_only_once_fully_computed() {
    // Budget 7, blocks of 4: the first chunk of A stops at position 7, one short of filling its
    // second block. C, sharing A's first 8 tokens, arrives then. In the next step A computes
    // its last chunk (filling that block) and C could only join reusing A's first block, which
    // leaves it too many tokens for the 2 left in the budget; one step later both of A's blocks
    // are registered and C computes its last token only.
    let config = SchedulerConfig {
        max_num_batched_tokens: 7,
        ..small_config(4, true)
    };
    let mut engine =
        LLMEngine::new(FakeRunner::new(&config, 32), &config, VOCAB, vec![EOS]).unwrap();
    let params = SamplingParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    let a: Vec<u32> = (1..=12).collect();
    engine.add_request(a.clone(), params.clone()).unwrap();
    engine.step().unwrap();
    let c: Vec<u32> = a[..8].iter().copied().chain([99]).collect();
    let c_id = engine.add_request(c.clone(), params.clone()).unwrap();
    engine.step().unwrap();
    assert!(engine.scheduler().get(c_id).unwrap().block_table.is_empty());
    let mut outputs = Vec::new();
    while !engine.is_finished() {
        outputs.extend(engine.step().unwrap().finished);
    }
    assert_eq!(engine.runner().chunks[&c_id], vec![1]);
    assert_eq!(
        engine
            .scheduler()
            .block_manager()
            .prefix_cache_stats()
            .num_hit_tokens,
        8
    );
    let out_c = outputs.iter().find(|o| o.seq_id == c_id).unwrap();
    assert_eq!(
        out_c.token_ids,
        expected_output(&c, &params, config.max_model_len)
    );
}
