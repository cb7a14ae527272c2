//! The HTTP endpoints of `nanovllm serve`: completions and chat completions (whole or as
//! server-sent events), the model list, health and Prometheus metrics.
//!
//! Each generating handler checks the body ([`api`](super::api)), tokenizes the prompt, starts
//! a `Generation` and either collects it into one response or streams it chunk by chunk,
//! ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;

use super::api::{
    parse_fields, parse_json, ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatRequest,
    ChatResponse, CompletionChoice, CompletionRequest, CompletionResponse, MessageContent,
    ModelCard, ModelList, PromptField, ResponseMessage, SamplingFields, Usage,
};
use super::error::ApiError;
use super::generation::{start, Generation, Piece};
use super::AppState;
use crate::tokenizer::ChatMessage;

/// Tokens a completion generates when the request does not say (OpenAI's default).
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts an error answer in the metrics and sends it.
fn answer(state: &AppState, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(response) => response,
        Err(e) => {
            state.metrics.request_refused();
            e.into_response()
        }
    }
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.model_name => Err(ApiError::model_not_found(m, &state.model_name)),
        _ => Ok(()),
    }
}

fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    let tokenizer = state.tokenizer.ok_or_else(|| {
        ApiError::invalid(
            "the model has no tokenizer.json: send `prompt` as a list of token ids",
            Some("prompt"),
        )
    })?;
    tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::from_engine(&e))
}

/// Checks the sampling fields and starts generating.
async fn start_request(
    state: &Arc<AppState>,
    fields: &SamplingFields,
    prompt: Vec<u32>,
    default_max_tokens: usize,
) -> Result<Generation, ApiError> {
    let params = fields.sampling_params(&state.defaults, default_max_tokens)?;
    let stops = fields.stop_strings()?;
    if !stops.is_empty() && state.tokenizer.is_none() {
        return Err(ApiError::invalid(
            "field `stop`: stop strings need the model's tokenizer.json; use `stop_token_ids`",
            Some("stop"),
        ));
    }
    start(state, prompt, params, stops).await
}

/// A generation run to its end.
struct Collected {
    text: String,
    finish_reason: &'static str,
    token_ids: Vec<u32>,
}

/// Runs a generation to its end: the whole text, its finish reason and token ids.
async fn collect(generation: &mut Generation) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut token_ids = Vec::new();
    while let Some(piece) = generation.next().await {
        let piece = piece?;
        text.push_str(&piece.text);
        token_ids.extend_from_slice(&piece.token_ids);
        if let Some(finish_reason) = piece.finish_reason {
            return Ok(Collected {
                text,
                finish_reason,
                token_ids,
            });
        }
    }
    Err(ApiError::internal(
        "the request ended without a finish reason",
    ))
}

/// What a stream chunk is made of; the endpoint turns it into its own JSON.
enum ChunkPart<'a> {
    /// The first chunk (chat sends the assistant role in it).
    Start,
    /// New text, with the finish reason in the last one.
    Piece(&'a Piece),
    /// The token counts, after the last piece when asked for.
    Usage(Usage),
}

/// Where a stream is.
enum Phase {
    Start,
    Pieces,
    Usage,
    Done,
    End,
}

/// The state of one event stream.
struct SseState<F> {
    generation: Generation,
    chunk: F,
    include_usage: bool,
    finished: bool,
    phase: Phase,
    state: Arc<AppState>,
}

/// Streams a generation as server-sent events: `chunk` renders each part (`None` skips it),
/// an error mid-stream goes out as an error object, and `[DONE]` ends the stream. Dropping
/// the stream (client gone) drops the generation, which aborts the request.
fn sse<F>(
    state: &Arc<AppState>,
    generation: Generation,
    include_usage: bool,
    chunk: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    F: Fn(ChunkPart<'_>) -> Option<String> + Send + 'static,
{
    let init = SseState {
        generation,
        chunk,
        include_usage,
        finished: false,
        phase: Phase::Start,
        state: state.clone(),
    };
    let event = |data: String| Ok(Event::default().data(data));
    let stream = futures_util::stream::unfold(init, move |mut s| async move {
        loop {
            match s.phase {
                Phase::Start => {
                    s.phase = Phase::Pieces;
                    if let Some(data) = (s.chunk)(ChunkPart::Start) {
                        return Some((event(data), s));
                    }
                }
                Phase::Pieces => match s.generation.next().await {
                    Some(Ok(piece)) => {
                        s.finished |= piece.finish_reason.is_some();
                        if let Some(data) = (s.chunk)(ChunkPart::Piece(&piece)) {
                            return Some((event(data), s));
                        }
                    }
                    Some(Err(e)) => {
                        s.state.metrics.request_refused();
                        return Some((event(e.body().to_string()), s));
                    }
                    None => s.phase = Phase::Usage,
                },
                Phase::Usage => {
                    s.phase = Phase::Done;
                    if s.finished && s.include_usage {
                        if let Some(data) = (s.chunk)(ChunkPart::Usage(s.generation.usage())) {
                            return Some((event(data), s));
                        }
                    }
                }
                Phase::Done => {
                    s.phase = Phase::End;
                    return Some((event("[DONE]".to_string()), s));
                }
                Phase::End => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = completions_inner(&state, &body).await;
    answer(&state, result)
}

async fn completions_inner(state: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let json = parse_json(body)?;
    let request: CompletionRequest = parse_fields(&json)?;
    let fields: SamplingFields = parse_fields(&json)?;
    check_model(state, request.model.as_deref())?;
    let prompt = match request.prompt {
        PromptField::Text(text) => encode(state, &text)?,
        PromptField::Tokens(ids) => ids,
        PromptField::Texts(texts) if texts.len() == 1 => encode(state, &texts[0])?,
        PromptField::TokenLists(mut lists) if lists.len() == 1 => lists.swap_remove(0),
        PromptField::Texts(_) | PromptField::TokenLists(_) => {
            return Err(ApiError::invalid(
                "field `prompt`: holds several prompts, only one per request is supported",
                Some("prompt"),
            ))
        }
    };
    let mut generation =
        start_request(state, &fields, prompt, DEFAULT_COMPLETION_MAX_TOKENS).await?;
    let id = format!("cmpl-{}", state.next_id());
    let created = unix_now();
    let model = state.model_name.clone();
    let response = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    let return_ids = fields.return_token_ids;
    if fields.stream {
        let chunk = move |part: ChunkPart<'_>| {
            let body = match part {
                ChunkPart::Start => return None,
                ChunkPart::Piece(p) => response(
                    vec![CompletionChoice {
                        index: 0,
                        text: p.text.clone(),
                        logprobs: None,
                        finish_reason: p.finish_reason,
                        token_ids: return_ids.then(|| p.token_ids.clone()),
                    }],
                    None,
                ),
                ChunkPart::Usage(u) => response(Vec::new(), Some(u)),
            };
            serde_json::to_string(&body).ok()
        };
        return Ok(sse(state, generation, fields.include_usage(), chunk).into_response());
    }
    let done = collect(&mut generation).await?;
    let body = response(
        vec![CompletionChoice {
            index: 0,
            text: done.text,
            logprobs: None,
            finish_reason: Some(done.finish_reason),
            token_ids: return_ids.then_some(done.token_ids),
        }],
        Some(generation.usage()),
    );
    Ok(Json(body).into_response())
}

/// The conversation as the chat template takes it.
fn chat_messages(request: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "field `messages`: is empty, expected at least one message",
            Some("messages"),
        ));
    }
    request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!(
                        "field `messages[{i}].role`: is `{}`, expected system, developer, user, \
                         assistant or tool",
                        m.role
                    ),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!(
                                        "field `messages[{i}].content[{j}]`: is a `{}` part, \
                                         only text parts are supported",
                                        part.kind
                                    ),
                                    Some(&format!("messages[{i}].content[{j}]")),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(m.role.clone(), content))
        })
        .collect()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = chat_inner(&state, &body).await;
    answer(&state, result)
}

async fn chat_inner(state: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let json = parse_json(body)?;
    let request: ChatRequest = parse_fields(&json)?;
    let fields: SamplingFields = parse_fields(&json)?;
    check_model(state, request.model.as_deref())?;
    let messages = chat_messages(&request)?;
    let tokenizer = state.tokenizer.ok_or_else(|| {
        ApiError::invalid(
            "the model has no tokenizer.json, so no chat template; use /v1/completions with \
             token ids",
            Some("messages"),
        )
    })?;
    let enable_thinking = request
        .chat_template_kwargs
        .as_ref()
        .and_then(|k| k.enable_thinking)
        .unwrap_or(true);
    let text = tokenizer
        .apply_chat_template(&messages, true, enable_thinking)
        .map_err(|e| ApiError::from_engine(&e))?;
    let prompt = encode(state, &text)?;
    // Without a limit a reply may fill the context; the engine lowers this to what fits.
    let mut generation = start_request(state, &fields, prompt, state.max_model_len).await?;
    let id = format!("chatcmpl-{}", state.next_id());
    let created = unix_now();
    let model = state.model_name.clone();
    if fields.stream {
        let chunk = move |part: ChunkPart<'_>| {
            let (choices, usage) = match part {
                ChunkPart::Start => (
                    vec![ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                ),
                ChunkPart::Piece(p) => (
                    vec![ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: None,
                            content: (!p.text.is_empty()).then(|| p.text.clone()),
                        },
                        logprobs: None,
                        finish_reason: p.finish_reason,
                    }],
                    None,
                ),
                ChunkPart::Usage(u) => (Vec::new(), Some(u)),
            };
            serde_json::to_string(&ChatChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                choices,
                usage,
            })
            .ok()
        };
        return Ok(sse(state, generation, fields.include_usage(), chunk).into_response());
    }
    let Collected {
        text: content,
        finish_reason,
        ..
    } = collect(&mut generation).await?;
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ResponseMessage {
                role: "assistant",
                content,
            },
            logprobs: None,
            finish_reason,
        }],
        usage: generation.usage(),
    })
    .into_response())
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "nanovllm",
            max_model_len: state.max_model_len,
        }],
    })
}

/// `GET /health`: 200 while the engine thread runs, else 503.
pub async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Any other path: 404 with an error body.
pub async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint; see /v1/completions, /v1/chat/completions, /v1/models, \
                  /health, /metrics"
            .into(),
        kind: "not_found_error",
        param: None,
        code: None,
        retry_after: None,
    }
}
