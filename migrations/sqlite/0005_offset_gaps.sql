-- Offsets the ingest moved past records it never wrote (lost to retention, or
-- skipped at the operator's ask), or moved back (the log is behind the stored
-- offset: recreated or truncated): one row each, written in the transaction
-- that moved the offset, so that a loss is on record next to the data.
-- Additive: older releases ignore it.
CREATE TABLE dwh_offset_gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    -- The stored next offset before the move, and where reading went on.
    from_offset INTEGER NOT NULL,
    to_offset INTEGER NOT NULL,
    -- Records never written (0 for a move back).
    records INTEGER NOT NULL,
    -- 'retention', 'skipped' or 'log behind'.
    cause TEXT NOT NULL,
    noted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX dwh_offset_gaps_by_group ON dwh_offset_gaps (group_id, topic, partition);
