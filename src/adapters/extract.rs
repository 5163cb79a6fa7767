//! Full fine-tunes as LoRA adapters: the dense update of each linear module,
//! `ΔW = W_t − W_base`, truncated to rank r by its singular value decomposition, so that Safe
//! LoRA, RESTA, SafeMERGE, `diagnose` and NLSR (all of which read adapters) run on a fully
//! fine-tuned model folder.
//!
//! By Eckart–Young–Mirsky the truncation `U_r Σ_r V_rᵀ` is the closest rank-r matrix to `ΔW`
//! in Frobenius norm. It is written as a PEFT LoRA with `B = U_r Σ_r^{1/2}` (`[out, r]`),
//! `A = Σ_r^{1/2} V_rᵀ` (`[r, in]`) and `lora_alpha = r` (scale 1), so `s · B A = U_r Σ_r V_rᵀ`.
//! The **captured energy** `Σ_{i≤r} σ_i² / ‖ΔW‖_F²` says how much of the update the adapter
//! keeps (1 when `ΔW` has rank ≤ r); the rest, `‖ΔW − B A‖_F² = ‖ΔW‖_F² − Σ_{i≤r} σ_i²`, is
//! what a repair applied to the adapter cannot see. Modules of lower rank than r are padded with
//! zero rows of A and zero columns of B, so every module has the same rank.
//!
//! Wide modules use the randomized SVD of Halko, Martinsson and Tropp (2011, "Finding
//! structure with randomness", Algorithms 4.4 and 5.1): a Gaussian sketch `Y = ΔW Ω` with
//! `k = r + oversampling` columns, q power iterations re-orthonormalised by QR, `Q` an
//! orthonormal basis of the sketch, then the exact SVD of the small `Qᵀ ΔW`. Its truncation is
//! an orthogonal projection of `ΔW`, so the captured energy it reports is exact for what it
//! returns; it recovers `ΔW` exactly when `rank ΔW ≤ k`. Narrow modules use the exact thin SVD
//! (faer). Sketches are seeded per module name, so a run repeats bit for bit.
//!
//! Both checkpoints are memory-mapped and read one module at a time: memory holds one
//! module's two weights and its f64 delta, never two whole models. Tensors that changed but are
//! not targeted (embeddings, norms, `lm_head`) are listed in the report with their relative
//! change, since the adapter does not carry them.

use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use candle_core::{Device, Tensor};
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

use super::{Adapter, AdapterError, LoraConfig, LoraModule, TargetModules};
use crate::data::rng::{hash64, SplitMix64};
use crate::model::mapped::MappedCheckpoint;
use crate::Result;

/// The report file written beside an extracted adapter.
pub const REPORT_JSON: &str = "extract_report.json";

/// Up to this `min(out, in)`, [`SvdMethod::Auto`] takes the exact thin SVD; wider modules the
/// randomized one (the exact SVD of a 4096 × 14336 update takes minutes, the sketch seconds).
pub const AUTO_EXACT_MAX: usize = 1024;

/// How the truncated SVD of one module's update is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SvdMethod {
    /// Exact up to `min(out, in) = `[`AUTO_EXACT_MAX`], randomized above.
    Auto,
    /// The exact thin SVD (faer).
    Exact,
    /// Halko et al.'s randomized SVD with oversampling and power iterations.
    Randomized,
}

impl FromStr for SvdMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(SvdMethod::Auto),
            "exact" => Ok(SvdMethod::Exact),
            "randomized" => Ok(SvdMethod::Randomized),
            other => Err(format!(
                "unknown SVD method {other:?}: expected auto, exact or randomized"
            )),
        }
    }
}

/// What [`extract`] does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractConfig {
    /// The LoRA rank r of every module.
    pub rank: usize,
    /// The module names to turn into LoRA factors, matched as peft's `target_modules` list (a
    /// module path equal to a name or ending in `.name`).
    pub targets: Vec<String>,
    /// Exact, randomized, or chosen by width.
    pub method: SvdMethod,
    /// Extra sketch columns of the randomized SVD (`k = r + oversample`).
    pub oversample: usize,
    /// Power iterations of the randomized SVD (each multiplies by `ΔW ΔWᵀ` once).
    pub power_iterations: usize,
    /// Seed of the Gaussian sketches (mixed with each module's name).
    pub seed: u64,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            rank: 16,
            targets: super::ALL_LINEAR_TARGETS.map(String::from).to_vec(),
            method: SvdMethod::Auto,
            oversample: 16,
            power_iterations: 2,
            seed: 42,
        }
    }
}

/// One module's extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleExtraction {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// The method used (exact or randomized).
    pub method: SvdMethod,
    /// `‖ΔW‖_F`.
    pub delta_norm: f64,
    /// `‖ΔW‖_F / ‖W_base‖_F` (0 when the base weight is 0).
    pub relative_update: f64,
    /// `Σ_{i≤r} σ_i² / ‖ΔW‖_F²` (1 for an unchanged module).
    pub energy_captured: f64,
    /// The kept singular values, largest first.
    pub singular_values: Vec<f64>,
}

/// A tensor that differs between the checkpoints but is not carried by the adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangedTensor {
    /// The tensor name.
    pub name: String,
    /// `‖W_t − W_base‖_F / ‖W_base‖_F`.
    pub relative_update: f64,
}

/// What [`extract`] did, written as [`REPORT_JSON`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractReport {
    /// The base checkpoint.
    pub base: String,
    /// The fully fine-tuned checkpoint.
    pub finetuned: String,
    /// What the adapter holds.
    pub formula: String,
    /// The settings used.
    pub config: ExtractConfig,
    /// Modules turned into LoRA factors.
    pub num_modules: usize,
    /// Of those, modules whose update is exactly 0.
    pub unchanged_modules: usize,
    /// `Σ_modules Σ_{i≤r} σ_i² / Σ_modules ‖ΔW‖_F²` (1 when nothing changed).
    pub energy_captured: f64,
    /// The lowest per-module captured energy.
    pub min_module_energy: f64,
    /// Tensors that changed but are not targeted: the adapter does not carry them.
    pub not_captured: Vec<ChangedTensor>,
    /// Per module, in name order.
    pub modules: Vec<ModuleExtraction>,
    /// Wall time.
    pub seconds: f64,
}

/// A truncated SVD `U diag(s) Vᵀ` (`U` `[out, k]`, `V` `[in, k]`, `s` descending).
#[derive(Debug, Clone)]
pub struct TruncatedSvd {
    /// Left singular vectors, one per column.
    pub u: Mat<f64>,
    /// Singular values, largest first.
    pub s: Vec<f64>,
    /// Right singular vectors, one per column.
    pub v: Mat<f64>,
    /// The method that produced it (never `Auto`).
    pub method: SvdMethod,
}

/// The rank-`rank` truncated SVD of `delta` (`[out, in]`), by `method` (see the module doc).
/// Returns at most `min(rank, out, in)` triplets. `seed` seeds the randomized sketch.
pub fn truncated_svd(
    delta: MatRef<'_, f64>,
    rank: usize,
    method: SvdMethod,
    oversample: usize,
    power_iterations: usize,
    seed: u64,
) -> std::result::Result<TruncatedSvd, String> {
    let (m, n) = (delta.nrows(), delta.ncols());
    let keep = rank.min(m).min(n);
    let method = match method {
        SvdMethod::Auto if m.min(n) <= AUTO_EXACT_MAX => SvdMethod::Exact,
        SvdMethod::Auto => SvdMethod::Randomized,
        other => other,
    };
    let sketch = rank.saturating_add(oversample).min(m).min(n);
    // A sketch as wide as the matrix is no cheaper than the exact SVD.
    let method = if method == SvdMethod::Randomized && sketch == m.min(n) {
        SvdMethod::Exact
    } else {
        method
    };
    let (u, s, v) = match method {
        SvdMethod::Randomized => {
            let mut rng = SplitMix64::new(seed);
            let omega = Mat::<f64>::from_fn(n, sketch, |_, _| gaussian(&mut rng));
            let mut q = orthonormal_basis(delta * omega.as_ref());
            for _ in 0..power_iterations {
                let z = orthonormal_basis(delta.transpose() * q.as_ref());
                q = orthonormal_basis(delta * z.as_ref());
            }
            let small = q.transpose() * delta; // [k, in]
            let svd = small
                .thin_svd()
                .map_err(|e| format!("the SVD of the sketch did not converge: {e:?}"))?;
            let u = q.as_ref() * svd.U();
            let s: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
            (u, s, svd.V().to_owned())
        }
        _ => {
            let svd = delta
                .thin_svd()
                .map_err(|e| format!("the SVD did not converge: {e:?}"))?;
            let s: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
            (svd.U().to_owned(), s, svd.V().to_owned())
        }
    };
    Ok(TruncatedSvd {
        u: u.subcols(0, keep).to_owned(),
        s: s[..keep].to_vec(),
        v: v.subcols(0, keep).to_owned(),
        method,
    })
}

/// The LoRA factors of a truncated SVD at rank `rank` (zero-padded when it holds fewer
/// triplets): `A = Σ^{1/2} Vᵀ` as `[rank, in]` and `B = U Σ^{1/2}` as `[out, rank]`, row-major
/// f32, so that `B A = U Σ Vᵀ`.
pub fn lora_factors(svd: &TruncatedSvd, rank: usize) -> (Vec<f32>, Vec<f32>) {
    let (m, n, k) = (svd.u.nrows(), svd.v.nrows(), svd.s.len().min(rank));
    let mut a = vec![0f32; rank * n];
    let mut b = vec![0f32; m * rank];
    for j in 0..k {
        let root = svd.s[j].max(0.0).sqrt();
        for c in 0..n {
            a[j * n + c] = (root * svd.v[(c, j)]) as f32;
        }
        for r in 0..m {
            b[r * rank + j] = (svd.u[(r, j)] * root) as f32;
        }
    }
    (a, b)
}

/// Turns a full fine-tune into a LoRA adapter on `base` (see the module doc): every tensor of
/// `finetuned` whose module path `cfg.targets` selects, minus the same tensor of `base`,
/// truncated to rank `cfg.rank`. The adapter's config has `r = lora_alpha = cfg.rank` and
/// `base_model_name_or_path = base`.
///
/// Errors name the folder, file and tensor: a folder without weights, a tensor in one
/// checkpoint and not the other, shapes that differ, no targeted 2-D tensor, rank 0,
/// non-finite values.
pub fn extract(
    base: &Path,
    finetuned: &Path,
    cfg: &ExtractConfig,
) -> Result<(Adapter, ExtractReport)> {
    let started = Instant::now();
    let bad = |path: &Path, reason: String| AdapterError::Extract {
        path: path.to_path_buf(),
        reason,
    };
    if cfg.rank == 0 {
        return Err(bad(finetuned, "rank 0: give a rank of at least 1".into()).into());
    }
    if cfg.rank > crate::train::MAX_LORA_RANK {
        return Err(bad(
            finetuned,
            format!(
                "rank {}: at most {} (every module's factors are padded to it)",
                cfg.rank,
                crate::train::MAX_LORA_RANK
            ),
        )
        .into());
    }
    let mut model_config = None;
    for dir in [base, finetuned] {
        if dir.is_file() {
            return Err(bad(
                dir,
                "a single file (GGUF?): extract reads Hugging Face safetensors folders; convert a GGUF file first with `realign merge --model FILE -o DIR`".into(),
            )
            .into());
        }
        // Both folders must describe a model realign runs (config.json read and checked).
        let c = crate::model::Config::from_hf_file(&dir.join("config.json"))?;
        model_config.get_or_insert(c);
    }
    let b = MappedCheckpoint::open(base)?;
    let t = MappedCheckpoint::open(finetuned)?;
    for name in t.names() {
        if b.shape(name).is_none() {
            return Err(bad(
                t.file_of(name),
                format!(
                    "tensor {name:?} is not in the base checkpoint {}",
                    base.display()
                ),
            )
            .into());
        }
    }
    for name in b.names() {
        match (b.shape(name), t.shape(name)) {
            (Some(_), None) => {
                return Err(bad(
                    finetuned,
                    format!("tensor {name:?} of the base checkpoint is missing"),
                )
                .into())
            }
            (Some(sb), Some(st)) if sb != st => {
                return Err(bad(
                    t.file_of(name),
                    format!("tensor {name:?} has shape {st:?}, expected {sb:?} (its shape in the base checkpoint)"),
                )
                .into())
            }
            _ => {}
        }
    }

    let targets = TargetModules::List(cfg.targets.clone());
    let module_of = |name: &str| -> Option<String> {
        let path = name.strip_suffix(".weight")?;
        (b.shape(name)?.len() == 2 && targets.matches(path)).then(|| path.to_string())
    };
    let names: Vec<String> = b.names().map(str::to_string).collect();
    let selected: Vec<(&String, String)> = names
        .iter()
        .filter_map(|n| module_of(n).map(|m| (n, m)))
        .collect();
    if selected.is_empty() {
        return Err(bad(
            finetuned,
            format!(
                "no 2-D tensor \"<module>.weight\" matches the targets {:?}",
                cfg.targets
            ),
        )
        .into());
    }
    // Only a decoder layer's linear modules can carry a LoRA here: an embedding (peft's
    // `lora_embedding_A/B`, transposed) or `lm_head` written as `lora_A/B` would be an adapter
    // that peft loads with missing keys (a silent no-op) or that realign refuses to apply.
    if let Some(c) = &model_config {
        if let Some((name, _)) = selected
            .iter()
            .find(|(_, module)| !is_adaptable_linear(c, module))
        {
            return Err(bad(
                finetuned,
                format!(
                    "tensor {name:?} matches the targets {:?} but is not a linear module of a decoder layer ({}); \
                     a LoRA adapter of realign adapts only those: narrow --targets",
                    cfg.targets,
                    crate::model::LINEAR_MODULES.join(", ")
                ),
            )
            .into());
        }
    }

    let progress = crate::eval::replies::progress_bar(selected.len(), "extracting modules");
    let mut modules = std::collections::BTreeMap::new();
    let mut rows = Vec::with_capacity(selected.len());
    let (mut kept, mut total) = (0f64, 0f64);
    for (name, module) in &selected {
        let shape = b.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        let (out, inp) = (shape[0], shape[1]);
        let (wb, wt) = (b.values(name)?, t.values(name)?);
        let base_sq: f64 = wb.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let delta = Mat::<f64>::from_fn(out, inp, |r, c| {
            f64::from(wt[r * inp + c]) - f64::from(wb[r * inp + c])
        });
        drop((wb, wt));
        b.release(name);
        t.release(name);
        let delta_sq = delta.squared_norm_l2();
        let svd = if delta_sq == 0.0 {
            TruncatedSvd {
                u: Mat::zeros(out, 0),
                s: Vec::new(),
                v: Mat::zeros(inp, 0),
                method: SvdMethod::Exact,
            }
        } else {
            truncated_svd(
                delta.as_ref(),
                cfg.rank,
                cfg.method,
                cfg.oversample,
                cfg.power_iterations,
                hash64(cfg.seed, module.as_bytes()),
            )
            .map_err(|e| bad(t.file_of(name), format!("module {module}: {e}")))?
        };
        drop(delta);
        let captured: f64 = svd.s.iter().map(|s| s * s).sum::<f64>().min(delta_sq);
        kept += captured;
        total += delta_sq;
        let (a, bf) = lora_factors(&svd, cfg.rank);
        let dev = Device::Cpu;
        modules.insert(
            module.clone(),
            LoraModule {
                a: Tensor::from_vec(a, (cfg.rank, inp), &dev)?,
                b: Tensor::from_vec(bf, (out, cfg.rank), &dev)?,
                scale: 1.0,
            },
        );
        rows.push(ModuleExtraction {
            module: module.clone(),
            shape: [out, inp],
            method: svd.method,
            delta_norm: delta_sq.sqrt(),
            relative_update: ratio(delta_sq.sqrt(), base_sq.sqrt()),
            energy_captured: if delta_sq == 0.0 {
                1.0
            } else {
                captured / delta_sq
            },
            singular_values: svd.s,
        });
        progress.inc(1);
    }
    progress.finish_and_clear();

    let mut not_captured = Vec::new();
    for name in &names {
        if module_of(name).is_some() {
            continue;
        }
        let (wb, wt) = (b.values(name)?, t.values(name)?);
        let (mut d2, mut b2) = (0f64, 0f64);
        for (x, y) in wb.iter().zip(wt.iter()) {
            let d = f64::from(*y) - f64::from(*x);
            d2 += d * d;
            b2 += f64::from(*x) * f64::from(*x);
        }
        drop((wb, wt));
        b.release(name);
        t.release(name);
        if d2 > 0.0 {
            not_captured.push(ChangedTensor {
                name: name.clone(),
                relative_update: ratio(d2.sqrt(), b2.sqrt()),
            });
        }
    }

    let mut config = LoraConfig::new(cfg.rank, cfg.rank as f64, cfg.targets.clone());
    config.base_model_name_or_path = Some(b.dir().display().to_string());
    let report = ExtractReport {
        base: base.display().to_string(),
        finetuned: finetuned.display().to_string(),
        formula: format!(
            "per module: W_t - W_base truncated to rank {} by SVD, B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T, lora_alpha = r (scale 1)",
            cfg.rank
        ),
        config: cfg.clone(),
        num_modules: rows.len(),
        unchanged_modules: rows.iter().filter(|r| r.delta_norm == 0.0).count(),
        energy_captured: if total == 0.0 { 1.0 } else { kept / total },
        min_module_energy: rows
            .iter()
            .map(|r| r.energy_captured)
            .fold(1.0, f64::min),
        not_captured,
        modules: rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    let adapter = Adapter {
        config,
        modules,
        source: None,
    };
    Ok((adapter, report))
}

/// `x / y`, 0 when `y` is 0.
/// Whether `module` (`model.layers.3.self_attn.q_proj`) is a linear module of one of the
/// model's decoder layers: the modules [`crate::model::Model::apply_adapter`] accepts.
fn is_adaptable_linear(c: &crate::model::Config, module: &str) -> bool {
    module
        .split_once(".layers.")
        .and_then(|(_, rest)| rest.split_once('.'))
        .filter(|(i, _)| i.parse::<usize>().is_ok_and(|i| i < c.num_hidden_layers))
        .is_some_and(|(_, local)| c.linear_shape(local).is_some())
}

fn ratio(x: f64, y: f64) -> f64 {
    if y > 0.0 {
        x / y
    } else {
        0.0
    }
}

/// An orthonormal basis of the columns of `y` (the thin Q of its QR decomposition).
fn orthonormal_basis(y: Mat<f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

/// A standard normal draw (Box–Muller on two uniform draws in (0, 1]).
fn gaussian(rng: &mut SplitMix64) -> f64 {
    let uniform =
        |rng: &mut SplitMix64| ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let (u1, u2) = (uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nlsr::identify::linalg;

    /// A `[m, n]` matrix of rank `k` with singular values `10, 5, 2.5, ...` (so that the
    /// truncation at any rank is well separated), from seeded Gaussian factors.
    fn low_rank(m: usize, n: usize, k: usize, seed: u64) -> Mat<f64> {
        let mut rng = SplitMix64::new(seed);
        let x = orthonormal_basis(Mat::from_fn(m, k, |_, _| gaussian(&mut rng)));
        let y = orthonormal_basis(Mat::from_fn(n, k, |_, _| gaussian(&mut rng)));
        let s = Mat::from_fn(k, k, |i, j| {
            if i == j {
                10.0 / 2f64.powi(i as i32)
            } else {
                0.0
            }
        });
        x.as_ref() * s.as_ref() * y.transpose()
    }

    fn max_diff(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
        let mut d = 0f64;
        for i in 0..a.nrows() {
            for j in 0..a.ncols() {
                d = d.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        d
    }

    fn product(a: &[f32], b: &[f32], m: usize, n: usize, r: usize) -> Mat<f64> {
        Mat::from_fn(m, n, |i, j| {
            (0..r)
                .map(|t| f64::from(b[i * r + t]) * f64::from(a[t * n + j]))
                .sum()
        })
    }

    #[test]
    fn exact_and_randomized_recover_a_low_rank_update() {
        let d = low_rank(40, 70, 3, 1);
        for method in [SvdMethod::Exact, SvdMethod::Randomized] {
            let svd = truncated_svd(d.as_ref(), 3, method, 4, 1, 9).unwrap();
            assert_eq!(svd.method, method);
            let expected = [10.0, 5.0, 2.5];
            for (s, e) in svd.s.iter().zip(expected) {
                assert!((s - e).abs() < 1e-9, "{method:?}: {:?}", svd.s);
            }
            let (a, b) = lora_factors(&svd, 3);
            // f32 factors: the reconstruction is exact to f32 rounding.
            assert!(max_diff(product(&a, &b, 40, 70, 3).as_ref(), d.as_ref()) < 1e-5);
        }
    }

    #[test]
    fn truncation_keeps_the_largest_singular_values_of_a_brute_force_svd() {
        // A full-rank matrix: rank-2 truncation by faer equals the one-sided Jacobi SVD of
        // `nlsr::identify::linalg` (an independent implementation) on the kept triplets.
        let mut rng = SplitMix64::new(5);
        let d = Mat::from_fn(12, 9, |_, _| gaussian(&mut rng));
        let svd = truncated_svd(d.as_ref(), 2, SvdMethod::Exact, 0, 0, 0).unwrap();
        let mut m = linalg::Mat::zeros(12, 9);
        for i in 0..12 {
            for j in 0..9 {
                m.data[i * 9 + j] = d[(i, j)];
            }
        }
        let (_, mut sigma, _) = linalg::thin_svd(&m);
        sigma.sort_by(|x, y| y.total_cmp(x));
        for i in 0..2 {
            assert!(
                (svd.s[i] - sigma[i]).abs() < 1e-10,
                "{:?} vs {sigma:?}",
                svd.s
            );
        }
        // The residual is the energy of the dropped singular values (Eckart–Young).
        let (a, b) = lora_factors(&svd, 2);
        let approx = product(&a, &b, 12, 9, 2);
        let residual: f64 = (0..12)
            .flat_map(|i| (0..9).map(move |j| (i, j)))
            .map(|(i, j)| (d[(i, j)] - approx[(i, j)]).powi(2))
            .sum();
        let dropped: f64 = sigma[2..].iter().map(|s| s * s).sum();
        assert!(
            (residual - dropped).abs() < 1e-5 * dropped,
            "{residual} vs {dropped}"
        );
    }

    #[test]
    fn a_rank_above_the_update_pads_with_zeros_and_auto_picks_by_width() {
        let d = low_rank(6, 5, 2, 3);
        let svd = truncated_svd(d.as_ref(), 8, SvdMethod::Auto, 4, 1, 0).unwrap();
        assert_eq!(svd.method, SvdMethod::Exact);
        assert_eq!(svd.s.len(), 5);
        let (a, b) = lora_factors(&svd, 8);
        assert_eq!((a.len(), b.len()), (8 * 5, 6 * 8));
        assert!(a[5 * 5..].iter().all(|&x| x == 0.0));
        assert!(max_diff(product(&a, &b, 6, 5, 8).as_ref(), d.as_ref()) < 1e-5);
        // A sketch narrower than the matrix stays randomized; one as wide falls back to exact.
        let wide = low_rank(AUTO_EXACT_MAX + 1, AUTO_EXACT_MAX + 1, 1, 4);
        assert_eq!(
            truncated_svd(wide.as_ref(), 1, SvdMethod::Auto, 2, 0, 0)
                .unwrap()
                .method,
            SvdMethod::Randomized
        );
        assert_eq!(
            truncated_svd(d.as_ref(), 4, SvdMethod::Randomized, 4, 0, 0)
                .unwrap()
                .method,
            SvdMethod::Exact
        );
    }

    #[test]
    fn the_sketch_is_seeded() {
        let d = low_rank(50, 60, 10, 2);
        let run = |seed| truncated_svd(d.as_ref(), 3, SvdMethod::Randomized, 2, 0, seed).unwrap();
        assert_eq!(run(1).s, run(1).s);
        assert_ne!(run(1).s, run(2).s);
    }
}
