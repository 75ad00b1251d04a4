//! The bundled digits data set and how the demo deals it out to parties.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cohort_train::{
    DataFormat, load_dataset, partition_dirichlet, partition_iid, split_train_test, write_csv,
};

/// scikit-learn's 8×8 digits (see data/README.md for source and licence).
pub const DIGITS_CSV: &str = include_str!("../../../data/digits.csv");

/// Share of the samples held out for evaluation; no party trains on them.
pub const TEST_FRACTION: f64 = 0.2;

pub struct PartyData {
    pub name: String,
    pub dir: PathBuf,
    pub datasets_json: PathBuf,
    pub train_samples: usize,
    pub test_samples: usize,
}

/// Splits digits into a held-out test set and a training set, deals the
/// training set to `parties` with Dirichlet(alpha) label skew and the test
/// set evenly, and writes each party's files and datasets.json.
pub fn write_party_data(
    root: &Path,
    parties: u32,
    alpha: f64,
    seed: u64,
    csv: &str,
) -> anyhow::Result<Vec<PartyData>> {
    if parties == 0 {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let all_path = root.join("digits.csv");
    std::fs::write(&all_path, csv)
        .with_context(|| format!("cannot write {}", all_path.display()))?;
    let all = load_dataset(&all_path, DataFormat::Csv, None, None)?;
    let (train_idx, test_idx) = split_train_test(&all.labels, TEST_FRACTION, seed);
    let train = all.subset(&train_idx);
    let test = all.subset(&test_idx);
    let train_parts = partition_dirichlet(&train.labels, parties as usize, alpha, 20, seed);
    let test_parts = partition_iid(test.n, parties as usize, seed);
    let mut out = Vec::new();
    for (i, (tr, te)) in train_parts.iter().zip(&test_parts).enumerate() {
        let name = format!("party-{}", i + 1);
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        write_csv(&train.subset(tr), &dir.join("train.csv"))?;
        write_csv(&test.subset(te), &dir.join("test.csv"))?;
        let datasets_json = write_datasets_json(
            &dir,
            serde_json::json!({
                "digits": {
                    "path": "train.csv",
                    "format": "csv",
                    "eval_path": "test.csv",
                    "scale": 1.0 / 16.0,
                    "classes": 10,
                }
            }),
        )?;
        out.push(PartyData {
            name,
            dir,
            datasets_json,
            train_samples: tr.len(),
            test_samples: te.len(),
        });
    }
    Ok(out)
}

/// Writes each party's datasets.json with only the synthetic dataset `synthetic`: party
/// `party-<i+1>` has index i and weight 100 + i (`cohort_fl::synthetic`).
pub fn write_synthetic_parties(root: &Path, parties: u32) -> anyhow::Result<Vec<PartyData>> {
    let mut out = Vec::new();
    for i in 0..parties {
        let name = format!("party-{}", i + 1);
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let datasets_json = write_datasets_json(
            &dir,
            serde_json::json!({
                "synthetic": {
                    "format": "synthetic",
                    "samples": cohort_fl::synthetic::weight(u64::from(i)),
                    "index": i,
                }
            }),
        )?;
        out.push(PartyData {
            name,
            dir,
            datasets_json,
            train_samples: 0,
            test_samples: 0,
        });
    }
    Ok(out)
}

/// Writes a party's `datasets.json` in `dir`; returns its path.
fn write_datasets_json(dir: &Path, datasets: serde_json::Value) -> anyhow::Result<PathBuf> {
    let path = dir.join("datasets.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&datasets)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The demo's job: an MLP on digits, every party in every round. The quorum is half the
/// parties but at least two (the smallest cohort parties take by default), and `seed` fixes
/// the initial weights and the parties' data order: the same seed gives the same accuracy.
pub fn demo_job_spec(name: &str, parties: u32, rounds: u32, seed: u64) -> String {
    let min = parties.div_ceil(2).max(2).min(parties.max(1));
    format!(
        "name: {name}\n\
         model: {{arch: mlp, hidden: [128]}}\n\
         data: {{dataset: digits}}\n\
         training:\n  epochs: 3\n  batch_size: 16\n  optimizer: {{name: sgd, lr: 0.1}}\n\
         rounds: {rounds}\n\
         seed: {seed}\n\
         clients: {{per_round: {parties}, min: {min}, round_timeout: 60s}}\n"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parties_get_disjoint_shards_and_the_test_set_is_held_out() {
        let dir = tempfile::tempdir().unwrap();
        let parties = write_party_data(dir.path(), 3, 0.5, 7, DIGITS_CSV).unwrap();
        assert_eq!(parties.len(), 3);
        let train: usize = parties.iter().map(|p| p.train_samples).sum();
        let test: usize = parties.iter().map(|p| p.test_samples).sum();
        assert_eq!(train + test, 1797);
        assert!(
            (test as f64 - 1797.0 * TEST_FRACTION).abs() < 12.0,
            "{test}"
        );
        assert!(parties.iter().all(|p| p.train_samples >= 20));
        let spec = cohort_core::JobSpec::parse(&demo_job_spec("digits-demo", 3, 10, 5)).unwrap();
        assert_eq!((spec.clients.min, spec.seed), (2, Some(5)));
        let one = cohort_core::JobSpec::parse(&demo_job_spec("digits-demo", 1, 10, 5)).unwrap();
        assert_eq!(one.clients.min, 1);
    }
}
