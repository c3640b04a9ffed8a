//! Every event, by area: [`ingest`] (batches, failures and state of the tables),
//! [`kafka`] (what the Kafka clients of every role meet), [`dwh`] (the schema),
//! [`archive`], [`appmetrica`] and [`http`].

pub mod appmetrica;
pub mod archive;
pub mod dwh;
pub mod http;
pub mod ingest;
pub mod kafka;

pub use appmetrica::{AppMetricaResponse, AppMetricaWindowDone};
pub use archive::{ArchiveObjectKept, ArchiveStored, ArchiveUploadFailed};
pub use dwh::MigrationsAhead;
pub use http::HttpRequestServed;
pub use ingest::{
    BatchAborted, BatchCommitted, BufferLevel, ConsumerEnded, FetchPaused, IngestStarted, LaneFailuresEnded,
    MemberUnrecorded, OffsetFenced, OffsetGapNoted, OffsetMoved, OtherGroupsIngest, PartitionStarted, Rebalanced,
    RecordRejected, RecordSkipped, RecordsConsumed, RejectsRequeued, RequeueRefused, ShutdownForced, StallCleared,
    StoredOffsetsUnreadable, TableStalled, TableStateSeen, TableStopped, WriteFailed, WritesRecovered, TABLE_STATES,
};
pub use kafka::{
    AssignmentDeferred, AssignmentStarted, ClientLog, Consumer, ConsumerRestart, FetchOutOfRange, FetchSwitched,
    KafkaError, KafkaFailing, KafkaRecovered, PartitionsMoved, PollFailed, Restart, RoleStopped, TableTaskFailed,
    TopicMissing, TopicUnavailable, TopicsCreated, TopicsUnlisted,
};

pub use super::event::{Event, Shown};
