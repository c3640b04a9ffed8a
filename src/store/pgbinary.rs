//! Rows in PostgreSQL's binary `COPY` format.
//!
//! Guarantees: [`encode`] gives the bytes that `COPY ... FROM STDIN (FORMAT binary)`
//! reads into an optional leading `bigint` (the id, or the staging order) followed
//! by the table's columns, each value in its type's binary form (what the type's `send`
//! function writes), so the database parses no text. It gives `None` when a value
//! does not fit its column's binary form (a value the catalogue never produces);
//! the caller then sends the rows as text and the database names the problem.
//! [`suits`] tells which rows are worth sending as binary at all.

use std::borrow::Borrow;

use chrono::{Datelike as _, NaiveDate, NaiveDateTime, Timelike as _};

use crate::catalogue::{ColumnType, Row, TableSpec, Value};

/// The file header: signature, flags (no OIDs), no header extension.
const HEADER: &[u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// `num_days_from_ce` of 2000-01-01, PostgreSQL's epoch for dates and timestamps.
const PG_EPOCH_DAYS_FROM_CE: i32 = 730_120;
/// Unix time of 2000-01-01T00:00:00Z.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;
/// `numeric`'s digits are base 10,000.
const NUMERIC_GROUP: usize = 4;

/// PostgreSQL's `COPY` gathers rows for a multi-row insert until it holds 1,000
/// of them or 64 KiB of their text. Binary rows count no bytes there
/// (PostgreSQL 15), so a binary statement gathers up to 1,000 rows, each in its
/// own slot, and every slot pins the table's descriptor in a list whose upkeep
/// grows with the square of the slots (`ResourceOwnerRememberTupleDesc` and its
/// `Forget` took 14% of the server's time in `perf`). Measured here, 100,000
/// events under a savepoint per statement: of 300 rows a statement, binary
/// 441–449 ms, text 463; of 1,000, binary 432–475, text 382–413; of 3,000,
/// binary 364–387, text 354–359; of 10,000, binary 338–346, text 344–351.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Rows from which a binary statement's cheaper parsing outweighs its fuller
/// buffer (between the 3,000 and 10,000 above).
const LONG_STATEMENT_ROWS: usize = 5_000;

/// Whether `rows` go as binary: when they fit in the 64 KiB a text `COPY`
/// gathers at once (binary then gathers no more rows than text would, and is
/// cheaper to parse), or when they are many (see [`COPY_BUFFER_BYTES`]). In
/// between, text is cheaper for the database.
pub fn suits<R: Borrow<Row>>(rows: &[R]) -> bool {
    if rows.len() >= LONG_STATEMENT_ROWS {
        return true;
    }
    let mut bytes = 0;
    rows.iter().all(|row| {
        bytes += row.borrow().approx_bytes();
        bytes <= COPY_BUFFER_BYTES
    })
}

/// `rows` of `spec` as one binary COPY stream, each after its `prefixes` value
/// when given (a leading `bigint` column), else the table's columns alone.
pub fn encode<R: Borrow<Row>>(
    spec: &TableSpec,
    rows: &[R],
    mut prefixes: Option<impl Iterator<Item = i64>>,
) -> Option<Vec<u8>> {
    let fields = i16::try_from(spec.columns.len() + usize::from(prefixes.is_some())).ok()?;
    // A capacity hint from the first row (rows of one table are much alike):
    // sizing every row would walk every value once more.
    let estimate = rows.first().map_or(0, |r| {
        let r = r.borrow();
        (r.approx_bytes() + 4 * r.values.len() + 14) * rows.len()
    });
    let mut out = Vec::with_capacity(HEADER.len() + estimate + 2);
    out.extend_from_slice(HEADER);
    for row in rows {
        let row = row.borrow();
        out.extend_from_slice(&fields.to_be_bytes());
        if let Some(prefixes) = prefixes.as_mut() {
            field(&mut out, &prefixes.next()?.to_be_bytes())?;
        }
        for (column, value) in spec.columns.iter().zip(&row.values) {
            push_value(&mut out, column.ty, value)?;
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    Some(out)
}

/// One field: its length and its binary form (length -1 for NULL).
pub fn push_value(out: &mut Vec<u8>, ty: ColumnType, value: &Value) -> Option<()> {
    match (ty, value) {
        (_, Value::Null) => {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            Some(())
        }
        (ColumnType::BigInt, Value::Int(v)) => field(out, &v.to_be_bytes()),
        (ColumnType::Int, Value::Int(v)) => field(out, &i32::try_from(*v).ok()?.to_be_bytes()),
        (ColumnType::Double, Value::Float(v)) => field(out, &v.to_be_bytes()),
        (ColumnType::Bool, Value::Bool(v)) => field(out, &[u8::from(*v)]),
        (ColumnType::Text, Value::Text(v)) => field(out, v.as_bytes()),
        (ColumnType::Date, Value::Date(d)) => field(out, &pg_days(*d).to_be_bytes()),
        (ColumnType::Timestamp, Value::Timestamp(t)) => field(out, &pg_micros(*t)?.to_be_bytes()),
        (ColumnType::TimestampTz, Value::TimestampTz(t)) => field(out, &pg_micros(t.naive_utc())?.to_be_bytes()),
        (ColumnType::Numeric20, Value::Text(digits)) => numeric(out, digits),
        (ColumnType::Uuid, Value::Text(v)) => field(out, uuid::Uuid::try_parse(v).ok()?.as_bytes()),
        (ColumnType::Json, Value::Json(v)) => {
            let start = out.len();
            out.extend_from_slice(&[0; 4]);
            out.push(1); // jsonb's binary form: a version byte, then the text
            serde_json::to_writer(&mut *out, v).ok()?;
            let len = i32::try_from(out.len() - start - 4).ok()?;
            out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Some(())
        }
        _ => None,
    }
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
    out.extend_from_slice(&i32::try_from(bytes.len()).ok()?.to_be_bytes());
    out.extend_from_slice(bytes);
    Some(())
}

/// Days since 2000-01-01 (negative before).
fn pg_days(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - PG_EPOCH_DAYS_FROM_CE
}

/// Microseconds since 2000-01-01T00:00:00, the fraction truncated as the text
/// form does (a leap second's extra second carries over, as `:60` does in text).
fn pg_micros(at: NaiveDateTime) -> Option<i64> {
    let seconds = at.and_utc().timestamp().checked_sub(PG_EPOCH_UNIX_SECONDS)?;
    seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(at.nanosecond() / 1000))
}

/// A non-negative integer's decimal digits as `numeric`: base-10,000 digit
/// groups, most significant first, with their weight (the power of 10,000 of
/// the first group); no sign, no scale.
fn numeric(out: &mut Vec<u8>, digits: &str) -> Option<()> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0').as_bytes();
    let head = match digits.len() % NUMERIC_GROUP {
        0 => NUMERIC_GROUP,
        short => short,
    };
    let mut groups: Vec<i16> = std::iter::once(&digits[..head.min(digits.len())])
        .chain(digits.get(head..).unwrap_or_default().chunks(NUMERIC_GROUP))
        .filter(|group| !group.is_empty())
        .map(|group| group.iter().fold(0i16, |value, b| value * 10 + i16::from(b - b'0')))
        .collect();
    let weight = i16::try_from(groups.len()).ok()? - 1;
    // Trailing zero groups are implied by the weight.
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let weight = if groups.is_empty() { 0 } else { weight };
    let ndigits = i16::try_from(groups.len()).ok()?;
    let len = i32::try_from(8 + 2 * groups.len()).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    for header in [ndigits, weight, 0 /* sign: positive */, 0 /* display scale */] {
        out.extend_from_slice(&header.to_be_bytes());
    }
    for group in groups {
        out.extend_from_slice(&group.to_be_bytes());
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone as _, Utc};
    use serde_json::json;

    #[test]
    fn rows_go_as_binary_when_small_or_many() {
        let rows = |n: usize| {
            vec![
                Row {
                    values: vec![Value::Text("x".repeat(999).into())]
                };
                n
            ]
        };
        assert_eq!(rows(1)[0].approx_bytes(), 1_000);
        assert!(suits(&rows(65)), "65,000 bytes: within the 64 KiB");
        assert!(!suits(&rows(66)), "66,000 bytes: over it");
        assert!(!suits(&rows(LONG_STATEMENT_ROWS - 1)));
        assert!(suits(&rows(LONG_STATEMENT_ROWS)), "many rows");
        assert!(suits::<Row>(&[]));
    }

    fn bytes(ty: ColumnType, value: Value) -> Vec<u8> {
        let mut out = Vec::new();
        push_value(&mut out, ty, &value).unwrap_or_else(|| panic!("{value:?} as {ty:?}"));
        out
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("a date")
    }

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32, micro: u32) -> NaiveDateTime {
        date(y, m, d).and_hms_micro_opt(h, min, s, micro).expect("a time")
    }

    /// A field's bytes: its length, then `payload`.
    fn with_len(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as i32).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn null_is_a_length_of_minus_one_whatever_the_type() {
        for ty in [
            ColumnType::BigInt,
            ColumnType::Text,
            ColumnType::Json,
            ColumnType::Numeric20,
        ] {
            assert_eq!(bytes(ty, Value::Null), vec![0xff, 0xff, 0xff, 0xff]);
        }
    }

    #[test]
    fn integers_floats_and_booleans_are_big_endian() {
        assert_eq!(
            bytes(ColumnType::BigInt, Value::Int(-2)),
            with_len(&(-2i64).to_be_bytes())
        );
        assert_eq!(
            bytes(ColumnType::BigInt, Value::Int(i64::MIN)),
            with_len(&[0x80, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(bytes(ColumnType::Int, Value::Int(258)), with_len(&[0, 0, 1, 2]));
        assert_eq!(
            bytes(ColumnType::Int, Value::Int(i64::from(i32::MIN))),
            with_len(&[0x80, 0, 0, 0])
        );
        assert_eq!(
            bytes(ColumnType::Double, Value::Float(1.5)),
            with_len(&[0x3f, 0xf8, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(bytes(ColumnType::Bool, Value::Bool(true)), with_len(&[1]));
        assert_eq!(bytes(ColumnType::Bool, Value::Bool(false)), with_len(&[0]));
    }

    #[test]
    fn dates_count_days_from_2000_and_timestamps_microseconds() {
        assert_eq!(
            bytes(ColumnType::Date, Value::Date(date(2000, 1, 1))),
            with_len(&[0, 0, 0, 0])
        );
        assert_eq!(
            bytes(ColumnType::Date, Value::Date(date(1999, 12, 31))),
            with_len(&(-1i32).to_be_bytes())
        );
        assert_eq!(
            bytes(ColumnType::Date, Value::Date(date(1, 1, 1))),
            with_len(&(-730_119i32).to_be_bytes())
        );
        assert_eq!(
            bytes(ColumnType::Date, Value::Date(date(2024, 2, 29))),
            with_len(&8_825i32.to_be_bytes())
        );
        assert_eq!(
            bytes(ColumnType::Timestamp, Value::Timestamp(at(2000, 1, 1, 0, 0, 0, 1))),
            with_len(&1i64.to_be_bytes())
        );
        assert_eq!(
            bytes(ColumnType::Timestamp, Value::Timestamp(at(1970, 1, 1, 0, 0, 0, 0))),
            with_len(&(-946_684_800_000_000i64).to_be_bytes())
        );
        assert_eq!(
            bytes(
                ColumnType::Timestamp,
                Value::Timestamp(at(1999, 12, 31, 23, 59, 59, 999_999))
            ),
            with_len(&(-1i64).to_be_bytes())
        );
        let nanos = date(2000, 1, 1).and_hms_nano_opt(0, 0, 1, 2_999).expect("a time");
        assert_eq!(
            bytes(ColumnType::Timestamp, Value::Timestamp(nanos)),
            with_len(&1_000_002i64.to_be_bytes()),
            "nanoseconds are truncated to microseconds"
        );
        let utc = Utc.with_ymd_and_hms(2000, 1, 2, 0, 0, 0).single().expect("a time");
        assert_eq!(
            bytes(ColumnType::TimestampTz, Value::TimestampTz(utc)),
            with_len(&86_400_000_000i64.to_be_bytes())
        );
    }

    #[test]
    fn numeric_digits_are_base_ten_thousand_groups() {
        let numeric = |ndigits: i16, weight: i16, groups: &[i16]| {
            let mut payload = Vec::new();
            for v in [ndigits, weight, 0, 0].iter().chain(groups) {
                payload.extend_from_slice(&v.to_be_bytes());
            }
            with_len(&payload)
        };
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            bytes(ColumnType::Numeric20, text("18446744073709551615")),
            numeric(5, 4, &[1844, 6744, 737, 955, 1615])
        );
        assert_eq!(bytes(ColumnType::Numeric20, text("0")), numeric(0, 0, &[]));
        assert_eq!(bytes(ColumnType::Numeric20, text("7")), numeric(1, 0, &[7]));
        assert_eq!(bytes(ColumnType::Numeric20, text("10000")), numeric(1, 1, &[1]));
        assert_eq!(bytes(ColumnType::Numeric20, text("12345")), numeric(2, 1, &[1, 2345]));
        assert_eq!(bytes(ColumnType::Numeric20, text("99990000")), numeric(1, 1, &[9999]));
        assert_eq!(bytes(ColumnType::Numeric20, text("00042")), numeric(1, 0, &[42]));
    }

    #[test]
    fn text_uuid_and_json_are_their_bytes() {
        assert_eq!(
            bytes(ColumnType::Text, Value::Text("é\t日".into())),
            with_len("é\t日".as_bytes())
        );
        assert_eq!(bytes(ColumnType::Text, Value::Text("".into())), with_len(&[]));
        assert_eq!(
            bytes(
                ColumnType::Uuid,
                Value::Text("00112233-4455-6677-8899-aabbccddeeff".into())
            ),
            with_len(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        let mut jsonb = vec![1];
        jsonb.extend_from_slice("{\"a\":[\"ü\",\"日本\",null]}".as_bytes());
        assert_eq!(
            bytes(ColumnType::Json, Value::Json(json!({"a": ["ü", "日本", null]}))),
            with_len(&jsonb)
        );
    }

    #[test]
    fn a_value_that_does_not_fit_its_column_is_refused() {
        let mut out = Vec::new();
        assert!(push_value(&mut out, ColumnType::Uuid, &Value::Text("not a uuid".into())).is_none());
        assert!(push_value(&mut out, ColumnType::Numeric20, &Value::Text("-1".into())).is_none());
        assert!(push_value(&mut out, ColumnType::Int, &Value::Int(1 << 40)).is_none());
        assert!(push_value(&mut out, ColumnType::Date, &Value::Text("2024-01-01".into())).is_none());
    }

    #[test]
    fn a_stream_has_the_header_a_field_count_per_row_and_the_trailer() {
        let spec = crate::catalogue::Table::UserLocations.spec();
        let row = Row {
            values: spec.columns.iter().map(|_| Value::Null).collect(),
        };
        let data = encode(spec, &[row], Some([5i64].into_iter())).expect("encodes");
        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&((spec.columns.len() + 1) as i16).to_be_bytes());
        expected.extend_from_slice(&with_len(&5i64.to_be_bytes()));
        for _ in spec.columns {
            expected.extend_from_slice(&[0xff; 4]);
        }
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(data, expected);
    }
}
