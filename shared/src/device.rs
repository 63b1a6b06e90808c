//! Choosing where the model runs and in which precision.
//!
//! The rule of thumb the whole course uses: **CUDA and bf16 when a GPU is
//! there, CPU and f32 otherwise**. bf16 halves the bytes every decode step
//! has to stream from memory, which on a GPU is most of the cost; on a CPU,
//! PyTorch's f32 kernels are the fast and exact path.
//!
//! One wrinkle is specific to Rust: PyTorch's CUDA support lives in a
//! separate library, `libtorch_cuda.so`, and no Rust symbol refers to it, so
//! the linker drops it. [`load_cuda_runtime`] opens it at run time from the
//! directory the rest of libtorch was loaded from, the way Python's
//! `import torch` does.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use tch::{Device, Kind};

/// `--device`: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--dtype`: `auto`, `f32`, `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DtypeChoice::Auto),
            "f32" | "float32" | "float" => Ok(DtypeChoice::F32),
            "bf16" | "bfloat16" => Ok(DtypeChoice::Bf16),
            "f16" | "float16" | "half" => Ok(DtypeChoice::F16),
            _ => Err(format!("unknown dtype {s:?}: use auto, f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::F16 => "f16",
        };
        f.write_str(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "CUDA was requested but is not available ({reason}); run with --device cpu, \
         or check the GPU with `cargo run -p module00_env`"
    )]
    CudaUnavailable { reason: String },
    #[error("cuda:{index} was requested but only {count} CUDA device(s) are visible")]
    NoSuchGpu { index: usize, count: usize },
}

/// Resolves the user's choice to a concrete device and element type.
pub fn resolve(device: DeviceChoice, dtype: DtypeChoice) -> Result<(Device, Kind), DeviceError> {
    let device = match device {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Auto => {
            if cuda_device_count() > 0 {
                Device::Cuda(0)
            } else {
                Device::Cpu
            }
        }
        DeviceChoice::Cuda(index) => {
            let count = cuda_device_count();
            if count == 0 {
                return Err(DeviceError::CudaUnavailable {
                    reason: cuda_status().to_string(),
                });
            }
            if index >= count {
                return Err(DeviceError::NoSuchGpu { index, count });
            }
            Device::Cuda(index)
        }
    };
    let kind = match (dtype, device) {
        (DtypeChoice::Auto, Device::Cpu) => Kind::Float,
        (DtypeChoice::Auto, _) => Kind::BFloat16,
        (DtypeChoice::F32, _) => Kind::Float,
        (DtypeChoice::Bf16, _) => Kind::BFloat16,
        (DtypeChoice::F16, _) => Kind::Half,
    };
    Ok((device, kind))
}

/// Number of CUDA devices libtorch can use (0 without a GPU or CUDA build).
pub fn cuda_device_count() -> usize {
    if load_cuda_runtime().is_err() {
        return 0;
    }
    tch::Cuda::device_count().max(0) as usize
}

/// The first GPU where there is one, else the CPU: tch's
/// `Device::cuda_if_available` after [`load_cuda_runtime`], which must
/// come before any CUDA query (a query made first settles on "no CUDA" for
/// the life of the process).
pub fn cuda_if_available() -> Device {
    if cuda_device_count() > 0 {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// A human-readable sentence on why CUDA is or is not usable.
pub fn cuda_status() -> &'static str {
    match load_cuda_runtime() {
        Ok(()) if tch::Cuda::device_count() > 0 => "CUDA available",
        Ok(()) => "libtorch has CUDA support but no GPU is visible",
        Err(reason) => reason,
    }
}

/// Opens `libtorch_cuda.so` once, from the directory libtorch was loaded from.
///
/// Returns why not where that is impossible (a CPU-only libtorch, or a
/// platform without it); calling it again returns the first answer.
pub fn load_cuda_runtime() -> Result<(), &'static str> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // No CUDA query may run before this: libtorch looks its CUDA hooks
            // up once and caches the answer. libtorch_cpu.so is already mapped
            // (the binary links it), so its directory can be found.
            let dir = libtorch_lib_dir().ok_or("libtorch's directory could not be found")?;
            let path = dir.join("libtorch_cuda.so");
            if !path.exists() {
                return Err(format!(
                    "this libtorch ({}) is a CPU-only build",
                    dir.display()
                ));
            }
            // SAFETY: loading libtorch_cuda runs its static initialisers, which
            // register CUDA kernels with the already-loaded libtorch — exactly
            // what happens when it is linked normally.
            let library = unsafe {
                libloading::os::unix::Library::open(
                    Some(&path),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            // Kept for the life of the process, like a linked library.
            std::mem::forget(library);
            Ok(())
        })
        .as_ref()
        .map(|_| ())
        .map_err(|e| e.as_str())
}

/// The directory holding `libtorch_cpu.so`, read from this process's memory map.
pub fn libtorch_lib_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| std::path::Path::new(path).parent().map(|p| p.to_path_buf()))
}

/// The libtorch release this process runs on, e.g. `2.11.0+cu128`.
///
/// libtorch has no C API for its own version, so this reads what its
/// distribution ships beside the libraries: `version.py` in a PyTorch wheel,
/// `build-version` in a standalone libtorch archive.
pub fn libtorch_version() -> Option<String> {
    let root = libtorch_lib_dir()?.parent()?.to_path_buf();
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let version = text.lines().find_map(|l| {
            let value = l.strip_prefix("__version__")?.split('=').nth(1)?;
            Some(
                value
                    .trim()
                    .trim_matches(|c| c == '\'' || c == '"')
                    .to_string(),
            )
        });
        if version.is_some() {
            return version;
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|v| v.trim().to_string())
}

/// Short name of a device for tables and logs (`cpu`, `cuda:0`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Short name of an element type (`f32`, `bf16`, `f16`).
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Double => "f64",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Int64 => "int64",
        _ => "other",
    }
}

/// Memory of one GPU, as the driver reports it (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    pub total: u64,
    pub used: u64,
    pub free: u64,
}

/// NVML, opened once. `None` without an NVIDIA driver (libnvidia-ml is
/// loaded at run time, so a machine without one still runs everything else).
pub fn nvml() -> Option<&'static nvml_wrapper::Nvml> {
    nvml_or_reason().ok()
}

/// NVML, or a sentence saying why it cannot be used (for reports that must
/// explain a missing GPU rather than merely notice it).
pub fn nvml_or_reason() -> Result<&'static nvml_wrapper::Nvml, &'static str> {
    use nvml_wrapper::error::NvmlError;
    static NVML: OnceLock<Result<nvml_wrapper::Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| {
        nvml_wrapper::Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(_) => {
                "libnvidia-ml not found: no NVIDIA driver is installed".to_string()
            }
            NvmlError::DriverNotLoaded => {
                "the NVIDIA driver is installed but not loaded (is the kernel module in?)"
                    .to_string()
            }
            NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_string(),
            other => format!("NVML failed to start: {other}"),
        })
    })
    .as_ref()
    .map_err(|e| e.as_str())
}

/// Memory of GPU `index` (NVML numbering, which is CUDA's unless
/// `CUDA_VISIBLE_DEVICES` reorders them).
pub fn gpu_memory(index: usize) -> Option<GpuMemory> {
    let info = nvml()?
        .device_by_index(index as u32)
        .ok()?
        .memory_info()
        .ok()?;
    Some(GpuMemory {
        total: info.total,
        used: info.used,
        free: info.free,
    })
}

/// A GPU's memory interface as its driver reports it: enough to know the
/// peak bandwidth, the ceiling of every memory-bound kernel (a batch-1
/// decode step above all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInterface {
    /// Width of the memory bus, in bits (5120 for an H100's five HBM3 stacks).
    pub bus_bits: u32,
    /// The memory's highest clock, in MHz.
    pub clock_mhz: u32,
}

impl MemoryInterface {
    /// The peak bandwidth in GB/s: the bus moves `bus_bits / 8` bytes twice
    /// per clock (double data rate). This is the datasheet figure, not what
    /// a kernel reaches: streaming reads get about 90 % of it.
    pub fn peak_gb_per_s(self) -> f64 {
        2.0 * self.clock_mhz as f64 * 1e6 * (self.bus_bits as f64 / 8.0) / 1e9
    }
}

/// The memory interface of GPU `index` (NVML numbering), or `None`
/// without a driver, or where the driver does not say (some VMs hide clocks).
pub fn memory_interface(index: usize) -> Option<MemoryInterface> {
    use nvml_wrapper::enum_wrappers::device::Clock;
    let device = nvml()?.device_by_index(index as u32).ok()?;
    Some(MemoryInterface {
        bus_bits: device.memory_bus_width().ok()?,
        clock_mhz: device.max_clock_info(Clock::Memory).ok()?,
    })
}

/// The hardware behind a device, for result files: the GPU's name, or the CPU's model and core count.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => nvml()
            .and_then(|n| n.device_by_index(i as u32).ok())
            .and_then(|d| d.name().ok())
            .unwrap_or_else(|| format!("CUDA device {i}")),
        _ => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let model = cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
                .unwrap_or_else(|| std::env::consts::ARCH.to_string());
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            format!("{model}, {threads} threads")
        }
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Today's date (UTC), for result files.
pub fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_and_dtype_flags() {
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!("CPU".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert!("tpu"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .contains("cuda:N"));
        assert_eq!("bfloat16".parse::<DtypeChoice>(), Ok(DtypeChoice::Bf16));
        assert!("int3".parse::<DtypeChoice>().is_err());
    }

    #[test]
    fn cpu_defaults_to_f32() {
        assert_eq!(
            resolve(DeviceChoice::Cpu, DtypeChoice::Auto).unwrap(),
            (Device::Cpu, Kind::Float)
        );
        assert_eq!(
            resolve(DeviceChoice::Cpu, DtypeChoice::Bf16).unwrap(),
            (Device::Cpu, Kind::BFloat16)
        );
    }

    #[test]
    fn peak_bandwidth_matches_the_datasheets() {
        // What NVML reports for three GPUs, and their datasheets' GB/s.
        for (bus_bits, clock_mhz, datasheet) in [
            (5120, 2619, 3350.0), // H100 SXM, HBM3
            (5120, 1215, 1555.0), // A100 40 GB, HBM2
            (384, 10501, 1008.0), // RTX 4090, GDDR6X
        ] {
            let peak = MemoryInterface {
                bus_bits,
                clock_mhz,
            }
            .peak_gb_per_s();
            assert!(
                (peak / datasheet - 1.0).abs() < 0.01,
                "{bus_bits}-bit at {clock_mhz} MHz: {peak} GB/s, datasheet {datasheet}"
            );
        }
    }
}
