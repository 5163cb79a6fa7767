//! The `realign train --config run.toml` file: method, model, adapter, data, optimisation.
//! Defaults follow LLaMA-Factory / TRL where the papers are silent; every key is optional but
//! `output` and `data.train`.
//!
//! ```toml
//! method = "dpo"            # sft | dpo | orpo | kto | simpo (+ their parameters, e.g. beta = 0.1)
//! beta = 0.1
//! model = "path/to/model"   # default: the embedded SmolLM2-135M-Instruct
//! init_adapter = "runs/sft" # continue this adapter; without it a new LoRA is created
//! output = "runs/dpo"
//! seed = 42
//!
//! [lora]                     # only for a new adapter
//! r = 16
//! alpha = 32
//! target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
//!
//! [data]
//! train = "embedded:safety_pref"  # or a .jsonl/.json/.csv file; KTO also takes preference pairs
//!                                 # (each: chosen = desirable, rejected = undesirable)
//! template = "chat"               # chat | alpaca
//! max_length = 256
//!
//! [optim]
//! lr = 5e-5
//! epochs = 1
//! batch_size = 4
//! grad_accum = 2
//! max_grad_norm = 1.0
//! schedule = "cosine"             # constant | linear | cosine
//! warmup_ratio = 0.1
//! save_every = 50                 # optimizer steps between checkpoints (0: only at the end)
//! group_by_length = false         # batch examples of similar length (less padding)
//! max_tokens_per_pass = 0         # bound a pass's padded tokens (memory); 0: whole micro-batch
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::objectives::Objective;
use super::schedule::Schedule;

/// A whole training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The objective (`method = "..."` and its parameters).
    #[serde(flatten)]
    pub objective: Objective,
    /// Base model; default: the embedded SmolLM2-135M-Instruct.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Adapter to continue training; without it a new LoRA is initialised.
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
    /// Output folder (final adapter, checkpoints, logs).
    pub output: PathBuf,
    /// Seed of the LoRA initialisation and the data order.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// A new adapter's shape.
    #[serde(default)]
    pub lora: LoraSettings,
    /// Training data.
    pub data: DataSettings,
    /// Optimisation.
    #[serde(default)]
    pub optim: OptimSettings,
}

/// Shape of a new LoRA adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator (`scale = alpha / r`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Module names (peft's list semantics).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    #[serde(default)]
    pub use_rslora: bool,
    /// Dropout on the adapter input (only 0 is supported for now).
    #[serde(default)]
    pub dropout: f64,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            target_modules: default_targets(),
            use_rslora: false,
            dropout: 0.0,
        }
    }
}

/// Where the rows come from and how they are rendered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSettings {
    /// `embedded:NAME` or a data file.
    pub train: String,
    /// `chat` (the model's template) or `alpaca`.
    #[serde(default = "default_template")]
    pub template: String,
    /// System message for chat rendering.
    #[serde(default)]
    pub system: Option<String>,
    /// Longest sequence (prompt + response) in tokens; longer responses are cut.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Use at most this many rows (after a seeded shuffle); 0: all.
    #[serde(default)]
    pub max_rows: usize,
}

/// Optimiser, schedule and loop settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSettings {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Passes over the data.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Sequences (or pairs) per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Global gradient-norm clip (0: off).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Schedule after warmup.
    #[serde(default)]
    pub schedule: Schedule,
    /// Warmup as a fraction of all optimizer steps.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Optimizer steps between checkpoints; 0 = only the final adapter.
    #[serde(default)]
    pub save_every: usize,
    /// Stop after this many optimizer steps (0: no limit).
    #[serde(default)]
    pub max_steps: usize,
    /// Batch examples of similar length together (transformers' `group_by_length`): less
    /// padding, so faster on data of mixed lengths; the batches' order stays seeded-random
    /// ([`super::trainer::epoch_batches`]). Default off, like transformers.
    #[serde(default)]
    pub group_by_length: bool,
    /// Most padded tokens one forward/backward pass holds (0: the whole micro-batch at once).
    /// A longer micro-batch is run as several passes whose gradients add up to the same
    /// update (SFT, DPO, SimPO; ORPO and KTO always take the micro-batch whole), which bounds
    /// the memory kept for backward by this budget instead of by batch × length. The passes
    /// take the micro-batch's examples shortest first, so each pads to rows of like length.
    #[serde(default)]
    pub max_tokens_per_pass: usize,
}

impl Default for OptimSettings {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            epochs: default_epochs(),
            batch_size: default_batch(),
            grad_accum: 1,
            max_grad_norm: default_clip(),
            weight_decay: 0.0,
            schedule: Schedule::default(),
            warmup_ratio: 0.0,
            save_every: 0,
            max_steps: 0,
            group_by_length: false,
            max_tokens_per_pass: 0,
        }
    }
}

fn default_seed() -> u64 {
    42
}
fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> Vec<String> {
    crate::adapters::ALL_LINEAR_TARGETS
        .map(String::from)
        .to_vec()
}
fn default_template() -> String {
    "chat".into()
}
fn default_max_length() -> usize {
    512
}
fn default_lr() -> f64 {
    1e-4
}
fn default_epochs() -> usize {
    1
}
fn default_batch() -> usize {
    4
}
fn one_usize() -> usize {
    1
}
fn default_clip() -> f64 {
    1.0
}

/// The keys a config may have at the top level (besides the objective's parameters).
const TOP_KEYS: [&str; 8] = [
    "method",
    "model",
    "init_adapter",
    "output",
    "seed",
    "lora",
    "data",
    "optim",
];
const OBJECTIVE_KEYS: [&str; 5] = ["beta", "lambda", "lambda_d", "lambda_u", "gamma"];

/// A number as a message writes it: plain (`-1`, `0.01`, `NaN`) unless very large or small
/// (`1e30`, `5e-5`).
pub(crate) fn fmt_num(v: f64) -> String {
    if v.is_finite() && v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

impl TrainConfig {
    /// Reads a TOML file; unknown keys are errors (a typo must not silently fall back to a
    /// default), and so are settings that cannot train; every error names the file and the
    /// key (`run.toml: optim.lr = -1 must be a finite number > 0`).
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let text = crate::fsutil::read_to_string(path)?;
        Self::from_toml(&text).map_err(|reason| {
            super::TrainError::Config {
                path: path.to_path_buf(),
                reason,
            }
            .into()
        })
    }

    /// Parses TOML text and [validates](Self::validate) it; the error is a sentence naming the
    /// key. An objective parameter of another method (`beta` on an SFT run, `lambda` on DPO)
    /// is an error naming the methods it belongs to.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let raw: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        for key in raw.keys() {
            if !TOP_KEYS.contains(&key.as_str()) && !OBJECTIVE_KEYS.contains(&key.as_str()) {
                return Err(format!("unknown key {key:?} (expected one of {TOP_KEYS:?} or an objective parameter {OBJECTIVE_KEYS:?})"));
            }
        }
        let given: Vec<(String, toml::Value)> = OBJECTIVE_KEYS
            .iter()
            .filter_map(|k| raw.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let cfg: TrainConfig = toml::Value::Table(raw)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        let method = cfg.objective.method();
        let own: Vec<&str> = cfg.objective.parameters().iter().map(|(k, _)| *k).collect();
        if let Some((key, value)) = given.iter().find(|(k, _)| !own.contains(&k.as_str())) {
            let owners: Vec<String> = super::objectives::METHOD_PARAMETERS
                .iter()
                .filter(|(_, keys)| keys.contains(&key.as_str()))
                .map(|(m, _)| format!("{m:?}"))
                .collect();
            let owners = match owners.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => "no method".into(),
            };
            return Err(format!(
                "{key} = {value} is a parameter of method {owners}, not of method {method:?} (its parameters: {})",
                if own.is_empty() {
                    "none".to_string()
                } else {
                    own.join(", ")
                }
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every setting that could not train, or would train nothing or the wrong way:
    /// the counts (`optim.epochs`, `optim.batch_size`, `optim.grad_accum`, `lora.r`) at least
    /// 1, `optim.lr` and `lora.alpha` finite and > 0, the objective's parameters as
    /// [`Objective::validate`](super::Objective::validate) says, `optim.weight_decay` and
    /// `optim.max_grad_norm` finite and ≥ 0, `optim.warmup_ratio` within [0, 1],
    /// `data.max_length` at least 2. The error names the key and its value
    /// (`optim.lr = -1 must be a finite number > 0`); [`from_file`](Self::from_file) puts the
    /// file's name before it. For a configuration built in code (an experiment's stage) as
    /// well as for a run file.
    pub fn validate(&self) -> Result<(), String> {
        let o = &self.optim;
        for (key, v) in [
            ("optim.epochs", o.epochs),
            ("optim.batch_size", o.batch_size),
            ("optim.grad_accum", o.grad_accum),
        ] {
            if v == 0 {
                return Err(format!("{key} = 0 must be at least 1"));
            }
        }
        for (key, v) in [("optim.lr", o.lr), ("lora.alpha", self.lora.alpha)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "{key} = {} must be a finite number > 0",
                    fmt_num(v)
                ));
            }
        }
        for (key, v) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.max_grad_norm", o.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "{key} = {} must be a finite number ≥ 0",
                    fmt_num(v)
                ));
            }
        }
        if !(0.0..=1.0).contains(&o.warmup_ratio) {
            return Err(format!(
                "optim.warmup_ratio = {} must be within [0, 1]",
                fmt_num(o.warmup_ratio)
            ));
        }
        if self.lora.r == 0 || self.lora.r > super::MAX_LORA_RANK {
            return Err(format!(
                "lora.r = {} must be 1 to {}",
                self.lora.r,
                super::MAX_LORA_RANK
            ));
        }
        self.objective.validate()?;
        if self.lora.dropout != 0.0 {
            return Err("lora.dropout > 0 is not supported yet: set it to 0".into());
        }
        if !["chat", "alpaca"].contains(&self.data.template.as_str()) {
            return Err(format!(
                "data.template {:?}: expected \"chat\" or \"alpaca\"",
                self.data.template
            ));
        }
        if self.data.max_length < 2 {
            return Err(format!(
                "data.max_length = {} must be at least 2",
                self.data.max_length
            ));
        }
        Ok(())
    }
}

impl LoraSettings {
    /// Checks, before anything is trained, that every name of `target_modules` selects a linear
    /// module of `model` (peft's list semantics: the module's path or its last segments), so
    /// that a typo or an empty list is refused at once rather than ending in an adapter with no
    /// or fewer modules. `model_name` is how the message names the model. The error names the
    /// key and lists the model's module names
    /// (`lora.target_modules ["x"] matches no linear module of M (its modules: q_proj, ...)`).
    pub fn check_targets(
        &self,
        model: &crate::model::Model,
        model_name: &str,
    ) -> Result<(), String> {
        let paths: Vec<String> = model.linears().map(|l| l.name.clone()).collect();
        let mut names: Vec<&str> = Vec::new();
        for p in &paths {
            let last = p.rsplit('.').next().unwrap_or(p);
            if !names.contains(&last) {
                names.push(last);
            }
        }
        let matches = |targets: Vec<String>| {
            let c = crate::adapters::LoraConfig::new(self.r, self.alpha, targets);
            paths.iter().any(|p| c.targets(p))
        };
        let listed = &self.target_modules;
        let modules = names.join(", ");
        if !matches(listed.clone()) {
            return Err(format!(
                "lora.target_modules {listed:?} matches no linear module of {model_name} (its modules: {modules})"
            ));
        }
        if let Some(t) = listed.iter().find(|t| !matches(vec![(*t).clone()])) {
            return Err(format!(
                "lora.target_modules {listed:?}: {t:?} matches no linear module of {model_name} (its modules: {modules})"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_with_defaults() {
        let c = TrainConfig::from_toml(
            "method = \"dpo\"\nbeta = 0.2\noutput = \"out\"\n[data]\ntrain = \"embedded:safety_pref\"\n[optim]\nlr = 5e-5\n",
        )
        .unwrap();
        assert_eq!(c.objective, Objective::Dpo { beta: 0.2 });
        assert_eq!(c.optim.lr, 5e-5);
        assert_eq!(c.optim.batch_size, 4);
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.seed, 42);
        let sft =
            TrainConfig::from_toml("method = \"simpo\"\noutput = \"o\"\n[data]\ntrain = \"x\"\n")
                .unwrap();
        assert_eq!(
            sft.objective,
            Objective::Simpo {
                beta: 2.0,
                gamma: 1.0
            }
        );
    }

    #[test]
    fn typos_are_errors() {
        let e = TrainConfig::from_toml("method = \"sft\"\noutptu = \"o\"\n[data]\ntrain = \"x\"\n")
            .unwrap_err();
        assert!(e.contains("outptu"), "{e}");
        let e = TrainConfig::from_toml(
            "method = \"sft\"\noutput = \"o\"\n[data]\ntrain = \"x\"\n[optim]\nlearning_rate = 1\n",
        )
        .unwrap_err();
        assert!(e.contains("learning_rate"), "{e}");
        let e = TrainConfig::from_toml("method = \"ppo\"\noutput = \"o\"\n[data]\ntrain = \"x\"\n")
            .unwrap_err();
        assert!(e.contains("ppo"), "{e}");
    }

    #[test]
    fn numbers_that_cannot_train_are_named_errors() {
        let cases = [
            (
                "dpo",
                "beta = nan\n",
                "",
                "beta = NaN must be a finite number > 0",
            ),
            (
                "dpo",
                "beta = -1\n",
                "",
                "beta = -1 must be a finite number > 0",
            ),
            (
                "dpo",
                "beta = 0\n",
                "",
                "beta = 0 must be a finite number > 0",
            ),
            (
                "simpo",
                "beta = 0\n",
                "",
                "beta = 0 must be a finite number > 0",
            ),
            (
                "simpo",
                "gamma = inf\n",
                "",
                "gamma = inf must be a finite number ≥ 0",
            ),
            (
                "simpo",
                "gamma = -0.5\n",
                "",
                "gamma = -0.5 must be a finite number ≥ 0",
            ),
            (
                "orpo",
                "lambda = -0.1\n",
                "",
                "lambda = -0.1 must be a finite number ≥ 0",
            ),
            (
                "orpo",
                "lambda = inf\n",
                "",
                "lambda = inf must be a finite number ≥ 0",
            ),
            (
                "kto",
                "lambda_d = 0\n",
                "",
                "lambda_d = 0 must be a finite number > 0",
            ),
            (
                "kto",
                "lambda_u = -2\n",
                "",
                "lambda_u = -2 must be a finite number > 0",
            ),
            (
                "kto",
                "beta = -0.1\n",
                "",
                "beta = -0.1 must be a finite number > 0",
            ),
            (
                "dpo",
                "",
                "[lora]\nr = 0\n",
                "lora.r = 0 must be 1 to 65536",
            ),
            (
                "dpo",
                "",
                "[lora]\nr = 9223372036854775807\n",
                "lora.r = 9223372036854775807 must be 1 to 65536",
            ),
            (
                "dpo",
                "",
                "[lora]\nalpha = inf\n",
                "lora.alpha = inf must be a finite number > 0",
            ),
            (
                "sft",
                "",
                "[lora]\nalpha = 0\n",
                "lora.alpha = 0 must be a finite number > 0",
            ),
            (
                "sft",
                "",
                "[lora]\nalpha = -16\n",
                "lora.alpha = -16 must be a finite number > 0",
            ),
            (
                "dpo",
                "",
                "[optim]\nlr = inf\n",
                "optim.lr = inf must be a finite number > 0",
            ),
            (
                "dpo",
                "",
                "[optim]\nlr = 0.0\n",
                "optim.lr = 0 must be a finite number > 0",
            ),
            (
                "sft",
                "",
                "[optim]\nlr = -1\n",
                "optim.lr = -1 must be a finite number > 0",
            ),
            (
                "sft",
                "",
                "[optim]\nlr = -1e30\n",
                "optim.lr = -1e30 must be a finite number > 0",
            ),
            (
                "sft",
                "",
                "[optim]\nepochs = 0\n",
                "optim.epochs = 0 must be at least 1",
            ),
            (
                "sft",
                "",
                "[optim]\nepochs = 0\nmax_steps = 0\n",
                "optim.epochs = 0 must be at least 1",
            ),
            (
                "sft",
                "",
                "[optim]\nbatch_size = 0\n",
                "optim.batch_size = 0 must be at least 1",
            ),
            (
                "sft",
                "",
                "[optim]\ngrad_accum = 0\n",
                "optim.grad_accum = 0 must be at least 1",
            ),
            (
                "sft",
                "",
                "[data]\ntrain = \"x\"\nmax_length = 0\n",
                "data.max_length = 0 must be at least 2",
            ),
            (
                "dpo",
                "",
                "[optim]\nweight_decay = nan\n",
                "optim.weight_decay = NaN must be a finite number ≥ 0",
            ),
            (
                "dpo",
                "",
                "[optim]\nmax_grad_norm = -1.0\n",
                "optim.max_grad_norm = -1 must be a finite number ≥ 0",
            ),
            (
                "dpo",
                "",
                "[optim]\nwarmup_ratio = 1.5\n",
                "optim.warmup_ratio = 1.5 must be within [0, 1]",
            ),
        ];
        for (method, top, section, want) in cases {
            let data = if section.starts_with("[data]") {
                ""
            } else {
                "[data]\ntrain = \"x\"\n"
            };
            let text = format!("method = \"{method}\"\noutput = \"o\"\n{top}{section}{data}");
            assert_eq!(TrainConfig::from_toml(&text).unwrap_err(), want, "{text}");
        }
        // Zero is allowed where it turns a term off without reversing anything.
        for (method, top) in [("orpo", "lambda = 0\n"), ("simpo", "gamma = 0\n")] {
            let text =
                format!("method = \"{method}\"\n{top}output = \"o\"\n[data]\ntrain = \"x\"\n");
            assert!(TrainConfig::from_toml(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn a_parameter_of_another_method_is_an_error_naming_its_methods() {
        let parse = |method: &str, top: &str| {
            TrainConfig::from_toml(&format!(
                "method = \"{method}\"\n{top}\noutput = \"o\"\n[data]\ntrain = \"x\"\n"
            ))
        };
        assert_eq!(
            parse("sft", "beta = 0.1").unwrap_err(),
            "beta = 0.1 is a parameter of method \"dpo\", \"kto\" or \"simpo\", not of method \"sft\" (its parameters: none)"
        );
        assert_eq!(
            parse("dpo", "lambda = 0.5").unwrap_err(),
            "lambda = 0.5 is a parameter of method \"orpo\", not of method \"dpo\" (its parameters: beta)"
        );
        assert_eq!(
            parse("orpo", "lambda_u = 2.0").unwrap_err(),
            "lambda_u = 2.0 is a parameter of method \"kto\", not of method \"orpo\" (its parameters: lambda)"
        );
        assert_eq!(
            parse("kto", "gamma = 1").unwrap_err(),
            "gamma = 1 is a parameter of method \"simpo\", not of method \"kto\" (its parameters: beta, lambda_d, lambda_u)"
        );
        // its own parameters are read
        assert_eq!(
            parse("kto", "beta = 0.2\nlambda_d = 2.0")
                .unwrap()
                .objective,
            Objective::Kto {
                beta: 0.2,
                lambda_d: 2.0,
                lambda_u: 1.0
            }
        );
    }

    #[test]
    fn numbers_in_messages_are_short() {
        assert_eq!(fmt_num(1e30), "1e30");
        assert_eq!(fmt_num(5e-5), "5e-5");
        assert_eq!(fmt_num(-1.0), "-1");
        assert_eq!(fmt_num(0.01), "0.01");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(f64::NAN), "NaN");
        assert_eq!(fmt_num(f64::NEG_INFINITY), "-inf");
    }
}
