//! Worker discovery in etcd.
//!
//! A worker puts `PREFIX/workers/NAME` → its [`WorkerInfo`] (JSON) under a
//! **lease**: a time-to-live that the worker keeps renewing. If the worker
//! dies — crash, kill -9, network partition — the renewals stop, the lease
//! expires, and etcd deletes the key by itself. The router **watches** the
//! prefix and sees joins (puts) and leaves (deletes) as they happen, so no
//! one has to tell it that a worker is gone. This is how Dynamo (and
//! Kubernetes' endpoints) do membership.
//!
//! KV events do *not* go through etcd: etcd replicates every write through
//! Raft to disk, which suits a membership change a minute, not thousands
//! of block events a second. Workers stream those to the router directly
//! (see [`crate::index`]); etcd only says who to listen to.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Prefill,
    Decode,
    Aggregated,
}

/// What a worker publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    /// Where it serves requests (and streams its KV events).
    pub address: String,
    pub role: Role,
    /// KV-cache capacity, in blocks.
    pub capacity_blocks: usize,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    Joined(WorkerInfo),
    Left { name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach etcd at {endpoint}: {source}. Start one with ./scripts/etcd.sh, or point --etcd (or SPARK_DISAGG_ETCD) at yours")]
    Unreachable {
        endpoint: String,
        source: etcd_client::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("no etcd answered at {endpoint}, and a private one could not start: {message}")]
    NoEtcd { endpoint: String, message: String },
    #[error("a worker entry under {key} is not valid JSON: {message}")]
    BadEntry { key: String, message: String },
}

#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
}

/// A live registration: renews its lease until dropped or revoked.
pub struct Registration {
    /// The current lease (a new one after a lost lease is replaced).
    lease: Arc<AtomicI64>,
    keep_alive: tokio::task::JoinHandle<()>,
    client: Client,
}

impl Registration {
    /// Leaves at once (a clean shutdown): the key disappears now, not at expiry.
    pub async fn revoke(mut self) -> Result<(), RegistryError> {
        self.keep_alive.abort();
        self.client
            .lease_revoke(self.lease.load(Ordering::SeqCst))
            .await?;
        Ok(())
    }
}

impl Drop for Registration {
    /// Stops renewing; the key disappears when the lease expires — what a
    /// crash looks like to everyone else.
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl Registry {
    pub async fn connect(endpoint: &str, prefix: &str) -> Result<Registry, RegistryError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        let unreachable = |source| RegistryError::Unreachable {
            endpoint: endpoint.to_string(),
            source,
        };
        let mut client = Client::connect([endpoint], Some(options))
            .await
            .map_err(unreachable)?;
        // Connecting is lazy; ask something to know etcd is really there.
        client.status().await.map_err(unreachable)?;
        Ok(Registry {
            client,
            prefix: format!("{}/workers/", prefix.trim_end_matches('/')),
        })
    }

    /// Publishes `info` under a lease of `ttl` seconds and keeps renewing it
    /// (every third of the TTL). If the lease is lost while the worker lives
    /// — a stall longer than the TTL, or etcd restarting — the worker
    /// registers again under a new lease rather than vanish for good.
    pub async fn register(
        &self,
        info: &WorkerInfo,
        ttl: i64,
    ) -> Result<Registration, RegistryError> {
        let mut client = self.client.clone();
        let key = format!("{}{}", self.prefix, info.name);
        let value = serde_json::to_string(info).expect("worker info serialises");
        let lease = Arc::new(AtomicI64::new(
            put_under_lease(&mut client, &key, &value, ttl).await?,
        ));
        let period = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
        let (name, current) = (info.name.clone(), lease.clone());
        let mut renewing = client.clone();
        let keep_alive = tokio::spawn(async move {
            loop {
                let why =
                    renew_until_lost(&mut renewing, current.load(Ordering::SeqCst), period).await;
                tracing::warn!(worker = %name, %why, "lease lost; registering again");
                loop {
                    match put_under_lease(&mut renewing, &key, &value, ttl).await {
                        Ok(id) => {
                            current.store(id, Ordering::SeqCst);
                            break;
                        }
                        Err(_) => tokio::time::sleep(period).await,
                    }
                }
            }
        });
        Ok(Registration {
            lease,
            keep_alive,
            client,
        })
    }

    /// The workers registered now.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, RegistryError> {
        Ok(self.snapshot().await?.0)
    }

    /// The workers registered now, and the etcd revision they were read at.
    async fn snapshot(&self) -> Result<(Vec<WorkerInfo>, i64), RegistryError> {
        let response = self
            .client
            .clone()
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let workers = response
            .kvs()
            .iter()
            .map(|kv| parse(kv.key_str().unwrap_or_default(), kv.value()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((workers, response.header().map_or(0, |h| h.revision())))
    }

    // ANCHOR: watch
    /// The current workers, and every join and leave from then on.
    pub async fn watch(
        &self,
    ) -> Result<(Vec<WorkerInfo>, mpsc::Receiver<Membership>), RegistryError> {
        let (workers, revision) = self.snapshot().await?;
        // Watch from just after the snapshot: no change is missed or seen twice.
        let revision = revision + 1;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let mut stream = self
            .client
            .clone()
            .watch(self.prefix.as_str(), Some(options))
            .await?;
        let prefix = self.prefix.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(response)) = stream.message().await {
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let key = kv.key_str().unwrap_or_default();
                    let change = match event.event_type() {
                        EventType::Put => match parse(key, kv.value()) {
                            Ok(info) => Membership::Joined(info),
                            Err(_) => continue,
                        },
                        EventType::Delete => Membership::Left {
                            name: key.trim_start_matches(prefix.as_str()).to_string(),
                        },
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok((workers, rx))
    }
    // ANCHOR_END: watch
}

/// The etcd at `endpoint` if one answers there; otherwise a private etcd
/// started now on free loopback ports (deleted when the returned server is
/// dropped), so a demo runs on a machine where nobody started one.
/// Returns the endpoint to use.
pub async fn etcd_or_private(
    endpoint: &str,
) -> Result<(String, Option<shared::etcd_server::EtcdServer>), RegistryError> {
    match Registry::connect(endpoint, "/").await {
        Ok(_) => Ok((endpoint.to_string(), None)),
        Err(RegistryError::Unreachable { .. }) => {
            let server =
                shared::etcd_server::EtcdServer::start().map_err(|e| RegistryError::NoEtcd {
                    endpoint: endpoint.to_string(),
                    message: e.to_string(),
                })?;
            tracing::info!(endpoint = %server.endpoint, "no etcd at {endpoint}; started a private one");
            Ok((server.endpoint.clone(), Some(server)))
        }
        Err(e) => Err(e),
    }
}

/// Grants a lease of `ttl` seconds and puts `key` under it; returns the lease.
async fn put_under_lease(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: i64,
) -> Result<i64, RegistryError> {
    let lease = client.lease_grant(ttl, None).await?.id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// Renews `lease` every `period` until a renewal fails or etcd says the
/// lease is gone; returns why.
async fn renew_until_lost(client: &mut Client, lease: i64, period: Duration) -> String {
    let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) => return e.to_string(),
    };
    loop {
        if let Err(e) = keeper.keep_alive().await {
            return e.to_string();
        }
        match responses.message().await {
            Ok(Some(r)) if r.ttl() > 0 => {}
            Ok(Some(_)) => return "the lease expired before it was renewed".into(),
            Ok(None) => return "etcd closed the keep-alive stream".into(),
            Err(e) => return e.to_string(),
        }
        tokio::time::sleep(period).await;
    }
}

fn parse(key: &str, value: &[u8]) -> Result<WorkerInfo, RegistryError> {
    serde_json::from_slice(value).map_err(|e| RegistryError::BadEntry {
        key: key.to_string(),
        message: e.to_string(),
    })
}
