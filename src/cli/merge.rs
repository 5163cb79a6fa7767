//! `realign merge`: fold adapters into a model and write a Hugging Face folder that
//! transformers loads (with no adapter: a GGUF file converted to an f32 folder, a sharded
//! checkpoint to one file in its own dtype);
//! `--subtract` removes an adapter's update, so that a repair made on an
//! extracted adapter goes back onto the full fine-tune:
//! `W = W_t + ΔW_repaired − ΔW_extracted` keeps what the truncation did not capture.

use std::path::PathBuf;

use anyhow::Context;
use realign::adapters::Adapter;
use realign::model::{export_hf_with, AdapterMode, LoadOptions, LoadedModel};

/// Flags of `realign merge`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model: a Hugging Face folder or a GGUF file
    #[arg(long)]
    model: PathBuf,
    /// An adapter whose update is added (repeatable, applied in order)
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// An adapter whose update is subtracted (repeatable), e.g. the adapter `realign extract`
    /// made of the full fine-tune that --model is
    #[arg(long)]
    subtract: Vec<PathBuf>,
    /// Output folder: config.json, model.safetensors (in the weights' dtype: a bf16/f16
    /// checkpoint's matrices stay bf16/f16, GGUF and f32 inputs are f32), tokenizer files and
    /// merge_report.json, written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign merge`.
pub fn run(a: Args) -> anyhow::Result<()> {
    realign::fsutil::refuse_existing(&a.output, a.overwrite)?;
    let started = std::time::Instant::now();
    let opts = LoadOptions::default();
    let mut loaded = LoadedModel::load(&a.model, &opts)
        .with_context(|| format!("loading the model {}", a.model.display()))?;
    let load = |p: &PathBuf| {
        Adapter::load(p, &opts.device)
            .with_context(|| format!("loading the adapter {}", p.display()))
    };
    for p in &a.adapter {
        loaded
            .model
            .apply_adapter(&load(p)?, AdapterMode::Unmerged)
            .with_context(|| format!("applying the adapter {}", p.display()))?;
    }
    for p in &a.subtract {
        loaded
            .model
            .apply_adapter(&load(p)?.negated(), AdapterMode::Unmerged)
            .with_context(|| format!("subtracting the adapter {}", p.display()))?;
    }
    let names = |v: &[PathBuf]| {
        v.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    };
    let report = serde_json::json!({
        "model": a.model.display().to_string(),
        "added": names(&a.adapter),
        "subtracted": names(&a.subtract),
        "formula": "W = W_model + sum(added s B A) - sum(subtracted s B A), per module, in f32",
        "seconds": started.elapsed().as_secs_f64(),
    });
    let mut bytes = serde_json::to_vec_pretty(&report)?;
    bytes.push(b'\n');
    export_hf_with(
        &loaded.model,
        &loaded.tokenizer,
        &a.output,
        &[("merge_report.json", bytes)],
    )?;
    println!(
        "merged {} adapter(s), subtracted {}; wrote {}",
        a.adapter.len(),
        a.subtract.len(),
        a.output.display()
    );
    Ok(())
}
