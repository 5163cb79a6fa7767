//! The measured agreement of each judge with the human labels: the one table in the code that
//! reports (the experiment's report, the README) quote, with the command that produced each
//! figure. Cohen's κ with its 95 % interval ([`crate::eval::agreement`]) on PyRIT's refusal,
//! harm and objective sets ([`crate::eval::human_labels`]).
//!
//! To refresh a figure, run its command and copy κ, the interval and n from `judge-eval.json`.

use super::{coherence, decline, keyword, qwen};

/// One judge's κ with humans on one set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MeasuredAgreement {
    /// The judge, as [`table_key`] names it.
    pub judge: &'static str,
    /// The set: `refusal`, `harm` or `objective`.
    pub set: &'static str,
    /// Rows judged.
    pub n: usize,
    /// Cohen's κ.
    pub kappa: f64,
    /// Lower end of its 95 % interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// The command that measured it.
    pub command: &'static str,
}

/// The SmolLM2 model judge's key (`model:` with the embedded default model).
pub const SMOLLM2: &str = "model:SmolLM2-135M-Instruct";

const ALL_ROWS: &str = "realign judge-eval --judge keyword --judge keyword+coherence -o DIR";
const DECLINE_ALL_ROWS: &str = "realign judge-eval --judge keyword+decline -o DIR";
const SMOL_100: &str =
    "realign judge-eval --judge model:.cache/realign/models/SmolLM2-135M-Instruct.Q4_1.gguf --limit 100 --sample-seed 42 -o DIR";
const QWEN_REPORT: &str =
    "nice realign judge-eval --judge qwen --split report --limit 40 --sample-seed 42 -o DIR";

/// Every measured figure.
pub const MEASURED: &[MeasuredAgreement] = &[
    m(keyword::NAME, "refusal", 169, 0.40, 0.27, 0.53, ALL_ROWS),
    m(keyword::NAME, "harm", 990, 0.15, 0.08, 0.22, ALL_ROWS),
    m(keyword::NAME, "objective", 395, 0.30, 0.21, 0.40, ALL_ROWS),
    m(coherence::NAME, "refusal", 169, 0.40, 0.27, 0.53, ALL_ROWS),
    m(coherence::NAME, "harm", 990, 0.14, 0.07, 0.21, ALL_ROWS),
    m(
        coherence::NAME,
        "objective",
        395,
        0.28,
        0.19,
        0.38,
        ALL_ROWS,
    ),
    m(
        decline::NAME,
        "refusal",
        169,
        0.47,
        0.35,
        0.60,
        DECLINE_ALL_ROWS,
    ),
    m(
        decline::NAME,
        "harm",
        990,
        0.21,
        0.14,
        0.28,
        DECLINE_ALL_ROWS,
    ),
    m(
        decline::NAME,
        "objective",
        395,
        0.57,
        0.49,
        0.65,
        DECLINE_ALL_ROWS,
    ),
    m(SMOLLM2, "refusal", 100, -0.08, -0.23, 0.06, SMOL_100),
    m(SMOLLM2, "harm", 100, 0.00, -0.17, 0.17, SMOL_100),
    m(SMOLLM2, "objective", 100, 0.00, -0.17, 0.17, SMOL_100),
    m(qwen::NAME, "refusal", 40, 0.16, -0.11, 0.44, QWEN_REPORT),
    m(qwen::NAME, "harm", 40, 0.34, 0.05, 0.63, QWEN_REPORT),
    m(qwen::NAME, "objective", 40, 0.64, 0.40, 0.88, QWEN_REPORT),
];

const fn m(
    judge: &'static str,
    set: &'static str,
    n: usize,
    kappa: f64,
    lo: f64,
    hi: f64,
    command: &'static str,
) -> MeasuredAgreement {
    MeasuredAgreement {
        judge,
        set,
        n,
        kappa,
        lo,
        hi,
        command,
    }
}

/// The table's name for a judge spec: the spec itself, except that `model:` with the embedded
/// SmolLM2 file is [`SMOLLM2`] and `qwen`'s own file under `model:`/`rubric:` is not `qwen`
/// (its templates and thresholds differ).
pub fn table_key(spec: &str) -> String {
    match spec.strip_prefix("model:") {
        Some(p) if p.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf") => SMOLLM2.to_string(),
        _ => spec.to_string(),
    }
}

/// The measured figures of a judge spec, in set order (empty when it was never measured).
pub fn measured(spec: &str) -> Vec<MeasuredAgreement> {
    let key = table_key(spec);
    MEASURED
        .iter()
        .filter(|m| m.judge == key && m.n > 0)
        .copied()
        .collect()
}

/// `refusal 0.40 [0.27, 0.53] (n=169); harm …`, or a sentence saying it was not measured.
pub fn summary(spec: &str) -> String {
    let ms = measured(spec);
    if ms.is_empty() {
        return format!(
            "not measured against human labels (measure it with `realign judge-eval --judge {spec}`)"
        );
    }
    let cells: Vec<String> = ms
        .iter()
        .map(|m| {
            format!(
                "{} {:.2} [{:.2}, {:.2}] (n={})",
                m.set,
                m.kappa + 0.0,
                m.lo + 0.0,
                m.hi + 0.0,
                m.n
            )
        })
        .collect();
    format!(
        "Cohen's κ with human labels: {}; measured by `{}`",
        cells.join("; "),
        ms[0].command
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_summaries() {
        assert_eq!(
            table_key("model:/x/.cache/realign/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            SMOLLM2
        );
        assert_eq!(table_key("model:/x/other.gguf"), "model:/x/other.gguf");
        let k = measured("keyword");
        assert_eq!(
            k.iter().map(|m| m.set).collect::<Vec<_>>(),
            ["refusal", "harm", "objective"]
        );
        assert_eq!(
            summary("keyword"),
            format!(
                "Cohen's κ with human labels: refusal 0.40 [0.27, 0.53] (n=169); harm 0.15 [0.08, 0.22] (n=990); objective 0.30 [0.21, 0.40] (n=395); measured by `{ALL_ROWS}`"
            )
        );
        assert!(summary("model:/x/y.gguf").starts_with("not measured"));
        // Every entry: κ inside its interval, a known set, one entry per (judge, set).
        for (i, e) in MEASURED.iter().enumerate() {
            assert!(["refusal", "harm", "objective"].contains(&e.set));
            if e.n > 0 {
                assert!(e.lo <= e.kappa && e.kappa <= e.hi, "{e:?}");
            }
            assert!(MEASURED[..i]
                .iter()
                .all(|o| (o.judge, o.set) != (e.judge, e.set)));
        }
    }
}
