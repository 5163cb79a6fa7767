//! Fine-tuning accuracy (FA): how well the model still does the task it was fine-tuned on.
//!
//! - **GSM8K**: the reply's answer is the number after the final-answer marker (`####`, else
//!   `answer is` as in "The answer is 18"), else the last number of the reply; thousands
//!   separators are dropped and the value is compared with the gold number within `1e-6`
//!   ([`gsm8k_answer`], [`gsm8k_correct`]).
//! - **Classification** (SST-2, AG News, …): the authors' rule counts a reply correct when the
//!   gold label word occurs in it ([`label_substring_correct`]); the strict rule requires the
//!   first label word of the reply to be the gold one ([`label_first_correct`]), so a reply that
//!   lists every label is not rewarded.

use super::harmfulness::percent;
use super::replies::{chat_replies, EvalConfig};
use super::EvalError;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Default reply length for GSM8K, in new tokens (room for the chain of thought).
pub const GSM8K_MAX_NEW_TOKENS: usize = 256;

/// Default reply length for classification tasks, in new tokens.
pub const CLASSIFICATION_MAX_NEW_TOKENS: usize = 64;

/// The most distinct gold answers [`TaskKind::detect`] takes for classification labels.
pub const MAX_DETECTED_LABELS: usize = 20;

/// Largest difference at which two GSM8K answers are equal.
pub const GSM8K_TOLERANCE: f64 = 1e-6;

/// The numbers of `text` with the byte offset where each starts (its sign included).
///
/// A number is a run of ASCII digits, optionally grouped by thousands separators (`1,234,567`:
/// a comma counts only when exactly three digits follow it, so `3,4` is two numbers), with an
/// optional decimal part (`3.5`; the period in `18.` ends a sentence). A `-` or `−` right before
/// it makes it negative unless a letter or digit precedes the sign (`5-3` holds 5 and 3).
fn numbers(text: &str) -> Vec<(usize, f64)> {
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i;
        while digit(j) {
            j += 1;
        }
        if j - start <= 3 {
            while b.get(j) == Some(&b',') && (1..=3).all(|k| digit(j + k)) && !digit(j + 4) {
                j += 4;
            }
        }
        if b.get(j) == Some(&b'.') && digit(j + 1) {
            j += 1;
            while digit(j) {
                j += 1;
            }
        }
        let mut value: f64 = match text[start..j].replace(',', "").parse() {
            Ok(v) => v,
            Err(_) => {
                i = j;
                continue;
            }
        };
        let mut begin = start;
        let mut before = text[..start].chars().rev();
        if let Some(sign @ ('-' | '\u{2212}')) = before.next() {
            if !before.next().is_some_and(char::is_alphanumeric) {
                value = -value;
                begin = start - sign.len_utf8();
            }
        }
        out.push((begin, value));
        i = j;
    }
    out
}

/// The final answer of a GSM8K-style solution `text`: the first number after the first `####`
/// that is followed by one, else the first number after the first `answer is`
/// (case-insensitive: "The answer is", "the final answer is") followed by one, else the last
/// number of the text; `None` when it has no number. Commas between thousands are dropped
/// (`"#### 1,234"` → 1234).
///
/// The first marker wins over later ones because a model that keeps generating after its
/// answer tends to invent further questions with answers of their own.
pub fn gsm8k_answer(text: &str) -> Option<f64> {
    let nums = numbers(text);
    let lower = text.to_ascii_lowercase();
    for marker in ["####", "answer is"] {
        for (pos, _) in lower.match_indices(marker) {
            let after = pos + marker.len();
            if let Some(&(_, v)) = nums.iter().find(|(s, _)| *s >= after) {
                return Some(v);
            }
        }
    }
    nums.last().map(|&(_, v)| v)
}

/// Whether the answer of `reply` ([`gsm8k_answer`]) equals the gold answer within
/// [`GSM8K_TOLERANCE`]. `gold` may be a bare number (`"18"`, `"1,234"`) or a whole reference
/// solution ending in `#### 18`. False when either has no number.
pub fn gsm8k_correct(reply: &str, gold: &str) -> bool {
    match (gsm8k_answer(reply), gsm8k_answer(gold)) {
        (Some(a), Some(g)) => (a - g).abs() <= GSM8K_TOLERANCE,
        _ => false,
    }
}

/// The authors' classification rule: the gold label occurs in `reply` as a substring, ignoring
/// case (the reference code accepts both `positive` and `Positive`). An empty gold label never
/// matches.
pub fn label_substring_correct(reply: &str, gold: &str) -> bool {
    let gold = gold.trim().to_lowercase();
    !gold.is_empty() && reply.to_lowercase().contains(&gold)
}

/// The index in `labels` of the label that occurs first in `reply` as a whole word (ignoring
/// case; no letter or digit right before or after it, so `positive` does not match inside
/// `positively`). On a tie the longer label wins; empty labels are ignored.
pub fn first_label<S: AsRef<str>>(reply: &str, labels: &[S]) -> Option<usize> {
    let text = reply.to_lowercase();
    let mut best: Option<(usize, usize, usize)> = None; // (start, length, index)
    for (idx, label) in labels.iter().enumerate() {
        let label = label.as_ref().trim().to_lowercase();
        if label.is_empty() {
            continue;
        }
        let found = text.match_indices(&label).map(|(s, _)| s).find(|&s| {
            let before = text[..s].chars().next_back();
            let after = text[s + label.len()..].chars().next();
            !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
        });
        if let Some(s) = found {
            let better = match best {
                None => true,
                Some((bs, blen, _)) => s < bs || (s == bs && label.len() > blen),
            };
            if better {
                best = Some((s, label.len(), idx));
            }
        }
    }
    best.map(|(_, _, idx)| idx)
}

/// The strict classification rule: the first label of `reply` ([`first_label`]) is `gold`
/// (compared ignoring case and surrounding whitespace).
pub fn label_first_correct<S: AsRef<str>>(reply: &str, gold: &str, labels: &[S]) -> bool {
    first_label(reply, labels).is_some_and(|i| same_label(labels[i].as_ref(), gold))
}

fn same_label(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// The kind of task an accuracy is measured on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum TaskKind {
    /// Grade-school math: numeric answers.
    Gsm8k,
    /// Classification into label words (e.g. `positive`/`negative`).
    Classification {
        /// The label words; every gold answer must be one of them.
        labels: Vec<String>,
    },
}

impl TaskKind {
    /// `gsm8k` or `classification`.
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Gsm8k => "gsm8k",
            TaskKind::Classification { .. } => "classification",
        }
    }

    /// The kind of a task from its gold answers, when nobody said: GSM8K when every gold
    /// holds a number ([`gsm8k_answer`]); else classification when the distinct golds
    /// (compared ignoring case and surrounding whitespace) number 2 to
    /// [`MAX_DETECTED_LABELS`] and each is at most three words, with those golds as the labels
    /// in order of first appearance; else an [`EvalError::Config`] asking for the labels.
    pub fn detect<S: AsRef<str>>(golds: &[S]) -> Result<Self, EvalError> {
        if golds.iter().all(|g| gsm8k_answer(g.as_ref()).is_some()) {
            return Ok(TaskKind::Gsm8k);
        }
        let mut labels: Vec<String> = Vec::new();
        for g in golds {
            let g = g.as_ref().trim();
            if !labels.iter().any(|l| same_label(l, g)) {
                labels.push(g.to_string());
            }
        }
        let short = labels
            .iter()
            .all(|l| !l.is_empty() && l.split_whitespace().count() <= 3);
        if short && (2..=MAX_DETECTED_LABELS).contains(&labels.len()) {
            Ok(TaskKind::Classification { labels })
        } else {
            Err(EvalError::Config(format!(
                "cannot tell the task kind from its {} gold answers (not all numbers, and not 2 to \
                 {MAX_DETECTED_LABELS} short labels): give the labels explicitly",
                golds.len()
            )))
        }
    }

    /// The reply length used when [`EvalConfig::max_new_tokens`] is unset.
    pub fn default_max_new_tokens(&self) -> usize {
        match self {
            TaskKind::Gsm8k => GSM8K_MAX_NEW_TOKENS,
            TaskKind::Classification { .. } => CLASSIFICATION_MAX_NEW_TOKENS,
        }
    }

    /// Checks that `gold` is usable: a number for GSM8K, one of the labels for classification.
    /// `index` names the item in the error.
    pub fn check_gold(&self, index: usize, gold: &str) -> Result<(), EvalError> {
        match self {
            TaskKind::Gsm8k if gsm8k_answer(gold).is_none() => Err(EvalError::BadGold {
                index,
                gold: gold.into(),
            }),
            TaskKind::Classification { labels } if labels.iter().all(|l| l.trim().is_empty()) => {
                Err(EvalError::Config(
                    "classification needs at least one label".into(),
                ))
            }
            TaskKind::Classification { labels } if !labels.iter().any(|l| same_label(l, gold)) => {
                Err(EvalError::UnknownLabel {
                    index,
                    gold: gold.into(),
                    labels: labels.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// One judged item of an accuracy evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ItemResult {
    /// The prompt.
    pub prompt: String,
    /// The gold answer.
    pub gold: String,
    /// The model's reply.
    pub reply: String,
    /// What was read from the reply: the GSM8K number, or the first label word.
    pub extracted: Option<String>,
    /// Correct by the main rule (GSM8K numeric equality; classification label substring).
    pub correct: bool,
    /// Correct by the strict first-label rule (classification only).
    pub strict_correct: Option<bool>,
}

impl ItemResult {
    /// Judges `reply` against `gold` for a task of `kind`.
    pub fn judge(kind: &TaskKind, prompt: &str, gold: &str, reply: &str) -> Self {
        let (extracted, correct, strict_correct) = match kind {
            TaskKind::Gsm8k => (
                gsm8k_answer(reply).map(|v| v.to_string()),
                gsm8k_correct(reply, gold),
                None,
            ),
            TaskKind::Classification { labels } => (
                first_label(reply, labels).map(|i| labels[i].clone()),
                label_substring_correct(reply, gold),
                Some(label_first_correct(reply, gold, labels)),
            ),
        };
        Self {
            prompt: prompt.into(),
            gold: gold.into(),
            reply: reply.into(),
            extracted,
            correct,
            strict_correct,
        }
    }
}

/// The outcome of [`task_accuracy`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AccuracyReport {
    /// [`TaskKind::name`].
    pub task: String,
    /// Items evaluated.
    pub n: usize,
    /// Items correct by the main rule.
    pub correct: usize,
    /// `100 · correct / n`; 0 when there are no items.
    pub accuracy_percent: f64,
    /// Items correct by the strict first-label rule (classification only).
    pub strict_correct: Option<usize>,
    /// `100 · strict_correct / n` (classification only).
    pub strict_accuracy_percent: Option<f64>,
    /// Every item, in the order given.
    pub per_item: Vec<ItemResult>,
}

impl AccuracyReport {
    /// A report from judged items.
    pub fn from_items(kind: &TaskKind, per_item: Vec<ItemResult>) -> Self {
        let n = per_item.len();
        let correct = per_item.iter().filter(|r| r.correct).count();
        let strict_correct = match kind {
            TaskKind::Gsm8k => None,
            TaskKind::Classification { .. } => Some(
                per_item
                    .iter()
                    .filter(|r| r.strict_correct == Some(true))
                    .count(),
            ),
        };
        Self {
            task: kind.name().into(),
            n,
            correct,
            accuracy_percent: percent(correct, n),
            strict_correct,
            strict_accuracy_percent: strict_correct.map(|k| percent(k, n)),
            per_item,
        }
    }
}

/// The accuracy of `model` on `items` (`(prompt, gold)` pairs): each prompt is rendered with
/// the chat template and answered greedily (`cfg.max_new_tokens`, default
/// [`TaskKind::default_max_new_tokens`]: 256 for GSM8K, 64 for classification; see
/// [`chat_replies`]), then judged with [`ItemResult::judge`].
///
/// Every gold answer is checked before anything is generated ([`TaskKind::check_gold`]): a
/// GSM8K gold without a number, or a classification gold that is not one of the labels, is an
/// [`EvalError`] naming the item.
pub fn task_accuracy(
    model: &Model,
    tok: &Tokenizer,
    items: &[(String, String)],
    kind: &TaskKind,
    cfg: &EvalConfig,
) -> crate::Result<AccuracyReport> {
    for (i, (_, gold)) in items.iter().enumerate() {
        kind.check_gold(i, gold)?;
    }
    let prompts: Vec<String> = items.iter().map(|(p, _)| p.clone()).collect();
    let max_new = cfg.max_new_tokens_or(kind.default_max_new_tokens());
    let replies = chat_replies(model, tok, &prompts, max_new, cfg, kind.name())?;
    let per_item = items
        .iter()
        .zip(&replies)
        .map(|((p, g), r)| ItemResult::judge(kind, p, g, r))
        .collect();
    Ok(AccuracyReport::from_items(kind, per_item))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_marker_with_thousands() {
        assert_eq!(
            gsm8k_answer("She pays 1,000 + 234.\n#### 1,234"),
            Some(1234.0)
        );
        assert_eq!(gsm8k_answer("#### 1,234,567"), Some(1_234_567.0));
    }

    #[test]
    fn gsm8k_answer_is_marker() {
        assert_eq!(
            gsm8k_answer("6 + 12 = 18 apples, so the answer is 18."),
            Some(18.0)
        );
        assert_eq!(
            gsm8k_answer("The answer is $18. Next question: 4 + 4 = 8"),
            Some(18.0)
        );
        assert_eq!(gsm8k_answer("The final answer is: 7"), Some(7.0));
    }

    #[test]
    fn gsm8k_marker_order() {
        // `####` wins over `answer is`; the first marker followed by a number wins.
        assert_eq!(gsm8k_answer("the answer is 3\n#### 4"), Some(4.0));
        assert_eq!(
            gsm8k_answer("#### 5\n\nQuestion: 2 + 2?\n#### 4"),
            Some(5.0)
        );
        // A marker with no number after it falls back to the others, then the last number.
        assert_eq!(gsm8k_answer("3 and 4, answer is ####"), Some(4.0));
    }

    #[test]
    fn gsm8k_last_number_and_signs() {
        assert_eq!(gsm8k_answer("-3.5 apples"), Some(-3.5));
        assert_eq!(gsm8k_answer("It drops to \u{2212}2 degrees"), Some(-2.0));
        assert_eq!(gsm8k_answer("5-3 = 2"), Some(2.0));
        assert_eq!(gsm8k_answer("10 - 3"), Some(3.0));
        assert_eq!(gsm8k_answer("from 12 to 15"), Some(15.0));
        assert_eq!(gsm8k_answer("#### -7"), Some(-7.0));
    }

    #[test]
    fn gsm8k_no_number() {
        assert_eq!(gsm8k_answer("I don't know."), None);
        assert_eq!(gsm8k_answer(""), None);
        assert_eq!(gsm8k_answer("####"), None);
    }

    #[test]
    fn gsm8k_commas_only_between_thousands() {
        assert_eq!(gsm8k_answer("3,4"), Some(4.0));
        assert_eq!(gsm8k_answer("1,2345"), Some(2345.0));
        assert_eq!(gsm8k_answer("1,234.50 dollars"), Some(1234.5));
        assert_eq!(gsm8k_answer("It is 18."), Some(18.0));
    }

    #[test]
    fn gsm8k_correctness() {
        assert!(gsm8k_correct("so the answer is 18.", "18"));
        assert!(gsm8k_correct("#### 1,234", "1234"));
        assert!(gsm8k_correct("#### 1234.0000001", "1,234"));
        assert!(gsm8k_correct(
            "... #### 72",
            "Natalia sold 48/2 = 24 ... 48+24 = 72\n#### 72"
        ));
        assert!(!gsm8k_correct("#### 1235", "1234"));
        assert!(!gsm8k_correct("no idea", "18"));
        assert!(!gsm8k_correct("18", "unknown"));
    }

    #[test]
    fn label_substring_rule() {
        assert!(label_substring_correct("Positive", "positive"));
        assert!(label_substring_correct(
            "The sentiment is positive.",
            "positive"
        ));
        // The authors' rule rewards a reply that names every label.
        assert!(label_substring_correct("positive or negative", "negative"));
        assert!(!label_substring_correct("negative", "positive"));
        assert!(!label_substring_correct("anything", " "));
    }

    #[test]
    fn label_first_rule() {
        let labels = ["positive", "negative"];
        assert!(label_first_correct("Negative.", "negative", &labels));
        assert!(!label_first_correct(
            "positive or negative",
            "negative",
            &labels
        ));
        assert!(label_first_correct(
            "Not positively sure, but negative overall; positive words too",
            "negative",
            &labels
        ));
        assert!(!label_first_correct("no label here", "positive", &labels));
        let news = ["World", "Sports", "Business", "Sci/Tech"];
        assert_eq!(
            first_label("Category: sci/tech (not sports)", &news),
            Some(3)
        );
        assert!(label_first_correct("Sci/Tech", "sci/tech", &news));
        // Ties go to the longer label.
        assert_eq!(
            first_label("very negative", &["very negative", "very"]),
            Some(0)
        );
    }

    #[test]
    fn item_and_report() {
        let kind = TaskKind::Classification {
            labels: vec!["positive".into(), "negative".into()],
        };
        let items = vec![
            ItemResult::judge(&kind, "p1", "positive", "positive"),
            ItemResult::judge(&kind, "p2", "negative", "positive, not negative"),
            ItemResult::judge(&kind, "p3", "negative", "I like it"),
        ];
        assert_eq!(items[1].extracted.as_deref(), Some("positive"));
        let r = AccuracyReport::from_items(&kind, items);
        assert_eq!((r.n, r.correct, r.strict_correct), (3, 2, Some(1)));
        assert!((r.accuracy_percent - 200.0 / 3.0).abs() < 1e-9);
        let g = ItemResult::judge(&TaskKind::Gsm8k, "q", "18", "so the answer is 18.");
        assert_eq!((g.extracted.as_deref(), g.correct), (Some("18"), true));
        assert_eq!(g.strict_correct, None);
    }

    #[test]
    fn detect_kind() {
        assert_eq!(
            TaskKind::detect(&["18", "#### 1,234", "x = 3"]).unwrap(),
            TaskKind::Gsm8k
        );
        assert_eq!(
            TaskKind::detect(&["positive", " Negative", "negative", "positive"]).unwrap(),
            TaskKind::Classification {
                labels: vec!["positive".into(), "Negative".into()]
            }
        );
        assert!(TaskKind::detect(&["positive", "positive"]).is_err());
        assert!(TaskKind::detect(&["a long free-form reference answer", "b"]).is_err());
    }

    #[test]
    fn brief_accuracy_rules() {
        // Both labels present: the substring rule counts it, the strict rule does not.
        let labels = ["positive", "negative"];
        let both = "It is positive, or maybe negative.";
        assert!(label_substring_correct(both, "negative"));
        assert!(!label_first_correct(both, "negative", &labels));
        // Thousands separators, no number, negative and decimal numbers.
        assert!(gsm8k_correct("The total is 1,234 dollars.", "1234"));
        assert_eq!(gsm8k_answer("no idea at all"), None);
        assert!(!gsm8k_correct("no idea at all", "0"));
        assert!(gsm8k_correct("It ends at -5 degrees", "-5"));
        assert!(gsm8k_correct("Each costs 2.50, so 7.5", "7.5"));
        // The marker wins over the last number.
        assert_eq!(gsm8k_answer("#### 42\nThen 7 more questions"), Some(42.0));
        assert!(gsm8k_correct("#### 42 and later 43", "42"));
        assert_eq!(gsm8k_answer("3 + 4 = 7, then 9"), Some(9.0));
    }

    #[test]
    fn gold_checks() {
        let kind = TaskKind::Classification {
            labels: vec!["positive".into(), "negative".into()],
        };
        assert!(kind.check_gold(0, "Positive").is_ok());
        assert!(matches!(
            kind.check_gold(3, "neutral"),
            Err(EvalError::UnknownLabel { index: 3, .. })
        ));
        let none = TaskKind::Classification { labels: vec![] };
        assert!(matches!(none.check_gold(0, "x"), Err(EvalError::Config(_))));
        assert!(TaskKind::Gsm8k.check_gold(0, "#### 5").is_ok());
        assert!(matches!(
            TaskKind::Gsm8k.check_gold(1, "five"),
            Err(EvalError::BadGold { index: 1, .. })
        ));
    }
}
