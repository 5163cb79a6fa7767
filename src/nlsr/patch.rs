//! The whole repair of a fine-tuned adapter (paper Eqs. 8-11): similarity of every module's
//! safety region, layer pruning, transplant of the reference's neurons, and the report.
//!
//! The inputs are LoRA adapters, small next to the model, so they are held whole; each module
//! is then worked on by itself.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::masks::Masks;
use super::prune::{layer_pruning, LayerDecision, PruneConfig, Selection};
use super::similarity::region_similarity_and_mask_sums;
use super::transplant::{shrink, transplant, transplant_exact, TransplantMode};
use super::{check_compatible, kind_of, label, layer_of, NlsrError};
use crate::adapters::Adapter;
use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// The report file (JSON) written beside the adapter.
pub const REPORT_JSON: &str = "patch_report.json";
/// The report file (Markdown).
pub const REPORT_MD: &str = "patch_report.md";
/// The plot of similarity per layer and module (SVG).
pub const PLOT_FILE: &str = "similarity.svg";
/// The same plot as PNG.
pub const PLOT_PNG: &str = "similarity.png";
/// The plots' common stem: [`PLOT_FILE`] and [`PLOT_PNG`] without their suffix.
pub const PLOT_STEM: &str = "similarity";

/// The settings of [`patch`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PatchConfig {
    /// Layer pruning: selection, probability mapping, `P_L`, `ε`, seed.
    pub prune: PruneConfig,
    /// How a repaired module is rebuilt.
    pub transplant: TransplantMode,
}

/// One module of a [`PatchReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleReport {
    /// The module path.
    pub module: String,
    /// The layer index, if the path has one.
    pub layer: Option<usize>,
    /// The last path segment (`q_proj`).
    pub kind: String,
    /// `S_j` (Eq. 8).
    pub similarity: f64,
    /// The 0-based rank by ascending similarity.
    pub rank: usize,
    /// The repair probability (adaptive selection only).
    pub probability: Option<f64>,
    /// The uniform draw (adaptive selection only).
    pub draw: Option<f64>,
    /// Whether the reference's neurons were transplanted.
    pub patched: bool,
    /// The fraction of ones in `M_A`.
    pub mask_density_a: f64,
    /// The fraction of ones in `M_B`.
    pub mask_density_b: f64,
    /// The fraction of ones in both masks together.
    pub mask_density: f64,
}

/// What `realign patch` writes as `patch_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchReport {
    /// The reference adapter `W_e`.
    pub reference: String,
    /// The fine-tuned adapter `W_t`.
    pub finetuned: String,
    /// The masks file.
    pub masks: String,
    /// The settings.
    pub config: PatchConfig,
    /// The direction of the probabilities, in words (adaptive selection).
    pub direction: String,
    /// The number of modules.
    pub num_modules: usize,
    /// The number of repaired modules.
    pub num_patched: usize,
    /// Every module, in module order.
    pub modules: Vec<ModuleReport>,
}

/// The repaired adapter and its report.
#[derive(Debug, Clone)]
pub struct PatchOutcome {
    /// The realigned adapter (config of `W_t`; with [`TransplantMode::Exact`], repaired modules
    /// get rank 2r through `rank_pattern` / `alpha_pattern` with their scale unchanged).
    pub adapter: Adapter,
    /// The report.
    pub report: PatchReport,
}

/// NLSR's repair (Eqs. 8-11): for every module, `S_j` of the masked regions of `reference` and
/// `finetuned` ([`region_similarity`](super::similarity::region_similarity)), the decision ([`layer_pruning`]), and for repaired
/// modules the transplant ([`transplant`] or [`transplant_exact`]); other modules stay
/// `finetuned`'s, bit for bit.
///
/// Refuses inputs that do not belong together: different module sets, factor shapes (ranks)
/// or scales between the adapters, and masks made for another adapter.
pub fn patch(
    reference: &Adapter,
    finetuned: &Adapter,
    masks: &Masks,
    config: &PatchConfig,
) -> Result<PatchOutcome> {
    check_compatible(
        reference,
        "reference adapter",
        finetuned,
        "fine-tuned adapter",
        true,
    )?;
    masks.check_fits(finetuned, "fine-tuned adapter")?;
    masks.check_not_empty()?;
    config.prune.validate(finetuned.modules.len())?;

    let paths: Vec<&String> = finetuned.modules.keys().collect();
    let sims = paths
        .par_iter()
        .map(|path| {
            let (e, t, mask) = (
                &reference.modules[*path],
                &finetuned.modules[*path],
                &masks.modules[*path],
            );
            let (s, sa, sb) = region_similarity_and_mask_sums(e, t, Some(mask))?;
            if !s.is_finite() {
                return Err(NlsrError::NotFinite {
                    module: (*path).clone(),
                    what: "the similarity S (Eq. 8)".into(),
                    value: s,
                }
                .into());
            }
            Ok((
                s,
                mask_densities(sa, sb, mask.a.elem_count(), mask.b.elem_count()),
            ))
        })
        .collect::<Result<Vec<(f64, (f64, f64, f64))>>>()?;
    let (sims, densities): (Vec<f64>, Vec<_>) = sims.into_iter().unzip();
    let decisions = layer_pruning(&sims, &config.prune)?;

    let repaired = paths
        .par_iter()
        .zip(decisions.par_iter())
        .map(|(path, d)| {
            let (e, t, mask) = (
                &reference.modules[*path],
                &finetuned.modules[*path],
                &masks.modules[*path],
            );
            let m = match (d.repaired, config.transplant) {
                (false, _) => t.clone(),
                (true, TransplantMode::Replace) => transplant(e, t, mask)?,
                (true, TransplantMode::Exact) => transplant_exact(e, t, mask)?,
                (true, TransplantMode::Shrink) => shrink(e, t, mask)?,
            };
            Ok(m)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut adapter_config = finetuned.config.clone();
    let mut modules = BTreeMap::new();
    let mut rows = Vec::with_capacity(decisions.len());
    for (((path, d), m), dens) in paths
        .into_iter()
        .zip(decisions)
        .zip(repaired)
        .zip(densities)
    {
        if d.repaired && config.transplant == TransplantMode::Exact {
            keep_scale(&mut adapter_config, path, m.rank(), m.scale);
        }
        modules.insert(path.clone(), m);
        rows.push(module_report(path, &d, dens));
    }
    check_output_config(&adapter_config, &modules)?;
    let report = patch_report(reference, finetuned, masks, config, rows);
    Ok(PatchOutcome {
        adapter: Adapter {
            config: adapter_config,
            modules,
            source: None,
        },
        report,
    })
}

/// Refuses an output whose config does not give each module its rank and scale (the exact
/// transplant's rank 2r overridden by the fine-tuned adapter's own patterns).
pub(crate) fn check_output_config(
    adapter_config: &crate::adapters::LoraConfig,
    modules: &BTreeMap<String, crate::adapters::LoraModule>,
) -> Result<()> {
    for (path, m) in modules {
        let (r, s) = (
            adapter_config.rank_for(path),
            adapter_config.scaling_for(path),
        );
        if r != m.rank() || (s - m.scale).abs() > 1e-9 * s.abs().max(1.0) {
            return Err(NlsrError::Option {
                name: "transplant".into(),
                value: "exact".into(),
                reason: format!(
                    "module {path}: the fine-tuned adapter's rank_pattern / alpha_pattern override \
                     the rank {} / scale {} the exact transplant needs (config gives {r} / {s})",
                    m.rank(),
                    m.scale
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// The report of a patch from its rows.
pub(crate) fn patch_report(
    reference: &Adapter,
    finetuned: &Adapter,
    masks: &Masks,
    config: &PatchConfig,
    rows: Vec<ModuleReport>,
) -> PatchReport {
    let num_patched = rows.iter().filter(|r| r.patched).count();
    PatchReport {
        reference: label(reference, "reference adapter"),
        finetuned: label(finetuned, "fine-tuned adapter"),
        masks: masks.label(),
        config: *config,
        direction: match config.prune.selection {
            Selection::Adaptive => config.prune.mapping.direction().to_string(),
            Selection::Threshold(_) => "repair S < tau".to_string(),
            Selection::TopK(_) => "repair the k least similar".to_string(),
        },
        num_modules: rows.len(),
        num_patched,
        modules: rows,
    }
}

/// The mask densities of the report from the mask sums and sizes, as
/// [`ModuleMask::density`](super::masks::ModuleMask::density) gives them.
pub(crate) fn mask_densities(sa: f64, sb: f64, na: usize, nb: usize) -> (f64, f64, f64) {
    let (na, nb) = (na as f64, nb as f64);
    let frac = |s: f64, n: f64| if n > 0.0 { s / n } else { 0.0 };
    (frac(sa, na), frac(sb, nb), frac(sa + sb, na + nb))
}

/// One row of the report.
pub(crate) fn module_report(
    path: &str,
    d: &LayerDecision,
    (da, db, dab): (f64, f64, f64),
) -> ModuleReport {
    ModuleReport {
        module: path.to_string(),
        layer: layer_of(path),
        kind: kind_of(path).to_string(),
        similarity: d.similarity,
        rank: d.rank,
        probability: d.probability,
        draw: d.draw,
        patched: d.repaired,
        mask_density_a: da,
        mask_density_b: db,
        mask_density: dab,
    }
}

/// Gives module `path` rank `rank` in `config` while keeping its scale: `rank_pattern` and
/// `alpha_pattern` entries keyed by the escaped full path (peft matches keys as regexes against
/// the end of the path), with `alpha = scale · rank` (`scale · √rank` with rsLoRA).
pub(crate) fn keep_scale(
    config: &mut crate::adapters::LoraConfig,
    path: &str,
    rank: usize,
    scale: f64,
) {
    let key = regex::escape(path);
    let alpha = if config.use_rslora {
        scale * (rank as f64).sqrt()
    } else {
        scale * rank as f64
    };
    config.rank_pattern.insert(key.clone(), rank);
    config.alpha_pattern.insert(key, alpha);
}

/// The Markdown report: settings, then one table row per module.
pub fn report_markdown(r: &PatchReport) -> String {
    let p = &r.config.prune;
    let selection = match p.selection {
        Selection::Adaptive => format!(
            "adaptive (probability {:?}, P_L {}, epsilon {}, seed {})",
            p.mapping, p.layer_prune, p.epsilon, p.seed
        ),
        Selection::Threshold(t) => format!("threshold (tau {t})"),
        Selection::TopK(k) => format!("top-k (k {k})"),
    };
    let mut s = format!(
        "# NLSR patch report\n\n\
         - reference: `{}`\n- fine-tuned: `{}`\n- masks: `{}`\n\
         - selection: {selection}\n- direction: {}\n- transplant: {:?}\n\
         - patched: {} of {} modules\n- plot: `{PLOT_FILE}`, `{PLOT_PNG}` (one colour per module kind; \
         large black rings are patched modules)\n\n\
         | module | S | rank | probability | draw | patched | mask density (A / B / all) |\n\
         |---|---|---|---|---|---|---|\n",
        r.reference,
        r.finetuned,
        r.masks,
        r.direction,
        r.config.transplant,
        r.num_patched,
        r.num_modules
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for m in &r.modules {
        s.push_str(&format!(
            "| {} | {:.6} | {} | {} | {} | {} | {:.3} / {:.3} / {:.3} |\n",
            m.module,
            m.similarity,
            m.rank,
            opt(m.probability),
            opt(m.draw),
            if m.patched { "yes" } else { "no" },
            m.mask_density_a,
            m.mask_density_b,
            m.mask_density
        ));
    }
    s
}

/// Writes the realigned adapter (peft format) into `out_dir`, with `patch_report.json`,
/// `patch_report.md`, `similarity.svg` and `similarity.png` beside it; each file atomically.
pub fn write_patch(out_dir: &Path, outcome: &PatchOutcome) -> Result<()> {
    outcome.adapter.save(out_dir)?;
    write_reports(out_dir, &outcome.report)
}

/// Writes `patch_report.json`, `patch_report.md`, `similarity.svg` and `similarity.png` into
/// `out_dir`.
pub(crate) fn write_reports(out_dir: &Path, report: &PatchReport) -> Result<()> {
    let json_path = out_dir.join(REPORT_JSON);
    let json = serde_json::to_string_pretty(report).map_err(|source| Error::Json {
        path: json_path.clone(),
        source,
    })?;
    write_atomic(&json_path, json.as_bytes())?;
    write_atomic(&out_dir.join(REPORT_MD), report_markdown(report).as_bytes())?;
    super::plot::similarity_plot(&out_dir.join(PLOT_STEM), &report.modules)
}
