//! The etcd probe against a real etcd started by the test, and against nothing.

use std::time::Duration;

use module00_env::etcd;
use shared::etcd_server::EtcdServer;

#[tokio::test]
async fn reaches_a_running_etcd() {
    let server = EtcdServer::start().expect("etcd must be installed: run ./scripts/setup.sh");
    let probe = etcd::probe(&server.endpoint, Duration::from_secs(5)).await;
    assert!(probe.reachable(), "{probe:?}");
    assert!(probe.version.unwrap().starts_with('3'));
}

#[tokio::test]
async fn nothing_listening_is_explained() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = unused.local_addr().unwrap().to_string();
    drop(unused);
    let probe = etcd::probe(&endpoint, Duration::from_secs(2)).await;
    assert!(!probe.reachable());
    assert!(probe.error.unwrap().contains("nothing listens"));
}

#[tokio::test]
async fn a_server_that_is_not_etcd_is_explained() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        // Accept and immediately close, like a service speaking another protocol.
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let probe = etcd::probe(&endpoint, Duration::from_secs(2)).await;
    assert!(!probe.reachable());
    assert!(probe.error.is_some());
}
