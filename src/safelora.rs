//! Safe LoRA (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
//! Fine-tuning Large Language Models", NeurIPS, arXiv:2405.16833, section 3;
//! `docs/METHODS.md`, section Safe LoRA): the training-free peer NLSR is compared with.
//!
//! Per module, the alignment update `V = W_aligned - W_base` (or `(alpha/r) B_a A_a` when the
//! alignment is a LoRA adapter) defines `C = V Vᵀ / ||V||_F`; a fine-tuned module whose update
//! has `cos(C ΔW_t, ΔW_t) < τ` (or one of the K lowest) gets `B_t ← C B_t`. `C` (`out x out`)
//! is never formed: `C B = V (Vᵀ B) / ||V||_F`, and for a LoRA `V = s B_a A_a` everything goes
//! through products with at most `in x r` entries.
//!
//! ```no_run
//! use realign::adapters::Adapter;
//! use realign::safelora::{alignment_from_adapter, safe_lora, SafeLoraSelection};
//! let dev = candle_core::Device::Cpu;
//! let v = alignment_from_adapter(&Adapter::load("aligned".as_ref(), &dev)?);
//! let t = Adapter::load("finetuned".as_ref(), &dev)?;
//! let (projected, report) = safe_lora(&v, &t, SafeLoraSelection::Threshold(0.35))?;
//! # Ok::<(), realign::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapters::{Adapter, LoraModule};
use crate::model::weights::Weights;
use crate::nlsr::similarity::low_rank_inner;
use crate::nlsr::{check_module_sets, label, NlsrError};
use crate::Result;

/// The alignment update `V` of one module.
#[derive(Debug, Clone)]
pub enum AlignmentUpdate {
    /// `V = scale · B A` from an aligned LoRA adapter.
    LowRank(LoraModule),
    /// `V = W_aligned - W_base`, `[out, in]`.
    Dense(Tensor),
}

impl AlignmentUpdate {
    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = |t: &Tensor, i: usize| t.dims().get(i).copied().unwrap_or(0);
        match self {
            AlignmentUpdate::LowRank(m) => (d(&m.b, 0), d(&m.a, 1)),
            AlignmentUpdate::Dense(v) => (d(v, 0), d(v, 1)),
        }
    }

    /// `||V||_F` (through `r x r` products for the low-rank form), in f64.
    pub fn norm(&self) -> Result<f64> {
        match self {
            AlignmentUpdate::LowRank(m) => crate::nlsr::similarity::lora_norm(m),
            AlignmentUpdate::Dense(v) => Ok(v
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?
                .sqrt()),
        }
    }
}

/// `V` per module from an aligned LoRA adapter (`V = (alpha/r) B_a A_a`, kept factored).
pub fn alignment_from_adapter(aligned: &Adapter) -> BTreeMap<String, AlignmentUpdate> {
    aligned
        .modules
        .iter()
        .map(|(k, m)| (k.clone(), AlignmentUpdate::LowRank(m.clone())))
        .collect()
}

/// `V = W_aligned - W_base` for each module of `finetuned`, from two Hugging Face model folders
/// (`<module>.weight`, f32). Both models are read whole; the weights must have the shape
/// `[out, in]` the fine-tuned adapter implies.
pub fn alignment_from_models(
    base: &Path,
    aligned: &Path,
    finetuned: &Adapter,
    device: &Device,
) -> Result<BTreeMap<String, AlignmentUpdate>> {
    let mut wb = Weights::from_hf_dir(base, device)?;
    let mut wa = Weights::from_hf_dir(aligned, device)?;
    let mut out = BTreeMap::new();
    for (path, m) in &finetuned.modules {
        let [rows, _] = crate::nlsr::dims2(&m.b);
        let [_, inp] = crate::nlsr::dims2(&m.a);
        let shape = [rows, inp];
        let key = format!("{path}.weight");
        let v = (wa.take(&key, &shape)? - wb.take(&key, &shape)?)?;
        out.insert(path.clone(), AlignmentUpdate::Dense(v));
    }
    Ok(out)
}

/// The fine-tuning update `ΔW = W_t − W_a = s_t B_t A_t − s_a B_a A_a` of every module, as
/// one LoRA adapter of rank `r_t + r_a`: `B = [s_t B_t | −s_a B_a]`, `A = [A_t; A_a]`, scale 1
/// (`lora_alpha = r`). This is the matrix Safe LoRA projects (Hsu et al. 2024, section 3:
/// the update of fine-tuning, not the whole adapter `W_t`, whose update from the base is mostly
/// the alignment update `V` itself). `W_a` plus this adapter is `W_t`; `W_a` plus its Safe LoRA
/// projection is the repaired model.
///
/// Errors: the two adapters adapt different modules, or their factors disagree in shape.
pub fn finetuning_update(aligned: &Adapter, finetuned: &Adapter) -> Result<Adapter> {
    stacked_sum(aligned, finetuned, -1.0)
}

/// `W_t + c · W_a` of every module as one LoRA adapter of rank `r_t + r_a`:
/// `B = [s_t B_t | c s_a B_a]`, `A = [A_t; A_a]`, scale 1 (`lora_alpha = r`, other ranks
/// through `rank_pattern` / `alpha_pattern`). With `c = −1` it is [`finetuning_update`]; RESTA
/// ([`crate::resta`]) adds the safety vector with `c = γ`.
///
/// Errors: the two adapters adapt different modules, or their `[out, in]` differ.
pub fn stacked_sum(aligned: &Adapter, finetuned: &Adapter, c: f64) -> Result<Adapter> {
    stacked_combination(aligned, finetuned, |_| (1.0, c))
}

/// `c_t(j) · W_t + c_a(j) · W_a` per module `j` as one LoRA adapter of rank `r_t + r_a`:
/// `B = [c_t s_t B_t | c_a s_a B_a]`, `A = [A_t; A_a]`, scale 1, where `coef(module)` gives
/// `(c_t, c_a)`. [`stacked_sum`] is `coef = (1, c)` everywhere; SafeMERGE
/// ([`crate::safemerge`]) merges only some modules.
///
/// Errors: the two adapters adapt different modules, or their `[out, in]` differ.
pub fn stacked_combination(
    aligned: &Adapter,
    finetuned: &Adapter,
    coef: impl Fn(&str) -> (f64, f64),
) -> Result<Adapter> {
    crate::nlsr::check_same_updates(aligned, finetuned)?;
    let mut modules = BTreeMap::new();
    let mut ranks = BTreeMap::new();
    for (path, t) in &finetuned.modules {
        let a = &aligned.modules[path];
        let (ct, ca) = coef(path);
        let b = Tensor::cat(&[(&t.b * (ct * t.scale))?, (&a.b * (ca * a.scale))?], 1)?;
        let a_cat = Tensor::cat(&[&t.a, &a.a], 0)?;
        let r = t.rank() + a.rank();
        ranks.insert(path.clone(), r);
        modules.insert(
            path.clone(),
            LoraModule {
                a: a_cat,
                b,
                scale: 1.0,
            },
        );
    }
    Ok(Adapter {
        config: scale_one_config(&finetuned.config, &ranks),
        modules,
        source: None,
    })
}

/// The PEFT config of an adapter whose modules all have scale 1 and the given ranks: `r` the
/// largest rank with `lora_alpha = r`, other ranks through `rank_pattern` / `alpha_pattern`
/// (each with `alpha = rank`); the target modules and the rest are `template`'s.
pub(crate) fn scale_one_config(
    template: &crate::adapters::LoraConfig,
    ranks: &BTreeMap<String, usize>,
) -> crate::adapters::LoraConfig {
    let r = ranks.values().copied().max().unwrap_or(0);
    let mut config = template.clone();
    config.r = r;
    config.lora_alpha = r as f64;
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    for (path, &rm) in ranks {
        if rm != r {
            // a module of another rank keeps scale 1 through its own alpha
            config.rank_pattern.insert(path.clone(), rm);
            config.alpha_pattern.insert(path.clone(), rm as f64);
        }
    }
    config
}

/// Safe LoRA's projection (Hsu et al. 2024, section 3): `C B = V (Vᵀ B) / ||V||_F`, with
/// `C = V Vᵀ / ||V||_F` never formed. For `V = s B_a A_a`:
/// `C B = s² B_a (A_a A_aᵀ)(B_aᵀ B) / ||V||_F`. Computed in f64, returned in f32; a zero `V`
/// gives a zero `C B`.
///
/// # Shapes
/// - V: `[out, in]` (dense, or B_a `[out, r_a]`, A_a `[r_a, in]`); B: `[out, r]` -> `[out, r]`.
pub fn project(v: &AlignmentUpdate, b: &Tensor) -> Result<Tensor> {
    let norm = v.norm()?;
    let b64 = b.to_dtype(DType::F64)?;
    if norm == 0.0 {
        return Ok(b.zeros_like()?.to_dtype(DType::F32)?);
    }
    let cb = match v {
        AlignmentUpdate::LowRank(m) => {
            let (ba, aa) = (m.b.to_dtype(DType::F64)?, m.a.to_dtype(DType::F64)?);
            let g = ba.t()?.matmul(&b64)?; // [r_a, r]
            let h = aa.matmul(&aa.t()?)?; // [r_a, r_a]
            (ba.matmul(&h.matmul(&g)?)? * (m.scale * m.scale / norm))?
        }
        AlignmentUpdate::Dense(v) => {
            let v = v.to_dtype(DType::F64)?;
            (v.matmul(&v.t()?.matmul(&b64)?)? / norm)?
        }
    };
    Ok(cb.to_dtype(DType::F32)?)
}

/// `cos(C ΔW_t, ΔW_t)` for `ΔW_t = s B_t A_t`, from `C B_t` (see [`project`]):
/// `<(C B) A, B A>_F / (||(C B) A||_F ||B A||_F)` through `r x r` products (the scale cancels).
/// A zero `ΔW_t` gives 1 (nothing to project), a zero projection 0.
///
/// # Shapes
/// - C B, B: `[out, r]`; A: `[r, in]` -> a scalar.
pub fn projected_cosine(cb: &Tensor, m: &LoraModule) -> Result<f64> {
    let tt = low_rank_inner(&m.b, &m.a, &m.b, &m.a)?.max(0.0);
    if tt == 0.0 {
        return Ok(1.0);
    }
    let pp = low_rank_inner(cb, &m.a, cb, &m.a)?.max(0.0);
    if pp == 0.0 {
        return Ok(0.0);
    }
    let pt = low_rank_inner(cb, &m.a, &m.b, &m.a)?;
    Ok((pt / (pp.sqrt() * tt.sqrt())).clamp(-1.0, 1.0))
}

/// Which modules Safe LoRA projects.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafeLoraSelection {
    /// Every module with `cos < τ`.
    Threshold(f64),
    /// The K modules with the lowest cosine (ties in module order).
    NumLayers(usize),
}

/// One module of a [`SafeLoraReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafeLoraModule {
    /// The module path.
    pub module: String,
    /// `cos(C ΔW_t, ΔW_t)`.
    pub cosine: f64,
    /// `||V||_F`.
    pub norm_v: f64,
    /// Whether `B_t` was replaced by `C B_t`.
    pub projected: bool,
}

/// What `realign safelora` writes as `safelora_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafeLoraReport {
    /// The fine-tuned adapter.
    pub finetuned: String,
    /// The selection rule.
    pub selection: SafeLoraSelection,
    /// The number of projected modules.
    pub num_projected: usize,
    /// Every module, in module order.
    pub modules: Vec<SafeLoraModule>,
}

/// Safe LoRA on a fine-tuned adapter: cosines for every module, then `B_t ← C B_t` for the
/// selected ones; A, the config and the other modules are kept. `alignment` must cover
/// exactly the adapter's modules with `V` of shape `[out, in]`.
pub fn safe_lora(
    alignment: &BTreeMap<String, AlignmentUpdate>,
    finetuned: &Adapter,
    selection: SafeLoraSelection,
) -> Result<(Adapter, SafeLoraReport)> {
    let tl = label(finetuned, "fine-tuned adapter");
    check_module_sets(
        alignment.keys(),
        "the alignment update",
        finetuned.modules.keys().map(String::as_str).collect(),
        &tl,
    )?;
    let n = finetuned.modules.len();
    match selection {
        SafeLoraSelection::Threshold(t) if !t.is_finite() => {
            return Err(option(
                "threshold",
                t.to_string(),
                "must be a finite number",
            ))
        }
        SafeLoraSelection::NumLayers(0) => {
            return Err(option(
                "num-layers",
                "0".into(),
                "projects no module: the output would be the fine-tuned adapter itself; give \
                 at least 1",
            ))
        }
        SafeLoraSelection::NumLayers(k) if k > n => {
            return Err(option(
                "num-layers",
                k.to_string(),
                &format!("the adapter has only {n} modules"),
            ))
        }
        _ => {}
    }
    let mut zero = true;
    for path in finetuned.modules.keys() {
        zero &= alignment[path].norm()? == 0.0;
    }
    if zero && n > 0 {
        return Err(NlsrError::ZeroAlignment { modules: n }.into());
    }
    let mut rows = Vec::with_capacity(n);
    let mut projections = Vec::with_capacity(n);
    for (path, m) in &finetuned.modules {
        let v = &alignment[path];
        let out_in = (crate::nlsr::dims2(&m.b)[0], crate::nlsr::dims2(&m.a)[1]);
        if v.shape() != out_in {
            let (o, i) = v.shape();
            return Err(NlsrError::Shapes {
                module: path.clone(),
                tensor: "ΔW [out, in]",
                left: "the alignment update V".into(),
                left_shape: [o, i],
                right: tl.clone(),
                right_shape: [out_in.0, out_in.1],
            }
            .into());
        }
        let cb = project(v, &m.b)?;
        let cosine = projected_cosine(&cb, m)?;
        if !cosine.is_finite() {
            return Err(NlsrError::NotFinite {
                module: path.clone(),
                what: "cos(C ΔW, ΔW)".into(),
                value: cosine,
            }
            .into());
        }
        rows.push(SafeLoraModule {
            module: path.clone(),
            cosine,
            norm_v: v.norm()?,
            projected: false,
        });
        projections.push(cb);
    }
    let cosines: Vec<f64> = rows.iter().map(|r| r.cosine).collect();
    let ranks = crate::nlsr::prune::similarity_ranks(&cosines);
    let mut modules = BTreeMap::new();
    for (((path, m), row), (cb, rank)) in finetuned
        .modules
        .iter()
        .zip(rows.iter_mut())
        .zip(projections.into_iter().zip(ranks))
    {
        row.projected = match selection {
            SafeLoraSelection::Threshold(t) => row.cosine < t,
            SafeLoraSelection::NumLayers(k) => rank < k,
        };
        let mut m = m.clone();
        if row.projected {
            m.b = cb;
        }
        modules.insert(path.clone(), m);
    }
    let report = SafeLoraReport {
        finetuned: tl,
        selection,
        num_projected: rows.iter().filter(|r| r.projected).count(),
        modules: rows,
    };
    Ok((
        Adapter {
            config: finetuned.config.clone(),
            modules,
            source: None,
        },
        report,
    ))
}

fn option(name: &str, value: String, reason: &str) -> crate::Error {
    NlsrError::Option {
        name: name.into(),
        value,
        reason: reason.into(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 + 1.0) * seed).sin())
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn projection_equals_the_dense_c() {
        // V = 0.5 B_a A_a (out 5, r_a 2, in 4); B_t: [5, 3]
        let va = LoraModule {
            a: t(2, 4, 0.7),
            b: t(5, 2, 1.3),
            scale: 0.5,
        };
        let bt = t(5, 3, 2.1);
        let v = (va.b.matmul(&va.a).unwrap() * 0.5).unwrap();
        let norm = v
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let c = (v.matmul(&v.t().unwrap()).unwrap() / norm as f64).unwrap(); // [5, 5]
        let want = c.matmul(&bt).unwrap();
        for upd in [AlignmentUpdate::LowRank(va), AlignmentUpdate::Dense(v)] {
            let got = project(&upd, &bt).unwrap();
            let diff = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
    }

    fn adapter(modules: &[(&str, LoraModule)], r: usize, alpha: f64) -> Adapter {
        Adapter {
            config: crate::adapters::LoraConfig::new(r, alpha, vec!["q_proj".into()]),
            modules: modules
                .iter()
                .map(|(k, m)| (k.to_string(), m.clone()))
                .collect(),
            source: None,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn a_zero_alignment_update_is_an_error_not_an_erased_fine_tune() {
        let path = "model.layers.0.self_attn.q_proj";
        let zero_b = LoraModule {
            a: t(2, 5, 0.3),
            b: Tensor::zeros((6, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            scale: 1.5,
        };
        let tuned = LoraModule {
            a: t(3, 5, 0.5),
            b: t(6, 3, 1.7),
            scale: 0.75,
        };
        let aligned = adapter(&[(path, zero_b)], 2, 3.0);
        let finetuned = adapter(&[(path, tuned)], 3, 2.25);
        let err = safe_lora(
            &alignment_from_adapter(&aligned),
            &finetuned,
            SafeLoraSelection::Threshold(0.5),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("the alignment update V is zero in all 1 modules"),
            "{err}"
        );
        // A non-zero alignment update projects.
        let v = LoraModule {
            a: t(2, 5, 0.3),
            b: t(6, 2, 0.9),
            scale: 1.5,
        };
        let aligned = adapter(&[(path, v)], 2, 3.0);
        let (_, report) = safe_lora(
            &alignment_from_adapter(&aligned),
            &finetuned,
            SafeLoraSelection::Threshold(0.5),
        )
        .unwrap();
        assert_eq!(report.modules.len(), 1);
        assert!(report.modules[0].norm_v > 0.0);
    }

    #[test]
    fn safe_lora_of_the_finetuning_update_equals_the_dense_projection() {
        // Two modules; aligned rank 2 (scale 1.5), fine-tuned rank 3 (scale 0.75): out 6, in 5.
        let path = |i: usize| format!("model.layers.{i}.self_attn.q_proj");
        let (p0, p1) = (path(0), path(1));
        let am = |s: f32| LoraModule {
            a: t(2, 5, 0.3 * s),
            b: t(6, 2, 0.9 * s),
            scale: 1.5,
        };
        let tm = |s: f32| LoraModule {
            a: t(3, 5, 0.5 * s),
            b: t(6, 3, 1.7 * s),
            scale: 0.75,
        };
        let aligned = adapter(&[(&p0, am(1.0)), (&p1, am(2.0))], 2, 3.0);
        let finetuned = adapter(&[(&p0, tm(1.0)), (&p1, tm(2.0))], 3, 2.25);
        let update = finetuning_update(&aligned, &finetuned).unwrap();
        assert_eq!(update.config.r, 5);
        // project every module (cos < 2 always)
        let (projected, report) = safe_lora(
            &alignment_from_adapter(&aligned),
            &update,
            SafeLoraSelection::Threshold(2.0),
        )
        .unwrap();
        assert_eq!(report.num_projected, 2);
        for p in [&p0, &p1] {
            let (a, f) = (&aligned.modules[p], &finetuned.modules[p]);
            let dw = (lora_delta_dense(f) - lora_delta_dense(a)).unwrap();
            // the update adapter is exactly W_t − W_a, and its scale is 1 through the config
            let u = &update.modules[p];
            assert_eq!(u.scale, 1.0);
            assert_eq!(update.config.scaling_for(p), 1.0);
            assert!(max_diff(&lora_delta_dense(u), &dw) < 1e-5);
            // dense C = V Vᵀ / ||V||_F with V = s_a B_a A_a
            let v = lora_delta_dense(a);
            let norm = v
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            let c = (v.matmul(&v.t().unwrap()).unwrap() / norm as f64).unwrap();
            let want = c.matmul(&dw).unwrap();
            let got = lora_delta_dense(&projected.modules[p]);
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(max_diff(&got, &want) < 1e-5 * scale.max(1.0), "{p}");
            // and the cosine is the dense one
            let cos = {
                let num = (&want * &dw)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let n1 = want
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt();
                let n2 = dw
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt();
                num / (n1 * n2)
            };
            let row = report.modules.iter().find(|m| &m.module == p).unwrap();
            assert!(
                (row.cosine - cos as f64).abs() < 1e-4,
                "{} vs {cos}",
                row.cosine
            );
        }
        // W_a + update == W_t for a module: different module sets are refused
        let other = adapter(&[(&p0, tm(1.0))], 3, 2.25);
        assert!(finetuning_update(&aligned, &other).is_err());
    }

    fn lora_delta_dense(m: &LoraModule) -> Tensor {
        crate::adapters::lora_delta(m).unwrap()
    }
}
