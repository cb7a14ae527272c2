//! The engine loop of `nanovllm serve`: one OS thread owns the [`LLM`] (which is not `Sync`)
//! and runs its steps; HTTP handlers talk to it through channels.
//!
//! Flow: a handler tokenizes the prompt and [`EngineHandle::submit`]s an [`EngineRequest`]
//! into a bounded queue (full: the handler answers 503). Between two steps the loop takes
//! every queued request into the engine, where it joins the running batch at the next
//! step, and answers [`EngineEvent::Accepted`] or [`EngineEvent::Rejected`] on the request's
//! own channel. After each step the loop sends each request its new tokens, and the finish
//! reason with the last ones. A handler that stops listening (client gone, stop string found)
//! drops or closes its receiver; before every step the loop aborts such requests, which frees
//! their KV blocks at once. When every handle is dropped the loop finishes what is running and
//! the thread ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use nanovllm_engine::sampling_params::SamplingParams;
use nanovllm_engine::sequence::FinishReason;
use nanovllm_utils::{Error, Result};

use super::metrics::ServerMetrics;
use crate::llm::{Prompt, LLM};

/// A request for the engine: prompt tokens, sampling, and where its events go.
#[derive(Debug)]
pub struct EngineRequest {
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// How to sample and when to stop.
    pub params: SamplingParams,
    /// The request's events; closing the receiver aborts the request.
    pub events: mpsc::UnboundedSender<EngineEvent>,
}

/// What the engine loop tells one request.
#[derive(Debug)]
pub enum EngineEvent {
    /// The engine queued the request (always the first event unless `Rejected`).
    Accepted {
        /// Tokens of the prompt.
        prompt_tokens: usize,
    },
    /// The engine refused the request (the only event then).
    Rejected(Error),
    /// New tokens; `finish_reason` is `Some` with the last ones.
    Tokens {
        /// Tokens generated in this step.
        token_ids: Vec<u32>,
        /// Why the request finished, when it did.
        finish_reason: Option<FinishReason>,
    },
    /// A step failed; the request was aborted (the last event then).
    Failed(String),
}

/// Why [`EngineHandle::submit`] did not queue a request.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full: retry later.
    Full,
    /// The engine thread has stopped.
    Stopped,
}

/// The handlers' side of the engine loop; cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    queue: mpsc::Sender<EngineRequest>,
}

impl EngineHandle {
    /// Starts the engine loop on its own thread, with a queue of `queue_capacity` requests
    /// (at least 1). The thread ends when every handle is dropped and the running requests are
    /// done.
    pub fn spawn(
        llm: LLM,
        queue_capacity: usize,
        metrics: Arc<ServerMetrics>,
    ) -> Result<(Self, JoinHandle<()>)> {
        let (queue, rx) = mpsc::channel(queue_capacity.max(1));
        metrics.set_engine(&llm.metrics());
        let thread = std::thread::Builder::new()
            .name("nanovllm-engine".into())
            .spawn(move || EngineLoop::new(llm, metrics).run(rx))
            .map_err(|e| Error::Other(format!("cannot start the engine thread: {e}")))?;
        Ok((EngineHandle { queue }, thread))
    }

    /// Queues a request without waiting.
    pub fn submit(&self, request: EngineRequest) -> std::result::Result<(), SubmitError> {
        self.queue.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })
    }

    /// Whether the engine thread is still taking requests.
    pub fn is_alive(&self) -> bool {
        !self.queue.is_closed()
    }
}

/// The state of the engine thread.
struct EngineLoop {
    llm: LLM,
    metrics: Arc<ServerMetrics>,
    /// Requests in the engine, by request id.
    active: HashMap<u64, mpsc::UnboundedSender<EngineEvent>>,
}

impl EngineLoop {
    fn new(llm: LLM, metrics: Arc<ServerMetrics>) -> Self {
        EngineLoop {
            llm,
            metrics,
            active: HashMap::new(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<EngineRequest>) {
        loop {
            if self.active.is_empty() {
                // Idle: sleep until a request comes, or end when the server is gone.
                match rx.blocking_recv() {
                    Some(request) => self.admit(request),
                    None => return,
                }
            }
            while let Ok(request) = rx.try_recv() {
                self.admit(request);
            }
            self.abort_abandoned();
            if !self.active.is_empty() {
                self.step();
            }
            self.metrics.set_engine(&self.llm.metrics());
        }
    }

    /// Puts a request into the engine, or tells the handler why not.
    fn admit(&mut self, request: EngineRequest) {
        if request.events.is_closed() {
            return; // the client left while the request was queued
        }
        let prompt_tokens = request.prompt_token_ids.len();
        match self
            .llm
            .add_request(&Prompt::Tokens(request.prompt_token_ids), request.params)
        {
            Ok(id) => {
                self.metrics.add_prompt_tokens(prompt_tokens);
                let _ = request.events.send(EngineEvent::Accepted { prompt_tokens });
                self.active.insert(id, request.events);
            }
            Err(e) => {
                let _ = request.events.send(EngineEvent::Rejected(e));
            }
        }
    }

    /// Aborts the requests nobody listens to any more, freeing their KV blocks.
    fn abort_abandoned(&mut self) {
        let llm = &mut self.llm;
        let metrics = &self.metrics;
        self.active.retain(|&id, events| {
            if events.is_closed() {
                llm.abort(id);
                metrics.request_aborted();
                false
            } else {
                true
            }
        });
    }

    /// Runs one step and hands out its tokens.
    fn step(&mut self) {
        if self.llm.is_finished() {
            // Cannot happen while the engine and `active` agree; fail rather than spin.
            self.fail_all("the engine lost track of its requests");
            return;
        }
        match self.llm.step() {
            Ok(events) => {
                // Metrics first, so a client that reads /metrics after its answer sees them.
                self.metrics.set_engine(&self.llm.metrics());
                for ev in &events {
                    self.metrics.add_generation_tokens(ev.new_token_ids.len());
                    if ev.finish_reason.is_some() {
                        self.metrics.request_finished();
                    }
                }
                for ev in events {
                    let finished = ev.finish_reason.is_some();
                    if let Some(events) = self.active.get(&ev.request_id) {
                        let _ = events.send(EngineEvent::Tokens {
                            token_ids: ev.new_token_ids,
                            finish_reason: ev.finish_reason,
                        });
                    }
                    if finished {
                        self.active.remove(&ev.request_id);
                    }
                }
            }
            Err(e) => self.fail_all(&format!("engine step failed: {e}")),
        }
    }

    /// Aborts every request in flight and tells each why.
    fn fail_all(&mut self, msg: &str) {
        for (id, events) in self.active.drain() {
            self.llm.abort(id);
            let _ = events.send(EngineEvent::Failed(msg.to_string()));
        }
    }
}
