//! The dtype weights are kept in, in memory: the checkpoint's own (bf16/f16 stay bf16/f16) or
//! one the user picks with `--dtype`.
//!
//! Only the matrices are stored narrow (the linear weights and the embedding, 2-D tensors);
//! norms and biases are f32. Every product reads a narrow weight as f32 (converted exactly, a
//! panel of rows at a time, see [`super::matmul`]) and accumulates in f32, so a bf16-stored
//! model computes exactly what an f32 model holding the same (bf16-rounded) values computes:
//! the storage dtype saves memory and bandwidth, not accuracy. Everything that is trained
//! (LoRA A/B, SN-Tune's neuron deltas) is f32, and a weight an adapter is merged into becomes
//! f32 (rounding a learned update into bf16 would lose it).

use candle_core::{DType, Tensor};

/// How weights are stored in memory (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageDtype {
    /// The checkpoint's dtype: bf16 and f16 matrices stay as they are; f32 stays f32, and so do
    /// quantised GGUF tensors (dequantised exactly to f32; ask for bf16/f16 to halve them).
    #[default]
    Auto,
    /// Every matrix in f32 (twice the memory of bf16; the reference behaviour).
    F32,
    /// Every matrix in bf16 (an f32 checkpoint is rounded to nearest even).
    Bf16,
    /// Every matrix in f16 (rounded to nearest; values beyond ±65504 become infinite and are
    /// refused at load).
    F16,
}

impl StorageDtype {
    /// The in-memory dtype of a tensor of rank `rank` found as `file` on disk (`file` is `None`
    /// for a quantised GGUF tensor).
    pub fn stored(self, file: Option<DType>, rank: usize) -> DType {
        if rank != 2 {
            return DType::F32;
        }
        match (self, file) {
            (Self::Auto, Some(d @ (DType::BF16 | DType::F16))) => d,
            (Self::Auto, _) | (Self::F32, _) => DType::F32,
            (Self::Bf16, _) => DType::BF16,
            (Self::F16, _) => DType::F16,
        }
    }

    /// Converts `t` (as read from a file whose dtype for it was `file`) to its stored dtype.
    pub fn store(self, t: Tensor, file: Option<DType>) -> candle_core::Result<Tensor> {
        let want = self.stored(file, t.rank());
        if t.dtype() == want {
            Ok(t)
        } else {
            t.to_dtype(want)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn only_matrices_are_stored_narrow() {
        let a = StorageDtype::Auto;
        assert_eq!(a.stored(Some(DType::BF16), 2), DType::BF16);
        assert_eq!(a.stored(Some(DType::F16), 2), DType::F16);
        assert_eq!(a.stored(Some(DType::BF16), 1), DType::F32);
        assert_eq!(a.stored(Some(DType::F64), 2), DType::F32);
        assert_eq!(a.stored(None, 2), DType::F32);
        assert_eq!(StorageDtype::Bf16.stored(Some(DType::F32), 2), DType::BF16);
        assert_eq!(StorageDtype::Bf16.stored(None, 2), DType::BF16);
        assert_eq!(StorageDtype::F16.stored(Some(DType::BF16), 1), DType::F32);
        assert_eq!(StorageDtype::F32.stored(Some(DType::BF16), 2), DType::F32);
    }

    #[test]
    fn storing_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
        let t = Tensor::new(
            &[[1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], [0.5, -2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let s = StorageDtype::Bf16.store(t, Some(DType::F32)).unwrap();
        assert_eq!(s.dtype(), DType::BF16);
        let back = s.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back, vec![vec![1.0, 1.0 + 4.0 / 256.0], vec![0.5, -2.0]]);
    }
}
