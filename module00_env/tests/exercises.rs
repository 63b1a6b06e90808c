//! Checks for chapter 0's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module00_env --test exercises -- --include-ignored`.

use module00_env::exercises::*;
use module00_env::net::Throughput;

#[test]
#[ignore = "exercise 0.1: write gbit_per_s in src/exercises.rs"]
fn exercise_0_1_gbit_per_s() {
    // 1.25 GB in one second is 10 Gbit/s.
    assert!((gbit_per_s(1_250_000_000, 1.0) - 10.0).abs() < 1e-9);
    // The same as module 0's network check reports.
    for (bytes, seconds) in [(64 << 20, 0.05), (1 << 30, 0.9), (12_345, 1e-4)] {
        let want = Throughput { bytes, seconds }.gbit_per_s();
        assert!((gbit_per_s(bytes, seconds) - want).abs() < 1e-9);
    }
}

#[test]
#[ignore = "exercise 0.2: write matmul_tflops in src/exercises.rs"]
fn exercise_0_2_matmul_tflops() {
    // 4096³ · 2 · 100 in 0.2 s ≈ 68.7 TFLOP/s (a fraction of an H100's bf16 peak).
    let t = matmul_tflops(4096, 100, 0.2);
    assert!((t - 68.72).abs() < 0.01, "{t}");
}

#[test]
#[ignore = "exercise 0.3: write nearest_rank in src/exercises.rs"]
fn exercise_0_3_nearest_rank() {
    let rtts = [5.0, 1.0, 4.0, 2.0, 3.0];
    assert_eq!(nearest_rank(&rtts, 0.5), Some(3.0));
    assert_eq!(nearest_rank(&rtts, 0.99), Some(5.0));
    assert_eq!(nearest_rank(&rtts, 0.0), Some(1.0));
    assert_eq!(nearest_rank(&[], 0.5), None);
    // The same as every report in this project.
    let many: Vec<f64> = (0..1000).map(|i| ((i * 7919) % 1000) as f64).collect();
    for q in [0.5, 0.9, 0.99] {
        assert_eq!(
            nearest_rank(&many, q),
            Some(shared::stats::percentile(&many, q))
        );
    }
}
