//! Writing a loaded model out as a Hugging Face directory.
//!
//! This is the converter behind `module01_baseline convert`: GGUF in,
//! `config.json` + `model.safetensors` + `tokenizer.json` out. It exists for
//! two reasons: it lets `transformers` run *our* dequantised weights (the
//! golden-logit test compares against exactly that), and it exercises the
//! Hugging Face loader on a real model in every test run.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use tch::Kind;

use super::{LoadError, ModelFiles};

/// Writes `files` into `dir` (created if needed), weights stored as `kind`
/// (`Kind::Float` keeps dequantised GGUF weights exact).
pub fn write_hf_dir(files: &ModelFiles, dir: &Path, kind: Kind) -> Result<(), LoadError> {
    std::fs::create_dir_all(dir).map_err(|e| LoadError::io(dir, e))?;
    let (dtype, dtype_name) = match kind {
        Kind::Float => (Dtype::F32, "float32"),
        Kind::BFloat16 => (Dtype::BF16, "bfloat16"),
        Kind::Half => (Dtype::F16, "float16"),
        other => {
            return Err(LoadError::Format {
                path: dir.to_path_buf(),
                message: format!("cannot export weights as {other:?}; use f32, bf16 or f16"),
            })
        }
    };

    let mut config = serde_json::to_value(&files.config).expect("config serialises");
    let object = config.as_object_mut().expect("config is an object");
    object.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    object.insert("model_type".into(), json!("llama"));
    object.insert("hidden_act".into(), json!("silu"));
    object.insert("torch_dtype".into(), json!(dtype_name));
    object.retain(|_, v| !v.is_null());
    write_json(&dir.join("config.json"), &config)?;

    // Tensors as contiguous little-endian bytes on the CPU.
    let mut buffers = Vec::with_capacity(files.tensors.len());
    for (name, tensor) in &files.tensors {
        let t = tensor
            .to_device(tch::Device::Cpu)
            .to_kind(kind)
            .contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, numel);
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| LoadError::Format {
                    path: dir.to_path_buf(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = dir.join("model.safetensors");
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    safetensors::serialize_to_file(views, metadata, &weights).map_err(|e| LoadError::Format {
        path: weights.clone(),
        message: format!("cannot write safetensors: {e}"),
    })?;

    let tokenizer = &files.tokenizer;
    let tk_path = dir.join("tokenizer.json");
    tokenizer
        .inner()
        .save(&tk_path, false)
        .map_err(|e| LoadError::Tokenizer {
            path: tk_path.clone(),
            message: e.to_string(),
        })?;
    let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.inner().id_to_token(id));
    let tk_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_text(tokenizer.bos_id()),
        "eos_token": token_text(tokenizer.eos_ids().first().copied()),
        "chat_template": tokenizer.chat_template(),
        "model_max_length": files.config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    write_json(&dir.join("tokenizer_config.json"), &tk_config)?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({ "bos_token_id": files.config.bos_token_id, "eos_token_id": files.config.eos_ids() }),
    )
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), LoadError> {
    let text = serde_json::to_string_pretty(value).expect("JSON value serialises");
    std::fs::write(path, text).map_err(|e| LoadError::io(path, e))
}
