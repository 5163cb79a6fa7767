use std::path::PathBuf;

use anyhow::Context;
use realign::adapters::Adapter;
use realign::model::generate::max_positions;
use realign::model::{generate, AdapterMode, GenerationConfig, LoadedModel, Sampling};
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
    /// Maximum number of new tokens (at least 1); a reply also stops where the prompt and it
    /// fill the model's positions (max_position_embeddings), with a warning
    #[arg(long, default_value_t = 128, value_parser = super::eval::at_least_one)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    greedy: bool,
    /// Sample with this temperature (a finite number > 0) instead of greedy decoding
    #[arg(long, allow_hyphen_values = true)]
    temperature: Option<f64>,
    /// Nucleus sampling mass, with --temperature
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    top_p: f64,
    /// Seed of the sampler, with --temperature (a whole number from 0 to 2^64 - 1)
    #[arg(
        long,
        default_value_t = 42,
        requires = "temperature",
        allow_negative_numbers = true,
        value_parser = super::eval::seed_value
    )]
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
    } = super::load_model(&path, super::device(&a.device)?, a.dtype)?;
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
        Some(t) if !(t.is_finite() && t > 0.0) => {
            anyhow::bail!(
                "--temperature must be a finite number > 0 (got {t}); use --greedy for greedy \
                 decoding"
            )
        }
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
    let limit = max_positions(&model);
    if input_ids.len() >= limit {
        anyhow::bail!(
            "the prompt has {} tokens, but the model's {}: no room for a reply \
             (--max-new-tokens {}); shorten the prompt",
            input_ids.len(),
            model.config().positions_limit(),
            a.max_new_tokens
        );
    }
    let output_ids = generate(&model, std::slice::from_ref(&input_ids), &cfg)?.remove(0);
    let stopped_by_context = output_ids.len() < a.max_new_tokens
        && input_ids.len() + output_ids.len() >= limit
        && output_ids.last().is_none_or(|t| !cfg.stop_ids.contains(t));
    if stopped_by_context {
        let bound = if model
            .config()
            .sliding_window
            .as_ref()
            .is_some_and(|w| w.size == limit)
        {
            "sliding_window"
        } else {
            "max_position_embeddings"
        };
        eprintln!(
            "warning: generation stopped at the model's {bound} ({limit}): the \
             prompt's {} tokens + {} new tokens (--max-new-tokens {} asked for more); the reply \
             is kept",
            input_ids.len(),
            output_ids.len(),
            a.max_new_tokens
        );
    }
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
