//! Lab exercises for module 5 (book chapter 5). Each function is yours to
//! write; `tests/exercises.rs` checks it, mostly against this crate's own
//! index and policies:
//!
//! ```console
//! cargo test -p module05_routing --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module05_routing.rs`, compiled in place
//! of this file with `--features solutions` (CI checks them that way).

use std::collections::HashSet;

use rand::Rng;
use shared::kv::hash::BlockHash;

/// Exercise 5.1 — how many of a prompt's blocks (its chained `hashes`, in
/// order) a worker holding `cached` can reuse. Chained hashes mean only a
/// run from the first block counts: a later block whose predecessor is
/// missing cannot be used.
pub fn cached_prefix_blocks(hashes: &[BlockHash], cached: &HashSet<BlockHash>) -> usize {
    let _ = (hashes, cached);
    todo!("exercise 5.1: count leading hashes present in `cached`")
}

/// Exercise 5.2 — Dynamo's KV-aware choice. Worker `i` has `cached[i]` of
/// the request's `request_blocks` blocks and `active_blocks[i]` blocks of
/// work in flight; its cost is `weight × (request_blocks − cached[i]) +
/// active_blocks[i]`. Return the index of the cheapest worker (ties: the
/// lower index).
pub fn kv_aware_choice(
    request_blocks: usize,
    cached: &[usize],
    active_blocks: &[usize],
    weight: f64,
) -> usize {
    let _ = (request_blocks, cached, active_blocks, weight);
    todo!("exercise 5.2: the index of the lowest cost")
}

/// Exercise 5.3 — "power of two choices": draw two *different* workers at
/// random with `rng` and keep the one with fewer `active_blocks` (ties: the
/// lower index). With one worker, return 0. Nearly as balanced as
/// least-loaded, without looking at every worker.
pub fn power_of_two_choices(active_blocks: &[usize], rng: &mut impl Rng) -> usize {
    let _ = (active_blocks, rng);
    todo!("exercise 5.3: two distinct random indices, the less loaded wins")
}
