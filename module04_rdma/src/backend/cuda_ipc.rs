//! One-sided writes from GPU to GPU on one host, with CUDA IPC.
//!
//! Two workers on one machine with several GPUs — prefill on GPU 0, decode
//! on GPU 1 — need no network card at all: GPUs reach each other's memory
//! over NVLink (or PCIe). The steps mirror RDMA's:
//!
//! | RDMA | CUDA IPC |
//! |---|---|
//! | `ibv_reg_mr` gives an rkey | the target exports its KV pool's IPC handle ([`shared::cuda_ipc::export`]) |
//! | the initiator learns address + rkey from metadata | it learns the handle from metadata and maps it once ([`IpcMapping::open`]) |
//! | `RDMA WRITE`s, polled to completion | one scatter kernel on the initiator's GPU writes every span into the mapped memory; the stream is synchronised |
//! | notification on the side channel | the same side channel ([`super::channel`]) |
//!
//! The data moves GPU to GPU; no host memory and no CPU copy on either side.
//! Where both processes use the same GPU (one GPU, two processes — what a
//! single-GPU machine can test) the same path is a device-local copy.
//!
//! Writes arrive as a list of byte spans. Launching one copy per span would
//! cost a few microseconds each, and a prompt's KV is hundreds of spans
//! (layers × K/V × blocks), so [`scatter`] turns the whole list into index
//! tensors on the GPU and moves every span with one gather and one scatter.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use shared::cuda_ipc::IpcMapping;
use tch::{Device, Kind, Tensor};

use super::channel::{self, Writes};
use super::{random_key, Backend, Registration, Target, WriteOp};
use crate::agent::AgentError;
use crate::metadata::{AgentMetadata, BackendKind, ProcessId};
use crate::region::Location;
use crate::region::MemoryRegion;

pub struct CudaIpcBackend {
    name: String,
    address: String,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

/// A connected target: its side channel, its metadata, and the regions of
/// it this process has mapped so far.
struct Peer {
    channel: Mutex<TcpStream>,
    metadata: AgentMetadata,
    /// (region, the local GPU that writes it) → where the region starts here.
    mapped: Mutex<HashMap<(u32, usize), MappedRegion>>,
}

/// A peer's region as this process sees it.
struct MappedRegion {
    start: *mut u8,
    /// Keeps the mapping open (`None` when the peer is this process, whose
    /// pointers are valid here as they are).
    _mapping: Option<IpcMapping>,
}

// `start` points into device memory that the mapping keeps alive; it is
// only used to build tensors for kernels, from any thread.
unsafe impl Send for MappedRegion {}

impl CudaIpcBackend {
    /// Listens on `listen` for initiators' notifications (data never
    /// crosses this socket).
    pub fn start(name: &str, listen: &str, target: Target) -> Result<CudaIpcBackend, AgentError> {
        if !shared::cuda_ipc::compiled() {
            return Err(AgentError::Backend(
                shared::cuda_ipc::CudaIpcError::NotCompiled.to_string(),
            ));
        }
        // libtorch's CUDA half is loaded at run time (see shared::device).
        shared::device::load_cuda_runtime().map_err(|why| {
            AgentError::Backend(format!("the CUDA IPC backend needs CUDA: {why}"))
        })?;
        let address = channel::listen(name, listen, move |stream| {
            channel::serve(stream, target.clone(), Writes::Refused)
        })?;
        Ok(CudaIpcBackend {
            name: name.to_string(),
            address,
            peers: Mutex::new(HashMap::new()),
        })
    }
}

impl Peer {
    /// Where `region` of this peer starts in our address space, for kernels
    /// on `device`; maps it on first use.
    fn region_start(&self, region: u32, device: usize) -> Result<*mut u8, AgentError> {
        let mut mapped = self.mapped.lock().expect("mapped lock");
        if let Some(m) = mapped.get(&(region, device)) {
            return Ok(m.start);
        }
        let exposed = self
            .metadata
            .regions
            .iter()
            .find(|r| r.id.0 == region)
            .ok_or_else(|| AgentError::UnknownRegion {
                agent: self.metadata.name.clone(),
                region,
            })?;
        let region_start = if self.metadata.process == ProcessId::current() {
            // Our own memory: a process cannot open its own IPC handles,
            // and needs not.
            MappedRegion {
                start: exposed.address as *mut u8,
                _mapping: None,
            }
        } else {
            let handle = exposed.ipc.as_ref().ok_or_else(|| {
                AgentError::Backend(format!(
                    "agent {} exposes region {region} without a CUDA IPC handle",
                    self.metadata.name
                ))
            })?;
            let mapping =
                IpcMapping::open(handle, device).map_err(|e| AgentError::Backend(e.to_string()))?;
            MappedRegion {
                start: mapping.span_start(handle),
                _mapping: Some(mapping),
            }
        };
        let start = region_start.start;
        mapped.insert((region, device), region_start);
        Ok(start)
    }
}

impl Backend for CudaIpcBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::CudaIpc
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    /// Exports the memory's CUDA IPC handle; GPU memory only.
    fn register(&self, region: u32, memory: &MemoryRegion) -> Result<Registration, AgentError> {
        if memory.location() == Location::Host {
            return Err(AgentError::Backend(
                "the CUDA IPC backend shares GPU memory between processes, not host memory: \
                 register a CUDA tensor, or use the tcp backend"
                    .into(),
            ));
        }
        let ipc = shared::cuda_ipc::export(memory.as_ptr())
            .map_err(|e| AgentError::Backend(e.to_string()))?;
        Ok(Registration {
            rkey: random_key(region),
            ipc: Some(ipc),
        })
    }

    fn deregister(&self, _region: u32) {}

    fn connect(&self, peer: &AgentMetadata) -> Result<(), AgentError> {
        let here = ProcessId::current();
        if !here.same_host(&peer.process) {
            return Err(AgentError::Backend(format!(
                "agent {} runs on another host: CUDA IPC works only between processes of one \
                 machine; use the ibverbs backend (GPUDirect RDMA) or tcp across hosts",
                peer.name
            )));
        }
        let stream = channel::connect(&peer.name, &peer.address)?;
        let connected = Peer {
            channel: Mutex::new(stream),
            metadata: peer.clone(),
            mapped: Mutex::new(HashMap::new()),
        };
        self.peers
            .lock()
            .expect("peers lock")
            .insert(peer.name.clone(), Arc::new(connected));
        Ok(())
    }

    fn write(
        &self,
        peer: &str,
        ops: &[WriteOp<'_>],
        notification: &[u8],
    ) -> Result<(), AgentError> {
        let connected = super::connected(&self.peers, peer)?;
        // Group the spans by (local region, remote region): one scatter each.
        let mut groups: Vec<((u32, u32), Vec<&WriteOp<'_>>)> = Vec::new();
        for op in ops {
            let key = (op.local_region, op.region);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(op),
                None => groups.push((key, vec![op])),
            }
        }
        let mut devices = Vec::new();
        for (_, group) in &groups {
            let local = group[0].local;
            let Location::Cuda(device) = local.location() else {
                return Err(AgentError::Backend(
                    "the CUDA IPC backend writes from GPU memory: register the source on a GPU"
                        .into(),
                ));
            };
            let remote = connected.region_start(group[0].region, device)?;
            let spans: Vec<Span> = group
                .iter()
                .map(|op| Span {
                    from: op.local_offset,
                    to: op.offset,
                    len: op.len,
                })
                .collect();
            // SAFETY: every span was checked against both regions by the
            // agent; the local region is ours, the remote one is reserved
            // for these writes by its owner until the notification.
            unsafe {
                scatter(
                    local.as_ptr(),
                    local.len(),
                    remote,
                    Device::Cuda(device),
                    &spans,
                )
            };
            devices.push(device);
        }
        // The completion: every kernel that wrote has finished, so the
        // bytes are in the target's memory before it is notified.
        devices.dedup();
        for device in devices {
            tch::Cuda::synchronize(device as i64);
        }
        let mut channel = connected.channel.lock().expect("channel lock");
        channel::post(&mut channel, peer, &self.name, &[], notification)
    }
}

/// One span to copy, in bytes: `len` bytes from `from` (local) to `to` (remote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

/// The widest element (8, 4, 2 or 1 bytes) that every offset, length and
/// both base addresses are multiples of: copying 8-byte words moves the
/// same bytes with an eighth of the index work.
pub fn word_size(spans: &[Span], local: usize, remote: usize) -> usize {
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|&w| {
            let w64 = w as u64;
            local.is_multiple_of(w)
                && remote.is_multiple_of(w)
                && spans.iter().all(|s| {
                    s.from.is_multiple_of(w64)
                        && s.to.is_multiple_of(w64)
                        && s.len.is_multiple_of(w64)
                })
        })
        .unwrap_or(1)
}

/// For every word of every span, its source and destination index:
/// `(from_index, to_index)`, both `[words]`, computed on `device` from a
/// small table of spans (no per-word work on the CPU).
pub fn span_indices(spans: &[Span], word: usize, device: Device) -> (Tensor, Tensor) {
    let w = word as i64;
    let table: Vec<i64> = spans
        .iter()
        .flat_map(|s| [s.from as i64 / w, s.to as i64 / w, s.len as i64 / w])
        .collect();
    let table = Tensor::from_slice(&table)
        .view([spans.len() as i64, 3])
        .to_device(device);
    let (from, to, len) = (table.select(1, 0), table.select(1, 1), table.select(1, 2));
    let total: i64 = spans.iter().map(|s| s.len as i64 / w).sum();
    // Which span each word belongs to, and its position inside that span.
    let span_of = Tensor::arange(spans.len() as i64, (Kind::Int64, device))
        .repeat_interleave_self_tensor(&len, 0, total);
    let span_start = len.cumsum(0, Kind::Int64) - &len;
    let position =
        Tensor::arange(total, (Kind::Int64, device)) - span_start.index_select(0, &span_of);
    let from_index = from.index_select(0, &span_of) + &position;
    let to_index = to.index_select(0, &span_of) + position;
    (from_index, to_index)
}

// ANCHOR: scatter
/// Below this many spans, each is one copy (a `cudaMemcpyAsync` on a GPU);
/// from it on, index tensors move them all at once.
pub const DIRECT_COPY_SPANS: usize = 8;

/// Copies `spans` from the local region (`local`, `local_len` bytes) to the
/// remote region starting at `remote`, with kernels on `on` (on a GPU this
/// is asynchronous: synchronise the device before telling anyone the bytes
/// are there).
///
/// # Safety
/// `local..local + local_len` must be memory of `on`, and so must `remote`
/// (on a GPU: device memory mapped into this process), with every span
/// inside both.
pub unsafe fn scatter(
    local: *mut u8,
    local_len: usize,
    remote: *mut u8,
    on: Device,
    spans: &[Span],
) {
    let Some(remote_len) = spans.iter().map(|s| s.to + s.len).max() else {
        return;
    };
    let word = word_size(spans, local as usize, remote as usize);
    let kind = match word {
        8 => Kind::Int64,
        4 => Kind::Int,
        2 => Kind::Int16,
        _ => Kind::Uint8,
    };
    let w = word as i64;
    let source = Tensor::from_blob(local, &[local_len as i64 / w], &[], kind, on);
    let mut target = Tensor::from_blob(remote, &[remote_len as i64 / w], &[], kind, on);
    if spans.len() < DIRECT_COPY_SPANS {
        for s in spans {
            let (from, to, len) = (s.from as i64 / w, s.to as i64 / w, s.len as i64 / w);
            target
                .narrow(0, to, len)
                .copy_(&source.narrow(0, from, len));
        }
        return;
    }
    let (from_index, to_index) = span_indices(spans, word, on);
    let words = source.index_select(0, &from_index);
    let _ = target.index_copy_(0, &to_index, &words);
}
// ANCHOR_END: scatter

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_size_is_the_widest_that_divides_everything() {
        let spans = [
            Span {
                from: 0,
                to: 512,
                len: 256,
            },
            Span {
                from: 256,
                to: 2048,
                len: 256,
            },
        ];
        assert_eq!(word_size(&spans, 4096, 8192), 8);
        assert_eq!(word_size(&spans, 4100, 8192), 4);
        let odd = [Span {
            from: 3,
            to: 0,
            len: 5,
        }];
        assert_eq!(word_size(&odd, 0, 0), 1);
        let halves = [Span {
            from: 2,
            to: 6,
            len: 10,
        }];
        assert_eq!(word_size(&halves, 0, 0), 2);
    }

    #[test]
    fn span_indices_cover_every_word_of_every_span_in_order() {
        // Words (8 bytes): span A moves words 0..2 to 10..12, span B words 5..8 to 1..4.
        let spans = [
            Span {
                from: 0,
                to: 80,
                len: 16,
            },
            Span {
                from: 40,
                to: 8,
                len: 24,
            },
        ];
        let (from, to) = span_indices(&spans, 8, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&from).unwrap(), vec![0, 1, 5, 6, 7]);
        assert_eq!(Vec::<i64>::try_from(&to).unwrap(), vec![10, 11, 1, 2, 3]);
    }

    /// The scatter run on the CPU: what it writes must be exactly what a
    /// span-by-span copy of the bytes writes, and nothing else — with few
    /// spans (copied one by one) and many (moved by index), aligned to
    /// 8-byte words and not.
    #[test]
    fn scatter_moves_exactly_the_spans() {
        let few = vec![
            Span {
                from: 0,
                to: 64,
                len: 32,
            },
            Span {
                from: 200,
                to: 8,
                len: 48,
            },
            Span {
                from: 96,
                to: 160,
                len: 8,
            },
        ];
        // Many: 8-byte spans from the front of the source to every other
        // 8-byte slot of the target, in reverse order.
        let many: Vec<Span> = (0..12)
            .map(|i| Span {
                from: 8 * i,
                to: 16 * (11 - i),
                len: 8,
            })
            .collect();
        assert!(few.len() < DIRECT_COPY_SPANS && many.len() >= DIRECT_COPY_SPANS);
        let mut source: Vec<u8> = (0..=255).collect();
        for spans in [few, many] {
            // An odd base address makes the copy byte-wise.
            for shift in [0usize, 1] {
                let mut expected = vec![0u8; 256 + shift];
                for s in &spans {
                    let (f, t, n) = (s.from as usize, s.to as usize, s.len as usize);
                    expected[shift + t..shift + t + n]
                        .copy_from_slice(&source[shift + f..shift + f + n]);
                }
                let mut target = vec![0u8; 256 + shift];
                let (src, dst) = (source[shift..].as_mut_ptr(), target[shift..].as_mut_ptr());
                assert_eq!(
                    word_size(&spans, src as usize, dst as usize) == 1,
                    shift == 1
                );
                unsafe { scatter(src, 256 - shift, dst, Device::Cpu, &spans) };
                assert_eq!(target, expected, "{} spans, shift {shift}", spans.len());
            }
        }
    }
}
