//! The registry against a real etcd: joins are seen, a worker that stops
//! renewing its lease disappears by itself, a clean leave is immediate.

use std::time::{Duration, Instant};

use module05_routing::registry::{Membership, Registry, Role, WorkerInfo};
use shared::etcd_server::EtcdServer;

fn worker(name: &str) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        address: format!("127.0.0.1:{}", 9000 + name.len()),
        role: Role::Decode,
        capacity_blocks: 1024,
    }
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Membership>, within: Duration) -> Membership {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a membership change in time")
        .expect("watch still open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_keep_live_workers_and_drop_dead_ones() {
    let etcd = EtcdServer::start().expect("etcd-server installed (scripts/setup.sh)");
    let registry = Registry::connect(&etcd.endpoint, "/test").await.unwrap();
    let (initial, mut changes) = registry.watch().await.unwrap();
    assert!(initial.is_empty());

    let alive = registry.register(&worker("alive"), 2).await.unwrap();
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        Membership::Joined(worker("alive"))
    );
    let doomed = registry.register(&worker("doomed"), 2).await.unwrap();
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        Membership::Joined(worker("doomed"))
    );

    // "doomed" stops renewing, as a crashed process would.
    let stopped = Instant::now();
    drop(doomed);
    assert_eq!(
        next(&mut changes, Duration::from_secs(10)).await,
        Membership::Left {
            name: "doomed".into()
        }
    );
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "left after {took:?}: before its lease could expire"
    );

    // "alive" outlived several TTLs thanks to its keep-alive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(registry.workers().await.unwrap(), vec![worker("alive")]);

    // A clean leave is seen at once.
    alive.revoke().await.unwrap();
    assert_eq!(
        next(&mut changes, Duration::from_secs(2)).await,
        Membership::Left {
            name: "alive".into()
        }
    );
    assert!(registry.workers().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_etcd_says_what_to_do() {
    let err = match Registry::connect("127.0.0.1:1", "/test").await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(err.contains("cannot reach etcd at 127.0.0.1:1"), "{err}");
    assert!(err.contains("scripts/etcd.sh"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_whose_lease_is_lost_registers_again() {
    let etcd = EtcdServer::start().expect("etcd-server installed (scripts/setup.sh)");
    let registry = Registry::connect(&etcd.endpoint, "/test").await.unwrap();
    let (_, mut changes) = registry.watch().await.unwrap();
    let _registration = registry.register(&worker("phoenix"), 2).await.unwrap();
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        Membership::Joined(worker("phoenix"))
    );
    // Someone else revokes every lease: what a stall past the TTL looks like.
    let mut admin = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    for lease in admin.leases().await.unwrap().leases() {
        admin.lease_revoke(lease.id()).await.unwrap();
    }
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        Membership::Left {
            name: "phoenix".into()
        }
    );
    // The worker is alive, so it comes back by itself, under a new lease.
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        Membership::Joined(worker("phoenix"))
    );
}
