//! The counterpart of nano-vLLM's example.py: two chat prompts through the `LLM` API.
//!
//! `cargo run --release -p nanovllm --example example -- [MODEL]` where MODEL is a Qwen3
//! folder (config.json, tokenizer.json, *.safetensors) or a built-in name for dummy weights
//! (default `qwen3-0.6b`, whose random weights produce random text).

use nanovllm::tokenizer::ChatMessage;
use nanovllm::{EngineArgs, EngineConfig, Prompt, SamplingParams, LLM};

fn main() -> nanovllm::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "qwen3-0.6b".to_string());
    let args = EngineArgs {
        config: EngineConfig {
            enforce_eager: true,
            tensor_parallel_size: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut llm = LLM::new(&model, args)?;
    let sampling_params = SamplingParams {
        temperature: 0.6,
        max_tokens: 256,
        ..Default::default()
    };
    let prompts = ["introduce yourself", "list all prime numbers within 100"]
        .iter()
        .map(|p| llm.apply_chat_template(&[ChatMessage::user(*p)], false))
        .collect::<nanovllm::Result<Vec<String>>>()?;
    let inputs: Vec<Prompt> = prompts.iter().cloned().map(Prompt::Text).collect();
    let outputs = llm.generate(&inputs, &[sampling_params], true)?;
    for (prompt, output) in prompts.iter().zip(&outputs) {
        println!("\n");
        println!("Prompt: {prompt:?}");
        println!("Completion: {:?}", output.text);
    }
    Ok(())
}
