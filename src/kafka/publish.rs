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
}

struct Pending {
    topic: String,
    delivery: DeliveryFuture,
}

impl std::future::Future for Pending {
    type Output = Result<(), PublishError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        std::pin::Pin::new(&mut this.delivery)
            .poll(cx)
            .map(|result| match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((cause, _))) => Err(PublishError::Delivery {
                    topic: std::mem::take(&mut this.topic),
                    cause,
                }),
                Err(_) => Err(PublishError::Canceled),
            })
    }
}

impl Batch<'_> {
    /// Queues one record; waits while the producer's queue or the in-flight bound
    /// is full.
    pub async fn send(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), PublishError> {
        self.send_record(topic, Some(key), payload).await
    }

    /// Like [`Batch::send`], for a record that may have no key.
    pub async fn send_record(&mut self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), PublishError> {
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
                    });
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !self.settle_one().await? {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err((source, _)) => {
                    return Err(PublishError::Delivery {
                        topic: topic.to_owned(),
                        cause: source,
                    })
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
        while let Some(Some(result)) = futures_util::FutureExt::now_or_never(self.pending.next()) {
            result?;
            self.acknowledged += 1;
        }
        Ok(self.acknowledged)
    }

    /// Waits for every record sent; returns how many were acknowledged.
    pub async fn finish(mut self) -> Result<u64, PublishError> {
        while self.settle_one().await? {}
        Ok(self.acknowledged)
    }

    async fn settle_one(&mut self) -> Result<bool, PublishError> {
        match self.pending.next().await {
            Some(result) => {
                result?;
                self.acknowledged += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
