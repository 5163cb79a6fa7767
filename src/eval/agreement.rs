//! Agreement of a judge with human labels on binary verdicts: the confusion matrix, accuracy,
//! precision and recall of the positive class (each a [`Rate`] with its 95 % Wilson interval),
//! and Cohen's κ with a 95 % interval.
//!
//! Cohen's κ (Cohen 1960, "A coefficient of agreement for nominal scales", Educational and
//! Psychological Measurement 20(1)) corrects the observed agreement `p_o` for the agreement
//! `p_e` two raters with the same marginals would reach by chance:
//!
//! `κ = (p_o − p_e) / (1 − p_e)`, `p_e = p_judge+ · p_human+ + p_judge− · p_human−`.
//!
//! Its standard error is Cohen's (1960, Eq. 9) large-sample approximation
//! `se(κ) = sqrt(p_o (1 − p_o) / (n (1 − p_e)²))`, and the interval is `κ ± 1.96 · se`, clamped
//! into `[−1, 1]`. (The approximation is rough for small `n` or extreme marginals; with
//! `n` in the hundreds, as here, it is the usual reported interval.) κ is undefined when
//! `p_e = 1` (both raters always give the same single answer); it is then `None`.
//!
//! Landis & Koch's (1977) reading is customary: κ ≤ 0.2 slight, 0.2–0.4 fair, 0.4–0.6
//! moderate, 0.6–0.8 substantial, above 0.8 almost perfect agreement.

use super::stats::{Rate, Z_95};

/// Counts of (judge, human) verdict pairs; "positive" is the class a set is about (refused,
/// harmful, fulfilled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Confusion {
    /// Judge positive, human positive.
    pub tp: usize,
    /// Judge positive, human negative.
    pub fp: usize,
    /// Judge negative, human positive.
    #[serde(rename = "fn")]
    pub fn_: usize,
    /// Judge negative, human negative.
    pub tn: usize,
}

impl Confusion {
    /// Counts `(judge, human)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut c = Confusion::default();
        for (judge, human) in pairs {
            c.add(judge, human);
        }
        c
    }

    /// Counts one `(judge, human)` pair.
    pub fn add(&mut self, judge: bool, human: bool) {
        match (judge, human) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, true) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    /// All pairs counted.
    pub fn n(&self) -> usize {
        self.tp + self.fp + self.fn_ + self.tn
    }
}

/// Cohen's κ with its standard error and 95 % interval (see the [module documentation](self)).
/// The fields are `None` where κ is undefined (`n = 0` or `p_e = 1`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Kappa {
    /// κ.
    pub value: Option<f64>,
    /// Cohen's (1960) large-sample standard error.
    pub se: Option<f64>,
    /// Lower bound of the 95 % interval, `κ − 1.96 · se`, at least −1.
    pub lo: Option<f64>,
    /// Upper bound of the 95 % interval, `κ + 1.96 · se`, at most 1.
    pub hi: Option<f64>,
    /// Pairs counted.
    pub n: usize,
}

/// Cohen's κ of a confusion matrix, with Cohen's standard error and the 95 % interval.
pub fn cohen_kappa(c: &Confusion) -> Kappa {
    let n = c.n();
    let undefined = Kappa {
        value: None,
        se: None,
        lo: None,
        hi: None,
        n,
    };
    if n == 0 {
        return undefined;
    }
    let nf = n as f64;
    let po = (c.tp + c.tn) as f64 / nf;
    let judge_pos = (c.tp + c.fp) as f64 / nf;
    let human_pos = (c.tp + c.fn_) as f64 / nf;
    let pe = judge_pos * human_pos + (1.0 - judge_pos) * (1.0 - human_pos);
    if 1.0 - pe <= f64::EPSILON {
        return undefined;
    }
    let kappa = (po - pe) / (1.0 - pe);
    let se = (po * (1.0 - po) / (nf * (1.0 - pe) * (1.0 - pe))).sqrt();
    Kappa {
        value: Some(kappa),
        se: Some(se),
        lo: Some((kappa - Z_95 * se).max(-1.0)),
        hi: Some((kappa + Z_95 * se).min(1.0)),
        n,
    }
}

/// A judge's agreement with human labels on one set (or one category of it).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    /// Pairs compared.
    pub n: usize,
    /// The confusion matrix.
    pub confusion: Confusion,
    /// Share of pairs where judge and human agree: `(tp + tn) / n`.
    pub accuracy: Rate,
    /// Of the judge's positives, the share the humans call positive: `tp / (tp + fp)`.
    pub precision: Rate,
    /// Of the humans' positives, the share the judge finds: `tp / (tp + fn)`.
    pub recall: Rate,
    /// Cohen's κ.
    pub kappa: Kappa,
}

impl Agreement {
    /// The statistics of a confusion matrix.
    pub fn new(confusion: Confusion) -> Self {
        let c = confusion;
        Agreement {
            n: c.n(),
            confusion: c,
            accuracy: Rate::new(c.tp + c.tn, c.n()),
            precision: Rate::new(c.tp, c.tp + c.fp),
            recall: Rate::new(c.tp, c.tp + c.fn_),
            kappa: cohen_kappa(&c),
        }
    }

    /// The statistics of `(judge, human)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        Agreement::new(Confusion::from_pairs(pairs))
    }
}

/// `0.40 [0.15, 0.65]`, or `n/a` when κ is undefined.
pub fn format_kappa(k: &Kappa) -> String {
    match (k.value, k.lo, k.hi) {
        // `+ 0.0` turns a negative zero into 0 (no "-0.00").
        (Some(v), Some(lo), Some(hi)) => {
            format!("{:.2} [{:.2}, {:.2}]", v + 0.0, lo + 0.0, hi + 0.0)
        }
        _ => "n/a".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    /// tp 20, fp 5, fn 10, tn 15 (n = 50), by hand:
    /// p_o = 35/50 = 0.7; judge+ = 25/50, human+ = 30/50, p_e = 0.5·0.6 + 0.5·0.4 = 0.5;
    /// κ = (0.7 − 0.5) / 0.5 = 0.4; se = sqrt(0.7·0.3 / (50·0.25)) = sqrt(0.0168) = 0.1296148;
    /// interval 0.4 ± 1.959964·0.1296148 = [0.1459596, 0.6540404]. Accuracy 35/50, precision
    /// 20/25 = 0.8, recall 20/30; their Wilson intervals from the closed form.
    #[test]
    fn hand_computed_confusion() {
        let c = Confusion {
            tp: 20,
            fp: 5,
            fn_: 10,
            tn: 15,
        };
        let a = Agreement::new(c);
        assert_eq!(a.n, 50);
        let k = a.kappa;
        assert!(close(k.value.unwrap(), 0.4), "{k:?}");
        assert!(close(k.se.unwrap(), 0.129614814), "{k:?}");
        assert!(close(k.lo.unwrap(), 0.145959633), "{k:?}");
        assert!(close(k.hi.unwrap(), 0.654040367), "{k:?}");
        assert_eq!((a.accuracy.k, a.accuracy.n), (35, 50));
        assert!(close(a.accuracy.percent, 70.0));
        assert!(close(a.accuracy.lo, 56.2496495) && close(a.accuracy.hi, 80.8964465));
        assert_eq!((a.precision.k, a.precision.n), (20, 25));
        assert!(close(a.precision.lo, 60.8690496) && close(a.precision.hi, 91.1394153));
        assert_eq!((a.recall.k, a.recall.n), (20, 30));
        assert!(close(a.recall.lo, 48.7800516) && close(a.recall.hi, 80.7695019));
        assert_eq!(format_kappa(&k), "0.40 [0.15, 0.65]");
    }

    /// tp 3, fp 1, fn 2, tn 4: p_o = 0.7, p_e = 0.4·0.5 + 0.6·0.5 = 0.5, κ = 0.4,
    /// se = sqrt(0.21 / 2.5) = 0.2898275, interval [−0.1680515, 0.9680515].
    #[test]
    fn small_matrix_from_pairs() {
        let pairs = [
            (true, true),
            (true, true),
            (true, true),
            (true, false),
            (false, true),
            (false, true),
            (false, false),
            (false, false),
            (false, false),
            (false, false),
        ];
        let a = Agreement::from_pairs(pairs);
        assert_eq!(
            a.confusion,
            Confusion {
                tp: 3,
                fp: 1,
                fn_: 2,
                tn: 4
            }
        );
        assert!(close(a.kappa.value.unwrap(), 0.4));
        assert!(close(a.kappa.se.unwrap(), 0.289827535));
        assert!(close(a.kappa.lo.unwrap(), -0.168051530));
        assert!(close(a.kappa.hi.unwrap(), 0.968051530));
    }

    #[test]
    fn perfect_inverse_and_undefined() {
        let perfect = cohen_kappa(&Confusion {
            tp: 4,
            fp: 0,
            fn_: 0,
            tn: 6,
        });
        assert_eq!(perfect.value, Some(1.0));
        assert_eq!((perfect.lo, perfect.hi), (Some(1.0), Some(1.0)));
        // Always disagreeing with balanced marginals: κ = −1.
        let inverse = cohen_kappa(&Confusion {
            tp: 0,
            fp: 5,
            fn_: 5,
            tn: 0,
        });
        assert!(close(inverse.value.unwrap(), -1.0));
        assert_eq!(inverse.lo, Some(-1.0));
        // Both raters always positive: p_e = 1, κ undefined.
        let constant = cohen_kappa(&Confusion {
            tp: 7,
            ..Default::default()
        });
        assert_eq!(constant.value, None);
        assert_eq!(format_kappa(&constant), "n/a");
        assert_eq!(cohen_kappa(&Confusion::default()).n, 0);
        // A judge that is always negative against mixed labels: κ = 0 exactly.
        let blind = cohen_kappa(&Confusion {
            tp: 0,
            fp: 0,
            fn_: 3,
            tn: 7,
        });
        assert!(close(blind.value.unwrap(), 0.0));
        // Precision of a judge with no positives: 0 of 0, interval [0, 100].
        let a = Agreement::new(Confusion {
            fn_: 3,
            tn: 7,
            ..Default::default()
        });
        assert_eq!(
            (a.precision.n, a.precision.lo, a.precision.hi),
            (0, 0.0, 100.0)
        );
        let json = serde_json::to_value(a.confusion).unwrap();
        assert_eq!(json["fn"], 3);
    }
}
