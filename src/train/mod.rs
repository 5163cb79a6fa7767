//! Training LoRA adapters on a frozen base model: the causal-LM objective on response tokens
//! ([`loss`]), the preference objectives DPO, ORPO, KTO and SimPO ([`objectives`]), AdamW with
//! torch's semantics and gradient clipping ([`adamw`]), learning-rate schedules ([`schedule`]),
//! trainable LoRA variables ([`trainable`]) and the training loop ([`trainer`]).

pub mod adamw;
pub mod config;
pub mod loss;
pub mod objectives;
pub mod schedule;
pub mod trainable;
pub mod trainer;

pub use adamw::{accumulate, clip_grad_norm, collect_grads, AdamW, AdamWParams, Grads};
pub use config::TrainConfig;
pub use loss::LabelLogprobs;
pub use objectives::Objective;
pub use schedule::{lr_at, Schedule};
pub use trainable::{TrainableLora, TrainableModule};
pub use trainer::{check_output, train, train_with, StepLog, TrainOptions, TrainReport};

/// The largest LoRA rank a run file or an experiment stage may ask for (2^16; peft's ranks in
/// use are ≤ 1,024): the adapter's matrices are allocated from it before anything else checks.
pub const MAX_LORA_RANK: usize = 1 << 16;

use std::path::PathBuf;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config file is unusable.
    #[error("{path}: {reason}")]
    Config {
        /// The TOML file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// Nothing to train on.
    #[error("no training examples ({dropped} rows dropped because the prompt alone exceeds data.max_length)")]
    NoExamples {
        /// Rows dropped for length.
        dropped: usize,
    },
    /// A row of the wrong kind for the method (e.g. an SFT row for DPO).
    #[error("row {row} is a {kind} row, but the method needs {method} rows")]
    WrongRowKind {
        /// Index of the row.
        row: usize,
        /// What it is.
        kind: String,
        /// What the method needs.
        method: String,
    },
    /// `lora.target_modules` selects no linear module of the model (or one of its names
    /// selects none); the reason names the key and lists the model's modules.
    #[error("{reason}")]
    Targets {
        /// What is wrong (see [`config::LoraSettings::check_targets`]).
        reason: String,
    },
    /// The loss or the gradient norm became NaN or infinite: the run stops before the update
    /// and writes no adapter.
    #[error("training diverged at step {step} ({what}); lower optim.lr ({lr})")]
    Diverged {
        /// The optimizer step (1-based) whose loss or gradient is not finite.
        step: usize,
        /// What is not finite, with its value (`loss NaN`, `gradient norm inf`).
        what: String,
        /// The run's `optim.lr`, as a message writes it.
        lr: String,
    },
    /// The output folder holds checkpoints of an unfinished run and neither `--resume` nor
    /// `--overwrite` was given.
    #[error("{path} holds checkpoint-{step} of an unfinished run: pass --resume to continue it or --overwrite to start again (nothing was written)")]
    Unfinished {
        /// The output folder.
        path: PathBuf,
        /// Its newest checkpoint's step.
        step: usize,
    },
    /// Internal: a reference-based objective without reference log-probabilities.
    #[error("the objective needs reference log-probabilities")]
    NoReference,
}
