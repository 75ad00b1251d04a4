//! The client chart and task-manager agree on the executor Pod config: every
//! `executor-pod.json` the chart renders (exported by `scripts/check-charts.sh` into
//! `$COHORT_TEST_CHART_RENDERS`, which `scripts/test.sh` sets) loads as task-manager loads
//! it, and builds an executor Pod.

#![allow(clippy::unwrap_used)]

use cohort_kube::{ExecutorOwner, ExecutorPodConfig, KubernetesExecutors, executor_pod};

#[test]
fn every_rendered_executor_pod_config_loads() {
    let Some(dir) = cohort_testkit::require_env(
        "COHORT_TEST_CHART_RENDERS",
        "the chart renders scripts/test.sh writes with scripts/check-charts.sh",
    ) else {
        return;
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".executor-pod.json"))
        .collect();
    files.sort();
    // ci/kube-executor-values.yaml and ci/edge-kube-executor-values.yaml, at least.
    assert!(files.len() >= 2, "rendered executor configs: {files:?}");
    for file in &files {
        let config = ExecutorPodConfig::load(file).unwrap_or_else(|e| panic!("{e}"));
        let owner = ExecutorOwner {
            party: "hospital-b".to_string(),
            pod: None,
            node: Some("node-1".to_string()),
            insecure: false,
        };
        KubernetesExecutors::check(&config, &owner)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let pod = serde_json::to_value(executor_pod("t1", &config, &owner)).unwrap();
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["command"][0], "/usr/local/bin/executor");
        // The chart's dataset volumes reach the Pod, mounted where task-manager has them.
        for mount in &config.volume_mounts {
            assert!(
                container["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["mountPath"] == mount.mount_path.as_str()),
                "{}: {}",
                file.display(),
                mount.mount_path
            );
        }
    }
}
