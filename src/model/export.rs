//! Writing a model as a Hugging Face folder that transformers (and [`LoadedModel::load`]) reads:
//! `config.json`, `model.safetensors` (f32, Hugging Face tensor names), `tokenizer.json`,
//! `tokenizer_config.json` (special tokens, `chat_template`) and `generation_config.json`.
//!
//! Used by SN-Tune's output and `deactivate --write`. Works the same for a model loaded from a
//! GGUF file: the loader has already dequantised it and undone llama.cpp's Q/K row permutation,
//! so the weights are in the Hugging Face layout, and the tokenizer built from the GGUF metadata
//! serialises to a `tokenizer.json`.
//!
//! Every tensor is written in the dtype the model keeps it in ([`safetensors_bytes`]): a
//! bf16/f16 checkpoint loaded with `--dtype auto` is written bf16/f16 (as transformers'
//! `save_pretrained` keeps a model's dtype), one loaded as f32 and a dequantised GGUF file as
//! f32; `config.json`'s `torch_dtype` says which. No entry changes value: the weights are
//! written as they are held.
//!
//! [`LoadedModel::load`]: super::LoadedModel::load

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::config::{Architecture, Config, RopeScaling};
use super::{Model, ModelError};
use crate::tokenizer::Tokenizer;

/// The `config.json` transformers needs to build the architecture of `cfg`
/// (`torch_dtype` `float32`, which [`export_hf`] replaces by the weights' own; the tokenizer's
/// special ids).
pub fn hf_config_json(cfg: &Config, tok: &Tokenizer, tied: bool) -> Value {
    let (model_type, class) = match cfg.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Mistral => ("mistral", "MistralForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let rope_scaling = match &cfg.rope_scaling {
        RopeScaling::Default => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({"rope_type": "llama3", "factor": factor,
            "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": *original_max_position_embeddings as u64}),
    };
    let mut c = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    if cfg.architecture != Architecture::Qwen2 {
        c["attention_bias"] = json!(cfg.qkv_bias);
        c["mlp_bias"] = json!(cfg.mlp_bias);
    }
    // Written explicitly: transformers' defaults (Mistral 4096, Qwen2 off) would otherwise give
    // the folder a window its source did not have, or drop the one it had.
    match (cfg.architecture, &cfg.sliding_window) {
        (Architecture::Llama, _) => {}
        (Architecture::Mistral, w) => c["sliding_window"] = json!(w.as_ref().map(|w| w.size)),
        (Architecture::Qwen2, None) => {
            c["use_sliding_window"] = json!(false);
            c["sliding_window"] = Value::Null;
        }
        (Architecture::Qwen2, Some(w)) => {
            c["use_sliding_window"] = json!(true);
            c["sliding_window"] = json!(w.size);
            c["max_window_layers"] = json!(w.layers.first().copied().unwrap_or(0));
            let types: Vec<&str> = (0..cfg.num_hidden_layers)
                .map(|i| {
                    if w.layers.contains(&i) {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            c["layer_types"] = json!(types);
        }
    }
    if let Some(id) = tok.bos_token_id() {
        c["bos_token_id"] = json!(id);
    }
    match tok.eos_token_ids() {
        [] => {}
        [one] => c["eos_token_id"] = json!(one),
        many => c["eos_token_id"] = json!(many),
    }
    if let Some(id) = tok.pad_token_id() {
        c["pad_token_id"] = json!(id);
    }
    c
}

/// `tokenizer_config.json`: special-token strings, the chat template, the fast-tokenizer class.
pub fn hf_tokenizer_config_json(tok: &Tokenizer, model_max_length: usize) -> Value {
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    });
    if let Some(s) = name(tok.bos_token_id()) {
        c["bos_token"] = json!(s);
    }
    if let Some(s) = name(tok.eos_token_ids().first().copied()) {
        c["eos_token"] = json!(s);
    }
    if let Some(s) = name(tok.pad_token_id()) {
        c["pad_token"] = json!(s);
    }
    if let Some(t) = tok.chat_template() {
        c["chat_template"] = json!(t);
    }
    c
}

/// `generation_config.json`: bos, eos (all of them) and pad ids.
pub fn hf_generation_config_json(tok: &Tokenizer) -> Value {
    let mut c = json!({});
    if let Some(id) = tok.bos_token_id() {
        c["bos_token_id"] = json!(id);
    }
    match tok.eos_token_ids() {
        [] => {}
        [one] => c["eos_token_id"] = json!(one),
        many => c["eos_token_id"] = json!(many),
    }
    if let Some(id) = tok.pad_token_id() {
        c["pad_token_id"] = json!(id);
    }
    c
}

/// The bytes of a safetensors file holding `tensors` as f32 (metadata `format: pt`, which
/// transformers checks).
pub fn safetensors_f32_bytes(tensors: &[(String, Tensor)]) -> crate::Result<Vec<u8>> {
    serialize(tensors, false)
}

/// The `model.safetensors` bytes of `tensors`, each in its own dtype when that is bf16 or
/// f16, else as f32 (the safetensors dtypes transformers reads for a causal LM), with
/// [`safetensors_f32_bytes`]'s metadata and refusal of non-finite entries.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> crate::Result<Vec<u8>> {
    serialize(tensors, true)
}

/// One tensor's safetensors dtype, little-endian bytes and count of non-finite entries.
fn tensor_bytes(
    t: &Tensor,
    keep_narrow: bool,
) -> crate::Result<(safetensors::Dtype, Vec<u8>, usize)> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::BF16 if keep_narrow => {
            let v: Vec<half::bf16> = flat.to_vec1()?;
            let count = v.iter().filter(|x| !x.is_finite()).count();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (safetensors::Dtype::BF16, bytes, count)
        }
        DType::F16 if keep_narrow => {
            let v: Vec<half::f16> = flat.to_vec1()?;
            let count = v.iter().filter(|x| !x.is_finite()).count();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (safetensors::Dtype::F16, bytes, count)
        }
        _ => {
            let v: Vec<f32> = flat.to_dtype(DType::F32)?.to_vec1()?;
            let count = crate::fsutil::count_nonfinite(&v);
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (safetensors::Dtype::F32, bytes, count)
        }
    })
}

/// Serialises `tensors` (narrow dtypes kept when `keep_narrow`); a non-finite entry is refused
/// before anything is written (the folder is renamed into place only later).
fn serialize(tensors: &[(String, Tensor)], keep_narrow: bool) -> crate::Result<Vec<u8>> {
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, bytes, count) = tensor_bytes(t, keep_narrow)?;
        if count > 0 {
            return Err(crate::Error::NonFinite {
                path: "model.safetensors".into(),
                tensor: name.clone(),
                count,
            });
        }
        data.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(n, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::Error::Model(ModelError::Input(format!("safetensors: {e}"))))?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| crate::Error::Model(ModelError::Input(format!("safetensors: {e}"))))
}

/// `config.json`'s `torch_dtype` for `tensors`: the dtype that holds most of their entries.
fn torch_dtype(tensors: &[(String, Tensor)]) -> &'static str {
    let mut counts = [0usize; 3];
    for (_, t) in tensors {
        let slot = match t.dtype() {
            DType::BF16 => 1,
            DType::F16 => 2,
            _ => 0,
        };
        counts[slot] += t.elem_count();
    }
    let most = (0..3)
        .max_by_key(|&i| (counts[i], usize::from(i == 0)))
        .unwrap_or(0);
    ["float32", "bfloat16", "float16"][most]
}

/// Writes `model` (unmerged adapters folded in) and `tok` as a Hugging Face folder at `dir`.
/// See [`export_hf_with`].
pub fn export_hf(model: &Model, tok: &Tokenizer, dir: &Path) -> crate::Result<()> {
    export_hf_with(model, tok, dir, &[])
}

/// Like [`export_hf`], adding `extra` files (name, bytes) to the folder (reports).
///
/// The folder is written whole into a hidden temporary folder beside `dir`, then renamed into
/// place, so `dir` is never left half written; an existing `dir` is replaced only after the new
/// one is complete.
pub fn export_hf_with(
    model: &Model,
    tok: &Tokenizer,
    dir: &Path,
    extra: &[(&str, Vec<u8>)],
) -> crate::Result<()> {
    let staged = crate::fsutil::StagedDir::new(dir, true)?;
    write_folder(model, tok, staged.path(), extra)?;
    staged.commit()
}

fn write_folder(
    model: &Model,
    tok: &Tokenizer,
    dir: &Path,
    extra: &[(&str, Vec<u8>)],
) -> crate::Result<()> {
    crate::fsutil::create_dir_all(dir)?;
    let cfg = model.config();
    let tied = model.lm_head_is_tied();
    let write = |name: &str, bytes: &[u8]| -> crate::Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| crate::Error::io(&p, e))
    };
    let pretty = |v: &Value| -> Vec<u8> {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
        s.push('\n');
        s.into_bytes()
    };
    let tensors = model.named_tensors()?;
    let mut config = hf_config_json(cfg, tok, tied);
    config["torch_dtype"] = json!(torch_dtype(&tensors));
    write("config.json", &pretty(&config))?;
    write("model.safetensors", &safetensors_bytes(&tensors)?)?;
    drop(tensors);
    let tokenizer_json = tok.inner().to_string(true).map_err(|e| {
        crate::Error::Model(ModelError::Input(format!("serialising the tokenizer: {e}")))
    })?;
    write("tokenizer.json", tokenizer_json.as_bytes())?;
    write(
        "tokenizer_config.json",
        &pretty(&hf_tokenizer_config_json(tok, cfg.max_position_embeddings)),
    )?;
    write(
        "generation_config.json",
        &pretty(&hf_generation_config_json(tok)),
    )?;
    for (name, bytes) in extra {
        write(name, bytes)?;
    }
    // Make the contents durable before the rename publishes the folder.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(f) = std::fs::File::open(e.path()) {
                let _ = f.sync_all();
            }
        }
    }
    Ok(())
}
