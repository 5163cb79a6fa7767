//! A Hugging Face checkpoint folder read in place: `model.safetensors` or the shards of
//! `model.safetensors.index.json`, memory-mapped, every tensor located by name from the headers
//! and read one at a time, so that a stage that walks the model module by module holds one
//! module in memory, never the whole checkpoint.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::weights::shard_files;
use super::ModelError;
use crate::adapters::TensorLoc;
use crate::fsutil::Mapped;

/// A checkpoint folder whose safetensors files are memory-mapped.
pub(crate) struct MappedCheckpoint {
    dir: PathBuf,
    shards: Vec<(PathBuf, Mapped)>,
    /// Tensor name -> (index into `shards`, where it lies).
    tensors: BTreeMap<String, (usize, TensorLoc)>,
}

impl MappedCheckpoint {
    /// Maps every safetensors file of `dir` and indexes its tensors. Errors name the file: a
    /// folder without weights, a corrupt file, a tensor present in two shards.
    pub(crate) fn open(dir: &Path) -> crate::Result<Self> {
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, path) in shard_files(dir)?.into_iter().enumerate() {
            let file = Mapped::open(&path)?;
            let st =
                SafeTensors::deserialize(file.bytes()).map_err(|e| ModelError::BadWeights {
                    path: path.clone(),
                    reason: format!("not a valid safetensors file: {e}"),
                })?;
            for (name, view) in st.tensors() {
                let loc = TensorLoc::of_view(&view, file.bytes());
                if tensors.insert(name.clone(), (i, loc)).is_some() {
                    return Err(ModelError::BadWeights {
                        path: path.clone(),
                        reason: format!("tensor {name:?} is also in another shard"),
                    }
                    .into());
                }
            }
            shards.push((path, file));
        }
        Ok(MappedCheckpoint {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// The folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape of `name`, if present.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, l)| l.shape.as_slice())
    }

    /// The file that holds `name` (the folder when absent).
    pub(crate) fn file_of(&self, name: &str) -> &Path {
        self.tensors
            .get(name)
            .map_or(self.dir.as_path(), |(i, _)| self.shards[*i].0.as_path())
    }

    /// The values of `name` as f32 (borrowed from the map for aligned f32 files; bf16, f16 and
    /// f64 converted). Errors name the file and key: an absent tensor, a non-float dtype, a
    /// non-finite value.
    pub(crate) fn values(&self, name: &str) -> crate::Result<Cow<'_, [f32]>> {
        let (i, loc) = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                key: name.to_string(),
                expected: Vec::new(),
            })?;
        let path = &self.shards[*i].0;
        if !matches!(
            loc.dtype,
            Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64
        ) {
            return Err(ModelError::BadWeights {
                path: path.clone(),
                reason: format!(
                    "tensor {name:?} has dtype {:?}; expected f32, bf16, f16 or f64",
                    loc.dtype
                ),
            }
            .into());
        }
        let values = loc.f32_values(self.shards[*i].1.bytes());
        let bad = crate::fsutil::count_nonfinite(&values);
        if bad > 0 {
            return Err(crate::Error::NonFinite {
                path: path.clone(),
                tensor: name.to_string(),
                count: bad,
            });
        }
        Ok(values)
    }

    /// Lets the kernel drop the pages of `name` from this process once it has been used.
    pub(crate) fn release(&self, name: &str) {
        if let Some((i, loc)) = self.tensors.get(name) {
            self.shards[*i].1.release(&[loc]);
        }
    }
}
