//! nanovllm: offline LLM inference for Qwen3, as fast as the hardware allows, in a codebase
//! small enough to read in an evening.
#![deny(missing_docs)]
pub mod tokenizer;
pub mod workload;
