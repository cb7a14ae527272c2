//! Checks that `Workload::bench_py` reproduces nano-vLLM's `bench.py` requests exactly.
//!
//! The fixture tests/fixtures/nanovllm-bench-seed0.json.gz holds the prompts and `max_tokens`
//! that `bench.py` builds with CPython's `random.seed(0)`.

use std::io::Read;
use std::path::Path;

use nanovllm::workload::{PyRandom, Workload};
use serde_json::Value;

fn bench_fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nanovllm-bench-seed0.json.gz");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn bench_py_workload_is_identical_to_nanovllm() {
    let fixture = bench_fixture();
    let workload = Workload::bench_py(256, 100, 1024, 100, 1024, 0).unwrap();
    assert_eq!(workload, Workload::bench_py_default());

    let prompts = fixture["prompt_token_ids"].as_array().unwrap();
    let max_tokens = fixture["max_tokens"].as_array().unwrap();
    assert_eq!(workload.len(), 256);
    assert_eq!(prompts.len(), 256);
    assert_eq!(max_tokens.len(), 256);
    for (i, (ours, theirs)) in workload.prompts.iter().zip(prompts).enumerate() {
        let theirs: Vec<u32> = theirs
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ours, &theirs, "prompt {i}");
    }
    for (i, (ours, theirs)) in workload.max_tokens.iter().zip(max_tokens).enumerate() {
        assert_eq!(*ours as u64, theirs.as_u64().unwrap(), "max_tokens {i}");
    }

    assert_eq!(workload.total_prompt_tokens(), 142_827);
    assert_eq!(workload.total_output_tokens(), 133_966);
    assert_eq!(
        fixture["total_prompt_tokens"].as_u64(),
        Some(workload.total_prompt_tokens() as u64)
    );
    assert_eq!(
        fixture["total_output_tokens"].as_u64(),
        Some(workload.total_output_tokens() as u64)
    );
    // randint(0, 10000) includes 10000: the largest id drawn is exactly that.
    let max_id = workload.prompts.iter().flatten().max().copied();
    assert_eq!(max_id, Some(Workload::BENCH_MAX_TOKEN_ID as u32));
}

#[test]
fn other_parameters_follow_the_same_draw_order() {
    // A 1-sequence workload is randint(100, 1024) for the prompt length, that many
    // randint(0, 10000) ids, then randint(100, 1024) for max_tokens.
    let w = Workload::bench_py(1, 100, 1024, 100, 1024, 0).unwrap();
    let mut rng = PyRandom::new(0);
    let len = rng.randint(100, 1024).unwrap();
    assert_eq!(len as usize, w.prompts[0].len());
    let ids: Vec<u32> = (0..len)
        .map(|_| rng.randint(0, 10_000).unwrap() as u32)
        .collect();
    assert_eq!(w.prompts, vec![ids]);
    assert_eq!(w.max_tokens, vec![rng.randint(100, 1024).unwrap() as usize]);

    // Equal minimum and maximum give fixed lengths.
    let fixed = Workload::bench_py(3, 16, 16, 8, 8, 7).unwrap();
    assert!(fixed.prompts.iter().all(|p| p.len() == 16));
    assert_eq!(fixed.max_tokens, vec![8, 8, 8]);
    assert_eq!(fixed.total_prompt_tokens(), 48);
    assert_eq!(fixed.total_output_tokens(), 24);

    assert!(Workload::bench_py(0, 1, 2, 1, 2, 0).unwrap().is_empty());
    let err = Workload::bench_py(1, 1, 2, 9, 2, 0).unwrap_err();
    assert!(err.to_string().contains("output_len"), "{err}");
}
