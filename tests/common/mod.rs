//! Shared test set-up: real databases and a real HTTP server on loopback.
//!
//! PostgreSQL comes from `DWH_TEST_DATABASE_URL` (scripts/test.sh starts a throwaway
//! cluster and sets it). Without it the tests fail rather than skip: a suite that
//! silently skips its database tests would pass while testing nothing.
#![allow(dead_code)]

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
        let app = http::router(AppState::new(dwh, &config.http), config.http.max_body_bytes);
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, app, stop.clone()));
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
