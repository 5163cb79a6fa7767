//! # realign
//!
//! Neuron-level safety realignment for fine-tuned language models, in Rust on
//! [candle](https://github.com/huggingface/candle).
//!
//! The crate is laid out like the pipeline it implements:
//!
//! | module | stage |
//! |---|---|
//! | [`model`] | the Llama-family runtime: config, weights (safetensors, GGUF), forward, KV cache, activation capture, generation |
//! | [`tokenizer`] | `tokenizer.json` / GGUF tokenizers and chat templates with transformers' semantics |
//! | [`antidote`] | Antidote (Huang et al. 2024): one-shot Wanda pruning of the fine-tuning update on harmful data |
//! | [`adapters`] | PEFT LoRA adapters: reading, writing, applying (merged or unmerged) |
//! | [`data`] | data files (JSONL, JSON, CSV), the embedded data sets, prompt rendering and masking, the attack mix |
//! | [`diagnose`](mod@diagnose) | `realign diagnose`: the intake check of a fine-tune (safety drift, Safe LoRA's cosine, a verdict) |
//! | [`bench`](mod@bench) | the `realign bench` figures |
//! | [`eval`] | [`eval::evaluate()`]: harmfulness score (GCG refusal keywords or a judge model) and fine-tuning accuracy (GSM8K, labels), every sample kept |
//! | [`experiment`] | `realign experiment`: the whole pipeline as cached stages, the papers' tables and plots |
//! | [`nlsr`] | NLSR: pre-amplification, safety-critical neuron identification, layer similarity, layer pruning, transplant, `realign patch` |
//! | [`neurons`] | safety neurons: the neuron-set file, detection, deactivation, SN-Tune and RSN-Tune |
//! | [`report`] | charts for the commands that draw: line and bar charts as SVG and PNG, with title, axis labels and legend |
//! | [`resta`] | RESTA (Bhardwaj et al. 2024): the safety vector added back, `W_t + γ (W_a − W_base)` |
//! | [`safelora`] | Safe LoRA, the training-free peer: projection onto the alignment subspace |
//! | [`safemerge`] | SafeMERGE (Djuhera et al. 2025): `α W_t + (1 − α) W_a` in the modules whose update left the safety subspace |
//!
//! ```no_run
//! use realign::model::{LoadOptions, LoadedModel};
//! let loaded = LoadedModel::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &LoadOptions::default())?;
//! let prompt = loaded.tokenizer.render_chat(&[realign::tokenizer::ChatMessage::user("Hi")], true)?;
//! # Ok::<(), realign::Error>(())
//! ```
#![deny(missing_docs)]
// No panics on what a caller supplies: library code returns typed errors (tests may unwrap).
// Indexing is not denied (hot numeric loops index checked slices); invariants that could
// panic are documented where they are allowed.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod adapters;
pub mod antidote;
pub mod assets;
pub mod bench;
pub mod data;
pub mod diagnose;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod fsutil;
pub mod host;
pub mod model;
pub mod neurons;
pub mod nlsr;
mod quiet_panic;
pub mod report;
pub mod resta;
pub mod safelora;
pub mod safemerge;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};

/// The README's Rust examples, compiled (not run) as doctests, so the front page cannot drift
/// from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
