//! Registered memory and the descriptors that address it.
//!
//! A [`MemoryRegion`] is a span of memory an agent has made remotely
//! writable. Peers never see pointers: they address memory as
//! *(region, offset, length)* — a [`Descriptor`] — and every write is
//! checked against the region's length before a byte moves, on both sides.
//! Real RDMA NICs do the same check in hardware (a write outside a memory
//! registration fails with a remote access error).

use serde::{Deserialize, Serialize};

/// Which registration a descriptor refers to, numbered by the owning agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegionId(pub u32);

/// *(region, offset, length)*: a span inside one registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

impl Descriptor {
    pub fn new(region: RegionId, offset: u64, len: u64) -> Self {
        Descriptor {
            region,
            offset,
            len,
        }
    }

    /// Whether the span lies inside a region of `region_len` bytes.
    pub fn fits(&self, region_len: u64) -> bool {
        self.offset
            .checked_add(self.len)
            .is_some_and(|end| end <= region_len)
    }
}

/// Where a region's memory lives. Only an RDMA NIC with GPUDirect can
/// reach GPU memory directly; a CPU (the TCP backend) needs host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    Host,
    /// Device memory of CUDA device `n`.
    Cuda(usize),
}

/// Memory an agent can register. Either owned (a buffer this region
/// allocated) or borrowed (someone else's memory, e.g. a KV pool tensor,
/// whose owner promises to keep it alive while registered).
pub struct MemoryRegion {
    ptr: *mut u8,
    len: usize,
    location: Location,
    _owned: Option<Vec<u8>>,
}

// SAFETY: a region is plain memory; who may write it when is the agent's
// protocol (writes land only in registered spans, reads after notification).
unsafe impl Send for MemoryRegion {}
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// A zeroed buffer of `len` bytes, owned by the region.
    pub fn alloc(len: usize) -> MemoryRegion {
        let mut buffer = vec![0u8; len];
        MemoryRegion {
            ptr: buffer.as_mut_ptr(),
            len,
            location: Location::Host,
            _owned: Some(buffer),
        }
    }

    /// Someone else's memory.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be memory at `location` that stays valid and
    /// unmoved for as long as the region is registered, and nothing may
    /// read it while a peer may be writing it (wait for the notification) —
    /// the same contract RDMA memory registration has.
    pub unsafe fn borrowed(ptr: *mut u8, len: usize, location: Location) -> MemoryRegion {
        MemoryRegion {
            ptr,
            len,
            location,
            _owned: None,
        }
    }

    /// The memory of a contiguous tensor (a KV pool, say), on the host or
    /// on a GPU.
    ///
    /// # Safety
    /// As for [`MemoryRegion::borrowed`]: the tensor must outlive the registration.
    pub unsafe fn of_tensor(tensor: &tch::Tensor) -> MemoryRegion {
        assert!(
            tensor.is_contiguous(),
            "only contiguous tensors can be registered"
        );
        let location = match tensor.device() {
            tch::Device::Cuda(n) => Location::Cuda(n),
            _ => Location::Host,
        };
        let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
        MemoryRegion::borrowed(tensor.data_ptr() as *mut u8, len, location)
    }

    pub fn location(&self) -> Location {
        self.location
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes of `descriptor`'s span (which must fit).
    ///
    /// # Safety
    /// No peer may be writing the span (see [`MemoryRegion::borrowed`]).
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "span outside the region");
        assert_eq!(
            self.location,
            Location::Host,
            "the CPU can only read host memory"
        );
        std::slice::from_raw_parts(self.ptr.add(offset), len)
    }

    /// Writable bytes of a span.
    ///
    /// # Safety
    /// As for [`MemoryRegion::bytes`], and no other reference to the span may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "span outside the region");
        assert_eq!(
            self.location,
            Location::Host,
            "the CPU can only write host memory"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(offset), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_fit_or_not() {
        let d = Descriptor::new(RegionId(0), 96, 32);
        assert!(d.fits(128));
        assert!(!d.fits(127));
        // Overflowing offset + len must not wrap around into "fits".
        assert!(!Descriptor::new(RegionId(0), u64::MAX, 2).fits(u64::MAX));
    }
}
