//! Checks for chapter 6's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module06_dynamo --test exercises -- --include-ignored`.

use module06_dynamo::exercises::*;
use module06_dynamo::stop::StopScanner;

#[test]
#[ignore = "exercise 6.1: write stop_position in src/exercises.rs"]
fn exercise_6_1_stop_position() {
    assert_eq!(stop_position("Hello\n\nWorld", &["\n\n"]), Some(5));
    assert_eq!(stop_position("abc", &["x", "y"]), None);
    assert_eq!(stop_position("one. two! three", &["!", "."]), Some(3));
    assert_eq!(stop_position("déjà vu", &["vu"]), Some(7)); // bytes, not chars
                                                            // The frontend's streaming scanner, fed the same text in pieces,
                                                            // releases exactly the text before that offset.
    let text = "The answer is 42.\nUser: and then?";
    let stops = ["\nUser:", "42!"];
    let mut scanner = StopScanner::new(stops.iter().map(|s| s.to_string()).collect());
    let mut released = String::new();
    for piece in ["The ans", "wer is 4", "2.", "\nUs", "er: and", " then?"] {
        let scanned = scanner.push(piece);
        released += &scanned.release;
        if scanned.stopped {
            break;
        }
    }
    assert_eq!(released, &text[..stop_position(text, &stops).unwrap()]);
}

#[test]
#[ignore = "exercise 6.2: write goodput in src/exercises.rs"]
fn exercise_6_2_goodput() {
    let samples = [(0.2, 0.05), (1.5, 0.05), (0.3, 0.2), (1.0, 0.15)];
    // Good: the first and the last (limits are inclusive).
    assert_eq!(goodput(&samples, 1.0, 0.15, 4.0), 0.5);
    assert_eq!(goodput(&samples, 2.0, 1.0, 2.0), 2.0);
    assert_eq!(goodput(&[], 1.0, 1.0, 10.0), 0.0);
}

#[test]
#[ignore = "exercise 6.3: write prefill_remotely in src/exercises.rs"]
fn exercise_6_3_prefill_remotely() {
    // A GPU prefill worker 4× faster than the busy decode worker, over
    // 100 Gbit/s RDMA, 128 KiB of KV per token: 2,000 tokens take 1 s
    // locally vs 0.25 s + 21 ms remotely.
    assert!(prefill_remotely(
        2000, 2000.0, 8000.0, 0.0, 131_072.0, 12.5e9
    ));
    // The same over 1 Gbit/s: the transfer alone takes 2.1 s.
    assert!(!prefill_remotely(
        2000, 2000.0, 8000.0, 0.0, 131_072.0, 125e6
    ));
    // A queue of 0.9 s at the prefill worker tips it back to local.
    assert!(!prefill_remotely(
        2000, 2000.0, 8000.0, 0.9, 131_072.0, 12.5e9
    ));
    // Equal is not faster.
    assert!(!prefill_remotely(100, 1000.0, 1000.0, 0.0, 0.0, 1.0));
}
