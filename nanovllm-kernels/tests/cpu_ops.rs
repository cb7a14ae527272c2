//! Checks every op of the CPU backend against a plain f64 reference written here, on random
//! inputs (never zeros) over many shapes: GQA groups of 1, 2, 4 and 8, head_dim 64 and 128,
//! KV blocks of 16 and 256 tokens, lengths on and around block boundaries, cached prefixes,
//! chunked prefill and decode batches of mixed lengths.
//!
//! The references are deliberately naive and share no code with the backend: triple loops,
//! explicit gathers through the block table, a full softmax per query. Since the CPU backend
//! is in turn the reference of the CUDA kernels, these tests are what anchors both to the math.
//! Outputs are bf16, so results are compared by relative L2 error per row (one row per token
//! and head where heads exist), which a single wrong row cannot hide in.

use half::bf16;
use nanovllm_kernels::cpu::{rope_cos_sin_cache, CpuBackend, CpuBuf};
use nanovllm_kernels::{philox_uniform, AttnParams, Backend, Elem, SamplingBufs};
use nanovllm_utils::Error;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const EPS: f32 = 1e-6;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `len` bf16 values with magnitudes in `[0.05, 1] * scale` and random signs: never zero.
fn rand_bf16(rng: &mut StdRng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len)
        .map(|_| {
            let mag: f32 = rng.gen_range(0.05..1.0);
            let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
            bf16::from_f32(sign * mag * scale)
        })
        .collect()
}

/// The backend with its AVX2 kernels (where the CPU has them) and without: the ops that have
/// vector kernels (GEMM, attention) are checked through both.
fn backends() -> [CpuBackend; 2] {
    [CpuBackend::new(), CpuBackend::plain()]
}

fn f(x: bf16) -> f64 {
    x.to_f64()
}

fn buf<T: Elem>(v: &[T]) -> CpuBuf<T> {
    CpuBuf::from_vec(v.to_vec())
}

/// Asserts that each row (`width` values) of `got` is within relative L2 error `tol` of `want`.
fn assert_rows_close(what: &str, got: &[bf16], want: &[f64], width: usize, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (r, (g, w)) in got.chunks(width).zip(want.chunks(width)).enumerate() {
        let err: f64 = g.iter().zip(w).map(|(&g, &w)| (f(g) - w).powi(2)).sum();
        let norm: f64 = w.iter().map(|w| w * w).sum();
        let rel = (err / norm.max(1e-30)).sqrt();
        assert!(
            rel <= tol,
            "{what}: row {r} has relative L2 error {rel:.3e} > {tol:.0e}\n got  {:?}\n want {:?}",
            &g[..g.len().min(6)],
            &w[..w.len().min(6)]
        );
    }
}

/// Expects `Error::Shape` naming `tensor`.
fn assert_shape_err(res: nanovllm_utils::Result<()>, op: &str, tensor: &str) {
    match res {
        Err(Error::Shape {
            op: o, tensor: t, ..
        }) if o == op && t == tensor => {}
        other => panic!("{op}: expected a shape error on `{tensor}`, got {other:?}"),
    }
}

/// Expects an error whose message contains `needle`.
fn assert_err_mentions(res: nanovllm_utils::Result<()>, needle: &str) {
    match res {
        Err(e) => assert!(
            e.to_string().contains(needle),
            "error `{e}` does not mention `{needle}`"
        ),
        Ok(()) => panic!("expected an error mentioning `{needle}`"),
    }
}

// ---------------------------------------------------------------- embedding, gather, silu

#[test]
fn embedding_copies_rows_and_masks_other_ranks() {
    let be = CpuBackend::new();
    let mut r = rng(1);
    let (vocab_start, vocab_rows, hidden) = (100, 50, 96);
    let weight = rand_bf16(&mut r, vocab_rows * hidden, 1.0);
    let mut ids: Vec<u32> = (0..40).map(|_| r.gen_range(0..250)).collect();
    // The edges of this rank's range, and ids just outside it.
    ids.extend([99, 100, 149, 150]);
    let n = ids.len();
    let mut out = buf(&vec![bf16::from_f32(7.0); (n + 1) * hidden]);
    be.embedding(
        &buf(&ids),
        n,
        &buf(&weight),
        vocab_start,
        vocab_rows,
        hidden,
        &mut out,
    )
    .unwrap();
    let out = out.as_slice();
    let mut masked = 0;
    for (i, &id) in ids.iter().enumerate() {
        let row = &out[i * hidden..(i + 1) * hidden];
        let id = id as usize;
        if (vocab_start..vocab_start + vocab_rows).contains(&id) {
            let src = id - vocab_start;
            assert_eq!(row, &weight[src * hidden..(src + 1) * hidden], "row {i}");
        } else {
            masked += 1;
            assert!(row.iter().all(|&x| x == bf16::ZERO), "row {i} not masked");
        }
    }
    assert!(masked > 0 && masked < n, "the ids must exercise both cases");
    // Past the n rows, nothing is written.
    assert!(out[n * hidden..].iter().all(|&x| x == bf16::from_f32(7.0)));

    assert_shape_err(
        be.embedding(
            &buf(&ids),
            n,
            &buf(&weight[1..]),
            vocab_start,
            vocab_rows,
            hidden,
            &mut buf(&vec![bf16::ZERO; n * hidden]),
        ),
        "embedding",
        "weight",
    );
}

#[test]
fn gather_rows_picks_the_indexed_rows() {
    let be = CpuBackend::new();
    let mut r = rng(2);
    let (rows, width) = (23, 80);
    let x = rand_bf16(&mut r, rows * width, 1.0);
    let idx: Vec<i32> = vec![22, 0, 5, 5, 17, 1];
    let mut out = buf(&vec![bf16::ZERO; idx.len() * width]);
    be.gather_rows(&buf(&x), &buf(&idx), idx.len(), width, &mut out)
        .unwrap();
    for (i, &j) in idx.iter().enumerate() {
        let j = j as usize;
        assert_eq!(
            &out.as_slice()[i * width..(i + 1) * width],
            &x[j * width..(j + 1) * width],
            "row {i}"
        );
    }
    assert_err_mentions(
        be.gather_rows(&buf(&x), &buf(&[0, 23]), 2, width, &mut out),
        "indices[1]",
    );
    assert_err_mentions(
        be.gather_rows(&buf(&x), &buf(&[-1]), 1, width, &mut out),
        "indices[0]",
    );
    assert_shape_err(
        be.gather_rows(&buf(&x), &buf(&idx), idx.len(), width, &mut buf(&[])),
        "gather_rows",
        "out",
    );
}

#[test]
fn silu_and_mul_matches_reference() {
    let be = CpuBackend::new();
    let mut r = rng(3);
    for &(n, inter) in &[(1, 64), (5, 3072), (17, 100)] {
        let gu = rand_bf16(&mut r, n * 2 * inter, 4.0);
        let mut out = buf(&vec![bf16::ZERO; n * inter]);
        be.silu_and_mul(&buf(&gu), n, inter, &mut out).unwrap();
        let mut want = vec![0f64; n * inter];
        let mut exact = 0;
        for i in 0..n {
            for j in 0..inter {
                let g = f(gu[i * 2 * inter + j]);
                let u = f(gu[i * 2 * inter + inter + j]);
                let silu = g / (1.0 + (-g).exp());
                want[i * inter + j] = silu * u;
                // Hugging Face rounds silu(g) to bf16 before the product.
                let hf = bf16::from_f64(f(bf16::from_f64(silu)) * u);
                exact += (hf == out.as_slice()[i * inter + j]) as usize;
            }
        }
        assert_rows_close("silu_and_mul", out.as_slice(), &want, inter, 1e-2);
        assert!(
            exact as f64 >= 0.98 * (n * inter) as f64,
            "silu_and_mul ({n}x{inter}): only {exact} of {} values round like bf16(bf16(silu(g)) * u)",
            n * inter
        );
    }
    assert_shape_err(
        be.silu_and_mul(&buf(&[bf16::ONE; 7]), 2, 2, &mut buf(&[bf16::ZERO; 4])),
        "silu_and_mul",
        "gate_up",
    );
}

// ---------------------------------------------------------------- norms and rope

/// `x / sqrt(mean(x^2) + eps) * w` in f64.
fn rms_ref(x: &[f64], w: &[bf16]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + EPS as f64).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * r * f(w)).collect()
}

/// Fraction of `got` equal to `bf16(bf16(x * r) * w)` with `r` from f64 statistics: the
/// rounding Hugging Face's Qwen3RMSNorm does.
fn hf_rounding_matches(x: &[f64], w: &[bf16], got: &[bf16]) -> usize {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + EPS as f64).sqrt();
    x.iter()
        .zip(w)
        .zip(got)
        .filter(|((&v, &w), &g)| bf16::from_f64(f(bf16::from_f64(v * r)) * f(w)) == g)
        .count()
}

#[test]
fn rms_norm_matches_reference() {
    let be = CpuBackend::new();
    let mut r = rng(4);
    for &(n, hidden) in &[(1, 64), (7, 1024), (33, 4096), (3, 100)] {
        // Rows of very different scales: the statistics are per row.
        let mut x = Vec::new();
        for i in 0..n {
            x.extend(rand_bf16(&mut r, hidden, 0.01 * (1 + 37 * i) as f32));
        }
        let w = rand_bf16(&mut r, hidden, 2.0);
        let mut out = buf(&vec![bf16::ZERO; n * hidden + 5]);
        be.rms_norm(&buf(&x), &buf(&w), n, hidden, EPS, &mut out)
            .unwrap();
        let mut want = Vec::new();
        let mut exact = 0;
        for i in 0..n {
            let row: Vec<f64> = x[i * hidden..(i + 1) * hidden]
                .iter()
                .map(|&v| f(v))
                .collect();
            want.extend(rms_ref(&row, &w));
            exact += hf_rounding_matches(&row, &w, &out.as_slice()[i * hidden..(i + 1) * hidden]);
        }
        let got = &out.as_slice()[..n * hidden];
        assert_rows_close("rms_norm", got, &want, hidden, 1e-2);
        assert!(
            exact as f64 >= 0.98 * (n * hidden) as f64,
            "rms_norm: only {exact} of {} values round like Qwen3RMSNorm",
            n * hidden
        );
        assert!(out.as_slice()[n * hidden..]
            .iter()
            .all(|&v| v == bf16::ZERO));
    }
    assert_shape_err(
        be.rms_norm(
            &buf(&[bf16::ONE; 8]),
            &buf(&[bf16::ONE; 3]),
            2,
            4,
            EPS,
            &mut buf(&[bf16::ZERO; 8]),
        ),
        "rms_norm",
        "weight",
    );
}

#[test]
fn add_rms_norm_matches_reference() {
    let be = CpuBackend::new();
    let mut r = rng(5);
    for &(n, hidden) in &[(1, 128), (9, 1024), (4, 2048)] {
        let x = rand_bf16(&mut r, n * hidden, 3.0);
        let res = rand_bf16(&mut r, n * hidden, 1.0);
        let w = rand_bf16(&mut r, hidden, 1.5);
        let (mut xb, mut rb) = (buf(&x), buf(&res));
        be.add_rms_norm(&mut xb, &mut rb, &buf(&w), n, hidden, EPS)
            .unwrap();
        let mut want = Vec::new();
        let mut exact = 0;
        for i in 0..n {
            let sum: Vec<f64> = (i * hidden..(i + 1) * hidden)
                .map(|j| f(x[j]) + f(res[j]))
                .collect();
            // The residual stream is the sum rounded to bf16.
            for (j, s) in sum.iter().enumerate() {
                assert_eq!(
                    rb.as_slice()[i * hidden + j],
                    bf16::from_f64(*s),
                    "residual"
                );
            }
            let rounded: Vec<f64> = sum.iter().map(|&s| f(bf16::from_f64(s))).collect();
            want.extend(rms_ref(&rounded, &w));
            exact +=
                hf_rounding_matches(&rounded, &w, &xb.as_slice()[i * hidden..(i + 1) * hidden]);
        }
        assert_rows_close("add_rms_norm", xb.as_slice(), &want, hidden, 1e-2);
        assert!(exact as f64 >= 0.98 * (n * hidden) as f64);
    }
    assert_shape_err(
        be.add_rms_norm(
            &mut buf(&[bf16::ONE; 8]),
            &mut buf(&[bf16::ONE; 7]),
            &buf(&[bf16::ONE; 4]),
            2,
            4,
            EPS,
        ),
        "add_rms_norm",
        "residual",
    );
}

#[test]
fn rope_table_matches_f64() {
    for &(d, theta) in &[(128usize, 1_000_000.0f64), (64, 10_000.0)] {
        let max_pos = 5000;
        let table = rope_cos_sin_cache(d, max_pos, theta).unwrap();
        assert_eq!(table.len(), max_pos * d);
        for p in [0usize, 1, 2, 17, 255, 1024, 4999] {
            for i in 0..d / 2 {
                let angle = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                // f32 angles drift by a few ulps of p * f_i.
                let tol = 1e-6 + 4e-7 * angle;
                let (c, s) = (table[p * d + i] as f64, table[p * d + d / 2 + i] as f64);
                assert!((c - angle.cos()).abs() <= tol, "cos p={p} i={i}: {c}");
                assert!((s - angle.sin()).abs() <= tol, "sin p={p} i={i}: {s}");
            }
        }
    }
    assert!(rope_cos_sin_cache(127, 10, 1e4).is_err());
    assert!(rope_cos_sin_cache(128, 10, 0.0).is_err());
}

#[test]
fn qk_norm_rope_matches_reference() {
    let be = CpuBackend::new();
    let mut r = rng(6);
    let theta = 1_000_000.0f64;
    for &(num_heads, num_kv_heads, d, n) in &[(16, 8, 128, 7), (4, 1, 64, 5), (8, 2, 128, 3)] {
        let attn = AttnParams {
            num_heads,
            num_kv_heads,
            head_dim: d,
            block_size: 16,
            max_blocks_per_seq: 1,
            scale: 1.0,
        };
        let width = attn.qkv_width();
        let max_pos = 4096;
        let table = rope_cos_sin_cache(d, max_pos, theta).unwrap();
        let qkv = rand_bf16(&mut r, n * width, 2.0);
        let q_norm = rand_bf16(&mut r, d, 1.5);
        let k_norm = rand_bf16(&mut r, d, 1.5);
        let mut positions: Vec<i32> = (0..n).map(|_| r.gen_range(0..max_pos as i32)).collect();
        positions[0] = 0;
        positions[n - 1] = max_pos as i32 - 1;
        let mut got = buf(&qkv);
        be.qk_norm_rope(
            &mut got,
            n,
            &attn,
            &buf(&q_norm),
            &buf(&k_norm),
            EPS,
            &buf(&positions),
            &buf(&table),
        )
        .unwrap();

        let normed_heads = num_heads + num_kv_heads;
        let mut want = Vec::new();
        let mut got_heads = Vec::new();
        for i in 0..n {
            let row = &qkv[i * width..(i + 1) * width];
            for h in 0..normed_heads {
                let x: Vec<f64> = row[h * d..(h + 1) * d].iter().map(|&v| f(v)).collect();
                let w = if h < num_heads { &q_norm } else { &k_norm };
                let y = rms_ref(&x, w);
                let p = positions[i] as f64;
                let mut o = vec![0f64; d];
                for j in 0..d / 2 {
                    let angle = p * theta.powf(-2.0 * j as f64 / d as f64);
                    let (c, s) = (angle.cos(), angle.sin());
                    o[j] = y[j] * c - y[j + d / 2] * s;
                    o[j + d / 2] = y[j + d / 2] * c + y[j] * s;
                }
                want.extend(o);
                got_heads.extend_from_slice(&got.as_slice()[i * width + h * d..][..d]);
            }
            // v heads are untouched.
            assert_eq!(
                &got.as_slice()[i * width + normed_heads * d..(i + 1) * width],
                &row[normed_heads * d..],
                "v heads of row {i}"
            );
        }
        assert_rows_close("qk_norm_rope", &got_heads, &want, d, 1e-2);
    }

    let attn = AttnParams {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 64,
        block_size: 16,
        max_blocks_per_seq: 1,
        scale: 1.0,
    };
    let table = rope_cos_sin_cache(64, 10, theta).unwrap();
    let mut qkv = buf(&vec![bf16::ONE; 2 * attn.qkv_width()]);
    let norm = buf(&[bf16::ONE; 64]);
    assert_err_mentions(
        be.qk_norm_rope(
            &mut qkv,
            2,
            &attn,
            &norm,
            &norm,
            EPS,
            &buf(&[3, 10]),
            &buf(&table),
        ),
        "positions[1]",
    );
    assert_shape_err(
        be.qk_norm_rope(
            &mut qkv,
            2,
            &attn,
            &buf(&[bf16::ONE; 63]),
            &norm,
            EPS,
            &buf(&[0, 1]),
            &buf(&table),
        ),
        "qk_norm_rope",
        "q_norm",
    );
}

// ---------------------------------------------------------------- silu_and_mul_gemm

#[test]
fn silu_and_mul_gemm_matches_reference() {
    // The MLP's activation and down projection in one call: out = (silu(gate) * up) . w^T.
    let mut r = rng(8);
    for &(m, n, k) in &[(1, 64, 96), (4, 33, 100), (9, 128, 64)] {
        let gu = rand_bf16(&mut r, m * 2 * k, 4.0);
        let w = rand_bf16(&mut r, n * k, 0.1);
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for p in 0..k {
                    let g = f(gu[i * 2 * k + p]);
                    let u = f(gu[i * 2 * k + k + p]);
                    acc += g / (1.0 + (-g).exp()) * u * f(w[j * k + p]);
                }
                want[i * n + j] = acc;
            }
        }
        for be in backends() {
            let mut act = buf(&vec![bf16::from_f32(3.0); m * k]);
            let mut out = buf(&vec![bf16::from_f32(3.0); m * n]);
            be.silu_and_mul_gemm(&buf(&gu), &buf(&w), m, n, k, &mut act, &mut out)
                .unwrap();
            assert_rows_close(
                &format!("silu_and_mul_gemm {m}x{n}x{k} on {}", be.name()),
                out.as_slice(),
                &want,
                n,
                2e-2,
            );
        }
    }
}

// ---------------------------------------------------------------- gemm

#[test]
fn gemm_matches_triple_loop() {
    let be = CpuBackend::new();
    let mut r = rng(7);
    // Decode sizes (dot-product path), prefill sizes (sgemm path), more rows than one x block,
    // and dimensions that are not multiples of any vector width.
    for &(m, n, k) in &[
        (1, 1024, 1024),
        (3, 77, 100),
        (8, 256, 64),
        (9, 256, 64),
        (64, 300, 1024),
        (130, 1, 33),
        (1100, 96, 160),
    ] {
        let x = rand_bf16(&mut r, m * k, 1.0);
        let w = rand_bf16(&mut r, n * k, 0.05);
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for p in 0..k {
                    acc += f(x[i * k + p]) * f(w[j * k + p]);
                }
                want[i * n + j] = acc;
            }
        }
        for be in backends() {
            let mut out = buf(&vec![bf16::from_f32(3.0); m * n + 3]);
            be.gemm(&buf(&x), &buf(&w), m, n, k, &mut out).unwrap();
            // Per row of out; with n == 1, per column block instead.
            let width = if n == 1 { m } else { n };
            assert_rows_close(
                &format!("gemm {m}x{n}x{k} on {}", be.name()),
                &out.as_slice()[..m * n],
                &want,
                width,
                1e-2,
            );
            let tail = &out.as_slice()[m * n..];
            assert!(tail.iter().all(|&v| v == bf16::from_f32(3.0)));
        }
    }
    assert_shape_err(
        be.gemm(
            &buf(&[bf16::ONE; 6]),
            &buf(&[bf16::ONE; 5]),
            2,
            2,
            3,
            &mut buf(&[bf16::ZERO; 4]),
        ),
        "gemm",
        "w",
    );
    assert_shape_err(
        be.gemm(
            &buf(&[bf16::ONE; 6]),
            &buf(&[bf16::ONE; 6]),
            2,
            2,
            3,
            &mut buf(&[bf16::ZERO; 3]),
        ),
        "gemm",
        "out",
    );
}

// ---------------------------------------------------------------- KV cache and attention

/// A random paged KV cache and block tables for sequences of the given key lengths.
struct Paged {
    attn: AttnParams,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
    /// `[num_seqs, max_blocks_per_seq]`, -1 where unused.
    tables: Vec<i32>,
}

impl Paged {
    fn new(
        r: &mut StdRng,
        group: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        key_lens: &[usize],
    ) -> Self {
        let needed: Vec<usize> = key_lens.iter().map(|l| l.div_ceil(block_size)).collect();
        // One spare column of -1 and a few spare blocks that no sequence owns.
        let max_blocks_per_seq = needed.iter().max().copied().unwrap_or(0) + 1;
        let num_blocks = needed.iter().sum::<usize>() + 3;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        ids.shuffle(r);
        let mut tables = vec![-1i32; key_lens.len() * max_blocks_per_seq];
        let mut next = 0;
        for (s, &nb) in needed.iter().enumerate() {
            for b in 0..nb {
                tables[s * max_blocks_per_seq + b] = ids[next];
                next += 1;
            }
        }
        let elems = num_blocks * block_size * num_kv_heads * head_dim;
        let attn = AttnParams {
            num_heads: group * num_kv_heads,
            num_kv_heads,
            head_dim,
            block_size,
            max_blocks_per_seq,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        Paged {
            attn,
            k_cache: rand_bf16(r, elems, 1.0),
            v_cache: rand_bf16(r, elems, 1.0),
            tables,
        }
    }

    /// Offset of key `j` of sequence `s`, KV head `kh`, in the caches.
    fn offset(&self, s: usize, j: usize, kh: usize) -> usize {
        let a = &self.attn;
        let block = self.tables[s * a.max_blocks_per_seq + j / a.block_size] as usize;
        let slot = block * a.block_size + j % a.block_size;
        (slot * a.num_kv_heads + kh) * a.head_dim
    }

    /// Attention of query row `q_row` of `qkv` (sequence `s`) over its keys `0..visible`, all
    /// heads, in f64 with a full softmax.
    fn reference_row(&self, qkv: &[bf16], q_row: usize, s: usize, visible: usize) -> Vec<f64> {
        let a = &self.attn;
        let d = a.head_dim;
        let group = a.num_heads / a.num_kv_heads;
        let mut out = vec![0f64; a.num_heads * d];
        for h in 0..a.num_heads {
            let kh = h / group;
            let q = &qkv[q_row * a.qkv_width() + h * d..][..d];
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let k = &self.k_cache[self.offset(s, j, kh)..][..d];
                    q.iter().zip(k).map(|(&a, &b)| f(a) * f(b)).sum::<f64>() * a.scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                let v = &self.v_cache[self.offset(s, j, kh)..][..d];
                for c in 0..d {
                    out[h * d + c] += p / z * f(v[c]);
                }
            }
        }
        out
    }
}

/// Runs prefill attention for sequences of `(len_q, len_k)` and checks every query row.
fn check_prefill(group: usize, head_dim: usize, block_size: usize, seqs: &[(usize, usize)]) {
    for be in backends() {
        check_prefill_on(be, group, head_dim, block_size, seqs);
    }
}

fn check_prefill_on(
    be: CpuBackend,
    group: usize,
    head_dim: usize,
    block_size: usize,
    seqs: &[(usize, usize)],
) {
    let mut r = rng((group * 1000 + head_dim * 10 + block_size) as u64);
    let num_kv_heads = 2;
    let key_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
    let p = Paged::new(&mut r, group, num_kv_heads, head_dim, block_size, &key_lens);
    let a = p.attn;
    let total_q: usize = seqs.iter().map(|s| s.0).sum();
    let qkv = rand_bf16(&mut r, total_q * a.qkv_width(), 1.5);
    let mut cu_q = vec![0i32];
    let mut cu_k = vec![0i32];
    for &(lq, lk) in seqs {
        cu_q.push(cu_q.last().unwrap() + lq as i32);
        cu_k.push(cu_k.last().unwrap() + lk as i32);
    }
    let ow = a.num_heads * head_dim;
    let sentinel = bf16::from_f32(5.0);
    let mut out = buf(&vec![sentinel; (total_q + 1) * ow]);
    let max_q = seqs.iter().map(|s| s.0).max().unwrap();
    let max_k = seqs.iter().map(|s| s.1).max().unwrap();
    be.prefill_attention(
        &buf(&qkv),
        &buf(&p.k_cache),
        &buf(&p.v_cache),
        &buf(&cu_q),
        &buf(&cu_k),
        &buf(&p.tables),
        seqs.len(),
        max_q,
        max_k,
        &a,
        &mut out,
    )
    .unwrap();
    let mut want = Vec::with_capacity(total_q * ow);
    for (s, &(lq, lk)) in seqs.iter().enumerate() {
        for i in 0..lq {
            want.extend(p.reference_row(&qkv, cu_q[s] as usize + i, s, lk - lq + i + 1));
        }
    }
    let what = format!(
        "prefill on {}: group {group} d {head_dim} block {block_size} seqs {seqs:?}",
        be.name()
    );
    assert_rows_close(
        &what,
        &out.as_slice()[..total_q * ow],
        &want,
        head_dim,
        1e-2,
    );
    assert!(out.as_slice()[total_q * ow..]
        .iter()
        .all(|&v| v == sentinel));
}

#[test]
fn prefill_attention_fresh_prompts() {
    // len_q == len_k: lengths at, just below and just above block boundaries.
    check_prefill(1, 64, 16, &[(1, 1), (15, 15), (16, 16), (17, 17), (50, 50)]);
    check_prefill(2, 128, 16, &[(33, 33), (129, 129)]);
    check_prefill(4, 128, 256, &[(255, 255), (3, 3), (257, 257)]);
    check_prefill(8, 64, 256, &[(256, 256), (1, 1), (100, 100)]);
}

#[test]
fn prefill_attention_with_cached_prefix_and_chunks() {
    // len_k > len_q: a cached prefix (whole blocks) or a later chunk of a chunked prefill
    // (any offset), next to fresh prompts in the same batch.
    check_prefill(1, 128, 256, &[(44, 300), (20, 20), (1, 257)]);
    check_prefill(2, 64, 16, &[(16, 48), (7, 23), (31, 31), (5, 160)]);
    check_prefill(4, 64, 16, &[(100, 300), (1, 16), (17, 34)]);
    check_prefill(8, 128, 256, &[(129, 513), (2, 2)]);
}

/// Runs decode attention over sequences of the given context lengths and checks each row.
fn check_decode(group: usize, head_dim: usize, block_size: usize, lens: &[usize]) {
    for be in backends() {
        check_decode_on(be, group, head_dim, block_size, lens);
    }
}

fn check_decode_on(
    be: CpuBackend,
    group: usize,
    head_dim: usize,
    block_size: usize,
    lens: &[usize],
) {
    let mut r = rng((group * 7 + head_dim + block_size * 3) as u64);
    let p = Paged::new(&mut r, group, 2, head_dim, block_size, lens);
    let a = p.attn;
    let n = lens.len();
    let qkv = rand_bf16(&mut r, n * a.qkv_width(), 1.5);
    let ctx: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let ow = a.num_heads * head_dim;
    let mut out = buf(&vec![bf16::from_f32(5.0); n * ow]);
    let max_ctx = lens.iter().max().copied().unwrap() + 3;
    be.decode_attention(
        &buf(&qkv),
        &buf(&p.k_cache),
        &buf(&p.v_cache),
        &buf(&ctx),
        &buf(&p.tables),
        n,
        max_ctx,
        &a,
        &mut out,
    )
    .unwrap();
    let mut want = Vec::new();
    let mut got = Vec::new();
    for (s, &l) in lens.iter().enumerate() {
        let row = &out.as_slice()[s * ow..(s + 1) * ow];
        if l == 0 {
            assert!(row.iter().all(|&v| v == bf16::ZERO), "empty sequence {s}");
            continue;
        }
        want.extend(p.reference_row(&qkv, s, s, l));
        got.extend_from_slice(row);
    }
    let what = format!(
        "decode on {}: group {group} d {head_dim} block {block_size} lens {lens:?}",
        be.name()
    );
    assert_rows_close(&what, &got, &want, head_dim, 1e-2);
}

#[test]
fn decode_attention_mixed_lengths() {
    check_decode(1, 128, 16, &[1, 15, 16, 17, 200]);
    check_decode(2, 128, 256, &[255, 256, 257, 3, 700]);
    check_decode(4, 64, 16, &[33, 1, 128, 129]);
    check_decode(8, 64, 256, &[513, 2, 0, 40]);
    // Fewer sequences than threads: each is split by KV heads.
    check_decode(2, 128, 16, &[300]);
    check_decode(4, 64, 256, &[5, 77]);
}

#[test]
fn store_kvcache_writes_k_and_v_to_their_slots() {
    let be = CpuBackend::new();
    let mut r = rng(8);
    for &(heads, kv_heads, d, bs) in &[(16, 8, 128, 256), (4, 4, 64, 16)] {
        let attn = AttnParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            block_size: bs,
            max_blocks_per_seq: 4,
            scale: 1.0,
        };
        let num_slots = 3 * bs;
        let sw = kv_heads * d;
        let k0 = rand_bf16(&mut r, num_slots * sw, 1.0);
        let v0 = rand_bf16(&mut r, num_slots * sw, 1.0);
        let n = 20;
        let qkv = rand_bf16(&mut r, n * attn.qkv_width(), 1.0);
        let mut slots: Vec<i32> = (0..num_slots as i32).collect();
        slots.shuffle(&mut r);
        slots.truncate(n);
        slots[3] = -1;
        slots[n - 1] = num_slots as i32 - 1;
        let (mut kc, mut vc) = (buf(&k0), buf(&v0));
        be.store_kvcache(&buf(&qkv), n, &attn, &buf(&slots), &mut kc, &mut vc)
            .unwrap();
        let (mut k_want, mut v_want) = (k0.clone(), v0.clone());
        let w = attn.qkv_width();
        for (i, &s) in slots.iter().enumerate() {
            if s < 0 {
                continue;
            }
            let s = s as usize;
            for c in 0..sw {
                k_want[s * sw + c] = qkv[i * w + heads * d + c];
                v_want[s * sw + c] = qkv[i * w + heads * d + sw + c];
            }
        }
        assert!(kc.as_slice() == k_want.as_slice(), "k cache");
        assert!(vc.as_slice() == v_want.as_slice(), "v cache");

        let mut bad = slots.clone();
        bad[5] = num_slots as i32;
        assert_err_mentions(
            be.store_kvcache(&buf(&qkv), n, &attn, &buf(&bad), &mut kc, &mut vc),
            "slot_mapping[5]",
        );
        bad[5] = -2;
        assert_err_mentions(
            be.store_kvcache(&buf(&qkv), n, &attn, &buf(&bad), &mut kc, &mut vc),
            "slot_mapping[5]",
        );
        assert_shape_err(
            be.store_kvcache(&buf(&qkv[1..]), n, &attn, &buf(&slots), &mut kc, &mut vc),
            "store_kvcache",
            "qkv",
        );
    }
}

#[test]
fn attention_rejects_bad_metadata() {
    let be = CpuBackend::new();
    let mut r = rng(9);
    let p = Paged::new(&mut r, 2, 2, 64, 16, &[40, 10]);
    let a = p.attn;
    let qkv = buf(&rand_bf16(&mut r, 50 * a.qkv_width(), 1.0));
    let (kc, vc) = (buf(&p.k_cache), buf(&p.v_cache));
    let mut out = buf(&vec![bf16::ZERO; 50 * a.num_heads * 64]);
    let prefill = |cu_q: &[i32], cu_k: &[i32], tables: &[i32], out: &mut CpuBuf<bf16>| {
        be.prefill_attention(
            &qkv,
            &kc,
            &vc,
            &buf(cu_q),
            &buf(cu_k),
            &buf(tables),
            2,
            64,
            64,
            &a,
            out,
        )
    };
    prefill(&[0, 40, 50], &[0, 40, 50], &p.tables, &mut out).unwrap();
    // More queries than keys.
    assert_err_mentions(
        prefill(&[0, 40, 50], &[0, 40, 45], &p.tables, &mut out),
        "only 5 keys",
    );
    // A block id outside the cache.
    let mut tables = p.tables.clone();
    tables[1] = 1000;
    assert_err_mentions(
        prefill(&[0, 40, 50], &[0, 40, 50], &tables, &mut out),
        "block_tables[0][1]",
    );
    // An unused (-1) entry where keys live.
    let mut tables = p.tables.clone();
    tables[a.max_blocks_per_seq] = -1;
    assert_err_mentions(
        prefill(&[0, 40, 50], &[0, 40, 50], &tables, &mut out),
        "block_tables[1][0]",
    );
    // Decreasing cu_seqlens.
    assert_err_mentions(
        prefill(&[0, 40, 30], &[0, 40, 50], &p.tables, &mut out),
        "decreases",
    );
    assert_shape_err(
        prefill(
            &[0, 40, 50],
            &[0, 40, 50],
            &p.tables,
            &mut buf(&[bf16::ZERO; 10]),
        ),
        "prefill_attention",
        "out",
    );
    assert_shape_err(
        prefill(&[0, 40], &[0, 40, 50], &p.tables, &mut out),
        "prefill_attention",
        "cu_seqlens_q",
    );

    let decode = |lens: &[i32], max_ctx: usize| {
        be.decode_attention(
            &qkv,
            &kc,
            &vc,
            &buf(lens),
            &buf(&p.tables),
            2,
            max_ctx,
            &a,
            &mut buf(&vec![bf16::ZERO; 2 * a.num_heads * 64]),
        )
    };
    decode(&[40, 10], 64).unwrap();
    assert_err_mentions(decode(&[40, 10], 39), "context_lens[0]");
    // Keys beyond the sequence's blocks.
    assert_err_mentions(decode(&[40, 17], 64), "block_tables[1][1]");
    assert_shape_err(decode(&[40], 64), "decode_attention", "context_lens");
}

// ---------------------------------------------------------------- sampling

/// Sampling inputs for `rows` rows sharing one setting, with per-row seeds and steps.
struct Sampling {
    temperatures: CpuBuf<f32>,
    top_k: CpuBuf<i32>,
    top_p: CpuBuf<f32>,
    seeds: CpuBuf<u64>,
    steps: CpuBuf<u32>,
}

impl Sampling {
    fn new(t: &[f32], k: &[i32], p: &[f32], seeds: &[u64], steps: &[u32]) -> Self {
        Sampling {
            temperatures: buf(t),
            top_k: buf(k),
            top_p: buf(p),
            seeds: buf(seeds),
            steps: buf(steps),
        }
    }

    fn uniform(rows: usize, t: f32, k: i32, p: f32, seed: u64, steps: &[u32]) -> Self {
        Self::new(
            &vec![t; rows],
            &vec![k; rows],
            &vec![p; rows],
            &vec![seed; rows],
            steps,
        )
    }

    fn draw(&self, logits: &[bf16], rows: usize, vocab: usize) -> Vec<u32> {
        let be = CpuBackend::new();
        let mut out = buf(&vec![u32::MAX; rows]);
        be.sample(
            &buf(logits),
            rows,
            vocab,
            &SamplingBufs {
                temperatures: &self.temperatures,
                top_k: &self.top_k,
                top_p: &self.top_p,
                seeds: &self.seeds,
                steps: &self.steps,
            },
            &mut out,
        )
        .unwrap();
        out.into_vec()
    }
}

/// The sampling rule written out plainly: stable sort by logit, cut, Gumbel-max over all kept.
fn sample_ref(logits: &[bf16], t: f32, top_k: i32, top_p: f32, seed: u64, step: u32) -> u32 {
    let l: Vec<f32> = logits.iter().map(|x| x.to_f32()).collect();
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
    if t == 0.0 {
        return order[0] as u32;
    }
    if top_k > 0 && (top_k as usize) < l.len() {
        order.truncate(top_k as usize);
    }
    let e: Vec<f64> = order
        .iter()
        .map(|&i| ((l[i] - l[order[0]]) as f64 / t as f64).exp())
        .collect();
    let z: f64 = e.iter().sum();
    let mut keep = 0;
    let mut before = 0.0;
    while keep < order.len() && before / z < top_p as f64 {
        before += e[keep];
        keep += 1;
    }
    order.truncate(keep);
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    for &i in &order {
        let u = philox_uniform(seed, step, i as u32);
        let s = l[i] / t - (-u.ln()).ln();
        if s > best.0 || (s == best.0 && (i as u32) < best.1) {
            best = (s, i as u32);
        }
    }
    best.1
}

#[test]
fn greedy_is_argmax_with_lowest_index_on_ties() {
    let mut r = rng(10);
    let (rows, vocab) = (6, 3001);
    let mut logits = rand_bf16(&mut r, rows * vocab, 8.0);
    // Row 0: a tie for the maximum at 17 and 2500; row 1: the maximum at the last index.
    logits[17] = bf16::from_f32(100.0);
    logits[2500] = bf16::from_f32(100.0);
    logits[vocab + vocab - 1] = bf16::from_f32(100.0);
    let s = Sampling::uniform(rows, 0.0, 0, 1.0, 1, &[0; 6]);
    let got = s.draw(&logits, rows, vocab);
    for (row, &g) in got.iter().enumerate() {
        let l = &logits[row * vocab..(row + 1) * vocab];
        let max = l.iter().map(|x| x.to_f32()).fold(f32::MIN, f32::max);
        let first = l.iter().position(|x| x.to_f32() == max).unwrap() as u32;
        assert_eq!(g, first, "row {row}");
    }
    assert_eq!(got[0], 17);
    assert_eq!(got[1], vocab as u32 - 1);

    // top_k = 1 at any temperature is greedy too.
    let s = Sampling::uniform(rows, 1.3, 1, 1.0, 99, &[0, 1, 2, 3, 4, 5]);
    assert_eq!(s.draw(&logits, rows, vocab), got);
}

#[test]
fn sampling_matches_the_plain_rule() {
    let mut r = rng(11);
    let vocab = 4000;
    let mut cases = Vec::new();
    for &t in &[0.3f32, 0.6, 1.0, 1.7] {
        for &k in &[0, -1, 1, 5, 50, 4000, 9999] {
            for &p in &[1.0f32, 0.9, 0.5, 0.05] {
                cases.push((t, k, p));
            }
        }
    }
    let rows = cases.len();
    let mut logits = Vec::with_capacity(rows * vocab);
    for i in 0..rows {
        // Flat and peaked rows: a peaked one lets most draws be skipped.
        logits.extend(rand_bf16(
            &mut r,
            vocab,
            if i % 2 == 0 { 2.0 } else { 30.0 },
        ));
    }
    let seeds: Vec<u64> = (0..rows).map(|_| r.gen()).collect();
    let steps: Vec<u32> = (0..rows).map(|_| r.gen_range(0..5000)).collect();
    let s = Sampling::new(
        &cases.iter().map(|c| c.0).collect::<Vec<_>>(),
        &cases.iter().map(|c| c.1).collect::<Vec<_>>(),
        &cases.iter().map(|c| c.2).collect::<Vec<_>>(),
        &seeds,
        &steps,
    );
    let got = s.draw(&logits, rows, vocab);
    for (row, &(t, k, p)) in cases.iter().enumerate() {
        let want = sample_ref(
            &logits[row * vocab..(row + 1) * vocab],
            t,
            k,
            p,
            seeds[row],
            steps[row],
        );
        assert_eq!(got[row], want, "row {row}: T {t} top_k {k} top_p {p}");
    }
}

#[test]
fn sampling_is_deterministic_per_seed_and_step() {
    let mut r = rng(12);
    let vocab = 1000;
    let row = rand_bf16(&mut r, vocab, 0.5);
    let rows = 64;
    let logits: Vec<bf16> = row.iter().cycle().take(rows * vocab).cloned().collect();
    let steps: Vec<u32> = (0..rows as u32).collect();
    let a = Sampling::uniform(rows, 1.0, 0, 1.0, 42, &steps).draw(&logits, rows, vocab);
    let b = Sampling::uniform(rows, 1.0, 0, 1.0, 42, &steps).draw(&logits, rows, vocab);
    assert_eq!(a, b, "same seeds and steps, same tokens");
    // The batch position does not matter: reversed rows draw the same tokens.
    let rev_steps: Vec<u32> = steps.iter().rev().cloned().collect();
    let c = Sampling::uniform(rows, 1.0, 0, 1.0, 42, &rev_steps).draw(&logits, rows, vocab);
    assert_eq!(a, c.into_iter().rev().collect::<Vec<_>>());
    // Different steps of one request (and different seeds) draw different tokens.
    let distinct = a.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct > rows / 2,
        "only {distinct} distinct tokens in {rows} steps"
    );
    let d = Sampling::uniform(rows, 1.0, 0, 1.0, 43, &steps).draw(&logits, rows, vocab);
    let same = a.iter().zip(&d).filter(|(x, y)| x == y).count();
    assert!(
        same < rows / 4,
        "seeds 42 and 43 agree on {same} of {rows} draws"
    );
}

/// Chi-square statistic of `counts` against `probs` (over the tokens with a probability).
fn chi_square(counts: &[usize], probs: &[f64], draws: usize) -> f64 {
    counts
        .iter()
        .zip(probs)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&c, &p)| {
            let e = p * draws as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

/// Draws `draws` tokens (one per step) from a fixed row and counts them.
fn histogram(logits: &[bf16], t: f32, k: i32, p: f32, draws: usize) -> Vec<usize> {
    let vocab = logits.len();
    let all: Vec<bf16> = logits.iter().cycle().take(draws * vocab).cloned().collect();
    let steps: Vec<u32> = (0..draws as u32).collect();
    let got = Sampling::uniform(draws, t, k, p, 7, &steps).draw(&all, draws, vocab);
    let mut counts = vec![0usize; vocab];
    for g in got {
        counts[g as usize] += 1;
    }
    counts
}

/// Softmax of `logits / t` over the tokens in `keep` (zero elsewhere), in f64.
fn softmax_over(logits: &[bf16], t: f64, keep: &[usize]) -> Vec<f64> {
    let mut p = vec![0f64; logits.len()];
    for &i in keep {
        p[i] = (f(logits[i]) / t).exp();
    }
    let z: f64 = p.iter().sum();
    p.iter().map(|x| x / z).collect()
}

#[test]
fn draws_follow_the_softmax() {
    let logits: Vec<bf16> = [1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5, -0.5, 0.25]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let draws = 20_000;
    // 7 degrees of freedom: the 99.99th percentile of chi-square is about 29.9.
    for &t in &[1.0f32, 0.5] {
        let counts = histogram(&logits, t, 0, 1.0, draws);
        let probs = softmax_over(&logits, t as f64, &(0..8).collect::<Vec<_>>());
        let chi = chi_square(&counts, &probs, draws);
        assert!(chi < 29.9, "T {t}: chi-square {chi:.1}, counts {counts:?}");
    }
    // top_k = 3 renormalises over tokens 2, 5 and 0 (2 degrees of freedom: bound 18.4).
    let counts = histogram(&logits, 1.0, 3, 1.0, draws);
    let probs = softmax_over(&logits, 1.0, &[2, 5, 0]);
    assert!(counts.iter().zip(&probs).all(|(&c, &p)| p > 0.0 || c == 0));
    let chi = chi_square(&counts, &probs, draws);
    assert!(
        chi < 18.4,
        "top_k 3: chi-square {chi:.1}, counts {counts:?}"
    );
}

#[test]
fn top_p_keeps_only_the_nucleus() {
    // At T = 1, in rank order 1, 3, 4, 0, 2, the probabilities are about .504, .270, .144,
    // .053, .028, and the probability before each token 0, .504, .774, .918, .972.
    let logits: Vec<bf16> = [0.0f32, 2.25, -0.625, 1.625, 1.0]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let all = softmax_over(&logits, 1.0, &[0, 1, 2, 3, 4]);
    assert!((all[1] - 0.504).abs() < 0.001 && (all[3] - 0.270).abs() < 0.001);
    assert!((all[4] - 0.144).abs() < 0.001);
    let draws = 6000;
    for &(top_p, nucleus) in &[
        (0.3f32, &[1usize][..]),
        (0.6, &[1, 3][..]),
        (0.8, &[1, 3, 4][..]),
        (1.0, &[1, 3, 4, 0, 2][..]),
    ] {
        let counts = histogram(&logits, 1.0, 0, top_p, draws);
        for (tok, &c) in counts.iter().enumerate() {
            if nucleus.contains(&tok) {
                assert!(
                    c > 0,
                    "top_p {top_p}: token {tok} of the nucleus never drawn"
                );
            } else {
                assert_eq!(c, 0, "top_p {top_p}: token {tok} outside the nucleus drawn");
            }
        }
        let probs = softmax_over(&logits, 1.0, nucleus);
        let chi = chi_square(&counts, &probs, draws);
        assert!(
            chi < 25.0,
            "top_p {top_p}: chi-square {chi:.1}, counts {counts:?}"
        );
    }
}

#[test]
fn sample_rejects_bad_parameters() {
    let logits = vec![bf16::ONE; 20];
    let be = CpuBackend::new();
    let run = |s: &Sampling, out_len: usize| {
        be.sample(
            &buf(&logits),
            2,
            10,
            &SamplingBufs {
                temperatures: &s.temperatures,
                top_k: &s.top_k,
                top_p: &s.top_p,
                seeds: &s.seeds,
                steps: &s.steps,
            },
            &mut buf(&vec![0u32; out_len]),
        )
    };
    let ok = Sampling::uniform(2, 1.0, 0, 1.0, 1, &[0, 1]);
    run(&ok, 2).unwrap();
    assert_shape_err(run(&ok, 1), "sample", "out");
    let s = Sampling::new(&[1.0, -1.0], &[0, 0], &[1.0, 1.0], &[1, 1], &[0, 0]);
    assert_err_mentions(run(&s, 2), "temperatures[1]");
    let s = Sampling::new(&[1.0, 1.0], &[0, 0], &[0.0, 1.0], &[1, 1], &[0, 0]);
    assert_err_mentions(run(&s, 2), "top_p[0]");
    let s = Sampling::new(&[1.0, 1.0], &[0, 0], &[1.0, 1.0], &[1], &[0, 0]);
    assert_shape_err(run(&s, 2), "sample", "seeds");
}

// ---------------------------------------------------------------- memory

#[test]
fn memory_and_copies() {
    let be = CpuBackend::new();
    let (free, total) = be.memory_info().unwrap();
    assert!(free > 0 && free <= total, "free {free}, total {total}");
    let mut b = be.alloc::<u32>(5).unwrap();
    be.htod(&[1, 2, 3], &mut b).unwrap();
    let mut host = [0u32; 3];
    be.dtoh(&b, &mut host).unwrap();
    assert_eq!(host, [1, 2, 3]);
    assert_eq!(be.len(&b), 5);
    assert_eq!(be.zeros::<f32>(4).unwrap().as_slice(), &[0.0; 4]);
    assert_eq!(be.from_host(&[7u8, 8]).unwrap().into_vec(), vec![7, 8]);
}
