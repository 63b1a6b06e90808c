//! Reference solutions to module 2's exercises (`src/exercises.rs`).

use shared::model::config::LlamaConfig;

pub fn kv_bytes_per_token(config: &LlamaConfig, bytes_per_element: usize) -> usize {
    config.num_hidden_layers * 2 * config.num_kv_heads() * config.head_dim() * bytes_per_element
}

pub fn sequences_that_fit(
    memory_bytes: f64,
    utilization: f64,
    weight_bytes: f64,
    kv_bytes_per_token: f64,
    tokens_per_sequence: usize,
) -> u64 {
    let free = memory_bytes * utilization - weight_bytes;
    if free <= 0.0 {
        return 0;
    }
    (free / (kv_bytes_per_token * tokens_per_sequence as f64)) as u64
}

pub fn break_even_tokens(
    latency_s: f64,
    kv_bytes_per_token: f64,
    link_bytes_per_s: f64,
    prefill_tokens_per_s: f64,
) -> Option<u64> {
    // latency + n·t_link = n·t_prefill  ⇒  n = latency / (t_prefill − t_link)
    let per_token_gain = 1.0 / prefill_tokens_per_s - kv_bytes_per_token / link_bytes_per_s;
    if per_token_gain <= 0.0 {
        return None;
    }
    Some((latency_s / per_token_gain).ceil() as u64)
}
