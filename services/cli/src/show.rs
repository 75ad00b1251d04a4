//! How API objects are shown: JSON for machines, short text for people.

use cohort_proto::v1 as pb;
use serde_json::{Value, json};

pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Unspecified => "UNSPECIFIED",
        pb::JobState::Queued => "QUEUED",
        pb::JobState::Starting => "STARTING",
        pb::JobState::Running => "RUNNING",
        pb::JobState::Stopping => "STOPPING",
        pb::JobState::Succeeded => "SUCCEEDED",
        pb::JobState::Failed => "FAILED",
        pb::JobState::Stopped => "STOPPED",
        pb::JobState::Deleting => "DELETING",
    }
}

pub fn is_terminal(state: i32) -> bool {
    matches!(state_name(state), "SUCCEEDED" | "FAILED" | "STOPPED")
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn finite(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

pub fn round_json(r: &pb::RoundSummary) -> Value {
    let e = r.evaluation.unwrap_or_default();
    json!({
        "refused_updates": r.refused_updates,
        "dropped_updates": r.dropped_updates,
        "task_failures": r.task_failures,
        "robust_accuracy": if r.robust_accuracy > 0.0 { finite(r.robust_accuracy) } else { Value::Null },
        "round": r.round,
        "accuracy": if e.samples > 0 { finite(e.accuracy) } else { Value::Null },
        "loss": if e.samples > 0 { finite(e.loss) } else { Value::Null },
        "eval_samples": e.samples,
        "eval_parties": r.eval_parties,
        "eval_parties_expected": r.eval_parties_expected,
        "train_loss": finite(r.train_loss),
        "updates": r.updates,
        "model_version": r.model_version,
        "duration_ms": r.duration_ms,
        "bytes_to_parties": r.bytes_to_parties,
        "bytes_from_parties": r.bytes_from_parties,
        "selected": r.selected.iter().map(|p| json!({
            "party": p.party, "score": finite(p.score), "outcome": p.outcome,
        })).collect::<Vec<_>>(),
        "bytes_from_parties_uncompressed": r.bytes_from_parties_uncompressed,
        "epsilon": epsilon_json(r),
        "sampling_rate": if dp_round(r) { json!(r.dp_sampling_rate) } else { Value::Null },
    })
}

/// Whether the round was accounted for under `privacy.dp` (its sampling rate is never 0).
fn dp_round(r: &pb::RoundSummary) -> bool {
    r.dp_sampling_rate > 0.0
}

/// ε after the round: a number, "inf" without noise (JSON has no infinity), null without DP.
fn epsilon_json(r: &pb::RoundSummary) -> Value {
    match (dp_round(r), r.dp_epsilon) {
        (false, _) => Value::Null,
        (true, e) if e.is_finite() => json!(e),
        (true, _) => json!("inf"),
    }
}

/// ε for people: three decimals, or ∞.
fn epsilon_text(e: f64) -> String {
    if e.is_finite() {
        format!("{e:.3}")
    } else {
        "∞".into()
    }
}

/// Bytes as megabytes (10^6) to three significant digits or so.
fn megabytes(bytes: u64) -> String {
    let mb = bytes as f64 / 1e6;
    if mb < 10.0 {
        format!("{mb:.2}")
    } else if mb < 1000.0 {
        format!("{mb:.1}")
    } else {
        format!("{mb:.0}")
    }
}

/// The last evaluated round's accuracy.
pub fn last_accuracy(job: &pb::Job) -> Option<f64> {
    job.rounds
        .iter()
        .rev()
        .find_map(|r| r.evaluation.filter(|e| e.samples > 0).map(|e| e.accuracy))
}

pub fn job_json(j: &pb::Job) -> Value {
    let spec: Value = serde_json::from_str(&j.spec_json).unwrap_or(Value::Null);
    json!({
        "id": j.id,
        "name": j.name,
        "namespace": j.namespace,
        "state": state_name(j.state),
        "reason": j.reason,
        "rounds_total": j.rounds_total,
        "rounds_completed": j.rounds_completed,
        "best_round": if j.best_round > 0 { json!(j.best_round) } else { Value::Null },
        "last_round": if j.last_round > 0 { json!(j.last_round) } else { Value::Null },
        "accuracy": last_accuracy(j),
        "model": j.model_name,
        "created_at": time(j.created_at_ms),
        "updated_at": time(j.updated_at_ms),
        "rounds": j.rounds.iter().map(round_json).collect::<Vec<_>>(),
        "spec": spec,
    })
}

pub fn job_line(j: &pb::Job) -> String {
    let acc = last_accuracy(j)
        .map(|a| format!("  accuracy {a:.4}"))
        .unwrap_or_default();
    let spent = j
        .rounds
        .last()
        .filter(|r| dp_round(r))
        .map(|r| format!("  ε {}", epsilon_text(r.dp_epsilon)))
        .unwrap_or_default();
    format!(
        "{:<32} {:<10} {:<10} round {}/{}{}{}  {}",
        j.id,
        j.namespace,
        state_name(j.state),
        j.rounds_completed,
        j.rounds_total,
        acc,
        spent,
        j.reason
    )
}

pub fn job_text(j: &pb::Job) -> String {
    let round = |r: u32| if r > 0 { r.to_string() } else { "-".into() };
    let mut s = format!(
        "job         {}\nnamespace   {}\nstate       {}\nreason      {}\nrounds      {}/{}\nbest round  {}\nlast round  {}\nmodel       {}\ncreated     {}\n",
        j.id,
        j.namespace,
        state_name(j.state),
        j.reason,
        j.rounds_completed,
        j.rounds_total,
        round(j.best_round),
        round(j.last_round),
        j.model_name,
        time(j.created_at_ms)
    );
    if !j.rounds.is_empty() {
        s.push_str(
            "\nround  updates  dropped  task_failures  evaluated  accuracy  loss      train_loss  version  seconds   MB to/from\n",
        );
        let mut partial = false;
        for r in &j.rounds {
            let e = r.evaluation.unwrap_or_default();
            let evaluated = if r.eval_parties_expected > 0 {
                partial |= r.eval_parties < r.eval_parties_expected;
                format!("{}/{}", r.eval_parties, r.eval_parties_expected)
            } else {
                "-".into()
            };
            // Rounds recorded before bytes were counted show none.
            let moved = if r.bytes_to_parties > 0 || r.bytes_from_parties > 0 {
                format!(
                    "{}/{}",
                    megabytes(r.bytes_to_parties),
                    megabytes(r.bytes_from_parties)
                )
            } else {
                "-".into()
            };
            s.push_str(&format!(
                "{:>5}  {:>7}  {:>7}  {:>13}  {:>9}  {:>8}  {:>8}  {:>10.4}  {:>7}  {:>7.2}  {:>11}\n",
                r.round,
                r.updates,
                r.dropped_updates,
                r.task_failures,
                evaluated,
                if e.samples > 0 {
                    format!("{:.4}", e.accuracy)
                } else {
                    "-".into()
                },
                if e.samples > 0 {
                    format!("{:.4}", e.loss)
                } else {
                    "-".into()
                },
                r.train_loss,
                r.model_version,
                r.duration_ms as f64 / 1000.0,
                moved
            ));
        }
        if let Some(line) = compression_line(&j.rounds) {
            s.push_str(&line);
        }
        if partial {
            s.push_str(
                "\nevaluated p/q: p of the q parties holding the data reported; a round with p < q \
                 measured its accuracy on part of the held-out data only\n",
            );
        }
        s.push_str(&privacy_text(j));
        s.push_str(&selected_text(&j.rounds));
    }
    s
}

/// The privacy each round spent under `privacy.dp`, with the spec's δ and budget; nothing
/// for a job without DP.
fn privacy_text(j: &pb::Job) -> String {
    if !j.rounds.iter().any(dp_round) {
        return String::new();
    }
    let spec: Value = serde_json::from_str(&j.spec_json).unwrap_or(Value::Null);
    let dp = &spec["privacy"]["dp"];
    let delta = dp["delta"]
        .as_f64()
        .map_or("?".into(), |d| format!("{d:e}"));
    let budget = dp["target_epsilon"]
        .as_f64()
        .map(|t| format!(", budget ε ≤ {t}"))
        .unwrap_or_default();
    let local = if dp["local"].as_bool() == Some(true) {
        " (noise added by the parties: local DP)"
    } else {
        ""
    };
    let mut s = format!(
        "\nprivacy: ε spent at δ = {delta}{budget}{local}\nround  ε          sampling rate\n"
    );
    for r in j.rounds.iter().filter(|r| dp_round(r)) {
        s.push_str(&format!(
            "{:>5}  {:<9}  {:.3}\n",
            r.round,
            epsilon_text(r.dp_epsilon),
            r.dp_sampling_rate
        ));
    }
    s
}

/// Whom each round's selection drew for training, with each one's score and
/// what became of its task; nothing when no round recorded it.
fn selected_text(rounds: &[pb::RoundSummary]) -> String {
    if rounds.iter().all(|r| r.selected.is_empty()) {
        return String::new();
    }
    let mut s = String::from("\nround  selected for training: party (score) outcome\n");
    for r in rounds.iter().filter(|r| !r.selected.is_empty()) {
        let drawn: Vec<String> = r
            .selected
            .iter()
            .map(|p| format!("{} ({}) {}", p.party, score(p.score), p.outcome))
            .collect();
        s.push_str(&format!("{:>5}  {}\n", r.round, drawn.join(", ")));
    }
    s
}

/// A selection score: samples are whole, scores in (0, 1] have three decimals.
fn score(v: f64) -> String {
    if v.fract() == 0.0 && v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// How much the parties' compression saved over the rounds that counted it; None when
/// the updates went uncompressed.
fn compression_line(rounds: &[pb::RoundSummary]) -> Option<String> {
    let counted = rounds
        .iter()
        .filter(|r| r.bytes_from_parties_uncompressed > 0);
    let (sent, dense) = counted.fold((0u64, 0u64), |(s, d), r| {
        (
            s.saturating_add(r.bytes_from_parties),
            d.saturating_add(r.bytes_from_parties_uncompressed),
        )
    });
    (dense > 0 && sent < dense).then(|| {
        format!(
            "\nupdates compressed: {} MB received for {} MB of f32 values ({:.1} %)\n",
            megabytes(sent),
            megabytes(dense),
            100.0 * sent as f64 / dense as f64
        )
    })
}

/// A job log entry: `kind` is "state" for a state change (from -> to), else what happened
/// ("task_failed", "party_left_out", ...); round, party and task are null when not about one.
pub fn event_json(e: &pb::JobEvent) -> Value {
    let text = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    json!({
        "seq": e.seq,
        "time": time(e.time_ms),
        "kind": if e.kind.is_empty() { "state" } else { e.kind.as_str() },
        "from": if e.from == 0 { Value::Null } else { json!(state_name(e.from)) },
        "to": state_name(e.to),
        "round": if e.round > 0 { json!(e.round) } else { Value::Null },
        "party": text(&e.party),
        "task_id": text(&e.task_id),
        "reason": e.reason,
    })
}

/// The column titles above [`event_line`]s.
pub fn event_header() -> String {
    format!(
        "{:<24}  {:<22}  {:>5}  {:<16}  {:<16}  REASON",
        "TIME", "EVENT", "ROUND", "PARTY", "TASK"
    )
}

/// One log entry as a line: time, what (from -> to, or the kind), round, party, task, reason.
pub fn event_line(e: &pb::JobEvent) -> String {
    let what = if e.kind.is_empty() {
        let from = if e.from == 0 { "-" } else { state_name(e.from) };
        format!("{from} -> {}", state_name(e.to))
    } else {
        e.kind.clone()
    };
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    format!(
        "{:<24}  {:<22}  {:>5}  {:<16}  {:<16}  {}",
        time(e.time_ms),
        what,
        if e.round > 0 {
            e.round.to_string()
        } else {
            "-".into()
        },
        or_dash(&e.party),
        or_dash(&e.task_id),
        e.reason
    )
}

pub fn version_json(v: &pb::ModelVersion) -> Value {
    let l = v.lineage.clone().unwrap_or_default();
    let m = v.metrics.unwrap_or_default();
    json!({
        "name": v.name,
        "version": v.version,
        "digest": v.digest,
        "size_bytes": v.size_bytes,
        "job_id": l.job_id,
        "round": l.round,
        "parent_version": l.parent_version,
        "parties": l.parties,
        "metrics": {
            "accuracy": if m.samples > 0 { finite(m.accuracy) } else { Value::Null },
            "loss": if m.samples > 0 { finite(m.loss) } else { Value::Null },
            "samples": m.samples,
        },
        "created_at": time(v.created_at_ms),
    })
}

pub fn version_line(v: &pb::ModelVersion) -> String {
    let l = v.lineage.clone().unwrap_or_default();
    let m = v.metrics.unwrap_or_default();
    let acc = if m.samples > 0 {
        format!("{:.4}", m.accuracy)
    } else {
        "-".into()
    };
    format!(
        "{}@{:<4} round {:<4} accuracy {:<7} {:>9} B  sha256:{}  job {}",
        v.name, v.version, l.round, acc, v.size_bytes, v.digest, l.job_id
    )
}

/// A model version as `cohort model get` shows it: its line, then the parties whose updates
/// made it (a job's round).
pub fn version_text(v: &pb::ModelVersion) -> String {
    let parties = v
        .lineage
        .as_ref()
        .map(|l| l.parties.as_slice())
        .unwrap_or(&[]);
    if parties.is_empty() {
        return version_line(v);
    }
    format!("{}\nparties     {}", version_line(v), parties.join(", "))
}

pub fn client_line(c: &pb::ClientInfo) -> String {
    let ds: Vec<String> = c
        .datasets
        .iter()
        .map(|d| format!("{}({})", d.name, d.samples))
        .collect();
    let r = c.reliability.unwrap_or_default();
    let free = c
        .resources
        .as_ref()
        .and_then(|r| r.free)
        .filter(|_| c.connected)
        .map(|f| {
            format!(
                "  free {:.1} cpu {:.1} GiB",
                f64::from(f.cpu_millis) / 1000.0,
                f.memory_bytes as f64 / f64::from(1u32 << 30)
            )
        })
        .unwrap_or_default()
        + &c.resources.as_ref().map(gpus_text).unwrap_or_default();
    format!(
        "{:<20} {:<13} tasks {}/{} ok  reliability {:.2} ({} finished, {} failed, {} timed out){}  {}",
        c.party,
        if c.revoked {
            "revoked"
        } else if c.connected {
            "connected"
        } else {
            "disconnected"
        },
        c.tasks_succeeded,
        c.tasks_offered,
        r.score,
        r.finished,
        r.failed,
        r.timed_out,
        free,
        ds.join(" ")
    )
}

/// A party's GPUs for its line: "  gpus 2 (NVIDIA H100 80 GiB, …)", free ones when it says.
fn gpus_text(r: &pb::Resources) -> String {
    if r.gpus == 0 {
        return String::new();
    }
    let described: Vec<String> = r
        .gpu_devices
        .iter()
        .filter(|g| !g.name.is_empty() || g.memory_bytes > 0)
        .map(|g| match g.memory_bytes {
            0 => g.name.clone(),
            m => format!("{} {:.0} GiB", g.name, m as f64 / f64::from(1u32 << 30))
                .trim()
                .to_string(),
        })
        .collect();
    let free = r
        .free
        .map(|f| format!(", {} free", f.gpus))
        .unwrap_or_default();
    match described.is_empty() {
        true => format!("  gpus {}{free}", r.gpus),
        false => format!("  gpus {}{free} ({})", r.gpus, described.join(", ")),
    }
}

pub fn client_json(c: &pb::ClientInfo) -> Value {
    let r = c.resources.clone().unwrap_or_default();
    let rel = c.reliability.unwrap_or_default();
    json!({
        "party": c.party,
        "connected": c.connected,
        "datasets": c.datasets.iter().map(|d| json!({
            "name": d.name, "samples": d.samples, "features": d.features, "classes": d.classes,
        })).collect::<Vec<_>>(),
        "resources": {
            "cpus": r.cpus, "memory_bytes": r.memory_bytes, "gpus": r.gpus, "max_tasks": r.max_tasks,
            "gpu_devices": r.gpu_devices.iter().map(|g| json!({
                "name": g.name, "memory_bytes": g.memory_bytes,
            })).collect::<Vec<_>>(),
            // What a connected party last said is free.
            "free": r.free.map(|f| json!({
                "cpu_millis": f.cpu_millis, "memory_bytes": f.memory_bytes, "gpus": f.gpus,
            })),
        },
        // Its training tasks as the coordinators judged them, and the score
        // `selection: reliability` draws it with.
        "reliability": {
            "finished": rel.finished,
            "failed": rel.failed,
            "timed_out": rel.timed_out,
            "score": finite(rel.score),
            "last_result": time(rel.last_result_ms),
        },
        "running_tasks": c.running_tasks,
        "last_seen": time(c.last_seen_ms),
        "tasks_offered": c.tasks_offered,
        "tasks_succeeded": c.tasks_succeeded,
        "tasks_failed": c.tasks_failed,
        "revoked": c.revoked,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round(n: u32, bytes_to_parties: u64, bytes_from_parties: u64) -> pb::RoundSummary {
        pb::RoundSummary {
            round: n,
            updates: 4,
            model_version: n,
            duration_ms: 850,
            bytes_to_parties,
            bytes_from_parties,
            ..Default::default()
        }
    }

    #[test]
    fn rounds_show_the_bytes_they_moved() {
        let job = pb::Job {
            id: "j-abc123".into(),
            rounds_total: 3,
            rounds_completed: 3,
            rounds: vec![
                round(1, 0, 0),
                round(2, 400_000_000, 1_600_000_008),
                round(3, 80_000, 3_000_000_000),
            ],
            ..Default::default()
        };
        let json = job_json(&job);
        let bytes: Vec<(u64, u64)> = json["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["bytes_to_parties"].as_u64().unwrap(),
                    r["bytes_from_parties"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            bytes,
            [
                (0, 0),
                (400_000_000, 1_600_000_008),
                (80_000, 3_000_000_000)
            ]
        );

        let text = job_text(&job);
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("round  ")).unwrap();
        assert!(lines[header].ends_with("seconds   MB to/from"), "{text}");
        let last_column = |l: &str| l.split_whitespace().last().unwrap().to_string();
        let moved: Vec<String> = lines[header + 1..header + 4]
            .iter()
            .map(|l| last_column(l))
            .collect();
        assert_eq!(moved, ["-", "400.0/1600", "0.08/3000"], "{text}");
        assert!(!text.contains("compressed"), "no compression: {text}");
        assert!(
            lines[header + 1..header + 4]
                .iter()
                .all(|l| l.len() == lines[header].len()),
            "columns line up:\n{text}"
        );
    }

    #[test]
    fn compressed_rounds_say_how_much_was_saved() {
        let compressed = |n: u32, sent: u64, dense: u64| pb::RoundSummary {
            bytes_from_parties_uncompressed: dense,
            ..round(n, 1_000, sent)
        };
        let job = pb::Job {
            rounds: vec![
                round(1, 0, 0),
                compressed(2, 250_000, 1_000_000),
                compressed(3, 260_000, 1_000_000),
            ],
            ..Default::default()
        };
        let json = job_json(&job);
        assert_eq!(
            json["rounds"][1]["bytes_from_parties_uncompressed"].as_u64(),
            Some(1_000_000)
        );
        let text = job_text(&job);
        assert!(
            text.contains(
                "updates compressed: 0.51 MB received for 2.00 MB of f32 values (25.5 %)"
            ),
            "{text}"
        );
        // Uncompressed rounds count both the same: no line.
        let plain = pb::Job {
            rounds: vec![compressed(1, 1_000_000, 1_000_000)],
            ..Default::default()
        };
        assert!(!job_text(&plain).contains("compressed"));
    }

    #[test]
    fn rounds_list_whom_they_drew_with_scores_and_outcomes() {
        let drawn = |party: &str, score: f64, outcome: &str| pb::SelectedParty {
            party: party.into(),
            score,
            outcome: outcome.into(),
        };
        let job = pb::Job {
            rounds: vec![
                round(1, 0, 0),
                pb::RoundSummary {
                    selected: vec![
                        drawn("party-1", 0.917, "finished"),
                        drawn("party-5", 1.0 / 12.0, "timed_out"),
                        drawn("party-2", 360.0, "refused"),
                    ],
                    ..round(2, 10, 10)
                },
            ],
            ..Default::default()
        };
        let text = job_text(&job);
        assert!(
            text.contains(
                "    2  party-1 (0.917) finished, party-5 (0.083) timed_out, party-2 (360) refused"
            ),
            "{text}"
        );
        assert!(
            !text.contains("    1  party"),
            "round 1 drew nobody: {text}"
        );
        let json = job_json(&job);
        assert_eq!(json["rounds"][0]["selected"], json!([]));
        assert_eq!(
            json["rounds"][1]["selected"][1],
            json!({"party": "party-5", "score": 1.0 / 12.0, "outcome": "timed_out"})
        );
        // No round recorded a selection: no section.
        let plain = pb::Job {
            rounds: vec![round(1, 0, 0)],
            ..Default::default()
        };
        assert!(!job_text(&plain).contains("selected"));
    }

    #[test]
    fn clients_show_their_reliability_and_what_is_free() {
        let c = pb::ClientInfo {
            party: "party-5".into(),
            connected: true,
            tasks_offered: 9,
            tasks_succeeded: 9,
            resources: Some(pb::Resources {
                cpus: 2,
                memory_bytes: 4 << 30,
                gpus: 0,
                max_tasks: 2,
                free: Some(pb::FreeResources {
                    cpu_millis: 1500,
                    memory_bytes: 3 << 29,
                    gpus: 0,
                }),
                gpu_devices: Vec::new(),
            }),
            reliability: Some(pb::Reliability {
                finished: 1,
                failed: 2,
                timed_out: 6,
                score: 0.1234,
                last_result_ms: 1_700_000_000_000,
            }),
            ..Default::default()
        };
        let line = client_line(&c);
        assert!(
            line.contains(
                "reliability 0.12 (1 finished, 2 failed, 6 timed out)  free 1.5 cpu 1.5 GiB"
            ),
            "{line}"
        );
        let json = client_json(&c);
        assert_eq!(
            json["reliability"],
            json!({
                "finished": 1, "failed": 2, "timed_out": 6, "score": 0.1234,
                "last_result": "2023-11-14T22:13:20.000Z",
            })
        );
        assert_eq!(json["resources"]["free"]["cpu_millis"], 1500);
        // A disconnected party's last figures are not "free now".
        let away = pb::ClientInfo {
            connected: false,
            ..c
        };
        assert!(!client_line(&away).contains("free"));
    }

    #[test]
    fn a_partys_gpus_show_with_model_and_memory() {
        let res = |gpus: u32, devices: Vec<pb::GpuInfo>| pb::Resources {
            gpus,
            free: Some(pb::FreeResources {
                gpus,
                ..Default::default()
            }),
            gpu_devices: devices,
            ..Default::default()
        };
        assert_eq!(gpus_text(&res(0, vec![])), "");
        let h100 = pb::GpuInfo {
            name: "NVIDIA H100".into(),
            memory_bytes: 80 << 30,
        };
        assert_eq!(
            gpus_text(&res(1, vec![h100.clone()])),
            "  gpus 1, 1 free (NVIDIA H100 80 GiB)"
        );
        assert_eq!(
            gpus_text(&res(2, vec![pb::GpuInfo::default(); 2])),
            "  gpus 2, 2 free"
        );
        let c = pb::ClientInfo {
            resources: Some(res(1, vec![h100])),
            ..Default::default()
        };
        assert_eq!(
            client_json(&c)["resources"]["gpu_devices"],
            json!([{"name": "NVIDIA H100", "memory_bytes": 80u64 << 30}])
        );
    }

    #[test]
    fn a_version_lists_the_parties_whose_updates_made_it() {
        let v = pb::ModelVersion {
            name: "m".into(),
            version: 3,
            lineage: Some(pb::Lineage {
                job_id: "j".into(),
                round: 3,
                parent_version: 2,
                parties: vec!["party-2".into(), "party-1".into()],
            }),
            ..Default::default()
        };
        assert!(
            version_text(&v).ends_with("\nparties     party-2, party-1"),
            "{}",
            version_text(&v)
        );
        assert_eq!(version_json(&v)["parties"], json!(["party-2", "party-1"]));
        let upload = pb::ModelVersion { lineage: None, ..v };
        assert_eq!(version_text(&upload), version_line(&upload));
    }

    #[test]
    fn private_rounds_show_the_epsilon_they_spent() {
        let dp = |n: u32, epsilon: f64| pb::RoundSummary {
            dp_epsilon: epsilon,
            dp_sampling_rate: 2.0 / 3.0,
            ..round(n, 1_000, 1_000)
        };
        let job = pb::Job {
            id: "j-dp".into(),
            rounds_total: 10,
            rounds_completed: 2,
            spec_json: r#"{"privacy": {"dp": {"clip": 1.0, "noise_multiplier": 1.0,
                "delta": 1e-5, "target_epsilon": 8.0}}}"#
                .into(),
            rounds: vec![dp(1, 4.239), dp(2, 6.069)],
            ..Default::default()
        };
        let json = job_json(&job);
        assert_eq!(json["rounds"][1]["epsilon"], json!(6.069));
        assert_eq!(json["rounds"][1]["sampling_rate"], json!(2.0 / 3.0));
        let text = job_text(&job);
        assert!(text.contains("ε spent at δ = 1e-5, budget ε ≤ 8"), "{text}");
        assert!(text.contains("    2  6.069      0.667"), "{text}");
        assert!(job_line(&job).contains("ε 6.069"), "{}", job_line(&job));
        // Without noise ε is infinite: "inf" in JSON, ∞ for people.
        let noiseless = pb::Job {
            rounds: vec![dp(1, f64::INFINITY)],
            ..job.clone()
        };
        assert_eq!(job_json(&noiseless)["rounds"][0]["epsilon"], json!("inf"));
        assert!(job_line(&noiseless).contains("ε ∞"));
        // Without DP: nothing.
        let plain = pb::Job {
            rounds: vec![round(1, 1_000, 1_000)],
            ..job
        };
        assert_eq!(job_json(&plain)["rounds"][0]["epsilon"], Value::Null);
        assert!(!job_text(&plain).contains("privacy"));
        assert!(!job_line(&plain).contains('ε'));
    }
}
