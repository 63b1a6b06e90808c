//! What the KV cache holds, read out of the engine's own blocks.
//!
//! For every layer the engine keeps, per token, one key and one value vector
//! per KV head. Here a real prompt goes through [`Engine::prefill`], and the
//! cache it hands back — gathered from the paged pool's blocks, the very
//! tensor a prefill worker ships to a decode worker — is taken apart:
//! shapes, dtype, bytes, and how those bytes compare with the formula of
//! [`crate::scaling`] and with full multi-head attention.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::device;
use shared::engine::request::Request;
use shared::engine::sampling::SamplingParams;
use shared::engine::{Engine, EngineConfig, EngineError};
use shared::model::llama::{DenseKvCache, Llama};
use tch::{Kind, Tensor};

/// A prompt long enough to fill several blocks, short enough for a laptop.
pub const DEFAULT_PROMPT: &str = "A large language model answers one token at a time. \
To choose each token it attends over every token before it, so an engine keeps the keys and \
values of earlier tokens instead of recomputing them: the KV cache. The cache belongs to one \
conversation, grows with every token, and is expensive to rebuild. In disaggregated serving \
one machine computes it from the prompt and another continues the conversation, so the cache \
has to travel between them, and its size decides what that costs.";

/// Magnitudes in one layer: keys usually have a few large channels, values
/// do not — which matters when they are quantized ([`crate::compress`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    pub k_abs_max: f64,
    pub v_abs_max: f64,
    pub k_rms: f64,
    pub v_rms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anatomy {
    pub device: String,
    pub dtype: String,
    pub prompt_tokens: usize,
    pub layers: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// One layer's K as stored for attention: `[kv_heads, tokens, head_dim]`.
    pub k_shape: Vec<i64>,
    pub v_shape: Vec<i64>,
    /// Measured: bytes of the tensors the engine returned.
    pub measured_bytes: usize,
    /// `LlamaConfig::kv_bytes_per_token × tokens`.
    pub formula_bytes: usize,
    pub bytes_per_token_per_layer: usize,
    pub block_size: usize,
    pub blocks: usize,
    /// What full multi-head attention would store for the same prompt.
    pub mha_bytes: usize,
    /// Largest difference between the paged cache and a dense forward pass
    /// over the same prompt (0 when the pool stores exactly what attention saw).
    pub dense_max_abs_diff: f64,
    pub per_layer: Vec<LayerStats>,
    pub prefill_seconds: f64,
}

/// Runs `prompt` through a fresh engine over `model` and dissects the cache.
pub fn inspect(model: Llama, prompt: &[u32]) -> Result<(Anatomy, Llama), EngineError> {
    let config = model.config().clone();
    let (device, kind) = (model.device(), model.kind());
    let block_size = EngineConfig::with_kv_budget(&model, 0).block_size;
    let blocks = prompt.len().div_ceil(block_size);
    let engine_config = EngineConfig {
        num_blocks: blocks + 2,
        ..EngineConfig::with_kv_budget(&model, 0)
    };
    let mut engine = Engine::new(model, engine_config, config.eos_ids())?;
    let start = Instant::now();
    let out = engine.prefill(Request::new(
        0,
        prompt.to_vec(),
        SamplingParams::fixed_length(1),
    ))?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let kv = out.kv; // [layers, 2, tokens, kv_heads, head_dim]

    let element = kind.elt_size_in_bytes();
    let layer_k = |l: usize| kv.get(l as i64).get(0).permute([1, 0, 2]);
    let layer_v = |l: usize| kv.get(l as i64).get(1).permute([1, 0, 2]);
    let measured_bytes: usize = (0..config.num_hidden_layers)
        .map(|l| (layer_k(l).numel() + layer_v(l).numel()) * element)
        .sum();
    let stats = |t: &Tensor| {
        let t = t.to_kind(Kind::Float);
        (
            t.abs().max().double_value(&[]),
            t.square().mean(Kind::Float).sqrt().double_value(&[]),
        )
    };
    let per_layer = (0..config.num_hidden_layers)
        .map(|l| {
            let (k_abs_max, k_rms) = stats(&layer_k(l));
            let (v_abs_max, v_rms) = stats(&layer_v(l));
            LayerStats {
                layer: l,
                k_abs_max,
                v_abs_max,
                k_rms,
                v_rms,
            }
        })
        .collect();

    // The same prompt through a plain dense cache: the pool must hold the same numbers.
    let model = engine.into_model();
    let mut dense = DenseKvCache::new(config.num_hidden_layers);
    let tokens = model.token_tensor(prompt);
    let _ = model.forward(
        &tokens,
        &model.positions(0, prompt.len() as i64),
        &mut dense,
    );
    let dense_max_abs_diff = (0..config.num_hidden_layers)
        .map(|l| {
            let (k, v) = dense.layer(l).expect("every layer cached");
            let dk = (k.get(0) - layer_k(l)).abs().max().double_value(&[]);
            let dv = (v.get(0) - layer_v(l)).abs().max().double_value(&[]);
            dk.max(dv)
        })
        .fold(0.0, f64::max);

    let anatomy = Anatomy {
        device: device::device_name(device),
        dtype: device::kind_name(kind).to_string(),
        prompt_tokens: prompt.len(),
        layers: config.num_hidden_layers,
        attention_heads: config.num_attention_heads,
        kv_heads: config.num_kv_heads(),
        head_dim: config.head_dim(),
        k_shape: layer_k(0).size(),
        v_shape: layer_v(0).size(),
        measured_bytes,
        formula_bytes: config.kv_bytes_per_token(element) * prompt.len(),
        bytes_per_token_per_layer: 2 * config.num_kv_heads() * config.head_dim() * element,
        block_size,
        blocks,
        mha_bytes: 2
            * config.num_hidden_layers
            * config.num_attention_heads
            * config.head_dim()
            * element
            * prompt.len(),
        dense_max_abs_diff,
        per_layer,
        prefill_seconds,
    };
    Ok((anatomy, model))
}

impl Anatomy {
    /// The report. `redact` hides timings and floating-point statistics,
    /// for snapshots that must not depend on the machine.
    pub fn render(&self, redact: bool) -> String {
        let mut out = String::new();
        let kib = |b: usize| format!("{:.1} KiB", b as f64 / 1024.0);
        let mib = |b: usize| format!("{:.2} MiB", b as f64 / (1 << 20) as f64);
        out.push_str(&format!(
            "prompt: {} tokens on {} ({}), {} layers, {} query heads, {} KV heads, head dim {}\n",
            self.prompt_tokens,
            self.device,
            self.dtype,
            self.layers,
            self.attention_heads,
            self.kv_heads,
            self.head_dim
        ));
        out.push_str(&format!(
            "each layer holds K {:?} and V {:?} ([kv_heads, tokens, head_dim]) in {}\n",
            self.k_shape, self.v_shape, self.dtype
        ));
        let per_token = self.bytes_per_token_per_layer * self.layers;
        out.push_str(&format!(
            "bytes per token: {} B per layer (K {} + V {}), {} for all {} layers\n",
            self.bytes_per_token_per_layer,
            self.bytes_per_token_per_layer / 2,
            self.bytes_per_token_per_layer / 2,
            kib(per_token),
            self.layers
        ));
        let agree = if self.measured_bytes == self.formula_bytes {
            "agree"
        } else {
            "DISAGREE"
        };
        out.push_str(&format!(
            "this prompt: {} measured, {} from the formula ({agree})\n",
            mib(self.measured_bytes),
            mib(self.formula_bytes)
        ));
        let slots = self.blocks * self.block_size;
        out.push_str(&format!(
            "paged: {} blocks of {} tokens = {} slots, {} unused in the last block ({:.1}% of the allocation)\n",
            self.blocks,
            self.block_size,
            slots,
            slots - self.prompt_tokens,
            100.0 * (slots - self.prompt_tokens) as f64 / slots as f64
        ));
        out.push_str(&format!(
            "GQA: {} query heads share {} KV heads, so the cache is {}x smaller than MHA's {}\n",
            self.attention_heads,
            self.kv_heads,
            self.attention_heads / self.kv_heads,
            mib(self.mha_bytes)
        ));
        if redact {
            out.push_str("paged cache vs dense forward pass: max |diff| [redacted]\n");
            return out;
        }
        out.push_str(&format!(
            "paged cache vs dense forward pass: max |diff| {:.1e}\nprefill took {:.3} s\n",
            self.dense_max_abs_diff, self.prefill_seconds
        ));
        out.push_str("\nlayer  |K| max   |V| max    K rms    V rms\n");
        for s in &self.per_layer {
            out.push_str(&format!(
                "{:>5} {:>8.2} {:>9.2} {:>8.3} {:>8.3}\n",
                s.layer, s.k_abs_max, s.v_abs_max, s.k_rms, s.v_rms
            ));
        }
        out
    }
}
