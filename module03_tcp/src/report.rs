//! Percentiles per transfer mode, the breakdown table, JSON and a plot.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use shared::stats::percentile;
use shared::wire::{Breakdown, TransferMode};

use crate::client::RequestResult;

/// A named part of a request's latency and how to read it from a breakdown.
pub type Component = (&'static str, fn(&Breakdown) -> f64);

/// The components of a request's latency, in path order.
pub const COMPONENTS: [Component; 9] = [
    ("prefill", |b| b.prefill_s),
    ("serialize", |b| b.serialize_s),
    ("transfer (exposed)", |b| b.transfer_exposed_s),
    ("deserialize", |b| b.deserialize_s),
    ("first decode step", |b| b.first_decode_step_s),
    ("decode", |b| b.decode_s),
    ("TTFT", |b| b.ttft_s),
    ("total", |b| b.total_s),
    ("transfer overhead", |b| b.transfer_overhead_s()),
];

/// p50 and p99 of one component, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub name: String,
    pub p50: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeRun {
    pub mode: TransferMode,
    pub results: Vec<RequestResult>,
    pub components: Vec<Percentiles>,
    /// Median over requests of transfer overhead / total.
    pub overhead_fraction_p50: f64,
    pub mean_kv_bytes: f64,
}

impl ModeRun {
    pub fn new(mode: TransferMode, results: Vec<RequestResult>) -> ModeRun {
        let ok: Vec<&Breakdown> = results
            .iter()
            .filter_map(|r| r.breakdown.as_ref())
            .collect();
        let components = COMPONENTS
            .iter()
            .map(|(name, get)| {
                let values: Vec<f64> = ok.iter().map(|b| get(b)).collect();
                Percentiles {
                    name: name.to_string(),
                    p50: percentile(&values, 0.5),
                    p99: percentile(&values, 0.99),
                }
            })
            .collect();
        let fractions: Vec<f64> = ok
            .iter()
            .map(|b| b.transfer_overhead_s() / b.total_s)
            .collect();
        ModeRun {
            mode,
            overhead_fraction_p50: percentile(&fractions, 0.5),
            mean_kv_bytes: ok.iter().map(|b| b.kv_bytes as f64).sum::<f64>()
                / ok.len().max(1) as f64,
            components,
            results,
        }
    }

    pub fn errors(&self) -> usize {
        self.results.iter().filter(|r| r.error.is_some()).count()
    }

    fn get(&self, name: &str) -> &Percentiles {
        self.components
            .iter()
            .find(|c| c.name == name)
            .expect("known component")
    }
}

/// A whole run: the setup and one [`ModeRun`] per mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub date: String,
    /// Where the two servers were, e.g. "loopback" or "netns, 10gbit".
    pub link: String,
    pub max_tokens: u32,
    pub concurrency: usize,
    pub runs: Vec<ModeRun>,
}

impl RunReport {
    /// Components as rows, modes as columns (p50 / p99 in ms), then the
    /// ratios a reader wants: each mode against the local baseline.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} requests per mode, {} new tokens each, concurrency {}, {}\n",
            self.runs.first().map_or(0, |r| r.results.len()),
            self.max_tokens,
            self.concurrency,
            self.link
        );
        out.push_str(&format!("{:<21}", "p50 / p99 (ms)"));
        for run in &self.runs {
            out.push_str(&format!(" {:>21}", run.mode.name()));
        }
        out.push('\n');
        for (name, _) in COMPONENTS {
            out.push_str(&format!("{name:<21}"));
            for run in &self.runs {
                let p = run.get(name);
                out.push_str(&format!(
                    " {:>21}",
                    format!("{:.1} / {:.1}", p.p50 * 1e3, p.p99 * 1e3)
                ));
            }
            out.push('\n');
        }
        out.push_str(&format!("{:<21}", "overhead % of total"));
        for run in &self.runs {
            out.push_str(&format!(" {:>20.1}%", run.overhead_fraction_p50 * 100.0));
        }
        out.push('\n');
        out.push_str(&format!("{:<21}", "KV per request (MiB)"));
        for run in &self.runs {
            out.push_str(&format!(
                " {:>21.2}",
                run.mean_kv_bytes / (1u64 << 20) as f64
            ));
        }
        out.push('\n');
        if let Some(local) = self.runs.iter().find(|r| r.mode == TransferMode::Local) {
            for metric in ["total", "TTFT"] {
                out.push_str(&format!("{:<21}", format!("{metric} vs local")));
                for run in &self.runs {
                    let ratio = run.get(metric).p50 / local.get(metric).p50;
                    out.push_str(&format!(" {:>20.2}x", ratio));
                }
                out.push('\n');
            }
        }
        let errors: usize = self.runs.iter().map(ModeRun::errors).sum();
        if errors > 0 {
            out.push_str(&format!(
                "{errors} request(s) failed; see the JSON for their errors\n"
            ));
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
    }

    /// One stacked bar per mode: median prefill, serialize, exposed
    /// transfer, deserialize, first decode step and decode.
    pub fn write_svg(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let parts = &COMPONENTS[..6];
        let colors = [BLUE, RED, MAGENTA, CYAN, GREEN, RGBColor(120, 120, 120)];
        let widest = self
            .runs
            .iter()
            .map(|r| parts.iter().map(|(name, _)| r.get(name).p50).sum::<f64>())
            .fold(0.0, f64::max)
            * 1e3;
        let root =
            SVGBackend::new(path, (860, 120 + 60 * self.runs.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("where a request's time goes (p50, {})", self.link),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..widest * 1.45, 0.0..self.runs.len() as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("milliseconds")
            .draw()?;
        for (i, (name, _)) in parts.iter().enumerate() {
            let color = colors[i];
            let bars: Vec<Rectangle<(f64, f64)>> = self
                .runs
                .iter()
                .enumerate()
                .map(|(row, run)| {
                    let start: f64 =
                        parts[..i].iter().map(|(n, _)| run.get(n).p50).sum::<f64>() * 1e3;
                    let end = start + run.get(name).p50 * 1e3;
                    let y = row as f64;
                    Rectangle::new([(start, y + 0.2), (end, y + 0.8)], color.filled())
                })
                .collect();
            chart.draw_series(bars)?.label(*name).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
            });
        }
        // Each bar's mode and total, just right of the bar.
        chart.draw_series(self.runs.iter().enumerate().map(|(row, run)| {
            let end: f64 = parts.iter().map(|(n, _)| run.get(n).p50).sum::<f64>() * 1e3;
            Text::new(
                format!("{} {:.0} ms", run.mode.name(), end),
                (end + widest * 0.01, row as f64 + 0.6),
                ("sans-serif", 14),
            )
        }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
