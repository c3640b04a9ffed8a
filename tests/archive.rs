//! The archive role against the dev broker, a real PostgreSQL and a real
//! S3-protocol server: every offset archived exactly once through crashes and a
//! store outage, and a table restored from the archive.

mod common;

use std::time::Duration;

use common::otlp;
use common::*;
use dwh_helper::catalogue::Table;
use dwh_helper::config::Config;
use dwh_helper::sample;

const TABLE: Table = Table::UserLocations;

/// `archive verify --json` for the table, as ops run it.
fn verify(env: &[(String, String)]) -> (bool, serde_json::Value) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
        .args(["archive", "verify", "--table", TABLE.name(), "--json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .output()
        .expect("verify runs");
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("verify prints JSON: {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.success(), report)
}

/// Waits until the archive covers every partition from 0 to its end offset.
async fn archive_complete(
    env: &[(String, String)],
    config: &Config,
    topic: &str,
    limit: Duration,
) -> serde_json::Value {
    let ends: Vec<(i64, i64)> = watermarks(config, topic)
        .await
        .iter()
        .map(|w| (w.partition as i64, w.high))
        .filter(|(_, high)| *high > 0)
        .collect();
    // The last verify report, shown if the wait times out (a gap or an overlap
    // reads differently from an archive that is only slow).
    let last = std::sync::Mutex::new(serde_json::Value::Null);
    let last = &last;
    let waited = std::panic::AssertUnwindSafe(wait_for(limit, "the archive to cover every offset", || async {
        let (ok, report) = tokio::task::spawn_blocking({
            let env = env.to_vec();
            move || verify(&env)
        })
        .await
        .expect("verify");
        *last.lock().unwrap() = report.clone();
        let covered: Vec<(i64, i64)> = report["partitions"]
            .as_array()?
            .iter()
            .filter(|p| p["topic"] == topic)
            .map(|p| {
                (
                    p["partition"].as_i64().unwrap_or(-1),
                    p["end_offset"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        (ok && covered == ends).then_some(report)
    }));
    match futures_util::FutureExt::catch_unwind(waited).await {
        Ok(report) => report,
        Err(_) => panic!(
            "the archive does not cover 0..{ends:?} of {topic}; last verify report: {}",
            last.lock().unwrap()
        ),
    }
}

fn env_for(broker: &TestBroker, prefix: &str, url: &str, s3_endpoint: &str, bucket: &str) -> Vec<(String, String)> {
    let mut env = ingest_env(broker, prefix, url);
    let mut s3 = s3_env(s3_endpoint);
    s3.retain(|(k, _)| k != "S3_BUCKET_NAME");
    env.extend(s3);
    env.extend(
        [
            ("S3_BUCKET_NAME", bucket),
            ("S3_ARCHIVE_MAX_BYTES", "256KiB"),
            ("S3_ARCHIVE_INTERVAL_SECONDS", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    env
}

async fn table_digest(url: &str) -> Option<i64> {
    // A sum of per-row hashes: equal for equal sets of rows, whatever their order.
    pg_count(
        url,
        "SELECT coalesce(sum(('x' || substr(md5(uuid::text || '|' || event_time::text || '|' || latitude::text \
         || '|' || longitude::text || '|' || coalesce(city, '')), 1, 8))::bit(32)::bigint), 0)::bigint \
         FROM user_locations",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_offset_is_archived_once_through_crashes_and_a_wiped_table_is_restored() {
    let (broker, prefix) = broker(16).await;
    let topic = format!("{prefix}{}", TABLE.name());
    let url = fresh_pg_url().await;
    let (s3, _) = s3_bucket(&[]).await;
    // Dynamic membership: a killed member leaves the group when its 6 s session
    // expires. With static membership (KAFKA_GROUP_INSTANCE_ID) the mock cluster
    // has left a restarted member with an empty assignment and never rebalanced
    // again (seen twice in 4 runs: partitions 8-13 never archived in 240 s).
    let env = env_for(&broker, &prefix, &url, &s3_endpoint(), s3.bucket());
    let config = config_from(&env, &[]);
    let records = keyed(TABLE, sample::records(TABLE, 100_000, 11));
    publish(&config, &topic, &records).await;

    let ingest = Child::run(&env, "ingest");
    let mut archive = Child::run(&env, "archive");
    let objects_at = || async { s3.list_all("archive/user_locations/").await.expect("listing").len() };
    let mut at_kills = Vec::new();
    for pause_ms in [300u64, 1_100, 700] {
        // Killed mid-way: after it stored something, at an arbitrary moment.
        let before = objects_at().await;
        wait_for(Duration::from_secs(60), "a new archived object", || async {
            (objects_at().await > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        archive.crash();
        at_kills.push(objects_at().await);
        archive = Child::run(&env, "archive");
    }
    let report = archive_complete(&env, &config, &topic, Duration::from_secs(240)).await;
    let final_objects = objects_at().await;
    assert!(
        at_kills.iter().all(|n| *n < final_objects),
        "every kill came before the archive was complete: {at_kills:?} of {final_objects}"
    );
    assert_eq!(report["problems"], 0, "{report}");
    let partitions = report["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 16);
    assert!(partitions.iter().all(|p| p["first_offset"] == 0), "{report}");
    let objects: i64 = partitions.iter().map(|p| p["objects"].as_i64().unwrap_or(0)).sum();
    assert!(objects > 16, "batches bounded by bytes and time: {objects} objects");
    assert!(
        watermarks(&config, &topic).await.iter().all(|w| w.low == 0),
        "the broker dropped nothing"
    );

    // The ingest, a separate group, landed everything meanwhile.
    wait_for(Duration::from_secs(120), "the ingest to land every row", || async {
        pg_count(&url, "SELECT count(*) FROM user_locations")
            .await
            .filter(|n| *n == 100_000)
    })
    .await;
    let before = table_digest(&url).await.expect("digest");

    // Wipe the table and restore it from the archive: the same rows come back.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    sqlx::query("TRUNCATE user_locations")
        .execute(&mut conn)
        .await
        .expect("wiped");
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(0));
    let (ok, output) = restore(&env);
    assert!(ok, "{output}");
    assert!(output.starts_with("republished 100000 records from "), "{output}");
    wait_for(Duration::from_secs(120), "the restored rows", || async {
        pg_count(&url, "SELECT count(*) FROM user_locations")
            .await
            .filter(|n| *n == 100_000)
    })
    .await;
    assert_eq!(
        table_digest(&url).await,
        Some(before),
        "the restored rows equal the originals"
    );
    drop((ingest, archive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_store_delays_the_archive_and_not_the_ingest() {
    let (broker, prefix) = broker(4).await;
    let topic = format!("{prefix}{}", TABLE.name());
    let url = fresh_pg_url().await;
    let (s3, _) = s3_bucket(&[]).await;
    let endpoint = s3_endpoint();
    let proxy = TcpProxy::start(endpoint.trim_start_matches("http://")).await;
    let env = env_for(
        &broker,
        &prefix,
        &url,
        &format!("http://127.0.0.1:{}", proxy.port),
        s3.bucket(),
    );
    let config = config_from(&env, &[]);
    let records = keyed(TABLE, sample::records(TABLE, 20_000, 12));
    publish(&config, &topic, &records[..5_000]).await;

    let child = Child::observed(&env, "ingest,archive");
    wait_for(Duration::from_secs(60), "some archived objects", || async {
        let listed = s3.list_all("archive/user_locations/").await.ok()?;
        (listed.len() >= 4).then_some(())
    })
    .await;

    proxy.stop();
    let archived_before = s3.list_all("archive/user_locations/").await.expect("listing").len();
    publish(&config, &topic, &records[5_000..]).await;
    // Ingestion goes on while the store is away.
    wait_for(
        Duration::from_secs(60),
        "every row in the DWH during the outage",
        || async {
            pg_count(&url, "SELECT count(*) FROM user_locations")
                .await
                .filter(|n| *n == 20_000)
        },
    )
    .await;
    // An upload fails once the S3 client gives up on the dead endpoint, which
    // can be after the ingest has caught up: waited for, not slept on.
    wait_for(Duration::from_secs(90), "an archive failure counted", || async {
        let failures = child.table_metric("dwh_helper_archive_failures_total", TABLE).await?;
        (failures >= 1.0).then_some(())
    })
    .await;
    let archived_during = s3.list_all("archive/user_locations/").await.expect("listing").len();
    assert_eq!(
        archived_during, archived_before,
        "nothing reached the store while it was away"
    );

    proxy.resume().await;
    let mut verify_env = env.clone();
    set_env(&mut verify_env, "S3_ENDPOINT_URL", &endpoint);
    let report = archive_complete(&verify_env, &config, &topic, Duration::from_secs(120)).await;
    assert_eq!(report["problems"], 0, "{report}");
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}

/// An archive member evicted while its upload failed retries it once S3 is back,
/// under the same first-offset key as the partition's new owner: whatever the
/// two lengths, the object stored first stays and the other member goes on after
/// it, so the archive has neither a gap nor an overlap.
#[tokio::test]
async fn an_archive_object_stored_under_a_key_is_never_replaced() {
    use dwh_helper::archive::{place, Placed};
    let (s3, _) = s3_bucket(&[]).await;
    let key = "archive/user_locations/dt=2024-03-01/dwh.user_locations-0-00000000000000000000.jsonl.gz";
    let never = tokio_util::sync::CancellationToken::new();
    let object = |last: i64| {
        let metadata = vec![
            ("first-offset", "0".to_owned()),
            ("last-offset", last.to_string()),
            ("records", (last + 1).to_string()),
        ];
        (bytes::Bytes::from(vec![b'x'; (last + 1) as usize]), metadata)
    };
    let stored = || async {
        let info = s3.object_info(key).await.expect("stored");
        (info.metadata["last-offset"].clone(), info.size)
    };

    let (body, metadata) = object(99);
    assert_eq!(
        place(Table::UserLocations, &s3, key, body, &metadata, &never).await,
        Some(Placed::Stored)
    );
    assert_eq!(stored().await, ("99".to_owned(), 100));
    // The zombie's retry, shorter or longer: the stored object stays.
    for last in [49, 99, 149] {
        let (body, metadata) = object(last);
        assert_eq!(
            place(Table::UserLocations, &s3, key, body, &metadata, &never).await,
            Some(Placed::Covered { last_offset: 99 }),
            "{last}"
        );
        assert_eq!(stored().await, ("99".to_owned(), 100), "{last}: kept");
    }
    // Something at the key that is no archive object is replaced.
    put_bytes(&s3, key, b"stray".to_vec()).await;
    let (body, metadata) = object(9);
    assert_eq!(
        place(Table::UserLocations, &s3, key, body, &metadata, &never).await,
        Some(Placed::Stored)
    );
    assert_eq!(stored().await, ("9".to_owned(), 10));
}

/// A member of the archive group, its uploads failing, is frozen past its session
/// timeout; the other member takes its partitions and archives them from the
/// same first offsets. When the first one thaws and S3 is back, its retried
/// uploads find those keys taken and go on after them: `archive verify` finds
/// every offset once, no gap, no overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evicted_archive_member_retrying_its_upload_leaves_no_gap_and_no_overlap() {
    let (broker, prefix) = broker(2).await;
    let topic = format!("{prefix}{}", TABLE.name());
    let url = fresh_pg_url().await;
    let (s3, _) = s3_bucket(&[]).await;
    let endpoint = s3_endpoint();
    let proxy = TcpProxy::start(endpoint.trim_start_matches("http://")).await;
    // One archive member per process. The mock cluster names a member after the
    // address of its struct (`"%p"`), so a member created after the frozen one's
    // expired can get an id that a sibling of the thawing process still holds:
    // two clients on one member abort the test process (rdkafka_mock_cgrp.c,
    // `Assertion '!member->resp' failed`). See the zombie test in faults.rs.
    let one_table = |mut env: Vec<(String, String)>| {
        env.push(("KAFKA_ARCHIVE_TABLES".into(), TABLE.name().into()));
        env
    };
    let direct = one_table(env_for(&broker, &prefix, &url, &endpoint, s3.bucket()));
    let proxied = one_table(env_for(
        &broker,
        &prefix,
        &url,
        &format!("http://127.0.0.1:{}", proxy.port),
        s3.bucket(),
    ));
    let config = config_from(&direct, &[]);
    let records = keyed(TABLE, sample::records(TABLE, 6_000, 22));
    publish(&config, &topic, &records[..2_000]).await;
    // A table left out of KAFKA_ARCHIVE_TABLES is not archived.
    let other = Table::TechnicalData;
    let other_topic = format!("{prefix}{}", other.name());
    publish(&config, &other_topic, &keyed(other, sample::records(other, 50, 23))).await;
    let mut zombie = Child::observed(&proxied, "archive");
    wait_for(Duration::from_secs(60), "the first objects", || async {
        let listed = s3.list_all("archive/user_locations/").await.ok()?;
        (listed.len() >= 2).then_some(())
    })
    .await;

    // Its uploads fail from now on, with objects in hand.
    proxy.stop();
    publish(&config, &topic, &records[2_000..4_000]).await;
    wait_for(Duration::from_secs(30), "uploads to fail", || async {
        let failures = zombie.table_metric("dwh_helper_archive_failures_total", TABLE).await?;
        (failures >= 1.0).then_some(())
    })
    .await;
    zombie.signal("STOP");
    // More records before the new owner starts: its objects from the same first
    // offsets are likely longer than the frozen member's.
    publish(&config, &topic, &records[4_000..]).await;
    let owner = Child::run(&direct, "archive");
    // The group moves on: the new owner archives everything, from the offsets
    // the frozen member had committed.
    archive_complete(&direct, &config, &topic, Duration::from_secs(120)).await;

    proxy.resume().await;
    zombie.signal("CONT");
    wait_for(
        Duration::from_secs(60),
        "the thawed member's retry to find the key taken",
        || async {
            let kept = zombie
                .table_metric("dwh_helper_archive_objects_kept_total", TABLE)
                .await?;
            (kept >= 1.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = archive_complete(&direct, &config, &topic, Duration::from_secs(60)).await;
    assert_eq!(report["problems"], 0, "{report}");
    assert!(zombie.running(), "the thawed member goes on");
    let listed = s3.list_all(&format!("archive/{}/", other.name())).await.expect("list");
    assert!(listed.is_empty(), "a table left out was archived: {listed:?}");
    drop((zombie, owner));
}

/// The Kafka broker goes down in the middle of ingest and archive, then comes
/// back: both resume by themselves, every record lands once in the DWH and
/// once in the archive. On the mock cluster: the suite's Kafka broker is shared
/// by every test and cannot be taken down for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_broker_outage_mid_stream_loses_nothing_in_ingest_or_archive() {
    let (broker, prefix) = mock_broker(4).await;
    let topic = format!("{prefix}{}", TABLE.name());
    let url = fresh_pg_url().await;
    let (s3, _) = s3_bucket(&[]).await;
    let env = env_for(&broker, &prefix, &url, &s3_endpoint(), s3.bucket());
    let config = config_from(&env, &[]);
    migrated_with_write_counter(&config, &url).await;
    let records = keyed(TABLE, sample::records(TABLE, 20_000, 21));
    publish(&config, &topic, &records[..10_000]).await;
    let mut env = env;
    env.push(("METRICS_LAG_INTERVAL_SECONDS".into(), "1".into()));
    let child = Child::observed(&env, "ingest,archive");
    let rows = || async { pg_count(&url, "SELECT count(*) FROM user_locations").await.unwrap_or(0) };
    wait_for(Duration::from_secs(60), "rows and archived objects", || async {
        let listed = s3.list_all("archive/user_locations/").await.ok()?;
        (rows().await > 0 && !listed.is_empty()).then_some(())
    })
    .await;

    broker.set_broker_up(1, false).expect("broker down");
    // The fault: the process loses the broker (its lag probe says so).
    wait_for(Duration::from_secs(60), "the process to notice", || async {
        let up = child.scrape().await?.value("dwh_helper_kafka_up", &[])?;
        (up == 0.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker.set_broker_up(1, true).expect("broker up");
    publish(&config, &topic, &records[10_000..]).await;

    wait_for(Duration::from_secs(120), "every row", || async {
        (rows().await == 20_000).then_some(())
    })
    .await;
    assert_written_once(&url, 20_000).await;
    let report = archive_complete(&env, &config, &topic, Duration::from_secs(120)).await;
    assert_eq!(report["problems"], 0, "{report}");
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}

/// Migrates the DWH and counts each key's writes by committed transactions.
async fn migrated_with_write_counter(config: &Config, url: &str) {
    let dwh = dwh_helper::store::Dwh::connect(&config.dwh).expect("pool");
    dwh.migrate().await.expect("migrations apply");
    count_writes(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_archive_object_stored_is_an_upload_span() {
    let (endpoint, received) = otlp::receiver().await;
    let (broker, prefix) = broker(1).await;
    let topic = format!("{prefix}{}", TABLE.name());
    let url = fresh_pg_url().await;
    let (s3, _) = s3_bucket(&[]).await;
    let mut env = env_for(&broker, &prefix, &url, &s3_endpoint(), s3.bucket());
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint));
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
    let config = config_from(&env, &[]);
    publish(&config, &topic, &keyed(TABLE, sample::records(TABLE, 50, 31))).await;
    let child = Child::run(&env, "archive");
    let objects = wait_for(Duration::from_secs(60), "an archived object", || async {
        let listed = s3.list_all("archive/user_locations/").await.ok()?;
        (!listed.is_empty()).then_some(listed)
    })
    .await;
    let key = objects[0].key.clone();
    let upload = wait_for(Duration::from_secs(30), "its upload span", || async {
        let r = received.lock().expect("lock");
        r.spans
            .iter()
            .find(|s| s.name == "archive_upload" && otlp::attribute(s, "key").as_deref() == Some(key.as_str()))
            .cloned()
    })
    .await;
    assert_eq!(otlp::attribute(&upload, "table").as_deref(), Some("user_locations"));
    assert!(otlp::attribute(&upload, "records").is_some_and(|r| r != "0"));
    drop(child);
}

fn restore(env: &[(String, String)]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
        .args(["archive", "restore", "--table", TABLE.name()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .output()
        .expect("restore runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// `archive restore` republishes only what the archive role wrote: an object
/// planted without the archive's metadata stops it before anything is published,
/// and a gzip bomb with forged metadata stops at the decompressed cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_restore_refuses_planted_objects_and_bounds_what_it_reads() {
    use std::io::Write as _;
    let (broker, prefix) = broker(1).await;
    let url = fresh_pg_url().await;
    let (s3, s3_config) = s3_bucket(&[]).await;
    let mut env = env_for(&broker, &prefix, &url, &s3_endpoint(), &s3_config.s3.bucket_name);
    // Small records make a small line cap (2 x 64 KiB + 64 KiB): a cheap bomb does.
    env.push(("DWH_MAX_WRITE_BATCH_BYTES".into(), "64KiB".into()));
    let config = config_from(&env, &[]);
    let topic = topic(&prefix, TABLE);
    let key_at = |first_offset| {
        dwh_helper::archive::format::object_key(
            &config.s3.archive_prefix,
            TABLE.name(),
            chrono::NaiveDate::from_ymd_opt(2024, 3, 1).expect("date"),
            &topic,
            0,
            first_offset,
        )
    };
    let gzip = |data: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).expect("gzip");
        encoder.finish().expect("gzip")
    };
    let line = br#"{"partition":0,"offset":0,"timestamp":null,"key":null,"value":"{}"}"#;
    // Planted with no metadata.
    put_bytes(&s3, &key_at(0), gzip(line)).await;
    let (ok, output) = restore(&env);
    assert!(!ok, "{output}");
    assert!(
        output.contains("not the archive role's") && output.contains("no archive metadata"),
        "{output}"
    );
    assert_eq!(watermarks(&config, &topic).await[0].high, 0, "nothing was published");

    // A gzip bomb with the archive's metadata: 8 MiB of one line, a few KiB stored.
    s3.delete_object(&key_at(0)).await.expect("deleted");
    let bomb = gzip(&vec![b'x'; 8 << 20]);
    let metadata = [
        ("first-offset", "0".to_owned()),
        ("last-offset", "0".to_owned()),
        ("records", "1".to_owned()),
    ];
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(bomb))]);
    let put = dwh_helper::s3::Put {
        metadata: &metadata,
        ..Default::default()
    };
    s3.put_object(&key_at(0), stream, put).await.expect("stored");
    let (ok, output) = restore(&env);
    assert!(!ok, "{output}");
    assert!(output.contains("not an archive"), "{output}");
    assert_eq!(watermarks(&config, &topic).await[0].high, 0, "nothing was published");
}
