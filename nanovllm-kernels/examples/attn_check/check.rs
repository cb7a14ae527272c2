//! The body of `attn_check` (see `main.rs`): test shapes, references, comparison, timings.

use std::process::ExitCode;
use std::time::Instant;

use cudarc::driver::sys::{CUevent_flags, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::bf16;
use nanovllm_kernels::cpu::CpuBackend;
use nanovllm_kernels::cuda::CudaBackend;
use nanovllm_kernels::{AttnParams, Backend};
use nanovllm_utils::{Error, Result};
use rayon::prelude::*;

/// Largest relative L2 error (against the f64 reference, or the CPU backend when the
/// reference is skipped) that passes: bf16 inputs and outputs put the error near 2e-3.
const TOL: f64 = 1e-2;
/// The f64 reference is skipped above this many multiply-adds.
const REF_MAX_MACS: f64 = 4e9;

/// SplitMix64: a small, fast, seedable generator (inputs need only be varied, not strong).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) * (2.0 / 16_777_216.0) - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// `n` random bf16 in [-scale, scale), filled in parallel.
fn rand_bf16(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut v = vec![bf16::ZERO; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r = Rng(seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        for x in c {
            *x = bf16::from_f32(r.sym() * scale);
        }
    });
    v
}

/// Random distinct block ids for sequences of `lens` tokens: one `[num_seqs, mbps]` table
/// (unused entries -1) drawn from a cache of `num_blocks` blocks.
fn block_tables(lens: &[usize], bs: usize, mbps: usize, rng: &mut Rng) -> (Vec<i32>, usize) {
    let need: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let num_blocks = need + 3;
    let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut table = vec![-1i32; lens.len() * mbps];
    let mut next = 0;
    for (s, l) in lens.iter().enumerate() {
        for j in 0..l.div_ceil(bs) {
            table[s * mbps + j] = ids[next];
            next += 1;
        }
    }
    (table, num_blocks)
}

fn to_f64(v: &[bf16]) -> Vec<f64> {
    v.par_iter().map(|x| x.to_f64()).collect()
}

/// ‖a − b‖ / ‖b‖ over the first `n` elements.
fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let (num, den) = a
        .par_iter()
        .zip(b)
        .map(|(x, y)| ((x - y) * (x - y), y * y))
        .reduce(|| (0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1));
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Attention of one query row `q` (head_dim values) against `len` keys gathered through the
/// block table, in f64.
#[allow(clippy::too_many_arguments)]
fn ref_row(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    table: &[i32],
    len: usize,
    kvh: usize,
    attn: &AttnParams,
    out: &mut [f64],
) {
    let d = attn.head_dim;
    let slot_w = attn.num_kv_heads * d;
    let row = |t: usize| {
        let slot = table[t / attn.block_size] as usize * attn.block_size + t % attn.block_size;
        slot * slot_w + kvh * d
    };
    let scores: Vec<f64> = (0..len)
        .map(|t| {
            let o = row(t);
            q.iter().zip(&k[o..o + d]).map(|(a, b)| a * b).sum::<f64>() * attn.scale as f64
        })
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    out.iter_mut().for_each(|x| *x = 0.0);
    let mut sum = 0.0;
    for (t, s) in scores.iter().enumerate() {
        let p = (s - m).exp();
        sum += p;
        let o = row(t);
        for (x, vv) in out.iter_mut().zip(&v[o..o + d]) {
            *x += p * vv;
        }
    }
    if sum > 0.0 {
        out.iter_mut().for_each(|x| *x /= sum);
    }
}

/// Errors of one case: GPU vs CPU backend, GPU vs f64, CPU vs f64 (NaN where not computed),
/// and how many GPU outputs were not finite (poison left in place, or a NaN computed).
struct Outcome {
    gpu_cpu: f64,
    gpu_ref: f64,
    cpu_ref: f64,
    nonfinite: usize,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.nonfinite == 0
            && self.gpu_cpu < TOL
            && (self.gpu_ref.is_nan() || self.gpu_ref < TOL)
            && (self.cpu_ref.is_nan() || self.cpu_ref < TOL)
    }
}

fn compare(gpu: &[bf16], cpu: &[bf16], reference: Option<&[f64]>) -> Outcome {
    let nonfinite = gpu.iter().filter(|x| !x.to_f32().is_finite()).count();
    let (g, c) = (to_f64(gpu), to_f64(cpu));
    let gpu_cpu = if nonfinite > 0 {
        f64::NAN
    } else {
        rel_l2(&g, &c)
    };
    let (gpu_ref, cpu_ref) = match reference {
        Some(r) => (rel_l2(&g, r), rel_l2(&c, r)),
        None => (f64::NAN, f64::NAN),
    };
    Outcome {
        gpu_cpu,
        gpu_ref,
        cpu_ref,
        nonfinite,
    }
}

fn poison(n: usize) -> Vec<bf16> {
    vec![bf16::from_bits(0x7FC0); n]
}

fn params(nh: usize, nkv: usize, hd: usize, bs: usize, mbps: usize) -> AttnParams {
    AttnParams {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        block_size: bs,
        max_blocks_per_seq: mbps,
        scale: 1.0 / (hd as f32).sqrt(),
    }
}

/// One decode shape: context lengths of the batch, heads, block size, the `max_context_len`
/// passed (at least the longest context), and the spread of q.
struct DecodeCase {
    name: String,
    ctx: Vec<usize>,
    nh: usize,
    nkv: usize,
    hd: usize,
    bs: usize,
    max_ctx: usize,
    q_scale: f32,
}

/// Inputs of a decode call, on both backends.
struct DecodeInputs {
    attn: AttnParams,
    qkv: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    lens: Vec<i32>,
    table: Vec<i32>,
}

fn decode_inputs(c: &DecodeCase, seed: u64) -> DecodeInputs {
    let mut rng = Rng(seed);
    let mbps = c.max_ctx.div_ceil(c.bs);
    let (table, num_blocks) = block_tables(&c.ctx, c.bs, mbps, &mut rng);
    let attn = params(c.nh, c.nkv, c.hd, c.bs, mbps);
    let cache = num_blocks * c.bs * c.nkv * c.hd;
    let mut qkv = rand_bf16(c.ctx.len() * attn.qkv_width(), 1.0, seed ^ 1);
    // Scale the q heads so that some cases have peaked softmaxes.
    for row in qkv.chunks_mut(attn.qkv_width()) {
        for x in &mut row[..c.nh * c.hd] {
            *x = bf16::from_f32(x.to_f32() * c.q_scale);
        }
    }
    DecodeInputs {
        attn,
        qkv,
        k: rand_bf16(cache, 1.0, seed ^ 2),
        v: rand_bf16(cache, 1.0, seed ^ 3),
        lens: c.ctx.iter().map(|&l| l as i32).collect(),
        table,
    }
}

fn decode_reference(c: &DecodeCase, x: &DecodeInputs) -> Vec<f64> {
    let (q, k, v) = (to_f64(&x.qkv), to_f64(&x.k), to_f64(&x.v));
    let a = &x.attn;
    let (d, group, w) = (a.head_dim, a.num_heads / a.num_kv_heads, a.qkv_width());
    let mut out = vec![0.0; c.ctx.len() * a.num_heads * d];
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (s, h) = (i / a.num_heads, i % a.num_heads);
        let table = &x.table[s * a.max_blocks_per_seq..(s + 1) * a.max_blocks_per_seq];
        let qrow = &q[s * w + h * d..s * w + (h + 1) * d];
        ref_row(qrow, &k, &v, table, c.ctx[s], h / group, a, o);
    });
    out
}

/// Runs one decode call on `be` with the output poisoned first; returns the output.
fn decode_on<B: Backend>(be: &B, c: &DecodeCase, x: &DecodeInputs) -> Result<Vec<bf16>> {
    let n = c.ctx.len();
    let out_len = n * c.nh * c.hd;
    let (qkv, k, v) = (
        be.from_host(&x.qkv)?,
        be.from_host(&x.k)?,
        be.from_host(&x.v)?,
    );
    let (lens, table) = (be.from_host(&x.lens)?, be.from_host(&x.table)?);
    let mut out = be.from_host(&poison(out_len))?;
    be.decode_attention(&qkv, &k, &v, &lens, &table, n, c.max_ctx, &x.attn, &mut out)?;
    let mut h = vec![bf16::ZERO; out_len];
    be.dtoh(&out, &mut h)?;
    Ok(h)
}

/// Runs one prefill call on `be` with the output poisoned first; returns the output.
fn prefill_on<B: Backend>(be: &B, c: &PrefillCase, x: &PrefillInputs) -> Result<Vec<bf16>> {
    let n = c.lens.len();
    let out_len = x.cu_q[n] as usize * c.nh * c.hd;
    let (qkv, k, v) = (
        be.from_host(&x.qkv)?,
        be.from_host(&x.k)?,
        be.from_host(&x.v)?,
    );
    let (cq, ck) = (be.from_host(&x.cu_q)?, be.from_host(&x.cu_k)?);
    let table = be.from_host(&x.table)?;
    let mut out = be.from_host(&poison(out_len))?;
    be.prefill_attention(
        &qkv, &k, &v, &cq, &ck, &table, n, x.max_q, x.max_k, &x.attn, &mut out,
    )?;
    let mut h = vec![bf16::ZERO; out_len];
    be.dtoh(&out, &mut h)?;
    Ok(h)
}

/// Runs one decode case on both backends; returns the outcome.
fn check_decode<D: Backend>(
    gpu: &D,
    cpu: &CpuBackend,
    c: &DecodeCase,
    seed: u64,
) -> Result<Outcome> {
    let x = decode_inputs(c, seed);
    let g = decode_on(gpu, c, &x)?;
    let cr = decode_on(cpu, c, &x)?;
    let macs = 2.0 * c.ctx.iter().sum::<usize>() as f64 * (c.nh * c.hd) as f64;
    let reference = (macs <= REF_MAX_MACS).then(|| decode_reference(c, &x));
    Ok(compare(&g, &cr, reference.as_deref()))
}

/// One prefill shape: (queries, keys) per sequence (keys >= queries: the queries are the last
/// tokens), heads, block size.
struct PrefillCase {
    name: String,
    lens: Vec<(usize, usize)>,
    nh: usize,
    nkv: usize,
    hd: usize,
    bs: usize,
    q_scale: f32,
}

struct PrefillInputs {
    attn: AttnParams,
    qkv: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    cu_q: Vec<i32>,
    cu_k: Vec<i32>,
    table: Vec<i32>,
    max_q: usize,
    max_k: usize,
}

fn prefill_inputs(c: &PrefillCase, seed: u64) -> PrefillInputs {
    let mut rng = Rng(seed);
    let lens_k: Vec<usize> = c.lens.iter().map(|l| l.1).collect();
    let max_k = lens_k.iter().cloned().max().unwrap_or(0);
    let max_q = c.lens.iter().map(|l| l.0).max().unwrap_or(0);
    let mbps = max_k.div_ceil(c.bs).max(1);
    let (table, num_blocks) = block_tables(&lens_k, c.bs, mbps, &mut rng);
    let attn = params(c.nh, c.nkv, c.hd, c.bs, mbps);
    let total_q: usize = c.lens.iter().map(|l| l.0).sum();
    let cache = num_blocks * c.bs * c.nkv * c.hd;
    let mut qkv = rand_bf16(total_q * attn.qkv_width(), 1.0, seed ^ 1);
    for row in qkv.chunks_mut(attn.qkv_width()) {
        for x in &mut row[..c.nh * c.hd] {
            *x = bf16::from_f32(x.to_f32() * c.q_scale);
        }
    }
    let mut cu_q = vec![0i32];
    let mut cu_k = vec![0i32];
    for &(lq, lk) in &c.lens {
        cu_q.push(cu_q[cu_q.len() - 1] + lq as i32);
        cu_k.push(cu_k[cu_k.len() - 1] + lk as i32);
    }
    PrefillInputs {
        attn,
        qkv,
        k: rand_bf16(cache, 1.0, seed ^ 2),
        v: rand_bf16(cache, 1.0, seed ^ 3),
        cu_q,
        cu_k,
        table,
        max_q,
        max_k,
    }
}

fn prefill_reference(c: &PrefillCase, x: &PrefillInputs) -> Vec<f64> {
    let (q, k, v) = (to_f64(&x.qkv), to_f64(&x.k), to_f64(&x.v));
    let a = &x.attn;
    let (d, group, w) = (a.head_dim, a.num_heads / a.num_kv_heads, a.qkv_width());
    // Row r of the output belongs to the sequence whose query range holds it.
    let seq_of: Vec<usize> = c
        .lens
        .iter()
        .enumerate()
        .flat_map(|(s, &(lq, _))| std::iter::repeat_n(s, lq))
        .collect();
    let mut out = vec![0.0; seq_of.len() * a.num_heads * d];
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (r, h) = (i / a.num_heads, i % a.num_heads);
        let s = seq_of[r];
        let (lq, lk) = c.lens[s];
        let qi = r - x.cu_q[s] as usize;
        let table = &x.table[s * a.max_blocks_per_seq..(s + 1) * a.max_blocks_per_seq];
        let qrow = &q[r * w + h * d..r * w + (h + 1) * d];
        ref_row(qrow, &k, &v, table, lk - lq + qi + 1, h / group, a, o);
    });
    out
}

fn check_prefill<D: Backend>(
    gpu: &D,
    cpu: &CpuBackend,
    c: &PrefillCase,
    seed: u64,
) -> Result<Outcome> {
    let x = prefill_inputs(c, seed);
    let g = prefill_on(gpu, c, &x)?;
    let cr = prefill_on(cpu, c, &x)?;
    let macs: f64 = c
        .lens
        .iter()
        .map(|&(lq, lk)| (lq * (2 * lk - lq + 1)) as f64 / 2.0 * 2.0 * (c.nh * c.hd) as f64)
        .sum();
    let reference = (macs <= REF_MAX_MACS).then(|| prefill_reference(c, &x));
    Ok(compare(&g, &cr, reference.as_deref()))
}

fn decode_cases(rng: &mut Rng) -> Vec<DecodeCase> {
    let mut v = Vec::new();
    let mut add = |name: &str,
                   ctx: Vec<usize>,
                   (nh, nkv, hd, bs): (usize, usize, usize, usize),
                   max_ctx: usize,
                   q_scale: f32| {
        let max_ctx = max_ctx.max(ctx.iter().cloned().max().unwrap_or(1));
        v.push(DecodeCase {
            name: name.to_string(),
            ctx,
            nh,
            nkv,
            hd,
            bs,
            max_ctx,
            q_scale,
        });
    };
    add("one token", vec![1], (16, 8, 128, 256), 0, 1.0);
    add(
        "block edges bs16",
        vec![15, 16, 17, 255, 256, 257],
        (16, 8, 128, 16),
        0,
        2.0,
    );
    add(
        "g1 hd64 bs32",
        (0..5).map(|_| 1 + rng.below(300)).collect(),
        (8, 8, 64, 32),
        0,
        1.0,
    );
    add(
        "g2 hd64 bs16",
        (0..9).map(|_| 1 + rng.below(1000)).collect(),
        (4, 2, 64, 16),
        0,
        3.0,
    );
    add(
        "g3 hd128 bs64",
        (0..4).map(|_| 1 + rng.below(700)).collect(),
        (24, 8, 128, 64),
        0,
        1.0,
    );
    add(
        "g4 hd128 bs64",
        (0..6).map(|_| 1 + rng.below(1500)).collect(),
        (32, 8, 128, 64),
        0,
        2.0,
    );
    add(
        "g5 hd128 bs16",
        (0..3).map(|_| 1 + rng.below(2000)).collect(),
        (40, 8, 128, 16),
        0,
        1.0,
    );
    add(
        "g6 hd64 bs128",
        (0..3).map(|_| 1 + rng.below(900)).collect(),
        (12, 2, 64, 128),
        0,
        1.0,
    );
    add(
        "g7 hd64 bs256",
        (0..2).map(|_| 1 + rng.below(3000)).collect(),
        (7, 1, 64, 256),
        0,
        1.0,
    );
    add(
        "g8 hd128 bs128",
        (0..3).map(|_| 1 + rng.below(2500)).collect(),
        (64, 8, 128, 128),
        0,
        4.0,
    );
    add(
        "g8 hd64 bs32",
        (0..5).map(|_| 1 + rng.below(400)).collect(),
        (16, 2, 64, 32),
        0,
        1.0,
    );
    add("1 x 8192 splits", vec![8192], (16, 8, 128, 256), 0, 1.0);
    add("1 x 8191 hd64 bs16", vec![8191], (16, 8, 64, 16), 0, 2.0);
    add(
        "graph max 8192",
        (0..7).map(|_| 1 + rng.below(5000)).collect(),
        (16, 8, 128, 16),
        8192,
        1.0,
    );
    add(
        "graph max 8192 short",
        vec![1, 2, 3, 40],
        (16, 8, 128, 256),
        8192,
        1.0,
    );
    add("ctx 0 padding", vec![0, 33, 0], (16, 8, 128, 16), 64, 1.0);
    add("all contexts 0", vec![0, 0], (16, 8, 128, 16), 0, 1.0);
    add(
        "batch 512",
        (0..512).map(|_| 1 + rng.below(600)).collect(),
        (16, 8, 128, 256),
        0,
        1.0,
    );
    add(
        "batch 64 hd64",
        (0..64).map(|_| 1 + rng.below(2000)).collect(),
        (32, 4, 64, 64),
        4096,
        1.0,
    );
    add(
        "serving mix kv4",
        (0..200).map(|_| 100 + rng.below(1900)).collect(),
        (16, 4, 128, 256),
        4096,
        1.0,
    );
    add("16 x 8192", vec![8192; 16], (16, 8, 128, 256), 0, 1.0);
    add("256 x 1024", vec![1024; 256], (16, 8, 128, 256), 0, 1.0);
    v
}

fn prefill_cases(rng: &mut Rng) -> Vec<PrefillCase> {
    let mut v = Vec::new();
    let mut add = |name: &str,
                   lens: Vec<(usize, usize)>,
                   (nh, nkv, hd, bs): (usize, usize, usize, usize),
                   q_scale: f32| {
        v.push(PrefillCase {
            name: name.to_string(),
            lens,
            nh,
            nkv,
            hd,
            bs,
            q_scale,
        });
    };
    add("one token", vec![(1, 1)], (16, 8, 128, 256), 1.0);
    add(
        "tile edges",
        vec![(17, 17), (63, 63), (64, 64), (65, 65), (130, 130)],
        (16, 8, 128, 16),
        2.0,
    );
    add(
        "prefix hits",
        vec![(10, 300), (64, 320), (1, 77), (100, 356)],
        (16, 8, 128, 16),
        1.0,
    );
    add(
        "chunked",
        vec![(100, 612), (256, 256), (3, 1027)],
        (16, 8, 128, 64),
        1.0,
    );
    let odd: Vec<(usize, usize)> = (0..6)
        .map(|_| {
            let q = 1 + rng.below(400);
            (q, q + rng.below(300))
        })
        .collect();
    add("g1 hd64 bs32 odd", odd.clone(), (8, 8, 64, 32), 3.0);
    add("g4 hd64 bs128 odd", odd.clone(), (16, 4, 64, 128), 1.0);
    add("g8 hd128 bs256 odd", odd, (16, 2, 128, 256), 1.0);
    add(
        "g3 hd128 bs16",
        vec![(333, 333), (70, 500)],
        (24, 8, 128, 16),
        1.0,
    );
    add(
        "g5 hd64 bs64",
        vec![(129, 129), (5, 900)],
        (40, 8, 64, 64),
        2.0,
    );
    add("long 2048", vec![(2048, 2048)], (16, 8, 128, 256), 1.0);
    add("16 x 1024", vec![(1024, 1024); 16], (16, 8, 128, 256), 1.0);
    v
}

/// Median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median time of one call of `f`, in ms: `batches` batches of `per` back-to-back calls, each
/// batch timed from the host around a synchronize (the launches queue ahead of the GPU, so the
/// batch time is GPU time), after a warm-up batch.
fn time_ms(
    be: &CudaBackend,
    batches: usize,
    per: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..per {
        f()?;
    }
    be.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..per {
            f()?;
        }
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3 / per as f64);
    }
    Ok(median(times))
}

/// Device-to-device copy bandwidth (bytes read + written per second) over 1 GiB, timed with
/// CUDA events on a stream of the same device: the ceiling the decode kernel is measured
/// against.
fn copy_bandwidth() -> Result<f64> {
    fn err(w: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::Cuda(format!("copy bandwidth: {w}: {e:?}"))
    }
    let ctx = CudaContext::new(0).map_err(err("context"))?;
    let stream = ctx.new_stream().map_err(err("stream"))?;
    let n = 1usize << 30;
    let src = stream
        .clone_htod(&rand_bf16(n / 2, 1.0, 7))
        .map_err(err("alloc"))?;
    let mut dst = stream.alloc_zeros::<bf16>(n / 2).map_err(err("alloc"))?;
    let mut times = Vec::new();
    for i in 0..12 {
        let t0 = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err("event"))?;
        stream.memcpy_dtod(&src, &mut dst).map_err(err("copy"))?;
        let t1 = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err("event"))?;
        let ms = t0.elapsed_ms(&t1).map_err(err("elapsed"))? as f64;
        if i >= 2 {
            times.push(ms);
        }
    }
    Ok(2.0 * n as f64 / (median(times) * 1e-3))
}

/// One timing row of the final table.
struct Row {
    what: String,
    ms: f64,
    rate: String,
    target: String,
}

fn bench(gpu: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    let bw = copy_bandwidth()?;
    rows.push(Row {
        what: "d2d copy 1 GiB".into(),
        ms: 2.0 * (1u64 << 30) as f64 / bw * 1e3,
        rate: format!("{:.0} GB/s", bw / 1e9),
        target: "ceiling".into(),
    });
    // The two targets first, then a scan of batch sizes and contexts.
    // (batch, context, query heads, kv heads): 16 query heads over 8 kv heads is
    // Qwen3-0.6B/1.7B, 32 is Qwen3-4B/8B (group 4), 16 over 4 a tp 2 rank of Qwen3-8B. A
    // context of 0 stands for the serving mix: 100..2,000 tokens in one batch (max_context_len
    // 4,096, as a decode graph passes a longer one than the batch holds), in no particular
    // order; a context of 1 stands for the same mix longest first, the order the engine runs
    // a decode batch in.
    let shapes: &[(usize, usize, usize, usize)] = &[
        (256, 1024, 16, 8),
        (16, 8192, 16, 8),
        (1, 8192, 16, 8),
        (8, 4096, 16, 8),
        (32, 4096, 16, 8),
        (64, 2048, 16, 8),
        (128, 1024, 16, 8),
        (512, 1024, 16, 8),
        (256, 1024, 32, 8),
        (256, 0, 32, 8),
        (128, 0, 32, 8),
        (256, 0, 16, 4),
        (128, 0, 16, 4),
        (64, 0, 16, 4),
        (256, 1, 32, 8),
        (256, 1, 16, 4),
        (128, 1, 16, 4),
    ];
    for &(n, ctx, nh, nkv) in shapes {
        let lens: Vec<usize> = match ctx {
            0 => (0..n).map(|i| 100 + (i * 733) % 1900).collect(),
            1 => {
                let mut l: Vec<usize> = (0..n).map(|i| 100 + (i * 733) % 1900).collect();
                l.sort_unstable_by(|a, b| b.cmp(a));
                l
            }
            _ => vec![ctx; n],
        };
        let tokens: usize = lens.iter().sum();
        let c = DecodeCase {
            name: String::new(),
            ctx: lens,
            nh,
            nkv,
            hd: 128,
            bs: 256,
            max_ctx: if ctx <= 1 { 4096 } else { ctx },
            q_scale: 1.0,
        };
        let x = decode_inputs(&c, 99 + n as u64);
        let (qkv, k, v) = (
            gpu.from_host(&x.qkv)?,
            gpu.from_host(&x.k)?,
            gpu.from_host(&x.v)?,
        );
        let (lens, table) = (gpu.from_host(&x.lens)?, gpu.from_host(&x.table)?);
        let mut out = gpu.from_host(&poison(n * nh * 128))?;
        let ms = time_ms(gpu, 9, 10, || {
            gpu.decode_attention(&qkv, &k, &v, &lens, &table, n, c.max_ctx, &x.attn, &mut out)
        })?;
        // K and V of every context token once, q in, out back.
        let bytes = (tokens * nkv * 128 * 2 * 2 + 2 * n * nh * 128 * 2) as f64;
        let gbs = bytes / (ms * 1e-3);
        let what = match (ctx, nh / nkv) {
            (0, g) => format!("decode {n} x 100..2000 g{g} kv{nkv}"),
            (1, g) => format!("decode {n} x 2000..100 g{g} kv{nkv}"),
            (_, 2) => format!("decode {n} x {ctx}"),
            (_, g) => format!("decode {n} x {ctx} g{g}"),
        };
        rows.push(Row {
            what,
            ms,
            rate: format!("{:.0} GB/s = {:.0}% of copy", gbs / 1e9, 100.0 * gbs / bw),
            target: if matches!((n, ctx, nh), (256, 1024, 16) | (16, 8192, 16)) {
                format!(">= 85% ({:.3} ms)", bytes / (0.85 * bw) * 1e3)
            } else {
                String::new()
            },
        });
    }
    for &(n, len) in &[(16usize, 1024usize), (4, 4096)] {
        let c = PrefillCase {
            name: String::new(),
            lens: vec![(len, len); n],
            nh: 16,
            nkv: 8,
            hd: 128,
            bs: 256,
            q_scale: 1.0,
        };
        let x = prefill_inputs(&c, 1234);
        let (qkv, k, v) = (
            gpu.from_host(&x.qkv)?,
            gpu.from_host(&x.k)?,
            gpu.from_host(&x.v)?,
        );
        let (cq, ck) = (gpu.from_host(&x.cu_q)?, gpu.from_host(&x.cu_k)?);
        let table = gpu.from_host(&x.table)?;
        let mut out = gpu.from_host(&poison(n * len * 16 * 128))?;
        let ms = time_ms(gpu, 9, 10, || {
            gpu.prefill_attention(
                &qkv, &k, &v, &cq, &ck, &table, n, len, len, &x.attn, &mut out,
            )
        })?;
        let flops = 4.0 * n as f64 * (len as f64 * len as f64 / 2.0) * 16.0 * 128.0;
        rows.push(Row {
            what: format!("prefill {n} x {len} causal"),
            ms,
            rate: format!("{:.0} TFLOP/s", flops / (ms * 1e-3) / 1e12),
            target: if n == 16 {
                format!(">= 200 TFLOP/s ({:.3} ms)", flops / 200e12 * 1e3)
            } else {
                String::new()
            },
        });
    }
    Ok(())
}

pub fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("attn_check: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Times other builds of the prefill kernel (PTX files made with other `PF_BM` / `PF_BN` /
/// `PF_MIN_BLOCKS`, given as `BM:BN:path`) at the 16 x 1,024 target shape, launched here through
/// cudarc with the launcher's argument list, each checked against the backend's own output.
fn prefill_variants(gpu: &CudaBackend, specs: &[String], rows: &mut Vec<Row>) -> Result<()> {
    fn err(w: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::Cuda(format!("prefill variant: {w}: {e:?}"))
    }
    let c = PrefillCase {
        name: String::new(),
        lens: vec![(1024, 1024); 16],
        nh: 16,
        nkv: 8,
        hd: 128,
        bs: 256,
        q_scale: 1.0,
    };
    let x = prefill_inputs(&c, 4321);
    let want = to_f64(&prefill_on(gpu, &c, &x)?);
    let ctx = CudaContext::new(0).map_err(err("context"))?;
    let stream = ctx.new_stream().map_err(err("stream"))?;
    let qkv = stream.clone_htod(&x.qkv).map_err(err("upload"))?;
    let k = stream.clone_htod(&x.k).map_err(err("upload"))?;
    let v = stream.clone_htod(&x.v).map_err(err("upload"))?;
    let cq = stream.clone_htod(&x.cu_q).map_err(err("upload"))?;
    let ck = stream.clone_htod(&x.cu_k).map_err(err("upload"))?;
    let table = stream.clone_htod(&x.table).map_err(err("upload"))?;
    let total_q = 16 * 1024;
    let (qkv_stride, q_rows) = (x.attn.qkv_width() as i32, total_q as i32);
    let (mbps, nkv) = (x.attn.max_blocks_per_seq as i32, 8i32);
    let num_blocks = (x.k.len() / (256 * 8 * 128)) as i32;
    let (max_k, log2_bs) = (1024i32, 8i32);
    let scale_log2 = x.attn.scale * std::f32::consts::LOG2_E;
    let flops = 4.0 * 16.0 * (1024.0 * 1024.0 / 2.0) * 16.0 * 128.0;
    for spec in specs {
        // BM:BN:path, or BM:BN:path:SMEM_BYTES for a build whose shared-memory layout differs.
        let parts: Vec<&str> = spec.split(':').collect();
        let (bm, bn, path) = match parts.as_slice() {
            [m, n, p] | [m, n, p, _] => (m.parse::<usize>().ok(), n.parse::<usize>().ok(), *p),
            _ => (None, None, ""),
        };
        let (Some(bm), Some(bn)) = (bm, bn) else {
            return Err(Error::Other(format!(
                "variant `{spec}`: expected BM:BN:path[:smem_bytes]"
            )));
        };
        let module = ctx.load_module(Ptx::from_file(path)).map_err(err("load"))?;
        let f = module
            .load_function("attn_prefill_hd128")
            .map_err(err("function"))?;
        let smem = match parts.get(3).and_then(|v| v.parse::<usize>().ok()) {
            Some(bytes) => bytes,
            None => 4 * bn * 128 * 2 + if bn < bm { bm * 128 * 2 } else { 0 },
        };
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(err("smem"))?;
        let cfg = LaunchConfig {
            grid_dim: (16, 16, (1024 / bm) as u32),
            block_dim: ((bm / 16 * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut out = stream
            .clone_htod(&poison(total_q * 16 * 128))
            .map_err(err("upload"))?;
        let launch = |out: &mut cudarc::driver::CudaSlice<bf16>| -> Result<()> {
            let mut b = stream.launch_builder(&f);
            b.arg(&qkv)
                .arg(&qkv_stride)
                .arg(&q_rows)
                .arg(&k)
                .arg(&v)
                .arg(&cq)
                .arg(&ck)
                .arg(&table)
                .arg(&mbps)
                .arg(&nkv)
                .arg(&num_blocks)
                .arg(&max_k)
                .arg(&log2_bs)
                .arg(&scale_log2)
                .arg(out);
            // SAFETY: the argument list is attn_prefill_hd128's (the same source as the
            // backend's launcher); every buffer holds what the 16 x 1,024 grid reads or writes.
            unsafe { b.launch(cfg) }.map_err(err("launch"))?;
            Ok(())
        };
        launch(&mut out)?;
        let got = to_f64(&stream.clone_dtoh(&out).map_err(err("download"))?);
        let rel = rel_l2(&got, &want);
        let mut times = Vec::new();
        for _ in 0..9 {
            let t0 = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err("event"))?;
            for _ in 0..10 {
                launch(&mut out)?;
            }
            let t1 = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err("event"))?;
            times.push(t0.elapsed_ms(&t1).map_err(err("elapsed"))? as f64 / 10.0);
        }
        let ms = median(times);
        rows.push(Row {
            what: format!("prefill {}", path.rsplit('/').next().unwrap_or(path)),
            ms,
            rate: format!("{:.0} TFLOP/s", flops / (ms * 1e-3) / 1e12),
            target: format!("vs backend output: rel {rel:.1e}"),
        });
    }
    Ok(())
}

/// Runs every check with `dev` as the backend under test; returns (checks run, failed).
/// Cases of more than `max_macs` multiply-adds are skipped (the `--cpu-only` dry run).
fn checks<D: Backend>(dev: &D, cpu: &CpuBackend, max_macs: f64) -> Result<(usize, usize)> {
    let mut rng = Rng(0x5eed);
    let (mut total, mut failed) = (0usize, 0usize);
    println!(
        "{:<8} {:<24} {:>10} {:>10} {:>10} {:>6}  result",
        "op", "case", "dev~cpu", "dev~f64", "cpu~f64", "nan"
    );
    let mut report = |op: &str, name: &str, o: &Outcome| {
        total += 1;
        let ok = o.passed();
        if !ok {
            failed += 1;
        }
        println!(
            "{op:<8} {name:<24} {:>10.2e} {:>10.2e} {:>10.2e} {:>6}  {}",
            o.gpu_cpu,
            o.gpu_ref,
            o.cpu_ref,
            o.nonfinite,
            if ok { "ok" } else { "FAIL" }
        );
    };
    for (i, c) in decode_cases(&mut rng).iter().enumerate() {
        if 2.0 * c.ctx.iter().sum::<usize>() as f64 * (c.nh * c.hd) as f64 > max_macs {
            continue;
        }
        let o = check_decode(dev, cpu, c, 1000 + i as u64)?;
        report("decode", &c.name, &o);
    }
    for (i, c) in prefill_cases(&mut rng).iter().enumerate() {
        let macs: f64 = c
            .lens
            .iter()
            .map(|&(lq, lk)| (lq * lk) as f64 * 2.0 * (c.nh * c.hd) as f64)
            .sum();
        if macs > max_macs {
            continue;
        }
        let o = check_prefill(dev, cpu, c, 2000 + i as u64)?;
        report("prefill", &c.name, &o);
    }
    // The check can fail: the same inputs with a softmax scale 10% off must be rejected.
    let c = DecodeCase {
        name: "wrong scale (must FAIL)".into(),
        ctx: vec![300, 77],
        nh: 16,
        nkv: 8,
        hd: 128,
        bs: 16,
        max_ctx: 300,
        q_scale: 2.0,
    };
    let mut x = decode_inputs(&c, 7);
    let reference = decode_reference(&c, &x);
    x.attn.scale *= 1.1;
    let err = rel_l2(&to_f64(&decode_on(dev, &c, &x)?), &reference);
    let rejected = err >= TOL;
    println!(
        "selftest {:<24} {:>10} {:>10.2e} {:>10} {:>6}  {}",
        c.name,
        "-",
        err,
        "-",
        "-",
        if rejected {
            "rejected (ok)"
        } else {
            "NOT REJECTED"
        }
    );
    total += 1;
    if !rejected {
        failed += 1;
    }
    Ok((total, failed))
}

fn run() -> Result<bool> {
    let args: Vec<String> = std::env::args().collect();
    let cpu = CpuBackend::new();
    if args.iter().any(|a| a == "--cpu-only") {
        // Dry run of the harness without a GPU: the CPU backend against itself and f64.
        let (total, failed) = checks(&cpu, &cpu, 2e8)?;
        println!("{} passed, {} failed", total - failed, failed);
        return Ok(failed == 0);
    }
    let gpu = CudaBackend::new(0)?;
    println!("device: {}", gpu.device_name()?);
    let (total, failed) = if args.iter().any(|a| a == "--bench-only") {
        (0, 0)
    } else {
        checks(&gpu, &cpu, f64::INFINITY)?
    };
    if total > 0 {
        println!("{} passed, {} failed", total - failed, failed);
    }

    if !args.iter().any(|a| a == "--no-bench") {
        let mut rows = Vec::new();
        bench(&gpu, &mut rows)?;
        let variants: Vec<String> = args
            .iter()
            .skip_while(|a| *a != "--prefill-variants")
            .skip(1)
            .cloned()
            .collect();
        if !variants.is_empty() {
            prefill_variants(&gpu, &variants, &mut rows)?;
        }
        println!("\nattention timings on {} (median)", gpu.device_name()?);
        println!("{:<32} {:>9}  {:<28} target", "what", "ms", "rate");
        for r in &rows {
            println!("{:<32} {:>9.4}  {:<28} {}", r.what, r.ms, r.rate, r.target);
        }
    }
    Ok(failed == 0)
}
