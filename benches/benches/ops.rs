//! Every op of the `Backend` trait on its own, at the shapes of Qwen3-0.6B serving (hidden
//! 1024, 16 query and 8 KV heads of 128, intermediate 3072, vocab 151,936, KV blocks of 256):
//! the embedding, the two norms, q/k norm + RoPE alone and fused with the KV-cache store (the
//! form the model runs), the KV-cache store, SiLU-and-mul and the LM head's row gather at
//! 16,384 tokens; the GEMM of each linear layer (qkv 1024->4096, o 2048->1024, gate_up
//! 1024->6144, down 3072->1024, lm_head 1024->151,936) at M = 1, 64, 256 and 16,384 (the LM
//! head up to 256); decode attention at batch 256 over contexts of 1,024 and batch 16 over
//! 8,192; causal prefill attention of 16 sequences of 1,024 tokens; and sampling of 256 rows of
//! the full vocabulary at temperature 0.6.
//!
//! Inputs are random and built before timing. Each timed iteration queues one op and waits for
//! the device, so a sample includes the launch and the synchronize round trip (a few
//! microseconds: most of the time of the smallest GEMMs; `nanovllm-kernels`' `op_bench` example
//! times kernels alone, by CUDA-graph replay). Memory-bound ops report bytes per second (the
//! fewest bytes the op must read and write); the GEMMs and prefill attention report FLOPs as
//! criterion's elements (Gelem/s reads GFLOP/s). Where one set of inputs would fit in the GPU's
//! L2 cache, iterations rotate over several (about 100 MB in all), so that each reads device
//! memory as it does within a model step.
//!
//! Runs on the first CUDA GPU. Without one it says so and runs the same benches on the CPU
//! backend with small shapes (64 tokens, the GEMMs at M = 8 with a vocab of 1,024, decode at
//! batch 2 over 64 tokens, prefill of 2 x 64 tokens, sampling of 8 x 1,024), so that the bench
//! itself is exercised everywhere.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use nanovllm_kernels::cpu::{rope_cos_sin_cache, CpuBackend};
use nanovllm_kernels::{bf16, AttnParams, Backend, Elem, SamplingBufs};
use nanovllm_utils::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

// ---- Qwen3-0.6B
const HIDDEN: usize = 1024;
const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const QKV_WIDTH: usize = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
const INTER: usize = 3072;
const BLOCK: usize = 256;
const EPS: f32 = 1e-6;
const ROPE_THETA: f64 = 1e6;
const MAX_POSITION: usize = 40_960;
const TEMPERATURE: f32 = 0.6;

/// The linear layers as (name, N = out features, K = in features); the LM head
/// (N = vocab, K = hidden) is added with the vocab of [`Sizes`].
const LINEARS: [(&str, usize, usize); 4] = [
    ("qkv", QKV_WIDTH, HIDDEN),
    ("o", HIDDEN, HEADS * HEAD_DIM),
    ("gate_up", 2 * INTER, HIDDEN),
    ("down", HIDDEN, INTER),
];

/// What varies between the GPU run and the small CPU run.
struct Sizes {
    /// Rows of the per-token ops (norms, rope, store, SiLU, embedding).
    tokens: usize,
    /// M of the GEMMs.
    gemm_m: &'static [usize],
    /// Largest M of the LM head's GEMM.
    lm_head_max_m: usize,
    vocab: usize,
    /// Decode attention as (batch, context).
    decode: &'static [(usize, usize)],
    /// Prefill attention as (sequences, tokens each).
    prefill: (usize, usize),
    /// Rows of the sampler and of the row gather.
    rows: usize,
    /// Bytes the rotated input sets of one op add up to (0: no rotation).
    rotate_bytes: usize,
    warm_up: Duration,
    measurement: Duration,
    samples: usize,
}

#[cfg(feature = "cuda")]
const GPU_SIZES: Sizes = Sizes {
    tokens: 16_384,
    gemm_m: &[1, 64, 256, 16_384],
    lm_head_max_m: 256,
    vocab: 151_936,
    decode: &[(256, 1024), (16, 8192)],
    prefill: (16, 1024),
    rows: 256,
    // Twice the H100's 50 MB L2.
    rotate_bytes: 100_000_000,
    warm_up: Duration::from_millis(500),
    measurement: Duration::from_secs(2),
    samples: 10,
};

const CPU_SIZES: Sizes = Sizes {
    tokens: 64,
    gemm_m: &[8],
    lm_head_max_m: 8,
    vocab: 1024,
    decode: &[(2, 64)],
    prefill: (2, 64),
    rows: 8,
    rotate_bytes: 0,
    warm_up: Duration::from_millis(200),
    measurement: Duration::from_millis(500),
    samples: 10,
};

/// A standard normal draw (Box-Muller over rand's uniform draws).
fn normal(rng: &mut StdRng) -> f32 {
    let u: f32 = 1.0 - rng.gen::<f32>(); // (0, 1]
    let v: f32 = rng.gen();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `0..n` in random order.
fn permutation(rng: &mut StdRng, n: usize) -> Vec<i32> {
    let mut p: Vec<i32> = (0..n as i32).collect();
    p.shuffle(rng);
    p
}

/// Builds the inputs of the benches on one backend.
struct Setup<'b, B: Backend> {
    be: &'b B,
    rng: StdRng,
    rotate_bytes: usize,
}

impl<B: Backend> Setup<'_, B> {
    /// Values drawn on the host per buffer at most; larger buffers repeat rows of such a draw.
    const HOST_DRAW: usize = 1 << 20;
    /// Row width of that repetition.
    const ROW: usize = 1024;

    fn upload<T: Elem>(&self, host: &[T]) -> B::Buf<T> {
        self.be.from_host(host).expect("copy inputs to the device")
    }

    fn alloc<T: Elem>(&self, len: usize) -> B::Buf<T> {
        self.be.alloc(len).expect("allocate an output")
    }

    /// At least `len` bf16 values drawn from N(0, scale^2). Beyond [`Self::HOST_DRAW`] values
    /// the buffer is rows of one host draw picked at random, gathered on the device.
    fn randn(&mut self, len: usize, scale: f32) -> B::Buf<bf16> {
        let host: Vec<bf16> = (0..len.min(Self::HOST_DRAW))
            .map(|_| bf16::from_f32(scale * normal(&mut self.rng)))
            .collect();
        let src = self.upload(&host);
        if len <= Self::HOST_DRAW {
            return src;
        }
        let rows = len.div_ceil(Self::ROW);
        let picks: Vec<i32> = (0..rows)
            .map(|_| self.rng.gen_range(0..Self::HOST_DRAW / Self::ROW) as i32)
            .collect();
        let picks = self.upload(&picks);
        let mut out = self.alloc(rows * Self::ROW);
        self.be
            .gather_rows(&src, &picks, rows, Self::ROW, &mut out)
            .expect("replicate random rows");
        self.be.synchronize().expect("synchronize");
        out
    }

    /// How many input sets of `bytes` each an op rotates over.
    fn sets(&self, bytes: usize) -> usize {
        if self.rotate_bytes == 0 {
            1
        } else {
            self.rotate_bytes.div_ceil(bytes).clamp(1, 16)
        }
    }

    fn randn_sets(&mut self, sets: usize, len: usize, scale: f32) -> Vec<B::Buf<bf16>> {
        (0..sets).map(|_| self.randn(len, scale)).collect()
    }

    fn alloc_sets<T: Elem>(&self, sets: usize, len: usize) -> Vec<B::Buf<T>> {
        (0..sets).map(|_| self.alloc(len)).collect()
    }

    /// `n` positions below [`MAX_POSITION`] and the rotary table they index.
    fn rope(&mut self, n: usize) -> (B::Buf<i32>, B::Buf<f32>) {
        let pos: Vec<i32> = (0..n)
            .map(|_| self.rng.gen_range(0..MAX_POSITION) as i32)
            .collect();
        let table = rope_cos_sin_cache(HEAD_DIM, MAX_POSITION, ROPE_THETA).expect("rope table");
        (self.upload(&pos), self.upload(&table))
    }
}

fn attn_params(max_blocks_per_seq: usize) -> AttnParams {
    AttnParams {
        num_heads: HEADS,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        block_size: BLOCK,
        max_blocks_per_seq,
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
    }
}

/// Benches `op(i)` (i: the iteration, for rotating inputs), each iteration waiting for the
/// device.
fn timed<B: Backend>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    be: &B,
    id: &str,
    throughput: Throughput,
    mut op: impl FnMut(usize) -> Result<()>,
) {
    group.throughput(throughput);
    group.bench_function(id, |b| {
        let mut i = 0usize;
        b.iter(|| {
            op(i).unwrap_or_else(|e| panic!("{id}: {e}"));
            be.synchronize()
                .unwrap_or_else(|e| panic!("{id}: synchronize: {e}"));
            i = i.wrapping_add(1);
        })
    });
}

fn bytes(n: usize) -> Throughput {
    Throughput::Bytes(n as u64)
}

fn flops(n: usize) -> Throughput {
    Throughput::Elements(n as u64)
}

/// rms_norm, add_rms_norm, silu_and_mul, embedding and gather_rows.
fn row_ops<B: Backend>(g: &mut BenchmarkGroup<'_, WallTime>, s: &mut Setup<'_, B>, sz: &Sizes) {
    let be = s.be;
    let n = sz.tokens;
    let w = s.randn(HIDDEN, 1.0);
    {
        let moved = 2 * n * HIDDEN * 2;
        let sets = s.sets(moved);
        let xs = s.randn_sets(sets, n * HIDDEN, 1.0);
        let mut outs = s.alloc_sets::<bf16>(sets, n * HIDDEN);
        timed(
            g,
            be,
            &format!("rms_norm/{n}x{HIDDEN}"),
            bytes(moved),
            |i| be.rms_norm(&xs[i % sets], &w, n, HIDDEN, EPS, &mut outs[i % sets]),
        );
    }
    {
        // x and the residual, each read and written.
        let moved = 4 * n * HIDDEN * 2;
        let sets = s.sets(moved);
        let mut xs = s.randn_sets(sets, n * HIDDEN, 1.0);
        let mut res = s.randn_sets(sets, n * HIDDEN, 1.0);
        timed(
            g,
            be,
            &format!("add_rms_norm/{n}x{HIDDEN}"),
            bytes(moved),
            |i| be.add_rms_norm(&mut xs[i % sets], &mut res[i % sets], &w, n, HIDDEN, EPS),
        );
    }
    {
        let moved = 3 * n * INTER * 2;
        let sets = s.sets(moved);
        let gate_up = s.randn_sets(sets, n * 2 * INTER, 2.0);
        let mut outs = s.alloc_sets::<bf16>(sets, n * INTER);
        timed(
            g,
            be,
            &format!("silu_and_mul/{n}x{INTER}"),
            bytes(moved),
            |i| be.silu_and_mul(&gate_up[i % sets], n, INTER, &mut outs[i % sets]),
        );
    }
    {
        let vocab = sz.vocab;
        let table = s.randn(vocab * HIDDEN, 1.0);
        // ids read, one table row read and one output row written per token.
        let moved = 4 * n + 2 * n * HIDDEN * 2;
        let sets = s.sets(moved);
        let ids: Vec<_> = (0..sets)
            .map(|_| {
                let ids: Vec<u32> = (0..n).map(|_| s.rng.gen_range(0..vocab) as u32).collect();
                s.upload(&ids)
            })
            .collect();
        let mut outs = s.alloc_sets::<bf16>(sets, n * HIDDEN);
        timed(
            g,
            be,
            &format!("embedding/{n}x{HIDDEN}"),
            bytes(moved),
            |i| {
                be.embedding(
                    &ids[i % sets],
                    n,
                    &table,
                    0,
                    vocab,
                    HIDDEN,
                    &mut outs[i % sets],
                )
            },
        );
    }
    {
        // The LM head's gather: one row per sequence out of the step's tokens.
        let rows = sz.rows.min(n);
        let x = s.randn(n * HIDDEN, 1.0);
        let moved = 4 * rows + 2 * rows * HIDDEN * 2;
        let sets = s.sets(moved);
        let picks: Vec<_> = (0..sets)
            .map(|_| {
                let p: Vec<i32> = (0..rows).map(|_| s.rng.gen_range(0..n) as i32).collect();
                s.upload(&p)
            })
            .collect();
        let mut outs = s.alloc_sets::<bf16>(sets, rows * HIDDEN);
        let id = format!("gather_rows/{rows}of{n}x{HIDDEN}");
        timed(g, be, &id, bytes(moved), |i| {
            be.gather_rows(&x, &picks[i % sets], rows, HIDDEN, &mut outs[i % sets])
        });
    }
}

/// qk_norm_rope, store_kvcache and the fused qk_norm_rope_store the model runs.
fn rope_store_ops<B: Backend>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    s: &mut Setup<'_, B>,
    sz: &Sizes,
) {
    let be = s.be;
    let n = sz.tokens;
    let a = attn_params(1);
    let (pos, cos_sin) = s.rope(n);
    let (qn, kn) = (s.randn(HEAD_DIM, 1.0), s.randn(HEAD_DIM, 1.0));
    // The cache has twice the tokens' slots; the tokens go to a random half of them.
    let slots = (2 * n).next_multiple_of(BLOCK);
    let slot_mapping = permutation(&mut s.rng, slots);
    let slot_mapping = s.upload(&slot_mapping[..n]);
    let mut kc = s.randn(slots * KV_HEADS * HEAD_DIM, 1.0);
    let mut vc = s.randn(slots * KV_HEADS * HEAD_DIM, 1.0);

    // q and k heads read and written, one f32 cos/sin row per token.
    let rope_bytes = n * (HEADS + KV_HEADS) * HEAD_DIM * 2 * 2 + n * HEAD_DIM * 4;
    // k and v heads read, then written to the cache.
    let store_bytes = n * 2 * KV_HEADS * HEAD_DIM * 2 * 2;
    // q, k, v read once; q and k written back; k and v written to the cache; cos/sin rows.
    let fused_bytes = n * (QKV_WIDTH + (HEADS + KV_HEADS) * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM) * 2
        + n * HEAD_DIM * 4;
    let sets = s.sets(rope_bytes.min(store_bytes));
    let mut qkv = s.randn_sets(sets, n * QKV_WIDTH, 1.0);

    let shape = format!("{n}tok_{HEADS}x{KV_HEADS}heads_d{HEAD_DIM}");
    timed(
        g,
        be,
        &format!("qk_norm_rope/{shape}"),
        bytes(rope_bytes),
        |i| be.qk_norm_rope(&mut qkv[i % sets], n, &a, &qn, &kn, EPS, &pos, &cos_sin),
    );
    timed(
        g,
        be,
        &format!("store_kvcache/{shape}"),
        bytes(store_bytes),
        |i| be.store_kvcache(&qkv[i % sets], n, &a, &slot_mapping, &mut kc, &mut vc),
    );
    let id = format!("qk_norm_rope_store/{shape}");
    timed(g, be, &id, bytes(fused_bytes), |i| {
        be.qk_norm_rope_store(
            &mut qkv[i % sets],
            n,
            &a,
            &qn,
            &kn,
            EPS,
            &pos,
            &cos_sin,
            &slot_mapping,
            &mut kc,
            &mut vc,
        )
    });
}

/// The GEMM of every linear layer at each M, weights rotated so that each call reads its
/// weight from device memory.
fn gemm_ops<B: Backend>(g: &mut BenchmarkGroup<'_, WallTime>, s: &mut Setup<'_, B>, sz: &Sizes) {
    let be = s.be;
    let layers = LINEARS
        .iter()
        .map(|&(name, n, k)| (name, n, k, usize::MAX))
        .chain([("lm_head", sz.vocab, HIDDEN, sz.lm_head_max_m)]);
    for (name, n, k, max_m) in layers {
        let ms: Vec<usize> = sz.gemm_m.iter().copied().filter(|&m| m <= max_m).collect();
        let Some(&top_m) = ms.iter().max() else {
            continue;
        };
        let sets = s.sets(n * k * 2);
        let ws = s.randn_sets(sets, n * k, 1.0 / (k as f32).sqrt());
        let x = s.randn(top_m * k, 1.0);
        let mut out = s.alloc::<bf16>(top_m * n);
        for m in ms {
            let id = format!("gemm/{name}_{k}to{n}/M{m}");
            timed(g, be, &id, flops(2 * m * n * k), |i| {
                be.gemm(&x, &ws[i % sets], m, n, k, &mut out)
            });
        }
    }
}

/// Paged decode attention and causal varlen prefill attention over random caches reached
/// through shuffled block tables.
fn attention_ops<B: Backend>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    s: &mut Setup<'_, B>,
    sz: &Sizes,
) {
    let be = s.be;
    let slot_width = KV_HEADS * HEAD_DIM;
    for &(batch, ctx) in sz.decode {
        let per_seq = ctx.div_ceil(BLOCK);
        let blocks = batch * per_seq;
        let a = attn_params(per_seq);
        let kc = s.randn(blocks * BLOCK * slot_width, 1.0);
        let vc = s.randn(blocks * BLOCK * slot_width, 1.0);
        let tables = permutation(&mut s.rng, blocks);
        let tables = s.upload(&tables);
        let lens = s.upload(&vec![ctx as i32; batch]);
        let qkv = s.randn(batch * QKV_WIDTH, 1.0);
        let mut out = s.alloc::<bf16>(batch * HEADS * HEAD_DIM);
        // Every sequence's keys and values.
        let moved = batch * ctx * slot_width * 2 * 2;
        let id = format!("decode_attention/batch{batch}/ctx{ctx}");
        timed(g, be, &id, bytes(moved), |_| {
            be.decode_attention(&qkv, &kc, &vc, &lens, &tables, batch, ctx, &a, &mut out)
        });
    }
    {
        let (seqs, len) = sz.prefill;
        let per_seq = len.div_ceil(BLOCK);
        let blocks = seqs * per_seq;
        let a = attn_params(per_seq);
        let kc = s.randn(blocks * BLOCK * slot_width, 1.0);
        let vc = s.randn(blocks * BLOCK * slot_width, 1.0);
        let tables = permutation(&mut s.rng, blocks);
        let tables = s.upload(&tables);
        let cu: Vec<i32> = (0..=seqs).map(|i| (i * len) as i32).collect();
        let cu = s.upload(&cu);
        let qkv = s.randn(seqs * len * QKV_WIDTH, 1.0);
        let mut out = s.alloc::<bf16>(seqs * len * HEADS * HEAD_DIM);
        // Causal: half of each len x len score matrix, 2 FLOPs per multiply-add in QK^T and PV.
        let work = seqs * HEADS * (len * (len + 1) / 2) * HEAD_DIM * 4;
        let id = format!("prefill_attention/{seqs}x{len}/causal");
        timed(g, be, &id, flops(work), |_| {
            be.prefill_attention(
                &qkv, &kc, &vc, &cu, &cu, &tables, seqs, len, len, &a, &mut out,
            )
        });
    }
}

/// The sampler at temperature 0.6, no top-k or top-p cut.
fn sample_op<B: Backend>(g: &mut BenchmarkGroup<'_, WallTime>, s: &mut Setup<'_, B>, sz: &Sizes) {
    let be = s.be;
    let (rows, vocab) = (sz.rows, sz.vocab);
    let moved = rows * vocab * 2;
    let sets = s.sets(moved);
    let logits = s.randn_sets(sets, rows * vocab, 2.0);
    let temperatures = s.upload(&vec![TEMPERATURE; rows]);
    let top_k = s.upload(&vec![0i32; rows]);
    let top_p = s.upload(&vec![1.0f32; rows]);
    let seeds: Vec<u64> = (0..rows).map(|_| s.rng.gen::<u64>()).collect();
    let seeds = s.upload(&seeds);
    let steps: Vec<u32> = (0..rows).map(|_| s.rng.gen_range(0..1000) as u32).collect();
    let steps = s.upload(&steps);
    let params = SamplingBufs {
        temperatures: &temperatures,
        top_k: &top_k,
        top_p: &top_p,
        seeds: &seeds,
        steps: &steps,
    };
    let mut out = s.alloc::<u32>(rows);
    let id = format!("sample/{rows}x{vocab}/T{TEMPERATURE}");
    timed(g, be, &id, bytes(moved), |i| {
        be.sample(&logits[i % sets], rows, vocab, &params, &mut out)
    });
}

fn bench_on<B: Backend>(c: &mut Criterion, be: B, sz: &Sizes) {
    let mut group = c.benchmark_group(format!("ops/{}", be.name()));
    group
        .warm_up_time(sz.warm_up)
        .measurement_time(sz.measurement)
        .sample_size(sz.samples);
    let mut s = Setup {
        be: &be,
        rng: StdRng::seed_from_u64(0x0B5E_55ED),
        rotate_bytes: sz.rotate_bytes,
    };
    row_ops(&mut group, &mut s, sz);
    rope_store_ops(&mut group, &mut s, sz);
    gemm_ops(&mut group, &mut s, sz);
    attention_ops(&mut group, &mut s, sz);
    sample_op(&mut group, &mut s, sz);
    group.finish();
}

fn ops(c: &mut Criterion) {
    #[cfg(feature = "cuda")]
    match nanovllm_kernels::cuda::CudaBackend::new(0) {
        Ok(be) => return bench_on(c, be, &GPU_SIZES),
        Err(e) => eprintln!("ops: no GPU ({e}); running the small CPU version instead"),
    }
    bench_on(c, CpuBackend::new(), &CPU_SIZES);
}

criterion_group!(benches, ops);
criterion_main!(benches);
