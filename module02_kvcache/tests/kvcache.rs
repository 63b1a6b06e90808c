//! Module 2 on the real SmolLM2 model: what is deterministic is snapshotted
//! (shapes, byte counts, preset tables, reconstruction error on a fixed
//! prompt); what the model does with a compressed cache is checked with margins.

use module02_kvcache::anatomy::{self, DEFAULT_PROMPT};
use module02_kvcache::compress::{self, Scheme};
use module02_kvcache::formats::KvFormat;
use module02_kvcache::scaling::{ModelKv, ScalingReport};
use module02_kvcache::transfer;
use shared::engine::request::Request;
use shared::engine::sampling::SamplingParams;
use shared::engine::{Engine, EngineConfig, PrefillOutput};
use shared::kv::block::DEFAULT_BLOCK_SIZE;
use shared::model::config::LlamaConfig;
use shared::model::llama::Llama;
use shared::model::{default_model_path, load_model, LoadedModel};
use tch::{Device, Kind};

fn smollm2() -> LoadedModel {
    let path = default_model_path()
        .expect("SPARK_DISAGG_MODEL is not set: run scripts/setup.sh, then the tests again");
    load_model(&path, Device::Cpu, Kind::Float).expect("the SmolLM2 GGUF loads")
}

#[test]
fn anatomy_of_the_real_cache_matches_the_formula() {
    let m = smollm2();
    let prompt = m.tokenizer.encode(DEFAULT_PROMPT).unwrap();
    let (a, _) = anatomy::inspect(m.model, &prompt).unwrap();
    assert_eq!(a.k_shape, vec![3, prompt.len() as i64, 64]);
    assert_eq!(a.v_shape, a.k_shape);
    assert_eq!(a.measured_bytes, a.formula_bytes);
    assert_eq!(
        a.mha_bytes,
        3 * a.measured_bytes,
        "9 query heads over 3 KV heads"
    );
    // The pool stores exactly what a dense forward pass computes.
    assert!(a.dense_max_abs_diff < 1e-4, "{}", a.dense_max_abs_diff);
    assert_eq!(a.per_layer.len(), 30);
    insta::assert_snapshot!("anatomy", a.render(true));
}

#[test]
fn scaling_tables_from_presets() {
    insta::assert_snapshot!("scaling", ScalingReport::presets(80.0).render());
}

#[test]
fn transfer_formula_table() {
    let per_token =
        ModelKv::new("llama3-8b", &LlamaConfig::llama3_8b()).bytes_per_token(KvFormat::Bf16);
    insta::assert_snapshot!(
        "transfer_formula",
        transfer::render_formula("llama3-8b (bf16)", per_token, &[512, 2048, 8192, 32768])
    );
}

/// The default prompt through a real engine: its tokens, the cache the
/// engine returned, and the model back (for decoding afterwards).
fn prefill_default_prompt() -> (Vec<u32>, PrefillOutput, Llama) {
    let m = smollm2();
    let prompt = m.tokenizer.encode(DEFAULT_PROMPT).unwrap();
    let eos = m.model.config().eos_ids();
    let config = EngineConfig {
        num_blocks: 16,
        ..EngineConfig::with_kv_budget(&m.model, 0)
    };
    let mut engine = Engine::new(m.model, config, eos).unwrap();
    let out = engine
        .prefill(Request::new(
            1,
            prompt.clone(),
            SamplingParams::fixed_length(1),
        ))
        .unwrap();
    (prompt, out, engine.into_model())
}

#[test]
fn a_real_prefill_cache_crosses_a_socket_unchanged() {
    let (prompt, out, _) = prefill_default_prompt();
    let (measured, received) = transfer::measure_loopback(&out.kv, 1.0, 2).unwrap();
    assert!(received.equal(&out.kv));
    assert_eq!(measured.bytes, 30 * 2 * prompt.len() * 3 * 64 * 4);
}

#[test]
fn compression_trade_off_on_the_real_model() {
    let (_, out, model) = prefill_default_prompt();
    let steps = 16;
    let report = compress::evaluate(
        &model,
        &out.kv,
        out.first_token,
        steps,
        DEFAULT_BLOCK_SIZE as i64,
        &Scheme::ALL,
    );
    insta::assert_snapshot!("compress", report.render(true));

    let get = |s: Scheme| report.results.iter().find(|r| r.scheme == s).unwrap();
    // A bf16 cast and int8 per block barely disturb the model…
    for s in [Scheme::Bf16, Scheme::Int8Block] {
        let r = get(s);
        assert!(r.top1_matches >= steps - 1, "{s:?}: {r:?}");
        assert!(r.k_error < 0.05 && r.v_error < 0.05, "{s:?}: {r:?}");
    }
    // …error grows as bits shrink…
    let (e8, e4, e2) = (
        get(Scheme::Int8Block),
        get(Scheme::Int4Block),
        get(Scheme::Int2Block),
    );
    assert!(e8.k_error < e4.k_error && e4.k_error < e2.k_error);
    assert!(e8.max_logit_diff < e2.max_logit_diff);
    // …and at 2 bits generation breaks.
    assert!(e2.greedy_prefix_matches < steps, "{e2:?}");
    assert!(e2.top1_matches < steps, "{e2:?}");
}
