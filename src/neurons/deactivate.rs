//! The deactivation check (safety-neurons paper, §2.2, Table 1): zero the selected neurons
//! (rows or columns of full weights) and measure harmfulness, task accuracy and perplexity on
//! held-out general text. Controls (issue 12): a random set of the same structure per module
//! (`Deact-R`, FFN units whole) and as many of the most important foundation neurons outside
//! the set (`Deact-F`), which separates "safety" from "generally important".
//!
//! Deactivation edits the full weights, so unmerged LoRA adapters are folded into the weights
//! first ([`fold_adapters`]): a neuron is then off in the model the adapters produce.

use std::collections::BTreeMap;

use candle_core::Tensor;
use rand::{rngs::StdRng, SeedableRng};

use super::perplexity::{perplexity, PerplexityReport, BROKEN_FACTOR};
use super::{Axis, ModuleNeurons, NeuronError, NeuronRanking, NeuronSet};
use crate::eval::{degenerate, harmfulness_score, task_accuracy, EvalConfig, Rate, TaskKind};
use crate::eval::{AccuracyReport, HarmfulnessReport};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Folds every unmerged LoRA adapter into its base weight (`W += s B A`, in attachment order)
/// and returns how many modules had one.
pub fn fold_adapters(model: &mut Model) -> crate::Result<usize> {
    let mut folded = 0;
    for lin in model.linears_mut() {
        if lin.loras.is_empty() {
            continue;
        }
        let mut w = lin.weight.clone();
        for m in lin.loras.drain(..) {
            w = crate::adapters::merge_into(&w, &m)?;
        }
        lin.weight = w;
        folded += 1;
    }
    Ok(folded)
}

/// What [`deactivate`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeactivationSummary {
    /// Modules whose unmerged adapters were folded into the weights first.
    pub folded_adapter_modules: usize,
    /// Modules edited.
    pub modules: usize,
    /// Neurons zeroed.
    pub neurons: usize,
    /// Weight entries zeroed (a row and a column of one matrix may share an entry).
    pub params: usize,
}

/// The linear module of `model` a set entry names, with its shape checked.
pub(crate) fn check_module(model: &Model, m: &ModuleNeurons) -> Result<(), NeuronError> {
    let lin = model
        .linears()
        .find(|l| l.name == m.module)
        .ok_or_else(|| {
            NeuronError::Mismatch(format!(
                "the set names module {}, which the model does not have",
                m.module
            ))
        })?;
    let (out, inp) = lin.shape();
    if [out, inp] != m.shape {
        return Err(NeuronError::Mismatch(format!(
            "{}: the set says shape {:?}, the model has [{out}, {inp}]",
            m.module, m.shape
        )));
    }
    if let Some(&bad) = m.indices.iter().find(|&&i| i as usize >= m.axis_len()) {
        return Err(NeuronError::Mismatch(format!(
            "{}: index {bad} out of range for {:?} of shape {:?}",
            m.module, m.axis, m.shape
        )));
    }
    Ok(())
}

/// `weight` `[out, in]` with the given rows or columns replaced by `f(old entries)`; every other
/// entry is copied bit for bit. `f` gets and returns the neuron's entries in order
/// (`in` values for a row, `out` for a column).
pub(crate) fn map_neurons(
    weight: &Tensor,
    axis: Axis,
    indices: &[u32],
    mut f: impl FnMut(usize, &mut [f32]),
) -> crate::Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let dtype = weight.dtype();
    let mut v: Vec<f32> = weight
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut buf = Vec::new();
    for (j, &i) in indices.iter().enumerate() {
        let i = i as usize;
        match axis {
            Axis::Row => f(j, &mut v[i * inp..(i + 1) * inp]),
            Axis::Column => {
                buf.clear();
                buf.extend((0..out).map(|r| v[r * inp + i]));
                f(j, &mut buf);
                for (r, x) in buf.iter().enumerate() {
                    v[r * inp + i] = *x;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (out, inp), weight.device())?.to_dtype(dtype)?)
}

/// Zeroes the neurons of `set` in `model`'s full weights: rows `idx` of `W [out, in]` for
/// [`Axis::Row`], columns for [`Axis::Column`]. Unmerged adapters are folded in first
/// ([`fold_adapters`]). Every other entry stays bit-identical.
///
/// Errors ([`NeuronError::Mismatch`]) when the set names a module the model lacks, with another
/// shape, or an index out of range; the model is unchanged then.
pub fn deactivate(model: &mut Model, set: &NeuronSet) -> crate::Result<DeactivationSummary> {
    for m in &set.modules {
        check_module(model, m)?;
    }
    let folded = fold_adapters(model)?;
    for lin in model.linears_mut() {
        for m in set.modules.iter().filter(|m| m.module == lin.name) {
            lin.weight = map_neurons(&lin.weight, m.axis, &m.indices, |_, xs| xs.fill(0.0))?;
        }
    }
    Ok(DeactivationSummary {
        folded_adapter_modules: folded,
        modules: set.modules.len(),
        neurons: set.len(),
        params: set.params(),
    })
}

/// `model.layers.{i}.mlp.` for an FFN module (gate, up, down), else `None`.
fn ffn_prefix(module: &str) -> Option<&str> {
    ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        .iter()
        .find_map(|s| module.strip_suffix(s))
}

/// `k` distinct values of `0..n` outside `exclude`, drawn uniformly with `rng`.
fn sample_excluding(rng: &mut StdRng, n: usize, k: usize, exclude: &[u32]) -> Vec<u32> {
    let free: Vec<u32> = (0..n as u32).filter(|i| !exclude.contains(i)).collect();
    let k = k.min(free.len());
    rand::seq::index::sample(rng, free.len(), k)
        .into_iter()
        .map(|i| free[i])
        .collect()
}

/// The paper's `Deact-R` control with the set's structure: for every module of `set`, as many
/// neurons of the same axis, drawn uniformly without replacement from `0..axis_len` with a
/// seeded RNG (same seed and set, same result). FFN units stay whole: in each layer, the units
/// the set has in all of its FFN modules (gate row `k`, up row `k`, down column `k` together)
/// are replaced by as many random units zeroed in the same modules, and only a module's extra
/// neurons are drawn on their own (outside those units). Meta records the seed.
pub fn random_like(set: &NeuronSet, seed: u64) -> NeuronSet {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut shared: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut modules = Vec::with_capacity(set.modules.len());
    for m in &set.modules {
        let n = m.axis_len();
        let k = m.indices.len().min(n);
        let indices = match ffn_prefix(&m.module) {
            None => sample_excluding(&mut rng, n, k, &[]),
            Some(prefix) => {
                if !shared.contains_key(prefix) {
                    let units = whole_units(set, prefix).len().min(n);
                    let drawn = sample_excluding(&mut rng, n, units, &[]);
                    shared.insert(prefix.to_string(), drawn);
                }
                let units = &shared[prefix];
                let common = units.len().min(k);
                let mut idx = units[..common].to_vec();
                idx.extend(sample_excluding(&mut rng, n, k - common, units));
                idx
            }
        };
        modules.push(ModuleNeurons {
            module: m.module.clone(),
            axis: m.axis,
            shape: m.shape,
            indices,
        });
    }
    NeuronSet::new(
        serde_json::json!({"random_like": true, "seed": seed, "neurons": set.len(),
            "structure": "same count per module and axis; FFN units whole"}),
        modules,
    )
}

/// The FFN units the set has in every one of its FFN modules of the layer `prefix`.
fn whole_units(set: &NeuronSet, prefix: &str) -> Vec<u32> {
    let mut ffn = set
        .modules
        .iter()
        .filter(|m| ffn_prefix(&m.module) == Some(prefix));
    let Some(first) = ffn.next() else {
        return Vec::new();
    };
    let mut units = first.indices.clone();
    for m in ffn {
        units.retain(|i| m.indices.contains(i));
    }
    units
}

/// The `Deact-F` control (issue 12): for every module of `set`, as many neurons as the set
/// has there, the most important by the foundation `ranking` (mean importance over general
/// text, [`NeuronRanking`]) that are **not** in the set. Gate, up and down share their
/// ranking, so FFN units stay whole when the set's do.
///
/// Errors ([`NeuronError::Mismatch`]) when the ranking lacks a module of the set or has another
/// length for it.
pub fn foundation_like(set: &NeuronSet, ranking: &NeuronRanking) -> Result<NeuronSet, NeuronError> {
    let mut modules = Vec::with_capacity(set.modules.len());
    for m in &set.modules {
        let order = ranking.order(&m.module).ok_or_else(|| {
            NeuronError::Mismatch(format!("the foundation ranking has no module {}", m.module))
        })?;
        if order.len() != m.axis_len() {
            return Err(NeuronError::Mismatch(format!(
                "{}: the foundation ranking has {} neurons, the set's module {}",
                m.module,
                order.len(),
                m.axis_len()
            )));
        }
        let indices: Vec<u32> = order
            .into_iter()
            .filter(|i| !m.indices.contains(i))
            .take(m.indices.len())
            .collect();
        modules.push(ModuleNeurons {
            module: m.module.clone(),
            axis: m.axis,
            shape: m.shape,
            indices,
        });
    }
    Ok(NeuronSet::new(
        serde_json::json!({"foundation_like": true, "neurons": set.len(),
            "rule": "per module, the most important foundation neurons outside the set",
            "ranking": ranking.meta}),
        modules,
    ))
}

/// One column of the paper's Table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The model as given.
    None,
    /// The set's neurons zeroed (`Deact-SN`).
    DeactSn,
    /// As many random neurons per module zeroed (`Deact-R`, [`random_like`]).
    DeactR,
    /// As many of the most important foundation neurons outside the set zeroed (`Deact-F`,
    /// [`foundation_like`]).
    DeactF,
}

impl Variant {
    /// `none`, `deact_sn`, `deact_r`, `deact_f`.
    pub fn name(&self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::DeactSn => "deact_sn",
            Variant::DeactR => "deact_r",
            Variant::DeactF => "deact_f",
        }
    }
}

/// What [`deactivation_check`] measures.
#[derive(Debug, Clone)]
pub struct DeactivationCheck {
    /// Harmful prompts for the harmfulness score (empty: not measured).
    pub harmful: Vec<String>,
    /// `(prompt, gold)` task items for the accuracy (empty: not measured).
    pub task: Vec<(String, String)>,
    /// How the task is judged.
    pub task_kind: TaskKind,
    /// The columns to compute, in order.
    pub variants: Vec<Variant>,
    /// Seed of [`random_like`]; draw `i` of the random control uses `seed + i`.
    pub seed: u64,
    /// How many random sets `Deact-R` draws (0 counts as 1): one row each, so that Deact-SN
    /// can be placed within the control's spread ([`compare_with_random`](super::compare_with_random)).
    pub random_draws: usize,
    /// Generation settings of both evaluations.
    pub eval: EvalConfig,
    /// The foundation ranking `Deact-F` draws from (required for [`Variant::DeactF`]).
    pub foundation: Option<NeuronRanking>,
    /// Held-out general text for the perplexity (empty: not measured).
    pub perplexity_texts: Vec<String>,
    /// Tokens per perplexity text (longer texts are truncated).
    pub perplexity_max_tokens: usize,
}

/// One measured column.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    /// Which column.
    pub variant: Variant,
    /// The seed of the random set (`Deact-R` rows only).
    pub seed: Option<u64>,
    /// Neurons zeroed (0 for [`Variant::None`]).
    pub neurons: usize,
    /// What [`deactivate`] did (absent for [`Variant::None`]).
    pub deactivation: Option<DeactivationSummary>,
    /// The harmfulness score, if harmful prompts were given.
    pub harmfulness: Option<HarmfulnessReport>,
    /// The task accuracy, if task items were given.
    pub accuracy: Option<AccuracyReport>,
    /// Keyword-harmful replies of `n` with the 95 % Wilson interval.
    pub harmful_rate: Option<Rate>,
    /// Keyword-harmful replies that are not degenerate ([`crate::eval::degenerate`](mod@crate::eval::degenerate)) of `n`:
    /// compliance that says something.
    pub nondegenerate_rate: Option<Rate>,
    /// Perplexity on the held-out general text, if texts were given.
    pub perplexity: Option<PerplexityReport>,
    /// `perplexity / the untouched model's` (`None` without both).
    pub perplexity_ratio: Option<f64>,
    /// The 95 % interval of `perplexity_ratio`, paired over the texts
    /// ([`PerplexityReport::ratio_to`]).
    pub perplexity_ratio_interval: Option<[f64; 2]>,
    /// Perplexity more than [`BROKEN_FACTOR`] times the untouched model's: the model no
    /// longer writes language, and its HS says nothing about safety.
    pub broken: bool,
}

/// The paper's Table 1 row for one model: harmfulness score (keyword and non-degenerate),
/// task accuracy and perplexity of `model` as given, with `set` deactivated (`Deact-SN`), with
/// a random set of the same structure (`Deact-R`, one row per draw of `check.random_draws`)
/// and with as many important foundation neurons outside the set (`Deact-F`), whichever of
/// these `check.variants` asks for. The untouched model's perplexity is measured too when
/// perplexity texts are given (to flag broken variants), even if [`Variant::None`] is not
/// asked for. `model` is not changed: each variant edits a copy.
pub fn deactivation_check(
    model: &Model,
    tok: &Tokenizer,
    set: &NeuronSet,
    check: &DeactivationCheck,
) -> crate::Result<Vec<VariantResult>> {
    let ppl = |m: &Model| -> crate::Result<Option<PerplexityReport>> {
        (!check.perplexity_texts.is_empty())
            .then(|| perplexity(m, tok, &check.perplexity_texts, check.perplexity_max_tokens))
            .transpose()
    };
    let reference = if check.variants.contains(&Variant::None) {
        None
    } else {
        ppl(model)?
    };
    // Each column once, and the random control once per draw (seeds seed, seed + 1, …).
    let rows: Vec<(Variant, Option<u64>)> = check
        .variants
        .iter()
        .flat_map(|&v| match v {
            Variant::DeactR => (0..check.random_draws.max(1) as u64)
                .map(|i| (v, Some(check.seed.wrapping_add(i))))
                .collect(),
            _ => vec![(v, None)],
        })
        .collect();
    let mut out: Vec<VariantResult> = Vec::with_capacity(rows.len());
    for (variant, seed) in rows {
        let mut m = model.clone();
        let deactivation = match variant {
            Variant::None => None,
            Variant::DeactSn => Some(deactivate(&mut m, set)?),
            Variant::DeactR => Some(deactivate(
                &mut m,
                &random_like(set, seed.unwrap_or(check.seed)),
            )?),
            Variant::DeactF => {
                let ranking = check.foundation.as_ref().ok_or_else(|| {
                    NeuronError::Invalid(
                        "deact_f needs a foundation importance ranking (SET.importance.json of a detection on general text)".into(),
                    )
                })?;
                Some(deactivate(&mut m, &foundation_like(set, ranking)?)?)
            }
        };
        let harmfulness = (!check.harmful.is_empty())
            .then(|| harmfulness_score(&m, tok, &check.harmful, &check.eval))
            .transpose()?;
        let accuracy = (!check.task.is_empty())
            .then(|| task_accuracy(&m, tok, &check.task, &check.task_kind, &check.eval))
            .transpose()?;
        let perplexity = ppl(&m)?;
        let base = reference
            .as_ref()
            .or_else(|| {
                out.iter()
                    .find(|r| r.variant == Variant::None)
                    .and_then(|r| r.perplexity.as_ref())
            })
            .or(if variant == Variant::None {
                perplexity.as_ref()
            } else {
                None
            });
        let ratio = base.zip(perplexity.as_ref()).map(|(b, p)| p.ratio_to(b));
        let perplexity_ratio = ratio.map(|q| q.ratio);
        let perplexity_ratio_interval = ratio.and_then(|q| q.interval);
        let (harmful_rate, nondegenerate_rate) = match &harmfulness {
            Some(h) => {
                let nondeg = h
                    .per_prompt
                    .iter()
                    .filter(|(p, r, harmful)| *harmful && degenerate(p, r).is_none())
                    .count();
                (
                    Some(Rate::new(h.harmful, h.n)),
                    Some(Rate::new(nondeg, h.n)),
                )
            }
            None => (None, None),
        };
        out.push(VariantResult {
            variant,
            seed,
            neurons: deactivation.as_ref().map_or(0, |d| d.neurons),
            deactivation,
            harmfulness,
            accuracy,
            harmful_rate,
            nondegenerate_rate,
            broken: perplexity_ratio.is_some_and(|r| r > BROKEN_FACTOR),
            perplexity_ratio,
            perplexity_ratio_interval,
            perplexity,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_neurons_touches_only_the_selected_column() {
        // W = [[1, 2, 3], [4, 5, 6]]; zero column 1 -> [[1, 0, 3], [4, 0, 6]]
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &candle_core::Device::Cpu).unwrap();
        let z = map_neurons(&w, Axis::Column, &[1], |_, xs| xs.fill(0.0)).unwrap();
        assert_eq!(
            z.to_vec2::<f32>().unwrap(),
            vec![vec![1., 0., 3.], vec![4., 0., 6.]]
        );
        let r = map_neurons(&w, Axis::Row, &[0], |_, xs| xs.fill(0.0)).unwrap();
        assert_eq!(
            r.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0., 0.], vec![4., 5., 6.]]
        );
    }

    fn module(name: &str, shape: [usize; 2], indices: Vec<u32>) -> ModuleNeurons {
        ModuleNeurons {
            axis: Axis::for_module(name),
            module: name.into(),
            shape,
            indices,
        }
    }

    #[test]
    fn random_like_keeps_counts_and_is_seeded() {
        let set = NeuronSet::new(
            serde_json::Value::Null,
            vec![
                module("model.layers.0.mlp.down_proj", [4, 10], vec![1, 2, 3]),
                module("model.layers.0.mlp.up_proj", [10, 4], (0..10).collect()),
            ],
        );
        let a = random_like(&set, 7);
        assert_eq!(a.modules, random_like(&set, 7).modules);
        assert_eq!(a.modules[0].indices.len(), 3);
        assert!(a.modules[0].indices.iter().all(|&i| i < 10));
        assert_eq!(a.modules[1].indices, (0..10).collect::<Vec<u32>>());
    }

    #[test]
    fn random_like_keeps_ffn_units_whole_and_counts_per_module() {
        // Layer 0: units {1, 2, 3} in gate, up and down, and down has an extra column 5;
        // q has 2 rows. Layer 1: units {0, 7} in all three.
        let ffn = |l: usize, kind: &str, idx: Vec<u32>| {
            let shape = if kind == "down_proj" {
                [4, 12]
            } else {
                [12, 4]
            };
            module(&format!("model.layers.{l}.mlp.{kind}"), shape, idx)
        };
        let set = NeuronSet::new(
            serde_json::Value::Null,
            vec![
                module("model.layers.0.self_attn.q_proj", [8, 4], vec![0, 6]),
                ffn(0, "gate_proj", vec![1, 2, 3]),
                ffn(0, "up_proj", vec![1, 2, 3]),
                ffn(0, "down_proj", vec![1, 2, 3, 5]),
                ffn(1, "gate_proj", vec![0, 7]),
                ffn(1, "up_proj", vec![0, 7]),
                ffn(1, "down_proj", vec![0, 7]),
            ],
        );
        for seed in 0..20 {
            let r = random_like(&set, seed);
            let get = |m: &str| r.get(m, Axis::for_module(m)).unwrap().indices.clone();
            for m in &set.modules {
                assert_eq!(get(&m.module).len(), m.indices.len(), "{}", m.module);
            }
            let (g0, u0, d0) = (
                get("model.layers.0.mlp.gate_proj"),
                get("model.layers.0.mlp.up_proj"),
                get("model.layers.0.mlp.down_proj"),
            );
            assert_eq!(g0, u0, "seed {seed}");
            assert!(
                g0.iter().all(|i| d0.contains(i)),
                "seed {seed}: {g0:?} {d0:?}"
            );
            assert_eq!(
                get("model.layers.1.mlp.gate_proj"),
                get("model.layers.1.mlp.down_proj")
            );
        }
        assert_ne!(random_like(&set, 1).modules, random_like(&set, 2).modules);
    }

    #[test]
    fn foundation_like_takes_the_top_ranked_neurons_outside_the_set() {
        let set = NeuronSet::new(
            serde_json::Value::Null,
            vec![
                module("model.layers.0.self_attn.q_proj", [6, 4], vec![0, 3]),
                module("model.layers.0.mlp.gate_proj", [5, 4], vec![4]),
            ],
        );
        let mut ranking = NeuronRanking::default();
        ranking.modules.insert(
            "model.layers.0.self_attn.q_proj".into(),
            vec![9.0, 1.0, 5.0, 8.0, 5.0, 0.5],
        );
        ranking.modules.insert(
            "model.layers.0.mlp.gate_proj".into(),
            vec![0.1, 0.3, 0.2, 0.0, 1.0],
        );
        let f = foundation_like(&set, &ranking).unwrap();
        // q: ranking 0 (9), 3 (8) are in the set; next 2 (5) and 4 (5, tie by index)
        assert_eq!(
            f.get("model.layers.0.self_attn.q_proj", Axis::Row)
                .unwrap()
                .indices,
            vec![2, 4]
        );
        assert_eq!(
            f.get("model.layers.0.mlp.gate_proj", Axis::Row)
                .unwrap()
                .indices,
            vec![1]
        );
        assert!(f.intersection(&set).unwrap().is_empty());
        assert_eq!(f.len(), set.len());
        ranking.modules.remove("model.layers.0.mlp.gate_proj");
        assert!(matches!(
            foundation_like(&set, &ranking),
            Err(NeuronError::Mismatch(_))
        ));
    }
}
