//! SN-Tune and RSN-Tune (safety-neurons paper, §3 and §4): full-weight training of the selected
//! neurons only, on a refusal corpus (1 epoch, lr 1e-6, a few dozen documents).
//!
//! Each selected module gets a trainable delta `D` beside its frozen weight, attached as an
//! unmerged LoRA-shaped pair whose other factor is a constant 0/1 selector `E`:
//!
//! - rows `idx` (output units): `D` is `[k, in]`, `E` is `[out, k]` with `E[idx_j, j] = 1`, so
//!   `y += (x Dᵀ) Eᵀ`, i.e. `y[.., idx] += x Dᵀ`;
//! - columns `idx` (input units): `D` is `[out, k]`, `E` is `[k, in]` with `E[j, idx_j] = 1`, so
//!   `y += (x Eᵀ) Dᵀ = x[.., idx] Dᵀ`.
//!
//! `W + E D` (rows) or `W + D E` (columns) is the full weight with only the selected
//! rows/columns changed, so `∂L/∂D` is exactly those rows/columns of the full-weight gradient:
//! the paper's "gradients of all other entries zeroed" holds by construction, the mask is
//! applied before clipping (only the `D` gradients enter the norm), and optimizer state exists
//! only for what trains. At the end `W[idx] += D` is written by index, so every entry outside
//! the mask stays bit-identical.
//!
//! RSN-Tune is SN-Tune on `safety.difference(foundation)` ([`rsn_tune_set`]).

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::deactivate::{check_module, fold_adapters, map_neurons};
use super::{Axis, NeuronError, NeuronSet};
use crate::adapters::LoraModule;
use crate::data::{encode_pair, render_prompt, Encoded, PromptTemplate, Row};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::train::config::fmt_num;
use crate::train::trainer::forward_logprobs;
use crate::train::{clip_grad_norm, collect_grads, lr_at, AdamW, AdamWParams, Schedule, StepLog};

/// Settings of [`sn_tune`]; the defaults are the paper's (§3.1: 50 documents, 1 epoch, initial
/// learning rate 1e-6) plus the usual trainer ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SnTuneConfig {
    /// Passes over the documents.
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Documents used (a seeded sample of the rows; 0: all).
    pub docs: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Seed of the document sample and the epoch shuffles.
    pub seed: u64,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// Fraction of the steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Learning-rate schedule after warmup.
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay (on the deltas).
    pub weight_decay: f64,
    /// Longest sequence in tokens (prompt + response); longer responses are cut, rows whose
    /// prompt alone is this long are dropped.
    pub max_length: usize,
    /// System message put before each prompt (`None`: the template's default).
    pub system: Option<String>,
    /// Stop after this many optimizer steps (0: no limit).
    pub max_steps: usize,
}

impl Default for SnTuneConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            lr: 1e-6,
            docs: 50,
            batch_size: 4,
            seed: 42,
            max_grad_norm: 1.0,
            warmup_ratio: 0.0,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            max_length: 512,
            system: None,
            max_steps: 0,
        }
    }
}

impl SnTuneConfig {
    /// Checks every setting that could not train, or would write an untrained or broken
    /// model: `epochs`, `batch_size` at least 1, `lr` a finite number > 0, `max_grad_norm` and
    /// `weight_decay` finite and >= 0 (a clip of 0 is no clipping), `warmup_ratio` in [0, 1],
    /// `max_length` at least 2. The message names the `realign sn-tune` flag and the value
    /// (`--lr must be a finite number > 0 (got -1)`). [`sn_tune`] calls it first.
    pub fn validate(&self) -> Result<(), NeuronError> {
        let bad = |m: String| Err(NeuronError::Invalid(m));
        if self.epochs == 0 {
            return bad("--epochs must be at least 1 (got 0)".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1 (got 0)".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!(
                "--lr must be a finite number > 0 (got {})",
                fmt_num(self.lr)
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "--max-grad-norm must be a finite number >= 0, 0 for no clipping (got {})",
                fmt_num(self.max_grad_norm)
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be a finite number >= 0 (got {})",
                fmt_num(self.weight_decay)
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "--warmup-ratio must be in [0, 1] (got {})",
                fmt_num(self.warmup_ratio)
            ));
        }
        if self.max_length < 2 {
            return bad(format!(
                "--max-length must be at least 2 (got {})",
                self.max_length
            ));
        }
        Ok(())
    }
}

/// One selected module's trainable delta.
#[derive(Debug, Clone)]
pub struct NeuronDelta {
    /// Checkpoint path of the linear module.
    pub module: String,
    /// Rows or columns.
    pub axis: Axis,
    /// The selected indices along `axis` (sorted, unique).
    pub indices: Vec<u32>,
    /// Rows: `[k, in]`; columns: `[out, k]`. Starts at zero.
    pub delta: Var,
    /// The constant 0/1 selector: rows `[out, k]`, columns `[k, in]`.
    pub selector: Tensor,
}

impl NeuronDelta {
    /// The optimizer's name for the delta: `{module}.sn_delta.{row|column}`.
    pub fn var_name(&self) -> String {
        format!("{}.sn_delta.{}", self.module, self.axis.name())
    }

    /// The delta as an unmerged LoRA pair (`A [k, in]`, `B [out, k]`, scale 1).
    fn as_lora(&self) -> LoraModule {
        let d = self.delta.as_tensor().clone();
        let (a, b) = match self.axis {
            Axis::Row => (d, self.selector.clone()),
            Axis::Column => (self.selector.clone(), d),
        };
        LoraModule { a, b, scale: 1.0 }
    }
}

/// The trainable deltas of every module of a set.
#[derive(Debug, Clone)]
pub struct NeuronDeltas {
    /// One per (module, axis) of the set.
    pub modules: Vec<NeuronDelta>,
}

impl NeuronDeltas {
    /// Zero deltas for `set` on `model`, checking that every module exists with the set's shape.
    pub fn new(model: &Model, set: &NeuronSet) -> crate::Result<Self> {
        let dev = model.device();
        let mut modules = Vec::with_capacity(set.modules.len());
        for m in &set.modules {
            check_module(model, m)?;
            let [out, inp] = m.shape;
            let k = m.indices.len();
            let mut sel = vec![0f32; out.max(inp) * k];
            let (delta, selector) = match m.axis {
                Axis::Row => {
                    for (j, &i) in m.indices.iter().enumerate() {
                        sel[i as usize * k + j] = 1.0;
                    }
                    sel.truncate(out * k);
                    (
                        Var::zeros((k, inp), DType::F32, dev)?,
                        Tensor::from_vec(sel, (out, k), dev)?,
                    )
                }
                Axis::Column => {
                    for (j, &i) in m.indices.iter().enumerate() {
                        sel[j * inp + i as usize] = 1.0;
                    }
                    sel.truncate(k * inp);
                    (
                        Var::zeros((out, k), DType::F32, dev)?,
                        Tensor::from_vec(sel, (k, inp), dev)?,
                    )
                }
            };
            modules.push(NeuronDelta {
                module: m.module.clone(),
                axis: m.axis,
                indices: m.indices.clone(),
                delta,
                selector,
            });
        }
        Ok(Self { modules })
    }

    /// The deltas by optimizer name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .map(|d| (d.var_name(), d.delta.clone()))
            .collect()
    }

    /// Number of trained values.
    pub fn num_parameters(&self) -> usize {
        self.modules.iter().map(|d| d.delta.elem_count()).sum()
    }

    /// Attaches the deltas to `model` as unmerged adapters (after any already attached), so a
    /// forward pass builds a graph through them; optimizer steps update them in place.
    pub fn attach(&self, model: &mut Model) {
        for lin in model.linears_mut() {
            for d in self.modules.iter().filter(|d| d.module == lin.name) {
                lin.loras.push(d.as_lora());
            }
        }
    }

    /// Adds the deltas into `model`'s weights by index (`W[idx rows] += D` or
    /// `W[:, idx] += D`); every other entry is untouched. `model` must not have the deltas
    /// attached. A module stored as bf16/f16 becomes f32.
    pub fn merge_into(&self, model: &mut Model) -> crate::Result<()> {
        for lin in model.linears_mut() {
            for d in self.modules.iter().filter(|d| d.module == lin.name) {
                let delta: Vec<f32> = d.delta.as_tensor().flatten_all()?.to_vec1()?;
                let (rows, cols) = d.delta.as_tensor().dims2()?;
                // f32, whatever the storage dtype: a trained delta rounded into bf16 is lost.
                let w = lin.weight.to_dtype(candle_core::DType::F32)?;
                lin.weight = map_neurons(&w, d.axis, &d.indices, |j, xs| match d.axis {
                    Axis::Row => {
                        for (x, dv) in xs.iter_mut().zip(&delta[j * cols..(j + 1) * cols]) {
                            *x += dv;
                        }
                    }
                    Axis::Column => {
                        for (r, x) in xs.iter_mut().enumerate().take(rows) {
                            *x += delta[r * cols + j];
                        }
                    }
                })?;
            }
        }
        Ok(())
    }
}

/// RSN-Tune's training set (§4): the safety neurons that are not foundation neurons.
pub fn rsn_tune_set(safety: &NeuronSet, foundation: &NeuronSet) -> crate::Result<NeuronSet> {
    let mut d = safety.difference(foundation)?;
    d.meta = serde_json::json!({
        "rsn_tune": true,
        "safety_neurons": safety.len(),
        "foundation_neurons": foundation.len(),
        "kept": d.len(),
    });
    Ok(d)
}

/// What [`sn_tune`] did, written as `sn_tune_report.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnTuneReport {
    /// The settings.
    pub config: SnTuneConfig,
    /// Neurons in the set that was trained.
    pub trained_neurons: usize,
    /// Modules trained.
    pub trained_modules: usize,
    /// Trained weight entries (the deltas' sizes).
    pub trained_params: usize,
    /// Modules whose unmerged adapters were folded into the weights before training.
    pub folded_adapter_modules: usize,
    /// Documents encoded.
    pub examples: usize,
    /// Rows dropped because the prompt alone exceeds `max_length`.
    pub dropped_too_long: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Every step: loss, learning rate, gradient norm before clipping, tokens/s.
    pub log: Vec<StepLog>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The tuned model and the report.
pub struct SnTuneOutcome {
    /// The input model with the trained deltas added into the selected rows/columns (adapters
    /// folded in; nothing attached).
    pub model: Model,
    /// The trained deltas (for inspection and tests).
    pub deltas: NeuronDeltas,
    /// What was done.
    pub report: SnTuneReport,
}

/// The documents: `docs` rows sampled with `seed` (all when 0 or fewer rows), encoded as
/// chat-template prompt + response (SFT rows; preference rows use `chosen`) with the loss on
/// the response tokens.
pub fn encode_documents(
    tok: &Tokenizer,
    rows: &[Row],
    cfg: &SnTuneConfig,
) -> crate::Result<(Vec<Encoded>, usize)> {
    let mut picked: Vec<&Row> = rows.iter().collect();
    if cfg.docs > 0 && picked.len() > cfg.docs {
        picked.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
        picked.truncate(cfg.docs);
    }
    let mut out = Vec::with_capacity(picked.len());
    let mut dropped = 0;
    for (i, row) in picked.iter().enumerate() {
        let response = match row {
            Row::Sft { response, .. } => response,
            Row::Preference { chosen, .. } => chosen,
            other => {
                return Err(crate::train::TrainError::WrongRowKind {
                    row: i,
                    kind: other.kind().to_string(),
                    method: "sft".into(),
                }
                .into())
            }
        };
        let prompt = render_prompt(
            tok,
            PromptTemplate::Chat,
            row.prompt(),
            cfg.system.as_deref(),
        )?;
        match encode_pair(tok, &prompt, response, cfg.max_length) {
            Ok(e) => out.push(e),
            Err(crate::Error::Data(crate::data::DataError::TooLong { .. })) => dropped += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((out, dropped))
}

/// The mean next-token loss of `seqs` on their response tokens (the SFT objective of
/// [`crate::train`]), as a differentiable scalar, and the number of tokens.
pub fn sft_loss(model: &Model, seqs: &[&Encoded], pad: u32) -> crate::Result<(Tensor, usize)> {
    let (lp, tokens) = forward_logprobs(model, seqs, pad)?;
    Ok((lp.mean_nll()?, tokens))
}

/// SN-Tune: trains only the neurons of `set` of `model` on `rows` (refusal documents) with the
/// SFT loss, AdamW (torch's update), gradient clipping and the schedule of [`crate::train`];
/// returns the model with the deltas added into its weights. Unmerged adapters are folded in
/// first. For RSN-Tune pass [`rsn_tune_set`]`(safety, foundation)`.
pub fn sn_tune(
    mut model: Model,
    tok: &Tokenizer,
    set: &NeuronSet,
    rows: &[Row],
    cfg: &SnTuneConfig,
) -> crate::Result<SnTuneOutcome> {
    let started = Instant::now();
    cfg.validate()?;
    if set.is_empty() {
        return Err(
            NeuronError::Invalid("the neuron set is empty: nothing to train".into()).into(),
        );
    }
    let (examples, dropped) = encode_documents(tok, rows, cfg)?;
    if examples.is_empty() {
        return Err(crate::train::TrainError::NoExamples { dropped }.into());
    }
    let folded = fold_adapters(&mut model)?;
    let deltas = NeuronDeltas::new(&model, set)?;
    let mut train_model = model.clone();
    deltas.attach(&mut train_model);
    train_model.set_differentiable(true);

    let vars = deltas.named_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let steps_per_epoch = examples.len().div_ceil(cfg.batch_size);
    let mut total = steps_per_epoch.saturating_mul(cfg.epochs);
    if cfg.max_steps > 0 {
        total = total.min(cfg.max_steps);
    }
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let pad = tok.pad_token_id().unwrap_or(0);
    let mut log = Vec::with_capacity(total.min(1 << 16));
    let mut step = 0;
    'epochs: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            cfg.seed.wrapping_add(epoch as u64),
        ));
        for batch in order.chunks(cfg.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let t0 = Instant::now();
            let seqs: Vec<&Encoded> = batch.iter().map(|&i| &examples[i]).collect();
            let (loss, tokens) = sft_loss(&train_model, &seqs, pad)?;
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            // A NaN or infinite loss or gradient would poison every delta it updates: stop
            // before the update, naming the step and the learning rate.
            if !loss_value.is_finite() {
                return Err(diverged(
                    step + 1,
                    format!("loss {}", fmt_num(loss_value)),
                    cfg,
                ));
            }
            let mut grads = collect_grads(&loss.backward()?, &vars);
            let limit = if cfg.max_grad_norm > 0.0 {
                cfg.max_grad_norm
            } else {
                f64::INFINITY
            };
            let grad_norm = clip_grad_norm(&mut grads, limit)?;
            if !grad_norm.is_finite() {
                return Err(diverged(
                    step + 1,
                    format!("gradient norm {}", fmt_num(grad_norm)),
                    cfg,
                ));
            }
            let lr = lr_at(cfg.schedule, cfg.lr, step, warmup, total);
            opt.params.lr = lr;
            opt.step(&grads)?;
            step += 1;
            log.push(StepLog {
                step,
                epoch,
                loss: loss_value,
                lr,
                grad_norm,
                tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64(),
            });
        }
    }
    drop(train_model);
    // The last update may have made a delta infinite although its loss was finite.
    for d in &deltas.modules {
        let t = d.delta.as_tensor();
        let finite = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            return Err(diverged(
                step,
                format!(
                    "{} has NaN or infinite values after the update",
                    d.var_name()
                ),
                cfg,
            ));
        }
    }
    deltas.merge_into(&mut model)?;
    let report = SnTuneReport {
        config: cfg.clone(),
        trained_neurons: set.len(),
        trained_modules: set.modules.len(),
        trained_params: deltas.num_parameters(),
        folded_adapter_modules: folded,
        examples: examples.len(),
        dropped_too_long: dropped,
        steps: step,
        log,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(SnTuneOutcome {
        model,
        deltas,
        report,
    })
}

/// The divergence error of step `step` (1-based).
fn diverged(step: usize, what: String, cfg: &SnTuneConfig) -> crate::Error {
    NeuronError::Diverged {
        step,
        what,
        lr: fmt_num(cfg.lr),
    }
    .into()
}

/// Writes the tuned model as a Hugging Face folder at `dir` ([`crate::model::export_hf_with`])
/// with `sn_tune_report.json` (the report plus `extra`, e.g. set paths and sizes) inside,
/// atomically.
pub fn write_outcome(
    outcome: &SnTuneOutcome,
    tok: &Tokenizer,
    dir: &std::path::Path,
    extra: serde_json::Value,
) -> crate::Result<()> {
    let mut report = serde_json::to_value(&outcome.report).map_err(|e| crate::Error::Json {
        path: dir.join("sn_tune_report.json"),
        source: e,
    })?;
    if let (Some(r), serde_json::Value::Object(x)) = (report.as_object_mut(), extra) {
        r.extend(x);
    }
    let mut bytes = serde_json::to_vec_pretty(&report).map_err(|e| crate::Error::Json {
        path: dir.join("sn_tune_report.json"),
        source: e,
    })?;
    bytes.push(b'\n');
    crate::model::export_hf_with(&outcome.model, tok, dir, &[("sn_tune_report.json", bytes)])
}
