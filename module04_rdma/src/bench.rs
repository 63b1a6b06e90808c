//! Bandwidth and latency of one-sided writes, against module 3's framed path.
//!
//! For each message size, two measurements on loopback:
//!
//! * **one-sided** (this module's TCP backend): the target's NIC thread
//!   reads the bytes from the socket straight into registered memory;
//! * **framed** (module 3's `shared::wire`): the receiver reads a frame into
//!   a buffer, then copies the payload to where it belongs.
//!
//! Both cross the same kernel TCP stack, so the difference is what the
//! receiving side does with the bytes — the part RDMA takes off the CPU
//! entirely.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::stats::median;
use shared::wire::{self, Message};
use tokio::io::AsyncWriteExt;

use crate::agent::{AgentError, BackendChoice, TransferAgent};
use crate::metadata::BackendKind;
use crate::region::{Descriptor, MemoryRegion};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeResult {
    pub bytes: u64,
    /// One transfer, start to completion (median).
    pub one_sided_latency_us: f64,
    pub framed_latency_us: f64,
    /// Back-to-back transfers.
    pub one_sided_gbytes_per_s: f64,
    pub framed_gbytes_per_s: f64,
}

/// Sizes from 4 KiB to 64 MiB, ×4 each step.
pub fn default_sizes() -> Vec<u64> {
    (0..=7).map(|i| 4096u64 << (2 * i)).collect()
}

/// Repeats per size: enough for a stable median (at least 16), bounded by
/// ~1 GiB moved per size and path.
fn repeats(bytes: u64) -> usize {
    ((1u64 << 30) / bytes).clamp(16, 500) as usize
}

/// One-sided writes between two agents in this process on `backend`
/// (through the NIC's loopback for ibverbs); (median µs, GB/s) per size.
pub fn one_sided(sizes: &[u64], backend: &BackendChoice) -> Result<Vec<(f64, f64)>, AgentError> {
    let largest = *sizes.iter().max().unwrap_or(&0) as usize;
    // CUDA IPC moves GPU memory: both buffers are tensors on GPU 0, kept
    // alive here while registered (between two agents of one process the
    // copy is device-local; across processes see module 6's bench).
    let gpu_buffers: Vec<tch::Tensor> = match backend {
        BackendChoice::CudaIpc { .. } => {
            if shared::device::cuda_device_count() == 0 {
                return Err(AgentError::Backend(format!(
                    "--backend cuda-ipc needs a GPU: {}",
                    shared::device::cuda_status()
                )));
            }
            (0..2)
                .map(|_| {
                    tch::Tensor::zeros([largest as i64], (tch::Kind::Uint8, tch::Device::Cuda(0)))
                })
                .collect()
        }
        _ => Vec::new(),
    };
    let buffer = |i: usize| match gpu_buffers.get(i) {
        // SAFETY: the tensors outlive both agents (dropped after them, at the end).
        Some(tensor) => unsafe { MemoryRegion::of_tensor(tensor) },
        None => MemoryRegion::alloc(largest),
    };
    let target = TransferAgent::new("bench-target", backend.clone())?;
    let remote_region = target.register(buffer(0))?;
    let initiator = TransferAgent::new("bench-initiator", backend.clone())?;
    let local = initiator.register(buffer(1))?;
    initiator.load_remote(&target.metadata())?;
    let mut out = Vec::new();
    for &bytes in sizes {
        let pair = [(
            Descriptor::new(local, 0, bytes),
            Descriptor::new(remote_region, 0, bytes),
        )];
        initiator.write("bench-target", &pair, b"warm-up")?;
        let n = repeats(bytes);
        let mut latencies = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            latencies.push(initiator.write("bench-target", &pair, b"")?.seconds);
        }
        let elapsed = start.elapsed().as_secs_f64();
        target.take_notifications();
        out.push((
            median(&latencies) * 1e6,
            bytes as f64 * n as f64 / elapsed / 1e9,
        ));
    }
    Ok(out)
}

/// Module 3's path: a frame per transfer, read into a buffer, copied into
/// place. The receiver runs on its own OS thread, as the one-sided target's
/// "NIC" thread does, so both paths pay the same cross-thread wake-ups.
pub fn framed(sizes: &[u64]) -> std::io::Result<Vec<(f64, f64)>> {
    let largest = *sizes.iter().max().unwrap_or(&0) as usize;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (mut reader, mut writer) = stream.into_split();
            let mut buffer = Vec::new();
            let mut destination = vec![0u8; largest];
            while wire::read_frame(&mut reader, 1 << 30, &mut buffer)
                .await
                .is_ok()
            {
                destination[..buffer.len()].copy_from_slice(&buffer);
                writer.write_all(&[1]).await?;
            }
            Ok(())
        })
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (mut reader, mut writer) = stream.into_split();
        let payload = vec![7u8; largest];
        let mut out = Vec::new();
        let message = Message::KvLayer {
            request_id: 0,
            layer: 0,
        };
        for &bytes in sizes {
            let mut once =
                async |writer: &mut tokio::net::tcp::OwnedWriteHalf| -> std::io::Result<f64> {
                    let start = Instant::now();
                    wire::write_frame(writer, &message, &payload[..bytes as usize])
                        .await
                        .map_err(std::io::Error::other)?;
                    let mut ack = [0u8; 1];
                    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut ack).await?;
                    Ok(start.elapsed().as_secs_f64())
                };
            once(&mut writer).await?;
            let n = repeats(bytes);
            let mut latencies = Vec::with_capacity(n);
            let start = Instant::now();
            for _ in 0..n {
                latencies.push(once(&mut writer).await?);
            }
            let elapsed = start.elapsed().as_secs_f64();
            out.push((
                median(&latencies) * 1e6,
                bytes as f64 * n as f64 / elapsed / 1e9,
            ));
        }
        Ok::<_, std::io::Error>(out)
    })?;
    drop(runtime);
    receiver
        .join()
        .map_err(|_| std::io::Error::other("receiver thread panicked"))??;
    Ok(out)
}

/// The bench's results: which backend did the one-sided writes, and per size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub backend: BackendKind,
    pub sizes: Vec<SizeResult>,
}

pub fn run(sizes: &[u64], backend: BackendChoice) -> anyhow::Result<BenchReport> {
    let backend = backend.resolve();
    let kind = match backend {
        BackendChoice::Ibverbs { .. } => BackendKind::Ibverbs,
        BackendChoice::CudaIpc { .. } => BackendKind::CudaIpc,
        _ => BackendKind::Tcp,
    };
    let one = one_sided(sizes, &backend)?;
    let framed = framed(sizes)?;
    let sizes = sizes
        .iter()
        .zip(one.iter().zip(&framed))
        .map(|(&bytes, (&(ol, ob), &(fl, fb)))| SizeResult {
            bytes,
            one_sided_latency_us: ol,
            framed_latency_us: fl,
            one_sided_gbytes_per_s: ob,
            framed_gbytes_per_s: fb,
        })
        .collect();
    Ok(BenchReport {
        backend: kind,
        sizes,
    })
}

pub fn render(report: &BenchReport) -> String {
    let mut out = format!(
        "one-sided: {:?} backend; framed: module 3's frames over TCP; loopback\n\
         ratio = framed / one-sided for latency, one-sided / framed for bandwidth: > 1 means one-sided is better\n",
        report.backend
    );
    out.push_str(&format!(
        "{:>9} {:>16} {:>16} {:>8} {:>14} {:>14} {:>8}\n",
        "size", "one-sided µs", "framed µs", "ratio", "one-sided GB/s", "framed GB/s", "ratio"
    ));
    for r in &report.sizes {
        let size = if r.bytes >= 1 << 20 {
            format!("{} MiB", r.bytes >> 20)
        } else {
            format!("{} KiB", r.bytes >> 10)
        };
        out.push_str(&format!(
            "{size:>9} {:>16.1} {:>16.1} {:>7.2}x {:>14.2} {:>14.2} {:>7.2}x\n",
            r.one_sided_latency_us,
            r.framed_latency_us,
            r.framed_latency_us / r.one_sided_latency_us,
            r.one_sided_gbytes_per_s,
            r.framed_gbytes_per_s,
            r.one_sided_gbytes_per_s / r.framed_gbytes_per_s
        ));
    }
    out
}
