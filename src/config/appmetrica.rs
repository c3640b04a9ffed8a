//! `APPMETRICA_*`: the Logs API, the application and the export windows.

use std::time::Duration;

use serde::Deserialize;

use super::parse::{count, http_url, seconds};
use super::{ConfigError, Secret};

/// `APPMETRICA_`: the Logs API.
#[derive(Debug, Clone)]
pub struct AppMetricaConfig {
    pub base_url: url::Url,
    pub api_key: Option<Secret>,
    pub application_id: Option<i64>,
    pub poll_interval: Duration,
    pub poll_timeout: Duration,
    /// Exports fetched by the poller, in order.
    pub endpoints: Vec<String>,
    /// The first day the poller fetches (default: 7 days before the start).
    pub start_date: Option<chrono::NaiveDate>,
    /// How many recent days are fetched again once a day, for late data.
    pub refetch_days: u32,
    /// Exports in flight at once (the Logs API queues 3 per application).
    pub max_parallel: usize,
}

impl AppMetricaConfig {
    /// Whether the poller can run (a token and an application).
    pub fn is_configured(&self) -> bool {
        self.api_key.is_some() && self.application_id.is_some()
    }
}

/// The Logs API exports the poller knows how to map.
pub const APPMETRICA_ENDPOINTS: [&str; 4] = ["events", "installations", "sessions_starts", "profiles_v2"];

#[derive(Default, Deserialize)]
pub(super) struct RawAppMetrica {
    base_url: Option<String>,
    api_key: Option<String>,
    application_id: Option<String>,
    poll_interval_seconds: Option<String>,
    poll_timeout_seconds: Option<String>,
    endpoints: Option<String>,
    start_date: Option<String>,
    refetch_days: Option<String>,
    max_parallel: Option<String>,
}

pub(super) fn appmetrica(raw: RawAppMetrica) -> Result<AppMetricaConfig, ConfigError> {
    let base_url = http_url(
        "APPMETRICA_BASE_URL",
        raw.base_url.as_deref().unwrap_or("https://api.appmetrica.yandex.ru"),
    )?;
    let application_id = raw
        .application_id
        .map(|v| {
            v.trim().parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
                ConfigError::new(
                    "APPMETRICA_APPLICATION_ID",
                    format!("expected a positive integer, got \"{v}\""),
                )
            })
        })
        .transpose()?;
    let poll_interval = seconds("APPMETRICA_POLL_INTERVAL_SECONDS", raw.poll_interval_seconds, 5)?;
    let poll_timeout = seconds("APPMETRICA_POLL_TIMEOUT_SECONDS", raw.poll_timeout_seconds, 300)?;
    if poll_timeout < poll_interval {
        return Err(ConfigError::new(
            "APPMETRICA_POLL_TIMEOUT_SECONDS",
            "must not be shorter than APPMETRICA_POLL_INTERVAL_SECONDS",
        ));
    }
    let endpoints: Vec<String> = raw
        .endpoints
        .as_deref()
        .unwrap_or("events,installations,sessions_starts,profiles_v2")
        .split(',')
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if let Some(unknown) = endpoints.iter().find(|e| !APPMETRICA_ENDPOINTS.contains(&e.as_str())) {
        return Err(ConfigError::new(
            "APPMETRICA_ENDPOINTS",
            format!(
                "unknown export \"{unknown}\"; known: {}",
                APPMETRICA_ENDPOINTS.join(", ")
            ),
        ));
    }
    let start_date = raw
        .start_date
        .map(|d| {
            chrono::NaiveDate::parse_from_str(d.trim(), "%Y-%m-%d").map_err(|_| {
                ConfigError::new(
                    "APPMETRICA_START_DATE",
                    format!("expected a date like 2024-03-01, got \"{d}\""),
                )
            })
        })
        .transpose()?;
    let refetch_days = match raw.refetch_days {
        None => 7,
        Some(v) => v.trim().parse::<u32>().ok().filter(|d| *d <= 60).ok_or_else(|| {
            ConfigError::new("APPMETRICA_REFETCH_DAYS", format!("expected 0 to 60 days, got \"{v}\""))
        })?,
    };
    Ok(AppMetricaConfig {
        base_url,
        api_key: raw.api_key.map(Secret::new),
        application_id,
        poll_interval,
        poll_timeout,
        endpoints,
        start_date,
        refetch_days,
        max_parallel: count("APPMETRICA_MAX_PARALLEL", raw.max_parallel, 3)?,
    })
}
