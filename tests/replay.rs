//! `dwh-helper replay` and `dwh-helper rejects` as ops run them, against the dev
//! broker, a real PostgreSQL and a real `dwh-helper run` child.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use dwh_helper::catalogue::Table;
use dwh_helper::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_dwh-helper");
const TABLE: Table = Table::UserLocations;

/// `dwh-helper <args>` with `env` only.
fn cli(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("USER", "replay-test")
        .envs(env.iter().cloned())
        .output()
        .expect("dwh-helper runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `dwh-helper <args>`, asserting it exits 0; returns stdout and stderr.
fn ok(env: &[(String, String)], args: &[&str]) -> (String, String) {
    let out = cli(env, args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{args:?} failed: {stdout}\n{stderr}");
    (stdout, stderr)
}

/// The words of a command line (no argument of these tests holds a space).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Stops a child with SIGTERM and asserts it exited 0.
fn stop(child: Child) {
    assert_eq!(
        child.terminate(Duration::from_secs(30)).map(|s| s.success()),
        Some(true)
    );
}

/// A digest of every row of the table, every column included.
async fn table_digest(url: &str) -> String {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT md5(string_agg(t::text, ',' ORDER BY uuid)) FROM user_locations t")
        .fetch_one(&mut conn)
        .await
        .expect("digest")
}

/// Starts an ingest child, waits until it is caught up with the broker, and
/// returns the child (to scrape) with the end offsets.
async fn ingest_until_caught_up(env: &[(String, String)], config: &Config, url: &str, prefix: &str) -> Child {
    let child = Child::observed(env, "ingest");
    caught_up(config, url, prefix, TABLE, Duration::from_secs(90)).await;
    child
}

/// Rows the child counted as already stored, once its count settles at `expected`.
async fn skipped_reaches(child: &Child, expected: f64) {
    wait_for(
        Duration::from_secs(30),
        &format!("rows_skipped_total = {expected}"),
        || async {
            let skipped = child.table_metric("dwh_helper_rows_skipped_total", TABLE).await?;
            (skipped == expected).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_scenario_moves_the_stored_offsets_and_ingest_rereads_without_duplicates() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let env = ingest_env(&broker, &prefix, &url);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let topic = topic(&prefix, TABLE);
    let records = keyed(TABLE, locations(40));
    publish(&config, &topic, &records).await;

    // Ingested to the end; while the child runs, an execution is refused.
    let child = ingest_until_caught_up(&env, &config, &url, &prefix).await;
    let before = stored_offsets(&url, &group(&prefix), &topic).await;
    let ends: Vec<i64> = before.iter().map(|(_, o)| *o).collect();
    assert_eq!(ends.iter().sum::<i64>(), 40);
    let digest = table_digest(&url).await;
    let out = cli(
        &env,
        &["replay", "--table", "user_locations", "--to-earliest", "--execute"],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("group {} is ingesting user_locations by ", group(&prefix))),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(stored_offsets(&url, &group(&prefix), &topic).await, before);
    stop(child);

    // The plan alone changes nothing.
    let (plan, _) = ok(&env, &words("replay --table user_locations --to-earliest"));
    assert!(
        plan.contains("2 partition(s): 40 record(s) to read again, 0 to skip"),
        "{plan}"
    );
    assert!(plan.contains("nothing changed"), "{plan}");
    assert_eq!(stored_offsets(&url, &group(&prefix), &topic).await, before);

    // --to-earliest: everything is read again, and stored already.
    let (done, warnings) = ok(
        &env,
        &["replay", "--table", "user_locations", "--to-earliest", "--execute"],
    );
    assert!(
        done.contains(&format!("partition(s) of group {} moved", group(&prefix))),
        "{done}"
    );
    assert_eq!(
        stored_offsets(&url, &group(&prefix), &topic).await,
        vec![(0, 0), (1, 0)]
    );
    // Kafka takes the mirror's commit once the group is empty.
    assert!(!warnings.contains("warning: "), "{warnings}");
    assert_eq!(committed_offsets(&config, &topic).await, vec![(0, 0), (1, 0)]);
    let child = ingest_until_caught_up(&env, &config, &url, &prefix).await;
    skipped_reaches(&child, 40.0).await;
    assert_eq!(
        child.table_metric("dwh_helper_rows_inserted_total", TABLE).await,
        Some(0.0)
    );
    assert_eq!(table_digest(&url).await, digest, "the rows are unchanged");
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(40));
    stop(child);

    // --shift-by on one partition, exported; --to-offset beyond the log is clamped.
    let dir = tempfile::tempdir().expect("dir");
    let plan_path = dir.path().join("plan.csv");
    let plan_file = plan_path.to_str().unwrap();
    let (plan, _) = ok(
        &env,
        &[
            "replay",
            "--table",
            "user_locations",
            "--partitions",
            "0",
            "--shift-by",
            "-5",
            "--export",
            plan_file,
        ],
    );
    assert!(plan.contains("1 partition(s): 5 record(s) to read again"), "{plan}");
    assert_eq!(
        std::fs::read_to_string(&plan_path).unwrap(),
        format!("{topic},0,{}\n", ends[0] - 5)
    );
    let (plan, warnings) = ok(&env, &words("replay --table user_locations --to-offset 1000"));
    assert!(
        warnings.contains(&format!(
            "{topic} partition 0: offset 1000 is above the high watermark {}",
            ends[0]
        )),
        "{warnings}"
    );
    assert!(plan.contains("0 record(s) to read again, 0 to skip"), "{plan}");

    // --from-file applies the exported plan: partition 0 only.
    ok(&env, &["replay", "--from-file", plan_file, "--execute"]);
    assert_eq!(
        stored_offsets(&url, &group(&prefix), &topic).await,
        vec![(0, ends[0] - 5), (1, ends[1])]
    );
    let child = ingest_until_caught_up(&env, &config, &url, &prefix).await;
    skipped_reaches(&child, 5.0).await;
    assert_eq!(table_digest(&url).await, digest);
    stop(child);

    // --to-latest skips what was published while ingest was stopped.
    let later = keyed(TABLE, locations(50)).split_off(40);
    publish(&config, &topic, &later).await;
    let (plan, _) = ok(
        &env,
        &["replay", "--table", "user_locations", "--to-latest", "--execute"],
    );
    assert!(plan.contains("0 record(s) to read again, 10 to skip"), "{plan}");
    let child = ingest_until_caught_up(&env, &config, &url, &prefix).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(40));
    assert_eq!(table_digest(&url).await, digest);
    stop(child);

    // Each execution is recorded, and `status` shows the last one.
    assert_eq!(
        pg_count(
            &url,
            "SELECT count(*) FROM dwh_replays WHERE executed_by LIKE 'replay-test@%'"
        )
        .await,
        Some(3)
    );
    let (status, _) = ok(&env, &words("status"));
    assert!(status.contains("last replay: --to-latest"), "{status}");
    let (json, _) = ok(&env, &words("status --json"));
    let report: serde_json::Value = serde_json::from_str(&json).expect("status JSON");
    assert_eq!(report["replays"][0]["scenario"], "--to-latest");
    assert_eq!(report["replays"][0]["plan"].as_array().map(Vec::len), Some(2));
}

#[test]
fn usage_errors_name_the_flag_and_exit_2() {
    let env: Vec<(String, String)> = vec![("KAFKA_BOOTSTRAP_SERVERS".into(), "127.0.0.1:1".into())];
    for (args, expected) in [
        (&["replay", "--table", "user_locations"][..], "--to-earliest"),
        (
            &["replay", "--table", "user_locations", "--to-earliest", "--to-latest"],
            "cannot be used with",
        ),
        (&["replay", "--to-earliest"], "--table"),
        (&["replay", "--table", "users", "--to-earliest"], "users"),
        (
            &["replay", "--table", "user_locations", "--by-duration", "soon"],
            "soon",
        ),
        (
            &["rejects", "purge", "--table", "user_locations", "--before", "yesterday"],
            "YYYY-MM-DD",
        ),
    ] {
        let out = cli(&env, args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

async fn committed_offsets(config: &Config, topic: &str) -> Vec<(i32, i64)> {
    let (kafka, config) = (config.kafka.clone(), config.clone());
    let list = vec![(topic.to_owned(), vec![0, 1])];
    let mut offsets: Vec<(i32, i64)> = tokio::task::spawn_blocking(move || {
        dwh_helper::kafka::topics::committed(&kafka, &config.kafka.group_id, &list).expect("committed offsets")
    })
    .await
    .expect("task")
    .into_iter()
    .map(|((_, p), o)| (p, o))
    .collect();
    offsets.sort();
    offsets
}

/// The records of `topic` from `from` on in each partition, as (key, payload).
async fn read_topic(config: &Config, topic: &str, from: &[i64], until: &[i64]) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::Message as _;
    let kafka = config.kafka.clone();
    let (topic, from, until) = (topic.to_owned(), from.to_vec(), until.to_vec());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = dwh_helper::kafka::client_config(&kafka, &[("group.id", "replay-test-reader")])
            .expect("config")
            .create()
            .expect("consumer");
        let mut list = rdkafka::TopicPartitionList::new();
        for (p, &o) in from.iter().enumerate() {
            list.add_partition_offset(&topic, p as i32, rdkafka::Offset::Offset(o))
                .expect("offset");
        }
        consumer.assign(&list).expect("assign");
        let wanted: i64 = until.iter().zip(&from).map(|(u, f)| u - f).sum();
        let mut records = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while (records.len() as i64) < wanted && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                records.push((m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default().to_vec()));
            }
        }
        records
    })
    .await
    .expect("reader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_are_requeued_once_after_the_cause_is_fixed() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let topic = topic(&prefix, TABLE);
    // Records over DWH_MAX_WRITE_BATCH_BYTES are rejected as too large: 4 of
    // the 12 carry a long city name.
    let records: Vec<(String, Vec<u8>)> = keyed(
        TABLE,
        locations(12)
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                if i % 3 == 0 {
                    r["city"] = serde_json::json!("Moscow ".repeat(200));
                }
                r
            })
            .collect(),
    );
    env.push(("DWH_MAX_WRITE_BATCH_BYTES".into(), "1024".into()));
    publish(&config, &topic, &records).await;
    let child = ingest_until_caught_up(&env, &config, &url, &prefix).await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(8));
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(4)
    );
    stop(child);

    let (list, _) = ok(&env, &words("rejects list --table user_locations --reason LIMIT"));
    assert!(list.contains("4 reject(s)"), "{list}");
    let (none, _) = ok(
        &env,
        &words("rejects list --table user_locations --reason nosuchreason"),
    );
    assert!(none.contains("0 reject(s)"), "{none}");
    let (json, _) = ok(&env, &words("rejects list --table user_locations --json --since 1h"));
    let listed: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(listed.len(), 4);
    for r in &listed {
        let (key, payload) = records
            .iter()
            .find(|(k, _)| r["key"] == serde_json::json!(k))
            .unwrap_or_else(|| panic!("a reject of a published record: {r}"));
        assert_eq!(
            r["payload"],
            serde_json::json!(String::from_utf8_lossy(payload)),
            "{key}"
        );
    }
    let ends: Vec<i64> = watermarks(&config, &topic).await.iter().map(|w| w.high).collect();
    let (dry, _) = ok(&env, &words("rejects requeue --table user_locations --dry-run"));
    assert!(
        dry.contains("dry run: 4 reject(s) of user_locations would be requeued"),
        "{dry}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let high = |marks: Vec<dwh_helper::kafka::topics::Watermarks>| marks.iter().map(|w| w.high).collect::<Vec<_>>();
    assert_eq!(high(watermarks(&config, &topic).await), ends, "a dry run sends nothing");

    // The limit is raised; the rejects go back onto the topic, byte for byte
    // with their keys, and land.
    env.retain(|(k, _)| k != "DWH_MAX_WRITE_BATCH_BYTES");
    let (sent, _) = ok(&env, &words("rejects requeue --table user_locations"));
    assert!(sent.contains("requeued 4 reject(s) of user_locations"), "{sent}");
    assert!(sent.contains("4 marked requeued"), "{sent}");
    let after = high(watermarks(&config, &topic).await);
    let mut resent = read_topic(&config, &topic, &ends, &after).await;
    let mut originals: Vec<(Option<Vec<u8>>, Vec<u8>)> = records
        .iter()
        .filter(|(_, p)| p.len() > 1024)
        .map(|(k, p)| (Some(k.clone().into_bytes()), p.clone()))
        .collect();
    resent.sort();
    originals.sort();
    assert_eq!(resent, originals, "the rejected records, byte for byte with their keys");
    let child = ingest_until_caught_up(&env, &config, &url, &prefix).await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(12));
    assert_eq!(
        pg_count(
            &url,
            "SELECT count(*) FROM dwh_rejected_records WHERE requeued_at IS NOT NULL"
        )
        .await,
        Some(4)
    );
    assert_eq!(
        child.table_metric("dwh_helper_rows_inserted_total", TABLE).await,
        Some(4.0)
    );

    // A second requeue sends nothing.
    let (again, _) = ok(&env, &words("rejects requeue --table user_locations"));
    assert!(again.contains("nothing to requeue"), "{again}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(high(watermarks(&config, &topic).await), after, "nothing was sent again");
    let (pending, _) = ok(&env, &words("rejects list --table user_locations --pending"));
    assert!(pending.contains("0 reject(s)"), "{pending}");
    stop(child);

    // Purge deletes by date, only before it.
    let (kept, _) = ok(&env, &words("rejects purge --table user_locations --before 2000-01-01"));
    assert!(kept.contains("purged 0 reject(s)"), "{kept}");
    let (purged, _) = ok(&env, &words("rejects purge --table user_locations --before 2100-01-01"));
    assert!(purged.contains("purged 4 reject(s)"), "{purged}");
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(0)
    );
}

/// Issue 24: `rejects requeue` used to stop at the first record the producer
/// refused, after sending part of a chunk without marking it, so every run sent
/// those again and stopped at the same place. A refused record is now marked
/// with why and passed; nothing is sent twice, in one run or the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_the_producer_refuses_is_marked_and_passed_and_nothing_is_sent_twice() {
    let (broker, prefix) = broker_with(&[(TABLE, 1)]).await;
    let url = fresh_pg_url().await;
    let env = ingest_env(&broker, &prefix, &url);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let topic = topic(&prefix, TABLE);
    // Five rejects; the third is 2 MB, over the producer's message.max.bytes.
    let records = keyed(TABLE, locations(5));
    let huge = serde_json::json!({"city": "x".repeat(2_000_000)})
        .to_string()
        .into_bytes();
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    for (i, (key, payload)) in records.iter().enumerate() {
        let payload = if i == 2 { huge.clone() } else { payload.clone() };
        sqlx::query(
            "INSERT INTO dwh_rejected_records (table_name, topic, partition, \"offset\", record_key, payload, reason) \
             VALUES ('user_locations', $1, 0, $2, $3, $4, 'a test reject')",
        )
        .bind(&topic)
        .bind(i as i64)
        .bind(key.as_bytes())
        .bind(payload)
        .execute(&pool)
        .await
        .expect("insert a reject");
    }
    let high = |marks: Vec<dwh_helper::kafka::topics::Watermarks>| marks.iter().map(|w| w.high).collect::<Vec<_>>();
    let before = high(watermarks(&config, &topic).await);

    let (out, _) = ok(&env, &words("rejects requeue --table user_locations"));
    assert!(out.contains("requeued 4 reject(s) of user_locations"), "{out}");
    assert!(out.contains("4 marked requeued; 1 refused by the producer"), "{out}");
    let refusals: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT \"offset\", requeue_error FROM dwh_rejected_records WHERE requeued_at IS NULL")
            .fetch_all(&pool)
            .await
            .expect("refusals");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].0, 2, "the huge one");
    let why = refusals[0].1.clone().unwrap_or_default();
    assert!(why.contains("MessageSizeTooLarge"), "the reason is kept: {why}");
    let after = high(watermarks(&config, &topic).await);
    let mut resent = read_topic(&config, &topic, &before, &after).await;
    let mut expected: Vec<(Option<Vec<u8>>, Vec<u8>)> = records
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, (k, p))| (Some(k.clone().into_bytes()), p.clone()))
        .collect();
    resent.sort();
    expected.sort();
    assert_eq!(resent, expected, "the four others, once each");

    // The next run sends nothing: the refused one is not tried again unasked.
    let (again, _) = ok(&env, &words("rejects requeue --table user_locations"));
    assert!(again.contains("nothing to requeue"), "{again}");
    // Asked, it is tried again, refused again, and nothing else is sent.
    let (retry, _) = ok(&env, &words("rejects requeue --table user_locations --retry-refused"));
    assert!(
        retry.contains("requeued 0 reject(s)") && retry.contains("1 refused by the producer"),
        "{retry}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(high(watermarks(&config, &topic).await), after, "nothing was sent twice");
    let (list, _) = ok(&env, &words("rejects list --table user_locations --pending"));
    assert!(list.contains("0 reject(s)"), "{list}");
    let (all, _) = ok(&env, &words("rejects list --table user_locations"));
    assert!(all.contains("refused by producer"), "{all}");
}

/// The first offset of each partition whose records came after `at`, from the
/// records published before and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn to_datetime_and_by_duration_move_to_the_first_record_at_or_after_the_time() {
    // The real broker answers ListOffsets by timestamp (the mock cluster does not:
    // librdkafka issue 4755).
    let (broker, prefix) = broker_with(&[(TABLE, 2)]).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "LOG_LEVEL", "warn");
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let topic = topic(&prefix, TABLE);
    // One record per produce request, so that each has a timestamp of its own.
    let all = keyed(TABLE, locations(30));
    let publish_one_by_one = |records: &'static [(String, Vec<u8>)]| {
        let (config, topic) = (config.clone(), topic.clone());
        async move {
            for record in records {
                publish(&config, &topic, std::slice::from_ref(record)).await;
            }
        }
    };
    let all: &'static [(String, Vec<u8>)] = Vec::leak(all);
    publish_one_by_one(&all[..20]).await;
    let before_gap: Vec<i64> = watermarks(&config, &topic).await.iter().map(|w| w.high).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_one_by_one(&all[20..]).await;
    let ends: Vec<i64> = watermarks(&config, &topic).await.iter().map(|w| w.high).collect();
    let marks = watermarks(&config, &topic).await;
    assert_eq!(ends.iter().sum::<i64>(), 30, "{before_gap:?} {ends:?} {marks:?}");
    assert_ne!(before_gap, ends, "records came after the time");

    // Ingest stands at the end (as if caught up); the time moves it back to the
    // first record after `at` in each partition: the offsets before the gap.
    ok(
        &env,
        &["replay", "--table", "user_locations", "--to-latest", "--execute"],
    );
    let expected: Vec<(i32, i64)> = before_gap.iter().enumerate().map(|(p, &o)| (p as i32, o)).collect();
    let (plan, warnings) = ok(
        &env,
        &[
            "replay",
            "--table",
            "user_locations",
            "--to-datetime",
            &at.to_rfc3339(),
            "--execute",
        ],
    );
    assert!(warnings.is_empty(), "{warnings}");
    assert!(plan.contains("10 record(s) to read again"), "{plan}");
    assert!(
        plan.contains(&format!(
            "Kafka's committed offsets of {} mirror the new positions",
            group(&prefix)
        )),
        "{plan}"
    );
    assert_eq!(stored_offsets(&url, &group(&prefix), &topic).await, expected);
    assert_eq!(committed_offsets(&config, &topic).await, expected);

    // --by-duration: the same time, given as how long ago it was.
    ok(
        &env,
        &["replay", "--table", "user_locations", "--to-latest", "--execute"],
    );
    let ago = (chrono::Utc::now() - at).num_milliseconds();
    let (plan, _) = ok(
        &env,
        &[
            "replay",
            "--table",
            "user_locations",
            "--by-duration",
            &format!("{ago}ms"),
            "--execute",
        ],
    );
    assert!(plan.contains("10 record(s) to read again"), "{plan}");
    assert_eq!(stored_offsets(&url, &group(&prefix), &topic).await, expected);

    // A time after the last record: the high watermark (Kafka answers -1 there,
    // which replay resolves to the end, with a warning per partition).
    let (plan, warnings) = ok(
        &env,
        &[
            "replay",
            "--table",
            "user_locations",
            "--to-datetime",
            &chrono::Utc::now().to_rfc3339(),
        ],
    );
    assert!(plan.contains("0 record(s) to read again, 10 to skip"), "{plan}");
    assert_eq!(warnings.matches("warning: ").count(), 2, "{warnings}");
    assert!(warnings.contains("no record at or after"), "{warnings}");
    assert_eq!(
        stored_offsets(&url, &group(&prefix), &topic).await,
        expected,
        "a plan alone changes nothing"
    );

    // A consumer of the group reads the topic (not an ingest instance: nothing
    // announced it in the DWH). The broker describes the group, and replay refuses.
    let kafka = config.kafka.clone();
    let (subscribed, member_group) = (topic.clone(), group(&prefix));
    let (joined, assigned) = tokio::sync::oneshot::channel::<usize>();
    let (stop_member, leave) = std::sync::mpsc::channel::<()>();
    let member = std::thread::spawn(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let consumer: BaseConsumer = dwh_helper::kafka::client_config(&kafka, &[("group.id", &member_group)])
            .expect("config")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&subscribed]).expect("subscribe");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 && std::time::Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        let _ = joined.send(consumer.assignment().map(|a| a.count()).unwrap_or(0));
        while matches!(leave.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)) {
            let _ = consumer.poll(Duration::from_millis(100));
        }
    });
    assert_eq!(
        assigned.await.expect("member thread"),
        2,
        "the member holds both partitions"
    );
    let out = cli(&env, &words("replay --table user_locations --to-earliest --execute"));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "consumer group {} is Stable with 1 active member(s) reading",
            group(&prefix)
        )),
        "{stderr}"
    );
    assert_eq!(
        stored_offsets(&url, &group(&prefix), &topic).await,
        expected,
        "nothing changed"
    );
    let _ = stop_member.send(());
    member.join().expect("member thread");
}

/// The bookkeeping behind `replay` and `rejects`, on both backends (the demo and
/// a laptop run on SQLite): offsets and the replay record in one transaction,
/// reject filters, requeue marks, purge, and ingest announcements.
#[tokio::test]
async fn replays_rejects_and_announcements_are_kept_on_both_backends() {
    use dwh_helper::store::{Batch, PlannedOffset, RejectFilter, RejectedRecord};
    for db in [Db::Postgres, Db::Sqlite] {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let plan = vec![
            PlannedOffset {
                table: "user_locations".into(),
                topic: "dwh.user_locations".into(),
                partition: 0,
                current: None,
                new: 7,
                topic_id: None,
                cluster_id: None,
            },
            PlannedOffset {
                table: "user_locations".into(),
                topic: "dwh.user_locations".into(),
                partition: 1,
                current: Some(9),
                new: 3,
                topic_id: None,
                cluster_id: None,
            },
        ];
        let id = dwh
            .execute_replay("g", "ops@host", "--to-offset 3", &plan, &[])
            .await
            .expect("replay");
        let offsets = dwh.topic_offsets("g", "dwh.user_locations").await.expect("offsets");
        assert_eq!((offsets.get(&0), offsets.get(&1)), (Some(&7), Some(&3)), "{db:?}");
        let replays = dwh.replays("g", 5).await.expect("replays");
        assert_eq!(replays.len(), 1, "{db:?}");
        assert_eq!((replays[0].id, replays[0].scenario.as_str()), (id, "--to-offset 3"));
        assert_eq!(replays[0].plan, plan, "{db:?}");
        assert!(dwh.replays("other", 5).await.expect("replays").is_empty());

        let rejects: Vec<RejectedRecord> = (0..3)
            .map(|i| RejectedRecord {
                table: TABLE,
                topic: "dwh.user_locations".into(),
                partition: 0,
                offset: i,
                key: (i > 0).then(|| format!("k{i}").into_bytes()),
                payload: format!("bad {i}").into_bytes(),
                reason: if i == 2 {
                    "field \"latitude\": too far north".into()
                } else {
                    "record is not valid JSON".into()
                },
                class: "invalid_json",
            })
            .collect();
        dwh.write(Batch {
            table: TABLE,
            rows: &[],
            rejects: &rejects,
            offsets: &[],
            origins: None,
            gaps: &[],
            identity: None,
        })
        .await
        .expect("rejects written");
        let all = dwh.rejects(TABLE, &RejectFilter::default()).await.expect("list");
        assert_eq!(all.len(), 3, "{db:?}");
        assert_eq!((all[0].key.clone(), all[1].key.clone()), (None, Some(b"k1".to_vec())));
        assert_eq!(all[2].payload, b"bad 2");
        let north = RejectFilter {
            reason: Some("NORTH".into()),
            ..RejectFilter::default()
        };
        assert_eq!(dwh.rejects(TABLE, &north).await.expect("list").len(), 1, "{db:?}");
        let recent = RejectFilter {
            since: Some(chrono::Utc::now() - chrono::Duration::minutes(5)),
            ..RejectFilter::default()
        };
        assert_eq!(dwh.rejects(TABLE, &recent).await.expect("list").len(), 3, "{db:?}");
        let future = RejectFilter {
            since: Some(chrono::Utc::now() + chrono::Duration::minutes(5)),
            ..RejectFilter::default()
        };
        assert!(dwh.rejects(TABLE, &future).await.expect("list").is_empty(), "{db:?}");
        assert!(dwh
            .rejects(Table::EventsPart, &RejectFilter::default())
            .await
            .expect("list")
            .is_empty());

        assert_eq!(dwh.mark_requeued(&[all[0].id, all[2].id]).await.expect("mark"), 2);
        assert_eq!(dwh.mark_requeued(&[all[0].id]).await.expect("mark"), 0, "marked once");
        let pending = RejectFilter {
            pending_only: true,
            ..RejectFilter::default()
        };
        let left = dwh.rejects(TABLE, &pending).await.expect("list");
        assert_eq!(left.iter().map(|r| r.id).collect::<Vec<_>>(), [all[1].id], "{db:?}");
        let capped = RejectFilter {
            max_id: Some(all[0].id),
            ..RejectFilter::default()
        };
        assert_eq!(dwh.rejects(TABLE, &capped).await.expect("list").len(), 1, "{db:?}");
        assert_eq!(dwh.last_reject_id().await.expect("max"), all[2].id);
        let past = chrono::Utc::now() - chrono::Duration::days(1);
        assert_eq!(dwh.purge_rejects(TABLE, past).await.expect("purge"), 0, "{db:?}");
        let later = chrono::Utc::now() + chrono::Duration::seconds(1);
        assert_eq!(dwh.purge_rejects(TABLE, later).await.expect("purge"), 3, "{db:?}");

        dwh.announce_member("g", &[TABLE, Table::EventsPart], "host:1")
            .await
            .expect("announce");
        dwh.announce_member("g", &[TABLE], "host:1")
            .await
            .expect("announce again");
        let readers = dwh.readers("g", Duration::from_secs(15)).await.expect("readers");
        assert_eq!(readers.len(), 2, "{db:?}: {readers:?}");
        assert!(dwh
            .readers("other", Duration::from_secs(15))
            .await
            .expect("readers")
            .is_empty());
        dwh.leave_member("g", "host:1").await.expect("leave");
        assert!(
            dwh.readers("g", Duration::from_secs(15))
                .await
                .expect("readers")
                .is_empty(),
            "{db:?}"
        );
    }
}

/// Issue 25: each offset row keeps the log (topic id) it counts in, on both
/// backends. A batch started in another log is fenced, even at the right
/// offset; an adoption moves the topic's offsets to the new log and drops the
/// rows of the old one, in the replay's transaction.
#[tokio::test]
async fn offsets_and_rejects_keep_their_log_a_batch_of_another_log_is_fenced_and_an_adoption_drops_the_old_rows() {
    use dwh_helper::store::{Batch, OffsetAdvance, PlannedOffset, RejectedRecord, StoreError, TopicIdentity};
    let log = |id: &str| TopicIdentity {
        topic_id: id.into(),
        cluster_id: Some("cluster-a".into()),
    };
    let (old, new) = (log("OLD-id"), log("NEW-id"));
    let topic = "dwh.user_locations";
    let advance = |partition: i32, from: i64, to: i64| OffsetAdvance {
        group_id: "g".into(),
        topic: topic.into(),
        partition,
        from,
        to,
    };
    let batch = |offsets: &'static [OffsetAdvance], identity: Option<&'static TopicIdentity>| Batch {
        table: TABLE,
        rows: &[],
        rejects: &[],
        offsets,
        origins: None,
        gaps: &[],
        identity,
    };
    let leak = |a: Vec<OffsetAdvance>| -> &'static [OffsetAdvance] { Box::leak(a.into_boxed_slice()) };
    let (old, new): (&'static TopicIdentity, &'static TopicIdentity) =
        (Box::leak(Box::new(old)), Box::leak(Box::new(new)));
    for db in [Db::Postgres, Db::Sqlite] {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        dwh.write(batch(leak(vec![advance(0, 0, 5), advance(1, 0, 8)]), Some(old)))
            .await
            .expect("the first log's batch");
        // A row written without a known log keeps the one it has.
        dwh.write(batch(leak(vec![advance(0, 5, 6)]), None))
            .await
            .expect("no log given");
        assert_eq!(
            dwh.topic_identities("g", topic).await.expect("logs"),
            vec![old.clone()],
            "{db:?}"
        );
        // A batch of another log, at the stored offset: fenced, nothing moves.
        let fenced = dwh
            .write(batch(leak(vec![advance(0, 6, 9)]), Some(new)))
            .await
            .expect_err("another log's batch");
        assert!(matches!(fenced, StoreError::Fenced { .. }), "{db:?}: {fenced}");
        let offsets = dwh.topic_offsets("g", topic).await.expect("offsets");
        assert_eq!((offsets.get(&0), offsets.get(&1)), (Some(&6), Some(&8)), "{db:?}");

        // The adoption: partition 0 of the new log from 0; partition 1 of the
        // old log is not in the new topic, and goes.
        let plan = vec![PlannedOffset {
            table: TABLE.name().into(),
            topic: topic.into(),
            partition: 0,
            current: None,
            new: 0,
            topic_id: Some(new.topic_id.clone()),
            cluster_id: new.cluster_id.clone(),
        }];
        dwh.execute_replay(
            "g",
            "ops@host",
            "--to-earliest --adopt-topic",
            &plan,
            &[(topic.to_owned(), new.clone())],
        )
        .await
        .expect("adopted");
        let offsets = dwh.topic_offsets("g", topic).await.expect("offsets");
        assert_eq!(offsets.into_iter().collect::<Vec<_>>(), vec![(0, 0)], "{db:?}");
        assert_eq!(
            dwh.topic_identities("g", topic).await.expect("logs"),
            vec![new.clone()],
            "{db:?}"
        );
        assert_eq!(dwh.replays("g", 1).await.expect("replays")[0].plan, plan, "{db:?}");
        // The new log's batches land; the old log's are fenced now.
        dwh.write(batch(leak(vec![advance(0, 0, 4)]), Some(new)))
            .await
            .expect("the new log's batch");
        let stale = dwh.write(batch(leak(vec![advance(0, 4, 7)]), Some(old))).await;
        assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{db:?}: {stale:?}");

        // Rejects are kept per log: the new log's bad record at the offset of
        // an old reject is a reject of its own; the same log's, once.
        for (log, payload) in [(old, "old log's"), (new, "new log's"), (new, "new log's, again")] {
            let reject = RejectedRecord {
                table: TABLE,
                topic: topic.into(),
                partition: 0,
                offset: 3,
                key: None,
                payload: payload.as_bytes().to_vec(),
                reason: "record is not valid JSON".into(),
                class: "invalid_json",
            };
            dwh.write(Batch {
                table: TABLE,
                rows: &[],
                rejects: std::slice::from_ref(&reject),
                offsets: &[],
                origins: None,
                gaps: &[],
                identity: Some(log),
            })
            .await
            .expect("a reject written");
        }
        let kept: Vec<(Option<String>, Vec<u8>)> = dwh
            .rejects(TABLE, &dwh_helper::store::RejectFilter::default())
            .await
            .expect("rejects")
            .into_iter()
            .map(|r| (r.topic_id, r.payload))
            .collect();
        assert_eq!(
            kept,
            vec![
                (Some("OLD-id".to_owned()), b"old log's".to_vec()),
                (Some("NEW-id".to_owned()), b"new log's".to_vec())
            ],
            "{db:?}"
        );
    }
}
