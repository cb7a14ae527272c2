//! The scheduler: decides, each step, which sequences the model runner computes and how many
//! tokens of each, and applies the sampled tokens afterwards.
//!
//! Flow of one engine step: [`Scheduler::schedule`] -> [`Scheduler::seqs`] (handed to the model
//! runner as `&[&Sequence]`) -> the runner computes and samples -> [`Scheduler::postprocess`].
//!
//! This is nano-vLLM's `scheduler.py` with chunked prefill:
//! - **prefill first.** Sequences are taken from the front of the waiting queue, in order, while
//!   the batch has fewer than `max_num_seqs` sequences and tokens are left in the
//!   `max_num_batched_tokens` budget, and the block manager can allocate the whole sequence.
//!   Prefix-cache hits are not computed. Only the first sequence of a batch may be cut short
//!   (chunked) when its remaining prompt exceeds the budget; it stays at the front of the waiting
//!   queue and continues on the next steps. A sequence whose prompt is completed by the step
//!   moves to the running queue. A step that prefills anything runs no decode.
//! - **otherwise decode** one token for each running sequence, up to `max_num_seqs`, in queue
//!   order. When a sequence needs a new block and none is free, the newest running sequence
//!   (the back of the queue) is preempted: its blocks are freed and it goes back to the front of
//!   the waiting queue, to be prefilled again later (its full blocks usually still sit in the
//!   prefix cache). When it is the only one left, the sequence preempts itself.
//! - **postprocess** registers the blocks the step filled in the prefix cache, advances
//!   `num_cached_tokens`, and appends the sampled token to each sequence whose prompt is now
//!   complete (decode, or the last prefill chunk); a sequence finishes on an end-of-sequence token
//!   (unless `ignore_eos`), on one of its `stop_token_ids`, or at `max_tokens`, and its blocks
//!   are freed.
//!
//! Sequences are owned by the scheduler in a slab (a vector of slots, reused after a sequence
//! leaves); the queues and a [`ScheduledBatch`] hold slot numbers, so the hot path indexes
//! instead of hashing, and the runner can borrow the sequences between `schedule` and
//! `postprocess`. A map from `seq_id` to slot serves `get` and `abort`.

use crate::block_manager::BlockManager;
use crate::sequence::{FinishReason, Sequence, SequenceStatus};
use nanovllm_utils::{EngineConfig, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// The scheduler's limits (nano-vLLM's `Config` fields that the scheduler reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most tokens computed in one prefill step (the chunked-prefill budget).
    pub max_num_batched_tokens: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prompt plus generated) of one sequence.
    pub max_model_len: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Whether full blocks are shared between sequences with the same prefix.
    pub enable_prefix_caching: bool,
}

impl Default for SchedulerConfig {
    /// nano-vLLM's defaults: 16,384 batched tokens, 512 sequences, 4,096 tokens per sequence,
    /// blocks of 256 tokens, prefix caching on.
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 16384,
            max_num_seqs: 512,
            max_model_len: 4096,
            block_size: 256,
            enable_prefix_caching: true,
        }
    }
}

impl From<&EngineConfig> for SchedulerConfig {
    /// The scheduler's part of the engine configuration.
    fn from(c: &EngineConfig) -> Self {
        Self {
            max_num_batched_tokens: c.max_num_batched_tokens,
            max_num_seqs: c.max_num_seqs,
            max_model_len: c.max_model_len,
            block_size: c.kvcache_block_size,
            enable_prefix_caching: c.enable_prefix_caching,
        }
    }
}

impl SchedulerConfig {
    /// Checks that every limit is at least 1.
    ///
    /// # Errors
    /// [`Error::EngineConfig`] naming the first option that is 0.
    pub fn validate(&self) -> Result<()> {
        for (option, value) in [
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("max_model_len", self.max_model_len),
            ("kvcache_block_size", self.block_size),
        ] {
            if value == 0 {
                return Err(Error::EngineConfig {
                    option,
                    msg: "is 0, expected at least 1".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// The sequences of one step, in the order the runner must see them, and the kind of step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduledBatch {
    seq_ids: Vec<u64>,
    /// The scheduler slot of each sequence.
    slots: Vec<u32>,
    is_prefill: bool,
    num_tokens: usize,
}

impl ScheduledBatch {
    /// The scheduled sequences' ids.
    pub fn seq_ids(&self) -> &[u64] {
        &self.seq_ids
    }

    /// True for a prefill step (prompt chunks), false for a decode step (one token each).
    pub fn is_prefill(&self) -> bool {
        self.is_prefill
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seq_ids.len()
    }

    /// Whether no sequence is scheduled (never true for a batch returned by `schedule`).
    pub fn is_empty(&self) -> bool {
        self.seq_ids.is_empty()
    }

    /// Tokens computed by the step: the sum of the prefill chunks, or the decode batch size.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
}

/// Hasher for engine-assigned sequence ids: one multiply (Fibonacci hashing). Ids are dense
/// counters chosen by the engine, so this spreads them evenly.
#[derive(Default)]
struct SeqIdHasher(u64);

impl Hasher for SeqIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SlotMap = HashMap<u64, u32, BuildHasherDefault<SeqIdHasher>>;

/// Waiting and running queues over the sequences it owns, and the block manager
/// (nano-vLLM's `Scheduler`).
#[derive(Debug)]
pub struct Scheduler {
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    block_size: usize,
    eos_token_ids: Vec<u32>,
    block_manager: BlockManager,
    /// The sequences, by slot; `None` for a free slot.
    slots: Vec<Option<Sequence>>,
    free_slots: Vec<u32>,
    slot_of: SlotMap,
    /// Slots, front first.
    waiting: VecDeque<u32>,
    /// Slots, front first.
    running: VecDeque<u32>,
}

impl Scheduler {
    /// A scheduler over `num_kvcache_blocks` blocks; a generated token in `eos_token_ids` ends a
    /// sequence unless it sets `ignore_eos`.
    ///
    /// # Errors
    /// [`Error::EngineConfig`] when a limit of `config` is 0 or `num_kvcache_blocks` is 0.
    pub fn new(
        config: &SchedulerConfig,
        num_kvcache_blocks: usize,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self> {
        config.validate()?;
        if num_kvcache_blocks == 0 {
            return Err(Error::EngineConfig {
                option: "num_kvcache_blocks",
                msg: "is 0, expected at least 1 KV-cache block".to_string(),
            });
        }
        Ok(Self {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            block_size: config.block_size,
            eos_token_ids,
            block_manager: BlockManager::new(
                num_kvcache_blocks,
                config.block_size,
                config.enable_prefix_caching,
            )?,
            slots: Vec::new(),
            free_slots: Vec::new(),
            slot_of: SlotMap::default(),
            waiting: VecDeque::new(),
            running: VecDeque::new(),
        })
    }

    /// Queues a new sequence at the back of the waiting queue.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] (and the sequence is dropped, nothing else changes) when its id
    /// is already in the scheduler, it is not a fresh waiting sequence, or it could need more KV
    /// blocks than the cache has in total (its prompt plus `max_tokens - 1` tokens, whose KV is
    /// computed; the last sampled token's is not). The last check guarantees progress: a lone
    /// sequence always fits.
    pub fn add(&mut self, seq: Sequence) -> Result<()> {
        if self.slot_of.contains_key(&seq.seq_id) {
            return Err(Error::InvalidRequest(format!(
                "sequence id {} is already in the scheduler",
                seq.seq_id
            )));
        }
        if seq.status != SequenceStatus::Waiting
            || !seq.block_table.is_empty()
            || seq.num_cached_tokens != 0
            || seq.num_tokens != seq.token_ids.len()
        {
            return Err(Error::InvalidRequest(format!(
                "sequence {} is not a fresh waiting sequence (status {:?}, {} blocks, {} cached \
                 tokens)",
                seq.seq_id,
                seq.status,
                seq.block_table.len(),
                seq.num_cached_tokens
            )));
        }
        let max_kv_tokens = seq.num_prompt_tokens + seq.params.max_tokens.max(1) - 1;
        let blocks_needed = max_kv_tokens.div_ceil(self.block_size);
        if blocks_needed > self.block_manager.num_blocks() {
            return Err(Error::InvalidRequest(format!(
                "request needs up to {blocks_needed} KV-cache blocks ({} prompt tokens + \
                 max_tokens {}, {} tokens per block) but the cache has {} blocks in total",
                seq.num_prompt_tokens,
                seq.params.max_tokens,
                self.block_size,
                self.block_manager.num_blocks()
            )));
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.slots.len()).map_err(|_| {
                    Error::InvalidRequest(format!(
                        "the scheduler already holds {} sequences",
                        self.slots.len()
                    ))
                })?;
                self.slots.push(None);
                slot
            }
        };
        self.slot_of.insert(seq.seq_id, slot);
        self.slots[slot as usize] = Some(seq);
        self.waiting.push_back(slot);
        Ok(())
    }

    /// Whether no sequence is waiting or running.
    pub fn is_finished(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Sequences waiting for (more) prefill.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences decoding.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// The block manager (for its counters).
    pub fn block_manager(&self) -> &BlockManager {
        &self.block_manager
    }

    /// The sequence `seq_id`, if it is waiting or running.
    pub fn get(&self, seq_id: u64) -> Option<&Sequence> {
        let &slot = self.slot_of.get(&seq_id)?;
        self.slots[slot as usize].as_ref()
    }

    /// Picks the next step's sequences: a prefill batch if any waiting sequence can start or
    /// continue its prefill, else a decode batch (preempting as needed). `None` when nothing is
    /// waiting or running.
    ///
    /// # Errors
    /// [`Error::Other`] when sequences remain but none can be scheduled, which
    /// [`add`](Self::add)'s capacity check rules out.
    pub fn schedule(&mut self) -> Result<Option<ScheduledBatch>> {
        let mut batch = ScheduledBatch::default();
        Ok(self.schedule_into(&mut batch)?.then_some(batch))
    }

    /// [`schedule`](Self::schedule) into a batch whose buffers are reused from step to step
    /// (so the engine's step allocates no batch). Returns false, with `batch` emptied, when
    /// nothing is waiting or running.
    ///
    /// # Errors
    /// As [`schedule`](Self::schedule).
    pub fn schedule_into(&mut self, batch: &mut ScheduledBatch) -> Result<bool> {
        batch.seq_ids.clear();
        batch.slots.clear();
        batch.is_prefill = false;
        batch.num_tokens = 0;
        if self.is_finished() {
            return Ok(false);
        }
        let mut num_batched_tokens = 0;

        // Prefill.
        while batch.slots.len() < self.max_num_seqs {
            let Some(&slot) = self.waiting.front() else {
                break;
            };
            let remaining = self.max_num_batched_tokens - num_batched_tokens;
            if remaining == 0 {
                break;
            }
            let seq = self.slots[slot as usize]
                .as_mut()
                .ok_or_else(|| missing("waiting", slot))?;
            let needs_blocks = seq.block_table.is_empty();
            let (num_tokens, num_cached_blocks) = if needs_blocks {
                let Some(num_cached_blocks) = self.block_manager.can_allocate(seq) else {
                    break;
                };
                (
                    seq.num_tokens - num_cached_blocks * self.block_size,
                    num_cached_blocks,
                )
            } else {
                (seq.num_tokens - seq.num_cached_tokens, 0)
            };
            // Only the first sequence of a batch may be chunked.
            if remaining < num_tokens && !batch.slots.is_empty() {
                break;
            }
            if needs_blocks {
                self.block_manager.allocate(seq, num_cached_blocks)?;
            }
            seq.num_scheduled_tokens = num_tokens.min(remaining);
            num_batched_tokens += seq.num_scheduled_tokens;
            batch.slots.push(slot);
            batch.seq_ids.push(seq.seq_id);
            if seq.completes_prefill() {
                seq.status = SequenceStatus::Running;
                self.waiting.pop_front();
                self.running.push_back(slot);
            }
        }
        if !batch.slots.is_empty() {
            batch.is_prefill = true;
            batch.num_tokens = num_batched_tokens;
            return Ok(true);
        }

        // Decode. nano-vLLM pops each sequence off the front of the running queue and puts the
        // scheduled ones back in front at the end; walking the queue in place gives the same
        // order without moving anything: `running[..i]` are scheduled, `running[i + 1..]` not
        // yet looked at.
        let mut i = 0;
        while i < self.running.len() && batch.slots.len() < self.max_num_seqs {
            let slot = self.running[i];
            loop {
                let seq = self.slots[slot as usize]
                    .as_mut()
                    .ok_or_else(|| missing("running", slot))?;
                if self.block_manager.can_append(seq) {
                    seq.num_scheduled_tokens = 1;
                    self.block_manager.may_append(seq)?;
                    batch.slots.push(slot);
                    batch.seq_ids.push(seq.seq_id);
                    i += 1;
                    break;
                }
                // Preempt the newest sequence not yet scheduled, or this one if it is the last.
                let Some(victim) = self.running.pop_back() else {
                    break;
                };
                self.preempt(victim)?;
                if victim == slot {
                    break;
                }
            }
        }
        if batch.slots.is_empty() {
            return Err(Error::Other(format!(
                "scheduler: {} waiting and {} running sequences but none fits the {} KV-cache \
                 blocks",
                self.waiting.len(),
                self.running.len(),
                self.block_manager.num_blocks()
            )));
        }
        batch.is_prefill = false;
        batch.num_tokens = batch.slots.len();
        Ok(true)
    }

    /// Sends a running sequence back to the front of the waiting queue, freeing its blocks.
    fn preempt(&mut self, slot: u32) -> Result<()> {
        let seq = self.slots[slot as usize]
            .as_mut()
            .ok_or_else(|| missing("running", slot))?;
        seq.status = SequenceStatus::Waiting;
        seq.num_scheduled_tokens = 0;
        self.block_manager.deallocate(seq);
        self.waiting.push_front(slot);
        Ok(())
    }

    /// The sequence in `slot` if it is still `seq_id` (not aborted since it was scheduled).
    fn batch_seq(&self, slot: u32, seq_id: u64) -> Option<&Sequence> {
        self.slots
            .get(slot as usize)?
            .as_ref()
            .filter(|s| s.seq_id == seq_id)
    }

    /// The batch's sequences, in batch order, for the model runner. Sequences aborted since
    /// `schedule` are left out.
    pub fn seqs(&self, batch: &ScheduledBatch) -> Vec<&Sequence> {
        let mut seqs = Vec::with_capacity(batch.len());
        for (&slot, &seq_id) in batch.slots.iter().zip(&batch.seq_ids) {
            if let Some(seq) = self.batch_seq(slot, seq_id) {
                seqs.push(seq);
            }
        }
        seqs
    }

    /// Applies a step's sampled tokens, `token_ids[i]` for `batch.seq_ids()[i]`: registers the
    /// blocks the step filled, advances each sequence's progress, appends the token to the
    /// sequences whose prompt is complete, and finishes those that hit a stop condition.
    /// Returns the finished sequences (removed from the scheduler, blocks freed), in batch order.
    ///
    /// # Errors
    /// [`Error::Other`] (nothing changed) when `token_ids` does not have one token per sequence.
    pub fn postprocess(
        &mut self,
        batch: &ScheduledBatch,
        token_ids: &[u32],
    ) -> Result<Vec<Sequence>> {
        if token_ids.len() != batch.len() {
            return Err(Error::Other(format!(
                "scheduler: the model runner returned {} tokens for a batch of {} sequences",
                token_ids.len(),
                batch.len()
            )));
        }
        let mut finished_slots = Vec::new();
        for ((&slot, &seq_id), &token_id) in batch.slots.iter().zip(&batch.seq_ids).zip(token_ids) {
            let Some(seq) = self
                .slots
                .get_mut(slot as usize)
                .and_then(Option::as_mut)
                .filter(|s| s.seq_id == seq_id)
            else {
                continue; // aborted since `schedule`
            };
            self.block_manager.hash_blocks(seq);
            seq.num_cached_tokens += seq.num_scheduled_tokens;
            seq.num_scheduled_tokens = 0;
            if batch.is_prefill && seq.num_cached_tokens < seq.num_tokens {
                continue; // a prefill chunk short of the prompt's end: the token is meaningless
            }
            seq.append_token(token_id);
            let params = &seq.params;
            let reason = if (!params.ignore_eos && self.eos_token_ids.contains(&token_id))
                || params.stop_token_ids.contains(&token_id)
            {
                Some(FinishReason::Stop)
            } else if seq.num_completion_tokens() >= params.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                seq.status = SequenceStatus::Finished;
                seq.finish_reason = Some(reason);
                self.block_manager.deallocate(seq);
                finished_slots.push(slot);
            }
        }
        if finished_slots.is_empty() {
            return Ok(Vec::new());
        }
        let slots = &self.slots;
        self.running.retain(|&slot| {
            slots[slot as usize]
                .as_ref()
                .is_some_and(|s| !s.is_finished())
        });
        Ok(finished_slots
            .into_iter()
            .filter_map(|slot| self.take_slot(slot))
            .collect())
    }

    /// Empties `slot`, returning its sequence.
    fn take_slot(&mut self, slot: u32) -> Option<Sequence> {
        let seq = self.slots.get_mut(slot as usize)?.take()?;
        self.slot_of.remove(&seq.seq_id);
        self.free_slots.push(slot);
        Some(seq)
    }

    /// Removes a waiting or running sequence, freeing its blocks. Returns it (status
    /// `Finished`, `finish_reason` `None`), or `None` if no such sequence is in the scheduler.
    pub fn abort(&mut self, seq_id: u64) -> Option<Sequence> {
        let &slot = self.slot_of.get(&seq_id)?;
        let mut seq = self.take_slot(slot)?;
        if let Some(i) = self.waiting.iter().position(|&s| s == slot) {
            self.waiting.remove(i);
        } else if let Some(i) = self.running.iter().position(|&s| s == slot) {
            self.running.remove(i);
        }
        self.block_manager.deallocate(&mut seq);
        seq.status = SequenceStatus::Finished;
        seq.num_scheduled_tokens = 0;
        Some(seq)
    }
}

fn missing(queue: &str, slot: u32) -> Error {
    Error::Other(format!(
        "scheduler: slot {slot} is in the {queue} queue but holds no sequence"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling_params::SamplingParams;

    const EOS: u32 = 0;

    fn config(max_num_batched_tokens: usize, max_num_seqs: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_batched_tokens,
            max_num_seqs,
            max_model_len: 1 << 20,
            block_size: 4,
            enable_prefix_caching: true,
        }
    }

    fn params(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    fn add(s: &mut Scheduler, id: u64, prompt: Vec<u32>, max_tokens: usize) {
        s.add(Sequence::new(id, prompt, params(max_tokens), id).unwrap())
            .unwrap();
    }

    /// Schedules one step and returns (ids, is_prefill, tokens of each).
    fn step(s: &mut Scheduler, token: u32) -> (Vec<u64>, bool, Vec<usize>, Vec<Sequence>) {
        let batch = s.schedule().unwrap().expect("work");
        let chunks = s
            .seqs(&batch)
            .iter()
            .map(|q| q.num_scheduled_tokens)
            .collect();
        let tokens = vec![token; batch.len()];
        let finished = s.postprocess(&batch, &tokens).unwrap();
        (
            batch.seq_ids().to_vec(),
            batch.is_prefill(),
            chunks,
            finished,
        )
    }

    #[test]
    fn chunked_prefill_cuts_only_the_first_sequence() {
        let mut s = Scheduler::new(&config(10, 8), 64, vec![EOS]).unwrap();
        add(&mut s, 0, (1..=25).collect(), 2);
        add(&mut s, 1, vec![7, 8, 9], 2);
        add(&mut s, 2, vec![50, 51, 52, 53, 54, 55, 56, 57], 2);

        // 25-token prompt, budget 10: chunks 10, 10, then 5 + sequence 1 (3 tokens); sequence 2
        // (8 tokens) does not fit the 2 tokens left and is not chunked.
        assert_eq!(step(&mut s, 9), (vec![0], true, vec![10], vec![]));
        assert_eq!(s.get(0).unwrap().num_cached_tokens, 10);
        assert_eq!(
            s.get(0).unwrap().num_tokens,
            25,
            "no token after a partial chunk"
        );
        assert_eq!(s.num_waiting(), 3);
        assert_eq!(step(&mut s, 9), (vec![0], true, vec![10], vec![]));
        assert_eq!(step(&mut s, 9), (vec![0, 1], true, vec![5, 3], vec![]));
        assert_eq!(s.get(0).unwrap().completion_token_ids(), &[9]);
        assert_eq!(s.get(1).unwrap().completion_token_ids(), &[9]);
        assert_eq!(s.num_running(), 2);
        assert_eq!(step(&mut s, 9), (vec![2], true, vec![8], vec![]));
        // Then decode all three; max_tokens = 2 finishes them.
        let (ids, is_prefill, chunks, finished) = step(&mut s, 9);
        assert_eq!(
            (ids, is_prefill, chunks),
            (vec![0, 1, 2], false, vec![1, 1, 1])
        );
        assert_eq!(finished.len(), 3);
        assert!(finished
            .iter()
            .all(|q| q.finish_reason == Some(FinishReason::Length) && q.block_table.is_empty()));
        assert!(s.is_finished());
        assert_eq!(s.block_manager().num_used_blocks(), 0);
        assert_eq!(s.schedule().unwrap(), None);
    }

    #[test]
    fn a_chunk_continues_even_when_it_is_not_the_first_in_line() {
        // Budget 4: a 9-token prompt takes three steps; nothing else joins its chunks.
        let mut s = Scheduler::new(&config(4, 8), 64, vec![EOS]).unwrap();
        add(&mut s, 0, (1..=9).collect(), 1);
        add(&mut s, 1, vec![1, 2], 1);
        assert_eq!(step(&mut s, 5).2, vec![4]);
        assert_eq!(step(&mut s, 5).2, vec![4]);
        let (ids, _, chunks, finished) = step(&mut s, 5);
        assert_eq!((ids, chunks), (vec![0, 1], vec![1, 2]));
        assert_eq!(finished.len(), 2);
    }

    #[test]
    fn max_num_seqs_bounds_both_phases() {
        let mut s = Scheduler::new(&config(100, 2), 64, vec![EOS]).unwrap();
        for id in 0..3 {
            add(&mut s, id, vec![1, 2, 3], 3);
        }
        assert_eq!(step(&mut s, 5).0, vec![0, 1]);
        assert_eq!(step(&mut s, 5).0, vec![2]);
        // Decode always takes the front of the running queue, as nano-vLLM: sequence 2 waits
        // until 0 and 1 are done.
        assert_eq!(step(&mut s, 5).0, vec![0, 1]);
        let (ids, _, _, finished) = step(&mut s, 5);
        assert_eq!((ids, finished.len()), (vec![0, 1], 2));
        assert_eq!(step(&mut s, 5).0, vec![2]);
    }

    #[test]
    fn stop_conditions() {
        let mut s = Scheduler::new(&config(100, 8), 64, vec![EOS, 7]).unwrap();
        add(&mut s, 0, vec![1, 2], 10);
        s.add(
            Sequence::new(
                1,
                vec![1, 2],
                SamplingParams {
                    ignore_eos: true,
                    stop_token_ids: vec![42],
                    max_tokens: 10,
                    ..Default::default()
                },
                0,
            )
            .unwrap(),
        )
        .unwrap();
        let (_, _, _, finished) = step(&mut s, 7);
        assert_eq!(finished.len(), 1, "second eos id stops seq 0 only");
        assert_eq!(finished[0].seq_id, 0);
        assert_eq!(finished[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(finished[0].completion_token_ids(), &[7]);
        let (_, _, _, finished) = step(&mut s, 42);
        assert_eq!(finished[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(finished[0].completion_token_ids(), &[7, 42]);
        assert!(s.is_finished());
    }

    #[test]
    fn decode_preempts_the_newest_sequence() {
        // 6 blocks of 4 tokens; three 8-token prompts fill them. The first decode token of each
        // needs a new block: sequence 0 preempts sequence 2 (the newest) and takes one of its
        // blocks, sequence 1 takes the other.
        let mut s = Scheduler::new(&config(100, 8), 6, vec![EOS]).unwrap();
        add(&mut s, 0, (1..=8).collect(), 3);
        add(&mut s, 1, (11..=18).collect(), 3);
        add(&mut s, 2, (21..=28).collect(), 3);
        assert_eq!(step(&mut s, 5).0, vec![0, 1, 2]);
        assert_eq!(s.block_manager().num_free_blocks(), 0);
        let (ids, is_prefill, _, _) = step(&mut s, 5);
        assert_eq!((ids, is_prefill), (vec![0, 1], false));
        let preempted = s.get(2).unwrap();
        assert_eq!(preempted.status, SequenceStatus::Waiting);
        assert!(preempted.block_table.is_empty());
        assert_eq!(preempted.num_tokens, 9, "keeps its generated token");
        assert_eq!((s.num_waiting(), s.num_running()), (1, 2));
        // No room to prefill it again until 0 and 1 finish (max_tokens 3).
        let (ids, is_prefill, _, finished) = step(&mut s, 5);
        assert_eq!((ids, is_prefill, finished.len()), (vec![0, 1], false, 2));
        // Its blocks were reused by 0 and 1, so it is recomputed in full: 8 prompt tokens and
        // its generated one.
        let (ids, is_prefill, chunks, _) = step(&mut s, 6);
        assert_eq!((ids, is_prefill, chunks), (vec![2], true, vec![9]));
        let (_, _, _, finished) = step(&mut s, 7);
        assert_eq!(finished[0].completion_token_ids(), &[5, 6, 7]);
        assert_eq!(s.block_manager().num_used_blocks(), 0);
    }

    #[test]
    fn capacity_check_admits_only_sequences_that_can_finish_alone() {
        // 2 blocks of 4: an 8-token prompt with max_tokens 2 needs a third block for the KV of
        // its first generated token, so it could never finish and is refused up front.
        let mut s = Scheduler::new(&config(100, 8), 2, vec![EOS]).unwrap();
        let seq = Sequence::new(0, (1..=8).collect(), params(2), 0).unwrap();
        assert!(matches!(s.add(seq), Err(Error::InvalidRequest(_))));
        // With max_tokens 1 it fits: no KV is needed for the only generated token.
        add(&mut s, 1, (1..=8).collect(), 1);
        let (_, _, _, finished) = step(&mut s, 3);
        assert_eq!(finished.len(), 1);
    }

    #[test]
    fn abort_frees_blocks_anywhere() {
        let mut s = Scheduler::new(&config(4, 8), 16, vec![EOS]).unwrap();
        add(&mut s, 0, (1..=9).collect(), 5);
        add(&mut s, 1, vec![1, 2], 5);
        step(&mut s, 5); // sequence 0 mid-chunk, holding blocks
        assert!(s.block_manager().num_used_blocks() > 0);
        let aborted = s.abort(0).unwrap();
        assert!(aborted.is_finished() && aborted.block_table.is_empty());
        assert_eq!(s.block_manager().num_used_blocks(), 0);
        assert!(s.abort(0).is_none());
        step(&mut s, 5);
        assert!(s.abort(1).is_some());
        assert!(s.is_finished());
        assert_eq!(s.block_manager().num_used_blocks(), 0);
    }

    #[test]
    fn config_from_engine_config() {
        let c = SchedulerConfig::from(&EngineConfig::default());
        assert_eq!(c, SchedulerConfig::default());
    }

    #[test]
    fn wrong_token_count_and_bad_adds_are_errors() {
        let mut s = Scheduler::new(&config(100, 8), 16, vec![EOS]).unwrap();
        add(&mut s, 0, vec![1, 2], 5);
        let batch = s.schedule().unwrap().unwrap();
        assert!(matches!(s.postprocess(&batch, &[]), Err(Error::Other(_))));
        assert!(s.postprocess(&batch, &[1]).is_ok());
        let dup = Sequence::new(0, vec![1], params(1), 0).unwrap();
        assert!(matches!(s.add(dup), Err(Error::InvalidRequest(_))));
        assert!(matches!(
            Scheduler::new(&config(0, 8), 16, vec![]),
            Err(Error::EngineConfig {
                option: "max_num_batched_tokens",
                ..
            })
        ));
        assert!(matches!(
            Scheduler::new(&config(8, 8), 0, vec![]),
            Err(Error::EngineConfig {
                option: "num_kvcache_blocks",
                ..
            })
        ));
    }
}
