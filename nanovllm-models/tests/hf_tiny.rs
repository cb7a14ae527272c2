//! Qwen3 on the CPU backend against Hugging Face transformers, on the tiny random checkpoints of
//! `tests/fixtures/` (made by `scripts/make_tiny_qwen3.py`): `tiny-qwen3` (tied embeddings,
//! 4 query heads over 2 key/value heads) and `tiny-qwen3-untied` (own `lm_head.weight`, 8 query
//! heads over 2 key/value heads).
//!
//! Every path a step can take through the model is checked against transformers' logits:
//! one prompt per prefill, three prompts in one prefill, a prompt prefilled in two chunks, a
//! prompt whose first blocks are already cached by another sequence (prefix caching), batched
//! greedy decode one token at a time, and the model split over two tensor-parallel ranks.
//!
//! ## The bounds
//! Each position's logits vector is compared with transformers' by relative L2 error,
//! `|ours - hf| / |hf|`. Both sides compute in bf16, and bf16 alone moves these logits a long
//! way: the fixture records, per position, the distance between transformers' bf16 logits and
//! the same weights run in float32 (`prefill_bf16_noise`), and it is 0.5e-2 to 1.8e-2 (mean
//! 1.1e-2). Our logits sit as far from the float32 run (measured: 1.0e-2 mean, 1.8e-2 worst),
//! but their rounding errors fall elsewhere (transformers rounds after every torch op - RoPE's
//! cos/sin and products, the attention scores and probabilities - where the backend
//! accumulates in f32 and rounds once per op), so ours and transformers' differ by about the
//! noise floor again: measured, per prompt, 0.8 to 1.1 times its mean floor, and 2.8e-2 at the
//! worst position. Hence two bounds:
//! * every position: [`REL_L2_BOUND`] = 5e-2;
//! * per prompt, the mean over positions: at most [`NOISE_FACTOR`] = 2 times the mean
//!   recorded noise floor (fully independent errors of equal size would give 1.41).
//!
//! A real defect lands well above: run once by hand against deliberately broken models, the
//! q heads normalised with k_norm's weight gave 0.07 to 0.18 at the first position after 0,
//! RoPE's cos and sin halves swapped 0.12 to 0.25, `rope_theta` 1e4 instead of 1e6 0.07 to
//! 0.15, and every prefill and decode test failed.
//!
//! Greedy tokens must equal transformers' except where transformers' own top-2 gap is within
//! [`GAP_TOL`] = 0.125: the logits of the two sides differ by up to 0.067 per element (rms
//! 0.01; a bf16 step is 0.016 at the logits' magnitude of 2 to 4), so a top-2 closer than
//! twice that is decided by rounding and either side's choice is legitimate. After such a step the test feeds transformers' token, so that later
//! steps stay comparable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::bf16;
use nanovllm_kernels::cpu::{CpuBackend, CpuBuf};
use nanovllm_kernels::Backend;
use nanovllm_layers::context::Context;
use nanovllm_layers::loader::WeightSource;
use nanovllm_layers::tp::{SingleRank, ThreadComm, TpComm};
use nanovllm_models::qwen3::{KvCache, Qwen3ForCausalLM, Workspace};
use nanovllm_utils::{ModelConfig, Result, Weights};

/// Largest relative L2 error allowed between our logits and transformers' at any position
/// (see the module doc).
const REL_L2_BOUND: f64 = 5e-2;
/// The mean error over a prompt's positions may be at most this many times the mean bf16
/// noise floor transformers recorded for them.
const NOISE_FACTOR: f64 = 2.0;
/// A top-2 gap this small (in logits) means the two best tokens tie up to bf16 rounding.
const GAP_TOL: f32 = 0.125;
const BLOCK_SIZE: usize = 16;
const NUM_BLOCKS: usize = 64;
const MAX_TOKENS: usize = 128;

/// One prompt and transformers' results for it.
struct Case {
    prompt: Vec<u32>,
    /// `[prompt.len()][vocab]` teacher-forced logits.
    logits: Vec<Vec<f32>>,
    /// Per position, transformers' bf16 logits' relative L2 distance from a float32 run.
    noise: Vec<f64>,
    greedy: Vec<u32>,
    /// `[16][vocab]`: logits of greedy step j (prompt + greedy[..j] seen).
    greedy_logits: Vec<Vec<f32>>,
    greedy_gap: Vec<f32>,
}

struct Fixture {
    dir: PathBuf,
    config: ModelConfig,
    cases: Vec<Case>,
}

fn fixture(name: &str) -> Fixture {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let config = ModelConfig::from_model_dir(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let logits_file = dir.join(json["logits_file"].as_str().unwrap());
    let logits = Weights::open(logits_file.parent().unwrap()).unwrap();
    let vocab = config.vocab_size;
    let rows = |name: &str, n: usize| -> Vec<Vec<f32>> {
        let flat = logits.load_bf16(name, &[n, vocab]).unwrap();
        flat.chunks(vocab)
            .map(|r| r.iter().map(|x| x.to_f32()).collect())
            .collect()
    };
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let prompt = ids(&c["prompt"]);
            let greedy = ids(&c["greedy"]);
            Case {
                logits: rows(&format!("logits.{i}"), prompt.len()),
                greedy_logits: rows(&format!("greedy_logits.{i}"), greedy.len()),
                noise: c["prefill_bf16_noise"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_f64().unwrap())
                    .collect(),
                greedy_gap: c["greedy_top2_gap"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_f64().unwrap() as f32)
                    .collect(),
                prompt,
                greedy,
            }
        })
        .collect();
    Fixture { dir, config, cases }
}

fn rel_l2(ours: &[f32], hf: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in ours.iter().zip(hf) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    (num / den).sqrt()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Asserts that each row of `ours` is within [`REL_L2_BOUND`] of the matching row of `hf`;
/// returns the errors.
fn check_rows(ours: &[Vec<f32>], hf: &[Vec<f32>], what: &str) -> Vec<f64> {
    assert_eq!(ours.len(), hf.len(), "{what}: rows");
    let mut errors = vec![];
    for (p, (o, h)) in ours.iter().zip(hf).enumerate() {
        let e = rel_l2(o, h);
        assert!(
            e < REL_L2_BOUND,
            "{what}: position {p}: relative L2 error {e:.4} >= {REL_L2_BOUND}"
        );
        errors.push(e);
    }
    errors
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// [`check_rows`] for positions `from..` of prompt `c`, plus the mean bound against the
/// recorded noise floor of those positions; returns the worst error.
fn check_prompt(ours: &[Vec<f32>], c: &Case, from: usize, what: &str) -> f64 {
    let errors = check_rows(ours, &c.logits[from..], what);
    let (ours_mean, floor) = (mean(&errors), mean(&c.noise[from..]));
    assert!(
        ours_mean <= NOISE_FACTOR * floor,
        "{what}: mean relative L2 error {ours_mean:.4} > {NOISE_FACTOR} x the bf16 noise floor \
         {floor:.4}"
    );
    errors.iter().cloned().fold(0.0, f64::max)
}

/// One sequence's part of a step: compute `tokens` at positions `start..`, with the sequence's
/// KV blocks in `block_table` (which must cover `start + tokens.len()` tokens).
struct SeqStep<'a> {
    tokens: &'a [u32],
    start: usize,
    block_table: &'a [i32],
}

/// A model on the CPU backend with its KV cache and workspace, and step buffers built on the
/// host as the model runner builds them.
struct Runner {
    be: CpuBackend,
    model: Qwen3ForCausalLM<CpuBackend>,
    kv: KvCache<CpuBackend>,
    ws: Workspace<CpuBackend>,
    vocab: usize,
    next_block: i32,
}

impl Runner {
    fn new(
        config: &ModelConfig,
        comm: Arc<dyn TpComm<CpuBackend>>,
        src: &dyn WeightSource,
    ) -> Self {
        let be = CpuBackend::new();
        let tp = comm.size();
        let mut model = Qwen3ForCausalLM::new(&be, config, comm).unwrap();
        model.load_from(&be, src).unwrap();
        let kv = KvCache::new(&be, config, tp, NUM_BLOCKS, BLOCK_SIZE).unwrap();
        let ws = Workspace::new(&be, &model, MAX_TOKENS, MAX_TOKENS).unwrap();
        Runner {
            be,
            model,
            kv,
            ws,
            vocab: config.vocab_size,
            next_block: 0,
        }
    }

    fn from_fixture(f: &Fixture) -> Self {
        let weights = Weights::open(&f.dir).unwrap();
        Self::new(&f.config, Arc::new(SingleRank), &weights)
    }

    /// Fresh block ids for a sequence of `len` tokens.
    fn blocks(&mut self, len: usize) -> Vec<i32> {
        let n = len.div_ceil(BLOCK_SIZE) as i32;
        let ids = (self.next_block..self.next_block + n).collect();
        self.next_block += n;
        assert!(self.next_block as usize <= NUM_BLOCKS);
        ids
    }

    /// Runs one step and returns the logits of `logits_rows` (all rows when `None`).
    fn step(
        &mut self,
        is_prefill: bool,
        seqs: &[SeqStep<'_>],
        logits_rows: Option<&[i32]>,
    ) -> Result<Vec<Vec<f32>>> {
        let be = &self.be;
        let (mut ids, mut pos, mut slots) = (vec![], vec![], vec![]);
        let (mut cu_q, mut cu_k, mut ctx_lens) = (vec![0i32], vec![0i32], vec![]);
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap();
        let mut tables = vec![-1i32; seqs.len() * max_blocks];
        let (mut max_q, mut max_k) = (0, 0);
        for (s, seq) in seqs.iter().enumerate() {
            for (i, &t) in seq.tokens.iter().enumerate() {
                let p = seq.start + i;
                ids.push(t);
                pos.push(p as i32);
                slots.push(
                    seq.block_table[p / BLOCK_SIZE] * BLOCK_SIZE as i32 + (p % BLOCK_SIZE) as i32,
                );
            }
            let len_k = seq.start + seq.tokens.len();
            cu_q.push(cu_q[s] + seq.tokens.len() as i32);
            cu_k.push(cu_k[s] + len_k as i32);
            ctx_lens.push(len_k as i32);
            max_q = max_q.max(seq.tokens.len());
            max_k = max_k.max(len_k);
            tables[s * max_blocks..s * max_blocks + seq.block_table.len()]
                .copy_from_slice(seq.block_table);
        }
        let rows: Vec<i32> = match logits_rows {
            Some(r) => r.to_vec(),
            None => (0..ids.len() as i32).collect(),
        };
        let input_ids = be.from_host(&ids)?;
        let positions = be.from_host(&pos)?;
        let slot_mapping = be.from_host(&slots)?;
        let cu_seqlens_q = be.from_host(&cu_q)?;
        let cu_seqlens_k = be.from_host(&cu_k)?;
        let context_lens = be.from_host(&ctx_lens)?;
        let block_tables = be.from_host(&tables)?;
        let logits_indices = be.from_host(&rows)?;
        let ctx = Context {
            is_prefill,
            num_tokens: ids.len(),
            num_seqs: seqs.len(),
            positions: &positions,
            slot_mapping: &slot_mapping,
            cu_seqlens_q: &cu_seqlens_q,
            cu_seqlens_k: &cu_seqlens_k,
            max_seqlen_q: max_q,
            max_seqlen_k: max_k,
            context_lens: &context_lens,
            max_context_len: max_k,
            block_tables: &block_tables,
            max_blocks_per_seq: max_blocks,
            logits_indices: &logits_indices,
            num_logits: rows.len(),
        };
        self.model
            .forward(be, &input_ids, &ctx, &mut self.kv, &mut self.ws)?;
        let logits: &CpuBuf<bf16> = self.model.compute_logits(be, &ctx, &mut self.ws, true)?;
        let width = logits.len() / MAX_TOKENS; // vocab on rank 0, vocab / tp elsewhere
        Ok(logits.as_slice()[..rows.len() * width]
            .chunks(width)
            .map(|r| r.iter().map(|x| x.to_f32()).collect())
            .collect())
    }

    fn prefill_all_rows(&mut self, seqs: &[SeqStep<'_>]) -> Vec<Vec<f32>> {
        self.step(true, seqs, None).unwrap()
    }
}

fn each_fixture(f: impl Fn(&Fixture)) {
    for name in ["tiny-qwen3", "tiny-qwen3-untied"] {
        f(&fixture(name));
    }
}

#[test]
fn prefill_one_prompt_at_a_time_matches_hf() {
    each_fixture(|f| {
        let mut r = Runner::from_fixture(f);
        let mut worst = 0.0f64;
        for (i, c) in f.cases.iter().enumerate() {
            let table = r.blocks(c.prompt.len());
            let ours = r.prefill_all_rows(&[SeqStep {
                tokens: &c.prompt,
                start: 0,
                block_table: &table,
            }]);
            let what = format!("{:?} prompt {i}", f.dir);
            worst = worst.max(check_prompt(&ours, c, 0, &what));
        }
        eprintln!(
            "{:?}: worst relative L2 error {worst:.2e}",
            f.dir.file_name().unwrap()
        );
    });
}

#[test]
fn prefill_three_prompts_in_one_batch_matches_hf() {
    each_fixture(|f| {
        let mut r = Runner::from_fixture(f);
        let tables: Vec<Vec<i32>> = f.cases.iter().map(|c| r.blocks(c.prompt.len())).collect();
        let seqs: Vec<SeqStep> = f
            .cases
            .iter()
            .zip(&tables)
            .map(|(c, t)| SeqStep {
                tokens: &c.prompt,
                start: 0,
                block_table: t,
            })
            .collect();
        let ours = r.prefill_all_rows(&seqs);
        let mut at = 0;
        for (i, c) in f.cases.iter().enumerate() {
            let n = c.prompt.len();
            check_prompt(&ours[at..at + n], c, 0, &format!("batched prompt {i}"));
            at += n;
        }
    });
}

/// The longest prompt in two chunks (split inside a block): the second chunk's queries attend
/// the first chunk's keys from the cache (`len_k > len_q`).
#[test]
fn chunked_prefill_matches_hf() {
    each_fixture(|f| {
        let c = &f.cases[2];
        let mut r = Runner::from_fixture(f);
        let table = r.blocks(c.prompt.len());
        for split in [23, 1, 39] {
            let first = r.prefill_all_rows(&[SeqStep {
                tokens: &c.prompt[..split],
                start: 0,
                block_table: &table,
            }]);
            let second = r.prefill_all_rows(&[SeqStep {
                tokens: &c.prompt[split..],
                start: split,
                block_table: &table,
            }]);
            check_rows(
                &first,
                &c.logits[..split],
                &format!("chunk 1 of split {split}"),
            );
            check_prompt(&second, c, split, &format!("chunk 2 of split {split}"));
        }
    });
}

/// Prefix caching: sequence A prefills the longest prompt; sequence B, the same prompt, finds
/// A's first two blocks cached and computes only its last 8 tokens into a block of its own,
/// batched with a fresh prompt that has no cached prefix.
#[test]
fn prefix_cached_prefill_matches_hf() {
    each_fixture(|f| {
        let (c, fresh) = (&f.cases[2], &f.cases[1]);
        let mut r = Runner::from_fixture(f);
        let a = r.blocks(c.prompt.len());
        r.prefill_all_rows(&[SeqStep {
            tokens: &c.prompt,
            start: 0,
            block_table: &a,
        }]);
        let cached = 2 * BLOCK_SIZE;
        let b = [a[0], a[1], r.blocks(BLOCK_SIZE)[0]];
        let fresh_table = r.blocks(fresh.prompt.len());
        let ours = r.prefill_all_rows(&[
            SeqStep {
                tokens: &fresh.prompt,
                start: 0,
                block_table: &fresh_table,
            },
            SeqStep {
                tokens: &c.prompt[cached..],
                start: cached,
                block_table: &b,
            },
        ]);
        let n = fresh.prompt.len();
        check_prompt(&ours[..n], fresh, 0, "fresh prompt beside a cached one");
        check_prompt(&ours[n..], c, cached, "prompt with a cached prefix");
    });
}

/// Runs the three prompts as the engine would: one prefill asking only for each sequence's
/// last row, then 16 batched decode steps. Returns the worst logits error and how many steps
/// went through a near-tie.
fn greedy_decode(f: &Fixture, r: &mut Runner) -> (f64, usize) {
    let n_new = f.cases[0].greedy.len();
    let tables: Vec<Vec<i32>> = f
        .cases
        .iter()
        .map(|c| r.blocks(c.prompt.len() + n_new))
        .collect();
    let seqs: Vec<SeqStep> = f
        .cases
        .iter()
        .zip(&tables)
        .map(|(c, t)| SeqStep {
            tokens: &c.prompt,
            start: 0,
            block_table: t,
        })
        .collect();
    let mut last_rows = vec![];
    let mut at = -1;
    for c in &f.cases {
        at += c.prompt.len() as i32;
        last_rows.push(at);
    }
    let mut logits = r.step(true, &seqs, Some(&last_rows)).unwrap();
    let (mut worst, mut ties) = (0.0f64, 0);
    for step in 0..n_new {
        let mut fed = vec![];
        for (s, c) in f.cases.iter().enumerate() {
            let what = format!("prompt {s} greedy step {step}");
            let e = check_rows(&logits[s..s + 1], &c.greedy_logits[step..step + 1], &what);
            worst = worst.max(e[0]);
            let ours = argmax(&logits[s]);
            if ours != c.greedy[step] {
                assert!(
                    c.greedy_gap[step] <= GAP_TOL,
                    "{what}: token {ours}, transformers {} (top-2 gap {})",
                    c.greedy[step],
                    c.greedy_gap[step]
                );
                ties += 1;
            }
            fed.push([c.greedy[step]]);
        }
        if step + 1 == n_new {
            break;
        }
        let seqs: Vec<SeqStep> = f
            .cases
            .iter()
            .zip(&tables)
            .zip(&fed)
            .map(|((c, t), tok)| SeqStep {
                tokens: tok,
                start: c.prompt.len() + step,
                block_table: t,
            })
            .collect();
        logits = r.step(false, &seqs, None).unwrap();
    }
    (worst, ties)
}

#[test]
fn greedy_decode_matches_hf() {
    each_fixture(|f| {
        let mut r = Runner::from_fixture(f);
        let (worst, ties) = greedy_decode(f, &mut r);
        eprintln!(
            "{:?}: decode worst relative L2 error {worst:.2e}, {ties} near-tie token(s)",
            f.dir.file_name().unwrap()
        );
    });
}

/// The untied fixture split over two ranks (threads): 4 query heads and 1 key/value head per
/// rank, half the MLP, half the vocabulary per rank; rank 0's logits must match transformers
/// and the unsharded model. Run three times: with the row-parallel layers leaving partial sums
/// to the norms' fused all-reduce (as decode steps do), with them summing in the product's call
/// from one row on (as prefill steps on NCCL do), and, from two rows on (the prefill, not the
/// one-row decode step), with those sums' norms sharing the rows out between the ranks (each
/// rank's residual stream holding only its own rows, and the model's second `hidden` swapped
/// in for the prefill and out for the decode step, as with NCCL's group of two); all must give
/// the same bits.
#[test]
fn tensor_parallel_two_ranks_match_hf() {
    let f = fixture("tiny-qwen3-untied");
    let weights = Weights::open(&f.dir).unwrap();
    let fused = tensor_parallel_run(&f, &weights, usize::MAX, false);
    let summed = tensor_parallel_run(&f, &weights, 1, false);
    assert!(fused == summed, "summing in the product changed the logits");
    let shared = tensor_parallel_run(&f, &weights, 2, true);
    assert!(fused == shared, "sharing the rows out changed the logits");
}

/// Prefill and one decode step of case 1 on two ranks (threads) whose row-parallel layers sum
/// in the product's call from `sum_from` rows on (the norms after them sharing the rows out
/// where `shared_rows`); checks them against transformers and answers rank 0's (prefill,
/// decode) logits.
fn tensor_parallel_run(
    f: &Fixture,
    weights: &Weights,
    sum_from: usize,
    shared_rows: bool,
) -> Vec<Vec<Vec<f32>>> {
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|comm| comm.with_gemm_all_reduce_from(sum_from))
            .map(|comm| match shared_rows {
                true => comm.with_shared_rows(),
                false => comm,
            })
            .map(|comm| {
                let (f, weights) = (f, weights);
                s.spawn(move || {
                    let mut r = Runner::new(&f.config, Arc::new(comm), weights);
                    let c = &f.cases[1];
                    let table = r.blocks(c.prompt.len() + c.greedy.len());
                    let prefill = r.prefill_all_rows(&[SeqStep {
                        tokens: &c.prompt,
                        start: 0,
                        block_table: &table,
                    }]);
                    let decode = r
                        .step(
                            false,
                            &[SeqStep {
                                tokens: &c.greedy[..1],
                                start: c.prompt.len(),
                                block_table: &table,
                            }],
                            None,
                        )
                        .unwrap();
                    (prefill, decode)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let c = &f.cases[1];
    let (prefill, decode) = &results[0];
    assert_eq!(prefill[0].len(), f.config.vocab_size);
    check_prompt(prefill, c, 0, "tp=2 prefill");
    check_rows(decode, &c.greedy_logits[1..2], "tp=2 decode");
    // Rank 1 holds the upper half of the vocabulary of the same rows.
    let half = f.config.vocab_size / 2;
    let (prefill1, _) = &results[1];
    for (row0, row1) in prefill.iter().zip(prefill1) {
        assert_eq!(&row0[half..], &row1[..]);
    }
    vec![prefill.clone(), decode.clone()]
}

/// A source that hides one tensor of another.
struct Without<'a> {
    inner: &'a Weights,
    hidden: &'a str,
}

impl WeightSource for Without<'_> {
    fn location(&self) -> PathBuf {
        self.inner.location()
    }
    fn contains(&self, name: &str) -> bool {
        name != self.hidden && self.inner.contains(name)
    }
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        self.inner.load(name, shape)
    }
    fn load_narrow(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<bf16>> {
        self.inner.load_narrow(name, shape, dim, start, len)
    }
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let be = CpuBackend::new();
    let tied = fixture("tiny-qwen3");
    let untied = fixture("tiny-qwen3-untied");
    let tied_w = Weights::open(&tied.dir).unwrap();
    let untied_w = Weights::open(&untied.dir).unwrap();

    let mut m = Qwen3ForCausalLM::new(&be, &tied.config, Arc::new(SingleRank)).unwrap();
    for name in [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ] {
        let src = Without {
            inner: &tied_w,
            hidden: name,
        };
        let err = m.load_from(&be, &src).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("missing"), "{err}");
    }
    // The tied checkpoint has no lm_head.weight: fine for the tied config...
    m.load_weights(&be, &tied_w).unwrap();
    // ...an error for the untied one.
    let mut u = Qwen3ForCausalLM::new(&be, &untied.config, Arc::new(SingleRank)).unwrap();
    let src = Without {
        inner: &untied_w,
        hidden: "lm_head.weight",
    };
    let err = u.load_from(&be, &src).unwrap_err().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    // The untied checkpoint's q_proj has 8 heads, the tied config wants 4.
    let err = m.load_weights(&be, &untied_w).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
    // A failed load leaves a tied model usable after a good one.
    let bad = Without {
        inner: &tied_w,
        hidden: "model.norm.weight",
    };
    assert!(m.load_from(&be, &bad).is_err());
    m.load_weights(&be, &tied_w).unwrap();
}

#[test]
fn step_larger_than_the_workspace_is_an_error() {
    let f = fixture("tiny-qwen3");
    let mut r = Runner::from_fixture(&f);
    let long: Vec<u32> = (0..MAX_TOKENS as u32 + 1).collect();
    let table = r.blocks(long.len());
    let err = r
        .step(
            true,
            &[SeqStep {
                tokens: &long,
                start: 0,
                block_table: &table,
            }],
            Some(&[0]),
        )
        .unwrap_err();
    assert!(err.to_string().contains("max_num_tokens"), "{err}");
}

/// Dummy weights: deterministic per seed, and the same model under tensor parallelism.
#[test]
fn dummy_weights_are_seeded_and_tp_invariant() {
    let f = fixture("tiny-qwen3");
    let be = CpuBackend::new();
    let c = &f.cases[1];
    let run = |r: &mut Runner| {
        let table = r.blocks(c.prompt.len());
        r.prefill_all_rows(&[SeqStep {
            tokens: &c.prompt,
            start: 0,
            block_table: &table,
        }])
    };
    let dummy = |seed: u64| {
        let mut m = Qwen3ForCausalLM::new(&be, &f.config, Arc::new(SingleRank)).unwrap();
        m.load_dummy(&be, seed).unwrap();
        m
    };
    let mut runs = vec![];
    for seed in [5, 5, 6] {
        let model = dummy(seed);
        let ws = Workspace::new(&be, &model, MAX_TOKENS, MAX_TOKENS).unwrap();
        let kv = KvCache::new(&be, &f.config, 1, NUM_BLOCKS, BLOCK_SIZE).unwrap();
        let mut r = Runner {
            be,
            model,
            kv,
            ws,
            vocab: f.config.vocab_size,
            next_block: 0,
        };
        runs.push(run(&mut r));
        assert_eq!(r.vocab, runs[0][0].len());
    }
    assert!(runs[0].iter().flatten().all(|x| x.is_finite()));
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[0], runs[2]);

    let tp2 = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|comm| {
                let f = &f;
                s.spawn(move || {
                    let src = nanovllm_models::DummyWeights::new(5);
                    run(&mut Runner::new(&f.config, Arc::new(comm), &src))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (p, (a, b)) in tp2[0].iter().zip(&runs[0]).enumerate() {
        // Not bit-equal: row-parallel layers round each rank's partial sum before adding.
        let e = rel_l2(a, b);
        assert!(e < 1e-2, "position {p}: tp=2 vs tp=1 relative L2 {e}");
    }
}
