//! Module 2: the KV cache, measured on the real model.
//!
//! A transformer attends over every earlier token of a sequence. Rather than
//! recompute the keys and values of those tokens at every step, an engine
//! keeps them: the **KV cache**. It is *session state*, in the sense a web
//! server has sessions: it belongs to one conversation, it grows with every
//! token, it is expensive to rebuild (that is what prefill does), and a
//! request can only continue where that state lives. Disaggregated serving
//! is, at heart, the decision to compute the session on one machine and
//! continue it on another — so the state has to move.
//!
//! Four questions, one file each:
//!
//! * [`anatomy`] — what is in it: shapes, dtype and bytes of the cache the
//!   engine really produced for a prompt, checked against the formula;
//! * [`scaling`] — how big it gets for real models, sequence lengths and
//!   batches, and how many sequences fit in a GPU after the weights;
//! * [`transfer`] — what moving it costs: the formula for three kinds of
//!   link, and a measurement over real sockets;
//! * [`compress`] — what quantizing it saves, and what it breaks.

pub mod anatomy;
pub mod compress;
pub mod formats;
pub mod scaling;
pub mod transfer;

/// Lab exercises (book chapter 2): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module02_kvcache.rs"]
pub mod exercises;
