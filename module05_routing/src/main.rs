//! `module05_routing`: KV-aware routing, measured.
//!
//! ```text
//! cargo run --release -p module05_routing -- simulate --trace ../shared/traces/conversation_trace.jsonl
//! cargo run --release -p module05_routing -- simulate --synthetic        # seeded multi-turn chats
//! cargo run --release -p module05_routing -- live                        # real engines behind the router
//! cargo run --release -p module05_routing -- decision-cost               # µs per KV-aware decision
//! cargo run --release -p module05_routing -- workers                     # who is registered in etcd
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use module05_routing::live::{self, LiveConfig};
use module05_routing::registry::{self, Registry};
use module05_routing::sim::{self, SimConfig};
use module05_routing::trace::{self, SyntheticChats};
use module05_routing::{decision_cost_us, policy, report};
use shared::cli::{EtcdArgs, ModelArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Module 5: KV-aware routing with a worker registry in etcd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which policies to compare, and their knobs.
#[derive(Debug, Clone, clap::Args)]
struct PolicyArgs {
    /// Policies to compare, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = policy::DEFAULT_POLICIES.map(String::from))]
    policies: Vec<String>,
    /// KV-aware cost: weight of the prefill blocks left to compute against load
    #[arg(long, default_value_t = 1.0)]
    overlap_weight: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a trace across simulated workers under each routing policy.
    Simulate {
        /// A JSON-lines trace (Mooncake format: timestamp, input_length, output_length, hash_ids)
        #[arg(long, conflicts_with = "synthetic")]
        trace: Option<PathBuf>,
        /// Use seeded synthetic multi-turn conversations instead of a trace
        #[arg(long)]
        synthetic: bool,
        /// Keep the first N requests of the trace
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Prefix-cache capacity per worker, in blocks
        #[arg(long, default_value_t = 2000)]
        cache_blocks: usize,
        #[arg(long, default_value_t = 16_000.0)]
        prefill_tokens_per_s: f64,
        #[arg(long, default_value_t = 30.0)]
        decode_ms_per_token: f64,
        /// Divide arrival times by this (2 = twice the load)
        #[arg(long, default_value_t = 1.0)]
        speedup: f64,
        #[command(flatten)]
        choice: PolicyArgs,
        #[arg(long, default_value = "results/module05_sim.json")]
        json: PathBuf,
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Real engines behind the router: multi-turn chats, hit rate and TTFT per policy.
    Live {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long, default_value_t = LiveConfig::default().workers)]
        workers: usize,
        /// Conversations
        #[arg(long, default_value_t = LiveConfig::default().sessions)]
        sessions: usize,
        /// User turns per conversation
        #[arg(long, default_value_t = LiveConfig::default().turns)]
        turns: usize,
        /// Tokens generated per turn
        #[arg(long, default_value_t = LiveConfig::default().max_tokens)]
        max_tokens: usize,
        /// Conversations in flight at once
        #[arg(long, default_value_t = LiveConfig::default().concurrency)]
        concurrency: usize,
        /// KV pool per worker, in blocks of 16 tokens
        #[arg(long, default_value_t = LiveConfig::default().kv_blocks)]
        kv_blocks: usize,
        #[command(flatten)]
        choice: PolicyArgs,
        #[arg(long, default_value = "results/module05_live.json")]
        json: PathBuf,
    },
    /// Print the table of a `live` run's JSON again (and rewrite its .txt).
    ShowLive { json: PathBuf },
    /// Time KV-aware decisions against a large index.
    DecisionCost {
        #[arg(long, default_value_t = 16)]
        workers: u32,
        #[arg(long, default_value_t = 1000)]
        blocks_per_worker: u64,
        #[arg(long, default_value_t = 32)]
        request_blocks: usize,
    },
    /// List the workers registered in etcd.
    Workers {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long, default_value = "/spark-disagg")]
        prefix: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    shared::cli::init_logging();
    match Cli::parse().command {
        Command::Simulate {
            trace: path,
            synthetic,
            limit,
            workers,
            cache_blocks,
            prefill_tokens_per_s,
            decode_ms_per_token,
            speedup,
            choice:
                PolicyArgs {
                    policies,
                    overlap_weight,
                    seed,
                },
            json,
            svg,
        } => {
            let (name, requests) = match (path, synthetic) {
                (Some(path), _) => {
                    let requests = trace::load(&path, limit)?;
                    (
                        path.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned(),
                        requests,
                    )
                }
                (None, true) => {
                    let chats = SyntheticChats {
                        seed,
                        ..Default::default()
                    };
                    let mut requests = chats.generate();
                    requests.truncate(limit.unwrap_or(usize::MAX));
                    ("synthetic multi-turn chats".to_string(), requests)
                }
                (None, false) => bail!(
                    "give --trace PATH (e.g. the Mooncake conversation_trace.jsonl) or --synthetic"
                ),
            };
            if workers == 0 {
                bail!("--workers must be at least 1");
            }
            let mut chosen = Vec::new();
            for p in &policies {
                chosen.push(policy::by_name(p, seed, overlap_weight).with_context(|| {
                    format!(
                        "unknown policy {p:?}; choose from {}",
                        policy::POLICY_NAMES.join(", ")
                    )
                })?);
            }
            let config = SimConfig {
                workers,
                cache_blocks,
                prefill_tokens_per_s,
                decode_s_per_token: decode_ms_per_token / 1e3,
                speedup,
            };
            let bar = ProgressBar::new((requests.len() * chosen.len()) as u64);
            bar.set_style(ProgressStyle::with_template(
                "{bar:40} {pos}/{len} requests routed ({eta})",
            )?);
            let result = sim::compare(&name, &requests, &config, &mut chosen, &|| bar.inc(1));
            bar.finish_and_clear();
            let table = report::table(&result);
            print!("{table}");
            shared::results::write(&json, &result, &table)?;
            let svg = svg.unwrap_or_else(|| json.with_extension("svg"));
            report::write_svg(&result, &svg).map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
            eprintln!("wrote {} (and .txt), {}", json.display(), svg.display());
            Ok(())
        }
        Command::Live {
            model,
            etcd,
            workers,
            sessions,
            turns,
            max_tokens,
            concurrency,
            kv_blocks,
            choice:
                PolicyArgs {
                    policies,
                    overlap_weight,
                    seed,
                },
            json,
        } => {
            if workers == 0 || sessions == 0 || turns == 0 || max_tokens == 0 {
                bail!("--workers, --sessions, --turns and --max-tokens must be at least 1");
            }
            let config = LiveConfig {
                workers,
                sessions,
                turns,
                max_tokens,
                concurrency,
                kv_blocks,
                overlap_weight,
                seed,
            };
            let (endpoint, _private_etcd) = registry::etcd_or_private(&etcd.etcd).await?;
            let loaded = model.load().context("loading the model")?;
            let bar = ProgressBar::new((sessions * turns * policies.len()) as u64);
            bar.set_style(ProgressStyle::with_template(
                "{bar:40} {pos}/{len} turns ({msg}, {eta})",
            )?);
            let results = live::run(
                &loaded.model,
                &loaded.tokenizer,
                &endpoint,
                &config,
                &policies,
                &|policy, _| {
                    bar.set_message(policy.to_string());
                    bar.inc(1)
                },
            )
            .await?;
            bar.finish_and_clear();
            let table = live::table(&config, &results);
            print!("{table}");
            let report = serde_json::json!({
                "model": loaded.source.display().to_string(),
                "device": shared::device::device_name(loaded.model.device()),
                "date": chrono::Local::now().format("%Y-%m-%d").to_string(),
                "config": config,
                "results": results,
            });
            shared::results::write(&json, &report, &table)?;
            eprintln!("wrote {} (and .txt)", json.display());
            Ok(())
        }
        Command::ShowLive { json } => {
            let report = shared::results::read(&json)?;
            let config: LiveConfig = shared::results::field(&report, "config", "live")?;
            let results: Vec<live::LivePolicyResult> =
                shared::results::field(&report, "results", "live")?;
            let table = live::table(&config, &results);
            print!("{table}");
            shared::results::write_table(&json, &table)?;
            Ok(())
        }
        Command::DecisionCost {
            workers,
            blocks_per_worker,
            request_blocks,
        } => {
            if workers == 0 || blocks_per_worker < 2 {
                bail!("need at least 1 worker and 2 blocks per worker");
            }
            let (indexed, us) =
                decision_cost_us(workers, blocks_per_worker, request_blocks, 20_000);
            println!(
                "kv-aware decision: {us:.2} µs with {indexed} blocks indexed over {workers} workers, {request_blocks}-block requests"
            );
            Ok(())
        }
        Command::Workers { etcd, prefix } => {
            let registry = Registry::connect(&etcd.etcd, &prefix).await?;
            let workers = registry.workers().await?;
            if workers.is_empty() {
                println!("no workers registered under {prefix}");
            }
            for w in workers {
                println!(
                    "{:<24} {:<22} {:?} {} blocks",
                    w.name, w.address, w.role, w.capacity_blocks
                );
            }
            Ok(())
        }
    }
}
