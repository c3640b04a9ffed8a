-- A reject's identity includes the log it came from (the topic id, '' where
-- unknown): a topic deleted and created again restarts its offsets at 0, and a
-- bad record of the new log at an offset an old reject holds must be kept too,
-- not dropped as a duplicate. Breaking: a release before this one inserts
-- rejects with ON CONFLICT (topic, partition, "offset"), which no longer names a
-- unique key, so it refuses to start on a DWH that has this migration.
ALTER TABLE dwh_rejected_records ADD COLUMN topic_id text NOT NULL DEFAULT '';
ALTER TABLE dwh_rejected_records DROP CONSTRAINT dwh_rejected_records_key;
ALTER TABLE dwh_rejected_records
    ADD CONSTRAINT dwh_rejected_records_key UNIQUE (topic, topic_id, partition, "offset");
