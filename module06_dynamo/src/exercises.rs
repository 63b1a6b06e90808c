//! Lab exercises for module 6 (book chapter 6). Each function is yours to
//! write; `tests/exercises.rs` checks it:
//!
//! ```console
//! cargo test -p module06_dynamo --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module06_dynamo.rs`, compiled in place
//! of this file with `--features solutions` (CI checks them that way).

/// Exercise 6.1 — where generated `text` must be cut: the byte offset at
/// which the earliest of `stops` begins, or `None` if none occurs. (The
/// frontend's `StopScanner` does this incrementally, token by token.)
pub fn stop_position(text: &str, stops: &[&str]) -> Option<usize> {
    let _ = (text, stops);
    todo!("exercise 6.1: the smallest offset of any stop string")
}

/// Exercise 6.2 — goodput: requests per second that met the service-level
/// objective. Each sample is `(ttft_s, mean_itl_s)`; a request is good if
/// both are at or under their limits. `duration_s` is the run's length.
pub fn goodput(samples: &[(f64, f64)], slo_ttft_s: f64, slo_itl_s: f64, duration_s: f64) -> f64 {
    let _ = (samples, slo_ttft_s, slo_itl_s, duration_s);
    todo!("exercise 6.2: good requests / duration")
}

/// Exercise 6.3 — a TTFT-minded disaggregation rule. Prefilling
/// `uncached_tokens` locally takes `uncached / local_tokens_per_s`.
/// Remotely it takes the prefill worker's queue (`remote_queue_s`), its
/// compute (`uncached / remote_tokens_per_s`) and the KV transfer
/// (`uncached × kv_bytes_per_token / link_bytes_per_s`). Return whether
/// remote is strictly faster.
pub fn prefill_remotely(
    uncached_tokens: usize,
    local_tokens_per_s: f64,
    remote_tokens_per_s: f64,
    remote_queue_s: f64,
    kv_bytes_per_token: f64,
    link_bytes_per_s: f64,
) -> bool {
    let _ = (
        uncached_tokens,
        local_tokens_per_s,
        remote_tokens_per_s,
        remote_queue_s,
        kv_bytes_per_token,
        link_bytes_per_s,
    );
    todo!("exercise 6.3: compare the two times")
}
