//! `realign resta` on the tiny fixture adapters: the written PEFT adapter's dense update is
//! `W_t + γ W_a`, module by module.

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use realign::adapters::{lora_delta, Adapter};

#[test]
fn cli_writes_w_t_plus_gamma_w_a() {
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-adapters");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("resta");
    let o = Command::new(env!("CARGO_BIN_EXE_realign"))
        .args(["resta", "--aligned"])
        .arg(fx.join("aligned"))
        .arg("--finetuned")
        .arg(fx.join("finetuned"))
        .args(["--gamma", "0.5", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dev = Device::Cpu;
    let wa = Adapter::load(&fx.join("aligned"), &dev).unwrap();
    let wt = Adapter::load(&fx.join("finetuned"), &dev).unwrap();
    let wr = Adapter::load(&out, &dev).unwrap();
    assert_eq!(wr.config.r, wa.config.r + wt.config.r);
    for (path, m) in &wr.modules {
        let want = (lora_delta(&wt.modules[path]).unwrap()
            + (lora_delta(&wa.modules[path]).unwrap() * 0.5).unwrap())
        .unwrap();
        let diff = (lora_delta(m).unwrap() - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5 * scale.max(1.0), "{path}: {diff}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("resta_report.json")).unwrap()).unwrap();
    assert_eq!(report["gamma"], 0.5);
    assert_eq!(report["num_modules"], wr.modules.len());
}
