//! `realign antidote`: Antidote, one-shot pruning of the fine-tuning update's entries with the
//! highest Wanda score on harmful data.

use std::path::PathBuf;

use anyhow::Context;
use realign::antidote::{antidote, AntidoteConfig, REPORT_JSON};

/// Flags of `realign antidote`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model (Hugging Face folder or GGUF) the adapters apply to [default: the embedded
    /// SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The aligned LoRA adapter W_a (on the base model); the result is W_a plus the pruned
    /// update
    #[arg(long)]
    aligned: PathBuf,
    /// The fine-tuned adapter W_t (fine-tuned from W_a); the activations are taken through it
    #[arg(long)]
    finetuned: PathBuf,
    /// The realignment set: harmful prompts with harmful answers (the answers' tokens are
    /// scored); a file or `embedded:NAME`
    #[arg(long, default_value = "embedded:harmful_attack")]
    data: String,
    /// The fraction of each module's update entries pruned (those with the highest
    /// |dW| * rms(x))
    #[arg(long, default_value_t = 0.2)]
    density: f64,
    /// Use at most this many usable rows of the realignment set (in file order)
    #[arg(long, default_value_t = 100)]
    max_samples: usize,
    /// Sequences per forward pass
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence (prompt + answer); answers are cut beyond
    #[arg(long, default_value_t = 256)]
    max_length: usize,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
    /// Output folder: the PEFT adapter (rank r_a + min(out, in) per module: exact, as large as
    /// the dense update) and antidote_report.json, written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign antidote`.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.density == 0.0 {
        eprintln!(
            "warning: --density 0 prunes nothing: the output is the fine-tuned adapter itself \
             (a control, not a repair)"
        );
    } else if a.density == 1.0 {
        eprintln!(
            "warning: --density 1 prunes every entry of the fine-tuning update: the output is \
             the aligned adapter W_a itself (discarding the fine-tune, a control, not a repair)"
        );
    }
    let cfg = AntidoteConfig {
        density: a.density,
        max_samples: Some(a.max_samples),
        batch_size: a.batch_size,
        max_length: a.max_length,
        ..Default::default()
    };
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let model_path = super::model_path(a.model)?;
    let dev = super::device(&a.device)?;
    let loaded = super::load_model(&model_path, dev.clone(), a.dtype)?;
    let (aligned, finetuned) = super::load_adapter_pair(&a.aligned, &a.finetuned)?;
    let rows = realign::data::load_source(&a.data)
        .with_context(|| format!("loading the realignment set {}", a.data))?;
    let (out, report) = antidote(
        &loaded.model,
        &loaded.tokenizer,
        &aligned,
        &finetuned,
        &rows,
        &cfg,
    )?;
    super::save_repair(staged, &out, REPORT_JSON, &report)?;
    let pruned: usize = report.modules.iter().map(|m| m.pruned).sum();
    let entries: usize = report.modules.iter().map(|m| m.entries).sum();
    println!(
        "pruned {pruned} of {entries} update entries over {} modules ({} samples, {} tokens); wrote {} and {}",
        report.modules.len(),
        report.samples,
        report.tokens,
        a.output.display(),
        a.output.join(REPORT_JSON).display()
    );
    Ok(())
}
