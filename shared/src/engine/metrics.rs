//! What the engine measures: per request (queue, time to first token,
//! inter-token latencies) and per engine (occupancy, cache hit rate).

use std::time::{Duration, Instant};

use serde::Serialize;

/// Timestamps collected while a request runs.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub token_times: Vec<Instant>,
    pub cached_prompt_tokens: usize,
    pub preemptions: u32,
}

impl RequestMetrics {
    pub fn new(arrival: Instant) -> Self {
        RequestMetrics {
            arrival,
            first_scheduled: None,
            token_times: Vec::new(),
            cached_prompt_tokens: 0,
            preemptions: 0,
        }
    }

    /// Durations derived from the timestamps, at `end`.
    pub fn timings(&self, prompt_tokens: usize, end: Instant) -> RequestTimings {
        let scheduled = self.first_scheduled.unwrap_or(end);
        let first = self.token_times.first().copied();
        let inter_token: Vec<Duration> = self.token_times.windows(2).map(|w| w[1] - w[0]).collect();
        RequestTimings {
            prompt_tokens,
            output_tokens: self.token_times.len(),
            cached_prompt_tokens: self.cached_prompt_tokens,
            preemptions: self.preemptions,
            queue_time: scheduled - self.arrival,
            time_to_first_token: first.map(|f| f - self.arrival),
            prefill_time: first.map(|f| f - scheduled),
            decode_time: first.map_or(Duration::ZERO, |f| end - f),
            end_to_end: end - self.arrival,
            inter_token,
        }
    }
}

/// Per-request latency breakdown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestTimings {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub preemptions: u32,
    /// Arrival → first scheduled.
    pub queue_time: Duration,
    /// Arrival → first token.
    pub time_to_first_token: Option<Duration>,
    /// First scheduled → first token.
    pub prefill_time: Option<Duration>,
    /// First token → finish.
    pub decode_time: Duration,
    pub end_to_end: Duration,
    /// Gaps between consecutive tokens.
    pub inter_token: Vec<Duration>,
}

/// A snapshot of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: usize,
    pub blocks_in_use: usize,
    /// Idle blocks kept because their content may be reused.
    pub blocks_cached_idle: usize,
    pub prefix_cache_hit_rate: f64,
    pub preemptions: u64,
    pub steps: u64,
    /// Decode steps queued ahead, before the previous step's tokens were
    /// read, and then used (see `EngineConfig::decode_ahead`).
    pub steps_ahead_used: u64,
    /// Decode steps queued ahead and then not used: a sequence stopped, or
    /// the next step's batch turned out different.
    pub steps_ahead_dropped: u64,
}
