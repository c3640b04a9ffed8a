//! What a real Apache Kafka estate brings: records of every codec from a producer
//! that is not ours, SASL over TLS with SCRAM as users configure it, and the
//! failures of credentials, certificates and permissions each ending as a named
//! table state (ready 503 with the kind, a metric) within a bounded time.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use dwh_helper::catalogue::Table;
use sqlx::Connection as _;

const TOKEN: &str = "kafka-test-token-0123456789abcdef0123456789";

/// Publishes `records` with confluent-kafka (PyPI, its own librdkafka), one
/// producer per codec, the records of codec `i` into partition `i`.
fn publish_with_confluent_kafka(bootstrap: &str, topic: &str, codecs: &[&str], records: &[serde_json::Value]) {
    const SCRIPT: &str = r#"
import json, sys
from confluent_kafka import Producer
bootstrap, topic, codecs = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
lines = [l for l in sys.stdin.read().splitlines() if l]
failures = []
def delivered(err, msg):
    if err is not None:
        failures.append(str(err))
for partition, codec in enumerate(codecs):
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                         "linger.ms": 50, "enable.idempotence": True})
    for line in lines[partition::len(codecs)]:
        producer.produce(topic, value=line.encode(), partition=partition, on_delivery=delivered)
    if producer.flush(30) != 0:
        failures.append(f"{codec}: records not delivered")
if failures:
    sys.exit("; ".join(failures[:5]))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT, bootstrap, topic, &codecs.join(",")])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        for record in records {
            writeln!(stdin, "{record}").expect("record written");
        }
    }
    let output = child.wait_with_output().expect("producer ends");
    assert!(
        output.status.success(),
        "confluent-kafka producer failed (scripts/test.sh installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The codecs of the record batches stored in `topic`'s partition, as Kafka's own
/// DumpLogSegments reads them from the broker's log directory.
fn stored_codecs(topic: &str, partition: i32) -> String {
    let segment = std::path::Path::new(&kafka_var("DWH_TEST_KAFKA_DATA"))
        .join(format!("{topic}-{partition}"))
        .join("00000000000000000000.log");
    kafka_java(
        "kafka.tools.DumpLogSegments",
        &["--files", &segment.display().to_string()],
    )
    .to_lowercase()
}

fn with_token(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    set_env(&mut env, "HTTP_API_TOKEN", TOKEN);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_of_every_codec_from_a_third_party_producer_land_once() {
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    let table = Table::EventsPart;
    let (broker, prefix) = broker_with(&[(table, codecs.len() as i32)]).await;
    let url = fresh_pg_url().await;
    let mut env = with_token(ingest_env(&broker, &prefix, &url));
    set_env(&mut env, "KAFKA_INGEST_TABLES", "events_part");
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let topic = topic(&prefix, table);
    let records = events(2_000, 3);
    publish_with_confluent_kafka(broker.bootstrap_servers(), &topic, &codecs, &records);
    // The broker stored each partition's batches compressed as the producer chose
    // (the topic's compression.type is Kafka's default, `producer`).
    for (partition, codec) in codecs.iter().enumerate() {
        let dump = stored_codecs(&topic, partition as i32);
        assert!(
            dump.contains(&format!("compresscodec: {codec}")),
            "partition {partition}: {dump}"
        );
    }

    let child = Child::observed(&env, "ingest");
    let count = || pg_count(&url, "SELECT count(*) FROM events_part");
    wait_for(Duration::from_secs(90), "every record of every codec", || async {
        (count().await == Some(2_000)).then_some(())
    })
    .await;
    caught_up(&config, &url, &prefix, table, Duration::from_secs(30)).await;
    assert_eq!(
        pg_count(&url, "SELECT count(DISTINCT event_hash) FROM events_part").await,
        Some(2_000),
        "no record twice"
    );
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(0)
    );
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(m.sum("dwh_helper_kafka_errors_total", &[]), 0.0);
    assert_eq!(m.sum("dwh_helper_failing", &[("table", "events_part")]), 0.0);
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}

/// The variables of an instance that reaches the broker over SASL_SSL with
/// SCRAM-SHA-512 as the test user, trusting `ca` (a PEM file).
fn sasl_ssl_env(env: &[(String, String)], password: &str, ca: &str) -> Vec<(String, String)> {
    let (user, _) = kafka_user();
    let mut env = env.to_vec();
    for (name, value) in [
        (
            "KAFKA_BOOTSTRAP_SERVERS",
            kafka_var("DWH_TEST_KAFKA_SSL_BOOTSTRAP").as_str(),
        ),
        ("KAFKA_LIBRDKAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_LIBRDKAFKA_SASL_MECHANISMS", "SCRAM-SHA-512"),
        ("KAFKA_LIBRDKAFKA_SASL_USERNAME", &user),
        ("KAFKA_LIBRDKAFKA_SASL_PASSWORD", password),
        ("KAFKA_LIBRDKAFKA_SSL_CA_LOCATION", ca),
    ] {
        set_env(&mut env, name, value);
    }
    env
}

/// Read on the test's topics and groups (its ingest and archive groups share
/// its prefix) for the test user.
fn grant_reading(prefix: &str) {
    acl(true, "Read", "topic", prefix);
    acl(true, "Describe", "topic", prefix);
    acl(true, "Read", "group", prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_on_sasl_ssl_with_scram_ingests_and_archives() {
    let table = Table::UserLocations;
    let (broker, prefix) = broker_with(&[(table, 2)]).await;
    grant_reading(&prefix);
    let url = fresh_pg_url().await;
    let (s3, _) = s3_bucket(&[]).await;
    let mut env = with_token(ingest_env(&broker, &prefix, &url));
    set_env(&mut env, "KAFKA_INGEST_TABLES", "user_locations");
    set_env(&mut env, "KAFKA_ARCHIVE_TABLES", "user_locations");
    set_env(&mut env, "S3_ARCHIVE_INTERVAL_SECONDS", "1");
    for (name, value) in s3_env(&s3_endpoint()) {
        set_env(&mut env, &name, &value);
    }
    set_env(&mut env, "S3_BUCKET_NAME", s3.bucket());
    let config = config_from(&env, &[]);
    migrated(&config).await;
    // Published through the PLAINTEXT listener; read over SASL_SSL only.
    publish(&config, &topic(&prefix, table), &keyed(table, locations(300))).await;
    let secure = sasl_ssl_env(&env, &kafka_user().1, &kafka_var("DWH_TEST_KAFKA_CA"));
    let child = Child::observed(&secure, "ingest,archive");
    wait_for(
        Duration::from_secs(90),
        "rows and archived objects over SASL_SSL",
        || async {
            let rows = pg_count(&url, "SELECT count(*) FROM user_locations").await?;
            let objects = s3.list_all("archive/user_locations/").await.ok()?;
            (rows == 300 && !objects.is_empty()).then_some(())
        },
    )
    .await;
    caught_up(&config, &url, &prefix, table, Duration::from_secs(30)).await;
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(m.sum("dwh_helper_kafka_errors_total", &[]), 0.0);
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}

/// Starts `env`'s ingest and waits (at most 60 s) for the table to fail with
/// `kind`: the errors counter, the failing gauge and readiness all say so.
async fn fails_with(env: &[(String, String)], table: Table, kind: &str) -> Child {
    let child = Child::observed(env, "ingest");
    wait_for(
        Duration::from_secs(60),
        &format!("{table} to fail with kafka {kind}"),
        || async {
            let m = child.scrape().await?;
            let errors = m.sum(
                "dwh_helper_kafka_errors_total",
                &[("table", table.name()), ("kind", kind)],
            );
            let failing = m.sum("dwh_helper_failing", &[("table", table.name())]);
            let (code, body) = child.ready().await?;
            (errors > 0.0 && failing == 1.0 && code == 503).then_some(body)
        },
    )
    .await;
    let (_, body) = child.ready().await.expect("readiness answers");
    assert!(body.contains(&format!("(kafka {kind})")), "{body}");
    assert!(body.contains(&topic_of(env, table)), "{body}");
    child
}

fn topic_of(env: &[(String, String)], table: Table) -> String {
    let prefix = env
        .iter()
        .find(|(k, _)| k == "KAFKA_TOPIC_PREFIX")
        .map(|(_, v)| v.clone())
        .expect("a prefix");
    topic(&prefix, table)
}

/// A broker topic of user_locations under a prefix of its own, a migrated
/// database, and an ingest of that table only (with an API token, to be
/// observed).
async fn user_locations_only() -> (
    TestBroker,
    String,
    String,
    Vec<(String, String)>,
    dwh_helper::config::Config,
) {
    let (broker, prefix) = broker_with(&[(Table::UserLocations, 1)]).await;
    let url = fresh_pg_url().await;
    let mut env = with_token(ingest_env(&broker, &prefix, &url));
    set_env(&mut env, "KAFKA_INGEST_TABLES", "user_locations");
    let config = config_from(&env, &[]);
    migrated(&config).await;
    (broker, prefix, url, env, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_an_unknown_ca_and_a_missing_acl_each_fail_the_table_by_name() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, env, config) = user_locations_only().await;
    publish(&config, &topic(&prefix, table), &keyed(table, locations(50))).await;
    let ca = kafka_var("DWH_TEST_KAFKA_CA");

    // Credentials the broker refuses.
    let wrong = sasl_ssl_env(&env, "not-the-password", &ca);
    drop(fails_with(&wrong, table, "authentication").await);

    // A broker certificate signed by a CA the client does not trust: its own
    // system store, not the test CA.
    let mut untrusted = sasl_ssl_env(&env, &kafka_user().1, &ca);
    untrusted.retain(|(k, _)| k != "KAFKA_LIBRDKAFKA_SSL_CA_LOCATION");
    drop(fails_with(&untrusted, table, "tls").await);

    // Right credentials, no permission on the topic: then the permission is
    // granted, and the table recovers by itself and ingests everything.
    let secure = sasl_ssl_env(&env, &kafka_user().1, &ca);
    acl(true, "Read", "group", &prefix);
    let child = fails_with(&secure, table, "authorization").await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(0));
    acl(true, "Read", "topic", &prefix);
    acl(true, "Describe", "topic", &prefix);
    wait_for(Duration::from_secs(90), "the table to recover once granted", || async {
        let rows = pg_count(&url, "SELECT count(*) FROM user_locations").await?;
        let (code, _) = child.ready().await?;
        let failing = child
            .scrape()
            .await?
            .sum("dwh_helper_failing", &[("table", table.name())]);
        (rows == 50 && code == 200 && failing == 0.0).then_some(())
    })
    .await;

    // The group permission taken away: the next join is refused, by name.
    acl(false, "Read", "group", &prefix);
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
    drop(fails_with(&secure, table, "authorization").await);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(50));
}

/// Issue 24: Read taken away from the ingest's user on a busy topic, while it
/// runs (an ACL removed, a service account changed). The table fails by name at
/// once (readiness 503, the failing gauge, the authorization count), nothing
/// lands meanwhile; Read given back, it resumes by itself and every record
/// lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_taken_away_while_running_fails_the_table_and_every_record_lands_once_when_given_back() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, env, config) = user_locations_only().await;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(300));
    publish(&config, &topic, &records[..100]).await;
    grant_reading(&prefix);
    let secure = sasl_ssl_env(&env, &kafka_user().1, &kafka_var("DWH_TEST_KAFKA_CA"));
    let child = Child::observed(&secure, "ingest");
    wait_for(Duration::from_secs(60), "the first records to land", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 100).then_some(())
    })
    .await;

    // Read taken away; the producer goes on.
    acl(false, "Read", "topic", &prefix);
    publish(&config, &topic, &records[100..200]).await;
    let taken = std::time::Instant::now();
    let body = wait_for(Duration::from_secs(60), "the table to fail by name", || async {
        let m = child.scrape().await?;
        let denied = m.sum(
            "dwh_helper_kafka_errors_total",
            &[("table", table.name()), ("kind", "authorization")],
        );
        let failing = m.sum("dwh_helper_failing", &[("table", table.name())]);
        let (code, body) = child.ready().await?;
        (denied > 0.0 && failing == 1.0 && code == 503).then_some(body)
    })
    .await;
    assert!(
        taken.elapsed() < Duration::from_secs(30),
        "failed within 30 s: {:?}",
        taken.elapsed()
    );
    assert!(body.contains(&format!("{topic} (kafka authorization)")), "{body}");
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM user_locations").await,
        Some(100),
        "nothing is read without Read"
    );

    // Given back: it resumes by itself, and every record lands once.
    acl(true, "Read", "topic", &prefix);
    publish(&config, &topic, &records[200..]).await;
    recovered_once(child, &url, table, 300, "every record once Read is back").await;
}

/// Waits (at most 90 s) until `expected` rows of `table` (user_locations) are
/// in the DWH, the child is ready and the table not failing; then checks that
/// each was written once (inserted, none skipped) and stops the child.
async fn recovered_once(child: Child, url: &str, table: Table, expected: i64, what: &str) {
    wait_for(Duration::from_secs(90), what, || async {
        let rows = pg_count(url, "SELECT count(*) FROM user_locations").await?;
        let (code, _) = child.ready().await?;
        let failing = child.table_metric("dwh_helper_failing", table).await?;
        (rows == expected && code == 200 && failing == 0.0).then_some(())
    })
    .await;
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(
        m.sum("dwh_helper_rows_inserted_total", &[("table", table.name())]),
        expected as f64,
        "each record written once"
    );
    assert_eq!(m.sum("dwh_helper_rows_skipped_total", &[("table", table.name())]), 0.0);
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_while_read_fails_the_table_by_name_and_its_return_is_checked_against_the_dwh() {
    let table = Table::UserLocations;
    let (broker, prefix) = broker_with(&[(table, 1)]).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "KAFKA_INGEST_TABLES", "user_locations");
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let topic = topic(&prefix, table);
    publish(&config, &topic, &keyed(table, locations(50))).await;
    let child = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(60), "the records to land", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 50).then_some(())
    })
    .await;

    delete_topics(&config, std::slice::from_ref(&topic)).await;
    // The fault: the broker no longer knows the topic.
    assert!(
        watermarks(&config, &topic).await.is_empty(),
        "{topic} is still on the broker"
    );
    let body = wait_for(Duration::from_secs(60), "the table to fail by name", || async {
        let m = child.scrape().await?;
        let deleted = m.sum(
            "dwh_helper_kafka_errors_total",
            &[("table", table.name()), ("kind", "topic deleted")],
        );
        let failing = m.sum("dwh_helper_failing", &[("table", table.name())]);
        let (code, body) = child.ready().await?;
        (deleted > 0.0 && failing == 1.0 && code == 503).then_some(body)
    })
    .await;
    assert!(body.contains(&format!("{topic} (kafka topic deleted)")), "{body}");

    // Created again, empty: the DWH's offset (50) lies above the new log's end,
    // and the table stops on that, by name, instead of reading from there.
    create_topics(&kafka_bootstrap(), &prefix, &[(table, 1)]).await;
    let body = wait_for(Duration::from_secs(60), "the table to stop on the new log", || async {
        let (code, body) = child.ready().await?;
        (code == 503 && body.contains(&format!("{topic} (stopped)")) && !body.contains("topic deleted")).then_some(body)
    })
    .await;
    assert!(!body.contains("(kafka topic deleted)"), "{body}");
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(50));
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mechanism_this_build_lacks_stops_the_start_naming_it() {
    let (broker, prefix) = broker_with(&[]).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "KAFKA_LIBRDKAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT");
    set_env(&mut env, "KAFKA_LIBRDKAFKA_SASL_MECHANISMS", "GSSAPI");
    let mut child = Child::ingest(&env);
    let status = child.wait_exit(Duration::from_secs(30)).expect("the start stops");
    assert!(!status.success());
    let log = child.log_text();
    assert!(
        log.contains("lacks sasl_gssapi (needed by sasl.mechanisms=GSSAPI)"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_debug_contexts_are_printed_at_the_default_log_level() {
    let table = Table::UserLocations;
    let (broker, prefix) = broker_with(&[(table, 1)]).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "KAFKA_INGEST_TABLES", "user_locations");
    set_env(&mut env, "KAFKA_LIBRDKAFKA_DEBUG", "broker");
    set_env(&mut env, "LOG_FORMAT", "json");
    migrated(&config_from(&env, &[])).await;
    let child = Child::ingest(&env);
    // librdkafka's broker context names the broker state machine's moves.
    wait_for(Duration::from_secs(30), "librdkafka's debug lines", || async {
        let lines = child.events("librdkafka_log");
        lines
            .iter()
            .any(|e| e["facility"] == "STATE" && e["level"] == "DEBUG")
            .then_some(())
    })
    .await;
    // Only the tables asked for are warned about: six topics do not exist here.
    assert!(child.events("topic_missing").is_empty(), "{}", child.log_text());
}

/// The record batches of a partition's first log segment, as (position of the
/// batch in the file, base offset), read from the broker's log directory.
fn stored_batches(segment: &std::path::Path) -> Vec<(usize, i64)> {
    let bytes = std::fs::read(segment).expect("the segment");
    let mut batches = Vec::new();
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if length <= 0 {
            break;
        }
        batches.push((at, base));
        at += 12 + length as usize;
    }
    batches
}

/// Sets the compression codec of the stored batch at `at` (the low three bits
/// of its attributes, byte 22 of a v2 batch) and returns the byte it replaced.
fn set_stored_codec(segment: &std::path::Path, at: usize, byte: impl FnOnce(u8) -> u8) -> u8 {
    use std::io::{Read as _, Seek as _, Write as _};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment)
        .expect("the segment, writable");
    let mut old = [0u8; 1];
    file.seek(std::io::SeekFrom::Start(at as u64 + 22)).expect("seek");
    file.read_exact(&mut old).expect("read");
    file.seek(std::io::SeekFrom::Start(at as u64 + 22)).expect("seek");
    file.write_all(&[byte(old[0])]).expect("write");
    file.sync_all().expect("sync");
    old[0]
}

/// A record batch no client can decompress (its codec bits set, on the broker's
/// disk, to a codec that does not exist): the table fails by name, kind
/// `unreadable records`, with the records before it landed and none after;
/// once the batch is readable again, the table resumes by itself and every
/// record lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_no_client_can_decompress_fails_the_table_and_every_record_lands_once_when_readable() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, env, config) = user_locations_only().await;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(90));
    for part in records.chunks(30) {
        publish(&config, &topic, part).await;
    }
    let segment = std::path::Path::new(&kafka_var("DWH_TEST_KAFKA_DATA"))
        .join(format!("{topic}-0"))
        .join("00000000000000000000.log");
    let batches = stored_batches(&segment);
    let &(at, _) = batches
        .iter()
        .find(|(_, base)| *base == 30)
        .unwrap_or_else(|| panic!("a stored batch starting at offset 30: {batches:?}"));
    let original = set_stored_codec(&segment, at, |b| (b & 0xf8) | 5);
    // The fault: Kafka's own reader of the log cannot read it either.
    let dump = kafka_java_output(
        "kafka.tools.DumpLogSegments",
        &["--files", &segment.display().to_string()],
    );
    let refused = String::from_utf8_lossy(&dump.stderr);
    assert!(
        !dump.status.success() && refused.contains("Unknown compression type id: 5"),
        "{refused}"
    );

    let child = fails_with(&env, table, "unreadable records").await;
    // The records before the batch land, none from it or after it.
    wait_for(Duration::from_secs(30), "the records before the batch", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 30).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(30));
    let (code, body) = child.ready().await.expect("readiness answers");
    assert_eq!(code, 503, "still failing while the batch is unreadable: {body}");
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(0)
    );

    // Readable again: the table resumes by itself; every record lands once.
    set_stored_codec(&segment, at, |_| original);
    recovered_once(child, &url, table, 90, "every record once the batch is readable").await;
}

/// A partition added to a topic the DWH knows is read from its first record,
/// even under `KAFKA_AUTO_OFFSET_RESET=latest`: the records produced to it
/// before the consumer first sees it (its metadata is refreshed every 10 s)
/// all land, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_added_to_a_known_topic_is_read_from_its_first_record_under_latest() {
    let table = Table::UserLocations;
    let (broker, prefix) = broker_with(&[(table, 1)]).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "KAFKA_INGEST_TABLES", "user_locations");
    set_env(&mut env, "KAFKA_AUTO_OFFSET_RESET", "latest");
    let config = config_from(&env, &[]);
    let dwh = migrated(&config).await;
    count_writes(&url).await;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(200));
    let ingest = InProcessIngest::start(config.clone(), dwh.clone());
    // A topic the DWH never read starts at its end: the records come after.
    wait_for(Duration::from_secs(30), "the partition to be assigned", || async {
        (ingest.status.counters().rebalances >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publish(&config, &topic, &records[..50]).await;
    wait_for(Duration::from_secs(30), "the first records", || async {
        (dwh.count_rows("user_locations").await.ok()? == 50).then_some(())
    })
    .await;

    add_partitions(&config, &topic, 2).await;
    wait_for(Duration::from_secs(30), "the new partition to be led", || async {
        (watermarks(&config, &topic).await.len() == 2).then_some(())
    })
    .await;
    publish(&config, &topic, &records[50..]).await;
    // The new partition holds records the consumer has not seen yet.
    let new = watermarks(&config, &topic)
        .await
        .into_iter()
        .find(|w| w.partition == 1)
        .map_or(0, |w| w.high);
    assert!(new > 0, "records went to the new partition");
    wait_for(Duration::from_secs(60), "every record of both partitions", || async {
        (dwh.count_rows("user_locations").await.ok()? == 200).then_some(())
    })
    .await;
    assert_written_once(&url, 200).await;
    assert_eq!(
        stored_offsets(&url, &group(&prefix), &topic).await,
        vec![(0, 200 - new), (1, new)],
        "both partitions stored at their ends"
    );
    ingest.stop().await;
}

/// Records that expire before they are written: restarted as the stop message
/// says (`KAFKA_ON_OFFSET_OUT_OF_RANGE=earliest`), the ingest goes on from the
/// first record held, and the loss is counted by cause, kept in
/// `dwh_offset_gaps` with the gap's offsets, and shown by `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_lost_to_retention_are_counted_kept_in_the_dwh_and_shown_by_status() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, mut env, config) = user_locations_only().await;
    set_env(&mut env, "LOG_FORMAT", "json");
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(50));
    publish(&config, &topic, &records[..20]).await;
    let child = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(60), "the first records", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 20).then_some(())
    })
    .await;
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());

    // The fault: while no ingest runs, records 20..35 expire unread.
    publish(&config, &topic, &records[20..]).await;
    assert_eq!(expire_records(&config, &topic, 0, 35).await, 35);
    let marks = watermarks(&config, &topic).await;
    assert_eq!((marks[0].low, marks[0].high), (35, 50), "{marks:?}");

    set_env(&mut env, "KAFKA_ON_OFFSET_OUT_OF_RANGE", "earliest");
    let child = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(60), "the records still held", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 35).then_some(())
    })
    .await;
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(
        m.sum(
            "dwh_helper_records_lost_total",
            &[("table", table.name()), ("cause", "retention")]
        ),
        15.0
    );
    assert_eq!(m.sum("dwh_helper_records_lost_total", &[("cause", "skipped")]), 0.0);
    let gaps = child.events("offset_gap");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(
        (gaps[0]["from"].as_i64(), gaps[0]["to"].as_i64()),
        (Some(20), Some(35)),
        "{gaps:?}"
    );
    // On record next to the data.
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let kept: Vec<(String, String, i32, i64, i64, i64, String)> = sqlx::query_as(
        "SELECT group_id, topic, partition, from_offset, to_offset, records, cause FROM dwh_offset_gaps",
    )
    .fetch_all(&mut conn)
    .await
    .expect("gaps");
    assert_eq!(
        kept,
        vec![(group(&prefix), topic.clone(), 0, 20, 35, 15, "retention".to_owned())]
    );
    let status = run_cli(&env, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("gap: user_locations partition 0: records 20..35 (15) never written: lost to retention"),
        "{text}"
    );
    assert_eq!(status.status.code(), Some(0), "caught up: {text}");
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());
}

/// Two deployments on one DWH (two consumer groups reading the same topics)
/// are seen: the second warns at its start, naming the first group and the
/// table; the first warns once the second appears; `status` shows the other
/// group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_group_ingesting_the_same_tables_is_warned_about_at_start_and_in_status() {
    let (_broker, prefix, _url, mut env, _config) = user_locations_only().await;
    set_env(&mut env, "LOG_FORMAT", "json");
    let first_group = group(&prefix);
    let second_group = format!("{first_group}-second");
    let first = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(30), "the first deployment to start", || async {
        (first.ready().await?.0 == 200).then_some(())
    })
    .await;
    let mut second_env = env.clone();
    set_env(&mut second_env, "KAFKA_GROUP_ID", &second_group);
    let second = Child::observed(&second_env, "ingest");
    let warned = |child: &Child, other: &str| {
        child
            .events("other_groups")
            .into_iter()
            .find(|e| e["level"] == "WARN" && e["others"] == format!("{other} (user_locations)"))
    };
    let at_start = wait_for(Duration::from_secs(30), "the second to warn at its start", || async {
        warned(&second, &first_group)
    })
    .await;
    assert_eq!(at_start["group"], second_group.as_str(), "{at_start}");
    wait_for(Duration::from_secs(30), "the first to warn of the second", || async {
        warned(&first, &second_group)
    })
    .await;
    let status = run_cli(&env, &["status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("a JSON report");
    assert_eq!(
        report["other_groups"],
        serde_json::json!([{"group": second_group, "tables": ["user_locations"], "members": report["other_groups"][0]["members"]}]),
        "{report}"
    );
    assert_eq!(report["other_groups"][0]["members"].as_array().map(Vec::len), Some(1));
    let text = run_cli(&env, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "WARNING: group {second_group} also ingests into this DWH (user_locations; 1 instance(s))"
        )),
        "{text}"
    );
    assert!(second.terminate(Duration::from_secs(30)).expect("stops").success());
    assert!(first.terminate(Duration::from_secs(30)).expect("stops").success());
}

/// The topic id of `topic`, as Kafka's own `kafka-topics --describe` prints it.
fn topic_id_on_broker(topic: &str) -> String {
    let described = kafka_tool("org.apache.kafka.tools.TopicCommand", &["--describe", "--topic", topic]);
    described
        .split_whitespace()
        .skip_while(|word| *word != "TopicId:")
        .nth(1)
        .unwrap_or_else(|| panic!("a TopicId in {described}"))
        .to_owned()
}

/// Runs `dwh-helper` with `args` in `env`, to its end.
fn run_cli(env: &[(String, String)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .output()
        .expect("dwh-helper runs")
}

/// Issue 25's first case: a topic deleted and created again, with more
/// records than the DWH's stored offset. Before, the old offset (inside the new
/// log's range) was read from, and the new log's first records were skipped in
/// silence. Now the start stops the table, naming both topic ids and the
/// command; the adoption (`replay --adopt-topic`, audited) reads the new topic
/// from its beginning, and every new record lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_created_again_with_more_records_stops_the_table_until_adopted_and_then_every_record_lands() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, mut env, config) = user_locations_only().await;
    set_env(&mut env, "LOG_FORMAT", "json");
    count_writes(&url).await;
    let topic = topic(&prefix, table);
    let records = keyed(table, locations(100));
    publish(&config, &topic, &records[..40]).await;
    let old_id = topic_id_on_broker(&topic);
    let child = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(60), "the first log's records", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 40).then_some(())
    })
    .await;
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let kept = "SELECT partition, next_offset, topic_id FROM dwh_consumer_offsets WHERE topic = $1";
    let rows: Vec<(i32, i64, Option<String>)> = sqlx::query_as(kept)
        .bind(&topic)
        .fetch_all(&mut conn)
        .await
        .expect("offsets");
    assert_eq!(
        rows,
        vec![(0, 40, Some(old_id.clone()))],
        "the offset keeps its topic's id"
    );

    // The fault: the topic is deleted and created again under the same name,
    // and holds more records than the stored offset.
    delete_topics(&config, std::slice::from_ref(&topic)).await;
    wait_for(Duration::from_secs(30), "the topic to be gone", || async {
        watermarks(&config, &topic).await.is_empty().then_some(())
    })
    .await;
    create_topics(&kafka_bootstrap(), &prefix, &[(table, 1)]).await;
    publish(&config, &topic, &records[40..]).await;
    let new_id = topic_id_on_broker(&topic);
    assert_ne!(new_id, old_id);
    let marks = watermarks(&config, &topic).await;
    assert_eq!(
        (marks[0].low, marks[0].high),
        (0, 60),
        "the old offset 40 lies inside the new log"
    );

    let child = Child::observed(&env, "ingest");
    let body = wait_for(Duration::from_secs(60), "the table to stop on the new log", || async {
        let (code, body) = child.ready().await?;
        let stopped = child.table_metric("dwh_helper_table_stopped", table).await?;
        (code == 503 && stopped == 1.0 && body.contains(&format!("{topic} (stopped)"))).then_some(body)
    })
    .await;
    let stops = child.events("table_stopped");
    let reason = stops
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .find(|r| r.contains("the DWH's offsets count"))
        .unwrap_or_else(|| panic!("a stop naming both logs: {stops:?} ({body})"))
        .to_owned();
    assert!(
        reason.contains(&format!("topic id {old_id}"))
            && reason.contains(&format!("the broker's topic is topic id {new_id}"))
            && reason.contains("dwh-helper replay --table user_locations --adopt-topic --to-earliest --execute"),
        "{reason}"
    );
    // Nothing of the new log is read from the old offset.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(40));
    assert_eq!(stored_offsets(&url, &group(&prefix), &topic).await, vec![(0, 40)]);
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());
    // status reads the same from the sources of truth.
    let status = run_cli(&env, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "user_locations partition 0: stored offset 40 counts in topic id {old_id}, but the broker's topic is \
             topic id {new_id}"
        )),
        "{text}"
    );

    // A plain replay is refused: its offsets would count in the wrong log.
    let refused = run_cli(
        &env,
        &["replay", "--table", "user_locations", "--to-earliest", "--execute"],
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("add --adopt-topic"),
        "{said}"
    );
    // The adoption: planned, then executed and audited.
    let plan = run_cli(
        &env,
        &["replay", "--table", "user_locations", "--adopt-topic", "--to-earliest"],
    );
    let shown = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{shown} {}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        shown.contains(&format!("{topic}: the offsets move to topic id {new_id}")) && shown.contains("nothing changed"),
        "{shown}"
    );
    assert_eq!(
        stored_offsets(&url, &group(&prefix), &topic).await,
        vec![(0, 40)],
        "a plan changes nothing"
    );
    let done = run_cli(
        &env,
        &[
            "replay",
            "--table",
            "user_locations",
            "--adopt-topic",
            "--to-earliest",
            "--execute",
        ],
    );
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let rows: Vec<(i32, i64, Option<String>)> = sqlx::query_as(kept)
        .bind(&topic)
        .fetch_all(&mut conn)
        .await
        .expect("offsets");
    assert_eq!(rows, vec![(0, 0, Some(new_id.clone()))]);
    let audited: String = sqlx::query_scalar("SELECT scenario FROM dwh_replays ORDER BY id DESC LIMIT 1")
        .fetch_one(&mut conn)
        .await
        .expect("the replay recorded");
    assert!(
        audited.starts_with("--to-earliest --adopt-topic") && audited.contains(&new_id),
        "{audited}"
    );

    // Started again: every record of the new log lands, once.
    let child = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(60), "every record of the new log", || async {
        let rows = pg_count(&url, "SELECT count(*) FROM user_locations").await?;
        let (code, _) = child.ready().await?;
        (rows == 100 && code == 200).then_some(())
    })
    .await;
    assert_written_once(&url, 100).await;
    assert_eq!(stored_offsets(&url, &group(&prefix), &topic).await, vec![(0, 60)]);
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());
}

/// An assignment the table's task cannot answer in time (here: the DWH's
/// offsets table locked, so the start offsets cannot be read) is assigned
/// paused, and started once the task answers. For a fresh group, with no
/// Kafka committed offset, that pause must not end in a fetch out of range
/// (`auto.offset.reset` is `error`) that rebuilds the consumer again and again:
/// the partition waits, is counted as deferred, and every record lands once
/// the lock goes, with no consumer restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deferred_assignment_of_a_fresh_group_waits_for_its_start_without_restarting_the_consumer() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, env, config) = user_locations_only().await;
    count_writes(&url).await;
    let topic = topic(&prefix, table);
    publish(&config, &topic, &keyed(table, locations(60))).await;
    let mut lock = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE dwh_consumer_offsets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .expect("lock");
    let child = Child::observed(&env, "ingest");
    // The fault: the assignment waits past its 5 s and is deferred.
    wait_for(Duration::from_secs(60), "the assignment to be deferred", || async {
        (child
            .table_metric("dwh_helper_assignments_deferred_total", table)
            .await?
            >= 1.0)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(
        m.sum("dwh_helper_consumer_restarts_total", &[("table", table.name())]),
        0.0,
        "the deferred partition did not fall out of range"
    );
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(0));

    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.expect("unlock");
    wait_for(Duration::from_secs(60), "every record", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 60).then_some(())
    })
    .await;
    assert_written_once(&url, 60).await;
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(
        m.sum("dwh_helper_consumer_restarts_total", &[("table", table.name())]),
        0.0
    );
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());
}

/// Parses `body` with the Python Prometheus client's two parsers: the
/// Prometheus text format's and the OpenMetrics one's (strict: `# EOF`,
/// counter samples with `_total`). Returns how many metric families each read,
/// or the parser's complaint.
fn parsed_by_both(body: &str) -> Result<(usize, usize), String> {
    use std::io::Write as _;
    let script = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families as text\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as om\n\
        body = sys.stdin.read()\n\
        print(len(list(text(body))), len(list(om(body))))\n";
    let mut python = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test.sh installs prometheus-client)");
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("written");
    let out = python.wait_with_output().expect("python3 ends");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let counts = String::from_utf8_lossy(&out.stdout);
    let mut counts = counts.split_whitespace().map(|n| n.parse::<usize>().expect("a count"));
    Ok((counts.next().expect("text's"), counts.next().expect("OpenMetrics'")))
}

/// Issue 26: an ingest-only instance had no HTTP at all, and where the API
/// ran with a token its probes and `/metrics` needed the token too. The
/// operations listener serves the probes and the metrics without a token, and
/// nothing else; `/metrics` says it is OpenMetrics, and both the Prometheus
/// text parser and the OpenMetrics parser read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_listener_serves_probes_and_metrics_without_the_token_and_nothing_else() {
    let table = Table::UserLocations;
    let (_broker, prefix, url, mut env, config) = user_locations_only().await;
    let port = free_port();
    set_env(&mut env, "HTTP_OPS_BIND", &format!("127.0.0.1:{port}"));
    publish(&config, &topic(&prefix, table), &keyed(table, locations(30))).await;
    // Ingest only: no API listener; the token is set, as in production.
    let child = Child::run(&env, "ingest");
    wait_for(Duration::from_secs(60), "the records to land", || async {
        (pg_count(&url, "SELECT count(*) FROM user_locations").await? == 30).then_some(())
    })
    .await;
    let ops = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{ops}{path}")).send();
    assert_eq!(get("/health/live").await.expect("live").status(), 200);
    let ready = wait_for(Duration::from_secs(30), "readiness", || async {
        let response = get("/health/ready").await.ok()?;
        (response.status() == 200).then_some(response)
    })
    .await;
    assert_eq!(ready.status(), 200);
    let metrics = get("/metrics").await.expect("metrics");
    assert_eq!(metrics.status(), 200);
    assert_eq!(
        metrics.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let body = metrics.text().await.expect("a body");
    assert!(
        body.contains("dwh_helper_rows_inserted_total{table=\"user_locations\"} 30"),
        "{body}"
    );
    let (text, openmetrics) = parsed_by_both(&body).unwrap_or_else(|e| panic!("a parser refused /metrics: {e}"));
    assert!(
        text >= 20 && openmetrics >= 20,
        "families read: {text} and {openmetrics}"
    );
    // Nothing else is served there, with or without the token.
    let (_, token) = env
        .iter()
        .find(|(k, _)| k == "HTTP_API_TOKEN")
        .cloned()
        .expect("a token");
    for path in ["/status", "/dwh/user_locations", "/openapi.json", "/s3/list"] {
        let response = client
            .get(format!("{ops}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 404, "{path}");
    }
    assert!(child.terminate(Duration::from_secs(30)).expect("stops").success());
}
