//! Checks for chapter 4's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module04_rdma --test exercises -- --include-ignored`.

use module04_rdma::exercises::*;

fn span(local: u64, remote: u64, len: u64) -> Span {
    Span { local, remote, len }
}

#[test]
#[ignore = "exercise 4.1: write block_spans in src/exercises.rs"]
fn exercise_4_1_block_spans() {
    // 40 tokens in blocks of 16 (slots of 10 bytes) into pool blocks 5, 2, 9.
    assert_eq!(
        block_spans(40, 16, &[5, 2, 9], 10),
        vec![span(0, 800, 160), span(160, 320, 160), span(320, 1440, 80)]
    );
    // Blocks beyond the tokens are not written.
    assert_eq!(block_spans(16, 16, &[3, 4], 1), vec![span(0, 48, 16)]);
    assert!(block_spans(0, 16, &[1], 8).is_empty());
}

#[test]
#[ignore = "exercise 4.2: write coalesce in src/exercises.rs"]
fn exercise_4_2_coalesce() {
    let spans = [
        span(0, 800, 160),
        span(160, 960, 160), // continues both sides: merged
        span(320, 1120, 80), // again
        span(400, 0, 160),   // remote jumps back: a new span
        span(560, 200, 160), // remote gap: a new span
    ];
    assert_eq!(
        coalesce(&spans),
        vec![span(0, 800, 400), span(400, 0, 160), span(560, 200, 160)]
    );
    assert!(coalesce(&[]).is_empty());
    // A pool whose blocks happen to be consecutive needs one write per layer.
    let blocks: Vec<u32> = (10..20).collect();
    assert_eq!(coalesce(&block_spans(150, 16, &blocks, 4)).len(), 1);
}

#[test]
#[ignore = "exercise 4.3: write pinned_pages in src/exercises.rs"]
fn exercise_4_3_pinned_pages() {
    assert_eq!(pinned_pages(0, 4096, 4096), 1);
    assert_eq!(pinned_pages(100, 4096, 4096), 2);
    assert_eq!(pinned_pages(4095, 2, 4096), 2);
    // 1 GiB in 2 MiB huge pages, starting 8 KiB in: one page more than 512.
    assert_eq!(pinned_pages(8192, 1 << 30, 2 << 20), 513);
    assert_eq!(pinned_pages(12345, 0, 4096), 0);
}
