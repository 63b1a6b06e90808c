//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The real SmolLM2 GGUF that scripts/setup.sh installs. The tests need it:
/// a missing model is a failed set-up, not a reason to pass.
pub fn smollm2_gguf() -> PathBuf {
    let path = shared::model::default_model_path().expect(
        "SPARK_DISAGG_MODEL is not set: run scripts/setup.sh (it installs the model \
         and configures cargo), then run the tests again",
    );
    assert!(
        path.exists(),
        "{} does not exist: run scripts/setup.sh",
        path.display()
    );
    path
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A two-layer Llama small enough to run many steps in a test: 128 tokens,
/// hidden 32, 4 query heads sharing 2 KV heads.
pub fn tiny_llama_config(max_positions: usize) -> shared::model::config::LlamaConfig {
    shared::model::config::LlamaConfig {
        vocab_size: 128,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: max_positions,
        ..shared::model::config::LlamaConfig::smollm2_135m()
    }
}
