//! Property tests of the block manager: random allocate / prefill-chunk / decode-append /
//! deallocate sequences over prompts that share prefixes (by construction and by a tiny token
//! alphabet), checked after every operation
//! - against a reference model: a plain transcription of nano-vLLM's `block_manager.py` (list of
//!   blocks, `deque` free list with linear `remove`, `used_block_ids` set), which must give every
//!   sequence the same block table and cached-token count and keep the same free-list order;
//! - against the invariants: every block is either free (once) or held, never lost or freed
//!   twice; a block's reference count is the number of sequences holding it; the prefix-cache
//!   map points only at blocks whose stored hash is the map key, and every full computed block of
//!   a live sequence holds that sequence's tokens under its chained hash.

use nanovllm_engine::{BlockManager, SamplingParams, Sequence};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet, VecDeque};

/// nano-vLLM's block manager, written as plainly as the Python.
mod reference {
    use super::*;

    #[derive(Clone, Default)]
    struct Block {
        ref_count: u32,
        hash: Option<u64>,
        token_ids: Vec<u32>,
    }

    pub struct RefBlockManager {
        block_size: usize,
        caching: bool,
        blocks: Vec<Block>,
        hash_to_block_id: HashMap<u64, u32>,
        pub free_block_ids: VecDeque<u32>,
        used_block_ids: HashSet<u32>,
        pub hit_tokens: u64,
    }

    pub fn compute_hash(token_ids: &[u32], prefix: Option<u64>) -> u64 {
        let mut bytes = Vec::new();
        if let Some(p) = prefix {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        for t in token_ids {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        xxhash_rust::xxh64::xxh64(&bytes, 0)
    }

    impl RefBlockManager {
        pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
            Self {
                block_size,
                caching,
                blocks: vec![Block::default(); num_blocks],
                hash_to_block_id: HashMap::new(),
                free_block_ids: (0..num_blocks as u32).collect(),
                used_block_ids: HashSet::new(),
                hit_tokens: 0,
            }
        }

        fn allocate_block(&mut self) -> u32 {
            let id = self.free_block_ids.pop_front().unwrap();
            let block = &mut self.blocks[id as usize];
            assert_eq!(block.ref_count, 0);
            if let Some(h) = block.hash {
                if self.hash_to_block_id.get(&h) == Some(&id) {
                    self.hash_to_block_id.remove(&h);
                }
            }
            *block = Block {
                ref_count: 1,
                ..Block::default()
            };
            self.used_block_ids.insert(id);
            id
        }

        fn deallocate_block(&mut self, id: u32) {
            assert_eq!(self.blocks[id as usize].ref_count, 0);
            self.used_block_ids.remove(&id);
            self.free_block_ids.push_back(id);
        }

        pub fn can_allocate(&self, seq: &Sequence) -> i64 {
            let bs = self.block_size;
            let mut h = None;
            let mut num_cached_blocks = 0;
            let mut num_new_blocks = seq.num_blocks(bs);
            if self.caching {
                for i in 0..seq.num_blocks(bs) - 1 {
                    let token_ids = seq.block(i, bs);
                    h = Some(compute_hash(token_ids, h));
                    match self.hash_to_block_id.get(&h.unwrap()) {
                        Some(&id) if self.blocks[id as usize].token_ids == token_ids => {
                            num_cached_blocks += 1;
                            if self.used_block_ids.contains(&id) {
                                num_new_blocks -= 1;
                            }
                        }
                        _ => break,
                    }
                }
            }
            if self.free_block_ids.len() < num_new_blocks {
                -1
            } else {
                num_cached_blocks
            }
        }

        pub fn allocate(&mut self, seq: &mut Sequence, num_cached_blocks: usize) {
            assert!(seq.block_table.is_empty());
            let bs = self.block_size;
            let mut h = None;
            for i in 0..num_cached_blocks {
                h = Some(compute_hash(seq.block(i, bs), h));
                let id = self.hash_to_block_id[&h.unwrap()];
                if self.used_block_ids.contains(&id) {
                    self.blocks[id as usize].ref_count += 1;
                } else {
                    self.blocks[id as usize].ref_count = 1;
                    let pos = self.free_block_ids.iter().position(|&b| b == id).unwrap();
                    self.free_block_ids.remove(pos);
                    self.used_block_ids.insert(id);
                }
                seq.block_table.push(id);
            }
            for _ in num_cached_blocks..seq.num_blocks(bs) {
                let id = self.allocate_block();
                seq.block_table.push(id);
            }
            seq.num_cached_tokens = num_cached_blocks * bs;
            self.hit_tokens += seq.num_cached_tokens as u64;
        }

        pub fn deallocate(&mut self, seq: &mut Sequence) {
            for &id in seq.block_table.iter().rev() {
                self.blocks[id as usize].ref_count -= 1;
                if self.blocks[id as usize].ref_count == 0 {
                    self.deallocate_block(id);
                }
            }
            seq.num_cached_tokens = 0;
            seq.block_table.clear();
        }

        pub fn can_append(&self, seq: &Sequence) -> bool {
            self.free_block_ids.len() >= usize::from(seq.len() % self.block_size == 1)
        }

        pub fn may_append(&mut self, seq: &mut Sequence) {
            if seq.len() % self.block_size == 1 {
                let id = self.allocate_block();
                seq.block_table.push(id);
            }
        }

        pub fn hash_blocks(&mut self, seq: &Sequence) {
            if !self.caching {
                return;
            }
            let bs = self.block_size;
            let start = seq.num_cached_tokens / bs;
            let end = (seq.num_cached_tokens + seq.num_scheduled_tokens) / bs;
            if start == end {
                return;
            }
            let mut h = if start > 0 {
                self.blocks[seq.block_table[start - 1] as usize].hash
            } else {
                None
            };
            for i in start..end {
                let id = seq.block_table[i];
                let token_ids = seq.block(i, bs);
                h = Some(compute_hash(token_ids, h));
                let block = &mut self.blocks[id as usize];
                block.hash = h;
                block.token_ids = token_ids.to_vec();
                self.hash_to_block_id.insert(h.unwrap(), id);
            }
        }
    }
}

use reference::RefBlockManager;

#[derive(Debug, Clone)]
enum Op {
    /// A new sequence: one of three shared prefixes cut to `prefix_len` tokens, then `tail`;
    /// or, with `from_preempted`, a preempted sequence coming back.
    Alloc {
        prefix: usize,
        prefix_len: usize,
        tail: Vec<u32>,
        from_preempted: bool,
    },
    /// The next prefill chunk of `chunk` tokens for a prefilling sequence.
    Compute { pick: usize, chunk: usize },
    /// One decode step for a decoding sequence (preempts it when no block is free).
    Decode { pick: usize, token: u32 },
    /// Deallocates a sequence: finished, or preempted (kept to come back) with `requeue`.
    Free { pick: usize, requeue: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..14usize, prop::collection::vec(0..4u32, 0..9), any::<bool>()).prop_map(
            |(prefix, prefix_len, tail, from_preempted)| Op::Alloc {
                prefix,
                prefix_len,
                tail,
                from_preempted,
            }
        ),
        3 => (any::<usize>(), 1..8usize).prop_map(|(pick, chunk)| Op::Compute { pick, chunk }),
        4 => (any::<usize>(), 0..4u32).prop_map(|(pick, token)| Op::Decode { pick, token }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, requeue)| Op::Free { pick, requeue }),
    ]
}

/// A live sequence: the copy the block manager sees and the copy the reference sees.
struct Live {
    real: Sequence,
    model: Sequence,
    /// Its prompt (or, after preemption, its whole token list) is computed.
    decoding: bool,
}

fn prefixes() -> [Vec<u32>; 3] {
    [
        (0..14).map(|i| i % 5).collect(),
        (0..14).map(|i| (i * 7 + 1) % 5).collect(),
        vec![3; 14],
    ]
}

fn check_invariants(bm: &BlockManager, live: &[Live]) -> Result<(), TestCaseError> {
    let n = bm.num_blocks();
    let bs = bm.block_size();
    // Free list: no duplicates, and exactly the blocks nobody holds.
    let free: Vec<u32> = bm.free_block_ids().collect();
    let free_set: HashSet<u32> = free.iter().copied().collect();
    prop_assert_eq!(
        free_set.len(),
        free.len(),
        "a block is in the free list twice"
    );
    prop_assert_eq!(free.len(), bm.num_free_blocks());
    prop_assert_eq!(bm.num_free_blocks() + bm.num_used_blocks(), n);
    let mut holders = vec![0u32; n];
    for l in live {
        let table = &l.real.block_table;
        let distinct: HashSet<u32> = table.iter().copied().collect();
        prop_assert_eq!(
            distinct.len(),
            table.len(),
            "a sequence holds a block twice"
        );
        for &id in table {
            prop_assert!((id as usize) < n);
            holders[id as usize] += 1;
        }
    }
    for id in 0..n as u32 {
        prop_assert_eq!(
            bm.ref_count(id),
            holders[id as usize],
            "ref count of block {}",
            id
        );
        prop_assert_eq!(
            free_set.contains(&id),
            holders[id as usize] == 0,
            "block {} leaked or freed while held",
            id
        );
    }
    // The map points only at blocks hashed with that key, from a full block of tokens.
    for (h, id) in bm.hash_to_block_id() {
        prop_assert_eq!(bm.block_hash(id), Some(h));
        prop_assert_eq!(bm.block_token_ids(id).len(), bs);
    }
    // Every full computed block of a live sequence holds its tokens under its chained hash.
    if bm.enable_prefix_caching() {
        for l in live {
            let s = &l.real;
            let mut prev = None;
            for i in 0..s.num_cached_tokens / bs {
                let id = s.block_table[i];
                let expected = BlockManager::compute_hash(s.block(i, bs), prev);
                prop_assert_eq!(
                    bm.block_hash(id),
                    Some(expected),
                    "block {} of seq {}",
                    i,
                    s.seq_id
                );
                prop_assert_eq!(bm.block_token_ids(id), s.block(i, bs));
                prev = Some(expected);
            }
        }
    }
    Ok(())
}

fn run_ops(
    num_blocks: usize,
    block_size: usize,
    caching: bool,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut bm = BlockManager::new(num_blocks, block_size, caching).unwrap();
    let mut rm = RefBlockManager::new(num_blocks, block_size, caching);
    let prefixes = prefixes();
    let mut live: Vec<Live> = Vec::new();
    let mut preempted: Vec<Live> = Vec::new();
    let mut next_id = 0u64;
    for op in ops {
        match op {
            Op::Alloc {
                prefix,
                prefix_len,
                tail,
                from_preempted,
            } => {
                let mut l = if from_preempted && !preempted.is_empty() {
                    preempted.remove(0)
                } else {
                    let mut prompt = prefixes[prefix][..prefix_len].to_vec();
                    prompt.extend(tail);
                    if prompt.is_empty() {
                        prompt.push(4);
                    }
                    let s = Sequence::new(next_id, prompt, SamplingParams::default(), 0).unwrap();
                    next_id += 1;
                    Live {
                        real: s.clone(),
                        model: s,
                        decoding: false,
                    }
                };
                let got = bm.can_allocate(&l.real);
                let want = rm.can_allocate(&l.model);
                prop_assert_eq!(got.map_or(-1, |n| n as i64), want);
                if let Some(n) = got {
                    bm.allocate(&mut l.real, n).unwrap();
                    rm.allocate(&mut l.model, n);
                    live.push(l);
                } else {
                    preempted.push(l);
                }
            }
            Op::Compute { pick, chunk } => {
                let prefilling: Vec<usize> =
                    (0..live.len()).filter(|&i| !live[i].decoding).collect();
                if prefilling.is_empty() {
                    continue;
                }
                let l = &mut live[prefilling[pick % prefilling.len()]];
                for s in [&mut l.real, &mut l.model] {
                    s.num_scheduled_tokens = chunk.min(s.num_tokens - s.num_cached_tokens);
                }
                bm.hash_blocks(&l.real);
                rm.hash_blocks(&l.model);
                l.decoding = l.real.completes_prefill();
                for s in [&mut l.real, &mut l.model] {
                    s.num_cached_tokens += s.num_scheduled_tokens;
                    s.num_scheduled_tokens = 0;
                    if s.num_cached_tokens == s.num_tokens {
                        s.append_token(1);
                    }
                }
            }
            Op::Decode { pick, token } => {
                let decoding: Vec<usize> = (0..live.len()).filter(|&i| live[i].decoding).collect();
                if decoding.is_empty() {
                    continue;
                }
                let i = decoding[pick % decoding.len()];
                let l = &mut live[i];
                let can = bm.can_append(&l.real);
                prop_assert_eq!(can, rm.can_append(&l.model));
                if can {
                    bm.may_append(&mut l.real).unwrap();
                    rm.may_append(&mut l.model);
                    for s in [&mut l.real, &mut l.model] {
                        s.num_scheduled_tokens = 1;
                    }
                    bm.hash_blocks(&l.real);
                    rm.hash_blocks(&l.model);
                    for s in [&mut l.real, &mut l.model] {
                        s.num_cached_tokens += 1;
                        s.num_scheduled_tokens = 0;
                        s.append_token(token);
                    }
                } else {
                    let mut l = live.remove(i);
                    bm.deallocate(&mut l.real);
                    rm.deallocate(&mut l.model);
                    l.decoding = false;
                    preempted.push(l);
                }
            }
            Op::Free { pick, requeue } => {
                if live.is_empty() {
                    continue;
                }
                let mut l = live.remove(pick % live.len());
                bm.deallocate(&mut l.real);
                rm.deallocate(&mut l.model);
                if requeue {
                    l.decoding = false;
                    preempted.push(l);
                }
            }
        }
        for l in &live {
            prop_assert_eq!(
                &l.real,
                &l.model,
                "sequence state differs from the reference"
            );
        }
        let free: Vec<u32> = bm.free_block_ids().collect();
        prop_assert_eq!(
            &free,
            &rm.free_block_ids.iter().copied().collect::<Vec<_>>()
        );
        check_invariants(&bm, &live)?;
    }
    prop_assert_eq!(bm.prefix_cache_stats().num_hit_tokens, rm.hit_tokens);
    // Freeing everything returns every block.
    for mut l in live.drain(..) {
        bm.deallocate(&mut l.real);
    }
    prop_assert_eq!(bm.num_free_blocks(), num_blocks);
    check_invariants(&bm, &[])?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference_and_keeps_invariants(
        num_blocks in 3usize..24,
        block_size in 2usize..5,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run_ops(num_blocks, block_size, true, ops)?;
    }

    #[test]
    fn without_prefix_caching(
        num_blocks in 3usize..24,
        block_size in 2usize..5,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_ops(num_blocks, block_size, false, ops)?;
    }
}

/// The shared-prefix workload of the properties does produce hits (so the properties above
/// exercise the sharing paths, not only misses).
#[test]
fn shared_prefixes_hit() {
    let mut bm = BlockManager::new(16, 2, true).unwrap();
    let p = prefixes();
    let mut a = Sequence::new(0, p[0][..9].to_vec(), SamplingParams::default(), 0).unwrap();
    let n = bm.can_allocate(&a).unwrap();
    bm.allocate(&mut a, n).unwrap();
    a.num_scheduled_tokens = 9;
    bm.hash_blocks(&a);
    a.num_cached_tokens = 9;
    let b = Sequence::new(1, p[0][..7].to_vec(), SamplingParams::default(), 0).unwrap();
    assert_eq!(bm.can_allocate(&b), Some(3));
}
