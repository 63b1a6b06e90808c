//! Module 4: one-sided transfer of KV blocks.
//!
//! In module 3 the decode worker *receives*: its CPU reads every frame,
//! parses it and copies the payload where it belongs. RDMA turns that
//! around. The receiver **registers** memory with its network card once —
//! say, its whole paged KV pool — and tells the sender where that memory is
//! (an address and a key). From then on the sender's card writes straight
//! into it; the receiver's CPU takes no part until it is **notified** that
//! the data is there. That is a *one-sided* operation.
//!
//! NVIDIA's NIXL library packages this for inference servers, and this
//! module rebuilds its concepts:
//!
//! | NIXL | here | what it is |
//! |---|---|---|
//! | agent | [`agent::TransferAgent`] | one per worker; owns registrations and connections |
//! | memory registration | [`agent::TransferAgent::register`] | pins memory and makes it remotely writable |
//! | agent metadata | [`metadata::AgentMetadata`] | where to reach an agent and which regions it exposes (with keys) |
//! | descriptor list | [`region::Descriptor`] | (region, offset, length) triples, local and remote |
//! | transfer request | [`agent::TransferAgent::write`] | pairs of descriptors, posted at once |
//! | notification | [`agent::Notification`] | a small message delivered after the data |
//!
//! Backends move the bytes. [`backend::ibverbs`] is real RDMA: RC queue
//! pairs connected over a TCP side channel, `ibv_reg_mr` registrations
//! (GPU memory too, with GPUDirect), `RDMA WRITE`s polled to completion,
//! then a notification on the side channel. [`backend::tcp`] keeps the
//! same one-sided semantics on any machine: the receiving agent's "NIC" is
//! a thread that checks each write against its registrations and reads the
//! bytes from the socket straight into the registered memory, never
//! involving the application. [`backend::cuda_ipc`] is for GPUs of one
//! host: the target's GPU memory is shared by CUDA IPC handle and the
//! initiator's GPU writes into it. `BackendChoice::Auto` picks ibverbs
//! where module 0's probe finds an active RDMA port.

pub mod agent;
pub mod backend;
pub mod bench;
pub mod metadata;
pub mod region;

/// Lab exercises (book chapter 4): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module04_rdma.rs"]
pub mod exercises;
