//! The paged KV cache: per decoder layer, one K and one V buffer of
//! `[num_blocks, block_size, num_kv_heads / tp, head_dim]` bf16.
//!
//! The model runner sizes it once at start-up (from the memory left after weights and
//! activations, [`KvCache::bytes_per_block`]); the block manager hands out block ids; each
//! attention layer writes this step's keys and values at `slot_mapping` and reads them back
//! through `block_tables`.

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_layers::tp::divide;
use nanovllm_utils::{Error, ModelConfig, Result};

/// The KV cache of every layer on one rank.
pub struct KvCache<B: Backend> {
    /// Per layer, the key cache `[num_blocks, block_size, num_kv_heads / tp, head_dim]`.
    pub k: Vec<B::Buf<bf16>>,
    /// Per layer, the value cache, same shape.
    pub v: Vec<B::Buf<bf16>>,
    /// Blocks per layer.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates (zeroed) `num_blocks` blocks of `block_size` tokens for every layer of
    /// `config`, this rank's `num_key_value_heads / tp_size` heads. Errors when `tp_size` does not
    /// divide the key/value heads or `block_size` is not a power of two in `1..=256`.
    pub fn new(
        be: &B,
        config: &ModelConfig,
        tp_size: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        if !block_size.is_power_of_two() || block_size > 256 {
            return Err(Error::EngineConfig {
                option: "kvcache_block_size",
                msg: format!("must be a power of two no larger than 256, got {block_size}"),
            });
        }
        let kv_heads = divide(config.num_key_value_heads, tp_size, "num_key_value_heads")?;
        let len = num_blocks
            .checked_mul(block_size * kv_heads * config.head_dim)
            .ok_or_else(|| {
                Error::OutOfMemory(format!("a KV cache of {num_blocks} blocks overflows usize"))
            })?;
        let layers = config.num_hidden_layers;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(be.zeros(len)?);
            v.push(be.zeros(len)?);
        }
        Ok(Self {
            k,
            v,
            num_blocks,
            block_size,
        })
    }

    /// Bytes one block takes over all layers (K and V) on one rank of a `tp_size` group:
    /// `2 * num_hidden_layers * block_size * (num_key_value_heads / tp_size) * head_dim * 2`.
    pub fn bytes_per_block(config: &ModelConfig, tp_size: usize, block_size: usize) -> usize {
        let kv_heads = config.num_key_value_heads / tp_size.max(1);
        2 * config.num_hidden_layers
            * block_size
            * kv_heads
            * config.head_dim
            * std::mem::size_of::<bf16>()
    }

    /// Total token slots (`num_blocks * block_size`).
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}
