//! A party whose task-manager runs executors as Pods (`--executor-launcher kubernetes`) takes
//! part in a real federation: real binaries over mutual TLS, the real kube-rs client, and a
//! stand-in API server that runs each Pod it is given as a process (`fake_kube`: no API
//! server or kubelet can run on these machines).

use std::path::Path;
use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::fake_kube::FakeKube;
use cohort_integration_tests::{
    Federation, bin_dir, digits_job, files_under, state_of, wait_clients,
};
use cohort_security::{CertAuthority, Validity};
use serde_json::json;

const PARTY: &str = "party-k8s";

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Kubernetes party: its certificate (files and Secret), the stand-in API server and
/// its task-manager running `--executor-launcher kubernetes` against it.
struct KubeParty {
    kube: FakeKube,
    task_manager: tokio::process::Child,
    root: tempfile::TempDir,
}

impl KubeParty {
    fn kubelet_dir(&self) -> std::path::PathBuf {
        self.root.path().join("kubelet")
    }

    fn workspace(&self) -> std::path::PathBuf {
        self.root.path().join("workspace")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("task-manager.log")).unwrap_or_default()
    }

    /// Starts it; `command` replaces the executor image's command when given.
    async fn start(fed: &Federation, command: Option<serde_json::Value>) -> KubeParty {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();

        // The party's certificate, as the Secret the chart mounts and as files for task-manager.
        let pki = &fed.stack.pki;
        let ca = CertAuthority::load(&pki.join("ca.crt"), &pki.join("ca.key")).expect("CA");
        let pair = ca
            .issue_party(PARTY, Validity::for_duration(Duration::from_secs(3600)))
            .expect("party certificate");
        let (cert, key) = (root.join("tls.crt"), root.join("tls.key"));
        cohort_security::write_cert(&cert, &pair.cert_pem).expect("cert");
        cohort_security::write_key(&key, &pair.key_pem).expect("key");

        let kube = FakeKube::start(&root.join("kubelet"), &bin_dir())
            .await
            .expect("fake API server");
        kube.add_secret(
            "party-k8s-tls",
            &[
                ("tls.crt", read(&cert)),
                ("tls.key", read(&key)),
                ("ca.crt", read(&pki.join("ca.crt"))),
            ],
        );
        // Left by an earlier task-manager of this party: deleted at start.
        kube.add_idle_pod(
            "executor-left-over",
            json!({"app.kubernetes.io/name": "cohort", "app.kubernetes.io/component": "executor",
                   "cohort.dev/party": PARTY}),
        );
        // Another party's executor in the same namespace: left alone.
        kube.add_idle_pod(
            "executor-of-another-party",
            json!({"app.kubernetes.io/name": "cohort", "app.kubernetes.io/component": "executor",
                   "cohort.dev/party": "someone-else"}),
        );
        let kubeconfig = root.join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig, PARTY)
            .expect("kubeconfig");

        // The data: party-1's shard again, on a "hostPath" volume mounted where task-manager
        // sees it (the task file names the files by that path).
        let data = fed.stack.data_dir.join("parties/party-1");
        let mut config = json!({
            "namespace": PARTY,
            "image": "cohort:test",
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
            "pinToNode": true,
            "tlsSecret": "party-k8s-tls",
            "volumes": [{"name": "data-digits", "hostPath": {"path": data, "type": "Directory"}}],
            "volumeMounts": [{"name": "data-digits", "mountPath": data, "readOnly": true}],
            "env": [{"name": "COHORT_LOG_FORMAT", "value": "json"}],
            "pollIntervalSeconds": 1
        });
        if let Some(command) = command {
            config["command"] = command;
        }
        let pod_config = root.join("executor-pod.json");
        std::fs::write(&pod_config, config.to_string()).expect("pod config");

        let log = std::fs::File::create(root.join("task-manager.log")).expect("log");
        let task_manager = tokio::process::Command::new(bin_dir().join("task-manager"))
            .args([
                "--party",
                PARTY,
                "--proxy",
                &fed.stack.proxy,
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--datasets")
            .arg(data.join("datasets.json"))
            .arg("--workspace")
            .arg(root.join("workspace"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(pki.join("ca.crt"))
            .args(["--executor-launcher", "kubernetes", "--executor-pod-config"])
            .arg(&pod_config)
            .env("KUBECONFIG", &kubeconfig)
            .env("COHORT_NODE_NAME", "edge-node-7")
            .env("COHORT_POD_NAME", "task-manager-0")
            .env("COHORT_POD_UID", "uid-task-manager-0")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("task-manager");
        KubeParty {
            kube,
            task_manager,
            root: dir,
        }
    }
}

/// Polls `check` (Ok when the condition holds, else what it saw) until it holds; panics with
/// the last thing seen after 30 s: a 1 s poll, then a few API calls, on a loaded machine.
async fn wait_until(what: &str, check: impl Fn() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match check() {
            Ok(()) => return,
            Err(seen) => assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_with_executor_pods_trains_in_a_federation() {
    let fed = Federation::start(2).await.expect("federation");
    let party = KubeParty::start(&fed, None).await;
    let kube = &party.kube;
    let kubelet_dir = party.kubelet_dir();
    let workspace = party.workspace();

    // All three parties registered, then a job that needs every one of them each round.
    let api = fed.api();
    let clients = wait_clients(&api, Duration::from_secs(60), |c| {
        c.iter().filter(|c| c.connected).count() == 3
    })
    .await;
    assert!(clients.iter().any(|c| c.party == PARTY), "{clients:?}");

    // A connectivity probe (`cohort check --federation`) starts no executor Pod: the party of
    // Pods says so; the local parties' executors reach the server as themselves.
    let probed = api
        .selector()
        .probe_parties(cohort_proto::v1::ProbePartiesRequest { timeout_ms: 20_000 })
        .await
        .expect("probe the parties")
        .into_inner();
    assert_eq!(probed.parties.len(), 3, "{probed:?}");
    for p in &probed.parties {
        let executor = p.executor.as_ref().expect("the executor's part");
        assert!(p.answered && p.ok, "{p:?}");
        assert_eq!(executor.in_pods, p.party == PARTY, "{p:?}");
        if !executor.in_pods {
            assert_eq!(executor.server_saw_party, p.party, "{p:?}");
        }
    }
    assert!(kube.created_pods().is_empty(), "a probe created a pod");

    let job = fed
        .create_job(&digits_job("pods", 2, 3, 3, "90s"))
        .await
        .expect("create");
    let done = fed
        .wait_end(&job.id, Duration::from_secs(240))
        .await
        .expect("job ends");
    let tm_log = party.log();
    assert_eq!(
        state_of(&done),
        JobState::Succeeded,
        "{done:?}\ntask-manager: {tm_log}\nexecutor pods: {}",
        kube.logs(&kubelet_dir)
    );

    // task-manager learns that a Pod ended by polling it (pollIntervalSeconds: 1), then deletes
    // it and its task Secret, then reports: the last ones may go after the job has ended.
    wait_until("executor pods and task secrets deleted", || {
        let mut live_pods = kube.live_pods();
        live_pods.retain(|p| p != "executor-of-another-party");
        let live_secrets = kube.live_secrets();
        (live_pods.is_empty() && live_secrets == ["party-k8s-tls"])
            .then_some(())
            .ok_or(format!("pods {live_pods:?}, secrets {live_secrets:?}"))
    })
    .await;

    // What task-manager asked of the API server.
    let calls = kube.calls();
    let count = |method: &str, suffix: &str| {
        calls
            .iter()
            .filter(|(m, p)| m == method && p.ends_with(suffix))
            .count()
    };
    let leftover_deleted = calls
        .iter()
        .position(|c| {
            c == &(
                "DELETE".to_string(),
                format!("/api/v1/namespaces/{PARTY}/pods/executor-left-over"),
            )
        })
        .expect("the leftover pod was deleted");
    let first_create = calls
        .iter()
        .position(|(m, _)| m == "POST")
        .expect("pods were created");
    assert!(leftover_deleted < first_create, "{calls:?}");
    assert!(
        kube.live_pods()
            .contains(&"executor-of-another-party".to_string())
    );

    let pods = kube.created_pods();
    // A training task per round, at least (evaluation tasks come on top).
    assert!(pods.len() >= 2, "{} executor pods", pods.len());
    assert_eq!(count("POST", "/secrets"), pods.len(), "{calls:?}");
    assert_eq!(count("POST", "/pods"), pods.len(), "{calls:?}");
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("executor-"), "{name}");
        assert_eq!(pod["metadata"]["labels"]["cohort.dev/party"], PARTY);
        assert_eq!(
            pod["metadata"]["ownerReferences"][0]["name"],
            "task-manager-0"
        );
        assert_eq!(
            pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchFields"][0]["values"],
            json!(["edge-node-7"])
        );
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"],
            json!({"cpu": "1", "memory": "1Gi"})
        );
        // Every Pod and its task Secret were deleted once, by name, when the task ended.
        assert_eq!(count("DELETE", &format!("/pods/{name}")), 1, "{name}");
        assert_eq!(count("DELETE", &format!("/secrets/{name}")), 1, "{name}");
    }

    // The executors really ran, in Pods: JSON logs (the Pod's env), training done.
    let logs = kube.logs(&kubelet_dir);
    assert!(logs.contains("\"level\""), "{logs}");
    // The party's tasks succeeded, as the federation counts them: a task's status reaches
    // client-selector after its update reached the coordinator, so wait for the count.
    let clients = wait_clients(&api, Duration::from_secs(30), |clients| {
        clients
            .iter()
            .any(|c| c.party == PARTY && c.tasks_succeeded >= 2)
    })
    .await;
    let me = clients.iter().find(|c| c.party == PARTY).expect("party");
    assert_eq!(me.tasks_failed, 0, "{me:?}");
    // The task token never touched task-manager's disk.
    let on_disk = files_under(&workspace);
    assert!(
        on_disk.iter().all(|p| !p.ends_with("task.pb")),
        "{on_disk:?}"
    );
    assert!(
        tm_log.contains("deleted executor pods an earlier task-manager left"),
        "{tm_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_task_manager_deletes_its_running_executor_pods() {
    let fed = Federation::start(1).await.expect("federation");
    // Executors that never finish on their own.
    let mut party = KubeParty::start(&fed, Some(json!(["/bin/sh", "-c", "sleep 120", "sh"]))).await;
    let api = fed.api();
    wait_clients(&api, Duration::from_secs(60), |c| {
        c.iter().filter(|c| c.connected).count() == 2
    })
    .await;
    fed.create_job(&digits_job("hang", 1, 2, 2, "120s"))
        .await
        .expect("create");

    // An executor Pod runs (a process behind the stand-in API server)...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let running = loop {
        let pods: Vec<String> = party
            .kube
            .live_pods()
            .into_iter()
            .filter(|p| p.starts_with("executor-") && p != "executor-of-another-party")
            .collect();
        if let Some(pod) = pods.first() {
            break pod.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no executor pod: {}",
            party.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // ...when task-manager is told to stop: it deletes the Pod and its Secret, then exits.
    let pid = party.task_manager.id().expect("task-manager pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), party.task_manager.wait())
        .await
        .expect("task-manager exits within 30 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}: {}", party.log());
    let calls = party.kube.calls();
    let deleted = |kind: &str| {
        calls.iter().any(|(m, p)| {
            m == "DELETE" && p == &format!("/api/v1/namespaces/{PARTY}/{kind}/{running}")
        })
    };
    assert!(deleted("pods") && deleted("secrets"), "{calls:?}");
    assert_eq!(
        party.kube.live_pods(),
        vec!["executor-of-another-party".to_string()]
    );
    assert_eq!(party.kube.live_secrets(), vec!["party-k8s-tls".to_string()]);
    assert!(
        party.log().contains("stopping executors"),
        "{}",
        party.log()
    );
}
