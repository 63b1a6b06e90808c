//! Generating text for one prompt: the two phases every later module splits apart.
//!
//! ```text
//! prefill:  all prompt tokens in one forward pass  → KV cache + first token   (compute-bound)
//! decode:   one token per forward pass, reusing the cache → next token, …     (memory-bound)
//! ```
//!
//! This loop is the reference the rest of the course is checked against:
//! whatever the engine, the disaggregated path or the HTTP service produce
//! for a greedy request must equal what [`generate`] produces here.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::sampling::{Sampler, SamplingParams};
use crate::model::llama::{DenseKvCache, Llama};

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was produced (it is not part of `tokens`).
    Stop,
    /// `max_tokens` were produced.
    Length,
    /// The client cancelled the request.
    Cancelled,
}

/// The tokens of one generation and where its time went.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Forward pass over the prompt plus choosing the first token.
    pub prefill_time: Duration,
    /// Every later step together.
    pub decode_time: Duration,
}

impl Generation {
    /// Mean time per decode step (zero when only one token was made).
    pub fn time_per_output_token(&self) -> Duration {
        let steps = self.tokens.len().saturating_sub(1) as u32;
        if steps == 0 {
            Duration::ZERO
        } else {
            self.decode_time / steps
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's \
         context of {context} tokens; shorten the prompt or lower max_tokens"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
}

/// Generates up to `params.max_tokens` tokens after `prompt`, calling
/// `on_token` with each one as soon as it is chosen.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    eos_ids: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, GenerateError> {
    params.validate().map_err(GenerateError::Sampling)?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() + params.max_tokens > context {
        return Err(GenerateError::TooLong {
            prompt: prompt.len(),
            max_tokens: params.max_tokens,
            context,
        });
    }

    let mut sampler = Sampler::new(params);
    let mut cache = DenseKvCache::new(model.config().num_hidden_layers);
    let is_eos = |id: u32| !params.ignore_eos && eos_ids.contains(&id);

    // ANCHOR: generate_loop
    // Prefill: the whole prompt at once. Only the last position's logits matter.
    let start = Instant::now();
    let n = prompt.len() as i64;
    let hidden = model.forward(
        &model.token_tensor(prompt),
        &model.positions(0, n),
        &mut cache,
    );
    let logits = model.logits(&hidden.select(1, n - 1)).squeeze_dim(0);
    // Reading the token back to the host waits for the device, so the clock is honest.
    let mut next = sampler.sample(&logits);
    let prefill_time = start.elapsed();

    let mut tokens = Vec::with_capacity(params.max_tokens);
    let mut finish_reason = FinishReason::Length;
    let decode_start = Instant::now();
    loop {
        if is_eos(next) {
            finish_reason = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        on_token(next);
        if tokens.len() >= params.max_tokens {
            break;
        }
        // Decode: one token, attending over the cache.
        let position = (prompt.len() + tokens.len() - 1) as i64;
        let hidden = model.forward(
            &model.token_tensor(&[next]),
            &model.positions(position, 1),
            &mut cache,
        );
        next = sampler.sample(&model.logits(&hidden.select(1, 0)).squeeze_dim(0));
    }
    // ANCHOR_END: generate_loop
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        finish_reason,
        prefill_time,
        decode_time: decode_start.elapsed(),
    })
}
