//! `module03_tcp`: one request, two processes — prefill here, decode there.
//!
//! ```text
//! cargo run --release -p module03_tcp -- demo                  # both servers on loopback + a workload
//! cargo run --release -p module03_tcp -- decode  --listen 127.0.0.1:7801
//! cargo run --release -p module03_tcp -- prefill --listen 127.0.0.1:7800 --decode 127.0.0.1:7801
//! cargo run --release -p module03_tcp -- client  --prefill 127.0.0.1:7800 --decode 127.0.0.1:7801
//! ```

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use module03_tcp::client::{self, Workload};
use module03_tcp::decode::{one_sided_backend, DecodeServer};
use module03_tcp::prefill::{PrefillServer, DEFAULT_STAGING_BYTES};
use module03_tcp::report::{ModeRun, RunReport};
use module04_rdma::agent::BackendChoice;
use shared::cli::ModelArgs;
use shared::engine::EngineConfig;
use shared::wire::TransferMode;

#[derive(Parser)]
#[command(version, about = "Module 3: disaggregated prefill and decode over TCP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the decode server: receives KV caches, generates the tokens.
    Decode {
        #[arg(long, default_value = "127.0.0.1:7801")]
        listen: String,
        /// Memory for the decode engine's KV pool
        #[arg(long, default_value_t = 1.0)]
        kv_cache_gb: f64,
        /// Also accept one-sided writes into the KV pool (module 4's transfer agent)
        #[arg(long)]
        one_sided: bool,
        /// Where the transfer agent listens [default: the --listen host, any port]
        #[arg(long)]
        agent_listen: Option<String>,
        /// How one-sided writes move: auto (RDMA if a port is active, else
        /// tcp), tcp, ibverbs, ibverbs:DEVICE or cuda-ipc (GPU to GPU)
        #[arg(long, default_value = "auto")]
        transfer_backend: String,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Run the prefill server: runs prompts, ships their KV to the decode server.
    Prefill {
        #[arg(long, default_value = "127.0.0.1:7800")]
        listen: String,
        /// The decode server's address
        #[arg(long, default_value = "127.0.0.1:7801")]
        decode: String,
        /// How one-sided writes move (must match the decode server's):
        /// auto, tcp, ibverbs, ibverbs:DEVICE or cuda-ipc
        #[arg(long, default_value = "auto")]
        transfer_backend: String,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Send a workload and report where the time went.
    Client(ClientArgs),
    /// Print a saved run's table and redraw its plot (next to the JSON, as .svg and .txt).
    Show {
        /// A file written by `client --json` or `demo --json`
        json: PathBuf,
    },
    /// Start a decode and a prefill server on loopback, run the client against them, stop them.
    Demo {
        #[command(flatten)]
        client: WorkloadArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Args)]
struct ClientArgs {
    /// The prefill server (bulk and layerwise modes)
    #[arg(long, default_value = "127.0.0.1:7800")]
    prefill: String,
    /// The decode server (local mode)
    #[arg(long, default_value = "127.0.0.1:7801")]
    decode: String,
    /// How the two servers are connected, for the report (e.g. "netns, 10gbit")
    #[arg(long, default_value = "loopback")]
    link: String,
    #[command(flatten)]
    workload: WorkloadArgs,
}

#[derive(Args, Clone)]
struct WorkloadArgs {
    /// Modes to run, in order: local (decode server alone), bulk, layerwise,
    /// onesided (needs `decode --one-sided`)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local,bulk,layerwise,onesided"
    )]
    modes: Vec<String>,
    /// New tokens per request (exactly this many: end-of-sequence is ignored)
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Requests in flight at once
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// A file with one prompt per line [default: eight built-in prompts]
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Each prompt this many times (more samples for p99)
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    #[arg(long, default_value = "results/module03_tcp.json")]
    json: PathBuf,
    #[arg(long, default_value = "results/module03_tcp.svg")]
    svg: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Decode {
            listen,
            kv_cache_gb,
            one_sided,
            agent_listen,
            transfer_backend,
            model,
        } => {
            let loaded = model.load().context("loading the model")?;
            let config = EngineConfig::with_kv_budget(&loaded.model, (kv_cache_gb * 1e9) as usize);
            let backend = one_sided_backend(
                one_sided,
                &transfer_backend,
                agent_listen,
                &listen,
                loaded.model.device(),
            )?;
            let server =
                DecodeServer::with_one_sided(loaded.model, loaded.tokenizer, config, backend)
                    .context(
                    "starting the decode server (--one-sided on a GPU needs the ibverbs backend \
                 with GPUDirect RDMA; otherwise run with --device cpu or without --one-sided)",
                )?;
            if let Some(backend) = server.transfer_backend() {
                eprintln!("one-sided writes accepted over {backend:?}");
            }
            let listener = bind(&listen).await?;
            eprintln!("decode server listening on {listen}");
            run_until_ctrl_c(server.serve(listener)).await
        }
        Command::Prefill {
            listen,
            decode,
            transfer_backend,
            model,
        } => {
            let loaded = model.load().context("loading the model")?;
            let backend = BackendChoice::parse(&transfer_backend, "127.0.0.1:0")?;
            let server = PrefillServer::with_staging(
                loaded.model,
                loaded.tokenizer,
                Some(decode.clone()),
                DEFAULT_STAGING_BYTES,
                backend,
            )?;
            let listener = bind(&listen).await?;
            eprintln!("prefill server listening on {listen}, decode server at {decode}");
            run_until_ctrl_c(server.serve(listener)).await
        }
        Command::Client(args) => {
            let report =
                run_workload(&args.prefill, &args.decode, &args.link, &args.workload).await?;
            finish(report, &args.workload)
        }
        Command::Show { json } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?;
            let report: RunReport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a module03_tcp result", json.display()))?;
            let table = report.render();
            print!("{table}");
            shared::results::write_table(&json, &table)?;
            let svg = json.with_extension("svg");
            report
                .write_svg(&svg)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
            Ok(())
        }
        Command::Demo { client, model } => {
            let (prefill_port, decode_port) = (free_port()?, free_port()?);
            let decode = format!("127.0.0.1:{decode_port}");
            let prefill = format!("127.0.0.1:{prefill_port}");
            let mut model_flags = vec![
                format!("--device={}", model.device),
                format!("--dtype={}", model.dtype),
            ];
            if let Some(path) = &model.model {
                model_flags.push(format!("--model={}", path.display()));
            }
            eprintln!(
                "starting the decode server on {decode} and the prefill server on {prefill} …"
            );
            let _decode = ChildGuard::spawn(
                &["decode", "--listen", &decode, "--one-sided"],
                &model_flags,
            )?;
            let _prefill = ChildGuard::spawn(
                &["prefill", "--listen", &prefill, "--decode", &decode],
                &model_flags,
            )?;
            wait_for(&decode, Duration::from_secs(120)).await?;
            wait_for(&prefill, Duration::from_secs(120)).await?;
            let report =
                run_workload(&prefill, &decode, "loopback, two processes", &client).await?;
            finish(report, &client)
        }
    }
}

async fn bind(address: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| {
            format!("cannot listen on {address}: is the port free and the address local?")
        })
}

async fn run_until_ctrl_c(
    serve: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<()> {
    tokio::select! {
        result = serve => result.context("accepting connections"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn parse_mode(name: &str) -> Result<TransferMode> {
    Ok(match name {
        "local" => TransferMode::Local,
        "bulk" => TransferMode::Bulk,
        "layerwise" => TransferMode::Layerwise,
        "onesided" => TransferMode::OneSided,
        other => bail!("unknown mode {other:?}: use local, bulk, layerwise or onesided"),
    })
}

async fn run_workload(
    prefill: &str,
    decode: &str,
    link: &str,
    args: &WorkloadArgs,
) -> Result<RunReport> {
    let base = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => client::default_prompts(),
    };
    if base.is_empty() {
        bail!("no prompts to send");
    }
    let prompts: Vec<String> = (0..args.repeat.max(1)).flat_map(|_| base.clone()).collect();
    let mut runs = Vec::new();
    for name in &args.modes {
        let mode = parse_mode(name)?;
        let address = if mode == TransferMode::Local {
            decode
        } else {
            prefill
        };
        eprintln!("{}: {} requests to {address} …", mode.name(), prompts.len());
        let workload = Workload {
            prompts: prompts.clone(),
            max_tokens: args.max_tokens,
            ignore_eos: true,
            concurrency: args.concurrency,
            mode,
        };
        // One unmeasured request first: the first use of a code path pays
        // for lazy initialisation and cold caches on both servers.
        let warm_up = Workload {
            prompts: vec![prompts[0].clone()],
            ..workload.clone()
        };
        client::run(address, &warm_up).await?;
        let results = client::run(address, &workload).await?;
        if let Some(failed) = results.iter().find_map(|r| r.error.as_ref()) {
            eprintln!("{}: a request failed: {failed}", mode.name());
        }
        runs.push(ModeRun::new(mode, results));
    }
    // Greedy decoding: every mode must produce the same tokens.
    if let Some(first) = runs.first() {
        for run in &runs[1..] {
            let same = run
                .results
                .iter()
                .zip(&first.results)
                .all(|(a, b)| a.tokens == b.tokens);
            eprintln!(
                "{} tokens {} {}",
                run.mode.name(),
                if same { "identical to" } else { "DIFFER from" },
                first.mode.name()
            );
        }
        if let Some(r) = first.results.first() {
            eprintln!("example: {:?} → {:?}", r.prompt, r.text);
        }
    }
    Ok(RunReport {
        date: shared::device::today(),
        link: link.to_string(),
        max_tokens: args.max_tokens,
        concurrency: args.concurrency,
        runs,
    })
}

fn finish(report: RunReport, args: &WorkloadArgs) -> Result<()> {
    print!("{}", report.render());
    report
        .write_json(&args.json)
        .with_context(|| format!("writing {}", args.json.display()))?;
    report
        .write_svg(&args.svg)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.svg.display()))?;
    eprintln!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections at `address`.
async fn wait_for(address: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(address).await.is_err() {
        if start.elapsed() > limit {
            bail!(
                "nothing listened on {address} within {limit:?}; see the server's messages above"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A child process of this binary, killed when dropped.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(args: &[&str], extra: &[String]) -> Result<ChildGuard> {
        let exe = std::env::current_exe().context("finding this program")?;
        let child = Process::new(exe)
            .args(args)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `module03_tcp {}`", args.join(" ")))?;
        Ok(ChildGuard(child))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
