//! The Kafka side of one table's ingest: a consumer polled on its own thread.
//!
//! Guarantees: the poll thread only passes things on. Records go to the owning
//! task over a bounded channel, each holding its share of the global in-flight
//! memory budget; rebalance callbacks send "assigned"/"revoked" to the same task
//! (after the records polled before them) and wait for its answer, so partitions
//! are assigned at the offsets the DWH stores and revoked only after the task has
//! written or dropped what it buffered for them.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// What the poll thread tells the owning task.
#[derive(Debug)]
pub enum Event {
    Record(OwnedMessage, OwnedSemaphorePermit),
    /// Partitions were assigned; the answer gives each one's stored next offset
    /// (`None`: none stored, start from the Kafka committed offset or the reset policy).
    Assigned {
        partitions: Vec<i32>,
        reply: oneshot::Sender<Vec<(i32, Option<i64>)>>,
    },
    /// Partitions are being revoked; answer once nothing of them stays buffered.
    Revoked {
        partitions: Vec<i32>,
        reply: oneshot::Sender<()>,
    },
}

/// The rdkafka context: forwards logs to `tracing` and rebalances to the task.
#[derive(Debug)]
pub struct Context {
    pub topic: String,
    pub events: mpsc::Sender<Event>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(topic = %self.topic, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(topic = %self.topic, facility, "librdkafka: {message}"),
            _ => tracing::debug!(topic = %self.topic, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(topic = %self.topic, error = %error, "kafka client error: {reason}");
    }
}

impl ConsumerContext for Context {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                let offsets = self
                    .events
                    .blocking_send(Event::Assigned {
                        partitions: partitions.clone(),
                        reply,
                    })
                    .ok()
                    .and_then(|()| answer.blocking_recv().ok())
                    .unwrap_or_default();
                for (partition, stored) in offsets {
                    let offset = stored.map_or(Offset::Stored, Offset::Offset);
                    if let Err(e) = tpl.set_partition_offset(&self.topic, partition, offset) {
                        tracing::error!(topic = %self.topic, partition, error = %e, "cannot set the start offset");
                    }
                }
                tracing::info!(topic = %self.topic, ?partitions, "partitions assigned");
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                if self
                    .events
                    .blocking_send(Event::Revoked {
                        partitions: partitions.clone(),
                        reply,
                    })
                    .is_ok()
                {
                    let _ = answer.blocking_recv();
                }
                tracing::info!(topic = %self.topic, ?partitions, "partitions revoked");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(topic = %self.topic, error = %code, "rebalance failed; dropping the assignment");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(topic = %self.topic, error = %e, "cannot apply the rebalance");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // Kafka commits only feed lag tools; the DWH holds the real offsets.
        if let Err(e) = result {
            tracing::debug!(topic = %self.topic, error = %e, "kafka offset commit failed");
        }
    }
}

/// Polls `consumer` until `stop` is cancelled or the task goes away.
pub fn poll_loop(
    consumer: Arc<BaseConsumer<Context>>,
    events: mpsc::Sender<Event>,
    memory: Arc<Semaphore>,
    memory_budget: u32,
    stop: CancellationToken,
    runtime: tokio::runtime::Handle,
) {
    let topic = consumer.context().topic.clone();
    while !stop.is_cancelled() {
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(message)) => message.detach(),
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)))
            | Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopic))) => {
                // The start already warned about a missing topic, once.
                tracing::debug!(topic = %topic, "topic not available yet");
                continue;
            }
            Some(Err(e)) => {
                tracing::warn!(topic = %topic, error = %e, "kafka consume error");
                continue;
            }
        };
        let size = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let permits = u32::try_from(size).unwrap_or(u32::MAX).clamp(1, memory_budget);
        // Waiting here is the backpressure: nothing more is fetched into our
        // memory until batches are written and their permits returned.
        let permit = runtime.block_on(async {
            tokio::select! {
                permit = memory.clone().acquire_many_owned(permits) => permit.ok(),
                () = stop.cancelled() => None,
            }
        });
        let Some(permit) = permit else { break };
        if events.blocking_send(Event::Record(message, permit)).is_err() {
            break;
        }
    }
}
