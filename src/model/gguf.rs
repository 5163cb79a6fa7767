//! GGUF checkpoints (v2/v3): configuration from metadata, every tensor dequantised (kept f32,
//! or stored narrower as [`StorageDtype`] says) and renamed to the Hugging Face layout, with llama.cpp's rotary row permutation of Q and K undone
//! (Llama and Mistral; Qwen2 is stored unpermuted) so that weights, activations and PEFT adapters
//! line up with the original model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::config::{Architecture, Config, RopeScaling};
use super::storage::StorageDtype;
use super::weights::Weights;
use super::ModelError;

/// Reads the header (metadata and tensor index) of a GGUF file.
pub fn read_content(path: &Path) -> crate::Result<Content> {
    let mut f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    Content::read(&mut f).map_err(|e| bad(path, format!("not a valid GGUF file: {e}")))
}

fn bad(path: &Path, reason: String) -> crate::Error {
    ModelError::BadGguf {
        path: path.to_path_buf(),
        reason,
    }
    .into()
}

fn meta<'a>(c: &'a Content, path: &Path, key: &str) -> crate::Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| bad(path, format!("metadata key {key:?} is missing")))
}

fn meta_usize(c: &Content, path: &Path, key: &str) -> crate::Result<usize> {
    let v = meta(c, path, key)?;
    let n = v
        .to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64));
    n.map(|n| n as usize)
        .map_err(|e| bad(path, format!("metadata key {key:?}: {e}")))
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    let v = c.metadata.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// The runtime configuration from GGUF metadata (`general.architecture` and its keys).
pub fn config_from_gguf(c: &Content, path: &Path) -> crate::Result<Config> {
    let arch_name = meta(c, path, "general.architecture")?
        .to_string()
        .map_err(|e| bad(path, format!("general.architecture: {e}")))?
        .clone();
    let architecture = Architecture::from_model_type(&arch_name).ok_or_else(|| {
        bad(
            path,
            format!("unsupported architecture {arch_name:?} (supported: llama, mistral, qwen2)"),
        )
    })?;
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden_size = meta_usize(c, path, &k("embedding_length"))?;
    let num_attention_heads = meta_usize(c, path, &k("attention.head_count"))?;
    let num_key_value_heads =
        meta_usize(c, path, &k("attention.head_count_kv")).unwrap_or(num_attention_heads);
    if num_attention_heads == 0
        || num_key_value_heads == 0
        || num_attention_heads % num_key_value_heads != 0
    {
        return Err(bad(
            path,
            format!("head counts {num_attention_heads}/{num_key_value_heads} are inconsistent"),
        ));
    }
    let head_dim = meta_usize(c, path, &k("attention.key_length"))
        .unwrap_or(hidden_size / num_attention_heads);
    let embed = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad(path, "tensor \"token_embd.weight\" is missing".into()))?;
    let vocab_size = embed.shape.dims()[0];
    let rope_scaling = match c
        .metadata
        .get(&k("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        Some("linear") => RopeScaling::Linear {
            factor: meta_f64(c, &k("rope.scaling.factor")).unwrap_or(1.0),
        },
        _ => RopeScaling::Default,
    };
    let cfg = Config {
        architecture,
        hidden_size,
        intermediate_size: meta_usize(c, path, &k("feed_forward_length"))?,
        num_hidden_layers: meta_usize(c, path, &k("block_count"))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: meta_f64(c, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(c, &k("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        vocab_size,
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        qkv_bias: architecture == Architecture::Qwen2,
        o_bias: false,
        mlp_bias: false,
        max_position_embeddings: meta_usize(c, path, &k("context_length")).unwrap_or(4096),
        // llama.cpp's llama and qwen2 graphs attend to every earlier position.
        sliding_window: None,
    };
    cfg.check().map_err(|reason| bad(path, reason))?;
    Ok(cfg)
}

/// The Hugging Face name of a GGUF tensor, or `None` for tensors the runtime does not use.
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let local = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{local}.{kind}"))
}

/// Undoes llama.cpp's per-head row permutation of a Q or K weight (or bias).
///
/// llama.cpp stores each head's rows interleaved (`[h, d/2, 2]`) for its interleaved rope; the
/// Hugging Face layout is half-split (`[h, 2, d/2]`). Shapes: `w: [heads * head_dim, ..]`.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Whether llama.cpp's converter stored this family's Q and K rows permuted for its interleaved
/// ("normal") rope. It does so for Llama and Mistral only; Qwen2 uses the NEOX (half-split) rope,
/// the Hugging Face layout, and its rows (and q/k biases) are stored as they are.
pub fn stores_interleaved_rope(arch: Architecture) -> bool {
    match arch {
        Architecture::Llama | Architecture::Mistral => true,
        Architecture::Qwen2 => false,
    }
}

/// Reads and dequantises every tensor of a GGUF file to f32, with Hugging Face names.
pub fn load_weights(
    c: &Content,
    path: &Path,
    cfg: &Config,
    device: &Device,
    dtype: StorageDtype,
) -> crate::Result<Weights> {
    let mut f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut tensors = HashMap::new();
    // In file order: reads are sequential, and a truncated file's error names the first
    // tensor that does not fit, the same one on every run.
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort_by_key(|n| (c.tensor_infos[*n].offset, *n));
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let q = c
            .tensor(&mut f, name, device)
            .map_err(|e| bad(path, format!("tensor {name:?}: {e}")))?;
        let file = match q.dtype() {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        let mut t = q
            .dequantize(device)
            .map_err(|e| bad(path, format!("tensor {name:?}: {e}")))?;
        if stores_interleaved_rope(cfg.architecture) {
            if hf.contains(".self_attn.q_proj.") {
                t = unpermute_rows(&t, cfg.num_attention_heads)?;
            } else if hf.contains(".self_attn.k_proj.") {
                t = unpermute_rows(&t, cfg.num_key_value_heads)?;
            }
        }
        let t = dtype.store(t, file)?;
        crate::fsutil::check_finite(&t, path, name)?;
        tensors.insert(hf, t);
    }
    Ok(Weights::new(tensors, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // One head of dim 4: HF rows [r0, r1, r2, r3] (halves [r0 r1 | r2 r3]) are stored by
        // llama.cpp as pairs (r0, r2), (r1, r3) -> [r0, r2, r1, r3].
        let dev = Device::Cpu;
        let stored = Tensor::new(&[[0f32], [2.], [1.], [3.]], &dev).unwrap();
        let hf = unpermute_rows(&stored, 1).unwrap();
        assert_eq!(
            hf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 1., 2., 3.]
        );
        // Two heads keep their blocks.
        let stored = Tensor::new(&[0f32, 2., 1., 3., 4., 6., 5., 7.], &dev).unwrap();
        let hf = unpermute_rows(&stored, 2).unwrap();
        assert_eq!(
            hf.to_vec1::<f32>().unwrap(),
            vec![0., 1., 2., 3., 4., 5., 6., 7.]
        );
    }
}
