//! DWH events: what the store meets that is not one table's (the schema).

use crate::telemetry::event::Event;

/// The database holds migrations a newer release applied that this release
/// does not know (a rollback, or an old replica during a rollout). They are
/// additive, so this release starts on their schema; logged as a warning with
/// `event = "migrations_ahead"`, naming them.
#[derive(Debug)]
pub struct MigrationsAhead<'a> {
    /// `version description`, each.
    pub migrations: &'a [String],
}

impl Event for MigrationsAhead<'_> {
    fn emit(&self) {
        let migrations = self.migrations;
        tracing::warn!(
            target: "dwh_helper::store",
            event = "migrations_ahead",
            ?migrations,
            "the database has migrations of a newer release; starting on its schema (migrations are additive)"
        );
    }
}
