//! # Module 1: the single-node baseline
//!
//! The engine itself lives in `shared::engine` (later modules serve with
//! it); this crate measures it. [`bench`] runs the workloads, [`report`]
//! turns the results into a table, JSON and an SVG figure, and [`peer`]
//! runs Hugging Face transformers on the same workload for comparison;
//! [`timeline`] reports where a layer's time goes on a GPU, and
//! [`history`] puts saved runs of one workload side by side.

pub mod bench;
pub mod history;
pub mod peer;
pub mod report;
pub mod timeline;

/// Lab exercises (book chapter 1): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module01_baseline.rs"]
pub mod exercises;
