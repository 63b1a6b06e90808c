//! Continuous batching: deciding, every step, which tokens of which requests run.
//!
//! A static batch waits for its slowest member; continuous batching
//! re-forms the batch at every step boundary. Each step has a **token
//! budget** (`max_num_batched_tokens`):
//!
//! 1. **Running sequences first**, oldest first. A decoding sequence needs
//!    one token; a sequence still in its prompt gets the next chunk of it
//!    (chunked prefill), as much as the budget allows. If the pool has no
//!    block for a sequence's next token, the **newest** running sequence is
//!    preempted: its blocks are released and it goes back to the front of
//!    the queue, to be recomputed later (vLLM's "recompute" preemption —
//!    cheaper than swapping KV to host memory for short sequences).
//! 2. **Then waiting requests**, first come first served, while budget,
//!    batch seats and blocks last. A new request first maps whatever full
//!    blocks of its prompt the prefix cache already holds, and computes only
//!    the rest.
//!
//! Decodes before prefills keeps inter-token latency steady for the
//! requests already streaming; the token budget keeps a long prompt from
//! stalling them (it is spread over several steps).

use std::collections::VecDeque;

use super::request::Sequence;
use crate::kv::block::BlockTable;
use crate::kv::hash::{block_hash, block_hashes};
use crate::kv::prefix_cache::PrefixCache;

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    pub block_size: usize,
    /// Tokens run through the model per step, prefill and decode together.
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
}

/// Work for one step: run `len` tokens of `running[index]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub index: usize,
    pub len: usize,
}

pub(crate) struct Scheduler {
    pub config: SchedulerConfig,
    pub cache: PrefixCache,
    pub waiting: VecDeque<Sequence>,
    /// In admission order: the last one is preempted first.
    pub running: Vec<Sequence>,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, cache: PrefixCache) -> Self {
        Scheduler {
            config,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    /// Plans one step and reserves the blocks it needs.
    pub fn schedule(&mut self) -> Vec<ScheduledChunk> {
        let mut budget = self.config.max_num_batched_tokens;
        let mut plan = Vec::new();

        // 1. Running sequences.
        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let len = self.running[index].pending().min(budget);
            if !self.reserve(index, len) {
                // Not even preempting everything newer freed enough: this
                // sequence itself goes back to the queue.
                self.preempt_last();
                continue;
            }
            plan.push(ScheduledChunk { index, len });
            budget -= len;
            index += 1;
        }

        // 2. Waiting requests.
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let bs = self.config.block_size;
            let hashes = block_hashes(&seq.tokens, bs);
            // At least one token must be computed, to get logits for sampling.
            let max_hit = (seq.tokens.len() - 1) / bs;
            let hit = self.cache.cached_prefix_len(&hashes).min(max_hit);
            let len = (seq.tokens.len() - hit * bs).min(budget);
            let new_blocks = BlockTable::blocks_for(hit * bs + len, bs) - hit;
            let available = self.cache.num_available() - self.cache.idle_in_prefix(&hashes, hit);
            if new_blocks > available {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            let matched = self.cache.match_prefix(&hashes, hit);
            debug_assert_eq!(matched.len(), hit);
            seq.table.blocks = matched;
            seq.hashes = hashes[..hit].to_vec();
            seq.num_computed = hit * bs;
            if seq.metrics.first_scheduled.is_none() {
                seq.metrics.first_scheduled = Some(std::time::Instant::now());
                seq.metrics.cached_prompt_tokens = hit * bs;
            }
            self.running.push(seq);
            let index = self.running.len() - 1;
            assert!(self.reserve(index, len), "blocks were counted above");
            plan.push(ScheduledChunk { index, len });
            budget -= len;
        }
        plan
    }

    /// Makes sure `running[index]` has blocks for `len` more tokens,
    /// preempting newer sequences if needed. False if it cannot.
    fn reserve(&mut self, index: usize, len: usize) -> bool {
        let bs = self.config.block_size;
        loop {
            let seq = &self.running[index];
            let needed = BlockTable::blocks_for(seq.num_computed + len, bs)
                .saturating_sub(seq.table.blocks.len());
            if needed <= self.cache.num_available() {
                for _ in 0..needed {
                    let block = self.cache.allocate().expect("counted as available");
                    self.running[index].table.blocks.push(block);
                }
                return true;
            }
            if self.running.len() - 1 == index {
                return false;
            }
            self.preempt_last();
        }
    }

    /// Sends the newest running sequence back to the queue, releasing its blocks.
    fn preempt_last(&mut self) {
        let mut seq = self.running.pop().expect("something to preempt");
        self.release_blocks(&mut seq);
        seq.num_computed = 0;
        seq.hashes.clear();
        seq.metrics.preemptions += 1;
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Records that `len` tokens of `running[index]` were computed, and names
    /// the blocks that became full so that later prompts can reuse them.
    pub fn chunk_done(&mut self, index: usize, len: usize) {
        let bs = self.config.block_size;
        let seq = &mut self.running[index];
        seq.num_computed += len;
        let full = seq.num_computed / bs;
        while seq.hashes.len() < full {
            let k = seq.hashes.len();
            let parent = seq.hashes.last().copied();
            let hash = block_hash(parent, &seq.tokens[k * bs..(k + 1) * bs]);
            self.cache.register(seq.table.blocks[k], parent, hash);
            seq.hashes.push(hash);
        }
    }

    pub fn release_blocks(&mut self, seq: &mut Sequence) {
        for block in seq.table.blocks.drain(..) {
            self.cache.release(block);
        }
    }
}
