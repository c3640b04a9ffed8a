//! What a real Apache Kafka estate brings: records of every codec from a producer
//! that is not ours, SASL over TLS with SCRAM as users configure it, and the
//! failures of credentials, certificates and permissions each ending as a named
//! table state (ready 503 with the kind, a metric) within a bounded time.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use dwh_helper::catalogue::Table;

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
    wait_for(Duration::from_secs(90), "every record once Read is back", || async {
        let rows = pg_count(&url, "SELECT count(*) FROM user_locations").await?;
        let (code, _) = child.ready().await?;
        let failing = child.table_metric("dwh_helper_failing", table).await?;
        (rows == 300 && code == 200 && failing == 0.0).then_some(())
    })
    .await;
    let m = child.scrape().await.expect("a scrape");
    assert_eq!(
        m.sum("dwh_helper_rows_inserted_total", &[("table", table.name())]),
        300.0,
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
