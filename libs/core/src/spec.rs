//! The job spec (DESIGN §3): parsed strictly from YAML or JSON, then validated.
//!
//! Parsing rejects unknown fields and wrong types; [`JobSpec::validate`] rejects bad
//! values and impossible combinations. Both name the field at fault.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::is_dns_label;

pub mod command;
pub use command::AllowedCommands;

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

    /// Ends the message with "(line L)" when the line is known.
    fn with_line(mut self, line: Option<usize>) -> Self {
        if let Some(line) = line {
            self.message = format!("{} (line {line})", self.message);
        }
        self
    }

    /// The 1-based line of the key at dotted `path` in YAML or JSON `text`. Each segment is
    /// looked for inside its parent's value (a flow `{...}`/`[...]` or an indented block), so a
    /// same-named key elsewhere is not taken for it.
    fn key_line(text: &str, path: &str) -> Option<usize> {
        let mut scope = 0..text.len();
        let mut found = None;
        for segment in path.split('.') {
            // "hidden[0]": the line of `hidden` is as close as a key gets.
            let key = segment.split('[').next().unwrap_or(segment);
            if key.is_empty() {
                return None;
            }
            let (start, end) = SpecError::find_key(&text[scope.clone()], key)?;
            let (start, end) = (scope.start + start, scope.start + end);
            found = Some(start);
            scope = end..SpecError::value_end(text, start, end, scope.end);
        }
        found.map(|at| text[..at].matches('\n').count() + 1)
    }

    /// Where `key` first stands as a mapping key in `hay` (after a line start, blank, `{`,
    /// `,` or `- `, optionally quoted, followed by `:`): its start and end, quotes included.
    fn find_key(hay: &str, key: &str) -> Option<(usize, usize)> {
        hay.match_indices(key).find_map(|(at, _)| {
            let before = &hay[..at];
            let (start, quote) = match before.chars().last() {
                Some(q @ ('"' | '\'')) => (at - 1, Some(q)),
                _ => (at, None),
            };
            let boundary = hay[..start]
                .chars()
                .last()
                .is_none_or(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-'));
            let mut end = at + key.len();
            if let Some(q) = quote {
                end += hay[end..].strip_prefix(q).map(|_| q.len_utf8())?;
            }
            let colon = hay[end..].trim_start_matches([' ', '\t']).starts_with(':');
            (boundary && colon).then_some((start, end))
        })
    }

    /// Where the value of the key at `start..end` ends (at most `limit`): its closing bracket
    /// for a flow collection, else before the next line indented no deeper than the key.
    fn value_end(text: &str, start: usize, end: usize, limit: usize) -> usize {
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[end..].find('\n').map_or(text.len(), |i| end + i);
        let rest = &text[end..line_end];
        let value = rest
            .find(':')
            .map_or("", |i| rest[i + 1..].trim_start_matches([' ', '\t']));
        // `value` is a suffix of the key's line.
        let open = line_end - value.len();
        if value.starts_with(['{', '[']) && open < limit {
            let (mut depth, mut quote, mut escaped) = (0usize, None, false);
            for (i, c) in text[open..limit].char_indices() {
                match (quote, c) {
                    (Some('"'), '\\') if !escaped => {
                        escaped = true;
                        continue;
                    }
                    (Some(q), c) if c == q && !escaped => quote = None,
                    (Some(_), _) => {}
                    (None, '"' | '\'') => quote = Some(c),
                    (None, '{' | '[') => depth += 1,
                    (None, '}' | ']') => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return open + i + 1;
                        }
                    }
                    _ => {}
                }
                escaped = false;
            }
            return limit;
        }
        let indent = start - line_start;
        let mut pos = (line_end + 1).min(limit);
        while pos < limit {
            let end = text[pos..limit].find('\n').map_or(limit, |i| pos + i);
            let line = &text[pos..end];
            let content = line.trim_start();
            if !content.is_empty()
                && !content.starts_with('#')
                && line.len() - content.len() <= indent
            {
                return pos;
            }
            pos = end + 1;
        }
        limit
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
    /// Fixes the initial weights, the parties' data order and the demo's split: the same
    /// seed gives the same model. None: a seed derived from the job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
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
    /// No training: `model.params` float32 parameters in `model.layers` tensors, and
    /// updates of a known pattern (`cohort_fl::synthetic`), to measure the federation's
    /// machinery (`cohort bench round`). Parties serve it from a dataset of format
    /// `synthetic`.
    Synthetic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Hidden layer widths (mlp only).
    #[serde(default)]
    pub hidden: Vec<u32>,
    /// Initial weights: "model-name@version" from model-manager, in the job's namespace.
    #[serde(default)]
    pub init: Option<String>,
    /// The model the job's versions are stored as, in the job's namespace. None: the job's
    /// id, so no two jobs share a model; name an existing model to continue it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parameters of a synthetic model (synthetic only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<u64>,
    /// Tensors a synthetic model's parameters are split into (synthetic only; default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<u32>,
}

/// Most parameters a synthetic model may have (what an executor accepts).
pub const MAX_SYNTHETIC_PARAMS: u64 = 1 << 30;
/// Most tensors a synthetic model may have.
pub const MAX_SYNTHETIC_LAYERS: u32 = 1024;

impl ModelSpec {
    /// The synthetic model's (parameters, tensors), for `arch: synthetic`.
    pub fn synthetic(&self) -> Option<(u64, u32)> {
        (self.arch == Arch::Synthetic).then(|| (self.params.unwrap_or(0), self.layers.unwrap_or(4)))
    }
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

/// Where a party trains (`training.device`). `cuda` is a placement constraint: the job's
/// offers go only to parties that report a GPU, and an executor built without CUDA refuses
/// the task. `auto` trains on a GPU when the executor is built with CUDA and one opens, on
/// the CPU otherwise.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TrainingDevice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl TrainingDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            TrainingDevice::Auto => "auto",
            TrainingDevice::Cpu => "cpu",
            TrainingDevice::Cuda => "cuda",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    #[serde(default)]
    pub runtime: Runtime,
    /// `runtime: command`: the program and its arguments a party runs to train or
    /// evaluate (argv, no shell), if its task-manager allows it (`--allowed-commands`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// `auto` (default), `cpu` or `cuda`.
    #[serde(default)]
    pub device: TrainingDevice,
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
            command: None,
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            optimizer: OptimizerSpec::default(),
            device: TrainingDevice::Auto,
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

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    Fedavg,
    Fedavgm,
    Fedprox,
    Fedadam,
    Fedyogi,
    Fedadagrad,
    Scaffold,
    Median,
    TrimmedMean,
    Krum,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Fedavg => "fedavg",
            Strategy::Fedavgm => "fedavgm",
            Strategy::Fedprox => "fedprox",
            Strategy::Fedadam => "fedadam",
            Strategy::Fedyogi => "fedyogi",
            Strategy::Fedadagrad => "fedadagrad",
            Strategy::Scaffold => "scaffold",
            Strategy::Median => "median",
            Strategy::TrimmedMean => "trimmed_mean",
            Strategy::Krum => "krum",
        }
    }
}

/// What happens to an update whose L2 norm exceeds `aggregation.max_update_norm`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NormAction {
    /// Scaled down to the bound, then aggregated.
    #[default]
    Clip,
    /// Left out of the aggregate (counted, with the reason, in the job's log).
    Refuse,
}

impl NormAction {
    fn is_default(&self) -> bool {
        *self == NormAction::Clip
    }
}

/// How updates become the next global model, and how much one party's word may weigh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregationSpec {
    #[serde(default)]
    pub strategy: Strategy,
    /// fedprox: weight μ of the proximal term μ/2·‖w − w_global‖² added to each party's
    /// local loss, in [0, 10] (default 0.01: a mild pull toward the round's global model
    /// that limits client drift on skewed data without slowing training much; FedProx's
    /// authors tune μ over {0.001, 0.01, 0.1, 1}). 0 trains exactly as fedavg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mu: Option<f64>,
    /// trimmed_mean: the fraction of values cut at each end of every coordinate, in
    /// [0, 0.5) (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// krum: how many Byzantine parties to tolerate (default 1); every round needs at
    /// least 2f + 3 updates, so `clients.min` must be that large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<u32>,
    /// krum: how many of the best-scored updates are averaged (default 1: Krum; more:
    /// multi-Krum), at most `clients.min` − f.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<u32>,
    /// The server's learning rate η, in (0, 10]: fedadam, fedyogi (default 0.1),
    /// fedadagrad (default 0.3, as its steps shrink while its second moment only grows),
    /// fedavgm and scaffold (default 1: the mean update taken whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lr: Option<f64>,
    /// fedavgm: the server momentum β in [0, 1) (default 0.9): the step is
    /// `v ← βv + Δ; x ← x + ηv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// fedadam, fedyogi, fedadagrad: decay of the server's first moment, in [0, 1)
    /// (default 0.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// fedadam, fedyogi: decay of the server's second moment, in [0, 1) (default 0.99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// fedadam, fedyogi, fedadagrad: the adaptivity τ added to the second moment's root,
    /// > 0 (default 1e-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// No party's weight in a round's aggregate (and evaluation) exceeds this share of
    /// the total, in (0, 1]. Weights start from the samples each party registered for the
    /// dataset when the job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight_share: Option<f64>,
    /// Largest L2 norm an update may have; see `norm_action`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_update_norm: Option<f64>,
    /// `clip` (default) or `refuse` updates over `max_update_norm`.
    #[serde(default, skip_serializing_if = "NormAction::is_default")]
    pub norm_action: NormAction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// Secure aggregation (SecAgg with dropout recovery, `cohort-secagg`): each party clips
    /// its update to `secagg_clip`, encodes it into Z/2^32 and masks it; the coordinator
    /// sums masked updates and learns only the unweighted mean of at least
    /// `secagg_threshold` parties, never one party's update.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// t: the fewest parties whose masked inputs make a round, and the fewest holders of a
    /// party's shares (the party and its neighbours) that must survive to unmask it. At
    /// least 2, more than half the holders, at most `clients.min`. Default ⌊holders ÷ 2⌋ + 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg_threshold: Option<u32>,
    /// k: how many other parties each party shares its mask secrets with and masks with
    /// (SecAgg+'s sparse graph, a ring with k/2 on either side); even, ≥ 2; k ≥ per_round − 1
    /// is SecAgg's complete graph. Default: the complete graph up to 10 parties a round,
    /// 2⌈log₂ per_round⌉ + 2 above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg_neighbours: Option<u32>,
    /// The L2 norm each party clips its update to before masking, > 0. Default:
    /// `privacy.dp.clip`, else `aggregation.max_update_norm`; one of them is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg_clip: Option<f64>,
    #[serde(default)]
    pub dp: Option<DpSpec>,
}

/// What a valid spec's secure aggregation asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureAggregation {
    pub threshold: u32,
    /// k, the masking graph's degree; 0: the complete graph.
    pub neighbours: u32,
    /// The L2 norm each party clips its update to.
    pub clip: f32,
    /// With `privacy.dp`: the standard deviation of the Gaussian noise each party adds to
    /// every value after clipping, z·clip/√clients.min, so that the sum of the fewest
    /// parties a round releases (clients.min ≥ t) carries the central noise N(0, (z·clip)²)
    /// (`cohort_fl::privacy::distributed_noise_std`). 0 without DP.
    pub noise_std: f64,
    /// What the unmasked sum is divided by: `clients.per_round` under DP (the fixed
    /// denominator of DP-FedAvg), None for the number of updates summed.
    pub denominator: Option<u32>,
}

impl SecureAggregation {
    /// Noise beyond this many standard deviations is clamped by the encoding.
    pub const NOISE_RANGE_SIGMAS: f64 = 8.0;

    /// The largest |value| the fixed-point encoding represents: the clip, plus room for the
    /// parties' noise under DP (a clipped value lies in [−clip, clip]; the noise's tail past
    /// 8σ, about 1e-15 of the values, is clamped).
    pub fn range(&self) -> f32 {
        (f64::from(self.clip) + Self::NOISE_RANGE_SIGMAS * self.noise_std) as f32
    }
}

/// Cohorts up to this size mask over the complete graph by default.
const SECAGG_COMPLETE_UP_TO: u32 = 10;

impl PrivacySpec {
    /// k: the spec's, or the default for `per_round` (0: the complete graph).
    fn secagg_neighbours_for(&self, clients: &ClientsSpec) -> u32 {
        let n = clients.per_round;
        let k = match self.secagg_neighbours {
            Some(k) => k,
            None if n <= SECAGG_COMPLETE_UP_TO => 0,
            None => 2 * (32 - (n - 1).leading_zeros()) + 2,
        };
        if k + 1 >= n { 0 } else { k }
    }

    /// Holders of one party's shares in a full round: the party and its k neighbours.
    fn secagg_holders_for(&self, clients: &ClientsSpec) -> u32 {
        match self.secagg_neighbours_for(clients) {
            0 => clients.per_round,
            k => k + 1,
        }
    }

    /// The threshold t: the spec's or ⌊holders ÷ 2⌋ + 1.
    fn secagg_threshold_for(&self, clients: &ClientsSpec) -> u32 {
        self.secagg_threshold
            .unwrap_or(self.secagg_holders_for(clients) / 2 + 1)
    }

    /// Checks secure aggregation's fields and its fit with the rest of the spec, naming the
    /// field at fault.
    fn validate_secagg(&self, spec: &JobSpec) -> Result<(), SpecError> {
        let field = "privacy.secure_aggregation";
        if !self.secure_aggregation {
            for (set, name) in [
                (self.secagg_threshold.is_some(), "privacy.secagg_threshold"),
                (
                    self.secagg_neighbours.is_some(),
                    "privacy.secagg_neighbours",
                ),
                (self.secagg_clip.is_some(), "privacy.secagg_clip"),
            ] {
                if set {
                    return Err(SpecError::new(
                        name,
                        "is only read with privacy.secure_aggregation: true",
                    ));
                }
            }
            return Ok(());
        }
        let c = &spec.clients;
        if let Some(k) = self.secagg_neighbours
            && (k < 2 || k % 2 != 0)
        {
            return Err(SpecError::new(
                "privacy.secagg_neighbours",
                format!("must be an even number of at least 2 (half on either side), got {k}"),
            ));
        }
        let t = self.secagg_threshold_for(c);
        let holders = self.secagg_holders_for(c);
        let how = if self.secagg_threshold.is_some() {
            "privacy.secagg_threshold"
        } else {
            "privacy.secagg_threshold (default ⌊holders ÷ 2⌋ + 1)"
        };
        if t < 2 {
            return Err(SpecError::new(
                "privacy.secagg_threshold",
                format!("must be at least 2 (the sum of one party is its update), got {t}"),
            ));
        }
        let holders_are = if holders == c.per_round {
            "clients.per_round".to_string()
        } else {
            format!(
                "a party and its {} neighbours (privacy.secagg_neighbours)",
                holders - 1
            )
        };
        if 2 * t <= holders {
            return Err(SpecError::new(
                "privacy.secagg_threshold",
                format!(
                    "must be more than half the {holders} holders of a party's shares \
                     ({holders_are}), got {t}: with t ≤ holders/2 two disjoint groups of \
                     survivors could each reveal one of a party's two mask secrets"
                ),
            ));
        }
        if t > holders {
            return Err(SpecError::new(
                "privacy.secagg_threshold",
                format!(
                    "{how} is {t}, more than the {holders} holders of a party's shares \
                     ({holders_are})"
                ),
            ));
        }
        if t > c.min {
            return Err(SpecError::new(
                "privacy.secagg_threshold",
                format!(
                    "{how} is {t}, more than clients.min ({}): give clients.min at least t, \
                     or a smaller threshold",
                    c.min
                ),
            ));
        }
        let a = &spec.aggregation;
        let dp_clip = self.dp.as_ref().map(|dp| dp.clip);
        let clip = match (self.secagg_clip, dp_clip, a.max_update_norm) {
            (Some(clip), _, _) => clip,
            (None, Some(clip), _) => clip,
            (None, None, Some(norm)) => norm,
            (None, None, None) => {
                return Err(SpecError::new(
                    "privacy.secagg_clip",
                    "secure aggregation needs an L2 bound each party clips its update to \
                     before masking: give privacy.secagg_clip (or aggregation.max_update_norm)",
                ));
            }
        };
        let clip_field = match (self.secagg_clip, dp_clip) {
            (Some(_), _) => "privacy.secagg_clip",
            (None, Some(_)) => "privacy.dp.clip",
            (None, None) => "aggregation.max_update_norm",
        };
        if !(clip.is_finite() && clip > 0.0 && clip <= 1e30) {
            return Err(SpecError::new(
                clip_field,
                format!("must be a positive finite number, got {clip}"),
            ));
        }
        if a.max_update_norm.is_some() && a.norm_action == NormAction::Refuse {
            return Err(SpecError::new(
                "aggregation.norm_action",
                "refuse cannot be combined with privacy.secure_aggregation: the coordinator \
                 never sees one party's update, so it cannot refuse one; parties clip instead",
            ));
        }
        if matches!(
            a.strategy,
            Strategy::Median | Strategy::TrimmedMean | Strategy::Krum
        ) {
            return Err(SpecError::new(
                field,
                format!(
                    "cannot be combined with aggregation.strategy {:?}: a median, a trimmed \
                     mean or Krum needs the individual updates, and secure aggregation reveals \
                     only their sum",
                    a.strategy.as_str()
                ),
            ));
        }
        if a.strategy == Strategy::Scaffold {
            return Err(SpecError::new(
                field,
                "cannot be combined with aggregation.strategy \"scaffold\": its control \
                 variates would be clipped together with the model update",
            ));
        }
        if a.max_weight_share.is_some() {
            return Err(SpecError::new(
                "aggregation.max_weight_share",
                "under privacy.secure_aggregation every update weighs the same (the masked \
                 sum has no weights); leave it out",
            ));
        }
        if let Some(dp) = &self.dp {
            if dp.local {
                return Err(SpecError::new(
                    "privacy.dp.local",
                    "with privacy.secure_aggregation the parties already add the noise, \
                     split among them (each z·clip/√clients.min); leave local out",
                ));
            }
            if self.secagg_clip.is_some_and(|c| c != dp.clip) {
                return Err(SpecError::new(
                    "privacy.secagg_clip",
                    format!(
                        "under privacy.dp the parties clip to privacy.dp.clip ({}); leave \
                         secagg_clip out or make it the same",
                        dp.clip
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Secure aggregation's threshold and clip, when the (validated) spec asks for it.
    fn secagg_for(
        &self,
        clients: &ClientsSpec,
        max_update_norm: Option<f64>,
    ) -> Option<SecureAggregation> {
        if !self.secure_aggregation {
            return None;
        }
        let dp = self.dp.as_ref();
        let clip = self
            .secagg_clip
            .or(dp.map(|dp| dp.clip))
            .or(max_update_norm)?;
        Some(SecureAggregation {
            threshold: self.secagg_threshold_for(clients),
            neighbours: self.secagg_neighbours_for(clients),
            clip: clip as f32,
            noise_std: dp.map_or(0.0, |dp| {
                dp.noise_multiplier * dp.clip / f64::from(clients.min.max(1)).sqrt()
            }),
            denominator: dp.map(|_| clients.per_round),
        })
    }
}

/// Differential privacy of the job's releases (DP-FedAvg): every update clipped to `clip`,
/// summed with weight 1, Gaussian noise of deviation `noise_multiplier × clip` added to the
/// sum, divided by `clients.per_round`. The guarantee is user-level (a user is a party), at
/// `delta`, accounted for round by round (`cohort_fl::privacy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpSpec {
    /// The L2 norm every update is clipped to, > 0: the sum's sensitivity to one party.
    pub clip: f64,
    /// z ≥ 0: the noise's standard deviation is z × clip. 0 clips without noise (no
    /// guarantee: ε is infinite).
    pub noise_multiplier: f64,
    /// The δ of the (ε, δ) guarantee, in (0, 1); well below 1 ÷ the number of parties.
    pub delta: f64,
    /// Stop the job before a round would take ε (at `delta`) over this budget, > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// Local DP, for parties that do not trust the server: each party clips its update to
    /// `clip` and adds the noise N(0, (z × clip)²) itself before sending; the coordinator
    /// adds none. The sum then carries the noise of every party (more than the central
    /// mechanism's), and each update alone is private toward the server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

impl DpSpec {
    /// Checks each value and its fit with the rest of the spec.
    fn validate(&self, spec: &JobSpec) -> Result<(), SpecError> {
        let bad = |field: &str, message: String| {
            Err(SpecError::new(format!("privacy.dp.{field}"), message))
        };
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip <= f64::from(f32::MAX)) {
            return bad(
                "clip",
                format!("must be a positive finite number, got {}", self.clip),
            );
        }
        let z = self.noise_multiplier;
        if !(z.is_finite() && z >= 0.0) {
            return bad(
                "noise_multiplier",
                format!("must be a finite number of at least 0, got {z}"),
            );
        }
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) {
            return bad("delta", format!("must be in (0, 1), got {}", self.delta));
        }
        if let Some(t) = self.target_epsilon {
            if !(t.is_finite() && t > 0.0) {
                return bad(
                    "target_epsilon",
                    format!("must be a positive finite number, got {t}"),
                );
            }
            if z == 0.0 {
                return bad(
                    "target_epsilon",
                    "without noise (noise_multiplier 0) one round already spends an infinite \
                     ε; give a noise_multiplier above 0"
                        .to_string(),
                );
            }
        }
        let a = &spec.aggregation;
        if matches!(
            a.strategy,
            Strategy::Median | Strategy::TrimmedMean | Strategy::Krum
        ) {
            return Err(SpecError::new(
                "aggregation.strategy",
                format!(
                    "{:?} cannot be combined with privacy.dp: the Gaussian noise covers one \
                     party's effect on a sum of clipped updates (clip), while a median, a \
                     trimmed mean or Krum's pick moves with one party by more than that",
                    a.strategy.as_str()
                ),
            ));
        }
        if a.max_weight_share.is_some() {
            return Err(SpecError::new(
                "aggregation.max_weight_share",
                "under privacy.dp every update weighs the same (weights by samples would let \
                 one party move the sum by more than clip); leave it out",
            ));
        }
        if a.max_update_norm.is_some() && !self.local {
            return Err(SpecError::new(
                "aggregation.max_update_norm",
                "under privacy.dp every update is clipped to privacy.dp.clip; leave it out",
            ));
        }
        if spec.model.arch == Arch::Synthetic {
            return Err(SpecError::new(
                "privacy.dp",
                "the synthetic workload's results are checked against the exact average, \
                 which noise would change",
            ));
        }
        Ok(())
    }
}

/// How parties compress their updates on the wire: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompressionSpec {
    /// Stochastic quantisation to 8 or 4 bits per value, one scale per chunk (unbiased).
    #[serde(default)]
    pub quantize_bits: Option<u32>,
    /// Top-k sparsification: the fraction in (0, 1] of each tensor's values a party sends
    /// (the largest in size); what it leaves out is added to its next update (error
    /// feedback).
    #[serde(default)]
    pub top_k: Option<f64>,
}

/// What a valid `compression` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compression {
    /// 8 or 4 bits per value.
    Quantize { bits: u8 },
    /// The fraction of each tensor's values sent, in (0, 1].
    TopK { fraction: f64 },
}

impl CompressionSpec {
    /// The method asked for, or why it is refused (naming the field).
    pub fn method(&self) -> Result<Compression, SpecError> {
        match (self.quantize_bits, self.top_k) {
            (Some(_), Some(_)) => Err(SpecError::new(
                "compression",
                "give quantize_bits or top_k, not both",
            )),
            (None, None) => Err(SpecError::new(
                "compression",
                "give quantize_bits (8 or 4) or top_k (a fraction in (0, 1]), or leave \
                 compression out",
            )),
            (Some(bits @ (4 | 8)), None) => Ok(Compression::Quantize { bits: bits as u8 }),
            (Some(bits), None) => Err(SpecError::new(
                "compression.quantize_bits",
                format!("must be 4 or 8, got {bits}"),
            )),
            (None, Some(f)) if f.is_finite() && f > 0.0 && f <= 1.0 => {
                Ok(Compression::TopK { fraction: f })
            }
            (None, Some(f)) => Err(SpecError::new(
                "compression.top_k",
                format!("must be a fraction in (0, 1], got {f}"),
            )),
        }
    }
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
            // A syntax error stops inside a key not yet read: a "?" segment.
            let syntax = e
                .path()
                .iter()
                .any(|s| matches!(s, serde_path_to_error::Segment::Unknown));
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location = inner.location();
            let mut problem = inner.to_string();
            let unknown = unknown_field_name(&problem);
            let known: Vec<&str> = path
                .split('.')
                .filter(|s| !s.is_empty() && *s != "?")
                .collect();
            let field = match (known.is_empty(), &unknown) {
                (true, None) => "spec".to_string(),
                (true, Some(f)) => f.clone(),
                (false, Some(f)) if known.last() != Some(&f.as_str()) => {
                    format!("{}.{f}", known.join("."))
                }
                (false, _) => known.join("."),
            };
            // serde_yaml words it "[its path: ]problem at line L column C", and its path and
            // location can be off for nested fields: say the field once, and find the line.
            if let Some(l) = &location {
                problem = problem.replacen(
                    &format!(" at line {} column {}", l.line(), l.column()),
                    "",
                    1,
                );
            }
            if let Some((prefix, rest)) = problem.split_once(": ")
                && (field == prefix
                    || field.starts_with(&format!("{prefix}."))
                    || field.starts_with(&format!("{prefix}[")))
            {
                problem = rest.to_string();
            }
            if let Some(f) = &unknown {
                problem = problem.replacen(&format!("unknown field `{f}`"), "unknown field", 1);
            }
            // A syntax error is where libyaml stopped; otherwise the key's line is surer.
            let line = match syntax {
                true => None,
                false => SpecError::key_line(text, &field),
            };
            SpecError::new(field, problem).with_line(line.or(location.map(|l| l.line())))
        })?;
        spec.validate().map_err(|e| {
            let line = SpecError::key_line(text, &e.field);
            e.with_line(line)
        })?;
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
            Arch::Logreg | Arch::Cnn | Arch::Synthetic => {
                if !self.model.hidden.is_empty() {
                    return Err(SpecError::new(
                        "model.hidden",
                        format!("only mlp takes hidden layers, not {:?}", self.model.arch),
                    ));
                }
            }
        }
        if self.model.arch == Arch::Synthetic {
            match self.model.params {
                None => {
                    return Err(SpecError::new(
                        "model.params",
                        "a synthetic model needs its number of parameters",
                    ));
                }
                Some(p) if !(1..=MAX_SYNTHETIC_PARAMS).contains(&p) => {
                    return Err(SpecError::new(
                        "model.params",
                        format!("must be between 1 and {MAX_SYNTHETIC_PARAMS}, got {p}"),
                    ));
                }
                Some(_) => {}
            }
            if let Some(l) = self.model.layers
                && !(1..=MAX_SYNTHETIC_LAYERS).contains(&l)
            {
                return Err(SpecError::new(
                    "model.layers",
                    format!("must be between 1 and {MAX_SYNTHETIC_LAYERS}, got {l}"),
                ));
            }
            if self.stop.target_accuracy.is_some() {
                return Err(SpecError::new(
                    "stop.target_accuracy",
                    "a synthetic model is not evaluated, so it has no accuracy to stop at",
                ));
            }
        } else {
            for (field, set) in [
                ("model.params", self.model.params.is_some()),
                ("model.layers", self.model.layers.is_some()),
            ] {
                if set {
                    return Err(SpecError::new(
                        field,
                        format!("only a synthetic model takes it, not {:?}", self.model.arch),
                    ));
                }
            }
        }
        if let Some(init) = &self.model.init {
            parse_model_ref(init).map_err(|m| SpecError::new("model.init", m))?;
        }
        if let Some(name) = &self.model.name
            && !is_dns_label(name)
        {
            return Err(SpecError::new(
                "model.name",
                format!("{name:?} must be a DNS-1123 label"),
            ));
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
        self.validate_command()?;
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
        if c.round_timeout < Duration::from_secs(1) || c.round_timeout > Duration::from_secs(86_400)
        {
            return Err(SpecError::new(
                "clients.round_timeout",
                "must be between 1s and 24h",
            ));
        }
        self.aggregation.validate()?;
        self.aggregation.validate_with(&self.clients)?;
        if self.aggregation.strategy == Strategy::Scaffold {
            // Option II's c_i⁺ = c_i − c + (x − y)/(K·lr) reads the local steps as lr × the
            // corrected gradient; adam's steps are not, so its control variates would be
            // wrong in scale and direction.
            if matches!(self.training.optimizer, OptimizerSpec::Adam { .. }) {
                return Err(SpecError::new(
                    "training.optimizer",
                    "scaffold needs sgd: its control variates are estimated from the sgd \
                     steps taken (x − y)/(K·lr), which adam's steps are not",
                ));
            }
            if self.model.arch == Arch::Synthetic {
                return Err(SpecError::new(
                    "aggregation.strategy",
                    "the synthetic workload trains nothing, so it has no control variates \
                     for scaffold",
                ));
            }
        }
        if let Some(compression) = &self.compression {
            compression.method()?;
            if self.model.arch == Arch::Synthetic {
                return Err(SpecError::new(
                    "compression",
                    "the synthetic workload's updates are sent as they are: its results are \
                     checked against the exact average",
                ));
            }
            if self.privacy.secure_aggregation {
                return Err(SpecError::new(
                    "compression",
                    "cannot be combined with privacy.secure_aggregation: masked updates are \
                     summed as integers modulo 2^32, which quantised or sparse values would \
                     not survive",
                ));
            }
        }
        self.privacy.validate_secagg(self)?;
        if let Some(dp) = &self.privacy.dp {
            dp.validate(self)?;
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

/// The server optimiser of fedadam, fedyogi and fedadagrad (Reddi et al., "Adaptive
/// Federated Optimization", 2021, Algorithm 2), with the spec's values or the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerOptimizer {
    pub rule: SecondMoment,
    pub server_lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

/// How the server's second moment follows the squared mean update Δ².
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondMoment {
    /// v ← β₂v + (1−β₂)Δ²
    Adam,
    /// v ← v − (1−β₂)Δ² sign(v − Δ²)
    Yogi,
    /// v ← v + Δ²
    Adagrad,
}

impl AggregationSpec {
    pub const DEFAULT_SERVER_LR: f64 = 0.1;
    /// fedavgm and scaffold take the round's mean update whole (Hsu et al. 2019;
    /// Karimireddy et al. 2020).
    pub const DEFAULT_MEAN_SERVER_LR: f64 = 1.0;
    pub const DEFAULT_MOMENTUM: f64 = 0.9;
    /// FedAdagrad's second moment only grows, so its steps shrink round after round: with
    /// η = 0.1 a 15-round digits job reached 0.81, with 0.3 0.94 (fedadam and fedyogi 0.95
    /// with 0.1).
    pub const DEFAULT_ADAGRAD_SERVER_LR: f64 = 0.3;
    pub const DEFAULT_BETA1: f64 = 0.9;
    pub const DEFAULT_BETA2: f64 = 0.99;
    pub const DEFAULT_TAU: f64 = 1e-3;
    /// fedprox's μ when the spec leaves it out (see [`AggregationSpec::mu`]).
    pub const DEFAULT_MU: f64 = 0.01;
    /// The largest μ accepted: beyond it the proximal pull dominates any loss and, with
    /// sgd at lr·μ > 2, the local steps oscillate around the global model.
    pub const MAX_MU: f64 = 10.0;
    pub const DEFAULT_TRIM: f64 = 0.1;
    pub const DEFAULT_KRUM_F: u32 = 1;
    pub const DEFAULT_KRUM_M: u32 = 1;

    /// Krum's f and m with their defaults.
    pub fn krum(&self) -> (u32, u32) {
        (
            self.f.unwrap_or(Self::DEFAULT_KRUM_F),
            self.m.unwrap_or(Self::DEFAULT_KRUM_M),
        )
    }

    /// Checks what depends on the round's size: Krum needs 2f + 3 updates in every round
    /// that completes, and m of them left once f are discounted.
    fn validate_with(&self, clients: &ClientsSpec) -> Result<(), SpecError> {
        if self.strategy != Strategy::Krum {
            return Ok(());
        }
        let (f, m) = self.krum();
        let least = 2 * u64::from(f) + 3;
        if u64::from(clients.min) < least {
            return Err(SpecError::new(
                "aggregation.f",
                format!(
                    "krum with f = {f} needs at least 2f + 3 = {least} updates a round, \
                     but clients.min is {}",
                    clients.min
                ),
            ));
        }
        if m == 0 || m > clients.min - f {
            return Err(SpecError::new(
                "aggregation.m",
                format!(
                    "must be between 1 and clients.min − f = {}, got {m}",
                    clients.min - f
                ),
            ));
        }
        Ok(())
    }

    /// The weight μ of the proximal term each party adds to its local loss: the spec's or
    /// the default for fedprox; None for every other strategy.
    pub fn proximal_mu(&self) -> Option<f64> {
        (self.strategy == Strategy::Fedprox).then(|| self.mu.unwrap_or(Self::DEFAULT_MU))
    }

    /// The server's learning rate and momentum for fedavgm; None for other strategies.
    pub fn server_momentum(&self) -> Option<(f64, f64)> {
        (self.strategy == Strategy::Fedavgm).then(|| {
            (
                self.server_lr.unwrap_or(Self::DEFAULT_MEAN_SERVER_LR),
                self.momentum.unwrap_or(Self::DEFAULT_MOMENTUM),
            )
        })
    }

    /// The server's learning rate for scaffold; None for other strategies.
    pub fn scaffold_server_lr(&self) -> Option<f64> {
        (self.strategy == Strategy::Scaffold)
            .then(|| self.server_lr.unwrap_or(Self::DEFAULT_MEAN_SERVER_LR))
    }

    /// The server optimiser the strategy uses; None for strategies that take the mean as
    /// it is.
    pub fn server_optimizer(&self) -> Option<ServerOptimizer> {
        let rule = match self.strategy {
            Strategy::Fedadam => SecondMoment::Adam,
            Strategy::Fedyogi => SecondMoment::Yogi,
            Strategy::Fedadagrad => SecondMoment::Adagrad,
            _ => return None,
        };
        Some(ServerOptimizer {
            rule,
            server_lr: self.server_lr.unwrap_or(match rule {
                SecondMoment::Adagrad => Self::DEFAULT_ADAGRAD_SERVER_LR,
                SecondMoment::Adam | SecondMoment::Yogi => Self::DEFAULT_SERVER_LR,
            }),
            beta1: self.beta1.unwrap_or(Self::DEFAULT_BETA1),
            beta2: self.beta2.unwrap_or(Self::DEFAULT_BETA2),
            tau: self.tau.unwrap_or(Self::DEFAULT_TAU),
        })
    }

    fn validate(&self) -> Result<(), SpecError> {
        const SUPPORTED: &[Strategy] = &[
            Strategy::Fedavg,
            Strategy::Fedavgm,
            Strategy::Fedprox,
            Strategy::Fedadam,
            Strategy::Fedyogi,
            Strategy::Fedadagrad,
            Strategy::Scaffold,
            Strategy::Median,
            Strategy::TrimmedMean,
            Strategy::Krum,
        ];
        if !SUPPORTED.contains(&self.strategy) {
            return Err(SpecError::new(
                "aggregation.strategy",
                format!(
                    "{:?} is not supported yet; use one of {}",
                    self.strategy.as_str(),
                    SUPPORTED
                        .iter()
                        .map(|s| format!("{:?}", s.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        use Strategy::{
            Fedadagrad, Fedadam, Fedavgm, Fedprox, Fedyogi, Krum, Scaffold, TrimmedMean,
        };
        let adaptive: &[Strategy] = &[Fedadam, Fedyogi, Fedadagrad];
        let server_lr: &[Strategy] = &[Fedadam, Fedyogi, Fedadagrad, Fedavgm, Scaffold];
        for (field, set, takes) in [
            ("mu", self.mu.is_some(), &[Fedprox][..]),
            ("beta", self.beta.is_some(), &[TrimmedMean][..]),
            ("f", self.f.is_some(), &[Krum][..]),
            ("m", self.m.is_some(), &[Krum][..]),
            ("server_lr", self.server_lr.is_some(), server_lr),
            ("momentum", self.momentum.is_some(), &[Fedavgm][..]),
            ("beta1", self.beta1.is_some(), adaptive),
            ("beta2", self.beta2.is_some(), &[Fedadam, Fedyogi][..]),
            ("tau", self.tau.is_some(), adaptive),
        ] {
            if set && !takes.contains(&self.strategy) {
                let names: Vec<String> =
                    takes.iter().map(|s| format!("{:?}", s.as_str())).collect();
                return Err(SpecError::new(
                    format!("aggregation.{field}"),
                    format!(
                        "only strategy {} takes {field}, not {:?}",
                        names.join(", "),
                        self.strategy.as_str()
                    ),
                ));
            }
        }
        let in_range = |field: &str, v: Option<f64>, ok: fn(f64) -> bool, what: &str| match v {
            Some(v) if !(v.is_finite() && ok(v)) => Err(SpecError::new(
                format!("aggregation.{field}"),
                format!("must be {what}, got {v}"),
            )),
            _ => Ok(()),
        };
        in_range(
            "server_lr",
            self.server_lr,
            |v| v > 0.0 && v <= 10.0,
            "in (0, 10]",
        )?;
        in_range(
            "beta1",
            self.beta1,
            |v| (0.0..1.0).contains(&v),
            "in [0, 1)",
        )?;
        in_range(
            "beta2",
            self.beta2,
            |v| (0.0..1.0).contains(&v),
            "in [0, 1)",
        )?;
        in_range("tau", self.tau, |v| v > 0.0 && v <= 1.0, "in (0, 1]")?;
        in_range(
            "momentum",
            self.momentum,
            |v| (0.0..1.0).contains(&v),
            "in [0, 1)",
        )?;
        in_range(
            "mu",
            self.mu,
            |v| (0.0..=AggregationSpec::MAX_MU).contains(&v),
            "in [0, 10]",
        )?;
        in_range(
            "beta",
            self.beta,
            |v| (0.0..0.5).contains(&v),
            "in [0, 0.5)",
        )?;
        if let Some(f) = self.f
            && f > 1000
        {
            return Err(SpecError::new(
                "aggregation.f",
                format!("must be at most 1000, got {f}"),
            ));
        }
        if let Some(s) = self.max_weight_share
            && !(s.is_finite() && s > 0.0 && s <= 1.0)
        {
            return Err(SpecError::new(
                "aggregation.max_weight_share",
                format!("must be in (0, 1], got {s}"),
            ));
        }
        if let Some(n) = self.max_update_norm
            && !(n.is_finite() && n > 0.0 && n <= f64::from(f32::MAX))
        {
            return Err(SpecError::new(
                "aggregation.max_update_norm",
                format!("must be a positive finite number, got {n}"),
            ));
        }
        if self.max_update_norm.is_none() && !self.norm_action.is_default() {
            return Err(SpecError::new(
                "aggregation.norm_action",
                "only means something with aggregation.max_update_norm",
            ));
        }
        Ok(())
    }
}

impl JobSpec {
    /// The model-manager name of the job's model versions: `model.name`, or the job's id.
    pub fn model_name(&self, job: &crate::JobId) -> String {
        self.model.name.clone().unwrap_or_else(|| job.to_string())
    }

    /// How the job's parties compress their updates: None without `compression` (or, in a
    /// spec that was never validated, with an invalid one).
    pub fn wire_compression(&self) -> Option<Compression> {
        self.compression.as_ref().and_then(|c| c.method().ok())
    }

    /// Secure aggregation's threshold and clip: None without `privacy.secure_aggregation`.
    pub fn secure_aggregation(&self) -> Option<SecureAggregation> {
        self.privacy
            .secagg_for(&self.clients, self.aggregation.max_update_norm)
    }
}

impl ModelSpec {
    /// How many parameters the model has for data of `features` inputs and `classes`
    /// outputs (saturating). The layer layout itself is `cohort_train::param_shapes`, which
    /// a test there holds to this count.
    pub fn parameter_count(&self, features: u64, classes: u64) -> u64 {
        let linear = |fan_in: u64, out: u64| fan_in.saturating_mul(out).saturating_add(out);
        match self.arch {
            Arch::Logreg => linear(features, classes),
            Arch::Mlp => {
                let mut total = 0u64;
                let mut width = features;
                for &h in &self.hidden {
                    total = total.saturating_add(linear(width, u64::from(h)));
                    width = u64::from(h);
                }
                total.saturating_add(linear(width, classes))
            }
            Arch::Cnn => {
                let (c0, c1) = (CNN_CHANNELS[0], CNN_CHANNELS[1]);
                let convs = linear(9, c0).saturating_add(linear(c0 * 9, c1));
                let side = features.isqrt();
                let after_first = side / 2;
                let last = if after_first / 2 >= 2 {
                    after_first / 2
                } else {
                    after_first
                };
                convs.saturating_add(linear(c1.saturating_mul(last * last), classes))
            }
            Arch::Synthetic => self.params.unwrap_or(0),
        }
    }
}

/// Output channels of the two cnn convolutions (`cohort_train` builds them).
pub const CNN_CHANNELS: [u64; 2] = [16, 32];

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
    fn a_synthetic_model_has_its_size_and_nothing_to_evaluate() {
        let spec = |model: &str, extra: &str| {
            format!(
                "name: s\nmodel: {model}\ndata: {{dataset: synthetic}}\n\
                 clients: {{per_round: 2, min: 2}}\n{extra}"
            )
        };
        let ok = JobSpec::parse(&spec("{arch: synthetic, params: 1000}", "")).unwrap();
        assert_eq!(ok.model.synthetic(), Some((1000, 4)));
        assert_eq!(ok.model.parameter_count(64, 10), 1000);
        let layered =
            JobSpec::parse(&spec("{arch: synthetic, params: 10, layers: 3}", "")).unwrap();
        assert_eq!(layered.model.synthetic(), Some((10, 3)));
        assert_eq!(JobSpec::from_json(&layered.to_json()).unwrap(), layered);
        for (model, extra, field) in [
            ("{arch: synthetic}", "", "model.params"),
            ("{arch: synthetic, params: 0}", "", "model.params"),
            ("{arch: synthetic, params: 2000000000}", "", "model.params"),
            (
                "{arch: synthetic, params: 10, layers: 0}",
                "",
                "model.layers",
            ),
            (
                "{arch: synthetic, params: 10, hidden: [4]}",
                "",
                "model.hidden",
            ),
            ("{arch: mlp, hidden: [4], params: 10}", "", "model.params"),
            ("{arch: cnn, layers: 2}", "", "model.layers"),
            (
                "{arch: synthetic, params: 10}",
                "stop: {target_accuracy: 0.9}\n",
                "stop.target_accuracy",
            ),
        ] {
            assert_eq!(err_field(&spec(model, extra)), field, "{model} {extra}");
        }
    }

    #[test]
    fn every_selection_is_accepted_and_an_unknown_one_is_refused() {
        for (name, want) in [
            ("random", Selection::Random),
            ("data", Selection::Data),
            ("resource", Selection::Resource),
            ("reliability", Selection::Reliability),
        ] {
            let text = GOOD.replace("min: 2,", &format!("min: 2, selection: {name},"));
            let spec = JobSpec::parse(&text).expect(name);
            assert_eq!(spec.clients.selection, want);
            assert_eq!(spec.clients.selection.as_str(), name);
            assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap(), spec);
        }
        let f = err_field(&GOOD.replace("min: 2,", "min: 2, selection: fastest,"));
        assert_eq!(f, "clients.selection");
    }

    #[test]
    fn good_spec_parses_with_defaults() {
        let spec = JobSpec::parse(GOOD).expect("valid");
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.clients.round_timeout, Duration::from_secs(30));
        assert_eq!(spec.aggregation, AggregationSpec::default());
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
        assert!(schema.get("oneOf").is_none(), "{schema}");
        for field in [
            "strategy",
            "mu",
            "beta",
            "f",
            "max_weight_share",
            "max_update_norm",
        ] {
            assert!(
                schema["properties"].get(field).is_some(),
                "{field}: {schema}"
            );
        }
    }

    #[test]
    fn aggregation_bounds_are_checked() {
        let with = |agg: &str| GOOD.replace("rounds: 5", &format!("rounds: 5\naggregation: {agg}"));
        let spec = JobSpec::parse(&with(
            "{strategy: fedavg, max_weight_share: 0.5, max_update_norm: 10, norm_action: refuse}",
        ))
        .expect("valid");
        assert_eq!(spec.aggregation.max_weight_share, Some(0.5));
        assert_eq!(spec.aggregation.norm_action, NormAction::Refuse);
        assert_eq!(spec.aggregation.server_optimizer(), None);
        let five = |agg: &str| {
            with(agg).replace(
                "clients: {per_round: 3, min: 2, round_timeout: 30s}",
                "clients: {per_round: 5, min: 5, round_timeout: 30s}",
            )
        };
        let krum = JobSpec::parse(&five("{strategy: krum, m: 4}")).expect("multi-krum");
        assert_eq!(krum.aggregation.krum(), (1, 4));
        assert_eq!(err_field(&five("{strategy: krum, m: 5}")), "aggregation.m");
        assert_eq!(err_field(&five("{strategy: krum, f: 2}")), "aggregation.f");
        let adam = JobSpec::parse(&with("{strategy: fedadam, server_lr: 0.05, tau: 0.01}"))
            .expect("valid");
        assert_eq!(
            adam.aggregation.server_optimizer(),
            Some(ServerOptimizer {
                rule: SecondMoment::Adam,
                server_lr: 0.05,
                beta1: AggregationSpec::DEFAULT_BETA1,
                beta2: AggregationSpec::DEFAULT_BETA2,
                tau: 0.01,
            })
        );
        assert_eq!(
            JobSpec::from_json(&adam.to_json()).expect("round trip"),
            adam
        );
        assert_eq!(adam.aggregation.proximal_mu(), None);
        let prox = JobSpec::parse(&with("{strategy: fedprox, mu: 0.5}")).expect("valid");
        assert_eq!(prox.aggregation.proximal_mu(), Some(0.5));
        assert_eq!(prox.aggregation.server_optimizer(), None);
        assert_eq!(
            JobSpec::from_json(&prox.to_json()).expect("round trip"),
            prox
        );
        for (agg, mu) in [
            ("{strategy: fedprox}", AggregationSpec::DEFAULT_MU),
            ("{strategy: fedprox, mu: 0}", 0.0),
            ("{strategy: fedprox, mu: 10}", 10.0),
        ] {
            let spec = JobSpec::parse(&with(agg)).expect(agg);
            assert_eq!(spec.aggregation.proximal_mu(), Some(mu), "{agg}");
        }
        assert_eq!(
            JobSpec::from_json(&spec.to_json()).expect("round trip"),
            spec
        );
        for (agg, field) in [
            ("{max_weight_share: 0}", "aggregation.max_weight_share"),
            ("{max_weight_share: 1.5}", "aggregation.max_weight_share"),
            ("{max_update_norm: -1}", "aggregation.max_update_norm"),
            ("{max_update_norm: .inf}", "aggregation.max_update_norm"),
            ("{norm_action: refuse}", "aggregation.norm_action"),
            ("{strategy: fedavg, mu: 0.1}", "aggregation.mu"),
            ("{strategy: fedprox, mu: -0.01}", "aggregation.mu"),
            ("{strategy: fedprox, mu: 11}", "aggregation.mu"),
            ("{strategy: fedprox, mu: .nan}", "aggregation.mu"),
            ("{strategy: fedprox, mu: .inf}", "aggregation.mu"),
            (
                "{strategy: fedprox, server_lr: 0.1}",
                "aggregation.server_lr",
            ),
            (
                "{strategy: fedavg, server_lr: 0.1}",
                "aggregation.server_lr",
            ),
            ("{strategy: fedadagrad, beta2: 0.9}", "aggregation.beta2"),
            ("{strategy: fedadam, server_lr: 0}", "aggregation.server_lr"),
            ("{strategy: fedyogi, beta1: 1}", "aggregation.beta1"),
            ("{strategy: fedadam, beta2: -0.1}", "aggregation.beta2"),
            ("{strategy: fedadam, tau: .nan}", "aggregation.tau"),
            ("{strategy: fedavg, momentum: 0.9}", "aggregation.momentum"),
            ("{strategy: fedadam, momentum: 0.9}", "aggregation.momentum"),
            ("{strategy: fedavgm, momentum: 1}", "aggregation.momentum"),
            (
                "{strategy: fedavgm, momentum: -0.5}",
                "aggregation.momentum",
            ),
            ("{strategy: fedavgm, server_lr: 0}", "aggregation.server_lr"),
            (
                "{strategy: scaffold, server_lr: 11}",
                "aggregation.server_lr",
            ),
            ("{strategy: median, server_lr: 1}", "aggregation.server_lr"),
            ("{strategy: krum, f: 1}", "aggregation.f"),
            ("{strategy: fedavg, bogus: 1}", "aggregation.bogus"),
        ] {
            assert_eq!(err_field(&with(agg)), field, "{agg}");
        }
    }

    #[test]
    fn scaffold_needs_sgd_and_a_trained_model() {
        let scaffold = format!("{GOOD}aggregation: {{strategy: scaffold}}\n");
        let spec = JobSpec::parse(&scaffold).unwrap();
        assert_eq!(spec.aggregation.scaffold_server_lr(), Some(1.0));
        let adam = scaffold.replace("{name: sgd, lr: 0.05}", "{name: adam, lr: 0.001}");
        assert!(adam.contains("adam"), "{adam}");
        let e = JobSpec::parse(&adam).unwrap_err();
        assert_eq!(e.field, "training.optimizer", "{e}");
        assert!(e.to_string().contains("sgd"), "{e}");
        let synthetic = "name: s\nmodel: {arch: synthetic, params: 1000}\n\
                         data: {dataset: synthetic}\nclients: {per_round: 2, min: 2}\n\
                         aggregation: {strategy: scaffold}\n";
        assert_eq!(err_field(synthetic), "aggregation.strategy");
    }

    #[test]
    fn seed_and_model_name_round_trip() {
        let text = GOOD
            .replace("rounds: 5", "rounds: 5\nseed: 7")
            .replace("hidden: [128]", "hidden: [128], name: shared-model");
        let spec = JobSpec::parse(&text).expect("valid");
        assert_eq!(spec.seed, Some(7));
        assert_eq!(spec.model.name.as_deref(), Some("shared-model"));
        assert_eq!(
            JobSpec::from_json(&spec.to_json()).expect("round trip"),
            spec
        );
        assert_eq!(
            err_field(&GOOD.replace("hidden: [128]", "hidden: [128], name: Bad_Name")),
            "model.name"
        );
    }

    #[test]
    fn parameter_counts() {
        let mlp = |hidden: Vec<u32>| ModelSpec {
            arch: Arch::Mlp,
            hidden,
            init: None,
            name: None,
            params: None,
            layers: None,
        };
        assert_eq!(
            mlp(vec![32]).parameter_count(64, 10),
            64 * 32 + 32 + 32 * 10 + 10
        );
        let huge = mlp(vec![65_536; 4]).parameter_count(1, 2);
        assert!(huge > 12_000_000_000, "{huge}");
        assert_eq!(
            mlp(vec![u32::MAX; 3]).parameter_count(u64::MAX, u64::MAX),
            u64::MAX,
            "saturates"
        );
    }

    #[test]
    fn model_refs() {
        assert_eq!(parse_model_ref("m@3"), Ok(("m".to_string(), 3)));
        assert!(parse_model_ref("m").is_err());
        assert!(parse_model_ref("m@0").is_err());
    }

    #[test]
    fn training_device_defaults_to_auto_and_parses_strictly() {
        let parsed = |text: &str| JobSpec::parse(text).map(|s| s.training.device);
        assert_eq!(parsed(GOOD), Ok(TrainingDevice::Auto));
        for (word, device) in [
            ("auto", TrainingDevice::Auto),
            ("cpu", TrainingDevice::Cpu),
            ("cuda", TrainingDevice::Cuda),
        ] {
            let text = GOOD.replace("  epochs: 2", &format!("  epochs: 2\n  device: {word}"));
            assert_eq!(parsed(&text), Ok(device), "{word}");
            assert_eq!(device.as_str(), word);
        }
        let e = parse_err(&GOOD.replace("  epochs: 2", "  epochs: 2\n  device: gpu"));
        assert_error(&e, "training.device", "unknown variant `gpu`", Some(7));
    }

    fn parse_err(text: &str) -> SpecError {
        match JobSpec::parse(text) {
            Ok(_) => panic!("spec was accepted"),
            Err(e) => e,
        }
    }

    /// The error's text names the field once, then the problem, then the line.
    fn assert_error(e: &SpecError, field: &str, problem: &str, line: Option<usize>) {
        let text = e.to_string();
        assert_eq!(e.field, field, "{text}");
        assert!(text.starts_with(&format!("{field}: {problem}")), "{text}");
        assert_eq!(text.matches(field).count(), 1, "named once: {text}");
        let last = field.rsplit('.').next().unwrap_or(field);
        assert!(!text.contains(&format!("`{last}`")), "named once: {text}");
        assert!(!text.contains("column"), "{text}");
        match line {
            Some(l) => assert!(text.ends_with(&format!(" (line {l})")), "{text}"),
            None => assert!(!text.contains("(line"), "{text}"),
        }
    }

    #[test]
    fn unknown_nested_field_is_named_once_at_its_line() {
        // serde_yaml places this one at line 6 (`epochs`); the key is on line 7.
        let e = parse_err(&GOOD.replace("lr: 0.05", "lr: 0.05, momentum: 0.9"));
        assert_error(
            &e,
            "training.optimizer.momentum",
            "unknown field, expected `lr`",
            Some(7),
        );
        let e = parse_err(&GOOD.replace("epochs: 2", "epochs: 2\n  epoch_count: 3"));
        assert_error(
            &e,
            "training.epoch_count",
            "unknown field, expected one of",
            Some(7),
        );
        let e = parse_err(&format!("{GOOD}\nbogus: 1\n"));
        assert_error(
            &e,
            "bogus",
            "unknown field, expected one of `name`",
            Some(11),
        );
    }

    #[test]
    fn wrong_types_point_at_their_key() {
        let e = parse_err(&GOOD.replace("rounds: 5", "rounds: five"));
        assert_error(
            &e,
            "rounds",
            "invalid type: string \"five\", expected u32",
            Some(8),
        );
        let e = parse_err(&GOOD.replace("hidden: [128]", "hidden: [x]"));
        assert_error(&e, "model.hidden[0]", "invalid type: string", Some(3));
        // The same key at the top level (`name`, line 2) is not taken for the nested one.
        let e = parse_err(&GOOD.replace("sgd", "rmsprop"));
        assert_error(
            &e,
            "training.optimizer.name",
            "unknown variant `rmsprop`",
            Some(7),
        );
        let json = r#"{"name": "j", "model": {"arch": "mlp", "hidden": [3]},
"data": {"dataset": "digits"},
"clients": {"per_round": "two", "min": 2}}"#;
        let e = parse_err(json);
        assert_error(&e, "clients.per_round", "invalid type: string", Some(3));
    }

    #[test]
    fn bad_values_from_validation_point_at_their_key_when_present() {
        let e = parse_err(&GOOD.replace("lr: 0.05", "lr: -0.1"));
        assert_error(
            &e,
            "training.optimizer.lr",
            "must be greater than 0",
            Some(7),
        );
        let e = parse_err(&GOOD.replace("digits-fedavg", "Digits_FedAvg"));
        assert_error(&e, "name", "\"Digits_FedAvg\"", Some(2));
        // Block style: a key in a nested block, after a same-named key in another block.
        let block = "name: blocks
model:
  arch: mlp
  hidden: [8]
data:
  dataset: digits
clients:
  per_round: 2
  min: 2
training:
  epochs: 1
  optimizer:
    name: sgd
    lr: 0
";
        let e = parse_err(block);
        assert_error(
            &e,
            "training.optimizer.lr",
            "must be greater than 0",
            Some(14),
        );
        let e = parse_err(
            &block
                .replace("lr: 0", "lr: 0.1")
                .replace("  min: 2", "  min: 3"),
        );
        assert_error(&e, "clients.min", "", Some(9));
        // A field the text does not have: no line rather than a wrong one.
        let e = parse_err(&GOOD.replace("arch: mlp, hidden: [128]", "arch: mlp"));
        assert_error(&e, "model.hidden", "", None);
    }

    #[test]
    fn finding_a_key_survives_any_text() {
        let texts = [
            GOOD.to_string(),
            r#"{"a": {"b": [1, {"c": "x\\"}]}, 'd': {e: "}{"}, "é": {"b": 2}}"#.to_string(),
            "a:\n  b:\n    c: {d: [\n  e: 1".to_string(),
        ];
        for text in &texts {
            for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                for path in [
                    "a.b.c",
                    "training.optimizer.lr",
                    "d.e",
                    "é.b",
                    "a",
                    "model.hidden[0]",
                ] {
                    if let Some(line) = SpecError::key_line(&text[..end], path) {
                        assert!(
                            line <= text[..end].lines().count().max(1),
                            "{path} in {end}"
                        );
                    }
                }
            }
        }
        let json = &texts[1];
        assert_eq!(SpecError::key_line(json, "a.b"), Some(1));
        assert_eq!(SpecError::key_line(json, "d.e"), Some(1));
        assert_eq!(SpecError::key_line(json, "d.b"), None, "b is not under d");
    }

    #[test]
    fn compression_is_one_method_with_a_valid_value() {
        let with = |c: &str| format!("{GOOD}compression: {c}\n");
        let q8 = JobSpec::parse(&with("{quantize_bits: 8}")).unwrap();
        assert_eq!(
            q8.wire_compression(),
            Some(Compression::Quantize { bits: 8 })
        );
        assert_eq!(JobSpec::from_json(&q8.to_json()).unwrap(), q8);
        let q4 = JobSpec::parse(&with("{quantize_bits: 4}")).unwrap();
        assert_eq!(
            q4.wire_compression(),
            Some(Compression::Quantize { bits: 4 })
        );
        let top = JobSpec::parse(&with("{top_k: 0.01}")).unwrap();
        assert_eq!(
            top.wire_compression(),
            Some(Compression::TopK { fraction: 0.01 })
        );
        assert_eq!(
            JobSpec::parse(&with("{top_k: 1}"))
                .unwrap()
                .wire_compression(),
            Some(Compression::TopK { fraction: 1.0 })
        );
        assert_eq!(JobSpec::parse(GOOD).unwrap().wire_compression(), None);
        // With a robust strategy too: the coordinator decodes before it checks.
        let robust =
            format!("{GOOD}aggregation: {{strategy: median}}\ncompression: {{top_k: 0.1}}\n");
        assert!(JobSpec::parse(&robust).is_ok());
        for (compression, field) in [
            ("{quantize_bits: 16}", "compression.quantize_bits"),
            ("{quantize_bits: 0}", "compression.quantize_bits"),
            ("{quantize_bits: 1}", "compression.quantize_bits"),
            ("{top_k: 0}", "compression.top_k"),
            ("{top_k: -0.1}", "compression.top_k"),
            ("{top_k: 1.5}", "compression.top_k"),
            ("{top_k: .nan}", "compression.top_k"),
            ("{quantize_bits: 8, top_k: 0.01}", "compression"),
            ("{}", "compression"),
            ("{bits: 8}", "compression.bits"),
        ] {
            assert_eq!(err_field(&with(compression)), field, "{compression}");
        }
        let e = parse_err(&with("{quantize_bits: 16}"));
        assert!(e.message.contains("must be 4 or 8, got 16"), "{e}");
        // The synthetic workload is checked against the exact average: no compression.
        let synthetic = "name: s\nmodel: {arch: synthetic, params: 100}\n\
                         data: {dataset: synthetic}\nclients: {per_round: 2, min: 2}\n\
                         compression: {quantize_bits: 8}\n";
        assert_eq!(err_field(synthetic), "compression");
        let masked = format!(
            "{GOOD}privacy: {{secure_aggregation: true}}\ncompression: {{quantize_bits: 8}}\n"
        );
        let e = parse_err(&masked);
        assert_eq!(e.field, "compression", "{e}");
        assert!(e.message.contains("privacy.secure_aggregation"), "{e}");
    }

    #[test]
    fn secure_aggregation_is_checked_naming_the_field() {
        let five = GOOD.replace(
            "clients: {per_round: 3, min: 2, round_timeout: 30s}",
            "clients: {per_round: 5, min: 3, round_timeout: 30s}",
        );
        let with = |privacy: &str, extra: &str| format!("{five}privacy: {privacy}\n{extra}");
        let spec = JobSpec::parse(&with(
            "{secure_aggregation: true, secagg_threshold: 3, secagg_clip: 2.5}",
            "",
        ))
        .expect("valid");
        assert_eq!(
            spec.secure_aggregation(),
            Some(SecureAggregation {
                threshold: 3,
                neighbours: 0,
                clip: 2.5,
                noise_std: 0.0,
                denominator: None,
            })
        );
        assert_eq!(JobSpec::from_json(&spec.to_json()).expect("json"), spec);
        // The bool alone still parses; t defaults to ⌊5/2⌋ + 1, the clip to max_update_norm.
        let spec = JobSpec::parse(&with(
            "{secure_aggregation: true}",
            "aggregation: {max_update_norm: 4}\n",
        ))
        .expect("valid");
        assert_eq!(
            spec.secure_aggregation(),
            Some(SecureAggregation {
                threshold: 3,
                neighbours: 0,
                clip: 4.0,
                noise_std: 0.0,
                denominator: None,
            })
        );
        // With DP: the parties clip to dp.clip and each adds z·clip/√clients.min.
        let spec = JobSpec::parse(&with(
            "{secure_aggregation: true, dp: {clip: 0.5, noise_multiplier: 1.2, delta: 1e-5}}",
            "",
        ))
        .expect("valid");
        let sa = spec.secure_aggregation().expect("secure aggregation");
        assert_eq!((sa.threshold, sa.clip, sa.denominator), (3, 0.5, Some(5)));
        assert!((sa.noise_std - 1.2 * 0.5 / 3f64.sqrt()).abs() < 1e-12);
        assert!((f64::from(sa.range()) - (0.5 + 8.0 * sa.noise_std)).abs() < 1e-6);
        assert_eq!(
            JobSpec::parse(GOOD).expect("valid").secure_aggregation(),
            None
        );
        // Above 10 parties a round the graph is sparse by default (k = 2⌈log₂ n⌉ + 2) and t
        // counts within a neighbourhood; a k of n − 1 or more is the complete graph.
        let twenty = GOOD.replace(
            "clients: {per_round: 3, min: 2, round_timeout: 30s}",
            "clients: {per_round: 20, min: 12, round_timeout: 30s}",
        );
        let sparse = |privacy: &str| format!("{twenty}privacy: {privacy}\n");
        let sa = |privacy: &str| {
            let spec = JobSpec::parse(&sparse(privacy)).expect("valid");
            let sa = spec.secure_aggregation().expect("secure aggregation");
            (sa.neighbours, sa.threshold)
        };
        assert_eq!(sa("{secure_aggregation: true, secagg_clip: 1}"), (12, 7));
        assert_eq!(
            sa("{secure_aggregation: true, secagg_clip: 1, secagg_neighbours: 4}"),
            (4, 3)
        );
        assert_eq!(
            sa("{secure_aggregation: true, secagg_clip: 1, secagg_neighbours: 20}"),
            (0, 11)
        );
        for (privacy, field, says) in [
            (
                "{secure_aggregation: true, secagg_clip: 1, secagg_neighbours: 3}",
                "privacy.secagg_neighbours",
                "even",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1, secagg_neighbours: 0}",
                "privacy.secagg_neighbours",
                "at least 2",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1, secagg_neighbours: 4, secagg_threshold: 2}",
                "privacy.secagg_threshold",
                "its 4 neighbours",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1, secagg_neighbours: 4, secagg_threshold: 6}",
                "privacy.secagg_threshold",
                "more than the 5 holders",
            ),
            (
                "{secagg_neighbours: 4}",
                "privacy.secagg_neighbours",
                "secure_aggregation: true",
            ),
        ] {
            let e = parse_err(&sparse(privacy));
            assert_eq!(e.field, field, "{privacy}: {e}");
            assert!(e.message.contains(says), "{privacy}: {e}");
        }
        for (privacy, extra, field, says) in [
            (
                "{secure_aggregation: true}",
                "",
                "privacy.secagg_clip",
                "secagg_clip",
            ),
            (
                "{secure_aggregation: true, secagg_threshold: 1, secagg_clip: 1}",
                "",
                "privacy.secagg_threshold",
                "at least 2",
            ),
            (
                "{secure_aggregation: true, secagg_threshold: 2, secagg_clip: 1}",
                "",
                "privacy.secagg_threshold",
                "per_round",
            ),
            (
                "{secure_aggregation: true, secagg_threshold: 4, secagg_clip: 1}",
                "",
                "privacy.secagg_threshold",
                "clients.min",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 0}",
                "",
                "privacy.secagg_clip",
                "positive",
            ),
            (
                "{secure_aggregation: true, secagg_clip: .nan}",
                "",
                "privacy.secagg_clip",
                "positive",
            ),
            (
                "{secagg_threshold: 3}",
                "",
                "privacy.secagg_threshold",
                "secure_aggregation: true",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1}",
                "aggregation: {strategy: median}\n",
                "privacy.secure_aggregation",
                "median",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1}",
                "aggregation: {strategy: trimmed_mean}\n",
                "privacy.secure_aggregation",
                "trimmed",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1}",
                "aggregation: {strategy: krum, f: 0}\n",
                "privacy.secure_aggregation",
                "Krum",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1}",
                "aggregation: {strategy: scaffold}\n",
                "privacy.secure_aggregation",
                "scaffold",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 1}",
                "aggregation: {max_weight_share: 0.5}\n",
                "aggregation.max_weight_share",
                "weighs the same",
            ),
            (
                "{secure_aggregation: true}",
                "aggregation: {max_update_norm: 1, norm_action: refuse}\n",
                "aggregation.norm_action",
                "cannot refuse",
            ),
            (
                "{secure_aggregation: true, secagg_clip: 2, dp: {clip: 1, noise_multiplier: 1, delta: 1e-5}}",
                "",
                "privacy.secagg_clip",
                "privacy.dp.clip",
            ),
            (
                "{secure_aggregation: true, dp: {clip: 1, noise_multiplier: 1, delta: 1e-5, local: true}}",
                "",
                "privacy.dp.local",
                "split",
            ),
        ] {
            let e = parse_err(&with(privacy, extra));
            assert_eq!(e.field, field, "{privacy} {extra}: {e}");
            assert!(e.message.contains(says), "{privacy} {extra}: {e}");
        }
        // The synthetic workload (cohort bench round) is checked against the equal-weight mean.
        let synthetic = "name: s\nmodel: {arch: synthetic, params: 100}\n\
                         data: {dataset: synthetic}\nclients: {per_round: 3, min: 2}\n\
                         privacy: {secure_aggregation: true, secagg_clip: 1}\n";
        assert!(JobSpec::parse(synthetic).is_ok());
    }

    #[test]
    fn differential_privacy_is_checked_naming_the_field() {
        let with = |privacy: &str, extra: &str| format!("{GOOD}privacy: {privacy}\n{extra}");
        let spec = JobSpec::parse(&with(
            "{dp: {clip: 1.0, noise_multiplier: 1.1, delta: 1e-5, target_epsilon: 8}}",
            "",
        ))
        .unwrap();
        let dp = spec.privacy.dp.clone().unwrap();
        assert_eq!((dp.clip, dp.noise_multiplier, dp.delta), (1.0, 1.1, 1e-5));
        assert_eq!((dp.target_epsilon, dp.local), (Some(8.0), false));
        assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap(), spec);
        let local = JobSpec::parse(&with(
            "{dp: {clip: 1, noise_multiplier: 0.5, delta: 1e-5, local: true}}",
            "aggregation: {max_update_norm: 100, norm_action: refuse}\n",
        ))
        .unwrap();
        assert!(local.privacy.dp.as_ref().unwrap().local);
        assert!(local.to_json().contains("\"local\":true"));
        // Clipping without noise is accepted (it is how the mechanism is tested).
        assert!(
            JobSpec::parse(&with(
                "{dp: {clip: 1, noise_multiplier: 0, delta: 1e-5}}",
                ""
            ))
            .is_ok()
        );
        for (dp, extra, field, problem) in [
            (
                "{clip: 0, noise_multiplier: 1, delta: 1e-5}",
                "",
                "privacy.dp.clip",
                "positive",
            ),
            (
                "{clip: -1, noise_multiplier: 1, delta: 1e-5}",
                "",
                "privacy.dp.clip",
                "positive",
            ),
            (
                "{clip: .inf, noise_multiplier: 1, delta: 1e-5}",
                "",
                "privacy.dp.clip",
                "positive",
            ),
            (
                "{clip: 1, noise_multiplier: -0.1, delta: 1e-5}",
                "",
                "privacy.dp.noise_multiplier",
                "at least 0",
            ),
            (
                "{clip: 1, noise_multiplier: .nan, delta: 1e-5}",
                "",
                "privacy.dp.noise_multiplier",
                "at least 0",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 0}",
                "",
                "privacy.dp.delta",
                "(0, 1)",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1}",
                "",
                "privacy.dp.delta",
                "(0, 1)",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5, target_epsilon: 0}",
                "",
                "privacy.dp.target_epsilon",
                "positive",
            ),
            (
                "{clip: 1, noise_multiplier: 0, delta: 1e-5, target_epsilon: 8}",
                "",
                "privacy.dp.target_epsilon",
                "infinite",
            ),
            ("{clip: 1, noise_multiplier: 1}", "", "privacy.dp", "delta"),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5, epsilon: 3}",
                "",
                "privacy.dp.epsilon",
                "unknown",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5}",
                "aggregation: {strategy: median}\n",
                "aggregation.strategy",
                "median",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5}",
                "aggregation: {strategy: trimmed_mean}\n",
                "aggregation.strategy",
                "sum of clipped",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5}",
                "aggregation: {strategy: krum}\n",
                "aggregation.strategy",
                "Krum",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5}",
                "aggregation: {max_weight_share: 0.5}\n",
                "aggregation.max_weight_share",
                "weighs the same",
            ),
            (
                "{clip: 1, noise_multiplier: 1, delta: 1e-5}",
                "aggregation: {max_update_norm: 2}\n",
                "aggregation.max_update_norm",
                "privacy.dp.clip",
            ),
        ] {
            let mut text = with(&format!("{{dp: {dp}}}"), extra);
            if extra.contains("krum") {
                // A Krum of f = 1 valid on its own: 2f + 3 updates a round.
                text = text.replace("per_round: 3, min: 2", "per_round: 5, min: 5");
            }
            let e = parse_err(&text);
            assert_eq!(e.field, field, "{dp} {extra}: {e}");
            assert!(e.message.contains(problem), "{dp} {extra}: {e}");
        }
        // Strategies whose server step works on the mean take the noisy mean.
        for strategy in ["fedavg", "fedprox", "fedavgm", "fedadam", "scaffold"] {
            let text = with(
                "{dp: {clip: 1, noise_multiplier: 1, delta: 1e-5}}",
                &format!("aggregation: {{strategy: {strategy}}}\n"),
            );
            assert!(JobSpec::parse(&text).is_ok(), "{strategy}");
        }
        let synthetic = "name: s\nmodel: {arch: synthetic, params: 100}\n\
                         data: {dataset: synthetic}\nclients: {per_round: 2, min: 2}\n\
                         privacy: {dp: {clip: 1, noise_multiplier: 1, delta: 1e-5}}\n";
        assert_eq!(err_field(synthetic), "privacy.dp");
    }

    #[test]
    fn syntax_errors_keep_the_parsers_line() {
        let e = parse_err(&GOOD.replace("data: {dataset: digits}", "data: {dataset: digits"));
        assert_eq!(e.field, "data", "{e}");
        assert!(e.message.contains("(line 5)"), "{e}");
        assert!(!e.to_string().contains("?"), "{e}");
    }
}
