//! `module00_env`: is this machine ready for the course?
//!
//! ```text
//! cargo run --release -p module00_env                          # probe everything, verdict per module
//! cargo run --release -p module00_env -- --json results/env.json
//! cargo run --release -p module00_env -- serve --listen 0.0.0.0:7700     # on node A
//! cargo run --release -p module00_env -- check --peer 10.0.0.1:7700      # on node B
//! cargo run --release -p module00_env -- show results/h100/module00_env.json
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use module00_env::net::{self, NetCheck, NetCheckConfig};
use module00_env::report::{EnvReport, ModelProbe, Probes};
use module00_env::{etcd, gpu, libtorch, rdma};
use shared::cli::EtcdArgs;
use shared::device::{self, DeviceChoice, DtypeChoice};

#[derive(Parser)]
#[command(
    version,
    about = "Module 0: check the GPU, libtorch, RDMA, network and etcd; a verdict per module",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    report: ReportArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Answer network checks from another node (runs until Ctrl-C).
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:7700
        #[arg(long, default_value = "0.0.0.0:7700")]
        listen: String,
    },
    /// Measure round trip and throughput to a node running `serve`.
    Check {
        #[command(flatten)]
        net: NetArgs,
        /// Also write the result as JSON
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print a report or network check saved with --json (the book's come from here).
    Show {
        /// A file written by `module00_env --json` or `module00_env check --json`
        json: PathBuf,
    },
}

#[derive(Args)]
struct ReportArgs {
    /// Also write the whole report as JSON
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the timed matmul and memory copy
    #[arg(long)]
    no_bench: bool,
    /// Device to time: auto (the first GPU, else the CPU), cpu or cuda:N
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Include a network check against a node running `module00_env serve`
    #[arg(long)]
    peer: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Model file to look for [default: $SPARK_DISAGG_MODEL]
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct NetArgs {
    /// host:port of a node running `module00_env serve`
    #[arg(long)]
    peer: String,
    /// Time limit for the pings, and again for each direction of the throughput test
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Byte limit for each direction, in MiB
    #[arg(long, default_value_t = 4096)]
    max_mib: u64,
}

impl NetArgs {
    fn config(&self) -> NetCheckConfig {
        NetCheckConfig {
            duration: Duration::from_secs_f64(self.seconds),
            max_bytes: self.max_mib << 20,
            ..NetCheckConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Serve { listen }) => serve(&listen).await,
        Some(Command::Check { net, json }) => {
            eprintln!("checking the network to {} …", net.peer);
            let result = net::check(&net.peer, net.config()).await?;
            println!("{}", module00_env::report::network_line(&result));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Some(Command::Show { json }) => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?;
            if let Ok(saved) = serde_json::from_str::<EnvReport>(&text) {
                // Verdicts are recomputed, so a saved report shows today's rules.
                print!("{}", EnvReport::new(saved.probes).render());
            } else if let Ok(check) = serde_json::from_str::<NetCheck>(&text) {
                println!("{}", module00_env::report::network_line(&check));
            } else {
                bail!(
                    "{} is neither a report (`module00_env --json`) nor a network check \
                     (`module00_env check --json`)",
                    json.display()
                );
            }
            Ok(())
        }
        None => report(cli.report).await,
    }
}

async fn serve(listen: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("cannot listen on {listen}: is the port free and the address local?")
        })?;
    println!(
        "answering network checks on {}; on the other node run: module00_env check --peer <this host>:{}",
        listener.local_addr()?,
        listener.local_addr()?.port()
    );
    tokio::select! {
        result = net::serve(listener) => result.context("accepting connections"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

async fn report(args: ReportArgs) -> Result<()> {
    // CUDA must be opened before anything asks libtorch about it.
    let _ = device::load_cuda_runtime();
    let etcd = etcd::probe(&args.etcd.etcd, Duration::from_secs(2));
    let network = async {
        match &args.peer {
            Some(peer) => {
                eprintln!("checking the network to {peer} …");
                Some(net::check(peer, NetCheckConfig::default()).await)
            }
            None => None,
        }
    };
    let (etcd, network) = tokio::join!(etcd, network);
    let network = network.transpose()?;

    let compute = if args.no_bench {
        None
    } else {
        let (device, _) = device::resolve(args.device, DtypeChoice::Auto)?;
        eprintln!(
            "timing a matmul and a memory copy on {} …",
            device::device_name(device)
        );
        Some(
            tokio::task::spawn_blocking(move || {
                libtorch::measure_compute(device, libtorch::DEFAULT_BUDGET)
            })
            .await?,
        )
    };

    let model_path = args.model.or_else(shared::model::default_model_path);
    let report = EnvReport::new(Probes {
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        date: device::today(),
        gpu: gpu::probe(),
        libtorch: libtorch::probe(),
        compute,
        rdma: rdma::probe(),
        etcd,
        model: ModelProbe::check(model_path.as_deref()),
        network,
    });
    print!("{}", report.render());
    if let Some(path) = args.json {
        report
            .write_json(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
