-- What each stored offset counts: the topic's id (KIP-516, base64 as Kafka's
-- tools print it) and its cluster's id, as the broker gave them when the offset
-- was written. A topic deleted and created again, or a cluster replaced, under
-- the same name has another id: its start stops the table instead of reading
-- the new log from the old log's offsets (dwh-helper replay --adopt-topic moves
-- the offsets to the new topic). NULL where a release before this one wrote the
-- row, or the broker gives no topic id. Additive: older releases ignore them.
ALTER TABLE dwh_consumer_offsets ADD COLUMN topic_id text;
ALTER TABLE dwh_consumer_offsets ADD COLUMN cluster_id text;
