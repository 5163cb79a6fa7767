//! Neuron-level correction (paper Eq. 11; `docs/METHODS.md`, NLSR item 5): the safety-critical
//! entries of a repaired module come from the reference `W_e`, the others stay `W_t`'s; and
//! the `shrink` control, which moves every entry by the mask's density instead.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masks::ModuleMask;
use super::similarity::F32Data;
use super::NlsrError;
use crate::adapters::LoraModule;
use crate::Result;

/// How a repaired module is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransplantMode {
    /// The authors' code (default, what the published results used): [`transplant`], rank r.
    #[default]
    Replace,
    /// The paper's Eq. 11 literally: [`transplant_exact`], rank 2r.
    Exact,
    /// A control, not the paper's repair: [`shrink`] moves each factor of a repaired module the
    /// fraction ρ of the way to the reference, ρ = that factor's mask density — what
    /// [`Replace`](Self::Replace) does on average when which entries it takes carries no
    /// information. Rank r.
    Shrink,
}

/// The authors' form of Eq. 11: entry replacement in both factors,
/// `A = A_t ⊙ (1 - M_A) + A_e ⊙ M_A`, `B = B_t ⊙ (1 - M_B) + B_e ⊙ M_B`
/// (rank stays r; the product `B A` then has cross terms `W_e`/`W_t`). Written exactly so:
/// an all-ones mask gives `W_e`'s factors bit for bit, an all-zeros mask `W_t`'s. The scale is
/// `W_t`'s.
///
/// # Shapes
/// - A: `[r, in]`, B: `[out, r]` for both modules and the masks -> the same shapes.
pub fn transplant(
    reference: &LoraModule,
    finetuned: &LoraModule,
    mask: &ModuleMask,
) -> Result<LoraModule> {
    per_factor(reference, finetuned, mask, mix_into)
}

/// How one factor is rebuilt from raw values: `rule(out, t, e, m)` ([`mix_into`],
/// [`shrink_into`]).
type FactorRule = fn(&mut [f32], &[f32], &[f32], &[f32]) -> Result<(), NlsrError>;

/// Both factors of `finetuned` rebuilt by `rule(out, t, e, m)` on their raw values, with the
/// reference's factor and the mask's; the scale is `W_t`'s.
fn per_factor(
    reference: &LoraModule,
    finetuned: &LoraModule,
    mask: &ModuleMask,
    rule: FactorRule,
) -> Result<LoraModule> {
    let mix = |t: &Tensor, e: &Tensor, m: &Tensor| -> Result<Tensor> {
        let (tv, ev, mv) = (F32Data::of(t)?, F32Data::of(e)?, F32Data::of(m)?);
        let mut out = vec![0f32; tv.slice().len()];
        rule(&mut out, tv.slice(), ev.slice(), mv.slice())?;
        Ok(Tensor::from_vec(out, t.dims(), t.device())?)
    };
    Ok(LoraModule {
        a: mix(&finetuned.a, &reference.a, &mask.a)?,
        b: mix(&finetuned.b, &reference.b, &mask.b)?,
        scale: finetuned.scale,
    })
}

/// The entry replacement of [`transplant`] on raw values:
/// `out = t ⊙ (1 - m) + e ⊙ m`, with exactly the roundings of the tensor expression (two
/// products, one sum), so that the result is the same bit for bit.
///
/// # Errors
/// [`NlsrError::FactorLength`] when `t`, `e` or `m` is not as long as `out` (nothing is
/// written then).
pub fn mix_into(out: &mut [f32], t: &[f32], e: &[f32], m: &[f32]) -> Result<(), NlsrError> {
    for (what, v) in [("fine-tuned", t), ("reference", e), ("mask", m)] {
        if v.len() != out.len() {
            return Err(NlsrError::FactorLength {
                what: format!("transplant: {what} factor"),
                rows: out.len(),
                cols: 1,
                got: v.len(),
            });
        }
    }
    for (((o, t), e), m) in out.iter_mut().zip(t).zip(e).zip(m) {
        *o = t * (1.0 - m) + e * m;
    }
    Ok(())
}

/// The uniform control of [`transplant`] (not in the paper): `A = A_t ⊙ (1 - ρ_A) + A_e ⊙ ρ_A`,
/// `B = B_t ⊙ (1 - ρ_B) + B_e ⊙ ρ_B`, where `ρ` is the density of the factor's mask (the
/// fraction of its entries [`transplant`] would take from the reference). This is the
/// expectation of the entry replacement over masks drawn uniformly at that density; when the
/// identified masks repair no better than this, the repair comes from how much of the
/// reference is put back, not from which neurons. Bit for bit [`transplant`] with every mask
/// entry set to `ρ` (the same expression). The scale is `W_t`'s.
///
/// # Shapes
/// - A: `[r, in]`, B: `[out, r]` for both modules and the masks -> the same shapes.
pub fn shrink(
    reference: &LoraModule,
    finetuned: &LoraModule,
    mask: &ModuleMask,
) -> Result<LoraModule> {
    per_factor(reference, finetuned, mask, shrink_into)
}

/// [`shrink`] on raw values: [`mix_into`] with every entry of the mask replaced by the mask's
/// density `ρ = sum(m) / len(m)` (summed in f64, then rounded to f32; 0 for an empty mask).
///
/// # Errors
/// As [`mix_into`].
pub fn shrink_into(out: &mut [f32], t: &[f32], e: &[f32], m: &[f32]) -> Result<(), NlsrError> {
    let sum: f64 = m.iter().map(|&v| f64::from(v)).sum();
    let rho = if m.is_empty() {
        0.0
    } else {
        (sum / m.len() as f64) as f32
    };
    mix_into(out, t, e, &vec![rho; m.len()])
}

/// Paper Eq. 11 (section "Neuron-Level Correction"), for a repaired module (`γ_j = 0`):
/// `W''_t = (M_B ⊙ B_e)(M_A ⊙ A_e) + ((1 - M_B) ⊙ B_t)((1 - M_A) ⊙ A_t)`, which is exactly the
/// rank-2r LoRA `B'' = [M_B ⊙ B_e | (1 - M_B) ⊙ B_t]`, `A'' = [M_A ⊙ A_e ; (1 - M_A) ⊙ A_t]`
/// with the scale of `W_t` (the saved config keeps it through `rank_pattern` / `alpha_pattern`,
/// see [`patch`](super::patch)).
///
/// # Shapes
/// - A: `[r, in]`, B: `[out, r]` for both modules and the masks -> A'' `[2r, in]`,
///   B'' `[out, 2r]`.
pub fn transplant_exact(
    reference: &LoraModule,
    finetuned: &LoraModule,
    mask: &ModuleMask,
) -> Result<LoraModule> {
    let not_a = (mask.a.ones_like()? - &mask.a)?;
    let not_b = (mask.b.ones_like()? - &mask.b)?;
    let a = Tensor::cat(&[&reference.a.mul(&mask.a)?, &finetuned.a.mul(&not_a)?], 0)?;
    let b = Tensor::cat(&[&reference.b.mul(&mask.b)?, &finetuned.b.mul(&not_b)?], 1)?;
    Ok(LoraModule {
        a,
        b,
        scale: finetuned.scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn m(a: &[[f32; 2]; 1], b: &[[f32; 1]; 2]) -> LoraModule {
        LoraModule {
            a: Tensor::new(a, &Device::Cpu).unwrap(),
            b: Tensor::new(b, &Device::Cpu).unwrap(),
            scale: 1.0,
        }
    }

    #[test]
    fn replacement_and_exact_forms_on_hand_made_tensors() {
        // r 1, in 2, out 2. A_e = [1, 2], B_e = [3; 4]; A_t = [5, 6], B_t = [7; 8];
        // M_A = [1, 0], M_B = [0; 1].
        let e = m(&[[1., 2.]], &[[3.], [4.]]);
        let t = m(&[[5., 6.]], &[[7.], [8.]]);
        let mask = ModuleMask {
            a: Tensor::new(&[[1f32, 0.]], &Device::Cpu).unwrap(),
            b: Tensor::new(&[[0f32], [1.]], &Device::Cpu).unwrap(),
        };
        // replace: A = [1, 6], B = [7; 4]
        let r = transplant(&e, &t, &mask).unwrap();
        assert_eq!(r.a.to_vec2::<f32>().unwrap(), vec![vec![1.0, 6.0]]);
        assert_eq!(r.b.to_vec2::<f32>().unwrap(), vec![vec![7.0], vec![4.0]]);
        // exact: (M_B B_e)(M_A A_e) = [0; 4] [1, 0] = [[0, 0], [4, 0]];
        // ((1-M_B) B_t)((1-M_A) A_t) = [7; 0] [0, 6] = [[0, 42], [0, 0]]; sum [[0, 42], [4, 0]]
        let x = transplant_exact(&e, &t, &mask).unwrap();
        assert_eq!(x.a.dims(), &[2, 2]);
        assert_eq!(
            x.b.matmul(&x.a).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 42.0], vec![4.0, 0.0]]
        );
        // shrink: both masks have density 1/2, so every factor is the midpoint:
        // A = [3, 4], B = [5; 6]
        let s = shrink(&e, &t, &mask).unwrap();
        assert_eq!(s.a.to_vec2::<f32>().unwrap(), vec![vec![3.0, 4.0]]);
        assert_eq!(s.b.to_vec2::<f32>().unwrap(), vec![vec![5.0], vec![6.0]]);
    }

    #[test]
    fn shrink_is_replacement_with_the_density_in_every_entry() {
        // a mask of density 3/8 on seeded values: equal, bit for bit, to `mix_into` with a
        // mask of 0.375 everywhere; all-zero and all-one masks give W_t and W_e exactly
        let t: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
        let e: Vec<f32> = (0..8).map(|i| (i as f32 * 1.91).cos()).collect();
        let m = [1f32, 0., 0., 1., 0., 0., 1., 0.];
        let (mut got, mut want) = (vec![0f32; 8], vec![0f32; 8]);
        shrink_into(&mut got, &t, &e, &m).unwrap();
        mix_into(&mut want, &t, &e, &[0.375; 8]).unwrap();
        assert_eq!(got, want);
        assert!(got.iter().zip(&t).all(|(g, t)| g != t));
        shrink_into(&mut got, &t, &e, &[0.; 8]).unwrap();
        assert_eq!(got, t);
        shrink_into(&mut got, &t, &e, &[1.; 8]).unwrap();
        assert_eq!(got, e);
        assert!(shrink_into(&mut got, &t, &e, &m[..7]).is_err());
    }
}
