//! The paged KV cache: blocks and block tables ([`block`]), content names
//! for blocks ([`hash`]), who owns which block ([`prefix_cache`]), and the
//! preallocated tensors that hold them ([`pool`]).

pub mod block;
pub mod hash;
pub mod pool;
pub mod prefix_cache;
