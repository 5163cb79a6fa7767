//! Which tokens of a prompt count in the importance (issue 12): the chat template and a system
//! preamble are the same in every prompt, harmful or general, so scoring them selects the
//! model's generally important neurons rather than the ones a harmful request activates.
//!
//! [`TokenScope::Content`] (the default) keeps only the tokens of the user's content: the last
//! user message (the harmful question, the general passage). Its token range is found from the
//! tokenizer's byte offsets: the prompt is rendered, the content's byte range is located in the
//! rendered text (its last occurrence, since the generation prompt follows the last user turn),
//! and every token whose bytes overlap that range is a content token.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::NeuronError;
use crate::data::{render_prompt, Prompt, PromptTemplate};
use crate::tokenizer::Tokenizer;

/// The tokens whose activations count in a prompt's importance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// Every token of the rendered prompt (template, system preamble, generation prompt).
    All,
    /// Only the tokens of the last user message's content (default).
    #[default]
    Content,
    /// Only the last token of the rendered prompt (the position that predicts the reply).
    Last,
}

impl TokenScope {
    /// `all`, `content` or `last`.
    pub fn name(self) -> &'static str {
        match self {
            TokenScope::All => "all",
            TokenScope::Content => "content",
            TokenScope::Last => "last",
        }
    }
}

/// A prompt ready for importance scoring: its token ids and the positions that count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedPrompt {
    /// Every token of the rendered prompt (the forward pass sees all of them).
    pub ids: Vec<u32>,
    /// The positions whose activations count, ascending.
    pub rows: Vec<usize>,
}

/// The user content of a prompt: the text itself, or the last user message of a conversation.
pub fn user_content(prompt: &Prompt) -> Option<&str> {
    match prompt {
        Prompt::Text(t) => Some(t),
        Prompt::Messages(m) => m
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str()),
    }
}

/// The tokens of `ids` (with byte `offsets` into the rendered text) that overlap the byte range
/// `content` (a zero-width token, such as an added special token, never counts; an empty
/// `content` covers none).
pub fn overlapping_tokens(offsets: &[(usize, usize)], content: Range<usize>) -> Vec<usize> {
    // An empty content (whitespace the template trimmed away) covers no token, not one that
    // straddles its position.
    if content.is_empty() {
        return Vec::new();
    }
    offsets
        .iter()
        .enumerate()
        .filter(|(_, &(s, e))| e > s && s < content.end && e > content.start)
        .map(|(i, _)| i)
        .collect()
}

/// Renders `prompt` with `template` (and `system`), tokenises it and picks the positions of
/// `scope`.
///
/// Errors when the prompt cannot be rendered, is empty, or (for [`TokenScope::Content`]) its
/// user content cannot be found in the rendered text or covers no token.
pub fn scoped_prompt(
    tok: &Tokenizer,
    template: PromptTemplate,
    prompt: &Prompt,
    system: Option<&str>,
    scope: TokenScope,
) -> crate::Result<ScopedPrompt> {
    let text = render_prompt(tok, template, prompt, system)?;
    let add_special = template == PromptTemplate::Alpaca;
    let enc = tok
        .inner()
        .encode(text.as_str(), add_special)
        .map_err(|e| crate::tokenizer::TokenizerError::Encode(e.to_string()))?;
    let ids = enc.get_ids().to_vec();
    let rows = match scope {
        TokenScope::All => (0..ids.len()).collect(),
        TokenScope::Last => ids.len().checked_sub(1).into_iter().collect(),
        TokenScope::Content => {
            let content = user_content(prompt).unwrap_or_default();
            let trimmed = content.trim();
            // Where the template put the content: found by rendering a marker in its place
            // (a short content such as "assistant" or "t" also occurs in the template's own
            // text, where a search for it would land); else its last occurrence.
            let range = marked_content_range(tok, template, prompt, system, &text)
                .or_else(|| {
                    [content, trimmed]
                        .into_iter()
                        .filter(|c| !c.is_empty())
                        .find_map(|c| text.rfind(c).map(|s| s..s + c.len()))
                })
                .ok_or_else(|| {
                    NeuronError::Invalid(format!(
                        "the user content {:?} is not in the rendered prompt: use --tokens all",
                        truncate(content)
                    ))
                })?;
            let rows = overlapping_tokens(enc.get_offsets(), range);
            if rows.is_empty() {
                return Err(NeuronError::Invalid(format!(
                    "the user content {:?} covers no token of the rendered prompt",
                    truncate(content)
                ))
                .into());
            }
            rows
        }
    };
    Ok(ScopedPrompt { ids, rows })
}

/// Stands in for the user content when locating it (private-use characters no prompt holds).
const CONTENT_MARK: &str = "\u{E000}realign-user-content\u{E001}";

/// The byte range of the last user message's content in `text` (the prompt rendered with
/// `template`): the prompt is rendered again with [`CONTENT_MARK`] as that content, and the
/// text before and after the marker must be `text`'s prefix and suffix. `None` when the prompt
/// has no user message or the template does not keep the marker verbatim, exactly once.
fn marked_content_range(
    tok: &Tokenizer,
    template: PromptTemplate,
    prompt: &Prompt,
    system: Option<&str>,
    text: &str,
) -> Option<Range<usize>> {
    let marked = match prompt {
        Prompt::Text(_) => Prompt::Text(CONTENT_MARK.to_string()),
        Prompt::Messages(m) => {
            let mut m = m.clone();
            let last_user = m.iter_mut().rev().find(|m| m.role == "user")?;
            last_user.content = CONTENT_MARK.to_string();
            Prompt::Messages(m)
        }
    };
    let rendered = render_prompt(tok, template, &marked, system).ok()?;
    let at = rendered.find(CONTENT_MARK)?;
    let (prefix, suffix) = (&rendered[..at], &rendered[at + CONTENT_MARK.len()..]);
    if suffix.contains(CONTENT_MARK) || text.len() < prefix.len() + suffix.len() {
        return None;
    }
    (text.starts_with(prefix) && text.ends_with(suffix))
        .then(|| prefix.len()..text.len() - suffix.len())
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_keeps_partial_tokens_and_drops_zero_width_ones() {
        // text: "<s>ab cd</s>", content "ab cd" at bytes 3..8
        let offsets = [(0, 3), (3, 5), (5, 8), (8, 12), (12, 12)];
        assert_eq!(overlapping_tokens(&offsets, 3..8), vec![1, 2]);
        // a token straddling the start counts
        assert_eq!(overlapping_tokens(&[(0, 4), (4, 9)], 3..8), vec![0, 1]);
        assert_eq!(overlapping_tokens(&[(3, 3)], 3..8), Vec::<usize>::new());
    }
}
