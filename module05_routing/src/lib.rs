//! Module 5: KV-aware routing.
//!
//! With several workers, *where* a request runs decides how much of its
//! prompt is already in a KV cache. A multi-turn chat resends the whole
//! conversation every turn; on the worker that served the last turn, all
//! but the new message is cached, and prefill shrinks to the new tokens.
//! On any other worker it starts from zero. A router that knows which
//! worker holds which blocks can send each turn home — as long as that
//! worker is not drowning in work.
//!
//! The pieces, one file each:
//!
//! * [`registry`]: who the workers are — etcd, leases, a watch;
//! * [`index`]: which worker holds which blocks — a prefix index fed by the
//!   workers' stored/removed events;
//! * [`policy`]: the decision — random, round-robin, session affinity,
//!   least-loaded, and KV-aware (cached prefix against load);
//! * [`trace`] and [`sim`]: a trace replayed across simulated workers with
//!   finite caches, to compare the policies on the same requests;
//! * [`report`]: the table and the plot;
//! * [`router`]: all of it live — etcd membership, the workers' KV event
//!   streams and a policy behind one `route` call (module 6's router);
//! * [`chats`] and [`live`]: real engines behind that router, driven by
//!   multi-turn conversations.

pub mod chats;
pub mod index;
pub mod live;
pub mod policy;
pub mod registry;
pub mod report;
pub mod router;
pub mod sim;
pub mod trace;

/// Lab exercises (book chapter 5): stubs for you to write, or the reference
/// solutions with `--features solutions`.
#[cfg(not(feature = "solutions"))]
pub mod exercises;
#[cfg(feature = "solutions")]
#[path = "../../solutions/module05_routing.rs"]
pub mod exercises;

use std::time::Instant;

use index::{PrefixIndex, WorkerEvent, WorkerId};
use policy::{KvAwarePolicy, RouteRequest, RoutingPolicy, WorkerLoad};
use shared::kv::hash::BlockHash;
use shared::kv::prefix_cache::KvEvent;

/// Mean µs per KV-aware decision with `workers × blocks_per_worker` blocks
/// indexed, for requests of `request_blocks` blocks that share half their
/// prefix with one worker's cache.
pub fn decision_cost_us(
    workers: u32,
    blocks_per_worker: u64,
    request_blocks: usize,
    decisions: usize,
) -> (usize, f64) {
    let mut index = PrefixIndex::new();
    for w in 0..workers {
        let base = w as u64 * blocks_per_worker;
        index.apply(&WorkerEvent {
            worker: WorkerId(w),
            seq: 1,
            event: KvEvent::Stored {
                parent: None,
                hashes: (base..base + blocks_per_worker).map(BlockHash).collect(),
            },
        });
    }
    let loads: Vec<WorkerLoad> = (0..workers)
        .map(|w| WorkerLoad {
            id: WorkerId(w),
            active_requests: w as usize,
            active_blocks: 10 * w as usize,
        })
        .collect();
    let requests: Vec<Vec<BlockHash>> = (0..decisions)
        .map(|i| {
            let w = i as u64 % workers as u64;
            let start = w * blocks_per_worker + (i as u64 * 7) % (blocks_per_worker / 2);
            (0..request_blocks as u64)
                .map(|k| {
                    if k < request_blocks as u64 / 2 {
                        BlockHash(start + k)
                    } else {
                        BlockHash(u64::MAX - i as u64 * 1000 - k)
                    }
                })
                .collect()
        })
        .collect();
    let mut policy = KvAwarePolicy::new(1.0);
    let start = Instant::now();
    let mut checksum = 0u64;
    for hashes in &requests {
        let request = RouteRequest { hashes, session: 0 };
        checksum += policy.choose(&request, &loads, &index).0 as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    (index.num_blocks(), elapsed * 1e6 / decisions as f64)
}
