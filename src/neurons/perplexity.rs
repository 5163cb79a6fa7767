//! Perplexity on held-out general text, reported beside the harmfulness score in the
//! deactivation check (issue 12): a model that no longer writes language produces no refusal,
//! and the keyword judge would count that as harmful. A variant whose perplexity is more than
//! [`BROKEN_FACTOR`] times the untouched model's is reported as broken.
//!
//! `PPL = exp( Σ_texts Σ_t −log p(x_{t+1} | x_{≤t}) / Σ_texts (len − 1) )`: every text is
//! encoded as plain text (the tokenizer's special tokens added, no chat template), truncated
//! to `max_tokens`, and every token after the first is predicted.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use super::NeuronError;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A variant with perplexity above this multiple of the untouched model's is "broken".
pub const BROKEN_FACTOR: f64 = 2.0;

/// What [`perplexity`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerplexityReport {
    /// Texts used.
    pub texts: usize,
    /// Tokens predicted (the first token of each text is not).
    pub tokens: usize,
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
}

/// The perplexity of `model` on `texts` (each truncated to `max_tokens` tokens; texts of
/// fewer than 2 tokens are skipped). Errors when no text has 2 tokens or on a model failure.
pub fn perplexity(
    model: &Model,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
) -> crate::Result<PerplexityReport> {
    let (mut nll, mut tokens, mut used) = (0f64, 0usize, 0usize);
    for text in texts {
        let mut ids = tok.encode(text, true)?;
        ids.truncate(max_tokens);
        if ids.len() < 2 {
            continue;
        }
        let s = ids.len();
        let input = Tensor::from_vec(ids.clone(), (1, s), model.device())?;
        let logits = model.forward(&input)?.to_dtype(DType::F32)?.squeeze(0)?;
        let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, s - 1)?, D::Minus1)?;
        let targets = Tensor::from_vec(ids[1..].to_vec(), (s - 1, 1), model.device())?;
        let picked: Vec<f32> = logp.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
        nll -= picked.iter().map(|&x| f64::from(x)).sum::<f64>();
        tokens += s - 1;
        used += 1;
    }
    if tokens == 0 {
        return Err(NeuronError::Invalid(format!(
            "perplexity: none of the {} texts has 2 tokens",
            texts.len()
        ))
        .into());
    }
    let mean_nll = nll / tokens as f64;
    Ok(PerplexityReport {
        texts: used,
        tokens,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}
