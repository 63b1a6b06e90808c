//! Running one scheduled step on the model: paged attention by gather.
//!
//! The scheduler hands the runner a list of `(sequence, chunk)` pairs: run
//! `chunk` tokens of this sequence, starting at its `num_computed`. The
//! runner groups them into forward passes:
//!
//! * every one-token chunk (a decode step, or a one-token prompt) goes into
//!   **one batched forward** `[batch, 1]`: this is where batching pays, since
//!   a decode step costs about as much for 64 sequences as for one;
//! * all longer chunks (prompts, or slices of them under chunked prefill)
//!   go into **one more forward**, whatever their lengths. Chunks of one
//!   length run as a batch `[n, chunk]`; chunks of several lengths are
//!   laid end to end in one row `[1, tokens]`. The norms, the projections
//!   and the MLP treat every token alike, so they neither know nor care
//!   where one prompt ends; only attention does, and it runs per group of
//!   equally long chunks ([`ChunkGroup`]). A step that prefills seven
//!   whole prompts and the start of an eighth reads the weights once, not
//!   once per chunk length: the same packing vLLM calls its "varlen" batch.
//!
//! Inside a forward, [`PagedAttention`] is the [`AttentionCache`]: it writes
//! each new token's K and V into the sequence's slots in the pool, gathers
//! all of the sequence's slots back through its block table, and runs
//! scaled dot-product attention with a mask that hides padding and the
//! future. This is paged attention built from stock PyTorch operations
//! (`index_copy_`, `index_select`, SDPA) instead of a custom kernel.
//!
//! On a GPU that has it (bf16 or f16), attention needs no groups: every
//! chunk's context is gathered end to end and one FlashAttention call with
//! the sequences' lengths covers the whole row ([`varlen_attention`]).
//! Only equally long whole prompts, one plain causal rectangle, stay with
//! SDPA.
//!
//! On a GPU with the engine's custom kernels, the prefill forward runs on
//! them instead ([`Llama::prefill_fused`]): RoPE and the KV-cache write in
//! one kernel, the activation in another, residual additions inside the
//! matrix products. Attention stays the gather and SDPA (or FlashAttention)
//! of this file ([`PagedAttention::attend_rows`]).

use tch::{Kind, Tensor};

use super::host_copy::upload;
use super::varlen_attention::{self, PackedSequences};
use crate::kernels::DecodeKernels;
use crate::kv::block::BlockTable;
use crate::kv::pool::KvPool;
use crate::model::llama::{AttentionCache, Llama, PagedPrefill};

/// One sequence's part of a forward pass.
pub struct ChunkInput<'a> {
    pub table: &'a BlockTable,
    /// Tokens already in the cache (the chunk starts at this position).
    pub start: usize,
    pub tokens: &'a [u32],
}

/// Attention over the paged pool for the chunks of one forward.
pub struct PagedAttention<'a> {
    pool: &'a KvPool,
    /// Where each new token's K/V goes: `[tokens]`, chunk after chunk.
    write_slots: Tensor,
    /// How the chunks' contexts are read back.
    contexts: Contexts,
    /// The chunks have more than one length (see [`PagedAttention::packed`]).
    packed: bool,
}

/// How attention reads the chunks' contexts.
enum Contexts {
    /// Per group of equally long chunks: padded gathers and SDPA.
    Groups(Vec<ChunkGroup>),
    /// All chunks at once: one gather, one FlashAttention call.
    Packed(PackedContexts),
}

/// Every chunk's whole context (past and new tokens), end to end, for one
/// [`varlen_attention::attention`] call.
struct PackedContexts {
    /// `[total context]`: each sequence's slots in order, no padding.
    read_slots: Tensor,
    sequences: PackedSequences,
}

impl PackedContexts {
    fn new(pool: &KvPool, chunks: &[ChunkInput<'_>]) -> PackedContexts {
        let bs = pool.block_size();
        let read: Vec<i64> = chunks
            .iter()
            .flat_map(|c| (0..c.start + c.tokens.len()).map(|p| c.table.slot(p, bs)))
            .collect();
        let lengths: Vec<(usize, usize)> = chunks
            .iter()
            .map(|c| (c.tokens.len(), c.start + c.tokens.len()))
            .collect();
        PackedContexts {
            read_slots: pool.slot_tensor(&read),
            sequences: PackedSequences::new(&lengths, pool.device()),
        }
    }
}

/// Which way a forward's attention reads its contexts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ContextReads {
    /// FlashAttention over packed sequences where [`varlen_attention::usable`]
    /// says it runs and the chunks are not one plain causal rectangle;
    /// groups elsewhere.
    Best,
    /// Always groups (the tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Groups,
}

/// Chunks of the same length, next to each other in the forward: one
/// scaled dot-product attention call, their contexts padded to the longest.
struct ChunkGroup {
    /// Where its first token is among the forward's tokens.
    first_row: i64,
    chunks: i64,
    len: i64,
    /// Every cached slot of each chunk's sequence, padded: `[chunks · context]`.
    read_slots: Tensor,
    context: i64,
    /// `[chunks, 1, len, context]`, true where attention is allowed; `None`
    /// when no chunk has a past (plain causal).
    mask: Option<Tensor>,
}

impl ChunkGroup {
    fn new(pool: &KvPool, first_row: usize, chunks: &[ChunkInput<'_>]) -> ChunkGroup {
        let bs = pool.block_size();
        let len = chunks[0].tokens.len();
        let context = chunks.iter().map(|c| c.start + len).max().unwrap_or(0);
        let mut read = Vec::with_capacity(chunks.len() * context);
        for c in chunks {
            let end = c.start + len;
            read.extend((0..end).map(|p| c.table.slot(p, bs)));
            // Padding reads slot 0; the mask hides it.
            read.extend(std::iter::repeat_n(0, context - end));
        }
        // Chunks of equal length that all start a sequence fill the context
        // exactly: PyTorch's own causal mask is right for them.
        let plain_causal = chunks.iter().all(|c| c.start == 0);
        let mask = (!plain_causal).then(|| {
            let device = pool.device();
            let starts: Vec<i64> = chunks.iter().map(|c| c.start as i64).collect();
            let starts = upload(&starts, device).reshape([-1, 1, 1, 1]);
            let rows = Tensor::arange(len as i64, (Kind::Int64, device)).reshape([1, 1, -1, 1]);
            let cols = Tensor::arange(context as i64, (Kind::Int64, device)).reshape([1, 1, 1, -1]);
            cols.le_tensor(&(starts + rows))
        });
        ChunkGroup {
            first_row: first_row as i64,
            chunks: chunks.len() as i64,
            len: len as i64,
            read_slots: pool.slot_tensor(&read),
            context: context as i64,
            mask,
        }
    }

    fn rows(&self) -> i64 {
        self.chunks * self.len
    }
}

impl<'a> PagedAttention<'a> {
    /// Prepares slots (and masks) for `chunks`. Where attention runs per
    /// group, chunks of equal length that are next to each other share a
    /// group: order them by length to have as few groups as lengths.
    pub fn new(pool: &'a KvPool, chunks: &[ChunkInput<'_>]) -> Self {
        Self::reading(pool, chunks, ContextReads::Best)
    }

    fn reading(pool: &'a KvPool, chunks: &[ChunkInput<'_>], reads: ContextReads) -> Self {
        let bs = pool.block_size();
        let write: Vec<i64> = chunks
            .iter()
            .flat_map(|c| (c.start..c.start + c.tokens.len()).map(|p| c.table.slot(p, bs)))
            .collect();
        let packed = chunks
            .windows(2)
            .any(|w| w[0].tokens.len() != w[1].tokens.len());
        // Equally long whole prompts are one rectangle under a plain causal
        // mask, which SDPA takes as it is, with its own choice of kernel: on
        // an H100 a 512-token prompt prefilled in 3.2-3.4 ms that way and in
        // 3.6-3.9 through the packed call.
        let rectangle = !packed && chunks.iter().all(|c| c.start == 0);
        let flash = reads == ContextReads::Best
            && !rectangle
            && varlen_attention::usable(pool.device(), pool.kind(), pool.head_dim());
        let contexts = if flash {
            Contexts::Packed(PackedContexts::new(pool, chunks))
        } else {
            Contexts::Groups(Self::groups(pool, chunks))
        };
        PagedAttention {
            pool,
            write_slots: pool.slot_tensor(&write),
            contexts,
            packed,
        }
    }

    /// Consecutive chunks of equal length, one group each.
    fn groups(pool: &KvPool, chunks: &[ChunkInput<'_>]) -> Vec<ChunkGroup> {
        let mut groups = Vec::new();
        let (mut first_chunk, mut first_row) = (0, 0);
        for (i, c) in chunks.iter().enumerate() {
            let ends_group = chunks
                .get(i + 1)
                .is_none_or(|next| next.tokens.len() != c.tokens.len());
            if ends_group {
                let group = ChunkGroup::new(pool, first_row, &chunks[first_chunk..=i]);
                first_row += group.rows() as usize;
                first_chunk = i + 1;
                groups.push(group);
            }
        }
        groups
    }

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
        let group = ChunkGroup {
            first_row: 0,
            chunks: write_slots.size()[0],
            len: 1,
            read_slots,
            context,
            mask: Some(mask),
        };
        PagedAttention {
            pool,
            write_slots,
            contexts: Contexts::Groups(vec![group]),
            packed: false,
        }
    }

    /// True when the forward must lay its tokens end to end (`[1, tokens]`):
    /// the chunks have more than one length. Otherwise its batch is the
    /// chunks themselves, `[chunks, len]`.
    pub fn packed(&self) -> bool {
        self.packed
    }

    /// Where each new token's K and V go, `[tokens]`.
    pub fn write_slots(&self) -> &Tensor {
        &self.write_slots
    }

    /// Attention of one group's queries `[chunks, heads, len, head_dim]`
    /// over its sequences' cached keys and values (this step's included).
    ///
    /// Under a mask, each key/value head is repeated for its query heads
    /// here rather than by SDPA (`enable_gqa`): SDPA's memory-efficient
    /// kernel, the one of its GPU kernels that takes a mask, does not group
    /// heads, and with `enable_gqa` SDPA falls back to its plain-math path,
    /// which writes the whole score matrix out and reads it back.
    /// One-token chunks (decode steps) keep SDPA's grouping: inside a CUDA
    /// graph they run on cuDNN's kernel, which reads each head once.
    fn group_attention(&self, layer: usize, group: &ChunkGroup, q: &Tensor) -> Tensor {
        let heads = q.size()[1];
        let [keys, values] = [0, 1].map(|which| {
            let store = self.pool.layer(layer, which);
            let (_, kv_heads, head_dim) = store.size3().expect("a layer's pool is 3-d");
            let x = store
                .index_select(0, &group.read_slots)
                .reshape([group.chunks, group.context, kv_heads, head_dim])
                .transpose(1, 2);
            if group.mask.is_none() || kv_heads == heads || group.len == 1 {
                return x;
            }
            let shape = [
                group.chunks,
                kv_heads,
                heads / kv_heads,
                group.context,
                head_dim,
            ];
            x.unsqueeze(2).expand(shape, false).reshape([
                group.chunks,
                heads,
                group.context,
                head_dim,
            ])
        });
        let gqa = heads != keys.size()[1];
        let causal = group.mask.is_none() && group.len > 1;
        Tensor::scaled_dot_product_attention(
            q,
            &keys,
            &values,
            group.mask.as_ref(),
            0.0,
            causal,
            None,
            gqa,
        )
    }

    /// Attention of queries given as rows, `[tokens, heads, head_dim]` (the
    /// layout of the custom RoPE kernel's output), whose keys and values are
    /// already in the pool. Returns `[tokens, heads, head_dim]`.
    pub fn attend_rows(&self, layer: usize, q: &Tensor) -> Tensor {
        let groups = match &self.contexts {
            Contexts::Groups(groups) => groups,
            Contexts::Packed(packed) => {
                let [keys, values] = [0, 1].map(|which| {
                    self.pool
                        .layer(layer, which)
                        .index_select(0, &packed.read_slots)
                });
                return varlen_attention::attention(q, &keys, &values, &packed.sequences)
                    .unwrap_or_else(|err| panic!("layer {layer}: {err}"));
            }
        };
        let (_, heads, head_dim) = q.size3().expect("q is [tokens, heads, head_dim]");
        let outs: Vec<Tensor> = groups
            .iter()
            .map(|g| {
                let q = q
                    .narrow(0, g.first_row, g.rows())
                    .view([g.chunks, g.len, heads, head_dim])
                    .transpose(1, 2);
                self.group_attention(layer, g, &q).transpose(1, 2).reshape([
                    g.rows(),
                    heads,
                    head_dim,
                ])
            })
            .collect();
        match <[Tensor; 1]>::try_from(outs) {
            Ok([one]) => one,
            Err(outs) => Tensor::cat(&outs, 0),
        }
    }
}

impl AttentionCache for PagedAttention<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, kv_heads, new, head_dim) =
            k.size4().expect("k is [batch, kv_heads, new, head_dim]");
        for (which, x) in [(0, k), (1, v)] {
            let rows = x.transpose(1, 2).reshape([b * new, kv_heads, head_dim]);
            let _ = self
                .pool
                .layer(layer, which)
                .index_copy_(0, &self.write_slots, &rows);
        }
        if let Contexts::Groups(groups) = &self.contexts {
            if let [group] = groups.as_slice() {
                return self.group_attention(layer, group, q);
            }
        }
        // [batch, heads, len, head_dim] -> [batch · len, heads, head_dim]
        // and back (a packed forward's batch is 1).
        let (batch, heads, len, head_dim) = q.size4().expect("q is [batch, heads, len, head_dim]");
        let rows = q.transpose(1, 2).reshape([batch * len, heads, head_dim]);
        self.attend_rows(layer, &rows)
            .view([batch, len, heads, head_dim])
            .transpose(1, 2)
    }
}

/// Runs the chunks of one forward and returns the logits of each chunk's
/// last token, `[chunks, vocab]`. Chunks of several lengths are packed
/// (see the module's introduction); order them by length, so that each
/// length is one group. With `kernels` (a GPU), the forward runs on them.
pub fn forward_chunks(
    model: &Llama,
    pool: &KvPool,
    chunks: &[ChunkInput<'_>],
    kernels: Option<&DecodeKernels>,
) -> Tensor {
    forward_chunks_reading(model, pool, chunks, kernels, ContextReads::Best)
}

fn forward_chunks_reading(
    model: &Llama,
    pool: &KvPool,
    chunks: &[ChunkInput<'_>],
    kernels: Option<&DecodeKernels>,
    reads: ContextReads,
) -> Tensor {
    let tokens: Vec<i64> = chunks
        .iter()
        .flat_map(|c| c.tokens.iter().map(|&t| t as i64))
        .collect();
    let positions: Vec<i64> = chunks
        .iter()
        .flat_map(|c| (c.start..c.start + c.tokens.len()).map(|p| p as i64))
        .collect();
    // Each chunk's last token: the row its logits come from.
    let last_rows: Vec<i64> = chunks
        .iter()
        .scan(0, |end, c| {
            *end += c.tokens.len() as i64;
            Some(*end - 1)
        })
        .collect();
    let device = model.device();
    let (tokens, positions, last_rows) = (
        upload(&tokens, device),
        upload(&positions, device),
        upload(&last_rows, device),
    );
    let mut attention = PagedAttention::reading(pool, chunks, reads);
    if let Some(kernels) = kernels {
        let layers = pool.layers();
        let step = PagedPrefill {
            tokens: &tokens,
            positions: &positions,
            write_slots: attention.write_slots(),
            last_rows: &last_rows,
            layers: &layers,
        };
        return model.prefill_fused(kernels, &step, &mut |layer, q, _, _| {
            attention.attend_rows(layer, q)
        });
    }
    let batch = if attention.packed() {
        1
    } else {
        chunks.len() as i64
    };
    let tokens = tokens.reshape([batch, -1]);
    let positions = positions.reshape([batch, -1]);
    let hidden = model.forward(&tokens, &positions, &mut attention);
    let last = hidden.reshape([-1, model.config().hidden_size as i64]);
    model.logits(&last.index_select(0, &last_rows))
}

#[cfg(test)]
mod tests {
    //! A packed forward against the dense reference: the paging, the
    //! grouping and the masks must be invisible in the logits and the KV.

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::kernels::{test_config as config, test_gpu};
    use crate::kv::block::BlockId;
    use crate::model::llama::DenseKvCache;

    /// A sequence with `past` tokens already in the pool, whose remaining
    /// tokens are this step's chunk.
    struct Sequence {
        table: BlockTable,
        tokens: Vec<u32>,
        past: usize,
    }

    impl Sequence {
        fn chunk(&self) -> ChunkInput<'_> {
            ChunkInput {
                table: &self.table,
                start: self.past,
                tokens: &self.tokens[self.past..],
            }
        }
    }

    /// Two chunks of 5 tokens after pasts of 6 and 2 (blocks of 4: the
    /// first chunk starts inside a block), then two whole prompts of 9:
    /// two groups, one with a mask and padding, one plainly causal. Block
    /// tables are out of order, as the pool hands blocks out.
    fn sequences() -> Vec<Sequence> {
        let sequence = |blocks: &[u32], len: u32, past: usize| Sequence {
            table: BlockTable {
                blocks: blocks.iter().map(|&b| BlockId(b)).collect(),
            },
            tokens: (0..len).map(|i| (i * 37 + blocks[0] * 11) % 256).collect(),
            past,
        };
        vec![
            sequence(&[9, 3, 7], 11, 6),
            sequence(&[14, 2], 7, 2),
            sequence(&[5, 12, 1], 9, 0),
            sequence(&[8, 6, 11], 9, 0),
        ]
    }

    /// Logits of every sequence's last token through one packed forward
    /// (after the pasts, each prefilled alone) against the dense reference
    /// forward of each whole sequence; then the pool's keys and values
    /// against the reference's cache. `tolerance` is relative to the
    /// largest value compared.
    fn check_packed_prefill(
        model: &Llama,
        kernels: Option<&DecodeKernels>,
        reads: ContextReads,
        tolerance: f64,
    ) {
        let _no_grad = tch::no_grad_guard();
        let sequences = sequences();
        let pool = KvPool::new(model.config(), 16, 4, model.device(), model.kind());
        for s in sequences.iter().filter(|s| s.past > 0) {
            let past = ChunkInput {
                table: &s.table,
                start: 0,
                tokens: &s.tokens[..s.past],
            };
            let _ = forward_chunks_reading(model, &pool, &[past], kernels, reads);
        }
        let chunks: Vec<ChunkInput> = sequences.iter().map(Sequence::chunk).collect();
        let attention = PagedAttention::reading(&pool, &chunks, reads);
        assert!(attention.packed());
        match &attention.contexts {
            Contexts::Groups(groups) => assert_eq!(groups.len(), 2),
            Contexts::Packed(_) => assert_eq!(reads, ContextReads::Best),
        }
        let logits = forward_chunks_reading(model, &pool, &chunks, kernels, reads);

        let close = |name: String, got: &Tensor, want: &Tensor| {
            let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
            let diff = (&got - &want).abs().max().double_value(&[]);
            let largest = want.abs().max().double_value(&[]);
            assert!(
                diff <= tolerance * largest,
                "{name} differs by {diff} (largest {largest}; kernels: {}, {reads:?})",
                kernels.is_some()
            );
        };
        for (i, s) in sequences.iter().enumerate() {
            let mut dense = DenseKvCache::new(model.config().num_hidden_layers);
            let tokens = model.token_tensor(&s.tokens);
            let len = s.tokens.len() as i64;
            let hidden = model.forward(&tokens, &model.positions(0, len), &mut dense);
            let reference = model.logits(&hidden.select(1, len - 1));
            close(
                format!("sequence {i}'s logits"),
                &logits.get(i as i64),
                &reference.get(0),
            );
            // [layers, 2, len, kv_heads, head_dim], as the dense cache's
            // [1, kv_heads, len, head_dim] per layer and tensor.
            let cached = pool.export(&s.table, s.tokens.len());
            for layer in 0..model.config().num_hidden_layers {
                let (k, v) = dense.layer(layer).expect("every layer ran");
                for (which, want) in [(0, k), (1, v)] {
                    let got = cached.get(layer as i64).get(which);
                    let want = want.squeeze_dim(0).transpose(0, 1);
                    close(
                        format!("sequence {i}'s layer {layer} KV {which}"),
                        &got,
                        &want,
                    );
                }
            }
        }
    }

    #[test]
    fn packed_chunks_match_the_dense_reference() {
        let model = Llama::random(config(), 5, Device::Cpu, Kind::Float);
        check_packed_prefill(&model, None, ContextReads::Best, 1e-4);
    }

    /// The prefill forward on the custom kernels (RoPE and the KV write in
    /// one kernel, the activation in another, additions in the products),
    /// in f32 and bf16, against the same reference; and PyTorch's on the
    /// GPU. In bf16 attention runs both ways: one FlashAttention call over
    /// the packed contexts (where the GPU has it) and per group.
    #[test]
    fn packed_chunks_on_the_kernels_match_the_dense_reference() {
        let Some(device) = test_gpu() else { return };
        for (kind, tolerance) in [(Kind::Float, 1e-3), (Kind::BFloat16, 0.05)] {
            let model = Llama::random(config(), 5, device, kind);
            let kernels = DecodeKernels::get(model.config(), kind, device).unwrap();
            for reads in [ContextReads::Best, ContextReads::Groups] {
                check_packed_prefill(&model, Some(&kernels), reads, tolerance);
                check_packed_prefill(&model, None, reads, tolerance);
            }
        }
        let head_dim = config().head_dim() as i64;
        eprintln!(
            "FlashAttention over packed sequences here: {}",
            varlen_attention::usable(device, Kind::BFloat16, head_dim)
        );
    }
}
