//! The simulator's table and plot.

use std::path::Path;

use plotters::prelude::*;

use crate::sim::SimReport;

/// One row per policy; ratios against round-robin (the cache-blind default).
pub fn table(report: &SimReport) -> String {
    let c = &report.config;
    let mut out = format!(
        "{} requests, {} blocks ({}); {} workers × {} cached blocks, prefill {:.0} tok/s, decode {:.0} ms/token, speed-up {}x\n\
         single-node infinite-cache oracle hit rate: {:.1}%\n",
        report.requests,
        report.blocks,
        report.trace,
        c.workers,
        c.cache_blocks,
        c.prefill_tokens_per_s,
        c.decode_s_per_token * 1e3,
        c.speedup,
        report.oracle_hit_rate * 100.0
    );
    out.push_str(&format!(
        "{:<20} {:>9} {:>10} {:>9} {:>11} {:>11} {:>11} {:>12} {:>12}\n",
        "policy",
        "hit rate",
        "vs oracle",
        "max/mean",
        "TTFT mean",
        "TTFT p50",
        "TTFT p99",
        "prefill tok",
        "TTFT vs RR"
    ));
    let baseline = report
        .results
        .iter()
        .find(|r| r.policy == "round-robin")
        .map(|r| r.ttft_mean_s);
    for r in &report.results {
        let vs = baseline.map_or("-".to_string(), |b| format!("{:.2}x", r.ttft_mean_s / b));
        out.push_str(&format!(
            "{:<20} {:>8.1}% {:>9.1}% {:>9.2} {:>10.2}s {:>10.2}s {:>10.2}s {:>12} {:>12}\n",
            r.policy,
            r.hit_rate * 100.0,
            r.hit_rate_vs_oracle * 100.0,
            r.load_balance,
            r.ttft_mean_s,
            r.ttft_p50_s,
            r.ttft_p99_s,
            r.prefill_tokens,
            vs
        ));
    }
    out
}

/// Two bar charts side by side: hit rate (with the oracle line) and mean TTFT.
pub fn write_svg(report: &SimReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (980, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(490);
    let n = report.results.len();
    let names: Vec<String> = report.results.iter().map(|r| r.policy.clone()).collect();
    let label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
            names[i as usize].clone()
        } else {
            String::new()
        }
    };

    let mut hit = ChartBuilder::on(&left)
        .caption("prefix-cache hit rate", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..100f64)?;
    hit.configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 10))
        .y_desc("% of prompt blocks")
        .draw()?;
    hit.draw_series(report.results.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [
                (i as f64 - 0.35, 0.0),
                (i as f64 + 0.35, r.hit_rate * 100.0),
            ],
            BLUE.mix(0.6).filled(),
        )
    }))?;
    let oracle = report.oracle_hit_rate * 100.0;
    hit.draw_series(LineSeries::new(
        [(-0.5, oracle), (n as f64 - 0.5, oracle)],
        RED.stroke_width(2),
    ))?
    .label("single-node oracle")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
    hit.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    let top = report
        .results
        .iter()
        .map(|r| r.ttft_mean_s)
        .fold(0.0f64, f64::max)
        * 1.15;
    let mut ttft = ChartBuilder::on(&right)
        .caption("mean time to first token", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top.max(1e-3))?;
    ttft.configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 10))
        .y_desc("seconds")
        .draw()?;
    ttft.draw_series(report.results.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [(i as f64 - 0.35, 0.0), (i as f64 + 0.35, r.ttft_mean_s)],
            GREEN.mix(0.6).filled(),
        )
    }))?;
    root.present()?;
    Ok(())
}
