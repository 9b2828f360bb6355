//! The dead-letter queue (README, "Events in"): a rejected message goes to `<topic>.dlq` with its
//! original key, value and headers untouched, plus `tally-error-code` (a stable
//! [`tally_schemas::RejectCode`]), `tally-error-detail`, and the source topic, partition and
//! offset. Nothing of it enters a ledger.
//!
//! No single message may stop the pipeline, so dead-lettering never gives up:
//! * a message the broker refuses whole as too large (its limit, once the `tally-*` headers are
//!   added), or that still fails after [`WHOLE_TRIES`] tries for another reason than a timeout,
//!   is dead-lettered in *bounded form*: header
//!   `tally-dlq-form: bounded`, a value that is a JSON object with the SHA-256 and size of the
//!   original value and key and a base64 prefix of the value, the key's first 4 KiB as the
//!   message key, and the original headers when they are small. The error code is the original
//!   one;
//! * a send that timed out (the broker unreachable) is retried, with backoff, until it succeeds;
//!   the caller's partition waits meanwhile, which loses nothing. A process shutdown bounds it.

use std::time::Duration;

use base64::Engine as _;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use sha2::{Digest, Sha256};
use tally_schemas::Rejection;

use crate::config::KafkaConfig;
use crate::consumer::Delivery;
use crate::error::{Error, Result};
use crate::publisher::{EventPublisher, Published};

pub const HEADER_ERROR_CODE: &str = "tally-error-code";
pub const HEADER_ERROR_DETAIL: &str = "tally-error-detail";
pub const HEADER_SOURCE_TOPIC: &str = "tally-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "tally-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "tally-source-offset";
/// `bounded` on a message dead-lettered in bounded form; absent on a whole copy.
pub const HEADER_DLQ_FORM: &str = "tally-dlq-form";

/// Bytes of the original value (and key) a bounded form keeps.
pub const BOUNDED_PREFIX_BYTES: usize = 4096;
/// Original headers are kept in a bounded form only up to this many bytes in all.
const BOUNDED_HEADER_BYTES: usize = 16 * 1024;
/// The longest wait between two tries of a send that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Tries of the whole message that fail for another reason than a timeout or its size before
/// the bounded form is sent instead.
pub const WHOLE_TRIES: u32 = 3;

/// How a rejected message reached the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqForm {
    /// Key, value and headers as they came.
    Whole,
    /// Digests, sizes and prefixes: the broker would not take the whole message.
    Bounded,
}

/// Where a dead letter landed, in which form, after how many failed tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLettered {
    pub published: Published,
    pub form: DlqForm,
    pub failed_tries: u32,
}

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

    /// Publishes one rejected delivery and waits until the broker has it, whole or in bounded
    /// form; retries for as long as the broker cannot be reached.
    pub async fn send(&self, source_topic: &str, delivery: &Delivery, rejection: &Rejection) -> DeadLettered {
        self.send_reporting(source_topic, delivery, rejection, |_, _| {}).await
    }

    /// As [`DeadLetterQueue::send`], calling `failed(error, tries)` after each failed try, so a
    /// service can report a stalled DLQ while it waits.
    pub async fn send_reporting(&self, source_topic: &str, delivery: &Delivery, rejection: &Rejection, mut failed: impl FnMut(&Error, u32)) -> DeadLettered {
        let mut form = DlqForm::Whole;
        let mut failed_tries = 0u32;
        let mut backoff = Duration::from_millis(100);
        loop {
            let sent = match form {
                DlqForm::Whole => self.send_whole(source_topic, delivery, rejection).await,
                DlqForm::Bounded => self.send_bounded(source_topic, delivery, rejection).await,
            };
            let error = match sent {
                Ok(published) => return DeadLettered { published, form, failed_tries },
                Err(e) => e,
            };
            failed_tries += 1;
            failed(&error, failed_tries);
            // Too large is final at once; another refusal gets a few tries (it may pass, and the
            // whole message is worth keeping); a timeout is retried as it is, for ever.
            if form == DlqForm::Whole && (is_too_large(&error) || (!is_timeout(&error) && failed_tries >= WHOLE_TRIES)) {
                tracing::warn!(partition = delivery.partition, offset = delivery.offset, bytes = delivery.value.len(), error = %error, "the DLQ refused the whole message; sending it in bounded form");
                form = DlqForm::Bounded;
                continue;
            }
            tracing::error!(partition = delivery.partition, offset = delivery.offset, tries = failed_tries, error = %error, "dead-lettering failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn send_whole(&self, source_topic: &str, delivery: &Delivery, rejection: &Rejection) -> Result<Published> {
        let mut headers: Vec<(&str, &[u8])> = delivery.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        let (partition, offset) = (delivery.partition.to_string(), delivery.offset.to_string());
        headers.extend(tally_headers(source_topic, &partition, &offset, rejection));
        self.publisher.publish(delivery.key.as_deref(), &delivery.value, &headers).await
    }

    async fn send_bounded(&self, source_topic: &str, delivery: &Delivery, rejection: &Rejection) -> Result<Published> {
        let value = bounded_value(delivery);
        let header_bytes: usize = delivery.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        if header_bytes <= BOUNDED_HEADER_BYTES {
            headers.extend(delivery.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        }
        let (partition, offset) = (delivery.partition.to_string(), delivery.offset.to_string());
        headers.extend(tally_headers(source_topic, &partition, &offset, rejection));
        headers.push((HEADER_DLQ_FORM, b"bounded"));
        let key = delivery.key.as_deref().map(|k| &k[..k.len().min(BOUNDED_PREFIX_BYTES)]);
        self.publisher.publish(key, &value, &headers).await
    }
}

fn tally_headers<'a>(source_topic: &'a str, partition: &'a str, offset: &'a str, rejection: &'a Rejection) -> [(&'static str, &'a [u8]); 5] {
    // The detail is ours, but it quotes input: keep it short.
    let detail = rejection.detail.as_bytes();
    let detail = &detail[..floor_char_boundary(&rejection.detail, 1024)];
    [
        (HEADER_ERROR_CODE, rejection.code.as_str().as_bytes()),
        (HEADER_ERROR_DETAIL, detail),
        (HEADER_SOURCE_TOPIC, source_topic.as_bytes()),
        (HEADER_SOURCE_PARTITION, partition.as_bytes()),
        (HEADER_SOURCE_OFFSET, offset.as_bytes()),
    ]
}

/// The largest index ≤ `max` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    (0..=max.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// The bounded form's value: what identifies the original message, in a few KiB.
fn bounded_value(delivery: &Delivery) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let hex = |bytes: &[u8]| Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let header_bytes: usize = delivery.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let key = delivery.key.as_deref().unwrap_or_default();
    serde_json::json!({
        "form": "bounded",
        "value_sha256": hex(&delivery.value),
        "value_bytes": delivery.value.len(),
        "value_prefix_base64": b64.encode(&delivery.value[..delivery.value.len().min(BOUNDED_PREFIX_BYTES)]),
        "key_sha256": hex(key),
        "key_bytes": key.len(),
        "headers": delivery.headers.len(),
        "header_bytes": header_bytes,
        "headers_kept": header_bytes <= BOUNDED_HEADER_BYTES,
    })
    .to_string()
    .into_bytes()
}

/// The librdkafka or broker code of a failed send.
fn code_of(error: &Error) -> Option<RDKafkaErrorCode> {
    match error {
        Error::Delivery { source: KafkaError::MessageProduction(code), .. } => Some(*code),
        Error::Delivery { source, .. } => source.rdkafka_error_code(),
        _ => None,
    }
}

/// A send that timed out may succeed later as it is.
fn is_timeout(error: &Error) -> bool {
    code_of(error) == Some(RDKafkaErrorCode::MessageTimedOut)
}

/// The message as it is will never be taken: it is over the producer's or the broker's limit.
fn is_too_large(error: &Error) -> bool {
    matches!(code_of(error), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge | RDKafkaErrorCode::InvalidMessageSize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_form_identifies_the_original_in_a_few_kib() {
        let value = vec![b'x'; 1_100_000];
        let delivery = Delivery {
            partition: 3,
            offset: 77,
            timestamp_ms: None,
            key: Some(b"acme".to_vec()),
            value: value.clone(),
            headers: vec![("h".into(), vec![1; 10])],
            outcome: Err(Rejection::new(tally_schemas::RejectCode::TooLarge, "too large")),
        };
        let bounded = bounded_value(&delivery);
        assert!(bounded.len() < 2 * BOUNDED_PREFIX_BYTES, "{} bytes", bounded.len());
        let json: serde_json::Value = serde_json::from_slice(&bounded).unwrap();
        assert_eq!(json["value_bytes"], 1_100_000);
        assert_eq!(json["value_sha256"].as_str().unwrap().len(), 64);
        let prefix = base64::engine::general_purpose::STANDARD.decode(json["value_prefix_base64"].as_str().unwrap()).unwrap();
        assert_eq!(prefix, value[..BOUNDED_PREFIX_BYTES]);
        assert_eq!((json["headers"].as_u64(), json["headers_kept"].as_bool()), (Some(1), Some(true)));
    }

    #[test]
    fn details_are_cut_on_a_character_boundary() {
        let s = "é".repeat(600);
        let cut = floor_char_boundary(&s, 1024);
        assert!(cut <= 1024 && s.is_char_boundary(cut));
    }
}
