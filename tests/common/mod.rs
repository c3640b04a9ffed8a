//! Shared test set-up: real databases and a real HTTP server on loopback.
//!
//! PostgreSQL comes from `DWH_TEST_DATABASE_URL` (scripts/test.sh starts a throwaway
//! cluster and sets it). Without it the tests fail rather than skip: a suite that
//! silently skips its database tests would pass while testing nothing.
#![allow(dead_code)]

pub mod kafka;
pub mod logs_api;
pub mod otlp;

pub use kafka::*;

use std::sync::atomic::{AtomicU32, Ordering};

use dwh_helper::config::{Config, DwhConfig};
use dwh_helper::http::{self, AppState};
use dwh_helper::store::Dwh;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

/// The admin URL of the test PostgreSQL server.
pub fn pg_admin_url() -> String {
    std::env::var("DWH_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!("DWH_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL")
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates an empty database for one test and returns its URL.
pub async fn fresh_pg_url() -> String {
    let admin = pg_admin_url();
    let name = format!(
        "dwh_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&admin).expect("DWH_TEST_DATABASE_URL is a URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// A configuration for `database_url` with the default limits.
pub fn config_for(database_url: &str, extra: &[(&str, &str)]) -> Config {
    let mut vars = vec![("DWH_DATABASE_URL".to_owned(), database_url.to_owned())];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_vars(vars).expect("valid test configuration")
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Postgres,
    Sqlite,
}

/// A migrated, empty DWH of the given kind, and its configuration. The returned
/// guard keeps the SQLite file alive.
pub async fn dwh(db: Db, extra: &[(&str, &str)]) -> (Dwh, DwhConfig, Option<tempfile::TempDir>) {
    let (url, dir) = match db {
        Db::Postgres => (fresh_pg_url().await, None),
        Db::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            (format!("sqlite://{}", dir.path().join("dwh.db").display()), Some(dir))
        }
    };
    let config = config_for(&url, extra).dwh;
    let dwh = Dwh::connect(&config).expect("pool");
    dwh.migrate().await.expect("migrations apply");
    (dwh, config, dir)
}

/// A running API server on a free loopback port; stops when dropped.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Api {
    pub async fn start(dwh: Dwh, config: &Config) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let mut state = AppState::new(dwh, config);
        if config.s3.is_configured() {
            state.s3 = Some(dwh_helper::s3::S3::new(&config.s3));
        }
        let app = http::router(state, config.http.max_body_bytes);
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, app, stop.clone(), config.http.clone()));
        Api {
            base,
            client: reqwest::Client::new(),
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET returning status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.client.get(self.url(path)).send().await.expect("request");
        status_and_json(response).await
    }

    /// POST of a JSON body returning status and JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        status_and_json(response).await
    }
}

pub async fn status_and_json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    (status, json)
}

/// `n` distinct, valid events_part records.
pub fn events(n: usize, seed: u64) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "application_id": 4242,
                "event_name": format!("event_{}", i % 17),
                "event_timestamp": 1_709_296_200 + (seed * 1_000_000) as i64 + i as i64,
                "appmetrica_device_id": format!("{}", 10_000_000_000_000_000_000u64 + i as u64),
                "os_name": if i % 2 == 0 { "android" } else { "ios" },
                "mcc": 250,
                "city": "Moscow",
                "session_id": i as i64
            })
        })
        .collect()
}

/// `n` distinct, valid user_locations records.
pub fn locations(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "uuid": format!("00000000-0000-4000-8000-{:012x}", i),
                "event_time": "2024-03-01T10:00:00Z",
                "latitude": 55.0 + (i % 30) as f64 / 10.0,
                "longitude": 37.0,
                "city": "Moscow"
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Kafka: publishing, ingest in-process or as a child (brokers: kafka.rs).

/// The topic of `table` under `prefix`.
pub fn topic(prefix: &str, table: dwh_helper::catalogue::Table) -> String {
    format!("{prefix}{}", table.name())
}

/// A DWH handle for `config`, migrations applied.
pub async fn migrated(config: &Config) -> Dwh {
    let dwh = Dwh::connect(&config.dwh).expect("pool");
    dwh.migrate().await.expect("migrations apply");
    dwh
}

/// A loopback port nobody listens on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `/metrics` scrape, parsed by a Prometheus text parser.
pub struct Scrape(pub Vec<prometheus_parse::Sample>);

impl Scrape {
    /// Scrapes `base`/metrics with the bearer `token`; `None` while it does not answer.
    pub async fn get(base: &str, token: &str) -> Option<Scrape> {
        let response = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("client")
            .get(format!("{base}/metrics"))
            .bearer_auth(token)
            .send()
            .await
            .ok()?;
        assert_eq!(response.status().as_u16(), 200, "/metrics answers 200");
        let text = response.text().await.ok()?;
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition");
        Some(Scrape(parsed.samples))
    }

    /// The metrics of this test process (its in-process instances), as scraped.
    pub fn of_this_process() -> Scrape {
        let text = dwh_helper::telemetry::metrics::metrics().encode();
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition");
        Scrape(parsed.samples)
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = f64> + 'a {
        self.0
            .iter()
            .filter(move |s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    }

    /// The one sample of `name` with `labels`, if there is one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self.find(name, labels).collect();
        assert!(found.len() <= 1, "{name}{labels:?} matches {} series", found.len());
        found.first().copied()
    }

    /// The sum over every series of `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).sum()
    }

    /// How many series of `name` have `labels`.
    pub fn series(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.find(name, labels).count()
    }
}

/// The variables an ingest process needs for `broker` and `database_url`; its
/// consumer group is the test's own ([`group`]).
pub fn ingest_env(broker: &TestBroker, prefix: &str, database_url: &str) -> Vec<(String, String)> {
    let group = group(prefix);
    let mut env: Vec<(String, String)> = [
        ("DWH_DATABASE_URL", database_url),
        ("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers()),
        ("KAFKA_TOPIC_PREFIX", prefix),
        ("KAFKA_GROUP_ID", &group),
        ("KAFKA_BATCH_LINGER_MS", "100"),
        // Crashed members leave the group quickly.
        ("KAFKA_LIBRDKAFKA_SESSION_TIMEOUT_MS", "6000"),
        ("KAFKA_LIBRDKAFKA_HEARTBEAT_INTERVAL_MS", "500"),
        ("LOG_LEVEL", "info"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if !broker.is_real() {
        // A timed-out request keeps its connection. The mock cluster stops reading
        // a connection while it holds that member's JoinGroup or SyncGroup, so it
        // would not see that connection close, and a member that sent the request
        // again on a new connection would abort the test process
        // (rdkafka_mock_cgrp.c: `Assertion '!member->resp' failed`).
        env.push(("KAFKA_LIBRDKAFKA_SOCKET_MAX_FAILS".into(), "0".into()));
    }
    env
}

/// `env` moved to the KIP-848 consumer group protocol (`group.protocol=consumer`):
/// the session and heartbeat settings are the broker's there, and librdkafka
/// refuses them.
pub fn kip848(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != "KAFKA_LIBRDKAFKA_SESSION_TIMEOUT_MS" && k != "KAFKA_LIBRDKAFKA_HEARTBEAT_INTERVAL_MS");
    env.push(("KAFKA_LIBRDKAFKA_GROUP_PROTOCOL".into(), "consumer".into()));
    env
}

/// Sets `name` to `value` in `env`, replacing the value it had.
pub fn set_env(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_owned(), value.to_owned()));
}

pub fn config_from(env: &[(String, String)], extra: &[(&str, &str)]) -> Config {
    let mut vars = env.to_vec();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_vars(vars).expect("valid test configuration")
}

/// Publishes `(key, payload)` records to `topic` and waits for every acknowledgement.
pub async fn publish(config: &Config, topic: &str, records: &[(String, Vec<u8>)]) {
    let publisher = dwh_helper::kafka::Publisher::new(&config.kafka).expect("producer");
    let mut batch = publisher.batch();
    for (key, payload) in records {
        batch.send(topic, key.as_bytes(), payload).await.expect("record queued");
    }
    assert_eq!(
        batch.finish().await.expect("records acknowledged"),
        records.len() as u64
    );
}

/// Valid records of `table` as `(natural key, JSON bytes)`.
pub fn keyed(table: dwh_helper::catalogue::Table, records: Vec<serde_json::Value>) -> Vec<(String, Vec<u8>)> {
    records
        .into_iter()
        .map(|record| {
            let row = dwh_helper::catalogue::decode_json(table, record.clone())
                .expect("valid sample")
                .row;
            (
                dwh_helper::catalogue::natural_key(table.spec(), &row),
                record.to_string().into_bytes(),
            )
        })
        .collect()
}

/// Watermarks of every partition of `topic`.
pub async fn watermarks(config: &Config, topic: &str) -> Vec<dwh_helper::kafka::topics::Watermarks> {
    let kafka = config.kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        dwh_helper::kafka::topics::Metadata::connect(&kafka)
            .expect("metadata client")
            .watermarks(&topic)
            .expect("watermarks")
    })
    .await
    .expect("metadata task")
}

/// The ingest role running in this process; stops (gracefully) when dropped or
/// on [`InProcessIngest::stop`].
pub struct InProcessIngest {
    pub shutdown: CancellationToken,
    pub status: std::sync::Arc<dwh_helper::ingest::IngestStatus>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessIngest {
    pub fn start(config: Config, dwh: Dwh) -> Self {
        let shutdown = CancellationToken::new();
        let status = std::sync::Arc::new(dwh_helper::ingest::IngestStatus::default());
        let task = {
            let (shutdown, status) = (shutdown.clone(), status.clone());
            tokio::spawn(async move {
                dwh_helper::ingest::run(&config, dwh, status, shutdown)
                    .await
                    .expect("ingest runs");
            })
        };
        InProcessIngest {
            shutdown,
            status,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("ingest task ends cleanly");
        }
    }
}

impl Drop for InProcessIngest {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `dwh-helper run --roles ingest` as a child process with `env`.
pub struct Child {
    pub child: std::process::Child,
    log: std::path::PathBuf,
    /// Base URL and token of its API, when it serves one to scrape.
    api: Option<(String, String)>,
}

impl Child {
    pub fn ingest(env: &[(String, String)]) -> Child {
        Child::run(env, "ingest")
    }

    /// `dwh-helper run --roles <roles>`.
    pub fn run(env: &[(String, String)], roles: &str) -> Child {
        let log = tempfile::NamedTempFile::new()
            .expect("log file")
            .into_temp_path()
            .keep()
            .expect("keep log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
            .args(["run", "--roles", roles])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("dwh-helper starts");
        Child { child, log, api: None }
    }

    /// `dwh-helper run --roles <roles>,api`, the API on a free loopback port, so
    /// that tests read its `/metrics` rather than its log.
    pub fn observed(env: &[(String, String)], roles: &str) -> Child {
        let port = free_port();
        let mut env = env.to_vec();
        env.retain(|(k, _)| k != "HTTP_BIND");
        env.push(("HTTP_BIND".into(), format!("127.0.0.1:{port}")));
        let token = env
            .iter()
            .find(|(k, _)| k == "HTTP_API_TOKEN")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut child = Child::run(&env, &format!("{roles},api"));
        child.api = Some((format!("http://127.0.0.1:{port}"), token));
        child
    }

    /// The base URL of its API (started with [`Child::observed`]).
    pub fn base(&self) -> Option<&str> {
        self.api.as_ref().map(|(base, _)| base.as_str())
    }

    /// A scrape of its `/metrics` (started with [`Child::observed`]); `None`
    /// while it does not answer.
    pub async fn scrape(&self) -> Option<Scrape> {
        let (base, token) = self.api.as_ref().expect("a child started with Child::observed");
        Scrape::get(base, token).await
    }

    /// What its `/health/ready` answers (started with [`Child::observed`]):
    /// the status code and the body; `None` while it does not answer.
    pub async fn ready(&self) -> Option<(u16, String)> {
        let base = self.base().expect("a child started with Child::observed");
        let response = reqwest::get(format!("{base}/health/ready")).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// The value of `name{table=...}` in a scrape, 0 when absent.
    pub async fn table_metric(&self, name: &str, table: dwh_helper::catalogue::Table) -> Option<f64> {
        Some(self.scrape().await?.sum(name, &[("table", table.name())]))
    }

    /// What the child logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The named events the child logged so far (it runs with `LOG_FORMAT=json`):
    /// each log object whose `event` field is `name`.
    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|object| object["event"] == name)
            .collect()
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// The exit status, waiting at most `limit` (then `None`, the child still runs).
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: a crash.
    pub fn crash(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (waiting at most `limit`).
    pub fn terminate(mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("child log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Polls `check` until it returns `Some` or `limit` passes (then panics with `what`).
pub async fn wait_for<T, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits until the DWH's stored offsets of `table` equal the broker's end offsets
/// (every partition caught up), then returns those end offsets.
pub async fn caught_up(
    config: &Config,
    url: &str,
    prefix: &str,
    table: dwh_helper::catalogue::Table,
    limit: std::time::Duration,
) -> Vec<(i32, i64)> {
    let topic = topic(prefix, table);
    wait_for(limit, &format!("{topic} to be caught up"), || async {
        let ends: Vec<(i32, i64)> = watermarks(config, &topic)
            .await
            .iter()
            .filter(|w| w.high > 0)
            .map(|w| (w.partition, w.high))
            .collect();
        let stored = stored_offsets(url, &group(prefix), &topic).await;
        (!ends.is_empty() && stored == ends).then_some(ends)
    })
    .await
}

/// One number from a PostgreSQL query.
pub async fn pg_count(url: &str, sql: &str) -> Option<i64> {
    let mut conn = sqlx::PgConnection::connect(url).await.ok()?;
    sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut conn).await.ok()
}

/// Counts, in the test database, every row a committed transaction wrote into
/// `user_locations`, key by key, whether or not it changed the table: a BEFORE
/// INSERT trigger fires for rows that `ON CONFLICT` then skips too, and rolls back
/// with its transaction. A record delivered twice shows up as a count of 2, which
/// `count(DISTINCT key)` cannot see.
pub async fn count_writes(url: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::raw_sql(
        "CREATE TABLE test_writes (key text PRIMARY KEY, n int NOT NULL);
         CREATE FUNCTION test_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO test_writes VALUES (NEW.uuid::text, 1)
                 ON CONFLICT (key) DO UPDATE SET n = test_writes.n + 1;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_count_write BEFORE INSERT ON user_locations
             FOR EACH ROW EXECUTE FUNCTION test_count_write();",
    )
    .execute(&mut conn)
    .await
    .expect("write counter");
}

/// Asserts that each of `expected` keys was written by exactly one committed
/// transaction.
pub async fn assert_written_once(url: &str, expected: i64) {
    assert_eq!(pg_count(url, "SELECT count(*) FROM test_writes").await, Some(expected));
    assert_eq!(
        pg_count(url, "SELECT count(*) FROM test_writes WHERE n > 1").await,
        Some(0),
        "a record was written by two committed transactions"
    );
}

/// Sum of the stored next offsets of `topic` for `group`.
pub async fn stored_offsets(url: &str, group: &str, topic: &str) -> Vec<(i32, i64)> {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_as::<_, (i32, i64)>(
        "SELECT partition, next_offset FROM dwh_consumer_offsets WHERE group_id = $1 AND topic = $2 ORDER BY partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(&mut conn)
    .await
    .expect("offsets")
}

/// A PostgreSQL cluster of a test's own (to stop and start it), in a temp dir.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: std::path::PathBuf,
    pub port: u16,
    /// Server settings beyond the port and socket (TLS).
    extra: String,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        Self::start_with(None)
    }

    /// A cluster that takes TLS connections only, with the server certificate
    /// and key given (PEM): clear-text connections are refused by pg_hba.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> PgCluster {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&std::path::Path, &std::path::Path)>) -> PgCluster {
        let bindir = pg_bindir();
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres = is_root();
        if as_postgres {
            run(std::process::Command::new("chown").args(["postgres", &dir.path().display().to_string()]));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut cluster = PgCluster {
            dir,
            bindir,
            port,
            extra: String::new(),
        };
        cluster.pg(
            "initdb",
            &["-D", &cluster.data(), "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        if let Some((cert, key)) = tls {
            let data = std::path::PathBuf::from(cluster.data());
            std::fs::copy(cert, data.join("server.crt")).expect("server certificate");
            std::fs::copy(key, data.join("server.key")).expect("server key");
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("pg_hba.conf");
            // The server refuses a key others can read; it runs as postgres.
            run(std::process::Command::new("chmod").args(["600", &data.join("server.key").display().to_string()]));
            if is_root() {
                run(std::process::Command::new("chown").args(["-R", "postgres", &cluster.data()]));
            }
            cluster.extra = "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".to_owned();
        }
        cluster.up();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            self.dir.path().display(),
            self.extra
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-o", &options, "start"],
        );
    }

    pub fn down(&self) {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn pg(&self, program: &str, args: &[&str]) {
        let binary = self.bindir.join(program).display().to_string();
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &binary]);
            c
        } else {
            std::process::Command::new(&binary)
        };
        command.args(args);
        run(&mut command);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.pg("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"])
        }));
    }
}

fn run(command: &mut std::process::Command) {
    let output = command.output().expect("command runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The PostgreSQL server binaries: `pg_config --bindir`, else the newest under
/// /usr/lib/postgresql. Missing binaries fail the test.
fn pg_bindir() -> std::path::PathBuf {
    let from_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.join("initdb").exists());
    from_config
        .or_else(|| {
            let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("initdb").exists())
                .collect();
            dirs.sort();
            dirs.pop()
        })
        .expect("PostgreSQL server binaries (initdb, pg_ctl) are installed")
}

// ---------------------------------------------------------------------------
// S3: the test server (moto, started by scripts/test.sh), a bucket per test, and
// a TCP proxy that can take the store away.

/// The S3-protocol test server. Without it the S3 tests fail rather than skip.
pub fn s3_endpoint() -> String {
    std::env::var("DWH_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("DWH_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts an S3 server")
    })
}

/// S3 variables for a fresh bucket name on `endpoint`.
pub fn s3_env(endpoint: &str) -> Vec<(String, String)> {
    let bucket = format!(
        "test-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 1_000_000)
            .unwrap_or(0)
    );
    [
        ("S3_ENDPOINT_URL", endpoint.to_owned()),
        ("S3_ACCESS_KEY_ID", "test-key".to_owned()),
        ("S3_SECRET_ACCESS_KEY", "test-secret".to_owned()),
        ("S3_BUCKET_NAME", bucket),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A client of a new, empty bucket on the test server.
pub async fn s3_bucket(extra: &[(&str, &str)]) -> (dwh_helper::s3::S3, Config) {
    let mut env = s3_env(&s3_endpoint());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = Config::from_vars(env).expect("valid S3 configuration");
    let s3 = dwh_helper::s3::S3::new(&config.s3);
    s3.create_bucket().await.expect("bucket created");
    (s3, config)
}

/// Stores `data` at `key`.
pub async fn put_bytes(s3: &dwh_helper::s3::S3, key: &str, data: Vec<u8>) {
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(data))]);
    s3.put_object(key, stream, dwh_helper::s3::Put::default())
        .await
        .expect("object stored");
}

/// A TCP relay to `target` that can be stopped (connections refused and cut)
/// and started again on the same port.
pub struct TcpProxy {
    pub port: u16,
    target: String,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    watch: Option<std::sync::Arc<Watch>>,
}

/// What a watching relay sees of the requests sent through it: it counts the
/// reads that hold a text (a request line, say) and can hold the next request
/// that holds another until the test releases it.
pub struct Watch {
    needle: Vec<u8>,
    seen: std::sync::atomic::AtomicUsize,
    hold: std::sync::Mutex<Option<Hold>>,
}

struct Hold {
    needle: Vec<u8>,
    held: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

impl Watch {
    /// How many times the counted text went through.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// The next request holding `needle` waits: `held` fires when it arrives,
    /// and it goes on when `release` is sent (or dropped).
    pub fn hold_next(&self, needle: &str) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        *self.hold.lock().expect("lock") = Some(Hold {
            needle: needle.as_bytes().to_vec(),
            held: held_tx,
            release: release_rx,
        });
        (held_rx, release_tx)
    }

    async fn see(&self, chunk: &[u8]) {
        let holds = |needle: &[u8]| chunk.windows(needle.len()).filter(|w| *w == needle).count();
        self.seen.fetch_add(holds(&self.needle), Ordering::SeqCst);
        let hold = {
            let mut hold = self.hold.lock().expect("lock");
            match hold.as_ref() {
                Some(h) if holds(&h.needle) > 0 => hold.take(),
                _ => None,
            }
        };
        if let Some(hold) = hold {
            let _ = hold.held.send(());
            let _ = hold.release.await;
        }
    }
}

impl TcpProxy {
    pub async fn start(target: &str) -> TcpProxy {
        Self::bind(target, None).await
    }

    /// A relay that counts the requests holding `needle` (see [`Watch`]).
    pub async fn watching(target: &str, needle: &str) -> (TcpProxy, std::sync::Arc<Watch>) {
        let watch = std::sync::Arc::new(Watch {
            needle: needle.as_bytes().to_vec(),
            seen: Default::default(),
            hold: Default::default(),
        });
        (Self::bind(target, Some(watch.clone())).await, watch)
    }

    async fn bind(target: &str, watch: Option<std::sync::Arc<Watch>>) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let proxy = TcpProxy {
            port,
            target: target.to_owned(),
            tasks: Default::default(),
            watch,
        };
        proxy.serve(listener);
        proxy
    }

    /// The relay's address as an `http://` URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, tasks, watch) = (self.target.clone(), self.tasks.clone(), self.watch.clone());
        let accept = tokio::spawn({
            let tasks = tasks.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let (target, watch) = (target.clone(), watch.clone());
                    let relay = tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                            return;
                        };
                        match watch {
                            None => {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                            Some(watch) => {
                                let (from_client, to_client) = inbound.into_split();
                                let (from_store, to_store) = outbound.into_split();
                                tokio::join!(
                                    relay_watched(from_client, to_store, &watch),
                                    relay_bytes(from_store, to_client)
                                );
                            }
                        }
                    });
                    tasks.lock().expect("lock").push(relay.abort_handle());
                }
            }
        });
        tasks.lock().expect("lock").push(accept.abort_handle());
    }

    /// The store becomes unreachable: new connections are refused, open ones cut.
    pub fn stop(&self) {
        for task in self.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// The store is back, on the same port.
    pub async fn resume(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => return self.serve(listener),
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot rebind port {}: {e}",
                        self.port
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn relay_watched(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    watch: &Watch,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        watch.see(&buffer[..n]).await;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn relay_bytes(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    use tokio::io::AsyncWriteExt as _;
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

/// Peak and current resident memory of a process, in bytes (Linux).
pub fn memory_of(pid: u32) -> (u64, u64) {
    let status = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kib = |v: Option<u64>, name: &str| v.unwrap_or_else(|| panic!("{name} in /proc/{pid}/status")) * 1024;
    (kib(status.vmhwm, "VmHWM"), kib(status.vmrss, "VmRSS"))
}
