//! The neuron-set file: which rows or columns of which full-model weight matrices are selected.
//!
//! A *neuron* (safety-neurons paper, §2.1) is one row or one column of a weight matrix
//! `[out, in]` (PyTorch layout). The FFN neuron `k` is row `k` of `gate_proj` and `up_proj` and
//! column `k` of `down_proj`; the attention neurons are rows of `q_proj`, `k_proj`, `v_proj` and
//! columns of `o_proj`. A set file is JSON:
//!
//! ```json
//! {"format": "realign-neuron-set", "version": 1,
//!  "meta": {"...": "free-form: corpus, rule, model"},
//!  "modules": [{"module": "model.layers.0.self_attn.q_proj", "axis": "row",
//!               "shape": [576, 576], "indices": [3, 17]}]}
//! ```
//!
//! Modules are kept sorted by (layer, module name) and indices sorted and unique, so equal sets
//! write equal bytes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::NeuronError;

/// Whether a neuron is a row (output unit) or a column (input unit) of `[out, in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// Row `k` of the weight: output unit `k`.
    Row,
    /// Column `k` of the weight: input unit `k`.
    Column,
}

impl Axis {
    /// `row` or `column`, as the set file writes it.
    pub fn name(self) -> &'static str {
        match self {
            Axis::Row => "row",
            Axis::Column => "column",
        }
    }

    /// The axis the paper uses for a module's neurons: columns for `o_proj` and `down_proj`
    /// (their input is the unit that is switched off), rows for the others.
    pub fn for_module(module: &str) -> Axis {
        if module.ends_with("o_proj") || module.ends_with("down_proj") {
            Axis::Column
        } else {
            Axis::Row
        }
    }
}

/// The selected neurons of one weight matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleNeurons {
    /// Checkpoint path of the linear module, e.g. `model.layers.0.mlp.up_proj`.
    pub module: String,
    /// Rows or columns.
    pub axis: Axis,
    /// Weight shape `[out, in]`.
    pub shape: [usize; 2],
    /// Selected indices along `axis`, sorted, unique.
    pub indices: Vec<u32>,
}

impl ModuleNeurons {
    /// Number of units along the axis (rows: `out`, columns: `in`).
    pub fn axis_len(&self) -> usize {
        match self.axis {
            Axis::Row => self.shape[0],
            Axis::Column => self.shape[1],
        }
    }

    /// Parameters per neuron (a row has `in` entries, a column `out`).
    pub fn params_per_neuron(&self) -> usize {
        match self.axis {
            Axis::Row => self.shape[1],
            Axis::Column => self.shape[0],
        }
    }
}

/// A set of neurons across a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeuronSet {
    /// Free-form provenance (corpus, rule, model, counts).
    #[serde(default)]
    pub meta: serde_json::Value,
    /// Per module, sorted by layer then name; modules with no neuron are omitted.
    pub modules: Vec<ModuleNeurons>,
}

#[derive(Serialize, Deserialize)]
struct SetFile {
    format: String,
    version: u32,
    #[serde(flatten)]
    set: NeuronSet,
}

const FORMAT: &str = "realign-neuron-set";

/// `model.layers.12.mlp.up_proj` → `(12, "mlp.up_proj")`; non-layer names sort last.
pub fn layer_key(module: &str) -> (usize, String) {
    let rest = module.strip_prefix("model.layers.").unwrap_or(module);
    match rest.split_once('.') {
        Some((i, tail)) => match i.parse() {
            Ok(i) => (i, tail.to_string()),
            Err(_) => (usize::MAX, module.to_string()),
        },
        None => (usize::MAX, module.to_string()),
    }
}

/// The layer index of a module path, if it is inside `model.layers.N`.
pub fn layer_of(module: &str) -> Option<usize> {
    let (l, _) = layer_key(module);
    (l != usize::MAX).then_some(l)
}

impl NeuronSet {
    /// Builds a set, normalising order (modules by layer then name; indices sorted, unique)
    /// and dropping empty modules.
    pub fn new(meta: serde_json::Value, modules: Vec<ModuleNeurons>) -> Self {
        let mut modules: Vec<ModuleNeurons> = modules
            .into_iter()
            .map(|mut m| {
                m.indices.sort_unstable();
                m.indices.dedup();
                m
            })
            .filter(|m| !m.indices.is_empty())
            .collect();
        modules.sort_by_key(|m| layer_key(&m.module));
        Self { meta, modules }
    }

    /// Total number of neurons.
    pub fn len(&self) -> usize {
        self.modules.iter().map(|m| m.indices.len()).sum()
    }

    /// Whether no neuron is selected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of weight entries covered by the neurons (a row and a column of the same
    /// matrix share one entry; this counts it twice only if a module appears with both axes).
    pub fn params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.indices.len() * m.params_per_neuron())
            .sum()
    }

    /// The module entry for `(module, axis)`.
    pub fn get(&self, module: &str, axis: Axis) -> Option<&ModuleNeurons> {
        self.modules
            .iter()
            .find(|m| m.module == module && m.axis == axis)
    }

    fn combine(
        &self,
        other: &NeuronSet,
        keep: impl Fn(bool, bool) -> bool,
    ) -> Result<NeuronSet, NeuronError> {
        type Pair<'a> = (Option<&'a ModuleNeurons>, Option<&'a ModuleNeurons>);
        let mut all: BTreeMap<(String, Axis), Pair> = BTreeMap::new();
        for m in &self.modules {
            all.entry((m.module.clone(), m.axis)).or_default().0 = Some(m);
        }
        for m in &other.modules {
            all.entry((m.module.clone(), m.axis)).or_default().1 = Some(m);
        }
        let mut out = Vec::new();
        for ((module, axis), (a, b)) in all {
            if let (Some(a), Some(b)) = (a, b) {
                if a.shape != b.shape {
                    return Err(NeuronError::Mismatch(format!(
                        "{module}: shape {:?} in one set, {:?} in the other",
                        a.shape, b.shape
                    )));
                }
            }
            let shape = a.or(b).map(|m| m.shape).unwrap_or_default();
            let sa: std::collections::BTreeSet<u32> = a
                .map(|m| m.indices.iter().copied().collect())
                .unwrap_or_default();
            let sb: std::collections::BTreeSet<u32> = b
                .map(|m| m.indices.iter().copied().collect())
                .unwrap_or_default();
            let indices: Vec<u32> = sa
                .union(&sb)
                .copied()
                .filter(|i| keep(sa.contains(i), sb.contains(i)))
                .collect();
            out.push(ModuleNeurons {
                module,
                axis,
                shape,
                indices,
            });
        }
        Ok(NeuronSet::new(serde_json::Value::Null, out))
    }

    /// Neurons in both sets.
    pub fn intersection(&self, other: &NeuronSet) -> Result<NeuronSet, NeuronError> {
        self.combine(other, |a, b| a && b)
    }

    /// Neurons in either set.
    pub fn union(&self, other: &NeuronSet) -> Result<NeuronSet, NeuronError> {
        self.combine(other, |a, b| a || b)
    }

    /// Neurons of `self` that are not in `other` (RSN-Tune: safety minus foundation).
    pub fn difference(&self, other: &NeuronSet) -> Result<NeuronSet, NeuronError> {
        self.combine(other, |a, b| a && !b)
    }

    /// The paper's overlap ratio `|self ∩ other| / |other|` (§2.3); 0 when `other` is empty.
    pub fn overlap(&self, other: &NeuronSet) -> Result<f64, NeuronError> {
        let inter = self.intersection(other)?.len();
        Ok(if other.is_empty() {
            0.0
        } else {
            inter as f64 / other.len() as f64
        })
    }

    /// Reads a set file, checking the format tag, index ranges and order.
    pub fn load(path: &Path) -> Result<NeuronSet, NeuronError> {
        let bytes = std::fs::read(path).map_err(|source| NeuronError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file: SetFile = serde_json::from_slice(&bytes).map_err(|e| NeuronError::Format {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        if file.format != FORMAT || file.version != 1 {
            return Err(NeuronError::Format {
                path: path.to_path_buf(),
                what: format!(
                    "expected format \"{FORMAT}\" version 1, found \"{}\" version {}",
                    file.format, file.version
                ),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &file.set.modules {
            // A module listed twice would be counted twice by every count, overlap and check.
            if !seen.insert((m.module.as_str(), m.axis)) {
                return Err(NeuronError::BadSet {
                    path: path.to_path_buf(),
                    what: format!(
                        "module {} (axis {}) is listed twice",
                        m.module,
                        m.axis.name()
                    ),
                });
            }
            if let Some(&bad) = m.indices.iter().find(|&&i| i as usize >= m.axis_len()) {
                return Err(NeuronError::Format {
                    path: path.to_path_buf(),
                    what: format!(
                        "{}: index {bad} out of range for {:?} of shape {:?}",
                        m.module, m.axis, m.shape
                    ),
                });
            }
        }
        Ok(NeuronSet::new(file.set.meta, file.set.modules))
    }

    /// [`load`](Self::load), refusing a set with no neuron (`S.json: the set is empty`): for
    /// the commands that zero, train or combine neurons, where an empty set would silently do
    /// nothing.
    pub fn load_nonempty(path: &Path) -> Result<NeuronSet, NeuronError> {
        let set = Self::load(path)?;
        if set.is_empty() {
            return Err(NeuronError::BadSet {
                path: path.to_path_buf(),
                what: "the set is empty".into(),
            });
        }
        Ok(set)
    }

    /// The architecture the set was detected on (`meta.architecture`: `llama`, `mistral`,
    /// `qwen2`), if its file records one.
    pub fn architecture(&self) -> Option<&str> {
        self.meta.get("architecture").and_then(|a| a.as_str())
    }

    /// Refuses applying the set (read from `path`) to a model of another architecture than
    /// the one it was detected on: module names and shapes can agree between, e.g., a Llama
    /// and a Qwen2 model of the same sizes, and the neurons of one mean nothing in the other.
    /// A set without `meta.architecture` (hand-written, or older) is not checked.
    pub fn check_architecture(
        &self,
        path: &Path,
        architecture: crate::model::Architecture,
    ) -> Result<(), NeuronError> {
        let model = serde_json::to_value(architecture)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        match self.architecture() {
            Some(set) if set != model => Err(NeuronError::BadSet {
                path: path.to_path_buf(),
                what: format!(
                    "the set was detected on a {set} model (meta.architecture), this model is \
                     {model}: its neurons are not this model's"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Refuses applying the set (read from `path`) to `model` when a module it names is not
    /// the model's, has another shape, or an index is out of range; the error names the file.
    pub fn check_model(&self, path: &Path, model: &crate::model::Model) -> Result<(), NeuronError> {
        for m in &self.modules {
            super::deactivate::check_module(model, m).map_err(|e| match e {
                NeuronError::Mismatch(what) => NeuronError::BadSet {
                    path: path.to_path_buf(),
                    what: format!("{what}: it was detected on another model"),
                },
                other => other,
            })?;
        }
        Ok(())
    }

    /// The bytes of the set file (pretty JSON; equal sets give equal bytes).
    pub fn to_json(&self) -> String {
        let file = SetFile {
            format: FORMAT.into(),
            version: 1,
            set: self.clone(),
        };
        // Strings, integers and vectors only: serialising cannot fail.
        #[allow(clippy::expect_used)]
        let mut s = serde_json::to_string_pretty(&file).expect("a neuron set serialises");
        s.push('\n');
        s
    }

    /// Writes the set file atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        crate::fsutil::write_atomic(path, self.to_json().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(module: &str, indices: &[u32]) -> ModuleNeurons {
        ModuleNeurons {
            module: module.into(),
            axis: Axis::for_module(module),
            shape: [8, 4],
            indices: indices.to_vec(),
        }
    }

    #[test]
    fn set_file_round_trips_byte_identically() {
        let set = NeuronSet::new(
            serde_json::json!({"corpus": "x"}),
            vec![
                m("model.layers.10.mlp.down_proj", &[3, 1, 1]),
                m("model.layers.2.self_attn.q_proj", &[7, 0]),
                m("model.layers.2.self_attn.k_proj", &[]),
            ],
        );
        assert_eq!(set.modules.len(), 2);
        assert_eq!(set.modules[0].module, "model.layers.2.self_attn.q_proj");
        assert_eq!(set.modules[1].indices, vec![1, 3]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        set.save(&p).unwrap();
        let back = NeuronSet::load(&p).unwrap();
        assert_eq!(back, set);
        assert_eq!(back.to_json(), std::fs::read_to_string(&p).unwrap());
        // a column of down_proj [8, 4] has 8 entries, a row of q_proj [8, 4] has 4
        assert_eq!(set.params(), 2 * 4 + 2 * 8);
    }

    #[test]
    fn set_algebra_and_overlap() {
        let a = NeuronSet::new(
            serde_json::Value::Null,
            vec![m("model.layers.0.mlp.up_proj", &[0, 1, 2, 3])],
        );
        let b = NeuronSet::new(
            serde_json::Value::Null,
            vec![
                m("model.layers.0.mlp.up_proj", &[2, 3, 4]),
                m("model.layers.1.mlp.up_proj", &[5]),
            ],
        );
        assert_eq!(a.intersection(&b).unwrap().len(), 2);
        assert_eq!(a.union(&b).unwrap().len(), 6);
        assert_eq!(a.difference(&b).unwrap().modules[0].indices, vec![0, 1]);
        assert!((a.overlap(&b).unwrap() - 0.5).abs() < 1e-12);
        assert!((b.overlap(&a).unwrap() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_module_listed_twice_and_an_empty_set_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dupmod.json");
        let mut set = NeuronSet::new(
            serde_json::Value::Null,
            vec![m("model.layers.0.mlp.down_proj", &[1])],
        );
        set.modules.push(m("model.layers.0.mlp.down_proj", &[2]));
        std::fs::write(&p, set.to_json()).unwrap();
        let e = NeuronSet::load(&p).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "dupmod.json: module model.layers.0.mlp.down_proj (axis column) is listed twice"
            ),
            "{e}"
        );
        // the same module on the other axis is a different entry
        set.modules[1].axis = Axis::Row;
        std::fs::write(&p, set.to_json()).unwrap();
        assert_eq!(NeuronSet::load(&p).unwrap().len(), 2);

        let empty = dir.path().join("S.json");
        NeuronSet::default().save(&empty).unwrap();
        assert!(NeuronSet::load(&empty).unwrap().is_empty());
        let e = NeuronSet::load_nonempty(&empty).unwrap_err().to_string();
        assert!(e.ends_with("S.json: the set is empty"), "{e}");
    }

    #[test]
    fn out_of_range_index_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        let mut set = NeuronSet::new(
            serde_json::Value::Null,
            vec![m("model.layers.0.mlp.up_proj", &[1])],
        );
        set.modules[0].indices = vec![9];
        std::fs::write(&p, set.to_json()).unwrap();
        let e = NeuronSet::load(&p).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("index 9"), "{e}");
    }
}
