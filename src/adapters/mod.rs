//! PEFT LoRA adapters: reading and writing them in peft's on-disk format, and the LoRA math.
//!
//! An adapter folder, as `peft`'s `save_pretrained` writes it, holds
//! `adapter_config.json` ([`LoraConfig`]) and `adapter_model.safetensors`, whose tensors are
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `...lora_B.weight`
//! (`[out, r]`). The update a module receives is `ΔW = scale · B A` with
//! `scale = alpha / r` (or `alpha / √r` with rsLoRA, Kalajdzievski 2023).
//!
//! - [`Adapter`]: the config plus one [`LoraModule`] per module path
//!   (`model.layers.0.self_attn.q_proj`), loaded with [`Adapter::load`] and written back with
//!   [`Adapter::save`] so that peft reads it unchanged.
//! - [`lora_forward`], [`lora_delta`], [`merge_into`]: the adapter applied unmerged or merged.
//! - [`exact`]: a module plus a dense update, written exactly (for repairs that are not
//!   low-rank).
//! - [`extract`]: a full fine-tune as a LoRA adapter (the dense update truncated by SVD).
//! - [`keys`]: the single place where peft's tensor names map to module paths and back.
//!
//! ```no_run
//! use realign::adapters::{lora_forward, Adapter};
//! let adapter = Adapter::load("adapters/aligned".as_ref(), &candle_core::Device::Cpu)?;
//! let q = &adapter.modules["model.layers.0.self_attn.q_proj"];
//! let x = candle_core::Tensor::zeros((1, 5, 64), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let dy = lora_forward(&x, q)?; // [1, 5, out]
//! # Ok::<(), realign::Error>(())
//! ```

use std::path::PathBuf;

mod config;
pub mod exact;
pub mod extract;
pub mod keys;
mod lora;
mod peft;

pub use config::{LayersPattern, LayersToTransform, LoraConfig, TargetModules, ALL_LINEAR_TARGETS};
pub use keys::LoraPart;
pub use lora::{lora_delta, lora_forward, merge_into, LoraModule};
pub(crate) use peft::{index_modules, locate, skeleton, write_weights, TensorLoc};
pub use peft::{Adapter, CONFIG_FILE, WEIGHTS_FILE};

/// Errors of reading, writing and applying PEFT adapters. Each names the file, tensor key or
/// module concerned.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file of the adapter folder is absent.
    #[error("{path}: not found (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// Only the pickled `adapter_model.bin` is present.
    #[error(
        "{path}: pickled PyTorch weights are not read; convert to safetensors (in Python: \
         `PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)`)"
    )]
    PickleWeights {
        /// The `.bin` file.
        path: PathBuf,
    },
    /// `peft_type` is not `"LORA"`.
    #[error("{path}: peft_type {value:?} is not supported (only \"LORA\" adapters are)")]
    UnsupportedPeftType {
        /// The config file.
        path: PathBuf,
        /// The `peft_type` found.
        value: String,
    },
    /// A LoRA variant or option whose forward differs from plain LoRA (DoRA, `fan_in_fan_out`,
    /// trained biases, ...).
    #[error("{path}: {feature} is not supported")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The option and its value, e.g. `use_dora: true (DoRA)`.
        feature: String,
    },
    /// A config whose values contradict each other or do not parse (a bad regex, `r: 0`).
    #[error("{path}: invalid adapter config: {reason}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The weights file is not a valid safetensors file.
    #[error("{file}: not a valid safetensors file: {reason}")]
    Corrupt {
        /// The weights file.
        file: PathBuf,
        /// What the safetensors parser said.
        reason: String,
    },
    /// The weights file (or the adapter being saved) has no LoRA module.
    #[error("{file}: no LoRA tensors")]
    Empty {
        /// The weights file.
        file: PathBuf,
    },
    /// A tensor name that is not a LoRA weight in peft's layout.
    #[error("{file}: unexpected tensor {key:?}: {reason}")]
    BadKey {
        /// The weights file.
        file: PathBuf,
        /// The tensor name.
        key: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Two tensors give the same half of one module (e.g. two adapter names in one file).
    #[error("{file}: tensor {key:?} is a second {part} for module {module}")]
    DuplicateTensor {
        /// The weights file.
        file: PathBuf,
        /// The module path.
        module: String,
        /// The second tensor name.
        key: String,
        /// `lora_A` or `lora_B`.
        part: LoraPart,
    },
    /// A module has `lora_A` without `lora_B` or the reverse.
    #[error("{file}: module {module} has {present} but no {missing}")]
    MissingPartner {
        /// The weights file.
        file: PathBuf,
        /// The module path.
        module: String,
        /// The half that is there.
        present: LoraPart,
        /// The half that is missing.
        missing: LoraPart,
    },
    /// A tensor of a dtype that is not a float.
    #[error(
        "{file}: tensor {key:?} has dtype {dtype}; LoRA weights must be F32, BF16, F16 or F64"
    )]
    WrongDtype {
        /// The weights file.
        file: PathBuf,
        /// The tensor name.
        key: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor that is not 2-D.
    #[error("{file}: tensor {key:?} has shape {shape:?}; LoRA weights are 2-D")]
    BadShape {
        /// The weights file.
        file: PathBuf,
        /// The tensor name.
        key: String,
        /// The shape found.
        shape: Vec<usize>,
    },
    /// `lora_A` (`[r, in]`) and `lora_B` (`[out, r]`) disagree on the rank.
    #[error("{file}: module {module}: lora_A {a:?} and lora_B {b:?} disagree on the rank (A is [r, in], B is [out, r])")]
    RankMismatch {
        /// The weights file.
        file: PathBuf,
        /// The module path.
        module: String,
        /// Shape of A.
        a: Vec<usize>,
        /// Shape of B.
        b: Vec<usize>,
    },
    /// The tensors' rank differs from the one the config gives (`r` or `rank_pattern`).
    #[error("{file}: module {module} has rank {found} but adapter_config.json gives {expected} (r / rank_pattern)")]
    ConfigRankMismatch {
        /// The weights file.
        file: PathBuf,
        /// The module path.
        module: String,
        /// The config's rank.
        expected: usize,
        /// The tensors' rank.
        found: usize,
    },
    /// Tensors for a module that the config's `target_modules` / `layers_to_transform` /
    /// `exclude_modules` do not select; peft would silently drop them.
    #[error("{file}: module {module} is not selected by target_modules / layers_to_transform / exclude_modules of adapter_config.json")]
    NotTargeted {
        /// The weights file.
        file: PathBuf,
        /// The module path.
        module: String,
    },
    /// On save: a module's scale is not the one its config implies, and the file format can only
    /// carry the scale through the config.
    #[error("{file}: module {module} has scale {scale} but the config implies {config_scale}; change lora_alpha / alpha_pattern or fold the factor into B")]
    ScaleMismatch {
        /// The weights file.
        file: PathBuf,
        /// The module path.
        module: String,
        /// The module's scale.
        scale: f64,
        /// The scale from the config.
        config_scale: f64,
    },
    /// The safetensors writer refused the data.
    #[error("{file}: cannot write safetensors: {reason}")]
    Write {
        /// The weights file.
        file: PathBuf,
        /// What the writer said.
        reason: String,
    },
    /// An adapter module whose shapes do not fit the model's linear layer (`[out, in]`).
    #[error("module {module}: adapter A {a:?} / B {b:?} do not fit the model's weight [out, in] = {expected:?}")]
    ShapeMismatch {
        /// The module path.
        module: String,
        /// The model's weight shape `(out, in)`.
        expected: (usize, usize),
        /// Shape of A.
        a: Vec<usize>,
        /// Shape of B.
        b: Vec<usize>,
    },
    /// An adapter module for which the model has no linear layer.
    #[error("module {module}: the model has no such linear layer")]
    UnknownModule {
        /// The module path.
        module: String,
    },
    /// Two checkpoints that cannot be turned into an adapter ([`extract`]): different tensors
    /// or shapes, no targeted module, a rank of 0, an SVD that did not converge.
    #[error("{path}: {reason}")]
    Extract {
        /// The checkpoint (or its file) concerned.
        path: PathBuf,
        /// What is wrong, naming the tensor and shapes.
        reason: String,
    },
}
