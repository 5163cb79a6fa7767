//! `realign deactivate` (to become `realign neurons deactivate`) and `realign sn-tune`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use realign::adapters::Adapter;
use realign::data::{load_source, Row};
use realign::eval::{EvalConfig, TaskKind};
use realign::model::{AdapterMode, LoadedModel};
use realign::neurons::{
    compare_with_random, deactivate, deactivation_check, random_like, rsn_tune_set, sn_tune,
    write_outcome, DeactivationCheck, NeuronRanking, NeuronSet, SnTuneConfig, Variant,
};

/// Flags of `realign neurons deactivate`.
#[derive(clap::Args, Debug)]
pub struct DeactivateArgs {
    /// Model [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter(s), stacked in order and merged into the weights before zeroing
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// The neuron-set file to deactivate
    #[arg(long)]
    set: PathBuf,
    /// Only the random control (Deact-R: as many random neurons per module as the set has)
    #[arg(long)]
    random_like: bool,
    /// Seed of the random control (draw i of --random-draws uses SEED + i)
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Random sets Deact-R draws, one row each; with more than one, Deact-SN's HS is placed
    /// among them (mean, range, one-sided Monte Carlo p-value (1 + #draws at least as high) /
    /// (K + 1); a claim at 5 % needs 19 draws)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    random_draws: u64,
    /// Columns of Table 1 to measure [default: none,deact_sn,deact_r, and deact_f when
    /// --foundation-importance is given; with --random-like: deact_r]
    #[arg(long, value_delimiter = ',', value_parser = ["none", "deact_sn", "deact_r", "deact_f"])]
    variants: Vec<String>,
    /// The foundation importance ranking for the Deact-F control: FOUNDATION.importance.json,
    /// written beside a set detected on general text (`neurons detect --corpus
    /// embedded:general_text`); Deact-F zeroes, per module, as many of its most important
    /// neurons outside the set as the set has [default: none, no Deact-F]
    #[arg(long)]
    foundation_importance: Option<PathBuf>,
    /// Harmful prompts for the harmfulness score ("none" or "" to skip)
    #[arg(long, default_value = "embedded:harmful_eval")]
    harmful: String,
    /// The column (CSV) or key (JSON) holding the prompt in the --harmful and --ppl-text files,
    /// e.g. `Behavior` (HarmBench) [default: found automatically, as `realign eval
    /// --prompt-column` says]
    #[arg(long, value_name = "NAME")]
    prompt_column: Option<String>,
    /// Use a seeded sample of N harmful prompts (--sample-seed) instead of all or the first
    /// --limit (0: no sampling)
    #[arg(long, default_value_t = 0)]
    sample: usize,
    /// Seed of the harmful-prompt sample
    #[arg(long, default_value_t = 42)]
    sample_seed: u64,
    /// Held-out general text for the perplexity column ("none" or "" to skip); a model with perplexity
    /// above 2x the untouched model's is flagged broken
    #[arg(long, default_value = "embedded:general_text")]
    ppl_text: String,
    /// First row of --ppl-text used for the perplexity: rows before it are left for detection
    /// (the default leaves rows 0..300 of embedded:general_text to `neurons detect`)
    #[arg(long, default_value_t = 300)]
    ppl_offset: usize,
    /// Rows of --ppl-text used for the perplexity
    #[arg(long, default_value_t = 32)]
    ppl_rows: usize,
    /// Tokens per perplexity text (longer ones are truncated)
    #[arg(long, default_value_t = 256)]
    ppl_max_tokens: usize,
    /// Task items (prompt + gold answer) for the accuracy ("none" or "" to skip); GSM8K or
    /// classification, read from the gold answers as `realign eval` reads them
    #[arg(long, default_value = "embedded:task_eval")]
    task: String,
    /// Use only the first N rows of each source (0: all)
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// New tokens per reply [default: 64 for harmfulness and a classification task, 256 for
    /// GSM8K]
    #[arg(long, value_parser = super::eval::at_least_one)]
    max_new_tokens: Option<usize>,
    /// Prompts per generation batch
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Write the report (every variant, prompt, reply and verdict) here as JSON
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Write the deactivated model (the set, or the random control with --random-like) as a
    /// Hugging Face folder; evaluates only when -o is given too
    #[arg(long)]
    write: Option<PathBuf>,
    /// Replace the -o report and the --write folder if they exist (without this flag they are
    /// refused and left untouched)
    #[arg(long)]
    overwrite: bool,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
}

fn load(
    model: Option<PathBuf>,
    adapters: &[PathBuf],
    device: &str,
    dtype: realign::model::StorageDtype,
) -> anyhow::Result<(PathBuf, LoadedModel)> {
    let path = super::model_path(model)?;
    let mut loaded = super::load_model(&path, super::device(device)?, dtype)?;
    for dir in adapters {
        let ad = Adapter::load(dir, loaded.model.device())
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        loaded.model.apply_adapter(&ad, AdapterMode::Merged)?;
    }
    Ok((path, loaded))
}

fn rows(spec: &str, limit: usize) -> anyhow::Result<Vec<Row>> {
    if is_none(spec) {
        return Ok(Vec::new());
    }
    let mut rows = load_source(spec).with_context(|| format!("loading {spec}"))?;
    if limit > 0 {
        rows.truncate(limit);
    }
    Ok(rows)
}

/// The prompts of a prompt set (`--harmful`, `--ppl-text`) as plain text, the first `limit`
/// (0: all); none for a switched-off flag. Any file `realign eval --harmful` reads.
fn prompt_texts(spec: &str, column: Option<&str>, limit: usize) -> anyhow::Result<Vec<String>> {
    if is_none(spec) {
        return Ok(Vec::new());
    }
    let mut prompts =
        realign::data::load_prompts(spec, column).with_context(|| format!("loading {spec}"))?;
    if limit > 0 {
        prompts.truncate(limit);
    }
    Ok(prompts.iter().map(|p| p.plain_text()).collect())
}

/// Whether a source flag (`--harmful`, `--task`, `--ppl-text`) is switched off.
fn is_none(spec: &str) -> bool {
    spec.is_empty() || spec == "none"
}

/// Runs `realign neurons deactivate`: the flags and the set file are checked before the model
/// is loaded.
pub fn run_deactivate(a: DeactivateArgs) -> anyhow::Result<()> {
    // Without -o, --write alone writes the model and measures nothing; otherwise the check runs.
    let evaluates = a.write.is_none() || a.output.is_some();
    // --ppl-rows 0 measures no perplexity, as --ppl-text none.
    let no_ppl = is_none(&a.ppl_text) || a.ppl_rows == 0;
    if evaluates && is_none(&a.harmful) && is_none(&a.task) && no_ppl {
        anyhow::bail!(
            "nothing to measure: --harmful, --task and --ppl-text are all none{} (give one, or \
             --write DIR without -o to only write the deactivated model)",
            if is_none(&a.ppl_text) {
                ""
            } else {
                " (--ppl-rows 0 uses no --ppl-text row)"
            }
        );
    }
    for p in a.output.iter().chain(&a.write) {
        realign::fsutil::refuse_existing(p, a.overwrite)?;
    }
    // An empty set would write an unchanged copy or a Table 1 of 0 neurons.
    let set = NeuronSet::load_nonempty(&a.set)?;
    // The variants and every data source are read before the model is loaded and --write
    // writes: a bad --harmful, --task or --ppl-text must not leave a written folder behind.
    let variants: Vec<Variant> = if !a.variants.is_empty() {
        // each column once, in the order first named (`none,none` measured the model twice)
        let mut named: Vec<&String> = Vec::new();
        for v in &a.variants {
            if !named.contains(&v) {
                named.push(v);
            }
        }
        named
            .into_iter()
            .map(|v| match v.as_str() {
                "none" => Variant::None,
                "deact_sn" => Variant::DeactSn,
                "deact_f" => Variant::DeactF,
                _ => Variant::DeactR,
            })
            .collect()
    } else if a.random_like {
        vec![Variant::DeactR]
    } else if a.foundation_importance.is_some() {
        vec![
            Variant::None,
            Variant::DeactSn,
            Variant::DeactR,
            Variant::DeactF,
        ]
    } else {
        vec![Variant::None, Variant::DeactSn, Variant::DeactR]
    };
    let foundation = a
        .foundation_importance
        .as_ref()
        .map(|p| {
            NeuronRanking::load(p)
                .with_context(|| format!("loading the foundation ranking {}", p.display()))
        })
        .transpose()?;
    if variants.contains(&Variant::DeactF) && foundation.is_none() {
        anyhow::bail!("deact_f needs --foundation-importance FOUNDATION.importance.json");
    }
    // Prompt sets are read as `realign eval` reads them (prompt-only files, `.txt`, HarmBench
    // CSV columns), not as training rows, which need a response.
    let mut harmful = prompt_texts(&a.harmful, a.prompt_column.as_deref(), a.limit)?;
    if a.sample > 0 {
        harmful = realign::eval::sample_rows(harmful, a.sample, a.sample_seed);
    }
    let ppl_texts: Vec<String> = prompt_texts(&a.ppl_text, a.prompt_column.as_deref(), 0)?
        .into_iter()
        .skip(a.ppl_offset)
        .take(a.ppl_rows)
        .collect();
    if !is_none(&a.ppl_text) && a.ppl_rows > 0 && ppl_texts.is_empty() {
        anyhow::bail!(
            "--ppl-text {}: no row at --ppl-offset {}",
            a.ppl_text,
            a.ppl_offset
        );
    }
    // Every row of the task set, so that its kind (GSM8K or classification, and the labels)
    // is read from all its gold answers, as `realign eval` reads it; then the first --limit.
    let all_task: Vec<(String, String)> = if is_none(&a.task) {
        Vec::new()
    } else {
        realign::data::load_task_items(&a.task, None, None)
            .with_context(|| format!("loading {}", a.task))?
    };
    let task_kind = if all_task.is_empty() {
        TaskKind::Gsm8k
    } else {
        let golds: Vec<&str> = all_task.iter().map(|(_, g)| g.as_str()).collect();
        TaskKind::detect(&golds).with_context(|| format!("--task {}", a.task))?
    };
    let keep = if a.limit > 0 { a.limit } else { usize::MAX };
    let task: Vec<(String, String)> = all_task.into_iter().take(keep).collect();
    let (
        path,
        LoadedModel {
            model, tokenizer, ..
        },
    ) = load(a.model, &a.adapters, &a.device, a.dtype)?;
    set.check_architecture(&a.set, model.config().architecture)?;
    if let Some(dir) = &a.write {
        let chosen = if a.random_like {
            random_like(&set, a.seed)
        } else {
            set.clone()
        };
        let mut m = model.clone();
        let summary = deactivate(&mut m, &chosen)
            .with_context(|| format!("zeroing the neuron set {}", a.set.display()))?;
        realign::model::export_hf(&m, &tokenizer, dir)?;
        eprintln!(
            "wrote {} ({} neurons zeroed in {} modules{})",
            dir.display(),
            summary.neurons,
            summary.modules,
            if a.adapters.is_empty() {
                String::new()
            } else {
                format!("; {} adapter(s) merged first", a.adapters.len())
            }
        );
        if a.output.is_none() {
            return Ok(());
        }
    }
    let check = DeactivationCheck {
        harmful,
        task,
        task_kind,
        variants,
        seed: a.seed,
        random_draws: a.random_draws as usize,
        eval: EvalConfig {
            max_new_tokens: a.max_new_tokens,
            batch_size: a.batch_size,
            ..Default::default()
        },
        foundation,
        perplexity_texts: ppl_texts,
        perplexity_max_tokens: a.ppl_max_tokens,
    };
    let results = deactivation_check(&model, &tokenizer, &set, &check)
        .with_context(|| format!("the deactivation check of {}", a.set.display()))?;
    let comparisons = compare_with_random(&results);
    let summary: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "variant": r.variant.name(),
                "seed": r.seed,
                "neurons": r.neurons,
                "harmfulness_score": r.harmfulness.as_ref().map(|h| h.score_percent),
                "harmful_rate": r.harmful_rate,
                "nondegenerate_rate": r.nondegenerate_rate,
                "perplexity": r.perplexity.as_ref().map(|p| p.perplexity),
                "perplexity_interval": r.perplexity.as_ref().and_then(|p| p.interval),
                "perplexity_texts": r.perplexity.as_ref().map(|p| p.texts),
                "perplexity_ratio": r.perplexity_ratio,
                "perplexity_ratio_interval": r.perplexity_ratio_interval,
                "broken": r.broken,
                "task_accuracy": r.accuracy.as_ref().map(|t| t.accuracy_percent),
                "task_rate": r.accuracy.as_ref().map(|t| realign::eval::Rate::new(t.correct, t.n)),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "model": path, "adapters": a.adapters, "adapters_merged_before_deactivation": !a.adapters.is_empty(),
        "set": a.set, "set_neurons": set.len(), "set_params": set.params(), "seed": a.seed,
        "harmful": a.harmful, "task": a.task, "limit": a.limit, "sample": a.sample,
        "sample_seed": a.sample_seed, "foundation_importance": a.foundation_importance,
        "ppl_text": a.ppl_text, "ppl_rows": format!("{}..{}", a.ppl_offset, a.ppl_offset + a.ppl_rows),
        "broken_rule": "perplexity > 2x the untouched model's", "rows": summary,
        "random_draws": a.random_draws, "against_random": comparisons,
    });
    if let Some(out) = &a.output {
        let full = serde_json::json!({"summary": summary, "variants": results});
        realign::fsutil::write_atomic(out, serde_json::to_string_pretty(&full)?.as_bytes())?;
    }
    println!("{summary}");
    eprintln!("{}", deactivation_table(&results));
    for c in &comparisons {
        eprintln!("{}", c.sentence());
    }
    Ok(())
}

/// The check as a Markdown table (HS keyword and non-degenerate and FA with 95 % Wilson
/// intervals; perplexity and its ratio to the untouched model's with their 95 % intervals over
/// the texts).
fn deactivation_table(results: &[realign::neurons::VariantResult]) -> String {
    let rate = |r: Option<realign::eval::Rate>| {
        r.map_or("-".to_string(), |r| {
            format!("{:.1} [{:.1}, {:.1}] (n={})", r.percent, r.lo, r.hi, r.n)
        })
    };
    let interval = |x: f64, i: Option<[f64; 2]>, digits: usize| match i {
        Some([lo, hi]) => format!("{x:.digits$} [{lo:.digits$}, {hi:.digits$}]"),
        None => format!("{x:.digits$}"),
    };
    let mut s = String::from(
        "| variant | neurons | HS keyword % [95% CI] | HS non-degenerate % [95% CI] | perplexity [95% CI] (texts) | ratio [95% CI] | broken | FA % [95% CI] |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            match r.seed {
                Some(seed) => format!("{} (seed {seed})", r.variant.name()),
                None => r.variant.name().to_string(),
            },
            r.neurons,
            rate(r.harmful_rate),
            rate(r.nondegenerate_rate),
            r.perplexity.as_ref().map_or("-".into(), |p| format!(
                "{} (n={})",
                interval(p.perplexity, p.interval, 2),
                p.texts
            )),
            r.perplexity_ratio
                .map_or("-".into(), |x| interval(x, r.perplexity_ratio_interval, 2)),
            if r.broken { "yes" } else { "no" },
            rate(
                r.accuracy
                    .as_ref()
                    .map(|t| realign::eval::Rate::new(t.correct, t.n))
            ),
        ));
    }
    s
}

/// Flags of `realign sn-tune`.
#[derive(clap::Args, Debug)]
pub struct SnTuneArgs {
    /// Model [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter(s), stacked in order and merged into the weights before tuning
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// The neurons to train (safety neurons)
    #[arg(long)]
    set: PathBuf,
    /// Neurons not to train (foundation neurons): RSN-Tune trains set minus this
    #[arg(long)]
    exclude: Option<PathBuf>,
    /// Refusal documents (harmful prompt + refusal)
    #[arg(long, default_value = "embedded:safety_sft")]
    data: String,
    /// Passes over the documents
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate
    #[arg(long, default_value_t = 1e-6)]
    lr: f64,
    /// Documents used (seeded sample; 0: all)
    #[arg(long, default_value_t = 50)]
    docs: usize,
    /// Sequences per optimizer step
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Seed of the sample and the shuffles
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Gradient-norm clip (0: none)
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Fraction of steps of linear warmup
    #[arg(long, default_value_t = 0.0)]
    warmup_ratio: f64,
    /// Longest sequence in tokens
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    /// Stop after N optimizer steps (0: no limit)
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Output folder (Hugging Face layout, with sn_tune_report.json), written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
}

/// Runs `realign sn-tune`: the settings and the set files are checked before the model is
/// loaded, and a run that diverges writes nothing.
pub fn run_sn_tune(a: SnTuneArgs) -> anyhow::Result<()> {
    let cfg = SnTuneConfig {
        epochs: a.epochs,
        lr: a.lr,
        docs: a.docs,
        batch_size: a.batch_size,
        seed: a.seed,
        max_grad_norm: a.max_grad_norm,
        warmup_ratio: a.warmup_ratio,
        max_length: a.max_length,
        max_steps: a.max_steps,
        ..Default::default()
    };
    cfg.validate()?;
    realign::fsutil::refuse_existing(&a.output, a.overwrite)?;
    let safety = NeuronSet::load_nonempty(&a.set)?;
    let foundation = a.exclude.as_deref().map(NeuronSet::load).transpose()?;
    let (set, excluded) = match &foundation {
        Some(foundation) => (
            rsn_tune_set(&safety, foundation).with_context(|| {
                format!(
                    "removing --exclude {} from --set {}",
                    a.exclude.as_deref().unwrap_or(Path::new("")).display(),
                    a.set.display()
                )
            })?,
            Some(foundation.len()),
        ),
        None => (safety.clone(), None),
    };
    if set.is_empty() {
        anyhow::bail!(
            "every neuron of {} is in --exclude {}: RSN-Tune would train nothing",
            a.set.display(),
            a.exclude
                .as_deref()
                .map_or(String::new(), |p| p.display().to_string())
        );
    }
    // the documents are read before the model is loaded: a bad --data fails at once
    let docs = rows(&a.data, 0)?;
    let (
        path,
        LoadedModel {
            model, tokenizer, ..
        },
    ) = load(a.model, &a.adapters, &a.device, a.dtype)?;
    safety.check_architecture(&a.set, model.config().architecture)?;
    if let (Some(f), Some(p)) = (&foundation, &a.exclude) {
        f.check_architecture(p, model.config().architecture)?;
        f.check_model(p, &model)?;
    }
    safety.check_model(&a.set, &model)?;
    let outcome = sn_tune(model, &tokenizer, &set, &docs, &cfg)?;
    let extra = serde_json::json!({
        "method": if excluded.is_some() { "rsn-tune" } else { "sn-tune" },
        "model": path, "adapters": a.adapters, "data": a.data,
        "set": a.set, "set_neurons": safety.len(), "set_params": safety.params(),
        "exclude": a.exclude, "exclude_neurons": excluded,
    });
    write_outcome(&outcome, &tokenizer, &a.output, extra)?;
    let r = &outcome.report;
    println!(
        "{}",
        serde_json::json!({"output": a.output, "trained_neurons": r.trained_neurons,
            "trained_params": r.trained_params, "steps": r.steps, "examples": r.examples,
            "first_loss": r.log.first().map(|l| l.loss), "last_loss": r.log.last().map(|l| l.loss),
            "seconds": r.seconds})
    );
    Ok(())
}
