//! Model configuration: the Hugging Face `config.json` as users have it (several layouts), settled
//! once into the runtime [`Config`] so that defaults live in one place.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// The architecture families the runtime implements. All are the same decoder (RMSNorm,
/// rotary attention with GQA, SwiGLU MLP); they differ in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM2, TinyLlama.
    Llama,
    /// Mistral (its sliding window, 4096 when `config.json` does not set one, bounds the
    /// positions read: see [`Config::sliding_window`]).
    Mistral,
    /// Qwen2 / Qwen2.5: bias on q, k and v.
    Qwen2,
}

impl Architecture {
    /// Parses a `model_type` (HF) or `general.architecture` (GGUF) value.
    pub fn from_model_type(s: &str) -> Option<Self> {
        match s {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// No scaling.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling (low frequencies divided by `factor`, high kept, smooth
    /// in between).
    Llama3 {
        /// Divisor for low frequencies.
        factor: f64,
        /// Wavelength threshold (as a fraction of the original context) for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold for high frequencies.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// The kind of a [`RopeScaling`], without its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeScalingKind {
    /// [`RopeScaling::Default`]
    Default,
    /// [`RopeScaling::Linear`]
    Linear,
    /// [`RopeScaling::Llama3`]
    Llama3,
}

impl RopeScalingKind {
    /// The kind of `s`.
    pub fn of(s: &RopeScaling) -> Self {
        match s {
            RopeScaling::Default => Self::Default,
            RopeScaling::Linear { .. } => Self::Linear,
            RopeScaling::Llama3 { .. } => Self::Llama3,
        }
    }
}

/// The settled runtime configuration of a decoder model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// The family.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA when smaller than `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q, k, v projections have a bias.
    pub qkv_bias: bool,
    /// o projection has a bias.
    pub o_bias: bool,
    /// MLP projections have a bias.
    pub mlp_bias: bool,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Sliding-window attention, as transformers applies it (`None`: full causal attention in
    /// every layer). The runtime computes full causal attention, which equals sliding-window
    /// attention while every position is below the window; [`Config::positions`] therefore stops
    /// at the window, so that a longer sequence is refused instead of computed differently.
    pub sliding_window: Option<SlidingWindow>,
}

/// Sliding-window attention: a query at position `q` attends to the keys at `k` with
/// `q - size < k ≤ q`, in the layers listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlidingWindow {
    /// Number of positions a query sees, itself included.
    pub size: usize,
    /// The layers (indices from 0, ascending) that use the window; the others attend to every
    /// earlier position.
    pub layers: Vec<usize>,
}

impl Config {
    /// Reads and settles `config.json`.
    pub fn from_hf_file(path: &Path) -> crate::Result<Self> {
        let raw: Value = crate::fsutil::read_json(path)?;
        Self::from_hf_json(&raw).map_err(|reason| {
            ModelError::BadConfig {
                path: path.to_path_buf(),
                reason,
            }
            .into()
        })
    }

    /// Settles a parsed `config.json`. The error is a human sentence naming the key.
    pub fn from_hf_json(raw: &Value) -> Result<Self, String> {
        if !raw.is_object() {
            return Err(format!(
                "expected a JSON object of settings, got {}",
                crate::data::json_type(raw)
            ));
        }
        let hf: HfConfig = serde_path_to_error::deserialize(raw.clone()).map_err(|e| {
            let key = e.path().to_string();
            format!("key `{key}`: {}", e.into_inner())
        })?;
        let model_type = hf.model_type.clone().unwrap_or_default();
        let architecture = Architecture::from_model_type(&model_type).ok_or_else(|| {
            format!("unsupported model_type {model_type:?} (supported: llama, mistral, qwen2)")
        })?;
        if let Some(act) = hf.hidden_act.as_deref() {
            // transformers maps both names to the same SiLU.
            if act != "silu" && act != "swish" {
                return Err(format!(
                    "unsupported hidden_act {act:?} (only silu, also named swish)"
                ));
            }
        }
        let num_attention_heads = hf.num_attention_heads;
        if num_attention_heads == 0 {
            return Err("num_attention_heads is 0".into());
        }
        let num_key_value_heads = hf.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / num_attention_heads);
        // Newer transformers write `rope_parameters` (theta inside); older ones `rope_scaling`
        // with `rope_theta` at the top level.
        let params = raw.get("rope_parameters").filter(|v| v.is_object());
        let scaling = params.or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
        let rope_theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(hf.rope_theta)
            .unwrap_or(10_000.0);
        let rope_scaling = match scaling {
            None => RopeScaling::Default,
            Some(s) => rope_scaling_from_json(s)?,
        };
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            // transformers' Qwen2 and Mistral layers fix their biases, whatever
            // `attention_bias` / `mlp_bias` say.
            Architecture::Qwen2 => (true, false, false),
            Architecture::Mistral => (false, false, false),
            Architecture::Llama => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, hf.mlp_bias.unwrap_or(false))
            }
        };
        let cfg = Config {
            architecture,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            vocab_size: hf.vocab_size,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            sliding_window: sliding_window_from_json(raw, architecture, hf.num_hidden_layers)?,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks that every size is one a network can have and every constant is usable, before
    /// anything is allocated from them: no size is 0 or beyond [`MAX_DIM`] ([`MAX_LAYERS`] for
    /// the layer count, [`MAX_VOCAB`] for the vocabulary), no product of sizes overflows, and
    /// `rms_norm_eps` (≥ 0), `rope_theta` (> 0) and the rotary scaling's numbers (> 0) are
    /// finite. The error is a sentence naming the key, as in `config.json`.
    pub fn check(&self) -> Result<(), String> {
        let sizes = [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_attention_heads", self.num_attention_heads, MAX_DIM),
            ("num_key_value_heads", self.num_key_value_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
        ];
        for (key, v, max) in sizes {
            if v == 0 || v > max {
                return Err(format!("{key} is {v}; expected 1 to {max}"));
            }
        }
        if self.max_position_embeddings == 0 {
            return Err(
                "max_position_embeddings is 0; expected the number of positions the model reads \
                 (at least 1)"
                    .into(),
            );
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim is {} (hidden_size / num_attention_heads when absent); rotary embeddings need an even head size",
                self.head_dim
            ));
        }
        if self.num_attention_heads * self.head_dim > MAX_DIM {
            return Err(format!(
                "num_attention_heads × head_dim is {} × {}; expected at most {MAX_DIM}",
                self.num_attention_heads, self.head_dim
            ));
        }
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{key} is {v}; expected a finite number above 0"))
            }
        };
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps is {}; expected a finite number ≥ 0",
                self.rms_norm_eps
            ));
        }
        positive("rope_theta", self.rope_theta)?;
        if let Some(w) = &self.sliding_window {
            if w.size == 0 {
                return Err("sliding_window is 0; expected at least 1 position (or null)".into());
            }
        }
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => positive("rope scaling factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope scaling factor", factor)?;
                positive("rope scaling low_freq_factor", low_freq_factor)?;
                positive("rope scaling high_freq_factor", high_freq_factor)?;
                positive(
                    "rope scaling original_max_position_embeddings",
                    original_max_position_embeddings,
                )?;
            }
        }
        Ok(())
    }

    /// The number of positions the runtime reads: `max_position_embeddings`, or the sliding
    /// window when that is smaller (past it transformers would attend to a window only, and the
    /// runtime's full causal attention would differ), at least 1 and at most 65 536 (the size of
    /// the rotary tables).
    pub fn positions(&self) -> usize {
        let window = self.sliding_window.as_ref().map_or(usize::MAX, |w| w.size);
        self.max_position_embeddings.min(window).clamp(1, 1 << 16)
    }

    /// Why [`Config::positions`] is what it is, for error messages: `max_position_embeddings is
    /// N`, or the sliding window's sentence when the window is the bound.
    pub fn positions_limit(&self) -> String {
        match &self.sliding_window {
            Some(w) if w.size < self.max_position_embeddings => format!(
                "sliding_window is {}: attention past the window is not implemented, so at most \
                 {} positions are read (max_position_embeddings is {})",
                w.size,
                self.positions(),
                self.max_position_embeddings
            ),
            _ => format!(
                "max_position_embeddings is {}",
                self.max_position_embeddings
            ),
        }
    }

    /// Number of query heads sharing one key/value head.
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// `(out, in)` of a linear module named by its path inside a layer
    /// (`self_attn.q_proj`, `mlp.down_proj`, …), or `None` for another name.
    pub fn linear_shape(&self, local: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        Some(match local {
            "self_attn.q_proj" => (q, h),
            "self_attn.k_proj" | "self_attn.v_proj" => (kv, h),
            "self_attn.o_proj" => (h, q),
            "mlp.gate_proj" | "mlp.up_proj" => (i, h),
            "mlp.down_proj" => (h, i),
            _ => return None,
        })
    }

    /// Total number of parameters (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let per_layer: usize = LINEAR_MODULES
            .iter()
            .map(|m| self.linear_shape(m).map_or(0, |(o, i)| o * i))
            .sum::<usize>()
            + 2 * self.hidden_size
            + if self.qkv_bias {
                (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
            } else {
                0
            };
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.hidden_size + self.num_hidden_layers * per_layer
    }
}

/// The largest width [`Config::check`] accepts (hidden, intermediate and head sizes, head
/// counts): 2^20, about 20× Llama-3-405B's intermediate size (53,248).
pub const MAX_DIM: usize = 1 << 20;
/// The most decoder layers [`Config::check`] accepts.
pub const MAX_LAYERS: usize = 4096;
/// The largest vocabulary [`Config::check`] accepts (2^24 tokens).
pub const MAX_VOCAB: usize = 1 << 24;

/// The seven linear modules of a decoder layer, by their path inside the layer.
pub const LINEAR_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The sliding window transformers applies to `raw`'s model, with its defaults: Mistral slides
/// in every layer, over `sliding_window` positions (4096 when the key is absent, none when it is
/// `null`); Qwen2 only with `use_sliding_window: true` (default false), in the layers that
/// `layer_types` marks `sliding_attention`, or else from layer `max_window_layers` (default 28)
/// on. Llama has none.
fn sliding_window_from_json(
    raw: &Value,
    architecture: Architecture,
    num_layers: usize,
) -> Result<Option<SlidingWindow>, String> {
    let size = |default: Option<u64>| -> Result<Option<usize>, String> {
        match raw.get("sliding_window") {
            None => Ok(default.map(|d| d as usize)),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    format!("key `sliding_window`: expected a whole number of positions or null, got {v}")
                }),
        }
    };
    match architecture {
        Architecture::Llama => Ok(None),
        Architecture::Mistral => Ok(size(Some(4096))?.map(|size| SlidingWindow {
            size,
            layers: (0..num_layers).collect(),
        })),
        Architecture::Qwen2 => {
            let used = match raw.get("use_sliding_window") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(format!(
                        "key `use_sliding_window`: expected true or false, got {v}"
                    ))
                }
            };
            let Some(size) = size(Some(4096))?.filter(|_| used) else {
                return Ok(None);
            };
            let layers: Vec<usize> = match raw.get("layer_types") {
                Some(Value::Array(types)) => {
                    if types.len() != num_layers {
                        return Err(format!(
                            "key `layer_types`: {} entries for {num_layers} layers",
                            types.len()
                        ));
                    }
                    let mut layers = Vec::new();
                    for (i, t) in types.iter().enumerate() {
                        match t.as_str() {
                            Some("sliding_attention") => layers.push(i),
                            Some("full_attention") => {}
                            _ => {
                                return Err(format!(
                                    "key `layer_types[{i}]`: expected \"full_attention\" or \"sliding_attention\", got {t}"
                                ))
                            }
                        }
                    }
                    layers
                }
                None | Some(Value::Null) => {
                    let first = match raw.get("max_window_layers") {
                        None | Some(Value::Null) => 28,
                        Some(v) => v.as_u64().map_or(Err(format!(
                            "key `max_window_layers`: expected a whole number of layers, got {v}"
                        )), |n| Ok(usize::try_from(n).unwrap_or(usize::MAX)))?,
                    };
                    (first..num_layers).collect()
                }
                Some(v) => {
                    return Err(format!(
                        "key `layer_types`: expected a list of \"full_attention\" / \"sliding_attention\", got {v}"
                    ))
                }
            };
            Ok((!layers.is_empty()).then_some(SlidingWindow { size, layers }))
        }
    }
}

fn rope_scaling_from_json(s: &Value) -> Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a number at {key:?}"))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "unsupported rope_type {other:?} (supported: default, linear, llama3)"
        )),
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 678, "rms_norm_eps": 1e-5})
    }

    #[test]
    fn llama3_scaling_in_both_layouts() {
        let mut new = base();
        new["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut old = base();
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = Config::from_hf_json(&new).unwrap();
        let b = Config::from_hf_json(&old).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        // head_dim defaults to hidden / heads = 64 / 4.
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_unknown_type_is_named() {
        let mut q = base();
        q["model_type"] = json!("qwen2");
        let c = Config::from_hf_json(&q).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        let mut g = base();
        g["model_type"] = json!("gpt_neox");
        let e = Config::from_hf_json(&g).unwrap_err();
        assert!(e.contains("gpt_neox"), "{e}");
    }

    #[test]
    fn sizes_and_constants_out_of_range_are_named_errors() {
        assert!(Config::from_hf_json(&base()).is_ok());
        let cases = [
            (
                "num_hidden_layers",
                json!(1u64 << 40),
                "num_hidden_layers is 1099511627776",
            ),
            ("num_hidden_layers", json!(0), "num_hidden_layers is 0"),
            ("hidden_size", json!(0), "hidden_size is 0"),
            (
                "vocab_size",
                json!(1u64 << 30),
                "vocab_size is 1073741824; expected 1 to 16777216",
            ),
            ("head_dim", json!(1u64 << 21), "head_dim is 2097152"),
            ("head_dim", json!(15), "head_dim is 15"),
            ("intermediate_size", json!(0), "intermediate_size is 0"),
            ("rms_norm_eps", json!(-1.0), "rms_norm_eps is -1"),
            ("rope_theta", json!(0.0), "rope_theta is 0"),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": -2.0}),
                "rope scaling factor is -2",
            ),
        ];
        for (key, value, want) in cases {
            let mut c = base();
            c[key] = value;
            let e = Config::from_hf_json(&c).unwrap_err();
            assert!(e.starts_with(want), "{key}: {e}");
        }
        // 2^19 heads of 4: the product 2^21 is over the bound although each factor is not.
        let mut c = base();
        c["num_attention_heads"] = json!(1 << 19);
        c["num_key_value_heads"] = json!(1 << 19);
        c["head_dim"] = json!(4);
        let e = Config::from_hf_json(&c).unwrap_err();
        assert!(
            e.starts_with("num_attention_heads × head_dim is 524288 × 4"),
            "{e}"
        );
    }

    #[test]
    fn parameter_count_of_smollm2_shape() {
        // SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied.
        let c = Config::from_hf_json(&json!({"model_type": "llama", "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": true}))
        .unwrap();
        // per layer: q 576*576 + k,v 2*192*576 + o 576*576 + 3*1536*576 + 2 norms of 576
        // = 331776 + 221184 + 331776 + 2654208 + 1152 = 3540096; 30 layers = 106202880;
        // + embedding 49152*576 = 28311552 + final norm 576 = 134515008.
        assert_eq!(c.num_parameters(), 134_515_008);
    }
}
