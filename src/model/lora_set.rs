//! The projections of a block fused into one training op ([`super::fused_mlp`],
//! [`super::fused_attention`]): each projection's frozen weight and its one LoRA adapter
//! (`p(x) = x Wᵀ + s · (x Aᵀ) Bᵀ`, Hu et al. 2021, eq. 3), with the adapters' A's and B's
//! carried as two flat tensors (`[A_0, A_1, ..]`, `[B_0, B_1, ..]`, each flattened). candle's
//! custom ops take at most three tensors, so a block op takes its input and these two; the
//! concatenation's backward hands each adapter its slice of the gradient.

use std::ops::Range;

use candle_core::{DType, Tensor};

use super::frozen::with_slice;
use super::fused_lora::{backward_parts, forward_parts, LoraGrads, LoraShape};
use super::linear::Linear;
use crate::adapters::LoraModule;

/// One projection: frozen `[out, in]` weight (f32, contiguous), input and output widths, rank,
/// scale, and where its A and B lie in the flat arguments.
struct Projection {
    w: Tensor,
    inp: usize,
    out: usize,
    r: usize,
    scale: f32,
    a: Range<usize>,
    b: Range<usize>,
}

/// The `N` projections of a block.
pub(crate) struct LoraSet<const N: usize> {
    proj: [Projection; N],
}

impl<const N: usize> LoraSet<N> {
    /// The set and the projections' adapters when every projection carries exactly one f32
    /// adapter on the CPU and no bias, no weight is trained, and `x` or an adapter is; `None`
    /// otherwise (the caller's composed path). 16-bit frozen weights are widened here.
    pub fn for_training<'a>(
        x: &Tensor,
        linears: [&'a Linear; N],
    ) -> candle_core::Result<Option<(Self, [&'a LoraModule; N])>> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !cpu_f32(x) {
            return Ok(None);
        }
        let mut mods: Vec<&LoraModule> = Vec::with_capacity(N);
        for l in linears {
            match (l.loras.as_slice(), &l.bias) {
                ([m], None) if cpu_f32(&m.a) && cpu_f32(&m.b) && !l.weight.track_op() => {
                    mods.push(m)
                }
                _ => return Ok(None),
            }
        }
        if !(x.track_op() || mods.iter().any(|m| m.a.track_op() || m.b.track_op())) {
            return Ok(None);
        }
        let (mut a_end, mut b_end) = (0, 0);
        let mut proj = Vec::with_capacity(N);
        for (l, m) in linears.iter().zip(&mods) {
            let w = l.weight_for_training()?;
            let ((out, inp), r) = (l.shape(), m.rank());
            if w.dtype() != DType::F32 || m.a.dims() != [r, inp] || m.b.dims() != [out, r] {
                return Ok(None);
            }
            let (a, b) = (a_end..a_end + r * inp, b_end..b_end + out * r);
            (a_end, b_end) = (a.end, b.end);
            proj.push(Projection {
                w: w.contiguous()?,
                inp,
                out,
                r,
                scale: m.scale as f32,
                a,
                b,
            });
        }
        match (
            <[Projection; N]>::try_from(proj),
            <[&LoraModule; N]>::try_from(mods),
        ) {
            (Ok(proj), Ok(mods)) => Ok(Some((Self { proj }, mods))),
            _ => Ok(None),
        }
    }

    /// `(in, out)` of projection `i`.
    pub fn io(&self, i: usize) -> (usize, usize) {
        (self.proj[i].inp, self.proj[i].out)
    }

    /// The lengths of the flat A's and B's.
    pub fn flat_lens(&self) -> (usize, usize) {
        self.proj.last().map_or((0, 0), |p| (p.a.end, p.b.end))
    }

    /// Checks the flat arguments' lengths and returns `n`, the rows of an input whose last
    /// dimension is projection `first`'s input width.
    pub fn rows(
        &self,
        x: &[usize],
        a: usize,
        b: usize,
        first: usize,
    ) -> candle_core::Result<usize> {
        let Some((&w, lead)) = x.split_last() else {
            candle_core::bail!("fused block: the input must have at least one dim");
        };
        let (a_len, b_len) = self.flat_lens();
        if w != self.proj[first].inp || a != a_len || b != b_len {
            candle_core::bail!(
                "fused block: input [.., {w}], {a} A values and {b} B values do not fit [.., {}], \
                 {a_len} and {b_len}",
                self.proj[first].inp
            );
        }
        Ok(lead.iter().product())
    }

    fn shape(&self, i: usize, n: usize) -> LoraShape {
        let p = &self.proj[i];
        LoraShape {
            n,
            inp: p.inp,
            r: p.r,
            out: p.out,
            scale: p.scale,
        }
    }

    /// Projection `i` of `n` input rows: `(y, x Aᵀ)`.
    pub fn forward(
        &self,
        i: usize,
        n: usize,
        x: &[f32],
        a: &[f32],
        b: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        with_slice(&self.proj[i].w, |w| {
            forward_parts(
                self.shape(i, n),
                x,
                w,
                &a[self.proj[i].a.clone()],
                &b[self.proj[i].b.clone()],
            )
        })
    }

    /// Projection `i`'s gradients for the output gradient `g`, given its input `x` and the
    /// forward's `h = x Aᵀ`: the input's when `want_dx`, A's and B's when `want_params`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        i: usize,
        n: usize,
        g: &[f32],
        x: &[f32],
        (a, b): (&[f32], &[f32]),
        h: &[f32],
        want_dx: bool,
        want_params: bool,
    ) -> candle_core::Result<LoraGrads> {
        with_slice(&self.proj[i].w, |w| {
            backward_parts(
                self.shape(i, n),
                g,
                x,
                w,
                &a[self.proj[i].a.clone()],
                &b[self.proj[i].b.clone()],
                Some(h),
                [want_dx, want_params, want_params],
            )
        })
    }

    /// The flat `(dA, dB)` from each projection's gradients (in projection order), when every
    /// one has them.
    pub fn flat_grads(grads: [LoraGrads; N]) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let (mut da, mut db) = (Some(Vec::new()), Some(Vec::new()));
        for g in grads {
            match (&mut da, g.da) {
                (Some(v), Some(part)) => v.extend(part),
                _ => da = None,
            }
            match (&mut db, g.db) {
                (Some(v), Some(part)) => v.extend(part),
                _ => db = None,
            }
        }
        (da, db)
    }
}

/// The adapters' A's and B's, each flattened, concatenated in order: a block op's second and
/// third arguments.
pub(crate) fn flat_adapters(mods: &[&LoraModule]) -> candle_core::Result<(Tensor, Tensor)> {
    let flat = |f: fn(&LoraModule) -> &Tensor| -> candle_core::Result<Tensor> {
        let parts = mods
            .iter()
            .map(|m| f(m).flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };
    Ok((flat(|m| &m.a)?, flat(|m| &m.b)?))
}

/// `a += b`, elementwise, on both cores for large buffers (a tensor's gradients from several
/// consumers, added in the order candle's backward pass adds them).
pub(crate) fn add_in_place(a: &mut [f32], b: &[f32]) {
    const PART: usize = 1 << 14;
    let len = a.len().min(b.len());
    let pa = super::gemm::SyncPtr(a.as_mut_ptr());
    super::parallel::run_beside_products(len, len.div_ceil(PART), &|c| {
        let o = c * PART;
        let n = PART.min(len - o);
        // SAFETY: part c owns elements o..o+n of `a`, which outlives the call.
        let out = unsafe { std::slice::from_raw_parts_mut(pa.get().add(o), n) };
        for (v, &w) in out.iter_mut().zip(&b[o..o + n]) {
            *v += w;
        }
    });
}
