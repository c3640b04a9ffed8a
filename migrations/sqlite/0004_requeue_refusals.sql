-- A reject the producer refused to send again (too large for the topic, say):
-- why, so that `rejects requeue` goes on past it and does not send it again
-- until asked (`--retry-refused`). Additive: older releases ignore it.
ALTER TABLE dwh_rejected_records ADD COLUMN requeue_error TEXT;
