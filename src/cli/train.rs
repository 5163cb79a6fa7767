use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use realign::train::{
    train_with, trainer::Progress, StepLog, TrainConfig, TrainError, TrainOptions,
};

/// Flags of `realign train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run's TOML file (method, model, init adapter or new LoRA, data, optimisation, output);
    /// see the `train::config` docs for every key and its default
    #[arg(long)]
    config: PathBuf,
    /// Continue from the newest checkpoint in the output folder (same data order, optimizer
    /// state and schedule); a folder with a checkpoint is taken without --overwrite
    #[arg(long)]
    resume: bool,
    /// Replace the output folder if it exists (default: off, an output folder that holds an
    /// adapter, checkpoints or any other file is refused and left untouched). The old folder
    /// is replaced only when the new run's folder is complete, or at its first checkpoint
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

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&mut self, total: usize) {
        self.0.set_length(total as u64);
    }
    fn step(&mut self, l: &StepLog) {
        self.0.set_position(l.step as u64);
        self.0.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            l.loss, l.lr, l.tokens_per_s
        ));
    }
}

/// Runs `realign train`: the run file is checked whole, then the output folder (refused if it
/// exists, unless `--overwrite`, or `--resume` with a checkpoint in it), then the model's
/// modules against `lora.target_modules`, before anything is trained. A new run is written
/// into a hidden folder beside the output and renamed into place at the end (or at its first
/// checkpoint), so an interrupted or failed run leaves no output folder.
pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = TrainConfig::from_file(&a.config)?;
    realign::train::check_output(&cfg.output, a.overwrite, a.resume)?;
    let path = super::model_path(cfg.model.clone())?;
    let loaded = super::load_model(&path, super::device(&a.device)?, a.dtype)?;
    let continued = cfg.init_adapter.is_some()
        || (a.resume && realign::train::trainer::latest_checkpoint(&cfg.output)?.is_some());
    if !continued {
        cfg.lora
            .check_targets(&loaded.model, &path.display().to_string())
            .map_err(|reason| TrainError::Config {
                path: a.config.clone(),
                reason,
            })?;
    }
    let rows = realign::data::load_source(&cfg.data.train)
        .with_context(|| format!("loading data {}", cfg.data.train))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = Bar(bar);
    let options = TrainOptions {
        resume: a.resume,
        staged: true,
    };
    let report = train_with(
        loaded.model,
        &loaded.tokenizer,
        &rows,
        &cfg,
        options,
        &mut progress,
    )?;
    progress.0.finish();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
