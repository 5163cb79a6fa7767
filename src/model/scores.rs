//! Attention probabilities `P = softmax(scale · Q Kᵀ + mask)` as one autograd op (training on
//! the CPU), for the query heads of each KV head stacked as `Q: [b, kv, groups · s, d]` and
//! `K: [b, kv, t, d]`.
//!
//! Composed, this is three graph nodes (`Kᵀ`, the product, the softmax), and the raw scores
//! `Q Kᵀ` stay alive until the backward pass as the softmax's input although its backward only
//! needs `P`. Here the scores are turned into `P` in place, so the step holds one `[.., s, t]`
//! buffer per layer instead of two, and the backward reads `P`, `Q` and `K` directly:
//! `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS K`, `dK = dSᵀ Q`.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::autograd::{masked_softmax, softmax_backward};
use super::bmm::{product, with_cpu, Operand};

/// The op: arguments `q: [b, kv, m, d]` and `k: [b, kv, t, d]`, result `[b, kv, m, t]`.
pub struct AttentionScores {
    /// Multiplies `Q Kᵀ` (1 / sqrt(head_dim)).
    pub scale: f32,
    /// Additive `[b, 1, s, t]` mask (`m` a multiple of `s`), or none.
    pub mask: Option<Tensor>,
}

/// `(b, kv, m, t, d)`, checked.
fn dims(q: &Shape, k: &Shape) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, kv, m, d) = q.dims4()?;
    let (kb, kkv, t, kd) = k.dims4()?;
    if (kb, kkv, kd) != (b, kv, d) {
        candle_core::bail!("attention-scores: q {:?} with k {:?}", q.dims(), k.dims());
    }
    Ok((b, kv, m, t, d))
}

impl CustomOp2 for AttentionScores {
    fn name(&self) -> &'static str {
        "attention-scores"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, kv, m, t, d) = dims(ql.shape(), kl.shape())?;
        let raw = product(
            (m, t, d),
            &Operand::new(qs, ql, false)?,
            &Operand::new(ks, kl, true)?,
        )?;
        let p = masked_softmax(raw, (b, kv, m, t), self.scale, self.mask.as_ref())?;
        Ok((CpuStorage::F32(p), Shape::from((b, kv, m, t))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(q, k, p, g, [q.track_op(), k.track_op()])
    }
}

impl AttentionScores {
    /// The backward pass: `(dQ, dK)` for the probabilities `p` and their gradient `g`, each
    /// where `want` asks.
    pub(crate) fn grads(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        g: &Tensor,
        [want_q, want_k]: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, kv, m, t, d) = dims(q.shape(), k.shape())?;
        let (p, g) = (p.contiguous()?, g.contiguous()?);
        let ds = with_cpu(&p, |ps, pl| {
            with_cpu(&g, |gs, gl| {
                match (pl.contiguous_offsets(), gl.contiguous_offsets()) {
                    (Some((p0, p1)), Some((g0, g1))) => Ok(softmax_backward(
                        &ps.as_slice::<f32>()?[p0..p1],
                        &gs.as_slice::<f32>()?[g0..g1],
                        t,
                        self.scale,
                    )),
                    _ => candle_core::bail!("attention-scores: non-contiguous gradient"),
                }
            })
        })?;
        let items = b * kv;
        let dev = q.device();
        with_cpu(q, |qs, ql| {
            with_cpu(k, |ks, kl| {
                let dq = if want_q {
                    // dQ = dS K: [m, t] x [t, d]
                    let v = product(
                        (m, d, t),
                        &Operand::packed(&ds, items, (m, t), false),
                        &Operand::new(ks, kl, false)?,
                    )?;
                    Some(Tensor::from_vec(v, q.shape(), dev)?)
                } else {
                    None
                };
                let dk = if want_k {
                    // dK = dSᵀ Q: [t, m] x [m, d]
                    let v = product(
                        (t, d, m),
                        &Operand::packed(&ds, items, (m, t), true),
                        &Operand::new(qs, ql, false)?,
                    )?;
                    Some(Tensor::from_vec(v, k.shape(), dev)?)
                } else {
                    None
                };
                Ok((dq, dk))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{Device, Var, D};

    /// Probabilities and both gradients equal the composition `softmax(scale q kᵀ + mask)`
    /// with candle's ops, for stacked query heads (kv 2, groups 3) and a padding-style mask.
    #[test]
    fn equals_the_composed_scores_and_softmax() {
        let dev = Device::Cpu;
        let (b, kv, groups, s, d) = (2, 2, 3, 5, 8);
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, groups * s, d), &dev).unwrap())
            .unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, s, d), &dev).unwrap()).unwrap();
        let mut m = vec![0f32; b * s * s];
        // causal, and the first key of batch row 1 masked (left padding)
        for bi in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || (bi == 1 && j == 0) {
                        m[(bi * s + i) * s + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, s, s), &dev).unwrap();
        let op = AttentionScores {
            scale: 0.3,
            mask: Some(mask.clone()),
        };
        let fused = q.as_tensor().apply_op2(k.as_tensor(), op).unwrap();
        let raw = q
            .as_tensor()
            .reshape((b, kv * groups, s, d))
            .unwrap()
            .matmul(
                // query head h reads KV head h / groups
                &k.as_tensor()
                    .unsqueeze(2)
                    .unwrap()
                    .broadcast_as((b, kv, groups, s, d))
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((b, kv * groups, s, d))
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        let composed = candle_nn::ops::softmax(
            &(raw * 0.3).unwrap().broadcast_add(&mask).unwrap(),
            D::Minus1,
        )
        .unwrap()
        .reshape((b, kv, groups * s, s))
        .unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        let probe = Tensor::randn(0f32, 1.0, (b, kv, groups * s, s), &dev).unwrap();
        let g1 = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&q, &k] {
            let (a, c) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(max_abs_diff(a, c) < 1e-5, "{:?}", a.dims());
        }
    }
}
