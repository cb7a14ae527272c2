//! Model definitions over the nanovllm layers: Qwen3.
#![deny(missing_docs)]
