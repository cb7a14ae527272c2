//! Tensor-parallel communication as the layers see it: the rank, the group size, and the two
//! collectives nano-vLLM's layers use (all-reduce after a row-parallel linear or the
//! vocab-parallel embedding; gather of the LM head's vocab slices to rank 0), plus the
//! all-reduce fused with the residual add + RMSNorm that follows a row-parallel linear in every
//! decoder layer ([`TpComm::all_reduce_add_rms_norm`]: by default the two ops in a row; NCCL's
//! group runs both in one kernel where it can), and a row-parallel product summed over the
//! ranks in one call ([`TpComm::gemm_all_reduce`]: by default the product, then the
//! all-reduce; NCCL's group of two sends parts of the rows to the peer while the next part's
//! product runs, for prefill-sized steps).
//!
//! Layers hold an `Arc<dyn TpComm<B>>` and only call a collective when `size() > 1`, so a
//! single-GPU run pays nothing. [`SingleRank`] is the group of one; [`ThreadComm`] is a group
//! of threads of one process on the CPU backend (how the sharded layers and models are tested
//! against their unsharded selves); the multi-process implementation (NCCL) lives with the
//! engine, which owns the worker processes.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use half::bf16;
use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};
use nanovllm_kernels::Backend;
use nanovllm_utils::{Error, Result};

/// A tensor-parallel group as seen by one rank.
pub trait TpComm<B: Backend>: Send + Sync {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// In place, over the first `len` elements of `buf`: every rank ends with the element-wise
    /// sum of all ranks' buffers.
    fn all_reduce_sum(&self, be: &B, buf: &mut B::Buf<bf16>, len: usize) -> Result<()>;
    /// The all-reduce of `x[..n * hidden]` (this rank's partial sums) followed by the residual
    /// add + RMSNorm of [`Backend::add_rms_norm`], in place: every rank ends with
    /// `residual = bf16(sum + residual)` and `x = rms_norm(residual) * weight`, where `sum` is
    /// what [`TpComm::all_reduce_sum`] gives. With one rank, the all-reduce is skipped (as the
    /// layers skip it) and this is `add_rms_norm` alone.
    ///
    /// The default runs the two ops in a row; an implementation may fuse them but must give
    /// the same bits.
    #[allow(clippy::too_many_arguments)]
    fn all_reduce_add_rms_norm(
        &self,
        be: &B,
        x: &mut B::Buf<bf16>,
        residual: &mut B::Buf<bf16>,
        weight: &B::Buf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        if self.size() > 1 {
            let len = n.checked_mul(hidden).ok_or_else(|| {
                Error::Other(format!(
                    "TpComm::all_reduce_add_rms_norm: {n} x {hidden} elements is larger than \
                     memory"
                ))
            })?;
            self.all_reduce_sum(be, x, len)?;
        }
        be.add_rms_norm(x, residual, weight, n, hidden, eps)
    }
    /// Whether [`TpComm::gemm_all_reduce`] of `m` rows of `n` outputs hides part of its
    /// all-reduce behind the product, so that a row-parallel layer does better to call it than
    /// to leave its partial sums to [`TpComm::all_reduce_add_rms_norm`] (prefill-sized steps on
    /// NCCL). The default: never.
    fn overlaps_gemm_all_reduce(&self, m: usize, n: usize) -> bool {
        let _ = (m, n);
        false
    }
    /// A row-parallel product summed over the ranks, in `out`:
    /// `out[m, n] = sum over ranks of x_r[m, k] . w_r[n, k]^T`, each element rounded to bf16
    /// as [`Backend::gemm`] and then [`TpComm::all_reduce_sum`] round it. The default is those
    /// two ops in a row; an implementation may instead split the rows into parts and sum each
    /// part while the next one's product is computed.
    #[allow(clippy::too_many_arguments)]
    fn gemm_all_reduce(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        w: &B::Buf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        be.gemm(x, w, m, n, k, out)?;
        if self.size() > 1 {
            let len = m.checked_mul(n).ok_or_else(|| {
                Error::Other(format!(
                    "TpComm::gemm_all_reduce: {m} x {n} elements is larger than memory"
                ))
            })?;
            self.all_reduce_sum(be, out, len)?;
        }
        Ok(())
    }
    /// [`TpComm::gemm_all_reduce`] for a residual add + RMSNorm that follows: it may stop
    /// short of the sum and leave its last step to [`TpComm::finish_all_reduce_add_rms_norm`]
    /// (answer `true`: `out` holds this rank's product, and the finish on `out` must be the
    /// group's next call), which does it in the norm's kernel. `false`: `out` holds the sum.
    /// The default is [`TpComm::gemm_all_reduce`] (`false`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_all_reduce_for_norm(
        &self,
        be: &B,
        x: &B::Buf<bf16>,
        w: &B::Buf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<bool> {
        self.gemm_all_reduce(be, x, w, m, n, k, out)?;
        Ok(false)
    }
    /// Ends the sum [`TpComm::gemm_all_reduce_for_norm`] left open in `x` (`n` rows of
    /// `hidden`) and runs the residual add + RMSNorm of [`Backend::add_rms_norm`] on it: the
    /// bits of the sum followed by `add_rms_norm`. Every rank ends with all `n` rows of `x`;
    /// an implementation may share the rows out between the ranks (each adding and
    /// normalising its own, then exchanging the results), and then each rank's `residual`
    /// holds only its own rows' sums, the others left as they were. So a model must read the
    /// residual stream after such a call only through the next such call of the same step
    /// (which shares the rows out the same way). The default leaves nothing open, so here it
    /// has nothing to finish: an error.
    #[allow(clippy::too_many_arguments)]
    fn finish_all_reduce_add_rms_norm(
        &self,
        be: &B,
        x: &mut B::Buf<bf16>,
        residual: &mut B::Buf<bf16>,
        weight: &B::Buf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        let _ = (be, x, residual, weight, n, hidden, eps);
        Err(Error::Other(
            "TpComm::finish_all_reduce_add_rms_norm: no sum was left open".into(),
        ))
    }
    /// A second buffer of `len` elements for the activations that row-parallel products write
    /// and the norms after them finish (a model's hidden states), for the steps whose products
    /// overlap their all-reduce ([`TpComm::overlaps_gemm_all_reduce`]): an implementation that
    /// shares those steps' rows out in [`TpComm::finish_all_reduce_add_rms_norm`] allocates it
    /// where the peers can store into it (the rows are shared out only where `x` is such a
    /// buffer). `None` where it has no use for one (the default). A collective: every rank
    /// calls it at the same point.
    fn alloc_shared(&self, be: &B, len: usize) -> Result<Option<B::Buf<bf16>>> {
        let _ = (be, len);
        Ok(None)
    }
    /// Gathers the first `len` elements of every rank's `part` into rank 0's `full`, which is
    /// split into `size()` equal strides of `stride = len(full) / size()` elements: rank `r`'s
    /// elements land at `full[r * stride..r * stride + len]` (`len <= stride`). With a fixed
    /// stride, where each rank's rows land does not depend on how many rows a step has, so the
    /// rank-0 reordering that follows needs no per-step index upload. Other ranks pass any
    /// buffer as `full`; it is left untouched.
    fn gather_rank0(
        &self,
        be: &B,
        part: &B::Buf<bf16>,
        len: usize,
        full: &mut B::Buf<bf16>,
    ) -> Result<()>;
    /// The smallest `value` over all ranks, returned on every rank (how the ranks agree on
    /// one KV-cache size when each measured its own free memory).
    fn all_reduce_min(&self, be: &B, value: u64) -> Result<u64>;
    /// In place over `buf[..size() * count]`: rank `r`'s `count` elements at
    /// `buf[r * count..]` reach every rank (the exchange of each rank's best candidates when
    /// the ranks sample their vocabulary slices: [`Backend::sample_shard`]).
    fn all_gather_u32(&self, be: &B, buf: &mut B::Buf<u32>, count: usize) -> Result<()>;
}

/// The group of one rank: no sharding, every collective a no-op.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl<B: Backend> TpComm<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _be: &B, _buf: &mut B::Buf<bf16>, _len: usize) -> Result<()> {
        Ok(())
    }

    /// With one rank the part is the whole; layers never call this when `size() == 1`
    /// (they read `part` directly), so it does nothing rather than copy.
    fn gather_rank0(
        &self,
        _be: &B,
        _part: &B::Buf<bf16>,
        _len: usize,
        _full: &mut B::Buf<bf16>,
    ) -> Result<()> {
        Ok(())
    }

    fn all_reduce_min(&self, _be: &B, value: u64) -> Result<u64> {
        Ok(value)
    }

    fn all_gather_u32(&self, _be: &B, _buf: &mut B::Buf<u32>, _count: usize) -> Result<()> {
        Ok(())
    }
}

/// How long a [`ThreadComm`] rank waits for the others before giving up.
const THREAD_COMM_TIMEOUT: Duration = Duration::from_secs(60);

/// What the ranks of a [`ThreadComm`] group share.
struct GroupState {
    /// Ranks that reached the current meeting point.
    arrived: usize,
    /// Meeting points passed so far.
    generation: u64,
    /// Each rank's contribution to the collective in progress.
    slots: Vec<Vec<bf16>>,
}

struct Group {
    size: usize,
    state: Mutex<GroupState>,
    cv: Condvar,
}

/// One rank of a tensor-parallel group whose ranks are threads of one process, on the CPU
/// backend. Collectives meet at a barrier; a rank that waits longer than a minute for the
/// others (one of them failed before the collective) gets an [`Error::Worker`] instead of
/// hanging.
///
/// The all-reduce sums in f32 in rank order and rounds once to bf16, so every rank ends with
/// the same bits.
#[derive(Clone)]
pub struct ThreadComm {
    rank: usize,
    group: Arc<Group>,
    /// Rows from which [`TpComm::overlaps_gemm_all_reduce`] answers yes (never by default).
    gemm_all_reduce_from: usize,
    /// The length of the sum [`TpComm::gemm_all_reduce_for_norm`] left open, if any.
    open: Arc<Mutex<Option<usize>>>,
    /// Whether [`TpComm::finish_all_reduce_add_rms_norm`] shares the rows out.
    shared_rows: bool,
}

impl ThreadComm {
    /// The `size` ranks of a new group; hand one to each thread.
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let group = Arc::new(Group {
            size,
            state: Mutex::new(GroupState {
                arrived: 0,
                generation: 0,
                slots: vec![Vec::new(); size],
            }),
            cv: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                group: Arc::clone(&group),
                gemm_all_reduce_from: usize::MAX,
                open: Arc::default(),
                shared_rows: false,
            })
            .collect()
    }

    /// This rank, sharing the rows out in [`TpComm::finish_all_reduce_add_rms_norm`] as NCCL's
    /// group of two does for prefill steps: rank `r` adds and normalises rows
    /// `r * n / size..(r + 1) * n / size`, the ranks exchange the results, and every other
    /// row of `residual` is set to NaN (those rows are another rank's now), so that a model
    /// that reads them anywhere but in the next such call gets NaN logits. Takes effect where
    /// [`Self::with_gemm_all_reduce_from`] leaves the sums open.
    pub fn with_shared_rows(mut self) -> Self {
        self.shared_rows = true;
        self
    }

    /// This rank, answering [`TpComm::overlaps_gemm_all_reduce`] with yes from `rows` rows on,
    /// and leaving [`TpComm::gemm_all_reduce_for_norm`]'s sums open from there (the product
    /// now, the all-reduce and the norm at [`TpComm::finish_all_reduce_add_rms_norm`]).
    /// Threads gain nothing from either, but the layers then take the paths NCCL's group takes
    /// for prefill-sized steps, which this lets the CPU tests cover. Every rank of a group must
    /// be given the same `rows`.
    pub fn with_gemm_all_reduce_from(mut self, rows: usize) -> Self {
        self.gemm_all_reduce_from = rows;
        self
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A rank that panicked while holding the lock left consistent data (slots are only
        // replaced whole), so a poisoned lock is still usable.
        self.group
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until every rank has called `meet` as many times as this one.
    fn meet<'a>(
        &'a self,
        mut st: MutexGuard<'a, GroupState>,
    ) -> Result<MutexGuard<'a, GroupState>> {
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.group.size {
            st.arrived = 0;
            st.generation += 1;
            self.group.cv.notify_all();
            return Ok(st);
        }
        while st.generation == generation {
            let (guard, timeout) = self
                .group
                .cv
                .wait_timeout(st, THREAD_COMM_TIMEOUT)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            st = guard;
            if timeout.timed_out() && st.generation == generation {
                return Err(Error::Worker(format!(
                    "rank {} of {} waited {:?} for the other ranks at a collective",
                    self.rank, self.group.size, THREAD_COMM_TIMEOUT
                )));
            }
        }
        Ok(st)
    }

    /// The end of a finish with the rows shared out ([`Self::with_shared_rows`]), after the
    /// sum of all `n` rows of `x`.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_own_rows(
        &self,
        be: &CpuBackend,
        x: &mut CpuBuf<bf16>,
        residual: &mut CpuBuf<bf16>,
        weight: &CpuBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        let size = self.group.size;
        let rows = |r: usize| r * n / size * hidden..(r + 1) * n / size * hidden;
        let mine = rows(self.rank);
        let len = n * hidden;
        if x.len() < len || residual.len() < len {
            return Err(shape_err(
                "ThreadComm::finish_all_reduce_add_rms_norm",
                "x",
                len,
                x.len().min(residual.len()),
            ));
        }
        let mut xs = be.from_host(&x.as_slice()[mine.clone()])?;
        let mut rs = be.from_host(&residual.as_slice()[mine.clone()])?;
        be.add_rms_norm(
            &mut xs,
            &mut rs,
            weight,
            mine.len() / hidden.max(1),
            hidden,
            eps,
        )?;
        for (i, r) in residual.as_mut_slice()[..len].iter_mut().enumerate() {
            *r = if mine.contains(&i) {
                rs.as_slice()[i - mine.start]
            } else {
                bf16::NAN
            };
        }
        let st = self.exchange(xs.as_slice())?;
        for (r, slot) in st.slots.iter().enumerate() {
            x.as_mut_slice()[rows(r)].copy_from_slice(slot);
        }
        drop(self.meet(st)?);
        Ok(())
    }

    /// Deposits `data` as this rank's contribution and waits for every rank's.
    fn exchange(&self, data: &[bf16]) -> Result<MutexGuard<'_, GroupState>> {
        let mut st = self.lock();
        st.slots[self.rank] = data.to_vec();
        self.meet(st)
    }
}

fn shape_err(op: &'static str, tensor: &'static str, expected: usize, found: usize) -> Error {
    Error::Shape {
        op,
        tensor,
        expected,
        found,
    }
}

impl TpComm<CpuBackend> for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn overlaps_gemm_all_reduce(&self, m: usize, _n: usize) -> bool {
        m >= self.gemm_all_reduce_from
    }

    /// The product alone where [`TpComm::overlaps_gemm_all_reduce`] (the sum waits for the
    /// finish), the default otherwise.
    fn gemm_all_reduce_for_norm(
        &self,
        be: &CpuBackend,
        x: &CpuBuf<bf16>,
        w: &CpuBuf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CpuBuf<bf16>,
    ) -> Result<bool> {
        if self.group.size < 2 || !self.overlaps_gemm_all_reduce(m, n) {
            self.gemm_all_reduce(be, x, w, m, n, k, out)?;
            return Ok(false);
        }
        be.gemm(x, w, m, n, k, out)?;
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = Some(m * n);
        Ok(true)
    }

    fn finish_all_reduce_add_rms_norm(
        &self,
        be: &CpuBackend,
        x: &mut CpuBuf<bf16>,
        residual: &mut CpuBuf<bf16>,
        weight: &CpuBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "ThreadComm::finish_all_reduce_add_rms_norm";
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner()).take();
        match open {
            Some(len) if Some(len) == n.checked_mul(hidden) => {
                self.all_reduce_sum(be, x, len)?;
                if self.shared_rows {
                    self.add_rms_norm_own_rows(be, x, residual, weight, n, hidden, eps)
                } else {
                    be.add_rms_norm(x, residual, weight, n, hidden, eps)
                }
            }
            Some(len) => Err(Error::Other(format!(
                "{OP}: the open sum has {len} elements, not {n} x {hidden}"
            ))),
            None => Err(Error::Other(format!("{OP}: no sum was left open"))),
        }
    }

    /// With the rows shared out, a plain buffer (threads share memory anyway), so that a model
    /// takes the same path as on NCCL's group: its second `hidden`, swapped in and out.
    fn alloc_shared(&self, be: &CpuBackend, len: usize) -> Result<Option<CpuBuf<bf16>>> {
        match self.shared_rows {
            true => be.alloc(len).map(Some),
            false => Ok(None),
        }
    }

    fn all_reduce_sum(&self, _be: &CpuBackend, buf: &mut CpuBuf<bf16>, len: usize) -> Result<()> {
        const OP: &str = "ThreadComm::all_reduce_sum";
        let mine = buf
            .as_slice()
            .get(..len)
            .ok_or_else(|| shape_err(OP, "buf", len, buf.len()))?;
        let st = self.exchange(mine)?;
        if let Some(r) = st.slots.iter().position(|s| s.len() != len) {
            return Err(Error::Worker(format!(
                "{OP}: rank {r} reduced {} elements, rank {} {len}",
                st.slots[r].len(),
                self.rank
            )));
        }
        for (i, out) in buf.as_mut_slice()[..len].iter_mut().enumerate() {
            let sum: f32 = st.slots.iter().map(|s| s[i].to_f32()).sum();
            *out = bf16::from_f32(sum);
        }
        // Nobody may overwrite a slot until every rank has read them all.
        drop(self.meet(st)?);
        Ok(())
    }

    fn gather_rank0(
        &self,
        _be: &CpuBackend,
        part: &CpuBuf<bf16>,
        len: usize,
        full: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        const OP: &str = "ThreadComm::gather_rank0";
        let mine = part
            .as_slice()
            .get(..len)
            .ok_or_else(|| shape_err(OP, "part", len, part.len()))?;
        let st = self.exchange(mine)?;
        let result = if self.rank == 0 {
            let size = self.group.size;
            let stride = full.len() / size;
            if len > stride {
                Err(shape_err(OP, "full", size * len, full.len()))
            } else {
                for (r, slot) in st.slots.iter().enumerate() {
                    let n = slot.len().min(stride);
                    full.as_mut_slice()[r * stride..r * stride + n].copy_from_slice(&slot[..n]);
                }
                Ok(())
            }
        } else {
            Ok(())
        };
        drop(self.meet(st)?);
        result
    }

    fn all_reduce_min(&self, _be: &CpuBackend, value: u64) -> Result<u64> {
        // Four bf16 carry the 64 bits exactly (bit patterns, not numbers).
        let words: Vec<bf16> = (0..4)
            .map(|i| bf16::from_bits((value >> (16 * i)) as u16))
            .collect();
        let st = self.exchange(&words)?;
        let min = st
            .slots
            .iter()
            .map(|s| {
                s.iter().enumerate().fold(0u64, |acc, (i, w)| {
                    acc | (u64::from(w.to_bits()) << (16 * i))
                })
            })
            .min()
            .unwrap_or(value);
        drop(self.meet(st)?);
        Ok(min)
    }

    fn all_gather_u32(&self, _be: &CpuBackend, buf: &mut CpuBuf<u32>, count: usize) -> Result<()> {
        const OP: &str = "ThreadComm::all_gather_u32";
        let size = self.group.size;
        let all = size
            .checked_mul(count)
            .filter(|&n| n <= buf.len())
            .ok_or_else(|| shape_err(OP, "buf", size.saturating_mul(count), buf.len()))?;
        // Two bf16 carry each u32 exactly (bit patterns, not numbers).
        let mine = &buf.as_slice()[self.rank * count..(self.rank + 1) * count];
        let words: Vec<bf16> = mine
            .iter()
            .flat_map(|&v| [bf16::from_bits(v as u16), bf16::from_bits((v >> 16) as u16)])
            .collect();
        let st = self.exchange(&words)?;
        if let Some(r) = st.slots.iter().position(|s| s.len() != 2 * count) {
            return Err(Error::Worker(format!(
                "{OP}: rank {r} sent {} halves, rank {} {}",
                st.slots[r].len(),
                self.rank,
                2 * count
            )));
        }
        for (out, pair) in buf.as_mut_slice()[..all]
            .iter_mut()
            .zip(st.slots.iter().flat_map(|s| s.chunks_exact(2)))
        {
            *out = u32::from(pair[0].to_bits()) | (u32::from(pair[1].to_bits()) << 16);
        }
        drop(self.meet(st)?);
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod nccl {
    use super::*;
    use nanovllm_kernels::cuda::{CudaBackend, CudaBuf, NcclComm};

    /// NCCL is the multi-process group of the CUDA backend: one process (and GPU) per rank.
    impl TpComm<CudaBackend> for NcclComm {
        fn rank(&self) -> usize {
            NcclComm::rank(self)
        }

        fn size(&self) -> usize {
            NcclComm::size(self)
        }

        fn all_reduce_sum(
            &self,
            _be: &CudaBackend,
            buf: &mut CudaBuf<bf16>,
            len: usize,
        ) -> Result<()> {
            NcclComm::all_reduce_sum(self, buf, len)
        }

        /// One kernel (the one-shot all-reduce fused with the norm) where NCCL's group has
        /// the one-shot path and the message fits it; the unfused sequence otherwise.
        fn all_reduce_add_rms_norm(
            &self,
            be: &CudaBackend,
            x: &mut CudaBuf<bf16>,
            residual: &mut CudaBuf<bf16>,
            weight: &CudaBuf<bf16>,
            n: usize,
            hidden: usize,
            eps: f32,
        ) -> Result<()> {
            NcclComm::all_reduce_add_rms_norm(self, be, x, residual, weight, n, hidden, eps)
        }

        fn overlaps_gemm_all_reduce(&self, m: usize, n: usize) -> bool {
            NcclComm::overlaps_gemm_all_reduce(self, m, n)
        }

        /// The parts' all-reduces overlap the next parts' products on a second stream where
        /// [`NcclComm::overlaps_gemm_all_reduce`]; the two ops in a row otherwise.
        fn gemm_all_reduce(
            &self,
            be: &CudaBackend,
            x: &CudaBuf<bf16>,
            w: &CudaBuf<bf16>,
            m: usize,
            n: usize,
            k: usize,
            out: &mut CudaBuf<bf16>,
        ) -> Result<()> {
            NcclComm::gemm_all_reduce(self, be, x, w, m, n, k, out)
        }

        /// Leaves the add of the peer's sums to the norm's kernel where the product overlaps
        /// its copy-engine all-reduce.
        fn gemm_all_reduce_for_norm(
            &self,
            be: &CudaBackend,
            x: &CudaBuf<bf16>,
            w: &CudaBuf<bf16>,
            m: usize,
            n: usize,
            k: usize,
            out: &mut CudaBuf<bf16>,
        ) -> Result<bool> {
            NcclComm::gemm_all_reduce_for_norm(self, be, x, w, m, n, k, out)
        }

        fn finish_all_reduce_add_rms_norm(
            &self,
            be: &CudaBackend,
            x: &mut CudaBuf<bf16>,
            residual: &mut CudaBuf<bf16>,
            weight: &CudaBuf<bf16>,
            n: usize,
            hidden: usize,
            eps: f32,
        ) -> Result<()> {
            NcclComm::finish_all_reduce_add_rms_norm(self, be, x, residual, weight, n, hidden, eps)
        }

        fn alloc_shared(&self, be: &CudaBackend, len: usize) -> Result<Option<CudaBuf<bf16>>> {
            NcclComm::alloc_shared(self, be, len)
        }

        fn gather_rank0(
            &self,
            _be: &CudaBackend,
            part: &CudaBuf<bf16>,
            len: usize,
            full: &mut CudaBuf<bf16>,
        ) -> Result<()> {
            NcclComm::gather_rank0(self, part, len, full)
        }

        fn all_reduce_min(&self, _be: &CudaBackend, value: u64) -> Result<u64> {
            NcclComm::all_reduce_min(self, value)
        }

        fn all_gather_u32(
            &self,
            _be: &CudaBackend,
            buf: &mut CudaBuf<u32>,
            count: usize,
        ) -> Result<()> {
            NcclComm::all_gather_u32(self, buf, count)
        }
    }
}

/// `total / tp_size`, or an error naming `what` when the split is uneven: a model can only be
/// sharded over a group whose size divides its heads, its MLP width and its vocabulary.
pub fn divide(total: usize, tp_size: usize, what: &str) -> Result<usize> {
    if total.checked_rem(tp_size) != Some(0) {
        return Err(nanovllm_utils::Error::EngineConfig {
            option: "tensor_parallel_size",
            msg: format!("{what} ({total}) is not divisible by the tensor-parallel size {tp_size}"),
        });
    }
    Ok(total / tp_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::on_threads;

    #[test]
    fn divide_checks_evenness() {
        assert_eq!(divide(16, 4, "heads").unwrap(), 4);
        let err = divide(6, 4, "num_key_value_heads").unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads (6)"), "{err}");
        assert!(divide(6, 0, "heads").is_err());
    }

    #[test]
    fn thread_comm_all_reduce_sums_every_rank() {
        let be = CpuBackend::new();
        let out = on_threads(3, |c| {
            let r = c.rank() as f32;
            let mut buf =
                CpuBuf::from_vec(vec![bf16::from_f32(r), bf16::from_f32(10.0 * r), bf16::ONE]);
            // Only the first two elements take part.
            c.all_reduce_sum(&be, &mut buf, 2).unwrap();
            // A second collective right after must not see the first one's slots.
            c.all_reduce_sum(&be, &mut buf, 2).unwrap();
            buf.into_vec()
        });
        for v in out {
            let v: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
            assert_eq!(v, vec![9.0, 90.0, 1.0]); // (0+1+2) * 3 ranks, then untouched
        }
    }

    #[test]
    fn thread_comm_min_agrees_on_the_smallest() {
        let be = CpuBackend::new();
        let big = [u64::MAX - 3, 70_000, 1 << 40];
        let out = on_threads(3, |c| c.all_reduce_min(&be, big[c.rank()]).unwrap());
        assert_eq!(out, vec![70_000; 3]);
    }

    #[test]
    fn thread_comm_gathers_at_a_fixed_stride() {
        let be = CpuBackend::new();
        let out = on_threads(2, |c| {
            let r = c.rank() as f32 + 1.0;
            let part = CpuBuf::from_vec(vec![bf16::from_f32(r); 3]);
            let mut full = CpuBuf::from_vec(vec![bf16::ZERO; 8]);
            c.gather_rank0(&be, &part, 2, &mut full).unwrap();
            full.into_vec()
                .iter()
                .map(|x| x.to_f32())
                .collect::<Vec<_>>()
        });
        assert_eq!(out[0], vec![1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0]);
        assert_eq!(out[1], vec![0.0; 8]);
    }

    /// Every rank ends with every rank's words, all 32 bits of each (NaN patterns included).
    #[test]
    fn thread_comm_all_gathers_u32_in_place() {
        let be = CpuBackend::new();
        let out = on_threads(3, |c| {
            let r = c.rank() as u32;
            let mut words = CpuBuf::from_vec(vec![5u32; 7]);
            words.as_mut_slice()[2 * c.rank()..2 * c.rank() + 2]
                .copy_from_slice(&[r, 0xffff_ffc0 - r]);
            c.all_gather_u32(&be, &mut words, 2).unwrap();
            words.into_vec()
        });
        for words in out {
            assert_eq!(
                words,
                vec![0, 0xffff_ffc0, 1, 0xffff_ffbf, 2, 0xffff_ffbe, 5]
            );
        }
        let comms = ThreadComm::group(2);
        let mut short = CpuBuf::from_vec(vec![0u32; 3]);
        assert!(comms[0].all_gather_u32(&be, &mut short, 2).is_err());
    }

    #[test]
    fn thread_comm_rejects_short_buffers() {
        let be = CpuBackend::new();
        let comms = ThreadComm::group(1);
        let mut buf = CpuBuf::from_vec(vec![bf16::ONE; 2]);
        let err = comms[0].all_reduce_sum(&be, &mut buf, 3).unwrap_err();
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
