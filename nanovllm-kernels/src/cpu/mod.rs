//! The CPU backend: every op of the [`Backend`] trait in plain Rust, bf16 storage and f32
//! accumulation, rounding to bf16 exactly where the trait says `bf16()`.
//!
//! It plays two roles. It is the reference every CUDA kernel is tested against (so each op is
//! written for correctness first, mirroring what a bf16 GPU implementation computes), and it
//! runs the whole engine - model runner, layers, Qwen3, sampler - in CI and on machines without
//! a GPU (so the heavy ops, GEMM and attention, are blocked for cache and parallel over rows,
//! heads and sequences with rayon).
//!
//! This file holds the buffer type, the trait implementation and the shape checks every op
//! runs before touching memory; the arithmetic lives in the submodules:
//! `gemm` (linear layers), `attention` (KV-cache writes, prefill and decode attention),
//! `norm` (RMSNorm, q/k norm + RoPE), `elementwise` (embedding, SiLU-and-mul, row
//! gather), `sample` (the sampler) and `simd` (the inner loops compiled for AVX2+FMA when
//! the CPU has it).

mod attention;
mod elementwise;
mod gemm;
mod norm;
mod sample;
mod simd;

use half::bf16;
use nanovllm_utils::{Error, Result};

use crate::backend::{AttnParams, Backend, Elem, SamplingBufs};

pub use norm::rope_cos_sin_cache;

/// A buffer of the CPU backend: a `Vec<T>` in host memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuBuf<T>(Vec<T>);

impl<T> CpuBuf<T> {
    /// Wraps `v` without copying.
    pub fn from_vec(v: Vec<T>) -> Self {
        CpuBuf(v)
    }

    /// The elements, without copying.
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }

    /// The elements, to read.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// The elements, to write.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.0
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T> From<Vec<T>> for CpuBuf<T> {
    fn from(v: Vec<T>) -> Self {
        CpuBuf(v)
    }
}

/// The CPU backend. The ops run on rayon's global pool (and matrixmultiply's threads for large
/// GEMMs); scratch space is per thread and reused between calls.
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    /// Whether the AVX2+FMA kernels may run (they do only where the CPU has both).
    simd: bool,
}

impl CpuBackend {
    /// The CPU backend, with the AVX2+FMA kernels on CPUs that have them.
    pub fn new() -> Self {
        CpuBackend { simd: true }
    }

    /// The same ops with the hand-written vector kernels switched off (plain loops only;
    /// matrixmultiply's GEMM still picks its own): slower, but it lets the vector kernels be
    /// checked against the plain ones on any machine.
    pub fn plain() -> Self {
        CpuBackend { simd: false }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

// ---- shape checks shared by the ops ----

/// Number of elements of a tensor with dimensions `dims`; an overflow (dimensions no buffer
/// could hold) is reported as a shape error on `tensor`.
pub(crate) fn numel(op: &'static str, tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::Other(format!(
                "op {op}: tensor `{tensor}` with dimensions {dims:?} has more elements than \
                 fit in memory"
            ))
        })
}

/// The first `expected` elements of `buf`, or the shape error naming `op` and `tensor`.
pub(crate) fn prefix<'a, T>(
    op: &'static str,
    tensor: &'static str,
    buf: &'a [T],
    expected: usize,
) -> Result<&'a [T]> {
    buf.get(..expected).ok_or(Error::Shape {
        op,
        tensor,
        expected,
        found: buf.len(),
    })
}

/// The first `expected` elements of `buf`, writable, or the shape error naming `op` and
/// `tensor`.
pub(crate) fn prefix_mut<'a, T>(
    op: &'static str,
    tensor: &'static str,
    buf: &'a mut [T],
    expected: usize,
) -> Result<&'a mut [T]> {
    let found = buf.len();
    buf.get_mut(..expected).ok_or(Error::Shape {
        op,
        tensor,
        expected,
        found,
    })
}

/// The error for an index read from a buffer (`what`, e.g. "slot_mapping[3]") whose value
/// lies outside `0..bound`.
pub(crate) fn index_error(op: &'static str, what: String, value: i64, bound: usize) -> Error {
    Error::Other(format!(
        "op {op}: {what} = {value} is outside the valid range 0..{bound}"
    ))
}

/// Checks the head counts and sizes of an attention call.
pub(crate) fn check_attn(op: &'static str, attn: &AttnParams) -> Result<()> {
    let bad = |msg: String| Err(Error::Other(format!("op {op}: {msg}")));
    if attn.num_heads == 0 || attn.num_kv_heads == 0 || attn.head_dim == 0 {
        return bad(format!(
            "num_heads ({}), num_kv_heads ({}) and head_dim ({}) must all be positive",
            attn.num_heads, attn.num_kv_heads, attn.head_dim
        ));
    }
    if !attn.num_heads.is_multiple_of(attn.num_kv_heads) {
        return bad(format!(
            "num_heads ({}) is not a multiple of num_kv_heads ({})",
            attn.num_heads, attn.num_kv_heads
        ));
    }
    if attn.block_size == 0 {
        return bad("block_size must be positive".to_string());
    }
    numel(
        op,
        "qkv",
        &[attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim],
    )?;
    Ok(())
}

/// An empty vector with room for `len` elements, turning an allocation failure into an error.
fn reserve_vec<T: Elem>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::OutOfMemory(format!(
            "cpu: cannot allocate a buffer of {len} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

/// A vector of `len` default (zero) elements.
fn alloc_vec<T: Elem>(len: usize) -> Result<Vec<T>> {
    let mut v = reserve_vec(len)?;
    v.resize(len, T::default());
    Ok(v)
}

/// `(MemAvailable, MemTotal)` in bytes, from the text of `/proc/meminfo`.
fn parse_meminfo(text: &str) -> Result<(usize, usize)> {
    let field = |name: &str| -> Result<usize> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .ok_or_else(|| Error::Other(format!("/proc/meminfo: no `{name}` line")))?;
        let kib = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Other(format!("/proc/meminfo: cannot read the value of `{line}`"))
            })?;
        Ok(kib.saturating_mul(1024))
    };
    Ok((field("MemAvailable")?, field("MemTotal")?))
}

impl Backend for CpuBackend {
    type Buf<T: Elem> = CpuBuf<T>;

    fn name(&self) -> String {
        if self.simd {
            "cpu".to_string()
        } else {
            "cpu (plain)".to_string()
        }
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<CpuBuf<T>> {
        alloc_vec(len).map(CpuBuf)
    }

    fn zeros<T: Elem>(&self, len: usize) -> Result<CpuBuf<T>> {
        alloc_vec(len).map(CpuBuf)
    }

    fn len<T: Elem>(&self, buf: &CpuBuf<T>) -> usize {
        buf.len()
    }

    fn from_host<T: Elem>(&self, src: &[T]) -> Result<CpuBuf<T>> {
        let mut v = reserve_vec(src.len())?;
        v.extend_from_slice(src);
        Ok(CpuBuf(v))
    }

    fn htod<T: Elem>(&self, src: &[T], dst: &mut CpuBuf<T>) -> Result<()> {
        prefix_mut("htod", "dst", &mut dst.0, src.len())?.copy_from_slice(src);
        Ok(())
    }

    fn dtoh<T: Elem>(&self, src: &CpuBuf<T>, dst: &mut [T]) -> Result<()> {
        dst.copy_from_slice(prefix("dtoh", "src", &src.0, dst.len())?);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        const PATH: &str = "/proc/meminfo";
        let text = std::fs::read_to_string(PATH).map_err(|e| Error::io(PATH, e))?;
        parse_meminfo(&text)
    }

    fn embedding(
        &self,
        ids: &CpuBuf<u32>,
        n: usize,
        weight: &CpuBuf<bf16>,
        vocab_start: usize,
        vocab_rows: usize,
        hidden: usize,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        elementwise::embedding(
            &ids.0,
            n,
            &weight.0,
            vocab_start,
            vocab_rows,
            hidden,
            &mut out.0,
        )
    }

    fn rms_norm(
        &self,
        x: &CpuBuf<bf16>,
        weight: &CpuBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        norm::rms_norm(&x.0, &weight.0, n, hidden, eps, &mut out.0)
    }

    fn add_rms_norm(
        &self,
        x: &mut CpuBuf<bf16>,
        residual: &mut CpuBuf<bf16>,
        weight: &CpuBuf<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        norm::add_rms_norm(&mut x.0, &mut residual.0, &weight.0, n, hidden, eps)
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CpuBuf<bf16>,
        n: usize,
        attn: &AttnParams,
        q_norm: &CpuBuf<bf16>,
        k_norm: &CpuBuf<bf16>,
        eps: f32,
        positions: &CpuBuf<i32>,
        cos_sin: &CpuBuf<f32>,
    ) -> Result<()> {
        norm::qk_norm_rope(
            &mut qkv.0,
            n,
            attn,
            &q_norm.0,
            &k_norm.0,
            eps,
            &positions.0,
            &cos_sin.0,
        )
    }

    fn store_kvcache(
        &self,
        qkv: &CpuBuf<bf16>,
        n: usize,
        attn: &AttnParams,
        slot_mapping: &CpuBuf<i32>,
        k_cache: &mut CpuBuf<bf16>,
        v_cache: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        attention::store_kvcache(
            &qkv.0,
            n,
            attn,
            &slot_mapping.0,
            &mut k_cache.0,
            &mut v_cache.0,
        )
    }

    fn silu_and_mul(
        &self,
        gate_up: &CpuBuf<bf16>,
        n: usize,
        inter: usize,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        elementwise::silu_and_mul(&gate_up.0, n, inter, &mut out.0)
    }

    fn gemm(
        &self,
        x: &CpuBuf<bf16>,
        w: &CpuBuf<bf16>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        gemm::gemm(self.simd, &x.0, &w.0, m, n, k, &mut out.0)
    }

    fn prefill_attention(
        &self,
        qkv: &CpuBuf<bf16>,
        k_cache: &CpuBuf<bf16>,
        v_cache: &CpuBuf<bf16>,
        cu_seqlens_q: &CpuBuf<i32>,
        cu_seqlens_k: &CpuBuf<i32>,
        block_tables: &CpuBuf<i32>,
        num_seqs: usize,
        max_seqlen_q: usize,
        max_seqlen_k: usize,
        attn: &AttnParams,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        attention::prefill_attention(
            self.simd,
            &qkv.0,
            &k_cache.0,
            &v_cache.0,
            &cu_seqlens_q.0,
            &cu_seqlens_k.0,
            &block_tables.0,
            num_seqs,
            max_seqlen_q,
            max_seqlen_k,
            attn,
            &mut out.0,
        )
    }

    fn decode_attention(
        &self,
        qkv: &CpuBuf<bf16>,
        k_cache: &CpuBuf<bf16>,
        v_cache: &CpuBuf<bf16>,
        context_lens: &CpuBuf<i32>,
        block_tables: &CpuBuf<i32>,
        num_seqs: usize,
        max_context_len: usize,
        attn: &AttnParams,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        attention::decode_attention(
            self.simd,
            &qkv.0,
            &k_cache.0,
            &v_cache.0,
            &context_lens.0,
            &block_tables.0,
            num_seqs,
            max_context_len,
            attn,
            &mut out.0,
        )
    }

    fn gather_rows(
        &self,
        x: &CpuBuf<bf16>,
        indices: &CpuBuf<i32>,
        n: usize,
        width: usize,
        out: &mut CpuBuf<bf16>,
    ) -> Result<()> {
        elementwise::gather_rows(&x.0, &indices.0, n, width, &mut out.0)
    }

    fn sample(
        &self,
        logits: &CpuBuf<bf16>,
        rows: usize,
        vocab: usize,
        params: &SamplingBufs<'_, Self>,
        out: &mut CpuBuf<u32>,
    ) -> Result<()> {
        sample::sample(&logits.0, rows, vocab, host_params(params), &mut out.0)
    }

    fn sample_shard(
        &self,
        logits: &CpuBuf<bf16>,
        rows: usize,
        width: usize,
        col0: usize,
        params: &SamplingBufs<'_, Self>,
        parts: &mut CpuBuf<u32>,
        slot: usize,
    ) -> Result<()> {
        sample::sample_shard(
            &logits.0,
            rows,
            width,
            col0,
            host_params(params),
            &mut parts.0,
            slot,
        )
    }

    fn sample_combine(
        &self,
        parts: &CpuBuf<u32>,
        rows: usize,
        ranks: usize,
        out: &mut CpuBuf<u32>,
    ) -> Result<()> {
        sample::sample_combine(&parts.0, rows, ranks, &mut out.0)
    }
}

/// The sampling parameters' host slices.
fn host_params<'a>(params: &'a SamplingBufs<'_, CpuBackend>) -> sample::SampleParams<'a> {
    sample::SampleParams {
        temperatures: &params.temperatures.0,
        top_k: &params.top_k.0,
        top_p: &params.top_p.0,
        seeds: &params.seeds.0,
        steps: &params.steps.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n";
        assert_eq!(parse_meminfo(text).unwrap(), (8192 * 1024, 16384 * 1024));
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn short_buffers_are_shape_errors() {
        let b = CpuBackend::new();
        let mut dst = b.zeros::<f32>(2).unwrap();
        match b.htod(&[1.0, 2.0, 3.0], &mut dst) {
            Err(Error::Shape {
                op: "htod",
                tensor: "dst",
                expected: 3,
                found: 2,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let mut host = [0.0f32; 3];
        assert!(b.dtoh(&dst, &mut host).is_err());
        assert!(numel("op", "t", &[usize::MAX, 2]).is_err());
    }
}
