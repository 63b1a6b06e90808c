//! From a llama.cpp GGUF file to a [`ModelFiles`]: config, tensors, tokenizer.
//!
//! Three translations happen here:
//!
//! 1. **Names.** llama.cpp calls the first layer's query projection
//!    `blk.0.attn_q.weight`; Hugging Face calls it
//!    `model.layers.0.self_attn.q_proj.weight`. The rest of the project uses
//!    the Hugging Face names.
//! 2. **The Q/K permutation.** RoPE rotates pairs of dimensions. Hugging Face
//!    pairs dimension `i` with `i + head_dim/2` ("rotate half"); llama.cpp
//!    pairs `2i` with `2i + 1` ("interleaved"). When llama.cpp converts a
//!    checkpoint it permutes the rows of `W_q` and `W_k` so that interleaved
//!    RoPE gives the same result. We undo that permutation, so one RoPE
//!    implementation serves both formats.
//! 3. **The tokenizer.** GGUF stores the BPE vocabulary and merge list as
//!    metadata arrays; we rebuild a `tokenizers` BPE model from them, with
//!    the pre-tokenizer that `tokenizer.ggml.pre` names.

use std::path::Path;

use tch::{Kind, Tensor};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::gguf::{GgufFile, GgufValue};
use super::{check_tensors, LoadError, ModelFiles, NamedTensors};
use crate::model::config::{EosTokens, LlamaConfig};
use crate::model::tokenizer::Tokenizer;

/// Loads a GGUF file, dequantising every tensor to f32 on the CPU.
pub fn load(path: &Path) -> Result<ModelFiles, LoadError> {
    let file = GgufFile::open(path)?;
    let config = config_from_metadata(&file)?;
    let tensors = tensors(&file, &config)?;
    check_tensors(path, &config, &tensors)?;
    let tokenizer = tokenizer(&file)?;
    Ok(ModelFiles {
        source: path.to_path_buf(),
        config,
        tensors,
        tokenizer,
    })
}

/// The configuration and tokenizer alone, without dequantising any weights.
pub fn load_metadata(path: &Path) -> Result<(LlamaConfig, Tokenizer), LoadError> {
    let file = GgufFile::open(path)?;
    Ok((config_from_metadata(&file)?, tokenizer(&file)?))
}

/// Reads the `llama.*` hyper-parameters.
pub fn config_from_metadata(file: &GgufFile) -> Result<LlamaConfig, LoadError> {
    let path = file.path();
    let architecture = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| LoadError::Format {
            path: path.to_path_buf(),
            message: "metadata general.architecture is missing".into(),
        })?;
    if architecture != "llama" {
        return Err(LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architecture: architecture.to_string(),
        });
    }
    let int = |key: &str| -> Result<usize, LoadError> {
        file.get(&format!("llama.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| LoadError::Config {
                path: path.to_path_buf(),
                message: format!("metadata llama.{key} is missing or not an integer"),
            })
    };
    let float = |key: &str| {
        file.get(&format!("llama.{key}"))
            .and_then(GgufValue::as_f64)
    };
    let token_id = |key: &str| {
        file.get(&format!("tokenizer.ggml.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as u32)
    };
    let vocab_size = match int("vocab_size") {
        Ok(n) => n,
        Err(_) => file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(<[_]>::len)
            .ok_or_else(|| LoadError::Config {
                path: path.to_path_buf(),
                message: "neither llama.vocab_size nor tokenizer.ggml.tokens is present".into(),
            })?,
    };
    let num_attention_heads = int("attention.head_count")?;
    let config = LlamaConfig {
        vocab_size,
        hidden_size: int("embedding_length")?,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads,
        num_key_value_heads: Some(int("attention.head_count_kv").unwrap_or(num_attention_heads)),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: int("context_length").unwrap_or(2048),
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        bos_token_id: token_id("bos_token_id"),
        eos_token_id: token_id("eos_token_id").map(EosTokens::One),
    };
    config.validate().map_err(|message| LoadError::Config {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(config)
}

/// GGUF tensor name → Hugging Face tensor name.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}"))
}

/// Undoes llama.cpp's row permutation of a Q or K projection `[heads*head_dim, in]`.
///
/// llama.cpp computed `w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)`;
/// the inverse reshapes to `(heads, head_dim/2, 2, in)` and swaps back.
// ANCHOR: unpermute
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Tensor {
    let size = w.size();
    let (rows, cols) = (size[0], size[1]);
    let heads = heads as i64;
    w.reshape([heads, rows / heads / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}
// ANCHOR_END: unpermute

fn tensors(file: &GgufFile, config: &LlamaConfig) -> Result<NamedTensors, LoadError> {
    let mut tensors = NamedTensors::new();
    for info in &file.tensors {
        // Tensors we do not use (rope_freqs for example) are skipped.
        let Some(name) = hf_name(&info.name) else {
            continue;
        };
        let values = file.dequantize(info)?;
        let tensor = Tensor::from_slice(&values).reshape(info.torch_shape());
        let tensor = if name.ends_with("q_proj.weight") {
            unpermute_qk(&tensor, config.num_attention_heads)
        } else if name.ends_with("k_proj.weight") {
            unpermute_qk(&tensor, config.num_kv_heads())
        } else {
            tensor
        };
        debug_assert_eq!(tensor.kind(), Kind::Float);
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// Rebuilds the BPE tokenizer stored in the metadata.
fn tokenizer(file: &GgufFile) -> Result<Tokenizer, LoadError> {
    let path = file.path();
    let fail = |message: String| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let strings = |key: &str| -> Result<Vec<String>, LoadError> {
        let values = file
            .get(key)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| fail(format!("metadata {key} is missing")))?;
        values
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| fail(format!("metadata {key} is not an array of strings")))
    };

    let model = file
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(fail(format!(
            "tokenizer model {model:?} is not supported from GGUF (only byte-level BPE, \
             \"gpt2\"); use the model's Hugging Face directory with tokenizer.json instead"
        )));
    }
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    fail(format!(
                        "merge {m:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| fail(format!("invalid vocabulary or merges: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    match pre {
        // SmolLM splits every digit on its own, then applies GPT-2's byte-level regex.
        "smollm" => {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        "default" | "gpt2" => {
            inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        // Llama 3's regex: numbers in groups of up to three digits.
        "llama-bpe" | "llama3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_PATTERN.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| fail(e.to_string()))?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        other => {
            return Err(fail(format!(
                "pre-tokenizer {other:?} is not known; use the model's Hugging Face \
                 directory with tokenizer.json instead"
            )))
        }
    }
    inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));

    // Control tokens (<|im_start|>, <|endoftext|>, …) must be matched whole in
    // the text, never split by BPE.
    let types = file
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array);
    let specials: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let kind = types.and_then(|t| t.get(*i)).and_then(GgufValue::as_u64);
            matches!(kind, Some(3) | Some(4))
        })
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    inner.add_special_tokens(&specials);

    let id = |key: &str| {
        file.get(&format!("tokenizer.ggml.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as u32)
    };
    let bos = id("bos_token_id");
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool);
    if let (Some(bos), Some(true)) = (bos, add_bos) {
        let bos_text = tokens.get(bos as usize).cloned().unwrap_or_default();
        let processor = TemplateProcessing::builder()
            .try_single(format!("{bos_text} $A"))
            .and_then(|b| b.try_pair(format!("{bos_text} $A $B")))
            .map_err(|e| fail(e.to_string()))?
            .special_tokens(vec![(bos_text, bos)])
            .build()
            .map_err(|e| fail(e.to_string()))?;
        inner.with_post_processor(Some(processor));
    }
    let eos: Vec<u32> = id("eos_token_id").into_iter().collect();
    let template = file
        .get("tokenizer.chat_template")
        .and_then(GgufValue::as_str)
        .map(str::to_string);
    Ok(Tokenizer::new(inner, bos, &eos, template))
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_gguf_names_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        let (heads, head_dim, cols) = (3i64, 8i64, 5i64);
        let hf = Tensor::arange(heads * head_dim * cols, (Kind::Float, tch::Device::Cpu))
            .reshape([heads * head_dim, cols]);
        // What llama.cpp's convert script does.
        let permuted = hf
            .reshape([heads, 2, head_dim / 2, cols])
            .transpose(1, 2)
            .reshape([heads * head_dim, cols]);
        assert!(!permuted.equal(&hf));
        assert!(unpermute_qk(&permuted, heads as usize).equal(&hf));
    }
}
