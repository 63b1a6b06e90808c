//! The libtorch probe: which PyTorch this binary runs on, whether it can use
//! CUDA, and how fast the best device is at the two things LLM serving does
//! all day — multiplying matrices (prefill) and streaming memory (decode).
//!
//! The two numbers are the roofline of chapter 1: a matmul measures the
//! compute ceiling (TFLOP/s), a device-to-device copy the memory-bandwidth
//! ceiling (GB/s), which the report sets against the peak the driver gives
//! (`GpuInfo::peak_memory_gb_per_s`). `module01_baseline bench` draws its
//! roofline at that peak, or at `--mem-bandwidth-gbps` (e.g. the copy's).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::device;
use tch::{Device, Kind, Tensor};

/// What libtorch says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LibtorchProbe {
    /// e.g. `2.11.0+cu130`; `None` when the distribution does not say.
    pub version: Option<String>,
    pub lib_dir: Option<String>,
    /// A sentence: "CUDA available", or why not.
    pub cuda_status: String,
    pub cuda_devices: usize,
    /// The CUDA runtime libtorch was built against, e.g. `13.0`.
    pub cuda_runtime: Option<String>,
    pub cudnn_version: Option<String>,
    /// CPU threads libtorch uses for its kernels.
    pub cpu_threads: i32,
}

/// Reads the libtorch facts. Cheap; the timed part is [`measure_compute`].
pub fn probe() -> LibtorchProbe {
    let cuda_devices = device::cuda_device_count();
    // Only ask CUDA-specific questions when CUDA is really usable: a
    // CPU-only libtorch throws on them.
    let (cuda_runtime, cudnn_version) = if cuda_devices > 0 {
        let runtime = tch::utils::version_cudart();
        let cudnn = tch::Cuda::cudnn_is_available().then(tch::utils::version_cudnn);
        (
            Some(format!("{}.{}", runtime / 1000, (runtime % 1000) / 10)),
            cudnn.map(format_cudnn_version),
        )
    } else {
        (None, None)
    };
    LibtorchProbe {
        version: device::libtorch_version(),
        lib_dir: device::libtorch_lib_dir().map(|d| d.display().to_string()),
        cuda_status: device::cuda_status().to_string(),
        cuda_devices,
        cuda_runtime,
        cudnn_version,
        cpu_threads: tch::get_num_threads(),
    }
}

/// cuDNN encodes its version as `major*10000 + minor*100 + patch` since 9.0
/// (and `major*1000 + minor*100 + patch` before).
fn format_cudnn_version(v: i64) -> String {
    if v >= 90000 {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
    }
}

/// Measured compute and memory speed of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeResult {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The CPU model or GPU name.
    pub hardware: String,
    pub dtype: String,
    /// Square matmul size `n` (each multiply is `2·n³` floating-point operations).
    pub matmul_n: i64,
    pub matmul_tflops: f64,
    /// Size of the buffer copied device-to-device.
    pub copy_bytes: u64,
    /// Copy bandwidth counting bytes read plus bytes written, the way a
    /// roofline counts traffic.
    pub copy_gbps: f64,
    /// Pinned host memory to the GPU (the path a KV cache takes when it is
    /// staged through the CPU); `None` on the CPU.
    pub host_to_device_gbps: Option<f64>,
}

/// How long each timed loop may run (two loops on the CPU, three on a GPU).
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(700);

/// Times a matmul and a memory copy on `device`, each for about `budget`.
///
/// Sizes are chosen so a laptop CPU finishes in seconds: 1024² f32 on the
/// CPU, 8192² bf16 on a GPU (bf16 is what the engine runs there).
pub fn measure_compute(device: Device, budget: Duration) -> ComputeResult {
    let _no_grad = tch::no_grad_guard();
    let (kind, n, copy_bytes) = match device {
        Device::Cpu => (Kind::Float, 1024_i64, 256_u64 << 20),
        _ => (Kind::BFloat16, 8192_i64, 1_u64 << 30),
    };

    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let (iterations, elapsed) = time_loop(device, budget, || {
        let _ = a.matmul(&b);
    });
    let matmul_tflops = 2.0 * (n as f64).powi(3) * iterations as f64 / elapsed / 1e12;

    let elements = (copy_bytes / 4) as i64;
    let src = Tensor::ones([elements], (Kind::Float, device));
    let mut dst = Tensor::zeros([elements], (Kind::Float, device));
    let (iterations, elapsed) = time_loop(device, budget, || dst.copy_(&src));
    let copy_gbps = 2.0 * copy_bytes as f64 * iterations as f64 / elapsed / 1e9;

    let host_to_device_gbps = device.is_cuda().then(|| {
        let host = Tensor::ones([elements], (Kind::Float, Device::Cpu)).pin_memory(device);
        let mut on_device = Tensor::zeros([elements], (Kind::Float, device));
        let (iterations, elapsed) = time_loop(device, budget, || on_device.copy_(&host));
        copy_bytes as f64 * iterations as f64 / elapsed / 1e9
    });

    ComputeResult {
        device: device::device_name(device),
        hardware: device::describe(device),
        dtype: device::kind_name(kind).to_string(),
        matmul_n: n,
        matmul_tflops,
        copy_bytes,
        copy_gbps,
        host_to_device_gbps,
    }
}

// ANCHOR: time_loop
/// Runs `work` twice to warm up, then repeatedly until `budget` has passed.
/// Returns the iterations and the seconds they took. GPU work is
/// asynchronous, so the clock stops only after the device has finished.
fn time_loop(device: Device, budget: Duration, mut work: impl FnMut()) -> (u32, f64) {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    work();
    work();
    sync();
    let start = Instant::now();
    let mut iterations = 0;
    while iterations == 0 || start.elapsed() < budget {
        work();
        iterations += 1;
        if iterations % 4 == 0 {
            sync();
        }
    }
    sync();
    (iterations, start.elapsed().as_secs_f64())
}
// ANCHOR_END: time_loop

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cudnn_versions_decode_both_encodings() {
        assert_eq!(format_cudnn_version(91002), "9.10.2");
        assert_eq!(format_cudnn_version(8902), "8.9.2");
    }

    #[test]
    fn cpu_measurement_is_positive_and_labelled() {
        let r = measure_compute(Device::Cpu, Duration::from_millis(50));
        assert_eq!(r.device, "cpu");
        assert_eq!(r.dtype, "f32");
        assert!(r.matmul_tflops > 0.0 && r.matmul_tflops.is_finite());
        assert!(r.copy_gbps > 0.0 && r.copy_gbps.is_finite());
        assert!(r.host_to_device_gbps.is_none());
    }
}
