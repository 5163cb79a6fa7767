//! A LoRA module plus a dense update, written exactly as one LoRA module: for repairs whose
//! result is not low-rank (a pruned or sparsified update: Antidote, RESTA with DARE).
//!
//! `s B A + D` for a dense `D` (`out x in`) is the module `B' = [s B | F_B]`,
//! `A' = [A; F_A]`, scale 1, with `(F_B, F_A) = (I_out, D)` when `out ≤ in` and `(D, I_in)`
//! otherwise: rank `r + min(out, in)`, as large as `D` itself. peft reads it with a
//! `rank_pattern` entry like any other module.

use candle_core::{DType, Device, Tensor};

use super::LoraModule;

/// `s B A + D` as one LoRA module of scale 1 (see the [module documentation](self)).
///
/// # Shapes
/// `module`: `B [out, r]`, `A [r, in]`; `dense`: `out * in` values, row major ->
/// `B' [out, r + min(out, in)]`, `A' [r + min(out, in), in]`.
pub fn with_dense_update(
    module: &LoraModule,
    dense: &[f32],
    out: usize,
    inp: usize,
) -> candle_core::Result<LoraModule> {
    let dev = &Device::Cpu;
    let d = Tensor::from_slice(dense, (out, inp), dev)?;
    let (fb, fa) = if out <= inp {
        (Tensor::eye(out, DType::F32, dev)?, d)
    } else {
        (d, Tensor::eye(inp, DType::F32, dev)?)
    };
    let b = Tensor::cat(&[(&module.b * module.scale)?, fb], 1)?;
    let a = Tensor::cat(&[&module.a, &fa], 0)?;
    Ok(LoraModule { a, b, scale: 1.0 })
}

/// The dense update `s B A` of a module, row major, computed in f64.
///
/// # Shapes
/// `B [out, r]`, `A [r, in]` -> `out * in` values.
pub fn dense_update(m: &LoraModule) -> candle_core::Result<Vec<f64>> {
    let b = m.b.to_dtype(DType::F64)?;
    let a = m.a.to_dtype(DType::F64)?;
    (b.matmul(&a)? * m.scale)?.flatten_all()?.to_vec1::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::lora_delta;

    #[test]
    fn wide_and_tall_updates_are_written_exactly() {
        let dev = Device::Cpu;
        // s B A = 2 [1 0]ᵀ [1 2 0] = [[2, 4, 0], [0, 0, 0]]; D 2 x 3 (out ≤ in: F_B = I).
        let wide = LoraModule {
            a: Tensor::from_slice(&[1f32, 2., 0.], (1, 3), &dev).unwrap(),
            b: Tensor::from_slice(&[1f32, 0.], (2, 1), &dev).unwrap(),
            scale: 2.0,
        };
        let m = with_dense_update(&wide, &[0., 1., 0., -1., 0., 3.], 2, 3).unwrap();
        assert_eq!(m.rank(), 3);
        let d: Vec<Vec<f32>> = lora_delta(&m).unwrap().to_vec2().unwrap();
        assert_eq!(d, vec![vec![2., 5., 0.], vec![-1., 0., 3.]]);
        assert_eq!(dense_update(&wide).unwrap(), vec![2., 4., 0., 0., 0., 0.]);
        // B A = [1 0 1]ᵀ [1 2] (3 x 2, out > in: F_A = I).
        let tall = LoraModule {
            a: Tensor::from_slice(&[1f32, 2.], (1, 2), &dev).unwrap(),
            b: Tensor::from_slice(&[1f32, 0., 1.], (3, 1), &dev).unwrap(),
            scale: 1.0,
        };
        let m = with_dense_update(&tall, &[1., 0., 0., 0., 0., -2.], 3, 2).unwrap();
        assert_eq!(m.rank(), 3);
        let d: Vec<Vec<f32>> = lora_delta(&m).unwrap().to_vec2().unwrap();
        assert_eq!(d, vec![vec![2., 2.], vec![0., 0.], vec![1., 0.]]);
    }
}
