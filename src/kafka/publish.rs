//! Publishing records onto the table topics with an idempotent producer.
//!
//! Guarantees: a [`Batch`] counts a record as published only once the broker
//! acknowledged it (`acks=all`); [`Batch::finish`] returns after every record
//! was acknowledged or reports the first failure. The idempotent producer never
//! writes a record twice on its own retries and keeps per-partition order. At
//! most `max_in_flight` records wait for acknowledgement, so memory is bounded
//! however long the input.

use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use super::{client_config, KafkaSetupError};
use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("record to {topic} not acknowledged: {cause}")]
    Delivery { topic: String, cause: KafkaError },
    #[error("the producer shut down before acknowledging a record")]
    Canceled,
}

/// An idempotent producer; cheap to clone.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Publisher {
    producer: FutureProducer,
    max_in_flight: usize,
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        let producer = client_config(
            kafka,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "20"),
                ("compression.type", "lz4"),
                ("message.timeout.ms", "120000"),
                // librdkafka would queue up to 1 GiB; the in-flight bound below
                // keeps the count low, this keeps the bytes low.
                ("queue.buffering.max.kbytes", "65536"),
            ],
        )?
        .create()
        .map_err(|source| KafkaSetupError::Client {
            role: "producer",
            cause: source,
        })?;
        Ok(Publisher {
            producer,
            max_in_flight: 50_000,
        })
    }

    /// Starts a batch of sends whose acknowledgements are awaited together.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            publisher: self,
            pending: FuturesUnordered::new(),
            acknowledged: 0,
            acknowledged_tags: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// Waits for everything queued in librdkafka to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// Sends in flight, and how many were acknowledged so far.
#[allow(missing_debug_implementations)]
pub struct Batch<'p> {
    publisher: &'p Publisher,
    pending: FuturesUnordered<Pending>,
    acknowledged: u64,
    /// The tags of the tagged records acknowledged.
    acknowledged_tags: Vec<i64>,
    /// Tagged records the broker or the producer refused for what they are
    /// ([`PublishError::refuses_the_record`]), with why.
    refused: Vec<(i64, PublishError)>,
}

struct Pending {
    topic: String,
    delivery: DeliveryFuture,
    /// What names the record in [`Batch::finish_tagged`], if it was tagged.
    tag: Option<i64>,
}

impl std::future::Future for Pending {
    type Output = (Option<i64>, Result<(), PublishError>);

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        let tag = this.tag;
        std::pin::Pin::new(&mut this.delivery).poll(cx).map(|result| {
            let result = match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((cause, _))) => Err(PublishError::Delivery {
                    topic: std::mem::take(&mut this.topic),
                    cause,
                }),
                Err(_) => Err(PublishError::Canceled),
            };
            (tag, result)
        })
    }
}

impl PublishError {
    /// Whether the error is the record's own (too large, malformed): sending
    /// it again fails the same way, whatever the broker's state.
    pub fn refuses_the_record(&self) -> bool {
        let PublishError::Delivery { cause, .. } = self else {
            return false;
        };
        matches!(
            cause.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidRecord
            )
        )
    }
}

/// What became of the tagged records of a batch ([`Batch::finish_tagged`]).
#[derive(Debug, Default)]
pub struct Settled {
    /// The tags of the records the broker acknowledged.
    pub acknowledged: Vec<i64>,
    /// The tags of the records refused for what they are, with why.
    pub refused: Vec<(i64, PublishError)>,
}

impl Batch<'_> {
    /// Queues one record; waits while the producer's queue or the in-flight bound
    /// is full.
    pub async fn send(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), PublishError> {
        self.send_record(topic, Some(key), payload).await
    }

    /// Like [`Batch::send`], for a record that may have no key.
    pub async fn send_record(&mut self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), PublishError> {
        self.send_as(None, topic, key, payload).await
    }

    /// Like [`Batch::send_record`], the record named by `tag` in
    /// [`Batch::finish_tagged`]: a record refused for what it is (too large,
    /// at once or by the broker) is counted there, not returned as an error.
    pub async fn send_tagged(
        &mut self,
        tag: i64,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        self.send_as(Some(tag), topic, key, payload).await
    }

    async fn send_as(
        &mut self,
        tag: Option<i64>,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.publisher.producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push(Pending {
                        topic: topic.to_owned(),
                        delivery,
                        tag,
                    });
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !self.settle_one().await? {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err((source, _)) => {
                    let error = PublishError::Delivery {
                        topic: topic.to_owned(),
                        cause: source,
                    };
                    match tag {
                        Some(tag) if error.refuses_the_record() => {
                            self.refused.push((tag, error));
                            break;
                        }
                        _ => return Err(error),
                    }
                }
            }
        }
        while self.pending.len() >= self.publisher.max_in_flight {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Records acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged
    }

    /// Collects acknowledgements that already arrived, without waiting.
    pub async fn collect_ready(&mut self) -> Result<u64, PublishError> {
        while let Some(Some(settled)) = futures_util::FutureExt::now_or_never(self.pending.next()) {
            self.settled(settled)?;
        }
        Ok(self.acknowledged)
    }

    /// Waits for every record sent; returns how many were acknowledged.
    pub async fn finish(mut self) -> Result<u64, PublishError> {
        while self.settle_one().await? {}
        Ok(self.acknowledged)
    }

    /// Waits for every record sent, and tells which tagged ones were
    /// acknowledged and which refused for what they are. Any other failure
    /// (the broker away, a permission) is returned as the error, with what was
    /// acknowledged before it.
    pub async fn finish_tagged(mut self) -> Result<Settled, (Settled, PublishError)> {
        let mut failure = None;
        while let Some(settled) = self.pending.next().await {
            if let Err(e) = self.settled(settled) {
                failure.get_or_insert(e);
            }
        }
        let settled = Settled {
            acknowledged: std::mem::take(&mut self.acknowledged_tags),
            refused: std::mem::take(&mut self.refused),
        };
        match failure {
            None => Ok(settled),
            Some(e) => Err((settled, e)),
        }
    }

    async fn settle_one(&mut self) -> Result<bool, PublishError> {
        match self.pending.next().await {
            Some(settled) => {
                self.settled(settled)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Counts one record's outcome.
    fn settled(&mut self, (tag, result): (Option<i64>, Result<(), PublishError>)) -> Result<(), PublishError> {
        match (tag, result) {
            (tag, Ok(())) => {
                self.acknowledged += 1;
                self.acknowledged_tags.extend(tag);
                Ok(())
            }
            (Some(tag), Err(e)) if e.refuses_the_record() => {
                self.refused.push((tag, e));
                Ok(())
            }
            (_, Err(e)) => Err(e),
        }
    }
}
