//! `realign diagnose`: the intake check of a fine-tuned adapter (drift of the safety regions,
//! Safe LoRA's statistic, what NLSR would repair, a verdict), changing nothing.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use realign::adapters::Adapter;
use realign::diagnose::{
    diagnose, write_diagnosis, DiagnoseConfig, DEFAULT_DRIFT_THRESHOLD, DEFAULT_SAFELORA_TAU,
    REPORT_JSON,
};
use realign::model::{AdapterMode, LoadOptions, LoadedModel};
use realign::nlsr::prune::PruneConfig;

/// Flags of `realign diagnose`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The aligned adapter W_a the fine-tune started from
    #[arg(long)]
    aligned: PathBuf,
    /// The fine-tuned adapter W_t to check
    #[arg(long)]
    finetuned: PathBuf,
    /// NLSR's safety reference W_e (from `realign amplify`) [default: W_a]
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Masks of the safety-critical neurons (from `realign identify`): compare only those
    /// regions (Eq. 8) [default: whole modules]
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Verdict threshold tau_D on the overall drift D = mean(1 - S_j): D >= tau_D is "drifted";
    /// calibrate it on fine-tunes known to be benign
    #[arg(long, default_value_t = DEFAULT_DRIFT_THRESHOLD)]
    drift_threshold: f64,
    /// Safe LoRA's threshold: modules with cos(C dW, dW) < tau would be projected
    #[arg(long, default_value_t = DEFAULT_SAFELORA_TAU, allow_negative_numbers = true)]
    safelora_tau: f64,
    /// Seed of NLSR's layer-pruning draws (as `realign patch --seed`), for the modules NLSR
    /// would repair
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder: diagnose_report.json, diagnose_report.md, drift.svg and drift.png
    /// [default: print only]
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
    /// Also run a short behavioural probe of the fine-tuned model: greedy replies to N seeded
    /// harmful prompts and N benign-but-edgy prompts, keyword judge; HS and over-refusal with
    /// 95 % intervals go into the report (needs the base model, `--model`) [default: no probe]
    #[arg(long, value_name = "N")]
    probe: Option<usize>,
    /// The base model the adapters apply to (for `--probe`) [default: the embedded
    /// SmolLM2-135M-Instruct]
    #[arg(long, requires = "probe")]
    model: Option<PathBuf>,
    /// Harmful prompts of the probe (any file `realign eval --harmful` reads, or
    /// `embedded:NAME`)
    #[arg(long, default_value = realign::diagnose::PROBE_HARMFUL, requires = "probe")]
    probe_harmful: String,
    /// Benign-but-edgy prompts of the probe (over-refusal)
    #[arg(long, default_value = realign::diagnose::PROBE_BENIGN, requires = "probe")]
    probe_benign: String,
    /// New tokens per probe reply (at least 1)
    #[arg(
        long,
        default_value_t = 32,
        value_parser = super::eval::at_least_one,
        requires = "probe"
    )]
    probe_max_new_tokens: usize,
    /// Print diagnose_report.json on stdout instead of the summary lines
    #[arg(long)]
    json: bool,
}

fn load(path: &Path, what: &str) -> anyhow::Result<Adapter> {
    Adapter::load(path, &Device::Cpu)
        .with_context(|| format!("loading the {what} adapter {}", path.display()))
}

/// Runs `realign diagnose`.
pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(dir) = &a.output {
        realign::fsutil::refuse_existing(dir, a.overwrite)?;
    }
    let aligned = load(&a.aligned, "aligned")?;
    let finetuned = load(&a.finetuned, "fine-tuned")?;
    let reference = a
        .reference
        .as_deref()
        .map(|p| load(p, "reference"))
        .transpose()?;
    let masks = a
        .masks
        .as_deref()
        .map(|p| {
            realign::nlsr::masks::load(p, &Device::Cpu)
                .with_context(|| format!("loading the masks {}", p.display()))
        })
        .transpose()?;
    let config = DiagnoseConfig {
        drift_threshold: a.drift_threshold,
        safelora_tau: a.safelora_tau,
        prune: PruneConfig {
            seed: a.seed,
            ..Default::default()
        },
    };
    let mut d = diagnose(
        &aligned,
        &finetuned,
        reference.as_ref(),
        masks.as_ref(),
        &config,
    )?;
    if let Some(n) = a.probe {
        if n == 0 {
            anyhow::bail!("--probe 0: give at least 1 prompt per set");
        }
        let path = super::model_path(a.model.clone())?;
        let mut m = LoadedModel::load(&path, &LoadOptions::default())
            .with_context(|| format!("loading model {}", path.display()))?;
        m.model
            .apply_adapter(&finetuned, AdapterMode::Merged)
            .with_context(|| format!("applying the adapter {}", a.finetuned.display()))?;
        d.probe = Some(realign::diagnose::probe(
            &m,
            &path.display().to_string(),
            &a.probe_harmful,
            &a.probe_benign,
            n,
            a.seed,
            a.probe_max_new_tokens,
        )?);
    }
    if let Some(dir) = &a.output {
        let staged = realign::fsutil::StagedDir::new(dir, a.overwrite)?;
        write_diagnosis(staged.path(), &d).with_context(|| format!("writing {}", dir.display()))?;
        staged.commit()?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    println!(
        "safety drift D = {:.6} over {} modules (mean 1 - S_j); worst layer {} ({:.6})",
        d.drift,
        d.num_modules,
        d.max_drift_layer.map_or("-".to_string(), |l| l.to_string()),
        d.max_layer_drift
    );
    println!(
        "Safe LoRA: mean cos {:.4}, {} modules below tau {}; NLSR would repair {} modules",
        d.mean_safelora_cosine, d.num_safelora_project, config.safelora_tau, d.num_nlsr_repair
    );
    if let Some(p) = &d.probe {
        println!(
            "probe: HS {} (non-degenerate {}) on {}; over-refusal {} on {}",
            p.hs, p.hs_nondegenerate, p.harmful, p.or, p.benign
        );
    }
    println!("{}", d.verdict_line);
    if let Some(dir) = &a.output {
        println!("wrote {}", dir.join(REPORT_JSON).display());
    }
    Ok(())
}
