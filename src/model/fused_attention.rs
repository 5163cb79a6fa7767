//! The attention block with one LoRA adapter on each of q, k, v and o, as a single autograd op
//! (training on the CPU):
//!
//! `y = o(merge(softmax(scale · rope(q(x)) rope(k(x))ᵀ + mask) v(x)))`, each projection
//! `p(x) = x Wᵀ + s · (x Aᵀ) Bᵀ` (Hu et al. 2021, eq. 3), grouped-query heads as in Llama.
//!
//! Composed of four [`super::fused_lora::FusedLora`] ops and the head split, rotation, scores,
//! `P V` and merge ops, the block is thirteen graph nodes, and candle's backward pass gives each
//! a zero-filled gradient buffer and adds the incoming gradient to it (~27 MB per layer on
//! SmolLM2 at 8 × 128 tokens, written, read and written again), and adds `x`'s three
//! gradients (from q, k and v) into a fourth buffer. Here the block is one node. The forward
//! runs the same ops, untracked, and keeps what their backward passes read (the rotated
//! queries and keys, the values, the probabilities, the merged heads and each `x Aᵀ`); the
//! backward runs the same backward passes in reverse, on the same shapes, so the output and
//! every gradient are the composed path's to the bit. The adapters travel as two flat tensors
//! (`lora_set`).

use candle_core::{CustomOp1, Shape, Tensor};

use super::autograd::{HeadsOp, RopeOp};
use super::block_op::{Block, BlockGrads, BlockOp, Rows};
use super::bmm::BatchedMatmul;
use super::frozen::with_slice;
use super::linear::Linear;
use super::lora_set::{add_in_place, flat_adapters, LoraSet};
use super::scores::AttentionScores;
use crate::adapters::LoraModule;

/// Projection indices in the set.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;

/// What the forward keeps for the backward.
pub(crate) struct AttentionSaved {
    /// Rotated queries, `[b, kv, groups · s, d]`.
    q: Tensor,
    /// Rotated keys, `[b, kv, s, d]`.
    k: Tensor,
    /// Values, `[b, kv, s, d]`.
    v: Tensor,
    /// Attention probabilities, `[b, kv, groups · s, s]`.
    probs: Tensor,
    /// The heads merged, o's input, `[b, s, heads · d]`.
    merged: Tensor,
    /// `x Aᵀ` of each projection.
    h: [Vec<f32>; 4],
}

/// The block's arithmetic on slices, forward and backward ([`Block`]: its own op, or part of
/// the whole decoder layer's in [`super::fused_layer`]).
pub(crate) struct AttentionBlock {
    set: LoraSet<4>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: RopeOp,
    scores: AttentionScores,
}

impl AttentionBlock {
    /// The lengths of the flat A's and B's.
    pub fn flat_lens(&self) -> (usize, usize) {
        self.set.flat_lens()
    }

    fn split(&self, heads: usize) -> HeadsOp {
        HeadsOp::Split {
            heads,
            head_dim: self.head_dim,
        }
    }
}

impl Block for AttentionBlock {
    type Saved = AttentionSaved;
    const NAME: &'static str = "fused-attention";

    fn rows(&self, x: &Shape, a: usize, b: usize) -> candle_core::Result<Rows> {
        self.set.rows(x.dims(), a, b, Q)?;
        let (bsz, s, _) = x.dims3()?;
        Ok((bsz, s))
    }

    fn forward(
        &self,
        (bsz, s): Rows,
        x: &[f32],
        a: &[f32],
        b: &[f32],
    ) -> candle_core::Result<(Vec<f32>, AttentionSaved)> {
        let n = bsz * s;
        let dev = candle_core::Device::Cpu;
        let (groups, d) = (self.heads / self.kv_heads, self.head_dim);
        let project = |i: usize, heads: usize| -> candle_core::Result<(Tensor, Vec<f32>)> {
            let (y, h) = self.set.forward(i, n, x, a, b)?;
            let y = Tensor::from_vec(y, (bsz, s, heads * d), &dev)?;
            Ok((y.apply_op1_no_bwd(&self.split(heads))?, h))
        };
        let (q, h_q) = project(Q, self.heads)?;
        let (k, h_k) = project(K, self.kv_heads)?;
        let (v, h_v) = project(V, self.kv_heads)?;
        let q = q
            .apply_op1_no_bwd(&self.rope)?
            .reshape((bsz, self.kv_heads, groups * s, d))?;
        let k = k.apply_op1_no_bwd(&self.rope)?;
        let probs = q.apply_op2_no_bwd(&k, &self.scores)?;
        let merged = probs
            .apply_op2_no_bwd(&v, &BatchedMatmul)?
            .apply_op1_no_bwd(&HeadsOp::Merge { heads: self.heads })?;
        let (y, h_o) = with_slice(&merged, |m| self.set.forward(O, n, m, a, b))?;
        let saved = AttentionSaved {
            q,
            k,
            v,
            probs,
            merged,
            h: [h_q, h_k, h_v, h_o],
        };
        Ok((y, saved))
    }

    fn backward(
        &self,
        (bsz, s): Rows,
        sv: &AttentionSaved,
        g: &[f32],
        x: &[f32],
        ab: (&[f32], &[f32]),
        want_dx: bool,
        want_params: bool,
    ) -> candle_core::Result<BlockGrads> {
        let n = bsz * s;
        let dev = candle_core::Device::Cpu;
        let (groups, d) = (self.heads / self.kv_heads, self.head_dim);
        let mut o = with_slice(&sv.merged, |m| {
            self.set
                .backward(O, n, g, m, ab, &sv.h[O], true, want_params)
        })?;
        let Some(d_merged) = o.dx.take() else {
            return Err(missing("the heads"));
        };
        // the merge's backward: the heads split again
        let d_out = Tensor::from_vec(d_merged, (bsz, s, self.heads * d), &dev)?
            .apply_op1_no_bwd(&self.split(self.heads))?
            .reshape((bsz, self.kv_heads, groups * s, d))?;
        let (d_probs, d_v) = BatchedMatmul.grads(&sv.probs, &sv.v, &d_out, [true, true])?;
        let d_probs = d_probs.ok_or_else(|| missing("P"))?;
        let (d_q, d_k) = self
            .scores
            .grads(&sv.q, &sv.k, &sv.probs, &d_probs, [true, true])?;
        let d_q = d_q
            .ok_or_else(|| missing("Q"))?
            .reshape((bsz, self.heads, s, d))?;
        // the rotation's and the split's backward passes
        let back = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            let t = match self.rope.bwd(&t, &t, &t)? {
                Some(t) => t,
                None => return Err(missing("the rotation")),
            };
            t.apply_op1_no_bwd(&HeadsOp::Merge { heads })
        };
        let d_q = back(d_q, self.heads)?;
        let d_k = back(d_k.ok_or_else(|| missing("K"))?, self.kv_heads)?;
        let d_v = d_v
            .ok_or_else(|| missing("V"))?
            .apply_op1_no_bwd(&HeadsOp::Merge {
                heads: self.kv_heads,
            })?;
        let run = |i: usize, gi: Tensor| {
            with_slice(&gi, |gi| {
                self.set
                    .backward(i, n, gi, x, ab, &sv.h[i], want_dx, want_params)
            })
        };
        let mut q = run(Q, d_q)?;
        let mut k = run(K, d_k)?;
        let mut v = run(V, d_v)?;
        // x's three gradients, added as candle's backward pass adds them: k's and v's (which
        // it reaches first), then q's
        let dx = match (q.dx.take(), k.dx.take(), v.dx.take()) {
            (Some(dq), Some(mut dx), Some(dv)) => {
                add_in_place(&mut dx, &dv);
                add_in_place(&mut dx, &dq);
                Some(dx)
            }
            _ => None,
        };
        let (da, db) = LoraSet::flat_grads([q, k, v, o]);
        Ok(BlockGrads { dx, da, db })
    }
}

fn missing(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused-attention: no gradient for {what}"))
}

/// The attention block's heads and the step's constants.
pub struct AttentionShape<'a> {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rotary angles, `[b, s, head_dim / 2]`.
    pub cos: &'a Tensor,
    /// Rotary angles, `[b, s, head_dim / 2]`.
    pub sin: &'a Tensor,
    /// Additive `[b, 1, s, s]` mask, or none.
    pub mask: Option<&'a Tensor>,
}

impl AttentionBlock {
    /// The block and its adapters (q, k, v, o) when `LoraSet::for_training` accepts q, k, v
    /// and o (one adapter each, no bias, f32 on the CPU, something trained) and their widths
    /// fit the heads; `None` otherwise.
    pub(crate) fn for_training<'a>(
        x: &Tensor,
        projections: [&'a Linear; 4],
        shape: &AttentionShape,
    ) -> candle_core::Result<Option<(Self, [&'a LoraModule; 4])>> {
        let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        if x.rank() != 3 || kv_heads == 0 || heads % kv_heads != 0 {
            return Ok(None);
        }
        let Some((set, mods)) = LoraSet::for_training(x, projections)? else {
            return Ok(None);
        };
        let hidden = x.dim(2)?;
        let fits = set.io(Q) == (hidden, heads * d)
            && set.io(K) == (hidden, kv_heads * d)
            && set.io(V) == (hidden, kv_heads * d)
            && set.io(O) == (heads * d, hidden);
        if !fits {
            return Ok(None);
        }
        let block = AttentionBlock {
            set,
            heads,
            kv_heads,
            head_dim: d,
            rope: RopeOp {
                cos: shape.cos.contiguous()?,
                sin: shape.sin.contiguous()?,
            },
            scores: AttentionScores {
                scale: (1.0 / (d as f64).sqrt()) as f32,
                mask: shape.mask.map(|m| m.contiguous()).transpose()?,
            },
        };
        Ok(Some((block, mods)))
    }
}

/// The block as one autograd op when `LoraSet::for_training` accepts q, k, v and o
/// (one adapter each, no bias, f32 on the CPU, something trained) and their widths fit the
/// heads; `None` otherwise, for the caller's composed path.
pub fn fused_attention(
    x: &Tensor,
    projections: [&Linear; 4],
    shape: AttentionShape,
) -> candle_core::Result<Option<Tensor>> {
    let Some((block, mods)) = AttentionBlock::for_training(x, projections, &shape)? else {
        return Ok(None);
    };
    let (a, b) = flat_adapters(&mods)?;
    Ok(Some(BlockOp::apply(block, x, &a, &b)?))
}
