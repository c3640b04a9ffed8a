//! Which role a consumer serves, and what that means for its client: where
//! partitions start, what a held record costs of the memory budget, how it
//! fetches, and how its client and static-membership ids are told apart.

use crate::catalogue::Table;
use crate::config::KafkaConfig;

/// Which role a consumer serves: it decides where partitions start and how the
/// consumer's client and static-membership ids are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Starts every partition at an explicit offset chosen by the owning task
    /// (the DWH's); a fetch out of range is an error the task decides on, never a
    /// silent jump.
    Ingest,
    /// Starts at its own group's committed offset, else at the earliest record.
    Archive,
}

impl Role {
    /// What a record of `size` bytes (payload and key) costs in memory while it
    /// is held: ingest holds the decoded row, about twice the JSON it came from
    /// (a value per column, each with its own allocation); the archive holds the
    /// record's line, gzipped, at most its size.
    pub fn charge(self, size: usize) -> usize {
        match self {
            Role::Ingest => size.saturating_mul(2),
            Role::Archive => size,
        }
    }

    /// How long librdkafka waits to fetch again for a partition whose queue was
    /// full. The ingest looks again soon: with a prefetch smaller than a batch,
    /// librdkafka's default second was most of what it waited on (bench: 22.6k
    /// rows/s at 1 s, 34.6k at 20 ms). The archive, whose objects close by size
    /// or interval, keeps the default and the broker's fewer fetches.
    pub(super) fn fetch_queue_backoff_ms(self) -> &'static str {
        match self {
            Role::Ingest => "20",
            Role::Archive => "1000",
        }
    }

    /// How long a broker may hold a fetch that finds no data. librdkafka has
    /// one fetch in flight per broker, and leaves out of it the partitions whose
    /// local queue is full: near the end of a backlog, a fetch of only drained
    /// partitions was held for librdkafka's default 500 ms while the full ones
    /// drained and waited (bench: stalls of 0.4 s in half the runs, none in
    /// six at 50 ms). The ingest asks again after 50 ms, about 20 small fetches
    /// a second per table while idle; the archive keeps the default.
    pub(super) fn fetch_wait_max_ms(self) -> &'static str {
        match self {
            Role::Ingest => "50",
            Role::Archive => "500",
        }
    }

    pub(super) fn offset_reset(self) -> &'static str {
        match self {
            Role::Ingest => "error",
            Role::Archive => "earliest",
        }
    }

    /// The tables the role consumes, which share its budget: those of
    /// `KAFKA_INGEST_TABLES` or `KAFKA_ARCHIVE_TABLES`.
    pub fn tables(self, kafka: &KafkaConfig) -> &[Table] {
        match self {
            Role::Ingest => &kafka.ingest_tables,
            Role::Archive => &kafka.archive_tables,
        }
    }

    /// The role's name in metrics and logs: `ingest` or `archive`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Archive => "archive",
        }
    }

    pub(super) fn suffix(self) -> &'static str {
        match self {
            Role::Ingest => "",
            Role::Archive => "-archive",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_charges_the_decoded_row_and_the_archive_the_record() {
        assert_eq!(Role::Ingest.charge(1000), 2000);
        assert_eq!(Role::Archive.charge(1000), 1000);
    }
}
