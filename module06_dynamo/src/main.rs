//! `module06_dynamo`: the full system behind an OpenAI-compatible API.
//!
//! ```text
//! cargo run --release -p module06_dynamo -- demo               # up, one streamed request, down
//! cargo run --release -p module06_dynamo -- up                 # etcd + 1 prefill + 1 decode + frontend on :8000
//! cargo run --release -p module06_dynamo -- bench              # four deployments under the same load
//! cargo run --release -p module06_dynamo -- worker --role decode --etcd HOST:2379    # one worker (multi-node)
//! cargo run --release -p module06_dynamo -- frontend --etcd HOST:2379               # the frontend alone
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use module05_routing::policy;
use module05_routing::registry::Registry;
use module05_routing::registry::Role;
use module05_routing::router::Router;
use module06_dynamo::bench::{self, LoadSpec};
use module06_dynamo::deploy::{model_name, Deployment, DeploymentSpec};
use module06_dynamo::disagg::DisaggPolicy;
use module06_dynamo::frontend::{Frontend, FrontendConfig};
use module06_dynamo::worker::{self, shutdown_signal, WorkerArgs};
use shared::cli::EtcdArgs;
use shared::device::{DeviceChoice, DtypeChoice};
use shared::kv::block::DEFAULT_BLOCK_SIZE;
use shared::wire::TransferMode;

#[derive(Parser)]
#[command(
    version,
    about = "Module 6: an OpenAI-compatible frontend over KV-aware routed prefill and decode workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags of a whole deployment (`up` and `bench`).
#[derive(Debug, Clone, Args)]
struct DeployArgs {
    /// A .gguf file or Hugging Face directory [default: $SPARK_DISAGG_MODEL]
    #[arg(long)]
    model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N, for every worker
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// The prefill workers' device, if not --device (e.g. cuda:0)
    #[arg(long)]
    prefill_device: Option<String>,
    /// The decode and aggregated workers' device, if not --device (e.g. cuda:1)
    #[arg(long)]
    decode_device: Option<String>,
    /// How one-sided KV writes move: auto (RDMA if a port is active, else
    /// tcp), tcp, ibverbs, ibverbs:DEVICE, or cuda-ipc (GPU to GPU on one host)
    #[arg(long, default_value = "auto")]
    transfer_backend: String,
    /// KV pool per decode or aggregated worker
    #[arg(long, default_value_t = 0.5)]
    kv_cache_gb: f64,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// Where the frontend listens, and who may use it.
#[derive(Debug, Clone, Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*
    #[arg(long, env = "SPARK_DISAGG_API_KEY")]
    api_key: Option<String>,
}

#[derive(Debug, Clone, Args)]
struct RoutingArgs {
    /// Routing policy: kv-aware, kv-aware:W, least-loaded, session-affinity, round-robin, random
    #[arg(long, default_value = "kv-aware")]
    policy: String,
    /// Prefill remotely only if at least this many prompt tokens are not cached
    #[arg(long, default_value_t = DisaggPolicy::default().min_remote_prefill_tokens)]
    min_remote_prefill: usize,
    /// Prefill locally when the prefill worker has this many requests in flight
    #[arg(long, default_value_t = DisaggPolicy::default().max_prefill_queue)]
    max_prefill_queue: usize,
    /// How prefill workers ship KV: layerwise, bulk or onesided
    #[arg(long, default_value = "layerwise", value_parser = parse_transfer)]
    transfer: TransferMode,
}

impl RoutingArgs {
    fn disagg(&self) -> DisaggPolicy {
        DisaggPolicy {
            min_remote_prefill_tokens: self.min_remote_prefill,
            max_prefill_queue: self.max_prefill_queue,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start etcd (if none answers), workers and the frontend; Ctrl-C stops all.
    Up {
        #[command(flatten)]
        deploy: DeployArgs,
        #[command(flatten)]
        routing: RoutingArgs,
        #[arg(long, default_value_t = 1)]
        prefill: usize,
        #[arg(long, default_value_t = 1)]
        decode: usize,
        #[arg(long, default_value_t = 0)]
        aggregated: usize,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Bring the system up, send one streamed chat request, show where its time went, stop.
    Demo {
        #[command(flatten)]
        deploy: DeployArgs,
        #[arg(
            long,
            default_value = "Explain in two sentences why a KV cache makes decoding faster."
        )]
        prompt: String,
        #[arg(long, default_value_t = 48)]
        max_tokens: usize,
    },
    /// Print the table of a `bench` run's JSON again (and rewrite its .txt).
    Show { json: PathBuf },
    /// Run one worker (for multi-node deployments).
    Worker(WorkerArgs),
    /// Run the frontend and router alone, over workers registered in etcd.
    Frontend {
        /// The model the workers run (read for its tokenizer and context length)
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long, default_value = module06_dynamo::DEFAULT_PREFIX)]
        prefix: String,
        #[command(flatten)]
        routing: RoutingArgs,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Drive the same load through four deployments and compare them.
    Bench {
        #[command(flatten)]
        deploy: DeployArgs,
        #[arg(long, default_value_t = LoadSpec::default().conversations)]
        conversations: usize,
        #[arg(long, default_value_t = LoadSpec::default().turns)]
        turns: usize,
        /// Conversations started per second
        #[arg(long, default_value_t = LoadSpec::default().rate)]
        rate: f64,
        #[arg(long, default_value_t = LoadSpec::default().max_tokens)]
        max_tokens: usize,
        #[arg(long, default_value_t = LoadSpec::default().slo_ttft_s * 1e3)]
        slo_ttft_ms: f64,
        #[arg(long, default_value_t = LoadSpec::default().slo_itl_s * 1e3)]
        slo_itl_ms: f64,
        /// Variants to run, comma-separated (baseline, disagg-tcp, disagg-onesided, full)
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Drive a deployment that is already running (e.g. across hosts) instead
        #[arg(long, conflicts_with = "only")]
        url: Option<String>,
        /// What to call it in the report, with --url
        #[arg(long, default_value = "external")]
        name: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "results/module06_bench.json")]
        json: PathBuf,
    },
}

fn parse_transfer(name: &str) -> Result<TransferMode, String> {
    match name {
        "layerwise" => Ok(TransferMode::Layerwise),
        "bulk" => Ok(TransferMode::Bulk),
        "onesided" => Ok(TransferMode::OneSided),
        other => Err(format!(
            "unknown transfer {other:?}: use layerwise, bulk or onesided"
        )),
    }
}

fn deployment_spec(deploy: &DeployArgs) -> DeploymentSpec {
    DeploymentSpec {
        device: deploy.device.clone(),
        dtype: deploy.dtype.clone(),
        prefill_device: deploy.prefill_device.clone(),
        decode_device: deploy.decode_device.clone(),
        transfer_backend: deploy.transfer_backend.clone(),
        kv_cache_gb: deploy.kv_cache_gb,
        etcd: deploy.etcd.etcd.clone(),
        ..DeploymentSpec::new(deploy.model.clone())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    shared::cli::init_logging();
    match Cli::parse().command {
        Command::Worker(args) => worker::run(args).await,
        Command::Show { json } => {
            let report = shared::results::read(&json)?;
            let load: LoadSpec = shared::results::field(&report, "load", "bench")?;
            let results: Vec<bench::VariantResult> =
                shared::results::field(&report, "results", "bench")?;
            let table = bench::table(&load, &results);
            print!("{table}");
            shared::results::write_table(&json, &table)?;
            Ok(())
        }
        Command::Demo {
            deploy,
            prompt,
            max_tokens,
        } => {
            let spec = DeploymentSpec {
                listen: "127.0.0.1:0".parse().expect("valid"),
                ..deployment_spec(&deploy)
            };
            eprintln!(
                "starting etcd (if needed), 1 prefill worker, 1 decode worker and the frontend…"
            );
            let deployment = Deployment::start(&std::env::current_exe()?, &spec).await?;
            println!("frontend at {}; asking: {prompt}", deployment.url);
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            let reply = bench::stream_chat(&reqwest::Client::new(), &deployment.url, &body).await;
            let metrics = deployment.frontend.metrics.render();
            deployment.stop().await;
            let reply = reply.map_err(|e| anyhow::anyhow!("the request failed: {e}"))?;
            println!("\n{}\n", reply.text.trim());
            println!(
                "{} prompt + {} generated tokens; TTFT {:.0} ms, {:.1} ms per token after it, {:.2} s in all",
                reply.prompt_tokens,
                reply.completion_tokens,
                reply.ttft_s * 1e3,
                reply.itl_s.iter().sum::<f64>() * 1e3 / reply.itl_s.len().max(1) as f64,
                reply.e2e_s
            );
            for line in metrics.lines().filter(|l| {
                l.starts_with("spark_prefill_total")
                    || l.starts_with("spark_kv_transfer_bytes_total")
            }) {
                println!("  {line}");
            }
            Ok(())
        }
        Command::Up {
            deploy,
            routing,
            prefill,
            decode,
            aggregated,
            serve,
        } => {
            if decode + aggregated == 0 {
                anyhow::bail!("nothing would decode: give --decode or --aggregated at least 1");
            }
            let spec = DeploymentSpec {
                prefill,
                decode,
                aggregated,
                one_sided: routing.transfer == TransferMode::OneSided,
                transfer: routing.transfer,
                policy: routing.policy.clone(),
                disagg: routing.disagg(),
                listen: format!("{}:{}", serve.host, serve.port)
                    .parse::<SocketAddr>()
                    .context("--host must be an IP address")?,
                api_key: serve.api_key,
                ..deployment_spec(&deploy)
            };
            eprintln!(
                "starting {prefill} prefill, {decode} decode and {aggregated} aggregated worker(s)…"
            );
            let exe = std::env::current_exe()?;
            let deployment = Deployment::start(&exe, &spec).await?;
            println!(
                "spark-disagg is serving {} at {}",
                model_of(&spec),
                deployment.url
            );
            println!(
                "  try: curl {}/v1/chat/completions -H 'content-type: application/json' \\",
                deployment.url
            );
            println!("         -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"What is a KV cache?\"}}],\"max_tokens\":40}}'");
            println!(
                "  metrics: {0}/metrics   health: {0}/health   Ctrl-C stops everything",
                deployment.url
            );
            shutdown_signal().await;
            eprintln!("stopping…");
            deployment.stop().await;
            Ok(())
        }
        Command::Frontend {
            model,
            etcd,
            prefix,
            routing,
            serve,
        } => {
            let path = model
                .or_else(shared::model::default_model_path)
                .context("no model given: pass --model (the workers' model, for its tokenizer)")?;
            let (config, tokenizer) = shared::model::load::load_metadata(&path)?;
            let registry = Registry::connect(&etcd.etcd, &prefix).await?;
            let policy = policy::by_name(&routing.policy, 0, 1.0)
                .with_context(|| format!("unknown policy {:?}", routing.policy))?;
            let router = Router::start(&registry, policy, DEFAULT_BLOCK_SIZE).await?;
            let frontend = Frontend::new(
                tokenizer,
                router,
                FrontendConfig {
                    model_name: model_name(&path),
                    context: config.max_position_embeddings,
                    api_key: serve.api_key,
                    disagg: routing.disagg(),
                    transfer: routing.transfer,
                    token_timeout: Duration::from_secs(60),
                },
            );
            let listener = tokio::net::TcpListener::bind((serve.host.as_str(), serve.port))
                .await
                .with_context(|| format!("cannot listen on {}:{}", serve.host, serve.port))?;
            println!("frontend serving at http://{}", listener.local_addr()?);
            axum::serve(listener, frontend.app())
                .with_graceful_shutdown(shutdown_signal())
                .await?;
            Ok(())
        }
        Command::Bench {
            deploy,
            conversations,
            turns,
            rate,
            max_tokens,
            slo_ttft_ms,
            slo_itl_ms,
            only,
            url,
            name,
            seed,
            json,
        } => {
            let load = LoadSpec {
                conversations,
                turns,
                rate,
                max_tokens,
                seed,
                slo_ttft_s: slo_ttft_ms / 1e3,
                slo_itl_s: slo_itl_ms / 1e3,
            };
            let base = DeploymentSpec {
                // Any free port: a bench must not collide with a running `up`.
                listen: "127.0.0.1:0".parse().expect("valid"),
                ..deployment_spec(&deploy)
            };
            let mut variants = bench::variants(&base);
            if !only.is_empty() {
                variants.retain(|v| only.iter().any(|o| o == v.name));
                if variants.is_empty() {
                    anyhow::bail!("--only matched no variant; use baseline, disagg-tcp, disagg-onesided, full");
                }
            }
            let runs = if url.is_some() { 1 } else { variants.len() };
            let bar = ProgressBar::new((runs * conversations * turns) as u64);
            bar.set_style(ProgressStyle::with_template(
                "{bar:40} {pos}/{len} requests ({elapsed}, {eta} left)",
            )?);
            let tick = bar.clone();
            let progress = Arc::new(move || tick.inc(1));
            let results = match &url {
                Some(url) => {
                    // The frontend's counters, before and after: this run's share.
                    let before = bench::scrape_transfer_counters(url).await;
                    let summary = bench::drive(url, &load, progress).await;
                    let after = bench::scrape_transfer_counters(url).await;
                    let counters = match (before, after) {
                        (Ok(before), Ok(after)) => after - before,
                        (Err(e), _) | (_, Err(e)) => {
                            eprintln!("warning: {e}; the remote and KV columns stay 0");
                            bench::TransferCounters::default()
                        }
                    };
                    vec![bench::VariantResult {
                        what: format!("the deployment at {url}"),
                        name,
                        summary,
                        remote_prefills: counters.remote_prefills,
                        local_prefills: counters.local_prefills,
                        kv_bytes: counters.kv_bytes,
                        kv_transfer_s: Some(counters.kv_transfer_s),
                    }]
                }
                None => {
                    let exe = std::env::current_exe()?;
                    bench::compare(&exe, &variants, &load, progress).await?
                }
            };
            bar.finish_and_clear();
            let table = bench::table(&load, &results);
            print!("{table}");
            let report = serde_json::json!({
                "model": model_of(&base),
                "device": deploy.device,
                "prefill_device": base.device_of(Role::Prefill),
                "decode_device": base.device_of(Role::Decode),
                "transfer_backend": base.transfer_backend,
                "machine": hardware(base.device_of(Role::Decode)),
                "date": chrono::Local::now().format("%Y-%m-%d").to_string(),
                "load": load,
                "results": results,
            });
            shared::results::write(&json, &report, &table)?;
            eprintln!("wrote {} (and .txt)", json.display());
            Ok(())
        }
    }
}

/// What a result file says the workers ran on: the decode device's GPU
/// (or CPU) and the host's core count.
fn hardware(device: &str) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let resolved = device
        .parse::<DeviceChoice>()
        .ok()
        .and_then(|choice| shared::device::resolve(choice, DtypeChoice::Auto).ok());
    match resolved {
        Some((tch::Device::Cuda(i), _)) => {
            format!(
                "{} ({cores} CPU cores)",
                shared::device::describe(tch::Device::Cuda(i))
            )
        }
        _ => format!("{cores} CPU cores"),
    }
}

fn model_of(spec: &DeploymentSpec) -> String {
    spec.model
        .clone()
        .or_else(shared::model::default_model_path)
        .map(|p| model_name(&p))
        .unwrap_or_else(|| "the model".into())
}
