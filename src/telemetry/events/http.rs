//! HTTP API events: requests served.

use std::time::Duration;

use crate::telemetry::event::Event;
use crate::telemetry::metrics::{metrics, HTTP_DURATION};
use crate::telemetry::otel;

/// An HTTP request was answered.
#[derive(Debug)]
pub struct HttpRequestServed<'a> {
    /// The route template (`/api/v1/tables/{table}`), or `unmatched`.
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub took: Duration,
}

impl Event for HttpRequestServed<'_> {
    fn emit(&self) {
        let m = metrics();
        let route = vec![("route", self.route.to_owned()), ("method", self.method.to_owned())];
        m.http_duration.get_or_create(&route).observe(self.took.as_secs_f64());
        otel::record(HTTP_DURATION.0, &route, self.took.as_secs_f64());
        let mut labels = route;
        labels.push(("status", self.status.to_string()));
        m.http_requests.get_or_create(&labels).inc();
    }
}
