//! Building a tokenizer from GGUF metadata (`tokenizer.ggml.*`), the way transformers'
//! GGUF loader does for byte-level BPE (`tokenizer.ggml.model = gpt2`) tokenizers.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::{SpecialTokenStrings, Tokenizer, TokenizerError};

/// The split regex of Llama 3's tokenizer (tiktoken's cl100k pattern).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of Qwen2's tokenizer (like Llama 3's, with single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Reads GGUF metadata values, naming the file and key in errors.
struct Meta<'a> {
    path: &'a Path,
    content: &'a Content,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&'a Value, TokenizerError> {
        self.get(key).ok_or_else(|| TokenizerError::MissingGgufKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        })
    }

    fn bad(&self, key: &str, expected: &str) -> TokenizerError {
        TokenizerError::GgufValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_string(),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => int(v)
                .map(|n| Some(n != 0))
                .ok_or_else(|| self.bad(key, "a boolean")),
        }
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => int(v)
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a token id (non-negative integer)")),
        }
    }

    fn array(&self, key: &str) -> Result<&'a [Value], TokenizerError> {
        match self.require(key)? {
            Value::Array(items) => Ok(items),
            _ => Err(self.bad(key, "an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.bad(key, "an array of strings")),
            })
            .collect()
    }
}

/// Any integer value as i64 (u64 beyond i64 is rejected).
fn int(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => i64::from(*v),
        Value::I8(v) => i64::from(*v),
        Value::U16(v) => i64::from(*v),
        Value::I16(v) => i64::from(*v),
        Value::U32(v) => i64::from(*v),
        Value::I32(v) => i64::from(*v),
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: Option<&str>, path: &Path) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        Some("smollm") => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        None | Some("gpt2") | Some("default") => Ok(ByteLevel::new(false, true, true).into()),
        Some("llama-bpe") | Some("llama3") => split(LLAMA3_PATTERN),
        Some("qwen2") => split(QWEN2_PATTERN),
        Some(other) => Err(TokenizerError::UnsupportedPreTokenizer {
            path: path.to_path_buf(),
            pre: other.to_string(),
        }),
    }
}

/// The tokenizer stored in `content`'s metadata.
pub(super) fn tokenizer_from_gguf(
    path: &Path,
    content: &Content,
) -> Result<Tokenizer, TokenizerError> {
    let meta = Meta { path, content };
    let build_error = |e: tokenizers::Error| TokenizerError::Build {
        path: path.to_path_buf(),
        message: e.to_string(),
    };

    let model = match meta.require("tokenizer.ggml.model")? {
        Value::String(s) => s.as_str(),
        _ => return Err(meta.bad("tokenizer.ggml.model", "a string")),
    };
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel {
            path: path.to_path_buf(),
            model: model.to_string(),
        });
    }
    let pre = meta.string("tokenizer.ggml.pre")?;
    let pre_tokenizer = pre_tokenizer(pre, path)?;

    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id)
            .map_err(|_| meta.bad("tokenizer.ggml.tokens", "fewer than 2^32 tokens"))?;
        // A repeated token ends with its last id, as in transformers' `{token: id}` dict.
        vocab.insert((*token).to_string(), id);
    }
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| meta.bad("tokenizer.ggml.merges", "merges of the form \"a b\""))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(build_error)?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    if pre == Some("qwen2") {
        inner.with_normalizer(Some(NFC)).map_err(build_error)?;
    }
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));

    // Added tokens: control tokens are special, user-defined ones are not.
    if let Some(types) = meta.get("tokenizer.ggml.token_type") {
        let Value::Array(types) = types else {
            return Err(meta.bad("tokenizer.ggml.token_type", "an array of integers"));
        };
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (token, ty) in tokens.iter().zip(types) {
            match int(ty) {
                Some(TOKEN_TYPE_CONTROL) => special.push(AddedToken::from(*token, true)),
                Some(TOKEN_TYPE_USER_DEFINED) => user.push(AddedToken::from(*token, false)),
                Some(_) => {}
                None => return Err(meta.bad("tokenizer.ggml.token_type", "an array of integers")),
            }
        }
        inner.add_special_tokens(special).map_err(build_error)?;
        inner.add_tokens(user).map_err(build_error)?;
    }

    let token_of = |id: Option<u32>| {
        id.and_then(|id| tokens.get(id as usize))
            .map(|t| t.to_string())
    };
    let bos_id = meta.token_id("tokenizer.ggml.bos_token_id")?;
    let eos_id = meta.token_id("tokenizer.ggml.eos_token_id")?;
    let pad_id = meta.token_id("tokenizer.ggml.padding_token_id")?;
    let unk_id = match meta.token_id("tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(id),
        None => meta.token_id("tokenizer.ggml.unk_token_id")?,
    };
    let special = SpecialTokenStrings {
        bos: token_of(bos_id),
        eos: token_of(eos_id),
        pad: token_of(pad_id),
        unk: token_of(unk_id),
    };

    // bos/eos added by encode(…, add_special_tokens = true), when the GGUF asks for it.
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = special.bos.clone().zip(bos_id).filter(|_| add_bos);
    let eos = special.eos.clone().zip(eos_id).filter(|_| add_eos);
    if bos.is_some() || eos.is_some() {
        inner.with_post_processor(Some(post_processor(bos.as_ref(), eos.as_ref(), path)?));
    }

    let template = meta.string("tokenizer.chat_template")?.map(|t| {
        (
            t.to_string(),
            format!("{} (tokenizer.chat_template)", path.display()),
        )
    });
    Ok(Tokenizer::from_parts(
        inner,
        special,
        bos_id,
        eos_id.into_iter().collect(),
        pad_id,
        template,
    ))
}

/// A post-processor that wraps each sequence in bos/eos. Built through its serialized form so
/// that token texts are taken verbatim (the builder's string syntax splits on `:`).
fn post_processor(
    bos: Option<&(String, u32)>,
    eos: Option<&(String, u32)>,
    path: &Path,
) -> Result<TemplateProcessing, TokenizerError> {
    let wrap = |seq: &str, type_id: u32| {
        let mut pieces = Vec::new();
        if let Some((token, _)) = bos {
            pieces.push(json!({"SpecialToken": {"id": token, "type_id": type_id}}));
        }
        pieces.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some((token, _)) = eos {
            pieces.push(json!({"SpecialToken": {"id": token, "type_id": type_id}}));
        }
        pieces
    };
    let single = wrap("A", 0);
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    let mut specials = serde_json::Map::new();
    for (token, id) in bos.into_iter().chain(eos) {
        specials.insert(
            token.clone(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }
    let spec = json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": specials,
    });
    serde_json::from_value(spec).map_err(|e| TokenizerError::Build {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
