//! Reference solutions to module 5's exercises (`src/exercises.rs`).

use std::collections::HashSet;

use rand::Rng;
use shared::kv::hash::BlockHash;

pub fn cached_prefix_blocks(hashes: &[BlockHash], cached: &HashSet<BlockHash>) -> usize {
    hashes.iter().take_while(|h| cached.contains(h)).count()
}

pub fn kv_aware_choice(
    request_blocks: usize,
    cached: &[usize],
    active_blocks: &[usize],
    weight: f64,
) -> usize {
    let cost = |i: usize| {
        weight * request_blocks.saturating_sub(cached[i]) as f64 + active_blocks[i] as f64
    };
    (0..cached.len())
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)).then(a.cmp(&b)))
        .expect("at least one worker")
}

pub fn power_of_two_choices(active_blocks: &[usize], rng: &mut impl Rng) -> usize {
    let n = active_blocks.len();
    if n == 1 {
        return 0;
    }
    let a = rng.random_range(0..n);
    // A second index, uniformly among the other n − 1.
    let b = (a + 1 + rng.random_range(0..n - 1)) % n;
    let (low, high) = (a.min(b), a.max(b));
    if active_blocks[high] < active_blocks[low] {
        high
    } else {
        low
    }
}
