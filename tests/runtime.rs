//! Runtime behaviours beyond the fixtures: sharded and f16 checkpoints, stacked adapters, and
//! the activation API.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use realign::adapters::{lora_delta, Adapter};
use realign::model::{
    AdapterMode, Capture, ForwardArgs, GenerationConfig, LoadOptions, LoadedModel, StorageDtype,
};

use common::{fixtures, max_abs_diff};

fn load(dir: &Path) -> LoadedModel {
    LoadedModel::load(dir, &LoadOptions::default()).unwrap()
}

fn prompt() -> Tensor {
    Tensor::new(
        &[[0u32, 38, 565, 569, 269, 580, 572, 269, 350, 17]],
        &Device::Cpu,
    )
    .unwrap()
}

fn copy_side_files(from: &Path, to: &Path) {
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        if from.join(f).is_file() {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let src = fixtures().join("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    copy_side_files(&src, dir.path());
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.path().join(file)).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let single = load(&src).model.forward(&prompt()).unwrap();
    let sharded = load(dir.path()).model.forward(&prompt()).unwrap();
    assert_eq!(max_abs_diff(&single, &sharded), 0.0);
}

/// A bf16 or f16 checkpoint is kept bf16/f16 in memory (`--dtype auto`) and computes exactly
/// what an f32 checkpoint of the same rounded values computes: for few rows (gemv: 1-4, the
/// register tiles: 5-64), for a long prefill (the product on a transient f32 copy), and greedy
/// decoding with the KV cache; `--dtype f32` widens at load with the same result.
#[test]
fn narrow_checkpoints_stay_narrow_and_compute_in_f32() {
    let src = fixtures().join("tiny-llama");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let long = Tensor::from_vec(
        (0..90u32)
            .map(|i| (i * 37 + 11) % 678)
            .collect::<Vec<u32>>(),
        (1, 90),
        &Device::Cpu,
    )
    .unwrap();
    for (dtype, name) in [(DType::F16, "F16"), (DType::BF16, "BF16")] {
        let dir = tempfile::tempdir().unwrap();
        copy_side_files(&src, dir.path());
        let narrow: HashMap<String, Tensor> = all
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&narrow, dir.path().join("model.safetensors")).unwrap();
        // Reference: the rounded weights, widened to f32 by hand.
        let rounded: HashMap<String, Tensor> = narrow
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
            .collect();
        let ref_dir = tempfile::tempdir().unwrap();
        copy_side_files(&src, ref_dir.path());
        candle_core::safetensors::save(&rounded, ref_dir.path().join("model.safetensors")).unwrap();
        let m = load(dir.path());
        assert_eq!(m.source.dtype, name);
        assert_eq!(m.model.dtype(), dtype, "{name}: kept in its storage dtype");
        let widened = LoadedModel::load(
            dir.path(),
            &LoadOptions {
                dtype: StorageDtype::F32,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(widened.model.dtype(), DType::F32);
        let reference = load(ref_dir.path());
        for x in [prompt(), prompt().narrow(1, 0, 3).unwrap(), long.clone()] {
            let want = reference.model.forward(&x).unwrap();
            assert_eq!(
                max_abs_diff(&m.model.forward(&x).unwrap(), &want),
                0.0,
                "{name}"
            );
            assert_eq!(
                max_abs_diff(&widened.model.forward(&x).unwrap(), &want),
                0.0,
                "{name}"
            );
        }
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            sampling: realign::model::Sampling::Greedy,
            stop_ids: Vec::new(),
            pad_id: 5,
        };
        // A batch of two prompts of different lengths (left padding, two rows per product).
        let ids: Vec<u32> = prompt().flatten_all().unwrap().to_vec1().unwrap();
        let prompts = vec![ids.clone(), ids[..4].to_vec()];
        let got = realign::model::generate(&m.model, &prompts, &cfg).unwrap();
        let want = realign::model::generate(&reference.model, &prompts, &cfg).unwrap();
        assert_eq!(got, want, "{name}: greedy tokens");
    }
}

/// Two adapters stacked unmerged equal the base weights plus both updates, merged by hand.
#[test]
fn stacked_adapters_add_their_updates() {
    let dev = Device::Cpu;
    let ad = |name: &str| {
        Adapter::load(
            &fixtures().join(format!("tiny-llama-adapters/{name}")),
            &dev,
        )
        .unwrap()
    };
    let (a1, a2) = (ad("aligned"), ad("finetuned"));
    let mut stacked = load(&fixtures().join("tiny-llama"));
    stacked
        .model
        .apply_adapter(&a1, AdapterMode::Unmerged)
        .unwrap();
    stacked
        .model
        .apply_adapter(&a2, AdapterMode::Unmerged)
        .unwrap();
    let mut by_hand = load(&fixtures().join("tiny-llama"));
    for lin in by_hand.model.linears_mut() {
        let d1 = lora_delta(&a1.modules[&lin.name]).unwrap();
        let d2 = lora_delta(&a2.modules[&lin.name]).unwrap();
        lin.weight = ((&lin.weight + d1).unwrap() + d2).unwrap();
    }
    let d = max_abs_diff(
        &stacked.model.forward(&prompt()).unwrap(),
        &by_hand.model.forward(&prompt()).unwrap(),
    );
    // Merged and unmerged sums round differently; the fixtures' logit tolerance covers both.
    assert!(d < 1e-4, "{d}");
    // And the stack differs from either adapter alone (the second one is really applied).
    let mut one = load(&fixtures().join("tiny-llama"));
    one.model.apply_adapter(&a1, AdapterMode::Unmerged).unwrap();
    assert!(
        max_abs_diff(
            &stacked.model.forward(&prompt()).unwrap(),
            &one.model.forward(&prompt()).unwrap()
        ) > 1e-3
    );
}

/// The activation sites: a module's input/output, the FFN intermediate, per-head q/k/v.
#[test]
fn activations_are_what_the_modules_compute() {
    let m = load(&fixtures().join("tiny-qwen2"));
    let l = "model.layers.1";
    let sites = [
        format!("{l}.mlp.gate_proj:output"),
        format!("{l}.mlp.up_proj:output"),
        format!("{l}.mlp.down_proj:input"),
        format!("{l}.mlp.down_proj:output"),
        format!("{l}.self_attn.v_proj:output"),
        format!("{l}.self_attn:q"),
        format!("{l}.self_attn:k"),
        format!("{l}.self_attn:v"),
        format!("{l}.self_attn:attn_weights"),
    ];
    let cap = Capture::new(sites.iter().cloned());
    m.model
        .forward_with(
            &prompt(),
            ForwardArgs {
                hook: Some(&cap),
                ..Default::default()
            },
        )
        .unwrap();
    let get = |s: &str| cap.get(&format!("{l}{s}")).unwrap();
    // FFN intermediate = silu(gate) * up.
    let inter = (candle_nn::ops::silu(&get(".mlp.gate_proj:output")).unwrap()
        * get(".mlp.up_proj:output"))
    .unwrap();
    assert!(max_abs_diff(&inter, &get(".mlp.down_proj:input")) < 1e-6);
    // down_proj output = intermediate @ W^T.
    let w = m
        .model
        .linears()
        .find(|x| x.name == format!("{l}.mlp.down_proj"))
        .unwrap()
        .weight
        .to_dtype(DType::F32) // tiny-qwen2 is stored (and kept) as bf16
        .unwrap();
    let out = inter.broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(max_abs_diff(&out, &get(".mlp.down_proj:output")) < 1e-5);
    // Per-head shapes: 4 query heads, 2 KV heads, head_dim 16, 10 tokens.
    assert_eq!(get(".self_attn:q").dims(), &[1, 4, 10, 16]);
    assert_eq!(get(".self_attn:k").dims(), &[1, 2, 10, 16]);
    // v per head is v_proj's output split into heads (no rotation).
    let v = get(".self_attn.v_proj:output")
        .reshape((1, 10, 2, 16))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert!(max_abs_diff(&v.contiguous().unwrap(), &get(".self_attn:v")) < 1e-7);
    // Attention rows are causal distributions.
    let p = get(".self_attn:attn_weights");
    assert_eq!(p.dims(), &[1, 4, 10, 10]);
    let sums = p
        .sum(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    let upper = p
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .narrow(0, 3, 7)
        .unwrap();
    assert_eq!(
        upper
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // Sites nobody asked for are not kept.
    assert!(cap.get("model.layers.0.mlp.down_proj:input").is_none());
}

/// Continuous batching through two slots: a 60-token prompt that stops after two tokens leaves
/// its batch-mate with a long padded history (trimmed), short prompts then join one by one with
/// histories of other lengths, and one pair shares a 20-token prefix. Every prompt gets the
/// greedy tokens it gets alone, and each is reported finished once.
#[test]
fn continuous_batching_equals_each_prompt_alone() {
    let m = load(&fixtures().join("tiny-llama"));
    let ids = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 37 + seed * 101 + 11) % 500)
            .collect()
    };
    let prefix = ids(20, 9);
    let prompts: Vec<Vec<u32>> = vec![
        ids(60, 1),
        ids(3, 2),
        ids(8, 3),
        prefix.iter().copied().chain([7u32]).collect(),
        prefix.iter().copied().chain([300u32, 12, 99]).collect(),
        ids(1, 4),
        ids(5, 5),
    ];
    let free = GenerationConfig {
        max_new_tokens: 9,
        sampling: realign::model::Sampling::Greedy,
        stop_ids: Vec::new(),
        pad_id: 5,
    };
    let alone = |p: &Vec<u32>, cfg: &GenerationConfig| {
        realign::model::generate(&m.model, std::slice::from_ref(p), cfg)
            .unwrap()
            .remove(0)
    };
    // Prompt 0 stops on its second token.
    let cfg = GenerationConfig {
        stop_ids: vec![alone(&prompts[0], &free)[1]],
        ..free
    };
    let singles: Vec<Vec<u32>> = prompts.iter().map(|p| alone(p, &cfg)).collect();
    assert!(singles[0].len() <= 2, "{:?}", singles[0]);
    assert!(singles.iter().any(|o| o.len() == 9), "{singles:?}");
    let mut finished = Vec::new();
    let queued =
        realign::model::generate_continuous(&m.model, &prompts, &cfg, 2, &mut |i| finished.push(i))
            .unwrap();
    assert_eq!(queued, singles);
    finished.sort_unstable();
    assert_eq!(finished, (0..prompts.len()).collect::<Vec<_>>());
    // No slots is an error, not a hang.
    assert!(realign::model::generate_continuous(&m.model, &prompts, &cfg, 0, &mut |_| ()).is_err());
}

/// Prompts that share a long prefix (a chat template's system turn): the prefix is computed once
/// and its keys/values repeated for every row, the rows padded between the prefix and their own
/// tokens. Every prompt still gets the greedy tokens it gets alone.
#[test]
fn shared_prefix_batch_equals_each_prompt_alone() {
    let m = load(&fixtures().join("tiny-llama"));
    let prefix: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 500).collect();
    let prompts: Vec<Vec<u32>> = [vec![7u32], vec![300, 12, 99], vec![5, 6, 7, 8, 9, 10]]
        .into_iter()
        .map(|own| prefix.iter().copied().chain(own).collect())
        .collect();
    assert_eq!(realign::model::shared_prefix(&prompts), 20);
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        sampling: realign::model::Sampling::Greedy,
        stop_ids: Vec::new(),
        pad_id: 5,
    };
    let batched = realign::model::generate(&m.model, &prompts, &cfg).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = realign::model::generate(&m.model, std::slice::from_ref(p), &cfg)
            .unwrap()
            .remove(0);
        assert_eq!(batched[i], alone, "prompt {i}");
        assert_eq!(alone.len(), 8);
    }
}
