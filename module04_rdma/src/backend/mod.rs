//! Backends move the bytes; the agent decides what moves where.
//!
//! A backend gets each write already checked against the peer's metadata
//! (the initiator side) and must check it again on arrival (the target
//! side: never trust the wire — RDMA hardware checks the memory
//! registration, the TCP backend's receiving thread checks the registry).
//! Writes posted together complete together; the notification is delivered
//! after the data it follows.

pub mod channel;
pub mod cuda_ipc;
pub mod ibverbs;
pub mod tcp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::agent::{AgentError, Notification, Registry};
use crate::metadata::{AgentMetadata, BackendKind};
use crate::region::MemoryRegion;
use shared::cuda_ipc::IpcHandle;

/// One write: a local span to a remote span (both already bounds-checked).
pub struct WriteOp<'a> {
    /// The local registration the bytes come from, and its number (RDMA
    /// needs the registration's `lkey`).
    pub local: &'a MemoryRegion,
    pub local_region: u32,
    pub local_offset: u64,
    pub len: u64,
    /// The remote span: by region and offset (TCP) or by the target's
    /// virtual address (RDMA), with the region's key.
    pub region: u32,
    pub rkey: u32,
    pub offset: u64,
    pub remote_address: u64,
}

impl WriteOp<'_> {
    /// The local bytes, for a backend whose CPU moves them.
    ///
    /// # Safety
    /// The local span must be host memory nobody writes during the transfer
    /// (the initiator owns its registrations).
    pub unsafe fn host_bytes(&self) -> &[u8] {
        self.local
            .bytes(self.local_offset as usize, self.len as usize)
    }
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Where peers reach this agent.
    fn address(&self) -> String;
    /// Makes `memory` writable by peers and returns what they need to
    /// address it (RDMA: `ibv_reg_mr`, which pins the pages and gives the
    /// remote key; CUDA IPC: the allocation's handle).
    fn register(&self, region: u32, memory: &MemoryRegion) -> Result<Registration, AgentError>;
    /// Undoes [`Backend::register`].
    fn deregister(&self, region: u32);
    /// Opens the connection to a peer whose metadata was loaded.
    fn connect(&self, peer: &AgentMetadata) -> Result<(), AgentError>;
    /// Posts `ops` to `peer`, then `notification`, and returns once the peer
    /// has applied all of them (the completion).
    fn write(&self, peer: &str, ops: &[WriteOp<'_>], notification: &[u8])
        -> Result<(), AgentError>;
}

/// What a backend made of a registration: the key a write must present, and
/// for the CUDA IPC backend the handle peers map the memory with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub rkey: u32,
    pub ipc: Option<IpcHandle>,
}

impl Registration {
    /// A registration addressed by key alone (the TCP and RDMA backends).
    pub fn keyed(rkey: u32) -> Registration {
        Registration { rkey, ipc: None }
    }
}

/// What a backend needs from its agent: the registrations to check
/// incoming writes against, and where to deliver notifications.
#[derive(Clone)]
pub struct Target {
    pub registry: Arc<Registry>,
    pub notifications: Arc<(std::sync::Mutex<Vec<Notification>>, std::sync::Condvar)>,
}

/// A key that is hard to guess without the metadata (not cryptographic:
/// RDMA rkeys are not secrets either, only unguessable in practice).
fn random_key(region: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(region);
    hasher.finish() as u32
}

/// The connection to `peer` from a backend's table of connected peers.
fn connected<P: Clone>(peers: &Mutex<HashMap<String, P>>, peer: &str) -> Result<P, AgentError> {
    peers
        .lock()
        .expect("peers lock")
        .get(peer)
        .cloned()
        .ok_or_else(|| AgentError::UnknownPeer(peer.to_string()))
}
