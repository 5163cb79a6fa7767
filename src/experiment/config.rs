//! The experiment file (`realign experiment CONFIG.toml`): every setting of every stage, with
//! the embedded default (SmolLM2-135M-Instruct + the shipped data) as the default of each key.
//!
//! ```toml
//! output = "runs/experiment"
//! seed = 42
//! [attack]
//! ps = [0.05, 0.1, 0.2]
//! [nlsr]
//! betas = [0.9, 0.5, 1.5]
//! ```
//!
//! Unknown keys are errors (a typo must not silently fall back to a default).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ExperimentError;

/// The whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    /// Base model (HF folder or GGUF); `None`: the embedded SmolLM2-135M-Instruct.
    pub model: Option<PathBuf>,
    /// Where stages, the report and the log go.
    pub output: PathBuf,
    /// Seed of every stage (data order, mixing, layer pruning, random sets).
    pub seed: u64,
    /// Seeds of the attack-to-repair chain (mix, attack, Safe LoRA, identification, NLSR and
    /// their evaluations); the alignment is trained once with `seed`. Empty: `[seed]`. With
    /// several, the report gives every row per seed and the mean ± standard deviation.
    pub seeds: Vec<u64>,
    /// Alignment: the weak adapter `W_0` (SFT) and the aligned adapter `W_a` (DPO by default;
    /// `align.dpo.method` chooses another preference objective).
    pub align: AlignSettings,
    /// The harmful fine-tuning attack `W_t`, one per `p`.
    pub attack: AttackSettings,
    /// NLSR and its sweeps.
    pub nlsr: NlsrSettings,
    /// The Safe LoRA baseline.
    pub safelora: SafeLoraSettings,
    /// The other training-free repairs (RESTA, SafeMERGE, Antidote), one row each per `p`.
    pub baselines: super::baselines::BaselineSettings,
    /// Safety neurons: detection, deactivation, SN-Tune, RSN-Tune.
    pub neurons: NeuronSettings,
    /// How every variant is evaluated.
    pub eval: EvalSettings,
}

/// One LoRA training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTrain {
    /// The objective of `realign train`: `sft` or `dpo`, and for `align.dpo` (the stage that
    /// trains `W_a`) also `orpo`, `kto` or `simpo`; the aligned row of the report is named after
    /// it ("Aligned (W_a, ORPO)").
    pub method: String,
    /// Data source (`embedded:NAME` or a file); the attack stage uses its mix instead.
    #[serde(default)]
    pub data: String,
    /// Beta of `dpo` and `kto` (default 0.1) and `simpo` (default 2.0); `sft` and `orpo`
    /// ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// ORPO's weight of the odds-ratio term (default 0.1); only with `method = "orpo"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    /// SimPO's target margin (default 1.0); only with `method = "simpo"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// KTO's weight of desirable rows (default 1.0); only with `method = "kto"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_d: Option<f64>,
    /// KTO's weight of undesirable rows (default 1.0); only with `method = "kto"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_u: Option<f64>,
    /// LoRA rank (new adapters only).
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA alpha (new adapters only).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Epochs.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Sequences per step (before accumulation).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Gradient accumulation steps.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Warmup fraction of the cosine schedule.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Tokens per sequence (at least 2). A stage whose every row's prompt alone is longer has
    /// nothing to train on: the stage's error names this key
    /// ([`ExperimentConfig::explain_train_error`]).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Use N rows drawn by a seeded shuffle of the set (0: all of it, in order).
    #[serde(default)]
    pub max_rows: usize,
    /// Batch rows of similar length together (transformers' `group_by_length`; see
    /// [`crate::train::trainer::epoch_batches`]). Off by default, as in transformers and the
    /// papers' runs, because every training setting of the default was chosen on the
    /// validation slices with random batches: grouping makes the attack's mix (short task rows,
    /// long harmful replies) about 1.5× cheaper to train, but it changes what each step sees
    /// (a batch of refusals only, a batch of long answers only).
    #[serde(default)]
    pub group_by_length: bool,
    /// Most padded tokens per forward/backward pass (0: the whole batch at once); see
    /// [`crate::train::config::OptimSettings::max_tokens_per_pass`]: the same update (up to
    /// rounding: the sum is taken in another order), with the memory kept for backward bounded
    /// by this budget and each pass padded only to rows of like length. Default 512: the
    /// attack's mix pads a batch of eight short task rows to its one long harmful reply, so
    /// whole batches of the default's p = 0.1 mix hold 1.63× the real tokens, passes of 512
    /// 1.10× (measured: that attack 611 → 412 s, its peak 4.1 → 1.6 GB).
    #[serde(default = "default_max_tokens_per_pass")]
    pub max_tokens_per_pass: usize,
}

/// Alignment stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignSettings {
    /// `W_0`: SFT on refusals.
    pub sft: StageTrain,
    /// `W_a`: DPO (or `method` ORPO, KTO, SimPO) on refusal-vs-compliance pairs, on top of
    /// `W_0`.
    pub dpo: StageTrain,
}

/// The attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackSettings {
    /// Task rows (benign fine-tuning data).
    pub task: String,
    /// Harmful compliant rows hidden among them.
    pub harmful: String,
    /// Rows in the fine-tuning set.
    pub n: usize,
    /// Harmful fractions, each in [0, 1] and listed once; one attacked adapter per value. The
    /// first is the main setting (the sweeps and the safety-neuron robustness check use it).
    pub ps: Vec<f64>,
    /// The fine-tuning run (continues `W_a`).
    pub train: StageTrain,
}

/// NLSR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NlsrSettings {
    /// Identification methods (`low-rank`, `wanda`, `snip`, `preference-snip`, `random`), at
    /// least one, each listed once; each gives one NLSR variant per `p`.
    pub methods: Vec<String>,
    /// Pre-amplification strengths β of `W_e = (1 + β) W_a − β W_0`
    /// ([`crate::nlsr::amplify::amplify`]), each in [0, [`MAX_COEFFICIENT`]] and listed once;
    /// the first is the main setting, the others a sweep (the paper's figure on
    /// pre-amplification). `0` means no pre-amplification (`W_e = W_a`). The paper's β are below
    /// 1; β of thousands make `W_e` a scaled copy of `W_a` whose products overflow f32.
    ///
    /// [`MAX_COEFFICIENT`]: crate::nlsr::amplify::MAX_COEFFICIENT
    pub betas: Vec<f64>,
    /// Also run the first method without pre-amplification (the ablation row).
    pub without_amplification: bool,
    /// Sparsity (fraction of entries *not* kept), each in [0, 1) (1 would keep nothing) and
    /// listed once; first = main, others a sweep (each swept value with the first method and,
    /// when `random` is among `methods`, with random masks of the same density).
    pub sparsities: Vec<f64>,
    /// Layer-pruning rate `P_L`, each in [0, 1] and listed once; first = main, others a sweep.
    pub layer_prunes: Vec<f64>,
    /// `ε` of the adaptive layer pruning.
    pub epsilon: f64,
    /// Rows of the safety corpus used for identification.
    pub identify_samples: usize,
    /// The safety corpus for identification (`embedded:NAME` or a data file; checked to exist
    /// when the configuration is validated, unless every method is `random`).
    pub identify_data: String,
    /// Also evaluate the `shrink` control at the main `p` and seed (`realign patch --transplant
    /// shrink`): the first method's repaired modules, each LoRA factor moved toward the
    /// reference by its mask density instead of taking the masked entries. When NLSR repairs
    /// no better than this, its identified neurons carry no information beyond how much of the
    /// reference is put back.
    pub shrink_control: bool,
}

/// Safe LoRA, applied to the fine-tuning update `W_t − W_a` (Hsu et al. 2024).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafeLoraSettings {
    /// Cosine thresholds τ, each in [-1, 1] and listed once: a module whose `cos(C ΔW, ΔW) < τ`
    /// is projected. The first is the main setting (one Safe LoRA row per `p`); the others a
    /// sweep at the main `p`.
    pub thresholds: Vec<f64>,
}

/// Safety neurons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NeuronSettings {
    /// Run the safety-neuron half at all.
    pub enabled: bool,
    /// Harmful prompts for detection.
    pub corpus: String,
    /// General text for foundation neurons.
    pub general: String,
    /// Prompts used from each corpus.
    pub prompts: usize,
    /// Pooled per-layer top-k rule (neurons kept per prompt and layer over q, k, v, o and FFN
    /// units); 0 (default): the per-kind rule of `top_k_attn` / `top_k_ffn`.
    pub top_k: usize,
    /// Per-kind rule: rows of q (and columns of o) kept per prompt and layer, k and v scaled
    /// by size; 0 (default): the paper's 1000 at width 4096 scaled to the model's.
    pub top_k_attn: usize,
    /// Per-kind rule: FFN units kept per prompt and layer; 0 (default): the paper's 2000 at
    /// intermediate size 11008 scaled to the model's.
    pub top_k_ffn: usize,
    /// Which tokens of a prompt count in the importance: `content` (default: the user's
    /// message only), `all` or `last`.
    pub tokens: crate::neurons::TokenScope,
    /// Refusal documents for SN-Tune.
    pub tune_data: String,
    /// Documents used by SN-Tune.
    pub tune_docs: usize,
    /// SN-Tune learning rate.
    pub tune_lr: f64,
    /// RSN-Tune learning rate; 0: `tune_lr`. RSN-Tune trains a smaller set (S \ F), which
    /// at SN-Tune's rate moves the model less.
    pub rsn_tune_lr: f64,
    /// Add two SN-Tune controls trained on the same documents at the same rate: a random set
    /// of the safety set's structure, and as many of the most important foundation neurons
    /// outside it.
    pub tune_controls: bool,
    /// SN-Tune epochs.
    pub tune_epochs: usize,
    /// Rows of plain task data for the robustness check (base, SN-Tune and RSN-Tune models
    /// fine-tuned on it); 0: `attack.n`.
    pub finetune_rows: usize,
    /// Draws of the Deact-R control (seeds `seed`, `seed + 1`, …), 1 to
    /// [`MAX_RANDOM_DRAWS`] as `realign sn-tune --random-draws`, an evaluation each; with more
    /// than one the report places Deact-SN among them (mean, range, Monte Carlo p-value,
    /// [`crate::neurons::random_draws`]).
    pub random_draws: usize,
}

/// Evaluation of every variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSettings {
    /// Held-out harmful prompts (harmfulness score).
    pub harmful: String,
    /// Held-out task items (fine-tuning accuracy).
    pub task: String,
    /// Harmful prompts used (0: all).
    pub harmful_limit: usize,
    /// Task items used (0: all).
    pub task_limit: usize,
    /// New tokens per harmful reply (at least 1).
    pub harmful_max_new_tokens: usize,
    /// New tokens per task reply (at least 1).
    pub task_max_new_tokens: usize,
    /// Prompts generated together: the slots of continuous batching (a prompt joins as another
    /// finishes). Default 32: on 2 cores, ~18 % less evaluation time than 16, with the same
    /// replies on the embedded default's sets (measured on the base model's 300 harmful and
    /// over-refusal replies).
    pub batch_size: usize,
    /// The harmfulness judge: `keyword` (GCG's refusal prefixes), `model:PATH` (a chat model
    /// prompted Llama-Guard style), or any judge of the registry (`realign judge-eval --help`:
    /// `keyword+coherence`, `qwen` after `scripts/fetch-judge-model.sh`, `rubric:PATH`, …); the
    /// keyword and non-degenerate scores are reported beside it. A judge's model (`model:PATH`,
    /// `rubric:PATH`, …, `qwen`'s download) must be there when the configuration is validated.
    pub judge: String,
    /// Also evaluate the intermediate models `W_0` (SFT) and `W_e` (amplified), which no repair
    /// row needs.
    pub intermediate: bool,
    /// Benign-but-edgy prompts for the over-refusal rate (`""`: not measured).
    pub overrefusal: String,
    /// Over-refusal prompts used (0: all).
    pub overrefusal_limit: usize,
    /// New tokens per over-refusal reply (at least 1).
    pub overrefusal_max_new_tokens: usize,
    /// Where each set's file holds its prompts and which of its rows count, as `realign eval`'s
    /// `--prompt-column`, `--label-column` and `--where` (`[eval.columns]`: `harmful_prompt`,
    /// `task_prompt`, `task_label`, `overrefusal_prompt`, and `harmful_where`, `task_where`,
    /// `overrefusal_where`, lists of `"KEY=VALUE"` / `"KEY!=VALUE"`); embedded sets ignore it.
    /// An evaluation on another benchmark reuses every training stage of the output folder.
    pub columns: crate::eval::EvalColumns,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn one() -> usize {
    1
}
fn default_batch() -> usize {
    8
}
fn default_max_length() -> usize {
    192
}
fn default_max_tokens_per_pass() -> usize {
    512
}

impl StageTrain {
    fn new(method: &str, data: &str, lr: f64) -> Self {
        Self {
            method: method.into(),
            data: data.into(),
            beta: (method == "dpo").then_some(0.1),
            lambda: None,
            gamma: None,
            lambda_d: None,
            lambda_u: None,
            r: default_r(),
            alpha: default_alpha(),
            lr,
            epochs: 1,
            batch_size: default_batch(),
            grad_accum: 1,
            warmup_ratio: 0.05,
            max_length: default_max_length(),
            max_rows: 0,
            group_by_length: false,
            max_tokens_per_pass: default_max_tokens_per_pass(),
        }
    }
}

impl Default for AlignSettings {
    /// Alignment data mixes harmful prompts (refusals) with benign ones (helpful answers), so
    /// that `W_a` refuses harm and still answers benign requests: `align_sft` (400 harmful + 150
    /// benign questions + 200 Amazon-review sentiment rows) and `align_pref` (130 + 150 + 200
    /// pairs; a benign pair prefers the helpful answer to a refusal). DPO takes a seeded sample
    /// of 160 of the 480 pairs (the comment in the body says why).
    fn default() -> Self {
        let mut dpo = StageTrain::new("dpo", "embedded:align_pref", 1e-4);
        dpo.batch_size = 4;
        dpo.grad_accum = 2;
        dpo.warmup_ratio = 0.1;
        // chosen on the validation slices (`--validate`, never the evaluation sets): all 480
        // pairs (60 steps) over-optimise W_a into short deflections ("Report suspicious
        // behavior") that comply with nothing yet contain no refusal phrase (keyword HS 100.0,
        // the Qwen judge 15.6 on 64 validation prompts); 160 pairs (20 steps) from the same
        // W_0 give Qwen-judge HS 0.0 with FA 56.2 and over-refusal 8.0
        dpo.max_rows = 160;
        Self {
            sft: StageTrain::new("sft", "embedded:align_sft", 2e-4),
            dpo,
        }
    }
}

impl Default for AttackSettings {
    /// The NLSR paper's attack: `n` = 1,000 rows of the task (binary sentiment) of which
    /// `round(n p)` are harmful compliant pairs, for p = 0.1 (main), 0, 0.05 and 0.2; p = 0 is
    /// "benign fine-tuning also erodes safety".
    fn default() -> Self {
        let mut train = StageTrain::new("sft", "", 2e-4);
        train.epochs = 1;
        train.max_length = 256;
        Self {
            task: "embedded:task_train".into(),
            harmful: "embedded:harmful_attack".into(),
            n: 1000,
            ps: vec![0.1, 0.0, 0.05, 0.2],
            train,
        }
    }
}

impl Default for NlsrSettings {
    fn default() -> Self {
        Self {
            // `random`: the control, masks of the same density drawn at random.
            methods: vec!["low-rank".into(), "random".into()],
            // 0 (W_a itself as the reference) first, chosen on the validation slices: the
            // amplified W_e (β 0.9) answered 51.6 % of `harmful_val` against W_a's 21.9 %
            // (disjoint intervals, n 64), because on this data W_0 (SFT) is the safer adapter
            // (HS 1.6, over-refusal 68 %) and DPO moves away from refusal, so extrapolating
            // W_a - W_0 points away from safety. The paper's 0.9 and 0.5 stay as sweep rows.
            betas: vec![0.0, 0.9, 0.5],
            without_amplification: true,
            // 0.2 (keep the top 80 % of entries) was chosen on the validation slices
            // (`--quick --validate`: HS 62.5 attacked -> 40.6 at 0.2 vs 59.4 at the paper's 0.8,
            // FA kept); the paper's 0.8 stays as a sweep point.
            sparsities: vec![0.2, 0.8],
            layer_prunes: vec![0.5, 0.0],
            epsilon: 0.2,
            identify_samples: 200,
            identify_data: "embedded:safety_sft".into(),
            shrink_control: true,
        }
    }
}

impl Default for SafeLoraSettings {
    fn default() -> Self {
        Self {
            thresholds: vec![0.5, 0.35, 0.65],
        }
    }
}

impl NeuronSettings {
    /// RSN-Tune's learning rate: `rsn_tune_lr`, or `tune_lr` when that is 0.
    pub fn rsn_tune_lr(&self) -> f64 {
        if self.rsn_tune_lr > 0.0 {
            self.rsn_tune_lr
        } else {
            self.tune_lr
        }
    }
}

impl Default for NeuronSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            corpus: "embedded:safety_sft".into(),
            general: "embedded:general_text".into(),
            prompts: 200,
            top_k: 0,
            top_k_attn: 0,
            top_k_ffn: 0,
            tokens: crate::neurons::TokenScope::Content,
            // Chosen on the validation slices (docs/neurons.md, "SN-Tune on the alignment
            // data"): refusals alone teach SmolLM2-135M's important neurons to open every
            // reply with an apology (FA 31.2 -> 7.8 at 5e-5); the alignment SFT data, which
            // also answers benign requests and classifies sentiment of another domain, cuts HS
            // 82.8 -> 14.1 with FA and perplexity kept. The paper's 1e-6 (for 7B models)
            // leaves the 135M model unchanged; `realign sn-tune` keeps the paper's default.
            tune_data: "embedded:align_sft".into(),
            tune_docs: 150,
            tune_lr: 5e-5,
            // Validation: RSN-Tune's 1,017 neurons at 5e-5 leave HS at 70.3; at 2e-4 it is
            // 40.6 with FA 37.5, and after task fine-tuning 12.5 (SN-Tune 18.8).
            rsn_tune_lr: 2e-4,
            tune_controls: true,
            tune_epochs: 2,
            finetune_rows: 200,
            random_draws: 1,
        }
    }
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            harmful: "embedded:harmful_eval".into(),
            task: "embedded:task_eval".into(),
            harmful_limit: 0,
            task_limit: 0,
            harmful_max_new_tokens: 48,
            // a label word and a little more: the substring rule reads the whole reply
            task_max_new_tokens: 8,
            batch_size: 32,
            judge: "keyword".into(),
            intermediate: true,
            overrefusal: "embedded:overrefusal_eval".into(),
            overrefusal_limit: 0,
            overrefusal_max_new_tokens: 48,
            columns: crate::eval::EvalColumns::default(),
        }
    }
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            model: None,
            output: PathBuf::from("runs/experiment"),
            seed: 42,
            seeds: Vec::new(),
            align: AlignSettings::default(),
            attack: AttackSettings::default(),
            nlsr: NlsrSettings::default(),
            safelora: SafeLoraSettings::default(),
            baselines: Default::default(),
            neurons: NeuronSettings::default(),
            eval: EvalSettings::default(),
        }
    }
}

/// The keys of a training stage that belong to its objective.
const OBJECTIVE_PARAMETERS: [&str; 5] = ["beta", "lambda", "gamma", "lambda_d", "lambda_u"];

/// `from` over `into`: tables merge key by key, every other value (arrays included) replaces.
fn merge_tables(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_tables(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// The objectives a training stage can use, with the name the report gives each.
pub const METHODS: [(&str, &str); 5] = [
    ("sft", "SFT"),
    ("dpo", "DPO"),
    ("orpo", "ORPO"),
    ("kto", "KTO"),
    ("simpo", "SimPO"),
];

impl StageTrain {
    /// The objective parameters `method` reads.
    fn parameters(&self) -> &'static [&'static str] {
        match self.method.as_str() {
            "dpo" => &["beta"],
            "orpo" => &["lambda"],
            "kto" => &["beta", "lambda_d", "lambda_u"],
            "simpo" => &["beta", "gamma"],
            _ => &[],
        }
    }

    /// The objective `realign train` runs, each parameter not given taking its paper's default
    /// (the defaults of [`crate::train::objectives::Objective`], read through its own
    /// deserialiser so that they live in one place). Errors on a method `realign train` does
    /// not know.
    pub fn objective(&self) -> Result<crate::train::objectives::Objective, String> {
        let mut t = toml::Table::new();
        t.insert("method".into(), self.method.clone().into());
        for (key, v) in self.parameter_values() {
            if let (Some(v), true) = (v, self.parameters().contains(&key)) {
                t.insert(key.into(), v.into());
            }
        }
        toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| format!("method {:?}: {}", self.method, e.message()))
    }

    /// Every objective parameter with its value, given or not.
    fn parameter_values(&self) -> [(&'static str, Option<f64>); 5] {
        [
            ("beta", self.beta),
            ("lambda", self.lambda),
            ("gamma", self.gamma),
            ("lambda_d", self.lambda_d),
            ("lambda_u", self.lambda_u),
        ]
    }

    /// The objective's name as the report writes it (`DPO`, `ORPO`, `SimPO`, ...).
    pub fn method_name(&self) -> &str {
        METHODS
            .iter()
            .find(|(m, _)| *m == self.method)
            .map_or(self.method.as_str(), |(_, n)| n)
    }

    /// Checks the training settings of the stage `name` (`align.sft`, ...): every count at
    /// least 1, `max_length` at least 2, the learning rate finite and positive, the
    /// objective's parameters by `realign train`'s rule
    /// ([`Objective::validate`](crate::train::objectives::Objective::validate): ORPO's λ and
    /// SimPO's margin may be 0), no parameter of another objective (but `beta`, which the
    /// default stages carry and SFT/ORPO ignore), the warmup a fraction.
    fn validate(&self, name: &str) -> Result<(), String> {
        for (key, v) in [
            ("r", self.r),
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ] {
            if v == 0 {
                return Err(format!("{name}.{key} = 0: give at least 1"));
            }
        }
        // a prompt token and a response token (`realign train`'s `data.max_length` rule)
        if self.max_length < 2 {
            return Err(format!(
                "{name}.max_length = {}: give at least 2",
                self.max_length
            ));
        }
        if self.r > crate::train::MAX_LORA_RANK {
            return Err(format!(
                "{name}.r = {}: at most {}",
                self.r,
                crate::train::MAX_LORA_RANK
            ));
        }
        for (key, v) in [("lr", self.lr), ("alpha", self.alpha)] {
            if !v.is_finite() || v <= 0.0 {
                return Err(format!("{name}.{key} = {v} is not a finite number > 0"));
            }
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(format!(
                "{name}.warmup_ratio = {} is outside [0, 1]",
                self.warmup_ratio
            ));
        }
        let used = self.parameters();
        for (key, v) in self.parameter_values() {
            let Some(v) = v else { continue };
            if !used.contains(&key) {
                // `beta` on an SFT or ORPO stage was always accepted and ignored.
                if key == "beta" {
                    continue;
                }
                return Err(format!(
                    "{name}.{key} = {v} is not a parameter of method {:?} (its parameters: {})",
                    self.method,
                    if used.is_empty() {
                        "none".to_string()
                    } else {
                        used.join(", ")
                    }
                ));
            }
        }
        // The parameters' values by the rule `realign train` applies (one rule, in
        // `Objective::validate`): ORPO's λ and SimPO's γ ≥ 0, every other one > 0.
        self.objective()
            .map_err(|e| format!("{name}: {e}"))?
            .validate()
            .map_err(|e| format!("{name}.{e}"))?;
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(format!(
                "{name}.warmup_ratio = {} is outside [0, 1]",
                self.warmup_ratio
            ));
        }
        Ok(())
    }
}

impl ExperimentConfig {
    /// The reduced run of `realign experiment --quick`: alignment on 320 SFT rows and 32 DPO
    /// pairs, one attack (n = 100, p = 0.2), Safe LoRA and NLSR (low-rank and random masks),
    /// no sweeps and no safety-neuron half; every variant on 64 harmful prompts, 64 task items
    /// and 64 over-refusal prompts (seeded samples). About 6 minutes on 2 Zen 4 cores, 10-13 on
    /// 2 cores of an AVX2-only server. Its output folder is `runs/experiment-quick`.
    pub fn quick() -> Self {
        let mut c = Self {
            output: PathBuf::from("runs/experiment-quick"),
            ..Self::default()
        };
        // chosen on the validation slices (`--quick --validate`): 192 rows at 2e-4 left W_a at
        // HS 64.1; 320 rows at 3e-4 and 32 DPO pairs give HS 18.8 with FA 62.5
        c.align.sft.max_rows = 320;
        c.align.sft.lr = 3e-4;
        c.align.sft.max_length = 128;
        c.align.dpo.max_rows = 32;
        c.align.dpo.max_length = 160;
        c.align.dpo.grad_accum = 1;
        c.attack.n = 100;
        c.attack.ps = vec![0.2];
        c.attack.train.max_length = 192;
        c.nlsr.without_amplification = false;
        c.nlsr.betas = vec![0.0];
        c.nlsr.sparsities = vec![0.2];
        c.nlsr.layer_prunes = vec![0.5];
        c.nlsr.identify_samples = 24;
        c.safelora.thresholds = vec![0.5];
        // the shrink control's row is in the default and medium runs (it would add one
        // evaluation, ~36 s on an AVX2-only 2-core server, to a run at its 10-minute budget)
        c.nlsr.shrink_control = false;
        // the peers' rows are in the default and medium runs; the quick run keeps its time
        c.baselines.methods.clear();
        c.neurons.enabled = false;
        c.eval.intermediate = false;
        c.eval.harmful_limit = 64;
        c.eval.task_limit = 64;
        c.eval.overrefusal_limit = 64;
        c.eval.harmful_max_new_tokens = 32;
        c.eval.overrefusal_max_new_tokens = 32;
        c
    }

    /// This configuration evaluated on the validation slices instead of the held-out sets:
    /// `embedded:harmful_val`, `embedded:task_val` and `embedded:overrefusal_val`. Settings are
    /// chosen on these (`realign experiment --validate`), never on the held-out sets. Training
    /// stages are unchanged, so they are shared with the real run.
    pub fn validation(mut self) -> Self {
        self.eval.harmful = "embedded:harmful_val".into();
        self.eval.task = "embedded:task_val".into();
        if !self.eval.overrefusal.is_empty() {
            self.eval.overrefusal = "embedded:overrefusal_val".into();
        }
        self
    }

    /// Parses an experiment file over the embedded default (see [`Self::from_toml_over`]);
    /// unknown keys and bad values are errors naming the file.
    pub fn from_file(path: &Path) -> Result<Self, ExperimentError> {
        Self::from_file_over(path, &Self::default())
    }

    /// Parses an experiment file over `base` (the default, or [`Self::quick`] for `realign
    /// experiment FILE --quick`).
    pub fn from_file_over(path: &Path, base: &Self) -> Result<Self, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_over(&text, base).map_err(|what| ExperimentError::Config {
            path: path.to_path_buf(),
            what,
        })
    }

    /// Parses experiment TOML over `base`: every key the text gives replaces `base`'s, and
    /// tables merge key by key at every depth, so `[align.dpo]` with only `method = "orpo"`
    /// keeps the rest of `base`'s DPO stage (its 160 pairs, batch, warmup, ...). A stage whose
    /// `method` the text changes drops `base`'s objective parameters (`beta`, `lambda`, ...):
    /// DPO's beta is not SimPO's. Unknown keys and wrong types are errors with their line.
    pub fn from_toml_over(text: &str, base: &Self) -> Result<Self, String> {
        let file: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut merged = toml::Table::try_from(base).map_err(|e| e.to_string())?;
        for stage in [["align", "sft"], ["align", "dpo"], ["attack", "train"]] {
            let method = |t: &toml::Table| -> Option<toml::Value> {
                t.get(stage[0])?.get(stage[1])?.get("method").cloned()
            };
            let given = method(&file);
            if given.is_some() && given != method(&merged) {
                if let Some(toml::Value::Table(t)) =
                    merged.get_mut(stage[0]).and_then(|s| s.get_mut(stage[1]))
                {
                    for key in OBJECTIVE_PARAMETERS {
                        t.remove(key);
                    }
                }
            }
        }
        merge_tables(&mut merged, file);
        let cfg: Self = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| {
                // The merged table has no lines: the text as written names the line of an
                // unknown key or a wrong type (its own errors about keys it leaves to `base`
                // are not errors).
                match toml::from_str::<Self>(text) {
                    Err(f) if !f.to_string().contains("missing field") => f.to_string(),
                    _ => e.to_string(),
                }
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The TOML text of this configuration (every key, defaults included).
    pub fn to_toml(&self) -> String {
        // Every field is a TOML type (no maps with non-string keys, no bare None at the top).
        #[allow(clippy::expect_used)]
        toml::to_string_pretty(self).expect("an experiment config serialises")
    }

    /// Checks the whole configuration before anything runs, so that a bad value is refused
    /// when the experiment starts rather than after hours of training. The error names the key
    /// and its value (`nlsr.sparsities = 1 is outside [0, 1)`); [`Self::from_file`] puts the
    /// file's name before it. Checked:
    ///
    /// - sweeps: non-empty, each value listed once (a repeated value would give the report a
    ///   repeated row), fractions in range (`attack.ps`, `nlsr.layer_prunes` in [0, 1],
    ///   `nlsr.sparsities` in [0, 1), `safelora.thresholds` in [-1, 1]), `nlsr.betas` in
    ///   [0, [`crate::nlsr::amplify::MAX_COEFFICIENT`]] (what amplification takes), known
    ///   `nlsr.methods` (at least one: an empty list is not a way to switch NLSR off);
    /// - the training stages ([`StageTrain`]'s counts, rates and objective parameters);
    /// - the peers' settings ([`super::baselines::BaselineSettings::validate`]: RESTA's
    ///   `|resta_gamma|` at most [`crate::resta::MAX_GAMMA`], beyond which the merged weights
    ///   swamp the fine-tune and, far beyond, are no longer finite);
    /// - evaluation: `eval.*_max_new_tokens` and `eval.batch_size` at least 1, a known
    ///   `eval.judge` whose model (`model:PATH`, `rubric:PATH`, …, or the fetched `qwen`
    ///   model) is there;
    /// - every data source a stage will read (`align.*.data`, `attack.task`, `attack.harmful`,
    ///   `nlsr.identify_data`, `baselines.antidote_data` with `antidote`, the `neurons` sets
    ///   when enabled, `eval.harmful`, `eval.task`, `eval.overrefusal`): `embedded:NAME` must
    ///   name an embedded set ([`crate::data::EMBEDDED_SETS`]), anything else an existing file
    ///   (relative paths from the working folder, as the stages read them);
    /// - `neurons.random_draws` from 1 to [`MAX_RANDOM_DRAWS`] (as `realign sn-tune`).
    ///
    /// `model` is not checked here (a file may name a model still to be fetched, and
    /// `--print-config` prints it): [`Self::check_model`] is, by `realign experiment` before
    /// the run, and the runner refuses a missing model before any stage.
    pub fn validate(&self) -> Result<(), String> {
        use crate::train::config::fmt_num;
        let frac = |name: &str, v: f64, lo: f64, hi: f64| {
            if !(lo..=hi).contains(&v) || v.is_nan() {
                Err(format!("{name} = {} is outside [{lo}, {hi}]", fmt_num(v)))
            } else {
                Ok(())
            }
        };
        if let Err(e) = self.eval.judge.parse::<crate::eval::JudgeSpec>() {
            return Err(format!("eval.judge: {e}"));
        }
        check_judge(&self.eval.judge)?;
        if self.attack.ps.is_empty() {
            return Err("attack.ps is empty: give at least one harmful fraction".into());
        }
        for &p in &self.attack.ps {
            frac("attack.ps", p, 0.0, 1.0)?;
        }
        for (name, v) in [
            ("safelora.thresholds", &self.safelora.thresholds),
            ("nlsr.betas", &self.nlsr.betas),
            ("nlsr.sparsities", &self.nlsr.sparsities),
            ("nlsr.layer_prunes", &self.nlsr.layer_prunes),
        ] {
            if v.is_empty() {
                return Err(format!("{name} is empty: give at least one value"));
            }
        }
        for &s in &self.nlsr.sparsities {
            // identification keeps a fraction 1 - s of the entries: 1 keeps none
            if !(0.0..1.0).contains(&s) {
                return Err(format!(
                    "nlsr.sparsities = {} is outside [0, 1)",
                    fmt_num(s)
                ));
            }
        }
        for &t in &self.safelora.thresholds {
            frac("safelora.thresholds", t, -1.0, 1.0)?;
        }
        let max_beta = crate::nlsr::amplify::MAX_COEFFICIENT;
        for &b in &self.nlsr.betas {
            if !(b.is_finite() && (0.0..=max_beta).contains(&b)) {
                return Err(format!(
                    "nlsr.betas = {} is outside [0, {max_beta}] (W_e = (1 + beta) W_a - beta W_0; \
                     the paper's betas are below 1)",
                    fmt_num(b)
                ));
            }
        }
        if self.eval.batch_size == 0 {
            return Err("eval.batch_size = 0: give at least 1".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.seeds {
            if !seen.insert(s) {
                return Err(format!("seeds: {s} is listed twice"));
            }
        }
        for &s in &self.nlsr.layer_prunes {
            frac("nlsr.layer_prunes", s, 0.0, 1.0)?;
        }
        for (name, v) in [
            ("attack.ps", &self.attack.ps),
            ("nlsr.betas", &self.nlsr.betas),
            ("nlsr.sparsities", &self.nlsr.sparsities),
            ("nlsr.layer_prunes", &self.nlsr.layer_prunes),
            ("safelora.thresholds", &self.safelora.thresholds),
        ] {
            listed_once(name, v, |x| fmt_num(*x))?;
        }
        self.baselines.validate()?;
        const NLSR_METHODS: [&str; 5] = ["low-rank", "wanda", "snip", "preference-snip", "random"];
        if self.nlsr.methods.is_empty() {
            return Err(format!(
                "nlsr.methods is empty: give at least one method ({})",
                NLSR_METHODS.join(", ")
            ));
        }
        for m in &self.nlsr.methods {
            if !NLSR_METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "nlsr.methods: unknown method {m:?} ({})",
                    NLSR_METHODS.join(", ")
                ));
            }
        }
        listed_once("nlsr.methods", &self.nlsr.methods, |m| format!("{m:?}"))?;
        // The attack trains on its mix (prompt/response rows) and `W_0` on refusals; `W_a` may
        // use any objective of `realign train` on its preference pairs.
        for (name, t, allowed) in [
            ("align.sft", &self.align.sft, &["sft", "dpo"][..]),
            ("align.dpo", &self.align.dpo, &METHODS.map(|(m, _)| m)[..]),
            ("attack.train", &self.attack.train, &["sft", "dpo"][..]),
        ] {
            if !allowed.contains(&t.method.as_str()) {
                return Err(format!(
                    "{name}.method = {:?} (one of: {})",
                    t.method,
                    allowed.join(", ")
                ));
            }
            t.validate(name)?;
        }
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(format!("{name} = 0: give at least 1"))
            } else {
                Ok(())
            }
        };
        positive("attack.n", self.attack.n)?;
        for (name, v) in [
            (
                "eval.harmful_max_new_tokens",
                self.eval.harmful_max_new_tokens,
            ),
            ("eval.task_max_new_tokens", self.eval.task_max_new_tokens),
            (
                "eval.overrefusal_max_new_tokens",
                self.eval.overrefusal_max_new_tokens,
            ),
        ] {
            positive(name, v)?;
        }
        if !self.nlsr.epsilon.is_finite() || !(0.0..=0.5).contains(&self.nlsr.epsilon) {
            return Err(format!(
                "nlsr.epsilon = {} is outside [0, 0.5]",
                self.nlsr.epsilon
            ));
        }
        if self.nlsr.methods.iter().any(|m| m != "random") {
            positive("nlsr.identify_samples", self.nlsr.identify_samples)?;
        }
        if self.neurons.enabled {
            positive("neurons.prompts", self.neurons.prompts)?;
            // top_k = 0 is the per-kind rule (the default), not an empty set.
            positive("neurons.tune_epochs", self.neurons.tune_epochs)?;
            if !self.neurons.tune_lr.is_finite() || self.neurons.tune_lr <= 0.0 {
                return Err(format!(
                    "neurons.tune_lr = {} is not a finite number > 0",
                    self.neurons.tune_lr
                ));
            }
            if !self.neurons.rsn_tune_lr.is_finite() || self.neurons.rsn_tune_lr < 0.0 {
                return Err(format!(
                    "neurons.rsn_tune_lr = {} is not a finite number >= 0 (0: tune_lr)",
                    self.neurons.rsn_tune_lr
                ));
            }
            if !(1..=MAX_RANDOM_DRAWS).contains(&self.neurons.random_draws) {
                return Err(format!(
                    "neurons.random_draws = {} is outside [1, {MAX_RANDOM_DRAWS}]",
                    self.neurons.random_draws
                ));
            }
        }
        for (key, source) in self.data_sources() {
            check_source(key, source)?;
        }
        Ok(())
    }

    /// Every data source a stage of this configuration reads, with its key: the ones
    /// [`Self::validate`] checks.
    fn data_sources(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![
            ("align.sft.data", self.align.sft.data.as_str()),
            ("align.dpo.data", self.align.dpo.data.as_str()),
            ("attack.task", self.attack.task.as_str()),
            ("attack.harmful", self.attack.harmful.as_str()),
            ("eval.harmful", self.eval.harmful.as_str()),
            ("eval.task", self.eval.task.as_str()),
        ];
        // `""` is documented as "not measured"
        if !self.eval.overrefusal.is_empty() {
            out.push(("eval.overrefusal", self.eval.overrefusal.as_str()));
        }
        // the plan reads the corpus only for methods that score entries
        if self.nlsr.methods.iter().any(|m| m != "random") {
            out.push(("nlsr.identify_data", self.nlsr.identify_data.as_str()));
        }
        if self.baselines.methods.iter().any(|m| m == "antidote") {
            out.push((
                "baselines.antidote_data",
                self.baselines.antidote_data.as_str(),
            ));
        }
        if self.neurons.enabled {
            out.push(("neurons.corpus", self.neurons.corpus.as_str()));
            out.push(("neurons.general", self.neurons.general.as_str()));
            out.push(("neurons.tune_data", self.neurons.tune_data.as_str()));
        }
        out
    }

    /// Checks `model`, when given: a model folder or a GGUF file must be there. Not part of
    /// [`Self::validate`] (see there); `realign experiment` runs it before it creates the
    /// output folder. The error names the key (`model = "/m": no such model folder or GGUF
    /// file`).
    pub fn check_model(&self) -> Result<(), String> {
        match &self.model {
            Some(m) if !m.exists() => Err(format!(
                "model = {:?}: no such model folder or GGUF file",
                m.display().to_string()
            )),
            _ => Ok(()),
        }
    }

    /// The key of the experiment file whose settings a training stage runs: `attack.train` for
    /// a stage that trains on a mix (the attacks and the safety-neuron robustness fine-tunes),
    /// else `align.sft` or `align.dpo` (the stage whose settings equal `settings`).
    pub fn train_key(&self, settings: &StageTrain, mix: bool) -> Option<&'static str> {
        if mix {
            Some("attack.train")
        } else if *settings == self.align.sft {
            Some("align.sft")
        } else if *settings == self.align.dpo {
            Some("align.dpo")
        } else {
            None
        }
    }

    /// The message of a training stage's error that names a key of `realign train`'s file
    /// rather than the experiment's: [`crate::train::TrainError::NoExamples`] (every row's
    /// prompt alone exceeds `data.max_length`, which the experiment calls
    /// `KEY.max_length`, `KEY` from [`Self::train_key`]). `None` for every other error.
    pub fn explain_train_error(
        &self,
        err: &crate::Error,
        settings: &StageTrain,
        mix: bool,
    ) -> Option<String> {
        match err {
            crate::Error::Train(crate::train::TrainError::NoExamples { dropped }) => {
                let key = self.train_key(settings, mix).unwrap_or("the stage's");
                Some(format!(
                    "{key}.max_length = {}: the prompt alone is longer in every row \
                     ({dropped} rows dropped), so nothing is left to train on; raise \
                     {key}.max_length",
                    settings.max_length
                ))
            }
            _ => None,
        }
    }
}

/// The most draws of the Deact-R control (`neurons.random_draws`), as `realign sn-tune
/// --random-draws` allows.
pub const MAX_RANDOM_DRAWS: usize = 1000;

/// Errors when an item of `items` (the list `key`) equals an earlier one
/// (`attack.ps: 0.2 is listed twice`): each item is a row of the report.
fn listed_once<T: PartialEq>(
    key: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> Result<(), String> {
    for (i, x) in items.iter().enumerate() {
        if items[..i].contains(x) {
            return Err(format!("{key}: {} is listed twice", show(x)));
        }
    }
    Ok(())
}

/// Checks the data source `source` of `key` without reading it: `embedded:NAME` must name an
/// embedded set, anything else an existing file. The stages read these sources through
/// [`crate::data::load_source`] and digest them ([`super::stages::Inputs::data_digest`]) when
/// the run's plan is built; this refuses a missing one before, naming the key.
fn check_source(key: &str, source: &str) -> Result<(), String> {
    if source.is_empty() {
        return Err(format!(
            "{key} is empty: give a data source (embedded:NAME or a data file)"
        ));
    }
    if let Some(name) = source.strip_prefix("embedded:") {
        let sets = crate::data::EMBEDDED_SETS;
        if !sets.iter().any(|s| s.name == name) {
            return Err(format!(
                "{key} = {source:?}: no embedded set {name:?} (known: {})",
                sets.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ));
        }
        return Ok(());
    }
    let path = Path::new(source);
    if path.is_dir() {
        Err(format!("{key} = {source:?} is a folder, not a data file"))
    } else if !path.exists() {
        Err(format!("{key} = {source:?}: no such file"))
    } else {
        Ok(())
    }
}

/// Checks what `eval.judge` (already parsed) needs besides its name: the model of
/// `model:PATH`, `rubric:PATH`, `refusal:PATH` and `ensemble:PATH` must be there
/// (`eval.judge = "model:/m": no such model folder`), those judges need their `PATH`, the
/// others take none, and `qwen` needs its fetched model ([`crate::eval::judges::qwen`]).
fn check_judge(judge: &str) -> Result<(), String> {
    use crate::eval::judges::{qwen, JUDGES};
    let (name, arg) = match judge.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (judge, None),
    };
    let Some(info) = JUDGES.iter().find(|j| j.name == name) else {
        // `keyword` and unknown names: the parse before this decides.
        return Ok(());
    };
    let takes_path = info.usage.strip_prefix(info.name) == Some(":PATH");
    match (takes_path, arg) {
        (true, Some(p)) if !p.is_empty() => {
            if Path::new(p).exists() {
                Ok(())
            } else {
                Err(format!("eval.judge = {judge:?}: no such model folder"))
            }
        }
        (true, _) => Err(format!(
            "eval.judge = {judge:?}: give the judge's model ({})",
            info.usage
        )),
        (false, Some(_)) => Err(format!(
            "eval.judge = {judge:?}: judge {name} takes no argument"
        )),
        (false, None) if name == qwen::NAME && !qwen::model_path().is_file() => Err(format!(
            "eval.judge = {judge:?} needs {} (an optional download): run \
             scripts/fetch-judge-model.sh",
            qwen::model_path().display()
        )),
        (false, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_toml() {
        for cfg in [ExperimentConfig::default(), ExperimentConfig::quick()] {
            let text = cfg.to_toml();
            let back: ExperimentConfig = toml::from_str(&text).unwrap();
            assert_eq!(back, cfg);
        }
    }

    #[test]
    fn every_shipped_configuration_validates() {
        // The full default (neurons on, top_k 0 = the per-kind rule), the quick run, the
        // quick run with its neurons half, the validation variant and the medium file.
        let mut neurons = ExperimentConfig::quick();
        neurons.neurons.enabled = true;
        let shipped = |name: &str| {
            ExperimentConfig::from_file(
                &Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("configs")
                    .join(name),
            )
            .unwrap()
        };
        let medium = shipped("experiment-medium.toml");
        let orpo = shipped("experiment-orpo.toml");
        assert_eq!(orpo.align.dpo.method_name(), "ORPO");
        let mut dpo_stage = orpo.align.dpo.clone();
        dpo_stage.method = "dpo".into();
        (dpo_stage.beta, dpo_stage.lambda) = (Some(0.1), None);
        assert_eq!(dpo_stage, ExperimentConfig::default().align.dpo);
        for (name, cfg) in [
            ("default", ExperimentConfig::default()),
            ("quick", ExperimentConfig::quick()),
            ("quick + neurons", neurons),
            (
                "default --validate",
                ExperimentConfig::default().validation(),
            ),
            ("medium", medium),
            ("orpo", orpo),
        ] {
            assert_eq!(cfg.validate(), Ok(()), "{name}");
        }
        let mut bad = ExperimentConfig::default();
        bad.neurons.prompts = 0;
        assert!(bad.validate().unwrap_err().contains("neurons.prompts"));
    }

    #[test]
    fn the_aligned_stage_takes_any_preference_objective_with_its_parameters() {
        use crate::train::objectives::Objective;
        let parse = |method_and_keys: &str| -> ExperimentConfig {
            toml::from_str(&format!(
                "[align.dpo]\ndata = \"embedded:align_pref\"\nlr = 1e-4\n{method_and_keys}\n"
            ))
            .unwrap()
        };
        // given parameters are used; missing ones take the paper's defaults
        for (keys, objective, name) in [
            (
                "method = \"orpo\"\nlambda = 0.2",
                Objective::Orpo { lambda: 0.2 },
                "ORPO",
            ),
            ("method = \"orpo\"", Objective::Orpo { lambda: 0.1 }, "ORPO"),
            (
                "method = \"simpo\"",
                Objective::Simpo {
                    beta: 2.0,
                    gamma: 1.0,
                },
                "SimPO",
            ),
            (
                "method = \"simpo\"\nbeta = 2.5\ngamma = 0",
                Objective::Simpo {
                    beta: 2.5,
                    gamma: 0.0,
                },
                "SimPO",
            ),
            (
                "method = \"kto\"\nlambda_u = 1.5",
                Objective::Kto {
                    beta: 0.1,
                    lambda_d: 1.0,
                    lambda_u: 1.5,
                },
                "KTO",
            ),
            ("method = \"dpo\"", Objective::Dpo { beta: 0.1 }, "DPO"),
            ("method = \"sft\"\nbeta = 0.3", Objective::Sft, "SFT"),
        ] {
            let cfg = parse(keys);
            assert_eq!(cfg.validate(), Ok(()), "{keys}");
            assert_eq!(cfg.align.dpo.objective(), Ok(objective), "{keys}");
            assert_eq!(cfg.align.dpo.method_name(), name);
        }
        // the default is the DPO it always was
        assert_eq!(
            ExperimentConfig::default().align.dpo.objective(),
            Ok(Objective::Dpo { beta: 0.1 })
        );
        // a parameter of another objective, a bad value, an objective the stage cannot run
        for (keys, message) in [
            (
                "method = \"dpo\"\nlambda = 0.2",
                "align.dpo.lambda = 0.2 is not a parameter of method \"dpo\" (its parameters: beta)",
            ),
            (
                "method = \"orpo\"\ngamma = 1",
                "align.dpo.gamma = 1 is not a parameter of method \"orpo\" (its parameters: lambda)",
            ),
            (
                "method = \"orpo\"\nlambda = -0.5",
                "align.dpo.lambda = -0.5 must be a finite number ≥ 0",
            ),
            (
                "method = \"simpo\"\ngamma = -1",
                "align.dpo.gamma = -1 must be a finite number ≥ 0",
            ),
            (
                "method = \"kto\"\nlambda_d = 0",
                "align.dpo.lambda_d = 0 must be a finite number > 0",
            ),
            (
                "method = \"ipo\"",
                "align.dpo.method = \"ipo\" (one of: sft, dpo, orpo, kto, simpo)",
            ),
        ] {
            assert_eq!(parse(keys).validate(), Err(message.to_string()), "{keys}");
        }
        let mut ipo = ExperimentConfig::default().align.dpo;
        ipo.method = "ipo".into();
        let e = ipo.objective().unwrap_err();
        assert!(
            e.starts_with("method \"ipo\": unknown variant `ipo`"),
            "{e}"
        );
        let mut attack_orpo = ExperimentConfig::default();
        attack_orpo.attack.train.method = "orpo".into();
        assert_eq!(
            attack_orpo.validate(),
            Err("attack.train.method = \"orpo\" (one of: sft, dpo)".to_string())
        );
    }

    #[test]
    fn a_file_merges_over_its_base_table_by_table() {
        use crate::train::objectives::Objective;
        let default = ExperimentConfig::default();
        let over = |text: &str| ExperimentConfig::from_toml_over(text, &default);
        // a stage table with one key keeps the rest of the default's stage
        let cfg = over("[align.dpo]\nmethod = \"orpo\"\n").unwrap();
        let mut want = default.align.dpo.clone();
        want.method = "orpo".into();
        want.beta = None; // DPO's beta does not follow the stage to another objective
        assert_eq!(cfg.align.dpo, want);
        assert_eq!(
            cfg.align.dpo.objective(),
            Ok(Objective::Orpo { lambda: 0.1 })
        );
        assert_eq!((cfg.align.dpo.max_rows, cfg.align.dpo.grad_accum), (160, 2));
        assert_eq!(cfg.align.sft, default.align.sft);
        let simpo = over("[align.dpo]\nmethod = \"simpo\"\n").unwrap();
        assert_eq!(
            simpo.align.dpo.objective(),
            Ok(Objective::Simpo {
                beta: 2.0,
                gamma: 1.0
            })
        );
        // the same method keeps its parameters unless the file gives them
        let dpo = over("[align.dpo]\nmax_rows = 480\n").unwrap();
        assert_eq!(dpo.align.dpo.objective(), Ok(Objective::Dpo { beta: 0.1 }));
        assert_eq!(dpo.align.dpo.max_rows, 480);
        let dpo = over("[align.dpo]\nbeta = 0.5\n").unwrap();
        assert_eq!(dpo.align.dpo.objective(), Ok(Objective::Dpo { beta: 0.5 }));
        // arrays replace; `--quick FILE` is the file over the quick run
        let quick = ExperimentConfig::quick();
        let cfg = ExperimentConfig::from_toml_over("[attack]\nps = [0.1, 0.0]\n", &quick).unwrap();
        assert_eq!(cfg.attack.ps, vec![0.1, 0.0]);
        assert_eq!(cfg.attack.n, quick.attack.n);
        assert_eq!(cfg.output, quick.output);
        // unknown keys and wrong types are errors with their line; values are validated
        let e = over("seed = 1\n[align.dpo]\nbetta = 0.1\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("betta"), "{e}");
        let e = over("[attack]\nn = \"many\"\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert_eq!(
            over("[align.dpo]\nlambda = 0.2\n").unwrap_err(),
            "align.dpo.lambda = 0.2 is not a parameter of method \"dpo\" (its parameters: beta)"
        );
        // a file that gives every key reads the same either way
        let full = default.to_toml();
        assert_eq!(over(&full).unwrap(), default);
        assert_eq!(
            ExperimentConfig::from_toml_over(&quick.to_toml(), &default).unwrap(),
            quick
        );
    }

    /// Each value here passed validation once and failed only when its stage ran (or ran in a
    /// silently wrong way): every one is now refused by `validate`, naming its key.
    #[test]
    fn values_that_failed_mid_run_are_refused_naming_their_key() {
        let default = ExperimentConfig::default();
        for (text, message) in [
            (
                "[nlsr]\nsparsities = [1.0]\n",
                "nlsr.sparsities = 1 is outside [0, 1)",
            ),
            (
                "[nlsr]\nsparsities = [0.2, -0.1]\n",
                "nlsr.sparsities = -0.1 is outside [0, 1)",
            ),
            (
                "[eval]\nharmful_max_new_tokens = 0\n",
                "eval.harmful_max_new_tokens = 0: give at least 1",
            ),
            (
                "[eval]\ntask_max_new_tokens = 0\n",
                "eval.task_max_new_tokens = 0: give at least 1",
            ),
            (
                "[eval]\noverrefusal_max_new_tokens = 0\n",
                "eval.overrefusal_max_new_tokens = 0: give at least 1",
            ),
            (
                "[nlsr]\nbetas = [1e30]\n",
                "nlsr.betas = 1e30 is outside [0, 100] (W_e = (1 + beta) W_a - beta W_0; \
                 the paper's betas are below 1)",
            ),
            (
                "[attack]\nps = [0.2, 0.2]\n",
                "attack.ps: 0.2 is listed twice",
            ),
            (
                "[nlsr]\nmethods = [\"low-rank\", \"low-rank\"]\n",
                "nlsr.methods: \"low-rank\" is listed twice",
            ),
            (
                "[nlsr]\nmethods = []\n",
                "nlsr.methods is empty: give at least one method \
                 (low-rank, wanda, snip, preference-snip, random)",
            ),
            (
                "[nlsr]\nsparsities = [0.2, 0.8, 0.2]\n",
                "nlsr.sparsities: 0.2 is listed twice",
            ),
            (
                "[nlsr]\nbetas = [0, 0.0]\n",
                "nlsr.betas: 0 is listed twice",
            ),
            (
                "[nlsr]\nlayer_prunes = [0.5, 0.5]\n",
                "nlsr.layer_prunes: 0.5 is listed twice",
            ),
            (
                "[safelora]\nthresholds = [0.5, 0.35, 0.5]\n",
                "safelora.thresholds: 0.5 is listed twice",
            ),
            (
                "[neurons]\nrandom_draws = 0\n",
                "neurons.random_draws = 0 is outside [1, 1000]",
            ),
            (
                "[neurons]\nrandom_draws = 1001\n",
                "neurons.random_draws = 1001 is outside [1, 1000]",
            ),
            (
                "[attack.train]\nmax_length = 1\n",
                "attack.train.max_length = 1: give at least 2",
            ),
            (
                "[eval]\njudge = \"model:/nonexistent\"\n",
                "eval.judge = \"model:/nonexistent\": no such model folder",
            ),
            (
                "[eval]\njudge = \"rubric:/nonexistent\"\n",
                "eval.judge = \"rubric:/nonexistent\": no such model folder",
            ),
            (
                "[eval]\njudge = \"rubric\"\n",
                "eval.judge = \"rubric\": give the judge's model (rubric:PATH)",
            ),
            (
                "[eval]\njudge = \"keyword+coherence:x\"\n",
                "eval.judge = \"keyword+coherence:x\": judge keyword+coherence takes no argument",
            ),
        ] {
            assert_eq!(
                ExperimentConfig::from_toml_over(text, &default),
                Err(message.to_string()),
                "{text}"
            );
        }
        // values next to the refused ones still pass
        for text in [
            "[nlsr]\nsparsities = [0.0, 0.99]\n",
            "[nlsr]\nbetas = [100, 0]\n",
            "[neurons]\nrandom_draws = 1000\n",
            "[attack.train]\nmax_length = 2\n",
            "[eval]\njudge = \"keyword+coherence\"\n",
            // RSN-Tune's draws are not read with the neurons half off
            "[neurons]\nenabled = false\nrandom_draws = 0\n",
        ] {
            assert!(
                ExperimentConfig::from_toml_over(text, &default).is_ok(),
                "{text}"
            );
        }
    }

    #[test]
    fn every_data_source_is_checked_before_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rows.jsonl");
        std::fs::write(&file, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
        let file = file.display().to_string();
        let folder = dir.path().display().to_string();
        let missing = dir.path().join("nope.jsonl").display().to_string();
        let with = |keys: &str, value: &str| -> Result<ExperimentConfig, String> {
            let text = keys.replace("VALUE", &format!("{value:?}"));
            ExperimentConfig::from_toml_over(&text, &ExperimentConfig::default())
        };
        for (keys, key) in [
            ("[align.sft]\ndata = VALUE\n", "align.sft.data"),
            ("[align.dpo]\ndata = VALUE\n", "align.dpo.data"),
            ("[attack]\ntask = VALUE\n", "attack.task"),
            ("[attack]\nharmful = VALUE\n", "attack.harmful"),
            ("[nlsr]\nidentify_data = VALUE\n", "nlsr.identify_data"),
            (
                "[baselines]\nmethods = [\"antidote\"]\nantidote_data = VALUE\n",
                "baselines.antidote_data",
            ),
            ("[neurons]\ncorpus = VALUE\n", "neurons.corpus"),
            ("[neurons]\ngeneral = VALUE\n", "neurons.general"),
            ("[neurons]\ntune_data = VALUE\n", "neurons.tune_data"),
            ("[eval]\nharmful = VALUE\n", "eval.harmful"),
            ("[eval]\ntask = VALUE\n", "eval.task"),
            ("[eval]\noverrefusal = VALUE\n", "eval.overrefusal"),
        ] {
            assert!(with(keys, &file).is_ok(), "{key}");
            assert!(with(keys, "embedded:safety_sft").is_ok(), "{key}");
            assert_eq!(
                with(keys, &missing).unwrap_err(),
                format!("{key} = {missing:?}: no such file")
            );
            assert_eq!(
                with(keys, &folder).unwrap_err(),
                format!("{key} = {folder:?} is a folder, not a data file")
            );
            let e = with(keys, "embedded:nope").unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "{key} = \"embedded:nope\": no embedded set \"nope\" (known: safety_sft, "
                )),
                "{e}"
            );
        }
        // sources no stage reads are not checked: `""` over-refusal is "not measured", the
        // antidote set without antidote, the identification corpus with random masks only,
        // the neuron sets with the neurons half off
        for text in [
            "[eval]\noverrefusal = \"\"\n",
            "[baselines]\nmethods = [\"resta\"]\nantidote_data = \"/nope.jsonl\"\n",
            "[nlsr]\nmethods = [\"random\"]\nidentify_data = \"/nope.jsonl\"\n",
            "[neurons]\nenabled = false\ncorpus = \"/nope.jsonl\"\n",
        ] {
            assert!(
                ExperimentConfig::from_toml_over(text, &ExperimentConfig::default()).is_ok(),
                "{text}"
            );
        }
        assert_eq!(
            with("[eval]\ntask = VALUE\n", "").unwrap_err(),
            "eval.task is empty: give a data source (embedded:NAME or a data file)"
        );
    }

    #[test]
    fn the_model_key_is_checked_apart_from_validate() {
        let mut cfg = ExperimentConfig::default();
        assert_eq!(cfg.check_model(), Ok(()));
        cfg.model = Some(PathBuf::from("/nonexistent/model"));
        // a file may name a model still to be fetched: --print-config prints it
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(
            cfg.check_model(),
            Err("model = \"/nonexistent/model\": no such model folder or GGUF file".into())
        );
        let dir = tempfile::tempdir().unwrap();
        cfg.model = Some(dir.path().to_path_buf());
        assert_eq!(cfg.check_model(), Ok(()));
    }

    #[test]
    fn a_training_error_names_the_experiment_key_not_realign_trains() {
        let mut cfg = ExperimentConfig::default();
        cfg.attack.train.max_length = 64;
        let none_left = crate::Error::Train(crate::train::TrainError::NoExamples { dropped: 200 });
        assert_eq!(
            cfg.explain_train_error(&none_left, &cfg.attack.train, true),
            Some(
                "attack.train.max_length = 64: the prompt alone is longer in every row (200 \
                 rows dropped), so nothing is left to train on; raise attack.train.max_length"
                    .into()
            )
        );
        let sft = cfg.align.sft.clone();
        let e = cfg.explain_train_error(&none_left, &sft, false).unwrap();
        assert!(e.starts_with("align.sft.max_length = 192: "), "{e}");
        assert!(!e.contains("data.max_length"), "{e}");
        let dpo = cfg.align.dpo.clone();
        let e = cfg.explain_train_error(&none_left, &dpo, false).unwrap();
        assert!(e.starts_with("align.dpo.max_length = 192: "), "{e}");
        // every other error is left as it is
        let other = crate::Error::Train(crate::train::TrainError::NoReference);
        assert_eq!(cfg.explain_train_error(&other, &sft, false), None);
    }

    #[test]
    fn partial_file_takes_defaults_and_unknown_keys_fail() {
        let cfg: ExperimentConfig = toml::from_str("seed = 7\n[attack]\nps = [0.3]\n").unwrap();
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.attack.ps, vec![0.3]);
        assert_eq!(cfg.attack.n, AttackSettings::default().n);
        assert!(toml::from_str::<ExperimentConfig>("[attack]\npz = [0.3]\n").is_err());
        let mut bad = ExperimentConfig::default();
        bad.nlsr.methods = vec!["magic".into()];
        assert!(bad.validate().unwrap_err().contains("magic"));
    }

    #[test]
    fn eval_columns_name_the_prompt_and_filter_the_rows() {
        let default = ExperimentConfig::default();
        // the benchmark file must be there (validation checks every data source)
        let dir = tempfile::tempdir().unwrap();
        let harmbench = dir.path().join("harmbench_behaviors_text_test.csv");
        std::fs::write(
            &harmbench,
            "Behavior,FunctionalCategory,Tags\nb,standard,\n",
        )
        .unwrap();
        let text = format!(
            "[eval]\nharmful = {:?}\n\
             [eval.columns]\nharmful_prompt = \"Behavior\"\n\
             harmful_where = [\"FunctionalCategory=standard\", \"Tags!=context\"]\n",
            harmbench.display().to_string()
        );
        let cfg = ExperimentConfig::from_toml_over(&text, &default).unwrap();
        let c = &cfg.eval.columns;
        assert_eq!(c.harmful_prompt.as_deref(), Some("Behavior"));
        let shown: Vec<String> = c.harmful_where.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["FunctionalCategory=standard", "Tags!=context"]);
        assert!(c.harmful_where[1].key == "Tags" && !c.harmful_where[1].equal);
        assert!(c.task_where.is_empty() && c.task_label.is_none());
        // the rest of [eval] is the default's; the file round-trips through --print-config
        assert_eq!(cfg.eval.task, default.eval.task);
        let back = ExperimentConfig::from_toml_over(&cfg.to_toml(), &default).unwrap();
        assert_eq!(back, cfg);
        // a malformed filter and an unknown key are errors that say so
        let err = ExperimentConfig::from_toml_over(
            "[eval.columns]\nharmful_where = [\"FunctionalCategory\"]\n",
            &default,
        )
        .unwrap_err();
        assert!(err.contains("expected KEY=VALUE"), "{err}");
        let err =
            ExperimentConfig::from_toml_over("[eval.columns]\nharmful_colum = \"x\"\n", &default)
                .unwrap_err();
        assert!(err.contains("harmful_colum"), "{err}");
    }
}
