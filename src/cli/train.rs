use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use realign::model::{LoadOptions, LoadedModel};
use realign::train::{train, trainer::Progress, StepLog, TrainConfig};

/// Flags of `realign train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run's TOML file (method, model, init adapter or new LoRA, data, optimisation, output);
    /// see the `train::config` docs for every key and its default
    #[arg(long)]
    config: PathBuf,
    /// Continue from the newest checkpoint in the output folder (same data order, optimizer
    /// state and schedule)
    #[arg(long)]
    resume: bool,
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

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = TrainConfig::from_file(&a.config)?;
    let path = super::model_path(cfg.model.clone())?;
    let loaded = LoadedModel::load(
        &path,
        &LoadOptions {
            device: super::device(&a.device)?,
            dtype: a.dtype,
        },
    )
    .with_context(|| format!("loading model {}", path.display()))?;
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
    let report = train(
        loaded.model,
        &loaded.tokenizer,
        &rows,
        &cfg,
        a.resume,
        &mut progress,
    )?;
    progress.0.finish();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
