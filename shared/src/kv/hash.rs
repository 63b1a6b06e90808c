//! Naming a block of KV cache by its content: chained block hashes.
//!
//! A full block of `block_size` tokens is identified by
//! `hash(parent block's hash, this block's token ids)`. Chaining makes a
//! block's name depend on *everything before it*, so two requests share a
//! block only when they share the whole prefix up to and including it —
//! exactly the condition under which the cached keys and values are valid
//! (attention at a position depends on all earlier tokens).
//!
//! vLLM's prefix cache and Dynamo's KV router use the same scheme. The hash
//! is XXH3-64 over little-endian bytes, so it is the same in every process
//! and on every machine: a router can compare the hashes a worker reports
//! with the hashes of a new prompt without seeing either's memory.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Content name of one full block of tokens (and of its whole prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockHash(pub u64);

/// Seed of the first block's "parent", so that the empty prefix has a name too.
const ROOT_SEED: u64 = 0x5350_4152_4b44_4953; // "SPARKDIS"

/// Hash of one block given its parent's hash (`None` for the first block).
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    let seed = parent.map_or(ROOT_SEED, |p| p.0);
    BlockHash(xxh3_64_with_seed(&bytes, seed))
}

/// Hashes of every *full* block of `tokens`; a partial last block has no
/// name yet (its content is still growing).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let hash = block_hash(parent, chunk);
            parent = Some(hash);
            hash
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_prefix_same_hashes() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b.extend([1000, 1001]);
        assert_eq!(block_hashes(&a, 16), block_hashes(&b, 16)[..4]);
        assert_eq!(
            block_hashes(&b, 16).len(),
            4,
            "the partial block has no hash"
        );
    }

    #[test]
    fn one_token_changes_its_block_and_every_later_one() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[20] = 9999; // inside block 1
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        assert_eq!(ha[0], hb[0]);
        for i in 1..4 {
            assert_ne!(ha[i], hb[i], "block {i}");
        }
    }

    #[test]
    fn equal_blocks_after_different_prefixes_differ() {
        let block: Vec<u32> = vec![7; 16];
        let first = block_hash(None, &block);
        let after_other = block_hash(Some(block_hash(None, &[8; 16])), &block);
        assert_ne!(first, after_other);
    }

    #[test]
    fn hash_is_stable_across_runs_and_machines() {
        // A fixed value: if this changes, routers and workers built from
        // different versions would stop agreeing on block names.
        assert_eq!(block_hash(None, &[1, 2, 3]), block_hash(None, &[1, 2, 3]));
        assert_eq!(
            block_hash(None, &[1, 2, 3]).0,
            xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0], ROOT_SEED)
        );
    }
}
