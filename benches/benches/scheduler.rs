//! CPU cost of the engine's bookkeeping: one `LLMEngine::step_into` (scheduler + block manager +
//! postprocess, the output buffers reused as an engine loop does) with a fake model runner that
//! returns a token at once, so only the CPU side is timed. `benches/python/scheduler_bench.py` drives nano-vLLM's own scheduler, block manager and
//! sequence through the same workloads; `docs/benchmarks.md` compares the two.
//!
//! Workloads (blocks of 256 tokens, prompt token ids < 10,000, prompts and ids drawn from the
//! SplitMix64 stream seeded with 0, identical in the Python script):
//! - `decode/256`, `decode/512`: that many sequences decoding (prompts of 100..1,024 tokens,
//!   already prefilled, enough KV blocks that nothing is preempted); one step decodes all of them.
//!   The state is rebuilt (untimed) every 1,024 steps.
//! - `prefill/no_hits`, `prefill/prefix_hits`: one step prefilling 256 new 1,024-token prompts
//!   (budget 262,144 tokens, so a single step) on a long-lived engine whose free blocks still hold
//!   earlier prompts' cached content; with hits, every prompt starts with the same 768 tokens
//!   (3 blocks), which an earlier request left in the prefix cache.
//!
//! Run: `cargo bench -p nanovllm-benches --no-default-features --bench scheduler`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nanovllm_engine::{
    LLMEngine, SamplingParams, SchedulerConfig, Sequence, StepOutput, StepRunner,
};
use nanovllm_utils::Result;
use std::time::{Duration, Instant};

const BLOCK_SIZE: usize = 256;
const VOCAB: usize = 151_936;
const DECODE_STEPS_PER_STATE: usize = 1024;

/// SplitMix64, the workload's random stream (same numbers as the Python script's).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % 10_000) as u32).collect()
    }
}

/// Returns one token per sequence at once; the token changes every step.
struct FakeRunner {
    num_blocks: usize,
    steps: u32,
}

impl StepRunner for FakeRunner {
    fn run(&mut self, seqs: &[&Sequence], _is_prefill: bool) -> Result<Vec<u32>> {
        self.steps += 1;
        Ok(vec![1 + self.steps % 9_999; seqs.len()])
    }

    fn num_kvcache_blocks(&self) -> usize {
        self.num_blocks
    }
}

fn engine(num_blocks: usize, max_num_batched_tokens: usize) -> LLMEngine<FakeRunner> {
    let config = SchedulerConfig {
        max_num_batched_tokens,
        max_num_seqs: 512,
        max_model_len: 4096,
        block_size: BLOCK_SIZE,
        enable_prefix_caching: true,
    };
    let runner = FakeRunner {
        num_blocks,
        steps: 0,
    };
    LLMEngine::new(runner, &config, VOCAB, vec![151_645]).expect("engine")
}

fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.6,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// `n` sequences, prefilled, ready to decode.
fn decode_state(n: usize) -> LLMEngine<FakeRunner> {
    let mut rng = SplitMix64(0);
    let mut e = engine(n * 9, 16_384);
    for _ in 0..n {
        let len = 100 + (rng.next() % 925) as usize;
        e.add_request(rng.tokens(len), params(2048))
            .expect("request");
    }
    while e.scheduler().num_waiting() > 0 {
        e.step().expect("prefill");
    }
    e
}

/// An engine for the prefill workload; with `hits`, a finished request has left a 768-token
/// prefix (3 blocks) in the prefix cache. Returns the engine, the random stream and the prefix.
fn prefill_engine(hits: bool) -> (LLMEngine<FakeRunner>, SplitMix64, Vec<u32>) {
    let mut rng = SplitMix64(0);
    let mut e = engine(2048, 256 * 1024);
    let prefix = if hits { rng.tokens(768) } else { Vec::new() };
    if hits {
        let mut warm = prefix.clone();
        warm.push(1);
        e.add_request(warm, params(1)).expect("request");
        while !e.is_finished() {
            e.step().expect("warm-up");
        }
    }
    (e, rng, prefix)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_step");
    for n in [256, 512] {
        g.bench_function(format!("decode/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut e = decode_state(n);
                let mut out = StepOutput::default();
                let mut steps = 0;
                for _ in 0..iters {
                    if steps == DECODE_STEPS_PER_STATE {
                        e = decode_state(n);
                        steps = 0;
                    }
                    let t = Instant::now();
                    e.step_into(&mut out).expect("step");
                    total += t.elapsed();
                    assert!(!out.is_prefill && out.num_tokens == n);
                    black_box(&out);
                    steps += 1;
                }
                total
            })
        });
    }
    for (name, hits) in [("prefill/no_hits", false), ("prefill/prefix_hits", true)] {
        g.bench_function(name, |b| {
            // One engine throughout, as in a server: each iteration queues 256 new prompts
            // (fresh random tails, so only the shared prefix can hit), times the step that
            // prefills them all, then aborts them, which returns their blocks to the free list
            // (still cached, evicted as later iterations take them).
            let (mut e, mut rng, prefix) = prefill_engine(hits);
            let mut out = StepOutput::default();
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ids: Vec<u64> = (0..256)
                        .map(|_| {
                            let mut prompt = prefix.clone();
                            prompt.extend(rng.tokens(1024 - prefix.len()));
                            e.add_request(prompt, params(16)).expect("request")
                        })
                        .collect();
                    let t = Instant::now();
                    e.step_into(&mut out).expect("step");
                    total += t.elapsed();
                    assert!(out.is_prefill && out.num_tokens > 0);
                    black_box(&out);
                    for id in ids {
                        e.abort(id);
                    }
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
