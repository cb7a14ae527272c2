//! Errors of `nanovllm serve` as OpenAI sends them: an HTTP status and the body
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Every handler returns `Result<_, ApiError>`; a refused request never stops the server.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use nanovllm_utils::Error;

/// A refused or failed request.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, naming the field.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `not_found_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A short machine-readable code, when there is one.
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400: the request is malformed or a field is out of range.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    /// 404: the request names a model this server does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{asked}` does not exist; this server serves `{served}`"),
            kind: "not_found_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// 503: the server is at its limit of requests in flight.
    pub fn overloaded(limit: usize) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the server is busy ({limit} requests in flight, its limit); retry shortly"
            ),
            kind: "server_overloaded",
            param: None,
            code: Some("server_overloaded"),
            retry_after: Some(1),
        }
    }

    /// 500: the engine failed while running the request.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "internal_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// Maps an engine error: a refused request (or a prompt the tokenizer cannot handle) is
    /// the client's fault, anything else the server's.
    pub fn from_engine(e: &Error) -> Self {
        match e {
            Error::InvalidRequest(msg) => ApiError::invalid(msg.clone(), None),
            Error::Tokenizer(msg) => ApiError::invalid(format!("tokenizer: {msg}"), None),
            other => ApiError::internal(other.to_string()),
        }
    }

    /// The JSON body OpenAI clients parse.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": ErrorBody {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }})
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
