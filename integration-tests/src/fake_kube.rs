//! A stand-in Kubernetes API server with a kubelet behind it, for task-manager's executor
//! Pods. No API server or kubelet can run on these machines; this one serves the few calls
//! the executor launcher makes (Secrets: create, delete; Pods: create, get, list by label,
//! delete, log) over plain HTTP on loopback, and *runs* every Pod it is given: secret volumes
//! are written to a directory per Pod, hostPath volumes are used in place, paths under a
//! mount in the container's arguments and environment are mapped to those directories, and
//! `/usr/local/bin/<binary>` is the freshly built binary (other commands are the host's).
//! The Pod's phase follows the process. Every request is recorded for assertions.
//!
//! The real client (kube-rs, through a kubeconfig) and the real executor are used
//! unchanged, so a test checks that what the launcher asks for actually runs.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

/// One recorded request: method and path (without the query).
pub type Call = (String, String);

struct FakePod {
    object: Value,
    child: Option<std::process::Child>,
    log: PathBuf,
    /// Why the Pod could not start, if it could not.
    failed_mount: Option<String>,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pods: BTreeMap<String, FakePod>,
    /// Every Pod object created, in order.
    created: Vec<Value>,
}

impl Drop for State {
    fn drop(&mut self) {
        for pod in self.pods.values_mut() {
            if let Some(child) = &mut pod.child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The fake API server; stops (and kills its Pods' processes) on drop.
pub struct FakeKube {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.server.abort();
        if let Ok(mut state) = self.state.lock() {
            state.pods.clear();
        }
    }
}

struct Kubelet {
    state: Arc<Mutex<State>>,
    /// Where Pods' volumes and logs go.
    root: PathBuf,
    /// Where `/usr/local/bin/<binary>` is found.
    bin_dir: PathBuf,
}

impl FakeKube {
    pub async fn start(root: &Path, bin_dir: &Path) -> anyhow::Result<FakeKube> {
        std::fs::create_dir_all(root)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let kubelet = Arc::new(Kubelet {
            state: state.clone(),
            root: root.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
        });
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kubelet = kubelet.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let kubelet = kubelet.clone();
                        async move { Ok::<_, Infallible>(kubelet.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Ok(FakeKube {
            addr,
            state,
            server,
        })
    }

    /// A kubeconfig pointing at this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user: {{}}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, config).with_context(|| path.display().to_string())
    }

    /// A Secret that exists before the test (e.g. the party's TLS Secret).
    pub fn add_secret(&self, name: &str, data: &[(&str, Vec<u8>)]) {
        if let Ok(mut state) = self.state.lock() {
            state.secrets.insert(
                name.to_string(),
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            );
        }
    }

    /// A running Pod with no process behind it (one an earlier task-manager left).
    pub fn add_idle_pod(&self, name: &str, labels: Value) {
        if let Ok(mut state) = self.state.lock() {
            state.pods.insert(
                name.to_string(),
                FakePod {
                    object: json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "labels": labels}}),
                    child: None,
                    log: PathBuf::new(),
                    failed_mount: None,
                },
            );
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state
            .lock()
            .map(|s| s.calls.clone())
            .unwrap_or_default()
    }

    /// Pod objects as created, in order.
    pub fn created_pods(&self) -> Vec<Value> {
        self.state
            .lock()
            .map(|s| s.created.clone())
            .unwrap_or_default()
    }

    pub fn live_pods(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.pods.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn live_secrets(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.secrets.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every Pod's log (stdout and stderr), concatenated.
    pub fn logs(&self, root: &Path) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path().join("log")) {
                    all.push_str(&text);
                }
            }
        }
        all
    }
}

fn status(code: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let ok = code.is_success();
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": if ok { "Success" } else { "Failure" },
            "message": reason, "reason": reason, "code": code.as_u16()}),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches_selector(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

impl Kubelet {
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest"),
        };
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Ok(mut state) = self.state.lock() {
            state.calls.push((method.clone(), path.clone()));
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("POST", ["api", "v1", "namespaces", _, "secrets"]) => self.create_secret(&body),
            ("DELETE", ["api", "v1", "namespaces", _, "secrets", name]) => {
                let gone = self
                    .state
                    .lock()
                    .map(|mut s| s.secrets.remove(*name).is_some())
                    .unwrap_or(false);
                if gone {
                    status(StatusCode::OK, "Deleted")
                } else {
                    status(StatusCode::NOT_FOUND, "NotFound")
                }
            }
            ("POST", ["api", "v1", "namespaces", _, "pods"]) => self.create_pod(body),
            ("GET", ["api", "v1", "namespaces", _, "pods"]) => {
                let selector = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("labelSelector="))
                    .map(percent_decode)
                    .unwrap_or_default();
                let items: Vec<Value> = self
                    .state
                    .lock()
                    .map(|s| {
                        s.pods
                            .values()
                            .filter(|p| matches_selector(&p.object, &selector))
                            .map(|p| p.object.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}),
                )
            }
            ("GET", ["api", "v1", "namespaces", _, "pods", name]) => self.get_pod(name),
            ("GET", ["api", "v1", "namespaces", _, "pods", name, "log"]) => {
                let log = self
                    .state
                    .lock()
                    .ok()
                    .and_then(|s| s.pods.get(*name).map(|p| p.log.clone()));
                match log {
                    Some(log) => {
                        let text = std::fs::read_to_string(log).unwrap_or_default();
                        Response::new(Full::new(Bytes::from(text)))
                    }
                    None => status(StatusCode::NOT_FOUND, "NotFound"),
                }
            }
            ("DELETE", ["api", "v1", "namespaces", _, "pods", name]) => {
                let pod = self
                    .state
                    .lock()
                    .ok()
                    .and_then(|mut s| s.pods.remove(*name));
                match pod {
                    Some(mut pod) => {
                        if let Some(child) = &mut pod.child {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        status(StatusCode::OK, "Deleted")
                    }
                    None => status(StatusCode::NOT_FOUND, "NotFound"),
                }
            }
            _ => status(StatusCode::NOT_FOUND, "NotFound"),
        }
    }

    fn create_secret(&self, body: &Value) -> Response<Full<Bytes>> {
        let Some(name) = body["metadata"]["name"].as_str() else {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
        };
        let mut data = BTreeMap::new();
        for (key, value) in body["data"].as_object().into_iter().flatten() {
            let Some(bytes) = value
                .as_str()
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            else {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
            };
            data.insert(key.clone(), bytes);
        }
        let Ok(mut state) = self.state.lock() else {
            return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        };
        if state.secrets.contains_key(name) {
            return status(StatusCode::CONFLICT, "AlreadyExists");
        }
        state.secrets.insert(name.to_string(), data);
        json_response(StatusCode::CREATED, body)
    }

    /// Materializes the volumes, maps the paths and starts the process.
    fn create_pod(&self, object: Value) -> Response<Full<Bytes>> {
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
        };
        if self
            .state
            .lock()
            .map(|s| s.pods.contains_key(&name))
            .unwrap_or(true)
        {
            return status(StatusCode::CONFLICT, "AlreadyExists");
        }
        let dir = self.root.join(&name);
        let log = dir.join("log");
        let (child, failed_mount) = match self.run(&object, &dir, &log) {
            Ok(child) => (Some(child), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        if let Ok(mut state) = self.state.lock() {
            state.created.push(object.clone());
            state.pods.insert(
                name,
                FakePod {
                    object: object.clone(),
                    child,
                    log,
                    failed_mount,
                },
            );
        }
        json_response(StatusCode::CREATED, &object)
    }

    fn run(&self, object: &Value, dir: &Path, log: &Path) -> anyhow::Result<std::process::Child> {
        std::fs::create_dir_all(dir)?;
        let spec = &object["spec"];
        let mut sources: BTreeMap<String, PathBuf> = BTreeMap::new();
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let name = volume["name"].as_str().context("volume without a name")?;
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let data = self
                    .state
                    .lock()
                    .ok()
                    .and_then(|s| s.secrets.get(secret).cloned())
                    .with_context(|| format!("secret {secret} not found"))?;
                let at = dir.join(name);
                std::fs::create_dir_all(&at)?;
                for (key, bytes) in data {
                    std::fs::write(at.join(key), bytes)?;
                }
                sources.insert(name.to_string(), at);
            } else if let Some(host) = volume["hostPath"]["path"].as_str() {
                sources.insert(name.to_string(), PathBuf::from(host));
            } else if volume.get("emptyDir").is_some() {
                let at = dir.join(name);
                std::fs::create_dir_all(&at)?;
                sources.insert(name.to_string(), at);
            } else {
                anyhow::bail!("volume {name}: only secret, hostPath and emptyDir are served");
            }
        }
        let container = &spec["containers"][0];
        // Longest mount path first, so nested mounts map to the innermost volume.
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().context("mount without a name")?;
            let path = mount["mountPath"]
                .as_str()
                .context("mount without a path")?;
            let source = sources
                .get(name)
                .with_context(|| format!("mount {name}: no such volume"))?;
            mounts.push((path.to_string(), source.clone()));
        }
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let map = |s: &str| -> String {
            for (mount, source) in &mounts {
                if s == mount {
                    return source.display().to_string();
                }
                if let Some(rest) = s.strip_prefix(&format!("{mount}/")) {
                    return source.join(rest).display().to_string();
                }
            }
            s.to_string()
        };
        let command = container["command"][0]
            .as_str()
            .context("container without a command")?;
        // The image's binaries are the freshly built ones; anything else is the host's.
        let program = match command.strip_prefix("/usr/local/bin/") {
            Some(binary) => self.bin_dir.join(binary),
            None => PathBuf::from(command),
        };
        let mut cmd = std::process::Command::new(program);
        for arg in container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(1)
        {
            cmd.arg(map(arg.as_str().unwrap_or_default()));
        }
        for arg in container["args"].as_array().into_iter().flatten() {
            cmd.arg(map(arg.as_str().unwrap_or_default()));
        }
        cmd.env_clear();
        for env in container["env"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (env["name"].as_str(), env["value"].as_str()) {
                cmd.env(k, map(v));
            }
        }
        let out = std::fs::File::create(log)?;
        cmd.stdout(out.try_clone()?).stderr(out);
        Ok(cmd.spawn()?)
    }

    fn get_pod(&self, name: &str) -> Response<Full<Bytes>> {
        let Ok(mut state) = self.state.lock() else {
            return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        };
        let Some(pod) = state.pods.get_mut(name) else {
            return status(StatusCode::NOT_FOUND, "NotFound");
        };
        let container_state = if let Some(why) = &pod.failed_mount {
            json!({"waiting": {"reason": "CreateContainerConfigError", "message": why}})
        } else {
            match pod.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(exit))) => {
                    let code = exit.code().unwrap_or(137);
                    json!({"terminated": {"exitCode": code,
                        "reason": if code == 0 { "Completed" } else { "Error" }}})
                }
                _ => json!({"running": {}}),
            }
        };
        let phase = match container_state["terminated"]["exitCode"].as_i64() {
            Some(0) => "Succeeded",
            Some(_) => "Failed",
            None if pod.failed_mount.is_some() => "Pending",
            None => "Running",
        };
        let mut object = pod.object.clone();
        object["status"] = json!({"phase": phase, "containerStatuses": [{
            "name": "executor", "image": "", "imageID": "", "ready": phase == "Running",
            "restartCount": 0, "state": container_state}]});
        json_response(StatusCode::OK, &object)
    }
}
