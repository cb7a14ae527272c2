//! `nanovllm serve`: an OpenAI-compatible HTTP server over the [`LLM`] engine.
//!
//! Layout: [`api`] holds the wire format and field checks, [`handlers`] the endpoints,
//! `generation` one request's detokenization and stop strings, [`engine_thread`] the thread
//! that owns the `LLM` and runs its steps, [`metrics`] the Prometheus counters, [`error`]
//! OpenAI-style error bodies.
//!
//! ```no_run
//! use nanovllm::serve::{serve, ServeOptions};
//! use nanovllm::{EngineArgs, LLM};
//!
//! # async fn run() -> nanovllm::Result<()> {
//! let llm = LLM::new("qwen3-0.6b", EngineArgs::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await
//!     .map_err(|e| nanovllm::Error::Other(e.to_string()))?;
//! serve(listener, llm, ServeOptions::new("qwen3-0.6b"), std::future::pending()).await
//! # }
//! ```

pub mod api;
pub mod engine_thread;
pub mod error;
mod generation;
pub mod handlers;
pub mod metrics;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use nanovllm_engine::sampling_params::SamplingParams;
use nanovllm_utils::{Error, Result};

use crate::llm::LLM;
use crate::tokenizer::Tokenizer;
use engine_thread::EngineHandle;
use metrics::ServerMetrics;

pub use generation::StopMatcher;

/// Options of the server (the engine's own are in [`EngineArgs`](crate::EngineArgs)).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The name clients use in `model` (and `/v1/models` lists).
    pub served_model_name: String,
    /// Requests in flight (queued, running or streaming) at most; more are answered 503 with
    /// `Retry-After`.
    pub max_concurrent_requests: usize,
}

impl ServeOptions {
    /// Options serving the model under `name`, with up to 1,024 requests in flight.
    pub fn new(name: impl Into<String>) -> Self {
        ServeOptions {
            served_model_name: name.into(),
            max_concurrent_requests: 1024,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    /// The served model's name.
    pub model_name: String,
    /// Unix time the server started.
    pub created: u64,
    /// The tokenizer, when the model has one. Leaked once per server so that each request's
    /// streaming decoder can borrow it from its own task for as long as it needs.
    pub tokenizer: Option<&'static Tokenizer>,
    /// Sampling defaults (the model's generation_config.json).
    pub defaults: SamplingParams,
    /// Longest sequence served.
    pub max_model_len: usize,
    /// The engine loop.
    pub engine: EngineHandle,
    /// Counters for `/metrics`.
    pub metrics: Arc<ServerMetrics>,
    /// One permit per request in flight.
    pub in_flight: Arc<Semaphore>,
    /// The number of permits.
    pub max_in_flight: usize,
    next_id: AtomicU64,
}

impl AppState {
    /// A fresh id for a response.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Starts the engine thread for `llm` and returns the router of every endpoint.
pub fn router(llm: LLM, opts: &ServeOptions) -> Result<Router> {
    if opts.max_concurrent_requests == 0 {
        return Err(Error::Other(
            "serve: max_concurrent_requests is 0, expected at least 1".into(),
        ));
    }
    let tokenizer = llm.tokenizer().map(|t| &*Box::leak(Box::new(t.clone())));
    let defaults = llm.default_sampling_params();
    let max_model_len = llm.max_model_len();
    let metrics = Arc::new(ServerMetrics::default());
    // The thread ends by itself once the router (holding the last handle) is dropped.
    let (engine, _thread) =
        EngineHandle::spawn(llm, opts.max_concurrent_requests, metrics.clone())?;
    let state = Arc::new(AppState {
        model_name: opts.served_model_name.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        tokenizer,
        defaults,
        max_model_len,
        engine,
        metrics,
        in_flight: Arc::new(Semaphore::new(opts.max_concurrent_requests)),
        max_in_flight: opts.max_concurrent_requests,
        next_id: AtomicU64::new(0),
    });
    Ok(Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .with_state(state))
}

/// Serves `llm` on `listener` until `shutdown` completes (then finishes the requests in
/// flight and returns).
pub async fn serve(
    listener: TcpListener,
    llm: LLM,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = router(llm, &opts)?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Other(format!("serve: {e}")))
}

/// Binds `host:port`, prints the address, and serves `llm` until Ctrl-C (the `nanovllm serve`
/// command).
pub fn run(llm: LLM, host: &str, port: u16, opts: ServeOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("serve: cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = TcpListener::bind((host, port))
            .await
            .map_err(|e| Error::Other(format!("serve: cannot listen on {host}:{port}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Other(format!("serve: {e}")))?;
        eprintln!(
            "nanovllm serve: `{}` on http://{addr} (Ctrl-C stops)",
            opts.served_model_name
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve(listener, llm, opts, shutdown).await
    })
}
