//! `realign resta`: RESTA, the safety vector added back to a fine-tuned adapter.

use std::path::PathBuf;

use realign::resta::{resta, resta_dare, REPORT_JSON};

/// Flags of `realign resta`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The aligned LoRA adapter W_a (on the base model): the safety vector s_a B_a A_a
    #[arg(long)]
    aligned: PathBuf,
    /// The fine-tuned adapter W_t (fine-tuned from W_a)
    #[arg(long)]
    finetuned: PathBuf,
    /// The scale gamma of the safety vector: W_r = W_t + gamma (W_a - W_base)
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    gamma: f64,
    /// DARE: drop each entry of the safety vector with this probability and scale the rest by
    /// 1/(1 - q) (the adapter is then written exactly, rank r_t + min(out, in) per module)
    /// [default: no sparsification]
    #[arg(long)]
    dare_drop: Option<f64>,
    /// Seed of DARE's draws
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder: the PEFT adapter (rank r_t + r_a) and resta_report.json, written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign resta`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let (aligned, finetuned) = super::load_adapter_pair(&a.aligned, &a.finetuned)?;
    let (out, report) = match a.dare_drop {
        Some(q) => resta_dare(&aligned, &finetuned, a.gamma, q, a.seed)?,
        None => resta(&aligned, &finetuned, a.gamma)?,
    };
    super::save_repair(staged, &out, REPORT_JSON, &report)?;
    let path = a.output.join(REPORT_JSON);
    println!(
        "W_r = W_t + {} (W_a - W_base) over {} modules, rank {}; wrote {} and {}",
        a.gamma,
        report.num_modules,
        report.rank,
        a.output.display(),
        path.display()
    );
    Ok(())
}
