//! `dwh-helper run`: migrations, then the roles, until a shutdown signal.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::store::Dwh;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Roles to run, comma-separated
    #[arg(long, value_delimiter = ',', default_values = ["api"])]
    roles: Vec<Role>,
    /// Do not apply migrations at start (when a deploy step runs `migrate`)
    #[arg(long)]
    no_migrate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// The HTTP API on HTTP_BIND
    Api,
}

pub async fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    let dwh = Dwh::connect(&config.dwh)?;
    if !args.no_migrate {
        dwh.migrate()
            .await
            .with_context(|| format!("cannot migrate {}", config.dwh.database_url))?;
    }
    tracing::info!(database = %config.dwh.database_url, roles = ?args.roles, "starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(signal(shutdown.clone()));
    if args.roles.contains(&Role::Api) {
        let listener = TcpListener::bind(config.http.bind)
            .await
            .with_context(|| format!("cannot listen on HTTP_BIND {}", config.http.bind))?;
        tracing::info!(address = %config.http.bind, "HTTP API listening");
        let app = http::router(AppState::new(dwh, &config.http), config.http.max_body_bytes);
        http::serve(listener, app, shutdown.clone()).await?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
pub async fn signal(shutdown: CancellationToken) {
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
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
