//! `realign train --config RUN.toml` on settings that cannot train, target modules that match
//! nothing, a run that diverges, and an output folder that already holds an adapter: each is
//! refused with exit code 1 and a message naming the run file, the key or the file, and no
//! output folder is written (or an existing one is left untouched). On the tiny fixture model,
//! one or a few steps each.

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, realign};

fn model() -> PathBuf {
    fixtures().join("tiny-llama")
}

/// Runs `realign train --config CONFIG EXTRA...`, expecting exit code 1; returns stderr.
fn train_fails(config: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = realign(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

/// Runs `realign train --config CONFIG EXTRA...`, expecting success.
fn train_ok(config: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = realign(&args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `DIR/run.toml`: `method`, the tiny model, output `DIR/out`, four rows of `data`, at
/// most `steps` optimizer steps of batch 2; `top` goes before the sections, `lora` into
/// `[lora]`, `optim` into `[optim]`, `data` into `[data]`.
struct Run<'a> {
    method: &'a str,
    top: &'a str,
    lora: &'a str,
    data: &'a str,
    optim: &'a str,
    steps: usize,
}

impl Default for Run<'_> {
    fn default() -> Self {
        Run {
            method: "sft",
            top: "",
            lora: "",
            data: "",
            optim: "",
            steps: 1,
        }
    }
}

impl Run<'_> {
    fn write(&self, dir: &Path) -> PathBuf {
        let rows = if self.method == "sft" {
            "embedded:task_train"
        } else {
            "embedded:safety_pref"
        };
        let text = format!(
            "method = \"{}\"\n{}\nmodel = {:?}\noutput = {:?}\nseed = 1\n\
             [lora]\nr = 2\nalpha = 4\n{}\n\
             [data]\ntrain = \"{rows}\"\nmax_rows = 4\nmax_length = 400\n{}\n\
             [optim]\nbatch_size = 2\nmax_steps = {}\n{}\n",
            self.method,
            self.top,
            model().display().to_string(),
            dir.join("out").display().to_string(),
            self.lora,
            self.data,
            self.steps,
            self.optim,
        );
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The names in `dir`, sorted (hidden partial folders included).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn settings_that_turn_training_off_or_reverse_it_are_refused_naming_file_and_key() {
    // (method, line before the sections, a setting of the run file changed, the message)
    let cases = [
        ("dpo", "beta = -1", ("", ""), "beta = -1 must be a finite number > 0"),
        ("dpo", "beta = 0", ("", ""), "beta = 0 must be a finite number > 0"),
        ("simpo", "beta = nan", ("", ""), "beta = NaN must be a finite number > 0"),
        ("orpo", "lambda = -0.5", ("", ""), "lambda = -0.5 must be a finite number ≥ 0"),
        ("kto", "lambda_d = 0", ("", ""), "lambda_d = 0 must be a finite number > 0"),
        ("kto", "lambda_u = -1", ("", ""), "lambda_u = -1 must be a finite number > 0"),
        (
            "sft",
            "",
            ("alpha = 4", "alpha = 0"),
            "lora.alpha = 0 must be a finite number > 0",
        ),
        (
            "sft",
            "",
            ("alpha = 4", "alpha = -inf"),
            "lora.alpha = -inf must be a finite number > 0",
        ),
        ("sft", "", ("r = 2", "r = 0"), "lora.r = 0 must be 1 to 65536"),
        (
            "sft",
            "",
            ("batch_size = 2", "batch_size = 2\nlr = -1"),
            "optim.lr = -1 must be a finite number > 0",
        ),
        (
            "sft",
            "",
            ("batch_size = 2", "batch_size = 2\nlr = nan"),
            "optim.lr = NaN must be a finite number > 0",
        ),
        (
            "sft",
            "",
            ("max_steps = 1", "max_steps = 0\nepochs = 0"),
            "optim.epochs = 0 must be at least 1",
        ),
        (
            "sft",
            "",
            ("batch_size = 2", "batch_size = 0"),
            "optim.batch_size = 0 must be at least 1",
        ),
        (
            "sft",
            "",
            ("max_length = 400", "max_length = 0"),
            "data.max_length = 0 must be at least 2",
        ),
        // a parameter of another method
        (
            "sft",
            "beta = 0.1",
            ("", ""),
            "beta = 0.1 is a parameter of method \"dpo\", \"kto\" or \"simpo\", not of method \"sft\" (its parameters: none)",
        ),
        (
            "dpo",
            "lambda = 0.5",
            ("", ""),
            "lambda = 0.5 is a parameter of method \"orpo\", not of method \"dpo\" (its parameters: beta)",
        ),
    ];
    for (method, top, (from, to), want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = Run {
            method,
            top,
            ..Run::default()
        }
        .write(dir.path());
        if !from.is_empty() {
            let text = std::fs::read_to_string(&config).unwrap();
            assert!(text.contains(from), "{from:?} not in\n{text}");
            std::fs::write(&config, text.replacen(from, to, 1)).unwrap();
        }
        let err = train_fails(&config, &[]);
        assert!(
            err.contains(&format!("{}: {want}", config.display())),
            "want {want:?}, got: {err}"
        );
        // nothing written, not even a partial folder
        assert_eq!(names(dir.path()), vec!["run.toml"], "{want}");
    }
}

#[test]
fn target_modules_that_match_no_module_are_refused_before_training() {
    let modules = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj";
    for (targets, want) in [
        (
            r#"["nonexistent"]"#,
            format!(
                r#"lora.target_modules ["nonexistent"] matches no linear module of {} (its modules: {modules})"#,
                model().display()
            ),
        ),
        (
            "[]",
            format!(
                "lora.target_modules [] matches no linear module of {} (its modules: {modules})",
                model().display()
            ),
        ),
        (
            r#"["q_proj", "v_prj"]"#,
            format!(
                r#"lora.target_modules ["q_proj", "v_prj"]: "v_prj" matches no linear module of {} (its modules: {modules})"#,
                model().display()
            ),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let target_line = format!("target_modules = {targets}");
        let config = Run {
            lora: &target_line,
            ..Run::default()
        }
        .write(dir.path());
        let err = train_fails(&config, &[]);
        assert!(
            err.contains(&format!("{}: {want}", config.display())),
            "want {want:?}, got: {err}"
        );
        assert!(!err.contains("adapter_model"), "{err}");
        assert_eq!(names(dir.path()), vec!["run.toml"], "{targets}");
    }
    // the names that do match train
    let dir = tempfile::tempdir().unwrap();
    let config = Run {
        lora: r#"target_modules = ["q_proj", "mlp.down_proj"]"#,
        ..Run::default()
    }
    .write(dir.path());
    train_ok(&config, &[]);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "mlp.down_proj"])
    );
}

#[test]
fn a_diverging_run_stops_at_its_step_and_writes_no_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = Run {
        optim: "lr = 1e30\nmax_grad_norm = 0.0",
        steps: 4,
        ..Run::default()
    }
    .write(dir.path());
    let err = train_fails(&config, &[]);
    // Step 1 starts from B = 0 (finite loss); its update of 1e30 makes step 2's loss NaN.
    assert!(
        err.contains("training diverged at step 2 (loss NaN); lower optim.lr (1e30)"),
        "{err}"
    );
    assert!(!err.contains("adapter_model"), "{err}");
    assert_eq!(names(dir.path()), vec!["run.toml"]);
    // With a checkpoint before the divergence the folder stays for --resume, without an adapter.
    let dir = tempfile::tempdir().unwrap();
    let config = Run {
        optim: "lr = 1e30\nmax_grad_norm = 0.0\nsave_every = 1",
        steps: 4,
        ..Run::default()
    }
    .write(dir.path());
    let err = train_fails(&config, &[]);
    assert!(
        err.contains("training diverged at step 2 (loss NaN)"),
        "{err}"
    );
    assert_eq!(names(dir.path()), vec!["out", "run.toml"]);
    let out = dir.path().join("out");
    assert!(out.join("checkpoint-1/adapter_model.safetensors").is_file());
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn a_finished_adapter_is_replaced_only_with_overwrite() {
    let help = realign(&["train", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("--overwrite"), "{help}");
    assert!(help.contains("default: off"), "{help}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = Run::default().write(dir.path());
    train_ok(&config, &[]);
    let weights = out.join("adapter_model.safetensors");
    let first = std::fs::read(&weights).unwrap();
    assert!(out.join("train_report.json").is_file());
    assert_eq!(names(dir.path()), vec!["out", "run.toml"]);

    // the same run again: refused, the adapter untouched
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("seed = 1", "seed = 2");
    std::fs::write(&config, text).unwrap();
    let err = train_fails(&config, &[]);
    assert!(
        err.contains(&format!(
            "{} already exists: pass --overwrite to replace it (nothing was written)",
            weights.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&weights).unwrap(), first);
    // --resume with no checkpoint to continue does not replace it either
    train_fails(&config, &["--resume"]);
    assert_eq!(std::fs::read(&weights).unwrap(), first);

    // --overwrite replaces it (another seed: another adapter), leaving no partial folder
    train_ok(&config, &["--overwrite"]);
    let second = std::fs::read(&weights).unwrap();
    assert_ne!(second, first);
    assert_eq!(names(dir.path()), vec!["out", "run.toml"]);

    // A run with checkpoints: the folder holds them and the adapter; --resume continues it
    // without --overwrite; a fresh run into an unfinished folder is refused.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = Run {
        optim: "save_every = 1",
        steps: 2,
        ..Run::default()
    }
    .write(dir.path());
    train_ok(&config, &[]);
    assert!(out.join("checkpoint-1/trainer_state.json").is_file());
    let done = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    train_ok(&config, &["--resume"]);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        done,
        "resuming from checkpoint-1 retrains step 2 to the same adapter"
    );
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let err = train_fails(&config, &[]);
    assert!(
        err.contains(&format!(
            "{} holds checkpoint-1 of an unfinished run: pass --resume to continue it or --overwrite to start again",
            out.display()
        )),
        "{err}"
    );
}
