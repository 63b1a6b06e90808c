//! One-sided writes emulated over TCP.
//!
//! Each agent listens on a socket. For every connection a thread plays the
//! part of the target's RDMA NIC: it reads a write's header (region, key,
//! offset, length), checks it against the registrations, and then reads the
//! payload from the socket **directly into the registered memory** — the
//! socket read is the only copy, as the NIC's DMA would be. The
//! application on the target side does nothing until a notification arrives.
//!
//! ```text
//! WRITE   [1][region u32][rkey u32][offset u64][len u64][len bytes]
//! NOTIFY  [2][from-len u16][from][len u32][bytes]      then the target answers
//! DONE    [3] (all writes applied)  or  FAIL [4][len u32][reason]
//! ```
//!
//! A write that fails the check is answered with FAIL and the connection is
//! closed — a real queue pair goes to the error state on a remote access
//! error the same way.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;

use super::{Backend, Target, WriteOp};
use crate::agent::{AgentError, Notification};
use crate::metadata::{AgentMetadata, BackendKind};

const OP_WRITE: u8 = 1;
const OP_NOTIFY: u8 = 2;
const REPLY_DONE: u8 = 3;
const REPLY_FAIL: u8 = 4;
/// Notifications are small messages, not a data path.
const MAX_NOTIFICATION: u32 = 1 << 20;

pub struct TcpBackend {
    name: String,
    address: String,
    peers: Mutex<HashMap<String, Mutex<TcpStream>>>,
}

impl TcpBackend {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and serves incoming writes into `target`.
    pub fn start(name: &str, listen: &str, target: Target) -> Result<TcpBackend, AgentError> {
        let listener = TcpListener::bind(listen)
            .map_err(|e| AgentError::Backend(format!("cannot listen on {listen}: {e}")))?;
        let address = listener
            .local_addr()
            .map_err(|e| AgentError::Backend(e.to_string()))?
            .to_string();
        std::thread::Builder::new()
            .name(format!("{name}-nic"))
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let target = target.clone();
                    std::thread::spawn(move || serve_connection(stream, target));
                }
            })
            .map_err(|e| AgentError::Backend(e.to_string()))?;
        Ok(TcpBackend {
            name: name.to_string(),
            address,
            peers: Mutex::new(HashMap::new()),
        })
    }
}

/// The target's "NIC": applies writes to registered memory, queues notifications.
fn serve_connection(stream: TcpStream, target: Target) {
    let _ = stream.set_nodelay(true);
    let Ok(mut replies) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let fail = |replies: &mut TcpStream, reason: String| {
        let mut frame = vec![REPLY_FAIL];
        frame.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        frame.extend_from_slice(reason.as_bytes());
        let _ = replies.write_all(&frame);
    };
    loop {
        let mut op = [0u8; 1];
        if reader.read_exact(&mut op).is_err() {
            return; // the initiator closed the connection
        }
        match op[0] {
            // ANCHOR: nic_write
            OP_WRITE => {
                let mut header = [0u8; 24];
                if reader.read_exact(&mut header).is_err() {
                    return;
                }
                let region = u32::from_le_bytes(header[0..4].try_into().expect("4"));
                let rkey = u32::from_le_bytes(header[4..8].try_into().expect("4"));
                let offset = u64::from_le_bytes(header[8..16].try_into().expect("8"));
                let len = u64::from_le_bytes(header[16..24].try_into().expect("8"));
                match target.registry.check(region, rkey, offset, len) {
                    // SAFETY: the span lies inside a live registration (just
                    // checked); its owner promised not to touch it until notified.
                    Ok(memory) => {
                        let span = unsafe { memory.bytes_mut(offset as usize, len as usize) };
                        if reader.read_exact(span).is_err() {
                            return;
                        }
                    }
                    Err(reason) => return fail(&mut replies, reason),
                }
            }
            // ANCHOR_END: nic_write
            OP_NOTIFY => {
                let mut len = [0u8; 2];
                if reader.read_exact(&mut len).is_err() {
                    return;
                }
                let mut from = vec![0u8; u16::from_le_bytes(len) as usize];
                let mut size = [0u8; 4];
                if reader.read_exact(&mut from).is_err() || reader.read_exact(&mut size).is_err() {
                    return;
                }
                let size = u32::from_le_bytes(size);
                if size > MAX_NOTIFICATION {
                    return fail(&mut replies, format!("a notification of {size} bytes exceeds the {MAX_NOTIFICATION}-byte cap"));
                }
                let mut data = vec![0u8; size as usize];
                if reader.read_exact(&mut data).is_err() {
                    return;
                }
                // An empty notification only asks for the completion.
                if !data.is_empty() {
                    let (queue, arrived) = &*target.notifications;
                    queue.lock().expect("notification lock").push(Notification {
                        from: String::from_utf8_lossy(&from).into_owned(),
                        data,
                    });
                    arrived.notify_all();
                }
                if replies.write_all(&[REPLY_DONE]).is_err() {
                    return;
                }
            }
            other => return fail(&mut replies, format!("unknown operation {other}")),
        }
    }
}

impl Backend for TcpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tcp
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn connect(&self, peer: &AgentMetadata) -> Result<(), AgentError> {
        let stream = TcpStream::connect(&peer.address).map_err(|e| {
            AgentError::Backend(format!(
                "cannot reach agent {} at {}: {e}",
                peer.name, peer.address
            ))
        })?;
        stream
            .set_nodelay(true)
            .map_err(|e| AgentError::Backend(e.to_string()))?;
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
        let broken = |e: std::io::Error| {
            AgentError::Backend(format!("the connection to {peer} failed: {e}"))
        };
        {
            let mut out = BufWriter::with_capacity(1 << 16, &mut *stream);
            for op in ops {
                let mut header = [0u8; 25];
                header[0] = OP_WRITE;
                header[1..5].copy_from_slice(&op.region.to_le_bytes());
                header[5..9].copy_from_slice(&op.rkey.to_le_bytes());
                header[9..17].copy_from_slice(&op.offset.to_le_bytes());
                header[17..25].copy_from_slice(&(op.data.len() as u64).to_le_bytes());
                out.write_all(&header).map_err(broken)?;
                out.write_all(op.data).map_err(broken)?;
            }
            out.write_all(&[OP_NOTIFY]).map_err(broken)?;
            out.write_all(&(self.name.len() as u16).to_le_bytes())
                .map_err(broken)?;
            out.write_all(self.name.as_bytes()).map_err(broken)?;
            out.write_all(&(notification.len() as u32).to_le_bytes())
                .map_err(broken)?;
            out.write_all(notification).map_err(broken)?;
            out.flush().map_err(broken)?;
        }
        // The completion: the target has applied everything before the notification.
        let mut reply = [0u8; 1];
        stream.read_exact(&mut reply).map_err(broken)?;
        match reply[0] {
            REPLY_DONE => Ok(()),
            REPLY_FAIL => {
                let mut len = [0u8; 4];
                stream.read_exact(&mut len).map_err(broken)?;
                let mut reason = vec![0u8; u32::from_le_bytes(len).min(1 << 16) as usize];
                stream.read_exact(&mut reason).map_err(broken)?;
                Err(AgentError::Remote(
                    String::from_utf8_lossy(&reason).into_owned(),
                ))
            }
            other => Err(AgentError::Backend(format!(
                "unexpected reply {other} from {peer}"
            ))),
        }
    }
}
