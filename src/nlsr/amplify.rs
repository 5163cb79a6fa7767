//! Pre-amplification: the safety reference model (paper section "Construction of a Safety
//! Reference Model", Eqs. 1-2; `docs/METHODS.md`, NLSR item 1). Every LoRA tensor, A and B
//! separately, is a linear combination of the inputs' tensors; the output keeps the config
//! (rank, alpha, targets) of the aligned adapter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{check_compatible, label, similarity::lora_norm, NlsrError};
use crate::adapters::{Adapter, LoraModule};
use crate::Result;

/// Which amplification, with its coefficient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum AmplifyMode {
    /// Eq. 2: `W_e = (1 + β) W_a - β W_0`.
    Extrapolate {
        /// β, the pre-amplification coefficient (paper default 0.9).
        beta: f64,
    },
    /// Eq. 1: `W_m = α W_strong + (1 - α) W_weak`.
    Interpolate {
        /// α ∈ (0, 1].
        alpha: f64,
    },
    /// The authors' code: every tensor of `W_a` times `2α` (A and B both, so `ΔW` x `4α²`).
    Code {
        /// α (the code's default 0.9: tensors x1.8, `ΔW` x3.24).
        alpha: f64,
    },
}

impl AmplifyMode {
    /// The coefficients `(c_a, c_0)` of `c_a W_a + c_0 W_0`.
    pub fn coefficients(self) -> (f64, f64) {
        match self {
            AmplifyMode::Extrapolate { beta } => (1.0 + beta, -beta),
            AmplifyMode::Interpolate { alpha } => (alpha, 1.0 - alpha),
            AmplifyMode::Code { alpha } => (2.0 * alpha, 0.0),
        }
    }
}

/// The largest pre-amplification coefficient taken (β of Eq. 2, α of the authors' code): the
/// paper's β are below 1; coefficients of thousands make `W_e` a scaled copy of `W_a` whose
/// products overflow f32 in the model.
pub const MAX_COEFFICIENT: f64 = 100.0;

/// Paper Eq. 2 (section "Construction of a Safety Reference Model"): LoRA extrapolation,
/// `W_e = (1 + β) W_a - β W_0`, per tensor (A and B separately), β ∈ [0, ∞).
///
/// # Shapes
/// - every module of both adapters: A `[r, in]`, B `[out, r]`, the same in both -> the same.
pub fn amplify(aligned: &Adapter, weak: &Adapter, beta: f64) -> Result<Adapter> {
    if !(beta.is_finite() && (0.0..=MAX_COEFFICIENT).contains(&beta)) {
        return Err(option(
            "beta",
            beta,
            &format!("must be a number from 0 to {MAX_COEFFICIENT} (the paper's are below 1)"),
        ));
    }
    combine(aligned, Some(weak), AmplifyMode::Extrapolate { beta })
}

/// Paper Eq. 1 (same section): LoRA interpolation, `W_m = α W_strong + (1 - α) W_weak`, per
/// tensor, α ∈ (0, 1].
///
/// # Shapes
/// - every module of both adapters: A `[r, in]`, B `[out, r]`, the same in both -> the same.
pub fn interpolate(strong: &Adapter, weak: &Adapter, alpha: f64) -> Result<Adapter> {
    if !(alpha > 0.0 && alpha <= 1.0) {
        return Err(option("alpha", alpha, "must be in (0, 1]"));
    }
    combine(strong, Some(weak), AmplifyMode::Interpolate { alpha })
}

/// The authors' code's amplification (not an equation of the paper): every LoRA tensor of
/// `W_a` times `2α`, so `ΔW` grows by `4α²` (x3.24 at α = 0.9). No weak adapter is used.
///
/// # Shapes
/// - A `[r, in]`, B `[out, r]` -> the same.
pub fn amplify_code(aligned: &Adapter, alpha: f64) -> Result<Adapter> {
    if !(alpha.is_finite() && alpha > 0.0 && alpha <= MAX_COEFFICIENT) {
        return Err(option(
            "alpha",
            alpha,
            &format!("must be a number > 0 and at most {MAX_COEFFICIENT} (the code uses 0.9)"),
        ));
    }
    combine(aligned, None, AmplifyMode::Code { alpha })
}

/// Runs `mode` (checking its coefficient as the functions above do).
pub fn run(aligned: &Adapter, weak: Option<&Adapter>, mode: AmplifyMode) -> Result<Adapter> {
    let need_weak = || option_str("weak", "(none)", "this mode needs the weak adapter W_0");
    match mode {
        AmplifyMode::Extrapolate { beta } => amplify(aligned, weak.ok_or_else(need_weak)?, beta),
        AmplifyMode::Interpolate { alpha } => {
            interpolate(aligned, weak.ok_or_else(need_weak)?, alpha)
        }
        AmplifyMode::Code { alpha } => amplify_code(aligned, alpha),
    }
}

fn option(name: &str, value: f64, reason: &str) -> crate::Error {
    option_str(name, &value.to_string(), reason)
}

fn option_str(name: &str, value: &str, reason: &str) -> crate::Error {
    NlsrError::Option {
        name: name.into(),
        value: value.into(),
        reason: reason.into(),
    }
    .into()
}

fn combine(aligned: &Adapter, weak: Option<&Adapter>, mode: AmplifyMode) -> Result<Adapter> {
    if let Some(w) = weak {
        check_compatible(aligned, "aligned adapter", w, "weak adapter", true)?;
    }
    let (ca, c0) = mode.coefficients();
    let mut modules = BTreeMap::new();
    for (path, a) in &aligned.modules {
        let m = match weak.and_then(|w| w.modules.get(path)) {
            Some(w) => LoraModule {
                a: ((&a.a * ca)? + (&w.a * c0)?)?,
                b: ((&a.b * ca)? + (&w.b * c0)?)?,
                scale: a.scale,
            },
            None => LoraModule {
                a: (&a.a * ca)?,
                b: (&a.b * ca)?,
                scale: a.scale,
            },
        };
        modules.insert(path.clone(), m);
    }
    Ok(Adapter {
        config: aligned.config.clone(),
        modules,
        source: None,
    })
}

/// What `realign amplify` writes beside the adapter (`amplify_report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmplifyReport {
    /// The mode and its coefficient.
    pub mode: AmplifyMode,
    /// `c_a` in `c_a W_a + c_0 W_0`.
    pub coefficient_aligned: f64,
    /// `c_0` (0 in the code mode).
    pub coefficient_weak: f64,
    /// The aligned (or strong) adapter.
    pub aligned: String,
    /// The weak adapter, if used.
    pub weak: Option<String>,
    /// Per module: `||ΔW||_F` of the inputs and of the output.
    pub modules: Vec<AmplifyModule>,
}

/// One module of an [`AmplifyReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmplifyModule {
    /// The module path.
    pub module: String,
    /// `||ΔW_a||_F`.
    pub norm_aligned: f64,
    /// `||ΔW_0||_F`, if a weak adapter was used.
    pub norm_weak: Option<f64>,
    /// `||ΔW_e||_F`.
    pub norm_output: f64,
}

/// The report of an amplification (norms through `r x r` products).
pub fn amplify_report(
    aligned: &Adapter,
    weak: Option<&Adapter>,
    output: &Adapter,
    mode: AmplifyMode,
) -> Result<AmplifyReport> {
    let (ca, c0) = mode.coefficients();
    let mut modules = Vec::new();
    for (path, m) in &output.modules {
        let norm_weak = match weak.and_then(|w| w.modules.get(path)) {
            Some(w) => Some(lora_norm(w)?),
            None => None,
        };
        let norm_aligned = match aligned.modules.get(path) {
            Some(a) => lora_norm(a)?,
            None => f64::NAN,
        };
        modules.push(AmplifyModule {
            module: path.clone(),
            norm_aligned,
            norm_weak,
            norm_output: lora_norm(m)?,
        });
    }
    Ok(AmplifyReport {
        mode,
        coefficient_aligned: ca,
        coefficient_weak: c0,
        aligned: label(aligned, "aligned adapter"),
        weak: weak.map(|w| label(w, "weak adapter")),
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraConfig;
    use candle_core::{Device, Tensor};

    fn adapter(a: [f32; 2], b: [f32; 2]) -> Adapter {
        let dev = Device::Cpu;
        let mut modules = BTreeMap::new();
        modules.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            LoraModule {
                a: Tensor::new(&[a], &dev).unwrap(),
                b: Tensor::new(&[[b[0]], [b[1]]], &dev).unwrap(),
                scale: 2.0,
            },
        );
        Adapter {
            config: LoraConfig::new(1, 2.0, vec!["q_proj".into()]),
            modules,
            source: None,
        }
    }

    #[test]
    fn extrapolation_interpolation_and_code_on_hand_made_tensors() {
        let wa = adapter([1.0, 2.0], [4.0, -2.0]);
        let w0 = adapter([0.0, 1.0], [2.0, 2.0]);
        let q = "model.layers.0.self_attn.q_proj";
        // β = 0.5: 1.5 [1, 2] - 0.5 [0, 1] = [1.5, 2.5]; 1.5 [4, -2] - 0.5 [2, 2] = [5, -4]
        let we = amplify(&wa, &w0, 0.5).unwrap();
        assert_eq!(
            we.modules[q].a.to_vec2::<f32>().unwrap(),
            vec![vec![1.5, 2.5]]
        );
        assert_eq!(
            we.modules[q].b.to_vec2::<f32>().unwrap(),
            vec![vec![5.0], vec![-4.0]]
        );
        assert_eq!(we.modules[q].scale, 2.0);
        // α = 0.25: 0.25 [1, 2] + 0.75 [0, 1] = [0.25, 1.25]
        let wm = interpolate(&wa, &w0, 0.25).unwrap();
        assert_eq!(
            wm.modules[q].a.to_vec2::<f32>().unwrap(),
            vec![vec![0.25, 1.25]]
        );
        // code, α = 0.75: x1.5: [1.5, 3], [6, -3]
        let wc = amplify_code(&wa, 0.75).unwrap();
        assert_eq!(
            wc.modules[q].a.to_vec2::<f32>().unwrap(),
            vec![vec![1.5, 3.0]]
        );
        assert_eq!(
            wc.modules[q].b.to_vec2::<f32>().unwrap(),
            vec![vec![6.0], vec![-3.0]]
        );
        // the report: ||ΔW_a|| = 2 · ||[4, -2]|| · ||[1, 2]|| = 2 · √20 · √5 = 20
        let r = amplify_report(&wa, None, &wc, AmplifyMode::Code { alpha: 0.75 }).unwrap();
        assert!((r.modules[0].norm_aligned - 20.0).abs() < 1e-9);
        // x 1.5² = 45
        assert!((r.modules[0].norm_output - 45.0).abs() < 1e-9);
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        let wa = adapter([1.0, 2.0], [4.0, -2.0]);
        let mut w0 = adapter([0.0, 1.0], [2.0, 2.0]);
        let m = w0
            .modules
            .remove("model.layers.0.self_attn.q_proj")
            .unwrap();
        w0.modules
            .insert("model.layers.0.self_attn.v_proj".into(), m);
        let err = amplify(&wa, &w0, 0.9).unwrap_err().to_string();
        assert!(err.contains("v_proj") && err.contains("q_proj"), "{err}");
        assert!(amplify(&wa, &wa, -1.0).is_err());
        assert!(interpolate(&wa, &wa, 1.5).is_err());
    }
}
