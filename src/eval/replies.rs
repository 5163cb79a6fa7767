//! Replies to evaluate: each prompt becomes a one-turn chat (the model's own template, with the
//! generation prompt), and the model answers greedily in left-padded batches.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::EvalError;
use crate::model::{generate_continuous, GenerationConfig, Model, Sampling};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// Default number of prompts generated together (the slots of continuous batching).
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// How replies are generated for an evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalConfig {
    /// Upper bound on new tokens per reply; `None` takes the task's default
    /// ([`super::harmfulness::DEFAULT_MAX_NEW_TOKENS`] for harmfulness and classification,
    /// [`super::accuracy::GSM8K_MAX_NEW_TOKENS`] for GSM8K).
    pub max_new_tokens: Option<usize>,
    /// Prompts generated together (at least 1): the slots of continuous batching, where a
    /// prompt takes the place of one that finished. Larger batches are faster; a prompt's
    /// greedy reply can differ in the last bits with its batch-mates (padding changes the
    /// arithmetic).
    pub batch_size: usize,
    /// A system message put before each prompt; `None` leaves the template's default (SmolLM2's
    /// template, for one, then writes its own system prompt).
    pub system: Option<String>,
    /// Match the refusal keywords case-insensitively (default: case-sensitively, as the
    /// literature does).
    pub case_insensitive: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            batch_size: DEFAULT_BATCH_SIZE,
            system: None,
            case_insensitive: false,
        }
    }
}

impl EvalConfig {
    /// `max_new_tokens`, or `default` when unset.
    pub fn max_new_tokens_or(&self, default: usize) -> usize {
        self.max_new_tokens.unwrap_or(default)
    }
}

/// The chat text of one prompt: `[system?, user(prompt)]` rendered with the tokenizer's chat
/// template and the assistant's generation prompt. Errors when the tokenizer has no template.
pub fn render_prompt(tok: &Tokenizer, prompt: &str, system: Option<&str>) -> crate::Result<String> {
    let mut messages = Vec::with_capacity(2);
    if let Some(s) = system {
        messages.push(ChatMessage::system(s));
    }
    messages.push(ChatMessage::user(prompt));
    tok.render_chat(&messages, true)
}

/// The greedy generation settings used for evaluation: the tokenizer's stop ids, its pad id
/// (else 0: padded positions are masked, so the value does not matter).
pub fn greedy_config(tok: &Tokenizer, max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        sampling: Sampling::Greedy,
        stop_ids: tok.stop_token_ids(),
        pad_id: tok.pad_token_id().unwrap_or(0),
    }
}

/// Greedy replies to `prompts`, in order: each prompt is rendered with [`render_prompt`] and
/// encoded without added special tokens (the template writes them), the prompts are generated
/// shortest first, `cfg.batch_size` at a time with continuous batching (a prompt joins as
/// another finishes, left-padded: [`generate_continuous`]) and the new tokens are decoded with
/// special tokens skipped (so the stop token is dropped). The text is not trimmed.
///
/// A progress bar labelled `what` is drawn on stderr when it is a terminal.
pub fn chat_replies(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[String],
    max_new_tokens: usize,
    cfg: &EvalConfig,
    what: &str,
) -> crate::Result<Vec<String>> {
    if cfg.batch_size == 0 {
        return Err(EvalError::Config("batch_size must be at least 1".into()).into());
    }
    let ids = prompts
        .iter()
        .map(|p| {
            let text = render_prompt(tok, p, cfg.system.as_deref())?;
            tok.encode(&text, false)
        })
        .collect::<crate::Result<Vec<_>>>()?;
    // Prompts of similar length join together (shortest first): less compute on padding.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let queue: Vec<Vec<u32>> = order.iter().map(|&i| ids[i].clone()).collect();
    let gen = greedy_config(tok, max_new_tokens);
    let bar = progress_bar(prompts.len(), what);
    let outs = generate_continuous(model, &queue, &gen, cfg.batch_size, &mut |_| bar.inc(1))?;
    let mut replies = vec![String::new(); prompts.len()];
    for (&i, out) in order.iter().zip(&outs) {
        replies[i] = tok.decode(out, true)?;
    }
    bar.finish_and_clear();
    Ok(replies)
}

/// A progress bar over `n` prompts on stderr, hidden when stderr is not a terminal.
pub(crate) fn progress_bar(n: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = EvalConfig::default();
        assert_eq!(c.batch_size, 32);
        assert_eq!(c.max_new_tokens, None);
        assert_eq!(c.max_new_tokens_or(64), 64);
        let c = EvalConfig {
            max_new_tokens: Some(8),
            ..c
        };
        assert_eq!(c.max_new_tokens_or(64), 8);
    }
}
