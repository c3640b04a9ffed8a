//! Every event, by area: [`ingest`] (batches, failures and state of the tables),
//! [`kafka`] (what the Kafka clients of every role meet), [`archive`],
//! [`appmetrica`] and [`http`].

pub mod appmetrica;
pub mod archive;
pub mod http;
pub mod ingest;
pub mod kafka;

pub use appmetrica::{AppMetricaResponse, AppMetricaWindowDone};
pub use archive::{ArchiveObjectKept, ArchiveStored, ArchiveUploadFailed};
pub use http::HttpRequestServed;
pub use ingest::{
    BatchAborted, BatchCommitted, BufferLevel, ConsumerEnded, FetchPaused, IngestStarted, OffsetFenced, OffsetMoved,
    PartitionStarted, Rebalanced, RecordRejected, RecordSkipped, RecordsConsumed, ShutdownForced,
    StoredOffsetsUnreadable, TableStopped, WriteFailed, WritesRecovered,
};
pub use kafka::{ConsumerRestart, FetchOutOfRange, KafkaError, KafkaFailing, KafkaRecovered, PollFailed, Restart};

pub use super::event::{Event, Shown};
