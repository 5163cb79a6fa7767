//! The experiment report: the papers' tables in Markdown (`report.md`), the same numbers in
//! JSON (`report.json`), plots, and an index (`index.md`) of everything in the folder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::cache::StageRecord;
use super::config::ExperimentConfig;
use super::plan::{Plan, StageKind, Variant};
use super::stages::EvalResult;

/// One row of the stage-time table.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// Stage name.
    pub stage: String,
    /// Wall seconds of the run that produced it.
    pub seconds: f64,
}

/// One report row: a variant and its evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Label and group.
    pub variant: Variant,
    /// Harmfulness score, %.
    pub hs: f64,
    /// Task accuracy, %.
    pub fa: f64,
    /// Harmfulness score by the keyword judge, %.
    pub hs_keyword: f64,
    /// Harmful prompts evaluated.
    pub n_harmful: usize,
    /// Task items evaluated.
    pub n_task: usize,
    /// The evaluation stage (shared by variants naming the same model).
    pub stage: String,
}

/// The overlap of two detected neuron sets.
#[derive(Debug, Clone, Serialize)]
pub struct Overlap {
    /// First set (stage name).
    pub a: String,
    /// Second set.
    pub b: String,
    /// `|A ∩ B|`.
    pub intersection: usize,
    /// `|A ∩ B| / |A|`.
    pub ratio_of_a: f64,
    /// `|A ∩ B| / |B|` (the paper's `overlap(A, B)`).
    pub ratio_of_b: f64,
}

/// Everything the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every evaluated variant.
    pub evals: Vec<Row>,
    /// Identification stages: name → result (method, density, seconds).
    pub identify: BTreeMap<String, serde_json::Value>,
    /// Neuron detection stages: name → result.
    pub neurons: BTreeMap<String, serde_json::Value>,
    /// SN-Tune stages: name → result.
    pub sn_tune: BTreeMap<String, serde_json::Value>,
    /// Overlaps between detected neuron sets.
    pub neuron_overlaps: Vec<Overlap>,
    /// Wall time per stage.
    pub times: Vec<StageTime>,
    /// The attack's `p` values, main first.
    pub ps: Vec<f64>,
}

fn row_name(label: &str) -> String {
    label.split(" p=").next().unwrap_or(label).to_string()
}

fn fmt1(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.1}")
    }
}

impl Report {
    /// Collects the report from the plan and the stage records (same order).
    pub fn build(
        cfg: &ExperimentConfig,
        plan: &Plan,
        records: &[StageRecord<serde_json::Value>],
    ) -> Self {
        let mut r = Report {
            evals: Vec::new(),
            identify: BTreeMap::new(),
            neurons: BTreeMap::new(),
            sn_tune: BTreeMap::new(),
            neuron_overlaps: Vec::new(),
            times: Vec::new(),
            ps: cfg.attack.ps.clone(),
        };
        for (stage, rec) in plan.stages.iter().zip(records) {
            r.times.push(StageTime {
                stage: stage.name.clone(),
                seconds: rec.seconds,
            });
            match &stage.kind {
                StageKind::Identify { .. } => {
                    r.identify.insert(stage.name.clone(), rec.result.clone());
                }
                StageKind::Detect { .. } => {
                    r.neurons.insert(stage.name.clone(), rec.result.clone());
                }
                StageKind::SnTune { .. } => {
                    r.sn_tune.insert(stage.name.clone(), rec.result.clone());
                }
                _ => {}
            }
        }
        for (variant, i) in &plan.variants {
            if let Ok(e) = serde_json::from_value::<EvalResult>(records[*i].result.clone()) {
                r.evals.push(Row {
                    variant: variant.clone(),
                    hs: e.hs,
                    fa: e.fa,
                    hs_keyword: e.hs_keyword,
                    n_harmful: e.n_harmful,
                    n_task: e.n_task,
                    stage: plan.stages[*i].name.clone(),
                });
            }
        }
        r
    }

    fn find(&self, label: &str) -> Option<&Row> {
        self.evals.iter().find(|e| e.variant.label == label)
    }

    /// The main table: HS and FA per method (rows) and `p` (columns).
    pub fn main_table(&self) -> String {
        let mut rows: Vec<String> = Vec::new();
        let mut cells: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
        for e in &self.evals {
            let g = e.variant.group.as_str();
            if !matches!(
                g,
                "alignment" | "attack" | "safelora" | "nlsr" | "nlsr-no-amp"
            ) {
                continue;
            }
            let name = row_name(&e.variant.label);
            if !rows.contains(&name) {
                rows.push(name.clone());
            }
            let col = e.variant.p.map(|p| format!("{p}")).unwrap_or_default();
            cells.insert((name, col), (e.hs, e.fa));
        }
        let mut s = String::from("| method |");
        for p in &self.ps {
            let _ = write!(s, " HS ↓ p={p} | FA ↑ p={p} |");
        }
        s.push_str("\n|---|");
        for _ in &self.ps {
            s.push_str("---:|---:|");
        }
        s.push('\n');
        for name in rows {
            let _ = write!(s, "| {name} |");
            for p in &self.ps {
                let c = cells
                    .get(&(name.clone(), format!("{p}")))
                    .or_else(|| cells.get(&(name.clone(), String::new())));
                match c {
                    Some((hs, fa)) => {
                        let _ = write!(s, " {} | {} |", fmt1(*hs), fmt1(*fa));
                    }
                    None => s.push_str(" – | – |"),
                }
            }
            s.push('\n');
        }
        s
    }

    fn sweep_table(&self, group: &str, param: &str) -> Option<String> {
        let mut rows: Vec<&Row> = self
            .evals
            .iter()
            .filter(|e| e.variant.group == group)
            .collect();
        if rows.is_empty() {
            return None;
        }
        rows.sort_by(|a, b| {
            a.variant
                .param
                .partial_cmp(&b.variant.param)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut s = format!("| {param} | HS ↓ | FA ↑ |\n|---:|---:|---:|\n");
        for e in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                e.variant.param.map(|p| format!("{p}")).unwrap_or_default(),
                fmt1(e.hs),
                fmt1(e.fa)
            );
        }
        Some(s)
    }

    fn identify_table(&self) -> Option<String> {
        if self.identify.is_empty() {
            return None;
        }
        let mut s = String::from(
            "| identification stage | method | density | samples | seconds |\n|---|---|---:|---:|---:|\n",
        );
        for (name, v) in &self.identify {
            let _ = writeln!(
                s,
                "| {name} | {} | {:.3} | {} | {:.1} |",
                v["method"].as_str().unwrap_or("?"),
                v["density"].as_f64().unwrap_or(f64::NAN),
                v["samples"].as_u64().unwrap_or(0),
                v["seconds"].as_f64().unwrap_or(f64::NAN),
            );
        }
        Some(s)
    }

    fn neurons_table(&self) -> Option<String> {
        let rows: Vec<&Row> = self
            .evals
            .iter()
            .filter(|e| e.variant.group == "neurons")
            .collect();
        if rows.is_empty() && self.neurons.is_empty() {
            return None;
        }
        let mut s = String::new();
        for (name, v) in &self.neurons {
            let _ = writeln!(
                s,
                "- `{name}`: {} neurons ({} % of the linear-layer parameters; attention share {} %)",
                v.get("neurons").map(|x| x.to_string()).unwrap_or_else(|| "?".into()),
                v.get("param_percent").and_then(|x| x.as_f64()).map(|x| format!("{x:.3}")).unwrap_or_else(|| "?".into()),
                v.get("attention_percent").and_then(|x| x.as_f64()).map(fmt1).unwrap_or_else(|| "?".into()),
            );
        }
        for o in &self.neuron_overlaps {
            let _ = writeln!(
                s,
                "- overlap of `{}` and `{}`: {} neurons in both; {:.1} % of the first, {:.1} % of the second",
                o.a,
                o.b,
                o.intersection,
                100.0 * o.ratio_of_a,
                100.0 * o.ratio_of_b
            );
        }
        for (name, v) in &self.sn_tune {
            let _ = writeln!(
                s,
                "- `{name}`: {} neurons trained",
                v.get("neurons")
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "?".into()),
            );
        }
        s.push_str("\n| model | HS ↓ | FA ↑ |\n|---|---:|---:|\n");
        for (label, row) in [
            ("Aligned (W_a, DPO)", "Aligned (W_a), none deactivated"),
            ("Non-aligned", "Non-aligned (before SN-Tune)"),
        ] {
            if let Some(e) = self.find(label) {
                let _ = writeln!(s, "| {row} | {} | {} |", fmt1(e.hs), fmt1(e.fa));
            }
        }
        for e in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                e.variant.label,
                fmt1(e.hs),
                fmt1(e.fa)
            );
        }
        Some(s)
    }

    /// The whole Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# realign experiment\n\n");
        s.push_str("HS: harmfulness score, % of held-out harmful prompts answered without a refusal (keyword judge). FA: fine-tuning accuracy, % of held-out GSM8K items answered with the right final number.\n\n");
        s.push_str("## HS and FA by method and harmful fraction p\n\n");
        s.push_str(&self.main_table());
        for (group, title, param) in [
            (
                "sweep-beta",
                "Effect of pre-amplification (beta; 0 = none)",
                "beta",
            ),
            ("sweep-sparsity", "Effect of sparsity", "sparsity"),
            (
                "sweep-layer-prune",
                "Effect of the layer-pruning rate",
                "P_L",
            ),
        ] {
            if let Some(t) = self.sweep_table(group, param) {
                let _ = write!(s, "\n## {title}\n\n{t}");
            }
        }
        if let Some(t) = self.identify_table() {
            let _ = write!(s, "\n## Identification methods\n\n{t}");
        }
        if let Some(t) = self.neurons_table() {
            let _ = write!(s, "\n## Safety neurons\n\n{t}");
        }
        s.push_str("\n## Wall time per stage\n\n| stage | seconds |\n|---|---:|\n");
        let total: f64 = self.times.iter().map(|t| t.seconds).sum();
        for t in &self.times {
            let _ = writeln!(s, "| {} | {:.1} |", t.stage, t.seconds);
        }
        let _ = writeln!(
            s,
            "| total (this run's stages; cached stages keep their first time) | {total:.1} |"
        );
        s
    }

    /// Writes `report.md`, `report.json`, plots and `index.md` into `dir`.
    pub fn write(
        &self,
        dir: &Path,
        plan: &Plan,
        _records: &[StageRecord<serde_json::Value>],
    ) -> crate::Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let md = self.markdown();
        crate::fsutil::write_atomic(&dir.join("report.md"), md.as_bytes())?;
        let json = serde_json::to_string_pretty(self).expect("the report serialises");
        crate::fsutil::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        let mut index = String::from("# Experiment report\n\n- [report.md](report.md): the tables\n- [report.json](report.json): the same numbers\n");
        for f in self.plots(dir)? {
            let _ = writeln!(index, "- [{f}]({f})");
        }
        // The layer-similarity plot of the first NLSR repair (main method, main p).
        let stages = dir.parent().unwrap_or(dir).join("stages");
        let store = super::cache::StageStore::new(stages);
        if let Some(s) = plan
            .stages
            .iter()
            .find(|s| matches!(s.kind, StageKind::Patch { .. }))
        {
            for ext in ["svg", "png"] {
                let from = store.dir(&s.name, &s.key).join(format!("similarity.{ext}"));
                if let Ok(bytes) = std::fs::read(&from) {
                    let name = format!("layer_similarity.{ext}");
                    crate::fsutil::write_atomic(&dir.join(&name), &bytes)?;
                    let _ = writeln!(index, "- [{name}]({name}): S per layer and module of `{}`, patched modules ringed", s.name);
                }
            }
        }
        crate::fsutil::write_atomic(&dir.join("index.md"), index.as_bytes())?;
        Ok(())
    }

    fn plots(&self, dir: &Path) -> crate::Result<Vec<String>> {
        use crate::report::{write_chart, Chart, ChartKind, Series};
        let mut files = Vec::new();
        let mut push = |paths: Vec<std::path::PathBuf>| {
            for p in paths {
                if let Some(n) = p.file_name() {
                    files.push(n.to_string_lossy().into_owned());
                }
            }
        };
        // HS and FA against p, one line per method.
        let mut by_method: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
        for e in &self.evals {
            if let (Some(p), true) = (
                e.variant.p,
                matches!(
                    e.variant.group.as_str(),
                    "attack" | "safelora" | "nlsr" | "nlsr-no-amp"
                ),
            ) {
                by_method
                    .entry(row_name(&e.variant.label))
                    .or_default()
                    .push((p, e.hs, e.fa));
            }
        }
        for (metric, title, y) in [
            (1usize, "Harmfulness score vs harmful fraction p", "HS (%)"),
            (2, "Fine-tuning accuracy vs harmful fraction p", "FA (%)"),
        ] {
            let series: Vec<Series> = by_method
                .iter()
                .map(|(name, pts)| {
                    let mut pts: Vec<(f64, f64)> = pts
                        .iter()
                        .map(|&(p, hs, fa)| (p, if metric == 1 { hs } else { fa }))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series::line(name.clone(), pts)
                })
                .collect();
            if series.is_empty() {
                continue;
            }
            let stem = dir.join(if metric == 1 { "hs_vs_p" } else { "fa_vs_p" });
            push(write_chart(
                &stem,
                &Chart {
                    title,
                    x_label: "p (harmful fraction of the fine-tuning data)",
                    y_label: y,
                    kind: ChartKind::Lines,
                    series: &series,
                    x_ticks: None,
                },
            )?);
        }
        // Sweeps: HS and FA against the swept value.
        for (group, title, x) in [
            (
                "sweep-beta",
                "Pre-amplification strength",
                "beta (0 = none)",
            ),
            (
                "sweep-sparsity",
                "Sparsity of the safety-critical neurons",
                "sparsity",
            ),
            ("sweep-layer-prune", "Layer-pruning rate", "P_L"),
        ] {
            let mut pts: Vec<(f64, f64, f64)> = self
                .evals
                .iter()
                .filter(|e| e.variant.group == group)
                .filter_map(|e| e.variant.param.map(|v| (v, e.hs, e.fa)))
                .collect();
            if pts.len() < 2 {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let series = [
                Series::line("HS (%)", pts.iter().map(|p| (p.0, p.1)).collect()),
                Series::line("FA (%)", pts.iter().map(|p| (p.0, p.2)).collect()),
            ];
            push(write_chart(
                &dir.join(group),
                &Chart {
                    title,
                    x_label: x,
                    y_label: "%",
                    kind: ChartKind::Lines,
                    series: &series,
                    x_ticks: None,
                },
            )?);
        }
        // Safety and foundation neurons per layer.
        let mut series = Vec::new();
        for (name, v) in &self.neurons {
            if let Some(per_layer) = v.get("per_layer").and_then(|x| x.as_array()) {
                let pts = per_layer
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i as f64, c.as_f64().unwrap_or(0.0)))
                    .collect();
                series.push(Series::line(name.clone(), pts));
            }
        }
        if !series.is_empty() {
            push(write_chart(
                &dir.join("neurons_per_layer"),
                &Chart {
                    title: "Neurons per layer",
                    x_label: "layer",
                    y_label: "neurons",
                    kind: ChartKind::Bars,
                    series: &series,
                    x_ticks: None,
                },
            )?);
        }
        Ok(files)
    }
}
