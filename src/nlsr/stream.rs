//! `realign patch` from files to files, one module at a time: the reference and fine-tuned
//! adapters and the masks are memory-mapped, read module by module (f32 files in place,
//! without a copy), and the realigned adapter is written tensor by tensor, so that memory stays
//! at a few modules whatever the adapter's size. Same checks, same report and byte for byte the
//! same files as [`patch`](super::patch::patch) followed by
//! [`write_patch`](super::patch::write_patch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::masks::{self, Masks, ModuleMask};
use super::patch::{
    check_output_config, keep_scale, mask_densities, module_report, patch_report, write_reports,
    PatchConfig, PatchReport,
};
use super::prune::layer_pruning;
use super::similarity::{factor_similarity_and_mask_sums, Factors};
use super::transplant::{mix_into, shrink_into, TransplantMode};
use super::{check_compatible, NlsrError};
use crate::adapters::{
    index_modules, locate, skeleton, Adapter, LoraConfig, LoraModule, LoraPart, TensorLoc,
};
use crate::fsutil::Mapped;
use crate::{Error, Result};

/// A mapped adapter folder: config, weights and where each module lies.
struct MappedAdapter {
    dir: PathBuf,
    config: LoraConfig,
    file: Mapped,
    modules: BTreeMap<String, [TensorLoc; 2]>,
}

impl MappedAdapter {
    fn open(dir: &Path) -> Result<Self> {
        let (config, weights) = locate(dir)?;
        let file = Mapped::open(&weights)?;
        let modules = index_modules(file.bytes(), &weights, &config)?;
        Ok(MappedAdapter {
            dir: dir.to_path_buf(),
            config,
            file,
            modules,
        })
    }

    /// The adapter with shape-only tensors, for the checks shared with the in-memory path.
    fn skeleton(&self) -> Result<Adapter> {
        let mut modules = BTreeMap::new();
        for (path, [a, b]) in &self.modules {
            modules.insert(
                path.clone(),
                LoraModule {
                    a: skeleton(&a.shape)?,
                    b: skeleton(&b.shape)?,
                    scale: self.config.scaling_for(path),
                },
            );
        }
        Ok(Adapter {
            config: self.config.clone(),
            modules,
            source: Some(self.dir.clone()),
        })
    }
}

/// NLSR's repair of the adapter folder `finetuned` against `reference` with the masks file
/// `masks`, written into `out_dir` (the adapter, `patch_report.json`, `patch_report.md`,
/// `similarity.svg`), streaming: see the module doc. Returns the report.
///
/// Refuses what [`patch`](super::patch::patch) refuses and what the loaders refuse, with the
/// same errors, before anything is written.
pub fn patch_files(
    reference: &Path,
    finetuned: &Path,
    masks_file: &Path,
    config: &PatchConfig,
    out_dir: &Path,
) -> Result<PatchReport> {
    let e = MappedAdapter::open(reference)?;
    let t = MappedAdapter::open(finetuned)?;
    let m = Mapped::open(masks_file)?;
    let mi = masks::index(m.bytes(), masks_file)?;
    let (es, ts) = (e.skeleton()?, t.skeleton()?);
    let mut mask_modules = BTreeMap::new();
    for (path, [a, b]) in &mi {
        mask_modules.insert(
            path.clone(),
            ModuleMask {
                a: skeleton(&a.shape)?,
                b: skeleton(&b.shape)?,
            },
        );
    }
    let ms = Masks {
        modules: mask_modules,
        source: Some(masks_file.to_path_buf()),
    };
    check_compatible(&es, "reference adapter", &ts, "fine-tuned adapter", true)?;
    ms.check_fits(&ts, "fine-tuned adapter")?;
    config.prune.validate(t.modules.len())?;

    let paths: Vec<&String> = t.modules.keys().collect();
    let sims = paths
        .par_iter()
        .map(|path| {
            let ([ea, eb], [ta, tb], [ma, mb]) = (&e.modules[*path], &t.modules[*path], &mi[*path]);
            let (out, r) = (tb.shape[0], tb.shape[1]);
            let inp = ta.shape[1];
            let (mav, mbv) = (ma.f32_values(m.bytes()), mb.f32_values(m.bytes()));
            masks::check_values(&mav, masks_file, path, LoraPart::A)?;
            masks::check_values(&mbv, masks_file, path, LoraPart::B)?;
            let (eav, ebv) = (ea.f32_values(e.file.bytes()), eb.f32_values(e.file.bytes()));
            let (tav, tbv) = (ta.f32_values(t.file.bytes()), tb.f32_values(t.file.bytes()));
            for (adapter, values) in [(&e, [&eav, &ebv]), (&t, [&tav, &tbv])] {
                for (part, v) in [LoraPart::A, LoraPart::B].into_iter().zip(values) {
                    let count = crate::fsutil::count_nonfinite(v);
                    if count > 0 {
                        return Err(Error::NonFinite {
                            path: adapter.dir.join(crate::adapters::WEIGHTS_FILE),
                            tensor: crate::adapters::keys::saved_key(path, part),
                            count,
                        });
                    }
                }
            }
            let (s, sa, sb) = factor_similarity_and_mask_sums(
                Factors { a: &eav, b: &ebv },
                Factors { a: &tav, b: &tbv },
                Factors { a: &mav, b: &mbv },
                [out, r, inp],
            )?;
            e.file.release(&[ea, eb]);
            t.file.release(&[ta, tb]);
            m.release(&[ma, mb]);
            if !s.is_finite() {
                return Err(NlsrError::NotFinite {
                    module: (*path).clone(),
                    what: "the similarity S (Eq. 8)".into(),
                    value: s,
                }
                .into());
            }
            Ok((s, mask_densities(sa, sb, mav.len(), mbv.len())))
        })
        .collect::<Result<Vec<_>>>()?;
    let (sims, densities): (Vec<f64>, Vec<_>) = sims.into_iter().unzip();
    if densities.iter().all(|&(_, _, both)| both == 0.0) {
        let entries = mi
            .values()
            .map(|[a, b]| a.shape.iter().product::<usize>() + b.shape.iter().product::<usize>())
            .sum();
        return Err(masks::empty_masks(Some(masks_file), entries, mi.len()));
    }
    let decisions = layer_pruning(&sims, &config.prune)?;

    // the output's config and shapes, checked before anything is written
    let mut out_config = t.config.clone();
    let mut out_modules = BTreeMap::new();
    let mut rows = Vec::with_capacity(decisions.len());
    for ((path, d), dens) in paths.iter().zip(&decisions).zip(densities) {
        let [ta, tb] = &t.modules[*path];
        let scale = t.config.scaling_for(path);
        let exact = d.repaired && config.transplant == TransplantMode::Exact;
        let (r, out, inp) = (ta.shape[0], tb.shape[0], ta.shape[1]);
        let rank = if exact { 2 * r } else { r };
        if exact {
            keep_scale(&mut out_config, path, rank, scale);
        }
        out_modules.insert(
            (*path).clone(),
            LoraModule {
                a: skeleton(&[rank, inp])?,
                b: skeleton(&[out, rank])?,
                scale,
            },
        );
        rows.push(module_report(path, d, dens));
    }
    check_output_config(&out_config, &out_modules)?;
    let report = patch_report(&es, &ts, &ms, config, rows);
    let repaired: BTreeMap<&str, bool> = paths
        .iter()
        .zip(&decisions)
        .map(|(p, d)| (p.as_str(), d.repaired))
        .collect();
    let out_adapter = Adapter {
        config: out_config,
        modules: out_modules,
        source: None,
    };
    out_adapter.save_with(out_dir, |path, part| {
        let i = part as usize;
        let (el, tl, ml) = (&e.modules[path][i], &t.modules[path][i], &mi[path][i]);
        let tv = tl.f32_values(t.file.bytes());
        let values: Vec<f32> = if !repaired[path] {
            tv.into_owned()
        } else {
            let ev = el.f32_values(e.file.bytes());
            let mv = ml.f32_values(m.bytes());
            match config.transplant {
                TransplantMode::Replace => {
                    let mut out = vec![0f32; tv.len()];
                    mix_into(&mut out, &tv, &ev, &mv).map_err(std::io::Error::other)?;
                    out
                }
                TransplantMode::Exact => exact_factor(part, &tl.shape, &ev, &tv, &mv),
                TransplantMode::Shrink => {
                    let mut out = vec![0f32; tv.len()];
                    shrink_into(&mut out, &tv, &ev, &mv).map_err(std::io::Error::other)?;
                    out
                }
            }
        };
        e.file.release(&[el]);
        t.file.release(&[tl]);
        m.release(&[ml]);
        Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    })?;
    write_reports(out_dir, &report)?;
    Ok(report)
}

/// One factor of [`transplant_exact`](super::transplant::transplant_exact) on raw values:
/// `A'' = [M_A ⊙ A_e ; (1 - M_A) ⊙ A_t]` (`[2r, in]`) or
/// `B'' = [M_B ⊙ B_e | (1 - M_B) ⊙ B_t]` (`[out, 2r]`), row-major.
fn exact_factor(part: LoraPart, shape: &[usize], e: &[f32], t: &[f32], m: &[f32]) -> Vec<f32> {
    let masked = |x: f32, k: f32| x * k;
    let kept = |x: f32, k: f32| x * (1.0 - k);
    match part {
        LoraPart::A => e
            .iter()
            .zip(m)
            .map(|(x, k)| masked(*x, *k))
            .chain(t.iter().zip(m).map(|(x, k)| kept(*x, *k)))
            .collect(),
        LoraPart::B => {
            let r = shape[1];
            let mut out = Vec::with_capacity(2 * e.len());
            for ((er, tr), mr) in e.chunks(r).zip(t.chunks(r)).zip(m.chunks(r)) {
                out.extend(er.iter().zip(mr).map(|(x, k)| masked(*x, *k)));
                out.extend(tr.iter().zip(mr).map(|(x, k)| kept(*x, *k)));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nlsr::patch::{patch, write_patch};
    use candle_core::{Device, Tensor};

    #[test]
    fn streaming_writes_the_bytes_of_the_in_memory_patch() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-adapters");
        let (e, t) = (dir.join("aligned"), dir.join("finetuned"));
        let (ea, ta) = (
            Adapter::load(&e, &Device::Cpu).unwrap(),
            Adapter::load(&t, &Device::Cpu).unwrap(),
        );
        let mut masks = Masks::ones(&ta).unwrap();
        for (i, m) in masks.modules.values_mut().enumerate() {
            let pat = |x: &Tensor, salt: usize| {
                let v: Vec<f32> = (0..x.elem_count())
                    .map(|j| ((j * 5 + i + salt) % 3 == 0) as u8 as f32)
                    .collect();
                Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap()
            };
            m.a = pat(&m.a, 1);
            m.b = pat(&m.b, 2);
        }
        let tmp = tempfile::tempdir().unwrap();
        let mpath = tmp.path().join("masks.safetensors");
        masks::save(&masks, &mpath).unwrap();
        let masks = masks::load(&mpath, &Device::Cpu).unwrap();
        for transplant in [
            TransplantMode::Replace,
            TransplantMode::Exact,
            TransplantMode::Shrink,
        ] {
            let cfg = PatchConfig {
                transplant,
                ..Default::default()
            };
            let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
            let outcome = patch(&ea, &ta, &masks, &cfg).unwrap();
            write_patch(&a, &outcome).unwrap();
            let report = patch_files(&e, &t, &mpath, &cfg, &b).unwrap();
            assert_eq!(report, outcome.report);
            assert!(report.num_patched > 0);
            for f in [
                "adapter_model.safetensors",
                "adapter_config.json",
                "patch_report.json",
            ] {
                assert_eq!(
                    std::fs::read(a.join(f)).unwrap(),
                    std::fs::read(b.join(f)).unwrap(),
                    "{transplant:?} {f}"
                );
            }
        }
    }
}
