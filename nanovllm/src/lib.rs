//! nanovllm: offline LLM inference for Qwen3, as fast as the hardware allows, in a codebase
//! small enough to read in an evening.
//!
//! ```no_run
//! use nanovllm::{EngineArgs, Prompt, SamplingParams, LLM};
//!
//! // A model folder with config.json, tokenizer.json and *.safetensors, or a built-in name
//! // such as "qwen3-0.6b" for dummy (random) weights.
//! let mut llm = LLM::new("qwen3-0.6b", EngineArgs::default())?;
//! let params = SamplingParams { temperature: 0.6, max_tokens: 64, ..Default::default() };
//! let outputs = llm.generate(&[Prompt::from("Hello, my name is")], &[params], true)?;
//! println!("{}", outputs[0].text);
//! # Ok::<(), nanovllm::Error>(())
//! ```
#![deny(missing_docs)]

pub mod bench;
mod builtin;
pub mod llm;
pub mod serve;
pub mod tokenizer;
pub mod tp;
pub mod workload;

pub use llm::{
    Device, EngineArgs, EngineMetrics, LoadInfo, Prompt, RequestOutput, StepStats, StreamEvent,
    WeightsFormat, LLM,
};
pub use nanovllm_engine::sampling_params::SamplingParams;
pub use nanovllm_engine::sequence::FinishReason;
pub use nanovllm_utils::{EngineConfig, Error, Result};
