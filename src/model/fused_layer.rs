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

use candle_core::{DType, Shape, Tensor};

use super::autograd::{rms_norm_grad, rms_norm_rows};
use super::block_op::{Block, BlockGrads, BlockOp, Rows};
use super::frozen::with_slice;
use super::fused_attention::{AttentionBlock, AttentionSaved, AttentionShape};
use super::fused_mlp::{MlpBlock, MlpSaved};
use super::linear::Linear;
use super::lora_set::{add_in_place, flat_adapters};

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

/// The layer's arithmetic: both blocks and the two norms; the flat A's and B's hold the
/// attention block's, then the MLP block's.
struct LayerBlock {
    attention: AttentionBlock,
    mlp: MlpBlock,
    norms: [Norm; 2],
}

impl Block for LayerBlock {
    type Saved = Saved;
    const NAME: &'static str = "fused-layer";

    fn rows(&self, x: &Shape, a_len: usize, b_len: usize) -> candle_core::Result<Rows> {
        let (a_att, b_att) = self.attention.flat_lens();
        let (a_mlp, b_mlp) = self.mlp.flat_lens();
        if a_len != a_att + a_mlp || b_len != b_att + b_mlp {
            candle_core::bail!(
                "{}: {a_len} A values and {b_len} B values for blocks of {} and {}",
                Self::NAME,
                a_att + a_mlp,
                b_att + b_mlp
            );
        }
        self.mlp.rows(x, a_mlp, b_mlp)?;
        self.attention.rows(x, a_att, b_att)
    }

    fn forward(
        &self,
        rows: Rows,
        x: &[f32],
        a: &[f32],
        b: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Saved)> {
        let (sa, sb) = self.attention.flat_lens();
        let [norm1, norm2] = &self.norms;
        let n1 = with_slice(&norm1.w, |w| rms_norm_rows(x, w, norm1.eps))?;
        let (mut x2, attention) = self.attention.forward(rows, &n1, &a[..sa], &b[..sb])?;
        add_in_place(&mut x2, x); // the residual sum x + attention, over the block's output
        let n2 = with_slice(&norm2.w, |w| rms_norm_rows(&x2, w, norm2.eps))?;
        let (mut y, mlp) = self.mlp.forward(rows, &n2, &a[sa..], &b[sb..])?;
        add_in_place(&mut y, &x2); // x₂ + mlp
        let saved = Saved {
            n1,
            x2,
            n2,
            attention,
            mlp,
        };
        Ok((y, saved))
    }

    fn backward(
        &self,
        rows: Rows,
        sv: &Saved,
        g: &[f32],
        x: &[f32],
        (av, bv): (&[f32], &[f32]),
        want_dx: bool,
        want_params: bool,
    ) -> candle_core::Result<BlockGrads> {
        let (sa, sb) = self.attention.flat_lens();
        let [norm1, norm2] = &self.norms;
        let mlp = self.mlp.backward(
            rows,
            &sv.mlp,
            g,
            &sv.n2,
            (&av[sa..], &bv[sb..]),
            true,
            want_params,
        )?;
        let Some(d_n2) = mlp.dx else {
            candle_core::bail!("{}: no gradient for the MLP's input", Self::NAME);
        };
        // x₂'s two gradients: through the norm, and the residual's
        let mut d_x2 = with_slice(&norm2.w, |w| rms_norm_grad(&sv.x2, &d_n2, w, norm2.eps))?;
        drop(d_n2);
        add_in_place(&mut d_x2, g);
        let attention = self.attention.backward(
            rows,
            &sv.attention,
            &d_x2,
            &sv.n1,
            (&av[..sa], &bv[..sb]),
            want_dx,
            want_params,
        )?;
        // x's two gradients, likewise
        let dx = match attention.dx {
            Some(d_n1) => {
                let mut dx = with_slice(&norm1.w, |w| rms_norm_grad(x, &d_n1, w, norm1.eps))?;
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
        Ok(BlockGrads {
            dx,
            da: join(attention.da, mlp.da),
            db: join(attention.db, mlp.db),
        })
    }
}

/// The layer as one autograd op when both blocks can be fused (see
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
    let Some((att, att_mods)) = AttentionBlock::for_training(x, attention.0, &attention.1)? else {
        return Ok(None);
    };
    let Some((mlp, mlp_mods)) = MlpBlock::for_training(x, mlp)? else {
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
    // all seven adapters in one concatenation: the attention block's, then the MLP block's
    let mods: Vec<_> = att_mods.into_iter().chain(mlp_mods).collect();
    let (a, b) = flat_adapters(&mods)?;
    let block = LayerBlock {
        attention: att,
        mlp,
        norms,
    };
    Ok(Some(BlockOp::apply(block, x, &a, &b)?))
}
