//! Safety-neuron detection (safety-neurons paper, §2.1, Eqs. 2-3): stream a corpus through the
//! model one prompt at a time, compute every neuron's [importance](super::importance), select
//! the prompt's activated neurons (`importance >= ε`, or the per-layer top `k`), and intersect
//! into a running set. The result is the set of neurons activated by **every** prompt: safety
//! neurons on a harmful corpus, foundation neurons on a general one (`embedded:general_text`).
//!
//! Each prompt is the user message rendered with the model's chat template and the generation
//! prompt (the same for harmful and general text); by default only the tokens of the user's
//! content count ([`TokenScope::Content`]): the template and a system preamble are identical in
//! every prompt and would select generally important neurons. The default rule ranks per
//! module kind ([`Selection::PerKind`], the paper's 1000 attention / 2000 FFN per layer at 7B
//! width scaled to the model's), an FFN unit counted once. Only one prompt's (one layer's)
//! activations are held at a time, plus the running selection and the per-neuron importance
//! sums (the [`NeuronRanking`] written beside the set).
//!
//! ```no_run
//! use realign::neurons::detect::{detect, DetectConfig, Selection};
//! let loaded = realign::model::LoadedModel::load("model".as_ref(), &Default::default())?;
//! let rows = realign::data::load_source("embedded:safety_sft")?;
//! let c = loaded.model.config();
//! let selection = Selection::paper_split(c.hidden_size, c.intermediate_size, None, None);
//! let cfg = DetectConfig { selection, ..Default::default() };
//! let (set, report) = detect(&loaded.model, &loaded.tokenizer, &rows, &cfg, &mut |_, _| {})?;
//! set.save("safety.json".as_ref())?;
//! println!("{}", report.to_markdown());
//! # Ok::<(), realign::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::importance::{ImportanceKind, LayerImportance, NeuronImportance};
use super::ranking::{NeuronRanking, RankingAccumulator};
use super::scope::{scoped_prompt, TokenScope};
use super::set::layer_key;
use super::{Axis, ModuleNeurons, NeuronError, NeuronSet};
use crate::data::{Prompt, PromptTemplate, Row};
use crate::model::{Model, LINEAR_MODULES};
use crate::tokenizer::Tokenizer;

/// Which neurons a prompt activates (Eq. 2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// `importance >= ε` (the paper's rule).
    Epsilon(f64),
    /// Per layer, the `k` highest importances pooled over q, k, v, o rows/columns and the FFN
    /// units (an FFN unit, gate row + up row + down column, takes one slot and is selected
    /// whole); ties broken by module order then index. Q/K importances (changes of attention
    /// probabilities) and the others (output norms) are not in the same unit: prefer
    /// [`Selection::PerKind`].
    TopK(usize),
    /// Per layer and module kind: the `attn` most important rows of q_proj and columns of
    /// o_proj, as many of k_proj and v_proj scaled by their size (`round(attn · kv_rows /
    /// q_rows)`, at least 1), and the `ffn` most important FFN units (gate row `k`, up row `k`
    /// and down column `k` together). [`Selection::paper_split`] gives the paper's split.
    PerKind {
        /// Neurons per attention module of the query width (q, o); k and v scaled.
        attn: usize,
        /// FFN units.
        ffn: usize,
    },
}

/// The paper's per-layer attention top-k on 7B models (Llama-2-7B, hidden size 4096).
pub const PAPER_TOP_K_ATTN: usize = 1000;
/// The paper's per-layer FFN top-k on 7B models (intermediate size 11008).
pub const PAPER_TOP_K_FFN: usize = 2000;
/// The hidden size of the paper's 7B models.
pub const PAPER_HIDDEN: usize = 4096;
/// The intermediate size of the paper's 7B models.
pub const PAPER_INTERMEDIATE: usize = 11008;

impl Selection {
    /// `epsilon E` or `top-k K`, for reports.
    pub fn describe(&self) -> String {
        match self {
            Selection::Epsilon(e) => format!("importance >= {e}"),
            Selection::TopK(k) => format!(
                "top {k} per layer pooled over q, k, v, o and FFN units (one slot per unit)"
            ),
            Selection::PerKind { attn, ffn } => format!(
                "per layer and module kind: top {attn} of q_proj rows and of o_proj columns, k_proj and v_proj rows scaled by their size, top {ffn} FFN units (gate row, up row and down column together)"
            ),
        }
    }

    /// The paper's split scaled to a model's width: `round(1000 · hidden / 4096)` per attention
    /// module and `round(2000 · intermediate / 11008)` FFN units per layer (at least 1 each);
    /// `attn` / `ffn` override either. SmolLM2-135M (576, 1536): 141 and 279.
    pub fn paper_split(
        hidden: usize,
        intermediate: usize,
        attn: Option<usize>,
        ffn: Option<usize>,
    ) -> Self {
        let scale = |k: usize, width: usize, paper: usize| {
            ((k as f64 * width as f64 / paper as f64).round() as usize).max(1)
        };
        Selection::PerKind {
            attn: attn.unwrap_or_else(|| scale(PAPER_TOP_K_ATTN, hidden, PAPER_HIDDEN)),
            ffn: ffn.unwrap_or_else(|| scale(PAPER_TOP_K_FFN, intermediate, PAPER_INTERMEDIATE)),
        }
    }
}

/// The settings of detection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectConfig {
    /// Exact (the paper's formulas) or proxy (the authors' code).
    pub importance: ImportanceKind,
    /// How a prompt's activated neurons are chosen. The default is the paper's 1000 / 2000 at
    /// 7B width; for another model use [`Selection::paper_split`] with its sizes (the CLI and
    /// the experiment do).
    pub selection: Selection,
    /// Which tokens of each prompt count.
    pub tokens: TokenScope,
    /// Use at most this many rows of the corpus (in file order); `None`: all.
    pub limit: Option<usize>,
    /// Prompts with more tokens than this are skipped (and counted).
    pub max_length: usize,
    /// How prompts are rendered.
    #[serde(skip)]
    pub template: PromptTemplate,
    /// A system prompt put in front of every prompt.
    pub system: Option<String>,
    /// A label of the corpus for the set's meta and the report (e.g. `embedded:safety_sft`).
    pub corpus: String,
    /// A label of the model (+ adapters) for the set's meta and the report.
    pub model: String,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            importance: ImportanceKind::Exact,
            selection: Selection::PerKind {
                attn: PAPER_TOP_K_ATTN,
                ffn: PAPER_TOP_K_FFN,
            },
            tokens: TokenScope::Content,
            limit: Some(200),
            max_length: 2048,
            template: PromptTemplate::Chat,
            system: None,
            corpus: String::new(),
            model: String::new(),
        }
    }
}

impl DetectConfig {
    /// `prompt` rendered and tokenised as detection scores it (this config's template, system
    /// prompt and token scope).
    pub fn scoped_prompt(
        &self,
        tok: &Tokenizer,
        prompt: &Prompt,
    ) -> crate::Result<super::scope::ScopedPrompt> {
        scoped_prompt(
            tok,
            self.template,
            prompt,
            self.system.as_deref(),
            self.tokens,
        )
    }

    /// Checks the ranges of the settings.
    pub fn validate(&self) -> Result<(), NeuronError> {
        match self.selection {
            // Importances are norms (>= 0): a negative ε would select every neuron.
            Selection::Epsilon(e) if !(e.is_finite() && e >= 0.0) => {
                return Err(NeuronError::Invalid(format!(
                    "--epsilon {}: must be a finite number >= 0",
                    crate::train::config::fmt_num(e)
                )))
            }
            Selection::TopK(0) => {
                return Err(NeuronError::Invalid("--top-k 0: must be at least 1".into()))
            }
            Selection::PerKind { attn: 0, .. } => {
                return Err(NeuronError::Invalid(
                    "--top-k-attn 0: must be at least 1".into(),
                ))
            }
            Selection::PerKind { ffn: 0, .. } => {
                return Err(NeuronError::Invalid(
                    "--top-k-ffn 0: must be at least 1".into(),
                ))
            }
            _ => {}
        }
        if self.limit == Some(0) {
            return Err(NeuronError::Invalid("--limit 0: must be at least 1".into()));
        }
        if self.max_length == 0 {
            return Err(NeuronError::Invalid(
                "--max-length 0: must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and that a top-k rule keeps fewer neurons than the
    /// model's layers have to rank (a k at or above the width would select every neuron of
    /// every prompt): `--top-k` below the neurons of a layer (q, k, v, o and FFN units),
    /// `--top-k-attn` below q_proj's rows, `--top-k-ffn` below the FFN's units.
    pub fn validate_for(&self, model: &crate::model::Config) -> Result<(), NeuronError> {
        self.validate()?;
        let len = |local: &str| {
            let (out, inp) = model.linear_shape(local).unwrap_or((0, 0));
            match Axis::for_module(local) {
                Axis::Row => out,
                Axis::Column => inp,
            }
        };
        let too_big = |flag: &str, k: usize, what: String| {
            Err(NeuronError::Invalid(format!(
                "{flag} {k}: {what}; k must be below that"
            )))
        };
        let ffn = len("mlp.gate_proj");
        match self.selection {
            Selection::TopK(k) => {
                let layer = LINEAR_MODULES[..4].iter().map(|m| len(m)).sum::<usize>() + ffn;
                if k >= layer {
                    return too_big(
                        "--top-k",
                        k,
                        format!(
                            "a layer of the model has {layer} neurons to rank (q, k, v, o \
                             and FFN units)"
                        ),
                    );
                }
            }
            Selection::PerKind { attn, ffn: k } => {
                let q = len("self_attn.q_proj");
                if attn >= q {
                    return too_big(
                        "--top-k-attn",
                        attn,
                        format!("the model's q_proj has {q} rows per layer"),
                    );
                }
                if k >= ffn {
                    return too_big(
                        "--top-k-ffn",
                        k,
                        format!("the model's FFN has {ffn} units per layer"),
                    );
                }
            }
            Selection::Epsilon(_) => {}
        }
        Ok(())
    }
}

/// Neuron counts per module kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModuleCounts {
    /// q_proj rows.
    pub q_proj: usize,
    /// k_proj rows.
    pub k_proj: usize,
    /// v_proj rows.
    pub v_proj: usize,
    /// o_proj columns.
    pub o_proj: usize,
    /// gate_proj rows.
    pub gate_proj: usize,
    /// up_proj rows.
    pub up_proj: usize,
    /// down_proj columns.
    pub down_proj: usize,
}

impl ModuleCounts {
    fn slot(&mut self, kind: &str) -> Option<&mut usize> {
        Some(match kind {
            "q_proj" => &mut self.q_proj,
            "k_proj" => &mut self.k_proj,
            "v_proj" => &mut self.v_proj,
            "o_proj" => &mut self.o_proj,
            "gate_proj" => &mut self.gate_proj,
            "up_proj" => &mut self.up_proj,
            "down_proj" => &mut self.down_proj,
            _ => return None,
        })
    }

    /// q + k + v + o.
    pub fn attention(&self) -> usize {
        self.q_proj + self.k_proj + self.v_proj + self.o_proj
    }

    /// gate + up + down.
    pub fn ffn(&self) -> usize {
        self.gate_proj + self.up_proj + self.down_proj
    }

    /// All seven.
    pub fn total(&self) -> usize {
        self.attention() + self.ffn()
    }

    /// `(kind, count)` in module order.
    pub fn pairs(&self) -> [(&'static str, usize); 7] {
        [
            ("q_proj", self.q_proj),
            ("k_proj", self.k_proj),
            ("v_proj", self.v_proj),
            ("o_proj", self.o_proj),
            ("gate_proj", self.gate_proj),
            ("up_proj", self.up_proj),
            ("down_proj", self.down_proj),
        ]
    }
}

/// The module kind of a module path: its last component (`q_proj`, …).
pub fn module_kind(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// The neurons of one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerCount {
    /// The layer index.
    pub layer: usize,
    /// Per module kind.
    pub modules: ModuleCounts,
    /// q + k + v + o.
    pub attention: usize,
    /// gate + up + down.
    pub ffn: usize,
}

/// Counts of a neuron set per layer and module kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetCounts {
    /// All neurons.
    pub neurons: usize,
    /// Per module kind, over all layers.
    pub modules: ModuleCounts,
    /// Attention neurons (q, k, v, o).
    pub attention: usize,
    /// FFN neurons (gate, up, down).
    pub ffn: usize,
    /// `attention / neurons` (0 when empty).
    pub attention_share: f64,
    /// Per layer, for every layer of `layers` (zero rows included).
    pub layers: Vec<LayerCount>,
}

impl SetCounts {
    /// Counts `set` over `layers` decoder layers (modules outside them count in the totals).
    pub fn of(set: &NeuronSet, layers: usize) -> Self {
        let mut per: Vec<ModuleCounts> = vec![ModuleCounts::default(); layers];
        let mut modules = ModuleCounts::default();
        for m in &set.modules {
            let kind = module_kind(&m.module);
            if let Some(s) = modules.slot(kind) {
                *s += m.indices.len();
            }
            let (l, _) = layer_key(&m.module);
            if let Some(s) = per.get_mut(l).and_then(|c| c.slot(kind)) {
                *s += m.indices.len();
            }
        }
        let neurons = modules.total();
        Self {
            neurons,
            attention: modules.attention(),
            ffn: modules.ffn(),
            attention_share: if neurons == 0 {
                0.0
            } else {
                modules.attention() as f64 / neurons as f64
            },
            modules,
            layers: per
                .into_iter()
                .enumerate()
                .map(|(layer, modules)| LayerCount {
                    layer,
                    attention: modules.attention(),
                    ffn: modules.ffn(),
                    modules,
                })
                .collect(),
        }
    }
}

/// What detection did, for `SET.report.json` / `.md`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectReport {
    /// The settings.
    pub config: DetectConfig,
    /// `exact` or `proxy`.
    pub importance: &'static str,
    /// The selection rule in words.
    pub rule: String,
    /// Prompts used (intersected over).
    pub prompts: usize,
    /// Rows left out because their prompt had more than `max_length` tokens.
    pub skipped_too_long: usize,
    /// Prompt tokens seen.
    pub tokens: usize,
    /// Tokens whose activations counted (the token scope's).
    pub scored_tokens: usize,
    /// Which tokens counted: `all`, `content` or `last`.
    pub token_scope: &'static str,
    /// Mean number of neurons a single prompt selected (before intersection).
    pub mean_selected_per_prompt: f64,
    /// Neurons of the model's 7 linear modules of every layer (rows or columns on the
    /// paper's axis).
    pub total_neurons: usize,
    /// Counts of the detected set.
    pub counts: SetCounts,
    /// Weight entries covered by the detected neurons (a row has `in` entries, a column
    /// `out`).
    pub params: usize,
    /// The denominator of `params_fraction`: all entries of the 7 linear modules of every
    /// decoder layer (embeddings, norms and the LM head excluded).
    pub linear_params: usize,
    /// `params / linear_params`.
    pub params_fraction: f64,
    /// Wall time.
    pub seconds: f64,
    /// `seconds / prompts`.
    pub seconds_per_prompt: f64,
    /// The mean importance of every neuron over the prompts (saved as `SET.importance.json`).
    #[serde(skip)]
    pub ranking: NeuronRanking,
}

impl DetectReport {
    /// The report as Markdown (a summary, then the per-layer table).
    pub fn to_markdown(&self) -> String {
        let c = &self.counts;
        let mut s = String::new();
        s.push_str("# Neuron detection\n\n");
        s.push_str(&format!(
            "- model: `{}`\n- corpus: `{}` ({} prompts used, {} skipped as longer than {} tokens, {} tokens, {} of them scored: token scope `{}`)\n- importance: {}; rule: {} (Eq. 3)\n- neurons: **{}** of {} ({:.3}%); a prompt alone selected {:.1} on average\n- attention {} / FFN {} (attention share {:.1}%)\n- parameters covered: {} of {} linear-layer weights ({:.4}%; denominator: the 7 linear modules of every layer)\n- time: {:.1} s ({:.2} s per prompt)\n\n",
            self.config.model,
            self.config.corpus,
            self.prompts,
            self.skipped_too_long,
            self.config.max_length,
            self.tokens,
            self.scored_tokens,
            self.token_scope,
            self.importance,
            self.rule,
            c.neurons,
            self.total_neurons,
            100.0 * c.neurons as f64 / self.total_neurons.max(1) as f64,
            self.mean_selected_per_prompt,
            c.attention,
            c.ffn,
            100.0 * c.attention_share,
            self.params,
            self.linear_params,
            100.0 * self.params_fraction,
            self.seconds,
            self.seconds_per_prompt,
        ));
        s.push_str("| module | neurons |\n|---|---|\n");
        for (k, n) in c.modules.pairs() {
            s.push_str(&format!("| {k} | {n} |\n"));
        }
        s.push_str("\n| layer | q | k | v | o | gate | up | down | attention | FFN |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for l in &c.layers {
            let m = &l.modules;
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                l.layer,
                m.q_proj,
                m.k_proj,
                m.v_proj,
                m.o_proj,
                m.gate_proj,
                m.up_proj,
                m.down_proj,
                l.attention,
                l.ffn
            ));
        }
        s
    }
}

/// A selection per layer and module ([`LINEAR_MODULES`] order), one flag per neuron.
type Mask = Vec<[Vec<bool>; 7]>;

/// The `k` best of `(value, module, index)` candidates (NaN lowest; ties by module then index).
fn top_k(mut all: Vec<(f32, usize, usize)>, k: usize) -> Vec<(f32, usize, usize)> {
    for c in &mut all {
        if c.0.is_nan() {
            c.0 = f32::NEG_INFINITY;
        }
    }
    let cmp = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
        b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2)))
    };
    if k < all.len() {
        all.select_nth_unstable_by(k, cmp);
        all.truncate(k);
    }
    all
}

/// The candidates of the modules `ms` of a layer.
fn candidates(layer: &LayerImportance, ms: &[usize]) -> Vec<(f32, usize, usize)> {
    ms.iter()
        .flat_map(|&m| {
            layer.modules[m]
                .iter()
                .enumerate()
                .map(move |(i, &x)| (x, m, i))
        })
        .collect()
}

/// The index of gate_proj in [`LINEAR_MODULES`] order; up and down follow, sharing its values.
const GATE: usize = 4;

/// The neurons one prompt activates (Eq. 2), as flags per layer and module. FFN units are
/// ranked once (by the gate values) and set in gate, up and down together.
pub(crate) fn select_mask(imp: &[LayerImportance], selection: Selection) -> Mask {
    imp.iter()
        .map(|layer| {
            let mut out = layer.modules.clone().map(|v| vec![false; v.len()]);
            let chosen: Vec<(f32, usize, usize)> = match selection {
                Selection::Epsilon(e) => candidates(layer, &[0, 1, 2, 3, GATE])
                    .into_iter()
                    .filter(|c| f64::from(c.0) >= e)
                    .collect(),
                Selection::TopK(k) => top_k(candidates(layer, &[0, 1, 2, 3, GATE]), k),
                Selection::PerKind { attn, ffn } => {
                    let q_len = layer.modules[0].len().max(1);
                    let mut all = Vec::new();
                    for m in 0..4 {
                        let len = layer.modules[m].len();
                        let k = ((attn as f64 * len as f64 / q_len as f64).round() as usize).max(1);
                        all.extend(top_k(candidates(layer, &[m]), k));
                    }
                    all.extend(top_k(candidates(layer, &[GATE]), ffn));
                    all
                }
            };
            for (_, m, i) in chosen {
                if m == GATE {
                    for f in &mut out[GATE..] {
                        if let Some(x) = f.get_mut(i) {
                            *x = true;
                        }
                    }
                } else {
                    out[m][i] = true;
                }
            }
            out
        })
        .collect()
}

/// The set of a mask, with the module shapes of `model`.
fn mask_to_set(model: &Model, mask: &Mask, meta: serde_json::Value) -> NeuronSet {
    let cfg = model.config();
    let mut modules = Vec::new();
    for (layer, ms) in mask.iter().enumerate() {
        for (local, flags) in LINEAR_MODULES.iter().zip(ms) {
            let module = format!("model.layers.{layer}.{local}");
            let (out, inp) = cfg.linear_shape(local).unwrap_or((0, 0));
            modules.push(ModuleNeurons {
                axis: Axis::for_module(&module),
                module,
                shape: [out, inp],
                indices: flags
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| **f)
                    .map(|(i, _)| i as u32)
                    .collect(),
            });
        }
    }
    NeuronSet::new(meta, modules)
}

/// The neurons one prompt activates (Eq. 2) as a set on `model`'s modules, from that prompt's
/// importances ([`NeuronImportance::prompt`]).
pub fn select(model: &Model, imp: &[LayerImportance], selection: Selection) -> NeuronSet {
    mask_to_set(model, &select_mask(imp, selection), serde_json::Value::Null)
}

/// The neurons of the 7 linear modules of every layer, and their weight entries.
fn model_totals(model: &Model) -> (usize, usize) {
    let cfg = model.config();
    let (mut neurons, mut params) = (0, 0);
    for local in LINEAR_MODULES {
        let (out, inp) = cfg.linear_shape(local).unwrap_or((0, 0));
        let axis_len = match Axis::for_module(local) {
            Axis::Row => out,
            Axis::Column => inp,
        };
        neurons += axis_len;
        params += out * inp;
    }
    (
        neurons * cfg.num_hidden_layers,
        params * cfg.num_hidden_layers,
    )
}

/// Detects the neurons that every prompt of `rows` activates (Eq. 3): the safety neurons on a
/// harmful corpus. `progress(done, total)` is called after each prompt. Returns the set (its
/// meta names corpus, rule, importance, model and counts) and the report.
///
/// Errors: a bad setting ([`NeuronError::Invalid`]), no usable prompt, or a model/tokenizer
/// failure.
pub fn detect(
    model: &Model,
    tok: &Tokenizer,
    rows: &[Row],
    cfg: &DetectConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> crate::Result<(NeuronSet, DetectReport)> {
    cfg.validate_for(model.config())?;
    let start = Instant::now();
    let imp = NeuronImportance::new(model, cfg.importance)?;
    let rows = &rows[..cfg.limit.map_or(rows.len(), |n| n.min(rows.len()))];
    let (mut prompts, mut skipped, mut tokens, mut selected) = (0usize, 0usize, 0usize, 0usize);
    let mut scored = 0usize;
    let mut ranking = RankingAccumulator::default();
    let mut running: Option<Mask> = None;
    for (i, row) in rows.iter().enumerate() {
        let sp = cfg.scoped_prompt(tok, row.prompt())?;
        if sp.ids.is_empty() || sp.ids.len() > cfg.max_length {
            skipped += 1;
            progress(i + 1, rows.len());
            continue;
        }
        let layers = imp.prompt_rows(&sp.ids, &sp.rows)?;
        ranking.add(&layers);
        let mask = select_mask(&layers, cfg.selection);
        selected += mask
            .iter()
            .flat_map(|l| l.iter())
            .map(|v| v.iter().filter(|f| **f).count())
            .sum::<usize>();
        running = Some(match running {
            None => mask,
            Some(mut acc) => {
                for (al, ml) in acc.iter_mut().zip(&mask) {
                    for (a, m) in al.iter_mut().zip(ml) {
                        for (x, y) in a.iter_mut().zip(m) {
                            *x &= *y;
                        }
                    }
                }
                acc
            }
        });
        prompts += 1;
        tokens += sp.ids.len();
        scored += sp.rows.len();
        progress(i + 1, rows.len());
    }
    let Some(mask) = running else {
        return Err(NeuronError::Invalid(format!(
            "no usable prompt in {} ({} rows, {skipped} longer than --max-length {})",
            cfg.corpus,
            rows.len(),
            cfg.max_length
        ))
        .into());
    };
    let mut set = mask_to_set(model, &mask, serde_json::Value::Null);
    let (total_neurons, linear_params) = model_totals(model);
    let counts = SetCounts::of(&set, model.config().num_hidden_layers);
    let params = set.params();
    let seconds = start.elapsed().as_secs_f64();
    let ranking = ranking.finish(serde_json::json!({
        "kind": "mean importance per neuron",
        "model": cfg.model,
        "corpus": cfg.corpus,
        "importance": cfg.importance.name(),
        "tokens": cfg.tokens.name(),
    }));
    let report = DetectReport {
        config: cfg.clone(),
        importance: cfg.importance.name(),
        rule: format!(
            "{}, intersected over all prompts; tokens scored: {}",
            cfg.selection.describe(),
            cfg.tokens.name()
        ),
        prompts,
        skipped_too_long: skipped,
        tokens,
        scored_tokens: scored,
        token_scope: cfg.tokens.name(),
        mean_selected_per_prompt: selected as f64 / prompts as f64,
        total_neurons,
        params,
        linear_params,
        params_fraction: params as f64 / linear_params.max(1) as f64,
        seconds,
        seconds_per_prompt: seconds / prompts.max(1) as f64,
        ranking,
        counts,
    };
    set.meta = serde_json::json!({
        "kind": "detected neurons (safety-neurons paper, Eq. 3)",
        "model": cfg.model,
        // checked by `NeuronSet::check_architecture` where the set is applied to a model
        "architecture": model.config().architecture,
        "corpus": cfg.corpus,
        "prompts": prompts,
        "importance": cfg.importance.name(),
        "selection": cfg.selection,
        "tokens": cfg.tokens.name(),
        "rule": report.rule,
        "neurons": report.counts.neurons,
        "attention": report.counts.attention,
        "ffn": report.counts.ffn,
    });
    Ok((set, report))
}

/// Where [`save`] writes: `SET.json` itself, then `SET.report.json`, `SET.report.md`,
/// `SET.svg` and `SET.importance.json` (the [`NeuronRanking`]) in the same folder (the stem is
/// the file name without its extension).
pub fn output_paths(output: &Path) -> [PathBuf; 5] {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "neurons".into());
    let beside = |suffix: &str| output.with_file_name(format!("{stem}{suffix}"));
    [
        output.to_path_buf(),
        beside(".report.json"),
        beside(".report.md"),
        beside(".svg"),
        beside(".importance.json"),
    ]
}

/// Writes the set, its JSON and Markdown reports, the per-layer plot and the importance
/// ranking (see [`output_paths`]), each atomically, creating the folder. Returns the five
/// paths.
pub fn save(set: &NeuronSet, report: &DetectReport, output: &Path) -> crate::Result<[PathBuf; 5]> {
    let paths = output_paths(output);
    if paths[1..].contains(&paths[0]) {
        return Err(NeuronError::Invalid(format!(
            "the set file {} would be overwritten by its report or plot: name it SET.json",
            output.display()
        ))
        .into());
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::create_dir_all(dir)?;
    }
    set.save(&paths[0])?;
    let json = serde_json::to_string_pretty(report).map_err(|e| {
        NeuronError::Invalid(format!(
            "{}: serialising the report: {e}",
            paths[1].display()
        ))
    })?;
    crate::fsutil::write_atomic(&paths[1], json.as_bytes())?;
    crate::fsutil::write_atomic(&paths[2], report.to_markdown().as_bytes())?;
    super::plot::layer_plot(&paths[3], &report.counts.layers)?;
    report.ranking.save(&paths[4])?;
    Ok(paths)
}

/// The overlap of two sets for one module kind or overall.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlapEntry {
    /// `all` or a module kind (`q_proj`, …).
    pub kind: String,
    /// `|A|`.
    pub a: usize,
    /// `|B|`.
    pub b: usize,
    /// `|A ∩ B|`.
    pub intersection: usize,
    /// The paper's ratio `|A ∩ B| / |B|` (§2.3); NaN (JSON `null`) when B is empty: there
    /// is no ratio over nothing.
    pub ratio_of_b: f64,
    /// `|A ∩ B| / |A|`; NaN (JSON `null`) when A is empty.
    pub ratio_of_a: f64,
}

/// How two neuron sets overlap, overall and per module kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlapReport {
    /// Over all neurons.
    pub overall: OverlapEntry,
    /// Per module kind, in module order.
    pub kinds: Vec<OverlapEntry>,
}

/// The overlap of `a` and `b` (`realign neurons overlap A B`). Errors when a module has
/// different shapes in the two sets.
pub fn overlap(a: &NeuronSet, b: &NeuronSet) -> Result<OverlapReport, NeuronError> {
    let inter = a.intersection(b)?;
    let (ca, cb, ci) = (
        SetCounts::of(a, 0).modules,
        SetCounts::of(b, 0).modules,
        SetCounts::of(&inter, 0).modules,
    );
    let entry = |kind: &str, a: usize, b: usize, i: usize| OverlapEntry {
        kind: kind.into(),
        a,
        b,
        intersection: i,
        ratio_of_b: if b == 0 {
            f64::NAN
        } else {
            i as f64 / b as f64
        },
        ratio_of_a: if a == 0 {
            f64::NAN
        } else {
            i as f64 / a as f64
        },
    };
    let kinds = ca
        .pairs()
        .iter()
        .zip(cb.pairs())
        .zip(ci.pairs())
        .map(|(((k, na), (_, nb)), (_, ni))| entry(k, *na, nb, ni))
        .collect();
    Ok(OverlapReport {
        overall: entry("all", a.len(), b.len(), inter.len()),
        kinds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(values: [Vec<f32>; 7]) -> LayerImportance {
        LayerImportance { modules: values }
    }

    #[test]
    fn pooled_top_k_counts_an_ffn_unit_once_with_ties_by_module_order() {
        let l = layer([
            vec![5.0, 1.0],
            vec![2.0],
            vec![0.5],
            vec![3.0],
            vec![2.0, 4.0],
            vec![2.0, 4.0],
            vec![2.0, 4.0],
        ]);
        let m = select_mask(std::slice::from_ref(&l), Selection::TopK(3));
        // 5 (q0), 4 (FFN unit 1: one slot, three flags), 3 (o0); the 2.0 ties are left out.
        assert_eq!(m[0][0], vec![true, false]);
        assert_eq!(m[0][1], vec![false]);
        assert_eq!(m[0][3], vec![true]);
        for f in &m[0][4..] {
            assert_eq!(f, &vec![false, true]);
        }
        // k = 4: the tie at 2.0 goes to k (module 1) before the FFN unit 0.
        let m = select_mask(std::slice::from_ref(&l), Selection::TopK(4));
        assert_eq!(m[0][1], vec![true]);
        assert_eq!(m[0][4], vec![false, true]);
        let e = select_mask(&[l], Selection::Epsilon(2.0));
        assert_eq!(e[0][4], vec![true, true]);
        assert_eq!(e[0][6], vec![true, true]);
        assert_eq!(e[0][2], vec![false]);
    }

    #[test]
    fn per_kind_top_k_ranks_each_module_kind_on_its_own() {
        // q and o have 4 neurons, k and v 2 (GQA); attn = 2 -> q 2, o 2, k and v
        // round(2 * 2 / 4) = 1; ffn = 1 unit. Q/K values are tiny next to the others, which
        // would leave them out of a pooled ranking.
        let l = layer([
            vec![0.01, 0.03, 0.02, 0.0],
            vec![0.001, 0.002],
            vec![7.0, 9.0],
            vec![1.0, 8.0, 8.0, 2.0],
            vec![6.0, 3.0, 10.0],
            vec![6.0, 3.0, 10.0],
            vec![6.0, 3.0, 10.0],
        ]);
        let m = select_mask(
            std::slice::from_ref(&l),
            Selection::PerKind { attn: 2, ffn: 1 },
        );
        assert_eq!(m[0][0], vec![false, true, true, false]);
        assert_eq!(m[0][1], vec![false, true]);
        assert_eq!(m[0][2], vec![false, true]);
        // tie 8.0/8.0 both kept; o keeps exactly 2
        assert_eq!(m[0][3], vec![false, true, true, false]);
        for f in &m[0][4..] {
            assert_eq!(f, &vec![false, false, true]);
        }
        let pooled = select_mask(&[l], Selection::TopK(7));
        assert!(pooled[0][0].iter().all(|f| !f) && pooled[0][1].iter().all(|f| !f));
    }

    #[test]
    fn paper_split_scales_by_width() {
        assert_eq!(
            Selection::paper_split(576, 1536, None, None),
            Selection::PerKind {
                attn: 141,
                ffn: 279
            }
        );
        assert_eq!(
            Selection::paper_split(4096, 11008, None, Some(5)),
            Selection::PerKind { attn: 1000, ffn: 5 }
        );
        assert_eq!(
            Selection::paper_split(4, 4, None, None),
            Selection::PerKind { attn: 1, ffn: 1 }
        );
    }
}
