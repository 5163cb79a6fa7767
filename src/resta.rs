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
//! `rank_pattern` / `alpha_pattern`).
//!
//! The paper's optional DARE sparsification of `δ_safe` (Yu et al. 2024: drop each entry with
//! probability `q`, rescale the rest by `1/(1−q)`, so the vector is unchanged in expectation)
//! is [`resta_dare`]: the sparsified vector is dense, so each module is written exactly as
//! `W_t` plus a dense update ([`crate::adapters::exact`], rank `r_t + min(out, in)`).
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

use crate::adapters::exact::{dense_update, with_dense_update};
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
    /// DARE's drop probability `q` (absent: no sparsification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dare_drop: Option<f64>,
    /// The seed of DARE's draws.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// RESTA: `W_t + γ (W_aligned − W_base)` as a PEFT adapter (see the
/// [module documentation](self)), and its report.
///
/// Errors: a `γ` refused by [`check_gamma`]; adapters over different modules or `[out, in]`.
pub fn resta(aligned: &Adapter, finetuned: &Adapter, gamma: f64) -> Result<(Adapter, RestaReport)> {
    check_gamma(gamma)?;
    let out = stacked_sum(aligned, finetuned, gamma)?;
    let report = RestaReport {
        aligned: label(aligned, "aligned adapter"),
        finetuned: label(finetuned, "fine-tuned adapter"),
        gamma,
        formula: "W_r = W_t + gamma (W_aligned - W_base) = s_t B_t A_t + gamma s_a B_a A_a".into(),
        num_modules: out.modules.len(),
        rank: out.config.r,
        dare_drop: None,
        seed: None,
    };
    Ok((out, report))
}

/// The largest `|γ|` RESTA takes. The RESTA paper adds the safety vector once (γ = 1) and
/// sweeps small scales; a scale of hundreds swamps the fine-tune, and past ~1e30 the merged
/// weights (or the logits they produce) are no longer finite in f32.
pub const MAX_GAMMA: f64 = 100.0;

/// Checks RESTA's scale: finite, not 0 (the output would be the fine-tuned adapter), at most
/// [`MAX_GAMMA`] in magnitude. The error names `gamma` and the range.
pub fn check_gamma(gamma: f64) -> Result<()> {
    if gamma.is_finite() && gamma != 0.0 && gamma.abs() <= MAX_GAMMA {
        return Ok(());
    }
    Err(NlsrError::Option {
        name: "gamma".into(),
        value: gamma.to_string(),
        reason: format!(
            "must be a finite number, not 0 (that adds nothing), with |gamma| <= {MAX_GAMMA} \
             (the RESTA paper uses 1)"
        ),
    }
    .into())
}

/// RESTA with DARE: `W_t + γ DARE_q(W_a − W_base)`, each entry of the safety vector dropped
/// with probability `q` and the rest scaled by `1/(1−q)` (seeded; modules in path order), as
/// an exact PEFT adapter (see the [module documentation](self)), and its report.
///
/// Errors: `γ` refused by [`check_gamma`], `q` outside `[0, 1)`; adapters over different modules or
/// `[out, in]`.
pub fn resta_dare(
    aligned: &Adapter,
    finetuned: &Adapter,
    gamma: f64,
    drop: f64,
    seed: u64,
) -> Result<(Adapter, RestaReport)> {
    use rand::{Rng, SeedableRng};
    if !(0.0..1.0).contains(&drop) {
        return Err(NlsrError::Option {
            name: "dare-drop".into(),
            value: drop.to_string(),
            reason: "must be in [0, 1) (the probability of dropping an entry)".into(),
        }
        .into());
    }
    // checks γ, the module sets and shapes
    let (_, mut report) = resta(aligned, finetuned, gamma)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep_scale = gamma / (1.0 - drop);
    let mut modules = std::collections::BTreeMap::new();
    let mut ranks = std::collections::BTreeMap::new();
    for (path, t) in &finetuned.modules {
        let a = &aligned.modules[path];
        let [out, _] = crate::nlsr::dims2(&a.b);
        let [_, inp] = crate::nlsr::dims2(&a.a);
        let dense: Vec<f32> = dense_update(a)?
            .into_iter()
            .map(|v| {
                if rng.gen::<f64>() < drop {
                    0.0
                } else {
                    (v * keep_scale) as f32
                }
            })
            .collect();
        let m = with_dense_update(t, &dense, out, inp)?;
        ranks.insert(path.clone(), m.rank());
        modules.insert(path.clone(), m);
    }
    let out = Adapter {
        config: crate::safelora::scale_one_config(&finetuned.config, &ranks),
        modules,
        source: None,
    };
    report.formula =
        "W_r = W_t + gamma DARE_q(W_aligned - W_base): each entry of the safety vector \
                      dropped with probability q, the rest scaled by 1/(1 - q)"
            .into();
    report.rank = out.config.r;
    report.dare_drop = Some(drop);
    report.seed = Some(seed);
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

    #[test]
    fn dare_keeps_the_vector_at_q_0_and_rescales_the_kept_entries() {
        // W_a = [[2, 4], [0, 0]], W_t = [[0, 2], [0, 2]], γ = 0.5.
        let wa = one(&[1., 2.], &[1., 0.], 2.0);
        let wt = one(&[0., 1.], &[1., 1.], 2.0);
        let delta = |a: &Adapter| -> Vec<f32> {
            lora_delta(&a.modules["model.layers.0.self_attn.q_proj"])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // q = 0: plain RESTA, [[1, 4], [0, 2]]
        let (out, report) = resta_dare(&wa, &wt, 0.5, 0.0, 7).unwrap();
        assert_eq!(delta(&out), vec![1., 4., 0., 2.]);
        assert_eq!(report.dare_drop, Some(0.0));
        // q = 0.5: each of the two non-zero entries of γ W_a (1, 2) is dropped or doubled
        // (2, 4); the zero row stays zero.
        for seed in 0..8 {
            let (out, _) = resta_dare(&wa, &wt, 0.5, 0.5, seed).unwrap();
            let d = delta(&out);
            assert!(d[0] == 0.0 || d[0] == 2.0, "{d:?}");
            assert!(d[1] == 2.0 || d[1] == 6.0, "{d:?}");
            assert_eq!((d[2], d[3]), (0.0, 2.0));
            // the same seed draws the same entries
            assert_eq!(d, delta(&resta_dare(&wa, &wt, 0.5, 0.5, seed).unwrap().0));
        }
        assert!(resta_dare(&wa, &wt, 0.5, 1.0, 0).is_err());
    }
}
