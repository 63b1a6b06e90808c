//! Who owns which KV block: allocation, reference counts, and reuse by content.
//!
//! Think of the KV pool as a page cache. Blocks are pages; a sequence's
//! block table is its page table. A block that holds a *full* run of tokens
//! gets a content name (its chained [`BlockHash`]) and is registered here,
//! so a later request with the same prefix maps the same physical block
//! instead of recomputing it — like two processes mapping the same file page.
//!
//! Every block is in exactly one of three states:
//!
//! ```text
//!  free ──allocate──► referenced (refcount ≥ 1) ──release to 0──► free        (no content name)
//!                          ▲                                  └──► evictable   (named: still reusable)
//!                          └──────────── match_prefix ─────────────┘
//!  evictable ──allocate (pool empty, least recently used first)──► referenced, name forgotten
//! ```
//!
//! Naming and forgetting blocks emit [`KvEvent`]s; module 5 publishes them
//! so a router knows which worker holds which prefixes.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::block::BlockId;
use super::hash::BlockHash;

/// A change in which block contents this cache holds. (Externally tagged
/// in serde, the default: bincode, the wire format, cannot decode the
/// internally tagged form.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvEvent {
    /// These blocks, each the child of the one before (the first a child of
    /// `parent`), are now cached.
    Stored {
        parent: Option<BlockHash>,
        hashes: Vec<BlockHash>,
    },
    /// These blocks were evicted.
    Removed { hashes: Vec<BlockHash> },
}

/// A [`KvEvent`] with the worker's sequence number (from 1, increasing), so a
/// router can apply each event once and in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberedKvEvent {
    pub seq: u64,
    pub event: KvEvent,
}

/// Hit counters for the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PrefixCacheStats {
    /// Full prompt blocks looked up.
    pub queried_blocks: u64,
    /// Of those, found cached.
    pub hit_blocks: u64,
}

impl PrefixCacheStats {
    pub fn hit_rate(&self) -> f64 {
        if self.queried_blocks == 0 {
            0.0
        } else {
            self.hit_blocks as f64 / self.queried_blocks as f64
        }
    }
}

/// Block allocator with content-addressed reuse and LRU eviction.
pub struct PrefixCache {
    refcount: Vec<u32>,
    name: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, BlockId>,
    free: VecDeque<BlockId>,
    /// Named blocks nobody references, by last use (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    last_use: Vec<u64>,
    clock: u64,
    events: Vec<KvEvent>,
    stats: PrefixCacheStats,
    enabled: bool,
}

impl PrefixCache {
    /// A cache over `num_blocks` blocks. With `enabled = false` it is a plain
    /// allocator: nothing is named, nothing is reused.
    pub fn new(num_blocks: usize, enabled: bool) -> Self {
        PrefixCache {
            refcount: vec![0; num_blocks],
            name: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as u32).map(BlockId).collect(),
            evictable: BTreeMap::new(),
            last_use: vec![0; num_blocks],
            clock: 0,
            events: Vec::new(),
            stats: PrefixCacheStats::default(),
            enabled,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks an `allocate` could hand out now (free plus evictable).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_in_use(&self) -> usize {
        self.num_blocks() - self.num_available()
    }

    /// Named blocks kept for reuse although no sequence uses them.
    pub fn num_cached_idle(&self) -> usize {
        self.evictable.len()
    }

    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount[block.index()]
    }

    /// Takes the events since the last call.
    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Every block content this cache can reuse now: a snapshot for a router
    /// that starts listening to the events late.
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.by_hash.keys().copied().collect()
    }

    /// Maps the longest cached run of `hashes` (a prompt's full blocks, in
    /// order), at most `max_blocks` of them, and takes a reference on each
    /// block found. All of `hashes` count as looked up in the statistics.
    pub fn match_prefix(&mut self, hashes: &[BlockHash], max_blocks: usize) -> Vec<BlockId> {
        self.stats.queried_blocks += hashes.len() as u64;
        if !self.enabled {
            return Vec::new();
        }
        let mut blocks = Vec::new();
        for hash in hashes.iter().take(max_blocks) {
            let Some(&block) = self.by_hash.get(hash) else {
                break;
            };
            self.retain(block);
            blocks.push(block);
        }
        self.stats.hit_blocks += blocks.len() as u64;
        blocks
    }

    /// Longest cached run of `hashes`, without taking references or counting
    /// a lookup (for schedulers and routers that only want to know).
    pub fn cached_prefix_len(&self, hashes: &[BlockHash]) -> usize {
        if !self.enabled {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// How many of the first `n` of `hashes` are cached but idle: mapping
    /// them takes them out of the available count.
    pub fn idle_in_prefix(&self, hashes: &[BlockHash], n: usize) -> usize {
        hashes[..n]
            .iter()
            .filter(|h| {
                self.by_hash
                    .get(h)
                    .is_some_and(|b| self.refcount[b.index()] == 0)
            })
            .count()
    }

    /// Hands out an empty block, evicting the least recently used idle named
    /// block if no free one is left. `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop_front() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                let hash = self.name[block.index()]
                    .take()
                    .expect("evictable blocks are named");
                self.by_hash.remove(&hash);
                self.events.push(KvEvent::Removed { hashes: vec![hash] });
                block
            }
        };
        debug_assert_eq!(self.refcount[block.index()], 0);
        self.refcount[block.index()] = 1;
        Some(block)
    }

    /// Names a block that now holds a full run of tokens, so later prompts
    /// can reuse it. If another block already has this content (two requests
    /// computed the same prefix at once), this one stays anonymous.
    pub fn register(&mut self, block: BlockId, parent: Option<BlockHash>, hash: BlockHash) {
        if !self.enabled || self.name[block.index()].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.name[block.index()] = Some(hash);
        self.by_hash.insert(hash, block);
        match self.events.last_mut() {
            // Consecutive blocks of one sequence become one event.
            Some(KvEvent::Stored { hashes, .. }) if hashes.last() == parent.as_ref() => {
                hashes.push(hash)
            }
            _ => self.events.push(KvEvent::Stored {
                parent,
                hashes: vec![hash],
            }),
        }
    }

    /// The content name of a block, if it has one.
    pub fn name_of(&self, block: BlockId) -> Option<BlockHash> {
        self.name[block.index()]
    }

    /// Drops one reference. A block nobody uses becomes free, or — when it
    /// has a content name — evictable, still available for reuse.
    pub fn release(&mut self, block: BlockId) {
        let count = &mut self.refcount[block.index()];
        assert!(*count > 0, "release of unreferenced {block:?}");
        *count -= 1;
        if *count == 0 {
            if self.name[block.index()].is_some() {
                self.clock += 1;
                self.last_use[block.index()] = self.clock;
                self.evictable.insert(self.clock, block);
            } else {
                self.free.push_back(block);
            }
        }
    }

    fn retain(&mut self, block: BlockId) {
        if self.refcount[block.index()] == 0 {
            self.evictable.remove(&self.last_use[block.index()]);
        }
        self.refcount[block.index()] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hash::block_hashes;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
        block_hashes(tokens, 4)
    }

    #[test]
    fn released_named_blocks_are_reused_by_the_next_prompt() {
        let mut cache = PrefixCache::new(8, true);
        let prompt: Vec<u32> = (0..12).collect();
        let h = hashes(&prompt);
        let blocks: Vec<_> = (0..3).map(|_| cache.allocate().unwrap()).collect();
        let mut parent = None;
        for (b, hash) in blocks.iter().zip(&h) {
            cache.register(*b, parent, *hash);
            parent = Some(*hash);
        }
        assert_eq!(
            cache.drain_events(),
            vec![KvEvent::Stored {
                parent: None,
                hashes: h.clone()
            }]
        );
        blocks.iter().for_each(|&b| cache.release(b));
        assert_eq!(cache.num_cached_idle(), 3);

        // Same first two blocks, different third.
        let mut other = prompt.clone();
        other[10] = 99;
        let matched = cache.match_prefix(&hashes(&other), usize::MAX);
        assert_eq!(matched, blocks[..2]);
        assert_eq!(
            cache.stats(),
            PrefixCacheStats {
                queried_blocks: 3,
                hit_blocks: 2
            }
        );
        assert_eq!(cache.refcount(blocks[0]), 1);
    }

    #[test]
    fn eviction_is_least_recently_used_and_reported() {
        let mut cache = PrefixCache::new(2, true);
        let (a, b) = (cache.allocate().unwrap(), cache.allocate().unwrap());
        let (ha, hb) = (BlockHash(1), BlockHash(2));
        cache.register(a, None, ha);
        cache.register(b, None, hb);
        cache.release(b); // b idle first: it is the older
        cache.release(a);
        cache.drain_events();
        let c = cache.allocate().unwrap();
        assert_eq!(c, b);
        assert_eq!(
            cache.drain_events(),
            vec![KvEvent::Removed { hashes: vec![hb] }]
        );
        assert_eq!(cache.match_prefix(&[ha], 1), vec![a]);
        assert_eq!(cache.allocate(), None, "both blocks referenced");
    }

    #[test]
    fn disabled_cache_never_reuses() {
        let mut cache = PrefixCache::new(2, false);
        let a = cache.allocate().unwrap();
        cache.register(a, None, BlockHash(5));
        cache.release(a);
        assert!(cache.match_prefix(&[BlockHash(5)], 1).is_empty());
        assert!(cache.drain_events().is_empty());
    }

    #[test]
    fn random_operations_never_leak_a_block() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut cache = PrefixCache::new(32, true);
        let mut held: Vec<BlockId> = Vec::new();
        for step in 0..20_000u64 {
            match rng.random_range(0..4) {
                0 | 1 => {
                    if let Some(b) = cache.allocate() {
                        if rng.random_bool(0.5) {
                            cache.register(b, None, BlockHash(rng.random_range(0..64)));
                        }
                        held.push(b);
                    }
                }
                2 if !held.is_empty() => {
                    let b = held.swap_remove(rng.random_range(0..held.len()));
                    cache.release(b);
                }
                _ => {
                    let wanted = [BlockHash(rng.random_range(0..64))];
                    held.extend(cache.match_prefix(&wanted, 1));
                }
            }
            // Every block is free, idle-named, or referenced as many times as held.
            let referenced: u32 = (0..32).map(|i| cache.refcount(BlockId(i))).sum();
            assert_eq!(referenced as usize, held.len(), "step {step}");
            assert_eq!(cache.num_in_use() + cache.num_available(), 32);
            let distinct: std::collections::HashSet<_> = held.iter().collect();
            assert_eq!(distinct.len(), cache.num_in_use(), "step {step}");
        }
        held.drain(..).for_each(|b| cache.release(b));
        assert_eq!(cache.num_available(), 32);
    }
}
