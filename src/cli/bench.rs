use std::path::PathBuf;

use realign::bench::{self, Figure};

/// Flags of `realign bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which benchmark: forward (prefill, decode, batched decode at batch 16 and 32 with and
    /// without its prefill), train
    /// (LoRA r 16 on all 7 modules, batch 8 x 128), identify (low-rank safety neurons: seconds
    /// and peak memory) or patch (NLSR's patch stage on a synthetic Llama-3-8B-shaped adapter, r 128; no model)
    /// or neurons (safety-neuron detection: seconds, peak memory, memory per prompt length)
    /// or diagnose (`realign diagnose` on the same synthetic adapter as patch; no model)
    /// or gemm (the matrix products of an 8 x 128 prefill alone, GFLOP/s; no model)
    #[arg(value_parser = ["forward", "train", "identify", "patch", "neurons", "diagnose", "gemm"])]
    name: String,
    /// Model [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
    /// Repetitions of each measurement; the best is reported
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
    /// identify only: rows of embedded:safety_sft used (at least 1) [default: 500]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_samples: Option<u32>,
    /// neurons only: prompts of embedded:safety_sft used for detect_seconds (at least 1)
    /// [default: 200]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    prompts: Option<u32>,
}

/// The benchmarks that load no model (`--model`, `--dtype` do not apply).
const NO_MODEL: [&str; 3] = ["patch", "diagnose", "gemm"];

pub fn run(a: Args) -> anyhow::Result<()> {
    let print = |f: Figure| println!("{}", serde_json::to_string(&f).unwrap_or_default());
    // A flag the chosen benchmark does not read is an error, not silently ignored.
    let name = a.name.as_str();
    let unused = [
        ("--model", a.model.is_some() && NO_MODEL.contains(&name)),
        (
            "--max-samples",
            a.max_samples.is_some() && name != "identify",
        ),
        ("--prompts", a.prompts.is_some() && name != "neurons"),
    ];
    if let Some((flag, _)) = unused.iter().find(|(_, bad)| *bad) {
        anyhow::bail!("{flag} is not used by `realign bench {name}`");
    }
    let repeats = a.repeats as usize;
    if a.name == "patch" {
        return Ok(bench::patch(repeats, print)?);
    }
    if a.name == "diagnose" {
        return Ok(bench::diagnose(repeats, print)?);
    }
    if a.name == "gemm" {
        return Ok(bench::gemm(repeats, print)?);
    }
    let path = super::model_path(a.model)?;
    let loaded = super::load_model(&path, super::device(&a.device)?, a.dtype)?;
    match a.name.as_str() {
        "forward" => bench::forward(&loaded.model, repeats, print)?,
        "train" => bench::train(&loaded.model, repeats, print)?,
        "identify" => super::identify::bench(&loaded, a.max_samples.unwrap_or(500) as usize)?,
        "neurons" => super::neurons::bench(&loaded, a.prompts.unwrap_or(200) as usize)?,
        other => anyhow::bail!("unknown benchmark {other:?}"),
    }
    Ok(())
}
