//! RMSNorm (nano-vLLM's `layers/layernorm.py`): the norm before attention and before the MLP
//! of every decoder layer, the final norm, and (per head) Qwen3's q/k norms.
//!
//! The residual add is fused into the norm ([`RMSNorm::add_forward`]), as in nano-vLLM: the
//! decoder keeps the residual stream in its own buffer and each norm both adds the previous
//! block's output into it and normalises the sum, in one pass. With tensor parallelism that
//! output is first summed over the ranks (it comes out of a row-parallel linear); the norm can
//! take that all-reduce in too ([`RMSNorm::reduce_add_forward`], which NCCL's group runs as
//! one kernel where it can).

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_utils::Result;

use crate::linear::{upload, RowParallelOutput};
use crate::loader::WeightSource;
use crate::tp::TpComm;

/// `y = x / sqrt(mean(x^2) + eps) * weight` over rows of `hidden_size`.
pub struct RMSNorm<B: Backend> {
    hidden_size: usize,
    eps: f32,
    weight: B::Buf<bf16>,
}

impl<B: Backend> RMSNorm<B> {
    /// Allocates the (uninitialised) `[hidden_size]` weight.
    pub fn new(be: &B, hidden_size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            hidden_size,
            eps: eps as f32,
            weight: be.alloc(hidden_size)?,
        })
    }

    /// Loads checkpoint tensor `name`, `[hidden_size]` (replicated on every rank).
    pub fn load(&mut self, be: &B, src: &dyn WeightSource, name: &str) -> Result<()> {
        let data = src.load(name, &[self.hidden_size])?;
        upload(be, name, &data, &mut self.weight)
    }

    /// `out = rms_norm(x)` for `n` rows.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        n: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        be.rms_norm(x, &self.weight, n, self.hidden_size, self.eps, out)
    }

    /// The fused residual form, in place: `residual += x`, then `x = rms_norm(residual)`.
    pub fn add_forward(
        &self,
        be: &B,
        x: &mut B::Buf<bf16>,
        residual: &mut B::Buf<bf16>,
        n: usize,
    ) -> Result<()> {
        be.add_rms_norm(x, residual, &self.weight, n, self.hidden_size, self.eps)
    }

    /// [`Self::add_forward`] of the sum over the ranks of `comm` of a row-parallel layer's
    /// output `x`, in place. `produced` says what the layer left in `x`
    /// (`RowParallelLinear::forward_for_norm` answers it): for
    /// [`RowParallelOutput::Partial`], this rank's partial sums, which are all-reduced, added
    /// to `residual` and normalised as `all_reduce_sum` followed by `add_forward` would (same
    /// bits), through [`TpComm::all_reduce_add_rms_norm`]; for [`RowParallelOutput::Summed`],
    /// the sum already, so this is `add_forward`; for [`RowParallelOutput::Received`], this
    /// rank's term with the rest of the sum under way, which
    /// [`TpComm::finish_all_reduce_add_rms_norm`] ends (same bits again). With one rank it is
    /// `add_forward`.
    pub fn reduce_add_forward(
        &self,
        be: &B,
        comm: &dyn TpComm<B>,
        x: &mut B::Buf<bf16>,
        residual: &mut B::Buf<bf16>,
        n: usize,
        produced: RowParallelOutput,
    ) -> Result<()> {
        match produced {
            RowParallelOutput::Summed => self.add_forward(be, x, residual, n),
            RowParallelOutput::Partial => comm.all_reduce_add_rms_norm(
                be,
                x,
                residual,
                &self.weight,
                n,
                self.hidden_size,
                self.eps,
            ),
            RowParallelOutput::Received => comm.finish_all_reduce_add_rms_norm(
                be,
                x,
                residual,
                &self.weight,
                n,
                self.hidden_size,
                self.eps,
            ),
        }
    }

    /// The `[hidden_size]` weight.
    pub fn weight(&self) -> &B::Buf<bf16> {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Width of the rows it normalises.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::host::HostWeights;
    use crate::testutil::{on_threads, rand_bf16};
    use crate::tp::SingleRank;
    use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};

    fn norm(be: &CpuBackend, hidden: usize) -> RMSNorm<CpuBackend> {
        let mut src = HostWeights::default();
        src.insert("w", &[hidden], rand_bf16(hidden, 1));
        let mut norm = RMSNorm::new(be, hidden, 1e-6).unwrap();
        norm.load(be, &src, "w").unwrap();
        norm
    }

    /// The fused form computes what the all-reduce followed by `add_forward` computes, on
    /// every rank, and is `add_forward` alone with one rank.
    #[test]
    fn reduce_add_forward_is_all_reduce_then_add_forward() {
        let be = CpuBackend::new();
        let (n, hidden) = (3, 16);
        let norm = norm(&be, hidden);
        let residual = rand_bf16(n * hidden, 2);
        let bufs = |x: &[bf16]| {
            (
                CpuBuf::from_vec(x.to_vec()),
                CpuBuf::from_vec(residual.clone()),
            )
        };
        let out = on_threads(2, |c| {
            // Longer than the n rows: only those take part.
            let x = rand_bf16(n * hidden + 5, 10 + c.rank() as u64);
            let (mut x1, mut r1) = bufs(&x);
            norm.reduce_add_forward(&be, &c, &mut x1, &mut r1, n, RowParallelOutput::Partial)
                .unwrap();
            let (mut x2, mut r2) = bufs(&x);
            c.all_reduce_sum(&be, &mut x2, n * hidden).unwrap();
            norm.add_forward(&be, &mut x2, &mut r2, n).unwrap();
            assert_eq!(x1.as_slice(), x2.as_slice());
            assert_eq!(r1.as_slice(), r2.as_slice());
            // An output already summed gets the add + norm alone (a second all-reduce would
            // double it).
            let (mut x3, mut r3) = bufs(&x);
            c.all_reduce_sum(&be, &mut x3, n * hidden).unwrap();
            norm.reduce_add_forward(&be, &c, &mut x3, &mut r3, n, RowParallelOutput::Summed)
                .unwrap();
            assert_eq!(x3.as_slice(), x2.as_slice());
            assert_eq!(r3.as_slice(), r2.as_slice());
            // The rows only: past them each rank keeps its own values.
            (x1.as_slice()[..n * hidden].to_vec(), r1.into_vec())
        });
        assert_eq!(out[0], out[1]);

        let x = rand_bf16(n * hidden, 3);
        let (mut x1, mut r1) = bufs(&x);
        norm.reduce_add_forward(
            &be,
            &SingleRank,
            &mut x1,
            &mut r1,
            n,
            RowParallelOutput::Partial,
        )
        .unwrap();
        let (mut x2, mut r2) = bufs(&x);
        norm.add_forward(&be, &mut x2, &mut r2, n).unwrap();
        assert_eq!(x1.as_slice(), x2.as_slice());
        assert_eq!(r1.as_slice(), r2.as_slice());
    }

    /// Short buffers are shape errors on every rank, not panics.
    #[test]
    fn reduce_add_forward_rejects_short_buffers() {
        let be = CpuBackend::new();
        let (n, hidden) = (2, 8);
        let norm = norm(&be, hidden);
        let errs = on_threads(2, |c| {
            let mut x = CpuBuf::from_vec(rand_bf16(n * hidden - 1, 4));
            let mut r = CpuBuf::from_vec(rand_bf16(n * hidden, 5));
            norm.reduce_add_forward(&be, &c, &mut x, &mut r, n, RowParallelOutput::Partial)
                .unwrap_err()
        });
        for err in errs {
            assert!(matches!(err, nanovllm_utils::Error::Shape { .. }), "{err}");
        }
    }
}
