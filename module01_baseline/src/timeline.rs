//! The `timeline` command's report: where a decode layer's time goes on a
//! GPU, stage by stage and block by block, from the layer kernel's own
//! clock marks (`shared::kernels::timeline`).
//!
//! A table gives each stage's time for the quickest, the median and the
//! slowest block (medians over the layers and steps measured); the figure
//! draws one layer of one step as a Gantt chart, a row per block, so that
//! the waits at the grid barriers show as what they are: most blocks idle
//! while the last one finishes.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use shared::kernels::timeline::{LayerTimeline, StageTime, TimelineSummary, PRODUCTS, STAGES};

/// What was measured, and on what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineSetup {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub context: usize,
    /// The layer kernel's weight ring ("6 slots of 33.0 KiB read by 3 groups of 5 warps").
    pub layer_ring: Option<String>,
    pub date: String,
}

/// The command's JSON result: the setup, the summary, and the marks of the
/// layer drawn (per block, nanoseconds from that layer's first launch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineReport {
    pub setup: TimelineSetup,
    pub summary: TimelineSummary,
    /// The layer and step drawn in the figure.
    pub drawn_layer: usize,
    pub drawn_step: usize,
    /// `[block][stage]`: each stage's start and end, ns after the layer began.
    pub drawn_stages_ns: Vec<Vec<(u64, u64)>>,
}

impl TimelineReport {
    /// The report of `steps`' timelines: summarised over all their layers,
    /// with layer `layer` of the median step (by that layer's span) drawn.
    pub fn new(setup: TimelineSetup, steps: &[LayerTimeline], layer: usize) -> TimelineReport {
        let layers = steps.first().map_or(0, LayerTimeline::layers);
        let summary = shared::kernels::timeline::summarize(steps, 0..layers);
        let layer = layer.min(layers.saturating_sub(1));
        let mut by_span: Vec<usize> = (0..steps.len()).collect();
        by_span.sort_by_key(|&s| steps[s].layer_ns(layer));
        let drawn_step = by_span.get(by_span.len() / 2).copied().unwrap_or(0);
        let drawn_stages_ns = steps.get(drawn_step).map_or_else(Vec::new, |t| {
            let start = t.layer_start(layer);
            (0..t.blocks())
                .map(|b| {
                    STAGES
                        .iter()
                        .map(|s| {
                            (
                                t.mark(layer, b, s.from).saturating_sub(start),
                                t.mark(layer, b, s.to).saturating_sub(start),
                            )
                        })
                        .collect()
                })
                .collect()
        });
        TimelineReport {
            setup,
            summary,
            drawn_layer: layer,
            drawn_step,
            drawn_stages_ns,
        }
    }
}

/// A stage's quickest, median and slowest block, as the table's columns.
fn block_times(stage: &StageTime) -> String {
    format!(
        "{:>8.2} us {:>8.2} us {:>8.2} us",
        stage.quickest_block_us, stage.median_block_us, stage.slowest_block_us
    )
}

/// The table: one row per stage, the quickest, the median and the slowest
/// block, and the median block's share of the median layer.
pub fn render_table(report: &TimelineReport) -> String {
    let s = &report.setup;
    let sum = &report.summary;
    let mut out = format!(
        "layer timeline: {} on {}, {}, batch {}, context {}, {} steps x {} layers{}\n",
        s.model,
        s.device,
        s.dtype,
        s.batch,
        s.context,
        sum.steps,
        sum.layers.len(),
        s.layer_ring
            .as_ref()
            .map_or(String::new(), |r| format!("; weight ring {r}")),
    );
    // Results saved before the stages' end times were measured have none.
    let ends = sum.stages.iter().all(|s| s.median_end_us.is_some());
    out += &format!(
        "{:<28} {:>11} {:>11} {:>11} {:>7}{}\n",
        "stage",
        "quickest",
        "median",
        "slowest",
        "share",
        if ends {
            format!(" {:>11}", "ends at")
        } else {
            String::new()
        }
    );
    for stage in &sum.stages {
        out += &format!(
            "{:<28} {} {:>6.1}%",
            stage.name,
            block_times(stage),
            100.0 * stage.median_block_us / sum.layer_us.max(1e-9),
        );
        if let (true, Some(end)) = (ends, stage.median_end_us) {
            out += &format!(" {end:>8.2} us");
        }
        out += "\n";
    }
    out += &format!(
        "{:<28} {:>8.2} us   (first launch to last block's end)\n",
        "layer", sum.layer_us
    );
    out += &format!(
        "{:<28} {:>8.2} us   (last block's end to the next layer's first launch)\n",
        "gap between layers", sum.gap_us
    );
    out += &format!(
        "copying warp: first tile issued at {:.2} us, last at {:.2} us; it waited {:.2} us for free slots\n",
        sum.first_copy_us, sum.last_copy_us, sum.slot_wait_us
    );
    out += &format!("{:<28}", "thread 0, per product");
    for product in PRODUCTS {
        out += &format!(" {product:>11}");
    }
    out += "\n";
    for (what, times) in [
        ("  waiting for tiles", &sum.tile_wait_us),
        ("  dot products", &sum.tile_dot_us),
        ("  its group's barrier", &sum.tile_sync_us),
    ] {
        if times.is_empty() {
            continue;
        }
        out += &format!("{what:<28}");
        for t in times {
            out += &format!(" {t:>8.2} us");
        }
        out += "\n";
    }
    if !sum.attention_parts.is_empty() {
        out += &format!(
            "{:<28} {:>11} {:>11} {:>11} {:>11}\n",
            "attention, a block's item", "quickest", "median", "slowest", "ends at"
        );
        for part in &sum.attention_parts {
            out += &format!(
                "  {:<26} {} {:>8.2} us\n",
                part.name,
                block_times(part),
                part.median_end_us.unwrap_or(f64::NAN),
            );
        }
    }
    out += "quickest, median, slowest: that block's time in each layer, then the median over layers and steps; \
            share: the median block's share of the layer. A barrier's row is a block's wait there: the quickest \
            is the last block to arrive, so it is the barrier's own cost (fence, atomic, poll); the slowest is the \
            first to arrive, so it adds the spread of the stage before. Thread 0's waits for tiles mean the weight \
            stream set the pace; the rest of a product's stage is its staging, its epilogues and its loop\n";
    if !sum.attention_parts.is_empty() {
        out += "attention, a block's item: its first item, timed by its thread 0, over the blocks that had one; \
                its queries are waited for first (a chunk of the first head), keys, values and softmax include the \
                wait for the new token's key and value where its partition holds them, and only the partition \
                counted last merges\n";
    }
    if ends {
        out += "ends at: when the median block ended the stage, from the layer's first launch (the median over \
                layers and steps); a barrier's row says when it passed, however the stages before it share the time\n";
    }
    let ring = s.layer_ring.as_deref().unwrap_or("");
    if ring.ends_with("tagged words instead of grid barriers") {
        out += "tagged words instead of grid barriers: the barrier rows are only the block's own barrier there; \
                its wait for the other blocks is in the stage after it (attention waits for the queries, the \
                products' stagings for their inputs)\n";
    } else if ring.ends_with("tagged words after attention") {
        // Fix 30's build, before barrier 1 went too (experiments file, section 28).
        out += "tagged words after attention: barriers 2-4 are only the block's own barrier there; its wait for \
                the other blocks is in the staging of the stage after it\n";
    }
    out
}

/// The colours of the stages, in order: the products in blues, attention
/// green, the barriers and the wait for the layer before in greys.
fn stage_colour(name: &str) -> RGBColor {
    match name {
        n if n.starts_with("barrier") || n.starts_with("wait") => RGBColor(200, 200, 200),
        n if n.starts_with("staging") => RGBColor(255, 190, 90),
        "attention" => RGBColor(80, 170, 90),
        n if n.starts_with("qkv") => RGBColor(120, 160, 230),
        n if n.starts_with("o ") => RGBColor(70, 120, 210),
        n if n.starts_with("gate/up") => RGBColor(30, 80, 180),
        _ => RGBColor(20, 40, 120),
    }
}

/// The Gantt chart of the drawn layer: a row per block, a bar per stage.
pub fn write_svg(report: &TimelineReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let blocks = report.drawn_stages_ns.len().max(1);
    let end_us = report
        .drawn_stages_ns
        .iter()
        .flatten()
        .map(|&(_, to)| to as f64 / 1e3)
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (chart_area, legend_area) = root.split_horizontally(780);
    let s = &report.setup;
    let title = format!(
        "{}: layer {}, block by block ({}, batch {}, context {})",
        s.model, report.drawn_layer, s.dtype, s.batch, s.context
    );
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end_us * 1.02, 0.0..blocks as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("µs since the layer's first block began")
        .y_desc("block (one per multiprocessor)")
        .draw()?;
    for (b, stages) in report.drawn_stages_ns.iter().enumerate() {
        for (stage, &(from, to)) in STAGES.iter().zip(stages) {
            let (x0, x1) = (from as f64 / 1e3, to as f64 / 1e3);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, b as f64), (x1, b as f64 + 0.9)],
                stage_colour(stage.name).filled(),
            )))?;
        }
    }
    for (i, stage) in STAGES.iter().enumerate() {
        let y = 40 + i as i32 * 24;
        legend_area.draw(&Rectangle::new(
            [(10, y), (28, y + 14)],
            stage_colour(stage.name).filled(),
        ))?;
        legend_area.draw(&Text::new(
            stage.name.to_string(),
            (34, y),
            ("sans-serif", 13),
        ))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::kernels::timeline::{mark, TIMELINE_BLOCKS, TIMELINE_LAYERS, TIMELINE_MARKS};

    /// Two layers of three blocks; block b's stage i takes (i + 1) µs + b ns
    /// in step s, plus s µs in its qkv stage. With `timed_item`, block 0
    /// times an attention item: queries 0.2 µs into attention, then 1.5 µs
    /// of keys and values, 0.3 to count and 0.5 to merge.
    fn steps_with(count: usize, timed_item: bool) -> Vec<LayerTimeline> {
        (0..count)
            .map(|s| {
                let mut array = vec![0u64; TIMELINE_LAYERS * TIMELINE_BLOCKS * TIMELINE_MARKS];
                for l in 0..2 {
                    for b in 0..3 {
                        let at = (l * TIMELINE_BLOCKS + b) * TIMELINE_MARKS;
                        let mut t = 5_000_000 + l as u64 * 200_000 + b as u64 * 10;
                        array[at + mark::LAUNCHED] = t;
                        for (i, stage) in STAGES.iter().enumerate() {
                            t += (i as u64 + 1) * 1000 + b as u64;
                            if i == 2 {
                                t += s as u64 * 1000;
                            }
                            array[at + stage.to] = t;
                        }
                        if timed_item && b == 0 {
                            let queries = array[at + mark::BARRIER1] + 200;
                            array[at + mark::ATTN_QUERIES] = queries;
                            array[at + mark::ATTN_PARTIAL] = queries + 1500;
                            array[at + mark::ATTN_COUNTED] = queries + 1800;
                            array[at + mark::ATTN_MERGED] = queries + 2300;
                        }
                    }
                }
                LayerTimeline::from_device_array(&array, 2, 3)
            })
            .collect()
    }

    fn steps(count: usize) -> Vec<LayerTimeline> {
        steps_with(count, false)
    }

    /// `report` written as JSON reads back the same.
    fn assert_round_trips(report: &TimelineReport) {
        let json = serde_json::to_string(report).unwrap();
        assert_eq!(
            &serde_json::from_str::<TimelineReport>(&json).unwrap(),
            report
        );
    }

    fn setup() -> TimelineSetup {
        TimelineSetup {
            model: "test".into(),
            device: "cuda:0".into(),
            dtype: "bf16".into(),
            batch: 1,
            context: 576,
            layer_ring: Some("6 slots of 33.0 KiB read by 3 groups of 5 warps".into()),
            date: "2026-12-06".into(),
        }
    }

    #[test]
    fn the_drawn_layer_is_the_median_step_with_every_block_and_stage() {
        let report = TimelineReport::new(setup(), &steps(5), 1);
        assert_eq!(report.drawn_layer, 1);
        // Step s's layer is s µs longer: the median of five is step 2.
        assert_eq!(report.drawn_step, 2);
        assert_eq!(report.drawn_stages_ns.len(), 3);
        assert!(report
            .drawn_stages_ns
            .iter()
            .all(|b| b.len() == STAGES.len()));
        // Block 0 starts the layer; its qkv stage (the third) ends 1 + 2 +
        // 3 + 2 µs in.
        assert_eq!(report.drawn_stages_ns[0][0].0, 0);
        assert_eq!(report.drawn_stages_ns[0][2].1, 8_000);
        // A layer past the last is drawn as the last.
        assert_eq!(TimelineReport::new(setup(), &steps(1), 9).drawn_layer, 1);
    }

    #[test]
    fn the_table_names_every_stage_and_the_layer() {
        let report = TimelineReport::new(setup(), &steps(3), 0);
        let table = render_table(&report);
        for stage in STAGES {
            assert!(table.contains(stage.name), "{table}");
        }
        assert!(table.contains("weight ring 6 slots"));
        assert!(table.contains("3 steps x 2 layers"));
        assert!(table.contains("waiting for tiles"), "{table}");
        // The stages' end times: a column, one time a stage, ascending
        // (each stage of a block ends after the one before it).
        assert!(table.contains("ends at"), "{table}");
        let ends: Vec<f64> = report
            .summary
            .stages
            .iter()
            .map(|s| s.median_end_us.expect("measured"))
            .collect();
        assert!(ends.windows(2).all(|w| w[0] <= w[1]), "{ends:?}");
        for (stage, end) in STAGES.iter().zip(&ends) {
            let row = table.lines().find(|l| l.starts_with(stage.name)).unwrap();
            assert!(row.ends_with(&format!("{end:>8.2} us")), "{row}");
        }
        // A summary saved before they were measured renders without them.
        let mut older = report.clone();
        for stage in &mut older.summary.stages {
            stage.median_end_us = None;
        }
        assert!(!render_table(&older).contains("ends at"));
        // The barrier rows of a tagged build say what they measure there.
        assert!(!table.contains("tagged words"));
        let mut tagged = report.clone();
        tagged.setup.layer_ring = Some(
            "6 slots of 33.0 KiB read by 3 groups of 5 warps, tagged words instead of grid barriers"
                .into(),
        );
        assert!(render_table(&tagged).contains("the barrier rows are only the block's own barrier"));
        // A timeline saved by fix 30's build, which kept barrier 1.
        tagged.setup.layer_ring = Some(
            "6 slots of 33.0 KiB read by 3 groups of 5 warps, tagged words after attention".into(),
        );
        assert!(render_table(&tagged).contains("barriers 2-4 are only the block's own barrier"));
        // No block timed an attention item, so no rows for one.
        assert!(report.summary.attention_parts.is_empty());
        assert!(!table.contains("attention, a block's item"));
        assert_round_trips(&report);
    }

    #[test]
    fn a_timed_attention_item_gets_its_own_rows() {
        let report = TimelineReport::new(setup(), &steps_with(3, true), 0);
        let table = render_table(&report);
        assert!(table.contains("attention, a block's item"), "{table}");
        let row = |name: &str| {
            table
                .lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("a row for {name}: {table}"))
                .to_string()
        };
        // One timed block: its times are the quickest, median and slowest.
        assert!(
            row("its queries seen").contains("    0.20 us     0.20 us     0.20 us"),
            "{table}"
        );
        assert!(row("keys, values, softmax").contains("    1.50 us     1.50 us"));
        assert!(row("fence and count").contains("    0.30 us"));
        assert!(row("merge, if last").contains("    0.50 us"));
        assert_round_trips(&report);
    }

    #[test]
    fn the_figure_is_written() {
        let dir = std::env::temp_dir().join(format!("timeline-svg-{}", std::process::id()));
        let path = dir.join("t.svg");
        write_svg(&TimelineReport::new(setup(), &steps(3), 0), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("barrier 3"), "{svg}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
