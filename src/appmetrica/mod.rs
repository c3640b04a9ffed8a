//! AppMetrica: Logs API exports fetched in one-day windows, mapped to table
//! records and published onto the table topics.
//!
//! Guarantees: a window is marked done in the DWH (`dwh_appmetrica_windows`) only
//! after every record of it was acknowledged by Kafka; a window that failed or was
//! interrupted (SIGTERM, SIGKILL) stays not-done and is fetched again whole, which
//! is harmless because the records' keys are the same each time (see
//! [`mapping`]). Exports too large for one request are split into 2, 4, 8… parts.
//! At most `APPMETRICA_MAX_PARALLEL` exports are in flight (the API queues 3).

pub mod client;
pub mod mapping;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::{self, Publisher};
use crate::store::{Dwh, WindowRecord};
use crate::telemetry::events::AppMetricaWindowDone;
use crate::telemetry::Event as _;
pub use client::{ExportError, LogsApi};
use window::Window;

/// The most parts an export is split into before giving up.
const MAX_PARTS: u32 = 64;
/// How often the poller looks for due windows.
const CYCLE: Duration = Duration::from_secs(15 * 60);
/// Attempts of a window within one cycle.
const WINDOW_ATTEMPTS: u32 = 3;

/// What one window produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub fetched: u64,
    pub published: u64,
    /// Rows that could not be mapped (logged with the reason, not published).
    pub unmapped: u64,
    pub parts: u32,
}

/// Fetches, maps and publishes windows; records them in the DWH.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Exporter {
    api: LogsApi,
    publisher: Publisher,
    dwh: Dwh,
    topic_prefix: String,
}

impl Exporter {
    pub fn new(config: &Config, dwh: Dwh) -> anyhow::Result<Self> {
        Ok(Exporter {
            api: LogsApi::new(&config.appmetrica).map_err(anyhow::Error::msg)?,
            publisher: Publisher::new(&config.kafka)?,
            dwh,
            topic_prefix: config.kafka.topic_prefix.clone(),
        })
    }

    pub fn application_id(&self) -> i64 {
        self.api.application_id()
    }

    /// Fetches `window` (splitting it as the API asks), publishes its records,
    /// waits for every acknowledgement and marks it done. Retryable failures are
    /// tried again up to [`WINDOW_ATTEMPTS`] times; the window is marked failed
    /// when they all fail.
    pub async fn run_window(&self, window: &Window, cancel: &CancellationToken) -> Result<Outcome, ExportError> {
        let span = crate::telemetry::traced(tracing::info_span!(
            target: "dwh_helper::appmetrica",
            "appmetrica_window",
            window = %window,
            endpoint = %window.endpoint,
            trace_id = tracing::field::Empty,
        ));
        tracing::Instrument::instrument(self.run_window_within(window, cancel), span).await
    }

    async fn run_window_within(&self, window: &Window, cancel: &CancellationToken) -> Result<Outcome, ExportError> {
        let started = Instant::now();
        let mut record = WindowRecord {
            application_id: self.application_id(),
            endpoint: window.endpoint.clone(),
            window_start: window.start(),
            window_end: window.end(),
            status: "running".into(),
            rows_fetched: 0,
            rows_published: 0,
            duration_ms: None,
            error: None,
            fetched_at: Some(Utc::now()),
        };
        self.save(&record).await;
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match self.fetch_window(window, cancel).await {
                Err(e) if e.is_retryable() && attempt < WINDOW_ATTEMPTS => {
                    tracing::warn!(window = %window, attempt, error = %e, "window failed; fetching it again");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(2 * u64::from(attempt))) => {}
                        () = cancel.cancelled() => break Err(ExportError::Cancelled),
                    }
                }
                other => break other,
            }
        };
        record.duration_ms = Some(started.elapsed().as_millis() as i64);
        match &result {
            Ok(outcome) => {
                record.status = "done".into();
                record.rows_fetched = outcome.fetched as i64;
                record.rows_published = outcome.published as i64;
                self.save(&record).await;
                AppMetricaWindowDone {
                    window,
                    endpoint: &record.endpoint,
                    rows_fetched: outcome.fetched,
                    rows_published: outcome.published,
                    unmapped: outcome.unmapped,
                    parts: outcome.parts,
                    took: started.elapsed(),
                }
                .emit();
            }
            // Interrupted: left as running, so it is fetched again.
            Err(ExportError::Cancelled) => {}
            Err(e) => {
                record.status = "failed".into();
                record.error = Some(e.to_string());
                self.save(&record).await;
            }
        }
        result
    }

    async fn save(&self, record: &WindowRecord) {
        if let Err(e) = self.dwh.record_window(record).await {
            tracing::warn!(endpoint = %record.endpoint, error = %e, "cannot record the window state");
        }
    }

    /// One attempt at a window, in as many parts as the API needs.
    async fn fetch_window(&self, window: &Window, cancel: &CancellationToken) -> Result<Outcome, ExportError> {
        let mut parts = 1;
        loop {
            match self.fetch_parts(window, parts, cancel).await {
                Err(ExportError::TooLarge { .. }) if parts < MAX_PARTS => {
                    parts *= 2;
                    tracing::info!(window = %window, parts, "export too large; fetching it in parts");
                }
                other => return other,
            }
        }
    }

    async fn fetch_parts(
        &self,
        window: &Window,
        parts: u32,
        cancel: &CancellationToken,
    ) -> Result<Outcome, ExportError> {
        // A fresh mapper each attempt: occurrence numbers restart, keys repeat.
        let mut mapper = mapping::Mapper::new(self.application_id(), &window.endpoint, window.day);
        let mut batch = self.publisher.batch();
        let mut outcome = Outcome {
            parts,
            ..Outcome::default()
        };
        let failed = |e: kafka::PublishError| ExportError::Failed {
            window: window.to_string(),
            detail: e.to_string(),
        };
        for number in 0..parts {
            let part = (parts > 1).then_some(client::Part { number, count: parts });
            let (tx, mut rx) = mpsc::channel(client::ROWS_AHEAD);
            let fetch = async {
                let result = self.api.fetch(window, part, &tx, cancel).await;
                drop(tx);
                result
            };
            let consume = async {
                while let Some(row) = rx.recv().await {
                    outcome.fetched += 1;
                    match mapper.map(row) {
                        Ok(records) => {
                            for mapped in records {
                                let topic = kafka::topic_name(&self.topic_prefix, mapped.table);
                                batch
                                    .send(&topic, mapped.key.as_bytes(), mapped.record.to_string().as_bytes())
                                    .await?;
                                outcome.published += 1;
                            }
                        }
                        Err(reason) => {
                            outcome.unmapped += 1;
                            if outcome.unmapped <= 10 {
                                tracing::warn!(window = %window, %reason, "row not mapped");
                            }
                        }
                    }
                }
                Ok::<(), kafka::PublishError>(())
            };
            let (fetched, consumed) = tokio::join!(fetch, consume);
            consumed.map_err(failed)?;
            fetched?;
        }
        if outcome.unmapped > 10 {
            tracing::warn!(window = %window, unmapped = outcome.unmapped, "rows not mapped in this window");
        }
        batch.finish().await.map_err(failed)?;
        Ok(outcome)
    }
}

/// The first day the poller fetches: the configured start, else 7 days back, or
/// earlier when windows before that are recorded but not done.
fn start_day(config: &Config, recorded: &[WindowRecord]) -> NaiveDate {
    if let Some(start) = config.appmetrica.start_date {
        return start;
    }
    let week_ago = Utc::now().date_naive() - chrono::Duration::days(7);
    recorded
        .iter()
        .filter(|w| w.status != "done")
        .map(|w| w.window_start.date_naive())
        .min()
        .map_or(week_ago, |earliest| earliest.min(week_ago))
}

/// The windows of `dwh` that are done, with when they were fetched.
fn done_windows(recorded: &[WindowRecord]) -> HashMap<Window, chrono::DateTime<Utc>> {
    recorded
        .iter()
        .filter(|w| w.status == "done")
        .map(|w| {
            (
                Window {
                    endpoint: w.endpoint.clone(),
                    day: w.window_start.date_naive(),
                },
                w.fetched_at.unwrap_or(w.window_end),
            )
        })
        .collect()
}

/// The poller role: fetches due windows every [`CYCLE`] until `shutdown`. Stops
/// (with an error in the log) when the token is refused.
pub async fn run(config: &Config, dwh: Dwh, shutdown: CancellationToken) -> anyhow::Result<()> {
    let exporter = Arc::new(Exporter::new(config, dwh.clone())?);
    tracing::info!(application = exporter.application_id(), endpoints = ?config.appmetrica.endpoints, "AppMetrica poller started");
    loop {
        let recorded = dwh.windows(exporter.application_id()).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the windows table");
            Vec::new()
        });
        let due = window::due(
            &config.appmetrica.endpoints,
            start_day(config, &recorded),
            Utc::now(),
            config.appmetrica.refetch_days,
            &done_windows(&recorded),
        );
        if !due.is_empty() {
            tracing::info!(windows = due.len(), "AppMetrica windows due");
        }
        let results: Vec<Result<Outcome, ExportError>> = futures_util::stream::iter(due)
            .map(|w| {
                let (exporter, shutdown) = (exporter.clone(), shutdown.clone());
                async move { exporter.run_window(&w, &shutdown).await }
            })
            .buffered(config.appmetrica.max_parallel)
            .collect()
            .await;
        if let Some(Err(e)) = results
            .iter()
            .find(|r| matches!(r, Err(ExportError::Unauthorized { .. })))
        {
            tracing::error!(error = %e, "AppMetrica poller stopped");
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(CYCLE) => {}
            () = shutdown.cancelled() => {
                tracing::info!("AppMetrica poller stopped");
                return Ok(());
            }
        }
    }
}
