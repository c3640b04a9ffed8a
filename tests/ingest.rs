//! The ingest role against the dev broker (librdkafka's mock cluster) and a real
//! PostgreSQL: typed rows in all seven tables, rejects, redelivery, fencing,
//! crashes, rebalances, a database outage and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dwh_helper::catalogue::Table;
use dwh_helper::config::Config;
use dwh_helper::sample;
use sqlx::{Connection as _, Row as _};

/// The text of each column of the one row `sql` selects (columns cast to text).
async fn row_text(url: &str, sql: &str, bind: &str) -> Vec<Option<String>> {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let row = sqlx::query(sql)
        .bind(bind)
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (0..row.len()).map(|i| row.get::<Option<String>, _>(i)).collect()
}

fn text(v: &serde_json::Value) -> Option<String> {
    Some(match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_of_all_seven_tables_land_with_typed_values() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let config = config_from(&ingest_env(&broker, &prefix, &url), &[]);
    let dwh = migrated(&config).await;
    for table in Table::ALL {
        publish(
            &config,
            &topic(&prefix, table),
            &keyed(table, sample::records(table, 50, 1)),
        )
        .await;
    }
    let ingest = InProcessIngest::start(config.clone(), dwh);
    for table in Table::ALL {
        caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;
        let count = pg_count(&url, &format!("SELECT count(*) FROM {}", table.name())).await;
        assert_eq!(count, Some(50), "{table}");
    }

    let r = |t| sample::records(t, 1, 1).remove(0);
    let e = r(Table::EventsPart);
    let ts = e["event_timestamp"].as_i64().expect("ts");
    let date = chrono::DateTime::from_timestamp(ts, 0)
        .expect("date")
        .date_naive()
        .to_string();
    assert_eq!(
        row_text(&url, "SELECT event_date::text, mcc::text, appmetrica_device_id::text, event_name FROM events_part WHERE session_id = $1::bigint", &e["session_id"].to_string()).await,
        [Some(date), text(&e["mcc"]), text(&e["appmetrica_device_id"]), text(&e["event_name"])]
    );
    let d = r(Table::MobileDevices);
    assert_eq!(
        row_text(&url, "SELECT extract(epoch FROM first_seen_at)::bigint::text, extract(epoch FROM last_seen_at)::bigint::text, mnc::text FROM mobile_devices WHERE appmetrica_device_id = $1::numeric", d["appmetrica_device_id"].as_str().expect("id")).await,
        [text(&d["first_seen_at"]), text(&d["last_seen_at"]), text(&d["mnc"])]
    );
    let p = r(Table::PermanentUserProperties);
    assert_eq!(
        row_text(&url, "SELECT notifications_enabled::text, first_session_date::text, gender FROM permanent_user_properties WHERE profile_id = $1", p["profile_id"].as_str().expect("id")).await,
        [text(&p["notifications_enabled"]), text(&p["first_session_date"]), text(&p["gender"])]
    );
    let t = r(Table::TechnicalData);
    assert_eq!(
        row_text(&url, "SELECT data->>'screen', paying::text, sample_rate::text, event_type FROM technical_data WHERE uuid = $1::uuid", t["uuid"].as_str().expect("uuid")).await,
        [text(&t["data"]["screen"]), text(&t["paying"]), Some("1".into()), text(&t["event_type"])]
    );
    let ep = r(Table::TmpEventProperties);
    assert_eq!(
        row_text(&url, "SELECT properties->>'currency', (properties->>'sum'), source FROM tmp_event_properties WHERE event_hash = $1", ep["event_hash"].as_str().expect("hash")).await,
        [text(&ep["properties"]["currency"]), text(&ep["properties"]["sum"]), text(&ep["source"])]
    );
    let up = r(Table::TmpUserProperties);
    assert_eq!(
        row_text(
            &url,
            "SELECT value_text, snapshot_date::text, property_kind FROM tmp_user_properties WHERE profile_id = $1",
            up["profile_id"].as_str().expect("id")
        )
        .await,
        [
            text(&up["value_text"]),
            text(&up["snapshot_date"]),
            text(&up["property_kind"])
        ]
    );
    let l = r(Table::UserLocations);
    assert_eq!(
        row_text(
            &url,
            "SELECT latitude::text, longitude::text, city FROM user_locations WHERE uuid = $1::uuid",
            l["uuid"].as_str().expect("uuid")
        )
        .await,
        [text(&l["latitude"]), text(&l["longitude"]), text(&l["city"])]
    );
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(0)
    );
    assert!(ingest.status.counters().rows >= 350);
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_are_rejected_with_their_reason_and_the_rest_lands() {
    let (broker, prefix) = broker(4).await;
    let url = fresh_pg_url().await;
    let limit = 16 * 1024;
    let config = config_from(
        &ingest_env(&broker, &prefix, &url),
        &[("DWH_MAX_WRITE_BATCH_BYTES", "16KiB"), ("KAFKA_BATCH_MAX_ROWS", "100")],
    );
    let dwh = migrated(&config).await;
    let table = Table::EventsPart;
    let good = keyed(table, sample::records(table, 1386, 2));
    // 1%: two of every kind, spread through the stream.
    let mut expected = Vec::new();
    let mut records = Vec::new();
    for (i, record) in good.iter().enumerate() {
        records.push(record.clone());
        if i % 99 == 50 {
            let n = expected.len();
            let (payload, reason) = sample::poison(table, i as u64, limit).swap_remove((n / 2) % 7);
            let key = format!("poison-{n}");
            expected.push((payload.clone(), reason));
            records.push((key, payload));
        }
    }
    assert_eq!(expected.len(), 14);
    publish(&config, &topic(&prefix, table), &records).await;
    let ingest = InProcessIngest::start(config.clone(), dwh);
    caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;
    assert_eq!(pg_count(&url, "SELECT count(*) FROM events_part").await, Some(1386));

    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let rejects: Vec<(Vec<u8>, String, String, i32, i64)> = sqlx::query_as(
        "SELECT payload, reason, topic, partition, \"offset\" FROM dwh_rejected_records ORDER BY partition, \"offset\"",
    )
    .fetch_all(&mut conn)
    .await
    .expect("rejects");
    assert_eq!(rejects.len(), expected.len());
    for (payload, reason) in &expected {
        let found = rejects
            .iter()
            .find(|r| &r.0 == payload)
            .unwrap_or_else(|| panic!("reject with reason {reason:?} is stored with its raw payload"));
        assert!(found.1.contains(reason), "{:?} should name {reason:?}", found.1);
        assert_eq!(found.2, topic(&prefix, table));
    }
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_records_produced_twice_land_once() {
    let (broker, prefix) = broker(8).await;
    let url = fresh_pg_url().await;
    let config = config_from(&ingest_env(&broker, &prefix, &url), &[]);
    let dwh = migrated(&config).await;
    let table = Table::EventsPart;
    let records = keyed(table, sample::records(table, 10_000, 3));
    let ingest = InProcessIngest::start(config.clone(), dwh);
    publish(&config, &topic(&prefix, table), &records).await;
    publish(&config, &topic(&prefix, table), &records).await;
    let ends = caught_up(&config, &url, &prefix, table, Duration::from_secs(120)).await;
    assert_eq!(
        ends.iter().map(|(_, end)| end).sum::<i64>(),
        20_000,
        "both copies were consumed"
    );
    assert_eq!(pg_count(&url, "SELECT count(*) FROM events_part").await, Some(10_000));
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_flush_writes_nothing_and_the_consumer_resumes_from_the_stored_offset() {
    let (broker, prefix) = broker(1).await;
    let url = fresh_pg_url().await;
    let config = config_from(&ingest_env(&broker, &prefix, &url), &[]);
    let dwh = migrated(&config).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let records = keyed(table, sample::records(table, 200, 4));
    let ingest = InProcessIngest::start(config.clone(), dwh);
    publish(&config, &topic, &records[..100]).await;
    caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;
    // Another owner wrote offsets 100..150 meanwhile: the stored offset moved on.
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("UPDATE dwh_consumer_offsets SET next_offset = 150 WHERE topic = $1")
        .bind(&topic)
        .execute(&mut conn)
        .await
        .expect("offset moved");
    publish(&config, &topic, &records[100..]).await;
    let ends = caught_up(&config, &url, &prefix, table, Duration::from_secs(60)).await;
    assert_eq!(ends, [(0, 200)]);
    // The batch that started at 100 was fenced: none of 100..150 was written by us.
    let uuids = |range: std::ops::Range<usize>| -> Vec<String> {
        sample::records(table, 200, 4)[range]
            .iter()
            .map(|r| r["uuid"].as_str().expect("uuid").to_owned())
            .collect()
    };
    let present = |ids: Vec<String>| {
        let url = url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_locations WHERE uuid::text = ANY($1)")
                .bind(ids)
                .fetch_one(&mut conn)
                .await
                .expect("count")
        }
    };
    assert_eq!(present(uuids(0..100)).await, 100);
    assert_eq!(present(uuids(100..150)).await, 0, "the fenced batch wrote nothing");
    assert_eq!(
        present(uuids(150..200)).await,
        50,
        "ingest resumed from the stored offset"
    );
    ingest.stop().await;
}

/// A small deterministic generator for kill moments; the seed is printed.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        low + self.0 % (high - low)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_at_random_moments_lose_and_duplicate_nothing() {
    // 12,500 records a partition: enough that six kills, each within 0.4 s of the
    // restarted process's first rows, fall before the end (at 200,000 the faster
    // ingest once finished first; with 0.8 s it finished before the sixth kill
    // once: rows at the kills 42,000 to 300,000).
    let (broker, prefix) = broker(24).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    env.push(("KAFKA_GROUP_INSTANCE_ID".into(), "crash-test".into()));
    env.push(("KAFKA_BATCH_MAX_ROWS".into(), "2000".into()));
    let config = config_from(&env, &[]);
    migrated(&config).await;
    count_writes(&url).await;
    const RECORDS: i64 = 300_000;
    let records = keyed(table, sample::records(table, RECORDS as usize, 5));
    publish(&config, &topic, &records).await;

    let seed = std::env::var("DWH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(7)
        });
    eprintln!("kill moments seed: {seed} (DWH_TEST_SEED={seed} replays it)");
    let mut moments = Moments(seed);
    let mut child = Child::ingest(&env);
    let landed = || async { pg_count(&url, "SELECT count(*) FROM user_locations").await.unwrap_or(0) };
    // Each kill falls after the restarted process wrote something, and before
    // everything was written: rows landed at each kill, strictly rising.
    let mut at_kills: Vec<i64> = Vec::new();
    while at_kills.len() < 6 {
        let before = at_kills.last().copied().unwrap_or(0);
        wait_for(Duration::from_secs(120), "progress before the next kill", || async {
            (landed().await > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(moments.next_ms(0, 400))).await;
        child.crash();
        at_kills.push(landed().await);
        child = Child::ingest(&env);
    }
    eprintln!("rows landed at each kill: {at_kills:?}");
    assert!(
        at_kills.windows(2).all(|w| w[0] < w[1]) && at_kills[0] > 0 && at_kills[5] < RECORDS,
        "every kill fell mid-stream: {at_kills:?}"
    );
    let ends = caught_up(&config, &url, &prefix, table, Duration::from_secs(300)).await;
    drop(child);
    assert_eq!(ends.len(), 24);
    assert_eq!(ends.iter().map(|(_, end)| end).sum::<i64>(), RECORDS);
    let lows = watermarks(&config, &topic).await;
    assert!(lows.iter().all(|w| w.low == 0), "the broker dropped nothing: {lows:?}");
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM user_locations").await,
        Some(RECORDS)
    );
    assert_eq!(
        pg_count(&url, "SELECT count(DISTINCT uuid) FROM user_locations").await,
        Some(RECORDS),
        "no natural key twice"
    );
    assert_written_once(&url, RECORDS).await;
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(0)
    );
}

/// Three members of one group; four times a member picked at random is killed
/// (SIGKILL) at a random moment while records keep coming, and a new one joins.
/// Every record lands once, under `protocol`'s rebalances.
async fn members_killed_at_random(protocol: &str) {
    let (broker, prefix) = broker_with(&[(Table::UserLocations, 12)]).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "KAFKA_INGEST_TABLES", "user_locations");
    set_env(&mut env, "KAFKA_BATCH_MAX_ROWS", "1000");
    if protocol == "consumer" {
        env = kip848(env);
    }
    let config = config_from(&env, &[]);
    migrated(&config).await;
    count_writes(&url).await;
    const RECORDS: i64 = 80_000;
    let producing = trickle(
        &config,
        &topic,
        keyed(table, sample::records(table, RECORDS as usize, 12)),
        2_000,
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 | 1)
        .unwrap_or(7);
    eprintln!("{protocol}: kill seed {seed}");
    let mut moments = Moments(seed);
    let mut members: Vec<Child> = (0..3).map(|_| Child::observed(&env, "ingest")).collect();
    let landed = || async { pg_count(&url, "SELECT count(*) FROM user_locations").await.unwrap_or(0) };
    let mut at_kills = Vec::new();
    for _ in 0..4 {
        let before = at_kills.last().copied().unwrap_or(0);
        wait_for(Duration::from_secs(120), "progress before the next kill", || async {
            (landed().await > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(moments.next_ms(0, 1_500))).await;
        let victim = (moments.next_ms(0, 3_000) / 1_000) as usize;
        members.remove(victim).crash();
        at_kills.push(landed().await);
        members.push(Child::observed(&env, "ingest"));
    }
    eprintln!("{protocol}: rows landed at each kill: {at_kills:?}");
    producing.await.expect("all published");
    assert!(
        at_kills[0] > 0 && at_kills[3] < RECORDS,
        "every kill fell mid-stream: {at_kills:?}"
    );
    caught_up(&config, &url, &prefix, table, Duration::from_secs(240)).await;
    // The group went through rebalances (the survivors counted theirs).
    let mut rebalances = 0.0;
    for member in &members {
        rebalances += member
            .scrape()
            .await
            .map_or(0.0, |m| m.sum("dwh_helper_rebalances_total", &[]));
    }
    assert!(rebalances > 0.0, "the members saw rebalances");
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM user_locations").await,
        Some(RECORDS)
    );
    assert_eq!(
        pg_count(&url, "SELECT count(DISTINCT uuid) FROM user_locations").await,
        Some(RECORDS)
    );
    assert_written_once(&url, RECORDS).await;
    drop(members);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_killed_at_random_lose_and_duplicate_nothing_in_a_classic_group() {
    members_killed_at_random("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_killed_at_random_lose_and_duplicate_nothing_in_a_kip848_group() {
    members_killed_at_random("consumer").await;
}

/// Publishes `records` in slices while the test does other things.
fn trickle(config: &Config, topic: &str, records: Vec<(String, Vec<u8>)>, slice: usize) -> tokio::task::JoinHandle<()> {
    let (config, topic) = (config.clone(), topic.to_owned());
    tokio::spawn(async move {
        for chunk in records.chunks(slice) {
            publish(&config, &topic, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_leaving_and_joining_mid_stream_lose_and_duplicate_nothing() {
    let (broker, prefix) = broker(16).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let url = fresh_pg_url().await;
    let env = ingest_env(&broker, &prefix, &url);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    count_writes(&url).await;
    let producing = trickle(&config, &topic, keyed(table, sample::records(table, 60_000, 6)), 2_000);
    let a = Child::ingest(&env);
    let b = Child::ingest(&env);
    let c = Child::ingest(&env);
    wait_for(Duration::from_secs(60), "rows to arrive", || async {
        pg_count(&url, "SELECT count(*) FROM user_locations")
            .await
            .filter(|n| *n > 5_000)
    })
    .await;
    let status = b.terminate(Duration::from_secs(40)).expect("b stops in time");
    assert!(status.success(), "b exits 0 on SIGTERM: {status:?}");
    let d = Child::ingest(&env);
    producing.await.expect("all published");
    caught_up(&config, &url, &prefix, table, Duration::from_secs(180)).await;
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM user_locations").await,
        Some(60_000)
    );
    assert_eq!(
        pg_count(&url, "SELECT count(DISTINCT uuid) FROM user_locations").await,
        Some(60_000)
    );
    assert_written_once(&url, 60_000).await;
    drop((a, c, d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_mid_ingest_resumes_by_itself_exactly_once() {
    let (broker, prefix) = broker(8).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.expect("cluster");
    let url = cluster.url();
    let env = ingest_env(&broker, &prefix, &url);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    count_writes(&url).await;
    let producing = trickle(&config, &topic, keyed(table, sample::records(table, 40_000, 7)), 1_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut env = env;
    env.push(("HTTP_BIND".into(), format!("127.0.0.1:{port}")));
    let child = Child::run(&env, "ingest,api");
    let ready = move || async move {
        let response = reqwest::get(format!("http://127.0.0.1:{port}/health/ready"))
            .await
            .ok()?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.ok()?;
        Some((status, body))
    };
    wait_for(Duration::from_secs(60), "rows to arrive", || async {
        pg_count(&url, "SELECT count(*) FROM user_locations")
            .await
            .filter(|n| *n > 2_000)
    })
    .await;
    assert_eq!(ready().await.map(|r| r.0), Some(200));
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.down();
        cluster
    })
    .await
    .expect("outage");
    let (_, body) = wait_for(Duration::from_secs(10), "readiness to report the outage", || async {
        ready().await.filter(|(status, _)| *status == 503)
    })
    .await;
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.up();
        cluster
    })
    .await
    .expect("recovery");
    producing.await.expect("all published");
    caught_up(&config, &url, &prefix, table, Duration::from_secs(180)).await;
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM user_locations").await,
        Some(40_000)
    );
    assert_eq!(
        pg_count(&url, "SELECT count(DISTINCT uuid) FROM user_locations").await,
        Some(40_000)
    );
    assert_written_once(&url, 40_000).await;
    assert_eq!(ready().await.map(|r| r.0), Some(200), "ready again");
    let status = child.terminate(Duration::from_secs(40)).expect("stops in time");
    assert!(status.success(), "the outage did not make it exit: {status:?}");
    drop(cluster);
}

/// Waits until the group is settled (all seven consumers hold their
/// `partitions`, no rebalance for a while: a rebalance rightly writes the
/// buffer), and returns the rebalances counted so far.
async fn settled_group(child: &Child, partitions: i32) -> f64 {
    let settled = || async {
        let m = child.scrape().await?;
        let assigned = Table::ALL
            .iter()
            .all(|t| m.value("dwh_helper_partitions_assigned", &[("table", t.name())]) == Some(f64::from(partitions)));
        Some((assigned, m.sum("dwh_helper_rebalances_total", &[])))
    };
    wait_for(Duration::from_secs(60), "a settled group", || async {
        let (assigned, before) = settled().await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (still, after) = settled().await?;
        (assigned && still && before == after).then_some(after)
    })
    .await
}

/// An ingest child of `user_locations` over `partitions` with a ten-minute
/// linger and `settings`, its group settled: only what the test means to close
/// a batch does so while it looks.
struct Lingering {
    _broker: TestBroker,
    url: String,
    config: Config,
    child: Child,
    topic: String,
    /// Rebalances counted once the group settled.
    rebalances: f64,
}

async fn lingering_ingest(partitions: i32, settings: &[(&str, &str)]) -> Lingering {
    let (broker, prefix) = broker(partitions).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "KAFKA_BATCH_LINGER_MS", "600000");
    for (name, value) in settings {
        set_env(&mut env, name, value);
    }
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let child = Child::observed(&env, "ingest");
    let rebalances = settled_group(&child, partitions).await;
    Lingering {
        _broker: broker,
        url,
        config,
        child,
        topic: topic(&prefix, Table::UserLocations),
        rebalances,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_end_of_a_backlog_lands_without_waiting_out_the_linger() {
    // A ten-minute linger: only full batches, and the rest of a backlog that
    // follows a full batch, may be written while the test looks.
    let ingest = lingering_ingest(1, &[("KAFKA_BATCH_MAX_ROWS", "100"), ("KAFKA_WRITE_LANES", "1")]).await;
    let (url, config, topic) = (&ingest.url, &ingest.config, &ingest.topic);
    let table = Table::UserLocations;
    // 250 records: two full batches, then 50 that follow a full one.
    publish(config, topic, &keyed(table, sample::records(table, 250, 9))).await;
    let count = || pg_count(url, "SELECT count(*) FROM user_locations");
    wait_for(Duration::from_secs(60), "the whole backlog", || async {
        (count().await == Some(250)).then_some(())
    })
    .await;
    let m = ingest.child.scrape().await.expect("a scrape");
    assert_eq!(
        m.sum("dwh_helper_rebalances_total", &[]),
        ingest.rebalances,
        "no rebalance wrote the buffer instead"
    );
    // 30 more follow a batch that was not full: light traffic, which waits out
    // the linger as before.
    publish(config, topic, &keyed(table, sample::records(table, 30, 10))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count().await, Some(250), "the light batch is still open");
    let status = ingest
        .child
        .terminate(Duration::from_secs(30))
        .expect("exits within the grace period");
    assert!(status.success(), "exit 0: {status:?}");
    assert_eq!(count().await, Some(280));
    let stored: i64 = stored_offsets(url, &config.kafka.group_id, topic)
        .await
        .iter()
        .map(|(_, o)| o)
        .sum();
    assert_eq!(stored, 280);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_writes_the_half_full_batch_and_exits_zero() {
    let ingest = lingering_ingest(2, &[("KAFKA_BATCH_MAX_ROWS", "100000")]).await;
    let (url, config, topic) = (&ingest.url, &ingest.config, &ingest.topic);
    let table = Table::UserLocations;
    publish(config, topic, &keyed(table, sample::records(table, 500, 8))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pg_count(url, "SELECT count(*) FROM user_locations").await,
        Some(0),
        "the batch is still open (linger 10 minutes)"
    );
    let started = Instant::now();
    let status = ingest
        .child
        .terminate(Duration::from_secs(30))
        .expect("exits within the grace period");
    assert!(status.success(), "exit 0: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(pg_count(url, "SELECT count(*) FROM user_locations").await, Some(500));
    let stored: i64 = stored_offsets(url, &config.kafka.group_id, topic)
        .await
        .iter()
        .map(|(_, o)| o)
        .sum();
    assert_eq!(stored, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_created_after_the_start_is_warned_about_once_then_consumed() {
    // Topics under this prefix do not exist when the ingest starts.
    let (broker, prefix) = broker_with(&[]).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "LOG_FORMAT", "json");
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let table = Table::UserLocations;
    let topic = topic(&prefix, table);
    let child = Child::observed(&env, "ingest");
    // The ingest role has started once its tables' failing gauges exist.
    wait_for(Duration::from_secs(60), "the ingest role to start", || async {
        child.table_metric("dwh_helper_failing", table).await?;
        (child.scrape().await?.series("dwh_helper_failing", &[]) == 7).then_some(())
    })
    .await;
    let warnings = child.events("topic_missing");
    let of_topic = warnings.iter().filter(|e| e["topic"] == topic.as_str()).count();
    assert_eq!(of_topic, 1, "one clear warning:\n{}", child.log_text());
    // Producing creates the topic (auto.create.topics.enable, Kafka's default).
    publish(&config, &topic, &keyed(table, sample::records(table, 100, 10))).await;
    wait_for(Duration::from_secs(90), "rows from the late topic", || async {
        pg_count(&url, "SELECT count(*) FROM user_locations")
            .await
            .filter(|n| *n == 100)
    })
    .await;
    let status = child.terminate(Duration::from_secs(30)).expect("stops");
    assert!(status.success());
}
