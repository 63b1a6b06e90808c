//! Loading a Hugging Face model directory.
//!
//! ```text
//! TinyLlama-1.1B/
//! ├── config.json                     hyper-parameters (→ LlamaConfig)
//! ├── model.safetensors               weights, or shards listed in
//! │   (model-00001-of-00002.safetensors, model.safetensors.index.json)
//! ├── tokenizer.json                  the `tokenizers` pipeline
//! ├── tokenizer_config.json           chat template, BOS/EOS strings (optional)
//! ├── chat_template.jinja             the chat template, where transformers ≥ 4.50 saves it (optional)
//! └── generation_config.json          extra EOS ids (optional)
//! ```
//!
//! safetensors is a JSON header followed by raw little-endian tensor data,
//! so loading is a memory map plus one copy per tensor into libtorch.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{check_tensors, LoadError, ModelFiles, NamedTensors};
use crate::model::config::LlamaConfig;
use crate::model::tokenizer::Tokenizer;

pub fn load(dir: &Path) -> Result<ModelFiles, LoadError> {
    let config = read_config(dir)?;
    let mut tensors = NamedTensors::new();
    for shard in shard_paths(dir)? {
        read_safetensors(&shard, &mut tensors)?;
    }
    check_tensors(dir, &config, &tensors)?;

    let tokenizer = tokenizer(dir, &config)?;
    Ok(ModelFiles {
        source: dir.to_path_buf(),
        config,
        tensors,
        tokenizer,
    })
}

/// The configuration and tokenizer alone, without reading any weights.
pub fn load_metadata(dir: &Path) -> Result<(LlamaConfig, Tokenizer), LoadError> {
    let config = read_config(dir)?;
    let tokenizer = tokenizer(dir, &config)?;
    Ok((config, tokenizer))
}

fn read_config(dir: &Path) -> Result<LlamaConfig, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(LoadError::Format {
            path: dir.to_path_buf(),
            message: "no config.json: a Hugging Face model directory needs config.json, \
                      *.safetensors and tokenizer.json"
                .into(),
        });
    }
    read_config_file(&config_path)
}

/// The model shape in a Hugging Face `config.json` at `config_path`, alone:
/// what a benchmark with random weights of a shape that is no preset reads.
pub fn read_config_file(config_path: &Path) -> Result<LlamaConfig, LoadError> {
    let config_path = config_path.to_path_buf();
    let raw: Value = read_json(&config_path)?.ok_or_else(|| LoadError::Format {
        path: config_path.clone(),
        message: "the file does not exist".into(),
    })?;
    let model_type = raw
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama");
    if !matches!(model_type, "llama" | "mistral") {
        return Err(LoadError::UnsupportedArchitecture {
            path: config_path,
            architecture: model_type.to_string(),
        });
    }
    let config: LlamaConfig =
        serde_json::from_value(lift_rope_parameters(raw)).map_err(|e| LoadError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
    config.validate().map_err(|message| LoadError::Config {
        path: config_path.clone(),
        message,
    })?;
    Ok(config)
}

/// transformers 5 writes RoPE settings as one `rope_parameters` object
/// (`rope_theta`, and for Llama 3.1-style scaling `rope_type: "llama3"`
/// with its factors) where older versions wrote a top-level `rope_theta`
/// and a `rope_scaling` object. Moves them to where [`LlamaConfig`] reads
/// them, unless the older keys are there too.
fn lift_rope_parameters(mut raw: Value) -> Value {
    let Some(params) = raw.get("rope_parameters").cloned() else {
        return raw;
    };
    let Some(object) = raw.as_object_mut() else {
        return raw;
    };
    if let Some(theta) = params.get("rope_theta") {
        object.entry("rope_theta").or_insert(theta.clone());
    }
    let scaled = params
        .get("rope_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "default");
    if scaled && object.get("rope_scaling").is_none_or(Value::is_null) {
        object.insert("rope_scaling".into(), params);
    }
    raw
}

fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LoadError::Format {
                path: path.to_path_buf(),
                message: format!("invalid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoadError::io(path, e)),
    }
}

/// The weight files: the shards an index names, else `model.safetensors`.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index_path = dir.join("model.safetensors.index.json");
    if let Some(index) = read_json(&index_path)? {
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| LoadError::Format {
                path: index_path.clone(),
                message: "no weight_map object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(LoadError::Format {
        path: dir.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

fn read_safetensors(path: &Path, tensors: &mut NamedTensors) -> Result<(), LoadError> {
    let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: read-only private map; see GgufFile::open.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| LoadError::Format {
        path: path.to_path_buf(),
        message: format!("invalid safetensors file: {e}"),
    })?;
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
            other => {
                return Err(LoadError::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor {name} has dtype {other:?}; expected F32, BF16 or F16"
                    ),
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|source| {
            LoadError::Torch {
                path: path.to_path_buf(),
                source,
            }
        })?;
        tensors.insert(name, tensor);
    }
    Ok(())
}

fn tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer, LoadError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(LoadError::Tokenizer {
            path,
            message: "file not found (every Hugging Face model ships one)".into(),
        });
    }
    let inner = Tokenizer::from_file(&path).map_err(|e| LoadError::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    })?;

    // tokenizer_config.json names special tokens as strings and carries the chat template.
    let tk_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let special = |key: &str| -> Option<u32> {
        let value = tk_config.get(key)?;
        let text = value
            .as_str()
            .or_else(|| value.get("content").and_then(Value::as_str))?;
        inner.token_to_id(text)
    };
    let bos = config.bos_token_id.or_else(|| special("bos_token"));
    let mut eos = config.eos_ids();
    if let Some(id) = special("eos_token") {
        eos.push(id);
    }
    if let Some(generation) = read_json(&dir.join("generation_config.json"))? {
        if let Some(value) = generation.get("eos_token_id") {
            let extra: Option<crate::model::config::EosTokens> =
                serde_json::from_value(value.clone()).ok();
            eos.extend(extra.map(|e| e.ids()).unwrap_or_default());
        }
    }
    eos.sort_unstable();
    eos.dedup();
    let template = chat_template(dir, &tk_config)?;
    Ok(Tokenizer::new(inner, bos, &eos, template))
}

/// The chat template: `chat_template.jinja` (how recent transformers save
/// it), else the `chat_template` string of tokenizer_config.json.
fn chat_template(dir: &Path, tk_config: &Value) -> Result<Option<String>, LoadError> {
    let path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&path) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LoadError::io(&path, e)),
    }
    Ok(tk_config
        .get("chat_template")
        .and_then(Value::as_str)
        .map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_5_rope_parameters_are_read_like_the_older_keys() {
        let base = serde_json::json!({
            "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        });
        let with = |extra: Value| {
            let mut raw = base.clone();
            raw.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<LlamaConfig>(lift_rope_parameters(raw)).unwrap()
        };
        let plain = with(serde_json::json!({
            "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}
        }));
        assert_eq!(plain.rope_theta, 5000.0);
        assert!(plain.rope_scaling.is_none());
        let llama31 = with(serde_json::json!({"rope_parameters": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0
        }}));
        assert_eq!(llama31.rope_theta, 500000.0);
        let scaling = llama31.rope_scaling.unwrap();
        assert_eq!(
            (scaling.rope_type.as_str(), scaling.factor),
            ("llama3", 8.0)
        );
        // Older keys, where present, win.
        let both = with(serde_json::json!({
            "rope_theta": 10000.0, "rope_parameters": {"rope_theta": 1.0, "rope_type": "default"}
        }));
        assert_eq!(both.rope_theta, 10000.0);
    }

    #[test]
    fn chat_template_comes_from_its_own_file_first_then_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"chat_template": "{{ from_config }}"});
        assert_eq!(
            chat_template(dir.path(), &config).unwrap().as_deref(),
            Some("{{ from_config }}")
        );
        assert_eq!(chat_template(dir.path(), &Value::Null).unwrap(), None);
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ from_file }}").unwrap();
        assert_eq!(
            chat_template(dir.path(), &config).unwrap().as_deref(),
            Some("{{ from_file }}")
        );
    }

    #[test]
    fn a_config_file_is_read_alone_and_checked_like_a_directorys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shape.json");
        let shape = serde_json::json!({
            "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        });
        std::fs::write(&path, shape.to_string()).unwrap();
        let config = read_config_file(&path).unwrap();
        assert_eq!(
            (
                config.num_hidden_layers,
                config.num_kv_heads(),
                config.head_dim()
            ),
            (3, 2, 16)
        );
        let mut qwen = shape.clone();
        qwen["model_type"] = "qwen2".into();
        std::fs::write(&path, qwen.to_string()).unwrap();
        assert!(matches!(
            read_config_file(&path),
            Err(LoadError::UnsupportedArchitecture { .. })
        ));
        let missing = read_config_file(&dir.path().join("none.json")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
    }
}
