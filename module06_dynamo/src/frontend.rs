//! The HTTP frontend: OpenAI's API in, routed worker requests out.
//!
//! ```text
//! POST /v1/chat/completions ─► check ─► chat template ─► tokens ─► router ─┬─► decode worker (local prefill)
//!                                                                          └─► prefill worker ─KV─► decode worker
//!        ◄── SSE chunks / one JSON body ◄── stop strings ◄── tokens ◄──────┘
//! ```
//!
//! The frontend tokenizes (it must count tokens for `usage` and the context
//! check, and the router hashes the tokens' blocks), asks the router for a
//! decode worker, decides whether prefill runs there or on a prefill worker
//! ([`crate::disagg`]), and relays the tokens. Each request is one task that
//! owns its worker connection: if the HTTP client goes away, the task ends,
//! the connection closes and the worker cancels the request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures_util::StreamExt;
use module05_routing::registry::Role;
use module05_routing::router::{Route, Router};
use serde_json::json;
use shared::model::tokenizer::{ChatMessage, Tokenizer};
use shared::wire::{Prompt, TransferMode};
use shared::worker_client::{GenerateRequest, WorkerClientError, WorkerReply, WorkerStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::disagg::{DisaggPolicy, PrefillPlace};
use crate::metrics::Metrics;
use crate::openai::{
    parse_body, ApiError, ChatCompletionRequest, CompletionRequest, Endpoint, PromptField,
    Sampling, Usage,
};
use crate::stop::StopScanner;
use crate::worker::role_name;

/// How the frontend behaves.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// The name `/v1/models` lists and requests may name.
    pub model_name: String,
    /// The model's context length, in tokens.
    pub context: usize,
    /// Required as `Authorization: Bearer …` on `/v1/*`, if set.
    pub api_key: Option<String>,
    pub disagg: DisaggPolicy,
    /// How prefill workers ship KV: bulk, layer-wise or one-sided.
    pub transfer: TransferMode,
    /// Longest wait for the next token before the request fails.
    pub token_timeout: Duration,
}

pub struct Frontend {
    tokenizer: Tokenizer,
    router: Arc<Router>,
    config: FrontendConfig,
    pub metrics: Metrics,
    started: Instant,
    next_id: AtomicU64,
}

/// One piece of a generation, from the task that drives it to the handler.
#[derive(Debug)]
enum Piece {
    Text(String),
    End {
        finish_reason: &'static str,
        usage: Usage,
    },
    Failed(ApiError),
}

/// A checked request, ready to run.
struct Job {
    endpoint: Endpoint,
    prompt: Vec<u32>,
    session: u64,
    sampling: Sampling,
}

impl Frontend {
    pub fn new(tokenizer: Tokenizer, router: Arc<Router>, config: FrontendConfig) -> Arc<Self> {
        Arc::new(Frontend {
            tokenizer,
            router,
            config,
            metrics: Metrics::new(),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Says the deployment is stopping (workers leaving now is expected).
    pub fn close(&self) {
        self.router.close();
    }

    /// The routes.
    pub fn app(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(|| async {
                ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: "no such endpoint; this server has POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics".into(),
                    kind: "invalid_request_error",
                    param: None,
                    code: None,
                }
            })
            .with_state(self.clone())
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.config.api_key else {
            return Ok(());
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != &self.config.model_name => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{m}` does not exist here; this server serves `{}` (see GET /v1/models)",
                    self.config.model_name
                ),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            }),
            _ => Ok(()),
        }
    }

    /// The prompt and the new tokens must fit the model's context.
    fn check_length(&self, prompt: &[u32], sampling: &Sampling) -> Result<(), ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", None));
        }
        let context = self.config.context;
        if prompt.len() + sampling.params.max_tokens > context {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad_request(
                    format!(
                        "this model's context is {context} tokens; the prompt has {} and max_tokens asks for {} more. Shorten the prompt or lower max_tokens",
                        prompt.len(),
                        sampling.params.max_tokens
                    ),
                    Some("max_tokens"),
                )
            });
        }
        Ok(())
    }

    fn chat_job(&self, request: ChatCompletionRequest) -> Result<Job, ApiError> {
        self.check_model(&request.model)?;
        if request.logprobs == Some(true) {
            return Err(ApiError::bad_request(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        if request.messages.is_empty() {
            return Err(ApiError::bad_request(
                "messages is empty; send at least one message",
                Some("messages"),
            ));
        }
        if let Some(m) = request
            .messages
            .iter()
            .find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
        {
            return Err(ApiError::bad_request(
                format!("unknown role {:?}; use system, user or assistant", m.role),
                Some("messages"),
            ));
        }
        let sampling = request.sampling.check()?;
        let messages: Vec<ChatMessage> = request
            .messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        let text = self
            .tokenizer
            .apply_chat_template(&messages)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
        let prompt = self
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
        self.check_length(&prompt, &sampling)?;
        // A conversation is named by how it began: every turn resends its
        // first messages, so they are a stable session key for affinity.
        let opening: String = request
            .messages
            .iter()
            .take(2)
            .map(|m| m.content.as_str())
            .collect();
        Ok(Job {
            endpoint: Endpoint::Chat,
            prompt,
            session: xxhash_rust::xxh3::xxh3_64(opening.as_bytes()),
            sampling,
        })
    }

    fn completion_job(&self, request: CompletionRequest) -> Result<Job, ApiError> {
        self.check_model(&request.model)?;
        if request.echo || request.logprobs.as_ref().is_some_and(|l| !l.is_null()) {
            return Err(ApiError::bad_request(
                "echo and logprobs are not supported",
                Some("echo"),
            ));
        }
        let sampling = request.sampling.check()?;
        let prompt = match request.prompt {
            PromptField::Text(text) => Prompt::Text(text),
            PromptField::Texts(mut texts) if texts.len() == 1 => Prompt::Text(texts.remove(0)),
            PromptField::Texts(_) => {
                return Err(ApiError::bad_request(
                    "send one prompt per request",
                    Some("prompt"),
                ))
            }
            PromptField::Tokens(tokens) => Prompt::Tokens(tokens),
        };
        let prompt = prompt
            .into_tokens(&self.tokenizer)
            .map_err(|e| ApiError::bad_request(e, Some("prompt")))?;
        self.check_length(&prompt, &sampling)?;
        let session = xxhash_rust::xxh3::xxh3_64(
            &prompt
                .iter()
                .take(64)
                .flat_map(|t| t.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        Ok(Job {
            endpoint: Endpoint::Completion,
            prompt,
            session,
            sampling,
        })
    }

    /// Answers `job`: an SSE stream or one JSON body.
    async fn respond(self: &Arc<Self>, job: Job) -> Response {
        let endpoint = job.endpoint;
        // Refuse before a stream starts (a stream's status is 200 at once).
        if !self
            .router
            .workers()
            .iter()
            .any(|w| w.info.role != Role::Prefill)
        {
            return self.fail(endpoint, no_worker());
        }
        let stream = job.sampling.stream;
        let include_usage = job.sampling.include_usage;
        let id = format!(
            "{}-{}",
            if endpoint == Endpoint::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let model = self.config.model_name.clone();
        let (tx, mut rx) = mpsc::channel::<Piece>(64);
        tokio::spawn(self.clone().drive(job, tx));
        if !stream {
            let mut text = String::new();
            while let Some(piece) = rx.recv().await {
                match piece {
                    Piece::Text(t) => text.push_str(&t),
                    Piece::End {
                        finish_reason,
                        usage,
                    } => {
                        self.count(endpoint, StatusCode::OK);
                        let body =
                            endpoint.response(&id, created, &model, &text, finish_reason, usage);
                        return Json(body).into_response();
                    }
                    Piece::Failed(error) => return self.fail(endpoint, error),
                }
            }
            return self.fail(
                endpoint,
                ApiError::worker_failed("the request ended without a result"),
            );
        }
        // Streaming: the status is 200 as soon as the stream starts; a
        // failure later arrives as an `error` event.
        self.count(endpoint, StatusCode::OK);
        let events = ReceiverStream::new(rx).flat_map(move |piece| {
            let events: Vec<Event> = match piece {
                Piece::Text(t) => vec![data(endpoint.chunk(&id, created, &model, Some(&t), None))],
                Piece::End {
                    finish_reason,
                    usage,
                } => {
                    let mut events = vec![data(endpoint.chunk(
                        &id,
                        created,
                        &model,
                        None,
                        Some(finish_reason),
                    ))];
                    if include_usage {
                        events.push(data(endpoint.usage_chunk(&id, created, &model, usage)));
                    }
                    events.push(Event::default().data("[DONE]"));
                    events
                }
                Piece::Failed(error) => vec![Event::default()
                    .event("error")
                    .data(error.body().to_string())],
            };
            futures_util::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))
        });
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    }

    fn count(&self, endpoint: Endpoint, status: StatusCode) {
        self.metrics
            .requests
            .with_label_values(&[endpoint.name(), status.as_str()])
            .inc();
    }

    fn fail(&self, endpoint: Endpoint, error: ApiError) -> Response {
        self.count(endpoint, error.status);
        error.into_response()
    }

    // ANCHOR: drive
    /// Runs one request on the workers and sends its pieces to `out`.
    async fn drive(self: Arc<Self>, job: Job, out: mpsc::Sender<Piece>) {
        self.metrics.in_flight.inc();
        let received = Instant::now();
        let result = self.generate(&job, received, &out).await;
        self.metrics.in_flight.dec();
        if let Err(error) = result {
            let _ = out.send(Piece::Failed(error)).await;
        }
    }

    async fn generate(
        &self,
        job: &Job,
        received: Instant,
        out: &mpsc::Sender<Piece>,
    ) -> Result<(), ApiError> {
        // Retry on another worker while nothing has been sent: a worker that
        // died a moment ago may still be in the router's view.
        let mut attempt = 0;
        let (mut stream, route, place) = loop {
            attempt += 1;
            let (route, prefill, place) = self.plan(job)?;
            let request = GenerateRequest {
                prompt: Prompt::Tokens(job.prompt.clone()),
                params: job.sampling.params.clone(),
                mode: if prefill.is_some() {
                    self.config.transfer
                } else {
                    TransferMode::Local
                },
                decode: prefill.as_ref().map(|_| route.worker.address.clone()),
            };
            let address = prefill.as_ref().unwrap_or(&route).worker.address.clone();
            match WorkerStream::open(&address, request).await {
                Ok(stream) => break (stream, (route, prefill), place),
                Err(e) if attempt < 3 => {
                    tracing::warn!(%address, error = %e, "worker unreachable; routing again");
                    drop((route, prefill));
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(ApiError::worker_failed(e.to_string())),
            }
        };
        self.metrics
            .prefill_place
            .with_label_values(&[place.label()])
            .inc();
        let (decode_route, _prefill_route) = route;
        let worker = decode_route.worker.name.clone();
        let mut scanner = StopScanner::new(job.sampling.stop.clone());
        let mut tokens = 0usize;
        let mut last: Option<Instant> = None;
        loop {
            let next = tokio::time::timeout(self.config.token_timeout, stream.next()).await;
            let reply = match next {
                Err(_) => {
                    return Err(ApiError::worker_failed(format!(
                        "worker {worker} sent nothing for {:?}; the request was abandoned",
                        self.config.token_timeout
                    )))
                }
                Ok(None) => return Err(ApiError::worker_failed("the worker stream ended early")),
                Ok(Some(reply)) => reply.map_err(|e| worker_error(&worker, e))?,
            };
            match reply {
                WorkerReply::Token { text, .. } => {
                    let now = Instant::now();
                    match last {
                        None => self.metrics.ttft.observe((now - received).as_secs_f64()),
                        Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    tokens += 1;
                    let scanned = scanner.push(&text);
                    if !scanned.release.is_empty()
                        && out.send(Piece::Text(scanned.release)).await.is_err()
                    {
                        return Ok(()); // the client went away; dropping the stream cancels
                    }
                    if scanned.stopped {
                        let usage = Usage::new(job.prompt.len(), tokens);
                        self.finish(&worker, job, received, usage, None, None);
                        let _ = out
                            .send(Piece::End {
                                finish_reason: "stop",
                                usage,
                            })
                            .await;
                        return Ok(());
                    }
                }
                WorkerReply::Done(breakdown) => {
                    let rest = scanner.finish();
                    if !rest.is_empty() {
                        let _ = out.send(Piece::Text(rest)).await;
                    }
                    let usage = Usage::new(job.prompt.len(), tokens);
                    let transfer = (place == PrefillPlace::Remote)
                        .then_some((breakdown.kv_bytes, breakdown.transfer_exposed_s));
                    self.finish(
                        &worker,
                        job,
                        received,
                        usage,
                        Some(breakdown.cached_prompt_tokens as usize),
                        transfer,
                    );
                    let finish_reason = if tokens >= job.sampling.params.max_tokens {
                        "length"
                    } else {
                        "stop"
                    };
                    let _ = out
                        .send(Piece::End {
                            finish_reason,
                            usage,
                        })
                        .await;
                    return Ok(());
                }
            }
        }
    }
    // ANCHOR_END: drive

    /// Picks the decode worker and, if prefill goes remote, the prefill worker.
    fn plan(&self, job: &Job) -> Result<(Route, Option<Route>, PrefillPlace), ApiError> {
        let route = self
            .router
            .route(&job.prompt, job.session)
            .ok_or_else(no_worker)?;
        let queue = (route.worker.role == Role::Decode)
            .then(|| self.router.prefill_queue())
            .flatten();
        let cached = route.cached_blocks * self.router.block_size();
        let place = self.config.disagg.decide(job.prompt.len(), cached, queue);
        let prefill = match place {
            PrefillPlace::Remote => self.router.route_prefill(job.prompt.len()),
            _ => None,
        };
        let place = if prefill.is_none() && place == PrefillPlace::Remote {
            PrefillPlace::LocalNoPrefillWorker
        } else {
            place
        };
        Ok((route, prefill, place))
    }

    fn finish(
        &self,
        worker: &str,
        job: &Job,
        received: Instant,
        usage: Usage,
        cached: Option<usize>,
        transfer: Option<(u64, f64)>,
    ) {
        self.metrics.e2e.observe(received.elapsed().as_secs_f64());
        self.metrics
            .record_tokens(worker, job.prompt.len(), cached, usage.completion_tokens);
        if let Some((bytes, seconds)) = transfer {
            self.metrics
                .kv_transfer_bytes
                .with_label_values(&[worker])
                .inc_by(bytes);
            self.metrics
                .kv_transfer_seconds
                .with_label_values(&[worker])
                .observe(seconds);
        }
    }
}

fn no_worker() -> ApiError {
    ApiError::unavailable(
        "no decode or aggregated worker is registered; start one (`module06_dynamo worker --role decode`) or wait for it to join",
    )
}

fn worker_error(worker: &str, e: WorkerClientError) -> ApiError {
    match e {
        // The worker judged the request itself (e.g. too large for its KV pool).
        WorkerClientError::Worker(message) if !message.contains("connection") => {
            ApiError::worker_failed(format!("worker {worker}: {message}"))
        }
        other => ApiError::worker_failed(format!(
            "worker {worker} failed mid-request: {other}; the router stops sending it requests"
        )),
    }
}

fn data(value: serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

async fn chat_completions(
    State(f): State<Arc<Frontend>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let job = f
        .check_key(&headers)
        .and_then(|_| parse_body::<ChatCompletionRequest>(&body))
        .and_then(|r| f.chat_job(r));
    match job {
        Ok(job) => f.respond(job).await,
        Err(e) => f.fail(Endpoint::Chat, e),
    }
}

async fn completions(State(f): State<Arc<Frontend>>, headers: HeaderMap, body: Bytes) -> Response {
    let job = f
        .check_key(&headers)
        .and_then(|_| parse_body::<CompletionRequest>(&body))
        .and_then(|r| f.completion_job(r));
    match job {
        Ok(job) => f.respond(job).await,
        Err(e) => f.fail(Endpoint::Completion, e),
    }
}

async fn models(State(f): State<Arc<Frontend>>, headers: HeaderMap) -> Response {
    if let Err(e) = f.check_key(&headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{
            "id": f.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "spark-disagg",
            "max_model_len": f.config.context,
        }],
    }))
    .into_response()
}

/// 200 while some decode or aggregated worker can take requests, else 503.
async fn health(State(f): State<Arc<Frontend>>) -> Response {
    let known = f.router.workers();
    let serving = known.iter().any(|w| w.info.role != Role::Prefill);
    let workers: Vec<_> = known
        .into_iter()
        .map(|w| {
            json!({
                "name": w.info.name,
                "address": w.info.address,
                "role": w.info.role,
                "active_requests": w.active_requests,
                "indexed_blocks": w.indexed_blocks,
            })
        })
        .collect();
    let status = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if serving { "ok" } else { "no_workers" },
        "model": f.config.model_name,
        "policy": f.router.policy_name(),
        "workers": workers,
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(f): State<Arc<Frontend>>) -> Response {
    f.metrics.up_seconds.set(f.started.elapsed().as_secs_f64());
    let workers = f.router.workers();
    for role in [Role::Prefill, Role::Decode, Role::Aggregated] {
        let n = workers.iter().filter(|w| w.info.role == role).count();
        f.metrics
            .workers
            .with_label_values(&[role_name(role)])
            .set(n as f64);
    }
    // Reset first: a worker that left must not keep its last value.
    f.metrics.worker_active_requests.reset();
    f.metrics.worker_indexed_blocks.reset();
    for w in &workers {
        f.metrics
            .worker_active_requests
            .with_label_values(&[&w.info.name, role_name(w.info.role)])
            .set(w.active_requests as f64);
        f.metrics
            .worker_indexed_blocks
            .with_label_values(&[&w.info.name])
            .set(w.indexed_blocks as f64);
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        f.metrics.render(),
    )
        .into_response()
}
