//! `module01_baseline`: run the real model on one node.
//!
//! ```text
//! cargo run --release -p module01_baseline -- generate --prompt "The capital of France is"
//! cargo run --release -p module01_baseline -- generate --chat "Write a haiku about caches"
//! cargo run --release -p module01_baseline -- convert --out /tmp/smollm2-hf
//! ```

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use shared::cli::ModelArgs;
use shared::device;
use shared::engine::generate::generate;
use shared::engine::sampling::SamplingParams;
use shared::model::tokenizer::ChatMessage;

#[derive(Parser)]
#[command(version, about = "Module 1: the single-node baseline engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt and show where the time went.
    Generate(GenerateArgs),
    /// Write the model out as a Hugging Face directory (config.json, model.safetensors, tokenizer.json).
    Convert(ConvertArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Plain text to continue.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype in the output: f32 keeps dequantised GGUF weights exact.
    #[arg(long, default_value = "f32")]
    weights: device::DtypeChoice,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
        Command::Convert(args) => run_convert(args),
    }
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tokenizer = &loaded.tokenizer;
    let text = match (&args.prompt, &args.chat) {
        (Some(prompt), _) => prompt.clone(),
        (None, Some(message)) => {
            tokenizer.apply_chat_template(&[ChatMessage::new("user", message)])?
        }
        (None, None) => bail!("give --prompt or --chat"),
    };
    let prompt = tokenizer.encode(&text)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: false,
    };
    eprintln!(
        "model {} ({} layers, {:.0}M parameters) on {} as {}, loaded in {:.2?}",
        loaded.source.display(),
        model.config().num_hidden_layers,
        model.config().num_parameters() as f64 / 1e6,
        device::device_name(model.device()),
        device::kind_name(model.kind()),
        loaded.load_time,
    );

    if args.prompt.is_some() {
        print!("{text}");
    }
    let mut stream = tokenizer.stream_decoder();
    let mut stdout = std::io::stdout();
    let generation = generate(model, &prompt, &tokenizer.eos_ids(), &params, |id| {
        if let Ok(Some(piece)) = stream.push(id) {
            print!("{piece}");
            let _ = stdout.flush();
        }
    })?;
    println!();

    let decode_steps = generation.tokens.len().saturating_sub(1);
    eprintln!(
        "prompt {} tokens, generated {} ({:?})",
        generation.prompt_tokens,
        generation.tokens.len(),
        generation.finish_reason
    );
    eprintln!(
        "prefill {:.1} ms ({:.0} tokens/s) | decode {:.1} ms for {} steps ({:.1} ms/token, {:.1} tokens/s)",
        ms(generation.prefill_time),
        generation.prompt_tokens as f64 / generation.prefill_time.as_secs_f64(),
        ms(generation.decode_time),
        decode_steps,
        ms(generation.time_per_output_token()),
        if decode_steps > 0 { decode_steps as f64 / generation.decode_time.as_secs_f64() } else { 0.0 },
    );
    Ok(())
}

fn run_convert(args: ConvertArgs) -> Result<()> {
    let path = args.model.model_path()?;
    let kind = match args.weights {
        device::DtypeChoice::Auto | device::DtypeChoice::F32 => tch::Kind::Float,
        device::DtypeChoice::Bf16 => tch::Kind::BFloat16,
        device::DtypeChoice::F16 => tch::Kind::Half,
    };
    let files = shared::model::load::load(&path)?;
    shared::model::load::export::write_hf_dir(&files, &args.out, kind)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} tensors)",
        args.out.display(),
        files.tensors.len()
    );
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
