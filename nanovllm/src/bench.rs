//! `nanovllm bench`: nano-vLLM's bench.py workload (256 sequences, prompts of 100..=1024
//! random ids, 100..=1024 output tokens each, temperature 0.6, ignore_eos, Python's
//! `random.seed(0)` reproduced exactly), after one warm-up generate as bench.py does.
//!
//! On the CPU backend the default workload is shrunk (8 sequences, prompts of 16..=64 ids,
//! 16..=32 output tokens) so that it ends in about a minute on two cores; it says so.

use std::time::Instant;

use crate::llm::{EngineArgs, Prompt, LLM};
use crate::workload::Workload;
use nanovllm_engine::sampling_params::SamplingParams;
use nanovllm_utils::Result;

/// Options of the benchmark; `None` takes the default for the device.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Sequences.
    pub num_seqs: Option<usize>,
    /// Shortest prompt.
    pub min_input_len: Option<usize>,
    /// Longest prompt.
    pub max_input_len: Option<usize>,
    /// Fewest output tokens.
    pub min_output_len: Option<usize>,
    /// Most output tokens.
    pub max_output_len: Option<usize>,
    /// Workload seed (Python's `random.seed`).
    pub seed: u64,
    /// Print one JSON object instead of text.
    pub json: bool,
    /// When the process started, for the cold-start figure.
    pub process_start: Instant,
}

/// What one benchmark run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// The device, in words.
    pub device: String,
    /// Sequences in the workload.
    pub num_seqs: usize,
    /// Prompt tokens in all.
    pub prompt_tokens: usize,
    /// Output tokens in all.
    pub output_tokens: usize,
    /// Seconds of the timed generate.
    pub seconds: f64,
    /// Output tokens per second.
    pub output_tokens_per_second: f64,
    /// Seconds spent in prefill steps.
    pub prefill_seconds: f64,
    /// Seconds spent in decode steps.
    pub decode_seconds: f64,
    /// Decode steps.
    pub decode_steps: usize,
    /// Seconds the model runner spent building inputs and copying them to the device.
    pub runner_prepare_seconds: f64,
    /// Seconds from queuing device work to having the sampled tokens on the host.
    pub runner_execute_seconds: f64,
    /// Seconds of engine work outside the runner (scheduling, postprocessing, outputs).
    pub engine_host_seconds: f64,
    /// Seconds from process start to engine ready.
    pub cold_start_seconds: f64,
    /// Seconds spent generating or loading weights.
    pub weights_seconds: f64,
    /// Seconds spent capturing CUDA graphs.
    pub graph_capture_seconds: f64,
    /// Seconds of cold start spent in the start-up prefills (GEMM tuning of prefill sizes).
    pub prefill_warm_up_seconds: f64,
    /// KV-cache blocks.
    pub kvcache_blocks: usize,
    /// KV-cache size in GiB.
    pub kvcache_gib: f64,
    /// Device memory in use after the run, GiB (all buffers are allocated at start-up, so this
    /// is the peak).
    pub memory_used_gib: f64,
}

/// Runs the benchmark and prints its report.
pub fn run_bench(model: &str, engine: EngineArgs, args: BenchArgs) -> Result<()> {
    let mut llm = LLM::new(model, engine)?;
    let cold_start = args.process_start.elapsed().as_secs_f64();
    let on_cpu = llm.is_cpu();
    let (n, lo_in, hi_in, lo_out, hi_out) = if on_cpu {
        (8, 16, 64, 16, 32)
    } else {
        (256, 100, 1024, 100, 1024)
    };
    let num_seqs = args.num_seqs.unwrap_or(n);
    let (min_in, max_in) = (
        args.min_input_len.unwrap_or(lo_in),
        args.max_input_len.unwrap_or(hi_in),
    );
    let (min_out, max_out) = (
        args.min_output_len.unwrap_or(lo_out),
        args.max_output_len.unwrap_or(hi_out),
    );
    let workload = Workload::bench_py(num_seqs, min_in, max_in, min_out, max_out, args.seed)?;
    if on_cpu && !args.json {
        eprintln!(
            "no GPU in use: running a smaller workload on the CPU backend ({num_seqs} sequences, \
             prompts of {min_in}..={max_in} tokens, {min_out}..={max_out} output tokens); pass \
             --num-seqs and the length options to change it"
        );
    }

    // Warm-up, as bench.py: one short generate.
    let warmup = SamplingParams {
        max_tokens: 16,
        ..Default::default()
    };
    llm.generate(&[Prompt::Tokens(vec![33, 2, 61, 4])], &[warmup], false)?;

    let prompts: Vec<Prompt> = workload
        .prompts
        .iter()
        .cloned()
        .map(Prompt::Tokens)
        .collect();
    let params: Vec<SamplingParams> = workload
        .max_tokens
        .iter()
        .map(|&max_tokens| SamplingParams {
            temperature: 0.6,
            ignore_eos: true,
            max_tokens,
            ..Default::default()
        })
        .collect();
    llm.reset_step_stats();
    let profile_before = llm.runner_profile();
    let t = Instant::now();
    let output_tokens = if profile_decode_requested() && !on_cpu {
        generate_profiling_decode(&mut llm, &prompts, &params)?
    } else {
        let outputs = llm.generate(&prompts, &params, false)?;
        outputs.iter().map(|o| o.token_ids.len()).sum()
    };
    let seconds = t.elapsed().as_secs_f64();
    let stats = llm.step_stats();
    let profile = llm.runner_profile();
    let prepare = profile.prepare_seconds - profile_before.prepare_seconds;
    let execute = profile.execute_seconds - profile_before.execute_seconds;
    let info = llm.info();
    let report = BenchReport {
        device: info.device.clone(),
        num_seqs,
        prompt_tokens: workload.total_prompt_tokens(),
        output_tokens,
        seconds,
        output_tokens_per_second: output_tokens as f64 / seconds,
        prefill_seconds: stats.prefill_seconds,
        decode_seconds: stats.decode_seconds,
        decode_steps: stats.decode_steps,
        runner_prepare_seconds: prepare,
        runner_execute_seconds: execute,
        engine_host_seconds: (seconds - prepare - execute).max(0.0),
        cold_start_seconds: cold_start,
        weights_seconds: info.runner.load_seconds,
        graph_capture_seconds: info.runner.capture_seconds,
        prefill_warm_up_seconds: info.runner.prefill_warm_up_seconds,
        kvcache_blocks: info.runner.num_kvcache_blocks,
        kvcache_gib: info.runner.kvcache_bytes as f64 / (1u64 << 30) as f64,
        memory_used_gib: llm.memory_used_bytes()? as f64 / (1u64 << 30) as f64,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .map_err(|e| nanovllm_utils::Error::Other(e.to_string()))?
        );
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Whether `NANOVLLM_PROFILE_DECODE` (set to anything but 0) asks for the decode steps to be
/// bracketed for a profiler (scripts/gpu/profile.sh).
fn profile_decode_requested() -> bool {
    nanovllm_utils::env_switch("NANOVLLM_PROFILE_DECODE", false)
}

/// The timed run for a profiler started with `--profile-from-start off`: the requests are
/// stepped one engine step at a time and the profiler collects from the second decode step on
/// (prefill and the warm-up stay out of the profile) until a step is not a decode step.
/// Returns the output tokens.
fn generate_profiling_decode(
    llm: &mut LLM,
    prompts: &[Prompt],
    params: &[SamplingParams],
) -> Result<usize> {
    for (prompt, sp) in prompts.iter().zip(params) {
        llm.add_request(prompt, sp.clone())?;
    }
    let mut tokens = 0;
    let mut profiling = false;
    let mut run = || -> Result<()> {
        while !llm.is_finished() {
            let decode_steps = llm.step_stats().decode_steps;
            let events = llm.step()?;
            tokens += events.iter().map(|e| e.new_token_ids.len()).sum::<usize>();
            let decoding = llm.step_stats().decode_steps > decode_steps;
            if decoding != profiling {
                profiler_range(decoding)?;
                profiling = decoding;
            }
        }
        Ok(())
    };
    let result = run();
    if profiling {
        profiler_range(false)?;
    }
    result.map(|()| tokens)
}

#[cfg(feature = "cuda")]
fn profiler_range(active: bool) -> Result<()> {
    nanovllm_kernels::cuda::profiler_range(active)
}

#[cfg(not(feature = "cuda"))]
fn profiler_range(_active: bool) -> Result<()> {
    Err(nanovllm_utils::Error::Other(
        "NANOVLLM_PROFILE_DECODE needs a build with the cuda feature".into(),
    ))
}

fn print_report(r: &BenchReport) {
    println!("device: {}", r.device);
    println!(
        "workload: {} sequences, {} prompt tokens, {} output tokens",
        r.num_seqs, r.prompt_tokens, r.output_tokens
    );
    println!(
        "Total: {}tok, Time: {:.2}s, Throughput: {:.2}tok/s",
        r.output_tokens, r.seconds, r.output_tokens_per_second
    );
    println!(
        "prefill {:.3}s, decode {:.3}s over {} steps",
        r.prefill_seconds, r.decode_seconds, r.decode_steps
    );
    println!(
        "host work: prepare {:.3}s, engine {:.3}s ({:.1}% of the run); device + copies {:.3}s",
        r.runner_prepare_seconds,
        r.engine_host_seconds,
        100.0 * (r.runner_prepare_seconds + r.engine_host_seconds) / r.seconds,
        r.runner_execute_seconds
    );
    println!(
        "cold start {:.2}s (weights {:.2}s, prefill warm-up {:.2}s, graph capture {:.2}s); KV \
         cache {} blocks, {:.2} GiB; memory in use {:.2} GiB",
        r.cold_start_seconds,
        r.weights_seconds,
        r.prefill_warm_up_seconds,
        r.graph_capture_seconds,
        r.kvcache_blocks,
        r.kvcache_gib,
        r.memory_used_gib
    );
}
