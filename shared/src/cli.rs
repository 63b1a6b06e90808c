//! Command-line flags every module shares: which model, on which device, in which dtype.

use std::path::PathBuf;

use clap::Args;
use tch::{Device, Kind};

use crate::device::{self, DeviceChoice, DtypeChoice};
use crate::model::{self, LoadedModel};

/// `--model`, `--device`, `--dtype`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory
    /// [default: $SPARK_DISAGG_MODEL, set by scripts/setup.sh]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// auto (bf16 on GPU, f32 on CPU), f32, bf16 or f16
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelArgsError {
    #[error(
        "no model given: pass --model PATH (a .gguf file or a Hugging Face directory), \
         set SPARK_DISAGG_MODEL, or run scripts/setup.sh, which installs SmolLM2-135M"
    )]
    NoModel,
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    Load(#[from] model::load::LoadError),
}

impl ModelArgs {
    pub fn model_path(&self) -> Result<PathBuf, ModelArgsError> {
        self.model
            .clone()
            .or_else(model::default_model_path)
            .ok_or(ModelArgsError::NoModel)
    }

    pub fn device_and_kind(&self) -> Result<(Device, Kind), ModelArgsError> {
        Ok(device::resolve(self.device, self.dtype)?)
    }

    /// Resolves the flags and loads the model.
    pub fn load(&self) -> Result<LoadedModel, ModelArgsError> {
        let path = self.model_path()?;
        let (device, kind) = self.device_and_kind()?;
        tracing::info!(path = %path.display(), device = %device::device_name(device), dtype = device::kind_name(kind), "loading model");
        Ok(model::load_model(&path, device, kind)?)
    }
}

/// `--etcd`: where the worker registry lives (module 5 and 6; module 0 checks it).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd client endpoint, host:port
    #[arg(long, env = "SPARK_DISAGG_ETCD", default_value = "127.0.0.1:2379")]
    pub etcd: String,
}

/// Logs to stderr, at `warn` unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
