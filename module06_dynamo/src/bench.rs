//! Load over HTTP, and deployments compared under the same load.
//!
//! The load is **open-loop**: conversations start at random times (a
//! Poisson process at `rate` per second) whether or not earlier ones have
//! finished, as users do — a closed loop, where the next request waits for
//! the last, would hide queueing by slowing the clients down. Each
//! conversation sends its turns one after another, streaming, resending the
//! history each time. Every request is measured at the client: time to
//! first token (TTFT), inter-token latency (ITL), end-to-end latency; and
//! **goodput** counts only requests that met the latency objective (TTFT
//! and mean ITL under their limits), which is what users experience.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use module05_routing::chats::{chat_scripts, Conversation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shared::stats::percentile;

use crate::deploy::{Deployment, DeploymentSpec};
use crate::disagg::DisaggPolicy;

/// The load to apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    pub conversations: usize,
    pub turns: usize,
    /// Conversations started per second.
    pub rate: f64,
    /// Tokens generated per turn (end-of-sequence ignored).
    pub max_tokens: usize,
    pub seed: u64,
    /// Service-level objective: a request is "good" if its TTFT and its
    /// mean inter-token latency are at most these.
    pub slo_ttft_s: f64,
    pub slo_itl_s: f64,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            conversations: 10,
            turns: 3,
            rate: 0.25,
            max_tokens: 16,
            seed: 0,
            slo_ttft_s: 1.0,
            slo_itl_s: 0.15,
        }
    }
}

/// One streamed completion, as the client saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamedCompletion {
    /// The text pieces in order (one per content chunk).
    pub pieces: Vec<String>,
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_s: f64,
    /// Gaps between consecutive content chunks.
    pub itl_s: Vec<f64>,
    pub e2e_s: f64,
}

// ANCHOR: stream_chat
/// Sends one streaming chat completion and reads its server-sent events.
pub async fn stream_chat(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<StreamedCompletion, String> {
    let sent = Instant::now();
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {text}"));
    }
    let mut out = StreamedCompletion::default();
    let mut last: Option<Instant> = None;
    let mut buffer = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| format!("the stream broke: {e}"))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        // Events end with a blank line.
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let is_error = event.lines().any(|l| l == "event: error");
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if is_error {
                    return Err(format!("error event: {data}"));
                }
                if data == "[DONE]" {
                    out.e2e_s = sent.elapsed().as_secs_f64();
                    return Ok(out);
                }
                let value: serde_json::Value =
                    serde_json::from_str(data).map_err(|e| format!("bad chunk {data}: {e}"))?;
                if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
                    out.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                    out.completion_tokens =
                        usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
                }
                let Some(choice) = value["choices"].get(0) else {
                    continue;
                };
                if let Some(reason) = choice["finish_reason"].as_str() {
                    out.finish_reason = Some(reason.to_string());
                }
                if let Some(piece) = choice["delta"]["content"].as_str() {
                    let now = Instant::now();
                    match last {
                        None => out.ttft_s = (now - sent).as_secs_f64(),
                        Some(t) => out.itl_s.push((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    out.text.push_str(piece);
                    out.pieces.push(piece.to_string());
                }
            }
        }
    }
    Err("the stream ended without [DONE]".into())
}
// ANCHOR_END: stream_chat

/// One request's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub conversation: usize,
    pub turn: usize,
    pub ttft_s: f64,
    pub mean_itl_s: f64,
    pub e2e_s: f64,
    pub output_tokens: usize,
    pub error: Option<String>,
}

/// Percentiles of one latency.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    /// `p50/p90/p99`, scaled by `unit`, with `decimals`.
    fn show(&self, unit: f64, decimals: usize) -> String {
        let [a, b, c] = [self.p50, self.p90, self.p99].map(|x| x * unit);
        format!("{a:.decimals$}/{b:.decimals$}/{c:.decimals$}")
    }

    fn of(values: &[f64]) -> Self {
        Percentiles {
            p50: percentile(values, 0.5),
            p90: percentile(values, 0.9),
            p99: percentile(values, 0.99),
        }
    }
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSummary {
    pub requests: usize,
    pub failed: usize,
    pub ttft_s: Percentiles,
    pub itl_s: Percentiles,
    pub e2e_s: Percentiles,
    /// Generated tokens per second over the run.
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Requests per second that met the SLO.
    pub goodput_per_s: f64,
    pub duration_s: f64,
    pub samples: Vec<Sample>,
}

/// Drives `load` against the frontend at `url`; `progress` hears of each request.
pub async fn drive(
    url: &str,
    load: &LoadSpec,
    progress: Arc<dyn Fn() + Send + Sync>,
) -> LoadSummary {
    let client = reqwest::Client::new();
    let scripts = chat_scripts(load.conversations, load.turns, load.seed);
    let mut rng = StdRng::seed_from_u64(load.seed);
    let start = Instant::now();
    let mut at = 0.0;
    let mut tasks = tokio::task::JoinSet::new();
    for (c, script) in scripts.into_iter().enumerate() {
        // Exponential gaps: a Poisson process of conversation arrivals.
        at += -(1.0 - rng.random::<f64>()).ln() / load.rate.max(1e-9);
        let (client, url, load, progress) = (
            client.clone(),
            url.to_string(),
            load.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
            let mut conversation = Conversation::new();
            let mut samples = Vec::new();
            for (t, message) in script.user_turns.iter().enumerate() {
                conversation.user(message);
                let body = serde_json::json!({
                    "messages": conversation.messages.iter()
                        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                        .collect::<Vec<_>>(),
                    "max_tokens": load.max_tokens,
                    "temperature": 0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                let result = stream_chat(&client, &url, &body).await;
                progress();
                match result {
                    Ok(done) => {
                        samples.push(Sample {
                            conversation: c,
                            turn: t + 1,
                            ttft_s: done.ttft_s,
                            mean_itl_s: mean(&done.itl_s),
                            e2e_s: done.e2e_s,
                            output_tokens: done.completion_tokens,
                            error: None,
                        });
                        conversation.assistant(&done.text);
                    }
                    Err(error) => {
                        samples.push(Sample {
                            conversation: c,
                            turn: t + 1,
                            ttft_s: 0.0,
                            mean_itl_s: 0.0,
                            e2e_s: 0.0,
                            output_tokens: 0,
                            error: Some(error),
                        });
                        break; // the conversation cannot go on without its reply
                    }
                }
            }
            samples
        });
    }
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        samples.extend(done.expect("load tasks do not panic"));
    }
    samples.sort_by_key(|s| (s.conversation, s.turn));
    summarise(samples, start.elapsed().as_secs_f64(), load)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn summarise(samples: Vec<Sample>, duration_s: f64, load: &LoadSpec) -> LoadSummary {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let collect = |f: fn(&Sample) -> f64| ok.iter().map(|s| f(s)).collect::<Vec<f64>>();
    let good = ok
        .iter()
        .filter(|s| s.ttft_s <= load.slo_ttft_s && s.mean_itl_s <= load.slo_itl_s)
        .count();
    let tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
    LoadSummary {
        requests: samples.len(),
        failed: samples.len() - ok.len(),
        ttft_s: Percentiles::of(&collect(|s| s.ttft_s)),
        itl_s: Percentiles::of(&collect(|s| s.mean_itl_s)),
        e2e_s: Percentiles::of(&collect(|s| s.e2e_s)),
        output_tokens_per_s: tokens as f64 / duration_s,
        requests_per_s: ok.len() as f64 / duration_s,
        goodput_per_s: good as f64 / duration_s,
        duration_s,
        samples,
    }
}

/// A deployment under test, by name.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: &'static str,
    pub what: &'static str,
    pub spec: DeploymentSpec,
}

/// The seed's comparison: one node, disaggregated over TCP, disaggregated
/// with one-sided writes, and the full system with KV-aware routing.
pub fn variants(base: &DeploymentSpec) -> Vec<Variant> {
    let always_remote = DisaggPolicy {
        min_remote_prefill_tokens: 0,
        max_prefill_queue: usize::MAX,
    };
    vec![
        Variant {
            name: "baseline",
            what: "1 aggregated worker (module 1's engine behind HTTP)",
            spec: DeploymentSpec {
                prefill: 0,
                decode: 0,
                aggregated: 1,
                ..base.clone()
            },
        },
        Variant {
            name: "disagg-tcp",
            what: "1 prefill + 1 decode, every prefill remote, KV layer-wise over TCP",
            spec: DeploymentSpec {
                prefill: 1,
                decode: 1,
                aggregated: 0,
                one_sided: false,
                disagg: always_remote,
                ..base.clone()
            },
        },
        Variant {
            name: "disagg-onesided",
            what:
                "1 prefill + 1 decode, every prefill remote, one-sided writes into the decode pool",
            spec: DeploymentSpec {
                prefill: 1,
                decode: 1,
                aggregated: 0,
                one_sided: true,
                disagg: always_remote,
                ..base.clone()
            },
        },
        Variant {
            name: "full",
            what: "1 prefill + 2 decode, KV-aware routing, conditional disaggregation, one-sided",
            spec: DeploymentSpec {
                prefill: 1,
                decode: 2,
                aggregated: 0,
                one_sided: true,
                policy: "kv-aware".into(),
                disagg: DisaggPolicy::default(),
                ..base.clone()
            },
        },
    ]
}

/// One variant's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    pub name: String,
    pub what: String,
    pub summary: LoadSummary,
    /// The frontend's counters after the run: where prefills ran, KV moved.
    pub remote_prefills: u64,
    pub local_prefills: u64,
    pub kv_bytes: u64,
    /// KV transfer time not hidden behind prefill, summed over remote
    /// prefills (`None` in results saved before the frontend measured it).
    #[serde(default)]
    pub kv_transfer_s: Option<f64>,
}

impl VariantResult {
    /// Mean exposed KV transfer time per remote prefill, in ms (`None` when
    /// the result does not hold it).
    pub fn transfer_ms_per_request(&self) -> Option<f64> {
        let seconds = self.kv_transfer_s?;
        Some(if self.remote_prefills == 0 {
            0.0
        } else {
            seconds * 1e3 / self.remote_prefills as f64
        })
    }
}

/// Runs `load` against each variant in turn, each freshly started.
pub async fn compare(
    exe: &Path,
    variants: &[Variant],
    load: &LoadSpec,
    progress: Arc<dyn Fn() + Send + Sync>,
) -> Result<Vec<VariantResult>> {
    let mut results = Vec::new();
    for v in variants {
        let deployment = Deployment::start(exe, &v.spec)
            .await
            .with_context(|| format!("starting variant {}", v.name))?;
        let summary = drive(&deployment.url, load, progress.clone()).await;
        let m = &deployment.frontend.metrics;
        let places = [
            "remote",
            "local_no_prefill_worker",
            "local_short_prompt",
            "local_prefill_queue_full",
        ]
        .map(|p| m.prefill_place.with_label_values(&[p]).get());
        let kv_bytes = total(&m.kv_transfer_bytes);
        let kv_transfer_s = histogram_sum(&m.kv_transfer_seconds);
        results.push(VariantResult {
            name: v.name.into(),
            what: v.what.into(),
            summary,
            remote_prefills: places[0],
            local_prefills: places[1..].iter().sum(),
            kv_bytes,
            kv_transfer_s: Some(kv_transfer_s),
        });
        deployment.stop().await;
    }
    Ok(results)
}

/// Where prefills ran and what moving KV cost, as a frontend counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TransferCounters {
    pub remote_prefills: u64,
    pub local_prefills: u64,
    pub kv_bytes: u64,
    pub kv_transfer_s: f64,
}

impl std::ops::Sub for TransferCounters {
    type Output = TransferCounters;
    fn sub(self, before: TransferCounters) -> TransferCounters {
        TransferCounters {
            remote_prefills: self.remote_prefills - before.remote_prefills,
            local_prefills: self.local_prefills - before.local_prefills,
            kv_bytes: self.kv_bytes - before.kv_bytes,
            kv_transfer_s: self.kv_transfer_s - before.kv_transfer_s,
        }
    }
}

/// The [`TransferCounters`], read from a frontend's `/metrics`.
pub async fn scrape_transfer_counters(url: &str) -> Result<TransferCounters, String> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("reading {url}/metrics: {e}"))?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(parse_transfer_counters(&text))
}

/// The [`TransferCounters`] in a Prometheus text exposition.
pub fn parse_transfer_counters(text: &str) -> TransferCounters {
    let mut c = TransferCounters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value = value.parse::<f64>().unwrap_or(0.0);
        if name.starts_with("spark_prefill_total{place=\"remote\"}") {
            c.remote_prefills += value as u64;
        } else if name.starts_with("spark_prefill_total") {
            c.local_prefills += value as u64;
        } else if name.starts_with("spark_kv_transfer_bytes_total") {
            c.kv_bytes += value as u64;
        } else if name.starts_with("spark_kv_transfer_seconds_sum") {
            c.kv_transfer_s += value;
        }
    }
    c
}

/// A histogram family's sum of observations over all its labels.
fn histogram_sum(histograms: &prometheus::HistogramVec) -> f64 {
    use prometheus::core::Collector;
    histograms
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_histogram().get_sample_sum())
        .sum()
}

/// A counter family's total over all its labels.
fn total(counters: &prometheus::IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    counters
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// One line of the table: the name left-aligned, the rest right-aligned.
fn row(cells: &[String; 12]) -> String {
    const WIDTHS: [usize; 12] = [16, 4, 19, 18, 17, 6, 6, 8, 7, 6, 7, 9];
    let mut line = format!("{:<w$}", cells[0], w = WIDTHS[0]);
    for (cell, width) in cells.iter().zip(WIDTHS).skip(1) {
        line += &format!(" {cell:>width$}");
    }
    line + "\n"
}

/// The variants side by side, as ratios to the first.
pub fn table(load: &LoadSpec, results: &[VariantResult]) -> String {
    let mut out = format!(
        "{} conversations × {} turns, {:.2} conversations/s (Poisson), {} tokens per turn; SLO: TTFT ≤ {:.0} ms, ITL ≤ {:.0} ms\n",
        load.conversations, load.turns, load.rate, load.max_tokens, load.slo_ttft_s * 1e3, load.slo_itl_s * 1e3
    );
    let header = [
        "variant",
        "fail",
        "TTFT p50/p90/p99 ms",
        "ITL p50/p90/p99 ms",
        "E2E p50/p90/p99 s",
        "tok/s",
        "×base",
        "goodput",
        "TTFT ×",
        "remote",
        "KV MiB",
        "KV ms/req",
    ];
    out += &row(&header.map(String::from));
    let first = results.first().map(|r| &r.summary);
    let base_tps = first.map_or(1.0, |s| s.output_tokens_per_s);
    let base_ttft = first.map_or(1.0, |s| s.ttft_s.p50);
    for r in results {
        let s = &r.summary;
        out += &row(&[
            r.name.clone(),
            s.failed.to_string(),
            s.ttft_s.show(1e3, 0),
            s.itl_s.show(1e3, 0),
            s.e2e_s.show(1.0, 2),
            format!("{:.1}", s.output_tokens_per_s),
            format!(
                "{:.2}x",
                s.output_tokens_per_s / base_tps.max(f64::MIN_POSITIVE)
            ),
            format!("{:.2}/s", s.goodput_per_s),
            format!("{:.2}x", s.ttft_s.p50 / base_ttft.max(f64::MIN_POSITIVE)),
            format!(
                "{}/{}",
                r.remote_prefills,
                r.remote_prefills + r.local_prefills
            ),
            format!("{:.1}", r.kv_bytes as f64 / (1 << 20) as f64),
            r.transfer_ms_per_request()
                .map_or("-".into(), |ms| format!("{ms:.2}")),
        ]);
    }
    out += "×base: output tokens/s over the first variant's; TTFT ×: TTFT p50 over the first variant's; \
            goodput: requests/s within the SLO; remote: prefills run on a prefill worker / all; \
            KV ms/req: KV transfer time not hidden behind prefill, per remote prefill (- where the run did not measure it)\n";
    for r in results {
        out += &format!("  {:<16} {}\n", r.name, r.what);
    }
    if let Some(r) = results.iter().find(|r| r.summary.failed > 0) {
        let e = r.summary.samples.iter().find_map(|s| s.error.as_ref());
        out += &format!(
            "first failure ({}): {}\n",
            r.name,
            e.map_or("-", |e| e.as_str())
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// A result saved before the frontend measured KV transfer time (the
    /// committed CPU run) shows "-" in that column, not a measured-looking 0.
    #[test]
    fn results_without_transfer_time_show_a_dash() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../results/cpu/module06_bench.json"
        );
        let report = shared::results::read(std::path::Path::new(path)).unwrap();
        let load: LoadSpec = shared::results::field(&report, "load", "bench").unwrap();
        let mut results: Vec<VariantResult> =
            shared::results::field(&report, "results", "bench").unwrap();
        assert!(results.iter().all(|r| r.kv_transfer_s.is_none()));
        let last_cell = |table: &str, variant: &str| {
            let line = table.lines().find(|l| l.starts_with(variant)).unwrap();
            line.split_whitespace().last().unwrap().to_string()
        };
        assert_eq!(last_cell(&table(&load, &results), "disagg-tcp"), "-");
        results[1].kv_transfer_s = Some(0.3);
        assert_eq!(last_cell(&table(&load, &results), "disagg-tcp"), "10.00");
    }

    /// What `bench --url` scrapes from `/metrics` must be what the frontend
    /// counted, and the difference of two scrapes what happened between them.
    #[test]
    fn transfer_counters_are_read_back_from_the_metrics_text() {
        let metrics = Metrics::new();
        let before = parse_transfer_counters(&metrics.render());
        assert_eq!(before, TransferCounters::default());
        metrics
            .prefill_place
            .with_label_values(&["remote"])
            .inc_by(3);
        metrics
            .prefill_place
            .with_label_values(&["local_short_prompt"])
            .inc();
        for (worker, bytes, seconds) in [("decode-0", 1000, 0.25), ("decode-1", 24, 0.5)] {
            metrics
                .kv_transfer_bytes
                .with_label_values(&[worker])
                .inc_by(bytes);
            metrics
                .kv_transfer_seconds
                .with_label_values(&[worker])
                .observe(seconds);
        }
        let after = parse_transfer_counters(&metrics.render());
        let moved = after - before;
        assert_eq!(moved.remote_prefills, 3);
        assert_eq!(moved.local_prefills, 1);
        assert_eq!(moved.kv_bytes, 1024);
        assert!((moved.kv_transfer_s - 0.75).abs() < 1e-9);
        assert!((histogram_sum(&metrics.kv_transfer_seconds) - 0.75).abs() < 1e-9);
        let result = VariantResult {
            name: "x".into(),
            what: "y".into(),
            summary: summarise(Vec::new(), 1.0, &LoadSpec::default()),
            remote_prefills: moved.remote_prefills,
            local_prefills: moved.local_prefills,
            kv_bytes: moved.kv_bytes,
            kv_transfer_s: Some(moved.kv_transfer_s),
        };
        assert!((result.transfer_ms_per_request().unwrap() - 250.0).abs() < 1e-6);
    }
}
