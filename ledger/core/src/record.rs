//! Ledger record bytes: what entry `i` of a tenant's log holds (docs/records.md).
//!
//! Canonical JSON: UTF-8, no insignificant whitespace, object members in the fixed order of the
//! structs below, absent optionals omitted, maps sorted by key. The bytes depend only on the input
//! (the event, the exact payload, its source) and never on wall-clock time, so replaying the same
//! input yields byte-identical entries and roots.

use serde::Serialize;
use tally_schemas::Event;

use crate::error::{Error, Result};
use crate::log::MAX_ENTRY_BYTES;

/// Where a record's input came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    Kafka { topic: String, partition: i32, offset: i64, timestamp_ms: Option<i64> },
    File { file: String, line: u64 },
}

/// What a record says about one event. `ce_source` is the CloudEvents `source` (part of the
/// idempotency key) for events that arrived as CloudEvents.
#[derive(Debug, Clone, Copy)]
pub struct EventInput<'a> {
    pub event: &'a Event,
    pub ce_source: Option<&'a str>,
    pub payload_sha256: &'a [u8; 32],
    pub source: &'a Source,
}

#[derive(Serialize)]
struct EventRecord<'a> {
    seq: u64,
    #[serde(rename = "type")]
    record_type: &'static str,
    event: &'a Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    ce_source: Option<&'a str>,
    payload_sha256: String,
    source: &'a Source,
    /// For `conflict` records: the sequence number of the record holding the first version.
    #[serde(skip_serializing_if = "Option::is_none")]
    conflicts_with_seq: Option<u64>,
}

fn encode(record: &EventRecord<'_>) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(record).map_err(|e| Error::BadRecord(format!("record encoding failed: {e}")))?;
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(Error::EntryTooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// The entry bytes of an `event` record.
pub fn event_record(seq: u64, input: EventInput<'_>) -> Result<Vec<u8>> {
    encode(&EventRecord {
        seq,
        record_type: "event",
        event: input.event,
        ce_source: input.ce_source,
        payload_sha256: hex::encode(input.payload_sha256),
        source: input.source,
        conflicts_with_seq: None,
    })
}

/// The entry bytes of a `conflict` record: an event whose idempotency key was already used, with
/// different content, at `first_seq`. It is kept (never silently replaced or dropped) and counted.
pub fn conflict_record(seq: u64, input: EventInput<'_>, first_seq: u64) -> Result<Vec<u8>> {
    encode(&EventRecord {
        seq,
        record_type: "conflict",
        event: input.event,
        ce_source: input.ce_source,
        payload_sha256: hex::encode(input.payload_sha256),
        source: input.source,
        conflicts_with_seq: Some(first_seq),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_canonical_and_deterministic() {
        let event = Event::from_json(
            br#"{"tenant_id":"acme","kind":"llm_call","event_id":"e1","occurred_at":"2026-01-01T01:00:00+01:00","attributes":{"b":"2","a":"1"}}"#,
        )
        .unwrap();
        let src = Source::File { file: "in.jsonl".into(), line: 3 };
        let input = EventInput { event: &event, ce_source: None, payload_sha256: &[0xab; 32], source: &src };
        let a = event_record(7, input).unwrap();
        let b = event_record(7, input).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with(r#"{"seq":7,"type":"event","event":{"event_id":"e1","tenant_id":"acme","occurred_at":"2026-01-01T00:00:00Z""#), "{text}");
        assert!(text.contains(r#""attributes":{"a":"1","b":"2"}"#), "{text}");
        assert!(text.ends_with(r#""source":{"kind":"file","file":"in.jsonl","line":3}}"#), "{text}");
        let conflict = String::from_utf8(conflict_record(9, EventInput { ce_source: Some("gw/eu"), ..input }, 7).unwrap()).unwrap();
        assert!(conflict.starts_with(r#"{"seq":9,"type":"conflict","#), "{conflict}");
        assert!(conflict.contains(r#""ce_source":"gw/eu","#) && conflict.ends_with(r#","conflicts_with_seq":7}"#), "{conflict}");
    }
}
