//! The network check against a server on 127.0.0.1, started by the test.

use std::time::Duration;

use module00_env::net::{self, NetCheckConfig, NetError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(net::serve(listener));
    address
}

#[tokio::test]
async fn measures_round_trip_and_both_directions_within_bounds() {
    let peer = start_server().await;
    let config = NetCheckConfig {
        pings: 200,
        duration: Duration::from_secs(5),
        max_bytes: 8 << 20,
    };
    let result = net::check(&peer, config).await.unwrap();

    let rtt = &result.round_trip;
    assert_eq!(rtt.samples, 200, "all pings within the time bound");
    assert!(rtt.min_us > 0.0 && rtt.min_us <= rtt.p50_us && rtt.p50_us <= rtt.p99_us);
    assert!(rtt.p99_us <= rtt.max_us * 1.001);
    // The byte bound is reached long before the time bound on loopback,
    // and the server confirmed every byte.
    assert_eq!(result.upload.bytes, 8 << 20);
    assert_eq!(result.download.bytes, 8 << 20);
    assert!(result.upload.gbit_per_s() > 0.0 && result.download.gbit_per_s() > 0.0);
}

#[tokio::test]
async fn time_bound_stops_the_transfer() {
    let peer = start_server().await;
    let config = NetCheckConfig {
        pings: 1_000_000,
        duration: Duration::from_millis(200),
        max_bytes: u64::MAX / 2,
    };
    let start = std::time::Instant::now();
    let result = net::check(&peer, config).await.unwrap();
    assert!(result.round_trip.samples < 1_000_000);
    assert!(result.upload.bytes > 0 && result.download.bytes > 0);
    // Three phases of 0.2 s each, plus slack for a slow CI machine.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn no_server_is_a_clear_error() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = unused.local_addr().unwrap().to_string();
    drop(unused);
    let err = net::check(&peer, NetCheckConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Connect { .. }));
    assert!(err.to_string().contains("module00_env serve"), "{err}");
}

#[tokio::test]
async fn server_survives_a_stranger() {
    let peer = start_server().await;
    let mut stranger = tokio::net::TcpStream::connect(&peer).await.unwrap();
    stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    // The server drops the connection instead of answering (a reset, since
    // it leaves the stranger's bytes unread).
    match stranger.read_to_end(&mut rest).await {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    let config = NetCheckConfig {
        pings: 10,
        duration: Duration::from_secs(1),
        max_bytes: 1 << 20,
    };
    assert!(net::check(&peer, config).await.is_ok());
}
