//! The shape of telemetry: each thing that happens is a type, and [`Event::emit`]
//! writes its log line (with structured fields) *and* updates its metrics, in one
//! place. Code that does the work builds an event and emits it; it never calls
//! `tracing` and a counter side by side. The events live in
//! [`super::events`], one file per area.
//!
//! Events only tell: a role's own state (readiness, `status`) is the role's to
//! keep, before it emits.

use std::fmt::{Debug, Display};

/// One thing that happened, told to the logs and the metrics.
pub trait Event: Debug {
    fn emit(&self);
}

/// What an event can carry as a cause or a name: shown in logs, debuggable.
pub trait Shown: Display + Debug + Sync {}

impl<T: Display + Debug + Sync + ?Sized> Shown for T {}

/// Log targets: the part of the service an event belongs to, so that `LOG_LEVEL`
/// directives such as `dwh_helper::ingest=debug` reach its events.
pub(crate) const INGEST: &str = "dwh_helper::ingest";
pub(crate) const ARCHIVE: &str = "dwh_helper::archive";
pub(crate) const APPMETRICA: &str = "dwh_helper::appmetrica";
pub(crate) const KAFKA: &str = "dwh_helper::kafka";
