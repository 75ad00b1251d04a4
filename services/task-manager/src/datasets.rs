//! `datasets.json`: the party's map from dataset names to local files.
//!
//! ```json
//! {"digits": {"path": "digits-train.csv", "format": "csv", "eval_path": "digits-test.csv",
//!             "scale": 0.0625, "classes": 10}}
//! ```
//! Relative paths are relative to the file's directory. Every dataset is read
//! once at start so a bad file is reported before the party registers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cohort_proto::v1 as pb;
use cohort_train::DataFormat;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    pub path: PathBuf,
    pub format: String,
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
        pb::LocalDataset {
            path: self.entry.path.display().to_string(),
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
        resolve(&mut entry.path);
        for p in [
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
        let data =
            cohort_train::load_dataset(&entry.path, format, entry.labels.as_deref(), entry.scale)
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
