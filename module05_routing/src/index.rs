//! The router's view of every worker's prefix cache: which workers hold
//! which blocks.
//!
//! Workers name cached blocks by *chained* hashes (`shared::kv::hash`):
//! block `i`'s hash covers its tokens **and** block `i-1`'s hash, so one
//! hash stands for the whole prefix up to and including that block. Dynamo
//! keeps these in a radix tree; with chained hashes a tree adds nothing a
//! hash map lacks — the map entry for a hash *is* the tree node for that
//! prefix — so this index is a map from block hash to the set of workers
//! holding it. Matching a request walks its hashes in order and keeps the
//! workers that still hold every block so far, like descending the tree.
//!
//! Workers report changes as [`KvEvent`]s, each numbered per worker. The
//! index applies them **at most once, in order**: a repeated or older event
//! (a stream reconnecting and replaying) is ignored, and removing a block
//! the index never saw (the router started after it was stored) is a no-op.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use shared::kv::hash::BlockHash;
use shared::kv::prefix_cache::KvEvent;

/// A worker, as the router numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

/// One event from one worker, numbered by that worker from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEvent {
    pub worker: WorkerId,
    pub seq: u64,
    pub event: KvEvent,
}

#[derive(Default)]
pub struct PrefixIndex {
    holders: HashMap<BlockHash, Vec<WorkerId>>,
    per_worker: HashMap<WorkerId, HashSet<BlockHash>>,
    last_seq: HashMap<WorkerId, u64>,
}

impl PrefixIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event; returns whether it was new (not a repeat).
    pub fn apply(&mut self, e: &WorkerEvent) -> bool {
        let last = self.last_seq.entry(e.worker).or_insert(0);
        if e.seq <= *last {
            return false;
        }
        *last = e.seq;
        match &e.event {
            KvEvent::Stored { hashes, .. } => {
                for &h in hashes {
                    self.insert(e.worker, h);
                }
            }
            KvEvent::Removed { hashes } => {
                for h in hashes {
                    self.remove(e.worker, *h);
                }
            }
        }
        true
    }

    fn insert(&mut self, worker: WorkerId, hash: BlockHash) {
        if self.per_worker.entry(worker).or_default().insert(hash) {
            self.holders.entry(hash).or_default().push(worker);
        }
    }

    fn remove(&mut self, worker: WorkerId, hash: BlockHash) {
        let held = self
            .per_worker
            .get_mut(&worker)
            .is_some_and(|blocks| blocks.remove(&hash));
        if !held {
            return;
        }
        if let Some(workers) = self.holders.get_mut(&hash) {
            workers.retain(|&w| w != worker);
            if workers.is_empty() {
                self.holders.remove(&hash);
            }
        }
    }

    /// Forgets a worker that left (its lease expired): all its blocks and
    /// its event numbering.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        for hash in self.per_worker.remove(&worker).unwrap_or_default() {
            if let Some(workers) = self.holders.get_mut(&hash) {
                workers.retain(|&w| w != worker);
                if workers.is_empty() {
                    self.holders.remove(&hash);
                }
            }
        }
        self.last_seq.remove(&worker);
    }

    // ANCHOR: overlaps
    /// For each worker holding the request's first block: how many of its
    /// leading blocks that worker has cached (workers with none are absent).
    pub fn overlaps(&self, hashes: &[BlockHash]) -> HashMap<WorkerId, usize> {
        let mut result = HashMap::new();
        let Some(first) = hashes.first().and_then(|h| self.holders.get(h)) else {
            return result;
        };
        let mut alive: Vec<WorkerId> = first.clone();
        for (depth, hash) in hashes.iter().enumerate().skip(1) {
            let holders = self.holders.get(hash).map(Vec::as_slice).unwrap_or(&[]);
            alive.retain(|w| {
                let keeps = holders.contains(w);
                if !keeps {
                    result.insert(*w, depth);
                }
                keeps
            });
            if alive.is_empty() {
                return result;
            }
        }
        for w in alive {
            result.insert(w, hashes.len());
        }
        result
    }
    // ANCHOR_END: overlaps

    /// Distinct blocks indexed (over all workers).
    pub fn num_blocks(&self) -> usize {
        self.holders.len()
    }

    /// Blocks `worker` holds, as far as the index knows.
    pub fn blocks_of(&self, worker: WorkerId) -> usize {
        self.per_worker.get(&worker).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> BlockHash {
        BlockHash(n)
    }

    fn stored(worker: u32, seq: u64, hashes: &[u64]) -> WorkerEvent {
        WorkerEvent {
            worker: WorkerId(worker),
            seq,
            event: KvEvent::Stored {
                parent: None,
                hashes: hashes.iter().map(|&n| h(n)).collect(),
            },
        }
    }

    fn removed(worker: u32, seq: u64, hashes: &[u64]) -> WorkerEvent {
        WorkerEvent {
            worker: WorkerId(worker),
            seq,
            event: KvEvent::Removed {
                hashes: hashes.iter().map(|&n| h(n)).collect(),
            },
        }
    }

    #[test]
    fn overlaps_are_the_longest_cached_prefix_per_worker() {
        let mut index = PrefixIndex::new();
        index.apply(&stored(0, 1, &[1, 2, 3]));
        index.apply(&stored(1, 1, &[1, 2]));
        index.apply(&stored(2, 1, &[9]));
        // Worker 1 also holds block 4, but not 3: its match stops at 2.
        index.apply(&stored(1, 2, &[4]));
        let got = index.overlaps(&[h(1), h(2), h(3), h(4)]);
        assert_eq!(got.get(&WorkerId(0)), Some(&3));
        assert_eq!(got.get(&WorkerId(1)), Some(&2));
        assert_eq!(got.get(&WorkerId(2)), None);
        assert!(index.overlaps(&[h(7)]).is_empty());
        assert!(index.overlaps(&[]).is_empty());
    }

    #[test]
    fn removals_shorten_matches_and_unknown_removals_are_harmless() {
        let mut index = PrefixIndex::new();
        // A removal of blocks never stored (the router joined late).
        assert!(index.apply(&removed(0, 1, &[1, 2])));
        assert_eq!(index.num_blocks(), 0);
        index.apply(&stored(0, 2, &[1, 2, 3]));
        index.apply(&removed(0, 3, &[2]));
        assert_eq!(index.overlaps(&[h(1), h(2), h(3)])[&WorkerId(0)], 1);
        assert_eq!(index.blocks_of(WorkerId(0)), 2);
    }

    #[test]
    fn repeated_and_stale_events_are_ignored() {
        let mut index = PrefixIndex::new();
        assert!(index.apply(&stored(0, 1, &[1, 2])));
        assert!(index.apply(&removed(0, 2, &[2])));
        // A replay of the store after the removal must not resurrect block 2.
        assert!(!index.apply(&stored(0, 1, &[1, 2])));
        assert!(!index.apply(&removed(0, 2, &[2])));
        assert_eq!(index.overlaps(&[h(1), h(2)])[&WorkerId(0)], 1);
        // Storing the same block twice counts it once.
        index.apply(&stored(0, 3, &[1]));
        assert_eq!(index.blocks_of(WorkerId(0)), 1);
    }

    #[test]
    fn a_worker_that_leaves_takes_its_blocks_with_it() {
        let mut index = PrefixIndex::new();
        index.apply(&stored(0, 1, &[1, 2]));
        index.apply(&stored(1, 1, &[1]));
        index.remove_worker(WorkerId(0));
        let got = index.overlaps(&[h(1), h(2)]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[&WorkerId(1)], 1);
        assert_eq!(index.num_blocks(), 1);
        // A worker that rejoins starts its numbering again.
        assert!(index.apply(&stored(0, 1, &[5])));
    }
}
