//! Parity on config variants that the fixtures' own configs do not exercise: sliding-window
//! attention (Mistral's default window, `null`, Qwen2's `use_sliding_window` / `layer_types`),
//! `hidden_act: "swish"` and Mistral's ignored `attention_bias`. Each variant is the fixture
//! folder with its `config.json` edited; where transformers computes the same network as for
//! the fixture's own config (a window no shorter than the input, swish = silu, Mistral without
//! biases), the fixture's reference logits (transformers, see tests/fixtures/README.md) must
//! come out within 1e-4. Where it would not (an input past the window), the forward pass must
//! refuse with the exact sentence instead of attending to every position.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use realign::model::config::{Config, SlidingWindow};
use realign::model::export::hf_config_json;
use realign::model::{LoadOptions, LoadedModel};
use serde_json::{json, Value};

use common::{copy_dir, fixtures, max_abs_diff};

fn expected(arch: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("tiny-{arch}-expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn prompt(exp: &HashMap<String, Tensor>, i: usize) -> Tensor {
    let t = &exp[&format!("input_ids.{i}")];
    t.to_dtype(DType::U32)
        .unwrap()
        .reshape((1, t.elem_count()))
        .unwrap()
}

/// The fixture `tiny-{arch}` copied into `dir`, with `edit` applied to its `config.json`.
fn variant(arch: &str, dir: &Path, edit: impl FnOnce(&mut Value)) -> LoadedModel {
    copy_dir(&fixtures().join(format!("tiny-{arch}")), dir);
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    LoadedModel::load(dir, &LoadOptions::default()).unwrap()
}

/// Max |logit − reference| of `m` on the fixture's three prompts.
fn worst_diff(m: &LoadedModel, exp: &HashMap<String, Tensor>) -> f32 {
    (0..3)
        .map(|i| {
            let logits = m
                .model
                .forward(&prompt(exp, i))
                .unwrap()
                .squeeze(0)
                .unwrap();
            max_abs_diff(&logits, &exp[&format!("base.logits.{i}")])
        })
        .fold(0.0, f32::max)
}

fn config(raw: Value) -> Config {
    Config::from_hf_json(&raw).unwrap()
}

fn base_json(model_type: &str) -> Value {
    json!({"model_type": model_type, "hidden_size": 64, "intermediate_size": 160,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 678, "max_position_embeddings": 512})
}

#[test]
fn sliding_window_is_settled_with_transformers_defaults() {
    let with = |model_type: &str, extra: Value| {
        let mut c = base_json(model_type);
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        config(c).sliding_window
    };
    let all = |size| {
        Some(SlidingWindow {
            size,
            layers: vec![0, 1, 2],
        })
    };
    // MistralConfig's default window is 4096; `null` turns it off.
    assert_eq!(with("mistral", json!({})), all(4096));
    assert_eq!(with("mistral", json!({"sliding_window": null})), None);
    assert_eq!(with("mistral", json!({"sliding_window": 8})), all(8));
    // Llama has no window, whatever the file says.
    assert_eq!(with("llama", json!({"sliding_window": 8})), None);
    // Qwen2: only with use_sliding_window, from max_window_layers (default 28) on.
    assert_eq!(with("qwen2", json!({"sliding_window": 8})), None);
    assert_eq!(
        with(
            "qwen2",
            json!({"sliding_window": 8, "use_sliding_window": false, "max_window_layers": 0})
        ),
        None
    );
    assert_eq!(
        with(
            "qwen2",
            json!({"sliding_window": 8, "use_sliding_window": true})
        ),
        None,
        "max_window_layers defaults to 28: no layer of 3 slides"
    );
    assert_eq!(
        with(
            "qwen2",
            json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1})
        ),
        Some(SlidingWindow {
            size: 8,
            layers: vec![1, 2]
        })
    );
    assert_eq!(
        with(
            "qwen2",
            json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1,
                   "layer_types": ["sliding_attention", "full_attention", "full_attention"]})
        ),
        Some(SlidingWindow {
            size: 8,
            layers: vec![0]
        }),
        "layer_types wins over max_window_layers"
    );
    assert_eq!(
        with(
            "qwen2",
            json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 0,
                   "layer_types": ["full_attention", "full_attention", "full_attention"]})
        ),
        None,
        "layer_types with no sliding layer: no window"
    );
    // The positions the runtime reads stop at the window.
    let c = config(
        json!({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 678,
        "max_position_embeddings": 512, "sliding_window": 8}),
    );
    assert_eq!(c.positions(), 8);
    assert_eq!(
        c.positions_limit(),
        "sliding_window is 8: attention past the window is not implemented, so at most 8 \
         positions are read (max_position_embeddings is 512)"
    );
    let c = config(
        json!({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 678,
        "max_position_embeddings": 512, "sliding_window": 4096}),
    );
    assert_eq!(c.positions(), 512);
    assert_eq!(c.positions_limit(), "max_position_embeddings is 512");
    // Malformed values are named.
    let mut bad = base_json("qwen2");
    bad["use_sliding_window"] = json!(true);
    bad["max_window_layers"] = json!(0);
    bad["layer_types"] = json!(["full_attention"]);
    assert_eq!(
        Config::from_hf_json(&bad).unwrap_err(),
        "key `layer_types`: 1 entries for 3 layers"
    );
    let mut bad = base_json("mistral");
    bad["sliding_window"] = json!("4k");
    assert_eq!(
        Config::from_hf_json(&bad).unwrap_err(),
        "key `sliding_window`: expected a whole number of positions or null, got \"4k\""
    );
    let mut bad = base_json("mistral");
    bad["sliding_window"] = json!(0);
    assert_eq!(
        Config::from_hf_json(&bad).unwrap_err(),
        "sliding_window is 0; expected at least 1 position (or null)"
    );
}

/// A Mistral whose window covers the prompt computes what transformers does (full attention
/// equals the window there); one position more is refused, not computed with full attention.
#[test]
fn mistral_window_matches_reference_inside_and_refuses_past_it() {
    let exp = expected("llama");
    let n = prompt(&exp, 0).elem_count();
    let longest = (0..3).map(|i| prompt(&exp, i).elem_count()).max().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let m = variant("llama", &tmp.path().join("fits"), |c| {
        c["model_type"] = json!("mistral");
        c["sliding_window"] = json!(longest);
    });
    let d = worst_diff(&m, &exp);
    assert!(d < 1e-4, "max |logit diff| = {d}");
    let m = variant("llama", &tmp.path().join("short"), |c| {
        c["model_type"] = json!("mistral");
        c["sliding_window"] = json!(n - 1);
    });
    let e = m.model.forward(&prompt(&exp, 0)).unwrap_err().to_string();
    assert!(
        e.ends_with(&format!(
            "position {} is past the model's {} positions: sliding_window is {}: attention past \
             the window is not implemented, so at most {} positions are read \
             (max_position_embeddings is 512)",
            n - 1,
            n - 1,
            n - 1,
            n - 1
        )),
        "{e}"
    );
    // `null` (Mistral v0.2+): no window, every prompt within the reference.
    let m = variant("llama", &tmp.path().join("null"), |c| {
        c["model_type"] = json!("mistral");
        c["sliding_window"] = Value::Null;
    });
    assert_eq!(m.model.config().positions(), 512);
    let d = worst_diff(&m, &exp);
    assert!(d < 1e-4, "max |logit diff| = {d}");
}

#[test]
fn qwen2_window_matches_reference_inside_and_refuses_past_it() {
    let exp = expected("qwen2");
    let n = prompt(&exp, 0).elem_count();
    let longest = (0..3).map(|i| prompt(&exp, i).elem_count()).max().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The fixture lists `layer_types` (all full attention), which transformers puts before
    // `max_window_layers`: drop it so that the window applies from layer 1 on.
    let m = variant("qwen2", &tmp.path().join("fits"), |c| {
        c.as_object_mut().unwrap().remove("layer_types");
        c["use_sliding_window"] = json!(true);
        c["sliding_window"] = json!(longest);
        c["max_window_layers"] = json!(1);
    });
    let d = worst_diff(&m, &exp);
    assert!(d < 1e-4, "max |logit diff| = {d}");
    let m = variant("qwen2", &tmp.path().join("short"), |c| {
        c.as_object_mut().unwrap().remove("layer_types");
        c["use_sliding_window"] = json!(true);
        c["sliding_window"] = json!(n - 1);
        c["max_window_layers"] = json!(1);
    });
    assert_eq!(m.model.config().positions(), n - 1);
    let e = m.model.forward(&prompt(&exp, 0)).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "position {} is past the model's {} positions: sliding_window is {}",
            n - 1,
            n - 1,
            n - 1
        )),
        "{e}"
    );
    // The same window switched off (Qwen2.5's configs): no bound, reference logits.
    let m = variant("qwen2", &tmp.path().join("off"), |c| {
        c.as_object_mut().unwrap().remove("layer_types");
        c["use_sliding_window"] = json!(false);
        c["sliding_window"] = json!(n - 1);
        c["max_window_layers"] = json!(0);
    });
    assert_eq!(m.model.config().sliding_window, None);
    let d = worst_diff(&m, &exp);
    assert!(d < 1e-4, "max |logit diff| = {d}");
}

/// A written folder states its window, so that transformers' defaults (Mistral: 4096) do not
/// give it one its source did not have; reading the written config back settles the same.
#[test]
fn export_writes_the_window_transformers_would_otherwise_default() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Value, Value); 4] = [
        (
            "llama",
            "mistral",
            json!({"sliding_window": null}),
            Value::Null,
        ),
        ("llama", "mistral", json!({}), json!(4096)),
        (
            "qwen2",
            "qwen2",
            json!({"sliding_window": 32768}),
            Value::Null,
        ),
        (
            "qwen2",
            "qwen2",
            json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2}),
            json!(8),
        ),
    ];
    for (k, (arch, model_type, extra, want)) in cases.into_iter().enumerate() {
        let m = variant(arch, &tmp.path().join(k.to_string()), |c| {
            c["model_type"] = json!(model_type);
            if let Some(o) = c.as_object_mut() {
                o.remove("sliding_window");
                o.remove("layer_types");
                o.extend(extra.as_object().unwrap().clone());
            }
        });
        let cfg = m.model.config();
        let out = hf_config_json(cfg, &m.tokenizer, cfg.tie_word_embeddings);
        assert_eq!(out["sliding_window"], want, "case {k}: {out}");
        if k == 3 {
            assert_eq!(out["use_sliding_window"], json!(true));
            assert_eq!(out["max_window_layers"], json!(2));
            assert_eq!(
                out["layer_types"],
                json!(["full_attention", "full_attention", "sliding_attention"])
            );
        }
        let back = Config::from_hf_json(&out).unwrap();
        assert_eq!(back.sliding_window, cfg.sliding_window, "case {k}");
    }
}

/// transformers maps `swish` to the same SiLU, and its Mistral layers have no biases whatever
/// `attention_bias` says: both load and give the reference logits.
#[test]
fn swish_and_mistral_attention_bias_key_match_reference() {
    let exp = expected("llama");
    let tmp = tempfile::tempdir().unwrap();
    let m = variant("llama", &tmp.path().join("swish"), |c| {
        c["hidden_act"] = json!("swish");
    });
    let d = worst_diff(&m, &exp);
    assert!(d < 1e-4, "swish: max |logit diff| = {d}");
    let m = variant("llama", &tmp.path().join("mistral-bias"), |c| {
        c["model_type"] = json!("mistral");
        c["attention_bias"] = json!(true);
        c["mlp_bias"] = json!(true);
        c["sliding_window"] = Value::Null;
    });
    assert!(!m.model.config().qkv_bias && !m.model.config().mlp_bias);
    let d = worst_diff(&m, &exp);
    assert!(d < 1e-4, "mistral attention_bias: max |logit diff| = {d}");
    let mut gelu = base_json("llama");
    gelu["hidden_act"] = json!("gelu");
    assert_eq!(
        Config::from_hf_json(&gelu).unwrap_err(),
        "unsupported hidden_act \"gelu\" (only silu, also named swish)"
    );
}
