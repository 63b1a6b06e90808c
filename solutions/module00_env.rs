//! Reference solutions to module 0's exercises (`src/exercises.rs`).

pub fn gbit_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 * 8.0 / seconds / 1e9
}

pub fn matmul_tflops(n: usize, iterations: usize, seconds: f64) -> f64 {
    2.0 * (n as f64).powi(3) * iterations as f64 / seconds / 1e12
}

pub fn nearest_rank(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}
