//! What the frontend counts, in Prometheus' text format at `GET /metrics`.
//!
//! Latencies are histograms (Prometheus computes percentiles from the
//! buckets across any window); counts are counters; what is true *now* —
//! requests in flight, a worker's cache hit ratio — is a gauge.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Every metric the frontend exports.
pub struct Metrics {
    registry: Registry,
    /// By endpoint and HTTP status.
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// Requests accepted and not finished.
    pub in_flight: IntGauge,
    /// By place: remote, local_short_prompt, …
    pub prefill_place: IntCounterVec,
    pub kv_transfer_bytes: IntCounterVec,
    /// Exposed KV transfer time per remote prefill, by decode worker.
    pub kv_transfer_seconds: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub cached_prompt_tokens: IntCounterVec,
    /// Cached / prompt tokens per worker since the frontend started.
    pub cache_hit_ratio: GaugeVec,
    pub output_tokens: IntCounterVec,
    pub workers: GaugeVec,
    /// Requests the router sent to a worker that have not finished: each
    /// worker's queue depth (running and waiting), by worker and role.
    pub worker_active_requests: GaugeVec,
    /// Blocks the router's prefix index says a worker holds.
    pub worker_indexed_blocks: GaugeVec,
    pub up_seconds: Gauge,
}

/// Buckets from 1 ms to about 65 s, doubling.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 17).expect("valid buckets")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("spark".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let in_flight = IntGauge::new("requests_in_flight", "Requests accepted and not finished")
            .expect("valid metric");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("unique metric");
        let kv_transfer_seconds = HistogramVec::new(
            HistogramOpts::new(
                "kv_transfer_seconds",
                "KV transfer time not hidden behind prefill, per remote prefill",
            )
            .buckets(latency_buckets()),
            &["decode_worker"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(kv_transfer_seconds.clone()))
            .expect("unique metric");
        let up_seconds =
            Gauge::new("frontend_up_seconds", "Seconds since the frontend started").expect("valid");
        registry
            .register(Box::new(up_seconds.clone()))
            .expect("unique metric");
        Metrics {
            requests: counter(
                "requests_total",
                "HTTP requests by endpoint and status",
                &["endpoint", "status"],
            ),
            ttft: histogram(
                "time_to_first_token_seconds",
                "Request received → first token sent",
            ),
            itl: histogram(
                "inter_token_latency_seconds",
                "Gap between consecutive tokens",
            ),
            e2e: histogram(
                "request_duration_seconds",
                "Request received → last token sent",
            ),
            in_flight,
            prefill_place: counter(
                "prefill_total",
                "Where prefills ran: remote, or local and why",
                &["place"],
            ),
            kv_transfer_bytes: counter(
                "kv_transfer_bytes_total",
                "KV bytes moved from prefill to decode workers",
                &["decode_worker"],
            ),
            kv_transfer_seconds,
            prompt_tokens: counter(
                "prompt_tokens_total",
                "Prompt tokens by worker",
                &["worker"],
            ),
            cached_prompt_tokens: counter(
                "cached_prompt_tokens_total",
                "Prompt tokens served from a worker's prefix cache",
                &["worker"],
            ),
            cache_hit_ratio: gauge_vec(
                "prefix_cache_hit_ratio",
                "Cached / prompt tokens per worker since the frontend started",
                &["worker"],
            ),
            output_tokens: counter(
                "output_tokens_total",
                "Generated tokens by worker",
                &["worker"],
            ),
            workers: gauge_vec("workers", "Workers the router knows, by role", &["role"]),
            worker_active_requests: gauge_vec(
                "worker_active_requests",
                "Requests routed to a worker and not finished (its queue depth)",
                &["worker", "role"],
            ),
            worker_indexed_blocks: gauge_vec(
                "worker_indexed_blocks",
                "KV blocks the router's prefix index says a worker holds",
                &["worker"],
            ),
            up_seconds,
            registry,
        }
    }

    /// Counts one finished request's tokens for `worker`. `cached` is
    /// `None` when the worker never reported it (a stop string ended the
    /// request first): its prompt then stays out of the hit ratio too.
    pub fn record_tokens(&self, worker: &str, prompt: usize, cached: Option<usize>, output: usize) {
        self.output_tokens
            .with_label_values(&[worker])
            .inc_by(output as u64);
        let Some(cached) = cached else { return };
        let p = self.prompt_tokens.with_label_values(&[worker]);
        let c = self.cached_prompt_tokens.with_label_values(&[worker]);
        p.inc_by(prompt as u64);
        c.inc_by(cached as u64);
        self.cache_hit_ratio
            .with_label_values(&[worker])
            .set(c.get() as f64 / p.get().max(1) as f64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of valid metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
