//! SCAFFOLD on the party: the served tensors split into the model and the server's control
//! variate c (`scaffold.c/<tensor>`), the party's own c_i kept in its job state directory
//! (`scaffold_c.safetensors`, surviving executor and task-manager restarts), and the update
//! laid out as the coordinator expects: the model delta, then Δc_i, in the order served.
//!
//! c_i⁺ is written to a temporary file before the update is sent (a full disk fails the
//! task before anything leaves) and renamed over the kept one only once the coordinator
//! has acknowledged the update: a refused or lost update leaves c_i as it was. The file
//! also keeps the c_i the round started from and the round's number: asked to train that
//! round again (a coordinator relaunched from the checkpoint before it, whose c never took
//! this party's Δc_i), the party starts again from that earlier c_i.

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

    /// The c_i to train round `round` with, checked against `model`'s layout, and where it
    /// came from. A file that does not fit is refused, not replaced: it is this party's
    /// state, and starting over is the operator's call.
    pub fn load(&self, model: &[NamedTensor], round: u32) -> anyhow::Result<Start> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Start {
                    client: cohort_train::zero_control(model),
                    from: Origin::Zero,
                });
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
        let kept = Kept::decode(&bytes, model).with_context(|| {
            format!(
                "the client control variate {} does not fit this job's model (remove it to \
                 start this party's control variate from zero)",
                self.path.display()
            )
        })?;
        // Asked to train a round this party already advanced c_i in: the coordinator was
        // relaunched from an earlier checkpoint, whose c never took that Δc_i.
        Ok(if kept.round < round {
            Start {
                client: kept.current,
                from: Origin::Kept { round: kept.round },
            }
        } else {
            Start {
                client: kept.previous,
                from: Origin::RolledBack { round: kept.round },
            }
        })
    }

    /// Writes c_i⁺ (`next`, after training round `round` from `start`) to a temporary file
    /// beside the kept one (synced), to be put in place by [`Pending::commit`] once the
    /// update is acknowledged.
    pub fn prepare(
        &self,
        start: &[NamedTensor],
        next: &[NamedTensor],
        round: u32,
    ) -> anyhow::Result<Pending> {
        let bytes = Kept::encode(start, next, round)?;
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

/// The c_i a round starts from.
#[derive(Debug)]
pub struct Start {
    pub client: Vec<NamedTensor>,
    pub from: Origin,
}

/// Where [`Start::client`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// None kept yet: zeros.
    Zero,
    /// The c_i⁺ of the party's last round (`round`), which the server took.
    Kept { round: u32 },
    /// The c_i from before `round`, the round being trained again: the coordinator that
    /// acknowledged it died before its checkpoint, so its c lacks that Δc_i.
    RolledBack { round: u32 },
}

impl Origin {
    /// For the `trained` log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Zero => "zero",
            Origin::Kept { .. } => "kept",
            Origin::RolledBack { .. } => "rolled_back",
        }
    }
}

/// In the file, beside c_i after round r (the model's tensor names): c_i before round r
/// (`previous/<name>`) and r itself (`round`, one f32: exact, as rounds are at most 100 000).
const PREVIOUS: &str = "previous/";
const ROUND: &str = "round";

/// What the file holds.
struct Kept {
    round: u32,
    current: Vec<NamedTensor>,
    previous: Vec<NamedTensor>,
}

impl Kept {
    fn encode(
        previous: &[NamedTensor],
        current: &[NamedTensor],
        round: u32,
    ) -> anyhow::Result<Vec<u8>> {
        let mut tensors: Vec<NamedTensor> = current.to_vec();
        tensors.extend(previous.iter().map(|t| NamedTensor {
            name: format!("{PREVIOUS}{}", t.name),
            ..t.clone()
        }));
        tensors.push(NamedTensor {
            name: ROUND.to_string(),
            shape: vec![1],
            data: vec![round as f32],
        });
        cohort_fl::to_safetensors(&tensors).context("cannot encode the client control variate")
    }

    fn decode(bytes: &[u8], model: &[NamedTensor]) -> anyhow::Result<Kept> {
        let tensors = cohort_fl::from_safetensors(bytes)?;
        let mut round = None;
        let (mut current, mut previous) = (Vec::new(), Vec::new());
        for t in tensors {
            if t.name == ROUND {
                round = match t.data.as_slice() {
                    [r] if r.fract() == 0.0 && (0.0..=1e7).contains(r) => Some(*r as u32),
                    other => bail!("tensor {ROUND} is {other:?}, not a round number"),
                };
            } else if let Some(name) = t.name.strip_prefix(PREVIOUS) {
                previous.push(NamedTensor {
                    name: name.to_string(),
                    ..t
                });
            } else {
                current.push(t);
            }
        }
        let round = round.with_context(|| format!("no tensor {ROUND}"))?;
        check_layout(&current, model)?;
        check_layout(&previous, model).context(PREVIOUS)?;
        Ok(Kept {
            round,
            current,
            previous,
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

    fn sorted(mut v: Vec<NamedTensor>) -> Vec<NamedTensor> {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    #[test]
    fn the_client_control_starts_at_zero_and_advances_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let state = ClientControl::in_dir(&dir.path().display().to_string()).unwrap();
        let zero = vec![t("fc0.weight", &[2, 3], 0.0), t("fc0.bias", &[2], 0.0)];
        let start = state.load(&model(), 1).unwrap();
        assert_eq!(
            (start.client.clone(), start.from),
            (zero.clone(), Origin::Zero)
        );

        let next = vec![t("fc0.weight", &[2, 3], 0.7), t("fc0.bias", &[2], -0.2)];
        // A refused update: the pending c_i⁺ is dropped, nothing is kept.
        drop(state.prepare(&start.client, &next, 1).unwrap());
        assert_eq!(state.load(&model(), 1).unwrap().from, Origin::Zero);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );

        state
            .prepare(&start.client, &next, 1)
            .unwrap()
            .commit()
            .unwrap();
        let after = state.load(&model(), 2).unwrap();
        assert_eq!(after.from, Origin::Kept { round: 1 });
        assert_eq!(sorted(after.client), sorted(next.clone()));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only {STATE_FILE}"
        );
    }

    /// Round 2 acknowledged, then the coordinator relaunched from round 1's checkpoint
    /// offers round 2 again: the party starts from its c_i of before round 2, not after.
    #[test]
    fn a_round_trained_again_starts_from_the_control_variate_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = ClientControl::in_dir(&dir.path().display().to_string()).unwrap();
        let after_1 = vec![t("fc0.weight", &[2, 3], 0.1), t("fc0.bias", &[2], 0.1)];
        let after_2 = vec![t("fc0.weight", &[2, 3], 0.2), t("fc0.bias", &[2], 0.2)];
        let again_2 = vec![t("fc0.weight", &[2, 3], 0.3), t("fc0.bias", &[2], 0.3)];
        let zero = state.load(&model(), 1).unwrap().client;
        state.prepare(&zero, &after_1, 1).unwrap().commit().unwrap();
        let start = state.load(&model(), 2).unwrap();
        assert_eq!(start.from, Origin::Kept { round: 1 });
        state
            .prepare(&start.client, &after_2, 2)
            .unwrap()
            .commit()
            .unwrap();

        let retried = state.load(&model(), 2).unwrap();
        assert_eq!(retried.from, Origin::RolledBack { round: 2 });
        assert_eq!(sorted(retried.client.clone()), sorted(after_1.clone()));
        state
            .prepare(&retried.client, &again_2, 2)
            .unwrap()
            .commit()
            .unwrap();
        let next = state.load(&model(), 3).unwrap();
        assert_eq!(next.from, Origin::Kept { round: 2 });
        assert_eq!(sorted(next.client), sorted(again_2));
        // And once more: round 2 again still starts from after round 1.
        let once_more = state.load(&model(), 2).unwrap();
        assert_eq!(sorted(once_more.client), sorted(after_1));
    }

    #[test]
    fn a_kept_control_of_another_layout_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = ClientControl::in_dir(&dir.path().display().to_string()).unwrap();
        let other = [t("fc0.weight", &[2, 3], 0.0)];
        state.prepare(&other, &other, 1).unwrap().commit().unwrap();
        let e = format!("{:#}", state.load(&model(), 2).unwrap_err());
        assert!(e.contains(STATE_FILE) && e.contains("fc0.bias"), "{e}");
        std::fs::write(dir.path().join(STATE_FILE), b"not safetensors").unwrap();
        let e = format!("{:#}", state.load(&model(), 2).unwrap_err());
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
