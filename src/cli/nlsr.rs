//! `realign amplify` and `realign patch`: NLSR's reference model and repair.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use realign::adapters::Adapter;
use realign::nlsr::amplify::{amplify_report, run as run_amplify, AmplifyMode};
use realign::nlsr::patch::{PatchConfig, REPORT_JSON};
use realign::nlsr::prune::{ProbabilityMapping, PruneConfig, Selection};
use realign::nlsr::stream::patch_files;
use realign::nlsr::transplant::TransplantMode;

fn load(path: &Path, what: &str) -> anyhow::Result<Adapter> {
    Adapter::load(path, &Device::Cpu)
        .with_context(|| format!("loading the {what} adapter {}", path.display()))
}

/// Which formula `realign amplify` applies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum AmplifyKind {
    /// Eq. 2 `(1+beta) W_a - beta W_0`, or with --alpha Eq. 1 `alpha W_a + (1-alpha) W_0`
    Paper,
    /// The authors' code: every tensor of W_a times 2*alpha (--alpha, default 0.9); no W_0
    Code,
}

/// Flags of `realign amplify`.
#[derive(clap::Args, Debug)]
pub struct AmplifyArgs {
    /// The aligned adapter W_a (preference-optimised; the strong one for --alpha)
    #[arg(long)]
    aligned: PathBuf,
    /// The weak safety adapter W_0 (SFT); needed by --mode paper
    #[arg(long)]
    weak: Option<PathBuf>,
    /// Pre-amplification coefficient of Eq. 2: W_e = (1+beta) W_a - beta W_0 (--mode paper;
    /// 0 to 100) [default: 0.9]
    #[arg(long, conflicts_with = "alpha")]
    beta: Option<f64>,
    /// Eq. 1 interpolation alpha W_a + (1-alpha) W_0 instead of Eq. 2; with --mode code, the
    /// factor 2*alpha
    #[arg(long)]
    alpha: Option<f64>,
    /// paper (Eqs. 1-2) or code (x 2*alpha on every tensor of W_a: dW x 4 alpha^2)
    #[arg(long, value_enum, default_value = "paper")]
    mode: AmplifyKind,
    /// Output folder: a PEFT adapter (config of W_a) and amplify_report.json, written whole
    /// (into a hidden partial folder, renamed at the end)
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign amplify`.
pub fn amplify(a: AmplifyArgs) -> anyhow::Result<()> {
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let aligned = load(&a.aligned, "aligned")?;
    if a.mode == AmplifyKind::Code && (a.weak.is_some() || a.beta.is_some()) {
        anyhow::bail!(
            "--mode code scales every tensor of W_a by 2*alpha and uses no W_0: drop --weak and \
             --beta, or use --mode paper"
        );
    }
    let mode = match (a.mode, a.alpha) {
        (AmplifyKind::Code, alpha) => AmplifyMode::Code {
            alpha: alpha.unwrap_or(0.9),
        },
        (AmplifyKind::Paper, Some(alpha)) => AmplifyMode::Interpolate { alpha },
        (AmplifyKind::Paper, None) => AmplifyMode::Extrapolate {
            beta: a.beta.unwrap_or(0.9),
        },
    };
    let weak = match (&a.weak, a.mode) {
        (Some(p), AmplifyKind::Paper) => Some(load(p, "weak")?),
        (None, AmplifyKind::Paper) => {
            anyhow::bail!("--mode paper needs --weak W_0 (the SFT adapter)")
        }
        (_, AmplifyKind::Code) => None,
    };
    let out = run_amplify(&aligned, weak.as_ref(), mode)?;
    out.save(staged.path())?;
    let report = amplify_report(&aligned, weak.as_ref(), &out, mode)?;
    realign::fsutil::write_atomic(
        &staged.path().join("amplify_report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    staged.commit()?;
    let path = a.output.join("amplify_report.json");
    println!(
        "wrote {} ({} modules, W_e = {} W_a + {} W_0) and {}",
        a.output.display(),
        out.modules.len(),
        report.coefficient_aligned,
        report.coefficient_weak,
        path.display()
    );
    Ok(())
}

/// Layer selection of `realign patch`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SelectKind {
    /// Eqs. 9-10: repair probability from the similarity rank, seeded Bernoulli draws
    Adaptive,
    /// Repair modules with S < --tau
    Threshold,
    /// Repair the --k least similar modules
    Topk,
}

/// Probability mapping of the adaptive mode.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProbKind {
    /// The paper's intent: less similar => more likely repaired
    Paper,
    /// The authors' code: (P_L - eps) + norm_rank * 2 eps, highest for the most similar
    Code,
}

/// Transplant form.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TransplantKind {
    /// Entry replacement in A and B (the authors' code; rank r)
    Replace,
    /// Eq. 11 exactly: a rank-2r LoRA for repaired modules (rank_pattern / alpha_pattern)
    Exact,
    /// A control, not the paper's repair: each factor of a repaired module moves toward the
    /// reference by its mask's density (replace's average over random masks of that density);
    /// if the masks repair no better than this, which neurons they pick does not matter
    Shrink,
}

/// Flags of `realign patch`.
#[derive(clap::Args, Debug)]
pub struct PatchArgs {
    /// The safety reference adapter W_e (from `realign amplify`)
    #[arg(long)]
    reference: PathBuf,
    /// The fine-tuned adapter W_t to repair
    #[arg(long)]
    finetuned: PathBuf,
    /// Masks of safety-critical neurons (safetensors, peft key names, 0/1 like each factor)
    #[arg(long)]
    masks: PathBuf,
    /// Which modules to repair
    #[arg(long, value_enum, default_value = "adaptive")]
    mode: SelectKind,
    /// Threshold for --mode threshold
    #[arg(long, required_if_eq("mode", "threshold"))]
    tau: Option<f64>,
    /// Number of modules for --mode topk
    #[arg(long, required_if_eq("mode", "topk"))]
    k: Option<usize>,
    /// P_L, the base layer pruning probability
    #[arg(long, default_value_t = 0.5)]
    layer_prune: f64,
    /// epsilon: probabilities span [P_L - eps, P_L + eps]
    #[arg(long, default_value_t = 0.2)]
    epsilon: f64,
    /// Seed of the Bernoulli draws (SplitMix64)
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Rank-to-probability direction for --mode adaptive
    #[arg(long, value_enum, default_value = "paper")]
    probability: ProbKind,
    /// How repaired modules are rebuilt
    #[arg(long, value_enum, default_value = "replace")]
    transplant: TransplantKind,
    /// Output folder: the PEFT adapter, patch_report.json, patch_report.md, similarity.svg and .png
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

/// Runs `realign patch`.
pub fn patch_cmd(a: PatchArgs) -> anyhow::Result<()> {
    if a.tau.is_some() && a.mode != SelectKind::Threshold {
        anyhow::bail!("--tau is the threshold of --mode threshold; this run's mode is {:?}: add --mode threshold, or drop --tau", a.mode);
    }
    if a.k.is_some() && a.mode != SelectKind::Topk {
        anyhow::bail!("--k is the module count of --mode topk; this run's mode is {:?}: add --mode topk, or drop --k", a.mode);
    }
    let selection = match a.mode {
        SelectKind::Adaptive => Selection::Adaptive,
        SelectKind::Threshold => {
            Selection::Threshold(a.tau.context("--mode threshold needs --tau")?)
        }
        SelectKind::Topk => Selection::TopK(a.k.context("--mode topk needs --k")?),
    };
    let config = PatchConfig {
        prune: PruneConfig {
            selection,
            mapping: match a.probability {
                ProbKind::Paper => ProbabilityMapping::Paper,
                ProbKind::Code => ProbabilityMapping::Code,
            },
            layer_prune: a.layer_prune,
            epsilon: a.epsilon,
            seed: a.seed,
        },
        transplant: match a.transplant {
            TransplantKind::Replace => TransplantMode::Replace,
            TransplantKind::Exact => TransplantMode::Exact,
            TransplantKind::Shrink => TransplantMode::Shrink,
        },
    };
    // streams: inputs memory-mapped and the output written module by module
    let staged = realign::fsutil::StagedDir::new(&a.output, a.overwrite)?;
    let report = patch_files(&a.reference, &a.finetuned, &a.masks, &config, staged.path())?;
    staged.commit()?;
    println!(
        "patched {} of {} modules ({}); wrote {} with {REPORT_JSON}",
        report.num_patched,
        report.num_modules,
        report.direction,
        a.output.display()
    );
    Ok(())
}
