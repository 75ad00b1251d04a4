//! The generated FederatedJob CRD: names, columns, and a structural schema that an
//! `apiextensions.k8s.io/v1` API server accepts.

#![allow(clippy::unwrap_used)]

use cohort_core::JobSpec;
use cohort_kube::schema::structural_problems;
use cohort_kube::{CustomResourceExt, FederatedJob, FederatedJobStatus};
use serde_json::{Value, json};

fn crd() -> Value {
    serde_json::to_value(FederatedJob::crd()).unwrap()
}

fn schema() -> Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn names_scope_and_columns() {
    let crd = crd();
    assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(crd["metadata"]["name"], "federatedjobs.cohort.dev");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "cohort.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(
        spec["names"],
        json!({"kind": "FederatedJob", "plural": "federatedjobs", "singular": "federatedjob",
               "shortNames": ["fj"]})
    );
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["served"], true);
    assert_eq!(version["storage"], true);
    assert_eq!(version["subresources"], json!({"status": {}}));
    assert_eq!(
        version["additionalPrinterColumns"],
        json!([
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Round", "type": "integer", "jsonPath": ".status.round"},
            {"name": "Accuracy", "type": "number", "jsonPath": ".status.accuracy"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ])
    );
}

fn walk(v: &Value, f: &mut impl FnMut(&serde_json::Map<String, Value>)) {
    match v {
        Value::Object(m) => {
            f(m);
            m.values().for_each(|c| walk(c, f));
        }
        Value::Array(a) => a.iter().for_each(|c| walk(c, f)),
        _ => {}
    }
}

#[test]
fn schema_is_structural() {
    let schema = schema();
    let text = schema.to_string();
    assert!(!text.contains("$ref"), "schema has a $ref: {text}");
    assert!(!text.contains("definitions"), "schema has definitions");
    let problems = structural_problems(&schema);
    assert!(
        problems.is_empty(),
        "not a structural schema:\n{}\n{}",
        problems.join("\n"),
        serde_json::to_string_pretty(&schema).unwrap()
    );
    // Independently of the checker: every property has a type or an x-kubernetes marker.
    let mut untyped = Vec::new();
    walk(&schema, &mut |m| {
        if let Some(Value::Object(props)) = m.get("properties") {
            for (name, p) in props {
                let typed = p.get("type").is_some()
                    || p.get("x-kubernetes-int-or-string") == Some(&json!(true))
                    || p.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
                // Properties inside oneOf branches only narrow hoisted ones.
                if !typed && m.get("type").is_some() {
                    untyped.push(name.clone());
                }
            }
        }
    });
    assert!(untyped.is_empty(), "properties without a type: {untyped:?}");
}

#[test]
fn schema_follows_the_job_spec() {
    let schema = schema();
    let spec = &schema["properties"]["spec"];
    assert_eq!(spec["type"], "object");
    let mut required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(required, ["clients", "data", "model", "name"]);
    let props = &spec["properties"];
    assert_eq!(
        props["model"]["properties"]["arch"]["enum"],
        json!(["logreg", "mlp", "cnn", "synthetic"])
    );
    assert_eq!(props["rounds"]["type"], "integer");
    // "60s" or 60: both parse (cohort_core::spec).
    assert_eq!(
        props["clients"]["properties"]["round_timeout"]["x-kubernetes-int-or-string"],
        true
    );
    // Tagged enums are flattened into one object with the tag as an enum.
    let optimizer = &props["training"]["properties"]["optimizer"];
    assert_eq!(optimizer["type"], "object");
    for field in ["name", "lr", "beta1", "beta2", "weight_decay"] {
        assert!(
            optimizer["properties"].get(field).is_some(),
            "optimizer.{field}"
        );
    }
    let aggregation = &props["aggregation"];
    assert_eq!(aggregation["type"], "object");
    for field in ["strategy", "mu", "beta", "f"] {
        assert!(
            aggregation["properties"].get(field).is_some(),
            "aggregation.{field}"
        );
    }
    // The status is camelCase.
    let status = &schema["properties"]["status"]["properties"];
    for field in [
        "jobId",
        "state",
        "round",
        "roundsTotal",
        "accuracy",
        "reason",
        "observedGeneration",
    ] {
        assert!(status.get(field).is_some(), "status.{field}");
    }
}

#[test]
fn a_federated_job_object_carries_a_job_spec() {
    let yaml = r#"
apiVersion: cohort.dev/v1alpha1
kind: FederatedJob
metadata: {name: digits, namespace: team-a}
spec:
  name: digits-fedavg
  model: {arch: mlp, hidden: [128]}
  data: {dataset: digits}
  rounds: 5
  clients: {per_round: 3, min: 2, round_timeout: 30s}
status:
  jobId: digits-fedavg-abc123
  state: RUNNING
  round: 2
  roundsTotal: 5
  accuracy: 0.91
"#;
    let fj: FederatedJob = serde_yaml::from_str(yaml).unwrap();
    let spec_yaml = serde_yaml::to_string(&fj.spec).unwrap();
    assert_eq!(JobSpec::parse(&spec_yaml).unwrap(), fj.spec.0);
    assert_eq!(fj.spec.rounds, 5);
    assert_eq!(
        fj.status,
        Some(FederatedJobStatus {
            job_id: Some("digits-fedavg-abc123".to_string()),
            state: Some("RUNNING".to_string()),
            round: 2,
            rounds_total: 5,
            accuracy: Some(0.91),
            reason: None,
            observed_generation: None,
        })
    );
    let back = serde_json::to_value(&fj).unwrap();
    assert_eq!(back["status"]["roundsTotal"], 5);
    assert_eq!(back["spec"]["clients"]["per_round"], 3);
}
