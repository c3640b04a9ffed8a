//! The table catalogue: the single place that knows the seven DWH tables.
//!
//! Guarantees: [`decode_record`] turns a JSON object into a [`Row`] whose values are
//! aligned with [`TableSpec::columns`], typed, checked and complete (every required
//! column present, derived columns filled in), or into a [`RecordError`] whose text
//! names the field and the problem. It performs no I/O.

pub mod admit;
pub mod envelope;
pub mod fields;
mod tables;
pub mod value;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value as Json};

pub use admit::decoder_threads;
pub use tables::{Check, Column, ConflictPolicy, TableSpec};
pub use value::{ColumnType, Value};
use value::{FieldProblem, Read};

/// One of the seven DWH tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    EventsPart,
    MobileDevices,
    PermanentUserProperties,
    TechnicalData,
    TmpEventProperties,
    TmpUserProperties,
    UserLocations,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::EventsPart,
        Table::MobileDevices,
        Table::PermanentUserProperties,
        Table::TechnicalData,
        Table::TmpEventProperties,
        Table::TmpUserProperties,
        Table::UserLocations,
    ];

    pub fn spec(self) -> &'static TableSpec {
        match self {
            Table::EventsPart => &tables::EVENTS_PART,
            Table::MobileDevices => &tables::MOBILE_DEVICES,
            Table::PermanentUserProperties => &tables::PERMANENT_USER_PROPERTIES,
            Table::TechnicalData => &tables::TECHNICAL_DATA,
            Table::TmpEventProperties => &tables::TMP_EVENT_PROPERTIES,
            Table::TmpUserProperties => &tables::TMP_USER_PROPERTIES,
            Table::UserLocations => &tables::USER_LOCATIONS,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The valid names, comma-separated, for error messages.
    pub fn valid_names() -> String {
        Table::ALL.map(Table::name).join(", ")
    }
}

impl serde::Serialize for Table {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A table name that is not one of the seven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown table \"{0}\"; valid tables: {valid}", valid = Table::valid_names())]
pub struct UnknownTable(pub String);

impl FromStr for Table {
    type Err = UnknownTable;

    /// Accepts `user_locations` and `user-locations` alike.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normalized = s.trim().replace('-', "_").to_ascii_lowercase();
        Table::ALL
            .into_iter()
            .find(|t| t.name() == normalized)
            .ok_or_else(|| UnknownTable(s.to_owned()))
    }
}

/// A decoded record: one value per column of its table, in catalogue order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub values: Vec<Value>,
}

impl Row {
    /// Size estimate used to bound database statements by bytes. Backend-independent,
    /// so that the same records are chunked the same way on PostgreSQL and SQLite.
    pub fn approx_bytes(&self) -> usize {
        self.values.iter().map(|v| v.approx_bytes() + 1).sum()
    }

    pub fn get(&self, spec: &TableSpec, column: &str) -> Option<&Value> {
        spec.index_of(column).map(|i| &self.values[i])
    }
}

/// The natural key of a row as one string, used as the Kafka message key so that
/// every version of a key lands in the same partition, in order. Values are joined
/// by `|`; NULL is empty.
pub fn natural_key(spec: &TableSpec, row: &Row) -> String {
    let parts: Vec<String> = spec
        .key
        .iter()
        .map(|column| {
            row.get(spec, column)
                .and_then(Value::canonical_text)
                .unwrap_or_default()
        })
        .collect();
    parts.join("|")
}

/// Why a record was rejected. The text is what producers and ops read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record has no value (a tombstone or an empty message)")]
    Empty,
    #[error("record is not valid UTF-8 (first bad byte at {0})")]
    NotUtf8(usize),
    #[error("record is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("record must be a JSON object, got {0}")]
    NotAnObject(String),
    #[error("missing required field \"{0}\"")]
    Missing(&'static str),
    #[error("field \"{field}\": {problem}")]
    Field { field: &'static str, problem: FieldProblem },
    #[error("record is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl RecordError {
    /// A bounded name of the error, for metrics labels.
    pub fn class(&self) -> &'static str {
        match self {
            RecordError::Empty => "empty",
            RecordError::NotUtf8(_) => "not_utf8",
            RecordError::InvalidJson(_) => "invalid_json",
            RecordError::NotAnObject(_) => "not_an_object",
            RecordError::Missing(_) => "missing_field",
            RecordError::Field { .. } => "invalid_field",
            RecordError::TooLarge { .. } => "too_large",
        }
    }
}

/// A decoded record and what was noticed on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub row: Row,
    /// Fields the table does not have; ignored, counted for metrics.
    pub unknown_fields: usize,
}

/// Decodes raw bytes (a Kafka record value) into a row of `table`. Fields are
/// read straight into their columns' values where the text allows
/// ([`value::Read`]), with no JSON value in between.
pub fn decode_bytes(table: Table, bytes: &[u8]) -> Result<Decoded, RecordError> {
    if bytes.is_empty() {
        return Err(RecordError::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RecordError::NotUtf8(e.valid_up_to()))?;
    let fields = read_slots::<Read>(table, text)?;
    decode_fields(table, fields.values.into_iter(), fields.unknown)
}

/// Reads a record's text into `table`'s column slots, undecoded: what the API
/// checks against its schema before [`decode_fields_read`] takes the values.
pub fn read_record(table: Table, text: &str) -> Result<fields::Fields, RecordError> {
    read_slots(table, text)
}

fn read_slots<S: fields::Slot>(table: Table, text: &str) -> Result<fields::Fields<S>, RecordError> {
    let invalid = |e: serde_json::Error| RecordError::InvalidJson(e.to_string());
    if !text.trim_start_matches([' ', '\n', '\r', '\t']).starts_with('{') {
        // Not an object: parsed whole, to name what it is (or why it is not JSON).
        let other: Json = serde_json::from_str(text).map_err(invalid)?;
        return Err(RecordError::NotAnObject(value::describe(&other)));
    }
    fields::read(table, text).map_err(invalid)
}

/// Decodes the slots [`read_record`] filled, moving their strings and
/// documents into the row.
pub fn decode_fields_read(table: Table, fields: fields::Fields) -> Result<Decoded, RecordError> {
    decode_fields(
        table,
        fields.values.into_iter().map(|v| v.map(Read::json)),
        fields.unknown,
    )
}

/// Decodes any JSON value, rejecting what is not an object.
pub fn decode_json(table: Table, json: Json) -> Result<Decoded, RecordError> {
    match json {
        Json::Object(map) => decode_record(table, &map),
        other => Err(RecordError::NotAnObject(value::describe(&other))),
    }
}

/// Decodes one JSON object into a row of `table`.
pub fn decode_record(table: Table, record: &Map<String, Json>) -> Result<Decoded, RecordError> {
    // One pass over the fields, in name order (the map's), each placed where
    // the last one found leaves off, else by binary search.
    let mut slots: Vec<Option<Read<'_>>> = std::iter::repeat_with(|| None)
        .take(table.spec().columns.len())
        .collect();
    let mut unknown_fields = 0;
    let mut guess = 0;
    for (name, value) in record {
        match fields::locate(table, name, guess) {
            Some((sorted, column)) => {
                guess = sorted + 1;
                slots[column] = Some(Read::Json(Cow::Borrowed(value)));
            }
            None => unknown_fields += 1,
        }
    }
    decode_fields(table, slots.into_iter(), unknown_fields)
}

/// Decodes a record given as one field per column (`None`: absent). Owned
/// strings and JSON documents move into the row.
fn decode_fields<'a>(
    table: Table,
    fields: impl Iterator<Item = Option<Read<'a>>>,
    unknown_fields: usize,
) -> Result<Decoded, RecordError> {
    let spec = table.spec();
    let mut values = Vec::with_capacity(spec.columns.len());
    for (column, raw) in spec.columns.iter().zip(fields) {
        let value = match raw {
            None | Some(Read::Value(Value::Null)) => Value::Null,
            Some(Read::Json(raw)) if raw.is_null() => Value::Null,
            Some(raw) => decode_field(table, column, raw)?,
        };
        values.push(value);
    }
    let mut row = Row { values };
    // Fields the producer must send are named before those derived from them, so a
    // missing event_timestamp is reported as such, not as a missing event_date.
    let derived = derived_columns(table);
    missing(spec, &row, |c| !derived.contains(&c))?;
    derive(table, &mut row)?;
    missing(spec, &row, |_| true)?;
    Ok(Decoded { row, unknown_fields })
}

fn decode_field(table: Table, column: &'static Column, raw: Read<'_>) -> Result<Value, RecordError> {
    let field_error = |problem| RecordError::Field {
        field: column.name,
        problem,
    };
    // Event properties sent as a JSON string (AppMetrica's `event_json`) are parsed;
    // a string that is not a JSON object is kept verbatim by `derive`.
    if table == Table::TmpEventProperties && column.name == "properties" {
        if let Read::Json(raw) = &raw {
            if let Json::String(text) = raw.as_ref() {
                return match serde_json::from_str::<Json>(text) {
                    Ok(parsed @ Json::Object(_)) => decode_field(table, column, Read::Json(Cow::Owned(parsed))),
                    _ => value::decode(ColumnType::Text, raw).map_err(field_error),
                };
            }
        }
    }
    // A string for a text column and a document for a JSON column are the value
    // itself: moved when owned, and shown from the value when refused.
    let (value, source) = match raw {
        Read::Value(value) => (value, None),
        Read::Json(Cow::Owned(raw @ (Json::String(_) | Json::Object(_) | Json::Array(_))))
            if matches!(column.ty, ColumnType::Text | ColumnType::Json) =>
        {
            (value::decode_owned(column.ty, raw).map_err(field_error)?, None)
        }
        Read::Json(raw) => (value::decode(column.ty, &raw).map_err(field_error)?, Some(raw)),
    };
    let shown = || match &source {
        Some(raw) => value::describe(raw),
        None => value::describe(&value.to_json()),
    };
    check(column, &value, shown).map_err(field_error)?;
    if let Value::Text(text) = &value {
        if text.len() > MAX_KEY_TEXT_BYTES && table.spec().key.contains(&column.name) {
            return Err(field_error(FieldProblem::Invalid(format!(
                "{} is {} bytes, over the {MAX_KEY_TEXT_BYTES}-byte limit of a key column",
                shown(),
                text.len()
            ))));
        }
    }
    Ok(value)
}

/// Checks `value` against its column's rule; `shown` renders the field for the error.
fn check(column: &Column, value: &Value, shown: impl Fn() -> String) -> Result<(), FieldProblem> {
    match (column.check, value) {
        (Check::None, _) => Ok(()),
        (Check::Range(lo, hi), Value::Float(v)) if (lo..=hi).contains(v) => Ok(()),
        (Check::Range(lo, hi), _) => Err(FieldProblem::Invalid(format!("{} is outside {lo}..{hi}", shown()))),
        (Check::OneOf(allowed), Value::Text(v)) if allowed.contains(&v.as_str()) => Ok(()),
        (Check::OneOf(allowed), _) => Err(FieldProblem::Invalid(format!(
            "{} is not one of {}",
            shown(),
            allowed.join(", ")
        ))),
        (Check::Object, Value::Json(Json::Object(_))) => Ok(()),
        (Check::Object, _) => Err(FieldProblem::Expected {
            expected: "JSON object",
            got: shown(),
        }),
    }
}

fn missing(spec: &TableSpec, row: &Row, consider: impl Fn(&str) -> bool) -> Result<(), RecordError> {
    let absent = spec
        .columns
        .iter()
        .zip(&row.values)
        .find(|(c, v)| c.required && v.is_null() && consider(c.name));
    match absent {
        Some((column, _)) => Err(RecordError::Missing(column.name)),
        None => Ok(()),
    }
}

/// Required columns that [`derive`] can fill in.
pub fn derived_columns(table: Table) -> &'static [&'static str] {
    match table {
        Table::EventsPart => &["event_date", "event_hash", "dup_seq"],
        Table::TmpEventProperties => &["event_date", "dup_seq"],
        Table::MobileDevices => &["first_seen_at", "last_seen_at"],
        _ => &[],
    }
}

/// The `event_date`s `events_part` accepts: each month gets a partition, so a
/// date from a producer's bug (year 9999) would otherwise add partitions that
/// every later query pays for. A date outside is a reject naming the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateWindow {
    pub min: chrono::NaiveDate,
    pub max_days_ahead: u32,
}

impl Default for DateWindow {
    fn default() -> Self {
        DateWindow {
            min: chrono::NaiveDate::from_ymd_opt(2000, 1, 1).expect("a date"),
            max_days_ahead: 366,
        }
    }
}

impl DateWindow {
    /// The last date accepted on `today`.
    pub fn max(&self, today: chrono::NaiveDate) -> chrono::NaiveDate {
        today + chrono::Days::new(u64::from(self.max_days_ahead))
    }

    /// Checks a decoded row of `table` (only `events_part` is partitioned by date).
    pub fn check(&self, table: Table, row: &Row, today: chrono::NaiveDate) -> Result<(), RecordError> {
        if table != Table::EventsPart {
            return Ok(());
        }
        let Some(Value::Date(date)) = row.get(table.spec(), "event_date") else {
            return Ok(());
        };
        let max = self.max(today);
        if *date < self.min || *date > max {
            return Err(RecordError::Field {
                field: "event_date",
                problem: FieldProblem::Invalid(format!(
                    "{date} is outside the accepted window {}..{max} (DWH_EVENTS_MIN_DATE, DWH_EVENTS_MAX_DAYS_AHEAD)",
                    self.min
                )),
            });
        }
        Ok(())
    }
}

/// The longest text a natural-key column takes, in bytes: a table's key (at most
/// two text columns) stays within PostgreSQL's B-tree entry limit (2,704 bytes).
pub const MAX_KEY_TEXT_BYTES: usize = 1024;

/// The field a derived column is computed from when the record leaves it out, for
/// the columns that have one (`event_hash` and `dup_seq` need none).
pub fn derivation_source(table: Table, column: &str) -> Option<&'static str> {
    match (table, column) {
        (Table::EventsPart | Table::TmpEventProperties, "event_date") => Some("event_timestamp"),
        (Table::MobileDevices, "first_seen_at") => Some("last_seen_at"),
        (Table::MobileDevices, "last_seen_at") => Some("first_seen_at"),
        _ => None,
    }
}

/// Fills in the columns TABLES.md derives when a producer leaves them out.
fn derive(table: Table, row: &mut Row) -> Result<(), RecordError> {
    let spec = table.spec();
    let set_if_null = |row: &mut Row, column: &str, value: Value| {
        if let Some(i) = spec.index_of(column) {
            if row.values[i].is_null() {
                row.values[i] = value;
            }
        }
    };
    match table {
        Table::EventsPart | Table::TmpEventProperties => {
            set_if_null(row, "dup_seq", Value::Int(0));
            if row.get(spec, "event_date").is_some_and(Value::is_null) {
                if let Some(Value::Int(secs)) = row.get(spec, "event_timestamp") {
                    let date = chrono::DateTime::from_timestamp(*secs, 0)
                        .map(|t| t.date_naive())
                        .filter(|d| (1..=9999).contains(&chrono::Datelike::year(d)))
                        .ok_or(RecordError::Field {
                            field: "event_timestamp",
                            problem: FieldProblem::Invalid(format!(
                                "{secs} is outside years 1..9999, so event_date cannot be derived"
                            )),
                        })?;
                    set_if_null(row, "event_date", Value::Date(date));
                }
            }
            if table == Table::EventsPart {
                if row.get(spec, "event_hash").is_some_and(Value::is_null) {
                    let hash = event_hash(spec, row);
                    set_if_null(row, "event_hash", Value::Text(hash));
                }
            } else if let Some(i) = spec.index_of("properties") {
                // `properties` that arrived as text that is not a JSON object is kept
                // verbatim in raw_properties, and properties becomes `{}`.
                if let Value::Text(raw) = &row.values[i] {
                    let raw = Value::Text(raw.clone());
                    row.values[i] = Value::Json(Json::Object(Map::new()));
                    set_if_null(row, "raw_properties", raw);
                }
            }
        }
        Table::MobileDevices => {
            // A device seen once has one timestamp; either bound defaults to the other.
            let first = row.get(spec, "first_seen_at").cloned().unwrap_or(Value::Null);
            let last = row.get(spec, "last_seen_at").cloned().unwrap_or(Value::Null);
            set_if_null(row, "first_seen_at", last);
            set_if_null(row, "last_seen_at", first);
        }
        _ => {}
    }
    Ok(())
}

/// The fields that identify an event, version 1: frozen. The hash reads these
/// names and no others, so a column added to `events_part` later changes no
/// stored key; a new identity needs a new version, never an edit of this list.
pub const EVENT_HASH_V1_FIELDS: &[&str] = &[
    "application_id",
    "event_date",
    "event_name",
    "event_timestamp",
    "event_datetime",
    "event_receive_timestamp",
    "event_receive_datetime",
    "session_id",
    "installation_id",
    "appmetrica_device_id",
    "profile_id",
    "device_manufacturer",
    "device_model",
    "original_device_model",
    "device_type",
    "device_locale",
    "os_name",
    "os_version",
    "device_ipv6",
    "connection_type",
    "operator_name",
    "mcc",
    "mnc",
    "city",
    "country_iso_code",
    "google_aid",
    "ios_ifa",
    "ios_ifv",
    "windows_aid",
    "app_version_name",
    "app_build_number",
    "app_package_name",
];

/// The stable hash that identifies an event when the producer sends none: 128 bits
/// of XXH3 over the [`EVENT_HASH_V1_FIELDS`] that are not NULL (name and
/// canonical text, so `"123"` and `123` hash alike), behind a version tag.
/// Lowercase hex. A NULL field and an absent column hash alike, so a column that
/// is added (nullable) or dropped leaves every stored hash as it was.
pub fn event_hash(spec: &TableSpec, row: &Row) -> value::SmolStr {
    // The columns of the frozen fields, looked up once per table spec.
    static EVENTS_PART: std::sync::OnceLock<Vec<(&'static str, Option<usize>)>> = std::sync::OnceLock::new();
    let lookup = || -> Vec<(&'static str, Option<usize>)> {
        EVENT_HASH_V1_FIELDS
            .iter()
            .map(|name| (*name, spec.index_of(name)))
            .collect()
    };
    let own;
    let fields = if std::ptr::eq(spec, Table::EventsPart.spec()) {
        EVENTS_PART.get_or_init(lookup)
    } else {
        own = lookup();
        &own
    };
    // The whole input in one buffer, hashed at once: the same digest as feeding
    // XXH3 piece by piece, at a fraction of the cost for pieces this small. The
    // buffer is the thread's, reused from row to row.
    thread_local! {
        static INPUT: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(512));
    }
    let digest = INPUT.with(|input| {
        let mut input = input.borrow_mut();
        input.clear();
        input.push_str("event-hash-v1\x1e");
        for (name, index) in fields {
            let start = input.len();
            input.push_str(name);
            input.push('\x1f');
            if index.is_some_and(|i| row.values[i].write_canonical(&mut input)) {
                input.push('\x1e');
            } else {
                input.truncate(start);
            }
        }
        xxhash_rust::xxh3::xxh3_128(input.as_bytes())
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = HEX[(digest >> (124 - 4 * i)) as usize & 0xf];
    }
    // ASCII digits: always UTF-8.
    value::SmolStr::new(std::str::from_utf8(&hex).unwrap_or_default())
}

/// A record that could not be decoded, kept with where it came from and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRecord {
    pub table: Table,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: String,
    /// A bounded name of the reason (`invalid_json`, `refused`, ...) for metrics.
    pub class: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn decode(table: Table, v: Json) -> Result<Decoded, String> {
        decode_record(table, &obj(v)).map_err(|e| e.to_string())
    }

    fn valid_event() -> Json {
        json!({
            "application_id": "4242",
            "event_name": "app_open",
            "event_timestamp": 1_709_296_200,
            "appmetrica_device_id": "18446744073709551615",
            "mcc": "250",
            "os_name": "android",
            "unexpected": 1
        })
    }

    /// One minimal valid record per table, as a producer would send it.
    fn minimal(table: Table) -> Json {
        match table {
            Table::EventsPart => valid_event(),
            Table::MobileDevices => json!({
                "application_id": 1, "appmetrica_device_id": "77",
                "first_seen_at": "2024-03-01T00:00:00Z", "last_seen_at": 1_709_300_000
            }),
            Table::PermanentUserProperties => json!({
                "application_id": 1, "profile_id": "p1", "notifications_enabled": "true",
                "first_session_date": "2024-01-02", "updated_at": "2024-03-01T00:00:00Z"
            }),
            Table::TechnicalData => json!({
                "uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "app": 5, "event_type": "click",
                "server_upload_time": "2024-03-01 10:00:00.123", "data": {"k": [1, 2]},
                "paying": false, "sample_rate": 0.5
            }),
            Table::TmpEventProperties => json!({
                "application_id": 1, "event_hash": "abc", "event_name": "purchase",
                "event_timestamp": 1_709_296_200, "properties": "{\"sum\": 10}", "source": "appmetrica"
            }),
            Table::TmpUserProperties => json!({
                "application_id": 1, "profile_id": "p1", "property_name": "plan",
                "property_kind": "temporary", "value_text": "gold", "snapshot_date": "2024-03-01",
                "source": "appmetrica"
            }),
            Table::UserLocations => json!({
                "uuid": "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "event_time": 1_709_296_200,
                "latitude": "55.75", "longitude": 37.61
            }),
        }
    }

    #[test]
    fn table_names_accept_dashes_and_list_valid_ones_when_unknown() {
        assert_eq!("user-locations".parse::<Table>(), Ok(Table::UserLocations));
        assert_eq!("events_part".parse::<Table>(), Ok(Table::EventsPart));
        let err = "users".parse::<Table>().expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown table \"users\"; valid tables: events_part, mobile_devices, \
             permanent_user_properties, technical_data, tmp_event_properties, \
             tmp_user_properties, user_locations"
        );
    }

    #[test]
    fn every_table_has_its_key_among_required_columns() {
        for table in Table::ALL {
            let spec = table.spec();
            for i in spec.key_indexes() {
                assert!(
                    spec.columns[i].required,
                    "{table}: key column {} nullable",
                    spec.columns[i].name
                );
            }
            if let ConflictPolicy::NewestWins {
                version: Some(v),
                keep_earliest,
            } = spec.policy
            {
                assert!(spec.column(v).is_some_and(|c| c.required), "{table}: version {v}");
                if let Some(k) = keep_earliest {
                    assert!(spec.column(k).is_some(), "{table}: {k}");
                }
            }
        }
    }

    #[test]
    fn minimal_records_of_every_table_decode() {
        for table in Table::ALL {
            let decoded = decode(table, minimal(table)).unwrap_or_else(|e| panic!("{table}: {e}"));
            assert_eq!(decoded.row.values.len(), table.spec().columns.len(), "{table}");
        }
    }

    #[test]
    fn reading_from_the_text_decodes_as_the_parsed_value_does() {
        // What `decode_bytes` reads straight into a value must be what the JSON
        // path makes of the same field: the same row, or the same words of refusal.
        let long = "k".repeat(MAX_KEY_TEXT_BYTES + 1);
        let values = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(1),
            json!(-1),
            json!(i32::MAX),
            json!(i64::from(i32::MAX) + 1),
            json!(i64::from(i32::MIN) - 1),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(18_446_744_073_709_551_616.0),
            json!(1.5),
            json!(1e3),
            json!(45.25),
            json!(""),
            json!("abc"),
            json!("a\u{0}b"),
            json!("123"),
            json!(" 42 "),
            json!("permanent"),
            json!("2024-03-01"),
            json!("2024-03-01T10:00:00.123456Z"),
            json!("550e8400-e29b-41d4-a716-446655440000"),
            json!("{\"k\": 1}"),
            json!(long),
            json!([1, "a"]),
            json!({"a": 1}),
            json!({"a": "\u{0}"}),
        ];
        let (mut direct, mut accepted, mut refused) = (0, 0, 0);
        for table in Table::ALL {
            for column in table.spec().columns {
                for value in &values {
                    let mut record = obj(minimal(table));
                    record.insert(column.name.into(), value.clone());
                    let text = Json::Object(record.clone()).to_string();
                    let read = decode_bytes(table, text.as_bytes()).map_err(|e| e.to_string());
                    let parsed = decode_record(table, &record).map_err(|e| e.to_string());
                    assert_eq!(read, parsed, "{table}.{} = {value}", column.name);
                    let slots = fields::read::<value::Read>(table, &text).expect("an object");
                    let at = table.spec().index_of(column.name).expect("a column");
                    direct += usize::from(matches!(&slots.values[at], Some(value::Read::Value(v)) if !v.is_null()));
                    match read {
                        Ok(_) => accepted += 1,
                        Err(_) => refused += 1,
                    }
                }
            }
        }
        // Each path was taken, and both outcomes seen, many times over.
        let total = accepted + refused;
        assert!(direct > total / 10, "{direct} of {total} read straight");
        assert!(
            accepted > total / 4 && refused > total / 4,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn natural_keys_join_the_key_columns() {
        let devices = decode(Table::MobileDevices, minimal(Table::MobileDevices)).expect("decodes");
        let spec = Table::MobileDevices.spec();
        let expected: Vec<String> = spec
            .key
            .iter()
            .map(|c| {
                devices
                    .row
                    .get(spec, c)
                    .and_then(Value::canonical_text)
                    .expect("key set")
            })
            .collect();
        assert_eq!(natural_key(spec, &devices.row), expected.join("|"));
        for table in Table::ALL {
            let row = decode(table, minimal(table)).expect("decodes").row;
            let key = natural_key(table.spec(), &row);
            assert_eq!(key.split('|').count(), table.spec().key.len(), "{table}: {key}");
            assert!(
                key.split('|').all(|part| !part.is_empty()),
                "{table}: every key part is set: {key}"
            );
        }
    }

    #[test]
    fn every_required_field_of_every_table_is_named_when_missing() {
        for table in Table::ALL {
            let spec = table.spec();
            for column in spec.columns.iter().filter(|c| c.required) {
                let mut record = obj(minimal(table));
                record.remove(column.name);
                // Derived columns are filled in, not rejected.
                let derived = derived_columns(table).contains(&column.name);
                match decode_record(table, &record) {
                    Ok(_) if derived => {}
                    Ok(_) => panic!("{table}: missing {} accepted", column.name),
                    Err(e) if derived => panic!("{table}: derived {} rejected: {e}", column.name),
                    Err(e) => assert_eq!(
                        e.to_string(),
                        format!("missing required field \"{}\"", column.name),
                        "{table}"
                    ),
                }
            }
        }
    }

    #[test]
    fn every_typed_field_of_every_table_names_itself_when_wrong() {
        for table in Table::ALL {
            for column in table.spec().columns {
                if matches!(column.ty, ColumnType::Text | ColumnType::Json) {
                    continue;
                }
                let mut record = obj(minimal(table));
                record.insert(column.name.into(), json!("abc"));
                let err = decode_record(table, &record).expect_err(column.name).to_string();
                assert!(
                    err.starts_with(&format!("field \"{}\": expected ", column.name)),
                    "{table}.{}: {err}",
                    column.name
                );
            }
        }
    }

    #[test]
    fn events_get_typed_values_and_derived_columns() {
        let decoded = decode(Table::EventsPart, valid_event()).expect("valid");
        let spec = Table::EventsPart.spec();
        let row = &decoded.row;
        assert_eq!(row.get(spec, "application_id"), Some(&Value::Int(4242)));
        assert_eq!(row.get(spec, "mcc"), Some(&Value::Int(250)));
        assert_eq!(
            row.get(spec, "event_date"),
            Some(&Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 3, 1).expect("date")))
        );
        assert_eq!(row.get(spec, "dup_seq"), Some(&Value::Int(0)));
        assert_eq!(decoded.unknown_fields, 1);
        let Some(Value::Text(hash)) = row.get(spec, "event_hash") else {
            panic!("no hash");
        };
        assert_eq!(hash.len(), 32);
    }

    #[test]
    fn event_hash_is_stable_across_spellings_and_differs_between_events() {
        let a = decode(Table::EventsPart, valid_event()).expect("valid");
        let mut spelled = obj(valid_event());
        spelled.insert("application_id".into(), json!(4242));
        spelled.insert("event_timestamp".into(), json!("1709296200"));
        spelled.insert("event_date".into(), json!("2024-03-01"));
        let b = decode_record(Table::EventsPart, &spelled).expect("valid");
        assert_eq!(a.row, b.row);
        let mut other = obj(valid_event());
        other.insert("event_name".into(), json!("app_close"));
        let c = decode_record(Table::EventsPart, &other).expect("valid");
        let spec = Table::EventsPart.spec();
        assert_ne!(a.row.get(spec, "event_hash"), c.row.get(spec, "event_hash"));
        // Pinned (version 1), because stored keys depend on it: a change here
        // duplicates every event on the next refetch, replay or restore.
        assert_eq!(
            a.row.get(spec, "event_hash"),
            Some(&Value::Text("75a213c99394eeb9cda859fcb0e5e453".into()))
        );
    }

    #[test]
    fn the_event_hash_ignores_nulls_and_columns_outside_its_frozen_list() {
        let spec = Table::EventsPart.spec();
        let decoded = decode(Table::EventsPart, valid_event()).expect("valid");
        let hash = event_hash(spec, &decoded.row);
        // A nullable column added to the table, NULL in old records, or holding a
        // value (it is not in the v1 list): the hash stays.
        let mut columns = spec.columns.to_vec();
        columns.push(Column {
            name: "added_later",
            ..*spec.column("city").expect("a nullable text column")
        });
        let grown = TableSpec {
            columns: Box::leak(columns.into_boxed_slice()),
            ..*spec
        };
        let mut row = decoded.row.clone();
        row.values.push(Value::Null);
        assert_eq!(event_hash(&grown, &row), hash);
        *row.values.last_mut().expect("pushed") = Value::Text("x".into());
        assert_eq!(event_hash(&grown, &row), hash);
        // Every frozen field is a column today, and each one counts.
        for name in EVENT_HASH_V1_FIELDS {
            assert!(spec.index_of(name).is_some(), "{name} is a column");
        }
        let mut other = decoded.row.clone();
        let i = spec.index_of("event_name").expect("column");
        other.values[i] = Value::Text("another".into());
        assert_ne!(event_hash(spec, &other), hash);
        // A NULL field hashes like an absent one: not like an empty string.
        let i = spec.index_of("city").expect("column");
        let mut empty = decoded.row.clone();
        empty.values[i] = Value::Text("".into());
        let mut null = decoded.row.clone();
        null.values[i] = Value::Null;
        assert_ne!(event_hash(spec, &empty), event_hash(spec, &null));
    }

    #[test]
    fn a_sent_event_hash_is_kept() {
        let mut record = obj(valid_event());
        record.insert("event_hash".into(), json!("producer-hash"));
        let decoded = decode_record(Table::EventsPart, &record).expect("valid");
        assert_eq!(
            decoded.row.get(Table::EventsPart.spec(), "event_hash"),
            Some(&Value::Text("producer-hash".into()))
        );
    }

    #[test]
    fn field_errors_name_field_and_value() {
        let mut record = obj(valid_event());
        record.insert("mcc".into(), json!("abc"));
        assert_eq!(
            decode_record(Table::EventsPart, &record).map_err(|e| e.to_string()),
            Err("field \"mcc\": expected integer, got \"abc\"".into())
        );
        let mut record = obj(valid_event());
        record.remove("event_name");
        assert_eq!(
            decode_record(Table::EventsPart, &record).map_err(|e| e.to_string()),
            Err("missing required field \"event_name\"".into())
        );
        let mut record = obj(valid_event());
        record.insert("event_name".into(), Json::Null);
        assert_eq!(
            decode_record(Table::EventsPart, &record).map_err(|e| e.to_string()),
            Err("missing required field \"event_name\"".into())
        );
    }

    #[test]
    fn checks_apply_ranges_and_choices() {
        let mut record = obj(minimal(Table::UserLocations));
        record.insert("latitude".into(), json!(91));
        assert_eq!(
            decode_record(Table::UserLocations, &record).map_err(|e| e.to_string()),
            Err("field \"latitude\": 91 is outside -90..90".into())
        );
        let mut record = obj(minimal(Table::UserLocations));
        record.insert("longitude".into(), json!("-180"));
        assert!(decode_record(Table::UserLocations, &record).is_ok());
        let mut record = obj(minimal(Table::TmpUserProperties));
        record.insert("property_kind".into(), json!("forever"));
        assert_eq!(
            decode_record(Table::TmpUserProperties, &record).map_err(|e| e.to_string()),
            Err("field \"property_kind\": \"forever\" is not one of permanent, temporary".into())
        );
    }

    #[test]
    fn event_properties_parse_json_text_and_keep_invalid_text_raw() {
        let spec = Table::TmpEventProperties.spec();
        let decoded = decode(Table::TmpEventProperties, minimal(Table::TmpEventProperties)).expect("valid");
        assert_eq!(
            decoded.row.get(spec, "properties"),
            Some(&Value::Json(json!({"sum": 10})))
        );
        assert_eq!(decoded.row.get(spec, "raw_properties"), Some(&Value::Null));

        let mut record = obj(minimal(Table::TmpEventProperties));
        record.insert("properties".into(), json!("{not json"));
        let decoded = decode_record(Table::TmpEventProperties, &record).expect("valid");
        assert_eq!(decoded.row.get(spec, "properties"), Some(&Value::Json(json!({}))));
        assert_eq!(
            decoded.row.get(spec, "raw_properties"),
            Some(&Value::Text("{not json".into()))
        );

        let mut record = obj(minimal(Table::TmpEventProperties));
        record.insert("properties".into(), json!([1, 2]));
        assert_eq!(
            decode_record(Table::TmpEventProperties, &record).map_err(|e| e.to_string()),
            Err("field \"properties\": expected JSON object, got an array".into())
        );
    }

    #[test]
    fn devices_default_one_seen_bound_to_the_other() {
        let spec = Table::MobileDevices.spec();
        let mut record = obj(minimal(Table::MobileDevices));
        record.remove("first_seen_at");
        let decoded = decode_record(Table::MobileDevices, &record).expect("valid");
        assert_eq!(
            decoded.row.get(spec, "first_seen_at"),
            decoded.row.get(spec, "last_seen_at")
        );
        record.remove("last_seen_at");
        assert_eq!(
            decode_record(Table::MobileDevices, &record).map_err(|e| e.to_string()),
            Err("missing required field \"first_seen_at\"".into())
        );
    }

    #[test]
    fn raw_bytes_are_checked_for_utf8_json_and_shape() {
        assert_eq!(
            decode_bytes(Table::EventsPart, b"{\"a\": \"\xff\"}").map_err(|e| e.to_string()),
            Err("record is not valid UTF-8 (first bad byte at 7)".into())
        );
        let err = decode_bytes(Table::EventsPart, b"{oops")
            .expect_err("bad json")
            .to_string();
        assert!(err.starts_with("record is not valid JSON: "), "{err}");
        assert_eq!(
            decode_bytes(Table::EventsPart, b"[1]").map_err(|e| e.to_string()),
            Err("record must be a JSON object, got an array".into())
        );
        let good = serde_json::to_vec(&valid_event()).expect("json");
        assert!(decode_bytes(Table::EventsPart, &good).is_ok());
    }
}
