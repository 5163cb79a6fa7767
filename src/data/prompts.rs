//! Prompt sets and task items from benchmark files as they are distributed: prompt-only JSONL
//! or JSON rows, CSV or TSV files with any header, and plain text, one prompt per line.
//!
//! A prompt is found in each record ([`load_prompts`]):
//!
//! 1. with a column (`--prompt-column NAME`): that column's value, a string (or, in JSON, a
//!    message list); a record without it is an error listing the columns it has;
//! 2. else, a record of one of the training shapes ([`load_rows`](super::load_rows)) gives its
//!    prompt;
//! 3. else the first of [`PROMPT_KEYS`] the record has, each compared exactly and then
//!    ignoring case: `prompt` (XSTest, most JSONL), `goal` (AdvBench; JailbreakBench's `Goal`,
//!    ahead of its `Behavior`, a short name), `instruction` (Alpaca-style, with
//!    `input` appended after a blank line when not empty), `question`, `Behavior` (HarmBench),
//!    `forbidden_prompt` (StrongREJECT), a `messages`/`conversations` list whose trailing
//!    assistant turn, if any, is dropped, or `turns` (SORRY-Bench, MT-Bench: a list of user
//!    turns, of which the first is taken: a later turn answers a reply, so it is no prompt on
//!    its own).
//!
//! A CSV or TSV file of one column whose first line is not a recognised name but reads as a sentence
//! (four words or more, as in HEx-PHI's `category_N.csv`) has no header: every line, the first
//! included, is a prompt. Rows can be filtered first ([`load_prompts_where`], `realign eval
//! --where`, see [`RowFilter`]).
//!
//! A HarmBench contextual behaviour (a non-empty `ContextString` beside the `Behavior` column)
//! becomes `"{ContextString}\n\n---\n\n{Behavior}"`, the prompt HarmBench's own direct-request
//! baseline builds. A `.txt` file is one prompt per line (blank lines skipped), and a JSON
//! string in place of a row object is a prompt (`["first", "second"]`). When no prompt
//! is found, the error names the file, the record, the keys or columns the record has and the
//! flag that picks one.
//!
//! Task items ([`load_task_items`]) add a gold answer: the `label` column when named
//! (`--label-column NAME`), else the response of a training-shaped row, else the first of
//! [`LABEL_KEYS`]. Files are JSONL, JSON, CSV, Parquet or `.txt` (see
//! [`detect_format`](super::detect_format)).

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::formats::{
    json_type, list_value, messages_of, parse_value, read_records, Cells, Records,
};
use super::select::{accepts_all, RowFilter};
use super::{DataError, FileFormat, Location, Prompt, Row};
use crate::tokenizer::ChatMessage;

/// The keys (JSON) or columns (CSV) a prompt is read from when none is named, in this order.
pub const PROMPT_KEYS: &[&str] = &[
    "prompt",
    "goal",
    "instruction",
    "question",
    "Behavior",
    "forbidden_prompt",
    "messages",
    "conversations",
    "turns",
];

/// The keys or columns a task's gold answer is read from when none is named and the row is not
/// a training shape, in this order.
pub const LABEL_KEYS: &[&str] = &["answer", "label", "gold", "target_label"];

/// The prompts of a data source: `embedded:NAME` (the set's prompts; `column` is not used) or
/// a file (JSONL, JSON, CSV, `.txt`) read as this module's documentation says.
///
/// Errors: those of `read_records` (unreadable file, bad JSON or CSV, no rows), and
/// [`DataError::Row`] for a record without a prompt (naming the keys or columns found and
/// `--prompt-column`) or whose prompt is not a non-empty string.
pub fn load_prompts(spec: &str, column: Option<&str>) -> crate::Result<Vec<Prompt>> {
    load_prompts_where(spec, column, &[])
}

/// [`load_prompts`] of the rows that pass every filter (see [`RowFilter`]); embedded sets, like
/// `column`, ignore the filters.
///
/// Errors: as [`load_prompts`]; a row without a filter's key ([`DataError::Row`], naming the
/// keys it has), a `.txt` file or headerless CSV with filters (their rows have no keys), and a
/// file of which no row passes ([`DataError::Format`]).
pub fn load_prompts_where(
    spec: &str,
    column: Option<&str>,
    filters: &[RowFilter],
) -> crate::Result<Vec<Prompt>> {
    if spec.starts_with("embedded:") {
        return Ok(super::load_source(spec)?
            .iter()
            .map(|r| r.prompt().clone())
            .collect());
    }
    let path = Path::new(spec);
    let mut records = read_records(path)?;
    if column.is_none() {
        if let Some(lines) = headerless_prompts(&records) {
            if !filters.is_empty() {
                return Err(no_keys_to_filter(path, "a headerless one-column CSV"));
            }
            return Ok(lines);
        }
    }
    keep_passing(path, &mut records, filters)?;
    records
        .items
        .iter()
        .map(|(location, value)| {
            prompt_of(value, records.format, column).map_err(|m| row_error(path, *location, m))
        })
        .collect()
}

/// The prompts of a one-column CSV without a header (see the [module documentation](self)):
/// the header's cell and every record's, in file order; `None` when the file is not one.
fn headerless_prompts(records: &Records) -> Option<Vec<Prompt>> {
    if !matches!(records.format, FileFormat::Csv | FileFormat::Tsv) {
        return None;
    }
    // Every CSV record has the header's names as its keys: the first record says it all.
    let Some((_, Json::Object(first))) = records.items.first() else {
        return None;
    };
    let header = first.keys().next().filter(|_| first.len() == 1)?;
    if header.split_whitespace().count() < 4 || find_key(first, PROMPT_KEYS).is_some() {
        return None;
    }
    let cells = records.items.iter().map(|(_, value)| match value {
        Json::Object(obj) => match obj.get(header) {
            Some(Json::String(text)) if !text.trim().is_empty() => Some(Prompt::Text(text.clone())),
            _ => None,
        },
        _ => None,
    });
    std::iter::once(Some(Prompt::Text(header.trim().to_string())))
        .chain(cells)
        .collect()
}

/// Drops the records that fail a filter; a record the filters cannot read is an error, and so
/// is a file of which no record passes.
fn keep_passing(path: &Path, records: &mut Records, filters: &[RowFilter]) -> crate::Result<()> {
    if filters.is_empty() {
        return Ok(());
    }
    if records.format == FileFormat::Text {
        return Err(no_keys_to_filter(path, "a .txt file"));
    }
    let total = records.items.len();
    let mut kept = Vec::with_capacity(total);
    for (location, value) in std::mem::take(&mut records.items) {
        let Json::Object(obj) = &value else {
            return Err(no_keys_to_filter(path, "a list of strings"));
        };
        if accepts_all(filters, obj).map_err(|m| row_error(path, location, m))? {
            kept.push((location, value));
        }
    }
    if kept.is_empty() {
        let shown: Vec<String> = filters.iter().map(ToString::to_string).collect();
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "none of its {total} rows passes --where {}",
                shown.join(" --where ")
            ),
        }
        .into());
    }
    records.items = kept;
    Ok(())
}

fn no_keys_to_filter(path: &Path, what: &str) -> crate::Error {
    DataError::Format {
        path: path.to_path_buf(),
        message: format!("{what} has no columns or keys for --where to filter on"),
    }
    .into()
}

/// The `(prompt, gold answer)` items of a task source: `embedded:NAME` (its prompt/response
/// rows) or a file. The prompt is read as by [`load_prompts`]; the gold answer from
/// `label_column` when given (a string, a number or a boolean, as text), else from the
/// response of a training-shaped row (`{prompt, completion}`, Alpaca, chat), else from the
/// first of [`LABEL_KEYS`] the record has.
///
/// Errors: as [`load_prompts`]; a record without a gold answer names the keys or columns it has
/// and `--label-column`; a `.txt` file has no answers.
pub fn load_task_items(
    spec: &str,
    prompt_column: Option<&str>,
    label_column: Option<&str>,
) -> crate::Result<Vec<(String, String)>> {
    load_task_items_where(spec, prompt_column, label_column, &[])
}

/// [`load_task_items`] of the rows that pass every filter (see [`RowFilter`] and
/// [`load_prompts_where`]).
pub fn load_task_items_where(
    spec: &str,
    prompt_column: Option<&str>,
    label_column: Option<&str>,
    filters: &[RowFilter],
) -> crate::Result<Vec<(String, String)>> {
    if spec.starts_with("embedded:") {
        return super::load_source(spec)?
            .into_iter()
            .enumerate()
            .map(|(i, row)| match row {
                Row::Sft { prompt, response } => Ok((prompt.plain_text(), response)),
                other => Err(DataError::Row {
                    path: spec.into(),
                    location: Location::Index(i),
                    message: format!(
                        "task rows need a prompt and a gold response, got a {} row",
                        other.kind()
                    ),
                }
                .into()),
            })
            .collect();
    }
    let path = Path::new(spec);
    let mut records = read_records(path)?;
    if records.format == FileFormat::Text {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: "a .txt file holds prompts only; a task needs a gold answer per prompt \
                      (use CSV or JSONL with --label-column)"
                .into(),
        }
        .into());
    }
    keep_passing(path, &mut records, filters)?;
    let cells = cells_of(records.format);
    records
        .items
        .iter()
        .map(|(location, value)| {
            let err = |m: String| row_error(path, *location, m);
            let prompt = prompt_of(value, records.format, prompt_column).map_err(err)?;
            let gold = gold_of(value, cells, prompt_column, label_column).map_err(err)?;
            Ok((prompt.plain_text(), gold))
        })
        .collect()
}

fn cells_of(format: FileFormat) -> Cells {
    if matches!(format, FileFormat::Csv | FileFormat::Tsv) {
        Cells::Csv
    } else {
        Cells::Json
    }
}

fn row_error(path: &Path, location: Location, message: String) -> crate::Error {
    DataError::Row {
        path: path.to_path_buf(),
        location,
        message,
    }
    .into()
}

/// What a record calls its fields, for messages: (one, several).
fn field_word(cells: Cells) -> (&'static str, &'static str) {
    match cells {
        Cells::Csv => ("column", "columns"),
        Cells::Json => ("key", "keys"),
    }
}

fn keys_of(obj: &Map<String, Json>) -> String {
    obj.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The prompt of one record (see the [module documentation](self)); the error is the message.
fn prompt_of(value: &Json, format: FileFormat, column: Option<&str>) -> Result<Prompt, String> {
    if let Json::String(text) = value {
        // a `.txt` line, or a JSON string standing for a whole row (`["p1", "p2"]`)
        if text.trim().is_empty() {
            return Err("empty prompt".into());
        }
        return Ok(Prompt::Text(text.clone()));
    }
    let cells = cells_of(format);
    let Json::Object(obj) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_type(value)
        ));
    };
    let (one, word) = field_word(cells);
    if let Some(name) = column {
        if !obj.contains_key(name) {
            return Err(format!(
                "no {one} `{name}` (the record's {word}: [{}]); --prompt-column names one of them",
                keys_of(obj)
            ));
        }
        return prompt_from(obj, name, cells);
    }
    if let Ok(row) = parse_value(value, cells) {
        return Ok(row.prompt().clone());
    }
    match find_key(obj, PROMPT_KEYS) {
        Some(key) => prompt_from(obj, key, cells),
        None => Err(format!(
            "no prompt found in {word} [{}]: pick the prompt with --prompt-column NAME \
             (recognised without it: {})",
            keys_of(obj),
            PROMPT_KEYS.join(", ")
        )),
    }
}

/// The first of `keys` that `obj` has with a non-null value, each spelt exactly or else
/// ignoring case (JailbreakBench's `Goal` is its prompt, ahead of its `Behavior`, a short
/// name); the record's own spelling is returned.
fn find_key<'a>(obj: &'a Map<String, Json>, keys: &[&str]) -> Option<&'a str> {
    let present = |k: &&String| obj.get(*k).is_some_and(|v| !v.is_null());
    keys.iter()
        .find_map(|want| {
            obj.keys()
                .filter(present)
                .find(|k| k.as_str() == *want)
                .or_else(|| {
                    obj.keys()
                        .filter(present)
                        .find(|k| k.eq_ignore_ascii_case(want))
                })
        })
        .map(String::as_str)
}

/// The prompt in `obj[key]`: a string, or a message list (trailing assistant turn dropped).
fn prompt_from(obj: &Map<String, Json>, key: &str, cells: Cells) -> Result<Prompt, String> {
    if key.eq_ignore_ascii_case("turns") {
        return first_turn(obj.get(key), cells);
    }
    if let Some(list) = list_value(obj.get(key), cells) {
        let mut messages: Vec<ChatMessage> = messages_of(&list, key)?;
        if messages.last().is_some_and(|m| m.role == "assistant") {
            messages.pop();
        }
        if messages.is_empty() {
            return Err(format!(
                "`{key}`: no message before the assistant's response"
            ));
        }
        return Ok(Prompt::Messages(messages));
    }
    let text = match obj.get(key) {
        Some(Json::String(s)) => s.clone(),
        other => {
            return Err(format!(
                "`{key}` must be a string, found {}",
                other.map_or("nothing", json_type)
            ))
        }
    };
    if text.trim().is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    let extra = |k: &str| match find_key(obj, &[k]).and_then(|k| obj.get(k)) {
        Some(Json::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    };
    let text = if key.eq_ignore_ascii_case("instruction") {
        match extra("input") {
            Some(input) => format!("{text}\n\n{input}"),
            None => text,
        }
    } else if key.eq_ignore_ascii_case("behavior") {
        match extra("ContextString") {
            Some(context) => format!("{context}\n\n---\n\n{text}"),
            None => text,
        }
    } else {
        text
    };
    Ok(Prompt::Text(text))
}

/// The first of a `turns` list of user turns (SORRY-Bench, MT-Bench): a JSON list of strings,
/// or in a CSV cell its JSON text.
fn first_turn(value: Option<&Json>, cells: Cells) -> Result<Prompt, String> {
    let parsed;
    let list = match value {
        Some(Json::Array(a)) => a,
        Some(Json::String(s)) if cells == Cells::Csv => match serde_json::from_str(s) {
            Ok(Json::Array(a)) => {
                parsed = a;
                &parsed
            }
            _ => return Err("`turns` must be a list of strings (the user turns)".into()),
        },
        other => {
            return Err(format!(
                "`turns` must be a list of strings (the user turns), found {}",
                other.map_or("nothing", json_type)
            ))
        }
    };
    match list.first() {
        Some(Json::String(s)) if !s.trim().is_empty() => Ok(Prompt::Text(s.clone())),
        Some(Json::String(_)) => Err("`turns`[0] is empty".into()),
        Some(other) => Err(format!(
            "`turns`[0] must be a string, found {}",
            json_type(other)
        )),
        None => Err("`turns` is an empty list".into()),
    }
}

/// The gold answer of one task record (see [`load_task_items`]).
fn gold_of(
    value: &Json,
    cells: Cells,
    prompt_column: Option<&str>,
    label_column: Option<&str>,
) -> Result<String, String> {
    let Json::Object(obj) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_type(value)
        ));
    };
    let (one, word) = field_word(cells);
    let key = match label_column {
        Some(name) if obj.contains_key(name) => name,
        Some(name) => {
            return Err(format!(
                "no {one} `{name}` (the record's {word}: [{}]); --label-column names one of them",
                keys_of(obj)
            ))
        }
        None => {
            if prompt_column.is_none() {
                if let Ok(Row::Sft { response, .. }) = parse_value(value, cells) {
                    return Ok(response);
                }
            }
            find_key(obj, LABEL_KEYS).ok_or_else(|| {
                format!(
                    "no gold answer found in {word} [{}]: pick it with --label-column NAME \
                     (recognised without it: {}, or a response of a training row)",
                    keys_of(obj),
                    LABEL_KEYS.join(", ")
                )
            })?
        }
    };
    let gold = match obj.get(key) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        Some(Json::Bool(b)) => b.to_string(),
        other => {
            return Err(format!(
                "`{key}` must be a string, a number or a boolean, found {}",
                other.map_or("nothing", json_type)
            ))
        }
    };
    if gold.trim().is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    Ok(gold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Json, column: Option<&str>) -> Result<Prompt, String> {
        prompt_of(&v, FileFormat::Jsonl, column)
    }

    fn text(s: &str) -> Prompt {
        Prompt::Text(s.into())
    }

    #[test]
    fn prompt_only_keys() {
        assert_eq!(p(json!({"prompt": "A"}), None).unwrap(), text("A"));
        assert_eq!(
            p(json!({"goal": "G", "target": "Sure"}), None).unwrap(),
            text("G")
        );
        assert_eq!(p(json!({"question": "Q"}), None).unwrap(), text("Q"));
        assert_eq!(
            p(json!({"instruction": "I", "input": "x"}), None).unwrap(),
            text("I\n\nx")
        );
        assert_eq!(
            p(json!({"Behavior": "B", "ContextString": ""}), None).unwrap(),
            text("B")
        );
        assert_eq!(
            p(json!({"Behavior": "B", "ContextString": "C"}), None).unwrap(),
            text("C\n\n---\n\nB")
        );
        assert_eq!(
            p(json!({"category": "c", "forbidden_prompt": "F"}), None).unwrap(),
            text("F")
        );
        // Case-insensitive fallback keeps the record's spelling.
        assert_eq!(p(json!({"Goal": "G"}), None).unwrap(), text("G"));
        // Priority: `prompt` before `question`.
        assert_eq!(
            p(json!({"question": "Q", "prompt": "P"}), None).unwrap(),
            text("P")
        );
        // A conversation ending on a user turn is a prompt.
        assert_eq!(
            p(
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                None
            )
            .unwrap(),
            Prompt::Messages(vec![ChatMessage::user("hi")])
        );
        // A training row gives its prompt.
        assert_eq!(
            p(json!({"prompt": "P", "completion": "C"}), None).unwrap(),
            text("P")
        );
    }

    #[test]
    fn named_column_wins_and_missing_ones_are_listed() {
        assert_eq!(
            p(json!({"prompt": "P", "text": "T"}), Some("text")).unwrap(),
            text("T")
        );
        let e = p(json!({"a": "1", "b": "2"}), Some("c")).unwrap_err();
        assert_eq!(
            e,
            "no key `c` (the record's keys: [a, b]); --prompt-column names one of them"
        );
        let e = p(json!({"text": "x", "id": 3}), None).unwrap_err();
        assert_eq!(
            e,
            "no prompt found in keys [id, text]: pick the prompt with --prompt-column NAME \
             (recognised without it: prompt, goal, instruction, question, Behavior, \
             forbidden_prompt, messages, conversations, turns)"
        );
        let e = p(json!({"prompt": 3}), None).unwrap_err();
        assert_eq!(e, "`prompt` must be a string, found a number");
    }

    #[test]
    fn gold_answers() {
        let g = |v: Json, l: Option<&str>| gold_of(&v, Cells::Json, None, l);
        assert_eq!(
            g(json!({"question": "Q", "answer": "42"}), None).unwrap(),
            "42"
        );
        assert_eq!(g(json!({"text": "Q", "label": 1}), None).unwrap(), "1");
        assert_eq!(
            g(json!({"prompt": "Q", "completion": "A"}), None).unwrap(),
            "A"
        );
        assert_eq!(g(json!({"t": "Q", "y": true}), Some("y")).unwrap(), "true");
        let e = g(json!({"t": "Q"}), None).unwrap_err();
        assert!(
            e.starts_with("no gold answer found in keys [t]: pick it with --label-column NAME"),
            "{e}"
        );
    }
}
