//! Evaluation: the two numbers every realignment is judged by (see `docs/METHODS.md`,
//! "Metrics").
//!
//! - **Harmfulness score (HS)**: the percentage of harmful prompts (AdvBench, Do-Not-Answer, …)
//!   whose greedy reply is harmful according to the refusal-keyword [`judge`] (a non-empty reply
//!   that contains none of GCG's [`REFUSAL_PREFIXES`]) or, optionally, a judge model that
//!   realign runs itself and that answers safe/unsafe ([`model_judge`]).
//!   Beside it, the **non-degenerate** harmfulness: keyword-harmful replies that are not a loop,
//!   a restatement of the request, noise or a stub ([`degenerate()`]).
//! - **Fine-tuning accuracy (FA)**: GSM8K by the final-answer number, and classification by
//!   label word (the authors' substring rule, and a strict first-label rule reported beside it);
//!   see [`accuracy`].
//! - **Over-refusal (OR)**: the percentage of benign (including benign-but-edgy) prompts whose
//!   greedy reply holds a refusal phrase ([`judge_overrefusal`]).
//!
//! Every number is reported with its `n` and 95 % Wilson interval ([`stats::Rate`]), and a
//! `limit` evaluates a seeded sample of each set ([`sample_rows`]), never its first rows.
//!
//! [`evaluate()`] measures them for one model in one call and keeps every sample
//! ([`EvalOutcome`], written by [`EvalOutcome::write`] as `harmful.jsonl`, `task.jsonl`,
//! `overrefusal.jsonl`, `summary.json`); it is what `realign eval` runs. Prompts are rendered as
//! one-turn chats with the model's template and answered greedily in left-padded batches
//! ([`replies`]).
//!
//! | file | concept |
//! |---|---|
//! | [`evaluate`](mod@evaluate) | [`evaluate()`], [`EvalOptions`], [`EvalOutcome`], the output files |
//! | [`judge`] | the refusal-keyword judge (GCG's list) |
//! | [`model_judge`] | the judge model: Llama-Guard-style prompt, verdict parsing |
//! | [`replies`] | prompts → chat → greedy replies, batched, with progress |
//! | [`harmfulness`] | the harmfulness score from prompts (keyword judge) |
//! | [`accuracy`] | GSM8K answer extraction, label rules, task kind, task accuracy |
//! | [`degenerate`](mod@degenerate) | the non-degenerate-compliance check |
//! | [`stats`] | [`Rate`]: counts with 95 % Wilson intervals |
//! | [`judges`] | judges as named methods (`keyword`, `keyword+coherence`, `model:PATH`, `ensemble:PATH`) |
//! | [`human_labels`] | PyRIT's human-labelled refusal, harm and objective sets |
//! | [`agreement`] | a judge against humans: accuracy, Cohen's κ, precision, recall |
//! | [`judge_eval`](mod@judge_eval) | every judge on every human set (`realign judge-eval`) |
//!
//! ```no_run
//! use realign::eval::{evaluate, EvalOptions};
//! use realign::model::{LoadOptions, LoadedModel};
//! let m = LoadedModel::load(&realign::assets::default_model(), &LoadOptions::default())?;
//! let out = evaluate(&m, &EvalOptions { limit: 20, ..Default::default() })?;
//! println!("HS = {:?}%, FA = {:?}%, OR = {:?}%", out.harmfulness, out.accuracy, out.overrefusal);
//! out.write("runs/eval-base".as_ref())?;
//! # Ok::<(), realign::Error>(())
//! ```

pub mod accuracy;
pub mod agreement;
pub mod degenerate;
pub mod evaluate;
pub mod harmfulness;
pub mod human_labels;
pub mod judge;
pub mod judge_eval;
pub mod judges;
pub mod model_judge;
pub mod replies;
pub mod stats;

pub use accuracy::{
    first_label, gsm8k_answer, gsm8k_correct, label_first_correct, label_substring_correct,
    task_accuracy, AccuracyReport, ItemResult, TaskKind,
};
pub use agreement::{cohen_kappa, Agreement, Confusion, Kappa};
pub use degenerate::{degenerate, Degenerate};
pub use evaluate::{
    evaluate, evaluate_judged, evaluate_with_judge, harmful_records, judge_overrefusal,
    sample_rows, EvalColumns, EvalOptions, EvalOutcome, EvalSummary, HarmfulRecord, HarmfulSummary,
    JudgeSpec, OverRefusalRecord, OverRefusalSummary, SettingsSummary, TaskSummary, Verdict,
    DEFAULT_HARMFUL, DEFAULT_OVERREFUSAL, DEFAULT_SAMPLE_SEED, DEFAULT_TASK,
};
pub use harmfulness::{harmfulness_score, HarmfulnessReport};
pub use human_labels::{LabelSet, LabeledRow, HARM_THRESHOLD};
pub use judge::{
    is_harmful_keyword, is_harmful_keyword_with, is_refusal, is_refusal_with, refusal_match,
    REFUSAL_PREFIXES,
};
pub use judge_eval::{judge_eval, JudgeEvalReport, SetAgreement};
pub use judges::{Judge, JudgeOptions, Question, JUDGES};
pub use model_judge::{
    judge_message, judge_prompt, judge_with_model, parse_verdict, ModelVerdict, JUDGE_TEMPLATE,
};
pub use replies::{chat_replies, render_prompt, EvalConfig, DEFAULT_BATCH_SIZE};
pub use stats::{wilson, Rate};

/// Errors of the evaluation settings and data.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An unusable setting (a batch size of 0, a classification task without labels).
    #[error("invalid evaluation setting: {0}")]
    Config(String),
    /// A prompt that fills the model's positions on its own (chat template included): no room
    /// for a reply. Raised before anything is generated.
    #[error(
        "{data}: row {row} (from 0{}) of the {set} set is {tokens} tokens with the chat \
         template, but the model's max_position_embeddings is {positions}: no room for a reply \
         (max new tokens {max_new_tokens}); shorten or drop the row",
        if *filtered { ", counting the rows that pass --where" } else { "" }
    )]
    PromptTooLong {
        /// `harmful`, `task` or `benign`.
        set: String,
        /// The set's data source (a file or `embedded:NAME`).
        data: String,
        /// The row's index among the rows read (from 0; after any `--where` filters).
        row: usize,
        /// Whether `--where` filters chose the rows.
        filtered: bool,
        /// The prompt's length in tokens, chat template included.
        tokens: usize,
        /// The model's `max_position_embeddings`.
        positions: usize,
        /// The new tokens asked for each reply.
        max_new_tokens: usize,
    },
    /// A GSM8K gold answer that holds no number.
    #[error("item {index}: gold answer {gold:?} holds no number")]
    BadGold {
        /// The item's position (from 0).
        index: usize,
        /// The gold answer.
        gold: String,
    },
    /// A task row of a data file whose gold answer is unusable ([`EvalError::BadGold`] or
    /// [`EvalError::UnknownLabel`] with the file and row it came from). Raised before anything
    /// is generated.
    #[error(
        "{data}: row {row} (from 0{}) of the task set: gold answer {gold:?} {problem}",
        if *filtered { ", counting the rows that pass --where" } else { "" }
    )]
    TaskGold {
        /// The task set's data source (a file or `embedded:NAME`).
        data: String,
        /// The row's index among the rows read (from 0; after any `--where` filters).
        row: usize,
        /// Whether `--where` filters chose the rows.
        filtered: bool,
        /// The gold answer.
        gold: String,
        /// What is wrong with it, and how to fix it.
        problem: String,
    },
    /// A classification gold answer that is not one of the task's labels.
    #[error("item {index}: gold label {gold:?} is not one of the labels {labels:?}")]
    UnknownLabel {
        /// The item's position (from 0).
        index: usize,
        /// The gold answer.
        gold: String,
        /// The task's labels.
        labels: Vec<String>,
    },
}
