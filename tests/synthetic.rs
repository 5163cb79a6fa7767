//! `realign synthetic`: a checkpoint of a real model's shape, sharded bf16, with a matching
//! adapter — loadable, repeatable, and kept bf16 in memory.

mod common;

use candle_core::{DType, Device, Tensor};
use realign::adapters::Adapter;
use realign::model::synthetic::{write, SyntheticConfig, SyntheticShape};
use realign::model::{AdapterMode, LoadOptions, LoadedModel};
use realign::tokenizer::Tokenizer;

use common::fixtures;

fn tiny(dir: &std::path::Path, seed: u64) -> realign::model::synthetic::SyntheticReport {
    let tok = Tokenizer::from_hf_dir(&fixtures().join("tiny-llama")).unwrap();
    let opts = SyntheticConfig {
        shape: SyntheticShape::Tiny,
        seed,
        shard_bytes: 100_000,
        adapter_rank: 4,
    };
    write(dir, &tok, &opts, false, |_, _| {}).unwrap()
}

#[test]
fn tiny_checkpoint_loads_bf16_sharded_with_its_adapter() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("syn");
    let report = tiny(&dir, 7);
    // hidden 64, MLP 160, 2 layers, 4 heads of 16, 2 KV heads, vocabulary 678 (the tokenizer's):
    // embedding + LM head 2 * 678 * 64; per layer q, o 64*64, k, v 32*64, gate, up, down 160*64,
    // two norms of 64; the final norm 64.
    let per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64 + 2 * 64;
    let want = 2 * 678 * 64 + 2 * per_layer + 64;
    assert_eq!(report.parameters, want as u64);
    assert_eq!(report.model_bytes, 2 * want as u64);
    // 100 kB shards: the 86.8 kB embedding alone, then the layers, then the 86.8 kB LM head.
    assert!(report.shards.len() >= 3, "{:?}", report.shards);
    let m = LoadedModel::load(&dir.join("model"), &LoadOptions::default()).unwrap();
    assert_eq!(m.source.dtype, "BF16");
    assert_eq!(m.model.dtype(), DType::BF16);
    assert_eq!(m.model.num_parameters(), want);
    let ids = Tensor::new(&[[0u32, 38, 565, 569, 269]], &Device::Cpu).unwrap();
    let base = m.model.forward(&ids).unwrap();
    assert_eq!(base.dims(), &[1, 5, 678]);
    let finite = base
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
    let adapter = Adapter::load(&dir.join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(adapter.modules.len(), 2 * 7);
    assert_eq!(report.adapter_parameters, {
        let r = 4;
        let per = r * (64 + 64) * 2 + r * (64 + 32) * 2 + r * (64 + 160) * 3;
        2 * per as u64
    });
    let mut with = m.model.clone();
    with.apply_adapter(&adapter, AdapterMode::Unmerged).unwrap();
    let adapted = with.forward(&ids).unwrap();
    assert!(
        common::max_abs_diff(&base, &adapted) > 0.0,
        "the adapter changes the logits"
    );
    // A bf16 model keeps a "merged" adapter unmerged (no rounding, no f32 copy of the modules):
    // the same logits, bit for bit, and the weights stay bf16.
    let mut merged = m.model.clone();
    merged.apply_adapter(&adapter, AdapterMode::Merged).unwrap();
    assert_eq!(
        common::max_abs_diff(&adapted, &merged.forward(&ids).unwrap()),
        0.0
    );
    assert!(merged
        .linears()
        .all(|l| l.weight.dtype() == DType::BF16 && l.loras.len() == 1));
    // Widened to f32, the adapter is folded in: the same logits to rounding.
    let mut wide = m.model.with_storage(DType::F32).unwrap();
    wide.apply_adapter(&adapter, AdapterMode::Merged).unwrap();
    assert!(wide.linears().all(|l| l.loras.is_empty()));
    assert!(common::max_abs_diff(&adapted, &wide.forward(&ids).unwrap()) < 1e-4);
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    let ra = tiny(&a, 1);
    tiny(&b, 1);
    tiny(&c, 2);
    for shard in &ra.shards {
        let x = std::fs::read(a.join("model").join(shard)).unwrap();
        assert_eq!(x, std::fs::read(b.join("model").join(shard)).unwrap());
        assert_ne!(x, std::fs::read(c.join("model").join(shard)).unwrap());
    }
    // An existing output is refused without overwrite, and left as it was.
    let tok = Tokenizer::from_hf_dir(&fixtures().join("tiny-llama")).unwrap();
    let opts = SyntheticConfig {
        shape: SyntheticShape::Tiny,
        ..SyntheticConfig::default()
    };
    assert!(write(&a, &tok, &opts, false, |_, _| {}).is_err());
    assert!(a.join("synthetic.json").is_file());
}

#[test]
fn a_bf16_model_is_written_bf16_and_reads_back_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("syn");
    let report = tiny(&dir, 3);
    let m = LoadedModel::load(&dir.join("model"), &LoadOptions::default()).unwrap();
    let out = root.path().join("out");
    realign::model::export_hf(&m.model, &m.tokenizer, &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        // matrices as the checkpoint has them, norms widened on load and written f32
        let want = if view.shape().len() == 2 {
            safetensors::Dtype::BF16
        } else {
            safetensors::Dtype::F32
        };
        assert_eq!(view.dtype(), want, "{name}");
    }
    // about the checkpoint's size (bf16), not twice it (f32): the norms are 4 bytes each
    assert!(
        (bytes.len() as u64) < report.model_bytes + 4096,
        "{}",
        bytes.len()
    );
    let back = LoadedModel::load(&out, &LoadOptions::default()).unwrap();
    assert_eq!(back.model.dtype(), DType::BF16);
    let ids = Tensor::new(&[[0u32, 38, 565, 569, 269]], &Device::Cpu).unwrap();
    let (a, b) = (
        m.model.forward(&ids).unwrap(),
        back.model.forward(&ids).unwrap(),
    );
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    // Asked for f32 storage, the same checkpoint is written f32 with the same values.
    let wide = LoadedModel::load(
        &dir.join("model"),
        &LoadOptions {
            dtype: realign::model::StorageDtype::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let out32 = root.path().join("out32");
    realign::model::export_hf(&wide.model, &wide.tokenizer, &out32).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out32.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
    let back32 = LoadedModel::load(&out32, &LoadOptions::default()).unwrap();
    assert_eq!(back32.model.dtype(), DType::F32);
    assert_eq!(
        common::max_abs_diff(
            &wide.model.forward(&ids).unwrap(),
            &back32.model.forward(&ids).unwrap()
        ),
        0.0
    );
}
