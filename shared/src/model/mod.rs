//! The model: its shape ([`config`]), its forward pass ([`llama`]), how it
//! is read from disk ([`load`]) and how text becomes tokens ([`tokenizer`]).

pub mod config;
pub mod llama;
pub mod load;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::{Device, Kind};

use self::llama::Llama;
use self::load::LoadError;
use self::tokenizer::Tokenizer;

/// A model ready to run, with its tokenizer.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The file or directory it came from.
    pub source: PathBuf,
    /// Reading, dequantising and moving the weights to the device.
    pub load_time: Duration,
}

/// Loads a `.gguf` file or Hugging Face directory onto `device` as `kind`.
pub fn load_model(path: &Path, device: Device, kind: Kind) -> Result<LoadedModel, LoadError> {
    let start = Instant::now();
    let files = load::load(path)?;
    let model = Llama::new(files.config, files.tensors, device, kind)?;
    Ok(LoadedModel {
        model,
        tokenizer: files.tokenizer,
        source: files.source,
        load_time: start.elapsed(),
    })
}

/// Environment variable naming the default model (set by `scripts/setup.sh`
/// through `.cargo/config.toml`).
pub const MODEL_ENV: &str = "SPARK_DISAGG_MODEL";

/// The model to use when none is named: `$SPARK_DISAGG_MODEL` at run time,
/// else the path set-up configured when this binary was built.
pub fn default_model_path() -> Option<PathBuf> {
    std::env::var_os(MODEL_ENV)
        .map(PathBuf::from)
        .or_else(|| option_env!("SPARK_DISAGG_MODEL").map(PathBuf::from))
}
