//! RMSNorm for inference on the CPU, `y = x / sqrt(mean(x²) + eps) · w` per row, with candle's
//! roundings (`rms_norm`: the squares summed in order, one division, then the weight), so the
//! same bits.
//!
//! candle sums each row's squares as one dependent chain of additions, a row at a time: the
//! adder's latency, not its throughput, sets the pace. Here eight rows are summed side by side
//! (each still in its own order) and the division pass runs in AVX-512 where the CPU has it, the
//! rows split across [`super::parallel::Pool::global`]. Training keeps
//! [`super::autograd::RmsNormOp`] (it has a backward).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// Rows summed side by side.
const ROWS: usize = 8;

/// The op on `x: [.., n]` with the weight `w: [n]` (f32, contiguous). Forward only.
pub struct RmsNormRows {
    /// `[n]`
    pub w: Tensor,
    /// Added to the mean square.
    pub eps: f32,
}

impl CustomOp1 for RmsNormRows {
    fn name(&self) -> &'static str {
        "rms-norm-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = layout.shape().dims().last().copied().unwrap_or(0);
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("rms-norm: the input must be contiguous");
        };
        let x = &storage.as_slice::<f32>()?[o1..o2];
        // the weight read in place
        let y = super::frozen::with_slice(&self.w.contiguous()?, |w| {
            if w.len() != n {
                candle_core::bail!("rms-norm: weight of {} for rows of {n}", w.len());
            }
            let rows = x.len().checked_div(n).unwrap_or(0);
            let mut y = vec![0f32; x.len()];
            if rows > 0 {
                let py = super::gemm::SyncPtr(y.as_mut_ptr());
                // ~16k elements per part, in whole blocks of ROWS
                let per = ((16_384 / n).max(1)).div_ceil(ROWS) * ROWS;
                super::parallel::run_beside_products(x.len(), rows.div_ceil(per), &|p| {
                    let (r0, r1) = (p * per, ((p + 1) * per).min(rows));
                    // SAFETY: part p alone writes rows r0..r1 of `y`.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(py.get().add(r0 * n), (r1 - r0) * n)
                    };
                    rms_rows(&x[r0 * n..r1 * n], w, n, self.eps, out);
                });
            }
            Ok(y)
        })?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

/// The rows of `x` (`n` wide) normalised into `out`.
fn rms_rows(x: &[f32], w: &[f32], n: usize, eps: f32, out: &mut [f32]) {
    for (xb, ob) in x.chunks(ROWS * n).zip(out.chunks_mut(ROWS * n)) {
        let rows = xb.len() / n;
        let mut sum = [0f32; ROWS];
        if rows == ROWS {
            // the ROWS chains interleaved, each in column order
            for k in 0..n {
                for (r, s) in sum.iter_mut().enumerate() {
                    let v = xb[r * n + k];
                    *s += v * v;
                }
            }
        } else {
            for (r, s) in sum.iter_mut().enumerate().take(rows) {
                for &v in &xb[r * n..(r + 1) * n] {
                    *s += v * v;
                }
            }
        }
        for r in 0..rows {
            let m = (sum[r] / n as f32 + eps).sqrt();
            scale_row(&xb[r * n..(r + 1) * n], m, w, &mut ob[r * n..(r + 1) * n]);
        }
    }
}

/// `out[i] = x[i] / m · w[i]`, in AVX-512 where the CPU has it (the same roundings either way).
fn scale_row(x: &[f32], m: f32, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { scale_row_avx512(x, m, w, out) };
        }
    }
    scale_row_portable(x, m, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_row_avx512(x: &[f32], m: f32, w: &[f32], out: &mut [f32]) {
    scale_row_portable(x, m, w, out)
}

#[inline(always)]
fn scale_row_portable(x: &[f32], m: f32, w: &[f32], out: &mut [f32]) {
    for ((o, &v), &a) in out.iter_mut().zip(x).zip(w) {
        *o = v / m * a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candles_rms_norm_to_the_bit() {
        let dev = Device::Cpu;
        // row counts below, at and past a block, and a partial last block; a wide odd row
        for (rows, n) in [(1usize, 5usize), (8, 16), (13, 576), (40, 33)] {
            let x = Tensor::randn(0f32, 2.0, (rows, n), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.5, n, &dev).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            let op = RmsNormRows {
                w: w.clone(),
                eps: 1e-5,
            };
            let got = x.apply_op1_no_bwd(&op).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "{rows} x {n}");
        }
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let op = RmsNormRows {
            w: Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
            eps: 1e-5,
        };
        let err = x.apply_op1_no_bwd(&op).unwrap_err().to_string();
        assert!(err.contains("weight of 3 for rows of 4"), "{err}");
    }
}
