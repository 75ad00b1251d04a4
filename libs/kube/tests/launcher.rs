//! `KubernetesLauncher` against a mocked API server.
//!
//! No Kubernetes API server can run here (none installs on these machines), so the API server
//! is mocked with `tower_test::mock::pair`: each test reads the exact HTTP requests the
//! launcher makes (method, path, JSON body) and answers them as an API server would.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_core::JobId;
use cohort_kube::{KubernetesLauncher, KubernetesLauncherConfig, deployment_owner};
use cohort_runtime::launcher::{CoordinatorConfig, CoordinatorExit, Launcher};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod support;
use support::{ApiHandle, Seen, next};

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn owner() -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".to_string(),
        kind: "Deployment".to_string(),
        name: "job-scheduler".to_string(),
        uid: "8d3c0b5e-0000-4000-8000-000000000001".to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn config(poll: Duration) -> KubernetesLauncherConfig {
    let mut c = KubernetesLauncherConfig::new(
        "cohort",
        "ghcr.io/cohort/cohort:0.1.0",
        CoordinatorConfig {
            job_scheduler: "job-scheduler.cohort.svc:7001".to_string(),
            model_manager: "model-manager.cohort.svc:7002".to_string(),
            client_selector: "client-selector.cohort.svc:7003".to_string(),
        },
    );
    c.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("500m".to_string())),
            ("memory".to_string(), Quantity("1Gi".to_string())),
        ])),
        ..Default::default()
    });
    c.tls_secret = Some("coordinator-tls".to_string());
    c.owner = Some(owner());
    c.poll_interval = poll;
    c
}

fn launcher(
    poll: Duration,
) -> (
    KubernetesLauncher,
    ApiHandle,
    mpsc::UnboundedReceiver<CoordinatorExit>,
) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (exits_tx, exits) = mpsc::unbounded_channel();
    (
        KubernetesLauncher::new(client, config(poll), exits_tx),
        handle,
        exits,
    )
}

fn job() -> JobId {
    JobId::parse("digits-fedavg-x1y2z3").unwrap()
}

const PODS: &str = "/api/v1/namespaces/cohort/pods";
const SERVICES: &str = "/api/v1/namespaces/cohort/services";
const CONFIG_MAPS: &str = "/api/v1/namespaces/cohort/configmaps";
const SPEC: &str = r#"{"name":"digits-fedavg","rounds":3}"#;
const NAME: &str = "coordinator-digits-fedavg-x1y2z3";

fn labels() -> Value {
    json!({
        "app.kubernetes.io/name": "cohort",
        "app.kubernetes.io/component": "coordinator",
        "cohort.dev/job": "digits-fedavg-x1y2z3"
    })
}

/// Serves the three creates of a launch; returns the config map, pod and service bodies.
async fn serve_launch(handle: &mut ApiHandle) -> (Value, Value, Value) {
    let cm = next(handle).await;
    assert_eq!(cm.method, Method::POST);
    assert_eq!(cm.uri, format!("{CONFIG_MAPS}?"));
    let cm_body = cm.body.clone();
    cm.echo();
    let pod = next(handle).await;
    assert_eq!(pod.method, Method::POST);
    assert_eq!(pod.uri, format!("{PODS}?"));
    let pod_body = pod.body.clone();
    pod.echo();
    let svc = next(handle).await;
    assert_eq!(svc.method, Method::POST);
    assert_eq!(svc.uri, format!("{SERVICES}?"));
    let svc_body = svc.body.clone();
    svc.echo();
    (cm_body, pod_body, svc_body)
}

/// Expects the deletes of the job's Service and ConfigMap (after the Pod's), answering
/// `service` and `config_map`.
async fn expect_service_and_config_deletes(
    handle: &mut ApiHandle,
    service: StatusCode,
    config_map: StatusCode,
) {
    for (path, code) in [(SERVICES, service), (CONFIG_MAPS, config_map)] {
        let delete = next(handle).await;
        assert_eq!(
            (delete.method.clone(), delete.uri.as_str()),
            (Method::DELETE, &*format!("{path}/{NAME}?"))
        );
        if code == StatusCode::OK {
            delete.answer(
                code,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
            );
        } else {
            delete.answer(code, status(code.as_u16(), "NotFound"));
        }
    }
}

#[tokio::test]
async fn launch_creates_the_coordinator_pod_and_service() {
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let (launched, (config_map, pod, service)) =
        tokio::join!(launcher.launch(&job, SPEC), serve_launch(&mut handle));
    assert_eq!(launched.unwrap(), None, "a pod has no pid");

    let expected_owner = json!([{
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "job-scheduler",
        "uid": "8d3c0b5e-0000-4000-8000-000000000001",
        "controller": true, "blockOwnerDeletion": true
    }]);
    assert_eq!(
        config_map,
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": NAME,
                "namespace": "cohort",
                "labels": labels(),
                "ownerReferences": expected_owner
            },
            "immutable": true,
            "data": {"spec.json": SPEC}
        })
    );
    assert_eq!(
        pod,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": NAME,
                "namespace": "cohort",
                "labels": labels(),
                "ownerReferences": expected_owner
            },
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "coordinator",
                    "image": "ghcr.io/cohort/cohort:0.1.0",
                    "command": ["coordinator"],
                    "args": [
                        "--job-spec", "/etc/cohort/job/spec.json",
                        "--job-id", "digits-fedavg-x1y2z3",
                        "--job-scheduler", "job-scheduler.cohort.svc:7001",
                        "--model-manager", "model-manager.cohort.svc:7002",
                        "--client-selector", "client-selector.cohort.svc:7003",
                        "--listen", "0.0.0.0:7000",
                        "--advertise", "coordinator-digits-fedavg-x1y2z3.cohort.svc.cluster.local:7000"
                    ],
                    "env": [
                        {"name": "COHORT_TLS_CERT", "value": "/etc/cohort/tls/tls.crt"},
                        {"name": "COHORT_TLS_KEY", "value": "/etc/cohort/tls/tls.key"},
                        {"name": "COHORT_TLS_CA", "value": "/etc/cohort/tls/ca.crt"}
                    ],
                    "ports": [{"name": "grpc", "containerPort": 7000, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                    "volumeMounts": [
                        {"name": "job", "mountPath": "/etc/cohort/job", "readOnly": true},
                        {"name": "tls", "mountPath": "/etc/cohort/tls", "readOnly": true}
                    ]
                }],
                "volumes": [
                    {"name": "job", "configMap": {"name": NAME}},
                    {"name": "tls", "secret": {"secretName": "coordinator-tls"}}
                ]
            }
        })
    );
    assert_eq!(
        service,
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": NAME,
                "namespace": "cohort",
                "labels": labels(),
                "ownerReferences": expected_owner
            },
            "spec": {
                "selector": {"cohort.dev/job": "digits-fedavg-x1y2z3"},
                "ports": [{"name": "grpc", "port": 7000, "targetPort": 7000, "protocol": "TCP"}]
            }
        })
    );
    assert_eq!(launcher.watched(), vec![job]);
}

#[test]
fn a_metrics_port_adds_the_flag_the_container_port_and_the_scrape_annotations() {
    let plain = config(Duration::from_secs(5)).coordinator_pod(&job());
    assert!(plain.metadata.annotations.is_none());
    let container = &plain.spec.as_ref().unwrap().containers[0];
    assert!(
        !container
            .args
            .as_ref()
            .unwrap()
            .contains(&"--metrics-listen".to_string())
    );
    assert_eq!(container.ports.as_ref().unwrap().len(), 1);

    let mut c = config(Duration::from_secs(5));
    c.metrics_port = Some(9464);
    let pod = c.coordinator_pod(&job());
    let annotations = pod.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let args = container.args.as_ref().unwrap();
    let at = args.iter().position(|a| a == "--metrics-listen").unwrap();
    assert_eq!(args[at + 1], "0.0.0.0:9464");
    let ports = container.ports.as_ref().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9464)
    );
    // The Service stays the gRPC port only: Prometheus scrapes Pods.
    let service = c.coordinator_service(&job());
    assert!(service.metadata.annotations.is_none());
    assert_eq!(service.spec.unwrap().ports.unwrap().len(), 1);
}

#[tokio::test]
async fn launch_failure_is_an_error_naming_the_pod() {
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let serve = async {
        next(&mut handle).await.echo();
        let pod = next(&mut handle).await;
        pod.answer(
            StatusCode::FORBIDDEN,
            status(403, "pods is forbidden: User cannot create resource"),
        );
    };
    let (launched, ()) = tokio::join!(launcher.launch(&job, SPEC), serve);
    let e = launched
        .expect_err("a refused create is an error")
        .to_string();
    assert!(e.contains(NAME) && e.contains("forbidden"), "{e}");
    assert!(launcher.watched().is_empty());
}

#[tokio::test]
async fn relaunch_replaces_an_ended_pod_of_the_same_name() {
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let serve = async {
        // The config map is left from the first launch: same job, same spec.
        let cm = next(&mut handle).await;
        assert_eq!(cm.uri, format!("{CONFIG_MAPS}?"));
        cm.answer(StatusCode::CONFLICT, status(409, "AlreadyExists"));
        let create = next(&mut handle).await;
        assert_eq!(create.method, Method::POST);
        create.answer(StatusCode::CONFLICT, status(409, "AlreadyExists"));
        let get = next(&mut handle).await;
        assert_eq!(
            (get.method.clone(), get.uri.as_str()),
            (Method::GET, &*format!("{PODS}/{NAME}"))
        );
        get.answer(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME, "labels": labels()},
                   "status": {"phase": "Failed"}}),
        );
        let delete = next(&mut handle).await;
        assert_eq!(delete.method, Method::DELETE);
        assert_eq!(delete.uri, format!("{PODS}/{NAME}?"));
        assert_eq!(delete.body["gracePeriodSeconds"], json!(0));
        delete.answer(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME}}),
        );
        // The second create goes through; the service is left from the first launch.
        let create = next(&mut handle).await;
        assert_eq!(create.method, Method::POST);
        create.echo();
        let svc = next(&mut handle).await;
        assert_eq!(svc.uri, format!("{SERVICES}?"));
        svc.answer(StatusCode::CONFLICT, status(409, "AlreadyExists"));
    };
    let (launched, ()) = tokio::join!(launcher.launch(&job, SPEC), serve);
    launched.unwrap();
    assert_eq!(launcher.watched(), vec![job]);
}

#[tokio::test]
async fn stop_deletes_the_pod_with_its_grace_period_and_the_service() {
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let serve = async {
        let pod = next(&mut handle).await;
        assert_eq!(pod.method, Method::DELETE);
        assert_eq!(pod.uri, format!("{PODS}/{NAME}?"));
        assert_eq!(pod.body["gracePeriodSeconds"], json!(7));
        pod.answer(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME}}),
        );
        // Already gone is fine.
        expect_service_and_config_deletes(&mut handle, StatusCode::NOT_FOUND, StatusCode::OK).await;
    };
    let ((), ()) = tokio::join!(launcher.stop(&job, Duration::from_secs(7)), serve);
}

#[tokio::test]
async fn adopt_watches_a_running_pod_and_refuses_an_ended_or_missing_one() {
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let pod = |phase: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME, "labels": labels()},
               "status": {"phase": phase}})
    };
    for (answer, adopted) in [
        ((StatusCode::OK, pod("Running")), true),
        ((StatusCode::OK, pod("Succeeded")), false),
        ((StatusCode::NOT_FOUND, status(404, "NotFound")), false),
    ] {
        let serve = async {
            let get = next(&mut handle).await;
            assert_eq!(get.method, Method::GET);
            assert_eq!(get.uri, format!("{PODS}/{NAME}"));
            get.answer(answer.0, answer.1.clone());
        };
        let (got, ()) = tokio::join!(launcher.adopt(&job, None), serve);
        assert_eq!(got, adopted, "{answer:?}");
    }
    assert_eq!(launcher.watched(), vec![job]);
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "42"}, "items": items})
}

/// The watcher's list: coordinator pods by label.
async fn expect_list(handle: &mut ApiHandle) -> Seen {
    let list = next(handle).await;
    assert_eq!(list.method, Method::GET);
    assert_eq!(
        list.uri,
        format!(
            "{PODS}?&labelSelector=app.kubernetes.io%2Fname%3Dcohort%2Capp.kubernetes.io%2Fcomponent%3Dcoordinator"
        )
    );
    list
}

#[tokio::test]
async fn a_failed_coordinator_pod_is_reported_as_an_exit_for_relaunch() {
    let (launcher, mut handle, mut exits) = launcher(Duration::from_millis(20));
    let job = job();
    let (launched, _) = tokio::join!(launcher.launch(&job, SPEC), serve_launch(&mut handle));
    launched.unwrap();

    // First poll: still running, nothing reported.
    expect_list(&mut handle).await.answer(
        StatusCode::OK,
        pod_list(vec![json!({
            "metadata": {"name": NAME, "labels": labels()},
            "status": {"phase": "Running"}
        })]),
    );
    // Second poll: the container failed.
    expect_list(&mut handle).await.answer(
        StatusCode::OK,
        pod_list(vec![json!({
            "metadata": {"name": NAME, "labels": labels()},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "coordinator", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
            }]}
        })]),
    );
    assert!(
        exits.try_recv().is_err(),
        "reported before the pod was cleared"
    );
    // The ended pod and its service are deleted, so the relaunch can reuse the names.
    let delete = next(&mut handle).await;
    assert_eq!(delete.method, Method::DELETE);
    assert_eq!(delete.uri, format!("{PODS}/{NAME}?"));
    assert_eq!(delete.body["gracePeriodSeconds"], json!(0));
    delete.answer(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME}}),
    );
    expect_service_and_config_deletes(&mut handle, StatusCode::OK, StatusCode::OK).await;

    let exit = tokio::time::timeout(Duration::from_secs(10), exits.recv())
        .await
        .expect("an exit within 10 s")
        .expect("channel open");
    assert_eq!(exit.job_id, job);
    assert_eq!(exit.description, "pod Failed: exit status 137 (OOMKilled)");
    assert!(
        launcher.watched().is_empty(),
        "reported once, then forgotten"
    );
}

#[tokio::test]
async fn a_deleted_pod_after_stop_is_reported_as_stopped() {
    let (launcher, mut handle, mut exits) = launcher(Duration::from_millis(20));
    let job = job();
    let (launched, _) = tokio::join!(launcher.launch(&job, SPEC), serve_launch(&mut handle));
    launched.unwrap();
    // A poll may come between launch and stop; answer whatever comes in order.
    let stop = launcher.stop(&job, Duration::from_secs(2));
    let serve = async {
        let mut deletes = 0;
        while deletes < 3 {
            let seen = next(&mut handle).await;
            if seen.method == Method::DELETE {
                deletes += 1;
                seen.answer(
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                );
            } else {
                // Still terminating.
                seen.answer(
                    StatusCode::OK,
                    pod_list(vec![json!({"metadata": {"name": NAME, "labels": labels()},
                                         "status": {"phase": "Running"}})]),
                );
            }
        }
    };
    tokio::join!(stop, serve);
    // The pod is gone now: the next poll reports the exit.
    let list = expect_list(&mut handle).await;
    list.answer(StatusCode::OK, pod_list(vec![]));
    // A missing pod needs no pod delete, but the service and config map are deleted again
    // (idempotent).
    expect_service_and_config_deletes(&mut handle, StatusCode::NOT_FOUND, StatusCode::NOT_FOUND)
        .await;
    let exit = tokio::time::timeout(Duration::from_secs(10), exits.recv())
        .await
        .expect("an exit within 10 s")
        .expect("channel open");
    assert_eq!(exit.job_id, job);
    assert_eq!(exit.description, "stopped (pod deleted)");
}

#[tokio::test]
async fn the_owner_is_job_schedulers_deployment_read_for_its_uid() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let serve = async {
        let get = next(&mut handle).await;
        assert_eq!(get.method, Method::GET);
        assert_eq!(
            get.uri,
            "/apis/apps/v1/namespaces/cohort/deployments/cohort-server-job-scheduler"
        );
        get.answer(
            StatusCode::OK,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "cohort-server-job-scheduler", "uid": "d-uid-1"}}),
        );
    };
    let (owner, ()) = tokio::join!(
        deployment_owner(client, "cohort", "cohort-server-job-scheduler"),
        serve
    );
    assert_eq!(
        serde_json::to_value(owner.unwrap()).unwrap(),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "name": "cohort-server-job-scheduler", "uid": "d-uid-1"})
    );
}

#[tokio::test]
async fn alive_reads_the_pod_phase() {
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let pod = |phase: &str, deleting: bool| {
        let mut metadata = json!({"name": NAME, "labels": labels()});
        if deleting {
            metadata["deletionTimestamp"] = json!("2026-12-06T10:00:00Z");
        }
        (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                   "status": {"phase": phase}}),
        )
    };
    for (answer, want) in [
        (pod("Pending", false), Some(true)),
        (pod("Running", false), Some(true)),
        // Being deleted: it is going away, whatever its phase says.
        (pod("Running", true), Some(false)),
        (pod("Failed", false), Some(false)),
        (pod("Succeeded", false), Some(false)),
        // The node stopped reporting: cannot tell.
        (pod("Unknown", false), None),
        (
            (StatusCode::NOT_FOUND, status(404, "NotFound")),
            Some(false),
        ),
        (
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                status(500, "InternalError"),
            ),
            None,
        ),
    ] {
        let serve = async {
            let get = next(&mut handle).await;
            assert_eq!(
                (get.method.clone(), get.uri.as_str()),
                (Method::GET, &*format!("{PODS}/{NAME}"))
            );
            get.answer(answer.0, answer.1.clone());
        };
        let (got, ()) = tokio::join!(launcher.alive(&job), serve);
        assert_eq!(got, want, "{answer:?}");
    }
    assert!(
        launcher.watched().is_empty(),
        "asking watches nothing: adopt does"
    );
}

#[tokio::test]
async fn stop_all_names_the_coordinators_it_stopped() {
    // By default coordinator pods outlive job-scheduler: nothing stopped, nothing named.
    let (launcher, mut handle, _exits) = launcher(Duration::from_secs(3600));
    let job = job();
    let (launched, _) = tokio::join!(launcher.launch(&job, SPEC), serve_launch(&mut handle));
    launched.unwrap();
    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        launcher.stop_all(Duration::from_secs(2)),
    )
    .await
    .expect("stop_all makes no request to wait for");
    assert!(stopped.is_empty(), "{stopped:?}");
    assert_eq!(launcher.watched(), vec![job.clone()], "still watched");

    // With stop_on_shutdown, every watched pod is deleted and its job named.
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (exits_tx, _exits) = mpsc::unbounded_channel();
    let mut stopping = config(Duration::from_secs(3600));
    stopping.stop_on_shutdown = true;
    let launcher = KubernetesLauncher::new(client, stopping, exits_tx);
    let (launched, _) = tokio::join!(launcher.launch(&job, SPEC), serve_launch(&mut handle));
    launched.unwrap();
    let serve = async {
        let pod = next(&mut handle).await;
        assert_eq!(
            (pod.method.clone(), pod.uri.as_str()),
            (Method::DELETE, &*format!("{PODS}/{NAME}?"))
        );
        assert_eq!(pod.body["gracePeriodSeconds"], json!(2));
        pod.answer(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME}}),
        );
        expect_service_and_config_deletes(&mut handle, StatusCode::OK, StatusCode::OK).await;
    };
    let (stopped, ()) = tokio::join!(launcher.stop_all(Duration::from_secs(2)), serve);
    assert_eq!(stopped, vec![job]);
}
