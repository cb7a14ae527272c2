//! The vocabulary-parallel ends of the model (nano-vLLM's `layers/embed_head.py`): the token
//! embedding at the start of the forward pass and the LM head that turns the final hidden
//! states into logits for the sampler.
//!
//! Both split the vocabulary into `tp` equal row ranges of the `[vocab, hidden]` matrix. The
//! embedding zeroes the rows of tokens outside its range (the mask) and sums over ranks with an
//! all-reduce. The LM head computes logits only for the rows the step wants (the last token of
//! each prefill sequence, every row in decode), for its vocabulary slice, and gathers the slices
//! to rank 0, which alone samples.
//!
//! When the model ties its word embeddings, the head shares the embedding's matrix (one buffer,
//! reference-counted), as nano-vLLM assigns `lm_head.weight.data = embed_tokens.weight.data`.

use std::sync::Arc;

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_utils::{Error, Result};

use crate::context::Context;
use crate::linear::upload;
use crate::loader::WeightSource;
use crate::tp::{divide, TpComm};

/// This rank's range of the vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VocabShard {
    num_embeddings: usize,
    embedding_dim: usize,
    per_partition: usize,
    start: usize,
}

impl VocabShard {
    fn new(num_embeddings: usize, embedding_dim: usize, rank: usize, size: usize) -> Result<Self> {
        let per_partition = divide(num_embeddings, size, "vocab_size")?;
        Ok(Self {
            num_embeddings,
            embedding_dim,
            per_partition,
            start: rank * per_partition,
        })
    }

    /// Reads this rank's rows of `name` (`[num_embeddings, embedding_dim]`) into `weight`.
    fn load<B: Backend>(
        &self,
        be: &B,
        src: &dyn WeightSource,
        name: &str,
        weight: &mut Arc<B::Buf<bf16>>,
    ) -> Result<()> {
        let Some(weight) = Arc::get_mut(weight) else {
            return Err(Error::Other(format!(
                "cannot load `{name}`: the matrix is shared with a tied layer; load the \
                 embedding before tying the LM head to it"
            )));
        };
        let data = src.load_narrow(
            name,
            &[self.num_embeddings, self.embedding_dim],
            0,
            self.start,
            self.per_partition,
        )?;
        upload(be, name, &data, weight)
    }
}

/// The token embedding, split over ranks by vocabulary rows.
pub struct VocabParallelEmbedding<B: Backend> {
    shard: VocabShard,
    comm: Arc<dyn TpComm<B>>,
    weight: Arc<B::Buf<bf16>>,
}

impl<B: Backend> VocabParallelEmbedding<B> {
    /// Allocates this rank's `[num_embeddings / tp, embedding_dim]` rows; errors when `tp`
    /// does not divide the vocabulary.
    pub fn new(
        be: &B,
        num_embeddings: usize,
        embedding_dim: usize,
        comm: &Arc<dyn TpComm<B>>,
    ) -> Result<Self> {
        let shard = VocabShard::new(num_embeddings, embedding_dim, comm.rank(), comm.size())?;
        Ok(Self {
            shard,
            comm: Arc::clone(comm),
            weight: Arc::new(be.alloc(shard.per_partition * embedding_dim)?),
        })
    }

    /// Loads rows `rank * vocab/tp .. (rank + 1) * vocab/tp` of checkpoint tensor `name`.
    /// Errors if a tied LM head already shares the matrix.
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        self.shard.load(be, src, name, &mut self.weight)
    }

    /// `out[i, :] = E[ids[i], :]` for `n` tokens; on each rank the rows of other ranks'
    /// tokens are zero, and the all-reduce adds the ranks' rows together.
    pub fn forward(
        &self,
        be: &B,
        ids: &B::Buf<u32>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        let s = &self.shard;
        be.embedding(
            ids,
            n,
            &self.weight,
            s.start,
            s.per_partition,
            s.embedding_dim,
            out,
        )?;
        if self.comm.size() > 1 {
            self.comm.all_reduce_sum(be, out, n * s.embedding_dim)?;
        }
        Ok(())
    }

    /// This rank's rows of the matrix, `[vocab / tp, embedding_dim]`.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }
}

/// Device buffers the LM head writes into, sized once for `max_rows` logits rows.
pub struct LogitsBuffers<B: Backend> {
    max_rows: usize,
    /// `[max_rows, hidden]`: the hidden states of the rows whose logits are wanted.
    last_hidden: B::Buf<bf16>,
    /// `[max_rows, vocab / tp]`: this rank's logits (the whole logits when `tp == 1`).
    part: B::Buf<bf16>,
    /// Rank 0 with `tp > 1`: the gathered parts, `[tp, max_rows, vocab / tp]`; elsewhere one
    /// element (never read).
    gathered: B::Buf<bf16>,
    /// Rank 0 with `tp > 1`: the logits `[max_rows, vocab]` and the row order (`[max_rows * tp]`)
    /// that rebuilds them from `gathered`.
    full: Option<(B::Buf<bf16>, B::Buf<i32>)>,
}

impl<B: Backend> LogitsBuffers<B> {
    /// Where the last [`ParallelLMHead::forward`] left its logits: the whole rows on rank 0
    /// (or with one rank), this rank's vocabulary slice elsewhere.
    pub fn output(&self) -> &B::Buf<bf16> {
        match &self.full {
            Some((logits, _)) => logits,
            None => &self.part,
        }
    }

    /// Allocates the buffers for up to `max_rows` logits rows of a `vocab`-wide head over
    /// `hidden` features, for this rank of `comm`.
    pub fn new(
        be: &B,
        vocab: usize,
        hidden: usize,
        comm: &dyn TpComm<B>,
        max_rows: usize,
    ) -> Result<Self> {
        let tp = comm.size();
        let per_rank = divide(vocab, tp, "vocab_size")?;
        let root = tp > 1 && comm.rank() == 0;
        let full = if root {
            // Logits viewed as `[max_rows * tp, vocab / tp]`: row `r * tp + t` is rank t's slice
            // of row r, found at row `t * max_rows + r` of `gathered`.
            let order: Vec<i32> = (0..max_rows)
                .flat_map(|r| (0..tp).map(move |t| (t * max_rows + r) as i32))
                .collect();
            Some((be.alloc(max_rows * vocab)?, be.from_host(&order)?))
        } else {
            None
        };
        Ok(Self {
            max_rows,
            last_hidden: be.alloc(max_rows * hidden)?,
            part: be.alloc(max_rows * per_rank)?,
            gathered: be.alloc(if root { max_rows * vocab } else { 1 })?,
            full,
        })
    }

    /// Bytes these buffers take for the given shape (for memory planning).
    pub fn bytes(
        vocab: usize,
        hidden: usize,
        tp_rank: usize,
        tp_size: usize,
        max_rows: usize,
    ) -> usize {
        let root = tp_size > 1 && tp_rank == 0;
        let last_hidden = max_rows * hidden;
        let part = max_rows * vocab / tp_size.max(1);
        // `gathered`, and `full`'s logits and row order (i32, as wide as two bf16).
        let (gathered, logits, order) = if root {
            (max_rows * vocab, max_rows * vocab, 2 * max_rows * tp_size)
        } else {
            (1, 0, 0)
        };
        (last_hidden + part + gathered + logits + order) * std::mem::size_of::<bf16>()
    }

    /// Most logits rows one step may ask for.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// This rank's vocabulary slice of the last [`ParallelLMHead::forward`]'s rows,
    /// `[rows, vocab / tp]` (the whole rows when `tp == 1`).
    pub fn part(&self) -> &B::Buf<bf16> {
        &self.part
    }
}

/// The LM head: logits of the wanted rows for this rank's vocabulary slice, gathered to rank 0.
pub struct ParallelLMHead<B: Backend> {
    shard: VocabShard,
    comm: Arc<dyn TpComm<B>>,
    weight: Arc<B::Buf<bf16>>,
    tied: bool,
}

impl<B: Backend> ParallelLMHead<B> {
    /// An untied head with its own (uninitialised) `[vocab / tp, hidden]` matrix.
    pub fn new(
        be: &B,
        num_embeddings: usize,
        embedding_dim: usize,
        comm: &Arc<dyn TpComm<B>>,
    ) -> Result<Self> {
        let shard = VocabShard::new(num_embeddings, embedding_dim, comm.rank(), comm.size())?;
        Ok(Self {
            shard,
            comm: Arc::clone(comm),
            weight: Arc::new(be.alloc(shard.per_partition * embedding_dim)?),
            tied: false,
        })
    }

    /// A head tied to `embed`: it reads the embedding's matrix (same rows on every rank).
    pub fn tied(embed: &VocabParallelEmbedding<B>) -> Self {
        Self {
            shard: embed.shard,
            comm: Arc::clone(&embed.comm),
            weight: Arc::clone(&embed.weight),
            tied: true,
        }
    }

    /// Whether the head shares the embedding's matrix.
    pub fn is_tied(&self) -> bool {
        self.tied
    }

    /// Loads this rank's rows of checkpoint tensor `name` (`lm_head.weight`); an error for a
    /// tied head, which has no tensor of its own.
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        if self.tied {
            return Err(Error::Other(format!(
                "cannot load `{name}` into an LM head tied to the embedding"
            )));
        }
        self.shard.load(be, src, name, &mut self.weight)
    }

    /// Logits of rows `ctx.logits_indices[..ctx.num_logits]` of `hidden_states`
    /// (`[num_tokens, hidden]`, already normalised).
    ///
    /// Returns `[num_logits, vocab]` on rank 0. On other ranks (`tp > 1`) it returns this
    /// rank's slice `[num_logits, vocab / tp]`, which only rank 0 may sample from. Without
    /// `gather` every rank returns its slice and nothing is gathered (the ranks then sample
    /// their slices: [`Backend::sample_shard`]).
    pub fn forward<'a>(
        &self,
        be: &B,
        hidden_states: &B::Buf<bf16>,
        ctx: &Context<'_, B>,
        bufs: &'a mut LogitsBuffers<B>,
        gather: bool,
    ) -> Result<&'a B::Buf<bf16>> {
        let rows = ctx.num_logits;
        if rows > bufs.max_rows {
            return Err(Error::Shape {
                op: "ParallelLMHead::forward",
                tensor: "logits rows (num_logits)",
                expected: rows,
                found: bufs.max_rows,
            });
        }
        let s = &self.shard;
        let hidden = s.embedding_dim;
        be.gather_rows(
            hidden_states,
            ctx.logits_indices,
            rows,
            hidden,
            &mut bufs.last_hidden,
        )?;
        be.gemm(
            &bufs.last_hidden,
            &self.weight,
            rows,
            s.per_partition,
            hidden,
            &mut bufs.part,
        )?;
        if self.comm.size() == 1 || !gather {
            return Ok(&bufs.part);
        }
        let len = rows * s.per_partition;
        self.comm
            .gather_rank0(be, &bufs.part, len, &mut bufs.gathered)?;
        match &mut bufs.full {
            Some((logits, order)) => {
                let tp = self.comm.size();
                be.gather_rows(&bufs.gathered, order, rows * tp, s.per_partition, logits)?;
                Ok(logits)
            }
            None => Ok(&bufs.part),
        }
    }

    /// This rank's rows of the matrix, `[vocab / tp, hidden]`.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::host::HostWeights;
    use crate::testutil::{assert_close, matmul_ref, on_threads, rand_bf16, HeadCtx};
    use crate::tp::SingleRank;
    use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};

    type Comm = Arc<dyn TpComm<CpuBackend>>;

    const VOCAB: usize = 12;
    const HIDDEN: usize = 4;

    fn source(e: &[bf16]) -> HostWeights {
        let mut w = HostWeights::default();
        w.insert("embed", &[VOCAB, HIDDEN], e.to_vec());
        w.insert("head", &[VOCAB, HIDDEN], e.iter().map(|x| -*x).collect());
        w
    }

    #[test]
    fn embedding_masks_other_ranks_tokens_and_all_reduces() {
        let be = CpuBackend::new();
        let e = rand_bf16(VOCAB * HIDDEN, 1);
        let src = source(&e);
        let ids = [0u32, 5, 6, 11, 3];
        let want: Vec<bf16> = ids
            .iter()
            .flat_map(|&t| e[t as usize * HIDDEN..(t as usize + 1) * HIDDEN].to_vec())
            .collect();
        for tp in [1, 2, 3] {
            let outs = on_threads(tp, |c| {
                let comm: Comm = Arc::new(c);
                let mut emb = VocabParallelEmbedding::new(&be, VOCAB, HIDDEN, &comm).unwrap();
                emb.load(&be, &src, "embed").unwrap();
                let r = comm.rank();
                let per = VOCAB / tp;
                assert_eq!(
                    emb.weight().as_slice(),
                    &e[r * per * HIDDEN..(r + 1) * per * HIDDEN]
                );
                let mut out = be.zeros::<bf16>(ids.len() * HIDDEN).unwrap();
                emb.forward(&be, &CpuBuf::from_vec(ids.to_vec()), ids.len(), &mut out)
                    .unwrap();
                out.into_vec()
            });
            for out in outs {
                assert_eq!(out, want, "tp {tp}");
            }
        }
    }

    /// Logits of the chosen rows, for tp = 1, 2 and 3: rank 0 gets the whole rows, the other
    /// ranks their vocabulary slice.
    #[test]
    fn lm_head_computes_the_chosen_rows_and_gathers_to_rank0() {
        let be = CpuBackend::new();
        let e = rand_bf16(VOCAB * HIDDEN, 2);
        let src = source(&e);
        let head_w: Vec<bf16> = e.iter().map(|x| -*x).collect();
        let n = 5;
        let x = rand_bf16(n * HIDDEN, 3);
        let chosen = [4i32, 0, 2];
        let picked: Vec<bf16> = chosen
            .iter()
            .flat_map(|&i| x[i as usize * HIDDEN..(i as usize + 1) * HIDDEN].to_vec())
            .collect();
        let want = matmul_ref(&picked, &head_w, chosen.len(), VOCAB, HIDDEN);
        for tp in [1, 2, 3] {
            let outs = on_threads(tp, |c| {
                let comm: Comm = Arc::new(c);
                let mut head = ParallelLMHead::new(&be, VOCAB, HIDDEN, &comm).unwrap();
                head.load(&be, &src, "head").unwrap();
                // Room for more rows than asked, as in a real workspace.
                let mut bufs = LogitsBuffers::new(&be, VOCAB, HIDDEN, &*comm, 4).unwrap();
                let hc = HeadCtx::new(&chosen);
                let xb = CpuBuf::from_vec(x.clone());
                let logits = head.forward(&be, &xb, &hc.ctx(n), &mut bufs, true).unwrap();
                logits.as_slice().to_vec()
            });
            let rows = chosen.len();
            assert_close(&outs[0][..rows * VOCAB], &want, &format!("tp {tp} rank 0"));
            let per = VOCAB / tp;
            for (r, out) in outs.iter().enumerate().skip(1) {
                let slice: Vec<f64> = (0..rows)
                    .flat_map(|i| want[i * VOCAB + r * per..i * VOCAB + (r + 1) * per].to_vec())
                    .collect();
                assert_close(&out[..rows * per], &slice, &format!("tp {tp} rank {r}"));
            }
        }
    }

    #[test]
    fn tied_head_reads_the_embedding() {
        let be = CpuBackend::new();
        let e = rand_bf16(VOCAB * HIDDEN, 4);
        let src = source(&e);
        let comm: Comm = Arc::new(SingleRank);
        let mut emb = VocabParallelEmbedding::new(&be, VOCAB, HIDDEN, &comm).unwrap();
        emb.load(&be, &src, "embed").unwrap();
        let mut head = ParallelLMHead::tied(&emb);
        assert!(head.is_tied());
        assert_eq!(head.weight().as_slice(), e.as_slice());
        // Neither side can be written while shared.
        assert!(head.load(&be, &src, "head").is_err());
        let err = emb.load(&be, &src, "embed").unwrap_err().to_string();
        assert!(err.contains("shared"), "{err}");

        let mut bufs = LogitsBuffers::new(&be, VOCAB, HIDDEN, &SingleRank, 2).unwrap();
        let x = rand_bf16(2 * HIDDEN, 5);
        let hc = HeadCtx::new(&[1, 0]);
        let logits = head
            .forward(
                &be,
                &CpuBuf::from_vec(x.clone()),
                &hc.ctx(2),
                &mut bufs,
                true,
            )
            .unwrap();
        let swapped: Vec<bf16> = x[HIDDEN..].iter().chain(&x[..HIDDEN]).copied().collect();
        assert_close(
            &logits.as_slice()[..2 * VOCAB],
            &matmul_ref(&swapped, &e, 2, VOCAB, HIDDEN),
            "tied logits",
        );
        // More rows than the buffers hold is an error, not an overrun.
        let hc = HeadCtx::new(&[0, 1, 1]);
        let err = head
            .forward(&be, &CpuBuf::from_vec(x), &hc.ctx(2), &mut bufs, true)
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                Error::Shape {
                    expected: 3,
                    found: 2,
                    ..
                }
            ),
            "{err}"
        );
    }
}
