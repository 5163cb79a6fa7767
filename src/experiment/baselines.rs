//! The other training-free repairs as experiment rows (issue 14): each runs on `[W_a, W_t]`
//! and writes a PEFT adapter on the base model that is evaluated like NLSR's. A new peer's
//! repair is its library file plus one variant here (and its name in
//! [`BaselineSettings::methods`]).
//!
//! | method | paper | library |
//! |---|---|---|
//! | `resta` | Bhardwaj et al. 2024 | [`crate::resta`] |
//! | `safemerge` | Djuhera et al. 2025 | [`crate::safemerge`] |
//! | `antidote` | Huang et al. 2024 | [`crate::antidote`] |

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::adapters::Adapter;
use crate::model::LoadedModel;

/// The names [`BaselineSettings::methods`] accepts.
pub const METHODS: [&str; 3] = ["resta", "safemerge", "antidote"];

/// The other training-free repairs, one row each per `p` and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineSettings {
    /// Which of `resta`, `safemerge`, `antidote` get a row.
    pub methods: Vec<String>,
    /// RESTA's scale `γ` of the safety vector (`W_t + γ W_a`; 1 is the unscaled vector).
    pub resta_gamma: f64,
    /// RESTA's DARE drop probability of the safety vector's entries (0: no sparsification).
    pub resta_dare_drop: f64,
    /// SafeMERGE's cosine threshold `τ` (the same statistic as Safe LoRA's).
    pub safemerge_threshold: f64,
    /// SafeMERGE's weight `α` of the fine-tuned model in a merged module (0.5: equal weights).
    pub safemerge_alpha: f64,
    /// Antidote's pruned fraction of each module's update.
    pub antidote_density: f64,
    /// Antidote's realignment set (harmful prompts with harmful answers).
    pub antidote_data: String,
    /// Antidote's realignment rows used.
    pub antidote_samples: usize,
}

impl Default for BaselineSettings {
    fn default() -> Self {
        Self {
            methods: METHODS.iter().map(|s| s.to_string()).collect(),
            resta_gamma: 1.0,
            resta_dare_drop: 0.0,
            safemerge_threshold: 0.5,
            safemerge_alpha: 0.5,
            antidote_density: 0.2,
            antidote_data: "embedded:harmful_attack".into(),
            antidote_samples: 100,
        }
    }
}

impl BaselineSettings {
    /// The configured methods with their settings, in `methods` order.
    pub fn baselines(&self) -> Vec<Baseline> {
        self.methods
            .iter()
            .filter_map(|m| match m.as_str() {
                "resta" => Some(Baseline::Resta {
                    gamma: self.resta_gamma,
                    dare_drop: self.resta_dare_drop,
                }),
                "safemerge" => Some(Baseline::Safemerge {
                    threshold: self.safemerge_threshold,
                    alpha: self.safemerge_alpha,
                }),
                "antidote" => Some(Baseline::Antidote {
                    density: self.antidote_density,
                    data: self.antidote_data.clone(),
                    samples: self.antidote_samples,
                }),
                _ => None,
            })
            .collect()
    }

    /// Checks names and ranges.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.methods {
            if !METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "baselines.methods: unknown method {m:?} ({})",
                    METHODS.join(", ")
                ));
            }
            if !seen.insert(m) {
                return Err(format!("baselines.methods: {m:?} is listed twice"));
            }
        }
        if crate::resta::check_gamma(self.resta_gamma).is_err() {
            return Err(format!(
                "baselines.resta_gamma = {} must be a finite number, not 0, with |gamma| <= {}",
                crate::train::config::fmt_num(self.resta_gamma),
                crate::resta::MAX_GAMMA
            ));
        }
        if !(0.0..1.0).contains(&self.resta_dare_drop) {
            return Err(format!(
                "baselines.resta_dare_drop = {} is outside [0, 1)",
                self.resta_dare_drop
            ));
        }
        if !(-1.0..=1.0).contains(&self.safemerge_threshold) {
            return Err(format!(
                "baselines.safemerge_threshold = {} is outside [-1, 1]",
                self.safemerge_threshold
            ));
        }
        if !(0.0..=1.0).contains(&self.safemerge_alpha) {
            return Err(format!(
                "baselines.safemerge_alpha = {} is outside [0, 1]",
                self.safemerge_alpha
            ));
        }
        if !(0.0..=1.0).contains(&self.antidote_density) {
            return Err(format!(
                "baselines.antidote_density = {} is outside [0, 1]",
                self.antidote_density
            ));
        }
        if self.antidote_samples == 0 && self.methods.iter().any(|m| m == "antidote") {
            return Err("baselines.antidote_samples = 0: give at least 1".into());
        }
        Ok(())
    }
}

/// One repair with its settings (the stage's key covers them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Baseline {
    /// RESTA: `W_t + γ (W_a − W_base)`, optionally DARE-sparsified.
    Resta {
        /// Scale of the safety vector.
        gamma: f64,
        /// DARE's drop probability (0: none).
        #[serde(default)]
        dare_drop: f64,
    },
    /// SafeMERGE: `α W_t + (1 − α) W_a` where Safe LoRA's cosine is below `τ`.
    Safemerge {
        /// `τ`.
        threshold: f64,
        /// `α`.
        alpha: f64,
    },
    /// Antidote: the update's top-Wanda entries on harmful data pruned.
    Antidote {
        /// Pruned fraction per module.
        density: f64,
        /// Realignment set.
        data: String,
        /// Rows used.
        samples: usize,
    },
}

impl Baseline {
    /// The method's name (stage folders: `<name>-p<p>`).
    pub fn name(&self) -> &'static str {
        match self {
            Baseline::Resta { .. } => "resta",
            Baseline::Safemerge { .. } => "safemerge",
            Baseline::Antidote { .. } => "antidote",
        }
    }

    /// The row label's method part (`"SafeMERGE"` in `"SafeMERGE p=0.1"`).
    pub fn label(&self) -> &'static str {
        match self {
            Baseline::Resta { .. } => "RESTA",
            Baseline::Safemerge { .. } => "SafeMERGE",
            Baseline::Antidote { .. } => "Antidote",
        }
    }

    /// Runs the repair on `W_a` (`aligned`) and `W_t` (`finetuned`) with the stage's `seed`,
    /// writes the adapter and its report into `out`, and returns the stage's summary.
    pub fn run(
        &self,
        base: &LoadedModel,
        aligned: &Adapter,
        finetuned: &Adapter,
        out: &Path,
        seed: u64,
    ) -> crate::Result<serde_json::Value> {
        let write = |adapter: &Adapter, file: &str, report: String| -> crate::Result<()> {
            adapter.save(out)?;
            crate::fsutil::write_atomic(&out.join(file), report.as_bytes())
        };
        match self {
            Baseline::Resta { gamma, dare_drop } => {
                let (a, r) = if *dare_drop > 0.0 {
                    crate::resta::resta_dare(aligned, finetuned, *gamma, *dare_drop, seed)?
                } else {
                    crate::resta::resta(aligned, finetuned, *gamma)?
                };
                write(&a, crate::resta::REPORT_JSON, json(&r))?;
                Ok(serde_json::json!({"method": "resta", "gamma": gamma,
                    "dare_drop": dare_drop, "rank": r.rank}))
            }
            Baseline::Safemerge { threshold, alpha } => {
                let (a, r) = crate::safemerge::safemerge(aligned, finetuned, *threshold, *alpha)?;
                write(&a, crate::safemerge::REPORT_JSON, json(&r))?;
                Ok(
                    serde_json::json!({"method": "safemerge", "merged": r.num_merged,
                    "modules": r.modules.len(), "threshold": threshold, "alpha": alpha}),
                )
            }
            Baseline::Antidote {
                density,
                data,
                samples,
            } => {
                let rows = crate::data::load_source(data)?;
                let cfg = crate::antidote::AntidoteConfig {
                    density: *density,
                    max_samples: Some(*samples),
                    ..Default::default()
                };
                let (a, r) = crate::antidote::antidote(
                    &base.model,
                    &base.tokenizer,
                    aligned,
                    finetuned,
                    &rows,
                    &cfg,
                )?;
                write(&a, crate::antidote::REPORT_JSON, json(&r))?;
                let energy = r.modules.iter().map(|m| m.energy_removed).sum::<f64>()
                    / r.modules.len().max(1) as f64;
                Ok(serde_json::json!({"method": "antidote", "density": density,
                    "samples": r.samples, "tokens": r.tokens, "mean_energy_removed": energy}))
            }
        }
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_list_the_methods_in_order_and_reject_unknown_ones() {
        let s = BaselineSettings {
            methods: vec!["antidote".into(), "resta".into()],
            ..Default::default()
        };
        let names: Vec<&str> = s.baselines().iter().map(Baseline::name).collect();
        assert_eq!(names, ["antidote", "resta"]);
        assert!(s.validate().is_ok());
        let bad = BaselineSettings {
            methods: vec!["ties".into()],
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("unknown method \"ties\""));
        let twice = BaselineSettings {
            methods: vec!["resta".into(), "resta".into()],
            ..Default::default()
        };
        assert!(twice.validate().unwrap_err().contains("listed twice"));
        let alpha = BaselineSettings {
            safemerge_alpha: 1.5,
            ..Default::default()
        };
        assert!(alpha.validate().unwrap_err().contains("safemerge_alpha"));
    }
}
