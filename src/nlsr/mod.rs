//! NLSR: neuron-level safety realignment without training (Yi et al. 2025, "NLSR:
//! Neuron-Level Safety Realignment of Large Language Models Against Harmful Fine-Tuning",
//! AAAI; `docs/METHODS.md`, section NLSR), for LoRA adapters.
//!
//! Identification runs the model on a safety corpus; every later stage works on adapters and
//! the masks file alone ([`masks`]).
//!
//! | module | paper | what |
//! |---|---|---|
//! | [`amplify`] | Eqs. 1-2 | the safety reference `W_e` from the aligned `W_a` and the weak `W_0` |
//! | [`identify`] | Eqs. 3-6 | safety-critical neurons of `W_e` from activations: low-rank, Wanda, SNIP, preference-SNIP, random |
//! | [`masks`] | Eq. 6 | the 0/1 masks `M_A`, `M_B` per module, on disk |
//! | [`similarity`] | Eq. 8 | the cosine of the masked regions of `W_e` and `W_t`, through `r x r` products |
//! | [`prune`] | Eqs. 9-10 | which modules are repaired: ranks, probabilities, seeded Bernoulli draws |
//! | [`transplant`] | Eq. 11 | the repair: entry replacement (the authors' code) or the exact rank-2r sum |
//! | [`patch`] | Eqs. 8-11 | the whole repair of an adapter, its report, Markdown and plot |
//!
//! ```no_run
//! use realign::adapters::Adapter;
//! use realign::nlsr::{amplify, masks, patch};
//! let dev = candle_core::Device::Cpu;
//! let aligned = Adapter::load("aligned".as_ref(), &dev)?;
//! let weak = Adapter::load("sft".as_ref(), &dev)?;
//! let reference = amplify::amplify(&aligned, &weak, 0.9)?;
//! let finetuned = Adapter::load("finetuned".as_ref(), &dev)?;
//! let m = masks::load("masks.safetensors".as_ref(), &dev)?;
//! let outcome = patch::patch(&reference, &finetuned, &m, &patch::PatchConfig::default())?;
//! patch::write_patch("realigned".as_ref(), &outcome)?;
//! # Ok::<(), realign::Error>(())
//! ```

use std::path::PathBuf;

use crate::adapters::Adapter;

pub mod amplify;
pub mod gram;
pub mod identify;
pub mod masks;
pub mod patch;
pub(crate) mod plot;
pub mod prune;
pub mod similarity;
pub mod stream;
pub mod transplant;

/// Errors of the NLSR and Safe LoRA stages; each names the inputs, module and shapes concerned.
#[derive(Debug, thiserror::Error)]
pub enum NlsrError {
    /// A raw factor (or mask) slice whose length is not the product of the dims given with it.
    #[error("{what}: {got} values given for a {rows} x {cols} factor ({} expected)", rows * cols)]
    FactorLength {
        /// Which factor (`reference B`, `mask A`, ...).
        what: String,
        /// Rows of the factor.
        rows: usize,
        /// Columns of the factor.
        cols: usize,
        /// The slice's length.
        got: usize,
    },
    /// Two inputs that must adapt the same modules do not.
    #[error("{left} and {right} adapt different modules: only in the first ({left_count}): {only_left:?}; only in the second ({right_count}): {only_right:?}{}", if left_count + right_count > only_left.len() + only_right.len() { " (the first 5 of each listed)" } else { "" })]
    ModuleSets {
        /// The first input (a folder or file).
        left: String,
        /// The second input.
        right: String,
        /// Modules (at most 5 listed) only the first has.
        only_left: Vec<String>,
        /// Modules (at most 5 listed) only the second has.
        only_right: Vec<String>,
        /// How many modules only the first has.
        left_count: usize,
        /// How many modules only the second has.
        right_count: usize,
    },
    /// A tensor whose shape differs between two inputs (different ranks or layer sizes).
    #[error(
        "module {module}: {tensor} is {left_shape:?} in {left} but {right_shape:?} in {right}"
    )]
    Shapes {
        /// The module path.
        module: String,
        /// `lora_A`, `lora_B` or the weight concerned.
        tensor: &'static str,
        /// The first input.
        left: String,
        /// Its shape.
        left_shape: [usize; 2],
        /// The second input.
        right: String,
        /// Its shape.
        right_shape: [usize; 2],
    },
    /// Two adapters whose factors are combined entry by entry but whose scales differ.
    #[error("module {module}: scale (alpha/r) is {left_scale} in {left} but {right_scale} in {right}; the factors cannot be combined entry by entry")]
    Scales {
        /// The module path.
        module: String,
        /// The first input.
        left: String,
        /// Its scale.
        left_scale: f64,
        /// The second input.
        right: String,
        /// Its scale.
        right_scale: f64,
    },
    /// A masks file that is not what identification writes.
    #[error("{file}: {reason}")]
    Masks {
        /// The masks file.
        file: PathBuf,
        /// What is wrong (with the tensor key).
        reason: String,
    },
    /// An option out of its range.
    #[error("invalid {name} = {value}: {reason}")]
    Option {
        /// The option.
        name: String,
        /// Its value.
        value: String,
        /// The accepted range.
        reason: String,
    },
    /// Safe LoRA's alignment update is zero in every module: there is no subspace to project
    /// onto, and every module would be projected to zero.
    #[error(
        "the alignment update V is zero in all {modules} modules: the aligned weights equal the \
         base's, so Safe LoRA has no alignment subspace to project onto (check that --aligned \
         names the aligned adapter and its lora_B is not all zeros, or that --base and \
         --aligned-model are different models)"
    )]
    ZeroAlignment {
        /// The number of modules.
        modules: usize,
    },
    /// A value that is not finite where a number is needed (a NaN similarity).
    #[error("module {module}: {what} is not finite ({value})")]
    NotFinite {
        /// The module path.
        module: String,
        /// What was computed.
        what: String,
        /// The value.
        value: f64,
    },
}

/// How an input is named in errors and reports: its folder, else `what`.
pub(crate) fn label(adapter: &Adapter, what: &str) -> String {
    adapter
        .source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| what.to_string())
}

/// Checks that two adapters adapt the same modules with the same factor shapes (and, when
/// `same_scale`, the same scales), naming both in the error.
pub(crate) fn check_compatible(
    left: &Adapter,
    left_name: &str,
    right: &Adapter,
    right_name: &str,
    same_scale: bool,
) -> crate::Result<()> {
    let (l, r) = (label(left, left_name), label(right, right_name));
    check_module_sets(
        left.modules.keys(),
        &l,
        right.modules.keys().map(String::as_str).collect(),
        &r,
    )?;
    for (path, a) in &left.modules {
        let Some(b) = right.modules.get(path) else {
            continue;
        };
        for (tensor, x, y) in [("lora_A", &a.a, &b.a), ("lora_B", &a.b, &b.b)] {
            if x.dims() != y.dims() {
                return Err(NlsrError::Shapes {
                    module: path.clone(),
                    tensor,
                    left: l.clone(),
                    left_shape: dims2(x),
                    right: r.clone(),
                    right_shape: dims2(y),
                }
                .into());
            }
        }
        if same_scale && (a.scale - b.scale).abs() > 1e-9 * a.scale.abs().max(1.0) {
            return Err(NlsrError::Scales {
                module: path.clone(),
                left: l.clone(),
                left_scale: a.scale,
                right: r.clone(),
                right_scale: b.scale,
            }
            .into());
        }
    }
    Ok(())
}

/// Checks that two sets of module paths are equal.
pub(crate) fn check_module_sets<'a>(
    left: impl Iterator<Item = &'a String>,
    left_name: &str,
    right: std::collections::BTreeSet<&str>,
    right_name: &str,
) -> crate::Result<()> {
    let left: std::collections::BTreeSet<&str> = left.map(String::as_str).collect();
    if left == right {
        return Ok(());
    }
    let only = |x: &std::collections::BTreeSet<&str>, y: &std::collections::BTreeSet<&str>| {
        x.difference(y).take(5).map(|s| s.to_string()).collect()
    };
    Err(NlsrError::ModuleSets {
        left: left_name.to_string(),
        right: right_name.to_string(),
        only_left: only(&left, &right),
        only_right: only(&right, &left),
        left_count: left.difference(&right).count(),
        right_count: right.difference(&left).count(),
    }
    .into())
}

/// Checks that an aligned and a fine-tuned adapter adapt the same modules with the same
/// `[out, in]` per module (their ranks may differ), and returns their labels for messages.
pub(crate) fn check_same_updates(
    aligned: &Adapter,
    finetuned: &Adapter,
) -> crate::Result<(String, String)> {
    let (al, tl) = (
        label(aligned, "aligned adapter"),
        label(finetuned, "fine-tuned adapter"),
    );
    check_module_sets(
        aligned.modules.keys(),
        &al,
        finetuned.modules.keys().map(String::as_str).collect(),
        &tl,
    )?;
    for (path, t) in &finetuned.modules {
        let a = &aligned.modules[path];
        let (t_shape, a_shape) = (
            [dims2(&t.b)[0], dims2(&t.a)[1]],
            [dims2(&a.b)[0], dims2(&a.a)[1]],
        );
        if t_shape != a_shape {
            return Err(NlsrError::Shapes {
                module: path.clone(),
                tensor: "ΔW [out, in]",
                left: al,
                left_shape: a_shape,
                right: tl,
                right_shape: t_shape,
            }
            .into());
        }
    }
    Ok((al, tl))
}

/// The layer index of a module path: the number after `.layers.` (else the first numeric
/// segment), e.g. `model.layers.3.mlp.up_proj` -> 3.
pub(crate) fn layer_of(module: &str) -> Option<usize> {
    let segs: Vec<&str> = module.split('.').collect();
    segs.windows(2)
        .find(|w| w[0] == "layers")
        .and_then(|w| w[1].parse().ok())
        .or_else(|| segs.iter().find_map(|s| s.parse().ok()))
}

/// The module kind: the last segment of the path (`q_proj`, `down_proj`).
pub(crate) fn kind_of(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// The shape of a 2-D tensor (LoRA factors and masks are checked 2-D when read); missing
/// dimensions read as 0.
pub(crate) fn dims2(t: &candle_core::Tensor) -> [usize; 2] {
    let d = t.dims();
    [
        d.first().copied().unwrap_or(0),
        d.get(1).copied().unwrap_or(0),
    ]
}
