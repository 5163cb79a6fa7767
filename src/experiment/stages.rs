//! Running one planned stage: each kind calls the library function the matching CLI command
//! calls (`train`, `data mix`, `amplify`, `identify`, `patch`, `safelora`, `eval`, `neurons`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::cache::{digest_path, StageRecord, StageStore};
use super::config::{EvalSettings, ExperimentConfig, StageTrain};
use super::plan::{EvalModel, Plan, Stage, StageKind, TunedSet};
use super::{ExperimentError, Observer};
use crate::adapters::Adapter;
use crate::data::load_source;
use crate::eval::stats::Rate;
use crate::eval::{evaluate_judged, evaluate_with_judge, EvalOptions, JudgeSpec};
use crate::model::{AdapterMode, LoadOptions, LoadedModel};
use crate::neurons::{
    deactivate, detect, random_like, sn_tune, write_outcome, DetectConfig, NeuronSet,
    PerplexityReport, SnTuneConfig,
};
use crate::nlsr::identify::{identify, IdentifyConfig, Method};
use crate::nlsr::patch::{patch, write_patch, PatchConfig};
use crate::nlsr::prune::{ProbabilityMapping, PruneConfig, Selection};
use crate::train::config::{DataSettings, LoraSettings, OptimSettings};
use crate::train::{train, trainer::Progress, StepLog, TrainConfig};

/// The neuron-set file of a detection stage.
pub const SET_JSON: &str = "set.json";
/// The model folder (Hugging Face layout) of an SN-Tune stage.
pub const MODEL_DIR: &str = "model";

/// What every stage key depends on besides its own settings: the base model's content, the
/// seed, the evaluation settings, and the content of each data source (embedded sets are
/// hashed by their rows, files by their bytes).
pub struct Inputs {
    /// The hash of realign's sources (`REALIGN_SOURCE_HASH`, computed by `build.rs`): part of
    /// every key, so a changed algorithm reruns what depends on it.
    pub code: String,
    /// The base model file or folder.
    pub model_path: PathBuf,
    /// Its content digest.
    pub model_digest: String,
    /// The experiment seed.
    pub seed: u64,
    /// Evaluation settings (part of every eval key).
    pub eval: EvalSettings,
    /// The digest of the judge's own files (a `model:PATH` judge, a rubric, the fetched Qwen
    /// judge): part of every eval key and of no other (empty for the keyword judges).
    pub judge_digest: String,
    /// The data source whose rows a deactivation evaluation measures perplexity on
    /// (`neurons.general`): its content is part of those evaluations' keys (empty: none).
    pub perplexity_source: String,
    data: RefCell<BTreeMap<String, String>>,
}

impl Inputs {
    /// Inputs from their parts (the runner builds them from the config and the loaded model).
    pub fn new(
        code: String,
        model_path: PathBuf,
        model_digest: String,
        seed: u64,
        eval: EvalSettings,
    ) -> Self {
        Self {
            code,
            model_path,
            model_digest,
            seed,
            eval,
            judge_digest: String::new(),
            perplexity_source: String::new(),
            data: RefCell::default(),
        }
    }

    /// The digest of a data source (cached per source).
    pub fn data_digest(&self, source: &str) -> crate::Result<String> {
        if let Some(d) = self.data.borrow().get(source) {
            return Ok(d.clone());
        }
        let d = if source.starts_with("embedded:") {
            let rows = load_source(source)?;
            super::cache::key_of(&serde_json::Value::String(format!("{rows:?}")))
        } else {
            digest_path(Path::new(source))?
        };
        self.data.borrow_mut().insert(source.into(), d.clone());
        Ok(d)
    }
}

/// The result of an evaluation stage. `hs`, `fa` and `or` are percentages; each `*_rate` is
/// the same number with its count, sample size and 95 % Wilson interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Harmfulness score, % (the configured judge).
    #[serde(deserialize_with = "nan_if_null")]
    pub hs: f64,
    /// Harmfulness score, % by the refusal-keyword judge (equal to `hs` with that judge).
    #[serde(deserialize_with = "nan_if_null")]
    pub hs_keyword: f64,
    /// Harmful prompts.
    pub n_harmful: usize,
    /// Task accuracy, % (the authors' substring rule).
    #[serde(deserialize_with = "nan_if_null")]
    pub fa: f64,
    /// Task items.
    pub n_task: usize,
    /// `hs` with its interval.
    #[serde(default)]
    pub hs_rate: Option<Rate>,
    /// `hs_keyword` with its interval.
    #[serde(default)]
    pub hs_keyword_rate: Option<Rate>,
    /// Harmful by the keyword judge *and* not degenerate (no repetition, restated request,
    /// gibberish or a too-short reply; `eval::degenerate`).
    #[serde(default)]
    pub hs_nondegenerate_rate: Option<Rate>,
    /// `fa` with its interval.
    #[serde(default)]
    pub fa_rate: Option<Rate>,
    /// Task accuracy by the strict first-label rule (classification).
    #[serde(default)]
    pub fa_strict_rate: Option<Rate>,
    /// Over-refusal: % of benign-but-edgy prompts refused (keyword rule).
    #[serde(default)]
    pub or_rate: Option<Rate>,
    /// Generated tokens per second over the whole evaluation (all three sets).
    #[serde(default)]
    pub tokens_per_s: f64,
    /// Deactivation rows: perplexity on held-out general text with the neurons switched off
    /// (rows [`PPL_OFFSET`].. of `neurons.general`, never used by detection at
    /// `neurons.prompts` ≤ [`PPL_OFFSET`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// Deactivation rows: the same perplexity before switching off (the untouched model);
    /// above [`crate::neurons::perplexity::BROKEN_FACTOR`] times it the row is "broken".
    /// Rows that ask for perplexity ([`EvalModel::perplexity`]): the base model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_untouched: Option<f64>,
    /// The sample size and 95 % intervals of `perplexity`, `perplexity_untouched` and their
    /// ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_intervals: Option<PerplexityIntervals>,
}

/// How sure a row's perplexity figures are: 95 % intervals over the general-text rows (the
/// ratio estimator's, paired for the ratio: [`crate::neurons::perplexity`](mod@crate::neurons::perplexity)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerplexityIntervals {
    /// Texts measured.
    pub texts: usize,
    /// Of the row's perplexity.
    pub interval: Option<[f64; 2]>,
    /// Of the reference's (the untouched or base model's).
    pub untouched_interval: Option<[f64; 2]>,
    /// Of `perplexity / perplexity_untouched`, paired over the texts.
    pub ratio_interval: Option<[f64; 2]>,
}

/// The first row of the general text used for the deactivation rows' perplexity (as
/// `realign neurons deactivate --ppl-offset`).
pub const PPL_OFFSET: usize = 300;
/// Rows of it used.
pub const PPL_ROWS: usize = 32;
/// Tokens per text.
pub const PPL_MAX_TOKENS: usize = 256;

impl EvalResult {
    /// The stand-in for a record that could not be read: every number NaN ("–" in the report),
    /// no sample.
    pub fn unreadable() -> Self {
        EvalResult {
            hs: f64::NAN,
            hs_keyword: f64::NAN,
            n_harmful: 0,
            fa: f64::NAN,
            n_task: 0,
            hs_rate: None,
            hs_keyword_rate: None,
            hs_nondegenerate_rate: None,
            fa_rate: None,
            fa_strict_rate: None,
            or_rate: None,
            tokens_per_s: f64::NAN,
            perplexity: None,
            perplexity_untouched: None,
            perplexity_intervals: None,
        }
    }
}

/// Reads a number that a NaN written as `null` may have replaced.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Runs stages against one loaded base model.
pub struct Runner {
    /// What keys depend on.
    pub inputs: Inputs,
    cfg: ExperimentConfig,
    store: StageStore,
    base: LoadedModel,
    judge_spec: JudgeSpec,
    judge: Option<LoadedModel>,
    /// The judge of [`JudgeSpec::Registered`] (`qwen`, `rubric:PATH`, …), built once.
    registered: Option<Box<dyn crate::eval::judges::Judge>>,
}

struct Bar<'a> {
    obs: &'a mut dyn Observer,
    total: usize,
}

impl Progress for Bar<'_> {
    fn start(&mut self, total: usize) {
        self.total = total;
        self.obs.stage_progress(0, total, "");
    }
    fn step(&mut self, l: &StepLog) {
        self.obs
            .stage_progress(l.step, self.total, &format!("loss {:.4}", l.loss));
    }
}

fn stage_err(stage: &str, what: impl std::fmt::Display) -> crate::Error {
    ExperimentError::Stage {
        stage: stage.into(),
        what: what.to_string(),
    }
    .into()
}

impl Runner {
    /// Loads the base model and digests it.
    pub fn new(cfg: &ExperimentConfig) -> crate::Result<Self> {
        let model_path = cfg
            .model
            .clone()
            .unwrap_or_else(crate::assets::default_model);
        if !model_path.exists() {
            return Err(ExperimentError::Config {
                path: model_path,
                what: "the model is not there (run scripts/setup.sh for the embedded default, or set `model`)".into(),
            }
            .into());
        }
        let model_digest = digest_path(&model_path)?;
        let mut judge_digest = String::new();
        let base = LoadedModel::load(&model_path, &LoadOptions::default())?;
        let judge_spec: JudgeSpec = cfg.eval.judge.parse()?;
        let mut registered = None;
        let judge = match &judge_spec {
            JudgeSpec::Keyword => None,
            JudgeSpec::Model(p) => {
                // The judge's content is part of every eval key.
                judge_digest = format!("judge:{}", digest_path(p)?);
                Some(LoadedModel::load(p, &LoadOptions::default())?)
            }
            JudgeSpec::Registered(spec) => {
                // The spec and the judge's model file (if it has one) are part of every eval key.
                let file = match spec.split_once(':') {
                    Some((_, arg)) => Some(PathBuf::from(arg)),
                    None if spec == crate::eval::judges::qwen::NAME => {
                        Some(crate::eval::judges::qwen::model_path())
                    }
                    None => None,
                };
                judge_digest = match file.filter(|f| f.exists()) {
                    Some(f) => format!("judge:{spec}:{}", digest_path(&f)?),
                    None => format!("judge:{spec}"),
                };
                registered = Some(crate::eval::judges::build(
                    spec,
                    &crate::eval::judges::JudgeOptions {
                        batch_size: cfg.eval.batch_size.max(1),
                        ..Default::default()
                    },
                )?);
                None
            }
        };
        Ok(Self {
            inputs: Inputs {
                code: env!("REALIGN_SOURCE_HASH").to_string(),
                model_path,
                model_digest,
                seed: cfg.seed,
                eval: cfg.eval.clone(),
                judge_digest,
                perplexity_source: cfg.neurons.general.clone(),
                data: RefCell::default(),
            },
            cfg: cfg.clone(),
            store: StageStore::new(cfg.output.join("stages")),
            base,
            judge_spec,
            judge,
            registered,
        })
    }

    /// The folder of a stage.
    pub fn dir(&self, s: &Stage) -> PathBuf {
        self.store.dir(&s.name, &s.key)
    }

    /// Runs stage `i` unless it finished before; returns its record (result as JSON).
    pub fn run_stage(
        &mut self,
        i: usize,
        stage: &Stage,
        plan: &Plan,
        obs: &mut dyn Observer,
    ) -> crate::Result<StageRecord<serde_json::Value>> {
        if let Some(rec) = self
            .store
            .finished::<serde_json::Value>(&stage.name, &stage.key)?
        {
            obs.stage_start(i, &stage.name, true);
            obs.stage_end(&stage.name, 0.0, "cached");
            return Ok(rec);
        }
        obs.stage_start(i, &stage.name, false);
        let deps: Vec<PathBuf> = stage
            .deps
            .iter()
            .map(|&d| self.dir(&plan.stages[d]))
            .collect();
        let store = self.store.clone();
        let rec = store
            .run(&stage.name, &stage.key, |out| {
                self.execute(stage, &deps, out, obs)
            })
            .map_err(|e| match e {
                crate::Error::Experiment(_) => e,
                other => stage_err(&stage.name, other),
            })?;
        let memory = super::memory::log_note(rec.peak_rss_mib);
        let summary = summary_line(&rec.result);
        if memory.is_empty() {
            obs.stage_end(&stage.name, rec.seconds, &summary);
        } else {
            obs.stage_end(&stage.name, rec.seconds, &format!("{summary}; {memory}"));
        }
        Ok(rec)
    }

    fn execute(
        &self,
        stage: &Stage,
        deps: &[PathBuf],
        out: &Path,
        obs: &mut dyn Observer,
    ) -> crate::Result<serde_json::Value> {
        let dev = Device::Cpu;
        match &stage.kind {
            StageKind::Train {
                settings,
                init,
                mix,
                full_model,
            } => {
                let mut k = 0;
                let init_dir = init.then(|| {
                    k += 1;
                    deps[k - 1].clone()
                });
                let data = if *mix {
                    k += 1;
                    deps[k - 1].join("mix.jsonl").display().to_string()
                } else {
                    settings.data.clone()
                };
                let model = if *full_model {
                    LoadedModel::load(&deps[k].join(MODEL_DIR), &LoadOptions::default())?.model
                } else {
                    self.base.model.clone()
                };
                let mut tc = train_config(settings, init_dir, &data, out, stage.seed)?;
                let rows = load_source(&data)?;
                let mut bar = Bar { obs, total: 0 };
                // `realign train`'s errors name its own file's keys (`data.max_length`)
                let r = train(model, &self.base.tokenizer, &rows, &tc, false, &mut bar).map_err(
                    |e| match self.cfg.explain_train_error(&e, settings, *mix) {
                        Some(what) => stage_err(&stage.name, what),
                        None => e,
                    },
                )?;
                // train_report.json names the folder the stage will have once published,
                // not the `.partial` one it is written in.
                let published = super::cache::published_dir(out);
                tc.output = published.clone();
                let report = crate::train::TrainReport {
                    config: tc,
                    adapter: published,
                    ..r.clone()
                };
                let json =
                    serde_json::to_vec_pretty(&report).map_err(|source| crate::Error::Json {
                        path: out.join("train_report.json"),
                        source,
                    })?;
                crate::fsutil::write_atomic(&out.join("train_report.json"), &json)?;
                Ok(serde_json::json!({"steps": r.steps, "examples": r.examples,
                    "first_loss": r.first_loss, "last_loss": r.last_loss,
                    "tokens_per_s": r.tokens_per_s}))
            }
            StageKind::Mix {
                p,
                n,
                task,
                harmful,
            } => {
                let cfg = crate::data::MixConfig {
                    n: *n,
                    p: *p,
                    seed: stage.seed,
                };
                let mixed = crate::data::mix_sources(task, harmful, &cfg)?;
                crate::data::write_mix(&out.join("mix.jsonl"), &mixed)?;
                Ok(to_json(&mixed.meta))
            }
            StageKind::Amplify { beta } => {
                let aligned = Adapter::load(&deps[0], &dev)?;
                let weak = Adapter::load(&deps[1], &dev)?;
                let e = crate::nlsr::amplify::amplify(&aligned, &weak, *beta)?;
                e.save(out)?;
                Ok(serde_json::json!({"beta": beta, "modules": e.modules.len()}))
            }
            StageKind::Identify {
                method,
                sparsity,
                samples,
                data,
            } => {
                let method = parse_method(method)?;
                let reference = Adapter::load(&deps[0], &dev)?;
                let rows = if method == Method::Random {
                    Vec::new()
                } else {
                    load_source(data)?
                };
                let cfg = IdentifyConfig {
                    method,
                    sparsity: *sparsity,
                    seed: stage.seed,
                    max_samples: Some(*samples),
                    ..Default::default()
                };
                let (m, report) = identify(
                    &self.base.model,
                    &self.base.tokenizer,
                    &reference,
                    &rows,
                    &cfg,
                )?;
                crate::nlsr::masks::save(&m, &out.join("masks.safetensors"))?;
                Ok(
                    serde_json::json!({"method": report.method, "density": report.density,
                    "samples": report.samples, "tokens": report.tokens, "seconds": report.seconds}),
                )
            }
            StageKind::Patch {
                layer_prune,
                epsilon,
                transplant,
            } => {
                let reference = Adapter::load(&deps[0], &dev)?;
                let finetuned = Adapter::load(&deps[1], &dev)?;
                let masks = crate::nlsr::masks::load(&deps[2].join("masks.safetensors"), &dev)?;
                let config = PatchConfig {
                    prune: PruneConfig {
                        selection: Selection::Adaptive,
                        mapping: ProbabilityMapping::Paper,
                        layer_prune: *layer_prune,
                        epsilon: *epsilon,
                        seed: stage.seed,
                    },
                    transplant: *transplant,
                };
                let outcome = patch(&reference, &finetuned, &masks, &config)?;
                write_patch(out, &outcome)?;
                Ok(serde_json::json!({"patched": outcome.report.num_patched,
                    "modules": outcome.report.num_modules}))
            }
            StageKind::SafeLora { threshold } => {
                // Safe LoRA projects the fine-tuning update W_t − W_a (not the whole W_t, whose
                // update from the base is mostly the alignment itself); the evaluated model is
                // W_a + the projected update.
                let aligned = Adapter::load(&deps[0], &dev)?;
                let finetuned = Adapter::load(&deps[1], &dev)?;
                let update = crate::safelora::finetuning_update(&aligned, &finetuned)?;
                let alignment = crate::safelora::alignment_from_adapter(&aligned);
                let (adapter, report) = crate::safelora::safe_lora(
                    &alignment,
                    &update,
                    crate::safelora::SafeLoraSelection::Threshold(*threshold),
                )?;
                adapter.save(out)?;
                crate::fsutil::write_atomic(
                    &out.join("safelora_report.json"),
                    to_json(&report).to_string().as_bytes(),
                )?;
                let cosines: Vec<f64> = report.modules.iter().map(|m| m.cosine).collect();
                let mean = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
                Ok(serde_json::json!({"projected": report.num_projected,
                    "modules": report.modules.len(), "threshold": threshold,
                    "mean_cosine": mean}))
            }
            StageKind::Diagnose { p } => {
                let aligned = Adapter::load(&deps[0], &dev)?;
                let finetuned = Adapter::load(&deps[1], &dev)?;
                let d = crate::diagnose::diagnose(
                    &aligned,
                    &finetuned,
                    None,
                    None,
                    &crate::diagnose::DiagnoseConfig::default(),
                )?;
                crate::diagnose::write_diagnosis(out, &d)?;
                Ok(
                    serde_json::json!({"p": p, "drift": d.drift, "update_drift": d.update_drift,
                    "mean_safelora_cosine": d.mean_safelora_cosine,
                    "nlsr_repair": d.num_nlsr_repair, "safelora_project": d.num_safelora_project,
                    "modules": d.num_modules, "verdict": d.verdict}),
                )
            }
            StageKind::Baseline { method } => {
                let aligned = Adapter::load(&deps[0], &dev)?;
                let finetuned = Adapter::load(&deps[1], &dev)?;
                method.run(&self.base, &aligned, &finetuned, out, stage.seed)
            }
            StageKind::Detect { .. } | StageKind::SnTune { .. } => {
                self.execute_neurons(stage, deps, out, obs)
            }
            StageKind::Eval { model } => {
                let r = self.evaluate(model, deps, out, obs)?;
                Ok(to_json(&r))
            }
        }
    }

    fn evaluate(
        &self,
        v: &EvalModel,
        deps: &[PathBuf],
        out: &Path,
        obs: &mut dyn Observer,
    ) -> crate::Result<EvalResult> {
        let mut k = 0;
        let mut model = if v.full_model {
            k = 1;
            LoadedModel::load(&deps[0].join(MODEL_DIR), &LoadOptions::default())?.model
        } else {
            self.base.model.clone()
        };
        for dir in &deps[k..k + v.adapters] {
            let ad = Adapter::load(dir, model.device())?;
            model.apply_adapter(&ad, AdapterMode::Merged)?;
        }
        let mut ppl: Option<(PerplexityReport, PerplexityReport)> = None;
        if v.deactivate.is_some() || v.perplexity {
            let texts: Vec<String> = load_source(&self.cfg.neurons.general)?
                .iter()
                .skip(PPL_OFFSET)
                .take(PPL_ROWS)
                .map(|r| r.prompt().plain_text())
                .collect();
            let measure = |m: &crate::model::Model| -> crate::Result<Option<PerplexityReport>> {
                if texts.is_empty() {
                    return Ok(None);
                }
                crate::neurons::perplexity(m, &self.base.tokenizer, &texts, PPL_MAX_TOKENS)
                    .map(Some)
            };
            // The reference: the model before deactivation, or the base model.
            let untouched = if v.deactivate.is_some() {
                measure(&model)?
            } else {
                // On a clone: a short text makes the few-row kernels' copy of every weight
                // (`tile_major::DecodeCopy`, ~430 MB here), which the run's base model would
                // keep to the end; a clone's goes with it.
                measure(&self.base.model.clone())?
            };
            if let Some(random) = v.deactivate {
                let set = NeuronSet::load(&deps[k + v.adapters].join(SET_JSON))?;
                let set = if v.deactivate_foundation {
                    let paths = crate::neurons::detect::output_paths(
                        &deps[k + v.adapters + 1].join(SET_JSON),
                    );
                    let ranking = crate::neurons::NeuronRanking::load(&paths[4])?;
                    crate::neurons::deactivate::foundation_like(&set, &ranking)?
                } else if random {
                    random_like(&set, self.cfg.seed.wrapping_add(v.random_draw))
                } else {
                    set
                };
                deactivate(&mut model, &set)?;
            }
            ppl = measure(&model)?.zip(untouched);
        }
        let e = &self.cfg.eval;
        let loaded = LoadedModel {
            model,
            tokenizer: self.base.tokenizer.clone(),
            source: self.base.source.clone(),
        };
        let opts = EvalOptions {
            harmful: Some(e.harmful.clone()),
            task: Some(e.task.clone()),
            overrefusal: (!e.overrefusal.is_empty()).then(|| e.overrefusal.clone()),
            judge: self.judge_spec.clone(),
            limit: e.harmful_limit,
            harmful_max_new_tokens: Some(e.harmful_max_new_tokens),
            task_max_new_tokens: Some(e.task_max_new_tokens),
            overrefusal_max_new_tokens: Some(e.overrefusal_max_new_tokens),
            batch_size: e.batch_size,
            // Every variant sees the same rows: a seeded sample of each whole set.
            sample_seed: self.cfg.seed,
            merged: true,
            columns: e.columns.clone(),
            ..Default::default()
        };
        // Limits differ per set: one call per set, each written to its own folder.
        let mut harmful_opts = opts.clone();
        harmful_opts.task = None;
        harmful_opts.overrefusal = None;
        let mut task_opts = opts.clone();
        task_opts.harmful = None;
        task_opts.overrefusal = None;
        task_opts.limit = e.task_limit;
        let mut or_opts = opts.clone();
        or_opts.harmful = None;
        or_opts.task = None;
        or_opts.limit = e.overrefusal_limit;
        let t0 = std::time::Instant::now();
        obs.stage_progress(0, 3, "harmfulness");
        let h = match &self.registered {
            Some(j) => evaluate_judged(&loaded, &harmful_opts, j.as_ref())?,
            None => evaluate_with_judge(&loaded, &harmful_opts, self.judge.as_ref())?,
        };
        h.write(&out.join("harmful"))?;
        obs.stage_progress(1, 3, "task accuracy");
        let t = evaluate_with_judge(&loaded, &task_opts, None)?;
        t.write(&out.join("task"))?;
        let o = if or_opts.overrefusal.is_some() {
            obs.stage_progress(2, 3, "over-refusal");
            let o = evaluate_with_judge(&loaded, &or_opts, None)?;
            o.write(&out.join("overrefusal"))?;
            Some(o)
        } else {
            None
        };
        obs.stage_progress(3, 3, "");
        let seconds = t0.elapsed().as_secs_f64();
        let tok = &self.base.tokenizer;
        let mut generated = 0usize;
        let mut count = |reply: &str| -> crate::Result<()> {
            generated += tok.encode(reply, false)?.len();
            Ok(())
        };
        for r in &h.harmful {
            count(&r.reply)?;
        }
        for r in &t.task {
            count(&r.reply)?;
        }
        if let Some(o) = &o {
            for r in &o.overrefusal_records {
                count(&r.reply)?;
            }
        }
        let hs_sum = h.summary.harmful.as_ref();
        let task_sum = t.summary.task.as_ref();
        Ok(EvalResult {
            hs: h.harmfulness.unwrap_or(f64::NAN),
            hs_keyword: hs_sum.map_or(f64::NAN, |s| s.keyword_rate.percent),
            n_harmful: h.harmful.len(),
            fa: t.accuracy.unwrap_or(f64::NAN),
            n_task: t.task.len(),
            hs_rate: hs_sum.map(|s| s.rate),
            hs_keyword_rate: hs_sum.map(|s| s.keyword_rate),
            hs_nondegenerate_rate: hs_sum.map(|s| s.nondegenerate_rate),
            fa_rate: task_sum.map(|s| s.rate),
            fa_strict_rate: task_sum.and_then(|s| s.strict_rate),
            or_rate: o
                .as_ref()
                .and_then(|o| o.summary.overrefusal.as_ref())
                .map(|s| s.rate),
            tokens_per_s: generated as f64 / seconds.max(1e-9),
            perplexity: ppl.as_ref().map(|p| p.0.perplexity),
            perplexity_untouched: ppl.as_ref().map(|p| p.1.perplexity),
            perplexity_intervals: ppl.as_ref().map(|(p, u)| PerplexityIntervals {
                texts: p.texts,
                interval: p.interval,
                untouched_interval: u.interval,
                ratio_interval: p.ratio_to(u).interval,
            }),
        })
    }
}

impl Runner {
    fn execute_neurons(
        &self,
        stage: &Stage,
        deps: &[PathBuf],
        out: &Path,
        obs: &mut dyn Observer,
    ) -> crate::Result<serde_json::Value> {
        match &stage.kind {
            StageKind::SnTune {
                data,
                docs,
                lr,
                epochs,
                set,
            } => {
                let safety = NeuronSet::load(&deps[0].join(SET_JSON))?;
                let set = match set {
                    TunedSet::Safety => safety.clone(),
                    TunedSet::SafetyMinusFoundation => {
                        let foundation = NeuronSet::load(&deps[1].join(SET_JSON))?;
                        crate::neurons::rsn_tune_set(&safety, &foundation)?
                    }
                    TunedSet::RandomLike => random_like(&safety, self.cfg.seed),
                    TunedSet::FoundationLike => {
                        let paths = crate::neurons::detect::output_paths(&deps[1].join(SET_JSON));
                        let ranking = crate::neurons::NeuronRanking::load(&paths[4])?;
                        crate::neurons::deactivate::foundation_like(&safety, &ranking)?
                    }
                };
                let rows = load_source(data)?;
                let cfg = SnTuneConfig {
                    epochs: *epochs,
                    lr: *lr,
                    docs: *docs,
                    seed: self.cfg.seed,
                    ..Default::default()
                };
                obs.stage_progress(0, 1, &format!("{} neurons", set.len()));
                let outcome = sn_tune(
                    self.base.model.clone(),
                    &self.base.tokenizer,
                    &set,
                    &rows,
                    &cfg,
                )?;
                let extra =
                    serde_json::json!({"safety_neurons": safety.len(), "trained_set": set.len()});
                write_outcome(&outcome, &self.base.tokenizer, &out.join(MODEL_DIR), extra)?;
                obs.stage_progress(1, 1, "");
                let r = &outcome.report;
                Ok(
                    serde_json::json!({"neurons": r.trained_neurons, "params": r.trained_params,
                    "safety_neurons": safety.len(), "steps": r.steps, "seconds": r.seconds,
                    "first_loss": r.log.first().map(|l| l.loss), "last_loss": r.log.last().map(|l| l.loss)}),
                )
            }
            StageKind::Detect {
                adapter,
                corpus,
                prompts,
                top_k,
                top_k_attn,
                top_k_ffn,
                tokens,
            } => {
                let rows = load_source(corpus)?;
                let mut model = self.base.model.clone();
                if *adapter {
                    let ad = Adapter::load(&deps[0], model.device())?;
                    model.apply_adapter(&ad, AdapterMode::Merged)?;
                }
                let mc = model.config();
                let selection = if *top_k > 0 {
                    crate::neurons::Selection::TopK(*top_k)
                } else {
                    crate::neurons::Selection::paper_split(
                        mc.hidden_size,
                        mc.intermediate_size,
                        (*top_k_attn > 0).then_some(*top_k_attn),
                        (*top_k_ffn > 0).then_some(*top_k_ffn),
                    )
                };
                let cfg = DetectConfig {
                    selection,
                    tokens: *tokens,
                    limit: Some(*prompts),
                    corpus: corpus.clone(),
                    model: self.inputs.model_path.display().to_string(),
                    ..Default::default()
                };
                let (set, report) = detect(
                    &model,
                    &self.base.tokenizer,
                    &rows,
                    &cfg,
                    &mut |done, total| obs.stage_progress(done, total, "prompts"),
                )?;
                crate::neurons::detect::save(&set, &report, &out.join(SET_JSON))?;
                let c = &report.counts;
                Ok(
                    serde_json::json!({"neurons": c.neurons, "attention": c.attention, "ffn": c.ffn,
                    "attention_percent": 100.0 * c.attention_share,
                    "param_percent": 100.0 * report.params_fraction,
                    "prompts": report.prompts, "seconds": report.seconds,
                    "per_layer": c.layers.iter().map(|l| l.attention + l.ffn).collect::<Vec<_>>()}),
                )
            }
            _ => Err(stage_err(&stage.name, "not a safety-neuron stage")),
        }
    }
}

/// A stage result as JSON (the results are plain data; a failure would be a bug, so it maps to
/// `null` rather than failing a finished stage).
fn to_json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn summary_line(v: &serde_json::Value) -> String {
    if let (Some(hs), Some(fa)) = (v.get("hs"), v.get("fa")) {
        let or = v
            .get("or_rate")
            .and_then(|r| r.get("percent"))
            .and_then(|x| x.as_f64())
            .map(|x| format!("  OR {x:.1}"))
            .unwrap_or_default();
        let tps = v
            .get("tokens_per_s")
            .and_then(|x| x.as_f64())
            .map(|x| format!("  ({x:.0} generated tokens/s)"))
            .unwrap_or_default();
        return format!(
            "HS {hs:.1}  FA {fa:.1}{or}{tps}",
            hs = hs.as_f64().unwrap_or(f64::NAN),
            fa = fa.as_f64().unwrap_or(f64::NAN)
        );
    }
    let s = v.to_string();
    if s.len() > 120 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(117).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

fn parse_method(m: &str) -> crate::Result<Method> {
    Ok(match m {
        "low-rank" => Method::LowRank,
        "wanda" => Method::Wanda,
        "snip" => Method::Snip,
        "preference-snip" => Method::PreferenceSnip,
        "random" => Method::Random,
        other => return Err(stage_err("identify", format!("unknown method {other:?}"))),
    })
}

/// The `realign train` configuration of a planned training stage (an error only for a method
/// that [`ExperimentConfig::validate`] would have refused).
pub fn train_config(
    s: &StageTrain,
    init: Option<PathBuf>,
    data: &str,
    out: &Path,
    seed: u64,
) -> crate::Result<TrainConfig> {
    let objective = s
        .objective()
        .map_err(|e| stage_err(&format!("train ({})", s.method), e))?;
    Ok(TrainConfig {
        objective,
        model: None,
        init_adapter: init,
        output: out.to_path_buf(),
        seed,
        lora: LoraSettings {
            r: s.r,
            alpha: s.alpha,
            ..Default::default()
        },
        data: DataSettings {
            train: data.to_string(),
            template: "chat".into(),
            system: None,
            max_length: s.max_length,
            max_rows: s.max_rows,
        },
        optim: OptimSettings {
            lr: s.lr,
            epochs: s.epochs,
            batch_size: s.batch_size,
            grad_accum: s.grad_accum,
            warmup_ratio: s.warmup_ratio,
            schedule: crate::train::schedule::Schedule::Cosine,
            group_by_length: s.group_by_length,
            max_tokens_per_pass: s.max_tokens_per_pass,
            ..Default::default()
        },
    })
}
