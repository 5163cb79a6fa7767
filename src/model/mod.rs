//! The model runtime: load a Llama-family model from a Hugging Face folder or a GGUF file, attach
//! PEFT adapters, run it (batched, cached, with activation hooks) and generate.
//!
//! - [`config`]: `config.json` / GGUF metadata → [`Config`]
//! - [`weights`], [`gguf`]: checkpoint tensors by Hugging Face name, kept in the dtype
//!   [`storage`] says (bf16/f16 stay narrow; arithmetic is f32, see [`matmul`])
//! - [`llama`]: the decoder ([`Model`]); [`rope`], [`linear`], [`cache`], [`capture`]: its parts
//! - [`generate`](mod@generate): greedy and sampled generation; [`continuous`]: a queue of
//!   prompts through a fixed number of slots (continuous batching), as evaluation generates
//! - [`export`]: write a model (with its tokenizer) as a Hugging Face folder
//! - [`synthetic`]: a random-weight checkpoint of Llama-3-8B's exact shape (`realign synthetic`)

pub mod attention;
pub mod autograd;
pub(crate) mod block_op;
pub mod bmm;
pub mod cache;
pub mod capture;
pub mod config;
pub mod continuous;
pub mod expf;
pub mod export;
pub mod frozen;
pub mod fused_attention;
pub mod fused_layer;
pub mod fused_lora;
pub mod fused_mlp;
pub mod gemm;
pub mod gemv;
pub mod generate;
pub mod gguf;
pub mod linear;
pub mod llama;
pub(crate) mod lora_set;
pub(crate) mod mapped;
pub mod matmul;
pub mod parallel;
pub mod prefetch;
pub mod prefill_attention;
pub mod rms_norm;
pub mod rope;
pub mod scores;
pub mod softmax;
pub mod storage;
pub mod synthetic;
pub mod tile;
pub mod tile_major;
pub mod weights;

/// Helpers shared by the model's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// `max |a - b|` over all elements (NaN when the shapes differ).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
        d.and_then(|d| d.to_scalar::<f32>()).unwrap_or(f32::NAN)
    }

    /// The bit patterns of a tensor's elements, for comparisons to the bit.
    pub fn bits(x: &Tensor) -> Vec<u32> {
        let v = x.flatten_all().and_then(|x| x.to_vec1::<f32>());
        v.map(|v| v.iter().map(|x| x.to_bits()).collect())
            .unwrap_or_default()
    }

    /// `n` seeded values in [-1, 1) from a xorshift generator (the same for every seed on
    /// every machine).
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

use std::path::{Path, PathBuf};

use candle_core::Device;
use thiserror::Error;

pub use cache::KvCache;
pub use capture::{Capture, Hook};
pub use config::{Architecture, Config, RopeScaling, RopeScalingKind, LINEAR_MODULES};
pub use continuous::generate_continuous;
pub use export::{export_hf, export_hf_with};
pub use generate::{generate, shared_prefix, GenerationConfig, Sampling, MIN_SHARED_PREFIX};
pub use llama::{ForwardArgs, Logits, Model};
pub use storage::StorageDtype;

use crate::adapters::{Adapter, AdapterError};
use crate::tokenizer::Tokenizer;

/// Errors of model loading and running.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A required file is absent.
    #[error("{path}: missing {what}")]
    MissingFile {
        /// Where it was looked for.
        path: PathBuf,
        /// What it should hold.
        what: String,
    },
    /// `config.json` is unusable.
    #[error("{path}: {reason}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// A weights file is unusable.
    #[error("{path}: {reason}")]
    BadWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF file is unusable.
    #[error("{path}: {reason}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint lacks a tensor the config requires.
    #[error("{path}: tensor {key:?} is missing (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// Its name.
        key: String,
        /// Its expected shape.
        expected: Vec<usize>,
    },
    /// A tensor's shape disagrees with the config.
    #[error("{path}: tensor {key:?} has shape {actual:?}, expected {expected:?} from config")]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// From the config.
        expected: Vec<usize>,
        /// On disk.
        actual: Vec<usize>,
    },
    /// The path is neither a model folder nor a `.gguf` file.
    #[error("{0}: not a model (expected a Hugging Face folder with config.json, or a .gguf file)")]
    NotAModel(PathBuf),
    /// Unusable input to the runtime (empty prompt, position out of range, …).
    #[error("{0}")]
    Input(String),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the weights go.
    pub device: Device,
    /// The dtype the matrices are kept in (default: the checkpoint's own).
    pub dtype: StorageDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: StorageDtype::Auto,
        }
    }
}

impl LoadOptions {
    /// The default storage dtype on `device`.
    pub fn on(device: Device) -> Self {
        Self {
            device,
            dtype: StorageDtype::Auto,
        }
    }
}

/// What the checkpoint was, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSource {
    /// The path the user gave.
    pub path: PathBuf,
    /// `hf-folder` or `gguf`.
    pub format: String,
    /// Storage dtype on disk (`F32`, `BF16`, `Q4_1`, …).
    pub dtype: String,
}

/// A model with its tokenizer.
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Where it came from.
    pub source: ModelSource,
}

impl LoadedModel {
    /// Loads a Hugging Face folder (`config.json`, safetensors, `tokenizer.json`) or a GGUF file.
    pub fn load(path: &Path, opts: &LoadOptions) -> crate::Result<Self> {
        let dev = &opts.device;
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            if !cfg_path.is_file() {
                let what = if path.join("adapter_config.json").is_file() {
                    "model configuration: this folder holds a PEFT adapter \
                     (adapter_config.json), not a model; give the base model as the model \
                     and the folder as an adapter (--adapter)"
                } else {
                    "model configuration"
                };
                return Err(ModelError::MissingFile {
                    path: cfg_path,
                    what: what.into(),
                }
                .into());
            }
            let cfg = Config::from_hf_file(&cfg_path)?;
            let weights = weights::Weights::from_hf_dir_as(path, dev, opts.dtype)?;
            let shards = weights::shard_files(path)?;
            let first = shards.first().ok_or_else(|| ModelError::MissingFile {
                path: path.join("model.safetensors"),
                what: "model weights".into(),
            })?;
            let dtype = weights::safetensors_dtype(first)?;
            let model = Model::new(cfg, weights, dev)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            Ok(Self {
                model,
                tokenizer,
                source: ModelSource {
                    path: path.into(),
                    format: "hf-folder".into(),
                    dtype,
                },
            })
        } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            let content = gguf::read_content(path)?;
            let cfg = gguf::config_from_gguf(&content, path)?;
            let dtype = content
                .tensor_infos
                .get("blk.0.attn_q.weight")
                .map(|t| format!("{:?}", t.ggml_dtype))
                .unwrap_or_default();
            let weights = gguf::load_weights(&content, path, &cfg, dev, opts.dtype)?;
            let tokenizer = Tokenizer::from_gguf(path, &content)?;
            let model = Model::new(cfg, weights, dev)?;
            Ok(Self {
                model,
                tokenizer,
                source: ModelSource {
                    path: path.into(),
                    format: "gguf".into(),
                    dtype,
                },
            })
        } else if !path.exists() {
            Err(crate::Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or folder (expected a Hugging Face model folder with \
                     config.json, or a .gguf file)",
                ),
            ))
        } else {
            Err(ModelError::NotAModel(path.into()).into())
        }
    }
}

/// How an adapter is put into the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterMode {
    /// Kept apart: `y = x W^T + s (x A^T) B^T` (needed to train or analyse the adapter).
    #[default]
    Unmerged,
    /// Folded into the weights: `W += s B A` (faster inference). Only into f32 weights: a module
    /// stored as bf16/f16 keeps the adapter unmerged (merging would round the update into the
    /// narrow dtype or double the module's memory; unmerged is exact and costs `r (in + out)`
    /// multiply-adds per token).
    Merged,
}

impl Model {
    /// Attaches an adapter (after any attached before), checking that every module exists and
    /// every shape fits.
    pub fn apply_adapter(&mut self, adapter: &Adapter, mode: AdapterMode) -> crate::Result<()> {
        let cfg = self.config().clone();
        for (name, m) in &adapter.modules {
            let local = name
                .split_once(".layers.")
                .and_then(|(_, rest)| rest.split_once('.'))
                .filter(|(i, _)| i.parse::<usize>().is_ok_and(|i| i < cfg.num_hidden_layers))
                .map(|(_, l)| l);
            let Some((out, inp)) = local.and_then(|l| cfg.linear_shape(l)) else {
                return Err(AdapterError::UnknownModule {
                    module: name.clone(),
                }
                .into());
            };
            m.check_shape(name, (out, inp))?;
        }
        for lin in self.linears_mut() {
            if let Some(m) = adapter.modules.get(&lin.name) {
                let narrow = lin.weight.dtype() != candle_core::DType::F32;
                match mode {
                    AdapterMode::Merged if !narrow => {
                        lin.weight = crate::adapters::merge_into(&lin.weight, m)?
                    }
                    _ => lin.loras.push(m.clone()),
                }
            }
        }
        Ok(())
    }
}
