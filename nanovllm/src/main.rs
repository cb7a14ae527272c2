//! The `nanovllm` command: `generate`, `chat`, `bench` and `serve` over the [`nanovllm::LLM`] API.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nanovllm::bench::{run_bench, BenchArgs};
use nanovllm::tokenizer::ChatMessage;
use nanovllm::{Device, EngineArgs, Prompt, SamplingParams, WeightsFormat, LLM};
use nanovllm_utils::EngineConfig;

#[derive(Parser)]
#[command(
    name = "nanovllm",
    version,
    about = "A small, fast LLM inference engine for Qwen3"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(GenerateArgs),
    /// Chat interactively (chat template, streamed output, history).
    Chat(ChatArgs),
    /// Throughput benchmark: nano-vLLM's bench.py workload.
    Bench(BenchCli),
    /// OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics).
    Serve(ServeArgs),
    /// Writes teacher-forced logits and greedy continuations of token-id prompts, for the
    /// comparison with HF transformers (scripts/gpu/hf_compare.py).
    #[command(hide = true)]
    HfDump(HfDumpArgs),
    /// A tensor-parallel worker process, started by rank 0 (`--tp N`), never by hand.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Args)]
struct WorkerArgs {
    /// The group's shared-memory file.
    #[arg(long)]
    shm: std::path::PathBuf,
    /// This worker's rank (1..N).
    #[arg(long)]
    rank: usize,
}

#[derive(Args)]
struct HfDumpArgs {
    #[command(flatten)]
    engine: EngineOpts,
    /// JSON file `{"prompts": [[ids...], ...], "max_tokens": N}`.
    #[arg(long)]
    input: std::path::PathBuf,
    /// Folder for `tokens.json` and `logits_<i>.f32` ([len, vocab] little-endian f32).
    #[arg(long)]
    outdir: std::path::PathBuf,
    /// Also write the teacher-forced logits of every position.
    #[arg(long)]
    score: bool,
}

/// Where the model runs and how the engine is sized.
#[derive(Args, Clone, Debug)]
pub struct EngineOpts {
    /// Model folder (config.json, tokenizer.json, *.safetensors) or a built-in name
    /// (qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b) for dummy weights.
    #[arg(long, default_value = "qwen3-0.6b")]
    model: String,
    /// Device: auto (GPU when there is one), cuda, cpu.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    cuda_device: usize,
    /// Weights: auto (safetensors for a folder, dummy for a built-in name), safetensors, dummy.
    #[arg(long, value_enum, default_value_t = LoadFormatArg::Auto)]
    load_format: LoadFormatArg,
    /// Seed of dummy weights.
    #[arg(long, default_value_t = 0)]
    dummy_seed: u64,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Run decode eagerly, without CUDA graphs.
    #[arg(long)]
    enforce_eager: bool,
    /// Token budget of one step.
    #[arg(long, default_value_t = EngineConfig::default().max_num_batched_tokens)]
    max_num_batched_tokens: usize,
    /// Sequences in one step at most.
    #[arg(long, default_value_t = EngineConfig::default().max_num_seqs)]
    max_num_seqs: usize,
    /// Longest sequence (prompt + output); capped by the model's max_position_embeddings.
    #[arg(long, default_value_t = EngineConfig::default().max_model_len)]
    max_model_len: usize,
    /// Fraction of GPU memory the engine may use.
    #[arg(long, default_value_t = EngineConfig::default().gpu_memory_utilization)]
    gpu_memory_utilization: f32,
    /// Tokens per KV-cache block (a power of two, at most 256).
    #[arg(long, default_value_t = EngineConfig::default().kvcache_block_size)]
    block_size: usize,
    /// KV-cache blocks (default: as many as memory allows).
    #[arg(long)]
    num_kvcache_blocks: Option<usize>,
    /// Turn prefix caching off.
    #[arg(long)]
    no_prefix_caching: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Auto,
    Cuda,
    Cpu,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LoadFormatArg {
    Auto,
    Safetensors,
    Dummy,
}

impl EngineOpts {
    fn engine_args(&self) -> EngineArgs {
        EngineArgs {
            config: EngineConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                max_model_len: self.max_model_len,
                gpu_memory_utilization: self.gpu_memory_utilization,
                tensor_parallel_size: self.tp,
                enforce_eager: self.enforce_eager,
                kvcache_block_size: self.block_size,
                num_kvcache_blocks: self.num_kvcache_blocks,
                enable_prefix_caching: !self.no_prefix_caching,
            },
            device: match self.device {
                DeviceArg::Auto => Device::Auto,
                DeviceArg::Cuda => Device::Cuda(self.cuda_device),
                DeviceArg::Cpu => Device::Cpu,
            },
            load_format: match self.load_format {
                LoadFormatArg::Auto => WeightsFormat::Auto,
                LoadFormatArg::Safetensors => WeightsFormat::Safetensors,
                LoadFormatArg::Dummy => WeightsFormat::Dummy,
            },
            worker_exe: None,
            dummy_seed: self.dummy_seed,
        }
    }
}

/// Sampling options shared by `generate` and `chat`.
#[derive(Args, Clone, Debug)]
struct SamplingOpts {
    /// Temperature; 0 is greedy. Default: the model's generation_config.json, else 0.6.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Seed of the sampler (fixed seed: same tokens on every run).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingOpts {
    fn params(&self, llm: &LLM) -> SamplingParams {
        let mut p = llm.default_sampling_params();
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(t) = self.top_p {
            p.top_p = t;
        }
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        p.max_tokens = self.max_tokens;
        p.seed = self.seed;
        p.ignore_eos = self.ignore_eos;
        p
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineOpts,
    #[command(flatten)]
    sampling: SamplingOpts,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (one user turn).
    #[arg(long)]
    chat: bool,
    /// With --chat: let the model think first (Qwen3's thinking mode).
    #[arg(long)]
    enable_thinking: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    engine: EngineOpts,
    #[command(flatten)]
    sampling: SamplingOpts,
    /// An optional system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Let the model think first (Qwen3's thinking mode).
    #[arg(long)]
    enable_thinking: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    engine: EngineOpts,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Name clients pass as `model` (default: the --model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests in flight at most; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_concurrent_requests: usize,
}

#[derive(Args)]
struct BenchCli {
    #[command(flatten)]
    engine: EngineOpts,
    /// Number of sequences (default 256 on a GPU, fewer on the CPU backend).
    #[arg(long)]
    num_seqs: Option<usize>,
    /// Shortest prompt.
    #[arg(long)]
    min_input_len: Option<usize>,
    /// Longest prompt.
    #[arg(long)]
    max_input_len: Option<usize>,
    /// Fewest output tokens.
    #[arg(long)]
    min_output_len: Option<usize>,
    /// Most output tokens.
    #[arg(long)]
    max_output_len: Option<usize>,
    /// Seed of the workload (Python's random.seed).
    #[arg(long, default_value_t = 0)]
    workload_seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::HfDump(a) => hf_dump(a),
        Command::Worker(a) => nanovllm::tp::run_worker(&a.shm, a.rank),
        Command::Serve(a) => serve(a),
        Command::Bench(a) => run_bench(
            &a.engine.model,
            a.engine.engine_args(),
            BenchArgs {
                num_seqs: a.num_seqs,
                min_input_len: a.min_input_len,
                max_input_len: a.max_input_len,
                min_output_len: a.min_output_len,
                max_output_len: a.max_output_len,
                seed: a.workload_seed,
                json: a.json,
                process_start: start,
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(a: GenerateArgs) -> nanovllm::Result<()> {
    let mut llm = LLM::new(&a.engine.model, a.engine.engine_args())?;
    let params = a.sampling.params(&llm);
    let prompt = if a.chat {
        llm.apply_chat_template(&[ChatMessage::user(a.prompt.clone())], a.enable_thinking)?
    } else {
        a.prompt.clone()
    };
    let outputs = llm.generate(&[Prompt::Text(prompt)], &[params], true)?;
    for out in outputs {
        println!("{}", out.text);
    }
    Ok(())
}

fn chat(a: ChatArgs) -> nanovllm::Result<()> {
    let mut llm = LLM::new(&a.engine.model, a.engine.engine_args())?;
    let params = a.sampling.params(&llm);
    let mut history = Vec::new();
    if let Some(system) = &a.system {
        history.push(ChatMessage::system(system.clone()));
    }
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!(
        "nanovllm chat on {}: type a message, an empty line or Ctrl-D ends",
        llm.info().device
    );
    loop {
        print!("> ");
        stdout.flush().ok();
        let mut line = String::new();
        if stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| nanovllm::Error::io("stdin", e))?
            == 0
        {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            break;
        }
        history.push(ChatMessage::user(line));
        let prompt = llm.apply_chat_template(&history, a.enable_thinking)?;
        let reply = llm.stream_text(Prompt::Text(prompt), params.clone(), |piece| {
            print!("{piece}");
            std::io::stdout().flush().ok();
        })?;
        println!();
        history.push(ChatMessage::assistant(reply));
    }
    Ok(())
}

fn serve(a: ServeArgs) -> nanovllm::Result<()> {
    let llm = LLM::new(&a.engine.model, a.engine.engine_args())?;
    let opts = nanovllm::serve::ServeOptions {
        served_model_name: a.served_model_name.unwrap_or(a.engine.model.clone()),
        max_concurrent_requests: a.max_concurrent_requests,
    };
    nanovllm::serve::run(llm, &a.host, a.port, opts)
}

fn hf_dump(a: HfDumpArgs) -> nanovllm::Result<()> {
    use nanovllm::Error;
    #[derive(serde::Deserialize)]
    struct Input {
        prompts: Vec<Vec<u32>>,
        max_tokens: usize,
    }
    let text = std::fs::read_to_string(&a.input).map_err(|e| Error::io(&a.input, e))?;
    let input: Input = serde_json::from_str(&text)
        .map_err(|e| Error::Other(format!("{}: {e}", a.input.display())))?;
    std::fs::create_dir_all(&a.outdir).map_err(|e| Error::io(&a.outdir, e))?;
    let mut llm = LLM::new(&a.engine.model, a.engine.engine_args())?;
    if a.score {
        for (i, p) in input.prompts.iter().enumerate() {
            let logits = llm.score(p)?;
            let path = a.outdir.join(format!("logits_{i}.f32"));
            let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        }
    }
    let params = SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: input.max_tokens,
        ..Default::default()
    };
    let prompts: Vec<Prompt> = input.prompts.into_iter().map(Prompt::Tokens).collect();
    let outputs = llm.generate(&prompts, &[params], false)?;
    let tokens: Vec<&Vec<u32>> = outputs.iter().map(|o| &o.token_ids).collect();
    let path = a.outdir.join("tokens.json");
    std::fs::write(&path, serde_json::json!({ "tokens": tokens }).to_string())
        .map_err(|e| Error::io(&path, e))?;
    Ok(())
}
