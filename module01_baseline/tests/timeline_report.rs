//! The layer timeline the book shows: the committed H100 result, rendered
//! by the code that renders it for the `timeline` command.

use std::path::PathBuf;

use module01_baseline::timeline::{render_table, TimelineReport};
use shared::kernels::timeline::{PRODUCTS, STAGES};

fn committed(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../results/h100")
        .join(name)
}

fn load(model: &str) -> TimelineReport {
    let path = committed(&format!("module01_timeline_{model}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The table in the book is the table this code renders from the JSON
/// (`scripts/book_results.sh` writes it), and its numbers hang together.
#[test]
fn the_committed_timelines_render_as_the_book_shows() {
    for model in [
        "tinyllama-1.1b",
        "tinyllama-1.1b_split",
        "tinyllama-1.1b_fix26",
        "smollm2-135m",
        "smollm2-135m_fix26",
    ] {
        let report = load(model);
        let table = render_table(&report);
        let book =
            std::fs::read_to_string(committed(&format!("module01_timeline_{model}.txt"))).unwrap();
        assert_eq!(table, book, "run scripts/book_results.sh");
        let sum = &report.summary;
        assert_eq!(sum.stages.len(), STAGES.len());
        assert_eq!(sum.tile_wait_us.len(), PRODUCTS.len());
        for stage in &sum.stages {
            assert!(
                stage.quickest_block_us <= stage.median_block_us
                    && stage.median_block_us <= stage.slowest_block_us,
                "{model}: {stage:?}"
            );
        }
        // The median block's stages add up to about the layer: each is a
        // median, so not exactly, but within a tenth.
        let stages: f64 = sum.stages.iter().map(|s| s.median_block_us).sum();
        assert!(
            (stages / sum.layer_us - 1.0).abs() < 0.1,
            "{model}: stages {stages} against a layer of {}",
            sum.layer_us
        );
        assert_eq!(
            report.drawn_stages_ns.len(),
            132,
            "one row per H100 multiprocessor"
        );
        // Where the run has the stages' end times, they come in the
        // stages' order and within the layer.
        let ends: Vec<f64> = sum.stages.iter().filter_map(|s| s.median_end_us).collect();
        if !ends.is_empty() {
            assert_eq!(ends.len(), sum.stages.len(), "{model}");
            assert!(ends.windows(2).all(|w| w[0] <= w[1]), "{model}: {ends:?}");
            assert!(ends[ends.len() - 1] <= sum.layer_us, "{model}: {ends:?}");
        }
    }
    // The run with thread 0's time split: every product's wait, dot
    // products and group barrier, each within that product's stage.
    let split = load("tinyllama-1.1b_split").summary;
    for times in [&split.tile_wait_us, &split.tile_dot_us, &split.tile_sync_us] {
        assert_eq!(times.len(), PRODUCTS.len());
    }
    let product_stages = [2, 6, 8, 10];
    for (i, &stage) in product_stages.iter().enumerate() {
        let spent = split.tile_wait_us[i] + split.tile_dot_us[i] + split.tile_sync_us[i];
        assert!(
            spent <= split.stages[stage].slowest_block_us,
            "{}: {spent} us",
            split.stages[stage].name
        );
    }
    insta::assert_snapshot!(render_table(&load("tinyllama-1.1b")));
}
