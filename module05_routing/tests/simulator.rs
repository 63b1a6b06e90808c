//! The simulator's results on small fixed traces, snapshotted: a change in
//! a policy, the cache model or the index shows up here as a diff.

use module05_routing::policy::{self, DEFAULT_POLICIES};
use module05_routing::report;
use module05_routing::sim::{self, SimConfig};
use module05_routing::trace::{self, SyntheticChats};

fn run(name: &str, requests: &[trace::TraceRequest], config: &SimConfig) -> String {
    let mut policies: Vec<_> = DEFAULT_POLICIES
        .iter()
        .map(|p| policy::by_name(p, 7, 1.0).unwrap())
        .collect();
    let result = sim::compare(name, requests, config, &mut policies, &|| {});
    report::table(&result)
}

#[test]
fn synthetic_chats() {
    let chats = SyntheticChats {
        conversations: 30,
        turns: 4,
        ..Default::default()
    };
    let config = SimConfig {
        cache_blocks: 40,
        ..Default::default()
    };
    insta::assert_snapshot!(run("synthetic", &chats.generate(), &config));
}

#[test]
fn mooncake_trace_head() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/traces/conversation_trace.jsonl");
    if !path.exists() {
        eprintln!("skipped: {} is not beside this checkout", path.display());
        return;
    }
    let requests = trace::load(&path, Some(400)).unwrap();
    let config = SimConfig {
        cache_blocks: 500,
        ..Default::default()
    };
    insta::assert_snapshot!(run(
        "conversation_trace.jsonl, first 400",
        &requests,
        &config
    ));
}
