//! `realign safelora`: Safe LoRA's projection of a fine-tuned adapter.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use realign::adapters::Adapter;
use realign::safelora::{
    alignment_from_adapter, alignment_from_models, safe_lora, SafeLoraSelection,
};

/// Flags of `realign safelora`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The aligned LoRA adapter: V = (alpha/r) B_a A_a per module (kept factored)
    #[arg(long, conflicts_with_all = ["base", "aligned_model"], required_unless_present = "base")]
    aligned: Option<PathBuf>,
    /// The base model folder (with --aligned-model): V = W_aligned - W_base per module
    #[arg(long, requires = "aligned_model")]
    base: Option<PathBuf>,
    /// The aligned model folder (with --base)
    #[arg(long, requires = "base")]
    aligned_model: Option<PathBuf>,
    /// The fine-tuned adapter W_t
    #[arg(long)]
    finetuned: PathBuf,
    /// The adapter W_t was fine-tuned from (usually the aligned adapter W_a): project the
    /// fine-tuning update W_t − W_a (the rank-2r adapter [B_t | −B_a], [A_t; A_a]) instead of
    /// the whole W_t, as the Safe LoRA paper does. The output is then the projected update, to
    /// be stacked on W_a (`realign eval --adapter W_A --adapter OUT --merge`) [default: project
    /// W_t itself]
    #[arg(long)]
    update_from: Option<PathBuf>,
    /// Project modules with cos(C dW, dW) < threshold
    #[arg(
        long,
        conflicts_with = "num_layers",
        required_unless_present = "num_layers",
        allow_negative_numbers = true
    )]
    threshold: Option<f64>,
    /// Project the K modules with the lowest cosine
    #[arg(long)]
    num_layers: Option<usize>,
    /// Output folder: the PEFT adapter and safelora_report.json, written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign safelora`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let mut finetuned = Adapter::load(&a.finetuned, &dev)
        .with_context(|| format!("loading the fine-tuned adapter {}", a.finetuned.display()))?;
    if let Some(p) = &a.update_from {
        let from = Adapter::load(p, &dev)
            .with_context(|| format!("loading the adapter W_t started from {}", p.display()))?;
        finetuned = realign::safelora::finetuning_update(&from, &finetuned)?;
    }
    let alignment = match (&a.aligned, &a.base, &a.aligned_model) {
        (Some(p), _, _) => alignment_from_adapter(
            &Adapter::load(p, &dev)
                .with_context(|| format!("loading the aligned adapter {}", p.display()))?,
        ),
        (None, Some(base), Some(aligned)) => {
            alignment_from_models(base, aligned, &finetuned, &dev)?
        }
        _ => anyhow::bail!("give --aligned ADAPTER, or --base MODEL and --aligned-model MODEL"),
    };
    let selection = match (a.threshold, a.num_layers) {
        (Some(t), _) => SafeLoraSelection::Threshold(t),
        (None, Some(k)) => SafeLoraSelection::NumLayers(k),
        (None, None) => anyhow::bail!("give --threshold TAU or --num-layers K"),
    };
    let (out, report) = safe_lora(&alignment, &finetuned, selection)?;
    out.save(staged.path())?;
    realign::fsutil::write_atomic(
        &staged.path().join("safelora_report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    staged.commit()?;
    let path = a.output.join("safelora_report.json");
    println!(
        "projected {} of {} modules; wrote {} and {}",
        report.num_projected,
        report.modules.len(),
        a.output.display(),
        path.display()
    );
    Ok(())
}
