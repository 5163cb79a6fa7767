//! Row filters for benchmark files as distributed: many ship safe and unsafe prompts, or
//! several kinds of behaviour, in one file (XSTest's `label` column of `safe`/`unsafe`,
//! BeaverTails' `is_safe`, HarmBench's `FunctionalCategory`, SORRY-Bench's `prompt_style`), and
//! an evaluation wants one part of it. `realign eval --where [SET:]KEY=VALUE` keeps the rows
//! whose `KEY` equals `VALUE` (`KEY!=VALUE`: differs), so the file is read unchanged.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value as Json};

/// One condition on a record: the text of its `key` (a CSV column, a JSON or Parquet key)
/// compared with `value`, ignoring ASCII case (`True`, `true` and a JSON `true` are one value;
/// numbers compare as they print: `1`, `0.5`; a null value is the empty text). Written and
/// read (JSON, TOML) as its text, `KEY=VALUE` or `KEY!=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RowFilter {
    /// The column or key.
    pub key: String,
    /// The value it is compared with.
    pub value: String,
    /// `true`: keep the rows whose value equals `value` (`KEY=VALUE`); `false`: those whose
    /// value differs (`KEY!=VALUE`).
    pub equal: bool,
}

/// A `--where` value that is not `KEY=VALUE` or `KEY!=VALUE` with a non-empty key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--where {0:?}: expected KEY=VALUE or KEY!=VALUE (e.g. label=safe, is_safe=false)")]
pub struct FilterSyntaxError(pub String);

impl FromStr for RowFilter {
    type Err = FilterSyntaxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value, equal) = match s.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match s.split_once('=') {
                Some((k, v)) => (k, v, true),
                None => return Err(FilterSyntaxError(s.to_string())),
            },
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(FilterSyntaxError(s.to_string()));
        }
        Ok(Self {
            key: key.to_string(),
            value: value.trim().to_string(),
            equal,
        })
    }
}

impl fmt::Display for RowFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.equal { "=" } else { "!=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

impl TryFrom<String> for RowFilter {
    type Error = FilterSyntaxError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RowFilter> for String {
    fn from(f: RowFilter) -> Self {
        f.to_string()
    }
}

impl RowFilter {
    /// Whether `record` passes. A record without the key is an error (naming the keys it has),
    /// so that a misspelt key does not silently drop every row.
    pub fn accepts(&self, record: &Map<String, Json>) -> Result<bool, String> {
        let Some(v) = record.get(&self.key) else {
            let mut keys: Vec<&str> = record.keys().map(String::as_str).collect();
            keys.sort_unstable();
            return Err(format!(
                "--where {self}: no key `{}` in this row (its keys: [{}])",
                self.key,
                keys.join(", ")
            ));
        };
        let text = match v {
            Json::String(s) => s.clone(),
            Json::Null => String::new(),
            other => other.to_string(),
        };
        Ok(text.trim().eq_ignore_ascii_case(&self.value) == self.equal)
    }
}

/// Whether `record` passes every filter (see [`RowFilter::accepts`]); the error is the first
/// filter's that cannot be applied.
pub fn accepts_all(filters: &[RowFilter], record: &Map<String, Json>) -> Result<bool, String> {
    for f in filters {
        if !f.accepts(record)? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => unreachable!("test rows are objects"),
        }
    }

    #[test]
    fn parses_equal_and_not_equal() {
        let f: RowFilter = "label=safe".parse().unwrap();
        assert_eq!(
            (f.key.as_str(), f.value.as_str(), f.equal),
            ("label", "safe", true)
        );
        let f: RowFilter = " FunctionalCategory != copyright ".parse().unwrap();
        assert_eq!(
            (f.key.as_str(), f.value.as_str(), f.equal),
            ("FunctionalCategory", "copyright", false)
        );
        assert_eq!(f.to_string(), "FunctionalCategory!=copyright");
        // a value may hold '=' (only the first separator splits)
        let f: RowFilter = "note=a=b".parse().unwrap();
        assert_eq!(f.value, "a=b");
        assert!("label".parse::<RowFilter>().is_err());
        assert!("=safe".parse::<RowFilter>().is_err());
        // JSON and TOML hold it as its text
        let f: RowFilter = "is_safe!=true".parse().unwrap();
        assert_eq!(serde_json::to_string(&f).unwrap(), "\"is_safe!=true\"");
        let back: RowFilter = serde_json::from_str("\"is_safe!=true\"").unwrap();
        assert_eq!(back, f);
        assert!(serde_json::from_str::<RowFilter>("\"is_safe\"").is_err());
    }

    #[test]
    fn compares_text_of_any_json_type_ignoring_case() {
        let row = obj(json!({"is_safe": false, "label": "Safe", "id": 7, "note": null}));
        let t = |s: &str| s.parse::<RowFilter>().unwrap().accepts(&row).unwrap();
        assert!(t("is_safe=false") && t("is_safe=False") && !t("is_safe=true"));
        assert!(t("label=safe") && !t("label=unsafe") && t("label!=unsafe"));
        assert!(t("id=7") && !t("id=70"));
        assert!(t("note=") && !t("note!="));
        // a CSV cell is a string: pandas writes booleans as True/False
        let csv = obj(json!({"is_safe": "False"}));
        assert!("is_safe=false"
            .parse::<RowFilter>()
            .unwrap()
            .accepts(&csv)
            .unwrap());
    }

    #[test]
    fn a_missing_key_is_an_error_naming_the_keys() {
        let row = obj(json!({"prompt": "p", "type": "homonyms"}));
        let err = "lable=safe"
            .parse::<RowFilter>()
            .unwrap()
            .accepts(&row)
            .unwrap_err();
        assert_eq!(
            err,
            "--where lable=safe: no key `lable` in this row (its keys: [prompt, type])"
        );
        let filters = [
            "type=homonyms".parse().unwrap(),
            "prompt!=p".parse().unwrap(),
        ];
        assert!(!accepts_all(&filters, &row).unwrap());
        assert!(accepts_all(&filters[..1], &row).unwrap());
    }
}
