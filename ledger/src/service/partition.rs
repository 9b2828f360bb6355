//! One Kafka partition's share of the ledger: its [`Ledger`] (the logs of every tenant keyed to
//! this partition, in one journal) and its [`PartitionStore`] (dedup index, budget snapshots).
//!
//! Exactly once, without Kafka transactions:
//! * Deliveries are applied in offset order. A group commit writes every tenant's new records and
//!   the next offset to consume to the journal, made durable by one `fdatasync`: records and
//!   progress are durable together or not at all, so consumption resumes exactly after the last
//!   durable record, whatever instant the process died at.
//! * The store is derived from the journal. It is written at every commit without an fsync, and
//!   durably every [`STORE_DURABLE_EVERY`] (and at a partition's closing commit) with the journal
//!   position it then covers; an open replays the journal from that position, so a crash costs
//!   at most that much replay.
//! * Dead-lettering is at least once: a rejected message after the last commit is sent again.
//!
//! Deduplication: (tenant, idempotency key) → (content digest, seq), on disk, for the whole life
//! of the log; memory holds only the keys of the current commit.
//! The same key with identical normalized content is a retry and is recorded once; with different
//! content it is appended as a `conflict` record (never replacing the first) and counted.
//!
//! Budgets: each tenant's [`BudgetState`] is the fold of its log, snapshotted in the store at its
//! durable commits. An event's `budget` decisions are appended right after it; a tenant whose
//! effective budget differs from its last `config` record gets a new one first.
//! Admissions, releases, expiries and window restorations are records too.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;

use sha2::{Digest, Sha256};
use tally_ingest::Delivery;
use tally_schemas::{Decoded, Event, IdempotencyKey};

use super::metrics::CommitTimes;
use super::store::{Batch, DedupKey, PartitionStore, Seen};
pub use crate::budget::AuthorizeRequest;
use crate::budget::{
    Admission, BudgetDecision, BudgetFile, BudgetRecord, BudgetState, DeniedBy, Flag, FlagKind, Freeze, FreezeScope, Idempotency, Release, ReleaseReason,
    Statement, Unfreeze, Verdict, MAX_ACTIVE_FREEZES,
};
use crate::error::{Error, Result};
use serde::de::IgnoredAny;
use tally_log::{input_time, EventInput, Record, Source};

/// Who made an authorize or release request, as its record names it, and the key that makes
/// its retries safe.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The token's name.
    pub token: Option<&'a str>,
    /// The request's `Idempotency-Key`.
    pub idempotency_key: Option<&'a str>,
}

/// An authorize answer and the record behind it.
#[derive(Debug, Clone)]
pub struct Decided {
    pub verdict: Verdict,
    pub admission: Admission,
    /// The admission record; for a retry, the first request's.
    pub seq: u64,
    /// A retry of a keyed request: answered from its first record, nothing appended.
    pub replayed: bool,
}

/// A freeze answer: its id and record, and whether an active freeze of the same scope answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    pub freeze_id: String,
    pub seq: u64,
    pub existing: bool,
}

/// An erasure answer (docs/privacy.md, "Erasure").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erased {
    /// The last `erasure` record's seq; `None` when there was no key to erase (no record).
    pub seq: Option<u64>,
    /// Subject keys erased.
    pub keys: u64,
    /// Records whose personal values were erased.
    pub records: u64,
    /// How many `erasure` records name them (one unless they are very many).
    pub erasure_records: u64,
    /// Records of the subject written before personal fields were committed to: their values
    /// are in clear in the log, and no erasure removes them (docs/privacy.md).
    pub unerasable: u64,
}

/// An erasure appended but not yet durable (see `PartitionLedger::staged_erasures`).
struct StagedErasure {
    tenant: String,
    /// What its records say, without their seqs: a further record repeats it.
    erasure: tally_log::Erasure,
    /// The seq of its last record: appends after it under its keys need another.
    last_seq: u64,
    /// How many records its records name (for the metrics, once durable).
    records: u64,
}

/// A release answer: its record, and whether it was a retry answered from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub seq: u64,
    pub replayed: bool,
}
use tally_log::{Ledger, LedgerKey, TenantEntries};

/// What applying one delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Appended { tenant: String, seq: u64 },
    Deduplicated { tenant: String },
    Conflict { tenant: String, seq: u64 },
    Rejected,
}

/// Tenants a tick settles on the input clock at most (see [`PartitionLedger::tick`]).
const SETTLES_PER_TICK: usize = 1_000;

pub struct PartitionLedger {
    /// Exclusive lock on `<dir>/lock`, held while open: two instances never write one partition.
    _lock: std::fs::File,
    topic: String,
    partition: i32,
    ledger: Ledger,
    store: PartitionStore,
    /// Next offset to apply.
    next_offset: Option<i64>,
    /// When the store was last committed durably.
    store_durable_at: std::time::Instant,
    /// Dedup keys appended since the last commit was written.
    pending: HashMap<DedupKey, Seen>,
    /// Dedup keys of the commit being synced: the store takes them once it is durable.
    in_flight: HashMap<DedupKey, Seen>,
    /// Budget state per tenant (every tenant with a log here).
    budgets: HashMap<String, BudgetState>,
    /// The budgets file in force, if any.
    budget_file: Option<Arc<BudgetFile>>,
    /// Tenants whose budget state changed since `take_budget_changes`.
    budget_changed: BTreeSet<(String, Option<String>)>,
    /// Tenants with records not covered by their budget snapshot.
    budget_stale: BTreeSet<String>,
    /// Tenants to compare with a newly loaded budgets file at the next tick.
    config_pending: BTreeSet<String>,
    /// When each tenant's earliest open billing period closes (end + grace), both ways: the
    /// tick takes the due ones from the front without scanning every tenant.
    closes: BTreeSet<(Timestamp, String)>,
    close_of: HashMap<String, Timestamp>,
    /// `statement_grace_ms` (default a day); `None` when `statements = false`: no period closes.
    statement_grace: Option<jiff::SignedDuration>,
    /// The partition's input clock: the latest input time ([`tally_log::input_time`]) of the
    /// records appended here, rebuilt at open from its tenants' states. Periods close on it,
    /// never on the wall clock, so consumer lag and replays do not move a close.
    input_clock: Option<Timestamp>,
    /// Effective budgets resolved from `budget_file`, per tenant.
    effective: HashMap<String, crate::budget::TenantBudget>,
    /// Tenants whose committed records may not all be projected yet.
    unprojected: BTreeSet<String>,
    /// The closing commit has run (see [`PartitionLedger::commit_closing`]), or a commit failed.
    closed: bool,
    /// The first journal write or sync (or store commit) that failed (see
    /// `PartitionLedger::failed`).
    failure: Option<String>,
    /// Erasures whose records are appended but not yet written: the next `write_commit` names
    /// in a further record what was sealed under their keys since, retires the keys and takes
    /// them, and its `finish_commit` deletes them once those records are durable, never before
    /// (docs/privacy.md, "Erasure").
    staged_erasures: Vec<StagedErasure>,
    /// Erasure outcomes since `take_erasure_counts`: records erased, retention passes failed.
    erased_since: u64,
    retention_errors_since: u64,
    /// When the last retention pass ran (`None`: due at the next tick).
    retention_checked: Option<std::time::Instant>,
}

/// Takes the exclusive lock of a partition directory (held while the returned file is open).
pub(crate) fn lock_partition(dir: &Path) -> Result<std::fs::File> {
    let lock_path = dir.join("lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::PartitionBusy(dir.display().to_string())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&lock_path, e)),
    }
}

fn dedup_key(tenant: &str, key: &IdempotencyKey) -> DedupKey {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(key.to_bytes());
    h.finalize()[..16].try_into().unwrap_or_default()
}

impl PartitionLedger {
    /// Opens (or creates) the state of `topic`/`partition` under `root`. Costs one scan of the
    /// budget snapshots and a replay of the journal past the store's durable position (at most
    /// [`STORE_DURABLE_EVERY`] of records after a crash, nothing after a clean close).
    pub fn open(root: &Path, topic: &str, partition: i32, keys: Vec<LedgerKey>) -> Result<PartitionLedger> {
        Self::open_with(root, topic, partition, keys, tally_log::DEFAULT_SEGMENT_BYTES)
    }

    /// [`PartitionLedger::open`] with journal segments rolled at `segment_bytes` (tests use
    /// small ones).
    pub(crate) fn open_with(root: &Path, topic: &str, partition: i32, keys: Vec<LedgerKey>, segment_bytes: u64) -> Result<PartitionLedger> {
        let started = std::time::Instant::now();
        let dir = root.join("partitions").join(format!("{topic}-{partition}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Lock before anything is read or repaired: the previous owner may still be closing it.
        let lock = lock_partition(&dir)?;
        // The store's journal position first: it was recorded after that commit's sync, so a
        // journal whose intact commits end short of it lost acknowledged records, and the open
        // refuses it rather than cutting them (a torn tail lies past it). Read without writing,
        // so a refused open leaves the store as it was too.
        let state = dir.join("state.redb");
        let acknowledged = match PartitionStore::recorded_journal_position(&state) {
            Some(position) => position,
            None => PartitionStore::open(&state)?.journal_position()?,
        };
        let mut ledger = Ledger::open_with(&dir, keys, segment_bytes, acknowledged)?;
        let store = PartitionStore::open(&state)?;
        let next_offset = ledger.next_offset();
        let corrupt = |detail: String| Error::Corrupt { path: dir.display().to_string(), detail };
        // Budgets: each tenant's snapshot, then the records it does not cover, in journal order.
        let mut budgets: HashMap<String, BudgetState> = HashMap::new();
        let mut folded: HashMap<String, u64> = HashMap::new();
        for (tenant, covered, json) in store.budgets()? {
            let mut budget: BudgetState = serde_json::from_slice(&json).map_err(|e| corrupt(format!("budget state of {tenant}: {e}")))?;
            if !budget.is_current_fold() {
                // Folded under older rules: fold the tenant's log again from its start.
                continue;
            }
            budget.restore_cache();
            if covered > ledger.size(&tenant) {
                return Err(corrupt(format!("the budget snapshot of {tenant} covers {covered} records but its log holds {}", ledger.size(&tenant))));
            }
            folded.insert(tenant.clone(), covered);
            budgets.insert(tenant, budget);
        }
        let snapshot_covered = folded.clone();
        let from = store.journal_position()?.min(ledger.journal_end());
        // Recorded without an fsync, like any commit between the store's durable ones: a crash
        // before the next durable commit replays the same records again, and a restart is ready
        // sooner (two fsyncs of a large write, per partition).
        let mut catch_up = Batch { durable: false, ..Batch::default() };
        let mut replayed = 0u64;
        let mut erased_keys = Vec::new();
        ledger.replay(from, |tenant, seq, entry| -> Result<()> {
            replayed += 1;
            let budget = budgets.entry(tenant.to_string()).or_default();
            let done = folded.entry(tenant.to_string()).or_default();
            if seq >= *done {
                // Records a snapshot should have covered but no snapshot does: fold them first.
                for earlier in *done..seq {
                    budget.fold(earlier, &ledger.tenant(tenant).entry(earlier)?)?;
                }
                budget.fold(seq, entry)?;
                *done = seq + 1;
            }
            if entry.starts_with(br#"{"type":"erasure""#) {
                // Its keys may still exist, if the process stopped between the record's commit
                // and their deletion: deleted below, before the store moves past the record.
                let erasure = tally_log::Erasure::decode(seq, entry).map_err(|e| Error::BadRecord(format!("{tenant}: {e}")))?;
                erased_keys.push((tenant.to_string(), erasure.keys));
                return Ok(());
            }
            let Record::Event(record) = Record::<IgnoredAny>::decode(seq, entry).map_err(|e| Error::BadRecord(format!("{tenant}: {e}")))? else {
                return Ok(());
            };
            if !record.is_conflict() {
                let content = ledger.recorded_content_digest(tenant, seq, &record)?;
                let key = IdempotencyKey { source: record.ce_source, id: record.event.event_id.clone() };
                catch_up.seen.push((dedup_key(tenant, &key), Seen { content, seq }));
            }
            Ok(())
        })?;
        // Tenants whose records all precede the replay but whose snapshot misses some of them.
        let tenant_ids = ledger.tenant_ids();
        for tenant in &tenant_ids {
            let (done, size) = (folded.get(tenant).copied().unwrap_or(0), ledger.size(tenant));
            if done < size {
                let budget = budgets.entry(tenant.clone()).or_default();
                for seq in done..size {
                    budget.fold(seq, &ledger.tenant(tenant).entry(seq)?)?;
                }
                folded.insert(tenant.clone(), size);
            }
        }
        // Tenants whose fold moved past their snapshot are snapshotted by the first commit,
        // which after a replay is a durable one: not here, where every partition's open delays
        // the restart (at 12,500 tenants a partition, serialising and storing them took longer
        // than the replay itself).
        let budget_stale: BTreeSet<String> =
            folded.iter().filter(|(tenant, done)| snapshot_covered.get(*tenant) != Some(*done) && **done > 0).map(|(tenant, _)| tenant.clone()).collect();
        for (tenant, keys) in erased_keys {
            let forgotten = ledger.forget_keys(&tenant, &keys)?;
            if forgotten > 0 {
                tracing::warn!(tenant_id = %tenant, partition, keys = forgotten, "deleted the subject keys of an erasure recorded before a stop");
            }
        }
        catch_up.journal_position = Some(ledger.journal_end());
        if !catch_up.seen.is_empty() || !catch_up.budgets.is_empty() || from != ledger.journal_end() {
            store.commit(&catch_up)?;
        }
        let unprojected: BTreeSet<String> = tenant_ids.into_iter().collect();
        let statement_grace = Some(jiff::SignedDuration::from_hours(24));
        let close_of: HashMap<String, Timestamp> = budgets.iter().filter_map(|(t, s)| Some((t.clone(), s.next_close(statement_grace?)?))).collect();
        let closes = close_of.iter().map(|(t, at)| (*at, t.clone())).collect();
        let input_clock = budgets.values().filter_map(BudgetState::input_time).max();
        let open_ms = started.elapsed().as_millis() as u64;
        tracing::info!(topic, partition, ?next_offset, tenants = ledger.tenant_count(), replayed, open_ms, "partition state opened");
        Ok(PartitionLedger {
            _lock: lock,
            topic: topic.to_string(),
            partition,
            ledger,
            store,
            next_offset,
            // After a replay, the first commit makes the store durable: a crash loop must not
            // leave the durable position where it was and replay more at every start.
            store_durable_at: if replayed > 0 {
                std::time::Instant::now().checked_sub(STORE_DURABLE_EVERY).unwrap_or_else(std::time::Instant::now)
            } else {
                std::time::Instant::now()
            },
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            budgets,
            budget_file: None,
            budget_changed: BTreeSet::new(),
            budget_stale,
            effective: HashMap::new(),
            config_pending: BTreeSet::new(),
            closes,
            close_of,
            statement_grace,
            input_clock,
            unprojected,
            closed: false,
            failure: None,
            staged_erasures: Vec::new(),
            erased_since: 0,
            retention_errors_since: 0,
            retention_checked: None,
        })
    }

    /// Up to `n` tenants, in id order after `after`, whose committed records may not all be in
    /// the Parquet projection yet (see `super::projector`).
    pub fn unprojected_after(&self, after: &str, n: usize) -> Vec<String> {
        use std::ops::Bound;
        self.unprojected.range::<str, _>((Bound::Excluded(after), Bound::Unbounded)).take(n).cloned().collect()
    }

    /// Whether any tenant's committed records may not all be projected yet.
    pub fn has_unprojected(&self) -> bool {
        !self.unprojected.is_empty()
    }

    /// The tenant's projection reaches `next_seq`: once that is its committed size, it is no
    /// longer looked at until its next commit.
    pub fn projected(&mut self, tenant: &str, next_seq: u64) {
        if next_seq >= self.ledger.size(tenant) {
            self.unprojected.remove(tenant);
        }
    }

    /// Where consumption resumes: the durable progress, or the partition's start.
    pub fn resume_offset(&self) -> Option<i64> {
        self.next_offset
    }

    /// Runs every index merge due on this partition's journal, here and now, under whatever
    /// guards it (benchmarks and tools; the service merges on its background thread, holding
    /// the partition's lock only to find and adopt each merge).
    pub fn merge_index_files(&mut self) -> Result<usize> {
        Ok(self.ledger.merge_indexes()?)
    }

    /// Swaps in a merged index of this partition's journal (see [`Ledger::adopt_index_merge`]).
    pub fn adopt_index_merge(&mut self, merged: tally_log::MergedIndex) -> Result<bool> {
        Ok(self.ledger.adopt_index_merge(merged)?)
    }

    /// The partition's logs, to read.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Tenants with a log in this partition.
    pub fn tenants(&self) -> Vec<String> {
        self.ledger.tenant_ids()
    }

    /// The first record seen with `key`: appended since the last commit, in the commit being
    /// synced, or in the store.
    fn lookup(&self, key: &DedupKey) -> Result<Option<Seen>> {
        match self.pending.get(key).or_else(|| self.in_flight.get(key)) {
            Some(seen) => Ok(Some(*seen)),
            None => self.store.lookup(key),
        }
    }

    /// The seq of the record first recorded under `key` for `tenant`, if any.
    pub fn seq_of(&mut self, tenant: &str, key: &IdempotencyKey) -> Result<Option<u64>> {
        let key = dedup_key(tenant, key);
        let seen = self.lookup(&key)?;
        let size = self.ledger.size(tenant);
        Ok(seen.map(|s| s.seq).filter(|&seq| seq < size))
    }

    /// Keys in the on-disk dedup index.
    pub fn dedup_keys(&self) -> Result<u64> {
        self.store.dedup_len()
    }

    /// Applies one delivery of this partition (deliveries must come in offset order).
    pub fn apply(&mut self, delivery: &Delivery) -> Result<Applied> {
        // The consumer resumes every partition at `next_offset`: an offset below it is not a
        // re-read but a topic that no longer holds what was recorded.
        if let Some(next) = self.next_offset.filter(|next| delivery.offset < *next) {
            return Err(Error::OffsetRegression { topic: self.topic.clone(), partition: self.partition, offset: delivery.offset, next });
        }
        let applied = self.apply_new(delivery)?;
        // Only now: a delivery that failed to apply must never be covered by durable progress.
        self.next_offset = Some(delivery.offset + 1);
        Ok(applied)
    }

    fn apply_new(&mut self, delivery: &Delivery) -> Result<Applied> {
        let decoded: &Decoded = match &delivery.outcome {
            Ok(d) => d,
            Err(_) => return Ok(Applied::Rejected),
        };
        let tenant = decoded.event.tenant_id.clone();
        let source = Source::Kafka { topic: self.topic.clone(), partition: self.partition, offset: delivery.offset, timestamp_ms: delivery.timestamp_ms };
        let input = EventInput { event: &decoded.event, ce_source: decoded.key.source.as_deref(), payload_sha256: &decoded.payload_sha256, source: &source };
        let key = dedup_key(&tenant, &decoded.key);
        let content = self.ledger.content_digest(&decoded.event)?;
        // A first version recorded before personal fields were committed to was deduplicated
        // by the digest of the whole event: a retry of it still matches.
        let plain = Ledger::plain_content_digest(&decoded.event)?;
        let seen = self.lookup(&key)?;
        let size = self.ledger.next_seq(&tenant);
        // An entry naming a record the log does not hold (a lost tail) is no evidence of a retry.
        let seen = seen.filter(|s| s.seq < size);
        let at = input_time(&decoded.event, &source);
        let same = |s: &Seen| s.content == content || s.content == plain;
        if seen.is_none_or(|s| !same(&s)) {
            // A record will be appended: the input clock moves to it first, and what that
            // makes due for the tenant (ended windows, closed periods) is recorded before it,
            // so the record is rated against them.
            self.input_clock = self.input_clock.max(Some(at));
            let clock = self.input_clock.unwrap_or(at);
            if self.due_on_input(&tenant, clock) {
                self.settle_input(&tenant, clock)?;
            }
        }
        let size = self.ledger.next_seq(&tenant);
        let applied = match seen {
            Some(seen) if same(&seen) => Applied::Deduplicated { tenant: tenant.clone() },
            Some(seen) => {
                self.ledger.append_event(input, None, Some(seen.seq))?;
                self.budgets.entry(tenant.clone()).or_default().observe_input(at);
                Applied::Conflict { tenant: tenant.clone(), seq: size }
            }
            None => {
                // A `config` this event brings in takes its time from the input (the message's
                // timestamp, else the event's own), never the wall clock: replaying the topic
                // gives byte-identical logs.
                let config_at = delivery.timestamp_ms.and_then(|ms| Timestamp::from_millisecond(ms).ok()).unwrap_or(decoded.event.occurred_at);
                if self.ensure_config(&tenant, config_at)? {
                    // Its calendar may differ: what is due under it is recorded first too.
                    if let Some(clock) = self.input_clock {
                        self.settle_input(&tenant, clock)?;
                    }
                }
                // Rated once, here, under the catalog just ensured; every reader sums this charge.
                let state = self.budgets.entry(tenant.clone()).or_default();
                let charge = state.rate(&decoded.event);
                // Only a charge in a period with none yet can move the tenant's next close.
                let opens_period = charge.as_ref().is_some_and(|c| state.opens_period(&c.period));
                let seq = self.ledger.append_event(input, charge.as_ref(), None)?;
                self.budgets.entry(tenant.clone()).or_default().observe_input(at);
                self.pending.insert(key, Seen { content, seq });
                self.retention_hint(&tenant, decoded.event.occurred_at);
                self.after_event(&tenant, &decoded.event, charge.as_ref(), seq)?;
                if opens_period {
                    self.schedule_close(&tenant);
                }
                Applied::Appended { tenant: tenant.clone(), seq }
            }
        };
        Ok(applied)
    }

    /// Appends a budget-side record and folds it into the tenant's state.
    fn append_budget(&mut self, tenant: &str, make: impl FnOnce(u64) -> BudgetRecord) -> Result<u64> {
        let seq = self.ledger.next_seq(tenant);
        let record = make(seq);
        self.ledger.append(tenant, &record.to_bytes()?)?;
        let state = self.budgets.entry(tenant.to_string()).or_default();
        // A release's task, looked up before the release removes the reservation: the task's
        // state changes too (its reserved amount), and its key must be published again.
        let released_task = match &record {
            BudgetRecord::Release { release, .. } => state.reservation_task(&release.reservation_id).map(str::to_string),
            _ => None,
        };
        state.apply_record(&record);
        let task = match &record {
            BudgetRecord::Admission { admission, .. } => admission.task_id.clone(),
            BudgetRecord::Release { .. } => released_task,
            BudgetRecord::Budget { decision, .. } if decision.level == crate::budget::Level::Task => Some(decision.scope.clone()),
            _ => None,
        };
        self.budget_changed.insert((tenant.to_string(), None));
        if task.is_some() {
            self.budget_changed.insert((tenant.to_string(), task));
        }
        Ok(seq)
    }

    /// Records the tenant's effective budget if it differs from the last `config` record;
    /// returns whether it did.
    fn ensure_config(&mut self, tenant: &str, now: Timestamp) -> Result<bool> {
        let Some(file) = &self.budget_file else { return Ok(false) };
        if !self.effective.contains_key(tenant) {
            let b = file.for_tenant(tenant)?;
            self.effective.insert(tenant.to_string(), b);
        }
        let Some(effective) = self.effective.get(tenant) else { return Ok(false) };
        let current = self.budgets.get(tenant).and_then(BudgetState::budget);
        if current != Some(effective) && (effective.needs_record() || current.is_some()) {
            let effective = effective.clone();
            self.append_budget(tenant, |seq| BudgetRecord::Config { seq, at: now, budget: effective })?;
            // Its calendar may differ: the close of its open period moves with it.
            self.schedule_close(tenant);
            return Ok(true);
        }
        Ok(false)
    }

    /// Charges an appended event (at `event_seq`) and appends the decisions it triggers, and a
    /// `flag` if it arrived inside an active freeze.
    fn after_event(&mut self, tenant: &str, event: &Event, charge: Option<&tally_log::Charge>, event_seq: u64) -> Result<()> {
        let state = self.budgets.entry(tenant.to_string()).or_default();
        let frozen = state.freeze_covering(event.agent_id.as_deref(), event.action.as_deref(), event.task_id.as_deref()).map(|f| f.freeze_id.clone());
        // The task of the reservation this event settles (if the tenant holds it): its reserved
        // amount drops, so its key is published again.
        let settled_task = event.reservation_id.as_deref().and_then(|id| state.reservation_task(id)).map(str::to_string);
        let decisions = state.apply_event(event_seq, event, charge);
        if state.budget().is_some() || event.reservation_id.is_some() {
            self.budget_changed.insert((tenant.to_string(), None));
            if let Some(task) = event.task_id.clone().filter(|_| state.budget().is_some_and(|b| b.task_micros.is_some())) {
                self.budget_changed.insert((tenant.to_string(), Some(task)));
            }
            if let Some(task) = settled_task {
                self.budget_changed.insert((tenant.to_string(), Some(task)));
            }
        }
        for decision in decisions {
            self.append_budget(tenant, |seq| BudgetRecord::Budget { seq, decision })?;
        }
        // After its decisions, which stay right after the event.
        if let Some(freeze_id) = frozen {
            let flag = Flag { at: event.occurred_at, event_seq, flag: FlagKind::Frozen, freeze_id };
            self.append_budget(tenant, |seq| BudgetRecord::Flag { seq, flag })?;
        }
        Ok(())
    }

    /// Uses `file` for budgets from now on (a reload): tenants whose effective budget changed
    /// get a `config` record (and `restored` where a limit was lifted) at the next [`Self::tick`],
    /// timed by it. A reload is an input of its own, not in the topic, and the budget topic must
    /// show a raised limit without waiting for the tenant's next call (a gateway that trusts an
    /// `exceeded` state might never make one).
    pub fn set_budget_file(&mut self, file: Option<Arc<BudgetFile>>) {
        self.budget_file = file;
        self.effective.clear();
        self.config_pending = self.budgets.keys().cloned().collect();
    }

    /// Uses `grace` between a billing period's end and its statement from now on.
    /// (`None`: periods are never closed.)
    pub fn set_statement_grace(&mut self, grace: Option<jiff::SignedDuration>) {
        self.statement_grace = grace;
        let tenants: Vec<String> = self.budgets.keys().cloned().collect();
        for tenant in tenants {
            self.schedule_close(&tenant);
        }
    }

    /// Files the tenant's next period close (or none) where the tick finds it.
    fn schedule_close(&mut self, tenant: &str) {
        let next = self.statement_grace.and_then(|grace| self.budgets.get(tenant)?.next_close(grace));
        if self.close_of.get(tenant) == next.as_ref() {
            return;
        }
        if let Some(old) = self.close_of.remove(tenant) {
            self.closes.remove(&(old, tenant.to_string()));
        }
        if let Some(at) = next {
            self.close_of.insert(tenant.to_string(), at);
            self.closes.insert((at, tenant.to_string()));
        }
    }

    /// Records what the input clock at `clock` makes due for `tenant`: `restored` notices of the
    /// windows that ended, then a `statement` for each billing period that closed; files its
    /// next close.
    ///
    /// Only input moves the clock, so where these land in the tenant's log is a function of the
    /// input: they come after the tenant's records from before the clock passed their time and
    /// before its first record after, whether the record that moved the clock was the tenant's
    /// own (settled in `apply_new`) or another tenant's (settled by the next tick). Consumer lag,
    /// restarts and replays place them identically (docs/billing.md).
    fn settle_input(&mut self, tenant: &str, clock: Timestamp) -> Result<usize> {
        let before = self.ledger.next_seq(tenant);
        let restorations: Vec<BudgetDecision> = self.budgets.get(tenant).map(|s| s.restorations_due(clock)).unwrap_or_default();
        let closing = match (self.statement_grace, self.budgets.get(tenant)) {
            (Some(grace), Some(state)) => state.statements_due(clock, grace),
            _ => Vec::new(),
        };
        // In the order they fell due (a restoration before a statement due at the same time):
        // one settle at a late clock writes what several settles at earlier clocks would have.
        enum Due {
            Restore(BudgetDecision),
            Close(Statement),
        }
        let mut due: Vec<(Timestamp, u8, Due)> = restorations.into_iter().map(|d| (d.at, 0, Due::Restore(d))).collect();
        due.extend(closing.into_iter().map(|s| (s.at, 1, Due::Close(s))));
        due.sort_by_key(|(at, kind, _)| (*at, *kind));
        for (_, _, item) in due {
            match item {
                Due::Restore(decision) => {
                    self.append_budget(tenant, |seq| BudgetRecord::Budget { seq, decision })?;
                }
                Due::Close(statement) => {
                    let seq = self.append_budget(tenant, |seq| BudgetRecord::Statement { seq, statement: Statement { tree_size: seq, ..statement } })?;
                    tracing::info!(tenant, seq, "billing period closed by a statement");
                }
            }
        }
        // Also when nothing closed (its calendar moved): the tenant must not be taken again at
        // every tick.
        self.schedule_close(tenant);
        Ok((self.ledger.next_seq(tenant) - before) as usize)
    }

    /// Whether the input clock at `clock` makes anything due for `tenant` (see
    /// [`Self::settle_input`]): checked before each record, so without calendar arithmetic for
    /// a tenant with no open period due and no announcement.
    fn due_on_input(&self, tenant: &str, clock: Timestamp) -> bool {
        self.close_of.get(tenant).is_some_and(|at| *at <= clock)
            || self.budgets.get(tenant).is_some_and(|s| s.next_window_end().is_some_and(|end| end <= clock))
    }

    /// Time-driven records. On the wall clock `now`: new configs after a reload and expired
    /// reservations (both from outside the topic). On the input clock: ended windows'
    /// `restored` notices and closed billing periods' statements, for at most
    /// [`SETTLES_PER_TICK`] tenants per tick, earliest due first (a month's end makes every
    /// tenant due at once, and the tick holds the partition's lock; the rest follow at the next
    /// ticks), besides tenants whose new config may have lifted a limit. Returns how many records
    /// were appended.
    pub fn tick(&mut self, now: Timestamp) -> Result<usize> {
        let mut appended = self.retention_pass(now);
        let configs = std::mem::take(&mut self.config_pending);
        let expiring: Vec<String> = self.budgets.iter().filter(|(_, s)| s.next_expiry().is_some_and(|w| w <= now)).map(|(t, _)| t.clone()).collect();
        let mut reconfigured = Vec::new();
        for tenant in configs.iter().chain(&expiring) {
            let (records, new_config) = self.settle_wall(tenant, now)?;
            appended += records;
            if new_config {
                reconfigured.push(tenant.clone());
            }
        }
        let Some(clock) = self.input_clock else { return Ok(appended) };
        // A new config can lift a limit: its `restored` notice is due at once.
        for tenant in &reconfigured {
            appended += self.settle_input(tenant, clock)?;
        }
        let mut due: Vec<(Timestamp, String)> =
            self.budgets.iter().filter_map(|(t, s)| s.next_window_end().filter(|w| *w <= clock).map(|w| (w, t.clone()))).collect();
        due.extend(self.closes.iter().take_while(|(at, _)| *at <= clock).take(SETTLES_PER_TICK).cloned());
        due.sort();
        let mut settled: HashSet<String> = reconfigured.into_iter().collect();
        let mut taken = 0;
        for (_, tenant) in due {
            if taken == SETTLES_PER_TICK {
                break;
            }
            if settled.insert(tenant.clone()) {
                taken += 1;
                appended += self.settle_input(&tenant, clock)?;
            }
        }
        Ok(appended)
    }

    /// The wall clock's records for `tenant` at `now`: its `config` after a reload, and its
    /// reservations' expiries.
    /// Returns how many records it appended and whether one is a new `config`.
    fn settle_wall(&mut self, tenant: &str, now: Timestamp) -> Result<(usize, bool)> {
        let before = self.ledger.next_seq(tenant);
        let reconfigured = self.ensure_config(tenant, now)?;
        let state = self.budgets.entry(tenant.to_string()).or_default();
        let expired = state.expired(now);
        for id in expired {
            let expiry = Release { at: now, reservation_id: id, reason: ReleaseReason::Expired, idempotency: None, token: None };
            self.append_budget(tenant, |seq| BudgetRecord::Release { seq, release: expiry })?;
        }
        Ok(((self.ledger.next_seq(tenant) - before) as usize, reconfigured))
    }

    /// An admission decision for `tenant` at `now`, recorded in its log (not yet durable: the
    /// caller commits up to the returned seq before answering). Expired reservations are released
    /// first, so they never cause a denial. A keyed request whose key the tenant already used is
    /// answered from that first record (`replayed`, nothing appended), or refused with
    /// [`Error::IdempotencyConflict`] if the key named another request. The levels in the answer
    /// are those after the decision (an allow's reservation included).
    pub fn authorize(&mut self, tenant: &str, now: Timestamp, request: &AuthorizeRequest, caller: &Caller) -> Result<Decided> {
        let (task, agent, action) = (request.task_id.as_deref(), request.agent_id.as_deref(), request.action.as_deref());
        let idempotency = caller.idempotency_key.map(|k| Idempotency::for_authorize(k, request));
        if let Some(first) = idempotency.as_ref().and_then(|i| self.recall(tenant, i, now).transpose()) {
            let (seq, admission) = first?;
            let admission = admission.ok_or_else(|| Error::IdempotencyConflict { key: caller.idempotency_key.unwrap_or_default().to_string(), seq })?;
            let levels = self.budgets.get(tenant).map(|s| s.levels(now, admission.task_id.as_deref())).unwrap_or_default();
            let throttled = admission.throttled_by.clone().zip(admission.retry_after_ms);
            let verdict = Verdict { allowed: admission.allowed, denied_by: admission.denied_by, throttled, levels };
            return Ok(Decided { verdict, admission, seq, replayed: true });
        }
        // An admission is an API call at `now`: its tenant's records are settled on the wall clock
        // (a log with admissions is not a function of the topic alone anyway).
        self.settle_wall(tenant, now)?;
        let due: Vec<BudgetDecision> = self.budgets.get(tenant).map(|s| s.restorations_due(now)).unwrap_or_default();
        for decision in due {
            self.append_budget(tenant, |seq| BudgetRecord::Budget { seq, decision })?;
        }
        let state = self.budgets.entry(tenant.to_string()).or_default();
        let until = now + jiff::SignedDuration::from_millis(request.ttl_ms);
        // A freeze denies before any level is looked at: no budget makes a frozen scope run.
        let freeze_id = state.freeze_covering(agent, action, task).map(|f| f.freeze_id.clone());
        // A tenant whose tokens are limited must say how many a call will use: counting an
        // unnamed estimate as 0 would let every call past the limit. (A frozen scope is denied
        // whatever the request says.)
        let tokens_limited = state.budget().is_some_and(|b| b.limits_unit(crate::budget::Unit::Tokens) || b.quotas.contains_key("tokens"));
        if freeze_id.is_none() && request.estimated_tokens.is_none() && tokens_limited {
            return Err(Error::MissingEstimatedTokens);
        }
        let mut verdict = match &freeze_id {
            Some(_) => Verdict { allowed: false, denied_by: Some(DeniedBy::Freeze), throttled: None, levels: state.levels(now, task) },
            None => state.authorize(now, until, task, request.estimate_micros),
        };
        // Limits in tokens and calls, after money's.
        let mut denied_unit = None;
        if verdict.allowed {
            if let Some((level, unit)) = state.units_deny(now, until, task, request.estimated_tokens.unwrap_or(0)) {
                verdict.allowed = false;
                verdict.denied_by = Some(DeniedBy::from(level));
                denied_unit = Some(unit);
            }
        }
        // Rate quotas last: a denial is final, a throttle says when to come back.
        let mut quota_id = None;
        if verdict.allowed {
            match state.throttle(now, request) {
                Some(Ok(throttled)) => {
                    verdict.allowed = false;
                    verdict.throttled = Some(throttled);
                }
                Some(Err(key)) => {
                    verdict.allowed = false;
                    verdict.denied_by = Some(DeniedBy::Quota);
                    quota_id = Some(key);
                }
                None => {}
            }
        }
        let calendar = match state.calendar() {
            Some(c) => c,
            None => crate::budget::Calendar::new("UTC", 1)?,
        };
        let seq = self.ledger.next_seq(tenant);
        let admission = Admission {
            at: now,
            allowed: verdict.allowed,
            task_id: request.task_id.clone(),
            estimate_micros: request.estimate_micros,
            reservation_id: verdict.allowed.then(|| format!("res-{seq}")),
            expires_at: verdict.allowed.then_some(until),
            denied_by: verdict.denied_by,
            denied_unit,
            day: calendar.day(now),
            period: calendar.period(now),
            more_days: if verdict.allowed { calendar.later_days(now, until) } else { Vec::new() },
            more_periods: if verdict.allowed { calendar.later_periods(now, until) } else { Vec::new() },
            agent_id: request.agent_id.clone(),
            action: request.action.clone(),
            kind: request.kind.clone(),
            estimated_tokens: request.estimated_tokens,
            throttled_by: verdict.throttled.as_ref().map(|(key, _)| key.clone()).or(quota_id),
            retry_after_ms: verdict.throttled.as_ref().map(|(_, ms)| *ms),
            freeze_id,
            idempotency,
            token: caller.token.map(str::to_string),
        };
        let recorded = admission.clone();
        let seq = self.append_budget(tenant, |seq| BudgetRecord::Admission { seq, admission: recorded })?;
        if verdict.allowed {
            verdict.levels = self.budgets.get(tenant).map(|s| s.levels(now, request.task_id.as_deref())).unwrap_or_default();
        }
        Ok(Decided { verdict, admission, seq, replayed: false })
    }

    /// Releases a reservation before its TTL: the `release` record's seq, or `None` if the tenant
    /// holds no such reservation. A keyed retry is answered from its first record, as authorize.
    pub fn release(&mut self, tenant: &str, reservation_id: &str, now: Timestamp, caller: &Caller) -> Result<Option<Released>> {
        let idempotency = caller.idempotency_key.map(|k| Idempotency::for_release(k, reservation_id));
        if let Some(first) = idempotency.as_ref().and_then(|i| self.recall(tenant, i, now).transpose()) {
            let (seq, admission) = first?;
            if admission.is_some() {
                return Err(Error::IdempotencyConflict { key: caller.idempotency_key.unwrap_or_default().to_string(), seq });
            }
            return Ok(Some(Released { seq, replayed: true }));
        }
        if !self.budgets.get(tenant).is_some_and(|s| s.has_reservation(reservation_id)) {
            return Ok(None);
        }
        let release = Release {
            at: now,
            reservation_id: reservation_id.to_string(),
            reason: ReleaseReason::Released,
            idempotency,
            token: caller.token.map(str::to_string),
        };
        let seq = self.append_budget(tenant, |seq| BudgetRecord::Release { seq, release })?;
        Ok(Some(Released { seq, replayed: false }))
    }

    /// Freezes `scope` of the tenant: from the returned record's seq on, every authorize in the
    /// scope is denied (`denied_by: freeze`) and every event arriving in it is flagged. Returns
    /// the freeze id (`frz-<seq>`) and the seq; not yet durable (the caller commits).
    pub fn freeze(&mut self, tenant: &str, now: Timestamp, reason: &str, scope: FreezeScope, caller: &Caller) -> Result<Frozen> {
        // A freeze of exactly the scope of an active one (a retried request, or a second
        // operator) is that freeze: no second record, nothing more to unfreeze later.
        if let Some(existing) = self.budgets.get(tenant).and_then(|s| s.freezes().find(|f| f.scope == scope)) {
            let seq = existing.freeze_id.strip_prefix("frz-").and_then(|n| n.parse().ok()).unwrap_or(0);
            return Ok(Frozen { freeze_id: existing.freeze_id.clone(), seq, existing: true });
        }
        let active = self.budgets.get(tenant).map_or(0, |s| s.freezes().count());
        if active >= MAX_ACTIVE_FREEZES {
            return Err(Error::TooManyFreezes { active });
        }
        let freeze_id = format!("frz-{}", self.ledger.next_seq(tenant));
        let freeze = Freeze { at: now, freeze_id: freeze_id.clone(), reason: reason.to_string(), scope, token: caller.token.map(str::to_string) };
        let seq = self.append_budget(tenant, |seq| BudgetRecord::Freeze { seq, freeze })?;
        Ok(Frozen { freeze_id, seq, existing: false })
    }

    /// Erases the personal values of the tenant's records: `subject`'s, or every subject's
    /// with `None` (offboarding). Appends the `erasure` records naming the keys and every record
    /// sealed under them, committed or not (not yet durable: the caller commits); the commit that
    /// makes them durable deletes the keys (`finish_commit`). Nothing is appended when there is no
    /// key to erase.
    ///
    /// With `before` (a `YYYY-MM` month), only the keys of earlier months: the values of records
    /// that occurred before it. Reads every committed record of the tenant under this lock;
    /// [`PartitionLedger::erase_scanned`] takes a scan done in steps beforehand.
    pub fn erase(&mut self, tenant: &str, subject: Option<&str>, before: Option<&str>, now: Timestamp, caller: &Caller) -> Result<Erased> {
        let mut scan = self.ledger.begin_erasure_scan(tenant, subject, before)?;
        self.ledger.scan_for_erasure(tenant, subject, before, &mut scan, u64::MAX)?;
        self.erase_scanned(tenant, subject, before, scan, now, caller)
    }

    /// [`PartitionLedger::erase`] after `scan` ([`tally_log::Ledger::scan_for_erasure`], run in
    /// steps by the caller): reads only the committed records the scan has not.
    pub fn erase_scanned(
        &mut self,
        tenant: &str,
        subject: Option<&str>,
        before: Option<&str>,
        scan: tally_log::ErasureScan,
        now: Timestamp,
        caller: &Caller,
    ) -> Result<Erased> {
        let mut keys = self.ledger.subject_keys().key_refs(tenant, subject, before)?;
        self.drop_staged(tenant, &mut keys);
        let plan = self.ledger.plan_erasure(tenant, subject, before, keys, scan, now, caller.token.unwrap_or("anonymous"))?;
        self.record_erasure(tenant, plan)
    }

    /// Drops from `keys` those an erasure staged for the next commit already deletes: a second
    /// erasure before that commit does not name their records again.
    fn drop_staged(&self, tenant: &str, keys: &mut Vec<tally_log::KeyRef>) {
        keys.retain(|k| !self.staged_erasures.iter().any(|s| s.tenant == tenant && s.erasure.keys.contains(k)));
    }

    /// Appends the `erasure` records of `plan` and stages its keys for the commit that makes them
    /// durable.
    fn record_erasure(&mut self, tenant: &str, plan: tally_log::ErasurePlan) -> Result<Erased> {
        let (keys, records, unerasable) = (plan.erasure.keys.len() as u64, plan.erasure.seqs.len() as u64, plan.unerasable);
        if keys == 0 {
            return Ok(Erased { seq: None, keys, records, erasure_records: 0, unerasable });
        }
        let template = tally_log::Erasure { seqs: Vec::new(), ..plan.erasure.clone() };
        let (seq, erasure_records) = self.append_erasure_parts(tenant, plan.erasure)?;
        self.staged_erasures.push(StagedErasure { tenant: tenant.to_string(), erasure: template, last_seq: seq, records });
        Ok(Erased { seq: Some(seq), keys, records, erasure_records, unerasable })
    }

    /// Appends `erasure` in records of bounded size ([`tally_log::Erasure::parts`]); the last
    /// one's seq, and how many. All or nothing: if a part after the first fails to append, the
    /// partition stops (as after a failed journal write), so no commit makes a part durable
    /// without the rest, and the keys stay.
    fn append_erasure_parts(&mut self, tenant: &str, erasure: tally_log::Erasure) -> Result<(u64, u64)> {
        let mut written: Option<(u64, u64)> = None;
        for part in erasure.parts() {
            match self.append_budget(tenant, |seq| BudgetRecord::Erasure { seq, erasure: part }) {
                Ok(seq) => written = Some((seq, written.map_or(1, |(_, n)| n + 1))),
                Err(e) => {
                    if written.is_some() {
                        self.failed(&e);
                    }
                    return Err(e);
                }
            }
        }
        written.ok_or_else(|| Error::BadRecord("an erasure with no record".into()))
    }

    /// Records erased since the last call, and retention passes that failed (for the metrics).
    pub fn take_erasure_counts(&mut self) -> (u64, u64) {
        (std::mem::take(&mut self.erased_since), std::mem::take(&mut self.retention_errors_since))
    }

    /// Ends a freeze: the `unfreeze` record's seq, or `None` if the tenant has no such active
    /// freeze.
    pub fn unfreeze(&mut self, tenant: &str, freeze_id: &str, now: Timestamp, caller: &Caller) -> Result<Option<u64>> {
        if !self.budgets.get(tenant).is_some_and(|s| s.has_freeze(freeze_id)) {
            return Ok(None);
        }
        let unfreeze = Unfreeze { at: now, freeze_id: freeze_id.to_string(), token: caller.token.map(str::to_string) };
        self.append_budget(tenant, |seq| BudgetRecord::Unfreeze { seq, unfreeze }).map(Some)
    }

    /// The first answer to a keyed request: its record's seq and admission (`None`: a release);
    /// `Ok(None)` if the key is not remembered, or was first used more than `REMEMBER_KEYS_FOR`
    /// before `now` (the state prunes by record time only when a new key arrives); a conflict
    /// if it named another request.
    fn recall(&self, tenant: &str, idempotency: &Idempotency, now: Timestamp) -> Result<Option<(u64, Option<Admission>)>> {
        let horizon = now.checked_sub(crate::budget::REMEMBER_KEYS_FOR).unwrap_or(now);
        let remembered = self.budgets.get(tenant).and_then(|s| s.remembered(&idempotency.key)).filter(|r| r.at >= horizon);
        let Some(first) = remembered else { return Ok(None) };
        if first.request_sha256 != idempotency.request_sha256 {
            return Err(Error::IdempotencyConflict { key: idempotency.key.clone(), seq: first.seq });
        }
        Ok(Some((first.seq, first.admission.clone())))
    }

    /// The tenant's committed (durable) log size.
    pub fn committed_size(&self, tenant: &str) -> u64 {
        self.ledger.size(tenant)
    }

    pub fn budget(&self, tenant: &str) -> Option<&BudgetState> {
        self.budgets.get(tenant)
    }

    /// The tenant's budget state for a reader: its own, or, for a tenant the budgets file
    /// configures but whose log holds no `config` record yet, a state with that budget, so its
    /// limits show before its first record.
    pub fn budget_view(&self, tenant: &str) -> Result<BudgetState> {
        let mut state = self.budgets.get(tenant).cloned().unwrap_or_default();
        if state.budget().is_none() {
            if let Some(budget) = self.budget_file.as_ref().map(|f| f.for_tenant(tenant)).transpose()?.filter(|b| b.enforces_anything()) {
                state.apply_record(&BudgetRecord::Config { seq: 0, at: Timestamp::UNIX_EPOCH, budget });
            }
        }
        Ok(state)
    }

    /// (tenant, task) whose budget state changed since the last call (to publish).
    /// The budget-topic message of every tenant here that has a budget, and of each task holding
    /// a reservation: what a new owner publishes again.
    pub fn current_budget_messages(&self, now: jiff::Timestamp) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (tenant, state) in &self.budgets {
            if state.budget().is_none() && state.open_tasks().next().is_none() && !state.ever_frozen() {
                continue;
            }
            out.push(super::budget_message(tenant, None, state, now));
            out.extend(state.open_tasks().map(|task| super::budget_message(tenant, Some(task), state, now)));
        }
        out
    }

    pub fn take_budget_changes(&mut self) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut self.budget_changed).into_iter().collect()
    }

    /// Commits every tenant's new records and the next offset (one `fdatasync`), then the store.
    /// Returns the next offset now durable, if any was consumed.
    pub fn commit(&mut self) -> Result<Option<i64>> {
        self.commit_timed().map(|(next, _)| next)
    }

    /// [`PartitionLedger::commit`], also saying how long its durable phases took.
    pub fn commit_timed(&mut self) -> Result<(Option<i64>, CommitTimes)> {
        self.commit_with(false)
    }

    /// The last commit before the partition is closed (revoked, or the service stops): the store
    /// is committed durably with every budget snapshot up to date, so the next owner replays
    /// nothing. Afterwards the partition is closed: request handlers that still hold it answer
    /// `rebalancing`.
    pub fn commit_closing(&mut self) -> Result<(Option<i64>, CommitTimes)> {
        self.commit_with(true)
    }

    /// After a failed journal write or sync: the journal forgot what was not durable, so state
    /// derived from it here (dedup keys, budget folds) may be ahead of it. The partition takes no
    /// new work (handlers answer `rebalancing`) until it is opened again, which rebuilds that
    /// state from the journal.
    fn failed(&mut self, why: &dyn std::fmt::Display) {
        self.closed = true;
        self.failure.get_or_insert_with(|| why.to_string());
        self.pending.clear();
        self.in_flight.clear();
        // Their `erasure` records were not made durable: the keys stay.
        self.staged_erasures.clear();
    }

    /// Stops the partition after a failure of its storage met outside a commit (a read or write
    /// of its files while applying a delivery): as after a failed commit, it takes no more work
    /// and must be opened again.
    pub fn stop_after_failure(&mut self, why: &Error) {
        self.failed(why);
    }

    /// The first failure that stopped the partition (a journal write or sync, a store commit),
    /// if one did: the partition must be opened again.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Whether [`PartitionLedger::commit_closing`] has run: it takes no new work.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// A retention pass, at most every [`RETENTION_EVERY`]: for each tenant whose budget sets
    /// `personal_data_days`, the subject keys of months wholly older than that are erased, as
    /// an erasure of every subject `before` the month the cutoff falls in, by `retention`
    /// (docs/privacy.md, "Retention"). Reads every key shard of the partition, and the whole log
    /// of each tenant with keys to erase. A failure is logged and counted, and the pass is tried
    /// again at the next one: it never stops the partition. Returns the records appended.
    fn retention_pass(&mut self, now: Timestamp) -> usize {
        if self.retention_checked.is_some_and(|at| at.elapsed() < RETENTION_EVERY) {
            return 0;
        }
        self.retention_checked = Some(std::time::Instant::now());
        let cutoffs: HashMap<String, String> = self
            .budgets
            .iter()
            .filter_map(|(tenant, state)| {
                let days = state.budget()?.personal_data_days?;
                let cutoff = now.checked_sub(jiff::SignedDuration::from_hours(24 * i64::from(days))).ok()?;
                Some((tenant.clone(), tally_log::period_of(cutoff)))
            })
            .collect();
        if cutoffs.is_empty() {
            return 0;
        }
        let expired = match self.ledger.subject_keys().expired(|tenant| cutoffs.get(tenant).cloned()) {
            Ok(expired) => expired,
            Err(e) => {
                self.retention_errors_since += 1;
                tracing::error!(partition = self.partition, error = %e, "retention pass: could not read the subject keys; tried again at the next pass");
                return 0;
            }
        };
        let mut appended = 0;
        for (tenant, mut keys) in expired {
            self.drop_staged(&tenant, &mut keys);
            let before = cutoffs.get(&tenant).cloned();
            let erased = self
                .ledger
                .plan_erasure(&tenant, None, before.as_deref(), keys, tally_log::ErasureScan::default(), now, "retention")
                .map_err(Error::from)
                .and_then(|plan| self.record_erasure(&tenant, plan));
            match erased {
                Ok(erased) => appended += erased.erasure_records as usize,
                Err(e) => {
                    self.retention_errors_since += 1;
                    tracing::error!(tenant_id = %tenant, partition = self.partition, error = %e, "retention pass: erasure failed; tried again at the next pass");
                }
            }
        }
        appended
    }

    /// An event of `tenant` that occurred at `at` arrived: if that is already past the tenant's
    /// retention window (a late or replayed event), the next tick runs a retention pass rather
    /// than the next hour's, so its values do not outlive the window by an hour.
    fn retention_hint(&mut self, tenant: &str, at: Timestamp) {
        let Some(days) = self.budgets.get(tenant).and_then(BudgetState::budget).and_then(|b| b.personal_data_days) else { return };
        let cutoff = Timestamp::now().checked_sub(jiff::SignedDuration::from_hours(24 * i64::from(days)));
        if cutoff.is_ok_and(|c| tally_log::period_of(at) < tally_log::period_of(c)) {
            self.retention_checked = None;
        }
    }

    fn commit_with(&mut self, closing: bool) -> Result<(Option<i64>, CommitTimes)> {
        let written = self.write_commit(closing)?;
        let synced = written.sync();
        self.finish_commit(written, synced)
    }

    /// Names, in a further `erasure` record, each staged erasure's records appended after its
    /// last record and sealed under its keys (ingestion appended them before this commit): the
    /// commit deletes those keys, and every record it erases must be named.
    fn name_late_records(&mut self) -> Result<()> {
        for i in 0..self.staged_erasures.len() {
            let staged = &self.staged_erasures[i];
            let late = self.ledger.unsettled_under(&staged.tenant, staged.last_seq, &staged.erasure.keys);
            if late.is_empty() {
                continue;
            }
            let (tenant, named) = (staged.tenant.clone(), late.len() as u64);
            let further = tally_log::Erasure { seqs: late, ..staged.erasure.clone() };
            // Any failure here stops the partition: the staged keys must not go without it.
            let (seq, _) = self.append_erasure_parts(&tenant, further).inspect_err(|e| self.failed(e))?;
            if let Some(staged) = self.staged_erasures.get_mut(i) {
                staged.last_seq = seq;
                staged.records += named;
            }
        }
        Ok(())
    }

    /// The first half of a commit: writes every tenant's new records and the next offset to the
    /// journal, without syncing. The caller runs [`WrittenCommit::sync`] without holding this
    /// partition's lock, so reads and admissions go on during the `fdatasync`, then calls
    /// [`PartitionLedger::finish_commit`]. Commits must not overlap: the caller serialises them.
    ///
    /// Every [`STORE_DURABLE_EVERY`], or when `closing` (then the partition takes no new work),
    /// the commit also snapshots every budget it changed or left stale, as of this commit.
    pub fn write_commit(&mut self, closing: bool) -> Result<WrittenCommit> {
        if self.failure.is_some() {
            // Its state may be ahead of its journal (and its key store hold retired keys whose
            // erasure never became durable): nothing more is written until it is reopened.
            return Err(Error::Log(tally_log::Error::Commit(format!("partition {}-{} stopped after a failed write; reopen it", self.topic, self.partition))));
        }
        if closing {
            self.closed = true;
        }
        let started = std::time::Instant::now();
        self.name_late_records()?;
        let pending = self.ledger.write_commit(self.next_offset).inspect_err(|e| self.failed(e))?;
        // The erasures' records are written: appends from now on (during the sync, when the
        // lock is free) are sealed under new keys, not under those this commit deletes.
        for staged in &self.staged_erasures {
            if let Err(e) = self.ledger.retire_keys(&staged.tenant, &staged.erasure.keys) {
                self.failed(&e);
                return Err(e.into());
            }
        }
        self.in_flight = std::mem::take(&mut self.pending);
        let durable = closing || self.store_durable_at.elapsed() >= STORE_DURABLE_EVERY;
        let mut snapshots = Vec::new();
        if durable {
            // Every record appended so far is in this commit, so each state is exactly the fold
            // of the tenant's log at its size after it.
            self.budget_stale.extend(pending.tenants().map(str::to_string));
            for tenant in std::mem::take(&mut self.budget_stale) {
                if let Some(budget) = self.budgets.get(&tenant) {
                    let covered = self.ledger.next_seq(&tenant);
                    snapshots.push((tenant, covered, serde_json::to_vec(budget).map_err(|e| Error::BadRecord(e.to_string()))?));
                }
            }
        }
        let journal_position = durable.then(|| pending.journal_end().unwrap_or(self.ledger.journal_end()));
        // The keys of the erasures this commit writes, and only those: an erasure appended while
        // it syncs (the lock is free then) is in the next commit, and its keys wait for it.
        let forget = std::mem::take(&mut self.staged_erasures);
        Ok(WrittenCommit { pending, next_offset: self.next_offset, started, snapshots, journal_position, forget })
    }

    /// The second half of a commit, with `synced` the outcome of [`WrittenCommit::sync`]: the
    /// records become readable and the store takes the commit's dedup keys (durably, with the
    /// budget snapshots and the journal position they cover, when the commit took snapshots).
    /// Returns the next offset now durable.
    pub fn finish_commit(&mut self, written: WrittenCommit, synced: Result<()>) -> Result<(Option<i64>, CommitTimes)> {
        let synced = synced.map_err(|e| match e {
            Error::Log(e) => e,
            other => tally_log::Error::Commit(other.to_string()),
        });
        let changed = self.ledger.finish_commit(written.pending, synced).inspect_err(|e| self.failed(e))?;
        // The `erasure` records are durable: now their keys go, before the store's durable
        // position can move past the records (an open replays them and deletes what is left).
        if !written.forget.is_empty() {
            let keys: Vec<(String, Vec<tally_log::KeyRef>)> = written.forget.iter().map(|s| (s.tenant.clone(), s.erasure.keys.clone())).collect();
            if let Err(e) = self.ledger.forget_keys_of(&keys) {
                // The records say the keys are gone but a shard file still holds them: the
                // partition stops before the store's durable position can pass the records, and
                // the open that follows replays them and deletes the keys (or fails naming why).
                tracing::error!(partition = self.partition, error = %e, "could not delete the subject keys of a durable erasure; the partition stops and its next open deletes them");
                self.failed(&e);
                return Err(e.into());
            }
            self.erased_since += written.forget.iter().map(|s| s.records).sum::<u64>();
        }
        let mut times = CommitTimes { logs: written.started.elapsed(), state: None };
        let durable = written.journal_position.is_some();
        if !durable {
            self.budget_stale.extend(changed.iter().cloned());
        }
        self.unprojected.extend(changed);
        let batch = Batch { seen: self.in_flight.drain().collect(), budgets: written.snapshots, journal_position: written.journal_position, durable };
        if !batch.is_empty() {
            let started = std::time::Instant::now();
            if let Err(e) = self.store.commit(&batch) {
                // redb takes no further transaction after a failed write until it is opened
                // again; the records are durable in the journal, and the open that follows
                // replays into the store what it misses.
                self.failed(&e);
                return Err(e);
            }
            times.state = Some(started.elapsed());
        }
        if durable {
            self.store_durable_at = std::time::Instant::now();
        }
        Ok((written.next_offset, times))
    }
}

/// A partition commit written but not yet durable (see [`PartitionLedger::write_commit`]).
pub struct WrittenCommit {
    pending: tally_log::PendingCommit,
    next_offset: Option<i64>,
    started: std::time::Instant,
    /// Budget snapshots as of this commit, when it makes the store durable.
    snapshots: Vec<(String, u64, Vec<u8>)>,
    /// The journal position after this commit, when it makes the store durable.
    journal_position: Option<u64>,
    /// Subject keys of the `erasure` records this commit writes: deleted once it is durable.
    forget: Vec<StagedErasure>,
}

impl WrittenCommit {
    /// The commit's one `fdatasync`; needs no lock.
    pub fn sync(&self) -> Result<()> {
        Ok(self.pending.sync()?)
    }
}

/// How often a partition looks for personal values past their tenant's retention. Keys are per
/// month, so a pass finds new ones at most once a month per tenant; an hour keeps the lag small.
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3_600);

/// How long the store goes without a durable commit (and so how much journal an open after a
/// crash replays). Budget snapshots are JSON of the whole state: taken at every commit, they made
/// every durable authorize serialise it.
const STORE_DURABLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A delivery of a valid `llm_call` event, for tests in this module and [`super::http`].
#[cfg(test)]
pub(super) fn test_delivery(offset: i64, tenant: &str, id: &str, cost: i64) -> Delivery {
    json_delivery(
        offset,
        tenant,
        format!(
            r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{{"amount_micros":{cost},"currency":"USD"}}}}"#
        ),
    )
}

/// A delivery of an event of `actor` with an `email` attribute (personal fields), for tests in
/// this module and [`super::http`].
#[cfg(test)]
pub(super) fn test_personal_delivery(offset: i64, tenant: &str, id: &str, actor: &str, email: &str) -> Delivery {
    json_delivery(
        offset,
        tenant,
        format!(
            r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","actor_id":"{actor}","attributes":{{"email":"{email}"}},"cost":{{"amount_micros":1,"currency":"USD"}}}}"#
        ),
    )
}

/// A delivery of a valid `llm_call` event that occurred at `at` and was published a second
/// later, for tests in this module and [`super::http`].
#[cfg(test)]
pub(super) fn test_delivery_at(offset: i64, tenant: &str, id: &str, at: &str) -> Delivery {
    published(json_delivery(offset, tenant, format!(r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"{at}","kind":"llm_call"}}"#)), at)
}

/// `delivery` with its message published a second after `at`.
#[cfg(test)]
fn published(mut delivery: Delivery, at: &str) -> Delivery {
    delivery.timestamp_ms = Some(at.parse::<Timestamp>().unwrap().as_millisecond() + 1_000);
    delivery
}

/// A delivery of `value` on partition 3, keyed by `tenant`, decoded as the consumer would.
#[cfg(test)]
fn json_delivery(offset: i64, tenant: &str, value: String) -> Delivery {
    let value = value.into_bytes();
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
        let conflict = String::from_utf8(p.ledger().tenant("acme").entry(1).unwrap()).unwrap();
        assert!(conflict.contains(r#""type":"conflict""#) && conflict.contains(r#""conflicts_with_seq":0"#), "{conflict}");
    }

    /// The keys of an erasure go with the commit that makes its record durable; a stop between
    /// the two leaves them for the next open, which deletes them before anything reads them.
    #[test]
    fn an_erasures_keys_go_with_its_commit_or_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let caller = Caller { token: Some("ops"), idempotency_key: None };
        let now: Timestamp = "2026-11-03T00:00:00Z".parse().unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        p.apply(&test_personal_delivery(0, "acme", "p0", "user-ann", "ann@example.com")).unwrap();
        p.apply(&test_personal_delivery(1, "acme", "p1", "user-bob", "bob@example.com")).unwrap();
        // Not yet committed: named all the same.
        let erased = p.erase("acme", Some("user-ann"), None, now, &caller).unwrap();
        assert_eq!((erased.keys, erased.records, erased.erasure_records, erased.unerasable), (1, 1, 1, 0));
        // Appended after the erasure's record, before its commit, under the key it deletes: the
        // commit names it in a further record.
        p.apply(&test_personal_delivery(2, "acme", "p2", "user-ann", "ann2@example.com")).unwrap();
        let written = p.write_commit(false).unwrap();
        // Appended while the commit syncs: under a new key, which the erasure does not delete.
        p.apply(&test_personal_delivery(3, "acme", "p3", "user-ann", "ann3@example.com")).unwrap();
        // Written, not durable: the keys are still there.
        let synced = written.sync();
        p.finish_commit(written, synced).unwrap();
        p.commit().unwrap();
        let erasure = |p: &PartitionLedger, seq: u64| tally_log::Erasure::decode(seq, &p.ledger().tenant("acme").entry(seq).unwrap()).unwrap();
        assert_eq!((erasure(&p, 2).seqs, erasure(&p, 4).seqs), (vec![0], vec![3]));
        assert_eq!(erasure(&p, 4).keys, erasure(&p, 2).keys);
        for seq in [0, 3] {
            assert_eq!(p.ledger().revealed("acme", seq).unwrap(), Some(tally_log::Revealed::Erased), "seq {seq}");
        }
        for seq in [1, 5] {
            assert!(matches!(p.ledger().revealed("acme", seq).unwrap(), Some(tally_log::Revealed::Open(_))), "seq {seq}");
        }
        let bob = 1;

        // An erasure appended while another commit syncs (the lock is free then) keeps its keys
        // until its own record is durable.
        let written = p.write_commit(false).unwrap();
        let during = p.erase("acme", Some("user-bob"), None, now, &caller).unwrap();
        let synced = written.sync();
        p.finish_commit(written, synced).unwrap();
        assert!(matches!(p.ledger().revealed("acme", bob).unwrap(), Some(tally_log::Revealed::Open(_))), "its record is not durable yet");
        p.commit().unwrap();
        assert_eq!(p.ledger().revealed("acme", bob).unwrap(), Some(tally_log::Revealed::Erased));
        assert_eq!(during.records, 1);
        p.apply(&test_personal_delivery(4, "acme", "p4", "user-bob", "bob@example.com")).unwrap();
        p.commit().unwrap();

        // A stop after the record's fsync and before its keys are deleted.
        let erased = p.erase("acme", Some("user-bob"), None, now, &caller).unwrap();
        let written = p.write_commit(false).unwrap();
        written.sync().unwrap();
        drop(written);
        drop(p);
        let p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.committed_size("acme"), erased.seq.unwrap() + 1, "the erasure record is durable");
        let bob = p.committed_size("acme") - 2;
        assert_eq!(p.ledger().revealed("acme", bob).unwrap(), Some(tally_log::Revealed::Erased), "the open deleted the key");
    }

    const OPS: Caller<'static> = Caller { token: Some("ops"), idempotency_key: None };
    const ERASED_AT: &str = "2026-11-03T00:00:00Z";

    /// A partition holding one committed event of user-ann in tenant acme, and the path of the
    /// key shard that holds ann's key.
    fn one_committed_subject() -> (tempfile::TempDir, LedgerKey, PartitionLedger, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        p.apply(&test_personal_delivery(0, "acme", "p0", "user-ann", "ann@example.com")).unwrap();
        p.commit().unwrap();
        let shard = format!("{:02x}.keys", tally_log::SubjectKeys::shard_of("acme", "user-ann"));
        let shard = dir.path().join("partitions/events-3").join(tally_log::SUBJECT_KEYS_DIR).join(shard);
        (dir, key, p, shard)
    }

    /// An erasure whose commit fails to sync: its keys were retired and a new key took the
    /// subject's place meanwhile, but no later commit may write that shard without the old key.
    #[test]
    fn after_an_erasures_failed_sync_no_commit_writes_its_keys_away() {
        let (dir, key, mut p, shard) = one_committed_subject();
        let before = std::fs::read(&shard).unwrap();
        p.erase("acme", Some("user-ann"), None, ERASED_AT.parse().unwrap(), &OPS).unwrap();
        let written = p.write_commit(false).unwrap();
        // During the sync: ann's next event gets a new key in the same shard.
        p.apply(&test_personal_delivery(1, "acme", "p1", "user-ann", "ann2@example.com")).unwrap();
        assert!(p.finish_commit(written, Err(Error::Service("injected fsync failure".into()))).is_err());
        assert!(p.commit().is_err() && p.commit_closing().is_err(), "a failed partition commits nothing more");
        assert_eq!(before, std::fs::read(&shard).unwrap(), "the shard still holds the key no durable record erased");
        drop(p);
        // The injected failure left the frames written (as a real one may): the open finds the
        // record whole, so it is durable after all, and the open deletes the key. Either way the
        // record and the deletion go together.
        let p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.committed_size("acme"), 2, "the event and the erasure; not the event appended during the sync");
        assert!(tally_log::Erasure::decode(1, &p.ledger().tenant("acme").entry(1).unwrap()).is_ok());
        assert_eq!(p.ledger().revealed("acme", 0).unwrap(), Some(tally_log::Revealed::Erased));
    }

    /// A key shard that cannot be written after an erasure's record is durable stops the
    /// partition before its store passes the record; the next open deletes the key.
    #[test]
    fn a_failed_key_deletion_stops_the_partition_and_the_next_open_finishes_it() {
        let (dir, key, mut p, shard) = one_committed_subject();
        let saved = std::fs::read(&shard).unwrap();
        let erased = p.erase("acme", Some("user-ann"), None, ERASED_AT.parse().unwrap(), &OPS).unwrap();
        // A directory where the shard is: replacing it fails (as a full or broken disk would).
        std::fs::remove_file(&shard).unwrap();
        std::fs::create_dir_all(shard.join("in-the-way")).unwrap();
        assert!(p.commit().is_err());
        assert!(p.failure().is_some(), "the partition takes no more work");
        drop(p);
        std::fs::remove_dir_all(&shard).unwrap();
        std::fs::write(&shard, saved).unwrap();
        let p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.committed_size("acme"), erased.seq.unwrap() + 1, "the erasure record is durable");
        assert_eq!(p.ledger().revealed("acme", 0).unwrap(), Some(tally_log::Revealed::Erased), "the open deleted the key");
        assert!(std::fs::read(&shard).unwrap().len() < 40, "and the shard no longer holds it");
    }

    /// Retention runs by itself on the tick: the months wholly older than the tenant's
    /// `personal_data_days` lose their keys, later months and other tenants keep theirs.
    #[test]
    fn retention_erases_the_months_past_the_window_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        let budgets: crate::budget::BudgetFile = toml::from_str("[tenants.acme]\npersonal_data_days = 30\n").unwrap();
        p.set_budget_file(Some(Arc::new(budgets)));
        let appended = |applied: Applied| match applied {
            Applied::Appended { seq, .. } => seq,
            other => panic!("not appended: {other:?}"),
        };
        let nov = appended(p.apply(&test_personal_delivery(0, "acme", "nov", "user-ann", "ann@example.com")).unwrap());
        let december = r#"{"event_id":"dec","tenant_id":"acme","occurred_at":"2026-12-20T09:00:00Z","kind":"llm_call","actor_id":"user-ann","attributes":{"email":"ann@example.org"}}"#;
        let dec = appended(p.apply(&json_delivery(1, "acme", december.to_string())).unwrap());
        p.apply(&test_personal_delivery(2, "globex", "g", "user-gil", "gil@example.com")).unwrap();
        p.commit().unwrap();
        // 2027-01-15 minus 30 days is in December: November is past the window, December is not.
        let now: Timestamp = "2027-01-15T00:00:00Z".parse().unwrap();
        assert!(p.tick(now).unwrap() >= 1, "the pass appends an erasure record");
        p.commit().unwrap();
        let revealed = |p: &PartitionLedger, tenant: &str, seq: u64| p.ledger().revealed(tenant, seq).unwrap();
        assert_eq!(revealed(&p, "acme", nov), Some(tally_log::Revealed::Erased));
        assert!(matches!(revealed(&p, "acme", dec), Some(tally_log::Revealed::Open(_))), "December is within the window");
        assert!(matches!(revealed(&p, "globex", 0), Some(tally_log::Revealed::Open(_))), "globex has no retention");
        let last = p.committed_size("acme") - 1;
        let erasure = tally_log::Erasure::decode(last, &p.ledger().tenant("acme").entry(last).unwrap()).unwrap();
        assert_eq!((erasure.by.as_str(), erasure.before.as_deref(), erasure.seqs.as_slice()), ("retention", Some("2026-12"), &[nov][..]));
        // Within the hour nothing runs again; nothing is left to erase anyway.
        assert_eq!(p.tick(now).unwrap(), 0);
    }

    /// A retry of an event recorded before personal fields were committed to (its dedup digest
    /// is the whole event's) is still a retry, not a conflict.
    #[test]
    fn a_retry_of_an_event_recorded_in_the_old_format_is_still_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let old = test_personal_delivery(0, "acme", "p0", "user-ann", "ann@example.com");
        {
            let mut ledger = Ledger::open(&dir.path().join("partitions/events-3"), vec![key.clone()]).unwrap();
            let decoded = old.outcome.as_ref().unwrap();
            let source = Source::Kafka { topic: "events".into(), partition: 3, offset: 0, timestamp_ms: None };
            let input = EventInput { event: &decoded.event, ce_source: None, payload_sha256: &decoded.payload_sha256, source: &source };
            // What the ledger wrote before: the event whole, personal fields included.
            ledger.append("acme", &tally_log::event_record(0, input, None).unwrap()).unwrap();
            ledger.commit(Some(1)).unwrap();
        }
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        let retry = test_personal_delivery(1, "acme", "p0", "user-ann", "ann@example.com");
        assert_eq!(p.apply(&retry).unwrap(), Applied::Deduplicated { tenant: "acme".into() });
        let changed = test_personal_delivery(2, "acme", "p0", "user-ann", "ann@example.org");
        assert_eq!(p.apply(&changed).unwrap(), Applied::Conflict { tenant: "acme".into(), seq: 1 });
        // The old record holds its values in clear: an erasure says it cannot remove them.
        p.commit().unwrap();
        let erased = p.erase("acme", Some("user-ann"), None, "2026-11-03T00:00:00Z".parse().unwrap(), &Caller::default()).unwrap();
        assert_eq!((erased.records, erased.unerasable), (1, 1), "{erased:?}");
    }

    fn agent_delivery(offset: i64, tenant: &str, id: &str, agent: &str) -> Delivery {
        json_delivery(
            offset,
            tenant,
            format!(
                r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"tool_call","agent_id":"{agent}","action":"send_email"}}"#
            ),
        )
    }

    /// A freeze denies every authorize in its scope from its seq on (fail closed for a request
    /// that does not say which agent it is), flags events arriving in its scope without losing
    /// them, survives a reopen, and stops at its unfreeze.
    #[test]
    fn a_freeze_denies_its_scope_flags_its_events_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        let ops = Caller { token: Some("ops"), idempotency_key: None };
        let ask =
            |agent: Option<&str>| AuthorizeRequest { agent_id: agent.map(str::to_string), estimate_micros: 1, ttl_ms: 60_000, ..AuthorizeRequest::default() };
        let now = Timestamp::now();
        let scope = FreezeScope { agent_id: Some("rogue".into()), ..FreezeScope::default() };
        let Frozen { freeze_id, seq: freeze_seq, existing } = p.freeze("acme", now, "sending spam", scope.clone(), &ops).unwrap();
        assert_eq!((freeze_id.clone(), existing), (format!("frz-{freeze_seq}"), false));
        // The same scope again (a retried request): the same freeze, no second record.
        let again = p.freeze("acme", now, "retried", scope, &ops).unwrap();
        assert_eq!(again, Frozen { freeze_id: freeze_id.clone(), seq: freeze_seq, existing: true });
        assert_eq!(p.ledger().next_seq("acme"), freeze_seq + 1);
        for (agent, allowed) in [(Some("rogue"), false), (None, false), (Some("helper"), true)] {
            let d = p.authorize("acme", now, &ask(agent), &ops).unwrap();
            assert_eq!(d.verdict.allowed, allowed, "{agent:?}");
            assert!(d.seq > freeze_seq);
            if !allowed {
                assert_eq!((d.verdict.denied_by, d.admission.freeze_id.as_deref()), (Some(DeniedBy::Freeze), Some(freeze_id.as_str())));
            }
        }
        assert!(p.authorize("globex", now, &ask(Some("rogue")), &ops).unwrap().verdict.allowed, "another tenant is not frozen");
        // An event in the frozen scope is recorded, then flagged; one outside is not.
        let Applied::Appended { seq: flagged, .. } = p.apply(&agent_delivery(0, "acme", "e1", "rogue")).unwrap() else { panic!() };
        let Applied::Appended { seq: clean, .. } = p.apply(&agent_delivery(1, "acme", "e2", "helper")).unwrap() else { panic!() };
        assert_eq!(p.ledger().next_seq("acme"), clean + 1, "no flag for an agent outside the scope");
        p.commit().unwrap();
        let flag = String::from_utf8(p.ledger().tenant("acme").entry(flagged + 1).unwrap()).unwrap();
        assert!(flag.contains(r#""type":"flag""#) && flag.contains(&format!(r#""event_seq":{flagged}"#)) && flag.contains(&freeze_id), "{flag}");
        drop(p);

        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.budget("acme").unwrap().freezes().map(|f| f.freeze_id.clone()).collect::<Vec<_>>(), vec![freeze_id.clone()]);
        assert!(!p.authorize("acme", now, &ask(Some("rogue")), &ops).unwrap().verdict.allowed, "still frozen after a reopen");
        assert_eq!(p.unfreeze("acme", "frz-999", now, &ops).unwrap(), None);
        let unfrozen = p.unfreeze("acme", &freeze_id, now, &ops).unwrap().unwrap();
        let d = p.authorize("acme", now, &ask(Some("rogue")), &ops).unwrap();
        assert!(d.verdict.allowed && d.seq > unfrozen);
        // acme has no budget, but was frozen: a new owner publishes its state again, so a lost
        // unfreeze message cannot leave the topic showing it frozen.
        assert!(p.current_budget_messages(now).iter().any(|(k, _)| k == "acme"));
        // Bounded: a tenant cannot pile up freezes without end.
        for i in 0..MAX_ACTIVE_FREEZES {
            p.freeze("globex", now, &format!("f{i}"), FreezeScope { task_id: Some(format!("t{i}")), ..FreezeScope::default() }, &ops).unwrap();
        }
        assert!(matches!(p.freeze("globex", now, "one more", FreezeScope::default(), &ops), Err(Error::TooManyFreezes { .. })));
    }

    /// A release (or an expiry) changes its task's reserved amount, so the task's key is
    /// published again, not only the tenant's; a configured tenant without records shows its
    /// limits to readers.
    #[test]
    fn a_release_republishes_its_task_and_a_new_tenant_shows_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        let budgets: BudgetFile =
            toml::from_str("[tenants.newco]\nday_micros = 7_000\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n").unwrap();
        p.set_budget_file(Some(Arc::new(budgets)));
        let view = p.budget_view("newco").unwrap();
        let day = view.levels(Timestamp::now(), None).into_iter().find(|l| l.level == crate::budget::Level::Day).unwrap();
        assert_eq!(day.limit_micros, Some(7_000));
        assert_eq!(p.ledger().next_seq("newco"), 0, "reading writes nothing");
        assert!(p.budget_view("unconfigured").unwrap().levels(Timestamp::now(), None).is_empty());

        let now = Timestamp::now();
        let ask = AuthorizeRequest { task_id: Some("run-1".into()), estimate_micros: 2_000, ttl_ms: 50, ..AuthorizeRequest::default() };
        let id = p.authorize("newco", now, &ask, &Caller::default()).unwrap().admission.reservation_id.unwrap();
        p.take_budget_changes();
        p.release("newco", &id, now, &Caller::default()).unwrap().unwrap();
        let changed = p.take_budget_changes();
        assert!(changed.contains(&("newco".to_string(), Some("run-1".to_string()))), "{changed:?}");
        // The same for an expiry.
        p.authorize("newco", now, &ask, &Caller::default()).unwrap();
        p.take_budget_changes();
        p.tick(now + jiff::SignedDuration::from_secs(1)).unwrap();
        let changed = p.take_budget_changes();
        assert!(changed.contains(&("newco".to_string(), Some("run-1".to_string()))), "{changed:?}");
    }

    /// An acme call at `at` with tokens priced from the table, published a second later.
    fn priced_delivery(offset: i64, id: &str, at: &str, input_tokens: u64) -> Delivery {
        published(
            json_delivery(
                offset,
                "acme",
                format!(
                    r#"{{"event_id":"{id}","tenant_id":"acme","occurred_at":"{at}","kind":"llm_call","action":"m","usage":{{"input_tokens":{input_tokens},"output_tokens":0}}}}"#
                ),
            ),
            at,
        )
    }

    fn catalog(price: i64) -> Arc<BudgetFile> {
        limited_catalog(price, "")
    }

    /// [`catalog`] with more of acme's budget (`limits`: TOML lines).
    fn limited_catalog(price: i64, limits: &str) -> Arc<BudgetFile> {
        let text = format!("[tenants.acme]\n{limits}ceiling = {{ input_per_million_micros = 1, output_per_million_micros = 1 }}\n[tenants.acme.prices.m]\ninput_per_million_micros = {price}\noutput_per_million_micros = 0\n");
        Arc::new(toml::from_str(&text).unwrap())
    }

    /// Replaying the same deliveries with budgets configured writes byte-identical logs however
    /// the ticks fall and however late the ledger reads them: a `config` an event brings in
    /// takes its time from the event's message, and a period closes on the input clock, never
    /// the wall clock. A reload is an input of its own: its `config` is timed by the tick that
    /// applies it, and the events after it are rated under the new catalog version.
    #[test]
    fn replaying_with_budgets_writes_the_same_bytes_and_a_reload_is_a_new_catalog() {
        let mut runs = Vec::new();
        for (run, tick_at) in [(0, "2026-11-02T10:00:00Z"), (1, "2027-03-20T17:00:00Z")] {
            let dir = tempfile::tempdir().unwrap();
            let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![LedgerKey::generate("tally.example.com").unwrap()]).unwrap();
            // A day limit the two calls of 2 November exceed: its `restored` is due at midnight.
            p.set_budget_file(Some(limited_catalog(2_000_000, "day_micros = 3_000\n")));
            p.tick(tick_at.parse::<Timestamp>().unwrap() - jiff::SignedDuration::from_secs(run * 3_600)).unwrap();
            p.apply(&priced_delivery(0, "e0", "2026-11-02T09:00:00Z", 1_000)).unwrap();
            p.tick(tick_at.parse().unwrap()).unwrap();
            p.apply(&priced_delivery(1, "e1", "2026-11-02T09:05:00Z", 1_000)).unwrap();
            // December's first call closes November (a day's grace) before it, whenever read.
            p.apply(&priced_delivery(2, "e2", "2026-12-02T00:00:00Z", 1_000)).unwrap();
            p.tick(tick_at.parse().unwrap()).unwrap();
            p.apply(&priced_delivery(3, "late", "2026-11-30T12:00:00Z", 1_000)).unwrap();
            p.commit().unwrap();
            let log = p.ledger().tenant("acme");
            runs.push((0..p.committed_size("acme")).map(|seq| log.entry(seq).unwrap()).collect::<Vec<_>>());
        }
        assert_eq!(runs[0], runs[1], "the same bytes whatever the ticks");
        let text: Vec<String> = runs[0].iter().map(|e| String::from_utf8(e.clone()).unwrap()).collect();
        let types: Vec<&str> = text.iter().map(|t| t.split(r#""type":""#).nth(1).and_then(|r| r.split('"').next()).unwrap_or("")).collect();
        assert_eq!(
            types,
            ["config", "event", "event", "budget", "budget", "statement", "event", "event"],
            "config, two calls, the day exceeded and restored, November's statement, December's call and a late one: {text:#?}"
        );
        assert!(text[0].starts_with(r#"{"type":"config","seq":0,"at":"2026-11-02T09:00:01Z""#), "the message's timestamp: {}", text[0]);
        assert!(text[4].contains(r#""at":"2026-11-03T00:00:00Z","status":"restored""#), "{}", text[4]);
        assert!(text[5].starts_with(r#"{"type":"statement","seq":5,"at":"2026-12-02T00:00:00Z","period":"2026-11-01""#), "{}", text[5]);
        assert!(text[7].contains(r#""period":"2026-12-01","corrects":"2026-11-01"}"#), "{}", text[7]);
        assert!(text[1].contains(r#""charge":{"micros":2000,"currency":"USD","basis":"table","catalog_seq":0,"period":"2026-11-01"}"#), "{}", text[1]);

        let dir = tempfile::tempdir().unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![LedgerKey::generate("tally.example.com").unwrap()]).unwrap();
        p.set_budget_file(Some(catalog(2_000_000)));
        p.apply(&priced_delivery(0, "e0", "2026-11-02T09:00:00Z", 1_000)).unwrap();
        p.set_budget_file(Some(catalog(3_000_000)));
        assert_eq!(p.tick("2026-11-02T09:01:00Z".parse().unwrap()).unwrap(), 1, "the reload's config, at the tick");
        p.apply(&priced_delivery(1, "e1", "2026-11-02T09:05:00Z", 1_000)).unwrap();
        p.commit().unwrap();
        let log = p.ledger().tenant("acme");
        let text: Vec<String> = (0..3).map(|seq| String::from_utf8(log.entry(seq).unwrap()).unwrap()).collect();
        assert!(text[2].starts_with(r#"{"type":"config","seq":2,"at":"2026-11-02T09:01:00Z""#), "{}", text[2]);
        let e1 = String::from_utf8(log.entry(3).unwrap()).unwrap();
        assert!(e1.contains(r#""charge":{"micros":3000,"currency":"USD","basis":"table","catalog_seq":2,"#), "{e1}");
    }

    /// Where a window's `restored` and a period's `statement` land does not depend on when
    /// ticks run: a tick after every record, or none until the tenant's own next record, write
    /// the same bytes. New York leaves daylight saving on 1 November 2026, so October closes
    /// (04:00Z on the 2nd, with a day's grace) an hour before 1 November's day ends (05:00Z):
    /// settled at once, they must still come in the order they fell due.
    #[test]
    fn ticks_anywhere_write_the_same_restorations_and_statements() {
        let budgets = limited_catalog(2_000_000, "day_micros = 3_000\ntime_zone = \"America/New_York\"\n");
        let globex = |offset: i64, id: &str, at: &str| {
            published(json_delivery(offset, "globex", format!(r#"{{"event_id":"{id}","tenant_id":"globex","occurred_at":"{at}","kind":"llm_call"}}"#)), at)
        };
        let deliveries = [
            priced_delivery(0, "e0", "2026-10-31T12:00:00Z", 1_000),
            priced_delivery(1, "e1", "2026-11-01T12:00:00Z", 1_000),
            priced_delivery(2, "e2", "2026-11-01T13:00:00Z", 1_000),
            // Other tenants' records move the clock past October's close, then past the day's end.
            globex(3, "g0", "2026-11-02T04:30:00Z"),
            globex(4, "g1", "2026-11-02T05:30:00Z"),
            priced_delivery(5, "e3", "2026-11-02T06:00:00Z", 1_000),
        ];
        let mut runs = Vec::new();
        for tick_after_each in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![LedgerKey::generate("tally.example.com").unwrap()]).unwrap();
            p.set_budget_file(Some(Arc::clone(&budgets)));
            for d in &deliveries {
                p.apply(d).unwrap();
                if tick_after_each {
                    p.tick("2030-01-01T00:00:00Z".parse().unwrap()).unwrap();
                }
            }
            p.commit().unwrap();
            let log = p.ledger().tenant("acme");
            runs.push((0..p.committed_size("acme")).map(|seq| String::from_utf8(log.entry(seq).unwrap()).unwrap()).collect::<Vec<_>>());
        }
        assert_eq!(runs[0], runs[1]);
        let types: Vec<&str> = runs[0].iter().map(|t| t.split(r#""type":""#).nth(1).and_then(|r| r.split('"').next()).unwrap_or("")).collect();
        assert_eq!(types, ["config", "event", "event", "event", "budget", "statement", "budget", "event"], "{:#?}", runs[0]);
        assert!(runs[0][5].contains(r#""period":"2026-10-01""#) && runs[0][6].contains(r#""status":"restored""#), "{:#?}", runs[0]);
    }

    /// A period closes once the input clock (the records' own times, bounded by their
    /// messages') passes its end plus the grace, never on the wall clock: by the tick after
    /// another tenant's record moved the clock, or before the tenant's own next record. The
    /// statement survives a reopen, which rebuilds the clock; a later event of that period is
    /// billed in the open one as a correction.
    #[test]
    fn a_period_closes_on_the_input_clock_and_a_late_event_corrects_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        p.set_budget_file(Some(catalog(2_000_000)));
        p.set_statement_grace(Some(jiff::SignedDuration::from_hours(2)));
        p.apply(&priced_delivery(0, "e0", "2026-11-30T23:00:00Z", 1_000)).unwrap();
        assert_eq!(p.tick("2027-06-01T00:00:00Z".parse().unwrap()).unwrap(), 0, "the wall clock closes nothing");
        p.apply(&priced_delivery(1, "e1", "2026-12-01T01:59:58Z", 1_000)).unwrap();
        assert_eq!(p.budget("acme").unwrap().statements().count(), 0, "within the grace");
        // Another tenant's call at the close moves the clock; the next tick closes acme's
        // November (its next record would have, first).
        let globex = r#"{"event_id":"g0","tenant_id":"globex","occurred_at":"2026-12-01T02:00:00Z","kind":"llm_call"}"#;
        p.apply(&published(json_delivery(2, "globex", globex.into()), "2026-12-01T01:59:59Z")).unwrap();
        assert_eq!(p.budget("acme").unwrap().statements().count(), 0);
        assert_eq!(p.tick("2026-11-01T00:00:00Z".parse().unwrap()).unwrap(), 1, "on the input clock, whatever the wall clock says");
        let listed: Vec<(jiff::civil::Date, u64)> = p.budget("acme").unwrap().statements().collect();
        assert_eq!(listed, [(jiff::civil::date(2026, 11, 1), 3)]);
        p.apply(&published(priced_delivery(3, "late", "2026-11-15T00:00:00Z", 1_000), "2026-12-01T02:00:00Z")).unwrap();
        // A call that says it occurred later than it was published (the service dead-letters it
        // as occurred_after_publish; the partition bounds it too) moves the clock only to its
        // message's time: December stays open.
        p.apply(&published(priced_delivery(4, "ahead", "2027-05-01T00:00:00Z", 1_000), "2026-12-01T03:00:00Z")).unwrap();
        assert_eq!(p.budget("acme").unwrap().statements().count(), 1);
        p.commit().unwrap();
        let log = p.ledger().tenant("acme");
        let e1 = String::from_utf8(log.entry(2).unwrap()).unwrap();
        assert!(e1.contains(r#""period":"2026-12-01"}"#), "charged in its own period: {e1}");
        let late = String::from_utf8(log.entry(4).unwrap()).unwrap();
        assert!(late.contains(r#""period":"2026-12-01","corrects":"2026-11-01"}"#), "{late}");
        drop(p);
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.budget("acme").unwrap().statements().collect::<Vec<_>>(), listed, "folded back at open");
        // The reopened clock is where it was: December (anchored on the 1st) closes at 02:00 on
        // 1 January, and a record before that closes nothing.
        p.set_budget_file(Some(catalog(2_000_000)));
        p.set_statement_grace(Some(jiff::SignedDuration::from_hours(2)));
        p.apply(&priced_delivery(5, "e3", "2026-12-31T23:00:00Z", 1_000)).unwrap();
        assert_eq!(p.budget("acme").unwrap().statements().count(), 1);
        p.apply(&priced_delivery(6, "e4", "2027-01-01T02:00:00Z", 1_000)).unwrap();
        assert_eq!(p.budget("acme").unwrap().statements().count(), 2, "the next close, on the clock");
    }

    /// Rate quotas at their window edges: the limit holds up to the last millisecond of a
    /// window, the next window starts empty, throttles and denials use nothing, a request larger
    /// than a whole window is denied for good, and a reopen counts the same from the log.
    #[test]
    fn rate_quotas_hold_to_the_window_edge_and_replay_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let budgets: Arc<BudgetFile> =
            Arc::new(toml::from_str("[tenants.acme.quotas]\n\"action:send_email\" = \"3/m\"\ntokens = \"100/m\"\n\"kind:tool_call\" = \"1000/d\"\n").unwrap());
        let open = || {
            let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
            p.set_budget_file(Some(Arc::clone(&budgets)));
            p
        };
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let email = AuthorizeRequest {
            action: Some("send_email".into()),
            kind: Some("tool_call".into()),
            estimated_tokens: Some(0),
            estimate_micros: 0,
            ttl_ms: 1_000,
            ..AuthorizeRequest::default()
        };
        let llm = |tokens: u64| AuthorizeRequest {
            action: Some("gpt".into()),
            estimated_tokens: Some(tokens),
            estimate_micros: 0,
            ttl_ms: 1_000,
            ..AuthorizeRequest::default()
        };
        let anon = Caller::default();
        let mut p = open();
        for t in ["2026-11-02T10:00:00Z", "2026-11-02T10:00:59.500Z", "2026-11-02T10:00:59.999Z"] {
            assert!(p.authorize("acme", at(t), &email, &anon).unwrap().verdict.allowed, "{t}");
        }
        let fourth = p.authorize("acme", at("2026-11-02T10:00:59.999Z"), &email, &anon).unwrap();
        assert_eq!((fourth.verdict.allowed, fourth.verdict.denied_by), (false, None));
        assert_eq!(fourth.verdict.throttled, Some(("action:send_email".to_string(), 1)), "1 ms to the window's end");
        assert_eq!((fourth.admission.throttled_by.as_deref(), fourth.admission.retry_after_ms), (Some("action:send_email"), Some(1)));
        assert!(p.authorize("acme", at("2026-11-02T10:00:59.999Z"), &llm(10), &anon).unwrap().verdict.allowed, "another action is not limited by it");
        // Tokens: 10 used; 80 fit, then 11 do not; a throttled request uses nothing.
        assert!(p.authorize("acme", at("2026-11-02T10:00:30Z"), &llm(80), &anon).unwrap().verdict.allowed);
        assert!(p.authorize("acme", at("2026-11-02T10:00:31Z"), &llm(11), &anon).unwrap().verdict.throttled.is_some());
        assert!(p.authorize("acme", at("2026-11-02T10:00:32Z"), &llm(10), &anon).unwrap().verdict.allowed, "10 still fit: the throttled 11 used nothing");
        // With a tokens quota, a request must say how many tokens it will use.
        let unnamed = AuthorizeRequest { estimated_tokens: None, ..llm(0) };
        assert!(matches!(p.authorize("acme", at("2026-11-02T10:00:32Z"), &unnamed, &anon), Err(Error::MissingEstimatedTokens)));
        let huge = p.authorize("acme", at("2026-11-02T10:00:33Z"), &llm(101), &anon).unwrap();
        assert_eq!(
            (huge.verdict.denied_by, huge.verdict.throttled.is_none()),
            (Some(DeniedBy::Quota), true),
            "more than a whole window: denied, not throttled"
        );
        p.commit().unwrap();
        drop(p);

        // The new window starts empty, after a reopen that rebuilt the counts from the log.
        let mut p = open();
        let still = p.authorize("acme", at("2026-11-02T10:00:59.999Z"), &email, &anon).unwrap();
        assert!(still.verdict.throttled.is_some(), "the reopened state counts the same 3 calls");
        for t in ["2026-11-02T10:01:00Z", "2026-11-02T10:01:00.001Z", "2026-11-02T10:01:30Z"] {
            assert!(p.authorize("acme", at(t), &email, &anon).unwrap().verdict.allowed, "{t}");
        }
        assert!(p.authorize("acme", at("2026-11-02T10:01:31Z"), &email, &anon).unwrap().verdict.throttled.is_some());
        // A clock stepped back into the previous minute neither wipes this minute's count nor
        // finds room in it.
        assert!(p.authorize("acme", at("2026-11-02T10:00:10Z"), &email, &anon).unwrap().verdict.throttled.is_some());
        assert!(p.authorize("acme", at("2026-11-02T10:01:32Z"), &email, &anon).unwrap().verdict.throttled.is_some());
        let levels = p.budget("acme").unwrap().quota_levels(at("2026-11-02T10:01:31Z"));
        let kind = levels.iter().find(|(k, ..)| k == "kind:tool_call").unwrap();
        assert_eq!((kind.1, kind.2), (6, 1000), "6 allowed tool calls today, throttled ones not counted");
        // A frozen tenant is denied by the freeze, whatever the request leaves out.
        p.freeze("acme", at("2026-11-02T10:01:40Z"), "stop", FreezeScope::default(), &anon).unwrap();
        let unnamed = AuthorizeRequest { estimated_tokens: None, ..llm(0) };
        let frozen = p.authorize("acme", at("2026-11-02T10:01:41Z"), &unnamed, &anon).unwrap();
        assert_eq!(frozen.verdict.denied_by, Some(DeniedBy::Freeze));
    }

    fn settling_delivery(offset: i64, tenant: &str, id: &str, reservation: &str) -> Delivery {
        json_delivery(
            offset,
            tenant,
            format!(
                r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","task_id":"run-1","reservation_id":"{reservation}","cost":{{"amount_micros":300,"currency":"USD"}}}}"#
            ),
        )
    }

    /// Reservation ids are per tenant: another tenant's event naming acme's reservation settles
    /// nothing of acme's. acme's own event settles it once, and its task's key is published again.
    #[test]
    fn settlement_stays_within_the_tenant_and_republishes_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        let ask = AuthorizeRequest { task_id: Some("run-1".into()), estimate_micros: 500, ttl_ms: 3_600_000, ..AuthorizeRequest::default() };
        let id = p.authorize("acme", Timestamp::now(), &ask, &Caller::default()).unwrap().admission.reservation_id.unwrap();
        p.take_budget_changes();
        p.apply(&settling_delivery(0, "globex", "g1", &id)).unwrap();
        assert!(p.budget("acme").unwrap().has_reservation(&id), "globex cannot settle acme's reservation");
        p.apply(&settling_delivery(1, "acme", "a1", &id)).unwrap();
        assert!(!p.budget("acme").unwrap().has_reservation(&id));
        let changed = p.take_budget_changes();
        assert!(changed.contains(&("acme".to_string(), Some("run-1".to_string()))), "{changed:?}");
        p.commit().unwrap();
        drop(p);
        let p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert!(!p.budget("acme").unwrap().has_reservation(&id), "settled once, and still after a reopen");
    }

    /// Authorize applies token and call limits after money's, and records which unit denied.
    #[test]
    fn a_call_limit_denies_with_its_unit_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        p.set_budget_file(Some(Arc::new(toml::from_str("[tenants.acme]\nday_calls = 1\nday_tokens = 500\n").unwrap())));
        let now = Timestamp::now();
        let ask = |tokens| AuthorizeRequest { estimated_tokens: Some(tokens), estimate_micros: 0, ttl_ms: 60_000, ..AuthorizeRequest::default() };
        let big = p.authorize("acme", now, &ask(501), &Caller::default()).unwrap();
        assert_eq!((big.verdict.denied_by, big.admission.denied_unit), (Some(DeniedBy::Day), Some(crate::budget::Unit::Tokens)));
        assert!(p.authorize("acme", now, &ask(500), &Caller::default()).unwrap().verdict.allowed);
        let second = p.authorize("acme", now, &ask(0), &Caller::default()).unwrap();
        assert_eq!((second.verdict.denied_by, second.admission.denied_unit), (Some(DeniedBy::Day), Some(crate::budget::Unit::Calls)));
        p.commit().unwrap();
        let record = String::from_utf8(p.ledger().tenant("acme").entry(second.seq).unwrap()).unwrap();
        assert!(record.contains(r#""denied_by":"day","denied_unit":"calls""#), "{record}");
    }

    /// Records and the next offset are durable together; the store (dedup keys, budget
    /// snapshots) lags until its next durable commit, and an open replays the journal past it.
    #[test]
    fn a_crash_before_the_store_is_durable_never_doubles_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        for o in 0..20 {
            p.apply(&delivery(o, ["acme", "globex"][(o % 2) as usize], &format!("e{o}"), 1)).unwrap();
            if o % 5 == 4 {
                p.commit().unwrap();
            }
        }
        p.apply(&delivery(20, "acme", "never-committed", 1)).unwrap();
        let durable_at = p.store.journal_position().unwrap();
        assert!(durable_at < p.ledger().journal_end(), "the store's durable position lags the journal");
        // A crash: no closing commit.
        drop(p);
        let p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        assert_eq!(p.resume_offset(), Some(20), "resumes right after the last durable record");
        assert!(p.store_durable_at.elapsed() >= STORE_DURABLE_EVERY, "after a replay, the next commit makes the store durable");
        assert_eq!((p.committed_size("acme"), p.committed_size("globex")), (10, 10));
        assert_eq!(p.store.journal_position().unwrap(), p.ledger().journal_end(), "the open's replay is recorded");
        // The open's catch-up is recorded without an fsync: a crash right after it loses and
        // doubles nothing, whether or not the catch-up reached the disk.
        drop(p);
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.resume_offset(), Some(20));
        assert_eq!((p.committed_size("acme"), p.committed_size("globex")), (10, 10));
        // Retries of events the store had not made durable are still recognised.
        assert_eq!(p.apply(&delivery(20, "acme", "e18", 1)).unwrap(), Applied::Deduplicated { tenant: "acme".into() });
        assert_eq!(p.apply(&delivery(21, "globex", "e19", 2)).unwrap(), Applied::Conflict { tenant: "globex".into(), seq: 10 });
        assert_eq!(p.apply(&delivery(22, "acme", "never-committed", 1)).unwrap(), Applied::Appended { tenant: "acme".into(), seq: 10 });
        p.commit().unwrap();
        assert_eq!((p.committed_size("acme"), p.committed_size("globex")), (11, 11));
    }

    #[test]
    fn offsets_below_the_recorded_progress_stop_the_partition() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        for o in 0..5 {
            p.apply(&delivery(o, "acme", &format!("e{o}"), 1)).unwrap();
        }
        p.commit().unwrap();
        // A recreated topic starts again at 0: that is not a message already recorded.
        let err = p.apply(&delivery(0, "acme", "new", 1)).unwrap_err();
        assert!(matches!(err, Error::OffsetRegression { offset: 0, next: 5, .. }), "{err}");
        assert!(err.to_string().contains("recreated"), "{err}");
        assert_eq!(p.resume_offset(), Some(5), "no progress past it");
        assert_eq!(p.committed_size("acme"), 5);
    }

    #[test]
    fn a_retry_long_after_a_restart_is_still_deduplicated_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        for o in 0..100 {
            p.apply(&delivery(o, "acme", &format!("e{o}"), 1)).unwrap();
        }
        p.commit().unwrap();
        assert_eq!(p.dedup_keys().unwrap(), 100);
        drop(p);
        let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
        assert_eq!(p.resume_offset(), Some(100));
        assert_eq!(p.apply(&delivery(100, "acme", "e7", 1)).unwrap(), Applied::Deduplicated { tenant: "acme".into() });
        assert_eq!(p.apply(&delivery(101, "acme", "e8", 2)).unwrap(), Applied::Conflict { tenant: "acme".into(), seq: 100 });
        assert_eq!(p.apply(&delivery(102, "acme", "e100", 1)).unwrap(), Applied::Appended { tenant: "acme".into(), seq: 101 });
        // Within one commit too: the pending keys count.
        assert_eq!(p.apply(&delivery(103, "acme", "e100", 1)).unwrap(), Applied::Deduplicated { tenant: "acme".into() });
        p.commit().unwrap();
        assert_eq!(p.dedup_keys().unwrap(), 101);
    }

    #[test]
    fn a_partition_open_elsewhere_is_busy_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let first = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
        let err = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).err().unwrap();
        assert!(matches!(err, Error::PartitionBusy(_)), "{err}");
        drop(first);
        PartitionLedger::open(dir.path(), "events", 3, vec![key]).unwrap();
    }

    /// Budget snapshots are taken only at the store's durable commits (every STORE_DURABLE_EVERY,
    /// and at a closing commit); an open after a crash refolds what the last one misses.
    #[test]
    fn budget_snapshots_lag_and_an_open_refolds_what_they_miss() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let budgets: Arc<BudgetFile> = Arc::new(
            toml::from_str(
                "[tenants.acme]\nday_micros = 50\nsoft_threshold = 0.5\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n",
            )
            .unwrap(),
        );
        let open = || {
            let mut p = PartitionLedger::open(dir.path(), "events", 3, vec![key.clone()]).unwrap();
            p.set_budget_file(Some(Arc::clone(&budgets)));
            p
        };
        let state = |p: &PartitionLedger| serde_json::to_string(p.budget("acme").unwrap()).unwrap();
        let snapshot = |p: &PartitionLedger| p.store.budgets().unwrap().into_iter().find(|(t, _, _)| t == "acme").map(|(_, covered, _)| covered);
        let mut p = open();
        for i in 0..5 {
            p.apply(&delivery(i, "acme", &format!("e{i}"), 10)).unwrap();
            p.commit().unwrap();
        }
        let size = p.committed_size("acme");
        assert!(size > 5, "warning and exceeded records too ({size})");
        assert_eq!(snapshot(&p), None, "within STORE_DURABLE_EVERY, no snapshot");
        let before = state(&p);
        // A crash: no closing commit. The open refolds every record.
        drop(p);
        let mut p = open();
        assert_eq!(state(&p), before);
        assert_eq!(snapshot(&p), None, "the open refolds, and leaves the snapshot to the first commit");
        p.apply(&delivery(5, "acme", "e5", 10)).unwrap();
        p.commit().unwrap();
        assert_eq!(snapshot(&p), Some(p.committed_size("acme")), "the first commit after a replay takes the snapshots the open owed");
        p.apply(&delivery(6, "acme", "e6", 10)).unwrap();
        p.commit_closing().unwrap();
        assert_eq!(snapshot(&p), Some(p.committed_size("acme")), "closing leaves nothing to refold");
        let after = state(&p);
        drop(p);
        assert_eq!(state(&open()), after);
    }
}
