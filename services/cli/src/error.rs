//! How `cohort` reports a failure. Human text on stderr by default; with `--json`, one line
//! `{"error": {"code": ..., "message": ..., "field": ...}}` on stderr. The code is the gRPC
//! code in snake_case for the server's answers ("invalid_argument", "not_found",
//! "unavailable", ...), "usage" for a bad command line and "local" for a failure on this
//! machine; the field is the one at fault when it is known, else null.

use std::ffi::OsString;
use std::fmt;

use serde_json::json;

/// A command line argument that cannot be used; `field` is the flag or argument.
#[derive(Debug)]
pub struct UsageError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for UsageError {}

/// A usage error for `field` (e.g. "--state").
pub fn usage(field: impl Into<String>, message: impl Into<String>) -> anyhow::Error {
    UsageError {
        field: field.into(),
        message: message.into(),
    }
    .into()
}

/// A failure as reported: what kind, why, and which field when known.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub field: Option<String>,
    /// The gRPC code, for the human form.
    grpc: Option<tonic::Code>,
}

impl Failure {
    /// Classifies an error returned by a command: the first gRPC status or usage error in
    /// its chain decides the code.
    pub fn of(e: &anyhow::Error) -> Failure {
        let mut layers = Vec::new();
        let mut found: Option<(String, Option<String>, Option<tonic::Code>)> = None;
        for cause in e.chain() {
            if let Some(status) = cause.downcast_ref::<tonic::Status>() {
                layers.push(status.message().to_string());
                let field = match status.code() {
                    tonic::Code::InvalidArgument => field_prefix(status.message()),
                    _ => None,
                };
                found = Some((grpc_code_name(status.code()), field, Some(status.code())));
                // A status's own sources are transport details, already in its message.
                break;
            }
            layers.push(cause.to_string());
            if found.is_none() {
                if let Some(u) = cause.downcast_ref::<UsageError>() {
                    found = Some(("usage".into(), Some(u.field.clone()), None));
                } else if let Some(p) = cause.downcast_ref::<crate::profile::ProfileError>() {
                    found = Some(("local".into(), p.key.clone(), None));
                }
            }
        }
        let (code, field, grpc) = found.unwrap_or_else(|| ("local".into(), None, None));
        Failure {
            code,
            message: layers.join(": "),
            field,
            grpc,
        }
    }

    /// A command line clap refused; `None` for help and version, which are not failures.
    pub fn of_clap(e: &clap::Error) -> Option<Failure> {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            return None;
        }
        let rendered = e.to_string();
        let message = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            // Rendered as the command's help: say what is missing, with its usage line.
            let usage = rendered.lines().find_map(|l| l.strip_prefix("Usage: "));
            format!(
                "a subcommand is missing; usage: {}",
                usage.unwrap_or("cohort --help")
            )
        } else {
            // "error: <what, maybe over indented lines>\n\nUsage: ...": keep <what>.
            let what = rendered.split("\n\n").next().unwrap_or_default();
            let what = what.strip_prefix("error: ").unwrap_or(what);
            what.split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let field = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            Some(ContextValue::Strings(v)) => v.first().cloned(),
            _ => None,
        }
        // "--file <FILE>" is the flag --file; "<SHELL>" the argument SHELL.
        .map(|s| {
            let name = s.split(' ').next().unwrap_or_default();
            name.trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        });
        Some(Failure {
            code: "usage".into(),
            message,
            field,
            grpc: None,
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message, "field": self.field}})
    }

    /// The human form: "error: MESSAGE", with the gRPC code for the server's answers.
    pub fn to_text(&self) -> String {
        match self.grpc {
            Some(code) => format!("error: {} ({code:?})", self.message),
            None => format!("error: {}", self.message),
        }
    }

    /// Writes the failure to stderr in the form asked for.
    pub fn print(&self, json: bool) {
        if json {
            eprintln!("{}", self.to_json());
        } else {
            eprintln!("{}", self.to_text());
        }
    }
}

/// Whether `--json` is on the command line (before a `--`), known before clap has parsed it
/// so that clap's own errors can follow the contract.
pub fn json_requested(args: impl IntoIterator<Item = OsString>) -> bool {
    args.into_iter()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// "invalid_argument" for `Code::InvalidArgument`, ...
pub fn grpc_code_name(code: tonic::Code) -> String {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
    .to_string()
}

/// The servers word INVALID_ARGUMENT as "field.path: problem"; the path, if it is one.
fn field_prefix(message: &str) -> Option<String> {
    let (field, _) = message.split_once(": ")?;
    let is_path = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'));
    is_path.then(|| field.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn server_errors_carry_their_code_and_field() {
        let e = anyhow::Error::from(tonic::Status::invalid_argument(
            "training.optimizer.lr: must be greater than 0 (line 7)",
        ));
        let f = Failure::of(&e);
        assert_eq!(f.code, "invalid_argument");
        assert_eq!(f.field.as_deref(), Some("training.optimizer.lr"));
        assert_eq!(
            f.message,
            "training.optimizer.lr: must be greater than 0 (line 7)"
        );
        assert_eq!(
            f.to_text(),
            "error: training.optimizer.lr: must be greater than 0 (line 7) (InvalidArgument)"
        );
        let v = f.to_json();
        assert_eq!(v["error"]["code"], "invalid_argument");
        assert_eq!(v["error"]["field"], "training.optimizer.lr");

        // Only INVALID_ARGUMENT names a field, and only a path-shaped prefix is one.
        let f = Failure::of(&tonic::Status::not_found("job x: not found").into());
        assert_eq!((f.code.as_str(), f.field), ("not_found", None));
        let f = Failure::of(&tonic::Status::invalid_argument("bad request: no").into());
        assert_eq!(f.field, None);
        let f =
            Failure::of(&anyhow::Error::from(tonic::Status::unavailable("down")).context("asking"));
        assert_eq!(f.code, "unavailable");
        assert_eq!(f.message, "asking: down");
        assert_eq!(f.to_json()["error"]["field"], serde_json::Value::Null);
    }

    #[test]
    fn usage_and_local_errors() {
        let f = Failure::of(&usage("--state", "\"x\" is not a job state"));
        assert_eq!(f.code, "usage");
        assert_eq!(f.field.as_deref(), Some("--state"));
        assert_eq!(f.message, "--state: \"x\" is not a job state");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let f = Failure::of(&anyhow::Error::from(io).context("-f: cannot read x.yaml"));
        assert_eq!(f.code, "local");
        assert_eq!(f.message, "-f: cannot read x.yaml: gone");
        assert_eq!(f.to_text(), "error: -f: cannot read x.yaml: gone");
    }

    #[test]
    fn clap_errors_are_usage_errors_naming_the_argument() {
        let e = crate::Cli::try_parse_from(["cohort", "job", "list", "--bogus"]).unwrap_err();
        let f = Failure::of_clap(&e).expect("an error");
        assert_eq!(f.code, "usage");
        assert_eq!(f.field.as_deref(), Some("--bogus"));
        assert!(f.message.contains("--bogus"), "{f:?}");
        assert!(!f.message.starts_with("error:"), "{f:?}");
        let e = crate::Cli::try_parse_from(["cohort", "job", "create"]).unwrap_err();
        let f = Failure::of_clap(&e).expect("an error");
        assert_eq!(f.field.as_deref(), Some("--file"), "{f:?}");
        assert!(f.message.ends_with("not provided: --file <FILE>"), "{f:?}");
        let e = crate::Cli::try_parse_from(["cohort", "completions", "tcsh"]).unwrap_err();
        let f = Failure::of_clap(&e).expect("an error");
        assert_eq!(f.field.as_deref(), Some("SHELL"), "{f:?}");
        let e = crate::Cli::try_parse_from(["cohort", "job"]).unwrap_err();
        let f = Failure::of_clap(&e).expect("an error");
        assert_eq!(f.code, "usage");
        assert!(f.message.contains("usage: cohort job"), "{f:?}");
        let e = crate::Cli::try_parse_from(["cohort", "--help"]).unwrap_err();
        assert_eq!(Failure::of_clap(&e), None);
    }

    #[test]
    fn json_is_seen_before_parsing() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(json_requested(args(&["cohort", "job", "--json", "get"])));
        assert!(!json_requested(args(&[
            "cohort", "job", "get", "--", "--json"
        ])));
        assert!(!json_requested(args(&["--json"])), "argv[0] is the program");
    }
}
