//! The gateway-side publisher: one event per message, key = tenant_id, so each tenant's events
//! land on one partition in publish order.
//!
//! The producer is idempotent (`enable.idempotence=true`, `acks=all`): librdkafka retries without
//! duplicating or reordering within a partition. Every delivery result reaches the caller; a
//! failure is an [`Error::Delivery`], never a log line.

use std::future::Future;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

/// Where a message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub partition: i32,
    pub offset: i64,
}

pub struct EventPublisher {
    producer: FutureProducer,
    topic: String,
}

impl EventPublisher {
    pub fn new(config: &KafkaConfig, topic: &str) -> Result<Self> {
        config.validate()?;
        let producer = config
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            // Java's partitioner, so the ledger (and any client) can compute a tenant's partition.
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(Error::Client)?;
        Ok(EventPublisher { producer, topic: topic.to_string() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes one message and waits for its delivery report.
    pub async fn publish(&self, key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])]) -> Result<Published> {
        self.enqueue(key, value, headers).await?.await
    }

    /// Hands one message to librdkafka, waiting only while its queue is full, and returns a future
    /// of the delivery report. Enqueue order is publish order, so callers that await `enqueue` in
    /// sequence keep each tenant's order while many deliveries are in flight.
    pub async fn enqueue(
        &self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<impl Future<Output = Result<Published>> + Send + 'static> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, v) in headers {
            owned = owned.insert(Header { key: name, value: Some(*v) });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).payload(value).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        let future = loop {
            match self.producer.send_result(record) {
                Ok(future) => break future,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(Error::Delivery { topic: self.topic.clone(), source: e }),
            }
        };
        let topic = self.topic.clone();
        Ok(async move {
            match future.await {
                Ok(Ok(delivery)) => Ok(Published { partition: delivery.partition, offset: delivery.offset }),
                Ok(Err((e, _))) => Err(Error::Delivery { topic, source: e }),
                Err(_canceled) => Err(Error::Delivery { topic, source: KafkaError::Canceled }),
            }
        })
    }

    /// Waits for every enqueued message to be delivered or to fail.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::PollThread(e.to_string()))?
            .map_err(|e| Error::Delivery { topic: self.topic.clone(), source: e })
    }
}
