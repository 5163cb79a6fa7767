//! Layer similarity (paper Eq. 8): how far fine-tuning moved the safety region of a module.
//!
//! Everything goes through `r x r` products, never through the dense `out x in` update: for
//! `X = P_1 Q_1` and `Y = P_2 Q_2` (`P`: `[out, r]`, `Q`: `[r, in]`),
//! `<X, Y>_F = trace((P_1ᵀ P_2)(Q_2 Q_1ᵀ)) = Σ_ij (P_1ᵀ P_2)_ij (Q_1 Q_2ᵀ)_ij`, in f64.

use candle_core::{DType, Tensor};

use super::gram::{inner_products, stacked_gram, stacked_gram_fmas, Layout};
use super::masks::ModuleMask;
use super::NlsrError;
use crate::adapters::LoraModule;
use crate::Result;

/// `<P_1 Q_1, P_2 Q_2>_F` without forming either product, accumulated in f64.
///
/// # Shapes
/// - p1, p2: `[out, r1]`, `[out, r2]`; q1, q2: `[r1, in]`, `[r2, in]` -> a scalar.
pub fn low_rank_inner(p1: &Tensor, q1: &Tensor, p2: &Tensor, q2: &Tensor) -> Result<f64> {
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    let (p1, q1, p2, q2) = (f(p1)?, f(q1)?, f(p2)?, f(q2)?);
    let left = p1.t()?.matmul(&p2)?; // [r1, r2]
    let right = q1.matmul(&q2.t()?)?; // [r1, r2]
    Ok((left * right)?.sum_all()?.to_scalar::<f64>()?)
}

/// `||s B A||_F` of a LoRA module, through `r x r` products.
///
/// # Shapes
/// - A: `[r, in]`, B: `[out, r]` -> a scalar.
pub fn lora_norm(m: &LoraModule) -> Result<f64> {
    Ok(m.scale.abs() * low_rank_inner(&m.b, &m.a, &m.b, &m.a)?.max(0.0).sqrt())
}

/// The masked factors of a module: `P = M_B ⊙ B` and `Q = M_A ⊙ A` (paper Eq. 7), or the
/// factors themselves without a mask.
///
/// # Shapes
/// - A: `[r, in]`, B: `[out, r]`, masks alike -> (`[out, r]`, `[r, in]`).
pub fn safety_region(m: &LoraModule, mask: Option<&ModuleMask>) -> Result<(Tensor, Tensor)> {
    Ok(match mask {
        Some(k) => (m.b.mul(&k.b)?, m.a.mul(&k.a)?),
        None => (m.b.clone(), m.a.clone()),
    })
}

/// Paper Eq. 8 (section "Restoration for Safety-Broken Neurons", "Probability-based Layer
/// Pruning"): the cosine of the safety regions of the reference and the fine-tuned module,
///
/// `S_j = <W'_e, W'_t>_F / (||W'_e||_F ||W'_t||_F)`, with
/// `W'_e = (M_B ⊙ B_e)(M_A ⊙ A_e)` and `W'_t = (M_B ⊙ B_t)(M_A ⊙ A_t)` (Eq. 7),
///
/// computed through `r x r` products (f32 products over blocks of 128 rows, summed in f64; see
/// [`gram`](super::gram)). The LoRA scales cancel. When a region is zero (an empty mask, an
/// untrained B) the cosine is undefined: it is 1 when both are zero (nothing differs, nothing
/// to repair) and 0 when only one is.
///
/// # Shapes
/// - each module: A `[r, in]`, B `[out, r]`; mask: `M_A` like A, `M_B` like B -> a scalar.
pub fn region_similarity(
    reference: &LoraModule,
    finetuned: &LoraModule,
    mask: Option<&ModuleMask>,
) -> Result<f64> {
    Ok(region_similarity_and_mask_sums(reference, finetuned, mask)?.0)
}

/// [`region_similarity`], with the sums of `M_A` and `M_B` (all ones without a mask).
pub fn region_similarity_and_mask_sums(
    reference: &LoraModule,
    finetuned: &LoraModule,
    mask: Option<&ModuleMask>,
) -> Result<(f64, f64, f64)> {
    let (r, inp) = reference.a.dims2()?;
    let (out, _) = reference.b.dims2()?;
    let ones =
        |t: &Tensor| -> Result<F32Data<'_>> { Ok(F32Data::Owned(vec![1.0; t.elem_count()])) };
    let (ma, mb) = match mask {
        Some(k) => (F32Data::of(&k.a)?, F32Data::of(&k.b)?),
        None => (ones(&reference.a)?, ones(&reference.b)?),
    };
    let (ea, eb) = (F32Data::of(&reference.a)?, F32Data::of(&reference.b)?);
    let (ta, tb) = (F32Data::of(&finetuned.a)?, F32Data::of(&finetuned.b)?);
    Ok(factor_similarity_and_mask_sums(
        Factors {
            a: ea.slice(),
            b: eb.slice(),
        },
        Factors {
            a: ta.slice(),
            b: tb.slice(),
        },
        Factors {
            a: ma.slice(),
            b: mb.slice(),
        },
        [out, r, inp],
    )?)
}

/// The f32 values of the two factors of a module (or of its masks), row-major: A `[r, in]`,
/// B `[out, r]`.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    /// `lora_A` (or `M_A`), `r · in` values.
    pub a: &'a [f32],
    /// `lora_B` (or `M_B`), `out · r` values.
    pub b: &'a [f32],
}

/// [`region_similarity`] on raw row-major f32 factors: reference, fine-tuned, masks, and
/// `[out, r, in]`. Computes the stacked Grams of both factors ([`stacked_gram`]) and combines
/// them; same conventions for empty regions.
pub fn factor_similarity(
    e: Factors,
    t: Factors,
    m: Factors,
    shape: [usize; 3],
) -> Result<f64, NlsrError> {
    Ok(factor_similarity_and_mask_sums(e, t, m, shape)?.0)
}

/// [`factor_similarity`], with the sums of `M_A` and `M_B` (read on the way, for the mask
/// densities of the report).
pub fn factor_similarity_and_mask_sums(
    e: Factors,
    t: Factors,
    m: Factors,
    [out, r, inp]: [usize; 3],
) -> Result<(f64, f64, f64), NlsrError> {
    let named = |err: NlsrError, factor: &str| match err {
        NlsrError::FactorLength {
            what,
            rows,
            cols,
            got,
        } => NlsrError::FactorLength {
            what: format!("{what} {factor}"),
            rows,
            cols,
            got,
        },
        other => other,
    };
    let gb = stacked_gram(e.b, t.b, m.b, out, r, Layout::RowMajorDR).map_err(|x| named(x, "B"))?;
    let ga = stacked_gram(e.a, t.a, m.a, inp, r, Layout::RowMajorRD).map_err(|x| named(x, "A"))?;
    let (ee, tt, et) = inner_products(&gb, &ga);
    Ok((cosine_of(ee, tt, et), ga.mask_sum, gb.mask_sum))
}

/// The cosine `et / (√ee √tt)` of two matrices from their inner products
/// `(<E, E>, <T, T>, <E, T>)`, with Eq. 8's conventions: 1 when both are zero, 0 when only one
/// is, clamped to [-1, 1] (rounding can push it a hair beyond).
pub(crate) fn cosine_of(ee: f64, tt: f64, et: f64) -> f64 {
    let (ee, tt) = (ee.max(0.0), tt.max(0.0));
    if ee == 0.0 || tt == 0.0 {
        if ee == tt {
            1.0
        } else {
            0.0
        }
    } else {
        (et / (ee.sqrt() * tt.sqrt())).clamp(-1.0, 1.0)
    }
}

/// The flops [`factor_similarity`] performs for a module of shape `[out, r, in]`.
pub fn similarity_flops([out, r, inp]: [usize; 3]) -> u64 {
    2 * (stacked_gram_fmas(out, r) + stacked_gram_fmas(inp, r))
}

/// The f32 values of a tensor: borrowed from its CPU storage when it is contiguous f32,
/// else converted into an owned vector.
pub(crate) enum F32Data<'a> {
    /// The storage, the offset and the length.
    Shared(
        Box<dyn std::ops::Deref<Target = candle_core::Storage> + 'a>,
        usize,
        usize,
    ),
    /// A converted copy.
    Owned(Vec<f32>),
}

impl<'a> F32Data<'a> {
    /// The values of `t`, flattened in row-major order.
    pub(crate) fn of(t: &'a Tensor) -> Result<Self> {
        if t.dtype() == DType::F32 && t.is_contiguous() {
            let (storage, layout) = t.storage_and_layout();
            let offset = layout.start_offset();
            if matches!(
                &*storage,
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_))
            ) {
                return Ok(F32Data::Shared(Box::new(storage), offset, t.elem_count()));
            }
        }
        Ok(F32Data::Owned(
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        ))
    }

    /// The values.
    pub(crate) fn slice(&self) -> &[f32] {
        match self {
            F32Data::Shared(s, offset, n) => match &***s {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                    &v[*offset..*offset + *n]
                }
                _ => &[],
            },
            F32Data::Owned(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn module(seed: u64, out: usize, r: usize, inp: usize) -> LoraModule {
        let mut s = seed;
        let mut next = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect()
        };
        let dev = Device::Cpu;
        LoraModule {
            a: Tensor::from_vec(next(r * inp), (r, inp), &dev).unwrap(),
            b: Tensor::from_vec(next(out * r), (out, r), &dev).unwrap(),
            scale: 2.0,
        }
    }

    fn dense_cos(x: &Tensor, y: &Tensor) -> f64 {
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (x, y) = (f(x), f(y));
        let dot = (&x * &y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let nx = x
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let ny = y
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        dot / (nx.sqrt() * ny.sqrt())
    }

    #[test]
    fn low_rank_similarity_equals_the_dense_formula() {
        let (e, t) = (module(1, 7, 3, 5), module(2, 7, 3, 5));
        let mask = ModuleMask {
            a: Tensor::from_vec(
                (0..15).map(|i| (i % 3 != 0) as u8 as f32).collect(),
                (3, 5),
                &Device::Cpu,
            )
            .unwrap(),
            b: Tensor::from_vec(
                (0..21).map(|i| (i % 2 == 0) as u8 as f32).collect(),
                (7, 3),
                &Device::Cpu,
            )
            .unwrap(),
        };
        let s = region_similarity(&e, &t, Some(&mask)).unwrap();
        let we =
            e.b.mul(&mask.b)
                .unwrap()
                .matmul(&e.a.mul(&mask.a).unwrap())
                .unwrap();
        let wt =
            t.b.mul(&mask.b)
                .unwrap()
                .matmul(&t.a.mul(&mask.a).unwrap())
                .unwrap();
        let dense = dense_cos(&we, &wt);
        assert!((s - dense).abs() < 1e-6, "{s} vs {dense}");
        // unmasked too
        let s = region_similarity(&e, &t, None).unwrap();
        let dense = dense_cos(&e.b.matmul(&e.a).unwrap(), &t.b.matmul(&t.a).unwrap());
        assert!((s - dense).abs() < 1e-6, "{s} vs {dense}");
    }

    #[test]
    fn identical_modules_have_similarity_one() {
        let e = module(3, 6, 2, 4);
        assert!((region_similarity(&e, &e, None).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn norm_is_the_dense_frobenius_norm() {
        // B A = [[1, 2], [2, 4]]: ||.||² = 1 + 4 + 4 + 16 = 25; scale 2 -> 10
        let dev = Device::Cpu;
        let m = LoraModule {
            a: Tensor::new(&[[1f32, 2.]], &dev).unwrap(),
            b: Tensor::new(&[[1f32], [2.]], &dev).unwrap(),
            scale: 2.0,
        };
        assert!((lora_norm(&m).unwrap() - 10.0).abs() < 1e-12);
    }

    #[test]
    fn empty_regions_follow_the_documented_convention() {
        let e = module(4, 3, 2, 3);
        let zero = ModuleMask {
            a: e.a.zeros_like().unwrap(),
            b: e.b.zeros_like().unwrap(),
        };
        assert_eq!(region_similarity(&e, &e, Some(&zero)).unwrap(), 1.0);
        let mut z = e.clone();
        z.b = z.b.zeros_like().unwrap();
        assert_eq!(region_similarity(&e, &z, None).unwrap(), 0.0);
    }
}
