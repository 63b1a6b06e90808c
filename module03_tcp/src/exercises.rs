//! Lab exercises for module 3 (book chapter 3). Each function is yours to
//! write; `tests/exercises.rs` checks it, against the real wire format where
//! it can:
//!
//! ```console
//! cargo test -p module03_tcp --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module03_tcp.rs`, compiled in place of
//! this file with `--features solutions` (CI checks them that way).

/// Exercise 3.1 — bytes of one `KvLayer` payload: that layer's K and V for
/// `tokens` tokens, `kv_heads` heads of `head_dim` numbers of
/// `bytes_per_element` bytes.
pub fn layer_payload_bytes(
    tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    bytes_per_element: usize,
) -> usize {
    let _ = (tokens, kv_heads, head_dim, bytes_per_element);
    todo!("exercise 3.1: K and V, tokens × heads × dim × bytes")
}

/// Exercise 3.2 — bytes a whole frame puts on the wire: the fixed prefix
/// (magic, version, two lengths), a header of `header_bytes`, a payload of
/// `payload_bytes`. (Read the frame diagram at the top of `shared::wire`.)
pub fn frame_bytes(header_bytes: usize, payload_bytes: usize) -> usize {
    let _ = (header_bytes, payload_bytes);
    todo!("exercise 3.2: prefix + header + payload")
}

/// Exercise 3.3 — layer-wise transfer's exposed time. Layer `i` takes
/// `compute_s[i]` to compute (layers run one after another from time 0) and
/// `send_s[i]` to send; a layer is sent once it is computed and the layer
/// before it has been sent (one connection). Return how long after the last
/// layer's compute ends the last layer's send ends.
pub fn exposed_transfer_s(compute_s: &[f64], send_s: &[f64]) -> f64 {
    let _ = (compute_s, send_s);
    todo!("exercise 3.3: a two-stage pipeline")
}
