//! Qwen3 for causal LM (nano-vLLM's `models/qwen3.py`): the model the engine runs.
//!
//! Flow of one step: the model runner builds a [`Context`] and calls
//! [`Qwen3ForCausalLM::forward`] (embedding -> decoder layers -> final norm, every activation in
//! the preallocated [`Workspace`], keys and values into the [`KvCache`]), then
//! [`Qwen3ForCausalLM::compute_logits`] for the rows it samples.
//!
//! What makes it Qwen3 rather than Llama: a per-head RMSNorm on q and k before RoPE, no biases,
//! and GQA. The word embeddings are tied to the LM head when `tie_word_embeddings` (the
//! checkpoint then has no `lm_head.weight`). Checkpoint tensors map onto the fused layers through
//! [`PACKED_MODULES_MAPPING`]: `q_proj`/`k_proj`/`v_proj` into `qkv_proj`, `gate_proj`/`up_proj`
//! into `gate_up_proj`.
//!
//! Decoder layer, with the residual stream kept apart and added inside each norm:
//! ```text
//! x = input_layernorm(x + residual)            residual = x + residual
//! x = o_proj(attn(rope(qk_norm(qkv_proj(x)))))
//! x = post_attention_layernorm(x + residual)   residual = x + residual
//! x = down_proj(silu(gate) * up)               [gate, up] = gate_up_proj(x)
//! ```
//! The activation and `down_proj` are one call (`RowParallelLinear::forward_partial_silu`), which
//! the CUDA backend runs as one kernel at decode batch sizes of up to 8.
//! With tensor parallelism `o_proj` and `down_proj` give each rank a partial sum, and the
//! all-reduce that sums them is taken into the norm that follows (the next layer's
//! `input_layernorm`, or the final norm after the last layer): `RMSNorm::reduce_add_forward`,
//! one kernel on GPUs where the one-shot all-reduce applies, with the same result as the
//! all-reduce followed by the norm. With one rank it is the plain norm.

use std::sync::Arc;

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_layers::attention::Attention;
use nanovllm_layers::context::Context;
use nanovllm_layers::embed_head::{LogitsBuffers, ParallelLMHead, VocabParallelEmbedding};
use nanovllm_layers::layernorm::RMSNorm;
use nanovllm_layers::linear::{
    MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, RowParallelOutput,
};
use nanovllm_layers::loader::WeightSource;
use nanovllm_layers::rotary_embedding::RotaryEmbedding;
use nanovllm_layers::tp::{divide, TpComm};
use nanovllm_utils::{Error, ModelConfig, Result, Weights};

use crate::dummy::DummyWeights;
pub use crate::kv_cache::KvCache;

/// Checkpoint module -> (fused module, shard index): how Hugging Face's separate projections
/// land in this model's fused ones. Shard `i` of a fused module is placed after shards `0..i`
/// in each rank's weight (q, k, v for `qkv_proj`; gate, up for `gate_up_proj`).
pub const PACKED_MODULES_MAPPING: &[(&str, &str, usize)] = &[
    ("q_proj", "qkv_proj", 0),
    ("k_proj", "qkv_proj", 1),
    ("v_proj", "qkv_proj", 2),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
];

/// The checkpoint modules that make up fused module `packed`, in shard order.
fn packed_sources(packed: &str) -> Vec<&'static str> {
    let mut parts: Vec<(usize, &str)> = PACKED_MODULES_MAPPING
        .iter()
        .filter(|(_, fused, _)| *fused == packed)
        .map(|&(module, _, shard)| (shard, module))
        .collect();
    parts.sort_unstable();
    parts.into_iter().map(|(_, module)| module).collect()
}

/// The shapes one rank works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dims {
    hidden: usize,
    head_dim: usize,
    /// Query heads on this rank.
    num_heads: usize,
    /// Key/value heads on this rank.
    num_kv_heads: usize,
    /// MLP width on this rank.
    inter: usize,
    vocab: usize,
    layers: usize,
    tp_rank: usize,
    tp_size: usize,
}

impl Dims {
    /// Checks that `config` can run split over `tp_size` ranks.
    fn new(config: &ModelConfig, tp_rank: usize, tp_size: usize) -> Result<Self> {
        let num_heads = divide(config.num_attention_heads, tp_size, "num_attention_heads")?;
        let num_kv_heads = divide(config.num_key_value_heads, tp_size, "num_key_value_heads")?;
        let inter = divide(config.intermediate_size, tp_size, "intermediate_size")?;
        divide(config.vocab_size, tp_size, "vocab_size")?;
        if num_heads.checked_rem(num_kv_heads) != Some(0) {
            return Err(Error::Other(format!(
                "Qwen3: num_attention_heads ({}) must be a non-zero multiple of \
                 num_key_value_heads ({})",
                config.num_attention_heads, config.num_key_value_heads
            )));
        }
        if tp_rank >= tp_size {
            return Err(Error::Other(format!(
                "tensor-parallel rank {tp_rank} is outside a group of {tp_size}"
            )));
        }
        Ok(Self {
            hidden: config.hidden_size,
            head_dim: config.head_dim,
            num_heads,
            num_kv_heads,
            inter,
            vocab: config.vocab_size,
            layers: config.num_hidden_layers,
            tp_rank,
            tp_size,
        })
    }

    fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
}

/// Every activation buffer of a forward pass, allocated once for `max_num_tokens` rows and
/// `max_logits` logits rows, reused by every step (the hot path allocates nothing).
pub struct Workspace<B: Backend> {
    dims: Dims,
    max_num_tokens: usize,
    /// `[max_num_tokens, hidden]` the residual stream.
    residual: B::Buf<bf16>,
    /// `[max_num_tokens, hidden]` the normalised input of each block, then its output; after
    /// the forward pass, the final hidden states.
    hidden: B::Buf<bf16>,
    /// A second `hidden` from the group ([`TpComm::alloc_shared`]), where it shares the rows
    /// of prefill-sized steps out between the ranks: swapped in for the steps whose
    /// row-parallel products overlap their all-reduce, so that the other steps (and the decode
    /// graphs) keep the plain allocation.
    hidden_shared: Option<B::Buf<bf16>>,
    /// Whether `hidden` and `hidden_shared` are swapped now.
    shared_in: bool,
    /// `[max_num_tokens, (heads + 2 * kv_heads) * head_dim]` fused q/k/v (this rank's heads).
    qkv: B::Buf<bf16>,
    /// `[max_num_tokens, heads * head_dim]` attention output.
    attn_out: B::Buf<bf16>,
    /// `[max_num_tokens, 2 * intermediate / tp]` fused gate/up.
    gate_up: B::Buf<bf16>,
    /// `[max_num_tokens, intermediate / tp]` MLP activation.
    act: B::Buf<bf16>,
    /// The LM head's buffers.
    logits: LogitsBuffers<B>,
}

impl<B: Backend> Workspace<B> {
    /// Allocates the buffers `model` needs for steps of up to `max_num_tokens` tokens
    /// (`max_num_batched_tokens`) and `max_logits` logits rows (`max_num_seqs`, or
    /// `max_num_tokens` to get the logits of every row).
    pub fn new(
        be: &B,
        model: &Qwen3ForCausalLM<B>,
        max_num_tokens: usize,
        max_logits: usize,
    ) -> Result<Self> {
        let d = model.dims;
        let t = max_num_tokens;
        Ok(Self {
            dims: d,
            max_num_tokens,
            residual: be.alloc(t * d.hidden)?,
            hidden: be.alloc(t * d.hidden)?,
            hidden_shared: model.comm.alloc_shared(be, t * d.hidden)?,
            shared_in: false,
            qkv: be.alloc(t * d.qkv_width())?,
            attn_out: be.alloc(t * d.num_heads * d.head_dim)?,
            gate_up: be.alloc(t * 2 * d.inter)?,
            act: be.alloc(t * d.inter)?,
            logits: LogitsBuffers::new(be, d.vocab, d.hidden, &*model.comm, max_logits)?,
        })
    }

    /// Bytes [`Workspace::new`] allocates on rank `tp_rank` of `tp_size` (for memory planning),
    /// besides the second `hidden` of a group that shares rows out ([`TpComm::alloc_shared`]:
    /// `max_num_tokens * hidden` bf16 more).
    pub fn bytes(
        config: &ModelConfig,
        tp_rank: usize,
        tp_size: usize,
        max_num_tokens: usize,
        max_logits: usize,
    ) -> Result<usize> {
        let d = Dims::new(config, tp_rank, tp_size)?;
        let per_token =
            2 * d.hidden + d.qkv_width() + d.num_heads * d.head_dim + 2 * d.inter + d.inter;
        Ok(max_num_tokens * per_token * std::mem::size_of::<bf16>()
            + LogitsBuffers::<B>::bytes(d.vocab, d.hidden, tp_rank, tp_size, max_logits))
    }

    /// Most tokens one step may hold.
    pub fn max_num_tokens(&self) -> usize {
        self.max_num_tokens
    }

    /// Most logits rows one step may ask for.
    pub fn max_logits(&self) -> usize {
        self.logits.max_rows()
    }

    /// The logits of the last [`Qwen3ForCausalLM::compute_logits`] (whole rows on rank 0).
    pub fn logits(&self) -> &B::Buf<bf16> {
        self.logits.output()
    }

    /// This rank's vocabulary slice of the last [`Qwen3ForCausalLM::compute_logits`]'s rows,
    /// `[rows, vocab / tp]` (the whole rows with one rank).
    pub fn logits_part(&self) -> &B::Buf<bf16> {
        self.logits.part()
    }

    /// The final hidden states `[num_tokens, hidden]` of the last forward pass (after the final
    /// norm).
    pub fn hidden_states(&self) -> &B::Buf<bf16> {
        &self.hidden
    }
}

/// Self-attention of one decoder layer.
struct Qwen3Attention<B: Backend> {
    qkv_proj: QKVParallelLinear<B>,
    o_proj: RowParallelLinear<B>,
    q_norm: RMSNorm<B>,
    k_norm: RMSNorm<B>,
    attn: Attention,
}

impl<B: Backend> Qwen3Attention<B> {
    fn new(be: &B, config: &ModelConfig, comm: &Arc<dyn TpComm<B>>) -> Result<Self> {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim);
        let qkv_proj = QKVParallelLinear::new(
            be,
            hidden,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            comm,
        )?;
        let attn = Attention::new(qkv_proj.num_heads(), qkv_proj.num_kv_heads(), head_dim);
        Ok(Self {
            o_proj: RowParallelLinear::new(
                be,
                config.num_attention_heads * head_dim,
                hidden,
                comm,
            )?,
            q_norm: RMSNorm::new(be, head_dim, config.rms_norm_eps)?,
            k_norm: RMSNorm::new(be, head_dim, config.rms_norm_eps)?,
            qkv_proj,
            attn,
        })
    }

    fn load(&mut self, be: &B, src: &dyn WeightSource, prefix: &str) -> Result<()> {
        let names: Vec<String> = packed_sources("qkv_proj")
            .iter()
            .map(|m| format!("{prefix}.{m}.weight"))
            .collect();
        self.qkv_proj
            .load(be, src, &names[0], &names[1], &names[2])?;
        self.o_proj
            .load(be, src, &format!("{prefix}.o_proj.weight"))?;
        self.q_norm
            .load(be, src, &format!("{prefix}.q_norm.weight"))?;
        self.k_norm
            .load(be, src, &format!("{prefix}.k_norm.weight"))
    }

    /// `hidden` (normalised input) -> `hidden` (the attention block's output: this rank's
    /// partial sum, or the sum where the group overlaps the all-reduce with the product; the
    /// answer says which, for the norm that follows); keys and values go to layer `layer` of
    /// `kv`.
    fn forward(
        &self,
        be: &B,
        rope: &RotaryEmbedding<B>,
        ctx: &Context<'_, B>,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        layer: usize,
    ) -> Result<RowParallelOutput> {
        let n = ctx.num_tokens;
        self.qkv_proj.forward(be, &ws.hidden, n, &mut ws.qkv)?;
        let (k_cache, v_cache) = (&mut kv.k[layer], &mut kv.v[layer]);
        self.attn.forward_with_qk_norm_rope(
            be,
            &mut ws.qkv,
            ctx,
            rope,
            &self.q_norm,
            &self.k_norm,
            k_cache,
            v_cache,
            kv.block_size,
            &mut ws.attn_out,
        )?;
        self.o_proj
            .forward_for_norm(be, &ws.attn_out, n, &mut ws.hidden)
    }
}

/// The MLP of one decoder layer.
struct Qwen3MLP<B: Backend> {
    gate_up_proj: MergedColumnParallelLinear<B>,
    down_proj: RowParallelLinear<B>,
}

impl<B: Backend> Qwen3MLP<B> {
    fn new(be: &B, config: &ModelConfig, comm: &Arc<dyn TpComm<B>>) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_up_proj: MergedColumnParallelLinear::new(be, hidden, &[inter, inter], comm)?,
            down_proj: RowParallelLinear::new(be, inter, hidden, comm)?,
        })
    }

    fn load(&mut self, be: &B, src: &dyn WeightSource, prefix: &str) -> Result<()> {
        let names: Vec<String> = packed_sources("gate_up_proj")
            .iter()
            .map(|m| format!("{prefix}.{m}.weight"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.gate_up_proj.load(be, src, &names)?;
        self.down_proj
            .load(be, src, &format!("{prefix}.down_proj.weight"))
    }

    /// `hidden` (normalised input) -> `hidden` (the MLP's output: this rank's partial sum, or
    /// the sum, as the answer says; see [`Qwen3Attention::forward`]).
    fn forward(&self, be: &B, n: usize, ws: &mut Workspace<B>) -> Result<RowParallelOutput> {
        self.gate_up_proj
            .forward(be, &ws.hidden, n, &mut ws.gate_up)?;
        // silu(gate) * up, then down_proj (one kernel for a few rows on CUDA).
        self.down_proj
            .forward_silu_for_norm(be, &ws.gate_up, n, &mut ws.act, &mut ws.hidden)
    }
}

/// One decoder layer.
struct Qwen3DecoderLayer<B: Backend> {
    self_attn: Qwen3Attention<B>,
    mlp: Qwen3MLP<B>,
    input_layernorm: RMSNorm<B>,
    post_attention_layernorm: RMSNorm<B>,
}

impl<B: Backend> Qwen3DecoderLayer<B> {
    fn new(be: &B, config: &ModelConfig, comm: &Arc<dyn TpComm<B>>) -> Result<Self> {
        Ok(Self {
            self_attn: Qwen3Attention::new(be, config, comm)?,
            mlp: Qwen3MLP::new(be, config, comm)?,
            input_layernorm: RMSNorm::new(be, config.hidden_size, config.rms_norm_eps)?,
            post_attention_layernorm: RMSNorm::new(be, config.hidden_size, config.rms_norm_eps)?,
        })
    }

    fn load(&mut self, be: &B, src: &dyn WeightSource, prefix: &str) -> Result<()> {
        self.self_attn
            .load(be, src, &format!("{prefix}.self_attn"))?;
        self.mlp.load(be, src, &format!("{prefix}.mlp"))?;
        self.input_layernorm
            .load(be, src, &format!("{prefix}.input_layernorm.weight"))?;
        self.post_attention_layernorm.load(
            be,
            src,
            &format!("{prefix}.post_attention_layernorm.weight"),
        )
    }

    /// Layer `layer` of the model. The first layer normalises the embeddings (already in
    /// `residual`, all-reduced by the embedding); the others add the previous layer's output
    /// (in `hidden`, what `prev` says: this rank's partial sum, summed over the ranks of
    /// `comm` here, or the sum) to the residual stream first. Leaves the layer's output in
    /// `hidden` and answers what it is.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        be: &B,
        comm: &dyn TpComm<B>,
        rope: &RotaryEmbedding<B>,
        ctx: &Context<'_, B>,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        layer: usize,
        prev: RowParallelOutput,
    ) -> Result<RowParallelOutput> {
        let n = ctx.num_tokens;
        if layer == 0 {
            self.input_layernorm
                .forward(be, &ws.residual, n, &mut ws.hidden)?;
        } else {
            self.input_layernorm.reduce_add_forward(
                be,
                comm,
                &mut ws.hidden,
                &mut ws.residual,
                n,
                prev,
            )?;
        }
        let attn = self.self_attn.forward(be, rope, ctx, ws, kv, layer)?;
        self.post_attention_layernorm.reduce_add_forward(
            be,
            comm,
            &mut ws.hidden,
            &mut ws.residual,
            n,
            attn,
        )?;
        self.mlp.forward(be, n, ws)
    }
}

/// Qwen3 for causal LM on one tensor-parallel rank.
pub struct Qwen3ForCausalLM<B: Backend> {
    config: ModelConfig,
    dims: Dims,
    comm: Arc<dyn TpComm<B>>,
    embed_tokens: VocabParallelEmbedding<B>,
    layers: Vec<Qwen3DecoderLayer<B>>,
    norm: RMSNorm<B>,
    /// `None` only while a tied model's embedding is being loaded.
    lm_head: Option<ParallelLMHead<B>>,
    rotary_emb: RotaryEmbedding<B>,
}

impl<B: Backend> Qwen3ForCausalLM<B> {
    /// Builds the model for `config` on this rank of `comm`, allocating (uninitialised) weights
    /// and the RoPE table; errors when `comm.size()` does not divide the heads, the MLP width or
    /// the vocabulary.
    pub fn new(be: &B, config: &ModelConfig, comm: Arc<dyn TpComm<B>>) -> Result<Self> {
        let dims = Dims::new(config, comm.rank(), comm.size())?;
        let embed_tokens =
            VocabParallelEmbedding::new(be, config.vocab_size, config.hidden_size, &comm)?;
        let layers = (0..config.num_hidden_layers)
            .map(|_| Qwen3DecoderLayer::new(be, config, &comm))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if config.tie_word_embeddings {
            ParallelLMHead::tied(&embed_tokens)
        } else {
            ParallelLMHead::new(be, config.vocab_size, config.hidden_size, &comm)?
        };
        Ok(Self {
            config: config.clone(),
            dims,
            embed_tokens,
            layers,
            norm: RMSNorm::new(be, config.hidden_size, config.rms_norm_eps)?,
            lm_head: Some(lm_head),
            rotary_emb: RotaryEmbedding::new(
                be,
                config.head_dim,
                config.max_position_embeddings,
                config.rope_theta,
            )?,
            comm,
        })
    }

    /// Names of every checkpoint tensor the model reads (`lm_head.weight` only when untied).
    pub fn checkpoint_names(&self) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        for i in 0..self.layers.len() {
            let p = format!("model.layers.{i}");
            for m in ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"] {
                names.push(format!("{p}.self_attn.{m}.weight"));
            }
            for m in ["gate_proj", "up_proj", "down_proj"] {
                names.push(format!("{p}.mlp.{m}.weight"));
            }
            names.push(format!("{p}.input_layernorm.weight"));
            names.push(format!("{p}.post_attention_layernorm.weight"));
        }
        names.push("model.norm.weight".to_string());
        if !self.config.tie_word_embeddings {
            names.push("lm_head.weight".to_string());
        }
        names
    }

    /// Loads this rank's shards from the safetensors files of a model folder. Every tensor of
    /// [`Qwen3ForCausalLM::checkpoint_names`] must be present with its Hugging Face shape; the
    /// error names the missing or misshapen tensors. Other tensors in the files are ignored.
    pub fn load_weights(&mut self, be: &B, weights: &Weights) -> Result<()> {
        self.load_from(be, weights)
    }

    /// Fills the model with seeded random weights (vLLM's `--load-format dummy`): see
    /// [`DummyWeights`]. The same seed gives the same model under any tensor-parallel size.
    pub fn load_dummy(&mut self, be: &B, seed: u64) -> Result<()> {
        self.load_from(be, &DummyWeights::new(seed))
    }

    /// Loads this rank's shards from any [`WeightSource`].
    pub fn load_from(&mut self, be: &B, src: &dyn WeightSource) -> Result<()> {
        let missing: Vec<String> = self
            .checkpoint_names()
            .into_iter()
            .filter(|n| !src.contains(n))
            .collect();
        if !missing.is_empty() {
            let shown = missing
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            let more = missing.len().saturating_sub(8);
            return Err(Error::Weights {
                file: src.location(),
                msg: format!(
                    "{} tensor(s) missing: {shown}{}",
                    missing.len(),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            });
        }
        let tied = self.config.tie_word_embeddings;
        if tied {
            // Release the head's share of the embedding matrix so that it can be written.
            self.lm_head = None;
        }
        let result = self.load_tensors(be, src);
        if tied {
            self.lm_head = Some(ParallelLMHead::tied(&self.embed_tokens));
        }
        result
    }

    fn load_tensors(&mut self, be: &B, src: &dyn WeightSource) -> Result<()> {
        self.embed_tokens
            .load(be, src, "model.embed_tokens.weight")?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.load(be, src, &format!("model.layers.{i}"))?;
        }
        self.norm.load(be, src, "model.norm.weight")?;
        match &mut self.lm_head {
            Some(head) if !head.is_tied() => head.load(be, src, "lm_head.weight"),
            _ => Ok(()),
        }
    }

    /// Runs the decoder over the step's `ctx.num_tokens` tokens (`input_ids[..num_tokens]`),
    /// writing their keys and values into `kv` and the final (normalised) hidden states into
    /// `ws`. Call [`Qwen3ForCausalLM::compute_logits`] next.
    pub fn forward(
        &self,
        be: &B,
        input_ids: &B::Buf<u32>,
        ctx: &Context<'_, B>,
        kv: &mut KvCache<B>,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        self.check_step(be, ctx, kv, ws)?;
        let n = ctx.num_tokens;
        // The shared `hidden` for the steps whose rows the group shares out, the plain one for
        // the rest (it stays in place for `compute_logits` after this pass).
        let shared =
            self.comm.size() > 1 && self.comm.overlaps_gemm_all_reduce(n, self.dims.hidden);
        if let Some(h) = ws.hidden_shared.as_mut().filter(|_| shared != ws.shared_in) {
            std::mem::swap(&mut ws.hidden, h);
            ws.shared_in = shared;
        }
        self.embed_tokens
            .forward(be, input_ids, n, &mut ws.residual)?;
        let mut out = RowParallelOutput::Partial;
        for (i, layer) in self.layers.iter().enumerate() {
            out = layer.forward(be, &*self.comm, &self.rotary_emb, ctx, ws, kv, i, out)?;
        }
        if self.layers.is_empty() {
            self.norm.forward(be, &ws.residual, n, &mut ws.hidden)
        } else {
            // The last layer's output, all-reduced inside the norm where it is partial.
            self.norm
                .reduce_add_forward(be, &*self.comm, &mut ws.hidden, &mut ws.residual, n, out)
        }
    }

    /// Logits of the rows `ctx.logits_indices[..ctx.num_logits]` of the last forward pass:
    /// `[num_logits, vocab_size]` (row-major, in a buffer that may be longer). With
    /// tensor parallelism only rank 0 gets whole rows; other ranks get their vocabulary slice
    /// `[num_logits, vocab_size / tp]` and must not sample. Without `gather` no rows are
    /// gathered and every rank gets its slice (for [`Backend::sample_shard`]).
    pub fn compute_logits<'w>(
        &self,
        be: &B,
        ctx: &Context<'_, B>,
        ws: &'w mut Workspace<B>,
        gather: bool,
    ) -> Result<&'w B::Buf<bf16>> {
        let head = self.lm_head.as_ref().ok_or_else(|| {
            Error::Other("Qwen3ForCausalLM: the LM head is not loaded".to_string())
        })?;
        let Workspace { hidden, logits, .. } = ws;
        head.forward(be, hidden, ctx, logits, gather)
    }

    /// Checks that the step fits the workspace and the cache was made for this model.
    fn check_step(
        &self,
        be: &B,
        ctx: &Context<'_, B>,
        kv: &KvCache<B>,
        ws: &Workspace<B>,
    ) -> Result<()> {
        if ws.dims != self.dims {
            return Err(Error::Other(format!(
                "Qwen3ForCausalLM::forward: the workspace was made for another model or rank \
                 ({:?}, model {:?})",
                ws.dims, self.dims
            )));
        }
        if ctx.num_tokens > ws.max_num_tokens {
            return Err(Error::Shape {
                op: "Qwen3ForCausalLM::forward",
                tensor: "workspace rows (max_num_tokens)",
                expected: ctx.num_tokens,
                found: ws.max_num_tokens,
            });
        }
        let d = &self.dims;
        let per_layer = kv.num_slots() * d.num_kv_heads * d.head_dim;
        if kv.k.len() != d.layers || kv.v.len() != d.layers {
            return Err(Error::Other(format!(
                "Qwen3ForCausalLM::forward: the KV cache has {}/{} K/V layers, the model {}",
                kv.k.len(),
                kv.v.len(),
                d.layers
            )));
        }
        for (k, v) in kv.k.iter().zip(&kv.v) {
            if be.len(k) != per_layer || be.len(v) != per_layer {
                return Err(Error::Shape {
                    op: "Qwen3ForCausalLM::forward",
                    tensor: "kv cache layer (num_blocks * block_size * kv_heads * head_dim)",
                    expected: per_layer,
                    found: be.len(k).min(be.len(v)),
                });
            }
        }
        Ok(())
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tensor-parallel group the model runs in.
    pub fn comm(&self) -> &Arc<dyn TpComm<B>> {
        &self.comm
    }
}

/// Parameters of the whole (unsharded) model: embedding, decoder layers, final norm and, when
/// untied, the LM head.
pub fn param_count(config: &ModelConfig) -> usize {
    let (h, hd, i) = (
        config.hidden_size,
        config.head_dim,
        config.intermediate_size,
    );
    let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
    let attn = h * (nh + 2 * nkv) * hd + nh * hd * h + 2 * hd;
    let mlp = 3 * h * i;
    let per_layer = attn + mlp + 2 * h;
    let embed = config.vocab_size * h;
    let head = if config.tie_word_embeddings { 0 } else { embed };
    embed + config.num_hidden_layers * per_layer + h + head
}

/// Bytes of the whole model's weights in bf16 (`2 * param_count`).
pub fn weight_bytes(config: &ModelConfig) -> usize {
    param_count(config) * std::mem::size_of::<bf16>()
}

/// Bytes of one rank's weights in bf16 under `tp_size`-way tensor parallelism: the sharded
/// matrices divided by `tp_size`, the norms replicated.
pub fn weight_bytes_per_rank(config: &ModelConfig, tp_size: usize) -> usize {
    let tp = tp_size.max(1);
    let (h, hd, l) = (
        config.hidden_size,
        config.head_dim,
        config.num_hidden_layers,
    );
    let replicated = l * (2 * hd + 2 * h) + h;
    (replicated + (param_count(config) - replicated) / tp) * std::mem::size_of::<bf16>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanovllm_kernels::cpu::CpuBackend;
    use nanovllm_layers::tp::ThreadComm;
    use std::path::Path;

    /// A small Qwen3 with every dimension distinct, GQA and an untied head.
    fn config(tied: bool) -> ModelConfig {
        let text = format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 24, "intermediate_size": 40,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 6, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 64, "vocab_size": 50, "tie_word_embeddings": {tied},
            "torch_dtype": "bfloat16", "eos_token_id": 1}}"#
        );
        ModelConfig::from_json_str(&text, Path::new("test/config.json")).unwrap()
    }

    fn weight_elems(be: &CpuBackend, m: &Qwen3ForCausalLM<CpuBackend>) -> usize {
        let mut n = be.len(m.embed_tokens.weight()) + be.len(m.norm.weight());
        if let Some(head) = m.lm_head.as_ref().filter(|h| !h.is_tied()) {
            n += be.len(head.weight());
        }
        for l in &m.layers {
            let a = &l.self_attn;
            n += be.len(a.qkv_proj.weight())
                + be.len(a.o_proj.weight())
                + be.len(a.q_norm.weight())
                + be.len(a.k_norm.weight())
                + be.len(l.mlp.gate_up_proj.weight())
                + be.len(l.mlp.down_proj.weight())
                + be.len(l.input_layernorm.weight())
                + be.len(l.post_attention_layernorm.weight());
        }
        n
    }

    #[test]
    fn sizes_agree_with_what_is_allocated() {
        let be = CpuBackend::new();
        for tied in [true, false] {
            let c = config(tied);
            let m =
                Qwen3ForCausalLM::new(&be, &c, Arc::new(nanovllm_layers::tp::SingleRank)).unwrap();
            assert_eq!(weight_elems(&be, &m), param_count(&c), "tied {tied}");
            assert_eq!(2 * param_count(&c), weight_bytes(&c));
            for (rank, comm) in ThreadComm::group(2).into_iter().enumerate() {
                let m = Qwen3ForCausalLM::new(&be, &c, Arc::new(comm)).unwrap();
                assert_eq!(2 * weight_elems(&be, &m), weight_bytes_per_rank(&c, 2));
                let ws = Workspace::new(&be, &m, 7, 3).unwrap();
                let elems = [
                    &ws.residual,
                    &ws.hidden,
                    &ws.qkv,
                    &ws.attn_out,
                    &ws.gate_up,
                    &ws.act,
                ]
                .iter()
                .map(|b| b.len())
                .sum::<usize>();
                // The logits buffers: [3, hidden] + [3, vocab / 2]; on rank 0 the gathered
                // parts and the logits ([3, vocab] each) and the i32 row order [3 * 2], on
                // rank 1 a one-element stand-in for the gathered parts.
                let bf16s = 3 * 24 + 3 * 25 + if rank == 0 { 2 * 3 * 50 } else { 1 };
                let i32s = if rank == 0 { 3 * 2 } else { 0 };
                let bytes = Workspace::<CpuBackend>::bytes(&c, rank, 2, 7, 3).unwrap();
                assert_eq!(bytes, 2 * (elems + bf16s) + 4 * i32s);
            }
        }
    }

    #[test]
    fn packed_modules_map_in_shard_order() {
        assert_eq!(packed_sources("qkv_proj"), ["q_proj", "k_proj", "v_proj"]);
        assert_eq!(packed_sources("gate_up_proj"), ["gate_proj", "up_proj"]);
    }

    #[test]
    fn uneven_tensor_parallel_split_is_refused() {
        let be = CpuBackend::new();
        let c = config(true); // 2 key/value heads
        let comm = ThreadComm::group(4).swap_remove(0);
        let err = Qwen3ForCausalLM::new(&be, &c, Arc::new(comm))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("num_key_value_heads (2)"), "{err}");
    }
}
