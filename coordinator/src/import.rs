//! Parsing key files for import: pure, no I/O.
//!
//! A key file is one key per line, or CSV with the key in a chosen column. A UTF-8 BOM, CRLF line
//! ends and blank lines are accepted. Every other problem is reported per row; the caller imports
//! all valid rows as one batch or nothing.

use std::collections::HashSet;

use edgecard_protocol::Secret;
use sha2::{Digest, Sha256};

/// How to read a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// The whole line is the key.
    Lines,
    /// CSV; the key is in this zero-based column. `header` skips the first row.
    Csv { column: usize, header: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRow {
    /// One-based line number.
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// One-based line number.
    pub line: usize,
    pub secret: Secret,
    pub hash: [u8; 32],
}

/// The outcome of parsing, before the store is consulted for keys it already knows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedKeys {
    /// Valid, distinct keys in file order.
    pub keys: Vec<ParsedKey>,
    pub blank_lines: usize,
    /// Lines that repeat an earlier line of the same file.
    pub duplicates_in_file: Vec<usize>,
    pub invalid: Vec<InvalidRow>,
}

/// Content hash used to deduplicate keys across imports and skus.
pub fn content_hash(secret: &Secret) -> [u8; 32] {
    Sha256::digest(secret.expose().as_bytes()).into()
}

pub fn parse_keys(text: &str, format: KeyFormat) -> ParsedKeys {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parsed = ParsedKeys::default();
    let mut seen = HashSet::new();
    // `lines` splits on LF and CRLF and does not count a final line end as a blank line.
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            parsed.blank_lines += 1;
            continue;
        }
        let field = match format {
            KeyFormat::Lines => Ok(line.trim().to_string()),
            KeyFormat::Csv { header: true, .. } if index == 0 => continue,
            KeyFormat::Csv { column, .. } => csv_field(line, column),
        };
        let field = match field {
            Ok(field) => field,
            Err(reason) => {
                parsed.invalid.push(InvalidRow { line: line_no, reason });
                continue;
            }
        };
        let secret = match Secret::new(field) {
            Ok(secret) => secret,
            Err(e) => {
                parsed.invalid.push(InvalidRow { line: line_no, reason: e.to_string() });
                continue;
            }
        };
        let hash = content_hash(&secret);
        if !seen.insert(hash) {
            parsed.duplicates_in_file.push(line_no);
            continue;
        }
        parsed.keys.push(ParsedKey { line: line_no, secret, hash });
    }
    parsed
}

/// One field of a CSV line (RFC 4180 quoting; no multi-line fields).
fn csv_field(line: &str, column: usize) -> Result<String, String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_field_start = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if at_field_start => quoted = true,
            (true, '"') if chars.peek() == Some(&'"') => {
                current.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, ',') => {
                fields.push(std::mem::take(&mut current));
                at_field_start = true;
                continue;
            }
            (_, c) => current.push(c),
        }
        at_field_start = false;
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    fields.push(current);
    let count = fields.len();
    fields
        .into_iter()
        .nth(column)
        .map(|f| f.trim().to_string())
        .ok_or_else(|| format!("no column {} (the row has {count})", column + 1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secrets(parsed: &ParsedKeys) -> Vec<&str> {
        parsed.keys.iter().map(|k| k.secret.expose()).collect()
    }

    #[test]
    fn empty_file_imports_nothing() {
        let parsed = parse_keys("", KeyFormat::Lines);
        assert!(parsed.keys.is_empty());
        assert!(parsed.invalid.is_empty());
    }

    #[test]
    fn bom_crlf_blank_lines_and_duplicates() {
        let parsed = parse_keys("\u{feff}AAA-1\r\n\r\nBBB-2\r\nAAA-1\r\n  \r\nCCC-3\r\n", KeyFormat::Lines);
        assert_eq!(secrets(&parsed), vec!["AAA-1", "BBB-2", "CCC-3"]);
        assert_eq!(parsed.duplicates_in_file, vec![4]);
        assert_eq!(parsed.blank_lines, 2);
        assert!(parsed.invalid.is_empty());
    }

    #[test]
    fn over_long_and_control_character_rows_are_invalid_not_fatal() {
        let long = "X".repeat(600);
        let text = format!("GOOD-1\n{long}\nBAD\u{1}KEY\nGOOD-2");
        let parsed = parse_keys(&text, KeyFormat::Lines);
        assert_eq!(secrets(&parsed), vec!["GOOD-1", "GOOD-2"]);
        assert_eq!(parsed.invalid.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3]);
        assert!(!parsed.invalid[0].reason.contains("XXXX"), "errors do not echo the key");
    }

    #[test]
    fn csv_columns_headers_and_quotes() {
        let text = "serial,code,note\n1,\"AB,CD\",x\n2,EF\"\"GH,y\n3\n4,\"open\n";
        let parsed = parse_keys(text, KeyFormat::Csv { column: 1, header: true });
        assert_eq!(secrets(&parsed), vec!["AB,CD", "EF\"\"GH"]);
        assert_eq!(parsed.invalid.len(), 2);
        assert!(parsed.invalid[0].reason.contains("no column 2"));
        assert!(parsed.invalid[1].reason.contains("quote"));
    }

    #[test]
    fn hashes_identify_content() {
        let a = Secret::new("same".to_string()).unwrap();
        let b = Secret::new("same".to_string()).unwrap();
        let c = Secret::new("other".to_string()).unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&a), content_hash(&c));
    }
}
