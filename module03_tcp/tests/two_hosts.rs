//! The same binaries on two "hosts": network namespaces joined by a veth
//! shaped with tc to 1 Gbit/s. Needs root (or CAP_NET_ADMIN); where
//! `ip netns add` is not permitted the test says so and passes without
//! running — everything it checks also runs on loopback in `disagg.rs`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Lab {
    names: [String; 2],
}

impl Lab {
    /// Two namespaces with a shaped veth between them, or `None` if not permitted.
    fn up() -> Option<Lab> {
        let tag = std::process::id();
        let names = [format!("sdt{tag}a"), format!("sdt{tag}b")];
        if !run(&["ip", "netns", "add", &names[0]]) {
            return None;
        }
        let lab = Lab { names };
        let [a, b] = &lab.names;
        let (va, vb) = (format!("v{tag}a"), format!("v{tag}b"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["ip", "netns", "add", b],
            vec![
                "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
            ],
            vec!["ip", "link", "set", &va, "netns", a],
            vec!["ip", "link", "set", &vb, "netns", b],
            vec!["ip", "-n", a, "addr", "add", "10.78.0.1/24", "dev", &va],
            vec!["ip", "-n", b, "addr", "add", "10.78.0.2/24", "dev", &vb],
            vec!["ip", "-n", a, "link", "set", "lo", "up"],
            vec!["ip", "-n", b, "link", "set", "lo", "up"],
            vec!["ip", "-n", a, "link", "set", &va, "up"],
            vec!["ip", "-n", b, "link", "set", &vb, "up"],
            vec![
                "ip", "netns", "exec", a, "tc", "qdisc", "add", "dev", &va, "root", "tbf", "rate",
                "1gbit", "burst", "125000", "latency", "100ms",
            ],
            vec![
                "ip", "netns", "exec", b, "tc", "qdisc", "add", "dev", &vb, "root", "tbf", "rate",
                "1gbit", "burst", "125000", "latency", "100ms",
            ],
        ];
        for step in steps {
            assert!(run(&step), "lab set-up failed at: {}", step.join(" "));
        }
        Some(lab)
    }

    fn exec(&self, node: usize, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            &self.names[node],
            env!("CARGO_BIN_EXE_module03_tcp"),
        ]);
        command.args(args);
        command
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.names {
            run(&["ip", "netns", "del", name]);
        }
    }
}

fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prefill_and_decode_on_two_hosts_agree_with_local() {
    let Some(lab) = Lab::up() else {
        eprintln!("skipped: `ip netns add` is not permitted here (run as root to include the two-host test)");
        return;
    };
    let _decode = Server(
        lab.exec(1, &["decode", "--listen", "10.78.0.2:7801", "--one-sided"])
            .spawn()
            .unwrap(),
    );
    let _prefill = Server(
        lab.exec(
            0,
            &[
                "prefill",
                "--listen",
                "127.0.0.1:7800",
                "--decode",
                "10.78.0.2:7801",
            ],
        )
        .spawn()
        .unwrap(),
    );
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("run.json");
    let svg = out.path().join("run.svg");
    // The servers load the model first; the client retries until they answer.
    let start = Instant::now();
    let status = loop {
        let status = lab
            .exec(
                0,
                &[
                    "client",
                    "--prefill",
                    "127.0.0.1:7800",
                    "--decode",
                    "10.78.0.2:7801",
                ],
            )
            .args([
                "--repeat",
                "1",
                "--max-tokens",
                "4",
                "--link",
                "test lab, 1gbit",
            ])
            .arg(format!("--json={}", json.display()))
            .arg(format!("--svg={}", svg.display()))
            .status()
            .unwrap();
        if status.success() || start.elapsed() > Duration::from_secs(300) {
            break status;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(status.success(), "the client failed");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    let tokens = |run: &serde_json::Value| -> Vec<serde_json::Value> {
        run["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r["error"].is_null(), "{r}");
                r["tokens"].clone()
            })
            .collect()
    };
    let local = tokens(&runs[0]);
    assert_eq!(tokens(&runs[1]), local, "bulk differs from local");
    assert_eq!(tokens(&runs[2]), local, "layerwise differs from local");
    assert_eq!(tokens(&runs[3]), local, "one-sided differs from local");
}
