//! AppMetrica events: Logs API answers and windows published.

use std::time::Duration;

use crate::telemetry::event::{Event, Shown, APPMETRICA};
use crate::telemetry::metrics::{metrics, WINDOW_DURATION};
use crate::telemetry::otel;

/// One Logs API request answered (or failed to connect: `status` 0).
#[derive(Debug)]
pub struct AppMetricaResponse {
    pub status: u16,
}

impl AppMetricaResponse {
    /// The bounded class of a status: `200`, `202`, `429`, `4xx`, `5xx`, `error`.
    pub fn class(status: u16) -> &'static str {
        match status {
            0 => "error",
            200 => "200",
            202 => "202",
            429 => "429",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        }
    }
}

impl Event for AppMetricaResponse {
    fn emit(&self) {
        let m = metrics();
        m.appmetrica_polls.get_or_create(&Vec::new()).inc();
        m.appmetrica_responses
            .get_or_create(&vec![("status", Self::class(self.status).to_owned())])
            .inc();
    }
}

/// An AppMetrica window was fetched and published.
#[derive(Debug)]
pub struct AppMetricaWindowDone<'a> {
    pub window: &'a dyn Shown,
    /// The Logs API endpoint (`events`, `installations`, ...): a bounded label.
    pub endpoint: &'a str,
    pub rows_fetched: u64,
    pub rows_published: u64,
    pub unmapped: u64,
    pub parts: u32,
    pub took: Duration,
}

impl Event for AppMetricaWindowDone<'_> {
    fn emit(&self) {
        tracing::info!(
            target: APPMETRICA,
            window = %self.window,
            fetched = self.rows_fetched,
            published = self.rows_published,
            unmapped = self.unmapped,
            parts = self.parts,
            took_ms = self.took.as_millis() as u64,
            "window published"
        );
        let m = metrics();
        let labels = vec![("endpoint", self.endpoint.to_owned())];
        m.appmetrica_rows_fetched
            .get_or_create(&labels)
            .inc_by(self.rows_fetched);
        m.appmetrica_rows_published
            .get_or_create(&labels)
            .inc_by(self.rows_published);
        m.appmetrica_window_duration
            .get_or_create(&labels)
            .observe(self.took.as_secs_f64());
        otel::record(WINDOW_DURATION.0, &labels, self.took.as_secs_f64());
    }
}
