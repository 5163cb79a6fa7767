//! `realign experiment` in miniature: the whole stage graph on the tiny fixture model with a
//! few rows of the embedded data, end to end; a rerun resumes from the cache; a changed
//! setting reruns exactly the stages downstream of it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fixtures;
use realign::experiment::{self, ExperimentConfig, Silent};

fn miniature(out: &Path, neurons: bool) -> ExperimentConfig {
    let text = format!(
        r#"
model = "{model}"
output = "{out}"
seeds = [42, 7]
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
ps = [0.25, 0.5]
[attack.train]
method = "sft"
lr = 1e-3
batch_size = 4
max_length = 160
[nlsr]
methods = ["low-rank", "wanda", "random"]
betas = [0.9, 0]
sparsities = [0.8, 0.5]
layer_prunes = [0.5, 0.25]
identify_samples = 4
[neurons]
enabled = {neurons}
prompts = 3
top_k = 8
tune_docs = 4
tune_lr = 1e-3
[safelora]
thresholds = [0.5, 0.2]
[eval]
harmful_limit = 3
task_limit = 2
overrefusal_limit = 3
harmful_max_new_tokens = 4
task_max_new_tokens = 4
overrefusal_max_new_tokens = 4
"#,
        model = fixtures().join("tiny-llama").display(),
        out = out.display(),
    );
    let path = out.with_extension("toml");
    std::fs::write(&path, text).unwrap();
    ExperimentConfig::from_file(&path).unwrap()
}

/// An observer that keeps the summary of every stage that ran (cached ones included).
#[derive(Default)]
struct Recorder {
    ends: Vec<String>,
}

impl experiment::Observer for Recorder {
    fn plan(&mut self, _: usize) {}
    fn stage_start(&mut self, _: usize, _: &str, _: bool) {}
    fn stage_progress(&mut self, _: usize, _: usize, _: &str) {}
    fn stage_end(&mut self, name: &str, _: f64, summary: &str) {
        self.ends.push(format!("{name}: {summary}"));
    }
}

/// Stage folder name → modification time of its record.
fn stage_times(out: &Path) -> BTreeMap<String, std::time::SystemTime> {
    std::fs::read_dir(out.join("stages"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let t = std::fs::metadata(e.path().join("stage.json"))
                .unwrap()
                .modified()
                .unwrap();
            (e.file_name().to_string_lossy().into_owned(), t)
        })
        .collect()
}

#[test]
fn miniature_experiment_runs_resumes_and_reruns_only_what_changed() {
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let cfg = miniature(&out, true);
    let mut log = Recorder::default();
    let report = experiment::run(&cfg, &mut log).unwrap();

    // Memory: every stage's log line ends with its peak resident size and the process's, and
    // report.json carries both (read from /proc, so on Linux only).
    if cfg!(target_os = "linux") {
        assert_eq!(log.ends.len(), report.times.len());
        let run_peak = report.peak_rss_mib.expect("the run's peak RSS");
        // the tiny model and the embedded data take more than 1 MiB and far less than 24 GiB
        assert!((1.0..24_576.0).contains(&run_peak), "{run_peak}");
        for (line, t) in log.ends.iter().zip(&report.times) {
            let peak = t.peak_rss_mib.expect("a stage's peak RSS");
            assert!(peak > 0.0 && peak <= run_peak + 0.5, "{peak} vs {run_peak}");
            let note = format!("; peak RSS {peak:.0} MiB (process ");
            assert!(line.contains(&note) && line.ends_with(" MiB)"), "{line}");
        }
    }

    // Every planned row is in the report, with percentages over the requested counts.
    let labels: Vec<&str> = report
        .evals
        .iter()
        .map(|r| r.variant.label.as_str())
        .collect();
    for want in [
        "Non-aligned",
        "Aligned (W_a, DPO)",
        "Attacked p=0.25",
        "Attacked p=0.5",
        "Safe LoRA p=0.5",
        "Safe LoRA p=0.25 tau=0.2",
        "Amplified (W_e, beta=0.9)",
        "NLSR (random) p=0.25",
        "NLSR (low-rank) p=0.25",
        "NLSR (low-rank, no pre-amplification) p=0.5",
        "Aligned, Deact-SN",
        "Aligned, Deact-R",
        "SN-Tune",
        "RSN-Tune + task fine-tuning",
    ] {
        assert!(labels.contains(&want), "{want} missing from {labels:?}");
    }
    for r in &report.evals {
        assert_eq!((r.n_harmful, r.n_task), (3, 2), "{}", r.variant.label);
        assert!((0.0..=100.0).contains(&r.hs) && (0.0..=100.0).contains(&r.fa));
        // 3 prompts: the score is a multiple of 100/3
        let k = r.hs * 3.0 / 100.0;
        assert!((k - k.round()).abs() < 1e-9, "{}", r.hs);
        // every number comes with its count, n and 95 % interval
        let hs = r.hs_rate.expect("hs interval");
        assert_eq!((hs.n, hs.k as f64), (3, k.round()));
        assert!(hs.lo <= hs.percent && hs.percent <= hs.hi);
        assert_eq!(r.fa_rate.expect("fa interval").n, 2);
        assert_eq!(r.or_rate.expect("or interval").n, 3);
        let nd = r.hs_nondegenerate_rate.expect("non-degenerate HS");
        assert!(nd.k <= r.hs_keyword_rate.unwrap().k);
    }
    // Safe LoRA rows say how many modules were projected
    let sl = report
        .evals
        .iter()
        .find(|r| r.variant.label == "Safe LoRA p=0.5")
        .unwrap();
    let (k, n) = sl.projected.expect("projected modules");
    assert!(n > 0 && k <= n);
    // The random-mask control has the density of the low-rank masks it stands beside.
    let density = |name: &str| {
        report
            .identify
            .iter()
            .find(|(k, _)| k.starts_with(name))
            .map(|(_, v)| v["density"].as_f64().unwrap())
            .unwrap()
    };
    let (low, random) = (
        density("identify-low-rank-s0.8-b0.9"),
        density("identify-random-s0.8-b0.9"),
    );
    assert!(
        (low - random).abs() < 1e-3,
        "low-rank {low} vs random {random}"
    );
    assert!((low - 0.2).abs() < 0.01, "{low}");
    assert!(!report.findings.is_empty());
    // The sweep rows at the main setting reuse the main evaluation stage.
    let main = report
        .evals
        .iter()
        .find(|r| r.variant.label == "NLSR (low-rank) p=0.25")
        .unwrap();
    let sweep = report
        .evals
        .iter()
        .find(|r| r.variant.group == "sweep-beta" && r.variant.param == Some(0.9))
        .unwrap();
    assert_eq!(main.stage, sweep.stage);

    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        md.contains("| method | HS ↓ p=0.25 | FA ↑ p=0.25 | HS ↓ p=0.5 | FA ↑ p=0.5 |"),
        "{md}"
    );
    assert!(md.contains("## Effect of pre-amplification"));
    assert!(md.contains("## Comparisons (95 % intervals)"), "{md}");
    // a second seed reruns the attack-to-repair chain and the report gives mean ± sd
    assert!(
        labels.contains(&"NLSR (random) p=0.25 seed=7"),
        "{labels:?}"
    );
    assert!(md.contains("## Across seeds [42, 7]"), "{md}");
    assert!(md.contains("| Attacked | 0.25 | 2 |"), "{md}");
    assert!(md.contains("## Safe LoRA's threshold"), "{md}");
    assert!(md.contains("## Safety neurons"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report/report.json")).unwrap())
            .unwrap();
    assert_eq!(json["evals"].as_array().unwrap().len(), report.evals.len());
    assert_eq!(json["peak_rss_mib"].as_f64(), report.peak_rss_mib);
    for (j, t) in json["times"].as_array().unwrap().iter().zip(&report.times) {
        assert_eq!(j["peak_rss_mib"].as_f64(), t.peak_rss_mib);
    }
    assert!(
        md.contains("## Wall time and peak memory per stage"),
        "{md}"
    );
    assert!(out.join("report/index.md").is_file());

    // A rerun finds every stage finished and touches none.
    let before = stage_times(&out);
    assert!(!before.keys().any(|k| k.ends_with(".partial")));
    let again = experiment::run(&cfg, &mut Silent).unwrap();
    assert_eq!(stage_times(&out), before);
    // cached stages keep the peak of the run that produced them, like their time
    assert_eq!(
        serde_json::to_value(&again.times).unwrap(),
        serde_json::to_value(&report.times).unwrap()
    );
    assert_eq!(
        serde_json::to_value(&again.evals).unwrap(),
        serde_json::to_value(&report.evals).unwrap()
    );

    // A new attack learning rate: alignment is reused, every attack-dependent stage is new.
    let mut changed = cfg.clone();
    changed.attack.train.lr = 5e-4;
    experiment::run(&changed, &mut Silent).unwrap();
    let after = stage_times(&out);
    for (name, t) in &before {
        if name.starts_with("sft-") || name.starts_with("dpo-") || name.starts_with("mix-") {
            assert_eq!(after.get(name), Some(t), "{name} should be reused");
        }
    }
    let new: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(
        new.iter().any(|k| k.starts_with("attack-p0.25-")),
        "{new:?}"
    );
    assert!(new.iter().any(|k| k.starts_with("patch-")), "{new:?}");
    assert!(
        !new.iter()
            .any(|k| k.starts_with("sft-") || k.starts_with("dpo-")),
        "{new:?}"
    );
}
