//! Running one scheduled step on the model: paged attention by gather.
//!
//! The scheduler hands the runner a list of `(sequence, chunk)` pairs: run
//! `chunk` tokens of this sequence, starting at its `num_computed`. The
//! runner groups them into forward passes:
//!
//! * every one-token chunk (a decode step, or a one-token prompt) goes into
//!   **one batched forward** `[batch, 1]`: this is where batching pays, since
//!   a decode step costs about as much for 64 sequences as for one;
//! * longer chunks (prompts, or slices of them under chunked prefill) run
//!   as one forward `[n, chunk]` per chunk length: prompts of one length
//!   share their weight reads and kernel launches.
//!
//! Inside a forward, [`PagedAttention`] is the [`AttentionCache`]: it writes
//! each new token's K and V into the sequence's slots in the pool, gathers
//! all of the sequence's slots back through its block table, and runs
//! scaled dot-product attention with a mask that hides padding and the
//! future. This is paged attention built from stock PyTorch operations
//! (`index_copy_`, `index_select`, SDPA) instead of a custom kernel.

use tch::{Kind, Tensor};

use crate::kv::block::BlockTable;
use crate::kv::pool::KvPool;
use crate::model::llama::{AttentionCache, Llama};

/// One sequence's part of a forward pass.
pub struct ChunkInput<'a> {
    pub table: &'a BlockTable,
    /// Tokens already in the cache (the chunk starts at this position).
    pub start: usize,
    pub tokens: &'a [u32],
}

/// Attention over the paged pool for a batch of sequences.
pub struct PagedAttention<'a> {
    pool: &'a KvPool,
    /// Where each new token's K/V goes: `[batch · new_tokens]`.
    write_slots: Tensor,
    /// Every cached slot of each sequence, padded: `[batch · context]`.
    read_slots: Tensor,
    context: i64,
    /// `[batch, 1, new_tokens, context]`, true where attention is allowed;
    /// `None` when no sequence has a past (plain causal).
    mask: Option<Tensor>,
}

impl<'a> PagedAttention<'a> {
    /// Prepares slots and masks for `chunks`, all with the same number of new tokens.
    pub fn new(pool: &'a KvPool, chunks: &[ChunkInput<'_>]) -> Self {
        let bs = pool.block_size();
        let new = chunks[0].tokens.len();
        let context = chunks
            .iter()
            .map(|c| c.start + c.tokens.len())
            .max()
            .unwrap_or(0);
        let mut write = Vec::with_capacity(chunks.len() * new);
        let mut read = Vec::with_capacity(chunks.len() * context);
        for c in chunks {
            debug_assert_eq!(c.tokens.len(), new, "one group, one chunk length");
            let len = c.start + c.tokens.len();
            write.extend((c.start..len).map(|p| c.table.slot(p, bs)));
            read.extend((0..len).map(|p| c.table.slot(p, bs)));
            // Padding reads slot 0; the mask hides it.
            read.extend(std::iter::repeat_n(0, context - len));
        }
        // Chunks of equal length that all start a sequence fill the context
        // exactly: PyTorch's own causal mask is right for them.
        let plain_causal = chunks.iter().all(|c| c.start == 0);
        let mask = (!plain_causal).then(|| {
            let device = pool.device();
            let starts: Vec<i64> = chunks.iter().map(|c| c.start as i64).collect();
            let starts = Tensor::from_slice(&starts)
                .to_device(device)
                .reshape([-1, 1, 1, 1]);
            let rows = Tensor::arange(new as i64, (Kind::Int64, device)).reshape([1, 1, -1, 1]);
            let cols = Tensor::arange(context as i64, (Kind::Int64, device)).reshape([1, 1, 1, -1]);
            cols.le_tensor(&(starts + rows))
        });
        PagedAttention {
            pool,
            write_slots: pool.slot_tensor(&write),
            read_slots: pool.slot_tensor(&read),
            context: context as i64,
            mask,
        }
    }
}

impl<'a> PagedAttention<'a> {
    /// Attention from slots and a mask already on the device (what a
    /// padded decode step computes inside its CUDA graph): `write_slots`
    /// `[batch]`, `read_slots` `[batch · context]`, `mask` `[batch, 1, 1, context]`.
    pub fn from_slots(
        pool: &'a KvPool,
        write_slots: Tensor,
        read_slots: Tensor,
        context: i64,
        mask: Tensor,
    ) -> Self {
        PagedAttention {
            pool,
            write_slots,
            read_slots,
            context,
            mask: Some(mask),
        }
    }
}

impl AttentionCache for PagedAttention<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, kv_heads, new, head_dim) =
            k.size4().expect("k is [batch, kv_heads, new, head_dim]");
        let gathered = [(0, k), (1, v)].map(|(which, x)| {
            let mut store = self.pool.layer(layer, which);
            let rows = x.transpose(1, 2).reshape([b * new, kv_heads, head_dim]);
            let _ = store.index_copy_(0, &self.write_slots, &rows);
            store
                .index_select(0, &self.read_slots)
                .reshape([b, self.context, kv_heads, head_dim])
                .transpose(1, 2)
        });
        let [keys, values] = gathered;
        let gqa = q.size()[1] != kv_heads;
        match &self.mask {
            None => Tensor::scaled_dot_product_attention(
                q,
                &keys,
                &values,
                None::<Tensor>,
                0.0,
                new > 1,
                None,
                gqa,
            ),
            Some(mask) => Tensor::scaled_dot_product_attention(
                q,
                &keys,
                &values,
                Some(mask),
                0.0,
                false,
                None,
                gqa,
            ),
        }
    }
}

/// Runs one group of equally long chunks and returns the logits of each
/// chunk's last token, `[batch, vocab]`.
pub fn forward_chunks(model: &Llama, pool: &KvPool, chunks: &[ChunkInput<'_>]) -> Tensor {
    let new = chunks[0].tokens.len() as i64;
    let tokens: Vec<i64> = chunks
        .iter()
        .flat_map(|c| c.tokens.iter().map(|&t| t as i64))
        .collect();
    let positions: Vec<i64> = chunks
        .iter()
        .flat_map(|c| (c.start..c.start + c.tokens.len()).map(|p| p as i64))
        .collect();
    let device = model.device();
    let tokens = Tensor::from_slice(&tokens)
        .to_device(device)
        .reshape([-1, new]);
    let positions = Tensor::from_slice(&positions)
        .to_device(device)
        .reshape([-1, new]);
    let mut attention = PagedAttention::new(pool, chunks);
    let hidden = model.forward(&tokens, &positions, &mut attention);
    model.logits(&hidden.select(1, new - 1))
}
