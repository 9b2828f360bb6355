//! The Kafka side of Tally.
//!
//! * [`EventPublisher`]: what gateways use to publish events, keyed by tenant, through an
//!   idempotent producer; every delivery failure is returned, never swallowed.
//! * [`EventConsumer`]: a consumer-group member that yields batches of [`Delivery`]s (a validated,
//!   tenant-bound event or a [`tally_schemas::Rejection`], with its Kafka source). Where each newly
//!   assigned partition resumes is decided by a [`PartitionSink`], not by the group's committed
//!   offset, so the ledger can own its offsets; the sink is told before a partition is revoked.
//! * [`DeadLetterQueue`]: the original bytes and headers of a rejected message, plus
//!   `tally-error-*` headers, to `<topic>.dlq`; [`read_dead_letters`] reads them back.
//! * [`tenant_partition`]: the partition a tenant's events land in (Kafka's murmur2 partitioner).
//! * [`KafkaConfig`]: bootstrap plus librdkafka pass-through properties.
//!
//! librdkafka calls block, so polling happens on blocking threads; nothing here blocks the runtime.

mod admin;
mod config;
mod consumer;
mod dlq;
mod dlq_reader;
mod error;
mod publisher;

pub use admin::{ensure_topics, topic_partitions, BrokerProbe, TopicSpec};
pub use config::KafkaConfig;
pub use consumer::{Delivery, EventConsumer, PartitionSink, Resume};
pub use dlq::{
    DeadLetterQueue, DeadLettered, DlqForm, HEADER_DLQ_FORM, HEADER_ERROR_CODE, HEADER_ERROR_DETAIL, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
};
pub use dlq_reader::{read_dead_letters, DeadLetter};
pub use error::{Error, Result};
pub use publisher::{EventPublisher, Published};
pub use tally_schemas::{murmur2, tenant_partition};
