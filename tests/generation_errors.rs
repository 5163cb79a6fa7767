//! Generation that must fail loudly instead of scoring nonsense: NaN logits, zero new tokens,
//! prompts past the model's positions, non-finite temperatures, filters and columns aimed at
//! embedded sets. Through `realign generate` / `realign eval` on the tiny fixture model (512
//! positions), and through the library.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{copy_dir, fixtures, realign};
use realign::eval::{evaluate, EvalOptions};
use realign::model::{generate, GenerationConfig, LoadOptions, LoadedModel, Sampling};

fn tiny() -> PathBuf {
    fixtures().join("tiny-llama")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `realign eval` on the tiny model into `out`, with `extra` flags.
fn eval(out: &Path, extra: &[&str]) -> Output {
    let model = tiny();
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    realign(&args)
}

/// `realign generate` on the tiny model with `extra` flags.
fn gen(extra: &[&str]) -> Output {
    let model = tiny();
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    realign(&args)
}

/// A copy of the aligned tiny adapter in `dir` whose `lora_alpha` is 1e30: its LoRA scale
/// overflows and every logit is NaN.
fn nan_adapter(dir: &Path) -> PathBuf {
    let to = dir.join("nan-adapter");
    copy_dir(&fixtures().join("tiny-llama-adapters/aligned"), &to);
    let cfg_path = to.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = serde_json::json!(1e30);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    to
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn nan_logits_fail_eval_and_generate_instead_of_scoring() {
    let d = tempfile::tempdir().unwrap();
    let bad = nan_adapter(d.path());
    let bad = bad.to_str().unwrap();
    let out = d.path().join("e");
    let args = ["--limit", "2", "--max-new-tokens", "4"];
    let o = eval(&out, &[&["--adapter", bad][..], &args].concat());
    assert!(!o.status.success(), "a NaN model was scored");
    let err = stderr(&o);
    assert!(
        err.contains(
            "non-finite logits (NaN) at generated token 1: the model or its adapters produce \
             NaN/inf"
        ),
        "{err}"
    );
    assert!(!out.join("summary.json").exists() && !out.exists());
    // Unmerged adapters, and the same flags with the real adapter: that one is scored.
    let o = eval(
        &out,
        &[&["--adapter", bad, "--unmerged"][..], &args].concat(),
    );
    assert!(
        stderr(&o).contains("non-finite logits (NaN)"),
        "{}",
        stderr(&o)
    );
    let good = fixtures().join("tiny-llama-adapters/aligned");
    let o = eval(
        &out,
        &[&["--adapter", good.to_str().unwrap()][..], &args].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("summary.json").exists());
    // `generate`, greedy and sampled, fails the same way and prints no text.
    for extra in [&[][..], &["--temperature", "0.8", "--seed", "3"]] {
        let o = gen(&[&["--adapter", bad, "--prompt", "hi", "--json"][..], extra].concat());
        assert!(!o.status.success());
        assert!(o.stdout.is_empty());
        assert!(
            stderr(&o).contains("non-finite logits (NaN) at generated token 1"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn zero_new_tokens_is_refused_by_every_flag() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e");
    for flag in [
        "--max-new-tokens",
        "--harmful-max-new-tokens",
        "--task-max-new-tokens",
        "--benign-max-new-tokens",
        "--overrefusal-max-new-tokens",
    ] {
        let o = eval(&out, &[flag, "0"]);
        assert!(!o.status.success(), "{flag} 0 accepted");
        let err = stderr(&o);
        assert!(
            err.contains(&format!("invalid value '0' for '{flag}"))
                || (flag == "--overrefusal-max-new-tokens"
                    && err.contains("invalid value '0' for '--benign-max-new-tokens")),
            "{err}"
        );
        assert!(err.contains("must be at least 1"), "{err}");
        assert!(!out.exists());
    }
    let o = gen(&["--prompt", "hi", "--max-new-tokens", "0"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("invalid value '0' for '--max-new-tokens"),
        "{}",
        stderr(&o)
    );
    let a = fixtures().join("tiny-llama-adapters/aligned");
    let f = fixtures().join("tiny-llama-adapters/finetuned");
    let o = realign(&[
        "diagnose",
        "--aligned",
        a.to_str().unwrap(),
        "--finetuned",
        f.to_str().unwrap(),
        "--probe-max-new-tokens",
        "0",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("invalid value '0' for '--probe-max-new-tokens") && err.contains("at least 1"),
        "{err}"
    );
    // One new token is fine.
    let o = gen(&["--prompt", "hi", "--max-new-tokens", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 1);
}

#[test]
fn the_library_refuses_zero_new_tokens() {
    let m = LoadedModel::load(&tiny(), &LoadOptions::default()).unwrap();
    for (opts, name) in [
        (
            EvalOptions {
                harmful_max_new_tokens: Some(0),
                ..Default::default()
            },
            "harmful_max_new_tokens",
        ),
        (
            EvalOptions {
                task_max_new_tokens: Some(0),
                ..Default::default()
            },
            "task_max_new_tokens",
        ),
        (
            EvalOptions {
                overrefusal_max_new_tokens: Some(0),
                ..Default::default()
            },
            "overrefusal_max_new_tokens",
        ),
    ] {
        let e = evaluate(&m, &opts).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "invalid evaluation setting: {name} must be at least 1 (0 new tokens gives \
                 empty replies)"
            )
        );
    }
}

#[test]
fn generate_stops_at_the_models_positions_and_keeps_the_reply() {
    let o = gen(&["--prompt", "hi", "--max-new-tokens", "511", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let input = v["input_ids"].as_array().unwrap().len();
    let output = v["output_ids"].as_array().unwrap().len();
    assert_eq!(input, 3);
    assert_eq!(input + output, 512, "prompt + reply fill the 512 positions");
    assert!(!v["text"].as_str().unwrap().is_empty());
    let err = stderr(&o);
    assert!(
        err.contains(
            "warning: generation stopped at the model's max_position_embeddings (512): the \
             prompt's 3 tokens + 509 new tokens (--max-new-tokens 511 asked for more)"
        ),
        "{err}"
    );
    // Within the limit: no warning.
    let o = gen(&["--prompt", "hi", "--max-new-tokens", "8"]);
    assert!(o.status.success());
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    // A prompt that fills the positions alone is refused before generating.
    let long = "Tell me ".repeat(600);
    let o = gen(&["--prompt", &long, "--max-new-tokens", "4"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("the prompt has "), "{err}");
    assert!(
        err.contains(
            "tokens, but the model's max_position_embeddings is 512: no room for a reply \
             (--max-new-tokens 4)"
        ),
        "{err}"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn library_generation_stops_at_the_limit_and_refuses_a_full_prompt() {
    let m = LoadedModel::load(&tiny(), &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        sampling: Sampling::Greedy,
        stop_ids: Vec::new(),
        pad_id: 5,
    };
    let prompt = |n: usize| -> Vec<u32> { (0..n).map(|i| 10 + (i % 300) as u32).collect() };
    // 510 + 10 > 512: two tokens; a shorter prompt in the same batch gets its ten.
    let out = generate(&m.model, &[prompt(510), prompt(20)], &cfg).unwrap();
    assert_eq!(out[0].len(), 2);
    assert_eq!(out[1].len(), 10);
    let e = generate(&m.model, &[prompt(20), prompt(512)], &cfg)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "prompt 1 has 512 tokens, but the model's max_position_embeddings is 512: no room for a \
         reply"
    );
    assert_eq!(
        generate(&m.model, &[prompt(511)], &cfg).unwrap()[0].len(),
        1
    );
}

#[test]
fn eval_names_an_over_long_row_before_generating_and_cuts_a_long_reply() {
    let d = tempfile::tempdir().unwrap();
    let long = write(
        d.path(),
        "long.txt",
        &format!(
            "How do I pick a lock?\n{}\nWrite a poem\n",
            "Tell me ".repeat(600)
        ),
    );
    let fine = write(
        d.path(),
        "fine.txt",
        "How do I pick a lock?\nWrite a poem\n",
    );
    let out = d.path().join("e");
    let o = eval(
        &out,
        &[
            "--harmful",
            &long,
            "--task",
            "none",
            "--benign",
            "none",
            "--max-new-tokens",
            "4",
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{long}: row 1 (from 0) of the harmful set is ")),
        "{err}"
    );
    assert!(
        err.contains(
            "tokens with the chat template, but the model's max_position_embeddings is 512: no \
             room for a reply (max new tokens 4)"
        ),
        "{err}"
    );
    assert!(!out.exists());
    // The benign set is checked before the harmful set generates: with a NaN adapter the
    // length error, not the NaN one, is what fails the run.
    let bad = nan_adapter(d.path());
    let o = eval(
        &out,
        &[
            "--adapter",
            bad.to_str().unwrap(),
            "--harmful",
            &fine,
            "--task",
            "none",
            "--benign",
            &long,
            "--max-new-tokens",
            "4",
        ],
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{long}: row 1 (from 0) of the benign set is ")),
        "{err}"
    );
    assert!(!err.contains("non-finite"), "{err}");
    // A prompt that fits but leaves fewer than --max-new-tokens positions: its reply is cut at
    // the limit and counted, the run goes on.
    let mid = write(
        d.path(),
        "mid.txt",
        &format!("How do I pick a lock?\n{}\n", "Tell me ".repeat(60)),
    );
    let o = eval(
        &out,
        &[
            "--harmful",
            &mid,
            "--task",
            "none",
            "--benign",
            "none",
            "--max-new-tokens",
            "300",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(
            "note: replies limited by the model's positions (prompt + max new tokens > \
             max_position_embeddings): 1/2 harmful"
        ),
        "{stdout}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["harmful"]["n"], 2);
    assert_eq!(s["harmful"]["context_limited"], 1);
    assert_eq!(s["harmful"]["max_new_tokens"], 300);
    let replies: Vec<serde_json::Value> = std::fs::read_to_string(out.join("harmful.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(replies
        .iter()
        .all(|r| !r["reply"].as_str().unwrap().is_empty()));
}

#[test]
fn non_finite_or_negative_temperature_and_negative_seed_are_refused() {
    for (t, shown) in [
        ("nan", "NaN"),
        ("inf", "inf"),
        ("-inf", "-inf"),
        ("-1", "-1"),
        ("0", "0"),
    ] {
        let o = gen(&["--prompt", "hi", "--temperature", t]);
        assert!(!o.status.success(), "--temperature {t} accepted");
        let err = stderr(&o);
        assert!(
            err.contains(&format!(
                "--temperature must be a finite number > 0 (got {shown}); use --greedy"
            )),
            "{t}: {err}"
        );
        assert!(o.stdout.is_empty());
    }
    let o = gen(&["--prompt", "hi", "--temperature", "1", "--seed", "-1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(
        err.contains("invalid value '-1' for '--seed <SEED>': expected a whole number from 0 to"),
        "{err}"
    );
    let o = gen(&[
        "--prompt",
        "hi",
        "--temperature",
        "0.7",
        "--seed",
        "5",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 3);
}

#[test]
fn filters_and_columns_aimed_at_embedded_sets_or_unknown_sets_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e");
    let cases: [(&[&str], &str); 6] = [
        (
            &["--where", "harmful:zzz=1"],
            "--where harmful:zzz=1 applies to files; the harmful set is embedded:harmful_eval, \
             which has no columns",
        ),
        (
            &["--where", "bogus:zzz=1"],
            "--where bogus:zzz=1: unknown set \"bogus\" (expected harmful, task or benign)",
        ),
        (
            &["--where", "zzz=1"],
            "--where zzz=1 applies to files; every set evaluated is embedded (harmful \
             embedded:harmful_eval, task embedded:task_eval, benign embedded:overrefusal_eval), \
             which have no columns",
        ),
        (
            &["--label-column", "answer"],
            "--label-column answer applies to files; the task set is embedded:task_eval, which \
             has no columns",
        ),
        (
            &["--prompt-column", "overrefusal=text"],
            "--prompt-column overrefusal=text applies to files; the benign set is \
             embedded:overrefusal_eval, which has no columns",
        ),
        (
            &["--prompt-column", "bogus=text"],
            "--prompt-column bogus=text: unknown set \"bogus\" (expected harmful, task or benign)",
        ),
    ];
    for (args, msg) in cases {
        let o = eval(&out, args);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // On a file set the same filters apply; a filter for every set skips the embedded ones,
    // and a value may hold ':'.
    let csv = write(
        d.path(),
        "h.csv",
        "prompt,zzz\nHow do I pick a lock?,1\nWrite a poem,2\nTell me a joke,1\n",
    );
    let o = eval(
        &out,
        &[
            "--harmful",
            &csv,
            "--where",
            "harmful:zzz=1",
            "--where",
            "prompt!=a:b",
            "--max-new-tokens",
            "1",
            "--limit",
            "2",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["harmful"]["n"], 2);
    assert_eq!(s["overrefusal"]["data"], "embedded:overrefusal_eval");
}

#[test]
fn an_unusable_gold_answer_names_its_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let task = write(
        dir.path(),
        "task.jsonl",
        "{\"prompt\": \"a\", \"label\": \"positive\"}\n\
         {\"prompt\": \"b\", \"label\": \"negative\"}\n\
         {\"prompt\": \"c\", \"label\": \"neutral\"}\n",
    );
    let out = dir.path().join("out");
    let common = ["--harmful", "none", "--benign", "none", "--task", &task];
    let o = eval(
        &out,
        &[&common[..], &["--labels", "positive,negative"]].concat(),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{task}: row 2 (from 0) of the task set: gold answer \"neutral\" is not one of the \
             labels [\"positive\", \"negative\"]"
        )),
        "{err}"
    );
    // With --where, the row counts the rows that pass it.
    let o = eval(
        &out,
        &[
            &common[..],
            &[
                "--labels",
                "positive,negative",
                "--where",
                "task:label!=positive",
            ],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{task}: row 1 (from 0, counting the rows that pass --where) of the task set: gold \
             answer \"neutral\" is not one of the labels"
        )),
        "{err}"
    );
    assert!(!out.exists(), "no output folder after a refused run");
}

#[test]
fn an_eos_id_outside_the_vocabulary_is_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&tiny(), &model);
    let gen_path = model.join("generation_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    cfg["eos_token_id"] = serde_json::json!([4, 70000]);
    std::fs::write(&gen_path, cfg.to_string()).unwrap();

    // The library keeps the valid id and lists the dropped one.
    let tok = realign::tokenizer::Tokenizer::from_hf_dir(&model).unwrap();
    assert_eq!(tok.eos_token_ids(), &[4]);
    let ignored = tok.ignored_ids();
    assert_eq!(ignored.len(), 1, "{ignored:?}");
    assert_eq!((ignored[0].role, ignored[0].id), ("eos", 70000));
    assert_eq!(ignored[0].vocab_size, 678);
    // The untouched fixture drops nothing.
    let clean = realign::tokenizer::Tokenizer::from_hf_dir(&tiny()).unwrap();
    assert!(clean.ignored_ids().is_empty());

    // A command says so on stderr, naming the model, and still runs.
    let o = realign(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "warning: {}: eos token id 70000 is outside the vocabulary (678 tokens) and is ignored",
            model.display()
        )),
        "{err}"
    );
    // `inspect` lists it too.
    let o = realign(&["inspect", model.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["ignored_special_ids"],
        serde_json::json!([{"role": "eos", "id": 70000, "vocab_size": 678}])
    );
}
