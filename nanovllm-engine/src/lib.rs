//! The inference engine: request -> scheduler -> model runner -> sampler -> scheduler.
//!
//! The CPU side needs no GPU library (`default-features = false`): [`sampling_params`],
//! [`sequence`], [`block_manager`] (paged KV blocks with prefix caching), [`scheduler`]
//! (chunked prefill, decode, preemption) and [`llm_engine`] (the loop, written against the
//! [`StepRunner`] trait).
#![deny(missing_docs)]

pub mod block_manager;
pub mod llm_engine;
pub mod model_runner;
pub mod sampling_params;
pub mod scheduler;
pub mod sequence;

pub use block_manager::{BlockManager, PrefixCacheStats};
pub use llm_engine::{LLMEngine, SequenceOutput, StepOutput, StepRunner};
pub use sampling_params::SamplingParams;
pub use scheduler::{ScheduledBatch, Scheduler, SchedulerConfig};
pub use sequence::{FinishReason, Sequence, SequenceStatus};
