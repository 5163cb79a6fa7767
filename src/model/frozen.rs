//! `x W^T` for a frozen weight, as an autograd op whose backward returns only the input's
//! gradient `g W`.
//!
//! candle's matmul backward always computes both operands' gradients; for LoRA training that
//! is a full `[in, n] x [n, out]` product per base module per step, thrown away because the base
//! is frozen. This op saves a third of the linear layers' backward time.
//!
//! On the CPU both products run on [`super::gemm`] (both cores, one pool), reading `W` in place (as `W^T`
//! forward, as `W` backward) and the input and gradient where candle left them: no transposed
//! weight, no contiguous copy, no intermediate `Vec`.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use super::gemm::{self, MatRef};

/// The op: multiplies its `[n, in]` argument by `w^T`, `w: [out, in]`.
pub struct FrozenLinear {
    /// `[out, in]`, not trained.
    pub w: Tensor,
}

/// A CPU tensor with the data of `storage` (callers pass contiguous tensors to the ops).
pub(crate) fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Tensor::from_slice(&data[a..b], layout.shape(), &Device::Cpu),
        None => candle_core::bail!(
            "expected a contiguous input, got strides {:?}",
            layout.stride()
        ),
    }
}

/// The CPU storage of a freshly computed (contiguous, offset 0) tensor.
pub(crate) fn cpu_storage(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) if l.start_offset() == 0 => Ok((c.clone(), t.shape().clone())),
        _ => candle_core::bail!("expected a CPU tensor at offset 0"),
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = layout.shape().dims2()?;
        let (out, w_in) = self.w.dims2()?;
        if w_in != inp {
            candle_core::bail!("frozen-linear: input [{rows}, {inp}] for a weight [{out}, {w_in}]");
        }
        if self.w.dtype() == DType::F32 && self.w.is_contiguous() {
            if let Some((a, b)) = layout.contiguous_offsets() {
                let y = times_wt(&storage.as_slice::<f32>()?[a..b], rows, &self.w)?;
                return Ok((CpuStorage::F32(y), Shape::from((rows, out))));
            }
        }
        let x = cpu_tensor(storage, layout)?;
        cpu_storage(&x.matmul(&self.w.t()?)?)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if grad.device().is_cpu()
            && grad.dtype() == DType::F32
            && self.w.dtype() == DType::F32
            && self.w.is_contiguous()
        {
            let rows = grad.dim(0)?;
            let inp = self.w.dim(1)?;
            let dx = with_slice(&grad.contiguous()?, |g| times_w(g, rows, &self.w))?;
            return Ok(Some(Tensor::from_vec(dx, (rows, inp), grad.device())?));
        }
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x W^T` for `rows` rows `x: [rows, in]` (row-major) and `w: [out, in]` (f32, contiguous,
/// CPU), on [`super::gemm`], reading `W` in place: the forward product of [`FrozenLinear`].
pub(crate) fn times_wt(x: &[f32], rows: usize, w: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (out, inp) = w.dims2()?;
    with_slice(w, |w| {
        gemm::product(
            rows,
            out,
            inp,
            MatRef::row_major(x, inp),
            MatRef::transposed(w, inp),
            1.0,
        )
        .map_err(candle_core::Error::wrap)
    })
}

/// `g W` for `rows` rows `g: [rows, out]` (row-major) and `w: [out, in]` (f32, contiguous,
/// CPU): the input's gradient of [`times_wt`].
pub(crate) fn times_w(g: &[f32], rows: usize, w: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (out, inp) = w.dims2()?;
    with_slice(w, |w| {
        gemm::product(
            rows,
            inp,
            out,
            MatRef::row_major(g, out),
            MatRef::row_major(w, inp),
            1.0,
        )
        .map_err(candle_core::Error::wrap)
    })
}

/// Calls `f` with the f32 elements of a contiguous CPU tensor, in place.
pub(crate) fn with_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        candle_core::bail!("expected a CPU tensor");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => f(&c.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("expected a contiguous tensor, got strides {:?}", l.stride()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn forward_and_input_gradient_equal_the_plain_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let fast = x
            .as_tensor()
            .apply_op1(FrozenLinear { w: w.clone() })
            .unwrap();
        let d = (&plain - &fast)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
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
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
    }
}
