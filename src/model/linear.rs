//! A linear layer `y = x W^T + b` with LoRA adapters applied unmerged on top:
//! `y += s * (x A^T) B^T` for each adapter, in the order they were added.

use candle_core::{DType, Tensor, D};

use super::capture::{emit, Hook};
use super::fused_lora::fused_lora;
use crate::adapters::{lora_forward, LoraModule};

/// One linear module of the model, named by its checkpoint path.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Checkpoint path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Option<Tensor>,
    /// Unmerged LoRA adapters, applied in order.
    pub loras: Vec<LoraModule>,
    /// The weight's band copy for batched decoding ([`super::tile_major`]), made on first use.
    decode: super::tile_major::DecodeCopy,
}

impl Linear {
    /// A module without adapters.
    pub fn new(name: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name,
            weight,
            bias,
            loras: Vec::new(),
            decode: Default::default(),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// `x: [.., in] -> [.., out]`, reporting `:input` and `:output` to the hook.
    pub fn forward(&self, x: &Tensor, hook: Option<&dyn Hook>) -> candle_core::Result<Tensor> {
        emit(hook, &self.name, "input", x)?;
        let y = self.forward_plain(x)?;
        emit(hook, &self.name, "output", &y)?;
        Ok(y)
    }

    /// The weight as the training ops read it: 16-bit storage widened to f32 (a new tensor on
    /// each call), anything else as it is.
    pub(crate) fn weight_for_training(&self) -> candle_core::Result<Tensor> {
        match self.weight.dtype() {
            DType::BF16 | DType::F16 => self.weight.to_dtype(DType::F32),
            _ => Ok(self.weight.clone()),
        }
    }

    fn forward_plain(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut loras = self.loras.iter().peekable();
        // Training an adapter: the base product and the first adapter as one op, on `x` as it
        // is (its leading dims kept, no reshape nodes in the graph).
        let fused = match loras.peek() {
            Some(m) if x.track_op() || m.a.track_op() || m.b.track_op() => {
                fused_lora(x, &self.weight_for_training()?, &m.a, &m.b, m.scale)?
            }
            _ => None,
        };
        if let Some(y) = fused {
            loras.next();
            let mut y = match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            for m in loras {
                y = (y + lora_forward(x, m)?)?;
            }
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = super::matmul::linear_decoding(&x2, &self.weight, &self.decode)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        for m in loras {
            y = (y + lora_forward(&x2, m)?)?;
        }
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out)
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[hidden]`
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises the last dimension. `differentiable` picks the plain composition.
    pub fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        if differentiable && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            let op = super::autograd::RmsNormOp {
                w: self.weight.clone(),
                eps: self.eps as f32,
            };
            return x.contiguous()?.apply_op1(op);
        }
        if differentiable {
            let hidden = x.dim(D::Minus1)? as f64;
            let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / hidden)?;
            x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
                .broadcast_mul(&self.weight)
        } else if x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            // candle's arithmetic, eight rows at a time
            let op = super::rms_norm::RmsNormRows {
                w: self.weight.clone(),
                eps: self.eps as f32,
            };
            x.contiguous()?.apply_op1_no_bwd(&op)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
    }
}
