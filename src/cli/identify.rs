//! `realign identify`: NLSR's safety-critical neurons of a reference adapter, as a masks file
//! and its JSON report; `realign identify overlap A B`: how much two masks files agree.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use clap::ValueEnum;
use realign::adapters::Adapter;
use realign::bench::Figure;
use realign::model::LoadedModel;
use realign::nlsr::identify::{self, Granularity, IdentifyConfig, Method, Scope};
use realign::nlsr::masks;

/// Scoring methods.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum MethodArg {
    /// The paper's rank reduction (Eqs. 3-6): |U U^T W|, U the top left singular vectors of W X
    LowRank,
    /// |W| * sqrt(mean x^2) per input column
    Wanda,
    /// |W * dNLL/dW| on the safe responses
    Snip,
    /// |W * dDPO/dW|, safe over unsafe responses, reference = the base model (beta 0.1)
    PreferenceSnip,
    /// Uniform random scores (seeded)
    Random,
}

/// What a neuron is.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum GranularityArg {
    /// One weight entry
    Entry,
    /// A whole row (scores summed over the row)
    Row,
    /// A whole column (scores summed over the column)
    Column,
}

/// Flags of `realign identify`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    sub: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Print the overlap of two masks files as JSON: per tensor and overall, |A and B| / |A|
    /// and the Jaccard index
    Overlap {
        /// The first masks file
        first: PathBuf,
        /// The second masks file
        second: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Base model: HF folder or GGUF [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The safety reference adapter W_e whose LoRA entries are scored
    #[arg(long, required = true)]
    adapter: Option<PathBuf>,
    /// Safety corpus (harmful prompt + safe response) [default: embedded:safety_sft;
    /// embedded:safety_pref for preference-snip]
    #[arg(long)]
    data: Option<String>,
    /// Scoring method
    #[arg(long, value_enum, default_value = "low-rank")]
    method: MethodArg,
    /// P_SR: the fraction of each tensor not kept (0.8 keeps the top 20%)
    #[arg(long, default_value_t = 0.8)]
    sparsity: f64,
    /// What a neuron is: an entry, or whole rows or columns
    #[arg(long, value_enum, default_value = "entry")]
    granularity: GranularityArg,
    /// Keep the top entries within each output row instead of per tensor (the Wanda/SNIP
    /// variant of the authors' code)
    #[arg(long)]
    per_row: bool,
    /// low-rank: singular directions kept, q = round(f * min(rows, cols)) [default: 0.8]
    #[arg(long)]
    rank_fraction: Option<f64>,
    /// Use at most this many rows of the corpus
    #[arg(long)]
    max_samples: Option<usize>,
    /// Seed of --method random [default: 42]
    #[arg(long)]
    seed: Option<u64>,
    /// Sequences per forward pass
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence (longer responses are cut; longer prompts skipped)
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
    /// Output masks file (safetensors); the report goes beside it with the extension .json
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// Replace the masks file and its report if they exist (without this flag they are refused
    /// and left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign identify`.
pub fn run(a: Args) -> anyhow::Result<()> {
    match a.sub {
        Some(Sub::Overlap { first, second }) => overlap(&first, &second),
        None => identify_cmd(a.run),
    }
}

fn overlap(first: &Path, second: &Path) -> anyhow::Result<()> {
    let load = |p: &Path| {
        masks::load(p, &Device::Cpu).with_context(|| format!("loading masks {}", p.display()))
    };
    let report = identify::overlap(&load(first)?, &load(second)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `--rank-fraction` when no flag is given (the paper's).
const DEFAULT_RANK_FRACTION: f64 = 0.8;
/// `--seed` when no flag is given.
const DEFAULT_SEED: u64 = 42;

/// Refuses a flag that the chosen method would ignore: `--rank-fraction` without
/// `--method low-rank`, `--seed` without `--method random`, and the corpus flags (`--data`,
/// `--max-samples`) with `--method random`, which reads no corpus.
fn refuse_unused_flags(a: &RunArgs) -> anyhow::Result<()> {
    let name = a
        .method
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string());
    let unused = |flag: &str, used_by: &str| {
        anyhow::anyhow!(
            "{flag} is not used by --method {name} (only by {used_by}): drop it or change \
             the method"
        )
    };
    if a.rank_fraction.is_some() && !matches!(a.method, MethodArg::LowRank) {
        return Err(unused("--rank-fraction", "--method low-rank"));
    }
    if a.seed.is_some() && !matches!(a.method, MethodArg::Random) {
        return Err(unused("--seed", "--method random"));
    }
    if matches!(a.method, MethodArg::Random) {
        if a.data.is_some() {
            return Err(unused("--data", "the methods that read a corpus"));
        }
        if a.max_samples.is_some() {
            return Err(unused("--max-samples", "the methods that read a corpus"));
        }
    }
    Ok(())
}

fn identify_cmd(a: RunArgs) -> anyhow::Result<()> {
    refuse_unused_flags(&a)?;
    let (Some(adapter_path), Some(output)) = (a.adapter, a.output) else {
        anyhow::bail!("realign identify needs --adapter W_e and -o MASKS");
    };
    let report_path = identify::report_path(&output);
    if output
        .extension()
        .is_some_and(|e| e.to_str() != Some("safetensors"))
    {
        anyhow::bail!(
            "the masks file {} must be named .safetensors (or have no extension): its report is \
             written beside it as {}, which another extension could collide with",
            output.display(),
            report_path.display()
        );
    }
    let method = match a.method {
        MethodArg::LowRank => Method::LowRank,
        MethodArg::Wanda => Method::Wanda,
        MethodArg::Snip => Method::Snip,
        MethodArg::PreferenceSnip => Method::PreferenceSnip,
        MethodArg::Random => Method::Random,
    };
    let cfg = IdentifyConfig {
        method,
        sparsity: a.sparsity,
        granularity: match a.granularity {
            GranularityArg::Entry => Granularity::Entry,
            GranularityArg::Row => Granularity::Row,
            GranularityArg::Column => Granularity::Column,
        },
        scope: if a.per_row {
            Scope::PerRow
        } else {
            Scope::PerTensor
        },
        rank_fraction: a.rank_fraction.unwrap_or(DEFAULT_RANK_FRACTION),
        seed: a.seed.unwrap_or(DEFAULT_SEED),
        max_samples: a.max_samples,
        batch_size: a.batch_size,
        max_length: a.max_length,
        ..Default::default()
    };
    cfg.validate()?;
    realign::fsutil::refuse_existing(&output, a.overwrite)?;
    realign::fsutil::refuse_existing(&report_path, a.overwrite)?;
    let model_path = super::model_path(a.model)?;
    let dev = super::device(&a.device)?;
    let loaded = super::load_model(&model_path, dev.clone(), a.dtype)?;
    let adapter = Adapter::load(&adapter_path, &dev)
        .with_context(|| format!("loading the adapter {}", adapter_path.display()))?;
    let data = a.data.unwrap_or_else(|| {
        if method == Method::PreferenceSnip {
            "embedded:safety_pref".into()
        } else {
            "embedded:safety_sft".into()
        }
    });
    let rows = if method == Method::Random {
        Vec::new()
    } else {
        realign::data::load_source(&data).with_context(|| format!("loading the data {data}"))?
    };
    let (m, report) =
        identify::identify(&loaded.model, &loaded.tokenizer, &adapter, &rows, &cfg)
            .with_context(|| format!("identifying safety neurons of {}", adapter_path.display()))?;
    masks::save(&m, &output)?;
    let mut json = serde_json::to_value(&report)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("model".into(), model_path.display().to_string().into());
        obj.insert("adapter".into(), adapter_path.display().to_string().into());
        let data = if method == Method::Random {
            None
        } else {
            Some(data)
        };
        obj.insert("data".into(), data.into());
    }
    // the pair is one output: without its report, the masks file is removed again
    if let Err(e) = realign::fsutil::write_atomic(
        &report_path,
        serde_json::to_string_pretty(&json)?.as_bytes(),
    ) {
        let _ = std::fs::remove_file(&output);
        return Err(e.into());
    }
    println!(
        "wrote {} ({} modules, {} method, density {:.4}, {} samples, {} tokens, {:.1} s) and {}",
        output.display(),
        m.modules.len(),
        report.method,
        report.density,
        report.samples,
        report.tokens,
        report.seconds,
        report_path.display()
    );
    Ok(())
}

/// `realign bench identify`: low-rank identification on the model with a fresh r 16 adapter on
/// all 7 modules (peft's init, then B drawn too so that no factor is zero), `max_samples` rows
/// of `embedded:safety_sft`; prints `identify_seconds` and the peak resident memory.
pub fn bench(loaded: &LoadedModel, max_samples: usize) -> anyhow::Result<()> {
    use realign::adapters::LoraConfig;
    use realign::train::TrainableLora;
    let targets = realign::model::LINEAR_MODULES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lora = TrainableLora::init(&loaded.model, LoraConfig::new(16, 32.0, targets), 7)?;
    let mut adapter = lora.to_adapter()?;
    for m in adapter.modules.values_mut() {
        // peft starts B at zero; a zero B would make every B score 0.
        m.b = (m.b.randn_like(0.0, 0.02)?).to_dtype(m.a.dtype())?;
    }
    let rows = realign::data::load_source("embedded:safety_sft")?;
    let cfg = IdentifyConfig {
        max_samples: Some(max_samples),
        ..Default::default()
    };
    let (_, report) = identify::identify(&loaded.model, &loaded.tokenizer, &adapter, &rows, &cfg)?;
    let detail = format!(
        "low-rank, r 16 on all 7 modules, {} samples of embedded:safety_sft, {} response tokens, batch {}",
        report.samples, report.tokens, cfg.batch_size
    );
    let print = |metric: &str, value: f64, unit: &str, detail: String| {
        let f = Figure::new("identify", metric, value, unit, detail);
        println!("{}", serde_json::to_string(&f).unwrap_or_default());
    };
    print("identify_seconds", report.seconds, "s", detail);
    print(
        "peak_rss_mib",
        peak_rss_kib().map_or(f64::NAN, |k| k as f64 / 1024.0),
        "MiB",
        "VmHWM of the whole process (model load included)".into(),
    );
    Ok(())
}

/// The process' peak resident set (`VmHWM` of `/proc/self/status`), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
