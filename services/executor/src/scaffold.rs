//! SCAFFOLD on the party: the served tensors split into the model and the server's control
//! variate c (`scaffold.c/<tensor>`), the party's own c_i kept in its job state directory
//! (`scaffold_c.safetensors`, surviving executor and task-manager restarts), and the update
//! laid out as the coordinator expects: the model delta, then Δc_i, in the order served.
//!
//! c_i⁺ is written to a temporary file before the update is sent (a full disk fails the
//! task before anything leaves) and renamed over the kept one only once the coordinator
//! has acknowledged the update: a refused or lost update leaves c_i as it was.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cohort_core::NamedTensor;
use cohort_fl::strategy::CONTROL_PREFIX;

/// The party's control variate, in the job's state directory.
pub const STATE_FILE: &str = "scaffold_c.safetensors";

/// The served tensors, split: the model and the server's control variate (one tensor per
/// model tensor, named as the model's, same shape).
pub fn split(served: Vec<NamedTensor>) -> anyhow::Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
    let (control, model): (Vec<_>, Vec<_>) = served
        .into_iter()
        .partition(|t| t.name.starts_with(CONTROL_PREFIX));
    let control: Vec<NamedTensor> = control
        .into_iter()
        .map(|t| NamedTensor {
            name: t.name[CONTROL_PREFIX.len()..].to_string(),
            ..t
        })
        .collect();
    check_layout(&control, &model)
        .context("the served model does not carry a server control variate that fits it")?;
    Ok((model, control))
}

/// `update` (the model delta) followed by `delta_c` (Δc_i, named `scaffold.c/<tensor>`),
/// each in the order of `served`: the round tensors' layout the coordinator checks.
pub fn update(
    served_order: &[String],
    delta: Vec<NamedTensor>,
    delta_c: Vec<NamedTensor>,
) -> anyhow::Result<Vec<NamedTensor>> {
    let mut delta: Vec<Option<NamedTensor>> = delta.into_iter().map(Some).collect();
    let mut delta_c: Vec<Option<NamedTensor>> = delta_c.into_iter().map(Some).collect();
    let take = |from: &mut Vec<Option<NamedTensor>>, name: &str| {
        from.iter_mut()
            .find(|t| t.as_ref().is_some_and(|t| t.name == name))
            .and_then(Option::take)
    };
    served_order
        .iter()
        .map(|name| match name.strip_prefix(CONTROL_PREFIX) {
            Some(model_name) => {
                let t = take(&mut delta_c, model_name)
                    .with_context(|| format!("no Δc for the served {name}"))?;
                Ok(NamedTensor {
                    name: name.clone(),
                    ..t
                })
            }
            None => take(&mut delta, name).with_context(|| format!("no delta for tensor {name}")),
        })
        .collect()
}

/// Where the party keeps its c_i for one job.
#[derive(Debug)]
pub struct ClientControl {
    path: PathBuf,
}

impl ClientControl {
    /// The c_i file in `state_dir`, the job's directory in the party's workspace. Refused
    /// when there is none: without a c_i that lasts from round to round the Δc_i sent would
    /// restart from zero every round and drag the server's c away from the mean of the
    /// parties' (an executor Pod does not see the party's workspace).
    pub fn in_dir(state_dir: &str) -> anyhow::Result<Self> {
        if state_dir.is_empty() {
            bail!(
                "scaffold needs a party state directory for the client control variate, and \
                 this executor was given none (task.state_dir is empty; executors started as \
                 Kubernetes Pods keep no state: run this party's executors as processes)"
            );
        }
        let dir = Path::new(state_dir);
        if !dir.is_dir() {
            bail!(
                "scaffold needs the party state directory {} for the client control \
                 variate, and it is not a directory here (executors started as Kubernetes \
                 Pods do not see the party's workspace: run this party's executors as \
                 processes)",
                dir.display()
            );
        }
        Ok(ClientControl {
            path: dir.join(STATE_FILE),
        })
    }

    /// The kept c_i, checked against `model`'s layout; zeros when the party has none yet
    /// (the bool says whether one was kept). A file that does not fit is refused, not
    /// replaced: it is this party's state, and starting over is the operator's call.
    pub fn load(&self, model: &[NamedTensor]) -> anyhow::Result<(Vec<NamedTensor>, bool)> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((cohort_train::zero_control(model), false));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot read the client control variate {}",
                        self.path.display()
                    )
                });
            }
        };
        let kept = cohort_fl::from_safetensors(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(|c| check_layout(&c, model).map(|()| c))
            .with_context(|| {
                format!(
                    "the client control variate {} does not fit this job's model (remove it \
                     to start this party's control variate from zero)",
                    self.path.display()
                )
            })?;
        Ok((kept, true))
    }

    /// Writes `c` to a temporary file beside the kept one (synced), to be put in place by
    /// [`Pending::commit`] once the update is acknowledged.
    pub fn prepare(&self, c: &[NamedTensor]) -> anyhow::Result<Pending> {
        let bytes =
            cohort_fl::to_safetensors(c).context("cannot encode the client control variate")?;
        let temp = self
            .path
            .with_file_name(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&temp);
            return Err(e).with_context(|| {
                format!(
                    "cannot write the client control variate to {}",
                    temp.display()
                )
            });
        }
        Ok(Pending {
            temp,
            path: self.path.clone(),
        })
    }
}

/// A c_i⁺ written aside, waiting for the update's acknowledgement; dropped without
/// [`Pending::commit`] (a refused update) it is removed.
#[derive(Debug)]
pub struct Pending {
    temp: PathBuf,
    path: PathBuf,
}

impl Pending {
    /// Puts c_i⁺ in place of c_i (a rename: a crash leaves one or the other, whole).
    pub fn commit(self) -> anyhow::Result<()> {
        std::fs::rename(&self.temp, &self.path).with_context(|| {
            format!(
                "the update was accepted but the client control variate could not be moved \
                 from {} to {}",
                self.temp.display(),
                self.path.display()
            )
        })?;
        // The rename itself is durable once the directory is synced.
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

/// `control` has exactly `model`'s tensors (names, shapes, value counts), finite.
fn check_layout(control: &[NamedTensor], model: &[NamedTensor]) -> anyhow::Result<()> {
    for t in model {
        let mut found = control.iter().filter(|c| c.name == t.name);
        let Some(c) = found.next() else {
            bail!("no control variate for tensor {}", t.name);
        };
        if found.next().is_some() {
            bail!("the control variate of tensor {} appears twice", t.name);
        }
        if c.shape != t.shape || c.data.len() != t.data.len() {
            bail!(
                "the control variate of tensor {} has shape {:?}, the model's is {:?}",
                t.name,
                c.shape,
                t.shape
            );
        }
        if let Some(i) = c.data.iter().position(|v| !v.is_finite()) {
            bail!(
                "the control variate of tensor {} holds a non-finite value at {i}",
                t.name
            );
        }
    }
    if let Some(extra) = control
        .iter()
        .find(|c| !model.iter().any(|t| t.name == c.name))
    {
        bail!("control variate {} matches no model tensor", extra.name);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize], v: f32) -> NamedTensor {
        NamedTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            data: vec![v; shape.iter().product()],
        }
    }

    fn model() -> Vec<NamedTensor> {
        vec![t("fc0.weight", &[2, 3], 0.5), t("fc0.bias", &[2], 0.1)]
    }

    #[test]
    fn the_served_tensors_split_into_model_and_control_and_the_update_keeps_their_order() {
        let served = vec![
            t("fc0.weight", &[2, 3], 0.5),
            t("fc0.bias", &[2], 0.1),
            t("scaffold.c/fc0.weight", &[2, 3], 0.2),
            t("scaffold.c/fc0.bias", &[2], 0.3),
        ];
        let order: Vec<String> = served.iter().map(|t| t.name.clone()).collect();
        let (m, c) = split(served).unwrap();
        assert_eq!(m, model());
        assert_eq!(
            c,
            vec![t("fc0.weight", &[2, 3], 0.2), t("fc0.bias", &[2], 0.3)]
        );
        // Given in another order, laid out as served.
        let delta = vec![t("fc0.bias", &[2], 1.0), t("fc0.weight", &[2, 3], 2.0)];
        let delta_c = vec![t("fc0.bias", &[2], 3.0), t("fc0.weight", &[2, 3], 4.0)];
        let sent = update(&order, delta, delta_c).unwrap();
        assert_eq!(
            sent,
            vec![
                t("fc0.weight", &[2, 3], 2.0),
                t("fc0.bias", &[2], 1.0),
                t("scaffold.c/fc0.weight", &[2, 3], 4.0),
                t("scaffold.c/fc0.bias", &[2], 3.0),
            ]
        );
    }

    #[test]
    fn a_served_control_that_does_not_fit_the_model_is_refused_naming_the_tensor() {
        let e = split(model()).unwrap_err();
        assert!(
            format!("{e:#}").contains("no control variate for tensor fc0.weight"),
            "{e:#}"
        );
        let mut served = model();
        served.push(t("scaffold.c/fc0.weight", &[3, 2], 0.0));
        served.push(t("scaffold.c/fc0.bias", &[2], 0.0));
        let e = split(served).unwrap_err();
        assert!(
            format!("{e:#}").contains("fc0.weight has shape [3, 2]"),
            "{e:#}"
        );
    }

    #[test]
    fn the_client_control_starts_at_zero_and_advances_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let state = ClientControl::in_dir(&dir.path().display().to_string()).unwrap();
        let (c, kept) = state.load(&model()).unwrap();
        assert!(!kept);
        assert_eq!(
            c,
            vec![t("fc0.weight", &[2, 3], 0.0), t("fc0.bias", &[2], 0.0)]
        );

        let next = vec![t("fc0.weight", &[2, 3], 0.7), t("fc0.bias", &[2], -0.2)];
        // A refused update: the pending c_i⁺ is dropped, nothing is kept.
        drop(state.prepare(&next).unwrap());
        assert!(!state.load(&model()).unwrap().1);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );

        state.prepare(&next).unwrap().commit().unwrap();
        let (c, kept) = state.load(&model()).unwrap();
        assert!(kept);
        let mut expected = next.clone();
        expected.sort_by(|a, b| a.name.cmp(&b.name));
        let mut c = c;
        c.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(c, expected);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only {STATE_FILE}"
        );
    }

    #[test]
    fn a_kept_control_of_another_layout_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = ClientControl::in_dir(&dir.path().display().to_string()).unwrap();
        state
            .prepare(&[t("fc0.weight", &[2, 3], 0.0)])
            .unwrap()
            .commit()
            .unwrap();
        let e = format!("{:#}", state.load(&model()).unwrap_err());
        assert!(e.contains(STATE_FILE) && e.contains("fc0.bias"), "{e}");
        std::fs::write(dir.path().join(STATE_FILE), b"not safetensors").unwrap();
        let e = format!("{:#}", state.load(&model()).unwrap_err());
        assert!(e.contains(STATE_FILE), "{e}");
    }

    #[test]
    fn no_state_directory_is_refused_with_the_reason() {
        let e = ClientControl::in_dir("").unwrap_err().to_string();
        assert!(e.contains("state directory") && e.contains("Pods"), "{e}");
        let e = ClientControl::in_dir("/nonexistent/jobs/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/jobs/x"), "{e}");
    }
}
