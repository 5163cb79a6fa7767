//! The experiment report: the papers' tables in Markdown (`report.md`), the same numbers in
//! JSON (`report.json`), plots, and an index (`index.md`) of everything in the folder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::cache::StageRecord;
use super::config::ExperimentConfig;
use super::plan::{Plan, StageKind, Variant};
use super::stages::EvalResult;
use crate::eval::stats::Rate;

/// One row of the stage-time table.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// Stage name.
    pub stage: String,
    /// Wall seconds of the run that produced it.
    pub seconds: f64,
    /// Peak resident memory of the process during that run of the stage, MiB (`None`: an
    /// older record, or no `/proc`).
    pub peak_rss_mib: Option<f64>,
}

/// One report row: a variant and its evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Label and group.
    pub variant: Variant,
    /// Harmfulness score, %.
    pub hs: f64,
    /// Task accuracy, %.
    pub fa: f64,
    /// Harmfulness score by the keyword judge, %.
    pub hs_keyword: f64,
    /// Harmful prompts evaluated.
    pub n_harmful: usize,
    /// Task items evaluated.
    pub n_task: usize,
    /// The evaluation stage (shared by variants naming the same model).
    pub stage: String,
    /// `hs` with its count, n and 95 % Wilson interval.
    pub hs_rate: Option<Rate>,
    /// The keyword judge's score with its interval.
    pub hs_keyword_rate: Option<Rate>,
    /// Keyword-harmful replies that are not degenerate (repetition, restated request,
    /// gibberish, too short), with the interval.
    pub hs_nondegenerate_rate: Option<Rate>,
    /// `fa` with its interval.
    pub fa_rate: Option<Rate>,
    /// Task accuracy by the strict first-label rule, with the interval.
    pub fa_strict_rate: Option<Rate>,
    /// Over-refusal (% of benign-but-edgy prompts refused), with the interval.
    pub or: Option<f64>,
    /// `or` with its count, n and interval.
    pub or_rate: Option<Rate>,
    /// Generated tokens per second of the evaluation.
    pub tokens_per_s: f64,
    /// Safe LoRA rows: modules projected and modules in all.
    pub projected: Option<(usize, usize)>,
    /// Deactivation rows: perplexity with the neurons off, and of the untouched model. Rows
    /// of tuned models (SN-Tune, RSN-Tune, their controls and fine-tunes): theirs, and the
    /// base model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<(f64, f64)>,
    /// The texts measured and the 95 % intervals of the two perplexities and their ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_intervals: Option<super::stages::PerplexityIntervals>,
    /// The files of the evaluated model, so that it can be evaluated again elsewhere.
    pub model_files: ModelFiles,
}

/// Where an evaluated model's files are, as paths under the run's output folder: the base
/// model (the experiment's, or a full model a stage wrote) with these PEFT adapters merged in
/// order, which is what `realign eval --model M --adapter A1 --adapter A2` evaluates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelFiles {
    /// A full model folder written by a stage (SN-Tune, RSN-Tune); `None`: the experiment's base
    /// model.
    pub full_model: Option<String>,
    /// The adapter folders, in the order they are merged.
    pub adapters: Vec<String>,
    /// The neuron set zeroed after the adapters (deactivation rows), which `realign eval`
    /// alone does not do (`realign neurons deactivate --write DIR` writes such a model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deactivated: Option<String>,
}

impl ModelFiles {
    /// The files of evaluation stage `stage` of `plan`, under `output`.
    fn of(plan: &Plan, stage: &super::plan::Stage, output: &Path) -> Self {
        let StageKind::Eval { model } = &stage.kind else {
            return Self::default();
        };
        let store = super::cache::StageStore::new(output.join("stages"));
        let folder = |d: Option<&usize>| {
            d.map(|&d| {
                let s = &plan.stages[d];
                store.dir(&s.name, &s.key).display().to_string()
            })
        };
        let k = usize::from(model.full_model);
        Self {
            full_model: model
                .full_model
                .then(|| folder(stage.deps.first()))
                .flatten()
                .map(|d| format!("{d}/{}", super::stages::MODEL_DIR)),
            adapters: (k..k + model.adapters)
                .filter_map(|i| folder(stage.deps.get(i)))
                .collect(),
            deactivated: model
                .deactivate
                .and_then(|_| folder(stage.deps.get(k + model.adapters))),
        }
    }

    /// The `realign eval` flags that load this model (`base`: the experiment's `--model`, if not
    /// the embedded default); `None` for a deactivated model.
    pub fn eval_flags(&self, base: Option<&str>) -> Option<String> {
        if self.deactivated.is_some() {
            return None;
        }
        let mut flags = Vec::new();
        if let Some(m) = self.full_model.as_deref().or(base) {
            flags.push(format!("--model {}", shell_word(m)));
        }
        flags.extend(
            self.adapters
                .iter()
                .map(|a| format!("--adapter {}", shell_word(a))),
        );
        Some(flags.join(" "))
    }
}

/// `s` as one shell word: as is when it holds only characters no shell treats specially,
/// else in single quotes (a `'` inside written `'\''`), so that a path with spaces or
/// other characters pastes back as one argument.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The overlap of two detected neuron sets.
#[derive(Debug, Clone, Serialize)]
pub struct Overlap {
    /// First set (stage name).
    pub a: String,
    /// Second set.
    pub b: String,
    /// `|A ∩ B|`.
    pub intersection: usize,
    /// `|A ∩ B| / |A|`.
    pub ratio_of_a: f64,
    /// `|A ∩ B| / |B|` (the paper's `overlap(A, B)`).
    pub ratio_of_b: f64,
}

/// Everything the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every evaluated variant.
    pub evals: Vec<Row>,
    /// Identification stages: name → result (method, density, seconds).
    pub identify: BTreeMap<String, serde_json::Value>,
    /// Neuron detection stages: name → result.
    pub neurons: BTreeMap<String, serde_json::Value>,
    /// SN-Tune stages: name → result.
    pub sn_tune: BTreeMap<String, serde_json::Value>,
    /// Overlaps between detected neuron sets.
    pub neuron_overlaps: Vec<Overlap>,
    /// Deact-SN placed among the Deact-R draws (keyword and non-degenerate HS), when
    /// `neurons.random_draws` is above 1.
    pub against_random: Vec<crate::neurons::RandomComparison>,
    /// `realign diagnose` of each attacked adapter (main seed, in plan order): p, drift,
    /// update drift, verdict, ...
    pub diagnose: Vec<serde_json::Value>,
    /// Wall time per stage.
    pub times: Vec<StageTime>,
    /// The attack's `p` values, main first.
    pub ps: Vec<f64>,
    /// The seeds of the attack-to-repair chain, main first.
    pub seeds: Vec<u64>,
    /// The comparisons the report draws, in words, each with its intervals.
    pub findings: Vec<String>,
    /// Evaluation records that could not be read back: the row stays in the tables with "–"
    /// and the reason is listed here.
    pub unreadable: Vec<String>,
    /// The evaluation sets: harmful, task, over-refusal (empty: not measured).
    pub eval_sets: Vec<String>,
    /// The experiment's base model as configured (`None`: the embedded default).
    pub base_model: Option<String>,
    /// The harmfulness judge (`keyword` or `model:PATH`).
    pub judge: String,
    /// The judge's measured agreement with human labels (Cohen's κ per set, from
    /// [`crate::eval::judges::measured`]); empty when it was never measured.
    pub judge_agreement: Vec<crate::eval::judges::measured::MeasuredAgreement>,
    /// Peak resident memory of this invocation of the experiment, MiB (the kernel's `VmHWM`
    /// when the report was written: what `/usr/bin/time -v` reports; `None` without `/proc`).
    /// Stages reused from the cache did not run in it; their own peaks are in `times`.
    pub peak_rss_mib: Option<f64>,
    /// The machine this invocation ran on ([`crate::host::Host`]: CPU, kernels, threads), the
    /// context of `times` and `peak_rss_mib`. Stages reused from the cache may have run elsewhere.
    pub host: Option<crate::host::Host>,
}

/// The seed of the first row (reports of older runs carry no seed list).
fn e_seed(rows: &[Row]) -> u64 {
    rows.first().map_or(0, |r| r.variant.seed)
}

/// `12.5 ± 3.1` over finite values (`–` when there are none).
fn mean_sd(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    format!("{mean:.1} ± {sd:.1}")
}

/// A paired comparison across seeds of method `a` against the control `b`, from the HS
/// differences `a − b` of the seeds where both were evaluated (in seed order): how many seeds
/// put `a` below, level with and above `b`, and the mean difference. Intervals of single rows
/// overlap at this n; the sign across seeds is what a reader can check.
pub(crate) fn paired_sentence(a: &str, b: &str, diffs: &[f64]) -> String {
    if diffs.is_empty() {
        return format!("{a} against {b}: no seed has both rows");
    }
    let below = diffs.iter().filter(|d| **d < 0.0).count();
    let level = diffs.iter().filter(|d| **d == 0.0).count();
    let above = diffs.len() - below - level;
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let each: Vec<String> = diffs.iter().map(|d| format!("{d:+.1}")).collect();
    format!(
        "{a} against {b}: HS lower at {below} of {n} seeds, level at {level}, higher at {above}; \
         mean difference {mean:+.1} points (per seed: {})",
        each.join(", "),
        n = diffs.len(),
    )
}

fn row_name(label: &str) -> String {
    label.split(" p=").next().unwrap_or(label).to_string()
}

fn fmt1(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.1}")
    }
}

/// `37.5 [26.1, 50.4]`: a percentage with its 95 % interval (the plain number without one).
/// `x` with its 95 % interval, to `digits` decimals: `82.6 [78.1, 87.4]`, or `x` alone.
fn with_interval(x: f64, interval: Option<[f64; 2]>, digits: usize) -> String {
    match interval {
        Some([lo, hi]) => format!("{x:.digits$} [{lo:.digits$}, {hi:.digits$}]"),
        None => format!("{x:.digits$}"),
    }
}

/// Whether a tuned model kept the base model's perplexity (issue 12: SN-Tune with "perplexity
/// unchanged"), read from the paired 95 % interval of the ratio: it holds 1 (kept), lies above
/// (higher) or below (lower).
fn perplexity_kept(name: &str, row: &Row) -> Option<String> {
    let (p, u) = row.perplexity?;
    let i = row.perplexity_intervals?;
    let [lo, hi] = i.ratio_interval?;
    let verdict = if lo > 1.0 {
        "higher than the base model's: the interval of the ratio excludes 1"
    } else if hi < 1.0 {
        "lower than the base model's: the interval of the ratio excludes 1"
    } else {
        "unchanged within the interval (it holds 1)"
    };
    Some(format!(
        "{name} perplexity {p:.1} against the base model's {u:.1} on the same {} texts: \
         ratio ×{:.3} [{lo:.3}, {hi:.3}], {verdict}",
        i.texts,
        p / u
    ))
}

fn cell(rate: Option<Rate>, value: f64) -> String {
    match rate {
        Some(r) => format!("{:.1} [{:.1}, {:.1}]", r.percent, r.lo, r.hi),
        None => fmt1(value),
    }
}

/// One comparison in words: "`a` (HS 5.0 [..]) is significantly below `b` (HS 40.0 [..])"
/// when the intervals are disjoint in that direction, else "… is not significantly …: the
/// intervals overlap". `below`: the direction claimed.
fn compare_rows(
    a_name: &str,
    a: &Row,
    b_name: &str,
    b: &Row,
    metric: &str,
    rate: impl Fn(&Row) -> Option<Rate>,
    below: bool,
) -> String {
    let (Some(x), Some(y)) = (rate(a), rate(b)) else {
        return format!("{a_name} vs {b_name}: no {metric} interval to compare");
    };
    let (dir, other) = if below {
        ("below", "above")
    } else {
        ("above", "below")
    };
    let significant = if below { x.hi < y.lo } else { x.lo > y.hi };
    let opposite = if below { x.lo > y.hi } else { x.hi < y.lo };
    let show = |r: &Rate| format!("{metric} {:.1} [{:.1}, {:.1}]", r.percent, r.lo, r.hi);
    if significant {
        format!(
            "{a_name} ({}) is significantly {dir} {b_name} ({})",
            show(&x),
            show(&y)
        )
    } else if opposite {
        format!(
            "{a_name} ({}) is significantly {other} {b_name} ({})",
            show(&x),
            show(&y)
        )
    } else {
        format!(
            "{a_name} ({}) is not significantly {dir} {b_name} ({}): the intervals overlap",
            show(&x),
            show(&y)
        )
    }
}

impl Report {
    /// Collects the report from the plan and the stage records (same order).
    pub fn build(
        cfg: &ExperimentConfig,
        plan: &Plan,
        records: &[StageRecord<serde_json::Value>],
    ) -> Self {
        let mut r = Report {
            evals: Vec::new(),
            identify: BTreeMap::new(),
            neurons: BTreeMap::new(),
            sn_tune: BTreeMap::new(),
            neuron_overlaps: Vec::new(),
            against_random: Vec::new(),
            diagnose: Vec::new(),
            times: Vec::new(),
            ps: cfg.attack.ps.clone(),
            seeds: super::plan::chain_seeds(cfg),
            findings: Vec::new(),
            unreadable: Vec::new(),
            judge: cfg.eval.judge.clone(),
            judge_agreement: crate::eval::judges::measured::measured(&cfg.eval.judge),
            peak_rss_mib: None,
            host: None,
            eval_sets: vec![
                cfg.eval.harmful.clone(),
                cfg.eval.task.clone(),
                cfg.eval.overrefusal.clone(),
            ],
            base_model: cfg.model.as_ref().map(|m| m.display().to_string()),
        };
        for (stage, rec) in plan.stages.iter().zip(records) {
            r.times.push(StageTime {
                stage: stage.name.clone(),
                seconds: rec.seconds,
                peak_rss_mib: rec.peak_rss_mib,
            });
            match &stage.kind {
                StageKind::Identify { .. } => {
                    r.identify.insert(stage.name.clone(), rec.result.clone());
                }
                StageKind::Detect { .. } => {
                    r.neurons.insert(stage.name.clone(), rec.result.clone());
                }
                StageKind::SnTune { .. } => {
                    r.sn_tune.insert(stage.name.clone(), rec.result.clone());
                }
                StageKind::Diagnose { .. } if Some(&stage.seed) == r.seeds.first() => {
                    r.diagnose.push(rec.result.clone());
                }
                _ => {}
            }
        }
        for (variant, i) in &plan.variants {
            let parsed = serde_json::from_value::<EvalResult>(records[*i].result.clone());
            let e = parsed.unwrap_or_else(|err| {
                r.unreadable.push(format!(
                    "{} (stage {}): {err}",
                    variant.label, plan.stages[*i].name
                ));
                EvalResult::unreadable()
            });
            {
                // Safe LoRA rows: the projection stage is the eval's second dep.
                let projected = variant
                    .group
                    .contains("safelora")
                    .then(|| plan.stages[*i].deps.get(1).map(|&d| &records[d].result))
                    .flatten()
                    .and_then(|v| {
                        Some((
                            v.get("projected")?.as_u64()? as usize,
                            v.get("modules")?.as_u64()? as usize,
                        ))
                    });
                r.evals.push(Row {
                    variant: variant.clone(),
                    hs: e.hs,
                    fa: e.fa,
                    hs_keyword: e.hs_keyword,
                    n_harmful: e.n_harmful,
                    n_task: e.n_task,
                    stage: plan.stages[*i].name.clone(),
                    hs_rate: e.hs_rate,
                    hs_keyword_rate: e.hs_keyword_rate,
                    hs_nondegenerate_rate: e.hs_nondegenerate_rate,
                    fa_rate: e.fa_rate,
                    fa_strict_rate: e.fa_strict_rate,
                    or: e.or_rate.map(|r| r.percent),
                    or_rate: e.or_rate,
                    tokens_per_s: e.tokens_per_s,
                    projected,
                    perplexity: e.perplexity.zip(e.perplexity_untouched),
                    perplexity_intervals: e.perplexity_intervals,
                    model_files: ModelFiles::of(plan, &plan.stages[*i], &cfg.output),
                });
            }
        }
        r.against_random = r.deact_against_random();
        r.findings = r.compare();
        r
    }

    /// Deact-SN against every draw of Deact-R (main seed), when there are two draws or more.
    fn deact_against_random(&self) -> Vec<crate::neurons::RandomComparison> {
        use crate::neurons::{compare_rates, Draw, HsMetric};
        let Some(sn) = self.main_row(super::plan::DEACT_SN) else {
            return Vec::new();
        };
        let draws: Vec<&Row> = self
            .evals
            .iter()
            .filter(|e| {
                e.variant.label.starts_with(super::plan::DEACT_R) && e.variant.group == "neurons"
            })
            .collect();
        if draws.len() < 2 {
            return Vec::new();
        }
        let untouched = self.aligned_row();
        let pick = |m: HsMetric, e: &Row| match m {
            HsMetric::Keyword => e.hs_keyword_rate,
            HsMetric::NonDegenerate => e.hs_nondegenerate_rate,
        };
        [HsMetric::Keyword, HsMetric::NonDegenerate]
            .into_iter()
            .filter_map(|m| {
                let d: Vec<Draw> = draws
                    .iter()
                    .map(|e| {
                        Some(Draw {
                            seed: e.variant.seed.wrapping_add(e.variant.model.random_draw),
                            rate: pick(m, e)?,
                            broken: e.perplexity.is_some_and(|(p, u)| {
                                p / u > crate::neurons::perplexity::BROKEN_FACTOR
                            }),
                        })
                    })
                    .collect::<Option<_>>()?;
                let u = untouched.and_then(|e| pick(m, e));
                compare_rates(m, &pick(m, sn)?, u.as_ref(), &d)
            })
            .collect()
    }

    /// The main seed's aligned row, whichever objective trained it ("Aligned (W_a, DPO)",
    /// "Aligned (W_a, ORPO)", ...).
    fn aligned_row(&self) -> Option<&Row> {
        let seed = self.seeds.first().copied();
        self.evals.iter().find(|e| {
            e.variant.group == "alignment"
                && e.variant.label.starts_with(super::plan::ALIGNED)
                && Some(e.variant.seed) == seed
        })
    }

    /// The aligned row's label ("Aligned (W_a, DPO)" for the default).
    fn aligned_label(&self) -> &str {
        self.aligned_row()
            .map_or("Aligned (W_a, DPO)", |e| e.variant.label.as_str())
    }

    /// The main seed's row called `label`.
    fn main_row(&self, label: &str) -> Option<&Row> {
        let seed = self.seeds.first().copied();
        self.evals
            .iter()
            .find(|e| e.variant.label == label && Some(e.variant.seed) == seed)
    }

    /// The comparisons a reader of the papers looks for, per `p` at the main seed, in words:
    /// whether two rows' 95 % intervals are disjoint (a significant difference) or overlap.
    pub fn compare(&self) -> Vec<String> {
        let mut out = Vec::new();
        let hs = |r: &Row| r.hs_rate;
        let fa = |r: &Row| r.fa_rate;
        let or = |r: &Row| r.or_rate;
        let aligned = self.aligned_row();
        let base = self.main_row("Non-aligned");
        if let (Some(a), Some(b)) = (aligned, base) {
            out.push(compare_rows("aligned", a, "non-aligned", b, "HS", hs, true));
            out.push(compare_rows(
                "aligned",
                a,
                "non-aligned",
                b,
                "FA",
                fa,
                false,
            ));
            if let Some(r) = a.or_rate {
                out.push(format!("aligned over-refusal: OR {r}"));
            }
            out.push(compare_rows("aligned", a, "non-aligned", b, "OR", or, true));
        }
        let method = self
            .evals
            .iter()
            .find(|e| e.variant.group == "nlsr")
            .map(|e| row_name(&e.variant.label));
        for p in &self.ps {
            let at = |name: &str| self.main_row(&format!("{name} p={p}"));
            let Some(t) = at("Attacked") else { continue };
            if let Some(a) = aligned {
                let took = matches!((t.hs_rate, a.hs_rate), (Some(x), Some(y)) if x.lo > y.hi);
                let mut line = compare_rows(
                    &format!("attacked (p={p})"),
                    t,
                    "aligned",
                    a,
                    "HS",
                    hs,
                    false,
                );
                if !took {
                    line.push_str(": the attack did not take");
                }
                out.push(line);
            }
            let Some(name) = &method else { continue };
            let Some(n) = self.main_row(&format!("{name} p={p}")) else {
                continue;
            };
            let nl = format!("{name} (p={p})");
            out.push(compare_rows(&nl, n, "attacked", t, "HS", hs, true));
            if let Some(a) = aligned {
                out.push(format!(
                    "{nl} HS − aligned HS = {:+.1} points (goal: within 5)",
                    n.hs - a.hs
                ));
            }
            out.push(format!(
                "{nl} FA − attacked FA = {:+.1} points (goal: within 1)",
                n.fa - t.fa
            ));
            if let Some(sl) = at("Safe LoRA") {
                out.push(compare_rows(&nl, n, "Safe LoRA", sl, "HS", hs, true));
            }
            for control in ["NLSR (random)", "NLSR (shrink)"] {
                if let Some(r) = at(control) {
                    if r.variant.label != n.variant.label {
                        out.push(compare_rows(&nl, n, control, r, "HS", hs, true));
                    }
                }
            }
        }
        out.extend(self.compare_neurons());
        out
    }

    /// The safety-neuron comparisons (issue 12): SN-Tune against the base model and against
    /// its two controls (a random set of its structure, equally important foundation
    /// neurons), and RSN-Tune against SN-Tune after plain task fine-tuning (the paper's
    /// Table 4).
    fn compare_neurons(&self) -> Vec<String> {
        let mut out = Vec::new();
        let hs = |r: &Row| r.hs_rate;
        let fa = |r: &Row| r.fa_rate;
        let Some(sn) = self.find("SN-Tune") else {
            return out;
        };
        if let Some(base) = self.find("Non-aligned") {
            out.push(compare_rows(
                "SN-Tune",
                sn,
                "non-aligned",
                base,
                "HS",
                hs,
                true,
            ));
            out.push(format!(
                "SN-Tune FA − non-aligned FA = {:+.1} points (goal: unchanged within the intervals)",
                sn.fa - base.fa
            ));
            out.push(compare_rows(
                "SN-Tune",
                sn,
                "non-aligned",
                base,
                "FA",
                fa,
                false,
            ));
        }
        if let Some(line) = perplexity_kept("SN-Tune", sn) {
            out.push(line);
        }
        for control in [super::plan::SN_TUNE_RANDOM, super::plan::SN_TUNE_FOUNDATION] {
            if let Some(c) = self.find(control) {
                out.push(compare_rows("SN-Tune", sn, control, c, "HS", hs, true));
            }
        }
        if let (Some(s), Some(r)) = (
            self.find("SN-Tune + task fine-tuning"),
            self.find("RSN-Tune + task fine-tuning"),
        ) {
            out.push(compare_rows(
                "RSN-Tune + task fine-tuning",
                r,
                "SN-Tune + task fine-tuning",
                s,
                "HS",
                hs,
                true,
            ));
        }
        out
    }

    /// The row whose perplexity is the base model's reference, if any tuned row measured it
    /// (its `perplexity.1` and interval are the base model's).
    fn base_perplexity(&self) -> Option<&Row> {
        self.evals
            .iter()
            .find(|e| e.variant.model.perplexity && e.perplexity.is_some())
    }

    fn find(&self, label: &str) -> Option<&Row> {
        self.evals.iter().find(|e| e.variant.label == label)
    }

    /// The main table: HS and FA per method (rows) and `p` (columns).
    pub fn main_table(&self) -> String {
        let mut rows: Vec<String> = Vec::new();
        let mut cells: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
        let main_seed = self.seeds.first().copied().unwrap_or(e_seed(&self.evals));
        for e in self.evals.iter().filter(|e| e.variant.seed == main_seed) {
            let g = e.variant.group.as_str();
            if !matches!(
                g,
                "alignment" | "attack" | "safelora" | "baseline" | "nlsr" | "nlsr-no-amp"
            ) {
                continue;
            }
            let name = row_name(&e.variant.label);
            if !rows.contains(&name) {
                rows.push(name.clone());
            }
            let col = e.variant.p.map(|p| format!("{p}")).unwrap_or_default();
            cells.insert((name, col), (cell(e.hs_rate, e.hs), cell(e.fa_rate, e.fa)));
        }
        let mut s = String::from("| method |");
        for p in &self.ps {
            let _ = write!(s, " HS ↓ p={p} | FA ↑ p={p} |");
        }
        s.push_str("\n|---|");
        for _ in &self.ps {
            s.push_str("---:|---:|");
        }
        s.push('\n');
        for name in rows {
            let _ = write!(s, "| {name} |");
            for p in &self.ps {
                let c = cells
                    .get(&(name.clone(), format!("{p}")))
                    .or_else(|| cells.get(&(name.clone(), String::new())));
                match c {
                    Some((hs, fa)) => {
                        let _ = write!(s, " {hs} | {fa} |");
                    }
                    None => s.push_str(" – | – |"),
                }
            }
            s.push('\n');
        }
        s
    }

    /// One line per evaluated model (the first row of each evaluation stage): its label, `p`
    /// and the `realign eval` flags that load it; `None` when no row has files.
    pub fn models_table(&self) -> Option<String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut t = String::from("| model | p | `realign eval` |\n|---|---:|---|\n");
        let mut any = false;
        for row in &self.evals {
            if !seen.insert(row.stage.as_str()) {
                continue;
            }
            let flags = match row.model_files.eval_flags(self.base_model.as_deref()) {
                Some(f) if f.is_empty() => "(the base model: no flag)".to_string(),
                Some(f) => format!("`{f}`"),
                None => format!(
                    "not by `realign eval` alone: zeroes the neurons of `{}`",
                    row.model_files.deactivated.as_deref().unwrap_or("?")
                ),
            };
            let p = row.variant.p.map_or("–".to_string(), |p| p.to_string());
            let _ = writeln!(t, "| {} | {p} | {flags} |", row.variant.label);
            any = true;
        }
        any.then_some(t)
    }

    /// Every row of the main seed with all its numbers: HS (configured judge), HS of
    /// non-degenerate replies, FA (substring and strict rule), OR, each with its interval.
    pub fn detail_table(&self) -> String {
        let main_seed = self.seeds.first().copied().unwrap_or(e_seed(&self.evals));
        let mut s = String::from(
            "| model | p | HS ↓ | HS, non-degenerate ↓ | FA ↑ | FA, strict rule ↑ | OR ↓ | generated tokens/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for e in self.evals.iter().filter(|e| {
            e.variant.seed == main_seed
                && matches!(
                    e.variant.group.as_str(),
                    "alignment" | "attack" | "safelora" | "baseline" | "nlsr" | "nlsr-no-amp"
                )
        }) {
            let mut name = row_name(&e.variant.label);
            if let Some((k, n)) = e.projected {
                let _ = write!(name, " ({k} of {n} modules projected)");
            }
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {:.0} |",
                e.variant
                    .p
                    .map(|p| format!("{p}"))
                    .unwrap_or_else(|| "–".into()),
                cell(e.hs_rate, e.hs),
                cell(e.hs_nondegenerate_rate, f64::NAN),
                cell(e.fa_rate, e.fa),
                cell(e.fa_strict_rate, f64::NAN),
                cell(e.or_rate, e.or.unwrap_or(f64::NAN)),
                e.tokens_per_s,
            );
        }
        s
    }

    /// Mean ± standard deviation over the seeds of every (method, p) row (only with several
    /// seeds).
    pub fn seeds_table(&self) -> Option<String> {
        if self.seeds.len() < 2 {
            return None;
        }
        let mut groups: BTreeMap<(String, String), Vec<&Row>> = BTreeMap::new();
        let mut order = Vec::new();
        for e in &self.evals {
            if !matches!(
                e.variant.group.as_str(),
                "attack" | "safelora" | "baseline" | "nlsr" | "nlsr-no-amp"
            ) {
                continue;
            }
            let name = row_name(&e.variant.label);
            let key = (
                name,
                e.variant.p.map(|p| format!("{p}")).unwrap_or_default(),
            );
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(e);
        }
        let mut s = String::from(
            "| model | p | seeds | HS ↓ mean ± sd | HS ↓ per seed | FA ↑ mean ± sd | OR ↓ mean ± sd |\n|---|---:|---:|---:|---|---:|---:|\n",
        );
        let hs_by_seed = |rows: &[&Row]| -> BTreeMap<u64, f64> {
            rows.iter().map(|r| (r.variant.seed, r.hs)).collect()
        };
        let mut paired = Vec::new();
        for key in &order {
            let random = (String::from("NLSR (random)"), key.1.clone());
            if key.0.starts_with("NLSR (") && *key != random {
                if let Some(r) = groups.get(&random) {
                    let (a, b) = (hs_by_seed(&groups[key]), hs_by_seed(r));
                    let diffs: Vec<f64> = self
                        .seeds
                        .iter()
                        .filter_map(|seed| Some(a.get(seed)? - b.get(seed)?))
                        .collect();
                    paired.push(paired_sentence(
                        &format!("{} p={}", key.0, key.1),
                        "NLSR (random)",
                        &diffs,
                    ));
                }
            }
        }
        for key in order {
            let rows = &groups[&key];
            let by_seed = hs_by_seed(rows);
            let per_seed: Vec<String> = self
                .seeds
                .iter()
                .map(|seed| by_seed.get(seed).map_or("–".into(), |v| fmt1(*v)))
                .collect();
            let stat = |f: &dyn Fn(&Row) -> f64| {
                let v: Vec<f64> = rows
                    .iter()
                    .map(|r| f(r))
                    .filter(|x| x.is_finite())
                    .collect();
                mean_sd(&v)
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                key.0,
                key.1,
                rows.len(),
                stat(&|r| r.hs),
                per_seed.join(", "),
                stat(&|r| r.fa),
                stat(&|r| r.or.unwrap_or(f64::NAN)),
            );
        }
        if !paired.is_empty() {
            s.push_str("\nPaired by seed (the same attacked model repaired both ways):\n\n");
            for line in paired {
                let _ = writeln!(s, "- {line}");
            }
        }
        Some(s)
    }

    fn sweep_table(&self, group: &str, param: &str) -> Option<String> {
        let mut rows: Vec<&Row> = self
            .evals
            .iter()
            .filter(|e| e.variant.group == group)
            .collect();
        if rows.is_empty() {
            return None;
        }
        // By the swept value; rows of one value (a method and its random-mask control) keep
        // their planned order (a stable sort).
        rows.sort_by(|a, b| {
            a.variant
                .param
                .partial_cmp(&b.variant.param)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut s =
            format!("| {param} | model | HS ↓ | FA ↑ | OR ↓ |\n|---:|---|---:|---:|---:|\n");
        for e in rows {
            let mut p = e.variant.param.map(|p| format!("{p}")).unwrap_or_default();
            if let Some((k, n)) = e.projected {
                let _ = write!(p, " ({k} of {n} projected)");
            }
            let _ = writeln!(
                s,
                "| {p} | {} | {} | {} | {} |",
                e.variant.label,
                cell(e.hs_rate, e.hs),
                cell(e.fa_rate, e.fa),
                cell(e.or_rate, e.or.unwrap_or(f64::NAN)),
            );
        }
        Some(s)
    }

    /// The intake check of every attacked adapter (`realign diagnose`, adapters only) beside
    /// its measured HS, and how well the drift ranks the fine-tunes by `p` and by HS.
    fn intake_table(&self) -> Option<String> {
        if self.diagnose.is_empty() {
            return None;
        }
        let mut rows: Vec<&serde_json::Value> = self.diagnose.iter().collect();
        rows.sort_by(|a, b| {
            a["p"]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b["p"].as_f64().unwrap_or(0.0))
        });
        let mut s = String::from(
            "| p | drift D | update drift U | modules Safe LoRA would project | modules NLSR would repair | verdict | attacked HS |\n|---:|---:|---:|---:|---:|---|---|\n",
        );
        let (mut ps, mut ds, mut hs) = (Vec::new(), Vec::new(), Vec::new());
        let seed = self.seeds.first().copied();
        for v in rows {
            let p = v["p"].as_f64().unwrap_or(f64::NAN);
            let d = v["drift"].as_f64().unwrap_or(f64::NAN);
            let attacked = self.evals.iter().find(|e| {
                e.variant.group == "attack"
                    && e.variant.p == Some(p)
                    && Some(e.variant.seed) == seed
            });
            let modules = v["modules"].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "| {} | {d:.4} | {:.4} | {} / {modules} | {} / {modules} | {} | {} |",
                super::plan::fmt_num(p),
                v["update_drift"].as_f64().unwrap_or(f64::NAN),
                v["safelora_project"].as_u64().unwrap_or(0),
                v["nlsr_repair"].as_u64().unwrap_or(0),
                v["verdict"].as_str().unwrap_or("?"),
                attacked.map_or("–".to_string(), |e| cell(e.hs_rate, e.hs)),
            );
            ps.push(p);
            ds.push(d);
            hs.push(attacked.map_or(f64::NAN, |e| e.hs));
        }
        let rho = |x: &[f64], y: &[f64]| {
            let finite = x.iter().chain(y).all(|v| v.is_finite());
            finite
                .then(|| crate::eval::stats::spearman(x, y))
                .flatten()
                .map_or("undefined".to_string(), |r| format!("{r:.2}"))
        };
        let _ = writeln!(
            s,
            "\nSpearman's ρ over these {} fine-tunes: D vs p {}; D vs attacked HS {}. D = mean over modules of 1 − S_j (Eq. 8 on whole modules, reference W_a); U = 1 − mean Safe LoRA cosine of the update W_t − W_a; verdict threshold D ≥ {} (`realign diagnose` defaults).",
            ps.len(),
            rho(&ds, &ps),
            rho(&ds, &hs),
            crate::diagnose::DEFAULT_DRIFT_THRESHOLD,
        );
        Some(s)
    }

    fn identify_table(&self) -> Option<String> {
        if self.identify.is_empty() {
            return None;
        }
        let mut s = String::from(
            "| identification stage | method | density | samples | seconds |\n|---|---|---:|---:|---:|\n",
        );
        for (name, v) in &self.identify {
            let _ = writeln!(
                s,
                "| {name} | {} | {:.3} | {} | {:.1} |",
                v["method"].as_str().unwrap_or("?"),
                v["density"].as_f64().unwrap_or(f64::NAN),
                v["samples"].as_u64().unwrap_or(0),
                v["seconds"].as_f64().unwrap_or(f64::NAN),
            );
        }
        Some(s)
    }

    fn neurons_table(&self) -> Option<String> {
        let rows: Vec<&Row> = self
            .evals
            .iter()
            .filter(|e| e.variant.group == "neurons")
            .collect();
        if rows.is_empty() && self.neurons.is_empty() {
            return None;
        }
        let mut s = String::new();
        for (name, v) in &self.neurons {
            let _ = writeln!(
                s,
                "- `{name}`: {} neurons ({} % of the linear-layer parameters; attention share {} %)",
                v.get("neurons").map(|x| x.to_string()).unwrap_or_else(|| "?".into()),
                v.get("param_percent").and_then(|x| x.as_f64()).map(|x| format!("{x:.3}")).unwrap_or_else(|| "?".into()),
                v.get("attention_percent").and_then(|x| x.as_f64()).map(fmt1).unwrap_or_else(|| "?".into()),
            );
        }
        for o in &self.neuron_overlaps {
            let _ = writeln!(
                s,
                "- overlap of `{}` and `{}`: {} neurons in both; {:.1} % of the first, {:.1} % of the second",
                o.a,
                o.b,
                o.intersection,
                100.0 * o.ratio_of_a,
                100.0 * o.ratio_of_b
            );
        }
        for (name, v) in &self.sn_tune {
            let _ = writeln!(
                s,
                "- `{name}`: {} neurons trained",
                v.get("neurons")
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "?".into()),
            );
        }
        for c in &self.against_random {
            let _ = writeln!(s, "- {}", c.sentence());
        }
        let texts = rows
            .iter()
            .find_map(|e| e.perplexity_intervals.map(|p| p.texts))
            .unwrap_or(0);
        s.push_str(&format!(
            "\n| model | HS ↓ | HS, non-degenerate ↓ | FA ↑ | OR ↓ | perplexity, n = {texts} texts (× reference) |\n\
             |---|---:|---:|---:|---:|---:|\n",
        ));
        let ppl = |e: &Row| match e.perplexity {
            Some((p, u)) => {
                let ratio = p / u;
                let broken = if ratio > crate::neurons::perplexity::BROKEN_FACTOR {
                    ", broken"
                } else {
                    ""
                };
                let i = e.perplexity_intervals;
                format!(
                    "{} (×{}{broken})",
                    with_interval(p, i.and_then(|i| i.interval), 1),
                    with_interval(ratio, i.and_then(|i| i.ratio_interval), 2)
                )
            }
            None => "–".into(),
        };
        // The references, as the rows compared with them measured them: the aligned model
        // (before deactivation) for the Deact rows, the base model for the tuned rows.
        let deactivated = rows
            .iter()
            .copied()
            .find(|e| e.variant.model.deactivate.is_some() && e.perplexity.is_some());
        let reference_cell = |r: Option<&Row>| {
            r.and_then(|r| {
                let (_, u) = r.perplexity?;
                Some(format!(
                    "{} (reference)",
                    with_interval(
                        u,
                        r.perplexity_intervals.and_then(|i| i.untouched_interval),
                        1
                    )
                ))
            })
        };
        for (found, row, reference) in [
            (
                self.aligned_row(),
                "Aligned (W_a), none deactivated",
                reference_cell(deactivated),
            ),
            (
                self.find("Non-aligned"),
                "Non-aligned (before SN-Tune)",
                reference_cell(self.base_perplexity()),
            ),
        ] {
            if let Some(e) = found {
                let ppl_cell = reference.unwrap_or_else(|| ppl(e));
                let _ = writeln!(
                    s,
                    "| {row} | {} | {} | {} | {} | {ppl_cell} |",
                    cell(e.hs_rate, e.hs),
                    cell(e.hs_nondegenerate_rate, f64::NAN),
                    cell(e.fa_rate, e.fa),
                    cell(e.or_rate, f64::NAN),
                );
            }
        }
        for e in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                e.variant.label,
                cell(e.hs_rate, e.hs),
                cell(e.hs_nondegenerate_rate, f64::NAN),
                cell(e.fa_rate, e.fa),
                cell(e.or_rate, f64::NAN),
                ppl(e)
            );
        }
        Some(s)
    }

    /// The whole Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# realign experiment\n\n");
        let n = |f: &dyn Fn(&Row) -> usize| self.evals.first().map(f).unwrap_or(0);
        let _ = writeln!(
            s,
            "HS: harmfulness score, % of {} held-out harmful prompts judged harmful ({}; \"non-degenerate\" also requires a reply that is not repetition, a restated request, gibberish or too short). FA: fine-tuning accuracy, % of {} held-out task items answered with the right label (substring rule; strict: the first label word). OR: over-refusal, % of {} benign-but-edgy prompts refused. Every number: the percentage and its 95 % Wilson interval; rows are a seeded sample of each set, the same for every model.\n",
            n(&|e| e.n_harmful),
            if self.judge == "keyword" {
                "GCG's refusal-keyword judge: a reply without a refusal phrase".to_string()
            } else {
                format!(
                    "judge {}; the keyword judge's HS is `hs_keyword` in report.json",
                    self.judge
                )
            },
            n(&|e| e.n_task),
            n(&|e| e.or_rate.map_or(0, |r| r.n)),
        );
        let _ = writeln!(
            s,
            "Judge for HS: `{}`. {}.\n",
            self.judge,
            crate::eval::judges::measured::summary(&self.judge)
        );
        let _ = writeln!(
            s,
            "Evaluation sets: harmful `{}`, task `{}`, over-refusal `{}`.\n",
            self.eval_sets.first().map_or("", |x| x.as_str()),
            self.eval_sets.get(1).map_or("", |x| x.as_str()),
            self.eval_sets
                .get(2)
                .filter(|x| !x.is_empty())
                .map_or("none", |x| x.as_str()),
        );
        s.push_str("## HS and FA by method and harmful fraction p\n\n");
        s.push_str(&self.main_table());
        if !self.unreadable.is_empty() {
            s.push_str(
                "\nRows shown as \"–\": their evaluation record could not be read back:\n\n",
            );
            for u in &self.unreadable {
                let _ = writeln!(s, "- {u}");
            }
        }
        let _ = write!(
            s,
            "\n## Every model at a glance\n\n\"{}\" is also the \"discard the fine-tune\" control: shipping W_a instead of the customer's model.\n\n",
            self.aligned_label()
        );
        s.push_str(&self.detail_table());
        if !self.findings.is_empty() {
            s.push_str("\n## Comparisons (95 % intervals)\n\n");
            for f in &self.findings {
                let _ = writeln!(s, "- {f}");
            }
        }
        if let Some(t) = self.seeds_table() {
            let _ = write!(s, "\n## Across seeds {:?}\n\n{t}", self.seeds);
        }
        for (group, title, param) in [
            (
                "sweep-beta",
                "Effect of pre-amplification (beta; 0 = none)",
                "beta",
            ),
            ("sweep-sparsity", "Effect of sparsity", "sparsity"),
            (
                "sweep-layer-prune",
                "Effect of the layer-pruning rate",
                "P_L",
            ),
            (
                "sweep-safelora-tau",
                "Safe LoRA's threshold (on the fine-tuning update W_t − W_a)",
                "τ",
            ),
        ] {
            if let Some(t) = self.sweep_table(group, param) {
                let _ = write!(s, "\n## {title}\n\n{t}");
            }
        }
        if let Some(t) = self.intake_table() {
            let _ = write!(
                s,
                "\n## Intake check of each fine-tune (`realign diagnose`, adapters only)\n\n{t}"
            );
        }
        if let Some(t) = self.identify_table() {
            let _ = write!(s, "\n## Identification methods\n\n{t}");
        }
        if let Some(t) = self.neurons_table() {
            let _ = write!(s, "\n## Safety neurons\n\n{t}");
        }
        if let Some(t) = self.models_table() {
            let _ = write!(
                s,
                "\n## The models, to evaluate on other sets\n\nEach model as `realign eval` \
                 loads it (paths as this run wrote them; add `--harmful FILE -o DIR`; with this \
                 run's sets, `--limit` and `--harmful-max-new-tokens` of `[eval]` it writes \
                 this run's replies):\n\n{t}"
            );
        }
        s.push_str("\n## Wall time and peak memory per stage\n\n");
        if let Some(host) = &self.host {
            let _ = writeln!(s, "Measured on {host}.\n");
        }
        s.push_str("| stage | seconds | peak RSS, MiB |\n|---|---:|---:|\n");
        let total: f64 = self.times.iter().map(|t| t.seconds).sum();
        for t in &self.times {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} |",
                t.stage,
                t.seconds,
                t.peak_rss_mib.map_or("–".into(), |m| format!("{m:.0}"))
            );
        }
        let _ = writeln!(
            s,
            "| total (this run's stages; cached stages keep their first time) | {total:.1} | {} |",
            self.peak_rss_mib.map_or("–".into(), |m| format!("{m:.0}"))
        );
        s
    }

    /// Writes `report.md`, `report.json`, plots and `index.md` as the folder `dir`, replacing
    /// an existing `dir` whole (nothing of an earlier report is left in it) and only once
    /// every file is complete ([`crate::fsutil::StagedDir`]).
    pub fn write(
        &self,
        dir: &Path,
        plan: &Plan,
        _records: &[StageRecord<serde_json::Value>],
    ) -> crate::Result<()> {
        // Written whole: into a hidden partial folder renamed over `dir` at the end, so that
        // an interrupted write never leaves a report.md of this run beside a report.json (or
        // plots) of an earlier one, and a plot the new configuration no longer draws is gone.
        let target = dir;
        let staged = crate::fsutil::StagedDir::new(target, true)?;
        let dir = staged.path();
        let md = self.markdown();
        crate::fsutil::write_atomic(&dir.join("report.md"), md.as_bytes())?;
        let json = serde_json::to_string_pretty(self).map_err(|source| crate::Error::Json {
            path: dir.join("report.json"),
            source,
        })?;
        crate::fsutil::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        let mut index = String::from("# Experiment report\n\n- [report.md](report.md): the tables\n- [report.json](report.json): the same numbers\n");
        for f in self.plots(dir)? {
            let _ = writeln!(index, "- [{f}]({f})");
        }
        // The layer-similarity plot of the first NLSR repair (main method, main p).
        let stages = target.parent().unwrap_or(target).join("stages");
        let store = super::cache::StageStore::new(stages);
        if let Some(s) = plan
            .stages
            .iter()
            .find(|s| matches!(s.kind, StageKind::Patch { .. }))
        {
            for ext in ["svg", "png"] {
                let from = store.dir(&s.name, &s.key).join(format!("similarity.{ext}"));
                if let Ok(bytes) = std::fs::read(&from) {
                    let name = format!("layer_similarity.{ext}");
                    crate::fsutil::write_atomic(&dir.join(&name), &bytes)?;
                    let _ = writeln!(index, "- [{name}]({name}): S per layer and module of `{}`, patched modules ringed", s.name);
                }
            }
        }
        crate::fsutil::write_atomic(&dir.join("index.md"), index.as_bytes())?;
        staged.commit()
    }

    fn plots(&self, dir: &Path) -> crate::Result<Vec<String>> {
        use crate::report::{write_chart, Chart, ChartKind, Series};
        let mut files = Vec::new();
        let mut push = |paths: Vec<std::path::PathBuf>| {
            for p in paths {
                if let Some(n) = p.file_name() {
                    files.push(n.to_string_lossy().into_owned());
                }
            }
        };
        // HS and FA against p, one line per method.
        let mut by_method: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
        let main_seed = self.seeds.first().copied().unwrap_or(e_seed(&self.evals));
        for e in self.evals.iter().filter(|e| e.variant.seed == main_seed) {
            if let (Some(p), true) = (
                e.variant.p,
                matches!(
                    e.variant.group.as_str(),
                    "attack" | "safelora" | "baseline" | "nlsr" | "nlsr-no-amp"
                ),
            ) {
                by_method
                    .entry(row_name(&e.variant.label))
                    .or_default()
                    .push((p, e.hs, e.fa));
            }
        }
        for (metric, title, y) in [
            (1usize, "Harmfulness score vs harmful fraction p", "HS (%)"),
            (2, "Fine-tuning accuracy vs harmful fraction p", "FA (%)"),
        ] {
            let series: Vec<Series> = by_method
                .iter()
                .map(|(name, pts)| {
                    let mut pts: Vec<(f64, f64)> = pts
                        .iter()
                        .map(|&(p, hs, fa)| (p, if metric == 1 { hs } else { fa }))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series::line(name.clone(), pts)
                })
                .collect();
            if series.is_empty() {
                continue;
            }
            let stem = dir.join(if metric == 1 { "hs_vs_p" } else { "fa_vs_p" });
            push(write_chart(
                &stem,
                &Chart {
                    title,
                    x_label: "p (harmful fraction of the fine-tuning data)",
                    y_label: y,
                    kind: ChartKind::Lines,
                    series: &series,
                    x_ticks: None,
                },
            )?);
        }
        // Sweeps: HS and FA against the swept value.
        for (group, title, x) in [
            (
                "sweep-beta",
                "Pre-amplification strength",
                "beta (0 = none)",
            ),
            (
                "sweep-sparsity",
                "Sparsity of the safety-critical neurons",
                "sparsity",
            ),
            ("sweep-layer-prune", "Layer-pruning rate", "P_L"),
        ] {
            let mut pts: Vec<(f64, f64, f64)> = self
                .evals
                .iter()
                .filter(|e| e.variant.group == group)
                .filter_map(|e| e.variant.param.map(|v| (v, e.hs, e.fa)))
                .collect();
            if pts.len() < 2 {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let series = [
                Series::line("HS (%)", pts.iter().map(|p| (p.0, p.1)).collect()),
                Series::line("FA (%)", pts.iter().map(|p| (p.0, p.2)).collect()),
            ];
            push(write_chart(
                &dir.join(group),
                &Chart {
                    title,
                    x_label: x,
                    y_label: "%",
                    kind: ChartKind::Lines,
                    series: &series,
                    x_ticks: None,
                },
            )?);
        }
        // Safety and foundation neurons per layer.
        let mut series = Vec::new();
        for (name, v) in &self.neurons {
            if let Some(per_layer) = v.get("per_layer").and_then(|x| x.as_array()) {
                let pts = per_layer
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i as f64, c.as_f64().unwrap_or(0.0)))
                    .collect();
                series.push(Series::line(name.clone(), pts));
            }
        }
        if !series.is_empty() {
            push(write_chart(
                &dir.join("neurons_per_layer"),
                &Chart {
                    title: "Neurons per layer",
                    x_label: "layer",
                    y_label: "neurons",
                    kind: ChartKind::Bars,
                    series: &series,
                    x_ticks: None,
                },
            )?);
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::{paired_sentence, perplexity_kept, Report, Row};
    use crate::eval::stats::Rate;

    /// A row of `label` in `group` with HS `hs` of 100 prompts and FA `fa` of 100 items.
    fn row(label: &str, group: &str, hs: usize, fa: usize) -> Row {
        let v = crate::experiment::plan::Variant {
            label: label.into(),
            group: group.into(),
            p: None,
            param: None,
            seed: 42,
            model: crate::experiment::plan::EvalModel {
                full_model: false,
                adapters: 0,
                deactivate: None,
                deactivate_foundation: false,
                random_draw: 0,
                perplexity: false,
            },
        };
        Row {
            variant: v,
            hs: hs as f64,
            fa: fa as f64,
            hs_keyword: hs as f64,
            n_harmful: 100,
            n_task: 100,
            stage: format!("eval-{label}"),
            hs_rate: Some(Rate::new(hs, 100)),
            hs_keyword_rate: Some(Rate::new(hs, 100)),
            hs_nondegenerate_rate: None,
            fa_rate: Some(Rate::new(fa, 100)),
            fa_strict_rate: None,
            or: None,
            or_rate: None,
            tokens_per_s: 0.0,
            projected: None,
            perplexity: None,
            perplexity_intervals: None,
            model_files: Default::default(),
        }
    }

    #[test]
    fn perplexity_kept_reads_the_ratios_interval() {
        let with = |ratio: [f64; 2]| {
            let mut r = row("SN-Tune", "neurons", 19, 52);
            r.perplexity = Some((84.0, 80.0));
            r.perplexity_intervals = Some(crate::experiment::stages::PerplexityIntervals {
                texts: 32,
                interval: Some([75.0, 94.0]),
                untouched_interval: Some([72.0, 89.0]),
                ratio_interval: Some(ratio),
            });
            perplexity_kept("SN-Tune", &r).unwrap()
        };
        assert_eq!(
            with([0.98, 1.09]),
            "SN-Tune perplexity 84.0 against the base model's 80.0 on the same 32 texts: \
             ratio ×1.050 [0.980, 1.090], unchanged within the interval (it holds 1)"
        );
        assert!(with([1.02, 1.09])
            .ends_with("higher than the base model's: the interval of the ratio excludes 1"));
        assert!(with([0.90, 0.99])
            .ends_with("lower than the base model's: the interval of the ratio excludes 1"));
        // No perplexity measured: no sentence.
        assert!(perplexity_kept("SN-Tune", &row("SN-Tune", "neurons", 19, 52)).is_none());
    }

    #[test]
    fn the_aligned_row_is_found_whichever_objective_trained_it() {
        for label in ["Aligned (W_a, DPO)", "Aligned (W_a, ORPO)"] {
            let report = Report {
                evals: vec![
                    row("Non-aligned", "alignment", 84, 26),
                    row(label, "alignment", 3, 57),
                ],
                identify: Default::default(),
                neurons: Default::default(),
                sn_tune: Default::default(),
                neuron_overlaps: vec![],
                against_random: vec![],
                diagnose: vec![],
                times: vec![],
                ps: vec![],
                seeds: vec![42],
                findings: vec![],
                unreadable: vec![],
                eval_sets: vec![],
                base_model: None,
                judge: "keyword".into(),
                judge_agreement: vec![],
                peak_rss_mib: None,
                host: None,
            };
            assert_eq!(report.aligned_label(), label);
            // Wilson intervals of 3/100 and 84/100: [1.0, 8.5] and [75.6, 89.9]
            assert_eq!(
                report.compare()[0],
                "aligned (HS 3.0 [1.0, 8.5]) is significantly below non-aligned \
                 (HS 84.0 [75.6, 89.9])"
            );
        }
    }

    #[test]
    fn paired_sentence_counts_signs_and_averages() {
        // the held-out three-seed run of 2026-12-04: NLSR (low-rank) 52.5 / 69.0 / 64.0
        // against random masks 54.0 / 69.0 / 66.0
        let d = [52.5 - 54.0, 69.0 - 69.0, 64.0 - 66.0];
        assert_eq!(
            paired_sentence("NLSR (low-rank) p=0.1", "NLSR (random)", &d),
            "NLSR (low-rank) p=0.1 against NLSR (random): HS lower at 2 of 3 seeds, level at 1, \
             higher at 0; mean difference -1.2 points (per seed: -1.5, +0.0, -2.0)"
        );
        assert_eq!(
            paired_sentence("A", "B", &[3.0]),
            "A against B: HS lower at 0 of 1 seeds, level at 0, higher at 1; mean difference \
             +3.0 points (per seed: +3.0)"
        );
        assert_eq!(
            paired_sentence("A", "B", &[]),
            "A against B: no seed has both rows"
        );
    }
}
