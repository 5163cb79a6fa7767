//! The masks of safety-critical neurons (paper Eq. 6): per adapted module, a 0/1 matrix `M_A`
//! of the shape of `lora_A` (`[r, in]`) and `M_B` of the shape of `lora_B` (`[out, r]`).
//!
//! On disk (the format identification writes and `realign patch` reads): one safetensors file
//! whose keys are the adapter's peft names, `base_model.model.<module>.lora_A.weight` and
//! `...lora_B.weight`, with f32 values 0 or 1 and metadata `{"format": "pt"}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::similarity::F32Data;
use super::NlsrError;
use crate::adapters::keys::{self, LoraPart};
use crate::adapters::{Adapter, TensorLoc};
use crate::fsutil::read;
use crate::Result;

/// The masks of one module.
#[derive(Debug, Clone)]
pub struct ModuleMask {
    /// `M_A`, `[r, in]`, f32 0/1.
    pub a: Tensor,
    /// `M_B`, `[out, r]`, f32 0/1.
    pub b: Tensor,
}

impl ModuleMask {
    /// The fraction of ones in `M_A`, in `M_B`, and in both together.
    pub fn density(&self) -> Result<(f64, f64, f64)> {
        let ones = |t: &Tensor| -> Result<f64> {
            // 0/1 values: the sum is exact in f64 as in f32
            let v = F32Data::of(t)?;
            Ok(v.slice().iter().map(|x| f64::from(*x)).sum())
        };
        let (sa, sb) = (ones(&self.a)?, ones(&self.b)?);
        let (na, nb) = (self.a.elem_count() as f64, self.b.elem_count() as f64);
        let frac = |s: f64, n: f64| if n > 0.0 { s / n } else { 0.0 };
        Ok((frac(sa, na), frac(sb, nb), frac(sa + sb, na + nb)))
    }
}

/// The masks of every module of an adapter.
#[derive(Debug, Clone)]
pub struct Masks {
    /// By module path (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, ModuleMask>,
    /// The file they were read from, if any.
    pub source: Option<PathBuf>,
}

impl Masks {
    /// Masks of all ones for every module of `adapter` (every entry is safety-critical).
    pub fn ones(adapter: &Adapter) -> Result<Self> {
        let mut modules = BTreeMap::new();
        for (path, m) in &adapter.modules {
            modules.insert(
                path.clone(),
                ModuleMask {
                    a: m.a.ones_like()?.to_dtype(DType::F32)?,
                    b: m.b.ones_like()?.to_dtype(DType::F32)?,
                },
            );
        }
        Ok(Masks {
            modules,
            source: None,
        })
    }

    /// How the masks are named in errors: their file, else `"masks"`.
    pub fn label(&self) -> String {
        self.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "masks".to_string())
    }

    /// Refuses masks that select nothing: every `M_A` and `M_B` all zeros. Eq. 8 would then
    /// compare empty regions (similarity 1 by convention, so a drift of 0 and a "clean"
    /// verdict) and the transplant would change no entry, whatever the adapters hold.
    pub fn check_not_empty(&self) -> Result<()> {
        let mut entries = 0usize;
        for mask in self.modules.values() {
            let (_, _, both) = mask.density()?;
            if both > 0.0 {
                return Ok(());
            }
            entries += mask.a.elem_count() + mask.b.elem_count();
        }
        Err(empty_masks(
            self.source.as_deref(),
            entries,
            self.modules.len(),
        ))
    }

    /// Checks that the masks were made for `adapter`: the same modules, and `M_A` / `M_B` of the
    /// shapes of `lora_A` / `lora_B`. `adapter_name` names the adapter when it has no folder.
    pub fn check_fits(&self, adapter: &Adapter, adapter_name: &str) -> Result<()> {
        let (ml, al) = (self.label(), super::label(adapter, adapter_name));
        super::check_module_sets(
            self.modules.keys(),
            &ml,
            adapter.modules.keys().map(String::as_str).collect(),
            &al,
        )?;
        for (path, mask) in &self.modules {
            let Some(m) = adapter.modules.get(path) else {
                continue;
            };
            for (tensor, x, y) in [
                ("mask of lora_A", &mask.a, &m.a),
                ("mask of lora_B", &mask.b, &m.b),
            ] {
                if x.dims() != y.dims() {
                    return Err(NlsrError::Shapes {
                        module: path.clone(),
                        tensor,
                        left: ml.clone(),
                        left_shape: super::dims2(x),
                        right: al.clone(),
                        right_shape: super::dims2(y),
                    }
                    .into());
                }
            }
        }
        Ok(())
    }
}

/// The error of masks that select nothing (see [`Masks::check_not_empty`]): `entries` zeros
/// over `modules` modules of `file`.
pub(crate) fn empty_masks(file: Option<&Path>, entries: usize, modules: usize) -> crate::Error {
    NlsrError::Masks {
        file: file.map_or_else(|| PathBuf::from("masks"), Path::to_path_buf),
        reason: format!(
            "every mask is all zeros ({entries} entries over {modules} modules): no \
             safety-critical neuron is selected, so the safety regions are empty (make them with \
             a lower `realign identify --sparsity`)"
        ),
    }
    .into()
}

/// Reads a masks file (see the module doc). Values must be exactly 0 or 1; F32, F16, BF16, F64
/// and U8 files are read (into f32 on `device`). Errors name the file and the tensor key.
pub fn load(path: &Path, device: &Device) -> Result<Masks> {
    let bytes = read(path)?;
    let index = index(&bytes, path)?;
    let mut modules = BTreeMap::new();
    for (module, [a, b]) in index {
        let load = |loc: &TensorLoc, part: LoraPart| -> Result<Tensor> {
            check_values(&loc.f32_values(&bytes), path, &module, part)?;
            loc.load(&bytes, device)
        };
        let (a, b) = (load(&a, LoraPart::A)?, load(&b, LoraPart::B)?);
        modules.insert(module, ModuleMask { a, b });
    }
    Ok(Masks {
        modules,
        source: Some(path.to_path_buf()),
    })
}

/// Refuses mask values other than 0 and 1, naming the file and the tensor key.
pub(crate) fn check_values(
    values: &[f32],
    file: &Path,
    module: &str,
    part: LoraPart,
) -> Result<()> {
    if let Some(v) = values.iter().find(|v| **v != 0.0 && **v != 1.0) {
        let key = keys::saved_key(module, part);
        return Err(NlsrError::Masks {
            file: file.to_path_buf(),
            reason: format!("tensor {key:?} has value {v}; masks hold only 0 and 1"),
        }
        .into());
    }
    Ok(())
}

/// Checks a masks file's keys, dtypes, shapes and pairs as [`load`] does, without reading the
/// values, and says where each module's `M_A` and `M_B` lie in `bytes`.
pub(crate) fn index(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, [TensorLoc; 2]>> {
    let bad = |reason: String| NlsrError::Masks {
        file: path.to_path_buf(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut tensors = st.tensors();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    let mut halves: BTreeMap<String, [Option<TensorLoc>; 2]> = BTreeMap::new();
    for (key, view) in tensors {
        let (module, part) =
            keys::parse_key(&key).map_err(|r| bad(format!("unexpected tensor {key:?}: {r}")))?;
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 | Dtype::U8
        ) {
            return Err(bad(format!(
                "tensor {key:?} has dtype {:?}; masks are f32 0/1",
                view.dtype()
            ))
            .into());
        }
        if view.shape().len() != 2 {
            return Err(bad(format!(
                "tensor {key:?} has shape {:?}; masks are 2-D like the LoRA factors",
                view.shape()
            ))
            .into());
        }
        let slot = &mut halves.entry(module.clone()).or_default()[part as usize];
        if slot.is_some() {
            return Err(bad(format!(
                "tensor {key:?} is a second {part} mask for {module}"
            ))
            .into());
        }
        *slot = Some(TensorLoc::of_view(&view, bytes));
    }
    if halves.is_empty() {
        return Err(bad("no mask tensors".into()).into());
    }
    let mut modules = BTreeMap::new();
    for (module, [a, b]) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                modules.insert(module, [a, b]);
            }
            (a, _) => {
                let (has, lacks) = if a.is_some() {
                    (LoraPart::A, LoraPart::B)
                } else {
                    (LoraPart::B, LoraPart::A)
                };
                return Err(bad(format!(
                    "module {module} has a {has} mask but no {lacks} mask"
                ))
                .into());
            }
        }
    }
    Ok(modules)
}

/// Writes masks in the format [`load`] reads, atomically: f32, peft key names, metadata
/// `{"format": "pt"}`.
pub fn save(masks: &Masks, path: &Path) -> Result<()> {
    // the layout of an adapter's weights file (same keys, f32, same metadata), one tensor at a
    // time
    let shapes: Vec<_> = masks
        .modules
        .iter()
        .map(|(p, m)| (p.as_str(), [m.a.dims().to_vec(), m.b.dims().to_vec()]))
        .collect();
    crate::adapters::write_weights(path, &shapes, |module, part| {
        let m = &masks.modules[module];
        let t = match part {
            LoraPart::A => &m.a,
            LoraPart::B => &m.b,
        };
        let values = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(std::io::Error::other)?;
        Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_density() {
        let dev = Device::Cpu;
        let mut modules = BTreeMap::new();
        modules.insert(
            "model.layers.0.mlp.up_proj".to_string(),
            ModuleMask {
                // 1 of 4 ones in A, 2 of 2 in B: densities 0.25, 1, 3/6
                a: Tensor::new(&[[1f32, 0.], [0., 0.]], &dev).unwrap(),
                b: Tensor::new(&[[1f32, 1.]], &dev).unwrap(),
            },
        );
        let masks = Masks {
            modules,
            source: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("masks.safetensors");
        save(&masks, &p).unwrap();
        let back = load(&p, &dev).unwrap();
        let m = &back.modules["model.layers.0.mlp.up_proj"];
        assert_eq!(
            m.a.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 0.0], vec![0.0, 0.0]]
        );
        assert_eq!(m.density().unwrap(), (0.25, 1.0, 0.5));
    }

    #[test]
    fn values_other_than_zero_and_one_are_refused() {
        let dev = Device::Cpu;
        let mut modules = BTreeMap::new();
        modules.insert(
            "m.q_proj".to_string(),
            ModuleMask {
                a: Tensor::new(&[[0.5f32]], &dev).unwrap(),
                b: Tensor::new(&[[1f32]], &dev).unwrap(),
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        save(
            &Masks {
                modules,
                source: None,
            },
            &p,
        )
        .unwrap();
        let err = load(&p, &dev).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("0.5") && err.contains("lora_A"),
            "{err}"
        );
    }
}
