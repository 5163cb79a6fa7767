//! RESTA (Bhardwaj, Anh and Poria 2024, "Language Models are Homer Simpson! Safety
//! Re-Alignment of Fine-tuned Language Models through Task Arithmetic", ACL,
//! arXiv:2402.11746): a training-free repair that adds the safety vector back to the
//! fine-tuned model,
//!
//! `W_r = W_t + γ δ_safe`, `δ_safe = W_aligned − W_base`,
//!
//! where the fine-tune `W_t` started from the aligned model. When the alignment is a LoRA
//! adapter on the base model, `δ_safe = s_a B_a A_a` per module, and `W_r` is exactly the
//! rank `r_t + r_a` adapter `B = [s_t B_t | γ s_a B_a]`, `A = [A_t; A_a]`, scale 1
//! ([`stacked_sum`]), which peft loads like any other (other ranks go through
//! `rank_pattern` / `alpha_pattern`). The paper's optional DARE sparsification of `δ_safe`
//! (drop entries with probability p, rescale the rest by `1/(1−p)`) is not implemented: on a
//! LoRA it would make the vector a dense `out x in` matrix.
//!
//! ```no_run
//! use realign::adapters::Adapter;
//! let dev = candle_core::Device::Cpu;
//! let wa = Adapter::load("aligned".as_ref(), &dev)?;
//! let wt = Adapter::load("finetuned".as_ref(), &dev)?;
//! let (repaired, report) = realign::resta::resta(&wa, &wt, 0.5)?;
//! repaired.save("resta".as_ref())?;
//! # Ok::<(), realign::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::adapters::Adapter;
use crate::nlsr::{label, NlsrError};
use crate::safelora::stacked_sum;
use crate::Result;

/// The report file written beside the adapter.
pub const REPORT_JSON: &str = "resta_report.json";

/// What `realign resta` writes as `resta_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestaReport {
    /// The aligned adapter (the safety vector `δ_safe = s_a B_a A_a`).
    pub aligned: String,
    /// The fine-tuned adapter `W_t`.
    pub finetuned: String,
    /// The scale `γ` of the safety vector.
    pub gamma: f64,
    /// The formula, in words.
    pub formula: String,
    /// The number of modules.
    pub num_modules: usize,
    /// The output's rank (`r_t + r_a`, the largest over modules).
    pub rank: usize,
}

/// RESTA: `W_t + γ (W_aligned − W_base)` as a PEFT adapter (see the
/// [module documentation](self)), and its report.
///
/// Errors: a `γ` that is not finite; adapters over different modules or `[out, in]`.
pub fn resta(aligned: &Adapter, finetuned: &Adapter, gamma: f64) -> Result<(Adapter, RestaReport)> {
    if !gamma.is_finite() {
        return Err(NlsrError::Option {
            name: "gamma".into(),
            value: gamma.to_string(),
            reason: "must be a finite number".into(),
        }
        .into());
    }
    let out = stacked_sum(aligned, finetuned, gamma)?;
    let report = RestaReport {
        aligned: label(aligned, "aligned adapter"),
        finetuned: label(finetuned, "fine-tuned adapter"),
        gamma,
        formula: "W_r = W_t + gamma (W_aligned - W_base) = s_t B_t A_t + gamma s_a B_a A_a".into(),
        num_modules: out.modules.len(),
        rank: out.config.r,
    };
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{lora_delta, LoraConfig, LoraModule};
    use candle_core::{Device, Tensor};

    fn one(a: &[f32], b: &[f32], scale: f64) -> Adapter {
        let dev = Device::Cpu;
        let m = LoraModule {
            a: Tensor::from_slice(a, (1, a.len()), &dev).unwrap(),
            b: Tensor::from_slice(b, (b.len(), 1), &dev).unwrap(),
            scale,
        };
        Adapter {
            config: LoraConfig::new(1, scale, vec!["q_proj".into()]),
            modules: [("model.layers.0.self_attn.q_proj".to_string(), m)]
                .into_iter()
                .collect(),
            source: None,
        }
    }

    #[test]
    fn adds_the_scaled_safety_vector() {
        // W_a = 2 [1 0]ᵀ[1 2] = [[2, 4], [0, 0]]; W_t = 2 [1 1]ᵀ[0 1] = [[0, 2], [0, 2]].
        // γ = 0.5: W_r = [[0, 2], [0, 2]] + [[1, 2], [0, 0]] = [[1, 4], [0, 2]].
        let wa = one(&[1., 2.], &[1., 0.], 2.0);
        let wt = one(&[0., 1.], &[1., 1.], 2.0);
        let (out, report) = resta(&wa, &wt, 0.5).unwrap();
        assert_eq!((report.rank, report.num_modules), (2, 1));
        let dir = tempfile::tempdir().unwrap();
        out.save(dir.path()).unwrap();
        let back = Adapter::load(dir.path(), &Device::Cpu).unwrap();
        let m = &back.modules["model.layers.0.self_attn.q_proj"];
        assert_eq!(m.scale, 1.0);
        let d: Vec<Vec<f32>> = lora_delta(m).unwrap().to_vec2().unwrap();
        assert_eq!(d, vec![vec![1., 4.], vec![0., 2.]]);
        assert!(resta(&wa, &wt, f64::NAN).is_err());
    }
}
