//! The deactivation check (safety-neurons paper, §2.2, Table 1): zero the selected neurons
//! (rows or columns of full weights) and measure harmfulness and task accuracy; a random set
//! of the same size per module (`Deact-R`) is the control.
//!
//! Deactivation edits the full weights, so unmerged LoRA adapters are folded into the weights
//! first ([`fold_adapters`]): a neuron is then off in the model the adapters produce.

use candle_core::Tensor;
use rand::{rngs::StdRng, SeedableRng};

use super::{Axis, ModuleNeurons, NeuronError, NeuronSet};
use crate::eval::{harmfulness_score, task_accuracy, EvalConfig, TaskKind};
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

/// The paper's `Deact-R` control: for every module of `set`, as many neurons of the same axis
/// drawn uniformly without replacement from `0..axis_len`, with a seeded RNG (same seed and
/// set, same result). Meta records the seed and that the set is random.
pub fn random_like(set: &NeuronSet, seed: u64) -> NeuronSet {
    let mut rng = StdRng::seed_from_u64(seed);
    let modules = set
        .modules
        .iter()
        .map(|m| {
            let n = m.axis_len();
            let k = m.indices.len().min(n);
            let indices = rand::seq::index::sample(&mut rng, n, k)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            ModuleNeurons {
                module: m.module.clone(),
                axis: m.axis,
                shape: m.shape,
                indices,
            }
        })
        .collect();
    NeuronSet::new(
        serde_json::json!({"random_like": true, "seed": seed, "neurons": set.len()}),
        modules,
    )
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
}

impl Variant {
    /// `none`, `deact_sn`, `deact_r`.
    pub fn name(&self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::DeactSn => "deact_sn",
            Variant::DeactR => "deact_r",
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
    /// Seed of [`random_like`].
    pub seed: u64,
    /// Generation settings of both evaluations.
    pub eval: EvalConfig,
}

/// One measured column.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    /// Which column.
    pub variant: Variant,
    /// Neurons zeroed (0 for [`Variant::None`]).
    pub neurons: usize,
    /// What [`deactivate`] did (absent for [`Variant::None`]).
    pub deactivation: Option<DeactivationSummary>,
    /// The harmfulness score, if harmful prompts were given.
    pub harmfulness: Option<HarmfulnessReport>,
    /// The task accuracy, if task items were given.
    pub accuracy: Option<AccuracyReport>,
}

/// The paper's Table 1 row for one model: harmfulness score and task accuracy of `model` as
/// given, with `set` deactivated, and with a random set of the same size deactivated
/// (whichever of these `check.variants` asks for). `model` is not changed: each variant edits a
/// copy.
pub fn deactivation_check(
    model: &Model,
    tok: &Tokenizer,
    set: &NeuronSet,
    check: &DeactivationCheck,
) -> crate::Result<Vec<VariantResult>> {
    let mut out = Vec::with_capacity(check.variants.len());
    for &variant in &check.variants {
        let mut m = model.clone();
        let deactivation = match variant {
            Variant::None => None,
            Variant::DeactSn => Some(deactivate(&mut m, set)?),
            Variant::DeactR => Some(deactivate(&mut m, &random_like(set, check.seed))?),
        };
        let harmfulness = (!check.harmful.is_empty())
            .then(|| harmfulness_score(&m, tok, &check.harmful, &check.eval))
            .transpose()?;
        let accuracy = (!check.task.is_empty())
            .then(|| task_accuracy(&m, tok, &check.task, &check.task_kind, &check.eval))
            .transpose()?;
        out.push(VariantResult {
            variant,
            neurons: deactivation.as_ref().map_or(0, |d| d.neurons),
            deactivation,
            harmfulness,
            accuracy,
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

    #[test]
    fn random_like_keeps_counts_and_is_seeded() {
        let set = NeuronSet::new(
            serde_json::Value::Null,
            vec![
                ModuleNeurons {
                    module: "model.layers.0.mlp.down_proj".into(),
                    axis: Axis::Column,
                    shape: [4, 10],
                    indices: vec![1, 2, 3],
                },
                ModuleNeurons {
                    module: "model.layers.0.mlp.up_proj".into(),
                    axis: Axis::Row,
                    shape: [10, 4],
                    indices: (0..10).collect(),
                },
            ],
        );
        let a = random_like(&set, 7);
        assert_eq!(a.modules, random_like(&set, 7).modules);
        assert_eq!(a.modules[0].indices.len(), 3);
        assert!(a.modules[0].indices.iter().all(|&i| i < 10));
        assert_eq!(a.modules[1].indices, (0..10).collect::<Vec<u32>>());
    }
}
