//! Which paths the proxy exposes, and to whom. Only user- and party-facing
//! services leave the cluster; server-internal ones are refused here.

/// Where a call goes, decided from its `:path` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    JobScheduler,
    ModelManager,
    ClientSelector,
    /// The coordinator of the job named by `x-cohort-job`.
    Coordinator,
    /// Answered by the proxy itself.
    Health,
    Reflection,
    Refused(Refusal),
}

/// Why a call is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A Cohort service or method that is server-internal (PERMISSION_DENIED).
    Internal,
    /// Not a path the proxy knows (UNIMPLEMENTED).
    Unknown,
}

pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";
/// The older reflection API, still what grpcurl and Python's grpcio-reflection ask.
pub const REFLECTION_V1ALPHA_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Who may call a path, and how they prove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Health and reflection: no credentials.
    Anyone,
    /// People and tools: an API token (`authorization: Bearer ...`).
    User,
    /// Parties: a party client certificate of the federation CA.
    Party,
}

/// Services (or single methods) reachable through the proxy.
const EXPOSED: &[(&str, Option<&str>, Destination, Audience)] = &[
    (
        "cohort.v1.Jobs",
        None,
        Destination::JobScheduler,
        Audience::User,
    ),
    (
        "cohort.v1.Tokens",
        None,
        Destination::JobScheduler,
        Audience::User,
    ),
    (
        "cohort.v1.Audit",
        None,
        Destination::JobScheduler,
        Audience::User,
    ),
    (
        "cohort.v1.Models",
        None,
        Destination::ModelManager,
        Audience::User,
    ),
    (
        "cohort.v1.PartySession",
        None,
        Destination::ClientSelector,
        Audience::Party,
    ),
    (
        "cohort.v1.ClientSelector",
        Some("ListClients"),
        Destination::ClientSelector,
        Audience::User,
    ),
    (
        "cohort.v1.ClientSelector",
        Some("RevokeClient"),
        Destination::ClientSelector,
        Audience::User,
    ),
    // `cohort check --federation` (client-selector asks for an admin of "*").
    (
        "cohort.v1.ClientSelector",
        Some("ProbeParties"),
        Destination::ClientSelector,
        Audience::User,
    ),
    (
        "cohort.v1.Round",
        None,
        Destination::Coordinator,
        Audience::Party,
    ),
    // Secure aggregation's messages, beside Round on the job's coordinator.
    (
        "cohort.v1.SecureAggregation",
        None,
        Destination::Coordinator,
        Audience::Party,
    ),
    (HEALTH_SERVICE, None, Destination::Health, Audience::Anyone),
    (
        REFLECTION_SERVICE,
        None,
        Destination::Reflection,
        Audience::Anyone,
    ),
    (
        REFLECTION_V1ALPHA_SERVICE,
        None,
        Destination::Reflection,
        Audience::Anyone,
    ),
];

/// Fully-qualified names of the services the proxy exposes (for reflection
/// and health).
pub fn exposed_services() -> impl Iterator<Item = &'static str> {
    let mut seen = Vec::new();
    for (service, _, _, _) in EXPOSED {
        if !seen.contains(service) {
            seen.push(*service);
        }
    }
    seen.into_iter()
}

/// Routes a gRPC path `/package.Service/Method`.
pub fn destination(path: &str) -> Destination {
    route(path).0
}

/// Where a path goes and who may call it (refused paths: `Anyone`, they
/// are answered by the proxy).
pub fn route(path: &str) -> (Destination, Audience) {
    let Some((service, method)) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
    else {
        return (Destination::Refused(Refusal::Unknown), Audience::Anyone);
    };
    for (exposed, only, dest, audience) in EXPOSED {
        if *exposed == service && only.is_none_or(|m| m == method) {
            return (*dest, *audience);
        }
    }
    if service.starts_with("cohort.") {
        (Destination::Refused(Refusal::Internal), Audience::Anyone)
    } else {
        (Destination::Refused(Refusal::Unknown), Audience::Anyone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_service_and_method() {
        use Destination::*;
        let cases = [
            ("/cohort.v1.Jobs/GetJob", JobScheduler),
            ("/cohort.v1.Models/Download", ModelManager),
            ("/cohort.v1.PartySession/Open", ClientSelector),
            ("/cohort.v1.ClientSelector/ListClients", ClientSelector),
            ("/cohort.v1.ClientSelector/RevokeClient", ClientSelector),
            ("/cohort.v1.ClientSelector/ProbeParties", ClientSelector),
            ("/cohort.v1.PartySession/Check", ClientSelector),
            ("/cohort.v1.Tokens/CreateToken", JobScheduler),
            ("/cohort.v1.Audit/ListAuditEntries", JobScheduler),
            (
                "/cohort.v1.JobControl/RecordAudit",
                Refused(Refusal::Internal),
            ),
            (
                "/cohort.v1.ClientSelector/ListRevoked",
                Refused(Refusal::Internal),
            ),
            ("/cohort.v1.Auth/Authenticate", Refused(Refusal::Internal)),
            ("/cohort.v1.Round/SubmitUpdate", Coordinator),
            ("/cohort.v1.SecureAggregation/SubmitMasked", Coordinator),
            ("/cohort.v1.SecureAggregation/GetRoster", Coordinator),
            ("/grpc.health.v1.Health/Check", Health),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Reflection,
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                Reflection,
            ),
            (
                "/cohort.v1.ClientSelector/OfferTasks",
                Refused(Refusal::Internal),
            ),
            // A party must not write its own reliability record.
            (
                "/cohort.v1.ClientSelector/RecordTaskResults",
                Refused(Refusal::Internal),
            ),
            (
                "/cohort.v1.JobControl/ListRoutes",
                Refused(Refusal::Internal),
            ),
            (
                "/cohort.v1.CoordinatorControl/Stop",
                Refused(Refusal::Internal),
            ),
            ("/other.Svc/Call", Refused(Refusal::Unknown)),
            ("/cohort.v1.Jobs/", Refused(Refusal::Unknown)),
            ("/cohort.v1.Jobs/a/b", Refused(Refusal::Unknown)),
            ("/", Refused(Refusal::Unknown)),
            ("", Refused(Refusal::Unknown)),
        ];
        for (path, want) in cases {
            assert_eq!(destination(path), want, "{path}");
        }
    }

    #[test]
    fn parties_prove_themselves_by_certificate_users_by_token() {
        assert_eq!(route("/cohort.v1.PartySession/Open").1, Audience::Party);
        assert_eq!(route("/cohort.v1.PartySession/Check").1, Audience::Party);
        assert_eq!(
            route("/cohort.v1.ClientSelector/ProbeParties").1,
            Audience::User
        );
        assert_eq!(route("/cohort.v1.Round/SubmitUpdate").1, Audience::Party);
        assert_eq!(
            route("/cohort.v1.SecureAggregation/ShareKeys").1,
            Audience::Party
        );
        assert_eq!(route("/cohort.v1.Jobs/StopJob").1, Audience::User);
        assert_eq!(route("/cohort.v1.Models/Download").1, Audience::User);
        assert_eq!(route("/cohort.v1.Audit/ListAuditEntries").1, Audience::User);
        assert_eq!(
            route("/cohort.v1.ClientSelector/ListClients").1,
            Audience::User
        );
        assert_eq!(route("/grpc.health.v1.Health/Check").1, Audience::Anyone);
        assert_eq!(
            route("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").1,
            Audience::Anyone
        );
    }
}
