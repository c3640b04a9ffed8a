-- Two writers (two lanes of events_part, or ingest and the API) may both find a
-- month's partition missing. The advisory lock serialises them, but the second
-- one's catalogue lookup can still miss the table the first just created; its
-- CREATE then fails with duplicate_table, which means the partition is there.
CREATE OR REPLACE FUNCTION dwh_ensure_events_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo date := date_trunc('month', day)::date;
    hi date := (date_trunc('month', day) + interval '1 month')::date;
    part text := format('events_part_y%sm%s', to_char(lo, 'YYYY'), to_char(lo, 'MM'));
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('dwh_helper.events_part_partitions'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    BEGIN
        EXECUTE format('CREATE TABLE %I PARTITION OF events_part FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    EXCEPTION
        WHEN duplicate_table THEN
            RETURN false;
        WHEN check_violation THEN
            RAISE WARNING 'events_part_default holds rows of %; they stay there', to_char(lo, 'YYYY-MM');
            RETURN false;
    END;
    RETURN true;
END
$$;
