//! Subcommands. Each file parses its flags (clap derive) and calls the library.

mod antidote;
mod bench;
mod data;
mod diagnose;
mod eval;
mod experiment;
mod extract;
mod generate;
mod identify;
mod inspect;
mod judge_eval;
mod merge;
mod neurons;
mod nlsr;
mod resta;
mod safelora;
mod safemerge;
mod sn_tune;
mod synthetic;
mod train;

use clap::{Parser, Subcommand};

/// realign: give a fine-tuned language model its safety back (NLSR, SN-Tune) — in Rust.
#[derive(Parser, Debug)]
#[command(name = "realign", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a model (optionally with PEFT adapters), from a prompt or a chat turn.
    Generate(generate::Args),
    /// Describe a model (architecture, sizes, dtype, modules) or a PEFT adapter (rank, targets).
    Inspect(inspect::Args),
    /// Print speed figures as JSON lines: `realign bench forward|train|identify|patch|neurons|diagnose|gemm`.
    Bench(bench::Args),
    /// Train a LoRA adapter (SFT, DPO, ORPO, KTO, SimPO) from a TOML run file.
    Train(train::Args),
    /// Measure a model (+ adapters): harmfulness score and fine-tuning accuracy, every sample kept.
    Eval(eval::Args),
    /// Measure harmfulness and refusal judges against human labels (PyRIT's refusal, harm and
    /// objective sets): accuracy, Cohen's κ, precision, recall, per set and category.
    JudgeEval(judge_eval::Args),
    /// The whole experiment (alignment, attack, Safe LoRA, NLSR, safety neurons, evaluation) as
    /// cached stages, with the papers' tables: `realign experiment [CONFIG.toml] [--quick]`.
    Experiment(experiment::Args),
    /// Data sets: `realign data mix` (the attack), `export` (an embedded set), `stats`, `list`.
    Data(data::Args),
    /// NLSR pre-amplification: the safety reference W_e from the aligned W_a and the weak W_0.
    Amplify(nlsr::AmplifyArgs),
    /// NLSR safety-critical neurons of a reference adapter (Eqs. 3-6) as a masks file;
    /// `realign identify overlap A B` compares two masks files.
    Identify(identify::Args),
    /// NLSR repair: transplant the reference's safety-critical neurons into a fine-tuned adapter.
    Patch(nlsr::PatchArgs),
    /// Safe LoRA: project a fine-tuned adapter's updates onto the alignment subspace.
    Safelora(safelora::Args),
    /// Intake check of a fine-tuned adapter, changing nothing: drift of the safety regions
    /// (Eq. 8), Safe LoRA's cosine, the modules NLSR would repair, a verdict.
    Diagnose(diagnose::Args),
    /// RESTA: add the safety vector back to a fine-tuned adapter, W_t + gamma (W_a - W_base).
    Resta(resta::Args),
    /// SafeMERGE: merge a fine-tuned adapter with the aligned one where the fine-tuning update
    /// left the safety subspace (Safe LoRA's cosine below a threshold).
    Safemerge(safemerge::Args),
    /// Antidote: prune the fine-tuning update's entries with the highest Wanda score on harmful
    /// data (one shot, no training).
    Antidote(antidote::Args),
    /// A full fine-tune as a LoRA adapter: W_t - W_base per module, truncated by SVD, with the
    /// captured energy (then Safe LoRA, RESTA, diagnose and NLSR run on it).
    Extract(extract::Args),
    /// Fold adapters into a model (`--subtract` removes one) and write a Hugging Face folder.
    Merge(merge::Args),
    /// SN-Tune / RSN-Tune: train only the neurons of a set on refusal documents; writes a
    /// Hugging Face model folder.
    SnTune(sn_tune::SnTuneArgs),
    /// Safety neurons: `realign neurons detect` (neurons every prompt of a corpus activates),
    /// `realign neurons overlap A B`, `realign neurons deactivate` (Deact-SN vs Deact-R).
    Neurons(neurons::Args),
    /// A random-weight checkpoint of Llama-3-8B's exact shape (bf16, sharded) and a matching
    /// LoRA adapter, to measure memory and time at 8B scale without the real weights.
    Synthetic(synthetic::Args),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let prefetch = realign::model::prefetch::choice();
    if prefetch.forced.is_some() && !prefetch.understood {
        eprintln!("warning: prefetch {prefetch}");
    }
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::JudgeEval(a) => judge_eval::run(a),
        Command::Data(a) => data::run(a),
        Command::Experiment(a) => experiment::run(a),
        Command::Amplify(a) => nlsr::amplify(a),
        Command::Identify(a) => identify::run(a),
        Command::Patch(a) => nlsr::patch_cmd(a),
        Command::Safelora(a) => safelora::run(a),
        Command::Diagnose(a) => diagnose::run(a),
        Command::Resta(a) => resta::run(a),
        Command::Safemerge(a) => safemerge::run(a),
        Command::Antidote(a) => antidote::run(a),
        Command::Extract(a) => extract::run(a),
        Command::Merge(a) => merge::run(a),
        Command::SnTune(a) => sn_tune::run_sn_tune(a),
        Command::Neurons(a) => neurons::run(a),
        Command::Synthetic(a) => synthetic::run(a),
    }
}

/// The model path: the flag, else the embedded default (with a hint when it is not fetched).
fn model_path(flag: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let p = realign::assets::default_model();
    if !p.is_file() {
        anyhow::bail!(
            "the default model {} is not there: run scripts/setup.sh (or pass --model)",
            p.display()
        );
    }
    Ok(p)
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` cargo feature).
fn device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => Ok(candle_core::Device::new_cuda(0)?),
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Ok(candle_core::Device::new_cuda(n)?),
            None => anyhow::bail!("unknown device {s:?} (expected cpu, cuda or cuda:N)"),
        },
    }
}

/// Loads a model for a command (`loading model PATH` as the error's context) and warns, on
/// stderr, about each special-token id its files name but its vocabulary lacks (such an id is
/// ignored: an eos that can never stop generation, a bos never prepended).
fn load_model(
    path: &std::path::Path,
    device: candle_core::Device,
    dtype: realign::model::StorageDtype,
) -> anyhow::Result<realign::model::LoadedModel> {
    use anyhow::Context;
    let loaded =
        realign::model::LoadedModel::load(path, &realign::model::LoadOptions { device, dtype })
            .with_context(|| format!("loading model {}", path.display()))?;
    for ignored in loaded.tokenizer.ignored_ids() {
        eprintln!("warning: {}: {ignored}", path.display());
    }
    Ok(loaded)
}

/// Loads the aligned adapter `W_a` and the fine-tuned `W_t` (CPU), naming the file that fails.
fn load_adapter_pair(
    aligned: &std::path::Path,
    finetuned: &std::path::Path,
) -> anyhow::Result<(realign::adapters::Adapter, realign::adapters::Adapter)> {
    use anyhow::Context;
    let dev = candle_core::Device::Cpu;
    let load = |p: &std::path::Path, what: &str| {
        realign::adapters::Adapter::load(p, &dev)
            .with_context(|| format!("loading the {what} adapter {}", p.display()))
    };
    Ok((load(aligned, "aligned")?, load(finetuned, "fine-tuned")?))
}

/// Writes a repaired adapter and its JSON report into the staged output folder and renames
/// it into place (only when both are written).
fn save_repair<T: serde::Serialize>(
    staged: realign::fsutil::StagedDir,
    adapter: &realign::adapters::Adapter,
    report_file: &str,
    report: &T,
) -> anyhow::Result<()> {
    adapter.save(staged.path())?;
    realign::fsutil::write_atomic(
        &staged.path().join(report_file),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    staged.commit()?;
    Ok(())
}
