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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::checkpoint::Checkpoint;
use crate::entries::TenantEntries;
use crate::error::{Error, Result};
use crate::keyfile::LedgerKey;
use crate::partition_log::{PartitionLog, PendingCommit, TenantView};
use crate::privacy::{period_of, Commitment, KeyRef, Revealed, SealedHeader, SubjectKeys};
use crate::receipt::Receipt;
use crate::record::{conflict_record, event_record, personal_event_record, split_personal, Erasure, EventInput, Record, PAYLOAD_FIELD};
use crate::Charge;

/// The journal's directory inside a ledger directory.
pub const JOURNAL_DIR: &str = "journal";
/// The pre-journal layout's directory of tenant logs.
const OLD_TENANTS_DIR: &str = "t";

/// An erasure to record ([`Ledger::erasure_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasurePlan {
    pub erasure: Erasure,
    /// Records of the subject written before personal fields were committed to: their values
    /// are in clear in the log, and no key erases them.
    pub unerasable: u64,
}

/// A record's seq and the id of the key its personal values are sealed under.
type SealedUnder = (u64, [u8; 16]);

/// How far an erasure's reading of a tenant's committed records has got
/// ([`Ledger::scan_for_erasure`]): a long log is read in steps, so a caller holding a lock can let
/// go of it between them, and the plan ([`Ledger::plan_erasure`]) reads only what came after.
#[derive(Debug, Clone, Default)]
pub struct ErasureScan {
    /// The ids of the keys wanted when the scan began; a key created later seals only records
    /// at or after `keyed_at`.
    ids: HashSet<[u8; 16]>,
    keyed_at: u64,
    /// The next seq to read.
    next: u64,
    /// The records read so far sealed under one of `ids`.
    found: Vec<SealedUnder>,
    unerasable: u64,
}

impl ErasureScan {
    /// The seq the scan reads next.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The tenant's next seq when the scan began: reading up to there is enough, the plan reads
    /// the rest.
    pub fn began_at(&self) -> u64 {
        self.keyed_at
    }
}

/// The subject key store's directory inside a ledger directory (docs/privacy.md).
pub const SUBJECT_KEYS_DIR: &str = "subject-keys";

pub struct Ledger {
    dir: PathBuf,
    keys: Vec<LedgerKey>,
    log: PartitionLog,
    /// Behind a mutex so that `&self` readers can load shards; the ledger's owner serialises
    /// writers anyway, so it is never contended for long.
    subjects: Mutex<SubjectKeys>,
    /// For each tenant, the (seq, key) of its appends sealed under a subject key and not yet
    /// committed, in seq order: an erasure planned now names them too (their records cannot be
    /// read until committed). Bounded by the appends of one commit.
    unsettled: HashMap<String, Vec<(u64, KeyRef)>>,
}

fn check_keys(keys: &[LedgerKey]) -> Result<()> {
    let origin = keys.first().map(|k| k.origin().to_string()).ok_or_else(|| Error::BadKey("a ledger needs at least one signing key".into()))?;
    if let Some(other) = keys.iter().find(|k| k.origin() != origin) {
        return Err(Error::BadKey(format!("all signing keys must share one origin: {origin:?} and {:?}", other.origin())));
    }
    Ok(())
}

/// The first 16 bytes of SHA-256 of `event`'s normal form, then of `tag` when given.
fn digest(event: &tally_schemas::Event, tag: Option<&[u8; 32]>) -> Result<[u8; 16]> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(event).map_err(|e| Error::BadRecord(e.to_string()))?);
    if let Some(tag) = tag {
        h.update(tag);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    Ok(out)
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
        Self::open_with(dir, keys, crate::journal::DEFAULT_SEGMENT_BYTES, 0)
    }

    /// [`Ledger::open`] with journal segments rolled at `segment_bytes` (tests use small ones),
    /// for a caller that recorded the journal durable through position `acknowledged` (0 for
    /// none): damage short of it fails the open and nothing is cut (see
    /// [`crate::Journal::open_acknowledged`]).
    pub fn open_with(dir: &Path, keys: Vec<LedgerKey>, segment_bytes: u64, acknowledged: u64) -> Result<Ledger> {
        check_keys(&keys)?;
        refuse_old_layout(dir)?;
        let log = PartitionLog::open_acknowledged(&dir.join(JOURNAL_DIR), segment_bytes, acknowledged)?;
        let subjects = Mutex::new(SubjectKeys::open(&dir.join(SUBJECT_KEYS_DIR))?);
        Ok(Ledger { dir: dir.to_path_buf(), keys, log, subjects, unsettled: HashMap::new() })
    }

    /// Opens a ledger another process may be writing, to read what it had committed (see
    /// [`PartitionLog::open_read_only`]).
    pub fn open_read_only(dir: &Path, keys: Vec<LedgerKey>) -> Result<Ledger> {
        check_keys(&keys)?;
        refuse_old_layout(dir)?;
        let log = PartitionLog::open_read_only(&dir.join(JOURNAL_DIR))?;
        let subjects = Mutex::new(SubjectKeys::open_read_only(&dir.join(SUBJECT_KEYS_DIR)));
        Ok(Ledger { dir: dir.to_path_buf(), keys, log, subjects, unsettled: HashMap::new() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log origin (tenant logs are `<origin>/t/<tenant>`).
    pub fn origin(&self) -> &str {
        self.keys[0].origin()
    }

    /// The keys it signs with (to open another view of the same directory).
    pub fn signing_keys(&self) -> &[LedgerKey] {
        &self.keys
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

    /// Appends the `event` record of `input` (a `conflict` record with `conflicts_with`, the
    /// seq of the first version) to its tenant's log, at the tenant's next seq. An event with
    /// personal fields ([`split_personal`]) is recorded without them: the record commits to
    /// each, `payload_sha256` included, under salts from its subject's key, and the values are
    /// sealed under that key beside the entry (docs/privacy.md).
    pub fn append_event(&mut self, input: EventInput<'_>, charge: Option<&Charge>, conflicts_with: Option<u64>) -> Result<u64> {
        let tenant = input.event.tenant_id.as_str();
        tally_schemas::validate_tenant_id(tenant).map_err(|r| Error::BadKey(r.detail))?;
        let seq = self.log.next_seq(tenant);
        let personal = split_personal(input.event);
        if personal.values.is_empty() {
            let entry = match conflicts_with {
                Some(first) => conflict_record(seq, input, first)?,
                None => event_record(seq, input, charge)?,
            };
            return self.log.append(tenant, &entry);
        }
        let mut values = personal.values;
        values.insert(PAYLOAD_FIELD.to_string(), hex::encode(input.payload_sha256));
        let key = self.subjects().key_for(tenant, &personal.subject, &period_of(input.event.occurred_at))?;
        let commitments: BTreeMap<String, String> =
            values.iter().map(|(field, value)| (field.clone(), Commitment::of(&key.salt(tenant, seq, field), field, value).to_hex())).collect();
        let shard = SubjectKeys::shard_of(tenant, &personal.subject);
        let sealed = key.seal(shard, tenant, seq, &values)?;
        let entry = personal_event_record(seq, EventInput { event: &personal.event, ..input }, &commitments, conflicts_with, charge)?;
        let seq = self.log.append_sealed(tenant, &entry, Some(&sealed))?;
        self.unsettled.entry(tenant.to_string()).or_default().push((seq, KeyRef { shard, id: key.id() }));
        Ok(seq)
    }

    /// A digest of `event`'s content for deduplication (16 bytes): SHA-256 of its normal form
    /// when it has no personal fields; with them, of the event without them and a tag of their
    /// values only its subject's key computes ([`SubjectKey::content_tag`]), so no unsalted
    /// digest of personal data is kept. Creates the subject's key if it has none.
    pub fn content_digest(&self, event: &tally_schemas::Event) -> Result<[u8; 16]> {
        let personal = split_personal(event);
        if personal.values.is_empty() {
            return digest(event, None);
        }
        let key = self.subjects().key_for(&event.tenant_id, &personal.subject, &period_of(event.occurred_at))?;
        digest(&personal.event, Some(&key.content_tag(&event.tenant_id, &personal.values)))
    }

    /// The content digest of `event` as records written before personal fields were committed
    /// to were deduplicated by (SHA-256 of the whole normalised event): a retry of such an event
    /// matches it. Kept in memory only, never stored for a new record.
    pub fn plain_content_digest(event: &tally_schemas::Event) -> Result<[u8; 16]> {
        digest(event, None)
    }

    /// [`Ledger::content_digest`] of the event committed as `record` (entry `seq` of `tenant`):
    /// for a record with personal fields, from its sealed values; once they are erased, a digest
    /// no input gives (a retry of an erased event is then kept as a `conflict`).
    pub fn recorded_content_digest(&self, tenant: &str, seq: u64, record: &crate::EventRecord) -> Result<[u8; 16]> {
        if record.personal.is_empty() {
            return digest(&record.event, None);
        }
        let mut subjects = self.subjects();
        let sealed = self.log.sealed(tenant, seq)?.ok_or_else(|| Error::BadRecord(format!("{tenant} entry {seq}: its personal values are missing")))?;
        let Some(key) = subjects.key_of_sealed(tenant, &SealedHeader::parse(&sealed)?)? else { return digest(&record.event, Some(&[0; 32])) };
        let mut values = key.open(tenant, seq, &sealed)?;
        values.remove(PAYLOAD_FIELD);
        digest(&record.event, Some(&key.content_tag(tenant, &values)))
    }

    /// The personal values of committed entry `seq` of `tenant` with their salts, or
    /// [`Revealed::Erased`]; `None` for a record without any.
    pub fn revealed(&self, tenant: &str, seq: u64) -> Result<Option<Revealed>> {
        match self.log.sealed(tenant, seq)? {
            None => Ok(None),
            Some(sealed) => self.subjects().reveal(tenant, seq, &sealed).map(Some),
        }
    }

    /// Committed entry `seq` of `tenant` with [`Ledger::revealed`], in one journal read.
    pub fn entry_revealed(&self, tenant: &str, seq: u64) -> Result<(Vec<u8>, Option<Revealed>)> {
        let (entry, sealed) = self.log.entry_and_sealed(tenant, seq)?;
        let revealed = match sealed {
            None => None,
            Some(sealed) => Some(self.subjects().reveal(tenant, seq, &sealed)?),
        };
        Ok((entry, revealed))
    }

    /// What erasing the personal values of `tenant`'s records would take: the keys of
    /// `subject` (or with `None`, of every subject: offboarding; with `before`, a `YYYY-MM`
    /// month, only the keys of earlier months) and every record sealed under them, committed or
    /// not, as the `erasure` record names them. Changes nothing: the caller appends the record,
    /// retires the keys once it is written ([`Ledger::retire_keys`]) and deletes them once it is
    /// durable ([`Ledger::forget_keys`]), so that a crash never leaves keys gone without the
    /// record that says so. `unerasable` counts the records of the subject (or tenant) written
    /// before personal fields were committed to, which hold them in clear: no key erases those.
    ///
    /// Reads every committed record of the tenant; [`Ledger::scan_for_erasure`] does that in
    /// steps, and [`Ledger::plan_erasure`] finishes.
    pub fn erasure_plan(&self, tenant: &str, subject: Option<&str>, before: Option<&str>, at: jiff::Timestamp, by: &str) -> Result<ErasurePlan> {
        let mut scan = self.begin_erasure_scan(tenant, subject, before)?;
        self.scan_for_erasure(tenant, subject, before, &mut scan, u64::MAX)?;
        let keys = self.subjects().key_refs(tenant, subject, before)?;
        self.plan_erasure(tenant, subject, before, keys, scan, at, by)
    }

    /// The start of an erasure's scan: the keys it looks for are `subject`'s (every subject's
    /// with `None`) as they are now.
    pub fn begin_erasure_scan(&self, tenant: &str, subject: Option<&str>, before: Option<&str>) -> Result<ErasureScan> {
        let keyed_at = self.log.next_seq(tenant);
        let ids = self.subjects().key_refs(tenant, subject, before)?.into_iter().map(|k| k.id).collect();
        Ok(ErasureScan { ids, keyed_at, ..ErasureScan::default() })
    }

    /// Reads up to `max` more committed records of `tenant` for `scan`; whether it has read all
    /// that are committed.
    pub fn scan_for_erasure(&self, tenant: &str, subject: Option<&str>, before: Option<&str>, scan: &mut ErasureScan, max: u64) -> Result<bool> {
        if scan.ids.is_empty() {
            // No key to erase when the scan began: the plan reads what came after it.
            return Ok(true);
        }
        let size = self.log.size(tenant);
        let end = scan.next.saturating_add(max).min(size);
        let ids = std::mem::take(&mut scan.ids);
        let read = self.read_sealed(tenant, subject, before, scan.next..end, |id| ids.contains(id));
        scan.ids = ids;
        let (found, unerasable) = read?;
        scan.found.extend(found);
        scan.unerasable += unerasable;
        scan.next = scan.next.max(end);
        Ok(scan.next >= size)
    }

    /// The plan that erases `keys` (found by [`SubjectKeys::key_refs`] or
    /// [`SubjectKeys::expired`]; `subject` and `before` say what they were chosen by): what
    /// `scan` found, filtered to `keys`, the committed records it has not read yet, and the
    /// appends not yet committed. Keys created after the scan began seal only records from
    /// where it began, which are read again for them.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_erasure(
        &self,
        tenant: &str,
        subject: Option<&str>,
        before: Option<&str>,
        keys: Vec<KeyRef>,
        scan: ErasureScan,
        at: jiff::Timestamp,
        by: &str,
    ) -> Result<ErasurePlan> {
        let scope = if subject.is_some() { "subject" } else { "tenant" };
        let mut erasure = Erasure { at, by: by.to_string(), scope: scope.to_string(), before: before.map(str::to_string), keys, seqs: Vec::new() };
        if erasure.keys.is_empty() {
            // Nothing to erase, nothing to read (the old-format records it would count are
            // counted only by a plan that erases something).
            return Ok(ErasurePlan { erasure, unerasable: scan.unerasable });
        }
        let ids: HashSet<[u8; 16]> = erasure.keys.iter().map(|k| k.id).collect();
        let size = self.log.size(tenant);
        let mut seqs: Vec<u64> = scan.found.iter().filter(|(_, id)| ids.contains(id)).map(|(seq, _)| *seq).collect();
        let (rest, unerasable) = self.read_sealed(tenant, subject, before, scan.next.min(size)..size, |id| ids.contains(id))?;
        seqs.extend(rest.into_iter().map(|(seq, _)| seq));
        let newer: HashSet<[u8; 16]> = ids.difference(&scan.ids).copied().collect();
        if !newer.is_empty() && scan.keyed_at < scan.next {
            let (again, _) = self.read_sealed(tenant, subject, before, scan.keyed_at..scan.next.min(size), |id| newer.contains(id))?;
            seqs.extend(again.into_iter().map(|(seq, _)| seq));
        }
        let unsettled = self.unsettled.get(tenant).into_iter().flatten();
        seqs.extend(unsettled.filter(|(seq, key)| *seq >= size && ids.contains(&key.id)).map(|(seq, _)| *seq));
        seqs.sort_unstable();
        seqs.dedup();
        erasure.seqs = seqs;
        Ok(ErasurePlan { erasure, unerasable: scan.unerasable + unerasable })
    }

    /// The (seq, key id) of `tenant`'s committed records in `seqs` sealed under a key `wanted`,
    /// and how many of them are old-format records of the subject holding personal fields in
    /// clear (occurring before `before`).
    fn read_sealed(
        &self,
        tenant: &str,
        subject: Option<&str>,
        before: Option<&str>,
        seqs: std::ops::Range<u64>,
        wanted: impl Fn(&[u8; 16]) -> bool,
    ) -> Result<(Vec<SealedUnder>, u64)> {
        let (mut found, mut unerasable) = (Vec::new(), 0u64);
        for seq in seqs {
            let (entry, sealed) = self.log.entry_and_sealed(tenant, seq)?;
            match sealed {
                Some(sealed) => {
                    let id = SealedHeader::parse(&sealed)?.key_id;
                    if wanted(&id) {
                        found.push((seq, id));
                    }
                }
                None => {
                    if let Record::Event(r) = Record::<serde::de::IgnoredAny>::decode(seq, &entry)? {
                        let clear = split_personal(&r.event);
                        let old_enough = before.is_none_or(|b| period_of(r.event.occurred_at).as_str() < b);
                        if !clear.values.is_empty() && subject.is_none_or(|s| s == clear.subject) && old_enough {
                            unerasable += 1;
                        }
                    }
                }
            }
        }
        Ok((found, unerasable))
    }

    /// The seqs after `after` of `tenant`'s appends not yet committed that are sealed under one
    /// of `keys`: records appended after an erasure's record but before its commit, which its
    /// keys' deletion erases too, so a further `erasure` record must name them.
    pub fn unsettled_under(&self, tenant: &str, after: u64, keys: &[KeyRef]) -> Vec<u64> {
        let ids: HashSet<[u8; 16]> = keys.iter().map(|k| k.id).collect();
        self.unsettled.get(tenant).into_iter().flatten().filter(|(seq, key)| *seq > after && ids.contains(&key.id)).map(|(seq, _)| *seq).collect()
    }

    /// Retires `keys` of `tenant` ([`SubjectKeys::retire`]): run once the `erasure` records
    /// naming them are written (after [`Ledger::write_commit`], whose persist must not drop
    /// them), so that appends from then on are sealed under new keys and the records the
    /// erasure names are all it erases. Its sync failing leaves the ledger to be reopened,
    /// which reads the keys back.
    pub fn retire_keys(&mut self, tenant: &str, keys: &[KeyRef]) -> Result<usize> {
        let mut subjects = self.subjects();
        let mut retired = 0;
        for key in keys {
            retired += usize::from(subjects.retire(tenant, *key)?);
        }
        Ok(retired)
    }

    /// Deletes `keys` of `tenant` from the subject key store, durably; how many were there. Run
    /// once the `erasure` record naming them is durable; again at no harm.
    pub fn forget_keys(&mut self, tenant: &str, keys: &[KeyRef]) -> Result<usize> {
        self.forget_keys_of(&[(tenant.to_string(), keys.to_vec())])
    }

    /// [`Ledger::forget_keys`] for several tenants, with one persist: a failure leaves no tenant's
    /// keys half forgotten in memory while another's shard still holds them.
    pub fn forget_keys_of(&mut self, keys: &[(String, Vec<KeyRef>)]) -> Result<usize> {
        let mut subjects = self.subjects();
        let mut forgotten = 0;
        for (tenant, keys) in keys {
            for key in keys {
                forgotten += usize::from(subjects.forget(tenant, *key)?);
            }
        }
        subjects.persist()?;
        Ok(forgotten)
    }

    /// The subject key store, for tests that need fixed keys
    /// ([`SubjectKeys::derive_new_keys_for_tests`]).
    pub fn subject_keys(&self) -> MutexGuard<'_, SubjectKeys> {
        self.subjects()
    }

    fn subjects(&self) -> MutexGuard<'_, SubjectKeys> {
        // A panic while holding it leaves at worst a key created but not persisted.
        self.subjects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every append durable with one `fdatasync`, with the source's next offset (see
    /// [`PartitionLog::commit`]). Returns the tenants whose size changed. Subject keys created
    /// since the last commit are made durable first, before any record sealed under them.
    pub fn commit(&mut self, next_offset: Option<i64>) -> Result<Vec<String>> {
        let pending = self.write_commit(next_offset)?;
        let synced = pending.sync();
        self.finish_commit(pending, synced)
    }

    /// [`Ledger::commit`] in two halves, so that the `fdatasync` between them
    /// ([`PendingCommit::sync`]) can run without the lock that guards the ledger: see
    /// [`PartitionLog::write_commit`]. New subject keys are persisted here, under that lock:
    /// only commits that bring a subject's first record pay for it.
    pub fn write_commit(&mut self, next_offset: Option<i64>) -> Result<PendingCommit> {
        // Checked before any shard is written: a log that must be reopened may hold retired
        // keys whose erasure never became durable, and its shards must not lose them.
        self.log.check_commit()?;
        self.subjects().persist()?;
        self.log.write_commit(next_offset).inspect_err(|_| self.unsettled.clear())
    }

    /// The second half of [`Ledger::write_commit`]; returns the tenants whose size changed.
    pub fn finish_commit(&mut self, pending: PendingCommit, synced: Result<()>) -> Result<Vec<String>> {
        // A failed write or sync forgets every append not yet durable.
        let changed = self.log.finish_commit(pending, synced).inspect_err(|_| self.unsettled.clear())?;
        for tenant in &changed {
            let size = self.log.size(tenant);
            if let Some(list) = self.unsettled.get_mut(tenant) {
                list.retain(|(seq, _)| *seq >= size);
                if list.is_empty() {
                    self.unsettled.remove(tenant);
                }
            }
        }
        Ok(changed)
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
    use crate::Record;

    /// Every file under `dir`, concatenated.
    fn all_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in walk(dir) {
            out.extend(std::fs::read(entry).unwrap());
        }
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    fn personal_event(id: &str, actor: &str, email: &str) -> tally_schemas::Event {
        let json = format!(
            r#"{{"tenant_id":"acme","kind":"llm_call","event_id":"{id}","occurred_at":"2026-01-01T00:00:00Z","task_id":"t1","actor_id":"{actor}","attributes":{{"email":"{email}"}}}}"#
        );
        tally_schemas::Event::from_json(json.as_bytes()).unwrap()
    }

    fn append(ledger: &mut Ledger, event: &tally_schemas::Event) -> u64 {
        let source = crate::Source::File { file: "in.jsonl".into(), line: 1 };
        let input = EventInput { event, ce_source: None, payload_sha256: &[9; 32], source: &source };
        ledger.append_event(input, None, None).unwrap()
    }

    #[test]
    fn personal_fields_are_committed_in_the_record_and_sealed_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        let ann = personal_event("e1", "user-ann", "ann@example.com");
        assert_eq!(append(&mut ledger, &ann), 0);
        ledger.commit(None).unwrap();
        let entry = ledger.tenant("acme").entry(0).unwrap();
        let text = String::from_utf8(entry.clone()).unwrap();
        assert!(!text.contains("ann@example.com") && !text.contains("user-ann") && !text.contains(&"09".repeat(32)), "{text}");
        assert!(text.contains(r#""task_id":"t1""#), "what budgets need stays in clear: {text}");
        let Record::Event(record) = Record::<serde::de::IgnoredAny>::decode(0, &entry).unwrap() else { panic!("not an event") };
        assert_eq!(record.personal.keys().collect::<Vec<_>>(), ["actor_id", "attributes.email", "payload_sha256"]);
        assert!(record.payload_sha256.is_none());
        drop(ledger);

        // After a reopen: the values come back, with salts that open the commitments.
        let ledger = Ledger::open(dir.path(), vec![key]).unwrap();
        let Some(Revealed::Open(openings)) = ledger.revealed("acme", 0).unwrap() else { panic!("not revealed") };
        record.check_openings(&openings).unwrap();
        assert_eq!(openings["payload_sha256"].value, "09".repeat(32));
        assert_eq!(record.revealed_event(ledger.revealed("acme", 0).unwrap().as_ref()), ann);
        // A value that is not the committed one is refused, and so is a field never committed.
        let mut wrong = openings.clone();
        wrong.get_mut("attributes.email").unwrap().value = "bob@example.com".into();
        assert!(record.check_openings(&wrong).unwrap_err().to_string().contains("does not match its commitment"));
        let mut extra = openings.clone();
        extra.insert("attributes.phone".into(), openings["attributes.email"].clone());
        assert!(record.check_openings(&extra).unwrap_err().to_string().contains("commits to no field"));
        // The dedup digest of the event survives the reopen, and differs for other values.
        assert_eq!(ledger.content_digest(&ann).unwrap(), ledger.recorded_content_digest("acme", 0, &record).unwrap());
        assert_ne!(ledger.content_digest(&ann).unwrap(), ledger.content_digest(&personal_event("e1", "user-ann", "ann@example.org")).unwrap());
    }

    #[test]
    fn erasing_a_subject_leaves_no_value_in_the_directory_and_every_proof_intact() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        append(&mut ledger, &personal_event("e1", "user-ann", "ann@example.com"));
        append(&mut ledger, &personal_event("e2", "user-bob", "bob@example.com"));
        append(&mut ledger, &personal_event("e3", "user-ann", "ann2@example.com"));
        ledger.commit(None).unwrap();
        let (receipt, entry) = ledger.receipt("acme", 2).unwrap();
        let root_before = ledger.checkpoint("acme").unwrap().0.root;
        let bytes = all_bytes(dir.path());
        assert!(!contains(&bytes, "ann@example.com"), "values are sealed, never in clear, even before erasure");

        // Planning changes nothing.
        let plan = ledger.erasure_plan("acme", Some("user-ann"), None, "2026-02-01T00:00:00Z".parse().unwrap(), "ops").unwrap();
        assert_eq!((plan.erasure.keys.len(), plan.unerasable), (1, 0));
        assert!(matches!(ledger.revealed("acme", 0).unwrap(), Some(Revealed::Open(_))));
        let erased = erase(&mut ledger, Some("user-ann"));
        assert_eq!(erased, plan.erasure);
        assert_eq!(erased.seqs, [0, 2]);
        assert_eq!(ledger.revealed("acme", 0).unwrap(), Some(Revealed::Erased));
        assert!(matches!(ledger.revealed("acme", 1).unwrap(), Some(Revealed::Open(_))), "another subject keeps its values");
        // Nothing derived from the erased key is left: no key, no subject id, no value.
        let bytes = all_bytes(dir.path());
        for gone in ["user-ann", "ann@example.com", "ann2@example.com"] {
            assert!(!contains(&bytes, gone), "{gone} is still in the directory");
        }
        assert!(contains(&bytes, "user-bob"), "the scan can find what is there");
        // The log is unchanged: the receipt issued before still verifies, the root is the same.
        let vkey = key.signer_for("acme").unwrap().verifier();
        receipt.verify(&entry, &[vkey], None).unwrap();
        assert_eq!(ledger.tenant("acme").root_at(3).unwrap(), root_before, "the tree it was in is unchanged; the erasure record extends it");
        let Record::Event(record) = Record::<serde::de::IgnoredAny>::decode(0, &entry_at(&ledger, 0)).unwrap() else { panic!() };
        let shown = record.revealed_event(None);
        assert_eq!((shown.actor_id.as_deref(), shown.attributes["email"].as_str()), (Some("erased"), "erased"));
        // Erasing again finds nothing; erasing the tenant takes the rest; forgetting is idempotent.
        assert!(erase(&mut ledger, Some("user-ann")).keys.is_empty());
        let rest = erase(&mut ledger, None);
        assert_eq!(rest.seqs, [1]);
        assert!(!contains(&all_bytes(dir.path()), "user-bob"));
        assert_eq!(ledger.forget_keys("acme", &rest.keys).unwrap(), 0);
    }

    #[test]
    fn the_largest_message_with_the_most_personal_fields_still_makes_a_record_that_fits() {
        use tally_schemas::{decode_message, MAX_ATTRIBUTES, MAX_MESSAGE_BYTES, PERSONAL_FIELD_BYTES};
        // Empty values under long keys: commitments add the most over the message.
        let mut attributes = serde_json::Map::new();
        let base = r#"{"tenant_id":"acme","kind":"llm_call","event_id":"e1","occurred_at":"2026-01-01T00:00:00Z","actor_id":"a","attributes":{}}"#.len();
        let room = MAX_MESSAGE_BYTES - base - PERSONAL_FIELD_BYTES * (MAX_ATTRIBUTES + 1);
        let key_len = room / MAX_ATTRIBUTES - 6;
        for i in 0..MAX_ATTRIBUTES {
            attributes.insert(format!("{i:02}{}", "k".repeat(key_len - 2)), serde_json::Value::String(String::new()));
        }
        let message = serde_json::json!({"tenant_id":"acme","kind":"llm_call","event_id":"e1","occurred_at":"2026-01-01T00:00:00Z","actor_id":"a","attributes":attributes});
        let bytes = serde_json::to_vec(&message).unwrap();
        assert!(
            bytes.len() + PERSONAL_FIELD_BYTES * (MAX_ATTRIBUTES + 1) <= MAX_MESSAGE_BYTES && bytes.len() > MAX_MESSAGE_BYTES - 2 * PERSONAL_FIELD_BYTES * 65
        );
        let decoded = decode_message(Some(b"acme"), &bytes, &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![LedgerKey::generate("tally.example.com").unwrap()]).unwrap();
        let source = crate::Source::Kafka { topic: "t".repeat(249), partition: 0, offset: i64::MAX, timestamp_ms: Some(i64::MAX) };
        let input = EventInput { event: &decoded.event, ce_source: None, payload_sha256: &decoded.payload_sha256, source: &source };
        ledger.append_event(input, None, None).unwrap();
        ledger.append_event(input, None, Some(u64::MAX)).unwrap();
    }

    /// An erasure as the service runs it: the plan, its record made durable, then the keys.
    fn erase(ledger: &mut Ledger, subject: Option<&str>) -> Erasure {
        let plan = ledger.erasure_plan("acme", subject, None, "2026-02-01T00:00:00Z".parse().unwrap(), "ops").unwrap();
        let seq = ledger.next_seq("acme");
        ledger.append("acme", &crate::erasure_record(seq, &plan.erasure).unwrap()).unwrap();
        ledger.commit(None).unwrap();
        ledger.forget_keys("acme", &plan.erasure.keys).unwrap();
        plan.erasure
    }

    fn entry_at(ledger: &Ledger, seq: u64) -> Vec<u8> {
        ledger.tenant("acme").entry(seq).unwrap()
    }

    #[test]
    fn erasure_names_appends_not_yet_committed_and_its_record_splits_to_fit() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![LedgerKey::generate("tally.example.com").unwrap()]).unwrap();
        append(&mut ledger, &personal_event("e1", "user-ann", "ann@example.com"));
        let at: jiff::Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        assert_eq!(ledger.erasure_plan("acme", Some("user-ann"), None, at, "ops").unwrap().erasure.seqs, [0], "not committed, named");
        ledger.commit(None).unwrap();
        append(&mut ledger, &personal_event("e2", "user-bob", "bob@example.com"));
        append(&mut ledger, &personal_event("e3", "user-ann", "ann@example.org"));
        assert_eq!(ledger.erasure_plan("acme", Some("user-ann"), None, at, "ops").unwrap().erasure.seqs, [0, 2], "committed and not");
        // In steps: a scan that began before a new key still finds that key's records.
        ledger.commit(None).unwrap();
        let mut scan = ledger.begin_erasure_scan("acme", None, None).unwrap();
        assert!(!ledger.scan_for_erasure("acme", None, None, &mut scan, 2).unwrap());
        append(&mut ledger, &personal_event("e4", "user-carl", "carl@example.com"));
        ledger.commit(None).unwrap();
        assert!(ledger.scan_for_erasure("acme", None, None, &mut scan, 2).unwrap());
        assert_eq!(scan.next(), 4, "the commit's record is read too");
        let keys = ledger.subject_keys().key_refs("acme", None, None).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(ledger.plan_erasure("acme", None, None, keys, scan, at, "ops").unwrap().erasure.seqs, [0, 1, 2, 3]);

        let keys: Vec<KeyRef> = (0..600u32).map(|i| KeyRef { shard: (i % 256) as u8, id: [i as u8; 16] }).collect();
        let big = Erasure { at, by: "ops".into(), scope: "tenant".into(), before: None, keys: keys.clone(), seqs: (u64::MAX - 5_000..u64::MAX).collect() };
        let parts = big.clone().parts();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.seqs.len() <= crate::MAX_ERASED_SEQS_PER_RECORD && p.keys.len() <= crate::MAX_ERASED_KEYS_PER_RECORD && p.at == at));
        assert_eq!(parts.iter().flat_map(|p| p.seqs.clone()).collect::<Vec<_>>(), big.seqs);
        assert_eq!(parts.iter().flat_map(|p| p.keys.clone()).collect::<Vec<_>>(), keys);
        for part in &parts {
            crate::erasure_record(u64::MAX, part).unwrap();
        }
        assert_eq!(Erasure { seqs: Vec::new(), keys: Vec::new(), ..big }.parts().len(), 1);
        let bytes = crate::erasure_record(4, &parts[0]).unwrap();
        assert_eq!(Erasure::decode(4, &bytes).unwrap(), parts[0]);
        assert!(String::from_utf8(bytes)
            .unwrap()
            .starts_with(r#"{"seq":4,"type":"erasure","at":"2026-02-01T00:00:00Z","by":"ops","scope":"tenant","keys":["0000000000000000000000000000000000","0101010101010101010101010101010101","#));
    }

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
        let mut writer = Ledger::open_with(dir.path(), vec![key.clone()], 4096, 0).unwrap();
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
