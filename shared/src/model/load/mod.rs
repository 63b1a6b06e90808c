//! Getting a model from disk into named tensors.
//!
//! Two on-disk layouts are supported, and both end in the same place — a
//! [`ModelFiles`]: a [`LlamaConfig`], tensors under Hugging Face names, and a
//! [`Tokenizer`](crate::model::tokenizer::Tokenizer):
//!
//! * **GGUF** (`*.gguf`, llama.cpp's single file): hyper-parameters, weights
//!   (often quantised) and the tokenizer all in one file — see [`gguf`] and
//!   [`from_gguf`].
//! * **A Hugging Face directory**: `config.json`, one or more
//!   `*.safetensors` shards and `tokenizer.json` — see [`hf_dir`].
//!
//! [`export`] writes any loaded model back out as a Hugging Face directory,
//! which is how the GGUF model is checked against the `transformers` reference.

pub mod export;
pub mod from_gguf;
pub mod gguf;
pub mod hf_dir;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::config::LlamaConfig;
use super::tokenizer::Tokenizer;

/// Why a model could not be loaded. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid model file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path} has no tensor named {name}; is this a Llama-architecture model?")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, but the config asks for {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error(
        "{path} holds a {architecture:?} model; only the Llama architecture \
         (Llama 2/3, TinyLlama, SmolLM, Mistral-style) is supported"
    )]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: bad model configuration: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: cannot build the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Torch {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Tensors keyed by their Hugging Face name
/// (`model.layers.0.self_attn.q_proj.weight`, …), on the CPU.
pub type NamedTensors = BTreeMap<String, Tensor>;

/// Everything needed to build a [`Llama`](crate::model::llama::Llama) and talk to it.
pub struct ModelFiles {
    /// The file or directory the model came from (for messages and fingerprints).
    pub source: PathBuf,
    pub config: LlamaConfig,
    pub tensors: NamedTensors,
    pub tokenizer: Tokenizer,
}

/// Loads a model from a `.gguf` file or a Hugging Face directory.
pub fn load(path: &Path) -> Result<ModelFiles, LoadError> {
    check_path(path)?;
    if path.is_dir() {
        hf_dir::load(path)
    } else {
        from_gguf::load(path)
    }
}

/// A model's configuration and tokenizer, without its weights: what an HTTP
/// frontend needs to count tokens and apply the chat template.
pub fn load_metadata(path: &Path) -> Result<(LlamaConfig, Tokenizer), LoadError> {
    check_path(path)?;
    if path.is_dir() {
        hf_dir::load_metadata(path)
    } else {
        from_gguf::load_metadata(path)
    }
}

/// A directory, or a file ending in `.gguf`.
fn check_path(path: &Path) -> Result<(), LoadError> {
    let gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if path.is_dir() || (gguf && path.exists()) {
        Ok(())
    } else if !path.exists() {
        Err(LoadError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    } else {
        Err(LoadError::Format {
            path: path.to_path_buf(),
            message: "expected a .gguf file or a directory with config.json, \
                      *.safetensors and tokenizer.json"
                .into(),
        })
    }
}

/// The tensor names of one decoder layer, in Hugging Face's scheme.
pub fn layer_tensor_names(layer: usize) -> [String; 9] {
    let p = format!("model.layers.{layer}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

/// Every tensor a Llama model of this config needs, with its expected shape.
pub fn expected_shapes(config: &LlamaConfig) -> Vec<(String, Vec<i64>)> {
    let h = config.hidden_size as i64;
    let kv = (config.num_kv_heads() * config.head_dim()) as i64;
    let i = config.intermediate_size as i64;
    let v = config.vocab_size as i64;
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for layer in 0..config.num_hidden_layers {
        let [n_in, q, k, vp, o, n_post, gate, up, down] = layer_tensor_names(layer);
        shapes.extend([
            (n_in, vec![h]),
            (q, vec![h, h]),
            (k, vec![kv, h]),
            (vp, vec![kv, h]),
            (o, vec![h, h]),
            (n_post, vec![h]),
            (gate, vec![i, h]),
            (up, vec![i, h]),
            (down, vec![h, i]),
        ]);
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    shapes
}

/// Checks that every tensor the config implies is present with the right shape.
pub fn check_tensors(
    path: &Path,
    config: &LlamaConfig,
    tensors: &NamedTensors,
) -> Result<(), LoadError> {
    for (name, expected) in expected_shapes(config) {
        let tensor = tensors.get(&name).ok_or_else(|| LoadError::MissingTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        })?;
        let found = tensor.size();
        if found != expected {
            return Err(LoadError::Shape {
                path: path.to_path_buf(),
                name,
                expected,
                found,
            });
        }
    }
    Ok(())
}
