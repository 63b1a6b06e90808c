//! Reference solutions to module 4's exercises (`src/exercises.rs`).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

pub fn block_spans(tokens: usize, block_size: usize, blocks: &[u32], slot_bytes: u64) -> Vec<Span> {
    blocks
        .iter()
        .enumerate()
        .map(|(j, &b)| (j * block_size, b))
        .take_while(|&(first, _)| first < tokens)
        .map(|(first, b)| Span {
            local: first as u64 * slot_bytes,
            remote: b as u64 * block_size as u64 * slot_bytes,
            len: block_size.min(tokens - first) as u64 * slot_bytes,
        })
        .collect()
}

pub fn coalesce(spans: &[Span]) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for &s in spans {
        match out.last_mut() {
            Some(last)
                if last.local + last.len == s.local && last.remote + last.len == s.remote =>
            {
                last.len += s.len
            }
            _ => out.push(s),
        }
    }
    out
}

pub fn pinned_pages(address: u64, len: u64, page_size: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    (address + len - 1) / page_size - address / page_size + 1
}
