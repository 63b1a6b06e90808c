//! CUDA graphs: record a decode step's kernel launches once, replay them with one call.
//!
//! A decode step of a 22-layer model launches about a thousand small
//! kernels. Each launch costs the CPU some microseconds (PyTorch's
//! dispatcher, then the driver), and at batch 1 the GPU finishes most
//! kernels faster than the CPU can launch the next: the profile in module 1's
//! chapter found the GPU busy only a quarter of the time. A CUDA graph is
//! the fix every serving engine uses: run the step once under *capture*,
//! which records the kernels and their arguments (pointers included)
//! instead of running them, then *replay* the recording with one launch.
//!
//! The price is that a graph is frozen: same shapes, same memory addresses.
//! Inputs must be written into the tensors the graph was captured with, and
//! outputs appear in the tensors it produced during capture. The engine's
//! [`DecodeGraphs`](super::decode_graph::DecodeGraphs) arranges that.
//!
//! tch does not expose graphs, so `csrc/cuda_graph.cpp` wraps libtorch's
//! `at::cuda::CUDAGraph` (which also makes PyTorch's allocator give the
//! capture a private memory pool). It is compiled only when libtorch has
//! CUDA (`cfg(cuda_bridge)`, set by `build.rs`); otherwise
//! [`CudaGraph::capture`] returns [`CudaGraphError::NotCompiled`].

#[cfg(cuda_bridge)]
use std::ffi::c_int;

use tch::Device;

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CudaGraphError {
    #[error(
        "this build has no CUDA graph support (libtorch without CUDA, or CUDA's headers were \
         missing at build time: pip install nvidia-cuda-crt and rebuild)"
    )]
    NotCompiled,
    #[error("CUDA graphs need a CUDA device, not {0:?}")]
    NotCuda(Device),
    #[error("CUDA graph {stage} failed: {message}")]
    Cuda {
        stage: &'static str,
        message: String,
    },
    #[error("copy between host and GPU ({stage}) failed: {message}")]
    HostCopy {
        stage: &'static str,
        message: String,
    },
}

/// A memory pool shared by several graphs. Graphs captured into the same
/// pool may reuse each other's scratch memory, which is safe as long as
/// they are replayed one at a time and each output is read before another
/// graph of the pool replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphPool(u64, u64);

/// One captured CUDA graph.
pub struct CudaGraph {
    #[cfg_attr(not(cuda_bridge), allow(dead_code))]
    raw: *mut std::ffi::c_void,
}

// The graph is owned by one engine at a time and replayed from whichever
// thread runs that engine; libtorch's CUDAGraph has no thread affinity.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// True when this build can capture graphs at all.
    pub fn compiled() -> bool {
        cfg!(cuda_bridge)
    }

    /// A new pool id for [`CudaGraph::capture`].
    pub fn new_pool() -> Result<GraphPool, CudaGraphError> {
        imp::new_pool()
    }

    /// Captures what `body` launches on `device` into a graph (the work is
    /// recorded, not run) and returns the graph with `body`'s result, whose
    /// tensors are the graph's outputs.
    ///
    /// `body` must not synchronise with the host (no `.int64_value()`, no
    /// copy to the CPU) and must not copy from host memory: those are not
    /// allowed inside a capture. If it panics, the capture is ended before
    /// the panic goes on, so the device stays usable.
    pub fn capture<T>(
        device: Device,
        pool: GraphPool,
        body: impl FnOnce() -> T,
    ) -> Result<(CudaGraph, T), CudaGraphError> {
        let Device::Cuda(index) = device else {
            return Err(CudaGraphError::NotCuda(device));
        };
        imp::capture(index, pool, body)
    }

    /// Turns PyTorch's cuDNN attention backend on or off for the whole
    /// process and returns whether it was on (a build without CUDA graph
    /// support does nothing and returns false).
    ///
    /// cuDNN's fused attention is the fastest on an H100 once planned, but
    /// it builds an execution plan for every new shape (tens of
    /// milliseconds; see pytorch/pytorch#155958). Inside a CUDA graph that
    /// happens once, at capture. Outside one the engine's shapes change
    /// every step — contexts grow by a token, prefill chunks vary — so the
    /// engine turns it off and PyTorch picks flash or memory-efficient
    /// attention, or plain matrix products.
    pub fn set_cudnn_attention(enabled: bool) -> bool {
        #[cfg(cuda_bridge)]
        unsafe {
            ffi::spark_sdp_use_cudnn(c_int::from(enabled)) != 0
        }
        #[cfg(not(cuda_bridge))]
        {
            let _ = enabled;
            false
        }
    }

    /// Runs the recorded work again, on the current stream, with whatever
    /// the input tensors hold now.
    pub fn replay(&self) -> Result<(), CudaGraphError> {
        imp::replay(self)
    }
}

#[cfg(cuda_bridge)]
impl Drop for CudaGraph {
    fn drop(&mut self) {
        unsafe { ffi::spark_cuda_graph_free(self.raw) }
    }
}

#[cfg(cuda_bridge)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn spark_cuda_graph_pool_handle(
            first: *mut u64,
            second: *mut u64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn spark_cuda_graph_new(out: *mut *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn spark_cuda_graph_free(graph: *mut c_void);
        pub fn spark_cuda_graph_begin(
            graph: *mut c_void,
            device: c_int,
            pool_first: u64,
            pool_second: u64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn spark_cuda_graph_end(graph: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn spark_cuda_graph_replay(graph: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn spark_sdp_use_cudnn(enabled: c_int) -> c_int;
    }
}

#[cfg(cuda_bridge)]
mod imp {
    use std::ffi::{c_char, c_int};

    use super::{ffi, CudaGraph, CudaGraphError, GraphPool};

    fn call(
        stage: &'static str,
        f: impl FnOnce(*mut c_char, usize) -> c_int,
    ) -> Result<(), CudaGraphError> {
        crate::cuda_bridge::call(f).map_err(|message| CudaGraphError::Cuda { stage, message })
    }

    pub fn new_pool() -> Result<GraphPool, CudaGraphError> {
        let (mut first, mut second) = (0, 0);
        call("pool", |e, n| unsafe {
            ffi::spark_cuda_graph_pool_handle(&mut first, &mut second, e, n)
        })?;
        Ok(GraphPool(first, second))
    }

    pub fn capture<T>(
        device: usize,
        pool: GraphPool,
        body: impl FnOnce() -> T,
    ) -> Result<(CudaGraph, T), CudaGraphError> {
        let mut raw = std::ptr::null_mut();
        call("creation", |e, n| unsafe {
            ffi::spark_cuda_graph_new(&mut raw, e, n)
        })?;
        let graph = CudaGraph { raw };
        call("capture start", |e, n| unsafe {
            ffi::spark_cuda_graph_begin(raw, device as c_int, pool.0, pool.1, e, n)
        })?;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        let ended = call("capture", |e, n| unsafe {
            ffi::spark_cuda_graph_end(raw, e, n)
        });
        match result {
            Ok(value) => ended.map(|()| (graph, value)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub fn replay(graph: &CudaGraph) -> Result<(), CudaGraphError> {
        call("replay", |e, n| unsafe {
            ffi::spark_cuda_graph_replay(graph.raw, e, n)
        })
    }
}

#[cfg(not(cuda_bridge))]
mod imp {
    use super::{CudaGraph, CudaGraphError, GraphPool};

    pub fn new_pool() -> Result<GraphPool, CudaGraphError> {
        Err(CudaGraphError::NotCompiled)
    }

    pub fn capture<T>(
        _device: usize,
        _pool: GraphPool,
        _body: impl FnOnce() -> T,
    ) -> Result<(CudaGraph, T), CudaGraphError> {
        Err(CudaGraphError::NotCompiled)
    }

    pub fn replay(_graph: &CudaGraph) -> Result<(), CudaGraphError> {
        Err(CudaGraphError::NotCompiled)
    }
}
