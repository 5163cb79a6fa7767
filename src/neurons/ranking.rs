//! The mean importance of every neuron over a detection corpus (`SET.importance.json`, written
//! beside every detected set): the ranking the `Deact-F` control draws from (the most important
//! foundation neurons outside the safety set; issue 12).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::importance::LayerImportance;
use super::NeuronError;
use crate::model::LINEAR_MODULES;

/// Mean importance per neuron, per module (`model.layers.{i}.{local}`), along the module's
/// neuron axis (rows for q, k, v, gate, up; columns for o, down).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NeuronRanking {
    /// Prompts averaged over.
    pub prompts: usize,
    /// The importance kind and token scope, for the record.
    pub meta: serde_json::Value,
    /// Mean importance per module.
    pub modules: BTreeMap<String, Vec<f32>>,
}

/// Sums importances prompt by prompt (f64) into a [`NeuronRanking`].
#[derive(Debug, Clone, Default)]
pub struct RankingAccumulator {
    prompts: usize,
    sums: Vec<[Vec<f64>; 7]>,
}

impl RankingAccumulator {
    /// Adds one prompt's importances (NaN counts as 0).
    pub fn add(&mut self, layers: &[LayerImportance]) {
        if self.sums.is_empty() {
            self.sums = layers
                .iter()
                .map(|l| l.modules.clone().map(|v| vec![0f64; v.len()]))
                .collect();
        }
        for (acc, l) in self.sums.iter_mut().zip(layers) {
            for (a, v) in acc.iter_mut().zip(&l.modules) {
                for (x, y) in a.iter_mut().zip(v) {
                    if !y.is_nan() {
                        *x += f64::from(*y);
                    }
                }
            }
        }
        self.prompts += 1;
    }

    /// The means.
    pub fn finish(self, meta: serde_json::Value) -> NeuronRanking {
        let n = self.prompts.max(1) as f64;
        let mut modules = BTreeMap::new();
        for (layer, ms) in self.sums.into_iter().enumerate() {
            for (local, v) in LINEAR_MODULES.iter().zip(ms) {
                modules.insert(
                    format!("model.layers.{layer}.{local}"),
                    v.into_iter().map(|x| (x / n) as f32).collect(),
                );
            }
        }
        NeuronRanking {
            prompts: self.prompts,
            meta,
            modules,
        }
    }
}

impl NeuronRanking {
    /// Writes the ranking as JSON, atomically.
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        let json = serde_json::to_string(self).map_err(|e| NeuronError::Format {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        crate::fsutil::write_atomic(path, json.as_bytes())
    }

    /// Reads a ranking written by [`save`](Self::save).
    pub fn load(path: &Path) -> crate::Result<Self> {
        let text = crate::fsutil::read_to_string(path)?;
        Ok(
            serde_json::from_str(&text).map_err(|e| NeuronError::Format {
                path: path.to_path_buf(),
                what: format!("not an importance ranking: {e}"),
            })?,
        )
    }

    /// The indices of `module`'s neurons from the most to the least important (ties by index),
    /// or `None` when the ranking lacks the module.
    pub fn order(&self, module: &str) -> Option<Vec<u32>> {
        let v = self.modules.get(module)?;
        let mut idx: Vec<u32> = (0..v.len() as u32).collect();
        idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
        Some(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_and_order() {
        let layer = |x: f32| LayerImportance {
            modules: [
                vec![x, 1.0, 3.0],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
            ],
        };
        let mut acc = RankingAccumulator::default();
        acc.add(&[layer(2.0)]);
        acc.add(&[layer(f32::NAN)]);
        let r = acc.finish(serde_json::Value::Null);
        assert_eq!(r.prompts, 2);
        assert_eq!(
            r.modules["model.layers.0.self_attn.q_proj"],
            vec![1.0, 1.0, 3.0]
        );
        // 3.0 first, then the tie 1.0/1.0 by index
        assert_eq!(
            r.order("model.layers.0.self_attn.q_proj").unwrap(),
            vec![2, 0, 1]
        );
        assert!(r.order("nope").is_none());
    }
}
