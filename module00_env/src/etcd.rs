//! The etcd probe: can this machine reach the registry module 5 uses?
//!
//! etcd is a small, strongly consistent key-value store (the one Kubernetes
//! keeps its state in). In module 5 every worker writes a key saying "I am
//! here, and I hold these KV blocks", with a lease that expires if the worker
//! dies; the router watches those keys. Here we only connect and ask the
//! server for its status, through the same gRPC client module 5 uses.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EtcdProbe {
    pub endpoint: String,
    /// The server's version, when it answered.
    pub version: Option<String>,
    /// What went wrong, when it did not.
    pub error: Option<String>,
}

impl EtcdProbe {
    pub fn reachable(&self) -> bool {
        self.version.is_some()
    }
}

/// Connects to `endpoint` and asks for the server status, giving up after `timeout`.
///
/// A plain TCP connect comes first: "nothing is listening" is the common
/// case, and gRPC would wrap it in three layers of error text.
pub async fn probe(endpoint: &str, timeout: Duration) -> EtcdProbe {
    let address = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let unreachable = |error: String| EtcdProbe {
        endpoint: endpoint.to_string(),
        version: None,
        error: Some(error),
    };
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Err(_) => return unreachable(format!("no answer within {timeout:?}")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return unreachable("connection refused: nothing listens there".into())
        }
        Ok(Err(e)) => return unreachable(e.to_string()),
        Ok(Ok(_)) => {}
    }
    let attempt = async {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let mut client = etcd_client::Client::connect([endpoint], Some(options)).await?;
        let status = client.status().await?;
        Ok::<_, etcd_client::Error>(status.version().to_string())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(version)) => EtcdProbe {
            endpoint: endpoint.to_string(),
            version: Some(version),
            error: None,
        },
        Ok(Err(e)) => unreachable(format!("something listens there but is not etcd v3: {e}")),
        Err(_) => unreachable(format!("connected, but no etcd answer within {timeout:?}")),
    }
}
