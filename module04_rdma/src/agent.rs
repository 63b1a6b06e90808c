//! The transfer agent: registrations, peers, one-sided writes, notifications.
//!
//! The life of a transfer, as in NIXL:
//!
//! 1. the **target** (a decode worker) registers memory — its KV pool — and
//!    publishes its [`AgentMetadata`];
//! 2. the **initiator** (a prefill worker) loads that metadata, which
//!    connects the backend;
//! 3. the initiator posts a list of *(local descriptor → remote descriptor)*
//!    pairs plus a notification; every descriptor is checked against the
//!    regions it names before anything is sent;
//! 4. the backend writes the bytes into the target's memory, the target
//!    checks each write again on arrival, and delivers the notification
//!    after the data;
//! 5. the initiator's call returns when the target has applied everything
//!    (the completion); the target learns of the data from the notification.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::backend::cuda_ipc::CudaIpcBackend;
use crate::backend::ibverbs::IbverbsBackend;
use crate::backend::tcp::TcpBackend;
use crate::backend::{Backend, Registration, Target, WriteOp};
use crate::metadata::{AgentMetadata, BackendKind, ProcessId, RemoteRegion};
use crate::region::{Descriptor, MemoryRegion, RegionId};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent named {0:?} was loaded: call load_remote with its metadata first")]
    UnknownPeer(String),
    #[error("agent {agent:?} has no region {region}")]
    UnknownRegion { agent: String, region: u32 },
    #[error("descriptor {descriptor:?} lies outside its region of {region_len} bytes")]
    OutOfBounds {
        descriptor: Descriptor,
        region_len: u64,
    },
    #[error("a local span of {local} bytes cannot fill a remote span of {remote} bytes")]
    LengthMismatch { local: u64, remote: u64 },
    #[error("agent {peer:?} moves bytes with {theirs:?}, this agent with {ours:?}: give both workers the same --transfer-backend")]
    BackendMismatch {
        peer: String,
        theirs: BackendKind,
        ours: BackendKind,
    },
    #[error("the target refused the transfer: {0}")]
    Remote(String),
    #[error("{0}")]
    Backend(String),
    #[error("no RDMA device to use: {0}")]
    NoRdmaDevice(String),
}

/// A message delivered to the target after the data it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub from: String,
    pub data: Vec<u8>,
}

/// The agent's registrations, shared with the backend's receiving side.
#[derive(Default)]
pub struct Registry {
    regions: RwLock<HashMap<u32, (Arc<MemoryRegion>, Registration)>>,
}

impl Registry {
    /// The region a write may land in, or why it may not.
    pub fn check(
        &self,
        region: u32,
        rkey: u32,
        offset: u64,
        len: u64,
    ) -> Result<Arc<MemoryRegion>, String> {
        let regions = self.regions.read().expect("registry lock");
        let (memory, registration) = regions
            .get(&region)
            .ok_or_else(|| format!("no region {region} is registered"))?;
        if registration.rkey != rkey {
            return Err(format!("wrong key for region {region}"));
        }
        let descriptor = Descriptor::new(RegionId(region), offset, len);
        if !descriptor.fits(memory.len() as u64) {
            return Err(format!(
                "a write of {len} bytes at offset {offset} overruns region {region} ({} bytes)",
                memory.len()
            ));
        }
        Ok(memory.clone())
    }
}

/// Which backend an agent uses.
#[derive(Debug, Clone)]
pub enum BackendChoice {
    /// Emulated one-sided writes over TCP, listening on this address.
    Tcp { listen: String },
    /// RDMA through libibverbs on `device` (the first with an active port
    /// if `None`); `listen` is the side channel for queue-pair set-up and
    /// notifications.
    Ibverbs {
        device: Option<String>,
        listen: String,
    },
    /// GPU to GPU between processes of one host, by CUDA IPC; `listen` is
    /// the side channel for notifications.
    CudaIpc { listen: String },
    /// `Ibverbs` where this machine has an active RDMA port, `Tcp` otherwise.
    Auto { listen: String },
}

impl BackendChoice {
    /// Parses a command-line name (`auto`, `tcp`, `ibverbs`,
    /// `ibverbs:DEVICE` or `cuda-ipc`) with the side channel's listen address.
    pub fn parse(name: &str, listen: &str) -> Result<BackendChoice, AgentError> {
        let listen = listen.to_string();
        match name.split_once(':') {
            None if name == "auto" => Ok(BackendChoice::Auto { listen }),
            None if name == "tcp" => Ok(BackendChoice::Tcp { listen }),
            None if name == "cuda-ipc" => Ok(BackendChoice::CudaIpc { listen }),
            None if name == "ibverbs" => Ok(BackendChoice::Ibverbs {
                device: None,
                listen,
            }),
            Some(("ibverbs", device)) if !device.is_empty() => Ok(BackendChoice::Ibverbs {
                device: Some(device.to_string()),
                listen,
            }),
            _ => Err(AgentError::Backend(format!(
                "unknown transfer backend {name:?}: use auto, tcp, ibverbs, ibverbs:DEVICE (e.g. ibverbs:mlx5_0) or cuda-ipc"
            ))),
        }
    }

    /// Decides `Auto`: ibverbs where module 0's probe finds an active RDMA
    /// port, TCP otherwise. Other choices stay as they are.
    pub fn resolve(self) -> BackendChoice {
        match self {
            BackendChoice::Auto { listen } => {
                let probe = module00_env::rdma::probe();
                match crate::backend::ibverbs::choose_port(&probe, None) {
                    Ok(port) => BackendChoice::Ibverbs {
                        device: Some(port.device),
                        listen,
                    },
                    Err(_) => BackendChoice::Tcp { listen },
                }
            }
            chosen => chosen,
        }
    }
}

/// How long a transfer took and how much it moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferStats {
    pub bytes: u64,
    pub seconds: f64,
}

pub struct TransferAgent {
    name: String,
    backend: Box<dyn Backend>,
    registry: Arc<Registry>,
    notifications: Arc<(Mutex<Vec<Notification>>, Condvar)>,
    remotes: Mutex<HashMap<String, AgentMetadata>>,
    next_region: AtomicU32,
}

impl TransferAgent {
    pub fn new(name: &str, backend: BackendChoice) -> Result<TransferAgent, AgentError> {
        let registry = Arc::new(Registry::default());
        let notifications = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let target = Target {
            registry: registry.clone(),
            notifications: notifications.clone(),
        };
        let backend: Box<dyn Backend> = match backend {
            BackendChoice::Tcp { listen } => Box::new(TcpBackend::start(name, &listen, target)?),
            BackendChoice::Ibverbs { device, listen } => Box::new(IbverbsBackend::start(
                name,
                device.as_deref(),
                &listen,
                target,
            )?),
            BackendChoice::CudaIpc { listen } => {
                Box::new(CudaIpcBackend::start(name, &listen, target)?)
            }
            auto @ BackendChoice::Auto { .. } => return TransferAgent::new(name, auto.resolve()),
        };
        Ok(TransferAgent {
            name: name.to_string(),
            backend,
            registry,
            notifications,
            remotes: Mutex::new(HashMap::new()),
            next_region: AtomicU32::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which backend moves this agent's bytes.
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Makes `region` addressable by peers (RDMA: `ibv_reg_mr`, which pins
    /// it and returns its key; TCP: a random key), so a peer must have been
    /// given this agent's metadata to write.
    pub fn register(&self, region: MemoryRegion) -> Result<RegionId, AgentError> {
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let registration = self.backend.register(id, &region)?;
        self.registry
            .regions
            .write()
            .expect("registry lock")
            .insert(id, (Arc::new(region), registration));
        Ok(RegionId(id))
    }

    /// Withdraws a registration; later writes to it are refused.
    pub fn deregister(&self, id: RegionId) {
        self.registry
            .regions
            .write()
            .expect("registry lock")
            .remove(&id.0);
        self.backend.deregister(id.0);
    }

    /// A registered region, to read what peers wrote (after their notification).
    pub fn region(&self, id: RegionId) -> Option<Arc<MemoryRegion>> {
        self.registry
            .regions
            .read()
            .expect("registry lock")
            .get(&id.0)
            .map(|(m, _)| m.clone())
    }

    /// What peers need to write into this agent's regions.
    pub fn metadata(&self) -> AgentMetadata {
        let regions = self.registry.regions.read().expect("registry lock");
        let mut exposed: Vec<RemoteRegion> = regions
            .iter()
            .map(|(&id, (memory, registration))| RemoteRegion {
                id: RegionId(id),
                len: memory.len() as u64,
                rkey: registration.rkey,
                address: memory.as_ptr() as u64,
                ipc: registration.ipc.clone(),
            })
            .collect();
        exposed.sort_by_key(|r| r.id);
        AgentMetadata {
            name: self.name.clone(),
            backend: self.backend.kind(),
            address: self.backend.address(),
            process: ProcessId::current(),
            regions: exposed,
        }
    }

    /// Loads (or refreshes) a peer's metadata and connects to it.
    pub fn load_remote(&self, peer: &AgentMetadata) -> Result<(), AgentError> {
        if peer.backend != self.backend.kind() {
            return Err(AgentError::BackendMismatch {
                peer: peer.name.clone(),
                theirs: peer.backend,
                ours: self.backend.kind(),
            });
        }
        self.backend.connect(peer)?;
        self.remotes
            .lock()
            .expect("remotes lock")
            .insert(peer.name.clone(), peer.clone());
        Ok(())
    }

    /// The metadata loaded for `peer`, if any.
    pub fn remote_metadata(&self, peer: &str) -> Option<AgentMetadata> {
        self.remotes
            .lock()
            .expect("remotes lock")
            .get(peer)
            .cloned()
    }

    /// Writes each local span into its remote span at `peer`, then delivers
    /// `notification`; returns when the peer has applied all of it.
    pub fn write(
        &self,
        peer: &str,
        pairs: &[(Descriptor, Descriptor)],
        notification: &[u8],
    ) -> Result<TransferStats, AgentError> {
        let remote = self
            .remotes
            .lock()
            .expect("remotes lock")
            .get(peer)
            .cloned()
            .ok_or_else(|| AgentError::UnknownPeer(peer.to_string()))?;
        // Check everything before moving a byte.
        let mut held = Vec::with_capacity(pairs.len());
        let mut checked = Vec::with_capacity(pairs.len());
        for (local, target) in pairs {
            if local.len != target.len {
                return Err(AgentError::LengthMismatch {
                    local: local.len,
                    remote: target.len,
                });
            }
            let memory = self.region(local.region).ok_or(AgentError::UnknownRegion {
                agent: self.name.clone(),
                region: local.region.0,
            })?;
            if !local.fits(memory.len() as u64) {
                return Err(AgentError::OutOfBounds {
                    descriptor: *local,
                    region_len: memory.len() as u64,
                });
            }
            let exposed = remote
                .region(target.region)
                .ok_or(AgentError::UnknownRegion {
                    agent: peer.to_string(),
                    region: target.region.0,
                })?;
            if !target.fits(exposed.len) {
                return Err(AgentError::OutOfBounds {
                    descriptor: *target,
                    region_len: exposed.len,
                });
            }
            // The key and address are all a write needs of the remote region.
            checked.push((*local, *target, exposed.rkey, exposed.address));
            held.push(memory);
        }
        let ops: Vec<WriteOp<'_>> = checked
            .iter()
            .zip(&held)
            .map(|((local, target, rkey, address), memory)| WriteOp {
                local: memory,
                local_region: local.region.0,
                local_offset: local.offset,
                len: local.len,
                region: target.region.0,
                rkey: *rkey,
                offset: target.offset,
                remote_address: address + target.offset,
            })
            .collect();
        let start = Instant::now();
        self.backend.write(peer, &ops, notification)?;
        Ok(TransferStats {
            bytes: pairs.iter().map(|(l, _)| l.len).sum(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Notifications received so far (and forgets them).
    pub fn take_notifications(&self) -> Vec<Notification> {
        std::mem::take(&mut *self.notifications.0.lock().expect("notification lock"))
    }

    /// Waits up to `timeout` for the next notification.
    pub fn wait_notification(&self, timeout: Duration) -> Option<Notification> {
        let (queue, arrived) = &*self.notifications;
        let guard = queue.lock().expect("notification lock");
        let (mut guard, _) = arrived
            .wait_timeout_while(guard, timeout, |q| q.is_empty())
            .expect("notification lock");
        (!guard.is_empty()).then(|| guard.remove(0))
    }
}
