//! Chapter 1's history of the H100 runs: the committed table is what the
//! `history` command renders from the committed results, and its numbers
//! are the runs' own.

use std::path::PathBuf;

use module01_baseline::history::{read_runs, render_table, History};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The runs as `scripts/book_results.sh` passes them.
fn book_history() -> History {
    let list = std::fs::read_to_string(repo().join("results/h100/module01_history_runs.txt"))
        .expect("the list of the book's runs");
    let args: Vec<String> = list
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            assert!(line.contains('='), "{line}: the book's runs are named");
            line.to_string()
        })
        .collect();
    let runs = read_runs(&args, &repo()).unwrap();
    // The H100 SXM's bandwidth, as the script passes it.
    History::new(runs, Some(3350.0), "hf-generate").unwrap()
}

#[test]
fn the_committed_history_renders_as_the_book_shows() {
    let history = book_history();
    let table = render_table(&history);
    let book = std::fs::read_to_string(repo().join("results/h100/module01_history.txt")).unwrap();
    assert_eq!(table, book, "run scripts/book_results.sh");
    assert!(history.runs.len() >= 20);
    assert!(book.contains("at 3350 GB/s (0.618 ms)"));
    for run in &history.runs {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(run.label.as_str()))
            .unwrap_or_else(|| panic!("a row for {}", run.label));
        let cells: Vec<&str> = row.split_whitespace().collect();
        // label, date, decode ms/token, x the floor, ...
        assert_eq!(cells[1], run.report.setup.date);
        assert_eq!(
            cells[2],
            format!("{:.3}", run.report.single.decode_ms_per_token)
        );
        let floor = history.floor_ms(run).unwrap();
        assert_eq!(
            cells[3],
            format!("{:.2}x", run.report.single.decode_ms_per_token / floor)
        );
    }
    // The last run, in the numbers chapter 1 quotes: 1.63x the floor,
    // 24.0x generate at batch 1 and 4.0x at batch 128.
    let last = history.runs.last().unwrap();
    let row = table.lines().find(|l| l.starts_with(&last.label)).unwrap();
    assert!(row.contains(" 1.63x "), "{row}");
    assert!(row.trim_end().ends_with("24.0x      4.0x"), "{row}");
}
