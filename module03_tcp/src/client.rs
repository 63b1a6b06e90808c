//! The client: sends a workload and records where each request's time went.
//!
//! One connection carries many requests at once (each frame names its
//! request), up to `concurrency` in flight. For every request the client
//! notes when it was sent, when the first token arrived (time to first
//! token) and when the last did; the servers fill in the rest of the
//! [`Breakdown`].

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::engine::sampling::SamplingParams;
use shared::wire::{self, Breakdown, FrameError, Message, Prompt, TransferMode};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {address}: {source}. Is the server running there?")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("the connection to {address} failed: {source}")]
    Frame { address: String, source: FrameError },
    #[error("the server failed: {0}")]
    Server(String),
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Workload {
    pub prompts: Vec<String>,
    pub max_tokens: u32,
    /// Generate exactly `max_tokens` tokens, past end-of-sequence.
    pub ignore_eos: bool,
    pub concurrency: usize,
    pub mode: TransferMode,
}

/// One finished request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestResult {
    pub prompt: String,
    pub tokens: Vec<u32>,
    pub text: String,
    /// `None` when the server answered with an error (in `error`).
    pub breakdown: Option<Breakdown>,
    pub error: Option<String>,
}

/// A few prompts of varied length, for demos and tests.
pub fn default_prompts() -> Vec<String> {
    [
        "The capital of France is",
        "Write one sentence about why the sky is blue.",
        "List three prime numbers:",
        "A key-value cache stores",
        "In distributed systems, moving state between machines costs time because",
        "Translate to French: good morning, how are you today?",
        "Once upon a time, in a data center far away, two GPUs shared the work of answering questions. The first one read every prompt",
        "def fibonacci(n):",
        "Disaggregated serving splits the work of a language model in two. Prefill reads the whole prompt \
         in one pass and is limited by arithmetic; decode produces one token at a time and is limited by \
         memory bandwidth. Running them on separate machines lets each be sized and batched for its own \
         bottleneck, at the price of moving the key-value cache from one machine to the other after every \
         prefill. Whether that price is worth paying depends on the size of the cache and the speed of the link. \
         Summarise this paragraph in one sentence:",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// Runs `workload` against the server at `address`; results are in prompt order.
pub async fn run(address: &str, workload: &Workload) -> Result<Vec<RequestResult>, ClientError> {
    let frame_error = |source| ClientError::Frame {
        address: address.to_string(),
        source,
    };
    let stream = TcpStream::connect(address)
        .await
        .map_err(|source| ClientError::Connect {
            address: address.to_string(),
            source,
        })?;
    stream
        .set_nodelay(true)
        .map_err(|e| frame_error(e.into()))?;
    let (mut reader, mut writer) = stream.into_split();

    struct InFlight {
        sent: Instant,
        first: Option<Instant>,
        tokens: Vec<u32>,
        text: String,
    }
    let mut results: Vec<Option<RequestResult>> = vec![None; workload.prompts.len()];
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut next = 0usize;
    let mut scratch = Vec::new();
    let mut done = 0;
    while done < workload.prompts.len() {
        while next < workload.prompts.len() && in_flight.len() < workload.concurrency.max(1) {
            let message = Message::Generate {
                request_id: next as u64,
                prompt: Prompt::Text(workload.prompts[next].clone()),
                params: SamplingParams {
                    max_tokens: workload.max_tokens as usize,
                    ignore_eos: workload.ignore_eos,
                    ..SamplingParams::default()
                },
                mode: workload.mode,
                decode: None,
            };
            in_flight.insert(
                next as u64,
                InFlight {
                    sent: Instant::now(),
                    first: None,
                    tokens: Vec::new(),
                    text: String::new(),
                },
            );
            wire::write_frame(&mut writer, &message, &[])
                .await
                .map_err(frame_error)?;
            next += 1;
        }
        let message = wire::read_frame(&mut reader, 0, &mut scratch)
            .await
            .map_err(frame_error)?;
        let (id, outcome) = match message {
            Message::Token {
                request_id,
                token,
                text,
            } => {
                if let Some(r) = in_flight.get_mut(&request_id) {
                    r.first.get_or_insert_with(Instant::now);
                    r.tokens.push(token);
                    r.text.push_str(&text);
                }
                continue;
            }
            Message::Done {
                request_id,
                breakdown,
            } => (request_id, Ok(breakdown)),
            Message::Error {
                request_id: Some(request_id),
                message,
            } => (request_id, Err(message)),
            Message::Error {
                request_id: None,
                message,
            } => return Err(ClientError::Server(message)),
            other => return Err(ClientError::Server(format!("unexpected message {other:?}"))),
        };
        let Some(r) = in_flight.remove(&id) else {
            continue;
        };
        let end = Instant::now();
        let index = id as usize;
        results[index] = Some(match outcome {
            Ok(mut breakdown) => {
                breakdown.total_s = (end - r.sent).as_secs_f64();
                breakdown.ttft_s = (r.first.unwrap_or(end) - r.sent).as_secs_f64();
                breakdown.output_tokens = r.tokens.len() as u32;
                RequestResult {
                    prompt: workload.prompts[index].clone(),
                    tokens: r.tokens,
                    text: r.text,
                    breakdown: Some(breakdown),
                    error: None,
                }
            }
            Err(message) => RequestResult {
                prompt: workload.prompts[index].clone(),
                tokens: r.tokens,
                text: r.text,
                breakdown: None,
                error: Some(message),
            },
        });
        done += 1;
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every request finished"))
        .collect())
}
