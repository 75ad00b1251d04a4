//! The web dashboard in headless Chromium, driven over WebDriver (chromedriver), against
//! a real federation through the proxy's TLS port: a refused token, sign-in, a bad spec
//! shown at its field, a job created from the form whose rounds appear live, the
//! accuracy plot, a job stopped with the button, a model downloaded and its digest
//! checked in the page, the parties, and a viewer whose stop button is disabled and
//! whose stop the server refuses. Screenshots of each page go to
//! `$CARGO_TARGET_TMPDIR/dashboard-shots` (the path is printed).
//!
//! The federation's CA is private: the browser session is opened with WebDriver's
//! `acceptInsecureCerts` (this test only), not with the CA added to a trust store.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use cohort_core::JobState;
use cohort_integration_tests::{Federation, digits_job, state_of};
use cohort_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The first of `names` found on PATH.
fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver in its own process group, with the browsers it starts; the whole group
/// is killed (and chromedriver reaped) on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(binary: &Path) -> anyhow::Result<Driver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let driver = Driver { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, status)) = http(port, "GET", "/status", None).await
                && status["value"]["ready"] == true
            {
                return Ok(driver);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("chromedriver on port {port} not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One HTTP/1.1 exchange with chromedriver on loopback (`Connection: close`, so the
/// body ends at EOF); the status and the JSON body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        // chromedriver may keep the connection open: the answer ends where its
        // Content-Length (or last chunk) says, else at EOF.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if answer_complete(&raw) {
                break;
            }
        }
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(120), exchange)
        .await
        .with_context(|| format!("{method} {path}: no answer within 120 s"))??;
    let text = String::from_utf8(raw).context("chromedriver's answer is not UTF-8")?;
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: no header end in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).with_context(|| format!("{method} {path}: {body:?}"))?
    };
    Ok((status, value))
}

/// Whether `raw` holds a whole HTTP answer (headers and the body they announce).
fn answer_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// A browser session; deleted (the browser closed) by [`Browser::close`], and the
/// driver's drop kills whatever is left.
struct Browser {
    driver: Driver,
    session: String,
    shots: PathBuf,
}

impl Browser {
    async fn open(shots: PathBuf, downloads: &Path, profile: &Path) -> anyhow::Result<Browser> {
        let Some(chromium) = find_on_path(&["chromium", "chromium-browser", "google-chrome"])
        else {
            bail!("no chromium on PATH");
        };
        let Some(chromedriver) = find_on_path(&["chromedriver"]) else {
            bail!("no chromedriver on PATH");
        };
        let driver = Driver::start(&chromedriver).await?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The federation's CA is private (see the module's doc).
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--disable-crash-reporter",
                    "--window-size=1360,1000", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.display()),
                ],
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let (status, created) = http(driver.port, "POST", "/session", Some(&capabilities)).await?;
        let Some(session) = created["value"]["sessionId"].as_str() else {
            bail!("no browser session ({status}): {created}");
        };
        std::fs::create_dir_all(&shots)?;
        Ok(Browser {
            session: session.to_string(),
            driver,
            shots,
        })
    }

    async fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        let (status, answer) = http(self.driver.port, method, &path, body.as_ref()).await?;
        if status != 200 {
            bail!("{method} {path}: {status} {}", answer["value"]);
        }
        Ok(answer["value"].clone())
    }

    /// Navigates to `url` and checks the page got there: a fresh headless browser may
    /// still be opening its first tab, which then takes the navigation's place.
    async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            self.command("POST", "/url", Some(json!({ "url": url })))
                .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                let href = self.eval("return location.href", json!([])).await?;
                if href.as_str() == Some(url) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if tries == 3 {
                let href = self.eval("return location.href", json!([])).await?;
                bail!("the browser is at {href}, not {url}, after {tries} navigations");
            }
        }
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn eval(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` until it returns something truthy (not null, false, 0 or ""),
    /// at most `timeout`; fails naming `what` with the page's text.
    async fn wait(&self, what: &str, timeout: Duration, script: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.eval(script, json!([])).await?;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self
                    .eval(
                        "return location.href + ' (' + document.readyState + ')\\n' + document.body.innerText",
                        json!([]),
                    )
                    .await
                    .unwrap_or_default();
                self.shot(&format!("timeout-{}", what.replace(' ', "-")))
                    .await
                    .ok();
                bail!("timed out after {timeout:?} waiting for {what}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn find(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .command(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        found[ELEMENT]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no element {css}: {found}"))
    }

    /// Clicks `css`, found afresh when a live update replaced it between finding and
    /// clicking (at most 10 s).
    async fn click(&self, css: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let id = self.find(css).await?;
            match self
                .command("POST", &format!("/element/{id}/click"), Some(json!({})))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.to_string().contains("stale element")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let id = self.find(css).await?;
        self.command("POST", &format!("/element/{id}/clear"), Some(json!({})))
            .await?;
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await
        .map(drop)
    }

    /// Accepts the page's confirm() dialog once it is open.
    async fn accept_dialog(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.command("POST", "/alert/accept", Some(json!({}))).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context("no dialog to accept within 10 s"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A screenshot of the whole page (the window grown to its height).
    async fn shot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let height = self
            .eval(
                "window.scrollTo(0, 0); return Math.ceil(document.documentElement.scrollHeight)",
                json!([]),
            )
            .await?
            .as_u64()
            .unwrap_or(1000)
            .clamp(700, 4000);
        self.command(
            "POST",
            "/window/rect",
            Some(json!({"width": 1360, "height": height})),
        )
        .await?;
        let png = self.command("GET", "/screenshot", None).await?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().context("a screenshot is base64")?)?;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        self.command(
            "POST",
            "/window/rect",
            Some(json!({"width": 1360, "height": 1000})),
        )
        .await?;
        Ok(path)
    }

    async fn close(self) {
        let _ = self.command("DELETE", "", None).await;
    }
}

async fn token(fed: &Federation, name: &str, role: pb::Role) -> String {
    fed.api()
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            namespace: "default".into(),
            role: role as i32,
        })
        .await
        .expect("the admin creates a token")
        .into_inner()
        .token
}

/// Signs in with `token` from the login page and waits for the jobs list.
async fn sign_in(browser: &Browser, base: &str, token: &str) -> anyhow::Result<()> {
    browser.goto(&format!("{base}#/login")).await?;
    browser
        .wait(
            "the login form",
            Duration::from_secs(20),
            "return document.querySelector('#token')",
        )
        .await?;
    browser.type_into("#token", token).await?;
    browser.click("#login").await?;
    browser
        .wait(
            "the jobs page after sign-in",
            Duration::from_secs(20),
            "return document.querySelector('#whoami') && (document.querySelector('#jobs') || document.body.innerText.includes('No jobs match'))",
        )
        .await
        .map(drop)
}

/// On a thread with a large stack: the scenario's futures and WebDriver's JSON outgrow
/// a test thread's 2 MiB in debug builds.
#[test]
fn the_dashboard_in_a_real_browser() {
    let test = std::thread::Builder::new()
        .name("dashboard".into())
        .stack_size(64 * 1024 * 1024)
        .spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_stack_size(16 * 1024 * 1024)
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(dashboard_in_a_real_browser())
        })
        .expect("a test thread");
    if let Err(panic) = test.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn dashboard_in_a_real_browser() {
    if find_on_path(&["chromium", "chromium-browser", "google-chrome"]).is_none()
        || find_on_path(&["chromedriver"]).is_none()
    {
        cohort_testkit::skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
        );
        return;
    }
    let fed = Federation::start(3).await.expect("federation");
    let base = format!("https://{}/", fed.stack.proxy);
    let dir = tempfile::tempdir().expect("tempdir");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-shots");
    eprintln!("dashboard screenshots: {}", shots.display());
    let browser = Box::pin(Browser::open(
        shots,
        &dir.path().join("downloads"),
        &dir.path().join("profile"),
    ))
    .await
    .expect("a headless chromium session");
    // Boxed: the scenario's state is too large for the test thread's stack.
    let result = Box::pin(scenario(&fed, &browser, &base)).await;
    browser.close().await;
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

async fn scenario(fed: &Federation, browser: &Browser, base: &str) -> anyhow::Result<()> {
    // A refused token stays on the login page, saying why.
    browser.goto(&format!("{base}#/login")).await?;
    browser
        .wait(
            "the login form",
            Duration::from_secs(30),
            "return document.querySelector('#token')",
        )
        .await?;
    browser.shot("01-login").await?;
    // The browser took HTTP/2 (ALPN h2), the port gRPC is served on.
    let protocol = browser
        .eval(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol",
            json!([]),
        )
        .await?;
    assert_eq!(protocol, json!("h2"), "the dashboard over HTTP/2");
    browser.type_into("#token", "not-a-token").await?;
    browser.click("#login").await?;
    browser
        .wait(
            "a refused token's error",
            Duration::from_secs(20),
            "return document.querySelector('#login-form .error')",
        )
        .await?;

    let admin = fed.stack.admin_token.expose().to_string();
    sign_in(browser, base, &admin).await?;
    let who = browser
        .eval(
            "return document.querySelector('#whoami').textContent",
            json!([]),
        )
        .await?;
    assert!(who.as_str().unwrap_or("").contains("admin"), "{who}");

    // A long job to stop later, created over gRPC: the same jobs the dashboard lists.
    let long = fed
        .create_job(&digits_job("dash-long", 1000, 2, 2, "60s"))
        .await?;

    // A bad spec: the server's problem shown at its field.
    browser.goto(&format!("{base}#/new")).await?;
    browser
        .wait(
            "the spec form",
            Duration::from_secs(20),
            "return document.querySelector('#spec')",
        )
        .await?;
    let bad = digits_job("dash-bad", 0, 2, 2, "60s");
    let expected_field = match cohort_core::JobSpec::parse(&bad) {
        Err(e) => e.field,
        Ok(_) => bail!("rounds: 0 is expected to be refused"),
    };
    set_spec(browser, &bad).await?;
    browser.click("#create-job").await?;
    let field = browser
        .wait(
            "the spec's field error",
            Duration::from_secs(30),
            "const f = document.querySelector('#error-field'); return f && f.textContent",
        )
        .await?;
    assert_eq!(field, json!(expected_field), "the problem's field is shown");
    browser.shot("02-new-job-field-error").await?;

    // A job from the form; its page follows its rounds live (no reload).
    let rounds = 12;
    set_spec(browser, &digits_job("dash-live", rounds, 2, 2, "60s")).await?;
    browser.click("#create-job").await?;
    browser
        .wait(
            "the new job's page",
            Duration::from_secs(30),
            "const l = document.querySelector('#live'); \
             return location.hash.startsWith('#/jobs/') && l && l.textContent",
        )
        .await?;
    browser
        .eval("window.stillTheSamePage = true; return true", json!([]))
        .await?;
    let seen_first = browser
        .eval(
            "return document.querySelectorAll('#rounds-table tbody tr').length",
            json!([]),
        )
        .await?
        .as_u64()
        .unwrap_or(0);
    let live = browser
        .eval(
            "return document.querySelector('#live').textContent",
            json!([]),
        )
        .await?;
    assert_eq!(live, json!("live"), "a running job's page follows it");
    browser
        .wait(
            "every round in the timeline",
            Duration::from_secs(240),
            &format!(
                "return document.querySelectorAll('#rounds-table tbody tr').length >= {rounds} \
                 && document.querySelector('h1 .badge').textContent === 'succeeded'"
            ),
        )
        .await?;
    assert!(
        seen_first < u64::from(rounds),
        "the page opened before the job ended ({seen_first} rounds seen first)"
    );
    let same = browser
        .eval("return window.stillTheSamePage === true", json!([]))
        .await?;
    assert_eq!(same, json!(true), "the rounds came without a reload");
    let job_id = browser
        .eval(
            "return decodeURIComponent(location.hash.slice('#/jobs/'.length))",
            json!([]),
        )
        .await?;
    let job_id = job_id
        .as_str()
        .context("the job's id in the URL")?
        .to_string();
    let job = fed.get_job(&job_id).await?;
    assert_eq!(job.name, "dash-live");
    assert_eq!(job.rounds_completed, rounds);

    // The accuracy plot: a point per round, each in [0, 1].
    let points = browser
        .eval(
            "const p = document.querySelector('[data-plot=accuracy]'); p.scrollIntoView(); \
             return p.querySelectorAll('circle').length",
            json!([]),
        )
        .await?;
    assert_eq!(points, json!(rounds), "one accuracy point per round");
    browser.shot("03-job-detail-accuracy-plot").await?;

    // Stop the long job with its button.
    fed.wait_job(
        &long.id,
        Duration::from_secs(120),
        "the long job to run",
        |j| j.rounds_completed >= 1,
    )
    .await?;
    browser.goto(&format!("{base}#/jobs/{}", long.id)).await?;
    browser
        .wait(
            "the long job's stop button",
            Duration::from_secs(20),
            "const b = document.querySelector('#stop-job'); return b && !b.disabled",
        )
        .await?;
    browser.click("#stop-job").await?;
    browser.accept_dialog().await?;
    browser
        .wait(
            "the stop to be acknowledged",
            Duration::from_secs(20),
            "return document.querySelector('#job-message .notice')",
        )
        .await?;
    let stopped = fed
        .wait_job(
            &long.id,
            Duration::from_secs(120),
            "the long job to stop",
            |j| state_of(j).is_terminal(),
        )
        .await?;
    assert_eq!(state_of(&stopped), JobState::Stopped, "{}", stopped.reason);
    browser
        .wait(
            "the page to show the job stopped",
            Duration::from_secs(30),
            "return document.querySelector('h1 .badge').textContent === 'stopped'",
        )
        .await?;
    browser.shot("04-job-stopped").await?;

    // The jobs list shows both.
    browser.goto(&format!("{base}#/jobs")).await?;
    browser
        .wait(
            "both jobs listed",
            Duration::from_secs(20),
            &format!(
                "return document.querySelector('tr[data-job=\"{}\"]') && document.querySelector('tr[data-job=\"{}\"]')",
                job.id, long.id
            ),
        )
        .await?;
    let accuracy = browser
        .wait(
            "the live job's accuracy in the list",
            Duration::from_secs(20),
            &format!(
                "const c = document.querySelector('tr[data-job=\"{}\"] td.accuracy'); \
                 return c && c.textContent.endsWith('%') && c.textContent",
                job.id
            ),
        )
        .await?;
    assert!(
        accuracy.as_str().is_some_and(|a| a.ends_with('%')),
        "{accuracy}"
    );
    browser.shot("05-jobs").await?;
    // The state filter: only the stopped job.
    browser.goto(&format!("{base}#/jobs?state=stopped")).await?;
    browser
        .wait(
            "the stopped jobs only",
            Duration::from_secs(20),
            &format!(
                "return document.querySelector('#filter-state').value === 'stopped' \
                 && document.querySelector('tr[data-job=\"{}\"]') \
                 && !document.querySelector('tr[data-job=\"{}\"]')",
                long.id, job.id
            ),
        )
        .await?;

    // Download the live job's last model: the page checks the bytes' sha256.
    let versions = fed
        .models()
        .list_versions(pb::ListVersionsRequest {
            name: job.model_name.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .versions;
    let latest = versions
        .iter()
        .max_by_key(|v| v.version)
        .context("the job stored model versions")?;
    browser.goto(&format!("{base}#/models")).await?;
    browser
        .wait(
            "the models list",
            Duration::from_secs(20),
            "return document.querySelector('#models')",
        )
        .await?;
    browser.shot("06-models").await?;
    browser
        .goto(&format!("{base}#/models/{}", job.model_name))
        .await?;
    browser
        .wait(
            "the model's versions",
            Duration::from_secs(20),
            &format!(
                "return document.querySelector('button.download[data-version=\"{}\"]')",
                latest.version
            ),
        )
        .await?;
    browser
        .click(&format!(
            "button.download[data-version=\"{}\"]",
            latest.version
        ))
        .await?;
    let downloaded = browser
        .wait(
            "the download",
            Duration::from_secs(60),
            "const d = document.querySelector('#downloaded'); \
             return d && [d.dataset.bytes, d.dataset.sha256, d.className]",
        )
        .await?;
    assert_eq!(
        downloaded,
        json!([latest.size_bytes.to_string(), latest.digest, "notice"]),
        "the downloaded bytes are the stored version"
    );
    browser.shot("07-model-versions-download").await?;

    // The parties, each connected, with its dataset.
    browser.goto(&format!("{base}#/parties")).await?;
    let parties = browser
        .wait(
            "the parties",
            Duration::from_secs(20),
            "return document.querySelectorAll('#parties tbody tr .badge.connected').length",
        )
        .await?;
    assert_eq!(parties, json!(3), "every party connected");
    browser.shot("08-parties").await?;

    // A viewer: the stop button disabled, and a stop sent anyway refused.
    let viewer = token(fed, "dash-viewer", pb::Role::Viewer).await;
    let running = fed
        .create_job(&digits_job("dash-viewed", 1000, 2, 2, "60s"))
        .await?;
    browser.click("#logout").await?;
    sign_in(browser, base, &viewer).await?;
    browser
        .goto(&format!("{base}#/jobs/{}", running.id))
        .await?;
    let disabled = browser
        .wait(
            "the viewer's job page",
            Duration::from_secs(20),
            "const b = document.querySelector('#stop-job'); \
             return b && document.querySelector('#viewer-note') && [b.disabled, document.querySelector('#delete-job').disabled]",
        )
        .await?;
    assert_eq!(
        disabled,
        json!([true, true]),
        "a viewer gets no stop or delete"
    );
    browser.shot("09-viewer-job").await?;
    let refused = browser
        .command(
            "POST",
            "/execute/async",
            Some(json!({
                "script": "const done = arguments[arguments.length - 1]; \
                    fetch('/api/v1/jobs/' + arguments[0] + '/stop', {method: 'POST', \
                      headers: {Authorization: 'Bearer ' + sessionStorage.getItem('cohort.token'), \
                                'Content-Type': 'application/json'}, body: '{}'}) \
                    .then(r => done(r.status), e => done(String(e)));",
                "args": [running.id],
            })),
        )
        .await?;
    assert_eq!(refused, json!(403), "the server refuses a viewer's stop");
    let still = fed.get_job(&running.id).await?;
    assert!(!state_of(&still).is_terminal(), "{}", still.reason);
    fed.jobs()
        .stop_job(pb::StopJobRequest {
            id: running.id.clone(),
            reason: "test over".into(),
        })
        .await?;
    Ok(())
}

/// Replaces the form's spec (a textarea) with `spec`.
async fn set_spec(browser: &Browser, spec: &str) -> anyhow::Result<()> {
    browser.type_into("#spec", spec).await
}
