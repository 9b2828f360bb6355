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

/// Everything one group commit changes.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub seen: Vec<(DedupKey, Seen)>,
    /// Budget state snapshots: tenant, the records they cover (`0..covered`), JSON.
    pub budgets: Vec<(String, u64, Vec<u8>)>,
    /// The journal position everything before which this store now covers (dedup keys and
    /// budget snapshots); set only on durable commits.
    pub journal_position: Option<u64>,
    /// Whether the commit is fsynced. A non-durable commit is visible at once and becomes
    /// durable with the next durable one; a crash loses it back to the last durable commit.
    pub durable: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty() && self.budgets.is_empty() && self.journal_position.is_none()
    }
}

const DEDUP: TableDefinition<DedupKey, [u8; 24]> = TableDefinition::new("dedup");
/// Before the journal: tenant → `[indexed u64][last offset i64]`; read only, for the coverage
/// of legacy budget snapshots.
const LEGACY_TENANTS: TableDefinition<&str, [u8; 16]> = TableDefinition::new("tenants");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Before snapshots carried their coverage, each covered the tenant's `indexed` records; read
/// only, and replaced by the tenant's first snapshot in `budget_snapshots`.
const LEGACY_BUDGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("budgets");
/// tenant → `[covered u64 LE][JSON]`.
const BUDGET_SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("budget_snapshots");
/// Before the journal, where consumption resumed; read only, by the migration.
const NEXT_OFFSET: &str = "next_offset";
const JOURNAL_POSITION: &str = "journal_position";
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

fn legacy_indexed(v: [u8; 16]) -> u64 {
    let mut indexed = [0u8; 8];
    indexed.copy_from_slice(&v[..8]);
    u64::from_le_bytes(indexed)
}

/// A redb failure as the service's error: a failed read or write of the file (a full disk) is
/// an i/o error, which stops the partition until it can be opened again (the service retries);
/// anything else is a store that is not what it should be.
fn store_error(path: &str, e: redb::Error) -> Error {
    match e {
        redb::Error::Io(source) => Error::io(Path::new(path), source),
        // redb refuses every transaction after a failed write until the file is opened again.
        redb::Error::PreviousIo => Error::Log(tally_log::Error::Commit(format!("{path}: an earlier write failed; the store must be opened again"))),
        other => Error::Corrupt { path: path.to_string(), detail: other.to_string() },
    }
}

impl PartitionStore {
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| store_error(&shown, e.into()))?;
        let store = PartitionStore { db, path: shown };
        // Create the tables, so that reads never meet a missing one.
        store.commit(&Batch { durable: true, ..Batch::default() })?;
        Ok(store)
    }

    /// The journal position recorded in the store at `path`, read without writing to it: what
    /// the journal's open needs before anything is repaired (a damaged journal must leave the
    /// store as it was too). 0 when there is no store; `None` when it cannot be read that way
    /// (redb wants a repair after a crash, or the file is not a store): the caller then opens
    /// it with [`PartitionStore::open`], which repairs or names what is wrong.
    pub fn recorded_journal_position(path: &Path) -> Option<u64> {
        if !path.exists() {
            return Some(0);
        }
        let db = redb::ReadOnlyDatabase::open(path).ok()?;
        let txn = db.begin_read().ok()?;
        match txn.open_table(META) {
            Ok(table) => Some(table.get(JOURNAL_POSITION).ok()?.map_or(0, |v| v.value().max(0) as u64)),
            Err(redb::TableError::TableDoesNotExist(_)) => Some(0),
            Err(_) => None,
        }
    }

    fn err(&self, e: impl Into<redb::Error>) -> Error {
        store_error(&self.path, e.into())
    }

    pub fn next_offset(&self) -> Result<Option<i64>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(table.get(NEXT_OFFSET).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    /// The journal position the durable state covers (0 when it never recorded one).
    pub fn journal_position(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(table.get(JOURNAL_POSITION).map_err(|e| self.err(e))?.map_or(0, |v| v.value().max(0) as u64))
    }

    /// Every tenant's last budget state snapshot: the records it covers (`0..covered`) and its
    /// JSON.
    pub fn budgets(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BUDGET_SNAPSHOTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (tenant, value) = row.map_err(|e| self.err(e))?;
            let bytes = value.value();
            let covered = bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| Error::Corrupt { path: self.path.clone(), detail: format!("budget snapshot of {} is {} bytes", tenant.value(), bytes.len()) })?;
            out.push((tenant.value().to_string(), covered, bytes[8..].to_vec()));
        }
        let legacy = txn.open_table(LEGACY_BUDGETS).map_err(|e| self.err(e))?;
        let tenants = txn.open_table(LEGACY_TENANTS).map_err(|e| self.err(e))?;
        for row in legacy.iter().map_err(|e| self.err(e))? {
            let (tenant, json) = row.map_err(|e| self.err(e))?;
            let covered = tenants.get(tenant.value()).map_err(|e| self.err(e))?.map(|v| legacy_indexed(v.value())).unwrap_or_default();
            out.push((tenant.value().to_string(), covered, json.value().to_vec()));
        }
        Ok(out)
    }

    pub fn lookup(&self, key: &DedupKey) -> Result<Option<Seen>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(DEDUP).map_err(|e| self.err(e))?;
        Ok(table.get(key).map_err(|e| self.err(e))?.map(|v| decode_seen(v.value())))
    }

    /// Applies a batch in one transaction, durable or not (see [`Batch::durable`]). A key
    /// already present keeps its first seq.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if batch.durable {
            txn.set_quick_repair(true);
        } else {
            txn.set_durability(redb::Durability::None).map_err(|e| self.err(e))?;
        }
        {
            let mut dedup = txn.open_table(DEDUP).map_err(|e| self.err(e))?;
            for (key, seen) in &batch.seen {
                if dedup.get(key).map_err(|e| self.err(e))?.is_none() {
                    dedup.insert(key, encode_seen(*seen)).map_err(|e| self.err(e))?;
                }
            }
            txn.open_table(LEGACY_TENANTS).map_err(|e| self.err(e))?;
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
            if let Some(position) = batch.journal_position {
                let position =
                    i64::try_from(position).map_err(|_| Error::Corrupt { path: self.path.clone(), detail: format!("journal position {position}") })?;
                meta.insert(JOURNAL_POSITION, position).map_err(|e| self.err(e))?;
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

    /// A failed write of the file (a full disk) stops the partition until it reopens; a file
    /// that is not a store is named as corrupt.
    #[test]
    fn i_o_failures_of_the_store_are_storage_errors_and_bad_files_are_corrupt() {
        let full = store_error("/d/state.redb", redb::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert!(full.is_storage() && full.to_string().contains("/d/state.redb") && full.to_string().contains("No space left"), "{full}");
        let earlier = store_error("/d/state.redb", redb::Error::PreviousIo);
        assert!(earlier.is_storage() && earlier.to_string().contains("opened again"), "{earlier}");
        let bad = store_error("/d/state.redb", redb::Error::Corrupted("bad magic".into()));
        assert!(!bad.is_storage() && bad.to_string().contains("corrupt state /d/state.redb"), "{bad}");
    }

    #[test]
    fn the_recorded_journal_position_is_read_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        assert_eq!(PartitionStore::recorded_journal_position(&path), Some(0), "no store, no position");
        assert!(!path.exists(), "and none is created");
        let store = PartitionStore::open(&path).unwrap();
        store.commit(&Batch { durable: true, journal_position: Some(6787), ..Batch::default() }).unwrap();
        drop(store);
        let before = std::fs::read(&path).unwrap();
        assert_eq!(PartitionStore::recorded_journal_position(&path), Some(6787));
        assert_eq!(std::fs::read(&path).unwrap(), before, "read without writing");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        assert_eq!(PartitionStore::recorded_journal_position(&path), None, "not a store: the full open names it");
        assert!(PartitionStore::open(&path).is_err());
    }

    /// A state.redb from before the journal: its snapshot covers the tenant's `indexed` records,
    /// until the tenant's first new snapshot replaces it; its next offset is still readable.
    #[test]
    fn a_legacy_budget_snapshot_covers_the_indexed_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartitionStore::open(&dir.path().join("state.redb")).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(LEGACY_BUDGETS).unwrap().insert("acme", b"{\"old\":1}".as_slice()).unwrap();
        let mut legacy = [0u8; 16];
        legacy[..8].copy_from_slice(&12u64.to_le_bytes());
        txn.open_table(LEGACY_TENANTS).unwrap().insert("acme", legacy).unwrap();
        txn.open_table(META).unwrap().insert(NEXT_OFFSET, 42).unwrap();
        txn.commit().unwrap();
        assert_eq!(store.budgets().unwrap(), vec![("acme".to_string(), 12, b"{\"old\":1}".to_vec())]);
        assert_eq!(store.next_offset().unwrap(), Some(42));
        store.commit(&Batch { budgets: vec![("acme".into(), 15, b"{}".to_vec())], durable: true, ..Batch::default() }).unwrap();
        assert_eq!(store.budgets().unwrap(), vec![("acme".to_string(), 15, b"{}".to_vec())], "one snapshot per tenant");
    }

    #[test]
    fn state_round_trips_and_first_seq_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = PartitionStore::open(&path).unwrap();
        assert_eq!(store.journal_position().unwrap(), 0);
        let first = Seen { content: [1; 16], seq: 7 };
        store
            .commit(&Batch { seen: vec![([9; 16], first)], budgets: vec![("acme".into(), 3, b"{}".to_vec())], journal_position: Some(4096), durable: true })
            .unwrap();
        store.commit(&Batch { seen: vec![([9; 16], Seen { content: [2; 16], seq: 9 })], durable: true, ..Batch::default() }).unwrap();
        // A non-durable commit is visible at once.
        store.commit(&Batch { seen: vec![([8; 16], first)], ..Batch::default() }).unwrap();
        assert_eq!(store.lookup(&[8; 16]).unwrap(), Some(first));
        drop(store);
        let store = PartitionStore::open(&path).unwrap();
        assert_eq!(store.lookup(&[9; 16]).unwrap(), Some(first));
        assert_eq!(store.journal_position().unwrap(), 4096);
        assert_eq!(store.budgets().unwrap(), vec![("acme".to_string(), 3, b"{}".to_vec())]);
    }
}
