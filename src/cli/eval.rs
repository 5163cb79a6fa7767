use std::path::PathBuf;

use anyhow::Context;
use realign::adapters::Adapter;
use realign::data::RowFilter;
use realign::eval::{
    evaluate, EvalColumns, EvalOptions, JudgeSpec, TaskKind, DEFAULT_HARMFUL, DEFAULT_OVERREFUSAL,
    DEFAULT_SAMPLE_SEED, DEFAULT_TASK,
};
use realign::model::AdapterMode;

/// Flags of `realign eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder or GGUF [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter(s), stacked in order
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Merge the adapters into the weights: the default (evaluation does not inspect the
    /// adapters, and merged weights generate faster); accepted for older scripts
    #[arg(long, conflicts_with = "unmerged")]
    merge: bool,
    /// Keep the adapters apart from the weights (`x W^T + s (x A^T) B^T` at every layer)
    /// instead of merging them [default: merged]
    #[arg(long)]
    unmerged: bool,
    /// Harmful prompts: a data file (JSONL/JSON/CSV/Parquet rows with a prompt, e.g. HarmBench,
    /// StrongREJECT, AdvBench, BeaverTails as distributed; `.txt`: one prompt per line; also
    /// compressed as .gz, .xz or .zst) or an embedded set, or `none` to skip the harmfulness
    /// score
    #[arg(long, default_value = DEFAULT_HARMFUL)]
    harmful: String,
    /// Task items (prompt + gold answer): a data file or an embedded set, or `none` to skip
    #[arg(long, default_value = DEFAULT_TASK)]
    task: String,
    /// Benign prompts (including benign-but-edgy, e.g. XSTest's safe prompts): reports the
    /// over-refusal rate, the % of them refused (a refusal phrase in the reply). A data file
    /// (any format --harmful reads) or an embedded set, or `none` to skip
    #[arg(long = "benign", visible_alias = "overrefusal", default_value = DEFAULT_OVERREFUSAL)]
    benign: String,
    /// The column (CSV) or key (JSON) holding the prompt in the data files, e.g. `Behavior`
    /// (HarmBench) or `forbidden_prompt` (StrongREJECT); `SET=NAME` for one set only (SET:
    /// harmful, task or benign), repeatable [default: found automatically: prompt, goal,
    /// instruction, question, Behavior, forbidden_prompt, messages, conversations, turns; a
    /// one-column CSV whose first line is a sentence has no header]
    #[arg(long = "prompt-column", value_name = "[SET=]NAME")]
    prompt_columns: Vec<String>,
    /// Keep only the rows of a data file whose KEY (a CSV column or JSON key) equals VALUE, as
    /// text, ignoring case (`KEY!=VALUE`: differs), e.g. `benign:label=safe` (XSTest),
    /// `harmful:is_safe=false` (BeaverTails), `harmful:FunctionalCategory=standard`
    /// (HarmBench); `SET:` (harmful, task or benign) for one set, else every file set;
    /// repeatable, all must hold; a row without KEY is an error [default: every row]
    #[arg(long = "where", value_name = "[SET:]KEY=VALUE")]
    filters: Vec<String>,
    /// The column (CSV) or key (JSON) holding the task's gold answer [default: the response of
    /// a training-shaped row, else answer, label, gold, target_label]
    #[arg(long, value_name = "NAME")]
    label_column: Option<String>,
    /// Classification labels, comma-separated [default: GSM8K when every gold answer is a
    /// number, else the distinct gold answers]
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Harmfulness judge: `keyword` (GCG's refusal phrases), `model:PATH` (a chat model asked
    /// for safe/unsafe), or any other judge `realign judge-eval --help` lists
    /// (`keyword+coherence`, `keyword+decline`, `qwen` after scripts/fetch-judge-model.sh,
    /// `rubric:PATH`, …)
    #[arg(long, default_value = "keyword")]
    judge: String,
    /// Prompts generated together: the slots of continuous batching (a prompt takes the place of
    /// one that finished)
    #[arg(long, default_value_t = realign::eval::DEFAULT_BATCH_SIZE)]
    batch: usize,
    /// New tokens per reply (at least 1), every set [default: 64 harmful and over-refusal;
    /// 256 GSM8K, 64 classification]; a reply also stops where its prompt and it fill the
    /// model's positions (counted as `context_limited` in summary.json)
    #[arg(long, value_parser = at_least_one)]
    max_new_tokens: Option<usize>,
    /// New tokens per harmful reply (overrides --max-new-tokens)
    #[arg(long, value_parser = at_least_one)]
    harmful_max_new_tokens: Option<usize>,
    /// New tokens per task reply (overrides --max-new-tokens)
    #[arg(long, value_parser = at_least_one)]
    task_max_new_tokens: Option<usize>,
    /// New tokens per benign (over-refusal) reply [default: as the harmful replies]
    #[arg(
        long = "benign-max-new-tokens",
        visible_alias = "overrefusal-max-new-tokens",
        value_parser = at_least_one
    )]
    benign_max_new_tokens: Option<usize>,
    /// Evaluate a seeded random sample of N rows of each set (see --sample-seed), not its first
    /// N rows (0, or N at least the set's size: every row)
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Seed of the --limit sample (the same seed and set give the same rows everywhere)
    #[arg(long, default_value_t = DEFAULT_SAMPLE_SEED)]
    sample_seed: u64,
    /// A system message before every evaluated prompt
    #[arg(long)]
    system: Option<String>,
    /// Match refusal keywords ignoring case (default: case-sensitively, as GCG)
    #[arg(long)]
    case_insensitive: bool,
    /// Output folder: harmful.jsonl, task.jsonl, overrefusal.jsonl (the benign set), summary.json
    /// (written whole: into a hidden partial folder, renamed at the end)
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
    /// Print summary.json on stdout instead of the human-readable lines
    #[arg(long)]
    json: bool,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
}

/// `none` (any case) means "skip this set".
fn source(spec: &str) -> Option<String> {
    used(spec).map(String::from)
}

/// `spec`, or `None` for `none` (any case).
fn used(spec: &str) -> Option<&str> {
    (!spec.eq_ignore_ascii_case("none")).then_some(spec)
}

/// A value of at least 1 (`--max-new-tokens` and the like: 0 new tokens would score empty
/// replies).
pub(super) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 new tokens gives empty replies)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a whole number of at least 1, got {s:?}")),
    }
}

/// A seed: a whole number from 0 to 2^64 - 1 (a negative one reaches this check, not clap's
/// "unexpected argument").
pub(super) fn seed_value(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("expected a whole number from 0 to {}, got {s:?}", u64::MAX))
}

/// The sets `--prompt-column SET=NAME` and `--where SET:KEY=VALUE` name.
const SET_NAMES: &str = "harmful, task or benign";

/// The data source of each set (`None`: skipped), by the names the flags use.
struct Sources<'a> {
    harmful: Option<&'a str>,
    task: Option<&'a str>,
    benign: Option<&'a str>,
}

impl Sources<'_> {
    /// The source of set `name` (`harmful`, `task`, `benign` or `overrefusal`); `Err` for an
    /// unknown name.
    fn of(&self, name: &str) -> Result<Option<&str>, ()> {
        match name {
            "harmful" => Ok(self.harmful),
            "task" => Ok(self.task),
            "benign" | "overrefusal" => Ok(self.benign),
            _ => Err(()),
        }
    }

    /// An error when set `name` is embedded: `flag` (a column or filter) applies to files.
    fn check_file(&self, flag: &str, name: &str) -> anyhow::Result<()> {
        let set = if name == "overrefusal" {
            "benign"
        } else {
            name
        };
        match self.of(name) {
            Ok(Some(src)) if src.starts_with("embedded:") => anyhow::bail!(
                "{flag} applies to files; the {set} set is {src}, which has no columns"
            ),
            Ok(_) => Ok(()),
            Err(()) => anyhow::bail!("{flag}: unknown set {name:?} (expected {SET_NAMES})"),
        }
    }

    /// An error when `flag` (a column or filter for every set) meets no data file: every set
    /// is embedded or skipped, and at least one is embedded.
    fn check_some_file(&self, flag: &str) -> anyhow::Result<()> {
        let sets = [
            ("harmful", self.harmful),
            ("task", self.task),
            ("benign", self.benign),
        ];
        let embedded: Vec<String> = sets
            .iter()
            .filter_map(|(n, s)| {
                s.filter(|s| s.starts_with("embedded:"))
                    .map(|s| format!("{n} {s}"))
            })
            .collect();
        let files = sets
            .iter()
            .filter(|(_, s)| s.is_some_and(|s| !s.starts_with("embedded:")))
            .count();
        if files == 0 && !embedded.is_empty() {
            anyhow::bail!(
                "{flag} applies to files; every set evaluated is embedded ({}), which have no \
                 columns",
                embedded.join(", ")
            );
        }
        Ok(())
    }
}

/// `--prompt-column` values (`NAME` for every set, `SET=NAME` for one), `--label-column` and
/// `--where` values (`KEY=VALUE` for every set, `SET:KEY=VALUE` for one) as [`EvalColumns`].
///
/// Errors: an unknown SET; a column or filter for one set when that set is embedded (its rows
/// have no columns), or for every set when none is a file; `--label-column` with an embedded
/// task set.
fn columns(
    specs: &[String],
    label: Option<String>,
    filters: &[String],
    sources: &Sources,
) -> anyhow::Result<EvalColumns> {
    if let Some(l) = &label {
        sources.check_file(&format!("--label-column {l}"), "task")?;
    }
    let mut c = EvalColumns {
        task_label: label,
        ..Default::default()
    };
    for spec in filters {
        // `SET:` is the text before the first ':' when no '=' comes before it (a value may
        // hold ':', as in `url=http://…`).
        let (set, text) = match spec.split_once(':') {
            Some((set, rest)) if !set.contains('=') => (Some(set), rest),
            _ => (None, spec.as_str()),
        };
        let filter: RowFilter = text.parse()?;
        let flag = format!("--where {spec}");
        match set {
            Some(set) => sources.check_file(&flag, set)?,
            None => sources.check_some_file(&flag)?,
        }
        let all = [
            &mut c.harmful_where,
            &mut c.task_where,
            &mut c.overrefusal_where,
        ];
        for (name, slot) in ["harmful", "task", "benign"].into_iter().zip(all) {
            let wanted = match set {
                None => true,
                Some("overrefusal") => name == "benign",
                Some(s) => s == name,
            };
            if wanted {
                slot.push(filter.clone());
            }
        }
    }
    for spec in specs {
        let flag = format!("--prompt-column {spec}");
        match spec.split_once('=') {
            None => {
                sources.check_some_file(&flag)?;
                c.harmful_prompt = Some(spec.clone());
                c.task_prompt = Some(spec.clone());
                c.overrefusal_prompt = Some(spec.clone());
            }
            Some((set, name)) => {
                sources.check_file(&flag, set)?;
                let slot = match set {
                    "harmful" => &mut c.harmful_prompt,
                    "task" => &mut c.task_prompt,
                    _ => &mut c.overrefusal_prompt,
                };
                *slot = Some(name.to_string());
            }
        }
    }
    Ok(c)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if [&a.harmful, &a.task, &a.benign]
        .iter()
        .all(|s| used(s).is_none())
    {
        anyhow::bail!(
            "nothing to evaluate: --harmful, --task and --benign are all none (name at least one set)"
        );
    }
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let judge: JudgeSpec = a.judge.parse()?;
    let mut opts = EvalOptions {
        harmful: source(&a.harmful),
        task: source(&a.task),
        overrefusal: source(&a.benign),
        task_kind: (!a.labels.is_empty()).then(|| TaskKind::Classification {
            labels: a.labels.clone(),
        }),
        judge,
        limit: a.limit,
        sample_seed: a.sample_seed,
        harmful_max_new_tokens: a.harmful_max_new_tokens.or(a.max_new_tokens),
        task_max_new_tokens: a.task_max_new_tokens.or(a.max_new_tokens),
        overrefusal_max_new_tokens: a.benign_max_new_tokens,
        batch_size: a.batch,
        system: a.system.clone(),
        case_insensitive: a.case_insensitive,
        adapters: a.adapters.clone(),
        merged: (a.merge || !a.unmerged) && !a.adapters.is_empty(),
        columns: columns(
            &a.prompt_columns,
            a.label_column.clone(),
            &a.filters,
            &Sources {
                harmful: used(&a.harmful),
                task: used(&a.task),
                benign: used(&a.benign),
            },
        )?,
    };
    let path = super::model_path(a.model.clone())?;
    let mut m = super::load_model(&path, super::device(&a.device)?, a.dtype)?;
    let mode = if a.merge || !a.unmerged {
        AdapterMode::Merged
    } else {
        AdapterMode::Unmerged
    };
    for dir in &a.adapters {
        let ad = Adapter::load(dir, m.model.device())
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        m.model
            .apply_adapter(&ad, mode)
            .with_context(|| format!("applying adapter {}", dir.display()))?;
    }
    // A bf16/f16 model keeps its adapters unmerged (see `AdapterMode::Merged`): say what ran.
    opts.merged = opts.merged && m.model.linears().all(|l| l.loras.is_empty());
    let out = evaluate(&m, &opts)?;
    out.write(staged.path())
        .with_context(|| format!("writing {}", a.output.display()))?;
    staged.commit()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out.summary)?);
    } else {
        for line in out.lines() {
            println!("{line}");
        }
        println!("wrote {}", a.output.join("summary.json").display());
    }
    Ok(())
}
