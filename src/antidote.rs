//! Antidote (Huang, Bhattacharya, Joshi, Kimball and Liu 2024, "Antidote: Post-fine-tuning
//! Safety Alignment for Large Language Models against Harmful Fine-tuning", arXiv:2408.09600,
//! section 4): a training-free repair that prunes, in one shot, the weights most responsible
//! for harmful output, found with the Wanda score on a realignment set of harmful prompts and
//! harmful answers.
//!
//! Per module `j`, with the fine-tuning update `ΔW_j = W_t − W_a` (dense, `out x in`) and the
//! module's input `x` over the response tokens of the realignment set, run through the
//! fine-tuned model:
//!
//! `score_ik = |ΔW_ik| · sqrt(mean_t x_tk²)` (Wanda, Sun et al. 2024, Eq. 1);
//! `ΔW'_j = ΔW_j ⊙ (1 − M_j)`, `M_j` the top `density` fraction of `score` in the module;
//! `W_j ← W_a,j + ΔW'_j`.
//!
//! Only the fine-tuning update is pruned (the base weights and the alignment stay), so the
//! result is `W_a` plus a sparse update, which is not low-rank: it is written exactly
//! ([`crate::adapters::exact`]: rank `r_a + min(out, in)` per module, through peft's
//! `rank_pattern`). That is as large as the dense update; it suits models of this project's
//! size and is the price of exactness.
//!
//! ```no_run
//! use realign::adapters::Adapter;
//! use realign::model::{LoadOptions, LoadedModel};
//! let loaded = LoadedModel::load("model".as_ref(), &LoadOptions::default())?;
//! let dev = candle_core::Device::Cpu;
//! let wa = Adapter::load("aligned".as_ref(), &dev)?;
//! let wt = Adapter::load("finetuned".as_ref(), &dev)?;
//! let rows = realign::data::load_source("embedded:harmful_attack")?;
//! let cfg = realign::antidote::AntidoteConfig::default();
//! let (repaired, report) =
//!     realign::antidote::antidote(&loaded.model, &loaded.tokenizer, &wa, &wt, &rows, &cfg)?;
//! repaired.save("antidote".as_ref())?;
//! # Ok::<(), realign::Error>(())
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::adapters::exact::{dense_update, with_dense_update};
use crate::adapters::Adapter;
use crate::data::{PromptTemplate, Row};
use crate::model::{AdapterMode, Model};
use crate::nlsr::identify::linalg::Mat;
use crate::nlsr::identify::select::{top_fraction_mask, Granularity, Scope};
use crate::nlsr::identify::{scores::wanda_scores, stats};
use crate::nlsr::{check_same_updates, NlsrError};
use crate::safelora::scale_one_config;
use crate::tokenizer::Tokenizer;
use crate::Result;

/// The report file written beside the adapter.
pub const REPORT_JSON: &str = "antidote_report.json";

/// The settings of [`antidote`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AntidoteConfig {
    /// The fraction of each module's update entries pruned (the highest Wanda scores).
    pub density: f64,
    /// Use at most this many usable realignment rows (in file order).
    pub max_samples: Option<usize>,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Tokens per sequence (prompt + answer), answers cut beyond.
    pub max_length: usize,
    /// How prompts are rendered.
    #[serde(skip)]
    pub template: PromptTemplate,
    /// A system prompt put in front of every prompt.
    pub system: Option<String>,
}

impl Default for AntidoteConfig {
    fn default() -> Self {
        Self {
            density: 0.2,
            max_samples: Some(100),
            batch_size: 8,
            max_length: 256,
            template: PromptTemplate::Chat,
            system: None,
        }
    }
}

/// One module of an [`AntidoteReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AntidoteModule {
    /// The module path.
    pub module: String,
    /// Entries of `ΔW` pruned.
    pub pruned: usize,
    /// Entries of `ΔW`.
    pub entries: usize,
    /// `||ΔW ⊙ M||_F² / ||ΔW||_F²`: the share of the update's energy removed.
    pub energy_removed: f64,
}

/// What `realign antidote` writes as `antidote_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AntidoteReport {
    /// The aligned adapter `W_a`.
    pub aligned: String,
    /// The fine-tuned adapter `W_t`.
    pub finetuned: String,
    /// The settings.
    pub config: AntidoteConfig,
    /// Realignment rows used.
    pub samples: usize,
    /// Response tokens the activations were taken at.
    pub tokens: usize,
    /// The formula, in words.
    pub formula: String,
    /// Every module, in module order.
    pub modules: Vec<AntidoteModule>,
}

/// `ΔW ⊙ (1 − M)` for `M` the top `density` of `scores`, and the module's report row.
///
/// # Shapes
/// `update`, `scores`: `[out, in]` -> `[out, in]`.
pub fn prune_update(
    module: &str,
    update: &Mat,
    scores: &Mat,
    density: f64,
) -> (Mat, AntidoteModule) {
    let mask = top_fraction_mask(scores, density, Granularity::Entry, Scope::PerTensor);
    let mut pruned = update.clone();
    let (mut removed, mut total, mut count) = (0.0, 0.0, 0);
    for ((v, &m), &u) in pruned.data.iter_mut().zip(&mask).zip(&update.data) {
        total += u * u;
        if m != 0.0 {
            removed += u * u;
            count += 1;
            *v = 0.0;
        }
    }
    let row = AntidoteModule {
        module: module.to_string(),
        pruned: count,
        entries: update.data.len(),
        energy_removed: if total > 0.0 { removed / total } else { 0.0 },
    };
    (pruned, row)
}

/// Antidote on a fine-tuned adapter (see the [module documentation](self)): the activations of
/// `rows` (harmful prompt + harmful answer; the answer's tokens are used) through
/// `base + W_t`, then the pruned update on top of `W_a`, and its report.
///
/// Errors: `density` outside `[0, 1]`, `max_samples` or `batch_size` 0; adapters over
/// different modules or shapes; no usable realignment row.
pub fn antidote(
    base: &Model,
    tok: &Tokenizer,
    aligned: &Adapter,
    finetuned: &Adapter,
    rows: &[Row],
    cfg: &AntidoteConfig,
) -> Result<(Adapter, AntidoteReport)> {
    let option = |name: &str, value: String, reason: &str| -> crate::Error {
        NlsrError::Option {
            name: name.into(),
            value,
            reason: reason.into(),
        }
        .into()
    };
    if !(0.0..=1.0).contains(&cfg.density) {
        return Err(option(
            "density",
            cfg.density.to_string(),
            "must be in [0, 1] (the fraction of the update pruned)",
        ));
    }
    if cfg.max_samples == Some(0) {
        return Err(option(
            "max-samples",
            "0".into(),
            "must be at least 1 (the rows scored)",
        ));
    }
    if cfg.batch_size == 0 {
        return Err(option(
            "batch-size",
            "0".into(),
            "must be at least 1 (sequences per forward pass)",
        ));
    }
    let (al, tl) = check_same_updates(aligned, finetuned)?;
    let corpus = stats::encode_corpus(
        tok,
        cfg.template,
        cfg.system.as_deref(),
        rows,
        cfg.max_length,
        cfg.max_samples,
    )?;
    if corpus.samples.is_empty() {
        return Err(option(
            "data",
            format!("{} rows", rows.len()),
            &format!(
                "no usable realignment row ({} too long for max-length {})",
                corpus.too_long, cfg.max_length
            ),
        ));
    }
    let mut model = base.clone();
    model.apply_adapter(finetuned, AdapterMode::Merged)?;
    let pad = tok.pad_token_id().unwrap_or(0);
    let stats = stats::collect_stats(&model, finetuned, &corpus.samples, cfg.batch_size, pad)?;
    let mut modules = BTreeMap::new();
    let mut ranks = BTreeMap::new();
    let mut rows_out = Vec::new();
    let mut tokens = 0;
    for (path, t) in &finetuned.modules {
        let a = &aligned.modules[path];
        let (to, ti) = (crate::nlsr::dims2(&t.b)[0], crate::nlsr::dims2(&t.a)[1]);
        let mut update = Mat {
            rows: to,
            cols: ti,
            data: dense_update(t)?,
        };
        for (u, v) in update.data.iter_mut().zip(dense_update(a)?) {
            *u -= v;
        }
        let Some(s) = stats.get(path) else {
            return Err(option(
                "data",
                path.clone(),
                "no activations were recorded for this module",
            ));
        };
        tokens = s.tokens;
        let scores = wanda_scores(&update, &s.input_sq, s.tokens);
        let (pruned, row) = prune_update(path, &update, &scores, cfg.density);
        let values: Vec<f32> = pruned.data.iter().map(|&v| v as f32).collect();
        let m = with_dense_update(a, &values, to, ti)?;
        ranks.insert(path.clone(), m.rank());
        modules.insert(path.clone(), m);
        rows_out.push(row);
    }
    let report = AntidoteReport {
        aligned: al,
        finetuned: tl,
        config: cfg.clone(),
        samples: corpus.samples.len(),
        tokens,
        formula: "W = W_a + dW * (1 - M), dW = W_t - W_a, M = top density of |dW| * rms(x)".into(),
        modules: rows_out,
    };
    Ok((
        Adapter {
            config: scale_one_config(&finetuned.config, &ranks),
            modules,
            source: None,
        },
        report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_the_highest_wanda_scores_of_the_update() {
        // ΔW = [[1, -4], [2, 0.5]], input RMS per column (1, 0.25) (sums of squares 4 and
        // 0.25 over 4 tokens): scores [[1, 1], [2, 0.125]]. Density 0.25 prunes 1 of 4: the
        // highest score, (1, 0) = 2.
        let update = Mat {
            rows: 2,
            cols: 2,
            data: vec![1., -4., 2., 0.5],
        };
        let scores = wanda_scores(&update, &[4.0, 0.25], 4);
        assert_eq!(scores.data, vec![1., 1., 2., 0.125]);
        let (pruned, row) = prune_update("m", &update, &scores, 0.25);
        assert_eq!(pruned.data, vec![1., -4., 0., 0.5]);
        assert_eq!((row.pruned, row.entries), (1, 4));
        assert!((row.energy_removed - 4.0 / 21.25).abs() < 1e-12);
        // density 0.5: the tie (0, 0) = (0, 1) = 1 goes to the lower index.
        let (pruned, _) = prune_update("m", &update, &scores, 0.5);
        assert_eq!(pruned.data, vec![0., -4., 0., 0.5]);
    }
}
