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

impl TrainConfig {
    /// Reads a TOML file; unknown keys are errors (a typo must not silently fall back to a
    /// default).
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

    /// Parses TOML text; the error is a sentence naming the key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let raw: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        for key in raw.keys() {
            if !TOP_KEYS.contains(&key.as_str()) && !OBJECTIVE_KEYS.contains(&key.as_str()) {
                return Err(format!("unknown key {key:?} (expected one of {TOP_KEYS:?} or an objective parameter {OBJECTIVE_KEYS:?})"));
            }
        }
        let cfg: TrainConfig = toml::Value::Table(raw)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let o = &self.optim;
        if o.batch_size == 0 || o.grad_accum == 0 || o.epochs == 0 {
            return Err(
                "optim.batch_size, optim.grad_accum and optim.epochs must be at least 1".into(),
            );
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(format!(
                "optim.lr must be a finite number > 0 (got {})",
                o.lr
            ));
        }
        for (key, v) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.max_grad_norm", o.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{key} must be a finite number ≥ 0 (got {v})"));
            }
        }
        if !(0.0..=1.0).contains(&o.warmup_ratio) {
            return Err(format!(
                "optim.warmup_ratio must be within [0, 1] (got {})",
                o.warmup_ratio
            ));
        }
        if self.lora.r == 0 || self.lora.r > super::MAX_LORA_RANK {
            return Err(format!(
                "lora.r must be 1 to {} (got {})",
                super::MAX_LORA_RANK,
                self.lora.r
            ));
        }
        if !self.lora.alpha.is_finite() {
            return Err(format!(
                "lora.alpha must be a finite number (got {})",
                self.lora.alpha
            ));
        }
        let params = self.objective.parameters();
        if let Some((key, v)) = params.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{key} must be a finite number (got {v})"));
        }
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
            return Err("data.max_length must be at least 2".into());
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
        let head = "method = \"dpo\"\noutput = \"o\"\n";
        let cases = [
            ("beta = nan\n", "", "beta must be a finite number (got NaN)"),
            ("", "[lora]\nr = 0\n", "lora.r must be 1 to 65536 (got 0)"),
            (
                "",
                "[lora]\nr = 9223372036854775807\n",
                "lora.r must be 1 to 65536 (got 9223372036854775807)",
            ),
            (
                "",
                "[lora]\nalpha = inf\n",
                "lora.alpha must be a finite number (got inf)",
            ),
            (
                "",
                "[optim]\nlr = inf\n",
                "optim.lr must be a finite number > 0 (got inf)",
            ),
            (
                "",
                "[optim]\nlr = 0.0\n",
                "optim.lr must be a finite number > 0 (got 0)",
            ),
            (
                "",
                "[optim]\nweight_decay = nan\n",
                "optim.weight_decay must be a finite number ≥ 0 (got NaN)",
            ),
            (
                "",
                "[optim]\nmax_grad_norm = -1.0\n",
                "optim.max_grad_norm must be a finite number ≥ 0 (got -1)",
            ),
            (
                "",
                "[optim]\nwarmup_ratio = 1.5\n",
                "optim.warmup_ratio must be within [0, 1] (got 1.5)",
            ),
        ];
        for (top, section, want) in cases {
            let text = format!("{head}{top}[data]\ntrain = \"x\"\n{section}");
            assert_eq!(TrainConfig::from_toml(&text).unwrap_err(), want, "{text}");
        }
        let e = TrainConfig::from_toml(
            "method = \"simpo\"\ngamma = inf\noutput = \"o\"\n[data]\ntrain = \"x\"\n",
        )
        .unwrap_err();
        assert_eq!(e, "gamma must be a finite number (got inf)");
    }
}
