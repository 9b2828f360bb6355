//! The ledger service: consumes the events topic and keeps every tenant's signed log up to date.
//! By default it reads its partitions directly (`assignment = "assign"`, no consumer group, so
//! a restart resumes at once); with `assignment = "group"` several instances share the
//! partitions as members of one consumer group.
//!
//! Each assigned partition is a [`PartitionLedger`] under `<data_dir>/partitions/<topic>-<p>/`.
//! Where it resumes comes from that directory, never from the group's committed offsets (those
//! are committed afterwards, for lag tools only). Deliveries are applied in order; rejected ones
//! are dead-lettered before the progress that covers them is committed. Every
//! `commit_interval_ms`, all partitions commit (fsync, new checkpoints, progress). A revoked
//! partition is committed and closed inside the rebalance, so its next owner (another instance
//! on the same volume) resumes exactly where this one stopped.
//!
//! The HTTP API ([`http`]) serves checkpoints, tiles, records, receipts and consistency proofs.

mod admissions;
mod data_dir;
mod http;
mod metrics;
mod partition;
mod projector;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tally_ingest::{DeadLetterQueue, Delivery, EventConsumer, KafkaConfig, PartitionSink, Resume};

pub use metrics::{CommitTimes, Metrics};
pub use partition::{Applied, AuthorizeRequest, Caller, Decided, Erased, Frozen, PartitionLedger, Released, WrittenCommit};

use crate::budget::BudgetFile;
use crate::error::{Error, Result};
use tally_auth::FileWatch;
use tally_auth::TokenStore;
use tally_log::LedgerKey;

/// `[ledger]` in the service's TOML configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where partition state lives (a shared volume when several instances run).
    pub data_dir: PathBuf,
    /// Private key files; several during a key rotation.
    pub keys: Vec<PathBuf>,
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Defaults to `<topic>.dlq`.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// How this instance gets its partitions (docs/configuration.md): `assign` (the default)
    /// reads every partition of `topic`, or `partitions`, itself, with no consumer group: one
    /// instance, nothing to wait for at start or after a restart. `group` joins `group` with the
    /// other instances that share `data_dir`.
    #[serde(default)]
    pub assignment: AssignmentMode,
    /// With `assignment = "assign"`: only these partitions (default: all of them).
    #[serde(default)]
    pub partitions: Option<Vec<i32>>,
    /// The consumer group, with `assignment = "group"`.
    #[serde(default = "default_group")]
    pub group: String,
    /// How often partitions commit and sign checkpoints.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// HTTP listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Token file (`tally token new`). Without one, authorization is off and `listen` must be
    /// a loopback address.
    #[serde(default)]
    pub tokens: Option<PathBuf>,
    /// Budgets file (plans, overrides, prices); re-read when it changes. None: no limits.
    #[serde(default)]
    pub budgets: Option<PathBuf>,
    /// Compacted topic the budget state of each tenant (and task) is published to.
    #[serde(default = "default_budget_topic")]
    pub budget_topic: String,
    /// The URL other instances give callers for tenants this instance owns
    /// (default `http://<listen>`).
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// An instance that has owned no partition for this long leaves the group and joins again
    /// (0: never). Some brokers (Tansu 0.6.0) can leave a member that rejoined after a session
    /// timeout without an assignment for good. Run no more instances than partitions.
    #[serde(default = "default_rejoin_after_ms")]
    pub rejoin_after_ms: u64,
    /// How often each tenant's new records are written to the Parquet projection under
    /// `<data_dir>/parquet` (new records are queryable within seconds: docs/parquet.md).
    #[serde(default = "default_projection_interval_ms")]
    pub projection_interval_ms: u64,
    /// IANA zones whose days get daily cost roll-ups (reports by day in other zones are summed
    /// from 15-minute buckets: exact, but slower). Add one, then run `tally parquet rebuild` so
    /// its roll-ups cover the whole log.
    #[serde(default = "default_report_time_zones")]
    pub report_time_zones: Vec<String>,
    /// How long after a tenant's billing period ends its `statement` closes it: events of the
    /// period that arrive later are billed in the open period as corrections (docs/billing.md).
    #[serde(default = "default_statement_grace_ms")]
    pub statement_grace_ms: u64,
    /// Whether billing periods are closed by `statement` records (default true). `false` for a
    /// ledger that only audits: no period ever closes, and no late event is a correction.
    #[serde(default = "default_statements")]
    pub statements: bool,
}

fn default_statements() -> bool {
    true
}

/// A day: gateways that buffer through an outage deliver late, and a closed period never changes.
fn default_statement_grace_ms() -> u64 {
    86_400_000
}

/// The longest grace: a period's bill must close within the next period.
const MAX_STATEMENT_GRACE_MS: u64 = 28 * 86_400_000;

/// How a ledger instance gets its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssignmentMode {
    /// Read the partitions directly (Kafka's `assign`), without a group coordinator.
    #[default]
    Assign,
    /// Join the consumer group `group`; the coordinator spreads partitions over instances.
    Group,
}

fn default_report_time_zones() -> Vec<String> {
    vec!["UTC".into()]
}

fn default_projection_interval_ms() -> u64 {
    1000
}

fn default_rejoin_after_ms() -> u64 {
    30_000
}

fn default_budget_topic() -> String {
    "tally.budget".into()
}

fn default_topic() -> String {
    "tally.events".into()
}
fn default_group() -> String {
    "tally-ledger".into()
}
/// A commit is one `fdatasync` per partition with something new, and none otherwise (the
/// journal): ten a second cost little and bound the wait for a signed checkpoint.
fn default_commit_interval_ms() -> u64 {
    100
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl ServiceConfig {
    /// Checks the settings, naming the bad key; loads the signing keys.
    pub fn load_keys(&self) -> Result<Vec<LedgerKey>> {
        if self.keys.is_empty() {
            return Err(Error::BadKey("ledger.keys is empty: at least one signing key file is required".into()));
        }
        if self.commit_interval_ms == 0 || self.commit_interval_ms > 60_000 {
            return Err(Error::BadKey(format!("ledger.commit_interval_ms = {} must be 1..=60000", self.commit_interval_ms)));
        }
        if self.statement_grace_ms > MAX_STATEMENT_GRACE_MS {
            return Err(Error::BadKey(format!("ledger.statement_grace_ms = {} must be at most {MAX_STATEMENT_GRACE_MS} (28 days)", self.statement_grace_ms)));
        }
        if self.projection_interval_ms > 60_000 {
            return Err(Error::BadKey(format!("ledger.projection_interval_ms = {} must be at most 60000", self.projection_interval_ms)));
        }
        tally_projection::report_zones(&self.report_time_zones).map_err(|e| Error::BadKey(format!("ledger.report_time_zones: {e}")))?;
        match (&self.partitions, self.assignment) {
            (Some(_), AssignmentMode::Group) => {
                return Err(Error::BadKey("ledger.partitions applies to assignment = \"assign\" only: in a group the coordinator assigns partitions".into()))
            }
            (Some(list), _) if list.is_empty() || list.iter().any(|p| *p < 0) => {
                return Err(Error::BadKey(format!("ledger.partitions = {list:?} must name at least one partition, each >= 0 (or be left out for all)")))
            }
            _ => {}
        }
        if self.tokens.is_none() && !self.listen.ip().is_loopback() {
            return Err(Error::BadKey(format!("ledger.tokens is required when ledger.listen ({}) is not a loopback address", self.listen)));
        }
        // The key error names the file; the prefix names the setting that pointed at it.
        self.keys.iter().map(|k| LedgerKey::read(k).map_err(|e| Error::BadKey(format!("ledger.keys: {e}")))).collect()
    }

    /// The budgets file `budgets` names, validated.
    pub fn load_budgets(&self) -> Result<Option<BudgetFile>> {
        Ok(self.budgets.as_deref().map(BudgetFile::load).transpose()?)
    }

    /// The token store `tokens` names, or authorization off.
    pub fn load_tokens(&self) -> Result<TokenStore> {
        match &self.tokens {
            Some(path) => Ok(TokenStore::load(path)?),
            None => Ok(TokenStore::disabled()),
        }
    }
}

/// One owned partition: its state behind its own lock, and the gate that keeps its commits one
/// at a time. The gate is held across a commit's `fdatasync`; the state's lock is not, so reads
/// and admissions of the partition go on while a commit syncs. Lock order: gate, then state.
/// Its Parquet projection has a lock of its own too (see `projector`), taken before the state's.
pub(crate) struct OwnedPartition {
    ledger: Mutex<PartitionLedger>,
    commits: Mutex<()>,
    projection: Mutex<tally_projection::Projection>,
    /// Durable requests (authorize, release, freeze), decided and committed in batches.
    admissions: admissions::AdmissionQueue,
}

impl OwnedPartition {
    /// Partition `partition`, with the thread that drains its admission queue.
    pub(crate) fn new(partition: i32, ledger: PartitionLedger, projection: tally_projection::Projection) -> Result<Owned> {
        let (admissions, queued) = admissions::AdmissionQueue::new();
        let owned = Arc::new(OwnedPartition { ledger: Mutex::new(ledger), commits: Mutex::new(()), projection: Mutex::new(projection), admissions });
        queued
            .spawn(Arc::downgrade(&owned), partition)
            .map_err(|e| Error::Service(format!("cannot start the admission thread of partition {partition}: {e}")))?;
        Ok(owned)
    }
}

/// One owned partition, shared by the consume loop, the rebalance callbacks and the handlers.
pub(crate) type Owned = Arc<OwnedPartition>;

/// The partition behind `owned`, waiting for whoever holds it now.
fn lock(owned: &Owned) -> MutexGuard<'_, PartitionLedger> {
    owned.ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Commits `owned`, its `fdatasync` outside the partition's lock: written under the lock, synced
/// without it, finished under it again. Commits of one partition are one at a time (the gate);
/// once the gate is ours, `covered` says whether the commits before already did the work (an
/// admission whose record another caller's commit made durable), and then nothing is done.
/// With `closing`, the partition takes no new work afterwards.
pub(crate) fn commit_owned(owned: &Owned, closing: bool, covered: impl FnOnce(&PartitionLedger) -> bool) -> Result<Option<(Option<i64>, CommitTimes)>> {
    let _one_at_a_time = owned.commits.lock().unwrap_or_else(PoisonError::into_inner);
    let written = {
        let mut p = lock(owned);
        if covered(&p) {
            return Ok(None);
        }
        p.write_commit(closing)?
    };
    let synced = written.sync();
    lock(owned).finish_commit(written, synced).map(Some)
}

/// State shared by the consume loop, the rebalance callbacks and the HTTP handlers.
pub struct Shared {
    root: PathBuf,
    keys: Vec<LedgerKey>,
    /// The partitions this instance owns, each behind its own lock: a commit (fsyncs, Parquet)
    /// of one partition never holds up reads or admissions of another. The map's own lock is
    /// held only to look up, add or remove an entry.
    partitions: RwLock<BTreeMap<i32, Owned>>,
    /// A failure inside a rebalance callback, reported by the consume loop.
    fatal: Mutex<Option<String>>,
    tokens: TokenStore,
    budgets: BudgetSource,
    /// Partitions of the events topic (to find a tenant's partition).
    partition_count: std::sync::atomic::AtomicI32,
    topic: String,
    /// How partitions are obtained (for the advice an error gives).
    assignment: AssignmentMode,
    advertise_url: String,
    projection_interval: Duration,
    report_zones: Vec<(String, jiff::tz::TimeZone)>,
    /// `statement_grace_ms` for every partition opened here; `None` with `statements = false`.
    statement_grace: Option<jiff::SignedDuration>,
    /// Budget states waiting for the budget topic.
    budget_outbox: BudgetOutbox,
    /// Asks the consume loop to take budget changes, commit and publish at once (a freeze must
    /// reach the budget topic without waiting for the next batch). The loop is the topic's one
    /// writer of budget states, so they reach it in the order they were built.
    publish_soon: tokio::sync::Notify,
    /// Why dead-lettering is failing right now (the loop waits on it), if it is.
    dlq_stalled: Mutex<Option<String>>,
    /// Whether the broker answers.
    broker: BrokerHealth,
    /// Partitions stopped by a failure of their storage, until they open again.
    halted: Mutex<BTreeMap<i32, Halted>>,
    /// Since when, and why, projection passes fail (a full disk), while they do.
    projection_failing: Mutex<Option<(Instant, String)>>,
    pub metrics: Metrics,
}

/// How often a partition stopped by a storage failure is opened again.
const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// A partition stopped because a write, sync or read of its files failed (a full disk, an I/O
/// error): it is neither served (its tenants get 503 `storage_unavailable`) nor consumed (the
/// consumer is paused on it), and the consume loop opens it again every [`REOPEN_EVERY`]. The
/// open rebuilds its state from what is durable, so nothing half-written is ever used, and the
/// consumer is moved back to the partition's durable next offset (docs/storage.md, "When the
/// disk fills up").
pub(super) struct Halted {
    since: Instant,
    /// The failure that stopped it, or the last failed open.
    error: String,
    next_try: Instant,
    /// Whether the consumer was paused on it.
    paused: bool,
}

/// Most budget states waiting for the budget topic at once (one per tenant and task key); past
/// it, a state for a new key is dropped and counted (the key's next change publishes it).
const MAX_WAITING_BUDGET_STATES: usize = 100_000;

/// Budget states on their way to the budget topic, newest per key. Publishing runs on its own
/// task, so a budget topic that is slow or gone never holds up ingestion; a failed state is put
/// back (unless a newer one came meanwhile) and retried, and readiness reports the failure.
#[derive(Default)]
pub(super) struct BudgetOutbox {
    waiting: Mutex<BTreeMap<String, Vec<u8>>>,
    wake: tokio::sync::Notify,
    /// The last publication error, until a publication succeeds.
    failing: Mutex<Option<String>>,
}

impl BudgetOutbox {
    /// Queues states, newest per key; returns how many were dropped for want of room.
    fn put(&self, states: impl IntoIterator<Item = (String, Vec<u8>)>, keep_older: bool) -> u64 {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let mut dropped = 0;
        for (key, value) in states {
            if waiting.len() >= MAX_WAITING_BUDGET_STATES && !waiting.contains_key(&key) {
                dropped += 1;
                continue;
            }
            if keep_older {
                waiting.entry(key).or_insert(value);
            } else {
                waiting.insert(key, value);
            }
        }
        drop(waiting);
        self.wake.notify_one();
        dropped
    }

    fn take(&self) -> BTreeMap<String, Vec<u8>> {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Why publishing fails, and how many states wait, while it fails.
    pub(super) fn failing(&self) -> Option<(String, usize)> {
        let failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        Some((failing, self.waiting.lock().unwrap_or_else(PoisonError::into_inner).len()))
    }
}

/// Publishes what the outbox holds until `closing` is set and the outbox is empty (or the last
/// pass failed).
async fn publish_budget_states(shared: Arc<Shared>, publisher: tally_ingest::EventPublisher, closing: Arc<std::sync::atomic::AtomicBool>) {
    let outbox = &shared.budget_outbox;
    let mut backoff = Duration::from_millis(100);
    loop {
        let states = outbox.take();
        if states.is_empty() {
            if closing.load(Ordering::Acquire) {
                return;
            }
            outbox.wake.notified().await;
            continue;
        }
        let mut deliveries = Vec::with_capacity(states.len());
        for (key, value) in states {
            let enqueued = publisher.enqueue(Some(key.as_bytes()), &value, &[]).await;
            deliveries.push((key, value, enqueued));
        }
        let mut failed = Vec::new();
        let mut error = None;
        for (key, value, enqueued) in deliveries {
            let result = match enqueued {
                Ok(delivery) => delivery.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => {
                    shared.metrics.budget_published.inc();
                }
                Err(e) => {
                    error = Some(e.to_string());
                    failed.push((key, value));
                }
            }
        }
        match error {
            None => {
                *outbox.failing.lock().unwrap_or_else(PoisonError::into_inner) = None;
                backoff = Duration::from_millis(100);
            }
            Some(e) => {
                tracing::error!(topic = publisher.topic(), states = failed.len(), error = %e, "budget states not published; retrying");
                shared.metrics.budget_publish_failures.inc_by(failed.len() as u64);
                *outbox.failing.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                let dropped = outbox.put(failed, true);
                shared.metrics.budget_states_dropped.inc_by(dropped);
                if closing.load(Ordering::Acquire) {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Whether the broker answers, as the watcher ([`watch_broker`]) last saw it: shown by
/// `/readyz` and the metrics. While it does not, no event is consumed and budget states wait in
/// their outbox; reads, receipts and admissions go on, since a decision is durable in the local
/// journal, not on the broker (docs/events.md, "When the broker is away").
#[derive(Default)]
pub(super) struct BrokerHealth {
    /// Since when, and the last error, while the broker does not answer.
    down: Mutex<Option<(Instant, String)>>,
}

impl BrokerHealth {
    /// How long the broker has not answered, and why, if it does not.
    pub(super) fn down(&self) -> Option<(Duration, String)> {
        self.down.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|(since, why)| (since.elapsed(), why.clone()))
    }

    /// Records an answer; returns how long the outage it ends lasted, if one did.
    fn answered(&self) -> Option<Duration> {
        self.down.lock().unwrap_or_else(PoisonError::into_inner).take().map(|(since, _)| since.elapsed())
    }

    /// Records a failed request; returns whether it starts an outage.
    fn unanswered(&self, why: String) -> bool {
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        let starts = down.is_none();
        let since = down.as_ref().map_or_else(Instant::now, |(since, _)| *since);
        *down = Some((since, why));
        starts
    }
}

/// Asks the broker for the events topic `every` so often, on one long-lived client: records in
/// `health` whether it answers (and counts outages in `metrics`), and reports to `fail` a
/// partition count that changed, since partitions added while the ledger runs would move tenants
/// to other partitions (`fail` stops the service, as a start would refuse). Runs beside the
/// consume loop, not in it: a metadata request can take seconds on a loaded or absent broker,
/// and the loop would stall for it.
async fn watch_broker(
    probe: tally_ingest::BrokerProbe,
    topic: String,
    partitions: i32,
    every: Duration,
    health: &BrokerHealth,
    metrics: &Metrics,
    fail: impl FnOnce(String),
) {
    metrics.broker_reachable.set(1);
    loop {
        tokio::time::sleep(every).await;
        match probe.partitions(&topic, BROKER_ANSWER_WITHIN).await {
            Ok(count) => {
                if let Some(lasted) = health.answered() {
                    metrics.broker_reachable.set(1);
                    tracing::warn!(topic = %topic, outage_s = lasted.as_secs_f64(), "the broker answers again");
                }
                match count {
                    Some(now) if now != partitions => {
                        fail(format!(
                            "topic {topic} grew from {partitions} to {now} partitions while this ledger ran: every tenant's home partition would change and its log would fork (see README, \"Growing the events topic\")"
                        ));
                        return;
                    }
                    Some(_) => {}
                    None => tracing::warn!(topic = %topic, "the events topic is missing from the broker's metadata"),
                }
            }
            Err(e) => {
                if health.unanswered(e.to_string()) {
                    metrics.broker_reachable.set(0);
                    metrics.broker_outages.inc();
                    tracing::error!(topic = %topic, error = %e, "the broker does not answer: no events are consumed until it does; reads and admissions go on");
                }
            }
        }
    }
}

/// The budgets file, re-read when it changes.
pub(super) struct BudgetSource {
    watch: Option<FileWatch>,
    current: Mutex<Option<Arc<BudgetFile>>>,
}

impl BudgetSource {
    pub(super) fn new(path: Option<PathBuf>, file: Option<BudgetFile>) -> Self {
        BudgetSource { watch: path.as_deref().map(FileWatch::new), current: Mutex::new(file.map(Arc::new)) }
    }

    fn current(&self) -> Option<Arc<BudgetFile>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The new file when it changed on disk and is valid; a broken file keeps the old one.
    fn reload(&self) -> Option<Arc<BudgetFile>> {
        let watch = self.watch.as_ref().filter(|w| w.changed())?;
        match BudgetFile::load(watch.path()) {
            Ok(file) => {
                tracing::info!(path = %watch.path().display(), "budgets file reloaded");
                let file = Arc::new(file);
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&file));
                Some(file)
            }
            Err(e) => {
                tracing::error!(path = %watch.path().display(), error = %e, "budgets file not reloaded; the previous budgets stay in force");
                None
            }
        }
    }
}

impl Shared {
    fn partitions(&self) -> RwLockReadGuard<'_, BTreeMap<i32, Owned>> {
        self.partitions.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn partitions_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<i32, Owned>> {
        self.partitions.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The owned partitions, without holding the map (each is locked only when used).
    fn owned(&self) -> BTreeMap<i32, Owned> {
        self.partitions().iter().map(|(p, o)| (*p, Arc::clone(o))).collect()
    }

    /// Partition `p`, if this instance owns it.
    fn partition(&self, p: i32) -> Option<Owned> {
        self.partitions().get(&p).map(Arc::clone)
    }

    fn halted(&self) -> MutexGuard<'_, BTreeMap<i32, Halted>> {
        self.halted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why partition `partition` is halted, if it is (see [`Halted`]).
    pub(super) fn halted_because(&self, partition: i32) -> Option<String> {
        self.halted().get(&partition).map(|h| h.error.clone())
    }

    /// Every halted partition: for how long, and why.
    pub(super) fn halted_partitions(&self) -> Vec<(i32, Duration, String)> {
        self.halted().iter().map(|(p, h)| (*p, h.since.elapsed(), h.error.clone())).collect()
    }

    /// Since when, and why, projection passes fail, while they do.
    pub(super) fn projection_failing(&self) -> Option<(Duration, String)> {
        self.projection_failing.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|(since, why)| (since.elapsed(), why.clone()))
    }

    /// Records the outcome of a projection pass over every partition: `Some(error)` while
    /// flushes fail (the first failure starts the clock), `None` once a pass has none.
    pub(super) fn projection_passed(&self, failure: Option<String>) {
        let mut failing = self.projection_failing.lock().unwrap_or_else(PoisonError::into_inner);
        match failure {
            Some(why) => {
                let since = failing.as_ref().map_or_else(Instant::now, |(since, _)| *since);
                *failing = Some((since, why));
            }
            None => {
                if let Some((since, _)) = failing.take() {
                    tracing::warn!(failed_s = since.elapsed().as_secs_f64(), "no projection flush fails any more");
                }
            }
        }
        self.metrics.projection_failing.set(i64::from(failing.is_some()));
    }

    /// Opens partition `partition` of `topic` as this instance's own: its state from disk, the
    /// budgets in force, its owner note, its projection and its admission thread. Returns it
    /// with where its consumption resumes. Blocks (it reads the disk).
    fn open_owned(&self, topic: &str, partition: i32) -> Result<(Owned, Resume)> {
        let mut p = PartitionLedger::open(&self.root, topic, partition, self.keys.clone())?;
        p.set_budget_file(self.budgets.current());
        p.set_statement_grace(self.statement_grace);
        let resume = p.resume_offset().map_or(Resume::Beginning, Resume::At);
        // The budget topic may lack the last states of this partition's tenants (lost in a
        // crash, or never sent by a previous owner): publish them again. The topic is compacted,
        // so a repeated state costs nothing.
        let dropped = self.budget_outbox.put(p.current_budget_messages(jiff::Timestamp::now()), true);
        self.metrics.budget_states_dropped.inc_by(dropped);
        if let Err(e) = write_owner(&self.root, topic, partition, &self.advertise_url) {
            tracing::warn!(partition, error = %e, "cannot record this instance as the partition's owner");
        }
        // The partition's tenants share the files of one projection unit, named as its directory.
        let unit = tally_projection::unit_of_ledger_dir(p.ledger().dir())?;
        let projection = tally_projection::Projection::new(&self.root.join("parquet"), &unit, self.projection_interval).with_zones(self.report_zones.clone());
        Ok((OwnedPartition::new(partition, p, projection)?, resume))
    }

    /// Stops partition `partition` after `error`, a failure of its storage (see [`Halted`]):
    /// out of the owned map, so no request or delivery reaches it, and marked failed, so a
    /// request already holding it answers `rebalancing` and nothing more is committed. `owned`
    /// is the instance that failed: if the map holds another one by now (a rebalance revoked
    /// the partition, or opened it again, meanwhile), only `owned` is stopped and nothing is
    /// halted. The `halted` lock is held across the map's, in that order (as in
    /// `partitions_revoked`), so a revocation never leaves a halted entry behind.
    fn halt(&self, partition: i32, owned: &Owned, error: &Error) {
        let why = {
            let mut p = lock(owned);
            p.stop_after_failure(error);
            // The first failure is the cause; a later one may only say the partition had stopped.
            p.failure().map_or_else(|| error.to_string(), str::to_string)
        };
        let mut halted = self.halted();
        {
            let mut parts = self.partitions_mut();
            if !parts.get(&partition).is_some_and(|current| Arc::ptr_eq(current, owned)) {
                return;
            }
            parts.remove(&partition);
        }
        if !halted.contains_key(&partition) {
            tracing::error!(
                partition,
                error = %why,
                "partition halted: its storage failed; none of its events are taken and its tenants are answered 503 storage_unavailable until it opens again (tried every 2 s)"
            );
            self.metrics.partition_halts.inc();
        }
        let now = Instant::now();
        halted.insert(partition, Halted { since: now, error: why, next_try: now + REOPEN_EVERY, paused: false });
        self.metrics.partitions_halted.set(halted.len() as i64);
    }

    /// Drops the budget states of halted partitions' tenants from `states` (states built since
    /// the last commit): their records were never made durable. Each partition publishes its
    /// tenants' durable states when it opens again.
    fn drop_states_of_halted(&self, states: &mut Vec<(String, Vec<u8>)>) {
        let halted = self.halted();
        if halted.is_empty() {
            return;
        }
        let count = self.partition_count.load(Ordering::Relaxed);
        states.retain(|(key, _)| {
            let tenant = key.split_once('/').map_or(key.as_str(), |(tenant, _)| tenant);
            !halted.contains_key(&tally_ingest::tenant_partition(tenant, count))
        });
    }

    /// Pauses the consumer on halted partitions it still fetches: their messages would only be
    /// dropped, and read again from the durable offset once the partition opens.
    fn pause_halted(&self, consumer: &EventConsumer) {
        let unpaused: Vec<i32> = self.halted().iter().filter(|(_, h)| !h.paused).map(|(p, _)| *p).collect();
        for partition in unpaused {
            // Not under the lock: readiness and requests read it.
            match consumer.pause(partition) {
                Ok(()) => {
                    if let Some(h) = self.halted().get_mut(&partition) {
                        h.paused = true;
                    }
                }
                Err(e) => tracing::warn!(partition, error = %e, "cannot pause the consumer on a halted partition; its messages are dropped until it opens"),
            }
        }
    }

    /// Opens again each halted partition whose try is due, then moves the consumer back to
    /// where the partition resumes: its durable next offset, so what was applied but never made
    /// durable is read again and nothing is skipped. Call between polls (see
    /// [`EventConsumer::rewind`]). Blocks (disk, and the seek).
    fn reopen_halted(&self, consumer: &EventConsumer) {
        let now = Instant::now();
        let due: Vec<i32> = self.halted().iter().filter(|(_, h)| h.next_try <= now).map(|(p, _)| *p).collect();
        for partition in due {
            let reopened = self.open_owned(&self.topic, partition).and_then(|(owned, resume)| {
                consumer
                    .rewind(partition, resume)
                    .map_err(|e| Error::Service(format!("cannot move the consumer back to where partition {partition} resumes ({resume:?}): {e}")))?;
                Ok(owned)
            });
            let mut halted = self.halted();
            match reopened {
                Ok(owned) => {
                    self.partitions_mut().insert(partition, owned);
                    if let Some(h) = halted.remove(&partition) {
                        tracing::warn!(
                            partition,
                            halted_s = h.since.elapsed().as_secs_f64(),
                            "halted partition opened again; consuming from its durable offset"
                        );
                    }
                }
                Err(e) => {
                    if let Some(h) = halted.get_mut(&partition) {
                        tracing::warn!(partition, error = %e, "halted partition does not open yet; trying again in 2 s");
                        h.error = e.to_string();
                        h.next_try = Instant::now() + REOPEN_EVERY;
                    }
                }
            }
            self.metrics.partitions_halted.set(halted.len() as i64);
        }
    }

    fn fail(&self, message: String) {
        tracing::error!(error = %message, "ledger service failure");
        self.fatal.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(message);
    }

    /// Commits every open partition; returns the durable next offset of each. A partition whose
    /// storage fails (now, or in an admission's commit before) is halted, and the others are
    /// committed all the same.
    fn commit_all(&self) -> Result<Vec<(i32, i64)>> {
        let mut out = Vec::new();
        // Everything appended before this point is signed once the loop below succeeds.
        let signing = Instant::now();
        for (p, owned) in self.owned() {
            match commit_owned(&owned, false, |_| false) {
                Ok(Some((next, times))) => {
                    self.metrics.observe_commit(times);
                    if let Some(next) = next {
                        out.push((p, next));
                    }
                }
                Ok(None) => {}
                Err(e) if e.is_storage() => self.halt(p, &owned, &e),
                Err(e) => return Err(e),
            }
        }
        self.metrics.signed(signing);
        self.metrics.commits.inc();
        Ok(out)
    }
}

struct Sink(Arc<Shared>);

/// What woke the consume loop.
enum Woke {
    /// Its poll finished.
    Batch(std::result::Result<tally_ingest::Result<Vec<Delivery>>, tokio::task::JoinError>),
    /// A budget state changed outside the loop (a freeze): commit and publish now.
    Publish,
    Stop,
}

/// How often expiries, window ends and budget-file changes are looked for.
const TICK_EVERY: Duration = Duration::from_millis(100);

/// How often the broker is asked for the events topic: how soon an outage shows in `/readyz`,
/// and a changed partition count stops the service.
const BROKER_CHECK_EVERY: Duration = Duration::from_secs(2);
/// A metadata request unanswered for this long counts as an outage.
const BROKER_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How often progress is committed to the group (for lag tools; never read back by the ledger).
const KAFKA_COMMIT_EVERY: Duration = Duration::from_secs(5);

/// How long an assigned partition waits for its previous owner to let go of it.
const PARTITION_LOCK_WAIT: Duration = Duration::from_secs(30);

impl PartitionSink for Sink {
    fn resume(&self, topic: &str, partition: i32) -> Resume {
        if let Some(p) = self.0.partition(partition) {
            return lock(&p).resume_offset().map_or(Resume::Beginning, Resume::At);
        }
        // Assigned (again): whatever stopped it before is the open's to find now.
        self.0.halted().remove(&partition);
        // Opened without holding the partition map, so HTTP reads go on meanwhile. The previous
        // owner (another instance) releases the partition when its revocation completes; a
        // rebalance can assign it here a moment before that.
        let deadline = Instant::now() + PARTITION_LOCK_WAIT;
        let opened = loop {
            match self.0.open_owned(topic, partition) {
                Err(Error::PartitionBusy(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                other => break other,
            }
        };
        match opened {
            Ok((owned, resume)) => {
                self.0.partitions_mut().insert(partition, owned);
                resume
            }
            // Any failure to open at assignment, a full disk included, stops the service naming
            // it: the same files that fail here fail a start (docs/storage.md, "Bad state at
            // start"), and nothing was taken from the partition yet.
            Err(e @ Error::PartitionBusy(_)) if self.0.assignment == AssignmentMode::Assign => {
                self.0.fail(format!(
                    "cannot open partition {partition}: {e}; with assignment = \"assign\" (the default) one instance reads every partition, so another process holds it: to run several instances on one data_dir, set assignment = \"group\" on all of them"
                ));
                Resume::Beginning
            }
            Err(e) => {
                self.0.fail(format!("cannot open partition {partition}: {e}"));
                Resume::Beginning
            }
        }
    }

    fn resume_beyond_end(&self, topic: &str, partition: i32, resume: i64, high: i64) {
        self.0.metrics.offset_regressions.inc();
        self.0.fail(format!(
            "partition {partition} of {topic} ends at offset {high}, but this ledger has already recorded every offset below {resume}: the topic was recreated or the broker lost data; stopping rather than skipping messages as already recorded (see README, \"When the events topic is recreated\")"
        ));
    }

    fn partitions_revoked(&self, _topic: &str, partitions: &[i32]) {
        // Both under the `halted` lock (then the map's, as `halt` takes them): a halt running
        // meanwhile either finishes first, and its entry is removed here, or finds the partition
        // gone from the map and halts nothing.
        let removed: Vec<(i32, Owned)> = {
            let mut halted = self.0.halted();
            for p in partitions {
                halted.remove(p);
            }
            self.0.metrics.partitions_halted.set(halted.len() as i64);
            let mut parts = self.0.partitions_mut();
            partitions.iter().filter_map(|p| parts.remove(p).map(|o| (*p, o))).collect()
        };
        // Work already running on a removed partition (an admission) finishes first: the lock
        // is taken after it, and the closing commit covers what it appended.
        for (p, owned) in removed {
            match commit_owned(&owned, true, |_| false) {
                Ok(Some((_, times))) => self.0.metrics.observe_commit(times),
                Ok(None) => {}
                // Its next owner reads again what this commit could not make durable.
                Err(e) if e.is_storage() => tracing::error!(partition = p, error = %e, "revoked partition not committed: its storage fails"),
                Err(e) => self.0.fail(format!("cannot commit revoked partition {p}: {e}")),
            }
            self.0.metrics.projected(projector::project_partition(&owned, p, true));
        }
    }
}

/// Regenerates the Parquet projection of every partition under `data_dir` (or only the one
/// holding tenant `only`: its tenants share their files) from the logs, calling
/// `progress(unit, done, total)` as it goes; `keys` sign the checkpoint each tenant's state
/// keeps. Each partition is locked while it is rebuilt, so this refuses to run beside a ledger
/// instance that owns one. Returns each unit rebuilt with the records it holds.
pub fn rebuild_projection(
    data_dir: &std::path::Path,
    keys: Vec<LedgerKey>,
    only: Option<&str>,
    zones: &[String],
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Vec<(String, u64)>> {
    let zones = tally_projection::report_zones(zones)?;
    let parts = data_dir.join("partitions");
    let mut dirs: Vec<PathBuf> = match only {
        // One tenant: only the partition that holds it is opened.
        Some(tenant) => tally_log::find_tenant_ledger(data_dir, tenant).into_iter().collect(),
        None => std::fs::read_dir(&parts)
            .map_err(|e| Error::io(&parts, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(tally_log::JOURNAL_DIR).is_dir() || p.join("t").is_dir())
            .collect(),
    };
    dirs.sort();
    let root = data_dir.join("parquet");
    // Trees of the layout before units (one directory per tenant) are left by an older
    // version: they are rewritten as units, so the old ones go.
    remove_tenant_layout(&root)?;
    let mut done = Vec::new();
    for dir in dirs {
        // Opened as its owner would (taking its lock): an erasure whose record is durable but
        // whose keys a stop left behind is completed first, so no row shows what it erased.
        let (topic, partition) = partition_of_dir(&dir)?;
        let owner = PartitionLedger::open(data_dir, &topic, partition, keys.clone())?;
        let unit = tally_projection::unit_of_ledger_dir(owner.ledger().dir())?;
        let records = tally_projection::rebuild_unit(&root, &unit, owner.ledger(), zones.clone(), |d, t| progress(&unit, d, t))?;
        done.push((unit, records));
    }
    Ok(done)
}

/// Deletes the per-tenant directories (`<tree>/tenant_id=<t>`) of the projection layout before
/// units, which no reader uses any more.
fn remove_tenant_layout(root: &std::path::Path) -> Result<()> {
    for tree in ["events", "rollups", "daily"] {
        let Ok(entries) = std::fs::read_dir(root.join(tree)) else { continue };
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(|n| n.starts_with("tenant_id=")) {
                std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
            }
        }
    }
    Ok(())
}

/// The topic and partition a partition directory (`<topic>-<partition>`) holds.
fn partition_of_dir(dir: &std::path::Path) -> Result<(String, i32)> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|name| name.rsplit_once('-'))
        .and_then(|(topic, n)| Some((topic.to_string(), n.parse::<i32>().ok()?)))
        .ok_or_else(|| Error::BadKey(format!("{} is not a partition directory (<topic>-<partition>)", dir.display())))
}

/// Erases personal data of `tenant` in a stopped ledger's `data_dir`, as `POST …/erase` does on
/// a running one (docs/privacy.md, "Erasure"): `subject`'s, or every subject's with `None`, and
/// with `before` (`YYYY-MM`) only the months before it; the
/// `erasure` records name the token `by`. Then rewrites the tenant's projection rows (returns
/// how many). Locks the
/// tenant's partition, so it refuses to run beside the instance that owns it.
pub fn erase_offline(
    data_dir: &std::path::Path,
    keys: Vec<LedgerKey>,
    tenant: &str,
    subject: Option<&str>,
    before: Option<&str>,
    by: &str,
    zones: &[String],
) -> Result<(Erased, u64)> {
    let dir =
        tally_log::find_tenant_ledger(data_dir, tenant).ok_or_else(|| Error::BadKey(format!("no log of tenant {tenant} under {}", data_dir.display())))?;
    let (topic, partition) = partition_of_dir(&dir)?;
    let mut p = PartitionLedger::open(data_dir, &topic, partition, keys)?;
    let erased = p.erase(tenant, subject, before, jiff::Timestamp::now(), &Caller { token: Some(by), idempotency_key: None })?;
    p.commit_closing()?;
    // The tenant's rows are rewritten in the files its partition's tenants share; the erasure
    // records themselves are projected by the next owner.
    let rewritten = if erased.records > 0 {
        let unit = tally_projection::unit_of_ledger_dir(p.ledger().dir())?;
        let zones = tally_projection::report_zones(zones)?;
        tally_projection::Projection::new(&data_dir.join("parquet"), &unit, std::time::Duration::ZERO).with_zones(zones).rewrite_tenant(tenant, p.ledger())?
    } else {
        0
    };
    Ok((erased, rewritten))
}

/// Converts every partition under a ledger service's `data_dir` (or a `tally log` directory
/// itself) from the pre-journal layout, recomputing every tenant's root (see
/// [`tally_log::migrate`]); each partition keeps its next offset, read from its store. Locks each
/// partition while it is converted, so it refuses to run beside a ledger instance.
pub fn migrate_data_dir(data_dir: &std::path::Path, mut progress: impl FnMut(&std::path::Path, &str, u64)) -> Result<Vec<(PathBuf, tally_log::Migrated)>> {
    let parts = data_dir.join("partitions");
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&parts) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("t").is_dir()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(&parts, e)),
    };
    if data_dir.join("t").is_dir() {
        dirs.push(data_dir.to_path_buf());
    }
    dirs.sort();
    let mut done = Vec::new();
    for dir in dirs {
        let _lock = partition::lock_partition(&dir)?;
        let state = dir.join("state.redb");
        let next_offset = if state.exists() { store::PartitionStore::open(&state)?.next_offset()? } else { None };
        let migrated = tally_log::migrate(&dir, next_offset, |tenant, size| progress(&dir, tenant, size))?;
        done.push((dir, migrated));
    }
    Ok(done)
}

/// Takes the exclusive lock of a ledger directory (`<dir>/lock`): the lock a ledger instance holds
/// on each partition it owns and `tally parquet rebuild` takes, for offline writers such as
/// `tally log import`. Held while the returned file is open; [`Error::PartitionBusy`] when
/// another process holds it.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    partition::lock_partition(dir)
}

/// `<data_dir>/owners/<topic>-<p>` names the instance that owns a partition, so the others can
/// point callers at it.
fn write_owner(root: &std::path::Path, topic: &str, partition: i32, url: &str) -> Result<()> {
    let dir = root.join("owners");
    tally_log::durable::create_dir_durably(&dir)?;
    Ok(tally_log::durable::replace_file(&dir.join(format!("{topic}-{partition}")), url.as_bytes())?)
}

fn read_owner(root: &std::path::Path, topic: &str, partition: i32) -> Option<String> {
    std::fs::read_to_string(root.join("owners").join(format!("{topic}-{partition}"))).ok()
}

/// Runs the service until `shutdown` completes; serves HTTP on `listener`.
pub async fn run(config: ServiceConfig, kafka: KafkaConfig, listener: tokio::net::TcpListener, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let keys = config.load_keys()?;
    let tokens = config.load_tokens()?;
    let budgets = BudgetSource::new(config.budgets.clone(), config.load_budgets()?);
    // Before the broker: a data directory that cannot be used fails the start at once, naming it.
    data_dir::prepare(&config.data_dir)?;
    let advertise_url = match &config.advertise_url {
        Some(url) => url.clone(),
        None => format!("http://{}", listener.local_addr().map_err(|e| Error::Service(format!("listener address: {e}")))?),
    };
    let kafka_err = |e: tally_ingest::Error| Error::Service(e.to_string());
    let dlq_topic = config.dlq_topic.clone().unwrap_or_else(|| DeadLetterQueue::topic_for(&config.topic));
    // Every topic the ledger reads or writes must exist before anything is consumed: a missing
    // DLQ or budget topic would otherwise surface only at its first send.
    let topics = tally_ingest::topic_partitions(&kafka, Duration::from_secs(30)).await.map_err(kafka_err)?;
    let missing: Vec<String> = [("ledger.topic", &config.topic), ("ledger.dlq_topic", &dlq_topic), ("ledger.budget_topic", &config.budget_topic)]
        .into_iter()
        .filter(|(_, t)| !topics.contains_key(t.as_str()))
        .map(|(key, t)| format!("{key} = {t:?}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Service(format!(
            "these topics do not exist on the broker: {}; create them (`tally topics --config <this file>`, or your Kafka tooling) and start again",
            missing.join(", ")
        )));
    }
    let partitions = pin_partition_count(&config.data_dir, &config.topic, topics[&config.topic])?;
    // Temporaries a crash left by a durable replace (owner notes; the pinned count). Another
    // instance on a shared data_dir may be writing an owner note right now: removing its
    // temporary fails that rename, and the note (an advisory hint for 421 answers) is missing
    // until its next write, which is logged.
    for dir in [config.data_dir.join("owners"), config.data_dir.join("partitions")] {
        tally_log::durable::remove_temporaries(&dir)?;
    }
    let shared = Arc::new(Shared {
        root: config.data_dir.clone(),
        keys,
        partitions: RwLock::new(BTreeMap::new()),
        fatal: Mutex::new(None),
        tokens,
        budgets,
        partition_count: std::sync::atomic::AtomicI32::new(partitions),
        topic: config.topic.clone(),
        assignment: config.assignment,
        advertise_url,
        projection_interval: Duration::from_millis(config.projection_interval_ms),
        report_zones: tally_projection::report_zones(&config.report_time_zones)?,
        statement_grace: config.statements.then(|| jiff::SignedDuration::from_millis(config.statement_grace_ms as i64)),
        budget_outbox: BudgetOutbox::default(),
        publish_soon: tokio::sync::Notify::new(),
        dlq_stalled: Mutex::new(None),
        broker: BrokerHealth::default(),
        halted: Mutex::new(BTreeMap::new()),
        projection_failing: Mutex::new(None),
        metrics: Metrics::default(),
    });
    let dlq = DeadLetterQueue::new(&kafka, &dlq_topic).map_err(kafka_err)?;
    let (stop_projector, stopped) = std::sync::mpsc::channel::<()>();
    let projecting = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("tally-projector".into())
            .spawn(move || projector::run(shared, stopped))
            .map_err(|e| Error::Service(format!("cannot start the projection thread: {e}")))?
    };
    let join = || {
        let sink = Arc::new(Sink(Arc::clone(&shared)));
        match config.assignment {
            AssignmentMode::Group => EventConsumer::new(&kafka, &config.group, &config.topic, sink, 5_000, Duration::from_millis(100)),
            // Opens every partition before it returns (on this thread: it reads the disk).
            AssignmentMode::Assign => {
                EventConsumer::assigned(&kafka, &config.group, &config.topic, config.partitions.as_deref(), sink, 5_000, Duration::from_millis(100))
            }
        }
    };
    let mut consumer = tokio::task::block_in_place(join).map_err(kafka_err)?;
    let rejoin_after = Duration::from_millis(config.rejoin_after_ms);
    let mut unassigned_since = Instant::now();
    let budget_publisher = tally_ingest::EventPublisher::new(&kafka, &config.budget_topic).map_err(kafka_err)?;
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = tokio::spawn(publish_budget_states(Arc::clone(&shared), budget_publisher, Arc::clone(&closing)));
    let counting = {
        let shared = Arc::clone(&shared);
        let probe = tally_ingest::BrokerProbe::new(&kafka).map_err(kafka_err)?;
        let topic = config.topic.clone();
        tokio::spawn(async move {
            let failing = Arc::clone(&shared);
            watch_broker(probe, topic, partitions, BROKER_CHECK_EVERY, &shared.broker, &shared.metrics, move |e| failing.fail(e)).await
        })
    };

    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, Arc::clone(&shared), async move {
        let _ = http_stopped.await;
    }));

    let interval = Duration::from_millis(config.commit_interval_ms);
    let mut last_commit = Instant::now();
    let mut last_kafka_commit = Instant::now();
    let mut last_tick = Instant::now();
    // Budget states whose records are appended but not yet durable: published only after the
    // next commit covers them, so the topic never shows a state a crash could take back.
    let mut unpublished: Vec<(String, Vec<u8>)> = Vec::new();
    let mut polling: Option<tokio::task::JoinHandle<tally_ingest::Result<Vec<Delivery>>>> = None;
    tokio::pin!(shutdown);
    let result: Result<()> = async {
        loop {
            // The poll runs as a task kept across iterations: a wake for publishing must not drop
            // a batch the poll already took from the consumer.
            let woke = {
                let poll = polling.get_or_insert_with(|| consumer.spawn_poll());
                tokio::select! {
                    joined = poll => Woke::Batch(joined),
                    _ = shared.publish_soon.notified() => Woke::Publish,
                    _ = &mut shutdown => Woke::Stop,
                }
            };
            let mut publish_now = false;
            let batch = match woke {
                Woke::Batch(joined) => {
                    polling = None;
                    tally_ingest::EventConsumer::joined(joined).map_err(kafka_err)?
                }
                Woke::Publish => {
                    publish_now = true;
                    Vec::new()
                }
                Woke::Stop => break,
            };
            if let Some(message) = shared.fatal.lock().unwrap_or_else(PoisonError::into_inner).take() {
                return Err(Error::Service(message));
            }
            // A halted partition is still this member's: no rejoin for it. (Each lock on its own:
            // never the map's while waiting for `halted`.)
            let owns_some = !shared.partitions().is_empty();
            if owns_some || !shared.halted().is_empty() {
                unassigned_since = Instant::now();
            } else if config.assignment == AssignmentMode::Group && polling.is_none() && !rejoin_after.is_zero() && unassigned_since.elapsed() >= rejoin_after {
                tracing::warn!(seconds = unassigned_since.elapsed().as_secs(), group = %config.group, "no partitions assigned; leaving the group and joining again");
                let stale = std::mem::replace(&mut consumer, tokio::task::block_in_place(join).map_err(kafka_err)?);
                stale.close().await.map_err(kafka_err)?;
                shared.metrics.rejoins.inc();
                unassigned_since = Instant::now();
                continue;
            }
            // A tenant has one log, on its home partition: an event anywhere else (a producer
            // without Kafka's murmur2 partitioner, or a topic whose partition count changed) is
            // dead-lettered, never the start of a second log.
            let mut batch = batch;
            for d in batch.iter_mut() {
                let home = match &d.outcome {
                    Ok(decoded) => tally_ingest::tenant_partition(&decoded.event.tenant_id, partitions),
                    Err(_) => continue,
                };
                // An event dated after its message, or ahead of this clock, would open billing
                // periods and budget windows in the future (docs/events.md).
                let now = jiff::Timestamp::now();
                if let Err(rejection) = d.outcome.as_ref().map_or(Ok(()), |decoded| tally_schemas::check_event_time(&decoded.event, d.timestamp_ms, now)) {
                    d.outcome = Err(rejection);
                    continue;
                }
                if home != d.partition {
                    shared.metrics.wrong_partition.inc();
                    d.outcome = Err(tally_schemas::Rejection::new(
                        tally_schemas::RejectCode::WrongPartition,
                        format!("tenant's home partition is {home} of {partitions} (Kafka's murmur2 partitioner), not {}; set the producer's partitioner to murmur2_random (librdkafka clients) or Kafka's default", d.partition),
                    ));
                }
            }
            // Dead-letter first: once a delivery is applied, any commit (the loop's or an
            // admission's) may make progress past it durable.
            let rejected: Vec<&Delivery> = {
                let parts = shared.partitions();
                batch
                    .iter()
                    .filter(|d| d.outcome.is_err())
                    .filter(|d| parts.get(&d.partition).is_some_and(|p| lock(p).resume_offset().is_none_or(|next| d.offset >= next)))
                    .collect()
            };
            // All of the batch's dead letters at once, in order (the producer is idempotent, so
            // a partition's sends keep their order), and awaited together: one at a time, each
            // waiting for its acknowledgement, a producer sending garbage slowed the partition
            // to about a hundred messages a second.
            let sends = rejected.into_iter().filter_map(|d| d.outcome.as_ref().err().map(|rejection| (d, rejection))).map(|(d, rejection)| {
                let (dlq, shared, topic) = (&dlq, &shared, config.topic.as_str());
                async move {
                    let sent = dlq
                        .send_reporting(topic, d, rejection, |error, tries| {
                            *shared.dlq_stalled.lock().unwrap_or_else(PoisonError::into_inner) = Some(format!("{error} ({tries} tries)"));
                        })
                        .await;
                    (d, rejection, sent)
                }
            });
            let sent_all = futures::future::join_all(sends).await;
            if !sent_all.is_empty() {
                *shared.dlq_stalled.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            for (d, rejection, sent) in sent_all {
                let m = &shared.metrics;
                m.dlq_failed_tries.inc_by(u64::from(sent.failed_tries));
                if sent.form == tally_ingest::DlqForm::Bounded {
                    m.dlq_bounded.inc();
                }
                tracing::warn!(partition = d.partition, offset = d.offset, code = rejection.code.as_str(), form = ?sent.form, "dead-lettered");
            }
            if let Some(file) = shared.budgets.reload() {
                for p in shared.owned().values() {
                    lock(p).set_budget_file(Some(Arc::clone(&file)));
                }
            }
            let mut appended = false;
            // Partitions whose storage failed in this batch: skipped for the rest of it, and
            // stopped and halted (`Shared::halt`) once their locks are let go.
            let mut failed: BTreeMap<i32, (Owned, Error)> = BTreeMap::new();
            {
                let parts = shared.owned();
                let now = jiff::Timestamp::now();
                for d in &batch {
                    let Some(owned) = parts.get(&d.partition) else { continue };
                    if failed.contains_key(&d.partition) {
                        continue;
                    }
                    let mut p = lock(owned);
                    if let Some(why) = p.failure() {
                        // An admission's commit failed: what it applied since is forgotten, and
                        // the partition is read again from its durable offset once it reopens.
                        failed.insert(d.partition, (Arc::clone(owned), Error::Log(tally_log::Error::Commit(why.to_string()))));
                        continue;
                    }
                    if p.is_closed() {
                        // Revoked: the next owner reads it again from its durable offset.
                        continue;
                    }
                    let m = &shared.metrics;
                    let applied = match p.apply(d) {
                        Ok(applied) => applied,
                        Err(e) if e.is_storage() => {
                            failed.insert(d.partition, (Arc::clone(owned), e));
                            continue;
                        }
                        Err(e) => {
                            if let Error::OffsetRegression { .. } = &e {
                                m.offset_regressions.inc();
                            }
                            return Err(e);
                        }
                    };
                    match applied {
                        Applied::Appended { .. } => {
                            appended = true;
                            m.accepted.inc()
                        }
                        Applied::Deduplicated { .. } => m.deduplicated.inc(),
                        Applied::Conflict { .. } => {
                            appended = true;
                            m.conflicts.inc()
                        }
                        Applied::Rejected => {
                            let reason = d.outcome.as_ref().err().map_or("unknown", |r| r.code.as_str());
                            m.dead_lettered.with_label_values(&[reason]).inc();
                        }
                    };
                }
                // Time-driven records (expiries, window ends, new configs) scan every tenant, so
                // not on every batch; an admission settles its own tenant's time regardless.
                let tick = last_tick.elapsed() >= TICK_EVERY;
                if tick {
                    last_tick = Instant::now();
                }
                for (partition, owned) in &parts {
                    if failed.contains_key(partition) {
                        continue;
                    }
                    let mut p = lock(owned);
                    if p.is_closed() {
                        continue;
                    }
                    if tick {
                        match p.tick(now) {
                            Ok(records) => appended |= records > 0,
                            Err(e) if e.is_storage() => {
                                failed.insert(*partition, (Arc::clone(owned), e));
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                        let (erased, retention_errors) = p.take_erasure_counts();
                        shared.metrics.erased_records.inc_by(erased);
                        shared.metrics.retention_errors.inc_by(retention_errors);
                    }
                    for (tenant, task) in p.take_budget_changes() {
                        if let Some(state) = p.budget(&tenant) {
                            unpublished.push(budget_message(&tenant, task.as_deref(), state, now));
                        }
                    }
                }
            }
            for (partition, (owned, e)) in failed {
                shared.halt(partition, &owned, &e);
            }
            if appended {
                shared.metrics.appended_unsigned();
            }
            if publish_now || last_commit.elapsed() >= interval {
                let offsets = tokio::task::block_in_place(|| shared.commit_all())?;
                // A partition halted in this batch or by this commit made nothing durable since
                // the last commit: its tenants' states are dropped.
                shared.drop_states_of_halted(&mut unpublished);
                // Durable now: queued for the publishing task. A state lost with the process (a
                // crash, a shutdown during an outage) is published again when its partition is
                // next opened.
                let dropped = shared.budget_outbox.put(std::mem::take(&mut unpublished), false);
                shared.metrics.budget_states_dropped.inc_by(dropped);
                // Kafka's committed offsets are for lag tools only, and every commit is a write on
                // the group coordinator's connection, where it queues ahead of heartbeats (Tansu
                // on sqlite then misses sessions): send them every few seconds, not every commit.
                if last_kafka_commit.elapsed() >= KAFKA_COMMIT_EVERY {
                    consumer.commit(&offsets).map_err(kafka_err)?;
                    last_kafka_commit = Instant::now();
                }
                last_commit = Instant::now();
                shared.metrics.set_consumer_lag(consumer.consumer_lag());
            }
            // Halted partitions: paused at once, and opened again when due. Only between polls,
            // so no batch in the making straddles the consumer's move back.
            if polling.is_none() {
                tokio::task::block_in_place(|| {
                    shared.pause_halted(&consumer);
                    shared.reopen_halted(&consumer);
                });
            }
        }
        Ok(())
    }
    .await;
    counting.abort();
    // Whatever ended the loop, make what was applied durable before leaving the group, and
    // publish the states it changed (a freeze the loop was not woken for in time included).
    let now = jiff::Timestamp::now();
    for owned in shared.owned().values() {
        let mut p = lock(owned);
        for (tenant, task) in p.take_budget_changes() {
            if let Some(state) = p.budget(&tenant) {
                unpublished.push(budget_message(&tenant, task.as_deref(), state, now));
            }
        }
    }
    let committed = tokio::task::block_in_place(|| shared.commit_all());
    shared.drop_states_of_halted(&mut unpublished);
    if committed.is_ok() {
        let dropped = shared.budget_outbox.put(unpublished, false);
        shared.metrics.budget_states_dropped.inc_by(dropped);
    }
    drop(stop_projector);
    tokio::task::block_in_place(|| {
        if projecting.join().is_err() {
            tracing::error!("the projection thread panicked");
        }
        for (p, owned) in shared.owned() {
            shared.metrics.projected(projector::project_partition(&owned, p, true));
        }
    });
    if let Ok(offsets) = &committed {
        consumer.commit(offsets).map_err(kafka_err)?;
    }
    consumer.close().await.map_err(kafka_err)?;
    // The budget states of the last batches: a last pass, bounded in time.
    closing.store(true, Ordering::Release);
    shared.budget_outbox.wake.notify_one();
    if tokio::time::timeout(Duration::from_secs(5), publishing).await.is_err() {
        tracing::warn!("budget states still unpublished at shutdown; each is published again at its tenant's next change");
    }
    let _ = http_stop.send(());
    let _ = server.await;
    result.and(committed.map(|_| ()))
}

/// The partition count of the events topic this data directory was built with, recorded at the
/// first start (`<data_dir>/partitions/<topic>.partition-count`). A tenant's home partition is
/// `murmur2(tenant) mod count`, so a changed count would move tenants to other partitions and
/// give each a second log: refused with an error that says what to do.
fn pin_partition_count(data_dir: &std::path::Path, topic: &str, current: i32) -> Result<i32> {
    let dir = data_dir.join("partitions");
    let path = dir.join(format!("{topic}.partition-count"));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let pinned: i32 =
                text.trim().parse().map_err(|_| Error::Corrupt { path: path.display().to_string(), detail: format!("{text:?} is not a partition count") })?;
            if pinned != current {
                return Err(Error::Service(format!(
                    "topic {topic} has {current} partitions, but this data directory was built with {pinned} ({}): every tenant's home partition would change and its log would fork; the partition count of an events topic in use cannot change (see README, \"Growing the events topic\")",
                    path.display()
                )));
            }
            Ok(pinned)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tally_log::durable::create_dir_durably(&dir)?;
            tally_log::durable::replace_file(&path, format!("{current}\n").as_bytes())?;
            Ok(current)
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The `tally.budget` message for a tenant (or one of its tasks): key and JSON value.
pub fn budget_message(tenant: &str, task: Option<&str>, state: &crate::budget::BudgetState, now: jiff::Timestamp) -> (String, Vec<u8>) {
    let key = match task {
        Some(t) => format!("{tenant}/{t}"),
        None => tenant.to_string(),
    };
    let value = serde_json::json!({
        "tenant_id": tenant,
        "task_id": task,
        "status": state.status(now, task),
        "levels": state.levels(now, task),
        "ceiling_priced_events": state.ceiling_priced,
        "currency": state.budget().map(|b| b.currency.as_str()),
        "foreign_currency_events": state.foreign_currency_events,
        "freezes": state.freezes().collect::<Vec<_>>(),
        "quotas": state.quota_levels(now).into_iter().map(|(key, used, limit, resets_at)| serde_json::json!({"quota": key, "used": used, "limit": limit, "resets_at": resets_at})).collect::<Vec<_>>(),
        "at": now,
    });
    (key, value.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> std::result::Result<ServiceConfig, String> {
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("k");
        key.write_new(&path).unwrap();
        let text = format!("data_dir = \"{}\"\nkeys = [\"{}\"]\n{extra}", dir.display(), path.display());
        let config: ServiceConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        config.load_keys().map_err(|e| e.to_string())?;
        config.load_tokens().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// Against the test broker (`KAFKA_BOOTSTRAP`, set by scripts/test.sh). Tansu cannot add
    /// partitions to a topic, so the topic has 3 from the start and the ledger's pinned count is
    /// 2, as after a grow.
    #[tokio::test]
    async fn a_broker_that_does_not_answer_is_an_outage_counted_once() {
        // Nothing listens on port 1: every metadata request goes unanswered.
        let probe = tally_ingest::BrokerProbe::new(&KafkaConfig::with_bootstrap("127.0.0.1:1")).unwrap();
        let (health, metrics) = (Arc::new(BrokerHealth::default()), Arc::new(Metrics::default()));
        let watching = {
            let (health, metrics) = (Arc::clone(&health), Arc::clone(&metrics));
            tokio::spawn(async move { watch_broker(probe, "events".into(), 1, Duration::from_millis(100), &health, &metrics, |_| {}).await })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while metrics.broker_outages.get() < 1 {
            assert!(Instant::now() < deadline, "the outage was never noticed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, why) = health.down().expect("down");
        assert!(why.contains("the broker did not answer"), "{why}");
        assert_eq!(metrics.broker_reachable.get(), 0);
        // Further failed requests extend the same outage.
        tokio::time::sleep(BROKER_ANSWER_WITHIN + Duration::from_secs(1)).await;
        assert_eq!(metrics.broker_outages.get(), 1);
        watching.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_partition_count_is_reported_and_an_unchanged_one_is_not() {
        let bootstrap = std::env::var("KAFKA_BOOTSTRAP").expect("KAFKA_BOOTSTRAP: the test broker (scripts/test.sh starts one)");
        let kafka = KafkaConfig::with_bootstrap(bootstrap);
        let topic = format!("watch-count-{}-{}", std::process::id(), jiff::Timestamp::now().as_millisecond());
        tally_ingest::ensure_topics(&kafka, &[tally_ingest::TopicSpec::new(&topic, 3)]).await.unwrap();
        let every = Duration::from_millis(200);
        let (tx, mut unchanged) = tokio::sync::oneshot::channel();
        let watch = |count: i32, tx: tokio::sync::oneshot::Sender<String>| {
            let (probe, topic) = (tally_ingest::BrokerProbe::new(&kafka).unwrap(), topic.clone());
            let (health, metrics) = (Arc::new(BrokerHealth::default()), Arc::new(Metrics::default()));
            let seen = Arc::clone(&health);
            let task = tokio::spawn(async move {
                watch_broker(probe, topic, count, every, &health, &metrics, move |e| {
                    let _ = tx.send(e);
                })
                .await
            });
            (task, seen)
        };
        let (watching, health) = watch(3, tx);
        let (tx, grown) = tokio::sync::oneshot::channel();
        let (reporting, _) = watch(2, tx);
        let message = tokio::time::timeout(Duration::from_secs(30), grown).await.expect("reported").unwrap();
        assert!(message.contains(&format!("topic {topic} grew from 2 to 3 partitions")), "{message}");
        reporting.await.unwrap();
        tokio::time::sleep(3 * every).await;
        assert!(unchanged.try_recv().is_err() && !watching.is_finished(), "an unchanged count is not a failure");
        assert!(health.down().is_none(), "the broker answered");
        watching.abort();
    }

    #[test]
    fn the_partition_count_is_pinned_at_first_start() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pin_partition_count(dir.path(), "events", 8).unwrap(), 8);
        assert_eq!(pin_partition_count(dir.path(), "events", 8).unwrap(), 8, "unchanged: fine");
        let err = pin_partition_count(dir.path(), "events", 12).unwrap_err().to_string();
        assert!(err.contains("has 12 partitions") && err.contains("built with 8") && err.contains("fork"), "{err}");
        assert_eq!(pin_partition_count(dir.path(), "other", 12).unwrap(), 12, "per topic");
    }

    #[test]
    fn the_budget_outbox_keeps_the_newest_state_per_key_and_is_bounded() {
        let outbox = BudgetOutbox::default();
        assert_eq!(outbox.put([("acme".to_string(), b"1".to_vec()), ("acme".to_string(), b"2".to_vec())], false), 0);
        // A failed older state put back never replaces a newer one.
        assert_eq!(outbox.put([("acme".to_string(), b"0".to_vec()), ("globex".to_string(), b"g".to_vec())], true), 0);
        let taken = outbox.take();
        assert_eq!((taken["acme"].as_slice(), taken["globex"].as_slice()), (&b"2"[..], &b"g"[..]));
        assert!(outbox.take().is_empty());
        let many = (0..MAX_WAITING_BUDGET_STATES + 10).map(|i| (format!("t{i}"), vec![]));
        assert_eq!(outbox.put(many, false), 10, "past the bound, new keys are dropped and counted");
        assert_eq!(outbox.put([("t0".to_string(), b"x".to_vec())], false), 0, "a waiting key is still updated");
        assert!(outbox.failing().is_none());
    }

    #[test]
    fn settings_are_validated_naming_the_key() {
        assert!(config("").is_ok());
        let err = config("listen = \"0.0.0.0:8080\"\n").unwrap_err();
        assert!(err.contains("ledger.tokens is required"), "{err}");
        let err = config("commit_interval_ms = 0\n").unwrap_err();
        assert!(err.contains("ledger.commit_interval_ms"), "{err}");
        let err = config("comit_interval_ms = 5\n").unwrap_err();
        assert!(err.contains("unknown field `comit_interval_ms`"), "{err}");
        let err = config("tokens = \"/nonexistent/tokens.toml\"\n").unwrap_err();
        assert!(err.contains("/nonexistent/tokens.toml"), "{err}");
        assert!(config("partitions = [0, 2]\n").is_ok());
        assert_eq!(config("assignment = \"group\"\n").unwrap().assignment, AssignmentMode::Group);
        assert_eq!(config("").unwrap().assignment, AssignmentMode::Assign, "one instance needs no group");
        let err = config("assignment = \"group\"\npartitions = [1]\n").unwrap_err();
        assert!(err.contains("ledger.partitions applies to assignment = \"assign\" only"), "{err}");
        let err = config("partitions = []\n").unwrap_err();
        assert!(err.contains("ledger.partitions = []"), "{err}");
        let err = config("partitions = [-1]\n").unwrap_err();
        assert!(err.contains("each >= 0"), "{err}");
        let err = config("assignment = \"static\"\n").unwrap_err();
        assert!(err.contains("unknown variant `static`"), "{err}");
    }
}
