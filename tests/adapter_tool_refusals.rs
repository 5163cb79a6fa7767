//! Defects found by the fourth black-box fuzz round of the adapter tools (extract, identify,
//! patch, diagnose), each pinned by the exact error or the exact numbers.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{fixtures, realign};
use realign::nlsr::masks::{self, Masks, ModuleMask};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn llama() -> PathBuf {
    fixtures().join("tiny-llama")
}

fn adapter(which: &str) -> PathBuf {
    fixtures().join("tiny-llama-adapters").join(which)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `extract --targets embed_tokens` wrote the embedding as `lora_A`/`lora_B` of a linear layer:
/// peft loads that key layout into an Embedding LoRA with missing keys (a silent no-op) and
/// realign's own merge refused it. Only a decoder layer's linear modules can be extracted.
#[test]
fn extract_refuses_targets_that_are_not_linear_modules_of_a_decoder_layer() {
    let dir = tempfile::tempdir().unwrap();
    for (targets, tensor) in [
        ("embed_tokens,q_proj", "model.embed_tokens.weight"),
        ("lm_head", "lm_head.weight"),
    ] {
        let out = dir.path().join(targets);
        let o = realign(&[
            "extract",
            "--base",
            s(&llama()),
            "--finetuned",
            s(&llama()),
            "--targets",
            targets,
            "-o",
            s(&out),
        ]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(&format!(
                "tensor \"{tensor}\" matches the targets {:?} but is not a linear module of a \
                 decoder layer (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, \
                 self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)",
                targets.split(',').collect::<Vec<_>>()
            )),
            "{e}"
        );
        assert!(!out.exists(), "nothing is written on an error");
    }
    // the decoder's linear modules still extract: q_proj of the 3 layers
    let out = dir.path().join("q");
    let o = realign(&[
        "extract",
        "--base",
        s(&llama()),
        "--finetuned",
        s(&llama()),
        "--targets",
        "q_proj",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = realign::adapters::Adapter::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        a.modules.keys().collect::<Vec<_>>(),
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.2.self_attn.q_proj"
        ]
    );
}

/// `identify --sparsity 0.9999` kept round(0.0001 n) = 0 entries of every tensor and wrote
/// all-zero masks silently; `diagnose` then reported a drift of 0 ("clean") and `patch`
/// "repaired" modules without changing an entry.
#[test]
fn identify_refuses_a_sparsity_that_keeps_no_entry_and_counts_exactly_below_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let run = |sparsity: &str| {
        realign(&[
            "identify",
            "--model",
            s(&llama()),
            "--adapter",
            s(&adapter("aligned")),
            "--method",
            "random",
            "--sparsity",
            sparsity,
            "-o",
            s(&out),
        ])
    };
    let o = run("0.9999");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "invalid sparsity = 0.9999: keeps no entry of any tensor (the largest has 1280 \
             entries): the masks would select nothing; lower it"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists() && !out.with_extension("json").exists());

    // 0.999 keeps round(0.001 n) per tensor: 1 of 512 or 1280 entries, 0 of 256 (k/v lora_B
    // [32, 8]): 12 ones per layer, 36 in all.
    let o = run("0.999");
    assert!(o.status.success(), "{}", stderr(&o));
    let m = masks::load(&out, &Device::Cpu).unwrap();
    let ones: f64 = m
        .modules
        .values()
        .map(|mm| {
            let (da, db, _) = mm.density().unwrap();
            da * mm.a.elem_count() as f64 + db * mm.b.elem_count() as f64
        })
        .sum();
    assert_eq!(ones, 36.0);
}

fn zero_masks(path: &Path) {
    let a = realign::adapters::Adapter::load(&adapter("finetuned"), &Device::Cpu).unwrap();
    let ones = Masks::ones(&a).unwrap();
    let zeros = Masks {
        modules: ones
            .modules
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    ModuleMask {
                        a: m.a.zeros_like().unwrap(),
                        b: m.b.zeros_like().unwrap(),
                    },
                )
            })
            .collect(),
        source: None,
    };
    masks::save(&zeros, path).unwrap();
}

/// All-zero masks select no region: `diagnose` reported D = 0 and the verdict "clean", and
/// `patch` wrote an adapter equal to the fine-tuned one while saying it repaired modules.
#[test]
fn patch_and_diagnose_refuse_masks_that_select_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("zeros.safetensors");
    zero_masks(&m);
    let expected = format!(
        "{}: every mask is all zeros (26880 entries over 21 modules): no safety-critical neuron \
         is selected, so the safety regions are empty (make them with a lower `realign identify \
         --sparsity`)",
        m.display()
    );
    // `patch` names the aligned adapter --reference, `diagnose` --aligned
    for (command, aligned_flag, name) in [
        ("patch", "--reference", "patched"),
        ("diagnose", "--aligned", "diag"),
    ] {
        let out = dir.path().join(name);
        let o = realign(&[
            command,
            aligned_flag,
            s(&adapter("aligned")),
            "--finetuned",
            s(&adapter("finetuned")),
            "--masks",
            s(&m),
            "-o",
            s(&out),
        ]);
        assert_eq!(o.status.code(), Some(1), "{command}: {}", stderr(&o));
        assert!(stderr(&o).contains(&expected), "{command}: {}", stderr(&o));
        assert!(!out.exists(), "{command}");
    }

    // the library's patch refuses them the same way
    let e = realign::adapters::Adapter::load(&adapter("aligned"), &Device::Cpu).unwrap();
    let t = realign::adapters::Adapter::load(&adapter("finetuned"), &Device::Cpu).unwrap();
    let zeros = masks::load(&m, &Device::Cpu).unwrap();
    let err = realign::nlsr::patch::patch(&e, &t, &zeros, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, expected);
}

/// `diagnose --probe-harmful MISSING` (or --probe-benign, --probe-max-new-tokens) without
/// `--probe` was accepted and ignored: the flag did nothing and the missing file went unnoticed.
#[test]
fn diagnose_probe_flags_need_probe() {
    for flags in [
        ["--probe-harmful", "/nonexistent/harmful.jsonl"],
        ["--probe-benign", "embedded:overrefusal_val"],
        ["--probe-max-new-tokens", "3"],
    ] {
        let (a, t) = (adapter("aligned"), adapter("finetuned"));
        let mut args = vec!["diagnose", "--aligned", s(&a), "--finetuned", s(&t)];
        args.extend(flags);
        let o = realign(&args);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert!(
            stderr(&o)
                .contains("the following required arguments were not provided:\n  --probe <N>"),
            "{flags:?}: {}",
            stderr(&o)
        );
    }
}

/// `identify` took `--seed` without `--method random`, `--rank-fraction` without
/// `--method low-rank`, and `--data` / `--max-samples` with `--method random`, and ignored
/// them; the masks did not depend on them. Each is now refused, naming the method that uses it;
/// the flags a method uses still change its masks.
#[test]
fn identify_refuses_flags_its_method_ignores() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let (model, a) = (llama(), adapter("aligned"));
    let run = |extra: &[&str]| {
        let mut args = vec!["identify", "--model", s(&model), "--adapter", s(&a)];
        args.extend(extra);
        args.extend(["--overwrite", "-o", s(&out)]);
        realign(&args)
    };
    for (extra, expected) in [
        (
            &["--method", "wanda", "--max-samples", "2", "--seed", "3"][..],
            "--seed is not used by --method wanda (only by --method random)",
        ),
        (
            &[
                "--method",
                "snip",
                "--max-samples",
                "2",
                "--rank-fraction",
                "0.5",
            ][..],
            "--rank-fraction is not used by --method snip (only by --method low-rank)",
        ),
        (
            &["--method", "random", "--data", "embedded:safety_sft"][..],
            "--data is not used by --method random (only by the methods that read a corpus)",
        ),
        (
            &["--method", "random", "--max-samples", "2"][..],
            "--max-samples is not used by --method random (only by the methods that read a \
             corpus)",
        ),
    ] {
        let o = run(extra);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{extra:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // the seed of random and the rank fraction of low-rank are used: other masks
    let masks_of = |extra: &[&str]| {
        let o = run(extra);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        let m = masks::load(&out, &Device::Cpu).unwrap();
        m.modules
            .values()
            .flat_map(|mm| {
                let a = mm.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = mm.b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                a.into_iter().chain(b)
            })
            .collect::<Vec<f32>>()
    };
    let r42 = masks_of(&["--method", "random"]);
    assert_eq!(r42, masks_of(&["--method", "random", "--seed", "42"]));
    assert_ne!(r42, masks_of(&["--method", "random", "--seed", "3"]));
    let lr = masks_of(&["--max-samples", "2"]);
    assert_eq!(
        lr,
        masks_of(&["--max-samples", "2", "--rank-fraction", "0.8"])
    );
    assert_ne!(
        lr,
        masks_of(&["--max-samples", "2", "--rank-fraction", "0.2"])
    );
}

/// Adapters on different module sets: the error listed at most 5 modules of each side and did
/// not say that more differed (an adapter on q,v,down of 3 layers against one on all 7 kinds
/// listed 5 of the 12 missing modules). It now gives each count and says when the lists are cut.
#[test]
fn different_module_sets_are_counted_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = realign::adapters::Adapter::load(&adapter("finetuned"), &Device::Cpu).unwrap();
    let mut sub = full.clone();
    sub.modules
        .retain(|k, _| k.ends_with("q_proj") || k.ends_with("v_proj") || k.ends_with("down_proj"));
    assert_eq!(sub.modules.len(), 9);
    let subdir = dir.path().join("sub");
    sub.config.target_modules = realign::adapters::TargetModules::List(vec![
        "q_proj".into(),
        "v_proj".into(),
        "down_proj".into(),
    ]);
    sub.save(&subdir).unwrap();
    let out = dir.path().join("out");
    let o = realign(&[
        "resta",
        "--aligned",
        s(&adapter("aligned")),
        "--finetuned",
        s(&subdir),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{} and {} adapt different modules: only in the first (12): [\"model.layers.0.mlp.gate_proj\", \
             \"model.layers.0.mlp.up_proj\", \"model.layers.0.self_attn.k_proj\", \
             \"model.layers.0.self_attn.o_proj\", \"model.layers.1.mlp.gate_proj\"]; only in the \
             second (0): [] (the first 5 of each listed)",
            adapter("aligned").display(),
            subdir.display()
        )),
        "{e}"
    );
    assert!(!out.exists());
}

/// `safelora --num-layers 0` projected nothing and wrote the fine-tuned adapter unchanged as
/// if it were a repair; it is refused as `--num-layers 22` (more than the 21 modules) is.
#[test]
fn safelora_refuses_num_layers_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (k, expected) in [
        (
            "0",
            "invalid num-layers = 0: projects no module: the output would be the fine-tuned \
             adapter itself; give at least 1",
        ),
        (
            "22",
            "invalid num-layers = 22: the adapter has only 21 modules",
        ),
    ] {
        let o = realign(&[
            "safelora",
            "--aligned",
            s(&adapter("aligned")),
            "--finetuned",
            s(&adapter("finetuned")),
            "--num-layers",
            k,
            "-o",
            s(&out),
        ]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{}", stderr(&o));
        assert!(!out.exists());
    }
    // K = 1 projects exactly the module of lowest cosine
    let o = realign(&[
        "safelora",
        "--aligned",
        s(&adapter("aligned")),
        "--finetuned",
        s(&adapter("finetuned")),
        "--num-layers",
        "1",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("safelora_report.json")).unwrap()).unwrap();
    let rows = report["modules"].as_array().unwrap();
    let min = rows
        .iter()
        .map(|r| r["cosine"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let projected: Vec<f64> = rows
        .iter()
        .filter(|r| r["projected"].as_bool().unwrap())
        .map(|r| r["cosine"].as_f64().unwrap())
        .collect();
    assert_eq!(projected, [min]);
}
