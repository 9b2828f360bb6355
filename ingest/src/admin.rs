//! Topic creation for local runs, tests and first start: create what is missing, leave what exists.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `cleanup.policy=compact` (for `tally.budget`, whose key is the tenant).
    pub compacted: bool,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        TopicSpec { name: name.into(), partitions, compacted: false }
    }
}

/// Every topic the broker has, with its partition count. Lists all topics rather than asking
/// for some by name, because asking for a missing topic by name can make a broker create it.
pub async fn topic_partitions(config: &KafkaConfig, timeout: Duration) -> Result<BTreeMap<String, i32>> {
    config.validate()?;
    let admin: AdminClient<DefaultClientContext> = config.client_config().create().map_err(Error::Client)?;
    tokio::task::spawn_blocking(move || {
        let metadata =
            admin.inner().fetch_metadata(None, timeout).map_err(|e| Error::Admin { topic: "*".into(), detail: format!("cannot list topics: {e}") })?;
        Ok(metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| (t.name().to_string(), t.partitions().len() as i32)).collect())
    })
    .await
    .map_err(|e| Error::PollThread(e.to_string()))?
}

/// A long-lived client that asks the broker for its topics, for a service that checks, every
/// few seconds, that the broker answers and that a topic's partition count has not changed: one
/// connection for the service's life, not one per check.
pub struct BrokerProbe {
    admin: std::sync::Arc<AdminClient<DefaultClientContext>>,
}

impl BrokerProbe {
    pub fn new(config: &KafkaConfig) -> Result<BrokerProbe> {
        config.validate()?;
        Ok(BrokerProbe { admin: std::sync::Arc::new(config.client_config().create().map_err(Error::Client)?) })
    }

    /// The partition count of `topic` (`None` when the broker does not list it), or an error
    /// when the broker does not answer within `timeout`. Lists all topics, like
    /// [`topic_partitions`], so asking never creates one.
    pub async fn partitions(&self, topic: &str, timeout: Duration) -> Result<Option<i32>> {
        let (admin, topic) = (std::sync::Arc::clone(&self.admin), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let metadata = admin
                .inner()
                .fetch_metadata(None, timeout)
                .map_err(|e| Error::Admin { topic: topic.clone(), detail: format!("the broker did not answer: {e}") })?;
            Ok(metadata.topics().iter().find(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len() as i32))
        })
        .await
        .map_err(|e| Error::PollThread(e.to_string()))?
    }
}

/// Creates every topic that does not exist yet; an existing topic is left as it is.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[TopicSpec]) -> Result<()> {
    config.validate()?;
    let admin: AdminClient<DefaultClientContext> = config.client_config().create().map_err(Error::Client)?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(1));
            if t.compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new_topics.iter(), &options).await.map_err(|e| Error::Admin { topic: "*".into(), detail: e.to_string() })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::Admin { topic, detail: code.to_string() }),
        }
    }
    Ok(())
}
