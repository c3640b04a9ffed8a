//! The Logs API client: one export window, fetched and parsed as a stream.
//!
//! Guarantees: 202 is polled every `APPMETRICA_POLL_INTERVAL_SECONDS` until 200 or
//! `APPMETRICA_POLL_TIMEOUT_SECONDS` (then [`ExportError::Timeout`] naming the
//! window); 429, 5xx and connection errors are retried with capped exponential
//! backoff; 401/403 stop with [`ExportError::Unauthorized`]; "Try to use more
//! parts." is [`ExportError::TooLarge`], for the caller to split. A 200 body is
//! parsed while it arrives: rows are handed over one by one through a bounded
//! channel, so an export of any size never sits in memory. The token is sent in
//! the `Authorization` header only and never logged.

use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::mapping;
use super::window::Window;
use crate::backoff::Backoff;
use crate::catalogue::envelope;
use crate::config::AppMetricaConfig;
use crate::telemetry::events::AppMetricaResponse;
use crate::telemetry::Event as _;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Attempts of one request on 429, 5xx and connection errors before giving up.
const MAX_ATTEMPTS: u32 = 8;
/// Rows parsed ahead of the consumer.
pub const ROWS_AHEAD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the AppMetrica token is invalid or lacks access to application {application_id} (HTTP {status}); fix APPMETRICA_API_KEY")]
    Unauthorized { application_id: i64, status: u16 },
    #[error("export {window} was not ready after {waited:?} (APPMETRICA_POLL_TIMEOUT_SECONDS)")]
    Timeout { window: String, waited: Duration },
    #[error("export {window} is too large for {parts} part(s)")]
    TooLarge { window: String, parts: u32 },
    #[error("export {window} failed: {detail}")]
    Failed { window: String, detail: String },
    #[error("export {window} was refused (HTTP {status}): {body}")]
    Refused { window: String, status: u16, body: String },
    #[error("stopped")]
    Cancelled,
}

impl ExportError {
    /// Whether fetching the window again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ExportError::Failed { .. } | ExportError::Timeout { .. })
    }
}

/// The Logs API for one application.
#[derive(Debug, Clone)]
pub struct LogsApi {
    http: reqwest::Client,
    config: AppMetricaConfig,
    application_id: i64,
}

/// Which part of a split export to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub count: u32,
}

impl LogsApi {
    pub fn new(config: &AppMetricaConfig) -> Result<Self, String> {
        let application_id = config.application_id.ok_or("APPMETRICA_APPLICATION_ID is not set")?;
        if config.api_key.is_none() {
            return Err("APPMETRICA_API_KEY is not set".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(300))
            .user_agent(concat!("dwh-helper/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(LogsApi {
            http,
            config: config.clone(),
            application_id,
        })
    }

    pub fn application_id(&self) -> i64 {
        self.application_id
    }

    fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/logs/v1/export/{endpoint}.json",
            self.config.base_url.as_str().trim_end_matches('/')
        )
    }

    /// Fetches one part of `window`, sending each row to `rows`. Returns the number
    /// of rows parsed. The whole part is fetched again by the caller if this fails
    /// half-way (rows already sent are sent again: keys make that harmless).
    pub async fn fetch(
        &self,
        window: &Window,
        part: Option<Part>,
        rows: &mpsc::Sender<Map<String, Value>>,
        cancel: &CancellationToken,
    ) -> Result<u64, ExportError> {
        let (since, until) = window.api_range();
        let fields = mapping::fields(&window.endpoint).join(",");
        let mut query: Vec<(&str, String)> = vec![
            ("application_id", self.application_id.to_string()),
            ("date_since", since),
            ("date_until", until),
            ("date_dimension", "default".into()),
            ("fields", fields),
        ];
        if let Some(part) = part {
            query.push(("parts_count", part.count.to_string()));
            query.push(("part_number", part.number.to_string()));
        }
        let token = self
            .config
            .api_key
            .as_ref()
            .map(|k| k.expose().to_owned())
            .unwrap_or_default();
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Backoff::new(
            self.config.poll_interval.clamp(Duration::from_millis(100), MAX_BACKOFF),
            MAX_BACKOFF,
        );
        let name = window.to_string();
        loop {
            if cancel.is_cancelled() {
                return Err(ExportError::Cancelled);
            }
            let poll = tracing::info_span!(target: "dwh_helper::appmetrica", "appmetrica_poll", status = tracing::field::Empty);
            let sent = tracing::Instrument::instrument(
                self.http
                    .get(self.url(&window.endpoint))
                    .query(&query)
                    .header(reqwest::header::AUTHORIZATION, format!("OAuth {token}"))
                    .send(),
                poll.clone(),
            )
            .await;
            poll.record("status", sent.as_ref().map_or(0, |r| r.status().as_u16()));
            AppMetricaResponse {
                status: sent.as_ref().map_or(0, |r| r.status().as_u16()),
            }
            .emit();
            let retry_reason = match sent {
                Err(e) => format!("request failed: {}", without_url(&e)),
                Ok(response) => match response.status().as_u16() {
                    200 => return self.parse(response, rows, &name).await,
                    202 => {
                        let waited = started.elapsed();
                        if waited >= self.config.poll_timeout {
                            return Err(ExportError::Timeout { window: name, waited });
                        }
                        tracing::debug!(window = %name, "export being prepared (202)");
                        sleep_or_cancel(self.config.poll_interval, cancel).await?;
                        continue;
                    }
                    status @ (401 | 403) => {
                        return Err(ExportError::Unauthorized {
                            application_id: self.application_id,
                            status,
                        })
                    }
                    400 => {
                        let body = response.text().await.unwrap_or_default();
                        if body.contains("Try to use more parts.") {
                            return Err(ExportError::TooLarge {
                                window: name,
                                parts: part.map_or(1, |p| p.count),
                            });
                        }
                        return Err(ExportError::Refused {
                            window: name,
                            status: 400,
                            body: shorten(&body),
                        });
                    }
                    429 => "the application's export queue is full (429)".to_owned(),
                    status @ 500..=599 => format!("server error {status}"),
                    status => {
                        let body = response.text().await.unwrap_or_default();
                        return Err(ExportError::Refused {
                            window: name,
                            status,
                            body: shorten(&body),
                        });
                    }
                },
            };
            attempts += 1;
            if attempts >= MAX_ATTEMPTS {
                return Err(ExportError::Failed {
                    window: name,
                    detail: format!("{retry_reason}, {attempts} attempts"),
                });
            }
            tracing::warn!(window = %name, reason = %retry_reason, retry_in_ms = backoff.peek().as_millis() as u64, "export request failed; retrying");
            if !backoff.wait(cancel).await {
                return Err(ExportError::Cancelled);
            }
        }
    }

    /// Parses `{"data": [ {...}, ... ]}` as it arrives.
    async fn parse(
        &self,
        response: reqwest::Response,
        rows: &mpsc::Sender<Map<String, Value>>,
        window: &str,
    ) -> Result<u64, ExportError> {
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        let sender = rows.clone();
        let parsed = tokio::task::spawn_blocking(move || {
            let mut deserializer = serde_json::Deserializer::from_reader(std::io::BufReader::new(reader));
            let count = export(&mut deserializer, &sender).map_err(|e| e.to_string())?;
            deserializer.end().map_err(|e| e.to_string())?;
            Ok::<u64, String>(count)
        })
        .await
        .map_err(|e| ExportError::Failed {
            window: window.to_owned(),
            detail: e.to_string(),
        })?;
        parsed.map_err(|detail| ExportError::Failed {
            window: window.to_owned(),
            detail: format!("the body could not be read to its end: {detail}"),
        })
    }
}

async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> Result<(), ExportError> {
    tokio::select! {
        () = tokio::time::sleep(delay) => Ok(()),
        () = cancel.cancelled() => Err(ExportError::Cancelled),
    }
}

/// A reqwest error without its URL (the query holds nothing secret, but keep
/// messages short).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "the Logs API");
    }
    text
}

fn shorten(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &body[..i]),
        None => body.to_owned(),
    }
}

/// Streams an export's rows (`{"data": [ {...}, ... ]}`) to `rows` as they are
/// parsed; how many there were.
fn export<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    rows: &mpsc::Sender<Map<String, Value>>,
) -> Result<u64, D::Error> {
    envelope::stream(deserializer, &mut Rows { rows })?.ok_or_else(|| serde::de::Error::missing_field("data"))
}

struct Rows<'a> {
    rows: &'a mpsc::Sender<Map<String, Value>>,
}

impl<'de> envelope::Sink<'de> for Rows<'_> {
    type Item = Map<String, Value>;

    fn push(&mut self, _: u64, row: Map<String, Value>) -> Result<(), String> {
        self.rows
            .blocking_send(row)
            .map_err(|_| "the consumer stopped".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Result<u64, String>, Vec<Map<String, Value>>) {
        let (tx, mut rx) = mpsc::channel(ROWS_AHEAD);
        let mut deserializer = serde_json::Deserializer::from_reader(text.as_bytes());
        let result = export(&mut deserializer, &tx)
            .and_then(|n| deserializer.end().map(|()| n))
            .map_err(|e| e.to_string());
        drop(tx);
        let mut rows = Vec::new();
        while let Ok(row) = rx.try_recv() {
            rows.push(row);
        }
        (result, rows)
    }

    #[test]
    fn rows_stream_out_of_the_data_array() {
        let (result, rows) = parse(r#"{"meta": {"x": [1, 2]}, "data": [{"a": "1"}, {"a": "2", "b": null}]}"#);
        assert_eq!(result, Ok(2));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["a"], "2");
    }

    #[test]
    fn truncated_or_shapeless_bodies_are_errors() {
        let (result, rows) = parse(r#"{"data": [{"a": "1"}, {"a": "#);
        assert!(result.unwrap_err().contains("EOF"));
        assert_eq!(rows.len(), 1, "rows before the cut were handed over");
        assert!(parse(r#"{"rows": []}"#).0.unwrap_err().contains("missing field `data`"));
        assert!(parse(r#"[1]"#).0.is_err());
    }
}
