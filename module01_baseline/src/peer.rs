//! Running the Hugging Face peer (`bench/peers/hf_generate.py`) with the same workload.
//!
//! A benchmark number alone says little; next to a well-known
//! implementation on the same machine, model and prompts it says how good
//! it is. The peer script prints a [`PeerResult`] as JSON.

use std::path::PathBuf;
use std::process::Command;

use crate::bench::BenchConfig;
use crate::report::PeerResult;

/// How the peer should get the model.
pub enum PeerModel {
    /// A `.gguf` file or Hugging Face directory.
    Path(PathBuf),
    /// Random weights of this shape (`LlamaConfig` as JSON).
    RandomConfig(String),
}

/// Python with torch and transformers: `$SPARK_DISAGG_PYTHON`, else the
/// one set-up configured at build time, else `python3`.
pub fn python() -> String {
    std::env::var("SPARK_DISAGG_PYTHON")
        .ok()
        .or_else(|| option_env!("SPARK_DISAGG_PYTHON").map(str::to_string))
        .unwrap_or_else(|| "python3".into())
}

/// `bench/peers/hf_generate.py` under the current directory (a copied
/// checkout), else in the source tree this binary was built from.
pub fn default_script() -> PathBuf {
    let here = PathBuf::from("bench/peers/hf_generate.py");
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/hf_generate.py")
}

pub fn run_hf_peer(
    script: &std::path::Path,
    model: &PeerModel,
    device: &str,
    dtype: &str,
    vocab: usize,
    config: &BenchConfig,
) -> anyhow::Result<PeerResult> {
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args(["--device", device, "--dtype", dtype])
        .args(["--prompt-len", &config.prompt_len.to_string()])
        .args(["--output-len", &config.output_len.to_string()])
        .args([
            "--vocab",
            &vocab.to_string(),
            "--seed",
            &config.seed.to_string(),
        ])
        .arg("--batch-sizes")
        .arg(
            config
                .batch_sizes
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    match model {
        PeerModel::Path(path) => cmd.arg("--model").arg(path),
        PeerModel::RandomConfig(json) => cmd.args(["--config-json", json]),
    };
    let output = cmd.output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run {}: {e} (set SPARK_DISAGG_PYTHON to a Python with torch and transformers)",
            python()
        )
    })?;
    if !output.status.success() {
        anyhow::bail!(
            "the HF peer failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .map_err(|e| anyhow::anyhow!("the HF peer printed no result ({e}): {last}"))
}
