//! The ledger service's metrics, exported at `/metrics` (README "Metrics" lists each one).
//!
//! Counters and histograms are `prometheus` types in the service's own registry
//! ([`tally_auth::Telemetry`]); gauges that describe the present (partitions owned, checkpoint
//! lag, consumer lag, token reload failures) are brought up to date when `/metrics` is read.
//! Labels come from closed sets: a reject code, a partition number, a commit phase. Never a
//! tenant id: a deployment has 10^4–10^5 of them.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tally_auth::prometheus::{Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tally_auth::Telemetry;

pub struct Metrics {
    telemetry: Telemetry,
    pub accepted: IntCounter,
    pub deduplicated: IntCounter,
    pub conflicts: IntCounter,
    /// Messages dead-lettered, by reject code (docs/events.md lists the codes).
    pub dead_lettered: IntCounterVec,
    pub commits: IntCounter,
    pub budget_published: IntCounter,
    pub rejoins: IntCounter,
    pub admissions_allowed: IntCounter,
    pub admissions_denied: IntCounter,
    pub admissions_throttled: IntCounter,
    /// Durable requests refused because their partition's admission queue was full.
    pub admissions_overloaded: IntCounter,
    /// Keyed authorize and release retries answered from their first record.
    pub requests_replayed: IntCounter,
    /// Records whose personal values were erased, and retention passes that failed.
    pub erased_records: IntCounter,
    pub retention_errors: IntCounter,
    pub projected_records: IntCounter,
    pub projection_files: IntCounter,
    pub projection_errors: IntCounter,
    /// Journal index files merged, and merges that failed (retried at the next pass).
    pub index_merges: IntCounter,
    pub index_merge_errors: IntCounter,
    /// Dead letters the broker would not take whole, sent in bounded form.
    pub dlq_bounded: IntCounter,
    /// Failed tries to dead-letter a message (each retried until it succeeds).
    pub dlq_failed_tries: IntCounter,
    /// Events dead-lettered because they were not on their tenant's home partition.
    pub wrong_partition: IntCounter,
    /// Budget states whose publication failed (each retried until it succeeds).
    pub budget_publish_failures: IntCounter,
    /// Budget states not published because too many were waiting (a newer one follows).
    pub budget_states_dropped: IntCounter,
    /// Offsets found below what was recorded (the topic was recreated or lost data).
    pub offset_regressions: IntCounter,
    /// 1 while the broker answers the watcher's metadata requests, 0 during an outage; and the
    /// outages seen.
    pub broker_reachable: IntGauge,
    pub broker_outages: IntCounter,
    /// Partitions stopped by a failure of their storage (a full disk) and not yet opened again,
    /// and how many times a partition was stopped that way.
    pub partitions_halted: IntGauge,
    pub partition_halts: IntCounter,
    /// 1 while the last projection pass had failures (a full disk, say), else 0.
    pub projection_failing: IntGauge,
    /// An authorize request, from its arrival to its durable answer.
    pub authorize_seconds: Histogram,
    /// A partition's group commit, all phases.
    pub commit_seconds: Histogram,
    /// The durable-write phases of a commit: `logs` (tenant logs synced, checkpoints signed and
    /// stored) and `state` (the partition's redb transaction).
    pub fsync_seconds: HistogramVec,
    /// How long the oldest record of a commit waited for the signed checkpoint that covers it.
    pub checkpoint_wait_seconds: Histogram,
    partitions: IntGauge,
    checkpoint_lag: Gauge,
    consumer_lag_gauge: IntGaugeVec,
    /// Per partition: messages behind the high watermark (librdkafka statistics).
    consumer_lag: Mutex<BTreeMap<i32, i64>>,
    /// When the oldest record not yet covered by a signed checkpoint was appended.
    unsigned_since: Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What one partition commit took, for [`Metrics::observe_commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitTimes {
    pub logs: Duration,
    /// `None` when there was nothing to write to the state store.
    pub state: Option<Duration>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let t = Telemetry::new("ledger");
        Metrics {
            accepted: t.counter("tally_ledger_events_accepted_total", "Events appended to tenant logs."),
            deduplicated: t.counter("tally_ledger_events_deduplicated_total", "Identical retries recorded once."),
            conflicts: t.counter("tally_ledger_conflicts_total", "Same idempotency key, different content."),
            dead_lettered: t.counter_vec("tally_ledger_dead_lettered_total", "Messages sent to the DLQ, by reject code.", &["reason"]),
            commits: t.counter("tally_ledger_commits_total", "Group commits (each signs checkpoints)."),
            rejoins: t.counter("tally_ledger_rejoins_total", "Times this instance left and rejoined the group after owning no partition for rejoin_after_ms."),
            budget_published: t.counter("tally_ledger_budget_states_published_total", "Budget states published to the budget topic."),
            admissions_allowed: t.counter("tally_ledger_admissions_allowed_total", "Authorize requests allowed (with a reservation)."),
            admissions_denied: t.counter("tally_ledger_admissions_denied_total", "Authorize requests denied."),
            admissions_throttled: t
                .counter("tally_ledger_admissions_throttled_total", "Authorize requests throttled by a rate quota (retry after its window)."),
            admissions_overloaded: t.counter(
                "tally_ledger_admissions_overloaded_total",
                "Authorize, release, freeze and unfreeze requests answered 503 overloaded: their partition's admission queue was full.",
            ),
            erased_records: t.counter("tally_ledger_erased_records_total", "Records whose personal values were erased: by POST …/erase or a retention pass."),
            retention_errors: t.counter(
                "tally_ledger_retention_errors_total",
                "Retention passes (per tenant, or reading the key store) that failed; each is tried again at the next pass.",
            ),
            requests_replayed: t.counter(
                "tally_ledger_idempotent_replays_total",
                "Authorize and release retries (same Idempotency-Key) answered from their first record; not counted as allowed or denied again.",
            ),
            projected_records: t.counter("tally_ledger_projected_records_total", "Records written to the Parquet projection."),
            projection_files: t.counter("tally_ledger_projection_files_total", "Parquet files written by projection flushes."),
            projection_errors: t.counter("tally_ledger_projection_errors_total", "Failed projection flushes (retried at the next pass)."),
            index_merges: t.counter("tally_ledger_index_merges_total", "Journal index files merged into one (docs/storage.md, \"Merged indexes\")."),
            index_merge_errors: t
                .counter("tally_ledger_index_merge_errors_total", "Index merges that failed (retried at the next pass; reads are unaffected)."),
            dlq_bounded: t
                .counter("tally_ledger_dlq_bounded_total", "Dead letters the broker would not take whole, sent in bounded form (digest, size, prefix)."),
            dlq_failed_tries: t.counter("tally_ledger_dlq_failed_tries_total", "Failed tries to dead-letter a message (each retried until it succeeds)."),
            wrong_partition: t.counter("tally_ledger_wrong_partition_total", "Events dead-lettered as wrong_partition (not on their tenant's home partition)."),
            budget_publish_failures: t.counter("tally_ledger_budget_publish_failures_total", "Budget states whose publication failed (retried)."),
            budget_states_dropped: t
                .counter("tally_ledger_budget_states_dropped_total", "Budget states dropped because too many were waiting for the budget topic."),
            offset_regressions: t
                .counter("tally_ledger_offset_regressions_total", "Offsets below what was recorded (topic recreated or data lost); the service stops."),
            authorize_seconds: t.histogram("tally_ledger_authorize_seconds", "Authorize requests, from arrival to the durable decision."),
            commit_seconds: t.histogram("tally_ledger_commit_seconds", "A partition's group commit, all phases."),
            fsync_seconds: t.histogram_vec(
                "tally_ledger_fsync_seconds",
                "Durable-write phases of a commit: logs (tenant logs synced, checkpoints signed and stored), state (the partition's state store).",
                &["phase"],
            ),
            checkpoint_wait_seconds: t
                .histogram("tally_ledger_checkpoint_wait_seconds", "How long the oldest record of a group commit waited for its signed checkpoint."),
            partitions: t.int_gauge("tally_ledger_partitions", "Partitions owned by this instance."),
            broker_reachable: t.int_gauge("tally_ledger_broker_reachable", "1 while the broker answers metadata requests, 0 while it does not."),
            broker_outages: t.counter("tally_ledger_broker_outages_total", "Times the broker stopped answering (each outage counted once)."),
            partitions_halted: t.int_gauge(
                "tally_ledger_partitions_halted",
                "Partitions stopped because their storage failed (a full disk); each is opened again every 2 s until it opens.",
            ),
            partition_halts: t.counter("tally_ledger_partition_halts_total", "Times a partition stopped because a write, sync or read of its files failed."),
            projection_failing: t.int_gauge("tally_ledger_projection_failing", "1 while the last projection pass had failed flushes (retried at every pass)."),
            checkpoint_lag: t.gauge("tally_ledger_checkpoint_lag_seconds", "Age of the oldest record not yet in a signed checkpoint (0: all signed)."),
            consumer_lag_gauge: t.int_gauge_vec("tally_ledger_consumer_lag", "Messages behind the partition's high watermark.", &["partition"]),
            consumer_lag: Mutex::new(BTreeMap::new()),
            unsigned_since: Mutex::new(None),
            telemetry: t,
        }
    }

    /// The service's registry (the HTTP layer adds its request histogram to it).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Seconds the oldest record has waited for a signed checkpoint; 0 when all are covered.
    pub fn checkpoint_lag_seconds(&self) -> f64 {
        self.unsigned_since.lock().unwrap_or_else(PoisonError::into_inner).map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    pub fn consumer_lag(&self) -> BTreeMap<i32, i64> {
        self.consumer_lag.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(super) fn set_consumer_lag(&self, lag: BTreeMap<i32, i64>) {
        *self.consumer_lag.lock().unwrap_or_else(PoisonError::into_inner) = lag;
    }

    /// Records were appended that no signed checkpoint covers yet.
    pub(super) fn appended_unsigned(&self) {
        self.unsigned_since.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(Instant::now);
    }

    /// Everything appended before `signing` is now in a signed checkpoint.
    pub(super) fn signed(&self, signing: Instant) {
        let mut unsigned = self.unsigned_since.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = unsigned.filter(|t| *t <= signing) {
            self.checkpoint_wait_seconds.observe(since.elapsed().as_secs_f64());
            *unsigned = None;
        }
    }

    /// Counts what a projection pass did.
    pub(super) fn projected(&self, projected: super::projector::Projected) {
        self.projected_records.inc_by(projected.records);
        self.projection_files.inc_by(projected.files as u64);
        self.projection_errors.inc_by(projected.errors as u64);
    }

    pub fn observe_commit(&self, times: CommitTimes) {
        self.fsync_seconds.with_label_values(&["logs"]).observe(times.logs.as_secs_f64());
        if let Some(state) = times.state {
            self.fsync_seconds.with_label_values(&["state"]).observe(state.as_secs_f64());
        }
        self.commit_seconds.observe((times.logs + times.state.unwrap_or_default()).as_secs_f64());
    }

    /// The Prometheus text, with the gauges of the present brought up to date first.
    pub fn render(&self, partitions_owned: usize, token_reload_failures: u64) -> String {
        self.partitions.set(i64::try_from(partitions_owned).unwrap_or(i64::MAX));
        self.checkpoint_lag.set(self.checkpoint_lag_seconds());
        self.consumer_lag_gauge.reset();
        for (p, lag) in self.consumer_lag() {
            self.consumer_lag_gauge.with_label_values(&[p.to_string().as_str()]).set(lag);
        }
        self.telemetry.render(token_reload_failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_without_tenant_labels() {
        let m = Metrics::new();
        m.accepted.inc_by(3);
        m.dead_lettered.with_label_values(&["bad_json"]).inc();
        m.dead_lettered.with_label_values(&["duplicate_key"]).inc_by(2);
        m.observe_commit(CommitTimes { logs: Duration::from_micros(300), state: Some(Duration::from_micros(150)) });
        m.set_consumer_lag(BTreeMap::from([(0, 5), (3, 0)]));
        m.appended_unsigned();
        let text = m.render(2, 4);
        for line in [
            "tally_ledger_events_accepted_total 3",
            r#"tally_ledger_dead_lettered_total{reason="bad_json"} 1"#,
            r#"tally_ledger_dead_lettered_total{reason="duplicate_key"} 2"#,
            "tally_ledger_commit_seconds_count 1",
            r#"tally_ledger_fsync_seconds_count{phase="logs"} 1"#,
            r#"tally_ledger_fsync_seconds_count{phase="state"} 1"#,
            "tally_ledger_partitions 2",
            r#"tally_ledger_consumer_lag{partition="0"} 5"#,
            r#"tally_ledger_consumer_lag{partition="3"} 0"#,
            "tally_ledger_token_reload_failures_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("tally_ledger_checkpoint_lag_seconds 0\n"), "a record waits for its checkpoint");
        m.signed(Instant::now());
        m.set_consumer_lag(BTreeMap::from([(3, 1)]));
        let text = m.render(1, 4);
        assert!(text.lines().any(|l| l == "tally_ledger_checkpoint_lag_seconds 0"), "{text}");
        assert!(text.lines().any(|l| l == "tally_ledger_checkpoint_wait_seconds_count 1"), "{text}");
        assert!(!text.contains(r#"partition="0""#), "a partition no longer owned is dropped: {text}");
        assert!(text.lines().any(|l| l == "tally_ledger_token_reload_failures_total 4"), "the counter follows the store, not the scrapes: {text}");
    }
}
