//! A frozen linear layer and one LoRA adapter as a single autograd op (training on the CPU):
//! `y = x Wᵀ + s · (x Aᵀ) Bᵀ` (Hu et al. 2021, eq. 3; [`crate::adapters::lora_forward`]).
//!
//! Composed from candle ops, a LoRA module is six nodes in the graph (two matmuls, a scale, an
//! add, two transposes), each with its own output buffer, gradient buffer and accumulation, and
//! candle runs its matmuls on rayon's pool beside the barrier pool that runs everything else. Here
//! the forward is three products and the backward five, all on [`super::gemm`] (both cores,
//! one pool), with the scale applied inside the kernels and `s · u A` accumulated straight into
//! the input's gradient:
//!
//! | | product | shape |
//! |---|---|---|
//! | forward | `y = x Wᵀ`, `h = x Aᵀ`, `y += s · h Bᵀ` | `[n, out]`, `[n, r]` |
//! | backward | `u = g B` | `[n, r]` |
//! | | `dx = g W + s · u A` (when `x` needs it) | `[n, in]` |
//! | | `dA = s · uᵀ x`, `dB = s · gᵀ h` (when trained) | `[r, in]`, `[out, r]` |
//!
//! `h` is recomputed in the backward (`n · in · r` multiply-adds, `r / out` of the frozen product) rather
//! than kept. `W` is never differentiated: the base model is frozen while an adapter trains.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::frozen::with_slice;
use super::gemm::{gemm_with, product, MatRef, Write};

/// The op: `x: [.., in]`, `A: [r, in]`, `B: [out, r]` (its three arguments) with the frozen
/// `w: [out, in]` and the scale `s`; the output is `[.., out]` (no reshape nodes around it).
pub struct FusedLora {
    /// `[out, in]`, f32, contiguous; not trained.
    pub w: Tensor,
    /// The adapter's scale `s` (alpha / r).
    pub scale: f32,
}

/// The f32 elements of a contiguous CPU argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("fused-lora: expected contiguous arguments"),
    }
}

/// `(n, in, r, out)` of a call, checked against `w`; `n` is the product of `x`'s leading dims.
fn dims(x: &Shape, a: &Shape, b: &Shape, w: &Tensor) -> candle_core::Result<[usize; 4]> {
    let Some((&inp, lead)) = x.dims().split_last() else {
        candle_core::bail!("fused-lora: x must have at least one dim");
    };
    let n = lead.iter().product::<usize>();
    let (r, a_in) = a.dims2()?;
    let (out, b_r) = b.dims2()?;
    let (w_out, w_in) = w.dims2()?;
    if a_in != inp || b_r != r || w_out != out || w_in != inp {
        candle_core::bail!(
            "fused-lora: x [{n}, {inp}], A [{r}, {a_in}], B [{out}, {b_r}] do not fit W [{w_out}, {w_in}]"
        );
    }
    Ok([n, inp, r, out])
}

fn wrap(e: super::gemm::GemmError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The shapes of one LoRA product on slices: `n` rows of `in` inputs, rank `r`, `out` outputs,
/// scale `s`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraShape {
    pub n: usize,
    pub inp: usize,
    pub r: usize,
    pub out: usize,
    pub scale: f32,
}

/// The forward products on slices: `y = x Wᵀ + s · h Bᵀ` with `h = x Aᵀ`; returns `(y, h)`.
/// `x: [n, in]`, `w: [out, in]`, `a: [r, in]`, `b: [out, r]`.
pub(crate) fn forward_parts(
    d: LoraShape,
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let LoraShape { n, inp, r, out, .. } = d;
    let xm = MatRef::row_major(x, inp);
    let mut y = product(n, out, inp, xm, MatRef::transposed(w, inp), 1.0).map_err(wrap)?;
    let h = product(n, r, inp, xm, MatRef::transposed(a, inp), 1.0).map_err(wrap)?;
    gemm_with(
        n,
        out,
        r,
        MatRef::row_major(&h, r),
        MatRef::transposed(b, r),
        &mut y,
        Write::Accumulate(d.scale),
    )
    .map_err(wrap)?;
    Ok((y, h))
}

/// The gradients of [`forward_parts`] for the output gradient `g: [n, out]`, each computed
/// only when asked for: `dx = g W + s · u A` with `u = g B`, `dA = s · uᵀ x` and
/// `dB = s · gᵀ h`. `h = x Aᵀ` is the forward's (recomputed here when `None`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_parts(
    d: LoraShape,
    g: &[f32],
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    h: Option<&[f32]>,
    [want_dx, want_da, want_db]: [bool; 3],
) -> candle_core::Result<LoraGrads> {
    let LoraShape {
        n,
        inp,
        r,
        out,
        scale: s,
    } = d;
    // u = g B
    let u = product(
        n,
        r,
        out,
        MatRef::row_major(g, out),
        MatRef::row_major(b, r),
        1.0,
    )
    .map_err(wrap)?;
    let dx = if want_dx {
        let mut dx = product(
            n,
            inp,
            out,
            MatRef::row_major(g, out),
            MatRef::row_major(w, inp),
            1.0,
        )
        .map_err(wrap)?;
        gemm_with(
            n,
            inp,
            r,
            MatRef::row_major(&u, r),
            MatRef::row_major(a, inp),
            &mut dx,
            Write::Accumulate(s),
        )
        .map_err(wrap)?;
        Some(dx)
    } else {
        None
    };
    let da = if want_da {
        let da = product(
            r,
            inp,
            n,
            MatRef::transposed(&u, r),
            MatRef::row_major(x, inp),
            s,
        )
        .map_err(wrap)?;
        Some(da)
    } else {
        None
    };
    let db = if want_db {
        let recomputed;
        let h = match h {
            Some(h) => h,
            None => {
                recomputed = product(
                    n,
                    r,
                    inp,
                    MatRef::row_major(x, inp),
                    MatRef::transposed(a, inp),
                    1.0,
                )
                .map_err(wrap)?;
                &recomputed
            }
        };
        let db = product(
            out,
            r,
            n,
            MatRef::transposed(g, out),
            MatRef::row_major(h, r),
            s,
        )
        .map_err(wrap)?;
        Some(db)
    } else {
        None
    };
    Ok(LoraGrads { dx, da, db })
}

/// What [`backward_parts`] returns: `dx: [n, in]`, `dA: [r, in]`, `dB: [out, r]`, each where
/// asked for.
pub(crate) struct LoraGrads {
    pub dx: Option<Vec<f32>>,
    pub da: Option<Vec<f32>>,
    pub db: Option<Vec<f32>>,
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "fused-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [n, inp, r, out] = dims(xl.shape(), al.shape(), bl.shape(), &self.w)?;
        let (x, a, b) = (slice(xs, xl)?, slice(a_s, al)?, slice(bs, bl)?);
        let d = LoraShape {
            n,
            inp,
            r,
            out,
            scale: self.scale,
        };
        let (y, _h) = with_slice(&self.w, |w| forward_parts(d, x, w, a, b))?;
        let mut shape = xl.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [n, inp, r, out] = dims(x.shape(), a.shape(), b.shape(), &self.w)?;
        let d = LoraShape {
            n,
            inp,
            r,
            out,
            scale: self.scale,
        };
        let g = grad.contiguous()?;
        let dev = grad.device();
        let want = [x.track_op(), a.track_op(), b.track_op()];
        let grads = with_slice(&g, |g| {
            with_slice(x, |xv| {
                with_slice(a, |av| {
                    with_slice(b, |bv| {
                        with_slice(&self.w, |w| backward_parts(d, g, xv, w, av, bv, None, want))
                    })
                })
            })
        })?;
        let dx = grads
            .dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let da = grads
            .da
            .map(|v| Tensor::from_vec(v, (r, inp), dev))
            .transpose()?;
        let db = grads
            .db
            .map(|v| Tensor::from_vec(v, (out, r), dev))
            .transpose()?;
        Ok((dx, da, db))
    }
}

/// `x Wᵀ + s · (x Aᵀ) Bᵀ` through [`FusedLora`] when every operand is an f32 CPU tensor (`W`
/// contiguous); `None` otherwise, for the caller's composed path.
///
/// # Shapes
/// - x: `[.., in]`, w: `[out, in]`, a: `[r, in]`, b: `[out, r]` -> `[.., out]`.
pub fn fused_lora(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let usable = cpu_f32(x) && cpu_f32(w) && cpu_f32(a) && cpu_f32(b) && w.is_contiguous();
    if !usable || w.track_op() {
        return Ok(None);
    }
    let op = FusedLora {
        w: w.clone(),
        scale: scale as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    /// Forward and all three gradients equal candle's composed `x Wᵀ + s (x Aᵀ) Bᵀ`, on a shape
    /// large enough to run the products in parallel tiles.
    #[test]
    fn equals_the_composed_lora_forward_and_backward() {
        let dev = Device::Cpu;
        let (n, inp, r, out, s) = (300, 96, 8, 160, 2.5);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &dev).unwrap()).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (r, inp), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (out, r), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
        let composed = (x.as_tensor().matmul(&w.t().unwrap()).unwrap()
            + (x.as_tensor()
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                * s)
                .unwrap())
        .unwrap();
        let fused = fused_lora(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), s)
            .unwrap()
            .unwrap();
        assert!(max_abs_diff(&composed, &fused) < 1e-4);
        let g1 = (composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &a, &b] {
            let (p, q) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            // sums of 160..300 terms: relative 1e-5 of the largest entry
            let scale = p
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max_abs_diff(p, q) <= 1e-5 * scale.max(1.0),
                "{:?}",
                p.dims()
            );
        }
    }

    /// A frozen input (the first layer's, after the embedding) gets no gradient, A and B do.
    #[test]
    fn untracked_input_gets_no_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap()).unwrap();
        let y = fused_lora(&x, &w, a.as_tensor(), b.as_tensor(), 0.5)
            .unwrap()
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        // d(sum y)/dB = s · 1ᵀ (x Aᵀ): row o of dB is s · colsum(x Aᵀ)
        let h = x.matmul(&a.as_tensor().t().unwrap()).unwrap();
        let want = (h.sum_keepdim(0).unwrap().broadcast_as((6, 2)).unwrap() * 0.5).unwrap();
        assert!(max_abs_diff(grads.get(b.as_tensor()).unwrap(), &want) < 1e-5);
    }
}
