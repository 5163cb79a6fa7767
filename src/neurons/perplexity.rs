//! Perplexity on held-out general text, reported beside the harmfulness score in the
//! deactivation check (issue 12): a model that no longer writes language produces no refusal,
//! and the keyword judge would count that as harmful. A variant whose perplexity is more than
//! [`BROKEN_FACTOR`] times the untouched model's is reported as broken.
//!
//! `PPL = exp( Σ_texts Σ_t −log p(x_{t+1} | x_{≤t}) / Σ_texts (len − 1) )`: every text is
//! encoded as plain text (the tokenizer's special tokens added, no chat template), truncated
//! to `max_tokens`, and every token after the first is predicted.
//!
//! **Intervals.** The texts are the sample: with `y_i` the summed negative log-likelihood of
//! text `i`, `x_i` its predicted tokens and `n` texts, the mean NLL `R = Σy / Σx` is a ratio
//! estimator, whose standard error by the delta method is
//! `SE(R) = sqrt( Σ (y_i − R x_i)² / (n (n − 1)) ) / x̄` (Cochran, *Sampling Techniques*,
//! 3rd ed., eq. 6.9 without the finite-population factor). The 95 % interval of the
//! perplexity is `exp(R ± z SE)`, `z` = [`Z_95`]. Two models measured on the same texts
//! compare by the ratio of their perplexities, `exp(R_a − R_b)`, whose interval uses the
//! paired residuals `d_i = (y_ai − R_a x_i) − (y_bi − R_b x_i)` in the same formula
//! ([`PerplexityReport::ratio_to`]): the texts' own difficulty cancels, so the ratio's interval
//! is much narrower than either perplexity's.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use super::NeuronError;
use crate::eval::stats::Z_95;
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
    /// The 95 % interval of `perplexity` over the texts (module docs); `None` with fewer than
    /// two texts.
    pub interval: Option<[f64; 2]>,
    /// Each text's summed negative log-likelihood (nats) and predicted tokens, in order: what
    /// the intervals are computed from.
    #[serde(skip)]
    pub per_text: Vec<(f64, usize)>,
}

/// The ratio of two perplexities measured on the same texts, with its paired 95 % interval
/// ([`PerplexityReport::ratio_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerplexityRatio {
    /// `perplexity / reference perplexity`.
    pub ratio: f64,
    /// Its 95 % interval; `None` with fewer than two texts.
    pub interval: Option<[f64; 2]>,
}

/// `exp(centre ± z · SE)` with `SE = sqrt(Σ residual² / (n (n − 1))) / x̄` (module docs).
fn log_interval(centre: f64, residuals: &[f64], mean_tokens: f64) -> Option<[f64; 2]> {
    let n = residuals.len();
    if n < 2 || mean_tokens <= 0.0 {
        return None;
    }
    let ss: f64 = residuals.iter().map(|r| r * r).sum();
    let se = (ss / (n as f64 * (n as f64 - 1.0))).sqrt() / mean_tokens;
    Some([(centre - Z_95 * se).exp(), (centre + Z_95 * se).exp()])
}

impl PerplexityReport {
    /// A report from each text's summed NLL (nats) and predicted tokens; `None` when no text
    /// predicted a token.
    pub fn from_texts(per_text: Vec<(f64, usize)>) -> Option<Self> {
        let tokens: usize = per_text.iter().map(|t| t.1).sum();
        if tokens == 0 {
            return None;
        }
        let nll: f64 = per_text.iter().map(|t| t.0).sum();
        let mean_nll = nll / tokens as f64;
        let residuals: Vec<f64> = per_text
            .iter()
            .map(|&(y, x)| y - mean_nll * x as f64)
            .collect();
        let mean_tokens = tokens as f64 / per_text.len() as f64;
        Some(PerplexityReport {
            texts: per_text.len(),
            tokens,
            mean_nll,
            perplexity: mean_nll.exp(),
            interval: log_interval(mean_nll, &residuals, mean_tokens),
            per_text,
        })
    }

    /// This perplexity over `reference`'s, both measured on the same texts, with the paired
    /// interval of the module docs. The interval is `None` when the two were not measured on
    /// texts of the same token counts (then they are not paired) or on fewer than two.
    pub fn ratio_to(&self, reference: &PerplexityReport) -> PerplexityRatio {
        let ratio = self.perplexity / reference.perplexity;
        let paired = self.per_text.len() == reference.per_text.len()
            && self
                .per_text
                .iter()
                .zip(&reference.per_text)
                .all(|(a, b)| a.1 == b.1);
        let interval = paired
            .then(|| {
                let d: Vec<f64> = self
                    .per_text
                    .iter()
                    .zip(&reference.per_text)
                    .map(|(&(ya, x), &(yb, _))| {
                        (ya - self.mean_nll * x as f64) - (yb - reference.mean_nll * x as f64)
                    })
                    .collect();
                let mean_tokens = self.tokens as f64 / self.texts.max(1) as f64;
                log_interval(self.mean_nll - reference.mean_nll, &d, mean_tokens)
            })
            .flatten();
        PerplexityRatio { ratio, interval }
    }
}

/// The perplexity of `model` on `texts` (each truncated to `max_tokens` tokens; texts of
/// fewer than 2 tokens are skipped). Errors when no text has 2 tokens or on a model failure.
pub fn perplexity(
    model: &Model,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
) -> crate::Result<PerplexityReport> {
    let mut per_text = Vec::with_capacity(texts.len());
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
        let nll = -picked.iter().map(|&x| f64::from(x)).sum::<f64>();
        per_text.push((nll, s - 1));
    }
    PerplexityReport::from_texts(per_text).ok_or_else(|| {
        NeuronError::Invalid(format!(
            "perplexity: none of the {} texts has 2 tokens",
            texts.len()
        ))
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three texts by hand: y = (20, 33, 10) nats over x = (10, 15, 4) tokens.
    /// R = 63 / 29 = 2.172414; residuals y − R x = (−1.724138, 0.413793, 1.310345);
    /// Σ r² = 4.860285; SE = sqrt(4.860285 / 6) / (29 / 3) = 0.093107;
    /// exp(R ± 1.959964 · SE) = (7.314933, 10.537177); exp(R) = 8.779450.
    #[test]
    fn the_interval_is_the_ratio_estimators_by_hand() {
        let r = PerplexityReport::from_texts(vec![(20.0, 10), (33.0, 15), (10.0, 4)]).unwrap();
        assert_eq!((r.texts, r.tokens), (3, 29));
        assert!((r.mean_nll - 63.0 / 29.0).abs() < 1e-12);
        assert!((r.perplexity - 8.779450261518386).abs() < 1e-9);
        let [lo, hi] = r.interval.unwrap();
        assert!((lo - 7.314932957881805).abs() < 1e-9, "{lo}");
        assert!((hi - 10.537177488608872).abs() < 1e-9, "{hi}");
    }

    /// The same texts under a second model, y = (18, 30, 9): R_b = 57 / 29; the paired
    /// residuals d = (r_a − r_b) give exp(R_a − R_b) = 1.229855 in (1.208405, 1.251686),
    /// far narrower than either perplexity's own interval.
    #[test]
    fn the_paired_ratio_interval_by_hand() {
        let a = PerplexityReport::from_texts(vec![(20.0, 10), (33.0, 15), (10.0, 4)]).unwrap();
        let b = PerplexityReport::from_texts(vec![(18.0, 10), (30.0, 15), (9.0, 4)]).unwrap();
        let q = a.ratio_to(&b);
        assert!((q.ratio - 1.2298553387854922).abs() < 1e-9);
        let [lo, hi] = q.interval.unwrap();
        assert!((lo - 1.2084052819144078).abs() < 1e-9, "{lo}");
        assert!((hi - 1.2516861494869838).abs() < 1e-9, "{hi}");
        // A model against itself: ratio 1, an interval of width 0.
        let same = a.ratio_to(&a);
        assert_eq!(same.ratio, 1.0);
        assert_eq!(same.interval, Some([1.0, 1.0]));
        // Texts of other token counts are not paired: no interval.
        let c = PerplexityReport::from_texts(vec![(20.0, 11), (33.0, 15), (10.0, 4)]).unwrap();
        assert_eq!(a.ratio_to(&c).interval, None);
    }

    #[test]
    fn one_text_has_no_interval_and_no_tokens_no_report() {
        let r = PerplexityReport::from_texts(vec![(5.0, 5)]).unwrap();
        assert_eq!(r.perplexity, 1f64.exp());
        assert_eq!(r.interval, None);
        assert!(PerplexityReport::from_texts(vec![]).is_none());
        assert!(PerplexityReport::from_texts(vec![(0.0, 0)]).is_none());
    }
}
