//! One Kafka partition's share of the ledger: its own [`Ledger`] directory (every tenant keyed to
//! this partition), the consumption progress, and the deduplication index.
//!
//! Exactly once, without Kafka transactions:
//! * Deliveries are applied in offset order. After the tenant logs are committed (fsynced, heads
//!   replaced, checkpoints signed), `progress` records the next offset to read.
//! * On open, consumption resumes at `progress`. A crash between a commit and the progress write
//!   makes the service re-read messages whose records are already durable; each tenant's last
//!   recorded source offset (read back from its log) makes those re-reads no-ops. So every
//!   accepted event is in its log exactly once, whatever instant the process died at.
//! * Dead-lettering is at least once: a rejected message in the re-read range is sent again.
//!
//! Deduplication: (tenant, idempotency key) → (content digest, seq), rebuilt from the logs on open.
//! The same key with identical normalized content is a retry and is recorded once; with different
//! content it is appended as a `conflict` record (never replacing the first) and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tally_ingest::Delivery;
use tally_schemas::{Decoded, Event, IdempotencyKey};

use crate::error::{Error, Result};
use crate::keyfile::LedgerKey;
use crate::ledger::Ledger;
use crate::record::{conflict_record, event_record, EventInput, Source};

/// What applying one delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Appended { tenant: String, seq: u64 },
    Deduplicated { tenant: String },
    Conflict { tenant: String, seq: u64 },
    /// Its record is already in the tenant's log (a re-read after a crash).
    AlreadyRecorded,
    Rejected,
}

type DedupKey = [u8; 16];

#[derive(Debug, Clone, Copy)]
struct Seen {
    content: [u8; 16],
    seq: u64,
}

pub struct PartitionLedger {
    topic: String,
    partition: i32,
    dir: PathBuf,
    ledger: Ledger,
    /// Next offset to apply.
    next_offset: Option<i64>,
    /// Next offset as last written to `progress`.
    durable_next: Option<i64>,
    /// Last source offset recorded per tenant (pending records included).
    last_offset: HashMap<String, i64>,
    dedup: HashMap<DedupKey, Seen>,
}

fn dedup_key(tenant: &str, key: &IdempotencyKey) -> DedupKey {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(key.to_bytes());
    h.finalize()[..16].try_into().unwrap_or_default()
}

fn content_digest(event: &Event) -> Result<[u8; 16]> {
    let bytes = serde_json::to_vec(event).map_err(|e| Error::BadRecord(e.to_string()))?;
    Ok(Sha256::digest(bytes)[..16].try_into().unwrap_or_default())
}

/// The fields of a stored record the partition state is rebuilt from.
#[derive(Deserialize)]
struct StoredRecord {
    #[serde(rename = "type")]
    record_type: String,
    event: Event,
    #[serde(default)]
    ce_source: Option<String>,
    source: StoredSource,
}

#[derive(Deserialize)]
struct StoredSource {
    #[serde(default)]
    offset: Option<i64>,
}

impl PartitionLedger {
    /// Opens (or creates) the state of `topic`/`partition` under `root`.
    pub fn open(root: &Path, topic: &str, partition: i32, keys: Vec<LedgerKey>) -> Result<PartitionLedger> {
        let dir = root.join("partitions").join(format!("{topic}-{partition}"));
        let mut ledger = Ledger::open(&dir, keys)?;
        let next_offset = read_progress(&dir)?;
        let mut last_offset = HashMap::new();
        let mut dedup = HashMap::new();
        for tenant in ledger.tenant_ids()? {
            let log = ledger.tenant(&tenant)?;
            for seq in 0..log.size() {
                let record: StoredRecord = serde_json::from_slice(&log.entry(seq)?)
                    .map_err(|e| Error::BadRecord(format!("{tenant} entry {seq}: {e}")))?;
                if let Some(o) = record.source.offset {
                    last_offset.insert(tenant.clone(), o);
                }
                if record.record_type == "event" {
                    let key = IdempotencyKey { source: record.ce_source, id: record.event.event_id.clone() };
                    dedup.insert(dedup_key(&tenant, &key), Seen { content: content_digest(&record.event)?, seq });
                }
            }
        }
        tracing::info!(topic, partition, ?next_offset, tenants = last_offset.len(), "partition state opened");
        Ok(PartitionLedger { topic: topic.to_string(), partition, dir, ledger, next_offset, durable_next: next_offset, last_offset, dedup })
    }

    /// Where consumption resumes: the durable progress, or the partition's start.
    pub fn resume_offset(&self) -> Option<i64> {
        self.next_offset
    }

    pub fn ledger(&mut self) -> &mut Ledger {
        &mut self.ledger
    }

    /// Tenants with a log in this partition.
    pub fn tenants(&self) -> Result<Vec<String>> {
        self.ledger.tenant_ids()
    }

    /// Applies one delivery of this partition (deliveries must come in offset order).
    pub fn apply(&mut self, delivery: &Delivery) -> Result<Applied> {
        if self.next_offset.is_some_and(|next| delivery.offset < next) {
            return Ok(Applied::AlreadyRecorded);
        }
        self.next_offset = Some(delivery.offset + 1);
        let decoded: &Decoded = match &delivery.outcome {
            Ok(d) => d,
            Err(_) => return Ok(Applied::Rejected),
        };
        let tenant = decoded.event.tenant_id.clone();
        if self.last_offset.get(&tenant).is_some_and(|&o| delivery.offset <= o) {
            return Ok(Applied::AlreadyRecorded);
        }
        let source = Source::Kafka {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: delivery.offset,
            timestamp_ms: delivery.timestamp_ms,
        };
        let input = EventInput {
            event: &decoded.event,
            ce_source: decoded.key.source.as_deref(),
            payload_sha256: &decoded.payload_sha256,
            source: &source,
        };
        let key = dedup_key(&tenant, &decoded.key);
        let content = content_digest(&decoded.event)?;
        let log = self.ledger.tenant(&tenant)?;
        let seq = log.size() + log.pending();
        let applied = match self.dedup.get(&key) {
            Some(seen) if seen.content == content => Applied::Deduplicated { tenant: tenant.clone() },
            Some(seen) => {
                log.append(&conflict_record(seq, input, seen.seq)?)?;
                Applied::Conflict { tenant: tenant.clone(), seq }
            }
            None => {
                log.append(&event_record(seq, input)?)?;
                self.dedup.insert(key, Seen { content, seq });
                Applied::Appended { tenant: tenant.clone(), seq }
            }
        };
        if matches!(applied, Applied::Appended { .. } | Applied::Conflict { .. }) {
            self.last_offset.insert(tenant, delivery.offset);
        }
        Ok(applied)
    }

    /// Commits every tenant log (signing checkpoints), then records the progress.
    /// Returns the next offset now durable, if any was consumed.
    pub fn commit(&mut self) -> Result<Option<i64>> {
        let checkpoints = self.ledger.commit()?;
        for (tenant, cp) in &checkpoints {
            tracing::debug!(tenant_id = %tenant, partition = self.partition, size = cp.size, "checkpoint signed");
        }
        if let Some(next) = self.next_offset.filter(|_| self.next_offset != self.durable_next) {
            write_progress(&self.dir, next)?;
            self.durable_next = Some(next);
        }
        Ok(self.next_offset)
    }
}

fn read_progress(dir: &Path) -> Result<Option<i64>> {
    let path = dir.join("progress");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim_end().parse().map(Some).map_err(|_| Error::Corrupt {
            path: path.display().to_string(),
            detail: format!("unreadable progress {text:?}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn write_progress(dir: &Path, next: i64) -> Result<()> {
    use std::io::Write as _;
    let tmp = dir.join("progress.tmp");
    let path = dir.join("progress");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(format!("{next}\n").as_bytes()).map_err(|e| Error::io(&tmp, e))?;
    f.sync_data().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// A delivery of a valid `llm_call` event, for tests in this module and [`super::http`].
#[cfg(test)]
pub(super) fn test_delivery(offset: i64, tenant: &str, id: &str, cost: i64) -> Delivery {
    let value = format!(
        r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{{"amount_micros":{cost},"currency":"USD"}}}}"#
    )
    .into_bytes();
    let outcome = tally_schemas::decode_message(Some(tenant.as_bytes()), &value, &[]);
    Delivery { partition: 3, offset, timestamp_ms: Some(1_700_000_000_000 + offset), key: Some(tenant.as_bytes().to_vec()), value, headers: vec![], outcome }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(offset: i64, tenant: &str, id: &str, cost: i64) -> Delivery {
        test_delivery(offset, tenant, id, cost)
    }

    #[test]
    fn retries_are_recorded_once_and_conflicts_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.resume_offset(), None);
        assert_eq!(p.apply(&delivery(0, "acme", "e1", 5)).unwrap(), Applied::Appended { tenant: "acme".into(), seq: 0 });
        assert_eq!(p.apply(&delivery(1, "acme", "e1", 5)).unwrap(), Applied::Deduplicated { tenant: "acme".into() });
        assert_eq!(p.apply(&delivery(2, "acme", "e1", 6)).unwrap(), Applied::Conflict { tenant: "acme".into(), seq: 1 });
        assert_eq!(p.apply(&delivery(3, "globex", "e1", 5)).unwrap(), Applied::Appended { tenant: "globex".into(), seq: 0 });
        assert_eq!(p.commit().unwrap(), Some(4));
        let conflict = String::from_utf8(p.ledger().tenant("acme").unwrap().entry(1).unwrap()).unwrap();
        assert!(conflict.contains(r#""type":"conflict""#) && conflict.contains(r#""conflicts_with_seq":0"#), "{conflict}");
    }

    #[test]
    fn a_crash_between_commit_and_progress_never_doubles_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        for o in 0..10 {
            p.apply(&delivery(o, ["acme", "globex"][(o % 2) as usize], &format!("e{o}"), 1)).unwrap();
        }
        p.commit().unwrap();
        for o in 10..20 {
            p.apply(&delivery(o, ["acme", "globex"][(o % 2) as usize], &format!("e{o}"), 1)).unwrap();
        }
        // Crash after the logs are durable but before the progress write.
        p.ledger().commit().unwrap();
        drop(p);
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.resume_offset(), Some(10), "resumes at the durable progress");
        for o in 10..22 {
            let applied = p.apply(&delivery(o, ["acme", "globex"][(o % 2) as usize], &format!("e{o}"), 1)).unwrap();
            let expected_new = o >= 20;
            assert_eq!(matches!(applied, Applied::Appended { .. }), expected_new, "offset {o}: {applied:?}");
        }
        p.commit().unwrap();
        assert_eq!(p.ledger().tenant("acme").unwrap().size(), 11);
        assert_eq!(p.ledger().tenant("globex").unwrap().size(), 11);
    }
}
