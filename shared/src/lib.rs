//! # shared — the foundation of spark-disagg
//!
//! Every module of the course runs the same real model through the same
//! code, and that code lives here:
//!
//! * [`model`] — a Llama transformer on libtorch (via `tch`), its GGUF and
//!   Hugging Face loaders, and its tokenizer with chat templates;
//! * [`engine`] — sampling and the reference generation loop;
//! * [`device`] — CPU or CUDA, f32 or bf16;
//! * [`kernels`] — the GPU decode step's own CUDA kernels, compiled at run time;
//! * [`cli`] — the `--model/--device/--dtype` flags every binary accepts, and logging;
//! * [`results`] — benches' JSON results and their tables beside them;
//! * [`etcd_server`] — a throwaway etcd for tests and demos (modules 5 and 6);
//! * [`process`] — child processes that stop when their parent dies (modules 5 and 6);
//! * [`wire`] — the frames prefill and decode workers exchange (modules 3, 4, 6);
//! * [`worker_client`] — one request to a worker over that protocol (modules 5, 6).
//!
//! Only code that two or more modules use belongs here; each module's own
//! idea lives in its own crate.

pub mod cli;
#[cfg(cuda_bridge)]
mod cuda_bridge;
pub mod cuda_ipc;
pub mod device;
pub mod engine;
pub mod etcd_server;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod process;
pub mod results;
pub mod stats;
pub mod wire;
pub mod worker_client;

/// Loads libtorch's CUDA side before any unit test runs. libtorch asks
/// "is there CUDA?" once per process and keeps the answer, and even a CPU
/// test asks (`tch::manual_seed` seeds the GPU generators too). Asked before
/// `libtorch_cuda.so` is loaded ([`device::load_cuda_runtime`]), the answer
/// is no, and every GPU test that runs after it checks nothing. The
/// binaries load it first (through [`device`]); this test binary has no
/// first step of its own, so it gets one before `main`.
#[cfg(test)]
#[ctor::ctor(unsafe)]
fn load_cuda_before_the_tests() {
    // A CPU-only libtorch is fine: the GPU tests say so and return.
    let _ = device::load_cuda_runtime();
}
