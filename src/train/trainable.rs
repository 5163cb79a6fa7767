//! LoRA parameters as trainable variables: from an existing adapter (continue training) or
//! freshly initialised as peft does (A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
//! 1/sqrt(in)); B zeros, so the adapter starts as a no-op). The base model stays frozen.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::adapters::{keys, Adapter, LoraConfig, LoraModule, LoraPart};
use crate::model::{AdapterMode, Model};

/// One module's trainable factors.
#[derive(Debug, Clone)]
pub struct TrainableModule {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    /// `alpha / r` (or rsLoRA's `alpha / sqrt(r)`).
    pub scale: f64,
}

/// The trainable adapter.
#[derive(Debug, Clone)]
pub struct TrainableLora {
    /// Its PEFT config.
    pub config: LoraConfig,
    /// Factors by module path.
    pub modules: BTreeMap<String, TrainableModule>,
}

impl TrainableLora {
    /// Trainable copies of an adapter's tensors.
    pub fn from_adapter(adapter: &Adapter) -> candle_core::Result<Self> {
        let modules = adapter
            .modules
            .iter()
            .map(|(n, m)| {
                let a = Var::from_tensor(&m.a.to_dtype(DType::F32)?)?;
                let b = Var::from_tensor(&m.b.to_dtype(DType::F32)?)?;
                Ok((
                    n.clone(),
                    TrainableModule {
                        a,
                        b,
                        scale: m.scale,
                    },
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config: adapter.config.clone(),
            modules,
        })
    }

    /// A new adapter on every linear module of `model` that `config` targets, seeded.
    pub fn init(model: &Model, config: LoraConfig, seed: u64) -> candle_core::Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut modules = BTreeMap::new();
        for lin in model.linears() {
            if !config.targets(&lin.name) {
                continue;
            }
            let (out, inp) = lin.shape();
            let r = config.rank_for(&lin.name);
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp).map(|_| rng.gen_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), model.device())?)?;
            let b = Var::zeros((out, r), DType::F32, model.device())?;
            modules.insert(
                lin.name.clone(),
                TrainableModule {
                    a,
                    b,
                    scale: config.scaling_for(&lin.name),
                },
            );
        }
        Ok(Self { config, modules })
    }

    /// Every variable, named as peft names the parameters
    /// (`model.layers.0.self_attn.q_proj.lora_A.default.weight`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .flat_map(|(n, m)| {
                [
                    (keys::parameter_name(n, LoraPart::A, "default"), m.a.clone()),
                    (keys::parameter_name(n, LoraPart::B, "default"), m.b.clone()),
                ]
            })
            .collect()
    }

    /// The current values as a plain adapter (shares nothing with the variables).
    pub fn to_adapter(&self) -> candle_core::Result<Adapter> {
        let modules = self
            .modules
            .iter()
            .map(|(n, m)| {
                // Detached first: a snapshot outside any graph (a forward pass through it
                // records nothing and keeps no activations alive).
                let a = m.a.as_tensor().detach().copy()?;
                let b = m.b.as_tensor().detach().copy()?;
                Ok((
                    n.clone(),
                    LoraModule {
                        a,
                        b,
                        scale: m.scale,
                    },
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Adapter {
            config: self.config.clone(),
            modules,
            source: None,
        })
    }

    /// Attaches the variables to `model` (unmerged, after any adapter already attached), so
    /// that a forward pass builds a graph through them. Optimizer steps update them in place.
    pub fn attach(&self, model: &mut Model) -> crate::Result<()> {
        let view = Adapter {
            config: self.config.clone(),
            modules: self
                .modules
                .iter()
                .map(|(n, m)| {
                    (
                        n.clone(),
                        LoraModule {
                            a: m.a.as_tensor().clone(),
                            b: m.b.as_tensor().clone(),
                            scale: m.scale,
                        },
                    )
                })
                .collect(),
            source: None,
        };
        model.apply_adapter(&view, AdapterMode::Unmerged)
    }
}
