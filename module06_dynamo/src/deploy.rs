//! Bringing a whole deployment up on one machine: etcd, worker processes,
//! and the frontend with its router — what `up`, `bench` and the tests share.
//!
//! Workers are separate processes (this same binary, `worker --role …`), as
//! they would be on separate hosts: each loads its own model, owns its own
//! KV pool, and can crash alone. The frontend runs in this process. Every
//! child is started with `kill_on_drop`, so however this process ends, no
//! worker outlives it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use module05_routing::policy;
use module05_routing::registry::{self, Registry, Role};
use module05_routing::router::Router;
use shared::etcd_server::EtcdServer;
use shared::kv::block::DEFAULT_BLOCK_SIZE;
use shared::wire::TransferMode;
use tokio::process::{Child, Command};

use crate::disagg::DisaggPolicy;
use crate::frontend::{Frontend, FrontendConfig};
use crate::worker::role_name;

/// What to start.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub prefill: usize,
    pub decode: usize,
    pub aggregated: usize,
    /// Decode workers accept one-sided KV writes; prefill workers use them.
    pub one_sided: bool,
    /// How prefill workers ship KV when not one-sided.
    pub transfer: TransferMode,
    pub policy: String,
    pub disagg: DisaggPolicy,
    pub kv_cache_gb: f64,
    /// How one-sided writes move (`auto`, `tcp`, `ibverbs…`, `cuda-ipc`),
    /// passed to every worker when `one_sided`.
    pub transfer_backend: String,
    /// `--model/--device/--dtype` as given, passed on to every worker.
    pub model: Option<PathBuf>,
    pub device: String,
    pub dtype: String,
    /// Devices per role, overriding `device`: e.g. prefill on `cuda:0`,
    /// decode (and aggregated) workers on `cuda:1`.
    pub prefill_device: Option<String>,
    pub decode_device: Option<String>,
    /// Where the frontend listens; port 0 picks a free one.
    pub listen: SocketAddr,
    pub api_key: Option<String>,
    /// etcd to use; if nothing answers there, a private one is started.
    pub etcd: String,
}

impl DeploymentSpec {
    /// One prefill and one decode worker, layer-wise TCP transfer,
    /// KV-aware routing, on 127.0.0.1:8000.
    pub fn new(model: Option<PathBuf>) -> Self {
        DeploymentSpec {
            prefill: 1,
            decode: 1,
            aggregated: 0,
            one_sided: false,
            transfer: TransferMode::Layerwise,
            policy: "kv-aware".into(),
            disagg: DisaggPolicy::default(),
            kv_cache_gb: 0.5,
            transfer_backend: "auto".into(),
            model,
            device: "auto".into(),
            dtype: "auto".into(),
            prefill_device: None,
            decode_device: None,
            listen: "127.0.0.1:8000".parse().expect("valid address"),
            api_key: None,
            etcd: "127.0.0.1:2379".into(),
        }
    }
}

impl DeploymentSpec {
    /// The device a worker of `role` runs on.
    pub fn device_of(&self, role: Role) -> &str {
        let chosen = match role {
            Role::Prefill => &self.prefill_device,
            Role::Decode | Role::Aggregated => &self.decode_device,
        };
        chosen.as_deref().unwrap_or(&self.device)
    }
}

/// A worker process.
pub struct WorkerProcess {
    pub name: String,
    pub role: Role,
    pub child: Child,
}

/// A running deployment; dropping it stops every process it started.
pub struct Deployment {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub frontend: Arc<Frontend>,
    pub workers: Vec<WorkerProcess>,
    pub etcd_endpoint: String,
    server: tokio::task::JoinHandle<()>,
    _private_etcd: Option<EtcdServer>,
}

impl Deployment {
    /// Starts everything in `spec`, with `exe` (this binary) for the
    /// workers, and waits until every worker has joined the router.
    pub async fn start(exe: &Path, spec: &DeploymentSpec) -> Result<Deployment> {
        let (etcd_endpoint, private_etcd) = registry::etcd_or_private(&spec.etcd).await?;
        if private_etcd.is_some() {
            eprintln!(
                "no etcd at {}; started a private one at {etcd_endpoint}",
                spec.etcd
            );
        }
        // A namespace of its own, so deployments sharing an etcd never mix.
        let prefix = format!("{}/{}", crate::DEFAULT_PREFIX, std::process::id());
        let model_path = match &spec.model {
            Some(p) => p.clone(),
            None => shared::model::default_model_path().context(
                "no model given: pass --model, set SPARK_DISAGG_MODEL, or run scripts/setup.sh",
            )?,
        };
        let (config, tokenizer) =
            shared::model::load::load_metadata(&model_path).with_context(|| {
                format!(
                    "reading the model's tokenizer from {}",
                    model_path.display()
                )
            })?;

        let roles = std::iter::repeat_n(Role::Prefill, spec.prefill)
            .chain(std::iter::repeat_n(Role::Decode, spec.decode))
            .chain(std::iter::repeat_n(Role::Aggregated, spec.aggregated));
        let mut workers = Vec::new();
        for (i, role) in roles.enumerate() {
            let name = format!("{}-{i}", role_name(role));
            let mut command = Command::new(exe);
            command
                .args(["worker", "--role", role_name(role), "--name", &name])
                .args(["--etcd", &etcd_endpoint, "--prefix", &prefix])
                .args(["--kv-cache-gb", &spec.kv_cache_gb.to_string()])
                .args(["--device", spec.device_of(role), "--dtype", &spec.dtype])
                .arg("--model")
                .arg(&model_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true);
            shared::process::stop_with_parent(command.as_std_mut());
            if spec.one_sided {
                command.args(["--one-sided", "--transfer-backend", &spec.transfer_backend]);
            }
            let child = command
                .spawn()
                .with_context(|| format!("starting worker {name} ({})", exe.display()))?;
            workers.push(WorkerProcess { name, role, child });
        }

        let policy = policy::by_name(&spec.policy, 0, 1.0).with_context(|| {
            format!(
                "unknown policy {:?}; choose from {}",
                spec.policy,
                policy::POLICY_NAMES.join(", ")
            )
        })?;
        let registry = Registry::connect(&etcd_endpoint, &prefix).await?;
        let router = Router::start(&registry, policy, DEFAULT_BLOCK_SIZE).await?;
        let serving = spec.decode + spec.aggregated;
        let mut waited = 0;
        while !router
            .wait_for(serving, spec.prefill, Duration::from_millis(500))
            .await
        {
            for w in &mut workers {
                if let Some(status) = w.child.try_wait()? {
                    bail!(
                        "worker {} exited with {status} while starting; run `module06_dynamo worker --role {}` alone to see why",
                        w.name,
                        role_name(w.role)
                    );
                }
            }
            waited += 1;
            if waited > 240 {
                bail!("the workers did not all register within 2 minutes");
            }
        }
        let transfer = if spec.one_sided {
            TransferMode::OneSided
        } else {
            spec.transfer
        };
        let frontend = Frontend::new(
            tokenizer,
            router,
            FrontendConfig {
                model_name: model_name(&model_path),
                context: config.max_position_embeddings,
                api_key: spec.api_key.clone(),
                disagg: spec.disagg,
                transfer,
                token_timeout: Duration::from_secs(60),
            },
        );
        let listener = tokio::net::TcpListener::bind(spec.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}: is the port free? (--port to change)",
                    spec.listen
                )
            })?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = frontend.app();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Deployment {
            url,
            frontend,
            workers,
            etcd_endpoint,
            server,
            _private_etcd: private_etcd,
        })
    }

    /// Kills worker `name` at once (SIGKILL: a crash, not a shutdown).
    pub async fn kill_worker(&mut self, name: &str) -> Result<()> {
        let worker = self
            .workers
            .iter_mut()
            .find(|w| w.name == name)
            .with_context(|| format!("no worker named {name}"))?;
        worker.child.kill().await?;
        Ok(())
    }

    /// Stops the frontend, then every worker with SIGTERM (they leave the
    /// registry), waiting up to 5 s each before killing.
    pub async fn stop(mut self) {
        self.server.abort();
        self.frontend.close();
        for w in &mut self.workers {
            if let Some(pid) = w.child.id() {
                // SAFETY: plain libc call on a child we own.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
        }
        for w in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(5), w.child.wait())
                .await
                .is_err()
            {
                let _ = w.child.kill().await;
            }
        }
    }
}

/// The name `/v1/models` shows: the file or directory name.
pub fn model_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_runs_on_its_own_device_or_the_common_one() {
        let mut spec = DeploymentSpec::new(None);
        spec.device = "cuda".into();
        assert_eq!(spec.device_of(Role::Prefill), "cuda");
        assert_eq!(spec.device_of(Role::Decode), "cuda");
        spec.prefill_device = Some("cuda:0".into());
        spec.decode_device = Some("cuda:1".into());
        assert_eq!(spec.device_of(Role::Prefill), "cuda:0");
        assert_eq!(spec.device_of(Role::Decode), "cuda:1");
        assert_eq!(spec.device_of(Role::Aggregated), "cuda:1");
    }
}
