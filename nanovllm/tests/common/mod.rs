//! Helpers the end-to-end tests share: the tiny Qwen3 fixture, HF's expected greedy tokens
//! for it, and the comparison that allows near ties.

#![allow(dead_code)]

use std::path::PathBuf;

use nanovllm::{Prompt, SamplingParams};

/// HF's top-2 logit gap under which the two best tokens are within bf16 noise of each other,
/// so our greedy path may legitimately take the other one (our logits differ from HF's by at
/// most ~0.07 per element on this fixture; see nanovllm-models/tests/hf_tiny.rs).
pub const TIE_GAP: f64 = 0.125;

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nanovllm-models/tests/fixtures/tiny-qwen3")
}

pub struct Case {
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    pub gaps: Vec<f64>,
}

pub fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: ids(&c["prompt"]),
            greedy: ids(&c["greedy"]),
            gaps: c["greedy_top2_gap"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
        })
        .collect()
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

pub fn prompts(cases: &[Case]) -> Vec<Prompt> {
    cases
        .iter()
        .map(|c| Prompt::Tokens(c.prompt.clone()))
        .collect()
}

/// Our tokens equal HF's up to the first step where HF's two best logits are a near tie.
pub fn assert_matches_hf(ours: &[u32], case: &Case, what: &str) {
    for (t, (&o, &r)) in ours.iter().zip(&case.greedy).enumerate() {
        if o != r {
            assert!(
                case.gaps[t] <= TIE_GAP,
                "{what}: token {t} is {o}, HF's is {r} with a top-2 gap of {} (> {TIE_GAP}); \
                 ours {ours:?}, HF {:?}",
                case.gaps[t],
                case.greedy
            );
            return;
        }
    }
    assert!(
        ours.len() <= case.greedy.len(),
        "{what}: more tokens than HF made"
    );
}
