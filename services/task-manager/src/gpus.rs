//! The GPUs this party reports to client-selector (count, model, memory; in Register and
//! every Heartbeat): `--gpus N` when given, else what `nvidia-smi` lists, else none. A
//! party without a GPU refuses a task whose `training.device` is `cuda` at the offer.

use std::time::Duration;

use cohort_core::JobSpec;
use cohort_core::spec::TrainingDevice;
use cohort_proto::v1 as pb;

/// How long `nvidia-smi` may take before the party is taken to have no GPU.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(5);
/// Most GPUs one party reports (client-selector's default limit).
const MAX_GPUS: usize = 4096;
/// Longest model name reported (client-selector refuses longer ones).
const MAX_NAME_BYTES: usize = 256;

/// This machine's GPUs: `count` of them when given (described as `nvidia-smi` lists them
/// where it can, as unknown otherwise: an operator may declare a GPU the tool cannot see),
/// else every GPU `nvidia-smi` lists.
pub async fn detect(count: Option<u32>) -> Vec<pb::GpuInfo> {
    let listed = nvidia_smi().await.unwrap_or_default();
    match count {
        None => listed,
        Some(n) => {
            let n = (n as usize).min(MAX_GPUS);
            let mut gpus: Vec<pb::GpuInfo> = listed.into_iter().take(n).collect();
            gpus.resize(n, pb::GpuInfo::default());
            gpus
        }
    }
}

/// `n` GPUs of unknown model (executor Pods' GPUs: the node they land on is not known).
pub fn unknown(n: u32) -> Vec<pb::GpuInfo> {
    vec![pb::GpuInfo::default(); (n as usize).min(MAX_GPUS)]
}

/// What `nvidia-smi` lists, None when it is missing, fails or hangs.
async fn nvidia_smi() -> Option<Vec<pb::GpuInfo>> {
    let run = tokio::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(NVIDIA_SMI_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => out,
        Ok(Ok(out)) => {
            tracing::info!(status = %out.status, "nvidia-smi failed: no GPU reported");
            return None;
        }
        // Not installed: the usual case on a machine without a GPU.
        Ok(Err(_)) => return None,
        Err(_) => {
            tracing::warn!(timeout = ?NVIDIA_SMI_TIMEOUT, "nvidia-smi did not answer: no GPU reported");
            return None;
        }
    };
    Some(parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)))
}

/// Lines of `name, memory in MiB` (`--format=csv,noheader,nounits`); a line that does not
/// parse still counts as a GPU of unknown memory.
pub fn parse_nvidia_smi(text: &str) -> Vec<pb::GpuInfo> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(MAX_GPUS)
        .map(|line| {
            let (name, memory) = line.rsplit_once(',').unwrap_or((line, ""));
            let mut name = name.trim().to_string();
            if name.len() > MAX_NAME_BYTES {
                let mut cut = MAX_NAME_BYTES;
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                name.truncate(cut);
            }
            pb::GpuInfo {
                name,
                memory_bytes: memory
                    .trim()
                    .parse::<u64>()
                    .map_or(0, |mib| mib.saturating_mul(1 << 20)),
            }
        })
        .collect()
}

/// Why this party, with `gpus` GPUs, refuses a task of `kind` of the job `spec`: a
/// training task of a `training.device: cuda` job needs one.
pub fn refusal(spec: &JobSpec, kind: i32, gpus: u32) -> Option<String> {
    (spec.training.device == TrainingDevice::Cuda
        && kind == pb::TaskKind::Train as i32
        && gpus == 0)
        .then(|| {
            "training.device is cuda, but this party has no GPU (none found by nvidia-smi; \
             --gpus declares them)"
                .to_string()
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_give_model_and_memory() {
        let gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\n\nTesla T4, 15360\nodd\n");
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].memory_bytes, 81559 << 20);
        assert_eq!(gpus[1].name, "Tesla T4");
        assert_eq!((gpus[2].name.as_str(), gpus[2].memory_bytes), ("odd", 0));
    }

    #[tokio::test]
    async fn a_declared_count_wins_over_what_is_found() {
        // This machine may or may not have nvidia-smi; the count is what was declared.
        assert_eq!(detect(Some(0)).await, vec![]);
        assert_eq!(detect(Some(2)).await.len(), 2);
        assert_eq!(unknown(1), vec![pb::GpuInfo::default()]);
    }

    #[test]
    fn only_a_cuda_training_task_needs_a_gpu() {
        let spec = |device: &str| {
            JobSpec::parse(&format!(
                "name: j\nmodel: {{arch: mlp, hidden: [4]}}\ndata: {{dataset: d}}\n\
                 training: {{device: {device}}}\nclients: {{per_round: 2, min: 2}}\n"
            ))
            .unwrap()
        };
        let train = pb::TaskKind::Train as i32;
        let eval = pb::TaskKind::Evaluate as i32;
        let why = refusal(&spec("cuda"), train, 0).unwrap();
        assert!(why.starts_with("training.device is cuda"), "{why}");
        assert_eq!(refusal(&spec("cuda"), train, 1), None);
        assert_eq!(refusal(&spec("cuda"), eval, 0), None);
        assert_eq!(refusal(&spec("auto"), train, 0), None);
        assert_eq!(refusal(&spec("cpu"), train, 0), None);
    }
}
