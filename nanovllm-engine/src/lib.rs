//! The inference engine: request -> scheduler -> model runner -> sampler -> scheduler.
//!
//! The CPU side needs no GPU library (`default-features = false`): [`sampling_params`],
//! [`sequence`], [`block_manager`] (paged KV blocks with prefix caching), [`scheduler`]
//! (chunked prefill, decode, preemption) and [`llm_engine`] (the loop, written against the
//! [`StepRunner`] trait).
//!
//! The engine loop over a toy runner that always answers "previous token + 1":
//!
//! ```
//! use nanovllm_engine::{LLMEngine, SamplingParams, SchedulerConfig, Sequence, StepRunner};
//!
//! struct Count;
//! impl StepRunner for Count {
//!     fn run(&mut self, seqs: &[&Sequence], _prefill: bool) -> nanovllm_utils::Result<Vec<u32>> {
//!         Ok(seqs.iter().map(|s| s.last_token + 1).collect())
//!     }
//!     fn num_kvcache_blocks(&self) -> usize {
//!         64
//!     }
//! }
//!
//! let config = SchedulerConfig { block_size: 16, ..Default::default() };
//! let mut engine = LLMEngine::new(Count, &config, 1000, vec![])?;
//! let params = SamplingParams { max_tokens: 3, ignore_eos: true, ..Default::default() };
//! let out = engine.generate(vec![vec![1, 2, 3]], &[params])?;
//! assert_eq!(out[0].token_ids, vec![4, 5, 6]);
//! # Ok::<(), nanovllm_utils::Error>(())
//! ```
#![deny(missing_docs)]

pub mod block_manager;
pub mod llm_engine;
pub mod model_runner;
pub mod sampling_params;
pub mod scheduler;
pub mod sequence;
pub mod shm;
pub mod shm_comm;
pub mod worker;

pub use block_manager::{BlockManager, PrefixCacheStats};
pub use llm_engine::{LLMEngine, RunnerProfile, SequenceOutput, StepOutput, StepRunner};
pub use sampling_params::SamplingParams;
pub use scheduler::{ScheduledBatch, Scheduler, SchedulerConfig};
pub use sequence::{FinishReason, Sequence, SequenceStatus};
