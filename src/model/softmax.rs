//! The attention probabilities of an inference forward pass over many positions (prefill,
//! scoring): `softmax(scale · Q Kᵀ + mask)` over the last axis, as one op over the raw scores.
//!
//! Composed from candle's ops this was three passes, each writing a `[b, heads, s, t]` tensor
//! (the scale, the mask, the softmax) with `exp` one scalar call per element. Here each row is
//! scaled, masked and normalised in one pass ([`super::expf::softmax_row`]: the same roundings
//! and the same sum order, so the same bits), rows split across
//! [`super::parallel::Pool::global`]. Training keeps its own op ([`super::autograd`]'s masked
//! softmax, which has a backward).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The op on raw scores `[b, heads, s, t]`: `softmax(scale · raw + mask)`, `mask` additive
/// `[b, 1, s, t]` (broadcast over heads) or none. Forward only.
pub struct ScaledMaskedSoftmax {
    /// Multiplies the raw scores (1 / sqrt(head_dim)).
    pub scale: f32,
    /// Additive mask, contiguous `[b, 1, s, t]`.
    pub mask: Option<Tensor>,
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, heads, s, t) = layout.shape().dims4()?;
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("scaled-masked-softmax: the scores must be contiguous");
        };
        let raw = &storage.as_slice::<f32>()?[o1..o2];
        let rows = b * heads * s;
        // every row, its mask row read in place (the mask is the same for every layer: no copy)
        let run = |mask: Option<&[f32]>| -> candle_core::Result<Vec<f32>> {
            let mut out = super::gemm::uninit(rows * t);
            if let Some(per) = 16_384usize.checked_div(t) {
                let py = super::gemm::SyncPtr(out.as_mut_ptr().cast());
                // rows per part: ~16k elements, so that the split costs little against the work
                let per = per.max(1);
                super::parallel::run_beside_products(rows * t, rows.div_ceil(per), &|p| {
                    let r0 = p * per;
                    for r in r0..(r0 + per).min(rows) {
                        let (bi, i) = (r / (heads * s), r % s);
                        // SAFETY: part p alone writes its rows of `out`.
                        let row = unsafe { std::slice::from_raw_parts_mut(py.get().add(r * t), t) };
                        let m = mask.map(|m| &m[(bi * s + i) * t..(bi * s + i + 1) * t]);
                        super::expf::softmax_row(&raw[r * t..(r + 1) * t], self.scale, m, row);
                    }
                });
            }
            // SAFETY: the parts cover every row, and `softmax_row` writes all `t` elements of
            // each.
            Ok(unsafe { super::gemm::assume_init(out) })
        };
        let out = match &self.mask {
            Some(m) => {
                if m.dims() != [b, 1, s, t] {
                    candle_core::bail!(
                        "scaled-masked-softmax: mask {:?} for scores {:?} (expected [{b}, 1, {s}, {t}])",
                        m.dims(),
                        layout.shape().dims()
                    );
                }
                super::frozen::with_slice(&m.contiguous()?, |ms| run(Some(ms)))?
            }
            None => run(None)?,
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn equals_candles_scale_mask_and_softmax_to_the_bit() {
        let dev = Device::Cpu;
        let (b, h, s, t) = (2usize, 3usize, 5usize, 7usize);
        let raw: Vec<f32> = (0..b * h * s * t)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.05 - 25.0)
            .collect();
        let raw = Tensor::from_vec(raw, (b, h, s, t), &dev).unwrap();
        // causal over the last s of t keys, plus one padded key in the second sequence
        let mut mask = vec![0f32; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    if j > t - s + i || (bi == 1 && j == 0) {
                        mask[(bi * s + i) * t + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, s, t), &dev).unwrap();
        let scale = 0.125f64;
        use crate::model::test_util::bits;
        for with_mask in [true, false] {
            let scores = (&raw * scale).unwrap();
            let scores = if with_mask {
                scores.broadcast_add(&mask).unwrap()
            } else {
                scores
            };
            let want = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let op = ScaledMaskedSoftmax {
                scale: scale as f32,
                mask: with_mask.then(|| mask.clone()),
            };
            let got = raw.apply_op1_no_bwd(&op).unwrap();
            assert_eq!(bits(&got), bits(&want), "mask {with_mask}");
        }
        let bad = ScaledMaskedSoftmax {
            scale: 1.0,
            mask: Some(Tensor::zeros((b, 1, s, t + 1), candle_core::DType::F32, &dev).unwrap()),
        };
        let err = raw.apply_op1_no_bwd(&bad).unwrap_err().to_string();
        assert!(err.contains("expected [2, 1, 5, 7]"), "{err}");
    }
}
