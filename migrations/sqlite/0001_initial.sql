-- The seven DWH tables of TABLES.md and the bookkeeping tables (prefix dwh_).

CREATE TABLE events_part (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id INTEGER NOT NULL,
    event_date TEXT NOT NULL,
    event_hash TEXT NOT NULL,
    dup_seq INTEGER NOT NULL DEFAULT 0,
    event_name TEXT NOT NULL,
    event_timestamp INTEGER NOT NULL,
    event_datetime TEXT,
    event_receive_timestamp INTEGER,
    event_receive_datetime TEXT,
    session_id INTEGER,
    installation_id TEXT,
    appmetrica_device_id TEXT NOT NULL,
    profile_id TEXT,
    device_manufacturer TEXT,
    device_model TEXT,
    original_device_model TEXT,
    device_type TEXT,
    device_locale TEXT,
    os_name TEXT,
    os_version TEXT,
    device_ipv6 TEXT,
    connection_type TEXT,
    operator_name TEXT,
    mcc INTEGER,
    mnc INTEGER,
    city TEXT,
    country_iso_code TEXT,
    google_aid TEXT,
    ios_ifa TEXT,
    ios_ifv TEXT,
    windows_aid TEXT,
    app_version_name TEXT,
    app_build_number INTEGER,
    app_package_name TEXT,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT events_part_key UNIQUE (application_id, event_date, event_hash, dup_seq)
);

CREATE TABLE mobile_devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id INTEGER NOT NULL,
    appmetrica_device_id TEXT NOT NULL,
    os_name TEXT,
    os_version TEXT,
    device_manufacturer TEXT,
    device_model TEXT,
    original_device_model TEXT,
    device_type TEXT,
    device_locale TEXT,
    google_aid TEXT,
    ios_ifa TEXT,
    ios_ifv TEXT,
    windows_aid TEXT,
    android_id TEXT,
    oaid TEXT,
    app_package_name TEXT,
    app_version_name TEXT,
    app_build_number INTEGER,
    operator_name TEXT,
    mcc INTEGER,
    mnc INTEGER,
    first_seen_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT mobile_devices_key UNIQUE (application_id, appmetrica_device_id)
);

CREATE TABLE permanent_user_properties (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id INTEGER NOT NULL,
    profile_id TEXT NOT NULL,
    appmetrica_device_id TEXT,
    gender TEXT,
    birth_date TEXT,
    name TEXT,
    notifications_enabled INTEGER,
    first_session_date TEXT,
    updated_at TEXT NOT NULL,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT permanent_user_properties_key UNIQUE (application_id, profile_id)
);

CREATE TABLE technical_data (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    app INTEGER NOT NULL,
    amplitude_id INTEGER,
    insert_id TEXT,
    event_id INTEGER,
    event_type TEXT NOT NULL,
    user_id TEXT,
    device_id TEXT,
    session_id INTEGER,
    event_time TEXT,
    client_event_time TEXT,
    client_upload_time TEXT,
    server_received_time TEXT,
    server_upload_time TEXT NOT NULL,
    processed_time TEXT,
    platform TEXT,
    os_name TEXT,
    os_version TEXT,
    device_brand TEXT,
    device_manufacturer TEXT,
    device_model TEXT,
    device_family TEXT,
    device_type TEXT,
    device_carrier TEXT,
    library TEXT,
    version_name TEXT,
    start_version TEXT,
    language TEXT,
    ip_address TEXT,
    idfa TEXT,
    adid TEXT,
    paying INTEGER,
    sample_rate REAL,
    data TEXT,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT technical_data_key UNIQUE (uuid)
);

CREATE TABLE tmp_event_properties (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id INTEGER NOT NULL,
    event_date TEXT NOT NULL,
    event_hash TEXT NOT NULL,
    dup_seq INTEGER NOT NULL DEFAULT 0,
    event_name TEXT NOT NULL,
    event_timestamp INTEGER NOT NULL,
    appmetrica_device_id TEXT,
    properties TEXT NOT NULL,
    raw_properties TEXT,
    source TEXT NOT NULL,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT tmp_event_properties_key UNIQUE (application_id, event_date, event_hash, dup_seq)
);

CREATE TABLE tmp_user_properties (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id INTEGER NOT NULL,
    profile_id TEXT NOT NULL,
    property_name TEXT NOT NULL,
    property_kind TEXT NOT NULL CHECK (property_kind IN ('permanent', 'temporary')),
    value_text TEXT,
    value_json TEXT,
    snapshot_date TEXT NOT NULL,
    appmetrica_device_id TEXT,
    source TEXT NOT NULL,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT tmp_user_properties_key UNIQUE (application_id, profile_id, property_name, snapshot_date)
);

CREATE TABLE user_locations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    app INTEGER,
    amplitude_id INTEGER,
    user_id TEXT,
    device_id TEXT,
    event_time TEXT NOT NULL,
    latitude REAL NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude REAL NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    country TEXT,
    region TEXT,
    city TEXT,
    dma TEXT,
    ip_address TEXT,
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT user_locations_key UNIQUE (uuid)
);

-- Consumer offsets: the DWH, not Kafka, is the source of truth. Advanced in the
-- same transaction as the rows, and only from the offset the batch started at.
CREATE TABLE dwh_consumer_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL CHECK (next_offset >= 0),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (group_id, topic, partition)
);

-- Records that could not be decoded, with the reason; written in the flush
-- transaction of the batch they arrived in.
CREATE TABLE dwh_rejected_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    record_key BLOB,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    rejected_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT dwh_rejected_records_key UNIQUE (topic, partition, "offset")
);

-- AppMetrica Logs API export windows and their progress.
CREATE TABLE dwh_appmetrica_windows (
    application_id INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    window_start TEXT NOT NULL,
    window_end TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    rows_fetched INTEGER NOT NULL DEFAULT 0,
    rows_published INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER,
    error TEXT,
    fetched_at TEXT,
    PRIMARY KEY (application_id, endpoint, window_start)
);
