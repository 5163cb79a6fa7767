//! `realign experiment --rejudge [--judge NAME]`: the report recomputed from the stored
//! replies, under the configured judge or another one, without regenerating anything.
//!
//! Every stage of the run must have finished (its record is read from the stage cache, under
//! the keys of the configured experiment). For each evaluation stage, the harmful replies are
//! read back from `harmful/harmful.jsonl` and each is judged:
//!
//! - by the configured judge: its stored verdict (`harmful`), so the unchanged judge
//!   reproduces the report exactly;
//! - by a cheap judge (`keyword`, `keyword+coherence`): the verdict stored beside the reply
//!   ([`HarmfulRecord::judges`](crate::eval::HarmfulRecord));
//! - by any other judge ([`crate::eval::judges::build`]: `qwen`, `model:PATH`, `rubric:PATH`,
//!   …), or for records written before verdicts were kept: the judge reads the stored
//!   (prompt, reply) pairs.
//!
//! The stage's HS (`hs`, `hs_rate`) is replaced by that judge's count; every other number is
//! kept. `report.md` and `report.json` are rewritten (the report names the judge and its
//! measured agreement with humans); stage records on disk are not touched.

use std::path::Path;

use super::cache::{StageRecord, StageStore};
use super::plan::{self, Plan};
use super::report::Report;
use super::{stages, ExperimentConfig, ExperimentError};
use crate::eval::judges::{self, Judge, JudgeOptions, Question};
use crate::eval::stats::Rate;
use crate::eval::HarmfulRecord;

/// Reads the harmful records a finished evaluation stage wrote.
fn read_harmful(dir: &Path) -> crate::Result<Vec<HarmfulRecord>> {
    let path = dir.join("harmful").join("harmful.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                ExperimentError::Config {
                    path: path.clone(),
                    what: format!("line {}: {e}", i + 1),
                }
                .into()
            })
        })
        .collect()
}

/// The "harmful?" verdicts of `judge` on `records` (see the [module documentation](self)).
/// `model` builds the judge the first time one is needed.
fn verdicts(
    judge: &str,
    configured: &str,
    records: &[HarmfulRecord],
    model: &mut Option<Box<dyn Judge>>,
    opts: &JudgeOptions,
) -> crate::Result<Vec<bool>> {
    if judge == configured {
        return Ok(records.iter().map(|r| r.harmful).collect());
    }
    let stored: Option<Vec<bool>> = records
        .iter()
        .map(|r| r.judges.get(judge).copied())
        .collect();
    if let Some(v) = stored {
        return Ok(v);
    }
    if model.is_none() {
        *model = Some(judges::build(judge, opts)?);
    }
    let Some(j) = model.as_ref() else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.prompt.clone(), r.reply.clone()))
        .collect();
    Ok(j.judge(Question::Harmful, &pairs)?
        .into_iter()
        .map(|v| v.yes)
        .collect())
}

/// Recomputes the report of the finished run `cfg` under `judge` (`None`: the configured
/// one) and writes it to `OUTPUT/report/`. Errors name the first stage that has not finished.
pub fn rejudge(
    cfg: &ExperimentConfig,
    judge: Option<&str>,
    opts: &JudgeOptions,
) -> crate::Result<Report> {
    rejudge_with(cfg, judge, opts, false)
}

/// The folder under the run's output that [`rejudge_with`] writes: `report-partial` for a
/// partial report, else `report`.
pub fn report_folder(partial: bool) -> &'static str {
    if partial {
        "report-partial"
    } else {
        "report"
    }
}

/// [`rejudge`], or with `partial` the report of the stages finished so far (a run in progress
/// or stopped: its rows, times and findings for those stages only), written to
/// `OUTPUT/report-partial/` so that it is never taken for the finished run's report.
pub fn rejudge_with(
    cfg: &ExperimentConfig,
    judge: Option<&str>,
    opts: &JudgeOptions,
    partial: bool,
) -> crate::Result<Report> {
    cfg.validate().map_err(|what| ExperimentError::Config {
        path: cfg.output.join("experiment.toml"),
        what,
    })?;
    // Rewriting report/ while `realign experiment` runs on the folder would race its own
    // report: hold the folder like a run does (a partial report, for a run in progress, goes
    // to report-partial/ and needs no hold).
    let _hold = if !partial && cfg.output.is_dir() {
        Some(crate::fsutil::DirLock::acquire(&cfg.output)?)
    } else {
        None
    };
    let configured = cfg.eval.judge.clone();
    let judge = judge.unwrap_or(&configured).to_string();
    let runner = stages::Runner::new(cfg)?;
    let full: Plan = plan::build(cfg, &runner.inputs)?;
    let store = StageStore::new(cfg.output.join("stages"));
    let mut found = Vec::with_capacity(full.stages.len());
    for s in &full.stages {
        let rec = store.finished::<serde_json::Value>(&s.name, &s.key)?;
        if rec.is_none() && !partial {
            return Err(ExperimentError::Stage {
                stage: s.name.clone(),
                what: "not finished: run `realign experiment` with the same settings first, then --rejudge (or --rejudge --partial for the stages finished so far)".into(),
            }
            .into());
        }
        found.push(rec);
    }
    let keep: Vec<bool> = found.iter().map(Option::is_some).collect();
    let (plan, kept) = full.restricted(&keep);
    let mut records: Vec<StageRecord<serde_json::Value>> = kept
        .iter()
        .filter_map(|&i| found.get_mut(i).and_then(Option::take))
        .collect();
    let mut model = None;
    let mut done = std::collections::BTreeSet::new();
    for &(_, i) in &plan.variants {
        if !done.insert(i) {
            continue;
        }
        let rows = read_harmful(&runner.dir(&plan.stages[i]))?;
        let v = verdicts(&judge, &configured, &rows, &mut model, opts)?;
        let rate = Rate::new(v.iter().filter(|&&h| h).count(), v.len());
        let result = &mut records[i].result;
        if let Some(obj) = result.as_object_mut() {
            obj.insert("hs".into(), serde_json::json!(rate.percent));
            obj.insert(
                "hs_rate".into(),
                serde_json::to_value(rate).map_err(|e| ExperimentError::Stage {
                    stage: plan.stages[i].name.clone(),
                    what: e.to_string(),
                })?,
            );
        }
    }
    let mut judged = cfg.clone();
    judged.eval.judge = judge;
    let mut report = Report::build(&judged, &plan, &records);
    report.neuron_overlaps = super::neuron_overlaps(&runner, &plan)?;
    // The peak memory belongs to the run that generated the replies, not to this rejudging:
    // keep the finished run's figure (a run in progress has none yet; an older report in
    // report/ may be another run's, so --partial does not borrow it).
    let finished = (!partial)
        .then(|| std::fs::read(cfg.output.join("report").join("report.json")).ok())
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    report.peak_rss_mib = finished
        .as_ref()
        .and_then(|v| v.get("peak_rss_mib")?.as_f64());
    // Likewise the machine: the one that ran the stages (older reports have none).
    report.host = finished.and_then(|mut v| serde_json::from_value(v.get_mut("host")?.take()).ok());
    report.write(&cfg.output.join(report_folder(partial)), &plan, &records)?;
    Ok(report)
}
