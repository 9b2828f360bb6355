//! A partition's durable consumption state, beside its tenant logs: the deduplication index,
//! what of each tenant's log that index covers, each tenant's budget state (a snapshot of the
//! fold over the first records of its log, taken every few seconds, not at every commit), and the
//! next offset to consume.
//!
//! It is a redb database (`state.redb`), so memory stays bounded (a fixed page cache) however
//! long the logs grow, and everything of one group commit lands in a single transaction (one
//! fsync). redb is crash-safe; quick repair keeps opening after a `kill -9` near-instant.
//!
//! Invariants, relied on by [`super::PartitionLedger`]:
//! * It is committed only after the tenant logs it describes are durable, so it never claims a
//!   record a log does not hold. `indexed` may trail a log (a crash between the two commits); the
//!   partition catches up from the log on open.
//! * A dedup entry names the seq of the first record with that key; a lookup whose seq is beyond
//!   the log's size is treated as absent, which makes even a lost log tail harmless.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{Error, Result};

/// (tenant, idempotency key) digest.
pub(super) type DedupKey = [u8; 16];

/// The first record seen with a key: its normalized content digest and seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    pub content: [u8; 16],
    pub seq: u64,
}

/// What the store knows of one tenant's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct TenantState {
    /// Records `0..indexed` are in the dedup index.
    pub indexed: u64,
    /// Source offset of the last Kafka-fed record among them.
    pub last_offset: Option<i64>,
}

/// Everything one group commit changes.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub seen: Vec<(DedupKey, Seen)>,
    pub tenants: Vec<(String, TenantState)>,
    /// Budget state snapshots: tenant, the records they cover (`0..covered`), JSON.
    pub budgets: Vec<(String, u64, Vec<u8>)>,
    pub next_offset: Option<i64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty() && self.tenants.is_empty() && self.budgets.is_empty() && self.next_offset.is_none()
    }
}

const DEDUP: TableDefinition<DedupKey, [u8; 24]> = TableDefinition::new("dedup");
const TENANTS: TableDefinition<&str, [u8; 16]> = TableDefinition::new("tenants");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Before snapshots carried their coverage, each covered the tenant's `indexed` records; read
/// only, and replaced by the tenant's first snapshot in `budget_snapshots`.
const LEGACY_BUDGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("budgets");
/// tenant → `[covered u64 LE][JSON]`.
const BUDGET_SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("budget_snapshots");
const NEXT_OFFSET: &str = "next_offset";
/// Page cache per partition: the bound on the index's memory.
const CACHE_BYTES: usize = 32 << 20;

pub(super) struct PartitionStore {
    db: Database,
    path: String,
}

fn encode_seen(s: Seen) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..16].copy_from_slice(&s.content);
    v[16..].copy_from_slice(&s.seq.to_le_bytes());
    v
}

fn decode_seen(v: [u8; 24]) -> Seen {
    let mut content = [0u8; 16];
    content.copy_from_slice(&v[..16]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&v[16..]);
    Seen { content, seq: u64::from_le_bytes(seq) }
}

fn encode_tenant(t: TenantState) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&t.indexed.to_le_bytes());
    // i64::MIN stands for "no Kafka record yet"; real offsets are never negative.
    v[8..].copy_from_slice(&t.last_offset.unwrap_or(i64::MIN).to_le_bytes());
    v
}

fn decode_tenant(v: [u8; 16]) -> TenantState {
    let mut indexed = [0u8; 8];
    indexed.copy_from_slice(&v[..8]);
    let mut last = [0u8; 8];
    last.copy_from_slice(&v[8..]);
    let last = i64::from_le_bytes(last);
    TenantState { indexed: u64::from_le_bytes(indexed), last_offset: (last != i64::MIN).then_some(last) }
}

impl PartitionStore {
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let err = |e: redb::Error| Error::Corrupt { path: shown.clone(), detail: e.to_string() };
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| err(e.into()))?;
        let store = PartitionStore { db, path: shown };
        // Create the tables, so that reads never meet a missing one.
        store.commit(&Batch::default())?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> Error {
        Error::Corrupt { path: self.path.clone(), detail: e.into().to_string() }
    }

    pub fn next_offset(&self) -> Result<Option<i64>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(table.get(NEXT_OFFSET).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    pub fn tenant(&self, tenant: &str) -> Result<TenantState> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(TENANTS).map_err(|e| self.err(e))?;
        Ok(table.get(tenant).map_err(|e| self.err(e))?.map(|v| decode_tenant(v.value())).unwrap_or_default())
    }

    /// The tenant's last budget state snapshot, if one was committed: the records it covers
    /// (`0..covered`) and its JSON.
    pub fn budget(&self, tenant: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BUDGET_SNAPSHOTS).map_err(|e| self.err(e))?;
        if let Some(v) = table.get(tenant).map_err(|e| self.err(e))? {
            let bytes = v.value();
            let covered = bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| Error::Corrupt { path: self.path.clone(), detail: format!("budget snapshot of {tenant} is {} bytes", bytes.len()) })?;
            return Ok(Some((covered, bytes[8..].to_vec())));
        }
        let legacy = txn.open_table(LEGACY_BUDGETS).map_err(|e| self.err(e))?;
        let Some(json) = legacy.get(tenant).map_err(|e| self.err(e))?.map(|v| v.value().to_vec()) else { return Ok(None) };
        let tenants = txn.open_table(TENANTS).map_err(|e| self.err(e))?;
        let covered = tenants.get(tenant).map_err(|e| self.err(e))?.map(|v| decode_tenant(v.value()).indexed).unwrap_or_default();
        Ok(Some((covered, json)))
    }

    pub fn lookup(&self, key: &DedupKey) -> Result<Option<Seen>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(DEDUP).map_err(|e| self.err(e))?;
        Ok(table.get(key).map_err(|e| self.err(e))?.map(|v| decode_seen(v.value())))
    }

    /// Applies a batch in one durable transaction. A key already present keeps its first seq.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_quick_repair(true);
        {
            let mut dedup = txn.open_table(DEDUP).map_err(|e| self.err(e))?;
            for (key, seen) in &batch.seen {
                if dedup.get(key).map_err(|e| self.err(e))?.is_none() {
                    dedup.insert(key, encode_seen(*seen)).map_err(|e| self.err(e))?;
                }
            }
            let mut tenants = txn.open_table(TENANTS).map_err(|e| self.err(e))?;
            for (tenant, state) in &batch.tenants {
                tenants.insert(tenant.as_str(), encode_tenant(*state)).map_err(|e| self.err(e))?;
            }
            let mut budgets = txn.open_table(BUDGET_SNAPSHOTS).map_err(|e| self.err(e))?;
            let mut legacy = txn.open_table(LEGACY_BUDGETS).map_err(|e| self.err(e))?;
            let mut value = Vec::new();
            for (tenant, covered, json) in &batch.budgets {
                value.clear();
                value.extend_from_slice(&covered.to_le_bytes());
                value.extend_from_slice(json);
                budgets.insert(tenant.as_str(), value.as_slice()).map_err(|e| self.err(e))?;
                legacy.remove(tenant.as_str()).map_err(|e| self.err(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            if let Some(next) = batch.next_offset {
                meta.insert(NEXT_OFFSET, next).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Keys in the dedup index (for tests and the bytes-per-event figure).
    pub fn dedup_len(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(DEDUP).map_err(|e| self.err(e))?;
        table.len().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state.redb from before snapshots carried their coverage: its snapshot covers the
    /// tenant's `indexed` records, until the tenant's first new snapshot replaces it.
    #[test]
    fn a_legacy_budget_snapshot_covers_the_indexed_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartitionStore::open(&dir.path().join("state.redb")).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(LEGACY_BUDGETS).unwrap().insert("acme", b"{\"old\":1}".as_slice()).unwrap();
        txn.commit().unwrap();
        store.commit(&Batch { tenants: vec![("acme".into(), TenantState { indexed: 12, last_offset: None })], ..Batch::default() }).unwrap();
        assert_eq!(store.budget("acme").unwrap(), Some((12, b"{\"old\":1}".to_vec())));
        store.commit(&Batch { budgets: vec![("acme".into(), 15, b"{}".to_vec())], ..Batch::default() }).unwrap();
        assert_eq!(store.budget("acme").unwrap(), Some((15, b"{}".to_vec())));
        let txn = store.db.begin_read().unwrap();
        assert!(txn.open_table(LEGACY_BUDGETS).unwrap().get("acme").unwrap().is_none(), "one snapshot per tenant");
    }

    #[test]
    fn state_round_trips_and_first_seq_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = PartitionStore::open(&path).unwrap();
        assert_eq!(store.next_offset().unwrap(), None);
        assert_eq!(store.tenant("acme").unwrap(), TenantState::default());
        let first = Seen { content: [1; 16], seq: 7 };
        store
            .commit(&Batch {
                seen: vec![([9; 16], first)],
                tenants: vec![("acme".into(), TenantState { indexed: 8, last_offset: Some(41) })],
                budgets: vec![("acme".into(), 3, b"{}".to_vec())],
                next_offset: Some(42),
            })
            .unwrap();
        store.commit(&Batch { seen: vec![([9; 16], Seen { content: [2; 16], seq: 9 })], ..Batch::default() }).unwrap();
        drop(store);
        let store = PartitionStore::open(&path).unwrap();
        assert_eq!(store.lookup(&[9; 16]).unwrap(), Some(first));
        assert_eq!(store.lookup(&[8; 16]).unwrap(), None);
        assert_eq!(store.tenant("acme").unwrap(), TenantState { indexed: 8, last_offset: Some(41) });
        assert_eq!(store.next_offset().unwrap(), Some(42));
        assert_eq!(store.budget("acme").unwrap(), Some((3, b"{}".to_vec())));
        assert_eq!(store.budget("globex").unwrap(), None);
        assert_eq!(store.dedup_len().unwrap(), 1);
    }

    #[test]
    fn a_tenant_with_no_kafka_record_has_no_offset() {
        let t = TenantState { indexed: 3, last_offset: None };
        assert_eq!(decode_tenant(encode_tenant(t)), t);
        let t = TenantState { indexed: 0, last_offset: Some(0) };
        assert_eq!(decode_tenant(encode_tenant(t)), t);
    }
}
