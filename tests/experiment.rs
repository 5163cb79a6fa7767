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
random_draws = 3
[safelora]
thresholds = [0.5, 0.2]
[baselines]
antidote_samples = 3
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

    // Stages are written in `NAME-KEY.partial/` and renamed: no record names that folder, and
    // a training stage's report names the adapter where it is.
    let mut trained = 0;
    for stage in std::fs::read_dir(out.join("stages")).unwrap().flatten() {
        for file in std::fs::read_dir(stage.path()).unwrap().flatten() {
            let p = file.path();
            if p.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&p).unwrap();
                assert!(!text.contains(".partial"), "{}", p.display());
            }
            if p.file_name().is_some_and(|n| n == "train_report.json") {
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                assert_eq!(
                    v["adapter"].as_str().unwrap(),
                    stage.path().to_str().unwrap()
                );
                assert_eq!(v["config"]["output"], v["adapter"]);
                trained += 1;
            }
        }
    }
    assert!(trained >= 4, "{trained} training stages");

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
        "RESTA p=0.25",
        "SafeMERGE p=0.5",
        "Antidote p=0.25",
        "NLSR (low-rank) p=0.25",
        "NLSR (low-rank, no pre-amplification) p=0.5",
        "Aligned, Deact-SN",
        "Aligned, Deact-R",
        "Aligned, Deact-R (draw 2)",
        "Aligned, Deact-R (draw 3)",
        "Aligned, Deact-F",
        "SN-Tune",
        "RSN-Tune + task fine-tuning",
        "SN-Tune, random set (control)",
        "SN-Tune, foundation set (control)",
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
    // SN-Tune's controls train as many neurons as the safety set; RSN-Tune no more (S \ F).
    let trained = |stage: &str| {
        let r = &report.sn_tune[stage];
        (
            r["neurons"].as_u64().unwrap(),
            r["safety_neurons"].as_u64().unwrap(),
        )
    };
    let (sn_n, safety_n) = trained("sn-tune");
    assert_eq!(sn_n, safety_n);
    assert_eq!(trained("sn-tune-random"), (safety_n, safety_n));
    assert_eq!(trained("sn-tune-foundation"), (safety_n, safety_n));
    assert!(trained("rsn-tune").0 <= safety_n);

    // The tuned models' perplexity, against the base model's on the same general-text rows:
    // the reference is the library's perplexity of the untouched base model, whatever the row.
    let base_ppl = {
        use realign::experiment::stages::{PPL_MAX_TOKENS, PPL_OFFSET, PPL_ROWS};
        let base =
            realign::model::LoadedModel::load(&fixtures().join("tiny-llama"), &Default::default())
                .unwrap();
        let texts: Vec<String> = realign::data::load_source("embedded:general_text")
            .unwrap()
            .iter()
            .skip(PPL_OFFSET)
            .take(PPL_ROWS)
            .map(|r| r.prompt().plain_text())
            .collect();
        realign::neurons::perplexity(&base.model, &base.tokenizer, &texts, PPL_MAX_TOKENS).unwrap()
    };
    for label in [
        "SN-Tune",
        "RSN-Tune",
        "SN-Tune, random set (control)",
        "SN-Tune, foundation set (control)",
        "Non-aligned + task fine-tuning",
        "SN-Tune + task fine-tuning",
        "RSN-Tune + task fine-tuning",
    ] {
        let r = report
            .evals
            .iter()
            .find(|r| r.variant.label == label)
            .unwrap();
        let (p, u) = r.perplexity.expect(label);
        assert_eq!(u, base_ppl.perplexity, "{label}");
        let i = r.perplexity_intervals.expect(label);
        assert_eq!(i.texts, base_ppl.texts);
        assert_eq!(i.untouched_interval, base_ppl.interval, "{label}");
        let [lo, hi] = i.interval.unwrap();
        assert!(lo < p && p < hi, "{label}: {lo} {p} {hi}");
        let [lo, hi] = i.ratio_interval.unwrap();
        assert!(lo <= p / u && p / u <= hi, "{label}: {lo} {} {hi}", p / u);
    }
    let md = report.markdown();
    assert!(md.contains("- SN-Tune perplexity "), "{md}");
    // The references' rows show them: the base model's for the tuned rows, the aligned
    // model's (before deactivation) for the Deact rows.
    let deact = report
        .evals
        .iter()
        .find(|r| r.variant.label == "Aligned, Deact-SN")
        .unwrap();
    for (row, r) in [
        ("| Non-aligned (before SN-Tune) |", base_ppl.perplexity),
        (
            "| Aligned (W_a), none deactivated |",
            deact.perplexity.unwrap().1,
        ),
    ] {
        let line = md.lines().find(|l| l.starts_with(row)).expect(row);
        assert!(line.contains(&format!(" {r:.1} [")), "{line}");
        assert!(line.ends_with("(reference) |"), "{line}");
    }

    // Deact-SN placed among the three Deact-R draws (seeds 42, 43, 44), by the rows' counts.
    assert_eq!(
        report.against_random.len(),
        2,
        "keyword and non-degenerate HS"
    );
    let row = |label: &str| {
        report
            .evals
            .iter()
            .find(|r| r.variant.label == label)
            .unwrap()
    };
    let sn_k = row("Aligned, Deact-SN").hs_keyword_rate.unwrap().k;
    let draws = [
        "Aligned, Deact-R",
        "Aligned, Deact-R (draw 2)",
        "Aligned, Deact-R (draw 3)",
    ];
    let high = draws
        .iter()
        .filter(|l| row(l).hs_keyword_rate.unwrap().k >= sn_k)
        .count();
    let kw = &report.against_random[0];
    assert_eq!(kw.seeds, vec![42, 43, 44]);
    assert_eq!(kw.at_least_as_high, high);

    // Every row names its model's files, and `realign eval` given the flags the report prints
    // writes the very replies the experiment's evaluation wrote.
    let sn = row("Aligned, Deact-SN");
    assert!(sn.model_files.deactivated.is_some());
    assert!(sn.model_files.eval_flags(None).is_none());
    assert!(report
        .markdown()
        .contains("## The models, to evaluate on other sets"));
    for label in ["Aligned (W_a, DPO)", "NLSR (low-rank) p=0.25", "SN-Tune"] {
        let r = report
            .evals
            .iter()
            .find(|r| r.variant.label == label && r.variant.seed == 42)
            .unwrap();
        let files = &r.model_files;
        assert!(
            !files.adapters.is_empty() || files.full_model.is_some(),
            "{label}"
        );
        for a in &files.adapters {
            assert!(Path::new(a).join("adapter_config.json").is_file(), "{a}");
        }
        let flags = files.eval_flags(report.base_model.as_deref()).unwrap();
        assert!(report.markdown().contains(&flags), "{flags}");
        let again = dir.path().join(format!("again-{}", r.stage));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_realign"))
            .arg("eval")
            .args(flags.split_whitespace())
            .args(["--harmful", "embedded:harmful_eval", "--task", "none"])
            .args(["--benign", "none", "--limit", "3", "--sample-seed", "42"])
            .args(["--harmful-max-new-tokens", "4", "-o"])
            .arg(&again)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let replies = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reply"].to_string())
                .collect()
        };
        let stage_dir = std::fs::read_dir(out.join("stages"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.rsplit_once('-').is_some_and(|(n, _)| n == r.stage)
            })
            .unwrap();
        let want = replies(&stage_dir.join("harmful/harmful.jsonl"));
        assert_eq!(want.len(), 3);
        assert_eq!(replies(&again.join("harmful.jsonl")), want, "{label}");
    }
    assert_eq!(kw.p_value, (1 + high) as f64 / 4.0);
    // three draws are three different random sets: three evaluation stages
    let stages: std::collections::BTreeSet<&str> =
        draws.iter().map(|l| row(l).stage.as_str()).collect();
    assert_eq!(stages.len(), 3, "{stages:?}");
    // Safe LoRA rows say how many modules were projected
    let sl = report
        .evals
        .iter()
        .find(|r| r.variant.label == "Safe LoRA p=0.5")
        .unwrap();
    let (k, n) = sl.projected.expect("projected modules");
    assert!(n > 0 && k <= n);
    // The peers' repairs wrote their reports: Antidote pruned round(0.2 n) entries of every
    // module's update; SafeMERGE merged only modules below its threshold.
    let stage_dir = |prefix: &str| {
        std::fs::read_dir(out.join("stages"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no stage {prefix}"))
    };
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let antidote = read(stage_dir("antidote-p0.25-").join("antidote_report.json"));
    for m in antidote["modules"].as_array().unwrap() {
        let n = m["entries"].as_u64().unwrap() as f64;
        assert_eq!(
            m["pruned"].as_u64().unwrap(),
            (0.2 * n).round() as u64,
            "{m}"
        );
    }
    let merge = read(stage_dir("safemerge-p0.5-").join("safemerge_report.json"));
    for m in merge["modules"].as_array().unwrap() {
        assert_eq!(
            m["merged"].as_bool().unwrap(),
            m["cosine"].as_f64().unwrap() < 0.5,
            "{m}"
        );
    }
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
    // Each swept sparsity also has its random-mask control: at the main sparsity it is the
    // main random row's stage, elsewhere its own, never the identified masks' stage.
    let at = |label: &str| {
        report
            .evals
            .iter()
            .find(|r| r.variant.group == "sweep-sparsity" && r.variant.label == label)
            .unwrap_or_else(|| panic!("{label} missing"))
    };
    let main_random = report
        .evals
        .iter()
        .find(|r| r.variant.label == "NLSR (random) p=0.25")
        .unwrap();
    assert_eq!(
        at("NLSR (random) p=0.25 sparsity=0.8").stage,
        main_random.stage
    );
    let (r5, l5) = (
        at("NLSR (random) p=0.25 sparsity=0.5"),
        at("NLSR (low-rank) p=0.25 sparsity=0.5"),
    );
    assert_ne!(r5.stage, l5.stage);
    assert_ne!(r5.stage, main_random.stage);
    assert_eq!(r5.variant.param, Some(0.5));

    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        md.contains("| method | HS ↓ p=0.25 | FA ↑ p=0.25 | HS ↓ p=0.5 | FA ↑ p=0.5 |"),
        "{md}"
    );
    assert!(md.contains("## Effect of pre-amplification"));
    assert!(
        md.contains("| 0.5 | NLSR (low-rank) p=0.25 sparsity=0.5 | ")
            && md.contains("| 0.5 | NLSR (random) p=0.25 sparsity=0.5 | "),
        "{md}"
    );
    assert!(md.contains("## Comparisons (95 % intervals)"), "{md}");
    // a second seed reruns the attack-to-repair chain and the report gives mean ± sd
    assert!(
        labels.contains(&"NLSR (random) p=0.25 seed=7"),
        "{labels:?}"
    );
    assert!(md.contains("## Across seeds [42, 7]"), "{md}");
    assert!(md.contains("| Attacked | 0.25 | 2 |"), "{md}");
    // NLSR against its random-mask control, seed by seed, from the same rows
    let hs = |label: &str| {
        report
            .evals
            .iter()
            .find(|r| r.variant.label == label)
            .unwrap_or_else(|| panic!("{label} missing"))
            .hs
    };
    let diffs = [
        hs("NLSR (low-rank) p=0.25") - hs("NLSR (random) p=0.25"),
        hs("NLSR (low-rank) p=0.25 seed=7") - hs("NLSR (random) p=0.25 seed=7"),
    ];
    let line = format!(
        "- NLSR (low-rank) p=0.25 against NLSR (random): HS lower at {} of 2 seeds",
        diffs.iter().filter(|d| **d < 0.0).count()
    );
    assert!(md.contains(&line), "{line}\n{md}");
    assert!(
        md.contains(&format!("(per seed: {:+.1}, {:+.1})", diffs[0], diffs[1])),
        "{md}"
    );
    assert!(md.contains("## Safe LoRA's threshold"), "{md}");
    assert!(md.contains("## Safety neurons"));
    // The neuron table carries over-refusal with its interval, as every other table.
    let sn = report
        .evals
        .iter()
        .find(|e| e.variant.label == "SN-Tune")
        .unwrap();
    let or = sn.or_rate.unwrap();
    let row = format!(
        "| SN-Tune | {:.1} [{:.1}, {:.1}] |",
        sn.hs_rate.unwrap().percent,
        sn.hs_rate.unwrap().lo,
        sn.hs_rate.unwrap().hi
    );
    let line = md
        .lines()
        .find(|l| l.starts_with(&row))
        .expect("the SN-Tune row");
    let (p, _) = sn.perplexity.unwrap();
    let [lo, hi] = sn.perplexity_intervals.unwrap().interval.unwrap();
    assert!(
        line.contains(&format!(
            " {:.1} [{:.1}, {:.1}] | {p:.1} [{lo:.1}, {hi:.1}] (×",
            or.percent, or.lo, or.hi
        )),
        "{line}"
    );
    // SN-Tune against its two controls, in words.
    for control in [
        "SN-Tune, random set (control)",
        "SN-Tune, foundation set (control)",
    ] {
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.starts_with("SN-Tune (HS ") && f.contains(control)),
            "{:?}",
            report.findings
        );
    }
    assert!(
        md.contains(&format!("- {}", report.against_random[0].sentence()))
            && md.contains("against 3 random draws of the same structure"),
        "{md}"
    );
    // The intake check: one `diagnose` per attacked adapter of the main seed, each the
    // statistic `realign diagnose` computes on the same two adapters.
    assert!(
        md.contains("## Intake check of each fine-tune (`realign diagnose`, adapters only)"),
        "{md}"
    );
    assert!(
        md.contains("Spearman's ρ over these 2 fine-tunes: D vs p "),
        "{md}"
    );
    assert_eq!(report.diagnose.len(), 2);
    let stage_dir = |name: &str| {
        std::fs::read_dir(out.join("stages"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let f = p.file_name().unwrap().to_string_lossy().into_owned();
                f.strip_prefix(&format!("{name}-"))
                    .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
            })
            .unwrap()
    };
    let dev = candle_core::Device::Cpu;
    let wa = realign::adapters::Adapter::load(&stage_dir("dpo"), &dev).unwrap();
    for v in &report.diagnose {
        let p = v["p"].as_f64().unwrap();
        let wt =
            realign::adapters::Adapter::load(&stage_dir(&format!("attack-p{p}")), &dev).unwrap();
        let d = realign::diagnose::diagnose(&wa, &wt, None, None, &Default::default()).unwrap();
        // (serde_json reads floats back to within an ulp)
        assert!((v["drift"].as_f64().unwrap() - d.drift).abs() < 1e-12);
        assert!(
            md.contains(&format!("| {p} | {:.4} | {:.4} |", d.drift, d.update_drift)),
            "{md}"
        );
    }
    // The shrink control repairs the modules the low-rank patch repairs, each factor moved
    // toward the reference by its mask density; every other module is W_t's unchanged.
    assert!(labels.contains(&"NLSR (shrink) p=0.25"), "{labels:?}");
    assert!(md.contains(" NLSR (shrink) (HS "), "{md}");
    let (e, t) = (
        realign::adapters::Adapter::load(&stage_dir("amplify-b0.9"), &dev).unwrap(),
        realign::adapters::Adapter::load(&stage_dir("attack-p0.25"), &dev).unwrap(),
    );
    let masks = realign::nlsr::masks::load(
        &stage_dir("identify-low-rank-s0.8-b0.9").join("masks.safetensors"),
        &dev,
    )
    .unwrap();
    let shrunk_dir = stage_dir("patch-low-rank-s0.8-b0.9-lp0.5-p0.25-shrink");
    let shrunk = realign::adapters::Adapter::load(&shrunk_dir, &dev).unwrap();
    let shrunk_report = read(shrunk_dir.join("patch_report.json"));
    let replaced_report =
        read(stage_dir("patch-low-rank-s0.8-b0.9-lp0.5-p0.25").join("patch_report.json"));
    let flags = |r: &serde_json::Value| -> Vec<bool> {
        r["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["patched"].as_bool().unwrap())
            .collect()
    };
    assert_eq!(flags(&shrunk_report), flags(&replaced_report));
    assert!(flags(&shrunk_report).contains(&true));
    for m in shrunk_report["modules"].as_array().unwrap() {
        let path = m["module"].as_str().unwrap();
        let got = &shrunk.modules[path];
        let want = if m["patched"].as_bool().unwrap() {
            realign::nlsr::transplant::shrink(
                &e.modules[path],
                &t.modules[path],
                &masks.modules[path],
            )
            .unwrap()
        } else {
            t.modules[path].clone()
        };
        for (g, w) in [(&got.a, &want.a), (&got.b, &want.b)] {
            assert_eq!(
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{path}"
            );
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report/report.json")).unwrap())
            .unwrap();
    assert_eq!(json["evals"].as_array().unwrap().len(), report.evals.len());
    assert_eq!(json["peak_rss_mib"].as_f64(), report.peak_rss_mib);
    // The machine is recorded beside the times: report.json's `host` reads back as this
    // process's, and report.md names it above the table of times.
    let host = realign::host::Host::detect();
    assert!(host.threads >= 1 && ["avx512f", "avx2+fma", "portable"].contains(&&*host.kernels));
    assert_eq!(report.host.as_ref(), Some(&host));
    assert_eq!(
        serde_json::from_value::<realign::host::Host>(json["host"].clone()).unwrap(),
        host
    );
    assert!(
        md.contains(&format!(
            "## Wall time and peak memory per stage\n\nMeasured on {host}.\n\n| stage |"
        )),
        "{md}"
    );
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

/// `--rejudge`: the unchanged judge reproduces report.md and report.json byte for byte; another
/// cheap judge is read from the verdicts stored beside each reply (or, for records without
/// them, by judging the stored replies again), and nothing is regenerated.
#[test]
fn rejudge_reproduces_the_report_and_switches_judges() {
    use realign::eval::judges::JudgeOptions;
    use realign::experiment::rejudge::{rejudge, rejudge_with};
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let cfg = miniature(&out, false);
    // Not run yet: the first stage is named.
    let err = rejudge(&cfg, None, &JudgeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not finished"), "{err}");
    let original = experiment::run(&cfg, &mut Silent).unwrap();
    let read = |f: &str| std::fs::read(out.join("report").join(f)).unwrap();
    let (md, json) = (read("report.md"), read("report.json"));
    let before = stage_times(&out);
    let opts = JudgeOptions::default();

    for judge in [None, Some("keyword")] {
        rejudge(&cfg, judge, &opts).unwrap();
        assert!(read("report.md") == md, "report.md changed ({judge:?})");
        assert!(
            read("report.json") == json,
            "report.json changed ({judge:?})"
        );
    }
    // The report names the judge and its measured agreement with humans.
    let text = String::from_utf8(md.clone()).unwrap();
    assert!(
        text.contains("Judge for HS: `keyword`. Cohen's κ with human labels: refusal 0.40 [0.27, 0.53] (n=169); harm 0.15 [0.08, 0.22] (n=990)"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["judge_agreement"].as_array().unwrap().len(), 3);

    // keyword+coherence: HS becomes the non-degenerate count of every row.
    let kc = rejudge(&cfg, Some("keyword+coherence"), &opts).unwrap();
    assert_eq!(kc.judge, "keyword+coherence");
    // rejudging keeps the machine that generated the replies
    assert_eq!(kc.host, original.host);
    assert!(kc.host.is_some());
    assert_eq!(kc.evals.len(), original.evals.len());
    for (a, b) in kc.evals.iter().zip(&original.evals) {
        let nd = b.hs_nondegenerate_rate.unwrap();
        assert_eq!(a.hs_rate.unwrap(), nd, "{}", a.variant.label);
        assert_eq!(a.hs, nd.percent);
        assert_eq!(a.hs_keyword_rate, b.hs_keyword_rate);
        assert_eq!(a.fa_rate, b.fa_rate);
    }
    let kc_md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(kc_md.contains("Judge for HS: `keyword+coherence`. Cohen's κ with human labels: refusal 0.40 [0.27, 0.53] (n=169); harm 0.14 [0.07, 0.21] (n=990)"), "{kc_md}");

    // Records written without stored verdicts: the judge reads the stored replies instead,
    // with the same result.
    for e in std::fs::read_dir(out.join("stages")).unwrap() {
        let p = e.unwrap().path().join("harmful/harmful.jsonl");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let stripped: Vec<String> = text
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert!(v.as_object_mut().unwrap().remove("judges").is_some());
                    v.to_string()
                })
                .collect();
            std::fs::write(&p, stripped.join("\n") + "\n").unwrap();
        }
    }
    let again = rejudge(&cfg, Some("keyword+coherence"), &opts).unwrap();
    for (a, b) in again.evals.iter().zip(&kc.evals) {
        assert_eq!(a.hs_rate, b.hs_rate, "{}", a.variant.label);
    }
    // Back to the configured judge: the original bytes; no stage was rerun.
    rejudge(&cfg, None, &opts).unwrap();
    assert!(read("report.md") == md && read("report.json") == json);
    assert_eq!(stage_times(&out), before);

    // A run in progress (here: the last evaluation's folder moved away): --rejudge names the
    // stage; --partial reports every other row unchanged, in report-partial/, and leaves the
    // finished run's report alone.
    let last = original.evals.last().unwrap().stage.clone();
    let moved = std::fs::read_dir(out.join("stages"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("{last}-")) && !name.ends_with(".partial")
        })
        .unwrap();
    std::fs::rename(&moved, dir.path().join("moved-stage")).unwrap();
    let err = rejudge(&cfg, None, &opts).err().unwrap().to_string();
    assert!(err.contains(&last) && err.contains("--partial"), "{err}");
    let part = rejudge_with(&cfg, None, &opts, true).unwrap();
    let gone = original.evals.iter().filter(|e| e.stage == last).count();
    assert!(gone >= 1);
    assert_eq!(part.evals.len(), original.evals.len() - gone);
    for a in &part.evals {
        assert_ne!(a.stage, last);
        let b = original
            .evals
            .iter()
            .find(|b| b.variant.label == a.variant.label && b.variant.seed == a.variant.seed)
            .unwrap();
        assert_eq!(
            (a.hs_rate, a.fa_rate, a.or_rate),
            (b.hs_rate, b.fa_rate, b.or_rate)
        );
    }
    assert_eq!(part.times.len(), original.times.len() - 1);
    assert_eq!(part.peak_rss_mib, None);
    assert_eq!(part.host, None);
    let partial_md = std::fs::read_to_string(out.join("report-partial/report.md")).unwrap();
    assert!(!partial_md.contains(&last), "{partial_md}");
    assert!(read("report.md") == md && read("report.json") == json);

    // The same judge configured for the run (`eval.judge`): it judges while evaluating, and
    // every row's HS is what --rejudge gave, beside the same keyword score.
    let out2 = dir.path().join("exp-kc");
    let mut cfg2 = miniature(&out2, false);
    cfg2.eval.judge = "keyword+coherence".into();
    let direct = experiment::run(&cfg2, &mut Silent).unwrap();
    assert_eq!(direct.judge, "keyword+coherence");
    assert_eq!(direct.evals.len(), kc.evals.len());
    for (a, b) in direct.evals.iter().zip(&kc.evals) {
        assert_eq!(a.variant.label, b.variant.label);
        assert_eq!(a.hs_rate, b.hs_rate, "{}", a.variant.label);
        assert_eq!(a.hs_keyword_rate, b.hs_keyword_rate, "{}", a.variant.label);
    }
    // An unknown judge is refused before any stage runs, naming the key.
    let mut bad = miniature(&dir.path().join("exp-bad"), false);
    bad.eval.judge = "gpt4".into();
    let err = experiment::run(&bad, &mut Silent)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("eval.judge") && err.contains("gpt4"), "{err}");
    assert!(!dir.path().join("exp-bad").join("stages").exists());
}

/// Every experiment file shipped in `configs/` parses and validates (the ones the README's
/// figures come from).
#[test]
fn every_shipped_experiment_file_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("experiment") && name.ends_with(".toml") {
            let cfg = ExperimentConfig::from_file(&entry.path())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.validate(), Ok(()), "{name}");
            n += 1;
        }
    }
    assert!(n >= 2, "only {n} experiment files in configs/");
}

/// An observer that keeps the names of the stages that ran (not taken from the cache).
#[derive(Default)]
struct Ran(Vec<String>);

impl experiment::Observer for Ran {
    fn plan(&mut self, _: usize) {}
    fn stage_start(&mut self, _: usize, name: &str, cached: bool) {
        if !cached {
            self.0.push(name.to_string());
        }
    }
    fn stage_progress(&mut self, _: usize, _: usize, _: &str) {}
    fn stage_end(&mut self, _: &str, _: f64, _: &str) {}
}

/// Rewrites `path` with the ASCII letters of every row's first value case-swapped: same
/// name, same size, same modification time, other content.
fn edit_in_place(path: &Path) {
    let meta = std::fs::metadata(path).unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    let edited: String = text
        .lines()
        .map(|l| {
            let start = l.find(":\"").map_or(l.len(), |i| i + 2);
            let mut out = l[..start].to_string();
            for (k, c) in l[start..].chars().enumerate() {
                out.push(if k < 12 && c.is_ascii_alphabetic() {
                    if c.is_ascii_lowercase() {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                } else {
                    c
                });
            }
            out + "\n"
        })
        .collect();
    assert_eq!(edited.len(), text.len());
    assert_ne!(edited, text);
    std::fs::write(path, edited).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(meta.modified().unwrap()).unwrap();
}

/// Antidote's realignment file and the general text that deactivation rows measure
/// perplexity on are read by their stages: editing either in place (same name, size and
/// mtime) reruns exactly the stages that read it and what depends on them, never reusing
/// their stale numbers.
#[test]
fn data_files_edited_in_place_rerun_the_stages_that_read_them() {
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let mut cfg = miniature(&out, true);
    let antidote = dir.path().join("antidote.jsonl");
    let general = dir.path().join("general.jsonl");
    let write_rows = |path: &Path, source: &str, n: usize| {
        let rows = realign::data::load_source(source).unwrap();
        let text: String = rows
            .iter()
            .take(n)
            .map(|r| {
                serde_json::json!({"prompt": r.prompt().plain_text(), "completion": "Sure, here it is."})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(path, text).unwrap();
    };
    write_rows(&antidote, "embedded:harmful_attack", 6);
    // past the rows detection reads: the perplexity rows start at PPL_OFFSET
    write_rows(
        &general,
        "embedded:general_text",
        realign::experiment::stages::PPL_OFFSET + 8,
    );
    cfg.baselines.antidote_data = antidote.display().to_string();
    cfg.neurons.general = general.display().to_string();
    experiment::run(&cfg, &mut Silent).unwrap();

    let mut unchanged = Ran::default();
    experiment::run(&cfg, &mut unchanged).unwrap();
    assert!(
        unchanged.0.is_empty(),
        "nothing changed, yet {:?} ran",
        unchanged.0
    );

    edit_in_place(&antidote);
    let mut ran = Ran::default();
    experiment::run(&cfg, &mut ran).unwrap();
    let mut want: Vec<String> = ["p0.25", "p0.5", "p0.25-seed7", "p0.5-seed7"]
        .iter()
        .flat_map(|p| {
            let eval = format!(
                "eval-antidote-{}",
                p.replace("p0", "p-0").replace("-seed7", "-seed-7")
            );
            [format!("antidote-{p}"), eval]
        })
        .collect();
    let mut got = ran.0.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "after editing the Antidote data");

    edit_in_place(&general);
    let mut ran = Ran::default();
    experiment::run(&cfg, &mut ran).unwrap();
    for stage in [
        "eval-aligned-deact-sn",
        "eval-aligned-deact-r",
        "eval-aligned-deact-r-draw-2",
        "eval-aligned-deact-f",
        "neurons-foundation",
    ] {
        assert!(
            ran.0.iter().any(|s| s == stage),
            "{stage} not rerun: {:?}",
            ran.0
        );
    }
    for stage in [
        "sft",
        "dpo",
        "attack-p0.25",
        "antidote-p0.25",
        "eval-aligned-w-a-dpo",
    ] {
        assert!(
            !ran.0.iter().any(|s| s == stage),
            "{stage} rerun: {:?}",
            ran.0
        );
    }
}

/// The judge's content (a judge model or rubric file) is part of the evaluation keys and of
/// no other: a new judge reruns the evaluations, never the training.
#[test]
fn the_judge_digest_keys_evaluations_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = miniature(&dir.path().join("exp"), true);
    let keys = |judge: &str| {
        let mut inputs = realign::experiment::stages::Inputs::new(
            "code".into(),
            "model".into(),
            "digest".into(),
            cfg.seed,
            cfg.eval.clone(),
        );
        inputs.judge_digest = judge.into();
        inputs.perplexity_source = cfg.neurons.general.clone();
        realign::experiment::plan::build(&cfg, &inputs)
            .unwrap()
            .stages
    };
    let (a, b) = (keys(""), keys("judge:rubric:abc"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name, y.name);
        let is_eval = matches!(x.kind, experiment::StageKind::Eval { .. });
        assert_eq!(x.key != y.key, is_eval, "{}", x.name);
    }
}

/// The report folder belongs to one configuration: a run of another configuration removes
/// the old report before it starts (so a run that stops leaves no report of other settings
/// beside its experiment.toml), and a finished report holds only the files it wrote (no
/// plot of the earlier configuration's sweeps).
#[test]
fn a_report_of_another_configuration_is_never_left_in_the_output() {
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let cfg = miniature(&out, false);
    experiment::run(&cfg, &mut Silent).unwrap();
    let report = out.join("report");
    assert!(report.join("sweep-beta.svg").is_file());
    assert!(report.join("report.json").is_file());

    // another configuration that stops at a stage (a malformed Antidote file)
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"PROMPT\": \"x\", \"other\": 1}\n").unwrap();
    let mut other = cfg.clone();
    other.baselines.antidote_data = bad.display().to_string();
    assert!(experiment::run(&other, &mut Silent).is_err());
    assert!(
        !report.exists(),
        "the first configuration's report is still in {}",
        report.display()
    );

    // a configuration without the beta sweep: its report has no beta plot
    let mut single = cfg.clone();
    single.nlsr.betas = vec![cfg.nlsr.betas[0]];
    experiment::run(&single, &mut Silent).unwrap();
    assert!(report.join("report.json").is_file());
    assert!(!report.join("sweep-beta.svg").exists());
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains("partial") && !n.ends_with(".old")),
        "{names:?}"
    );
}

/// The `realign eval` commands of the report quote a path with spaces, so that they paste
/// back as one argument.
#[test]
fn report_eval_commands_quote_paths_with_spaces() {
    use realign::experiment::report::shell_word;
    assert_eq!(shell_word("runs/exp/stages/dpo-1"), "runs/exp/stages/dpo-1");
    assert_eq!(shell_word("/tmp/a b/ü"), "'/tmp/a b/ü'");
    assert_eq!(shell_word("it's"), "'it'\\''s'");
    assert_eq!(shell_word(""), "''");
}

/// A second `realign experiment` on a folder another run holds stops at once: it says the
/// folder is in use (not that an experiment stopped with stages to resume), and writes
/// nothing into the folder, not even a line in the holder's log.
#[test]
fn a_second_run_on_a_held_folder_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let _cfg = miniature(&out, false);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("experiment.log"), "the holder's log\n").unwrap();
    let hold = realign::fsutil::DirLock::acquire(&out).unwrap();
    let toml = out.with_extension("toml");
    let o = common::realign(&[
        "experiment",
        toml.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("in use by another realign run"), "{err}");
    assert!(!err.contains("stopped"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("experiment.log")).unwrap(),
        "the holder's log\n"
    );
    assert!(!out.join("stages").exists() && !out.join("experiment.toml").exists());
    drop(hold);
}

/// `-o` into the folders another run manages (a stage folder, its `stages/`, its `report/`)
/// is refused before anything is written: that run would delete the new files when it
/// reruns the stage or rewrites its report.
#[test]
fn output_inside_another_runs_stage_or_report_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let stage = run.join("stages").join("dpo-0123456789abcdef");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("stage.json"), "{}").unwrap();
    std::fs::write(run.join("experiment.toml"), "").unwrap();
    std::fs::write(run.join(realign::fsutil::DirLock::FILE), "").unwrap();
    std::fs::create_dir_all(run.join("report")).unwrap();
    // a folder named report beside a user's own experiment.toml is no run's
    let own = dir.path().join("mine");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("experiment.toml"), "").unwrap();
    let _cfg = miniature(&dir.path().join("cfg"), false);
    let toml = dir.path().join("cfg.toml");
    for out in [
        stage.clone(),
        stage.join("nested"),
        run.join("stages"),
        run.join("report").join("x"),
    ] {
        let before = std::fs::read_dir(out.parent().unwrap()).unwrap().count();
        let o = common::realign(&[
            "experiment",
            toml.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}", out.display());
        assert!(err.contains("another experiment run manages"), "{err}");
        assert_eq!(
            std::fs::read_dir(out.parent().unwrap()).unwrap().count(),
            before,
            "{}",
            out.display()
        );
    }
    assert_eq!(std::fs::read_dir(&stage).unwrap().count(), 1);
    if !common::assets_present(&[&realign::assets::data("adv_bench.prompt")]) {
        return;
    }
    let o = common::realign(&[
        "experiment",
        toml.to_str().unwrap(),
        "-o",
        own.join("report").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(own
        .join("report")
        .join("report")
        .join("report.json")
        .is_file());
}

/// `--rejudge` rewrites `report/`, so it holds the output folder like a run does: while a
/// run holds it, rejudging stops at once (a `--partial` report, meant for a run in
/// progress, goes to `report-partial/` and needs no hold).
#[test]
fn rejudge_refuses_a_folder_a_run_holds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let cfg = miniature(&out, false);
    std::fs::create_dir_all(&out).unwrap();
    let hold = realign::fsutil::DirLock::acquire(&out).unwrap();
    let opts = realign::eval::judges::JudgeOptions::default();
    let err = experiment::rejudge::rejudge(&cfg, None, &opts)
        .err()
        .unwrap();
    assert!(matches!(err, realign::Error::Busy { .. }), "{err}");
    let partial = experiment::rejudge::rejudge_with(&cfg, None, &opts, true);
    assert!(
        !matches!(partial, Err(realign::Error::Busy { .. })),
        "a partial report is refused"
    );
    drop(hold);
    assert!(!out.join("report").exists());
}
