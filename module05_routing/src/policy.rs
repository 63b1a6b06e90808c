//! Routing policies: given a request and the workers' state, pick one.
//!
//! All of them sit behind [`RoutingPolicy`], so the simulator and a live
//! router can swap them with a flag. From the simplest to Dynamo's:
//!
//! * [`RandomPolicy`] and [`RoundRobinPolicy`] spread load and ignore caches;
//! * [`SessionAffinityPolicy`] sends every turn of a conversation to the
//!   same worker (consistent hashing, so a worker joining or leaving moves
//!   only its share of sessions) — caches by convention, blind to load;
//! * [`LeastLoadedPolicy`] balances by active work, blind to caches;
//! * [`KvAwarePolicy`] weighs both: the prefill a worker would save thanks
//!   to its cached prefix against the work it already has.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::kv::hash::BlockHash;

use crate::index::{PrefixIndex, WorkerId};

/// What the router knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Chained hashes of the prompt's blocks.
    pub hashes: &'a [BlockHash],
    /// A conversation id (or any key whose requests share a prefix).
    pub session: u64,
}

/// What the router knows about a worker's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLoad {
    pub id: WorkerId,
    /// Requests admitted and not finished.
    pub active_requests: usize,
    /// KV blocks those requests occupy: the decode work in flight.
    pub active_blocks: usize,
}

/// `Send`, so a live router can hold one behind a lock shared by tasks.
pub trait RoutingPolicy: Send {
    fn name(&self) -> String;
    /// Picks one of `workers` (never empty).
    fn choose(
        &mut self,
        request: &RouteRequest<'_>,
        workers: &[WorkerLoad],
        index: &PrefixIndex,
    ) -> WorkerId;
}

pub struct RandomPolicy {
    rng: StdRng,
}

impl RandomPolicy {
    pub fn new(seed: u64) -> Self {
        RandomPolicy {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl RoutingPolicy for RandomPolicy {
    fn name(&self) -> String {
        "random".into()
    }

    fn choose(
        &mut self,
        _: &RouteRequest<'_>,
        workers: &[WorkerLoad],
        _: &PrefixIndex,
    ) -> WorkerId {
        workers[self.rng.random_range(0..workers.len())].id
    }
}

#[derive(Default)]
pub struct RoundRobinPolicy {
    next: usize,
}

impl RoutingPolicy for RoundRobinPolicy {
    fn name(&self) -> String {
        "round-robin".into()
    }

    fn choose(
        &mut self,
        _: &RouteRequest<'_>,
        workers: &[WorkerLoad],
        _: &PrefixIndex,
    ) -> WorkerId {
        let id = workers[self.next % workers.len()].id;
        self.next = self.next.wrapping_add(1);
        id
    }
}

/// Consistent hashing: each worker owns `VIRTUAL_NODES` points on a ring; a
/// session goes to the first point at or after its own hash.
#[derive(Default)]
pub struct SessionAffinityPolicy;

const VIRTUAL_NODES: u32 = 64;

fn ring_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl RoutingPolicy for SessionAffinityPolicy {
    fn name(&self) -> String {
        "session-affinity".into()
    }

    fn choose(
        &mut self,
        request: &RouteRequest<'_>,
        workers: &[WorkerLoad],
        _: &PrefixIndex,
    ) -> WorkerId {
        // Rebuilt per call for clarity; a live router would cache it per
        // membership change.
        let ring: BTreeMap<u64, WorkerId> = workers
            .iter()
            .flat_map(|w| {
                (0..VIRTUAL_NODES).map(move |v| {
                    let mut key = w.id.0.to_le_bytes().to_vec();
                    key.extend_from_slice(&v.to_le_bytes());
                    (ring_hash(&key), w.id)
                })
            })
            .collect();
        let point = ring_hash(&request.session.to_le_bytes());
        ring.range(point..)
            .next()
            .or_else(|| ring.iter().next())
            .map(|(_, &id)| id)
            .expect("at least one worker")
    }
}

#[derive(Default)]
pub struct LeastLoadedPolicy;

impl RoutingPolicy for LeastLoadedPolicy {
    fn name(&self) -> String {
        "least-loaded".into()
    }

    fn choose(
        &mut self,
        _: &RouteRequest<'_>,
        workers: &[WorkerLoad],
        _: &PrefixIndex,
    ) -> WorkerId {
        workers
            .iter()
            .min_by_key(|w| (w.active_blocks, w.active_requests, w.id))
            .expect("at least one worker")
            .id
    }
}

/// Dynamo's KV-aware cost, in blocks of work:
///
/// ```text
/// cost(w) = overlap_weight × (request blocks − blocks w has cached)   // prefill left to do
///         + active_blocks(w)                                          // decode work in flight
/// ```
///
/// The worker with the lowest cost wins (ties: fewer active requests, then
/// the lower id). `overlap_weight` trades cache hits against balance: 0 is
/// least-loaded; a large weight chases the longest prefix regardless of
/// queues.
pub struct KvAwarePolicy {
    pub overlap_weight: f64,
}

impl KvAwarePolicy {
    pub fn new(overlap_weight: f64) -> Self {
        KvAwarePolicy { overlap_weight }
    }

    // ANCHOR: kv_cost
    pub fn cost(&self, request_blocks: usize, cached: usize, load: &WorkerLoad) -> f64 {
        let prefill_blocks = request_blocks.saturating_sub(cached) as f64;
        self.overlap_weight * prefill_blocks + load.active_blocks as f64
    }
    // ANCHOR_END: kv_cost
}

impl RoutingPolicy for KvAwarePolicy {
    fn name(&self) -> String {
        format!("kv-aware:{}", self.overlap_weight)
    }

    fn choose(
        &mut self,
        request: &RouteRequest<'_>,
        workers: &[WorkerLoad],
        index: &PrefixIndex,
    ) -> WorkerId {
        let overlaps = index.overlaps(request.hashes);
        workers
            .iter()
            .map(|w| {
                let cached = overlaps.get(&w.id).copied().unwrap_or(0);
                (self.cost(request.hashes.len(), cached, w), w)
            })
            .min_by(|(a, wa), (b, wb)| {
                a.total_cmp(b)
                    .then(wa.active_requests.cmp(&wb.active_requests))
                    .then(wa.id.cmp(&wb.id))
            })
            .expect("at least one worker")
            .1
            .id
    }
}

/// A policy by its command-line name: `random`, `round-robin`,
/// `session-affinity`, `least-loaded`, `kv-aware` (with `overlap_weight`)
/// or `kv-aware:W` (with weight W).
pub fn by_name(name: &str, seed: u64, overlap_weight: f64) -> Option<Box<dyn RoutingPolicy>> {
    if let Some(weight) = name.strip_prefix("kv-aware:") {
        let weight: f64 = weight
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w >= 0.0)?;
        return Some(Box::new(KvAwarePolicy::new(weight)));
    }
    Some(match name {
        "random" => Box::new(RandomPolicy::new(seed)),
        "round-robin" => Box::new(RoundRobinPolicy::default()),
        "session-affinity" => Box::new(SessionAffinityPolicy),
        "least-loaded" => Box::new(LeastLoadedPolicy),
        "kv-aware" => Box::new(KvAwarePolicy::new(overlap_weight)),
        _ => return None,
    })
}

pub const POLICY_NAMES: [&str; 5] = [
    "random",
    "round-robin",
    "session-affinity",
    "least-loaded",
    "kv-aware[:W]",
];

/// What `simulate` compares unless told otherwise: every policy, KV-aware
/// at Dynamo's default weight (1) and at a weight that favours the cache (4).
pub const DEFAULT_POLICIES: [&str; 6] = [
    "random",
    "round-robin",
    "session-affinity",
    "least-loaded",
    "kv-aware:1",
    "kv-aware:4",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::WorkerEvent;
    use shared::kv::prefix_cache::KvEvent;

    fn loads(n: u32) -> Vec<WorkerLoad> {
        (0..n)
            .map(|i| WorkerLoad {
                id: WorkerId(i),
                active_requests: 0,
                active_blocks: 0,
            })
            .collect()
    }

    fn request(hashes: &[BlockHash], session: u64) -> RouteRequest<'_> {
        RouteRequest { hashes, session }
    }

    #[test]
    fn random_is_reproducible_with_a_seed() {
        let index = PrefixIndex::new();
        let workers = loads(8);
        let picks = |seed| {
            let mut p = RandomPolicy::new(seed);
            (0..50)
                .map(|_| p.choose(&request(&[], 0), &workers, &index).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        assert_ne!(picks(7), picks(8));
    }

    #[test]
    fn session_affinity_is_stable_and_moves_few_sessions_when_a_worker_leaves() {
        let index = PrefixIndex::new();
        let mut p = SessionAffinityPolicy;
        let four = loads(4);
        let three: Vec<_> = four[..3].to_vec();
        let mut moved = 0;
        for session in 0..1000u64 {
            let a = p.choose(&request(&[], session), &four, &index);
            assert_eq!(a, p.choose(&request(&[], session), &four, &index));
            let b = p.choose(&request(&[], session), &three, &index);
            if a != WorkerId(3) {
                // Sessions of surviving workers stay where they were.
                assert_eq!(a, b, "session {session} moved");
            } else {
                moved += 1;
            }
        }
        // Worker 3 owned about a quarter of the sessions.
        assert!((150..350).contains(&moved), "{moved} sessions moved");
    }

    #[test]
    fn kv_aware_trades_cached_prefix_against_load() {
        let mut index = PrefixIndex::new();
        let hashes: Vec<BlockHash> = (1..=10).map(BlockHash).collect();
        index.apply(&WorkerEvent {
            worker: WorkerId(1),
            seq: 1,
            event: KvEvent::Stored {
                parent: None,
                hashes: hashes[..8].to_vec(),
            },
        });
        let mut workers = loads(2);
        // Worker 1 has 8 of 10 blocks cached and a little more load.
        workers[1].active_blocks = 5;
        let mut kv = KvAwarePolicy::new(1.0);
        // cost(0) = 10, cost(1) = 2 + 5 = 7 → worker 1.
        assert_eq!(
            kv.choose(&request(&hashes, 0), &workers, &index),
            WorkerId(1)
        );
        // With far more load on worker 1, balance wins: cost(1) = 2 + 20 > 10.
        workers[1].active_blocks = 20;
        assert_eq!(
            kv.choose(&request(&hashes, 0), &workers, &index),
            WorkerId(0)
        );
        // Weight 0 is least-loaded.
        let mut balance = KvAwarePolicy::new(0.0);
        assert_eq!(
            balance.choose(&request(&hashes, 0), &workers, &index),
            WorkerId(0)
        );
        let mut least = LeastLoadedPolicy;
        assert_eq!(
            least.choose(&request(&hashes, 0), &workers, &index),
            WorkerId(0)
        );
    }

    #[test]
    fn policies_are_found_by_name() {
        assert_eq!(
            by_name("kv-aware:2.5", 0, 1.0).unwrap().name(),
            "kv-aware:2.5"
        );
        assert_eq!(by_name("kv-aware", 0, 3.0).unwrap().name(), "kv-aware:3");
        assert!(by_name("kv-aware:-1", 0, 1.0).is_none());
        assert!(by_name("fastest", 0, 1.0).is_none());
        for name in DEFAULT_POLICIES {
            assert!(by_name(name, 0, 1.0).is_some(), "{name}");
        }
    }

    #[test]
    fn round_robin_cycles() {
        let index = PrefixIndex::new();
        let workers = loads(3);
        let mut p = RoundRobinPolicy::default();
        let picks: Vec<u32> = (0..6)
            .map(|_| p.choose(&request(&[], 0), &workers, &index).0)
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
