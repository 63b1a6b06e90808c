//! Reference solutions to module 3's exercises (`src/exercises.rs`).

pub fn layer_payload_bytes(
    tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    bytes_per_element: usize,
) -> usize {
    2 * tokens * kv_heads * head_dim * bytes_per_element
}

pub fn frame_bytes(header_bytes: usize, payload_bytes: usize) -> usize {
    shared::wire::PREFIX_LEN + header_bytes + payload_bytes
}

pub fn exposed_transfer_s(compute_s: &[f64], send_s: &[f64]) -> f64 {
    let (mut computed, mut sent) = (0.0, 0.0f64);
    for (c, s) in compute_s.iter().zip(send_s) {
        computed += c;
        sent = sent.max(computed) + s;
    }
    sent - computed
}
