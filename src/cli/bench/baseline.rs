//! The ceiling every scenario is compared against: a plain `COPY` of the same
//! rows into an empty copy of events_part on a scratch database, with the
//! database settled before each measured phase.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sqlx::{ConnectOptions as _, Connection as _};

use serde_json::Value;

use super::probe::cpu_seconds;
use crate::catalogue::{decode_json, Table};
use crate::config::{Backend, DatabaseUrl};
use crate::store::sql;

/// Brings the scratch database to the same quiet state before each measured
/// phase, so that neither pays for the other's leftovers: `VACUUM (ANALYZE)` of
/// the tables written so far (else autovacuum may start on them in the middle of
/// the next phase) and a `CHECKPOINT` (else one may fall due in it). A role not
/// allowed to run `CHECKPOINT` skips it.
pub(super) async fn settle(url: &DatabaseUrl, tables: &[&str]) -> anyhow::Result<()> {
    if url.backend() != Backend::Postgres {
        return Ok(());
    }
    // A vacuum takes seconds: not a slow statement worth a warning here.
    let mut conn = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url.expose())?
        .log_slow_statements(log::LevelFilter::Off, Duration::ZERO)
        .connect()
        .await?;
    for table in tables {
        sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot vacuum {table} before the next phase"))?;
    }
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut conn).await {
        tracing::debug!(error = %e, "no checkpoint before the next phase");
    }
    Ok(())
}

/// One plain COPY's time, and the CPU its backend spent (when the server runs
/// on this machine).
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct CopyRun {
    pub(super) seconds: f64,
    pub(super) postgres_seconds: Option<f64>,
}

/// The ceiling a scenario is compared against: one plain `COPY` of the same rows
/// into an empty copy of events_part (same columns, defaults and indexes), run
/// right before the scenario and again right after it. This machine's speed
/// drifts by a third within minutes, so the ratio uses the mean of the two
/// times, and both are reported.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Baseline {
    pub(super) before: CopyRun,
    pub(super) after: CopyRun,
}

impl Baseline {
    pub(super) fn seconds(&self) -> f64 {
        (self.before.seconds + self.after.seconds) / 2.0
    }

    /// The table row: the mean rate, then each run.
    pub(super) fn print(&self, rows: usize, label: &str, ratio_label: &str, contender_rows_per_second: f64) {
        let rate = rows as f64 / self.seconds();
        let run = |r: &CopyRun| match r.postgres_seconds {
            Some(cpu) => format!("{:.2} s ({cpu:.1} s CPU)", r.seconds),
            None => format!("{:.2} s", r.seconds),
        };
        println!(
            "{label:<w$}{rate:>10.0} rows/s  before {}, after {}",
            run(&self.before),
            run(&self.after),
            w = ratio_label.len().max(label.len()) + 1
        );
        println!(
            "{ratio_label:<w$}{:>10.2}",
            contender_rows_per_second / rate,
            w = ratio_label.len().max(label.len()) + 1
        );
    }
}

/// The rows of the plain `COPY` baseline as COPY text in a file (kept at
/// `copy_file` when given, else removed when dropped), written once, loaded by
/// each [`CopyText::load`].
pub(super) struct CopyText {
    path: std::path::PathBuf,
    _temp: Option<tempfile::TempPath>,
}

impl CopyText {
    pub(super) fn write(
        records: impl Iterator<Item = Value>,
        copy_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        use std::io::Write as _;
        let (path, temp) = match copy_file {
            Some(path) => (path.to_owned(), None),
            None => {
                let temp = tempfile::NamedTempFile::new()?.into_temp_path();
                (temp.to_path_buf(), Some(temp))
            }
        };
        let file = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let mut line = String::new();
        for record in records {
            let row = decode_json(Table::EventsPart, record)?.row;
            line.clear();
            for (i, value) in row.values.iter().enumerate() {
                if i > 0 {
                    line.push('\t');
                }
                sql::push_copy_value(&mut line, value);
            }
            line.push('\n');
            out.write_all(line.as_bytes())?;
        }
        out.flush()?;
        Ok(CopyText { path, _temp: temp })
    }

    /// One timed load: a fresh `bench_copy` table, the database settled
    /// ([`settle`]), the file streamed to the server in 8 MiB chunks; the table
    /// is dropped afterwards. Only the load is timed.
    pub(super) async fn load(&self, url: &DatabaseUrl) -> anyhow::Result<CopyRun> {
        use std::io::Read as _;
        let spec = Table::EventsPart.spec();
        let mut conn = sqlx::PgConnection::connect(url.expose()).await?;
        sqlx::query("DROP TABLE IF EXISTS bench_copy")
            .execute(&mut conn)
            .await?;
        sqlx::query("CREATE TABLE bench_copy (LIKE events_part INCLUDING DEFAULTS INCLUDING INDEXES)")
            .execute(&mut conn)
            .await?;
        let mut file = std::fs::File::open(&self.path)?;
        settle(url, &["events_part"]).await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        let cpu = || cpu_seconds(backend).map(|(user, system)| user + system);
        let cpu_before = cpu();
        let started = Instant::now();
        let mut copy = conn
            .copy_in_raw(&format!("COPY bench_copy ({}) FROM STDIN", sql::column_list(spec)))
            .await?;
        let mut chunk = vec![0u8; 8 << 20];
        loop {
            let n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            copy.send(&chunk[..n]).await?;
        }
        copy.finish().await?;
        let run = CopyRun {
            seconds: started.elapsed().as_secs_f64(),
            postgres_seconds: cpu().zip(cpu_before).map(|(after, before)| after - before),
        };
        sqlx::query("DROP TABLE bench_copy").execute(&mut conn).await?;
        Ok(run)
    }
}

/// A scratch database beside the configured one.
pub(super) struct Scratch {
    pub(super) url: DatabaseUrl,
    admin: Option<DatabaseUrl>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub(super) async fn create(configured: &DatabaseUrl) -> anyhow::Result<Scratch> {
        let name = format!("dwh_bench_{}", std::process::id());
        match configured.backend() {
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(configured.expose())
                    .await
                    .with_context(|| format!("cannot connect to {configured}"))?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .context("the benchmark needs the CREATEDB privilege for its scratch database")?;
                let mut url = url::Url::parse(configured.expose())?;
                url.set_path(&format!("/{name}"));
                Ok(Scratch {
                    url: DatabaseUrl::parse(url.as_str()).map_err(anyhow::Error::msg)?,
                    admin: Some(configured.clone()),
                    name,
                    _dir: None,
                })
            }
            Backend::Sqlite => {
                let dir = tempfile::Builder::new().prefix(&name).tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                Ok(Scratch {
                    url: DatabaseUrl::parse(&url).map_err(anyhow::Error::msg)?,
                    admin: None,
                    name,
                    _dir: Some(dir),
                })
            }
        }
    }

    pub(super) async fn drop_database(&self) {
        let Some(admin) = &self.admin else { return };
        let dropped = async {
            let mut conn = sqlx::PgConnection::connect(admin.expose()).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(&mut conn)
                .await
        };
        if let Err(e) = dropped.await {
            tracing::warn!(database = %self.name, error = %e, "could not drop the scratch database");
        }
    }
}
