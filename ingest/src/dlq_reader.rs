//! Reading the dead-letter queue back, for an operator (`tally dlq inspect|replay`): every
//! message of the DLQ topic from its start to where each partition ended when the read began,
//! with the `tally-*` headers [`crate::DeadLetterQueue`] added taken apart from the original
//! ones.
//!
//! Invariants: the read is bounded (it stops at the high watermarks taken when it begins, or at
//! a partition's reported end, so a DLQ still being written does not keep it going); it joins no consumer group and commits
//! nothing, so reading changes nothing for anyone; messages are handed to the caller one at a
//! time, so memory does not grow with the topic.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::dlq::{HEADER_DLQ_FORM, HEADER_ERROR_CODE, HEADER_ERROR_DETAIL, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC};
use crate::error::{Error, Result};

/// One message of the DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Where it is in the DLQ topic.
    pub partition: i32,
    pub offset: i64,
    /// The reject code (`tally-error-code`), and its detail.
    pub code: String,
    pub detail: String,
    /// Where the original was: topic, partition and offset.
    pub source: (String, i32, i64),
    /// `true` for a bounded form: digests and prefixes, not the original message.
    pub bounded: bool,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// The original headers, in order, without the `tally-*` ones the DLQ added.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// How long a read waits for the broker to answer at all.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads `topic` (a DLQ) from its start to the end each partition had when the read began,
/// calling `visit` on every message in partition order. Blocking: call it from a blocking
/// thread. Returns how many were read.
pub fn read_dead_letters(config: &KafkaConfig, topic: &str, mut visit: impl FnMut(DeadLetter)) -> Result<u64> {
    let consumer: BaseConsumer = config
        .client_config()
        .set("group.id", "tally-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The end of a partition is reported, so offsets missing below the watermark
        // (compaction, aborted transactions' markers) do not keep the read waiting.
        .set("enable.partition.eof", "true")
        .create()
        .map_err(Error::Client)?;
    let metadata = consumer.fetch_metadata(Some(topic), READ_TIMEOUT).map_err(Error::Consume)?;
    let partitions: Vec<i32> = metadata.topics().iter().filter(|t| t.name() == topic).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if partitions.is_empty() {
        return Err(Error::Admin { topic: topic.to_string(), detail: "no such topic, or it has no partitions".into() });
    }
    // Where each partition ends now; partitions already at their start need no read.
    let mut ends = std::collections::BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, READ_TIMEOUT).map_err(Error::Consume)?;
        if high > low {
            ends.insert(p, high);
            assignment.add_partition_offset(topic, p, Offset::Beginning).map_err(Error::Consume)?;
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&assignment).map_err(Error::Consume)?;
    let mut read = 0u64;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        let Some(polled) = consumer.poll(Duration::from_millis(500)) else {
            if last_progress.elapsed() > READ_TIMEOUT {
                return Err(Error::PollThread(format!(
                    "no message from {topic} for {} s, with partitions {:?} not read to their end",
                    READ_TIMEOUT.as_secs(),
                    ends.keys().collect::<Vec<_>>()
                )));
            }
            continue;
        };
        let message = match polled {
            Ok(message) => message,
            Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                ends.remove(&partition);
                continue;
            }
            Err(e) => return Err(Error::Consume(e)),
        };
        last_progress = Instant::now();
        let (partition, offset) = (message.partition(), message.offset());
        let Some(&end) = ends.get(&partition) else { continue };
        if offset >= end {
            ends.remove(&partition);
            continue;
        }
        visit(dead_letter(&message));
        read += 1;
        if offset + 1 >= end {
            ends.remove(&partition);
        }
    }
    Ok(read)
}

/// A DLQ message, its `tally-*` headers taken apart.
fn dead_letter(message: &rdkafka::message::BorrowedMessage<'_>) -> DeadLetter {
    let mut letter = DeadLetter {
        partition: message.partition(),
        offset: message.offset(),
        code: String::new(),
        detail: String::new(),
        source: (String::new(), -1, -1),
        bounded: false,
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().unwrap_or_default().to_vec(),
        headers: Vec::new(),
    };
    for header in message.headers().into_iter().flat_map(|hs| hs.iter()) {
        let value = header.value.unwrap_or_default();
        let text = || String::from_utf8_lossy(value).into_owned();
        match header.key {
            HEADER_ERROR_CODE => letter.code = text(),
            HEADER_ERROR_DETAIL => letter.detail = text(),
            HEADER_SOURCE_TOPIC => letter.source.0 = text(),
            HEADER_SOURCE_PARTITION => letter.source.1 = text().parse().unwrap_or(-1),
            HEADER_SOURCE_OFFSET => letter.source.2 = text().parse().unwrap_or(-1),
            HEADER_DLQ_FORM => letter.bounded = value == b"bounded",
            other => letter.headers.push((other.to_string(), value.to_vec())),
        }
    }
    letter
}
