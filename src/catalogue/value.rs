//! Typed column values and the decoding of one JSON value into one column.
//!
//! Guarantees: a value that decodes is representable in both PostgreSQL and SQLite
//! without a write-time error (no NUL characters, years 1..=9999, finite floats,
//! integers within their column's range), so one bad field is caught here, as a
//! rejection naming the field, instead of failing a whole batch in the database.

use std::borrow::Cow;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::Value as Json;
pub use smol_str::SmolStr;

/// The column types of TABLES.md, named after their PostgreSQL types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `bigint`
    BigInt,
    /// `int`
    Int,
    /// `double precision`
    Double,
    /// `boolean`
    Bool,
    /// `text`
    Text,
    /// `date`
    Date,
    /// `timestamp` (without time zone, always UTC)
    Timestamp,
    /// `timestamptz`
    TimestampTz,
    /// `numeric(20,0)`: an unsigned integer of up to 20 digits (AppMetrica device ids)
    Numeric20,
    /// `uuid`
    Uuid,
    /// `jsonb`
    Json,
}

impl ColumnType {
    /// The PostgreSQL type name, used in DDL-like casts.
    pub fn pg_type(self) -> &'static str {
        match self {
            ColumnType::BigInt => "bigint",
            ColumnType::Int => "integer",
            ColumnType::Double => "double precision",
            ColumnType::Bool => "boolean",
            ColumnType::Text => "text",
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamp",
            ColumnType::TimestampTz => "timestamptz",
            ColumnType::Numeric20 => "numeric(20,0)",
            ColumnType::Uuid => "uuid",
            ColumnType::Json => "jsonb",
        }
    }

    /// What a user is told a field should be.
    fn expected(self) -> &'static str {
        match self {
            ColumnType::BigInt | ColumnType::Int => "integer",
            ColumnType::Double => "number",
            ColumnType::Bool => "boolean",
            ColumnType::Text => "string",
            ColumnType::Date => "date (YYYY-MM-DD)",
            ColumnType::Timestamp | ColumnType::TimestampTz => "timestamp (RFC 3339 or Unix seconds)",
            ColumnType::Numeric20 => "unsigned integer of at most 20 digits",
            ColumnType::Uuid => "UUID",
            ColumnType::Json => "JSON value",
        }
    }
}

/// One typed column value. Device ids and UUIDs are kept as canonical text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(SmolStr),
    Date(NaiveDate),
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
    Json(Json),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The canonical text of a value: stable across releases, because event hashes
    /// are computed from it. `None` for NULL.
    pub fn canonical_text(&self) -> Option<String> {
        let mut text = String::new();
        self.write_canonical(&mut text).then_some(text)
    }

    /// Appends the canonical text to `out`; false (and nothing written) for NULL.
    /// Dates are `YYYY-MM-DD`, timestamps `YYYY-MM-DDTHH:MM:SS.ffffff` (with `Z`
    /// for `timestamptz`), JSON as serde_json writes it.
    pub fn write_canonical(&self, out: &mut String) -> bool {
        use std::fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = match self {
            Value::Null => return false,
            Value::Int(v) => {
                // The same digits as `Display`, without the formatter (event hash).
                out.push_str(itoa::Buffer::new().format(*v));
                Ok(())
            }
            Value::Float(v) => write!(out, "{v}"),
            Value::Bool(v) => write!(out, "{v}"),
            Value::Text(v) => out.write_str(v),
            Value::Date(v) => write_date(out, *v),
            Value::Timestamp(v) => write_timestamp(out, *v),
            Value::TimestampTz(v) => write_timestamp(out, v.naive_utc()).and_then(|()| out.write_char('Z')),
            // serde_json's map is ordered by key, so equal objects give equal text.
            Value::Json(v) => write!(out, "{v}"),
        };
        true
    }

    /// The value as a JSON value for API responses (timestamps in RFC 3339 form).
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Int(v) => Json::from(*v),
            Value::Float(v) => serde_json::Number::from_f64(*v).map_or(Json::Null, Json::Number),
            Value::Bool(v) => Json::Bool(*v),
            Value::Text(v) => Json::String(v.to_string()),
            Value::Date(v) => Json::String(v.format("%Y-%m-%d").to_string()),
            Value::Timestamp(v) => Json::String(v.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
            Value::TimestampTz(v) => Json::String(v.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string()),
            Value::Json(v) => v.clone(),
        }
    }

    /// Rough size of the value on the wire to the database, used to bound statements.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Value::Null => 2,
            Value::Int(_) | Value::Float(_) => 8,
            Value::Bool(_) => 1,
            Value::Text(v) => v.len(),
            Value::Date(_) => 10,
            Value::Timestamp(_) | Value::TimestampTz(_) => 27,
            Value::Json(v) => json_len(v),
        }
    }
}

/// `YYYY-MM-DD`, with integer arithmetic (years outside 0..=9999 as chrono writes them).
fn write_date(out: &mut String, date: NaiveDate) -> std::fmt::Result {
    let year = date.year();
    if !(0..=9999).contains(&year) {
        use std::fmt::Write as _;
        return write!(out, "{}", date.format("%Y-%m-%d"));
    }
    push_digits(out, year as u32, 4);
    out.push('-');
    push_digits(out, date.month(), 2);
    out.push('-');
    push_digits(out, date.day(), 2);
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` (microseconds, truncated).
fn write_timestamp(out: &mut String, at: NaiveDateTime) -> std::fmt::Result {
    use chrono::Timelike as _;
    if at.nanosecond() >= 1_000_000_000 {
        // A leap second: as chrono writes it.
        use std::fmt::Write as _;
        return write!(out, "{}", at.format("%Y-%m-%dT%H:%M:%S%.6f"));
    }
    write_date(out, at.date())?;
    out.push('T');
    push_digits(out, at.hour(), 2);
    out.push(':');
    push_digits(out, at.minute(), 2);
    out.push(':');
    push_digits(out, at.second(), 2);
    out.push('.');
    push_digits(out, at.nanosecond() / 1000, 6);
    Ok(())
}

/// The last `width` decimal digits of `value`, zero-padded.
fn push_digits(out: &mut String, value: u32, width: u32) {
    for place in (0..width).rev() {
        out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
    }
}

/// About how many bytes `v` takes as JSON text.
pub fn json_len(v: &Json) -> usize {
    match v {
        Json::Null | Json::Bool(_) => 5,
        Json::Number(_) => 8,
        Json::String(s) => s.len() + 2,
        Json::Array(items) => 2 + items.iter().map(|i| json_len(i) + 1).sum::<usize>(),
        Json::Object(map) => 2 + map.iter().map(|(k, v)| k.len() + 4 + json_len(v)).sum::<usize>(),
    }
}

/// Why one field could not be decoded; the caller adds the field name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldProblem {
    /// The value has the wrong type or form: `expected integer, got "abc"`.
    Expected { expected: &'static str, got: String },
    /// The value has the right form but is out of range or otherwise unusable.
    Invalid(String),
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldProblem::Expected { expected, got } => write!(f, "expected {expected}, got {got}"),
            FieldProblem::Invalid(detail) => f.write_str(detail),
        }
    }
}

/// A short rendering of a JSON value for error messages (never the whole payload).
pub fn describe(v: &Json) -> String {
    const MAX: usize = 40;
    // Strings are quoted as JSON writes them: control characters (NUL above all,
    // which a database refuses to store in the reason) come out escaped.
    let quoted = |s: &str| Json::String(s.to_owned()).to_string();
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) if s.chars().count() > MAX => {
            let head: String = s.chars().take(MAX).collect();
            let quoted = quoted(&head);
            format!("{}…\"", &quoted[..quoted.len() - 1])
        }
        Json::String(s) => quoted(s),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

fn expected(ty: ColumnType, got: &Json) -> FieldProblem {
    FieldProblem::Expected {
        expected: ty.expected(),
        got: describe(got),
    }
}

/// Decodes one non-null JSON value into a column of type `ty`.
pub fn decode(ty: ColumnType, raw: &Json) -> Result<Value, FieldProblem> {
    let bad = || expected(ty, raw);
    match ty {
        ColumnType::BigInt => integer(raw).ok_or_else(bad).map(Value::Int),
        ColumnType::Int => {
            let v = integer(raw).ok_or_else(bad)?;
            i32::try_from(v)
                .map(|_| Value::Int(v))
                .map_err(|_| FieldProblem::Invalid(format!("integer {v} is out of range for int")))
        }
        ColumnType::Double => {
            let v = match raw {
                Json::Number(n) => n.as_f64(),
                Json::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match v {
                Some(v) if v.is_finite() => Ok(Value::Float(v)),
                _ => Err(bad()),
            }
        }
        ColumnType::Bool => match raw {
            Json::Bool(b) => Ok(Value::Bool(*b)),
            Json::Number(n) if n.as_f64() == Some(1.0) => Ok(Value::Bool(true)),
            Json::Number(n) if n.as_f64() == Some(0.0) => Ok(Value::Bool(false)),
            Json::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "t" | "yes" => Ok(Value::Bool(true)),
                "false" | "0" | "f" | "no" => Ok(Value::Bool(false)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        },
        ColumnType::Text => match raw {
            Json::String(s) => no_nul(s).map(|_| Value::Text(s.into())),
            // Producers often send ids as numbers; the text of the number is the value.
            Json::Number(n) => Ok(Value::Text(n.to_string().into())),
            Json::Bool(b) => Ok(Value::Text(SmolStr::new_static(if *b { "true" } else { "false" }))),
            _ => Err(bad()),
        },
        ColumnType::Date => date(raw).ok_or_else(bad).and_then(checked_date).map(Value::Date),
        ColumnType::Timestamp => timestamp(raw)
            .ok_or_else(bad)
            .and_then(checked_timestamp)
            .map(|t| Value::Timestamp(t.naive_utc())),
        ColumnType::TimestampTz => timestamp(raw)
            .ok_or_else(bad)
            .and_then(checked_timestamp)
            .map(Value::TimestampTz),
        ColumnType::Numeric20 => {
            let digits = match raw {
                Json::Number(n) => n
                    .as_u64()
                    .or_else(|| {
                        // An integral float that u64 holds (JSON Schema's "integer").
                        let f = n.as_f64()?;
                        (f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f)).then_some(f as u64)
                    })
                    .map(|v| v.to_string()),
                Json::String(s) => {
                    let s = s.trim();
                    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.to_owned())
                }
                _ => None,
            }
            .ok_or_else(bad)?;
            let trimmed = digits.trim_start_matches('0');
            let canonical = if trimmed.is_empty() { "0" } else { trimmed };
            if canonical.len() > 20 {
                return Err(FieldProblem::Invalid(format!(
                    "{} has more than 20 digits",
                    describe(raw)
                )));
            }
            Ok(Value::Text(canonical.into()))
        }
        ColumnType::Uuid => match raw {
            Json::String(s) => uuid::Uuid::try_parse(s.trim())
                .map(|u| Value::Text(u.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).into()))
                .map_err(|_| bad()),
            _ => Err(bad()),
        },
        ColumnType::Json => {
            check_json_strings(raw)?;
            Ok(Value::Json(raw.clone()))
        }
    }
}

/// [`decode`] for an owned value: a string for a text column and any document
/// for a JSON column move into the value instead of being copied.
pub fn decode_owned(ty: ColumnType, raw: Json) -> Result<Value, FieldProblem> {
    match (ty, raw) {
        (ColumnType::Text, Json::String(s)) => no_nul(&s).map(|_| Value::Text(s.into())),
        (ColumnType::Json, raw) => {
            check_json_strings(&raw)?;
            Ok(Value::Json(raw))
        }
        (ty, raw) => decode(ty, &raw),
    }
}

/// A field read straight from the record's text for a column of its type:
/// the column's value where the text is already it (a string for a text
/// column, an integer in range for an integer column, an unsigned integer for
/// a device id), and otherwise the JSON value, for [`decode`] to take apart
/// and, if need be, refuse with its usual words. A `Value` here is always what
/// [`decode`] makes of the same JSON value.
///
/// The one enum of a field on its way to [`decode`]: read from the text here,
/// or taken from a parsed document (borrowed from it, or owned).
#[derive(Debug, Clone, PartialEq)]
pub enum Read<'a> {
    Value(Value),
    Json(Cow<'a, Json>),
}

impl Read<'static> {
    /// A JSON value of its own.
    pub fn json(json: Json) -> Read<'static> {
        Read::Json(Cow::Owned(json))
    }
}

/// Reads one JSON value as [`Read`] for a column of the type it holds.
pub(super) struct Reader(pub(super) ColumnType);

impl<'de> serde::de::DeserializeSeed<'de> for Reader {
    type Value = Read<'static>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Read<'static>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Reader {
    type Value = Read<'static>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Read<'static>, E> {
        Ok(Read::json(Json::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Read<'static>, E> {
        Ok(match self.0 {
            ColumnType::BigInt => Read::Value(Value::Int(v)),
            ColumnType::Int if i32::try_from(v).is_ok() => Read::Value(Value::Int(v)),
            _ => Read::json(Json::from(v)),
        })
    }

    fn visit_u64<E>(self, v: u64) -> Result<Read<'static>, E> {
        Ok(match (self.0, i64::try_from(v)) {
            (ColumnType::BigInt, Ok(v)) => Read::Value(Value::Int(v)),
            (ColumnType::Int, Ok(v)) if i32::try_from(v).is_ok() => Read::Value(Value::Int(v)),
            (ColumnType::Numeric20, _) => Read::Value(Value::Text(itoa::Buffer::new().format(v).into())),
            _ => Read::json(Json::from(v)),
        })
    }

    fn visit_f64<E>(self, v: f64) -> Result<Read<'static>, E> {
        Ok(Read::json(Json::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Read<'static>, E> {
        Ok(match self.0 {
            ColumnType::Text if !v.contains('\0') => Read::Value(Value::Text(v.into())),
            _ => Read::json(Json::String(v.to_owned())),
        })
    }

    fn visit_string<E>(self, v: String) -> Result<Read<'static>, E> {
        Ok(match self.0 {
            ColumnType::Text if !v.contains('\0') => Read::Value(Value::Text(v.into())),
            _ => Read::json(Json::String(v)),
        })
    }

    fn visit_unit<E>(self) -> Result<Read<'static>, E> {
        Ok(Read::Value(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Read<'static>, E> {
        Ok(Read::Value(Value::Null))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Read<'static>, A::Error> {
        serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(Read::json)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Read<'static>, A::Error> {
        serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Read::json)
    }
}

/// An integer from a JSON integer, an integral float, or a numeric string.
fn integer(raw: &Json) -> Option<i64> {
    match raw {
        // An integral float in i64's range is that integer, as JSON Schema's "integer"
        // says (1.0e3 is fine, 1.5 is not).
        Json::Number(n) => n.as_i64().or_else(|| {
            let f = n.as_f64()?;
            (f.fract() == 0.0 && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f))
                .then_some(f as i64)
        }),
        Json::String(s) => {
            let s = s.trim();
            s.parse::<i64>().ok().or_else(|| {
                let f = s.parse::<f64>().ok()?;
                (f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
            })
        }
        _ => None,
    }
}

fn no_nul(s: &str) -> Result<(), FieldProblem> {
    if s.contains('\0') {
        return Err(FieldProblem::Invalid("contains a NUL character".into()));
    }
    Ok(())
}

/// PostgreSQL's jsonb refuses `\u0000` anywhere inside a document.
fn check_json_strings(v: &Json) -> Result<(), FieldProblem> {
    match v {
        Json::String(s) => no_nul(s),
        Json::Array(items) => items.iter().try_for_each(check_json_strings),
        Json::Object(map) => map.iter().try_for_each(|(k, v)| {
            no_nul(k)?;
            check_json_strings(v)
        }),
        _ => Ok(()),
    }
}

fn checked_date(d: NaiveDate) -> Result<NaiveDate, FieldProblem> {
    if (1..=9999).contains(&d.year()) {
        Ok(d)
    } else {
        Err(FieldProblem::Invalid(format!("date {d} is outside years 1..9999")))
    }
}

fn checked_timestamp(t: DateTime<Utc>) -> Result<DateTime<Utc>, FieldProblem> {
    checked_date(t.date_naive()).map(|_| t)
}

/// Seconds since the Unix epoch, with an optional fraction.
fn from_unix(secs: f64) -> Option<DateTime<Utc>> {
    if !secs.is_finite() {
        return None;
    }
    let whole = secs.floor();
    let nanos = ((secs - whole) * 1e9).round() as u32;
    DateTime::from_timestamp(whole as i64, nanos.min(999_999_999))
}

/// A timestamp from RFC 3339, `YYYY-MM-DD HH:MM:SS[.f]` (UTC), a bare date
/// (midnight UTC) or Unix seconds as a number or numeric string.
pub fn timestamp(raw: &Json) -> Option<DateTime<Utc>> {
    match raw {
        Json::Number(n) => n
            .as_i64()
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .or_else(|| from_unix(n.as_f64()?)),
        Json::String(s) => parse_timestamp_text(s.trim()),
        _ => None,
    }
}

fn parse_timestamp_text(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(d.and_time(NaiveTime::MIN).and_utc());
    }
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0);
    }
    s.parse::<f64>().ok().and_then(from_unix)
}

/// A date from `YYYY-MM-DD`, or the UTC date of any timestamp form above.
fn date(raw: &Json) -> Option<NaiveDate> {
    if let Json::String(s) = raw {
        if let Ok(d) = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
            return Some(d);
        }
    }
    timestamp(raw).map(|t| t.date_naive())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(ty: ColumnType, raw: Json) -> Value {
        decode(ty, &raw).unwrap_or_else(|e| panic!("{raw} as {ty:?}: {e}"))
    }

    fn err(ty: ColumnType, raw: Json) -> String {
        match decode(ty, &raw) {
            Ok(v) => panic!("{raw} as {ty:?} decoded to {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn canonical_dates_and_timestamps_read_as_chrono_writes_them() {
        let dates = [
            (1, 1, 1),
            (999, 12, 31),
            (1999, 2, 28),
            (2000, 2, 29),
            (2026, 11, 27),
            (9999, 12, 31),
        ];
        let times = [
            (0, 0, 0, 0),
            (9, 5, 7, 1_000),
            (23, 59, 59, 999_999_999),
            (12, 30, 0, 123_456_789),
        ];
        for (y, m, d) in dates {
            let date = NaiveDate::from_ymd_opt(y, m, d).expect("a date");
            assert_eq!(
                Value::Date(date).canonical_text(),
                Some(date.format("%Y-%m-%d").to_string())
            );
            for (h, min, s, nanos) in times {
                let at = date.and_hms_nano_opt(h, min, s, nanos).expect("a time");
                assert_eq!(
                    Value::Timestamp(at).canonical_text(),
                    Some(at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
                );
                assert_eq!(
                    Value::TimestampTz(at.and_utc()).canonical_text(),
                    Some(at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
                );
            }
        }
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("a leap second");
        assert_eq!(
            Value::Timestamp(leap).canonical_text().as_deref(),
            Some("2016-12-31T23:59:60.500000")
        );
        assert_eq!(
            Value::Date(NaiveDate::from_ymd_opt(2000, 1, 2).expect("a date"))
                .canonical_text()
                .as_deref(),
            Some("2000-01-02")
        );
        assert_eq!(Value::Null.canonical_text(), None);
        assert_eq!(Value::Float(0.5).canonical_text().as_deref(), Some("0.5"));
        assert_eq!(Value::Bool(true).canonical_text().as_deref(), Some("true"));
    }

    #[test]
    fn integers_accept_numbers_and_numeric_strings() {
        assert_eq!(ok(ColumnType::BigInt, json!(42)), Value::Int(42));
        assert_eq!(ok(ColumnType::BigInt, json!("42")), Value::Int(42));
        assert_eq!(ok(ColumnType::BigInt, json!(" -7 ")), Value::Int(-7));
        assert_eq!(ok(ColumnType::BigInt, json!(1.0e3)), Value::Int(1000));
        assert_eq!(ok(ColumnType::Int, json!("250")), Value::Int(250));
        assert_eq!(err(ColumnType::Int, json!("abc")), "expected integer, got \"abc\"");
        assert_eq!(err(ColumnType::BigInt, json!(1.5)), "expected integer, got 1.5");
        assert_eq!(err(ColumnType::BigInt, json!(true)), "expected integer, got true");
        assert_eq!(
            err(ColumnType::Int, json!(99_999_999_999_i64)),
            "integer 99999999999 is out of range for int"
        );
    }

    #[test]
    fn doubles_are_finite() {
        assert_eq!(ok(ColumnType::Double, json!("55.75")), Value::Float(55.75));
        assert_eq!(ok(ColumnType::Double, json!(3)), Value::Float(3.0));
        assert_eq!(err(ColumnType::Double, json!("NaN")), "expected number, got \"NaN\"");
        assert_eq!(err(ColumnType::Double, json!("inf")), "expected number, got \"inf\"");
    }

    #[test]
    fn booleans_accept_common_spellings() {
        assert_eq!(ok(ColumnType::Bool, json!(true)), Value::Bool(true));
        assert_eq!(ok(ColumnType::Bool, json!("false")), Value::Bool(false));
        assert_eq!(ok(ColumnType::Bool, json!(1)), Value::Bool(true));
        assert_eq!(ok(ColumnType::Bool, json!("0")), Value::Bool(false));
        assert_eq!(err(ColumnType::Bool, json!("maybe")), "expected boolean, got \"maybe\"");
    }

    #[test]
    fn text_takes_scalars_but_not_nul_or_objects() {
        assert_eq!(ok(ColumnType::Text, json!("x")), Value::Text("x".into()));
        assert_eq!(ok(ColumnType::Text, json!(12)), Value::Text("12".into()));
        assert_eq!(err(ColumnType::Text, json!({"a": 1})), "expected string, got an object");
        assert_eq!(err(ColumnType::Text, json!("a\u{0}b")), "contains a NUL character");
    }

    #[test]
    fn described_values_escape_control_characters() {
        assert_eq!(describe(&json!("\u{0}abc")), r#""\u0000abc""#);
        assert_eq!(describe(&json!("a\"b\nc")), r#""a\"b\nc""#);
        let long = format!("\u{0}{}", "x".repeat(60));
        let described = describe(&json!(long));
        assert!(
            described.starts_with(r#""\u0000xxx"#) && described.ends_with("x…\""),
            "{described}"
        );
        assert!(!described.contains('\0'));
        assert_eq!(
            err(ColumnType::Uuid, json!("\u{0}abc")),
            r#"expected UUID, got "\u0000abc""#
        );
    }

    #[test]
    fn timestamps_accept_rfc3339_naive_and_unix_seconds() {
        let expect = NaiveDate::from_ymd_opt(2024, 3, 1)
            .and_then(|d| d.and_hms_opt(12, 30, 0))
            .map(|t| t.and_utc());
        for raw in [
            json!("2024-03-01T12:30:00Z"),
            json!("2024-03-01T15:30:00+03:00"),
            json!("2024-03-01 12:30:00"),
            json!(1_709_296_200),
            json!("1709296200"),
        ] {
            assert_eq!(Some(ok(ColumnType::TimestampTz, raw)), expect.map(Value::TimestampTz));
        }
        assert_eq!(
            ok(ColumnType::Timestamp, json!(1_709_296_200.25)),
            Value::Timestamp(
                DateTime::from_timestamp(1_709_296_200, 250_000_000)
                    .expect("valid")
                    .naive_utc()
            )
        );
        assert!(err(ColumnType::Timestamp, json!("yesterday")).starts_with("expected timestamp"));
        assert_eq!(
            err(ColumnType::TimestampTz, json!("10000-01-01T00:00:00Z")),
            "expected timestamp (RFC 3339 or Unix seconds), got \"10000-01-01T00:00:00Z\""
        );
        assert_eq!(
            err(ColumnType::Timestamp, json!(-70_000_000_000_i64)),
            "date -0249-10-15 is outside years 1..9999"
        );
    }

    #[test]
    fn dates_accept_dates_and_timestamps() {
        let d = NaiveDate::from_ymd_opt(2024, 2, 29).expect("valid");
        assert_eq!(ok(ColumnType::Date, json!("2024-02-29")), Value::Date(d));
        assert_eq!(ok(ColumnType::Date, json!("2024-02-29T23:00:00Z")), Value::Date(d));
        assert_eq!(
            err(ColumnType::Date, json!("2023-02-29")),
            "expected date (YYYY-MM-DD), got \"2023-02-29\""
        );
    }

    #[test]
    fn device_ids_are_canonical_digits() {
        assert_eq!(
            ok(ColumnType::Numeric20, json!("18446744073709551615")),
            Value::Text("18446744073709551615".into())
        );
        assert_eq!(ok(ColumnType::Numeric20, json!(7)), Value::Text("7".into()));
        assert_eq!(ok(ColumnType::Numeric20, json!("0007")), Value::Text("7".into()));
        assert_eq!(
            err(ColumnType::Numeric20, json!("-1")),
            "expected unsigned integer of at most 20 digits, got \"-1\""
        );
        assert_eq!(
            err(ColumnType::Numeric20, json!("123456789012345678901")),
            "\"123456789012345678901\" has more than 20 digits"
        );
        // A JSON number beyond u64 arrives as a float and has lost digits already.
        assert!(err(ColumnType::Numeric20, json!(1e20)).starts_with("expected unsigned"));
    }

    #[test]
    fn uuids_are_lowercase_hyphenated() {
        assert_eq!(
            ok(ColumnType::Uuid, json!("A0EEBC999C0B4EF8BB6D6BB9BD380A11")),
            Value::Text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into())
        );
        assert_eq!(err(ColumnType::Uuid, json!("nope")), "expected UUID, got \"nope\"");
    }

    #[test]
    fn json_refuses_nul_anywhere() {
        assert_eq!(ok(ColumnType::Json, json!([1, "a"])), Value::Json(json!([1, "a"])));
        assert_eq!(
            err(ColumnType::Json, json!({"k": ["x\u{0}"]})),
            "contains a NUL character"
        );
    }

    #[test]
    fn long_strings_are_shortened_in_messages() {
        let long = "x".repeat(100);
        let msg = err(ColumnType::BigInt, json!(long));
        assert!(msg.len() < 80, "{msg}");
        assert!(msg.ends_with("…\""), "{msg}");
    }

    #[test]
    fn canonical_text_is_stable() {
        let t = DateTime::from_timestamp(1_709_296_200, 0).expect("valid");
        assert_eq!(
            Value::TimestampTz(t).canonical_text().as_deref(),
            Some("2024-03-01T12:30:00.000000Z")
        );
        assert_eq!(
            Value::Json(json!({"b": 1, "a": 2})).canonical_text().as_deref(),
            Some(r#"{"a":2,"b":1}"#)
        );
        assert_eq!(Value::Float(0.1).canonical_text().as_deref(), Some("0.1"));
        assert_eq!(Value::Null.canonical_text(), None);
    }
}
