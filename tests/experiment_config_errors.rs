//! `realign experiment` refuses a bad experiment file when it starts, naming the file and the
//! key, before it creates the output folder: each case here passed validation once and failed
//! only when its stage ran, after hours of training (found by fuzzing the default one key at a
//! time). No experiment runs here: every command either prints the configuration or fails
//! before the first stage.

mod common;

use std::path::{Path, PathBuf};

use common::realign;

/// A model that is not there: a command that got past validation stops at it, before any stage.
const GUARD: &str = "/nonexistent/guard-model";

/// A folder holding `cfg.toml` with `text`; returns the folder and the file.
fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cfg.toml");
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

/// Runs `realign experiment ARGS`, which must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let mut all = vec!["experiment"];
    all.extend_from_slice(args);
    let out = realign(&all);
    assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
    assert!(out.stdout.is_empty(), "{args:?} printed {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `text` as the experiment file: `--print-config` and a run both fail with `message` after
/// the file's name, and the run's output folder is not created.
fn refused(text: &str, message: &str) {
    let (dir, file) = config(text);
    let f = file.to_str().unwrap();
    let want = format!("{f}: {message}");
    let err = fails(&[f, "--print-config"]);
    assert!(err.contains(&want), "{text}\nwant: {want}\ngot: {err}");
    // a missing model stops the command before any stage should the check ever pass
    let out = dir.path().join("out");
    let err = fails(&[f, "-o", out.to_str().unwrap(), "--model", GUARD]);
    assert!(err.contains(&want), "{text}\nwant: {want}\ngot: {err}");
    assert!(!out.exists(), "{text}: the output folder was created");
}

#[test]
fn a_sparsity_of_one_is_refused_at_start() {
    refused(
        "[nlsr]\nsparsities = [1.0]\n",
        "nlsr.sparsities = 1 is outside [0, 1)",
    );
}

#[test]
fn zero_new_tokens_are_refused_for_every_evaluation_set() {
    for set in ["harmful", "task", "overrefusal"] {
        refused(
            &format!("[eval]\n{set}_max_new_tokens = 0\n"),
            &format!("eval.{set}_max_new_tokens = 0: give at least 1"),
        );
    }
}

#[test]
fn missing_data_files_and_unknown_embedded_sets_are_refused_at_start() {
    refused(
        "[baselines]\nmethods = [\"antidote\"]\nantidote_data = \"/nope.jsonl\"\n",
        "baselines.antidote_data = \"/nope.jsonl\": no such file",
    );
    refused(
        "[nlsr]\nidentify_data = \"/nope.jsonl\"\n",
        "nlsr.identify_data = \"/nope.jsonl\": no such file",
    );
    refused(
        "[eval]\nharmful = \"/nope.csv\"\n",
        "eval.harmful = \"/nope.csv\": no such file",
    );
    refused(
        "[align.sft]\ndata = \"embedded:nope\"\n",
        "align.sft.data = \"embedded:nope\": no embedded set \"nope\" (known: safety_sft,",
    );
    refused(
        "[neurons]\ncorpus = \"embedded:safety\"\n",
        "neurons.corpus = \"embedded:safety\": no embedded set \"safety\"",
    );
}

#[test]
fn amplification_and_merge_scales_are_bounded() {
    refused(
        "[nlsr]\nbetas = [1e30]\n",
        "nlsr.betas = 1e30 is outside [0, 100]",
    );
    refused(
        "[nlsr]\nbetas = [0, -0.5]\n",
        "nlsr.betas = -0.5 is outside [0, 100]",
    );
    refused(
        "[baselines]\nmethods = [\"resta\"]\nresta_gamma = 1e300\n",
        "baselines.resta_gamma = ",
    );
}

#[test]
fn a_judge_model_that_is_not_there_names_the_key() {
    refused(
        "[eval]\njudge = \"model:/nonexistent\"\n",
        "eval.judge = \"model:/nonexistent\": no such model folder",
    );
    refused(
        "[eval]\njudge = \"ensemble:/nonexistent\"\n",
        "eval.judge = \"ensemble:/nonexistent\": no such model folder",
    );
}

#[test]
fn repeated_list_entries_and_an_empty_method_list_are_refused() {
    for (text, message) in [
        (
            "[attack]\nps = [0.2, 0.2]\n",
            "attack.ps: 0.2 is listed twice",
        ),
        (
            "[nlsr]\nmethods = [\"low-rank\", \"low-rank\"]\n",
            "nlsr.methods: \"low-rank\" is listed twice",
        ),
        (
            "[nlsr]\nsparsities = [0.2, 0.2]\n",
            "nlsr.sparsities: 0.2 is listed twice",
        ),
        (
            "[nlsr]\nbetas = [0.9, 0.9]\n",
            "nlsr.betas: 0.9 is listed twice",
        ),
        (
            "[nlsr]\nlayer_prunes = [0, 0]\n",
            "nlsr.layer_prunes: 0 is listed twice",
        ),
        (
            "[safelora]\nthresholds = [0.5, 0.5]\n",
            "safelora.thresholds: 0.5 is listed twice",
        ),
        (
            "[nlsr]\nmethods = []\n",
            "nlsr.methods is empty: give at least one method",
        ),
    ] {
        refused(text, message);
    }
}

#[test]
fn random_draws_take_the_range_of_the_cli() {
    refused(
        "[neurons]\nrandom_draws = 0\n",
        "neurons.random_draws = 0 is outside [1, 1000]",
    );
    refused(
        "[neurons]\nrandom_draws = 1001\n",
        "neurons.random_draws = 1001 is outside [1, 1000]",
    );
}

#[test]
fn a_max_length_too_short_for_any_token_pair_names_the_stage_key() {
    refused(
        "[attack.train]\nmax_length = 1\n",
        "attack.train.max_length = 1: give at least 2",
    );
}

#[test]
fn an_output_that_is_a_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let afile = dir.path().join("afile");
    std::fs::write(&afile, "x").unwrap();
    let a = afile.to_str().unwrap();
    let err = fails(&["-o", a]);
    assert!(
        err.contains(&format!("-o {a} is a file, not a folder")),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
    // a folder under a file
    let under = afile.join("run");
    let err = fails(&["-o", under.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "-o {}: {a} is a file, not a folder",
            under.display()
        )),
        "{err}"
    );
    // the file's `output` key
    let (_cfg_dir, file) = config(&format!("output = {a:?}\n"));
    let f = file.to_str().unwrap();
    let err = fails(&[f]);
    assert!(
        err.contains(&format!("{f}: output = {a:?} is a file, not a folder")),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&afile).unwrap(), "x");
}

#[test]
fn a_missing_base_model_is_named_before_the_output_folder_is_made() {
    let (dir, file) = config("model = \"/nonexistent/model\"\n");
    let f = file.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let err = fails(&[f, "-o", o]);
    assert!(
        err.contains(&format!(
            "{f}: model = \"/nonexistent/model\": no such model folder or GGUF file"
        )),
        "{err}"
    );
    assert!(!out.exists());
    let err = fails(&["--model", "/nonexistent/model", "-o", o]);
    assert!(
        err.contains("--model /nonexistent/model: no such model folder or GGUF file"),
        "{err}"
    );
    assert!(!out.exists());
    // --print-config still prints a model to be fetched
    let printed = realign(&["experiment", f, "--print-config"]);
    assert!(printed.status.success(), "{printed:?}");
}

/// The same checks through the library: `ExperimentConfig::from_file` names the file, and
/// `experiment::run` refuses before it creates anything.
#[test]
fn the_library_refuses_before_the_output_folder_exists() {
    use realign::experiment::{self, ExperimentConfig, Silent};
    let (dir, file) = config("[nlsr]\nsparsities = [1.0]\n");
    let err = ExperimentConfig::from_file(&file).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}: nlsr.sparsities = 1 is outside [0, 1)", file.display())
    );
    let mut cfg = ExperimentConfig {
        output: dir.path().join("out"),
        model: Some(PathBuf::from(GUARD)),
        ..ExperimentConfig::default()
    };
    cfg.nlsr.sparsities = vec![0.2, 1.0];
    let err = experiment::run(&cfg, &mut Silent)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.ends_with("nlsr.sparsities = 1 is outside [0, 1)"),
        "{err}"
    );
    assert!(!Path::new(&cfg.output).exists());
}
