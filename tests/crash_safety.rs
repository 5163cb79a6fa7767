//! Crash-safe reruns and repeatable bytes (issue 15): `realign experiment` killed with SIGKILL
//! in the middle of a stage and rerun gives the same report as an uninterrupted run, and two
//! runs with the same seed write identical bytes for every adapter, mask, reply file and report
//! (timings excluded).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures;

fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
model = "{model}"
[align.sft]
method = "sft"
data = "embedded:safety_sft"
lr = 1e-3
max_rows = 8
batch_size = 4
max_length = 160
[align.dpo]
method = "dpo"
data = "embedded:safety_pref"
lr = 1e-3
max_rows = 4
batch_size = 2
max_length = 160
[attack]
n = 8
ps = [0.5]
[attack.train]
method = "sft"
lr = 1e-3
batch_size = 4
max_length = 160
[nlsr]
methods = ["low-rank", "random"]
betas = [0.9]
sparsities = [0.8]
layer_prunes = [0.5]
identify_samples = 4
[neurons]
enabled = false
[safelora]
thresholds = [0.5]
[eval]
harmful_limit = 3
task_limit = 2
overrefusal_limit = 3
harmful_max_new_tokens = 4
task_max_new_tokens = 4
overrefusal_max_new_tokens = 4
"#,
        model = fixtures().join("tiny-llama").display(),
    );
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn experiment(cfg: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_realign"));
    c.args([
        "experiment",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ])
    .env_remove("RUST_BACKTRACE")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn run_to_end(cfg: &Path, out: &Path) {
    let o = experiment(cfg, out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A JSON value without its timings (keys naming seconds, times, speeds or elapsed time).
fn scrub(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| {
                let k = k.to_lowercase();
                !(k.contains("second")
                    || k.contains("time")
                    || k.contains("per_s")
                    || k.contains("elapsed")
                    || k.contains("rss")
                    || k.contains("unix"))
            });
            m.values_mut().for_each(scrub);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// Every comparable file of a run: relative path → content (JSON scrubbed of timings and
/// memory peaks;
/// Markdown, logs and plots, which print timings, left out).
fn contents(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(out).unwrap().to_string_lossy().into_owned();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            let bytes = std::fs::read(&p).unwrap();
            // the run's own folder appears in recorded paths: compare it as `OUT`
            let bytes = if ext == "safetensors" {
                bytes
            } else {
                String::from_utf8_lossy(&bytes)
                    .replace(out.to_str().unwrap(), "OUT")
                    .into_bytes()
            };
            match ext {
                "json" => {
                    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    scrub(&mut v);
                    files.insert(rel, serde_json::to_vec(&v).unwrap());
                }
                "jsonl" => {
                    let mut lines = Vec::new();
                    for line in String::from_utf8(bytes).unwrap().lines() {
                        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
                        scrub(&mut v);
                        lines.extend(serde_json::to_vec(&v).unwrap());
                        lines.push(b'\n');
                    }
                    files.insert(rel, lines);
                }
                "safetensors" => {
                    files.insert(rel, bytes);
                }
                _ => {}
            }
        }
    }
    files
}

fn assert_same(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>, what: &str) {
    let names_a: Vec<_> = a.keys().collect();
    let names_b: Vec<_> = b.keys().collect();
    assert_eq!(names_a, names_b, "{what}: different files");
    for (k, v) in a {
        assert!(&b[k] == v, "{what}: {k} differs");
    }
}

#[test]
fn a_killed_experiment_resumes_to_the_same_bytes_and_same_seeds_repeat() {
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let killed = dir.path().join("killed");
    run_to_end(&cfg, &first);
    run_to_end(&cfg, &second);
    let reference = contents(&first);
    assert!(reference
        .keys()
        .any(|k| k.ends_with("adapter_model.safetensors")));
    assert!(reference.keys().any(|k| k.ends_with("report.json")));
    // same seed, same bytes: every adapter, mask, reply file and report
    assert_same(&reference, &contents(&second), "second run");

    // SIGKILL while a stage is being written (a `.partial` folder exists), after at least one
    // stage has finished
    let mut child = experiment(&cfg, &killed).spawn().unwrap();
    let start = Instant::now();
    let mut caught_mid_stage = false;
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let stages = killed.join("stages");
        if let Ok(entries) = std::fs::read_dir(&stages) {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let done = names.iter().filter(|n| !n.contains("partial")).count();
            let partial = names.iter().any(|n| n.contains("partial"));
            if done >= 2 && partial {
                child.kill().unwrap(); // SIGKILL on Unix
                caught_mid_stage = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.wait();
    assert!(
        caught_mid_stage,
        "the run ended before a stage could be interrupted"
    );
    assert!(!killed.join("report/report.json").exists());
    run_to_end(&cfg, &killed);
    let resumed = contents(&killed);
    assert_same(&reference, &resumed, "killed and resumed run");
    // no partial folder is left behind
    let left: Vec<_> = std::fs::read_dir(killed.join("stages"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Two runs on one output folder: the second stops at once, names the holder and writes
/// nothing; the hold ends with its holder.
#[test]
fn a_second_run_on_the_same_folder_stops_at_once() {
    use realign::fsutil::DirLock;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let hold = DirLock::acquire(&out).unwrap();
    let text = std::fs::read_to_string(out.join(DirLock::FILE)).unwrap();
    let me = format!("pid {}, since ", std::process::id());
    assert!(text.starts_with(&me), "{text}");
    // Another open of the lock file is refused, even in the same process.
    let err = DirLock::acquire(&out).unwrap_err().to_string();
    assert!(
        err.contains(&format!("out is in use by another realign run ({me}")),
        "{err}"
    );
    let cfg = config(dir.path());
    let o = experiment(&cfg, &out).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is in use by another realign run") && err.contains(&me),
        "{err}"
    );
    assert!(!out.join("stages").exists());
    assert!(!out.join("experiment.toml").exists());
    drop(hold);
    // The hold ended with its holder: the folder can be held again.
    DirLock::acquire(&out).unwrap();
}

/// The hidden partial folders beside `out`.
fn partials(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.partial-")))
        .collect()
}

/// A long `realign eval` into `out`, started, and waited for until its partial folder exists.
fn eval_until_partial(out: &Path) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_realign"))
        .args([
            "eval",
            "--model",
            fixtures().join("tiny-llama").to_str().unwrap(),
            "--limit",
            "200",
            "--max-new-tokens",
            "400",
            "-o",
            out.to_str().unwrap(),
        ])
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while partials(out).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no partial folder"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Ctrl-C (SIGINT) in the middle of an output removes its partial folder and exits with 130;
/// a run killed outright (SIGKILL) leaves its partial folder, which the next writer of the same
/// output removes.
#[test]
fn an_interrupted_command_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ev");
    let child = eval_until_partial(&out);
    // SAFETY: sends a signal to the child this test spawned.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: removed the partial output"),
        "{err}"
    );
    assert!(partials(&out).is_empty(), "{:?}", partials(&out));
    assert!(!out.exists());

    let mut child = eval_until_partial(&out);
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = partials(&out);
    assert_eq!(stale.len(), 1, "{stale:?}");
    // The next writer of `ev` removes the dead process's folder (and finishes its own).
    let o = Command::new(env!("CARGO_BIN_EXE_realign"))
        .args([
            "eval",
            "--model",
            fixtures().join("tiny-llama").to_str().unwrap(),
            "--limit",
            "1",
            "--max-new-tokens",
            "2",
            "-o",
            out.to_str().unwrap(),
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(partials(&out).is_empty(), "{:?}", partials(&out));
    assert!(out.join("summary.json").exists());
}

/// Ctrl-C or SIGTERM while an experiment stage is being written removes the stage's
/// `.partial` folder (it could never be resumed) and exits with 130; a rerun finishes to
/// the same bytes as an uninterrupted run.
#[test]
fn an_interrupted_experiment_stage_leaves_no_partial_folder() {
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let reference = dir.path().join("reference");
    run_to_end(&cfg, &reference);
    let reference = contents(&reference);
    for (signal, out) in [(libc::SIGINT, "int"), (libc::SIGTERM, "term")] {
        let out = dir.path().join(out);
        let child = experiment(&cfg, &out).spawn().unwrap();
        let start = Instant::now();
        let mut caught = false;
        while start.elapsed() < Duration::from_secs(120) {
            let names: Vec<String> = std::fs::read_dir(out.join("stages"))
                .map(|e| {
                    e.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if names.iter().filter(|n| !n.contains("partial")).count() >= 2
                && names.iter().any(|n| n.ends_with(".partial"))
            {
                // SAFETY: sends a signal to the child this test spawned.
                assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
                caught = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let o = child.wait_with_output().unwrap();
        assert!(caught, "the run ended before a stage could be interrupted");
        assert_eq!(
            o.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let left: Vec<String> = std::fs::read_dir(out.join("stages"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(!out.join("report").exists());
        run_to_end(&cfg, &out);
        assert_same(&reference, &contents(&out), "interrupted and resumed run");
    }
}
