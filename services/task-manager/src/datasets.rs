//! `datasets.json`: the party's map from dataset names to local files, read and checked by
//! `cohort_train::party_datasets` (shared with `cohort check`). Every dataset is read once
//! at start so a bad file is reported before the party registers; here it becomes what the
//! party registers and hands its executors.

use std::path::{Path, PathBuf};

use cohort_proto::v1 as pb;
pub use cohort_train::party_datasets::{DatasetEntry, DatasetsError, SYNTHETIC};

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

pub fn load(path: &Path) -> Result<Vec<LocalDataset>, DatasetsError> {
    Ok(cohort_train::party_datasets::load(path)?
        .into_iter()
        .map(|d| LocalDataset {
            info: pb::DatasetInfo {
                name: d.name.clone(),
                samples: d.shape.samples,
                features: d.shape.features,
                classes: d.shape.classes,
            },
            name: d.name,
            entry: d.entry,
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_dataset_goes_to_the_executor_without_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datasets.json");
        std::fs::write(
            &path,
            r#"{"synthetic": {"format": "synthetic", "samples": 101, "index": 1}}"#,
        )
        .unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded[0].info.samples, 101);
        assert_eq!((loaded[0].info.features, loaded[0].info.classes), (1, 2));
        let wire = loaded[0].to_pb();
        assert_eq!(wire.path, "");
        let synthetic = wire.synthetic.unwrap();
        assert_eq!((synthetic.samples, synthetic.index), (101, 1));
    }
}
