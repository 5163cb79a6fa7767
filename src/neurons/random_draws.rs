//! Deact-SN against several draws of the random control (issue 12).
//!
//! One random set of the same structure is one sample of what zeroing *any* such set does.
//! On a lightly aligned small model that spread is wide: on SmolLM2-135M + `W_a`, single
//! `Deact-R` draws for sets of ~1,500 neurons raised HS anywhere from −12 to +53 points, so
//! one draw cannot tell a safety set from a lucky perturbation. With K draws the check places
//! Deact-SN within the control's distribution and gives the one-sided Monte Carlo p-value
//! `(1 + #{draws with HS ≥ Deact-SN's}) / (K + 1)` (Davison & Hinkley 1997, §4.2; North,
//! Curtis & Sham 2002): the probability, under "the set is as good as a random one of its
//! structure", of a draw at least as harmful. Its smallest value is `1 / (K + 1)`, so a claim
//! at 5 % needs K ≥ 19 draws.

use super::deactivate::{Variant, VariantResult};
use crate::eval::Rate;

/// Which harmfulness rate a [`RandomComparison`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HsMetric {
    /// Keyword-harmful replies ([`VariantResult::harmful_rate`]).
    Keyword,
    /// Keyword-harmful replies that are not degenerate
    /// ([`VariantResult::nondegenerate_rate`]).
    NonDegenerate,
}

impl HsMetric {
    fn rate(self, r: &VariantResult) -> Option<&Rate> {
        match self {
            HsMetric::Keyword => r.harmful_rate.as_ref(),
            HsMetric::NonDegenerate => r.nondegenerate_rate.as_ref(),
        }
    }

    /// `HS keyword` or `HS non-degenerate`.
    pub fn label(self) -> &'static str {
        match self {
            HsMetric::Keyword => "HS keyword",
            HsMetric::NonDegenerate => "HS non-degenerate",
        }
    }
}

/// Deact-SN's harmfulness placed among the random control's draws.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RandomComparison {
    /// The rate compared.
    pub metric: HsMetric,
    /// Deact-SN's rate, in percent.
    pub deact_sn: f64,
    /// The untouched model's rate, in percent, when it was measured.
    pub untouched: Option<f64>,
    /// Each draw's rate, in percent, in seed order.
    pub draws: Vec<f64>,
    /// Each draw's seed.
    pub seeds: Vec<u64>,
    /// Draws whose model was broken (perplexity over the limit): their HS reads gibberish.
    pub broken_draws: usize,
    /// Mean of the draws.
    pub mean: f64,
    /// Smallest draw.
    pub min: f64,
    /// Largest draw.
    pub max: f64,
    /// Draws at least as harmful as Deact-SN.
    pub at_least_as_high: usize,
    /// One-sided Monte Carlo p-value `(1 + at_least_as_high) / (K + 1)`.
    pub p_value: f64,
}

/// One draw of the random control: its seed, its rate and whether its model was broken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// The seed of the random set.
    pub seed: u64,
    /// The rate measured with it zeroed.
    pub rate: Rate,
    /// Perplexity over the limit: the HS reads gibberish.
    pub broken: bool,
}

/// Places Deact-SN's `sn` rate among the `draws` (ties count as "at least as high"; rates of
/// the same `n` are compared by their counts). `None` without draws.
pub fn compare_rates(
    metric: HsMetric,
    sn: &Rate,
    untouched: Option<&Rate>,
    draws: &[Draw],
) -> Option<RandomComparison> {
    if draws.is_empty() {
        return None;
    }
    let values: Vec<f64> = draws.iter().map(|d| d.rate.percent).collect();
    let at_least_as_high = draws.iter().filter(|d| d.rate.k >= sn.k).count();
    let k = values.len();
    Some(RandomComparison {
        metric,
        deact_sn: sn.percent,
        untouched: untouched.map(|u| u.percent),
        seeds: draws.iter().map(|d| d.seed).collect(),
        broken_draws: draws.iter().filter(|d| d.broken).count(),
        mean: values.iter().sum::<f64>() / k as f64,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        at_least_as_high,
        p_value: (1 + at_least_as_high) as f64 / (k + 1) as f64,
        draws: values,
    })
}

/// Compares Deact-SN with every `Deact-R` draw of `results`, for the keyword and the
/// non-degenerate HS; empty when either is missing or HS was not measured.
pub fn compare_with_random(results: &[VariantResult]) -> Vec<RandomComparison> {
    let Some(sn) = results.iter().find(|r| r.variant == Variant::DeactSn) else {
        return Vec::new();
    };
    let untouched = results.iter().find(|r| r.variant == Variant::None);
    [HsMetric::Keyword, HsMetric::NonDegenerate]
        .into_iter()
        .filter_map(|metric| {
            let draws: Vec<Draw> = results
                .iter()
                .filter(|r| r.variant == Variant::DeactR)
                .map(|r| {
                    metric.rate(r).map(|&rate| Draw {
                        seed: r.seed.unwrap_or(0),
                        rate,
                        broken: r.broken,
                    })
                })
                .collect::<Option<_>>()?;
            compare_rates(
                metric,
                metric.rate(sn)?,
                untouched.and_then(|u| metric.rate(u)),
                &draws,
            )
        })
        .collect()
}

impl RandomComparison {
    /// One line for a report: Deact-SN, the draws' mean and range, and the p-value.
    pub fn sentence(&self) -> String {
        let k = self.draws.len();
        format!(
            "{}: Deact-SN {:.1}{} against {k} random draw{} of the same structure (mean {:.1}, \
             range {:.1}–{:.1}{}); {} of {k} at least as high: one-sided p = {:.3} \
             (the smallest possible with {k} draws is {:.3})",
            self.metric.label(),
            self.deact_sn,
            self.untouched
                .map_or(String::new(), |u| format!(" (untouched {u:.1})")),
            if k == 1 { "" } else { "s" },
            self.mean,
            self.min,
            self.max,
            if self.broken_draws > 0 {
                format!(", {} broken", self.broken_draws)
            } else {
                String::new()
            },
            self.at_least_as_high,
            self.p_value,
            1.0 / (k + 1) as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(variant: Variant, seed: Option<u64>, k: usize, nondeg: usize) -> VariantResult {
        VariantResult {
            variant,
            seed,
            neurons: 10,
            deactivation: None,
            harmfulness: None,
            accuracy: None,
            harmful_rate: Some(Rate::new(k, 64)),
            nondegenerate_rate: Some(Rate::new(nondeg, 64)),
            perplexity: None,
            perplexity_ratio: None,
            perplexity_ratio_interval: None,
            broken: false,
        }
    }

    #[test]
    fn places_deact_sn_among_the_draws() {
        // Deact-SN 40 of 64; draws 6, 48, 40, 20: two of four at least as high (ties count).
        let mut results = vec![
            row(Variant::None, None, 14, 14),
            row(Variant::DeactSn, None, 40, 30),
        ];
        for (i, k) in [6, 48, 40, 20].into_iter().enumerate() {
            results.push(row(Variant::DeactR, Some(42 + i as u64), k, k / 2));
        }
        results[3].broken = true;
        let c = compare_with_random(&results);
        assert_eq!(c.len(), 2);
        let kw = &c[0];
        assert_eq!(kw.metric, HsMetric::Keyword);
        assert_eq!(kw.deact_sn, 62.5);
        assert_eq!(kw.untouched, Some(21.875));
        assert_eq!(kw.seeds, vec![42, 43, 44, 45]);
        assert_eq!(kw.draws, vec![9.375, 75.0, 62.5, 31.25]);
        assert_eq!(kw.at_least_as_high, 2);
        assert_eq!(kw.p_value, 3.0 / 5.0);
        assert_eq!(kw.broken_draws, 1);
        assert_eq!((kw.min, kw.max), (9.375, 75.0));
        assert!((kw.mean - 44.53125).abs() < 1e-12);
        // Non-degenerate: 30 against 3, 24, 20, 10: none as high, p = 1/5.
        let nd = &c[1];
        assert_eq!(nd.at_least_as_high, 0);
        assert_eq!(nd.p_value, 0.2);
        assert!(kw
            .sentence()
            .contains("2 of 4 at least as high: one-sided p = 0.600"));
    }

    #[test]
    fn nothing_to_compare_without_both_sides() {
        let only_sn = vec![row(Variant::DeactSn, None, 40, 30)];
        assert!(compare_with_random(&only_sn).is_empty());
        let only_r = vec![row(Variant::DeactR, Some(1), 40, 30)];
        assert!(compare_with_random(&only_r).is_empty());
    }
}
