-- A reject's identity includes the log it came from (the topic id, '' where
-- unknown): a topic deleted and created again restarts its offsets at 0, and a
-- bad record of the new log at an offset an old reject holds must be kept too,
-- not dropped as a duplicate. Breaking: a release before this one inserts
-- rejects with ON CONFLICT (topic, partition, "offset"), which no longer names a
-- unique key, so it refuses to start on a DWH that has this migration. SQLite
-- cannot change a table's constraint: the table is built again, ids kept.
CREATE TABLE dwh_rejected_records_keyed (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    record_key BLOB,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    rejected_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    requeued_at TEXT,
    requeue_error TEXT,
    topic_id TEXT NOT NULL DEFAULT '',
    CONSTRAINT dwh_rejected_records_key UNIQUE (topic, topic_id, partition, "offset")
);
INSERT INTO dwh_rejected_records_keyed
    (id, table_name, topic, partition, "offset", record_key, payload, reason, rejected_at, requeued_at, requeue_error)
    SELECT id, table_name, topic, partition, "offset", record_key, payload, reason, rejected_at, requeued_at,
        requeue_error
    FROM dwh_rejected_records;
DROP TABLE dwh_rejected_records;
ALTER TABLE dwh_rejected_records_keyed RENAME TO dwh_rejected_records;
CREATE INDEX dwh_rejected_records_table_idx ON dwh_rejected_records (table_name, rejected_at);
