//! Several saved bench runs of one workload, side by side: what each fix
//! bought, run by run, against the roofline and a peer.
//!
//! A bench result (`bench --json`) answers "how fast is this build on this
//! machine". Performance work asks a second question: how did the numbers
//! move from build to build? Each run was taken on whichever machine of a
//! pool was free, so a history also shows what moves with the machine (the
//! peers, the prefill) and what moves with the code (the decode step).
//! [`History`] reads the runs in the order given, checks that they measured
//! the same workload, and prints one row per run; [`write_svg`] draws the
//! batch-1 step against the floor, and the speed-ups against the peer,
//! with the course's targets as lines.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use thiserror::Error;

use crate::bench::BatchResult;
use crate::report::{BenchReport, PeerResult};

/// The course's targets for a GPU's decode (issue 11): a batch-1 step
/// within this many times the memory-bandwidth floor...
pub const TARGET_FLOOR_RATIO: f64 = 1.5;
/// ...this many times faster than the peer per decoded token at batch 1...
pub const TARGET_VS_PEER_BATCH_1: f64 = 20.0;
/// ...and this many times the peer's output tokens/s at the largest batch.
pub const TARGET_VS_PEER_LARGEST_BATCH: f64 = 25.0;

/// One saved run and the name its row goes by.
#[derive(Debug, Clone)]
pub struct HistoryRun {
    pub label: String,
    pub path: PathBuf,
    pub report: BenchReport,
}

/// Runs of one workload in the order they are shown.
#[derive(Debug, Clone)]
pub struct History {
    pub runs: Vec<HistoryRun>,
    /// Memory bandwidth (GB/s) for every run's floor; `None`: each run's own
    /// roofline, as its bench recorded it.
    pub bandwidth_gb_per_s: Option<f64>,
    /// The peer the speed-ups are taken against (`hf-generate`).
    pub peer: String,
}

#[derive(Debug, Error, PartialEq)]
pub enum HistoryError {
    #[error("a history needs at least one bench result (a JSON file written by `bench --json`)")]
    NoRuns,
    #[error(
        "{path} measured {what} {this:?}, the first run {first:?}: a history compares runs of one \
         workload on one kind of GPU; give it those runs only"
    )]
    DifferentWorkload {
        path: String,
        what: &'static str,
        this: String,
        first: String,
    },
    #[error("--mem-bandwidth-gbps must be a positive number of GB/s, not {0}")]
    BadBandwidth(f64),
    #[error(
        "reading {path}: {reason} (give a bench result written by `bench --json`, or LABEL=PATH)"
    )]
    Unreadable { path: String, reason: String },
    #[error("{path} is not a module01 bench result ({reason}); `bench --json` writes one")]
    NotABenchResult { path: String, reason: String },
}

impl HistoryRun {
    /// Reads a saved bench result (`bench --json`) at `base`/`path`; the
    /// run keeps `path` as given, for its messages.
    pub fn read(label: String, base: &Path, path: PathBuf) -> Result<HistoryRun, HistoryError> {
        let shown = || path.display().to_string();
        let text =
            std::fs::read_to_string(base.join(&path)).map_err(|e| HistoryError::Unreadable {
                path: shown(),
                reason: e.to_string(),
            })?;
        let report = BenchReport::from_json(&text).map_err(|e| HistoryError::NotABenchResult {
            path: shown(),
            reason: e.to_string(),
        })?;
        Ok(HistoryRun {
            label,
            path,
            report,
        })
    }
}

/// The runs a command line names (`PATH`, or `LABEL=PATH` to name its
/// row), read in order from `base`; an unnamed run goes by its file name
/// less what all of them share ([`default_labels`]).
pub fn read_runs(args: &[String], base: &Path) -> Result<Vec<HistoryRun>, HistoryError> {
    let parsed: Vec<(Option<String>, PathBuf)> =
        args.iter().map(|arg| parse_run_arg(arg, base)).collect();
    let paths: Vec<PathBuf> = parsed.iter().map(|(_, path)| path.clone()).collect();
    parsed
        .into_iter()
        .zip(default_labels(&paths))
        .map(|((label, path), default)| HistoryRun::read(label.unwrap_or(default), base, path))
        .collect()
}

/// What a run is compared on: a difference in any of these makes two runs
/// different experiments, not two builds.
fn workload(report: &BenchReport) -> [(&'static str, String); 5] {
    let s = &report.setup;
    let c = &report.config;
    [
        ("model", s.model.clone()),
        ("dtype", s.dtype.clone()),
        ("device", s.device_name.clone()),
        ("prompt length", c.prompt_len.to_string()),
        ("output length", c.output_len.to_string()),
    ]
}

impl History {
    pub fn new(
        runs: Vec<HistoryRun>,
        bandwidth_gb_per_s: Option<f64>,
        peer: &str,
    ) -> Result<History, HistoryError> {
        let first = runs.first().ok_or(HistoryError::NoRuns)?;
        if let Some(bw) = bandwidth_gb_per_s.filter(|bw| !bw.is_finite() || *bw <= 0.0) {
            return Err(HistoryError::BadBandwidth(bw));
        }
        let expected = workload(&first.report);
        for run in &runs[1..] {
            for ((what, this), (_, first)) in workload(&run.report).into_iter().zip(&expected) {
                if &this != first {
                    return Err(HistoryError::DifferentWorkload {
                        path: run.path.display().to_string(),
                        what,
                        this,
                        first: first.clone(),
                    });
                }
            }
        }
        Ok(History {
            runs,
            bandwidth_gb_per_s,
            peer: peer.to_string(),
        })
    }

    /// The batch sizes of the columns: the first run's sweep.
    pub fn batches(&self) -> Vec<usize> {
        self.runs[0].report.config.batch_sizes.clone()
    }

    /// The floor of a batch-1 step for this run (ms): its weight bytes at
    /// the history's bandwidth, or its own roofline's.
    pub fn floor_ms(&self, run: &HistoryRun) -> Option<f64> {
        let roofline = run.report.roofline.as_ref()?;
        Some(match self.bandwidth_gb_per_s {
            Some(bw) => roofline.weight_bytes as f64 / (bw * 1e9) * 1e3,
            None => roofline.floor_ms,
        })
    }

    fn peer_of<'a>(&self, run: &'a HistoryRun) -> Option<&'a PeerResult> {
        run.report.peers.iter().find(|p| p.name == self.peer)
    }

    /// The peer's decode time per token over ours, one request alone.
    pub fn speedup_batch_1(&self, run: &HistoryRun) -> Option<f64> {
        let ours = run.report.single.decode_ms_per_token;
        let theirs = self.peer_of(run)?.single.decode_ms_per_token;
        (ours > 0.0).then(|| theirs / ours)
    }

    /// Our output tokens/s over the peer's at one batch size.
    pub fn speedup_at(&self, run: &HistoryRun, batch: usize) -> Option<f64> {
        let ours = served(run, batch)?;
        let theirs = self
            .peer_of(run)?
            .batches
            .iter()
            .find(|b| b.batch == batch)?
            .output_tokens_per_s;
        (theirs > 0.0).then(|| ours / theirs)
    }
}

/// This run's result at one batch size, where it ran that batch.
fn batch_result(run: &HistoryRun, batch: usize) -> Option<&BatchResult> {
    run.report.batches.iter().find(|b| b.batch == batch)
}

fn served(run: &HistoryRun, batch: usize) -> Option<f64> {
    batch_result(run, batch).map(|b| b.output_tokens_per_s)
}

fn bare_step_ms(run: &HistoryRun, batch: usize) -> Option<f64> {
    batch_result(run, batch)?.decode_step_ms
}

/// The file name a run goes by when no label is given: its stem without
/// the part every run's stem shares (`tinyllama-1.1b_h100_fix8.json` among
/// its siblings is `fix8`), or the whole stem where nothing is left.
pub fn default_labels(paths: &[PathBuf]) -> Vec<String> {
    let stems: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
        })
        .collect();
    let mut shared = stems.first().cloned().unwrap_or_default();
    for stem in stems.iter().skip(1) {
        let common = shared
            .chars()
            .zip(stem.chars())
            .take_while(|(a, b)| a == b)
            .count();
        shared = shared.chars().take(common).collect();
    }
    // Keep the shared part whole only where it ends at a word boundary in
    // every stem (so that `fix20a`, `fix20b` stay whole); else cut it back
    // to its last underscore.
    let at_boundary = stems
        .iter()
        .all(|s| s.len() == shared.len() || s[shared.len()..].starts_with('_'));
    if !at_boundary {
        shared.truncate(shared.rfind('_').map_or(0, |i| i + 1));
    }
    stems
        .iter()
        .map(|stem| {
            let rest = stem[shared.len()..].trim_start_matches('_');
            if rest.is_empty() {
                stem.clone()
            } else {
                rest.to_string()
            }
        })
        .collect()
}

/// A command-line run: `PATH`, or `LABEL=PATH` to name its row (unless a
/// file of that whole name exists under `base`).
pub fn parse_run_arg(arg: &str, base: &Path) -> (Option<String>, PathBuf) {
    if base.join(arg).exists() {
        return (None, PathBuf::from(arg));
    }
    match arg.split_once('=') {
        Some((label, path)) if !label.is_empty() && !label.contains('/') => {
            (Some(label.to_string()), PathBuf::from(path))
        }
        _ => (None, PathBuf::from(arg)),
    }
}

fn cell(value: Option<f64>, decimals: usize, suffix: &str) -> String {
    value.map_or("-".into(), |v| format!("{v:.decimals$}{suffix}"))
}

/// One row per run: the batch-1 decode against the floor, the bare step
/// and the served tokens/s at each batch, the prefill, and the peer.
pub fn render_table(history: &History) -> String {
    let batches = history.batches();
    let first = &history.runs[0].report;
    let s = &first.setup;
    let largest = batches.iter().copied().max().unwrap_or(1);
    let mut out = format!(
        "module01_baseline history: {} on {}, {}, prompt {} tokens, output {} tokens; {} runs, in the order given\n\n",
        s.model,
        s.device_name,
        s.dtype,
        first.config.prompt_len,
        first.config.output_len,
        history.runs.len(),
    );
    let width = 8 * batches.len();
    // The run column fits the longest label (a default one may be a whole
    // file name).
    let lw = history
        .runs
        .iter()
        .map(|r| r.label.chars().count() + 1)
        .fold(12, usize::max);
    let versus = format!("ours vs {}", history.peer);
    out += &format!(
        "{:<lw$}{:<12}{:>9}{:>8}  {:<w$}  {:<w$}  {:>8}{:>12}{:>20}\n",
        "",
        "",
        "decode",
        "x the",
        "bare decode step (ms)",
        "served tokens/s",
        "prefill",
        history.peer,
        versus,
        w = width,
    );
    let batch_heads: String = batches.iter().map(|b| format!("{b:>8}")).collect();
    out += &format!(
        "{:<lw$}{:<12}{:>9}{:>8}  {:<w$}  {:<w$}  {:>8}{:>12}{:>10}{:>10}\n",
        "run",
        "date",
        "ms/token",
        "floor",
        batch_heads,
        batch_heads,
        "ms",
        "ms/token",
        "batch 1",
        format!("batch {largest}"),
        w = width,
    );
    for run in &history.runs {
        let r = &run.report;
        let decode = r.single.decode_ms_per_token;
        let floor_ratio = history.floor_ms(run).map(|f| decode / f);
        let bare: String = batches
            .iter()
            .map(|&b| format!("{:>8}", cell(bare_step_ms(run, b), 2, "")))
            .collect();
        let tokens: String = batches
            .iter()
            .map(|&b| format!("{:>8}", cell(served(run, b), 0, "")))
            .collect();
        out += &format!(
            "{:<lw$}{:<12}{:>9.3}{:>8}  {:<w$}  {:<w$}  {:>8.1}{:>12}{:>10}{:>10}\n",
            run.label,
            r.setup.date,
            decode,
            cell(floor_ratio, 2, "x"),
            bare,
            tokens,
            r.single.prefill_ms,
            cell(
                history.peer_of(run).map(|p| p.single.decode_ms_per_token),
                1,
                ""
            ),
            cell(history.speedup_batch_1(run), 1, "x"),
            cell(history.speedup_at(run, largest), 1, "x"),
            w = width,
        );
    }
    out += "\ndecode: one request alone, ms per token after the prefill; bare decode step: the step alone, no scheduling; \
            served: output tokens/s of a batch served to the end; -: not in that run\n";
    match history.bandwidth_gb_per_s {
        Some(bw) => {
            let floor = history.floor_ms(&history.runs[0]);
            out += &format!(
                "the floor: the weights read once at {bw:.0} GB/s ({} ms), for every run\n",
                cell(floor, 3, "")
            )
        }
        None => {
            out += "the floor: the weights read once at the bandwidth each run's bench recorded\n"
        }
    }
    out += &format!(
        "ours vs {}: its decode ms/token over ours at batch 1, our output tokens/s over its at batch {largest}; \
         the targets: {TARGET_FLOOR_RATIO}x the floor, {TARGET_VS_PEER_BATCH_1}x and {TARGET_VS_PEER_LARGEST_BATCH}x\n",
        history.peer,
    );
    out
}

/// A run's row in the figures: the first given at the top.
fn row_y(runs: usize, i: usize) -> f64 {
    (runs - i) as f64 - 0.5
}

/// Short lines and names under a chart, left to right, in place of a legend
/// box that would cover points.
fn draw_key<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, ShapeStyle)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (mut x, y) = (60, 12);
    for (name, style) in entries {
        area.draw(&PathElement::new(vec![(x, y), (x + 24, y)], *style))?;
        area.draw(&Text::new(
            name.clone(),
            (x + 30, y - 6),
            ("sans-serif", 12),
        ))?;
        x += 44 + 7 * name.len() as i32;
    }
    Ok(())
}

/// Two panels with a row per run: the batch-1 decode (ms/token, on a log
/// scale, from eager steps down to the floor) with the floor and the
/// target, and the speed-ups against the peer with their targets.
pub fn write_svg(history: &History, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let n = history.runs.len();
    let labels: Vec<String> = history.runs.iter().map(|r| r.label.clone()).collect();
    let largest = history.batches().into_iter().max().unwrap_or(1);
    let height = 130 + 22 * n as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let (left, left_key) = left.split_vertically(height - 30);
    let (right, right_key) = right.split_vertically(height - 30);
    // The formatter names the run whose row a tick sits in the middle of.
    let label_of = |y: &f64| {
        let row = y.floor();
        let i = n as f64 - 1.0 - row;
        if (y - row - 0.5).abs() < 0.26 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let points = |f: &dyn Fn(&HistoryRun) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| f(r).map(|v| (v, row_y(n, i))))
            .collect()
    };
    let vertical = |x: f64| [(x, 0.0), (x, n as f64)];

    let decode = points(&|r| Some(r.report.single.decode_ms_per_token));
    let floor = history.floor_ms(&history.runs[0]);
    let values = || decode.iter().map(|p| p.0).chain(floor);
    let low = values().fold(f64::INFINITY, f64::min).max(1e-3);
    let high = values()
        .chain(floor.map(|f| f * TARGET_FLOOR_RATIO))
        .fold(low, f64::max);
    let mut chart = ChartBuilder::on(&left)
        .caption("batch 1: decode ms per token", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(90)
        .build_cartesian_2d(
            (low * 0.8..high * 1.25).log_scale().base(2.0),
            0.0..n as f64,
        )?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|x| {
            let decimals = if *x < 1.0 { 2 } else { 0 };
            format!("{x:.decimals$}")
        })
        .y_labels(n * 2 + 1)
        .y_label_formatter(&label_of)
        .x_desc("ms/token (log scale); dashed: the target")
        .draw()?;
    let ours = BLUE.stroke_width(2);
    chart.draw_series(LineSeries::new(decode.clone(), ours))?;
    chart.draw_series(decode.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
    let mut key = vec![("ours".to_string(), ours)];
    // The floor is drawn for the first run's weights: a history has one model.
    if let Some(floor) = floor {
        let target = RED.stroke_width(1);
        chart.draw_series(LineSeries::new(vertical(floor), BLACK.stroke_width(1)))?;
        chart.draw_series(DashedLineSeries::new(
            vertical(floor * TARGET_FLOOR_RATIO),
            6,
            4,
            target,
        ))?;
        key.push((format!("the floor ({floor:.3} ms)"), BLACK.stroke_width(1)));
        key.push((format!("target: {TARGET_FLOOR_RATIO}x the floor"), target));
    }
    draw_key(&left_key, &key)?;

    let batch_1 = points(&|r| history.speedup_batch_1(r));
    let largest_batch = points(&|r| history.speedup_at(r, largest));
    let high = batch_1
        .iter()
        .chain(&largest_batch)
        .map(|p| p.0)
        .chain([TARGET_VS_PEER_BATCH_1, TARGET_VS_PEER_LARGEST_BATCH])
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("ours against {} (times faster)", history.peer),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..high * 1.1, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .y_labels(n * 2 + 1)
        .y_label_formatter(&label_of)
        .x_desc("dashed: the targets")
        .draw()?;
    let mut key = Vec::new();
    for (points, name, target, colour) in [
        (
            batch_1,
            "batch 1, ms/token".to_string(),
            TARGET_VS_PEER_BATCH_1,
            BLUE,
        ),
        (
            largest_batch,
            format!("batch {largest}, tokens/s"),
            TARGET_VS_PEER_LARGEST_BATCH,
            GREEN,
        ),
    ] {
        chart.draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        chart.draw_series(DashedLineSeries::new(
            vertical(target),
            6,
            4,
            colour.stroke_width(1),
        ))?;
        key.push((format!("{name} (target {target}x)"), colour.stroke_width(2)));
    }
    draw_key(&right_key, &key)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../results/h100")
    }

    fn committed(name: &str) -> HistoryRun {
        HistoryRun::read(name.into(), &results(), PathBuf::from(name)).unwrap()
    }

    #[test]
    fn labels_are_the_file_names_less_what_they_share() {
        let paths = |names: &[&str]| -> Vec<PathBuf> {
            names
                .iter()
                .map(|n| PathBuf::from(format!("results/h100/{n}.json")))
                .collect()
        };
        assert_eq!(
            default_labels(&paths(&[
                "tinyllama-1.1b_h100_fix8",
                "tinyllama-1.1b_h100_fix20a",
                "tinyllama-1.1b_h100_fix20b",
            ])),
            ["fix8", "fix20a", "fix20b"]
        );
        // Cut at a word: `fix20a` and `fix20b` alone keep their names.
        assert_eq!(
            default_labels(&paths(&[
                "tinyllama-1.1b_h100_fix20a",
                "tinyllama-1.1b_h100_fix20b"
            ])),
            ["fix20a", "fix20b"]
        );
        // A stem that is all shared part keeps its whole name.
        assert_eq!(
            default_labels(&paths(&[
                "tinyllama-1.1b_h100_fix23",
                "tinyllama-1.1b_h100"
            ])),
            ["fix23", "tinyllama-1.1b_h100"]
        );
        assert_eq!(default_labels(&paths(&["one_run"])), ["one_run"]);
    }

    #[test]
    fn a_label_is_what_comes_before_the_equals_sign_unless_the_file_exists() {
        let here = Path::new(".");
        assert_eq!(
            parse_run_arg("fix26=results/h100/none-such.json", here),
            (
                Some("fix26".to_string()),
                PathBuf::from("results/h100/none-such.json")
            )
        );
        assert_eq!(
            parse_run_arg("results/a=b.json", here),
            (None, PathBuf::from("results/a=b.json")),
            "a path with a slash before the equals sign is a path"
        );
        let dir = std::env::temp_dir().join(format!("history-label-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("x=y.json");
        std::fs::write(&odd, "{}").unwrap();
        let arg = odd.display().to_string();
        assert_eq!(parse_run_arg(&arg, here), (None, odd.clone()));
        assert_eq!(
            parse_run_arg("x=y.json", &dir),
            (None, PathBuf::from("x=y.json")),
            "looked for under the base the runs are read from"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runs_are_read_in_order_and_bad_files_named() {
        let args = [
            "tinyllama-1.1b_h100_fix23.json".to_string(),
            "now=tinyllama-1.1b_h100.json".to_string(),
        ];
        let runs = read_runs(&args, &results()).unwrap();
        let labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["fix23", "now"]);
        assert_eq!(runs[1].path, PathBuf::from("tinyllama-1.1b_h100.json"));
        let missing = read_runs(&["none-such.json".to_string()], &results()).unwrap_err();
        assert!(
            matches!(&missing, HistoryError::Unreadable { path, .. } if path == "none-such.json"),
            "{missing}"
        );
        let not_bench = read_runs(
            &["module01_timeline_smollm2-135m.json".to_string()],
            &results(),
        )
        .unwrap_err();
        assert!(
            matches!(&not_bench, HistoryError::NotABenchResult { .. }),
            "{not_bench}"
        );
    }

    #[test]
    fn runs_of_another_workload_are_refused_with_the_field_named() {
        assert_eq!(
            History::new(vec![], None, "hf-generate").unwrap_err(),
            HistoryError::NoRuns
        );
        let run = committed("tinyllama-1.1b_h100_fix23.json");
        let mut longer = committed("tinyllama-1.1b_h100.json");
        longer.report.config.prompt_len = 2046;
        let err = History::new(vec![run.clone(), longer], None, "hf-generate").unwrap_err();
        assert!(
            matches!(&err, HistoryError::DifferentWorkload { what: "prompt length", this, first, .. }
                if this == "2046" && first == "512"),
            "{err}"
        );
        let mut other_gpu = committed("tinyllama-1.1b_h100.json");
        other_gpu.report.setup.device_name = "NVIDIA H200".into();
        let err = History::new(vec![run.clone(), other_gpu], None, "hf-generate").unwrap_err();
        assert!(err.to_string().contains("device"), "{err}");
        for bad in [0.0, -3350.0, f64::NAN] {
            assert!(matches!(
                History::new(vec![run.clone()], Some(bad), "hf-generate"),
                Err(HistoryError::BadBandwidth(_))
            ));
        }
    }

    #[test]
    fn floors_and_speedups_come_from_each_run() {
        let fix21 = committed("tinyllama-1.1b_h100_fix21_again.json");
        // That run's bench was given an H200's bandwidth; the history can
        // put every run on one floor instead.
        let own = History::new(vec![fix21.clone()], None, "hf-generate").unwrap();
        let r = fix21.report.roofline.as_ref().unwrap();
        assert_eq!(own.floor_ms(&fix21), Some(r.floor_ms));
        let h100 = History::new(vec![fix21.clone()], Some(3350.0), "hf-generate").unwrap();
        let floor = h100.floor_ms(&fix21).unwrap();
        assert!((floor - r.weight_bytes as f64 / 3.35e12 * 1e3).abs() < 1e-12);
        assert!(
            floor > r.floor_ms,
            "3350 GB/s is slower than the 4800 it recorded"
        );

        let peer = &fix21.report.peers[0];
        assert_eq!(peer.name, "hf-generate");
        let batch_1 = h100.speedup_batch_1(&fix21).unwrap();
        assert_eq!(
            batch_1,
            peer.single.decode_ms_per_token / fix21.report.single.decode_ms_per_token
        );
        let theirs = peer.batches.iter().find(|b| b.batch == 128).unwrap();
        let ours = fix21
            .report
            .batches
            .iter()
            .find(|b| b.batch == 128)
            .unwrap();
        assert_eq!(
            h100.speedup_at(&fix21, 128),
            Some(ours.output_tokens_per_s / theirs.output_tokens_per_s)
        );
        assert_eq!(h100.speedup_at(&fix21, 7), None, "no batch of 7 was run");
        // A peer the run did not have: no speed-up, and a dash in the table.
        let none = History::new(vec![fix21.clone()], None, "vllm").unwrap();
        assert_eq!(none.speedup_batch_1(&fix21), None);
        let table = render_table(&none);
        let row = table.lines().find(|l| l.starts_with(&fix21.label)).unwrap();
        assert!(row.trim_end().ends_with("-         -         -"), "{row}");
        let header = table.lines().find(|l| l.starts_with("run ")).unwrap();
        assert_eq!(
            header.find("date"),
            row.find(&fix21.report.setup.date),
            "the columns line up after a label longer than the usual column"
        );
    }

    #[test]
    fn the_figure_is_written_with_a_row_per_run() {
        let runs = vec![
            committed("tinyllama-1.1b_h100_eager.json"),
            committed("tinyllama-1.1b_h100_fix23.json"),
        ];
        let history = History::new(runs, Some(3350.0), "hf-generate").unwrap();
        let path = std::env::temp_dir().join(format!("history-{}.svg", std::process::id()));
        write_svg(&history, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for label in [
            "tinyllama-1.1b_h100_eager.json",
            "tinyllama-1.1b_h100_fix23.json",
        ] {
            assert!(svg.contains(label), "{label} names its row");
        }
        assert!(svg.contains("the floor (0.618 ms)"));
    }
}
