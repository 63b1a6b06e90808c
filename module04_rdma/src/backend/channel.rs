//! The side channel: a TCP connection between two agents that carries what
//! is not a one-sided write — notifications and their completions, and (for
//! the TCP backend) the emulated writes themselves.
//!
//! ```text
//! WRITE   [1][region u32][rkey u32][offset u64][len u64][len bytes]   (TCP backend only)
//! NOTIFY  [2][from-len u16][from][len u32][bytes]      then the target answers
//! DONE    [3] (all writes applied)  or  FAIL [4][len u32][reason]
//! ```
//!
//! With RDMA the data never crosses this channel: by the time the initiator
//! sends NOTIFY, its queue pair has reported every write complete, which on
//! a reliable connection means the bytes are in the target's memory. With
//! the TCP backend the target applies WRITEs in order before it reads the
//! NOTIFY behind them. Either way, DONE means "everything before the
//! notification has landed".
//!
//! A request that fails a check is answered with FAIL and the connection is
//! closed — a real queue pair goes to the error state on a remote access
//! error the same way.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};

use super::{Target, WriteOp};
use crate::agent::{AgentError, Notification};

const OP_WRITE: u8 = 1;
const OP_NOTIFY: u8 = 2;
const REPLY_DONE: u8 = 3;
const REPLY_FAIL: u8 = 4;
/// Notifications are small messages, not a data path.
const MAX_NOTIFICATION: u32 = 1 << 20;

/// Whether a connection may carry emulated writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// The TCP backend: the channel is the data path.
    Accepted,
    /// RDMA: data moves by the NIC; a WRITE on the side channel is a bug
    /// or an attack, and is refused.
    Refused,
}

/// Answers a request with FAIL and a reason.
pub fn fail(replies: &mut TcpStream, reason: &str) {
    let mut frame = vec![REPLY_FAIL];
    frame.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    frame.extend_from_slice(reason.as_bytes());
    let _ = replies.write_all(&frame);
}

/// The target's side of one connection: applies emulated writes to
/// registered memory (if accepted) and queues notifications, until the
/// initiator hangs up or breaks the protocol.
pub fn serve(stream: TcpStream, target: Target, writes: Writes) {
    let _ = stream.set_nodelay(true);
    let Ok(mut replies) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    loop {
        let mut op = [0u8; 1];
        if reader.read_exact(&mut op).is_err() {
            return; // the initiator closed the connection
        }
        match op[0] {
            // ANCHOR: nic_write
            OP_WRITE if writes == Writes::Accepted => {
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
                    Err(reason) => return fail(&mut replies, &reason),
                }
            }
            // ANCHOR_END: nic_write
            OP_NOTIFY => {
                let Some(notification) = read_notification(&mut reader, &mut replies) else {
                    return;
                };
                // An empty notification only asks for the completion.
                if !notification.data.is_empty() {
                    let (queue, arrived) = &*target.notifications;
                    queue.lock().expect("notification lock").push(notification);
                    arrived.notify_all();
                }
                if replies.write_all(&[REPLY_DONE]).is_err() {
                    return;
                }
            }
            OP_WRITE => {
                return fail(
                    &mut replies,
                    "this agent takes writes by RDMA only, not on its side channel",
                )
            }
            other => return fail(&mut replies, &format!("unknown operation {other}")),
        }
    }
}

fn read_notification(reader: &mut impl Read, replies: &mut TcpStream) -> Option<Notification> {
    let mut len = [0u8; 2];
    reader.read_exact(&mut len).ok()?;
    let mut from = vec![0u8; u16::from_le_bytes(len) as usize];
    let mut size = [0u8; 4];
    reader.read_exact(&mut from).ok()?;
    reader.read_exact(&mut size).ok()?;
    let size = u32::from_le_bytes(size);
    if size > MAX_NOTIFICATION {
        fail(
            replies,
            &format!("a notification of {size} bytes exceeds the {MAX_NOTIFICATION}-byte cap"),
        );
        return None;
    }
    let mut data = vec![0u8; size as usize];
    reader.read_exact(&mut data).ok()?;
    Some(Notification {
        from: String::from_utf8_lossy(&from).into_owned(),
        data,
    })
}

/// The initiator's side of one transfer: sends `writes` (emulated; empty
/// for RDMA, whose writes have already completed), then the notification,
/// and waits for the target's DONE or FAIL. `writes` must lie in host
/// memory (the TCP backend refuses to register anything else).
pub fn post(
    stream: &mut TcpStream,
    peer: &str,
    from: &str,
    writes: &[WriteOp<'_>],
    notification: &[u8],
) -> Result<(), AgentError> {
    let broken =
        |e: std::io::Error| AgentError::Backend(format!("the connection to {peer} failed: {e}"));
    {
        let mut out = BufWriter::with_capacity(1 << 16, &mut *stream);
        for op in writes {
            let mut header = [0u8; 25];
            header[0] = OP_WRITE;
            header[1..5].copy_from_slice(&op.region.to_le_bytes());
            header[5..9].copy_from_slice(&op.rkey.to_le_bytes());
            header[9..17].copy_from_slice(&op.offset.to_le_bytes());
            header[17..25].copy_from_slice(&op.len.to_le_bytes());
            out.write_all(&header).map_err(broken)?;
            // SAFETY: host memory (registered by the TCP backend), owned by
            // the initiator, not written during its own transfer.
            out.write_all(unsafe { op.host_bytes() }).map_err(broken)?;
        }
        out.write_all(&[OP_NOTIFY]).map_err(broken)?;
        out.write_all(&(from.len() as u16).to_le_bytes())
            .map_err(broken)?;
        out.write_all(from.as_bytes()).map_err(broken)?;
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

/// Listens on `listen` and hands every incoming connection to `serve` on
/// a thread of its own; returns the address peers dial.
pub fn listen(
    name: &str,
    listen: &str,
    serve: impl Fn(TcpStream) + Clone + Send + 'static,
) -> Result<String, AgentError> {
    let listener = TcpListener::bind(listen)
        .map_err(|e| AgentError::Backend(format!("cannot listen on {listen}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| AgentError::Backend(e.to_string()))?
        .to_string();
    std::thread::Builder::new()
        .name(format!("{name}-side-channel"))
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let serve = serve.clone();
                std::thread::spawn(move || serve(stream));
            }
        })
        .map_err(|e| AgentError::Backend(e.to_string()))?;
    Ok(address)
}

/// Connects to a peer's side channel.
pub fn connect(name: &str, address: &str) -> Result<TcpStream, AgentError> {
    let stream = TcpStream::connect(address)
        .map_err(|e| AgentError::Backend(format!("cannot reach agent {name} at {address}: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| AgentError::Backend(e.to_string()))?;
    Ok(stream)
}
