//! Domain types to and from their protobuf form, in one place for every service and the CLI.

use cohort_core::Role;
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
}
