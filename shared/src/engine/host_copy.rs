//! Copies between the host and the GPU that take their place in the
//! stream's order instead of waiting for it.
//!
//! tch's copies wait. `tensor.to_device(Device::Cpu)` copies into ordinary
//! (pageable) host memory, and for that CUDA waits until everything queued
//! on the stream is done; a copy *from* pageable memory may wait for the
//! stream too. That was right while the engine read a decode step's tokens
//! as the last thing it had queued. Once it queues the *next* step before
//! reading this one's tokens (the engine's decode ahead, see [`Engine`]),
//! such copies would wait for that next step, and the overlap would be
//! lost.
//!
//! So both directions go through pinned (page-locked) host memory, which
//! the GPU reads and writes by DMA in the stream's order (`non_blocking`):
//!
//! * [`copy_to_device`] stages the next step's inputs in a pinned buffer
//!   and queues the transfer;
//! * [`HostCopy`] queues a transfer of a step's tokens into a pinned
//!   buffer and records a CUDA event right behind it. Waiting for the event
//!   waits for the copy and what came before it — the step whose tokens
//!   these are — and not for the step queued after.
//!
//! In Python this is `x.pin_memory().to("cuda", non_blocking=True)`,
//! `x.to("cpu", non_blocking=True)` and `torch.cuda.Event`. On a CPU there
//! is nothing to overlap: the copies are done when they return. The pinned
//! staging and the event are functions of the C++ bridge
//! (`csrc/host_copy.cpp`); a build without it copies the waiting way.
//!
//! [`Engine`]: super::Engine

use tch::{Device, Kind, Tensor};

use super::cuda_graph::{CudaGraph, CudaGraphError};

/// Copies `values` into `dst` (int64, as many elements) without waiting for
/// the work queued on `dst`'s device.
pub fn copy_to_device(dst: &mut Tensor, values: &[i64]) -> Result<(), CudaGraphError> {
    if dst.device().is_cuda() && CudaGraph::compiled() {
        assert_eq!(dst.numel(), values.len(), "one value per element");
        return imp::copy_to_device(dst, values);
    }
    dst.copy_(&Tensor::from_slice(values));
    Ok(())
}

/// `values` as an int64 tensor on `device`, copied there without waiting
/// for the work queued on it (through [`copy_to_device`]); the waiting
/// way where that cannot be done. A forward's indices (tokens, positions,
/// slots) go up this way, so that a forward queued behind a decode step
/// does not first wait for it.
pub fn upload(values: &[i64], device: Device) -> Tensor {
    if device.is_cuda() && CudaGraph::compiled() {
        let mut dst = Tensor::empty([values.len() as i64], (Kind::Int64, device));
        match copy_to_device(&mut dst, values) {
            Ok(()) => return dst,
            Err(err) => tracing::warn!("an upload waits for the stream instead: {err}"),
        }
    }
    Tensor::from_slice(values).to_device(device)
}

/// A copy to the host that may still be in flight.
pub struct HostCopy {
    host: Tensor,
    /// Recorded behind the copy; `None` when the copy is already done.
    event: Option<CudaEvent>,
}

impl HostCopy {
    /// Queues a copy of `src` to the host and returns without waiting for it.
    pub fn start(src: &Tensor) -> Result<HostCopy, CudaGraphError> {
        match src.device() {
            Device::Cuda(index) if CudaGraph::compiled() => {
                let host = src.to_device_(Device::Cpu, src.kind(), true, false);
                let event = CudaEvent::record(index)?;
                Ok(HostCopy {
                    host,
                    event: Some(event),
                })
            }
            Device::Cpu => Ok(HostCopy {
                host: src.copy(),
                event: None,
            }),
            _ => Ok(HostCopy {
                host: src.to_device(Device::Cpu),
                event: None,
            }),
        }
    }

    /// Waits for the copy and returns it.
    pub fn wait(self) -> Result<Tensor, CudaGraphError> {
        if let Some(event) = &self.event {
            event.synchronize()?;
        }
        Ok(self.host)
    }
}

/// A CUDA event recorded on a device's current stream.
struct CudaEvent {
    #[cfg_attr(not(cuda_bridge), allow(dead_code))]
    raw: *mut std::ffi::c_void,
}

// Like the graphs, the event belongs to one engine, which may move between
// threads; CUDA events have no thread affinity.
unsafe impl Send for CudaEvent {}

impl CudaEvent {
    fn record(device: usize) -> Result<CudaEvent, CudaGraphError> {
        imp::record(device)
    }

    fn synchronize(&self) -> Result<(), CudaGraphError> {
        imp::synchronize(self)
    }
}

#[cfg(cuda_bridge)]
impl Drop for CudaEvent {
    fn drop(&mut self) {
        unsafe { imp::ffi::spark_cuda_event_free(self.raw) }
    }
}

#[cfg(cuda_bridge)]
mod imp {
    use std::ffi::{c_char, c_int};

    use tch::Tensor;

    use super::{CudaEvent, CudaGraphError};

    pub mod ffi {
        use std::ffi::{c_char, c_int, c_void};

        extern "C" {
            pub fn spark_copy_to_device_async(
                dst: *mut c_void,
                values: *const i64,
                count: i64,
                err: *mut c_char,
                err_len: usize,
            ) -> c_int;
            pub fn spark_cuda_event_record(
                device: c_int,
                out: *mut *mut c_void,
                err: *mut c_char,
                err_len: usize,
            ) -> c_int;
            pub fn spark_cuda_event_synchronize(
                event: *mut c_void,
                err: *mut c_char,
                err_len: usize,
            ) -> c_int;
            pub fn spark_cuda_event_free(event: *mut c_void);
        }
    }

    fn call(
        stage: &'static str,
        f: impl FnOnce(*mut c_char, usize) -> c_int,
    ) -> Result<(), CudaGraphError> {
        crate::cuda_bridge::call(f).map_err(|message| CudaGraphError::HostCopy { stage, message })
    }

    pub fn copy_to_device(dst: &mut Tensor, values: &[i64]) -> Result<(), CudaGraphError> {
        // tch's tensor handle is a pointer to the C++ at::Tensor.
        let dst = dst.as_mut_ptr().cast();
        call("staged copy", |e, n| unsafe {
            ffi::spark_copy_to_device_async(dst, values.as_ptr(), values.len() as i64, e, n)
        })
    }

    pub fn record(device: usize) -> Result<CudaEvent, CudaGraphError> {
        let mut raw = std::ptr::null_mut();
        call("record", |e, n| unsafe {
            ffi::spark_cuda_event_record(device as c_int, &mut raw, e, n)
        })?;
        Ok(CudaEvent { raw })
    }

    pub fn synchronize(event: &CudaEvent) -> Result<(), CudaGraphError> {
        call("wait", |e, n| unsafe {
            ffi::spark_cuda_event_synchronize(event.raw, e, n)
        })
    }
}

#[cfg(not(cuda_bridge))]
mod imp {
    use tch::Tensor;

    use super::{CudaEvent, CudaGraphError};

    pub fn copy_to_device(_dst: &mut Tensor, _values: &[i64]) -> Result<(), CudaGraphError> {
        Err(CudaGraphError::NotCompiled)
    }

    pub fn record(_device: usize) -> Result<CudaEvent, CudaGraphError> {
        Err(CudaGraphError::NotCompiled)
    }

    pub fn synchronize(_event: &CudaEvent) -> Result<(), CudaGraphError> {
        Err(CudaGraphError::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn a_host_copy_holds_the_values_at_its_start() {
        let device = crate::device::cuda_if_available();
        let mut src = Tensor::arange(5, (Kind::Int64, device));
        let copy = HostCopy::start(&src).unwrap();
        // Queued after the copy: must not show in it.
        let _ = src.fill_(-1);
        let host = copy.wait().unwrap();
        assert_eq!(host.device(), Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&host).unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_copy_to_the_device_lands_before_the_work_queued_after_it() {
        let device = crate::device::cuda_if_available();
        let mut dst = Tensor::zeros([4], (Kind::Int64, device));
        let mut values = vec![3, 1, 4, 1];
        copy_to_device(&mut dst, &values).unwrap();
        // The host's buffer may change at once: the values were staged.
        values.fill(9);
        let doubled = &dst * 2;
        assert_eq!(Vec::<i64>::try_from(&doubled).unwrap(), vec![6, 2, 8, 2]);
    }
}
