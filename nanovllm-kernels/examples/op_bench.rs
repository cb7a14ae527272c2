//! op_bench: times every op of the CUDA backend at the shapes of Qwen3-0.6B serving and puts
//! each number next to the ceiling that bounds it. Run on a GPU machine
//! (`scripts/gpu/ops.sh`).
//!
//! First the two ceilings are measured in the same run: device copy bandwidth (a 1 GiB
//! device-to-device copy, bytes read plus written) and the bf16 GEMM rate (cuBLASLt at
//! 8192^3). Then each op is timed: warm-up calls, then `reps` calls captured into one CUDA
//! graph (so launch gaps do not count), the graph replayed 10 times between CUDA events, and
//! the median replay divided by `reps`. Memory-bound ops rotate over enough input sets to
//! exceed the 50 MB L2. Inputs are random (never zeros).
//!
//! Each row: op, shape, time per call, the achieved rate in the unit of the op's floor
//! (GB/s of the fewest bytes the op must move, or TFLOP/s), that ceiling, and the ratio of
//! the floor `max(bytes / copy bandwidth, flops / GEMM rate)` to the measured time.
//!
//! `OP_BENCH_FILTER=<s>` times only the rows whose "op shape" contains `s` and skips the
//! ceilings (for profiling one kernel under ncu) unless `OP_BENCH_CEILINGS` is set.
//!
//! GEMMs (Qwen3-0.6B and Qwen3-8B linear layers, decode and prefill M) are timed under each
//! path of the CUDA backend's `GemmPolicy`: cuBLASLt with the heuristic's algorithm, cuBLASLt
//! tuned with a cold L2, and the skinny kernel (M <= 32), with the weights rotated over more
//! than twice the L2, as the model reads them (each weight once per step). A table of the three
//! next to the floor ends the output, after the start-up cost of planning and tuning every
//! decode batch bucket of Qwen3-0.6B under the default policy.

use std::time::Instant;

use nanovllm_kernels::cuda::{CudaBackend, CudaBuf, GemmPolicy, GemmTuning, SKINNY_LIMIT};
use nanovllm_kernels::{bf16, AttnParams, Backend, SamplingBufs};
use nanovllm_utils::{Error, Result};

/// Bytes the rotated inputs of a memory-bound op should exceed (twice the H100's L2).
const ROTATE_BYTES: f64 = 100e6;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.f32().max(1e-7);
        let u2 = self.f32();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

struct Row {
    op: String,
    shape: String,
    us: f64,
    achieved: String,
    ceiling: String,
    ratio: f64,
}

struct Bench<'g> {
    gpu: &'g CudaBackend,
    rng: Rng,
    copy_bw: f64,
    gemm_rate: f64,
    rows: Vec<Row>,
    filter: String,
    /// The graph's call count is rounded up to a multiple of this: the number of rotated
    /// input sets, so that replay after replay every set is reused only after all the others
    /// (the GEMM rows rotate their weights; 1 elsewhere).
    period: usize,
}

impl Bench<'_> {
    /// Seconds between two events around `f`.
    fn events<F: FnMut() -> Result<()>>(&self, mut f: F) -> Result<f64> {
        self.gpu.time(&mut f)
    }

    /// Median seconds per call of `f(i)` (i = the call's rotation index).
    fn measure(&self, f: &mut dyn FnMut(usize) -> Result<()>) -> Result<(f64, &'static str)> {
        for i in 0..3 {
            f(i)?;
        }
        self.gpu.synchronize()?;
        let one = self.events(|| f(0))?;
        let reps = ((2e-3 / one.max(1e-7)).ceil() as usize).clamp(1, 200);
        let reps = reps.div_ceil(self.period.max(1)) * self.period.max(1);
        let graph = self.gpu.capture(|| (0..reps).try_for_each(&mut *f));
        let mut times = Vec::new();
        let how = match graph {
            Ok(g) => {
                g.replay()?;
                self.gpu.synchronize()?;
                for _ in 0..10 {
                    times.push(self.events(|| g.replay())? / reps as f64);
                }
                "graph"
            }
            Err(e) => {
                println!("  (graph capture failed: {e}; timing eagerly)");
                for _ in 0..10 {
                    times.push(self.events(|| (0..reps).try_for_each(&mut *f))? / reps as f64);
                }
                "eager"
            }
        };
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], how))
    }

    /// Times `f` and records a row; `bytes` and `flops` are the op's minimum traffic and work.
    fn run(
        &mut self,
        op: &str,
        shape: String,
        bytes: f64,
        flops: f64,
        f: &mut dyn FnMut(usize) -> Result<()>,
    ) {
        if !format!("{op} {shape}").contains(self.filter.as_str()) {
            return;
        }
        let t0 = Instant::now();
        match self.measure(f) {
            Ok((t, how)) => {
                let (mem_t, flop_t) = (bytes / self.copy_bw, flops / self.gemm_rate);
                let (achieved, ceiling) = if flop_t > mem_t {
                    (
                        format!("{:.1} TFLOP/s", flops / t * 1e-12),
                        format!("{:.0} TFLOP/s", self.gemm_rate * 1e-12),
                    )
                } else {
                    (
                        format!("{:.0} GB/s", bytes / t * 1e-9),
                        format!("{:.0} GB/s", self.copy_bw * 1e-9),
                    )
                };
                let ratio = mem_t.max(flop_t) / t;
                println!(
                    "{op:<18} {shape:<36} {:>10.1} us {achieved:>15} / {ceiling:<13} {:>5.0}%  ({how}, {:.1}s)",
                    t * 1e6,
                    ratio * 100.0,
                    t0.elapsed().as_secs_f64()
                );
                self.rows.push(Row {
                    op: op.into(),
                    shape,
                    us: t * 1e6,
                    achieved,
                    ceiling,
                    ratio,
                });
            }
            Err(e) => {
                println!("{op:<18} {shape:<36} ERROR {e}");
                self.rows.push(Row {
                    op: op.into(),
                    shape,
                    us: f64::NAN,
                    achieved: format!("error: {e}"),
                    ceiling: String::new(),
                    ratio: f64::NAN,
                });
            }
        }
    }

    /// A device buffer of `len` random bf16 (normal * scale), built from a random host chunk
    /// of at most 16 Mi values replicated by row gathers on the device.
    fn randn(&mut self, len: usize, scale: f32) -> Result<CudaBuf<bf16>> {
        const CHUNK: usize = 16 << 20;
        let gen = |rng: &mut Rng, n: usize| -> Vec<bf16> {
            (0..n)
                .map(|_| {
                    let v = scale * rng.normal();
                    bf16::from_f32(if v == 0.0 { scale * 1e-3 } else { v })
                })
                .collect()
        };
        if len <= CHUNK {
            let host = gen(&mut self.rng, len);
            return self.gpu.from_host(&host);
        }
        let width = 1024;
        let rows = len.div_ceil(width);
        let src_rows = CHUNK / width;
        let src = self.gpu.from_host(&gen(&mut self.rng, CHUNK))?;
        let idx: Vec<i32> = (0..rows).map(|_| self.rng.below(src_rows) as i32).collect();
        let idx = self.gpu.from_host(&idx)?;
        let mut out = self.gpu.alloc::<bf16>(rows * width)?;
        self.gpu.gather_rows(&src, &idx, rows, width, &mut out)?;
        Ok(out)
    }

    fn sets(bytes_per_set: f64) -> usize {
        ((ROTATE_BYTES / bytes_per_set).ceil() as usize).clamp(1, 16)
    }
}

fn attn(nh: usize, nkv: usize, d: usize, bs: usize, mbps: usize) -> AttnParams {
    AttnParams {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        max_blocks_per_seq: mbps,
        scale: 1.0 / (d as f32).sqrt(),
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("op_bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let gpu = CudaBackend::new(0)?;
    let g = &gpu;
    let name = gpu.device_name()?;
    println!("op_bench on {} ({name})", gpu.name());
    let mut b = Bench {
        gpu: g,
        rng: Rng(0x5eed),
        copy_bw: f64::NAN,
        gemm_rate: f64::NAN,
        rows: Vec::new(),
        filter: std::env::var("OP_BENCH_FILTER").unwrap_or_default(),
        period: 1,
    };

    // ---- ceilings
    if b.filter.is_empty() || std::env::var_os("OP_BENCH_CEILINGS").is_some() {
        b.copy_bw = memcpy_bandwidth(&b)?;
        // Our own row-copy kernel over the same gigabyte, as a check of the kernels' reach.
        let n = 1usize << 29;
        let src = b.randn(n, 1.0)?;
        let mut dst = g.alloc::<bf16>(n)?;
        let idx: Vec<i32> = (0..(n / 1024) as i32).collect();
        let idx = g.from_host(&idx)?;
        let mut times = Vec::new();
        for _ in 0..5 {
            times.push(b.events(|| g.gather_rows(&src, &idx, n / 1024, 1024, &mut dst))?);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "ceiling: device copy {:.0} GB/s (1 GiB cuMemcpyDtoD, bytes read + written); \
             gather_rows of the same GiB {:.0} GB/s",
            b.copy_bw * 1e-9,
            2.0 * (n * 2) as f64 / times[2] * 1e-9
        );
        drop((src, dst));
        // Reading alone (what decode attention and the skinny GEMMs do): 1 GiB read once.
        let mut buf = g.from_host(&vec![1u8; 1 << 30])?;
        let mut times = Vec::new();
        for _ in 0..7 {
            times.push(b.events(|| g.read_all(&mut buf))?);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "ceiling: device read {:.0} GB/s (1 GiB read once by 16-byte loads, nothing written)",
            (1u64 << 30) as f64 / times[3] * 1e-9
        );
        drop(buf);
        let m = 8192;
        let x = b.randn(m * m, 1.0)?;
        let w = b.randn(m * m, 0.01)?;
        let mut out = g.alloc::<bf16>(m * m)?;
        g.gemm(&x, &w, m, m, m, &mut out)?;
        let mut times = Vec::new();
        for _ in 0..7 {
            times.push(b.events(|| g.gemm(&x, &w, m, m, m, &mut out))?);
        }
        times.sort_by(f64::total_cmp);
        b.gemm_rate = 2.0 * (m as f64).powi(3) / times[3];
        println!(
            "ceiling: bf16 GEMM {:.0} TFLOP/s (cuBLASLt, 8192^3)",
            b.gemm_rate * 1e-12
        );
    }

    let (tokens, hidden, nh, nkv, d, inter, vocab) =
        (16_384usize, 1024usize, 16, 8, 128, 3072, 151_936);
    let qkv_w = (nh + 2 * nkv) * d;

    // ---- memory-bound ops at 16,384 tokens
    {
        let bytes = (2 * tokens * hidden * 2) as f64;
        let sets = Bench::sets(bytes);
        let xs: Vec<_> = (0..sets)
            .map(|_| b.randn(tokens * hidden, 1.0))
            .collect::<Result<_>>()?;
        let mut outs: Vec<_> = (0..sets)
            .map(|_| g.alloc::<bf16>(tokens * hidden))
            .collect::<Result<_>>()?;
        let w = b.randn(hidden, 1.0)?;
        b.run(
            "rms_norm",
            format!("{tokens} x {hidden}"),
            bytes,
            0.0,
            &mut |i| g.rms_norm(&xs[i % sets], &w, tokens, hidden, 1e-6, &mut outs[i % sets]),
        );
        let mut rs: Vec<_> = (0..sets)
            .map(|_| b.randn(tokens * hidden, 1.0))
            .collect::<Result<_>>()?;
        let mut xs2: Vec<_> = (0..sets)
            .map(|_| b.randn(tokens * hidden, 1.0))
            .collect::<Result<_>>()?;
        b.run(
            "add_rms_norm",
            format!("{tokens} x {hidden}"),
            2.0 * bytes,
            0.0,
            &mut |i| {
                g.add_rms_norm(
                    &mut xs2[i % sets],
                    &mut rs[i % sets],
                    &w,
                    tokens,
                    hidden,
                    1e-6,
                )
            },
        );
    }
    {
        let a = attn(nh, nkv, d, 256, 1);
        let heads_bytes = (tokens * (nh + nkv) * d * 2 * 2) as f64 + (tokens * d * 4) as f64;
        let sets = Bench::sets(heads_bytes);
        let mut qkvs: Vec<_> = (0..sets)
            .map(|_| b.randn(tokens * qkv_w, 1.0))
            .collect::<Result<_>>()?;
        let (qn, kn) = (b.randn(d, 1.0)?, b.randn(d, 1.0)?);
        let max_pos = 40_960;
        let positions: Vec<i32> = (0..tokens).map(|_| b.rng.below(max_pos) as i32).collect();
        let pos = g.from_host(&positions)?;
        let table = nanovllm_kernels::cpu::rope_cos_sin_cache(d, max_pos, 1e6)?;
        let cs = g.from_host(&table)?;
        b.run(
            "qk_norm_rope",
            format!("{tokens} tok, {nh}/{nkv} heads d{d}"),
            heads_bytes,
            0.0,
            &mut |i| g.qk_norm_rope(&mut qkvs[i % sets], tokens, &a, &qn, &kn, 1e-6, &pos, &cs),
        );
        // store_kvcache into a cache of 2x the tokens' slots, slots a random permutation.
        let kv_bytes = (tokens * nkv * d * 2 * 2 * 2) as f64;
        let slots = 2 * tokens;
        let mut perm: Vec<i32> = (0..slots as i32).collect();
        for i in (1..slots).rev() {
            let j = b.rng.below(i + 1);
            perm.swap(i, j);
        }
        let sm = g.from_host(&perm[..tokens])?;
        let mut kc = g.alloc::<bf16>(slots * nkv * d)?;
        let mut vc = g.alloc::<bf16>(slots * nkv * d)?;
        b.run(
            "store_kvcache",
            format!("{tokens} tok, {nkv} kv heads d{d}"),
            kv_bytes,
            0.0,
            &mut |i| g.store_kvcache(&qkvs[i % sets], tokens, &a, &sm, &mut kc, &mut vc),
        );
    }
    // ---- q/k norm + rope fused with the KV-cache store, next to the two ops it replaces, at
    // prefill size and at decode batch sizes (where the launch saved is most of the gain).
    for n in [1usize, 64, 256, tokens] {
        let a = attn(nh, nkv, d, 256, 1);
        // Fewest bytes of the function: q, k, v read once, q and k written back, k and v
        // written to the cache, one cos/sin row per token.
        let bytes = (n * ((nh + 2 * nkv) + (nh + nkv) + 2 * nkv) * d * 2 + n * d * 4) as f64;
        let sets = Bench::sets(bytes);
        let mut qkvs: Vec<_> = (0..sets)
            .map(|_| b.randn(n * qkv_w, 1.0))
            .collect::<Result<_>>()?;
        let (qn, kn) = (b.randn(d, 1.0)?, b.randn(d, 1.0)?);
        let max_pos = 40_960;
        let positions: Vec<i32> = (0..n).map(|_| b.rng.below(max_pos) as i32).collect();
        let pos = g.from_host(&positions)?;
        let cs = g.from_host(&nanovllm_kernels::cpu::rope_cos_sin_cache(d, max_pos, 1e6)?)?;
        let slots = 2 * n;
        let mut perm: Vec<i32> = (0..slots as i32).collect();
        for i in (1..slots).rev() {
            let j = b.rng.below(i + 1);
            perm.swap(i, j);
        }
        let sm = g.from_host(&perm[..n])?;
        let mut kc = g.alloc::<bf16>(slots * nkv * d)?;
        let mut vc = g.alloc::<bf16>(slots * nkv * d)?;
        let shape = format!("{n} tok, {nh}/{nkv} heads d{d}");
        if n != tokens {
            // (At 16,384 tokens the rows above time the two ops alone.)
            b.run("qk_norm_rope", shape.clone(), bytes, 0.0, &mut |i| {
                g.qk_norm_rope(&mut qkvs[i % sets], n, &a, &qn, &kn, 1e-6, &pos, &cs)
            });
            b.run("store_kvcache", shape.clone(), bytes, 0.0, &mut |i| {
                g.store_kvcache(&qkvs[i % sets], n, &a, &sm, &mut kc, &mut vc)
            });
        }
        b.run("rope+store 2 ops", shape.clone(), bytes, 0.0, &mut |i| {
            g.qk_norm_rope(&mut qkvs[i % sets], n, &a, &qn, &kn, 1e-6, &pos, &cs)?;
            g.store_kvcache(&qkvs[i % sets], n, &a, &sm, &mut kc, &mut vc)
        });
        b.run("qk_norm_rope_store", shape, bytes, 0.0, &mut |i| {
            g.qk_norm_rope_store(
                &mut qkvs[i % sets],
                n,
                &a,
                &qn,
                &kn,
                1e-6,
                &pos,
                &cs,
                &sm,
                &mut kc,
                &mut vc,
            )
        });
    }
    {
        let bytes = (tokens * inter * 3 * 2) as f64;
        let sets = Bench::sets(bytes);
        let gus: Vec<_> = (0..sets)
            .map(|_| b.randn(tokens * 2 * inter, 2.0))
            .collect::<Result<_>>()?;
        let mut outs: Vec<_> = (0..sets)
            .map(|_| g.alloc::<bf16>(tokens * inter))
            .collect::<Result<_>>()?;
        b.run(
            "silu_and_mul",
            format!("{tokens} x {inter}"),
            bytes,
            0.0,
            &mut |i| g.silu_and_mul(&gus[i % sets], tokens, inter, &mut outs[i % sets]),
        );
    }
    {
        let emb = b.randn(vocab * hidden, 1.0)?;
        let ids: Vec<u32> = (0..tokens).map(|_| b.rng.below(vocab) as u32).collect();
        let ids = g.from_host(&ids)?;
        let mut out = g.alloc::<bf16>(tokens * hidden)?;
        b.run(
            "embedding",
            format!("{tokens} x {hidden}"),
            (2 * tokens * hidden * 2) as f64,
            0.0,
            &mut |_| g.embedding(&ids, tokens, &emb, 0, vocab, hidden, &mut out),
        );
        let x = b.randn(tokens * hidden, 1.0)?;
        let idx: Vec<i32> = (0..256).map(|i| i * 64 + 63).collect();
        let idx = g.from_host(&idx)?;
        let mut o = g.alloc::<bf16>(256 * hidden)?;
        b.run(
            "gather_rows",
            format!("256 of {tokens} x {hidden}"),
            (2 * 256 * hidden * 2) as f64,
            0.0,
            &mut |_| g.gather_rows(&x, &idx, 256, hidden, &mut o),
        );
    }

    // ---- GEMMs of Qwen3-0.6B and Qwen3-8B, each path, cold weights
    let gemm_table = gemm_rows(&mut b, vocab)?;
    if "gemm start-up".contains(b.filter.as_str()) {
        gemm_startup(&mut b, vocab)?;
    }

    // ---- sampling, 256 rows of the full vocabulary
    {
        let rows = 256;
        let bytes = (rows * vocab * 2) as f64;
        let sets = Bench::sets(bytes);
        let flat: Vec<_> = (0..sets)
            .map(|_| b.randn(rows * vocab, 2.0))
            .collect::<Result<_>>()?;
        // A trained model's shape: a few dominant logits per row over the noise.
        let peaked = {
            let mut host = vec![bf16::ZERO; rows * vocab];
            for v in host.iter_mut() {
                *v = bf16::from_f32(2.0 * b.rng.normal());
            }
            for r in 0..rows {
                for _ in 0..5 {
                    let i = r * vocab + b.rng.below(vocab);
                    host[i] = bf16::from_f32(14.0 + 4.0 * b.rng.f32());
                }
            }
            g.from_host(&host)?
        };
        let mut out = g.alloc::<u32>(rows)?;
        let seeds: Vec<u64> = (0..rows).map(|_| b.rng.next_u64()).collect();
        let seeds = g.from_host(&seeds)?;
        let steps = g.from_host(&vec![7u32; rows])?;
        for (rows, label, t, k, p, peak) in [
            (rows, "greedy", 0.0f32, 0i32, 1.0f32, false),
            (rows, "T=0.6 flat", 0.6, 0, 1.0, false),
            (rows, "T=0.6 peaked", 0.6, 0, 1.0, true),
            (rows, "T=0.8 top_k=50", 0.8, 50, 1.0, false),
            (rows, "T=0.8 top_k=50 peaked", 0.8, 50, 1.0, true),
            (rows, "T=1 top_p=0.9", 1.0, 0, 0.9, false),
            (rows, "T=1 top_p=0.9 peaked", 1.0, 0, 0.9, true),
            (rows, "T=0.7 k=40 p=0.8", 0.7, 40, 0.8, false),
            (rows, "T=0.7 k=40 p=0.8 peaked", 0.7, 40, 0.8, true),
            (16, "T=0.6 flat", 0.6, 0, 1.0, false),
            (1, "greedy", 0.0, 0, 1.0, false),
            (1, "T=0.6 flat", 0.6, 0, 1.0, false),
        ] {
            let temps = g.from_host(&vec![t; rows])?;
            let top_k = g.from_host(&vec![k; rows])?;
            let top_p = g.from_host(&vec![p; rows])?;
            let params = SamplingBufs {
                temperatures: &temps,
                top_k: &top_k,
                top_p: &top_p,
                seeds: &seeds,
                steps: &steps,
            };
            let bytes = (rows * vocab * 2) as f64;
            b.run(
                "sample",
                format!("{rows} x {vocab} {label}"),
                bytes,
                0.0,
                &mut |i| {
                    let logits = if peak { &peaked } else { &flat[i % sets] };
                    g.sample(logits, rows, vocab, &params, &mut out)
                },
            );
        }
    }

    // ---- attention (16 q heads, 8 kv heads, d 128, block 256)
    for (batch, ctx) in [(256usize, 1024usize), (16, 8192)] {
        let bs = 256;
        let blocks_per_seq = ctx.div_ceil(bs);
        let num_blocks = batch * blocks_per_seq;
        let a = attn(nh, nkv, d, bs, blocks_per_seq);
        let kc = b.randn(num_blocks * bs * nkv * d, 1.0)?;
        let vc = b.randn(num_blocks * bs * nkv * d, 1.0)?;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            let j = b.rng.below(i + 1);
            ids.swap(i, j);
        }
        let bt = g.from_host(&ids)?;
        let cl = g.from_host(&vec![ctx as i32; batch])?;
        let qkv = b.randn(batch * qkv_w, 1.0)?;
        let mut out = g.alloc::<bf16>(batch * nh * d)?;
        let bytes = (batch * ctx * nkv * d * 2 * 2) as f64;
        let flops = (4 * batch * ctx * nh * d) as f64;
        b.run(
            "decode_attention",
            format!("{batch} x ctx {ctx}"),
            bytes,
            flops,
            &mut |_| g.decode_attention(&qkv, &kc, &vc, &cl, &bt, batch, ctx, &a, &mut out),
        );
    }
    {
        let (seqs, len, bs) = (16usize, 1024usize, 256usize);
        let bps = len / bs;
        let a = attn(nh, nkv, d, bs, bps);
        let kc = b.randn(seqs * len * nkv * d, 1.0)?;
        let vc = b.randn(seqs * len * nkv * d, 1.0)?;
        let bt: Vec<i32> = (0..(seqs * bps) as i32).collect();
        let bt = g.from_host(&bt)?;
        let cu: Vec<i32> = (0..=seqs as i32).map(|s| s * len as i32).collect();
        let cu = g.from_host(&cu)?;
        let qkv = b.randn(seqs * len * qkv_w, 1.0)?;
        let mut out = g.alloc::<bf16>(seqs * len * nh * d)?;
        // Causal: half of the len x len scores, QK^T and PV at 2 flops per multiply-add each.
        let flops = (seqs * nh) as f64 * (len * (len + 1) / 2) as f64 * d as f64 * 4.0;
        let bytes = ((seqs * len * (qkv_w + nh * d)) * 2) as f64;
        b.run(
            "prefill_attention",
            format!("{seqs} x {len} causal"),
            bytes,
            flops,
            &mut |_| {
                g.prefill_attention(&qkv, &kc, &vc, &cu, &cu, &bt, seqs, len, len, &a, &mut out)
            },
        );
    }

    println!();
    println!("op_bench summary on {name} (time per call; floor = max(bytes / copy BW, flops / GEMM rate))");
    println!(
        "{:<18} {:<36} {:>10} {:>16} {:>14} {:>7}",
        "op", "shape", "us", "achieved", "ceiling", "floor%"
    );
    for r in &b.rows {
        println!(
            "{:<18} {:<36} {:>10.1} {:>16} {:>14} {:>6.0}%",
            r.op,
            r.shape,
            r.us,
            r.achieved,
            r.ceiling,
            r.ratio * 100.0
        );
    }
    print_gemm_table(&name, &gemm_table);
    Ok(())
}

/// Device copy bandwidth from cuMemcpyDtoD of 1 GiB (bytes read plus written).
fn memcpy_bandwidth(b: &Bench) -> Result<f64> {
    let stream = b.gpu.stream();
    let err = |e| Error::Cuda(format!("op_bench copy: {e:?}"));
    let n = 1usize << 30;
    let mut rng = Rng(0xC0B1);
    let host: Vec<u8> = (0..n / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    let src = stream.clone_htod(&host).map_err(err)?;
    let mut dst = stream.clone_htod(&host).map_err(err)?;
    let mut times = Vec::new();
    for _ in 0..7 {
        times.push(b.events(|| stream.memcpy_dtod(&src, &mut dst).map_err(err))?);
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * n as f64 / times[3])
}

/// One GEMM shape at one M: its floor and the time of each path, in microseconds (NaN: not
/// run; the skinny kernel takes M <= 32).
struct GemmTimes {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    floor_us: f64,
    /// cuBLASLt, heuristic's first algorithm; cuBLASLt tuned cold; skinny kernel.
    us: [f64; 3],
}

/// The policies the GEMM rows compare, in `GemmTimes::us` order.
fn gemm_paths() -> [(&'static str, GemmPolicy); 3] {
    [
        (
            "heuristic",
            GemmPolicy {
                skinny_max_m: 0,
                tuning: GemmTuning::Off,
            },
        ),
        (
            "tuned",
            GemmPolicy {
                skinny_max_m: 0,
                tuning: GemmTuning::All,
            },
        ),
        (
            "skinny",
            GemmPolicy {
                skinny_max_m: SKINNY_LIMIT,
                tuning: GemmTuning::All,
            },
        ),
    ]
}

/// The linear layers of Qwen3-0.6B (hidden 1024, intermediate 3072) and Qwen3-8B (hidden
/// 4096, intermediate 12,288) as (name, N, K, the M to time); Qwen3-8B also as one rank of two
/// shards it ("8B tp2": column-parallel layers half the N, row-parallel ones half the K), the
/// shapes whose times should be half of the whole model's for tensor parallelism to pay.
fn gemm_shapes(vocab: usize) -> Vec<(&'static str, usize, usize, Vec<usize>)> {
    let small = vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 16_384];
    let big = vec![1, 16, 64, 128, 256];
    vec![
        ("0.6B qkv", 4096, 1024, small.clone()),
        ("0.6B o", 1024, 2048, small.clone()),
        ("0.6B gate_up", 6144, 1024, small.clone()),
        ("0.6B down", 1024, 3072, small),
        (
            "0.6B lm_head",
            vocab,
            1024,
            vec![1, 8, 16, 64, 256, 512, 16_384],
        ),
        ("8B qkv", 6144, 4096, big.clone()),
        ("8B o", 4096, 4096, big.clone()),
        ("8B gate_up", 24_576, 4096, big.clone()),
        ("8B down", 4096, 12_288, big.clone()),
        ("8B lm_head", vocab, 4096, big.clone()),
        ("8B tp2 qkv", 3072, 4096, big.clone()),
        ("8B tp2 o", 4096, 2048, big.clone()),
        ("8B tp2 gate_up", 12_288, 4096, big.clone()),
        ("8B tp2 down", 4096, 6144, big.clone()),
        ("8B tp2 lm_head", vocab / 2, 4096, big),
    ]
}

/// Times every GEMM shape under each path (rows of the main table too).
fn gemm_rows(b: &mut Bench, vocab: usize) -> Result<Vec<GemmTimes>> {
    let g = b.gpu;
    let filter = b.filter.clone();
    let mut table = Vec::new();
    for (name, n, k, ms) in gemm_shapes(vocab) {
        let op = format!("gemm {name}");
        let shape = |m: usize, path: &str| format!("M={m} N={n} K={k} {path}");
        let wanted = |m: usize, path: &str| format!("{op} {}", shape(m, path)).contains(&filter);
        if !ms
            .iter()
            .any(|&m| gemm_paths().iter().any(|(p, _)| wanted(m, p)))
        {
            continue;
        }
        // Weights rotated over ROTATE_BYTES (twice the L2): each call reads a cold weight.
        let wsets = Bench::sets((n * k * 2) as f64);
        let ws: Vec<_> = (0..wsets)
            .map(|_| b.randn(n * k, 0.03))
            .collect::<Result<_>>()?;
        for m in ms {
            let bytes = ((m * k + n * k + m * n) * 2) as f64;
            let flops = 2.0 * (m * n * k) as f64;
            let sets = Bench::sets(bytes).min(wsets);
            let xs: Vec<_> = (0..sets)
                .map(|_| b.randn(m * k, 1.0))
                .collect::<Result<_>>()?;
            let mut outs: Vec<_> = (0..sets)
                .map(|_| g.alloc::<bf16>(m * n))
                .collect::<Result<_>>()?;
            let mut times = GemmTimes {
                name,
                m,
                n,
                k,
                floor_us: (bytes / b.copy_bw).max(flops / b.gemm_rate) * 1e6,
                us: [f64::NAN; 3],
            };
            for (slot, (path, policy)) in gemm_paths().into_iter().enumerate() {
                if (path == "skinny" && m > SKINNY_LIMIT) || !wanted(m, path) {
                    continue;
                }
                g.set_gemm_policy(policy)?;
                b.period = wsets;
                let before = b.rows.len();
                b.run(&op, shape(m, path), bytes, flops, &mut |i| {
                    g.gemm(&xs[i % sets], &ws[i % wsets], m, n, k, &mut outs[i % sets])
                });
                b.period = 1;
                if b.rows.len() > before {
                    times.us[slot] = b.rows[b.rows.len() - 1].us;
                }
            }
            table.push(times);
        }
    }
    g.set_gemm_policy(GemmPolicy::default())?;
    Ok(table)
}

/// What GEMM set-up adds to start-up: the first call of every Qwen3-0.6B linear layer (and
/// the LM head) at every decode batch bucket of the model runner (1, 2, 4, 8, 16, 32, ...,
/// 512, largest first, as its graph warm-up runs them), under the default policy and under
/// the same policy with no tuning and with every shape tuned; the differences are the tuning.
fn gemm_startup(b: &mut Bench, vocab: usize) -> Result<()> {
    let g = b.gpu;
    let shapes = [
        (4096, 1024),
        (1024, 2048),
        (6144, 1024),
        (1024, 3072),
        (vocab, 1024),
    ];
    let ws: Vec<_> = shapes
        .iter()
        .map(|&(n, k)| b.randn(n * k, 0.03))
        .collect::<Result<_>>()?;
    let x = b.randn(512 * 3072, 1.0)?;
    let mut out = g.alloc::<bf16>(512 * vocab)?;
    let mut buckets = vec![1usize, 2, 4, 8];
    buckets.extend((16..=512).step_by(16));
    buckets.reverse();
    let default = GemmPolicy::default();
    for (label, policy) in [
        (
            "untuned",
            GemmPolicy {
                tuning: GemmTuning::Off,
                ..default
            },
        ),
        ("default", default),
        (
            "all tuned",
            GemmPolicy {
                tuning: GemmTuning::All,
                ..default
            },
        ),
    ] {
        g.set_gemm_policy(policy)?;
        g.synchronize()?;
        let t = Instant::now();
        for &m in &buckets {
            for (&(n, k), w) in shapes.iter().zip(&ws) {
                g.gemm(&x, w, m, n, k, &mut out)?;
            }
            g.synchronize()?;
        }
        println!(
            "gemm start-up ({label} policy {policy:?}): first calls of {} shapes ({} decode \
             buckets x 5 layers) took {:.1} ms",
            buckets.len() * shapes.len(),
            buckets.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    g.set_gemm_policy(default)?;
    Ok(())
}

/// The GEMM comparison: per shape and M, each path's time and its share of the floor.
fn print_gemm_table(device: &str, table: &[GemmTimes]) {
    if table.is_empty() {
        return;
    }
    let pct = |us: f64, floor: f64| {
        if us.is_nan() {
            format!("{:>16}", "-")
        } else {
            format!("{us:>8.1} ({:>3.0}%)", floor / us * 100.0)
        }
    };
    println!();
    println!(
        "gemm summary on {device} (cold weights; us per call and % of the floor; default policy \
         {:?})",
        GemmPolicy::default()
    );
    println!(
        "{:<14} {:>6} {:>7} {:>6} {:>8} {:>16} {:>16} {:>16}",
        "layer", "M", "N", "K", "floor", "heuristic", "tuned", "skinny"
    );
    for t in table {
        println!(
            "{:<14} {:>6} {:>7} {:>6} {:>8.1} {} {} {}",
            t.name,
            t.m,
            t.n,
            t.k,
            t.floor_us,
            pct(t.us[0], t.floor_us),
            pct(t.us[1], t.floor_us),
            pct(t.us[2], t.floor_us)
        );
    }
}
