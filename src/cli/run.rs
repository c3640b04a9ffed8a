//! `dwh-helper run`: migrations, then the roles, until a shutdown signal.

use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::ingest::{self, IngestStatus};
use crate::store::Dwh;
use crate::telemetry::Event as _;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Roles to run, comma-separated [default: api, plus ingest when KAFKA_BOOTSTRAP_SERVERS is set, plus archive when S3 is configured too, plus appmetrica when APPMETRICA_API_KEY and APPMETRICA_APPLICATION_ID are]
    #[arg(long, value_delimiter = ',')]
    roles: Vec<Role>,
    /// Do not apply migrations at start (when a deploy step runs `migrate`)
    #[arg(long)]
    no_migrate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// The HTTP API on HTTP_BIND
    Api,
    /// Kafka topics into the DWH, exactly once
    Ingest,
    /// Kafka topics into S3 as gzip JSON-lines objects
    Archive,
    /// AppMetrica Logs API exports onto the topics
    Appmetrica,
}

/// The roles to run: those asked for, or every role that is configured.
fn roles(config: &Config, asked: &[Role]) -> anyhow::Result<Vec<Role>> {
    let kafka = config.kafka.bootstrap_servers.is_some();
    let s3 = config.s3.is_configured();
    if asked.contains(&Role::Ingest) && !kafka {
        bail!("the ingest role needs KAFKA_BOOTSTRAP_SERVERS");
    }
    let appmetrica = config.appmetrica.is_configured();
    if asked.contains(&Role::Appmetrica) && !(kafka && appmetrica) {
        bail!("the appmetrica role needs KAFKA_BOOTSTRAP_SERVERS, APPMETRICA_API_KEY and APPMETRICA_APPLICATION_ID");
    }
    if asked.contains(&Role::Archive) && !(kafka && s3) {
        bail!(
            "the archive role needs KAFKA_BOOTSTRAP_SERVERS and an object store (S3_ENDPOINT_URL or S3_ACCESS_KEY_ID)"
        );
    }
    if !asked.is_empty() {
        let mut roles = asked.to_vec();
        roles.dedup();
        return Ok(roles);
    }
    let mut roles = vec![Role::Api];
    if kafka {
        roles.push(Role::Ingest);
        if s3 {
            roles.push(Role::Archive);
        }
        if appmetrica {
            roles.push(Role::Appmetrica);
        }
    }
    Ok(roles)
}

pub async fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    let roles = roles(&config, &args.roles)?;
    let dwh = Dwh::connect(&config.dwh)?;
    if !args.no_migrate {
        dwh.migrate()
            .await
            .with_context(|| format!("cannot migrate {}", config.dwh.database_url))?;
    }
    tracing::info!(database = %config.dwh.database_url, roles = ?roles, "starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(signal(shutdown.clone()));
    serve_roles(config, dwh, &roles, shutdown, Arc::new(IngestStatus::default())).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `roles` until `shutdown` is cancelled; the first role to fail cancels the
/// others and its error is returned.
async fn serve_roles(
    config: Config,
    dwh: Dwh,
    roles: &[Role],
    shutdown: CancellationToken,
    status: Arc<IngestStatus>,
) -> anyhow::Result<()> {
    // KAFKA_MAX_IN_FLIGHT_BYTES bounds the whole process: the roles that consume
    // share it.
    let consuming = [Role::Ingest, Role::Archive]
        .iter()
        .filter(|r| roles.contains(r))
        .count()
        .max(1);
    let mut config = config;
    config.kafka.max_in_flight_bytes /= consuming;
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    if roles.contains(&Role::Ingest) {
        let (config, dwh, status, shutdown) = (config.clone(), dwh.clone(), status.clone(), shutdown.clone());
        tasks.spawn(async move { Ok(ingest::run(&config, dwh, status, shutdown).await?) });
    }
    let observed = [Role::Ingest, Role::Archive, Role::Api]
        .iter()
        .any(|r| roles.contains(r));
    if config.kafka.bootstrap_servers.is_some() && observed {
        // Lag from the DWH's offsets and the watermarks, on its own task so that
        // it goes on while a consumer is stuck (and an API-only instance shows it).
        let (config, dwh, status, shutdown) = (config.clone(), dwh.clone(), status.clone(), shutdown.clone());
        let archive = roles.contains(&Role::Archive);
        let watch = roles.contains(&Role::Ingest);
        let interval = config.metrics.lag_interval;
        tasks.spawn(async move {
            crate::status::lag::run(config, dwh, status, watch, archive, interval, shutdown).await;
            Ok(())
        });
    }
    if roles.contains(&Role::Appmetrica) {
        let (config, dwh, shutdown) = (config.clone(), dwh.clone(), shutdown.clone());
        tasks.spawn(async move { crate::appmetrica::run(&config, dwh, shutdown).await });
    }
    if roles.contains(&Role::Archive) {
        let (config, shutdown) = (config.clone(), shutdown.clone());
        let s3 = crate::s3::S3::new(&config.s3);
        tasks.spawn(async move { Ok(crate::archive::run(&config, s3, shutdown).await?) });
    }
    if let Some(ops) = config.http.ops_bind {
        let listener = TcpListener::bind(ops)
            .await
            .with_context(|| format!("cannot listen on HTTP_OPS_BIND {ops}"))?;
        tracing::info!(address = %ops, "operations listener (health, metrics) listening");
        let mut state = AppState::new(dwh.clone(), &config);
        if roles.contains(&Role::Ingest) {
            state.ingest = Some(status.clone());
        }
        let app = http::ops_router(state);
        let (shutdown, limits) = (shutdown.clone(), config.http.clone());
        tasks.spawn(async move { Ok(http::serve(listener, app, shutdown, limits).await?) });
    }
    if roles.contains(&Role::Api) {
        let listener = TcpListener::bind(config.http.bind)
            .await
            .with_context(|| format!("cannot listen on HTTP_BIND {}", config.http.bind))?;
        tracing::info!(address = %config.http.bind, "HTTP API listening");
        let mut state = AppState::new(dwh, &config);
        if roles.contains(&Role::Ingest) {
            state.ingest = Some(status);
        }
        if config.s3.is_configured() {
            state.s3 = Some(crate::s3::S3::new(&config.s3));
        }
        let app = http::router(state, config.http.max_body_bytes);
        let shutdown = shutdown.clone();
        let limits = config.http.clone();
        tasks.spawn(async move { Ok(http::serve(listener, app, shutdown, limits).await?) });
    }
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            shutdown.cancel();
            failure.get_or_insert(e);
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Cancels `shutdown` on SIGINT or SIGTERM; a second one exits at once.
pub async fn signal(shutdown: CancellationToken) {
    one_signal().await;
    tracing::info!("shutdown requested: writing what is buffered (a second signal exits at once)");
    shutdown.cancel();
    one_signal().await;
    // Open transactions roll back when their connections close with the process:
    // nothing half-written stays, and the records are read again by the next owner.
    crate::telemetry::events::ShutdownForced.emit();
    eprintln!("dwh-helper: second signal: exiting now; nothing buffered was committed (it will be read again)");
    std::process::exit(130);
}

/// Waits for SIGINT or SIGTERM.
async fn one_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
