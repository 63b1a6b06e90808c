//! Running the model for many requests at once.
//!
//! * [`sampling`] — choosing a token (greedy, temperature, top-p, seed);
//! * [`generate`] — the reference loop for one prompt, with a dense cache;
//! * [`scheduler`] — continuous batching with chunked prefill and preemption;
//! * [`runner`] — paged attention and batched forward passes;
//! * [`varlen_attention`] — one FlashAttention call for a packed prefill;
//! * [`decode_graph`] and [`cuda_graph`] — decode steps padded to fixed
//!   shapes and replayed as CUDA graphs;
//! * [`host_copy`] — reading a step's tokens without waiting for the step
//!   queued after it;
//! * [`core`] — the [`Engine`]: scheduler + runner + paged KV pool, plus the
//!   `prefill` / `decode_from` halves that disaggregation splits apart;
//! * [`handle`] — the engine on its own thread, with token streams;
//! * [`metrics`] and [`request`] — what goes in and what is measured.

pub mod core;
pub mod cuda_graph;
pub mod decode_graph;
pub mod generate;
pub mod handle;
pub mod host_copy;
pub mod metrics;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod varlen_attention;

pub use self::core::{Engine, EngineConfig, EngineError, PrefillOutput};
pub use self::decode_graph::DecodeMode;
pub use self::request::{Request, RequestId, TokenEvent};
