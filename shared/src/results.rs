//! Where a bench's results go: a JSON file (for the book, for `show`
//! commands, for anyone's scripts) and, beside it, the same table as text.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
}

/// Writes `value` as pretty JSON to `json` (creating its folder) and `table`
/// to the same path with the extension `.txt`.
pub fn write(json: &Path, value: &impl Serialize, table: &str) -> Result<(), ResultsError> {
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |source| ResultsError::Write { path, source }
    };
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail(dir))?;
    }
    let body = serde_json::to_string_pretty(value).expect("results serialise") + "\n";
    std::fs::write(json, body).map_err(fail(json))?;
    let txt = json.with_extension("txt");
    std::fs::write(&txt, table).map_err(fail(&txt))
}

/// Reads a results file written by [`write`].
pub fn read(json: &Path) -> Result<serde_json::Value, ResultsError> {
    let fail = |message: String| ResultsError::Read {
        path: json.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(json).map_err(|e| fail(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| fail(e.to_string()))
}
