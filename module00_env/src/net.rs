//! The node-to-node network check: round-trip latency and throughput over
//! TCP between two machines (or two network namespaces on one).
//!
//! Module 3 moves a request's KV cache from the prefill node to the decode
//! node over TCP; how long that takes is `latency + bytes / bandwidth`. This
//! check measures both terms between the two nodes you will use:
//!
//! * **round trip**: 8-byte pings echoed one at a time, with Nagle's
//!   algorithm off (`TCP_NODELAY`), so each one crosses the wire at once;
//!   reported as p50 and p99, because a tail is what a user waits on;
//! * **throughput**: one TCP stream each way, bounded in time and bytes.
//!   Upload is timed until the server confirms it received every byte, so
//!   data still sitting in socket buffers is not counted as sent.
//!
//! The protocol is one opcode byte from the client, then:
//!
//! | op  | client sends                  | server answers                         |
//! |-----|-------------------------------|----------------------------------------|
//! | `P` | 8-byte pings until it closes  | each ping echoed back                  |
//! | `U` | bytes, then closes its half   | `u64` (LE): bytes it received          |
//! | `D` | `u64` max bytes, `u64` max ms | that many zero bytes (or fewer), then closes |

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OP_PING: u8 = b'P';
const OP_UPLOAD: u8 = b'U';
const OP_DOWNLOAD: u8 = b'D';
const CHUNK: usize = 1 << 20;
/// The server never streams more than this per download, whatever a client asks.
const SERVER_MAX_BYTES: u64 = 64 << 30;
const SERVER_MAX_TIME: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "cannot connect to {peer}: {source}. Is `module00_env serve --listen ADDR` running there, \
         and can this machine reach that address and port?"
    )]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("the connection to {peer} failed during the {phase} test: {source}")]
    Io {
        peer: String,
        phase: &'static str,
        source: std::io::Error,
    },
}

/// How much the check may send, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct NetCheckConfig {
    /// At most this many pings…
    pub pings: u32,
    /// …and at most this long for the pings, and again for each direction.
    pub duration: Duration,
    /// At most this many bytes each way.
    pub max_bytes: u64,
}

impl Default for NetCheckConfig {
    fn default() -> Self {
        NetCheckConfig {
            pings: 2000,
            duration: Duration::from_secs(2),
            max_bytes: 4 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTrip {
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub bytes: u64,
    pub seconds: f64,
}

impl Throughput {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

/// The result of `module00_env check --peer ADDR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetCheck {
    pub peer: String,
    pub round_trip: RoundTrip,
    pub upload: Throughput,
    pub download: Throughput,
}

/// Answers checks on `listener` until the task is dropped. Each connection
/// is served on its own task, so several clients may check at once.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, from) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream).await {
                eprintln!("check from {from} ended with an error: {e}");
            }
        });
    }
}

async fn serve_one(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    match stream.read_u8().await? {
        OP_PING => {
            let mut ping = [0u8; 8];
            while stream.read_exact(&mut ping).await.is_ok() {
                stream.write_all(&ping).await?;
            }
        }
        OP_UPLOAD => {
            let received = count_until_closed(&mut stream).await?;
            stream.write_u64_le(received).await?;
        }
        OP_DOWNLOAD => {
            let max_bytes = stream.read_u64_le().await?.min(SERVER_MAX_BYTES);
            let max_time = Duration::from_millis(stream.read_u64_le().await?).min(SERVER_MAX_TIME);
            let buffer = vec![0u8; CHUNK];
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < max_bytes && start.elapsed() < max_time {
                let n = (max_bytes - sent).min(CHUNK as u64) as usize;
                stream.write_all(&buffer[..n]).await?;
                sent += n as u64;
            }
            stream.shutdown().await?;
        }
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown opcode {other:#04x}: is the client a module00_env check?"),
            ))
        }
    }
    Ok(())
}

/// Measures round trip, upload and download to a running [`serve`].
pub async fn check(peer: &str, config: NetCheckConfig) -> Result<NetCheck, NetError> {
    let io = |phase| {
        move |source| NetError::Io {
            peer: peer.to_string(),
            phase,
            source,
        }
    };
    let stream = connect(peer, OP_PING).await?;
    let round_trip = ping(stream, config).await.map_err(io("round-trip"))?;
    let stream = connect(peer, OP_UPLOAD).await?;
    let upload = upload(stream, config).await.map_err(io("upload"))?;
    let stream = connect(peer, OP_DOWNLOAD).await?;
    let download = download(stream, config).await.map_err(io("download"))?;
    Ok(NetCheck {
        peer: peer.to_string(),
        round_trip,
        upload,
        download,
    })
}

async fn connect(peer: &str, op: u8) -> Result<TcpStream, NetError> {
    let mut stream = TcpStream::connect(peer)
        .await
        .map_err(|source| NetError::Connect {
            peer: peer.to_string(),
            source,
        })?;
    stream
        .set_nodelay(true)
        .and(stream.write_u8(op).await)
        .map_err(|source| NetError::Io {
            peer: peer.to_string(),
            phase: "connect",
            source,
        })?;
    Ok(stream)
}

async fn ping(mut stream: TcpStream, config: NetCheckConfig) -> std::io::Result<RoundTrip> {
    let mut histogram = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let start = Instant::now();
    let mut echo = [0u8; 8];
    for seq in 0..config.pings as u64 {
        if seq > 0 && start.elapsed() >= config.duration {
            break;
        }
        let sent = Instant::now();
        stream.write_all(&seq.to_le_bytes()).await?;
        stream.read_exact(&mut echo).await?;
        let nanos = sent.elapsed().as_nanos() as u64;
        if u64::from_le_bytes(echo) != seq {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the echo did not match the ping",
            ));
        }
        histogram.record(nanos.max(1)).expect("histogram grows");
    }
    let us = |nanos: u64| nanos as f64 / 1e3;
    Ok(RoundTrip {
        samples: histogram.len(),
        p50_us: us(histogram.value_at_quantile(0.50)),
        p99_us: us(histogram.value_at_quantile(0.99)),
        min_us: us(histogram.min()),
        max_us: us(histogram.max()),
    })
}

// ANCHOR: upload
async fn upload(mut stream: TcpStream, config: NetCheckConfig) -> std::io::Result<Throughput> {
    let buffer = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < config.max_bytes && start.elapsed() < config.duration {
        let n = (config.max_bytes - sent).min(CHUNK as u64) as usize;
        stream.write_all(&buffer[..n]).await?;
        sent += n as u64;
    }
    stream.shutdown().await?;
    let received = stream.read_u64_le().await?;
    let seconds = start.elapsed().as_secs_f64();
    if received != sent {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("sent {sent} bytes but the server counted {received}"),
        ));
    }
    Ok(Throughput {
        bytes: received,
        seconds,
    })
}
// ANCHOR_END: upload

async fn download(mut stream: TcpStream, config: NetCheckConfig) -> std::io::Result<Throughput> {
    let start = Instant::now();
    stream.write_u64_le(config.max_bytes).await?;
    stream
        .write_u64_le(config.duration.as_millis() as u64)
        .await?;
    let received = count_until_closed(&mut stream).await?;
    Ok(Throughput {
        bytes: received,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Reads and discards until the other side closes; returns the byte count.
async fn count_until_closed(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(received);
        }
        received += n as u64;
    }
}
