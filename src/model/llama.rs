//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), written in candle's one-file shape
//! but with state outside the math: the KV cache and activation hooks are arguments, so
//! `forward` takes `&self`.
//!
//! Reference: transformers' `modeling_llama.py` / `modeling_qwen2.py`.

use candle_core::{DType, Device, Tensor, D};

use super::bmm::batched_matmul;
use super::cache::KvCache;
use super::capture::{emit, Hook};
use super::config::Config;
use super::linear::{Linear, RmsNorm};
use super::rope::Rope;
use super::weights::Weights;

/// Which logits `forward` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logits {
    /// Every position: `[b, s, vocab]`.
    #[default]
    All,
    /// Only the last position: `[b, 1, vocab]` (what generation needs; saves the LM head on
    /// every other position).
    Last,
    /// None: `forward` returns the final hidden states `[b, s, hidden]`.
    None,
}

/// The inputs of one forward pass besides the token ids.
#[derive(Default)]
pub struct ForwardArgs<'a> {
    /// `[b, past + s]`, 1 for real tokens and 0 for padding, covering the cached positions too.
    /// `None`: every token is real.
    pub attention_mask: Option<&'a Tensor>,
    /// `[b, s]` u32 positions. `None`: derived from the mask (cumulative count of real tokens,
    /// as transformers' `generate` does), or `past..past + s` without a mask.
    pub position_ids: Option<&'a Tensor>,
    /// The KV cache to read and extend.
    pub cache: Option<&'a mut KvCache>,
    /// Receives activations.
    pub hook: Option<&'a dyn Hook>,
    /// Which logits to compute.
    pub logits: Logits,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    name: String,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    name: String,
}

/// Per-pass values shared by every layer.
struct Step<'a> {
    cos: Tensor,
    sin: Tensor,
    /// Additive mask `[b, 1, s, t]`, or `None` when no position is masked.
    mask: Option<Tensor>,
    /// The mask's last seen key per query ([`super::prefill_attention::key_extents`]), read once
    /// for every layer's blocked attention; `None` where that path is not taken.
    extents: Option<Vec<usize>>,
    hook: Option<&'a dyn Hook>,
    differentiable: bool,
    /// Training may run each decoder layer, or each attention and MLP block, as one op
    /// ([`Model::set_block_ops`]).
    block_ops: bool,
}

/// A loaded decoder model.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    differentiable: bool,
    block_ops: bool,
}

fn linear(
    w: &mut Weights,
    name: String,
    out: usize,
    inp: usize,
    bias: bool,
) -> crate::Result<Linear> {
    let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(w.take(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::new(name, weight, bias))
}

impl Attention {
    fn new(cfg: &Config, w: &mut Weights, name: String) -> crate::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        Ok(Self {
            q_proj: linear(w, format!("{name}.q_proj"), q, h, cfg.qkv_bias)?,
            k_proj: linear(w, format!("{name}.k_proj"), kv, h, cfg.qkv_bias)?,
            v_proj: linear(w, format!("{name}.v_proj"), kv, h, cfg.qkv_bias)?,
            o_proj: linear(w, format!("{name}.o_proj"), h, q, cfg.o_bias)?,
            name,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        if step.differentiable
            && step.hook.is_none()
            && cache.is_none()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
        {
            return self.forward_training(x, step);
        }
        let (b, s, _) = x.dims3()?;
        let hook = step.hook;
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim))?.transpose(1, 2);
        let q = self.q_proj.forward(x, hook)?;
        let k = self.k_proj.forward(x, hook)?;
        let v = heads(self.v_proj.forward(x, hook)?, self.num_kv_heads)?.contiguous()?;
        let (q, k) = if step.differentiable {
            let (q, k) = (heads(q, self.num_heads)?, heads(k, self.num_kv_heads)?);
            (
                Rope::apply(&q, &step.cos, &step.sin, true)?,
                Rope::apply(&k, &step.cos, &step.sin, true)?,
            )
        } else {
            // the heads split and rotated in one pass
            (
                Rope::split_apply(&q, self.num_heads, &step.cos, &step.sin)?,
                Rope::split_apply(&k, self.num_kv_heads, &step.cos, &step.sin)?,
            )
        };
        emit(hook, &self.name, "q", &q)?;
        emit(hook, &self.name, "k", &k)?;
        emit(hook, &self.name, "v", &v)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        if hook.is_none() && !step.differentiable && s == 1 {
            if let Some(out) = super::attention::decode_attention(&q, &k, &v, step.mask.as_ref())? {
                return self.o_proj.forward(&out, hook);
            }
        }
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let t = k.dim(2)?;
        // GQA without copying keys: query head h uses KV head h / groups, so the queries of one
        // KV head are consecutive and can be stacked along the sequence axis.
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, groups * s, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let merge = |out: Tensor| {
            out.reshape((b, self.num_heads, s, self.head_dim))?
                .transpose(1, 2)?
                .reshape((b, s, self.num_heads * self.head_dim))
        };
        if hook.is_none() && !step.differentiable {
            // block by block, skipping the keys a block's queries all mask
            let out = super::prefill_attention::prefill_attention(
                &q,
                &k,
                &v,
                step.mask.as_ref(),
                step.extents.as_deref(),
                scale as f32,
                s,
            )?;
            if let Some(out) = out {
                return self.o_proj.forward(&merge(out)?, hook);
            }
        }
        let raw = batched_matmul(&q, &k.t()?)?.reshape((b, self.num_heads, s, t))?;
        let probs = if step.differentiable && raw.device().is_cpu() && raw.dtype() == DType::F32 {
            // Scale, mask and softmax in one pass, with its backward written out.
            let mask = step.mask.as_ref().map(|m| m.contiguous()).transpose()?;
            let op = super::autograd::MaskedSoftmaxOp {
                scale: scale as f32,
                mask,
            };
            raw.contiguous()?.apply_op1(op)?
        } else if !step.differentiable && raw.device().is_cpu() && raw.dtype() == DType::F32 {
            // The same three steps as below in one pass, to the bit (`exp` in vectors).
            let mask = step.mask.as_ref().map(|m| m.contiguous()).transpose()?;
            let op = super::softmax::ScaledMaskedSoftmax {
                scale: scale as f32,
                mask,
            };
            raw.contiguous()?.apply_op1_no_bwd(&op)?
        } else {
            let scores = (raw * scale)?;
            let scores = match &step.mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            if step.differentiable {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            }
        };
        emit(hook, &self.name, "attn_weights", &probs)?;
        let probs = probs.reshape((b, self.num_kv_heads, groups * s, t))?;
        let out = merge(batched_matmul(&probs, &v)?)?;
        self.o_proj.forward(&out, hook)
    }

    /// q, k, v and o.
    fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// The heads and this pass's angles and mask, for the fused training ops.
    fn shape<'a>(&self, step: &'a Step) -> super::fused_attention::AttentionShape<'a> {
        super::fused_attention::AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            cos: &step.cos,
            sin: &step.sin,
            mask: step.mask.as_ref(),
        }
    }

    /// The same attention for training on the CPU, with the fewest graph nodes (each node costs
    /// a gradient buffer and an accumulation in the backward pass): heads split and merged in
    /// one copy each, `softmax(scale · Q Kᵀ + mask)` as one op on the query heads stacked per
    /// KV head ([`super::scores`]), no hooks, no cache.
    fn forward_training(&self, x: &Tensor, step: &Step) -> candle_core::Result<Tensor> {
        use super::autograd::HeadsOp;
        use super::scores::AttentionScores;
        if step.block_ops {
            let y =
                super::fused_attention::fused_attention(x, self.projections(), self.shape(step))?;
            if let Some(y) = y {
                return Ok(y);
            }
        }
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| {
            t.apply_op1(HeadsOp::Split {
                heads,
                head_dim: self.head_dim,
            })
        };
        let q = split(self.q_proj.forward(x, None)?, self.num_heads)?;
        let k = split(self.k_proj.forward(x, None)?, self.num_kv_heads)?;
        let v = split(self.v_proj.forward(x, None)?, self.num_kv_heads)?;
        let q = Rope::apply(&q, &step.cos, &step.sin, true)?;
        let k = Rope::apply(&k, &step.cos, &step.sin, true)?;
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, groups * s, self.head_dim))?;
        let mask = step.mask.as_ref().map(|m| m.contiguous()).transpose()?;
        let probs = q.apply_op2(
            &k,
            AttentionScores {
                scale: (1.0 / (self.head_dim as f64).sqrt()) as f32,
                mask,
            },
        )?;
        let out = batched_matmul(&probs, &v)?.apply_op1(HeadsOp::Merge {
            heads: self.num_heads,
        })?;
        self.o_proj.forward(&out, None)
    }
}

impl Mlp {
    fn new(cfg: &Config, w: &mut Weights, name: &str) -> crate::Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(w, format!("{name}.gate_proj"), i, h, bias)?,
            up_proj: linear(w, format!("{name}.up_proj"), i, h, bias)?,
            down_proj: linear(w, format!("{name}.down_proj"), h, i, bias)?,
        })
    }

    /// gate, up and down.
    fn projections(&self) -> [&Linear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    fn forward(&self, x: &Tensor, step: &Step) -> candle_core::Result<Tensor> {
        let hook = step.hook;
        if hook.is_none() && step.block_ops {
            // training with an adapter on all three projections: the block as one graph node
            if let Some(y) = super::fused_mlp::fused_mlp(x, self.projections())? {
                return Ok(y);
            }
        }
        let gate = self.gate_proj.forward(x, hook)?;
        let up = self.up_proj.forward(x, hook)?;
        let h = if gate.track_op() && gate.device().is_cpu() && gate.dtype() == DType::F32 {
            gate.contiguous()?
                .apply_op2(&up.contiguous()?, super::autograd::SwiGluOp)?
        } else if gate.device().is_cpu() && gate.dtype() == DType::F32 && !up.track_op() {
            gate.contiguous()?
                .apply_op2(&up.contiguous()?, super::autograd::SiluMulOp)?
        } else {
            (candle_nn::ops::silu(&gate)? * up)?
        };
        self.down_proj.forward(&h, hook)
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let d = step.differentiable;
        if d && step.block_ops && step.hook.is_none() && cache.is_none() {
            // training with an adapter on every projection: the layer as one graph node
            let (att, mlp) = (&self.self_attn, &self.mlp);
            let norm = |n: &RmsNorm| super::fused_layer::Norm {
                w: n.weight.clone(),
                eps: n.eps as f32,
            };
            let y = super::fused_layer::fused_layer(
                x,
                (att.projections(), att.shape(step)),
                mlp.projections(),
                [
                    norm(&self.input_layernorm),
                    norm(&self.post_attention_layernorm),
                ],
            )?;
            if let Some(y) = y {
                return Ok(y);
            }
        }
        let residual = x;
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x, d)?, step, cache)?;
        let x = (residual + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x, d)?, step)?;
        let x = (x + h)?;
        emit(step.hook, &self.name, "output", &x)?;
        Ok(x)
    }
}

impl Model {
    /// Builds the model from checkpoint tensors (Hugging Face names), checking every shape.
    pub fn new(cfg: Config, mut w: Weights, device: &Device) -> crate::Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = w.take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let name = format!("model.layers.{i}");
            let norm = |w: &mut Weights, n: &str| -> crate::Result<RmsNorm> {
                Ok(RmsNorm {
                    weight: w.take(&format!("{name}.{n}.weight"), &[h])?,
                    eps: cfg.rms_norm_eps,
                })
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(&mut w, "input_layernorm")?,
                self_attn: Attention::new(&cfg, &mut w, format!("{name}.self_attn"))?,
                post_attention_layernorm: norm(&mut w, "post_attention_layernorm")?,
                mlp: Mlp::new(&cfg, &mut w, &format!("{name}.mlp"))?,
                name,
            });
        }
        let norm = RmsNorm {
            weight: w.take("model.norm.weight", &[h])?,
            eps: cfg.rms_norm_eps,
        };
        // Some checkpoints with tied embeddings still store lm_head.weight; use it when present.
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::new("lm_head".into(), embed_tokens.clone(), None)
        } else {
            linear(&mut w, "lm_head".into(), v, h, false)?
        };
        let positions = cfg.positions();
        let rope = Rope::new(&cfg, positions, device)?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            differentiable: false,
            block_ops: true,
        })
    }

    /// The settled configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A copy with every matrix (the linear weights, the embedding, an untied LM head) stored as
    /// `dtype`; activations stay f32 (see [`super::storage`]). A tied LM head stays tied.
    pub fn with_storage(&self, dtype: DType) -> candle_core::Result<Self> {
        let mut m = self.clone();
        let tied = m.lm_head.weight.id() == m.embed_tokens.id();
        m.embed_tokens = m.embed_tokens.to_dtype(dtype)?;
        m.lm_head.weight = if tied {
            m.embed_tokens.clone()
        } else {
            m.lm_head.weight.to_dtype(dtype)?
        };
        for lin in m.linears_mut() {
            lin.weight = lin.weight.to_dtype(dtype)?;
        }
        Ok(m)
    }

    /// Use only operations with a backward pass (for training); the default uses fused kernels.
    pub fn set_differentiable(&mut self, on: bool) {
        self.differentiable = on;
    }

    /// Whether training on the CPU runs each decoder layer whose seven projections all carry
    /// one adapter as a single autograd op ([`super::fused_layer`]), and otherwise each such
    /// attention or MLP block ([`super::fused_attention`], [`super::fused_mlp`]); on by
    /// default. Off, the same arithmetic runs as a graph of smaller ops: slower, with the same
    /// output and gradients to the bit.
    pub fn set_block_ops(&mut self, on: bool) {
        self.block_ops = on;
    }

    /// Every linear module, in checkpoint order (`lm_head` excluded).
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
        })
    }

    /// Every linear module, mutably (to attach or merge adapters).
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ]
        })
    }

    /// Every tensor of the model under its Hugging Face checkpoint name, in checkpoint order,
    /// as the model computes with it: unmerged LoRA adapters are folded into their weights
    /// (`W + s B A`). `lm_head.weight` is left out when it is the embedding (tied).
    pub fn named_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        let push_linear = |out: &mut Vec<(String, Tensor)>, lin: &Linear| {
            let mut w = lin.weight.clone();
            for m in &lin.loras {
                w = crate::adapters::merge_into(&w, m)?;
            }
            out.push((format!("{}.weight", lin.name), w));
            if let Some(b) = &lin.bias {
                out.push((format!("{}.bias", lin.name), b.clone()));
            }
            Ok::<_, candle_core::Error>(())
        };
        for l in &self.layers {
            out.push((
                format!("{}.input_layernorm.weight", l.name),
                l.input_layernorm.weight.clone(),
            ));
            for lin in [
                &l.self_attn.q_proj,
                &l.self_attn.k_proj,
                &l.self_attn.v_proj,
                &l.self_attn.o_proj,
            ] {
                push_linear(&mut out, lin)?;
            }
            out.push((
                format!("{}.post_attention_layernorm.weight", l.name),
                l.post_attention_layernorm.weight.clone(),
            ));
            for lin in [&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj] {
                push_linear(&mut out, lin)?;
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if !self.lm_head_is_tied() {
            push_linear(&mut out, &self.lm_head)?;
        }
        Ok(out)
    }

    /// Whether the LM head is the embedding matrix itself (tied weights).
    pub fn lm_head_is_tied(&self) -> bool {
        self.lm_head.weight.id() == self.embed_tokens.id() && self.lm_head.loras.is_empty()
    }

    /// Logits `[b, s, vocab]` of a batch of token ids `[b, s]` with no padding and no cache.
    pub fn forward(&self, input_ids: &Tensor) -> crate::Result<Tensor> {
        self.forward_with(input_ids, ForwardArgs::default())
    }

    /// The full forward pass: padding masks, cache, hooks, and which logits to compute.
    pub fn forward_with(&self, input_ids: &Tensor, args: ForwardArgs) -> crate::Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 {
            return Err(super::ModelError::Input("empty input (0 tokens)".into()).into());
        }
        let max_id = input_ids
            .max_all()?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(super::ModelError::Input(format!(
                "token id {max_id} is past the model's vocabulary of {} (is the tokenizer the \
                 model's own?)",
                self.cfg.vocab_size
            ))
            .into());
        }
        let past = args.cache.as_ref().map_or(0, |c| c.seq_len());
        let positions = match (args.position_ids, args.attention_mask) {
            (Some(p), _) => p.clone(),
            (None, Some(m)) => positions_from_mask(m, s)?,
            (None, None) => Tensor::arange(past as u32, (past + s) as u32, &self.device)?
                .unsqueeze(0)?
                .repeat((b, 1))?,
        };
        let max_pos = positions.max_all()?.to_scalar::<u32>()? as usize;
        if max_pos >= self.rope.max_positions() {
            return Err(super::ModelError::Input(format!(
                "position {max_pos} is past the model's {} positions: {}",
                self.rope.max_positions(),
                self.cfg.positions_limit()
            ))
            .into());
        }
        let (cos, sin) = self.rope.tables(&positions)?;
        let mask = attention_mask(args.attention_mask, b, s, past, &self.device)?;
        let extents = match &mask {
            Some(m) if s >= 2 && args.hook.is_none() && !self.differentiable => {
                super::prefill_attention::key_extents(m)?
            }
            _ => None,
        };
        let step = Step {
            cos,
            sin,
            mask,
            extents,
            hook: args.hook,
            differentiable: self.differentiable,
            block_ops: self.block_ops,
        };
        let mut x = self
            .embed_tokens
            .embedding(&input_ids.flatten_all()?)?
            .to_dtype(DType::F32)?
            .reshape((b, s, self.cfg.hidden_size))?;
        emit(step.hook, "model.embed_tokens", "output", &x)?;
        let mut cache = args.cache;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &step, cache.as_deref_mut().map(|c| (c, i)))?;
        }
        let x = self.norm.forward(&x, self.differentiable)?;
        emit(step.hook, "model.norm", "output", &x)?;
        Ok(match args.logits {
            Logits::None => x,
            Logits::All => self.lm_head.forward(&x, step.hook)?,
            Logits::Last => self.lm_head.forward(&x.narrow(1, s - 1, 1)?, step.hook)?,
        })
    }

    /// Applies the LM head to final hidden states `[.., hidden]` -> `[.., vocab]`.
    pub fn lm_head_forward(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden, None)
    }

    /// The LM head's weight when the head is a plain frozen f32 product on the CPU (no adapter,
    /// no bias, contiguous, not trained): what the fused loss
    /// [`crate::train::loss::head_log_softmax`] multiplies by.
    pub fn frozen_lm_head(&self) -> Option<&Tensor> {
        let w = &self.lm_head.weight;
        let plain = self.lm_head.loras.is_empty() && self.lm_head.bias.is_none();
        (plain && w.dtype() == DType::F32 && w.is_contiguous() && w.device().is_cpu())
            .then_some(w)
            .filter(|w| !w.track_op())
    }

    /// The LM head's weight `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head.weight
    }

    /// Total parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        self.cfg.num_parameters()
    }

    /// The dtype the embedding (and, stored the same way, every linear weight without a merged
    /// adapter) is kept in; activations are always f32 (see [`super::storage`]).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
}

/// Positions of the last `s` tokens from a `[b, t]` 0/1 mask: the count of real tokens before
/// each one (padding gets 0), as transformers' `generate` computes them.
pub fn positions_from_mask(mask: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let m: Vec<Vec<u32>> = mask.to_dtype(DType::U32)?.to_vec2()?;
    let rows: Vec<u32> = m
        .iter()
        .flat_map(|row| {
            let mut seen = 0u32;
            let pos: Vec<u32> = row
                .iter()
                .map(|&r| {
                    seen += r.min(1);
                    seen.saturating_sub(1)
                })
                .collect();
            pos[row.len().saturating_sub(s)..].to_vec()
        })
        .collect();
    Tensor::from_vec(rows, (m.len(), s), mask.device())
}

/// The additive `[b, 1, s, past + s]` mask: 0 where query i may attend key j (causal and key
/// not padding), `f32::MIN` elsewhere (not -inf, so that fully padded rows stay finite).
fn attention_mask(
    pad: Option<&Tensor>,
    b: usize,
    s: usize,
    past: usize,
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let t = past + s;
    let keys: Option<Vec<Vec<u32>>> = match pad {
        Some(m) => {
            let (mb, mt) = m.dims2()?;
            if mb != b || mt != t {
                candle_core::bail!("attention mask is [{mb}, {mt}], expected [{b}, {t}] (batch, past + new tokens)");
            }
            let m: Vec<Vec<u32>> = m.to_dtype(DType::U32)?.to_vec2()?;
            if m.iter().all(|r| r.iter().all(|&x| x != 0)) {
                None
            } else {
                Some(m)
            }
        }
        None => None,
    };
    if s == 1 && keys.is_none() {
        return Ok(None);
    }
    let mut data = vec![0f32; b * s * t];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                let causal = j <= past + i;
                let real = keys.as_ref().is_none_or(|k| k[bi][j] != 0);
                if !(causal && real) {
                    data[(bi * s + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(data, (b, 1, s, t), dev)?))
}
