//! One Kafka partition's share of the ledger: its own [`Ledger`] directory (every tenant keyed to
//! this partition) and its [`PartitionStore`] (dedup index, per-tenant coverage, next offset).
//!
//! Exactly once, without Kafka transactions:
//! * Deliveries are applied in offset order. A commit first makes the tenant logs durable (fsync,
//!   heads replaced, checkpoints signed), then the store (dedup keys, each tenant's last source
//!   offset, the next offset to read) in one transaction.
//! * On open, consumption resumes at the store's next offset. A crash between the two commits
//!   leaves the store behind the logs: open catches it up from the logs' tails, so each tenant's
//!   last recorded source offset is exact and re-read messages whose records are already durable
//!   are no-ops. Every accepted event is in its log exactly once, whatever instant the process
//!   died at.
//! * Dead-lettering is at least once: a rejected message in the re-read range is sent again.
//!
//! Deduplication: (tenant, idempotency key) → (content digest, seq), on disk, for the whole life
//! of the log; memory holds only the keys of the current commit and one small entry per tenant.
//! The same key with identical normalized content is a retry and is recorded once; with different
//! content it is appended as a `conflict` record (never replacing the first) and counted.
//!
//! Budgets: each tenant's [`BudgetState`] is the fold of its log, snapshotted in the store with
//! the same coverage as the dedup index. An event's `budget` decisions are appended right after
//! it; a tenant whose effective budget differs from its last `config` record gets a new one first.
//! Admissions, releases, expiries and window restorations are records too.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;

use sha2::{Digest, Sha256};
use tally_ingest::Delivery;
use tally_schemas::{Decoded, Event, IdempotencyKey};

use super::metrics::CommitTimes;
use super::store::{Batch, DedupKey, PartitionStore, Seen, TenantState};
use crate::budget::{Admission, BudgetDecision, BudgetFile, BudgetRecord, BudgetState, Release, ReleaseReason, Verdict};
use crate::error::{Error, Result};
use serde::de::IgnoredAny;
use tally_log::Ledger;
use tally_log::LedgerKey;
use tally_log::{conflict_record, event_record, EventInput, Record, Source};
use tally_projection::Projection;

/// What applying one delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Appended {
        tenant: String,
        seq: u64,
    },
    Deduplicated {
        tenant: String,
    },
    Conflict {
        tenant: String,
        seq: u64,
    },
    /// Its record is already in the tenant's log (a re-read after a crash).
    AlreadyRecorded,
    Rejected,
}

pub struct PartitionLedger {
    /// Exclusive lock on `<dir>/lock`, held while open: two instances never write one partition.
    _lock: std::fs::File,
    topic: String,
    partition: i32,
    ledger: Ledger,
    store: PartitionStore,
    /// Next offset to apply.
    next_offset: Option<i64>,
    /// Next offset as last committed to the store.
    durable_next: Option<i64>,
    /// Per tenant: coverage and last source offset, pending records included.
    tenants: HashMap<String, TenantState>,
    /// Tenants changed since the last commit.
    dirty: BTreeSet<String>,
    /// Dedup keys appended since the last commit.
    pending: HashMap<DedupKey, Seen>,
    /// Budget state per tenant (every tenant with a log here).
    budgets: HashMap<String, BudgetState>,
    /// The budgets file in force, if any.
    budget_file: Option<Arc<BudgetFile>>,
    /// Tenants whose budget state changed since `take_budget_changes`.
    budget_changed: BTreeSet<(String, Option<String>)>,
    /// Tenants whose budget state changed since its last snapshot.
    budget_stale: BTreeSet<String>,
    /// When each tenant's budget was last snapshotted since this partition was opened.
    budget_snapshot_at: HashMap<String, std::time::Instant>,
    /// Tenants to compare with a newly loaded budgets file at the next tick.
    config_pending: BTreeSet<String>,
    /// Effective budgets resolved from `budget_file`, per tenant.
    effective: HashMap<String, crate::budget::TenantBudget>,
    /// The Parquet projection of this partition's tenants (`<data_dir>/parquet`).
    projection: Projection,
    /// Tenants whose committed records may not all be projected yet.
    unprojected: BTreeSet<String>,
    /// The closing commit has run (see [`PartitionLedger::commit_closing`]).
    closed: bool,
}

/// What one projection pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Projected {
    pub records: u64,
    pub files: usize,
    pub errors: usize,
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

fn content_digest(event: &Event) -> Result<[u8; 16]> {
    let bytes = serde_json::to_vec(event).map_err(|e| Error::BadRecord(e.to_string()))?;
    Ok(Sha256::digest(bytes)[..16].try_into().unwrap_or_default())
}

impl PartitionLedger {
    /// Opens (or creates) the state of `topic`/`partition` under `root`. Costs one store read
    /// per tenant plus whatever of the logs' tails the store had not yet covered.
    pub fn open(root: &Path, topic: &str, partition: i32, keys: Vec<LedgerKey>) -> Result<PartitionLedger> {
        let started = std::time::Instant::now();
        let dir = root.join("partitions").join(format!("{topic}-{partition}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Lock before anything is read or repaired: the previous owner may still be closing it.
        let lock = lock_partition(&dir)?;
        let store = PartitionStore::open(&dir.join("state.redb"))?;
        let mut ledger = Ledger::open(&dir, keys)?;
        let next_offset = store.next_offset()?;
        let mut tenants = HashMap::new();
        let mut budgets = HashMap::new();
        let mut catch_up = Batch::default();
        for tenant in ledger.tenant_ids()? {
            let mut state = store.tenant(&tenant)?;
            let (covered, mut budget): (u64, BudgetState) = match store.budget(&tenant)? {
                Some((covered, json)) => (
                    covered,
                    serde_json::from_slice(&json)
                        .map_err(|e| Error::Corrupt { path: dir.display().to_string(), detail: format!("budget state of {tenant}: {e}") })?,
                ),
                None => (0, BudgetState::default()),
            };
            budget.restore_cache();
            let log = ledger.tenant(&tenant)?;
            if state.indexed > log.size() || covered > log.size() {
                return Err(Error::Corrupt {
                    path: dir.display().to_string(),
                    detail: format!("state covers {} records of {tenant} (budget: {covered}) but its log holds {}", state.indexed, log.size()),
                });
            }
            // One pass over the records either store misses: the budget snapshot lags by up to
            // BUDGET_SNAPSHOT_EVERY, the dedup index by a crash between the two commits.
            for seq in covered.min(state.indexed)..log.size() {
                let entry = log.entry(seq)?;
                if seq >= covered {
                    budget.fold(seq, &entry)?;
                }
                if seq < state.indexed {
                    continue;
                }
                let Record::Event(record) = Record::<IgnoredAny>::decode(seq, &entry).map_err(|e| Error::BadRecord(format!("{tenant}: {e}")))? else {
                    continue;
                };
                if let Source::Kafka { offset, .. } = record.source {
                    state.last_offset = Some(offset);
                }
                if !record.is_conflict() {
                    let key = IdempotencyKey { source: record.ce_source, id: record.event.event_id.clone() };
                    catch_up.seen.push((dedup_key(&tenant, &key), Seen { content: content_digest(&record.event)?, seq }));
                }
            }
            if state.indexed < log.size() {
                state.indexed = log.size();
                catch_up.tenants.push((tenant.clone(), state));
            }
            if covered < log.size() {
                catch_up.budgets.push((tenant.clone(), log.size(), serde_json::to_vec(&budget).map_err(|e| Error::BadRecord(e.to_string()))?));
            }
            tenants.insert(tenant.clone(), state);
            budgets.insert(tenant, budget);
        }
        let unprojected: BTreeSet<String> = tenants.keys().cloned().collect();
        let caught_up = catch_up.seen.len();
        if !catch_up.is_empty() {
            store.commit(&catch_up)?;
        }
        let open_ms = started.elapsed().as_millis() as u64;
        tracing::info!(topic, partition, ?next_offset, tenants = tenants.len(), caught_up, open_ms, "partition state opened");
        Ok(PartitionLedger {
            _lock: lock,
            topic: topic.to_string(),
            partition,
            ledger,
            store,
            next_offset,
            durable_next: next_offset,
            tenants,
            dirty: BTreeSet::new(),
            pending: HashMap::new(),
            budgets,
            budget_file: None,
            budget_changed: BTreeSet::new(),
            budget_stale: BTreeSet::new(),
            budget_snapshot_at: HashMap::new(),
            config_pending: BTreeSet::new(),
            effective: HashMap::new(),
            projection: Projection::new(&root.join("parquet"), std::time::Duration::from_secs(1)),
            unprojected,
            closed: false,
        })
    }

    /// How often each tenant's new records are written to Parquet (at most), and the zones
    /// daily roll-ups are kept for.
    pub fn set_projection(&mut self, every: std::time::Duration, zones: Vec<(String, jiff::tz::TimeZone)>) {
        self.projection = Projection::new(self.projection.root(), every).with_zones(zones);
    }

    /// Writes committed records to the Parquet projection: every tenant that is due, or all
    /// of them when `force`. A failure is logged and retried at the next pass; it never stops
    /// ingestion (the log is the truth, and the projection can be rebuilt from it).
    pub fn project(&mut self, force: bool) -> Projected {
        let mut out = Projected::default();
        let tenants: Vec<String> = self.unprojected.iter().cloned().collect();
        for tenant in tenants {
            let result = match self.ledger.tenant(&tenant) {
                Ok(log) => self.projection.flush(&tenant, log, force).and_then(|r| Ok((r, self.projection.behind(&tenant, log)?))).map_err(Error::from),
                Err(e) => Err(Error::from(e)),
            };
            match result {
                Ok((report, behind)) => {
                    if let Some(r) = report {
                        out.records += r.records;
                        out.files += r.files;
                    }
                    if behind == 0 {
                        self.unprojected.remove(&tenant);
                    }
                }
                Err(e) => {
                    out.errors += 1;
                    tracing::error!(tenant_id = %tenant, partition = self.partition, error = %e, "parquet projection failed; retrying at the next pass");
                }
            }
        }
        out
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
        Ok(self.ledger.tenant_ids()?)
    }

    /// The seq of the record first recorded under `key` for `tenant`, if any.
    pub fn seq_of(&mut self, tenant: &str, key: &IdempotencyKey) -> Result<Option<u64>> {
        let key = dedup_key(tenant, key);
        let seen = match self.pending.get(&key) {
            Some(seen) => Some(*seen),
            None => self.store.lookup(&key)?,
        };
        let size = self.ledger.tenant(tenant)?.size();
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
        let state = self.tenants.get(&tenant).copied().unwrap_or_default();
        if state.last_offset.is_some_and(|o| delivery.offset <= o) {
            return Ok(Applied::AlreadyRecorded);
        }
        let source = Source::Kafka { topic: self.topic.clone(), partition: self.partition, offset: delivery.offset, timestamp_ms: delivery.timestamp_ms };
        let input = EventInput { event: &decoded.event, ce_source: decoded.key.source.as_deref(), payload_sha256: &decoded.payload_sha256, source: &source };
        let key = dedup_key(&tenant, &decoded.key);
        let content = content_digest(&decoded.event)?;
        let seen = match self.pending.get(&key) {
            Some(seen) => Some(*seen),
            None => self.store.lookup(&key)?,
        };
        let size = self.next_seq(&tenant)?;
        // An entry naming a record the log does not hold (a lost tail) is no evidence of a retry.
        let applied = match seen.filter(|s| s.seq < size) {
            Some(seen) if seen.content == content => Applied::Deduplicated { tenant: tenant.clone() },
            Some(seen) => {
                self.ledger.tenant(&tenant)?.append(&conflict_record(size, input, seen.seq)?)?;
                Applied::Conflict { tenant: tenant.clone(), seq: size }
            }
            None => {
                // A `config` this event brings in takes its time from the input (the message's
                // timestamp, else the event's own), never the wall clock: replaying the topic
                // gives byte-identical logs.
                let at = delivery.timestamp_ms.and_then(|ms| Timestamp::from_millisecond(ms).ok()).unwrap_or(decoded.event.occurred_at);
                self.ensure_config(&tenant, at)?;
                let seq = self.next_seq(&tenant)?;
                self.ledger.tenant(&tenant)?.append(&event_record(seq, input)?)?;
                self.pending.insert(key, Seen { content, seq });
                self.after_event(&tenant, &decoded.event)?;
                Applied::Appended { tenant: tenant.clone(), seq }
            }
        };
        if matches!(applied, Applied::Appended { .. } | Applied::Conflict { .. }) {
            self.tenants.insert(tenant.clone(), TenantState { indexed: state.indexed, last_offset: Some(delivery.offset) });
            self.dirty.insert(tenant);
        }
        Ok(applied)
    }

    /// The seq the tenant's next record gets.
    fn next_seq(&mut self, tenant: &str) -> Result<u64> {
        let log = self.ledger.tenant(tenant)?;
        Ok(log.size() + log.pending())
    }

    /// Appends a budget-side record and folds it into the tenant's state.
    fn append_budget(&mut self, tenant: &str, make: impl FnOnce(u64) -> BudgetRecord) -> Result<u64> {
        let seq = self.next_seq(tenant)?;
        let record = make(seq);
        self.ledger.tenant(tenant)?.append(&record.to_bytes()?)?;
        self.budgets.entry(tenant.to_string()).or_default().apply_record(&record);
        let task = match &record {
            BudgetRecord::Admission { admission, .. } => admission.task_id.clone(),
            BudgetRecord::Budget { decision, .. } if decision.level == crate::budget::Level::Task => Some(decision.scope.clone()),
            _ => None,
        };
        self.budget_changed.insert((tenant.to_string(), None));
        if task.is_some() {
            self.budget_changed.insert((tenant.to_string(), task));
        }
        self.tenants.entry(tenant.to_string()).or_default();
        self.dirty.insert(tenant.to_string());
        Ok(seq)
    }

    /// Records the tenant's effective budget if it differs from the last `config` record.
    fn ensure_config(&mut self, tenant: &str, now: Timestamp) -> Result<()> {
        let Some(file) = &self.budget_file else { return Ok(()) };
        if !self.effective.contains_key(tenant) {
            let b = file.for_tenant(tenant)?;
            self.effective.insert(tenant.to_string(), b);
        }
        let Some(effective) = self.effective.get(tenant) else { return Ok(()) };
        let current = self.budgets.get(tenant).and_then(BudgetState::budget);
        if current != Some(effective) && (effective.has_limits() || current.is_some()) {
            let effective = effective.clone();
            self.append_budget(tenant, |seq| BudgetRecord::Config { seq, at: now, budget: effective })?;
        }
        Ok(())
    }

    /// Charges an appended event and appends the decisions it triggers.
    fn after_event(&mut self, tenant: &str, event: &Event) -> Result<()> {
        let state = self.budgets.entry(tenant.to_string()).or_default();
        let decisions = state.apply_event(event);
        if state.budget().is_some() || event.reservation_id.is_some() {
            self.budget_changed.insert((tenant.to_string(), None));
            if let Some(task) = event.task_id.clone().filter(|_| state.budget().is_some_and(|b| b.task_micros.is_some())) {
                self.budget_changed.insert((tenant.to_string(), Some(task)));
            }
        }
        for decision in decisions {
            self.append_budget(tenant, |seq| BudgetRecord::Budget { seq, decision })?;
        }
        Ok(())
    }

    /// Uses `file` for budgets from now on (a reload): tenants whose effective budget changed
    /// get a `config` record (and `restored` where a limit was lifted) at the next [`Self::tick`].
    pub fn set_budget_file(&mut self, file: Option<Arc<BudgetFile>>) {
        self.budget_file = file;
        self.effective.clear();
        self.config_pending = self.budgets.keys().cloned().collect();
    }

    /// Time-driven records for every tenant at `now`: new configs, expired reservations,
    /// restorations of ended windows. Returns how many records were appended.
    pub fn tick(&mut self, now: Timestamp) -> Result<usize> {
        let mut tenants = std::mem::take(&mut self.config_pending);
        tenants.extend(self.budgets.iter().filter(|(_, s)| s.next_wakeup().is_some_and(|w| w <= now)).map(|(t, _)| t.clone()));
        let mut appended = 0;
        for tenant in tenants {
            appended += self.settle_time(&tenant, now)?;
        }
        Ok(appended)
    }

    fn settle_time(&mut self, tenant: &str, now: Timestamp) -> Result<usize> {
        let before = self.next_seq(tenant)?;
        self.ensure_config(tenant, now)?;
        let state = self.budgets.entry(tenant.to_string()).or_default();
        let expired = state.expired(now);
        for id in expired {
            let expiry = Release { at: now, reservation_id: id, reason: ReleaseReason::Expired };
            self.append_budget(tenant, |seq| BudgetRecord::Release { seq, release: expiry })?;
        }
        let due: Vec<BudgetDecision> = self.budgets.get(tenant).map(|s| s.restorations_due(now)).unwrap_or_default();
        for decision in due {
            self.append_budget(tenant, |seq| BudgetRecord::Budget { seq, decision })?;
        }
        Ok((self.next_seq(tenant)? - before) as usize)
    }

    /// An admission decision for `tenant` at `now`, recorded in its log (not yet durable: the
    /// caller commits before answering), with the record's seq. Expired reservations are released
    /// first, so they never cause a denial.
    pub fn authorize(&mut self, tenant: &str, now: Timestamp, task_id: Option<&str>, estimate_micros: i64, ttl_ms: i64) -> Result<(Verdict, Admission, u64)> {
        self.settle_time(tenant, now)?;
        let state = self.budgets.entry(tenant.to_string()).or_default();
        let verdict = state.authorize(now, task_id, estimate_micros);
        let calendar = match state.calendar() {
            Some(c) => c,
            None => crate::budget::Calendar::new("UTC", 1)?,
        };
        let seq = self.next_seq(tenant)?;
        let admission = Admission {
            at: now,
            allowed: verdict.allowed,
            task_id: task_id.map(str::to_string),
            estimate_micros,
            reservation_id: verdict.allowed.then(|| format!("res-{seq}")),
            expires_at: verdict.allowed.then(|| now + jiff::SignedDuration::from_millis(ttl_ms)),
            denied_by: verdict.denied_by,
            day: calendar.day(now),
            period: calendar.period(now),
        };
        let recorded = admission.clone();
        let seq = self.append_budget(tenant, |seq| BudgetRecord::Admission { seq, admission: recorded })?;
        Ok((verdict, admission, seq))
    }

    /// Releases a reservation before its TTL: the seq of the `release` record, or `None` if the
    /// tenant holds no such reservation.
    pub fn release(&mut self, tenant: &str, reservation_id: &str, now: Timestamp) -> Result<Option<u64>> {
        if !self.budgets.get(tenant).is_some_and(|s| s.has_reservation(reservation_id)) {
            return Ok(None);
        }
        let release = Release { at: now, reservation_id: reservation_id.to_string(), reason: ReleaseReason::Released };
        self.append_budget(tenant, |seq| BudgetRecord::Release { seq, release }).map(Some)
    }

    /// The tenant's committed (durable) log size.
    pub fn committed_size(&mut self, tenant: &str) -> Result<u64> {
        Ok(self.ledger.tenant(tenant)?.size())
    }

    pub fn budget(&self, tenant: &str) -> Option<&BudgetState> {
        self.budgets.get(tenant)
    }

    /// (tenant, task) whose budget state changed since the last call (to publish).
    /// The budget-topic message of every tenant here that has a budget, and of each task holding
    /// a reservation: what a new owner publishes again.
    pub fn current_budget_messages(&self, now: jiff::Timestamp) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (tenant, state) in &self.budgets {
            if state.budget().is_none() && state.open_tasks().next().is_none() {
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

    /// Commits every tenant log (signing checkpoints), then the store.
    /// Returns the next offset now durable, if any was consumed.
    pub fn commit(&mut self) -> Result<Option<i64>> {
        self.commit_timed().map(|(next, _)| next)
    }

    /// [`PartitionLedger::commit`], also saying how long its durable phases took.
    pub fn commit_timed(&mut self) -> Result<(Option<i64>, CommitTimes)> {
        self.commit_with(false)
    }

    /// The last commit before the partition is closed (revoked, or the service stops): every
    /// budget snapshot is brought up to date, so the next owner refolds nothing. Afterwards the
    /// partition is closed: request handlers that still hold it answer `rebalancing`.
    pub fn commit_closing(&mut self) -> Result<(Option<i64>, CommitTimes)> {
        self.closed = true;
        self.commit_with(true)
    }

    /// Whether [`PartitionLedger::commit_closing`] has run: it takes no new work.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn commit_with(&mut self, final_snapshots: bool) -> Result<(Option<i64>, CommitTimes)> {
        let started = std::time::Instant::now();
        let checkpoints = self.ledger.commit()?;
        let mut times = CommitTimes { logs: started.elapsed(), state: None };
        for (tenant, cp) in &checkpoints {
            tracing::debug!(tenant_id = %tenant, partition = self.partition, size = cp.size, "checkpoint signed");
        }
        // Built from copies: if the store commit fails, nothing pending is forgotten and the
        // next commit tries again.
        let mut batch = Batch {
            seen: self.pending.iter().map(|(k, v)| (*k, *v)).collect(),
            tenants: Vec::with_capacity(self.dirty.len()),
            budgets: Vec::new(),
            next_offset: self.next_offset.filter(|_| self.next_offset != self.durable_next),
        };
        let dirty: Vec<String> = self.dirty.iter().cloned().collect();
        for tenant in &dirty {
            let size = self.ledger.tenant(tenant)?.size();
            let state = TenantState { indexed: size, ..self.tenants.get(tenant).copied().unwrap_or_default() };
            batch.tenants.push((tenant.clone(), state));
            self.budget_stale.insert(tenant.clone());
        }
        // Budget snapshots only every BUDGET_SNAPSHOT_EVERY per tenant (or all of them when the
        // partition closes): an open refolds the records a snapshot does not cover.
        let now = std::time::Instant::now();
        let due: Vec<String> = self
            .budget_stale
            .iter()
            .filter(|t| final_snapshots || self.budget_snapshot_at.get(*t).is_none_or(|at| now.duration_since(*at) >= BUDGET_SNAPSHOT_EVERY))
            .cloned()
            .collect();
        for tenant in &due {
            let size = self.ledger.tenant(tenant)?.size();
            if let Some(budget) = self.budgets.get(tenant) {
                batch.budgets.push((tenant.clone(), size, serde_json::to_vec(budget).map_err(|e| Error::BadRecord(e.to_string()))?));
            }
        }
        if !batch.is_empty() {
            let started = std::time::Instant::now();
            self.store.commit(&batch)?;
            times.state = Some(started.elapsed());
            self.durable_next = self.next_offset;
        }
        self.pending.clear();
        for (tenant, state) in batch.tenants {
            self.tenants.insert(tenant, state);
        }
        for tenant in due {
            self.budget_stale.remove(&tenant);
            self.budget_snapshot_at.insert(tenant, now);
        }
        self.dirty.retain(|t| !dirty.contains(t));
        self.unprojected.extend(dirty);
        Ok((self.next_offset, times))
    }
}

/// How stale a tenant's budget snapshot may get while it keeps changing. Snapshots are JSON of
/// the whole state: taking one at every commit made every durable authorize serialise it.
const BUDGET_SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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
    fn a_crash_between_the_log_and_store_commits_never_doubles_a_record() {
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
        // Crash after the logs are durable but before the store commit.
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
        assert_eq!(p.ledger().tenant("acme").unwrap().size(), 5);
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

    /// Budget snapshots are taken at most every BUDGET_SNAPSHOT_EVERY per tenant; an open after
    /// a crash refolds what the last one misses, and a closing commit leaves nothing to refold.
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
        let mut p = open();
        p.apply(&delivery(0, "acme", "e0", 10)).unwrap();
        p.commit().unwrap();
        let first = p.store.budget("acme").unwrap().unwrap().0;
        assert_eq!(first, p.committed_size("acme").unwrap(), "a tenant's first change is snapshotted at once");
        for i in 1..5 {
            p.apply(&delivery(i, "acme", &format!("e{i}"), 10)).unwrap();
            p.commit().unwrap();
        }
        let size = p.committed_size("acme").unwrap();
        assert!(size > first + 4, "warning and exceeded records too ({size})");
        assert_eq!(p.store.budget("acme").unwrap().unwrap().0, first, "within BUDGET_SNAPSHOT_EVERY, no new snapshot");
        let before = state(&p);
        // A crash: no closing commit. The open refolds records first..size.
        drop(p);
        let mut p = open();
        assert_eq!(state(&p), before);
        assert_eq!(p.store.budget("acme").unwrap().unwrap().0, size, "the open's catch-up snapshot covers the log");
        p.apply(&delivery(5, "acme", "e5", 10)).unwrap();
        p.commit_closing().unwrap();
        assert_eq!(p.store.budget("acme").unwrap().unwrap().0, p.committed_size("acme").unwrap(), "closing leaves nothing to refold");
    }
}
