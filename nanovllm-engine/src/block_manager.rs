//! Paged KV-cache bookkeeping with prefix caching: which physical block holds which tokens of
//! which sequence, reference counts for blocks shared by several sequences, and a free list.
//!
//! Flow: the scheduler asks [`BlockManager::can_allocate`] / [`BlockManager::allocate`] before a
//! sequence's (first) prefill, [`BlockManager::can_append`] / [`BlockManager::may_append`] before
//! each decode step, [`BlockManager::hash_blocks`] after each step (to register blocks that the
//! step filled), and [`BlockManager::deallocate`] when a sequence finishes or is preempted. The
//! model runner only reads the resulting `Sequence::block_table`; the KV tensors themselves live
//! in the runner. No GPU here.
//!
//! This is nano-vLLM's `block_manager.py`, step for step:
//! - a full block is identified by a chained hash: `h_i = xxh64(h_{i-1} as 8 little-endian bytes
//!   ++ token ids as u32 little-endian bytes)`, seed 0, with no prefix bytes for the first block,
//!   so a block's hash stands for its whole prefix. A lookup re-checks the stored token ids, so a
//!   hash collision can never hand a sequence the wrong KV;
//! - only full blocks are hashed, and the last block of a prompt is never looked up (at least
//!   one token must be computed to get logits);
//! - a freed block keeps its hash, tokens and map entry until it is taken again from the front
//!   of the free list, so a later request can still hit it ("lazy eviction"); freed blocks go to
//!   the back, last block of a sequence first, so a shared prefix is the last to be evicted;
//! - when two sequences compute the same block, the map keeps the later one, and the earlier
//!   block only removes its map entry on reuse if the entry still points at it.
//!
//! Same behavior, cheaper data structures:
//! - nano-vLLM's free list is a `deque` whose `remove(block_id)` (a cache hit on a free block)
//!   scans the whole list. Here it is a doubly linked list threaded through arrays indexed by
//!   block id: the same order and the same operations (take from the front, give back at the
//!   back, remove anywhere), each O(1);
//! - the tokens of hashed blocks live in one array allocated up front, so registering a block
//!   allocates nothing;
//! - `allocate` reuses the hashes that `can_allocate` just computed for the same sequence (the
//!   scheduler always calls them back to back), re-checking each hit against the map and the
//!   stored tokens instead of hashing the blocks again.
//!
//! `tests/block_manager_props.rs` checks this implementation against a plain transcription of
//! nano-vLLM's on random operation sequences.

use crate::sequence::Sequence;
use nanovllm_utils::{Error, Result};
use std::collections::HashMap;
use xxhash_rust::xxh64::Xxh64;

/// Marks "no block" in the free list's links.
const NIL: u32 = u32::MAX;

/// One physical KV-cache block's metadata. The tokens its hash was computed from live in
/// `BlockManager::block_token_ids`, at `block_id * block_size`.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    /// Number of sequences whose block table holds this block; 0 means it is in the free list.
    ref_count: u32,
    /// Chained hash of the block's tokens, set once the block is full; kept after it is freed.
    hash: Option<u64>,
}

/// FIFO of free block ids with O(1) removal of any member: a doubly linked list over block ids.
#[derive(Debug, Clone)]
struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    in_queue: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// A queue holding `0, 1, .., num_blocks - 1` in that order.
    fn new(num_blocks: u32) -> Self {
        let n = num_blocks as usize;
        let mut q = Self {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            in_queue: vec![false; n],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for id in 0..num_blocks {
            q.push_back(id);
        }
        q
    }

    #[inline]
    fn push_back(&mut self, id: u32) {
        let i = id as usize;
        debug_assert!(!self.in_queue[i], "block {id} freed twice");
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.in_queue[i] = true;
        self.len += 1;
    }

    #[inline]
    fn pop_front(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    /// Unlinks `id`, which must be in the queue.
    #[inline]
    fn remove(&mut self, id: u32) {
        let i = id as usize;
        debug_assert!(self.in_queue[i], "block {id} is not free");
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.in_queue[i] = false;
        self.len -= 1;
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let id = cur;
            cur = self.next[id as usize];
            Some(id)
        })
    }
}

/// Prefix-cache counters, accumulated over every [`BlockManager::allocate`] since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Allocations that looked up the cache (one per prefill of a new or preempted sequence).
    pub num_queries: u64,
    /// Tokens of the sequences looked up.
    pub num_query_tokens: u64,
    /// Tokens found in the cache (full blocks whose KV was reused).
    pub num_hit_tokens: u64,
}

impl PrefixCacheStats {
    /// `num_hit_tokens / num_query_tokens`, 0 before any query.
    pub fn hit_rate(&self) -> f64 {
        if self.num_query_tokens == 0 {
            0.0
        } else {
            self.num_hit_tokens as f64 / self.num_query_tokens as f64
        }
    }
}

/// Allocates KV-cache blocks to sequences, shares full blocks between sequences with the same
/// prefix, and frees them (nano-vLLM's `BlockManager`).
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    /// `log2(block_size)` when it is a power of two: the hot path then shifts instead of dividing.
    block_shift: Option<u32>,
    enable_prefix_caching: bool,
    blocks: Vec<Block>,
    /// The tokens of every hashed block, `block_size` per block, checked on every cache hit
    /// (one allocation up front, so registering a block allocates nothing).
    block_token_ids: Vec<u32>,
    hash_to_block_id: HashMap<u64, u32>,
    free_block_ids: FreeBlockQueue,
    stats: PrefixCacheStats,
    last_lookup: LastLookup,
}

/// The cache hits found by the last [`BlockManager::can_allocate`], so that the `allocate` that
/// the scheduler calls right after for the same sequence need not hash its blocks again.
#[derive(Debug, Clone, Default)]
struct LastLookup {
    seq_id: u64,
    num_tokens: usize,
    /// `(hash, block_id)` of each leading cached block.
    hits: Vec<(u64, u32)>,
}

impl BlockManager {
    /// `num_blocks` free blocks of `block_size` tokens each. With `enable_prefix_caching` off the
    /// cache is never looked up and no block is hashed.
    ///
    /// # Errors
    /// [`Error::EngineConfig`] when `block_size` is 0, `num_blocks` does not fit a `u32` block id,
    /// or the token store (`num_blocks * block_size` ids) overflows.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::EngineConfig {
                option: "kvcache_block_size",
                msg: "is 0, expected at least 1 token per block".to_string(),
            });
        }
        let num_blocks_u32 = u32::try_from(num_blocks)
            .ok()
            .filter(|&n| n != NIL)
            .ok_or_else(|| Error::EngineConfig {
                option: "num_kvcache_blocks",
                msg: format!("is {num_blocks}, expected fewer than {NIL}"),
            })?;
        let num_slots = num_blocks
            .checked_mul(block_size)
            .ok_or_else(|| Error::EngineConfig {
                option: "num_kvcache_blocks",
                msg: format!(
                    "{num_blocks} blocks of {block_size} tokens overflow the address space"
                ),
            })?;
        Ok(Self {
            block_size,
            block_shift: block_size
                .is_power_of_two()
                .then(|| block_size.trailing_zeros()),
            enable_prefix_caching,
            blocks: vec![Block::default(); num_blocks],
            block_token_ids: vec![0; num_slots],
            hash_to_block_id: HashMap::new(),
            free_block_ids: FreeBlockQueue::new(num_blocks_u32),
            stats: PrefixCacheStats::default(),
            last_lookup: LastLookup::default(),
        })
    }

    /// The chained hash of a full block: xxh64 (seed 0) of the previous block's hash as 8
    /// little-endian bytes (left out for the first block, `prefix == None`) followed by the
    /// token ids as u32 little-endian bytes.
    #[inline]
    pub fn compute_hash(token_ids: &[u32], prefix: Option<u64>) -> u64 {
        let mut h = Xxh64::new(0);
        if let Some(p) = prefix {
            h.update(&p.to_le_bytes());
        }
        #[cfg(target_endian = "little")]
        h.update(bytemuck::cast_slice(token_ids));
        #[cfg(not(target_endian = "little"))]
        for t in token_ids {
            h.update(&t.to_le_bytes());
        }
        h.digest()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether prefix caching is on.
    pub fn enable_prefix_caching(&self) -> bool {
        self.enable_prefix_caching
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks in the free list (some may still hold cached content).
    pub fn num_free_blocks(&self) -> usize {
        self.free_block_ids.len
    }

    /// Blocks held by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.len() - self.free_block_ids.len
    }

    /// Prefix-cache hit counters.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Number of sequences holding `block_id` (0 for a free or unknown block).
    pub fn ref_count(&self, block_id: u32) -> u32 {
        self.blocks
            .get(block_id as usize)
            .map_or(0, |b| b.ref_count)
    }

    /// The hash registered on `block_id`, if it is full and hashed.
    pub fn block_hash(&self, block_id: u32) -> Option<u64> {
        self.blocks.get(block_id as usize).and_then(|b| b.hash)
    }

    /// The token ids `block_id` was hashed from (empty when it has no hash).
    pub fn block_token_ids(&self, block_id: u32) -> &[u32] {
        match self.blocks.get(block_id as usize) {
            Some(b) if b.hash.is_some() => self.stored_tokens(block_id),
            _ => &[],
        }
    }

    /// The token storage of `block_id`.
    #[inline]
    fn stored_tokens(&self, block_id: u32) -> &[u32] {
        let start = block_id as usize * self.block_size;
        &self.block_token_ids[start..start + self.block_size]
    }

    /// The prefix-cache map, `(hash, block_id)` pairs in no particular order.
    pub fn hash_to_block_id(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.hash_to_block_id.iter().map(|(&h, &id)| (h, id))
    }

    /// The free list, front (next to be taken) first.
    pub fn free_block_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.free_block_ids.iter()
    }

    /// The block registered for hash `h` if its stored tokens are `token_ids`.
    #[inline]
    fn lookup(&self, h: u64, token_ids: &[u32]) -> Option<u32> {
        let &id = self.hash_to_block_id.get(&h)?;
        (self.stored_tokens(id) == token_ids).then_some(id)
    }

    /// Takes the block at the front of the free list, forgetting its cached content.
    fn allocate_block(&mut self) -> Option<u32> {
        let id = self.free_block_ids.pop_front()?;
        let block = &mut self.blocks[id as usize];
        debug_assert_eq!(block.ref_count, 0);
        if let Some(h) = block.hash.take() {
            if self.hash_to_block_id.get(&h) == Some(&id) {
                self.hash_to_block_id.remove(&h);
            }
        }
        block.ref_count = 1;
        Some(id)
    }

    /// Whether `seq`'s blocks can be allocated now. `Some(n)`: yes, and its first `n` blocks are
    /// in the cache; `None`: not enough free blocks.
    ///
    /// A cached block that is in use costs no free block; one that is in the free list does.
    /// (Takes `&mut self` only to remember the hits for the `allocate` that follows.)
    pub fn can_allocate(&mut self, seq: &Sequence) -> Option<usize> {
        let num_blocks = seq.num_blocks(self.block_size);
        let mut num_new_blocks = num_blocks;
        let mut num_cached_blocks = 0;
        let mut hits = std::mem::take(&mut self.last_lookup.hits);
        hits.clear();
        if self.enable_prefix_caching {
            let mut h = None;
            for i in 0..num_blocks.saturating_sub(1) {
                let token_ids = seq.block(i, self.block_size);
                let hash = Self::compute_hash(token_ids, h);
                h = Some(hash);
                let Some(id) = self.lookup(hash, token_ids) else {
                    break;
                };
                hits.push((hash, id));
                num_cached_blocks += 1;
                if self.blocks[id as usize].ref_count > 0 {
                    num_new_blocks -= 1;
                }
            }
        }
        self.last_lookup = LastLookup {
            seq_id: seq.seq_id,
            num_tokens: seq.num_tokens,
            hits,
        };
        (self.free_block_ids.len >= num_new_blocks).then_some(num_cached_blocks)
    }

    /// Gives `seq` a block table: its first `num_cached_blocks` blocks from the cache (as
    /// reported by [`can_allocate`](Self::can_allocate)), the rest fresh from the free list;
    /// sets `seq.num_cached_tokens` to the cached tokens and counts the query in
    /// [`prefix_cache_stats`](Self::prefix_cache_stats).
    ///
    /// # Errors
    /// Nothing is changed and [`Error::Other`] is returned when `seq` already has blocks or
    /// the first `num_cached_blocks` blocks are not all in the cache;
    /// [`Error::OutOfMemory`] when there are not enough free blocks.
    pub fn allocate(&mut self, seq: &mut Sequence, num_cached_blocks: usize) -> Result<()> {
        if !seq.block_table.is_empty() {
            return Err(Error::Other(format!(
                "block manager: sequence {} already holds {} blocks, allocate expects none",
                seq.seq_id,
                seq.block_table.len()
            )));
        }
        let num_blocks = seq.num_blocks(self.block_size);
        if num_cached_blocks > 0 && (!self.enable_prefix_caching || num_cached_blocks >= num_blocks)
        {
            return Err(Error::Other(format!(
                "block manager: sequence {} asks for {num_cached_blocks} cached blocks of \
                 {num_blocks} with prefix caching {}",
                seq.seq_id,
                if self.enable_prefix_caching {
                    "on"
                } else {
                    "off"
                }
            )));
        }
        // First pass, changing nothing in the manager: find the cached blocks again. After a
        // `can_allocate` of this sequence, its hits are re-checked instead of re-hashed: a map
        // entry still pointing at the block means the block still holds the tokens it was
        // hashed from, and those equal this sequence's, so the chained hashes agree too.
        let memo = &self.last_lookup;
        let use_memo = memo.seq_id == seq.seq_id
            && memo.num_tokens == seq.num_tokens
            && memo.hits.len() >= num_cached_blocks;
        let mut h = None;
        let mut num_new_blocks = num_blocks;
        for i in 0..num_cached_blocks {
            let token_ids = seq.block(i, self.block_size);
            let found = if use_memo {
                let (hash, id) = memo.hits[i];
                (self.hash_to_block_id.get(&hash) == Some(&id)
                    && self.stored_tokens(id) == token_ids)
                    .then_some(id)
            } else {
                let hash = Self::compute_hash(token_ids, h);
                h = Some(hash);
                self.lookup(hash, token_ids)
            };
            let Some(id) = found else {
                seq.block_table.clear();
                return Err(Error::Other(format!(
                    "block manager: block {i} of sequence {} is not in the prefix cache",
                    seq.seq_id
                )));
            };
            if self.blocks[id as usize].ref_count > 0 {
                num_new_blocks -= 1;
            }
            seq.block_table.push(id);
        }
        if self.free_block_ids.len < num_new_blocks {
            seq.block_table.clear();
            return Err(Error::OutOfMemory(format!(
                "KV cache: sequence {} needs {num_new_blocks} free blocks, {} are free",
                seq.seq_id, self.free_block_ids.len
            )));
        }
        // Second pass: take the cached blocks, then fresh ones.
        for &id in &seq.block_table {
            let block = &mut self.blocks[id as usize];
            if block.ref_count > 0 {
                block.ref_count += 1;
            } else {
                block.ref_count = 1;
                self.free_block_ids.remove(id);
            }
        }
        for _ in num_cached_blocks..num_blocks {
            let id = self
                .allocate_block()
                .ok_or_else(|| Error::Other("block manager: free list underflow".to_string()))?;
            seq.block_table.push(id);
        }
        seq.num_cached_tokens = num_cached_blocks * self.block_size;
        if self.enable_prefix_caching {
            self.stats.num_queries += 1;
            self.stats.num_query_tokens += seq.num_tokens as u64;
            self.stats.num_hit_tokens += seq.num_cached_tokens as u64;
        }
        Ok(())
    }

    /// Drops `seq`'s hold on its blocks (last block first); a block whose count reaches 0 goes
    /// to the back of the free list, keeping its cached content. Clears `seq.block_table` and
    /// `seq.num_cached_tokens`.
    pub fn deallocate(&mut self, seq: &mut Sequence) {
        for &id in seq.block_table.iter().rev() {
            let Some(block) = self.blocks.get_mut(id as usize) else {
                debug_assert!(false, "block {id} out of range");
                continue;
            };
            if block.ref_count == 0 {
                debug_assert!(false, "block {id} freed twice");
                continue;
            }
            block.ref_count -= 1;
            if block.ref_count == 0 {
                self.free_block_ids.push_back(id);
            }
        }
        seq.num_cached_tokens = 0;
        seq.block_table.clear();
    }

    /// Whether the decode step of `seq` (whose last token is not yet in the cache) needs a new
    /// block, i.e. the last token starts a block: `len(seq) % block_size == 1` in nano-vLLM.
    #[inline]
    fn needs_new_block(&self, seq: &Sequence) -> bool {
        seq.num_tokens > seq.block_table.len() * self.block_size
    }

    /// Number of full blocks in `num_tokens` tokens.
    #[inline]
    fn full_blocks(&self, num_tokens: usize) -> usize {
        match self.block_shift {
            Some(shift) => num_tokens >> shift,
            None => num_tokens / self.block_size,
        }
    }

    /// Whether `seq` can take its next decode step: a free block exists if it needs one.
    #[inline]
    pub fn can_append(&self, seq: &Sequence) -> bool {
        self.free_block_ids.len >= usize::from(self.needs_new_block(seq))
    }

    /// Gives `seq` a new block when its last token starts one.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when it needs one and none is free (call
    /// [`can_append`](Self::can_append) first).
    #[inline]
    pub fn may_append(&mut self, seq: &mut Sequence) -> Result<()> {
        if self.needs_new_block(seq) {
            let id = self.allocate_block().ok_or_else(|| {
                Error::OutOfMemory(format!(
                    "KV cache: no free block for the next token of sequence {}",
                    seq.seq_id
                ))
            })?;
            seq.block_table.push(id);
        }
        Ok(())
    }

    /// Registers in the prefix cache the blocks of `seq` that the current step fills: those
    /// between `num_cached_tokens` and `num_cached_tokens + num_scheduled_tokens`. Called after
    /// the step has run, before those counters advance.
    #[inline]
    pub fn hash_blocks(&mut self, seq: &Sequence) {
        if !self.enable_prefix_caching {
            return;
        }
        let start = self.full_blocks(seq.num_cached_tokens);
        let computed = (seq.num_cached_tokens + seq.num_scheduled_tokens).min(seq.num_tokens);
        let end = self.full_blocks(computed).min(seq.block_table.len());
        if start < end {
            self.register_blocks(seq, start, end);
        }
    }

    /// Hashes blocks `start..end` of `seq` and registers them. Out of line: most decode steps
    /// fill no block, and keeping this off the inlined check keeps the callers' loops tight.
    #[inline(never)]
    fn register_blocks(&mut self, seq: &Sequence, start: usize, end: usize) {
        let bs = self.block_size;
        let mut h = if start > 0 {
            self.blocks[seq.block_table[start - 1] as usize].hash
        } else {
            None
        };
        for i in start..end {
            let id = seq.block_table[i];
            let token_ids = seq.block(i, bs);
            let hash = Self::compute_hash(token_ids, h);
            h = Some(hash);
            self.blocks[id as usize].hash = Some(hash);
            let start = id as usize * bs;
            self.block_token_ids[start..start + bs].copy_from_slice(token_ids);
            self.hash_to_block_id.insert(hash, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling_params::SamplingParams;

    fn seq(id: u64, tokens: Vec<u32>) -> Sequence {
        Sequence::new(id, tokens, SamplingParams::default(), 0).unwrap()
    }

    /// Runs a whole prefill of `s` as the scheduler would, then registers its full blocks.
    fn prefill(bm: &mut BlockManager, s: &mut Sequence) {
        let n = bm.can_allocate(s).expect("room");
        bm.allocate(s, n).unwrap();
        s.num_scheduled_tokens = s.num_tokens - s.num_cached_tokens;
        bm.hash_blocks(s);
        s.num_cached_tokens += s.num_scheduled_tokens;
        s.num_scheduled_tokens = 0;
    }

    #[test]
    fn hash_is_chained_xxh64_of_le_bytes() {
        let tokens = [1u32, 2, 3];
        let mut bytes = Vec::new();
        for t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        let h0 = BlockManager::compute_hash(&tokens, None);
        assert_eq!(h0, xxhash_rust::xxh64::xxh64(&bytes, 0));
        let mut chained = h0.to_le_bytes().to_vec();
        chained.extend_from_slice(&bytes);
        assert_eq!(
            BlockManager::compute_hash(&tokens, Some(h0)),
            xxhash_rust::xxh64::xxh64(&chained, 0)
        );
    }

    #[test]
    fn shared_prefix_is_reused_and_last_block_never_looked_up() {
        let mut bm = BlockManager::new(8, 4, true).unwrap();
        let mut a = seq(0, (0..10).collect());
        prefill(&mut bm, &mut a);
        assert_eq!(a.block_table, vec![0, 1, 2]);
        assert_eq!(bm.num_used_blocks(), 3);

        // Same first 8 tokens: two blocks shared, in use, so only one new block.
        let mut b = seq(1, (0..8).chain([99, 98, 97]).collect());
        assert_eq!(bm.can_allocate(&b), Some(2));
        prefill(&mut bm, &mut b);
        assert_eq!(b.block_table, vec![0, 1, 3]);
        assert_eq!(bm.ref_count(0), 2);
        assert_eq!(bm.ref_count(3), 1);

        // A prompt of exactly two full blocks: its last block is computed, not looked up.
        let c = seq(2, (0..8).collect());
        assert_eq!(bm.can_allocate(&c), Some(1));

        let stats = bm.prefix_cache_stats();
        assert_eq!(stats.num_queries, 2);
        assert_eq!(stats.num_query_tokens, 21);
        assert_eq!(stats.num_hit_tokens, 8);
    }

    #[test]
    fn freed_blocks_stay_findable_until_reused() {
        let mut bm = BlockManager::new(4, 2, true).unwrap();
        let mut a = seq(0, vec![1, 2, 3, 4, 5]);
        prefill(&mut bm, &mut a);
        bm.deallocate(&mut a);
        // Freed last block first: free list is 3, 2, 1, 0.
        assert_eq!(bm.free_block_ids().collect::<Vec<_>>(), vec![3, 2, 1, 0]);
        let mut b = seq(1, vec![1, 2, 3, 4, 6]);
        assert_eq!(bm.can_allocate(&b), Some(2));
        prefill(&mut bm, &mut b);
        // Hits taken out of the middle of the free list; the fresh block comes from the front.
        assert_eq!(b.block_table, vec![0, 1, 3]);
        assert_eq!(b.num_cached_tokens, 5);
        assert_eq!(bm.free_block_ids().collect::<Vec<_>>(), vec![2]);
        bm.deallocate(&mut b);
        // Taking every block again evicts the old content and its map entries.
        let mut c = seq(2, vec![7, 8, 9, 10, 11, 12, 13, 14]);
        prefill(&mut bm, &mut c);
        assert_eq!(bm.hash_to_block_id().count(), 4);
        assert!(bm
            .hash_to_block_id()
            .all(|(h, id)| bm.block_hash(id) == Some(h)));
        bm.deallocate(&mut c);
        assert_eq!(bm.can_allocate(&seq(3, vec![1, 2, 3, 4, 0])), Some(0));
    }

    #[test]
    fn allocate_rechecks_the_hits_of_can_allocate() {
        let mut bm = BlockManager::new(4, 2, true).unwrap();
        let mut a = seq(0, vec![1, 2, 3, 4, 5]);
        prefill(&mut bm, &mut a);
        bm.deallocate(&mut a);
        let mut b = seq(1, vec![1, 2, 3, 4, 6]);
        assert_eq!(bm.can_allocate(&b), Some(2));
        // Another sequence with the same id and length but other tokens cannot use those hits.
        let mut impostor = seq(1, vec![1, 2, 9, 9, 6]);
        assert!(matches!(
            bm.allocate(&mut impostor, 2),
            Err(Error::Other(_))
        ));
        // Evict the cached blocks between `can_allocate` and `allocate`.
        let mut c = seq(2, vec![7, 8, 9, 10, 11, 12, 13, 14]);
        prefill(&mut bm, &mut c);
        bm.deallocate(&mut c);
        assert!(matches!(bm.allocate(&mut b, 2), Err(Error::Other(_))));
        assert!(b.block_table.is_empty());
        assert_eq!(bm.num_free_blocks(), 4);
        assert_eq!(bm.can_allocate(&b), Some(0));
        bm.allocate(&mut b, 0).unwrap();
    }

    #[test]
    fn prefix_caching_off_never_hits() {
        let mut bm = BlockManager::new(8, 4, false).unwrap();
        let mut a = seq(0, (0..10).collect());
        prefill(&mut bm, &mut a);
        let b = seq(1, (0..10).collect());
        assert_eq!(bm.can_allocate(&b), Some(0));
        assert_eq!(bm.hash_to_block_id().count(), 0);
        assert_eq!(bm.prefix_cache_stats(), PrefixCacheStats::default());
    }

    #[test]
    fn decode_appends_a_block_at_each_boundary() {
        let mut bm = BlockManager::new(3, 4, true).unwrap();
        let mut a = seq(0, vec![1, 2, 3, 4]);
        prefill(&mut bm, &mut a);
        a.append_token(5); // starts block 1
        assert!(bm.can_append(&a));
        bm.may_append(&mut a).unwrap();
        assert_eq!(a.block_table.len(), 2);
        a.append_token(6);
        bm.may_append(&mut a).unwrap();
        assert_eq!(a.block_table.len(), 2);
        let mut b = seq(1, vec![9, 9, 9, 9]);
        prefill(&mut bm, &mut b);
        assert_eq!(bm.num_free_blocks(), 0);
        for t in 7..=9 {
            a.append_token(t);
        }
        assert!(!bm.can_append(&a));
        assert!(matches!(bm.may_append(&mut a), Err(Error::OutOfMemory(_))));
    }

    #[test]
    fn misuse_is_an_error_and_changes_nothing() {
        let mut bm = BlockManager::new(2, 4, true).unwrap();
        let mut a = seq(0, (0..9).collect());
        assert_eq!(bm.can_allocate(&a), None);
        assert!(matches!(bm.allocate(&mut a, 0), Err(Error::OutOfMemory(_))));
        assert!(matches!(bm.allocate(&mut a, 1), Err(Error::Other(_))));
        assert!(a.block_table.is_empty());
        assert_eq!(bm.num_free_blocks(), 2);
        let mut b = seq(1, vec![1]);
        bm.allocate(&mut b, 0).unwrap();
        assert!(matches!(bm.allocate(&mut b, 0), Err(Error::Other(_))));
        assert!(matches!(
            BlockManager::new(1, 0, true),
            Err(Error::EngineConfig { .. })
        ));
    }
}
