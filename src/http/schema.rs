//! The JSON Schemas of the API's records and query values, built from the
//! catalogue: the published contract ([`super::openapi`]) and what the POST
//! handler validates against ([`super::validate`]).

use serde_json::{json, Map, Value};

use crate::catalogue::{self, Check, Column, ColumnType, DateWindow, Table};

/// A record of `table` as the API takes it: each column's canonical forms, the
/// fields a record must carry, ranges and allowed values. The POST handler checks
/// every record against this schema (see `validate.rs`), so it is the API's
/// contract; the topics' decoder is more lenient. Unknown fields are allowed (and
/// ignored).
pub fn record_schema(table: Table, window: &DateWindow) -> Value {
    let spec = table.spec();
    let years = window_years(window, chrono::Utc::now().date_naive());
    let derived = catalogue::derived_columns(table);
    let mut properties = Map::new();
    let mut required = Vec::new();
    let mut derivations = Vec::new();
    for column in spec.columns {
        let needed = column.required && !derived.contains(&column.name);
        if needed {
            required.push(json!(column.name));
        }
        let mut field = field_schema(column, needed);
        // Four bytes per character at most: within the key limit in any script.
        if column.ty == ColumnType::Text && spec.key.contains(&column.name) {
            field["maxLength"] = json!(catalogue::MAX_KEY_TEXT_BYTES / 4);
            field["description"] = json!(format!(
                "{} (a key column: at most {} characters)",
                field["description"].as_str().unwrap_or_default(),
                catalogue::MAX_KEY_TEXT_BYTES / 4
            ));
        }
        // events_part's dates: the whole years inside the window (the server checks
        // the window itself to the day, on the topics too).
        if let (Table::EventsPart, "event_date", Some((first, last))) = (table, column.name, years) {
            let leap_years = year_list(first, last, is_leap);
            field["pattern"] = json!(format!(
                "^{}$",
                date_pattern(
                    &year_list(first, last, |_| true).expect("first <= last"),
                    leap_years.as_deref()
                )
            ));
            field["minimum"] = json!(unix_seconds(first, false));
            field["maximum"] = json!(unix_seconds(last, true));
            field["description"] = json!(format!(
                "YYYY-MM-DD from {first}-01-01 to {last}-12-31, or Unix seconds (its UTC day)"
            ));
        }
        properties.insert(column.name.to_owned(), field);
        if let Some(source) = catalogue::derivation_source(table, column.name) {
            let bounds = match (table, years) {
                (Table::EventsPart, Some((first, last))) => (unix_seconds(first, false), unix_seconds(last, true)),
                _ => (UNIX_MIN, UNIX_MAX),
            };
            derivations.push(derivation(
                column.name,
                spec.column(source).expect("sources are columns"),
                bounds,
            ));
        }
    }
    let mut schema = json!({
        "type": "object",
        "description": format!(
            "A record of {} (natural key: {}). Fields not listed are ignored.",
            spec.name,
            spec.key.join(", ")
        ),
        "required": required,
        "properties": properties,
    });
    if !derivations.is_empty() {
        schema["allOf"] = Value::Array(derivations);
    }
    schema
}

/// A required column left out (or null) is derived from `source`, which must then
/// hold a value it can be derived from.
fn derivation(column: &str, source: &Column, (min, max): (i64, i64)) -> Value {
    let present = |name: &str| json!({ "required": [name], "properties": { name: { "not": { "type": "null" } } } });
    let usable = match source.ty {
        // event_date from event_timestamp: Unix seconds within the years dates take.
        ColumnType::BigInt => json!({
            "required": [source.name],
            "properties": { source.name: { "type": "integer", "minimum": min, "maximum": max } },
        }),
        _ => present(source.name),
    };
    json!({ "anyOf": [present(column), usable] })
}

/// The whole years inside `window` on `today` (the window only grows as days
/// pass); `None` when there is none or they are over 200 (the pattern would be
/// long: the generic date form stands, and the server checks the window).
fn window_years(window: &DateWindow, today: chrono::NaiveDate) -> Option<(i32, i32)> {
    use chrono::Datelike as _;
    let first = match window.min.ordinal() {
        1 => window.min.year(),
        _ => window.min.year() + 1,
    };
    let max = window.max(today);
    let last = match (max.month(), max.day()) {
        (12, 31) => max.year(),
        _ => max.year() - 1,
    };
    (first <= last && last - first <= 200 && last <= 9999).then_some((first, last))
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// `(?:2000|2001|…)`: the years from `first` to `last` that `keep`, if any.
fn year_list(first: i32, last: i32, keep: fn(i32) -> bool) -> Option<String> {
    let years: Vec<String> = (first..=last).filter(|y| keep(*y)).map(|y| format!("{y:04}")).collect();
    (!years.is_empty()).then(|| format!("(?:{})", years.join("|")))
}

/// Unix seconds of the first (or the last) second of `year`, UTC.
fn unix_seconds(year: i32, end: bool) -> i64 {
    let (month, day, time) = match end {
        false => (1, 1, chrono::NaiveTime::MIN),
        true => (12, 31, chrono::NaiveTime::from_hms_opt(23, 59, 59).expect("a time")),
    };
    chrono::NaiveDate::from_ymd_opt(year, month, day)
        .expect("a date")
        .and_time(time)
        .and_utc()
        .timestamp()
}

/// Years 0001 to 9999, four digits.
const YEAR: &str = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)";
/// The leap years among them.
const LEAP_YEAR: &str = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)";
/// Years 1000 to 9998: a timestamp with any UTC offset stays within years 1..9999.
const TS_YEAR: &str = "(?:[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])";
const TS_LEAP_YEAR: &str = "(?:[1-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[13579][26]|[2468][048])00)";
/// Unix seconds of 1000-01-01T00:00:00Z and 9998-12-31T23:59:59Z.
const UNIX_MIN: i64 = -30_610_224_000;
const UNIX_MAX: i64 = 253_370_764_799;
const NO_NUL: &str = "^[^\\x00]*$";

/// A calendar date (`YYYY-MM-DD`, days of each month, February 29th in leap years).
fn date_pattern(year: &str, leap_year: Option<&str>) -> String {
    let leap_day = leap_year.map(|leap| format!("|{leap}-02-29")).unwrap_or_default();
    format!(
        "(?:{year}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8])){leap_day})"
    )
}

fn timestamp_pattern() -> String {
    format!(
        "^{}[T ](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{{1,9}})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?$",
        date_pattern(TS_YEAR, Some(TS_LEAP_YEAR))
    )
}

/// The canonical text form of a value of type `ty`: what the query filters take,
/// and the string form a record's field may use.
fn text_form(ty: ColumnType) -> Value {
    match ty {
        ColumnType::BigInt => json!({ "pattern": "^-?[0-9]{1,18}$" }),
        ColumnType::Int => json!({ "pattern": "^-?[0-9]{1,9}$" }),
        ColumnType::Double => json!({ "pattern": "^-?[0-9]{1,15}(?:\\.[0-9]{1,15})?$" }),
        ColumnType::Bool => json!({ "pattern": "^(?:true|false|t|f|yes|no|1|0)$" }),
        ColumnType::Text | ColumnType::Json => json!({ "pattern": NO_NUL }),
        ColumnType::Date => json!({ "pattern": format!("^{}$", date_pattern(YEAR, Some(LEAP_YEAR))) }),
        ColumnType::Timestamp | ColumnType::TimestampTz => json!({ "pattern": timestamp_pattern() }),
        ColumnType::Numeric20 => json!({ "pattern": "^[0-9]{1,20}$" }),
        ColumnType::Uuid => json!({
            "format": "uuid",
            "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        }),
    }
}

/// One field: the forms the API takes; `null` stands for absent unless the field
/// is required. JSON Schema applies `minimum`/`maximum` to numbers and `pattern`
/// to strings, so one schema states both forms of a column.
fn field_schema(column: &Column, required: bool) -> Value {
    let mut schema = text_form(column.ty);
    let (types, description, bounds): (&[&str], &str, Option<(Value, Value)>) = match column.ty {
        ColumnType::BigInt => (
            &["integer", "string"],
            "an integer from -(2^63-1) to 2^63-1, or a string of at most 18 digits",
            // Not i64::MIN: a JSON number just below it reads as the same float.
            Some((json!(-i64::MAX), json!(i64::MAX))),
        ),
        ColumnType::Int => (
            &["integer", "string"],
            "an integer of 32 bits, or a string of at most 9 digits",
            Some((json!(i32::MIN), json!(i32::MAX))),
        ),
        ColumnType::Double => (&["number", "string"], "a number, or a string holding a decimal", None),
        ColumnType::Bool => (
            &["boolean", "integer", "string"],
            "true/false, 1/0, or \"true\", \"t\", \"yes\", \"1\" and their opposites",
            Some((json!(0), json!(1))),
        ),
        ColumnType::Text => (
            &["string", "number", "boolean"],
            "text with no NUL character (a number or boolean is kept as its text)",
            None,
        ),
        ColumnType::Date => (
            &["string", "number"],
            "YYYY-MM-DD (years 1 to 9999), or Unix seconds (its UTC day)",
            Some((json!(UNIX_MIN), json!(UNIX_MAX))),
        ),
        ColumnType::Timestamp | ColumnType::TimestampTz => (
            &["string", "number"],
            "RFC 3339 (`T` or a space; no offset means UTC; years 1000 to 9998), or Unix seconds",
            Some((json!(UNIX_MIN), json!(UNIX_MAX))),
        ),
        ColumnType::Numeric20 => (
            &["integer", "string"],
            "an unsigned integer of up to 20 digits, or a string of digits",
            Some((json!(0), json!(u64::MAX))),
        ),
        ColumnType::Uuid => (&["string"], "a UUID", None),
        ColumnType::Json => {
            schema = json!({ "$ref": JSON_VALUE_REF });
            (&[], "any JSON value with no NUL character in its strings", None)
        }
    };
    schema["description"] = json!(description);
    if let Some((lo, hi)) = bounds {
        schema["minimum"] = lo;
        schema["maximum"] = hi;
    }
    let mut types: Vec<&str> = types.to_vec();
    match column.check {
        Check::None => {}
        // A string holding a number would pass the range unchecked: numbers only.
        Check::Range(lo, hi) => {
            types.retain(|t| *t != "string");
            schema["minimum"] = json!(lo);
            schema["maximum"] = json!(hi);
            schema["description"] = json!(format!("a number from {lo} to {hi}"));
        }
        // The one such column (tmp_event_properties.properties) also takes its
        // object as a JSON string, AppMetrica's `event_json`.
        Check::Object => {
            schema = json!({
                "description": "a JSON object, or a string holding one",
                "anyOf": [
                    { "type": "object", "propertyNames": { "pattern": NO_NUL },
                      "additionalProperties": { "$ref": JSON_VALUE_REF } },
                    { "type": "string", "pattern": NO_NUL },
                ],
            });
        }
        Check::OneOf(allowed) => {
            let mut values: Vec<Value> = allowed.iter().map(|v| json!(v)).collect();
            if !required {
                values.push(Value::Null);
            }
            schema["enum"] = Value::Array(values);
        }
    }
    if !types.is_empty() {
        if !required {
            types.push("null");
        }
        schema["type"] = json!(types);
    } else if !required && column.check == Check::Object {
        schema["anyOf"]
            .as_array_mut()
            .expect("anyOf")
            .push(json!({ "type": "null" }));
    }
    schema
}

pub const JSON_VALUE: &str = "json_value";
const JSON_VALUE_REF: &str = "#/components/schemas/json_value";

/// Any JSON value PostgreSQL's jsonb stores: no NUL in any string or name.
pub fn json_value_schema() -> Value {
    json!({
        "description": "any JSON value with no NUL character in its strings",
        "anyOf": [
            { "type": ["null", "boolean", "number"] },
            { "type": "string", "pattern": NO_NUL },
            { "type": "array", "items": { "$ref": JSON_VALUE_REF } },
            { "type": "object", "propertyNames": { "pattern": NO_NUL },
              "additionalProperties": { "$ref": JSON_VALUE_REF } },
        ],
    })
}

/// A row as read back: the stored columns, plus `id` and `ingested_at`.
pub fn row_schema(table: Table) -> Value {
    let mut properties = Map::new();
    properties.insert("id".into(), json!({ "type": "integer" }));
    properties.insert("ingested_at".into(), json!({ "type": "string" }));
    for column in table.spec().columns {
        let ty = match column.ty {
            ColumnType::BigInt | ColumnType::Int => json!(["integer", "null"]),
            ColumnType::Double => json!(["number", "null"]),
            ColumnType::Bool => json!(["boolean", "null"]),
            ColumnType::Json => Value::Null,
            _ => json!(["string", "null"]),
        };
        properties.insert(
            column.name.to_owned(),
            if ty.is_null() { json!({}) } else { json!({ "type": ty }) },
        );
    }
    json!({ "type": "object", "required": ["id"], "properties": properties })
}

/// A key column in a query string: its canonical text.
pub fn query_schema(ty: ColumnType) -> Value {
    let mut schema = text_form(ty);
    schema["type"] = json!("string");
    schema
}
