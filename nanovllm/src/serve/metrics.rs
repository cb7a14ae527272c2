//! Counters and gauges of `nanovllm serve`, rendered as Prometheus text by `GET /metrics`.
//!
//! The engine thread writes the engine's load ([`EngineMetrics`]) and the token counters after
//! every step; handlers record each request's end-to-end latency and errors. Everything is an
//! atomic, so reading `/metrics` never waits on the engine.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::llm::EngineMetrics;

/// Upper bounds (seconds) of the request latency histogram's buckets; `+Inf` follows.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The server's metrics.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    num_running: AtomicU64,
    num_waiting: AtomicU64,
    kv_blocks_used: AtomicU64,
    kv_blocks_total: AtomicU64,
    prefix_queries: AtomicU64,
    prefix_query_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    requests_finished: AtomicU64,
    requests_aborted: AtomicU64,
    requests_refused: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl ServerMetrics {
    /// Publishes the engine's load (engine thread, after each step).
    pub fn set_engine(&self, m: &EngineMetrics) {
        self.num_running.store(m.num_running as u64, Relaxed);
        self.num_waiting.store(m.num_waiting as u64, Relaxed);
        self.kv_blocks_used.store(m.kv_blocks_used as u64, Relaxed);
        self.kv_blocks_total
            .store(m.kv_blocks_total as u64, Relaxed);
        self.prefix_queries
            .store(m.prefix_cache.num_queries, Relaxed);
        self.prefix_query_tokens
            .store(m.prefix_cache.num_query_tokens, Relaxed);
        self.prefix_hit_tokens
            .store(m.prefix_cache.num_hit_tokens, Relaxed);
    }

    /// Counts the prompt tokens of an accepted request.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Relaxed);
    }

    /// Counts generated tokens.
    pub fn add_generation_tokens(&self, n: usize) {
        self.generation_tokens.fetch_add(n as u64, Relaxed);
    }

    /// Counts a request the engine finished (stop or length).
    pub fn request_finished(&self) {
        self.requests_finished.fetch_add(1, Relaxed);
    }

    /// Counts a request aborted before the engine finished it (client gone, stop string).
    pub fn request_aborted(&self) {
        self.requests_aborted.fetch_add(1, Relaxed);
    }

    /// Counts a request answered with an error status.
    pub fn request_refused(&self) {
        self.requests_refused.fetch_add(1, Relaxed);
    }

    /// Records the end-to-end latency of a served request.
    pub fn observe_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bucket, &le) in self.latency_buckets.iter().zip(&LATENCY_BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric(
            "nanovllm_num_requests_running",
            "gauge",
            "Sequences in the running batch.",
            get(&self.num_running),
        );
        metric(
            "nanovllm_num_requests_waiting",
            "gauge",
            "Sequences waiting for prefill.",
            get(&self.num_waiting),
        );
        metric(
            "nanovllm_kv_cache_blocks_used",
            "gauge",
            "KV-cache blocks held by sequences.",
            get(&self.kv_blocks_used),
        );
        metric(
            "nanovllm_kv_cache_blocks_total",
            "gauge",
            "KV-cache blocks in all.",
            get(&self.kv_blocks_total),
        );
        let used = self.kv_blocks_used.load(Relaxed) as f64;
        let total = self.kv_blocks_total.load(Relaxed) as f64;
        metric(
            "nanovllm_kv_cache_usage_ratio",
            "gauge",
            "Fraction of KV-cache blocks in use.",
            format!("{}", if total > 0.0 { used / total } else { 0.0 }),
        );
        metric(
            "nanovllm_prefix_cache_queries_total",
            "counter",
            "Prefix-cache lookups (one per prefill of a new or preempted sequence).",
            get(&self.prefix_queries),
        );
        metric(
            "nanovllm_prefix_cache_query_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            get(&self.prefix_query_tokens),
        );
        metric(
            "nanovllm_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens whose KV was found in the prefix cache.",
            get(&self.prefix_hit_tokens),
        );
        let queried = self.prefix_query_tokens.load(Relaxed) as f64;
        let hit = self.prefix_hit_tokens.load(Relaxed) as f64;
        metric(
            "nanovllm_prefix_cache_hit_rate",
            "gauge",
            "Prompt tokens found in the prefix cache over tokens looked up, since start-up.",
            format!("{}", if queried > 0.0 { hit / queried } else { 0.0 }),
        );
        metric(
            "nanovllm_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            get(&self.prompt_tokens),
        );
        metric(
            "nanovllm_generation_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.generation_tokens),
        );
        metric(
            "nanovllm_requests_finished_total",
            "counter",
            "Requests the engine ran to a stop token or max_tokens.",
            get(&self.requests_finished),
        );
        metric(
            "nanovllm_requests_aborted_total",
            "counter",
            "Requests aborted early: the client went away or a stop string was found.",
            get(&self.requests_aborted),
        );
        metric(
            "nanovllm_requests_refused_total",
            "counter",
            "Requests answered with an error status.",
            get(&self.requests_refused),
        );
        let name = "nanovllm_request_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} End-to-end latency of served requests.\n# TYPE {name} histogram"
        );
        for (bucket, le) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", get(bucket));
        }
        let count = get(&self.latency_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
        out
    }
}
