//! The crate-wide error type: one variant per library area, each area with its own enum
//! carrying the file, key and shape that went wrong.

use std::path::PathBuf;

/// Any error of the realign library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running a model.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Tokenizers and chat templates.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// PEFT adapters.
    #[error(transparent)]
    Adapter(#[from] crate::adapters::AdapterError),
    /// Evaluation settings or data.
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    /// Training.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// Data files, embedded data sets, encoding and mixing.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// NLSR and Safe LoRA: mismatched adapters or masks, bad options.
    #[error(transparent)]
    Nlsr(#[from] crate::nlsr::NlsrError),
    /// Safety neurons: set files, detection, SN-Tune.
    #[error(transparent)]
    Neurons(#[from] crate::neurons::NeuronError),
    /// The experiment runner: its file, a failed stage.
    #[error(transparent)]
    Experiment(#[from] crate::experiment::ExperimentError),
    /// Charts: drawing or encoding a plot.
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    /// A tensor operation failed inside candle (a bug or an unsupported shape).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An output path that exists already (a command replaces it only with `--overwrite`).
    #[error("{path} already exists: pass --overwrite to replace it (nothing was written)")]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// A folder that another run holds (see [`crate::fsutil::DirLock`]).
    #[error(
        "{path} is in use by another realign run ({holder}); wait for it to end or choose \
         another output folder (nothing was written)"
    )]
    Busy {
        /// The folder.
        path: PathBuf,
        /// Who holds it, as the lock file says (`pid N, since UNIX-SECONDS`).
        holder: String,
    },
    /// A tensor holding NaN or infinite values, read from a file or about to be written.
    #[error(
        "{path}: tensor {tensor:?} holds {count} NaN or infinite value(s); refusing to use it"
    )]
    NonFinite {
        /// The file read or written.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// How many of its values are not finite.
        count: usize,
    },
    /// A JSON file whose value at a key is missing or of the wrong type.
    #[error("{path}: key `{key}`: {message}")]
    JsonValue {
        /// The file.
        path: PathBuf,
        /// The key, as a path from the top (`rope_scaling.factor`, `target_modules[2]`).
        key: String,
        /// What serde said.
        message: String,
    },
    /// A JSON file that does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
