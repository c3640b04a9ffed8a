//! AppMetrica end to end: a local server plays the Logs API (faults included), the
//! poller or `appmetrica export` publishes to the dev broker, the ingest role
//! lands the rows in a real PostgreSQL.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::logs_api::{self, LogsApi, Script, Step};
use common::*;
use dwh_helper::config::Config;
use dwh_helper::store::Dwh;

struct Setup {
    api: LogsApi,
    env: Vec<(String, String)>,
    config: Config,
    url: String,
    broker: TestBroker,
    ingest: InProcessIngest,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    setup_on(broker(4).await, extra).await
}

async fn setup_on((broker, prefix): (TestBroker, String), extra: &[(&str, &str)]) -> Setup {
    let api = LogsApi::start().await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    env.extend(
        [
            ("APPMETRICA_BASE_URL", api.base.as_str()),
            ("APPMETRICA_API_KEY", "test-token"),
            ("APPMETRICA_APPLICATION_ID", "4242"),
            ("APPMETRICA_POLL_INTERVAL_SECONDS", "1"),
            ("APPMETRICA_POLL_TIMEOUT_SECONDS", "30"),
            ("APPMETRICA_ENDPOINTS", "events"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    for (k, v) in extra {
        set_env(&mut env, k, v);
    }
    let config = config_from(&env, &[]);
    let dwh = Dwh::connect(&config.dwh).expect("pool");
    dwh.migrate().await.expect("migrations");
    let ingest = InProcessIngest::start(config.clone(), dwh);
    Setup {
        api,
        env,
        config,
        url,
        broker,
        ingest,
    }
}

/// `dwh-helper appmetrica export` for `from..=to` as a child process.
async fn export(env: &[(String, String)], from: &str, to: &str) -> std::process::Output {
    let env = env.to_vec();
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
            .args([
                "appmetrica",
                "export",
                "--from",
                &from,
                "--to",
                &to,
                "--endpoint",
                "events",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .output()
            .expect("export runs")
    })
    .await
    .expect("export task")
}

async fn count(url: &str, table: &str) -> i64 {
    pg_count(url, &format!("SELECT count(*) FROM {table}"))
        .await
        .unwrap_or(-1)
}

async fn landed(url: &str, table: &str, n: i64) {
    wait_for(Duration::from_secs(60), &format!("{n} rows in {table}"), || async {
        (count(url, table).await == n).then_some(())
    })
    .await;
    // And nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count(url, table).await, n, "{table}");
}

fn script(steps: Vec<Step>, rows: Vec<serde_json::Value>) -> Script {
    Script {
        steps: VecDeque::from(steps),
        rows,
        ..Script::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_answered_202_three_times_is_published_once_by_the_poller_and_lands() {
    let yesterday = (chrono::Utc::now().date_naive() - chrono::Duration::days(1)).to_string();
    let s = setup(&[("APPMETRICA_START_DATE", &yesterday)]).await;
    let rows = logs_api::events(&yesterday, 60, 1, 0);
    s.api.script(
        "events",
        &yesterday,
        script(vec![Step::Preparing, Step::Preparing, Step::Preparing], rows),
    );
    let poller = Child::run(&s.env, "appmetrica");
    landed(&s.url, "events_part", 60).await;
    landed(&s.url, "tmp_event_properties", 60).await;
    landed(&s.url, "mobile_devices", 50).await;
    wait_for(Duration::from_secs(30), "the window to be done", || async {
        pg_count(
            &s.url,
            "SELECT rows_published FROM dwh_appmetrica_windows WHERE status = 'done'",
        )
        .await
        .filter(|n| *n == 180)
    })
    .await;
    let requests = s.api.seen();
    assert_eq!(requests.len(), 4, "three 202s, then the data, and no second fetch");
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some("OAuth test-token")));
    let q = &requests[0].query;
    assert_eq!(q["application_id"], "4242");
    assert_eq!(q["date_since"], format!("{yesterday} 00:00:00"));
    assert_eq!(q["date_until"], format!("{yesterday} 23:59:59"));
    assert!(q["fields"].contains("event_json"));
    let ends: i64 = watermarks(&s.config, &format!("{}events_part", s.config.kafka.topic_prefix))
        .await
        .iter()
        .map(|w| w.high)
        .sum();
    assert_eq!(ends, 60, "each event published once");
    // Typed values from strings: mcc is an integer, the date is the event's.
    assert_eq!(
        pg_count(
            &s.url,
            "SELECT count(*) FROM events_part WHERE mcc = 250 AND app_build_number = 51200"
        )
        .await,
        Some(60)
    );
    let status = poller.terminate(Duration::from_secs(20)).expect("stops");
    assert!(status.success(), "SIGTERM stops the poller cleanly");
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_server_errors_drops_and_truncations_are_retried_to_the_right_data() {
    let s = setup(&[]).await;
    let faults = [
        (
            "2024-03-01",
            Step::Status(429, "{\"errors\":[{\"message\":\"too many requests\"}]}"),
        ),
        ("2024-03-02", Step::Status(500, "internal error")),
        ("2024-03-03", Step::Drop),
        ("2024-03-04", Step::Truncated),
    ];
    let mut total = 0;
    for (i, (day, fault)) in faults.iter().enumerate() {
        let rows = logs_api::events(day, 40 + i * 10, 10 + i as u64, 0);
        total += rows.len() as i64;
        s.api.script("events", day, script(vec![fault.clone()], rows));
    }
    let output = export(&s.env, "2024-03-01", "2024-03-04").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("exported 4 day(s) of events"));
    landed(&s.url, "events_part", total).await;
    let per_day = |day: &str| {
        s.api
            .seen()
            .iter()
            .filter(|r| r.query["date_since"].starts_with(day))
            .count()
    };
    for (day, _) in &faults {
        assert_eq!(per_day(day), 2, "{day}: the fault, then one good fetch");
    }
    assert_eq!(
        pg_count(
            &s.url,
            "SELECT count(*) FROM dwh_appmetrica_windows WHERE status = 'done'"
        )
        .await,
        Some(4)
    );
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_token_stops_with_a_clear_error_and_no_retry() {
    let mut s = setup(&[]).await;
    set_env(&mut s.env, "APPMETRICA_API_KEY", "wrong-token");
    s.api.script(
        "events",
        "2024-03-01",
        script(vec![], logs_api::events("2024-03-01", 5, 1, 0)),
    );
    let output = export(&s.env, "2024-03-01", "2024-03-01").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the AppMetrica token is invalid or lacks access to application 4242 (HTTP 401)"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-token"), "the token is never printed");
    assert_eq!(s.api.seen().len(), 1, "never retried");
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_never_ready_times_out_naming_the_window() {
    let s = setup(&[("APPMETRICA_POLL_TIMEOUT_SECONDS", "2")]).await;
    s.api.script(
        "events",
        "2024-03-05",
        script(vec![Step::Preparing; 30], logs_api::events("2024-03-05", 5, 1, 0)),
    );
    let output = export(&s.env, "2024-03-05", "2024-03-05").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("export events 2024-03-05 was not ready after"),
        "{stderr}"
    );
    assert_eq!(
        pg_count(
            &s.url,
            "SELECT count(*) FROM dwh_appmetrica_windows WHERE status = 'failed' AND error LIKE '%not ready%'"
        )
        .await,
        Some(1)
    );
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_too_large_is_fetched_in_parts_and_lands_once() {
    let s = setup(&[]).await;
    let mut window = script(vec![], logs_api::events("2024-03-06", 90, 3, 0));
    window.min_parts = 4;
    s.api.script("events", "2024-03-06", window);
    let output = export(&s.env, "2024-03-06", "2024-03-06").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("in 4 parts"), "{stderr}");
    landed(&s.url, "events_part", 90).await;
    let asked: Vec<(String, String)> = s
        .api
        .seen()
        .iter()
        .map(|r| {
            (
                r.query.get("parts_count").cloned().unwrap_or_else(|| "1".into()),
                r.query.get("part_number").cloned().unwrap_or_else(|| "0".into()),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [("1", "0"), ("2", "0"), ("4", "0"), ("4", "1"), ("4", "2"), ("4", "3")]
        .map(|(c, n)| (c.to_owned(), n.to_owned()))
        .to_vec();
    assert_eq!(asked, expected);
    // `appmetrica status` shows the window.
    let env = s.env.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
            .args(["appmetrica", "status"])
            .env_clear()
            .envs(env)
            .output()
            .expect("status runs")
    })
    .await
    .expect("status task");
    let listing = String::from_utf8_lossy(&status.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with("events"))
        .expect("a window line");
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns[..5], ["events", "2024-03-06", "done", "90", "270"], "{listing}");
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installations_and_profiles_feed_devices_and_user_properties() {
    let s = setup(&[("APPMETRICA_ENDPOINTS", "installations,profiles_v2")]).await;
    let installs: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "appmetrica_device_id": (9_000_000_000_000_000_000u64 + i).to_string(),
                "install_timestamp": (1_709_300_000 + i).to_string(),
                "install_receive_timestamp": (1_709_300_060 + i).to_string(),
                "os_name": "ios", "device_model": "iPhone 15", "mcc": "250"
            })
        })
        .collect();
    let profiles: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            serde_json::json!({
                "profile_id": format!("p{i}"), "gender": "female", "notifications_enabled": "true",
                "birth_date": "1990-01-01", "plan": if i % 2 == 0 { "gold" } else { "free" }, "visits": i
            })
        })
        .collect();
    s.api.script("installations", "2024-03-08", script(vec![], installs));
    s.api.script("profiles_v2", "2024-03-08", script(vec![], profiles));
    let env = s.env.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
            .args(["appmetrica", "export", "--from", "2024-03-08", "--to", "2024-03-08"])
            .env_clear()
            .envs(env)
            .output()
            .expect("export runs")
    })
    .await
    .expect("export task");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    landed(&s.url, "mobile_devices", 20).await;
    landed(&s.url, "permanent_user_properties", 10).await;
    landed(&s.url, "tmp_user_properties", 20).await;
    assert_eq!(
        pg_count(
            &s.url,
            "SELECT count(*) FROM mobile_devices WHERE last_seen_at - first_seen_at = interval '60 seconds'"
        )
        .await,
        Some(20)
    );
    assert_eq!(
        pg_count(&s.url, "SELECT count(*) FROM tmp_user_properties WHERE property_name = 'plan' AND value_text = 'gold' AND snapshot_date = '2024-03-08'").await,
        Some(5)
    );
    assert_eq!(
        pg_count(
            &s.url,
            "SELECT count(*) FROM permanent_user_properties WHERE notifications_enabled AND gender = 'female'"
        )
        .await,
        Some(10)
    );
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refetched_window_adds_only_late_rows_and_keeps_identical_events_apart() {
    let s = setup(&[]).await;
    // 30 rows of which the last 2 repeat the first 2 exactly: 30 distinct rows.
    let first = logs_api::events("2024-03-07", 30, 4, 2);
    s.api.script("events", "2024-03-07", script(vec![], first.clone()));
    assert!(export(&s.env, "2024-03-07", "2024-03-07").await.status.success());
    landed(&s.url, "events_part", 30).await;
    assert_eq!(
        pg_count(&s.url, "SELECT count(*) FROM events_part WHERE dup_seq = 1").await,
        Some(2)
    );

    // Late data: the same window again, with 5 more events, in another order.
    let mut again: Vec<serde_json::Value> = logs_api::events("2024-03-07", 5, 99, 0);
    again.extend(first.iter().rev().cloned());
    s.api.script("events", "2024-03-07", script(vec![], again));
    assert!(export(&s.env, "2024-03-07", "2024-03-07").await.status.success());
    landed(&s.url, "events_part", 35).await;
    landed(&s.url, "tmp_event_properties", 35).await;
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poller_killed_half_way_through_a_window_fetches_it_again_exactly_once() {
    let day = (chrono::Utc::now().date_naive() - chrono::Duration::days(1)).to_string();
    let s = setup(&[("APPMETRICA_START_DATE", &day)]).await;
    let rows = logs_api::events(&day, 400, 5, 0);
    let mut slow = script(vec![], rows.clone());
    slow.row_delay = Some(Duration::from_millis(10));
    s.api.script("events", &day, slow);
    let topic = format!("{}events_part", s.config.kafka.topic_prefix);
    let poller = Child::run(&s.env, "appmetrica");
    // Kill it once part of the window is published.
    wait_for(Duration::from_secs(60), "half a window published", || async {
        let published: i64 = watermarks(&s.config, &topic).await.iter().map(|w| w.high).sum();
        (published >= 100).then_some(())
    })
    .await;
    poller.crash();
    let published: i64 = watermarks(&s.config, &topic).await.iter().map(|w| w.high).sum();
    assert!(published < 400, "killed before the end of the window ({published})");
    assert_eq!(
        pg_count(
            &s.url,
            "SELECT count(*) FROM dwh_appmetrica_windows WHERE status = 'done'"
        )
        .await,
        Some(0),
        "a half-published window is not done"
    );
    // The restarted poller fetches the window again, whole.
    let mut fast = script(vec![], rows);
    fast.row_delay = None;
    s.api.script("events", &day, fast);
    let poller = Child::run(&s.env, "appmetrica");
    wait_for(Duration::from_secs(60), "the window to be done", || async {
        pg_count(
            &s.url,
            "SELECT count(*) FROM dwh_appmetrica_windows WHERE status = 'done'",
        )
        .await
        .filter(|n| *n == 1)
    })
    .await;
    landed(&s.url, "events_part", 400).await;
    let status = poller.terminate(Duration::from_secs(20)).expect("stops");
    assert!(status.success());
    s.ingest.stop().await;
}

/// The Kafka broker is down while an export is published: the idempotent
/// producer waits it out, the export completes, and every event lands once.
/// On the mock cluster: the suite's Kafka broker is shared by every test and
/// cannot be taken down for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_published_while_the_broker_is_down_completes_once_it_is_back() {
    let s = setup_on(mock_broker(4).await, &[]).await;
    let day = "2024-03-05";
    let rows = logs_api::events(day, 300, 31, 0);
    s.api.script("events", day, script(vec![Step::Preparing], rows));
    s.broker.set_broker_up(1, false).expect("broker down");
    let exporting = tokio::spawn({
        let env = s.env.clone();
        async move { export(&env, day, day).await }
    });
    // The export fetches (one 202, then the data) and publishes into the outage.
    wait_for(Duration::from_secs(30), "the export to be fetched", || async {
        (s.api.seen().len() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!exporting.is_finished(), "the export waits for the broker");
    s.broker.set_broker_up(1, true).expect("broker up");
    let output = exporting.await.expect("export task");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    landed(&s.url, "events_part", 300).await;
    let ends: i64 = watermarks(&s.config, &format!("{}events_part", s.config.kafka.topic_prefix))
        .await
        .iter()
        .map(|w| w.high)
        .sum();
    assert_eq!(ends, 300, "each event published once");
    s.ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_window_is_one_span_with_a_child_span_per_logs_api_request() {
    let (endpoint, received) = common::otlp::receiver().await;
    let s = setup(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    let day = "2024-03-06";
    s.api.script(
        "events",
        day,
        script(vec![Step::Preparing, Step::Preparing], logs_api::events(day, 20, 3, 0)),
    );
    let output = export(&s.env, day, day).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The export flushes its spans before it exits.
    let spans = received.lock().expect("lock").spans.clone();
    let window = spans
        .iter()
        .find(|span| span.name == "appmetrica_window")
        .unwrap_or_else(|| {
            panic!(
                "a window span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(common::otlp::attribute(window, "endpoint").as_deref(), Some("events"));
    let mut polls: Vec<String> = spans
        .iter()
        .filter(|span| span.name == "appmetrica_poll" && span.parent_span_id == window.span_id)
        .map(|span| common::otlp::attribute(span, "status").unwrap_or_default())
        .collect();
    polls.sort();
    assert_eq!(polls, ["200", "202", "202"], "two polls answered 202, then the data");
    s.ingest.stop().await;
}
