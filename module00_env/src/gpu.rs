//! The GPU probe: what the NVIDIA driver says about each GPU, through NVML.
//!
//! NVML (`libnvidia-ml.so`) is the library behind `nvidia-smi`. It ships with
//! the driver, not with CUDA, so it answers even when libtorch was built
//! without CUDA — and its absence is the clearest sign that there is no
//! NVIDIA driver at all. `nvml-wrapper` opens it at run time, so a laptop
//! without one gets a sentence, not a crash.

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use serde::{Deserialize, Serialize};

/// Everything module 0 reports about one GPU. Fields the driver does not
/// answer (a consumer card has no NVLink, a VM may hide clocks) are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// CUDA compute capability, e.g. `9.0` for Hopper.
    pub compute_capability: Option<String>,
    pub sm_clock_max_mhz: Option<u32>,
    pub memory_clock_max_mhz: Option<u32>,
    /// Width of the memory bus in bits; with the memory clock it gives the
    /// peak bandwidth (see `shared::device::MemoryInterface`).
    #[serde(default)]
    pub memory_bus_bits: Option<u32>,
    pub temperature_c: Option<u32>,
    /// PCIe generation and lane count the link runs at now.
    pub pcie_generation: Option<u32>,
    pub pcie_width: Option<u32>,
    /// NVLink links that are up (0 without NVLink).
    pub nvlink_active_links: u32,
}

/// The GPU side of the machine: the driver, and every GPU it sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProbe {
    pub driver_version: Option<String>,
    /// The newest CUDA version the driver supports, e.g. `12.8`.
    pub cuda_driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
    /// Why there are no GPUs, when there are none.
    pub missing: Option<String>,
}

impl GpuProbe {
    /// A probe result for a machine without a usable NVIDIA driver.
    pub fn none(reason: impl Into<String>) -> Self {
        GpuProbe {
            driver_version: None,
            cuda_driver_version: None,
            gpus: Vec::new(),
            missing: Some(reason.into()),
        }
    }
}

impl GpuInfo {
    /// The memory's peak bandwidth in GB/s, where the driver tells both
    /// the bus width and the clock.
    pub fn peak_memory_gb_per_s(&self) -> Option<f64> {
        let (bus_bits, clock_mhz) = (self.memory_bus_bits?, self.memory_clock_max_mhz?);
        Some(
            shared::device::MemoryInterface {
                bus_bits,
                clock_mhz,
            }
            .peak_gb_per_s(),
        )
    }
}

/// NVLink links a device can have; NVML numbers them from 0.
const MAX_NVLINKS: u32 = 18;

/// Asks the driver. Never fails: a missing driver is a result.
pub fn probe() -> GpuProbe {
    let nvml = match shared::device::nvml_or_reason() {
        Ok(nvml) => nvml,
        Err(reason) => return GpuProbe::none(reason),
    };
    let count = nvml.device_count().unwrap_or(0);
    let gpus: Vec<GpuInfo> = (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok().map(|d| (i, d)))
        .map(|(index, device)| {
            let memory = device.memory_info().ok();
            GpuInfo {
                index,
                name: device.name().unwrap_or_else(|_| format!("GPU {index}")),
                memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
                compute_capability: device
                    .cuda_compute_capability()
                    .ok()
                    .map(|c| format!("{}.{}", c.major, c.minor)),
                sm_clock_max_mhz: device.max_clock_info(Clock::SM).ok(),
                memory_clock_max_mhz: device.max_clock_info(Clock::Memory).ok(),
                memory_bus_bits: device.memory_bus_width().ok(),
                temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
                pcie_generation: device.current_pcie_link_gen().ok(),
                pcie_width: device.current_pcie_link_width().ok(),
                nvlink_active_links: (0..MAX_NVLINKS)
                    .filter(|&link| device.link_wrapper_for(link).is_active().unwrap_or(false))
                    .count() as u32,
            }
        })
        .collect();
    let missing = gpus
        .is_empty()
        .then(|| "the NVIDIA driver is loaded but reports no GPU".to_string());
    GpuProbe {
        driver_version: nvml.sys_driver_version().ok(),
        cuda_driver_version: nvml.sys_cuda_driver_version().ok().map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        }),
        gpus,
        missing,
    }
}
