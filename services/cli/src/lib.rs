//! The `cohort` command line (DESIGN §4): runs a local federation (`up`,
//! `demo`) and drives jobs, models and clients through the proxy.
//!
//! A client of the public gRPC API only: it must not depend on service crates
//! or stores.

pub mod audit;
pub mod bench;
pub mod certs;
pub mod check;
pub mod data;
pub mod error;
pub mod profile;
pub mod show;
pub mod stack;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use cohort_proto::v1 as pb;
use cohort_runtime::Channel;
use futures::StreamExt;
use serde_json::json;
use sha2::Digest;

use crate::error::usage;
use crate::profile::Profile;
use crate::show::*;
use crate::stack::{PartyData, Stack, StackConfig};

#[derive(Debug, Parser)]
#[command(
    name = "cohort",
    version,
    about = "Cohort federated learning",
    after_help = "With --json, output is JSON and a failure is one JSON line on stderr: \
                  {\"error\": {\"code\", \"message\", \"field\"}}."
)]
pub struct Cli {
    /// Print machine-readable JSON (one object, or one per line for streams); errors too.
    #[arg(long, global = true)]
    pub json: bool,
    /// Profile naming the federation to talk to (default: ~/.config/cohort/profile.toml).
    #[arg(long, global = true, env = "COHORT_PROFILE")]
    pub profile: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service and N local parties on this machine until interrupted.
    Up(UpArgs),
    /// Run a complete federated job on the bundled digits data and exit.
    Demo(DemoArgs),
    /// Jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// The model registry.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Registered parties.
    #[command(subcommand)]
    Client(ClientCommand),
    /// The federation's CA and mutual-TLS certificates (files only, offline).
    #[command(subcommand)]
    Cert(certs::CertCommand),
    /// API tokens (needs an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log: who created, stopped or deleted jobs, made or deleted tokens,
    /// revoked parties, and how each call ended (needs an admin token).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Measure Cohort's own machinery (no federation needed for `aggregate`).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check a party's connection to the federation step by step (with task-manager's flags),
    /// or with --federation, probe every connected party. Exit code 1 when a step fails.
    Check(check::CheckArgs),
    /// Show this CLI's version and the server's.
    ///
    /// The server's version comes from job-scheduler through the profile's proxy. When it
    /// cannot be learned, the CLI's version is still printed, the error says why, and the
    /// exit code is 1 (with or without --json); --client asks no server.
    Version {
        /// Only this CLI's version; no server is asked.
        #[arg(long)]
        client: bool,
    },
    /// Print a shell completion script (e.g. `source <(cohort completions bash)`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once and only its hash is kept.
    Create {
        /// The namespace it works in, or "*" for every namespace.
        #[arg(long)]
        namespace: String,
        /// admin (everything, including tokens), member (jobs and models) or viewer (read only).
        #[arg(long)]
        role: String,
        /// A label saying who or what holds it.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List tokens (ids, names, namespaces and roles; never secrets).
    List {
        /// Only tokens of this namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Delete a token: it stops working at once.
    Delete {
        /// The token's id (from `token list`).
        id: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where databases, models, party data and logs live.
    #[arg(long, env = "COHORT_DATA_DIR", default_value = "cohort-data")]
    pub data_dir: PathBuf,
    /// Local parties to start, each with a share of the digits data.
    #[arg(long, default_value_t = 3)]
    pub clients: u32,
    /// Address of the proxy, the federation's one entry point.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// A DNS name or address remote parties dial the proxy at, put in its
    /// certificate (repeatable); loopback and --listen's host are always there.
    #[arg(long = "proxy-name")]
    pub proxy_names: Vec<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// Where the server services keep metadata and models.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// Metadata database for the server services (sqlite://, postgres://, mongodb://);
    /// default: SQLite files in the data directory.
    #[arg(long, env = "COHORT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Model storage (file://PATH or s3://BUCKET/PREFIX); default: the data directory.
    #[arg(long, env = "COHORT_BLOB_URL")]
    pub blob_url: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Local parties, each with a share of the digits data (1 to 64).
    #[arg(long, default_value_t = 3)]
    pub clients: u32,
    /// Federated rounds to run.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Dirichlet alpha of the label skew across parties (smaller: more skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Seed of the data split, the initial weights and the parties' data order: the same
    /// seed gives the same accuracy.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep everything in this directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create a job from a YAML or JSON spec.
    Create {
        /// The spec file; "-" reads it from stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Show a job: state, reason, best and last round, and each round's record.
    Get {
        /// The job's id.
        id: String,
    },
    /// List jobs (at most --limit).
    List {
        /// Only jobs of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// QUEUED, RUNNING, SUCCEEDED, ...
        #[arg(long)]
        state: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Follow a job until it ends; exits 0 if it SUCCEEDED.
    Watch {
        /// The job's id.
        id: String,
    },
    /// The job's log: state changes, and task failures, parties left out and refused or
    /// dropped updates (round, party, task, reason).
    Logs {
        /// The job's id.
        id: String,
        /// Keep printing new entries (asking every second) until the job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Stop a job; it ends as STOPPED.
    Stop {
        /// The job's id.
        id: String,
        /// Why, recorded in the job's log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Delete a job that has ended (stop it first).
    Delete {
        /// The job's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// List model versions.
    List {
        /// Only this model.
        #[arg(long)]
        name: Option<String>,
        /// Only versions made by this job.
        #[arg(long)]
        job: Option<String>,
        /// Only this namespace (default: every namespace the token may read).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Show one version: digest, size, lineage and metrics.
    Get {
        /// NAME or NAME@VERSION (default: latest).
        model: String,
        /// The model's namespace (default: the token's, or "default" for a token of
        /// every namespace).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Write a version's safetensors file; its sha256 is checked.
    Download {
        /// NAME or NAME@VERSION (default: latest).
        model: String,
        /// The file to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// The model's namespace (default: the token's, or "default" for a token of
        /// every namespace).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Store a safetensors file as a new version of NAME.
    Upload {
        /// The model's name.
        name: String,
        /// The safetensors file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List registered parties: connection, datasets, tasks.
    List,
    /// Close the party's connections and refuse it from now on (needs an admin token for "*").
    Revoke {
        /// The party's name.
        party: String,
    },
}

impl Cli {
    /// Runs the command; the returned code is the process exit code.
    pub async fn run(self) -> anyhow::Result<i32> {
        let json = self.json;
        match self.command {
            Command::Up(a) => up(a, json).await,
            Command::Demo(a) => demo(a, json).await,
            Command::Version { client } => version(self.profile.as_deref(), client, json).await,
            Command::Bench(c) => bench::run(c, json).await,
            Command::Check(a) => check::run(a, self.profile.as_deref(), json).await,
            Command::Completions { shell } => {
                let mut out = std::io::stdout().lock();
                clap_complete::generate(shell, &mut Cli::command(), "cohort", &mut out);
                out.flush()?;
                Ok(0)
            }
            Command::Job(c) => {
                let api = Api::connect(self.profile.as_deref())?;
                job_command(api, c, json).await
            }
            Command::Model(c) => {
                let api = Api::connect(self.profile.as_deref())?;
                model_command(api, c, json).await
            }
            Command::Cert(c) => certs::run(c, json),
            Command::Token(c) => {
                let api = Api::connect(self.profile.as_deref())?;
                token_command(api, c, json).await
            }
            Command::Audit(c) => {
                let api = Api::connect(self.profile.as_deref())?;
                audit::run(api, c, json).await
            }
            Command::Client(ClientCommand::Revoke { party }) => {
                let api = Api::connect(self.profile.as_deref())?;
                let info = api
                    .selector()
                    .revoke_client(pb::RevokeClientRequest { party })
                    .await?
                    .into_inner();
                if json {
                    println!("{}", client_json(&info));
                } else {
                    println!("party {} revoked", info.party);
                }
                Ok(0)
            }
            Command::Client(ClientCommand::List) => {
                let api = Api::connect(self.profile.as_deref())?;
                let clients = api
                    .selector()
                    .list_clients(pb::ListClientsRequest {})
                    .await?
                    .into_inner()
                    .clients;
                print_list(&clients, json, client_json, client_line);
                Ok(0)
            }
        }
    }
}

/// `cohort version`: the CLI's version always; the server's when it answers.
async fn version(profile: Option<&Path>, client_only: bool, json: bool) -> anyhow::Result<i32> {
    let cli = env!("CARGO_PKG_VERSION");
    let server = match client_only {
        true => None,
        false => Some(server_version(profile).await),
    };
    let known = match &server {
        Some(Ok(v)) => Some(v.as_str()),
        _ => None,
    };
    if json {
        println!("{}", json!({"cli": cli, "server": known}));
    } else {
        println!("cohort {cli}");
        if let Some(v) = known {
            println!("server {v}");
        }
    }
    match server {
        Some(Err(e)) => Err(e.context("the server's version is unknown")),
        _ => Ok(0),
    }
}

/// How long `cohort version` waits for the server's answer.
const SERVER_INFO_TIMEOUT: Duration = Duration::from_secs(10);

async fn server_version(profile: Option<&Path>) -> anyhow::Result<String> {
    let api = Api::connect(profile)?;
    let mut jobs = api.jobs();
    let ask = jobs.get_server_info(pb::GetServerInfoRequest {});
    let info = match tokio::time::timeout(SERVER_INFO_TIMEOUT, ask).await {
        Ok(answer) => answer?.into_inner(),
        Err(_) => {
            return Err(tonic::Status::deadline_exceeded(format!(
                "the federation at {} did not answer within {}",
                api.place,
                humantime::format_duration(SERVER_INFO_TIMEOUT)
            ))
            .into());
        }
    };
    Ok(info.version)
}

/// A list as one JSON array, or one line per item.
fn print_list<T>(
    items: &[T],
    json: bool,
    as_json: fn(&T) -> serde_json::Value,
    as_line: impl Fn(&T) -> String,
) {
    if json {
        println!("{}", json!(items.iter().map(as_json).collect::<Vec<_>>()));
    } else {
        for item in items {
            println!("{}", as_line(item));
        }
    }
}

/// Adds the profile's API token to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type AuthChannel = tonic::service::interceptor::InterceptedService<Reach, Bearer>;

/// The channel to the proxy. A call that cannot reach it fails UNAVAILABLE with a message
/// naming the endpoint and the profile it came from, and [`is_unreachable`] says so.
#[derive(Clone)]
pub struct Reach {
    channel: Channel,
    place: Arc<str>,
}

/// Marks a status as "the federation could not be reached" (its source).
#[derive(Debug)]
struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the federation could not be reached")
    }
}

impl std::error::Error for Unreachable {}

/// Whether a call failed because the federation could not be reached at all (as opposed to
/// an answer from it).
pub fn is_unreachable(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some_and(|s| s.is::<Unreachable>())
}

impl Reach {
    fn failed(&self, e: tonic::transport::Error) -> tonic::Status {
        let reason = connection_failure(&e);
        let status = tonic::Status::from_error(Box::new(e));
        if status.code() != tonic::Code::Unavailable {
            return status;
        }
        let mut status = tonic::Status::unavailable(format!(
            "cannot reach the federation at {}: {reason}",
            self.place
        ));
        status.set_source(Arc::new(Unreachable));
        status
    }
}

/// The innermost cause of a transport failure, e.g. "connection refused".
fn connection_failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    match cause.downcast_ref::<std::io::Error>() {
        // An OS error reads better as its kind ("connection refused").
        Some(io) if io.get_ref().is_none() => io.kind().to_string(),
        _ => cause.to_string(),
    }
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for Reach {
    type Response = HttpResponse;
    type Error = tonic::Status;
    type Future = tonic::codegen::BoxFuture<HttpResponse, tonic::Status>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), tonic::Status>> {
        self.channel.poll_ready(cx).map_err(|e| self.failed(e))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let this = self.clone();
        let call = self.channel.call(req);
        Box::pin(async move { call.await.map_err(|e| this.failed(e)) })
    }
}

/// Clients for the public services, all through the proxy.
#[derive(Clone)]
pub struct Api {
    channel: Reach,
    bearer: Bearer,
    /// The endpoint and the profile file it came from, for errors.
    place: Arc<str>,
}

impl Api {
    /// The federation named by the profile `--profile`/`COHORT_PROFILE`/the default names.
    pub fn connect(profile: Option<&Path>) -> anyhow::Result<Api> {
        let path = Profile::resolve_path(profile)?;
        Api::build(&Profile::load(&path)?, Some(&path))
    }

    pub fn from_profile(p: &Profile) -> anyhow::Result<Api> {
        Api::build(p, None)
    }

    fn build(p: &Profile, path: Option<&Path>) -> anyhow::Result<Api> {
        let channel = match &p.ca_cert {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("profile: cannot read ca_cert {}", ca.display()))?;
                cohort_runtime::server_authenticated_channel(&p.endpoint, &pem)?
            }
            None => cohort_runtime::lazy_channel(&p.endpoint)?,
        };
        let bearer = match &p.token {
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {t}")
                        .parse()
                        .context("profile: token is not a header value")?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let place: Arc<str> = match path {
            Some(path) => format!("{} (profile {})", p.endpoint, path.display()).into(),
            None => p.endpoint.clone().into(),
        };
        Ok(Api {
            channel: Reach {
                channel,
                place: place.clone(),
            },
            bearer: Bearer(bearer),
            place,
        })
    }

    pub fn jobs(&self) -> pb::jobs_client::JobsClient<AuthChannel> {
        pb::jobs_client::JobsClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn models(&self) -> pb::models_client::ModelsClient<AuthChannel> {
        pb::models_client::ModelsClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn selector(&self) -> pb::client_selector_client::ClientSelectorClient<AuthChannel> {
        pb::client_selector_client::ClientSelectorClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    /// Version `version` of a job's model, downloaded whole and decoded.
    pub async fn job_model(
        &self,
        job: &pb::Job,
        version: u32,
    ) -> anyhow::Result<Vec<cohort_core::NamedTensor>> {
        let mut stream = self
            .models()
            .download(pb::GetVersionRequest {
                name: job.model_name.clone(),
                version,
                namespace: job.namespace.clone(),
            })
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?.data);
        }
        cohort_fl::from_safetensors(&bytes)
            .with_context(|| format!("model {}@{version}", job.model_name))
    }

    pub fn tokens(&self) -> pb::tokens_client::TokensClient<AuthChannel> {
        pb::tokens_client::TokensClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

fn role_name(role: i32) -> &'static str {
    cohort_runtime::wire::role_from_wire(role).map_or("?", cohort_core::Role::as_str)
}

fn token_json(t: &pb::TokenInfo) -> serde_json::Value {
    json!({"id": t.id, "name": t.name, "namespace": t.namespace, "role": role_name(t.role), "created_at_ms": t.created_at_ms})
}

fn token_line(t: &pb::TokenInfo) -> String {
    format!(
        "{:<14} {:<20} {:<7} {}",
        t.id,
        t.namespace,
        role_name(t.role),
        t.name
    )
}

async fn token_command(api: Api, cmd: TokenCommand, json: bool) -> anyhow::Result<i32> {
    let mut tokens = api.tokens();
    match cmd {
        TokenCommand::Create {
            namespace,
            role,
            name,
        } => {
            let role = cohort_runtime::wire::role_to_wire(
                cohort_core::Role::parse(&role).map_err(|_| {
                    usage(
                        "--role",
                        format!("{role:?} is not one of admin, member, viewer"),
                    )
                })?,
            );
            cohort_core::Scope::parse(&namespace).map_err(|_| {
                usage(
                    "--namespace",
                    format!("{namespace:?} must be a DNS-1123 label or \"*\""),
                )
            })?;
            let created = tokens
                .create_token(pb::CreateTokenRequest {
                    name,
                    namespace,
                    role: role as i32,
                })
                .await?
                .into_inner();
            let info = created.info.unwrap_or_default();
            if json {
                let mut v = token_json(&info);
                v["token"] = json!(created.token);
                println!("{v}");
            } else {
                println!("{}", created.token);
                eprintln!(
                    "token {} ({} in namespace {}): shown once, store it now",
                    info.id,
                    role_name(info.role),
                    info.namespace
                );
            }
        }
        TokenCommand::List { namespace } => {
            let list = tokens
                .list_tokens(pb::ListTokensRequest {
                    namespace: namespace.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tokens;
            print_list(&list, json, token_json, token_line);
        }
        TokenCommand::Delete { id } => {
            tokens
                .delete_token(pb::DeleteTokenRequest { id: id.clone() })
                .await?;
            if json {
                println!("{}", json!({"id": id, "deleted": true}));
            } else {
                println!("token {id} deleted");
            }
        }
    }
    Ok(0)
}

fn parse_state(s: &str) -> anyhow::Result<pb::JobState> {
    let state: cohort_core::JobState = s
        .parse()
        .map_err(|_| usage("--state", format!("{s:?} is not a job state")))?;
    Ok(
        pb::JobState::from_str_name(&format!("JOB_STATE_{}", state.as_str()))
            .unwrap_or(pb::JobState::Unspecified),
    )
}

async fn job_command(api: Api, cmd: JobCommand, json: bool) -> anyhow::Result<i32> {
    let mut jobs = api.jobs();
    match cmd {
        JobCommand::Create { file } => {
            let spec = read_spec(&file)?;
            let job = jobs
                .create_job(pb::CreateJobRequest { spec })
                .await?
                .into_inner();
            if json {
                println!("{}", job_json(&job));
            } else {
                println!("job {} created ({})", job.id, state_name(job.state));
            }
        }
        JobCommand::Get { id } => {
            let job = jobs.get_job(pb::GetJobRequest { id }).await?.into_inner();
            if json {
                println!("{}", job_json(&job));
            } else {
                print!("{}", job_text(&job));
            }
        }
        JobCommand::List {
            namespace,
            state,
            limit,
        } => {
            let state = match state {
                Some(s) => parse_state(&s)? as i32,
                None => 0,
            };
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = jobs
                    .list_jobs(pb::ListJobsRequest {
                        namespace: namespace.clone().unwrap_or_default(),
                        state,
                        page_size: 100,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.jobs);
                token = page.next_page_token;
                if token.is_empty() || all.len() >= limit {
                    break;
                }
            }
            all.truncate(limit);
            print_list(&all, json, job_json, job_line);
        }
        JobCommand::Watch { id } => {
            let last = watch(&api, &id, Duration::from_secs(24 * 3600), |job| {
                if json {
                    println!("{}", job_json(job));
                } else {
                    println!("{}", job_line(job));
                }
            })
            .await?;
            return Ok(if state_name(last.state) == "SUCCEEDED" {
                0
            } else {
                1
            });
        }
        JobCommand::Logs { id, follow } => job_logs(&api, &id, follow, json).await?,
        JobCommand::Stop { id, reason } => {
            let job = jobs
                .stop_job(pb::StopJobRequest { id, reason })
                .await?
                .into_inner();
            if json {
                println!("{}", job_json(&job));
            } else {
                println!("job {} is {}", job.id, state_name(job.state));
            }
        }
        JobCommand::Delete { id } => {
            jobs.delete_job(pb::GetJobRequest { id: id.clone() })
                .await?;
            if json {
                println!("{}", json!({"id": id, "deleted": true}));
            } else {
                println!("job {id} deleted");
            }
        }
    }
    Ok(0)
}

/// Largest job spec `job create` reads (a spec is a page of YAML).
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// The spec text from `-f FILE`, or from stdin for `-f -`.
fn read_spec(file: &Path) -> anyhow::Result<String> {
    let (source, reader): (String, Box<dyn Read>) = if file == Path::new("-") {
        ("stdin".into(), Box::new(std::io::stdin().lock()))
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("-f: cannot read {}", file.display()))?;
        (file.display().to_string(), Box::new(f))
    };
    let mut text = String::new();
    reader
        .take(MAX_SPEC_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("-f: cannot read {source}"))?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(usage(
            "--file",
            format!("{source} is larger than {MAX_SPEC_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// How often `job logs --follow` asks for new entries.
const LOG_POLL: Duration = Duration::from_secs(1);

/// Consecutive failed polls `job logs --follow` rides out once it has read the log.
const MAX_LOG_POLL_FAILURES: u32 = 60;

/// `job logs`: prints the job's log; with `follow`, keeps printing new entries until the
/// job has ended.
async fn job_logs(api: &Api, id: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    let mut jobs = api.jobs();
    let mut after = 0u64;
    let mut failures = 0u32;
    let mut read_once = false;
    // The job was seen ended: one more read for what came in meanwhile, then stop.
    let mut last_read = false;
    loop {
        let asked = jobs
            .list_job_events(pb::ListJobEventsRequest {
                id: id.to_string(),
                after_seq: after,
            })
            .await;
        let events = match asked {
            Ok(r) => r.into_inner().events,
            // Once the log was read, a restarting proxy or job-scheduler is waited out.
            Err(st)
                if follow
                    && read_once
                    && cohort_runtime::is_retryable(&st)
                    && failures < MAX_LOG_POLL_FAILURES =>
            {
                failures += 1;
                tokio::time::sleep(LOG_POLL).await;
                continue;
            }
            Err(st) => return Err(st.into()),
        };
        if !read_once && !json {
            println!("{}", event_header());
        }
        read_once = true;
        failures = 0;
        let mut ended = false;
        let mut new = 0usize;
        // Only entries after the last one shown, whatever the server sends.
        for e in &events {
            if e.seq <= after {
                continue;
            }
            print_event(e, json);
            after = e.seq;
            new += 1;
            ended |= e.kind.is_empty() && is_terminal(e.to);
        }
        let _ = std::io::stdout().flush();
        if ended || last_read {
            return Ok(());
        }
        if new == 0 {
            if !follow {
                return Ok(());
            }
            // Nothing new: the job may have ended with its last state change already shown
            // (or dropped from a full log).
            let job = jobs.get_job(pb::GetJobRequest { id: id.to_string() }).await;
            if let Ok(job) = job
                && is_terminal(job.get_ref().state)
            {
                last_read = true;
                continue;
            }
        }
        if !follow {
            continue;
        }
        tokio::time::sleep(LOG_POLL).await;
    }
}

fn print_event(e: &pb::JobEvent, json: bool) {
    if json {
        println!("{}", event_json(e));
    } else {
        println!("{}", event_line(e));
    }
}

/// Follows a job until it ends, calling `on_change` for every new snapshot.
/// Fails at once when the federation cannot be reached at first; once the watch is
/// established, survives job-scheduler and proxy restarts by watching again.
pub async fn watch(
    api: &Api,
    id: &str,
    timeout: Duration,
    mut on_change: impl FnMut(&pb::Job),
) -> anyhow::Result<pb::Job> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<pb::Job> = None;
    let mut established = false;
    let mut failures = 0u32;
    loop {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "job {id} did not end within {}",
                humantime::format_duration(timeout)
            );
        }
        let stream = api
            .jobs()
            .watch_job(pb::GetJobRequest { id: id.to_string() })
            .await;
        let broke = match stream {
            Ok(resp) => {
                established = true;
                let mut s = resp.into_inner();
                loop {
                    let next = tokio::time::timeout_at(deadline, s.next()).await;
                    match next {
                        Err(_) => break None,
                        Ok(Some(Ok(job))) => {
                            failures = 0;
                            if last.as_ref() != Some(&job) {
                                on_change(&job);
                            }
                            let done = is_terminal(job.state);
                            last = Some(job);
                            if done {
                                return last.context("no job");
                            }
                        }
                        Ok(Some(Err(st))) if !cohort_runtime::is_retryable(&st) => {
                            return Err(st.into());
                        }
                        Ok(Some(Err(st))) => break Some(st),
                        Ok(None) => break None,
                    }
                }
            }
            Err(st) if !cohort_runtime::is_retryable(&st) => return Err(st.into()),
            Err(st) if !established && is_unreachable(&st) => return Err(st.into()),
            Err(st) => Some(st),
        };
        failures += 1;
        if failures > 120 {
            let why = broke.map(|st| format!(": {}", st.message()));
            bail!(
                "lost the connection to the federation while watching job {id}{}",
                why.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn split_model_ref(s: &str) -> anyhow::Result<(String, u32)> {
    match s.split_once('@') {
        None => Ok((s.to_string(), 0)),
        Some(_) => cohort_core::spec::parse_model_ref(s).map_err(|m| usage("MODEL", m)),
    }
}

async fn model_command(api: Api, cmd: ModelCommand, json: bool) -> anyhow::Result<i32> {
    let mut models = api.models();
    match cmd {
        ModelCommand::List {
            name,
            job,
            namespace,
        } => {
            let versions = models
                .list_versions(pb::ListVersionsRequest {
                    name: name.unwrap_or_default(),
                    job_id: job.unwrap_or_default(),
                    namespace: namespace.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .versions;
            print_list(&versions, json, version_json, version_line);
        }
        ModelCommand::Get { model, namespace } => {
            let (name, version) = split_model_ref(&model)?;
            let v = models
                .get_version(pb::GetVersionRequest {
                    name,
                    version,
                    namespace: namespace.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                println!("{}", version_json(&v));
            } else {
                println!("{}", show::version_text(&v));
            }
        }
        ModelCommand::Download {
            model,
            output,
            namespace,
        } => {
            let (name, version) = split_model_ref(&model)?;
            let namespace = namespace.unwrap_or_default();
            let v = models
                .get_version(pb::GetVersionRequest {
                    name: name.clone(),
                    version,
                    namespace: namespace.clone(),
                })
                .await?
                .into_inner();
            let tmp = output.with_extension("part");
            let mut file = std::fs::File::create(&tmp)
                .with_context(|| format!("-o: cannot create {}", tmp.display()))?;
            let mut hasher = sha2::Sha256::new();
            let mut size = 0u64;
            let mut stream = models
                .download(pb::GetVersionRequest {
                    name,
                    version: v.version,
                    namespace,
                })
                .await?
                .into_inner();
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e.into());
                    }
                };
                hasher.update(&chunk.data);
                size += chunk.data.len() as u64;
                file.write_all(&chunk.data)?;
            }
            file.sync_all()?;
            let digest = hex::encode(hasher.finalize());
            if digest != v.digest {
                let _ = std::fs::remove_file(&tmp);
                bail!(
                    "download of {}@{} is corrupt: sha256 {digest}, registry says {}",
                    v.name,
                    v.version,
                    v.digest
                );
            }
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("-o: cannot write {}", output.display()))?;
            if json {
                println!(
                    "{}",
                    json!({"name": v.name, "version": v.version, "digest": digest, "size_bytes": size, "path": output})
                );
            } else {
                println!(
                    "{}@{} -> {} ({size} bytes, sha256:{digest})",
                    v.name,
                    v.version,
                    output.display()
                );
            }
        }
        ModelCommand::Upload { name, file } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("-f: cannot read {}", file.display()))?;
            let mut parts = vec![pb::UploadVersionRequest {
                part: Some(pb::upload_version_request::Part::Header(pb::UploadHeader {
                    name,
                    lineage: None,
                    metrics: None,
                    namespace: String::new(),
                })),
            }];
            // Chunks are slices of the file's bytes, not copies.
            let bytes = bytes::Bytes::from(bytes);
            parts.extend((0..bytes.len()).step_by(1 << 20).map(|at| {
                let end = (at + (1 << 20)).min(bytes.len());
                pb::UploadVersionRequest {
                    part: Some(pb::upload_version_request::Part::Data(bytes.slice(at..end))),
                }
            }));
            let v = models
                .upload_version(futures::stream::iter(parts))
                .await?
                .into_inner();
            if json {
                println!("{}", version_json(&v));
            } else {
                println!("{}", version_line(&v));
            }
        }
    }
    Ok(0)
}

async fn up(a: UpArgs, json: bool) -> anyhow::Result<i32> {
    let data_dir = absolute(&a.data_dir)?;
    let mut stack = Stack::start(&StackConfig {
        bin_dir: None,
        data_dir: data_dir.clone(),
        parties: a.clients,
        proxy_listen: a.listen.clone(),
        proxy_names: a.proxy_names.clone(),
        database_url: a.storage.database_url.clone(),
        blob_url: a.storage.blob_url.clone(),
        service_env: Vec::new(),
        party_data: PartyData::Digits {
            alpha: 0.5,
            seed: 42,
        },
        party_env: Vec::new(),
        party_overrides: Vec::new(),
        metrics: true,
    })
    .await?;
    let profile = stack.profile();
    let profile_path = data_dir.join("profile.toml");
    profile.save(&profile_path)?;
    if let Some(default) = profile::default_path()
        && let Err(e) = profile.save(&default)
    {
        eprintln!("warning: cannot write {}: {e:#}", default.display());
    }
    if json {
        println!(
            "{}",
            json!({"event": "up", "proxy": stack.proxy, "profile": profile_path, "data_dir": data_dir, "clients": a.clients,
                   "dashboard": stack.dashboard_url(), "admin_token_file": stack.admin_token_path(),
                   "metrics_dir": stack.metrics_dir(),
                   "metrics": stack.metrics_urls().into_iter().map(|(p, u)| json!({"process": p, "url": u})).collect::<Vec<_>>()})
        );
    } else {
        println!(
            "cohort is up: proxy {}  ({} parties)",
            stack.proxy, a.clients
        );
        println!("profile: {}", profile_path.display());
        println!(
            "dashboard: {}  (sign in with the admin token in {}; the browser must trust {})",
            stack.dashboard_url(),
            stack.admin_token_path().display(),
            stack.pki.join("ca.crt").display()
        );
        println!("logs:    {}", data_dir.join("logs").display());
        if let Some(dir) = stack.metrics_dir() {
            println!(
                "metrics: Prometheus file_sd targets in {} (coordinators appear there while their job runs)",
                dir.display()
            );
            for (process, url) in stack.metrics_urls() {
                println!("  {process:<24} {url}");
            }
        }
        println!("press Ctrl-C to stop");
    }
    let _ = std::io::stdout().flush();
    // Supervise: a service that dies is started again (it recovers from its store).
    let signal = cohort_runtime::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for dead in stack.revive().await {
                    eprintln!("warning: {dead} exited; restarted it");
                }
            }
        }
    }
    stack.shutdown().await;
    Ok(0)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(p))
}

async fn demo(a: DemoArgs, json: bool) -> anyhow::Result<i32> {
    if a.clients == 0 || a.clients > 64 {
        return Err(usage("--clients", "must be between 1 and 64"));
    }
    if a.rounds == 0 {
        return Err(usage("--rounds", "must be at least 1"));
    }
    if !(a.alpha.is_finite() && a.alpha > 0.0) {
        return Err(usage("--alpha", "must be a positive number"));
    }
    let temp;
    let data_dir = match &a.data_dir {
        Some(d) => absolute(d)?,
        None => {
            temp = tempfile::Builder::new().prefix("cohort-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let started = std::time::Instant::now();
    let mut stack = Stack::start(&StackConfig {
        bin_dir: None,
        data_dir: data_dir.clone(),
        parties: a.clients,
        proxy_listen: "127.0.0.1:0".into(),
        proxy_names: Vec::new(),
        database_url: a.storage.database_url.clone(),
        blob_url: a.storage.blob_url.clone(),
        service_env: Vec::new(),
        party_data: PartyData::Digits {
            alpha: a.alpha,
            seed: a.seed,
        },
        party_env: Vec::new(),
        party_overrides: Vec::new(),
        metrics: false,
    })
    .await?;
    if json {
        println!(
            "{}",
            json!({"event": "up", "proxy": stack.proxy, "data_dir": data_dir, "clients": a.clients, "processes": stack.pids().len()})
        );
    } else {
        eprintln!(
            "started {} processes; logs in {}",
            stack.pids().len(),
            data_dir.join("logs").display()
        );
    }
    let result = tokio::select! {
        r = run_demo_job(&stack, &a, json) => r,
        _ = cohort_runtime::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    stack.shutdown().await;
    let job = result?;
    let state = state_name(job.state);
    let accuracy = last_accuracy(&job);
    let summary = json!({
        "job": job.id,
        "state": state,
        "rounds": job.rounds_completed,
        "accuracy": accuracy,
        "loss": job.rounds.iter().rev().find_map(|r| r.evaluation.filter(|e| e.samples > 0).map(|e| e.loss)),
        "clients": a.clients,
        "model": job.model_name,
        "model_version": job.rounds.last().map(|r| r.model_version),
        "reason": job.reason,
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    if json {
        println!("{summary}");
    } else {
        println!(
            "job {} {} after {} rounds: held-out accuracy {}  ({:.1}s)",
            job.id,
            state,
            job.rounds_completed,
            accuracy
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "-".into()),
            started.elapsed().as_secs_f64()
        );
        if state != "SUCCEEDED" {
            println!("reason: {}", job.reason);
        }
    }
    Ok(if state == "SUCCEEDED" { 0 } else { 1 })
}

async fn run_demo_job(stack: &Stack, a: &DemoArgs, json: bool) -> anyhow::Result<pb::Job> {
    let api = Api::from_profile(&stack.profile())?;
    let spec = data::demo_job_spec("digits-demo", a.clients, a.rounds, a.seed);
    let job = api
        .jobs()
        .create_job(pb::CreateJobRequest { spec })
        .await?
        .into_inner();
    let tty = !json && std::io::stderr().is_terminal();
    if !json {
        eprintln!(
            "job {} created: {} parties, {} rounds, Dirichlet alpha {}",
            job.id, a.clients, a.rounds, a.alpha
        );
    }
    let mut shown_rounds = 0usize;
    let mut last_state = String::new();
    let last = watch(&api, &job.id, a.timeout, |j| {
        for r in j.rounds.iter().skip(shown_rounds) {
            if json {
                let mut v = round_json(r);
                v["event"] = json!("round");
                v["job"] = json!(j.id);
                println!("{v}");
            } else {
                let e = r.evaluation.unwrap_or_default();
                let line = format!(
                    "round {:>3}/{}  updates {}  accuracy {:.4}  loss {:.4}  {:.2}s",
                    r.round,
                    j.rounds_total,
                    r.updates,
                    e.accuracy,
                    e.loss,
                    r.duration_ms as f64 / 1000.0
                );
                if tty {
                    let width = 40usize;
                    let done = (r.round as usize * width) / j.rounds_total.max(1) as usize;
                    eprint!(
                        "\r[{}{}] {line}",
                        "#".repeat(done),
                        "-".repeat(width - done)
                    );
                } else {
                    eprintln!("{line}");
                }
            }
        }
        shown_rounds = j.rounds.len();
        let state = state_name(j.state).to_string();
        if state != last_state {
            if json {
                println!(
                    "{}",
                    json!({"event": "state", "job": j.id, "state": state, "reason": j.reason})
                );
            } else if !tty || is_terminal(j.state) {
                if tty {
                    eprintln!();
                }
                eprintln!("{state}: {}", j.reason);
            }
            last_state = state;
        }
    })
    .await?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command, subcommand, flag and argument says what it is for (`cohort help ...`).
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        walk(&cli, "cohort", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");

        let logs = cli
            .find_subcommand_mut("job")
            .and_then(|j| j.find_subcommand_mut("logs"))
            .expect("job logs")
            .render_long_help()
            .to_string();
        assert!(logs.contains("--follow"), "{logs}");
        assert!(logs.contains("until the job ends"), "{logs}");
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn an_unreachable_federation_is_named_with_its_profile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profile.toml");
        let endpoint = format!("127.0.0.1:{}", closed_port());
        Profile {
            endpoint: endpoint.clone(),
            ca_cert: None,
            token: None,
        }
        .save(&path)
        .expect("save");
        let api = Api::connect(Some(&path)).expect("api");
        let st = api
            .jobs()
            .get_job(pb::GetJobRequest { id: "j-1".into() })
            .await
            .expect_err("nothing listens");
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert!(is_unreachable(&st), "{st:?}");
        assert_eq!(
            st.message(),
            format!(
                "cannot reach the federation at {endpoint} (profile {}): connection refused",
                path.display()
            )
        );
        let failure = error::Failure::of(&st.into());
        assert_eq!(failure.code, "unavailable");

        // A watch says so at once instead of retrying.
        let started = std::time::Instant::now();
        let e = watch(&api, "j-1", Duration::from_secs(120), |_| {})
            .await
            .expect_err("nothing listens");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            format!("{e:#}").contains(&format!("cannot reach the federation at {endpoint}")),
            "{e:#}"
        );
    }

    #[test]
    fn a_spec_is_read_whole_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.yaml");
        std::fs::write(&path, "name: x\n").expect("write");
        assert_eq!(read_spec(&path).expect("read"), "name: x\n");
        std::fs::write(&path, "#".repeat(MAX_SPEC_BYTES as usize + 1)).expect("write");
        let e = read_spec(&path).expect_err("too large");
        assert_eq!(error::Failure::of(&e).code, "usage");
        let e = read_spec(&dir.path().join("missing.yaml")).expect_err("missing");
        assert!(format!("{e:#}").contains("missing.yaml"), "{e:#}");
    }
}
