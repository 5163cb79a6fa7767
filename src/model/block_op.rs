//! A block of the model (a decoder layer, its attention or its MLP) as one autograd op for
//! training on the CPU ([`super::fused_layer`], [`super::fused_attention`],
//! [`super::fused_mlp`]). candle's backward pass gives every graph node a zero-filled gradient
//! buffer and adds each incoming gradient to it; a block computed as one node skips that for
//! everything inside it. A [`Block`] says how to run the block forward and backward on slices;
//! [`BlockOp`] is the custom op around it: arguments the block's input `x`, its adapters' A's
//! and B's, flattened and concatenated (`super::lora_set`); result the block's output, shaped as
//! `x`. What the forward keeps for the backward waits in the op.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::frozen::with_slice;

/// A block's arithmetic on slices.
pub(crate) trait Block: Send + Sync + 'static {
    /// What the forward keeps for the backward.
    type Saved: Send + Sync + 'static;
    /// The op's name, in errors.
    const NAME: &'static str;

    /// The rows of an input of shape `x`, checked against the flat A's and B's lengths.
    fn rows(&self, x: &Shape, a: usize, b: usize) -> candle_core::Result<Rows>;

    /// The output for the input `x`, and what the backward reads.
    fn forward(
        &self,
        rows: Rows,
        x: &[f32],
        a: &[f32],
        b: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Self::Saved)>;

    /// The gradients for the output gradient `g`, given the forward's input `x` and what it
    /// kept: the input's when `want_dx`, the adapters' when `want_params`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        rows: Rows,
        saved: &Self::Saved,
        g: &[f32],
        x: &[f32],
        ab: (&[f32], &[f32]),
        want_dx: bool,
        want_params: bool,
    ) -> candle_core::Result<BlockGrads>;
}

/// An input's rows: `(batch, positions)`; their product is the row count.
pub(crate) type Rows = (usize, usize);

/// The custom op around a [`Block`].
pub(crate) struct BlockOp<B: Block> {
    block: B,
    saved: Stash<B::Saved>,
}

impl<B: Block> BlockOp<B> {
    /// `block` applied to `x` with the flat adapters `a` and `b`.
    pub fn apply(block: B, x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let op = BlockOp {
            block,
            saved: Stash::new(B::NAME),
        };
        x.contiguous()?.apply_op3(a, b, op)
    }
}

impl<B: Block> CustomOp3 for BlockOp<B> {
    fn name(&self) -> &'static str {
        B::NAME
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
        let (a_len, b_len) = (al.shape().elem_count(), bl.shape().elem_count());
        let rows = self.block.rows(xl.shape(), a_len, b_len)?;
        let (x, a, b) = (
            elements(xs, xl, B::NAME)?,
            elements(a_s, al, B::NAME)?,
            elements(bs, bl, B::NAME)?,
        );
        let (y, saved) = self.block.forward(rows, x, a, b)?;
        self.saved.put(saved)?;
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
        let rows = self.block.rows(x.shape(), a.elem_count(), b.elem_count())?;
        let (want_dx, want_params) = (x.track_op(), a.track_op() || b.track_op());
        let grads = self.saved.with(|saved| {
            let g = grad.contiguous()?;
            with_slice(&g, |g| {
                with_slice(x, |xv| {
                    with_slice(a, |av| {
                        with_slice(b, |bv| {
                            self.block
                                .backward(rows, saved, g, xv, (av, bv), want_dx, want_params)
                        })
                    })
                })
            })
        })?;
        grads.into_tensors([x, a, b])
    }
}

/// The f32 elements of a contiguous CPU argument.
fn elements<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{op}: expected contiguous arguments"),
    }
}

/// A block's gradients: the input's, and the flat A's and B's, each where asked for.
pub(crate) struct BlockGrads {
    pub dx: Option<Vec<f32>>,
    pub da: Option<Vec<f32>>,
    pub db: Option<Vec<f32>>,
}

impl BlockGrads {
    /// The gradients as tensors shaped as the op's three arguments `x`, `A`, `B`.
    pub fn into_tensors(
        self,
        [x, a, b]: [&Tensor; 3],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wrap = |v: Option<Vec<f32>>, like: &Tensor| {
            v.map(|v| Tensor::from_vec(v, like.shape(), like.device()))
                .transpose()
        };
        Ok((wrap(self.dx, x)?, wrap(self.da, a)?, wrap(self.db, b)?))
    }
}

/// What a block op's forward keeps for its backward (candle hands a custom op's backward only
/// its arguments and its result).
struct Stash<T> {
    op: &'static str,
    value: Mutex<Option<T>>,
}

impl<T> Stash<T> {
    /// An empty stash for the op named `op` (in errors).
    fn new(op: &'static str) -> Self {
        Self {
            op,
            value: Mutex::new(None),
        }
    }

    /// Keeps `value`, replacing what an earlier forward kept.
    fn put(&self, value: T) -> candle_core::Result<()> {
        *self.value.lock().map_err(|_| self.poisoned())? = Some(value);
        Ok(())
    }

    /// `f` of the kept value; an error when no forward kept one.
    fn with<R>(&self, f: impl FnOnce(&T) -> candle_core::Result<R>) -> candle_core::Result<R> {
        let guard = self.value.lock().map_err(|_| self.poisoned())?;
        match guard.as_ref() {
            Some(v) => f(v),
            None => candle_core::bail!("{}: backward before forward", self.op),
        }
    }

    fn poisoned(&self) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: poisoned state", self.op))
    }
}
