//! The sampler (nano-vLLM's `layers/sampler.py`): one token per logits row, last op of a step
//! before the ids go back to the scheduler.
//!
//! Greedy at temperature 0, otherwise top-k / top-p candidates and the Gumbel-max draw (the
//! exponential race of nano-vLLM) keyed by each request's seed and step, so a seeded request
//! draws the same tokens whatever batch it lands in. The op itself is the backend's `sample`.

use half::bf16;
use nanovllm_kernels::{Backend, SamplingBufs};
use nanovllm_utils::Result;

/// Draws tokens from logits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampler;

impl Sampler {
    /// `out[r]` = the token drawn from row `r` of `logits` (`[rows, vocab]`) with row `r`'s
    /// sampling parameters.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        logits: &B::Buf<bf16>,
        rows: usize,
        vocab: usize,
        params: &SamplingBufs<'_, B>,
        out: &mut B::Buf<u32>,
    ) -> Result<()> {
        be.sample(logits, rows, vocab, params, out)
    }
}
