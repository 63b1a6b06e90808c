//! From probe results to a verdict per module: can this machine run it, and
//! if not fully, what happens instead and what to do about it.
//!
//! Every rule is here, in one function per module, so a student can see
//! exactly which fact decides what.

use serde::{Deserialize, Serialize};

use crate::report::Probes;

/// How ready a machine is for one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Runs as the chapter describes.
    Ready,
    /// Runs, with a documented substitute (the CPU, TCP instead of RDMA,
    /// no live registry).
    Fallback,
    /// Cannot run until something is fixed; the reason says what.
    Blocked,
}

impl Readiness {
    pub fn label(self) -> &'static str {
        match self {
            Readiness::Ready => "ready",
            Readiness::Fallback => "fallback",
            Readiness::Blocked => "blocked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleVerdict {
    pub module: String,
    pub readiness: Readiness,
    pub reason: String,
}

fn verdict(module: &str, readiness: Readiness, reason: impl Into<String>) -> ModuleVerdict {
    ModuleVerdict {
        module: module.to_string(),
        readiness,
        reason: reason.into(),
    }
}

/// One verdict for each module, in course order.
pub fn verdicts(p: &Probes) -> Vec<ModuleVerdict> {
    vec![
        verdict("module00_env", Readiness::Ready, "this report"),
        baseline(p),
        kvcache(p),
        tcp(p),
        rdma(p),
        routing(p),
        full_system(p),
    ]
}

/// Where the model will run: the first GPU libtorch can use, or the CPU.
fn compute_target(p: &Probes) -> (Readiness, String) {
    if p.libtorch.cuda_devices > 0 {
        let name = p.gpu.gpus.first().map_or("GPU", |g| g.name.as_str());
        (Readiness::Ready, format!("on cuda:0 ({name}, bf16)"))
    } else if !p.gpu.gpus.is_empty() {
        (
            Readiness::Fallback,
            "on the CPU although there is a GPU".into(),
        )
    } else {
        (Readiness::Ready, "on the CPU (f32)".into())
    }
}

/// The model file is the one thing modules 1-3 and 6 cannot do without.
fn model_missing(p: &Probes, module: &str) -> Option<ModuleVerdict> {
    p.model.error.as_ref().map(|e| {
        verdict(
            module,
            Readiness::Blocked,
            format!("{e}: run ./scripts/setup.sh, or pass --model FILE.gguf|HF_DIR"),
        )
    })
}

fn baseline(p: &Probes) -> ModuleVerdict {
    const M: &str = "module01_baseline";
    if let Some(v) = model_missing(p, M) {
        return v;
    }
    let (readiness, target) = compute_target(p);
    let why = if p.libtorch.cuda_devices > 0 {
        String::new()
    } else if !p.gpu.gpus.is_empty() {
        format!(
            ": libtorch cannot use the GPU ({}); point LIBTORCH at a CUDA build and re-run \
             ./scripts/setup.sh",
            p.libtorch.cuda_status
        )
    } else {
        ": SmolLM2-135M is small enough for a laptop; GPU timings need a GPU".into()
    };
    verdict(M, readiness, format!("runs {target}{why}"))
}

fn kvcache(p: &Probes) -> ModuleVerdict {
    const M: &str = "module02_kvcache";
    if let Some(v) = model_missing(p, M) {
        return v;
    }
    let (readiness, target) = compute_target(p);
    let rdma = if p.rdma.active_ports().next().is_some() {
        "RDMA cost measured and from the formula"
    } else {
        "RDMA cost from the formula only (no active RDMA port)"
    };
    verdict(M, readiness, format!("runs {target}; {rdma}"))
}

fn tcp(p: &Probes) -> ModuleVerdict {
    const M: &str = "module03_tcp";
    if let Some(v) = model_missing(p, M) {
        return v;
    }
    match &p.network {
        Some(net) => verdict(
            M,
            Readiness::Ready,
            format!(
                "two hosts: {:.2} Gbit/s and {:.0} µs p50 round trip to {}",
                net.upload.gbit_per_s().min(net.download.gbit_per_s()),
                net.round_trip.p50_us,
                net.peer
            ),
        ),
        None => verdict(
            M,
            Readiness::Ready,
            "runs on loopback or across hosts; measure a link with `module00_env check --peer ADDR`",
        ),
    }
}

// ANCHOR: rdma_verdict
fn rdma(p: &Probes) -> ModuleVerdict {
    const M: &str = "module04_rdma";
    let active = p.rdma.active_ports().count();
    if let Some((device, port)) = p.rdma.active_ports().next() {
        let staging = if p.gpu.gpus.is_empty() {
            "host memory (no GPU)"
        } else if p.rdma.gpudirect.ready() {
            "GPU memory directly (GPUDirect RDMA)"
        } else {
            "host memory: no nvidia_peermem or dma-buf, so GPU KV is staged through the CPU"
        };
        return verdict(
            M,
            Readiness::Ready,
            format!(
                "{active} active port(s), first {device} port {} ({}{}); the NIC reads {staging}",
                port.port,
                port.link_layer,
                port.rate
                    .as_deref()
                    .map(|r| format!(", {r}"))
                    .unwrap_or_default()
            ),
        );
    }
    let reason = match p.rdma.devices.first() {
        Some(device) => {
            let states: Vec<String> = device
                .ports
                .iter()
                .map(|port| format!("port {} is {}", port.port, port.state))
                .collect();
            format!(
                "{} has no active port ({}): check the cable and, on InfiniBand, the subnet \
                 manager (opensm); will use the TCP fallback",
                device.name,
                if states.is_empty() {
                    "no ports".into()
                } else {
                    states.join(", ")
                }
            )
        }
        None => "no RDMA device — will use the TCP fallback".to_string(),
    };
    verdict(M, Readiness::Fallback, reason)
}
// ANCHOR_END: rdma_verdict

fn routing(p: &Probes) -> ModuleVerdict {
    const M: &str = "module05_routing";
    match &p.etcd.version {
        Some(version) => verdict(
            M,
            Readiness::Ready,
            format!("etcd {version} at {}", p.etcd.endpoint),
        ),
        None => verdict(
            M,
            Readiness::Fallback,
            format!(
                "etcd not reachable at {}: the trace simulation runs, the live registry needs \
                 etcd — start one with ./scripts/etcd.sh start",
                p.etcd.endpoint
            ),
        ),
    }
}

fn full_system(p: &Probes) -> ModuleVerdict {
    const M: &str = "module06_dynamo";
    if let Some(v) = model_missing(p, M) {
        return v;
    }
    let transport = if p.rdma.active_ports().next().is_some() {
        "KV over RDMA"
    } else {
        "KV over TCP"
    };
    let (readiness, target) = compute_target(p);
    if p.etcd.reachable() {
        verdict(
            M,
            readiness,
            format!("runs {target}; {transport}; registry in etcd"),
        )
    } else {
        verdict(
            M,
            Readiness::Fallback,
            format!(
                "runs {target}, {transport}, without the etcd registry (not reachable): \
                 ./scripts/etcd.sh start"
            ),
        )
    }
}
