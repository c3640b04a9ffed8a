//! dwh-helper: Kafka topics to DWH tables, exactly once.
//!
//! The modules follow the pipeline: [`config`], the table [`catalogue`], [`kafka`]
//! (clients, the consumer every role shares, dev broker), [`ingest`] (batcher,
//! start offsets, worker), the DWH [`store`], the [`archive`], [`appmetrica`],
//! the [`http`] API, and the [`cli`] that wires them together.

pub mod alloc;
pub mod appmetrica;
pub mod archive;
pub mod backoff;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod replay;
pub mod s3;
pub mod sample;
pub mod status;
pub mod store;
pub mod telemetry;
