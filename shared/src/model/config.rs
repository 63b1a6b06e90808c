//! The shape of a Llama-family model.
//!
//! Every number the rest of the project computes — weight bytes, KV-cache
//! bytes per token, how many sequences fit on a GPU — follows from this one
//! struct. It reads Hugging Face `config.json` directly (the field names are
//! the same), is filled from GGUF metadata by the GGUF loader, and has presets
//! for the models the course talks about.

use serde::{Deserialize, Serialize};

/// Hyper-parameters of a Llama-architecture decoder.
///
/// Field names follow Hugging Face's `LlamaConfig` so that `config.json`
/// deserialises straight into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: several query heads share one K/V head.
    /// Equal to `num_attention_heads` for plain multi-head attention.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Llama 3.1+ stretch RoPE's long wavelengths; `None` means plain RoPE.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Small models reuse the embedding matrix as the output projection.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<EosTokens>,
}

/// `eos_token_id` is a single id in older configs and a list in newer ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokens {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokens {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            EosTokens::One(id) => vec![*id],
            EosTokens::Many(ids) => ids.clone(),
        }
    }
}

/// The `rope_scaling` block of Llama 3.1-style configs (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default = "default_low_freq")]
    pub low_freq_factor: f64,
    #[serde(default = "default_high_freq")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: usize,
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}
fn default_low_freq() -> f64 {
    1.0
}
fn default_high_freq() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads that share each K/V head (1 for multi-head attention).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_kv_heads()
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(EosTokens::ids)
            .unwrap_or_default()
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * self.layer_parameters() + embed + head + h
    }

    /// Parameters of one decoder layer: its attention and MLP projections
    /// and its two norms. A decode step at batch 1 reads all of them once
    /// per layer, so their bytes are what a layer's time is measured against.
    pub fn layer_parameters(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads() * self.head_dim();
        let attn = h * h /* q */ + 2 * h * kv /* k, v */ + h * h /* o */;
        let mlp = 3 * h * self.intermediate_size;
        let norms = 2 * h;
        attn + mlp + norms
    }

    /// Bytes of K and V that one token occupies across all layers.
    pub fn kv_bytes_per_token(&self, bytes_per_element: usize) -> usize {
        2 * self.num_hidden_layers * self.num_kv_heads() * self.head_dim() * bytes_per_element
    }

    /// Checks the relations the model code relies on, so that a bad
    /// `config.json` fails at load time with a sentence instead of a shape
    /// error deep inside a matmul.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// SmolLM2-135M(-Instruct): the model the course runs on a laptop.
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: Some(3),
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(EosTokens::One(2)),
        }
    }

    /// TinyLlama-1.1B: the shape used for GPU speed runs.
    pub fn tinyllama_1_1b() -> Self {
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 22,
            num_attention_heads: 32,
            num_key_value_heads: Some(4),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(EosTokens::One(2)),
        }
    }

    /// Llama-3-8B: the smallest "real" serving model.
    pub fn llama3_8b() -> Self {
        LlamaConfig {
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            bos_token_id: Some(128_000),
            eos_token_id: Some(EosTokens::Many(vec![128_001, 128_009])),
        }
    }

    /// Llama-3-70B: the model whose KV cache makes disaggregation necessary.
    pub fn llama3_70b() -> Self {
        LlamaConfig {
            hidden_size: 8192,
            intermediate_size: 28_672,
            num_hidden_layers: 80,
            num_attention_heads: 64,
            ..Self::llama3_8b()
        }
    }

    /// Looks a preset up by the names the CLIs accept.
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "smollm2-135m" | "smollm2" => Some(Self::smollm2_135m()),
            "tinyllama-1.1b" | "tinyllama" => Some(Self::tinyllama_1_1b()),
            "llama3-8b" | "llama-3-8b" => Some(Self::llama3_8b()),
            "llama3-70b" | "llama-3-70b" => Some(Self::llama3_70b()),
            _ => None,
        }
    }

    pub const PRESET_NAMES: [&'static str; 4] =
        ["smollm2-135m", "tinyllama-1.1b", "llama3-8b", "llama3-70b"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_published_sizes() {
        // Published sizes: 135M, 1.1B, 8.0B, 70.6B.
        let approx = |c: LlamaConfig| c.num_parameters() as f64 / 1e9;
        assert!((approx(LlamaConfig::smollm2_135m()) - 0.1346).abs() < 0.001);
        assert!((approx(LlamaConfig::tinyllama_1_1b()) - 1.100).abs() < 0.01);
        assert!((approx(LlamaConfig::llama3_8b()) - 8.03).abs() < 0.01);
        assert!((approx(LlamaConfig::llama3_70b()) - 70.55).abs() < 0.1);
    }

    #[test]
    fn reads_hugging_face_config_json() {
        let json = r#"{
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-05, "max_position_embeddings": 2048,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16"
        }"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config, LlamaConfig::tinyllama_1_1b());
        assert_eq!(config.gqa_group(), 8);
    }

    #[test]
    fn eos_may_be_a_list() {
        let json = r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [5, 7]}"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.eos_ids(), vec![5, 7]);
        assert_eq!(config.num_kv_heads(), 2);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut config = LlamaConfig::smollm2_135m();
        config.num_key_value_heads = Some(4);
        let err = config.validate().unwrap_err();
        assert!(err.contains("num_key_value_heads 4"), "{err}");
    }
}
