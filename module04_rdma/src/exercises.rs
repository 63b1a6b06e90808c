//! Lab exercises for module 4 (book chapter 4). Each function is yours to
//! write; `tests/exercises.rs` checks it:
//!
//! ```console
//! cargo test -p module04_rdma --test exercises -- --include-ignored
//! ```
//!
//! Reference solutions: `solutions/module04_rdma.rs`, compiled in place of
//! this file with `--features solutions` (CI checks them that way).

/// One RDMA write: `len` bytes from `local` (an offset in the registered
/// staging memory) to `remote` (an offset in the peer's registered pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// Exercise 4.1 — the writes that put `tokens` consecutive slots of one
/// layer's K (staged contiguously from offset 0, `slot_bytes` per token)
/// into the peer's pool `blocks` (block `b` starts at byte
/// `b × block_size × slot_bytes`). One span per block used; the last block
/// may be partly filled.
pub fn block_spans(tokens: usize, block_size: usize, blocks: &[u32], slot_bytes: u64) -> Vec<Span> {
    let _ = (tokens, block_size, blocks, slot_bytes);
    todo!("exercise 4.1: one span per block, the last one shorter")
}

/// Exercise 4.2 — fewer work requests: merge each span into the one before
/// it when both its local and remote offsets continue that span exactly.
pub fn coalesce(spans: &[Span]) -> Vec<Span> {
    let _ = spans;
    todo!("exercise 4.2: merge adjacent-on-both-sides spans")
}

/// Exercise 4.3 — registering memory pins whole pages: how many pages of
/// `page_size` bytes does `len` bytes at virtual `address` touch?
pub fn pinned_pages(address: u64, len: u64, page_size: u64) -> u64 {
    let _ = (address, len, page_size);
    todo!("exercise 4.3: last page − first page + 1")
}
