//! Running the Hugging Face peers (`bench/peers/hf_generate.py`) with the same workload.
//!
//! A benchmark number alone says little; next to a well-known
//! implementation on the same machine, model and prompts it says how good
//! it is. The peer script runs each asked-for way of using transformers
//! ([`HfVariant`]) and prints a [`PeerResult`] for each, as JSON.

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

/// One way of running the model with transformers (the script's `--variants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfVariant {
    /// `model.generate`, dynamic cache.
    Generate,
    /// A hand-written greedy loop over `model(...)` with its cache.
    Loop,
    /// `generate` with a static cache, compiled by torch.compile.
    Compiled,
}

impl HfVariant {
    fn script_name(self) -> &'static str {
        match self {
            HfVariant::Generate => "generate",
            HfVariant::Loop => "loop",
            HfVariant::Compiled => "compiled",
        }
    }
}

/// `--peer` values: `hf` is `hf-generate`, as before there were several.
pub fn parse_peer(s: &str) -> Result<HfVariant, String> {
    match s {
        "hf" | "hf-generate" => Ok(HfVariant::Generate),
        "hf-loop" => Ok(HfVariant::Loop),
        "hf-compiled" => Ok(HfVariant::Compiled),
        _ => Err(format!(
            "unknown peer {s:?}: use hf-generate (or hf), hf-loop or hf-compiled"
        )),
    }
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

pub fn run_hf_peers(
    script: &std::path::Path,
    variants: &[HfVariant],
    model: &PeerModel,
    device: &str,
    dtype: &str,
    vocab: usize,
    config: &BenchConfig,
) -> anyhow::Result<Vec<PeerResult>> {
    let variant_list: Vec<&str> = variants.iter().map(|v| v.script_name()).collect();
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args(["--variants", &variant_list.join(",")])
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
    // The script's progress (compilation times) goes straight to our stderr.
    cmd.stderr(std::process::Stdio::inherit());
    let output = cmd.output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run {}: {e} (set SPARK_DISAGG_PYTHON to a Python with torch and transformers)",
            python()
        )
    })?;
    if !output.status.success() {
        anyhow::bail!(
            "the HF peer script failed ({}); its messages are above",
            output.status
        );
    }
    #[derive(serde::Deserialize)]
    struct Printed {
        peers: Vec<PeerResult>,
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str::<Printed>(last)
        .map(|p| p.peers)
        .map_err(|e| anyhow::anyhow!("the HF peer script printed no result ({e}): {last}"))
}
