//! Checks for chapter 2's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module02_kvcache --test exercises -- --include-ignored`.

use module02_kvcache::exercises::*;
use module02_kvcache::formats::KvFormat;
use module02_kvcache::scaling::{ModelKv, ScalingReport};
use shared::model::config::LlamaConfig;

#[test]
#[ignore = "exercise 2.1: write kv_bytes_per_token in src/exercises.rs"]
fn exercise_2_1_bytes_per_token() {
    // SmolLM2 in f32: 30 layers · 2 · 3 KV heads · 64 · 4 bytes.
    let smol = LlamaConfig::preset("smollm2").unwrap();
    assert_eq!(kv_bytes_per_token(&smol, 4), 46_080);
    // Every preset, against the chapter's own table.
    for name in LlamaConfig::PRESET_NAMES {
        let config = LlamaConfig::preset(name).unwrap();
        let table = ModelKv::new(name, &config).bytes_per_token(KvFormat::Bf16);
        assert_eq!(kv_bytes_per_token(&config, 2) as f64, table, "{name}");
    }
}

#[test]
#[ignore = "exercise 2.2: write sequences_that_fit in src/exercises.rs"]
fn exercise_2_2_sequences_per_gpu() {
    let report = ScalingReport::presets(80.0);
    for model in &report.models {
        for &seq_len in &report.seq_lens {
            let want = report
                .concurrent_sequences(model, KvFormat::Bf16, seq_len)
                .unwrap_or(0);
            let got = sequences_that_fit(
                80.0 * (1u64 << 30) as f64,
                report.utilization,
                model.weight_bytes_bf16,
                model.bytes_per_token(KvFormat::Bf16),
                seq_len,
            );
            assert_eq!(got, want, "{} at {seq_len} tokens", model.model);
        }
    }
}

#[test]
#[ignore = "exercise 2.3: write break_even_tokens in src/exercises.rs"]
fn exercise_2_3_break_even() {
    // 128 KiB per token over 100 Gbit/s RDMA against 10k tokens/s of prefill:
    // 10.5 µs of transfer per token vs 100 µs of compute; 5 µs latency.
    assert_eq!(
        break_even_tokens(5e-6, 131_072.0, 12.5e9, 10_000.0),
        Some(1)
    );
    // Over 1 Gbit/s the transfer (1.05 ms/token) never catches up.
    assert_eq!(break_even_tokens(50e-6, 131_072.0, 125e6, 10_000.0), None);
    // A long latency (1.01 ms) and 50 µs saved per token: 20.2 → 21 tokens.
    assert_eq!(
        break_even_tokens(1.01e-3, 50_000.0, 1e9, 10_000.0),
        Some(21)
    );
}
