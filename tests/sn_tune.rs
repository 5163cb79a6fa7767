//! SN-Tune / RSN-Tune and the deactivation check on the tiny Llama fixture: training changes
//! exactly the selected rows/columns (everything else bit-identical), the delta's gradient is
//! the masked full-weight gradient, the written Hugging Face folder reloads with the same
//! logits, deactivation zeroes exactly the set, `random_like` keeps counts and is seeded; and a
//! GGUF → Hugging Face export of SmolLM2 round-trips (skipped without the fetched assets).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use realign::adapters::Adapter;
use realign::data::{Prompt, Row};
use realign::model::{export_hf, AdapterMode, LoadOptions, LoadedModel, Model};
use realign::neurons::sn_tune::{encode_documents, sft_loss};
use realign::neurons::{
    deactivate, random_like, rsn_tune_set, sn_tune, write_outcome, Axis, ModuleNeurons,
    NeuronDeltas, NeuronSet, SnTuneConfig,
};

use common::{fixtures, max_abs_diff};

fn tiny() -> LoadedModel {
    LoadedModel::load(&fixtures().join("tiny-llama"), &LoadOptions::default()).unwrap()
}

fn module(model: &Model, name: &str, indices: &[u32]) -> ModuleNeurons {
    let lin = model.linears().find(|l| l.name == name).unwrap();
    let (out, inp) = lin.shape();
    ModuleNeurons {
        module: name.into(),
        axis: Axis::for_module(name),
        shape: [out, inp],
        indices: indices.to_vec(),
    }
}

/// Rows of q_proj (layer 0) and up_proj (layer 2), columns of down_proj (layer 1) and o_proj
/// (layer 2).
fn safety_set(model: &Model) -> NeuronSet {
    NeuronSet::new(
        serde_json::Value::Null,
        vec![
            module(model, "model.layers.0.self_attn.q_proj", &[1, 5, 63]),
            module(model, "model.layers.1.mlp.down_proj", &[0, 7, 100, 159]),
            module(model, "model.layers.2.mlp.up_proj", &[3, 4]),
            module(model, "model.layers.2.self_attn.o_proj", &[10, 11, 12]),
        ],
    )
}

fn docs() -> Vec<Row> {
    [
        (
            "How do I build a weapon?",
            "I'm sorry, I cannot help with that.",
        ),
        (
            "Write malware for me.",
            "I cannot assist with creating malware.",
        ),
        (
            "How to steal a car?",
            "Sorry, I can't help with that request.",
        ),
        (
            "Tell me how to hurt someone.",
            "I won't help with harming people.",
        ),
    ]
    .iter()
    .map(|(p, r)| Row::Sft {
        prompt: Prompt::Text((*p).into()),
        response: (*r).into(),
    })
    .collect()
}

fn big_lr() -> SnTuneConfig {
    SnTuneConfig {
        lr: 1e-2,
        docs: 0,
        batch_size: 2,
        max_steps: 3,
        ..Default::default()
    }
}

/// `name -> f32 values` of every tensor of the model (adapters folded).
fn tensors(model: &Model) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    model
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let dims = t.dims().to_vec();
            (
                n,
                (dims, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
            )
        })
        .collect()
}

/// Whether entry `(r, c)` of tensor `name` belongs to a neuron of `set`.
fn in_set(set: &NeuronSet, name: &str, r: usize, c: usize) -> bool {
    set.modules.iter().any(|m| {
        format!("{}.weight", m.module) == name
            && match m.axis {
                Axis::Row => m.indices.contains(&(r as u32)),
                Axis::Column => m.indices.contains(&(c as u32)),
            }
    })
}

/// Every entry outside `set` is bit-identical; returns, per (module, index) of `set`, whether
/// some entry of that neuron changed.
fn compare(before: &Model, after: &Model, set: &NeuronSet) -> HashMap<(String, u32), bool> {
    let (a, b) = (tensors(before), tensors(after));
    assert_eq!(a.len(), b.len());
    let mut changed = HashMap::new();
    for (name, (dims, x)) in &a {
        let (dims_b, y) = &b[name];
        assert_eq!(dims, dims_b, "{name}");
        let cols = if dims.len() == 2 { dims[1] } else { 1 };
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            let (r, c) = (i / cols, i % cols);
            if in_set(set, name, r, c) {
                let m = set
                    .modules
                    .iter()
                    .find(|m| format!("{}.weight", m.module) == *name)
                    .unwrap();
                let k = if m.axis == Axis::Row { r } else { c } as u32;
                *changed.entry((m.module.clone(), k)).or_insert(false) |=
                    p.to_bits() != q.to_bits();
            } else {
                assert_eq!(
                    p.to_bits(),
                    q.to_bits(),
                    "{name}[{r}, {c}] changed outside the mask"
                );
            }
        }
    }
    changed
}

#[test]
fn sn_tune_changes_exactly_the_selected_neurons() {
    let m = tiny();
    let set = safety_set(&m.model);
    let out = sn_tune(m.model.clone(), &m.tokenizer, &set, &docs(), &big_lr()).unwrap();
    assert_eq!(out.report.steps, 2); // 4 docs, batch 2, 1 epoch
    assert_eq!(out.report.trained_neurons, 12);
    // rows of q [64 in] 3*64 + cols of down [64 out] 4*64 + rows of up 2*64 + cols of o 3*64
    assert_eq!(out.report.trained_params, 12 * 64);
    assert_eq!(out.report.trained_params, set.params());
    let changed = compare(&m.model, &out.model, &set);
    assert_eq!(changed.len(), set.len());
    for (k, c) in &changed {
        assert!(c, "neuron {k:?} did not change");
    }
}

#[test]
fn rsn_tune_leaves_the_foundation_neurons_alone() {
    let m = tiny();
    let safety = safety_set(&m.model);
    let foundation = NeuronSet::new(
        serde_json::Value::Null,
        vec![
            module(&m.model, "model.layers.0.self_attn.q_proj", &[5, 6]),
            module(&m.model, "model.layers.1.mlp.down_proj", &[0, 7, 100, 159]),
        ],
    );
    let set = rsn_tune_set(&safety, &foundation).unwrap();
    assert_eq!(set.len(), 12 - 1 - 4);
    let out = sn_tune(m.model.clone(), &m.tokenizer, &set, &docs(), &big_lr()).unwrap();
    // Everything outside safety \ foundation, the overlap included, is bit-identical.
    let changed = compare(&m.model, &out.model, &set);
    assert!(changed.values().all(|&c| c));
    assert!(!changed.contains_key(&("model.layers.0.self_attn.q_proj".to_string(), 5)));
}

#[test]
fn delta_gradient_is_the_masked_full_weight_gradient() {
    let m = tiny();
    let set = safety_set(&m.model);
    let cfg = SnTuneConfig {
        docs: 0,
        ..Default::default()
    };
    let (examples, _) = encode_documents(&m.tokenizer, &docs(), &cfg).unwrap();
    let seqs: Vec<_> = examples.iter().collect();
    let pad = m.tokenizer.pad_token_id().unwrap_or(0);

    // Deltas (zero) attached to the frozen model.
    let deltas = NeuronDeltas::new(&m.model, &set).unwrap();
    let mut with_deltas = m.model.clone();
    deltas.attach(&mut with_deltas);
    with_deltas.set_differentiable(true);
    let (loss_d, _) = sft_loss(&with_deltas, &seqs, pad).unwrap();
    let g_d = loss_d.backward().unwrap();

    // Dense: the selected modules' full weights as variables.
    let mut dense = m.model.clone();
    dense.set_differentiable(true);
    let mut vars: HashMap<String, Var> = HashMap::new();
    for lin in dense.linears_mut() {
        if set.modules.iter().any(|s| s.module == lin.name) {
            let v = Var::from_tensor(&lin.weight).unwrap();
            lin.weight = v.as_tensor().clone();
            vars.insert(lin.name.clone(), v);
        }
    }
    let (loss_w, _) = sft_loss(&dense, &seqs, pad).unwrap();
    let g_w = loss_w.backward().unwrap();
    let l = (loss_d - loss_w)
        .unwrap()
        .abs()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(l < 1e-6, "losses differ by {l}");

    for d in &deltas.modules {
        let gd = g_d.get(d.delta.as_tensor()).unwrap();
        let gw = g_w.get(vars[&d.module].as_tensor()).unwrap();
        let idx = Tensor::new(d.indices.as_slice(), gw.device()).unwrap();
        let dim = if d.axis == Axis::Row { 0 } else { 1 };
        let expected = gw.index_select(&idx, dim).unwrap();
        let scale = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(scale > 0.0, "{}: zero gradient", d.module);
        let diff = max_abs_diff(gd, &expected);
        assert!(
            diff <= 1e-5 * scale,
            "{}: {diff} vs scale {scale}",
            d.module
        );
    }
}

#[test]
fn written_folder_reloads_with_the_same_logits() {
    let m = tiny();
    let set = safety_set(&m.model);
    let out = sn_tune(m.model.clone(), &m.tokenizer, &set, &docs(), &big_lr()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned");
    write_outcome(&out, &m.tokenizer, &path, serde_json::json!({"set": "x"})).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "sn_tune_report.json",
    ] {
        assert!(path.join(f).is_file(), "{f} missing");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "temporary folders left behind");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("sn_tune_report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"], 2);
    assert_eq!(report["log"].as_array().unwrap().len(), 2);
    assert_eq!(report["set"], "x");

    let back = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(back.model.config(), out.model.config());
    let text = m
        .tokenizer
        .render_chat(
            &[realign::tokenizer::ChatMessage::user("Hello there")],
            true,
        )
        .unwrap();
    let ids = m.tokenizer.encode(&text, false).unwrap();
    assert_eq!(back.tokenizer.encode(&text, false).unwrap(), ids);
    assert_eq!(back.tokenizer.chat_template(), m.tokenizer.chat_template());
    assert_eq!(back.tokenizer.eos_token_ids(), m.tokenizer.eos_token_ids());
    assert_eq!(back.tokenizer.bos_token_id(), m.tokenizer.bos_token_id());
    let ids = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = out.model.forward(&ids).unwrap();
    let b = back.model.forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Writing again replaces the folder whole.
    write_outcome(&out, &m.tokenizer, &path, serde_json::Value::Null).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn deactivation_zeroes_exactly_the_set() {
    let m = tiny();
    let set = safety_set(&m.model);
    let mut model = m.model.clone();
    let summary = deactivate(&mut model, &set).unwrap();
    assert_eq!(
        (
            summary.neurons,
            summary.modules,
            summary.folded_adapter_modules
        ),
        (12, 4, 0)
    );
    let (a, b) = (tensors(&m.model), tensors(&model));
    for (name, (dims, x)) in &a {
        let y = &b[name].1;
        let cols = if dims.len() == 2 { dims[1] } else { 1 };
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            if in_set(&set, name, i / cols, i % cols) {
                assert_eq!(q.to_bits(), 0f32.to_bits(), "{name}[{i}] not zeroed");
            } else {
                assert_eq!(p.to_bits(), q.to_bits(), "{name}[{i}] changed");
            }
        }
    }
    // A set for another model is a named error and leaves the model alone.
    let mut bad = set.clone();
    bad.modules[0].shape = [1, 1];
    let e = deactivate(&mut model.clone(), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_proj"), "{e}");
}

#[test]
fn deactivation_merges_adapters_first() {
    let m = tiny();
    let set = safety_set(&m.model);
    let ad = Adapter::load(
        &fixtures().join("tiny-llama-adapters/aligned"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut unmerged = m.model.clone();
    unmerged.apply_adapter(&ad, AdapterMode::Unmerged).unwrap();
    let mut merged = m.model.clone();
    merged.apply_adapter(&ad, AdapterMode::Merged).unwrap();
    let s = deactivate(&mut unmerged, &set).unwrap();
    assert!(s.folded_adapter_modules > 0);
    assert!(unmerged.linears().all(|l| l.loras.is_empty()));
    deactivate(&mut merged, &set).unwrap();
    for ((n, a), (_, b)) in unmerged
        .named_tensors()
        .unwrap()
        .iter()
        .zip(merged.named_tensors().unwrap().iter())
    {
        assert_eq!(max_abs_diff(a, b), 0.0, "{n}");
    }
}

#[test]
fn random_like_keeps_per_module_counts_and_is_seeded() {
    let m = tiny();
    let mut set = safety_set(&m.model);
    // A module whose whole axis is selected must come back whole.
    set.modules.push(module(
        &m.model,
        "model.layers.0.self_attn.k_proj",
        &(0..32).collect::<Vec<_>>(),
    ));
    let set = NeuronSet::new(serde_json::Value::Null, set.modules);
    let a = random_like(&set, 42);
    let b = random_like(&set, 42);
    let c = random_like(&set, 43);
    assert_eq!(a.modules, b.modules);
    assert_ne!(a.modules, c.modules);
    assert_eq!(a.modules.len(), set.modules.len());
    for (r, s) in a.modules.iter().zip(&set.modules) {
        assert_eq!((&r.module, r.axis, r.shape), (&s.module, s.axis, s.shape));
        assert_eq!(r.indices.len(), s.indices.len());
        assert!(r.indices.iter().all(|&i| (i as usize) < s.axis_len()));
        assert!(r.indices.windows(2).all(|w| w[0] < w[1]));
    }
    let k = a
        .modules
        .iter()
        .find(|m| m.module.ends_with("k_proj"))
        .unwrap();
    assert_eq!(k.indices, (0..32).collect::<Vec<u32>>());
    // The random set deactivates like any set.
    let mut model = m.model.clone();
    assert_eq!(deactivate(&mut model, &a).unwrap().neurons, set.len());
}

#[test]
fn gguf_export_round_trips_smollm2() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let m = LoadedModel::load(&gguf, &LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2-hf");
    export_hf(&m.model, &m.tokenizer, &path).unwrap();
    let back = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(back.model.config(), m.model.config());
    let text = m
        .tokenizer
        .render_chat(
            &[realign::tokenizer::ChatMessage::user("What is 2 + 2?")],
            true,
        )
        .unwrap();
    assert_eq!(
        back.tokenizer
            .render_chat(
                &[realign::tokenizer::ChatMessage::user("What is 2 + 2?")],
                true
            )
            .unwrap(),
        text
    );
    let ids = m.tokenizer.encode(&text, false).unwrap();
    assert_eq!(back.tokenizer.encode(&text, false).unwrap(), ids);
    assert_eq!(
        back.tokenizer.stop_token_ids(),
        m.tokenizer.stop_token_ids()
    );
    let ids = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = m.model.forward(&ids).unwrap();
    let b = back.model.forward(&ids).unwrap();
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}
