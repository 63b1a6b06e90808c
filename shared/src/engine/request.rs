//! A request, and the sequence the engine keeps for it while it runs.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::generate::FinishReason;
use super::metrics::RequestMetrics;
use super::sampling::{Sampler, SamplingParams};
use crate::kv::block::BlockTable;
use crate::kv::hash::BlockHash;

pub type RequestId = u64;

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

impl Request {
    pub fn new(id: RequestId, prompt: Vec<u32>, params: SamplingParams) -> Self {
        Request { id, prompt, params }
    }
}

/// One event of a request's output stream.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// A new token.
    Token { id: RequestId, token: u32 },
    /// The request ended; no more events follow.
    Finished {
        id: RequestId,
        reason: FinishReason,
        metrics: Box<super::metrics::RequestTimings>,
    },
}

/// The engine's state for one request.
pub(crate) struct Sequence {
    pub id: RequestId,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K and V are in the cache.
    pub num_computed: usize,
    pub table: BlockTable,
    /// Hashes of the full blocks registered with the prefix cache so far.
    pub hashes: Vec<BlockHash>,
    pub params: SamplingParams,
    pub sampler: Sampler,
    pub metrics: RequestMetrics,
    /// Where tokens go as they are produced (threaded engine only).
    pub stream: Option<UnboundedSender<TokenEvent>>,
    /// Stop after the first token and keep the KV for export (prefill worker).
    pub prefill_only: bool,
}

impl Sequence {
    pub fn new(request: Request, stream: Option<UnboundedSender<TokenEvent>>) -> Self {
        Sequence {
            id: request.id,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            num_computed: 0,
            table: BlockTable::default(),
            hashes: Vec::new(),
            sampler: Sampler::new(&request.params),
            params: request.params,
            metrics: RequestMetrics::new(Instant::now()),
            stream,
            prefill_only: false,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to run through the model before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
