//! The party's update compressed as the job's `compression` asks (`cohort_fl::compress`),
//! and top-k's residual (what error feedback carries to the next round) kept in the job's
//! state directory (`topk_residual.safetensors`, surviving executor and task-manager
//! restarts).
//!
//! The new residual is written to a temporary file before the update is sent and renamed
//! over the kept one only once the coordinator has acknowledged the update: a refused or
//! lost update leaves the residual as it was. Without a state directory (executors started
//! as Kubernetes Pods) every round starts from a zero residual: no error feedback.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use cohort_core::NamedTensor;
use cohort_core::spec::Compression;
use cohort_fl::compress;
use cohort_proto::v1 as pb;

/// Top-k's residual, in the job's state directory.
pub const RESIDUAL_FILE: &str = "topk_residual.safetensors";

/// An update encoded for the wire, with the residual to keep once it is acknowledged.
pub struct Outgoing {
    chunks: Arc<Vec<pb::TensorChunk>>,
    pending: Option<Pending>,
}

impl Outgoing {
    /// Encodes `update` (quantisation draws its rounding from `seed`); for top-k, adds the
    /// residual kept in `state_dir` first and writes the new one aside.
    pub fn encode(
        method: Compression,
        update: Vec<NamedTensor>,
        state_dir: &str,
        seed: u64,
        task: &str,
    ) -> anyhow::Result<Outgoing> {
        let dense: usize = update.iter().map(|t| t.data.len() * 4).sum();
        let keep = match method {
            Compression::TopK { .. } => residual_path(state_dir, task),
            Compression::Quantize { .. } => None,
        };
        let residual = keep.as_deref().and_then(|path| load(path, &update, task));
        let had_residual = residual.is_some();
        let encoded =
            compress::encode(method, update, residual.as_deref(), seed).with_context(|| {
                format!("cannot encode the update ({})", compress::describe(method))
            })?;
        let sent = encoded.wire_bytes();
        tracing::info!(
            %task, dtype = compress::wire_dtype(method), bytes = sent, uncompressed = dense,
            ratio = sent as f64 / dense.max(1) as f64, residual_added = had_residual,
            "update encoded"
        );
        let pending = match (encoded.residual, keep) {
            (Some(residual), Some(path)) => Some(Pending::write(&residual, path)?),
            _ => None,
        };
        Ok(Outgoing {
            chunks: Arc::new(encoded.chunks),
            pending,
        })
    }

    /// The chunks to send, again for every try (each try sends the same chunks).
    pub fn chunks(&self) -> impl Fn() -> std::vec::IntoIter<pb::TensorChunk> + use<> {
        let chunks = self.chunks.clone();
        move || chunks.as_ref().clone().into_iter()
    }

    /// The coordinator took the update: the residual it leaves replaces the kept one.
    pub fn acknowledged(self) -> anyhow::Result<()> {
        match self.pending {
            Some(pending) => pending.commit(),
            None => Ok(()),
        }
    }
}

/// Where the residual lives; None (with a warning) when the executor has no state
/// directory.
fn residual_path(state_dir: &str, task: &str) -> Option<PathBuf> {
    if state_dir.is_empty() {
        tracing::warn!(
            %task,
            "top-k error feedback is off: this executor has no state directory (an executor \
             Pod?), so every round starts from a zero residual"
        );
        return None;
    }
    Some(Path::new(state_dir).join(RESIDUAL_FILE))
}

/// The kept residual in `update`'s tensor order; None when there is none yet, or (with a
/// warning: it only carries what earlier rounds left out) when it cannot be read or does
/// not fit the update.
fn load(path: &Path, update: &[NamedTensor], task: &str) -> Option<Vec<NamedTensor>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(%task, file = %path.display(), error = %e, "cannot read the top-k residual; starting from zero");
            return None;
        }
    };
    let fitted = cohort_fl::from_safetensors(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|kept| in_order_of(kept, update));
    match fitted {
        Ok(residual) => Some(residual),
        Err(why) => {
            tracing::warn!(%task, file = %path.display(), %why, "the top-k residual does not fit this update; starting from zero");
            None
        }
    }
}

/// `kept` in `update`'s order, every tensor there with the update's shape.
fn in_order_of(
    mut kept: Vec<NamedTensor>,
    update: &[NamedTensor],
) -> Result<Vec<NamedTensor>, String> {
    if kept.len() != update.len() {
        return Err(format!(
            "{} tensors kept, {} in the update",
            kept.len(),
            update.len()
        ));
    }
    update
        .iter()
        .map(|u| {
            let at = kept
                .iter()
                .position(|k| k.name == u.name)
                .ok_or_else(|| format!("no tensor {:?} kept", u.name))?;
            let k = kept.swap_remove(at);
            if k.shape != u.shape || k.data.len() != u.data.len() {
                return Err(format!(
                    "tensor {:?} kept with shape {:?}, the update's is {:?}",
                    u.name, k.shape, u.shape
                ));
            }
            Ok(k)
        })
        .collect()
}

/// A new residual written aside (synced), waiting for the update's acknowledgement;
/// dropped without [`Pending::commit`] it is removed.
struct Pending {
    temp: PathBuf,
    path: PathBuf,
}

impl Pending {
    fn write(residual: &[NamedTensor], path: PathBuf) -> anyhow::Result<Pending> {
        let bytes =
            cohort_fl::to_safetensors(residual).context("cannot encode the top-k residual")?;
        let temp = path.with_file_name(format!(".{RESIDUAL_FILE}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&temp);
            return Err(e)
                .with_context(|| format!("cannot write the top-k residual to {}", temp.display()));
        }
        Ok(Pending { temp, path })
    }

    /// Puts the new residual in place of the kept one (a rename: a crash leaves one or the
    /// other, whole).
    fn commit(self) -> anyhow::Result<()> {
        if let Err(e) = std::fs::rename(&self.temp, &self.path) {
            // The kept residual was sent with this update: adding it again would count it
            // twice.
            let _ = std::fs::remove_file(&self.path);
            return Err(e).with_context(|| {
                format!(
                    "the update was accepted but the top-k residual could not be moved from {} \
                     to {} (the next round starts from zero)",
                    self.temp.display(),
                    self.path.display()
                )
            });
        }
        if let Some(dir) = self.path.parent()
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // After a commit the temporary name is gone; otherwise the update was not taken.
        let _ = std::fs::remove_file(&self.temp);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn update(values: &[f32]) -> Vec<NamedTensor> {
        vec![
            NamedTensor {
                name: "w".into(),
                shape: vec![values.len()],
                data: values.to_vec(),
            },
            NamedTensor {
                name: "b".into(),
                shape: vec![1],
                data: vec![0.5],
            },
        ]
    }

    fn decoded(out: &Outgoing, of: &[NamedTensor]) -> Vec<f32> {
        let d = cohort_fl::UpdateDecoder::new(
            Some(Compression::TopK { fraction: 0.25 }),
            &cohort_fl::wire::Layout::of(of),
        );
        let mut values = Vec::new();
        for c in out.chunks()().filter(|c| c.tensor == "w") {
            cohort_fl::wire::extend_from_le_bytes(&mut values, &d.decode(c).unwrap().data);
        }
        values
    }

    #[test]
    fn the_residual_is_kept_only_once_the_update_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_str().unwrap();
        let method = Compression::TopK { fraction: 0.25 };
        let u = update(&[4.0, 3.0, 2.0, 1.0]);
        // Round 1: 4 sent, 3 2 1 kept once acknowledged.
        let first = Outgoing::encode(method, u.clone(), state, 1, "t1").unwrap();
        assert_eq!(decoded(&first, &u), [4.0, 0.0, 0.0, 0.0]);
        assert!(
            !dir.path().join(RESIDUAL_FILE).exists(),
            "not before the ack"
        );
        first.acknowledged().unwrap();
        let kept =
            cohort_fl::from_safetensors(&std::fs::read(dir.path().join(RESIDUAL_FILE)).unwrap())
                .unwrap();
        let w = kept.iter().find(|t| t.name == "w").unwrap();
        assert_eq!(w.data, [0.0, 3.0, 2.0, 1.0]);
        // Round 2 adds it: 3 + 3 = 6 goes; a refused update leaves the residual as it was.
        let refused = Outgoing::encode(method, u.clone(), state, 2, "t2").unwrap();
        assert_eq!(decoded(&refused, &u), [0.0, 6.0, 0.0, 0.0]);
        drop(refused);
        let again =
            cohort_fl::from_safetensors(&std::fs::read(dir.path().join(RESIDUAL_FILE)).unwrap())
                .unwrap();
        assert_eq!(again, kept);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        // A residual of another model is set aside: zero.
        let other = update(&[1.0, 1.0]);
        let fresh = Outgoing::encode(method, other.clone(), state, 3, "t3").unwrap();
        assert_eq!(decoded(&fresh, &other), [1.0, 0.0]);
    }

    #[test]
    fn without_a_state_directory_every_round_starts_from_zero() {
        let method = Compression::TopK { fraction: 0.25 };
        let u = update(&[4.0, 3.0, 2.0, 1.0]);
        for round in 0..2 {
            let out = Outgoing::encode(method, u.clone(), "", round, "t").unwrap();
            assert_eq!(decoded(&out, &u), [4.0, 0.0, 0.0, 0.0]);
            out.acknowledged().unwrap();
        }
    }

    #[test]
    fn quantised_updates_keep_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outgoing::encode(
            Compression::Quantize { bits: 8 },
            update(&[1.0, -1.0]),
            dir.path().to_str().unwrap(),
            1,
            "t",
        )
        .unwrap();
        assert!(out.chunks()().all(|c| c.dtype == "q8"));
        out.acknowledged().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
