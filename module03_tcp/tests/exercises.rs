//! Checks for chapter 3's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module03_tcp --test exercises -- --include-ignored`.

use module03_tcp::exercises::*;
use shared::wire::{encode_frame, layer_payload, Message, PREFIX_LEN};
use tch::{Device, Kind, Tensor};

#[test]
#[ignore = "exercise 3.1: write layer_payload_bytes in src/exercises.rs"]
fn exercise_3_1_layer_payload_bytes() {
    for (tokens, heads, dim, kind) in [(7, 3, 64, Kind::Float), (130, 4, 32, Kind::BFloat16)] {
        let k = Tensor::randn([1, heads, tokens, dim], (Kind::Float, Device::Cpu)).to_kind(kind);
        let mut buffer = Vec::new();
        layer_payload(&k, &k, &mut buffer);
        let want = buffer.len();
        let got = layer_payload_bytes(
            tokens as usize,
            heads as usize,
            dim as usize,
            kind.elt_size_in_bytes(),
        );
        assert_eq!(got, want, "{tokens} tokens, {kind:?}");
    }
}

#[test]
#[ignore = "exercise 3.2: write frame_bytes in src/exercises.rs"]
fn exercise_3_2_frame_bytes() {
    let message = Message::KvLayer {
        request_id: 42,
        layer: 3,
    };
    let header = encode_frame(&message, &[]).len() - PREFIX_LEN;
    for payload in [0usize, 1, 4096, 1 << 20] {
        let real = encode_frame(&message, &vec![0u8; payload]).len();
        assert_eq!(frame_bytes(header, payload), real, "payload {payload}");
    }
}

#[test]
#[ignore = "exercise 3.3: write exposed_transfer_s in src/exercises.rs"]
fn exercise_3_3_exposed_transfer() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    // Sends faster than compute: only the last layer's send shows.
    assert!(close(exposed_transfer_s(&[1.0; 3], &[0.5; 3]), 0.5));
    // Sends slower than compute: they queue; 7 − 3.
    assert!(close(exposed_transfer_s(&[1.0; 3], &[2.0; 3]), 4.0));
    // Bulk is the case where nothing overlaps: compare with the sum of sends.
    let (compute, send) = ([0.2, 0.1, 0.4, 0.3], [0.15, 0.3, 0.05, 0.2]);
    let exposed = exposed_transfer_s(&compute, &send);
    assert!(close(exposed, 0.2), "{exposed}");
    assert!(exposed < send.iter().sum::<f64>());
}
