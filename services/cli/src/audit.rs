//! `cohort audit list`: the audit log of state-changing calls (who, what, on
//! which object, when, the outcome), readable by admins of a namespace ("*"
//! admins: every namespace). Oldest first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use cohort_proto::v1 as pb;
use serde_json::json;

use crate::error::usage;
use crate::{Api, AuthChannel, print_list};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit entries, oldest first (at most --limit).
    List {
        /// Only entries from this time on: a duration back from now ("1h", "30m",
        /// "2days") or an RFC 3339 time ("2025-01-31T08:00:00Z").
        #[arg(long)]
        since: Option<String>,
        /// Only this namespace (default: the token's; every namespace for a "*" token).
        #[arg(long)]
        namespace: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

impl Api {
    pub fn audit(&self) -> pb::audit_client::AuditClient<AuthChannel> {
        pb::audit_client::AuditClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

/// `--since` as ms since the epoch: a duration before `now`, or an RFC 3339 time.
pub fn parse_since(text: &str, now: SystemTime) -> anyhow::Result<i64> {
    let at = match humantime::parse_duration(text) {
        Ok(back) => now.checked_sub(back).unwrap_or(UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(text).map_err(|_| {
            usage(
                "--since",
                "give a duration back from now (1h, 30m) or an RFC 3339 time \
                 (2025-01-31T08:00:00Z)",
            )
        })?,
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    // Entries are kept from 1970 on; 0 would mean "no bound" on the wire.
    Ok(i64::try_from(ms).unwrap_or(i64::MAX).max(1))
}

fn time_text(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

pub fn entry_json(e: &pb::AuditEntry) -> serde_json::Value {
    json!({
        "id": e.id,
        "time_ms": e.time_ms,
        "actor": {"kind": e.actor_kind, "id": e.actor_id, "name": e.actor_name},
        "action": e.action,
        "object": {"kind": e.object_kind, "id": e.object_id},
        "namespace": e.namespace,
        "outcome": e.outcome,
        "reason": e.reason,
    })
}

fn entry_line(e: &pb::AuditEntry) -> String {
    let actor = if e.actor_name.is_empty() {
        format!("{}:{}", e.actor_kind, e.actor_id)
    } else {
        format!("{}:{} ({})", e.actor_kind, e.actor_id, e.actor_name)
    };
    let object = if e.object_id.is_empty() {
        e.object_kind.clone()
    } else {
        format!("{}/{}", e.object_kind, e.object_id)
    };
    let mut line = format!(
        "{} {:<28} {:<13} {:<30} {:<16} {}",
        time_text(e.time_ms),
        actor,
        e.action,
        object,
        e.namespace,
        e.outcome
    );
    if !e.reason.is_empty() {
        line.push_str(": ");
        line.push_str(&e.reason);
    }
    line
}

pub async fn run(api: Api, cmd: AuditCommand, json: bool) -> anyhow::Result<i32> {
    let AuditCommand::List {
        since,
        namespace,
        limit,
    } = cmd;
    let since_ms = match since.as_deref() {
        Some(text) => parse_since(text, SystemTime::now())?,
        None => 0,
    };
    let mut audit = api.audit();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit
            .list_audit_entries(pb::ListAuditEntriesRequest {
                namespace: namespace.clone().unwrap_or_default(),
                since_ms,
                page_size: 500,
                page_token: token,
            })
            .await?
            .into_inner();
        all.extend(page.entries);
        token = page.next_page_token;
        if token.is_empty() || all.len() >= limit {
            break;
        }
    }
    all.truncate(limit);
    print_list(&all, json, entry_json, entry_line);
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_times() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_since("1h", now).unwrap(), 6_400_000);
        assert_eq!(parse_since("1970-01-01T00:00:05Z", now).unwrap(), 5_000);
        // Further back than 1970: everything.
        assert_eq!(parse_since("1000days", now).unwrap(), 1);
        let e = parse_since("yesterday-ish", now).unwrap_err();
        assert!(e.to_string().contains("--since"), "{e}");
    }

    #[test]
    fn lines_name_the_actor_and_the_object() {
        let e = pb::AuditEntry {
            id: 1,
            time_ms: 0,
            actor_kind: "token".into(),
            actor_id: "t1".into(),
            actor_name: "ci".into(),
            action: "job.stop".into(),
            object_kind: "job".into(),
            object_id: "j-1".into(),
            namespace: "team-a".into(),
            outcome: "permission_denied".into(),
            reason: "viewer".into(),
        };
        let line = entry_line(&e);
        for part in [
            "token:t1 (ci)",
            "job.stop",
            "job/j-1",
            "team-a",
            "permission_denied: viewer",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        assert_eq!(entry_json(&e)["actor"]["name"], "ci");
    }
}
