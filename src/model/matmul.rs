//! The one matrix product of the runtime, `x W^T`, so that its speed is tuned in one place.
//!
//! Large products go to candle's gemm. Products with few rows (decoding: one token per
//! sequence per step) cost more in gemm's packing and threading than in arithmetic (candle:
//! ~16 GFLOP/s for 1x576x1536, see CANDLE-NOTES.md):
//! - up to [`GEMV_MAX_ROWS`] rows, [`gemv`]: each weight row is read once, contiguously, and
//!   dotted with every input row (memory-bound at these row counts anyway);
//! - up to [`FEW_ROWS_MAX`] rows, the register-blocked tiles of [`super::tile`] (input rows as
//!   vector lanes, no horizontal sums), ~3x the FMA rate of one dot per output.
//!
//! Both split the output columns across a spinning worker pool ([`super::parallel`]).

use candle_core::{DType, Device, Tensor};

use super::parallel::Pool;

/// Row counts up to this use [`gemv`] (one dot per output).
pub const GEMV_MAX_ROWS: usize = 4;

/// Row counts above [`GEMV_MAX_ROWS`] and up to this use [`super::tile::few_rows`].
pub const FEW_ROWS_MAX: usize = 64;

/// `x: [n, in]`, `w: [out, in]` -> `[n, out]`.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = x.dims2()?;
    let fast = n <= FEW_ROWS_MAX
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op();
    if !fast {
        // Training: the base weight is frozen, so only x needs a gradient.
        if x.track_op() && !w.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
            return x
                .contiguous()?
                .apply_op1(super::frozen::FrozenLinear { w: w.clone() });
        }
        return x.matmul(&w.t()?);
    }
    let out = w.dim(0)?;
    let xs: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
    let y = {
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return x.matmul(&w.t()?);
        };
        let ws = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + out * k];
        if n <= GEMV_MAX_ROWS {
            gemv(&xs, ws, n, k, out)
        } else {
            let mut y = vec![0f32; n * out];
            super::tile::few_rows(&xs, ws, n, k, out, &mut y);
            y
        }
    };
    Tensor::from_vec(y, (n, out), x.device())
}

/// `y[i][j] = sum_k x[i][k] * w[j][k]` for `x: [n, k]`, `w: [out, k]`, row-major; returns
/// `[n, out]`. Blocks of output rows are spread over [`Pool::global`].
pub fn gemv(x: &[f32], w: &[f32], n: usize, k: usize, out: usize) -> Vec<f32> {
    // Blocks of ~64 KiB of weights: small enough to balance, big enough to stream.
    let rows = (16_384 / k.max(1)).clamp(4, 4096);
    let parts = out.div_ceil(rows);
    let mut y = vec![0f32; n * out];
    let yp = SyncPtr(y.as_mut_ptr());
    Pool::global().run(parts, &|p| {
        let y = &yp;
        for j in p * rows..((p + 1) * rows).min(out) {
            let wr = &w[j * k..(j + 1) * k];
            for i in 0..n {
                // SAFETY: each (i, j) is written by exactly one part, and `y` outlives `run`.
                unsafe { *y.0.add(i * out + j) = dot(&x[i * k..(i + 1) * k], wr) };
            }
        }
    });
    y
}

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes inside `Pool::run`, which returns after all of them.
unsafe impl Sync for SyncPtr {}

/// Dot product, with AVX2+FMA when the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Sixteen independent accumulators, so that the compiler vectorises without reassociating.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_matches_gemm() {
        let dev = Device::Cpu;
        for (n, k, out) in [
            (1, 576, 1536),
            (3, 37, 19),
            (8, 1536, 576),
            (2, 5, 3),
            (16, 576, 197),
            (33, 70, 41),
            (64, 576, 100),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev).unwrap();
            let fast = linear(&x, &w).unwrap();
            let slow = x.matmul(&w.t().unwrap()).unwrap();
            let d = (fast - slow)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // sums of k products of N(0,1): error ~ sqrt(k) * eps * |terms|
            assert!(d < 1e-3, "{n}x{k}x{out}: {d}");
        }
    }

    #[test]
    fn dot_by_hand() {
        // 1*4 + 2*5 + 3*6 = 32, with a tail past the 16-wide body.
        let a: Vec<f32> = (0..19)
            .map(|i| if i < 3 { (i + 1) as f32 } else { 0.0 })
            .collect();
        let b: Vec<f32> = (0..19)
            .map(|i| if i < 3 { (i + 4) as f32 } else { 1.0 })
            .collect();
        assert_eq!(dot(&a, &b), 32.0);
        assert_eq!(dot(&[2.0; 17], &[0.5; 17]), 17.0);
    }
}
