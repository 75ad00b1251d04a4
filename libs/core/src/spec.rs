//! The job spec (DESIGN §3): parsed strictly from YAML or JSON, then validated.
//!
//! Parsing rejects unknown fields and wrong types; [`JobSpec::validate`] rejects bad
//! values and impossible combinations. Both name the field at fault.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::is_dns_label;

/// A spec that cannot be accepted, and the field at fault (dotted path).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Longest job name; the job id appends a suffix and must stay a DNS label.
pub const MAX_JOB_NAME_LEN: usize = 40;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub training: TrainingSpec,
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    pub clients: ClientsSpec,
    #[serde(default)]
    pub aggregation: AggregationSpec,
    #[serde(default)]
    pub privacy: PrivacySpec,
    #[serde(default)]
    pub compression: Option<CompressionSpec>,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    #[serde(default)]
    pub stop: StopSpec,
}

fn default_namespace() -> String {
    "default".to_string()
}
fn default_rounds() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Logreg,
    Mlp,
    Cnn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Hidden layer widths (mlp only).
    #[serde(default)]
    pub hidden: Vec<u32>,
    /// Initial weights: "model-name@version" from model-manager.
    #[serde(default)]
    pub init: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub dataset: String,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Candle,
    Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
}

fn default_epochs() -> u32 {
    1
}
fn default_batch_size() -> u32 {
    32
}

impl Default for TrainingSpec {
    fn default() -> Self {
        Self {
            runtime: Runtime::Candle,
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            optimizer: OptimizerSpec::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
#[schemars(transform = flatten_optimizer_schema)]
pub enum OptimizerSpec {
    Sgd {
        lr: f64,
    },
    Adam {
        lr: f64,
        #[serde(default = "default_beta1")]
        beta1: f64,
        #[serde(default = "default_beta2")]
        beta2: f64,
        #[serde(default)]
        weight_decay: f64,
    },
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec::Sgd { lr: 0.05 }
    }
}

impl OptimizerSpec {
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::Sgd { lr } | OptimizerSpec::Adam { lr, .. } => *lr,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    #[default]
    Random,
    Resource,
    Reliability,
    Data,
}

impl Selection {
    pub fn as_str(self) -> &'static str {
        match self {
            Selection::Random => "random",
            Selection::Resource => "resource",
            Selection::Reliability => "reliability",
            Selection::Data => "data",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientsSpec {
    pub per_round: u32,
    pub min: u32,
    #[serde(default)]
    pub selection: Selection,
    #[serde(
        default = "default_round_timeout",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    #[schemars(schema_with = "duration_schema")]
    pub round_timeout: Duration,
}

fn default_round_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
#[schemars(transform = flatten_aggregation_schema)]
pub enum AggregationSpec {
    #[default]
    Fedavg,
    Fedprox {
        mu: f64,
    },
    Fedadam,
    Fedyogi,
    Fedadagrad,
    Scaffold,
    Median,
    TrimmedMean {
        beta: f64,
    },
    Krum {
        f: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    #[serde(default)]
    pub secure_aggregation: bool,
    #[serde(default)]
    pub dp: Option<DpSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpSpec {
    pub clip: f64,
    pub noise_multiplier: f64,
    pub delta: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompressionSpec {
    #[serde(default)]
    pub quantize_bits: Option<u32>,
    #[serde(default)]
    pub top_k: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Evaluate the global model every this many rounds (the last round always).
    #[serde(default = "default_every")]
    pub every: u32,
}

fn default_every() -> u32 {
    1
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        Self { every: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopSpec {
    #[serde(default)]
    pub target_accuracy: Option<f64>,
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {t:?} ({e}); use e.g. \"60s\""))
        }),
    }
}

fn flatten_optimizer_schema(schema: &mut schemars::Schema) {
    flatten_tagged_schema(schema, "name");
}

fn flatten_aggregation_schema(schema: &mut schemars::Schema) {
    flatten_tagged_schema(schema, "strategy");
}

/// JSON Schema for an internally tagged enum as one object instead of a `oneOf`: the tag is a
/// string enum of every variant's name, the other fields are the union of the variants'
/// fields, and only the fields every variant requires are required. Kubernetes structural
/// schemas (the FederatedJob CRD) cannot express the `oneOf`, whose variants give the tag
/// different values. Parsing is unchanged: serde and [`JobSpec::validate`] still check each
/// variant exactly.
fn flatten_tagged_schema(schema: &mut schemars::Schema, tag: &str) {
    use serde_json::{Map, Value};
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let Some(Value::Array(variants)) = obj.remove("oneOf") else {
        return;
    };
    let mut tags: Vec<Value> = Vec::new();
    let mut properties = Map::new();
    let mut required: Option<Vec<Value>> = None;
    for variant in &variants {
        if let Some(Value::Object(props)) = variant.get("properties") {
            for (name, prop) in props {
                if name == tag {
                    if let Some(value) = prop.get("const") {
                        tags.push(value.clone());
                    } else if let Some(Value::Array(values)) = prop.get("enum") {
                        tags.extend(values.iter().cloned());
                    }
                } else if !properties.contains_key(name) {
                    properties.insert(name.clone(), prop.clone());
                }
            }
        }
        let here: Vec<Value> = match variant.get("required") {
            Some(Value::Array(r)) => r.clone(),
            _ => Vec::new(),
        };
        required = Some(match required {
            None => here,
            Some(before) => before.into_iter().filter(|r| here.contains(r)).collect(),
        });
    }
    properties.insert(
        tag.to_string(),
        serde_json::json!({"type": "string", "enum": tags}),
    );
    obj.insert("type".to_string(), Value::from("object"));
    obj.insert("properties".to_string(), Value::Object(properties));
    obj.insert(
        "required".to_string(),
        Value::Array(required.unwrap_or_default()),
    );
    obj.insert("additionalProperties".to_string(), Value::Bool(false));
}

/// A duration is seconds (an integer) or text such as "60s" or "1m 30s" (see [`de_duration`]).
/// In a Kubernetes structural schema that is `x-kubernetes-int-or-string`.
fn duration_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "seconds (integer) or a duration such as \"60s\"",
        "x-kubernetes-int-or-string": true
    })
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl JobSpec {
    /// Parses YAML or JSON strictly and validates it.
    pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
        if text.trim().is_empty() {
            return Err(SpecError::new("spec", "is empty"));
        }
        let de = serde_yaml::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde_yaml appends " at line L column C"; the field path says more.
            let field = if path == "." || path.is_empty() {
                unknown_field_name(&inner).unwrap_or_else(|| "spec".to_string())
            } else {
                match unknown_field_name(&inner) {
                    Some(f) if path != f && !path.ends_with(&format!(".{f}")) => {
                        format!("{path}.{f}")
                    }
                    _ => path,
                }
            };
            SpecError::new(field, inner)
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Canonical JSON of a validated spec (what is stored and handed on).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// Reads back a spec that was validated before (stored JSON).
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec =
            serde_json::from_str(text).map_err(|e| SpecError::new("spec", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks values and combinations the types alone cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.len() > MAX_JOB_NAME_LEN || !is_dns_label(&self.name) {
            return Err(SpecError::new(
                "name",
                format!(
                    "{:?} must be a DNS-1123 label of at most {MAX_JOB_NAME_LEN} characters \
                     (lower-case letters, digits and '-', starting and ending alphanumeric)",
                    self.name
                ),
            ));
        }
        if !is_dns_label(&self.namespace) {
            return Err(SpecError::new(
                "namespace",
                format!("{:?} must be a DNS-1123 label", self.namespace),
            ));
        }
        match self.model.arch {
            Arch::Mlp => {
                if self.model.hidden.is_empty() {
                    return Err(SpecError::new(
                        "model.hidden",
                        "mlp needs at least one hidden layer, e.g. [128]",
                    ));
                }
                if let Some(i) = self.model.hidden.iter().position(|&h| h == 0 || h > 65_536) {
                    return Err(SpecError::new(
                        format!("model.hidden[{i}]"),
                        "must be between 1 and 65536",
                    ));
                }
            }
            Arch::Logreg | Arch::Cnn => {
                if !self.model.hidden.is_empty() {
                    return Err(SpecError::new(
                        "model.hidden",
                        format!("only mlp takes hidden layers, not {:?}", self.model.arch),
                    ));
                }
            }
        }
        if let Some(init) = &self.model.init {
            parse_model_ref(init).map_err(|m| SpecError::new("model.init", m))?;
        }
        if !is_dns_label(&self.data.dataset) && !is_dataset_name(&self.data.dataset) {
            return Err(SpecError::new(
                "data.dataset",
                format!(
                    "{:?} must be a name of letters, digits, '-', '_' or '.'",
                    self.data.dataset
                ),
            ));
        }
        if self.training.runtime == Runtime::Command {
            return Err(SpecError::new(
                "training.runtime",
                "runtime \"command\" is not supported yet; use \"candle\"",
            ));
        }
        if !(1..=1000).contains(&self.training.epochs) {
            return Err(SpecError::new(
                "training.epochs",
                "must be between 1 and 1000",
            ));
        }
        if !(1..=65_536).contains(&self.training.batch_size) {
            return Err(SpecError::new(
                "training.batch_size",
                "must be between 1 and 65536",
            ));
        }
        let lr = self.training.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0 && lr <= 10.0) {
            return Err(SpecError::new(
                "training.optimizer.lr",
                format!("must be greater than 0 and at most 10, got {lr}"),
            ));
        }
        if let OptimizerSpec::Adam {
            beta1,
            beta2,
            weight_decay,
            ..
        } = &self.training.optimizer
        {
            for (field, v) in [("beta1", beta1), ("beta2", beta2)] {
                if !(v.is_finite() && (0.0..1.0).contains(v)) {
                    return Err(SpecError::new(
                        format!("training.optimizer.{field}"),
                        format!("must be in [0, 1), got {v}"),
                    ));
                }
            }
            if !(weight_decay.is_finite() && *weight_decay >= 0.0) {
                return Err(SpecError::new(
                    "training.optimizer.weight_decay",
                    format!("must be at least 0, got {weight_decay}"),
                ));
            }
        }
        if !(1..=100_000).contains(&self.rounds) {
            return Err(SpecError::new("rounds", "must be between 1 and 100000"));
        }
        let c = &self.clients;
        if !(1..=10_000).contains(&c.per_round) {
            return Err(SpecError::new(
                "clients.per_round",
                "must be between 1 and 10000",
            ));
        }
        if c.min == 0 {
            return Err(SpecError::new("clients.min", "must be at least 1"));
        }
        if c.min > c.per_round {
            return Err(SpecError::new(
                "clients.min",
                format!(
                    "quorum {} is greater than clients.per_round {}: no round could succeed",
                    c.min, c.per_round
                ),
            ));
        }
        if c.selection != Selection::Random {
            return Err(SpecError::new(
                "clients.selection",
                format!(
                    "{:?} is not supported yet; use \"random\"",
                    c.selection.as_str()
                ),
            ));
        }
        if c.round_timeout < Duration::from_secs(1) || c.round_timeout > Duration::from_secs(86_400)
        {
            return Err(SpecError::new(
                "clients.round_timeout",
                "must be between 1s and 24h",
            ));
        }
        if self.aggregation != AggregationSpec::Fedavg {
            return Err(SpecError::new(
                "aggregation.strategy",
                "only \"fedavg\" is supported yet",
            ));
        }
        if self.privacy.secure_aggregation {
            return Err(SpecError::new(
                "privacy.secure_aggregation",
                "secure aggregation is not supported yet",
            ));
        }
        if self.privacy.dp.is_some() {
            return Err(SpecError::new(
                "privacy.dp",
                "differential privacy is not supported yet",
            ));
        }
        if self.compression.is_some() {
            return Err(SpecError::new(
                "compression",
                "compression is not supported yet",
            ));
        }
        if self.evaluation.every == 0 || self.evaluation.every > self.rounds {
            return Err(SpecError::new(
                "evaluation.every",
                format!("must be between 1 and rounds ({})", self.rounds),
            ));
        }
        if let Some(t) = self.stop.target_accuracy
            && !(t.is_finite() && t > 0.0 && t <= 1.0)
        {
            return Err(SpecError::new(
                "stop.target_accuracy",
                format!("must be in (0, 1], got {t}"),
            ));
        }
        Ok(())
    }
}

fn is_dataset_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Splits "name@version" (version ≥ 1).
pub fn parse_model_ref(s: &str) -> Result<(String, u32), String> {
    let (name, ver) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?} must be \"model-name@version\""))?;
    if !is_dns_label(name) {
        return Err(format!("model name {name:?} must be a DNS-1123 label"));
    }
    let v: u32 = ver
        .parse()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| format!("version {ver:?} must be a positive integer"))?;
    Ok((name.to_string(), v))
}

/// serde reports an unknown field as "unknown field `x`, expected ...".
fn unknown_field_name(message: &str) -> Option<String> {
    let start = message.find("unknown field `")? + "unknown field `".len();
    let rest = &message[start..];
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: digits-fedavg
model: {arch: mlp, hidden: [128]}
data: {dataset: digits}
training:
  epochs: 2
  optimizer: {name: sgd, lr: 0.05}
rounds: 5
clients: {per_round: 3, min: 2, round_timeout: 30s}
"#;

    fn err_field(text: &str) -> String {
        match JobSpec::parse(text) {
            Ok(_) => panic!("spec was accepted"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn good_spec_parses_with_defaults() {
        let spec = JobSpec::parse(GOOD).expect("valid");
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.clients.round_timeout, Duration::from_secs(30));
        assert_eq!(spec.aggregation, AggregationSpec::Fedavg);
        assert_eq!(spec.training.batch_size, 32);
        let back = JobSpec::from_json(&spec.to_json()).expect("round trip");
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let f = err_field(&GOOD.replace("epochs: 2", "epochs: 2\n  epoch_count: 3"));
        assert_eq!(f, "training.epoch_count");
        let f = err_field(&format!("{GOOD}\nbogus: 1\n"));
        assert_eq!(f, "bogus");
        let f = err_field(&GOOD.replace("lr: 0.05", "lr: 0.05, momentum: 0.9"));
        assert_eq!(f, "training.optimizer.momentum");
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            err_field(&GOOD.replace("lr: 0.05", "lr: -0.1")),
            "training.optimizer.lr"
        );
        assert_eq!(err_field(&GOOD.replace("min: 2", "min: 4")), "clients.min");
        assert_eq!(
            err_field(&GOOD.replace("digits-fedavg", "Digits_FedAvg")),
            "name"
        );
        assert_eq!(
            err_field(&GOOD.replace("round_timeout: 30s", "round_timeout: soon")),
            "clients.round_timeout"
        );
        assert_eq!(
            err_field(&GOOD.replace("arch: mlp, hidden: [128]", "arch: logreg, hidden: [3]")),
            "model.hidden"
        );
        assert_eq!(
            err_field(&GOOD.replace("rounds: 5", "rounds: -1")),
            "rounds"
        );
        assert_eq!(
            err_field(&GOOD.replace("sgd", "rmsprop")),
            "training.optimizer.name"
        );
    }

    #[test]
    fn missing_required_field_is_named() {
        let f = err_field(&GOOD.replace("data: {dataset: digits}\n", ""));
        assert!(f == "spec" || f == "data", "{f}");
        let e = JobSpec::parse(&GOOD.replace("data: {dataset: digits}\n", "")).unwrap_err();
        assert!(e.message.contains("data"), "{e}");
    }

    #[test]
    fn tagged_enum_schemas_are_one_object() {
        let schema = serde_json::to_value(schemars::schema_for!(OptimizerSpec)).expect("json");
        assert!(schema.get("oneOf").is_none(), "{schema}");
        assert_eq!(schema["type"], "object");
        assert_eq!(
            schema["properties"]["name"],
            serde_json::json!({"type": "string", "enum": ["sgd", "adam"]})
        );
        assert_eq!(schema["required"], serde_json::json!(["name", "lr"]));
        let schema = serde_json::to_value(schemars::schema_for!(AggregationSpec)).expect("json");
        assert_eq!(schema["required"], serde_json::json!(["strategy"]));
        assert_eq!(
            schema["properties"]["strategy"]["enum"],
            serde_json::json!([
                "fedavg",
                "fedprox",
                "fedadam",
                "fedyogi",
                "fedadagrad",
                "scaffold",
                "median",
                "trimmed_mean",
                "krum"
            ])
        );
        for field in ["mu", "beta", "f"] {
            assert!(
                schema["properties"].get(field).is_some(),
                "{field}: {schema}"
            );
        }
    }

    #[test]
    fn model_refs() {
        assert_eq!(parse_model_ref("m@3"), Ok(("m".to_string(), 3)));
        assert!(parse_model_ref("m").is_err());
        assert!(parse_model_ref("m@0").is_err());
    }
}
