//! The archive's format: object keys, the JSON line of one record, and the check
//! that archived objects cover a partition without gap or overlap.
//!
//! Guarantees (pure, no I/O): a key depends only on the prefix, table, date,
//! topic, partition and first offset, so re-archiving after a crash overwrites the
//! same object; [`parse_key`] reverses [`object_key`]; a line keeps the record's
//! key and value byte for byte (as text when UTF-8, else base64).

use base64::Engine as _;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// `{prefix}/{table}/dt=YYYY-MM-DD/{topic}-{partition}-{first_offset:020}.jsonl.gz`
pub fn object_key(
    prefix: &str,
    table: &str,
    date: NaiveDate,
    topic: &str,
    partition: i32,
    first_offset: i64,
) -> String {
    format!("{prefix}/{table}/dt={date}/{topic}-{partition}-{first_offset:020}.jsonl.gz")
}

/// The prefix under which a table's objects live.
pub fn table_prefix(prefix: &str, table: &str) -> String {
    format!("{prefix}/{table}/")
}

/// What an archive key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedKey {
    pub date: NaiveDate,
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
}

/// Reads a key written by [`object_key`] under `table_prefix`; `None` for others.
pub fn parse_key(table_prefix: &str, key: &str) -> Option<ArchivedKey> {
    let rest = key.strip_prefix(table_prefix)?;
    let (dt, file) = rest.split_once('/')?;
    let date = NaiveDate::parse_from_str(dt.strip_prefix("dt=")?, "%Y-%m-%d").ok()?;
    let stem = file.strip_suffix(".jsonl.gz")?;
    let mut parts = stem.rsplitn(3, '-');
    let first_offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    let topic = parts.next()?.to_owned();
    Some(ArchivedKey {
        date,
        topic,
        partition,
        first_offset,
    })
}

/// One archived record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch (the Kafka record timestamp).
    pub timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

fn text_or_base64(bytes: Option<&[u8]>) -> (Option<String>, Option<String>) {
    match bytes {
        None => (None, None),
        Some(b) => match std::str::from_utf8(b) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(b))),
        },
    }
}

fn bytes_of(text: &Option<String>, encoded: &Option<String>) -> Result<Option<Vec<u8>>, String> {
    match (text, encoded) {
        (Some(t), _) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(e)) => base64::engine::general_purpose::STANDARD
            .decode(e)
            .map(Some)
            .map_err(|e| format!("invalid base64: {e}")),
        (None, None) => Ok(None),
    }
}

impl Line {
    pub fn new(partition: i32, offset: i64, timestamp: Option<i64>, key: Option<&[u8]>, value: Option<&[u8]>) -> Line {
        let (key, key_base64) = text_or_base64(key);
        let (value, value_base64) = text_or_base64(value);
        Line {
            partition,
            offset,
            timestamp,
            key,
            key_base64,
            value,
            value_base64,
        }
    }

    pub fn key_bytes(&self) -> Result<Option<Vec<u8>>, String> {
        bytes_of(&self.key, &self.key_base64)
    }

    pub fn value_bytes(&self) -> Result<Option<Vec<u8>>, String> {
        bytes_of(&self.value, &self.value_base64)
    }
}

/// An archived object of one partition: offsets `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub key: String,
    pub first: i64,
    pub last: i64,
}

/// Something wrong with a partition's archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Offsets `from..to` are in no object.
    Gap { from: i64, to: i64 },
    /// Two objects both hold `from..=to`.
    Overlap { from: i64, to: i64, keys: (String, String) },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Gap { from, to } => write!(f, "gap: offsets {from}..{} are in no object", to - 1),
            Problem::Overlap { from, to, keys } => {
                write!(f, "overlap: offsets {from}..{to} are in both {} and {}", keys.0, keys.1)
            }
        }
    }
}

/// Gaps and overlaps between one partition's objects, from `start` on.
pub fn check(mut spans: Vec<Span>, start: i64) -> Vec<Problem> {
    spans.sort_by_key(|s| (s.first, s.last));
    let mut problems = Vec::new();
    let mut next = start;
    let mut previous: Option<&Span> = None;
    for span in &spans {
        if span.first > next {
            problems.push(Problem::Gap {
                from: next,
                to: span.first,
            });
        } else if span.first < next {
            if let Some(previous) = previous {
                problems.push(Problem::Overlap {
                    from: span.first,
                    to: (next - 1).min(span.last),
                    keys: (previous.key.clone(), span.key.clone()),
                });
            }
        }
        next = next.max(span.last + 1);
        previous = Some(span);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_depend_only_on_the_first_offset() {
        let date = NaiveDate::from_ymd_opt(2024, 3, 1).expect("date");
        let key = object_key("archive", "events_part", date, "my-dwh.events_part", 7, 1234);
        assert_eq!(
            key,
            "archive/events_part/dt=2024-03-01/my-dwh.events_part-7-00000000000000001234.jsonl.gz"
        );
        let parsed = parse_key(&table_prefix("archive", "events_part"), &key).expect("parses");
        assert_eq!(
            parsed,
            ArchivedKey {
                date,
                topic: "my-dwh.events_part".into(),
                partition: 7,
                first_offset: 1234
            }
        );
        assert_eq!(parse_key("archive/events_part/", "archive/events_part/notes.txt"), None);
        assert_eq!(
            parse_key("archive/events_part/", "archive/other/dt=2024-03-01/t-1-1.jsonl.gz"),
            None
        );
    }

    #[test]
    fn lines_keep_bytes_exactly() {
        let line = Line::new(3, 42, Some(1_700_000_000_000), Some(b"k|1"), Some(b"{\"a\":1}"));
        let text = serde_json::to_string(&line).expect("json");
        assert_eq!(
            text,
            r#"{"partition":3,"offset":42,"timestamp":1700000000000,"key":"k|1","value":"{\"a\":1}"}"#
        );
        let back: Line = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.value_bytes(), Ok(Some(b"{\"a\":1}".to_vec())));
        let binary = Line::new(0, 1, None, None, Some(&[0xff, 0x00, 0x80]));
        let back: Line = serde_json::from_str(&serde_json::to_string(&binary).expect("json")).expect("parses");
        assert_eq!(back.value_bytes(), Ok(Some(vec![0xff, 0x00, 0x80])));
        assert_eq!(back.key_bytes(), Ok(None));
    }

    #[test]
    fn checks_find_gaps_and_overlaps() {
        let span = |key: &str, first, last| Span {
            key: key.into(),
            first,
            last,
        };
        assert!(check(vec![span("b", 10, 19), span("a", 0, 9), span("c", 20, 20)], 0).is_empty());
        assert_eq!(
            check(vec![span("a", 0, 9), span("b", 12, 19)], 0),
            [Problem::Gap { from: 10, to: 12 }]
        );
        assert_eq!(check(vec![span("a", 5, 9)], 0), [Problem::Gap { from: 0, to: 5 }]);
        assert_eq!(
            check(vec![span("a", 0, 9), span("b", 5, 19)], 0),
            [Problem::Overlap {
                from: 5,
                to: 9,
                keys: ("a".into(), "b".into())
            }]
        );
        assert_eq!(
            Problem::Gap { from: 10, to: 12 }.to_string(),
            "gap: offsets 10..11 are in no object"
        );
    }
}
