//! A trace-driven simulator: N workers with finite prefix caches, a router
//! with a policy, a simple service-time model. No model runs; what it
//! measures is where each policy sends requests and what their caches make
//! of it.
//!
//! Each worker has:
//!
//! * a prefix cache of `cache_blocks` blocks with LRU eviction; every block
//!   it stores or evicts becomes a [`KvEvent`] that updates the router's
//!   [`PrefixIndex`] — the same path a live worker's events take;
//! * one prefill queue: a request's prefill starts when the worker's previous
//!   prefill ends and takes `uncached tokens / prefill_tokens_per_s`;
//! * decode, batched, which does not hold up prefills: a request stays
//!   active for `output_length × decode_s_per_token` after its prefill.
//!
//! TTFT = waiting for the prefill queue + prefill + one decode step.
//! Simplifications, stated: blocks of running requests may be evicted
//! (a real engine pins them), events reach the router instantly, and
//! prefill time is linear in tokens.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::num::NonZeroUsize;
use std::time::Instant;

use lru::LruCache;
use serde::{Deserialize, Serialize};
use shared::kv::hash::BlockHash;
use shared::kv::prefix_cache::KvEvent;
use shared::stats::percentile;

use crate::index::{PrefixIndex, WorkerEvent, WorkerId};
use crate::policy::{RouteRequest, RoutingPolicy, WorkerLoad};
use crate::trace::{TraceRequest, TRACE_BLOCK_TOKENS};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    pub workers: usize,
    /// Prefix-cache capacity of each worker, in blocks.
    pub cache_blocks: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_s_per_token: f64,
    /// Divides the trace's arrival times (2 = twice the request rate).
    pub speedup: f64,
}

impl Default for SimConfig {
    /// Four workers, each caching 2,000 blocks (1M tokens; about 128 GB of
    /// KV for Llama-3-8B in bf16) and prefilling 16k tokens/s, 30 ms per
    /// output token: an H100-class 8B deployment, roughly.
    fn default() -> Self {
        SimConfig {
            workers: 4,
            cache_blocks: 2000,
            prefill_tokens_per_s: 16_000.0,
            decode_s_per_token: 0.03,
            speedup: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    pub policy: String,
    /// Prompt blocks found in the chosen worker's cache / all prompt blocks.
    pub hit_rate: f64,
    /// `hit_rate` over the single-node, infinite-cache oracle's.
    pub hit_rate_vs_oracle: f64,
    /// Most requests on one worker over the mean (1 = perfectly even).
    pub load_balance: f64,
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    /// Prefill tokens computed (not served from cache), all workers.
    pub prefill_tokens: u64,
    /// Mean time the policy took per decision (timing: not deterministic).
    #[serde(default)]
    pub decision_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimReport {
    pub trace: String,
    pub requests: usize,
    pub blocks: usize,
    pub config: SimConfig,
    pub oracle_hit_rate: f64,
    pub results: Vec<PolicyResult>,
}

/// Hit rate of one node with an infinite cache: a block hits if any earlier
/// request carried it. No routing can do better.
pub fn oracle_hit_rate(requests: &[TraceRequest]) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let (mut hits, mut total) = (0usize, 0usize);
    for r in requests {
        total += r.hash_ids.len();
        hits += r.hash_ids.iter().take_while(|h| seen.contains(*h)).count();
        seen.extend(r.hash_ids.iter().copied());
    }
    hits as f64 / total.max(1) as f64
}

struct SimWorker {
    cache: LruCache<BlockHash, ()>,
    seq: u64,
    prefill_free_at: f64,
    /// (finish time in µs, blocks) of active requests, soonest first.
    active: BinaryHeap<Reverse<(u64, usize)>>,
    active_blocks: usize,
    requests: usize,
}

impl SimWorker {
    fn retire_until(&mut self, now: f64) {
        while let Some(&Reverse((finish, blocks))) = self.active.peek() {
            if finish as f64 / 1e6 > now {
                break;
            }
            self.active.pop();
            self.active_blocks -= blocks;
        }
    }

    /// Cached leading blocks (without touching recency).
    fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.cache.contains(h)).count()
    }

    /// Stores the request's blocks (most recent last) and returns the
    /// events, in the order the changes happened: a block stored and then
    /// evicted within one request must end up absent from the index.
    fn store(&mut self, hashes: &[BlockHash]) -> Vec<KvEvent> {
        let mut events = Vec::new();
        let mut stored = Vec::new();
        for &h in hashes {
            if self.cache.contains(&h) {
                self.cache.promote(&h);
                continue;
            }
            if let Some((evicted, ())) = self.cache.push(h, ()) {
                if !stored.is_empty() {
                    events.push(KvEvent::Stored {
                        parent: None,
                        hashes: std::mem::take(&mut stored),
                    });
                }
                match events.last_mut() {
                    Some(KvEvent::Removed { hashes }) => hashes.push(evicted),
                    _ => events.push(KvEvent::Removed {
                        hashes: vec![evicted],
                    }),
                }
            }
            stored.push(h);
        }
        if !stored.is_empty() {
            events.push(KvEvent::Stored {
                parent: None,
                hashes: stored,
            });
        }
        events
    }
}

// ANCHOR: simulate
/// Replays `requests` through `policy`; `progress` is called per request.
pub fn simulate(
    requests: &[TraceRequest],
    config: &SimConfig,
    policy: &mut dyn RoutingPolicy,
    oracle: f64,
    progress: &dyn Fn(),
) -> PolicyResult {
    let capacity = NonZeroUsize::new(config.cache_blocks.max(1)).expect("non-zero");
    let mut workers: Vec<SimWorker> = (0..config.workers)
        .map(|_| SimWorker {
            cache: LruCache::new(capacity),
            seq: 0,
            prefill_free_at: 0.0,
            active: BinaryHeap::new(),
            active_blocks: 0,
            requests: 0,
        })
        .collect();
    let mut index = PrefixIndex::new();
    let (mut hits, mut blocks, mut prefill_tokens) = (0usize, 0usize, 0u64);
    let mut ttfts = Vec::with_capacity(requests.len());
    let mut deciding = 0.0;
    for r in requests {
        let now = r.timestamp as f64 / 1000.0 / config.speedup;
        for w in &mut workers {
            w.retire_until(now);
        }
        let loads: Vec<WorkerLoad> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerLoad {
                id: WorkerId(i as u32),
                active_requests: w.active.len(),
                active_blocks: w.active_blocks,
            })
            .collect();
        let hashes = r.hashes();
        let request = RouteRequest {
            hashes: &hashes,
            session: r.session_key(),
        };
        let start = Instant::now();
        let chosen = policy.choose(&request, &loads, &index);
        deciding += start.elapsed().as_secs_f64();

        let id = chosen;
        let w = &mut workers[id.0 as usize];
        let cached = w.cached_prefix(&hashes);
        hits += cached;
        blocks += hashes.len();
        // The last token is always computed, even on a full hit.
        let computed = r
            .input_length
            .saturating_sub(cached * TRACE_BLOCK_TOKENS)
            .max(1);
        prefill_tokens += computed as u64;
        let prefill_start = now.max(w.prefill_free_at);
        w.prefill_free_at = prefill_start + computed as f64 / config.prefill_tokens_per_s;
        ttfts.push(w.prefill_free_at + config.decode_s_per_token - now);
        let finish = w.prefill_free_at + r.output_length as f64 * config.decode_s_per_token;
        w.active
            .push(Reverse(((finish * 1e6) as u64, hashes.len())));
        w.active_blocks += hashes.len();
        w.requests += 1;
        for event in w.store(&hashes) {
            w.seq += 1;
            index.apply(&WorkerEvent {
                worker: id,
                seq: w.seq,
                event,
            });
        }
        progress();
    }
    let per_worker: Vec<usize> = workers.iter().map(|w| w.requests).collect();
    let mean = per_worker.iter().sum::<usize>() as f64 / per_worker.len() as f64;
    let hit_rate = hits as f64 / blocks.max(1) as f64;
    PolicyResult {
        policy: policy.name(),
        hit_rate,
        hit_rate_vs_oracle: if oracle > 0.0 { hit_rate / oracle } else { 0.0 },
        load_balance: *per_worker.iter().max().unwrap_or(&0) as f64 / mean.max(1e-9),
        ttft_mean_s: ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64,
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p99_s: percentile(&ttfts, 0.99),
        prefill_tokens,
        decision_us: deciding * 1e6 / requests.len().max(1) as f64,
    }
}
// ANCHOR_END: simulate

/// Runs every policy on the same trace.
pub fn compare(
    trace: &str,
    requests: &[TraceRequest],
    config: &SimConfig,
    policies: &mut [Box<dyn RoutingPolicy>],
    progress: &dyn Fn(),
) -> SimReport {
    let oracle = oracle_hit_rate(requests);
    let results = policies
        .iter_mut()
        .map(|p| simulate(requests, config, p.as_mut(), oracle, progress))
        .collect();
    SimReport {
        trace: trace.to_string(),
        requests: requests.len(),
        blocks: requests.iter().map(|r| r.hash_ids.len()).sum(),
        config: config.clone(),
        oracle_hit_rate: oracle,
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{KvAwarePolicy, RoundRobinPolicy};
    use crate::trace::SyntheticChats;

    #[test]
    fn the_oracle_counts_leading_blocks_seen_before() {
        let r = |hash_ids: Vec<u64>| TraceRequest {
            timestamp: 0,
            input_length: hash_ids.len() * 512,
            output_length: 1,
            hash_ids,
            session: None,
        };
        // 2nd: 2 of 3 blocks seen; 3rd: block 0 seen, then 9 is new.
        let requests = [r(vec![0, 1]), r(vec![0, 1, 2]), r(vec![0, 9, 1])];
        assert!((oracle_hit_rate(&requests) - 3.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn no_policy_beats_the_oracle_and_kv_aware_beats_round_robin_on_chats() {
        let requests = SyntheticChats::default().generate();
        let config = SimConfig::default();
        let oracle = oracle_hit_rate(&requests);
        let rr = simulate(
            &requests,
            &config,
            &mut RoundRobinPolicy::default(),
            oracle,
            &|| {},
        );
        let kv = simulate(
            &requests,
            &config,
            &mut KvAwarePolicy::new(4.0),
            oracle,
            &|| {},
        );
        for r in [&rr, &kv] {
            assert!(r.hit_rate <= oracle + 1e-12, "{r:?}");
        }
        // Round-robin still hits the shared system prompt; KV-aware adds
        // the conversations' own history (about 0.48 against 0.69 here).
        assert!(kv.hit_rate > rr.hit_rate + 0.1, "kv {kv:?} rr {rr:?}");
        assert!(kv.prefill_tokens < rr.prefill_tokens);
    }

    #[test]
    fn a_tiny_cache_evicts_and_the_index_follows() {
        let mut w = SimWorker {
            cache: LruCache::new(NonZeroUsize::new(2).unwrap()),
            seq: 0,
            prefill_free_at: 0.0,
            active: BinaryHeap::new(),
            active_blocks: 0,
            requests: 0,
        };
        let h: Vec<BlockHash> = (1..=3).map(BlockHash).collect();
        let events = w.store(&h);
        let stored = |v: &[u64]| KvEvent::Stored {
            parent: None,
            hashes: v.iter().map(|&n| BlockHash(n)).collect(),
        };
        assert_eq!(
            events,
            vec![
                stored(&[1, 2]),
                KvEvent::Removed {
                    hashes: vec![BlockHash(1)]
                },
                stored(&[3]),
            ]
        );
        // Block 1 was evicted, so the cached prefix is empty; the index agrees.
        assert_eq!(w.cached_prefix(&h), 0);
        assert_eq!(w.cached_prefix(&h[1..]), 2);
        let mut index = PrefixIndex::new();
        for (seq, event) in events.into_iter().enumerate() {
            index.apply(&WorkerEvent {
                worker: WorkerId(0),
                seq: seq as u64 + 1,
                event,
            });
        }
        assert!(index.overlaps(&h).is_empty());
        assert_eq!(index.overlaps(&h[1..])[&WorkerId(0)], 2);
    }
}
