//! Fused training-path ops: candle's fast inference kernels for the forward pass, with the
//! backward pass written out, so that training does not pay for the dozen elementwise passes
//! of the composed versions (RMSNorm, rotary embedding, the attention softmax and SwiGLU are ~25% of a LoRA step
//! otherwise). CPU only; other devices use the composed ops.

use super::frozen::with_slice;
use super::gemm::run_parts;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};

/// RMSNorm with a frozen weight: `y = x * r * w`, `r = 1 / sqrt(mean(x^2) + eps)`.
/// Backward: `dx = r (g w) - x r^3 mean(g w x)`.
pub struct RmsNormOp {
    /// `[hidden]`
    pub w: Tensor,
    /// Added to the mean square.
    pub eps: f32,
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let n = l.dims().last().copied().unwrap_or(0);
        let y = with_slice(&self.w.contiguous()?, |w| {
            if w.len() != n {
                candle_core::bail!("rms-norm: weight of {} for rows of {n}", w.len());
            }
            rms_norm_rows(x, w, self.eps)
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, g, w) = (x.contiguous()?, g.contiguous()?, self.w.contiguous()?);
        if w.elem_count() != x.dim(D::Minus1)? {
            candle_core::bail!("rms-norm: weight {:?} for x {:?}", w.dims(), x.dims());
        }
        let dx = with_slice(&x, |xs| {
            with_slice(&g, |gs| {
                with_slice(&w, |w| rms_norm_grad(xs, gs, w, self.eps))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// [`RmsNormOp`]'s forward on slices: each `w.len()`-long row of `x` normalised and scaled.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> candle_core::Result<Vec<f32>> {
    let n = w.len();
    if n == 0 || x.len() % n != 0 {
        candle_core::bail!("rms-norm: weight of {n} for {} values", x.len());
    }
    Ok(rows_written(x.len(), n, |row, out| {
        let xr = &x[row * n..(row + 1) * n];
        let r = inv_rms(xr, eps);
        for ((o, &xv), &wv) in out.iter_mut().zip(xr).zip(w) {
            *o = xv * r * wv;
        }
    }))
}

/// [`RmsNormOp`]'s backward on slices: the input's gradient for the output gradient `g`.
pub(crate) fn rms_norm_grad(
    xs: &[f32],
    gs: &[f32],
    w: &[f32],
    eps: f32,
) -> candle_core::Result<Vec<f32>> {
    let n = w.len();
    if n == 0 || xs.len() % n != 0 || gs.len() != xs.len() {
        candle_core::bail!(
            "rms-norm: weight of {n}, gradient of {} for {} values",
            gs.len(),
            xs.len()
        );
    }
    Ok(rows_written(xs.len(), n, |row, out| {
        let (xr, gr) = (&xs[row * n..(row + 1) * n], &gs[row * n..(row + 1) * n]);
        let r = inv_rms(xr, eps);
        let m = gr
            .iter()
            .zip(w)
            .zip(xr)
            .map(|((&gv, &wv), &xv)| gv * wv * xv)
            .sum::<f32>()
            / n as f32;
        let c = r * r * r * m;
        for (((o, &gv), &wv), &xv) in out.iter_mut().zip(gr).zip(w).zip(xr) {
            *o = r * (gv * wv) - xv * c;
        }
    }))
}

/// `1 / sqrt(mean(x^2) + eps)`.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|&v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// Calls `f(row, out_row)` for every `width`-long row of `out`, in blocks of rows spread over
/// the training pool ([`run_parts`]).
fn rows_in_parallel(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    // ~16k elements per part
    let per = (16_384 / width.max(1)).max(1);
    let ptr = SyncPtr(out.as_mut_ptr());
    run_parts(rows.div_ceil(per), &|p| {
        for row in p * per..((p + 1) * per).min(rows) {
            // SAFETY: each row is written by the one part that owns it; `out` outlives the call.
            let o = unsafe { ptr.slice(row * width, width) };
            f(row, o);
        }
    });
}

/// A new buffer of `len` elements whose `width`-long rows `f(row, out_row)` fill in parallel,
/// with no zeroing pass first: `f` must write every element of its row. (A zeroed buffer is
/// returned when `len` is not a whole number of rows, so no element is left unwritten.)
fn rows_written(len: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if width == 0 || len % width != 0 {
        let mut y = vec![0f32; len];
        rows_in_parallel(&mut y, width, f);
        return y;
    }
    let mut y = super::gemm::uninit(len);
    // SAFETY: f32 has no invalid bit patterns, and `rows_in_parallel` hands every row (the
    // rows cover the buffer) to `f`, which writes all of it before anything reads it.
    unsafe {
        let out = std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<f32>(), len);
        rows_in_parallel(out, width, f);
        super::gemm::assume_init(y)
    }
}

/// Disjoint writes into one buffer from parallel parts.
struct SyncPtr(*mut f32);
// SAFETY: parts write disjoint ranges, and the buffer outlives `run_parts`.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    /// `len` elements from `start`.
    ///
    /// # Safety
    /// No other part touches the range while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Rotary embedding (half-split) with fixed angles. Backward: the inverse rotation,
/// `rope(g, cos, -sin)`.
pub struct RopeOp {
    /// `[b, s, head_dim / 2]`
    pub cos: Tensor,
    /// `[b, s, head_dim / 2]`
    pub sin: Tensor,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = rope(slice(s, l)?, l.shape(), &self.cos, &self.sin, false)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let dx = with_slice(&g, |gs| rope(gs, g.shape(), &self.cos, &self.sin, true))?;
        Ok(Some(Tensor::from_vec(dx, g.shape(), g.device())?))
    }
}

/// The half-split rotation of `x: [b, h, t, d]` by per-batch angles `cos, sin: [b, t, d / 2]`
/// (candle's `rope`, with the same arithmetic), or its inverse (`sin` negated) with `inverse`.
fn rope(
    x: &[f32],
    shape: &Shape,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> candle_core::Result<Vec<f32>> {
    rope_from(x, shape, false, cos, sin, inverse)
}

/// [`rope`] with the result `[b, h, t, d]` read from `x` laid out as `[b, h, t, d]`, or, with
/// `split`, as a projection's output `[b, t, h · d]` (the heads split in the same pass).
pub(crate) fn rope_from(
    x: &[f32],
    shape: &Shape,
    split: bool,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> candle_core::Result<Vec<f32>> {
    let (b, h, t, d) = shape.dims4()?;
    // where head `bh`'s first row starts in `x`, and the step from one row to the next
    let start = |bh: usize| {
        if split {
            (bh / h) * t * h * d + (bh % h) * d
        } else {
            bh * t * d
        }
    };
    let step = if split { h * d } else { d };
    let half = d / 2;
    // angles per batch row `[b, t, d / 2]`, or shared `[t, d / 2]`
    let batched = match cos.dims() {
        [cb, ct, ch] if (*cb, *ct, *ch) == (b, t, half) => true,
        [ct, ch] if (*ct, *ch) == (t, half) => false,
        other => candle_core::bail!("rope: x {shape:?} with angles {other:?}"),
    };
    if sin.dims() != cos.dims() || x.len() != b * h * t * d {
        candle_core::bail!(
            "rope: x {shape:?}, cos {:?}, sin {:?}",
            cos.dims(),
            sin.dims()
        );
    }
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    with_slice(&cos, |cos| {
        with_slice(&sin, |sin| {
            if d % 2 != 0 {
                candle_core::bail!("rope: odd head width {d}");
            }
            let y = rows_written(x.len(), t * d, |bh, dst| {
                let cs0 = if batched { (bh / h) * t * half } else { 0 };
                let (x0, x_step) = (start(bh), step);
                for it in 0..t {
                    let src = &x[x0 + it * x_step..x0 + it * x_step + d];
                    let dst = &mut dst[it * d..(it + 1) * d];
                    let (c, s) = (
                        &cos[cs0 + it * half..cs0 + (it + 1) * half],
                        &sin[cs0 + it * half..cs0 + (it + 1) * half],
                    );
                    for id in 0..half {
                        let (i1, i2) = (id, id + half);
                        let (c, s) = (c[id], if inverse { -s[id] } else { s[id] });
                        dst[i1] = src[i1] * c - src[i2] * s;
                        dst[i2] = src[i1] * s + src[i2] * c;
                    }
                }
            });
            Ok(y)
        })
    })
}

/// The contiguous f32 slice of a CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("expected a contiguous input, got strides {:?}", l.stride()),
    }
}

/// Between a projection's `[b, s, h * d]` output and attention's `[b, h, s, d]` heads, in one
/// copy: `Split` is `reshape(b, s, h, d).transpose(1, 2).contiguous()`, `Merge` its inverse
/// (the attention output back to `[b, s, h * d]`). Backward: the other direction. One graph
/// node instead of three, so one gradient buffer instead of three.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HeadsOp {
    /// `[b, s, h * d] -> [b, h, s, d]`, with the head count and width.
    Split {
        /// `h`
        heads: usize,
        /// `d`
        head_dim: usize,
    },
    /// `[b, h, s, d] -> [b, s, h * d]`; the input may also be `[b, kv_heads, groups * s, d]`
    /// (the same memory order), so it carries the head count.
    Merge {
        /// `h`
        heads: usize,
    },
}

/// Moves `d`-long rows of `x` between the `[b, s, h, d]` and `[b, h, s, d]` orders.
fn permute_heads(
    x: &[f32],
    (b, s, h, d): (usize, usize, usize, usize),
    to_heads: bool,
) -> Vec<f32> {
    rows_written(b * s * h * d, d, |row, out| {
        // `row` indexes the output; find the same (bi, si, hi) in the input
        let src = if to_heads {
            let (bi, hi, si) = (row / (h * s), (row / s) % h, row % s);
            ((bi * s + si) * h + hi) * d
        } else {
            let (bi, si, hi) = (row / (s * h), (row / h) % s, row % h);
            ((bi * h + hi) * s + si) * d
        };
        out.copy_from_slice(&x[src..src + d]);
    })
}

impl HeadsOp {
    /// `(b, s, h, d)` of the `[b, s, h * d]` side and the `[b, h, s, d]` shape, from the input.
    fn dims(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        match *self {
            HeadsOp::Split { heads, head_dim } => {
                let (b, s, w) = shape.dims3()?;
                if w != heads * head_dim {
                    candle_core::bail!("heads: rows of {w} for {heads} heads of {head_dim}");
                }
                Ok((b, s, heads, head_dim))
            }
            HeadsOp::Merge { heads } => {
                let (b, x, y, d) = shape.dims4()?;
                if heads == 0 || (x * y) % heads != 0 {
                    candle_core::bail!("heads: [{b}, {x}, {y}, {d}] is not {heads} heads");
                }
                Ok((b, x * y / heads, heads, d))
            }
        }
    }
}

impl CustomOp1 for HeadsOp {
    fn name(&self) -> &'static str {
        "heads"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims @ (b, s, h, d) = self.dims(l.shape())?;
        let split = matches!(self, HeadsOp::Split { .. });
        let y = permute_heads(slice(st, l)?, dims, split);
        let shape = if split {
            Shape::from((b, h, s, d))
        } else {
            Shape::from((b, s, h * d))
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = self.dims(x.shape())?;
        let split = matches!(self, HeadsOp::Split { .. });
        let g = g.contiguous()?;
        let dx = with_slice(&g, |gs| Ok(permute_heads(gs, dims, !split)))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Attention probabilities `softmax(x * scale + mask)` over the last dimension, in one pass
/// per row. `mask` is an additive `[b, 1, s, t]` mask broadcast over the heads of
/// `x: [b, h, s, t]` (or of `[b, kv_heads, groups * s, t]`, the same rows stacked per KV head). Backward: `dx = scale * y (g - sum(g y))` (the mask is constant).
pub struct MaskedSoftmaxOp {
    /// Multiplies the scores (1 / sqrt(head_dim)).
    pub scale: f32,
    /// `[b, 1, s, t]`, contiguous, or none.
    pub mask: Option<Tensor>,
}

impl CustomOp1 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "masked-softmax-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = masked_softmax(
            slice(s, l)?.to_vec(),
            l.shape().dims4()?,
            self.scale,
            self.mask.as_ref(),
        )?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let t = y.dim(D::Minus1)?;
        let (y, g) = (y.contiguous()?, g.contiguous()?);
        let dx = with_slice(&y, |ys| {
            with_slice(&g, |gs| Ok(softmax_backward(ys, gs, t, self.scale)))
        })?;
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// `softmax(x * scale + mask)` over each `t`-long row of `x: [b, h, q, t]`, in place (the rows
/// of `x` become the probabilities). `mask`: additive, `[b, 1, s, t]`, with `q` a multiple of
/// `s` (query heads stacked per KV head); the mask row of a query is its row index mod `s`.
pub(crate) fn masked_softmax(
    mut x: Vec<f32>,
    (_b, h, q, t): (usize, usize, usize, usize),
    scale: f32,
    mask: Option<&Tensor>,
) -> candle_core::Result<Vec<f32>> {
    let s = match mask {
        Some(m) => m.dim(2)?,
        None => q,
    };
    if s == 0 || q % s != 0 || x.len() % (h * q * t).max(1) != 0 {
        candle_core::bail!("masked-softmax: {q} query rows of {t} for a mask of {s} rows");
    }
    // the mask read in place (it is the same tensor for every layer of a step: no copy)
    match mask {
        Some(m) => with_slice(&m.contiguous()?, |ms| {
            masked_softmax_rows(&mut x, h, q, s, t, scale, Some(ms));
            Ok(())
        })?,
        None => masked_softmax_rows(&mut x, h, q, s, t, scale, None),
    }
    Ok(x)
}

/// The rows of [`masked_softmax`], with its mask as a slice.
fn masked_softmax_rows(
    x: &mut [f32],
    h: usize,
    q: usize,
    s: usize,
    t: usize,
    scale: f32,
    mask: Option<&[f32]>,
) {
    rows_in_parallel(x, t, |row, out| {
        let (bi, qi) = (row / (h * q), row % s);
        let mr = mask.map(|m| &m[(bi * s + qi) * t..(bi * s + qi + 1) * t]);
        let mut max = f32::NEG_INFINITY;
        for (j, o) in out.iter_mut().enumerate() {
            *o = *o * scale + mr.map_or(0.0, |m| m[j]);
            max = max.max(*o);
        }
        out.iter_mut().for_each(|o| *o -= max);
        super::expf::exp_in_place(out);
        // (summed in order, as before the exponentials were vectorised)
        let mut z = 0.0;
        for o in out.iter() {
            z += *o;
        }
        out.iter_mut().for_each(|o| *o /= z);
    });
}

/// The softmax's backward for probabilities `y` and their gradient `g` (rows of `t`):
/// `dx = scale * y (g - sum(g y))`.
pub(crate) fn softmax_backward(y: &[f32], g: &[f32], t: usize, scale: f32) -> Vec<f32> {
    let dx = rows_written(y.len(), t, |row, out| {
        let (yr, gr) = (&y[row * t..(row + 1) * t], &g[row * t..(row + 1) * t]);
        let dot: f32 = yr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
        for ((o, &yv), &gv) in out.iter_mut().zip(yr).zip(gr) {
            *o = yv * (gv - dot) * scale;
        }
    });
    dx
}

/// SwiGLU's gate for inference, `silu(gate) * up` with candle's rounding
/// (`g / (1 + exp(-g))`, then the product; `exp` in vectors, to the bit:
/// [`super::expf::silu_mul`]), in one pass split across the threads of the products around it
/// ([`super::parallel::run_beside_products`]): the two candle ops it replaces ran on one thread
/// and wrote a tensor between them. No backward (the training path takes [`SwiGluOp`]).
pub struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(s1, l1)?, slice(s2, l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let len = gate.len();
        let mut y = super::gemm::uninit(len);
        let py = SyncPtr(y.as_mut_ptr().cast());
        const PART: usize = 4096;
        super::parallel::run_beside_products(len, len.div_ceil(PART), &|c| {
            let o = c * PART;
            let n = PART.min(len - o);
            // SAFETY: part c owns elements o..o+n of the output.
            let out = unsafe { py.slice(o, n) };
            super::expf::silu_mul(&gate[o..o + n], &up[o..o + n], out);
        });
        // SAFETY: the parts cover 0..len, and `silu_mul` wrote every element of each.
        let y = unsafe { super::gemm::assume_init(y) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// SwiGLU's gate: `silu(gate) * up`, one pass forward and one backward:
/// `d_gate = g up silu'(gate)`, `d_up = g silu(gate)`, with
/// `silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))`.
pub struct SwiGluOp;

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "swiglu-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(s1, l1)?, slice(s2, l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let y = swiglu(gate, up);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gate, up, g) = (gate.contiguous()?, up.contiguous()?, g.contiguous()?);
        let (dg, du) = with_slice(&gate, |gv| {
            with_slice(&up, |uv| with_slice(&g, |dv| Ok(swiglu_grad(gv, uv, dv))))
        })?;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}

/// `silu(gate) * up`, elementwise, on both cores (the forward of [`SwiGluOp`]).
pub(crate) fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let len = gate.len().min(up.len());
    let mut y = super::gemm::uninit(len);
    let py = SyncPtr(y.as_mut_ptr().cast());
    const PART: usize = 4096;
    run_parts(len.div_ceil(PART), &|c| {
        let o = c * PART;
        // SAFETY: part c owns elements o..o+PART of the output.
        let out = unsafe { py.slice(o, PART.min(len - o)) };
        super::expf::sigmoid(&gate[o..o + out.len()], out);
        for (i, v) in out.iter_mut().enumerate() {
            let x = gate[o + i];
            *v = x * *v * up[o + i];
        }
    });
    // SAFETY: the parts cover 0..len, and each wrote every element of its range.
    unsafe { super::gemm::assume_init(y) }
}

/// The gradients `(d_gate, d_up)` of [`swiglu`] for the output gradient `g` (the backward of
/// [`SwiGluOp`]).
pub(crate) fn swiglu_grad(gv: &[f32], uv: &[f32], dv: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let len = gv.len().min(uv.len()).min(dv.len());
    let (mut dg, mut du) = (super::gemm::uninit(len), super::gemm::uninit(len));
    let (pg, pu) = (
        SyncPtr(dg.as_mut_ptr().cast()),
        SyncPtr(du.as_mut_ptr().cast()),
    );
    const PART: usize = 4096;
    run_parts(len.div_ceil(PART), &|c| {
        let o = c * PART;
        let n = PART.min(len - o);
        // SAFETY: part c owns elements o..o+n of both outputs.
        let (dgc, duc) = unsafe { (pg.slice(o, n), pu.slice(o, n)) };
        // the sigmoids first, into `dgc`, which each step reads before writing
        super::expf::sigmoid(&gv[o..o + n], dgc);
        for i in 0..n {
            let x = gv[o + i];
            let sg = dgc[i];
            duc[i] = dv[o + i] * x * sg;
            dgc[i] = dv[o + i] * uv[o + i] * sg * (1.0 + x * (1.0 - sg));
        }
    });
    // SAFETY: the parts cover 0..len, and each wrote every element of its range of both.
    unsafe { (super::gemm::assume_init(dg), super::gemm::assume_init(du)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    /// Forward values and input gradients of `fused` and `composed` agree on random data.
    fn check(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Tensor,
        composed: impl Fn(&Tensor) -> Tensor,
    ) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (a, b) = (fused(x.as_tensor()), composed(x.as_tensor()));
        assert!(
            max_abs_diff(&a, &b) < 1e-5,
            "forward {}",
            max_abs_diff(&a, &b)
        );
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-4, "backward {d}");
    }

    #[test]
    fn rms_norm_matches_the_composition() {
        let w = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
        check(
            &[3, 5, 8],
            |x| {
                x.apply_op1(RmsNormOp {
                    w: w.clone(),
                    eps: 1e-5,
                })
                .unwrap()
            },
            |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap(),
        );
    }

    #[test]
    fn rope_matches_the_composition() {
        let dev = Device::Cpu;
        let cos = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev).unwrap();
        check(
            &[2, 3, 5, 8],
            |x| {
                x.apply_op1(RopeOp {
                    cos: cos.clone(),
                    sin: sin.clone(),
                })
                .unwrap()
            },
            |x| super::super::rope::Rope::apply_composed(x, &cos, &sin).unwrap(),
        );
    }

    #[test]
    fn masked_softmax_matches_the_composition() {
        let dev = Device::Cpu;
        let mask = Tensor::randn(0f32, 1.0, (2, 1, 4, 7), &dev).unwrap();
        check(
            &[2, 3, 4, 7],
            |x| {
                x.apply_op1(MaskedSoftmaxOp {
                    scale: 0.25,
                    mask: Some(mask.clone()),
                })
                .unwrap()
            },
            |x| {
                candle_nn::ops::softmax(
                    &(x * 0.25).unwrap().broadcast_add(&mask).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
        );
        check(
            &[2, 3, 4, 7],
            |x| {
                x.apply_op1(MaskedSoftmaxOp {
                    scale: 1.0,
                    mask: None,
                })
                .unwrap()
            },
            |x| candle_nn::ops::softmax(x, D::Minus1).unwrap(),
        );
    }

    /// The softmax on query heads stacked per KV head (`[b, kv, groups * s, t]`) equals the
    /// softmax on `[b, h, s, t]`: same rows, same mask row per query.
    #[test]
    fn masked_softmax_on_stacked_query_heads() {
        let dev = Device::Cpu;
        let mask = Tensor::randn(0f32, 1.0, (2, 1, 4, 7), &dev).unwrap();
        // b 2, h 6 = kv 2 x groups 3, s 4, t 7
        check(
            &[2, 6, 4, 7],
            |x| {
                x.reshape((2, 2, 12, 7))
                    .unwrap()
                    .apply_op1(MaskedSoftmaxOp {
                        scale: 0.5,
                        mask: Some(mask.clone()),
                    })
                    .unwrap()
                    .reshape((2, 6, 4, 7))
                    .unwrap()
            },
            |x| {
                candle_nn::ops::softmax(
                    &(x * 0.5).unwrap().broadcast_add(&mask).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
        );
    }

    /// Split equals `reshape + transpose`, merge is its inverse (also from the stacked
    /// `[b, kv, groups * s, d]` shape), and both pass gradients back in the input's order.
    #[test]
    fn heads_split_and_merge_match_reshape_and_transpose() {
        let split = HeadsOp::Split {
            heads: 6,
            head_dim: 4,
        };
        // [b 2, s 5, h 6 * d 4] -> [2, 6, 5, 4] and back
        check(
            &[2, 5, 24],
            |x| {
                x.apply_op1(split)
                    .unwrap()
                    .apply_op1(HeadsOp::Merge { heads: 6 })
                    .unwrap()
            },
            |x| x.clone(),
        );
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap()).unwrap();
        let fast = x.as_tensor().apply_op1(split).unwrap();
        let plain = x
            .as_tensor()
            .reshape((2, 5, 6, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(max_abs_diff(&fast, &plain), 0.0);
        let probe = Tensor::randn(0f32, 1.0, (2, 6, 5, 4), &dev).unwrap();
        let g = (fast * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = probe.transpose(1, 2).unwrap().reshape((2, 5, 24)).unwrap();
        assert_eq!(max_abs_diff(g.get(x.as_tensor()).unwrap(), &want), 0.0);
        // merge from the stacked shape: [2, kv 2, 3 * 5, 4] is [2, 6, 5, 4] in memory
        let stacked = plain.reshape((2, 2, 15, 4)).unwrap();
        let merged = stacked.apply_op1(HeadsOp::Merge { heads: 6 }).unwrap();
        assert_eq!(max_abs_diff(&merged, x.as_tensor()), 0.0);
        assert!(stacked.apply_op1(HeadsOp::Merge { heads: 7 }).is_err());
    }

    #[test]
    fn swiglu_matches_the_composition_in_both_inputs() {
        let dev = Device::Cpu;
        let up = Tensor::randn(0f32, 1.0, (3, 5, 9), &dev).unwrap();
        check(
            &[3, 5, 9],
            |g| g.apply_op2(&up, SwiGluOp).unwrap(),
            |g| (candle_nn::ops::silu(g).unwrap() * &up).unwrap(),
        );
        let gate = Tensor::randn(0f32, 1.0, (3, 5, 9), &dev).unwrap();
        check(
            &[3, 5, 9],
            |u| gate.apply_op2(u, SwiGluOp).unwrap(),
            |u| (candle_nn::ops::silu(&gate).unwrap() * u).unwrap(),
        );
    }
}
