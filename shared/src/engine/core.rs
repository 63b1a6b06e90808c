//! The engine: a model, a paged KV pool, and a scheduler, driven one step at a time.
//!
//! ```text
//! add_request ─► waiting ─► schedule ─► forward (batched decode + prefill chunks) ─► sample ─► outputs
//!                   ▲                                                                  │
//!                   └──────────────── preempted (recompute) ◄──── out of blocks ───────┘
//! ```
//!
//! Besides serving whole requests, the engine exposes the two halves that
//! disaggregated serving splits between machines: [`Engine::prefill`] runs a
//! prompt and exports its KV cache as a plain tensor, and
//! [`Engine::decode_from`] imports such a tensor into fresh blocks and
//! continues decoding from it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use super::cuda_graph::{CudaGraph, CudaGraphError};
use super::decode_graph::{DecodeGraphs, DecodeMode, DecodeOutput};
use super::generate::FinishReason;
use super::host_copy::HostCopy;
use super::metrics::{EngineStats, RequestTimings};
use super::request::{Request, RequestId, Sequence, TokenEvent};
use super::runner::{forward_chunks, ChunkInput};
use super::sampling::argmax_batch;
use super::scheduler::{ScheduledChunk, Scheduler, SchedulerConfig};
use crate::kernels::timeline::LayerTimeline;
use crate::kernels::{DecodeKernels, LayerRing};
use crate::kv::block::{BlockId, BlockTable, DEFAULT_BLOCK_SIZE};
use crate::kv::pool::KvPool;
use crate::kv::prefix_cache::{KvEvent, PrefixCache};
use crate::model::llama::Llama;

/// How the engine is sized.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub block_size: usize,
    /// Blocks in the KV pool; see [`EngineConfig::with_kv_budget`].
    pub num_blocks: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
    /// How decode steps run; see [`DecodeMode`].
    pub decode: DecodeMode,
    /// Let PyTorch use cuDNN's attention on a GPU outside CUDA graphs. Off
    /// by default: it plans anew for every shape, and the engine's shapes
    /// keep changing (see [`CudaGraph::set_cudnn_attention`]). Graphs use
    /// it either way. The switch is global to the process.
    pub cudnn_attention: bool,
    /// Run padded decode steps (CUDA graphs) on the custom kernels of
    /// [`crate::kernels`] when the device is a GPU and they compile, and
    /// prefill forwards too (`SPARK_DISAGG_PREFILL_KERNELS=0` keeps those
    /// on PyTorch's operations); off, the graphs replay the
    /// PyTorch-operations step. On by default.
    pub fused_kernels: bool,
    /// With the custom kernels: decode batches of at most this many
    /// sequences run their matrix products on the matrix-vector kernel
    /// (with the RMSNorm, SwiGLU and residual addition fused around them),
    /// larger ones on cuBLAS. 0: cuBLAS always. Capped at what the model's
    /// shape allows (4 for most models). Default 1: on an H100 the kernel
    /// beats cuBLAS at batch 1 and loses at 2 and 4, where converting the
    /// staged rows for every weight makes it arithmetic-bound (chapter 1).
    /// The kernels are compiled for it: the rows they stage take shared
    /// memory that the layer kernel's weight ring gets back (fix 23).
    pub matvec_max_batch: usize,
    /// With padded decode steps: queue the next decode step before reading
    /// this one's tokens, when every sequence of the batch is decoding
    /// greedily and nothing else waits, so that the GPU never waits for
    /// the host between steps (vLLM's "async scheduling", SGLang's overlap
    /// scheduler). On by default; see [`Engine::step`].
    pub decode_ahead: bool,
}

impl EngineConfig {
    /// A configuration whose pool uses `kv_cache_bytes` of memory.
    pub fn with_kv_budget(model: &Llama, kv_cache_bytes: usize) -> Self {
        let block_size = DEFAULT_BLOCK_SIZE;
        EngineConfig {
            block_size,
            num_blocks: KvPool::blocks_for_budget(
                model.config(),
                block_size,
                model.kind(),
                kv_cache_bytes,
            ),
            max_num_batched_tokens: 512,
            max_num_seqs: 256,
            enable_prefix_caching: true,
            decode: DecodeMode::best_for(model.device()),
            cudnn_attention: false,
            fused_kernels: true,
            matvec_max_batch: 1,
            decode_ahead: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("request {0} is already in the engine")]
    DuplicateId(RequestId),
    #[error("request {id}: {message}")]
    Invalid { id: RequestId, message: String },
    #[error(
        "request {id} needs {needed} KV blocks but the whole pool has {available}; \
         give the engine more KV memory (--kv-cache-gb) or shorten the request"
    )]
    TooLarge {
        id: RequestId,
        needed: usize,
        available: usize,
    },
    #[error("the KV pool has {blocks} blocks: too small to serve anything; raise --kv-cache-gb")]
    EmptyPool { blocks: usize },
    #[error(
        "timing a decode step of {batch} sequences of {context} tokens needs {needed} free KV \
         blocks, and {available} are free: time a smaller batch or context, or give the engine \
         more KV memory (--kv-cache-gb)"
    )]
    NoRoomToTime {
        batch: usize,
        context: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "this engine's decode steps do not run the layer kernel with its timeline: run on a \
         GPU with CUDA graphs and the fused kernels, at a batch the layer kernel takes \
         (--matvec-max-batch), with SPARK_DISAGG_LAYER_TIMELINE=1 set before the engine starts \
         (and SPARK_DISAGG_LAYER_KERNEL=1 on a GPU before Hopper, where the layer kernel is off \
         by default)"
    )]
    NoLayerTimeline,
    #[error("reading the layer timeline: {0}")]
    LayerTimeline(String),
    #[error(transparent)]
    Graph(#[from] CudaGraphError),
    #[error("KV tensor has shape {found:?}; expected [layers, 2, {tokens}, kv_heads, head_dim] = {expected:?}")]
    KvShape {
        found: Vec<i64>,
        expected: Vec<i64>,
        tokens: usize,
    },
}

/// The result of [`Engine::prefill`]: everything a decode worker needs.
pub struct PrefillOutput {
    pub first_token: u32,
    /// `[layers, 2, prompt_tokens, kv_heads, head_dim]` on the engine's device.
    pub kv: Tensor,
    pub timings: RequestTimings,
}

/// One output of [`Engine::step`] (the same events a stream receives).
pub type StepOutput = TokenEvent;

pub struct Engine {
    model: Llama,
    pool: KvPool,
    scheduler: Scheduler,
    eos: Vec<u32>,
    steps: u64,
    /// KV of finished prefill-only requests, waiting to be picked up.
    prefilled: HashMap<RequestId, (u32, Tensor, RequestTimings)>,
    /// Events produced outside a step (requests finished on arrival).
    pending_events: Vec<TokenEvent>,
    /// Padded decode steps (CUDA graphs on a GPU); `None` runs them eagerly.
    decode_graphs: Option<DecodeGraphs>,
    /// The custom kernels prefill forwards run on (`None`: PyTorch
    /// operations); see [`prefill_kernels_enabled`].
    prefill_kernels: Option<Arc<DecodeKernels>>,
    /// See [`EngineConfig::decode_ahead`].
    decode_ahead: bool,
    /// The decode step queued before the last step's tokens were read.
    ahead: Option<AheadStep>,
    steps_ahead_used: u64,
    steps_ahead_dropped: u64,
}

/// A decode step queued ahead: which sequence each row is, at which
/// position, and where its outputs will be.
struct AheadStep {
    rows: Vec<(RequestId, usize)>,
    output: DecodeOutput,
}

impl AheadStep {
    /// True when `decodes`, a plan's one-token chunks, are this step: the
    /// same sequences, in the same order, each decoding the token at the
    /// position it was queued for.
    fn is_step_of(&self, decodes: &[ScheduledChunk], running: &[Sequence]) -> bool {
        decodes.len() == self.rows.len()
            && decodes.iter().zip(&self.rows).all(|(chunk, &(id, start))| {
                let seq = &running[chunk.index];
                chunk.len == 1 && seq.id == id && seq.num_computed == start
            })
    }
}

/// Whether prefill forwards run on the custom kernels when the engine has
/// them (the default); `SPARK_DISAGG_PREFILL_KERNELS=0` keeps them on
/// PyTorch's operations, so that the two can be compared.
fn prefill_kernels_enabled() -> bool {
    std::env::var("SPARK_DISAGG_PREFILL_KERNELS").map_or(true, |v| v.trim() != "0")
}

/// The token of a row queued ahead, which the host does not know yet (the
/// step copies it on the device from the step before).
const NOT_YET_KNOWN: [u32; 1] = [0];

impl Engine {
    /// `eos` are the ids that end a generation (from the tokenizer).
    pub fn new(model: Llama, config: EngineConfig, eos: Vec<u32>) -> Result<Engine, EngineError> {
        if config.num_blocks < 2 {
            return Err(EngineError::EmptyPool {
                blocks: config.num_blocks,
            });
        }
        let pool = KvPool::new(
            model.config(),
            config.num_blocks,
            config.block_size,
            model.device(),
            model.kind(),
        );
        let scheduler = Scheduler::new(
            SchedulerConfig {
                block_size: config.block_size,
                max_num_batched_tokens: config.max_num_batched_tokens,
                max_num_seqs: config.max_num_seqs,
            },
            PrefixCache::new(config.num_blocks, config.enable_prefix_caching),
        );
        if model.device().is_cuda() && !config.cudnn_attention {
            CudaGraph::set_cudnn_attention(false);
        }
        let wants_kernels =
            config.fused_kernels && config.decode != DecodeMode::Eager && model.device().is_cuda();
        let kernels = wants_kernels
            .then(|| {
                DecodeKernels::get_for_batches(
                    model.config(),
                    model.kind(),
                    model.device(),
                    config.matvec_max_batch,
                )
            })
            .and_then(|compiled| {
                compiled
                    .map_err(|err| tracing::warn!("decode steps use PyTorch operations: {err}"))
                    .ok()
            })
            .map(|kernels| Arc::new(kernels.with_matvec_limit(config.matvec_max_batch)));
        let prefill_kernels = kernels.clone().filter(|_| prefill_kernels_enabled());
        let decode_graphs = DecodeGraphs::new(config.decode, model.device(), kernels)
            .unwrap_or_else(|err| {
                tracing::warn!("decode steps run eagerly: {err}");
                None
            });
        Ok(Engine {
            model,
            pool,
            scheduler,
            eos,
            steps: 0,
            prefilled: HashMap::new(),
            pending_events: Vec::new(),
            decode_graphs,
            prefill_kernels,
            decode_ahead: config.decode_ahead,
            ahead: None,
            steps_ahead_used: 0,
            steps_ahead_dropped: 0,
        })
    }

    /// Gives the model back (to build another engine over it without reloading).
    pub fn into_model(self) -> Llama {
        self.model
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// How decode steps run now: the configured mode, or eager where it
    /// could not be had (graphs on a CPU, or after a graph failed).
    pub fn decode_mode(&self) -> DecodeMode {
        self.decode_graphs
            .as_ref()
            .map_or(DecodeMode::Eager, DecodeGraphs::mode)
    }

    /// With the fused kernels: the largest decode batch whose matrix
    /// products run on the matrix-vector kernel (0: none, all on cuBLAS).
    pub fn matvec_limit(&self) -> Option<usize> {
        self.decode_graphs
            .as_ref()
            .and_then(DecodeGraphs::matvec_limit)
    }

    /// With the fused kernels: whether the matrix-vector batches run one
    /// persistent kernel per layer (`kernels::DecodeKernels::decode_layer`).
    pub fn layer_kernel(&self) -> bool {
        self.decode_graphs
            .as_ref()
            .is_some_and(DecodeGraphs::layer_kernel)
    }

    /// With the layer kernel on: its weight ring (how many slots, how
    /// large, read by how many groups of warps), which the GPU's shared
    /// memory and `matvec_max_batch` decide.
    pub fn layer_ring(&self) -> Option<LayerRing> {
        self.decode_graphs
            .as_ref()
            .and_then(DecodeGraphs::layer_ring)
    }

    /// True when decode steps are queued ahead where they can be (see
    /// [`Engine::step`]): configured so, and the steps are padded ones.
    pub fn decode_ahead(&self) -> bool {
        self.decode_ahead && self.decode_graphs.is_some()
    }

    /// The custom kernels prefill forwards run on, if any.
    fn kernels(&self) -> Option<&DecodeKernels> {
        self.prefill_kernels.as_deref()
    }

    /// True when padded decode steps run on the fused kernels of [`crate::kernels`].
    pub fn fused_kernels(&self) -> bool {
        self.decode_graphs
            .as_ref()
            .is_some_and(DecodeGraphs::fused_kernels)
    }

    /// Captures, ahead of time, the decode-step graphs for batches of up to
    /// `max_batch` sequences whose contexts lie in `contexts` (nothing to do
    /// when decode steps run eagerly). Returns how many were captured.
    pub fn prepare_decode_steps(
        &mut self,
        max_batch: usize,
        contexts: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, CudaGraphError> {
        self.drop_ahead();
        match &mut self.decode_graphs {
            Some(graphs) => graphs.prepare_buckets(&self.model, &self.pool, max_batch, contexts),
            None => Ok(0),
        }
    }

    /// Milliseconds of one bare decode step of `batch` sequences (at most
    /// [`MAX_BATCH`](super::decode_graph::MAX_BATCH)), each with `context`
    /// tokens, padded as graphs pad it: replayed as a CUDA graph in
    /// [`DecodeMode::CudaGraphs`], run eagerly otherwise. See
    /// [`DecodeGraphs::time_step`].
    ///
    /// The sequences are stand-ins: each gets blocks of its own from the
    /// pool for the timing (evicting cached prefixes if it must), and they
    /// go back after it. So the step's attention reads `context` tokens of
    /// keys and values per sequence and layer, as a served step's does
    /// (what the blocks hold does not change the work). Rows of padding
    /// alone would attend to one token: for TinyLlama in bf16 at batch 128
    /// and 576 tokens, that leaves out 1.7 GB of reads per step.
    pub fn time_decode_step(
        &mut self,
        batch: usize,
        context: usize,
        iters: usize,
    ) -> Result<f64, EngineError> {
        self.on_bare_rows(batch, context, |graphs, model, pool, rows| match graphs {
            Some(graphs) => graphs.time_step(model, pool, rows, iters),
            None => DecodeGraphs::new(DecodeMode::Padded, model.device(), None).and_then(|g| {
                g.expect("padded mode has buffers")
                    .time_step(model, pool, rows, iters)
            }),
        })
    }

    /// The layer kernel's timeline of `steps` bare decode steps of `batch`
    /// sequences at `context` tokens (see [`crate::kernels::timeline`]):
    /// one [`LayerTimeline`] a step, read once the step has finished. The
    /// kernels must have been built with it (`SPARK_DISAGG_LAYER_TIMELINE=1`
    /// when the engine started), and the batch must be one the layer kernel
    /// takes.
    pub fn layer_timelines(
        &mut self,
        batch: usize,
        context: usize,
        steps: usize,
    ) -> Result<Vec<LayerTimeline>, EngineError> {
        let layers = self.model.config().num_hidden_layers;
        let takes = |k: &DecodeKernels| k.takes_layer_kernel(batch);
        let read = self.on_bare_rows(batch, context, |graphs, model, pool, rows| match graphs {
            Some(graphs) => graphs.replay_each(model, pool, rows, steps, |kernels, _| {
                kernels
                    .filter(|k| takes(k))
                    .map(|k| k.layer_timeline(layers))
            }),
            None => Ok(Vec::new()),
        })?;
        if read.is_empty() {
            return Err(EngineError::NoLayerTimeline);
        }
        read.into_iter()
            .map(|step| match step {
                Some(Ok(Some(timeline))) => Ok(timeline),
                Some(Err(err)) => Err(EngineError::LayerTimeline(err.to_string())),
                Some(Ok(None)) | None => Err(EngineError::NoLayerTimeline),
            })
            .collect()
    }

    /// Runs `f` on the decode graphs (if any) with `batch` rows of one new
    /// token at `context` tokens, in KV blocks reserved for it and
    /// released after: the bare step of [`Self::time_decode_step`].
    fn on_bare_rows<T>(
        &mut self,
        batch: usize,
        context: usize,
        f: impl FnOnce(
            Option<&mut DecodeGraphs>,
            &Llama,
            &KvPool,
            &[ChunkInput<'_>],
        ) -> Result<T, CudaGraphError>,
    ) -> Result<T, EngineError> {
        self.drop_ahead();
        let batch = batch.clamp(1, super::decode_graph::MAX_BATCH);
        let context = context.max(1);
        let per_row = BlockTable::blocks_for(context, self.pool.block_size());
        let available = self.scheduler.cache.num_available();
        if batch * per_row > available {
            return Err(EngineError::NoRoomToTime {
                batch,
                context,
                needed: batch * per_row,
                available,
            });
        }
        let tables: Vec<BlockTable> = (0..batch)
            .map(|_| BlockTable {
                blocks: (0..per_row)
                    .map(|_| self.scheduler.cache.allocate().expect("counted"))
                    .collect(),
            })
            .collect();
        let token = [0u32];
        let rows: Vec<ChunkInput> = tables
            .iter()
            .map(|table| ChunkInput {
                table,
                start: context - 1,
                tokens: &token,
            })
            .collect();
        let result = f(self.decode_graphs.as_mut(), &self.model, &self.pool, &rows);
        for table in &tables {
            self.release_reserved(&table.blocks);
        }
        Ok(result?)
    }

    /// CUDA graphs captured so far (one per batch and context bucket used).
    pub fn graphs_captured(&self) -> u64 {
        self.decode_graphs
            .as_ref()
            .map_or(0, DecodeGraphs::captures)
    }

    fn validate(&self, request: &Request) -> Result<(), EngineError> {
        let invalid = |message: String| EngineError::Invalid {
            id: request.id,
            message,
        };
        request.params.validate().map_err(invalid)?;
        if request.prompt.is_empty() {
            return Err(invalid("the prompt is empty".into()));
        }
        let vocab = self.model.config().vocab_size as u32;
        if let Some(bad) = request.prompt.iter().find(|&&t| t >= vocab) {
            return Err(invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let total = request.prompt.len() + request.params.max_tokens;
        let context = self.model.config().max_position_embeddings;
        if total > context {
            return Err(invalid(format!(
                "prompt ({}) plus max_tokens ({}) exceeds the context of {context} tokens",
                request.prompt.len(),
                request.params.max_tokens
            )));
        }
        let needed = BlockTable::blocks_for(total, self.pool.block_size());
        if needed > self.pool.num_blocks() {
            return Err(EngineError::TooLarge {
                id: request.id,
                needed,
                available: self.pool.num_blocks(),
            });
        }
        let known = |s: &Sequence| s.id == request.id;
        if self.scheduler.running.iter().any(known) || self.scheduler.waiting.iter().any(known) {
            return Err(EngineError::DuplicateId(request.id));
        }
        Ok(())
    }

    /// Queues a request; its tokens come out of [`Engine::step`] (and into
    /// `stream`, if given).
    pub fn add_request(
        &mut self,
        request: Request,
        stream: Option<UnboundedSender<TokenEvent>>,
    ) -> Result<(), EngineError> {
        self.validate(&request)?;
        self.scheduler
            .waiting
            .push_back(Sequence::new(request, stream));
        Ok(())
    }

    /// Stops a request wherever it is. Returns false if it was not found.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let seq = if let Some(i) = self.scheduler.waiting.iter().position(|s| s.id == id) {
            self.scheduler.waiting.remove(i)
        } else if let Some(i) = self.scheduler.running.iter().position(|s| s.id == id) {
            // A step queued ahead may write into its blocks: let it end first.
            self.drop_ahead();
            Some(self.scheduler.running.remove(i))
        } else {
            None
        };
        match seq {
            Some(mut seq) => {
                // The next step() reports it, like any other end.
                let event = self.finish(&mut seq, FinishReason::Cancelled);
                self.pending_events.extend(event);
                true
            }
            None => false,
        }
    }

    pub fn has_unfinished(&self) -> bool {
        !self.scheduler.running.is_empty()
            || !self.scheduler.waiting.is_empty()
            || !self.pending_events.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        let cache = &self.scheduler.cache;
        EngineStats {
            running: self.scheduler.running.len(),
            waiting: self.scheduler.waiting.len(),
            blocks_total: cache.num_blocks(),
            blocks_in_use: cache.num_in_use(),
            blocks_cached_idle: cache.num_cached_idle(),
            prefix_cache_hit_rate: cache.stats().hit_rate(),
            preemptions: self.scheduler.preemptions,
            steps: self.steps,
            steps_ahead_used: self.steps_ahead_used,
            steps_ahead_dropped: self.steps_ahead_dropped,
        }
    }

    /// Hashes of every block the prefix cache holds now (for a router; see module 5).
    pub fn cached_block_hashes(&self) -> Vec<crate::kv::hash::BlockHash> {
        self.scheduler.cache.cached_hashes()
    }

    /// Block-hash events since the last call (for a router; see module 5).
    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        self.scheduler.cache.drain_events()
    }

    /// Runs one scheduling step and returns the tokens it produced.
    ///
    /// A step reads its tokens back to the host, which then decides what
    /// comes next: a sequence that drew its end token stops, new requests
    /// join. Meanwhile the GPU would wait, about 25 µs a step on an H100
    /// (copying the inputs, launching the graph, reading the tokens back),
    /// 2 % of a batch-1 step of TinyLlama. With
    /// [`EngineConfig::decode_ahead`], when the next step can only be the
    /// same sequences one token further (all decoding greedily, none
    /// at its length limit, nothing waiting), it is queued *before* this
    /// step's tokens are read, its tokens copied on the device from this
    /// step's. The next call uses it if the plan's decodes are indeed that
    /// step (a request that arrived meanwhile is prefilled beside it); if
    /// not (a sequence drew its end token or was cancelled), the queued
    /// step is dropped, once the device is done with it. Either way the
    /// tokens are the same; only their timing changes.
    pub fn step(&mut self) -> Vec<StepOutput> {
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            self.drop_ahead();
            return std::mem::take(&mut self.pending_events);
        }
        self.steps += 1;
        let started = Instant::now();
        let sampled = self.run(&plan);
        tracing::debug!(
            decodes = plan.iter().filter(|c| c.len == 1).count(),
            prefill_tokens = plan
                .iter()
                .filter(|c| c.len > 1)
                .map(|c| c.len)
                .sum::<usize>(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        let mut outputs = std::mem::take(&mut self.pending_events);
        let mut finished = Vec::new();
        for (chunk, token) in plan.iter().zip(sampled) {
            self.scheduler.chunk_done(chunk.index, chunk.len);
            let Some(token) = token else { continue };
            let seq = &mut self.scheduler.running[chunk.index];
            seq.metrics.token_times.push(Instant::now());
            if seq.prefill_only {
                seq.tokens.push(token);
                finished.push((chunk.index, FinishReason::Length));
                continue;
            }
            if !seq.params.ignore_eos && self.eos.contains(&token) {
                finished.push((chunk.index, FinishReason::Stop));
                continue;
            }
            seq.tokens.push(token);
            let event = TokenEvent::Token { id: seq.id, token };
            if let Some(stream) = &seq.stream {
                let _ = stream.send(event.clone());
            }
            outputs.push(event);
            if seq.num_generated() >= seq.params.max_tokens {
                finished.push((chunk.index, FinishReason::Length));
            }
        }
        // Retire finished sequences, highest index first so the others stay
        // put. A step queued ahead for them ends first: their blocks go back.
        if !finished.is_empty() {
            self.drop_ahead();
        }
        finished.sort_by_key(|&(index, _)| std::cmp::Reverse(index));
        for (index, reason) in finished {
            let mut seq = self.scheduler.running.remove(index);
            outputs.extend(self.finish(&mut seq, reason));
        }
        outputs
    }

    /// Releases a sequence and reports its end.
    fn finish(&mut self, seq: &mut Sequence, reason: FinishReason) -> Option<TokenEvent> {
        let timings = seq.metrics.timings(seq.prompt_len, Instant::now());
        if seq.prefill_only && reason != FinishReason::Cancelled {
            let kv = self.pool.export(&seq.table, seq.prompt_len);
            let first = *seq.tokens.last().expect("prefill produced a token");
            self.prefilled.insert(seq.id, (first, kv, timings));
            self.scheduler.release_blocks(seq);
            return None;
        }
        self.scheduler.release_blocks(seq);
        let event = TokenEvent::Finished {
            id: seq.id,
            reason,
            metrics: Box::new(timings),
        };
        if let Some(stream) = &seq.stream {
            let _ = stream.send(event.clone());
        }
        Some(event)
    }

    /// The rows of the decode step after `plan`, as (sequence, position),
    /// when it can be queued before this step's tokens are read: every
    /// chunk is a greedy decode whose sequence goes on after this token
    /// unless it draws an end token, whose next position has a slot in a
    /// block the sequence owns already, and no request waits to join.
    /// Otherwise the next step could not be known before the tokens are.
    fn next_decode_rows(&self, plan: &[ScheduledChunk]) -> Option<Vec<(RequestId, usize)>> {
        if !self.decode_ahead || !self.scheduler.waiting.is_empty() {
            return None;
        }
        let block_size = self.pool.block_size();
        plan.iter()
            .map(|chunk| {
                let seq = &self.scheduler.running[chunk.index];
                let next = seq.num_computed + 1;
                let goes_on = chunk.len == 1
                    && seq.pending() == 1
                    && seq.params.is_greedy()
                    && !seq.prefill_only
                    && seq.num_generated() + 1 < seq.params.max_tokens
                    && next < seq.table.blocks.len() * block_size;
                goes_on.then_some((seq.id, next))
            })
            .collect()
    }

    /// Forgets the step queued ahead, once the device is done with it. It
    /// writes a key and value into each of its sequences' blocks, and a
    /// block must not change hands while a write into it is pending: a
    /// peer may fill a reserved block directly (module 4), outside the
    /// order of this engine's stream.
    fn drop_ahead(&mut self) {
        if self.ahead.take().is_some() {
            self.steps_ahead_dropped += 1;
            if let Device::Cuda(index) = self.model.device() {
                tch::Cuda::synchronize(index as i64);
            }
        }
    }

    /// Runs the planned chunks; returns a sampled token for each chunk that
    /// reached the end of its sequence's pending tokens.
    fn run(&mut self, plan: &[ScheduledChunk]) -> Vec<Option<u32>> {
        // All single-token chunks (the decodes) run as one batched step...
        let singles: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].len == 1).collect();
        // ... which may be the one queued ahead last time. A prompt that
        // arrived since is prefilled beside it, below.
        let decodes: Vec<ScheduledChunk> = singles.iter().map(|&i| plan[i]).collect();
        let is_queued = |a: &AheadStep| a.is_step_of(&decodes, &self.scheduler.running);
        let queued = if self.ahead.as_ref().is_some_and(is_queued) {
            self.steps_ahead_used += 1;
            self.ahead.take().map(|ahead| ahead.output)
        } else {
            self.drop_ahead();
            None
        };
        let running = &self.scheduler.running;
        let input = |c: &ScheduledChunk| {
            let seq = &running[c.index];
            ChunkInput {
                table: &seq.table,
                start: seq.num_computed,
                tokens: &seq.tokens[seq.num_computed..seq.num_computed + c.len],
            }
        };
        let completes = |c: &ScheduledChunk| c.len == running[c.index].pending();

        // The forwards' logits, and where each chunk's row is in them: a
        // row is taken out (an operation of its own) only where it samples.
        let mut outputs: Vec<Tensor> = Vec::new();
        let mut row_of: Vec<(usize, i64)> = vec![(0, 0); plan.len()];
        // Each decode row's greedy token, where the decode step chose them.
        let mut step_greedy: Option<Tensor> = None;
        if !singles.is_empty() {
            let inputs: Vec<ChunkInput> = singles.iter().map(|&i| input(&plan[i])).collect();
            let launched = match queued {
                Some(output) => Some(Ok(Some(output))),
                None => self
                    .decode_graphs
                    .as_mut()
                    .map(|graphs| graphs.forward(&self.model, &self.pool, &inputs)),
            };
            let padded = match launched {
                Some(Ok(output)) => output,
                Some(Err(err)) => {
                    tracing::warn!("CUDA graphs turned off, decode steps run eagerly: {err}");
                    self.decode_graphs = None;
                    None
                }
                None => None,
            };
            let batch = match padded {
                Some(output) => {
                    step_greedy = Some(output.greedy);
                    output.logits
                }
                None => forward_chunks(&self.model, &self.pool, &inputs, self.kernels()),
            };
            for (row, &i) in singles.iter().enumerate() {
                row_of[i] = (outputs.len(), row as i64);
            }
            outputs.push(batch);
        }
        // ... and one forward for all longer (prefill) chunks, shortest
        // first: chunks of one length are next to each other, one group of
        // the packed forward (see `runner`).
        let mut longer: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].len > 1).collect();
        longer.sort_by_key(|&i| plan[i].len);
        if !longer.is_empty() {
            let inputs: Vec<ChunkInput> = longer.iter().map(|&i| input(&plan[i])).collect();
            let queuing = Instant::now();
            let out = forward_chunks(&self.model, &self.pool, &inputs, self.kernels());
            // How long the host took to queue the forward's work: near the
            // step's time when the host, not the device, sets the pace.
            tracing::debug!(
                chunks = inputs.len(),
                ms = queuing.elapsed().as_secs_f64() * 1e3,
                "prefill forward queued"
            );
            for (row, &i) in longer.iter().enumerate() {
                row_of[i] = (outputs.len(), row as i64);
            }
            outputs.push(out);
        }

        // Sample where a chunk completed its sequence's pending tokens.
        let wanted = |i: usize| completes(&plan[i]);
        let greedy = |i: usize| running[plan[i].index].params.is_greedy();
        let mut tokens: Vec<Option<u32>> = vec![None; plan.len()];
        // Greedy decode rows: the decode step took their arg-max already, so
        // the host needs only the token ids (one small copy, no kernel).
        if let Some(ids) = step_greedy.filter(|_| singles.iter().any(|&i| wanted(i) && greedy(i))) {
            // ANCHOR: decode_ahead
            let copy = HostCopy::start(&ids)
                .unwrap_or_else(|err| panic!("copying a decode step's tokens: {err}"));
            // The next step goes into the queue before this one's tokens
            // are read, so the GPU goes on while the host does the rest.
            if let Some(next) = self.next_decode_rows(plan) {
                let rows: Vec<ChunkInput> = plan
                    .iter()
                    .zip(&next)
                    .map(|(c, &(_, start))| ChunkInput {
                        table: &running[c.index].table,
                        start,
                        tokens: &NOT_YET_KNOWN,
                    })
                    .collect();
                let queued = self
                    .decode_graphs
                    .as_mut()
                    .map(|graphs| graphs.forward_after(&self.model, &self.pool, &rows, &ids));
                match queued {
                    Some(Ok(Some(output))) => {
                        self.ahead = Some(AheadStep { rows: next, output });
                    }
                    Some(Err(err)) => {
                        tracing::warn!("CUDA graphs turned off, decode steps run eagerly: {err}");
                        self.decode_graphs = None;
                    }
                    _ => {}
                }
            }
            let ids = copy
                .wait()
                .unwrap_or_else(|err| panic!("waiting for a decode step's tokens: {err}"));
            let ids = Vec::<i64>::try_from(&ids).expect("arg-max gives int64");
            // ANCHOR_END: decode_ahead
            for (row, &i) in singles.iter().enumerate() {
                if wanted(i) && greedy(i) {
                    tokens[i] = Some(ids[row] as u32);
                }
            }
        }
        // Other greedy rows (prompts, eager decode steps): one arg-max for all.
        let rest: Vec<usize> = (0..plan.len())
            .filter(|&i| wanted(i) && greedy(i) && tokens[i].is_none())
            .collect();
        if !rest.is_empty() {
            let rows: Vec<Tensor> = rest
                .iter()
                .map(|&i| outputs[row_of[i].0].get(row_of[i].1))
                .collect();
            for (&i, id) in rest.iter().zip(argmax_batch(&Tensor::stack(&rows, 0))) {
                tokens[i] = Some(id);
            }
        }
        let sampling: Vec<usize> = (0..plan.len())
            .filter(|&i| wanted(i) && !greedy(i))
            .collect();
        for i in sampling {
            let seq = &mut self.scheduler.running[plan[i].index];
            let (output, row) = row_of[i];
            tokens[i] = Some(seq.sampler.sample(&outputs[output].get(row)));
        }
        tokens
    }

    /// Runs requests to completion and returns their tokens, in request
    /// order (a convenience for tests and benchmarks).
    pub fn generate_all(
        &mut self,
        requests: Vec<Request>,
    ) -> Result<Vec<(Vec<u32>, FinishReason, RequestTimings)>, EngineError> {
        let ids: Vec<RequestId> = requests.iter().map(|r| r.id).collect();
        for request in requests {
            self.add_request(request, None)?;
        }
        let mut tokens: HashMap<RequestId, Vec<u32>> = HashMap::new();
        let mut done: HashMap<RequestId, (FinishReason, RequestTimings)> = HashMap::new();
        while self.has_unfinished() {
            for event in self.step() {
                match event {
                    TokenEvent::Token { id, token } => tokens.entry(id).or_default().push(token),
                    TokenEvent::Finished {
                        id,
                        reason,
                        metrics,
                    } => {
                        done.insert(id, (reason, *metrics));
                    }
                }
            }
        }
        Ok(ids
            .into_iter()
            .map(|id| {
                let (reason, timings) = done.remove(&id).expect("every request finishes");
                (tokens.remove(&id).unwrap_or_default(), reason, timings)
            })
            .collect())
    }

    /// Prefill only: runs the prompt (sharing the batch with whatever else
    /// is running), returns the first token and the prompt's KV cache.
    pub fn prefill(&mut self, request: Request) -> Result<PrefillOutput, EngineError> {
        let id = request.id;
        self.validate(&request)?;
        let mut seq = Sequence::new(request, None);
        seq.prefill_only = true;
        self.scheduler.waiting.push_back(seq);
        loop {
            if let Some((first_token, kv, timings)) = self.prefilled.remove(&id) {
                return Ok(PrefillOutput {
                    first_token,
                    kv,
                    timings,
                });
            }
            self.step();
        }
    }

    /// Decode from a KV cache computed elsewhere: `kv` holds the prompt's
    /// K/V (`[layers, 2, prompt_len, kv_heads, head_dim]`, any device or
    /// dtype) and `first_token` the token the prefill chose. The request's
    /// later tokens come out of [`Engine::step`] as usual; `first_token`
    /// itself is not emitted again.
    pub fn decode_from(
        &mut self,
        request: Request,
        first_token: u32,
        kv: &Tensor,
        stream: Option<UnboundedSender<TokenEvent>>,
    ) -> Result<(), EngineError> {
        self.validate(&request)?;
        let c = self.model.config();
        let prompt_len = request.prompt.len();
        let expected = vec![
            c.num_hidden_layers as i64,
            2,
            prompt_len as i64,
            c.num_kv_heads() as i64,
            c.head_dim() as i64,
        ];
        if kv.size() != expected {
            return Err(EngineError::KvShape {
                found: kv.size(),
                expected,
                tokens: prompt_len,
            });
        }
        let blocks = self.reserve_blocks(request.id, prompt_len)?;
        self.pool.import(
            &BlockTable {
                blocks: blocks.clone(),
            },
            kv,
        );
        self.decode_from_blocks(request, first_token, blocks, stream)
    }

    /// Takes free blocks for a prompt of `prompt_len` tokens (and the token
    /// after it) out of the pool, for a peer to write its KV into them
    /// directly (module 4's one-sided transfer). Hand them back with
    /// [`Engine::decode_from_blocks`], or [`Engine::release_reserved`] if the
    /// transfer fails.
    pub fn reserve_blocks(
        &mut self,
        id: RequestId,
        prompt_len: usize,
    ) -> Result<Vec<BlockId>, EngineError> {
        let needed = BlockTable::blocks_for(prompt_len + 1, self.pool.block_size());
        if needed > self.scheduler.cache.num_available() {
            return Err(EngineError::TooLarge {
                id,
                needed,
                available: self.scheduler.cache.num_available(),
            });
        }
        Ok((0..needed)
            .map(|_| self.scheduler.cache.allocate().expect("counted"))
            .collect())
    }

    /// Returns reserved blocks unused.
    pub fn release_reserved(&mut self, blocks: &[BlockId]) {
        for &block in blocks {
            self.scheduler.cache.release(block);
        }
    }

    /// Decodes a request whose prompt KV already sits in `blocks` (reserved
    /// with [`Engine::reserve_blocks`] and filled by the caller or a peer).
    pub fn decode_from_blocks(
        &mut self,
        request: Request,
        first_token: u32,
        blocks: Vec<BlockId>,
        stream: Option<UnboundedSender<TokenEvent>>,
    ) -> Result<(), EngineError> {
        if let Err(e) = self.validate(&request) {
            self.release_reserved(&blocks);
            return Err(e);
        }
        let prompt_len = request.prompt.len();
        let mut seq = Sequence::new(request, stream);
        seq.table.blocks = blocks;
        seq.tokens.push(first_token);
        seq.metrics.first_scheduled = Some(Instant::now());
        seq.metrics.token_times.push(Instant::now());
        let ends_here = (!seq.params.ignore_eos && self.eos.contains(&first_token))
            || seq.params.max_tokens <= 1;
        if ends_here {
            let reason = if seq.params.max_tokens <= 1 {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            let event = self.finish(&mut seq, reason);
            self.pending_events.extend(event);
            return Ok(());
        }
        self.scheduler.running.push(seq);
        let index = self.scheduler.running.len() - 1;
        self.scheduler.chunk_done(index, prompt_len);
        Ok(())
    }

    /// The device the engine runs on.
    pub fn device(&self) -> Device {
        self.model.device()
    }

    pub fn kind(&self) -> Kind {
        self.model.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::SamplingParams;

    /// A sequence with `computed` tokens in the cache and one to decode.
    fn decoding(id: RequestId, computed: usize) -> Sequence {
        let prompt = vec![1; computed + 1];
        let mut seq = Sequence::new(Request::new(id, prompt, SamplingParams::greedy(8)), None);
        seq.num_computed = computed;
        seq
    }

    fn plan(chunks: &[(usize, usize)]) -> Vec<ScheduledChunk> {
        chunks
            .iter()
            .map(|&(index, len)| ScheduledChunk { index, len })
            .collect()
    }

    #[test]
    fn decodes_are_the_step_queued_ahead_only_with_its_rows_at_their_positions() {
        let ahead = AheadStep {
            rows: vec![(1, 5), (2, 9)],
            output: DecodeOutput {
                logits: Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)),
                greedy: Tensor::zeros([2], (Kind::Int64, Device::Cpu)),
            },
        };
        let running = [decoding(1, 5), decoding(2, 9), decoding(3, 9)];
        assert!(ahead.is_step_of(&plan(&[(0, 1), (1, 1)]), &running));
        // Another sequence in a row's seat, or the rows in another order.
        assert!(!ahead.is_step_of(&plan(&[(0, 1), (2, 1)]), &running));
        assert!(!ahead.is_step_of(&plan(&[(1, 1), (0, 1)]), &running));
        // A row more, a row less, a row that is not a decode.
        assert!(!ahead.is_step_of(&plan(&[(0, 1), (1, 1), (2, 1)]), &running));
        assert!(!ahead.is_step_of(&plan(&[(0, 1)]), &running));
        assert!(!ahead.is_step_of(&plan(&[(0, 1), (1, 2)]), &running));
        // A row at another position (its sequence was recomputed).
        let moved = [decoding(1, 5), decoding(2, 3)];
        assert!(!ahead.is_step_of(&plan(&[(0, 1), (1, 1)]), &moved));
    }
}
