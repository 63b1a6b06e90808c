//! Module 3: disaggregated serving over TCP.
//!
//! One request, two processes:
//!
//! ```text
//! client ──Generate──► prefill server ──KvBegin, KvLayer × layers──► decode server
//!    ▲                      │  (runs the prompt,                       │ (imports the KV,
//!    │                      │   first token)                           │  decodes the rest)
//!    └──── Token, Done ◄────┴──────────── KvReceived, Token, Done ◄────┘
//! ```
//!
//! * [`prefill`] — the prefill worker: runs the prompt through the model,
//!   hands each layer's K and V to the transfer as soon as it exists
//!   (layer-wise) or all at the end (bulk), and relays the decode worker's
//!   tokens to the client;
//! * [`decode`] — the decode worker: checks that the KV comes from the same
//!   model, assembles it, and continues the request in its continuous-batching
//!   engine (it also serves whole requests locally, the baseline);
//! * [`client`] — sends a workload and records where each request's time went;
//! * [`report`] — percentiles per mode, the table, JSON and a plot.
//!
//! The frames themselves are in `shared::wire`, because modules 4 and 6 speak
//! the same protocol.

pub mod client;
pub mod decode;
pub mod prefill;
pub mod report;

/// Lab exercises (book chapter 3): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module03_tcp.rs"]
pub mod exercises;
