//! Sample records for the demo, the benchmark and tests: realistic, valid,
//! deterministic, and distinct by natural key for distinct `(seed, index)`; plus
//! one invalid record of every kind the ingest rejects.

use serde_json::{json, Value};

use crate::catalogue::Table;

const EVENT_NAMES: [&str; 6] = [
    "app_open",
    "screen_view",
    "purchase",
    "add_to_cart",
    "search",
    "app_close",
];
const CITIES: [(&str, f64, f64); 4] = [
    ("Moscow", 55.75, 37.62),
    ("Saint Petersburg", 59.94, 30.31),
    ("Kazan", 55.79, 49.12),
    ("Novosibirsk", 55.03, 82.92),
];
/// 2024-03-01T00:00:00Z.
const BASE_TS: i64 = 1_709_251_200;

/// `n` valid records of `table`; records `(seed, i)` never share a natural key with
/// another `(seed', i')` for seeds below 1,000 and `i` below 10,000,000.
pub fn records(table: Table, n: usize, seed: u64) -> Vec<Value> {
    (0..n).map(|i| record(table, seed * 10_000_000 + i as u64)).collect()
}

/// Record number `k` of `table`.
pub fn record(table: Table, k: u64) -> Value {
    let device = (17_000_000_000_000_000_000u64 + k).to_string();
    let (city, lat, lon) = CITIES[(k % CITIES.len() as u64) as usize];
    let ts = BASE_TS + (k as i64 * 7) % (30 * 86_400);
    let uuid = format!("{:08x}-0000-4000-8000-{:012x}", (k >> 48) as u32, k & 0xffff_ffff_ffff);
    match table {
        Table::EventsPart => json!({
            "application_id": 4242,
            "event_name": EVENT_NAMES[(k % EVENT_NAMES.len() as u64) as usize],
            "event_timestamp": ts,
            "event_receive_timestamp": ts + 3,
            "session_id": 10_000_000 + k,
            "appmetrica_device_id": device,
            "profile_id": format!("user-{}", k % 50_000),
            "device_manufacturer": "Samsung",
            "device_model": "SM-G991B",
            "os_name": if k % 3 == 0 { "ios" } else { "android" },
            "os_version": "14",
            "device_locale": "ru_RU",
            "connection_type": "wifi",
            "operator_name": "MTS",
            "mcc": 250,
            "mnc": 1,
            "city": city,
            "country_iso_code": "RU",
            "app_version_name": "5.12.0",
            "app_build_number": 51200,
            "app_package_name": "com.example.app",
        }),
        Table::MobileDevices => json!({
            "application_id": 4242,
            "appmetrica_device_id": device,
            "os_name": "android",
            "os_version": "14",
            "device_manufacturer": "Google",
            "device_model": "Pixel 8",
            "device_type": "phone",
            "device_locale": "ru_RU",
            "app_package_name": "com.example.app",
            "app_version_name": "5.12.0",
            "app_build_number": 51200,
            "operator_name": "Beeline",
            "mcc": 250,
            "mnc": 99,
            "first_seen_at": ts,
            "last_seen_at": ts + 86_400,
        }),
        Table::PermanentUserProperties => json!({
            "application_id": 4242,
            "profile_id": format!("user-{k}"),
            "appmetrica_device_id": device,
            "gender": if k % 2 == 0 { "female" } else { "male" },
            "birth_date": "1990-05-17",
            "name": format!("User {k}"),
            "notifications_enabled": k % 4 != 0,
            "first_session_date": "2024-02-11",
            "updated_at": ts,
        }),
        Table::TechnicalData => json!({
            "uuid": uuid,
            "app": 4242,
            "event_type": "session_start",
            "user_id": format!("user-{k}"),
            "device_id": device,
            "session_id": 10_000_000 + k,
            "event_time": ts,
            "server_upload_time": ts + 2,
            "platform": "Android",
            "os_name": "android",
            "device_brand": "Google",
            "library": "amplitude-android/2.39.0",
            "version_name": "5.12.0",
            "language": "Russian",
            "paying": k % 10 == 0,
            "sample_rate": 1.0,
            "data": { "screen": "home", "duration_ms": 1200 + k % 1000 },
        }),
        Table::TmpEventProperties => json!({
            "application_id": 4242,
            "event_hash": format!("sample-{k}"),
            "event_name": "purchase",
            "event_timestamp": ts,
            "appmetrica_device_id": device,
            "properties": { "sum": 100 + k % 900, "currency": "RUB", "items": 1 + k % 3 },
            "source": "appmetrica",
        }),
        Table::TmpUserProperties => json!({
            "application_id": 4242,
            "profile_id": format!("user-{k}"),
            "property_name": "plan",
            "property_kind": "temporary",
            "value_text": if k % 5 == 0 { "gold" } else { "free" },
            "snapshot_date": "2024-03-01",
            "appmetrica_device_id": device,
            "source": "appmetrica",
        }),
        Table::UserLocations => json!({
            "uuid": uuid,
            "app": 4242,
            "user_id": format!("user-{k}"),
            "event_time": ts,
            "latitude": lat + (k % 100) as f64 / 1000.0,
            "longitude": lon,
            "country": "Russia",
            "city": city,
        }),
    }
}

/// One invalid record of each kind the ingest rejects, for `table`, with a
/// fragment of the reason it gets. `too_large` is the record size limit.
pub fn poison(table: Table, k: u64, too_large: usize) -> Vec<(Vec<u8>, &'static str)> {
    let valid = record(table, k);
    let required = table.spec().columns.iter().find(|c| c.required).map_or("", |c| c.name);
    let mut missing = valid.clone();
    missing.as_object_mut().map(|o| o.remove(required));
    let typed = table
        .spec()
        .columns
        .iter()
        .find(|c| c.required && c.ty != crate::catalogue::ColumnType::Text)
        .map_or("", |c| c.name);
    let mut wrong_type = valid.clone();
    wrong_type[typed] = json!({"not": "a scalar"});
    let mut huge = valid;
    huge["padding"] = json!("x".repeat(too_large + 1));
    vec![
        (b"{\"truncated\": ".to_vec(), "not valid JSON"),
        (b"[1, 2, 3]".to_vec(), "must be a JSON object"),
        (missing.to_string().into_bytes(), "missing required field"),
        (wrong_type.to_string().into_bytes(), "expected"),
        (vec![b'{', 0xff, 0xfe, b'}'], "not valid UTF-8"),
        (huge.to_string().into_bytes(), "over the limit"),
        (Vec::new(), "no value"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{decode_bytes, decode_json, natural_key};

    #[test]
    fn samples_are_valid_and_distinct_by_natural_key() {
        for table in Table::ALL {
            let mut keys = std::collections::HashSet::new();
            for seed in [0, 1] {
                for record in records(table, 200, seed) {
                    let row = decode_json(table, record)
                        .unwrap_or_else(|e| panic!("{table}: {e}"))
                        .row;
                    assert!(keys.insert(natural_key(table.spec(), &row)), "{table}: duplicate key");
                }
            }
        }
    }

    #[test]
    fn poison_records_are_all_rejected_with_their_reason() {
        for table in Table::ALL {
            for (bytes, reason) in poison(table, 1, 2048) {
                let window = crate::catalogue::DateWindow::default();
                let result =
                    crate::catalogue::admit::admit(table, &bytes, 2048, &window, chrono::Utc::now().date_naive());
                let error = result.expect_err("poison must be rejected").to_string();
                assert!(error.contains(reason), "{table}: {error:?} should say {reason:?}");
            }
            assert!(decode_bytes(table, record(table, 1).to_string().as_bytes()).is_ok());
        }
    }
}
