//! Reading and writing adapter folders in peft's format (`save_pretrained` /
//! `from_pretrained`): `adapter_config.json` and `adapter_model.safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::keys::{self, LoraPart};
use super::{AdapterError, LoraConfig, LoraModule};
use crate::fsutil::{read, read_json, write_atomic, write_atomic_with};
use crate::{Error, Result};
use std::io::Write;

/// The config file of an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The pickled weights file older peft versions write; refused with a hint.
const PICKLE_FILE: &str = "adapter_model.bin";

/// A LoRA adapter: its config and one [`LoraModule`] per adapted linear layer.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `adapter_config.json`.
    pub config: LoraConfig,
    /// The adapted layers by module path (`model.layers.0.self_attn.q_proj`), with f32 factors.
    pub modules: BTreeMap<String, LoraModule>,
    /// The folder the adapter was loaded from, if any.
    pub source: Option<PathBuf>,
}

impl Adapter {
    /// Reads a peft adapter folder: `adapter_config.json` and `adapter_model.safetensors`.
    ///
    /// Tensors are converted to f32 on `device` (F32, BF16, F16 and F64 files are read). Keys
    /// are `base_model.model.<path>.lora_A.weight`, with or without an adapter name before
    /// `.weight`. Each module's scale comes from the config ([`LoraConfig::scaling_for`]).
    ///
    /// Errors name the file and the tensor or module: a missing file (a `.bin`-only folder
    /// gets a "convert to safetensors" hint), a config this crate cannot apply as peft would
    /// ([`LoraConfig::validate`]: DoRA, `fan_in_fan_out`, non-LORA `peft_type`, ...), a corrupt
    /// file, a tensor that is not a LoRA factor, a non-float or non-2-D tensor, a module with
    /// only one factor, factors whose ranks disagree with each other or with the config, and
    /// tensors for a module the config does not target.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (config, weights_path) = locate(dir)?;
        let bytes = read(&weights_path)?;
        let modules = read_modules(&bytes, &weights_path, &config, device)?;
        Ok(Adapter {
            config,
            modules,
            source: Some(dir.to_path_buf()),
        })
    }

    /// Writes the adapter as peft's `save_pretrained` does: creates `dir` (and its parents), then writes
    /// `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`, no adapter
    /// name, f32, metadata `{"format": "pt"}`) and `adapter_config.json` (pretty JSON with
    /// sorted keys, unknown keys kept), each atomically.
    ///
    /// Refuses (before writing anything) what [`load`](Self::load) would refuse, and modules
    /// whose `scale` differs from the one the config implies, since the file carries the scale
    /// only through the config.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with(dir, |path, part| {
            let m = &self.modules[path];
            f32_le_bytes(match part {
                LoraPart::A => &m.a,
                LoraPart::B => &m.b,
            })
            .map_err(std::io::Error::other)
        })
    }

    /// [`save`](Self::save), with the little-endian f32 bytes of each tensor asked of
    /// `bytes_of(module, part)` one at a time as the file is written (the module's tensors
    /// give only the shapes and scales checked).
    pub(crate) fn save_with(
        &self,
        dir: &Path,
        bytes_of: impl FnMut(&str, LoraPart) -> std::io::Result<Vec<u8>>,
    ) -> Result<()> {
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        self.config.validate(&config_path)?;
        if self.modules.is_empty() {
            return Err(AdapterError::Empty { file: weights_path }.into());
        }
        for (path, m) in &self.modules {
            check_module(&weights_path, &self.config, path, m)?;
        }
        crate::fsutil::create_dir_all(dir)?;
        let shapes: Vec<_> = self
            .modules
            .iter()
            .map(|(p, m)| (p.as_str(), [m.a.dims().to_vec(), m.b.dims().to_vec()]))
            .collect();
        write_weights(&weights_path, &shapes, bytes_of)?;
        write_atomic(
            &config_path,
            config_json(&self.config, &config_path)?.as_bytes(),
        )
    }

    /// The adapter whose update is `−ΔW`: every module's scale negated, for applying in memory
    /// (to take an update back out of a model; [`save`](Self::save) refuses it, since the
    /// config's scale is positive).
    pub fn negated(&self) -> Adapter {
        let mut out = self.clone();
        for m in out.modules.values_mut() {
            m.scale = -m.scale;
        }
        out
    }

    /// The adapted module paths, sorted.
    pub fn module_names(&self) -> Vec<&str> {
        self.modules.keys().map(String::as_str).collect()
    }

    /// The number of LoRA values (A and B of every module).
    pub fn num_parameters(&self) -> usize {
        self.modules.values().map(LoraModule::num_parameters).sum()
    }
}

/// Checks an adapter folder as [`Adapter::load`] does before reading the weights: the config
/// (read and validated) and the weights file (present, not only pickled). Returns the config
/// and the weights file.
pub(crate) fn locate(dir: &Path) -> Result<(LoraConfig, PathBuf)> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(AdapterError::MissingFile { path: config_path }.into());
    }
    let config: LoraConfig = read_json(&config_path)?;
    config.validate(&config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        let pickle = dir.join(PICKLE_FILE);
        if pickle.is_file() {
            return Err(AdapterError::PickleWeights { path: pickle }.into());
        }
        return Err(AdapterError::MissingFile { path: weights_path }.into());
    }
    Ok((config, weights_path))
}

/// A shape-only tensor (one value broadcast, no data of its size), for the checks that need
/// only dims.
pub(crate) fn skeleton(dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::zeros(1, DType::F32, &Device::Cpu)?
        .reshape(vec![1; dims.len()])?
        .broadcast_as(dims)?)
}

/// A zero-length stand-in for a tensor in `safetensors::serialize`: dtype, shape and length
/// only, so that the header comes out without the data.
struct HeaderOnly {
    shape: Vec<usize>,
}

impl safetensors::View for HeaderOnly {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Writes a weights file (f32, peft key names, metadata `{"format": "pt"}`) atomically and
/// tensor by tensor: the header comes from the shapes alone (exactly as
/// `safetensors::serialize` writes it), then `bytes_of(module, part)` is asked for each
/// tensor's little-endian f32 bytes in file order (by key), so that only one tensor is held at
/// a time. The bytes are those [`Adapter::save`] writes for the same values.
pub(crate) fn write_weights(
    file: &Path,
    modules: &[(&str, [Vec<usize>; 2])],
    mut bytes_of: impl FnMut(&str, LoraPart) -> std::io::Result<Vec<u8>>,
) -> Result<()> {
    let mut order = Vec::with_capacity(2 * modules.len());
    for (path, [a, b]) in modules {
        for (part, shape) in [(LoraPart::A, a), (LoraPart::B, b)] {
            order.push((keys::saved_key(path, part), *path, part, shape.clone()));
        }
    }
    // safetensors orders tensors by dtype (all f32 here), then by name
    order.sort_by(|x, y| x.0.cmp(&y.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header = safetensors::serialize(
        order.iter().map(|(k, _, _, shape)| {
            (
                k.as_str(),
                HeaderOnly {
                    shape: shape.clone(),
                },
            )
        }),
        Some(metadata),
    )
    .map_err(|e| AdapterError::Write {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    // a tensor with NaN/Inf is refused before the rename: (its key, how many values)
    let mut nonfinite: Option<(String, usize)> = None;
    let written = write_atomic_with(file, |w| {
        w.write_all(&header)?;
        for (key, path, part, shape) in &order {
            let bytes = bytes_of(path, *part)?;
            if bytes.len() != shape.iter().product::<usize>() * 4 {
                return Err(std::io::Error::other(format!(
                    "{path} {part}: {} bytes for shape {shape:?}",
                    bytes.len()
                )));
            }
            let count = bytes
                .chunks_exact(4)
                .filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                .count();
            if count > 0 {
                nonfinite = Some((key.clone(), count));
                return Err(std::io::Error::other("non-finite values"));
            }
            w.write_all(&bytes)?;
        }
        Ok(())
    });
    match (written, nonfinite) {
        (Err(_), Some((tensor, count))) => Err(Error::NonFinite {
            path: file.to_path_buf(),
            tensor,
            count,
        }),
        (written, _) => written,
    }
}

/// The config as peft writes it: `json.dumps(config, indent=2, sort_keys=True)`.
fn config_json(config: &LoraConfig, path: &Path) -> Result<String> {
    let json_err = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    let value = serde_json::to_value(config).map_err(json_err)?;
    serde_json::to_string_pretty(&sort_keys(value)).map_err(json_err)
}

/// Orders object keys at every depth (serde_json keeps insertion order with `preserve_order`).
fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

fn f32_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The checks shared by load and save: 2-D factors, one rank, the config's rank, targeted,
/// and (for save) the config's scale.
fn check_module(
    file: &Path,
    config: &LoraConfig,
    path: &str,
    m: &LoraModule,
) -> Result<(), AdapterError> {
    let (a, b) = (m.a.dims(), m.b.dims());
    let rank = match (a, b) {
        ([ra, _], [_, rb]) if ra == rb => *ra,
        _ => {
            return Err(AdapterError::RankMismatch {
                file: file.to_path_buf(),
                module: path.to_string(),
                a: a.to_vec(),
                b: b.to_vec(),
            })
        }
    };
    let expected = config.rank_for(path);
    if rank != expected {
        return Err(AdapterError::ConfigRankMismatch {
            file: file.to_path_buf(),
            module: path.to_string(),
            expected,
            found: rank,
        });
    }
    if !config.targets(path) {
        return Err(AdapterError::NotTargeted {
            file: file.to_path_buf(),
            module: path.to_string(),
        });
    }
    let config_scale = config.scaling_for(path);
    if (m.scale - config_scale).abs() > 1e-9 * config_scale.abs().max(1.0) {
        return Err(AdapterError::ScaleMismatch {
            file: file.to_path_buf(),
            module: path.to_string(),
            scale: m.scale,
            config_scale,
        });
    }
    Ok(())
}

/// Where a tensor lies in a safetensors buffer: dtype, shape and byte range.
#[derive(Debug, Clone)]
pub(crate) struct TensorLoc {
    /// The stored dtype.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// The byte range in the whole file buffer.
    pub range: std::ops::Range<usize>,
}

impl TensorLoc {
    /// The location of `view`, a tensor of `buffer` (the whole file).
    pub(crate) fn of_view(view: &safetensors::tensor::TensorView<'_>, buffer: &[u8]) -> Self {
        let start = view.data().as_ptr() as usize - buffer.as_ptr() as usize;
        TensorLoc {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            range: start..start + view.data().len(),
        }
    }

    /// Loads the tensor from `buffer` (the whole file) into f32 on `device`.
    pub(crate) fn load(&self, buffer: &[u8], device: &Device) -> Result<Tensor> {
        let view = safetensors::tensor::TensorView::new(
            self.dtype,
            self.shape.clone(),
            &buffer[self.range.clone()],
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(view.load(device)?.to_dtype(DType::F32)?)
    }

    /// The values as f32, borrowed when the file holds aligned little-endian f32, else
    /// converted as [`load`](Self::load) converts them (exactly: widening, or `as f32` from f64).
    pub(crate) fn f32_values<'a>(&self, buffer: &'a [u8]) -> std::borrow::Cow<'a, [f32]> {
        use std::borrow::Cow;
        let bytes = &buffer[self.range.clone()];
        let conv = |n: usize, f: &dyn Fn(&[u8]) -> f32| -> Vec<f32> {
            bytes.chunks_exact(n).map(f).collect()
        };
        match self.dtype {
            Dtype::F32 => {
                if cfg!(target_endian = "little") && bytes.as_ptr().align_offset(4) == 0 {
                    // SAFETY: aligned, in bounds, every bit pattern is an f32, and the
                    // little-endian layout is the file's.
                    Cow::Borrowed(unsafe {
                        std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4)
                    })
                } else {
                    Cow::Owned(conv(4, &|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                }
            }
            Dtype::F16 => Cow::Owned(conv(2, &|c| {
                half::f16::from_le_bytes([c[0], c[1]]).to_f32()
            })),
            Dtype::BF16 => Cow::Owned(conv(2, &|c| {
                half::bf16::from_le_bytes([c[0], c[1]]).to_f32()
            })),
            Dtype::F64 => Cow::Owned(conv(8, &|c| {
                f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
            })),
            Dtype::U8 => Cow::Owned(bytes.iter().map(|v| f32::from(*v)).collect()),
            _ => Cow::Owned(Vec::new()),
        }
    }
}

/// Reads every tensor of a weights file into modules.
fn read_modules(
    bytes: &[u8],
    file: &Path,
    config: &LoraConfig,
    device: &Device,
) -> Result<BTreeMap<String, LoraModule>> {
    let index = index_modules(bytes, file, config)?;
    let mut modules = BTreeMap::new();
    for (path, [a, b]) in index {
        let m = LoraModule {
            a: a.load(bytes, device)?,
            b: b.load(bytes, device)?,
            scale: config.scaling_for(&path),
        };
        crate::fsutil::check_finite(&m.a, file, &keys::saved_key(&path, LoraPart::A))?;
        crate::fsutil::check_finite(&m.b, file, &keys::saved_key(&path, LoraPart::B))?;
        modules.insert(path, m);
    }
    Ok(modules)
}

/// Checks every tensor of a weights file as [`Adapter::load`] does (keys, dtypes, shapes,
/// pairs, ranks, targets) without reading the values, and says where each module's `lora_A`
/// and `lora_B` lie.
pub(crate) fn index_modules(
    bytes: &[u8],
    file: &Path,
    config: &LoraConfig,
) -> Result<BTreeMap<String, [TensorLoc; 2]>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Corrupt {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    // sorted, so that the first error reported does not depend on hash order
    let mut tensors = st.tensors();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));

    let mut halves: BTreeMap<String, [Option<TensorLoc>; 2]> = BTreeMap::new();
    for (key, view) in tensors {
        let bad_key = |reason: String| AdapterError::BadKey {
            file: file.to_path_buf(),
            key: key.clone(),
            reason,
        };
        let (path, part) = keys::parse_key(&key).map_err(bad_key)?;
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64
        ) {
            let dtype = format!("{:?}", view.dtype());
            return Err(AdapterError::WrongDtype {
                file: file.to_path_buf(),
                key,
                dtype,
            }
            .into());
        }
        if view.shape().len() != 2 {
            let shape = view.shape().to_vec();
            return Err(AdapterError::BadShape {
                file: file.to_path_buf(),
                key,
                shape,
            }
            .into());
        }
        let index = match part {
            LoraPart::A => 0,
            LoraPart::B => 1,
        };
        let slot = &mut halves.entry(path.clone()).or_default()[index];
        if slot.is_some() {
            return Err(AdapterError::DuplicateTensor {
                file: file.to_path_buf(),
                module: path,
                key,
                part,
            }
            .into());
        }
        *slot = Some(TensorLoc::of_view(&view, bytes));
    }
    if halves.is_empty() {
        return Err(AdapterError::Empty {
            file: file.to_path_buf(),
        }
        .into());
    }

    let mut modules = BTreeMap::new();
    for (path, [a, b]) in halves {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (a, _) => {
                let (present, missing) = if a.is_some() {
                    (LoraPart::A, LoraPart::B)
                } else {
                    (LoraPart::B, LoraPart::A)
                };
                return Err(AdapterError::MissingPartner {
                    file: file.to_path_buf(),
                    module: path,
                    present,
                    missing,
                }
                .into());
            }
        };
        let m = LoraModule {
            a: skeleton(&a.shape)?,
            b: skeleton(&b.shape)?,
            scale: config.scaling_for(&path),
        };
        check_module(file, config, &path, &m)?;
        modules.insert(path, [a, b]);
    }
    Ok(modules)
}
