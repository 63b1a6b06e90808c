//! `module02_kvcache`: the KV cache, measured on the real model.
//!
//! ```text
//! cargo run --release -p module02_kvcache                 # all four studies
//! cargo run --release -p module02_kvcache -- anatomy      # what the engine's cache holds
//! cargo run --release -p module02_kvcache -- scaling --gpu-memory-gib 80
//! cargo run --release -p module02_kvcache -- transfer --prompt-lens 128,512,2048
//! cargo run --release -p module02_kvcache -- compress --steps 32
//! ```
//! Each study prints its tables and writes `module02_<study>.json` and
//! `.txt` (and the scaling plot, `.svg`) under `--out`.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use module02_kvcache::anatomy::{self, DEFAULT_PROMPT};
use module02_kvcache::compress::{self, Scheme};
use module02_kvcache::scaling::{ModelKv, ScalingReport};
use module02_kvcache::transfer;
use serde::Serialize;
use shared::cli::ModelArgs;
use shared::engine::request::Request;
use shared::engine::sampling::SamplingParams;
use shared::engine::{Engine, EngineConfig};
use shared::kv::block::DEFAULT_BLOCK_SIZE;
use shared::model::tokenizer::Tokenizer;
use shared::model::LoadedModel;

#[derive(Parser)]
#[command(
    version,
    about = "Module 2: the KV cache — anatomy, scaling, transfer cost, compression"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Study>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct Common {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the JSON, text and SVG results go
    #[arg(long, default_value = "results", global = true)]
    out: PathBuf,
}

#[derive(Subcommand, Clone)]
enum Study {
    /// Shapes, dtype and bytes of the cache the engine produces for a prompt.
    Anatomy(AnatomyArgs),
    /// KV size vs sequence length, batch and format for four model shapes.
    Scaling(ScalingArgs),
    /// Moving one request's KV: the formula per link, then measured over TCP.
    Transfer(TransferArgs),
    /// Quantizing the KV: bytes saved, error, and the effect on generation.
    Compress(CompressArgs),
}

#[derive(Args, Clone)]
struct AnatomyArgs {
    /// The prompt to run
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
}

#[derive(Args, Clone)]
struct ScalingArgs {
    /// GPU memory the "sequences that fit" table assumes
    #[arg(long, default_value_t = 80.0)]
    gpu_memory_gib: f64,
}

#[derive(Args, Clone)]
struct TransferArgs {
    /// Prompt lengths to prefill and transfer
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    prompt_lens: Vec<usize>,
    /// Transfers per prompt length (the median is reported)
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

#[derive(Args, Clone)]
struct CompressArgs {
    /// The prompt whose cache is compressed
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Decode steps compared against the exact cache
    #[arg(long, default_value_t = 32)]
    steps: usize,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let studies = match cli.command {
        Some(study) => vec![study],
        None => vec![
            Study::Anatomy(AnatomyArgs {
                prompt: DEFAULT_PROMPT.into(),
            }),
            Study::Scaling(ScalingArgs {
                gpu_memory_gib: 80.0,
            }),
            Study::Transfer(TransferArgs {
                prompt_lens: vec![128, 512, 2048],
                repeats: 5,
            }),
            Study::Compress(CompressArgs {
                prompt: DEFAULT_PROMPT.into(),
                steps: 32,
            }),
        ],
    };
    let out = &cli.common.out;
    // The model is loaded once, on first need; scaling alone needs none.
    let mut loaded: Option<LoadedModel> = None;
    for study in studies {
        match study {
            Study::Scaling(args) => {
                heading("scaling");
                let report = ScalingReport::presets(args.gpu_memory_gib);
                let text = report.render();
                print!("{text}");
                save(out, "scaling", &report, &text)?;
                let svg = out.join("module02_scaling.svg");
                report
                    .write_svg(&svg)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
                eprintln!("wrote {}", svg.display());
            }
            Study::Anatomy(args) => {
                heading("anatomy");
                let m = take_model(&mut loaded, &cli.common.model)?;
                let prompt = m.tokenizer.encode(&args.prompt)?;
                let (report, llama) = anatomy::inspect(m.model, &prompt)?;
                let text = report.render(false);
                print!("{text}");
                save(out, "anatomy", &report, &text)?;
                loaded = Some(LoadedModel { model: llama, ..m });
            }
            Study::Transfer(args) => {
                heading("transfer");
                ensure!(args.repeats > 0, "--repeats must be at least 1");
                let m = take_model(&mut loaded, &cli.common.model)?;
                let config = m.model.config().clone();
                let mut formula = String::new();
                for name in ["smollm2-135m", "llama3-8b"] {
                    let preset = shared::model::config::LlamaConfig::preset(name).expect("preset");
                    let per_token = ModelKv::new(name, &preset)
                        .bytes_per_token(module02_kvcache::formats::KvFormat::Bf16);
                    formula.push_str(&transfer::render_formula(
                        &format!("{name} (bf16)"),
                        per_token,
                        &[512, 2048, 8192, 32768],
                    ));
                    formula.push('\n');
                }
                print!("formula: latency + bytes / bandwidth\n{formula}");

                let max_len = args.prompt_lens.iter().copied().max().unwrap_or(0);
                let engine_config = EngineConfig {
                    num_blocks: max_len.div_ceil(DEFAULT_BLOCK_SIZE) + 2,
                    enable_prefix_caching: false,
                    max_num_batched_tokens: max_len.max(512),
                    ..EngineConfig::with_kv_budget(&m.model, 0)
                };
                let mut engine = Engine::new(m.model, engine_config, config.eos_ids())?;
                let mut rows = Vec::new();
                for (i, &len) in args.prompt_lens.iter().enumerate() {
                    let prompt = prompt_of_length(&m.tokenizer, len)?;
                    eprintln!(
                        "prefilling {len} tokens and sending their KV {} times …",
                        args.repeats
                    );
                    let prefill = engine.prefill(Request::new(
                        i as u64,
                        prompt,
                        SamplingParams::fixed_length(1),
                    ))?;
                    let seconds = prefill
                        .timings
                        .prefill_time
                        .context("prefill time")?
                        .as_secs_f64();
                    let (row, received) =
                        transfer::measure_loopback(&prefill.kv, seconds, args.repeats)?;
                    ensure!(
                        received.equal(&prefill.kv.to_device(tch::Device::Cpu)),
                        "the KV arrived changed"
                    );
                    rows.push(row);
                }
                let measured = transfer::render_measured(&rows);
                print!("measured over loopback TCP (serialize, socket, deserialize; medians):\n{measured}");
                save(
                    out,
                    "transfer",
                    &rows,
                    &format!("{formula}measured over loopback TCP:\n{measured}"),
                )?;
                loaded = Some(LoadedModel {
                    model: engine.into_model(),
                    ..m
                });
            }
            Study::Compress(args) => {
                heading("compress");
                ensure!(args.steps > 0, "--steps must be at least 1");
                let m = take_model(&mut loaded, &cli.common.model)?;
                let prompt = m.tokenizer.encode(&args.prompt)?;
                let config = m.model.config().clone();
                let engine_config = EngineConfig {
                    num_blocks: prompt.len().div_ceil(DEFAULT_BLOCK_SIZE) + 2,
                    ..EngineConfig::with_kv_budget(&m.model, 0)
                };
                let mut engine = Engine::new(m.model, engine_config, config.eos_ids())?;
                let prefill =
                    engine.prefill(Request::new(0, prompt, SamplingParams::fixed_length(1)))?;
                let llama = engine.into_model();
                eprintln!(
                    "decoding {} steps from the exact cache and {} compressed ones …",
                    args.steps,
                    Scheme::ALL.len()
                );
                let report = compress::evaluate(
                    &llama,
                    &prefill.kv,
                    prefill.first_token,
                    args.steps,
                    DEFAULT_BLOCK_SIZE as i64,
                    &Scheme::ALL,
                );
                let text = report.render(false);
                print!("{text}");
                save(out, "compress", &report, &text)?;
                loaded = Some(LoadedModel { model: llama, ..m });
            }
        }
    }
    Ok(())
}

/// The model loaded by an earlier study, or a fresh load.
fn take_model(loaded: &mut Option<LoadedModel>, args: &ModelArgs) -> Result<LoadedModel> {
    match loaded.take() {
        Some(m) => Ok(m),
        None => args.load().context("loading the model (see --model)"),
    }
}

fn heading(study: &str) {
    println!("\n=== {study} ===");
}

/// `len` tokens of the default prompt, repeated as often as needed.
fn prompt_of_length(tokenizer: &Tokenizer, len: usize) -> Result<Vec<u32>> {
    let unit = tokenizer.encode(DEFAULT_PROMPT)?;
    Ok(unit.iter().copied().cycle().take(len).collect())
}

fn save(dir: &Path, study: &str, value: &impl Serialize, text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join(format!("module02_{study}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(dir.join(format!("module02_{study}.txt")), text)?;
    eprintln!("wrote {} (and .txt)", json.display());
    Ok(())
}
