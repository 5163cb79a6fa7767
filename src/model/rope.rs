//! Rotary position embeddings (RoPE) in the Hugging Face half-split layout, with the
//! frequency scalings of [`RopeScaling`].

use candle_core::{DType, Device, Tensor};

use super::config::{Config, RopeScaling};

/// Precomputed cos/sin tables, one row per position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_positions, head_dim / 2]`
    cos: Tensor,
    /// `[max_positions, head_dim / 2]`
    sin: Tensor,
}

/// The inverse frequencies `1 / theta^(2i/d)`, scaled as the config says. Computed in f32 as
/// transformers does, so that angles match bit for bit at small positions.
pub fn inv_freq(cfg: &Config) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let (factor, lo, hi, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    /// Tables for positions `0..max_positions`.
    pub fn new(cfg: &Config, max_positions: usize, device: &Device) -> candle_core::Result<Self> {
        let inv = inv_freq(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// Number of positions in the tables.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// The `[b, s, head_dim / 2]` cos and sin rows for `positions` (`[b, s]`, u32).
    pub fn tables(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, s) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, s, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, s, half))?;
        Ok((cos, sin))
    }

    /// Rotates `x` (`[b, heads, s, head_dim]`) by the angles of `cos`/`sin` (`[b, s, head_dim/2]`).
    /// `differentiable` picks the plain composition (which has a backward pass) over the fused
    /// kernel.
    pub fn apply(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        if !differentiable {
            return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = super::autograd::RopeOp {
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
            };
            return x.contiguous()?.apply_op1(op);
        }
        Self::apply_composed(x, cos, sin)
    }

    /// For inference: a projection's output `x: [b, s, heads · d]` split into heads and rotated,
    /// `[b, heads, s, d]`, in one pass on the CPU (the same as
    /// `apply(x.reshape(b, s, heads, d).transpose(1, 2), cos, sin, false)`, to the bit; that
    /// composition copied the heads out, then rotated them into a second buffer).
    pub fn split_apply(
        x: &Tensor,
        heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, s, width) = x.dims3()?;
        if heads == 0 || width % heads != 0 {
            candle_core::bail!("rope: {width} features do not split into {heads} heads");
        }
        let d = width / heads;
        if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
            let op = SplitRope {
                heads,
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
            };
            return x.contiguous()?.apply_op1_no_bwd(&op);
        }
        let x = x.reshape((b, s, heads, d))?.transpose(1, 2)?;
        Self::apply(&x, cos, sin, false)
    }

    /// The plain composition `x cos + rotate_half(x) sin` (differentiable on every device).
    pub fn apply_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        // x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1].
        let cos = Tensor::cat(&[cos, cos], 2)?
            .unsqueeze(1)?
            .to_dtype(DType::F32)?;
        let sin = Tensor::cat(&[sin, sin], 2)?
            .unsqueeze(1)?
            .to_dtype(DType::F32)?;
        let d = x.dim(3)?;
        let x1 = x.narrow(3, 0, d / 2)?;
        let x2 = x.narrow(3, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// [`Rope::split_apply`]'s op: `[b, s, heads · d]` in, `[b, heads, s, d]` out. Forward only.
struct SplitRope {
    heads: usize,
    cos: Tensor,
    sin: Tensor,
}

impl candle_core::CustomOp1 for SplitRope {
    fn name(&self) -> &'static str {
        "split-rope"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (b, s, width) = layout.shape().dims3()?;
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("split-rope: the input must be contiguous");
        };
        let x = &storage.as_slice::<f32>()?[o1..o2];
        let shape = candle_core::Shape::from((b, self.heads, s, width / self.heads));
        let y = super::autograd::rope_from(x, &shape, true, &self.cos, &self.sin, false)?;
        Ok((candle_core::CpuStorage::F32(y), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> Config {
        Config {
            architecture: super::super::config::Architecture::Llama,
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: scaling,
            vocab_size: 4,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            max_position_embeddings: 16,
            sliding_window: None,
        }
    }

    #[test]
    fn default_frequencies() {
        // d = 8: 1 / 10000^(0/8, 2/8, 4/8, 6/8) = 1, 0.1, 0.01, 0.001
        let f = inv_freq(&cfg(RopeScaling::Default));
        for (got, want) in f.iter().zip([1.0, 0.1, 0.01, 0.001]) {
            assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        }
    }

    #[test]
    fn llama3_scaling_bands() {
        // old context 64, low factor 1, high factor 4: wavelengths 2*pi/f = 6.28, 62.8, 628, 6283.
        // high_freq_wavelen = 16: f=1 kept. low_freq_wavelen = 64: 628 and 6283 divided by 8.
        // 62.8 is in between: smooth = (64/62.83 - 1)/3 = 0.00623; f' = (1-s)*0.1/8 + s*0.1.
        let f = inv_freq(&cfg(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        }));
        let s = (64.0 / (2.0 * std::f32::consts::PI / 0.1) - 1.0) / 3.0;
        let want = [
            1.0,
            (1.0 - s) * 0.1 / 8.0 + s * 0.1,
            0.01 / 8.0,
            0.001 / 8.0,
        ];
        for (got, want) in f.iter().zip(want) {
            assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        }
    }

    #[test]
    fn fused_and_differentiable_rotations_agree() {
        let dev = Device::Cpu;
        let rope = Rope::new(&cfg(RopeScaling::Default), 16, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 0, 1, 2, 9]], &dev).unwrap();
        let (c, s) = rope.tables(&pos).unwrap();
        let a = Rope::apply(&x, &c, &s, false).unwrap();
        let b = Rope::apply(&x, &c, &s, true).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn split_apply_equals_candles_rope_on_the_split_heads_to_the_bit() {
        let dev = Device::Cpu;
        let rope = Rope::new(&cfg(RopeScaling::Default), 16, &dev).unwrap();
        let (b, s, heads, d) = (2usize, 5usize, 3usize, 8usize);
        let x = Tensor::randn(0f32, 1.0, (b, s, heads * d), &dev).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 0, 1, 2, 9]], &dev).unwrap();
        let (c, sn) = rope.tables(&pos).unwrap();
        let split = x
            .reshape((b, s, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let want = candle_nn::rotary_emb::rope(&split.contiguous().unwrap(), &c, &sn).unwrap();
        let got = Rope::split_apply(&x, heads, &c, &sn).unwrap();
        assert_eq!(got.dims(), [b, heads, s, d]);
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&got), bits(&want));
        let err = Rope::split_apply(&x, 5, &c, &sn).unwrap_err().to_string();
        assert!(err.contains("do not split into 5 heads"), "{err}");
    }
}
