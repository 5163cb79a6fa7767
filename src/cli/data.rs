use std::path::{Path, PathBuf};

use anyhow::Context;
use realign::data::{self, MixConfig, PromptTemplate, EMBEDDED_SETS, MERGES, SPLITS};
use realign::tokenizer::Tokenizer;

/// Flags of `realign data`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// The harmful fine-tuning attack: n rows of task data of which a fraction p are harmful
    /// compliant examples; writes OUT and OUT.meta.json (sources, counts, seed, row indices)
    Mix {
        /// Task rows: a data file or `embedded:NAME`
        #[arg(long, default_value = "embedded:task_train")]
        task: String,
        /// Harmful rows: a data file or `embedded:NAME`
        #[arg(long, default_value = "embedded:harmful_attack")]
        harmful: String,
        /// Rows in the output
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Fraction of harmful rows (round(n * p) of them)
        #[arg(long, default_value_t = 0.05)]
        p: f64,
        /// Seed of the sampling and the order
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output JSONL file
        #[arg(short, long)]
        out: PathBuf,
        /// Replace the output if it exists (without this flag an existing output is refused and
        /// left untouched)
        #[arg(long)]
        overwrite: bool,
    },
    /// Write an embedded data set (see `realign data list`) as JSONL
    Export {
        /// The set's name (`task_train` or `embedded:task_train`)
        name: String,
        /// Output JSONL file
        #[arg(short, long)]
        out: PathBuf,
        /// Replace the output if it exists (without this flag an existing output is refused and
        /// left untouched)
        #[arg(long)]
        overwrite: bool,
    },
    /// Rows, detected format and row kinds of a data file (or `embedded:NAME`); with --model,
    /// token length percentiles of prompt + response
    Stats {
        /// A data file or `embedded:NAME`
        source: String,
        /// A model (Hugging Face folder or .gguf) whose tokenizer measures lengths
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt template for lengths: chat or alpaca
        #[arg(long, default_value = "chat", value_parser = ["chat", "alpaca"])]
        template: String,
    },
    /// The embedded data sets and the split table
    List,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Sub::Mix {
            task,
            harmful,
            n,
            p,
            seed,
            out,
            overwrite,
        } => {
            realign::fsutil::refuse_existing(&out, overwrite)?;
            realign::fsutil::refuse_existing(&data::meta_path(&out), overwrite)?;
            let mixed = data::mix_sources(&task, &harmful, &MixConfig { n, p, seed })?;
            data::write_mix(&out, &mixed)?;
            println!(
                "wrote {} ({} task + {} harmful rows{}) and {}",
                out.display(),
                mixed.meta.task.count,
                mixed.meta.harmful.count,
                match (mixed.meta.task.repeated, mixed.meta.harmful.repeated) {
                    (false, false) => "",
                    (true, false) => "; task rows repeated: the source is smaller",
                    (false, true) => "; harmful rows repeated: the source is smaller",
                    (true, true) => "; both sources repeated: they are smaller",
                },
                data::meta_path(&out).display()
            );
        }
        Sub::Export {
            name,
            out,
            overwrite,
        } => {
            realign::fsutil::refuse_existing(&out, overwrite)?;
            let name = name.strip_prefix("embedded:").unwrap_or(&name);
            let rows = data::embedded(name)?;
            data::write_jsonl(&out, &rows)?;
            println!("wrote {} rows of {name} to {}", rows.len(), out.display());
        }
        Sub::Stats {
            source,
            model,
            template,
        } => stats(&source, model.as_deref(), &template)?,
        Sub::List => {
            for set in EMBEDDED_SETS {
                let mut parts: Vec<String> = SPLITS
                    .iter()
                    .filter(|s| s.set == set.name)
                    .map(|s| format!("{} {}", s.count, s.source))
                    .collect();
                for m in MERGES.iter().filter(|m| m.set == set.name) {
                    parts.extend(
                        m.parts
                            .iter()
                            .map(|p| format!("{} {p}", data::planned_size(p).unwrap_or_default())),
                    );
                }
                println!(
                    "{:<16} {:<10} {:<5} {}: {}",
                    set.name,
                    set.kind,
                    if set.eval { "eval" } else { "train" },
                    parts.join(" + "),
                    set.description
                );
            }
        }
    }
    Ok(())
}

fn stats(source: &str, model: Option<&Path>, template: &str) -> anyhow::Result<()> {
    let rows = data::load_source(source)?;
    let format = match source.strip_prefix("embedded:") {
        Some(_) => "embedded".to_string(),
        None => serde_json::to_value(data::detect_format(Path::new(source))?)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let mut kinds = serde_json::Map::new();
    for row in &rows {
        let key = format!(
            "{}/{}",
            row.kind(),
            match row.prompt() {
                data::Prompt::Text(_) => "text",
                data::Prompt::Messages(_) => "messages",
            }
        );
        let count = kinds.get(&key).and_then(|v| v.as_u64()).unwrap_or(0);
        kinds.insert(key, (count + 1).into());
    }
    let mut report = serde_json::json!({
        "source": source,
        "format": format,
        "rows": rows.len(),
        "kinds": kinds,
    });
    if let Some(model) = model {
        let tok = load_tokenizer(model)?;
        let template = if template == "alpaca" {
            PromptTemplate::Alpaca
        } else {
            PromptTemplate::Chat
        };
        let mut lengths = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let enc = data::encode_row(&tok, template, None, row, usize::MAX)
                .with_context(|| format!("row {i} of {source}"))?;
            lengths.push(match enc {
                data::EncodedRow::Sft(e) | data::EncodedRow::Kto { completion: e, .. } => {
                    e.input_ids.len()
                }
                data::EncodedRow::Preference { chosen, rejected } => {
                    chosen.input_ids.len().max(rejected.input_ids.len())
                }
            });
        }
        lengths.sort_unstable();
        let pct = |q: f64| {
            let i = ((lengths.len() - 1) as f64 * q).round() as usize;
            lengths[i]
        };
        report["tokens"] = serde_json::json!({
            "model": model,
            "min": pct(0.0), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0),
        });
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The tokenizer of a Hugging Face folder or a GGUF file, without loading the weights.
pub(super) fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    if path.is_dir() {
        return Ok(Tokenizer::from_hf_dir(path)?);
    }
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("{}: not a model folder or a GGUF file", path.display()))?;
    Ok(Tokenizer::from_gguf(path, &content)?)
}
