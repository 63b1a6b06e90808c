//! The baseline benchmark: what one node does with continuous batching.
//!
//! Three measurements, each answering one question a disaggregated design
//! has to beat:
//!
//! 1. **Single request** — how long is prefill, how long is a decode step,
//!    with nothing else running? (The latency floor.)
//! 2. **Batch sweep** — `B` identical-length requests submitted together: how
//!    does throughput grow with batch size? (Decode is memory-bound, so a
//!    step for 32 sequences costs little more than for one.)
//! 3. **Offered load** — requests arriving as a Poisson process at a given
//!    rate, joining the running batch as they come: throughput and the
//!    latency a user sees (time to first token, inter-token latency).
//!
//! Prompts are seeded random token ids: timings do not depend on the text,
//! and the runs are reproducible.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shared::engine::metrics::RequestTimings;
use shared::engine::sampling::SamplingParams;
use shared::engine::{Engine, Request, TokenEvent};

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchConfig {
    pub prompt_len: usize,
    pub output_len: usize,
    pub batch_sizes: Vec<usize>,
    pub num_requests: usize,
    /// Requests per second for the offered-load run (0: all at once).
    pub request_rate: f64,
    pub seed: u64,
}

/// Nothing else running: the latency floor. Each field is the median of
/// [`single_runs`] requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SingleResult {
    pub prefill_ms: f64,
    pub decode_ms_per_token: f64,
    pub end_to_end_ms: f64,
}

/// `batch` requests submitted together.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub batch: usize,
    pub wall_s: f64,
    /// Generated tokens per second, all sequences together.
    pub output_tokens_per_s: f64,
    pub mean_ttft_ms: f64,
    pub mean_itl_ms: f64,
    /// The bare decode step at this batch size, without scheduling,
    /// sampling or prefills in between (ours only; see `Engine::time_decode_step`).
    #[serde(default)]
    pub decode_step_ms: Option<f64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Poisson arrivals into the running batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadResult {
    pub requests: usize,
    pub request_rate: f64,
    pub duration_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub end_to_end_ms: Percentiles,
    pub preemptions: u64,
}

/// Random prompts of `len` tokens (ids below `vocab`), seeded.
pub fn random_prompts(count: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Skip the lowest ids: small models keep their special tokens there.
    let low = 100.min(vocab as u32 / 2);
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(low..vocab as u32))
                .collect()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Submits `prompts` at once and runs them to completion.
fn run_together(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    output_len: usize,
    first_id: u64,
) -> Vec<RequestTimings> {
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Request::new(
                first_id + i as u64,
                p.clone(),
                SamplingParams::fixed_length(output_len),
            )
        })
        .collect();
    engine
        .generate_all(requests)
        .expect("benchmark requests fit the engine (checked by the caller)")
        .into_iter()
        .map(|(_, _, timings)| timings)
        .collect()
}

/// One full-length request, so that one-time costs (allocator growth,
/// kernel selection for each context length) stay out of the numbers. A
/// shorter warm-up left them in the first measured decode steps on the GPU.
/// Then the prompts of the largest batch, for two tokens each: their first
/// decodes take part of the token budget of a step, so prompts are cut
/// between steps, and the first chunk with a past before it (attention
/// under a mask) costs about 0.2 s once on an H100, which the first batch
/// measured used to pay.
pub fn warm_up(engine: &mut Engine, config: &BenchConfig) {
    let vocab = engine.model().config().vocab_size;
    let prompts = random_prompts(1, config.prompt_len, vocab, config.seed ^ 0xffff);
    run_together(engine, &prompts, config.output_len, 1_000_000);
    if let Some(&largest) = config.batch_sizes.iter().max() {
        let prompts = random_prompts(largest, config.prompt_len, vocab, config.seed ^ 0xfffe);
        run_together(engine, &prompts, 2, 1_100_000);
    }
}

/// How many single requests [`single_request`] runs, one after another: 5
/// on a GPU, 3 on a CPU (where each takes seconds). One request is too few:
/// on an H100 the same build's 512-token prefill, timed once per run, read
/// anywhere from 3.2 to 6.4 ms.
pub fn single_runs(engine: &Engine) -> usize {
    if engine.model().device().is_cuda() {
        5
    } else {
        3
    }
}

/// One request at a time, [`single_runs`] times: the medians of their
/// prefill time, mean time per output token and end-to-end time.
pub fn single_request(engine: &mut Engine, config: &BenchConfig) -> SingleResult {
    let vocab = engine.model().config().vocab_size;
    // A prompt each, so that no run finds another's blocks in the prefix cache.
    let prompts = random_prompts(single_runs(engine), config.prompt_len, vocab, config.seed);
    let runs: Vec<SingleResult> = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let id = 2_000_000 + i as u64;
            let timings =
                run_together(engine, std::slice::from_ref(prompt), config.output_len, id).remove(0);
            SingleResult {
                prefill_ms: timings.prefill_time.map_or(0.0, ms),
                decode_ms_per_token: mean(timings.inter_token.iter().map(|&d| ms(d))),
                end_to_end_ms: ms(timings.end_to_end),
            }
        })
        .collect();
    let median_of = |field: fn(&SingleResult) -> f64| {
        shared::stats::median(&runs.iter().map(field).collect::<Vec<_>>())
    };
    SingleResult {
        prefill_ms: median_of(|r| r.prefill_ms),
        decode_ms_per_token: median_of(|r| r.decode_ms_per_token),
        end_to_end_ms: median_of(|r| r.end_to_end_ms),
    }
}

pub fn batch(engine: &mut Engine, config: &BenchConfig, batch: usize) -> BatchResult {
    let vocab = engine.model().config().vocab_size;
    let prompts = random_prompts(batch, config.prompt_len, vocab, config.seed + batch as u64);
    let start = Instant::now();
    let timings = run_together(
        engine,
        &prompts,
        config.output_len,
        3_000_000 + 10_000 * batch as u64,
    );
    let wall = start.elapsed().as_secs_f64();
    let tokens: usize = timings.iter().map(|t| t.output_tokens).sum();
    BatchResult {
        batch,
        wall_s: wall,
        output_tokens_per_s: tokens as f64 / wall,
        mean_ttft_ms: mean(timings.iter().filter_map(|t| t.time_to_first_token).map(ms)),
        mean_itl_ms: mean(
            timings
                .iter()
                .flat_map(|t| t.inter_token.iter().map(|&d| ms(d))),
        ),
        decode_step_ms: bare_decode_step(engine, config, batch),
    }
}

/// The bare decode step of `batch` sequences at the middle of the
/// generation's context (20 runs), or `None` if it could not be run.
fn bare_decode_step(engine: &mut Engine, config: &BenchConfig, batch: usize) -> Option<f64> {
    let context = config.prompt_len + config.output_len / 2;
    let iters = if engine.model().device().is_cuda() {
        20
    } else {
        3
    };
    match engine.time_decode_step(batch, context, iters) {
        Ok(ms) => Some(ms),
        Err(err) => {
            tracing::warn!("could not time the bare decode step: {err}");
            None
        }
    }
}

/// Seconds after the start at which each request arrives (Poisson process).
pub fn poisson_arrivals(count: usize, rate: f64, seed: u64) -> Vec<f64> {
    if rate <= 0.0 {
        return vec![0.0; count];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..count)
        .map(|_| {
            // Exponential gaps with mean 1/rate.
            t += -(1.0 - rng.random::<f64>()).ln() / rate;
            t
        })
        .collect()
}

pub fn percentiles(values_ms: &[f64]) -> Percentiles {
    // 1 µs to 1 hour, 3 significant figures.
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
    for &v in values_ms {
        // Microsecond resolution.
        histogram.saturating_record((v * 1e3).round() as u64);
    }
    let q = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
    Percentiles {
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
    }
}

pub fn offered_load(
    engine: &mut Engine,
    config: &BenchConfig,
    progress: &ProgressBar,
) -> LoadResult {
    let vocab = engine.model().config().vocab_size;
    let prompts = random_prompts(
        config.num_requests,
        config.prompt_len,
        vocab,
        config.seed + 99,
    );
    let arrivals = poisson_arrivals(config.num_requests, config.request_rate, config.seed);
    let preemptions_before = engine.stats().preemptions;
    let start = Instant::now();
    let mut next = 0;
    let mut finished: Vec<RequestTimings> = Vec::new();
    while finished.len() < prompts.len() {
        let now = start.elapsed().as_secs_f64();
        while next < prompts.len() && arrivals[next] <= now {
            let request = Request::new(
                4_000_000 + next as u64,
                prompts[next].clone(),
                SamplingParams::fixed_length(config.output_len),
            );
            engine
                .add_request(request, None)
                .expect("benchmark requests fit the engine");
            next += 1;
        }
        if !engine.has_unfinished() {
            // Idle until the next arrival.
            let wait = arrivals[next] - start.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs_f64(wait.max(0.0)));
            continue;
        }
        for event in engine.step() {
            if let TokenEvent::Finished { metrics, .. } = event {
                finished.push(*metrics);
                progress.inc(1);
            }
        }
    }
    let duration = start.elapsed().as_secs_f64();
    let tokens: usize = finished.iter().map(|t| t.output_tokens).sum();
    let ttft: Vec<f64> = finished
        .iter()
        .filter_map(|t| t.time_to_first_token)
        .map(ms)
        .collect();
    let itl: Vec<f64> = finished
        .iter()
        .flat_map(|t| t.inter_token.iter().map(|&d| ms(d)))
        .collect();
    let e2e: Vec<f64> = finished.iter().map(|t| ms(t.end_to_end)).collect();
    LoadResult {
        requests: finished.len(),
        request_rate: config.request_rate,
        duration_s: duration,
        output_tokens_per_s: tokens as f64 / duration,
        ttft_ms: percentiles(&ttft),
        itl_ms: percentiles(&itl),
        end_to_end_ms: percentiles(&e2e),
        preemptions: engine.stats().preemptions - preemptions_before,
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<28} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_have_the_requested_rate() {
        let arrivals = poisson_arrivals(20_000, 50.0, 1);
        let rate = arrivals.len() as f64 / arrivals.last().unwrap();
        assert!((rate - 50.0).abs() < 2.0, "measured rate {rate}");
        assert!(arrivals.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(poisson_arrivals(3, 0.0, 1), vec![0.0; 3]);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let values: Vec<f64> = (1..=1000).map(|v| v as f64).collect();
        let p = percentiles(&values);
        assert!(
            (p.p50 - 500.0).abs() < 1.0 && (p.p99 - 990.0).abs() < 2.0,
            "{p:?}"
        );
    }

    #[test]
    fn random_prompts_are_seeded_and_in_range() {
        let a = random_prompts(3, 10, 500, 4);
        assert_eq!(a, random_prompts(3, 10, 500, 4));
        assert!(a.iter().flatten().all(|&t| (100..500).contains(&t)));
    }
}
