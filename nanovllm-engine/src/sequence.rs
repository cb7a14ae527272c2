//! One request's state as it moves through the engine: its token ids (prompt, then generated
//! tokens), its status, its progress through prefill, and its KV-cache block table.
//!
//! Flow: `LLMEngine::add_request` builds a [`Sequence`]; the scheduler moves it between its
//! waiting and running queues and fills `num_scheduled_tokens`; the block manager fills
//! `block_table` and `num_cached_tokens`; the model runner reads it (through `&Sequence`) to
//! build input ids, positions, `slot_mapping` and block tables; `Scheduler::postprocess` appends
//! the sampled token.
//!
//! Progress is described by two counters, as in nano-vLLM:
//! tokens `[0, num_cached_tokens)` already have their KV in the cache (prefix-cache hits and
//! earlier prefill chunks), tokens `[num_cached_tokens, num_cached_tokens + num_scheduled_tokens)`
//! are computed by the current step, and the rest wait for a later step.
//!
//! nano-vLLM keeps the block size in a class attribute; here the methods that need it take it
//! as an argument.

use crate::sampling_params::SamplingParams;
use nanovllm_utils::{Error, Result};

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SequenceStatus {
    /// Queued for prefill: new, in the middle of a chunked prefill, or preempted.
    Waiting,
    /// Its prompt is computed (or is completed by the current step); it decodes.
    Running,
    /// Done; its blocks are freed.
    Finished,
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// It sampled an end-of-sequence token (unless `ignore_eos`) or one of `stop_token_ids`.
    Stop,
    /// It generated `max_tokens` tokens.
    Length,
}

/// One request: prompt and generated token ids, status, prefill progress and block table.
///
/// Fields keep nano-vLLM's names. `num_tokens` always equals `token_ids.len()`; it is kept as a
/// field, as in nano-vLLM, because the model runner sends sequences to tensor-parallel workers
/// without their whole token list during decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Engine-wide unique id, increasing in the order requests were added.
    pub seq_id: u64,
    /// Waiting, running or finished.
    pub status: SequenceStatus,
    /// Prompt token ids followed by the generated ones.
    pub token_ids: Vec<u32>,
    /// The last token id (the decode step's input).
    pub last_token: u32,
    /// Number of tokens, prompt plus generated.
    pub num_tokens: usize,
    /// Number of prompt tokens.
    pub num_prompt_tokens: usize,
    /// Tokens whose KV is already in the cache: prefix-cache hits and earlier prefill chunks.
    pub num_cached_tokens: usize,
    /// Tokens the current step computes: a prefill chunk, or 1 for decode (0 when not scheduled).
    pub num_scheduled_tokens: usize,
    /// KV-cache block ids, the i-th holding tokens `[i * block_size, (i + 1) * block_size)`.
    pub block_table: Vec<u32>,
    /// The request's sampling parameters (`max_tokens` possibly lowered to fit `max_model_len`).
    pub params: SamplingParams,
    /// The resolved seed of this request's random stream (`params.seed` or one derived from
    /// `seq_id`).
    pub seed: u64,
    /// Why it finished; `None` until it does.
    pub finish_reason: Option<FinishReason>,
}

impl Sequence {
    /// A waiting sequence with prompt `prompt_token_ids`.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when the prompt is empty.
    pub fn new(
        seq_id: u64,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        seed: u64,
    ) -> Result<Self> {
        let Some(&last_token) = prompt_token_ids.last() else {
            return Err(Error::InvalidRequest(
                "prompt has no tokens, expected at least 1".to_string(),
            ));
        };
        let n = prompt_token_ids.len();
        Ok(Self {
            seq_id,
            status: SequenceStatus::Waiting,
            token_ids: prompt_token_ids,
            last_token,
            num_tokens: n,
            num_prompt_tokens: n,
            num_cached_tokens: 0,
            num_scheduled_tokens: 0,
            block_table: Vec::new(),
            params,
            seed,
            finish_reason: None,
        })
    }

    /// Number of tokens, prompt plus generated (nano-vLLM's `len(seq)`).
    #[allow(clippy::len_without_is_empty)] // a sequence always holds at least its prompt
    #[inline]
    pub fn len(&self) -> usize {
        self.num_tokens
    }

    /// Number of generated tokens.
    #[inline]
    pub fn num_completion_tokens(&self) -> usize {
        self.num_tokens - self.num_prompt_tokens
    }

    /// The prompt's token ids.
    #[inline]
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.token_ids[..self.num_prompt_tokens]
    }

    /// The generated token ids.
    #[inline]
    pub fn completion_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    /// Blocks needed to hold all `num_tokens` tokens.
    #[inline]
    pub fn num_blocks(&self, block_size: usize) -> usize {
        self.num_tokens.div_ceil(block_size)
    }

    /// Full blocks among the cached tokens.
    #[inline]
    pub fn num_cached_blocks(&self, block_size: usize) -> usize {
        self.num_cached_tokens / block_size
    }

    /// Tokens in the last block, from 1 to `block_size`.
    #[inline]
    pub fn last_block_num_tokens(&self, block_size: usize) -> usize {
        self.num_tokens - (self.num_blocks(block_size).saturating_sub(1)) * block_size
    }

    /// The token ids of block `i`: `token_ids[i * block_size .. (i + 1) * block_size]`, shorter
    /// for the last block. Empty when `i` is past the last block.
    #[inline]
    pub fn block(&self, i: usize, block_size: usize) -> &[u32] {
        let start = (i * block_size).min(self.num_tokens);
        let end = ((i + 1) * block_size).min(self.num_tokens);
        &self.token_ids[start..end]
    }

    /// Whether the current step's tokens reach the end of the sequence, so that the token
    /// sampled from its last position is kept (false for a prefill chunk that stops short of
    /// the end of the prompt).
    #[inline]
    pub fn completes_prefill(&self) -> bool {
        self.num_cached_tokens + self.num_scheduled_tokens == self.num_tokens
    }

    /// Appends a generated token.
    #[inline]
    pub fn append_token(&mut self, token_id: u32) {
        self.token_ids.push(token_id);
        self.last_token = token_id;
        self.num_tokens += 1;
    }

    /// Whether the sequence is finished.
    #[inline]
    pub fn is_finished(&self) -> bool {
        self.status == SequenceStatus::Finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_prompt_is_refused() {
        assert!(matches!(
            Sequence::new(0, vec![], SamplingParams::default(), 0),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn block_arithmetic_follows_nano_vllm() {
        let mut s = Sequence::new(7, (0..10).collect(), SamplingParams::default(), 1).unwrap();
        assert_eq!(s.len(), 10);
        assert_eq!(s.last_token, 9);
        assert_eq!(s.num_blocks(4), 3);
        assert_eq!(s.last_block_num_tokens(4), 2);
        assert_eq!(s.block(0, 4), &[0, 1, 2, 3]);
        assert_eq!(s.block(2, 4), &[8, 9]);
        assert!(s.block(3, 4).is_empty());
        s.append_token(10);
        s.append_token(11);
        assert_eq!(s.last_block_num_tokens(4), 4);
        assert_eq!(s.num_blocks(4), 3);
        s.append_token(12);
        assert_eq!(s.num_blocks(4), 4);
        assert_eq!(s.last_block_num_tokens(4), 1);
        assert_eq!(s.num_completion_tokens(), 3);
        assert_eq!(s.prompt_token_ids().len(), 10);
        assert_eq!(s.completion_token_ids(), &[10, 11, 12]);
        assert_eq!(s.last_token, 12);
        s.num_cached_tokens = 9;
        assert_eq!(s.num_cached_blocks(4), 2);
        s.num_scheduled_tokens = 4;
        assert!(s.completes_prefill());
        s.num_scheduled_tokens = 3;
        assert!(!s.completes_prefill());
        assert!(!s.is_finished());
    }
}
