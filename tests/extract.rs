//! Full fine-tunes: `realign extract` recovers a known low-rank dense update exactly, reports
//! what it does not carry, and `realign merge --subtract` writes a repaired full model that
//! reloads with the expected logits.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use realign::adapters::extract::{extract, ExtractConfig, SvdMethod};
use realign::adapters::{lora_delta, Adapter};
use realign::model::export::safetensors_f32_bytes;
use realign::model::weights::load_safetensors;
use realign::model::{AdapterMode, LoadOptions, LoadedModel};

use common::{copy_dir, fixtures, max_abs_diff};

/// A seeded `[rows, cols]` tensor of values in (-scale, scale).
fn noise(rows: usize, cols: usize, seed: u64, scale: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// The tiny Llama fixture with `deltas` added to the named tensors, written to `dir`.
fn fine_tune(dir: &Path, deltas: &HashMap<String, Tensor>) {
    copy_dir(&fixtures().join("tiny-llama"), dir);
    let mut tensors = load_safetensors(
        &dir.join("model.safetensors"),
        &Device::Cpu,
        realign::model::StorageDtype::F32,
    )
    .unwrap();
    for (name, d) in deltas {
        let w = tensors.get_mut(name).unwrap();
        *w = (&*w + d).unwrap();
    }
    let mut named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_f32_bytes(&named).unwrap(),
    )
    .unwrap();
}

/// Rank-2 updates of every q_proj and down_proj of the tiny model (64 hidden, 160 FFN).
fn low_rank_deltas() -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for l in 0..3u64 {
        for (module, rows, cols) in [("self_attn.q_proj", 64, 64), ("mlp.down_proj", 64, 160)] {
            let b = noise(rows, 2, 10 * l + 1, 0.3);
            let a = noise(2, cols, 10 * l + 2, 0.3);
            out.insert(
                format!("model.layers.{l}.{module}.weight"),
                b.matmul(&a).unwrap(),
            );
        }
    }
    out
}

fn prompt_ids() -> Tensor {
    Tensor::new(&[[1u32, 17, 200, 33, 5, 99, 410, 2]], &Device::Cpu).unwrap()
}

#[test]
fn a_low_rank_full_fine_tune_is_recovered_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ft = tmp.path().join("ft");
    let deltas = low_rank_deltas();
    fine_tune(&ft, &deltas);
    let base = fixtures().join("tiny-llama");
    for method in [SvdMethod::Exact, SvdMethod::Randomized] {
        let cfg = ExtractConfig {
            rank: 2,
            method,
            oversample: 1,
            ..ExtractConfig::default()
        };
        let (adapter, report) = extract(&base, &ft, &cfg).unwrap();
        // 3 layers x 7 modules, 15 of them untouched.
        assert_eq!(report.num_modules, 21);
        assert_eq!(report.unchanged_modules, 15);
        assert!(report.not_captured.is_empty(), "{:?}", report.not_captured);
        assert!((report.energy_captured - 1.0).abs() < 1e-9);
        // Every changed module went through the SVD path asked for (the sketch, 3 columns, is
        // narrower than the 64-wide modules, so randomized is not replaced by exact).
        for row in report.modules.iter().filter(|r| r.delta_norm > 0.0) {
            assert_eq!(row.method, method, "{}", row.module);
        }
        for (name, m) in &adapter.modules {
            let delta = lora_delta(m).unwrap();
            match deltas.get(&format!("{name}.weight")) {
                Some(d) => assert!(
                    max_abs_diff(&delta, d) < 1e-5,
                    "{method:?} {name}: {}",
                    max_abs_diff(&delta, d)
                ),
                None => assert_eq!(
                    delta
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0
                ),
            }
        }
        // The base model with the extracted adapter is the fine-tuned model.
        let opts = LoadOptions::default();
        let mut with = LoadedModel::load(&base, &opts).unwrap();
        with.model
            .apply_adapter(&adapter, AdapterMode::Unmerged)
            .unwrap();
        let full = LoadedModel::load(&ft, &opts).unwrap();
        let ids = prompt_ids();
        let diff = max_abs_diff(
            &with.model.forward(&ids).unwrap(),
            &full.model.forward(&ids).unwrap(),
        );
        assert!(diff < 1e-4, "{method:?}: logits differ by {diff}");
    }
}

#[test]
fn truncation_reports_the_energy_it_drops_and_the_tensors_it_does_not_carry() {
    let tmp = tempfile::tempdir().unwrap();
    let ft = tmp.path().join("ft");
    // A full-rank update of one module and a changed final norm.
    let d = noise(64, 64, 7, 0.05);
    let norm = noise(1, 64, 8, 0.1).squeeze(0).unwrap();
    let deltas = HashMap::from([
        (
            "model.layers.1.self_attn.o_proj.weight".to_string(),
            d.clone(),
        ),
        ("model.norm.weight".to_string(), norm.clone()),
    ]);
    fine_tune(&ft, &deltas);
    let base = fixtures().join("tiny-llama");
    let cfg = ExtractConfig {
        rank: 4,
        ..ExtractConfig::default()
    };
    let (_, report) = extract(&base, &ft, &cfg).unwrap();
    let row = report
        .modules
        .iter()
        .find(|r| r.module == "model.layers.1.self_attn.o_proj")
        .unwrap();
    // Captured energy = the 4 largest squared singular values over ||D||_F^2, by a brute-force
    // eigen-decomposition of D^T D (power iteration with deflation).
    let dv: Vec<Vec<f64>> = d
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect();
    let mut g = vec![vec![0f64; 64]; 64];
    for i in 0..64 {
        for j in 0..64 {
            g[i][j] = (0..64).map(|k| dv[k][i] * dv[k][j]).sum();
        }
    }
    let total: f64 = (0..64).map(|i| g[i][i]).sum();
    let mut top = 0f64;
    for _ in 0..4 {
        let mut v = vec![1f64; 64];
        let mut lambda = 0f64;
        for _ in 0..3000 {
            let w: Vec<f64> = (0..64)
                .map(|i| (0..64).map(|j| g[i][j] * v[j]).sum())
                .collect();
            let n = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            lambda = n;
            v = w.into_iter().map(|x| x / n).collect();
        }
        top += lambda;
        for i in 0..64 {
            for j in 0..64 {
                g[i][j] -= lambda * v[i] * v[j];
            }
        }
    }
    assert!(
        (row.energy_captured - top / total).abs() < 1e-6,
        "{} vs {}",
        row.energy_captured,
        top / total
    );
    assert!(
        row.energy_captured < 0.5,
        "a full-rank update keeps little at rank 4"
    );
    assert_eq!(row.method, SvdMethod::Exact);
    assert!((row.delta_norm - total.sqrt()).abs() < 1e-6 * total.sqrt());
    // The norm is not a LoRA target: listed, with its relative change.
    assert_eq!(report.not_captured.len(), 1);
    assert_eq!(report.not_captured[0].name, "model.norm.weight");
    let base_norm = load_safetensors(
        &base.join("model.safetensors"),
        &Device::Cpu,
        realign::model::StorageDtype::F32,
    )
    .unwrap()["model.norm.weight"]
        .clone();
    let rel = f64::from(
        norm.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
    .sqrt()
        / f64::from(
            base_norm
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
        .sqrt();
    assert!((report.not_captured[0].relative_update - rel).abs() < 1e-5 * rel);
}

#[test]
fn mismatched_checkpoints_and_rank_0_are_refused_with_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-llama");
    let other = tmp.path().join("other");
    copy_dir(&base, &other);
    let mut t = load_safetensors(
        &other.join("model.safetensors"),
        &Device::Cpu,
        realign::model::StorageDtype::F32,
    )
    .unwrap();
    t.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        noise(160, 32, 1, 0.1),
    );
    let mut named: Vec<(String, Tensor)> = t.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(
        other.join("model.safetensors"),
        safetensors_f32_bytes(&named).unwrap(),
    )
    .unwrap();
    let err = extract(&base, &other, &ExtractConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.0.mlp.up_proj.weight"), "{err}");
    assert!(
        err.contains("[160, 32]") && err.contains("[160, 64]"),
        "{err}"
    );
    let cfg = ExtractConfig {
        rank: 0,
        ..ExtractConfig::default()
    };
    let err = extract(&base, &base, &cfg).unwrap_err().to_string();
    assert!(err.contains("rank 0"), "{err}");
    // A rank of 2^64 - 1 panicked on capacity overflow when the factors were padded to it.
    let cfg = ExtractConfig {
        rank: usize::MAX,
        ..ExtractConfig::default()
    };
    let err = extract(&base, &base, &cfg).unwrap_err().to_string();
    assert!(
        err.contains(&format!("rank {}: at most 65536", usize::MAX)),
        "{err}"
    );
    let cfg = ExtractConfig {
        targets: vec!["nothing_proj".into()],
        ..ExtractConfig::default()
    };
    let err = extract(&base, &base, &cfg).unwrap_err().to_string();
    assert!(err.contains("nothing_proj"), "{err}");
}

fn realign(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_realign"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "realign {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_repair_made_on_the_extracted_adapter_goes_back_onto_the_full_model() {
    let tmp = tempfile::tempdir().unwrap();
    let ft = tmp.path().join("ft");
    let deltas = low_rank_deltas();
    fine_tune(&ft, &deltas);
    let base = fixtures().join("tiny-llama");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let extracted = tmp.path().join("extracted");
    realign(&[
        "extract",
        "--base",
        &s(&base),
        "--finetuned",
        &s(&ft),
        "--rank",
        "2",
        "-o",
        &s(&extracted),
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(extracted.join("extract_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["num_modules"], 21);
    let adapter = Adapter::load(&extracted, &Device::Cpu).unwrap();
    assert_eq!(adapter.config.r, 2);
    assert_eq!(adapter.config.lora_alpha, 2.0);

    // A "repair": layer 0's q_proj update taken out (as a repair that reverts one module would).
    let mut repaired = adapter.clone();
    let q0 = repaired
        .modules
        .get_mut("model.layers.0.self_attn.q_proj")
        .unwrap();
    q0.b = q0.b.zeros_like().unwrap();
    let repaired_dir = tmp.path().join("repaired");
    repaired.save(&repaired_dir).unwrap();

    // W = W_t + dW_repaired - dW_extracted, written as a full model folder.
    let merged = tmp.path().join("merged");
    realign(&[
        "merge",
        "--model",
        &s(&ft),
        "--adapter",
        &s(&repaired_dir),
        "--subtract",
        &s(&extracted),
        "-o",
        &s(&merged),
    ]);
    assert!(merged.join("merge_report.json").is_file());
    let back = LoadedModel::load(&merged, &LoadOptions::default()).unwrap();
    // Expected: the base model with the repaired adapter.
    let mut expected = LoadedModel::load(&base, &LoadOptions::default()).unwrap();
    expected
        .model
        .apply_adapter(&repaired, AdapterMode::Unmerged)
        .unwrap();
    let ids = prompt_ids();
    let diff = max_abs_diff(
        &back.model.forward(&ids).unwrap(),
        &expected.model.forward(&ids).unwrap(),
    );
    assert!(diff < 1e-4, "logits differ by {diff}");
    // Layer 0's q_proj is the base weight again; layer 1's keeps its update.
    let weights = load_safetensors(
        &merged.join("model.safetensors"),
        &Device::Cpu,
        realign::model::StorageDtype::F32,
    )
    .unwrap();
    let base_w = load_safetensors(
        &base.join("model.safetensors"),
        &Device::Cpu,
        realign::model::StorageDtype::F32,
    )
    .unwrap();
    let key0 = "model.layers.0.self_attn.q_proj.weight";
    assert!(max_abs_diff(&weights[key0], &base_w[key0]) < 1e-6);
    let key1 = "model.layers.1.self_attn.q_proj.weight";
    let kept = (&weights[key1] - &base_w[key1]).unwrap();
    assert!(max_abs_diff(&kept, &deltas[key1]) < 1e-5);

    // An existing output is refused without --overwrite and left as it was.
    let again = Command::new(env!("CARGO_BIN_EXE_realign"))
        .args([
            "merge",
            "--model",
            &s(&ft),
            "--adapter",
            &s(&repaired_dir),
            "-o",
            &s(&merged),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    assert!(merged.join("merge_report.json").is_file());
}
