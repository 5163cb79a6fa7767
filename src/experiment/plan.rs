//! The stage graph of an experiment. Every stage is planned (and keyed) before anything runs,
//! so the run knows its length, and a stage's key covers its settings and its inputs' keys.

use serde::{Deserialize, Serialize};

use super::cache::key_of;
use super::config::{ExperimentConfig, StageTrain};
use super::stages::Inputs;
use crate::nlsr::transplant::TransplantMode;

/// The neurons an SN-Tune stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TunedSet {
    /// The safety set S (SN-Tune).
    Safety,
    /// S \ F, the safety neurons that are not foundation neurons (RSN-Tune).
    SafetyMinusFoundation,
    /// Control: a random set of S's structure ([`crate::neurons::random_like`], the run's
    /// seed): are the detected neurons better to train than any as many?
    RandomLike,
    /// Control: as many of the most important foundation neurons outside S
    /// ([`crate::neurons::deactivate::foundation_like`]): are they better to train than
    /// equally important neurons that are not safety neurons?
    FoundationLike,
}

/// What a stage does. Stage inputs are the plan's `deps`, in the order documented per kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageKind {
    /// LoRA training. deps: `[init adapter?] [mix?] [full model?]` as flagged.
    Train {
        /// The run's settings.
        settings: StageTrain,
        /// Continue the adapter of the first dep (else a new adapter).
        init: bool,
        /// Train on the mix of the next dep (else `settings.data`).
        mix: bool,
        /// Start from the full model of the last dep (else the base model).
        full_model: bool,
    },
    /// The attack's data: `round(n p)` harmful rows among task rows. deps: none.
    Mix {
        /// Harmful fraction.
        p: f64,
        /// Rows.
        n: usize,
        /// Task source.
        task: String,
        /// Harmful source.
        harmful: String,
    },
    /// NLSR pre-amplification `W_e = W_a + beta (W_a - W_0)`. deps: `[W_a, W_0]`.
    Amplify {
        /// Strength.
        beta: f64,
    },
    /// Safety-critical neurons of a reference adapter. deps: `[reference]`.
    Identify {
        /// Method name (`low-rank`, `wanda`, ...).
        method: String,
        /// Sparsity.
        sparsity: f64,
        /// Corpus rows used.
        samples: usize,
        /// Corpus.
        data: String,
    },
    /// NLSR repair. deps: `[reference, fine-tuned, masks]`.
    Patch {
        /// Layer-pruning rate `P_L`.
        layer_prune: f64,
        /// `ε`.
        epsilon: f64,
        /// How repaired modules are rebuilt: the paper's entry replacement, or the `shrink`
        /// control (`nlsr.shrink_control`).
        #[serde(default)]
        transplant: TransplantMode,
    },
    /// Safe LoRA on the fine-tuning update `W_t − W_a` (the rank-2r adapter
    /// `[B_t | −B_a]`, `[A_t; A_a]`); the output is the projected update, evaluated on top of
    /// `W_a`. deps: `[aligned, fine-tuned]`.
    SafeLora {
        /// Cosine threshold.
        threshold: f64,
    },
    /// A training-free peer's repair (RESTA, SafeMERGE, Antidote;
    /// [`super::baselines`]); the output is an adapter on the base model. deps:
    /// `[aligned, fine-tuned]`.
    Baseline {
        /// The method and its settings.
        method: super::baselines::Baseline,
    },
    /// `realign diagnose` of a fine-tune against the aligned adapter (adapters only, changing
    /// nothing): the intake statistics a provider would read before any repair. deps:
    /// `[aligned, fine-tuned]`.
    Diagnose {
        /// The attack's harmful fraction (for the report's ranking by `p`).
        p: f64,
    },
    /// Neuron detection on the base model, or on base + the adapter of the only dep.
    Detect {
        /// Whether the first dep is an adapter merged before detection.
        adapter: bool,
        /// Corpus.
        corpus: String,
        /// Prompts used.
        prompts: usize,
        /// Pooled per-layer top-k (0: per kind).
        top_k: usize,
        /// Per-kind attention top-k (0: the paper's, scaled).
        top_k_attn: usize,
        /// Per-kind FFN top-k (0: the paper's, scaled).
        top_k_ffn: usize,
        /// Which tokens count.
        tokens: crate::neurons::TokenScope,
    },
    /// SN-Tune of the base model on the set that `set` names: deps `[safety]`, or
    /// `[safety, foundation]` for [`TunedSet::SafetyMinusFoundation`] (RSN-Tune) and
    /// [`TunedSet::FoundationLike`].
    SnTune {
        /// Refusal documents.
        data: String,
        /// Documents used.
        docs: usize,
        /// Learning rate.
        lr: f64,
        /// Epochs.
        epochs: usize,
        /// Which neurons are trained.
        set: TunedSet,
    },
    /// Evaluation of one model. deps: `[full model?] adapters... [neuron set?]`. Variants
    /// that name the same model share one evaluation.
    Eval {
        /// The model evaluated.
        model: EvalModel,
    },
}

/// The model of an evaluation: the base or a full model from a stage, adapters, maybe
/// deactivated neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalModel {
    /// The first dep is a full model folder (SN-Tune output).
    pub full_model: bool,
    /// How many deps (after the full model) are adapters.
    pub adapters: usize,
    /// The set dep (after the adapters) is a neuron set to switch off: `Some(false)` as is,
    /// `Some(true)` as an equal-size random set (Deact-R).
    pub deactivate: Option<bool>,
    /// Instead, switch off as many of the most important foundation neurons outside the set
    /// (Deact-F): the dep after the set is a foundation detection (its importance ranking).
    #[serde(default)]
    pub deactivate_foundation: bool,
    /// Which draw of the random set (Deact-R): its seed is the run's seed plus this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub random_draw: u64,
    /// Measure perplexity on the general-text rows, against the base model's on the same
    /// texts (SN-Tune, RSN-Tune, their controls and fine-tunes: issue 12 asks that SN-Tune keep
    /// it). Deactivation rows measure it anyway, against the model before deactivation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub perplexity: bool,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// A row of the report: a label and group for one evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Row label, e.g. `NLSR (low-rank)`.
    pub label: String,
    /// Report group: `alignment`, `attack`, `safelora`, `baseline`, `nlsr`, `nlsr-no-amp`, `sweep-beta`,
    /// `sweep-sparsity`, `sweep-layer-prune`, `neurons`.
    pub group: String,
    /// The attack's `p`, if the variant is an attacked model.
    pub p: Option<f64>,
    /// The swept value, in sweep groups.
    pub param: Option<f64>,
    /// The seed of the attack-to-repair chain the row belongs to (the experiment seed for
    /// alignment rows). Rows of seeds other than the first have ` seed=S` in their label.
    #[serde(default)]
    pub seed: u64,
    /// The evaluated model.
    pub model: EvalModel,
}

/// One planned stage.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Unique name, e.g. `attack-p0.1`.
    pub name: String,
    /// What it does.
    pub kind: StageKind,
    /// Indices of the stages it reads.
    pub deps: Vec<usize>,
    /// The seed it runs with (data order, mixing, random masks, layer pruning).
    pub seed: u64,
    /// Its cache key (hex SHA-256).
    pub key: String,
}

/// The ordered stages and the report's rows.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// In run order (deps before dependants).
    pub stages: Vec<Stage>,
    /// Report rows and the index of their evaluation stage.
    pub variants: Vec<(Variant, usize)>,
}

impl Plan {
    fn add(
        &mut self,
        inputs: &Inputs,
        name: String,
        kind: StageKind,
        deps: Vec<usize>,
    ) -> crate::Result<usize> {
        self.add_seeded(inputs, name, kind, deps, inputs.seed)
    }

    /// Adds a stage (or finds the identical one already planned) and returns its index. Its key
    /// covers the code ([`Inputs::code`]), the base model, the seed, the settings, the data
    /// digests and the keys of its deps.
    fn add_seeded(
        &mut self,
        inputs: &Inputs,
        name: String,
        kind: StageKind,
        deps: Vec<usize>,
        seed: u64,
    ) -> crate::Result<usize> {
        let mut sources = Vec::new();
        match &kind {
            StageKind::Train { settings, mix, .. } if !mix => sources.push(settings.data.clone()),
            StageKind::Mix { task, harmful, .. } => {
                sources.push(task.clone());
                sources.push(harmful.clone());
            }
            StageKind::Identify { data, method, .. } if method != "random" => {
                sources.push(data.clone())
            }
            StageKind::Detect { corpus, .. } => sources.push(corpus.clone()),
            StageKind::SnTune { data, .. } => sources.push(data.clone()),
            // Antidote prunes by Wanda scores on its realignment rows.
            StageKind::Baseline {
                method: super::baselines::Baseline::Antidote { data, .. },
            } => sources.push(data.clone()),
            StageKind::Eval { model } => {
                sources.push(inputs.eval.harmful.clone());
                sources.push(inputs.eval.task.clone());
                if !inputs.eval.overrefusal.is_empty() {
                    sources.push(inputs.eval.overrefusal.clone());
                }
                // A deactivation row, or a row that asks, also measures perplexity on the
                // general-text rows.
                if (model.deactivate.is_some() || model.perplexity)
                    && !inputs.perplexity_source.is_empty()
                {
                    sources.push(inputs.perplexity_source.clone());
                }
            }
            _ => {}
        }
        let digests = sources
            .iter()
            .map(|s| inputs.data_digest(s))
            .collect::<crate::Result<Vec<_>>>()?;
        let material = serde_json::json!({
            "code": inputs.code,
            "model": inputs.model_digest,
            "seed": seed,
            "stage": kind,
            "eval": matches!(kind, StageKind::Eval { .. }).then_some(&inputs.eval),
            // The judge's content (a judge model, a rubric file) only decides the verdicts
            // of evaluations: it is part of their keys alone, so a new judge reruns no training.
            "judge": matches!(kind, StageKind::Eval { .. }).then_some(&inputs.judge_digest),
            "data": digests,
            "deps": deps.iter().map(|&d| self.stages[d].key.clone()).collect::<Vec<_>>(),
        });
        let key = key_of(&material);
        if let Some(i) = self.stages.iter().position(|s| s.key == key) {
            return Ok(i);
        }
        if let Some(other) = self.stages.iter().find(|s| s.name == name) {
            return Err(super::ExperimentError::Stage {
                stage: name,
                what: format!(
                    "planned twice with different inputs (key {} vs {})",
                    other.key, key
                ),
            }
            .into());
        }
        self.stages.push(Stage {
            name,
            kind,
            deps,
            seed,
            key,
        });
        Ok(self.stages.len() - 1)
    }

    /// The index of the stage called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// The plan restricted to the stages with `keep[i]` (a run in progress: its finished
    /// stages), in the same order, with dependency indices and report rows renumbered. A
    /// stage whose dependency is not kept is dropped too (it cannot have finished without it),
    /// and so is a report row whose evaluation stage is dropped. Also returns, per kept stage,
    /// its index in `self`.
    pub fn restricted(&self, keep: &[bool]) -> (Plan, Vec<usize>) {
        let mut index = vec![None; self.stages.len()];
        let mut out = Plan::default();
        let mut kept = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            if !keep.get(i).copied().unwrap_or(false) {
                continue;
            }
            let deps: Option<Vec<usize>> = s.deps.iter().map(|&d| index[d]).collect();
            let Some(deps) = deps else { continue };
            index[i] = Some(out.stages.len());
            kept.push(i);
            out.stages.push(Stage { deps, ..s.clone() });
        }
        out.variants = self
            .variants
            .iter()
            .filter_map(|(v, i)| Some((v.clone(), index[*i]?)))
            .collect();
        (out, kept)
    }
}

pub(crate) fn fmt_num(x: f64) -> String {
    format!("{x}")
}

fn eval_variant(
    plan: &mut Plan,
    inputs: &Inputs,
    v: Variant,
    deps: Vec<usize>,
) -> crate::Result<usize> {
    let name = format!("eval-{}", slug(&v.label));
    let i = plan.add(inputs, name, StageKind::Eval { model: v.model }, deps)?;
    plan.variants.push((v, i));
    Ok(i)
}

/// The label of the deactivation row (the aligned model with its safety set zeroed).
pub const DEACT_SN: &str = "Aligned, Deact-SN";
/// The label of the random control's first draw; later draws add " (draw N)".
pub const DEACT_R: &str = "Aligned, Deact-R";
/// The SN-Tune control trained on a random set of the safety set's structure.
pub const SN_TUNE_RANDOM: &str = "SN-Tune, random set (control)";
/// The SN-Tune control trained on as many important foundation neurons outside the set.
pub const SN_TUNE_FOUNDATION: &str = "SN-Tune, foundation set (control)";

/// A file-name-safe form of a label.
pub fn slug(label: &str) -> String {
    let mut s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    s.trim_matches('-').to_string()
}

fn variant(
    label: String,
    group: &str,
    p: Option<f64>,
    param: Option<f64>,
    adapters: usize,
) -> Variant {
    Variant {
        label,
        group: group.into(),
        p,
        param,
        seed: 0,
        model: EvalModel {
            full_model: false,
            adapters,
            deactivate: None,
            deactivate_foundation: false,
            random_draw: 0,
            perplexity: false,
        },
    }
}

/// The seeds of the attack-to-repair chain: `cfg.seeds`, or `[cfg.seed]`.
pub fn chain_seeds(cfg: &ExperimentConfig) -> Vec<u64> {
    if cfg.seeds.is_empty() {
        vec![cfg.seed]
    } else {
        cfg.seeds.clone()
    }
}

/// The label of the aligned model's row, after the objective that trained it: "Aligned (W_a,
/// DPO)" for the default, "Aligned (W_a, ORPO)" with `align.dpo.method = "orpo"`. The report
/// finds the row by its prefix, [`ALIGNED`].
pub fn aligned_label(cfg: &ExperimentConfig) -> String {
    format!("{ALIGNED}, {})", cfg.align.dpo.method_name())
}

/// The start of the aligned model's label (see [`aligned_label`]).
pub const ALIGNED: &str = "Aligned (W_a";

/// Plans every stage of `cfg`.
///
/// Rows: the non-aligned base, `W_0`, `W_a` (also the "discard the fine-tune" control) and
/// `W_e`; then, per seed of [`chain_seeds`] and per `p`: the attacked model, Safe LoRA on the
/// fine-tuning update, the other training-free repairs (`baselines`), and NLSR per
/// identification method (with pre-amplification, and
/// without when `nlsr.without_amplification`); sweeps at the main `p` and seed; the
/// safety-neuron half.
pub fn build(cfg: &ExperimentConfig, inputs: &Inputs) -> crate::Result<Plan> {
    let mut plan = Plan::default();
    let train = |settings: &StageTrain, init: bool, mix: bool, full_model: bool| StageKind::Train {
        settings: settings.clone(),
        init,
        mix,
        full_model,
    };
    let seeds = chain_seeds(cfg);
    let main_seed = seeds[0];
    let with_seed = |mut v: Variant, seed: u64| {
        v.seed = seed;
        if seed != main_seed {
            v.label = format!("{} seed={seed}", v.label);
        }
        v
    };

    // Alignment.
    let sft = plan.add(
        inputs,
        "sft".into(),
        train(&cfg.align.sft, false, false, false),
        vec![],
    )?;
    let dpo = plan.add(
        inputs,
        "dpo".into(),
        train(&cfg.align.dpo, true, false, false),
        vec![sft],
    )?;
    for (label, deps) in [
        ("Non-aligned".to_string(), vec![]),
        ("SFT (W_0)".to_string(), vec![sft]),
        (aligned_label(cfg), vec![dpo]),
    ] {
        if label == "SFT (W_0)" && !cfg.eval.intermediate {
            continue;
        }
        let n = deps.len();
        eval_variant(
            &mut plan,
            inputs,
            with_seed(variant(label, "alignment", None, None, n), main_seed),
            deps,
        )?;
    }

    // References: W_e per beta (beta 0: W_a itself).
    let mut references = Vec::new();
    for &beta in &cfg.nlsr.betas {
        let r = if beta == 0.0 {
            dpo
        } else {
            plan.add(
                inputs,
                format!("amplify-b{}", fmt_num(beta)),
                StageKind::Amplify { beta },
                vec![dpo, sft],
            )?
        };
        references.push((beta, r));
    }
    let main_beta = references[0];
    // The amplified reference itself: the first beta > 0 (the main one or a sweep point).
    if let (Some(&amplified), true) = (
        references.iter().find(|(b, _)| *b != 0.0),
        cfg.eval.intermediate,
    ) {
        eval_variant(
            &mut plan,
            inputs,
            with_seed(
                variant(
                    format!("Amplified (W_e, beta={})", fmt_num(amplified.0)),
                    "alignment",
                    None,
                    None,
                    1,
                ),
                main_seed,
            ),
            vec![amplified.1],
        )?;
    }
    // Identification: seeded only for the random control (the others are deterministic).
    let identify =
        |plan: &mut Plan, method: &str, sparsity: f64, reference: usize, tag: &str, seed: u64| {
            let seed = if method == "random" { seed } else { main_seed };
            let suffix = if seed == main_seed {
                String::new()
            } else {
                format!("-seed{seed}")
            };
            plan.add_seeded(
                inputs,
                format!("identify-{method}-s{}-{tag}{suffix}", fmt_num(sparsity)),
                StageKind::Identify {
                    method: method.into(),
                    sparsity,
                    samples: cfg.nlsr.identify_samples,
                    data: cfg.nlsr.identify_data.clone(),
                },
                vec![reference],
                seed,
            )
        };
    let s_main = cfg.nlsr.sparsities[0];
    let lp_main = cfg.nlsr.layer_prunes[0];
    let tau_main = cfg.safelora.thresholds[0];
    let patch_kind = |lp: f64| StageKind::Patch {
        layer_prune: lp,
        epsilon: cfg.nlsr.epsilon,
        transplant: TransplantMode::Replace,
    };
    let suffix = |seed: u64| {
        if seed == main_seed {
            String::new()
        } else {
            format!("-seed{seed}")
        }
    };

    // Attack, Safe LoRA and NLSR per seed and p.
    let mut attacks = Vec::new();
    for &seed in &seeds {
        let ss = suffix(seed);
        for &p in &cfg.attack.ps {
            let pt = fmt_num(p);
            let mix = plan.add_seeded(
                inputs,
                format!("mix-p{pt}{ss}"),
                StageKind::Mix {
                    p,
                    n: cfg.attack.n,
                    task: cfg.attack.task.clone(),
                    harmful: cfg.attack.harmful.clone(),
                },
                vec![],
                seed,
            )?;
            let att = plan.add_seeded(
                inputs,
                format!("attack-p{pt}{ss}"),
                train(&cfg.attack.train, true, true, false),
                vec![dpo, mix],
                seed,
            )?;
            if seed == main_seed {
                attacks.push((p, att));
            }
            plan.add_seeded(
                inputs,
                format!("diagnose-p{pt}{ss}"),
                StageKind::Diagnose { p },
                vec![dpo, att],
                seed,
            )?;
            eval_variant(
                &mut plan,
                inputs,
                with_seed(
                    variant(format!("Attacked p={pt}"), "attack", Some(p), None, 1),
                    seed,
                ),
                vec![att],
            )?;
            let sl = plan.add_seeded(
                inputs,
                format!("safelora-t{}-p{pt}{ss}", fmt_num(tau_main)),
                StageKind::SafeLora {
                    threshold: tau_main,
                },
                vec![dpo, att],
                seed,
            )?;
            eval_variant(
                &mut plan,
                inputs,
                with_seed(
                    variant(format!("Safe LoRA p={pt}"), "safelora", Some(p), None, 2),
                    seed,
                ),
                vec![dpo, sl],
            )?;
            for b in cfg.baselines.baselines() {
                let repaired = plan.add_seeded(
                    inputs,
                    format!("{}-p{pt}{ss}", b.name()),
                    StageKind::Baseline { method: b.clone() },
                    vec![dpo, att],
                    seed,
                )?;
                eval_variant(
                    &mut plan,
                    inputs,
                    with_seed(
                        variant(
                            format!("{} p={pt}", b.label()),
                            "baseline",
                            Some(p),
                            None,
                            1,
                        ),
                        seed,
                    ),
                    vec![repaired],
                )?;
            }
            for (mi, method) in cfg.nlsr.methods.iter().enumerate() {
                let mut refs = vec![("nlsr", format!("b{}", fmt_num(main_beta.0)), main_beta.1)];
                // the ablation without pre-amplification: for the main (first) method only
                if cfg.nlsr.without_amplification && main_beta.0 != 0.0 && mi == 0 {
                    refs.push(("nlsr-no-amp", "b0".to_string(), dpo));
                }
                for (group, tag, reference) in refs {
                    let masks = identify(&mut plan, method, s_main, reference, &tag, seed)?;
                    let patched = plan.add_seeded(
                        inputs,
                        format!(
                            "patch-{method}-s{}-{tag}-lp{}-p{pt}{ss}",
                            fmt_num(s_main),
                            fmt_num(lp_main)
                        ),
                        patch_kind(lp_main),
                        vec![reference, att, masks],
                        seed,
                    )?;
                    let label = if group == "nlsr" {
                        format!("NLSR ({method}) p={pt}")
                    } else {
                        format!("NLSR ({method}, no pre-amplification) p={pt}")
                    };
                    eval_variant(
                        &mut plan,
                        inputs,
                        with_seed(variant(label, group, Some(p), None, 1), seed),
                        vec![patched],
                    )?;
                }
            }
            // The shrink control, at the main p and seed (one evaluation): the first method's
            // modules and mask densities, each factor moved toward the reference by its density
            // instead of taking the masked entries.
            let main_p = cfg.attack.ps.first() == Some(&p) && seed == main_seed;
            if let Some(method) = cfg
                .nlsr
                .methods
                .first()
                .filter(|m| cfg.nlsr.shrink_control && main_p && m.as_str() != "random")
            {
                let tag = format!("b{}", fmt_num(main_beta.0));
                let masks = identify(&mut plan, method, s_main, main_beta.1, &tag, seed)?;
                let shrunk = plan.add_seeded(
                    inputs,
                    format!(
                        "patch-{method}-s{}-{tag}-lp{}-p{pt}{ss}-shrink",
                        fmt_num(s_main),
                        fmt_num(lp_main)
                    ),
                    StageKind::Patch {
                        layer_prune: lp_main,
                        epsilon: cfg.nlsr.epsilon,
                        transplant: TransplantMode::Shrink,
                    },
                    vec![main_beta.1, att, masks],
                    seed,
                )?;
                eval_variant(
                    &mut plan,
                    inputs,
                    with_seed(
                        variant(format!("NLSR (shrink) p={pt}"), "nlsr", Some(p), None, 1),
                        seed,
                    ),
                    vec![shrunk],
                )?;
            }
        }
    }

    // Sweeps at the main p and seed with the first method.
    if let (Some(method), Some(&(p, att))) = (cfg.nlsr.methods.first(), attacks.first()) {
        let pt = fmt_num(p);
        let sweep = |plan: &mut Plan,
                     method: &str,
                     group: &str,
                     param: f64,
                     reference: usize,
                     rtag: &str,
                     s: f64,
                     lp: f64|
         -> crate::Result<()> {
            let masks = identify(plan, method, s, reference, rtag, main_seed)?;
            let patched = plan.add(
                inputs,
                format!(
                    "patch-{method}-s{}-{rtag}-lp{}-p{pt}",
                    fmt_num(s),
                    fmt_num(lp)
                ),
                patch_kind(lp),
                vec![reference, att, masks],
            )?;
            let label = format!("NLSR ({method}) p={pt} {group}={}", fmt_num(param));
            eval_variant(
                plan,
                inputs,
                with_seed(
                    variant(label, &format!("sweep-{group}"), Some(p), Some(param), 1),
                    main_seed,
                ),
                vec![patched],
            )?;
            Ok(())
        };
        for &(beta, r) in &references {
            sweep(
                &mut plan,
                method,
                "beta",
                beta,
                r,
                &format!("b{}", fmt_num(beta)),
                s_main,
                lp_main,
            )?;
        }
        let rtag = format!("b{}", fmt_num(main_beta.0));
        // Each sparsity also with random masks of the same density when `random` is a method:
        // the control that says whether the identified neurons matter at that density.
        let control = cfg
            .nlsr
            .methods
            .iter()
            .find(|m| m.as_str() == "random" && m.as_str() != method.as_str());
        for &s in &cfg.nlsr.sparsities {
            for m in std::iter::once(method).chain(control) {
                sweep(&mut plan, m, "sparsity", s, main_beta.1, &rtag, s, lp_main)?;
            }
        }
        for &lp in &cfg.nlsr.layer_prunes {
            sweep(
                &mut plan,
                method,
                "layer-prune",
                lp,
                main_beta.1,
                &rtag,
                s_main,
                lp,
            )?;
        }
        for &tau in &cfg.safelora.thresholds {
            let sl = plan.add(
                inputs,
                format!("safelora-t{}-p{pt}", fmt_num(tau)),
                StageKind::SafeLora { threshold: tau },
                vec![dpo, att],
            )?;
            eval_variant(
                &mut plan,
                inputs,
                with_seed(
                    variant(
                        format!("Safe LoRA p={pt} tau={}", fmt_num(tau)),
                        "sweep-safelora-tau",
                        Some(p),
                        Some(tau),
                        2,
                    ),
                    main_seed,
                ),
                vec![dpo, sl],
            )?;
        }
    }

    if cfg.neurons.enabled {
        plan_neurons(&mut plan, cfg, inputs, dpo)?;
    }
    Ok(plan)
}

fn plan_neurons(
    plan: &mut Plan,
    cfg: &ExperimentConfig,
    inputs: &Inputs,
    aligned: usize,
) -> crate::Result<()> {
    let n = &cfg.neurons;
    let detect = |plan: &mut Plan, name: &str, corpus: &str, adapter: Option<usize>| {
        plan.add(
            inputs,
            name.into(),
            StageKind::Detect {
                adapter: adapter.is_some(),
                corpus: corpus.into(),
                prompts: n.prompts,
                top_k: n.top_k,
                top_k_attn: n.top_k_attn,
                top_k_ffn: n.top_k_ffn,
                tokens: n.tokens,
            },
            adapter.into_iter().collect(),
        )
    };
    // The deactivation check needs a safe model: the aligned one (base + W_a).
    let aligned_safety = detect(plan, "neurons-safety-aligned", &n.corpus, Some(aligned))?;
    // SN-Tune and RSN-Tune strengthen the base model's own safety neurons.
    let safety = detect(plan, "neurons-safety", &n.corpus, None)?;
    let foundation = detect(plan, "neurons-foundation", &n.general, None)?;
    let neuron_variant = |label: &str, full_model: bool, deactivate: Option<bool>| Variant {
        label: label.into(),
        group: "neurons".into(),
        p: None,
        param: None,
        seed: cfg.seed,
        model: EvalModel {
            full_model,
            adapters: 0,
            deactivate,
            deactivate_foundation: false,
            random_draw: 0,
            // The tuned models are compared with the base model's perplexity; the
            // deactivated ones with the model's before deactivation.
            perplexity: deactivate.is_none(),
        },
    };
    for (label, random) in [(DEACT_SN, false), (DEACT_R, true)] {
        let mut v = neuron_variant(label, false, Some(random));
        v.model.adapters = 1;
        eval_variant(plan, inputs, v, vec![aligned, aligned_safety])?;
    }
    // More draws of the random control: one draw is one sample of what zeroing any such set
    // does, and on a lightly aligned model that spread is wide.
    for draw in 1..n.random_draws.max(1) as u64 {
        let label = format!("{DEACT_R} (draw {})", draw + 1);
        let mut v = neuron_variant(&label, false, Some(true));
        v.model.adapters = 1;
        v.model.random_draw = draw;
        eval_variant(plan, inputs, v, vec![aligned, aligned_safety])?;
    }
    // Deact-F: as many of the aligned model's most important general-text neurons outside the
    // safety set (separates "safety" from "generally important").
    let aligned_foundation = detect(
        plan,
        "neurons-foundation-aligned",
        &n.general,
        Some(aligned),
    )?;
    let mut v = neuron_variant("Aligned, Deact-F", false, Some(false));
    v.model.adapters = 1;
    v.model.deactivate_foundation = true;
    eval_variant(
        plan,
        inputs,
        v,
        vec![aligned, aligned_safety, aligned_foundation],
    )?;
    let tune = |set: TunedSet, lr: f64| StageKind::SnTune {
        data: n.tune_data.clone(),
        docs: n.tune_docs,
        lr,
        epochs: n.tune_epochs,
        set,
    };
    let sn = plan.add(
        inputs,
        "sn-tune".into(),
        tune(TunedSet::Safety, n.tune_lr),
        vec![safety],
    )?;
    let rsn = plan.add(
        inputs,
        "rsn-tune".into(),
        tune(TunedSet::SafetyMinusFoundation, n.rsn_tune_lr()),
        vec![safety, foundation],
    )?;
    eval_variant(
        plan,
        inputs,
        neuron_variant("SN-Tune", true, None),
        vec![sn],
    )?;
    eval_variant(
        plan,
        inputs,
        neuron_variant("RSN-Tune", true, None),
        vec![rsn],
    )?;
    if n.tune_controls {
        // The same documents and rate on sets of S's size that are not S's choice.
        for (label, name, set, deps) in [
            (
                SN_TUNE_RANDOM,
                "sn-tune-random",
                TunedSet::RandomLike,
                vec![safety],
            ),
            (
                SN_TUNE_FOUNDATION,
                "sn-tune-foundation",
                TunedSet::FoundationLike,
                vec![safety, foundation],
            ),
        ] {
            let stage = plan.add(inputs, name.into(), tune(set, n.tune_lr), deps)?;
            eval_variant(plan, inputs, neuron_variant(label, true, None), vec![stage])?;
        }
    }

    // Robustness (the paper's Table 4): fine-tune each model on plain task data (p = 0).
    // Its own name: the attack's `mix-p0` (n = attack.n) is another stage when p = 0 is in
    // `attack.ps`.
    let mix = plan.add(
        inputs,
        "mix-task-ft".into(),
        StageKind::Mix {
            p: 0.0,
            n: if n.finetune_rows > 0 {
                n.finetune_rows
            } else {
                cfg.attack.n
            },
            task: cfg.attack.task.clone(),
            harmful: cfg.attack.harmful.clone(),
        },
        vec![],
    )?;
    let settings = &cfg.attack.train;
    let kind = |full_model: bool| StageKind::Train {
        settings: settings.clone(),
        init: false,
        mix: true,
        full_model,
    };
    let base_ft = plan.add(inputs, "task-ft-base".into(), kind(false), vec![mix])?;
    let mut v = neuron_variant("Non-aligned + task fine-tuning", false, None);
    v.model.adapters = 1;
    eval_variant(plan, inputs, v, vec![base_ft])?;
    for (label, model) in [("SN-Tune", sn), ("RSN-Tune", rsn)] {
        let ft = plan.add(
            inputs,
            format!("task-ft-{}", slug(label)),
            kind(true),
            vec![mix, model],
        )?;
        let mut v = neuron_variant(&format!("{label} + task fine-tuning"), true, None);
        v.model.adapters = 1;
        eval_variant(plan, inputs, v, vec![model, ft])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration whose every data source is the file `data`.
    fn config(data: &std::path::Path) -> ExperimentConfig {
        let d = data.display().to_string();
        let mut cfg = ExperimentConfig::default();
        cfg.align.sft.data = d.clone();
        cfg.align.dpo.data = d.clone();
        cfg.attack.task = d.clone();
        cfg.attack.harmful = d.clone();
        cfg.nlsr.identify_data = d.clone();
        cfg.neurons.enabled = false;
        cfg.eval.harmful = d.clone();
        cfg.eval.task = d.clone();
        cfg.eval.overrefusal = d;
        cfg
    }

    fn keys(cfg: &ExperimentConfig, code: &str) -> Vec<(String, String)> {
        let inputs = Inputs::new(
            code.into(),
            "model".into(),
            "digest".into(),
            cfg.seed,
            cfg.eval.clone(),
        );
        build(cfg, &inputs)
            .unwrap()
            .stages
            .into_iter()
            .map(|s| (s.name, s.key))
            .collect()
    }

    #[test]
    fn a_changed_source_hash_changes_every_stage_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
        let cfg = config(&data);
        let a = keys(&cfg, "code-a");
        assert_eq!(a, keys(&cfg, "code-a"), "keys are deterministic");
        let b = keys(&cfg, "code-b");
        assert_eq!(a.len(), b.len());
        for ((na, ka), (nb, kb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_ne!(ka, kb, "{na} kept its key after a code change");
        }
        // the built-in hash is a SHA-256
        assert_eq!(env!("REALIGN_SOURCE_HASH").len(), 64);
    }

    #[test]
    fn the_full_default_plans_with_its_neurons_half_and_p_0() {
        use crate::experiment::config::NeuronSettings;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
        let mut cfg = config(&data);
        let d = data.display().to_string();
        cfg.neurons = NeuronSettings {
            corpus: d.clone(),
            general: d.clone(),
            tune_data: d,
            ..NeuronSettings::default()
        };
        assert!(cfg.neurons.enabled && cfg.attack.ps.contains(&0.0));
        let inputs = Inputs::new("c".into(), "m".into(), "d".into(), 42, cfg.eval.clone());
        let plan = build(&cfg, &inputs).unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"mix-p0") && names.contains(&"mix-task-ft"));
        let task_ft = plan
            .stages
            .iter()
            .find(|s| s.name == "mix-task-ft")
            .unwrap();
        assert!(matches!(task_ft.kind, StageKind::Mix { p, n: 200, .. } if p == 0.0));
    }

    #[test]
    fn the_aligned_row_and_stage_follow_the_alignment_objective() {
        use crate::train::objectives::Objective;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
        for (method, label, objective) in [
            ("dpo", "Aligned (W_a, DPO)", Objective::Dpo { beta: 0.1 }),
            (
                "orpo",
                "Aligned (W_a, ORPO)",
                Objective::Orpo { lambda: 0.1 },
            ),
        ] {
            let mut cfg = config(&data);
            cfg.align.dpo.method = method.into();
            cfg.align.dpo.beta = None;
            let inputs = Inputs::new("c".into(), "m".into(), "d".into(), 42, cfg.eval.clone());
            let plan = build(&cfg, &inputs).unwrap();
            let aligned: Vec<&str> = plan
                .variants
                .iter()
                .filter(|(v, _)| v.group == "alignment" && v.label.starts_with(ALIGNED))
                .map(|(v, _)| v.label.as_str())
                .collect();
            assert_eq!(aligned, [label]);
            // the stage keeps its folder name (scripts look for `dpo-…`) and trains `objective`
            let stage = plan.stages.iter().find(|s| s.name == "dpo").unwrap();
            let StageKind::Train { settings, .. } = &stage.kind else {
                panic!("the dpo stage trains")
            };
            let train = crate::experiment::stages::train_config(
                settings,
                None,
                "d",
                std::path::Path::new("o"),
                42,
            )
            .unwrap();
            assert_eq!(train.objective, objective, "{method}");
        }
    }

    #[test]
    fn seeds_plan_one_chain_each_and_share_the_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
        let mut cfg = config(&data);
        cfg.attack.ps = vec![0.1];
        cfg.seeds = vec![42, 7];
        let inputs = Inputs::new("c".into(), "m".into(), "d".into(), 42, cfg.eval.clone());
        let plan = build(&cfg, &inputs).unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.iter().filter(|n| n.starts_with("sft")).count(), 1);
        assert!(names.contains(&"attack-p0.1") && names.contains(&"attack-p0.1-seed7"));
        assert!(names.contains(&"identify-random-s0.2-b0-seed7"));
        // low-rank identification is deterministic: one stage for both seeds
        assert!(!names
            .iter()
            .any(|n| n.starts_with("identify-low-rank") && n.ends_with("seed7")));
        let labels: Vec<&str> = plan
            .variants
            .iter()
            .map(|(v, _)| v.label.as_str())
            .collect();
        for want in [
            "Attacked p=0.1",
            "Attacked p=0.1 seed=7",
            "Safe LoRA p=0.1 seed=7",
            "NLSR (random) p=0.1 seed=7",
            "Amplified (W_e, beta=0.9)",
        ] {
            assert!(labels.contains(&want), "{want} missing from {labels:?}");
        }
        let seed7 = plan
            .stages
            .iter()
            .find(|s| s.name == "mix-p0.1-seed7")
            .unwrap();
        assert_eq!(seed7.seed, 7);
        // Safe LoRA rows evaluate W_a plus the projected update
        let (v, i) = plan
            .variants
            .iter()
            .find(|(v, _)| v.label == "Safe LoRA p=0.1")
            .unwrap();
        assert_eq!(v.model.adapters, 2);
        assert_eq!(plan.stages[plan.stages[*i].deps[0]].name, "dpo");
    }
}
