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

/// Services (or single methods) reachable through the proxy.
const EXPOSED: &[(&str, Option<&str>, Destination)] = &[
    ("cohort.v1.Jobs", None, Destination::JobScheduler),
    ("cohort.v1.Models", None, Destination::ModelManager),
    ("cohort.v1.PartySession", None, Destination::ClientSelector),
    (
        "cohort.v1.ClientSelector",
        Some("ListClients"),
        Destination::ClientSelector,
    ),
    ("cohort.v1.Round", None, Destination::Coordinator),
    (HEALTH_SERVICE, None, Destination::Health),
    (REFLECTION_SERVICE, None, Destination::Reflection),
];

/// Fully-qualified names of the services the proxy exposes (for reflection).
pub fn exposed_services() -> impl Iterator<Item = &'static str> {
    EXPOSED.iter().map(|(service, _, _)| *service)
}

/// Routes a gRPC path `/package.Service/Method`.
pub fn destination(path: &str) -> Destination {
    let Some((service, method)) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
    else {
        return Destination::Refused(Refusal::Unknown);
    };
    for (exposed, only, dest) in EXPOSED {
        if *exposed == service && only.is_none_or(|m| m == method) {
            return *dest;
        }
    }
    if service.starts_with("cohort.") {
        Destination::Refused(Refusal::Internal)
    } else {
        Destination::Refused(Refusal::Unknown)
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
            ("/cohort.v1.Round/SubmitUpdate", Coordinator),
            ("/grpc.health.v1.Health/Check", Health),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Reflection,
            ),
            (
                "/cohort.v1.ClientSelector/OfferTasks",
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
}
