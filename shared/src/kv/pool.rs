//! The KV pool: one preallocated tensor holding every block of every layer.
//!
//! ```text
//! kv: [layers, 2 (K, V), num_blocks · block_size (slots), kv_heads, head_dim]
//! ```
//!
//! It is allocated once, at start-up, from a memory budget — the same
//! decision vLLM makes with `gpu_memory_utilization` — so serving never
//! allocates device memory per request, and "out of KV memory" is a
//! scheduling event (wait or preempt), not a crash.
//!
//! A *slot* is one token's K and V for one layer. Writing new tokens is an
//! `index_copy_` at their slots; reading a sequence back for attention is an
//! `index_select` of its slots — a gather through the block table.
//!
//! One block more than asked for is allocated at the end: the *padding
//! block*, never handed out, where a padded decode step (see
//! `engine::decode_graph`) writes the K and V of its padding rows.

use tch::{Device, Kind, Tensor};

use super::block::BlockTable;
use crate::model::config::LlamaConfig;

/// Preallocated K/V storage for `num_blocks` blocks of `block_size` tokens.
pub struct KvPool {
    kv: Tensor,
    block_size: usize,
    num_blocks: usize,
}

impl KvPool {
    /// Bytes one block occupies across all layers, K and V.
    pub fn bytes_per_block(config: &LlamaConfig, block_size: usize, kind: Kind) -> usize {
        config.kv_bytes_per_token(kind.elt_size_in_bytes()) * block_size
    }

    /// How many blocks fit in `budget_bytes`.
    pub fn blocks_for_budget(
        config: &LlamaConfig,
        block_size: usize,
        kind: Kind,
        budget_bytes: usize,
    ) -> usize {
        budget_bytes / Self::bytes_per_block(config, block_size, kind)
    }

    pub fn new(
        config: &LlamaConfig,
        num_blocks: usize,
        block_size: usize,
        device: Device,
        kind: Kind,
    ) -> KvPool {
        let shape = [
            config.num_hidden_layers as i64,
            2,
            ((num_blocks + 1) * block_size) as i64,
            config.num_kv_heads() as i64,
            config.head_dim() as i64,
        ];
        KvPool {
            kv: Tensor::zeros(shape, (kind, device)),
            block_size,
            num_blocks,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can hold sequences (the padding block is not counted).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Slots in each layer's K (or V): every block's, the padding block's included.
    pub fn slots_per_layer(&self) -> usize {
        (self.num_blocks + 1) * self.block_size
    }

    /// The id of the padding block: scratch space for padding rows.
    pub fn padding_block(&self) -> usize {
        self.num_blocks
    }

    pub fn device(&self) -> Device {
        self.kv.device()
    }

    pub fn kind(&self) -> Kind {
        self.kv.kind()
    }

    pub fn bytes(&self) -> usize {
        self.kv.numel() * self.kv.kind().elt_size_in_bytes()
    }

    /// K (`which = 0`) or V (`which = 1`) of one layer: a view
    /// `[slots, kv_heads, head_dim]` into the pool.
    pub fn layer(&self, layer: usize, which: i64) -> Tensor {
        self.kv.get(layer as i64).get(which)
    }

    /// Every layer's `(K, V)` views, as the custom kernels take them.
    pub fn layers(&self) -> Vec<(Tensor, Tensor)> {
        (0..self.kv.size()[0] as usize)
            .map(|layer| (self.layer(layer, 0), self.layer(layer, 1)))
            .collect()
    }

    /// The K and V of a sequence's first `len` tokens, as one plain tensor
    /// `[layers, 2, len, kv_heads, head_dim]` — what travels between workers.
    pub fn export(&self, table: &BlockTable, len: usize) -> Tensor {
        let slots = self.slot_tensor(&table.slots(len, self.block_size));
        self.kv.index_select(2, &slots)
    }

    /// Writes `kv` (`[layers, 2, len, kv_heads, head_dim]`, any device or
    /// dtype) into the slots of a sequence's first `len` tokens.
    pub fn import(&mut self, table: &BlockTable, kv: &Tensor) {
        let len = kv.size()[2] as usize;
        let slots = self.slot_tensor(&table.slots(len, self.block_size));
        let kv = kv.to_device(self.kv.device()).to_kind(self.kv.kind());
        let _ = self.kv.index_copy_(2, &slots, &kv);
    }

    /// The whole pool tensor (sharing its storage), to register it for
    /// one-sided writes by peers (module 4).
    pub fn tensor(&self) -> Tensor {
        self.kv.shallow_clone()
    }

    /// Elements of one key or value head.
    pub fn head_dim(&self) -> i64 {
        self.kv.size()[4]
    }

    /// Bytes one slot (one token's K or V in one layer) occupies.
    pub fn slot_bytes(&self) -> usize {
        let s = self.kv.size();
        (s[3] * s[4]) as usize * self.kv.kind().elt_size_in_bytes()
    }

    /// Slot indices as an int64 tensor on the pool's device.
    pub fn slot_tensor(&self, slots: &[i64]) -> Tensor {
        crate::engine::host_copy::upload(slots, self.kv.device())
    }
}
