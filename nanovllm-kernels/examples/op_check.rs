//! op_check: every op of the CUDA backend against the CPU reference backend, over many shapes,
//! on fresh random inputs (the spirit of llama.cpp's `test-backend-ops`). Run on a GPU machine
//! (`scripts/gpu/ops.sh` does, after `scripts/gpu/stage.sh` built it here).
//!
//! For each case the same random inputs go to both backends, every output buffer is first
//! filled with a poison value (NaN for bf16, `u32::MAX` for tokens) and made a little longer
//! than the op's output, and afterwards:
//! * every element the op must write is checked to be written (no poison left),
//! * the slack past the end is checked to still hold the poison (nothing written beyond),
//! * the CUDA result is compared with the CPU one: relative L2 error `|gpu - cpu| / |cpu|`
//!   under a per-op tolerance for bf16 arithmetic, exact equality for copies and greedy
//!   sampling, and for sampled tokens equality on at least 99% of the rows.
//!
//! A fused op is also compared bit for bit with the CUDA backend's own run of the ops it
//! fuses, on the same inputs. The opt-in fused decode block (`decode_attention_rope`'s kernel,
//! `NANOVLLM_ATTN_ROPE`) is switched on here unless the variable is set.
//!
//! Prints one line per case (op, shape, error, tolerance, PASS/FAIL) and a summary, and exits
//! non-zero on any failure. `OP_CHECK_SEED=<n>` repeats a run's inputs; `OP_CHECK_FILTER=<s>`
//! runs only the ops whose name contains `s`; `OP_CHECK_MAX=<n>` skips cases whose largest
//! input holds more than `n` elements (quick runs, e.g. under compute-sanitizer).
//! `OP_CHECK_BREAK_SHARD=1` gives the sharded sampler a wrong column offset, to show that its
//! check fails.

use std::time::Instant;

use nanovllm_kernels::backend::decode_attention_rope_unfused;
use nanovllm_kernels::backend::Elem;
use nanovllm_kernels::cpu::{rope_cos_sin_cache, CpuBackend};
use nanovllm_kernels::cuda::{CudaBackend, GemmPolicy, GemmTuning, SKINNY_LIMIT};
use nanovllm_kernels::{bf16, AttnParams, Backend, SamplingBufs};
use nanovllm_utils::{Error, Result};

/// Elements of slack after each output, which must keep their poison.
const SLACK: usize = 19;

// ---------------------------------------------------------------- random inputs

/// SplitMix64: small, fast, and good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = self.f32().max(1e-7);
        let u2 = self.f32();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
    /// bf16 values uniform in [lo, hi), never exactly zero.
    fn bf16s(&mut self, len: usize, lo: f32, hi: f32) -> Vec<bf16> {
        (0..len)
            .map(|_| {
                let v = self.range(lo, hi);
                bf16::from_f32(if v == 0.0 { 1e-3 } else { v })
            })
            .collect()
    }
}

// ---------------------------------------------------------------- the harness

/// One output of an op as f32, with how many leading elements the op must have written.
struct Checked {
    name: &'static str,
    data: Vec<f32>,
    written: usize,
    /// The elements after `written` were poisoned and must still be.
    poisoned_tail: bool,
}

#[derive(Clone, Copy)]
enum Tol {
    /// Relative L2 error at most this.
    RelL2(f64),
    /// Bit-equal.
    Exact,
    /// Sampled tokens: equal on >= 99% of rows; rows flagged in the mask (greedy) always.
    Tokens,
}

impl Tol {
    fn show(self) -> String {
        match self {
            Tol::RelL2(t) => format!("{t:.0e}"),
            Tol::Exact => "exact".into(),
            Tol::Tokens => ">=99% rows".into(),
        }
    }
}

/// One check: an op at one shape.
trait Case {
    fn op(&self) -> &'static str;
    fn shape(&self) -> String;
    fn tol(&self) -> Tol;
    /// Elements of the case's largest input (for OP_CHECK_MAX).
    fn size(&self) -> usize;
    /// Runs the op on `b` with this case's inputs; returns the outputs to compare.
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>>;
    /// For Tol::Tokens: rows that must match exactly (greedy).
    fn exact_rows(&self) -> Vec<bool> {
        Vec::new()
    }
}

fn is_poison(v: f32) -> bool {
    v.is_nan() || v == u32::MAX as f32
}

struct Report {
    lines: Vec<(String, String, String, String, bool, String)>,
    max_size: usize,
}

impl Report {
    fn check<C: Case>(&mut self, cpu: &CpuBackend, gpu: &CudaBackend, c: &C) {
        if c.size() > self.max_size {
            return;
        }
        let t0 = Instant::now();
        let result = match (c.run(cpu), c.run(gpu)) {
            (Err(e), _) => (f64::NAN, false, format!("cpu error: {e}")),
            (_, Err(e)) => (f64::NAN, false, format!("cuda error: {e}")),
            (Ok(want), Ok(got)) => compare(&want, &got, c.tol(), &c.exact_rows()),
        };
        self.record(c.op(), c.shape(), c.tol(), result, t0);
    }

    /// Checks that the GPU computes `c`'s outputs bit for bit as it computes `reference`'s,
    /// the same inputs through other ops (a fused op against the ops it fuses).
    fn check_same<C: Case, R: Case>(&mut self, gpu: &CudaBackend, reference: &R, c: &C) {
        if c.size() > self.max_size {
            return;
        }
        let t0 = Instant::now();
        let result = match (reference.run(gpu), c.run(gpu)) {
            (Err(e), _) => (
                f64::NAN,
                false,
                format!("cuda error ({}): {e}", reference.op()),
            ),
            (_, Err(e)) => (f64::NAN, false, format!("cuda error: {e}")),
            (Ok(want), Ok(got)) => compare(&want, &got, Tol::Exact, &[]),
        };
        let shape = format!("{} = {}", c.shape(), reference.op());
        self.record(c.op(), shape, Tol::Exact, result, t0);
    }

    /// Prints and keeps one case's line.
    fn record(
        &mut self,
        op: &str,
        shape: String,
        tol: Tol,
        (err, pass, note): (f64, bool, String),
        t0: Instant,
    ) {
        let line = (
            op.to_string(),
            shape,
            if err.is_nan() {
                "-".into()
            } else {
                format!("{err:.2e}")
            },
            tol.show(),
            pass,
            note,
        );
        println!(
            "{:<18} {:<46} {:>9} {:>10} {}  {:.1}s {}",
            line.0,
            line.1,
            line.2,
            line.3,
            if pass { "PASS" } else { "FAIL" },
            t0.elapsed().as_secs_f64(),
            line.5
        );
        self.lines.push(line);
    }
}

/// (error, pass, note) of the CUDA outputs against the CPU ones.
fn compare(
    want: &[Checked],
    got: &[Checked],
    tol: Tol,
    exact_rows: &[bool],
) -> (f64, bool, String) {
    let mut worst = 0.0f64;
    for (w, g) in want.iter().zip(got) {
        if w.data.len() != g.data.len() {
            return (f64::NAN, false, format!("{}: lengths differ", w.name));
        }
        let (gw, ww) = (&g.data[..g.written], &w.data[..w.written]);
        if let Some(i) = gw.iter().position(|&v| is_poison(v)) {
            return (
                f64::NAN,
                false,
                format!("{}[{i}] not written (poison left)", g.name),
            );
        }
        if g.poisoned_tail {
            if let Some(i) = g.data[g.written..].iter().position(|&v| !is_poison(v)) {
                return (
                    f64::NAN,
                    false,
                    format!("{} written past its end at {}", g.name, g.written + i),
                );
            }
        }
        if ww.iter().any(|v| v.is_nan()) {
            return (
                f64::NAN,
                false,
                format!("{}: the CPU reference has NaN", w.name),
            );
        }
        match tol {
            Tol::RelL2(_) => {
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for (&a, &b) in gw.iter().zip(ww) {
                    let d = a as f64 - b as f64;
                    num += d * d;
                    den += b as f64 * b as f64;
                }
                let e = if den > 0.0 {
                    (num / den).sqrt()
                } else {
                    num.sqrt()
                };
                worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
            }
            Tol::Exact => {
                let bad = gw
                    .iter()
                    .zip(ww)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                if bad > 0 {
                    let i = gw
                        .iter()
                        .zip(ww)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    let i = i.unwrap_or(0);
                    return (
                        bad as f64 / gw.len() as f64,
                        false,
                        format!(
                            "{}: {bad} differ, first [{i}] {} vs {}",
                            g.name, gw[i], ww[i]
                        ),
                    );
                }
            }
            Tol::Tokens => {
                let mut bad = 0usize;
                for (r, (a, b)) in gw.iter().zip(ww).enumerate() {
                    if a != b {
                        if exact_rows.get(r).copied().unwrap_or(false) {
                            return (
                                f64::NAN,
                                false,
                                format!("greedy row {r}: cuda {a} vs cpu {b}"),
                            );
                        }
                        bad += 1;
                    }
                }
                let frac = bad as f64 / gw.len().max(1) as f64;
                worst = worst.max(frac);
                if bad > gw.len() / 100 {
                    return (frac, false, format!("{bad} of {} rows differ", gw.len()));
                }
            }
        }
    }
    let pass = match tol {
        Tol::RelL2(t) => worst <= t,
        _ => true,
    };
    (worst, pass, String::new())
}

// ---------------------------------------------------------------- buffer helpers

fn up<B: Backend, T: Elem>(b: &B, v: &[T]) -> Result<B::Buf<T>> {
    b.from_host(v)
}

fn down<B: Backend, T: Elem>(b: &B, buf: &B::Buf<T>) -> Result<Vec<T>> {
    let mut v = vec![T::default(); b.len(buf)];
    b.dtoh(buf, &mut v)?;
    Ok(v)
}

/// A bf16 output of `len` elements plus the slack, all NaN.
fn poisoned<B: Backend>(b: &B, len: usize) -> Result<B::Buf<bf16>> {
    b.from_host(&vec![bf16::NAN; len + SLACK])
}

fn out_bf16<B: Backend>(
    b: &B,
    name: &'static str,
    buf: &B::Buf<bf16>,
    written: usize,
) -> Result<Checked> {
    Ok(Checked {
        name,
        data: down(b, buf)?.into_iter().map(f32::from).collect(),
        written,
        poisoned_tail: true,
    })
}

/// A whole bf16 buffer that started with (random) data rather than poison.
fn full_bf16<B: Backend>(b: &B, name: &'static str, buf: &B::Buf<bf16>) -> Result<Checked> {
    let data: Vec<f32> = down(b, buf)?.into_iter().map(f32::from).collect();
    let written = data.len();
    Ok(Checked {
        name,
        data,
        written,
        poisoned_tail: false,
    })
}

// ---------------------------------------------------------------- the cases

struct Embedding {
    n: usize,
    hidden: usize,
    vocab_start: usize,
    vocab_rows: usize,
    ids: Vec<u32>,
    weight: Vec<bf16>,
}

impl Embedding {
    fn new(rng: &mut Rng, n: usize, hidden: usize, vocab_start: usize, vocab_rows: usize) -> Self {
        // Ids also fall outside the shard (below and above), which must give zero rows.
        let span = vocab_start + vocab_rows + 50;
        Embedding {
            n,
            hidden,
            vocab_start,
            vocab_rows,
            ids: (0..n).map(|_| rng.below(span) as u32).collect(),
            weight: rng.bf16s(vocab_rows * hidden, -1.0, 1.0),
        }
    }
}

impl Case for Embedding {
    fn size(&self) -> usize {
        self.weight.len().max(self.n * self.hidden)
    }
    fn op(&self) -> &'static str {
        "embedding"
    }
    fn shape(&self) -> String {
        format!(
            "n={} h={} shard={}+{}",
            self.n, self.hidden, self.vocab_start, self.vocab_rows
        )
    }
    fn tol(&self) -> Tol {
        Tol::Exact
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let ids = up(b, &self.ids)?;
        let w = up(b, &self.weight)?;
        let mut out = poisoned(b, self.n * self.hidden)?;
        b.embedding(
            &ids,
            self.n,
            &w,
            self.vocab_start,
            self.vocab_rows,
            self.hidden,
            &mut out,
        )?;
        Ok(vec![out_bf16(b, "out", &out, self.n * self.hidden)?])
    }
}

struct RmsNorm {
    n: usize,
    hidden: usize,
    fused: bool,
    x: Vec<bf16>,
    residual: Vec<bf16>,
    weight: Vec<bf16>,
}

impl RmsNorm {
    fn new(rng: &mut Rng, n: usize, hidden: usize, fused: bool) -> Self {
        RmsNorm {
            n,
            hidden,
            fused,
            x: rng.bf16s(n * hidden, -2.0, 2.0),
            residual: if fused {
                rng.bf16s(n * hidden, -4.0, 4.0)
            } else {
                Vec::new()
            },
            weight: rng.bf16s(hidden, 0.5, 1.5),
        }
    }
}

impl Case for RmsNorm {
    fn size(&self) -> usize {
        self.x.len()
    }
    fn op(&self) -> &'static str {
        if self.fused {
            "add_rms_norm"
        } else {
            "rms_norm"
        }
    }
    fn shape(&self) -> String {
        format!("n={} h={}", self.n, self.hidden)
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let len = self.n * self.hidden;
        let w = up(b, &self.weight)?;
        let eps = 1e-6;
        if self.fused {
            let mut x = up(b, &self.x)?;
            let mut r = up(b, &self.residual)?;
            b.add_rms_norm(&mut x, &mut r, &w, self.n, self.hidden, eps)?;
            Ok(vec![full_bf16(b, "x", &x)?, full_bf16(b, "residual", &r)?])
        } else {
            let x = up(b, &self.x)?;
            let mut out = poisoned(b, len)?;
            b.rms_norm(&x, &w, self.n, self.hidden, eps, &mut out)?;
            Ok(vec![out_bf16(b, "out", &out, len)?])
        }
    }
}

fn attn_params(nh: usize, nkv: usize, d: usize, block_size: usize, mbps: usize) -> AttnParams {
    AttnParams {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size,
        max_blocks_per_seq: mbps,
        scale: 1.0 / (d as f32).sqrt(),
    }
}

struct QkNormRope {
    n: usize,
    attn: AttnParams,
    max_pos: usize,
    qkv: Vec<bf16>,
    q_norm: Vec<bf16>,
    k_norm: Vec<bf16>,
    positions: Vec<i32>,
    cos_sin: Vec<f32>,
}

impl QkNormRope {
    fn new(rng: &mut Rng, n: usize, nh: usize, nkv: usize, d: usize) -> Self {
        let attn = attn_params(nh, nkv, d, 256, 1);
        let max_pos = 40_960;
        QkNormRope {
            n,
            attn,
            max_pos,
            qkv: rng.bf16s(n * attn.qkv_width(), -3.0, 3.0),
            q_norm: rng.bf16s(d, 0.5, 1.5),
            k_norm: rng.bf16s(d, 0.5, 1.5),
            positions: (0..n).map(|_| rng.below(max_pos) as i32).collect(),
            cos_sin: rope_cos_sin_cache(d, max_pos, 1_000_000.0).expect("valid rope table"),
        }
    }
}

impl Case for QkNormRope {
    fn size(&self) -> usize {
        self.qkv.len().max(self.cos_sin.len())
    }
    fn op(&self) -> &'static str {
        "qk_norm_rope"
    }
    fn shape(&self) -> String {
        let a = &self.attn;
        format!(
            "n={} heads={}/{} d={}",
            self.n, a.num_heads, a.num_kv_heads, a.head_dim
        )
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let mut qkv = up(b, &self.qkv)?;
        let (qn, kn) = (up(b, &self.q_norm)?, up(b, &self.k_norm)?);
        let pos = up(b, &self.positions)?;
        let cs = up(b, &self.cos_sin)?;
        let _ = self.max_pos;
        b.qk_norm_rope(&mut qkv, self.n, &self.attn, &qn, &kn, 1e-6, &pos, &cs)?;
        Ok(vec![full_bf16(b, "qkv", &qkv)?])
    }
}

struct StoreKv {
    n: usize,
    attn: AttnParams,
    slots: usize,
    qkv: Vec<bf16>,
    slot_mapping: Vec<i32>,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
}

impl StoreKv {
    fn new(rng: &mut Rng, n: usize, nh: usize, nkv: usize, d: usize, block_size: usize) -> Self {
        let attn = attn_params(nh, nkv, d, block_size, 1);
        let slots = (n + n / 3 + 5).div_ceil(block_size) * block_size;
        // Distinct slots (a random permutation prefix), every seventh token skipped.
        let mut perm: Vec<i32> = (0..slots as i32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let slot_mapping = (0..n)
            .map(|i| if i % 7 == 3 { -1 } else { perm[i] })
            .collect();
        let kv = slots * nkv * d;
        StoreKv {
            n,
            attn,
            slots,
            qkv: rng.bf16s(n * attn.qkv_width(), -3.0, 3.0),
            slot_mapping,
            k_cache: rng.bf16s(kv, -1.0, 1.0),
            v_cache: rng.bf16s(kv, -1.0, 1.0),
        }
    }
}

impl Case for StoreKv {
    fn size(&self) -> usize {
        self.k_cache.len().max(self.qkv.len())
    }
    fn op(&self) -> &'static str {
        "store_kvcache"
    }
    fn shape(&self) -> String {
        let a = &self.attn;
        format!(
            "n={} kv_heads={} d={} bs={} slots={}",
            self.n, a.num_kv_heads, a.head_dim, a.block_size, self.slots
        )
    }
    fn tol(&self) -> Tol {
        Tol::Exact
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let qkv = up(b, &self.qkv)?;
        let sm = up(b, &self.slot_mapping)?;
        let mut kc = up(b, &self.k_cache)?;
        let mut vc = up(b, &self.v_cache)?;
        b.store_kvcache(&qkv, self.n, &self.attn, &sm, &mut kc, &mut vc)?;
        Ok(vec![
            full_bf16(b, "k_cache", &kc)?,
            full_bf16(b, "v_cache", &vc)?,
        ])
    }
}

/// `qk_norm_rope_store`, or (`separate`) the `qk_norm_rope` then `store_kvcache` it fuses, on
/// the same inputs: rows with slot -1 (every fifth from row 1) are rotated but not stored.
#[derive(Clone)]
struct QkvStore {
    n: usize,
    attn: AttnParams,
    slots: usize,
    separate: bool,
    qkv: Vec<bf16>,
    q_norm: Vec<bf16>,
    k_norm: Vec<bf16>,
    positions: Vec<i32>,
    cos_sin: Vec<f32>,
    slot_mapping: Vec<i32>,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
}

impl QkvStore {
    fn new(rng: &mut Rng, n: usize, nh: usize, nkv: usize, d: usize, block_size: usize) -> Self {
        let attn = attn_params(nh, nkv, d, block_size, 1);
        let max_pos = 40_960;
        let slots = (n + n / 3 + 5).div_ceil(block_size) * block_size;
        let mut perm: Vec<i32> = (0..slots as i32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let kv = slots * nkv * d;
        QkvStore {
            n,
            attn,
            slots,
            separate: false,
            qkv: rng.bf16s(n * attn.qkv_width(), -3.0, 3.0),
            q_norm: rng.bf16s(d, 0.5, 1.5),
            k_norm: rng.bf16s(d, 0.5, 1.5),
            positions: (0..n).map(|_| rng.below(max_pos) as i32).collect(),
            cos_sin: rope_cos_sin_cache(d, max_pos, 1_000_000.0).expect("valid rope table"),
            slot_mapping: (0..n)
                .map(|i| if i % 5 == 1 { -1 } else { perm[i] })
                .collect(),
            k_cache: rng.bf16s(kv, -1.0, 1.0),
            v_cache: rng.bf16s(kv, -1.0, 1.0),
        }
    }
}

impl Case for QkvStore {
    fn size(&self) -> usize {
        self.qkv
            .len()
            .max(self.cos_sin.len())
            .max(self.k_cache.len())
    }
    fn op(&self) -> &'static str {
        if self.separate {
            "qk_norm_rope+store_kvcache"
        } else {
            "qk_norm_rope_store"
        }
    }
    fn shape(&self) -> String {
        let a = &self.attn;
        format!(
            "n={} heads={}/{} d={} slots={}",
            self.n, a.num_heads, a.num_kv_heads, a.head_dim, self.slots
        )
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let mut qkv = up(b, &self.qkv)?;
        let (qn, kn) = (up(b, &self.q_norm)?, up(b, &self.k_norm)?);
        let pos = up(b, &self.positions)?;
        let cs = up(b, &self.cos_sin)?;
        let sm = up(b, &self.slot_mapping)?;
        let mut kc = up(b, &self.k_cache)?;
        let mut vc = up(b, &self.v_cache)?;
        let (n, a) = (self.n, &self.attn);
        if self.separate {
            b.qk_norm_rope(&mut qkv, n, a, &qn, &kn, 1e-6, &pos, &cs)?;
            b.store_kvcache(&qkv, n, a, &sm, &mut kc, &mut vc)?;
        } else {
            b.qk_norm_rope_store(
                &mut qkv, n, a, &qn, &kn, 1e-6, &pos, &cs, &sm, &mut kc, &mut vc,
            )?;
        }
        Ok(vec![
            full_bf16(b, "qkv", &qkv)?,
            full_bf16(b, "k_cache", &kc)?,
            full_bf16(b, "v_cache", &vc)?,
        ])
    }
}

struct SiluMul {
    n: usize,
    inter: usize,
    gate_up: Vec<bf16>,
}

impl Case for SiluMul {
    fn size(&self) -> usize {
        self.gate_up.len()
    }
    fn op(&self) -> &'static str {
        "silu_and_mul"
    }
    fn shape(&self) -> String {
        format!("n={} inter={}", self.n, self.inter)
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let gu = up(b, &self.gate_up)?;
        let mut out = poisoned(b, self.n * self.inter)?;
        b.silu_and_mul(&gu, self.n, self.inter, &mut out)?;
        Ok(vec![out_bf16(b, "out", &out, self.n * self.inter)?])
    }
}

struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    x: Vec<bf16>,
    w: Vec<bf16>,
    /// The CUDA GEMM policy the case runs under (see `gemm_policies`), for the report.
    path: &'static str,
    tol: f64,
}

impl Gemm {
    fn new(rng: &mut Rng, m: usize, n: usize, k: usize) -> Self {
        Self::on_path(rng, m, n, k, "default", 1e-2)
    }

    fn on_path(rng: &mut Rng, m: usize, n: usize, k: usize, path: &'static str, tol: f64) -> Self {
        let s = 1.0 / (k as f32).sqrt();
        Gemm {
            m,
            n,
            k,
            x: rng.bf16s(m * k, -1.0, 1.0),
            w: rng.bf16s(n * k, -s, s),
            path,
            tol,
        }
    }
}

/// The GEMM policies op_check runs its path cases under: each path of `CudaBackend::gemm`
/// forced on, whatever the default picks.
fn gemm_policies() -> [(&'static str, GemmPolicy); 3] {
    [
        (
            "skinny",
            GemmPolicy {
                skinny_max_m: SKINNY_LIMIT,
                tuning: GemmTuning::All,
            },
        ),
        (
            "cublaslt tuned",
            GemmPolicy {
                skinny_max_m: 0,
                tuning: GemmTuning::All,
            },
        ),
        (
            "cublaslt heuristic",
            GemmPolicy {
                skinny_max_m: 0,
                tuning: GemmTuning::Off,
            },
        ),
    ]
}

impl Case for Gemm {
    fn size(&self) -> usize {
        (self.m * self.n).max(self.w.len()).max(self.x.len())
    }
    fn op(&self) -> &'static str {
        "gemm"
    }
    fn shape(&self) -> String {
        format!("m={} n={} k={} [{}]", self.m, self.n, self.k, self.path)
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(self.tol)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let x = up(b, &self.x)?;
        let w = up(b, &self.w)?;
        let mut out = poisoned(b, self.m * self.n)?;
        b.gemm(&x, &w, self.m, self.n, self.k, &mut out)?;
        Ok(vec![out_bf16(b, "out", &out, self.m * self.n)?])
    }
}

/// The MLP's activation and down projection in one call: on CUDA one fused skinny kernel for
/// m <= 8 (k % 8 == 0), silu_and_mul + gemm otherwise.
struct SiluMulGemm {
    m: usize,
    n: usize,
    k: usize,
    gate_up: Vec<bf16>,
    w: Vec<bf16>,
}

impl SiluMulGemm {
    fn new(rng: &mut Rng, m: usize, n: usize, k: usize) -> Self {
        let s = 1.0 / (k as f32).sqrt();
        SiluMulGemm {
            m,
            n,
            k,
            gate_up: rng.bf16s(m * 2 * k, -4.0, 4.0),
            w: rng.bf16s(n * k, -s, s),
        }
    }
}

impl Case for SiluMulGemm {
    fn size(&self) -> usize {
        (self.m * self.n).max(self.w.len()).max(self.gate_up.len())
    }
    fn op(&self) -> &'static str {
        "silu_and_mul_gemm"
    }
    fn shape(&self) -> String {
        format!("m={} n={} k={}", self.m, self.n, self.k)
    }
    fn tol(&self) -> Tol {
        // The activation may round to a neighbouring bf16 here and there (fast exponential
        // and division against the CPU's exact ones); a dropped k tile or row shows as 1e-1.
        Tol::RelL2(5e-3)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let gu = up(b, &self.gate_up)?;
        let w = up(b, &self.w)?;
        let mut act = poisoned(b, self.m * self.k)?;
        let mut out = poisoned(b, self.m * self.n)?;
        b.silu_and_mul_gemm(&gu, &w, self.m, self.n, self.k, &mut act, &mut out)?;
        Ok(vec![out_bf16(b, "out", &out, self.m * self.n)?])
    }
}

struct Gather {
    n: usize,
    width: usize,
    x: Vec<bf16>,
    indices: Vec<i32>,
}

impl Case for Gather {
    fn size(&self) -> usize {
        self.x.len()
    }
    fn op(&self) -> &'static str {
        "gather_rows"
    }
    fn shape(&self) -> String {
        format!(
            "n={} of {} rows, w={}",
            self.n,
            self.x.len() / self.width,
            self.width
        )
    }
    fn tol(&self) -> Tol {
        Tol::Exact
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let x = up(b, &self.x)?;
        let idx = up(b, &self.indices)?;
        let mut out = poisoned(b, self.n * self.width)?;
        b.gather_rows(&x, &idx, self.n, self.width, &mut out)?;
        Ok(vec![out_bf16(b, "out", &out, self.n * self.width)?])
    }
}

struct Sample {
    label: &'static str,
    rows: usize,
    vocab: usize,
    logits: Vec<bf16>,
    temperatures: Vec<f32>,
    top_k: Vec<i32>,
    top_p: Vec<f32>,
    seeds: Vec<u64>,
    steps: Vec<u32>,
}

impl Sample {
    /// `mix`: "greedy", "gumbel" (T = 0.6, no cut), "mixed" (rows cycle through greedy,
    /// plain temperature, top-k, top-p, and both), or "ties" (as mixed, with the logits
    /// rounded to multiples of 8: thousands of equal logits at every cut). `peaked` adds a few
    /// dominant logits per row (a trained model's shape) to the normal noise.
    fn new(rng: &mut Rng, rows: usize, vocab: usize, mix: &'static str, peaked: bool) -> Self {
        let mut logits = Vec::with_capacity(rows * vocab);
        let round = |x: f32| {
            if mix == "ties" {
                (x / 8.0).round() * 8.0
            } else {
                x
            }
        };
        for _ in 0..rows {
            let start = logits.len();
            logits.extend((0..vocab).map(|_| bf16::from_f32(round(2.0 * rng.normal()))));
            if peaked {
                for _ in 0..5 {
                    let i = start + rng.below(vocab);
                    logits[i] = bf16::from_f32(12.0 + 4.0 * rng.f32());
                }
            }
        }
        let (mut temperatures, mut top_k, mut top_p) = (vec![], vec![], vec![]);
        for r in 0..rows {
            let (t, k, p) = match (mix, r % 6) {
                ("greedy", _) => (0.0, 0, 1.0),
                ("gumbel", _) => (0.6, 0, 1.0),
                (_, 0) => (0.0, 0, 1.0),
                (_, 1) => (0.6, 0, 1.0),
                (_, 2) => (0.8, [1, 20, 50, 1000][r / 6 % 4], 1.0),
                (_, 3) => (1.0, 0, [0.5, 0.9, 0.99][r / 6 % 3]),
                (_, 4) => (0.7, 40, 0.8),
                _ => (1.3, -1, 0.95),
            };
            temperatures.push(t);
            top_k.push(k);
            top_p.push(p);
        }
        Sample {
            label: mix,
            rows,
            vocab,
            logits,
            temperatures,
            top_k,
            top_p,
            seeds: (0..rows).map(|_| rng.next_u64()).collect(),
            steps: (0..rows).map(|_| rng.below(5000) as u32).collect(),
        }
    }
}

/// A [`Sample`]'s parameters on a backend.
struct ParamBufs<B: Backend> {
    temperatures: B::Buf<f32>,
    top_k: B::Buf<i32>,
    top_p: B::Buf<f32>,
    seeds: B::Buf<u64>,
    steps: B::Buf<u32>,
}

impl<B: Backend> ParamBufs<B> {
    fn view(&self) -> SamplingBufs<'_, B> {
        SamplingBufs {
            temperatures: &self.temperatures,
            top_k: &self.top_k,
            top_p: &self.top_p,
            seeds: &self.seeds,
            steps: &self.steps,
        }
    }
}

impl Sample {
    fn upload_params<B: Backend>(&self, b: &B) -> Result<ParamBufs<B>> {
        Ok(ParamBufs {
            temperatures: up(b, &self.temperatures)?,
            top_k: up(b, &self.top_k)?,
            top_p: up(b, &self.top_p)?,
            seeds: up(b, &self.seeds)?,
            steps: up(b, &self.steps)?,
        })
    }
}

impl Case for Sample {
    fn size(&self) -> usize {
        self.logits.len()
    }
    fn op(&self) -> &'static str {
        "sample"
    }
    fn shape(&self) -> String {
        format!("{} x {} {}", self.rows, self.vocab, self.label)
    }
    fn tol(&self) -> Tol {
        Tol::Tokens
    }
    fn exact_rows(&self) -> Vec<bool> {
        self.temperatures.iter().map(|&t| t == 0.0).collect()
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let logits = up(b, &self.logits)?;
        let bufs = self.upload_params(b)?;
        let params = bufs.view();
        let mut out = b.from_host(&vec![u32::MAX; self.rows + SLACK])?;
        b.sample(&logits, self.rows, self.vocab, &params, &mut out)?;
        Ok(vec![Checked {
            name: "tokens",
            data: down(b, &out)?.into_iter().map(|v| v as f32).collect(),
            written: self.rows,
            poisoned_tail: true,
        }])
    }
}

/// Sampling rows split by columns over `ranks` ranks (tensor parallelism): each slice through
/// `sample_shard`, the parts through `sample_combine`. The rows carry no top-k / top-p cut (the
/// sharded path takes none); the mixes cycle through greedy and three temperatures. On each
/// backend the combined tokens must equal that backend's `sample` of the whole rows exactly
/// (else the case errors); the tokens are then compared across backends as `sample`'s are.
struct SampleShard {
    whole: Sample,
    ranks: usize,
}

impl SampleShard {
    fn new(
        rng: &mut Rng,
        rows: usize,
        vocab: usize,
        ties: bool,
        peaked: bool,
        ranks: usize,
    ) -> Self {
        let mut whole = Sample::new(
            rng,
            rows,
            vocab,
            if ties { "ties" } else { "gumbel" },
            peaked,
        );
        for r in 0..rows {
            whole.temperatures[r] = [0.0, 0.6, 1.0, 1.3][r % 4];
            whole.top_k[r] = 0;
            whole.top_p[r] = 1.0;
        }
        SampleShard { whole, ranks }
    }
}

impl Case for SampleShard {
    fn size(&self) -> usize {
        self.whole.size()
    }
    fn op(&self) -> &'static str {
        "sample_shard"
    }
    fn shape(&self) -> String {
        format!("{} over {} ranks", self.whole.shape(), self.ranks)
    }
    fn tol(&self) -> Tol {
        Tol::Tokens
    }
    fn exact_rows(&self) -> Vec<bool> {
        self.whole.exact_rows()
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let w = &self.whole;
        let want = &self.whole.run(b)?[0].data;
        let width = w.vocab / self.ranks;
        let bufs = w.upload_params(b)?;
        let params = bufs.view();
        let mut parts = b.from_host(&vec![u32::MAX; self.ranks * 2 * w.rows])?;
        for q in 0..self.ranks {
            let slice: Vec<bf16> = w
                .logits
                .chunks(w.vocab)
                .flat_map(|row| row[q * width..(q + 1) * width].iter().copied())
                .collect();
            let slice = up(b, &slice)?;
            // OP_CHECK_BREAK_SHARD=1 shows that this check catches a wrong column offset.
            let skew = if q > 0 && std::env::var_os("OP_CHECK_BREAK_SHARD").is_some() {
                8
            } else {
                0
            };
            b.sample_shard(
                &slice,
                w.rows,
                width,
                q * width + skew,
                &params,
                &mut parts,
                q,
            )?;
        }
        let mut out = b.from_host(&vec![u32::MAX; w.rows + SLACK])?;
        b.sample_combine(&parts, w.rows, self.ranks, &mut out)?;
        let got: Vec<f32> = down(b, &out)?.into_iter().map(|v| v as f32).collect();
        if got[..w.rows] != want[..w.rows] {
            let r = (0..w.rows).find(|&r| got[r] != want[r]).unwrap_or(0);
            return Err(Error::Other(format!(
                "sharded sampling differs from whole rows at row {r}: {} vs {}",
                got[r], want[r]
            )));
        }
        Ok(vec![Checked {
            name: "tokens",
            data: got,
            written: w.rows,
            poisoned_tail: true,
        }])
    }
}

/// A paged KV cache filled with random values, and block tables into it.
#[derive(Clone)]
struct Paged {
    attn: AttnParams,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
    block_tables: Vec<i32>,
}

impl Paged {
    /// Tables for sequences of `lens` tokens over a cache of about `pool` blocks; sequences
    /// may share blocks (as prefix caching does), entries past a sequence's end are -1. Rows
    /// are wide enough for `min_len` tokens too (as a CUDA graph's tables are for the model's
    /// length).
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        lens: &[usize],
        nh: usize,
        nkv: usize,
        d: usize,
        bs: usize,
        pool: usize,
        min_len: usize,
    ) -> Self {
        let longest = lens.iter().copied().max().unwrap_or(0).max(min_len);
        let mbps = longest.div_ceil(bs).max(1) + 1;
        let num_blocks = pool.max(mbps);
        let mut block_tables = vec![-1i32; lens.len() * mbps];
        for (s, &l) in lens.iter().enumerate() {
            for j in 0..l.div_ceil(bs) {
                block_tables[s * mbps + j] = rng.below(num_blocks) as i32;
            }
        }
        let kv = num_blocks * bs * nkv * d;
        Paged {
            attn: attn_params(nh, nkv, d, bs, mbps),
            k_cache: rng.bf16s(kv, -1.0, 1.0),
            v_cache: rng.bf16s(kv, -1.0, 1.0),
            block_tables,
        }
    }
}

#[derive(Clone)]
struct Decode {
    ctx: Vec<usize>,
    /// The max_context_len passed: the longest context, or more (a graph captured for the
    /// model's length passes that).
    max_ctx: usize,
    paged: Paged,
    qkv: Vec<bf16>,
}

impl Decode {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        ctx: Vec<usize>,
        nh: usize,
        nkv: usize,
        d: usize,
        bs: usize,
        pool: usize,
        graph_len: usize,
    ) -> Self {
        let max_ctx = ctx.iter().copied().max().unwrap_or(0).max(graph_len);
        let paged = Paged::new(rng, &ctx, nh, nkv, d, bs, pool, max_ctx);
        let qkv = rng.bf16s(ctx.len() * paged.attn.qkv_width(), -2.0, 2.0);
        Decode {
            ctx,
            max_ctx,
            paged,
            qkv,
        }
    }
}

fn describe_lens(lens: &[usize]) -> String {
    let (min, max) = (
        lens.iter().min().copied().unwrap_or(0),
        lens.iter().max().copied().unwrap_or(0),
    );
    if min == max {
        format!("{}x{}", lens.len(), max)
    } else {
        format!("{} of {}..{}", lens.len(), min, max)
    }
}

impl Case for Decode {
    fn size(&self) -> usize {
        self.paged.k_cache.len()
    }
    fn op(&self) -> &'static str {
        "decode_attention"
    }
    fn shape(&self) -> String {
        let a = &self.paged.attn;
        format!(
            "ctx {} (max {}) h={}/{} d={} bs={}",
            describe_lens(&self.ctx),
            self.max_ctx,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            a.block_size
        )
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let a = &self.paged.attn;
        let qkv = up(b, &self.qkv)?;
        let kc = up(b, &self.paged.k_cache)?;
        let vc = up(b, &self.paged.v_cache)?;
        let lens: Vec<i32> = self.ctx.iter().map(|&c| c as i32).collect();
        let cl = up(b, &lens)?;
        let bt = up(b, &self.paged.block_tables)?;
        let len = self.ctx.len() * a.num_heads * a.head_dim;
        let mut out = poisoned(b, len)?;
        b.decode_attention(
            &qkv,
            &kc,
            &vc,
            &cl,
            &bt,
            self.ctx.len(),
            self.max_ctx,
            a,
            &mut out,
        )?;
        Ok(vec![out_bf16(b, "out", &out, len)?])
    }
}

/// A decode step's attention block after its QKV projection: `decode_attention_rope` (`fused`),
/// or the `qk_norm_rope_store` + `decode_attention` it stands for, on the same inputs. As in
/// the engine, each sequence's last block (where its new token goes, at position `ctx - 1`)
/// belongs to it alone; padding rows (no context) and every ninth sequence store nothing
/// (slot -1), so their last cache row is the old one.
#[derive(Clone)]
struct DecodeRope {
    decode: Decode,
    q_norm: Vec<bf16>,
    k_norm: Vec<bf16>,
    positions: Vec<i32>,
    cos_sin: Vec<f32>,
    slot_mapping: Vec<i32>,
    fused: bool,
}

impl DecodeRope {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        ctx: Vec<usize>,
        nh: usize,
        nkv: usize,
        d: usize,
        bs: usize,
        pool: usize,
        graph_len: usize,
    ) -> Self {
        let mut decode = Decode::new(rng, ctx, nh, nkv, d, bs, pool, graph_len);
        let paged = &mut decode.paged;
        let row = nkv * d;
        let first_private = paged.k_cache.len() / (bs * row);
        let mbps = paged.attn.max_blocks_per_seq;
        let n = decode.ctx.len();
        let mut slot_mapping = vec![-1i32; n];
        for (s, &c) in decode.ctx.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let block = first_private + s;
            paged.block_tables[s * mbps + (c - 1) / bs] = block as i32;
            if s % 9 != 4 {
                slot_mapping[s] = (block * bs + (c - 1) % bs) as i32;
            }
        }
        paged.k_cache.extend(rng.bf16s(n * bs * row, -1.0, 1.0));
        paged.v_cache.extend(rng.bf16s(n * bs * row, -1.0, 1.0));
        let max_pos = 40_960;
        DecodeRope {
            positions: decode.ctx.iter().map(|&c| c.max(1) as i32 - 1).collect(),
            decode,
            q_norm: rng.bf16s(d, 0.5, 1.5),
            k_norm: rng.bf16s(d, 0.5, 1.5),
            cos_sin: rope_cos_sin_cache(d, max_pos, 1_000_000.0).expect("valid rope table"),
            slot_mapping,
            fused: true,
        }
    }
}

impl Case for DecodeRope {
    fn size(&self) -> usize {
        self.decode.size()
    }
    fn op(&self) -> &'static str {
        if self.fused {
            "decode_attention_rope"
        } else {
            "qk_norm_rope_store+decode_attention"
        }
    }
    fn shape(&self) -> String {
        self.decode.shape()
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let d = &self.decode;
        let a = &d.paged.attn;
        let mut qkv = up(b, &d.qkv)?;
        let mut kc = up(b, &d.paged.k_cache)?;
        let mut vc = up(b, &d.paged.v_cache)?;
        let lens: Vec<i32> = d.ctx.iter().map(|&c| c as i32).collect();
        let cl = up(b, &lens)?;
        let bt = up(b, &d.paged.block_tables)?;
        let sm = up(b, &self.slot_mapping)?;
        let (qn, kn) = (up(b, &self.q_norm)?, up(b, &self.k_norm)?);
        let pos = up(b, &self.positions)?;
        let cs = up(b, &self.cos_sin)?;
        let rope = nanovllm_kernels::QkNormRope {
            q_norm: &qn,
            k_norm: &kn,
            eps: 1e-6,
            positions: &pos,
            cos_sin: &cs,
        };
        let n = d.ctx.len();
        let len = n * a.num_heads * a.head_dim;
        let mut out = poisoned(b, len)?;
        if self.fused {
            b.decode_attention_rope(
                &mut qkv, &rope, &sm, &mut kc, &mut vc, &cl, &bt, n, d.max_ctx, a, &mut out,
            )?;
        } else {
            decode_attention_rope_unfused(
                b,
                &mut qkv,
                &rope,
                &sm,
                (&mut kc, &mut vc),
                (&cl, &bt),
                n,
                d.max_ctx,
                a,
                &mut out,
            )?;
        }
        Ok(vec![
            out_bf16(b, "out", &out, len)?,
            full_bf16(b, "k_cache", &kc)?,
            full_bf16(b, "v_cache", &vc)?,
        ])
    }
}

struct Prefill {
    /// (len_q, len_k) per sequence.
    seqs: Vec<(usize, usize)>,
    paged: Paged,
    qkv: Vec<bf16>,
}

impl Prefill {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        seqs: Vec<(usize, usize)>,
        nh: usize,
        nkv: usize,
        d: usize,
        bs: usize,
    ) -> Self {
        let lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
        let pool = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
        let paged = Paged::new(rng, &lens, nh, nkv, d, bs, pool, 0);
        let total_q: usize = seqs.iter().map(|s| s.0).sum();
        let qkv = rng.bf16s(total_q * paged.attn.qkv_width(), -2.0, 2.0);
        Prefill { seqs, paged, qkv }
    }
}

impl Case for Prefill {
    fn size(&self) -> usize {
        self.paged.k_cache.len().max(self.qkv.len())
    }
    fn op(&self) -> &'static str {
        "prefill_attention"
    }
    fn shape(&self) -> String {
        let a = &self.paged.attn;
        let q: Vec<usize> = self.seqs.iter().map(|s| s.0).collect();
        let k: Vec<usize> = self.seqs.iter().map(|s| s.1).collect();
        format!(
            "q {} k {} h={}/{} d={} bs={}",
            describe_lens(&q),
            describe_lens(&k),
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            a.block_size
        )
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let a = &self.paged.attn;
        let (mut cq, mut ck) = (vec![0i32], vec![0i32]);
        for &(q, k) in &self.seqs {
            cq.push(cq[cq.len() - 1] + q as i32);
            ck.push(ck[ck.len() - 1] + k as i32);
        }
        let total_q = *cq.last().unwrap_or(&0) as usize;
        let qkv = up(b, &self.qkv)?;
        let kc = up(b, &self.paged.k_cache)?;
        let vc = up(b, &self.paged.v_cache)?;
        let (cuq, cuk) = (up(b, &cq)?, up(b, &ck)?);
        let bt = up(b, &self.paged.block_tables)?;
        let len = total_q * a.num_heads * a.head_dim;
        let mut out = poisoned(b, len)?;
        let max_q = self.seqs.iter().map(|s| s.0).max().unwrap_or(0);
        let max_k = self.seqs.iter().map(|s| s.1).max().unwrap_or(0);
        b.prefill_attention(
            &qkv,
            &kc,
            &vc,
            &cuq,
            &cuk,
            &bt,
            self.seqs.len(),
            max_q,
            max_k,
            a,
            &mut out,
        )?;
        Ok(vec![out_bf16(b, "out", &out, len)?])
    }
}

/// A CUDA graph of rms_norm -> gemm -> silu_and_mul captured once, then replayed on new
/// inputs copied into the same buffers; compared with the CPU on those new inputs.
struct GraphReplay {
    n: usize,
    hidden: usize,
    inter: usize,
    inputs: [Vec<bf16>; 2],
    weight: Vec<bf16>,
    w: Vec<bf16>,
}

impl GraphReplay {
    fn new(rng: &mut Rng, n: usize, hidden: usize, inter: usize) -> Self {
        let s = 1.0 / (hidden as f32).sqrt();
        GraphReplay {
            n,
            hidden,
            inter,
            inputs: [
                rng.bf16s(n * hidden, -2.0, 2.0),
                rng.bf16s(n * hidden, -2.0, 2.0),
            ],
            weight: rng.bf16s(hidden, 0.5, 1.5),
            w: rng.bf16s(2 * inter * hidden, -s, s),
        }
    }
}

impl Case for GraphReplay {
    fn size(&self) -> usize {
        self.w.len()
    }
    fn op(&self) -> &'static str {
        "graph_replay"
    }
    fn shape(&self) -> String {
        format!(
            "norm+gemm+silu n={} h={} i={}",
            self.n, self.hidden, self.inter
        )
    }
    fn tol(&self) -> Tol {
        Tol::RelL2(1e-2)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<Checked>> {
        let (n, h, i) = (self.n, self.hidden, self.inter);
        let mut x = up(b, &self.inputs[0])?;
        let norm_w = up(b, &self.weight)?;
        let w = up(b, &self.w)?;
        let mut normed = b.alloc::<bf16>(n * h)?;
        let mut gu = b.alloc::<bf16>(n * 2 * i)?;
        let mut out = poisoned(b, n * i)?;
        let body = |x: &B::Buf<bf16>,
                    normed: &mut B::Buf<bf16>,
                    gu: &mut B::Buf<bf16>,
                    out: &mut B::Buf<bf16>| {
            b.rms_norm(x, &norm_w, n, h, 1e-6, normed)?;
            b.gemm(normed, &w, n, 2 * i, h, gu)?;
            b.silu_and_mul(gu, n, i, out)
        };
        // Warm-up (lazy library setup happens outside capture), then capture.
        body(&x, &mut normed, &mut gu, &mut out)?;
        b.synchronize()?;
        b.htod(&vec![bf16::NAN; n * i], &mut out)?;
        let graph = b.capture_graph(&mut || body(&x, &mut normed, &mut gu, &mut out))?;
        b.htod(&self.inputs[1], &mut x)?;
        match graph {
            Some(g) => g.replay()?,
            None => body(&x, &mut normed, &mut gu, &mut out)?,
        }
        Ok(vec![out_bf16(b, "out", &out, n * i)?])
    }
}

// ---------------------------------------------------------------- main

fn main() {
    if std::env::var_os("NANOVLLM_ATTN_ROPE").is_none() {
        // Before any backend reads it: the check is of the fused kernel, which the engine
        // runs only when asked.
        std::env::set_var("NANOVLLM_ATTN_ROPE", "1");
    }
    let seed = std::env::var("OP_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let filter = std::env::var("OP_CHECK_FILTER").unwrap_or_default();
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("op_check: {e}");
            std::process::exit(2);
        }
    };
    let cpu = CpuBackend::new();
    println!(
        "op_check on {} ({}), seed {seed} (OP_CHECK_SEED={seed} repeats these inputs)",
        gpu.name(),
        gpu.device_name().unwrap_or_else(|e| e.to_string())
    );
    let mut rng = Rng(seed);
    let max_size = std::env::var("OP_CHECK_MAX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let mut rep = Report {
        lines: Vec::new(),
        max_size,
    };
    let on = |op: &str| filter.is_empty() || op.contains(filter.as_str());
    let t0 = Instant::now();

    if on("embedding") {
        for (n, h, start, rows) in [
            (1, 1024, 0, 151_936),
            (7, 2048, 0, 5000),
            (16_384, 1024, 0, 151_936),
            (300, 4096, 1000, 5000),
            (5, 100, 3, 60),
        ] {
            rep.check(&cpu, &gpu, &Embedding::new(&mut rng, n, h, start, rows));
        }
    }
    for fused in [false, true] {
        if on(if fused { "add_rms_norm" } else { "rms_norm" }) {
            for (n, h) in [
                (1, 1024),
                (3, 2048),
                (512, 4096),
                (16_384, 1024),
                (2048, 2048),
                (100, 4096),
                (9, 8192),
                (33, 1000),
                (4, 36_000),
            ] {
                rep.check(&cpu, &gpu, &RmsNorm::new(&mut rng, n, h, fused));
            }
        }
    }
    if on("qk_norm_rope") {
        for (n, nh, nkv, d) in [
            (1, 16, 8, 128),
            (16_384, 16, 8, 128),
            (100, 32, 8, 128),
            (33, 16, 16, 64),
            (7, 64, 4, 128),
            (5, 8, 2, 256),
            (3, 4, 4, 32),
        ] {
            rep.check(&cpu, &gpu, &QkNormRope::new(&mut rng, n, nh, nkv, d));
        }
    }
    if on("store_kvcache") {
        for (n, nh, nkv, d, bs) in [
            (1, 16, 8, 128, 256),
            (16_384, 16, 8, 128, 256),
            (77, 8, 4, 64, 16),
            (300, 32, 8, 128, 32),
            (20, 14, 2, 128, 128),
        ] {
            rep.check(&cpu, &gpu, &StoreKv::new(&mut rng, n, nh, nkv, d, bs));
        }
    }
    if on("qk_norm_rope_store") {
        // Against the CPU backend (its default: the two ops), and bit for bit against the
        // CUDA backend's own two ops. Group sizes 1, 2, 4, 8; head_dim 64 and 128.
        for (n, nh, nkv, d, bs) in [
            (1, 16, 8, 128, 256),
            (3, 16, 8, 128, 256),
            (16, 16, 8, 128, 256),
            (256, 16, 8, 128, 256),
            (16_384, 16, 8, 128, 256),
            (77, 8, 8, 64, 16),
            (300, 32, 8, 128, 32),
            (33, 16, 4, 64, 64),
            (20, 16, 2, 128, 128),
            (9, 8, 1, 64, 16),
        ] {
            let fused = QkvStore::new(&mut rng, n, nh, nkv, d, bs);
            rep.check(&cpu, &gpu, &fused);
            let separate = QkvStore {
                separate: true,
                ..fused.clone()
            };
            rep.check_same(&gpu, &separate, &fused);
        }
    }
    if on("silu_and_mul") {
        for (n, inter) in [
            (1, 3072),
            (512, 3072),
            (16_384, 3072),
            (100, 1001),
            (7, 12_288),
        ] {
            let gate_up = rng.bf16s(n * 2 * inter, -6.0, 6.0);
            rep.check(&cpu, &gpu, &SiluMul { n, inter, gate_up });
        }
    }
    if on("gemm") {
        // Qwen3-0.6B's linear layers: qkv, o, gate_up, down, lm_head.
        let layers = [
            (4096, 1024),
            (1024, 2048),
            (6144, 1024),
            (1024, 3072),
            (151_936, 1024),
        ];
        for m in [1, 8, 64, 256, 512, 16_384] {
            for &(n, k) in &layers {
                if m * n > 64 << 20 {
                    continue; // the CPU reference would take minutes
                }
                rep.check(&cpu, &gpu, &Gemm::new(&mut rng, m, n, k));
            }
        }
        for (m, n, k) in [
            (5, 100, 72),
            (17, 33, 40),
            (3, 1000, 999),
            (2048, 4096, 4096),
        ] {
            rep.check(&cpu, &gpu, &Gemm::new(&mut rng, m, n, k));
        }
        // Each path forced on, over the decode sizes and around the skinny kernels' M limits
        // (8, 16, 32 rows), odd N, K multiples of 8 but not of 32, and K not a multiple of 8
        // (which the skinny policy must hand to cuBLASLt). The tighter tolerance: both sides
        // accumulate in f32 and round once, so they differ only where the f32 sums round to
        // different bf16 values; a dropped k tile or row shows as 1e-1 or more.
        let odd = [(1001, 1000), (33, 72), (4097, 40), (7, 8), (1, 1024)];
        let qwen = [
            (4096, 1024),
            (1024, 2048),
            (6144, 1024),
            (1024, 3072),
            (6144, 4096),
            (4096, 12_288),
        ];
        for (path, policy) in gemm_policies() {
            // The skinny kernel rounds once (the tighter tolerance) where it takes the product
            // (m <= SKINNY_LIMIT, k % 8 == 0); cuBLASLt, which takes the rest, may reduce split-K
            // partial sums in bf16: the usual GEMM tolerance.
            let tol = |m: usize, k: usize| {
                if path == "skinny" && m <= SKINNY_LIMIT && k.is_multiple_of(8) {
                    2e-3
                } else {
                    1e-2
                }
            };
            if let Err(e) = gpu.set_gemm_policy(policy) {
                eprintln!("op_check: {e}");
                std::process::exit(2);
            }
            let ms: Vec<usize> = if path == "skinny" {
                (1..=16).chain([17, 24, 31, 32, 33, 64]).collect()
            } else {
                vec![1, 2, 16, 17, 64]
            };
            for (i, &m) in ms.iter().enumerate() {
                let (n, k) = qwen[i % qwen.len()];
                rep.check(
                    &cpu,
                    &gpu,
                    &Gemm::on_path(&mut rng, m, n, k, path, tol(m, k)),
                );
                let (n, k) = odd[i % odd.len()];
                rep.check(
                    &cpu,
                    &gpu,
                    &Gemm::on_path(&mut rng, m, n, k, path, tol(m, k)),
                );
            }
            rep.check(
                &cpu,
                &gpu,
                &Gemm::on_path(&mut rng, 3, 77, 999, path, tol(3, 999)),
            );
            rep.check(
                &cpu,
                &gpu,
                &Gemm::on_path(&mut rng, 16, 24_576, 4096, path, tol(16, 4096)),
            );
        }
        if let Err(e) = gpu.set_gemm_policy(GemmPolicy::default()) {
            eprintln!("op_check: {e}");
            std::process::exit(2);
        }
    }
    if on("silu_and_mul_gemm") {
        // Qwen3-0.6B's and -8B's down projections (8B also at tp 2), odd shapes, and the
        // sizes that leave the fused kernel: m > 8, k % 8 != 0.
        let shapes = [
            (1024, 3072),
            (4096, 12_288),
            (4096, 6144),
            (1001, 1000),
            (33, 72),
            (7, 8),
        ];
        for m in (1..=8).chain([9, 16]) {
            for (i, &(n, k)) in shapes.iter().enumerate() {
                if (m + i) % 2 == 0 || m == 1 || m == 8 {
                    rep.check(&cpu, &gpu, &SiluMulGemm::new(&mut rng, m, n, k));
                }
            }
        }
        rep.check(&cpu, &gpu, &SiluMulGemm::new(&mut rng, 3, 100, 999));
    }
    if on("gather_rows") {
        for (n, rows, w) in [
            (1, 10, 1024),
            (256, 16_384, 1024),
            (3, 50, 100),
            (512, 600, 151_936 / 8),
        ] {
            let x = rng.bf16s(rows * w, -1.0, 1.0);
            let indices = (0..n).map(|_| rng.below(rows) as i32).collect();
            rep.check(
                &cpu,
                &gpu,
                &Gather {
                    n,
                    width: w,
                    x,
                    indices,
                },
            );
        }
    }
    if on("sample") {
        let v = 151_936;
        for (rows, vocab, mix, peaked) in [
            (1, v, "greedy", false),
            (7, v, "mixed", false),
            (64, v, "mixed", true),
            (256, v, "greedy", false),
            (256, v, "gumbel", false),
            (256, v, "gumbel", true),
            (256, v, "mixed", false),
            (60, v, "ties", false),
            (512, 1000, "mixed", false),
            (100, 4099, "mixed", true),
            (3, 17, "mixed", false),
        ] {
            rep.check(&cpu, &gpu, &Sample::new(&mut rng, rows, vocab, mix, peaked));
        }
    }
    if on("sample_shard") {
        let v = 151_936;
        for (rows, ties, peaked, ranks) in [
            (1, false, false, 2),
            (7, false, true, 2),
            (64, true, false, 2),
            (256, false, false, 2),
            (256, false, true, 2),
            (256, false, false, 4),
            (100, true, true, 4),
        ] {
            let case = SampleShard::new(&mut rng, rows, v, ties, peaked, ranks);
            rep.check(&cpu, &gpu, &case);
        }
    }
    if on("decode_attention") {
        // (context lengths, heads, kv heads, head_dim, block size, cache pool in blocks); each
        // also run with max_context_len 4096, as decode graphs pass the model's length, so that
        // contexts shorter than the launch's split size are spread over the splits.
        let cases: Vec<(Vec<usize>, usize, usize, usize, usize, usize)> = vec![
            (vec![1], 16, 8, 128, 256, 4),
            (
                (0..64).map(|i| 500 + i % 57).collect(),
                32,
                4,
                128,
                256,
                300,
            ),
            (
                (0..32).map(|i| 100 + i * 13).collect(),
                32,
                4,
                128,
                256,
                300,
            ),
            (vec![1, 255, 256, 257, 1000, 4097], 16, 8, 128, 256, 40),
            (vec![8192; 16], 16, 8, 128, 256, 200),
            (
                (0..256).map(|i| 1 + (i * 37) % 1024).collect(),
                16,
                8,
                128,
                256,
                600,
            ),
            (
                (0..64).map(|i| 1 + (i * 131) % 2047).collect(),
                16,
                16,
                128,
                16,
                3000,
            ),
            ((0..33).map(|i| 3 + i * 61).collect(), 32, 8, 128, 64, 400),
            ((0..20).map(|i| 1 + i * 97).collect(), 8, 1, 64, 32, 400),
            ((0..9).map(|i| 5 + i * 300).collect(), 16, 4, 64, 128, 60),
            (vec![512 * 3 + 1; 512], 16, 8, 128, 256, 200),
            // Padding rows (no context) between real ones, as a decode graph's batch has.
            (
                (0..40)
                    .map(|i| if i % 7 == 3 { 0 } else { 1 + i * 53 })
                    .collect(),
                32,
                4,
                128,
                256,
                300,
            ),
            // The serving mix: 100..2,000-token contexts in one batch, Qwen3-8B's heads at
            // tp 1 and tp 2.
            (
                (0..256).map(|i| 100 + (i * 733) % 1900).collect(),
                32,
                8,
                128,
                256,
                1500,
            ),
            (
                (0..200).map(|i| 100 + (i * 389) % 1900).collect(),
                16,
                4,
                128,
                256,
                1200,
            ),
        ];
        for (ctx, nh, nkv, d, bs, pool) in cases {
            for graph_len in [0, 4096] {
                let case = Decode::new(&mut rng, ctx.clone(), nh, nkv, d, bs, pool, graph_len);
                rep.check(&cpu, &gpu, &case);
            }
        }
    }
    if on("decode_attention_rope") {
        // The fused block against the CPU's two ops, and against the GPU's own two ops bit for
        // bit (the same splits; graph_len 4096 as a decode graph passes), over Qwen3's head
        // layouts (0.6B / 8B at tp 1 and 2: groups 2 and 4; one group of 8 at hd 64).
        let cases: Vec<(Vec<usize>, usize, usize, usize, usize, usize)> = vec![
            (vec![1], 16, 8, 128, 256, 4),
            (
                vec![1, 2, 255, 256, 257, 511, 1000, 4097],
                16,
                8,
                128,
                256,
                40,
            ),
            (
                (0..40)
                    .map(|i| if i % 7 == 3 { 0 } else { 1 + i * 53 })
                    .collect(),
                32,
                8,
                128,
                256,
                300,
            ),
            (
                (0..256).map(|i| 100 + (i * 733) % 1900).collect(),
                16,
                4,
                128,
                256,
                1500,
            ),
            ((0..33).map(|i| 3 + i * 61).collect(), 32, 8, 128, 16, 3000),
            ((0..20).map(|i| 1 + i * 97).collect(), 8, 1, 64, 32, 400),
        ];
        for (ctx, nh, nkv, d, bs, pool) in cases {
            for graph_len in [0, 4096] {
                let case = DecodeRope::new(&mut rng, ctx.clone(), nh, nkv, d, bs, pool, graph_len);
                rep.check(&cpu, &gpu, &case);
                let unfused = DecodeRope {
                    fused: false,
                    ..case.clone()
                };
                rep.check_same(&gpu, &unfused, &case);
            }
        }
    }
    if on("prefill_attention") {
        // (sequences as (len_q, len_k), heads, kv heads, head_dim, block size)
        type PrefillShape = (Vec<(usize, usize)>, usize, usize, usize, usize);
        let cases: Vec<PrefillShape> = vec![
            (vec![(1, 1)], 16, 8, 128, 256),
            (
                vec![(17, 17), (256, 256), (257, 257), (300, 300)],
                16,
                8,
                128,
                256,
            ),
            (vec![(1024, 1024); 4], 16, 8, 128, 256),
            (
                vec![(100, 612), (1, 1000), (64, 64), (129, 4096)],
                16,
                8,
                128,
                256,
            ),
            (vec![(333, 333), (77, 1077)], 16, 16, 64, 16),
            (vec![(200, 200), (50, 300)], 32, 8, 128, 64),
            (vec![(150, 150), (31, 500)], 8, 1, 64, 32),
            (vec![(513, 2049)], 16, 2, 128, 128),
        ];
        for (seqs, nh, nkv, d, bs) in cases {
            rep.check(&cpu, &gpu, &Prefill::new(&mut rng, seqs, nh, nkv, d, bs));
        }
    }
    if on("graph_replay") {
        rep.check(&cpu, &gpu, &GraphReplay::new(&mut rng, 64, 1024, 3072));
        rep.check(&cpu, &gpu, &GraphReplay::new(&mut rng, 1, 1024, 3072));
    }

    let failed: Vec<_> = rep.lines.iter().filter(|l| !l.4).collect();
    println!();
    println!(
        "op_check summary on {}: {} cases, {} passed, {} failed ({:.0}s, seed {seed})",
        gpu.device_name().unwrap_or_default(),
        rep.lines.len(),
        rep.lines.len() - failed.len(),
        failed.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut per_op: Vec<(String, usize, usize)> = Vec::new();
    for l in &rep.lines {
        match per_op.iter_mut().find(|(op, _, _)| *op == l.0) {
            Some(e) => {
                e.1 += 1;
                e.2 += l.4 as usize;
            }
            None => per_op.push((l.0.clone(), 1, l.4 as usize)),
        }
    }
    for (op, n, ok) in &per_op {
        println!("  {op:<18} {ok}/{n} pass");
    }
    for l in &failed {
        println!("  FAIL {} {}: {} {}", l.0, l.1, l.2, l.5);
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
