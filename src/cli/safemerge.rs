//! `realign safemerge`: SafeMERGE, the fine-tuned adapter merged with the aligned one in the
//! modules whose fine-tuning update left the safety subspace.

use std::path::PathBuf;

use realign::safemerge::{safemerge, REPORT_JSON};

/// Flags of `realign safemerge`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The aligned LoRA adapter W_a (on the base model): the safe model merged in, and the
    /// alignment update V of Safe LoRA's projection
    #[arg(long)]
    aligned: PathBuf,
    /// The fine-tuned adapter W_t (fine-tuned from W_a)
    #[arg(long)]
    finetuned: PathBuf,
    /// Merge the modules whose Safe LoRA cosine cos(C dW, dW) of the fine-tuning update
    /// dW = W_t - W_a is below this threshold
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    threshold: f64,
    /// The weight of the fine-tuned model in a merged module: alpha W_t + (1 - alpha) W_a
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Output folder: the PEFT adapter (rank r_t + r_a) and safemerge_report.json, written
    /// whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign safemerge`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let (aligned, finetuned) = super::load_adapter_pair(&a.aligned, &a.finetuned)?;
    let (out, report) = safemerge(&aligned, &finetuned, a.threshold, a.alpha)?;
    super::save_repair(staged, &out, REPORT_JSON, &report)?;
    println!(
        "merged {} of {} modules (cos < {}, alpha {}); wrote {} and {}",
        report.num_merged,
        report.modules.len(),
        a.threshold,
        a.alpha,
        a.output.display(),
        a.output.join(REPORT_JSON).display()
    );
    Ok(())
}
