//! `HTTP_*`: the API's address, its token and its limits.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::parse::{count, seconds, size, MIB};
use super::{ConfigError, Secret};

/// `HTTP_`: the API server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub bind: SocketAddr,
    /// The operations listener (`HTTP_OPS_BIND`): `/health/live`,
    /// `/health/ready` and `/metrics` with no token, nothing else; served
    /// whatever the roles.
    pub ops_bind: Option<SocketAddr>,
    pub api_token: Option<Secret>,
    pub max_body_bytes: usize,
    /// `POST /dwh/{table}`: the body (decompressed), the records, and how many such
    /// writes run at once (503 with Retry-After beyond).
    pub tables_max_body_bytes: usize,
    pub tables_max_records: usize,
    pub tables_max_concurrent_writes: usize,
    /// `GET /dwh/{table}`: a page stops after the row that takes it over this.
    pub tables_max_response_bytes: usize,
    /// A connection that has not sent a whole request head in this time is closed.
    pub header_read_timeout: Duration,
    /// A request (transfers excepted) not answered in this time gets 503.
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

#[derive(Default, Deserialize)]
pub(super) struct RawHttp {
    bind: Option<String>,
    ops_bind: Option<String>,
    api_token: Option<String>,
    max_body_bytes: Option<String>,
    tables_max_body_bytes: Option<String>,
    tables_max_records: Option<String>,
    tables_max_concurrent_writes: Option<String>,
    tables_max_response_bytes: Option<String>,
    header_read_timeout_seconds: Option<String>,
    request_timeout_seconds: Option<String>,
    max_connections: Option<String>,
}

pub(super) fn http(raw: RawHttp) -> Result<HttpConfig, ConfigError> {
    let bind_text = raw.bind.unwrap_or_else(|| "127.0.0.1:8000".into());
    let bind: SocketAddr = bind_text.trim().parse().map_err(|_| {
        ConfigError::new(
            "HTTP_BIND",
            format!("expected an address like 127.0.0.1:8000, got \"{bind_text}\""),
        )
    })?;
    // A secret file's trailing newline is not part of the token; empty is unset
    // (never a token that "Bearer " would match).
    let api_token = raw
        .api_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| Secret::new(t.to_owned()));
    check_exposure(bind, api_token.as_ref())?;
    let ops_bind = match raw.ops_bind.as_deref().map(str::trim) {
        None => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            ConfigError::new(
                "HTTP_OPS_BIND",
                format!("expected an address like 0.0.0.0:9000, got \"{text}\""),
            )
        })?),
    };
    if ops_bind == Some(bind) {
        return Err(ConfigError::new(
            "HTTP_OPS_BIND",
            format!("{bind} is HTTP_BIND's address too; give the operations listener a port of its own"),
        ));
    }
    Ok(HttpConfig {
        bind,
        ops_bind,
        api_token,
        max_body_bytes: size("HTTP_MAX_BODY_BYTES", raw.max_body_bytes, 64 * MIB, 1024)?,
        tables_max_body_bytes: size("HTTP_TABLES_MAX_BODY_BYTES", raw.tables_max_body_bytes, 16 * MIB, 1024)?,
        tables_max_records: count("HTTP_TABLES_MAX_RECORDS", raw.tables_max_records, 10_000)?,
        tables_max_concurrent_writes: count("HTTP_TABLES_MAX_CONCURRENT_WRITES", raw.tables_max_concurrent_writes, 4)?,
        tables_max_response_bytes: size(
            "HTTP_TABLES_MAX_RESPONSE_BYTES",
            raw.tables_max_response_bytes,
            16 * MIB,
            1024,
        )?,
        header_read_timeout: seconds("HTTP_HEADER_READ_TIMEOUT_SECONDS", raw.header_read_timeout_seconds, 10)?,
        request_timeout: seconds("HTTP_REQUEST_TIMEOUT_SECONDS", raw.request_timeout_seconds, 60)?,
        max_connections: count("HTTP_MAX_CONNECTIONS", raw.max_connections, 1024)?,
    })
}

/// An address other hosts can reach needs a token.
pub fn check_exposure(bind: SocketAddr, token: Option<&Secret>) -> Result<(), ConfigError> {
    if !bind.ip().is_loopback() && token.is_none() {
        return Err(ConfigError::new(
            "HTTP_BIND",
            format!("{bind} is reachable from other hosts; set HTTP_API_TOKEN to serve it, or bind 127.0.0.1"),
        ));
    }
    Ok(())
}
