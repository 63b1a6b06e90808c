//! Turning bench results into a table, a JSON file and an SVG figure.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bench::{BatchResult, BenchConfig, LoadResult, SingleResult};
use shared::device::MemoryInterface;

/// Where and what was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub model: String,
    pub parameters: usize,
    pub device: String,
    /// GPU or CPU model name, so results say which machine they came from.
    pub device_name: String,
    pub dtype: String,
    /// How decode steps ran: `eager` or `cuda-graphs` (see `shared::engine::DecodeMode`).
    #[serde(default = "eager")]
    pub decode: String,
    /// Whether padded decode steps ran on the custom kernels of `shared::kernels`.
    #[serde(default)]
    pub fused_kernels: bool,
    /// With the fused kernels: the largest batch whose matrix products ran
    /// on the matrix-vector kernel (0: all on cuBLAS; absent in results
    /// from before that kernel).
    #[serde(default)]
    pub matvec_max_batch: Option<usize>,
    /// Whether those batches ran one persistent kernel per layer (false in
    /// results from before that kernel).
    #[serde(default)]
    pub layer_kernel: bool,
    /// The layer kernel's weight ring, where it ran ("6 slots of 33.0 KiB
    /// read by 3 groups of 5 warps"; absent in results from before the
    /// bench recorded it, just after fix 23 of chapter 1 made it vary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_ring: Option<String>,
    /// Whether each decode step was queued before the previous step's
    /// tokens were read (`EngineConfig::decode_ahead`; false in results
    /// from before it).
    #[serde(default)]
    pub decode_ahead: bool,
    pub kv_cache_blocks: usize,
    pub max_num_batched_tokens: usize,
    pub date: String,
}

/// Results saved before the decode mode was recorded ran eagerly.
fn eager() -> String {
    "eager".into()
}

/// The memory-bandwidth floor of a batch-1 decode step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Roofline {
    pub weight_bytes: usize,
    pub bandwidth_gb_per_s: f64,
    /// Where the bandwidth came from: `--mem-bandwidth-gbps`, or the GPU's
    /// memory interface as NVML reports it (empty in older result files).
    #[serde(default)]
    pub bandwidth_source: String,
    /// weight bytes / bandwidth: no decode step can be faster.
    pub floor_ms: f64,
    pub measured_ms: f64,
    /// measured / floor (1.0 would be perfect).
    pub ratio: f64,
}

/// The bandwidth a roofline is drawn at, and where the number came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RooflineBandwidth {
    pub gb_per_s: f64,
    pub source: String,
    /// Set where the number given cannot be this GPU's: above its peak (no
    /// kernel gets there), or below 3/4 of it (a streaming copy gets about
    /// 90 %, so that is likely another GPU's number). A roofline for another
    /// GPU makes every ratio against it wrong.
    pub warning: Option<String>,
}

impl RooflineBandwidth {
    /// `--mem-bandwidth-gbps` where given, else the peak of the GPU's
    /// memory interface (`gpu`, from NVML); `None` where neither is known
    /// (a CPU run without the flag draws no roofline).
    pub fn choose(flag: Option<f64>, gpu: Option<MemoryInterface>) -> Option<Self> {
        let describe =
            |m: MemoryInterface| format!("NVML: {}-bit bus at {} MHz", m.bus_bits, m.clock_mhz);
        match (flag, gpu) {
            (Some(gb_per_s), gpu) => Some(RooflineBandwidth {
                gb_per_s,
                source: "--mem-bandwidth-gbps".into(),
                warning: gpu.and_then(|m| {
                    let share = gb_per_s / m.peak_gb_per_s();
                    let why = if share > 1.01 {
                        "is above"
                    } else if share < 0.75 {
                        "is far below"
                    } else {
                        return None;
                    };
                    Some(format!(
                        "--mem-bandwidth-gbps {gb_per_s} {why} this GPU's peak ({:.0} GB/s, {}); \
                         is it another GPU's? Leave the flag out to use this one's",
                        m.peak_gb_per_s(),
                        describe(m)
                    ))
                }),
            }),
            (None, Some(m)) => Some(RooflineBandwidth {
                gb_per_s: m.peak_gb_per_s(),
                source: describe(m),
                warning: None,
            }),
            (None, None) => None,
        }
    }
}

/// The same measurements made by another implementation (see `peer.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerResult {
    pub name: String,
    pub single: SingleResult,
    pub batches: Vec<BatchResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub cpu_peak_rss_mb: f64,
    pub gpu_used_mb: Option<f64>,
    pub kv_pool_mb: f64,
}

/// How the engine's steps went over the whole run, warm-up included.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineSteps {
    /// Engine steps: prefill chunks, decodes, or both.
    pub steps: u64,
    /// Decode steps queued before the previous step's tokens were read, and
    /// used (see `shared::engine::Engine::step`).
    pub queued_ahead_used: u64,
    /// Decode steps queued ahead and then dropped: their sequence stopped.
    pub queued_ahead_dropped: u64,
}

/// Everything one `bench` run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub setup: Setup,
    pub config: BenchConfig,
    pub single: SingleResult,
    pub batches: Vec<BatchResult>,
    pub load: Option<LoadResult>,
    pub memory: Memory,
    /// Absent in results from before decode steps were queued ahead.
    #[serde(default)]
    pub engine_steps: Option<EngineSteps>,
    pub roofline: Option<Roofline>,
    /// Other implementations on the same workload, in the order asked for.
    #[serde(default)]
    pub peers: Vec<PeerResult>,
    /// The one peer of results saved before there could be several; read
    /// into `peers` by [`BenchReport::from_json`].
    #[serde(default, rename = "peer", skip_serializing)]
    pub legacy_peer: Option<PeerResult>,
}

impl BenchReport {
    /// Parses a saved result, older formats included.
    pub fn from_json(text: &str) -> serde_json::Result<BenchReport> {
        let mut report: BenchReport = serde_json::from_str(text)?;
        report.peers.extend(report.legacy_peer.take());
        Ok(report)
    }
}

/// Formats a measured number, or `#` when timings are redacted (snapshots).
fn num(value: f64, decimals: usize, redact: bool) -> String {
    if redact {
        "#".into()
    } else {
        format!("{value:.decimals$}")
    }
}

/// `ours` against `peer` for a quantity where higher is better.
fn ratio(ours: f64, peer: Option<f64>, higher_is_better: bool, redact: bool) -> String {
    match peer {
        Some(p) if p > 0.0 && ours > 0.0 => {
            let r = if higher_is_better { ours / p } else { p / ours };
            if redact {
                "#x".into()
            } else {
                format!("{r:.2}x")
            }
        }
        _ => "-".into(),
    }
}

/// The side-by-side table printed at the end of a run.
/// " on fused kernels (…)": what the setup says about the custom kernels.
fn fused_kernels_note(s: &Setup) -> String {
    if !s.fused_kernels {
        return String::new();
    }
    match s.matvec_max_batch {
        Some(n @ 1..) if s.layer_kernel => match &s.layer_ring {
            Some(ring) => format!(
                " on fused kernels (one persistent kernel per layer up to batch {n}, its weight ring {ring})"
            ),
            None => format!(" on fused kernels (one persistent kernel per layer up to batch {n})"),
        },
        Some(n @ 1..) => format!(" on fused kernels (matrix-vector products up to batch {n})"),
        _ => " on fused kernels".into(),
    }
}

pub fn render_table(report: &BenchReport, redact: bool) -> String {
    let s = &report.setup;
    let c = &report.config;
    let mut out = format!(
        "module01_baseline bench: {} ({:.0}M params) on {} [{}], {}, {} decode steps{}{}\n\
         prompt {} tokens, output {} tokens, KV pool {} blocks, token budget {}/step\n\n",
        s.model,
        s.parameters as f64 / 1e6,
        s.device,
        if redact { "#" } else { s.device_name.as_str() },
        s.dtype,
        s.decode,
        fused_kernels_note(s),
        if s.decode_ahead { ", queued ahead" } else { "" },
        c.prompt_len,
        c.output_len,
        if redact {
            "#".to_string()
        } else {
            s.kv_cache_blocks.to_string()
        },
        s.max_num_batched_tokens,
    );
    // One pair of columns per peer: its value, then ours against it.
    let peers: Vec<&PeerResult> = report.peers.iter().collect();
    out += &format!("{:<34}{:>14}", "metric", "ours");
    for p in &peers {
        out += &format!("{:>14}{:>12}", p.name, "ours vs it");
    }
    if peers.is_empty() {
        out += &format!("{:>14}{:>12}", "peer", "ours vs it");
    }
    out += "\n";
    let mut row =
        |label: String, ours: f64, theirs: &[Option<f64>], decimals: usize, higher: bool| {
            out += &format!("{:<34}{:>14}", label, num(ours, decimals, redact));
            let none = [None];
            let theirs = if theirs.is_empty() { &none[..] } else { theirs };
            for &t in theirs {
                out += &format!(
                    "{:>14}{:>12}",
                    t.map_or("-".into(), |t| num(t, decimals, redact)),
                    ratio(ours, t, higher, redact),
                );
            }
            out += "\n";
        };
    let each = |f: &dyn Fn(&PeerResult) -> Option<f64>| -> Vec<Option<f64>> {
        peers.iter().map(|p| f(p)).collect()
    };
    row(
        "single: prefill (ms)".into(),
        report.single.prefill_ms,
        &each(&|p| Some(p.single.prefill_ms)),
        1,
        false,
    );
    row(
        "single: decode (ms/token)".into(),
        report.single.decode_ms_per_token,
        &each(&|p| Some(p.single.decode_ms_per_token)),
        2,
        false,
    );
    for b in &report.batches {
        let theirs = |f: fn(&BatchResult) -> f64| {
            each(&|p: &PeerResult| p.batches.iter().find(|x| x.batch == b.batch).map(f))
        };
        row(
            format!("batch {:>3}: output tokens/s", b.batch),
            b.output_tokens_per_s,
            &theirs(|t| t.output_tokens_per_s),
            1,
            true,
        );
        row(
            format!("batch {:>3}: mean ITL (ms)", b.batch),
            b.mean_itl_ms,
            &theirs(|t| t.mean_itl_ms),
            2,
            false,
        );
        if let Some(step) = b.decode_step_ms {
            row(
                format!("batch {:>3}: bare decode step (ms)", b.batch),
                step,
                &[],
                2,
                false,
            );
        }
    }
    if let Some(l) = &report.load {
        out += &format!(
            "\noffered load: {} requests at {} req/s (ours)\n",
            l.requests, l.request_rate
        );
        out += &format!(
            "{:<34}{:>14}\n",
            "output tokens/s",
            num(l.output_tokens_per_s, 1, redact)
        );
        out += &format!("{:<34}{:>14}{:>14}{:>14}\n", "", "p50", "p90", "p99");
        for (name, p) in [
            ("TTFT", l.ttft_ms),
            ("ITL", l.itl_ms),
            ("end-to-end", l.end_to_end_ms),
        ] {
            out += &format!(
                "{:<34}{:>14}{:>14}{:>14}\n",
                format!("{name} (ms)"),
                num(p.p50, 1, redact),
                num(p.p90, 1, redact),
                num(p.p99, 1, redact)
            );
        }
        out += &format!(
            "{:<34}{:>14}\n",
            "preemptions",
            if redact {
                "#".into()
            } else {
                l.preemptions.to_string()
            }
        );
    }
    let m = &report.memory;
    out += &format!(
        "\nmemory: peak RSS {} MB, GPU in use {} MB, KV pool {} MB\n",
        num(m.cpu_peak_rss_mb, 0, redact),
        m.gpu_used_mb.map_or("n/a".into(), |g| num(g, 0, redact)),
        num(m.kv_pool_mb, 0, redact),
    );
    if let Some(e) = report
        .engine_steps
        .as_ref()
        .filter(|_| report.setup.decode_ahead)
    {
        out += &format!(
            "engine steps: {}; decode steps queued ahead: {} used, {} dropped\n",
            num(e.steps as f64, 0, redact),
            num(e.queued_ahead_used as f64, 0, redact),
            num(e.queued_ahead_dropped as f64, 0, redact),
        );
    }
    if let Some(r) = &report.roofline {
        out += &format!(
            "roofline: batch-1 decode reads {} MB of weights; at {} GB/s{} the floor is {} ms; measured {} ms = {}x the floor\n",
            num(r.weight_bytes as f64 / 1e6, 0, redact),
            num(r.bandwidth_gb_per_s, 0, redact),
            if r.bandwidth_source.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.bandwidth_source)
            },
            num(r.floor_ms, 3, redact),
            num(r.measured_ms, 3, redact),
            num(r.ratio, 2, redact),
        );
    }
    out
}

pub fn write_json(report: &BenchReport, path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(report).expect("report serialises") + "\n",
    )
}

/// Two panels: throughput against batch size (ours and the peers), and the
/// single-request latency split into prefill and decode.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(560);

    let max_batch = report.batches.iter().map(|b| b.batch).max().unwrap_or(1) as f64;
    let max_tps = report
        .batches
        .iter()
        .chain(report.peers.iter().flat_map(|p| &p.batches))
        .map(|b| b.output_tokens_per_s)
        .fold(1.0, f64::max);
    let title = format!(
        "throughput vs batch size ({}, {})",
        report.setup.device, report.setup.dtype
    );
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_batch * 1.05, 0.0..max_tps * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("batch size")
        .y_desc("output tokens/s")
        .draw()?;
    let ours: Vec<(f64, f64)> = report
        .batches
        .iter()
        .map(|b| (b.batch as f64, b.output_tokens_per_s))
        .collect();
    chart
        .draw_series(LineSeries::new(ours.clone(), BLUE.stroke_width(2)))?
        .label("spark-disagg engine")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.draw_series(ours.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    let peer_colors = [RED, GREEN, MAGENTA, CYAN];
    for (peer, &color) in report.peers.iter().zip(peer_colors.iter().cycle()) {
        let theirs: Vec<(f64, f64)> = peer
            .batches
            .iter()
            .map(|b| (b.batch as f64, b.output_tokens_per_s))
            .collect();
        chart
            .draw_series(LineSeries::new(theirs.clone(), color.stroke_width(2)))?
            .label(peer.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(theirs.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // Single request: prefill + decode stacked, ours and peer.
    let decode_total = |s: &SingleResult| {
        s.decode_ms_per_token * (report.config.output_len.saturating_sub(1)) as f64
    };
    let mut bars = vec![(
        "ours".to_string(),
        report.single.prefill_ms,
        decode_total(&report.single),
    )];
    for peer in &report.peers {
        bars.push((
            peer.name.clone(),
            peer.single.prefill_ms,
            decode_total(&peer.single),
        ));
    }
    let max_ms = bars.iter().map(|(_, p, d)| p + d).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("one request: prefill + decode (ms)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..bars.len() as f64, 0.0..max_ms * 1.15)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ms")
        .draw()?;
    for (i, (_, prefill, decode)) in bars.iter().enumerate() {
        let x0 = i as f64 + 0.2;
        let x1 = i as f64 + 0.8;
        chart.draw_series([Rectangle::new([(x0, 0.0), (x1, *prefill)], GREEN.filled())])?;
        chart.draw_series([Rectangle::new(
            [(x0, *prefill), (x1, prefill + decode)],
            BLUE.mix(0.5).filled(),
        )])?;
    }
    chart
        .draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], GREEN.filled())])?
        .label("prefill")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], GREEN.filled()));
    chart
        .draw_series([Rectangle::new(
            [(0.0, 0.0), (0.0, 0.0)],
            BLUE.mix(0.5).filled(),
        )])?
        .label("decode")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], BLUE.mix(0.5).filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
