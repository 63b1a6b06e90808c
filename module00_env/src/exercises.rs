//! Lab exercises for module 0 (book chapter 0). Each function is yours to
//! write; `tests/exercises.rs` checks it:
//!
//! ```console
//! cargo test -p module00_env --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module00_env.rs`, compiled in place of
//! this file with `--features solutions` (CI checks them that way).

/// Exercise 0.1 — link throughput in Gbit/s (10⁹ bits per second, as NICs
/// are rated) from `bytes` moved in `seconds`.
pub fn gbit_per_s(bytes: u64, seconds: f64) -> f64 {
    let _ = (bytes, seconds);
    todo!("exercise 0.1: bits over seconds, in Gbit/s")
}

/// Exercise 0.2 — the compute rate of `iterations` multiplications of two
/// `n × n` matrices in `seconds`, in TFLOP/s (a multiply-add is two
/// floating-point operations).
pub fn matmul_tflops(n: usize, iterations: usize, seconds: f64) -> f64 {
    let _ = (n, iterations, seconds);
    todo!("exercise 0.2: 2·n³ per multiplication")
}

/// Exercise 0.3 — the nearest-rank percentile (`q` in 0..=1) of `samples`:
/// the smallest sample with at least a fraction `q` of all samples at or
/// below it. `None` when there are no samples.
pub fn nearest_rank(samples: &[f64], q: f64) -> Option<f64> {
    let _ = (samples, q);
    todo!("exercise 0.3: sort, then rank ⌈q·n⌉")
}
