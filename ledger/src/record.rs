//! Ledger record bytes: what entry `i` of a tenant's log holds (SPEC §2).
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

#[derive(Serialize)]
struct EventRecord<'a> {
    seq: u64,
    #[serde(rename = "type")]
    record_type: &'static str,
    event: &'a Event,
    payload_sha256: String,
    source: &'a Source,
}

/// The entry bytes of an `event` record.
pub fn event_record(seq: u64, event: &Event, payload_sha256: &[u8; 32], source: &Source) -> Result<Vec<u8>> {
    let record = EventRecord { seq, record_type: "event", event, payload_sha256: hex::encode(payload_sha256), source };
    let bytes = serde_json::to_vec(&record).map_err(|e| Error::BadCheckpoint(format!("record encoding failed: {e}")))?;
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(Error::EntryTooLarge(bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_canonical_and_deterministic() {
        let event = Event::from_json(br#"{"tenant_id":"acme","kind":"llm_call","event_id":"e1","occurred_at":"2026-01-01T01:00:00+01:00","attributes":{"b":"2","a":"1"}}"#).unwrap();
        let src = Source::File { file: "in.jsonl".into(), line: 3 };
        let a = event_record(7, &event, &[0xab; 32], &src).unwrap();
        let b = event_record(7, &event, &[0xab; 32], &src).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with(r#"{"seq":7,"type":"event","event":{"event_id":"e1","tenant_id":"acme","occurred_at":"2026-01-01T00:00:00Z""#), "{text}");
        assert!(text.contains(r#""attributes":{"a":"1","b":"2"}"#), "{text}");
        assert!(text.ends_with(r#""source":{"kind":"file","file":"in.jsonl","line":3}}"#), "{text}");
    }
}
