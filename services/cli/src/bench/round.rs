//! `cohort bench round`: the real federation, a synthetic job, and what it cost. Peak memory
//! is each process's high-water mark (`VmHWM`, which the kernel keeps): the services' is read
//! once at the end, while the coordinator and the executors, which come and go, are found as
//! children of job-scheduler and the task-managers and sampled as they run (the coordinator
//! every 20 ms, the executors every 100 ms and once more at the end: a kept executor's mark
//! holds its peak). Sampling costs the machine the rounds run on, so it is kept light.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_fl::SyntheticModel;
use cohort_proto::v1 as pb;
use serde_json::json;

use super::RoundArgs;
use crate::Api;
use crate::show::state_name;
use crate::stack::{PartyData, Stack, StackConfig};

/// How often the coordinator's memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Every how many samples of the coordinator the executors are sampled.
const EXECUTORS_EVERY: u32 = 5;
/// How long the parties get to connect before the job is created.
const PARTIES_CONNECT_WITHIN: Duration = Duration::from_secs(120);

pub async fn run(args: &RoundArgs, json: bool) -> anyhow::Result<i32> {
    let temp;
    let data_dir = match &args.data_dir {
        Some(d) => crate::absolute(d)?,
        None => {
            temp = tempfile::Builder::new().prefix("cohort-bench-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let model = SyntheticModel {
        params: args.params,
        layers: args.layers,
    };
    let started_ms = cohort_runtime::now_ms();
    let mut stack = Stack::start(&StackConfig {
        bin_dir: None,
        data_dir: data_dir.clone(),
        parties: args.parties,
        proxy_listen: "127.0.0.1:0".into(),
        proxy_names: Vec::new(),
        database_url: None,
        blob_url: None,
        service_env: vec![(
            "COHORT_MAX_MODEL_PARAMETERS".to_string(),
            args.params.max(100_000_000).to_string(),
        )],
        party_data: PartyData::Synthetic,
        party_env: Vec::new(),
        party_overrides: Vec::new(),
        metrics: args.metrics,
    })
    .await?;
    let memory = Memory::watch(&stack);
    let result = tokio::select! {
        r = run_job(&stack, args, json) => r,
        _ = cohort_runtime::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let peaks = memory.finish().await;
    let pgid = stack.pgid();
    stack.shutdown().await;
    let (job, running_ms, final_model) = result?;
    let Some(final_model) = final_model else {
        bail!(
            "job {} ended {}: {}",
            job.id,
            state_name(job.state),
            job.reason
        );
    };
    let (parties, rounds) = (u64::from(args.parties), u64::from(args.rounds));
    let error = if args.secure_aggregation {
        model.max_abs_error_equal_weights(&final_model, parties, rounds)
    } else {
        model.max_abs_error(&final_model, parties, rounds)
    };
    let round_s: Vec<f64> = job
        .rounds
        .iter()
        .map(|r| r.duration_ms as f64 / 1000.0)
        .collect();
    let startup_s = running_ms.map(|t| (t - started_ms).max(0) as f64 / 1000.0);
    let to_parties: u64 = job.rounds.iter().map(|r| r.bytes_to_parties).sum();
    let from_parties: u64 = job.rounds.iter().map(|r| r.bytes_from_parties).sum();
    let summary = json!({
        "parties": args.parties,
        "params": args.params,
        "layers": model.sizes().len(),
        "rounds": job.rounds.len(),
        "round_s": round_s,
        "median_round_s": median(&round_s),
        "startup_s": startup_s,
        "coordinator_peak_rss_bytes": peaks.coordinator,
        "proxy_peak_rss_bytes": peaks.of("proxy"),
        "model_manager_peak_rss_bytes": peaks.of("model-manager"),
        "job_scheduler_peak_rss_bytes": peaks.of("job-scheduler"),
        "client_selector_peak_rss_bytes": peaks.of("client-selector"),
        "party_peak_rss_bytes": peaks.party,
        "bytes_to_parties": to_parties,
        "bytes_from_parties": from_parties,
        "aggregate_max_abs_error": error,
        "secure_aggregation": args.secure_aggregation,
        "secagg_neighbours": args.secagg_neighbours,
        "job": job.id,
        "state": state_name(job.state),
        "process_group": pgid,
    });
    if json {
        println!("{summary}");
    } else {
        for (i, s) in round_s.iter().enumerate() {
            println!("round {:>3}  {:.3} s", i + 1, s);
        }
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "{} parties × {} parameters, {} rounds: median round {:.3} s, start-up {}; peak RSS \
             coordinator {:.0} MB, proxy {:.0} MB, model-manager {:.0} MB, party {:.0} MB; \
             {:.1} MB to parties, {:.1} MB from parties; aggregate max abs error {error:.3e}{}",
            args.parties,
            args.params,
            round_s.len(),
            median(&round_s).unwrap_or(f64::NAN),
            startup_s.map_or("-".to_string(), |s| format!("{s:.2} s")),
            mb(peaks.coordinator),
            mb(peaks.of("proxy")),
            mb(peaks.of("model-manager")),
            mb(peaks.party),
            mb(to_parties),
            mb(from_parties),
            if args.secure_aggregation {
                " (secure aggregation: against the equal-weight mean)"
            } else {
                ""
            },
        );
    }
    Ok(0)
}

/// Creates the synthetic job once every party is connected, follows it to its end and
/// downloads the final model when it succeeded.
async fn run_job(
    stack: &Stack,
    args: &RoundArgs,
    json: bool,
) -> anyhow::Result<(pb::Job, Option<i64>, Option<Vec<cohort_core::NamedTensor>>)> {
    let api = Api::from_profile(&stack.profile())?;
    wait_for_parties(&api, args.parties).await?;
    // A round moves the model to and from every party through the proxy: leave minutes per GB.
    let model_gb = args.params as f64 * 4.0 / 1e9;
    let round_timeout = 60 + (model_gb * 120.0 * f64::from(args.parties).max(1.0)) as u64;
    let mut spec = json!({
        "name": "bench-round",
        "model": {"arch": "synthetic", "params": args.params, "layers": args.layers},
        "data": {"dataset": "synthetic"},
        "rounds": args.rounds,
        "clients": {
            "per_round": args.parties,
            "min": args.parties,
            "round_timeout": format!("{round_timeout}s"),
        },
    });
    if args.secure_aggregation {
        // The synthetic updates' norm stays far below 1: nothing is clipped.
        spec["privacy"] = json!({"secure_aggregation": true, "secagg_clip": 1.0});
        if let Some(k) = args.secagg_neighbours {
            spec["privacy"]["secagg_neighbours"] = json!(k);
        }
    }
    let job = api
        .jobs()
        .create_job(pb::CreateJobRequest {
            spec: spec.to_string(),
        })
        .await?
        .into_inner();
    let mut shown = 0usize;
    let timeout = Duration::from_secs(round_timeout * u64::from(args.rounds) + 300);
    let job = crate::watch(&api, &job.id, timeout, |j| {
        for r in j.rounds.iter().skip(shown) {
            if !json {
                eprintln!(
                    "round {:>3}/{} stored in {:.3} s",
                    r.round,
                    j.rounds_total,
                    r.duration_ms as f64 / 1000.0
                );
            }
        }
        shown = j.rounds.len();
    })
    .await?;
    let events = api
        .jobs()
        .list_job_events(pb::ListJobEventsRequest {
            id: job.id.clone(),
            after_seq: 0,
        })
        .await?
        .into_inner()
        .events;
    let running_ms = events
        .iter()
        .find(|e| e.to == pb::JobState::Running as i32)
        .map(|e| e.time_ms);
    if job.state != pb::JobState::Succeeded as i32 {
        return Ok((job, running_ms, None));
    }
    let version = job
        .rounds
        .last()
        .map(|r| r.model_version)
        .context("the job succeeded without a round")?;
    let model = api.job_model(&job, version).await?;
    Ok((job, running_ms, Some(model)))
}

async fn wait_for_parties(api: &Api, parties: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + PARTIES_CONNECT_WITHIN;
    loop {
        let connected = api
            .selector()
            .list_clients(pb::ListClientsRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .clients
                    .iter()
                    .filter(|c| c.connected)
                    .count()
            })
            .unwrap_or(0);
        if connected >= parties as usize {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "only {connected} of {parties} parties connected within {}",
                humantime::format_duration(PARTIES_CONNECT_WITHIN)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Peak resident memory of the federation's processes.
#[derive(Debug, Default)]
struct Peaks {
    /// By service name (`proxy`, `model-manager`, ...).
    services: HashMap<String, u64>,
    /// The largest of the job's coordinator.
    coordinator: u64,
    /// The largest task-manager plus its largest executor.
    party: u64,
}

impl Peaks {
    fn of(&self, service: &str) -> u64 {
        self.services.get(service).copied().unwrap_or(0)
    }
}

struct Memory {
    services: Vec<(String, u32)>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// The largest child each sampled parent had, by the parent's pid.
    children: tokio::task::JoinHandle<HashMap<u32, u64>>,
}

impl Memory {
    /// Samples the children of job-scheduler (the coordinator) and of the task-managers
    /// (their executors) until `finish`.
    fn watch(stack: &Stack) -> Memory {
        let services = stack.pids();
        let of = |pick: &dyn Fn(&str) -> bool| -> Vec<u32> {
            services
                .iter()
                .filter(|(name, _)| pick(name))
                .map(|(_, pid)| *pid)
                .collect()
        };
        let scheduler = of(&|name| name == "job-scheduler");
        let managers = of(&|name| name.starts_with("task-manager"));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let children = tokio::spawn(async move {
            let mut largest: HashMap<u32, u64> = HashMap::new();
            let mut sample = |parents: &[u32]| {
                for parent in parents {
                    let child = children(*parent)
                        .into_iter()
                        .map(high_water_mark)
                        .max()
                        .unwrap_or(0);
                    let seen = largest.entry(*parent).or_default();
                    *seen = (*seen).max(child);
                }
            };
            for tick in 0u32.. {
                sample(&scheduler);
                if tick % EXECUTORS_EVERY == 0 {
                    sample(&managers);
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
            }
            sample(&managers);
            largest
        });
        Memory {
            services,
            stop,
            children,
        }
    }

    /// Stops sampling and reads the services' own peaks (they still run).
    async fn finish(self) -> Peaks {
        let _ = self.stop.send(());
        let children = self.children.await.unwrap_or_default();
        let mut peaks = Peaks::default();
        for (name, pid) in &self.services {
            let own = high_water_mark(*pid);
            let child = children.get(pid).copied().unwrap_or(0);
            if name.starts_with("task-manager") {
                peaks.party = peaks.party.max(own + child);
            } else {
                if name == "job-scheduler" {
                    peaks.coordinator = child;
                }
                peaks.services.insert(name.clone(), own);
            }
        }
        peaks
    }
}

/// A process's peak resident memory in bytes (0 once it is gone).
fn high_water_mark(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A process's children now (from every one of its threads).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}
