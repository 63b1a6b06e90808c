//! Reference solutions to module 6's exercises (`src/exercises.rs`).

pub fn stop_position(text: &str, stops: &[&str]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s)).min()
}

pub fn goodput(samples: &[(f64, f64)], slo_ttft_s: f64, slo_itl_s: f64, duration_s: f64) -> f64 {
    let good = samples
        .iter()
        .filter(|&&(ttft, itl)| ttft <= slo_ttft_s && itl <= slo_itl_s)
        .count();
    good as f64 / duration_s
}

pub fn prefill_remotely(
    uncached_tokens: usize,
    local_tokens_per_s: f64,
    remote_tokens_per_s: f64,
    remote_queue_s: f64,
    kv_bytes_per_token: f64,
    link_bytes_per_s: f64,
) -> bool {
    let n = uncached_tokens as f64;
    let local = n / local_tokens_per_s;
    let remote =
        remote_queue_s + n / remote_tokens_per_s + n * kv_bytes_per_token / link_bytes_per_s;
    remote < local
}
