//! `realign extract`: a full fine-tune as a LoRA adapter (truncated SVD of W_t − W_base), so
//! that the adapter-based repairs and `diagnose` run on fully fine-tuned model folders.

use std::path::PathBuf;

use realign::adapters::extract::{extract, ExtractConfig, SvdMethod, REPORT_JSON};

/// Flags of `realign extract`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model folder (Hugging Face safetensors, single or sharded; f32, bf16 or f16)
    #[arg(long)]
    base: PathBuf,
    /// The fully fine-tuned model folder (same architecture and tensor names as --base)
    #[arg(long)]
    finetuned: PathBuf,
    /// LoRA rank r of every module (lora_alpha = r, so the scale is 1)
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Module names to extract, comma-separated (peft's target_modules list semantics);
    /// every other tensor that changed is listed in the report as not captured
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: Vec<String>,
    /// SVD method: exact (faer's thin SVD), randomized (Halko et al. 2011, a sketch of
    /// rank + oversample columns), or auto (exact when min(out, in) <= 1024)
    #[arg(long, default_value = "auto", value_parser = parse_method)]
    svd: SvdMethod,
    /// Extra sketch columns of the randomized SVD
    #[arg(long, default_value_t = 16)]
    oversample: usize,
    /// Power iterations of the randomized SVD (more: more accurate on slowly decaying spectra;
    /// 0 to 100)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=100))]
    power_iterations: u16,
    /// Seed of the randomized sketches (mixed with each module's name)
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder: the PEFT adapter and extract_report.json (per-module captured energy),
    /// written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

fn parse_method(s: &str) -> Result<SvdMethod, String> {
    s.parse()
}

/// Runs `realign extract`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let cfg = ExtractConfig {
        rank: a.rank,
        targets: a.targets,
        method: a.svd,
        oversample: a.oversample,
        power_iterations: a.power_iterations.into(),
        seed: a.seed,
    };
    let (adapter, report) = extract(&a.base, &a.finetuned, &cfg)?;
    super::save_repair(staged, &adapter, REPORT_JSON, &report)?;
    println!(
        "{} modules at rank {}: {:.2} % of the update's energy captured (lowest module {:.2} %), {} unchanged; {} other tensor(s) changed and are not in the adapter{}; wrote {} in {:.1} s",
        report.num_modules,
        cfg.rank,
        100.0 * report.energy_captured,
        100.0 * report.min_module_energy,
        report.unchanged_modules,
        report.not_captured.len(),
        report
            .not_captured
            .first()
            .map(|t| format!(" (e.g. {})", t.name))
            .unwrap_or_default(),
        a.output.display(),
        report.seconds
    );
    Ok(())
}
