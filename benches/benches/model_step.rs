//! One model-runner step end to end, as the engine runs it: decode at batch 1, 64 and 256
//! (contexts of 1,024 tokens, CUDA graph replay included) and one prefill step of 16,384
//! tokens (16 prompts of 1,024), on dummy Qwen3-0.6B weights. Each iteration is
//! prepare inputs -> copy -> forward -> LM head -> sample -> token ids back on the host.
//!
//! Runs on the first CUDA GPU. Without one it says so and runs the same steps on the CPU
//! backend with smaller sizes (decode at batch 1 and 4 over 32-token contexts, prefill of 32
//! tokens), so that the bench itself is exercised everywhere.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use nanovllm_engine::model_runner::{LoadFormat, ModelRunner};
use nanovllm_engine::{SamplingParams, Sequence};
use nanovllm_kernels::Backend;
use nanovllm_utils::{EngineConfig, ModelConfig};

const BLOCK: usize = 256;

/// Sequences of `len` tokens each, holding consecutive KV blocks, about to compute
/// `scheduled` tokens from `cached` on (decode: the last token; prefill: all of them).
fn sequences(num: usize, len: usize, cached: usize) -> Vec<Sequence> {
    let blocks = len.div_ceil(BLOCK);
    (0..num)
        .map(|i| {
            let prompt: Vec<u32> = (0..len as u32)
                .map(|t| (t * 7 + i as u32) % 10_000)
                .collect();
            let params = SamplingParams {
                temperature: 0.6,
                ignore_eos: true,
                ..Default::default()
            };
            let mut seq = Sequence::new(i as u64, prompt, params, i as u64).expect("prompt");
            seq.block_table = (0..blocks as u32)
                .map(|b| i as u32 * blocks as u32 + b)
                .collect();
            seq.num_cached_tokens = cached;
            seq.num_scheduled_tokens = len - cached;
            seq
        })
        .collect()
}

fn bench_on<B: Backend>(
    c: &mut Criterion,
    be: B,
    decode: &[(usize, usize)],
    prefill: (usize, usize),
) {
    let model = ModelConfig::builtin("qwen3-0.6b").expect("built-in config");
    let mut config = EngineConfig {
        max_num_seqs: 256,
        max_model_len: 2048,
        ..Default::default()
    };
    config.validate(&model).expect("engine config");
    let needed = decode
        .iter()
        .map(|&(n, len)| n * len.div_ceil(BLOCK))
        .chain([prefill.0 * prefill.1.div_ceil(BLOCK)])
        .max()
        .unwrap_or(1);
    config.num_kvcache_blocks = Some(needed.max(config.max_model_len.div_ceil(BLOCK)));
    let name = be.name();
    let mut runner = ModelRunner::new(
        Arc::new(be),
        &model,
        &config,
        None,
        &LoadFormat::Dummy { seed: 0 },
    )
    .expect("model runner");
    let mut group = c.benchmark_group(format!("model_step/{name}"));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for &(num, len) in decode {
        let seqs = sequences(num, len, len - 1);
        let refs: Vec<&Sequence> = seqs.iter().collect();
        group.bench_function(format!("decode/batch{num}/ctx{len}"), |b| {
            b.iter(|| black_box(runner.run_step(&refs, false).expect("decode step")))
        });
    }
    let (num, len) = prefill;
    let seqs = sequences(num, len, 0);
    let refs: Vec<&Sequence> = seqs.iter().collect();
    group.bench_function(format!("prefill/{}tokens", num * len), |b| {
        b.iter(|| black_box(runner.run_step(&refs, true).expect("prefill step")))
    });
    group.finish();
}

fn model_step(c: &mut Criterion) {
    #[cfg(feature = "cuda")]
    match nanovllm_kernels::cuda::CudaBackend::new(0) {
        Ok(be) => return bench_on(c, be, &[(1, 1024), (64, 1024), (256, 1024)], (16, 1024)),
        Err(e) => eprintln!("model_step: no GPU ({e}); running the small CPU version instead"),
    }
    bench_on(
        c,
        nanovllm_kernels::cpu::CpuBackend::new(),
        &[(1, 32), (4, 32)],
        (1, 32),
    );
}

criterion_group!(benches, model_step);
criterion_main!(benches);
