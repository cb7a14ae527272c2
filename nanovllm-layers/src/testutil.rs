//! Helpers shared by the layer tests: deterministic random tensors, a tensor-parallel group of
//! threads, and a bare [`Context`] for the LM head.

use half::bf16;
use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};

use crate::context::Context;
use crate::tp::ThreadComm;

/// `n` deterministic pseudo-random bf16 values in [-1, 1) (xorshift64*).
pub fn rand_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let x = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
            bf16::from_f32(x as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// Runs `f(comm)` on one thread per rank of a `size`-rank [`ThreadComm`] group; results in
/// rank order.
pub fn on_threads<T: Send>(size: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `x[m, k] . w[n, k]^T` in f64, for reference results.
pub fn matmul_ref(x: &[bf16], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|t| x[i * k + t].to_f64() * w[j * k + t].to_f64())
                .sum();
        }
    }
    out
}

/// Asserts that every element of `got` is within bf16 rounding (plus f32 accumulation) of
/// `want`: `|got - want| <= 2^-7 * |want| + 1e-3`.
pub fn assert_close(got: &[bf16], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - w).abs() <= w.abs() / 128.0 + 1e-3,
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Buffers of a step context that only the LM head reads (rows to gather).
pub struct HeadCtx {
    pub i32s: CpuBuf<i32>,
    pub indices: CpuBuf<i32>,
}

impl HeadCtx {
    pub fn new(indices: &[i32]) -> Self {
        Self {
            i32s: CpuBuf::from_vec(vec![0; 4]),
            indices: CpuBuf::from_vec(indices.to_vec()),
        }
    }

    /// A prefill context over `num_tokens` rows whose logits rows are `indices`.
    pub fn ctx(&self, num_tokens: usize) -> Context<'_, CpuBackend> {
        Context {
            is_prefill: true,
            num_tokens,
            num_seqs: 1,
            positions: &self.i32s,
            slot_mapping: &self.i32s,
            cu_seqlens_q: &self.i32s,
            cu_seqlens_k: &self.i32s,
            max_seqlen_q: num_tokens,
            max_seqlen_k: num_tokens,
            context_lens: &self.i32s,
            max_context_len: 0,
            block_tables: &self.i32s,
            max_blocks_per_seq: 1,
            logits_indices: &self.indices,
            num_logits: self.indices.len(),
        }
    }
}
