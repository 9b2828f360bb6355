//! Ledger record bytes: what entry `i` of a tenant's log holds (docs/records.md). The one codec
//! of those bytes: every record is encoded by a function here and every reader (the service's
//! recovery, the budget fold, the projection) decodes it with [`Record::decode`].
//!
//! Canonical JSON: UTF-8, no insignificant whitespace, object members in the fixed order of the
//! structs below, absent optionals omitted, maps sorted by key. The bytes depend only on the input
//! (the event, the exact payload, its source) and never on wall-clock time, so replaying the same
//! input yields byte-identical entries and roots; for an event with personal fields, whose
//! record holds commitments salted from its subject's key ([`split_personal`],
//! docs/privacy.md), with the same subject key store.
//!
//! Budget-side records (`config`, `budget`, `admission`, `release`) are written by the budget
//! module of the ledger service, whose types the log core does not know: [`budget_record`] encodes
//! them under the same size rule, and [`Record`] is generic over how much of them a reader wants
//! (the budget fold: everything; the projection: the time; the service's recovery: nothing).
//! The one exception is the `statement` record ([`Statement`]): billing systems and verifiers
//! outside the ledger read it too, so its body is defined here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use jiff::civil::Date;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tally_schemas::Event;

use crate::error::{Error, Result};
use crate::log::MAX_ENTRY_BYTES;
use crate::privacy::{Commitment, KeyRef, Opening, Revealed};

/// Where a record's input came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// What an event was charged, rated once when the ledger appended it (docs/billing.md). Every
/// reader (budgets, roll-ups, reports, spend, statements) sums this, never re-prices the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// The amount in micro-units of `currency`; never negative.
    pub micros: i64,
    /// ISO 4217 code: the event's own for `event`, the price catalog's for `table` and `ceiling`.
    pub currency: String,
    pub basis: ChargeBasis,
    /// For `table` and `ceiling`: the seq of the `config` record (in the same log) whose price
    /// catalog rated the event, i.e. the catalog version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_seq: Option<u64>,
    /// The first day of the billing period the charge is billed in, in the tenant's calendar:
    /// the period the event occurred in, unless that period was already closed by a `statement`.
    pub period: String,
    /// For a late event: the first day of the closed period it occurred in. It is billed in the
    /// open `period` instead, as a correction; a closed period never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrects: Option<String>,
}

/// Where a charge's amount came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeBasis {
    /// The gateway's own cost on the event (`cost.amount_micros`).
    Event,
    /// The event's tokens × its model's price in the tenant's catalog.
    Table,
    /// The event's tokens × the catalog's ceiling price: its model has no price.
    Ceiling,
}

impl ChargeBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeBasis::Event => "event",
            ChargeBasis::Table => "table",
            ChargeBasis::Ceiling => "ceiling",
        }
    }
}

#[derive(Serialize)]
struct EventRecordOut<'a> {
    seq: u64,
    #[serde(rename = "type")]
    record_type: &'static str,
    event: &'a Event,
    /// Commitments to the event's personal fields (field → 64 hex digits), which `event` then
    /// lacks; absent for an event without any.
    #[serde(skip_serializing_if = "Option::is_none")]
    personal: Option<&'a BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ce_source: Option<&'a str>,
    /// In clear only for an event without personal fields; else it is one of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_sha256: Option<String>,
    source: &'a Source,
    /// For `conflict` records: the sequence number of the record holding the first version.
    #[serde(skip_serializing_if = "Option::is_none")]
    conflicts_with_seq: Option<u64>,
    /// For `event` records with something to charge: what the ledger charged.
    #[serde(skip_serializing_if = "Option::is_none")]
    charge: Option<&'a Charge>,
}

fn encode(record: &impl Serialize) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(record).map_err(|e| Error::BadRecord(format!("record encoding failed: {e}")))?;
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(Error::EntryTooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// The entry bytes of an `event` record, with its charge (`None`: nothing to charge).
///
/// The event is written as it is, personal fields included: the ledger writes events with
/// personal fields through [`crate::Ledger::append_event`], which commits to them instead.
pub fn event_record(seq: u64, input: EventInput<'_>, charge: Option<&Charge>) -> Result<Vec<u8>> {
    encode(&EventRecordOut {
        seq,
        record_type: "event",
        event: input.event,
        personal: None,
        ce_source: input.ce_source,
        payload_sha256: Some(hex::encode(input.payload_sha256)),
        source: input.source,
        conflicts_with_seq: None,
        charge,
    })
}

/// The entry bytes of an `event` (or, with `conflicts_with`, `conflict`) record whose event's
/// personal fields were taken out ([`split_personal`]): `input.event` is the event without
/// them and `commitments` holds a commitment to each (`payload_sha256` included).
pub(crate) fn personal_event_record(
    seq: u64,
    input: EventInput<'_>,
    commitments: &BTreeMap<String, String>,
    conflicts_with: Option<u64>,
    charge: Option<&Charge>,
) -> Result<Vec<u8>> {
    encode(&EventRecordOut {
        seq,
        record_type: if conflicts_with.is_some() { "conflict" } else { "event" },
        event: input.event,
        personal: Some(commitments),
        ce_source: input.ce_source,
        payload_sha256: None,
        source: input.source,
        conflicts_with_seq: conflicts_with,
        charge: if conflicts_with.is_some() { None } else { charge },
    })
}

/// What an erased personal field reads as, wherever a value would be.
pub const ERASED: &str = "erased";
/// The personal field that holds the input's SHA-256 (hex) in a record with personal fields:
/// with the other fields in clear, a digest of the whole input would let anyone test a guess.
pub const PAYLOAD_FIELD: &str = "payload_sha256";
/// The event field that names a record's subject, and is personal itself.
pub const SUBJECT_FIELD: &str = "actor_id";
/// Prefix of an attribute's field name: `attributes.<key>`.
const ATTRIBUTE_PREFIX: &str = "attributes.";

/// An event's personal fields, taken out of it (docs/privacy.md, "What is personal").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonalFields {
    /// The event without them: what a record's `event` member holds.
    pub event: Event,
    /// Whose they are: the event's `actor_id`, or `""` (the tenant itself) without one.
    pub subject: String,
    /// Field name → value: `actor_id` and `attributes.<key>`.
    pub values: BTreeMap<String, String>,
}

/// Takes the personal fields out of `event`: `actor_id` and every attribute. What budgets,
/// quotas and bills need (tenant, task, agent, workspace, model, tokens, cost, decision) stays.
pub fn split_personal(event: &Event) -> PersonalFields {
    let mut rest = event.clone();
    let mut values = BTreeMap::new();
    let subject = rest.actor_id.take();
    if let Some(actor) = &subject {
        values.insert(SUBJECT_FIELD.to_string(), actor.clone());
    }
    for (key, value) in std::mem::take(&mut rest.attributes) {
        values.insert(format!("{ATTRIBUTE_PREFIX}{key}"), value);
    }
    PersonalFields { event: rest, subject: subject.unwrap_or_default(), values }
}

/// An erasure: the records whose personal values were erased, as the `erasure` record holds
/// them (docs/privacy.md, "Erasure"). A record named here lost every field its `personal` member
/// commits to (they were all sealed under the erased key), so the fields are not repeated. The
/// subject is not named: its id is personal too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    /// When it was done (the ledger's clock).
    pub at: Timestamp,
    /// The name of the token that asked.
    pub by: String,
    /// `subject` (one subject's keys) or `tenant` (every subject's).
    pub scope: String,
    /// Only the keys of periods (UTC months) before this one, `YYYY-MM`: a retention pass, or an
    /// erasure asked `before` a date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The subject keys erased, by shard and id ([`KeyRef`]): what the ledger deletes once the
    /// record is durable, and again at an open that finds the record not yet followed by it.
    pub keys: Vec<KeyRef>,
    /// The records erased, ascending.
    pub seqs: Vec<u64>,
}

/// Most seqs one `erasure` record names: 20 digits and a comma each stay well below an entry.
pub const MAX_ERASED_SEQS_PER_RECORD: usize = 2_048;
/// Most keys one `erasure` record names (37 bytes each).
pub const MAX_ERASED_KEYS_PER_RECORD: usize = 256;

impl Erasure {
    /// Decodes entry `seq` as an `erasure` record; any other record is a [`Error::BadRecord`].
    pub fn decode(seq: u64, bytes: &[u8]) -> Result<Erasure> {
        decode_body(seq, bytes, "erasure", "an")
    }

    /// Splits it into parts of at most [`MAX_ERASED_SEQS_PER_RECORD`] seqs and
    /// [`MAX_ERASED_KEYS_PER_RECORD`] keys, each a record that fits an entry. An erasure naming
    /// nothing is one part.
    pub fn parts(self) -> Vec<Erasure> {
        let Erasure { at, by, scope, before, keys, seqs } = self;
        let seq_parts: Vec<&[u64]> = seqs.chunks(MAX_ERASED_SEQS_PER_RECORD).collect();
        let key_parts: Vec<&[KeyRef]> = keys.chunks(MAX_ERASED_KEYS_PER_RECORD).collect();
        let n = seq_parts.len().max(key_parts.len()).max(1);
        (0..n)
            .map(|i| Erasure {
                at,
                by: by.clone(),
                scope: scope.clone(),
                before: before.clone(),
                keys: key_parts.get(i).map_or_else(Vec::new, |k| k.to_vec()),
                seqs: seq_parts.get(i).map_or_else(Vec::new, |s| s.to_vec()),
            })
            .collect()
    }
}

/// The entry bytes of an `erasure` record.
pub fn erasure_record(seq: u64, erasure: &Erasure) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Out<'a> {
        seq: u64,
        #[serde(rename = "type")]
        record_type: &'static str,
        #[serde(flatten)]
        erasure: &'a Erasure,
    }
    encode(&Out { seq, record_type: "erasure", erasure })
}

/// The entry bytes of a `conflict` record: an event whose idempotency key was already used, with
/// different content, at `first_seq`. It is kept (never silently replaced or dropped) and counted.
pub fn conflict_record(seq: u64, input: EventInput<'_>, first_seq: u64) -> Result<Vec<u8>> {
    encode(&EventRecordOut {
        seq,
        record_type: "conflict",
        event: input.event,
        personal: None,
        ce_source: input.ce_source,
        payload_sha256: Some(hex::encode(input.payload_sha256)),
        source: input.source,
        conflicts_with_seq: Some(first_seq),
        // Conflicts are never charged: the first record with that key was.
        charge: None,
    })
}

/// A closed billing period, as its `statement` record holds it (docs/billing.md). The ledger's
/// budget module writes it (with `seq` and `type` around these members); readers outside the
/// ledger (the projection, the query service, verifiers) take it with [`Statement::decode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// When the period closed: its end plus the grace.
    pub at: Timestamp,
    /// The period's first day, in `time_zone` (what `charge.period` names).
    pub period: Date,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub time_zone: String,
    /// The first and last seq of the records charged in the period.
    pub first_seq: u64,
    pub last_seq: u64,
    /// The log size the statement covers: every record below its own seq.
    pub tree_size: u64,
    pub totals: Vec<StatementTotal>,
}

/// One line of a statement: what was charged in one currency on one basis, as regular charges
/// or as corrections of an earlier closed period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatementTotal {
    pub currency: String,
    pub basis: ChargeBasis,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub correction: bool,
    pub events: u64,
    pub micros: i64,
    /// The line's events' `usage` tokens: what the spend export's `PricingQuantity` counts for
    /// lines priced per token. Absent in statements written before lines carried them (which
    /// verify on their micros and events alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
}

impl Statement {
    /// Decodes entry `seq` of a tenant's log as a `statement` record; any other record is a
    /// [`Error::BadRecord`].
    pub fn decode(seq: u64, bytes: &[u8]) -> Result<Statement> {
        decode_body(seq, bytes, "statement", "a")
    }
}

/// The body of entry `seq` if it is a record of type `wanted` (`article` goes before its name in
/// the error for any other record).
fn decode_body<T: DeserializeOwned>(seq: u64, bytes: &[u8], wanted: &str, article: &str) -> Result<T> {
    #[derive(Deserialize)]
    struct Body<T> {
        #[serde(rename = "type")]
        record_type: String,
        #[serde(flatten)]
        body: T,
    }
    match Record::<Body<T>>::decode(seq, bytes)? {
        Record::Budget(Body { record_type, body }) if record_type == wanted => Ok(body),
        _ => Err(Error::BadRecord(format!("entry {seq} is not {article} {wanted} record"))),
    }
}

/// The entry bytes of a budget-side record: `record` serialises itself (its `type` member
/// included); the log core applies the entry size limit.
pub fn budget_record(record: &impl Serialize) -> Result<Vec<u8>> {
    encode(record)
}

/// The record types of the budget side, in the order docs/records.md lists them.
/// (`erasure`, written by the ledger service too, travels with them.)
const BUDGET_TYPES: [&str; 9] = ["config", "budget", "admission", "release", "freeze", "unfreeze", "flag", "statement", "erasure"];

/// One decoded record. `B` is what a reader takes from a budget-side record: the full record
/// (the budget fold), a few members (the projection), or [`serde::de::IgnoredAny`].
#[derive(Debug, Clone, PartialEq)]
pub enum Record<B> {
    /// An `event` or `conflict` record (boxed: budget-side readers often take nothing).
    Event(Box<EventRecord>),
    /// A `config`, `budget`, `admission`, `release`, `freeze`, `unfreeze`, `flag` or `statement`
    /// record.
    Budget(B),
}

/// An `event` or `conflict` record, owned.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    #[serde(rename = "type")]
    pub record_type: EventRecordType,
    /// The event, without its personal fields when `personal` commits to them.
    pub event: Event,
    /// Commitments to the event's personal fields, field → 64 hex digits (docs/privacy.md);
    /// empty for an event without any, and in records written before they were committed to.
    #[serde(default)]
    pub personal: BTreeMap<String, String>,
    #[serde(default)]
    pub ce_source: Option<String>,
    /// SHA-256 of the exact input bytes, lower-case hex; in `personal` instead when that is not
    /// empty.
    #[serde(default)]
    pub payload_sha256: Option<String>,
    pub source: Source,
    /// For `conflict` records: the sequence number of the record holding the first version.
    #[serde(default)]
    pub conflicts_with_seq: Option<u64>,
    /// What the event was charged; absent when there was nothing to charge, and in records
    /// written before rating moved into the log (readers then rate them as budgets did).
    #[serde(default)]
    pub charge: Option<Charge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventRecordType {
    Event,
    Conflict,
}

impl<B: DeserializeOwned> Record<B> {
    /// Decodes entry `seq` of a tenant's log. Fails with [`Error::BadRecord`] on bytes that are
    /// not a record, a record that names another seq, or an unknown record type.
    pub fn decode(seq: u64, bytes: &[u8]) -> Result<Record<B>> {
        #[derive(Deserialize)]
        struct Head<'a> {
            seq: u64,
            #[serde(rename = "type", borrow)]
            record_type: Cow<'a, str>,
        }
        let bad = |e: serde_json::Error| Error::BadRecord(format!("entry {seq}: {e}"));
        let head: Head<'_> = serde_json::from_slice(bytes).map_err(bad)?;
        if head.seq != seq {
            return Err(Error::BadRecord(format!("entry {seq} says it is seq {}", head.seq)));
        }
        match head.record_type.as_ref() {
            "event" | "conflict" => Ok(Record::Event(Box::new(serde_json::from_slice(bytes).map_err(bad)?))),
            t if BUDGET_TYPES.contains(&t) => Ok(Record::Budget(serde_json::from_slice(bytes).map_err(bad)?)),
            other => Err(Error::BadRecord(format!("entry {seq}: unknown record type {other:?}"))),
        }
    }
}

impl EventRecord {
    /// The event as first recorded (an `event` record), not a conflicting second version.
    pub fn is_conflict(&self) -> bool {
        self.record_type == EventRecordType::Conflict
    }

    /// The record's [`input_time`].
    pub fn input_time(&self) -> Timestamp {
        input_time(&self.event, &self.source)
    }

    /// The event with its personal fields put back as `revealed` gives them (the record's
    /// sealed values), each `"erased"` where they are gone (`None`, or [`Revealed::Erased`]).
    /// `payload_sha256` is not an event field and stays out.
    pub fn revealed_event(&self, revealed: Option<&Revealed>) -> Event {
        let mut event = self.event.clone();
        for field in self.personal.keys() {
            let value = match revealed {
                Some(Revealed::Open(values)) => values.get(field).map_or(ERASED, |o| o.value.as_str()),
                _ => ERASED,
            };
            if field == SUBJECT_FIELD {
                event.actor_id = Some(value.to_string());
            } else if let Some(key) = field.strip_prefix(ATTRIBUTE_PREFIX) {
                event.attributes.insert(key.to_string(), value.to_string());
            }
        }
        event
    }

    /// Checks values a reader was given against the record's commitments: each must be a field
    /// the record commits to, and open its commitment. Fields not given are the erased ones.
    pub fn check_openings(&self, openings: &BTreeMap<String, Opening>) -> Result<()> {
        for (field, opening) in openings {
            let Some(committed) = self.personal.get(field) else {
                return Err(Error::BadRecord(format!("entry {}: it commits to no field {field:?}", self.seq)));
            };
            if !opening.opens(field, &Commitment::from_hex(committed)?) {
                return Err(Error::BadRecord(format!("entry {}: the value given for {field:?} does not match its commitment", self.seq)));
            }
        }
        Ok(())
    }
}

/// How far an input shows time has come: the event's `occurred_at`, but never past its Kafka
/// message's timestamp (when it has one). Billing periods close on this clock, the input's, so
/// the ledger's lag never changes a bill and a replay closes them at the same records
/// (docs/billing.md). An event cannot occur after it was published: the message timestamp
/// bounds a gateway clock that runs ahead (and with `LogAppendTime` topics it is the broker's).
pub fn input_time(event: &Event, source: &Source) -> Timestamp {
    let published = match source {
        Source::Kafka { timestamp_ms: Some(ms), .. } => Timestamp::from_millisecond(*ms).ok(),
        _ => None,
    };
    published.map_or(event.occurred_at, |p| p.min(event.occurred_at))
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
        let a = event_record(7, input, None).unwrap();
        let b = event_record(7, input, None).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with(r#"{"seq":7,"type":"event","event":{"event_id":"e1","tenant_id":"acme","occurred_at":"2026-01-01T00:00:00Z""#), "{text}");
        assert!(text.contains(r#""attributes":{"a":"1","b":"2"}"#), "{text}");
        assert!(text.ends_with(r#""source":{"kind":"file","file":"in.jsonl","line":3}}"#), "{text}");
        let conflict = String::from_utf8(conflict_record(9, EventInput { ce_source: Some("gw/eu"), ..input }, 7).unwrap()).unwrap();
        assert!(conflict.starts_with(r#"{"seq":9,"type":"conflict","#), "{conflict}");
        assert!(conflict.contains(r#""ce_source":"gw/eu","#) && conflict.ends_with(r#","conflicts_with_seq":7}"#), "{conflict}");
    }

    #[test]
    fn decode_reads_back_what_encode_wrote() {
        let event = Event::from_json(br#"{"tenant_id":"acme","kind":"llm_call","event_id":"e1","occurred_at":"2026-01-01T00:00:00Z"}"#).unwrap();
        let src = Source::Kafka { topic: "events".into(), partition: 2, offset: 41, timestamp_ms: None };
        let input = EventInput { event: &event, ce_source: Some("gw/eu"), payload_sha256: &[0xcd; 32], source: &src };
        let Record::Event(r) = Record::<serde::de::IgnoredAny>::decode(3, &conflict_record(3, input, 1).unwrap()).unwrap() else { panic!("not an event") };
        assert_eq!(r.seq, 3);
        assert!(r.is_conflict());
        assert_eq!(r.event, event);
        assert_eq!(r.ce_source.as_deref(), Some("gw/eu"));
        assert_eq!(r.payload_sha256, Some("cd".repeat(32)));
        assert_eq!(r.source, src);
        assert_eq!(r.conflicts_with_seq, Some(1));
        let Record::Event(r) = Record::<serde::de::IgnoredAny>::decode(4, &event_record(4, input, None).unwrap()).unwrap() else { panic!("not an event") };
        assert!(!r.is_conflict() && r.conflicts_with_seq.is_none());
    }

    #[test]
    fn budget_side_records_decode_into_the_readers_type() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Release {
            #[serde(rename = "type")]
            t: String,
            seq: u64,
            reservation_id: String,
        }
        let r = Release { t: "release".into(), seq: 5, reservation_id: "r1".into() };
        let bytes = budget_record(&r).unwrap();
        assert_eq!(Record::<Release>::decode(5, &bytes).unwrap(), Record::Budget(r));
        assert!(matches!(Record::<serde::de::IgnoredAny>::decode(5, &bytes).unwrap(), Record::Budget(_)));
    }

    #[test]
    fn decode_refuses_wrong_seq_unknown_type_and_non_records() {
        let err = |bytes: &[u8]| Record::<serde::de::IgnoredAny>::decode(5, bytes).unwrap_err().to_string();
        assert!(err(br#"{"type":"release","seq":6}"#).contains("says it is seq 6"));
        assert!(err(br#"{"seq":5,"type":"erasing"}"#).contains("unknown record type \"erasing\""));
        assert!(err(b"not json").contains("entry 5"));
        assert!(err(br#"{"seq":5,"type":"event"}"#).contains("entry 5"), "an event record without its event");
        let huge = serde_json::json!({"type": "release", "seq": 1, "pad": "x".repeat(MAX_ENTRY_BYTES)});
        assert!(matches!(budget_record(&huge), Err(Error::EntryTooLarge(_))));
    }
}
