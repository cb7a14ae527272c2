//! The linear family of nano-vLLM (`layers/linear.py`): a weight `[out, in]` in PyTorch's
//! layout and `y = x . W^T`, split over tensor-parallel ranks the Megatron way.
//!
//! * [`ReplicatedLinear`]: every rank holds the whole matrix.
//! * [`ColumnParallelLinear`]: rank `r` holds output rows `r * out/tp .. (r + 1) * out/tp`
//!   (a narrow along dim 0); its output is this rank's slice of the features, no
//!   communication.
//! * [`MergedColumnParallelLinear`]: several column-parallel matrices stacked into one GEMM
//!   (the MLP's gate and up projections -> `gate_up_proj`); rank `r` holds its slice of each.
//! * [`QKVParallelLinear`]: q, k and v projections fused (-> `qkv_proj`); rank `r` holds its
//!   `num_heads / tp` query heads and `num_kv_heads / tp` key/value heads.
//! * [`RowParallelLinear`]: rank `r` holds input columns `r * in/tp .. (r + 1) * in/tp` (a
//!   narrow along dim 1), multiplies the matching slice of the activations, and the partial
//!   products are summed across ranks by an all-reduce: in `forward`, or left to the caller
//!   with `forward_partial` when the next op can take the all-reduce into itself (the decoder's
//!   residual add + RMSNorm: `RMSNorm::reduce_add_forward`). The decoder calls
//!   `forward_for_norm`, which picks between the two per step and says which it did
//!   ([`RowParallelOutput`]): partial sums for few rows (the norm's fused all-reduce is
//!   cheapest), the sum itself for many, where the group can overlap the all-reduce with the
//!   product ([`TpComm::gemm_all_reduce`]).
//!
//! Qwen3 has no biases, so none of these carry one. Each layer's `load` reads only its rank's
//! shard of the checkpoint tensor(s) and uploads it once; `forward` is one GEMM on the hot path
//! (plus the all-reduce for [`RowParallelLinear`]) and allocates nothing.

use std::sync::Arc;

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_utils::{Error, Result};

use crate::loader::{host_zeros, WeightSource};
use crate::tp::{divide, TpComm};

/// Uploads a freshly read shard into a layer's weight buffer after checking its size, so that
/// a source returning the wrong amount of data is an error naming the tensor.
pub(crate) fn upload<B: Backend>(
    be: &B,
    what: &str,
    data: &[bf16],
    weight: &mut B::Buf<bf16>,
) -> Result<()> {
    let need = be.len(weight);
    if data.len() != need {
        return Err(Error::Weights {
            file: "<weight source>".into(),
            msg: format!(
                "`{what}`: the source returned {} values for a shard of {need}",
                data.len()
            ),
        });
    }
    be.htod(data, weight)
}

/// `out[n, out_features] = x[n, in_features] . weight^T` (shared by every linear layer).
fn matmul<B: Backend>(
    be: &B,
    x: &B::Buf<bf16>,
    weight: &B::Buf<bf16>,
    n: usize,
    out_features: usize,
    in_features: usize,
    out: &mut B::Buf<bf16>,
) -> Result<()> {
    be.gemm(x, weight, n, out_features, in_features, out)
}

/// A linear layer whose whole `[output_size, input_size]` matrix is on every rank.
pub struct ReplicatedLinear<B: Backend> {
    input_size: usize,
    output_size: usize,
    weight: B::Buf<bf16>,
}

impl<B: Backend> ReplicatedLinear<B> {
    /// Allocates the (uninitialised) weight.
    pub fn new(be: &B, input_size: usize, output_size: usize) -> Result<Self> {
        Ok(Self {
            input_size,
            output_size,
            weight: be.alloc(output_size * input_size)?,
        })
    }

    /// Loads checkpoint tensor `name`, `[output_size, input_size]`.
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        let data = src.load(name, &[self.output_size, self.input_size])?;
        upload(be, name, &data, &mut self.weight)
    }

    /// `out[n, output_size] = x[n, input_size] . W^T`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        matmul(
            be,
            x,
            &self.weight,
            n,
            self.output_size,
            self.input_size,
            out,
        )
    }

    /// The weight, `[output_size, input_size]`.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }
}

/// A linear layer split along its outputs: this rank computes `output_size / tp` features.
pub struct ColumnParallelLinear<B: Backend> {
    input_size: usize,
    output_size: usize,
    output_size_per_partition: usize,
    tp_rank: usize,
    tp_size: usize,
    weight: B::Buf<bf16>,
}

impl<B: Backend> ColumnParallelLinear<B> {
    /// Allocates this rank's `[output_size / tp, input_size]` shard; errors when `tp` does not
    /// divide `output_size`.
    pub fn new(
        be: &B,
        input_size: usize,
        output_size: usize,
        comm: &Arc<dyn TpComm<B>>,
    ) -> Result<Self> {
        let output_size_per_partition = divide(output_size, comm.size(), "linear output size")?;
        Ok(Self {
            input_size,
            output_size,
            output_size_per_partition,
            tp_rank: comm.rank(),
            tp_size: comm.size(),
            weight: be.alloc(output_size_per_partition * input_size)?,
        })
    }

    /// Loads this rank's rows of checkpoint tensor `name` (`[output_size, input_size]`):
    /// rows `rank * shard .. (rank + 1) * shard`.
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        let shard = self.output_size_per_partition;
        let data = src.load_narrow(
            name,
            &[self.output_size, self.input_size],
            0,
            self.tp_rank * shard,
            shard,
        )?;
        upload(be, name, &data, &mut self.weight)
    }

    /// `out[n, output_size / tp] = x[n, input_size] . W_shard^T`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        matmul(
            be,
            x,
            &self.weight,
            n,
            self.output_size_per_partition,
            self.input_size,
            out,
        )
    }

    /// Features this rank computes.
    pub fn output_size_per_partition(&self) -> usize {
        self.output_size_per_partition
    }

    /// This rank's weight shard, `[output_size / tp, input_size]`.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }
}

/// Several column-parallel matrices stacked along the outputs and run as one GEMM.
///
/// Checkpoint tensor `i` (`[output_sizes[i], input_size]`) contributes its rank-`r` chunk of
/// `output_sizes[i] / tp` rows, placed at row `sum(output_sizes[..i]) / tp` of the rank's
/// weight: with gate and up, each rank's output row is `[gate_r, up_r]`, which is what
/// `silu_and_mul` expects.
pub struct MergedColumnParallelLinear<B: Backend> {
    output_sizes: Vec<usize>,
    inner: ColumnParallelLinear<B>,
}

impl<B: Backend> MergedColumnParallelLinear<B> {
    /// Allocates this rank's shard; errors when `tp` does not divide every output size.
    pub fn new(
        be: &B,
        input_size: usize,
        output_sizes: &[usize],
        comm: &Arc<dyn TpComm<B>>,
    ) -> Result<Self> {
        for &size in output_sizes {
            divide(size, comm.size(), "merged linear output size")?;
        }
        let inner = ColumnParallelLinear::new(be, input_size, output_sizes.iter().sum(), comm)?;
        Ok(Self {
            output_sizes: output_sizes.to_vec(),
            inner,
        })
    }

    /// Loads shard `i` of the merged weight from checkpoint tensor `names[i]` (the
    /// packed-module mapping: `gate_proj` is shard 0 and `up_proj` shard 1 of `gate_up_proj`).
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, names: &[&str]) -> Result<()> {
        if names.len() != self.output_sizes.len() {
            return Err(Error::Other(format!(
                "merged linear of {} shards given {} tensor names ({names:?})",
                self.output_sizes.len(),
                names.len()
            )));
        }
        let (tp_rank, tp_size) = (self.inner.tp_rank, self.inner.tp_size);
        let input = self.inner.input_size;
        let mut data = host_zeros(self.inner.output_size_per_partition * input)?;
        let mut offset = 0;
        for (&name, &size) in names.iter().zip(&self.output_sizes) {
            // Shard i of this rank: chunk `tp_rank` of tensor i, at row sum(sizes[..i]) / tp.
            let shard = size / tp_size;
            let part = &mut data[offset * input..(offset + shard) * input];
            src.load_narrow_into(name, &[size, input], 0, tp_rank * shard, shard, part)?;
            offset += shard;
        }
        upload(be, &names.join(" + "), &data, &mut self.inner.weight)
    }

    /// `out[n, sum(output_sizes) / tp] = x[n, input_size] . W_shard^T`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        self.inner.forward(be, x, n, out)
    }

    /// Features this rank computes (`sum(output_sizes) / tp`).
    pub fn output_size_per_partition(&self) -> usize {
        self.inner.output_size_per_partition
    }

    /// This rank's weight shard.
    pub fn weight(&self) -> &B::Buf<bf16> {
        self.inner.weight()
    }
}

/// The fused q/k/v projection: one GEMM whose output row is this rank's q heads, then its k
/// heads, then its v heads (the `qkv` layout of the attention ops).
pub struct QKVParallelLinear<B: Backend> {
    hidden_size: usize,
    head_size: usize,
    total_num_heads: usize,
    total_num_kv_heads: usize,
    num_heads: usize,
    num_kv_heads: usize,
    inner: ColumnParallelLinear<B>,
}

impl<B: Backend> QKVParallelLinear<B> {
    /// Allocates this rank's shard; errors when `tp` does not divide both head counts.
    pub fn new(
        be: &B,
        hidden_size: usize,
        head_size: usize,
        total_num_heads: usize,
        total_num_kv_heads: usize,
        comm: &Arc<dyn TpComm<B>>,
    ) -> Result<Self> {
        let num_heads = divide(total_num_heads, comm.size(), "num_attention_heads")?;
        let num_kv_heads = divide(total_num_kv_heads, comm.size(), "num_key_value_heads")?;
        let output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size;
        let inner = ColumnParallelLinear::new(be, hidden_size, output_size, comm)?;
        Ok(Self {
            hidden_size,
            head_size,
            total_num_heads,
            total_num_kv_heads,
            num_heads,
            num_kv_heads,
            inner,
        })
    }

    /// Loads the q, k and v checkpoint tensors (`[total_heads * head_size, hidden_size]` each):
    /// rank `r` takes query heads `r * num_heads ..` into rows `0..q_size`, key heads
    /// `r * num_kv_heads ..` after them, then the same value heads.
    pub fn load(
        &mut self,
        be: &B,
        src: &dyn WeightSource,
        q_name: &str,
        k_name: &str,
        v_name: &str,
    ) -> Result<()> {
        let (hd, h, rank) = (self.head_size, self.hidden_size, self.inner.tp_rank);
        let q_rows = self.num_heads * hd;
        let kv_rows = self.num_kv_heads * hd;
        let mut data = host_zeros(self.inner.output_size_per_partition * h)?;
        let (q, kv) = data.split_at_mut(q_rows * h);
        let (k, v) = kv.split_at_mut(kv_rows * h);
        let q_shape = [self.total_num_heads * hd, h];
        src.load_narrow_into(q_name, &q_shape, 0, rank * q_rows, q_rows, q)?;
        let kv_shape = [self.total_num_kv_heads * hd, h];
        src.load_narrow_into(k_name, &kv_shape, 0, rank * kv_rows, kv_rows, k)?;
        src.load_narrow_into(v_name, &kv_shape, 0, rank * kv_rows, kv_rows, v)?;
        upload(
            be,
            &format!("{q_name} + {k_name} + {v_name}"),
            &data,
            &mut self.inner.weight,
        )
    }

    /// `out[n, (num_heads + 2 * num_kv_heads) * head_size] = x[n, hidden] . W_shard^T`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        self.inner.forward(be, x, n, out)
    }

    /// Query heads on this rank.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Key/value heads on this rank.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Width of one output row on this rank.
    pub fn output_size_per_partition(&self) -> usize {
        self.inner.output_size_per_partition
    }

    /// This rank's weight shard.
    pub fn weight(&self) -> &B::Buf<bf16> {
        self.inner.weight()
    }
}

/// What a row-parallel layer left in its output (see [`RowParallelLinear::forward_for_norm`]).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowParallelOutput {
    /// This rank's term of the sum; summing it over the ranks is left to the caller (with one
    /// rank, the whole product).
    Partial,
    /// The sum over the ranks, on every rank.
    Summed,
    /// This rank's term, with the rest of the sum under way in the communicator
    /// ([`TpComm::gemm_all_reduce_for_norm`]): the norm that follows must finish it
    /// ([`TpComm::finish_all_reduce_add_rms_norm`]) before any other collective.
    Received,
}

/// A linear layer split along its inputs: this rank multiplies its `input_size / tp` slice of
/// the activations (the output of a column-parallel layer) by its columns of the weight, and
/// the partial products are summed over ranks.
pub struct RowParallelLinear<B: Backend> {
    input_size: usize,
    input_size_per_partition: usize,
    output_size: usize,
    comm: Arc<dyn TpComm<B>>,
    weight: B::Buf<bf16>,
}

impl<B: Backend> RowParallelLinear<B> {
    /// Allocates this rank's `[output_size, input_size / tp]` shard; errors when `tp` does not
    /// divide `input_size`.
    pub fn new(
        be: &B,
        input_size: usize,
        output_size: usize,
        comm: &Arc<dyn TpComm<B>>,
    ) -> Result<Self> {
        let input_size_per_partition = divide(input_size, comm.size(), "linear input size")?;
        Ok(Self {
            input_size,
            input_size_per_partition,
            output_size,
            comm: Arc::clone(comm),
            weight: be.alloc(output_size * input_size_per_partition)?,
        })
    }

    /// Loads this rank's columns of checkpoint tensor `name` (`[output_size, input_size]`):
    /// columns `rank * shard .. (rank + 1) * shard`.
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        let shard = self.input_size_per_partition;
        let data = src.load_narrow(
            name,
            &[self.output_size, self.input_size],
            1,
            self.comm.rank() * shard,
            shard,
        )?;
        upload(be, name, &data, &mut self.weight)
    }

    /// `out[n, output_size] = sum over ranks of x_r[n, input_size / tp] . W_r^T`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        if self.comm.size() > 1 {
            return self.comm.gemm_all_reduce(
                be,
                x,
                &self.weight,
                n,
                self.output_size,
                self.input_size_per_partition,
                out,
            );
        }
        self.forward_partial(be, x, n, out)
    }

    /// Whether the group overlaps this layer's all-reduce with its product at `n` rows.
    fn sums_in_gemm(&self, n: usize) -> bool {
        self.comm.size() > 1 && self.comm.overlaps_gemm_all_reduce(n, self.output_size)
    }

    /// The layer's output for a residual add + RMSNorm that follows (the decoder's): where the
    /// group overlaps the all-reduce with the product at `n` rows
    /// ([`TpComm::overlaps_gemm_all_reduce`]), the sum over the ranks, or this rank's term with
    /// the rest of the sum under way for the norm to finish
    /// ([`TpComm::gemm_all_reduce_for_norm`]); this rank's term ([`Self::forward_partial`])
    /// otherwise, for the norm to fuse the all-reduce. The answer says which; pass it to
    /// [`crate::layernorm::RMSNorm::reduce_add_forward`] before any other collective.
    pub fn forward_for_norm(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<RowParallelOutput> {
        if self.sums_in_gemm(n) {
            return self.sum_for_norm(be, x, n, out);
        }
        self.forward_partial(be, x, n, out)?;
        Ok(RowParallelOutput::Partial)
    }

    /// [`Self::forward_for_norm`] of the MLP's activation, as [`Self::forward_partial_silu`]
    /// takes it: where the sum is overlapped with the product, `silu(gate) * up` goes to `act`
    /// first and the product reads it there.
    pub fn forward_silu_for_norm(
        &self,
        be: &B,
        gate_up: &B::Buf<bf16>,
        n: usize,
        act: &mut B::Buf<bf16>,
        out: &mut B::Buf<bf16>,
    ) -> Result<RowParallelOutput> {
        if self.sums_in_gemm(n) {
            be.silu_and_mul(gate_up, n, self.input_size_per_partition, act)?;
            return self.sum_for_norm(be, act, n, out);
        }
        self.forward_partial_silu(be, gate_up, n, act, out)?;
        Ok(RowParallelOutput::Partial)
    }

    /// The product summed over the ranks for a norm that follows
    /// ([`TpComm::gemm_all_reduce_for_norm`]): [`RowParallelOutput::Summed`], or
    /// [`RowParallelOutput::Received`] where the communicator left the end of the sum to the
    /// norm.
    fn sum_for_norm(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<RowParallelOutput> {
        let open = self.comm.gemm_all_reduce_for_norm(
            be,
            x,
            &self.weight,
            n,
            self.output_size,
            self.input_size_per_partition,
            out,
        )?;
        Ok(match open {
            true => RowParallelOutput::Received,
            false => RowParallelOutput::Summed,
        })
    }

    /// This rank's term of [`Self::forward`] without the all-reduce:
    /// `out[n, output_size] = x_r[n, input_size / tp] . W_r^T`. With more than one rank `out`
    /// is a partial sum, and the caller must sum it over the ranks itself, every rank in the
    /// same order of collectives: the decoder layers hand it to
    /// [`crate::layernorm::RMSNorm::reduce_add_forward`], which fuses the all-reduce with the
    /// residual add + RMSNorm that follows. With one rank it is the whole product.
    pub fn forward_partial(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        matmul(
            be,
            x,
            &self.weight,
            n,
            self.output_size,
            self.input_size_per_partition,
            out,
        )
    }

    /// [`Self::forward_partial`] of the MLP's activation: `x_r = silu(gate) * up` of `gate_up`
    /// (`[n, 2 * input_size / tp]`, the output of a two-part
    /// [`MergedColumnParallelLinear`]), through [`Backend::silu_and_mul_gemm`], which may fuse
    /// the activation into the product; `act` (`[n, input_size / tp]`) is its scratch.
    pub fn forward_partial_silu(
        &self,
        be: &B,
        gate_up: &B::Buf<bf16>,
        n: usize,
        act: &mut B::Buf<bf16>,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        be.silu_and_mul_gemm(
            gate_up,
            &self.weight,
            n,
            self.output_size,
            self.input_size_per_partition,
            act,
            out,
        )
    }

    /// Input features this rank multiplies.
    pub fn input_size_per_partition(&self) -> usize {
        self.input_size_per_partition
    }

    /// This rank's weight shard, `[output_size, input_size / tp]`.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::host::HostWeights;
    use crate::testutil::{assert_close, matmul_ref, on_threads, rand_bf16};
    use crate::tp::ThreadComm;
    use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};

    type Comm = Arc<dyn TpComm<CpuBackend>>;

    /// Rank `rank` of a `size`-rank group (for loads, which need no collective).
    fn rank_of(size: usize, rank: usize) -> Comm {
        Arc::new(ThreadComm::group(size).swap_remove(rank))
    }

    fn source(tensors: &[(&str, &[usize], &[bf16])]) -> HostWeights {
        let mut w = HostWeights::default();
        for (name, shape, data) in tensors {
            w.insert(name, shape, data.to_vec());
        }
        w
    }

    /// Rows `rows` of a row-major matrix of width `cols`.
    fn rows(m: &[bf16], cols: usize, rows: std::ops::Range<usize>) -> Vec<bf16> {
        m[rows.start * cols..rows.end * cols].to_vec()
    }

    #[test]
    fn column_parallel_shards_are_row_slices() {
        let be = CpuBackend::new();
        let (out, inp) = (8, 6);
        let w = rand_bf16(out * inp, 1);
        let src = source(&[("w", &[out, inp], &w)]);
        for tp in [1, 2, 4] {
            for r in 0..tp {
                let mut l = ColumnParallelLinear::new(&be, inp, out, &rank_of(tp, r)).unwrap();
                l.load(&be, &src, "w").unwrap();
                let per = out / tp;
                assert_eq!(l.output_size_per_partition(), per);
                assert_eq!(l.weight().as_slice(), rows(&w, inp, r * per..(r + 1) * per));
            }
        }
    }

    #[test]
    fn merged_column_parallel_takes_a_chunk_of_each_part() {
        let be = CpuBackend::new();
        let (inter, hidden) = (8, 5);
        let gate = rand_bf16(inter * hidden, 2);
        let up = rand_bf16(inter * hidden, 3);
        let src = source(&[
            ("gate", &[inter, hidden], &gate),
            ("up", &[inter, hidden], &up),
        ]);
        for tp in [1, 2, 4] {
            for r in 0..tp {
                let mut l =
                    MergedColumnParallelLinear::new(&be, hidden, &[inter, inter], &rank_of(tp, r))
                        .unwrap();
                l.load(&be, &src, &["gate", "up"]).unwrap();
                let c = inter / tp;
                let mut want = rows(&gate, hidden, r * c..(r + 1) * c);
                want.extend(rows(&up, hidden, r * c..(r + 1) * c));
                assert_eq!(l.weight().as_slice(), want, "tp {tp} rank {r}");
            }
        }
        let mut l =
            MergedColumnParallelLinear::new(&be, hidden, &[inter, inter], &rank_of(1, 0)).unwrap();
        assert!(l.load(&be, &src, &["gate"]).is_err());
    }

    #[test]
    fn qkv_parallel_takes_each_ranks_heads() {
        let be = CpuBackend::new();
        let (hidden, hd, nh, nkv) = (5, 3, 4, 2);
        let q = rand_bf16(nh * hd * hidden, 4);
        let k = rand_bf16(nkv * hd * hidden, 5);
        let v = rand_bf16(nkv * hd * hidden, 6);
        let src = source(&[
            ("q", &[nh * hd, hidden], &q),
            ("k", &[nkv * hd, hidden], &k),
            ("v", &[nkv * hd, hidden], &v),
        ]);
        for tp in [1, 2] {
            for r in 0..tp {
                let mut l =
                    QKVParallelLinear::new(&be, hidden, hd, nh, nkv, &rank_of(tp, r)).unwrap();
                l.load(&be, &src, "q", "k", "v").unwrap();
                assert_eq!((l.num_heads(), l.num_kv_heads()), (nh / tp, nkv / tp));
                // By heads: rank r owns query heads [r * nh/tp, (r+1) * nh/tp) and likewise
                // for key/value heads; each head is `hd` consecutive rows.
                let mut want = Vec::new();
                for h in r * nh / tp..(r + 1) * nh / tp {
                    want.extend(rows(&q, hidden, h * hd..(h + 1) * hd));
                }
                for m in [&k, &v] {
                    for h in r * nkv / tp..(r + 1) * nkv / tp {
                        want.extend(rows(m, hidden, h * hd..(h + 1) * hd));
                    }
                }
                assert_eq!(l.weight().as_slice(), want, "tp {tp} rank {r}");
            }
        }
    }

    #[test]
    fn row_parallel_shards_are_column_slices() {
        let be = CpuBackend::new();
        let (out, inp) = (3, 8);
        let w = rand_bf16(out * inp, 7);
        let src = source(&[("w", &[out, inp], &w)]);
        for tp in [1, 2, 4] {
            for r in 0..tp {
                let mut l = RowParallelLinear::new(&be, inp, out, &rank_of(tp, r)).unwrap();
                l.load(&be, &src, "w").unwrap();
                let per = inp / tp;
                let want: Vec<bf16> = (0..out)
                    .flat_map(|i| (0..per).map(move |j| (i, j)))
                    .map(|(i, j)| w[i * inp + r * per + j])
                    .collect();
                assert_eq!(l.weight().as_slice(), want, "tp {tp} rank {r}");
            }
        }
    }

    #[test]
    fn uneven_splits_and_bad_shapes_are_errors() {
        let be = CpuBackend::new();
        let err = ColumnParallelLinear::new(&be, 4, 6, &rank_of(4, 0))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("(6)") && err.contains("size 4"), "{err}");
        assert!(QKVParallelLinear::new(&be, 4, 2, 4, 2, &rank_of(4, 1)).is_err());
        assert!(RowParallelLinear::new(&be, 6, 4, &rank_of(4, 0)).is_err());

        let w = rand_bf16(12, 8);
        let src = source(&[("w", &[3, 4], &w)]);
        let mut l = ReplicatedLinear::new(&be, 3, 4).unwrap(); // expects [4, 3]
        let err = l.load(&be, &src, "w").unwrap_err().to_string();
        assert!(err.contains("`w`"), "{err}");
        let err = l.load(&be, &src, "missing").unwrap_err().to_string();
        assert!(err.contains("`missing`"), "{err}");
    }

    /// The tp = 2 layers, run on two threads, compute what the unsharded layer computes:
    /// column-parallel outputs are column slices of the full output, row-parallel partial
    /// products all-reduce to the full output.
    #[test]
    fn sharded_forward_matches_unsharded() {
        let be = CpuBackend::new();
        let (n, hidden, inter) = (3, 8, 12);
        let x = rand_bf16(n * hidden, 9);
        let gate = rand_bf16(inter * hidden, 10);
        let up = rand_bf16(inter * hidden, 11);
        let down = rand_bf16(hidden * inter, 12);
        let src = source(&[
            ("gate", &[inter, hidden], &gate),
            ("up", &[inter, hidden], &up),
            ("down", &[hidden, inter], &down),
        ]);
        let want_gate = matmul_ref(&x, &gate, n, inter, hidden);
        let want_up = matmul_ref(&x, &up, n, inter, hidden);

        let per_rank = on_threads(2, |c| {
            let comm: Comm = Arc::new(c);
            let mut gu =
                MergedColumnParallelLinear::new(&be, hidden, &[inter, inter], &comm).unwrap();
            gu.load(&be, &src, &["gate", "up"]).unwrap();
            let mut dp = RowParallelLinear::new(&be, inter, hidden, &comm).unwrap();
            dp.load(&be, &src, "down").unwrap();
            let xb = CpuBuf::from_vec(x.clone());
            let mut gu_out = be.zeros::<bf16>(n * inter).unwrap();
            gu.forward(&be, &xb, n, &mut gu_out).unwrap();
            // Feed the down projection this rank's slice of a known activation: the gate
            // output itself (any [n, inter / 2] input will do).
            let half = inter / 2;
            let act: Vec<bf16> = (0..n)
                .flat_map(|i| gu_out.as_slice()[i * inter..i * inter + half].to_vec())
                .collect();
            let mut y = be.zeros::<bf16>(n * hidden).unwrap();
            dp.forward(&be, &CpuBuf::from_vec(act.clone()), n, &mut y)
                .unwrap();
            // Without the all-reduce: this rank's term, which the caller reduces itself.
            let mut part = be.zeros::<bf16>(n * hidden).unwrap();
            dp.forward_partial(&be, &CpuBuf::from_vec(act.clone()), n, &mut part)
                .unwrap();
            let want_part = matmul_ref(&act, dp.weight().as_slice(), n, hidden, half);
            assert_close(part.as_slice(), &want_part, "row-parallel partial product");
            comm.all_reduce_sum(&be, &mut part, n * hidden).unwrap();
            assert_eq!(part.as_slice(), y.as_slice());
            (gu_out.into_vec(), act, y.into_vec())
        });

        let half = inter / 2;
        let mut full_act = vec![bf16::ZERO; n * inter];
        for (r, (gu_out, act, _)) in per_rank.iter().enumerate() {
            for i in 0..n {
                let cols = r * half..(r + 1) * half;
                let want_g: Vec<f64> = want_gate[i * inter..][cols.clone()].to_vec();
                let want_u: Vec<f64> = want_up[i * inter..][cols].to_vec();
                assert_close(&gu_out[i * inter..i * inter + half], &want_g, "gate slice");
                assert_close(
                    &gu_out[i * inter + half..(i + 1) * inter],
                    &want_u,
                    "up slice",
                );
                full_act[i * inter + r * half..i * inter + (r + 1) * half]
                    .copy_from_slice(&act[i * half..(i + 1) * half]);
            }
        }
        let want_y = matmul_ref(&full_act, &down, n, hidden, inter);
        for (_, _, y) in &per_rank {
            // Both ranks hold the all-reduced sum: two bf16 partials rounded, then summed.
            assert_close(y, &want_y, "row-parallel all-reduced output");
        }
        assert_eq!(per_rank[0].2, per_rank[1].2);
    }

    /// `forward_for_norm` leaves this rank's term for few rows, and from the group's threshold
    /// on this rank's term with the sum left open, which the finish turns into the sum's
    /// residual add + RMSNorm (and says which), the silu form likewise; with one rank, the
    /// product.
    #[test]
    fn forward_for_norm_sums_where_the_group_overlaps() {
        let be = CpuBackend::new();
        let (hidden, inter) = (8, 12);
        let down = rand_bf16(hidden * inter, 13);
        let src = source(&[("down", &[hidden, inter], &down)]);
        for n in [2, 5] {
            let per_rank = on_threads(2, |c| {
                let rank = c.rank() as u64;
                let comm: Comm = Arc::new(c.with_gemm_all_reduce_from(4));
                let mut dp = RowParallelLinear::new(&be, inter, hidden, &comm).unwrap();
                dp.load(&be, &src, "down").unwrap();
                let half = inter / 2;
                let gate_up = CpuBuf::from_vec(rand_bf16(n * 2 * half, 20 + rank));
                let mut act = be.zeros::<bf16>(n * half).unwrap();
                be.silu_and_mul(&gate_up, n, half, &mut act).unwrap();
                let mut part = be.zeros::<bf16>(n * hidden).unwrap();
                dp.forward_partial(&be, &act, n, &mut part).unwrap();
                let mut sum = part.clone();
                comm.all_reduce_sum(&be, &mut sum, n * hidden).unwrap();
                let kind = match n >= 4 {
                    true => RowParallelOutput::Received,
                    false => RowParallelOutput::Partial,
                };
                // What the norm makes of the sum: residual + RMSNorm of it.
                let norm_w = CpuBuf::from_vec(rand_bf16(hidden, 15));
                let res0 = rand_bf16(n * hidden, 16);
                let (mut want_x, mut want_r) = (sum.clone(), CpuBuf::from_vec(res0.clone()));
                be.add_rms_norm(&mut want_x, &mut want_r, &norm_w, n, hidden, 1e-6)
                    .unwrap();
                let finish = |y: &mut CpuBuf<bf16>, kind: RowParallelOutput| {
                    let mut r = CpuBuf::from_vec(res0.clone());
                    match kind {
                        RowParallelOutput::Received => comm
                            .finish_all_reduce_add_rms_norm(
                                &be, y, &mut r, &norm_w, n, hidden, 1e-6,
                            )
                            .unwrap(),
                        _ => comm
                            .all_reduce_add_rms_norm(&be, y, &mut r, &norm_w, n, hidden, 1e-6)
                            .unwrap(),
                    }
                    (y.as_slice().to_vec(), r.into_vec())
                };
                let mut y = be.zeros::<bf16>(n * hidden).unwrap();
                assert_eq!(dp.forward_for_norm(&be, &act, n, &mut y).unwrap(), kind);
                assert_eq!(y.as_slice(), part.as_slice(), "n = {n}");
                let (x1, r1) = finish(&mut y, kind);
                assert_eq!(x1, want_x.as_slice(), "n = {n}");
                assert_eq!(r1, want_r.as_slice(), "n = {n}");
                let mut act2 = be.zeros::<bf16>(n * half).unwrap();
                let mut y2 = be.zeros::<bf16>(n * hidden).unwrap();
                let got = dp.forward_silu_for_norm(&be, &gate_up, n, &mut act2, &mut y2);
                assert_eq!(got.unwrap(), kind);
                assert_eq!(y2.as_slice(), part.as_slice(), "silu, n = {n}");
                let (x2, r2) = finish(&mut y2, kind);
                assert_eq!(x2, want_x.as_slice(), "silu, n = {n}");
                assert_eq!(r2, want_r.as_slice(), "silu, n = {n}");
                // Nothing is left open after a finish.
                let mut r = CpuBuf::from_vec(res0.clone());
                let again = comm
                    .finish_all_reduce_add_rms_norm(&be, &mut y2, &mut r, &norm_w, n, hidden, 1e-6);
                assert!(again.is_err(), "n = {n}");
                sum.into_vec()
            });
            assert_eq!(per_rank[0], per_rank[1]);
        }
        let mut dp = RowParallelLinear::new(&be, inter, hidden, &rank_of(1, 0)).unwrap();
        dp.load(&be, &src, "down").unwrap();
        let act = CpuBuf::from_vec(rand_bf16(3 * inter, 14));
        let mut y = be.zeros::<bf16>(3 * hidden).unwrap();
        let kind = dp.forward_for_norm(&be, &act, 3, &mut y).unwrap();
        assert_eq!(kind, RowParallelOutput::Partial);
        let want = matmul_ref(act.as_slice(), &down, 3, hidden, inter);
        assert_close(y.as_slice(), &want, "one rank");
    }
}
