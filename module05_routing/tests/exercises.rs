//! Checks for chapter 5's lab exercises. They are ignored in a normal test
//! run; once you have written a function in `src/exercises.rs`, run
//! `cargo test -p module05_routing --test exercises -- --include-ignored`.

use std::collections::HashSet;

use module05_routing::exercises::*;
use module05_routing::index::{PrefixIndex, WorkerEvent, WorkerId};
use module05_routing::policy::{KvAwarePolicy, RouteRequest, RoutingPolicy, WorkerLoad};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::kv::hash::{block_hashes, BlockHash};
use shared::kv::prefix_cache::KvEvent;

#[test]
#[ignore = "exercise 5.1: write cached_prefix_blocks in src/exercises.rs"]
fn exercise_5_1_cached_prefix() {
    let prompt: Vec<u32> = (0..160).collect();
    let hashes = block_hashes(&prompt, 16); // 10 blocks
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..200 {
        // A random subset of the blocks, as a worker's cache might hold.
        let cached: HashSet<BlockHash> = hashes
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.8))
            .collect();
        let mut index = PrefixIndex::new();
        index.apply(&WorkerEvent {
            worker: WorkerId(0),
            seq: 1,
            event: KvEvent::Stored {
                parent: None,
                hashes: cached.iter().copied().collect(),
            },
        });
        let want = index
            .overlaps(&hashes)
            .get(&WorkerId(0))
            .copied()
            .unwrap_or(0);
        assert_eq!(cached_prefix_blocks(&hashes, &cached), want);
    }
}

#[test]
#[ignore = "exercise 5.2: write kv_aware_choice in src/exercises.rs"]
fn exercise_5_2_kv_aware_choice() {
    // By hand: 10 blocks; worker 1 caches 8 but is busy; weight decides.
    assert_eq!(kv_aware_choice(10, &[0, 8], &[0, 12], 1.0), 0); // 10 vs 14
    assert_eq!(kv_aware_choice(10, &[0, 8], &[0, 12], 4.0), 1); // 40 vs 20
    assert_eq!(kv_aware_choice(10, &[5, 5], &[3, 3], 1.0), 0); // a tie
                                                               // Against the crate's policy, on random cases (distinct costs).
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..500 {
        let n = rng.random_range(1..6);
        let blocks = rng.random_range(1..40);
        let cached: Vec<usize> = (0..n).map(|_| rng.random_range(0..=blocks)).collect();
        let active: Vec<usize> = (0..n).map(|_| rng.random_range(0..100)).collect();
        let weight = [0.5, 1.0, 4.0][rng.random_range(0..3)];
        let policy = KvAwarePolicy::new(weight);
        let loads: Vec<WorkerLoad> = (0..n)
            .map(|i| WorkerLoad {
                id: WorkerId(i as u32),
                active_requests: 0,
                active_blocks: active[i],
            })
            .collect();
        let costs: Vec<f64> = (0..n)
            .map(|i| policy.cost(blocks, cached[i], &loads[i]))
            .collect();
        let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
        if costs.iter().filter(|&&c| c == min).count() > 1 {
            continue; // the policy breaks ties by active requests; skip them
        }
        let got = kv_aware_choice(blocks, &cached, &active, weight);
        assert_eq!(
            costs[got], min,
            "cached {cached:?} active {active:?} w {weight}"
        );
        // The same worker the crate's policy picks through its index.
        let hashes: Vec<BlockHash> = (0..blocks as u64).map(BlockHash).collect();
        let mut index = PrefixIndex::new();
        for (i, &c) in cached.iter().enumerate() {
            index.apply(&WorkerEvent {
                worker: WorkerId(i as u32),
                seq: 1,
                event: KvEvent::Stored {
                    parent: None,
                    hashes: hashes[..c].to_vec(),
                },
            });
        }
        let request = RouteRequest {
            hashes: &hashes,
            session: 0,
        };
        let chosen = KvAwarePolicy::new(weight).choose(&request, &loads, &index);
        assert_eq!(chosen, WorkerId(got as u32));
    }
}

#[test]
#[ignore = "exercise 5.3: write power_of_two_choices in src/exercises.rs"]
fn exercise_5_3_power_of_two_choices() {
    let mut rng = StdRng::seed_from_u64(3);
    assert_eq!(power_of_two_choices(&[7], &mut rng), 0);
    // Two workers: both are always drawn, so the less loaded always wins.
    for _ in 0..100 {
        assert_eq!(power_of_two_choices(&[9, 4], &mut rng), 1);
    }
    // Four workers: the busiest is never chosen; the idlest is in half of
    // all pairs (3 of 6), so it wins about half the time.
    let loads = [0, 10, 20, 30];
    let mut wins = [0usize; 4];
    for _ in 0..4000 {
        wins[power_of_two_choices(&loads, &mut rng)] += 1;
    }
    assert_eq!(wins[3], 0, "{wins:?}");
    assert!((1800..2200).contains(&wins[0]), "{wins:?}");
    assert!(wins[1] > 0 && wins[2] > 0, "{wins:?}");
}
