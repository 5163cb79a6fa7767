//! Every command against every bad input that applies (issue 15), table-driven.
//!
//! Commands covered: `generate`, `inspect`, `train`, `eval`, `amplify`, `identify`,
//! `identify overlap`, `patch`, `safelora`, `diagnose`, `resta`, `safemerge`, `antidote`, `sn-tune`, `neurons detect`,
//! `neurons deactivate`,
//! `neurons overlap`, `data mix`, `data export`, `data stats`, `experiment`.
//!
//! Bad inputs: a missing file; an empty file; a safetensors file cut in its header and in its
//! data; a GGUF file cut in its header and in its data; a corrupt JSON config; a wrong
//! `model_type`; an adapter that does not fit (a module of another shape); masks of another
//! adapter; NaN weights in a model and in an adapter; empty, malformed and unrecognised data
//! rows; a corrupt neuron set and one of another model; unknown and out-of-range config keys;
//! an output that exists already; an output under a file.
//!
//! Each case asserts: exit code 1, no panic, a message that names the file, key, module or line,
//! and that the output path does not exist afterwards (or, when it existed, is unchanged).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{copy_dir, fixtures};

/// The good inputs every case starts from.
struct Env {
    _root: tempfile::TempDir,
    root: PathBuf,
    model: String,
    aligned: String,
    finetuned: String,
    masks: String,
    safety: String,
    general: String,
    harmful: String,
    task: String,
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn realign(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_realign"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = realign(&args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let harmful = root.join("harmful.jsonl");
    let rows: String = (0..6)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Explain how to do harmful thing number {i}\", \"completion\": \"Sure, here is how {i}.\"}}\n"
            )
        })
        .collect();
    std::fs::write(&harmful, rows).unwrap();
    let task = root.join("task.jsonl");
    let rows: String = (0..6)
        .map(|i| {
            let label = if i % 2 == 0 { "positive" } else { "negative" };
            format!("{{\"prompt\": \"Analyze the sentiment of the input, and respond only positive or negative.\\nInput: review {i}\", \"completion\": \"{label}\"}}\n")
        })
        .collect();
    std::fs::write(&task, rows).unwrap();
    let model = s(&fixtures().join("tiny-llama"));
    let aligned = s(&fixtures().join("tiny-llama-adapters/aligned"));
    let finetuned = s(&fixtures().join("tiny-llama-adapters/finetuned"));
    let masks = root.join("masks.safetensors");
    ok(&[
        "identify",
        "--model",
        &model,
        "--adapter",
        &aligned,
        "--data",
        &s(&harmful),
        "--max-samples",
        "2",
        "-o",
        &s(&masks),
    ]);
    let safety = root.join("safety.json");
    let general = root.join("general.json");
    for (corpus, out) in [(&harmful, &safety), (&task, &general)] {
        ok(&[
            "neurons",
            "detect",
            "--model",
            &model,
            "--corpus",
            &s(corpus),
            "--limit",
            "2",
            "-o",
            &s(out),
        ]);
    }
    Env {
        model,
        aligned,
        finetuned,
        masks: s(&masks),
        safety: s(&safety),
        general: s(&general),
        harmful: s(&harmful),
        task: s(&task),
        root,
        _root: dir,
    }
}

/// The flag values a case replaces; every other input is the good one.
#[derive(Default, Clone)]
struct Over {
    model: Option<String>,
    adapter: Option<String>,
    other: Option<String>,
    masks: Option<String>,
    data: Option<String>,
    set: Option<String>,
    config: Option<String>,
    out: Option<String>,
}

/// The commands, each with its good arguments: `(argv, output path)`.
const COMMANDS: &[&str] = &[
    "generate",
    "inspect",
    "train",
    "eval",
    "amplify",
    "identify",
    "identify overlap",
    "patch",
    "safelora",
    "diagnose",
    "resta",
    "safemerge",
    "antidote",
    "sn-tune",
    "neurons detect",
    "neurons deactivate",
    "neurons overlap",
    "data mix",
    "data export",
    "data stats",
    "experiment",
    "extract",
    "merge",
    "synthetic",
];

fn argv(cmd: &str, e: &Env, o: &Over, dir: &Path) -> (Vec<String>, Option<PathBuf>) {
    let pick = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_string());
    let model = pick(&o.model, &e.model);
    let out = PathBuf::from(pick(&o.out, &s(&dir.join("out"))));
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (args, writes) = match cmd {
        "generate" => {
            let mut a = v(&["generate", "--model", &model, "--prompt", "hi"]);
            a.extend(v(&["--max-new-tokens", "2"]));
            if let Some(ad) = &o.adapter {
                a.extend(v(&["--adapter", ad]));
            }
            (a, false)
        }
        "inspect" => (v(&["inspect", &pick(&o.adapter, &model)]), false),
        "train" => (
            v(&["train", "--config", o.config.as_deref().unwrap()]),
            true,
        ),
        "eval" => (
            v(&[
                "eval",
                "--model",
                &model,
                "--adapter",
                &pick(&o.adapter, &e.finetuned),
                "--harmful",
                &pick(&o.data, &e.harmful),
                "--task",
                "none",
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "amplify" => (
            v(&[
                "amplify",
                "--aligned",
                &pick(&o.adapter, &e.aligned),
                "--weak",
                &pick(&o.other, &e.finetuned),
                "--beta",
                "0.5",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "identify" => (
            v(&[
                "identify",
                "--model",
                &model,
                "--adapter",
                &pick(&o.adapter, &e.aligned),
                "--data",
                &pick(&o.data, &e.harmful),
                "--max-samples",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "identify overlap" => (
            v(&["identify", "overlap", &pick(&o.masks, &e.masks), &e.masks]),
            false,
        ),
        "patch" => (
            v(&[
                "patch",
                "--reference",
                &pick(&o.adapter, &e.aligned),
                "--finetuned",
                &pick(&o.other, &e.finetuned),
                "--masks",
                &pick(&o.masks, &e.masks),
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "safelora" => (
            v(&[
                "safelora",
                "--aligned",
                &pick(&o.adapter, &e.aligned),
                "--finetuned",
                &pick(&o.other, &e.finetuned),
                "--threshold",
                "0.5",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "diagnose" => (
            v(&[
                "diagnose",
                "--aligned",
                &pick(&o.adapter, &e.aligned),
                "--finetuned",
                &pick(&o.other, &e.finetuned),
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "resta" => (
            v(&[
                "resta",
                "--aligned",
                &pick(&o.adapter, &e.aligned),
                "--finetuned",
                &pick(&o.other, &e.finetuned),
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "safemerge" => (
            v(&[
                "safemerge",
                "--aligned",
                &pick(&o.adapter, &e.aligned),
                "--finetuned",
                &pick(&o.other, &e.finetuned),
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "antidote" => (
            v(&[
                "antidote",
                "--model",
                &model,
                "--aligned",
                &pick(&o.adapter, &e.aligned),
                "--finetuned",
                &pick(&o.other, &e.finetuned),
                "--max-samples",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "sn-tune" => (
            v(&[
                "sn-tune",
                "--model",
                &model,
                "--set",
                &pick(&o.set, &e.safety),
                "--data",
                &pick(&o.data, &e.harmful),
                "--docs",
                "2",
                "--max-steps",
                "1",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "neurons detect" => (
            v(&[
                "neurons",
                "detect",
                "--model",
                &model,
                "--corpus",
                &pick(&o.data, &e.harmful),
                "--limit",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "neurons deactivate" => (
            v(&[
                "neurons",
                "deactivate",
                "--model",
                &model,
                "--set",
                &pick(&o.set, &e.safety),
                "--harmful",
                &pick(&o.data, &e.harmful),
                "--task",
                "none",
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "neurons overlap" => (
            v(&["neurons", "overlap", &pick(&o.set, &e.safety), &e.general]),
            false,
        ),
        "data mix" => (
            v(&[
                "data",
                "mix",
                "--task",
                &e.task,
                "--harmful",
                &pick(&o.data, &e.harmful),
                "--n",
                "6",
                "--p",
                "0.5",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "data export" => (v(&["data", "export", "task_val", "-o", &s(&out)]), true),
        "extract" => (
            v(&[
                "extract",
                "--base",
                &e.model,
                "--finetuned",
                &model,
                "--rank",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "merge" => (
            v(&[
                "merge",
                "--model",
                &model,
                "--adapter",
                &pick(&o.adapter, &e.finetuned),
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "synthetic" => (
            v(&[
                "synthetic",
                "--shape",
                "tiny",
                "--tokenizer",
                &model,
                "--adapter-rank",
                "2",
                "-o",
                &s(&out),
            ]),
            true,
        ),
        "data stats" => (v(&["data", "stats", &pick(&o.data, &e.harmful)]), false),
        "experiment" => (
            v(&["experiment", o.config.as_deref().unwrap(), "-o", &s(&out)]),
            true,
        ),
        other => panic!("no command {other}"),
    };
    (args, writes.then_some(out))
}

/// One row of the table.
struct Case {
    name: String,
    cmd: &'static str,
    over: Over,
    /// Substrings the error message must contain.
    expect: Vec<String>,
    /// A file inside an existing output that must survive unchanged.
    keep: Option<PathBuf>,
}

// --- the bad inputs -------------------------------------------------------------------------

fn truncate(path: &Path, len: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..len.min(bytes.len())]).unwrap();
}

/// Sets the first value of the first tensor of a safetensors file to NaN; returns its name.
fn poison(path: &Path) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, info) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| *k != "__metadata__")
        .unwrap();
    assert_eq!(info["dtype"], "F32");
    let at = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
    name.clone()
}

/// An adapter like the aligned one whose `down_proj` of layer 1 has an A made for a 96-wide
/// input (the model's is 160).
fn misfit_adapter(e: &Env, dir: &Path) -> String {
    let mut ad = realign::adapters::Adapter::load(Path::new(&e.aligned), &Device::Cpu).unwrap();
    let m = ad.modules.get_mut("model.layers.1.mlp.down_proj").unwrap();
    m.a = Tensor::zeros((8, 96), DType::F32, &Device::Cpu).unwrap();
    let out = dir.join("misfit");
    ad.save(&out).unwrap();
    s(&out)
}

/// Masks like the good ones whose `down_proj` of layer 1 has an A mask of another shape.
fn misfit_masks(e: &Env, dir: &Path) -> String {
    let mut m = realign::nlsr::masks::load(Path::new(&e.masks), &Device::Cpu).unwrap();
    let k = m.modules.get_mut("model.layers.1.mlp.down_proj").unwrap();
    k.a = Tensor::ones((8, 96), DType::F32, &Device::Cpu).unwrap();
    let out = dir.join("misfit.safetensors");
    realign::nlsr::masks::save(&m, &out).unwrap();
    s(&out)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    s(&p)
}

/// Builds the case's bad input in `dir`.
type Make = Box<dyn Fn(&Env, &Path) -> (Over, Vec<String>)>;

/// A case whose bad input is one path (from `f`, with the expected message parts) put in the
/// flag that `set` names.
fn into(set: fn(&mut Over, String), f: fn(&Env, &Path) -> (String, Vec<String>)) -> Make {
    Box::new(move |e, d| {
        let (value, expect) = f(e, d);
        let mut o = Over::default();
        set(&mut o, value);
        (o, expect)
    })
}

fn model_cases() -> Vec<(&'static str, Make)> {
    let m = |f| into(|o, v| o.model = Some(v), f);
    fn copy(e: &Env, d: &Path) -> PathBuf {
        let p = d.join("model");
        copy_dir(Path::new(&e.model), &p);
        p
    }
    vec![
        (
            "model missing",
            m(|_, d| (s(&d.join("nope")), vec!["nope".into()])),
        ),
        (
            "model without config.json",
            m(|e, d| {
                let p = copy(e, d);
                std::fs::remove_file(p.join("config.json")).unwrap();
                (s(&p), vec!["config.json".into()])
            }),
        ),
        (
            "corrupt config.json",
            m(|e, d| {
                let p = copy(e, d);
                std::fs::write(p.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
                (s(&p), vec!["config.json".into(), "invalid JSON".into()])
            }),
        ),
        (
            "config.json value of the wrong type",
            m(|e, d| {
                let p = copy(e, d);
                let mut v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap())
                        .unwrap();
                v["hidden_size"] = serde_json::json!("64");
                std::fs::write(p.join("config.json"), v.to_string()).unwrap();
                (
                    s(&p),
                    vec!["config.json".into(), "key `hidden_size`".into()],
                )
            }),
        ),
        (
            "config.json that is not an object",
            m(|e, d| {
                let p = copy(e, d);
                std::fs::write(p.join("config.json"), "[1, 2]").unwrap();
                (
                    s(&p),
                    vec!["config.json".into(), "expected a JSON object".into()],
                )
            }),
        ),
        (
            "wrong model_type",
            m(|e, d| {
                let p = copy(e, d);
                let text = std::fs::read_to_string(p.join("config.json")).unwrap();
                std::fs::write(
                    p.join("config.json"),
                    text.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\""),
                )
                .unwrap();
                (s(&p), vec!["config.json".into(), "gpt2".into()])
            }),
        ),
        (
            "shard index naming a file outside the folder",
            m(|e, d| {
                let p = copy(e, d);
                std::fs::remove_file(p.join("model.safetensors")).unwrap();
                std::fs::write(
                    p.join("model.safetensors.index.json"),
                    r#"{"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}"#,
                )
                .unwrap();
                (
                    s(&p),
                    vec![
                        "model.safetensors.index.json".into(),
                        "../../etc/passwd".into(),
                        "expected the file name of a shard".into(),
                    ],
                )
            }),
        ),
        (
            "safetensors cut in the header",
            m(|e, d| {
                let p = copy(e, d);
                truncate(&p.join("model.safetensors"), 20);
                (s(&p), vec!["model.safetensors".into()])
            }),
        ),
        (
            "safetensors cut in the data",
            m(|e, d| {
                let p = copy(e, d);
                let n = std::fs::metadata(p.join("model.safetensors"))
                    .unwrap()
                    .len();
                truncate(&p.join("model.safetensors"), n as usize / 2);
                (s(&p), vec!["model.safetensors".into()])
            }),
        ),
        (
            "NaN weight",
            m(|e, d| {
                let p = copy(e, d);
                let name = poison(&p.join("model.safetensors"));
                (s(&p), vec!["model.safetensors".into(), name, "NaN".into()])
            }),
        ),
        (
            "GGUF cut in the header",
            m(|_, d| {
                let p = d.join("cut.gguf");
                // magic, version 3, then the tensor count cut short
                std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x05\x00").unwrap();
                (s(&p), vec!["cut.gguf".into(), "GGUF".into()])
            }),
        ),
    ]
}

fn adapter_cases() -> Vec<(&'static str, Make)> {
    let a = |f| into(|o, v| o.adapter = Some(v), f);
    fn copy(e: &Env, d: &Path) -> PathBuf {
        let p = d.join("adapter");
        copy_dir(Path::new(&e.aligned), &p);
        p
    }
    vec![
        (
            "adapter missing",
            a(|_, d| (s(&d.join("nope")), vec!["nope".into()])),
        ),
        (
            "corrupt adapter_config.json",
            a(|e, d| {
                let p = copy(e, d);
                std::fs::write(p.join("adapter_config.json"), "{\"r\": 8,").unwrap();
                (s(&p), vec!["adapter_config.json".into()])
            }),
        ),
        (
            "adapter_config.json value of the wrong type",
            a(|e, d| {
                let p = copy(e, d);
                let text = std::fs::read_to_string(p.join("adapter_config.json")).unwrap();
                let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v["r"] = serde_json::json!("8");
                std::fs::write(p.join("adapter_config.json"), v.to_string()).unwrap();
                (s(&p), vec!["adapter_config.json".into(), "key `r`".into()])
            }),
        ),
        (
            "adapter with lora_alpha 0",
            a(|e, d| {
                let p = copy(e, d);
                let text = std::fs::read_to_string(p.join("adapter_config.json")).unwrap();
                let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v["lora_alpha"] = serde_json::json!(0);
                std::fs::write(p.join("adapter_config.json"), v.to_string()).unwrap();
                (
                    s(&p),
                    vec!["adapter_config.json".into(), "lora_alpha is 0".into()],
                )
            }),
        ),
        (
            "adapter weights cut",
            a(|e, d| {
                let p = copy(e, d);
                truncate(&p.join("adapter_model.safetensors"), 100);
                (s(&p), vec!["adapter_model.safetensors".into()])
            }),
        ),
        (
            "adapter with NaN",
            a(|e, d| {
                let p = copy(e, d);
                let name = poison(&p.join("adapter_model.safetensors"));
                (
                    s(&p),
                    vec!["adapter_model.safetensors".into(), name, "NaN".into()],
                )
            }),
        ),
        (
            "adapter that does not fit",
            a(|e, d| {
                (
                    misfit_adapter(e, d),
                    vec!["model.layers.1.mlp.down_proj".into(), "96".into()],
                )
            }),
        ),
    ]
}

fn data_cases() -> Vec<(&'static str, Make)> {
    let dd = |f| into(|o, v| o.data = Some(v), f);
    vec![
        (
            "data missing",
            dd(|_, d| (s(&d.join("nope.jsonl")), vec!["nope.jsonl".into()])),
        ),
        (
            "data empty",
            dd(|_, d| {
                (
                    write(d, "empty.jsonl", ""),
                    vec!["empty.jsonl".into(), "no rows".into()],
                )
            }),
        ),
        (
            "data row 3 malformed",
            dd(|_, d| {
                (
                    write(
                        d,
                        "bad.jsonl",
                        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n{\"prompt\": oops\n",
                    ),
                    vec!["bad.jsonl".into(), "line 3".into()],
                )
            }),
        ),
        (
            "data row of unknown shape",
            dd(|_, d| {
                (
                    write(d, "odd.jsonl", "{\"foo\": \"a\"}\n"),
                    vec!["odd.jsonl".into(), "line 1".into(), "foo".into()],
                )
            }),
        ),
    ]
}

fn set_cases() -> Vec<(&'static str, Make)> {
    let st = |f| into(|o, v| o.set = Some(v), f);
    vec![
        (
            "neuron set corrupt",
            st(|_, d| {
                (
                    write(d, "set.json", "{\"format\": \"realign-neuron-set\", "),
                    vec!["set.json".into()],
                )
            }),
        ),
        (
            "neuron set missing",
            st(|_, d| (s(&d.join("nope.json")), vec!["nope.json".into()])),
        ),
    ]
}

fn config_cases() -> Vec<(&'static str, &'static str, Make)> {
    let c = |cmd: &'static str, name: &'static str, f: fn(&Env, &Path) -> (String, Vec<String>)| {
        let m: Make = Box::new(move |e, d| {
            let (config, expect) = f(e, d);
            (
                Over {
                    config: Some(config),
                    out: (cmd == "train").then(|| s(&d.join("run"))),
                    ..Default::default()
                },
                expect,
            )
        });
        (cmd, name, m)
    };
    fn train(e: &Env, d: &Path, extra: &str, optim: &str) -> String {
        write(
            d,
            "run.toml",
            &format!(
                "method = \"sft\"\noutput = \"{}\"\nmodel = \"{}\"\n{extra}\n[data]\ntrain = \"{}\"\n[optim]\n{optim}\n",
                s(&d.join("run")),
                e.model,
                e.harmful
            ),
        )
    }
    fn experiment(e: &Env, d: &Path, text: &str) -> String {
        write(d, "exp.toml", &format!("model = \"{}\"\n{text}", e.model))
    }
    vec![
        c("train", "config missing", |_, d| {
            (s(&d.join("nope.toml")), vec!["nope.toml".into()])
        }),
        c("train", "unknown config key", |e, d| {
            (
                train(e, d, "bogus = 1", ""),
                vec!["run.toml".into(), "bogus".into()],
            )
        }),
        c("train", "negative learning rate", |e, d| {
            (
                train(e, d, "", "lr = -1.0"),
                vec!["run.toml".into(), "lr".into()],
            )
        }),
        c("train", "lora rank 0", |e, d| {
            (
                train(e, d, "[lora]\nr = 0", ""),
                vec!["run.toml".into(), "lora.r".into()],
            )
        }),
        c("train", "warmup ratio above 1", |e, d| {
            (
                train(e, d, "", "warmup_ratio = 2.0"),
                vec!["run.toml".into(), "optim.warmup_ratio".into()],
            )
        }),
        c(
            "train",
            "no row fits max_length (no output folder left)",
            |e, d| {
                let p = train(e, d, "", "");
                let text = std::fs::read_to_string(&p)
                    .unwrap()
                    .replace("[data]\n", "[data]\nmax_length = 2\n");
                std::fs::write(&p, text).unwrap();
                (p, vec!["no training examples".into()])
            },
        ),
        c("train", "data file missing", |e, d| {
            let p = train(e, d, "", "");
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace(&e.harmful, "/nonexistent/rows.jsonl");
            std::fs::write(&p, text).unwrap();
            (p, vec!["/nonexistent/rows.jsonl".into()])
        }),
        c("experiment", "config missing", |_, d| {
            (s(&d.join("nope.toml")), vec!["nope.toml".into()])
        }),
        c("experiment", "unknown config key", |e, d| {
            (
                experiment(e, d, "bogus = 1\n"),
                vec!["exp.toml".into(), "bogus".into()],
            )
        }),
        c("experiment", "eval.batch_size = 0", |e, d| {
            (
                experiment(e, d, "[eval]\nbatch_size = 0\n"),
                vec!["exp.toml".into(), "eval.batch_size".into()],
            )
        }),
        c("experiment", "negative beta", |e, d| {
            (
                experiment(e, d, "[nlsr]\nbetas = [-1.0]\n"),
                vec!["exp.toml".into(), "nlsr.betas".into()],
            )
        }),
        c("experiment", "sparsity above 1", |e, d| {
            (
                experiment(e, d, "[nlsr]\nsparsities = [1.5]\n"),
                vec!["exp.toml".into(), "nlsr.sparsities".into()],
            )
        }),
        c("experiment", "epsilon out of range", |e, d| {
            (
                experiment(e, d, "[nlsr]\nepsilon = -0.1\n"),
                vec!["exp.toml".into(), "nlsr.epsilon".into()],
            )
        }),
        c("experiment", "attack of 0 rows", |e, d| {
            (
                experiment(e, d, "[attack]\nn = 0\n"),
                vec!["exp.toml".into(), "attack.n".into()],
            )
        }),
        c("experiment", "alignment learning rate 0", |e, d| {
            (
                experiment(
                    e,
                    d,
                    "[align.sft]\nmethod = \"sft\"\ndata = \"embedded:align_sft\"\nbeta = 0.1\nr = 16\nalpha = 32.0\nlr = 0.0\nepochs = 1\nbatch_size = 8\ngrad_accum = 1\nwarmup_ratio = 0.05\nmax_length = 192\nmax_rows = 0\n",
                ),
                vec!["exp.toml".into(), "align.sft.lr".into()],
            )
        }),
        c("experiment", "alignment rank beyond 2^16", |e, d| {
            (
                experiment(
                    e,
                    d,
                    "[align.sft]\nmethod = \"sft\"\ndata = \"embedded:align_sft\"\nbeta = 0.1\nr = 9223372036854775807\nalpha = 32.0\nlr = 0.0002\nepochs = 1\nbatch_size = 8\ngrad_accum = 1\nwarmup_ratio = 0.05\nmax_length = 192\nmax_rows = 0\n",
                ),
                vec!["exp.toml".into(), "align.sft.r".into()],
            )
        }),
        c("experiment", "harmful fraction above 1", |e, d| {
            (
                experiment(e, d, "[attack]\nps = [2.0]\n"),
                vec!["exp.toml".into(), "attack.ps".into()],
            )
        }),
    ]
}

/// The whole table.
fn cases(e: &Env) -> Vec<(Case, PathBuf)> {
    let mut out = Vec::new();
    let mut n = 0;
    let mut push = |cmd: &'static str, name: &str, make: &Make, out: &mut Vec<(Case, PathBuf)>| {
        n += 1;
        let dir = e.root.join(format!("case{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (over, expect) = make(e, &dir);
        out.push((
            Case {
                name: format!("{cmd}: {name}"),
                cmd,
                over,
                expect,
                keep: None,
            },
            dir,
        ));
    };
    let model_cmds = [
        "generate",
        "eval",
        "identify",
        "antidote",
        "sn-tune",
        "neurons detect",
        "neurons deactivate",
        "extract",
        "merge",
    ];
    for (name, make) in model_cases() {
        for cmd in model_cmds {
            push(cmd, name, &make, &mut out);
        }
    }
    for (name, make) in adapter_cases() {
        for cmd in [
            "generate",
            "eval",
            "identify",
            "amplify",
            "patch",
            "safelora",
            "diagnose",
            "resta",
            "safemerge",
            "antidote",
            "merge",
        ] {
            push(cmd, name, &make, &mut out);
        }
    }
    // the second adapter of the two-adapter commands
    for (name, make) in adapter_cases() {
        let second: Make = Box::new(move |e, d| {
            let (o, expect) = make(e, d);
            (
                Over {
                    other: o.adapter,
                    ..Default::default()
                },
                expect,
            )
        });
        for cmd in [
            "amplify",
            "patch",
            "safelora",
            "diagnose",
            "resta",
            "safemerge",
            "antidote",
        ] {
            push(cmd, &format!("second {name}"), &second, &mut out);
        }
    }
    push(
        "inspect",
        "adapter weights cut",
        &adapter_cases().remove(2).1,
        &mut out,
    );
    push(
        "inspect",
        "model missing",
        &model_cases().remove(0).1,
        &mut out,
    );
    let masks: Vec<(&str, Make)> = vec![
        (
            "masks of another adapter",
            Box::new(|e, d| {
                (
                    Over {
                        masks: Some(misfit_masks(e, d)),
                        ..Default::default()
                    },
                    vec!["model.layers.1.mlp.down_proj".into()],
                )
            }),
        ),
        (
            "masks cut",
            Box::new(|e, d| {
                let p = d.join("cut.safetensors");
                std::fs::copy(&e.masks, &p).unwrap();
                truncate(&p, 50);
                (
                    Over {
                        masks: Some(s(&p)),
                        ..Default::default()
                    },
                    vec!["cut.safetensors".into()],
                )
            }),
        ),
        (
            "masks missing",
            Box::new(|_, d| {
                (
                    Over {
                        masks: Some(s(&d.join("nope.safetensors"))),
                        ..Default::default()
                    },
                    vec!["nope.safetensors".into()],
                )
            }),
        ),
    ];
    for (name, make) in &masks {
        for cmd in ["patch", "identify overlap"] {
            push(cmd, name, make, &mut out);
        }
    }
    for (name, make) in data_cases() {
        for cmd in [
            "eval",
            "identify",
            "sn-tune",
            "neurons detect",
            "neurons deactivate",
            "data mix",
            "data stats",
        ] {
            push(cmd, name, &make, &mut out);
        }
    }
    for (name, make) in set_cases() {
        for cmd in ["sn-tune", "neurons deactivate", "neurons overlap"] {
            push(cmd, name, &make, &mut out);
        }
    }
    for (cmd, name, make) in config_cases() {
        push(cmd, name, &make, &mut out);
    }
    // outputs: one that exists (refused, untouched), one under a file
    let writers = [
        "eval",
        "amplify",
        "identify",
        "patch",
        "safelora",
        "diagnose",
        "resta",
        "safemerge",
        "antidote",
        "sn-tune",
        "neurons detect",
        "neurons deactivate",
        "data mix",
        "data export",
        "synthetic",
    ];
    for cmd in writers {
        let exists: Make = Box::new(|_, d| {
            let o = d.join("existing");
            std::fs::write(&o, "keep me").unwrap();
            (
                Over {
                    out: Some(s(&o)),
                    ..Default::default()
                },
                vec!["existing".into(), "--overwrite".into()],
            )
        });
        push(cmd, "output exists", &exists, &mut out);
        if let Some((c, _)) = out.last_mut() {
            c.keep = c.over.out.clone().map(PathBuf::from);
        }
        let under_file: Make = Box::new(|_, d| {
            let f = d.join("plainfile");
            std::fs::write(&f, "x").unwrap();
            (
                Over {
                    out: Some(s(&f.join("out"))),
                    ..Default::default()
                },
                vec!["plainfile".into()],
            )
        });
        push(cmd, "output under a file", &under_file, &mut out);
    }
    out
}

#[test]
fn every_command_refuses_every_bad_input_cleanly() {
    let e = env();
    let table = cases(&e);
    let mut failures = Vec::new();
    let mut covered = std::collections::BTreeSet::new();
    for (case, dir) in &table {
        covered.insert(case.cmd);
        let (args, output) = argv(case.cmd, &e, &case.over, dir);
        let kept = case.keep.as_ref().map(|p| std::fs::read(p).unwrap());
        let out = realign(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut wrong = Vec::new();
        if out.status.code() != Some(1) {
            wrong.push(format!("exit code {:?}", out.status.code()));
        }
        if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
            wrong.push("panic".into());
        }
        for want in &case.expect {
            if !err.contains(want.as_str()) {
                wrong.push(format!("message lacks {want:?}"));
            }
        }
        match (&case.keep, kept) {
            (Some(p), Some(before)) => {
                if std::fs::read(p).ok().as_deref() != Some(&before[..]) {
                    wrong.push(format!("{} was changed", p.display()));
                }
            }
            _ => {
                if let Some(o) = output.as_ref().filter(|o| o.exists()) {
                    wrong.push(format!("output {} exists", o.display()));
                }
            }
        }
        // no partial or temporary folder is left beside the output
        if let Some(parent) = output
            .as_ref()
            .and_then(|o| o.parent())
            .filter(|p| p.is_dir())
        {
            for entry in std::fs::read_dir(parent).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".partial-") || name.ends_with(".tmp") {
                    wrong.push(format!("left {name}"));
                }
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {wrong:?}\n    stderr: {}",
                case.name,
                err.trim()
            ));
        }
    }
    eprintln!(
        "{} bad-input cases over {} commands",
        table.len(),
        covered.len()
    );
    assert!(table.len() >= 60, "only {} cases", table.len());
    let missing: Vec<_> = COMMANDS.iter().filter(|c| !covered.contains(*c)).collect();
    assert!(missing.is_empty(), "commands without a case: {missing:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
}

#[test]
fn overwrite_replaces_an_existing_output_whole() {
    let e = env();
    let dir = e.root.join("ow");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("amplified");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    let (mut args, _) = argv(
        "amplify",
        &e,
        &Over {
            out: Some(s(&out)),
            ..Default::default()
        },
        &dir,
    );
    args.push("--overwrite".into());
    let o = realign(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("amplify_report.json").is_file());
    assert!(
        !out.join("stale.txt").exists(),
        "the old folder was not replaced whole"
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["amplified".to_string()], "{names:?}");
}

#[test]
fn writing_a_non_finite_tensor_is_refused_before_the_rename() {
    let dir = tempfile::tempdir().unwrap();
    let mut ad = realign::adapters::Adapter::load(
        &fixtures().join("tiny-llama-adapters/aligned"),
        &Device::Cpu,
    )
    .unwrap();
    let m = ad
        .modules
        .get_mut("model.layers.2.self_attn.v_proj")
        .unwrap();
    let mut b: Vec<f32> = m.b.flatten_all().unwrap().to_vec1().unwrap();
    b[3] = f32::INFINITY;
    b[7] = f32::NAN;
    m.b = Tensor::from_vec(b, m.b.dims(), &Device::Cpu).unwrap();
    let out = dir.path().join("out");
    let err = ad.save(&out).unwrap_err();
    assert!(
        matches!(&err, realign::Error::NonFinite { count: 2, tensor, .. }
            if tensor == "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"),
        "{err}"
    );
    // nothing under the weights' name, and no temporary file left
    let left: Vec<String> = std::fs::read_dir(&out)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.contains("adapter_model")),
        "{left:?}"
    );
}
