//! Reading user data files (JSONL, JSON, CSV) into [`Row`]s, and writing rows as JSONL. The
//! records of a file (before their shape is read) are also what [`super::prompts`] reads
//! prompt-only benchmark files from.

use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::{csv, DataError, Location, Prompt, Row};
use crate::fsutil;
use crate::tokenizer::ChatMessage;

/// The container format of a data file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// JSON Lines (`.jsonl`, `.ndjson`, or a `.json` file that is not a JSON array).
    Jsonl,
    /// A JSON array of objects (`.json`).
    Json,
    /// CSV with a header row (`.csv`), after any leading `# ` comment lines (as PyRIT's data
    /// sets start with `# dataset_version=1.0`).
    Csv,
    /// Tab-separated values with a header row (`.tsv`), read as CSV is but split at tabs.
    Tsv,
    /// Apache Parquet (`.parquet`, as Hugging Face datasets are distributed): each row an
    /// object of its columns, typed as JSON (strings, numbers, booleans, lists); snappy, gzip,
    /// lz4 and zstd compression.
    Parquet,
    /// Plain text, one prompt per line (`.txt`): a prompt set only (see
    /// [`load_prompts`](super::load_prompts)), not training or task data.
    Text,
}

/// The format of `path` from its extension (`.json` files are looked into: an array is
/// [`FileFormat::Json`], anything else is read as JSON Lines, which is what `datasets`'
/// `to_json` writes by default). A last extension `.gz`, `.xz` or `.zst` is a compressed file
/// of the format the extension before it names (`30k_test.jsonl.xz`, as BeaverTails ships;
/// see [`Compression`]); Parquet compresses inside and is not accepted compressed again.
pub fn detect_format(path: &Path) -> crate::Result<FileFormat> {
    let (compression, ext) = layers(path);
    match ext.as_str() {
        "jsonl" | "ndjson" => Ok(FileFormat::Jsonl),
        "csv" => Ok(FileFormat::Csv),
        "tsv" => Ok(FileFormat::Tsv),
        "txt" => Ok(FileFormat::Text),
        "json" => {
            let text = read_text(path)?;
            Ok(json_flavour(&text))
        }
        "parquet" if compression == Compression::None => Ok(FileFormat::Parquet),
        "parquet" => Err(format_error(
            path,
            "a compressed Parquet file: Parquet compresses its pages itself; give the \
             .parquet file",
        )),
        _ => Err(format_error(
            path,
            "unknown data file extension (supported: .jsonl, .ndjson, .json, .csv, .tsv, \
             .parquet, and .txt for prompts; the text formats also compressed, as .gz, .xz or .zst)",
        )),
    }
}

/// How a data file is compressed, from its last extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// gzip (`.gz`; several concatenated members are read as one stream, as `gzip -c a b`
    /// writes them).
    Gzip,
    /// xz (`.xz`, LZMA2).
    Xz,
    /// Zstandard (`.zst`).
    Zstd,
}

/// The compression of `path` and the (lower-case) extension of the format inside it.
fn layers(path: &Path) -> (Compression, String) {
    let ext = |p: &Path| {
        p.extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    let outer = ext(path);
    let compression = match outer.as_str() {
        "gz" => Compression::Gzip,
        "xz" => Compression::Xz,
        "zst" => Compression::Zstd,
        _ => return (Compression::None, outer),
    };
    (compression, ext(&path.with_extension("")))
}

/// The text of a data file, decompressed when its extension says so (see [`Compression`]).
///
/// Errors: the file cannot be read ([`crate::Error::Io`]), its compressed stream is corrupt or
/// its text is not UTF-8 ([`DataError::Format`], naming the codec).
pub fn read_text(path: &Path) -> crate::Result<String> {
    let (compression, _) = layers(path);
    let codec = match compression {
        Compression::None => return fsutil::read_to_string(path),
        Compression::Gzip => "gzip",
        Compression::Xz => "xz",
        Compression::Zstd => "zstd",
    };
    let bytes = fsutil::read(path)?;
    let mut out = Vec::new();
    let result = match compression {
        Compression::Gzip => {
            std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&bytes[..]), &mut out)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        Compression::Xz => {
            lzma_rs::xz_decompress(&mut &bytes[..], &mut out).map_err(|e| e.to_string())
        }
        // (`None` has returned above.)
        Compression::Zstd | Compression::None => {
            zstd::stream::copy_decode(&bytes[..], &mut out).map_err(|e| e.to_string())
        }
    };
    result
        .map_err(|e| format_error(path, &format!("cannot decompress the {codec} stream: {e}")))?;
    String::from_utf8(out).map_err(|e| {
        format_error(
            path,
            &format!(
                "the decompressed {codec} text is not UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

fn format_error(path: &Path, message: &str) -> crate::Error {
    DataError::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
    .into()
}

fn json_flavour(text: &str) -> FileFormat {
    if strip_bom(text).trim_start().starts_with('[') {
        FileFormat::Json
    } else {
        FileFormat::Jsonl
    }
}

fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads a data file: the format from the extension (see [`detect_format`]), the shape of each
/// row from its keys (see the [module documentation](super)).
///
/// Errors name the file and, for a bad row, its JSONL line, JSON array index or the line where
/// its CSV record starts. A file without rows is an error, and so is a `.txt` file (prompts
/// only: read it with [`load_prompts`](super::load_prompts)).
pub fn load_rows(path: &Path) -> crate::Result<Vec<Row>> {
    let records = read_records(path)?;
    let cells = match records.format {
        FileFormat::Csv | FileFormat::Tsv => Cells::Csv,
        FileFormat::Text => {
            return Err(format_error(
                path,
                "a .txt file is one prompt per line: it can be a prompt set (--harmful, \
                 --benign) but not training or task data, which need responses",
            ))
        }
        _ => Cells::Json,
    };
    records
        .items
        .iter()
        .map(|(location, value)| {
            parse_value(value, cells).map_err(|m| row_error(path, *location, m).into())
        })
        .collect()
}

/// The records of a data file before their shape is read: JSON values (JSONL lines, JSON array
/// items), CSV records as objects of strings keyed by the header, or `.txt` lines as strings
/// (blank lines skipped), each with its location.
pub(crate) struct Records {
    /// The file's format ([`FileFormat::Json`] and [`FileFormat::Jsonl`] as read).
    pub format: FileFormat,
    /// The records in file order.
    pub items: Vec<(Location, Json)>,
}

/// Reads the records of a data file (see [`Records`]); a file without any is
/// [`DataError::Empty`].
pub(crate) fn read_records(path: &Path) -> crate::Result<Records> {
    let (format, items) = match detect_format(path)? {
        FileFormat::Parquet => (FileFormat::Parquet, parquet_values(path)?),
        detected => text_values(path, detected)?,
    };
    if items.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        }
        .into());
    }
    Ok(Records { format, items })
}

/// The records of a text file (JSON Lines, a JSON array, CSV, or `.txt` lines) and the format
/// as read (a `.json` file is an array or JSON Lines by its first character).
fn text_values(
    path: &Path,
    detected: FileFormat,
) -> crate::Result<(FileFormat, Vec<(Location, Json)>)> {
    let text = read_text(path)?;
    let format = match detected {
        FileFormat::Json => json_flavour(&text),
        f => f,
    };
    let text = strip_bom(&text);
    let items = match format {
        FileFormat::Jsonl if single_json_object(text) => {
            return Err(DataError::Parse {
                path: path.to_path_buf(),
                message: "one JSON object spread over several lines; expected an array of row objects, or JSON Lines (one object per line)".into(),
            }
            .into())
        }
        FileFormat::Jsonl => jsonl_values(path, text)?,
        FileFormat::Json => json_values(path, text)?,
        FileFormat::Csv => csv_values(path, text, ',')?,
        FileFormat::Tsv => csv_values(path, text, '\t')?,
        FileFormat::Parquet => parquet_values(path)?,
        FileFormat::Text => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (Location::Line(i + 1), Json::String(l.trim_end().to_string())))
            .collect(),
    };
    Ok((format, items))
}

/// Whether the text is one JSON object whose first line is not a whole object (a pretty-printed
/// object, such as `{"data": [...]}`, rather than JSON Lines).
fn single_json_object(text: &str) -> bool {
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str::<Json>(first).is_err()
        && matches!(serde_json::from_str::<Json>(text), Ok(Json::Object(_)))
}

fn row_error(path: &Path, location: Location, message: impl Into<String>) -> DataError {
    DataError::Row {
        path: path.to_path_buf(),
        location,
        message: message.into(),
    }
}

fn jsonl_values(path: &Path, text: &str) -> Result<Vec<(Location, Json)>, DataError> {
    let mut values = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = Location::Line(i + 1);
        let value: Json = serde_json::from_str(line).map_err(|e| {
            // serde counts lines within the one line it was given: name the column only.
            let what = e.to_string();
            let what = what
                .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
                .unwrap_or(&what);
            row_error(
                path,
                location,
                format!("invalid JSON at column {}: {what}", e.column()),
            )
        })?;
        values.push((location, value));
    }
    Ok(values)
}

/// The rows of a Parquet file as JSON objects (column name -> value), through parquet's record
/// reader (every row group, in order).
fn parquet_values(path: &Path) -> crate::Result<Vec<(Location, Json)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let unreadable = |what: String| DataError::Parse {
        path: path.to_path_buf(),
        message: format!("not a readable Parquet file: {what}"),
    };
    let parse = |e: parquet::errors::ParquetError| unreadable(e.to_string());
    let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| crate::Error::io(path, e))?
        .len();
    let read = || -> crate::Result<Vec<(Location, Json)>> {
        let reader = SerializedFileReader::new(file).map_err(parse)?;
        check_column_chunks(reader.metadata(), file_len).map_err(unreadable)?;
        let rows = reader.get_row_iter(None).map_err(parse)?;
        let mut values = Vec::new();
        for (i, row) in rows.enumerate() {
            let row =
                row.map_err(|e| row_error(path, Location::Row(i), format!("unreadable: {e}")))?;
            values.push((Location::Row(i), row.to_json_value()));
        }
        Ok(values)
    };
    // parquet asserts on some damaged files (a data page that needs a missing dictionary)
    crate::quiet_panic::catch(read).unwrap_or_else(|message| {
        Err(unreadable(format!("the Parquet reader failed: {message}")).into())
    })
}

/// Every column chunk's byte range (its first page, dictionary or data, and its compressed
/// size) must lie inside the file: parquet's reader asserts that the offsets are not negative
/// (a panic on a damaged footer) and would otherwise seek past the end.
fn check_column_chunks(
    metadata: &parquet::file::metadata::ParquetMetaData,
    file_len: u64,
) -> Result<(), String> {
    for (group, row_group) in metadata.row_groups().iter().enumerate() {
        for column in row_group.columns() {
            let start = column
                .dictionary_page_offset()
                .unwrap_or_else(|| column.data_page_offset());
            let len = column.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|end| end > file_len) {
                return Err(format!(
                    "row group {group}, column `{}` claims {len} bytes from offset {start}, but \
                     the file has {file_len} bytes",
                    column.column_path().string()
                ));
            }
        }
    }
    Ok(())
}

fn json_values(path: &Path, text: &str) -> Result<Vec<(Location, Json)>, DataError> {
    let value: Json = serde_json::from_str(text).map_err(|e| DataError::Parse {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })?;
    let Json::Array(items) = value else {
        return Err(DataError::Parse {
            path: path.to_path_buf(),
            message: "expected a JSON array of row objects".into(),
        });
    };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, v)| (Location::Index(i), v))
        .collect())
}

fn csv_values(
    path: &Path,
    text: &str,
    separator: char,
) -> Result<Vec<(Location, Json)>, DataError> {
    let what = if separator == '\t' { "TSV" } else { "CSV" };
    let records = csv::parse(&csv::blank_leading_comments(text), separator).map_err(|message| {
        DataError::Parse {
            path: path.to_path_buf(),
            message: format!("invalid {what}: {message}"),
        }
    })?;
    let Some((header, records)) = records.split_first() else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = header.fields.iter().map(|f| f.trim().to_string()).collect();
    let mut values = Vec::with_capacity(records.len());
    for record in records {
        let location = Location::Record(record.line);
        if record.fields.len() != names.len() {
            return Err(row_error(
                path,
                location,
                format!(
                    "{} fields, but the header has {} ({})",
                    record.fields.len(),
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
        let object: Map<String, Json> = names
            .iter()
            .zip(&record.fields)
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect();
        values.push((location, Json::Object(object)));
    }
    Ok(values)
}

/// Whether values come from JSON (typed) or CSV (all strings: lists are JSON text, labels
/// are words).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Cells {
    Json,
    Csv,
}

const SHAPES: &str =
    "expected one of: {instruction, input?, output} (Alpaca), {prompt, completion} \
     or {prompt, response} (SFT), {messages} or {conversations} (chat), {prompt, chosen, rejected} \
     (preference), {prompt, completion, label} (KTO)";

/// One row object to a [`Row`]; the error is the message, the caller adds file and location.
pub(crate) fn parse_value(value: &Json, cells: Cells) -> Result<Row, String> {
    let Json::Object(obj) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_type(value)
        ));
    };
    let has = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if has("chosen") || has("rejected") {
        return parse_preference(obj, cells);
    }
    if has("messages") || has("conversations") {
        let key = if has("messages") {
            "messages"
        } else {
            "conversations"
        };
        let mut messages = message_list(obj, key, cells)?;
        let last = messages
            .pop()
            .filter(|m| m.role == "assistant")
            .ok_or_else(|| format!("`{key}`: the last message must be the assistant's response"))?;
        if messages.is_empty() {
            return Err(format!(
                "`{key}`: no message before the assistant's response"
            ));
        }
        return Ok(Row::Sft {
            prompt: Prompt::Messages(messages),
            response: nonempty(last.content, key)?,
        });
    }
    if has("instruction") || has("output") {
        let instruction = string_field(obj, "instruction")?;
        let input = match obj.get("input") {
            None | Some(Json::Null) => String::new(),
            Some(_) => string_field(obj, "input")?,
        };
        let output = string_field(obj, "output")?;
        let prompt = if input.trim().is_empty() {
            instruction
        } else {
            format!("{instruction}\n\n{input}")
        };
        return Ok(Row::Sft {
            prompt: Prompt::Text(nonempty(prompt, "instruction")?),
            response: nonempty(output, "output")?,
        });
    }
    if has("label") && has("completion") {
        let prompt = prompt_field(obj, cells)?;
        let completion = nonempty(string_field(obj, "completion")?, "completion")?;
        let desirable = label(obj.get("label"))?;
        return Ok(Row::Kto {
            prompt,
            completion,
            desirable,
        });
    }
    if has("prompt") && (has("completion") || has("response")) {
        let key = if has("completion") {
            "completion"
        } else {
            "response"
        };
        return Ok(Row::Sft {
            prompt: prompt_field(obj, cells)?,
            response: nonempty(string_field(obj, key)?, key)?,
        });
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(format!(
        "unrecognised row shape with keys [{}]; {SHAPES}",
        keys.join(", ")
    ))
}

fn parse_preference(obj: &Map<String, Json>, cells: Cells) -> Result<Row, String> {
    for key in ["chosen", "rejected"] {
        if obj.get(key).is_none_or(Json::is_null) {
            return Err(format!(
                "a preference row needs both `chosen` and `rejected`; `{key}` is missing"
            ));
        }
    }
    let chosen = response_field(obj, "chosen", cells)?;
    let rejected = response_field(obj, "rejected", cells)?;
    let prompt = if obj.get("prompt").is_some_and(|v| !v.is_null()) {
        prompt_field(obj, cells)?
    } else {
        // Implicit prompt: both conversations share everything but their last message.
        match (&chosen, &rejected) {
            (Response::Conversation(c), Response::Conversation(r))
                if c.len() > 1 && c[..c.len() - 1] == r[..r.len().saturating_sub(1)] =>
            {
                Prompt::Messages(c[..c.len() - 1].to_vec())
            }
            _ => {
                return Err("a preference row needs `prompt` (or `chosen` and `rejected` conversations that share all but their last message)".into())
            }
        }
    };
    Ok(Row::Preference {
        prompt,
        chosen: nonempty(chosen.into_text("chosen")?, "chosen")?,
        rejected: nonempty(rejected.into_text("rejected")?, "rejected")?,
    })
}

/// `chosen` / `rejected`: a string, or a conversation whose last message is the assistant's.
enum Response {
    Text(String),
    Conversation(Vec<ChatMessage>),
}

impl Response {
    fn into_text(self, key: &str) -> Result<String, String> {
        match self {
            Response::Text(t) => Ok(t),
            Response::Conversation(mut m) => match m.pop() {
                Some(last) if last.role == "assistant" => Ok(last.content),
                _ => Err(format!(
                    "`{key}`: the last message must be the assistant's response"
                )),
            },
        }
    }
}

fn response_field(obj: &Map<String, Json>, key: &str, cells: Cells) -> Result<Response, String> {
    match list_value(obj.get(key), cells) {
        Some(list) => Ok(Response::Conversation(messages_of(&list, key)?)),
        None => Ok(Response::Text(string_field(obj, key)?)),
    }
}

pub(crate) fn prompt_field(obj: &Map<String, Json>, cells: Cells) -> Result<Prompt, String> {
    match list_value(obj.get("prompt"), cells) {
        Some(list) => {
            let messages = messages_of(&list, "prompt")?;
            if messages.is_empty() {
                return Err("`prompt`: empty message list".into());
            }
            Ok(Prompt::Messages(messages))
        }
        None => Ok(Prompt::Text(nonempty(
            string_field(obj, "prompt")?,
            "prompt",
        )?)),
    }
}

/// The value as a list: a JSON array, or in CSV a cell whose text is a JSON array of objects.
pub(crate) fn list_value(value: Option<&Json>, cells: Cells) -> Option<Vec<Json>> {
    match value? {
        Json::Array(a) => Some(a.clone()),
        Json::String(s) if cells == Cells::Csv && s.trim_start().starts_with('[') => {
            match serde_json::from_str::<Json>(s) {
                Ok(Json::Array(a)) if a.iter().all(Json::is_object) && !a.is_empty() => Some(a),
                _ => None,
            }
        }
        _ => None,
    }
}

fn message_list(
    obj: &Map<String, Json>,
    key: &str,
    cells: Cells,
) -> Result<Vec<ChatMessage>, String> {
    match list_value(obj.get(key), cells) {
        Some(list) => messages_of(&list, key),
        None => Err(format!(
            "`{key}` must be a list of messages, found {}",
            obj.get(key).map_or("nothing", json_type)
        )),
    }
}

/// Messages as `{role, content}` or ShareGPT's `{from, value}` (`human` → user, `gpt` →
/// assistant).
pub(crate) fn messages_of(list: &[Json], key: &str) -> Result<Vec<ChatMessage>, String> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Json::Object(m) = m else {
                return Err(format!(
                    "`{key}`[{i}]: expected an object with `role` and `content`"
                ));
            };
            let field = |names: [&str; 2]| {
                names.iter().find_map(|n| match m.get(*n) {
                    Some(Json::String(s)) => Some(s.clone()),
                    _ => None,
                })
            };
            let role =
                field(["role", "from"]).ok_or_else(|| format!("`{key}`[{i}]: no string `role`"))?;
            let content = field(["content", "value"])
                .ok_or_else(|| format!("`{key}`[{i}]: no string `content`"))?;
            let role = match role.as_str() {
                "human" => "user".to_string(),
                "gpt" | "model" => "assistant".to_string(),
                _ => role,
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn string_field(obj: &Map<String, Json>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Json::String(s)) => Ok(s.clone()),
        None | Some(Json::Null) => Err(format!("missing `{key}`")),
        Some(other) => Err(format!(
            "`{key}` must be a string, found {}",
            json_type(other)
        )),
    }
}

fn nonempty(s: String, key: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err(format!("`{key}` is empty"))
    } else {
        Ok(s)
    }
}

fn label(value: Option<&Json>) -> Result<bool, String> {
    let word = |s: &str| match s.trim().to_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    };
    let parsed = match value {
        Some(Json::Bool(b)) => Some(*b),
        Some(Json::Number(n)) => match n.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Some(Json::String(s)) => word(s),
        _ => None,
    };
    parsed.ok_or_else(|| {
        let found = match value {
            Some(Json::String(s)) => format!("{s:?}"),
            Some(v) => v.to_string(),
            None => "nothing".into(),
        };
        format!("`label` must be a boolean (true/false, 1/0), found {found}")
    })
}

pub(crate) fn json_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// A prompt as written: a string or a message list.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum PromptOut<'a> {
    Text(&'a str),
    Messages(&'a [ChatMessage]),
}

impl<'a> From<&'a Prompt> for PromptOut<'a> {
    fn from(p: &'a Prompt) -> Self {
        match p {
            Prompt::Text(t) => PromptOut::Text(t),
            Prompt::Messages(m) => PromptOut::Messages(m),
        }
    }
}

/// A row as written, fields in reading order.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum RowOut<'a> {
    Completion {
        prompt: PromptOut<'a>,
        completion: &'a str,
    },
    Chat {
        messages: Vec<ChatMessage>,
    },
    Preference {
        prompt: PromptOut<'a>,
        chosen: &'a str,
        rejected: &'a str,
    },
    Kto {
        prompt: PromptOut<'a>,
        completion: &'a str,
        label: bool,
    },
}

impl<'a> From<&'a Row> for RowOut<'a> {
    fn from(row: &'a Row) -> Self {
        match row {
            Row::Sft {
                prompt: Prompt::Text(t),
                response,
            } => RowOut::Completion {
                prompt: PromptOut::Text(t),
                completion: response,
            },
            Row::Sft {
                prompt: Prompt::Messages(m),
                response,
            } => {
                let mut messages = m.clone();
                messages.push(ChatMessage::assistant(response.clone()));
                RowOut::Chat { messages }
            }
            Row::Preference {
                prompt,
                chosen,
                rejected,
            } => RowOut::Preference {
                prompt: prompt.into(),
                chosen,
                rejected,
            },
            Row::Kto {
                prompt,
                completion,
                desirable,
            } => RowOut::Kto {
                prompt: prompt.into(),
                completion,
                label: *desirable,
            },
        }
    }
}

impl Row {
    /// The row as a JSON object in the shape [`load_rows`] reads back to the same row:
    /// `{prompt, completion}` (SFT with a text prompt), `{messages}` (SFT with a conversation),
    /// `{prompt, chosen, rejected}`, `{prompt, completion, label}`.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(RowOut::from(self)).unwrap_or(Json::Null)
    }
}

/// Writes rows as JSON Lines (one [`Row::to_json`] object per line, keys in that order),
/// atomically. A path named as another format (`.csv`, `.json`, `.parquet`, `.txt`, `.tsv`)
/// or compressed (`.gz`, `.xz`, `.zst`) is an error, not a JSONL file under a misleading name.
pub fn write_jsonl(path: &Path, rows: &[Row]) -> crate::Result<()> {
    let (compression, ext) = layers(path);
    if compression != Compression::None
        || matches!(ext.as_str(), "csv" | "tsv" | "json" | "parquet" | "txt")
    {
        return Err(format_error(
            path,
            "rows are written as uncompressed JSON Lines: name the output .jsonl (or .ndjson)",
        ));
    }
    fsutil::write_atomic_with(path, |w| {
        for row in rows {
            serde_json::to_writer(&mut *w, &RowOut::from(row))?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Json) -> Result<Row, String> {
        parse_value(&v, Cells::Json)
    }

    #[test]
    fn shapes() {
        assert_eq!(
            row(json!({"instruction": "Add", "input": "1 2", "output": "3"})).unwrap(),
            Row::Sft {
                prompt: Prompt::Text("Add\n\n1 2".into()),
                response: "3".into()
            }
        );
        assert_eq!(
            row(json!({"instruction": "Hi", "input": "", "output": "Hello"})).unwrap(),
            Row::Sft {
                prompt: Prompt::Text("Hi".into()),
                response: "Hello".into()
            }
        );
        assert_eq!(
            row(json!({"prompt": "Hi", "response": "Hello"})).unwrap(),
            row(json!({"prompt": "Hi", "completion": "Hello"})).unwrap()
        );
        assert_eq!(
            row(json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}))
                .unwrap(),
            Row::Sft {
                prompt: Prompt::Messages(vec![ChatMessage::user("Hi")]),
                response: "Hello".into()
            }
        );
        assert_eq!(
            row(json!({"prompt": "Q", "completion": "A", "label": 0})).unwrap(),
            Row::Kto {
                prompt: Prompt::Text("Q".into()),
                completion: "A".into(),
                desirable: false
            }
        );
        // Implicit prompt.
        let c = json!([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}]);
        let r = json!([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]);
        assert_eq!(
            row(json!({"chosen": c, "rejected": r})).unwrap(),
            Row::Preference {
                prompt: Prompt::Messages(vec![ChatMessage::user("Q")]),
                chosen: "good".into(),
                rejected: "bad".into()
            }
        );
    }

    #[test]
    fn bad_rows_say_why() {
        let e = row(json!({"instruction": "x"})).unwrap_err();
        assert!(e.contains("missing `output`"), "{e}");
        let e = row(json!({"text": "x"})).unwrap_err();
        assert!(e.contains("unrecognised row shape with keys [text]"), "{e}");
        let e = row(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap_err();
        assert!(e.contains("last message must be the assistant"), "{e}");
        let e = row(json!({"prompt": "x", "completion": "y", "label": "maybe"})).unwrap_err();
        assert!(e.contains("`label` must be a boolean"), "{e}");
        let e = row(json!({"prompt": "x", "chosen": "y"})).unwrap_err();
        assert!(e.contains("`rejected` is missing"), "{e}");
        let e = row(json!({"prompt": 3, "completion": "y"})).unwrap_err();
        assert!(
            e.contains("`prompt` must be a string, found a number"),
            "{e}"
        );
        let e = row(json!({"prompt": "  ", "completion": "y"})).unwrap_err();
        assert!(e.contains("`prompt` is empty"), "{e}");
        let e = row(json!([1])).unwrap_err();
        assert!(e.contains("expected a JSON object"), "{e}");
    }

    #[test]
    fn csv_cells_hold_message_lists_and_word_labels() {
        let obj = json!({"prompt": "[{\"role\": \"user\", \"content\": \"Q\"}]", "completion": "A", "label": "True"});
        assert_eq!(
            parse_value(&obj, Cells::Csv).unwrap(),
            Row::Kto {
                prompt: Prompt::Messages(vec![ChatMessage::user("Q")]),
                completion: "A".into(),
                desirable: true
            }
        );
        // A text prompt that merely starts with a bracket stays text.
        let obj = json!({"prompt": "[draft] fix this", "completion": "A"});
        assert_eq!(
            parse_value(&obj, Cells::Csv).unwrap().prompt(),
            &Prompt::Text("[draft] fix this".into())
        );
    }
}
