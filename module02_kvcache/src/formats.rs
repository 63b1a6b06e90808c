//! The element formats a KV cache can be stored (or sent) in, and what one
//! element costs in bytes, including the scales that quantized formats need.

use serde::{Deserialize, Serialize};
use shared::kv::block::DEFAULT_BLOCK_SIZE;

/// A storage format for K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// 16-bit brain float: what the engine keeps on a GPU.
    Bf16,
    /// 8-bit float (4 exponent bits, 3 mantissa bits), one f32 scale per group.
    Fp8,
    /// 8-bit integer, one f32 scale per group.
    Int8,
}

impl KvFormat {
    pub const ALL: [KvFormat; 3] = [KvFormat::Bf16, KvFormat::Fp8, KvFormat::Int8];

    pub fn name(self) -> &'static str {
        match self {
            KvFormat::Bf16 => "bf16",
            KvFormat::Fp8 => "fp8",
            KvFormat::Int8 => "int8",
        }
    }

    /// Average bytes per element for vectors of `head_dim`, counting one
    /// f32 scale per group of [`DEFAULT_BLOCK_SIZE`] tokens × `head_dim`
    /// (one group per layer, K or V, block and KV head — the granularity
    /// [`crate::compress`] uses).
    pub fn bytes_per_element(self, head_dim: usize) -> f64 {
        let scale = 4.0 / (DEFAULT_BLOCK_SIZE * head_dim) as f64;
        match self {
            KvFormat::Bf16 => 2.0,
            KvFormat::Fp8 | KvFormat::Int8 => 1.0 + scale,
        }
    }
}
