//! `module01_baseline`: run the real model on one node.
//!
//! ```text
//! cargo run --release -p module01_baseline -- generate --prompt "The capital of France is"
//! cargo run --release -p module01_baseline -- generate --chat "Write a haiku about caches"
//! cargo run --release -p module01_baseline -- convert --out /tmp/smollm2-hf
//! cargo run --release -p module01_baseline -- bench --peer hf
//! cargo run --release -p module01_baseline -- history results/h100/tinyllama-1.1b_h100_{fix29,fix30,fix32}.json fix33=results/h100/tinyllama-1.1b_h100.json
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use module01_baseline::bench::{self, BenchConfig};
use module01_baseline::history::{self, History};
use module01_baseline::peer::{self, PeerModel};
use module01_baseline::report::{
    self, BenchReport, EngineSteps, Memory, Roofline, RooflineBandwidth, Setup,
};
use module01_baseline::timeline::{self, TimelineReport, TimelineSetup};
use shared::cli::ModelArgs;
use shared::device;
use shared::engine::generate::generate;
use shared::engine::sampling::SamplingParams;
use shared::engine::{DecodeMode, Engine, EngineConfig};
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
    /// Measure the engine: single request, batch sweep, offered load (and a peer, if asked).
    Bench(BenchArgs),
    /// Where a decode layer's time goes on a GPU: the layer kernel's own
    /// clock marks at each stage, block by block (a diagnostic build).
    Timeline(TimelineArgs),
    /// Print the table of a saved bench or timeline result (the book
    /// includes these).
    Table {
        /// A JSON file written by `bench --json` or `timeline --json`.
        json: PathBuf,
        /// For a timeline result: draw its figure again, here (SVG).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Saved bench results of one workload side by side, in the order given: the
    /// batch-1 decode against the floor, the batches, and a peer.
    History(HistoryArgs),
}

#[derive(clap::Args)]
struct HistoryArgs {
    /// Bench results (`bench --json`) in the order to show them; `LABEL=PATH`
    /// names a row (else the file name, less what all of them share).
    #[arg(required = true)]
    runs: Vec<String>,
    /// Memory bandwidth in GB/s for every run's floor (e.g. 3350 for an
    /// H100 SXM) [default: each run's own roofline].
    #[arg(long)]
    mem_bandwidth_gbps: Option<f64>,
    /// The peer the speed-ups are taken against.
    #[arg(long, default_value = "hf-generate")]
    peer: String,
    /// Also draw the runs (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use seeded random weights of this shape instead of loading a model
    /// (smollm2-135m, tinyllama-1.1b, llama3-8b, llama3-70b, or the path of
    /// a Hugging Face config.json).
    #[arg(long)]
    random: Option<String>,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 16)]
    output_len: usize,
    /// Comma-separated batch sizes for the sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    batch_sizes: Vec<usize>,
    /// Requests in the offered-load run (0 skips it).
    #[arg(long, default_value_t = 8)]
    num_requests: usize,
    /// Poisson arrival rate of the offered-load run, requests per second (0: all at once).
    #[arg(long, default_value_t = 4.0)]
    request_rate: f64,
    /// KV pool size in GiB [default: 0.5 on CPU; on a GPU, 60% of the memory NVML reports free].
    #[arg(long)]
    kv_cache_gb: Option<f64>,
    /// Token budget per engine step (chunked prefill).
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// How decode steps run: eager, cuda-graphs or padded [default: cuda-graphs on a GPU, eager on a CPU].
    #[arg(long)]
    decode: Option<DecodeMode>,
    /// Let PyTorch use cuDNN's attention (it plans anew for every shape; off by default).
    #[arg(long)]
    cudnn_attention: bool,
    /// Replay the PyTorch-operations decode step in the CUDA graphs instead
    /// of the custom kernels (shared::kernels), to see what they bring.
    #[arg(long)]
    no_fused_kernels: bool,
    /// With the custom kernels: decode batches up to this size run their
    /// matrix products on the matrix-vector kernel (with RMSNorm, SwiGLU and
    /// the residual addition fused in), larger ones on cuBLAS; 0: cuBLAS
    /// always, at most 4. The kernels are compiled for it: a larger value
    /// takes shared memory from the layer kernel's weight ring.
    #[arg(long, default_value_t = 1)]
    matvec_max_batch: usize,
    /// Read each decode step's tokens before queueing the next step (by
    /// default the next one is queued first when it can be; see
    /// shared::engine::Engine::step).
    #[arg(long)]
    no_decode_ahead: bool,
    /// Also run Hugging Face transformers on the same workload, one or more
    /// of: hf-generate (or hf), hf-loop, hf-compiled (comma-separated; see
    /// bench/peers/hf_generate.py).
    #[arg(long, value_delimiter = ',', value_parser = peer::parse_peer)]
    peer: Vec<peer::HfVariant>,
    /// Memory bandwidth in GB/s for the roofline line (e.g. 3350 for an H100
    /// SXM). Without it a GPU run uses the peak of the GPU's own memory
    /// interface, as NVML reports it; a CPU run draws no roofline.
    #[arg(long)]
    mem_bandwidth_gbps: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the results.
    #[arg(long, default_value = "results/module01_bench.json")]
    json: PathBuf,
    /// Where to draw throughput and latency.
    #[arg(long, default_value = "results/module01_bench.svg")]
    svg: PathBuf,
}

#[derive(clap::Args)]
struct TimelineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use seeded random weights of this shape instead of loading a model
    /// (smollm2-135m, tinyllama-1.1b, llama3-8b, llama3-70b, or the path of
    /// a Hugging Face config.json).
    #[arg(long)]
    random: Option<String>,
    /// Sequences in the decode step (the layer kernel takes up to 4).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens of context each sequence attends to.
    #[arg(long, default_value_t = 576)]
    context: usize,
    /// Decode steps to measure (after 3 that warm up).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// The layer to draw [default: the middle one].
    #[arg(long)]
    layer: Option<usize>,
    /// KV pool size in GiB.
    #[arg(long, default_value_t = 1.0)]
    kv_cache_gb: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the results.
    #[arg(long, default_value = "results/module01_timeline.json")]
    json: PathBuf,
    /// Where to draw the layer, block by block.
    #[arg(long, default_value = "results/module01_timeline.svg")]
    svg: PathBuf,
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
    shared::cli::init_logging();
    match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
        Command::Convert(args) => run_convert(args),
        Command::Bench(args) => run_bench(args),
        Command::Timeline(args) => run_timeline(args),
        Command::History(args) => run_history(args),
        Command::Table { json, svg } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?;
            if let Ok(timeline) = serde_json::from_str::<TimelineReport>(&text) {
                print!("{}", timeline::render_table(&timeline));
                if let Some(svg) = svg {
                    timeline::write_svg(&timeline, &svg)
                        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))?;
                }
                return Ok(());
            }
            if svg.is_some() {
                anyhow::bail!(
                    "--svg draws a timeline result's figure; {} is not one",
                    json.display()
                );
            }
            let report = BenchReport::from_json(&text).with_context(|| {
                format!(
                    "{} is neither a module01 bench result nor a timeline result",
                    json.display()
                )
            })?;
            print!("{}", report::render_table(&report, false));
            Ok(())
        }
    }
}

fn run_history(args: HistoryArgs) -> Result<()> {
    let runs = history::read_runs(&args.runs, Path::new("."))?;
    let history = History::new(runs, args.mem_bandwidth_gbps, &args.peer)?;
    print!("{}", history::render_table(&history));
    if let Some(svg) = args.svg {
        history::write_svg(&history, &svg)
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))?;
    }
    Ok(())
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

/// The shape `--random` names: a preset, or a Hugging Face `config.json`
/// (any Llama shape that is not a preset), with the name results give it.
fn random_shape(shape: &str) -> Result<(shared::model::config::LlamaConfig, String)> {
    use shared::model::config::LlamaConfig;
    if let Some(config) = LlamaConfig::preset(shape) {
        return Ok((config, shape.to_string()));
    }
    let path = Path::new(shape);
    if !path.is_file() {
        bail!(
            "--random {shape:?} is neither a preset ({}) nor a config.json file",
            LlamaConfig::PRESET_NAMES.join(", ")
        );
    }
    let config = shared::model::load::hf_dir::read_config_file(path)?;
    let name = path
        .file_name()
        .map_or(shape.into(), |n| n.to_string_lossy().into_owned());
    Ok((config, name))
}

/// The model a measurement runs: seeded random weights of a preset shape,
/// or the model `model` names; with its name for the results and how a
/// peer would load the same.
fn bench_model(
    model: &ModelArgs,
    random: &Option<String>,
    seed: u64,
    device: tch::Device,
    kind: tch::Kind,
) -> Result<(shared::model::llama::Llama, String, PeerModel)> {
    Ok(match random {
        Some(shape) => {
            let (config, name) = random_shape(shape)?;
            let json = serde_json::to_string(&config)?;
            let model = shared::model::llama::Llama::random(config, seed, device, kind);
            (
                model,
                format!("{name} (random weights)"),
                PeerModel::RandomConfig(json),
            )
        }
        None => {
            let path = model.model_path()?;
            let loaded = shared::model::load_model(&path, device, kind)?;
            let name = path
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned());
            (loaded.model, name, PeerModel::Path(path))
        }
    })
}

fn run_bench(args: BenchArgs) -> Result<()> {
    let (device, kind) = args.model.device_and_kind()?;
    let (model, name, peer_model) =
        bench_model(&args.model, &args.random, args.seed, device, kind)?;
    let config = BenchConfig {
        prompt_len: args.prompt_len,
        output_len: args.output_len,
        batch_sizes: args.batch_sizes.clone(),
        num_requests: args.num_requests,
        request_rate: args.request_rate,
        seed: args.seed,
    };
    if config.prompt_len == 0 || config.output_len < 2 {
        bail!(
            "--prompt-len must be at least 1 and --output-len at least 2 (one decode step to time)"
        );
    }
    let kv_bytes = match args.kv_cache_gb {
        Some(gb) => (gb * (1u64 << 30) as f64) as usize,
        None => match device {
            tch::Device::Cuda(i) => device::gpu_memory(i)
                .map(|m| (m.free as f64 * 0.6) as usize)
                .unwrap_or(4 << 30),
            _ => 1 << 29,
        },
    };
    let parameters = model.config().num_parameters();
    let weight_bytes = model.weight_bytes_per_step();
    let mut engine_config = EngineConfig::with_kv_budget(&model, kv_bytes);
    engine_config.max_num_batched_tokens = args.max_batched_tokens;
    if let Some(decode) = args.decode {
        engine_config.decode = decode;
    }
    engine_config.cudnn_attention = args.cudnn_attention;
    engine_config.fused_kernels = !args.no_fused_kernels;
    engine_config.matvec_max_batch = args.matvec_max_batch;
    engine_config.decode_ahead = !args.no_decode_ahead;
    let largest = args
        .batch_sizes
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.num_requests.min(engine_config.max_num_seqs));
    let per_request_blocks =
        (config.prompt_len + config.output_len).div_ceil(engine_config.block_size);
    if per_request_blocks > engine_config.num_blocks {
        bail!(
            "one request needs {per_request_blocks} KV blocks but --kv-cache-gb allows {}; raise it or shorten the prompt",
            engine_config.num_blocks
        );
    }
    let vocab = model.config().vocab_size;
    let mut engine = Engine::new(model, engine_config.clone(), vec![])?;
    eprintln!(
        "{name}: {:.0}M parameters on {} as {}; KV pool {} blocks ({:.0} MB), room for {} requests of {} tokens at once",
        parameters as f64 / 1e6,
        device::device_name(device),
        device::kind_name(kind),
        engine_config.num_blocks,
        engine.pool().bytes() as f64 / 1e6,
        engine_config.num_blocks / per_request_blocks,
        config.prompt_len + config.output_len,
    );
    if engine_config.num_blocks / per_request_blocks < largest {
        eprintln!("note: the largest batch does not fit in the KV pool at once; the scheduler will queue or preempt");
    }

    if engine.decode_mode() != DecodeMode::Eager {
        let start = std::time::Instant::now();
        let contexts = config.prompt_len + 1..=config.prompt_len + config.output_len;
        let prepared = engine.prepare_decode_steps(largest, contexts)?;
        eprintln!(
            "decode steps: {}, {prepared} buckets prepared in {:.1} s (not timed below)",
            engine.decode_mode(),
            start.elapsed().as_secs_f64()
        );
    }
    let steps = 2 + config.batch_sizes.len() as u64;
    let bar = bench::progress_bar(steps, "warm-up");
    bench::warm_up(&mut engine, &config);
    bar.inc(1);
    bar.set_message("single request");
    let single = bench::single_request(&mut engine, &config);
    bar.inc(1);
    let mut batches = Vec::new();
    for &b in &config.batch_sizes {
        bar.set_message(format!("batch {b}"));
        batches.push(bench::batch(&mut engine, &config, b));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let load = (config.num_requests > 0).then(|| {
        let bar = bench::progress_bar(config.num_requests as u64, "offered load (requests)");
        let result = bench::offered_load(&mut engine, &config, &bar);
        bar.finish_and_clear();
        result
    });

    let stats = engine.stats();
    let engine_steps = EngineSteps {
        steps: stats.steps,
        queued_ahead_used: stats.steps_ahead_used,
        queued_ahead_dropped: stats.steps_ahead_dropped,
    };

    let peers = if args.peer.is_empty() {
        Vec::new()
    } else {
        eprintln!(
            "running the Hugging Face peers {:?} (bench/peers/hf_generate.py)...",
            args.peer
        );
        peer::run_hf_peers(
            &peer::default_script(),
            &args.peer,
            &peer_model,
            &device::device_name(device),
            device::kind_name(kind),
            vocab,
            &config,
        )?
    };
    let gpu_memory = match device {
        tch::Device::Cuda(i) => device::memory_interface(i),
        _ => None,
    };
    let bandwidth = RooflineBandwidth::choose(args.mem_bandwidth_gbps, gpu_memory);
    if let Some(warning) = bandwidth.as_ref().and_then(|b| b.warning.as_ref()) {
        eprintln!("warning: {warning}");
    }
    let roofline = bandwidth.map(|bandwidth| {
        let floor_ms = weight_bytes as f64 / (bandwidth.gb_per_s * 1e9) * 1e3;
        Roofline {
            weight_bytes,
            bandwidth_gb_per_s: bandwidth.gb_per_s,
            bandwidth_source: bandwidth.source,
            floor_ms,
            measured_ms: single.decode_ms_per_token,
            ratio: single.decode_ms_per_token / floor_ms,
        }
    });
    let report = BenchReport {
        setup: Setup {
            model: name,
            parameters,
            device: device::device_name(device),
            device_name: device::describe(device),
            dtype: device::kind_name(kind).into(),
            decode: engine.decode_mode().to_string(),
            fused_kernels: engine.fused_kernels(),
            matvec_max_batch: engine.matvec_limit(),
            layer_kernel: engine.layer_kernel(),
            layer_ring: engine.layer_ring().map(|ring| ring.to_string()),
            decode_ahead: engine.decode_ahead(),
            kv_cache_blocks: engine_config.num_blocks,
            max_num_batched_tokens: engine_config.max_num_batched_tokens,
            date: device::today(),
        },
        config,
        single,
        batches,
        load,
        memory: Memory {
            cpu_peak_rss_mb: device::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
            gpu_used_mb: match device {
                tch::Device::Cuda(i) => device::gpu_memory(i).map(|m| m.used as f64 / 1e6),
                _ => None,
            },
            kv_pool_mb: engine.pool().bytes() as f64 / 1e6,
        },
        engine_steps: Some(engine_steps),
        roofline,
        peers,
        legacy_peer: None,
    };
    println!("{}", report::render_table(&report, false));
    report::write_json(&report, &args.json)
        .with_context(|| format!("writing {}", args.json.display()))?;
    report::write_svg(&report, &args.svg)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.svg.display()))?;
    eprintln!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}

fn run_timeline(args: TimelineArgs) -> Result<()> {
    let (device, kind) = args.model.device_and_kind()?;
    if !device.is_cuda() {
        bail!(
            "the layer timeline is read from the GPU's layer kernel, and {} is not a GPU; \
             run it on a machine with one (--device cuda)",
            device::device_name(device)
        );
    }
    if !(1..=4).contains(&args.batch) || args.steps == 0 || args.context == 0 {
        bail!(
            "--batch must be 1 to 4 (the layer kernel's batches), --steps and --context at least 1"
        );
    }
    // The kernels read these when the engine compiles them, just below. The
    // layer kernel is what the timeline is of: on, even where it is off by
    // default (a GPU before Hopper), unless the user turned it off.
    std::env::set_var("SPARK_DISAGG_LAYER_TIMELINE", "1");
    if std::env::var_os("SPARK_DISAGG_LAYER_KERNEL").is_none() {
        std::env::set_var("SPARK_DISAGG_LAYER_KERNEL", "1");
    }
    let (model, name, _) = bench_model(&args.model, &args.random, args.seed, device, kind)?;
    let layers = model.config().num_hidden_layers;
    let mut engine_config =
        EngineConfig::with_kv_budget(&model, (args.kv_cache_gb * (1u64 << 30) as f64) as usize);
    engine_config.decode = DecodeMode::CudaGraphs;
    engine_config.matvec_max_batch = args.batch;
    let mut engine = Engine::new(model, engine_config, vec![])?;
    const WARM_UP: usize = 3;
    eprintln!(
        "{name} on {}: {} decode steps of batch {} at {} tokens, the layer kernel built with its clock marks",
        device::device_name(device),
        WARM_UP + args.steps,
        args.batch,
        args.context
    );
    let mut steps = engine
        .layer_timelines(args.batch, args.context, WARM_UP + args.steps)
        .context("reading the layer timeline")?;
    steps.drain(..WARM_UP.min(steps.len()));
    if let Some(bad) = steps.iter().position(|t| !t.is_ordered()) {
        bail!(
            "step {bad}'s marks are out of order or missing: the timeline build and this \
             program disagree (decode.cu's marks against shared::kernels::timeline)"
        );
    }
    let setup = TimelineSetup {
        model: name,
        device: device::device_name(device),
        dtype: device::kind_name(kind).to_string(),
        batch: args.batch,
        context: args.context,
        layer_ring: engine.layer_ring().map(|ring| ring.to_string()),
        date: device::today(),
    };
    let report = TimelineReport::new(setup, &steps, args.layer.unwrap_or(layers / 2));
    let table = timeline::render_table(&report);
    print!("{table}");
    shared::results::write(&args.json, &report, &table)?;
    timeline::write_svg(&report, &args.svg)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.svg.display()))?;
    eprintln!(
        "wrote {}, {} and {}",
        args.json.display(),
        args.json.with_extension("txt").display(),
        args.svg.display()
    );
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
