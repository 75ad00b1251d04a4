//! `KubernetesExecutors` (task-manager's executor launcher) against a mocked API server.
//!
//! No Kubernetes API server can run here, so it is mocked with `tower_test::mock::pair`: each
//! test reads the exact requests (method, path, body) and answers them as an API server would.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_kube::{
    ExecutorEnd, ExecutorOwner, ExecutorPodConfig, ExecutorPodError, KubernetesExecutors,
    pod_owner_reference,
};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{ResourceRequirements, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::time::Instant;

mod support;
use support::{ApiHandle, next};

const PODS: &str = "/api/v1/namespaces/party-a/pods";
const SECRETS: &str = "/api/v1/namespaces/party-a/secrets";
const NAME: &str = "executor-t-7";

fn config() -> ExecutorPodConfig {
    let mut c = ExecutorPodConfig::new("party-a", "ghcr.io/cohort/cohort:0.1.0");
    c.gpus = 1;
    c.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([(
            "cpu".to_string(),
            Quantity("1".to_string()),
        )])),
        ..Default::default()
    });
    c.pin_to_node = true;
    c.tls_secret = Some("party-a-tls".to_string());
    c.volumes = vec![Volume {
        name: "data-digits".to_string(),
        persistent_volume_claim: Some(
            k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource {
                claim_name: "digits".to_string(),
                read_only: Some(true),
            },
        ),
        ..Default::default()
    }];
    c.volume_mounts = vec![VolumeMount {
        name: "data-digits".to_string(),
        mount_path: "/data/digits".to_string(),
        read_only: Some(true),
        ..Default::default()
    }];
    c.poll_interval_seconds = 1;
    c
}

fn owner() -> ExecutorOwner {
    ExecutorOwner {
        party: "party-a".to_string(),
        pod: Some(pod_owner_reference("task-manager-5d8f-x2", "uid-tm")),
        node: Some("edge-7".to_string()),
        insecure: false,
    }
}

fn executors() -> (KubernetesExecutors, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    (
        KubernetesExecutors::new(client, config(), owner()).unwrap(),
        handle,
    )
}

fn labels() -> Value {
    json!({
        "app.kubernetes.io/name": "cohort",
        "app.kubernetes.io/component": "executor",
        "cohort.dev/task": "t-7",
        "cohort.dev/party": "party-a"
    })
}

fn owner_refs() -> Value {
    json!([{"apiVersion": "v1", "kind": "Pod", "name": "task-manager-5d8f-x2",
            "uid": "uid-tm", "controller": true}])
}

fn pod_in(phase: &str, container_state: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": NAME, "namespace": "party-a"},
        "status": {"phase": phase, "containerStatuses": [{
            "name": "executor", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": container_state}]}})
}

/// Serves the two creates of `start`; returns the Secret and Pod bodies.
async fn serve_start(handle: &mut ApiHandle) -> (Value, Value) {
    let secret = next(handle).await;
    assert_eq!(secret.method, Method::POST);
    assert_eq!(secret.uri, format!("{SECRETS}?"));
    let secret_body = secret.body.clone();
    secret.echo();
    let pod = next(handle).await;
    assert_eq!(pod.method, Method::POST);
    assert_eq!(pod.uri, format!("{PODS}?"));
    let pod_body = pod.body.clone();
    pod.echo();
    (secret_body, pod_body)
}

async fn serve_remove(handle: &mut ApiHandle, pod_grace: u32) {
    let pod = next(handle).await;
    assert_eq!(pod.method, Method::DELETE);
    assert_eq!(pod.uri, format!("{PODS}/{NAME}?"));
    assert_eq!(pod.body["gracePeriodSeconds"], pod_grace);
    pod.answer(
        StatusCode::OK,
        json!({"kind": "Status", "status": "Success"}),
    );
    let secret = next(handle).await;
    assert_eq!(secret.method, Method::DELETE);
    assert_eq!(secret.uri, format!("{SECRETS}/{NAME}?"));
    secret.fail(404, "NotFound");
}

// Paused time: the polls are tokio timers against an in-process mock, so none waits a real second.
#[tokio::test(start_paused = true)]
async fn a_task_is_a_secret_and_a_pod_polled_until_it_succeeds_then_removed() {
    let (executors, mut handle) = executors();
    let task_file = b"\x0a\x03t-7 task bytes";
    let (started, (secret, pod)) =
        tokio::join!(executors.start("t-7", task_file), serve_start(&mut handle));
    started.unwrap();
    assert_eq!(
        secret,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": NAME, "namespace": "party-a", "labels": labels(),
                         "ownerReferences": owner_refs()},
            "type": "Opaque",
            "immutable": true,
            "data": {"task.pb": "CgN0LTcgdGFzayBieXRlcw=="}
        })
    );
    assert_eq!(
        pod,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": NAME, "namespace": "party-a", "labels": labels(),
                         "ownerReferences": owner_refs()},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchFields": [
                        {"key": "metadata.name", "operator": "In", "values": ["edge-7"]}]}]}}},
                "containers": [{
                    "name": "executor",
                    "image": "ghcr.io/cohort/cohort:0.1.0",
                    "command": ["/usr/local/bin/executor"],
                    "args": ["--task-file", "/var/run/cohort/task/task.pb"],
                    "env": [
                        {"name": "COHORT_TLS_CERT", "value": "/var/run/cohort/tls/tls.crt"},
                        {"name": "COHORT_TLS_KEY", "value": "/var/run/cohort/tls/tls.key"},
                        {"name": "COHORT_TLS_CA", "value": "/var/run/cohort/tls/ca.crt"}
                    ],
                    "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": "1"},
                                  "limits": {"nvidia.com/gpu": "1"}},
                    "volumeMounts": [
                        {"name": "task", "mountPath": "/var/run/cohort/task", "readOnly": true},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "tls", "mountPath": "/var/run/cohort/tls", "readOnly": true},
                        {"name": "data-digits", "mountPath": "/data/digits", "readOnly": true}
                    ]
                }],
                "volumes": [
                    {"name": "task", "secret": {"secretName": NAME, "defaultMode": 288}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                    {"name": "tls", "secret": {"secretName": "party-a-tls", "defaultMode": 288}},
                    {"name": "data-digits", "persistentVolumeClaim": {"claimName": "digits", "readOnly": true}}
                ]
            }
        })
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let serve = async {
        for state in [
            pod_in(
                "Pending",
                json!({"waiting": {"reason": "ContainerCreating"}}),
            ),
            pod_in("Running", json!({"running": {}})),
            pod_in("Succeeded", json!({"terminated": {"exitCode": 0}})),
        ] {
            let get = next(&mut handle).await;
            assert_eq!(get.method, Method::GET);
            assert_eq!(get.uri, format!("{PODS}/{NAME}"));
            get.answer(StatusCode::OK, state);
        }
    };
    let (end, ()) = tokio::join!(executors.wait("t-7", deadline), serve);
    assert_eq!(end, ExecutorEnd::Succeeded);

    let ((), ()) = tokio::join!(
        executors.remove("t-7", Duration::from_secs(3)),
        serve_remove(&mut handle, 3)
    );
}

#[tokio::test]
async fn a_failed_pod_reports_its_exit_and_the_last_line_of_its_log() {
    let (executors, mut handle) = executors();
    let serve = async {
        let get = next(&mut handle).await;
        get.answer(
            StatusCode::OK,
            pod_in(
                "Failed",
                json!({"terminated": {"exitCode": 1, "reason": "Error"}}),
            ),
        );
        let log = next(&mut handle).await;
        assert_eq!(log.method, Method::GET);
        assert_eq!(
            log.uri,
            format!("{PODS}/{NAME}/log?&container=executor&tailLines=20")
        );
        log.answer_text("INFO training\nerror: dataset file /data/digits/x.csv: not found\n\n");
    };
    let (end, ()) = tokio::join!(
        executors.wait("t-7", Instant::now() + Duration::from_secs(60)),
        serve
    );
    assert_eq!(
        end,
        ExecutorEnd::Failed(
            "executor pod failed: exit status 1 (Error): error: dataset file \
             /data/digits/x.csv: not found"
                .to_string()
        )
    );
}

#[tokio::test]
async fn a_pod_that_cannot_pull_its_image_fails_at_once_and_a_deleted_one_too() {
    let (executors, mut handle) = executors();
    let serve = async {
        next(&mut handle).await.answer(
            StatusCode::OK,
            pod_in(
                "Pending",
                json!({"waiting": {"reason": "ErrImagePull", "message": "not found"}}),
            ),
        );
        let log = next(&mut handle).await;
        log.fail(400, "BadRequest");
    };
    let (end, ()) = tokio::join!(
        executors.wait("t-7", Instant::now() + Duration::from_secs(60)),
        serve
    );
    assert_eq!(
        end,
        ExecutorEnd::Failed("executor pod cannot start: ErrImagePull not found".to_string())
    );

    let serve = async { next(&mut handle).await.fail(404, "NotFound") };
    let (end, ()) = tokio::join!(
        executors.wait("t-7", Instant::now() + Duration::from_secs(60)),
        serve
    );
    assert_eq!(end, ExecutorEnd::Failed("executor pod deleted".to_string()));
}

// Paused time: the clock moves only when every task waits on a timer, so the 1 s poll and the
// 1.5 s deadline are exact however loaded the machine is.
#[tokio::test(start_paused = true)]
async fn waiting_ends_at_the_deadline_and_api_errors_are_retried() {
    let (executors, mut handle) = executors();
    let started = Instant::now();
    let serve = async {
        next(&mut handle).await.fail(503, "ServiceUnavailable");
        next(&mut handle)
            .await
            .answer(StatusCode::OK, pod_in("Pending", json!({"waiting": {}})));
    };
    // Two polls fit before the deadline (1 s apart), a third would not.
    let (end, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            executors.wait("t-7", started + Duration::from_millis(1500)),
            serve
        )
    })
    .await
    .expect("wait returns at its deadline, not after a third poll");
    assert_eq!(
        end,
        ExecutorEnd::Failed("executor pod did not end before the task's deadline".to_string())
    );
    // It gave up after the second poll: not before it, and without sleeping past the deadline.
    let took = started.elapsed();
    assert!(
        (Duration::from_secs(1)..Duration::from_millis(1500)).contains(&took),
        "gave up after {took:?}"
    );
}

#[tokio::test]
async fn a_leftover_secret_is_replaced_and_a_refused_pod_takes_its_secret_away() {
    let (executors, mut handle) = executors();
    let serve = async {
        let secret = next(&mut handle).await;
        assert_eq!(secret.method, Method::POST);
        secret.fail(409, "AlreadyExists");
        // The old task's objects go first (a task re-offered after a restart).
        let pod = next(&mut handle).await;
        assert_eq!(
            (pod.method.clone(), pod.uri.clone()),
            (Method::DELETE, format!("{PODS}/{NAME}?"))
        );
        pod.fail(404, "NotFound");
        let old = next(&mut handle).await;
        assert_eq!(
            (old.method.clone(), old.uri.clone()),
            (Method::DELETE, format!("{SECRETS}/{NAME}?"))
        );
        old.answer(
            StatusCode::OK,
            json!({"kind": "Status", "status": "Success"}),
        );
        let again = next(&mut handle).await;
        assert_eq!(
            (again.method.clone(), again.uri.clone()),
            (Method::POST, format!("{SECRETS}?"))
        );
        again.echo();
        let pod = next(&mut handle).await;
        assert_eq!(pod.method, Method::POST);
        pod.fail(403, "pods is forbidden: exceeded quota");
        let cleanup = next(&mut handle).await;
        assert_eq!(
            (cleanup.method.clone(), cleanup.uri.clone()),
            (Method::DELETE, format!("{SECRETS}/{NAME}?"))
        );
        cleanup.answer(
            StatusCode::OK,
            json!({"kind": "Status", "status": "Success"}),
        );
    };
    let (started, ()) = tokio::join!(executors.start("t-7", b"task"), serve);
    match started {
        Err(e @ ExecutorPodError::Create { .. }) => {
            let e = e.to_string();
            assert!(e.contains("pod executor-t-7") && e.contains("quota"), "{e}");
        }
        other => panic!("expected a create error, got {other:?}"),
    }
}

#[tokio::test]
async fn leftovers_of_an_earlier_task_manager_are_removed_at_start() {
    let (executors, mut handle) = executors();
    let serve = async {
        let list = next(&mut handle).await;
        assert_eq!(list.method, Method::GET);
        assert_eq!(
            list.uri,
            format!(
                "{PODS}?&labelSelector=app.kubernetes.io%2Fname%3Dcohort%2C\
                 app.kubernetes.io%2Fcomponent%3Dexecutor%2Ccohort.dev%2Fparty%3Dparty-a"
            )
        );
        list.answer(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                {"metadata": {"name": "executor-old-1"}},
                {"metadata": {"name": "executor-old-2"}}
            ]}),
        );
        for old in ["executor-old-1", "executor-old-2"] {
            let pod = next(&mut handle).await;
            assert_eq!(
                (pod.method.clone(), pod.uri.clone()),
                (Method::DELETE, format!("{PODS}/{old}?"))
            );
            assert_eq!(pod.body["gracePeriodSeconds"], 0);
            pod.answer(
                StatusCode::OK,
                json!({"kind": "Status", "status": "Success"}),
            );
            let secret = next(&mut handle).await;
            assert_eq!(
                (secret.method.clone(), secret.uri.clone()),
                (Method::DELETE, format!("{SECRETS}/{old}?"))
            );
            secret.answer(
                StatusCode::OK,
                json!({"kind": "Status", "status": "Success"}),
            );
        }
    };
    let (removed, ()) = tokio::join!(executors.remove_leftovers(), serve);
    assert_eq!(removed.unwrap(), 2);
}

#[tokio::test]
async fn pinning_needs_the_node_and_tls_needs_a_secret() {
    let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let no_node = ExecutorOwner {
        node: None,
        ..owner()
    };
    let e = KubernetesExecutors::new(client.clone(), config(), no_node)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pinToNode") && e.contains("COHORT_NODE_NAME"),
        "{e}"
    );
    let mut no_tls = config();
    no_tls.tls_secret = None;
    let e = KubernetesExecutors::new(client.clone(), no_tls.clone(), owner())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tlsSecret"), "{e}");
    let insecure = ExecutorOwner {
        insecure: true,
        ..owner()
    };
    assert!(KubernetesExecutors::new(client, no_tls, insecure).is_ok());
}
