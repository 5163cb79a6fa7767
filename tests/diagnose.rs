//! `realign diagnose` end to end on the tiny fixture adapters: the CLI's report against the
//! library and against Eq. 8 / Safe LoRA computed directly, and the clean verdict of an
//! unchanged adapter.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use realign::adapters::Adapter;
use realign::diagnose::{diagnose, DiagnoseConfig, DriftVerdict};
use realign::nlsr::similarity::region_similarity;
use realign::safelora::{finetuning_update, project, projected_cosine, AlignmentUpdate};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-llama-adapters")
        .join(name)
}

fn run(aligned: &Path, finetuned: &Path, out: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_realign"))
        .args(["diagnose", "--aligned"])
        .arg(aligned)
        .arg("--finetuned")
        .arg(finetuned)
        .arg("-o")
        .arg(out)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn an_unchanged_adapter_is_clean() {
    let d = tempfile::tempdir().unwrap();
    let a = fixture("aligned");
    let j = run(&a, &a, &d.path().join("report"));
    assert_eq!(j["verdict"], "clean");
    assert!(j["drift"].as_f64().unwrap().abs() < 1e-6, "{}", j["drift"]);
    for m in j["modules"].as_array().unwrap() {
        assert_eq!(m["safelora_cosine"], 1.0);
        assert_eq!(m["update_norm"], 0.0);
    }
    for f in [
        "diagnose_report.json",
        "diagnose_report.md",
        "drift.svg",
        "drift.png",
    ] {
        assert!(d.path().join("report").join(f).is_file(), "{f}");
    }
}

#[test]
fn the_report_is_eq_8_and_safe_lora_per_module() {
    let d = tempfile::tempdir().unwrap();
    let (ap, tp) = (fixture("aligned"), fixture("finetuned"));
    let j = run(&ap, &tp, &d.path().join("report"));
    let dev = Device::Cpu;
    let (wa, wt) = (
        Adapter::load(&ap, &dev).unwrap(),
        Adapter::load(&tp, &dev).unwrap(),
    );
    let lib = diagnose(&wa, &wt, None, None, &DiagnoseConfig::default()).unwrap();
    let update = finetuning_update(&wa, &wt).unwrap();
    let modules = j["modules"].as_array().unwrap();
    assert_eq!(modules.len(), wa.modules.len());
    let mut drift_sum = 0.0;
    for (m, (path, t)) in modules.iter().zip(&wt.modules) {
        assert_eq!(m["module"], path.as_str());
        let s = m["similarity"].as_f64().unwrap();
        let want_s = region_similarity(&wa.modules[path], t, None).unwrap();
        assert!((s - want_s).abs() < 1e-6, "{path}: S {s} vs {want_s}");
        let u = &update.modules[path];
        let cb = project(&AlignmentUpdate::LowRank(wa.modules[path].clone()), &u.b).unwrap();
        let want_c = projected_cosine(&cb, u).unwrap();
        let c = m["safelora_cosine"].as_f64().unwrap();
        assert!((c - want_c).abs() < 1e-4, "{path}: c {c} vs {want_c}");
        drift_sum += 1.0 - s;
    }
    let drift = j["drift"].as_f64().unwrap();
    assert!((drift - drift_sum / modules.len() as f64).abs() < 1e-12);
    assert!((drift - lib.drift).abs() < 1e-12);
    // The fixture fine-tune moved the adapter well past the default threshold.
    assert!(drift > 0.05, "{drift}");
    assert_eq!(lib.verdict, DriftVerdict::Drifted);
    assert_eq!(j["verdict_line"], lib.verdict_line.as_str());
    let md = std::fs::read_to_string(d.path().join("report").join("diagnose_report.md")).unwrap();
    assert!(md.contains(&lib.verdict_line), "{md}");
}

#[test]
fn the_probe_reports_hs_and_over_refusal_with_their_counts() {
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("probe");
    let o = Command::new(env!("CARGO_BIN_EXE_realign"))
        .arg("diagnose")
        .arg("--aligned")
        .arg(fixture("aligned"))
        .arg("--finetuned")
        .arg(fixture("finetuned"))
        .arg("--model")
        .arg(common::fixtures().join("tiny-llama"))
        .args(["--probe", "3", "--probe-max-new-tokens", "4", "-o"])
        .arg(&out)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("probe: HS "), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("diagnose_report.json")).unwrap()).unwrap();
    let p = &json["probe"];
    assert_eq!(p["harmful"], "embedded:harmful_val");
    for key in ["hs", "hs_nondegenerate", "or"] {
        let r = &p[key];
        assert_eq!(r["n"], 3, "{key}: {r}");
        let k = r["k"].as_u64().unwrap();
        assert!(k <= 3);
        // the percentage is k of 3, inside its interval
        let pct = r["percent"].as_f64().unwrap();
        assert!((pct - 100.0 * k as f64 / 3.0).abs() < 1e-9, "{r}");
        assert!(r["lo"].as_f64().unwrap() <= pct && pct <= r["hi"].as_f64().unwrap());
    }
    assert!(p["hs_nondegenerate"]["k"].as_u64() <= p["hs"]["k"].as_u64());
    let md = std::fs::read_to_string(out.join("diagnose_report.md")).unwrap();
    assert!(md.contains("**Probe**"), "{md}");
}
