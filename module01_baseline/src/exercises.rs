//! Lab exercises for module 1 (book chapter 1). Each function is yours to
//! write; `tests/exercises.rs` checks it:
//!
//! ```console
//! cargo test -p module01_baseline --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module01_baseline.rs`, compiled in place
//! of this file with `--features solutions` (CI checks them that way).

/// Exercise 1.1 — the memory-bandwidth floor of one batch-1 decode step, in
/// milliseconds: every weight is read once per step, so a step cannot be
/// faster than `weight_bytes / bandwidth_bytes_per_s`.
pub fn decode_floor_ms(weight_bytes: f64, bandwidth_bytes_per_s: f64) -> f64 {
    let _ = (weight_bytes, bandwidth_bytes_per_s);
    todo!("exercise 1.1: bytes over bandwidth, in ms")
}

/// Exercise 1.2 — greedy decoding's choice: the index of the largest
/// logit (the first one, if several are equal).
pub fn greedy_token(logits: &[f32]) -> u32 {
    let _ = logits;
    todo!("exercise 1.2: arg-max, first on ties")
}

/// Exercise 1.3 — nucleus (top-p) sampling's candidate set: with `probs`
/// sorted from most to least likely, how many tokens form the smallest
/// prefix whose probabilities add up to at least `top_p` (at least one).
pub fn nucleus_size(probs_sorted: &[f32], top_p: f32) -> usize {
    let _ = (probs_sorted, top_p);
    todo!("exercise 1.3: running sum until it reaches top_p")
}

/// Exercise 1.4 — reading a grid barrier in the layer timeline: given when
/// each block arrived at a barrier and when it passed it (nanoseconds of
/// one clock, block by block), return the barrier's own cost and the
/// spread of the arrivals. Every block waits for the last one to arrive,
/// so the shortest wait (`passed - arrived`) is the barrier's own cost —
/// its fence, its atomic and its poll; the spread is the last arrival
/// minus the first. (0, 0) for no blocks.
pub fn barrier_cost_and_spread(arrived: &[u64], passed: &[u64]) -> (u64, u64) {
    let _ = (arrived, passed);
    todo!("exercise 1.4: the shortest wait, and the last arrival minus the first")
}
