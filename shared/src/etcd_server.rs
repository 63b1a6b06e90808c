//! A throwaway single-node etcd, started as a child process.
//!
//! Module 5's registry and module 6's deployment need an etcd. A test, or a
//! one-command demo, should not depend on one being already running, nor
//! clash with one that is: [`EtcdServer::start`] runs Debian's `etcd` binary
//! on free loopback ports with its data in a temporary directory, waits until
//! it accepts connections, and kills it (and deletes the data) when dropped —
//! the same lifetime rule as a `TempDir`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error(
        "cannot run `etcd` ({0}); install it with ./scripts/setup.sh \
         (Debian/Ubuntu: apt-get install etcd-server)"
    )]
    NotInstalled(std::io::Error),
    #[error("cannot prepare etcd's data directory or ports: {0}")]
    Io(#[from] std::io::Error),
    #[error("etcd exited before accepting connections; its log:\n{0}")]
    Exited(String),
    #[error("etcd did not accept connections within {0:?}; its log:\n{1}")]
    Timeout(Duration, String),
}

/// A running etcd; stopped and deleted on drop.
pub struct EtcdServer {
    child: Child,
    /// `127.0.0.1:PORT`, for `--etcd` and `etcd_client::Client::connect`.
    pub endpoint: String,
    data: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports and waits (up to 10 s) for it.
    pub fn start() -> Result<EtcdServer, EtcdServerError> {
        let data = tempfile::Builder::new()
            .prefix("spark-disagg-etcd")
            .tempdir()?;
        let client = free_port()?;
        let peer = free_port()?;
        let log_path = data.path().join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new("etcd");
        command
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.path().join("data").display()))
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls=http://{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
            .arg(format!("--initial-cluster=test=http://{peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal reaches the
            // program that owns this server and its workers, not etcd, so
            // the workers can still leave the registry; the owner stops etcd
            // last. If the owner dies first, the kernel stops etcd with it.
            .process_group(0);
        crate::process::stop_with_parent(&mut command);
        let child = command.spawn().map_err(EtcdServerError::NotInstalled)?;
        let mut server = EtcdServer {
            child,
            endpoint: client.to_string(),
            data,
        };
        server.wait_until_ready(client, Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_until_ready(
        &mut self,
        client: SocketAddr,
        limit: Duration,
    ) -> Result<(), EtcdServerError> {
        let start = Instant::now();
        loop {
            if TcpStream::connect_timeout(&client, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if self.child.try_wait()?.is_some() {
                return Err(EtcdServerError::Exited(self.log()));
            }
            if start.elapsed() > limit {
                return Err(EtcdServerError::Timeout(limit, self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where etcd writes its log (useful when a test fails).
    pub fn log_path(&self) -> PathBuf {
        self.data.path().join("etcd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the OS says is free now. (Another process could take it before
/// etcd binds it; on a test machine that race is rare and fails loudly.)
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's side of the bargain: when the thread that started etcd
    /// ends without stopping it (as a killed program would), etcd is sent
    /// SIGTERM and exits by itself.
    #[test]
    fn etcd_stops_when_the_thread_that_started_it_ends() {
        let (pid, data) = match std::thread::spawn(|| {
            EtcdServer::start().map(|server| {
                let owned = (
                    server.child.id() as libc::pid_t,
                    server.data.path().to_owned(),
                );
                std::mem::forget(server);
                owned
            })
        })
        .join()
        .unwrap()
        {
            Ok(owned) => owned,
            Err(EtcdServerError::NotInstalled(e)) => {
                eprintln!("skipped: etcd is not installed ({e}); run ./scripts/setup.sh");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child, with a valid status pointer.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: plain kill on our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("etcd (pid {pid}) still ran 10 s after its owner thread ended");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(data);
    }
}
