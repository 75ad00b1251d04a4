//! Who may do what: the roles of API tokens and the namespaces they reach.
//! Decisions only; tokens themselves are checked at the proxy.

use std::fmt;

use crate::ids::is_dns_label;

/// The role an API token grants in its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Member,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Result<Role, AuthError> {
        match s {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            other => Err(AuthError::InvalidRole(other.to_string())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The namespaces a token reaches: one, or every one (`*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    All,
    Namespace(String),
}

impl Scope {
    pub const ALL: &'static str = "*";

    pub fn parse(s: &str) -> Result<Scope, AuthError> {
        if s == Self::ALL {
            Ok(Scope::All)
        } else if is_dns_label(s) {
            Ok(Scope::Namespace(s.to_string()))
        } else {
            Err(AuthError::InvalidNamespace(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Scope::All => Self::ALL,
            Scope::Namespace(ns) => ns,
        }
    }

    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Namespace(ns) => ns == namespace,
        }
    }

    /// The one namespace, if the scope is a single one.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Namespace(ns) => Some(ns),
        }
    }

    /// Whether everything in `other` is also in this scope.
    pub fn covers(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::All, _) => true,
            (Scope::Namespace(a), Scope::Namespace(b)) => a == b,
            (Scope::Namespace(_), Scope::All) => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Get, list, watch, download.
    Read,
    /// Create, stop, delete, upload.
    Write,
    /// Tokens and parties.
    Administer,
}

impl Action {
    fn needs(self) -> Role {
        match self {
            Action::Read => Role::Viewer,
            Action::Write => Role::Member,
            Action::Administer => Role::Admin,
        }
    }
}

/// The holder of an authenticated API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub scope: Scope,
    pub role: Role,
}

impl Principal {
    /// May `action` be done on something in `namespace`? Something outside
    /// the token's scope is reported as not found, so names do not leak
    /// across tenants.
    pub fn authorize(&self, namespace: &str, action: Action) -> Result<(), AuthError> {
        if !self.scope.includes(namespace) {
            return Err(AuthError::OutOfScope);
        }
        self.check_role(action)
    }

    /// May `action` be done on something spanning `scope` (e.g. tokens for it)?
    pub fn authorize_scope(&self, scope: &Scope, action: Action) -> Result<(), AuthError> {
        if !self.scope.covers(scope) {
            return Err(AuthError::Forbidden {
                role: self.role,
                action,
            });
        }
        self.check_role(action)
    }

    fn check_role(&self, action: Action) -> Result<(), AuthError> {
        if self.role >= action.needs() {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                role: self.role,
                action,
            })
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("role: {0:?} is not one of admin, member, viewer")]
    InvalidRole(String),
    #[error("namespace: {0:?} must be a DNS-1123 label or \"*\"")]
    InvalidNamespace(String),
    /// The caller must answer as if the object did not exist.
    #[error("not found")]
    OutOfScope,
    #[error("permission denied: the {role} role may not {}", action_text(*.action))]
    Forbidden { role: Role, action: Action },
}

fn action_text(action: Action) -> &'static str {
    match action {
        Action::Read => "read",
        Action::Write => "create, change or delete",
        Action::Administer => "administer tokens or parties",
    }
}

impl crate::HasKind for AuthError {
    fn kind(&self) -> crate::ErrorKind {
        match self {
            AuthError::InvalidRole(_) | AuthError::InvalidNamespace(_) => {
                crate::ErrorKind::InvalidArgument
            }
            AuthError::OutOfScope => crate::ErrorKind::NotFound,
            AuthError::Forbidden { .. } => crate::ErrorKind::PermissionDenied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scope: &str, role: Role) -> Principal {
        Principal {
            scope: Scope::parse(scope).unwrap(),
            role,
        }
    }

    #[test]
    fn roles_are_ordered_by_power() {
        let viewer = principal("a", Role::Viewer);
        assert_eq!(viewer.authorize("a", Action::Read), Ok(()));
        assert!(matches!(
            viewer.authorize("a", Action::Write),
            Err(AuthError::Forbidden { .. })
        ));
        let member = principal("a", Role::Member);
        assert_eq!(member.authorize("a", Action::Write), Ok(()));
        assert!(member.authorize("a", Action::Administer).is_err());
        assert_eq!(
            principal("a", Role::Admin).authorize("a", Action::Administer),
            Ok(())
        );
    }

    #[test]
    fn other_namespaces_are_not_found_whatever_the_role() {
        let admin = principal("a", Role::Admin);
        assert_eq!(
            admin.authorize("b", Action::Read),
            Err(AuthError::OutOfScope)
        );
        assert_eq!(
            principal("*", Role::Viewer).authorize("b", Action::Read),
            Ok(())
        );
    }

    #[test]
    fn scopes_cover_only_what_they_include() {
        let admin_a = principal("a", Role::Admin);
        assert!(
            admin_a
                .authorize_scope(&Scope::parse("a").unwrap(), Action::Administer)
                .is_ok()
        );
        assert!(
            admin_a
                .authorize_scope(&Scope::All, Action::Administer)
                .is_err()
        );
        assert!(
            principal("*", Role::Admin)
                .authorize_scope(&Scope::All, Action::Administer)
                .is_ok()
        );
    }

    #[test]
    fn parsing_refuses_bad_input() {
        assert!(Role::parse("root").is_err());
        assert!(Scope::parse("Not_A_Label").is_err());
        assert_eq!(Scope::parse("*").unwrap(), Scope::All);
    }
}
