//! The training loop on the tiny fixture: it learns, it is repeatable, it resumes exactly, and
//! each objective starts where its formula says.

mod common;

use std::path::Path;

use realign::data::{Prompt, Row};
use realign::model::{LoadOptions, LoadedModel};
use realign::train::{train, trainer::Quiet, StepLog, TrainConfig};

use common::fixtures;

fn model() -> LoadedModel {
    LoadedModel::load(&fixtures().join("tiny-llama"), &LoadOptions::default()).unwrap()
}

fn sft_rows() -> Vec<Row> {
    let qa = [
        ("How many apples does Natalia have?", "She has 48 apples."),
        ("Analyze the sentiment of the input", "positive"),
        ("the film is so bleak", "negative"),
        ("What is the answer?", "The answer is 72."),
        ("Respond only positive or negative", "negative"),
        ("How many clips did she sell?", "She sold 72 clips."),
    ];
    qa.iter()
        .map(|(p, r)| Row::Sft {
            prompt: Prompt::Text(p.to_string()),
            response: r.to_string(),
        })
        .collect()
}

fn config(out: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        "method = \"sft\"\noutput = {:?}\nseed = 7\n[lora]\nr = 4\nalpha = 8\n[data]\ntrain = \"unused\"\nmax_length = 64\n[optim]\nlr = 0.01\nbatch_size = 2\n{extra}",
        out.display().to_string()
    );
    TrainConfig::from_toml(&text).unwrap()
}

/// The objective `method` names, with its default settings.
fn objective(method: &str) -> realign::train::Objective {
    TrainConfig::from_toml(&format!(
        "method = \"{method}\"\noutput = \"x\"\n[data]\ntrain = \"x\"\n"
    ))
    .unwrap()
    .objective
}

fn logs(out: &Path) -> Vec<StepLog> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_lowers_the_loss_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let m = model();
    let report = train(
        m.model,
        &m.tokenizer,
        &sft_rows(),
        &config(&out, "epochs = 4\n"),
        false,
        &mut Quiet,
    )
    .unwrap();
    // 6 rows, batch 2 -> 3 steps per epoch, 4 epochs.
    assert_eq!(report.steps, 12);
    let l = logs(&out);
    assert_eq!(l.len(), 12);
    let first: f64 = l[..3].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    let last: f64 = l[9..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    let ad = realign::adapters::Adapter::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ad.config.r, 4);
    assert_eq!(ad.modules.len(), 21);
    assert!(out.join("train_report.json").is_file());
}

#[test]
fn same_seed_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = dir.path().join(name);
        let m = model();
        train(
            m.model,
            &m.tokenizer,
            &sft_rows(),
            &config(&out, "epochs = 2\n"),
            false,
            &mut Quiet,
        )
        .unwrap();
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    assert_eq!(run("a"), run("b"));
}

/// Stopping after a checkpoint and resuming gives the adapter an uninterrupted run gives.
#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let extra =
        "save_every = 4\nschedule = \"cosine\"\nwarmup_ratio = 0.2\ngrad_accum = 2\nepochs = 3\n";
    let full = dir.path().join("full");
    let m = model();
    train(
        m.model,
        &m.tokenizer,
        &sft_rows(),
        &config(&full, extra).clone(),
        false,
        &mut Quiet,
    )
    .unwrap();
    // 3 micro-batches per epoch, accumulation 2 -> 2 steps per epoch, 6 steps; checkpoint at 4.
    assert!(full.join("checkpoint-4").is_dir());
    // The "interrupted" run: the checkpoint and the log up to it, nothing else.
    let cut = dir.path().join("cut");
    std::fs::create_dir_all(cut.join("checkpoint-4")).unwrap();
    for e in std::fs::read_dir(full.join("checkpoint-4")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), cut.join("checkpoint-4").join(e.file_name())).unwrap();
    }
    let log: Vec<String> = std::fs::read_to_string(full.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(log.len(), 6);
    std::fs::write(cut.join("train_log.jsonl"), log[..5].join("\n") + "\n").unwrap(); // step 5 was lost
    let m = model();
    let report = train(
        m.model,
        &m.tokenizer,
        &sft_rows(),
        &config(&cut, extra),
        true,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!((report.steps, report.steps_this_run), (6, 2));
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap()
    );
    let resumed = logs(&cut);
    assert_eq!(
        resumed.iter().map(|l| l.step).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
}

fn pref_rows() -> Vec<Row> {
    sft_rows()
        .into_iter()
        .map(|r| match r {
            Row::Sft { prompt, response } => Row::Preference {
                prompt,
                chosen: response,
                rejected: "I will not.".into(),
            },
            other => other,
        })
        .collect()
}

/// At step 1 the policy equals the reference, so DPO's loss is -log sigmoid(0) = ln 2 exactly,
/// and KTO's is 1 - sigmoid(0) = 0.5 (rewards and the reference point are all 0).
#[test]
fn reference_objectives_start_at_their_closed_form() {
    let dir = tempfile::tempdir().unwrap();
    for (method, rows, want) in [
        ("dpo", pref_rows(), std::f64::consts::LN_2),
        (
            "kto",
            sft_rows()
                .into_iter()
                .enumerate()
                .map(|(i, r)| match r {
                    Row::Sft { prompt, response } => Row::Kto {
                        prompt,
                        completion: response,
                        desirable: i % 2 == 0,
                    },
                    other => other,
                })
                .collect(),
            0.5,
        ),
    ] {
        let out = dir.path().join(method);
        let mut cfg = config(&out, "epochs = 1\n");
        cfg.objective = objective(method);
        let m = model();
        train(m.model, &m.tokenizer, &rows, &cfg, false, &mut Quiet).unwrap();
        let first = logs(&out)[0].loss;
        assert!(
            (first - want).abs() < 1e-5,
            "{method}: first loss {first}, expected {want}"
        );
    }
    // SimPO and ORPO have no reference: they just have to train.
    for method in ["simpo", "orpo"] {
        let out = dir.path().join(method);
        let mut cfg = config(&out, "epochs = 2\n");
        cfg.objective = objective(method);
        let m = model();
        let r = train(m.model, &m.tokenizer, &pref_rows(), &cfg, false, &mut Quiet).unwrap();
        assert!(
            r.last_loss.unwrap() < r.first_loss.unwrap(),
            "{method}: {r:?}"
        );
    }
}

/// KTO on preference pairs trains on their unpaired rows: the chosen responses as desirable
/// rows, then the rejected ones as undesirable rows, written out by hand here. The two runs
/// log the same losses and write the same adapter bytes.
#[test]
fn kto_on_pairs_is_kto_on_their_unpaired_rows() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = pref_rows();
    let mut by_hand = Vec::new();
    for desirable in [true, false] {
        for r in &pairs {
            if let Row::Preference {
                prompt,
                chosen,
                rejected,
            } = r
            {
                by_hand.push(Row::Kto {
                    prompt: prompt.clone(),
                    completion: if desirable { chosen } else { rejected }.clone(),
                    desirable,
                });
            }
        }
    }
    assert_eq!(by_hand.len(), 2 * pairs.len());
    let mut runs = Vec::new();
    for (name, rows) in [("pairs", &pairs), ("by-hand", &by_hand)] {
        let out = dir.path().join(name);
        let mut cfg = config(&out, "epochs = 2\n");
        cfg.objective = objective("kto");
        let m = model();
        train(m.model, &m.tokenizer, rows, &cfg, false, &mut Quiet).unwrap();
        let losses: Vec<f64> = logs(&out).iter().map(|l| l.loss).collect();
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        runs.push((losses, bytes));
    }
    assert_eq!(runs[0].0.len(), 12, "12 rows in batches of 2, two epochs");
    assert_eq!(runs[0].0, runs[1].0);
    assert!(runs[0].1 == runs[1].1, "the adapters differ");
}

#[test]
fn wrong_rows_for_the_method_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("x"), "");
    cfg.objective = realign::train::Objective::Dpo { beta: 0.1 };
    let m = model();
    let err = train(m.model, &m.tokenizer, &sft_rows(), &cfg, false, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("row 0 is a sft row"), "{err}");
}

/// A micro-batch run as several passes (`max_tokens_per_pass`) gives the update of the whole
/// micro-batch: the same loss and gradient norm at every step and the same adapter, for the
/// objectives that are split (SFT, DPO, SimPO) and the one that is not (ORPO).
#[test]
fn passes_under_a_token_budget_give_the_whole_batch_update() {
    let dir = tempfile::tempdir().unwrap();
    for (method, rows) in [
        ("sft", sft_rows()),
        ("dpo", pref_rows()),
        ("simpo", pref_rows()),
        ("orpo", pref_rows()),
    ] {
        let run = |budget: usize| {
            let out = dir.path().join(format!("{method}-{budget}"));
            let mut cfg = config(
                &out,
                &format!("epochs = 2\nmax_tokens_per_pass = {budget}\n"),
            );
            cfg.optim.batch_size = 3;
            cfg.objective = objective(method);
            let m = model();
            train(m.model, &m.tokenizer, &rows, &cfg, false, &mut Quiet).unwrap();
            let ad = realign::adapters::Adapter::load(&out, &candle_core::Device::Cpu).unwrap();
            (logs(&out), ad)
        };
        // Budget 1: every example in a pass of its own.
        let ((whole, a), (split, b)) = (run(0), run(1));
        assert_eq!(whole.len(), 4, "{method}");
        for (w, s) in whole.iter().zip(&split) {
            assert!((w.loss - s.loss).abs() < 1e-5, "{method}: {w:?} vs {s:?}");
            assert!(
                (w.grad_norm - s.grad_norm).abs() < 1e-5 * w.grad_norm.max(1.0),
                "{method}"
            );
        }
        for (name, m) in &a.modules {
            let other = &b.modules[name];
            for (x, y) in [(&m.a, &other.a), (&m.b, &other.b)] {
                let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                // Adam divides by the gradient's size: a rounding-level gradient difference
                // moves an entry by a little of lr (0.01).
                assert!(d < 1e-4, "{method} {name}: {d}");
            }
        }
    }
}
