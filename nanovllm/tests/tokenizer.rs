//! End-to-end tests of the tokenizer on Qwen3's real tokenizer files: encoding and decoding
//! against Hugging Face's ids, streaming detokenization, and the chat template rendered byte for
//! byte as transformers renders it.
//!
//! Fixtures (tests/fixtures/): `qwen3-tokenizer/*.json.gz` are Qwen3's tokenizer.json and
//! tokenizer_config.json, gzipped; `chat_template_expected.json` is the output of
//! `scripts/render_chat_templates.py` (transformers' `apply_chat_template` and `encode`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nanovllm::tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Decompresses `fixtures/qwen3-tokenizer/<name>.gz` into `dir/<name>`.
fn gunzip_into(dir: &Path, name: &str) {
    let gz = fixtures()
        .join("qwen3-tokenizer")
        .join(format!("{name}.gz"));
    let file = std::fs::File::open(&gz).unwrap_or_else(|e| panic!("{}: {e}", gz.display()));
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut text)
        .unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

/// Qwen3's tokenizer, loaded once per test binary from a temporary folder.
fn qwen3() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        gunzip_into(dir.path(), "tokenizer.json");
        gunzip_into(dir.path(), "tokenizer_config.json");
        Tokenizer::from_dir(dir.path()).unwrap()
    })
}

fn expected() -> Value {
    let path = fixtures().join("chat_template_expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn special_token_ids_and_eos() {
    let tok = qwen3();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(151643));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(tok.token_to_id("<think>"), Some(151667));
    assert_eq!(tok.token_to_id("</think>"), Some(151668));
    assert_eq!(tok.token_to_id("<|no such token|>"), None);
    assert_eq!(tok.vocab_size(), 151669);
    // tokenizer_config.json's eos_token (<|im_end|>) first, then <|endoftext|>.
    assert_eq!(tok.eos_token_ids(), &[151645, 151643]);
}

#[test]
fn encode_matches_transformers_and_round_trips() {
    let tok = qwen3();
    let cases = expected()["round_trip"].as_array().unwrap().clone();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["english", "chinese", "emoji", "code", "special", "mixed"]
    );
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let hf_ids = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), hf_ids, "{name}: ids");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_with_special"]),
            "{name}: ids with special tokens"
        );
        let decoded = tok.decode(&hf_ids, false).unwrap();
        assert_eq!(decoded, text, "{name}: round trip");
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "{name}");
        assert_eq!(
            tok.decode(&hf_ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}: skip_special_tokens"
        );
    }
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = qwen3();
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [151644]);
    assert_eq!(tok.encode("<think>", false).unwrap(), [151667]);
    let ids = tok
        .encode("<|im_start|>assistant\n<think>\n</think><|im_end|>", false)
        .unwrap();
    assert_eq!(ids.first(), Some(&151644));
    assert_eq!(ids.last(), Some(&151645));
    assert!(ids.contains(&151667) && ids.contains(&151668), "{ids:?}");
    // <think> and </think> are added tokens but not special ones: skipping keeps them.
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "assistant\n<think>\n</think>"
    );
}

/// Streams `ids` through an [`IncrementalDecoder`]; returns the pieces and how many pushes
/// held their text back.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> (Vec<String>, usize) {
    let mut decoder = IncrementalDecoder::new(tok, skip_special_tokens);
    let mut pieces = Vec::new();
    let mut held = 0;
    for &id in ids {
        match decoder.push(id).unwrap() {
            Some(piece) => {
                assert!(!piece.is_empty(), "push({id}) returned an empty piece");
                pieces.push(piece)
            }
            None => held += 1,
        }
    }
    assert_eq!(decoder.ids(), ids);
    pieces.push(decoder.finish().unwrap());
    (pieces, held)
}

#[test]
fn incremental_decoder_never_splits_a_character() {
    let tok = qwen3();
    for text in [
        "👨‍👩‍👧‍👦 family, 🇫🇷 flag, ❤️‍🔥 and 🦀🐍🦀",
        "你好，世界！今天天气很好，我们去公园散步吧。龘靐齉爩",
        "混合 text with 日本語 and emoji 🎉🎊 in the middle 中文结尾",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let (pieces, held) = stream(tok, &ids, false);
        for piece in &pieces {
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?}");
        }
        assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap());
        assert_eq!(pieces.concat(), text);
        // These strings put multi-byte characters over several byte-level tokens (the family
        // emoji's zero-width joiners are split into single-byte tokens), so some pushes must
        // have waited for the rest of a character.
        if text.contains('👨') {
            assert!(held > 0, "{text:?}: no push was held back");
        }
    }
}

#[test]
fn incremental_decoder_skips_special_tokens_like_decode() {
    let tok = qwen3();
    let text = "<|im_start|>assistant\n<think>\n想一想 🤔\n</think>\n\n答案是 42 ✅<|im_end|>";
    let ids = tok.encode(text, false).unwrap();
    for skip in [false, true] {
        let (pieces, _) = stream(tok, &ids, skip);
        assert_eq!(
            pieces.concat(),
            tok.decode(&ids, skip).unwrap(),
            "skip={skip}"
        );
    }
}

#[test]
fn incremental_decoder_finish_flushes_an_unfinished_character() {
    let tok = qwen3();
    // The zero-width joiner (3 bytes) is two byte-level tokens; stop after the first.
    let ids = tok.encode("👨\u{200d}👩", false).unwrap();
    let mut decoder = IncrementalDecoder::new(tok, false);
    assert_eq!(decoder.push(ids[0]).unwrap().as_deref(), Some("👨"));
    assert_eq!(decoder.push(ids[1]).unwrap(), None);
    let rest = decoder.finish().unwrap();
    assert_eq!(rest, tok.decode(&ids[1..2], false).unwrap());
    assert!(rest.contains('\u{FFFD}'), "{rest:?}");
}

#[test]
fn chat_template_matches_transformers() {
    let tok = qwen3();
    assert!(tok.has_chat_template());
    let chats = expected()["chats"].as_array().unwrap().clone();
    let mut two_turns = Vec::new();
    for chat in &chats {
        let name = chat["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let add_generation_prompt = chat["add_generation_prompt"].as_bool().unwrap();
        let enable_thinking = chat["enable_thinking"].as_bool().unwrap();
        let rendered = tok
            .apply_chat_template(&messages, add_generation_prompt, enable_thinking)
            .unwrap();
        assert_eq!(
            rendered,
            chat["expected"].as_str().unwrap(),
            "{name}, enable_thinking={enable_thinking}"
        );
        if name == "two_turns" {
            two_turns.push(enable_thinking);
        }
    }
    assert_eq!(two_turns, [true, false]);
}

#[test]
fn custom_templates_render_like_jinja2() {
    let mut tok = qwen3().clone();
    let cases = expected()["custom_templates"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        tok.set_chat_template(case["template"].as_str().unwrap())
            .unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok
            .apply_chat_template(
                &messages,
                add_generation_prompt,
                case["enable_thinking"].as_bool().unwrap(),
            )
            .unwrap();
        assert_eq!(
            rendered,
            case["expected"].as_str().unwrap(),
            "{name}, add_generation_prompt={add_generation_prompt}"
        );
    }
    // The shared tokenizer keeps Qwen3's template.
    assert!(qwen3()
        .apply_chat_template(&[ChatMessage::user("x")], true, true)
        .unwrap()
        .starts_with("<|im_start|>user"));
    assert!(tok.set_chat_template("{% for %}").is_err());
}

#[test]
fn chat_template_two_turns_by_hand() {
    let tok = qwen3();
    let messages = [
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello!"),
        ChatMessage::user("Bye"),
    ];
    let head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
                <|im_start|>user\nBye<|im_end|>\n";
    assert_eq!(
        tok.apply_chat_template(&messages, true, true).unwrap(),
        format!("{head}<|im_start|>assistant\n")
    );
    assert_eq!(
        tok.apply_chat_template(&messages, true, false).unwrap(),
        format!("{head}<|im_start|>assistant\n<think>\n\n</think>\n\n")
    );
    assert_eq!(
        tok.apply_chat_template(&messages, false, true).unwrap(),
        head
    );
}

/// A word-level tokenizer with five tokens, two of them Qwen's stop tokens, whose
/// post-processor puts `<|endoftext|>` in front of a sequence: enough to test loading without
/// parsing Qwen3's 11 MB tokenizer.json, and `add_special_tokens` where Qwen3 adds nothing.
const TINY_TOKENIZER_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 3, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false,
     "normalized": false, "special": true},
    {"id": 4, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false,
     "normalized": false, "special": true}
  ],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
               {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [3],
                                         "tokens": ["<|endoftext|>"]}}},
  "decoder": null,
  "model": {"type": "WordLevel", "unk_token": "[UNK]",
            "vocab": {"hi": 0, "there": 1, "[UNK]": 2, "<|endoftext|>": 3, "<|im_end|>": 4}}
}"#;

#[test]
fn tiny_tokenizer_loads() {
    let tok = Tokenizer::from_bytes(TINY_TOKENIZER_JSON.as_bytes(), None).unwrap();
    assert_eq!(tok.vocab_size(), 5);
    assert_eq!(tok.encode("hi there<|im_end|>", false).unwrap(), [0, 1, 4]);
    assert_eq!(tok.encode("hi there", true).unwrap(), [3, 0, 1]);
    assert_eq!(tok.decode(&[3, 0, 1], true).unwrap(), "hi there");
    assert_eq!(tok.eos_token_ids(), &[4, 3]);
}

#[test]
fn errors_name_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokenizer.json");
    std::fs::write(&json, TINY_TOKENIZER_JSON).unwrap();

    // Missing files are named.
    let missing = dir.path().join("nope/tokenizer.json");
    let err = Tokenizer::from_files(&missing, None).unwrap_err();
    assert!(err.to_string().contains("nope/tokenizer.json"), "{err}");
    let missing_config = dir.path().join("nope/tokenizer_config.json");
    let err = Tokenizer::from_files(&json, Some(&missing_config)).unwrap_err();
    assert!(
        err.to_string().contains("nope/tokenizer_config.json"),
        "{err}"
    );

    // No tokenizer_config.json: no chat template, and a clear error when one is asked for.
    let bare = Tokenizer::from_files(&json, None).unwrap();
    assert!(!bare.has_chat_template());
    let err = bare
        .apply_chat_template(&[ChatMessage::user("hi")], true, true)
        .unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");

    // raise_exception() in a template surfaces its message; eos_token may be an added-token
    // object.
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config,
        r#"{"eos_token": {"content": "<|endoftext|>"},
            "chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}ok"}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_files(&json, Some(&config)).unwrap();
    assert_eq!(tok.eos_token_ids(), &[3, 4]);
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user("hi")], false, true)
            .unwrap(),
        "ok"
    );
    let err = tok
        .apply_chat_template(&[ChatMessage::system("x")], false, true)
        .unwrap_err();
    assert!(err.to_string().contains("first turn must be user"), "{err}");

    // A template that does not compile, an eos_token outside the vocabulary, a config that is
    // not an object, and a list of templates without a default are refused at load time, with
    // the file named.
    for (config_json, needle) in [
        (r#"{"chat_template": "{% if %}"}"#, "does not compile"),
        (r#"{"eos_token": "<|not a token|>"}"#, "<|not a token|>"),
        (r#"[1, 2]"#, "JSON object"),
        (
            r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#,
            "default",
        ),
        (r#"{"eos_token": 7}"#, "eos_token"),
        ("{", "not valid JSON"),
    ] {
        std::fs::write(&config, config_json).unwrap();
        let err = Tokenizer::from_files(&json, Some(&config)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tokenizer_config.json") && msg.contains(needle),
            "{config_json}: {msg}"
        );
    }

    // A list of named templates: the one named `default` is used.
    std::fs::write(
        &config,
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"},
                              {"name": "default", "template": "plain"}]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_files(&json, Some(&config)).unwrap();
    assert_eq!(tok.apply_chat_template(&[], false, true).unwrap(), "plain");

    // The same from bytes.
    let tok = Tokenizer::from_bytes(
        TINY_TOKENIZER_JSON.as_bytes(),
        Some(br#"{"eos_token": "<|endoftext|>", "chat_template": "{{ messages | length }}"}"#),
    )
    .unwrap();
    assert_eq!(tok.eos_token_ids(), &[3, 4]);
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user("hi")], false, true)
            .unwrap(),
        "1"
    );
    let err = Tokenizer::from_bytes(b"not json", None).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let err = Tokenizer::from_bytes(TINY_TOKENIZER_JSON.as_bytes(), Some(b"[1, 2]")).unwrap_err();
    assert!(
        err.to_string().contains("tokenizer_config.json") && err.to_string().contains("object"),
        "{err}"
    );

    // A tokenizer.json that is not one.
    std::fs::write(&json, "{}").unwrap();
    let err = Tokenizer::from_files(&json, None).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn from_dir_reads_generation_config_and_separate_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), TINY_TOKENIZER_JSON).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [3, 1]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}] {{ m.content.strip() }}\n{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), &[4, 3, 1]);
    let text = tok
        .apply_chat_template(
            &[ChatMessage::user("  a  "), ChatMessage::assistant("b")],
            false,
            true,
        )
        .unwrap();
    assert_eq!(text, "[user] a\n[assistant] b\n");

    // A single id, and a bad one.
    let generation = dir.path().join("generation_config.json");
    std::fs::write(&generation, r#"{"eos_token_id": 0}"#).unwrap();
    assert_eq!(
        Tokenizer::from_dir(dir.path()).unwrap().eos_token_ids(),
        &[4, 3, 0]
    );
    std::fs::write(&generation, r#"{"eos_token_id": "x"}"#).unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("generation_config.json"), "{err}");
}
