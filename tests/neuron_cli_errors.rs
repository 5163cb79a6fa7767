//! Inputs found by fuzzing the safety-neuron commands and `synthetic`, each refused with exit
//! code 1 and a message naming the flag or the file and the range, with nothing written: an
//! adapter rank above the shape's matrices, SN-Tune settings that cannot train (and a run that
//! diverges), empty neuron sets and sets listing a module twice, an ε or a top-k that selects
//! every neuron, and a deactivation check with nothing to measure. On the tiny fixture model.

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, realign};
use realign::neurons::{Axis, ModuleNeurons, NeuronSet};

fn model() -> String {
    fixtures().join("tiny-llama").display().to_string()
}

/// Runs `realign ARGS`, expecting exit code 1 and no panic; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = realign(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

/// Runs `realign ARGS`, expecting success; returns stdout.
fn succeeds(args: &[&str]) -> String {
    let out = realign(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in `dir` (hidden partial folders included), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn module(name: &str, shape: [usize; 2], indices: &[u32]) -> ModuleNeurons {
    ModuleNeurons {
        module: name.into(),
        axis: Axis::for_module(name),
        shape,
        indices: indices.to_vec(),
    }
}

/// Writes `dir/S.json`: a few neurons of the tiny model (q_proj rows of layer 0, down_proj
/// columns of layer 1), shapes as the model has them.
fn small_set(dir: &Path) -> PathBuf {
    let p = dir.join("S.json");
    NeuronSet::new(
        serde_json::json!({"test": true}),
        vec![
            module("model.layers.0.self_attn.q_proj", [64, 64], &[1, 5, 9]),
            module("model.layers.1.mlp.down_proj", [64, 160], &[0, 7, 100]),
        ],
    )
    .save(&p)
    .unwrap();
    p
}

/// Writes `dir/E.json`: a well-formed set file with no module.
fn empty_set(dir: &Path) -> PathBuf {
    let p = dir.join("E.json");
    std::fs::write(
        &p,
        r#"{"format": "realign-neuron-set", "version": 1, "meta": {}, "modules": []}"#,
    )
    .unwrap();
    p
}

/// Writes `dir/dupmod.json`: down_proj of layer 0 listed twice (column axis both times).
fn dup_set(dir: &Path) -> PathBuf {
    let p = dir.join("dupmod.json");
    let m = |i: u32| {
        serde_json::json!({"module": "model.layers.0.mlp.down_proj", "axis": "column",
            "shape": [64, 160], "indices": [i]})
    };
    let file = serde_json::json!({"format": "realign-neuron-set", "version": 1, "meta": {},
        "modules": [m(3), m(3)]});
    std::fs::write(&p, file.to_string()).unwrap();
    p
}

const DUP: &str = "dupmod.json: module model.layers.0.mlp.down_proj (axis column) is listed twice";

#[test]
fn synthetic_refuses_an_adapter_rank_above_the_smallest_matrix_before_writing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("sy");
    let (o, m) = (out.to_str().unwrap(), model());
    for rank in ["100000000", "1000000", "33"] {
        let err = fails(&[
            "synthetic",
            "--shape",
            "tiny",
            "--tokenizer",
            &m,
            "--adapter-rank",
            rank,
            "-o",
            o,
        ]);
        assert!(
            err.contains(&format!(
                "error: --adapter-rank {rank}: must be 0 (no adapter) or 1 to 32 for shape tiny \
                 (its smallest adapted matrix, self_attn.k_proj, is 32 x 64"
            )),
            "{err}"
        );
        // neither the output nor a hidden partial folder
        assert!(entries(d.path()).is_empty(), "{:?}", entries(d.path()));
    }
    // the bound itself is accepted, and written as asked
    succeeds(&[
        "synthetic",
        "--shape",
        "tiny",
        "--tokenizer",
        &m,
        "--adapter-rank",
        "32",
        "-o",
        o,
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("synthetic.json")).unwrap())
            .unwrap();
    assert_eq!(report["adapter_rank"], 32);
    assert_eq!(entries(d.path()), vec!["sy".to_string()]);
}

#[test]
fn sn_tune_refuses_settings_that_cannot_train_before_loading_the_model() {
    let d = tempfile::tempdir().unwrap();
    let set = small_set(d.path());
    let out = d.path().join("tuned");
    // a model that does not exist: the flag is named, not the model
    let missing = d.path().join("no-model").display().to_string();
    for (flag, message) in [
        ("--lr=-1", "--lr must be a finite number > 0 (got -1)"),
        ("--lr=0", "--lr must be a finite number > 0 (got 0)"),
        ("--lr=nan", "--lr must be a finite number > 0 (got NaN)"),
        ("--lr=inf", "--lr must be a finite number > 0 (got inf)"),
        ("--epochs=0", "--epochs must be at least 1 (got 0)"),
        ("--batch-size=0", "--batch-size must be at least 1 (got 0)"),
        (
            "--warmup-ratio=2",
            "--warmup-ratio must be in [0, 1] (got 2)",
        ),
        (
            "--warmup-ratio=-0.5",
            "--warmup-ratio must be in [0, 1] (got -0.5)",
        ),
        (
            "--max-grad-norm=-1",
            "--max-grad-norm must be a finite number >= 0, 0 for no clipping (got -1)",
        ),
        ("--max-length=1", "--max-length must be at least 2 (got 1)"),
    ] {
        let err = fails(&[
            "sn-tune",
            "--model",
            &missing,
            "--set",
            set.to_str().unwrap(),
            flag,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(err.trim_end(), format!("error: {message}"), "{flag}");
    }
    assert_eq!(entries(d.path()), vec!["S.json".to_string()]);
}

#[test]
fn sn_tune_that_diverges_stops_and_writes_no_model() {
    let d = tempfile::tempdir().unwrap();
    // the set the fuzzer used: detected on the tiny model (its loss turns NaN at lr 1e30)
    let set = d.path().join("S.json");
    let m = model();
    succeeds(&[
        "neurons",
        "detect",
        "--model",
        &m,
        "--corpus",
        "embedded:safety_sft",
        "--limit",
        "8",
        "-o",
        set.to_str().unwrap(),
    ]);
    let before = entries(d.path());
    let out = d.path().join("tuned");
    let (s, o) = (set.to_str().unwrap(), out.to_str().unwrap());
    let args = |lr: &'static str| {
        vec![
            "sn-tune",
            "--model",
            m.as_str(),
            "--set",
            s,
            "--docs",
            "8",
            "--batch-size",
            "2",
            "--lr",
            lr,
            "-o",
            o,
        ]
    };
    let err = fails(&args("1e30"));
    // step 1 moves the deltas by about lr; the loss of step 2 is no longer a number
    assert!(
        err.contains("error: SN-Tune diverged at step 2 (loss NaN); lower --lr (1e30)"),
        "{err}"
    );
    assert_eq!(entries(d.path()), before);
    // the same run at a sane rate trains and writes the model
    let stdout = succeeds(&args("1e-4"));
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["steps"], 4);
    assert!(r["last_loss"].as_f64().unwrap().is_finite(), "{r}");
    assert!(out.join("sn_tune_report.json").is_file());
}

#[test]
fn empty_sets_are_refused_where_neurons_are_needed_and_overlap_says_n_a() {
    let d = tempfile::tempdir().unwrap();
    let (s, e) = (small_set(d.path()), empty_set(d.path()));
    let (s, e, m) = (s.to_str().unwrap(), e.to_str().unwrap(), model());
    let w = d.path().join("w");
    let rep = d.path().join("rep.json");
    let c = d.path().join("c.json");
    let want = format!("{e}: the set is empty");
    for args in [
        vec![
            "neurons",
            "deactivate",
            "--model",
            &m,
            "--set",
            e,
            "--write",
            w.to_str().unwrap(),
        ],
        vec![
            "neurons",
            "deactivate",
            "--model",
            &m,
            "--set",
            e,
            "--limit",
            "1",
            "-o",
            rep.to_str().unwrap(),
        ],
        vec!["neurons", "combine", s, e, "-o", c.to_str().unwrap()],
        vec!["neurons", "combine", e, s, "-o", c.to_str().unwrap()],
        vec![
            "sn-tune",
            "--model",
            &m,
            "--set",
            e,
            "-o",
            w.to_str().unwrap(),
        ],
    ] {
        let err = fails(&args);
        assert!(err.contains(&want), "{args:?}: {err}");
    }
    // an empty result is not written either
    let err = fails(&["neurons", "combine", s, s, "-o", c.to_str().unwrap()]);
    assert!(
        err.contains("the difference of ") && err.contains("(6 neurons) is empty: no set file"),
        "{err}"
    );
    assert_eq!(
        entries(d.path()),
        vec!["E.json".to_string(), "S.json".to_string()]
    );

    // overlap: a ratio over an empty set is n/a, the other one is a number
    let table = succeeds(&["neurons", "overlap", e, s]);
    let all: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("all "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(all, vec!["all", "0", "6", "0", "0.0000", "n/a"], "{table}");
    let q: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("q_proj "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(q, vec!["q_proj", "0", "3", "0", "0.0000", "n/a"], "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&succeeds(&["neurons", "overlap", s, e, "--json"])).unwrap();
    assert_eq!(json["overall"]["ratio_of_b"], serde_json::Value::Null);
    assert_eq!(json["overall"]["ratio_of_a"], 0.0);
}

#[test]
fn a_set_listing_a_module_twice_is_refused_by_every_reader() {
    let d = tempfile::tempdir().unwrap();
    let (s, dup) = (small_set(d.path()), dup_set(d.path()));
    let (s, dup, m) = (s.to_str().unwrap(), dup.to_str().unwrap(), model());
    let w = d.path().join("w");
    let c = d.path().join("c.json");
    for args in [
        vec!["neurons", "overlap", dup, s],
        vec!["neurons", "overlap", s, dup],
        vec![
            "neurons",
            "combine",
            dup,
            s,
            "--op",
            "union",
            "-o",
            c.to_str().unwrap(),
        ],
        vec![
            "neurons",
            "deactivate",
            "--model",
            &m,
            "--set",
            dup,
            "--write",
            w.to_str().unwrap(),
        ],
        vec![
            "sn-tune",
            "--model",
            &m,
            "--set",
            dup,
            "-o",
            w.to_str().unwrap(),
        ],
        vec![
            "sn-tune",
            "--model",
            &m,
            "--set",
            s,
            "--exclude",
            dup,
            "-o",
            w.to_str().unwrap(),
        ],
    ] {
        let err = fails(&args);
        assert!(err.contains(DUP), "{args:?}: {err}");
    }
    assert_eq!(
        entries(d.path()),
        vec!["S.json".to_string(), "dupmod.json".to_string()]
    );
}

#[test]
fn detect_refuses_an_epsilon_or_a_top_k_that_selects_every_neuron() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("S.json");
    let (o, m) = (out.to_str().unwrap(), model());
    let detect = |extra: &[&'static str]| {
        let mut args = vec![
            "neurons",
            "detect",
            "--model",
            m.as_str(),
            "--corpus",
            "embedded:safety_sft",
            "--limit",
            "2",
            "-o",
            o,
        ];
        args.extend_from_slice(extra);
        args
    };
    // tiny-llama per layer: q 64 rows, k and v 32, o 64 columns, 160 FFN units
    for (extra, message) in [
        (
            vec!["--epsilon=-1"],
            "--epsilon -1: must be a finite number >= 0",
        ),
        (
            vec!["--epsilon=nan"],
            "--epsilon NaN: must be a finite number >= 0",
        ),
        (
            vec!["--top-k", "100000"],
            "--top-k 100000: a layer of the model has 352 neurons to rank (q, k, v, o and \
             FFN units); k must be below that",
        ),
        (
            vec!["--top-k", "352"],
            "--top-k 352: a layer of the model has 352 neurons",
        ),
        (
            vec!["--top-k-ffn", "100000"],
            "--top-k-ffn 100000: the model's FFN has 160 units per layer; k must be below that",
        ),
        (
            vec!["--top-k-ffn", "160"],
            "--top-k-ffn 160: the model's FFN has 160 units per layer",
        ),
        (
            vec!["--top-k-attn", "64"],
            "--top-k-attn 64: the model's q_proj has 64 rows per layer; k must be below that",
        ),
    ] {
        let err = fails(&detect(&extra));
        assert!(
            err.contains(&format!("error: {message}")),
            "{extra:?}: {err}"
        );
        assert!(entries(d.path()).is_empty(), "{:?}", entries(d.path()));
    }
    // ε needs no model: it is refused before one is loaded
    let missing = d.path().join("no-model").display().to_string();
    let err = fails(&[
        "neurons",
        "detect",
        "--model",
        &missing,
        "--epsilon=-0.5",
        "-o",
        o,
    ]);
    assert_eq!(
        err.trim_end(),
        "error: --epsilon -0.5: must be a finite number >= 0"
    );
    // just below the widths is a ranking, not everything
    succeeds(&detect(&["--top-k-attn", "63", "--top-k-ffn", "159"]));
    let set = NeuronSet::load(&out).unwrap();
    // 3 layers x (64 + 32 + 32 + 64 + 3 x 160) neurons in all
    assert!(
        set.len() < 3 * (64 + 32 + 32 + 64 + 3 * 160),
        "{}",
        set.len()
    );
}

#[test]
fn deactivate_with_nothing_to_measure_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = small_set(d.path());
    let rep = d.path().join("rep.json");
    let m = model();
    for empty in ["none", ""] {
        let err = fails(&[
            "neurons",
            "deactivate",
            "--model",
            &m,
            "--set",
            s.to_str().unwrap(),
            "--harmful",
            empty,
            "--task",
            "none",
            "--ppl-text",
            empty,
            "-o",
            rep.to_str().unwrap(),
        ]);
        assert!(
            err.contains(
                "error: nothing to measure: --harmful, --task and --ppl-text are all none"
            ),
            "{err}"
        );
    }
    assert_eq!(entries(d.path()), vec!["S.json".to_string()]);
}

#[test]
fn sn_tune_names_the_set_file_whose_shapes_are_not_the_models() {
    let d = tempfile::tempdir().unwrap();
    let set = d.path().join("other.json");
    NeuronSet::new(
        serde_json::json!({"test": true}),
        vec![module("model.layers.0.mlp.down_proj", [64, 320], &[3])],
    )
    .save(&set)
    .unwrap();
    let out = d.path().join("tuned");
    let m = model();
    let (s, o) = (set.to_str().unwrap(), out.to_str().unwrap());
    let err = fails(&["sn-tune", "--model", &m, "--set", s, "--docs", "2", "-o", o]);
    assert_eq!(
        err.trim_end(),
        format!(
            "error: {s}: model.layers.0.mlp.down_proj: the set says shape [64, 320], \
             the model has [64, 160]: it was detected on another model"
        )
    );
    // As --exclude (RSN-Tune's foundation set), the file named is that one.
    let good = small_set(d.path());
    let g = good.to_str().unwrap();
    let err = fails(&[
        "sn-tune",
        "--model",
        &m,
        "--set",
        g,
        "--exclude",
        s,
        "--docs",
        "2",
        "-o",
        o,
    ]);
    assert!(
        err.starts_with(&format!("error: {s}: model.layers.0.mlp.down_proj")),
        "{err}"
    );
    assert!(!out.exists());
}
