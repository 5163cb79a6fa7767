//! A small RFC 4180 CSV reader: comma-separated fields (or tab-separated, for `.tsv`),
//! double-quoted fields that may hold the separator, newlines and doubled quotes (`""`), CRLF or
//! LF line ends. Enough for the data files that pandas (`to_csv`, `sep="\t"`) and spreadsheets
//! write. Leading `# ` comment lines, as PyRIT's data sets start with (`# dataset_version=1.0`),
//! are skipped by [`blank_leading_comments`].

/// One record: its fields and the (1-based) line where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub line: usize,
    pub fields: Vec<String>,
}

/// Replaces each leading comment line (one that starts with `#` followed by a space, a tab or
/// the line's end, before the header) with an empty line, so that record lines keep their
/// numbers. A header such as `#,prompt` or `#id` is not a comment.
pub(crate) fn blank_leading_comments(text: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut in_comments = true;
    for line in text.split_inclusive('\n') {
        let rest = line.strip_prefix('#');
        let comment = rest.is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '\r', '\n']));
        if in_comments && comment {
            kept.push('\n');
        } else {
            in_comments = false;
            kept.push_str(line);
        }
    }
    kept
}

/// Splits `text` into records of fields separated by `separator` (`,` for CSV, `\t` for TSV);
/// blank lines between records are skipped. The error says what went wrong and on which line.
pub(crate) fn parse(text: &str, separator: char) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut start_line = 1;
    // Whether the current record has any content yet (to skip blank lines).
    let mut started = false;
    // Whether the current field was quoted and its closing quote has been seen.
    let mut closed_quote = false;

    loop {
        let Some(c) = chars.next() else {
            if started {
                fields.push(std::mem::take(&mut field));
                records.push(Record {
                    line: start_line,
                    fields: std::mem::take(&mut fields),
                });
            }
            break;
        };
        match c {
            '"' if field.is_empty() && !closed_quote => {
                if !started {
                    started = true;
                    start_line = line;
                }
                let open_line = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err(format!(
                                "unterminated quoted field opened on line {open_line}"
                            ))
                        }
                        Some('"') => {
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                field.push('"');
                            } else {
                                break;
                            }
                        }
                        Some('\n') => {
                            line += 1;
                            field.push('\n');
                        }
                        Some(other) => field.push(other),
                    }
                }
                closed_quote = true;
            }
            c if c == separator => {
                if !started {
                    started = true;
                    start_line = line;
                }
                fields.push(std::mem::take(&mut field));
                closed_quote = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if started {
                    fields.push(std::mem::take(&mut field));
                    records.push(Record {
                        line: start_line,
                        fields: std::mem::take(&mut fields),
                    });
                }
                started = false;
                closed_quote = false;
                line += 1;
            }
            other => {
                if closed_quote {
                    return Err(format!(
                        "line {line}: text after the closing quote of a field (a quote inside a quoted field must be doubled)"
                    ));
                }
                if !started {
                    started = true;
                    start_line = line;
                }
                field.push(other);
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(records: &[Record]) -> Vec<Vec<&str>> {
        records
            .iter()
            .map(|r| r.fields.iter().map(String::as_str).collect())
            .collect()
    }

    #[test]
    fn quoted_fields_with_commas_quotes_and_newlines() {
        let text = "a,b,c\r\n1,\"x, y\",\"say \"\"hi\"\"\"\n\n2,\"two\nlines\",\n3,,z";
        let r = parse(text, ',').unwrap();
        assert_eq!(
            fields(&r),
            vec![
                vec!["a", "b", "c"],
                vec!["1", "x, y", "say \"hi\""],
                vec!["2", "two\nlines", ""],
                vec!["3", "", "z"],
            ]
        );
        // Record lines: header 1, then 2, (blank 3), 4 (spans 4-5), 6.
        assert_eq!(
            r.iter().map(|r| r.line).collect::<Vec<_>>(),
            vec![1, 2, 4, 6]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("a,b\n1,\"open\n2,3\n", ',').unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = parse("a,b\n\"x\"y,2\n", ',').unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn tabs_separate_tsv_fields_and_commas_stay_text() {
        let r = parse("prompt\tlabel\nhi, there\t1\n\"a\ttab\"\t0\n", '\t').unwrap();
        assert_eq!(
            fields(&r),
            vec![
                vec!["prompt", "label"],
                vec!["hi, there", "1"],
                vec!["a\ttab", "0"]
            ]
        );
    }

    #[test]
    fn leading_comment_lines_are_blanked_and_lines_keep_their_numbers() {
        let text = "# dataset_version=1.0\n#\n# note\r\nprompt,x\n# not a comment here\n";
        let kept = blank_leading_comments(text);
        assert_eq!(kept, "\n\n\nprompt,x\n# not a comment here\n");
        let r = parse(&kept, ',').unwrap();
        assert_eq!(
            fields(&r),
            vec![vec!["prompt", "x"], vec!["# not a comment here"]]
        );
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![4, 5]);
        // Headers that start with `#` are not comments.
        for header in ["#,prompt\n1,a\n", "#id,prompt\n1,a\n"] {
            assert_eq!(blank_leading_comments(header), header);
        }
    }

    #[test]
    fn trailing_newline_makes_no_empty_record() {
        assert_eq!(
            fields(&parse("a\n1\n", ',').unwrap()),
            vec![vec!["a"], vec!["1"]]
        );
        assert!(parse("", ',').unwrap().is_empty());
    }
}
