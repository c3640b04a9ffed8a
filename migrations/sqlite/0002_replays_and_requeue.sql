-- Every executed `dwh-helper replay`: who moved which offsets, when, and why.
CREATE TABLE dwh_replays (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id TEXT NOT NULL,
    executed_by TEXT NOT NULL,
    executed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- The scenario as given, e.g. `--to-offset 120`.
    scenario TEXT NOT NULL,
    -- JSON array of {table, topic, partition, current, new}.
    plan TEXT NOT NULL
);

-- Set by `dwh-helper rejects requeue` once the payload is back on its topic, so
-- that a second requeue does not send it again. Rejects are never deleted by the
-- pipeline (`rejects purge` is the operator's).
ALTER TABLE dwh_rejected_records ADD COLUMN requeued_at TEXT;
CREATE INDEX dwh_rejected_records_table_idx ON dwh_rejected_records (table_name, rejected_at);

-- The tables each running ingest instance reads, refreshed every few seconds, so
-- that `replay --execute` refuses while one is active, whatever the broker says
-- of its groups. A graceful stop deletes the instance's rows; a crashed one's
-- stop counting once they are stale.
CREATE TABLE dwh_ingest_members (
    group_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    member TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (group_id, table_name, member)
);
