//! What an agent tells its peers about itself.
//!
//! Before any one-sided write, the target must publish where it can be
//! reached and which memory it exposes; the initiator loads that metadata
//! and can then address the target's memory by descriptor. In NIXL this is
//! `getLocalMD` / `loadRemoteMD`; in module 6 it travels through the
//! registry. It is a plain serialisable value, encoded with bincode here.

use serde::{Deserialize, Serialize};
use shared::cuda_ipc::IpcHandle;

use crate::region::RegionId;

/// Which backend an agent speaks; peers must speak the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendKind {
    /// One-sided writes emulated over TCP (runs anywhere).
    Tcp,
    /// RDMA over InfiniBand or RoCE.
    Ibverbs,
    /// GPU to GPU on one host: the initiator maps the target's GPU memory
    /// with CUDA IPC and its own GPU writes into it (NVLink or PCIe).
    CudaIpc,
}

/// Which process an agent is: the machine's boot (Linux's
/// `/proc/sys/kernel/random/boot_id`, unique per host and boot) and its pid.
/// CUDA IPC works only between processes of one host, and a process cannot
/// open its own handles, so the CUDA IPC backend needs to know both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub boot_id: String,
    pub pid: u32,
}

impl ProcessId {
    /// This process.
    pub fn current() -> ProcessId {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        ProcessId {
            boot_id,
            pid: std::process::id(),
        }
    }

    /// Whether `other` runs on the same host as this one (unknown counts as no).
    pub fn same_host(&self, other: &ProcessId) -> bool {
        !self.boot_id.is_empty() && self.boot_id == other.boot_id
    }
}

/// One exposed region: its number, size and the key that authorises writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRegion {
    pub id: RegionId,
    pub len: u64,
    /// The remote key: writes that do not present it are refused (RDMA's `rkey`).
    pub rkey: u32,
    /// The region's start in the target's address space: RDMA WRITE names
    /// remote memory by virtual address; the TCP backend ignores it.
    pub address: u64,
    /// The CUDA IPC handle of the region's GPU memory (CUDA IPC backend only).
    pub ipc: Option<IpcHandle>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    pub name: String,
    pub backend: BackendKind,
    /// Where the backend accepts connections (host:port for TCP; the
    /// side channel that exchanges queue-pair numbers for ibverbs).
    pub address: String,
    pub process: ProcessId,
    pub regions: Vec<RemoteRegion>,
}

#[derive(Debug, thiserror::Error)]
#[error("agent metadata does not decode: {0}")]
pub struct MetadataError(String);

impl AgentMetadata {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("metadata encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<AgentMetadata, MetadataError> {
        let config = bincode::config::standard().with_limit::<{ 1 << 20 }>();
        let (metadata, used) = bincode::serde::decode_from_slice(bytes, config)
            .map_err(|e| MetadataError(e.to_string()))?;
        if used != bytes.len() {
            return Err(MetadataError(format!("{} stray bytes", bytes.len() - used)));
        }
        Ok(metadata)
    }

    pub fn region(&self, id: RegionId) -> Option<&RemoteRegion> {
        self.regions.iter().find(|r| r.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        let m = AgentMetadata {
            name: "decode-0".into(),
            backend: BackendKind::Tcp,
            address: "127.0.0.1:9000".into(),
            process: ProcessId::current(),
            regions: vec![
                RemoteRegion {
                    id: RegionId(3),
                    len: 1 << 30,
                    rkey: 0xdead_beef,
                    address: 0x7f00_0000_1000,
                    ipc: None,
                },
                RemoteRegion {
                    id: RegionId(5),
                    len: 4096,
                    rkey: 7,
                    address: 0x7f00_0000_2000,
                    ipc: Some(IpcHandle {
                        bytes: vec![0xab; 65],
                        offset: 512,
                    }),
                },
            ],
        };
        let bytes = m.encode();
        assert_eq!(AgentMetadata::decode(&bytes).unwrap(), m);
        assert!(AgentMetadata::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(AgentMetadata::decode(&longer).is_err());
        assert_eq!(m.region(RegionId(3)).unwrap().rkey, 0xdead_beef);
        assert!(m.region(RegionId(4)).is_none());
        assert_eq!(
            m.region(RegionId(5)).unwrap().ipc.as_ref().unwrap().offset,
            512
        );
    }

    #[test]
    fn a_process_is_on_its_own_host_and_unknown_hosts_are_not_shared() {
        let me = ProcessId::current();
        assert!(!me.boot_id.is_empty(), "Linux has a boot id");
        assert!(me.same_host(&ProcessId {
            pid: 1,
            ..me.clone()
        }));
        let elsewhere = ProcessId {
            boot_id: "another-machine".into(),
            pid: me.pid,
        };
        assert!(!me.same_host(&elsewhere));
        let unknown = ProcessId {
            boot_id: String::new(),
            pid: 1,
        };
        assert!(!unknown.same_host(&unknown));
    }
}
