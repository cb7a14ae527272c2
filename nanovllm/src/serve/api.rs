//! The OpenAI wire format of `nanovllm serve`: request bodies as clients send them, response
//! bodies and stream chunks as clients expect them, and the checks that turn a request into
//! engine [`SamplingParams`] (or a 400 naming the field).
//!
//! Handlers (`handlers.rs`) parse a body with [`parse_json`] and [`parse_fields`], call
//! [`SamplingFields::sampling_params`], and answer with the response types below.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use nanovllm_engine::sampling_params::SamplingParams;
use nanovllm_engine::sequence::FinishReason;

use super::error::ApiError;

/// Parses a request body into a JSON object; anything else is a 400.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "request body must be a JSON object",
            None,
        ));
    }
    Ok(value)
}

/// Reads the fields of `T` out of a parsed body (other fields are left alone); a missing field
/// or one of the wrong type becomes a 400 whose message and `param` name the field.
pub fn parse_fields<T: DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(format!("request body: {inner}"), None)
        } else {
            ApiError::invalid(format!("field `{path}`: {inner}"), Some(&path))
        }
    })
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and stopping fields shared by completions and chat completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    /// Temperature in [0, 2]; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus threshold in (0, 1].
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens; 0 or -1 turns it off (an extension, as in vLLM).
    pub top_k: Option<i64>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Stop strings: the output is cut before the first one found.
    pub stop: Option<StopField>,
    /// Token ids that end the request (an extension, as in vLLM).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Seed of this request's sampler.
    pub seed: Option<i64>,
    /// Number of choices; only 1 is served.
    pub n: Option<i64>,
    /// Keep generating past end-of-sequence tokens (an extension, as in vLLM).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Add the generated token ids to each completion choice (an extension, as in vLLM;
    /// the only output of a model without tokenizer.json).
    #[serde(default)]
    pub return_token_ids: bool,
    /// Options of the event stream.
    pub stream_options: Option<StreamOptions>,
}

impl SamplingFields {
    /// The stop strings, without empty ones (which would stop before the first character).
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "field `stop`: holds an empty string, expected non-empty stop strings",
                Some("stop"),
            ));
        }
        Ok(stops)
    }

    /// Whether the last stream chunk should carry usage.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// Checks every field's range and builds the engine's parameters from `defaults` (the
    /// model's generation_config.json). `default_max_tokens` applies when neither
    /// `max_tokens` nor `max_completion_tokens` is given.
    pub fn sampling_params(
        &self,
        defaults: &SamplingParams,
        default_max_tokens: usize,
    ) -> Result<SamplingParams, ApiError> {
        let mut p = defaults.clone();
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    format!("field `n` is {n}, only n = 1 is supported"),
                    Some("n"),
                ));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    format!("field `temperature` is {t}, expected a value in [0, 2]"),
                    Some("temperature"),
                ));
            }
            p.temperature = t as f32;
        }
        if let Some(t) = self.top_p {
            if !(t > 0.0 && t <= 1.0) {
                return Err(ApiError::invalid(
                    format!("field `top_p` is {t}, expected a value in (0, 1]"),
                    Some("top_p"),
                ));
            }
            p.top_p = t as f32;
        }
        if let Some(k) = self.top_k {
            p.top_k = match k {
                -1 | 0 => 0,
                k if k > 0 => k as usize,
                k => {
                    return Err(ApiError::invalid(
                        format!("field `top_k` is {k}, expected -1 or 0 (off) or a positive count"),
                        Some("top_k"),
                    ))
                }
            };
        }
        let (name, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        p.max_tokens = match max {
            None => default_max_tokens,
            Some(m) if m >= 1 => usize::try_from(m).unwrap_or(usize::MAX),
            Some(m) => {
                return Err(ApiError::invalid(
                    format!("field `{name}` is {m}, expected at least 1"),
                    Some(name),
                ))
            }
        };
        p.stop_token_ids = self.stop_token_ids.clone().unwrap_or_default();
        // A negative seed is as good a seed as any: keep its bits.
        p.seed = self.seed.map(|s| s as u64);
        p.ignore_eos = self.ignore_eos;
        Ok(p)
    }
}

/// `prompt` of a completion request: text or token ids, alone or in a list of one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One text prompt.
    Text(String),
    /// One prompt of token ids.
    Tokens(Vec<u32>),
    /// A list of text prompts (only one is served).
    Texts(Vec<String>),
    /// A list of token-id prompts (only one is served).
    TokenLists(Vec<Vec<u32>>),
}

/// The body of `POST /v1/completions`, less the [`SamplingFields`] read apart.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The model to use; must be the served model's name when given.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: PromptField,
}

/// `content` of a chat message: a string or a list of typed parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": ...}` is understood.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part's kind; only `text` is served.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    /// `system`, `user`, `assistant`, `developer` or `tool`.
    pub role: String,
    /// What was said (absent or null for an empty message).
    pub content: Option<MessageContent>,
}

/// Extra arguments handed to the chat template (as vLLM takes them).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatTemplateKwargs {
    /// Qwen3's thinking mode; the template's default (on) when absent.
    pub enable_thinking: Option<bool>,
}

/// The body of `POST /v1/chat/completions`, less the [`SamplingFields`] read apart.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The model to use; must be the served model's name when given.
    pub model: Option<String>,
    /// The conversation so far.
    pub messages: Vec<RequestMessage>,
    /// Arguments of the chat template.
    pub chat_template_kwargs: Option<ChatTemplateKwargs>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of a request with these counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// OpenAI's name of a finish reason.
pub fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One choice of a completion response or chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Index of the choice (always 0).
    pub index: usize,
    /// Generated text (of this chunk, when streaming).
    pub text: String,
    /// Log-probabilities are not served: always null.
    pub logprobs: Option<()>,
    /// Why generation stopped; null until the last chunk.
    pub finish_reason: Option<&'static str>,
    /// Generated token ids (of this chunk, when streaming), when `return_token_ids` asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A completion response, or one chunk of a streamed one (`object` tells which).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-<n>`, the same in every chunk of one request.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix time the request arrived.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The choices (empty in a usage-only chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts; in a stream only in the last chunk, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The assistant's message in a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The reply.
    pub content: String,
}

/// One choice of a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Index of the choice (always 0).
    pub index: usize,
    /// The reply.
    pub message: ResponseMessage,
    /// Log-probabilities are not served: always null.
    pub logprobs: Option<()>,
    /// Why generation stopped.
    pub finish_reason: &'static str,
}

/// A chat completion response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    /// `chatcmpl-<n>`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix time the request arrived.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// What a chat stream chunk adds to the reply.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Index of the choice (always 0).
    pub index: usize,
    /// What this chunk adds.
    pub delta: ChatDelta,
    /// Log-probabilities are not served: always null.
    pub logprobs: Option<()>,
    /// Why generation stopped; null until the last chunk.
    pub finish_reason: Option<&'static str>,
}

/// One chunk of a streamed chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    /// `chatcmpl-<n>`, the same in every chunk of one request.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time the request arrived.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The choices (empty in the usage-only chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts, in the usage-only chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The name requests must use.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix time the server started.
    pub created: u64,
    /// `nanovllm`.
    pub owned_by: &'static str,
    /// Longest sequence (prompt + output) served.
    pub max_model_len: usize,
}

/// The body of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The one served model.
    pub data: Vec<ModelCard>,
}
