//! `datasets.json`: the party's map from dataset names to local files.
//!
//! ```json
//! {"digits": {"path": "digits-train.csv", "format": "csv", "eval_path": "digits-test.csv",
//!             "scale": 0.0625, "classes": 10}}
//! ```
//! Relative paths are relative to the file's directory. Every dataset is read
//! once at start so a bad file is reported before the party registers.
//!
//! A `synthetic` dataset has no files: `{"synthetic": {"format": "synthetic", "samples": 100,
//! "index": 0}}` serves jobs of `model.arch: synthetic` (`cohort bench round`) with the
//! weight `samples` and the party's `index` in the synthetic workload. It registers as one
//! feature and two classes (the smallest shape a registration may have); a synthetic model
//! does not depend on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cohort_proto::v1 as pb;
use cohort_train::DataFormat;
use serde::Deserialize;

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

/// A dataset checked at start.
#[derive(Debug, Clone)]
pub struct LocalDataset {
    pub name: String,
    pub entry: DatasetEntry,
    pub info: pb::DatasetInfo,
}

impl LocalDataset {
    pub fn to_pb(&self) -> pb::LocalDataset {
        let s = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let synthetic = (self.entry.format == SYNTHETIC).then(|| pb::SyntheticData {
            samples: self.entry.samples.unwrap_or(0),
            index: self.entry.index.unwrap_or(0),
        });
        pb::LocalDataset {
            synthetic,
            path: s(&self.entry.path),
            format: self.entry.format.clone(),
            eval_path: s(&self.entry.eval_path),
            scale: self.entry.scale.unwrap_or(0.0),
            labels_path: s(&self.entry.labels),
            eval_labels_path: s(&self.entry.eval_labels),
        }
    }
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

pub fn load(path: &Path) -> Result<Vec<LocalDataset>, DatasetsError> {
    let text = std::fs::read_to_string(path).map_err(|e| DatasetsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let entries: BTreeMap<String, DatasetEntry> =
        serde_json::from_str(&text).map_err(|e| DatasetsError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (name, mut entry) in entries {
        let err = |message: String| DatasetsError::Dataset {
            path: path.to_path_buf(),
            name: name.clone(),
            message,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(err("names are letters, digits, '-', '_' and '.'".into()));
        }
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if entry.format == SYNTHETIC {
            out.push(synthetic(&name, &entry).map_err(err)?);
            continue;
        }
        for (field, set) in [
            ("samples", entry.samples.is_some()),
            ("index", entry.index.is_some()),
        ] {
            if set {
                return Err(err(format!("{field}: only a synthetic dataset takes it")));
            }
        }
        for p in [
            &mut entry.path,
            &mut entry.labels,
            &mut entry.eval_path,
            &mut entry.eval_labels,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        let format: DataFormat = entry
            .format
            .parse()
            .map_err(|e| err(format!("format: {e}")))?;
        if let Some(s) = entry.scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(err(format!("scale: must be a positive number, got {s}")));
        }
        let Some(data_path) = entry.path.as_deref() else {
            return Err(err("path: missing (the data file)".into()));
        };
        let data =
            cohort_train::load_dataset(data_path, format, entry.labels.as_deref(), entry.scale)
                .map_err(|e| err(e.to_string()))?;
        if data.n == 0 {
            return Err(err("holds no samples".into()));
        }
        let mut classes = data.classes() as u32;
        if let Some(eval) = &entry.eval_path {
            let e =
                cohort_train::load_dataset(eval, format, entry.eval_labels.as_deref(), entry.scale)
                    .map_err(|e| err(format!("eval_path: {e}")))?;
            if e.d != data.d {
                return Err(err(format!(
                    "eval_path has {} features, path has {}",
                    e.d, data.d
                )));
            }
            classes = classes.max(e.classes() as u32);
        }
        if let Some(c) = entry.classes {
            if c < classes {
                return Err(err(format!(
                    "classes: {c} but labels up to {} occur",
                    classes - 1
                )));
            }
            classes = c;
        }
        out.push(LocalDataset {
            info: pb::DatasetInfo {
                name: name.clone(),
                samples: data.n as u64,
                features: data.d as u32,
                classes,
            },
            name,
            entry,
        });
    }
    Ok(out)
}

/// The format of a dataset without files (`cohort bench round`).
pub const SYNTHETIC: &str = "synthetic";

/// Most weight a synthetic dataset may claim (like a file of a billion samples).
const MAX_SYNTHETIC_SAMPLES: u64 = 1_000_000_000;

fn synthetic(name: &str, entry: &DatasetEntry) -> Result<LocalDataset, String> {
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
    Ok(LocalDataset {
        info: pb::DatasetInfo {
            name: name.to_string(),
            samples,
            features: 1,
            classes: 2,
        },
        name: name.to_string(),
        entry: entry.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load_json(json: &str) -> Result<Vec<LocalDataset>, String> {
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
        assert_eq!(loaded[0].info.samples, 101);
        assert_eq!((loaded[0].info.features, loaded[0].info.classes), (1, 2));
        let wire = loaded[0].to_pb();
        assert_eq!(wire.path, "");
        let synthetic = wire.synthetic.unwrap();
        assert_eq!((synthetic.samples, synthetic.index), (101, 1));
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
}
