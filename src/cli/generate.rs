use std::path::PathBuf;

use anyhow::Context;
use realign::adapters::Adapter;
use realign::model::{generate, AdapterMode, GenerationConfig, LoadOptions, LoadedModel, Sampling};
use realign::tokenizer::ChatMessage;

/// Flags of `realign generate`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
pub struct Args {
    /// Model: a Hugging Face folder or a .gguf file [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
    /// PEFT LoRA adapter folder; repeat to stack several, applied in order
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Merge adapters into the weights instead of applying them beside the base layers
    #[arg(long)]
    merge: bool,
    /// Raw prompt text (tokenised with the tokenizer's special tokens, e.g. BOS)
    #[arg(long)]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template and its generation prompt
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat (without it, the template's default system prompt, if any)
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Maximum number of new tokens
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    greedy: bool,
    /// Sample with this temperature (> 0) instead of greedy decoding
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling mass, with --temperature
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    top_p: f64,
    /// Seed of the sampler, with --temperature
    #[arg(long, default_value_t = 42, requires = "temperature")]
    seed: u64,
    /// Print one JSON object: prompt_text, input_ids, output_ids, text
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = super::model_path(a.model)?;
    let LoadedModel {
        mut model,
        tokenizer,
        ..
    } = LoadedModel::load(
        &path,
        &LoadOptions {
            device: super::device(&a.device)?,
            dtype: a.dtype,
        },
    )
    .with_context(|| format!("loading model {}", path.display()))?;
    let mode = if a.merge {
        AdapterMode::Merged
    } else {
        AdapterMode::Unmerged
    };
    for dir in &a.adapters {
        let adapter = Adapter::load(dir, model.device())
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        model
            .apply_adapter(&adapter, mode)
            .with_context(|| format!("applying adapter {}", dir.display()))?;
    }
    let (prompt_text, input_ids) = match (&a.prompt, &a.chat) {
        (Some(p), _) => (p.clone(), tokenizer.encode(p, true)?),
        (None, Some(c)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(ChatMessage::system(s.clone()));
            }
            msgs.push(ChatMessage::user(c.clone()));
            let text = tokenizer.render_chat(&msgs, true)?;
            let ids = tokenizer.encode(&text, false)?;
            (text, ids)
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let sampling = match a.temperature {
        Some(t) if t <= 0.0 => anyhow::bail!("--temperature must be > 0 (got {t}); use --greedy"),
        Some(_) if !(a.top_p > 0.0 && a.top_p <= 1.0) => {
            anyhow::bail!("--top-p must be in (0, 1] (got {})", a.top_p)
        }
        Some(temperature) => Sampling::Sample {
            temperature,
            top_p: a.top_p,
            seed: a.seed,
        },
        None => Sampling::Greedy,
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_ids: tokenizer.stop_token_ids(),
        pad_id: tokenizer.pad_token_id().unwrap_or(0),
    };
    let output_ids = generate(&model, std::slice::from_ref(&input_ids), &cfg)?.remove(0);
    let text = tokenizer.decode(&output_ids, true)?;
    if a.json {
        let obj = serde_json::json!({
            "prompt_text": prompt_text,
            "input_ids": input_ids,
            "output_ids": output_ids,
            "text": text,
        });
        println!("{obj}");
    } else {
        println!("{text}");
    }
    Ok(())
}
