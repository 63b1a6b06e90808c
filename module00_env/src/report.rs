//! The report: every probe's result, the verdicts drawn from them, and the
//! one-screen text a student reads.
//!
//! Probing (which touches hardware) and reporting (which only formats) are
//! kept apart: [`EnvReport::new`] takes results, however they were obtained,
//! so the tests can feed it a laptop, a GPU server or a DGX-like node
//! without owning one.

use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::etcd::EtcdProbe;
use crate::gpu::{GpuInfo, GpuProbe};
use crate::libtorch::{ComputeResult, LibtorchProbe};
use crate::net::NetCheck;
use crate::rdma::RdmaProbe;
use crate::verdict::{self, ModuleVerdict};

/// The model file modules 1-3 and 6 load by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelProbe {
    pub path: Option<String>,
    pub bytes: Option<u64>,
    /// Why it cannot be used, when it cannot.
    pub error: Option<String>,
}

impl ModelProbe {
    /// Checks that `path` (the `--model` default) names a readable file or directory.
    pub fn check(path: Option<&Path>) -> ModelProbe {
        let Some(path) = path else {
            return ModelProbe {
                path: None,
                bytes: None,
                error: Some("no model configured ($SPARK_DISAGG_MODEL is unset)".into()),
            };
        };
        let shown = Some(path.display().to_string());
        match std::fs::metadata(path) {
            Ok(meta) => ModelProbe {
                path: shown,
                bytes: meta.is_file().then_some(meta.len()),
                error: None,
            },
            Err(e) => ModelProbe {
                path: shown,
                bytes: None,
                error: Some(match e.kind() {
                    std::io::ErrorKind::NotFound => format!("no model at {}", path.display()),
                    _ => format!("model {} is not readable ({e})", path.display()),
                }),
            },
        }
    }
}

/// Everything the probes found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probes {
    pub host: String,
    pub date: String,
    pub gpu: GpuProbe,
    pub libtorch: LibtorchProbe,
    /// `None` when the timed part was skipped (`--no-bench`).
    pub compute: Option<ComputeResult>,
    pub rdma: RdmaProbe,
    pub etcd: EtcdProbe,
    pub model: ModelProbe,
    /// `None` unless a peer was given.
    pub network: Option<NetCheck>,
}

/// Probes plus the verdicts they imply; what `--json` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvReport {
    #[serde(flatten)]
    pub probes: Probes,
    pub verdicts: Vec<ModuleVerdict>,
}

impl EnvReport {
    pub fn new(probes: Probes) -> EnvReport {
        let verdicts = verdict::verdicts(&probes);
        EnvReport { probes, verdicts }
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
    }

    /// The one-screen text: a line (or a few) per probe, then the verdicts.
    pub fn render(&self) -> String {
        let p = &self.probes;
        let mut out = String::new();
        let mut line = |label: &str, text: String| {
            let _ = writeln!(out, "{label:<10} {text}");
        };
        line("machine", format!("{} ({})", p.host, p.date));
        gpu_lines(&p.gpu, &mut line);
        line("libtorch", libtorch_line(&p.libtorch));
        if let Some(c) = &p.compute {
            line("compute", compute_line(c, &p.gpu));
        }
        rdma_lines(p, &mut line);
        if let Some(net) = &p.network {
            line("network", network_line(net));
        }
        line("etcd", etcd_line(&p.etcd));
        line("model", model_line(&p.model));

        let width = self
            .verdicts
            .iter()
            .map(|v| v.module.len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(out, "\n{:<width$}  {:<8}  why", "module", "verdict");
        for v in &self.verdicts {
            let _ = writeln!(
                out,
                "{:<width$}  {:<8}  {}",
                v.module,
                v.readiness.label(),
                v.reason
            );
        }
        out
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn gpu_lines(gpu: &GpuProbe, line: &mut impl FnMut(&str, String)) {
    if let Some(reason) = &gpu.missing {
        line("GPU", format!("no GPU ({reason})"));
        return;
    }
    let mut head = format!("{} GPU(s)", gpu.gpus.len());
    if let Some(v) = &gpu.driver_version {
        let _ = write!(head, " · driver {v}");
    }
    if let Some(v) = &gpu.cuda_driver_version {
        let _ = write!(head, " · supports CUDA {v}");
    }
    line("GPU", head);
    for g in &gpu.gpus {
        let mut text = format!(
            "{} · {} ({} used)",
            g.name,
            gib(g.memory_total_bytes),
            gib(g.memory_used_bytes)
        );
        let optional = [
            g.compute_capability
                .as_ref()
                .map(|c| format!("compute {c}")),
            g.sm_clock_max_mhz.map(|m| format!("SM {m} MHz")),
            g.memory_clock_max_mhz
                .map(|mhz| match (g.memory_bus_bits, g.peak_memory_gb_per_s()) {
                    (Some(bits), Some(peak)) => {
                        format!("memory {bits}-bit at {mhz} MHz = {peak:.0} GB/s peak")
                    }
                    _ => format!("memory {mhz} MHz"),
                }),
            g.temperature_c.map(|t| format!("{t} °C")),
            g.pcie_generation
                .zip(g.pcie_width)
                .map(|(gen, width)| format!("PCIe gen{gen} x{width}")),
            (g.nvlink_active_links > 0).then(|| format!("NVLink ×{}", g.nvlink_active_links)),
        ];
        for part in optional.into_iter().flatten() {
            let _ = write!(text, " · {part}");
        }
        line(&format!("  gpu{}", g.index), text);
    }
}

fn libtorch_line(t: &LibtorchProbe) -> String {
    let mut text = t
        .version
        .clone()
        .unwrap_or_else(|| "version unknown".into());
    if t.cuda_devices > 0 {
        let _ = write!(text, " · CUDA available, {} device(s)", t.cuda_devices);
        if let Some(r) = &t.cuda_runtime {
            let _ = write!(text, ", runtime {r}");
        }
        if let Some(c) = &t.cudnn_version {
            let _ = write!(text, ", cuDNN {c}");
        }
    } else {
        let _ = write!(text, " · no CUDA: {}", t.cuda_status);
    }
    let _ = write!(text, " · {} CPU threads", t.cpu_threads);
    text
}

/// The timed matmul and copy; on a GPU whose peak bandwidth the driver
/// tells, the copy also as a share of that peak (a streaming kernel gets
/// about 90 % of it, and so can a batch-1 decode step at best).
fn compute_line(c: &ComputeResult, gpu: &GpuProbe) -> String {
    let mut text = format!(
        "{} ({}), {}: matmul {n}×{n} {:.2} TFLOP/s · memory copy {:.1} GB/s",
        c.device,
        c.hardware,
        c.dtype,
        c.matmul_tflops,
        c.copy_gbps,
        n = c.matmul_n
    );
    let peak = c
        .device
        .strip_prefix("cuda:")
        .and_then(|i| i.parse::<u32>().ok())
        .and_then(|i| gpu.gpus.iter().find(|g| g.index == i))
        .and_then(GpuInfo::peak_memory_gb_per_s);
    if let Some(peak) = peak {
        let _ = write!(text, " ({:.0} % of peak)", 100.0 * c.copy_gbps / peak);
    }
    if let Some(h2d) = c.host_to_device_gbps {
        let _ = write!(text, " · host→device {h2d:.1} GB/s");
    }
    text
}

fn rdma_lines(p: &Probes, line: &mut impl FnMut(&str, String)) {
    let rdma = &p.rdma;
    if let Some(reason) = &rdma.missing {
        line("RDMA", format!("none: {reason}"));
    }
    for device in &rdma.devices {
        if device.ports.is_empty() {
            line("RDMA", format!("{}: could not be opened", device.name));
        }
        for port in &device.ports {
            let mut text = format!(
                "{} port {}: {} · {} · MTU {}",
                device.name, port.port, port.state, port.link_layer, port.active_mtu
            );
            if let Some(rate) = &port.rate {
                let _ = write!(text, " · {rate}");
            }
            if let Some(gid) = &port.gid0 {
                let _ = write!(text, " · GID[0] {gid}");
            }
            if let Some(index) = port.roce_v2_gid_index {
                let _ = write!(text, " · RoCE v2 GID index {index}");
            }
            line("RDMA", text);
        }
    }
    if !rdma.devices.is_empty() && !p.gpu.gpus.is_empty() {
        let g = &rdma.gpudirect;
        let text = match (g.peermem_loaded, g.nvidia_open_module) {
            (true, _) => "nvidia_peermem loaded: the NIC can read and write GPU memory".to_string(),
            (false, true) => {
                "NVIDIA open kernel module: GPU memory can be registered as dma-buf".to_string()
            }
            (false, false) => "not ready: load nvidia_peermem (`modprobe nvidia_peermem`) or use \
                               NVIDIA's open kernel module for dma-buf"
                .to_string(),
        };
        line("GPUDirect", text);
    }
}

/// One line: where to, round trip percentiles, throughput each way.
pub fn network_line(net: &NetCheck) -> String {
    format!(
        "{}: round trip p50 {:.1} µs, p99 {:.1} µs ({} pings) · upload {:.2} Gbit/s · download {:.2} Gbit/s",
        net.peer,
        net.round_trip.p50_us,
        net.round_trip.p99_us,
        net.round_trip.samples,
        net.upload.gbit_per_s(),
        net.download.gbit_per_s()
    )
}

fn etcd_line(etcd: &EtcdProbe) -> String {
    match (&etcd.version, &etcd.error) {
        (Some(version), _) => format!("{}: etcd {version}", etcd.endpoint),
        (None, Some(error)) => format!("{}: not reachable ({error})", etcd.endpoint),
        (None, None) => format!("{}: not reachable", etcd.endpoint),
    }
}

fn model_line(model: &ModelProbe) -> String {
    match (&model.error, &model.path) {
        (Some(e), _) => e.clone(),
        (None, Some(path)) => match model.bytes {
            Some(bytes) => format!("{path} ({:.1} MB)", bytes as f64 / 1e6),
            None => path.clone(),
        },
        (None, None) => "none".into(),
    }
}
