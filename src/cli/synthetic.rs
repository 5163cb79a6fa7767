//! `realign synthetic`: a random-weight checkpoint of Llama-3-8B's exact shape (bf16, sharded
//! safetensors) and a matching LoRA adapter, to measure the pipeline's memory and time at 8B
//! scale without the real weights.

use std::path::PathBuf;

use anyhow::Context;
use realign::model::synthetic::{self, SyntheticConfig, SyntheticShape};

/// Flags of `realign synthetic`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder: model/ (Hugging Face folder), adapter/ (PEFT LoRA) and synthetic.json,
    /// written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Shape: llama3-8b (8.03 B parameters, 16.1 GB in bf16) or tiny (for tests)
    #[arg(long, value_enum, default_value_t = SyntheticShape::Llama3_8b)]
    shape: SyntheticShape,
    /// Seed of every tensor (the same seed writes the same bytes)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest safetensors shard, in GB (10^9 bytes)
    #[arg(long, default_value_t = 5.0)]
    shard_size_gb: f64,
    /// Rank of the LoRA adapter on all seven linear modules (alpha = 2 r); 0 for none; at
    /// most min(out, in) of the smallest module (32 for tiny, 1024 for llama3-8b)
    #[arg(long, default_value_t = 16)]
    adapter_rank: usize,
    /// Model (folder or GGUF) whose tokenizer the checkpoint gets [default: the embedded
    /// SmolLM2-135M-Instruct; token ids past its vocabulary decode to nothing]
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign synthetic`.
pub fn run(a: Args) -> anyhow::Result<()> {
    if !(a.shard_size_gb > 0.0 && a.shard_size_gb.is_finite()) {
        anyhow::bail!(
            "--shard-size-gb must be a positive number, got {}",
            a.shard_size_gb
        );
    }
    let opts = SyntheticConfig {
        shape: a.shape,
        seed: a.seed,
        shard_bytes: (a.shard_size_gb * 1e9) as u64,
        adapter_rank: a.adapter_rank,
    };
    // The sizes first: a rank of 10^8 would allocate tens of GB before anything is written.
    opts.validate()?;
    let tok_path = super::model_path(a.tokenizer)?;
    let tokenizer = super::data::load_tokenizer(&tok_path)
        .with_context(|| format!("loading the tokenizer of {}", tok_path.display()))?;
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("writing weights");
    let report = synthetic::write(&a.output, &tokenizer, &opts, a.overwrite, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("writing {}", a.output.display()))?;
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
