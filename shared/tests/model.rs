//! The transformer and its KV cache on small random models: the cache must
//! not change the answer, whichever way the tokens arrive.

mod common;

use shared::model::config::LlamaConfig;
use shared::model::llama::{DenseKvCache, Llama};
use tch::{Device, Kind, Tensor};

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 64,
        ..LlamaConfig::smollm2_135m()
    }
}

fn logits_of(model: &Llama, cache: &mut DenseKvCache, tokens: &[u32], start: i64) -> Vec<f32> {
    let hidden = model.forward(
        &model.token_tensor(tokens),
        &model.positions(start, tokens.len() as i64),
        cache,
    );
    Vec::try_from(model.logits(&hidden).reshape([-1])).unwrap()
}

const TOKENS: [u32; 10] = [5, 17, 3, 42, 8, 8, 63, 0, 21, 9];

#[test]
fn incremental_decoding_equals_one_full_pass() {
    let model = Llama::random(tiny_config(), 1, Device::Cpu, Kind::Float);
    let full = logits_of(&model, &mut DenseKvCache::new(2), &TOKENS, 0);

    // 4 tokens of prefill, a chunk of 3 with a past (explicit causal mask), then 3 single steps.
    let mut cache = DenseKvCache::new(2);
    let mut pieces = logits_of(&model, &mut cache, &TOKENS[..4], 0);
    pieces.extend(logits_of(&model, &mut cache, &TOKENS[4..7], 4));
    for (i, &t) in TOKENS[7..].iter().enumerate() {
        pieces.extend(logits_of(&model, &mut cache, &[t], 7 + i as i64));
    }
    assert_eq!(cache.len(), TOKENS.len() as i64);
    let diff = common::max_abs_diff(&full, &pieces);
    assert!(diff < 1e-5, "cached and uncached logits differ by {diff}");
}

#[test]
fn a_batch_equals_its_sequences_alone() {
    let model = Llama::random(tiny_config(), 2, Device::Cpu, Kind::Float);
    let a = &TOKENS[..5];
    let b = &TOKENS[5..];
    let alone: Vec<f32> = [a, b]
        .iter()
        .flat_map(|s| logits_of(&model, &mut DenseKvCache::new(2), s, 0))
        .collect();

    let batch: Vec<i64> = a.iter().chain(b).map(|&t| t as i64).collect();
    let tokens = Tensor::from_slice(&batch).reshape([2, 5]);
    let positions = Tensor::arange(5, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .repeat([2, 1]);
    let hidden = model.forward(&tokens, &positions, &mut DenseKvCache::new(2));
    let batched: Vec<f32> = Vec::try_from(model.logits(&hidden).reshape([-1])).unwrap();
    assert!(common::max_abs_diff(&alone, &batched) < 1e-5);
}

#[test]
fn random_weights_are_reproducible_from_the_seed() {
    let run = |seed| {
        let model = Llama::random(tiny_config(), seed, Device::Cpu, Kind::Float);
        logits_of(&model, &mut DenseKvCache::new(2), &TOKENS, 0)
    };
    assert_eq!(run(7), run(7));
    assert!(common::max_abs_diff(&run(7), &run(8)) > 1e-3);
}

#[test]
fn weight_bytes_count_every_matrix_once() {
    let config = tiny_config();
    let model = Llama::random(config.clone(), 3, Device::Cpu, Kind::BFloat16);
    // Tied embeddings: the head is read each step, the input embedding is a lookup.
    assert_eq!(model.weight_bytes_per_step(), config.num_parameters() * 2);
    assert_eq!(model.kind(), Kind::BFloat16);
}
