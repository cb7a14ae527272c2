//! End to end on the CPU backend: the `LLM` API over the tiny Qwen3 fixture (a real
//! transformers checkpoint with random weights, made by scripts/make_tiny_qwen3.py), checked
//! against HF transformers' greedy tokens, in every engine mode: prefix caching on and off,
//! chunked prefill, preemption, streaming; plus request refusals and seeded sampling.

mod common;

use common::{assert_matches_hf, cases, fixture, greedy, prompts};
use nanovllm::{Device, EngineArgs, EngineConfig, FinishReason, Prompt, SamplingParams, LLM};

fn llm(tweak: impl FnOnce(&mut EngineConfig)) -> LLM {
    let mut config = EngineConfig {
        num_kvcache_blocks: Some(64),
        kvcache_block_size: 16,
        max_num_batched_tokens: 1024,
        max_num_seqs: 16,
        ..Default::default()
    };
    tweak(&mut config);
    let args = EngineArgs {
        config,
        device: Device::Cpu,
        ..Default::default()
    };
    LLM::new(fixture().to_str().unwrap(), args).unwrap()
}

#[test]
fn greedy_matches_hf_in_every_engine_mode() {
    let cases = cases();
    let n = cases[0].greedy.len();
    let mut reference: Option<Vec<Vec<u32>>> = None;
    type Tweak = Box<dyn Fn(&mut EngineConfig)>;
    let modes: Vec<(&str, Tweak)> = vec![
        ("default", Box::new(|_| {})),
        (
            "no prefix caching",
            Box::new(|c| c.enable_prefix_caching = false),
        ),
        (
            "chunked prefill",
            Box::new(|c| c.max_num_batched_tokens = 8),
        ),
        (
            "preemption",
            Box::new(|c| {
                c.num_kvcache_blocks = Some(5);
                c.max_model_len = 64;
            }),
        ),
        ("block size 256", Box::new(|c| c.kvcache_block_size = 256)),
    ];
    for (name, tweak) in modes {
        let mut llm = llm(tweak);
        let outputs = llm.generate(&prompts(&cases), &[greedy(n)], false).unwrap();
        let tokens: Vec<Vec<u32>> = outputs.iter().map(|o| o.token_ids.clone()).collect();
        for (out, case) in outputs.iter().zip(&cases) {
            assert_eq!(out.prompt_token_ids, case.prompt, "{name}: prompt order");
            assert_eq!(out.finish_reason, FinishReason::Length, "{name}");
            assert_matches_hf(&out.token_ids, case, name);
        }
        match &reference {
            None => reference = Some(tokens),
            Some(r) => assert_eq!(&tokens, r, "{name}: tokens differ from the default mode"),
        }
    }
}

#[test]
fn repeated_prompts_hit_the_prefix_cache_and_give_the_same_tokens() {
    let cases = cases();
    let long = &cases[2]; // 40 tokens: two full blocks of 16 are shareable
    let mut llm = llm(|_| {});
    let first = llm
        .generate(&[Prompt::Tokens(long.prompt.clone())], &[greedy(8)], false)
        .unwrap();
    let again = llm
        .generate(
            &[
                Prompt::Tokens(long.prompt.clone()),
                Prompt::Tokens(long.prompt.clone()),
            ],
            &[greedy(8)],
            false,
        )
        .unwrap();
    assert_eq!(again[0].token_ids, first[0].token_ids);
    assert_eq!(again[1].token_ids, first[0].token_ids);
    assert_matches_hf(&first[0].token_ids, long, "prefix cache");
}

#[test]
fn streaming_steps_give_the_same_tokens_as_generate() {
    let cases = cases();
    let mut llm = llm(|_| {});
    let expected = llm
        .generate(&prompts(&cases), &[greedy(10)], false)
        .unwrap();
    let ids: Vec<u64> = cases
        .iter()
        .map(|c| {
            llm.add_request(&Prompt::Tokens(c.prompt.clone()), greedy(10))
                .unwrap()
        })
        .collect();
    let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); ids.len()];
    let mut finished = 0;
    while !llm.is_finished() {
        for ev in llm.step().unwrap() {
            let i = ids.iter().position(|&id| id == ev.request_id).unwrap();
            streamed[i].extend(&ev.new_token_ids);
            finished += ev.finish_reason.is_some() as usize;
        }
    }
    assert_eq!(finished, ids.len());
    for (s, e) in streamed.iter().zip(&expected) {
        assert_eq!(s, &e.token_ids);
    }
}

#[test]
fn bad_requests_are_refused_and_the_engine_keeps_serving() {
    let cases = cases();
    let mut llm = llm(|_| {});
    let refusals: Vec<(Prompt, SamplingParams, &str)> = vec![
        (Prompt::Tokens(vec![]), greedy(4), "no tokens"),
        (Prompt::Tokens(vec![1, 2, 5000]), greedy(4), "vocab"),
        (Prompt::Tokens(vec![7; 600]), greedy(4), "max_model_len"),
        (
            Prompt::Tokens(vec![7; 4]),
            SamplingParams {
                temperature: -1.0,
                ..greedy(4)
            },
            "temperature",
        ),
        (
            Prompt::Tokens(vec![7; 4]),
            SamplingParams {
                top_p: 0.0,
                ..greedy(4)
            },
            "top_p",
        ),
        (
            Prompt::Tokens(vec![7; 4]),
            SamplingParams {
                max_tokens: 0,
                ..greedy(4)
            },
            "max_tokens",
        ),
        (Prompt::Text("hello".into()), greedy(4), "tokenizer"),
    ];
    for (prompt, params, word) in refusals {
        let err = llm
            .generate(&[prompt], &[params], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(word),
            "error `{err}` does not mention `{word}`"
        );
    }
    let outputs = llm
        .generate(&prompts(&cases), &[greedy(16)], false)
        .unwrap();
    for (out, case) in outputs.iter().zip(&cases) {
        assert_matches_hf(&out.token_ids, case, "after refusals");
    }
}

/// The model runner runs a decode batch with its longest contexts first and hands the tokens
/// back in the batch's own order: prompts given shortest first and longest first must each get
/// exactly the tokens they get alone (the CPU backend computes every row on its own, so a
/// sequence's tokens do not depend on its batch).
#[test]
fn decode_batches_in_any_length_order_give_each_sequence_its_own_tokens() {
    let cases = cases();
    let n = cases[0].greedy.len();
    let mut llm = llm(|_| {});
    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let out = llm
                .generate(&[Prompt::Tokens(c.prompt.clone())], &[greedy(n)], false)
                .unwrap();
            out[0].token_ids.clone()
        })
        .collect();
    let mut order: Vec<usize> = (0..cases.len()).collect();
    order.sort_by_key(|&i| cases[i].prompt.len());
    for pass in ["shortest first", "longest first"] {
        let batch: Vec<Prompt> = order
            .iter()
            .map(|&i| Prompt::Tokens(cases[i].prompt.clone()))
            .collect();
        let outputs = llm.generate(&batch, &[greedy(n)], false).unwrap();
        for (out, &i) in outputs.iter().zip(&order) {
            assert_eq!(
                out.prompt_token_ids, cases[i].prompt,
                "{pass}: prompt order"
            );
            assert_eq!(out.token_ids, alone[i], "{pass}: prompt {i}'s tokens");
        }
        order.reverse();
    }
}

#[test]
fn seeded_sampling_is_reproducible_at_any_batch_position() {
    let cases = cases();
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        max_tokens: 12,
        ignore_eos: true,
        seed: Some(7),
        stop_token_ids: vec![],
    };
    let mut llm = llm(|_| {});
    let (a, b) = (&cases[0].prompt, &cases[1].prompt);
    let ab = llm
        .generate(
            &[Prompt::Tokens(a.clone()), Prompt::Tokens(b.clone())],
            std::slice::from_ref(&params),
            false,
        )
        .unwrap();
    let ba = llm
        .generate(
            &[Prompt::Tokens(b.clone()), Prompt::Tokens(a.clone())],
            std::slice::from_ref(&params),
            false,
        )
        .unwrap();
    assert_eq!(ab[0].token_ids, ba[1].token_ids);
    assert_eq!(ab[1].token_ids, ba[0].token_ids);
    let other_seed = llm
        .generate(
            &[Prompt::Tokens(a.clone())],
            &[SamplingParams {
                seed: Some(8),
                ..params
            }],
            false,
        )
        .unwrap();
    assert_ne!(
        other_seed[0].token_ids, ab[0].token_ids,
        "the seed changes nothing"
    );
}

/// `generate` detokenizes each sequence as it finishes (on a thread of its own); every output's
/// text must still be the decode of its own tokens, whatever order the sequences finish in.
#[test]
fn generated_text_is_each_outputs_own_decode() {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture()).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
        }
    }
    let gz = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen3-tokenizer/tokenizer.json.gz");
    let mut json = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()),
        &mut json,
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
    let args = EngineArgs {
        config: EngineConfig {
            num_kvcache_blocks: Some(64),
            kvcache_block_size: 16,
            max_num_seqs: 16,
            ..Default::default()
        },
        device: Device::Cpu,
        ..Default::default()
    };
    let mut llm = LLM::new(dir.path().to_str().unwrap(), args).unwrap();
    let cases = cases();
    // Longest first, so that the sequences finish in the reverse of prompt order.
    let params: Vec<SamplingParams> = (0..4)
        .map(|i| SamplingParams {
            temperature: 0.0,
            max_tokens: 12 - 3 * i,
            ignore_eos: true,
            ..Default::default()
        })
        .collect();
    let prompts: Vec<Prompt> = (0..4)
        .map(|i| Prompt::Tokens(cases[i % cases.len()].prompt.clone()))
        .collect();
    let outputs = llm.generate(&prompts, &params, false).unwrap();
    let tokenizer = llm.tokenizer().expect("the copy has a tokenizer.json");
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(out.token_ids.len(), 12 - 3 * i);
        let text = tokenizer.decode(&out.token_ids, true).unwrap();
        assert!(!text.is_empty());
        assert_eq!(out.text, text, "output {i}");
    }
}
