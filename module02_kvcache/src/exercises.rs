//! Lab exercises for module 2 (book chapter 2). Each function is yours to
//! write; `tests/exercises.rs` checks it against this crate's own numbers:
//!
//! ```console
//! cargo test -p module02_kvcache --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module02_kvcache.rs`, compiled in place
//! of this file with `--features solutions` (CI checks them that way).

use shared::model::config::LlamaConfig;

/// Exercise 2.1 — bytes of KV cache one token adds to a model, with
/// `bytes_per_element` bytes per stored number (2 for bf16). Every layer
/// stores a key and a value vector for each KV head.
pub fn kv_bytes_per_token(config: &LlamaConfig, bytes_per_element: usize) -> usize {
    let _ = (config, bytes_per_element);
    todo!("exercise 2.1: layers × (K and V) × KV heads × head_dim × bytes")
}

/// Exercise 2.2 — how many sequences of `tokens_per_sequence` tokens fit at
/// once in `memory_bytes` of GPU memory, after `weight_bytes` of weights,
/// when an engine may use the fraction `utilization` of the memory.
/// Zero if the weights alone do not fit.
pub fn sequences_that_fit(
    memory_bytes: f64,
    utilization: f64,
    weight_bytes: f64,
    kv_bytes_per_token: f64,
    tokens_per_sequence: usize,
) -> u64 {
    let _ = (
        memory_bytes,
        utilization,
        weight_bytes,
        kv_bytes_per_token,
        tokens_per_sequence,
    );
    todo!("exercise 2.2: (usable memory − weights) / (bytes per token × tokens)")
}

/// Exercise 2.3 — the prompt length (in tokens) at which moving a prompt's
/// KV over a link takes as long as computing it: transfer costs `latency_s`
/// plus `kv_bytes_per_token / link_bytes_per_s` per token; prefill costs
/// `1 / prefill_tokens_per_s` per token. `None` if the transfer is slower
/// per token than prefill (it never catches up), `Some(0)` if it is never
/// slower.
pub fn break_even_tokens(
    latency_s: f64,
    kv_bytes_per_token: f64,
    link_bytes_per_s: f64,
    prefill_tokens_per_s: f64,
) -> Option<u64> {
    let _ = (
        latency_s,
        kv_bytes_per_token,
        link_bytes_per_s,
        prefill_tokens_per_s,
    );
    todo!("exercise 2.3: latency + n·b/bw = n/rate, solved for n")
}
