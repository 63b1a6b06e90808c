//! Checks for chapter 1's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module01_baseline --test exercises -- --include-ignored`.

use module01_baseline::exercises::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::engine::sampling::argmax_batch;
use shared::model::config::LlamaConfig;
use tch::Tensor;

#[test]
#[ignore = "exercise 1.1: write decode_floor_ms in src/exercises.rs"]
fn exercise_1_1_decode_floor() {
    // TinyLlama-1.1B in bf16 on an H100 (3.35 TB/s): the 0.66 ms of the issue.
    let tiny = LlamaConfig::preset("tinyllama").unwrap();
    let floor = decode_floor_ms(2.0 * tiny.num_parameters() as f64, 3.35e12);
    assert!((floor - 0.657).abs() < 0.01, "{floor}");
    assert_eq!(decode_floor_ms(1e9, 1e12), 1.0);
}

#[test]
#[ignore = "exercise 1.2: write greedy_token in src/exercises.rs"]
fn exercise_1_2_greedy_token() {
    assert_eq!(greedy_token(&[0.1, 3.0, 3.0, -1.0]), 1);
    // The engine's own arg-max, on random logits.
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..50 {
        let logits: Vec<f32> = (0..1000).map(|_| rng.random_range(-10.0..10.0)).collect();
        let want = argmax_batch(&Tensor::from_slice(&logits).reshape([1, -1]))[0];
        assert_eq!(greedy_token(&logits), want);
    }
}

#[test]
#[ignore = "exercise 1.3: write nucleus_size in src/exercises.rs"]
fn exercise_1_3_nucleus_size() {
    let probs = [0.5, 0.25, 0.125, 0.125];
    assert_eq!(nucleus_size(&probs, 0.5), 1);
    assert_eq!(nucleus_size(&probs, 0.6), 2);
    assert_eq!(nucleus_size(&probs, 0.75), 2);
    assert_eq!(nucleus_size(&probs, 0.9), 4);
    assert_eq!(nucleus_size(&probs, 1.0), 4);
    assert_eq!(nucleus_size(&[1.0], 0.01), 1);
}

#[test]
#[ignore = "exercise 1.4: write barrier_cost_and_spread in src/exercises.rs"]
fn exercise_1_4_barrier_cost_and_spread() {
    // Three blocks arrive at 100, 400 and 250 ns; the last one to arrive
    // passes 120 ns later, the others a little after it.
    assert_eq!(
        barrier_cost_and_spread(&[100, 400, 250], &[525, 520, 530]),
        (120, 300)
    );
    assert_eq!(barrier_cost_and_spread(&[], &[]), (0, 0));
    // The H100 run chapter 1 shows: in its drawn layer, barrier 2 (which
    // comes while the ring is full) costs less than barrier 1 (which comes
    // while the weights stream).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../results/h100/module01_timeline_tinyllama-1.1b.json"
    );
    let report: module01_baseline::timeline::TimelineReport =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let barrier = |name: &str| {
        let stage = shared::kernels::timeline::STAGES
            .iter()
            .position(|s| s.name == name)
            .unwrap();
        let (arrived, passed): (Vec<u64>, Vec<u64>) =
            report.drawn_stages_ns.iter().map(|b| b[stage]).unzip();
        barrier_cost_and_spread(&arrived, &passed)
    };
    let (first_cost, _) = barrier("barrier 1");
    let (second_cost, _) = barrier("barrier 2");
    assert!(
        second_cost < first_cost,
        "{second_cost} ns against {first_cost}"
    );
}
