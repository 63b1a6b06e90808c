//! What moving a KV cache costs.
//!
//! First the formula every later module lives by:
//!
//! ```text
//! transfer time ≈ latency + bytes / bandwidth
//! ```
//!
//! for three classes of link. Then a measurement of the parts the formula
//! leaves out: turning the tensor into bytes (serialize), pushing them
//! through real sockets, and turning bytes back into a tensor (deserialize).
//! Over loopback there is no wire at all, so what remains is the CPU cost
//! of TCP and of the copies — the floor of any TCP transfer, and the part
//! RDMA removes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::stats::median;
use tch::{Device, Kind, Tensor};

/// A class of link, by its order-of-magnitude numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub name: &'static str,
    /// Payload bandwidth one way, bytes per second.
    pub bytes_per_s: f64,
    /// Fixed cost per transfer, seconds.
    pub latency_s: f64,
}

/// The three links of the course: commodity Ethernet with kernel TCP, an
/// RDMA NIC, and a GPU-to-GPU fabric (H100 NVLink: 900 GB/s both ways).
pub const LINKS: [Link; 3] = [
    Link {
        name: "TCP 10 Gbit/s",
        bytes_per_s: 1.25e9,
        latency_s: 50e-6,
    },
    Link {
        name: "RDMA 100 Gbit/s",
        bytes_per_s: 12.5e9,
        latency_s: 5e-6,
    },
    Link {
        name: "NVLink 450 GB/s",
        bytes_per_s: 450e9,
        latency_s: 2e-6,
    },
];

impl Link {
    pub fn seconds(&self, bytes: f64) -> f64 {
        self.latency_s + bytes / self.bytes_per_s
    }
}

/// One measured transfer of one request's KV cache (medians of the repeats
/// after the first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferMeasurement {
    pub prompt_tokens: usize,
    pub dtype: String,
    pub bytes: usize,
    pub prefill_seconds: f64,
    pub serialize_seconds: f64,
    pub network_seconds: f64,
    pub deserialize_seconds: f64,
    /// The first transfer, with buffers not yet touched (page faults included).
    pub first_transfer_seconds: f64,
}

impl TransferMeasurement {
    pub fn total_seconds(&self) -> f64 {
        self.serialize_seconds + self.network_seconds + self.deserialize_seconds
    }

    pub fn gbytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.total_seconds() / 1e9
    }

    pub fn fraction_of_prefill(&self) -> f64 {
        self.total_seconds() / self.prefill_seconds
    }
}

/// Element types a KV cache may have, by their code in the frame header.
const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

fn kind_code(kind: Kind) -> u8 {
    KINDS
        .iter()
        .position(|&k| k == kind)
        .unwrap_or_else(|| panic!("a KV cache is f32, bf16 or f16, not {kind:?}")) as u8
}

/// Tensor → bytes: one copy, from wherever the tensor lives into a reused
/// host buffer. Returns the small header: element type, rank, shape, length.
fn serialize(kv: &Tensor, buffer: &mut Vec<u8>) -> Vec<u8> {
    let host = kv.to_device(Device::Cpu).contiguous();
    let n = host.numel() * host.kind().elt_size_in_bytes();
    buffer.resize(n, 0);
    host.copy_data_u8(buffer, host.numel());
    let mut header = vec![kind_code(host.kind()), host.dim() as u8];
    for d in host.size() {
        header.extend_from_slice(&d.to_le_bytes());
    }
    header.extend_from_slice(&(n as u64).to_le_bytes());
    header
}

/// Reads one frame into `buffer` (reused). Returns element type and shape.
fn receive(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<(Kind, Vec<i64>)> {
    let mut two = [0u8; 2];
    stream.read_exact(&mut two)?;
    let kind = KINDS
        .get(two[0] as usize)
        .copied()
        .ok_or_else(|| std::io::Error::other(format!("unknown element type code {}", two[0])))?;
    let mut shape = Vec::new();
    let mut word = [0u8; 8];
    for _ in 0..two[1] {
        stream.read_exact(&mut word)?;
        shape.push(i64::from_le_bytes(word));
    }
    stream.read_exact(&mut word)?;
    buffer.resize(u64::from_le_bytes(word) as usize, 0);
    stream.read_exact(buffer)?;
    Ok((kind, shape))
}

// ANCHOR: deserialize
/// Bytes → tensor: one copy, into `destination` — on a decode worker, the
/// slots of its preallocated KV pool; no tensor is allocated per transfer.
fn deserialize(buffer: &[u8], kind: Kind, shape: &[i64], destination: &mut Tensor) {
    let expected: i64 = shape.iter().product::<i64>() * kind.elt_size_in_bytes() as i64;
    assert_eq!(
        buffer.len() as i64,
        expected,
        "payload length matches the header"
    );
    // SAFETY: `view` borrows `buffer`, which outlives it (it is dropped at
    // the end of this function), and the length was just checked.
    let view = unsafe { Tensor::from_blob(buffer.as_ptr(), shape, &[], kind, Device::Cpu) };
    destination.copy_(&view);
}
// ANCHOR_END: deserialize

/// Sends `kv` over a loopback TCP connection `repeats` times and times the
/// three phases. Buffers and the destination are reused, as a serving
/// system would; the first transfer pays for touching them the first time
/// and is reported on its own. Returns the measurement and the tensor as
/// received (so a caller can check nothing was lost).
pub fn measure_loopback(
    kv: &Tensor,
    prefill_seconds: f64,
    repeats: usize,
) -> std::io::Result<(TransferMeasurement, Tensor)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let (shape, kind) = (kv.size(), kv.kind());
    let receiver = std::thread::spawn(move || -> std::io::Result<(Vec<f64>, Tensor)> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = Vec::new();
        let mut destination = Tensor::empty(shape.as_slice(), (kind, Device::Cpu));
        let mut deserialize_times = Vec::new();
        for _ in 0..repeats {
            let (kind, shape) = receive(&mut stream, &mut buffer)?;
            stream.write_all(&[1])?; // "all bytes are here"
            let start = Instant::now();
            deserialize(&buffer, kind, &shape, &mut destination);
            deserialize_times.push(start.elapsed().as_secs_f64());
        }
        Ok((deserialize_times, destination))
    });

    let mut stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let (mut serialize_times, mut network_times) = (Vec::new(), Vec::new());
    let mut buffer = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        let header = serialize(kv, &mut buffer);
        serialize_times.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        stream.write_all(&header)?;
        stream.write_all(&buffer)?;
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack)?;
        network_times.push(start.elapsed().as_secs_f64());
    }
    let (deserialize_times, received) = receiver.join().expect("receiver thread")?;
    let first_transfer_seconds = serialize_times[0] + network_times[0] + deserialize_times[0];
    let warm = |times: Vec<f64>| median(if times.len() > 1 { &times[1..] } else { &times });
    Ok((
        TransferMeasurement {
            prompt_tokens: kv.size()[2] as usize,
            dtype: shared::device::kind_name(kv.kind()).to_string(),
            bytes: buffer.len(),
            prefill_seconds,
            serialize_seconds: warm(serialize_times),
            network_seconds: warm(network_times),
            deserialize_seconds: warm(deserialize_times),
            first_transfer_seconds,
        },
        received,
    ))
}

/// The formula for KV caches of `tokens` at `bytes_per_token`, as a table.
pub fn render_formula(model: &str, bytes_per_token: f64, token_counts: &[usize]) -> String {
    let mut out = format!(
        "{model}: {:.1} KiB per token\n{:>8} {:>10}",
        bytes_per_token / 1024.0,
        "tokens",
        "KV MiB"
    );
    for link in &LINKS {
        out.push_str(&format!(" {:>17}", link.name));
    }
    out.push('\n');
    for &tokens in token_counts {
        let bytes = bytes_per_token * tokens as f64;
        out.push_str(&format!(
            "{tokens:>8} {:>10.2}",
            bytes / (1u64 << 20) as f64
        ));
        for link in &LINKS {
            out.push_str(&format!(" {:>14.3} ms", link.seconds(bytes) * 1e3));
        }
        out.push('\n');
    }
    out
}

/// The measured transfers, one row per prompt length.
pub fn render_measured(rows: &[TransferMeasurement]) -> String {
    let mut out = format!(
        "{:>7} {:>5} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>11} {:>12} {:>10}\n",
        "tokens",
        "dtype",
        "KV MiB",
        "serialize",
        "socket",
        "deserial.",
        "total",
        "GB/s",
        "prefill",
        "% of prefill",
        "first"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>7} {:>5} {:>9.2} {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>8.2} {:>8.1} ms {:>11.1}% {:>7.2} ms\n",
            r.prompt_tokens,
            r.dtype,
            r.bytes as f64 / (1u64 << 20) as f64,
            r.serialize_seconds * 1e3,
            r.network_seconds * 1e3,
            r.deserialize_seconds * 1e3,
            r.total_seconds() * 1e3,
            r.gbytes_per_s(),
            r.prefill_seconds * 1e3,
            r.fraction_of_prefill() * 100.0,
            r.first_transfer_seconds * 1e3
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_is_latency_plus_bytes_over_bandwidth() {
        let tcp = LINKS[0];
        assert!((tcp.seconds(1.25e9) - (1.0 + 50e-6)).abs() < 1e-12);
    }

    #[test]
    fn loopback_delivers_the_same_tensor() {
        let kv = Tensor::randn([2, 2, 37, 3, 8], (Kind::Float, Device::Cpu));
        let (m, received) = measure_loopback(&kv, 1.0, 3).unwrap();
        assert_eq!(m.bytes, 2 * 2 * 37 * 3 * 8 * 4);
        assert_eq!(m.prompt_tokens, 37);
        assert!(received.equal(&kv));
        assert!(m.total_seconds() > 0.0);
    }
}
