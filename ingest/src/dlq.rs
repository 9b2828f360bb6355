//! The dead-letter queue (SPEC §1): a rejected message goes to `<topic>.dlq` with its original key,
//! value and headers untouched, plus `tally-error-code` (a stable [`tally_schemas::RejectCode`]),
//! `tally-error-detail`, and the source topic, partition and offset. Nothing of it enters a ledger.

use tally_schemas::Rejection;

use crate::config::KafkaConfig;
use crate::consumer::Delivery;
use crate::error::Result;
use crate::publisher::{EventPublisher, Published};

pub const HEADER_ERROR_CODE: &str = "tally-error-code";
pub const HEADER_ERROR_DETAIL: &str = "tally-error-detail";
pub const HEADER_SOURCE_TOPIC: &str = "tally-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "tally-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "tally-source-offset";

pub struct DeadLetterQueue {
    publisher: EventPublisher,
}

impl DeadLetterQueue {
    pub fn new(config: &KafkaConfig, dlq_topic: &str) -> Result<Self> {
        Ok(DeadLetterQueue { publisher: EventPublisher::new(config, dlq_topic)? })
    }

    /// The DLQ topic for an events topic.
    pub fn topic_for(events_topic: &str) -> String {
        format!("{events_topic}.dlq")
    }

    pub fn topic(&self) -> &str {
        self.publisher.topic()
    }

    /// Publishes one rejected delivery and waits until the broker has it.
    pub async fn send(&self, source_topic: &str, delivery: &Delivery, rejection: &Rejection) -> Result<Published> {
        let partition = delivery.partition.to_string();
        let offset = delivery.offset.to_string();
        let mut headers: Vec<(&str, &[u8])> =
            delivery.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        headers.extend([
            (HEADER_ERROR_CODE, rejection.code.as_str().as_bytes()),
            (HEADER_ERROR_DETAIL, rejection.detail.as_bytes()),
            (HEADER_SOURCE_TOPIC, source_topic.as_bytes()),
            (HEADER_SOURCE_PARTITION, partition.as_bytes()),
            (HEADER_SOURCE_OFFSET, offset.as_bytes()),
        ]);
        self.publisher.publish(delivery.key.as_deref(), &delivery.value, &headers).await
    }
}
