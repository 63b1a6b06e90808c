//! One-sided writes emulated over TCP.
//!
//! Each agent listens on a socket. For every connection a thread plays the
//! part of the target's RDMA NIC: it reads a write's header (region, key,
//! offset, length), checks it against the registrations, and then reads the
//! payload from the socket **directly into the registered memory** — the
//! socket read is the only copy, as the NIC's DMA would be. The
//! application on the target side does nothing until a notification
//! arrives. The frames are the side channel's ([`super::channel`]).

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::Mutex;

use super::channel::{self, Writes};
use super::{random_key, Backend, Registration, Target, WriteOp};
use crate::agent::AgentError;
use crate::metadata::{AgentMetadata, BackendKind};
use crate::region::{Location, MemoryRegion};

pub struct TcpBackend {
    name: String,
    address: String,
    peers: Mutex<HashMap<String, Mutex<TcpStream>>>,
}

impl TcpBackend {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and serves incoming writes into `target`.
    pub fn start(name: &str, listen: &str, target: Target) -> Result<TcpBackend, AgentError> {
        let address = channel::listen(name, listen, move |stream| {
            channel::serve(stream, target.clone(), Writes::Accepted)
        })?;
        Ok(TcpBackend {
            name: name.to_string(),
            address,
            peers: Mutex::new(HashMap::new()),
        })
    }
}

impl Backend for TcpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tcp
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    /// Nothing to tell the hardware; the key is random, so only a peer
    /// given this agent's metadata can write.
    fn register(&self, region: u32, memory: &MemoryRegion) -> Result<Registration, AgentError> {
        if let Location::Cuda(device) = memory.location() {
            return Err(AgentError::Backend(format!(
                "the TCP backend moves bytes with the CPU and cannot register memory of cuda:{device}: \
                 register a host staging buffer, or use the ibverbs backend with GPUDirect RDMA"
            )));
        }
        Ok(Registration::keyed(random_key(region)))
    }

    fn deregister(&self, _region: u32) {}

    fn connect(&self, peer: &AgentMetadata) -> Result<(), AgentError> {
        let stream = channel::connect(&peer.name, &peer.address)?;
        self.peers
            .lock()
            .expect("peers lock")
            .insert(peer.name.clone(), Mutex::new(stream));
        Ok(())
    }

    fn write(
        &self,
        peer: &str,
        ops: &[WriteOp<'_>],
        notification: &[u8],
    ) -> Result<(), AgentError> {
        let peers = self.peers.lock().expect("peers lock");
        let stream = peers
            .get(peer)
            .ok_or_else(|| AgentError::UnknownPeer(peer.to_string()))?;
        let mut stream = stream.lock().expect("stream lock");
        channel::post(&mut stream, peer, &self.name, ops, notification)
    }
}
