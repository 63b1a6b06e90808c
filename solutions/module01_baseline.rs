//! Reference solutions to module 1's exercises (`src/exercises.rs`).

pub fn decode_floor_ms(weight_bytes: f64, bandwidth_bytes_per_s: f64) -> f64 {
    weight_bytes / bandwidth_bytes_per_s * 1e3
}

pub fn greedy_token(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn nucleus_size(probs_sorted: &[f32], top_p: f32) -> usize {
    let mut total = 0.0;
    for (i, &p) in probs_sorted.iter().enumerate() {
        total += p;
        if total >= top_p {
            return i + 1;
        }
    }
    probs_sorted.len().max(1)
}

pub fn barrier_cost_and_spread(arrived: &[u64], passed: &[u64]) -> (u64, u64) {
    let cost = arrived
        .iter()
        .zip(passed)
        .map(|(&a, &p)| p.saturating_sub(a))
        .min()
        .unwrap_or(0);
    let spread = match (arrived.iter().max(), arrived.iter().min()) {
        (Some(last), Some(first)) => last - first,
        _ => 0,
    };
    (cost, spread)
}
