//! Batched matrix products `[.., m, k] x [.., k, n]` (attention's `Q Kᵀ` and `P V`) as an
//! autograd op on the CPU, each batch item one single-threaded `gemm` call on candle's barrier
//! pool ([`super::gemm`]).
//!
//! candle runs a batched matmul through `gemm` on rayon's pool, a second set of threads beside
//! the barrier pool that runs every other op: on two cores the two pools take turns and the
//! spinning one wastes its time slice. Here one pool does all of it, operands are read through
//! their strides (a transposed `K` is not copied), and the backward (`dA = G Bᵀ`, `dB = Aᵀ G`)
//! reads the same operands in place.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::gemm::{assume_init, kernel, run_parts, uninit, SyncPtr, Write};

/// The op: its arguments are `a: [.., m, k]` and `b: [.., k, n]` with equal leading dims.
pub struct BatchedMatmul;

/// One operand: its elements, the offset of each batch item and the strides of its matrices.
pub(crate) struct Operand<'a> {
    data: &'a [f32],
    items: Vec<usize>,
    rs: usize,
    cs: usize,
}

impl<'a> Operand<'a> {
    /// Batch items of `[.., rows, cols]`, with rows and columns swapped when `transposed`.
    pub(crate) fn new(
        s: &'a CpuStorage,
        l: &Layout,
        transposed: bool,
    ) -> candle_core::Result<Self> {
        let data = s.as_slice::<f32>()?;
        let (dims, stride) = (l.dims(), l.stride());
        let rank = dims.len();
        if rank < 2 {
            candle_core::bail!("batched-matmul: operands need two dims, got {dims:?}");
        }
        let mut items = vec![l.start_offset()];
        for (&d, &st) in dims[..rank - 2].iter().zip(&stride[..rank - 2]) {
            items = items
                .iter()
                .flat_map(|&o| (0..d).map(move |i| o + i * st))
                .collect();
        }
        let (rs, cs) = (stride[rank - 2], stride[rank - 1]);
        let (rs, cs) = if transposed { (cs, rs) } else { (rs, cs) };
        Ok(Self {
            data,
            items,
            rs,
            cs,
        })
    }

    /// `items` packed row-major `[rows, cols]` matrices in `data`, read as `[cols, rows]` when
    /// `transposed`.
    pub(crate) fn packed(
        data: &'a [f32],
        items: usize,
        (rows, cols): (usize, usize),
        transposed: bool,
    ) -> Self {
        let (rs, cs) = if transposed { (1, cols) } else { (cols, 1) };
        Self {
            data,
            items: (0..items).map(|i| i * rows * cols).collect(),
            rs,
            cs,
        }
    }

    /// Whether `[rows, cols]` from every item stays inside the buffer.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        let last = self.items.iter().max().copied().unwrap_or(0);
        rows == 0
            || cols == 0
            || last + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[i] = a[i] b[i]` for every batch item, `c` contiguous `[items, m, n]`. Parts are row
/// chunks of items, claimed from a shared counter.
pub(crate) fn product(
    (m, n, k): (usize, usize, usize),
    a: &Operand,
    b: &Operand,
) -> candle_core::Result<Vec<f32>> {
    let items = a.items.len();
    if b.items.len() != items || !a.covers(m, k) || !b.covers(k, n) {
        candle_core::bail!(
            "batched-matmul: operands of {items} and {} items do not fit [{m}, {k}] x [{k}, {n}]",
            b.items.len()
        );
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0f32; items * m * n]);
    }
    let mut c = uninit(items * m * n);
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    // at least 4 parts per thread, chunks of 32 rows or more
    let chunks = (4 * threads).div_ceil(items).min(m.div_ceil(32)).max(1);
    let rows = m.div_ceil(chunks);
    let chunks = m.div_ceil(rows);
    let out = SyncPtr(c.as_mut_ptr().cast());
    run_parts(items * chunks, &|t| {
        let (item, i0) = (t / chunks, (t % chunks) * rows);
        let mi = rows.min(m - i0);
        // SAFETY: `covers` checked both operands for every item; parts write disjoint rows
        // of `c`, which outlives the pool call.
        unsafe {
            kernel(
                (mi, n, k),
                a.data.as_ptr().add(a.items[item] + i0 * a.rs),
                (a.rs, a.cs),
                b.data.as_ptr().add(b.items[item]),
                (b.rs, b.cs),
                out.get().add((item * m + i0) * n),
                n,
                Write::Overwrite,
            )
        }
    });
    // SAFETY: the parts cover every row of every item, and k > 0: all elements are written.
    Ok(unsafe { assume_init(c) })
}

/// `(m, k, n)` of `a: [.., m, k] x b: [.., k, n]` with equal leading dims.
fn dims(a: &Shape, b: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (ad, bd) = (a.dims(), b.dims());
    match (ad, bd) {
        ([lead_a @ .., m, k], [lead_b @ .., kb, n]) if lead_a == lead_b && k == kb => {
            Ok((*m, *k, *n))
        }
        _ => candle_core::bail!("batched-matmul: cannot multiply {ad:?} by {bd:?}"),
    }
}

/// Calls `f` with the CPU storage and layout of `t`.
pub(crate) fn with_cpu<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c, l),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = dims(l1.shape(), l2.shape())?;
        let (a, b) = (Operand::new(s1, l1, false)?, Operand::new(s2, l2, false)?);
        let c = product((m, n, k), &a, &b)?;
        let mut out = l1.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(c), Shape::from(out)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(a, b, grad, [a.track_op(), b.track_op()])
    }
}

impl BatchedMatmul {
    /// The backward pass: `(dA, dB)` for the output gradient `grad`, each where `want` asks.
    pub(crate) fn grads(
        &self,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
        [want_a, want_b]: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k, n) = dims(a.shape(), b.shape())?;
        let g = grad.contiguous()?;
        with_cpu(&g, |gs, gl| {
            with_cpu(a, |as_, al| {
                with_cpu(b, |bs, bl| {
                    let dev = grad.device();
                    let gop = Operand::new(gs, gl, false)?;
                    let da = if want_a {
                        // dA = G Bᵀ: [m, n] x [n, k]
                        let bt = Operand::new(bs, bl, true)?;
                        let v = product((m, k, n), &gop, &bt)?;
                        Some(Tensor::from_vec(v, a.shape(), dev)?)
                    } else {
                        None
                    };
                    let db = if want_b {
                        // dB = Aᵀ G: [k, m] x [m, n]
                        let at = Operand::new(as_, al, true)?;
                        let v = product((k, n, m), &at, &gop)?;
                        Some(Tensor::from_vec(v, b.shape(), dev)?)
                    } else {
                        None
                    };
                    Ok((da, db))
                })
            })
        })
    }
}

/// `a.matmul(b)` for `a: [.., m, k]`, `b: [.., k, n]` with equal leading dims: through
/// [`BatchedMatmul`] for f32 CPU tensors, candle's matmul otherwise.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if cpu_f32(a) && cpu_f32(b) && a.rank() >= 3 && dims(a.shape(), b.shape()).is_ok() {
        a.apply_op2(b, BatchedMatmul)
    } else {
        a.matmul(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    /// Forward and both gradients equal candle's matmul, for a 4-D batch with `b` a transposed
    /// view (attention's `Q Kᵀ`) and with `b` contiguous (`P V`), on enough rows to split items.
    #[test]
    fn equals_candle_matmul_forward_and_backward() {
        let dev = Device::Cpu;
        for transposed in [true, false] {
            let a =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 70, 16), &dev).unwrap()).unwrap();
            let k =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 40, 16), &dev).unwrap()).unwrap();
            let b = if transposed {
                k.as_tensor().t().unwrap()
            } else {
                k.as_tensor().transpose(2, 3).unwrap().contiguous().unwrap()
            };
            let probe = Tensor::randn(0f32, 1.0, (2, 3, 70, 40), &dev).unwrap();
            let plain = a.as_tensor().matmul(&b).unwrap();
            let fast = batched_matmul(a.as_tensor(), &b).unwrap();
            assert_eq!(fast.dims(), &[2, 3, 70, 40]);
            assert!(max_abs_diff(&plain, &fast) < 1e-4);
            let g1 = (plain * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (fast * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&a, &k] {
                let (p, q) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_abs_diff(p, q) < 1e-3, "{transposed} {:?}", p.dims());
            }
        }
    }

    /// A hand-computed product per batch item.
    #[test]
    fn hand_computed_items() {
        let dev = Device::Cpu;
        // item 0: [[1, 2]] x [[3], [4]] = [[11]]; item 1: [[5, 6]] x [[7], [8]] = [[83]]
        let a = Tensor::new(&[[[1f32, 2.]], [[5., 6.]]], &dev).unwrap();
        let b = Tensor::new(&[[[3f32], [4.]], [[7.], [8.]]], &dev).unwrap();
        let c = batched_matmul(&a, &b).unwrap();
        assert_eq!(
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [11., 83.]
        );
        assert!(batched_matmul(&a, &a).is_err());
    }
}
