//! The CPU backend's tensor-parallel group across processes: collectives through the
//! shared-memory region's per-rank slots, met at a barrier on a futex.
//!
//! Each collective: every rank copies its contribution into its slot, all meet, each rank
//! reads what it needs (the all-reduce sums in f32 in rank order and rounds once, so every rank
//! gets the same bits, as [`nanovllm_layers::tp::ThreadComm`] does), all meet again so that no
//! slot is overwritten while another rank still reads it. A rank whose peer died gets an error
//! from the liveness check instead of waiting forever.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use half::bf16;
use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};
use nanovllm_layers::tp::TpComm;
use nanovllm_utils::{Error, Result};

use crate::shm::{futex_wake, reached, wait_until, Liveness, ShmRegion};

/// One rank of a group of processes that share a [`ShmRegion`].
pub struct ShmComm {
    region: Arc<ShmRegion>,
    rank: usize,
    size: usize,
    /// Barriers this rank has passed.
    rounds: AtomicU32,
    alive: Option<Liveness>,
}

impl ShmComm {
    /// This process's rank of the group living in `region`; `alive` is asked, while waiting,
    /// whether the other processes still run.
    pub fn new(region: Arc<ShmRegion>, rank: usize, alive: Option<Liveness>) -> Result<Self> {
        let size = region.size();
        if rank >= size {
            return Err(Error::Worker(format!(
                "rank {rank} outside a group of {size}"
            )));
        }
        Ok(ShmComm {
            region,
            rank,
            size,
            rounds: AtomicU32::new(0),
            alive,
        })
    }

    /// Waits until every rank reached as many barriers as this one.
    fn barrier(&self) -> Result<()> {
        let round = self.rounds.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let target = round.wrapping_mul(self.size as u32);
        let arrive = &self.region.header().arrive;
        arrive.fetch_add(1, Ordering::AcqRel);
        futex_wake(arrive);
        wait_until(arrive, |v| reached(v, target), self.alive.as_ref())
    }

    /// Publishes `data` in this rank's slot and waits for every rank's.
    fn exchange(&self, data: &[u8]) -> Result<()> {
        self.region.write_slot(self.rank, data)?;
        self.barrier()
    }

    fn read_slot(&self, rank: usize, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.region.read_slot(rank, &mut out)?;
        Ok(out)
    }
}

fn prefix<'a>(op: &'static str, buf: &'a [bf16], len: usize) -> Result<&'a [bf16]> {
    buf.get(..len).ok_or(Error::Shape {
        op,
        tensor: "buf",
        expected: len,
        found: buf.len(),
    })
}

impl TpComm<CpuBackend> for ShmComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, _be: &CpuBackend, buf: &mut CpuBuf<bf16>, len: usize) -> Result<()> {
        let mine = prefix("ShmComm::all_reduce_sum", buf.as_slice(), len)?;
        self.exchange(bytemuck::cast_slice(mine))?;
        let mut sum = vec![0f32; len];
        let mut part = vec![bf16::ZERO; len];
        for r in 0..self.size {
            self.region
                .read_slot(r, bytemuck::cast_slice_mut(&mut part))?;
            for (s, x) in sum.iter_mut().zip(&part) {
                *s += x.to_f32();
            }
        }
        for (out, s) in buf.as_mut_slice()[..len].iter_mut().zip(sum) {
            *out = bf16::from_f32(s);
        }
        self.barrier()
    }

    fn gather_rank0(
        &self,
        _be: &CpuBackend,
        part: &CpuBuf<bf16>,
        len: usize,
        full: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        let mine = prefix("ShmComm::gather_rank0", part.as_slice(), len)?;
        self.exchange(bytemuck::cast_slice(mine))?;
        let result = if self.rank == 0 {
            let stride = full.len() / self.size;
            if len > stride {
                Err(Error::Shape {
                    op: "ShmComm::gather_rank0",
                    tensor: "full",
                    expected: len * self.size,
                    found: full.len(),
                })
            } else {
                (0..self.size).try_for_each(|r| {
                    let dst = &mut full.as_mut_slice()[r * stride..r * stride + len];
                    self.region.read_slot(r, bytemuck::cast_slice_mut(dst))
                })
            }
        } else {
            Ok(())
        };
        self.barrier()?;
        result
    }

    fn all_reduce_min(&self, _be: &CpuBackend, value: u64) -> Result<u64> {
        self.exchange(&value.to_le_bytes())?;
        let mut min = value;
        for r in 0..self.size {
            let bytes = self.read_slot(r, 8)?;
            let v = u64::from_le_bytes(bytes.try_into().unwrap_or([0xff; 8]));
            min = min.min(v);
        }
        self.barrier()?;
        Ok(min)
    }

    fn all_gather_u32(&self, _be: &CpuBackend, buf: &mut CpuBuf<u32>, count: usize) -> Result<()> {
        const OP: &str = "ShmComm::all_gather_u32";
        let all = self
            .size
            .checked_mul(count)
            .filter(|&n| n <= buf.len())
            .ok_or(Error::Shape {
                op: OP,
                tensor: "buf",
                expected: self.size.saturating_mul(count),
                found: buf.len(),
            })?;
        let mine = &buf.as_slice()[self.rank * count..(self.rank + 1) * count];
        self.exchange(bytemuck::cast_slice(mine))?;
        let out = &mut buf.as_mut_slice()[..all];
        let result = (0..self.size).try_for_each(|r| {
            let dst = &mut out[r * count..(r + 1) * count];
            self.region.read_slot(r, bytemuck::cast_slice_mut(dst))
        });
        self.barrier()?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on `size` threads, each with its own mapping of one region (as processes
    /// would have).
    fn on_ranks<T: Send>(size: usize, f: impl Fn(ShmComm) -> T + Sync) -> Vec<T> {
        let owner = ShmRegion::create(size, 64, 4096).unwrap();
        let path = owner.path().to_path_buf();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let region = Arc::new(ShmRegion::open(&path).unwrap());
                    let f = &f;
                    s.spawn(move || f(ShmComm::new(region, rank, None).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_reduce_sums_and_gather_lands_at_strides() {
        let be = CpuBackend::new();
        let out = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let mut buf =
                CpuBuf::from_vec(vec![bf16::from_f32(r), bf16::from_f32(r * 10.0), bf16::ONE]);
            for _ in 0..50 {
                // Repeated collectives must never read a slot from the round before.
                let mut b = CpuBuf::from_vec(buf.as_slice().to_vec());
                c.all_reduce_sum(&be, &mut b, 2).unwrap();
                assert_eq!(b.as_slice()[0].to_f32(), 3.0);
            }
            c.all_reduce_sum(&be, &mut buf, 2).unwrap();
            let part = CpuBuf::from_vec(vec![bf16::from_f32(r + 1.0); 2]);
            let mut full = CpuBuf::from_vec(vec![bf16::ZERO; 9]);
            c.gather_rank0(&be, &part, 2, &mut full).unwrap();
            let min = c.all_reduce_min(&be, 100 - c.rank() as u64).unwrap();
            // Each rank's two words (one with all 32 bits set) at its place, the rest junk.
            let mut words = CpuBuf::from_vec(vec![7u32; 7]);
            let r = c.rank() as u32;
            words.as_mut_slice()[2 * c.rank()..2 * c.rank() + 2]
                .copy_from_slice(&[r, u32::MAX - r]);
            c.all_gather_u32(&be, &mut words, 2).unwrap();
            (buf.into_vec(), full.into_vec(), min, words.into_vec())
        });
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        for (buf, _, min, words) in &out {
            assert_eq!(f(buf), vec![3.0, 30.0, 1.0]);
            assert_eq!(*min, 98);
            let m = u32::MAX;
            assert_eq!(words, &vec![0, m, 1, m - 1, 2, m - 2, 7]);
        }
        assert_eq!(
            f(&out[0].1),
            vec![1.0, 1.0, 0.0, 2.0, 2.0, 0.0, 3.0, 3.0, 0.0]
        );
        assert_eq!(f(&out[1].1), vec![0.0; 9]);
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let be = CpuBackend::new();
        let region = Arc::new(ShmRegion::create(2, 64, 64).unwrap());
        let dead: Liveness = Arc::new(|| Err(Error::Worker("rank 1 exited".into())));
        let c = ShmComm::new(region, 0, Some(dead)).unwrap();
        let mut buf = CpuBuf::from_vec(vec![bf16::ONE; 4]);
        let err = c.all_reduce_sum(&be, &mut buf, 4).unwrap_err();
        assert!(err.to_string().contains("rank 1 exited"), "{err}");
        let err = c.all_reduce_sum(&be, &mut buf, 400).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }
}
