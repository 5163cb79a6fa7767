//! `realign experiment`: the two papers' pipeline from one command, with every stage cached.
//!
//! | file | what |
//! |---|---|
//! | [`config`] | the experiment file and its embedded default (and `--quick`) |
//! | [`memory`] | peak resident memory per stage and per run (log, `report.json`) |
//! | [`cache`] | stage keys (hash of settings, upstream keys, file digests) and stage folders |
//! | [`plan`] | the stage graph: which stages, in which order, reading what |
//! | [`stages`] | running one stage: train, mix, amplify, identify, patch, Safe LoRA, eval, neurons |
//! | [`report`] | the tables (Markdown + JSON) and plots |
//! | [`rejudge`] | the report recomputed from stored replies under another judge |
//!
//! The stages, for the default: non-aligned base model; `W_0` (SFT); `W_a` (DPO on `W_0`); for
//! each `p`, the attack mix and `W_t`; Safe LoRA on each `W_t`; for each identification method
//! and each `p`, NLSR with pre-amplification (and without, as the ablation); sweeps of `beta`,
//! sparsity and `P_L` at the main `p`; safety neurons of the base model (detection,
//! deactivation vs an equal random set, SN-Tune, RSN-Tune with foundation neurons from general
//! text, and the attack of each tuned model); every variant evaluated on the held-out sets.

pub mod baselines;
pub mod cache;
pub mod config;
pub mod memory;
pub mod plan;
pub mod rejudge;
pub mod report;
pub mod stages;

use std::path::PathBuf;

pub use config::ExperimentConfig;
pub use plan::{Plan, Stage, StageKind, Variant};

/// Errors of the experiment runner.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The experiment file (or a stage record) is invalid.
    #[error("{path}: {what}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A stage failed; the message names it.
    #[error("stage {stage}: {what}")]
    Stage {
        /// The stage.
        stage: String,
        /// What went wrong.
        what: String,
    },
}

/// What the runner reports while it works (the CLI draws bars and writes the log from it).
pub trait Observer {
    /// The number of stages about to run (cached ones included).
    fn plan(&mut self, total: usize);
    /// Stage `index` (0-based) starts; `cached` when its finished folder is reused.
    fn stage_start(&mut self, index: usize, name: &str, cached: bool);
    /// Progress inside the current stage (training steps, prompts).
    fn stage_progress(&mut self, done: usize, total: usize, message: &str);
    /// The current stage finished: wall seconds and a one-line summary.
    fn stage_end(&mut self, name: &str, seconds: f64, summary: &str);
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn plan(&mut self, _: usize) {}
    fn stage_start(&mut self, _: usize, _: &str, _: bool) {}
    fn stage_progress(&mut self, _: usize, _: usize, _: &str) {}
    fn stage_end(&mut self, _: &str, _: f64, _: &str) {}
}

/// Runs (or resumes) the whole experiment and writes the report folder
/// (`OUTPUT/report/`). Returns the report. The output folder is held for the run
/// ([`crate::fsutil::DirLock`]): a second run on it fails at once with
/// [`crate::Error::Busy`].
pub fn run(cfg: &ExperimentConfig, obs: &mut dyn Observer) -> crate::Result<report::Report> {
    cfg.validate().map_err(|what| ExperimentError::Config {
        path: cfg.output.join("experiment.toml"),
        what,
    })?;
    std::fs::create_dir_all(&cfg.output).map_err(|e| crate::Error::io(&cfg.output, e))?;
    let _hold = crate::fsutil::DirLock::acquire(&cfg.output)?;
    let toml = cfg.to_toml();
    forget_reports_of_another_config(&cfg.output, &toml)?;
    crate::fsutil::write_atomic(&cfg.output.join("experiment.toml"), toml.as_bytes())?;
    let mut runner = stages::Runner::new(cfg)?;
    let plan = plan::build(cfg, &runner.inputs)?;
    obs.plan(plan.stages.len());
    let mut records = Vec::with_capacity(plan.stages.len());
    for (i, stage) in plan.stages.iter().enumerate() {
        records.push(runner.run_stage(i, stage, &plan, obs)?);
    }
    let mut report = report::Report::build(cfg, &plan, &records);
    report.neuron_overlaps = neuron_overlaps(&runner, &plan)?;
    report.peak_rss_mib = memory::read().map(|r| memory::mib(r.peak));
    report.host = Some(crate::host::Host::detect());
    report.write(&cfg.output.join("report"), &plan, &records)?;
    Ok(report)
}

/// Removes `OUTPUT/report/` and `OUTPUT/report-partial/` when the folder's `experiment.toml`
/// is not `toml` (the configuration about to run): from here on the folder describes the new
/// configuration, and a report of the old one beside it would be read as this run's numbers
/// (if this run stops early, or while it works). Finished stages are kept (their keys tell
/// them apart), so rerunning the old configuration rewrites its report from the cache.
fn forget_reports_of_another_config(output: &std::path::Path, toml: &str) -> crate::Result<()> {
    let previous = output.join("experiment.toml");
    let same = std::fs::read_to_string(&previous).is_ok_and(|t| t == toml);
    if same {
        return Ok(());
    }
    for name in ["report", rejudge::report_folder(true)] {
        let dir = output.join(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            let aside = output.join(format!(".{name}.{}.old", std::process::id()));
            std::fs::rename(&dir, &aside).map_err(|e| crate::Error::io(&dir, e))?;
            crate::fsutil::remove_path(&aside).map_err(|e| crate::Error::io(&aside, e))?;
        }
    }
    Ok(())
}

/// The paper's overlap ratio between every two detected neuron sets of the run.
fn neuron_overlaps(runner: &stages::Runner, plan: &Plan) -> crate::Result<Vec<report::Overlap>> {
    let sets: Vec<(String, crate::neurons::NeuronSet)> = plan
        .stages
        .iter()
        .filter(|s| matches!(s.kind, StageKind::Detect { .. }))
        .map(|s| {
            let set = crate::neurons::NeuronSet::load(&runner.dir(s).join(stages::SET_JSON))?;
            Ok((s.name.clone(), set))
        })
        .collect::<crate::Result<_>>()?;
    let mut out = Vec::new();
    for (i, (na, a)) in sets.iter().enumerate() {
        for (nb, b) in &sets[i + 1..] {
            out.push(report::Overlap {
                a: na.clone(),
                b: nb.clone(),
                intersection: a.intersection(b)?.len(),
                ratio_of_a: b.overlap(a)?,
                ratio_of_b: a.overlap(b)?,
            });
        }
    }
    Ok(out)
}
