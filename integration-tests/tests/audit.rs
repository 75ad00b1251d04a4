//! The audit log, end to end with the real binaries: jobs created, stopped and
//! deleted, tokens made and deleted, a party revoked (through client-selector's
//! RecordAudit call), a model uploaded with `cohort model upload` (through
//! model-manager's), a refused stop and a refused upload, each listed by
//! `cohort audit list --json` with the token that did it; a viewer cannot
//! read the log, and another namespace's admin sees none of it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_cli::Api;
use cohort_cli::profile::Profile;
use cohort_integration_tests::{Federation, cohort, digits_job, digits_mlp, state_of};
use cohort_proto::v1 as pb;
use serde_json::Value;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// A token made by the bootstrap admin: (its id, an API acting with it, a CLI profile).
struct Holder {
    id: String,
    api: Api,
    profile: PathBuf,
}

async fn holder(
    fed: &Federation,
    dir: &Path,
    name: &str,
    namespace: &str,
    role: pb::Role,
) -> Holder {
    let created = fed
        .api()
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            namespace: namespace.into(),
            role: role as i32,
        })
        .await
        .expect("the bootstrap admin creates a token")
        .into_inner();
    let profile = Profile {
        token: Some(created.token.clone()),
        ..fed.stack.profile()
    };
    let path = dir.join(format!("{name}.toml"));
    profile.save(&path).expect("profile written");
    Holder {
        id: created.info.expect("token info").id,
        api: Api::from_profile(&profile).expect("api"),
        profile: path,
    }
}

/// `cohort audit list --json ARGS` with `profile`: the entries, or the exit code and stderr.
async fn audit_list(profile: &Path, args: &[&str]) -> Result<Vec<Value>, (i32, String)> {
    let mut all = vec!["audit", "list", "--json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = cohort(&all, profile).await.expect("cohort runs");
    if code != 0 {
        return Err((code, stderr));
    }
    match serde_json::from_str::<Value>(&stdout) {
        Ok(Value::Array(entries)) => Ok(entries),
        other => panic!("audit list --json printed {other:?}: {stdout}"),
    }
}

/// The entry of `action` on `object_id` with `outcome`; panics naming what was listed.
fn find<'a>(entries: &'a [Value], action: &str, object_id: &str, outcome: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| {
            e["action"] == action && e["object"]["id"] == object_id && e["outcome"] == outcome
        })
        .unwrap_or_else(|| panic!("no {action} of {object_id:?} ({outcome}) in {entries:#?}"))
}

fn assert_actor(e: &Value, kind: &str, id: &str, name: &str) {
    assert_eq!(
        (&e["actor"]["kind"], &e["actor"]["id"], &e["actor"]["name"]),
        (&Value::from(kind), &Value::from(id), &Value::from(name)),
        "actor of {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_changing_calls_are_audited_for_their_namespaces_admins() {
    let fed = Federation::start(0).await.expect("federation");
    let dir = tempfile::tempdir().expect("tempdir");
    let root_profile = dir.path().join("root.toml");
    fed.stack.profile().save(&root_profile).expect("profile");
    let root_id = format!("admin-{}", &fed.stack.admin_token.sha256()[..12]);

    let admin_a = holder(&fed, dir.path(), "audit-admin-a", "team-a", pb::Role::Admin).await;
    let viewer_a = holder(
        &fed,
        dir.path(),
        "audit-viewer-a",
        "team-a",
        pb::Role::Viewer,
    )
    .await;
    let admin_b = holder(&fed, dir.path(), "audit-admin-b", "team-b", pb::Role::Admin).await;

    // team-a's admin: a job created, refused a stop by the viewer, stopped, deleted.
    let job = admin_a
        .api
        .jobs()
        .create_job(pb::CreateJobRequest {
            spec: format!(
                "namespace: team-a\n{}",
                digits_job("audited", 1, 1, 1, "5s")
            ),
        })
        .await
        .expect("admin creates a job")
        .into_inner();
    let refused = viewer_a
        .api
        .jobs()
        .stop_job(pb::StopJobRequest {
            id: job.id.clone(),
            reason: "viewer tries".into(),
        })
        .await
        .expect_err("a viewer may not stop a job");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    admin_a
        .api
        .jobs()
        .stop_job(pb::StopJobRequest {
            id: job.id.clone(),
            reason: "audit test".into(),
        })
        .await
        .expect("admin stops the job");
    fed.wait_job(&job.id, WAIT, "the job to stop", |j| {
        state_of(j).is_terminal()
    })
    .await
    .expect("job stops");
    admin_a
        .api
        .jobs()
        .delete_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .expect("admin deletes the stopped job");

    // A token made and deleted by team-a's admin.
    let temp = admin_a
        .api
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: "short-lived".into(),
            namespace: "team-a".into(),
            role: pb::Role::Member as i32,
        })
        .await
        .expect("admin makes a token")
        .into_inner()
        .info
        .expect("token info");
    admin_a
        .api
        .tokens()
        .delete_token(pb::DeleteTokenRequest {
            id: temp.id.clone(),
        })
        .await
        .expect("admin deletes it");

    // A party revoked by the "*" admin (client-selector records it through job-scheduler).
    fed.api()
        .selector()
        .revoke_client(pb::RevokeClientRequest {
            party: "party-9".into(),
        })
        .await
        .expect("the * admin revokes a party");

    // A model uploaded with the CLI by team-a's admin, and refused to its viewer.
    let model_file = dir.path().join("audited-model.safetensors");
    std::fs::write(&model_file, digits_mlp(&[8], 1)).expect("model file written");
    let file_arg = model_file.display().to_string();
    let upload_args = [
        "model",
        "upload",
        "audited-model",
        "-f",
        file_arg.as_str(),
        "--json",
    ];
    let (code, stdout, stderr) = cohort(&upload_args, &admin_a.profile)
        .await
        .expect("cohort runs");
    assert_eq!(code, 0, "admin's upload: {stderr}");
    let uploaded: Value = serde_json::from_str(&stdout).expect("upload --json");
    let uploaded_id = format!("audited-model@{}", uploaded["version"]);
    let (code, _, stderr) = cohort(&upload_args, &viewer_a.profile)
        .await
        .expect("cohort runs");
    assert_ne!(code, 0, "a viewer may not upload: {stderr}");

    // The "*" admin reads everything, each call with the token that made it.
    let all = audit_list(&root_profile, &[])
        .await
        .expect("the * admin reads the log");
    let by_a = |e: &Value| assert_actor(e, "token", &admin_a.id, "audit-admin-a");
    for action in ["job.create", "job.stop", "job.delete"] {
        let e = find(&all, action, &job.id, "ok");
        by_a(e);
        assert_eq!(e["namespace"], "team-a", "{e}");
        assert_eq!(e["object"]["kind"], "job", "{e}");
    }
    let denied = find(&all, "job.stop", &job.id, "permission_denied");
    assert_actor(denied, "token", &viewer_a.id, "audit-viewer-a");
    assert_eq!(denied["namespace"], "team-a", "{denied}");
    assert!(
        !denied["reason"].as_str().unwrap_or("").is_empty(),
        "{denied}"
    );
    for action in ["token.create", "token.delete"] {
        let e = find(&all, action, &temp.id, "ok");
        by_a(e);
        assert_eq!(e["namespace"], "team-a", "{e}");
    }
    let made_a = find(&all, "token.create", &admin_a.id, "ok");
    assert_actor(made_a, "token", &root_id, "bootstrap admin");
    let revoked = find(&all, "party.revoke", "party-9", "ok");
    assert_actor(revoked, "token", &root_id, "bootstrap admin");
    assert_eq!(revoked["namespace"], "*", "{revoked}");
    assert_eq!(revoked["object"]["kind"], "party", "{revoked}");
    let upload = find(&all, "model.upload", &uploaded_id, "ok");
    by_a(upload);
    assert_eq!(upload["namespace"], "team-a", "{upload}");
    assert_eq!(upload["object"]["kind"], "model", "{upload}");
    let refused_upload = find(&all, "model.upload", "audited-model", "permission_denied");
    assert_actor(refused_upload, "token", &viewer_a.id, "audit-viewer-a");
    assert_eq!(refused_upload["namespace"], "team-a", "{refused_upload}");
    assert!(
        !refused_upload["reason"].as_str().unwrap_or("").is_empty(),
        "{refused_upload}"
    );
    // Users' uploads only: no coordinator's checkpoint.
    assert!(
        all.iter()
            .filter(|e| e["action"] == "model.upload")
            .all(|e| e["actor"]["kind"] == "token"),
        "{all:#?}"
    );
    // Oldest first, each entry once.
    let ids: Vec<u64> = all.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids.len(), all.len(), "every entry has an id: {all:#?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
    // --since in the future: nothing; --namespace narrows.
    let later = audit_list(&root_profile, &["--since", "2999-01-01T00:00:00Z"])
        .await
        .expect("a time filter");
    assert!(later.is_empty(), "{later:#?}");
    let only_b = audit_list(&root_profile, &["--namespace", "team-b"])
        .await
        .expect("a namespace filter");
    assert!(
        !only_b.is_empty() && only_b.iter().all(|e| e["namespace"] == "team-b"),
        "{only_b:#?}"
    );

    // team-a's admin reads team-a's entries, not the party's ("*").
    let seen_by_a = audit_list(&admin_a.profile, &["--since", "1h"])
        .await
        .expect("team-a's admin reads its namespace");
    find(&seen_by_a, "job.delete", &job.id, "ok");
    find(&seen_by_a, "job.stop", &job.id, "permission_denied");
    find(&seen_by_a, "model.upload", &uploaded_id, "ok");
    find(
        &seen_by_a,
        "model.upload",
        "audited-model",
        "permission_denied",
    );
    assert!(
        seen_by_a.iter().all(|e| e["namespace"] == "team-a"),
        "{seen_by_a:#?}"
    );

    // A viewer cannot read it.
    let (code, stderr) = audit_list(&viewer_a.profile, &[])
        .await
        .expect_err("a viewer may not read the audit log");
    assert_ne!(code, 0);
    assert!(
        stderr.contains("permission_denied")
            || stderr.contains("PermissionDenied")
            || stderr.to_lowercase().contains("permission"),
        "{stderr}"
    );

    // Another namespace's admin sees none of team-a's or "*"'s entries.
    let seen_by_b = audit_list(&admin_b.profile, &[])
        .await
        .expect("team-b's admin reads its namespace");
    assert!(
        seen_by_b.iter().all(|e| e["namespace"] == "team-b"),
        "{seen_by_b:#?}"
    );
    assert!(
        !seen_by_b
            .iter()
            .any(|e| e["object"]["id"] == job.id.as_str()
                || e["object"]["id"] == temp.id.as_str()
                || e["object"]["id"] == "party-9"
                || e["object"]["id"] == uploaded_id.as_str()
                || e["object"]["id"] == "audited-model"),
        "{seen_by_b:#?}"
    );
    let asked_for_a = audit_list(&admin_b.profile, &["--namespace", "team-a"])
        .await
        .expect("another namespace reads as empty");
    assert!(asked_for_a.is_empty(), "{asked_for_a:#?}");
}
