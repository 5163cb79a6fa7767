//! Checkpoint tensors by Hugging Face name, from single or sharded safetensors (f32/bf16/f16,
//! stored as [`StorageDtype`] says) or from a dequantised GGUF file (see [`super::gguf`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::storage::StorageDtype;
use super::ModelError;

/// The tensors of a checkpoint, taken one by one while the model is built.
#[derive(Debug)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Which file each tensor came from (for error messages).
    files: HashMap<String, PathBuf>,
    /// The checkpoint (folder or file) as the user named it.
    source: PathBuf,
}

impl Weights {
    /// Wraps tensors read from `source`.
    pub fn new(tensors: HashMap<String, Tensor>, source: &Path) -> Self {
        let files = tensors
            .keys()
            .map(|k| (k.clone(), source.to_path_buf()))
            .collect();
        Self {
            tensors,
            files,
            source: source.to_path_buf(),
        }
    }

    /// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`, as
    /// f32 (for arithmetic on the weights themselves, e.g. `W_a - W_base`).
    pub fn from_hf_dir(dir: &Path, device: &Device) -> crate::Result<Self> {
        Self::from_hf_dir_as(dir, device, StorageDtype::F32)
    }

    /// [`Weights::from_hf_dir`], with the matrices stored as `dtype` says.
    pub fn from_hf_dir_as(dir: &Path, device: &Device, dtype: StorageDtype) -> crate::Result<Self> {
        let shards = shard_files(dir)?;
        let mut tensors = HashMap::new();
        let mut files = HashMap::new();
        for shard in &shards {
            for (name, t) in load_safetensors(shard, device, dtype)? {
                files.insert(name.clone(), shard.clone());
                tensors.insert(name, t);
            }
        }
        Ok(Self {
            tensors,
            files,
            source: dir.to_path_buf(),
        })
    }

    /// Whether a tensor of that name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns the tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> crate::Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.source.clone(),
                key: name.to_string(),
                expected: shape.to_vec(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::TensorShape {
                path: self
                    .files
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| self.source.clone()),
                key: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            }
            .into());
        }
        Ok(t)
    }

    /// Names not taken yet (sorted).
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}

/// The safetensors files of a Hugging Face folder: `model.safetensors`, or every shard named in
/// `model.safetensors.index.json` (sorted, each once).
pub fn shard_files(dir: &Path) -> crate::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if !index.is_file() {
        return Err(ModelError::MissingFile {
            path: single,
            what: "model weights (model.safetensors or model.safetensors.index.json)".into(),
        }
        .into());
    }
    let idx: serde_json::Value = crate::fsutil::read_json(&index)?;
    let map = idx
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::BadWeights {
            path: index.clone(),
            reason: "no \"weight_map\" object".into(),
        })?;
    let mut files = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        // A shard is a file of the folder itself: a plain name, no folder, no `..`.
        let name = file.as_str().filter(|f| {
            let mut parts = Path::new(f).components();
            matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            )
        });
        let Some(name) = name else {
            return Err(ModelError::BadWeights {
                path: index.clone(),
                reason: format!(
                    "weight_map[{tensor:?}] is {file}; expected the file name of a shard in \
                     the model folder (\"model-00001-of-00002.safetensors\")"
                ),
            }
            .into());
        };
        files.push(dir.join(name));
    }
    if files.is_empty() {
        return Err(ModelError::BadWeights {
            path: index,
            reason: "empty weight_map".into(),
        }
        .into());
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Loads one safetensors file: matrices stored as `dtype` says, other tensors as f32.
///
/// The file is memory-mapped, not read: each tensor is copied out of the map and its pages are
/// handed back right after, so that loading holds one copy of the weights (plus the tensor
/// being converted), not the file's bytes and the tensors both.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
    dtype: StorageDtype,
) -> crate::Result<HashMap<String, Tensor>> {
    let file = crate::fsutil::Mapped::open(path)?;
    let bad = |reason: String| ModelError::BadWeights {
        path: path.to_path_buf(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(file.bytes())
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let loc = crate::adapters::TensorLoc::of_view(&view, file.bytes());
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
        file.release(&[&loc]);
        let t = match t.dtype() {
            d @ (DType::F32 | DType::BF16 | DType::F16 | DType::F64) => dtype.store(t, Some(d))?,
            other => {
                return Err(bad(format!(
                    "tensor {name:?} has dtype {other:?}; expected f32, bf16 or f16"
                ))
                .into())
            }
        };
        crate::fsutil::check_finite(&t, path, &name)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The dtype of the first floating tensor of a safetensors header (for `inspect`).
pub fn safetensors_dtype(path: &Path) -> crate::Result<String> {
    // Mapped: only the header's pages are read.
    let file = crate::fsutil::Mapped::open(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(file.bytes()).map_err(|e| {
        ModelError::BadWeights {
            path: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {e}"),
        }
    })?;
    Ok(meta
        .tensors()
        .values()
        .next()
        .map(|i| format!("{:?}", i.dtype))
        .unwrap_or_default())
}
