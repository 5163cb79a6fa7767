use std::path::PathBuf;

use anyhow::Context;
use realign::eval::human_labels::{self, LabelSet};
use realign::eval::judge_eval::{split_rows, Split};
use realign::eval::judges::{self, JudgeOptions};
use realign::eval::{judge_eval, DEFAULT_SAMPLE_SEED};

/// Flags of `realign judge-eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A judge to measure (repeat for several): `keyword`, `keyword+coherence`,
    /// `keyword+decline` (also a first-person decline in the reply's opening), `model:PATH` (a
    /// chat model folder or GGUF: guard + refusal templates), `refusal:PATH`, `rubric:PATH`
    /// (StrongREJECT-style), `qwen` (needs scripts/fetch-judge-model.sh), `ensemble:PATH`
    /// [default: keyword, keyword+coherence and keyword+decline]
    #[arg(long = "judge")]
    judges: Vec<String>,
    /// Human-labelled set: refusal, harm, objective or all
    #[arg(long, default_value = "all")]
    set: String,
    /// Which rows of each set: all, tune (the first half of a seeded shuffle, for choosing
    /// templates and thresholds) or report (the other half, for measuring a tuned judge)
    #[arg(long, default_value = "all")]
    split: String,
    /// Judge at most N rows of each set (0: every row): a seeded random sample with --split all,
    /// the first N of the shuffled half otherwise
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Seed of the --limit sample and of the --split shuffle
    #[arg(long, default_value_t = DEFAULT_SAMPLE_SEED)]
    sample_seed: u64,
    /// Folder of the human-labelled sets (refusal_scorer/, harm/, objective/ with PyRIT's CSV
    /// files) [default: <cache>/data/scorer_evals, fetched by scripts/setup.sh]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder: judge-eval.json, judge-eval.md, verdicts.jsonl (written whole: into a
    /// hidden partial folder, renamed at the end)
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
    /// Pairs per judge-model batch
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Match refusal keywords ignoring case (default: case-sensitively, as GCG)
    #[arg(long)]
    case_insensitive: bool,
    /// Device of a judge model: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print judge-eval.json on stdout instead of the summary lines
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let sets: Vec<LabelSet> = if a.set == "all" {
        LabelSet::ALL.to_vec()
    } else {
        vec![a.set.parse()?]
    };
    let split: Split = a.split.parse()?;
    if let Some(d) = &a.data {
        if !d.is_dir() {
            anyhow::bail!(
                "--data {}: {} (expected the folder holding refusal_scorer/, harm/ and objective/)",
                d.display(),
                if d.exists() {
                    "not a folder"
                } else {
                    "no such folder"
                }
            );
        }
    }
    let dir = a.data.clone().unwrap_or_else(human_labels::default_dir);
    let mut loaded = Vec::with_capacity(sets.len());
    for set in sets {
        let rows = human_labels::load_set(&dir, set)
            .with_context(|| format!("loading the {set} set from {}", dir.display()))?;
        loaded.push((set, split_rows(rows, split, a.limit, a.sample_seed)));
    }
    let opts = JudgeOptions {
        device: super::device(&a.device)?,
        batch_size: a.batch,
        case_insensitive: a.case_insensitive,
    };
    let specs = if a.judges.is_empty() {
        ["keyword", "keyword+coherence", "keyword+decline"]
            .map(String::from)
            .to_vec()
    } else {
        a.judges.clone()
    };
    let judges = specs
        .iter()
        .map(|s| judges::build(s, &opts).with_context(|| format!("judge {s}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = judge_eval(&judges, &loaded, split, a.limit, a.sample_seed)?;
    report
        .write(staged.path())
        .with_context(|| format!("writing {}", a.output.display()))?;
    staged.commit()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
        println!("wrote {}", a.output.join("judge-eval.md").display());
    }
    Ok(())
}
