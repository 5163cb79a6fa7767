//! NLSR (amplify, similarity, layer pruning, transplant, `realign patch`) and Safe LoRA on the
//! tiny-llama fixture adapters (21 modules, r 8), each against a known answer.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff};
use realign::adapters::{lora_delta, Adapter, LoraModule};
use realign::nlsr::masks::{self, Masks, ModuleMask};
use realign::nlsr::patch::{patch, write_patch, PatchConfig};
use realign::nlsr::prune::{PruneConfig, Selection};
use realign::nlsr::similarity::region_similarity;
use realign::nlsr::transplant::TransplantMode;
use realign::safelora::{alignment_from_adapter, safe_lora, SafeLoraSelection};

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("tiny-llama-adapters").join(name)
}

fn load(name: &str) -> Adapter {
    Adapter::load(&adapter_dir(name), &Device::Cpu).unwrap()
}

fn realign_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_realign"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let out = realign_cmd(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic masks with about a third of the entries set (a hash of module, part, index).
fn patterned_masks(adapter: &Adapter) -> Masks {
    let mut modules = BTreeMap::new();
    for (i, (path, m)) in adapter.modules.iter().enumerate() {
        let make = |t: &Tensor, salt: usize| {
            let n = t.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|j| (((j * 7 + i * 13 + salt) % 3) == 0) as u8 as f32)
                .collect();
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
        };
        modules.insert(
            path.clone(),
            ModuleMask {
                a: make(&m.a, 1),
                b: make(&m.b, 2),
            },
        );
    }
    Masks {
        modules,
        source: None,
    }
}

fn assert_same_tensor(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    let x = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
        "{what}: not bit-identical"
    );
}

#[test]
fn identical_reference_and_finetuned_give_similarity_one_and_the_input_back() {
    let t = load("finetuned");
    let m = patterned_masks(&t);
    let out = patch(&t, &t, &m, &PatchConfig::default()).unwrap();
    assert_eq!(out.report.num_modules, 21);
    // the adaptive draws repair some modules; with W_e = W_t that must change nothing
    assert!(out.report.num_patched > 0);
    for r in &out.report.modules {
        assert!(
            (r.similarity - 1.0).abs() < 1e-9,
            "{}: {}",
            r.module,
            r.similarity
        );
    }
    for (path, m) in &t.modules {
        let o = &out.adapter.modules[path];
        assert_same_tensor(&o.a, &m.a, path);
        assert_same_tensor(&o.b, &m.b, path);
        assert_eq!(o.scale, m.scale);
    }
}

#[test]
fn all_ones_masks_with_every_module_patched_give_the_reference() {
    let (e, t) = (load("aligned"), load("finetuned"));
    let ones = Masks::ones(&t).unwrap();
    let cfg = PatchConfig {
        prune: PruneConfig {
            selection: Selection::TopK(21),
            ..Default::default()
        },
        transplant: TransplantMode::Replace,
    };
    let out = patch(&e, &t, &ones, &cfg).unwrap();
    assert_eq!(out.report.num_patched, 21);
    for (path, m) in &e.modules {
        let o = &out.adapter.modules[path];
        assert_same_tensor(&o.a, &m.a, path);
        assert_same_tensor(&o.b, &m.b, path);
    }
}

#[test]
fn similarity_through_rank_products_equals_the_dense_formula_on_the_fixtures() {
    let (e, t) = (load("aligned"), load("finetuned"));
    let m = patterned_masks(&t);
    for (path, te) in &e.modules {
        let (tt, k) = (&t.modules[path], &m.modules[path]);
        let s = region_similarity(te, tt, Some(k)).unwrap();
        let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let we = f(&te
            .b
            .mul(&k.b)
            .unwrap()
            .matmul(&te.a.mul(&k.a).unwrap())
            .unwrap());
        let wt = f(&tt
            .b
            .mul(&k.b)
            .unwrap()
            .matmul(&tt.a.mul(&k.a).unwrap())
            .unwrap());
        let dot = |x: &Tensor, y: &Tensor| {
            (x * y)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let dense = dot(&we, &wt) / (dot(&we, &we).sqrt() * dot(&wt, &wt).sqrt());
        assert!((s - dense).abs() < 1e-5, "{path}: {s} vs {dense}");
        assert!(s < 1.0 - 1e-6, "{path}: fine-tuning changed nothing?");
    }
}

#[test]
fn exact_transplant_reloads_with_the_delta_of_eq_11() {
    let (e, t) = (load("aligned"), load("finetuned"));
    let m = patterned_masks(&t);
    let cfg = PatchConfig {
        prune: PruneConfig {
            selection: Selection::TopK(10),
            ..Default::default()
        },
        transplant: TransplantMode::Exact,
    };
    let out = patch(&e, &t, &m, &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_patch(dir.path(), &out).unwrap();
    let back = Adapter::load(dir.path(), &Device::Cpu).unwrap();
    let mut repaired = 0;
    for r in &out.report.modules {
        let (te, tt, k) = (
            &e.modules[&r.module],
            &t.modules[&r.module],
            &m.modules[&r.module],
        );
        let got = lora_delta(&back.modules[&r.module]).unwrap();
        let want = if r.patched {
            repaired += 1;
            assert_eq!(back.modules[&r.module].rank(), 16);
            let inv = |x: &Tensor| (x.ones_like().unwrap() - x).unwrap();
            let safe =
                te.b.mul(&k.b)
                    .unwrap()
                    .matmul(&te.a.mul(&k.a).unwrap())
                    .unwrap();
            let rest =
                tt.b.mul(&inv(&k.b))
                    .unwrap()
                    .matmul(&tt.a.mul(&inv(&k.a)).unwrap())
                    .unwrap();
            ((safe + rest).unwrap() * tt.scale).unwrap()
        } else {
            assert_eq!(back.modules[&r.module].rank(), 8);
            lora_delta(tt).unwrap()
        };
        assert!(
            max_abs_diff(&got, &want) < 1e-6,
            "{}: {}",
            r.module,
            max_abs_diff(&got, &want)
        );
        // the scale stays alpha / r = 16 / 8
        assert_eq!(back.modules[&r.module].scale, 2.0);
    }
    assert_eq!(repaired, 10);
}

#[test]
fn patch_cli_is_byte_reproducible_with_a_seed_and_writes_its_reports() {
    let t = load("finetuned");
    let dir = tempfile::tempdir().unwrap();
    let mpath = dir.path().join("masks.safetensors");
    masks::save(&patterned_masks(&t), &mpath).unwrap();
    let run = |out: &Path, seed: &str| {
        ok(&[
            "patch",
            "--reference",
            adapter_dir("aligned").to_str().unwrap(),
            "--finetuned",
            adapter_dir("finetuned").to_str().unwrap(),
            "--masks",
            mpath.to_str().unwrap(),
            "--seed",
            seed,
            "-o",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    let (o1, o2, o3) = (
        dir.path().join("o1"),
        dir.path().join("o2"),
        dir.path().join("o3"),
    );
    assert_eq!(run(&o1, "42"), run(&o2, "42"));
    assert_eq!(
        std::fs::read(o1.join("patch_report.json")).unwrap(),
        std::fs::read(o2.join("patch_report.json")).unwrap()
    );
    run(&o3, "7");
    let report = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p.join("patch_report.json")).unwrap()).unwrap()
    };
    let (r1, r3) = (report(&o1), report(&o3));
    assert_ne!(r1["modules"], r3["modules"], "another seed, other draws");
    assert_eq!(r1["modules"].as_array().unwrap().len(), 21);
    assert!(r1["direction"].as_str().unwrap().contains("less similar"));
    let md = std::fs::read_to_string(o1.join("patch_report.md")).unwrap();
    assert!(md.contains("model.layers.0.self_attn.q_proj"), "{md}");
    let svg = std::fs::read_to_string(o1.join("similarity.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("circle"), "{svg}");
    let png = std::fs::read(o1.join("similarity.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    Adapter::load(&o1, &Device::Cpu).unwrap();
}

#[test]
fn patch_refuses_masks_made_for_another_adapter() {
    let t = load("finetuned");
    let dir = tempfile::tempdir().unwrap();
    let q = "model.layers.0.self_attn.q_proj";
    // masks of a rank-4 adapter for one module, and masks lacking a module
    let mut rank4 = Masks::ones(&t).unwrap();
    let m = rank4.modules.get_mut(q).unwrap();
    m.a = m.a.narrow(0, 0, 4).unwrap();
    m.b = m.b.narrow(1, 0, 4).unwrap();
    let mut missing = Masks::ones(&t).unwrap();
    missing.modules.remove(q);
    for (name, mk, needle) in [
        ("rank4.safetensors", rank4, "[4, 64]"),
        ("missing.safetensors", missing, q),
    ] {
        let mpath = dir.path().join(name);
        masks::save(&mk, &mpath).unwrap();
        let out = realign_cmd(&[
            "patch",
            "--reference",
            adapter_dir("aligned").to_str().unwrap(),
            "--finetuned",
            adapter_dir("finetuned").to_str().unwrap(),
            "--masks",
            mpath.to_str().unwrap(),
            "-o",
            dir.path().join("out").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(name) && err.contains(needle) && !err.contains("panicked"),
            "{err}"
        );
        assert!(!dir.path().join("out").exists());
    }
}

#[test]
fn amplify_cli_extrapolates_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("we");
    // W_0 is played by the fine-tuned fixture (same modules and ranks)
    ok(&[
        "amplify",
        "--aligned",
        adapter_dir("aligned").to_str().unwrap(),
        "--weak",
        adapter_dir("finetuned").to_str().unwrap(),
        "--beta",
        "0.9",
        "-o",
        out.to_str().unwrap(),
    ]);
    let (wa, w0) = (load("aligned"), load("finetuned"));
    let we = Adapter::load(&out, &Device::Cpu).unwrap();
    assert_eq!(we.config, wa.config);
    let comb = |a: &LoraModule, b: &LoraModule, pick: fn(&LoraModule) -> &Tensor| {
        ((pick(a) * 1.9).unwrap() - (pick(b) * 0.9).unwrap()).unwrap()
    };
    for (path, m) in &we.modules {
        let (a, b) = (&wa.modules[path], &w0.modules[path]);
        assert!(max_abs_diff(&m.a, &comb(a, b, |m| &m.a)) < 1e-6, "{path}");
        assert!(max_abs_diff(&m.b, &comb(a, b, |m| &m.b)) < 1e-6, "{path}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("amplify_report.json")).unwrap()).unwrap();
    assert_eq!(report["coefficient_aligned"], serde_json::json!(1.9));
    assert_eq!(report["modules"].as_array().unwrap().len(), 21);

    // mismatched inputs: a weak adapter lacking one module
    let mut short = load("finetuned");
    short.modules.remove("model.layers.1.mlp.up_proj");
    let short_dir = dir.path().join("short-weak");
    short.save(&short_dir).unwrap();
    let bad = realign_cmd(&[
        "amplify",
        "--aligned",
        adapter_dir("aligned").to_str().unwrap(),
        "--weak",
        short_dir.to_str().unwrap(),
        "-o",
        dir.path().join("bad").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(
        err.contains("short-weak") && err.contains("model.layers.1.mlp.up_proj"),
        "{err}"
    );
}

#[test]
fn safe_lora_equals_the_dense_projection() {
    let (a, t) = (load("aligned"), load("finetuned"));
    let v = alignment_from_adapter(&a);
    let (out, report) = safe_lora(&v, &t, SafeLoraSelection::NumLayers(21)).unwrap();
    assert_eq!(report.num_projected, 21);
    for r in &report.modules {
        let (am, tm) = (&a.modules[&r.module], &t.modules[&r.module]);
        let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let vd = f(&lora_delta(am).unwrap());
        let norm = vd
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        let c = (vd.matmul(&vd.t().unwrap()).unwrap() / norm).unwrap(); // [out, out]
        let cb = c.matmul(&f(&tm.b)).unwrap().to_dtype(DType::F32).unwrap();
        let got = &out.modules[&r.module].b;
        let scale = cb
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            max_abs_diff(got, &cb) <= 1e-5 * scale.max(1e-3),
            "{}: {}",
            r.module,
            max_abs_diff(got, &cb)
        );
        // cos(C ΔW, ΔW) densely
        let dw = f(&lora_delta(tm).unwrap());
        let cdw = c.matmul(&dw).unwrap();
        let dot = |x: &Tensor, y: &Tensor| {
            (x * y)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let cos = dot(&cdw, &dw) / (dot(&cdw, &cdw).sqrt() * dot(&dw, &dw).sqrt());
        assert!(
            (r.cosine - cos).abs() < 1e-6,
            "{}: {} vs {cos}",
            r.module,
            r.cosine
        );
    }
    // a threshold below every cosine projects nothing and returns W_t unchanged
    let (same, rep) = safe_lora(&v, &t, SafeLoraSelection::Threshold(-2.0)).unwrap();
    assert_eq!(rep.num_projected, 0);
    for (path, m) in &t.modules {
        assert_eq!(max_abs_diff(&same.modules[path].b, &m.b), 0.0);
    }
}

/// The realigned adapter written to disk and loaded again gives the model the same logits as
/// the adapter patching produced in memory, for both transplant forms (the exact one through
/// `rank_pattern` / `alpha_pattern`).
#[test]
fn written_adapter_reloads_with_the_logits_of_the_in_memory_patch() {
    use realign::model::{AdapterMode, LoadOptions, LoadedModel};
    let reference = load("aligned");
    let finetuned = load("finetuned");
    let masks = patterned_masks(&reference);
    let ids = Tensor::new(
        &[[0u32, 38, 565, 569, 269, 580, 572, 269, 350, 17]],
        &Device::Cpu,
    )
    .unwrap();
    let logits = |adapter: &Adapter| {
        let mut m =
            LoadedModel::load(&fixtures().join("tiny-llama"), &LoadOptions::default()).unwrap();
        m.model
            .apply_adapter(adapter, AdapterMode::Unmerged)
            .unwrap();
        m.model.forward(&ids).unwrap()
    };
    for transplant in [TransplantMode::Replace, TransplantMode::Exact] {
        let cfg = PatchConfig {
            transplant,
            ..PatchConfig::default()
        };
        let outcome = patch(&reference, &finetuned, &masks, &cfg).unwrap();
        assert!(
            outcome.report.modules.iter().any(|m| m.patched),
            "{transplant:?}: nothing patched"
        );
        let dir = tempfile::tempdir().unwrap();
        write_patch(dir.path(), &outcome).unwrap();
        let reloaded = Adapter::load(dir.path(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&logits(&outcome.adapter), &logits(&reloaded));
        assert_eq!(d, 0.0, "{transplant:?}: reloaded logits differ by {d}");
        // And the repair changed the model: the patched adapter is not the fine-tuned one.
        assert!(
            max_abs_diff(&logits(&outcome.adapter), &logits(&finetuned)) > 1e-4,
            "{transplant:?}"
        );
    }
}

/// Safe LoRA with the alignment given as two full models (`--base` and `--aligned-model`):
/// the aligned model is the base with the aligned adapter merged and written as a Hugging Face
/// folder, so `V = W_aligned - W_base` is the dense form of `(alpha/r) B_a A_a` and the
/// projections and cosines equal those of the adapter form (up to the f32 rounding of the
/// merged weights).
#[test]
fn safe_lora_from_full_models_equals_the_adapter_form() {
    use realign::model::{export_hf, AdapterMode, LoadOptions, LoadedModel};
    let base_dir = fixtures().join("tiny-llama");
    let (a, t) = (load("aligned"), load("finetuned"));
    let mut aligned = LoadedModel::load(&base_dir, &LoadOptions::default()).unwrap();
    aligned
        .model
        .apply_adapter(&a, AdapterMode::Merged)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let aligned_dir = dir.path().join("aligned-model");
    export_hf(&aligned.model, &aligned.tokenizer, &aligned_dir).unwrap();

    let dense = realign::safelora::alignment_from_models(&base_dir, &aligned_dir, &t, &Device::Cpu)
        .unwrap();
    let low_rank = alignment_from_adapter(&a);
    let sel = SafeLoraSelection::NumLayers(10);
    let (out_d, rep_d) = safe_lora(&dense, &t, sel).unwrap();
    let (out_l, rep_l) = safe_lora(&low_rank, &t, sel).unwrap();
    assert_eq!(rep_d.num_projected, 10);
    for (d, l) in rep_d.modules.iter().zip(&rep_l.modules) {
        assert_eq!(d.module, l.module);
        assert!(
            (d.cosine - l.cosine).abs() < 1e-4,
            "{}: {} vs {}",
            d.module,
            d.cosine,
            l.cosine
        );
        assert_eq!(d.projected, l.projected, "{}", d.module);
    }
    for (path, m) in &out_l.modules {
        let scale =
            m.b.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        let diff = max_abs_diff(&out_d.modules[path].b, &m.b);
        assert!(diff <= 1e-3 * scale.max(1e-3), "{path}: {diff}");
    }
    // The CLI takes the same two folders.
    let out_dir = dir.path().join("safelora");
    ok(&[
        "safelora",
        "--base",
        base_dir.to_str().unwrap(),
        "--aligned-model",
        aligned_dir.to_str().unwrap(),
        "--finetuned",
        adapter_dir("finetuned").to_str().unwrap(),
        "--num-layers",
        "10",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    let written = Adapter::load(&out_dir, &Device::Cpu).unwrap();
    for (path, m) in &out_d.modules {
        assert_eq!(max_abs_diff(&written.modules[path].b, &m.b), 0.0, "{path}");
    }
}

/// `realign safelora --update-from W_a` projects the fine-tuning update `W_t − W_a`: with a
/// threshold no cosine is below (-2), nothing is projected and `W_a` + the written update has
/// the logits of `W_t`; with 2, everything is projected and the written adapter is the
/// library's projection of `finetuning_update`, bit for bit.
#[test]
fn safe_lora_cli_projects_the_finetuning_update() {
    use realign::model::{AdapterMode, LoadOptions, LoadedModel};
    use realign::safelora::finetuning_update;
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3]], &Device::Cpu).unwrap();
    let logits = |adapters: &[&Adapter]| {
        let mut m =
            LoadedModel::load(&fixtures().join("tiny-llama"), &LoadOptions::default()).unwrap();
        for a in adapters {
            m.model.apply_adapter(a, AdapterMode::Merged).unwrap();
        }
        m.model.forward(&ids).unwrap()
    };
    let (a, t) = (load("aligned"), load("finetuned"));
    let dir = tempfile::tempdir().unwrap();
    let run = |tau: &str, out: &Path| {
        ok(&[
            "safelora",
            "--aligned",
            adapter_dir("aligned").to_str().unwrap(),
            "--finetuned",
            adapter_dir("finetuned").to_str().unwrap(),
            "--update-from",
            adapter_dir("aligned").to_str().unwrap(),
            "--threshold",
            tau,
            "-o",
            out.to_str().unwrap(),
        ]);
        Adapter::load(out, &Device::Cpu).unwrap()
    };
    let none = run("-2", &dir.path().join("none"));
    let d = max_abs_diff(&logits(&[&a, &none]), &logits(&[&t]));
    assert!(d < 1e-4, "W_a + (W_t - W_a) differs from W_t by {d}");
    let all = run("2", &dir.path().join("all"));
    let update = finetuning_update(&a, &t).unwrap();
    assert_eq!(all.config.r, a.config.r + t.config.r);
    let (want, report) = safe_lora(
        &alignment_from_adapter(&a),
        &update,
        SafeLoraSelection::Threshold(2.0),
    )
    .unwrap();
    assert_eq!(report.num_projected, report.modules.len());
    for (path, m) in &want.modules {
        assert_eq!(max_abs_diff(&all.modules[path].b, &m.b), 0.0, "{path}");
        assert_eq!(max_abs_diff(&all.modules[path].a, &m.a), 0.0, "{path}");
    }
    // the projection moved the model away from W_t
    assert!(max_abs_diff(&logits(&[&a, &all]), &logits(&[&t])) > 1e-5);
}
