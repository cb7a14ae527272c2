//! `nanovllm serve` end to end on the CPU backend: each test starts the server in-process on
//! 127.0.0.1 port 0 over the tiny Qwen3 fixture (random weights, 1,024-token vocabulary) and
//! talks HTTP to it, as an OpenAI client would.
//!
//! The fixture has no tokenizer, and Qwen3's (151k tokens) does not fit its vocabulary, so the
//! tests copy it into a temporary folder with a word-level tokenizer of its size (`w0` ..
//! `w999` plus chat words and Qwen's special tokens) and a small chat template.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nanovllm::serve::{serve, ServeOptions};
use nanovllm::{Device, EngineArgs, EngineConfig, LLM};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const MODEL: &str = "tiny";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nanovllm-models/tests/fixtures/tiny-qwen3")
}

/// Word-level tokenizer.json over the fixture's 1,024 ids: `w<i>` is id i for i < 1000.
fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for i in 0..1000 {
        vocab.insert(format!("w{i}"), json!(i));
    }
    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), json!(1000 + i));
    }
    for (i, w) in ["user", "assistant", "system", "hello", "world", "[UNK]"]
        .iter()
        .enumerate()
    {
        vocab.insert(w.to_string(), json!(1003 + i));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 1000 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": vocab}
    })
    .to_string()
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}\
<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}";

/// A temporary model folder: the fixture's config and weights plus the tokenizer above.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::os::unix::fs::symlink(fixture().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).unwrap();
    let config = json!({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

struct Server {
    base: String,
    client: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start(max_concurrent_requests: usize) -> Server {
    let dir = model_dir();
    let args = EngineArgs {
        config: EngineConfig {
            num_kvcache_blocks: Some(128),
            kvcache_block_size: 16,
            max_num_batched_tokens: 1024,
            max_num_seqs: 16,
            max_model_len: 512,
            ..Default::default()
        },
        device: Device::Cpu,
        ..Default::default()
    };
    let llm = LLM::new(dir.path().to_str().unwrap(), args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let opts = ServeOptions {
        served_model_name: MODEL.into(),
        max_concurrent_requests,
    };
    tokio::spawn(serve(listener, llm, opts, async {
        let _ = rx.await;
    }));
    Server {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        _shutdown: tx,
        _dir: dir,
    }
}

impl Server {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    async fn post_raw(&self, path: &str, body: String) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, value)
    }

    /// A streamed request: the `data:` payloads in order, `[DONE]` included.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        let text = r.text().await.unwrap();
        sse_data(&text)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        metric_value(&text, name)
    }

    /// Waits (up to 5 s) until a metric has the expected value, which the engine thread
    /// publishes after its step.
    async fn wait_metric(&self, name: &str, expected: f64) {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name).await;
            if v == expected {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{name} is {v}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// The `data:` payloads of an event stream (keep-alive comments skipped).
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| {
            let data: Vec<&str> = e.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Checks an error answer: the status and OpenAI's error body.
fn assert_error(status: u16, body: &Value, expected_status: u16, needle: &str) {
    assert_eq!(status, expected_status, "{body}");
    let err = &body["error"];
    let message = err["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(message.contains(needle), "`{message}` lacks `{needle}`");
    assert!(err["type"].is_string(), "{body}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "{body}"
    );
}

/// Words `w<i>` of a token-id list, as the word-level tokenizer decodes them.
fn words(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_whole_and_streamed() {
    let s = start(64).await;
    let prompt: Vec<u32> = (10..30).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                      "ignore_eos": true});
    let (status, r) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["model"], MODEL);
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["text"].as_str().unwrap().to_string();
    assert_eq!(text.split(' ').count(), 12, "{text}");
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32})
    );

    // The same prompt as text gives the same greedy tokens.
    let text_prompt = words(&prompt);
    let (_, r2) = s
        .post(
            "/v1/completions",
            &json!({"prompt": text_prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(r2["choices"][0]["text"], text.as_str());

    // Streamed: chunks concatenate to the same text; usage in the last chunk; then [DONE].
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/completions", &stream_body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "text_completion"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let pieces = &chunks[..chunks.len() - 1];
    assert!(pieces.len() > 1, "streamed in one chunk: {events:?}");
    let streamed: String = pieces
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        pieces.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(pieces[..pieces.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));

    // With return_token_ids the chunks carry the generated ids, whose words are the text.
    stream_body["return_token_ids"] = json!(true);
    let events = s.stream("/v1/completions", &stream_body).await;
    let ids: Vec<u32> = events[..events.len() - 2]
        .iter()
        .flat_map(|e| {
            let c: Value = serde_json::from_str(e).unwrap();
            serde_json::from_value::<Vec<u32>>(c["choices"][0]["token_ids"].clone()).unwrap()
        })
        .collect();
    assert_eq!(words(&ids), text);
    assert!(r["choices"][0].get("token_ids").is_none(), "{r}");

    // Without include_usage no chunk carries usage.
    stream_body["return_token_ids"] = json!(false);
    stream_body["stream_options"] = json!(null);
    let events = s.stream("/v1/completions", &stream_body).await;
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_stop_token_ids_cut_the_output() {
    let s = start(64).await;
    let prompt: Vec<u32> = (100..120).collect();
    let base = json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (_, r) = s.post("/v1/completions", &base).await;
    let full = r["choices"][0]["text"].as_str().unwrap().to_string();
    let toks: Vec<&str> = full.split(' ').collect();
    assert_eq!(toks.len(), 10);
    let ids: Vec<u32> = toks.iter().map(|t| t[1..].parse().unwrap()).collect();

    // A stop string spanning two tokens ("<end of token 4> <start of token 5>") is found in
    // the decoded text and cut, in both the whole and the streamed answer.
    let stop = format!("{} {}", &toks[4][1..], &toks[5][..2]);
    let cut = full.find(&stop).unwrap();
    let mut body = base.clone();
    body["stop"] = json!([stop]);
    let (_, r) = s.post("/v1/completions", &body).await;
    assert_eq!(
        r["choices"][0]["text"],
        &full[..cut],
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() < 10);
    body["stream"] = json!(true);
    let events = s.stream("/v1/completions", &body).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, &full[..cut]);

    // A stop token id ends the request; the token itself is not in the text, but is in
    // `token_ids`.
    let mut body = base.clone();
    body["stop_token_ids"] = json!([ids[3]]);
    body["return_token_ids"] = json!(true);
    let (_, r) = s.post("/v1/completions", &body).await;
    let first = ids.iter().position(|&t| t == ids[3]).unwrap();
    assert_eq!(r["choices"][0]["text"], words(&ids[..first]));
    assert_eq!(r["choices"][0]["token_ids"], json!(ids[..=first]));
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], first + 1);

    // Aborting on a stop string leaves no KV blocks behind.
    s.wait_metric("nanovllm_kv_cache_blocks_used", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_whole_and_streamed() {
    let s = start(64).await;
    let messages = json!([{"role": "system", "content": "hello"},
                          {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]);
    let body = json!({"model": MODEL, "messages": messages, "max_completion_tokens": 8,
                      "temperature": 0, "ignore_eos": true});
    let (status, r) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &r["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    let content = choice["message"]["content"].as_str().unwrap().to_string();
    // "<|im_start|>system hello<|im_end|> <|im_start|>user hello world<|im_end|>
    //  <|im_start|>assistant": 11 tokens.
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19})
    );

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &stream_body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["total_tokens"], 19);
    let pieces = &chunks[..chunks.len() - 1];
    let streamed: String = pieces
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    assert_eq!(
        pieces.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let s = start(64).await;
    let (status, text) = s.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(text, "");
    let (status, text) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 512);

    let (status, text) = s.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric_value(&text, "nanovllm_kv_cache_blocks_total"), 128.0);
    assert_eq!(metric_value(&text, "nanovllm_prompt_tokens_total"), 0.0);
    assert_eq!(
        metric_value(&text, "nanovllm_request_latency_seconds_count"),
        0.0
    );

    // Two requests with the same 40-token prompt: the second finds its 2 full blocks cached.
    let body =
        json!({"prompt": (0..40).collect::<Vec<u32>>(), "max_tokens": 5, "ignore_eos": true});
    for _ in 0..2 {
        let (status, r) = s.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{r}");
    }
    let (_, text) = s.get("/metrics").await;
    assert_eq!(metric_value(&text, "nanovllm_prompt_tokens_total"), 80.0);
    assert_eq!(
        metric_value(&text, "nanovllm_generation_tokens_total"),
        10.0
    );
    assert_eq!(metric_value(&text, "nanovllm_requests_finished_total"), 2.0);
    assert_eq!(
        metric_value(&text, "nanovllm_request_latency_seconds_count"),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            "nanovllm_request_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        2.0
    );
    assert!(metric_value(&text, "nanovllm_request_latency_seconds_sum") > 0.0);
    assert_eq!(
        metric_value(&text, "nanovllm_prefix_cache_hit_tokens_total"),
        32.0
    );
    assert_eq!(
        metric_value(&text, "nanovllm_prefix_cache_hit_rate"),
        32.0 / 80.0
    );
    assert_eq!(metric_value(&text, "nanovllm_num_requests_running"), 0.0);
    assert_eq!(metric_value(&text, "nanovllm_num_requests_waiting"), 0.0);

    let (status, text) = s.get("/v1/nothing").await;
    assert_eq!(status, 404);
    assert!(text.contains("no such endpoint"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_goes_on() {
    let s = start(64).await;
    let ok = json!({"prompt": [1, 2, 3], "max_tokens": 2});
    let cases: Vec<(String, u16, &str, Option<&str>)> = vec![
        ("{\"prompt\": [1, 2".into(), 400, "not valid JSON", None),
        ("[1, 2]".into(), 400, "JSON object", None),
        (
            json!({"max_tokens": 2}).to_string(),
            400,
            "missing field `prompt`",
            None,
        ),
        (
            json!({"prompt": [1], "model": "gpt-4"}).to_string(),
            404,
            "`gpt-4` does not exist",
            Some("model"),
        ),
        (
            json!({"prompt": (0..600).map(|i| i % 1000).collect::<Vec<u32>>()}).to_string(),
            400,
            "max_model_len",
            None,
        ),
        (
            json!({"prompt": [1], "max_tokens": -5}).to_string(),
            400,
            "`max_tokens` is -5",
            Some("max_tokens"),
        ),
        (
            json!({"prompt": [1], "temperature": 2.5}).to_string(),
            400,
            "`temperature` is 2.5",
            Some("temperature"),
        ),
        (
            json!({"prompt": [1], "temperature": "hot"}).to_string(),
            400,
            "field `temperature`",
            Some("temperature"),
        ),
        (
            json!({"prompt": [1], "top_p": 0}).to_string(),
            400,
            "`top_p` is 0",
            Some("top_p"),
        ),
        (
            json!({"prompt": [1], "top_k": -3}).to_string(),
            400,
            "`top_k` is -3",
            Some("top_k"),
        ),
        (
            json!({"prompt": [1], "n": 2}).to_string(),
            400,
            "n = 1",
            Some("n"),
        ),
        (
            json!({"prompt": [1], "stop": [""]}).to_string(),
            400,
            "empty string",
            Some("stop"),
        ),
        (
            json!({"prompt": [5000]}).to_string(),
            400,
            "vocab_size",
            None,
        ),
        (json!({"prompt": []}).to_string(), 400, "no tokens", None),
        (
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "several prompts",
            Some("prompt"),
        ),
        (
            json!({"prompt": {"x": 1}}).to_string(),
            400,
            "field `prompt`",
            Some("prompt"),
        ),
    ];
    for (body, status, needle, param) in &cases {
        let (got, r) = s.post_raw("/v1/completions", body.clone()).await;
        assert_error(got, &r, *status, needle);
        assert_eq!(r["error"]["param"].as_str(), *param, "{body}: {r}");
        let (got, r) = s.post("/v1/completions", &ok).await;
        assert_eq!(got, 200, "after {body}: {r}");
    }
    let chat_cases = [
        (json!({"messages": []}), "is empty"),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 7}]}),
            "messages[0].content",
        ),
        (json!({"messages": "hello"}), "field `messages`"),
    ];
    for (body, needle) in &chat_cases {
        let (got, r) = s.post("/v1/chat/completions", body).await;
        assert_error(got, &r, 400, needle);
    }
    let (status, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hello"}],
                                              "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let refused = s.metric("nanovllm_requests_refused_total").await;
    assert_eq!(refused, (cases.len() + chat_cases.len()) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_all_complete_and_free_their_blocks() {
    let s = std::sync::Arc::new(start(1024).await);
    let mut clients = Vec::new();
    const CLIENTS: u32 = 64;
    const REQUESTS: u32 = 20;
    for c in 0..CLIENTS {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            for r in 0..REQUESTS {
                let len = 1 + ((c * 7 + r * 13) % 60) as usize;
                let max_tokens = 1 + ((c + r * 5) % 24) as usize;
                let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 31 + c) % 1000).collect();
                let stream = (c + r) % 2 == 0;
                let body = json!({"prompt": prompt, "max_tokens": max_tokens,
                                  "temperature": 0.8, "seed": c * 10 + r, "ignore_eos": true,
                                  "stream": stream, "stream_options": {"include_usage": true}});
                let usage = if stream {
                    let events = s.stream("/v1/completions", &body).await;
                    assert_eq!(events.last().unwrap(), "[DONE]");
                    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                    last["usage"].clone()
                } else {
                    let (status, r) = s.post("/v1/completions", &body).await;
                    assert_eq!(status, 200, "{r}");
                    assert_eq!(r["choices"][0]["finish_reason"], "length");
                    // Sampled special tokens decode to nothing, so at most one word a token.
                    let text = r["choices"][0]["text"].as_str().unwrap();
                    assert!(text.split_whitespace().count() <= max_tokens, "{text}");
                    r["usage"].clone()
                };
                assert_eq!(usage["prompt_tokens"], len);
                assert_eq!(usage["completion_tokens"], max_tokens);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    s.wait_metric("nanovllm_kv_cache_blocks_used", 0.0).await;
    assert_eq!(
        s.metric("nanovllm_requests_finished_total").await,
        (CLIENTS * REQUESTS) as f64
    );
    assert_eq!(s.metric("nanovllm_num_requests_running").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_aborts_the_request() {
    let s = start(64).await;
    let body = json!({"prompt": [1, 2, 3, 4], "max_tokens": 500, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let r = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(stream);
    s.wait_metric("nanovllm_requests_aborted_total", 1.0).await;
    s.wait_metric("nanovllm_kv_cache_blocks_used", 0.0).await;
    assert_eq!(s.metric("nanovllm_requests_finished_total").await, 0.0);
    assert!(s.metric("nanovllm_generation_tokens_total").await < 500.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_server_answers_503_with_retry_after() {
    let s = start(1).await;
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": true, "stream": true});
    let held = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let r = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"prompt": [1], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_error(503, &body, 503, "busy");
    // Once the first request is gone, the server takes requests again.
    drop(held);
    let t0 = Instant::now();
    loop {
        let (status, r) = s
            .post("/v1/completions", &json!({"prompt": [1], "max_tokens": 1}))
            .await;
        if status == 200 {
            break;
        }
        assert_error(status, &r, 503, "busy");
        assert!(t0.elapsed() < Duration::from_secs(5), "still busy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
