//! The OpenAI HTTP API: request and response bodies, and the checks a
//! request must pass before it costs any compute.
//!
//! Only what the frontend serves is modelled: chat completions, text
//! completions and the model list, with the sampling fields that change
//! generation (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`).
//! Everything else in a request is ignored, as the real API ignores fields
//! it does not know; fields the frontend cannot honour (`n > 1`, `echo`,
//! `logprobs`) are refused with a 400 rather than silently dropped.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::engine::sampling::SamplingParams;

/// Tokens generated when a request gives no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 128;
/// At most this many stop sequences, as in the OpenAI API.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: None,
        }
    }

    pub fn worker_failed(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: message.into(),
            kind: "worker_error",
            param: None,
            code: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API key: send `Authorization: Bearer <key>` with the key the frontend was started with".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessageBody {
    pub role: String,
    pub content: String,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    /// The newer name for `max_tokens` in chat completions.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Not an OpenAI field: generate exactly `max_tokens` (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageBody>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<bool>,
}

/// `prompt` of a text completion: a string, a one-string list, or token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<Value>,
}

/// A request's sampling, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a JSON body, saying precisely what is wrong with it.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not valid UTF-8 ({e}); send JSON encoded as UTF-8"),
            None,
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
            None,
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        let what = if e.is_data() {
            "the JSON does not match the API"
        } else {
            "the request body is not valid JSON"
        };
        ApiError::bad_request(format!("{what}: {e}"), None)
    })
}

impl SamplingFields {
    /// Checks every field and turns them into engine parameters.
    pub fn check(&self) -> Result<Sampling, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "only n = 1 is supported: send one request per completion",
                Some("n"),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => DEFAULT_MAX_TOKENS,
            Some(n) if n >= 1 => n as usize,
            Some(n) => {
                return Err(ApiError::bad_request(
                    format!("max_tokens must be at least 1, got {n}"),
                    Some("max_tokens"),
                ))
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(
                format!("temperature must be between 0 and 2, got {temperature}"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(
                format!("top_p must be in (0, 1], got {top_p}"),
                Some("top_p"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_SEQUENCES || stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad_request(
                format!("stop takes at most {MAX_STOP_SEQUENCES} non-empty strings"),
                Some("stop"),
            ));
        }
        Ok(Sampling {
            params: SamplingParams {
                temperature,
                top_p,
                // No seed: a fresh one per request, as OpenAI does.
                seed: self.seed.map_or_else(rand::random, |s| s as u64),
                max_tokens,
                ignore_eos: self.ignore_eos,
            },
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// What the endpoint answers with, built from one finished (or streamed) generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn object(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completion => "completions",
        }
    }

    /// A whole (non-streaming) response.
    pub fn response(
        self,
        id: &str,
        created: u64,
        model: &str,
        text: &str,
        finish_reason: &str,
        usage: Usage,
    ) -> Value {
        let choice = match self {
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": null,
            }),
            Endpoint::Completion => serde_json::json!({
                "index": 0,
                "text": text,
                "finish_reason": finish_reason,
                "logprobs": null,
            }),
        };
        serde_json::json!({
            "id": id,
            "object": self.object(false),
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// One streamed chunk: a piece of text, or (with `finish_reason`) the end.
    pub fn chunk(
        self,
        id: &str,
        created: u64,
        model: &str,
        text: Option<&str>,
        finish_reason: Option<&str>,
    ) -> Value {
        let choice = match self {
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => serde_json::json!({"role": "assistant", "content": t}),
                    None => serde_json::json!({}),
                };
                serde_json::json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null})
            }
            Endpoint::Completion => serde_json::json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "finish_reason": finish_reason,
                "logprobs": null,
            }),
        };
        serde_json::json!({
            "id": id,
            "object": self.object(true),
            "created": created,
            "model": model,
            "choices": [choice],
        })
    }

    /// The last streamed chunk when the client asked for usage.
    pub fn usage_chunk(self, id: &str, created: u64, model: &str, usage: Usage) -> Value {
        serde_json::json!({
            "id": id,
            "object": self.object(true),
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> Result<Sampling, ApiError> {
        parse_body::<SamplingFields>(json.as_bytes())?.check()
    }

    #[test]
    fn sampling_fields_are_checked() {
        let s = fields(r#"{"max_tokens": 5, "temperature": 0, "seed": 3, "stop": "\n"}"#).unwrap();
        assert_eq!(s.params.max_tokens, 5);
        assert_eq!(s.params.temperature, 0.0);
        assert_eq!(s.params.seed, 3);
        assert_eq!(s.stop, vec!["\n".to_string()]);
        for (body, param) in [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": -3}"#, "max_tokens"),
            (r#"{"temperature": 3.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
        ] {
            let e = fields(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}");
        }
    }

    #[test]
    fn bodies_that_are_not_json_say_so() {
        let e = parse_body::<ChatCompletionRequest>(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<ChatCompletionRequest>(b"{\"model\": \"x\"}").unwrap_err();
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = parse_body::<ChatCompletionRequest>(b"{\"messages\": \"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        let e = parse_body::<ChatCompletionRequest>(b"").unwrap_err();
        assert!(e.message.contains("empty"), "{}", e.message);
    }

    #[test]
    fn errors_have_openai_shape() {
        let body = ApiError::bad_request("nope", Some("stop")).body();
        assert_eq!(body["error"]["message"], "nope");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "stop");
    }
}
