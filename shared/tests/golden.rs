//! The real model against Hugging Face transformers.
//!
//! The fixture was produced by `scripts/golden_logits.py` (transformers, f32,
//! CPU), which itself checked our converted weights against transformers'
//! own GGUF loader. Here the Rust model must reproduce its logits to 1e-3
//! and its 16 greedy tokens exactly — through both loaders.

mod common;

use approx::abs_diff_eq;
use serde_json::Value;
use shared::engine::generate::generate;
use shared::engine::sampling::SamplingParams;
use shared::model::llama::{DenseKvCache, Llama};
use shared::model::load::{self, export};
use shared::model::tokenizer::ChatMessage;
use tch::{Device, Kind, Tensor};

struct Golden {
    json: Value,
    logits: Tensor,
}

fn golden() -> Golden {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("smollm2_golden.json")).unwrap(),
    )
    .unwrap();
    let tensors = Tensor::read_safetensors(common::fixture("smollm2_golden.safetensors")).unwrap();
    let logits = tensors.into_iter().find(|(n, _)| n == "logits").unwrap().1;
    Golden { json, logits }
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn prompt_logits(model: &Llama, prompt: &[u32]) -> Tensor {
    let mut cache = DenseKvCache::new(model.config().num_hidden_layers);
    let hidden = model.forward(
        &model.token_tensor(prompt),
        &model.positions(0, prompt.len() as i64),
        &mut cache,
    );
    model.logits(&hidden).squeeze_dim(0)
}

/// Checks logits and greedy tokens of a model against the fixture.
fn assert_matches_golden(
    model: &Llama,
    tokenizer: &shared::model::tokenizer::Tokenizer,
    golden: &Golden,
) {
    let prompt = tokenizer
        .encode(golden.json["prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(prompt, ids(&golden.json["prompt_ids"]), "prompt token ids");

    let ours: Vec<f32> = Vec::try_from(prompt_logits(model, &prompt).reshape([-1])).unwrap();
    let theirs: Vec<f32> = Vec::try_from(golden.logits.reshape([-1])).unwrap();
    let diff = common::max_abs_diff(&ours, &theirs);
    assert!(
        abs_diff_eq!(ours.as_slice(), theirs.as_slice(), epsilon = 1e-3),
        "max |logit difference| {diff} exceeds 1e-3"
    );

    let expected = ids(&golden.json["greedy_tokens"]);
    let params = SamplingParams::fixed_length(expected.len());
    let generation = generate(model, &prompt, &tokenizer.eos_ids(), &params, |_| {}).unwrap();
    assert_eq!(generation.tokens, expected, "greedy tokens");
}

#[test]
fn gguf_and_converted_hf_directory_match_transformers() {
    let golden = golden();
    let files = load::load(&common::smollm2_gguf()).unwrap();

    // Write the HF directory before the tensors move into the model.
    let dir = tempfile::tempdir().unwrap();
    export::write_hf_dir(&files, dir.path(), Kind::Float).unwrap();

    let tokenizer = files.tokenizer.clone();
    let model = Llama::new(files.config, files.tensors, Device::Cpu, Kind::Float).unwrap();
    assert_matches_golden(&model, &tokenizer, &golden);
    drop(model);

    let loaded = shared::model::load_model(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_matches_golden(&loaded.model, &loaded.tokenizer, &golden);
    assert_eq!(loaded.tokenizer.eos_ids(), tokenizer.eos_ids());
    assert_eq!(loaded.tokenizer.chat_template(), tokenizer.chat_template());
}

#[test]
fn paris() {
    let loaded =
        shared::model::load_model(&common::smollm2_gguf(), Device::Cpu, Kind::Float).unwrap();
    let prompt = loaded.tokenizer.encode("The capital of France is").unwrap();
    let out = generate(
        &loaded.model,
        &prompt,
        &loaded.tokenizer.eos_ids(),
        &SamplingParams::greedy(16),
        |_| {},
    )
    .unwrap();
    let text = loaded.tokenizer.decode(&out.tokens).unwrap();
    assert!(text.contains("Paris"), "completion was {text:?}");
}

#[test]
fn tokenizer_matches_transformers_and_round_trips() {
    let golden = golden();
    let files = load::load(&common::smollm2_gguf()).unwrap();
    let tokenizer = &files.tokenizer;
    for case in golden.json["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids_ours = tokenizer.encode(text).unwrap();
        assert_eq!(ids_ours, ids(&case["ids"]), "ids for {text:?}");
        // Special tokens are dropped by decode; everything else comes back exactly.
        if !text.contains("<|") {
            assert_eq!(tokenizer.decode(&ids_ours).unwrap(), text);
        }
    }
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tokenizer.eos_ids(), vec![2]);

    let messages: Vec<ChatMessage> =
        serde_json::from_value(golden.json["chat_messages"].clone()).unwrap();
    assert_eq!(
        tokenizer.apply_chat_template(&messages).unwrap(),
        golden.json["chat_text"].as_str().unwrap()
    );
}

#[test]
fn stream_decoder_reassembles_multibyte_characters() {
    let files = load::load(&common::smollm2_gguf()).unwrap();
    let tokenizer = &files.tokenizer;
    let text = "naïve café – 東京 🚀 done";
    let mut decoder = tokenizer.stream_decoder();
    let mut streamed = String::new();
    for id in tokenizer.encode(text).unwrap() {
        if let Some(piece) = decoder.push(id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "half a character was emitted: {piece:?}"
            );
            streamed.push_str(&piece);
        }
    }
    assert_eq!(streamed, text);
}
