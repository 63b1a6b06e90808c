//! A worker process: one model, one role, registered in etcd.
//!
//! * `decode` — module 3's decode server: continuous batching over a paged
//!   KV pool; takes prompts' KV from prefill workers (framed, or written
//!   one-sided into its pool with `--one-sided`), and prefills short
//!   prompts itself;
//! * `prefill` — module 3's prefill server: runs prompts and ships their KV
//!   to whichever decode worker the frontend names;
//! * `aggregated` — the same server as `decode`, registered so the frontend
//!   never sends it remote prefills: the single-node baseline.
//!
//! The worker listens *before* it registers, so a router that sees it join
//! can connect at once; it revokes its lease on Ctrl-C or SIGTERM, so it
//! leaves the router's view immediately rather than when the lease expires.

use anyhow::{Context, Result};
use clap::Args;
use module03_tcp::decode::{one_sided_backend, DecodeServer};
use module03_tcp::prefill::{PrefillServer, DEFAULT_STAGING_BYTES};
use module04_rdma::agent::BackendChoice;
use module05_routing::registry::{Registry, Role, WorkerInfo};
use shared::cli::{EtcdArgs, ModelArgs};
use shared::engine::EngineConfig;
use tokio::net::TcpListener;

/// Seconds a worker's lease lives without renewal: how long a crashed
/// worker stays registered (the router drops it sooner, when its KV event
/// stream breaks).
pub const LEASE_TTL_S: i64 = 5;

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// prefill, decode or aggregated
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// Where to serve requests (port 0: any free port)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The address others should dial, if not the one listened on (e.g. behind NAT)
    #[arg(long)]
    pub advertise: Option<String>,
    /// Registry name [default: ROLE-PID]
    #[arg(long)]
    pub name: Option<String>,
    /// Memory for the KV pool (decode and aggregated)
    #[arg(long, default_value_t = 0.5)]
    pub kv_cache_gb: f64,
    /// Accept one-sided KV writes into the pool (decode)
    #[arg(long)]
    pub one_sided: bool,
    /// How one-sided writes move: auto, tcp, ibverbs, ibverbs:DEVICE or
    /// cuda-ipc (GPU to GPU on one host; prefill and decode on GPUs)
    #[arg(long, default_value = "auto")]
    pub transfer_backend: String,
    #[arg(long, default_value = crate::DEFAULT_PREFIX)]
    pub prefix: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn parse_role(name: &str) -> Result<Role, String> {
    match name {
        "prefill" => Ok(Role::Prefill),
        "decode" => Ok(Role::Decode),
        "aggregated" => Ok(Role::Aggregated),
        other => Err(format!(
            "unknown role {other:?}: use prefill, decode or aggregated"
        )),
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Aggregated => "aggregated",
    }
}

/// Runs a worker until Ctrl-C or SIGTERM.
pub async fn run(args: WorkerArgs) -> Result<()> {
    let registry = Registry::connect(&args.etcd.etcd, &args.prefix).await?;
    let loaded = args.model.load().context("loading the model")?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = match &args.advertise {
        Some(a) => a.clone(),
        None => listener.local_addr()?.to_string(),
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", role_name(args.role), std::process::id()));
    let (serve, capacity_blocks) = match args.role {
        Role::Prefill => {
            let backend = BackendChoice::parse(&args.transfer_backend, "127.0.0.1:0")?;
            let server = PrefillServer::with_staging(
                loaded.model,
                loaded.tokenizer,
                None,
                DEFAULT_STAGING_BYTES,
                backend,
            )?;
            (tokio::spawn(server.serve(listener)), 0)
        }
        Role::Decode | Role::Aggregated => {
            let config =
                EngineConfig::with_kv_budget(&loaded.model, (args.kv_cache_gb * 1e9) as usize);
            let blocks = config.num_blocks;
            let backend = one_sided_backend(
                args.one_sided && args.role == Role::Decode,
                &args.transfer_backend,
                None,
                &args.listen,
                loaded.model.device(),
            )?;
            let server =
                DecodeServer::with_one_sided(loaded.model, loaded.tokenizer, config, backend)?;
            (tokio::spawn(server.serve(listener)), blocks)
        }
    };
    let info = WorkerInfo {
        name: name.clone(),
        address: address.clone(),
        role: args.role,
        capacity_blocks,
    };
    let registration = registry.register(&info, LEASE_TTL_S).await?;
    println!(
        "worker {name} ({}) serving on {address}",
        role_name(args.role)
    );
    tokio::select! {
        result = serve => {
            result.context("the server task failed")?.context("accepting connections")?;
        }
        _ = shutdown_signal() => {}
    }
    // On Ctrl-C in a terminal, etcd (same process group) may be stopping
    // too; then the lease simply expires, which is just as correct.
    match tokio::time::timeout(std::time::Duration::from_secs(2), registration.revoke()).await {
        Ok(Ok(())) => {}
        _ => eprintln!(
            "worker {name}: could not leave etcd at once; its lease expires in {LEASE_TTL_S} s"
        ),
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM (what `kill`, systemd and the `up` command send).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
