//! Where a bench's results go: a JSON file (for the book, for `show`
//! commands, for anyone's scripts) and, beside it, the same table as text.

use std::path::Path;

use serde::de::DeserializeOwned;
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
    #[error("not a `{kind}` result: no usable `{key}` ({message})")]
    Field {
        kind: String,
        key: String,
        message: String,
    },
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
    write_table(json, table)
}

/// Writes `table` beside `json`, with the extension `.txt` (what `show`
/// commands refresh after re-rendering a saved result).
pub fn write_table(json: &Path, table: &str) -> Result<(), ResultsError> {
    let txt = json.with_extension("txt");
    std::fs::write(&txt, table).map_err(|source| ResultsError::Write {
        path: txt.display().to_string(),
        source,
    })
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

/// The field `key` of a results file read by [`read`], deserialised; `kind`
/// names the command that writes such files, for the error message.
pub fn field<T: DeserializeOwned>(
    report: &serde_json::Value,
    key: &str,
    kind: &str,
) -> Result<T, ResultsError> {
    let fail = |message: String| ResultsError::Field {
        kind: kind.into(),
        key: key.into(),
        message,
    };
    let value = report.get(key).ok_or_else(|| fail("missing".into()))?;
    serde_json::from_value(value.clone()).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_or_named_in_the_error() {
        let report = serde_json::json!({ "config": { "workers": 3 }, "results": [1, 2] });
        let results: Vec<u32> = field(&report, "results", "live").unwrap();
        assert_eq!(results, [1, 2]);
        let missing = field::<u32>(&report, "load", "bench")
            .unwrap_err()
            .to_string();
        assert_eq!(missing, "not a `bench` result: no usable `load` (missing)");
        let wrong = field::<Vec<u32>>(&report, "config", "live")
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("no usable `config`"), "{wrong}");
    }
}
