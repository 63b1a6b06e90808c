//! Module 0: is this machine ready for the course?
//!
//! Disaggregated serving touches every layer of a machine: the GPU and its
//! driver, the libtorch build, the RDMA NIC, the network between nodes, the
//! registry service. When a later module fails, it is usually one of these,
//! and the error it prints is far from the cause. This module asks each layer
//! directly, measures what matters (compute, memory bandwidth, link latency
//! and throughput), and turns the answers into one verdict per module.
//!
//! * [`gpu`] — NVML: the driver's view of each GPU;
//! * [`libtorch`] — the PyTorch build, and a timed matmul and memory copy;
//! * [`rdma`] — libibverbs: devices, ports, GIDs, GPUDirect readiness;
//! * [`net`] — a TCP round-trip and throughput check between two nodes;
//! * [`etcd`] — whether module 5's registry is reachable;
//! * [`verdict`] — the rules from facts to "ready / fallback / blocked";
//! * [`report`] — the table a student reads and the JSON a script reads.

pub mod etcd;
pub mod gpu;
pub mod libtorch;
pub mod net;
pub mod rdma;
pub mod report;
pub mod verdict;

/// Lab exercises (book chapter 0): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module00_env.rs"]
pub mod exercises;
