//! Backends move the bytes; the agent decides what moves where.
//!
//! A backend gets each write already checked against the peer's metadata
//! (the initiator side) and must check it again on arrival (the target
//! side: never trust the wire). Writes posted together complete together;
//! the notification is delivered after the data it follows.

pub mod tcp;

use std::sync::Arc;

use crate::agent::{AgentError, Notification, Registry};
use crate::metadata::{AgentMetadata, BackendKind};

/// One write: local bytes to a remote span (already bounds-checked).
pub struct WriteOp<'a> {
    pub data: &'a [u8],
    pub region: u32,
    pub rkey: u32,
    pub offset: u64,
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Where peers reach this agent.
    fn address(&self) -> String;
    /// Opens the connection to a peer whose metadata was loaded.
    fn connect(&self, peer: &AgentMetadata) -> Result<(), AgentError>;
    /// Posts `ops` to `peer`, then `notification`, and returns once the peer
    /// has applied all of them (the completion).
    fn write(&self, peer: &str, ops: &[WriteOp<'_>], notification: &[u8])
        -> Result<(), AgentError>;
}

/// What a backend needs from its agent: the registrations to check
/// incoming writes against, and where to deliver notifications.
#[derive(Clone)]
pub struct Target {
    pub registry: Arc<Registry>,
    pub notifications: Arc<(std::sync::Mutex<Vec<Notification>>, std::sync::Condvar)>,
}
