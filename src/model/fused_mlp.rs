//! The MLP block with one LoRA adapter on each of its three projections, as a single autograd
//! op (training on the CPU):
//!
//! `y = down(silu(gate(x)) · up(x))`, each projection `p(x) = x Wᵀ + s · (x Aᵀ) Bᵀ`
//! (Hu et al. 2021, eq. 3; SwiGLU as in Llama).
//!
//! Composed of three [`super::fused_lora::FusedLora`] ops and one SwiGLU op, the block has four
//! graph nodes whose outputs are `[n, intermediate]` (gate, up, their product) or whose input
//! gets two gradients (the normed `x`, read by gate and up). candle's backward pass gives every
//! node a zero-filled gradient buffer and adds each incoming gradient to it: on SmolLM2 at 8 ×
//! 128 tokens that is ~19 MB written, read and written again per layer, ~80 ms of a ~2.9 s LoRA
//! step. Here the block is one node: the forward keeps gate, up, their product and the three
//! `x Aᵀ`; the backward runs the same products as the composed ops, in the same shapes (so the
//! same sums: the output and every gradient are the composed path's to the bit), and adds `x`'s
//! two gradients once. The adapters travel as two flat tensors (`lora_set`).

use candle_core::{Shape, Tensor};

use super::autograd::{swiglu, swiglu_grad};
use super::block_op::{Block, BlockGrads, BlockOp, Rows};
use super::linear::Linear;
use super::lora_set::{add_in_place, flat_adapters, LoraSet};
use crate::adapters::LoraModule;

/// Projection indices in the set.
const GATE: usize = 0;
const UP: usize = 1;
const DOWN: usize = 2;

/// What the forward keeps for the backward.
pub(crate) struct MlpSaved {
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// `x Aᵀ` of each projection.
    h: [Vec<f32>; 3],
}

/// The block's arithmetic on slices, forward and backward ([`Block`]: its own op, or part of
/// the whole decoder layer's in [`super::fused_layer`]).
pub(crate) struct MlpBlock {
    set: LoraSet<3>,
}

impl MlpBlock {
    /// The block and its adapters (gate, up, down) when `LoraSet::for_training` accepts the three
    /// projections (one adapter each, no bias, f32 on the CPU, something trained) and gate and
    /// up read what down writes; `None` otherwise.
    pub(crate) fn for_training<'a>(
        x: &Tensor,
        projections: [&'a Linear; 3],
    ) -> candle_core::Result<Option<(Self, [&'a LoraModule; 3])>> {
        let Some((set, mods)) = LoraSet::for_training(x, projections)? else {
            return Ok(None);
        };
        let ((g_in, g_out), up, down) = (set.io(GATE), set.io(UP), set.io(DOWN));
        if up != (g_in, g_out) || down != (g_out, g_in) {
            return Ok(None);
        }
        Ok(Some((MlpBlock { set }, mods)))
    }

    /// The lengths of the flat A's and B's.
    pub fn flat_lens(&self) -> (usize, usize) {
        self.set.flat_lens()
    }
}

impl Block for MlpBlock {
    type Saved = MlpSaved;
    const NAME: &'static str = "fused-mlp";

    /// An input `[.., hidden]` as `(1, n)`.
    fn rows(&self, x: &Shape, a: usize, b: usize) -> candle_core::Result<Rows> {
        Ok((1, self.set.rows(x.dims(), a, b, GATE)?))
    }

    fn forward(
        &self,
        (bsz, s): Rows,
        x: &[f32],
        a: &[f32],
        b: &[f32],
    ) -> candle_core::Result<(Vec<f32>, MlpSaved)> {
        let n = bsz * s;
        let (gate, h_gate) = self.set.forward(GATE, n, x, a, b)?;
        let (up, h_up) = self.set.forward(UP, n, x, a, b)?;
        let act = swiglu(&gate, &up);
        let (y, h_down) = self.set.forward(DOWN, n, &act, a, b)?;
        let saved = MlpSaved {
            gate,
            up,
            act,
            h: [h_gate, h_up, h_down],
        };
        Ok((y, saved))
    }

    fn backward(
        &self,
        (bsz, s): Rows,
        sv: &MlpSaved,
        g: &[f32],
        x: &[f32],
        ab: (&[f32], &[f32]),
        want_dx: bool,
        want_params: bool,
    ) -> candle_core::Result<BlockGrads> {
        let n = bsz * s;
        let mut down =
            self.set
                .backward(DOWN, n, g, &sv.act, ab, &sv.h[DOWN], true, want_params)?;
        let Some(d_act) = down.dx.take() else {
            candle_core::bail!("fused-mlp: no gradient for the activation");
        };
        let (d_gate, d_up) = swiglu_grad(&sv.gate, &sv.up, &d_act);
        drop(d_act);
        let run = |i: usize, gi: &[f32]| {
            self.set
                .backward(i, n, gi, x, ab, &sv.h[i], want_dx, want_params)
        };
        let mut gate = run(GATE, &d_gate)?;
        drop(d_gate);
        let mut up = run(UP, &d_up)?;
        // x's two gradients, added once (candle adds a node's gradients)
        let dx = match (gate.dx.take(), up.dx.take()) {
            (Some(mut dx), Some(du)) => {
                add_in_place(&mut dx, &du);
                Some(dx)
            }
            _ => None,
        };
        let (da, db) = LoraSet::flat_grads([gate, up, down]);
        Ok(BlockGrads { dx, da, db })
    }
}

/// `down(silu(gate(x)) · up(x))` as one autograd op when `LoraSet::for_training` accepts
/// the three projections (one adapter each, no bias, f32 on the CPU, something trained) and
/// gate and up read what down writes; `None` otherwise, for the caller's composed path.
pub fn fused_mlp(x: &Tensor, projections: [&Linear; 3]) -> candle_core::Result<Option<Tensor>> {
    let Some((block, mods)) = MlpBlock::for_training(x, projections)? else {
        return Ok(None);
    };
    let (a, b) = flat_adapters(&mods)?;
    Ok(Some(BlockOp::apply(block, x, &a, &b)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraModule;
    use crate::model::test_util::{bits, values};
    use candle_core::{DType, Device, Var};

    /// The block's output and the gradients of its input and of all six adapter matrices are
    /// the composed path's (three fused LoRA ops and SwiGLU) to the bit, on a shape whose
    /// products run in parallel tiles, with ranks that differ per projection.
    #[test]
    fn equals_the_composed_block_to_the_bit() {
        let dev = Device::Cpu;
        let (n, hidden, inter) = (300, 96, 160);
        let mut seed = 7u64;
        let mut randn = |shape: &[usize], scale: f32| {
            seed += 1;
            let v = values(shape.iter().product(), seed);
            let v: Vec<f32> = v.into_iter().map(|x| x * scale).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let x = Var::from_tensor(&randn(&[3, n / 3, hidden], 1.0)).unwrap();
        let probe = randn(&[3, n / 3, hidden], 1.0);
        let ranks = [8, 4, 6];
        let shapes = [(inter, hidden), (inter, hidden), (hidden, inter)];
        let mut linears = Vec::new();
        let mut vars = Vec::new();
        for (i, (&(out, inp), &r)) in shapes.iter().zip(&ranks).enumerate() {
            let a = Var::from_tensor(&randn(&[r, inp], 0.3)).unwrap();
            let b = Var::from_tensor(&randn(&[out, r], 0.3)).unwrap();
            let mut l = Linear::new(format!("p{i}"), randn(&[out, inp], 0.2), None);
            l.loras.push(LoraModule {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 1.5 + i as f64,
            });
            linears.push(l);
            vars.extend([a, b]);
        }
        let composed = {
            let gate = linears[0].forward(x.as_tensor(), None).unwrap();
            let up = linears[1].forward(x.as_tensor(), None).unwrap();
            let h = gate
                .apply_op2(&up, crate::model::autograd::SwiGluOp)
                .unwrap();
            linears[2].forward(&h, None).unwrap()
        };
        let fused = fused_mlp(x.as_tensor(), [&linears[0], &linears[1], &linears[2]])
            .unwrap()
            .expect("the fused path applies");
        assert_eq!(bits(&composed), bits(&fused), "forward");
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(composed), grads(fused));
        for (i, v) in std::iter::once(&x).chain(&vars).enumerate() {
            let (p, q) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(p.dims(), q.dims());
            assert_eq!(bits(p), bits(q), "gradient {i}");
        }
    }

    /// A block whose input is frozen (the first layer's) gives its adapters gradients and the
    /// input none; a block with an adapter missing, or with a bias, declines.
    #[test]
    fn frozen_input_and_declined_blocks() {
        let dev = Device::Cpu;
        let (hidden, inter) = (8, 12);
        let lin = |name: &str, out: usize, inp: usize, lora: bool| {
            let mut l = Linear::new(
                name.into(),
                Tensor::ones((out, inp), DType::F32, &dev).unwrap(),
                None,
            );
            if lora {
                let a = Var::from_tensor(&Tensor::ones((2, inp), DType::F32, &dev).unwrap());
                let b = Var::from_tensor(&Tensor::ones((out, 2), DType::F32, &dev).unwrap());
                l.loras.push(LoraModule {
                    a: a.unwrap().as_tensor().clone(),
                    b: b.unwrap().as_tensor().clone(),
                    scale: 0.5,
                });
            }
            l
        };
        let x = Tensor::ones((2, 3, hidden), DType::F32, &dev).unwrap();
        let (g, u, d) = (
            lin("g", inter, hidden, true),
            lin("u", inter, hidden, true),
            lin("d", hidden, inter, true),
        );
        let y = fused_mlp(&x, [&g, &u, &d]).unwrap().unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&g.loras[0].a).is_some());
        assert!(grads.get(&d.loras[0].b).is_some());
        let bare = lin("d", hidden, inter, false);
        assert!(fused_mlp(&x, [&g, &u, &bare]).unwrap().is_none());
        let mut biased = lin("d", hidden, inter, true);
        biased.bias = Some(Tensor::zeros(hidden, DType::F32, &dev).unwrap());
        assert!(fused_mlp(&x, [&g, &u, &biased]).unwrap().is_none());
    }
}
