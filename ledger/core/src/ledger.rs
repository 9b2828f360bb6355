//! A ledger directory: the logs of many tenants in one [`PartitionLog`] (`<dir>/journal/`), and
//! the keys that sign their checkpoints. The ledger service keeps one per Kafka partition;
//! `tally log` tools work on one directly.
//!
//! Checkpoints are signed when they are read, for the tenant's committed size at that moment
//! (docs/storage.md, "Signing"). A checkpoint's text is a pure function of (origin, size, root)
//! and Ed25519 signatures are deterministic, so the same committed tree always gives the same
//! bytes: nothing signed needs storing, a crash cannot leave a checkpoint behind its log, and a
//! tenant nobody reads costs no signature. Only committed sizes of an append-only tree are ever
//! signed, so any two checkpoints of a tenant are consistent. Committed records are therefore in
//! every checkpoint served after their commit returns.
//!
//! Key rotation: the ledger signs with every key it is given (all for the same origin), so during
//! a rotation each checkpoint carries both signatures and verifiers holding either vkey accept it.
//!
//! Layout: a directory in the pre-journal layout (`<dir>/t/<tenant>/`) is refused with
//! [`Error::OldLayout`]; [`migrate`] converts it.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::entries::TenantEntries;
use crate::error::{Error, Result};
use crate::keyfile::LedgerKey;
use crate::partition_log::{PartitionLog, PendingCommit, TenantView};
use crate::receipt::Receipt;

/// The journal's directory inside a ledger directory.
pub const JOURNAL_DIR: &str = "journal";
/// The pre-journal layout's directory of tenant logs.
const OLD_TENANTS_DIR: &str = "t";

pub struct Ledger {
    dir: PathBuf,
    keys: Vec<LedgerKey>,
    log: PartitionLog,
}

fn check_keys(keys: &[LedgerKey]) -> Result<()> {
    let origin = keys.first().map(|k| k.origin().to_string()).ok_or_else(|| Error::BadKey("a ledger needs at least one signing key".into()))?;
    if let Some(other) = keys.iter().find(|k| k.origin() != origin) {
        return Err(Error::BadKey(format!("all signing keys must share one origin: {origin:?} and {:?}", other.origin())));
    }
    Ok(())
}

/// Refuses a directory that still holds pre-journal tenant logs.
fn refuse_old_layout(dir: &Path) -> Result<()> {
    if dir.join(OLD_TENANTS_DIR).is_dir() {
        return Err(Error::OldLayout(dir.display().to_string()));
    }
    Ok(())
}

impl Ledger {
    /// Opens the ledger in `dir` (creating it), signing with every key in `keys` (one, or several
    /// during a rotation; all must share one origin).
    pub fn open(dir: &Path, keys: Vec<LedgerKey>) -> Result<Ledger> {
        Self::open_with(dir, keys, crate::journal::DEFAULT_SEGMENT_BYTES)
    }

    /// [`Ledger::open`] with journal segments rolled at `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, keys: Vec<LedgerKey>, segment_bytes: u64) -> Result<Ledger> {
        check_keys(&keys)?;
        refuse_old_layout(dir)?;
        let log = PartitionLog::open(&dir.join(JOURNAL_DIR), segment_bytes)?;
        Ok(Ledger { dir: dir.to_path_buf(), keys, log })
    }

    /// Opens a ledger another process may be writing, to read what it had committed (see
    /// [`PartitionLog::open_read_only`]).
    pub fn open_read_only(dir: &Path, keys: Vec<LedgerKey>) -> Result<Ledger> {
        check_keys(&keys)?;
        refuse_old_layout(dir)?;
        let log = PartitionLog::open_read_only(&dir.join(JOURNAL_DIR))?;
        Ok(Ledger { dir: dir.to_path_buf(), keys, log })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log origin (tenant logs are `<origin>/t/<tenant>`).
    pub fn origin(&self) -> &str {
        self.keys[0].origin()
    }

    /// The tenant's verifier keys, one per signing key.
    pub fn verifiers_for(&self, tenant_id: &str) -> Result<Vec<crate::note::NoteVerifier>> {
        self.keys.iter().map(|k| k.signer_for(tenant_id).map(|s| s.verifier())).collect()
    }

    /// Whether the tenant has committed records here (the id must be valid).
    pub fn has_tenant(&self, tenant_id: &str) -> bool {
        tally_schemas::validate_tenant_id(tenant_id).is_ok() && self.log.size(tenant_id) > 0
    }

    /// Tenants with committed records, sorted.
    pub fn tenant_ids(&self) -> Vec<String> {
        self.log.tenants()
    }

    /// The tenant's committed size.
    pub fn size(&self, tenant_id: &str) -> u64 {
        self.log.size(tenant_id)
    }

    /// The seq the tenant's next append gets (committed size plus appends not yet committed).
    pub fn next_seq(&self, tenant_id: &str) -> u64 {
        self.log.next_seq(tenant_id)
    }

    /// Appends `entry` to the tenant's log; durable, readable and in its checkpoint once
    /// [`Ledger::commit`] returns.
    pub fn append(&mut self, tenant_id: &str, entry: &[u8]) -> Result<u64> {
        tally_schemas::validate_tenant_id(tenant_id).map_err(|r| Error::BadKey(r.detail))?;
        self.log.append(tenant_id, entry)
    }

    /// Makes every append durable with one `fdatasync`, with the source's next offset (see
    /// [`PartitionLog::commit`]). Returns the tenants whose size changed.
    pub fn commit(&mut self, next_offset: Option<i64>) -> Result<Vec<String>> {
        self.log.commit(next_offset)
    }

    /// [`Ledger::commit`] in two halves, so that the `fdatasync` between them
    /// ([`PendingCommit::sync`]) can run without the lock that guards the ledger: see
    /// [`PartitionLog::write_commit`].
    pub fn write_commit(&mut self, next_offset: Option<i64>) -> Result<PendingCommit> {
        self.log.write_commit(next_offset)
    }

    /// The second half of [`Ledger::write_commit`]; returns the tenants whose size changed.
    pub fn finish_commit(&mut self, pending: PendingCommit, synced: Result<()>) -> Result<Vec<String>> {
        self.log.finish_commit(pending, synced)
    }

    /// The source's next offset, as the last commit naming one recorded it.
    pub fn next_offset(&self) -> Option<i64> {
        self.log.next_offset()
    }

    /// The next merge of the journal's index files that is due (see
    /// [`PartitionLog::index_merge_due`]): run it without holding whatever guards this ledger,
    /// then [`Ledger::adopt_index_merge`].
    pub fn index_merge_due(&self) -> Option<crate::partition_log::IndexMerge> {
        self.log.index_merge_due()
    }

    /// Swaps in a merged index (see [`PartitionLog::adopt_index_merge`]).
    pub fn adopt_index_merge(&mut self, merged: crate::partition_log::MergedIndex) -> Result<bool> {
        self.log.adopt_index_merge(merged)
    }

    /// Runs every index merge that is due, here and now; returns how many were adopted.
    pub fn merge_indexes(&mut self) -> Result<usize> {
        self.log.merge_indexes()
    }

    /// The journal's live index files, oldest first.
    pub fn index_spans(&self) -> Vec<crate::partition_log::IndexSpan> {
        self.log.index_spans()
    }

    /// The journal position just past the last commit.
    pub fn journal_end(&self) -> u64 {
        self.log.journal_end()
    }

    /// Calls `f(tenant, seq, entry)` for every committed record from journal position `from`
    /// (one [`Ledger::journal_end`] returned) on, in journal order.
    pub fn replay<E: From<Error>>(&self, from: u64, f: impl FnMut(&str, u64, &[u8]) -> std::result::Result<(), E>) -> std::result::Result<(), E> {
        self.log.replay(from, f)
    }

    /// How many tenants the journal holds.
    pub fn tenant_count(&self) -> usize {
        self.log.tenant_count()
    }

    /// Read access to the tenant's committed log: entries, proofs, tiles.
    pub fn tenant<'a>(&'a self, tenant_id: &'a str) -> TenantView<'a> {
        self.log.view(tenant_id)
    }

    /// The tenant's checkpoint at its committed size, signed by every key.
    pub fn checkpoint(&self, tenant_id: &str) -> Result<(Checkpoint, String)> {
        let size = self.log.size(tenant_id);
        if size == 0 {
            return Err(Error::NoSuchEntry { seq: 0, size: 0 });
        }
        self.sign(tenant_id, size, self.log.root(tenant_id)?)
    }

    /// The tenant's checkpoint at `size` (at most the committed size), signed by every key.
    pub fn checkpoint_at(&self, tenant_id: &str, size: u64) -> Result<String> {
        let root = self.tenant(tenant_id).root_at(size)?;
        Ok(self.sign(tenant_id, size, root)?.1)
    }

    fn sign(&self, tenant_id: &str, size: u64, root: crate::merkle::Hash) -> Result<(Checkpoint, String)> {
        let checkpoint = Checkpoint { origin: crate::checkpoint::tenant_origin(self.origin(), tenant_id), size, root };
        let signers = self.keys.iter().map(|k| k.signer_for(tenant_id)).collect::<Result<Vec<_>>>()?;
        let note = checkpoint.sign(&signers)?;
        Ok((checkpoint, note))
    }

    /// The tenant's latest signed checkpoint note.
    pub fn checkpoint_note(&self, tenant_id: &str) -> Result<String> {
        Ok(self.checkpoint(tenant_id)?.1)
    }

    /// A receipt for entry `seq` against the tenant's latest checkpoint, and the entry bytes.
    pub fn receipt(&self, tenant_id: &str, seq: u64) -> Result<(Receipt, Vec<u8>)> {
        let (checkpoint, note) = self.checkpoint(tenant_id)?;
        let log = self.tenant(tenant_id);
        let proof = log.inclusion_proof(seq, checkpoint.size)?;
        Ok((Receipt { index: seq, proof, checkpoint: note }, log.entry(seq)?))
    }
}

/// The ledger directory holding `tenant`'s log under a ledger service's `data_dir`: its home
/// partition `partitions/<topic>-<p>`, with `p` computed from each topic's pinned partition count
/// (`partitions/<topic>.partition-count`), as the service placed it.
pub fn find_tenant_ledger(data_dir: &Path, tenant: &str) -> Option<PathBuf> {
    tally_schemas::validate_tenant_id(tenant).ok()?;
    let partitions = data_dir.join("partitions");
    std::fs::read_dir(&partitions).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let topic = name.strip_suffix(".partition-count")?;
        let count: i32 = std::fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
        let dir = partitions.join(format!("{topic}-{}", tally_schemas::tenant_partition(tenant, count)));
        dir.join(JOURNAL_DIR).is_dir().then_some(dir)
    })
}

/// What [`migrate`] converted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Each tenant with its size; its root was recomputed from the journal and found equal to
    /// the old head's.
    pub tenants: Vec<(String, u64)>,
}

/// Converts a ledger directory from the pre-journal layout (`<dir>/t/<tenant>/`) to the journal
/// (`<dir>/journal/`), committing `next_offset` (the old store's progress) with the last records.
///
/// Every tenant's committed entries are copied in seq order into a new journal built beside the
/// old logs (`journal.migrating/`); then each tenant's root, recomputed from the journal, must
/// equal its old head's root, or nothing changes. Only then is the new journal renamed into
/// place and the old logs removed. A crash at any point leaves either the old layout (run it
/// again) or the new journal beside old logs, which the next run removes. A directory already in
/// the journal layout is left alone (`Ok` with no tenants).
pub fn migrate(dir: &Path, next_offset: Option<i64>, mut progress: impl FnMut(&str, u64)) -> Result<Migrated> {
    let old = dir.join(OLD_TENANTS_DIR);
    let journal = dir.join(JOURNAL_DIR);
    if !old.is_dir() {
        return Ok(Migrated::default());
    }
    if journal.is_dir() {
        // The switch happened; only the removal of the old logs was cut short.
        remove_old(&old)?;
        return Ok(Migrated::default());
    }
    let mut tenants: Vec<String> = std::fs::read_dir(&old)
        .map_err(|e| Error::io(&old, e))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .filter(|id| tally_schemas::validate_tenant_id(id).is_ok())
        .collect();
    tenants.sort();
    let building = dir.join("journal.migrating");
    if building.exists() {
        std::fs::remove_dir_all(&building).map_err(|e| Error::io(&building, e))?;
    }
    let mut log = PartitionLog::open(&building, crate::journal::DEFAULT_SEGMENT_BYTES)?;
    // Group commits of many tenants, as the service makes them; each old head's root, to check.
    let mut heads = Vec::with_capacity(tenants.len());
    let mut uncommitted = 0u64;
    for tenant in tenants {
        let reader = crate::log::LogReader::open(&old.join(&tenant))?;
        for seq in 0..reader.size() {
            log.append(&tenant, &reader.entry(seq)?)?;
            uncommitted += 1;
            if uncommitted >= 65_536 {
                log.commit(None)?;
                uncommitted = 0;
            }
        }
        heads.push((tenant, reader.size(), reader.root()));
    }
    log.commit(next_offset)?;
    let mut out = Migrated::default();
    for (tenant, size, head_root) in heads {
        if log.size(&tenant) != size || log.root(&tenant)? != head_root {
            return Err(Error::Corrupt {
                path: old.join(&tenant).display().to_string(),
                detail: format!("the journal's root of {size} records differs from the old head's; nothing was changed"),
            });
        }
        progress(&tenant, size);
        out.tenants.push((tenant, size));
    }
    drop(log);
    std::fs::rename(&building, &journal).map_err(|e| Error::io(&journal, e))?;
    crate::durable::sync_dir(dir)?;
    remove_old(&old)?;
    Ok(out)
}

/// Removes the old tenant logs: renamed away first, so a cut-short removal never leaves a
/// half-deleted `t/` that looks like the old layout.
fn remove_old(old: &Path) -> Result<()> {
    let parent = old.parent().unwrap_or(Path::new("."));
    let doomed = parent.join("t.migrated");
    std::fs::rename(old, &doomed).map_err(|e| Error::io(old, e))?;
    crate::durable::sync_dir(parent)?;
    std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_makes_checkpoints_and_receipts_that_verify_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        for i in 0..50u64 {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            ledger.append(tenant, format!("entry {i}").as_bytes()).unwrap();
        }
        assert!(!ledger.has_tenant("acme"), "nothing committed yet");
        assert_eq!(ledger.commit(Some(50)).unwrap().len(), 2);
        assert!(ledger.commit(None).unwrap().is_empty(), "nothing new");
        let before = ledger.checkpoint_note("globex").unwrap();
        drop(ledger);

        let ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        assert_eq!(ledger.tenant_ids(), ["acme", "globex"]);
        assert_eq!(ledger.next_offset(), Some(50));
        assert_eq!(ledger.checkpoint_note("globex").unwrap(), before, "the same tree signs to the same bytes");
        let (receipt, entry) = ledger.receipt("globex", 3).unwrap();
        assert_eq!(entry, b"entry 7");
        let vkey = key.signer_for("globex").unwrap().verifier();
        receipt.verify(&entry, std::slice::from_ref(&vkey), Some("tally.example.com/t/globex")).unwrap();
        // A tenant's key does not vouch for another tenant's log.
        let acme = key.signer_for("acme").unwrap().verifier();
        assert!(receipt.verify(&entry, &[acme], None).is_err());
        assert!(ledger.checkpoint("nosuch").is_err(), "no records, no checkpoint");
        let mut ledger = ledger;
        assert!(ledger.append("../etc", b"x").is_err(), "tenant ids are validated");
    }

    #[test]
    fn rotation_signs_with_both_keys_then_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = LedgerKey::generate("tally.example.com").unwrap();
        let new = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![old.clone()]).unwrap();
        ledger.append("acme", b"one").unwrap();
        ledger.commit(None).unwrap();
        drop(ledger);
        let old_v = old.signer_for("acme").unwrap().verifier();
        let new_v = new.signer_for("acme").unwrap().verifier();

        // During the rotation both keys sign; holders of either vkey accept.
        let ledger = Ledger::open(dir.path(), vec![old.clone(), new.clone()]).unwrap();
        let note = ledger.checkpoint_note("acme").unwrap();
        assert_eq!(note.matches('\u{2014}').count(), 2, "{note}");
        let a = Checkpoint::open(&note, std::slice::from_ref(&old_v), None).unwrap();
        let b = Checkpoint::open(&note, std::slice::from_ref(&new_v), None).unwrap();
        assert_eq!(a, b);
        drop(ledger);

        // After it, only the new key signs; same tree, so old and new checkpoints are consistent.
        let ledger = Ledger::open(dir.path(), vec![new.clone()]).unwrap();
        let note = ledger.checkpoint_note("acme").unwrap();
        assert!(Checkpoint::open(&note, &[old_v], None).is_err());
        assert_eq!(Checkpoint::open(&note, &[new_v], None).unwrap(), a);
        drop(ledger);
        let other = LedgerKey::generate("other.example.com").unwrap();
        assert!(Ledger::open(dir.path(), vec![new, other]).is_err(), "one origin only");
    }

    #[test]
    fn a_reader_sees_what_was_committed_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut writer = Ledger::open_with(dir.path(), vec![key.clone()], 4096).unwrap();
        for i in 0..200u64 {
            writer.append(["acme", "globex"][(i % 2) as usize], format!("entry {i:04} {}", "x".repeat(40)).as_bytes()).unwrap();
            if i % 10 == 9 {
                writer.commit(Some(i as i64 + 1)).unwrap();
            }
        }
        writer.append("acme", b"not committed").unwrap();
        let reader = Ledger::open_read_only(dir.path(), vec![key.clone()]).unwrap();
        assert_eq!((reader.size("acme"), reader.size("globex")), (100, 100));
        assert_eq!(reader.checkpoint_note("acme").unwrap(), writer.checkpoint_note("acme").unwrap());
        assert_eq!(reader.tenant("acme").entry(99).unwrap(), writer.tenant("acme").entry(99).unwrap());
        // A missing index is rebuilt in memory by a reader, never written.
        let journal = dir.path().join(JOURNAL_DIR);
        let index = std::fs::read_dir(&journal).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "idx")).unwrap();
        std::fs::remove_file(&index).unwrap();
        let reader = Ledger::open_read_only(dir.path(), vec![key.clone()]).unwrap();
        assert_eq!(reader.tenant("globex").entry(3).unwrap(), writer.tenant("globex").entry(3).unwrap());
        assert!(!index.exists());
        let mut reader = reader;
        assert!(reader.append("acme", b"x").is_err(), "a reader never writes");
        assert!(reader.commit(Some(1)).is_err(), "a reader never writes");
        assert!(Ledger::open_read_only(&dir.path().join("nosuch"), vec![key]).is_err());
    }

    #[test]
    fn migration_recomputes_every_root_and_refuses_the_old_layout_until_run() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut expected = Vec::new();
        for (tenant, n) in [("acme", 300u64), ("globex", 1), ("initech", 17)] {
            let mut log = crate::log::TenantLog::open(&dir.path().join(OLD_TENANTS_DIR).join(tenant)).unwrap();
            for i in 0..n {
                log.append(format!("{tenant} {i}").as_bytes()).unwrap();
            }
            log.commit().unwrap();
            expected.push((tenant.to_string(), n, log.root()));
        }
        let err = Ledger::open(dir.path(), vec![key.clone()]).err().unwrap();
        assert!(matches!(err, Error::OldLayout(_)), "{err}");
        assert!(err.to_string().contains("tally migrate"), "{err}");

        // A damaged old log: nothing changes.
        let head = dir.path().join("t/globex/head");
        let good = std::fs::read_to_string(&head).unwrap();
        let fields: Vec<&str> = good.split(' ').collect();
        use base64::Engine as _;
        let other_root = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        std::fs::write(&head, format!("{} {other_root} {}", fields[0], fields[2])).unwrap();
        assert!(migrate(dir.path(), Some(9), |_, _| {}).is_err());
        assert!(dir.path().join(OLD_TENANTS_DIR).is_dir() && !dir.path().join(JOURNAL_DIR).exists());
        std::fs::write(&head, &good).unwrap();

        let migrated = migrate(dir.path(), Some(9), |_, _| {}).unwrap();
        assert_eq!(migrated.tenants, expected.iter().map(|(t, n, _)| (t.clone(), *n)).collect::<Vec<_>>());
        assert!(!dir.path().join(OLD_TENANTS_DIR).exists());
        let ledger = Ledger::open(dir.path(), vec![key]).unwrap();
        assert_eq!(ledger.next_offset(), Some(9));
        for (tenant, n, root) in expected {
            assert_eq!(ledger.checkpoint(&tenant).unwrap().0.root, root, "{tenant}");
            assert_eq!(ledger.tenant(&tenant).entry(n - 1).unwrap(), format!("{tenant} {}", n - 1).into_bytes());
        }
        assert_eq!(migrate(dir.path(), None, |_, _| {}).unwrap(), Migrated::default(), "already migrated");
    }
}
