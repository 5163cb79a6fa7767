//! The LoRA update (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
//! arXiv:2106.09685, eq. 3): a frozen `W` `[out, in]` becomes `W + s · B A` with `A` `[r, in]`,
//! `B` `[out, r]` and the scale `s = alpha / r` (`alpha / √r` with rsLoRA).

use candle_core::{DType, Tensor, D};

use super::AdapterError;

/// One adapted linear layer: `y = W x + scale · B (A x)`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `lora_A`, `[r, in]`.
    pub a: Tensor,
    /// `lora_B`, `[out, r]`.
    pub b: Tensor,
    /// The factor applied to `B A`, from the config ([`LoraConfig::scaling_for`](super::LoraConfig::scaling_for)).
    pub scale: f64,
}

impl LoraModule {
    /// The rank `r` (rows of A), or 0 if A is not 2-D.
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    /// The number of trainable values: `r · (in + out)`.
    pub fn num_parameters(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }

    /// Checks that the module fits the linear layer at `module` whose weight is
    /// `expected = (out, in)`: A is `[r, in]` and B is `[out, r]`.
    pub fn check_shape(&self, module: &str, expected: (usize, usize)) -> Result<(), AdapterError> {
        let (out, inp) = expected;
        let (a, b) = (self.a.dims(), self.b.dims());
        let fits = matches!((a, b), ([ra, ia], [ob, rb]) if ra == rb && *ia == inp && *ob == out);
        if fits {
            Ok(())
        } else {
            Err(AdapterError::ShapeMismatch {
                module: module.to_string(),
                expected,
                a: a.to_vec(),
                b: b.to_vec(),
            })
        }
    }
}

/// The dense update `ΔW = scale · B A`.
///
/// # Shapes
/// - A: `[r, in]`, B: `[out, r]` -> `[out, in]`, in the dtype of A and B.
pub fn lora_delta(m: &LoraModule) -> candle_core::Result<Tensor> {
    m.b.matmul(&m.a)? * m.scale
}

/// The adapter's contribution to a linear layer's output, without forming `ΔW`:
/// `scale · (x Aᵀ) Bᵀ`, i.e. `x ΔWᵀ` (the base layer's `x Wᵀ` is added by the caller).
/// A and B are cast to the dtype of `x` when they differ.
///
/// # Shapes
/// - x: `[.., in]` -> `[.., out]` (any number of leading dims, flattened for the matmuls).
pub fn lora_forward(x: &Tensor, m: &LoraModule) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some((&inp, lead)) = dims.split_last() else {
        return Err(candle_core::Error::Msg(
            "lora_forward: x must have at least one dimension".into(),
        ));
    };
    let (a, b) = if m.a.dtype() == x.dtype() && m.b.dtype() == x.dtype() {
        (m.a.clone(), m.b.clone())
    } else {
        (m.a.to_dtype(x.dtype())?, m.b.to_dtype(x.dtype())?)
    };
    let rows: usize = lead.iter().product();
    let xs = x.reshape((rows, inp))?;
    let xs = xs.matmul(&a.t()?)?; // [rows, r]
    let xs = (xs.matmul(&b.t()?)? * m.scale)?; // [rows, out]
    let mut out_dims = lead.to_vec();
    out_dims.push(xs.dim(D::Minus1)?);
    xs.reshape(out_dims)
}

/// The merged weight `W + scale · B A`, in the dtype of `weight`.
///
/// # Shapes
/// - weight: `[out, in]`, A: `[r, in]`, B: `[out, r]` -> `[out, in]`.
///
/// A bf16/f16 weight comes back as f32 (`W` is exact in f32; rounding `W + ΔW` to the storage
/// dtype would lose most of a small learned update), so merged and unmerged give one answer.
pub fn merge_into(weight: &Tensor, m: &LoraModule) -> candle_core::Result<Tensor> {
    let delta = lora_delta(m)?;
    match weight.dtype() {
        DType::BF16 | DType::F16 => weight
            .to_dtype(DType::F32)?
            .add(&delta.to_dtype(DType::F32)?),
        d => weight.add(&delta.to_dtype(d)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A = [[1, 2], [3, 4]] (r 2, in 2), B = [[1, 0], [1, 1]] (out 2), scale 0.5.
    fn module() -> LoraModule {
        let dev = Device::Cpu;
        LoraModule {
            a: Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap(),
            b: Tensor::new(&[[1f32, 0.], [1., 1.]], &dev).unwrap(),
            scale: 0.5,
        }
    }

    #[test]
    fn delta_is_scaled_b_times_a() {
        // B A = [[1·1 + 0·3, 1·2 + 0·4], [1·1 + 1·3, 1·2 + 1·4]] = [[1, 2], [4, 6]]; · 0.5
        let d = lora_delta(&module()).unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            vec![vec![0.5, 1.0], vec![2.0, 3.0]]
        );
    }

    #[test]
    fn forward_is_scaled_x_at_bt() {
        // x = [1, 1]: x Aᵀ = [1+2, 3+4] = [3, 7]; (x Aᵀ) Bᵀ = [3, 3+7] = [3, 10]; · 0.5 = [1.5, 5]
        // x = [2, -1]: x Aᵀ = [0, 2]; · Bᵀ = [0, 2]; · 0.5 = [0, 1]
        let x = Tensor::new(&[[[1f32, 1.], [2., -1.]]], &Device::Cpu).unwrap(); // [1, 2, 2]
        let y = lora_forward(&x, &module()).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2]);
        assert_eq!(
            y.to_vec3::<f32>().unwrap(),
            vec![vec![vec![1.5, 5.0], vec![0.0, 1.0]]]
        );
    }

    #[test]
    fn forward_handles_rectangular_factors_and_a_1d_input() {
        // A = [[1, 0, 2]] (r 1, in 3), B = [[2], [-1]] (out 2), scale 3
        // x = [1, 2, 3]: x Aᵀ = 1 + 6 = 7; · Bᵀ = [14, -7]; · 3 = [42, -21]
        let dev = Device::Cpu;
        let m = LoraModule {
            a: Tensor::new(&[[1f32, 0., 2.]], &dev).unwrap(),
            b: Tensor::new(&[[2f32], [-1.]], &dev).unwrap(),
            scale: 3.0,
        };
        let y = lora_forward(&Tensor::new(&[1f32, 2., 3.], &dev).unwrap(), &m).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![42.0, -21.0]);
        assert_eq!(m.rank(), 1);
        assert_eq!(m.num_parameters(), 5);
        m.check_shape("m", (2, 3)).unwrap();
        let err = m
            .check_shape("model.layers.0.mlp.up_proj", (3, 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.layers.0.mlp.up_proj") && err.contains("[1, 3]"),
            "{err}"
        );
    }

    #[test]
    fn forward_casts_the_factors_to_the_input_dtype() {
        let x = Tensor::new(&[[1f32, 1.]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = lora_forward(&x, &module()).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(
            y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![1.5, 5.0]]
        );
    }

    #[test]
    fn merge_adds_the_delta() {
        // I + [[0.5, 1], [2, 3]] = [[1.5, 1], [2, 4]]
        let w = Tensor::eye(2, DType::F32, &Device::Cpu).unwrap();
        let merged = merge_into(&w, &module()).unwrap();
        assert_eq!(
            merged.to_vec2::<f32>().unwrap(),
            vec![vec![1.5, 1.0], vec![2.0, 4.0]]
        );
    }

    #[test]
    fn a_scalar_input_is_an_error() {
        let x = Tensor::new(1f32, &Device::Cpu).unwrap();
        assert!(lora_forward(&x, &module()).is_err());
    }
}
