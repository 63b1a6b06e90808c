//! CUDA IPC: letting another process on the same host write into our GPU memory.
//!
//! Two processes cannot share a GPU pointer: each has its own address
//! space. CUDA's answer is the IPC handle — 64 bytes that name an
//! allocation. The owner exports a handle and sends it to a peer (over a
//! socket, in this project inside a transfer agent's metadata); the peer
//! opens it and gets a pointer of its own to the same memory, which its
//! kernels and copies can write over NVLink or PCIe. It is the GPU-to-GPU
//! counterpart of an RDMA memory registration: the owner decides what to
//! expose, the peer moves the bytes, and the owner's CPU does nothing.
//!
//! PyTorch allocates tensors inside larger `cudaMalloc` segments, and a
//! handle names a whole segment, so both ends go through PyTorch's caching
//! allocator (as `torch.multiprocessing` does): [`export`] returns the
//! segment's handle and the tensor's offset in it, [`IpcMapping::open`]
//! maps a handle once per process. Handles only work between processes of
//! one host, and a process cannot open its own handles.
//!
//! The bridge (`csrc/cuda_ipc.cpp`) is built when libtorch has CUDA
//! (`cfg(cuda_bridge)`, see `build.rs`); otherwise every call returns
//! [`CudaIpcError::NotCompiled`].

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CudaIpcError {
    #[error(
        "this build has no CUDA IPC support (libtorch without CUDA, or CUDA's headers were \
         missing at build time: pip install nvidia-cuda-crt and rebuild)"
    )]
    NotCompiled,
    #[error("CUDA IPC {stage} failed: {message}")]
    Cuda {
        stage: &'static str,
        message: String,
    },
}

/// What a peer needs to map a span of our GPU memory: the allocation's
/// handle and where the span starts inside the allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcHandle {
    pub bytes: Vec<u8>,
    pub offset: u64,
}

/// Exports the allocation that holds `ptr`, which must be memory of
/// PyTorch's caching allocator (any CUDA tensor's data pointer).
pub fn export(ptr: *const u8) -> Result<IpcHandle, CudaIpcError> {
    imp::export(ptr)
}

/// A peer's allocation, mapped into this process until dropped.
pub struct IpcMapping {
    base: *mut u8,
    #[cfg_attr(not(cuda_bridge), allow(dead_code))]
    raw: *mut std::ffi::c_void,
}

// The mapping is a pointer into device memory plus PyTorch's reference to
// it; neither is tied to a thread.
unsafe impl Send for IpcMapping {}
unsafe impl Sync for IpcMapping {}

impl IpcMapping {
    /// Maps `handle` for use by kernels on CUDA device `device` (peer
    /// access to the allocation's GPU is enabled when it is another one).
    pub fn open(handle: &IpcHandle, device: usize) -> Result<IpcMapping, CudaIpcError> {
        imp::open(&handle.bytes, device)
    }

    /// The start of the exported span (the allocation plus the handle's offset).
    pub fn span_start(&self, handle: &IpcHandle) -> *mut u8 {
        self.base.wrapping_add(handle.offset as usize)
    }
}

#[cfg(cuda_bridge)]
impl Drop for IpcMapping {
    fn drop(&mut self) {
        unsafe { ffi::spark_cuda_ipc_close(self.raw) }
    }
}

/// True when this build can export and open handles at all.
pub fn compiled() -> bool {
    cfg!(cuda_bridge)
}

#[cfg(cuda_bridge)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn spark_cuda_ipc_export(
            ptr: *mut c_void,
            handle: *mut u8,
            handle_cap: usize,
            handle_len: *mut usize,
            offset: *mut i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn spark_cuda_ipc_open(
            handle: *const u8,
            handle_len: usize,
            device: c_int,
            base: *mut *mut c_void,
            mapping: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn spark_cuda_ipc_close(mapping: *mut c_void);
    }
}

#[cfg(cuda_bridge)]
mod imp {
    use std::ffi::{c_char, c_int};

    use super::{ffi, CudaIpcError, IpcHandle, IpcMapping};

    fn call(
        stage: &'static str,
        f: impl FnOnce(*mut c_char, usize) -> c_int,
    ) -> Result<(), CudaIpcError> {
        crate::cuda_bridge::call(f).map_err(|message| CudaIpcError::Cuda { stage, message })
    }

    pub fn export(ptr: *const u8) -> Result<IpcHandle, CudaIpcError> {
        // A CUDA IPC handle is 64 bytes; PyTorch prefixes a kind byte.
        let mut bytes = vec![0u8; 256];
        let (mut len, mut offset) = (0usize, 0i64);
        call("export", |e, n| unsafe {
            ffi::spark_cuda_ipc_export(
                ptr as *mut _,
                bytes.as_mut_ptr(),
                bytes.len(),
                &mut len,
                &mut offset,
                e,
                n,
            )
        })?;
        bytes.truncate(len);
        Ok(IpcHandle {
            bytes,
            offset: offset as u64,
        })
    }

    pub fn open(handle: &[u8], device: usize) -> Result<IpcMapping, CudaIpcError> {
        let (mut base, mut raw) = (std::ptr::null_mut(), std::ptr::null_mut());
        call("open", |e, n| unsafe {
            ffi::spark_cuda_ipc_open(
                handle.as_ptr(),
                handle.len(),
                device as c_int,
                &mut base,
                &mut raw,
                e,
                n,
            )
        })?;
        Ok(IpcMapping {
            base: base as *mut u8,
            raw,
        })
    }
}

#[cfg(not(cuda_bridge))]
mod imp {
    use super::{CudaIpcError, IpcHandle, IpcMapping};

    pub fn export(_ptr: *const u8) -> Result<IpcHandle, CudaIpcError> {
        Err(CudaIpcError::NotCompiled)
    }

    pub fn open(_handle: &[u8], _device: usize) -> Result<IpcMapping, CudaIpcError> {
        Err(CudaIpcError::NotCompiled)
    }
}
