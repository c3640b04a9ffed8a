//! The `dwh-helper` binary as ops run it: configuration errors, `migrate`, `run`.

mod common;

use common::free_port;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dwh-helper");

/// The binary with a clean environment (no developer `.env` or variables leak in).
fn command(dir: &Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

fn run_to_end(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    command(dir, vars).args(args).output().expect("run dwh-helper")
}

#[test]
fn invalid_configuration_stops_with_exit_2_and_one_line() {
    let dir = tempfile::tempdir().expect("dir");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("DWH_MAX_ROWS_PER_INSERT", "abc")],
            "configuration error: DWH_MAX_ROWS_PER_INSERT: expected a positive integer, got \"abc\"",
        ),
        (
            &[("DWH_DATABASE_URL", "mysql://root:hunter2@x")],
            "configuration error: DWH_DATABASE_URL: unsupported scheme \"mysql\"; expected postgres://, postgresql:// or sqlite:",
        ),
        (
            &[("DWH_MAX_WRITE_BATCH_BYTES", "lots")],
            "configuration error: DWH_MAX_WRITE_BATCH_BYTES: expected a size in bytes such as 10485760 or 10MiB, got \"lots\"",
        ),
        (
            &[("HTTP_BIND", "0.0.0.0:8000")],
            "configuration error: HTTP_BIND: 0.0.0.0:8000 is reachable from other hosts; set HTTP_API_TOKEN to serve it, or bind 127.0.0.1",
        ),
        (&[("LOG_FORMAT", "xml")], "configuration error: LOG_FORMAT: expected \"pretty\" or \"json\", got \"xml\""),
        (
            &[("APPMETRICA_POLL_INTERVAL_SECONDS", "-1")],
            "configuration error: APPMETRICA_POLL_INTERVAL_SECONDS: expected a positive integer, got \"-1\"",
        ),
        (
            &[("S3_ENDPOINT_URL", "not a url")],
            "configuration error: S3_ENDPOINT_URL: expected an http(s) URL, got \"not a url\"",
        ),
    ];
    for (vars, expected) in cases {
        for subcommand in ["run", "migrate"] {
            let out = run_to_end(dir.path(), &[subcommand], vars);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{subcommand} {vars:?}: {stderr}");
            assert_eq!(stderr.trim_end(), *expected, "{subcommand} {vars:?}");
            assert!(!stderr.contains("hunter2"));
        }
    }
    assert!(!dir.path().join("dwh-helper.db").exists(), "nothing was started");
}

/// Issue 26: a typo in a variable's name used to leave the setting at its
/// default in silence (`DWH_DATABSE_URL` started on the default SQLite file).
#[test]
fn an_unknown_variable_is_refused_with_the_one_it_meant_unless_allowed() {
    let dir = tempfile::tempdir().expect("dir");
    let typo = [("DWH_DATABSE_URL", "postgres://dwh:hunter2@127.0.0.1:1/dwh")];
    for subcommand in ["run", "migrate"] {
        let out = run_to_end(dir.path(), &[subcommand], &typo);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            "configuration error: DWH_DATABSE_URL: unknown variable DWH_DATABSE_URL; did you mean DWH_DATABASE_URL?"
        );
    }
    assert!(
        !dir.path().join("dwh-helper.db").exists(),
        "nothing was started on the default database"
    );
    // Variables of others under the same prefixes pass: a Kubernetes Service
    // named kafka, librdkafka's pass-through, a proxy.
    let others = [
        ("KAFKA_PORT", "tcp://10.0.0.7:9092"),
        ("KAFKA_SERVICE_HOST", "10.0.0.7"),
        ("KAFKA_LIBRDKAFKA_CLIENT_RACK", "eu-1a"),
        ("HTTP_PROXY", "http://proxy:3128"),
    ];
    let out = run_to_end(dir.path(), &["migrate"], &others);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A shared environment lets unknown ones through, with a warning naming each.
    let allowed = [typo[0], ("DWH_ALLOW_UNKNOWN_VARIABLES", "true"), ("LOG_FORMAT", "json")];
    let out = run_to_end(dir.path(), &["migrate"], &allowed);
    let logged = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{logged}");
    let warned: Vec<serde_json::Value> = logged
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "unknown_variable")
        .collect();
    assert_eq!(warned.len(), 1, "{logged}");
    assert_eq!(warned[0]["variable"], "DWH_DATABSE_URL");
    assert_eq!(warned[0]["level"], "WARN");
    assert!(!logged.contains("hunter2"), "{logged}");
}

/// `config check`: every setting with its source, secrets redacted; exit 2
/// on any error, 0 when valid.
#[test]
fn config_check_shows_each_source_redacts_secrets_and_fails_on_errors() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join(".env"),
        "KAFKA_GROUP_ID=from-dotenv\nS3_SECRET_ACCESS_KEY=s3-secret-value\n",
    )
    .expect("write .env");
    let vars = [
        ("DWH_DATABASE_URL", "postgres://dwh:hunter2@db:5432/dwh"),
        ("KAFKA_GROUP_ID", "from-the-environment"),
    ];
    let out = run_to_end(dir.path(), &["config", "check"], &vars);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    let line = |name: &str| {
        shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} in {shown}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("DWH_DATABASE_URL"), "environment postgres://dwh:***@db:5432/dwh");
    assert_eq!(line("KAFKA_GROUP_ID"), "environment from-the-environment");
    assert_eq!(line("S3_SECRET_ACCESS_KEY"), ".env ***");
    assert_eq!(line("DWH_POOL_SIZE"), "default -");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3-secret-value"),
        "{shown}"
    );

    let out = run_to_end(
        dir.path(),
        &["config", "check"],
        &[("DWH_DATABSE_URL", "x"), ("DWH_POOL_SIZE", "0")],
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.contains("unknown: unknown variable DWH_DATABSE_URL; did you mean DWH_DATABASE_URL?"),
        "{shown}"
    );
    assert!(shown.contains("\nerror: "), "{shown}");
}

#[test]
fn a_dotenv_file_is_read_and_the_environment_wins() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join(".env"), "DWH_MAX_ROWS_PER_INSERT=abc\nLOG_FORMAT=xml\n").expect("write .env");
    let out = run_to_end(dir.path(), &["migrate"], &[("LOG_FORMAT", "json")]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "configuration error: DWH_MAX_ROWS_PER_INSERT: expected a positive integer, got \"abc\""
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run_to_end(dir.path(), &["run", "--roles", "teleport"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'teleport' for '--roles"));
    let out = run_to_end(dir.path(), &["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("migrate"), "{help}");
}

#[tokio::test]
async fn migrate_applies_the_schema_once_and_is_idempotent() {
    let url = common::fresh_pg_url().await;
    let dir = tempfile::tempdir().expect("dir");
    for _ in 0..2 {
        let out = run_to_end(dir.path(), &["migrate"], &[("DWH_DATABASE_URL", &url)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace = 'public'::regnamespace \
         AND relname NOT LIKE '\\_sqlx%' AND relname NOT LIKE 'events\\_part\\_%' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("tables");
    assert_eq!(
        tables,
        [
            "dwh_appmetrica_windows",
            "dwh_consumer_offsets",
            "dwh_ingest_members",
            "dwh_offset_gaps",
            "dwh_rejected_records",
            "dwh_replays",
            "events_part",
            "mobile_devices",
            "permanent_user_properties",
            "technical_data",
            "tmp_event_properties",
            "tmp_user_properties",
            "user_locations"
        ]
    );
}

/// Issue 24: a rollback (or an old replica during a rollout) meets a migration
/// of a newer release. Before, the start failed with "previously applied but is
/// missing", a crash loop. Additive migrations are accepted with a warning that
/// names them; one marked breaking stops the start, before anything is applied.
#[tokio::test]
async fn an_older_release_starts_on_a_newer_additive_schema_and_refuses_a_breaking_one() {
    let dir = tempfile::tempdir().expect("dir");
    let sqlite = format!("sqlite://{}/dwh.db", dir.path().display());
    for url in [common::fresh_pg_url().await, sqlite] {
        let vars = [("DWH_DATABASE_URL", url.as_str()), ("LOG_FORMAT", "json")];
        let out = run_to_end(dir.path(), &["migrate"], &vars);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // What a newer release would have recorded: a migration this one lacks.
        let newer = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                     VALUES (9001, 'add a column of a newer release', TRUE, X'00', 0)";
        execute(&url, &newer.replace("X'00'", checksum_literal(&url))).await;
        let out = run_to_end(dir.path(), &["migrate"], &vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{url}: {stderr}");
        let ahead: Vec<serde_json::Value> = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "migrations_ahead")
            .collect();
        assert_eq!(ahead.len(), 1, "{url}: {stderr}");
        assert!(
            ahead[0]["migrations"]
                .to_string()
                .contains("9001 add a column of a newer release"),
            "{url}: {}",
            ahead[0]
        );
        // A breaking one: the start stops and names it.
        let breaking = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                        VALUES (9002, 'breaking: drop a column', TRUE, X'00', 0)";
        execute(&url, &breaking.replace("X'00'", checksum_literal(&url))).await;
        let out = run_to_end(dir.path(), &["migrate"], &vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(
            stderr.contains("migration 9002 (breaking: drop a column) from a newer release, marked breaking"),
            "{url}: {stderr}"
        );
    }
}

/// A one-byte checksum in the backend's literal form.
fn checksum_literal(url: &str) -> &'static str {
    if url.starts_with("sqlite") {
        "X'00'"
    } else {
        "'\\x00'::bytea"
    }
}

/// Runs one statement on PostgreSQL or SQLite.
async fn execute(url: &str, sql: &str) {
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
        sqlx::query(sql)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        sqlx::query(sql)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
    }
}

#[test]
fn migrate_reports_an_unreachable_database_without_its_password() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run_to_end(
        dir.path(),
        &["migrate"],
        &[("DWH_DATABASE_URL", "postgres://app:pw-hidden@127.0.0.1:1/dwh")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(!stderr.contains("pw-hidden"), "{stderr}");
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// `run` with no configuration at all (but a free port): SQLite in the working
/// directory, migrations applied, API served, SIGTERM stops it with exit 0.
#[tokio::test]
async fn run_works_with_no_configuration_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let bind = format!("127.0.0.1:{}", free_port());
    let mut child = command(dir.path(), &[("HTTP_BIND", &bind)])
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let base = format!("http://{bind}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "API did not become ready");
        assert!(child.try_wait().expect("status").is_none(), "run exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let posted: serde_json::Value = client
        .post(format!("{base}/dwh/user-locations"))
        .json(&serde_json::json!({ "data": common::locations(3) }))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(posted["count"], 3, "{posted}");
    assert!(
        dir.path().join("dwh-helper.db").exists(),
        "the default SQLite file is in the working directory"
    );

    terminate(&child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("status") {
            break status;
        }
        assert!(Instant::now() < deadline, "run did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));

    // The rows survive a restart.
    let mut child = command(dir.path(), &[("HTTP_BIND", &bind)])
        .args(["run", "--no-migrate"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body: serde_json::Value = loop {
        if let Ok(r) = client.get(format!("{base}/dwh/user_locations")).send().await {
            break r.json().await.expect("json");
        }
        assert!(Instant::now() < deadline, "API did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["count"], 3);
    terminate(&child);
    let _ = child.wait();
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run_to_end(
        dir.path(),
        &["migrate"],
        &[("LOG_FORMAT", "json"), ("LOG_LEVEL", "info")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "migrations applied" && l["level"] == "INFO"),
        "{stderr}"
    );
}

/// `demo --bind` follows the rule of HTTP_BIND: other hosts only with a token.
#[test]
fn demo_refuses_to_serve_other_hosts_without_a_token() {
    let dir = tempfile::tempdir().expect("dir");
    let output = run_to_end(
        dir.path(),
        &["demo", "--rows", "10", "--bind", "0.0.0.0:0", "--exit-after-summary"],
        &[("LOG_LEVEL", "warn")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:0 is reachable from other hosts; set HTTP_API_TOKEN"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("ran end to end"));
}

#[test]
fn demo_runs_sample_data_through_the_pipeline_and_prints_a_summary() {
    let dir = tempfile::tempdir().expect("dir");
    let output = run_to_end(
        dir.path(),
        &["demo", "--rows", "300", "--bind", "127.0.0.1:0", "--exit-after-summary"],
        &[("LOG_LEVEL", "warn")],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for table in dwh_helper::catalogue::Table::ALL {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(table.name()))
            .unwrap_or_else(|| panic!("{table} in the summary:\n{stdout}"));
        assert_eq!(line.split_whitespace().nth(1), Some("300"), "{line}");
    }
    let rejects = stdout
        .lines()
        .find(|l| l.contains("rejected records"))
        .expect("rejects line");
    assert_eq!(
        rejects.split_whitespace().last(),
        Some("7"),
        "one invalid record of each kind"
    );
    assert!(stdout.contains("curl 'http://127.0.0.1:"), "{stdout}");
    // The demo ends with `status` of what it loaded: every partition caught up.
    assert!(
        stdout.contains("`dwh-helper status` of this DWH and broker"),
        "{stdout}"
    );
    assert!(stdout.contains("\n  all caught up\n"), "the status verdict:\n{stdout}");
    assert!(
        !dir.path().join("dwh-helper.db").exists(),
        "the demo leaves no database behind"
    );
    // A newcomer's first run warns only about the data: the seven invalid
    // records, nothing about the pipeline (no SQLite lock waits reported as
    // slow statements).
    let stderr = String::from_utf8_lossy(&output.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert_eq!(
        warnings.iter().filter(|l| l.contains("record rejected")).count(),
        7,
        "{stderr}"
    );
    let others: Vec<&&str> = warnings.iter().filter(|l| !l.contains("record rejected")).collect();
    assert!(others.is_empty(), "warnings not about the data: {others:#?}");
}

#[test]
fn dev_broker_help_states_the_partition_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let output = run_to_end(dir.path(), &["dev-broker", "--help"], &[]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("at most 5 MiB"), "{help}");
    assert!(help.contains("--partitions"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_broker_serves_a_fixed_port_and_produce_validates_before_publishing() {
    use std::io::{BufRead as _, BufReader};
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut broker = command(dir.path(), &[])
        .args([
            "dev-broker",
            "--partitions",
            "3",
            "--topic-prefix",
            "cli.",
            "--port",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dev-broker starts");
    let mut first = String::new();
    BufReader::new(broker.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("first line");
    let bootstrap = first.trim().to_owned();
    assert_eq!(bootstrap, format!("127.0.0.1:{port}"));
    produce_validates_before_publishing(dir.path(), &bootstrap, "cli.").await;

    terminate(&broker);
    let status = broker.wait().expect("dev-broker exits");
    assert!(status.success(), "dev-broker stops cleanly on SIGTERM: {status:?}");
}

/// `produce` refuses a file with an invalid line and publishes nothing, publishes
/// the valid lines with `--skip-invalid`, and reads standard input, against the
/// broker at `bootstrap` whose `prefix` topics exist.
async fn produce_validates_before_publishing(dir: &Path, bootstrap: &str, prefix: &str) {
    let topic = format!("{prefix}user_locations");
    let vars = [("KAFKA_BOOTSTRAP_SERVERS", bootstrap), ("KAFKA_TOPIC_PREFIX", prefix)];
    let config = common::config_for("sqlite::memory:", &vars);
    let published = || async {
        common::watermarks(&config, &topic)
            .await
            .iter()
            .map(|w| w.high)
            .sum::<i64>()
    };

    let mut lines: Vec<String> = dwh_helper::sample::records(dwh_helper::catalogue::Table::UserLocations, 3, 9)
        .iter()
        .map(|r| r.to_string())
        .collect();
    lines.insert(1, r#"{"uuid": "not-a-uuid"}"#.to_owned());
    lines.insert(3, String::new());
    let file = dir.join("locations.jsonl");
    std::fs::write(&file, lines.join("\n")).expect("write input");

    let refused = run_to_end(dir, &["produce", "--table", "user_locations", "locations.jsonl"], &vars);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 2: field \"uuid\""), "{stderr}");
    assert!(stderr.contains("nothing published: 1 invalid line(s)"), "{stderr}");
    assert_eq!(published().await, 0, "nothing published while a line is invalid");

    let skipped = run_to_end(
        dir,
        &[
            "produce",
            "--table",
            "user-locations",
            "--skip-invalid",
            "locations.jsonl",
        ],
        &vars,
    );
    assert!(skipped.status.success(), "{}", String::from_utf8_lossy(&skipped.stderr));
    assert_eq!(
        String::from_utf8_lossy(&skipped.stdout).trim(),
        format!("published 3 records to {topic}")
    );
    assert_eq!(published().await, 3);

    let mut stdin = command(dir, &vars)
        .args(["produce", "--table", "user_locations", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("produce from stdin");
    {
        use std::io::Write as _;
        let mut input = stdin.stdin.take().expect("stdin");
        writeln!(input, "{}", lines[0]).expect("write");
    }
    let from_stdin = stdin.wait_with_output().expect("produce ends");
    assert!(from_stdin.status.success());
    assert_eq!(
        published().await,
        4,
        "standard input is published too (same key: same record)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_validates_before_publishing_to_kafka() {
    let dir = tempfile::tempdir().expect("dir");
    let (broker, prefix) = common::broker_with(&[(dwh_helper::catalogue::Table::UserLocations, 3)]).await;
    produce_validates_before_publishing(dir.path(), broker.bootstrap_servers(), &prefix).await;
}

/// Every variable the configuration reads is documented in `.env.example` and the
/// README (the promise that `.env.example` lists every variable).
#[test]
fn every_configuration_variable_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join(".env.example")).expect(".env.example");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    // The names every setting reads, from the settings' own definitions.
    let names = dwh_helper::config::known_variables();
    assert!(names.len() >= 25, "found the variables: {names:?}");
    for name in &names {
        assert!(example.contains(&format!("{name}=")), ".env.example lacks {name}");
        let short = name
            .rsplit_once('_')
            .map(|(_, tail)| format!("_{tail}`"))
            .unwrap_or_default();
        assert!(
            readme.contains(&format!("`{name}`")) || readme.contains(name) || readme.contains(&short),
            "README lacks {name}"
        );
    }
}

/// The AppMetrica bench runs end to end on a small export and reports memory.
#[test]
fn appmetrica_bench_reports_rows_and_peak_memory() {
    let dir = tempfile::tempdir().expect("dir");
    let output = run_to_end(
        dir.path(),
        &["bench", "--scenario", "appmetrica", "--mb", "3", "--json"],
        &[],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["scenario"], "appmetrica");
    assert!(report["rows"].as_u64().is_some_and(|r| r > 5_000), "{report}");
    assert!(
        report["peak_rss_mib"].as_f64().is_some_and(|m| m > 1.0 && m < 200.0),
        "{report}"
    );
}

/// The API memory bench drives a real API process with concurrent large POSTs
/// (over the body limit: refused early) and uploads (stored), and reports each
/// phase's peak RSS.
#[test]
fn api_memory_bench_reports_answers_and_peak_memory_per_phase() {
    let dir = tempfile::tempdir().expect("dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_, config) = runtime.block_on(common::s3_bucket(&[]));
    let endpoint = common::s3_endpoint();
    let output = run_to_end(
        dir.path(),
        &[
            "bench",
            "--scenario",
            "api-memory",
            "--clients",
            "3",
            "--post-mb",
            "20",
            "--upload-mb",
            "6",
            "--json",
        ],
        &[
            ("S3_ENDPOINT_URL", &endpoint),
            ("S3_ACCESS_KEY_ID", "test-key"),
            ("S3_SECRET_ACCESS_KEY", "test-secret"),
            ("S3_BUCKET_NAME", &config.s3.bucket_name),
        ],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["scenario"], "api-memory");
    let (posts, uploads) = (&report["phases"][0], &report["phases"][1]);
    // 20 MiB is over HTTP_TABLES_MAX_BODY_BYTES (16 MiB): nothing is accepted.
    let answered: u64 = posts["answers"]
        .as_object()
        .expect("answers")
        .values()
        .filter_map(|n| n.as_u64())
        .sum();
    assert_eq!(answered, 3, "{report}");
    assert!(posts["answers"]["413"].as_u64().is_some_and(|n| n >= 1), "{report}");
    assert!(posts["answers"].get("200").is_none(), "{report}");
    assert_eq!(uploads["answers"]["201"], 3, "{report}");
    for phase in [posts, uploads] {
        assert!(
            phase["peak_rss_mib"].as_f64().is_some_and(|m| m > 1.0 && m < 1024.0),
            "{report}"
        );
    }
}

/// A CA (`ca.pem`, `ca.key`) and a server certificate for 127.0.0.1 and
/// localhost signed by it (`server.crt`, `server.key`), made with openssl in
/// `dir`; `prefix` names the CA's files.
fn make_ca_and_server(dir: &Path, ca: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (ca_key, ca_pem) = (format!("{ca}.key"), format!("{ca}.pem"));
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-subj",
        &format!("/CN=dwh-helper test {ca}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    if ca != "ca" {
        return;
    }
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.crt",
        "-extfile",
        "server.ext",
    ]);
}

/// The `error:` lines a failed command printed (one, when an error is told
/// once), and whether its message names `words`.
fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_owned)
        .collect()
}

/// Issue 26: managed PostgreSQL that enforces TLS could not be reached (sqlx
/// was built without TLS), and the error printed its cause four times, twice
/// over. Here a server that takes TLS connections only (pg_hba refuses clear
/// text), with a certificate of a CA the test makes.
#[test]
fn postgres_over_tls_verify_full_connects_and_a_wrong_ca_or_a_server_without_tls_fails_in_one_line() {
    let certs = tempfile::tempdir().expect("dir");
    make_ca_and_server(certs.path(), "ca");
    make_ca_and_server(certs.path(), "other-ca");
    let cluster = common::PgCluster::start_tls(&certs.path().join("server.crt"), &certs.path().join("server.key"));
    let dir = tempfile::tempdir().expect("dir");
    let url = |query: &str| format!("postgres://postgres@127.0.0.1:{}/postgres?{query}", cluster.port);
    let ca = certs.path().join("ca.pem").display().to_string();

    // The certificate checked against the CA, and its name against the host.
    let verified = url(&format!("sslmode=verify-full&sslrootcert={ca}"));
    let out = run_to_end(dir.path(), &["migrate"], &[("DWH_DATABASE_URL", &verified)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Clear text is refused by this server: the connection above was TLS.
    let clear = url("sslmode=disable");
    let out = run_to_end(dir.path(), &["migrate"], &[("DWH_DATABASE_URL", &clear)]);
    let errors = error_lines(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(errors.len() == 1 && errors[0].contains("no encryption"), "{errors:?}");

    // A certificate of a CA not trusted: one line naming the TLS failure.
    let other = certs.path().join("other-ca.pem").display().to_string();
    let wrong = url(&format!("sslmode=verify-full&sslrootcert={other}"));
    let out = run_to_end(dir.path(), &["migrate"], &[("DWH_DATABASE_URL", &wrong)]);
    let errors = error_lines(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(errors.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        errors[0].contains("invalid peer certificate: UnknownIssuer"),
        "{errors:?}"
    );
    assert_eq!(
        errors[0].matches("UnknownIssuer").count(),
        1,
        "the cause told once: {errors:?}"
    );

    // TLS required of the suite's server, which has none: one line.
    let plain = common::pg_admin_url();
    let sep = if plain.contains('?') { '&' } else { '?' };
    let required = format!("{plain}{sep}sslmode=require");
    let out = run_to_end(dir.path(), &["migrate"], &[("DWH_DATABASE_URL", &required)]);
    let errors = error_lines(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(errors.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(errors[0].contains("TLS"), "{errors:?}");
}
