//! What an agent tells its peers about itself.
//!
//! Before any one-sided write, the target must publish where it can be
//! reached and which memory it exposes; the initiator loads that metadata
//! and can then address the target's memory by descriptor. In NIXL this is
//! `getLocalMD` / `loadRemoteMD`; in module 6 it travels through the
//! registry. It is a plain serialisable value, encoded with bincode here.

use serde::{Deserialize, Serialize};

use crate::region::RegionId;

/// Which backend an agent speaks; peers must speak the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendKind {
    /// One-sided writes emulated over TCP (runs anywhere).
    Tcp,
    /// RDMA over InfiniBand or RoCE.
    Ibverbs,
}

/// One exposed region: its number, size and the key that authorises writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRegion {
    pub id: RegionId,
    pub len: u64,
    /// The remote key: writes that do not present it are refused (RDMA's `rkey`).
    pub rkey: u32,
    /// The region's start in the target's address space: RDMA WRITE names
    /// remote memory by virtual address; the TCP backend ignores it.
    pub address: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    pub name: String,
    pub backend: BackendKind,
    /// Where the backend accepts connections (host:port for TCP; the
    /// side channel that exchanges queue-pair numbers for ibverbs).
    pub address: String,
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
            regions: vec![RemoteRegion {
                id: RegionId(3),
                len: 1 << 30,
                rkey: 0xdead_beef,
                address: 0x7f00_0000_1000,
            }],
        };
        let bytes = m.encode();
        assert_eq!(AgentMetadata::decode(&bytes).unwrap(), m);
        assert!(AgentMetadata::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(AgentMetadata::decode(&longer).is_err());
        assert_eq!(m.region(RegionId(3)).unwrap().rkey, 0xdead_beef);
        assert!(m.region(RegionId(4)).is_none());
    }
}
