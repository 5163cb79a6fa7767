//! Tokenizers and chat templates with the semantics of Hugging Face transformers.
//!
//! A [`Tokenizer`] comes either from a Hugging Face model folder ([`Tokenizer::from_hf_dir`]:
//! `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`,
//! `config.json`) or from the metadata of a GGUF file ([`Tokenizer::from_gguf`]). Either way it
//! wraps a [`tokenizers::Tokenizer`], knows the special tokens (bos, eos, pad) and renders the
//! model's chat template with [`Tokenizer::render_chat`].
//!
//! ```no_run
//! use realign::tokenizer::{ChatMessage, Tokenizer};
//! let tok = Tokenizer::from_hf_dir("path/to/model".as_ref())?;
//! let text = tok.render_chat(&[ChatMessage::user("Hello!")], true)?;
//! // The rendered text already holds its special tokens: do not add them again.
//! let ids = tok.encode(&text, false)?;
//! # Ok::<(), realign::Error>(())
//! ```

mod chat;
mod gguf;

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::fsutil;
use chat::ChatTemplate;

/// Errors of tokenizers and chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file that the `tokenizers` library could not load.
    #[error("{path}: cannot load tokenizer: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the `tokenizers` library said.
        message: String,
    },
    /// A configuration file with a field of the wrong shape.
    #[error("{path}: invalid `{field}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A GGUF file whose metadata lacks a key the tokenizer needs.
    #[error("{path}: GGUF metadata has no `{key}`, which the tokenizer needs")]
    MissingGgufKey {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
    },
    /// A GGUF metadata value of an unexpected type or content.
    #[error("{path}: GGUF metadata `{key}`: expected {expected}")]
    GgufValue {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What was expected.
        expected: String,
    },
    /// A tokenizer model (`tokenizer.ggml.model`) that is not supported.
    #[error("{path}: unsupported tokenizer model `{model}` (supported: `gpt2`, byte-level BPE)")]
    UnsupportedModel {
        /// The GGUF file.
        path: PathBuf,
        /// The value of `tokenizer.ggml.model`.
        model: String,
    },
    /// A pre-tokenizer type (`tokenizer.ggml.pre`) that is not supported.
    #[error(
        "{path}: unsupported pre-tokenizer type `{pre}` (supported: smollm, gpt2, default, \
         llama-bpe, llama3, qwen2)"
    )]
    UnsupportedPreTokenizer {
        /// The GGUF file.
        path: PathBuf,
        /// The value of `tokenizer.ggml.pre`.
        pre: String,
    },
    /// Building a tokenizer from GGUF metadata failed.
    #[error("{path}: cannot build the tokenizer from GGUF metadata: {message}")]
    Build {
        /// The GGUF file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Encoding text failed.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding token ids failed.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    /// The tokenizer has no chat template.
    #[error("the tokenizer has no chat template (no `chat_template` in tokenizer_config.json, no chat_template.jinja, no `tokenizer.chat_template` in the GGUF)")]
    NoChatTemplate,
    /// The chat template does not compile.
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),
    /// Rendering the chat template failed.
    #[error("chat template failed: {0}")]
    Template(String),
    /// The chat template called `raise_exception(message)`.
    #[error("chat template raised an exception: {0}")]
    TemplateException(String),
    /// The chat template printed a variable that is not defined.
    #[error("chat template uses an unknown variable: {0}")]
    UnknownVariable(String),
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

impl TokenizerError {
    /// The error with the template's origin (a file, or a key of one) before its message.
    fn in_template(self, origin: &str) -> Self {
        let at = |m: String| format!("{origin}: {m}");
        match self {
            TokenizerError::TemplateSyntax(m) => TokenizerError::TemplateSyntax(at(m)),
            TokenizerError::Template(m) => TokenizerError::Template(at(m)),
            TokenizerError::TemplateException(m) => TokenizerError::TemplateException(at(m)),
            TokenizerError::UnknownVariable(m) => TokenizerError::UnknownVariable(at(m)),
            other => other,
        }
    }
}

/// The special tokens' strings, as chat templates see them (`bos_token`, …).
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialTokenStrings {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokenStrings,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    template: Option<ChatTemplate>,
    /// Where the chat template was read (a file, or a key of one), for errors.
    template_origin: Option<String>,
    /// Special-token ids the files named but the vocabulary lacks, dropped on load.
    ignored_ids: Vec<IgnoredId>,
}

/// A special-token id that a model's files name but its vocabulary does not hold: it is
/// ignored (a bos never prepended, an eos that can never stop generation, a pad that falls
/// back to the first eos), and [`Tokenizer::ignored_ids`] lists it so a command can say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IgnoredId {
    /// Which special token: `bos`, `eos` or `pad`.
    pub role: &'static str,
    /// The id named in the files.
    pub id: u32,
    /// The vocabulary's size (added tokens included): valid ids are below it.
    pub vocab_size: usize,
}

impl std::fmt::Display for IgnoredId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} token id {} is outside the vocabulary ({} tokens) and is ignored",
            self.role, self.id, self.vocab_size
        )
    }
}

/// Chat templates' usual end-of-turn tokens, looked for by [`Tokenizer::stop_token_ids`].
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<|endoftext|>",
];

impl Tokenizer {
    /// Loads the tokenizer of a Hugging Face model folder.
    ///
    /// Reads `tokenizer.json` (required) and, when present: `tokenizer_config.json`
    /// (`bos_token`, `eos_token`, `pad_token`, `unk_token` as a string or `{"content": …}`;
    /// `chat_template` as a string or a list of `{name, template}` of which `default` is taken),
    /// `chat_template.jinja` (overrides the template of `tokenizer_config.json`), and
    /// `generation_config.json` then `config.json` (`eos_token_id` as an integer or a list,
    /// `bos_token_id`, `pad_token_id`), which complete what the tokenizer config lacks.
    ///
    /// The eos ids are, in order and without repeats: the tokenizer's `eos_token`, then
    /// `generation_config.json`'s, then `config.json`'s `eos_token_id`s.
    pub fn from_hf_dir(dir: &Path) -> crate::Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = fsutil::read(&tokenizer_path)?;
        // tokenizers 0.23 unwraps inside some of its deserialisers (a damaged `decoder`
        // section panics): such a file is an error naming it, like any other bad file.
        let inner = crate::quiet_panic::catch(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|panic| format!("unreadable ({panic})"))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|message| TokenizerError::Load {
                path: tokenizer_path.clone(),
                message,
            })?;

        let config_path = dir.join("tokenizer_config.json");
        let tok_config = read_optional_json(&config_path)?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        let model_config = read_optional_json(&dir.join("config.json"))?;

        let mut special = SpecialTokenStrings::default();
        let mut template = None;
        if let Some(cfg) = &tok_config {
            special.bos = token_string(cfg, "bos_token", &config_path)?;
            special.eos = token_string(cfg, "eos_token", &config_path)?;
            special.pad = token_string(cfg, "pad_token", &config_path)?;
            special.unk = token_string(cfg, "unk_token", &config_path)?;
            template = chat_template_of_config(cfg, &config_path)?
                .map(|t| (t, format!("{} (chat_template)", config_path.display())));
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            template = Some((
                fsutil::read_to_string(&jinja_path)?,
                jinja_path.display().to_string(),
            ));
        }

        // Ids: the tokenizer config's strings first, then generation_config.json, config.json.
        let configs: Vec<(&Json, PathBuf)> = [
            (generation.as_ref(), dir.join("generation_config.json")),
            (model_config.as_ref(), dir.join("config.json")),
        ]
        .into_iter()
        .filter_map(|(json, path)| json.map(|j| (j, path)))
        .collect();

        let string_id = |s: &Option<String>| s.as_deref().and_then(|t| inner.token_to_id(t));
        let mut bos_id = string_id(&special.bos);
        let mut pad_id = string_id(&special.pad);
        let mut eos_ids: Vec<u32> = string_id(&special.eos).into_iter().collect();
        for (json, path) in &configs {
            if bos_id.is_none() {
                bos_id = id_list(json, "bos_token_id", path)?.first().copied();
            }
            if pad_id.is_none() {
                pad_id = id_list(json, "pad_token_id", path)?.first().copied();
            }
            for id in id_list(json, "eos_token_id", path)? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }

        Ok(Self::from_parts(
            inner, special, bos_id, eos_ids, pad_id, template,
        ))
    }

    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*` and
    /// `tokenizer.chat_template`); `path` is only used in error messages.
    ///
    /// Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE) with `tokenizer.ggml.pre` one
    /// of `smollm`, `gpt2`, `default` (or absent), `llama-bpe`, `llama3`, `qwen2`. Control tokens
    /// (token type 3) become special added tokens, user-defined ones (type 4) plain added
    /// tokens. bos/eos/pad/unk come from `tokenizer.ggml.{bos,eos,padding,unknown}_token_id`;
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token` decide whether [`Tokenizer::encode`]
    /// with `add_special_tokens` adds them.
    pub fn from_gguf(
        path: &Path,
        content: &candle_core::quantized::gguf_file::Content,
    ) -> crate::Result<Self> {
        Ok(gguf::tokenizer_from_gguf(path, content)?)
    }

    /// Assembles a tokenizer; ids outside the vocabulary are dropped and listed in
    /// [`Tokenizer::ignored_ids`].
    pub(crate) fn from_parts(
        inner: tokenizers::Tokenizer,
        special: SpecialTokenStrings,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        pad_id: Option<u32>,
        template: Option<(String, String)>,
    ) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        let mut ignored_ids = Vec::new();
        let mut keep = |role: &'static str, id: u32| {
            let known = inner.id_to_token(id).is_some();
            if !known
                && !ignored_ids.contains(&IgnoredId {
                    role,
                    id,
                    vocab_size,
                })
            {
                ignored_ids.push(IgnoredId {
                    role,
                    id,
                    vocab_size,
                });
            }
            known
        };
        let bos_id = bos_id.filter(|&id| keep("bos", id));
        let mut eos = Vec::with_capacity(eos_ids.len());
        for id in eos_ids {
            if keep("eos", id) && !eos.contains(&id) {
                eos.push(id);
            }
        }
        let pad_id = pad_id.filter(|&id| keep("pad", id));
        let (template, template_origin) = match template {
            Some((source, origin)) => (Some(ChatTemplate::new(source)), Some(origin)),
            None => (None, None),
        };
        Tokenizer {
            inner,
            special,
            bos_id,
            eos_ids: eos,
            pad_id,
            template,
            template_origin,
            ignored_ids,
        }
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's post-processing adds its
    /// special tokens (typically bos), as transformers' `tokenizer(text)` does. Special tokens
    /// written in `text` (like `<|im_start|>`) are always recognised as such.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> crate::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of token ids; with `skip_special_tokens` special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> crate::Result<String> {
        Ok(self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))?)
    }

    /// Whether the tokenizer has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The chat template's source, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source())
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template(
    /// messages, tokenize=False, add_generation_prompt=…)` does: Jinja with `trim_blocks` and
    /// `lstrip_blocks`; variables `messages`, `add_generation_prompt`, `tools` and `documents`
    /// (none), and `bos_token`, `eos_token`, `pad_token`, `unk_token` where known; functions
    /// `raise_exception(msg)` and `strftime_now(fmt)` (UTC); the `tojson` filter as transformers
    /// defines it; Python string and dict methods (`strip`, `startswith`, `split`, `items`, …).
    ///
    /// The rendered text already contains the special tokens the template writes (such as
    /// `bos_token`): encode it with `add_special_tokens = false`, as `apply_chat_template` does,
    /// or the bos would be doubled.
    ///
    /// Errors: [`TokenizerError::NoChatTemplate`], [`TokenizerError::TemplateException`] when the
    /// template calls `raise_exception`, [`TokenizerError::UnknownVariable`] when it prints an
    /// undefined variable, [`TokenizerError::TemplateSyntax`] / [`TokenizerError::Template`]
    /// otherwise.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> crate::Result<String> {
        let template = self
            .template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let origin = self
            .template_origin
            .as_deref()
            .unwrap_or("the chat template");
        Ok(template
            .render(messages, add_generation_prompt, &self.special)
            .map_err(|e| e.in_template(origin))?)
    }

    /// The beginning-of-sequence token id, if the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The end-of-sequence token ids (possibly several, possibly none).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The special-token ids that the model's files name but its vocabulary lacks, in the
    /// order met (bos, then eos, then pad): each was dropped on load.
    pub fn ignored_ids(&self) -> &[IgnoredId] {
        &self.ignored_ids
    }

    /// The padding token id: the pad token, else the first eos token.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id.or_else(|| self.eos_ids.first().copied())
    }

    /// The ids at which generation stops: the eos ids, then the end-of-turn token of the chat
    /// template (one of `<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>`, `</s>`,
    /// `<|endoftext|>` that the template contains and the vocabulary has), without repeats.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.eos_ids.clone();
        if let Some(template) = &self.template {
            for token in END_OF_TURN_TOKENS {
                if template.source().contains(token) {
                    if let Some(id) = self.inner.token_to_id(token) {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
            }
        }
        ids
    }

    /// The id of a token (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of tokens, added tokens included. The model's embedding may be larger.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Parses a JSON file if it exists.
fn read_optional_json(path: &Path) -> crate::Result<Option<Json>> {
    if path.is_file() {
        fsutil::read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn config_error(path: &Path, field: &str, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// A special token of `tokenizer_config.json`: a string, `{"content": "…"}`, null or absent.
fn token_string(cfg: &Json, field: &str, path: &Path) -> Result<Option<String>, TokenizerError> {
    match cfg.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(map)) => match map.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(config_error(
                path,
                field,
                "an object without a string `content`",
            )),
        },
        Some(_) => Err(config_error(
            path,
            field,
            "expected a string or {\"content\": …}",
        )),
    }
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}` of
/// which the one named `default` is taken.
fn chat_template_of_config(cfg: &Json, path: &Path) -> Result<Option<String>, TokenizerError> {
    const FIELD: &str = "chat_template";
    match cfg.get(FIELD) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(config_error(
                            path,
                            FIELD,
                            "list entries must be {\"name\": …, \"template\": …}",
                        ))
                    }
                }
            }
            Ok(None)
        }
        Some(_) => Err(config_error(
            path,
            FIELD,
            "expected a string or a list of templates",
        )),
    }
}

/// A token id field that is an integer, a list of integers, null or absent.
fn id_list(json: &Json, field: &str, path: &Path) -> Result<Vec<u32>, TokenizerError> {
    let as_id = |v: &Json| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match json.get(field) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(list)) => list
            .iter()
            .map(|v| as_id(v).ok_or_else(|| config_error(path, field, "expected token ids")))
            .collect(),
        Some(v) => as_id(v)
            .map(|id| vec![id])
            .ok_or_else(|| config_error(path, field, "expected a token id or a list of them")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{self, Content, Value as GgufValue};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("fixtures")
    }

    #[derive(serde::Deserialize)]
    struct Expected {
        tokenize: Vec<TokenizeCase>,
        chat: Vec<ChatCase>,
    }

    #[derive(serde::Deserialize)]
    struct TokenizeCase {
        text: String,
        ids: Vec<u32>,
    }

    #[derive(serde::Deserialize)]
    struct ChatCase {
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
        text: String,
    }

    fn check_against_transformers(model: &str) {
        let tok = Tokenizer::from_hf_dir(&fixtures().join(model)).unwrap();
        let expected: Expected =
            fsutil::read_json(&fixtures().join("tokenizer-expected.json")).unwrap();
        assert!(!expected.tokenize.is_empty() && !expected.chat.is_empty());
        for case in &expected.tokenize {
            assert_eq!(
                tok.encode(&case.text, true).unwrap(),
                case.ids,
                "{model}: {:?}",
                case.text
            );
            // Round trip (bos skipped).
            assert_eq!(tok.decode(&case.ids, true).unwrap(), case.text, "{model}");
        }
        for case in &expected.chat {
            let text = tok
                .render_chat(&case.messages, case.add_generation_prompt)
                .unwrap();
            assert_eq!(text, case.text, "{model}");
            // The rendered text holds its bos: encoding without special tokens keeps one.
            let ids = tok.encode(&text, false).unwrap();
            assert_eq!(ids.iter().filter(|&&id| id == 0).count(), 1, "{model}");
            assert_eq!(ids[0], 0);
        }
    }

    #[test]
    fn tiny_llama_matches_transformers() {
        check_against_transformers("tiny-llama");
    }

    #[test]
    fn tiny_qwen2_matches_transformers() {
        check_against_transformers("tiny-qwen2");
    }

    #[test]
    fn hf_special_tokens() {
        for model in ["tiny-llama", "tiny-qwen2"] {
            let tok = Tokenizer::from_hf_dir(&fixtures().join(model)).unwrap();
            assert_eq!(tok.bos_token_id(), Some(0), "{model}");
            assert_eq!(tok.eos_token_ids(), &[4], "{model}");
            assert_eq!(tok.pad_token_id(), Some(5), "{model}");
            assert!(tok.stop_token_ids().contains(&4), "{model}");
            assert_eq!(tok.stop_token_ids(), vec![4], "{model}");
            assert_eq!(tok.token_to_id("<|eot_id|>"), Some(4));
            assert_eq!(tok.vocab_size(), 678);
            assert!(tok.has_chat_template());
            assert_eq!(tok.inner().get_vocab_size(true), 678);
        }
    }

    /// A copy of tiny-llama's tokenizer.json with the given extra files.
    fn hf_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixtures().join("tiny-llama/tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn hf_config_variants() {
        let dir = hf_dir(&[
            (
                "tokenizer_config.json",
                r#"{"bos_token": {"content": "<|begin_of_text|>", "lstrip": false},
                    "eos_token": "<|end_of_text|>", "pad_token": null,
                    "chat_template": [{"name": "tool_use", "template": "T"},
                                      {"name": "default", "template": "D{{ eos_token }}"}]}"#,
            ),
            (
                "generation_config.json",
                r#"{"eos_token_id": [1, 4], "pad_token_id": 3}"#,
            ),
            ("config.json", r#"{"eos_token_id": 2, "bos_token_id": 5}"#),
        ]);
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(tok.bos_token_id(), Some(0));
        assert_eq!(tok.eos_token_ids(), &[1, 4, 2]);
        assert_eq!(tok.pad_token_id(), Some(3));
        assert_eq!(tok.render_chat(&[], false).unwrap(), "D<|end_of_text|>");
        assert_eq!(tok.stop_token_ids(), vec![1, 4, 2]);

        // chat_template.jinja overrides the config's template; without pad, pad = first eos.
        let dir = hf_dir(&[
            (
                "tokenizer_config.json",
                r#"{"eos_token": "<|eot_id|>", "chat_template": "X"}"#,
            ),
            (
                "chat_template.jinja",
                "J{{ messages[0].content }}<|eot_id|>\n",
            ),
        ]);
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(
            tok.render_chat(&[ChatMessage::user("u")], true).unwrap(),
            "Ju<|eot_id|>"
        );
        assert_eq!(tok.pad_token_id(), Some(4));
        assert_eq!(tok.bos_token_id(), None);
    }

    #[test]
    fn hf_errors_name_the_file() {
        let err = Tokenizer::from_hf_dir(Path::new("/nonexistent/model")).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        let dir = hf_dir(&[("tokenizer_config.json", r#"{"eos_token": 7}"#)]);
        let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("tokenizer_config.json")
                && err.to_string().contains("eos_token"),
            "{err}"
        );

        let dir = hf_dir(&[("config.json", r#"{"eos_token_id": "x"}"#)]);
        let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");

        let dir = hf_dir(&[]);
        std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
        let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, crate::Error::Tokenizer(TokenizerError::Load { .. })),
            "{err}"
        );
    }

    #[test]
    fn no_chat_template_is_an_error() {
        let tok = Tokenizer::from_hf_dir(hf_dir(&[]).path()).unwrap();
        assert!(!tok.has_chat_template());
        let err = tok
            .render_chat(&[ChatMessage::user("x")], true)
            .unwrap_err();
        assert!(
            matches!(err, crate::Error::Tokenizer(TokenizerError::NoChatTemplate)),
            "{err}"
        );
    }

    #[test]
    fn template_errors_through_the_tokenizer() {
        let dir = hf_dir(&[(
            "chat_template.jinja",
            "{% for m in messages %}\n{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\n{{ m.content }}{{ undefined_thing }}\n{% endfor %}",
        )]);
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        let err = tok
            .render_chat(&[ChatMessage::system("s")], false)
            .unwrap_err();
        assert!(
            err.to_string().contains("System role not supported"),
            "{err}"
        );
        let err = tok
            .render_chat(&[ChatMessage::user("u")], false)
            .unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::Tokenizer(TokenizerError::UnknownVariable(_))
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("chat template uses an unknown variable"),
            "{err}"
        );
    }

    // ---- GGUF ----

    fn gguf(entries: &[(&str, GgufValue)]) -> Content {
        let refs: Vec<(&str, &GgufValue)> = entries.iter().map(|(k, v)| (*k, v)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &refs, &[]).unwrap();
        bytes.set_position(0);
        Content::read(&mut bytes).unwrap()
    }

    fn strings(items: &[&str]) -> GgufValue {
        GgufValue::Array(
            items
                .iter()
                .map(|s| GgufValue::String(s.to_string()))
                .collect(),
        )
    }

    /// A tiny byte-level BPE: specials 0..=2, bytes, and merges for "ab", "Ġa", "12".
    fn tiny_gguf(extra: Vec<(&'static str, GgufValue)>) -> Vec<(&'static str, GgufValue)> {
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<tool>",
            "a",
            "b",
            "ab",
            "Ġ",
            "Ġa",
            "1",
            "2",
            "12",
            "Ċ",
        ];
        let types: Vec<GgufValue> = [3, 3, 3, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1]
            .iter()
            .map(|&t| GgufValue::I32(t))
            .collect();
        let mut entries = vec![
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.token_type", GgufValue::Array(types)),
            ("tokenizer.ggml.merges", strings(&["a b", "Ġ a", "1 2"])),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
            ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
            (
                "tokenizer.chat_template",
                GgufValue::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into()),
            ),
        ];
        for (key, value) in extra {
            entries.retain(|(k, _)| *k != key);
            entries.push((key, value));
        }
        entries
    }

    fn tiny(extra: Vec<(&'static str, GgufValue)>) -> crate::Result<Tokenizer> {
        Tokenizer::from_gguf(Path::new("tiny.gguf"), &gguf(&tiny_gguf(extra)))
    }

    #[test]
    fn gguf_byte_level_bpe() {
        let tok = tiny(vec![(
            "tokenizer.ggml.pre",
            GgufValue::String("smollm".into()),
        )])
        .unwrap();
        // Digits are split one by one ("12" is not merged), spaces become Ġ.
        assert_eq!(tok.encode("ab a12", true).unwrap(), vec![6, 8, 9, 10]);
        assert_eq!(
            tok.encode("<|im_start|>ab<|im_end|>\n", false).unwrap(),
            vec![1, 6, 2, 12]
        );
        assert_eq!(tok.encode("a<tool>b", false).unwrap(), vec![4, 3, 5]);
        assert_eq!(
            tok.decode(&[1, 6, 8, 2], false).unwrap(),
            "<|im_start|>ab a<|im_end|>"
        );
        assert_eq!(tok.decode(&[1, 6, 8, 3, 2], true).unwrap(), "ab a<tool>");
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.pad_token_id(), Some(2));
        assert_eq!(tok.stop_token_ids(), vec![2]);
        assert_eq!(tok.vocab_size(), 13);
        let text = tok.render_chat(&[ChatMessage::user("ab")], false).unwrap();
        assert_eq!(text, "<|im_start|>user\nab<|im_end|>\n");

        // GPT-2 splitting keeps "12" whole.
        let tok = tiny(vec![]).unwrap();
        assert_eq!(tok.encode("ab a12", true).unwrap(), vec![6, 8, 11]);
        let tok = tiny(vec![(
            "tokenizer.ggml.pre",
            GgufValue::String("llama-bpe".into()),
        )])
        .unwrap();
        assert_eq!(tok.encode("ab a12", true).unwrap(), vec![6, 8, 11]);
        let tok = tiny(vec![(
            "tokenizer.ggml.pre",
            GgufValue::String("qwen2".into()),
        )])
        .unwrap();
        assert_eq!(tok.encode("ab a12", true).unwrap(), vec![6, 8, 9, 10]);
    }

    #[test]
    fn gguf_add_bos_token() {
        let tok = tiny(vec![
            ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
            ("tokenizer.ggml.padding_token_id", GgufValue::U32(0)),
        ])
        .unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![1, 6]);
        assert_eq!(tok.encode("ab", false).unwrap(), vec![6]);
        assert_eq!(tok.pad_token_id(), Some(0));
        let tok = tiny(vec![(
            "tokenizer.ggml.add_eos_token",
            GgufValue::Bool(true),
        )])
        .unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![6, 2]);
    }

    #[test]
    fn gguf_errors() {
        let err = tiny(vec![(
            "tokenizer.ggml.pre",
            GgufValue::String("deepseek-coder".into()),
        )])
        .unwrap_err();
        assert!(matches!(
            err,
            crate::Error::Tokenizer(TokenizerError::UnsupportedPreTokenizer { .. })
        ));
        assert!(
            err.to_string().contains("deepseek-coder") && err.to_string().contains("tiny.gguf"),
            "{err}"
        );

        let err = tiny(vec![(
            "tokenizer.ggml.model",
            GgufValue::String("llama".into()),
        )])
        .unwrap_err();
        assert!(matches!(
            err,
            crate::Error::Tokenizer(TokenizerError::UnsupportedModel { .. })
        ));
        assert!(err.to_string().contains("`llama`"), "{err}");

        let mut entries = tiny_gguf(vec![]);
        entries.retain(|(k, _)| *k != "tokenizer.ggml.merges");
        let err = Tokenizer::from_gguf(Path::new("tiny.gguf"), &gguf(&entries)).unwrap_err();
        assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

        let err = Tokenizer::from_gguf(Path::new("tiny.gguf"), &gguf(&[])).unwrap_err();
        assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");

        let err = tiny(vec![(
            "tokenizer.ggml.bos_token_id",
            GgufValue::String("1".into()),
        )])
        .unwrap_err();
        assert!(
            err.to_string().contains("tokenizer.ggml.bos_token_id"),
            "{err}"
        );

        let err = tiny(vec![("tokenizer.ggml.merges", strings(&["ab"]))]).unwrap_err();
        assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
            failure_persistence: None,
            ..Default::default()
        })]

        /// GGUF tokenizer metadata with damaged entries (odd tokens, merges, token types, ids,
        /// models and pre-tokenizers): building, encoding and decoding answer Ok or Err, never
        /// panic.
        #[test]
        fn damaged_gguf_tokenizers_never_panic(
            tokens in proptest::collection::vec("[ -~ĠĊ]{0,4}|<\\|[a-z_]{0,6}\\|>", 0..12),
            merges in proptest::collection::vec("[ -~ĠĊ]{0,5}", 0..6),
            types in proptest::collection::vec(-2i32..8, 0..12),
            ids in proptest::collection::vec(0u32..40, 4),
            model in proptest::sample::select(vec!["gpt2", "llama", "bert", ""]),
            pre in proptest::sample::select(vec!["smollm", "gpt2", "qwen2", "llama3", "default", "x"]),
            keep in proptest::collection::vec(proptest::prelude::any::<bool>(), 4),
        ) {
            let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let mrg: Vec<&str> = merges.iter().map(String::as_str).collect();
            let mut extra = vec![
                ("tokenizer.ggml.model", GgufValue::String(model.into())),
                ("tokenizer.ggml.pre", GgufValue::String(pre.into())),
                ("tokenizer.ggml.bos_token_id", GgufValue::U32(ids[0])),
                ("tokenizer.ggml.eos_token_id", GgufValue::U32(ids[1])),
                ("tokenizer.ggml.unknown_token_id", GgufValue::U32(ids[2])),
                ("tokenizer.ggml.padding_token_id", GgufValue::U32(ids[3])),
            ];
            if keep[0] {
                extra.push(("tokenizer.ggml.tokens", strings(&toks)));
            }
            if keep[1] {
                extra.push(("tokenizer.ggml.merges", strings(&mrg)));
            }
            if keep[2] {
                let t = types.iter().map(|&t| GgufValue::I32(t)).collect();
                extra.push(("tokenizer.ggml.token_type", GgufValue::Array(t)));
            }
            if keep[3] {
                extra.push(("tokenizer.ggml.scores", GgufValue::Array(vec![GgufValue::F32(-1.0); toks.len()])));
            }
            if let Ok(tok) = tiny(extra) {
                if let Ok(ids) = tok.encode("ab a12 <|im_start|>x\n", true) {
                    let _ = tok.decode(&ids, false);
                }
                let _ = tok.decode(&[0, 1, 2, 5, 39], true);
                let _ = tok.render_chat(&[ChatMessage::user("ab")], true);
            }
        }
    }
}
