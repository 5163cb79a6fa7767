//! The one matrix product of the runtime, `x W^T`, so that its speed is tuned in one place.
//!
//! Large products go to candle's gemm. Products with few rows (decoding: one token per
//! sequence per step) cost more in gemm's packing and threading than in arithmetic (candle:
//! ~16 GFLOP/s for 1x576x1536, see CANDLE-NOTES.md):
//! - up to [`GEMV_MAX_ROWS`] rows, [`gemv`] ([`super::gemv`]): each weight row is read once,
//!   contiguously, with a prefetch running ahead, and dotted with every input row in one pass
//!   (memory-bound at one row: the speed is the bandwidth it reaches; at 2-6 rows it beats the
//!   tiles, whose cost per step hardly depends on the row count below eight);
//! - up to [`FEW_ROWS_MAX`] rows, the register-blocked tiles of [`super::tile`] (input rows as
//!   vector lanes, no horizontal sums), ~3x the FMA rate of one dot per output.
//!
//! Both split the output columns across a spinning worker pool ([`super::parallel`]).

use candle_core::{DType, Device, Tensor};

use super::gemv::Widen;
pub use super::gemv::{dot, dot_bf16, gemv, gemv_of};

/// Row counts up to this use [`gemv`] (one dot per output, up to six input rows per pass over a
/// weight row). Measured per decode step of SmolLM2-135M (f32, Zen 1, `examples/decode_profile.rs`):
/// 5 rows 35 ms and 6 rows 41 ms this way against 50 and 51 ms in the tiles; at 7 rows both
/// take 51 ms, at 8 the tiles win (52 against 55).
pub const GEMV_MAX_ROWS: usize = 6;

/// Row counts above [`GEMV_MAX_ROWS`] and up to this use [`super::tile::few_rows`].
pub const FEW_ROWS_MAX: usize = 64;

/// `x: [n, in]`, `w: [out, in]` -> `[n, out]`, for `w` in f32, bf16 or f16 (always computed
/// in f32: see [`super::storage`]).
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = x.dims2()?;
    let narrow = matches!(w.dtype(), DType::BF16 | DType::F16);
    let fast = n <= FEW_ROWS_MAX && few_rows_inputs(x, w);
    if !fast {
        if narrow {
            // Prefill, training, other devices: this module in f32 for the one product (a
            // transient copy; the conversion is exact and costs 1/n of the product).
            return linear(x, &w.to_dtype(DType::F32)?);
        }
        // Prefill on the CPU, and training (the base weight is frozen, so only x needs a
        // gradient): both cores on one pool, W read in place.
        if !w.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
            return x
                .contiguous()?
                .apply_op1(super::frozen::FrozenLinear { w: w.clone() });
        }
        return x.matmul(&w.t()?);
    }
    let out = w.dim(0)?;
    let x = x.contiguous()?;
    // The input read in place (a copy of it per product was ~1 % of a batched decode step).
    let y = super::frozen::with_slice(&x, |xs| {
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let range = layout.start_offset()..layout.start_offset() + out * k;
        let ws = match cpu {
            candle_core::CpuStorage::F32(v) => WeightRows::F32(&v[range]),
            candle_core::CpuStorage::BF16(v) => WeightRows::Bf16(&v[range]),
            candle_core::CpuStorage::F16(v) => WeightRows::F16(&v[range]),
            _ => return Ok(None),
        };
        Ok(Some(if n <= GEMV_MAX_ROWS {
            gemv_of(xs, ws, n, k, out)
        } else {
            super::tile::few_rows_vec(xs, ws, n, k, out)
        }))
    })?;
    let Some(y) = y else {
        return x.matmul(&w.t()?);
    };
    Tensor::from_vec(y, (n, out), x.device())
}

/// [`linear`], through the weight's band copy ([`super::tile_major`], made on first use and kept
/// in `copy`) where a product has the rows of batched decoding
/// ([`super::tile_major::MIN_ROWS`] to [`FEW_ROWS_MAX`]) and the weight is f32 on an AVX-512
/// CPU; the same result to the bit either way.
pub fn linear_decoding(
    x: &Tensor,
    w: &Tensor,
    copy: &super::tile_major::DecodeCopy,
) -> candle_core::Result<Tensor> {
    use super::tile_major::{available, few_rows, MIN_ROWS};
    let n = x.dims2()?.0;
    let eligible = (MIN_ROWS..=FEW_ROWS_MAX).contains(&n)
        && w.dtype() == DType::F32
        && few_rows_inputs(x, w)
        && available();
    if eligible {
        if let Some(tm) = copy.of(w) {
            let x = x.contiguous()?;
            let y = super::frozen::with_slice(&x, |xs| Ok(few_rows(xs, &tm, n)))?;
            if let Some(y) = y {
                return Tensor::from_vec(y, (n, tm.shape().0), x.device());
            }
        }
    }
    linear(x, w)
}

/// Whether the few-row kernels can take `x` and `w` (whatever the row count): an f32 input on
/// the CPU, a contiguous f32/bf16/f16 weight, neither tracked for gradients.
fn few_rows_inputs(x: &Tensor, w: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op()
}

/// A row-major weight matrix as the few-row kernels read it: f32 in place, or bf16/f16
/// converted to f32 one block of rows at a time, by the thread that is about to use the block
/// (the conversion is exact: every bf16 and f16 value is an f32).
#[derive(Debug, Clone, Copy)]
pub enum WeightRows<'a> {
    /// Read in place.
    F32(&'a [f32]),
    /// Converted per block (a shift of the 16 bits).
    Bf16(&'a [half::bf16]),
    /// Converted per block (F16C where the CPU has it).
    F16(&'a [half::f16]),
}

impl<'a> WeightRows<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::Bf16(w) => w.len(),
            Self::F16(w) => w.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `j0..j1` of the `[_, k]` matrix as f32: borrowed when stored as f32, otherwise
    /// converted into `scratch`.
    pub fn panel<'s>(&self, j0: usize, j1: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        let range = j0 * k..j1 * k;
        match *self {
            Self::F32(w) => &w[range],
            // (every element is overwritten: no clearing, no zero fill)
            Self::Bf16(w) => {
                scratch.resize(range.len(), 0.0);
                widen_bf16(&w[range.clone()], &mut scratch[..range.len()]);
                &scratch[..range.len()]
            }
            Self::F16(w) => {
                use half::slice::HalfFloatSliceExt;
                scratch.resize(range.len(), 0.0);
                w[range.clone()].convert_to_f32_slice(&mut scratch[..range.len()]);
                &scratch[..range.len()]
            }
        }
    }
}

/// `dst[i] = src[i]` widened to f32 (a bf16 is the high half of an f32), vectorised with
/// AVX-512 or AVX2 when the CPU has them (a zero-extend and a shift per lane).
fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the feature the function is compiled for.
            return unsafe { widen_bf16_avx512(src, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { widen_bf16_avx2(src, dst) };
        }
    }
    widen_bf16_portable(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_bf16_avx512(src: &[half::bf16], dst: &mut [f32]) {
    widen_bf16_portable(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[half::bf16], dst: &mut [f32]) {
    widen_bf16_portable(src, dst)
}

#[inline(always)]
fn widen_bf16_portable(src: &[half::bf16], dst: &mut [f32]) {
    for (o, v) in dst.iter_mut().zip(src) {
        *o = v.widen();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;

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
            let d = max_abs_diff(&fast, &slow);
            // sums of k products of N(0,1): error ~ sqrt(k) * eps * |terms|
            assert!(d < 1e-3, "{n}x{k}x{out}: {d}");
        }
    }

    /// bf16 and f16 weights give, bit for bit, what their values widened to f32 give, for
    /// every path: gemv (n <= 6), the tiles (7..=64), and the product past them (n = 70).
    #[test]
    fn narrow_weights_equal_their_f32_values() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (n, k, out) in [
                (1, 37, 29),
                (3, 576, 70),
                (9, 37, 29),
                (64, 130, 50),
                (70, 37, 9),
            ] {
                let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 1.0, (out, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let wide = w.to_dtype(DType::F32).unwrap();
                let got = linear(&x, &w).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                let want = linear(&x, &wide).unwrap();
                assert_eq!(max_abs_diff(&got, &want), 0.0, "{dtype:?} {n}x{k}x{out}");
            }
        }
    }

    #[test]
    fn panels_widen_exactly() {
        // bf16 0x3FC0 = 1.5, 0xC000 = -2; f16 0x3E00 = 1.5, 0xC000 = -2.
        let b = [half::bf16::from_bits(0x3FC0), half::bf16::from_bits(0xC000)];
        let h = [half::f16::from_bits(0x3E00), half::f16::from_bits(0xC000)];
        let mut s = Vec::new();
        assert_eq!(WeightRows::Bf16(&b).panel(0, 2, 1, &mut s), &[1.5, -2.0]);
        assert_eq!(WeightRows::F16(&h).panel(1, 2, 1, &mut s), &[-2.0]);
        assert_eq!(
            WeightRows::F32(&[3.0, 4.0]).panel(0, 1, 2, &mut s),
            &[3.0, 4.0]
        );
    }
}
