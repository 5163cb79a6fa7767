//! Safety-critical neuron identification (NLSR, paper Eqs. 3-6; `docs/METHODS.md`, NLSR item
//! 2): from a safety corpus (harmful prompt + safe response) run through the reference model
//! (base + `W_e`), score every entry of every LoRA factor and keep the top `1 - P_SR` per
//! tensor as the masks [`crate::nlsr::masks`] stores.
//!
//! | method | score of an entry of `W` (`lora_A [r, in]` or `lora_B [out, r]`) |
//! |---|---|
//! | [`Method::LowRank`] | `|U U^T W|`, `U` the top-`q` left singular vectors of `W X` (Eqs. 3-5; [`scores::low_rank_scores`]) |
//! | [`Method::Wanda`] | `|W| * sqrt(mean x^2)` per input column ([`scores::wanda_scores`]) |
//! | [`Method::Snip`] | `|W * dNLL/dW|` on the safe responses ([`scores::snip_scores`]) |
//! | [`Method::PreferenceSnip`] | `|W * dDPO/dW|`, safe over unsafe, reference = the base model |
//! | [`Method::Random`] | uniform, seeded |
//!
//! `X` is the factor's input at the response tokens (see [`stats`]): for `lora_A` the module
//! input, for `lora_B` the output of `lora_A`. Nothing of size "corpus" is held: per module
//! only the `r x r` Gram matrix `K = (A X)(A X)^T` and the per-column sums of `x^2` are
//! streamed, from which both Gram matrices of Eq. 4 follow (`K` for A, `B K B^T` for B).
//!
//! ```no_run
//! use realign::adapters::Adapter;
//! use realign::model::{LoadOptions, LoadedModel};
//! use realign::nlsr::identify::{identify, IdentifyConfig, Method};
//! let loaded = LoadedModel::load("model".as_ref(), &LoadOptions::default())?;
//! let reference = Adapter::load("w_e".as_ref(), &candle_core::Device::Cpu)?;
//! let rows = realign::data::load_source("embedded:safety_sft")?;
//! let cfg = IdentifyConfig { method: Method::LowRank, ..Default::default() };
//! let (masks, report) = identify(&loaded.model, &loaded.tokenizer, &reference, &rows, &cfg)?;
//! realign::nlsr::masks::save(&masks, "masks.safetensors".as_ref())?;
//! # Ok::<(), realign::Error>(())
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};

use crate::adapters::keys::{self, LoraPart};
use crate::adapters::Adapter;
use crate::data::{PromptTemplate, Row};
use crate::model::{AdapterMode, Model};
use crate::nlsr::masks::{Masks, ModuleMask};
use crate::nlsr::NlsrError;
use crate::tokenizer::Tokenizer;

pub mod gradient;
pub mod linalg;
pub mod overlap;
pub mod scores;
pub mod select;
pub mod stats;

pub use overlap::{overlap, Overlap, OverlapEntry};
pub use select::{Granularity, Scope};

use linalg::Mat;

/// How entries are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The paper's rank reduction (Eqs. 3-6).
    #[default]
    LowRank,
    /// Wanda: weight magnitude times input RMS.
    Wanda,
    /// SNIP on the NLL of the safe responses.
    Snip,
    /// SNIP on the DPO loss (safe over unsafe responses; reference = the base model).
    PreferenceSnip,
    /// Uniform random scores (seeded): the control.
    Random,
}

impl Method {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::LowRank => "low-rank",
            Method::Wanda => "wanda",
            Method::Snip => "snip",
            Method::PreferenceSnip => "preference-snip",
            Method::Random => "random",
        }
    }
}

/// The settings of identification.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IdentifyConfig {
    /// The scoring method.
    pub method: Method,
    /// `P_SR`: the fraction of each tensor that is *not* kept (0.8 keeps the top 20%).
    pub sparsity: f64,
    /// Entries, rows or columns.
    pub granularity: Granularity,
    /// Per tensor (the paper) or per output row.
    pub scope: Scope,
    /// Low-rank: `q = round(rank_fraction * min(rows, cols))` singular directions kept.
    pub rank_fraction: f64,
    /// Seed of `random`.
    pub seed: u64,
    /// Use at most this many usable rows (in file order).
    pub max_samples: Option<usize>,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Tokens per sequence (prompt + response), responses cut beyond.
    pub max_length: usize,
    /// DPO's beta for `preference-snip`.
    pub dpo_beta: f64,
    /// How prompts are rendered.
    #[serde(skip)]
    pub template: PromptTemplate,
    /// A system prompt put in front of every prompt.
    pub system: Option<String>,
}

impl Default for IdentifyConfig {
    fn default() -> Self {
        Self {
            method: Method::LowRank,
            sparsity: 0.8,
            granularity: Granularity::Entry,
            scope: Scope::PerTensor,
            rank_fraction: 0.8,
            seed: 42,
            max_samples: None,
            batch_size: 8,
            max_length: 512,
            dpo_beta: 0.1,
            template: PromptTemplate::Chat,
            system: None,
        }
    }
}

impl IdentifyConfig {
    /// Checks the ranges of the settings.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |name: &str, value: String, reason: &str| -> crate::Result<()> {
            Err(NlsrError::Option {
                name: name.into(),
                value,
                reason: reason.into(),
            }
            .into())
        };
        if !(0.0..1.0).contains(&self.sparsity) {
            return bad("sparsity", self.sparsity.to_string(), "must be in [0, 1)");
        }
        if !(self.rank_fraction > 0.0 && self.rank_fraction <= 1.0) {
            return bad(
                "rank-fraction",
                self.rank_fraction.to_string(),
                "must be in (0, 1]",
            );
        }
        if self.batch_size == 0 {
            return bad("batch-size", "0".into(), "must be at least 1");
        }
        if self.max_length < 2 {
            return bad(
                "max-length",
                self.max_length.to_string(),
                "must be at least 2",
            );
        }
        if self.max_samples == Some(0) {
            return bad("max-samples", "0".into(), "must be at least 1");
        }
        if self.scope == Scope::PerRow && self.granularity != Granularity::Entry {
            return bad(
                "per-row",
                format!("{:?} granularity", self.granularity),
                "per-row selection keeps entries within rows: use --granularity entry",
            );
        }
        if !(self.dpo_beta > 0.0 && self.dpo_beta.is_finite()) {
            return bad("dpo-beta", self.dpo_beta.to_string(), "must be positive");
        }
        Ok(())
    }
}

/// The density of one mask tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorDensity {
    /// The peft key of the tensor.
    pub tensor: String,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// Entries kept (ones).
    pub kept: usize,
    /// `kept / (rows * cols)`.
    pub density: f64,
}

/// What identification did, for `MASKS.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IdentifyReport {
    /// The method's name.
    pub method: &'static str,
    /// The settings.
    pub config: IdentifyConfig,
    /// Samples used (0 for `random`, which reads no data).
    pub samples: usize,
    /// Rows left out because the prompt alone reached `max_length`.
    pub skipped_too_long: usize,
    /// KTO rows left out as undesirable.
    pub skipped_undesirable: usize,
    /// Response tokens seen (of the safe responses).
    pub tokens: usize,
    /// Wall time of identification.
    pub seconds: f64,
    /// Ones over all entries of all tensors.
    pub density: f64,
    /// Per tensor, module order, A before B.
    pub tensors: Vec<TensorDensity>,
}

/// Scores of the two factors of one module.
type ModuleScores = (Mat, Mat);

/// Identifies the safety-critical neurons of `adapter` (the reference `W_e`) on `base` (the
/// model without it) from `rows`. Returns the masks and the report.
pub fn identify(
    base: &Model,
    tok: &Tokenizer,
    adapter: &Adapter,
    rows: &[Row],
    cfg: &IdentifyConfig,
) -> crate::Result<(Masks, IdentifyReport)> {
    cfg.validate()?;
    let start = Instant::now();
    let factors: BTreeMap<&String, (Mat, Mat)> = adapter
        .modules
        .iter()
        .map(|(n, m)| Ok((n, (Mat::from_tensor(&m.a)?, Mat::from_tensor(&m.b)?))))
        .collect::<candle_core::Result<_>>()?;
    let (mut samples, mut too_long, mut undesirable, mut tokens) = (0, 0, 0, 0);
    let scores: BTreeMap<&String, ModuleScores> = if cfg.method == Method::Random {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        factors
            .iter()
            .map(|(n, (a, b))| {
                let sa = scores::random_scores(a.rows, a.cols, &mut rng);
                (*n, (sa, scores::random_scores(b.rows, b.cols, &mut rng)))
            })
            .collect()
    } else {
        let corpus = stats::encode_corpus(
            tok,
            cfg.template,
            cfg.system.as_deref(),
            rows,
            cfg.max_length,
            cfg.max_samples,
        )?;
        (samples, too_long, undesirable) =
            (corpus.samples.len(), corpus.too_long, corpus.undesirable);
        if corpus.samples.is_empty() {
            return Err(NlsrError::Option {
                name: "data".into(),
                value: format!("{} rows", rows.len()),
                reason: format!(
                    "no usable sample ({too_long} too long for max-length {}, {undesirable} undesirable)",
                    cfg.max_length
                ),
            }
            .into());
        }
        tokens = corpus
            .samples
            .iter()
            .map(|s| s.safe.labels.iter().filter(|&&l| l != -100).count())
            .sum();
        let pad = tok.pad_token_id().unwrap_or(0);
        model_scores(base, adapter, &factors, &corpus.samples, pad, cfg)?
    };
    let keep = 1.0 - cfg.sparsity;
    let mut modules = BTreeMap::new();
    let mut tensors = Vec::new();
    let (mut ones, mut total) = (0usize, 0usize);
    for (name, (sa, sb)) in scores {
        let mut pair = Vec::with_capacity(2);
        for (part, s) in [(LoraPart::A, &sa), (LoraPart::B, &sb)] {
            let mask = select::top_fraction_mask(s, keep, cfg.granularity, cfg.scope);
            let kept = mask.iter().filter(|v| **v != 0.0).count();
            (ones, total) = (ones + kept, total + mask.len());
            tensors.push(TensorDensity {
                tensor: keys::saved_key(name, part),
                shape: [s.rows, s.cols],
                kept,
                density: kept as f64 / mask.len().max(1) as f64,
            });
            pair.push(Tensor::from_vec(mask, (s.rows, s.cols), &Device::Cpu)?);
        }
        let (b, a) = (pair.pop(), pair.pop());
        if let (Some(a), Some(b)) = (a, b) {
            modules.insert(name.clone(), ModuleMask { a, b });
        }
    }
    if ones == 0 && total > 0 {
        let largest = tensors.iter().map(|t| t.shape[0] * t.shape[1]).max();
        return Err(NlsrError::Option {
            name: "sparsity".into(),
            value: cfg.sparsity.to_string(),
            reason: format!(
                "keeps no entry of any tensor (the largest has {} entries): the masks would \
                 select nothing; lower it",
                largest.unwrap_or(0)
            ),
        }
        .into());
    }
    let report = IdentifyReport {
        method: cfg.method.name(),
        config: cfg.clone(),
        samples,
        skipped_too_long: too_long,
        skipped_undesirable: undesirable,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        density: ones as f64 / total.max(1) as f64,
        tensors,
    };
    Ok((
        Masks {
            modules,
            source: None,
        },
        report,
    ))
}

/// The scores of the methods that run the model.
fn model_scores<'a>(
    base: &Model,
    adapter: &Adapter,
    factors: &BTreeMap<&'a String, (Mat, Mat)>,
    samples: &[stats::Sample],
    pad: u32,
    cfg: &IdentifyConfig,
) -> crate::Result<BTreeMap<&'a String, ModuleScores>> {
    let mut out = BTreeMap::new();
    match cfg.method {
        Method::LowRank | Method::Wanda => {
            let mut reference = base.clone();
            reference.apply_adapter(adapter, AdapterMode::Merged)?;
            let stats = stats::collect_stats(&reference, adapter, samples, cfg.batch_size, pad)?;
            for (name, (a, b)) in factors {
                let Some(s) = stats.get(*name) else { continue };
                let pair = if cfg.method == Method::LowRank {
                    scores::low_rank_scores(a, b, &s.gram, cfg.rank_fraction)
                } else {
                    // B's input is z = A x: its per-column sums of squares are diag(K).
                    let z_sq: Vec<f64> = (0..s.gram.rows).map(|i| s.gram.at(i, i)).collect();
                    (
                        scores::wanda_scores(a, &s.input_sq, s.tokens),
                        scores::wanda_scores(b, &z_sq, s.tokens),
                    )
                };
                out.insert(*name, pair);
            }
        }
        Method::Snip | Method::PreferenceSnip => {
            let loss = if cfg.method == Method::Snip {
                gradient::Loss::Nll
            } else {
                gradient::Loss::Dpo { beta: cfg.dpo_beta }
            };
            let grads =
                gradient::lora_gradients(base, adapter, samples, cfg.batch_size, pad, loss)?;
            for (name, (a, b)) in factors {
                let Some((ga, gb)) = grads.get(*name) else {
                    continue;
                };
                out.insert(
                    *name,
                    (scores::snip_scores(a, ga), scores::snip_scores(b, gb)),
                );
            }
        }
        Method::Random => {}
    }
    Ok(out)
}

/// Where the JSON report of a masks file goes: the same path with the extension `json`
/// (`masks.safetensors` -> `masks.json`).
pub fn report_path(masks: &std::path::Path) -> std::path::PathBuf {
    masks.with_extension("json")
}
