//! Logs API rows → table records (TABLES.md, "Where AppMetrica data goes"). Pure.
//!
//! Guarantees: the same window mapped twice gives the same records and keys:
//! events get their `event_hash` from the catalogue (a hash of their fields) and
//! `dup_seq` numbers identical events of the window 0, 1, 2… in any order; a row
//! that cannot be mapped is an error naming why, and the window goes on.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Map, Value};

use crate::catalogue::{self, Table, Value as Typed};

/// events_part columns that come from the configuration or are derived, not
/// exported.
const NOT_EXPORTED: &[&str] = &["application_id", "event_date", "event_hash", "dup_seq"];

/// The fields requested from each export: what its mapping reads.
pub fn fields(endpoint: &str) -> Vec<&'static str> {
    let (own, device): (&[&str], bool) = match endpoint {
        "events" => {
            return Table::EventsPart
                .spec()
                .columns
                .iter()
                .map(|c| c.name)
                .filter(|name| !NOT_EXPORTED.contains(name))
                .chain(["event_json"])
                .collect()
        }
        "installations" => (&["install_timestamp", "install_receive_timestamp"], true),
        "sessions_starts" => (&["session_start_timestamp", "session_start_receive_timestamp"], true),
        "profiles_v2" => return PROFILE_IDS.iter().chain(PREDEFINED).copied().collect(),
        _ => (&[], false),
    };
    let device: &[&str] = if device { EXPORTED_DEVICE_FIELDS } else { &[] };
    own.iter().chain(device).copied().collect()
}

/// The device fields the installations and sessions_starts exports carry.
const EXPORTED_DEVICE_FIELDS: &[&str] = &[
    "appmetrica_device_id",
    "os_name",
    "os_version",
    "device_manufacturer",
    "device_model",
    "device_type",
    "device_locale",
    "google_aid",
    "ios_ifa",
    "ios_ifv",
    "app_package_name",
    "app_version_name",
    "operator_name",
    "mcc",
    "mnc",
];

/// A record to publish: its table, its natural key (the Kafka key) and itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub table: Table,
    pub key: String,
    pub record: Value,
}

/// Checks `record` against its table once and keys it.
fn keyed(table: Table, record: Map<String, Value>, what: &str) -> Result<Mapped, String> {
    let row = catalogue::decode_record(table, &record)
        .map_err(|e| format!("{what}: {e}"))?
        .row;
    Ok(Mapped {
        table,
        key: catalogue::natural_key(table.spec(), &row),
        record: Value::Object(record),
    })
}

/// Device fields copied to mobile_devices from any export that has them.
const DEVICE_FIELDS: &[&str] = &[
    "appmetrica_device_id",
    "os_name",
    "os_version",
    "device_manufacturer",
    "device_model",
    "original_device_model",
    "device_type",
    "device_locale",
    "google_aid",
    "ios_ifa",
    "ios_ifv",
    "windows_aid",
    "android_id",
    "oaid",
    "app_package_name",
    "app_version_name",
    "app_build_number",
    "operator_name",
    "mcc",
    "mnc",
];

/// Predefined profile attributes: they go to permanent_user_properties.
const PREDEFINED: &[&str] = &[
    "name",
    "gender",
    "birth_date",
    "notifications_enabled",
    "first_session_date",
];
/// Profile fields that identify rather than describe.
const PROFILE_IDS: &[&str] = &["profile_id", "appmetrica_device_id"];

/// Maps the rows of one window.
#[derive(Debug)]
pub struct Mapper {
    application_id: i64,
    endpoint: String,
    day: NaiveDate,
    /// Occurrences so far of each event hash in this window (keyed by a 128-bit
    /// digest of the hash: 20 bytes an event, so a large window stays small).
    seen: HashMap<u128, u32>,
}

impl Mapper {
    pub fn new(application_id: i64, endpoint: &str, day: NaiveDate) -> Self {
        Mapper {
            application_id,
            endpoint: endpoint.to_owned(),
            day,
            seen: HashMap::new(),
        }
    }

    /// The records of one exported row, each checked once and keyed.
    pub fn map(&mut self, row: Map<String, Value>) -> Result<Vec<Mapped>, String> {
        match self.endpoint.as_str() {
            "events" => self.event(row),
            "installations" => self
                .device(
                    &row,
                    &["install_timestamp"],
                    &["install_receive_timestamp", "install_timestamp"],
                )
                .map(|d| vec![d]),
            "sessions_starts" => self
                .device(
                    &row,
                    &["session_start_timestamp"],
                    &["session_start_receive_timestamp", "session_start_timestamp"],
                )
                .map(|d| vec![d]),
            "profiles_v2" => self.profile(row),
            other => Err(format!("no mapping for export \"{other}\"")),
        }
    }

    fn event(&mut self, row: Map<String, Value>) -> Result<Vec<Mapped>, String> {
        let mut event = Map::new();
        event.insert("application_id".into(), json!(self.application_id));
        for column in Table::EventsPart.spec().columns {
            if let Some(value) = row.get(column.name).filter(|v| !is_blank(v)) {
                event.insert(column.name.to_owned(), value.clone());
            }
        }
        let mut decoded = catalogue::decode_record(Table::EventsPart, &event).map_err(|e| format!("event: {e}"))?;
        let spec = Table::EventsPart.spec();
        let text = |column: &str| decoded.row.get(spec, column).and_then(Typed::canonical_text);
        let hash = text("event_hash").ok_or("event without a hash")?;
        let occurrence = self
            .seen
            .entry(xxhash_rust::xxh3::xxh3_128(hash.as_bytes()))
            .or_insert(0);
        let dup_seq = *occurrence;
        *occurrence += 1;
        event.insert("event_hash".into(), json!(hash));
        event.insert("dup_seq".into(), json!(dup_seq));
        let event_date = text("event_date").ok_or("event without a date")?;
        // The decoded row keys the event: only its occurrence number changes.
        if let Some(i) = spec.index_of("dup_seq") {
            decoded.row.values[i] = Typed::Int(i64::from(dup_seq));
        }
        let mut records = vec![Mapped {
            table: Table::EventsPart,
            key: catalogue::natural_key(spec, &decoded.row),
            record: Value::Null,
        }];
        if let Some(properties) = row.get("event_json").filter(|v| !is_blank(v)) {
            let record = json!({
                    "application_id": self.application_id,
                    "event_date": event_date,
                    "event_hash": hash,
                    "dup_seq": dup_seq,
                    "event_name": event.get("event_name"),
                    "event_timestamp": event.get("event_timestamp"),
                    "appmetrica_device_id": event.get("appmetrica_device_id"),
                    "properties": properties,
                    "source": "appmetrica",
            });
            records.push(keyed(
                Table::TmpEventProperties,
                into_object(record),
                "event properties",
            )?);
        }
        records.push(self.device(
            &row,
            &["event_timestamp"],
            &["event_receive_timestamp", "event_timestamp"],
        )?);
        records[0].record = Value::Object(event);
        Ok(records)
    }

    /// A mobile_devices record: seen first at the first of `first` present, last
    /// at the first of `last` present.
    fn device(&self, row: &Map<String, Value>, first: &[&str], last: &[&str]) -> Result<Mapped, String> {
        let pick = |names: &[&str]| names.iter().find_map(|n| row.get(*n).filter(|v| !is_blank(v)).cloned());
        let mut device = Map::new();
        device.insert("application_id".into(), json!(self.application_id));
        for field in DEVICE_FIELDS {
            if let Some(value) = row.get(*field).filter(|v| !is_blank(v)) {
                device.insert((*field).to_owned(), value.clone());
            }
        }
        let first_seen = pick(first).or_else(|| pick(last));
        let last_seen = pick(last).or_else(|| pick(first));
        if let Some(v) = first_seen {
            device.insert("first_seen_at".into(), v);
        }
        if let Some(v) = last_seen {
            device.insert("last_seen_at".into(), v);
        }
        keyed(Table::MobileDevices, device, "device")
    }

    fn profile(&self, row: Map<String, Value>) -> Result<Vec<Mapped>, String> {
        let profile_id = row
            .get("profile_id")
            .filter(|v| !is_blank(v))
            .ok_or("profile without profile_id")?
            .clone();
        let device = row.get("appmetrica_device_id").filter(|v| !is_blank(v)).cloned();
        let snapshot: DateTime<Utc> = self.day.and_hms_opt(23, 59, 59).unwrap_or_default().and_utc();
        let mut permanent = Map::new();
        permanent.insert("application_id".into(), json!(self.application_id));
        permanent.insert("profile_id".into(), profile_id.clone());
        if let Some(device) = &device {
            permanent.insert("appmetrica_device_id".into(), device.clone());
        }
        for field in PREDEFINED {
            if let Some(value) = row.get(*field).filter(|v| !is_blank(v)) {
                permanent.insert((*field).to_owned(), value.clone());
            }
        }
        permanent.insert("updated_at".into(), json!(snapshot.to_rfc3339()));
        let mut records = vec![keyed(Table::PermanentUserProperties, permanent, "profile")?];
        for (name, value) in &row {
            if PREDEFINED.contains(&name.as_str()) || PROFILE_IDS.contains(&name.as_str()) || is_blank(value) {
                continue;
            }
            let (value_text, value_json) = match value {
                Value::String(s) => (Some(s.clone()), None),
                other => (None, Some(other.clone())),
            };
            let property = json!({
                "application_id": self.application_id,
                "profile_id": profile_id,
                "property_name": name,
                "property_kind": "temporary",
                "value_text": value_text,
                "value_json": value_json,
                "snapshot_date": self.day.to_string(),
                "appmetrica_device_id": device,
                "source": "appmetrica",
            });
            records.push(keyed(
                Table::TmpUserProperties,
                into_object(property),
                &format!("property {name}"),
            )?);
        }
        Ok(records)
    }
}

/// The map of a `json!({...})` value (an empty map otherwise, which the
/// catalogue then refuses for its missing fields).
fn into_object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day() -> NaiveDate {
        NaiveDate::from_ymd_opt(2024, 3, 1).expect("date")
    }

    fn event(name: &str, ts: &str) -> Map<String, Value> {
        let v = json!({
            "event_name": name, "event_timestamp": ts, "event_receive_timestamp": "1709290000",
            "appmetrica_device_id": "12345678901234567890", "os_name": "android", "mcc": "250",
            "event_json": "{\"sum\":\"10\"}", "session_id": "10000000001"
        });
        v.as_object().cloned().expect("object")
    }

    fn keys(records: &[Mapped]) -> Vec<(Table, String, u64)> {
        records
            .iter()
            .filter(|m| m.table == Table::EventsPart)
            .map(|m| {
                (
                    m.table,
                    m.record["event_hash"].as_str().unwrap_or_default().to_owned(),
                    m.record["dup_seq"].as_u64().unwrap_or(99),
                )
            })
            .collect()
    }

    #[test]
    fn events_feed_three_tables_with_numbers_as_strings() {
        let mut mapper = Mapper::new(42, "events", day());
        let records = mapper.map(event("purchase", "1709289000")).expect("maps");
        let tables: Vec<Table> = records.iter().map(|m| m.table).collect();
        assert_eq!(
            tables,
            [Table::EventsPart, Table::TmpEventProperties, Table::MobileDevices]
        );
        for m in &records {
            let decoded =
                catalogue::decode_json(m.table, m.record.clone()).unwrap_or_else(|e| panic!("{}: {e}", m.table));
            let natural = catalogue::natural_key(m.table.spec(), &decoded.row);
            assert_eq!(m.key, natural, "{}: the key is the record's natural key", m.table);
        }
        assert_eq!(records[0].record["application_id"], 42);
        assert_eq!(records[1].record["event_hash"], records[0].record["event_hash"]);
        assert_eq!(
            records[1].key, records[0].key,
            "an event and its properties share the key"
        );
        assert_eq!(records[2].record["last_seen_at"], "1709290000");
        assert_eq!(records[2].record["first_seen_at"], "1709289000");
    }

    #[test]
    fn identical_events_get_occurrence_numbers_in_any_order_and_refetches_repeat_keys() {
        let rows = [
            event("a", "1709289000"),
            event("b", "1709289001"),
            event("a", "1709289000"),
        ];
        let run = |order: &[usize]| {
            let mut mapper = Mapper::new(1, "events", day());
            let mut all: Vec<_> = order
                .iter()
                .flat_map(|i| keys(&mapper.map(rows[*i].clone()).expect("maps")))
                .collect();
            all.sort();
            all
        };
        let first = run(&[0, 1, 2]);
        assert_eq!(
            first.iter().filter(|(_, _, seq)| *seq == 1).count(),
            1,
            "the twin is numbered 1"
        );
        assert_eq!(first.len(), 3);
        assert_eq!(run(&[2, 0, 1]), first, "same keys whatever the order");
        assert_eq!(run(&[0, 1, 2]), first, "same keys when fetched again");
    }

    #[test]
    fn devices_and_profiles_map_and_bad_rows_say_why() {
        let mut installs = Mapper::new(1, "installations", day());
        let row = json!({"appmetrica_device_id": "77", "install_timestamp": "1709289000", "os_name": "ios"});
        let records = installs.map(row.as_object().cloned().expect("object")).expect("maps");
        assert_eq!(records[0].table, Table::MobileDevices);
        assert_eq!(records[0].key, "1|77");
        assert_eq!(records[0].record["first_seen_at"], "1709289000");
        assert_eq!(records[0].record["last_seen_at"], "1709289000");

        let mut profiles = Mapper::new(1, "profiles_v2", day());
        let row = json!({"profile_id": "p1", "gender": "female", "notifications_enabled": "true",
                         "plan": "gold", "score": 12, "empty": ""});
        let records = profiles.map(row.as_object().cloned().expect("object")).expect("maps");
        let tables: Vec<Table> = records.iter().map(|m| m.table).collect();
        assert_eq!(
            tables,
            [
                Table::PermanentUserProperties,
                Table::TmpUserProperties,
                Table::TmpUserProperties
            ]
        );
        assert_eq!(records[0].record["updated_at"], "2024-03-01T23:59:59+00:00");
        assert_eq!(records[0].key, "1|p1");
        let plan = records
            .iter()
            .find(|m| m.record["property_name"] == "plan")
            .expect("plan");
        assert_eq!(
            (
                plan.record["value_text"].as_str(),
                plan.record["snapshot_date"].as_str()
            ),
            (Some("gold"), Some("2024-03-01"))
        );
        assert_eq!(plan.key, "1|p1|plan|2024-03-01");
        let score = records
            .iter()
            .find(|m| m.record["property_name"] == "score")
            .expect("score");
        assert_eq!(score.record["value_json"], 12);

        let mut events = Mapper::new(1, "events", day());
        let mut bad = event("x", "1709289000");
        bad.insert("mcc".into(), json!("not a number"));
        assert_eq!(
            events.map(bad).unwrap_err(),
            "event: field \"mcc\": expected integer, got \"not a number\""
        );
        let mut anonymous = Mapper::new(1, "profiles_v2", day());
        assert_eq!(anonymous.map(Map::new()).unwrap_err(), "profile without profile_id");
    }
}
