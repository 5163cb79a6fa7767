//! Counts with their uncertainty: every HS, FA and OR number is reported as a [`Rate`], `k` of
//! `n` with the 95 % Wilson score interval ([`wilson`]), so that two numbers can be told apart
//! from noise (`docs/METHODS.md`, "Metrics").
//!
//! The Wilson interval (Wilson 1927) is the usual choice for a binomial proportion on small
//! samples: unlike the normal ("Wald") interval it never leaves `[0, 1]` and it does not
//! collapse to a point at `k = 0` or `k = n`.

use std::fmt;

/// The 0.975 quantile of the standard normal distribution: the `z` of a two-sided 95 % interval.
pub const Z_95: f64 = 1.959963984540054;

/// The 95 % Wilson score interval of `k` successes in `n` trials, as fractions in `[0, 1]`:
///
/// `(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)` with `p = k/n`, `z` = [`Z_95`].
///
/// `n = 0` (nothing measured) gives `(0, 1)`; `k > n` is clamped to `n`. The bounds are clamped
/// into `[0, 1]` against rounding.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let k = k.min(n);
    let nf = n as f64;
    let p = k as f64 / nf;
    let z2 = Z_95 * Z_95;
    let denom = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denom;
    let half = Z_95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // Exact at the ends (the closed form gives 0 and 1 up to rounding there).
    let lo = if k == 0 { 0.0 } else { centre - half };
    let hi = if k == n { 1.0 } else { centre + half };
    (lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0))
}

/// `k` of `n` as a percentage with its 95 % Wilson interval ([`wilson`]), as written in
/// `summary.json`. `percent`, `lo` and `hi` are in percent (0–100).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    /// Successes (harmful replies, correct answers, refusals).
    pub k: usize,
    /// Trials (prompts or items evaluated).
    pub n: usize,
    /// `100 · k / n`; 0 when `n` is 0 (JSON has no NaN), with the interval then `[0, 100]`.
    pub percent: f64,
    /// Lower bound of the 95 % Wilson interval, in percent.
    pub lo: f64,
    /// Upper bound of the 95 % Wilson interval, in percent.
    pub hi: f64,
}

impl Rate {
    /// The rate of `k` in `n` (`k > n` is clamped to `n`); `n = 0` gives 0 % in `[0, 100]`.
    pub fn new(k: usize, n: usize) -> Self {
        let k = k.min(n);
        let (lo, hi) = wilson(k, n);
        let percent = if n == 0 {
            0.0
        } else {
            100.0 * k as f64 / n as f64
        };
        Rate {
            k,
            n,
            percent,
            lo: 100.0 * lo,
            hi: 100.0 * hi,
        }
    }

    /// Whether the two 95 % intervals intersect (touching counts): when they do, the two rates
    /// are not clearly different.
    pub fn overlaps(&self, other: &Rate) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
}

impl fmt::Display for Rate {
    /// `37.5 [26.7, 49.7] (n=64)`: the percentage, the interval, the sample size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1} [{:.1}, {:.1}] (n={})",
            self.percent, self.lo, self.hi, self.n
        )
    }
}

/// Spearman's rank correlation of `x` and `y`: Pearson's correlation of their ranks, ties
/// given their average rank (Spearman 1904). `None` with fewer than 2 pairs, lengths that
/// differ, or a constant series (its ranks have no variance).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut cov, mut vx, mut vy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        cov += (a - mx) * (b - my);
        vx += (a - mx) * (a - mx);
        vy += (b - my) * (b - my);
    }
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

/// 1-based ranks, ties sharing their average rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-4
    }

    #[test]
    fn known_values() {
        // Values from the closed form, checked independently (Python, z = 1.959963984540054).
        let (lo, hi) = wilson(0, 10);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 0.2775), "{hi}");
        let (lo, hi) = wilson(5, 10);
        assert!(close(lo, 0.2366) && close(hi, 0.7634), "{lo} {hi}");
        let (lo, hi) = wilson(81, 263);
        assert!(close(lo, 0.2553) && close(hi, 0.3662), "{lo} {hi}");
        let (lo, hi) = wilson(10, 10);
        assert!(close(lo, 0.7225) && hi == 1.0, "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn symmetric_and_contains_the_estimate() {
        for n in 1..40 {
            for k in 0..=n {
                let (lo, hi) = wilson(k, n);
                let (lo2, hi2) = wilson(n - k, n);
                assert!(close(lo, 1.0 - hi2) && close(hi, 1.0 - lo2), "{k}/{n}");
                let p = k as f64 / n as f64;
                assert!(
                    (0.0..=p).contains(&lo) && (p..=1.0).contains(&hi),
                    "{k}/{n}"
                );
            }
        }
    }

    #[test]
    fn rate_in_percent() {
        let r = Rate::new(24, 64);
        assert_eq!((r.k, r.n), (24, 64));
        assert!(close(r.percent, 37.5));
        assert!(close(r.lo, 26.66598) && close(r.hi, 49.74962), "{r:?}");
        assert_eq!(r.to_string(), "37.5 [26.7, 49.7] (n=64)");
        let empty = Rate::new(0, 0);
        assert_eq!((empty.percent, empty.lo, empty.hi), (0.0, 0.0, 100.0));
        assert_eq!(Rate::new(5, 3).k, 3);
        let v = serde_json::to_value(empty).unwrap();
        assert_eq!(v["hi"], 100.0);
        let back: Rate = serde_json::from_value(serde_json::to_value(r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn overlap() {
        let a = Rate::new(5, 10);
        let b = Rate::new(6, 10);
        let c = Rate::new(0, 100);
        let d = Rate::new(100, 100);
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!c.overlaps(&d) && !d.overlaps(&c));
        assert!(a.overlaps(&a));
    }

    #[test]
    fn spearman_matches_hand_computed_values() {
        // No ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12);
        // A tie: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5).
        let r = spearman(&[0.1, 0.5, 0.5, 0.9], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - 4.5 / (4.5f64 * 5.0).sqrt()).abs() < 1e-12);
        assert_eq!(spearman(&[3.0, 2.0, 1.0], &[10.0, 20.0, 30.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
    }
}
