//! `datasets.json`: a party's map from dataset names to local files, read by task-manager
//! (at start, before it registers) and by `cohort check` (each dataset on its own, so every
//! bad one is named).
//!
//! ```json
//! {"digits": {"path": "digits-train.csv", "format": "csv", "eval_path": "digits-test.csv",
//!             "scale": 0.0625, "classes": 10}}
//! ```
//! Relative paths are relative to the file's directory.
//!
//! A `synthetic` dataset has no files: `{"synthetic": {"format": "synthetic", "samples": 100,
//! "index": 0}}` serves jobs of `model.arch: synthetic` (`cohort bench round`) with the
//! weight `samples` and the party's `index` in the synthetic workload. It has one feature and
//! two classes (the smallest shape a registration may have); a synthetic model does not
//! depend on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::DataFormat;

/// One entry of `datasets.json`, paths as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// The data file (every format but `synthetic`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    pub format: String,
    /// A synthetic dataset's weight (its "samples").
    #[serde(default)]
    pub samples: Option<u64>,
    /// A synthetic dataset's party index.
    #[serde(default)]
    pub index: Option<u32>,
    #[serde(default)]
    pub labels: Option<PathBuf>,
    #[serde(default)]
    pub eval_path: Option<PathBuf>,
    #[serde(default)]
    pub eval_labels: Option<PathBuf>,
    #[serde(default)]
    pub scale: Option<f32>,
    /// Number of classes of the task (default: largest label + 1 seen locally).
    #[serde(default)]
    pub classes: Option<u32>,
}

/// What a dataset holds, as a party registers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetShape {
    pub samples: u64,
    pub features: u32,
    pub classes: u32,
}

/// A dataset read and checked: its entry (paths resolved) and shape.
#[derive(Debug, Clone)]
pub struct CheckedDataset {
    pub name: String,
    pub entry: DatasetEntry,
    pub shape: DatasetShape,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: dataset {name:?}: {message}")]
    Dataset {
        path: PathBuf,
        name: String,
        message: String,
    },
}

/// The format of a dataset without files (`cohort bench round`).
pub const SYNTHETIC: &str = "synthetic";

/// Most weight a synthetic dataset may claim (like a file of a billion samples).
const MAX_SYNTHETIC_SAMPLES: u64 = 1_000_000_000;

/// The entries of `path`, by name, without reading their files.
pub fn entries(path: &Path) -> Result<BTreeMap<String, DatasetEntry>, DatasetsError> {
    let file_error = |message: String| DatasetsError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_error(e.to_string()))
}

/// Reads every dataset of `path`; the first bad one is the error.
pub fn load(path: &Path) -> Result<Vec<CheckedDataset>, DatasetsError> {
    let mut out = Vec::new();
    for (name, entry) in entries(path)? {
        let checked = check(path, &name, entry).map_err(|message| DatasetsError::Dataset {
            path: path.to_path_buf(),
            name,
            message,
        })?;
        out.push(checked);
    }
    Ok(out)
}

/// Reads one dataset of the file `datasets_json` (relative paths are resolved against its
/// directory) and checks its shape; the error names the field at fault.
pub fn check(
    datasets_json: &Path,
    name: &str,
    mut entry: DatasetEntry,
) -> Result<CheckedDataset, String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("names are letters, digits, '-', '_' and '.'".into());
    }
    if entry.format == SYNTHETIC {
        return synthetic(name, entry);
    }
    for (field, set) in [
        ("samples", entry.samples.is_some()),
        ("index", entry.index.is_some()),
    ] {
        if set {
            return Err(format!("{field}: only a synthetic dataset takes it"));
        }
    }
    let base = datasets_json.parent().unwrap_or(Path::new("."));
    for p in [
        &mut entry.path,
        &mut entry.labels,
        &mut entry.eval_path,
        &mut entry.eval_labels,
    ]
    .into_iter()
    .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    let format: DataFormat = entry.format.parse().map_err(|e| format!("format: {e}"))?;
    if let Some(s) = entry.scale
        && !(s.is_finite() && s > 0.0)
    {
        return Err(format!("scale: must be a positive number, got {s}"));
    }
    let Some(data_path) = entry.path.as_deref() else {
        return Err("path: missing (the data file)".into());
    };
    let data = crate::load_dataset(data_path, format, entry.labels.as_deref(), entry.scale)
        .map_err(|e| e.to_string())?;
    if data.n == 0 {
        return Err("holds no samples".into());
    }
    let mut classes = data.classes() as u32;
    if let Some(eval) = &entry.eval_path {
        let e = crate::load_dataset(eval, format, entry.eval_labels.as_deref(), entry.scale)
            .map_err(|e| format!("eval_path: {e}"))?;
        if e.d != data.d {
            return Err(format!(
                "eval_path has {} features, path has {}",
                e.d, data.d
            ));
        }
        classes = classes.max(e.classes() as u32);
    }
    if let Some(c) = entry.classes {
        if c < classes {
            return Err(format!(
                "classes: {c} but labels up to {} occur",
                classes - 1
            ));
        }
        classes = c;
    }
    Ok(CheckedDataset {
        name: name.to_string(),
        entry,
        shape: DatasetShape {
            samples: data.n as u64,
            features: data.d as u32,
            classes,
        },
    })
}

fn synthetic(name: &str, entry: DatasetEntry) -> Result<CheckedDataset, String> {
    for (field, set) in [
        ("path", entry.path.is_some()),
        ("labels", entry.labels.is_some()),
        ("eval_path", entry.eval_path.is_some()),
        ("eval_labels", entry.eval_labels.is_some()),
        ("scale", entry.scale.is_some()),
        ("classes", entry.classes.is_some()),
    ] {
        if set {
            return Err(format!(
                "{field}: a synthetic dataset has no files or labels"
            ));
        }
    }
    let samples = match entry.samples {
        Some(n) if (1..=MAX_SYNTHETIC_SAMPLES).contains(&n) => n,
        Some(n) => {
            return Err(format!(
                "samples: must be between 1 and {MAX_SYNTHETIC_SAMPLES}, got {n}"
            ));
        }
        None => return Err("samples: missing (the weight of the synthetic updates)".into()),
    };
    if entry.index.is_none() {
        return Err("index: missing (the party's index in the synthetic workload)".into());
    }
    Ok(CheckedDataset {
        name: name.to_string(),
        entry,
        shape: DatasetShape {
            samples,
            features: 1,
            classes: 2,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load_json(json: &str) -> Result<Vec<CheckedDataset>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datasets.json");
        std::fs::write(&path, json).unwrap();
        load(&path).map_err(|e| e.to_string())
    }

    #[test]
    fn a_synthetic_dataset_has_a_weight_and_an_index_and_no_files() {
        let loaded =
            load_json(r#"{"synthetic": {"format": "synthetic", "samples": 101, "index": 1}}"#)
                .unwrap();
        assert_eq!(
            loaded[0].shape,
            DatasetShape {
                samples: 101,
                features: 1,
                classes: 2
            }
        );
        for (json, field) in [
            (
                r#"{"s": {"format": "synthetic", "index": 0}}"#,
                "samples: missing",
            ),
            (
                r#"{"s": {"format": "synthetic", "samples": 0, "index": 0}}"#,
                "samples: must",
            ),
            (
                r#"{"s": {"format": "synthetic", "samples": 5}}"#,
                "index: missing",
            ),
            (
                r#"{"s": {"format": "synthetic", "samples": 5, "index": 0, "path": "x.csv"}}"#,
                "path: a synthetic dataset",
            ),
            (
                r#"{"s": {"format": "csv", "path": "x.csv", "index": 0}}"#,
                "index: only",
            ),
            (r#"{"s": {"format": "csv"}}"#, "path: missing"),
        ] {
            let e = load_json(json).unwrap_err();
            assert!(e.contains(field) && e.contains("\"s\""), "{json}: {e}");
        }
    }

    #[test]
    fn a_csv_dataset_has_the_shape_of_its_file_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), "1,2,0\n3,4,2\n").unwrap();
        let json = dir.path().join("datasets.json");
        std::fs::write(
            &json,
            r#"{"d": {"format": "csv", "path": "d.csv"}, "gone": {"format": "csv", "path": "gone.csv"}}"#,
        )
        .unwrap();
        let all = entries(&json).unwrap();
        let d = check(&json, "d", all["d"].clone()).unwrap();
        assert_eq!(
            d.shape,
            DatasetShape {
                samples: 2,
                features: 2,
                classes: 3
            }
        );
        let gone = check(&json, "gone", all["gone"].clone()).unwrap_err();
        assert!(gone.contains("gone.csv"), "{gone}");
        assert!(load(&json).unwrap_err().to_string().contains("\"gone\""));
    }
}
