//! Decode steps with static shapes, replayed as CUDA graphs.
//!
//! A CUDA graph (see [`cuda_graph`](super::cuda_graph)) replays exactly the
//! kernels it recorded, on exactly the same buffers. A decode step changes
//! every time — the batch grows and shrinks, every sequence's context grows
//! by one — so the step is given a fixed shape first:
//!
//! * the batch is padded up to a **bucket** (1, 2, 4, 8, … 256 sequences);
//!   padding rows decode token 0 at position 0 into a padding block that
//!   the allocator never hands out;
//! * the context is padded up to a bucket too (a multiple of 128 tokens, or
//!   of an eighth of the next power of two for long contexts), and the
//!   attention mask hides the padding;
//! * every input lives in one int64 tensor on the device, written with one
//!   host-to-device copy per step:
//!
//! ```text
//! inputs = [ tokens (B) | positions (B) | write slots (B) | block table (B × C/block_size) ]
//! ```
//!
//! The slots to read and the mask are computed *inside* the step from the
//! block table and the positions, so they are part of the graph. So is the
//! greedy choice, each row's arg-max: the engine copies back one token id
//! per row and takes a row of logits out (an operation of its own, a few
//! microseconds of CPU) only where a sequence samples. Before, every row's
//! logits were taken out and stacked for an arg-max after the step: 128
//! small operations per step at batch 128, while the GPU waited.
//!
//! One graph is captured per `(batch, context)` bucket the first time it is
//! needed (a warm-up run, then the capture) and kept, up to
//! [`MAX_GRAPHS`]; all of them share one memory pool. This is what vLLM
//! does with its `cudagraph_capture_sizes`, minus the eager capture at
//! start-up.
//!
//! On a GPU the step runs on the custom kernels of [`crate::kernels`]
//! ([`Llama::decode_fused`]) when the engine has them; otherwise on the
//! PyTorch operations of [`Llama::forward`] with [`PagedAttention`].
//!
//! [`DecodeMode::Padded`] runs the very same padded step without a graph.
//! It is slower than eager on every device; it exists so that the padding,
//! the masks and the padding block are tested on a CPU, where graphs are not.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::cuda_graph::{CudaGraph, CudaGraphError, GraphPool};
use super::host_copy::copy_to_device;
use super::runner::{ChunkInput, PagedAttention};
use crate::kernels::{DecodeKernels, LayerRing};
use crate::kv::pool::KvPool;
use crate::model::llama::{Llama, PagedDecode};

/// How the engine runs a step of single-token decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeMode {
    /// Exact shapes; every kernel launched from the CPU, every step.
    #[default]
    Eager,
    /// Padded to buckets and replayed as CUDA graphs (needs a CUDA device
    /// and a build with `cfg(cuda_bridge)`).
    CudaGraphs,
    /// Padded to buckets but run eagerly: the graph path without the graph.
    Padded,
}

impl DecodeMode {
    /// The fastest mode that works on `device` with this build.
    pub fn best_for(device: Device) -> DecodeMode {
        if device.is_cuda() && CudaGraph::compiled() {
            DecodeMode::CudaGraphs
        } else {
            DecodeMode::Eager
        }
    }
}

impl std::str::FromStr for DecodeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "eager" => Ok(DecodeMode::Eager),
            "cuda-graphs" | "graphs" => Ok(DecodeMode::CudaGraphs),
            "padded" => Ok(DecodeMode::Padded),
            _ => Err(format!(
                "unknown decode mode {s:?}: use eager, cuda-graphs or padded"
            )),
        }
    }
}

impl std::fmt::Display for DecodeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecodeMode::Eager => "eager",
            DecodeMode::CudaGraphs => "cuda-graphs",
            DecodeMode::Padded => "padded",
        })
    }
}

/// The largest batch a graph is captured for; larger decode batches run eagerly.
pub const MAX_BATCH: usize = 256;
/// Graphs kept at once; the least recently used one goes first.
pub const MAX_GRAPHS: usize = 64;

/// The batch bucket: the next power of two.
pub fn batch_bucket(batch: usize) -> usize {
    batch.next_power_of_two()
}

/// The context bucket for `tokens` of context: a multiple of 128 tokens (of
/// a sixteenth of the next power of two beyond 2048), and of the block size.
/// Padding adds at most 128 tokens, or an eighth, to the attention's work.
pub fn context_bucket(tokens: usize, block_size: usize) -> usize {
    let step = (tokens.next_power_of_two() / 16).max(128);
    tokens
        .max(1)
        .next_multiple_of(step)
        .next_multiple_of(block_size)
}

/// One bucket's static buffers, and its graph once captured.
struct StaticStep {
    /// See the module docs for the layout.
    inputs: Tensor,
    /// `[batch, vocab]`: written by every run of the step.
    logits: Tensor,
    /// `[batch]`: each row's arg-max of `logits`, also written by every run.
    greedy: Tensor,
    graph: Option<CudaGraph>,
    last_used: u64,
}

/// What a decode step gives back for its real rows.
pub struct DecodeOutput {
    /// `[rows, vocab]`, for the rows that sample.
    pub logits: Tensor,
    /// `[rows]` (int64): each row's greedy token, the arg-max of its logits.
    pub greedy: Tensor,
}

/// Decode steps padded to buckets, with a graph per bucket.
pub struct DecodeGraphs {
    /// `Some` for [`DecodeMode::CudaGraphs`], `None` for [`DecodeMode::Padded`].
    pool: Option<GraphPool>,
    steps: HashMap<(usize, usize), StaticStep>,
    /// The fused kernels the step runs on; `None`: PyTorch operations.
    kernels: Option<Arc<DecodeKernels>>,
    clock: u64,
    captures: u64,
}

impl DecodeGraphs {
    /// For [`DecodeMode::CudaGraphs`] or [`DecodeMode::Padded`]; `None` for
    /// eager. With `kernels`, the step runs on them.
    pub fn new(
        mode: DecodeMode,
        device: Device,
        kernels: Option<Arc<DecodeKernels>>,
    ) -> Result<Option<DecodeGraphs>, CudaGraphError> {
        let pool = match mode {
            DecodeMode::Eager => return Ok(None),
            DecodeMode::Padded => None,
            DecodeMode::CudaGraphs if !device.is_cuda() => {
                return Err(CudaGraphError::NotCuda(device))
            }
            DecodeMode::CudaGraphs => Some(CudaGraph::new_pool()?),
        };
        Ok(Some(DecodeGraphs {
            pool,
            steps: HashMap::new(),
            kernels,
            clock: 0,
            captures: 0,
        }))
    }

    pub fn mode(&self) -> DecodeMode {
        match self.pool {
            Some(_) => DecodeMode::CudaGraphs,
            None => DecodeMode::Padded,
        }
    }

    /// True when the step runs on the fused kernels.
    pub fn fused_kernels(&self) -> bool {
        self.kernels.is_some()
    }

    /// With the fused kernels: the largest batch whose products run on the
    /// matrix-vector kernel (0: none).
    pub fn matvec_limit(&self) -> Option<usize> {
        self.kernels.as_deref().map(DecodeKernels::matvec_limit)
    }

    /// With the fused kernels: whether those batches run one persistent
    /// kernel per layer.
    pub fn layer_kernel(&self) -> bool {
        self.kernels
            .as_deref()
            .is_some_and(DecodeKernels::layer_kernel)
    }

    /// With the layer kernel on: its weight ring on this GPU.
    pub fn layer_ring(&self) -> Option<LayerRing> {
        self.kernels
            .as_deref()
            .filter(|kernels| kernels.layer_kernel())
            .and_then(DecodeKernels::layer_ring)
    }

    /// Graphs captured so far (each is one bucket's first use).
    pub fn captures(&self) -> u64 {
        self.captures
    }

    /// Runs one decode step for `chunks` (one new token each) and returns
    /// its outputs for those rows, or `None` when the batch is too large for
    /// a bucket (the caller runs it eagerly).
    ///
    /// The step is queued on the device, not waited for. The outputs are
    /// views of the bucket's buffers: read them before the bucket's next
    /// step runs.
    pub fn forward(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        chunks: &[ChunkInput<'_>],
    ) -> Result<Option<DecodeOutput>, CudaGraphError> {
        debug_assert!(chunks.iter().all(|c| c.tokens.len() == 1));
        let batch = chunks.len();
        if batch == 0 || batch > MAX_BATCH {
            return Ok(None);
        }
        let key = bucket(pool, chunks);
        self.ensure_step(model, pool, key)?;
        self.launch(model, pool, chunks, key, None).map(Some)
    }

    /// Queues the decode step after one that is still running, for the
    /// same sequences one position further on. The host does not know
    /// their tokens yet: each row's token is copied on the device from
    /// `tokens`, the greedy tokens of the step before (`rows` give the
    /// block tables and the new positions; their own tokens are not read).
    ///
    /// Returns `None` when that step's bucket is not prepared, since
    /// preparing one (a capture) waits for the device, which is what
    /// queueing ahead is meant to avoid.
    pub fn forward_after(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        rows: &[ChunkInput<'_>],
        tokens: &Tensor,
    ) -> Result<Option<DecodeOutput>, CudaGraphError> {
        let key = bucket(pool, rows);
        if rows.is_empty() || rows.len() > MAX_BATCH || !self.steps.contains_key(&key) {
            return Ok(None);
        }
        self.launch(model, pool, rows, key, Some(tokens)).map(Some)
    }

    /// Writes the inputs of a prepared bucket and runs (replays) its step.
    fn launch(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        chunks: &[ChunkInput<'_>],
        key: (usize, usize),
        tokens_on_device: Option<&Tensor>,
    ) -> Result<DecodeOutput, CudaGraphError> {
        self.clock += 1;
        let kernels = self.kernels.as_deref();
        let step = self.steps.get_mut(&key).expect("the bucket is prepared");
        step.last_used = self.clock;
        let rows = chunks.len() as i64;
        // Without waiting for the steps already queued (see `host_copy`).
        copy_to_device(&mut step.inputs, &pack_inputs(pool, chunks, key))?;
        if let Some(tokens) = tokens_on_device {
            step.inputs.narrow(0, 0, rows).copy_(tokens);
        }
        match &step.graph {
            Some(graph) => graph.replay()?,
            None => {
                (step.logits, step.greedy) = static_step(model, pool, &step.inputs, key, kernels)
            }
        }
        Ok(DecodeOutput {
            logits: step.logits.narrow(0, 0, rows),
            greedy: step.greedy.narrow(0, 0, rows),
        })
    }

    /// Prepares (with graphs: captures) every bucket that decode steps of
    /// up to `max_batch` sequences with contexts in `contexts` will use, so
    /// that no capture happens while something is being timed. Serving
    /// engines do this at start-up. Returns how many buckets were new.
    pub fn prepare_buckets(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        max_batch: usize,
        contexts: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, CudaGraphError> {
        let bs = pool.block_size();
        let mut context_buckets: Vec<usize> = contexts.map(|c| context_bucket(c, bs)).collect();
        context_buckets.dedup();
        let mut batch_buckets = vec![1];
        while *batch_buckets.last().unwrap() < batch_bucket(max_batch.min(MAX_BATCH)) {
            batch_buckets.push(batch_buckets.last().unwrap() * 2);
        }
        let mut new = 0;
        for &c in &context_buckets {
            for &b in &batch_buckets {
                if self.ensure_step(model, pool, (b, c))? {
                    new += 1;
                }
            }
        }
        Ok(new)
    }

    /// Times the bare decode step of `rows` (one new token each, at most
    /// [`MAX_BATCH`]): the step alone, with no scheduling and no sampling.
    /// Runs it `iters` times, each followed by a device sync, and returns
    /// milliseconds per step. This separates the step's own cost from
    /// everything a served batch adds around it.
    ///
    /// The step writes each row's new key and value into its slot, as a
    /// served step does: the rows' blocks are the caller's.
    pub fn time_step(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        rows: &[ChunkInput<'_>],
        iters: usize,
    ) -> Result<f64, CudaGraphError> {
        let iters = iters.max(1);
        let runs = self.replay_each(model, pool, rows, iters, |_, took| took)?;
        Ok(runs.iter().sum::<std::time::Duration>().as_secs_f64() * 1e3 / iters as f64)
    }

    /// Runs the bare step of `rows` `times` times, as [`Self::time_step`]
    /// does, and once each run has finished on the device calls `after`
    /// with the decode kernels (where the step runs on them) and the run's
    /// time (its inputs' copy, the step and the sync after it).
    pub fn replay_each<T>(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        rows: &[ChunkInput<'_>],
        times: usize,
        mut after: impl FnMut(Option<&DecodeKernels>, std::time::Duration) -> T,
    ) -> Result<Vec<T>, CudaGraphError> {
        debug_assert!(rows.len() <= MAX_BATCH && rows.iter().all(|c| c.tokens.len() == 1));
        let key = bucket(pool, rows);
        self.ensure_step(model, pool, key)?;
        let kernels = self.kernels.as_deref();
        let step = self.steps.get_mut(&key).expect("inserted above");
        let host = Tensor::from_slice(&pack_inputs(pool, rows, key));
        let sync = || {
            if let Device::Cuda(index) = model.device() {
                tch::Cuda::synchronize(index as i64);
            }
        };
        sync();
        let mut results = Vec::with_capacity(times);
        for _ in 0..times {
            let start = std::time::Instant::now();
            step.inputs.copy_(&host);
            match &step.graph {
                Some(graph) => graph.replay()?,
                None => {
                    (step.logits, step.greedy) =
                        static_step(model, pool, &step.inputs, key, kernels)
                }
            }
            sync();
            results.push(after(kernels, start.elapsed()));
        }
        Ok(results)
    }

    /// Prepares the bucket `key` unless it is ready; true if it was new.
    fn ensure_step(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        key: (usize, usize),
    ) -> Result<bool, CudaGraphError> {
        if self.steps.contains_key(&key) {
            return Ok(false);
        }
        self.make_room(model.device());
        let step = self.prepare(model, pool, key)?;
        self.steps.insert(key, step);
        Ok(true)
    }

    /// Drops the least recently used step when the table is full.
    fn make_room(&mut self, device: Device) {
        if self.steps.len() < MAX_GRAPHS {
            return;
        }
        // A step queued ahead and then not used may still be running on
        // that graph's buffers; they must not be freed under it.
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        let oldest = self
            .steps
            .iter()
            .min_by_key(|(_, s)| s.last_used)
            .map(|(k, _)| *k);
        if let Some(key) = oldest {
            self.steps.remove(&key);
        }
    }

    /// Allocates a bucket's buffers and, with graphs, warms up and captures.
    fn prepare(
        &mut self,
        model: &Llama,
        pool: &KvPool,
        key: (usize, usize),
    ) -> Result<StaticStep, CudaGraphError> {
        let host = pack_inputs(pool, &[], key);
        let inputs = Tensor::from_slice(&host).to_device(model.device());
        let kernels = self.kernels.as_deref();
        let Some(graph_pool) = self.pool else {
            let (logits, greedy) = static_step(model, pool, &inputs, key, kernels);
            return Ok(StaticStep {
                inputs,
                logits,
                greedy,
                graph: None,
                last_used: self.clock,
            });
        };
        // A graph's shapes never change, so cuDNN's attention, planned once
        // here, is the right choice inside it. The warm-up run makes the
        // libraries (cuBLAS handles, the cuDNN plan) ready outside the capture.
        let cudnn_before = CudaGraph::set_cudnn_attention(true);
        let _ = static_step(model, pool, &inputs, key, kernels);
        let captured = CudaGraph::capture(model.device(), graph_pool, || {
            static_step(model, pool, &inputs, key, kernels)
        });
        CudaGraph::set_cudnn_attention(cudnn_before);
        let (graph, (logits, greedy)) = captured?;
        self.captures += 1;
        tracing::debug!(
            batch = key.0,
            context = key.1,
            "captured a CUDA graph of the decode step"
        );
        Ok(StaticStep {
            inputs,
            logits,
            greedy,
            graph: Some(graph),
            last_used: self.clock,
        })
    }
}

/// The `(batch, context)` bucket of a decode step of `chunks`.
fn bucket(pool: &KvPool, chunks: &[ChunkInput<'_>]) -> (usize, usize) {
    let longest = chunks.iter().map(|c| c.start + 1).max().unwrap_or(1);
    (
        batch_bucket(chunks.len().max(1)),
        context_bucket(longest, pool.block_size()),
    )
}

/// The host side of `inputs` for a bucket: real rows first, then padding
/// rows (token 0 at position 0, writing into and reading from the padding
/// block). With no chunks, every row is padding (the warm-up's inputs).
fn pack_inputs(
    pool: &KvPool,
    chunks: &[ChunkInput<'_>],
    (batch, context): (usize, usize),
) -> Vec<i64> {
    let bs = pool.block_size();
    let blocks_per_row = context / bs;
    let padding_block = pool.padding_block() as i64;
    let padding_slot = padding_block * bs as i64;
    let mut tokens = Vec::with_capacity(batch);
    let mut positions = Vec::with_capacity(batch);
    let mut writes = Vec::with_capacity(batch);
    let mut tables = Vec::with_capacity(batch * blocks_per_row);
    for c in chunks {
        tokens.push(c.tokens[0] as i64);
        positions.push(c.start as i64);
        writes.push(c.table.slot(c.start, bs));
        let used = (c.start / bs) + 1;
        tables.extend(c.table.blocks[..used].iter().map(|b| b.index() as i64));
        tables.extend(std::iter::repeat_n(padding_block, blocks_per_row - used));
    }
    let padding = batch - chunks.len();
    tokens.extend(std::iter::repeat_n(0, padding));
    positions.extend(std::iter::repeat_n(0, padding));
    writes.extend(std::iter::repeat_n(padding_slot, padding));
    tables.extend(std::iter::repeat_n(padding_block, padding * blocks_per_row));
    [tokens, positions, writes, tables].concat()
}

/// The padded decode step, from the static inputs to the logits and each
/// row's arg-max. Everything here runs on the device with shapes fixed by
/// the bucket, so it can be captured.
fn static_step(
    model: &Llama,
    pool: &KvPool,
    inputs: &Tensor,
    key: (usize, usize),
    kernels: Option<&DecodeKernels>,
) -> (Tensor, Tensor) {
    let logits = step_logits(model, pool, inputs, key, kernels);
    let greedy = logits.argmax(-1, false);
    (logits, greedy)
}

/// The padded decode step's logits `[batch, vocab]`.
fn step_logits(
    model: &Llama,
    pool: &KvPool,
    inputs: &Tensor,
    (b, c): (usize, usize),
    kernels: Option<&DecodeKernels>,
) -> Tensor {
    let _no_grad = tch::no_grad_guard();
    let (b, c) = (b as i64, c as i64);
    let bs = pool.block_size() as i64;
    let device = inputs.device();
    let tokens = inputs.narrow(0, 0, b);
    let positions = inputs.narrow(0, b, b);
    let write_slots = inputs.narrow(0, 2 * b, b);
    let tables = inputs.narrow(0, 3 * b, b * (c / bs)).reshape([b, c / bs]);
    if let Some(kernels) = kernels {
        let layers = pool.layers();
        let step = PagedDecode {
            tokens: &tokens,
            positions: &positions,
            write_slots: &write_slots,
            block_tables: &tables,
            block_size: pool.block_size(),
            layers: &layers,
        };
        return model.decode_fused(kernels, &step);
    }
    let tokens = tokens.reshape([b, 1]);
    let positions = positions.reshape([b, 1]);
    let tables = tables.reshape([b, c / bs, 1]);
    // Slot of every context position: block · block_size + offset.
    let offsets = Tensor::arange(bs, (Kind::Int64, device)).reshape([1, 1, bs]);
    let read_slots = (tables * bs + offsets).reshape([-1]);
    // Position p attends to columns 0..=p.
    let cols = Tensor::arange(c, (Kind::Int64, device)).reshape([1, 1, 1, c]);
    let mask = cols.le_tensor(&positions.reshape([b, 1, 1, 1]));
    let mut attention = PagedAttention::from_slots(pool, write_slots, read_slots, c, mask);
    let hidden = model.forward(&tokens, &positions, &mut attention);
    model.logits(&hidden.select(1, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_with_little_waste() {
        assert_eq!(batch_bucket(1), 1);
        assert_eq!(batch_bucket(3), 4);
        assert_eq!(batch_bucket(128), 128);
        assert_eq!(batch_bucket(129), 256);
        assert_eq!(context_bucket(1, 16), 128);
        assert_eq!(context_bucket(513, 16), 640);
        assert_eq!(context_bucket(640, 16), 640);
        assert_eq!(context_bucket(5000, 16), 5120);
        for tokens in 1..10_000 {
            let c = context_bucket(tokens, 16);
            assert!(c >= tokens && c % 16 == 0, "{tokens} -> {c}");
            let waste = c - tokens;
            assert!(
                waste < 128 || waste <= tokens / 8,
                "{tokens} -> {c} wastes too much"
            );
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            DecodeMode::Eager,
            DecodeMode::CudaGraphs,
            DecodeMode::Padded,
        ] {
            assert_eq!(mode.to_string().parse::<DecodeMode>(), Ok(mode));
        }
        assert!("fast".parse::<DecodeMode>().is_err());
        assert_eq!(DecodeMode::best_for(Device::Cpu), DecodeMode::Eager);
    }
}
