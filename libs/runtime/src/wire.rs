//! Domain types to and from their protobuf form, in one place for every service and the CLI.

use cohort_core::{Role, TaskKind};
use cohort_proto::v1 as pb;

/// The wire form of a role.
pub fn role_to_wire(role: Role) -> pb::Role {
    match role {
        Role::Admin => pb::Role::Admin,
        Role::Member => pb::Role::Member,
        Role::Viewer => pb::Role::Viewer,
    }
}

/// The role a wire value names; None for unspecified or unknown values.
pub fn role_from_wire(value: i32) -> Option<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Admin) => Some(Role::Admin),
        Ok(pb::Role::Member) => Some(Role::Member),
        Ok(pb::Role::Viewer) => Some(Role::Viewer),
        _ => None,
    }
}

/// The wire form of a task kind.
pub fn task_kind_to_wire(kind: TaskKind) -> pb::TaskKind {
    match kind {
        TaskKind::Train => pb::TaskKind::Train,
        TaskKind::Evaluate => pb::TaskKind::Evaluate,
    }
}

/// The task kind a wire value names; None for unspecified or unknown values.
pub fn task_kind_from_wire(value: i32) -> Option<TaskKind> {
    match pb::TaskKind::try_from(value) {
        Ok(pb::TaskKind::Train) => Some(TaskKind::Train),
        Ok(pb::TaskKind::Evaluate) => Some(TaskKind::Evaluate),
        _ => None,
    }
}

/// Marks a server-internal call as made for `namespace` with `role`: how a coordinator acts
/// for its job's namespace instead of as an all-powerful internal caller. The callee
/// authorises it exactly like a user's call that came through the proxy.
pub fn act_as<T>(
    req: &mut tonic::Request<T>,
    namespace: &str,
    role: Role,
) -> Result<(), tonic::Status> {
    let ns = namespace.parse().map_err(|_| {
        tonic::Status::invalid_argument(format!("namespace {namespace:?} is not valid metadata"))
    })?;
    let metadata = req.metadata_mut();
    metadata.insert(cohort_proto::NAMESPACE_METADATA_KEY, ns);
    metadata.insert(
        cohort_proto::ROLE_METADATA_KEY,
        tonic::metadata::MetadataValue::from_static(role.as_str()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_unspecified_is_none() {
        for role in [Role::Admin, Role::Member, Role::Viewer] {
            assert_eq!(role_from_wire(role_to_wire(role) as i32), Some(role));
        }
        assert_eq!(role_from_wire(pb::Role::Unspecified as i32), None);
        assert_eq!(role_from_wire(99), None);
    }

    #[test]
    fn acting_as_a_namespace_reads_back_as_that_principal() {
        let mut req = tonic::Request::new(());
        act_as(&mut req, "team-b", Role::Member).expect("valid namespace");
        let p = crate::calling_principal(&req)
            .expect("well formed")
            .expect("a principal");
        assert_eq!(p.scope, cohort_core::Scope::Namespace("team-b".into()));
        assert_eq!(p.role, Role::Member);
    }

    #[test]
    fn task_kinds_round_trip_and_unspecified_is_none() {
        for kind in [TaskKind::Train, TaskKind::Evaluate] {
            assert_eq!(
                task_kind_from_wire(task_kind_to_wire(kind) as i32),
                Some(kind)
            );
        }
        assert_eq!(task_kind_from_wire(pb::TaskKind::Unspecified as i32), None);
        assert_eq!(task_kind_from_wire(7), None);
    }
}
