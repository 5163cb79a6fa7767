//! `adapter_config.json`: peft's `LoraConfig`, with peft's field names and defaults, and the
//! rules peft uses to pick the modules, ranks and scales from it.
//!
//! The matching rules follow peft's `check_target_module_exists` (`tuners/tuners_utils.py`)
//! and `get_pattern_key` (`utils/other.py`).

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::AdapterError;

/// Every linear layer of a Llama / Mistral / Qwen2 block by peft's module name: the default
/// `target_modules` of training, of `realign extract` and of the benches.
pub const ALL_LINEAR_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `target_modules` (and `exclude_modules`): a list of names or one regex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names: a module path matches when it equals a name or ends with `"." + name`.
    List(Vec<String>),
    /// A regex that must match the whole module path (Python's `re.fullmatch`).
    Regex(String),
}

impl TargetModules {
    /// Whether `module_path` is selected, with peft's semantics (see the variants). An invalid
    /// regex selects nothing; [`LoraConfig::validate`] reports it.
    pub fn matches(&self, module_path: &str) -> bool {
        match self {
            TargetModules::List(names) => names
                .iter()
                .any(|n| n == module_path || ends_with_segment(module_path, n)),
            TargetModules::Regex(pattern) => full_match(pattern, module_path),
        }
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// Only this layer.
    One(usize),
    /// Only these layers; an empty list selects every layer (as in peft).
    Many(Vec<usize>),
}

impl LayersToTransform {
    fn is_active(&self) -> bool {
        !matches!(self, LayersToTransform::Many(v) if v.is_empty())
    }

    fn contains(&self, layer: usize) -> bool {
        match self {
            LayersToTransform::One(i) => *i == layer,
            LayersToTransform::Many(v) => v.contains(&layer),
        }
    }
}

/// `layers_pattern`: the name(s) of the module list that holds the layers (`"layers"`, `"h"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One name.
    One(String),
    /// Several names, tried in order.
    Many(Vec<String>),
}

impl LayersPattern {
    fn names(&self) -> &[String] {
        match self {
            LayersPattern::One(s) => std::slice::from_ref(s),
            LayersPattern::Many(v) => v,
        }
    }
}

/// The contents of `adapter_config.json` for a LoRA adapter, with peft's field names and
/// defaults. Keys this struct does not model are kept in [`extra`](Self::extra), so that
/// reading and writing a config loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The default rank (peft default 8).
    #[serde(default = "default_r")]
    pub r: usize,
    /// The default alpha; the scale is `alpha / r` (peft default 8).
    #[serde(default = "default_alpha", serialize_with = "ser_number")]
    pub lora_alpha: f64,
    /// rsLoRA: the scale is `alpha / sqrt(r)` instead.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which modules get an adapter. Required: peft's `null` (the defaults for the model type)
    /// is rejected, since the saved adapter must say what it adapts.
    #[serde(deserialize_with = "de_target_modules")]
    pub target_modules: TargetModules,
    /// Only the layers with these indices get an adapter (list targets only, as in peft).
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// The name of the layer list, used to find the layer index (`"layers"` for Llama). When
    /// absent, the index is the first number that follows a `.name.` segment.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Modules never adapted, even when `target_modules` selects them.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Dropout on the LoRA input while training (0 = none).
    #[serde(default)]
    pub lora_dropout: f64,
    /// The model the adapter was trained on (a hub id or a path).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Ranks that differ from `r`: a key is a regex matched against the end of the module path
    /// (after a `.`), and the first matching key in key order wins.
    #[serde(default, deserialize_with = "de_null_as_default")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Alphas that differ from `lora_alpha`, with the same matching as `rank_pattern`.
    #[serde(
        default,
        deserialize_with = "de_null_as_default",
        serialize_with = "ser_number_map"
    )]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// The tuner; only `"LORA"` is supported.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// e.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Trained biases: only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Weights stored `[in, out]` (GPT-2's Conv1D); not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// DoRA; not supported.
    #[serde(default)]
    pub use_dora: bool,
    /// Every other key of the file, kept as it was.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_peft_type() -> String {
    "LORA".to_string()
}
fn default_bias() -> String {
    "none".to_string()
}

fn de_target_modules<'de, D: Deserializer<'de>>(d: D) -> Result<TargetModules, D::Error> {
    Option::<TargetModules>::deserialize(d)?.ok_or_else(|| {
        serde::de::Error::custom(
            "target_modules is null (peft would use its defaults for the model type); \
             list the modules, e.g. [\"q_proj\", \"v_proj\"]",
        )
    })
}

fn de_null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Writes whole numbers as JSON integers, as Python writes peft's `int` fields.
fn ser_number<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: every integer below is exact in f64
    if v.is_finite() && v.fract() == 0.0 && v.abs() < EXACT {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_number_map<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
    struct Num(f64);
    impl Serialize for Num {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            ser_number(&self.0, s)
        }
    }
    s.collect_map(m.iter().map(|(k, v)| (k, Num(*v))))
}

/// `path == name` or `path` ends with `"." + name`.
fn ends_with_segment(path: &str, name: &str) -> bool {
    path.strip_suffix(name)
        .is_some_and(|head| head.ends_with('.'))
}

/// Python's `re.fullmatch(pattern, text)`; an invalid pattern matches nothing.
fn full_match(pattern: &str, text: &str) -> bool {
    Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(text))
}

/// The regex peft builds from a `rank_pattern` / `alpha_pattern` key: `(.*\.)?(key)$`.
fn pattern_key_regex(key: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

/// The first key (in key order) whose pattern matches the end of `module_path`.
fn pattern_value<'a, T>(patterns: &'a BTreeMap<String, T>, module_path: &str) -> Option<&'a T> {
    patterns
        .iter()
        .find(|(key, _)| pattern_key_regex(key).is_ok_and(|re| re.is_match(module_path)))
        .map(|(_, v)| v)
}

/// Options of peft's config that change what the adapter computes or add tensors this crate
/// does not read; an adapter using one is refused rather than applied wrongly.
const UNSUPPORTED_EXTRA: &[(&str, &str)] = &[
    ("lora_bias", "a bias on lora_B"),
    ("modules_to_save", "fully trained extra modules"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("layer_replication", "replicated layers"),
    ("target_parameters", "LoRA on parameters"),
    ("use_qalora", "QA-LoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("kasa_config", "KaSA"),
    ("monteclora_config", "MonteCLoRA"),
    ("arrow_config", "Arrow routing"),
];

/// `init_lora_weights` values whose initialisation rewrote the base weights, so that the
/// adapter only fits the modified model until peft converts it.
const BASE_CHANGING_INITS: &[&str] = &["pissa", "olora", "corda", "loftq"];

fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

impl LoraConfig {
    /// A config with rank `r`, `lora_alpha`, the given target module names and peft's defaults
    /// for everything else (`peft_type: "LORA"`, `task_type: "CAUSAL_LM"`, no dropout, no bias).
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            use_rslora: false,
            target_modules: TargetModules::List(target_modules),
            layers_to_transform: None,
            layers_pattern: None,
            exclude_modules: None,
            lora_dropout: 0.0,
            base_model_name_or_path: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            peft_type: default_peft_type(),
            task_type: Some("CAUSAL_LM".to_string()),
            bias: default_bias(),
            fan_in_fan_out: false,
            use_dora: false,
            extra: Map::new(),
        }
    }

    /// Whether the module at `module_path` (e.g. `model.layers.0.self_attn.q_proj`) gets an
    /// adapter, with peft's rules:
    /// - `exclude_modules` wins;
    /// - a regex `target_modules` must match the whole path; the string `"all-linear"` selects
    ///   every path except the output layer `lm_head` (callers ask only about linear layers);
    /// - a list selects a path equal to a name (then `layers_to_transform` is not applied) or
    ///   ending with `"." + name`; with `layers_to_transform`, the layer index (the number after
    ///   `.<layers_pattern>.`, or after the first `.name.` when there is no pattern) must be
    ///   one of the listed ones.
    pub fn targets(&self, module_path: &str) -> bool {
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|ex| ex.matches(module_path))
        {
            return false;
        }
        let names = match &self.target_modules {
            TargetModules::Regex(p) if p == "all-linear" => {
                return module_path != "lm_head" && !ends_with_segment(module_path, "lm_head")
            }
            TargetModules::Regex(p) => return full_match(p, module_path),
            TargetModules::List(names) => names,
        };
        if names.iter().any(|n| n == module_path) {
            return true;
        }
        if !names.iter().any(|n| ends_with_segment(module_path, n)) {
            return false;
        }
        match &self.layers_to_transform {
            Some(layers) if layers.is_active() => self
                .layer_index(module_path)
                .is_some_and(|i| layers.contains(i)),
            _ => true,
        }
    }

    /// The layer index peft reads from a module path: `model.layers.3.mlp.up_proj` -> 3.
    fn layer_index(&self, module_path: &str) -> Option<usize> {
        let patterns: Vec<String> = match &self.layers_pattern {
            Some(p) if !p.names().is_empty() => p
                .names()
                .iter()
                .map(|name| format!(r"^.*?\.(?:{name})\.(\d+)\."))
                .collect(),
            // The lazy `.*?` takes the first numbered segment, not a nested one such as the
            // expert index of an MoE layer (peft does the same).
            _ => vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()],
        };
        patterns.iter().find_map(|p| {
            let caps = Regex::new(p).ok()?.captures(module_path)?;
            caps.get(1)?.as_str().parse().ok()
        })
    }

    /// The rank of the module at `module_path`: the first `rank_pattern` key (a regex matched
    /// against the end of the path, after a `.`) that matches, else `r`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        pattern_value(&self.rank_pattern, module_path)
            .copied()
            .unwrap_or(self.r)
    }

    /// The scale of the module at `module_path`: `alpha / rank`, or `alpha / sqrt(rank)` with
    /// rsLoRA, where alpha comes from `alpha_pattern` (matched like `rank_pattern`) or
    /// `lora_alpha`, and the rank from [`rank_for`](Self::rank_for).
    pub fn scaling_for(&self, module_path: &str) -> f64 {
        let alpha = pattern_value(&self.alpha_pattern, module_path)
            .copied()
            .unwrap_or(self.lora_alpha);
        let rank = self.rank_for(module_path) as f64;
        if self.use_rslora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        }
    }

    /// Checks that this crate can apply the adapter exactly as peft would: `peft_type` LORA, no
    /// DoRA / `fan_in_fan_out` / biases / other LoRA variants, positive ranks, regexes that
    /// compile, and the combinations peft itself rejects. `path` names the config in errors.
    pub fn validate(&self, path: &Path) -> Result<(), AdapterError> {
        let unsupported = |feature: String| AdapterError::Unsupported {
            path: path.to_path_buf(),
            feature,
        };
        let invalid = |reason: String| AdapterError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(AdapterError::UnsupportedPeftType {
                path: path.to_path_buf(),
                value: self.peft_type.clone(),
            });
        }
        if self.use_dora {
            return Err(unsupported("use_dora: true (DoRA)".into()));
        }
        if self.fan_in_fan_out {
            return Err(unsupported(
                "fan_in_fan_out: true (weights stored [in, out])".into(),
            ));
        }
        if self.bias != "none" {
            return Err(unsupported(format!(
                "bias: {:?} (trained biases)",
                self.bias
            )));
        }
        for (key, what) in UNSUPPORTED_EXTRA {
            if let Some(v) = self.extra.get(*key).filter(|v| is_set(v)) {
                return Err(unsupported(format!("{key}: {v} ({what})")));
            }
        }
        if let Some(Value::String(init)) = self.extra.get("init_lora_weights") {
            if BASE_CHANGING_INITS.iter().any(|p| init.starts_with(p)) {
                return Err(unsupported(format!(
                    "init_lora_weights: {init:?} (the base weights were changed; convert the adapter with peft's \
                     path_initial_model_for_weight_conversion)"
                )));
            }
        }
        if self.r == 0 {
            return Err(invalid("r must be positive".into()));
        }
        let scales = std::iter::once(("lora_alpha".to_string(), self.lora_alpha)).chain(
            self.alpha_pattern
                .iter()
                .map(|(k, v)| (format!("alpha_pattern[{k:?}]"), *v)),
        );
        for (key, alpha) in scales {
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(invalid(format!(
                    "{key} is {alpha}; expected a positive number (the update is scaled by \
                     lora_alpha / r: 0 switches the adapter off, a negative value reverses it)"
                )));
            }
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(invalid(format!("rank_pattern[{key:?}] must be positive")));
        }
        if let TargetModules::Regex(p) = &self.target_modules {
            if self.layers_to_transform.is_some() {
                return Err(invalid(
                    "layers_to_transform cannot be used when target_modules is a regex".into(),
                ));
            }
            if self.layers_pattern.is_some() {
                return Err(invalid(
                    "layers_pattern cannot be used when target_modules is a regex".into(),
                ));
            }
            if p != "all-linear" {
                check_regex("target_modules", &format!("^(?:{p})$")).map_err(&invalid)?;
            }
        }
        if let Some(TargetModules::Regex(p)) = &self.exclude_modules {
            check_regex("exclude_modules", &format!("^(?:{p})$")).map_err(&invalid)?;
        }
        if let Some(p) = &self.layers_pattern {
            if self.layers_to_transform.is_none() && !p.names().is_empty() {
                return Err(invalid("layers_pattern needs layers_to_transform".into()));
            }
            for name in p.names() {
                check_regex("layers_pattern", &format!(r"\.(?:{name})\.")).map_err(&invalid)?;
            }
        }
        let pattern_keys = self.rank_pattern.keys().map(|k| ("rank_pattern", k));
        for (field, key) in
            pattern_keys.chain(self.alpha_pattern.keys().map(|k| ("alpha_pattern", k)))
        {
            if let Err(e) = pattern_key_regex(key) {
                return Err(invalid(format!(
                    "{field} key {key:?} is not a valid regex: {e}"
                )));
            }
        }
        Ok(())
    }
}

fn check_regex(field: &str, pattern: &str) -> Result<(), String> {
    Regex::new(pattern)
        .map(|_| ())
        .map_err(|e| format!("{field} is not a valid regex: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "model.layers.0.self_attn.q_proj";

    fn config(json: &str) -> LoraConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn list_targets_match_whole_segments() {
        let c = LoraConfig::new(8, 16.0, vec!["q_proj".into(), "mlp.up_proj".into()]);
        assert!(c.targets(Q));
        assert!(c.targets("q_proj"));
        assert!(c.targets("model.layers.2.mlp.up_proj"));
        assert!(!c.targets("model.layers.0.self_attn.xq_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj.lora_A"));
    }

    #[test]
    fn regex_targets_match_the_whole_path() {
        let c = config(r#"{"target_modules": ".*layers\\.[01]\\..*(q|v)_proj"}"#);
        assert_eq!(
            c.target_modules,
            TargetModules::Regex(r".*layers\.[01]\..*(q|v)_proj".into())
        );
        assert!(c.targets(Q));
        assert!(c.targets("model.layers.1.self_attn.v_proj"));
        assert!(!c.targets("model.layers.2.self_attn.q_proj"));
        // fullmatch, not search: a prefix of the path is not enough
        assert!(!c.targets("model.layers.0.self_attn.q_proj.extra"));
    }

    #[test]
    fn all_linear_selects_everything_but_the_output_layer() {
        let c = config(r#"{"target_modules": "all-linear"}"#);
        assert!(c.targets(Q));
        assert!(c.targets("model.layers.1.mlp.down_proj"));
        assert!(!c.targets("lm_head"));
    }

    #[test]
    fn layers_to_transform_takes_an_int_or_a_list() {
        let one = config(r#"{"target_modules": ["q_proj"], "layers_to_transform": 1}"#);
        assert_eq!(one.layers_to_transform, Some(LayersToTransform::One(1)));
        assert!(!one.targets(Q));
        assert!(one.targets("model.layers.1.self_attn.q_proj"));

        let many = config(r#"{"target_modules": ["q_proj"], "layers_to_transform": [0, 2]}"#);
        assert!(many.targets(Q));
        assert!(!many.targets("model.layers.1.self_attn.q_proj"));
        assert!(many.targets("model.layers.2.self_attn.q_proj"));
        // no layer index in the path: not selected (peft does the same)
        assert!(!many.targets("lm_head.q_proj"));

        let empty = config(r#"{"target_modules": ["q_proj"], "layers_to_transform": []}"#);
        assert!(empty.targets("model.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn layer_index_is_the_first_numbered_segment_or_follows_layers_pattern() {
        let c = config(r#"{"target_modules": ["w1"], "layers_to_transform": [1]}"#);
        // MoE: the expert index 0 is not the layer index
        assert!(c.targets("model.layers.1.experts.0.w1"));
        assert!(!c.targets("model.layers.0.experts.1.w1"));
        let p = config(
            r#"{"target_modules": ["w1"], "layers_to_transform": [0], "layers_pattern": "experts"}"#,
        );
        assert!(p.targets("model.layers.1.experts.0.w1"));
        assert!(!p.targets("model.layers.0.experts.1.w1"));
    }

    #[test]
    fn exclude_modules_wins() {
        let c = config(
            r#"{"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["layers.0.self_attn.k_proj"]}"#,
        );
        assert!(c.targets(Q));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        assert!(c.targets("model.layers.1.self_attn.k_proj"));
    }

    #[test]
    fn rank_and_alpha_patterns_match_the_end_of_the_path() {
        let c = config(
            r#"{"target_modules": ["q_proj", "v_proj"], "r": 8, "lora_alpha": 16,
                "rank_pattern": {"layers.0.self_attn.q_proj": 4, "v_pr.j": 2},
                "alpha_pattern": {"v_proj": 4}}"#,
        );
        assert_eq!(c.rank_for(Q), 4);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 8);
        // the key is a regex: `v_pr.j` matches `v_proj`
        assert_eq!(c.rank_for("model.layers.1.self_attn.v_proj"), 2);
        // only whole trailing segments: `0.self_attn.q_proj` must follow a `.`
        assert_eq!(c.rank_for("model.layers.10.self_attn.q_proj"), 8);
        // 16 / 4 = 4
        assert_eq!(c.scaling_for(Q), 4.0);
        // 16 / 8 = 2
        assert_eq!(c.scaling_for("model.layers.1.self_attn.q_proj"), 2.0);
        // alpha 4 / rank 2 = 2
        assert_eq!(c.scaling_for("model.layers.1.self_attn.v_proj"), 2.0);
    }

    #[test]
    fn rslora_divides_by_the_square_root_of_the_rank() {
        let mut c = LoraConfig::new(16, 16.0, vec!["q_proj".into()]);
        c.use_rslora = true;
        // 16 / sqrt(16) = 4
        assert_eq!(c.scaling_for(Q), 4.0);
        c.rank_pattern.insert("q_proj".into(), 4);
        // 16 / sqrt(4) = 8
        assert_eq!(c.scaling_for(Q), 8.0);
        c.use_rslora = false;
        // 16 / 4 = 4
        assert_eq!(c.scaling_for(Q), 4.0);
    }

    #[test]
    fn defaults_are_peft_defaults() {
        let c = config(r#"{"target_modules": ["q_proj"]}"#);
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!((c.peft_type.as_str(), c.bias.as_str()), ("LORA", "none"));
        assert!(!c.use_rslora && !c.use_dora && !c.fan_in_fan_out);
        assert!(c.task_type.is_none() && c.rank_pattern.is_empty());
        let n = LoraConfig::new(8, 16.0, vec!["q_proj".into()]);
        assert_eq!(n.task_type.as_deref(), Some("CAUSAL_LM"));
    }

    #[test]
    fn null_target_modules_is_rejected_with_a_reason() {
        let err = serde_json::from_str::<LoraConfig>(r#"{"target_modules": null}"#).unwrap_err();
        assert!(err.to_string().contains("target_modules is null"), "{err}");
    }

    #[test]
    fn unknown_keys_survive_and_whole_alphas_are_written_as_integers() {
        let c = config(
            r#"{"target_modules": ["q_proj"], "lora_alpha": 16, "alpha_pattern": {"q_proj": 2.5, "v": 3},
                "peft_version": "0.21.2", "loftq_config": {}, "rank_pattern": null}"#,
        );
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["lora_alpha"], serde_json::json!(16));
        assert_eq!(
            v["alpha_pattern"],
            serde_json::json!({"q_proj": 2.5, "v": 3})
        );
        assert_eq!(v["peft_version"], serde_json::json!("0.21.2"));
        assert_eq!(v["loftq_config"], serde_json::json!({}));
        assert_eq!(serde_json::from_value::<LoraConfig>(v).unwrap(), c);
    }

    #[test]
    fn validate_rejects_what_is_not_plain_lora() {
        let p = Path::new("adapter_config.json");
        let base = r#""target_modules": ["q_proj"]"#;
        for (extra, needle) in [
            (r#""use_dora": true"#, "DoRA"),
            (r#""fan_in_fan_out": true"#, "fan_in_fan_out"),
            (r#""bias": "all""#, "bias"),
            (r#""peft_type": "IA3""#, "IA3"),
            (r#""lora_bias": true"#, "lora_bias"),
            (r#""modules_to_save": ["lm_head"]"#, "modules_to_save"),
            (r#""init_lora_weights": "pissa_niter_4""#, "pissa"),
            (r#""r": 0"#, "r must be positive"),
            (
                r#""lora_alpha": 0"#,
                "lora_alpha is 0; expected a positive number",
            ),
            (
                r#""lora_alpha": -16"#,
                "lora_alpha is -16; expected a positive number",
            ),
            (
                r#""alpha_pattern": {"q_proj": -1}"#,
                "alpha_pattern[\"q_proj\"] is -1",
            ),
            (r#""rank_pattern": {"(": 2}"#, "rank_pattern"),
            (
                r#""target_modules": "q_proj", "layers_to_transform": 1"#,
                "layers_to_transform",
            ),
        ] {
            let json = if extra.starts_with(r#""target_modules""#) {
                format!("{{{extra}}}")
            } else {
                format!("{{{base}, {extra}}}")
            };
            let err = config(&json).validate(p).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("adapter_config.json"),
                "{json}: {err}"
            );
        }
        let ok = r#"{"target_modules": ["q_proj"], "modules_to_save": null, "lora_bias": false,
                     "init_lora_weights": true, "loftq_config": {}}"#;
        config(ok).validate(p).unwrap();
    }
}
