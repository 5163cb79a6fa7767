//! `realign safemerge` and `realign antidote` on the tiny fixture model and adapters: the
//! written PEFT adapters hold the dense updates the methods define, module by module.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff};
use realign::adapters::{lora_delta, Adapter};

fn run(args: &[&str], paths: &[(&str, std::path::PathBuf)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_realign"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.env_remove("RUST_BACKTRACE").output().unwrap()
}

fn deltas(a: &Adapter) -> BTreeMap<String, Tensor> {
    a.modules
        .iter()
        .map(|(k, m)| (k.clone(), lora_delta(m).unwrap()))
        .collect()
}

fn json(p: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn safemerge_merges_exactly_the_modules_below_the_threshold() {
    let fx = fixtures().join("tiny-llama-adapters");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("merged");
    // τ = 1 merges every module (every cosine is below 1 here): α W_t + (1 − α) W_a.
    let o = run(
        &["safemerge", "--threshold", "1", "--alpha", "0.25"],
        &[
            ("--aligned", fx.join("aligned")),
            ("--finetuned", fx.join("finetuned")),
            ("-o", out.clone()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dev = Device::Cpu;
    let wa = deltas(&Adapter::load(&fx.join("aligned"), &dev).unwrap());
    let wt = deltas(&Adapter::load(&fx.join("finetuned"), &dev).unwrap());
    let merged = deltas(&Adapter::load(&out, &dev).unwrap());
    let report = json(out.join("safemerge_report.json"));
    assert_eq!(report["num_merged"], merged.len());
    for (path, m) in &merged {
        let want = ((&wt[path] * 0.25).unwrap() + (&wa[path] * 0.75).unwrap()).unwrap();
        let diff = max_abs_diff(m, &want);
        assert!(diff <= 1e-5, "{path}: {diff}");
    }
    // τ = -1 merges none (no cosine is below -1): the output is W_t.
    let none = d.path().join("none");
    let o = run(
        &["safemerge", "--threshold", "-1"],
        &[
            ("--aligned", fx.join("aligned")),
            ("--finetuned", fx.join("finetuned")),
            ("-o", none.clone()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(none.join("safemerge_report.json"))["num_merged"], 0);
    for (path, m) in deltas(&Adapter::load(&none, &dev).unwrap()) {
        assert!(max_abs_diff(&m, &wt[&path]) <= 1e-5, "{path}");
    }
}

#[test]
fn antidote_prunes_a_fraction_of_the_update_and_keeps_the_alignment() {
    let fx = fixtures();
    let ad = fx.join("tiny-llama-adapters");
    let d = tempfile::tempdir().unwrap();
    let run_density = |density: &str, name: &str| {
        let out = d.path().join(name);
        let o = run(
            &[
                "antidote",
                "--density",
                density,
                "--max-samples",
                "3",
                "--max-length",
                "64",
            ],
            &[
                ("--model", fx.join("tiny-llama")),
                ("--aligned", ad.join("aligned")),
                ("--finetuned", ad.join("finetuned")),
                ("-o", out.clone()),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        // the two ends are controls, and say so
        let warned = match density {
            "0" => Some("warning: --density 0 prunes nothing"),
            "1" => Some("warning: --density 1 prunes every entry of the fine-tuning update"),
            _ => None,
        };
        match warned {
            Some(w) => assert!(err.contains(w), "{density}: {err}"),
            None => assert!(!err.contains("warning"), "{density}: {err}"),
        }
        out
    };
    let dev = Device::Cpu;
    let wa = deltas(&Adapter::load(&ad.join("aligned"), &dev).unwrap());
    let wt = deltas(&Adapter::load(&ad.join("finetuned"), &dev).unwrap());
    // density 0: nothing pruned, the output is W_t (= W_a + the whole update)
    let keep = deltas(&Adapter::load(&run_density("0", "keep"), &dev).unwrap());
    for (path, m) in &keep {
        assert!(max_abs_diff(m, &wt[path]) <= 1e-5, "{path}");
    }
    // density 1: every entry pruned, the output is W_a
    let all = deltas(&Adapter::load(&run_density("1", "all"), &dev).unwrap());
    for (path, m) in &all {
        assert!(max_abs_diff(m, &wa[path]) <= 1e-5, "{path}");
    }
    // density 0.25: a quarter of each update's entries is set back to W_a, the rest is W_t
    let out = run_density("0.25", "quarter");
    let part = deltas(&Adapter::load(&out, &dev).unwrap());
    let report = json(out.join("antidote_report.json"));
    assert_eq!(report["samples"], 3);
    for (path, m) in &part {
        let (m, a, t) = (
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wa[path].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wt[path].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let back = m
            .iter()
            .zip(&a)
            .zip(&t)
            .filter(|((m, a), t)| (*m - *a).abs() <= 1e-6 && (*t - *a).abs() > 1e-6)
            .count();
        let kept = m
            .iter()
            .zip(&t)
            .filter(|(m, t)| (*m - *t).abs() <= 1e-6)
            .count();
        let changed = a
            .iter()
            .zip(&t)
            .filter(|(a, t)| (*t - *a).abs() > 1e-6)
            .count();
        assert_eq!(
            back + kept,
            m.len(),
            "{path}: every entry is W_a's or W_t's"
        );
        let want = (0.25 * m.len() as f64).round() as usize;
        // entries whose update is 0 are indistinguishable; the pruned ones with a non-zero
        // update are exactly `back`
        assert!(
            back <= want && back + (m.len() - changed) >= want,
            "{path}: {back} vs {want}"
        );
    }
}
