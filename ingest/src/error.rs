//! Errors of the Kafka layer. Messages are lowercase and name what failed.

use rdkafka::error::KafkaError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid kafka configuration: {0}")]
    Config(String),
    #[error("kafka client could not be created: {0}")]
    Client(#[source] KafkaError),
    #[error("delivery to {topic} failed: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("consumer error: {0}")]
    Consume(#[source] KafkaError),
    #[error("offset commit failed: {0}")]
    Commit(#[source] KafkaError),
    #[error("topic admin failed for {topic}: {detail}")]
    Admin { topic: String, detail: String },
    #[error("the blocking kafka poll thread failed: {0}")]
    PollThread(String),
}
