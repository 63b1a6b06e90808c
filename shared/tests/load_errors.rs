//! Bad input must produce an error that names the file and the problem —
//! never a panic, never a gigabyte allocation.

mod common;

use std::io::Write;
use std::path::Path;

use shared::model::config::LlamaConfig;
use shared::model::load::{self, LoadError};
use tch::{Device, Kind};

fn load_err(path: &Path) -> LoadError {
    match load::load(path) {
        Ok(_) => panic!("{} loaded, but should not have", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_file_names_the_path() {
    let err = load_err(Path::new("/no/such/model.gguf"));
    assert!(matches!(err, LoadError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/no/such/model.gguf"), "{err}");
}

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let bytes = std::fs::read(common::smollm2_gguf()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Cut inside the metadata (the vocabulary), and inside the tensor data.
    for cut in [1 << 20, bytes.len() - 1000] {
        let path = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_err(&path);
        let text = err.to_string();
        assert!(matches!(err, LoadError::Format { .. }), "{err:?}");
        assert!(
            text.contains("truncated") && text.contains(&*path.to_string_lossy()),
            "{text}"
        );
    }
}

#[test]
fn a_file_that_is_not_gguf_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"<html>404 not found</html>").unwrap();
    assert!(load_err(&path).to_string().contains("not a GGUF file"));
}

/// A minimal GGUF v3 file: header, string metadata, no tensors.
fn write_gguf(path: &Path, metadata: &[(&str, &str)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let string = |f: &mut std::fs::File, s: &str| {
        f.write_all(&(s.len() as u64).to_le_bytes()).unwrap();
        f.write_all(s.as_bytes()).unwrap();
    };
    f.write_all(b"GGUF").unwrap();
    f.write_all(&3u32.to_le_bytes()).unwrap();
    f.write_all(&0u64.to_le_bytes()).unwrap();
    f.write_all(&(metadata.len() as u64).to_le_bytes()).unwrap();
    for (key, value) in metadata {
        string(&mut f, key);
        f.write_all(&8u32.to_le_bytes()).unwrap();
        string(&mut f, value);
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    write_gguf(&path, &[("general.architecture", "mamba")]);
    let err = load_err(&path);
    assert!(
        matches!(&err, LoadError::UnsupportedArchitecture { architecture, .. } if architecture == "mamba")
    );
    assert!(err.to_string().contains("Llama architecture"), "{err}");
}

#[test]
fn implausible_lengths_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes()); // a key "length" of 16 EiB
    std::fs::write(&path, bytes).unwrap();
    assert!(load_err(&path).to_string().contains("implausibly large"));
}

/// A Hugging Face directory of a tiny random model, with its config.json
/// replaced by `config`.
fn hf_dir_with_config(config: &serde_json::Value) -> tempfile::TempDir {
    let tiny = LlamaConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        ..LlamaConfig::smollm2_135m()
    };
    let model_tensors = load::expected_shapes(&tiny)
        .into_iter()
        .map(|(name, shape)| (name, tch::Tensor::zeros(&shape, (Kind::Float, Device::Cpu))))
        .collect::<Vec<_>>();
    let dir = tempfile::tempdir().unwrap();
    tch::Tensor::write_safetensors(&model_tensors, dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn wrong_tensor_shape_names_tensor_and_shapes() {
    let dir = hf_dir_with_config(&serde_json::json!({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": true
    }));
    let err = load_err(dir.path());
    let text = err.to_string();
    assert!(matches!(err, LoadError::Shape { .. }), "{err:?}");
    assert!(
        text.contains("mlp.gate_proj.weight")
            && text.contains("[24, 8]")
            && text.contains("[12, 8]"),
        "{text}"
    );
}

#[test]
fn hf_directory_of_another_architecture_is_refused() {
    let dir = hf_dir_with_config(&serde_json::json!({"model_type": "gpt2", "vocab_size": 16}));
    assert!(matches!(
        load_err(dir.path()),
        LoadError::UnsupportedArchitecture { .. }
    ));
}

#[test]
fn hf_directory_without_tokenizer_says_which_file_is_missing() {
    let dir = hf_dir_with_config(&serde_json::json!({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": true
    }));
    let err = load_err(dir.path());
    assert!(matches!(err, LoadError::Tokenizer { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn bad_config_values_are_explained() {
    let dir = hf_dir_with_config(&serde_json::json!({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 3
    }));
    let err = load_err(dir.path());
    assert!(
        err.to_string()
            .contains("not divisible by num_attention_heads 3"),
        "{err}"
    );
}
