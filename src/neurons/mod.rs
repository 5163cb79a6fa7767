//! Safety neurons (Zhao et al., "Understanding and enhancing safety mechanisms of LLMs via
//! safety-specific neuron"): the neuron-set file, detection, the deactivation check, SN-Tune
//! and RSN-Tune.
//!
//! | file | paper |
//! |---|---|
//! | [`set`] | the set of neurons (rows/columns of full-model weights), overlap ratio (§2.3) |
//! | [`deactivate`](mod@deactivate) | zeroing a set, the random control `Deact-R`, the Table 1 check (§2.2) |
//! | [`random_draws`] | Deact-SN placed among several `Deact-R` draws: mean, range, Monte Carlo p-value |
//! | [`sn_tune`](mod@sn_tune) | SN-Tune (§3) and RSN-Tune (§4): training only the selected neurons |
//! | [`importance`] | per-prompt importance of every neuron, exact (Eqs. 4, 8-14) or the authors' proxy |
//! | [`detect`](mod@detect) | streaming detection: per-prompt selection (ε or per-layer top-k, Eq. 2), intersection over the corpus (Eq. 3), report, overlap of two sets |
//! | [`scope`] | which tokens of a prompt count: the user's content by default (issue 12) |
//! | [`ranking`] | the mean importance of every neuron over a corpus, for the `Deact-F` control |
//! | [`perplexity`](mod@perplexity) | perplexity on held-out general text, beside HS in the deactivation check |
//! | [`plot`] | the per-layer plot of a detected set (attention vs FFN) |

use std::path::PathBuf;

pub mod deactivate;
pub mod detect;
pub mod importance;
pub mod perplexity;
pub mod plot;
pub mod random_draws;
pub mod ranking;
pub mod scope;
pub mod set;
pub mod sn_tune;

pub use deactivate::{
    deactivate, deactivation_check, fold_adapters, foundation_like, random_like, DeactivationCheck,
    DeactivationSummary, Variant, VariantResult,
};
pub use detect::{detect, overlap, DetectConfig, DetectReport, OverlapReport, Selection};
pub use importance::{ImportanceKind, LayerImportance, NeuronImportance};
pub use perplexity::{perplexity, PerplexityRatio, PerplexityReport};
pub use random_draws::{compare_rates, compare_with_random, Draw, HsMetric, RandomComparison};
pub use ranking::NeuronRanking;
pub use scope::TokenScope;
pub use set::{Axis, ModuleNeurons, NeuronSet};
pub use sn_tune::{
    rsn_tune_set, sn_tune, write_outcome, NeuronDeltas, SnTuneConfig, SnTuneOutcome, SnTuneReport,
};

/// Errors of the safety-neuron stages.
#[derive(Debug, thiserror::Error)]
pub enum NeuronError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A set file is malformed.
    #[error("{path}: not a neuron-set file: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Two inputs do not fit together (sets for different models, a set for another model).
    #[error("mismatched inputs: {0}")]
    Mismatch(String),
    /// A bad option value.
    #[error("{0}")]
    Invalid(String),
    /// A well-formed set file that cannot be used: empty where neurons are needed, or listing
    /// a module twice.
    #[error("{path}: {what}")]
    BadSet {
        /// The file.
        path: PathBuf,
        /// What is wrong (`the set is empty`, `module … is listed twice`).
        what: String,
    },
    /// SN-Tune's loss or gradient norm became NaN or infinite (or its deltas did): the run
    /// stops and writes no model.
    #[error("SN-Tune diverged at step {step} ({what}); lower --lr ({lr})")]
    Diverged {
        /// The optimizer step (1-based).
        step: usize,
        /// What is not finite, with its value (`loss NaN`, `gradient norm inf`).
        what: String,
        /// The run's peak learning rate, as a message writes it.
        lr: String,
    },
}
