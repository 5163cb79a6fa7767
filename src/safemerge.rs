//! SafeMERGE (Djuhera, Kadhe, Ahmed, Zawad and Boche 2025, "SafeMERGE: Preserving Safety
//! Alignment in Fine-Tuned Large Language Models via Selective Layer-Wise Model Merging",
//! arXiv:2503.17239, section 3): a training-free repair that merges the fine-tuned model with a
//! safe model only in the layers whose fine-tuning update left the safety subspace.
//!
//! Per module `j`, with the fine-tuning update `ΔW_j = W_t − W_a` and Safe LoRA's projection
//! `C_j = V_j V_jᵀ / ||V_j||_F` onto the alignment update `V_j` ([`crate::safelora`]):
//!
//! `ρ_j = <C_j ΔW_j, ΔW_j>_F / (||C_j ΔW_j||_F ||ΔW_j||_F)`;
//! `W_j ← α W_t,j + (1 − α) W_a,j` if `ρ_j < τ`, else `W_t,j`.
//!
//! The paper's safe model is a LoRA trained on safety data; here it is the aligned adapter
//! `W_a` itself (the model the fine-tune started from), so a merged module is
//! `W_a + α ΔW_j`: the fine-tuning update scaled by `α`. The result is the rank `r_t + r_a`
//! adapter `B = [c_t s_t B_t | c_a s_a B_a]`, `A = [A_t; A_a]` with `(c_t, c_a) = (α, 1 − α)`
//! in merged modules and `(1, 0)` elsewhere ([`crate::safelora::stacked_combination`]), which
//! peft loads like any other. Only the linear merge is implemented (not TIES/DARE).
//!
//! ```no_run
//! use realign::adapters::Adapter;
//! let dev = candle_core::Device::Cpu;
//! let wa = Adapter::load("aligned".as_ref(), &dev)?;
//! let wt = Adapter::load("finetuned".as_ref(), &dev)?;
//! let (merged, report) = realign::safemerge::safemerge(&wa, &wt, 0.5, 0.5)?;
//! merged.save("safemerge".as_ref())?;
//! # Ok::<(), realign::Error>(())
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::adapters::Adapter;
use crate::nlsr::{label, NlsrError};
use crate::safelora::{
    alignment_from_adapter, finetuning_update, safe_lora, stacked_combination, SafeLoraSelection,
};
use crate::Result;

/// The report file written beside the adapter.
pub const REPORT_JSON: &str = "safemerge_report.json";

/// One module of a [`SafeMergeReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafeMergeModule {
    /// The module path.
    pub module: String,
    /// `ρ_j = cos(C ΔW, ΔW)` of the fine-tuning update.
    pub cosine: f64,
    /// Whether the module was merged (`ρ_j < τ`).
    pub merged: bool,
}

/// What `realign safemerge` writes as `safemerge_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafeMergeReport {
    /// The aligned adapter (the safe model and the alignment update `V`).
    pub aligned: String,
    /// The fine-tuned adapter `W_t`.
    pub finetuned: String,
    /// The cosine threshold `τ`.
    pub threshold: f64,
    /// The weight `α` of the fine-tuned model in a merged module.
    pub alpha: f64,
    /// The formula, in words.
    pub formula: String,
    /// The number of merged modules.
    pub num_merged: usize,
    /// Every module, in module order.
    pub modules: Vec<SafeMergeModule>,
}

/// SafeMERGE of a fine-tuned adapter with the aligned one (see the
/// [module documentation](self)), and its report.
///
/// Errors: `τ` outside `[-1, 1]`, `α` outside `[0, 1]`; adapters over different modules or
/// `[out, in]`.
pub fn safemerge(
    aligned: &Adapter,
    finetuned: &Adapter,
    threshold: f64,
    alpha: f64,
) -> Result<(Adapter, SafeMergeReport)> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(NlsrError::Option {
            name: "alpha".into(),
            value: alpha.to_string(),
            reason: "must be in [0, 1] (the weight of the fine-tuned model)".into(),
        }
        .into());
    }
    if !(-1.0..=1.0).contains(&threshold) {
        return Err(NlsrError::Option {
            name: "threshold".into(),
            value: threshold.to_string(),
            reason: "must be in [-1, 1]: it is compared with a cosine (below -1 no module is \
                     merged, above 1 every one is)"
                .into(),
        }
        .into());
    }
    let update = finetuning_update(aligned, finetuned)?;
    let (_, sl) = safe_lora(
        &alignment_from_adapter(aligned),
        &update,
        SafeLoraSelection::Threshold(threshold),
    )?;
    let merged: BTreeSet<&str> = sl
        .modules
        .iter()
        .filter(|m| m.projected)
        .map(|m| m.module.as_str())
        .collect();
    let out = stacked_combination(aligned, finetuned, |module| {
        if merged.contains(module) {
            (alpha, 1.0 - alpha)
        } else {
            (1.0, 0.0)
        }
    })?;
    let report = SafeMergeReport {
        aligned: label(aligned, "aligned adapter"),
        finetuned: label(finetuned, "fine-tuned adapter"),
        threshold,
        alpha,
        formula:
            "W_j = alpha W_t + (1 - alpha) W_a where cos(C dW_j, dW_j) < tau, dW = W_t - W_a; \
                  else W_t"
                .into(),
        num_merged: merged.len(),
        modules: sl
            .modules
            .iter()
            .map(|m| SafeMergeModule {
                module: m.module.clone(),
                cosine: m.cosine,
                merged: m.projected,
            })
            .collect(),
    };
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{lora_delta, LoraConfig, LoraModule};
    use candle_core::{Device, Tensor};

    fn module(a: &[f32], b: &[f32], scale: f64) -> LoraModule {
        let dev = Device::Cpu;
        LoraModule {
            a: Tensor::from_slice(a, (1, a.len()), &dev).unwrap(),
            b: Tensor::from_slice(b, (b.len(), 1), &dev).unwrap(),
            scale,
        }
    }

    fn adapter(q: LoraModule, v: LoraModule) -> Adapter {
        Adapter {
            config: LoraConfig::new(1, 2.0, vec!["q_proj".into(), "v_proj".into()]),
            modules: [
                ("model.layers.0.self_attn.q_proj".to_string(), q),
                ("model.layers.0.self_attn.v_proj".to_string(), v),
            ]
            .into_iter()
            .collect(),
            source: None,
        }
    }

    #[test]
    fn merges_only_the_modules_below_the_threshold() {
        // Both modules: W_a = 2 [1 0]ᵀ [1 2] = [[2, 4], [0, 0]], so V = W_a and C keeps row 0
        // only (C = diag(sqrt 20, 0)).
        // q: W_t = 2 [1 1]ᵀ [0 1] = [[0, 2], [0, 2]]; ΔW = [[-2, -2], [0, 2]];
        //    cos = ||ΔW row 0|| / ||ΔW|| = sqrt(8 / 12) = 0.8165 < 0.9: merged, α = 0.25:
        //    0.25 W_t + 0.75 W_a = [[1.5, 3.5], [0, 0.5]].
        // v: W_t = 2 [1 0]ᵀ [1.5 2] = [[3, 4], [0, 0]]; ΔW = [[1, 0], [0, 0]]; cos = 1: kept.
        let wa = adapter(
            module(&[1., 2.], &[1., 0.], 2.0),
            module(&[1., 2.], &[1., 0.], 2.0),
        );
        let wt = adapter(
            module(&[0., 1.], &[1., 1.], 2.0),
            module(&[1.5, 2.], &[1., 0.], 2.0),
        );
        let (out, report) = safemerge(&wa, &wt, 0.9, 0.25).unwrap();
        assert_eq!(report.num_merged, 1);
        assert!((report.modules[0].cosine - (8f64 / 12.0).sqrt()).abs() < 1e-6);
        assert!(report.modules[0].merged && !report.modules[1].merged);
        assert!((report.modules[1].cosine - 1.0).abs() < 1e-6);
        let dir = tempfile::tempdir().unwrap();
        out.save(dir.path()).unwrap();
        let back = Adapter::load(dir.path(), &Device::Cpu).unwrap();
        let d =
            |m: &str| -> Vec<Vec<f32>> { lora_delta(&back.modules[m]).unwrap().to_vec2().unwrap() };
        assert_eq!(
            d("model.layers.0.self_attn.q_proj"),
            vec![vec![1.5, 3.5], vec![0., 0.5]]
        );
        assert_eq!(
            d("model.layers.0.self_attn.v_proj"),
            vec![vec![3., 4.], vec![0., 0.]]
        );
        // τ = 0.5: nothing merged, the adapter is W_t.
        let (_, none) = safemerge(&wa, &wt, 0.5, 0.25).unwrap();
        assert_eq!(none.num_merged, 0);
        assert!(safemerge(&wa, &wt, 0.5, 1.5).is_err());
        assert!(safemerge(&wa, &wt, f64::NAN, 0.5).is_err());
    }
}
