//! What reflection at the proxy may show: Cohort's public services and the
//! types they use, nothing server-internal. Public and internal services
//! share proto files (jobs.proto holds Jobs, Auth and JobControl), so each
//! file is rebuilt once, at start: without the services and methods the proxy
//! refuses, without the types only those use, and with its comments
//! re-indexed (the comments of what was dropped go with it).

use std::collections::{HashMap, HashSet};

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet, SourceCodeInfo};

use crate::routing::{self, Destination};

// Field numbers of descriptor.proto, as they appear in source-code-info paths.
const FILE_DEPENDENCY: i32 = 3;
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const FILE_PUBLIC_DEPENDENCY: i32 = 10;
const FILE_WEAK_DEPENDENCY: i32 = 11;
const SERVICE_METHOD: i32 = 2;

/// The descriptors in `encoded` reduced to the methods the proxy forwards.
pub(crate) fn public_descriptor_set(
    encoded: &[u8],
) -> Result<FileDescriptorSet, prost::DecodeError> {
    let set = FileDescriptorSet::decode(encoded)?;
    Ok(reduce(set, |service, method| {
        !matches!(
            routing::destination(&format!("/{service}/{method}")),
            Destination::Refused(_)
        )
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum TopLevel {
    Message(usize),
    Enum(usize),
}

/// Keeps the methods `exposed(service, method)` admits, the services that
/// keep a method, the top-level types reachable from those methods and the
/// files that keep anything.
fn reduce(set: FileDescriptorSet, exposed: impl Fn(&str, &str) -> bool) -> FileDescriptorSet {
    let files = set.file;

    // Per file, per service: the methods kept.
    let kept_methods: Vec<Vec<Vec<bool>>> = files
        .iter()
        .map(|file| {
            file.service
                .iter()
                .map(|service| {
                    let name = qualified(file.package(), service.name());
                    service
                        .method
                        .iter()
                        .map(|m| exposed(&name, m.name()))
                        .collect()
                })
                .collect()
        })
        .collect();

    // Every type name (".pkg.Outer.Inner") -> the top-level type holding it.
    let mut owners: HashMap<String, (usize, TopLevel)> = HashMap::new();
    for (f, file) in files.iter().enumerate() {
        let prefix = format!(".{}", file.package());
        for (i, message) in file.message_type.iter().enumerate() {
            index_message(&prefix, message, (f, TopLevel::Message(i)), &mut owners);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            owners.insert(qualified(&prefix, e.name()), (f, TopLevel::Enum(i)));
        }
    }

    let mut pending: Vec<String> = Vec::new();
    for (f, file) in files.iter().enumerate() {
        for (s, service) in file.service.iter().enumerate() {
            for (m, method) in service.method.iter().enumerate() {
                if kept_methods[f][s][m] {
                    pending.push(method.input_type().to_string());
                    pending.push(method.output_type().to_string());
                }
            }
        }
    }
    let mut kept_types: HashSet<(usize, TopLevel)> = HashSet::new();
    while let Some(name) = pending.pop() {
        let Some(&owner) = owners.get(&name) else {
            continue; // defined outside this set (a well-known type): not ours to prune
        };
        if kept_types.insert(owner)
            && let (f, TopLevel::Message(i)) = owner
        {
            referenced_types(&files[f].message_type[i], &mut pending);
        }
    }

    let mut reduced: Vec<(FileDescriptorProto, Remap)> = Vec::new();
    for (f, mut file) in files.into_iter().enumerate() {
        let messages = keep_flags(file.message_type.len(), |i| {
            kept_types.contains(&(f, TopLevel::Message(i)))
        });
        let enums = keep_flags(file.enum_type.len(), |i| {
            kept_types.contains(&(f, TopLevel::Enum(i)))
        });
        let services: Vec<bool> = kept_methods[f]
            .iter()
            .map(|methods| methods.contains(&true))
            .collect();
        if !messages.contains(&true) && !enums.contains(&true) && !services.contains(&true) {
            continue;
        }
        file.message_type = retain(file.message_type, &messages);
        file.enum_type = retain(file.enum_type, &enums);
        let mut method_maps = HashMap::new();
        let mut service_list = Vec::new();
        for (s, mut service) in std::mem::take(&mut file.service).into_iter().enumerate() {
            if !services[s] {
                continue;
            }
            let methods = &kept_methods[f][s];
            service.method = retain(service.method, methods);
            method_maps.insert(position(s), index_map(methods));
            service_list.push(service);
        }
        file.service = service_list;
        let remap = Remap {
            messages: index_map(&messages),
            enums: index_map(&enums),
            services: index_map(&services),
            methods: method_maps,
            dependencies: HashMap::new(),
        };
        reduced.push((file, remap));
    }

    // Imports of files that were dropped go (nothing kept used them).
    let present: HashSet<String> = reduced
        .iter()
        .map(|(file, _)| file.name().to_string())
        .collect();
    let file = reduced
        .into_iter()
        .map(|(mut file, mut remap)| {
            let dependencies: Vec<bool> = file
                .dependency
                .iter()
                .map(|d| present.contains(d))
                .collect();
            file.dependency = retain(file.dependency, &dependencies);
            remap.dependencies = index_map(&dependencies);
            file.public_dependency = remap_indices(&file.public_dependency, &remap.dependencies);
            file.weak_dependency = remap_indices(&file.weak_dependency, &remap.dependencies);
            file.source_code_info = file.source_code_info.map(|info| SourceCodeInfo {
                location: info
                    .location
                    .into_iter()
                    .filter_map(|mut location| {
                        location.path = remap.path(&location.path)?;
                        Some(location)
                    })
                    .collect(),
            });
            file
        })
        .collect();
    FileDescriptorSet { file }
}

/// Old index -> new index of what a file kept, per kind of element.
struct Remap {
    messages: HashMap<i32, i32>,
    enums: HashMap<i32, i32>,
    services: HashMap<i32, i32>,
    /// By old service index.
    methods: HashMap<i32, HashMap<i32, i32>>,
    dependencies: HashMap<i32, i32>,
}

impl Remap {
    /// A source-code-info path in the reduced file; `None` when it points
    /// into something dropped.
    fn path(&self, path: &[i32]) -> Option<Vec<i32>> {
        let moved = |map: &HashMap<i32, i32>, kind: i32, i: &i32, rest: &[i32]| {
            map.get(i).map(|&n| [&[kind, n], rest].concat())
        };
        match path {
            [FILE_MESSAGE_TYPE, i, rest @ ..] => moved(&self.messages, FILE_MESSAGE_TYPE, i, rest),
            [FILE_ENUM_TYPE, i, rest @ ..] => moved(&self.enums, FILE_ENUM_TYPE, i, rest),
            [FILE_SERVICE, s, SERVICE_METHOD, m, rest @ ..] => {
                let service = *self.services.get(s)?;
                let method = *self.methods.get(s)?.get(m)?;
                Some([&[FILE_SERVICE, service, SERVICE_METHOD, method], rest].concat())
            }
            [FILE_SERVICE, s, rest @ ..] => moved(&self.services, FILE_SERVICE, s, rest),
            [FILE_DEPENDENCY, i, rest @ ..] => moved(&self.dependencies, FILE_DEPENDENCY, i, rest),
            // They index lists that may have shrunk; they carry no comments worth the work.
            [FILE_PUBLIC_DEPENDENCY | FILE_WEAK_DEPENDENCY, ..] => None,
            _ => Some(path.to_vec()),
        }
    }
}

fn qualified(prefix: &str, name: &str) -> String {
    if prefix.is_empty() || prefix == "." {
        format!("{prefix}{name}")
    } else {
        format!("{prefix}.{name}")
    }
}

fn index_message(
    prefix: &str,
    message: &DescriptorProto,
    owner: (usize, TopLevel),
    owners: &mut HashMap<String, (usize, TopLevel)>,
) {
    let name = qualified(prefix, message.name());
    for nested in &message.nested_type {
        index_message(&name, nested, owner, owners);
    }
    for e in &message.enum_type {
        owners.insert(qualified(&name, e.name()), owner);
    }
    owners.insert(name, owner);
}

/// Type names used by the fields of `message` and of the types nested in it.
fn referenced_types(message: &DescriptorProto, out: &mut Vec<String>) {
    for field in message.field.iter().chain(&message.extension) {
        if !field.type_name().is_empty() {
            out.push(field.type_name().to_string());
        }
    }
    for nested in &message.nested_type {
        referenced_types(nested, out);
    }
}

fn keep_flags(len: usize, keep: impl Fn(usize) -> bool) -> Vec<bool> {
    (0..len).map(keep).collect()
}

fn retain<T>(items: Vec<T>, keep: &[bool]) -> Vec<T> {
    items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, &k)| k.then_some(item))
        .collect()
}

fn position(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

fn index_map(keep: &[bool]) -> HashMap<i32, i32> {
    keep.iter()
        .enumerate()
        .filter(|(_, k)| **k)
        .enumerate()
        .map(|(new, (old, _))| (position(old), position(new)))
        .collect()
}

fn remap_indices(indices: &[i32], map: &HashMap<i32, i32>) -> Vec<i32> {
    indices.iter().filter_map(|i| map.get(i).copied()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn public() -> FileDescriptorSet {
        public_descriptor_set(cohort_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    fn services(set: &FileDescriptorSet) -> Vec<String> {
        let mut names: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(|s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        names.sort();
        names
    }

    fn messages(set: &FileDescriptorSet) -> HashSet<String> {
        set.file
            .iter()
            .flat_map(|f| f.message_type.iter().map(|m| m.name().to_string()))
            .collect()
    }

    #[test]
    fn only_public_services_and_methods_remain() {
        let set = public();
        assert_eq!(
            services(&set),
            [
                "cohort.v1.Audit",
                "cohort.v1.ClientSelector",
                "cohort.v1.Jobs",
                "cohort.v1.Models",
                "cohort.v1.PartySession",
                "cohort.v1.Round",
                "cohort.v1.SecureAggregation",
                "cohort.v1.Tokens",
            ]
        );
        let selector = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .find(|s| s.name() == "ClientSelector")
            .unwrap();
        let methods: Vec<&str> = selector.method.iter().map(|m| m.name()).collect();
        assert_eq!(methods, ["ListClients", "RevokeClient", "ProbeParties"]);
    }

    #[test]
    fn types_only_internal_services_use_are_gone_shared_ones_stay() {
        let full = messages(&FileDescriptorSet::decode(cohort_proto::FILE_DESCRIPTOR_SET).unwrap());
        let kept = messages(&public());
        for internal in [
            "AuthenticateRequest",
            "GetAssignmentRequest",
            "Assignment",
            "ListRoutesRequest",
            "OfferTasksRequest",
            "StopCoordinatorRequest",
            "RecordAuditRequest",
            "RecordAuditResponse",
            "RecordTaskResultsRequest",
            "TaskResultReport",
        ] {
            assert!(
                full.contains(internal),
                "{internal} should exist in the protos"
            );
            assert!(!kept.contains(internal), "{internal} leaked");
        }
        // Used by public methods, directly or through fields (Task: in a
        // PartySession offer; TensorChunk: from another file).
        for public in [
            "Job",
            "ListClientsRequest",
            "ClientInfo",
            "Ack",
            "Task",
            "TensorChunk",
            "ListAuditEntriesRequest",
            "AuditEntry",
        ] {
            assert!(kept.contains(public), "{public} missing");
        }
    }

    #[test]
    fn every_reference_resolves_and_every_import_exists() {
        let set = public();
        let names: HashSet<String> = set.file.iter().map(|f| f.name().to_string()).collect();
        let mut owners = HashMap::new();
        for (f, file) in set.file.iter().enumerate() {
            let prefix = format!(".{}", file.package());
            for (i, m) in file.message_type.iter().enumerate() {
                index_message(&prefix, m, (f, TopLevel::Message(i)), &mut owners);
            }
            for (i, e) in file.enum_type.iter().enumerate() {
                owners.insert(qualified(&prefix, e.name()), (f, TopLevel::Enum(i)));
            }
        }
        for file in &set.file {
            for dep in &file.dependency {
                assert!(names.contains(dep), "{} imports missing {dep}", file.name());
            }
            let mut used = Vec::new();
            for m in &file.message_type {
                referenced_types(m, &mut used);
            }
            for s in &file.service {
                for m in &s.method {
                    used.push(m.input_type().to_string());
                    used.push(m.output_type().to_string());
                }
            }
            for name in used {
                assert!(
                    owners.contains_key(&name),
                    "{} uses missing {name}",
                    file.name()
                );
            }
        }
    }

    #[test]
    fn comments_follow_their_elements_and_internal_ones_go() {
        let set = public();
        let jobs = set
            .file
            .iter()
            .find(|f| f.service.iter().any(|s| s.name() == "Jobs"))
            .unwrap();
        let info = jobs.source_code_info.as_ref().unwrap();
        let comment = |path: &[i32]| {
            info.location
                .iter()
                .find(|l| l.path == path)
                .map(|l| l.leading_comments().to_string())
        };
        for (s, service) in jobs.service.iter().enumerate() {
            for (m, method) in service.method.iter().enumerate() {
                let path = [FILE_SERVICE, position(s), SERVICE_METHOD, position(m)];
                // Each method's comment, if any, is the one written above that method.
                if let Some(text) = comment(&path) {
                    let original = original_method_comment(service.name(), method.name());
                    assert_eq!(Some(text), original, "{}.{}", service.name(), method.name());
                }
            }
        }
        let all: String = set
            .file
            .iter()
            .filter_map(|f| f.source_code_info.as_ref())
            .flat_map(|i| &i.location)
            .map(|l| format!("{}{}", l.leading_comments(), l.trailing_comments()))
            .collect();
        // Comments written above Auth, JobControl.GetAssignment,
        // ClientSelector.ListRevoked and .OfferTasks.
        for internal in [
            "the proxy resolves a token's hash",
            "The job a coordinator runs",
            "revoked parties, for the proxy",
            "Selects up to `count` connected parties",
        ] {
            assert!(!all.contains(internal), "{internal:?} leaked");
        }
        assert!(all.contains("One long-lived stream per party"), "{all}");
    }

    fn original_method_comment(service: &str, method: &str) -> Option<String> {
        let set = FileDescriptorSet::decode(cohort_proto::FILE_DESCRIPTOR_SET).unwrap();
        for file in &set.file {
            for (s, svc) in file.service.iter().enumerate() {
                for (m, meth) in svc.method.iter().enumerate() {
                    if svc.name() == service && meth.name() == method {
                        let path = [FILE_SERVICE, position(s), SERVICE_METHOD, position(m)];
                        return file.source_code_info.as_ref().and_then(|i| {
                            i.location
                                .iter()
                                .find(|l| l.path == path)
                                .map(|l| l.leading_comments().to_string())
                        });
                    }
                }
            }
        }
        None
    }
}
