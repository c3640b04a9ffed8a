//! Ingest under faults (issue 9): every failure ends in a retry of the same batch,
//! a reject with its reason, or a loud stop; never a silent loss or a stall. Each
//! test first shows that the fault happened, then that nothing was lost or
//! written twice.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dwh_helper::catalogue::Table;
use dwh_helper::store::Dwh;
use sqlx::Connection as _;

async fn exec(url: &str, sql: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::raw_sql(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(url: &str, sql: &str) -> i64 {
    pg_count(url, sql).await.unwrap_or_else(|| panic!("{sql} answers"))
}

/// The database name of a test database URL.
fn database_name(url: &str) -> String {
    url.rsplit('/').next().expect("a path").to_owned()
}

/// `url` with another user.
fn as_user(url: &str, user: &str) -> String {
    let mut url = url::Url::parse(url).expect("url");
    url.set_username(user).expect("user");
    url.to_string()
}

/// Events of one month far ahead (no partition exists for it yet).
fn events_of_may_2031(n: usize) -> Vec<serde_json::Value> {
    events(n, 9)
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["event_timestamp"] = serde_json::json!(1_936_346_400 + i as i64);
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_permission_is_retried_as_the_same_batch_and_never_turns_rows_into_rejects() {
    let (broker, prefix) = broker(2).await;
    let owner_url = fresh_pg_url().await;
    let owner = config_from(&ingest_env(&broker, &prefix, &owner_url), &[]);
    migrated(&owner).await;
    // Ingest runs as a least-privilege role (as with `run --no-migrate`): it may
    // write rows and offsets, not create the partition a new month needs.
    let role = format!("ingest_{}", database_name(&owner_url));
    exec(
        &owner_url,
        &format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}; \
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}"
        ),
    )
    .await;
    // May 2031 lies past the default window of event dates: widen it.
    let config = config_from(
        &ingest_env(&broker, &prefix, &as_user(&owner_url, &role)),
        &[("DWH_EVENTS_MAX_DAYS_AHEAD", "3650")],
    );
    let table = Table::EventsPart;
    publish(&config, &topic(&prefix, table), &keyed(table, events_of_may_2031(200))).await;
    let ingest = InProcessIngest::start(config.clone(), Dwh::connect(&config.dwh).expect("pool"));

    // The fault: the partition cannot be created, and readiness says why.
    let cause = wait_for(Duration::from_secs(60), "writes to fail on the permission", || async {
        ingest
            .status
            .failing()
            .filter(|cause| cause.contains("permission denied") && ingest.status.counters().retries >= 2)
    })
    .await;
    assert!(cause.starts_with(&topic(&prefix, table)), "{cause}");
    assert_eq!(count(&owner_url, "SELECT count(*) FROM events_part").await, 0);
    assert_eq!(
        count(&owner_url, "SELECT count(*) FROM dwh_rejected_records").await,
        0,
        "a permission is not the rows' fault"
    );
    assert_eq!(
        count(&owner_url, "SELECT count(*) FROM dwh_consumer_offsets").await,
        0,
        "the offsets stay"
    );

    // The operator creates the partition: the same batch lands, nothing else to do.
    exec(&owner_url, "SELECT dwh_ensure_events_partition('2031-05-12')").await;
    wait_for(Duration::from_secs(60), "the retried batch to land", || async {
        (count(&owner_url, "SELECT count(*) FROM events_part_y2031m05").await == 200).then_some(())
    })
    .await;
    assert_eq!(count(&owner_url, "SELECT count(*) FROM dwh_rejected_records").await, 0);
    wait_for(Duration::from_secs(10), "readiness to clear", || async {
        ingest.status.failing().is_none().then_some(())
    })
    .await;
    let counters = ingest.status.counters();
    assert_eq!((counters.inserted, counters.skipped, counters.rejects), (200, 0, 0));
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_change_that_refuses_every_row_fails_the_table_and_turns_no_row_into_a_reject() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let config = config_from(&ingest_env(&broker, &prefix, &url), &[]);
    migrated(&config).await;
    // A constraint added by hand while ingest runs, which no record meets.
    exec(
        &url,
        "ALTER TABLE user_locations ADD CONSTRAINT locations_from_mars CHECK (latitude > 1000)",
    )
    .await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    publish(&config, &topic, &keyed(table, locations(200))).await;
    let ingest = InProcessIngest::start(config.clone(), Dwh::connect(&config.dwh).expect("pool"));

    // The fault: the database refuses the rows, and the table fails by name.
    let cause = wait_for(
        Duration::from_secs(60),
        "the table to fail on the constraint",
        || async {
            ingest
                .status
                .failing()
                .filter(|cause| cause.contains("locations_from_mars") && ingest.status.counters().retries >= 2)
        },
    )
    .await;
    assert!(
        cause.starts_with(&topic) && cause.contains("SQLSTATE 23514, constraint locations_from_mars"),
        "{cause}"
    );
    assert_eq!(ingest.status.state(&topic), dwh_helper::ingest::TableState::Failing);
    assert_eq!(count(&url, "SELECT count(*) FROM user_locations").await, 0);
    assert_eq!(
        count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        0,
        "a table that refuses every row is not the rows' fault"
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM dwh_consumer_offsets").await,
        0,
        "the offsets stay"
    );

    // The change is undone: the same batches land, every record once.
    exec(&url, "ALTER TABLE user_locations DROP CONSTRAINT locations_from_mars").await;
    wait_for(Duration::from_secs(60), "the retried batches to land", || async {
        (count(&url, "SELECT count(*) FROM user_locations").await == 200).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(10), "readiness to clear", || async {
        ingest.status.failing().is_none().then_some(())
    })
    .await;
    assert_eq!(count(&url, "SELECT count(*) FROM dwh_rejected_records").await, 0);
    let counters = ingest.status.counters();
    assert_eq!((counters.inserted, counters.skipped, counters.rejects), (200, 0, 0));
    ingest.stop().await;
}

/// Partition `partition` of `topic` stands, in the DWH, at the broker's end.
async fn partition_caught_up(config: &dwh_helper::config::Config, url: &str, prefix: &str, partition: i32) -> bool {
    let topic = topic(prefix, Table::UserLocations);
    let high = watermarks(config, &topic)
        .await
        .iter()
        .find(|w| w.partition == partition)
        .map(|w| w.high);
    let stored = stored_offsets(url, &group(prefix), &topic)
        .await
        .into_iter()
        .find(|(p, _)| *p == partition)
        .map(|(_, next)| next);
    high.is_some() && stored == high
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_that_fails_stays_failing_while_another_lane_of_the_table_writes() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let config = config_from(
        &ingest_env(&broker, &prefix, &url),
        &[("DWH_STATEMENT_TIMEOUT_SECONDS", "1"), ("KAFKA_WRITE_LANES", "2")],
    );
    migrated(&config).await;
    count_writes(&url).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(300));
    publish(&config, &topic, &records[..100]).await;
    let ingest = InProcessIngest::start(config.clone(), Dwh::connect(&config.dwh).expect("pool"));
    caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;

    // Partition 0's offset row is locked: lane 0's writes wait on it until the
    // statement timeout; lane 1 (partition 1) is not held up.
    let mut lock = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM dwh_consumer_offsets WHERE topic = '{topic}' AND partition = 0 FOR UPDATE"
    ))
    .execute(&mut lock)
    .await
    .expect("lock");
    publish(&config, &topic, &records[100..200]).await;
    // The fault: lane 0 fails, retried.
    wait_for(
        Duration::from_secs(60),
        "lane 0 to fail on the statement timeout",
        || async {
            let failing = ingest.status.failing().unwrap_or_default();
            (failing.contains("statement timeout") && ingest.status.counters().retries >= 3).then_some(())
        },
    )
    .await;
    // Lane 1 writes meanwhile (again after the failure is established): the
    // table still fails, by lane 0's cause.
    publish(&config, &topic, &records[200..]).await;
    wait_for(Duration::from_secs(30), "partition 1 to land", || async {
        partition_caught_up(&config, &url, &prefix, 1).await.then_some(())
    })
    .await;
    assert!(
        !partition_caught_up(&config, &url, &prefix, 0).await,
        "partition 0 is held"
    );
    let failing = ingest.status.failing();
    assert!(
        failing.as_deref().is_some_and(|f| f.contains("statement timeout")),
        "lane 1's write cleared lane 0's failure: {failing:?}"
    );
    assert_eq!(ingest.status.state(&topic), dwh_helper::ingest::TableState::Failing);

    // The lock goes: lane 0's batch lands, the failure clears, every record once.
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.expect("unlock");
    caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;
    wait_for(Duration::from_secs(10), "readiness to clear", || async {
        ingest.status.failing().is_none().then_some(())
    })
    .await;
    assert_written_once(&url, 300).await;
    assert_eq!(count(&url, "SELECT count(*) FROM dwh_rejected_records").await, 0);
    ingest.stop().await;
}

/// A lane whose write waits on a lock holds up none of the table's other
/// lanes: the table's task never awaits a write to take more records. Here
/// partition 1's records, many batches of them (far more than one written and
/// one queued), land while partition 0's write waits on a lock the whole time;
/// once the lock goes, every record lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_whose_write_waits_on_a_lock_holds_up_none_of_the_other_lanes() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let config = config_from(
        &ingest_env(&broker, &prefix, &url),
        &[("KAFKA_WRITE_LANES", "2"), ("KAFKA_BATCH_MAX_ROWS", "10")],
    );
    migrated(&config).await;
    count_writes(&url).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(400));
    publish(&config, &topic, &records[..20]).await;
    let ingest = InProcessIngest::start(config.clone(), Dwh::connect(&config.dwh).expect("pool"));
    caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;

    let mut lock = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM dwh_consumer_offsets WHERE topic = '{topic}' AND partition = 0 FOR UPDATE"
    ))
    .execute(&mut lock)
    .await
    .expect("lock");
    // In rounds, so that partition 1's records keep coming after partition 0's
    // lane is full.
    for round in records[20..].chunks(38) {
        publish(&config, &topic, round).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The fault: a write of partition 0 waits on the lock.
    let waiting =
        "SELECT min(query_start) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()";
    let since = wait_for(Duration::from_secs(30), "a write to wait on the lock", || async {
        let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(waiting)
            .fetch_one(&mut conn)
            .await
            .ok()?
    })
    .await;
    let moved = |partition: i32| {
        let (url, group, topic) = (url.clone(), group(&prefix), topic.clone());
        async move {
            stored_offsets(&url, &group, &topic)
                .await
                .into_iter()
                .find(|(p, _)| *p == partition)
                .map_or(0, |(_, next)| next)
        }
    };
    let held_at = moved(0).await;
    wait_for(Duration::from_secs(45), "partition 1 to land in full", || async {
        partition_caught_up(&config, &url, &prefix, 1).await.then_some(())
    })
    .await;
    let partition_1 = moved(1).await;
    assert!(partition_1 >= 150, "many batches of partition 1 landed: {partition_1}");
    // ... while the same write of partition 0 still waits.
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let still: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(waiting)
        .fetch_one(&mut conn)
        .await
        .expect("activity");
    assert_eq!(still, Some(since), "the one write of partition 0 waited the whole time");
    assert_eq!(moved(0).await, held_at, "partition 0 is held");

    // The lock goes: every record lands, once.
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.expect("unlock");
    caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;
    assert_written_once(&url, 400).await;
    assert_eq!(count(&url, "SELECT count(*) FROM dwh_rejected_records").await, 0);
    ingest.stop().await;
}

/// `{"uuid":"\u0000abc",…}`: the reason quotes the value, and PostgreSQL refuses
/// NUL in text; the reject must still land, and the table go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_with_a_nul_character_is_rejected_and_the_table_goes_on() {
    for sqlite in [false, true] {
        let (broker, prefix) = broker(1).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let url = if sqlite {
            format!("sqlite://{}", dir.path().join("dwh.db").display())
        } else {
            fresh_pg_url().await
        };
        let config = config_from(&ingest_env(&broker, &prefix, &url), &[]);
        let dwh = migrated(&config).await;
        let table = Table::UserLocations;
        let valid = keyed(table, locations(1));
        let poison = br#"{"uuid":"\u0000abc","latitude":1,"longitude":2}"#.to_vec();
        publish(
            &config,
            &topic(&prefix, table),
            &[("nul".to_owned(), poison.clone()), valid[0].clone()],
        )
        .await;
        let ingest = InProcessIngest::start(config.clone(), dwh.clone());
        wait_for(Duration::from_secs(30), "the record and the reject to land", || async {
            let rows = dwh.count_rows("user_locations").await.ok()?;
            let rejects = dwh.count_rows("dwh_rejected_records").await.ok()?;
            (rows == 1 && rejects == 1).then_some(())
        })
        .await;
        assert_eq!(ingest.status.failing(), None, "sqlite={sqlite}");
        assert_eq!(
            dwh.stored_offset(&group(&prefix), &topic(&prefix, table), 0)
                .await
                .expect("offset"),
            Some(2),
            "sqlite={sqlite}"
        );
        let reason: String = if sqlite {
            let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar("SELECT reason FROM dwh_rejected_records")
                .fetch_one(&mut conn)
                .await
                .expect("reason")
        } else {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar("SELECT reason FROM dwh_rejected_records")
                .fetch_one(&mut conn)
                .await
                .expect("reason")
        };
        assert_eq!(
            reason, r#"field "uuid": expected UUID, got "\u0000abc""#,
            "sqlite={sqlite}"
        );
        ingest.stop().await;
    }
}

/// The connection fails after COMMIT was sent, the commit landed: the retry finds
/// the offsets at the batch's end. It counts as landed (no rebalance), and
/// readiness, 503 while it failed, is 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_that_finds_its_batch_committed_counts_it_landed_and_readiness_recovers() {
    let (broker, prefix) = broker(1).await;
    let url = fresh_pg_url().await;
    let config = config_from(
        &ingest_env(&broker, &prefix, &url),
        &[("DWH_STATEMENT_TIMEOUT_SECONDS", "1")],
    );
    let dwh = migrated(&config).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(10));
    let ingest = InProcessIngest::start(config.clone(), dwh.clone());
    publish(&config, &topic, &records[..5]).await;
    wait_for(Duration::from_secs(30), "the first batch", || async {
        (dwh.stored_offset(&group(&prefix), &topic, 0).await.ok()?? == 5).then_some(())
    })
    .await;

    // A lock makes the next write time out (57014) on every attempt.
    let mut blocker = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE user_locations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .expect("lock");
    // The offset first, while ingest has nothing in flight: an attempt that held
    // the offset row while waiting for the table would deadlock with this one.
    sqlx::query("UPDATE dwh_consumer_offsets SET next_offset = 10 WHERE topic = $1")
        .bind(&topic)
        .execute(&mut blocker)
        .await
        .expect("offset");
    publish(&config, &topic, &records[5..]).await;
    wait_for(Duration::from_secs(30), "the write to fail", || async {
        ingest
            .status
            .failing()
            .filter(|cause| cause.contains("statement timeout"))
    })
    .await;
    // What an attempt whose answer was lost leaves: its rows and its offset.
    let columns = dwh_helper::store::sql::column_list(table.spec());
    for (_, payload) in &records[5..] {
        sqlx::query(&format!(
            "INSERT INTO user_locations ({columns}) SELECT {columns} FROM jsonb_populate_record(NULL::user_locations, $1::jsonb)"
        ))
        .bind(String::from_utf8(payload.clone()).expect("utf-8"))
        .execute(&mut blocker)
        .await
        .expect("row");
    }
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.expect("commit");

    wait_for(Duration::from_secs(30), "readiness to recover", || async {
        ingest.status.failing().is_none().then_some(())
    })
    .await;
    assert_eq!(count(&url, "SELECT count(*) FROM user_locations").await, 10);
    assert_eq!(
        dwh.stored_offset(&group(&prefix), &topic, 0).await.expect("offset"),
        Some(10)
    );
    // Landed, not fenced: the consumer kept its partition and goes on.
    publish(&config, &topic, &keyed(table, locations(12))[10..]).await;
    wait_for(Duration::from_secs(30), "the next batch", || async {
        (dwh.stored_offset(&group(&prefix), &topic, 0).await.ok()?? == 12).then_some(())
    })
    .await;
    assert_eq!(count(&url, "SELECT count(*) FROM user_locations").await, 12);
    assert_eq!(ingest.status.counters().skipped, 0);
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_offset_above_the_high_watermark_stops_the_table_until_the_operator_decides() {
    let (broker, prefix) = broker(1).await;
    let url = fresh_pg_url().await;
    let config = config_from(&ingest_env(&broker, &prefix, &url), &[]);
    let dwh = migrated(&config).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    // The topic was recreated: the DWH remembers offset 1000 of the old one.
    exec(
        &url,
        &format!("INSERT INTO dwh_consumer_offsets (group_id, topic, partition, next_offset) VALUES ('{}', '{topic}', 0, 1000)", group(&prefix)),
    )
    .await;
    publish(&config, &topic, &keyed(table, locations(10))).await;
    let other = Table::EventsPart;
    publish(
        &config,
        &format!("{prefix}{}", other.name()),
        &keyed(other, events(20, 1)),
    )
    .await;
    let ingest = InProcessIngest::start(config.clone(), dwh.clone());
    let cause = wait_for(Duration::from_secs(30), "the table to stop", || async {
        ingest.status.failing()
    })
    .await;
    assert!(
        cause.contains(&format!(
            "{topic}[0]: the DWH stores next offset 1000, above the high watermark 10"
        )) && cause.contains("KAFKA_ON_OFFSET_OUT_OF_RANGE=earliest"),
        "{cause}"
    );
    assert_eq!(ingest.status.counters().tables_stopped, 1);
    // Other tables go on.
    wait_for(Duration::from_secs(30), "the other table to land", || async {
        (dwh.count_rows("events_part").await.ok()? == 20).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        dwh.count_rows("user_locations").await.expect("count"),
        0,
        "nothing skipped silently"
    );
    assert_eq!(
        dwh.stored_offset(&group(&prefix), &topic, 0).await.expect("offset"),
        Some(1000)
    );
    ingest.stop().await;

    // The operator asks for the partition from its first record.
    let config = config_from(
        &ingest_env(&broker, &prefix, &url),
        &[("KAFKA_ON_OFFSET_OUT_OF_RANGE", "earliest")],
    );
    let ingest = InProcessIngest::start(config.clone(), dwh.clone());
    wait_for(Duration::from_secs(30), "the partition to be read again", || async {
        (dwh.count_rows("user_locations").await.ok()? == 10).then_some(())
    })
    .await;
    assert_eq!(
        dwh.stored_offset(&group(&prefix), &topic, 0).await.expect("offset"),
        Some(10)
    );
    let counters = ingest.status.counters();
    assert_eq!((counters.offsets_moved, counters.tables_stopped), (1, 0));
    assert_eq!(ingest.status.failing(), None);
    ingest.stop().await;
}

/// Commits `offset` for partition 0 of `topic` in the ingest's group, synchronously,
/// as a member of the group, and checks that the broker holds it.
async fn commit_in_kafka(config: &dwh_helper::config::Config, topic: &str, offset: i64) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
    let (kafka, topic) = (config.kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = dwh_helper::kafka::client_config(
            &kafka,
            &[
                ("group.id", kafka.group_id.as_str()),
                ("enable.auto.commit", "false"),
                ("partition.assignment.strategy", "cooperative-sticky"),
            ],
        )
        .expect("config")
        .create()
        .expect("consumer");
        // The broker takes commits from members only: join, as the old deployment had.
        consumer.subscribe(&[&topic]).expect("subscribe");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while consumer.assignment().map_or(0, |a| a.count()) == 0 {
            assert!(std::time::Instant::now() < deadline, "joined the group within 30 s");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(offset))
            .expect("offset");
        consumer.commit(&list, CommitMode::Sync).expect("commit");
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets");
        assert_eq!(
            committed.find_partition(&topic, 0).map(|e| e.offset()),
            Some(rdkafka::Offset::Offset(offset))
        );
    })
    .await
    .expect("commit thread");
}

/// Issue 24: the watchdog is the net under a stall nobody named. Here, Kafka
/// offsets adopted from an old group lie past the end of the log: the ingest goes
/// round fetches out of range and consumer restarts, nothing lands, and nothing
/// but the lag said so. The watchdog names the table stalled in readiness, in
/// `status` (exit 1), in the state gauge and in an event with the last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_whose_records_wait_while_nothing_lands_is_stalled_in_readiness_status_and_metrics() {
    let table = Table::UserLocations;
    let (broker, prefix) = broker_with(&[(table, 1)]).await;
    let topic = topic(&prefix, table);
    let url = fresh_pg_url().await;
    let (endpoint, received) = otlp::receiver().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    for (name, value) in [
        ("KAFKA_INGEST_TABLES", "user_locations"),
        ("KAFKA_ADOPT_COMMITTED_OFFSETS", "true"),
        ("KAFKA_STALL_AFTER_SECONDS", "3"),
        ("METRICS_LAG_INTERVAL_SECONDS", "1"),
        ("LOG_FORMAT", "json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ] {
        set_env(&mut env, name, value);
    }
    let config = config_from(&env, &[]);
    migrated(&config).await;
    publish(&config, &topic, &keyed(table, locations(40))).await;
    commit_in_kafka(&config, &topic, 1_000_000).await;
    let child = Child::observed(&env, "ingest");

    // The fault: the consumer is rebuilt again and again, and nothing lands.
    wait_for(Duration::from_secs(60), "the consumer to go round restarts", || async {
        let restarts = child.table_metric("dwh_helper_consumer_restarts_total", table).await?;
        (restarts >= 2.0).then_some(())
    })
    .await;
    assert_eq!(count(&url, "SELECT count(*) FROM user_locations").await, 0);

    // The watchdog: a few seconds later the table is stalled, everywhere.
    let state = |m: &Scrape, state: &str| m.sum("dwh_helper_table_state", &[("table", table.name()), ("state", state)]);
    let body = wait_for(Duration::from_secs(60), "the table to be stalled", || async {
        let m = child.scrape().await?;
        let (code, body) = child.ready().await?;
        (state(&m, "stalled") == 1.0 && code == 503).then_some(body)
    })
    .await;
    assert!(body.contains(&format!("{topic} (stalled)")), "{body}");
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(state(&m, "ok"), 0.0, "one state at a time");
    let stalled = child.events("table_stalled");
    let first = stalled.first().expect("a table_stalled event");
    let reason = first["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("partition 0: 40 records wait from offset 0"),
        "{first}"
    );
    assert!(reason.contains("nothing landed for"), "{first}");
    let last_error = first["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("fetch out of range"),
        "the likely cause is named: {first}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM user_locations").await, 0);

    // Traces show it too: a span of its own with the stall as its error event.
    let event = wait_for(Duration::from_secs(30), "a table_stalled span over OTLP", || async {
        let r = received.lock().expect("lock");
        r.spans
            .iter()
            .filter(|s| s.name == "table_stalled" && otlp::attribute(s, "table").as_deref() == Some(table.name()))
            .flat_map(|s| s.events.iter())
            .map(|e| otlp::attributes(&e.attributes))
            .find(|a| a.contains(&("event".to_owned(), "table_stalled".to_owned())))
    })
    .await;
    let field = |key: &str| {
        event
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(
        field("reason").starts_with("partition 0: 40 records wait from offset 0"),
        "{event:?}"
    );
    assert!(field("last_error").contains("fetch out of range"), "{event:?}");
    assert_eq!(field("level"), "ERROR", "{event:?}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
        .arg("status")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("stalled: user_locations partition 0: 40 records wait from offset 0"),
        "{text}"
    );
    assert!(text.contains("STALLED: 40 records wait"), "{text}");
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_the_dwh_has_no_offset_for_starts_from_the_reset_policy_not_from_kafka() {
    let (broker, prefix) = broker(1).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(18));
    let run = |url: String, extra: &'static [(&'static str, &'static str)], until: i64| {
        let config = config_from(&ingest_env(&broker, &prefix, &url), extra);
        let (topic, group) = (topic.clone(), group(&prefix));
        async move {
            let dwh = migrated(&config).await;
            let ingest = InProcessIngest::start(config.clone(), dwh.clone());
            wait_for(Duration::from_secs(30), "the partition to be caught up", || async {
                (dwh.stored_offset(&group, &topic, 0).await.ok()?? == until).then_some(())
            })
            .await;
            ingest.stop().await;
            dwh.count_rows("user_locations").await.expect("count")
        }
    };
    // An old deployment: its ingest mirrored offset 10 to Kafka for the group.
    let config = config_from(&ingest_env(&broker, &prefix, &fresh_pg_url().await), &[]);
    publish(&config, &topic, &records[..10]).await;
    assert_eq!(run(fresh_pg_url().await, &[], 10).await, 10);

    // A fresh DWH on that group holds none of the partition: every record lands,
    // not only those after the Kafka offset.
    publish(&config, &topic, &records[10..15]).await;
    assert_eq!(run(fresh_pg_url().await, &[], 15).await, 15);

    // Adopting the Kafka offsets is an explicit choice. The group's Kafka offset
    // is set to 15 here, as the old deployment would have left it: the ingest's
    // own mirror of its offsets is asynchronous, and its last commit before a
    // stop may not have reached the broker.
    commit_in_kafka(&config, &topic, 15).await;
    publish(&config, &topic, &records[15..]).await;
    assert_eq!(
        run(fresh_pg_url().await, &[("KAFKA_ADOPT_COMMITTED_OFFSETS", "true")], 18).await,
        3
    );
}

/// A write stuck on a lock: SIGTERM ends the process at the grace deadline
/// (the write cancelled, nothing committed); a second signal ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_cancels_a_stuck_write_at_the_deadline_and_a_second_signal_exits_at_once() {
    for second_signal in [false, true] {
        let (broker, prefix) = broker(1).await;
        let url = fresh_pg_url().await;
        let grace = if second_signal { "60" } else { "2" };
        let mut env = ingest_env(&broker, &prefix, &url);
        env.push(("KAFKA_SHUTDOWN_GRACE_SECONDS".into(), grace.into()));
        env.push(("LOG_FORMAT".into(), "json".into()));
        let config = config_from(&env, &[]);
        let dwh = migrated(&config).await;
        let table = Table::UserLocations;
        let topic = topic(&prefix, table);
        let mut blocker = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql("BEGIN; LOCK TABLE user_locations IN ACCESS EXCLUSIVE MODE")
            .execute(&mut blocker)
            .await
            .expect("lock");
        publish(&config, &topic, &keyed(table, locations(5))).await;
        let mut child = Child::ingest(&env);
        // The fault: the write waits on the lock.
        let name = database_name(&url);
        wait_for(Duration::from_secs(30), "the write to wait on the lock", || async {
            let sql =
                format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' AND wait_event_type = 'Lock'");
            (count(&url, &sql).await > 0).then_some(())
        })
        .await;
        child.signal("TERM");
        let started = Instant::now();
        if second_signal {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(child.running(), "the first signal waits for the write");
            child.signal("TERM");
        }
        let status = child.wait_exit(Duration::from_secs(15)).expect("the process exits");
        let took = started.elapsed();
        let log = child.log_text();
        let aborted = child.events("batch_aborted");
        if second_signal {
            assert!(took < Duration::from_secs(4), "{took:?}");
            assert_eq!(child.events("shutdown_forced").len(), 1, "{log}");
            assert!(aborted.is_empty(), "no grace period ran out: {log}");
            assert!(!status.success());
        } else {
            assert!(
                took >= Duration::from_secs(2) && took < Duration::from_secs(8),
                "{took:?}"
            );
            // The stuck write of the five records was the one cancelled.
            assert_eq!(aborted.len(), 1, "{log}");
            assert_eq!(aborted[0]["records"], 5, "{log}");
            assert_eq!(aborted[0]["topic"], topic.as_str(), "{log}");
            assert!(child.events("shutdown_forced").is_empty(), "{log}");
            assert!(status.success(), "{status:?}\n{log}");
        }
        sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await.expect("unlock");
        assert_eq!(dwh.count_rows("user_locations").await.expect("count"), 0);
        assert_eq!(
            dwh.stored_offset(&group(&prefix), &topic, 0).await.expect("offset"),
            None
        );
    }
}

/// A member of the group outside this process, subscribed to `topic` with the
/// ingest's assignment strategy; it polls on its own thread until dropped.
struct Newcomer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Newcomer {
    /// Joins and returns once the group has given it `topic`'s partitions.
    async fn join(config: &dwh_helper::config::Config, topic: &str) -> Newcomer {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        use std::sync::atomic::{AtomicBool, Ordering};
        let consumer: BaseConsumer = dwh_helper::kafka::client_config(
            &config.kafka,
            &[
                ("group.id", config.kafka.group_id.as_str()),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("enable.auto.commit", "false"),
            ],
        )
        .expect("config")
        .create()
        .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (assigned, joined) = tokio::sync::oneshot::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut assigned = Some(assigned);
                while !stop.load(Ordering::SeqCst) {
                    let _ = consumer.poll(Duration::from_millis(100));
                    if assigned.is_some() && consumer.assignment().is_ok_and(|a| a.count() > 0) {
                        let _ = assigned.take().map(|tx| tx.send(()));
                    }
                }
                consumer.unsubscribe();
            })
        };
        tokio::time::timeout(Duration::from_secs(30), joined)
            .await
            .expect("the newcomer got its partitions within 30 s")
            .expect("the newcomer's thread runs");
        Newcomer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Newcomer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One table's writes wait on a lock for twice `max.poll.interval.ms`, with far
/// more records than it may hold (its own memory and its role's whole pool): its
/// consumer pauses instead of blocking, stays in the group (no rebalance), and
/// the other table keeps landing rows on its own share, the pool spent.
/// A member that joins the group during the stall makes a round of the whole
/// group: the stalled table's member answers it without its busy task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_stalled_past_the_poll_interval_keeps_its_member_and_stops_no_other_table() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let config = config_from(
        &ingest_env(&broker, &prefix, &url),
        &[
            ("KAFKA_LIBRDKAFKA_MAX_POLL_INTERVAL_MS", "7000"),
            // Two tables of 4 MiB each: 1 MiB of prefetch twice, 1 MiB of
            // records its own and 1 MiB to the pool (2 MiB).
            ("KAFKA_INGEST_TABLES", "user_locations,events_part"),
            ("KAFKA_MAX_IN_FLIGHT_BYTES", "8MiB"),
            ("KAFKA_BATCH_MAX_ROWS", "1000"),
            ("KAFKA_WRITE_LANES", "2"),
        ],
    );
    let share = dwh_helper::kafka::memory::MemoryShare::of(8 << 20, 2);
    assert_eq!((share.own, share.pooled), (1 << 20, 1 << 20), "{share:?}");
    let dwh = migrated(&config).await;
    count_writes(&url).await;
    let (stalled, other) = (Table::UserLocations, Table::EventsPart);
    let ingest = InProcessIngest::start(config.clone(), dwh.clone());
    publish(&config, &topic(&prefix, other), &keyed(other, events(100, 1))).await;
    // Each table's consumer got its partitions once (rounds that move nothing
    // of a table are not counted as its rebalances).
    let tables = config.kafka.ingest_tables.len() as u64;
    wait_for(Duration::from_secs(30), "the group to settle", || async {
        (dwh.count_rows("events_part").await.ok()? == 100 && ingest.status.counters().rebalances == tables)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut blocker = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE user_locations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .expect("lock");
    let before = ingest.status.counters();
    // About 3 MiB of records, charged at twice their bytes: over twice what the
    // table may hold (its own share and the role's whole pool).
    let backlog = keyed(stalled, locations(20_000));
    let bytes: usize = backlog.iter().map(|(k, v)| k.len() + v.len()).sum();
    let may_hold = (share.own + 2 * share.pooled) as usize; // two tables pool theirs
    assert!(
        2 * bytes > 2 * may_hold,
        "{bytes} bytes against {may_hold} held at most"
    );
    publish(&config, &topic(&prefix, stalled), &backlog).await;
    let name = database_name(&url);
    wait_for(Duration::from_secs(30), "a write to wait on the lock", || async {
        let sql =
            format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' AND wait_event_type = 'Lock'");
        (count(&url, &sql).await > 0).then_some(())
    })
    .await;
    // Rounds of the group that move a partition of the stalled table while its
    // task waits on the write: a newcomer takes one (the revoke waits half of
    // max.poll.interval.ms, then goes on), then leaves and gives it back (an
    // assignment the task cannot answer while it waits).
    let deferred =
        || Scrape::of_this_process().sum("dwh_helper_assignments_deferred_total", &[("table", stalled.name())]);
    let deferred_before = deferred();
    let newcomer = Newcomer::join(&config, &topic(&prefix, stalled)).await;
    let mut landed = 100;
    for round in 0..4 {
        let more = keyed(other, events(100, 10 + round));
        publish(&config, &topic(&prefix, other), &more).await;
        landed += 100;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(newcomer);
    for round in 4..14 {
        let more = keyed(other, events(100, 10 + round));
        publish(&config, &topic(&prefix, other), &more).await;
        landed += 100;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for(Duration::from_secs(10), "the other table to keep landing", || async {
        (dwh.count_rows("events_part").await.ok()? == landed).then_some(())
    })
    .await;
    // This test's database only: other tests wait on locks of their own. A
    // write has waited for over twice max.poll.interval.ms, and no lane has
    // more than its one write waiting (the table's two partitions, one per
    // lane; the second lane's may have started later, after its partition
    // came back from the newcomer).
    let waiting =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' AND wait_event_type = 'Lock'");
    let long = format!("{waiting} AND now() - query_start > interval '14 seconds'");
    assert!(
        count(&url, &long).await >= 1,
        "still stalled, past twice max.poll.interval.ms"
    );
    let writes = count(&url, &waiting).await;
    assert!((1..=2).contains(&writes), "one write per lane at most: {writes}");
    let during = ingest.status.counters();
    assert!(
        during.pauses > before.pauses,
        "the stalled table paused fetching: {during:?}"
    );
    // Its member was never evicted: it is in the group, which is settled.
    let group = {
        let kafka = config.kafka.clone();
        tokio::task::spawn_blocking(move || dwh_helper::kafka::groups::describe(&kafka, &kafka.group_id))
            .await
            .expect("describe")
            .expect("the group described")
            .expect("a real broker describes groups")
    };
    assert!(
        deferred() > deferred_before,
        "the partition given back was assigned paused, counted"
    );
    let stalled_client = format!("dwh-helper-{}", stalled.name());
    assert!(
        group.state == "Stable" && group.members.iter().any(|m| m.client_id == stalled_client),
        "{group:?}"
    );

    sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await.expect("unlock");
    wait_for(Duration::from_secs(60), "the backlog to land", || async {
        (dwh.count_rows("user_locations").await.ok()? == 20_000).then_some(())
    })
    .await;
    let after = ingest.status.counters();
    assert_eq!(after.skipped, 0, "nothing was written twice");
    // Each lane's batches (the one waiting on the lock, the full one queued behind
    // it, and those after) committed once each, and the offsets reached the end.
    assert_written_once(&url, 20_000).await;
    let mut ends: Vec<(i32, i64)> = watermarks(&config, &topic(&prefix, stalled))
        .await
        .iter()
        .map(|w| (w.partition, w.high))
        .collect();
    ends.sort_unstable();
    assert_eq!(
        stored_offsets(&url, &config.kafka.group_id, &topic(&prefix, stalled)).await,
        ends
    );
    ingest.stop().await;
}

/// Versions of user properties, newest arrival wins: round `r` sets every
/// property's `value_text` to `r` (zero-padded, so text order is round order).
fn property_round(keys: usize, round: usize) -> Vec<(String, Vec<u8>)> {
    let records = (0..keys)
        .map(|k| {
            serde_json::json!({
                "application_id": 7,
                "profile_id": format!("profile-{k}"),
                "property_name": "tier",
                "property_kind": "temporary",
                "value_text": format!("{round:06}"),
                "snapshot_date": "2024-03-01",
                "source": "test"
            })
        })
        .collect();
    keyed(Table::TmpUserProperties, records)
}

/// A member is frozen (SIGSTOP) past its session timeout with a write in flight;
/// the group gives its partitions to the other member; then it thaws (SIGCONT).
/// No record is written twice, and no property ever goes back to an older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zombie_thawed_after_its_group_moved_on_writes_nothing_twice_and_nothing_goes_back() {
    let (broker, prefix) = broker(4).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    // One group member per process. The mock cluster names a member after the
    // address of its struct (`"%p"`, rdkafka_mock_cgrp.c), so a member created
    // after the zombie's members expired can get the id one of them still holds.
    // With seven members thawing at once, one rejoins under a fresh id that a
    // sibling still uses; two clients then share one member, and the mock aborts
    // the test process (`Assertion '!member->resp' failed`, seen in CI). With one
    // member, the only holder of a stale id is the client that rejoins with it.
    env.push(("KAFKA_INGEST_TABLES".into(), Table::TmpUserProperties.name().into()));
    let config = config_from(&env, &[]);
    migrated(&config).await;
    // Each write of a property version is counted; a version older than the
    // stored one is recorded; every statement takes 0.2 s, so that a write is in
    // flight most of the time.
    exec(
        &url,
        "CREATE TABLE test_writes (key text PRIMARY KEY, n int NOT NULL);
         CREATE TABLE test_regressions (profile_id text, stored text, incoming text);
         CREATE FUNCTION test_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO test_writes VALUES (NEW.profile_id || ':' || NEW.value_text, 1)
                 ON CONFLICT (key) DO UPDATE SET n = test_writes.n + 1;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_count_write BEFORE INSERT ON tmp_user_properties
             FOR EACH ROW EXECUTE FUNCTION test_count_write();
         CREATE FUNCTION test_regression() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.value_text < OLD.value_text THEN
                 INSERT INTO test_regressions VALUES (OLD.profile_id, OLD.value_text, NEW.value_text);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_regression BEFORE UPDATE ON tmp_user_properties
             FOR EACH ROW EXECUTE FUNCTION test_regression();
         CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$;
         CREATE TRIGGER test_slow BEFORE INSERT ON tmp_user_properties
             FOR EACH STATEMENT EXECUTE FUNCTION test_slow();",
    )
    .await;
    let topic = topic(&prefix, Table::TmpUserProperties);
    let (keys, rounds) = (100, 40);
    let producing = {
        let (config, topic) = (config.clone(), topic.clone());
        tokio::spawn(async move {
            for round in 0..rounds {
                publish(&config, &topic, &property_round(keys, round)).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut zombie = Child::observed(&env, "ingest");
    let other = Child::observed(&env, "ingest");
    let table = Table::TmpUserProperties;
    // Versions of a key that meet in one batch are merged (the newest is
    // written), so fewer writes than records land: count what is written.
    let written = || async { count(&url, "SELECT coalesce(sum(n), 0) FROM test_writes").await };
    let last = format!("{:06}", rounds - 1);
    let newest = || async {
        let sql = format!("SELECT count(*) FROM tmp_user_properties WHERE value_text = '{last}'");
        count(&url, &sql).await
    };
    wait_for(Duration::from_secs(60), "both members to write", || async {
        let zombie_holds = zombie.table_metric("dwh_helper_partitions_assigned", table).await? > 0.0;
        (written().await > 500 && zombie_holds).then_some(())
    })
    .await;
    // Freeze it while its write is in the database.
    let zombie_pid = zombie.child.id();
    wait_for(Duration::from_secs(30), "a write of the zombie in flight", || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dwh-helper' AND state = 'active' \
                   AND query LIKE '%tmp_user_properties%'";
        (count(&url, sql).await > 0).then_some(())
    })
    .await;
    zombie.signal("STOP");
    // The group moves on: the other member is given the zombie's partitions,
    // every partition of the topic.
    let partitions = watermarks(&config, &topic).await.len() as f64;
    wait_for(Duration::from_secs(60), "the other member to take over", || async {
        let held = other.table_metric("dwh_helper_partitions_assigned", table).await?;
        (held == partitions).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    zombie.signal("CONT");
    producing.await.expect("all published");
    wait_for(
        Duration::from_secs(120),
        "the newest version of every property",
        || async { (newest().await == keys as i64).then_some(()) },
    )
    .await;
    // Settle: a late write of the zombie would land now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("zombie pid {zombie_pid}; writes {}", written().await);
    assert_eq!(
        count(&url, "SELECT count(*) FROM test_writes WHERE n > 1").await,
        0,
        "a record was written twice"
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM test_regressions").await,
        0,
        "a value went back"
    );
    assert_eq!(newest().await, keys as i64, "every property holds its newest version");
    assert!(zombie.running(), "the zombie lives on after its thaw");
    // The two members met on a partition: one of them (the zombie's late write,
    // or the new owner's write behind the zombie's lock) was fenced.
    let mut fenced = 0.0;
    let mut restarts = 0.0;
    for member in [&zombie, &other] {
        fenced += member
            .table_metric("dwh_helper_batches_fenced_total", table)
            .await
            .expect("scrape");
        restarts += member
            .table_metric("dwh_helper_consumer_restarts_total", table)
            .await
            .expect("scrape");
    }
    assert!(fenced >= 1.0, "no write was fenced: the zombie never met the new owner");
    // The fenced member rebuilt its consumer, and said so.
    assert!(restarts >= 1.0, "a fence restarts the consumer: {restarts}");
    drop((zombie, other));
}

/// A consumer's close that hangs is given up after 30 s, counted as kind
/// `close`, and left to finish on its own thread, so that a table whose
/// consumer is rebuilt (after a fence, a fetch out of range) is not held up by
/// the old one. The hang here: the close's revoke waits for a task that holds
/// its events and answers nothing (half of a 120 s `max.poll.interval.ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_close_that_hangs_is_given_up_after_30_s_and_counted() {
    use dwh_helper::kafka::consumer::{subscribe, Event, Role};
    use dwh_helper::kafka::memory::{MemoryShare, TableMemory};
    let (broker, prefix) = broker(1).await;
    let config = config_from(
        &ingest_env(&broker, &prefix, &fresh_pg_url().await),
        &[("KAFKA_LIBRDKAFKA_MAX_POLL_INTERVAL_MS", "120000")],
    );
    let (kafka, table) = (&config.kafka, Table::UserLocations);
    let subscription =
        subscribe(kafka, &kafka.group_id, table, Role::Ingest, std::sync::Arc::new(|_| {})).expect("a consumer");
    let share = MemoryShare::of(kafka.max_in_flight_bytes, 1);
    let memory = TableMemory::new(&share, share.pool(1));
    let (poller, mut events) = subscription
        .poll(memory, std::sync::Arc::new(|| {}))
        .expect("a poll thread");
    // It joins the group; the task's part (where the partition starts) is played here.
    match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
        Ok(Some(Event::Assigned { partitions, reply })) => {
            let starts = partitions.iter().map(|p| (*p, rdkafka::Offset::Beginning)).collect();
            reply.send(starts).expect("the poll thread waits for the starts");
        }
        other => panic!("an assignment first: {other:?}"),
    }

    let closes = || {
        Scrape::of_this_process().sum(
            "dwh_helper_kafka_errors_total",
            &[("table", table.name()), ("kind", "close")],
        )
    };
    let before = closes();
    let started = Instant::now();
    poller.close().await;
    let took = started.elapsed();
    // The fault: the close's revoke was handed to the task, which never answered.
    match events.try_recv() {
        Ok(Event::Revoked { partitions, .. }) => assert_eq!(partitions, vec![0]),
        other => panic!("the close revoked the partition: {other:?}"),
    }
    assert!(took >= Duration::from_secs(29), "the close returned after {took:?}");
    assert!(took < Duration::from_secs(40), "given up after 30 s, not {took:?}");
    assert_eq!(closes(), before + 1.0, "the hung close is counted");
}
