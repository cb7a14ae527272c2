//! One request's life on the handler side: submit it to the engine loop, turn its tokens into
//! text (streaming detokenization, stop strings cut out), and count what it used.
//!
//! Handlers call [`start`] and then [`Generation::next`] until it returns `None`; each
//! [`Piece`] is text ready to send. Dropping a `Generation` early (client gone) drops its
//! receiver, and the engine loop aborts the request before its next step.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use nanovllm_engine::sampling_params::SamplingParams;
use nanovllm_engine::sequence::FinishReason;

use super::api::{finish_reason_name, Usage};
use super::engine_thread::{EngineEvent, EngineRequest, SubmitError};
use super::error::ApiError;
use super::AppState;
use crate::tokenizer::IncrementalDecoder;

/// Text ready to send, and the finish reason with the last piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// New text (may be empty in the last piece).
    pub text: String,
    /// OpenAI's finish reason, in the last piece only.
    pub finish_reason: Option<&'static str>,
    /// The generated token ids received since the previous piece (a stop token included).
    pub token_ids: Vec<u32>,
}

/// A request in flight.
pub struct Generation {
    events: mpsc::UnboundedReceiver<EngineEvent>,
    decoder: Option<IncrementalDecoder<'static>>,
    stops: StopMatcher,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Token ids not yet handed out in a piece.
    pending_ids: Vec<u32>,
    done: bool,
    succeeded: bool,
    started: Instant,
    state: Arc<AppState>,
    _permit: OwnedSemaphorePermit,
}

/// Submits a request and waits until the engine has taken it in (or refused it).
pub async fn start(
    state: &Arc<AppState>,
    prompt_token_ids: Vec<u32>,
    params: SamplingParams,
    stop_strings: Vec<String>,
) -> Result<Generation, ApiError> {
    let started = Instant::now();
    let permit = state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded(state.max_in_flight))?;
    let (tx, mut events) = mpsc::unbounded_channel();
    state
        .engine
        .submit(EngineRequest {
            prompt_token_ids,
            params,
            events: tx,
        })
        .map_err(|e| match e {
            SubmitError::Full => ApiError::overloaded(state.max_in_flight),
            SubmitError::Stopped => ApiError::internal("the engine has stopped"),
        })?;
    let prompt_tokens = match events.recv().await {
        Some(EngineEvent::Accepted { prompt_tokens }) => prompt_tokens,
        Some(EngineEvent::Rejected(e)) => return Err(ApiError::from_engine(&e)),
        Some(EngineEvent::Failed(msg)) => return Err(ApiError::internal(msg)),
        Some(EngineEvent::Tokens { .. }) | None => {
            return Err(ApiError::internal(
                "the engine stopped before taking the request",
            ))
        }
    };
    Ok(Generation {
        events,
        decoder: state.tokenizer.map(|t| IncrementalDecoder::new(t, true)),
        stops: StopMatcher::new(stop_strings),
        prompt_tokens,
        completion_tokens: 0,
        pending_ids: Vec::new(),
        done: false,
        succeeded: false,
        started,
        state: state.clone(),
        _permit: permit,
    })
}

impl Generation {
    /// Token counts so far.
    pub fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.completion_tokens)
    }

    /// The next text to send; `None` after the piece that carries the finish reason.
    pub async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        while !self.done {
            let event = self.events.recv().await;
            match event {
                Some(EngineEvent::Tokens {
                    token_ids,
                    finish_reason,
                }) => match self.on_tokens(&token_ids, finish_reason) {
                    Ok(Some(piece)) => return Some(Ok(piece)),
                    Ok(None) => {}
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
                Some(EngineEvent::Failed(msg)) => {
                    self.done = true;
                    return Some(Err(ApiError::internal(msg)));
                }
                Some(EngineEvent::Accepted { .. } | EngineEvent::Rejected(_)) => {}
                None => {
                    self.done = true;
                    return Some(Err(ApiError::internal(
                        "the engine stopped in the middle of the request",
                    )));
                }
            }
        }
        None
    }

    fn on_tokens(
        &mut self,
        token_ids: &[u32],
        finish_reason: Option<FinishReason>,
    ) -> Result<Option<Piece>, ApiError> {
        self.completion_tokens += token_ids.len();
        self.pending_ids.extend_from_slice(token_ids);
        // A request stopped by the engine ends on its end-of-sequence or stop token, which is
        // counted but not part of the text.
        let text_ids = match finish_reason {
            Some(FinishReason::Stop) => &token_ids[..token_ids.len().saturating_sub(1)],
            _ => token_ids,
        };
        let mut text = String::new();
        if let Some(decoder) = &mut self.decoder {
            for &id in text_ids {
                if let Some(piece) = decoder.push(id).map_err(|e| ApiError::from_engine(&e))? {
                    text.push_str(&piece);
                }
            }
            if finish_reason.is_some() {
                if let Some(decoder) = self.decoder.take() {
                    text.push_str(&decoder.finish().map_err(|e| ApiError::from_engine(&e))?);
                }
            }
        }
        let (mut text, stopped) = self.stops.push(&text);
        let finish = if stopped {
            // Found a stop string: the engine loop aborts the request before its next step.
            self.events.close();
            Some("stop")
        } else if let Some(reason) = finish_reason {
            text.push_str(&self.stops.finish());
            Some(finish_reason_name(reason))
        } else {
            None
        };
        if finish.is_some() {
            self.done = true;
            self.succeeded = true;
        } else if text.is_empty() && self.state.tokenizer.is_some() {
            // Nothing to show yet; without a tokenizer every step's token ids are a piece.
            return Ok(None);
        }
        Ok(Some(Piece {
            text,
            finish_reason: finish,
            token_ids: std::mem::take(&mut self.pending_ids),
        }))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.succeeded {
            self.state.metrics.observe_latency(self.started.elapsed());
        }
    }
}

/// Finds stop strings in streamed text and holds back what could be the start of one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
}

impl StopMatcher {
    /// A matcher for these (non-empty) stop strings.
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            ..Default::default()
        }
    }

    /// Adds text; returns what may be sent now, and whether a stop string was found (the text
    /// is then cut before it and nothing more may be added).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        if self.stops.is_empty() {
            let out = self.text[self.sent..].to_string();
            self.sent = self.text.len();
            return (out, false);
        }
        // Held-back text holds no whole stop string, and no stop string starts in text
        // already sent (it would have been held back), so searching from `sent` suffices.
        let unsent = &self.text[self.sent..];
        if let Some(pos) = self.stops.iter().filter_map(|s| unsent.find(s)).min() {
            let out = unsent[..pos].to_string();
            self.sent = self.text.len();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(unsent.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && unsent.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let end = self.text.len() - hold;
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        (out, false)
    }

    /// The held-back rest, once the request ended without a stop string.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_string_spanning_pieces_is_cut() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxy"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        assert_eq!(run(&["b", "xyz"], &["axy", "b"]), ("axy".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["aé", "!"]), ("a".into(), true));
    }

    #[test]
    fn held_back_prefix_is_not_sent_early() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("go ST"), ("go ".into(), false));
        assert_eq!(m.push("O"), (String::new(), false));
        assert_eq!(m.push("ne"), ("STOne".into(), false));
    }
}
