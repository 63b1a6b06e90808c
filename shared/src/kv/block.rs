//! Blocks and block tables: the paging vocabulary of the KV cache.
//!
//! The KV pool is cut into fixed-size blocks of `block_size` token slots
//! (16 by default, as in vLLM). A sequence does not own a contiguous
//! region; it owns a [`BlockTable`] — the list of blocks holding its tokens
//! in order, exactly like a page table maps virtual pages to frames. Token
//! `i` of the sequence lives in slot `i % block_size` of block
//! `table[i / block_size]`.

use serde::{Deserialize, Serialize};

/// Index of a block in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The blocks of one sequence, in token order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
}

impl BlockTable {
    /// Global slot index of token `position` (`block * block_size + offset`),
    /// the row it occupies in the pool's per-layer tensors.
    pub fn slot(&self, position: usize, block_size: usize) -> i64 {
        let block = self.blocks[position / block_size];
        (block.index() * block_size + position % block_size) as i64
    }

    /// Slots of tokens `0..len`.
    pub fn slots(&self, len: usize, block_size: usize) -> Vec<i64> {
        (0..len).map(|p| self.slot(p, block_size)).collect()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
        tokens.div_ceil(block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_table() {
        let table = BlockTable {
            blocks: vec![BlockId(7), BlockId(2)],
        };
        assert_eq!(table.slots(6, 4), vec![28, 29, 30, 31, 8, 9]);
        assert_eq!(BlockTable::blocks_for(17, 16), 2);
        assert_eq!(BlockTable::blocks_for(16, 16), 1);
    }
}
