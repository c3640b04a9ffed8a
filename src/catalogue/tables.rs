//! The seven DWH tables of TABLES.md as data: columns, types, required fields,
//! natural keys and conflict policies. Every other module reads the tables from here.

use super::value::ColumnType::{self, *};

/// What happens when a row arrives whose natural key is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// `ON CONFLICT (key) DO NOTHING`: the first version stays.
    InsertOnly,
    /// `ON CONFLICT (key) DO UPDATE` unless the incoming version is older.
    NewestWins {
        /// The column ordering versions; `None` means arrival order (`ingested_at`):
        /// the later write always wins.
        version: Option<&'static str>,
        /// A column that keeps the smallest value ever seen (`first_seen_at`).
        keep_earliest: Option<&'static str>,
    },
}

/// A value check beyond the column type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    None,
    /// Inclusive numeric range.
    Range(f64, f64),
    /// One of a fixed set of strings.
    OneOf(&'static [&'static str]),
    /// A JSON object (not an array or scalar).
    Object,
}

/// One column of a table, excluding the generated `id` and `ingested_at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    /// NOT NULL, and a record without it (and without a default or derivation) is rejected.
    pub required: bool,
    pub check: Check,
}

const fn col(name: &'static str, ty: ColumnType) -> Column {
    Column {
        name,
        ty,
        required: false,
        check: Check::None,
    }
}

const fn req(name: &'static str, ty: ColumnType) -> Column {
    Column {
        name,
        ty,
        required: true,
        check: Check::None,
    }
}

const fn checked(column: Column, check: Check) -> Column {
    Column { check, ..column }
}

/// Everything known about one table.
#[derive(Debug, PartialEq)]
pub struct TableSpec {
    pub name: &'static str,
    pub columns: &'static [Column],
    /// The natural key: what makes re-delivery idempotent.
    pub key: &'static [&'static str],
    pub policy: ConflictPolicy,
}

impl TableSpec {
    /// Position of a column in [`TableSpec::columns`] (and so in a row).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Positions of the natural key's columns.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.key
            .iter()
            .map(|k| {
                self.index_of(k)
                    .unwrap_or_else(|| panic!("{}: key {k} is not a column", self.name))
            })
            .collect()
    }
}

/// The columns that name an event, first in events_part and
/// tmp_event_properties: its key ([`EVENT_KEY`]), its name and its time.
const EVENT_COLUMNS: [Column; 6] = [
    req("application_id", BigInt),
    req("event_date", Date),
    req("event_hash", Text),
    req("dup_seq", Int),
    req("event_name", Text),
    req("event_timestamp", BigInt),
];

/// [`EVENT_COLUMNS`], then `rest`: the columns of a table of events. `N`, the
/// count of both, is checked when the crate compiles.
const fn event_and<const R: usize, const N: usize>(rest: [Column; R]) -> [Column; N] {
    assert!(
        EVENT_COLUMNS.len() + R == N,
        "N counts the event's columns and the rest"
    );
    let mut columns = [EVENT_COLUMNS[0]; N];
    let mut i = 0;
    while i < N {
        columns[i] = if i < EVENT_COLUMNS.len() {
            EVENT_COLUMNS[i]
        } else {
            rest[i - EVENT_COLUMNS.len()]
        };
        i += 1;
    }
    columns
}

/// The key of an event's rows (in events_part and tmp_event_properties): its
/// application, day, hash and place among events of the same hash.
const EVENT_KEY: &[&str] = &["application_id", "event_date", "event_hash", "dup_seq"];

pub static EVENTS_PART: TableSpec = TableSpec {
    name: "events_part",
    columns: &event_and::<_, 34>([
        col("event_datetime", Timestamp),
        col("event_receive_timestamp", BigInt),
        col("event_receive_datetime", Timestamp),
        col("session_id", BigInt),
        col("installation_id", Text),
        req("appmetrica_device_id", Numeric20),
        col("profile_id", Text),
        col("device_manufacturer", Text),
        col("device_model", Text),
        col("original_device_model", Text),
        col("device_type", Text),
        col("device_locale", Text),
        col("os_name", Text),
        col("os_version", Text),
        col("device_ipv6", Text),
        col("connection_type", Text),
        col("operator_name", Text),
        col("mcc", Int),
        col("mnc", Int),
        col("city", Text),
        col("country_iso_code", Text),
        col("google_aid", Text),
        col("ios_ifa", Text),
        col("ios_ifv", Text),
        col("windows_aid", Text),
        col("app_version_name", Text),
        col("app_build_number", Int),
        col("app_package_name", Text),
    ]),
    key: EVENT_KEY,
    policy: ConflictPolicy::InsertOnly,
};

pub static MOBILE_DEVICES: TableSpec = TableSpec {
    name: "mobile_devices",
    columns: &[
        req("application_id", BigInt),
        req("appmetrica_device_id", Numeric20),
        col("os_name", Text),
        col("os_version", Text),
        col("device_manufacturer", Text),
        col("device_model", Text),
        col("original_device_model", Text),
        col("device_type", Text),
        col("device_locale", Text),
        col("google_aid", Text),
        col("ios_ifa", Text),
        col("ios_ifv", Text),
        col("windows_aid", Text),
        col("android_id", Text),
        col("oaid", Text),
        col("app_package_name", Text),
        col("app_version_name", Text),
        col("app_build_number", Int),
        col("operator_name", Text),
        col("mcc", Int),
        col("mnc", Int),
        req("first_seen_at", TimestampTz),
        req("last_seen_at", TimestampTz),
    ],
    key: &["application_id", "appmetrica_device_id"],
    policy: ConflictPolicy::NewestWins {
        version: Some("last_seen_at"),
        keep_earliest: Some("first_seen_at"),
    },
};

pub static PERMANENT_USER_PROPERTIES: TableSpec = TableSpec {
    name: "permanent_user_properties",
    columns: &[
        req("application_id", BigInt),
        req("profile_id", Text),
        col("appmetrica_device_id", Numeric20),
        col("gender", Text),
        col("birth_date", Text),
        col("name", Text),
        col("notifications_enabled", Bool),
        col("first_session_date", Date),
        req("updated_at", TimestampTz),
    ],
    key: &["application_id", "profile_id"],
    policy: ConflictPolicy::NewestWins {
        version: Some("updated_at"),
        keep_earliest: None,
    },
};

pub static TECHNICAL_DATA: TableSpec = TableSpec {
    name: "technical_data",
    columns: &[
        req("uuid", Uuid),
        req("app", BigInt),
        col("amplitude_id", BigInt),
        col("insert_id", Text),
        col("event_id", BigInt),
        req("event_type", Text),
        col("user_id", Text),
        col("device_id", Text),
        col("session_id", BigInt),
        col("event_time", Timestamp),
        col("client_event_time", Timestamp),
        col("client_upload_time", Timestamp),
        col("server_received_time", Timestamp),
        req("server_upload_time", Timestamp),
        col("processed_time", Timestamp),
        col("platform", Text),
        col("os_name", Text),
        col("os_version", Text),
        col("device_brand", Text),
        col("device_manufacturer", Text),
        col("device_model", Text),
        col("device_family", Text),
        col("device_type", Text),
        col("device_carrier", Text),
        col("library", Text),
        col("version_name", Text),
        col("start_version", Text),
        col("language", Text),
        col("ip_address", Text),
        col("idfa", Text),
        col("adid", Text),
        col("paying", Bool),
        col("sample_rate", Double),
        col("data", Json),
    ],
    key: &["uuid"],
    policy: ConflictPolicy::InsertOnly,
};

pub static TMP_EVENT_PROPERTIES: TableSpec = TableSpec {
    name: "tmp_event_properties",
    columns: &event_and::<_, 10>([
        col("appmetrica_device_id", Numeric20),
        checked(req("properties", Json), Check::Object),
        col("raw_properties", Text),
        req("source", Text),
    ]),
    key: EVENT_KEY,
    policy: ConflictPolicy::InsertOnly,
};

pub static TMP_USER_PROPERTIES: TableSpec = TableSpec {
    name: "tmp_user_properties",
    columns: &[
        req("application_id", BigInt),
        req("profile_id", Text),
        req("property_name", Text),
        checked(req("property_kind", Text), Check::OneOf(&["permanent", "temporary"])),
        col("value_text", Text),
        col("value_json", Json),
        req("snapshot_date", Date),
        col("appmetrica_device_id", Numeric20),
        req("source", Text),
    ],
    key: &["application_id", "profile_id", "property_name", "snapshot_date"],
    policy: ConflictPolicy::NewestWins {
        version: None,
        keep_earliest: None,
    },
};

pub static USER_LOCATIONS: TableSpec = TableSpec {
    name: "user_locations",
    columns: &[
        req("uuid", Uuid),
        col("app", BigInt),
        col("amplitude_id", BigInt),
        col("user_id", Text),
        col("device_id", Text),
        req("event_time", Timestamp),
        checked(req("latitude", Double), Check::Range(-90.0, 90.0)),
        checked(req("longitude", Double), Check::Range(-180.0, 180.0)),
        col("country", Text),
        col("region", Text),
        col("city", Text),
        col("dma", Text),
        col("ip_address", Text),
    ],
    key: &["uuid"],
    policy: ConflictPolicy::InsertOnly,
};
