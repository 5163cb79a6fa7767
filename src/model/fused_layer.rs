//! A whole decoder layer with one LoRA adapter on each of its seven projections, as a single
//! autograd op (training on the CPU):
//!
//! `x₂ = x + attention(rmsnorm₁(x))`, `y = x₂ + mlp(rmsnorm₂(x₂))` (pre-norm residual blocks,
//! as in Llama), the blocks as in [`super::fused_attention`] and [`super::fused_mlp`].
//!
//! With the two blocks as ops, a layer is still six graph nodes of `[n, hidden]` (the two
//! normed inputs, the two block outputs, the two residual sums), each with a zero-filled
//! gradient buffer and an accumulation in candle's backward pass. Here the layer is one node:
//! the forward keeps the normed inputs, `x₂` and what each block's backward reads; the
//! backward runs each part's backward in reverse and adds each residual's two gradients once,
//! as candle adds them (so the output and every gradient are the composed path's to the bit).
//! The adapters travel as two flat tensors, the attention block's then the MLP block's.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::autograd::{rms_norm_grad, rms_norm_rows};
use super::frozen::with_slice;
use super::fused_attention::{AttentionBlock, AttentionSaved, AttentionShape};
use super::fused_mlp::{MlpBlock, MlpSaved};
use super::linear::Linear;
use super::lora_set::add_in_place;

/// What the forward keeps for the backward.
struct Saved {
    /// `rmsnorm₁(x)`, the attention block's input.
    n1: Vec<f32>,
    /// `x₂`, the residual stream between the blocks.
    x2: Vec<f32>,
    /// `rmsnorm₂(x₂)`, the MLP block's input.
    n2: Vec<f32>,
    attention: AttentionSaved,
    mlp: MlpSaved,
}

/// A frozen RMSNorm: weight `[hidden]` (f32, contiguous) and epsilon.
pub struct Norm {
    /// `[hidden]`
    pub w: Tensor,
    /// Added to the mean square.
    pub eps: f32,
}

/// The op: arguments `x: [b, s, hidden]`, the flat A's and the flat B's (attention block's,
/// then MLP block's); output `[b, s, hidden]`.
pub struct FusedLayer {
    attention: AttentionBlock,
    mlp: MlpBlock,
    norms: [Norm; 2],
    saved: Mutex<Option<Saved>>,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("fused-layer: expected contiguous arguments"),
    }
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("fused-layer: poisoned state".into())
}

/// `y[i] = a[i] + y[i]`: the residual sum `a + y`, written over `y`.
fn residual(a: &[f32], y: &mut [f32]) {
    add_in_place(y, a);
}

impl FusedLayer {
    /// `(b, s)` and the split points `(a, b)` of the flat arguments between the blocks,
    /// checked against their lengths.
    fn dims(
        &self,
        x: &Shape,
        a_len: usize,
        b_len: usize,
    ) -> candle_core::Result<((usize, usize), (usize, usize))> {
        let (a_att, b_att) = self.attention.flat_lens();
        let (a_mlp, b_mlp) = self.mlp.flat_lens();
        if a_len != a_att + a_mlp || b_len != b_att + b_mlp {
            candle_core::bail!(
                "fused-layer: {a_len} A values and {b_len} B values for blocks of {} and {}",
                a_att + a_mlp,
                b_att + b_mlp
            );
        }
        let dims = self.attention.dims(x, a_att, b_att)?;
        self.mlp.rows(x.dims(), a_mlp, b_mlp)?;
        Ok((dims, (a_att, b_att)))
    }
}

impl CustomOp3 for FusedLayer {
    fn name(&self) -> &'static str {
        "fused-layer"
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
        let (dims, (sa, sb)) =
            self.dims(xl.shape(), al.shape().elem_count(), bl.shape().elem_count())?;
        let (x, a, b) = (slice(xs, xl)?, slice(a_s, al)?, slice(bs, bl)?);
        let [norm1, norm2] = &self.norms;
        let n1 = with_slice(&norm1.w, |w| rms_norm_rows(x, w, norm1.eps))?;
        let (mut x2, attention) = self.attention.forward(dims, &n1, &a[..sa], &b[..sb])?;
        residual(x, &mut x2);
        let n2 = with_slice(&norm2.w, |w| rms_norm_rows(&x2, w, norm2.eps))?;
        let (mut y, mlp) = self.mlp.forward(dims.0 * dims.1, &n2, &a[sa..], &b[sb..])?;
        residual(&x2, &mut y);
        *self.saved.lock().map_err(poisoned)? = Some(Saved {
            n1,
            x2,
            n2,
            attention,
            mlp,
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dims, (sa, sb)) = self.dims(x.shape(), a.elem_count(), b.elem_count())?;
        let guard = self.saved.lock().map_err(poisoned)?;
        let Some(sv) = guard.as_ref() else {
            candle_core::bail!("fused-layer: backward before forward");
        };
        let want_params = a.track_op() || b.track_op();
        let want_dx = x.track_op();
        let [norm1, norm2] = &self.norms;
        let g = grad.contiguous()?;
        let (dx, da, db) = with_slice(&g, |g| {
            with_slice(x, |xv| {
                with_slice(a, |av| {
                    with_slice(b, |bv| {
                        let mlp = self.mlp.backward(
                            dims.0 * dims.1,
                            &sv.mlp,
                            g,
                            &sv.n2,
                            (&av[sa..], &bv[sb..]),
                            true,
                            want_params,
                        )?;
                        let Some(d_n2) = mlp.dx else {
                            candle_core::bail!("fused-layer: no gradient for the MLP's input");
                        };
                        // x₂'s two gradients: through the norm, and the residual's
                        let mut d_x2 =
                            with_slice(&norm2.w, |w| rms_norm_grad(&sv.x2, &d_n2, w, norm2.eps))?;
                        drop(d_n2);
                        add_in_place(&mut d_x2, g);
                        let attention = self.attention.backward(
                            dims,
                            &sv.attention,
                            &d_x2,
                            &sv.n1,
                            (&av[..sa], &bv[..sb]),
                            want_dx,
                            want_params,
                        )?;
                        let dx = match attention.dx {
                            Some(d_n1) => {
                                let mut dx = with_slice(&norm1.w, |w| {
                                    rms_norm_grad(xv, &d_n1, w, norm1.eps)
                                })?;
                                add_in_place(&mut dx, &d_x2);
                                Some(dx)
                            }
                            None => None,
                        };
                        let join = |p: Option<Vec<f32>>, q: Option<Vec<f32>>| match (p, q) {
                            (Some(mut p), Some(q)) => {
                                p.extend(q);
                                Some(p)
                            }
                            _ => None,
                        };
                        Ok((dx, join(attention.da, mlp.da), join(attention.db, mlp.db)))
                    })
                })
            })
        })?;
        let dev = grad.device();
        let wrap = |v: Option<Vec<f32>>, shape: &Shape| {
            v.map(|v| Tensor::from_vec(v, shape, dev)).transpose()
        };
        Ok((
            wrap(dx, x.shape())?,
            wrap(da, a.shape())?,
            wrap(db, b.shape())?,
        ))
    }
}

/// The layer through [`FusedLayer`] when both blocks can be fused (see
/// [`super::fused_attention::fused_attention`] and [`super::fused_mlp::fused_mlp`]) and both
/// norms' weights are f32 on the CPU; `None` otherwise, for the caller's per-block path.
pub fn fused_layer(
    x: &Tensor,
    attention: ([&Linear; 4], AttentionShape),
    mlp: [&Linear; 3],
    norms: [Norm; 2],
) -> candle_core::Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !norms.iter().all(|n| f32_cpu(&n.w) && n.w.rank() == 1) {
        return Ok(None);
    }
    let Some((att, a1, b1)) = AttentionBlock::for_training(x, attention.0, &attention.1)? else {
        return Ok(None);
    };
    let Some((mlp, a2, b2)) = MlpBlock::for_training(x, mlp)? else {
        return Ok(None);
    };
    let hidden = x.dim(2)?;
    if norms.iter().any(|n| n.w.elem_count() != hidden) {
        return Ok(None);
    }
    let [n1, n2] = norms;
    let norms = [
        Norm {
            w: n1.w.contiguous()?,
            eps: n1.eps,
        },
        Norm {
            w: n2.w.contiguous()?,
            eps: n2.eps,
        },
    ];
    let (a, b) = (Tensor::cat(&[a1, a2], 0)?, Tensor::cat(&[b1, b2], 0)?);
    let op = FusedLayer {
        attention: att,
        mlp,
        norms,
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(&a, &b, op)?))
}
