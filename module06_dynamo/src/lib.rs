//! Module 6: the whole system behind an OpenAI-compatible API.
//!
//! ```text
//!  HTTP client ──► frontend (axum) ──► router (module 5) ──┬─► decode worker ◄──KV── prefill worker
//!                  openai · stop · metrics   etcd + KV events  └─► (short or cached prompts: prefill here)
//! ```
//!
//! Modules 3, 4 and 5 built the parts — workers that move KV over TCP or
//! one-sided writes, a registry in etcd, a KV-aware router. This module adds
//! what a deployment needs around them:
//!
//! * [`openai`] — the API's request and response bodies, checked;
//! * [`stop`] — stop strings on a token stream;
//! * [`disagg`] — conditional disaggregation: prefill remotely or locally;
//! * [`frontend`] — the HTTP server: tokenize, route, relay, count;
//! * [`metrics`] — Prometheus counters and histograms;
//! * [`worker`] — a worker process of one role, registered in etcd;
//! * [`deploy`] — etcd, workers and frontend started together (`up`);
//! * [`bench`] — an open-loop load generator over HTTP and the comparison
//!   of deployments.

pub mod bench;
pub mod deploy;
pub mod disagg;
pub mod frontend;
pub mod metrics;
pub mod openai;
pub mod stop;
pub mod worker;

/// Lab exercises (book chapter 6): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module06_dynamo.rs"]
pub mod exercises;

/// The etcd key prefix deployments register under.
pub const DEFAULT_PREFIX: &str = "/spark-disagg/module06";
