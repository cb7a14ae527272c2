//! Dummy weights at real size: parameter counts of the built-in Qwen3 configurations, and the
//! time `load_dummy` takes for Qwen3-0.6B (vLLM's `--load-format dummy`, what the benchmark runs
//! on). The timing test is ignored by default (it needs a 16-core machine to be meaningful and
//! 1.2 GB of memory); run it with
//! `cargo test -p nanovllm-models --release --no-default-features --test dummy_load -- --ignored --nocapture`.

use std::sync::Arc;
use std::time::Instant;

use nanovllm_kernels::cpu::CpuBackend;
use nanovllm_layers::tp::SingleRank;
use nanovllm_models::qwen3::{param_count, weight_bytes, weight_bytes_per_rank, Qwen3ForCausalLM};
use nanovllm_utils::ModelConfig;

#[test]
fn parameter_counts_of_the_builtin_configs() {
    // Qwen3-0.6B: 155.6 M embedding (tied) + 28 layers of 15.73 M + the final norm; the model
    // card's "0.6B, 0.44B non-embedding".
    let c = ModelConfig::builtin("qwen3-0.6b").unwrap();
    assert_eq!(param_count(&c), 596_049_920);
    assert_eq!(param_count(&c) - c.vocab_size * c.hidden_size, 440_467_456);
    assert_eq!(weight_bytes(&c), 2 * 596_049_920);
    // Norms (28 layers x (2 x 1024 + 2 x 128) + 1024) are replicated, the rest halved.
    let replicated = 28 * (2 * 1024 + 2 * 128) + 1024;
    assert_eq!(
        weight_bytes_per_rank(&c, 2),
        2 * (replicated + (596_049_920 - replicated) / 2)
    );
    assert_eq!(weight_bytes_per_rank(&c, 1), weight_bytes(&c));
    // Qwen3-8B unties its embeddings: 8.19 B parameters.
    let c = ModelConfig::builtin("qwen3-8b").unwrap();
    assert_eq!(param_count(&c), 8_190_735_360);
}

#[test]
#[ignore = "timing at real size; run on a 16-core machine"]
fn dummy_load_of_qwen3_0_6b_is_fast() {
    let be = CpuBackend::new();
    let c = ModelConfig::builtin("qwen3-0.6b").unwrap();
    let mut m = Qwen3ForCausalLM::new(&be, &c, Arc::new(SingleRank)).unwrap();
    let t = Instant::now();
    m.load_dummy(&be, 0).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    eprintln!(
        "load_dummy(Qwen3-0.6B, {} parameters): {secs:.2} s on {threads} threads",
        param_count(&c)
    );
    if threads >= 16 {
        assert!(secs < 2.0, "{secs:.2} s");
    }
}
