//! The router with real engines: their KV event streams fill its index, and
//! a prompt goes back to the worker that cached it.

use std::time::Duration;

use module05_routing::live::{self, LiveConfig, LiveWorkers};
use module05_routing::policy;
use module05_routing::registry::Registry;
use module05_routing::router::Router;
use shared::engine::sampling::SamplingParams;
use shared::etcd_server::EtcdServer;
use shared::kv::block::DEFAULT_BLOCK_SIZE;
use shared::wire::{Prompt, TransferMode};
use shared::worker_client::{GenerateRequest, WorkerReply, WorkerStream};
use tch::{Device, Kind};

fn smollm2() -> shared::model::LoadedModel {
    let path = shared::model::default_model_path().expect("run scripts/setup.sh first");
    shared::model::load_model(&path, Device::Cpu, Kind::Float).unwrap()
}

async fn run_once(address: &str, prompt: &[u32]) -> u32 {
    let request = GenerateRequest {
        prompt: Prompt::Tokens(prompt.to_vec()),
        params: SamplingParams::greedy(2),
        mode: TransferMode::Local,
        decode: None,
    };
    let mut stream = WorkerStream::open(address, request).await.unwrap();
    let mut cached = None;
    while let Some(reply) = stream.next().await {
        if let WorkerReply::Done(b) = reply.unwrap() {
            cached = Some(b.cached_prompt_tokens);
        }
    }
    cached.expect("a Done frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_fill_the_index_and_a_repeated_prompt_goes_home() {
    let etcd = EtcdServer::start().unwrap();
    let m = smollm2();
    let registry = Registry::connect(&etcd.endpoint, "/test-live")
        .await
        .unwrap();
    let workers = LiveWorkers::start(&m.model, &m.tokenizer, &registry, 2, 64, "w")
        .await
        .unwrap();
    let policy = policy::by_name("kv-aware:4", 0, 1.0).unwrap();
    let router = Router::start(&registry, policy, DEFAULT_BLOCK_SIZE)
        .await
        .unwrap();
    assert!(router.wait_for(2, 0, Duration::from_secs(10)).await);

    let prompt: Vec<u32> = (0..70).map(|i| 100 + i).collect(); // 4 full blocks
    let first = router.route(&prompt, 1).unwrap();
    assert_eq!(first.cached_blocks, 0);
    assert_eq!(run_once(&first.worker.address, &prompt).await, 0);
    let home = first.worker.name.clone();
    drop(first);

    // The worker's Stored events reach the index.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while router
        .workers()
        .iter()
        .find(|w| w.info.name == home)
        .unwrap()
        .indexed_blocks
        < 4
    {
        assert!(std::time::Instant::now() < deadline, "no KV events arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Same prompt, even under another session id: routed home, and the
    // engine really reuses the cached blocks the router predicted.
    let again = router.route(&prompt, 99).unwrap();
    assert_eq!(again.worker.name, home);
    assert_eq!(again.cached_blocks, 4);
    assert_eq!(run_once(&again.worker.address, &prompt).await, 64);
    drop(again);
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_run_measures_what_the_router_predicted() {
    let etcd = EtcdServer::start().unwrap();
    let m = smollm2();
    let config = LiveConfig {
        workers: 2,
        sessions: 3,
        turns: 2,
        max_tokens: 3,
        concurrency: 2,
        kv_blocks: 96,
        ..LiveConfig::default()
    };
    let policies = ["kv-aware:4".to_string()];
    let results = live::run(
        &m.model,
        &m.tokenizer,
        &etcd.endpoint,
        &config,
        &policies,
        &|_, _| {},
    )
    .await
    .unwrap();
    let r = &results[0];
    assert_eq!(r.requests, 6);
    assert_eq!(r.turns.len(), 6);
    // Second turns resend the first: the cache must have served some of it,
    // and the index must have known (within a block per request).
    assert!(r.hit_rate > 0.2, "hit rate {}", r.hit_rate);
    assert!(r.hit_rate <= r.oracle_hit_rate + 1e-9);
    for t in &r.turns {
        assert!(
            t.cached_tokens.abs_diff(t.predicted_tokens) <= DEFAULT_BLOCK_SIZE,
            "{t:?}"
        );
    }
}
