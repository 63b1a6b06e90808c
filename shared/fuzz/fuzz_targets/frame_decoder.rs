//! Fuzzes the frame decoder: any bytes must give a frame or an error —
//! never a panic, and never an allocation larger than the caps allow.
//!
//! ```text
//! cargo install cargo-fuzz
//! cd shared && cargo fuzz run frame_decoder -- -max_total_time=60
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok((message, payload, used)) = wire::decode_frame(data, 1 << 20) {
        assert!(used <= data.len());
        assert!(payload.len() <= 1 << 20);
        // What decodes must survive a round trip unchanged.
        let again = wire::encode_frame(&message, payload);
        let (back, back_payload, _) = wire::decode_frame(&again, 1 << 20).expect("re-encoded frame decodes");
        assert_eq!(back, message);
        assert_eq!(back_payload, payload);
    }
});
