//! The Parquet projection of the owned partitions, on a thread of its own: it follows what
//! commits made durable, and never holds a partition's lock while it writes files, so reads,
//! admissions and commits never wait for Parquet.
//!
//! A pass over a partition works in rounds of up to [`TENANTS_PER_ROUND`] tenants with
//! unprojected records, each round one flush of the partition's projection (files shared by its
//! tenants: docs/parquet.md): the partition is flushed at most once per `projection_interval_ms`
//! unless forced; the tenants' records are read under the lock, at most [`ROUND_BYTES`] of
//! entries per round, so memory stays bounded whatever the backlog; the files are written
//! without it; and tenants whose projection reached their committed size are forgotten under it
//! again.
//!
//! Invariants: one pass at a time per partition (the partition's projection mutex, taken before
//! its lock); a closed partition (revoked, or the service stopping) is projected only by the
//! forced pass of whoever closed it, never by the thread, so a partition's projection is never
//! written by two owners at once. A failure is logged and counted and retried at the next pass:
//! the log is the truth, and the projection can be rebuilt from it.
//!
//! The same thread merges each partition's journal index files when a merge is due
//! ([`merge_index_files`]): the merge reads and writes files without the partition's lock, which
//! is taken only to find the merge and to swap its result in.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::{lock, Owned, Shared};

/// Tenants looked at per round: one round is one flush, so its files hold up to this many
/// tenants.
const TENANTS_PER_ROUND: usize = 4096;
/// Entry bytes read per round, at most (past each tenant's first record).
const ROUND_BYTES: usize = 16 << 20;
/// How often the thread looks for due tenants.
const TICK: Duration = Duration::from_millis(200);

/// What one projection pass did.
#[derive(Debug, Default, Clone)]
pub struct Projected {
    pub records: u64,
    pub files: usize,
    pub errors: usize,
    /// The last failure, when there were any.
    pub last_error: Option<String>,
}

/// Rewrites `tenant`'s rows in its partition's projection from its committed log, as an erasure
/// needs: under the partition's projection mutex (no pass runs meanwhile), from a read-only view
/// of the journal, so the partition's lock is held only to find its directory, never while files
/// are written. Returns the rows rewritten; `None` for a closed partition, which belongs to its
/// next owner (whose projector rewrites them when it meets the `erasure` record).
pub(crate) fn reproject_tenant(owned: &Owned, tenant: &str) -> crate::error::Result<Option<u64>> {
    let mut projection = owned.projection.lock().unwrap_or_else(PoisonError::into_inner);
    rewrite(owned, &mut projection, tenant)
}

fn rewrite(owned: &Owned, projection: &mut tally_projection::Projection, tenant: &str) -> crate::error::Result<Option<u64>> {
    let (dir, keys) = {
        let p = lock(owned);
        if p.is_closed() {
            return Ok(None);
        }
        (p.ledger().dir().to_path_buf(), p.ledger().signing_keys().to_vec())
    };
    let ledger = tally_log::Ledger::open_read_only(&dir, keys)?;
    Ok(Some(projection.rewrite_tenant(tenant, &ledger)?))
}

/// Projects the due tenants of one partition; with `force`, every tenant, whatever the last
/// flush, until none is left behind (or a pass makes no progress).
pub(crate) fn project_partition(owned: &Owned, partition: i32, force: bool) -> Projected {
    let mut projection = owned.projection.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = Projected::default();
    if !force && lock(owned).is_closed() {
        return out;
    }
    match projection.due(force) {
        Ok(true) => {}
        Ok(false) => return out,
        Err(e) => {
            failed(&mut out, partition, None, &e.to_string());
            return out;
        }
    }
    loop {
        let before = (out.records, out.files);
        let mut after = String::new();
        loop {
            let round = lock(owned).unprojected_after(&after, TENANTS_PER_ROUND);
            let Some(last) = round.last() else { break };
            after = last.clone();
            let mut due = Vec::with_capacity(round.len());
            for tenant in round {
                match projection.next_seq(&tenant) {
                    Ok(first) => due.push((tenant, first)),
                    Err(e) => failed(&mut out, partition, Some(&tenant), &e.to_string()),
                }
            }
            let mut inputs = Vec::new();
            let mut caught_up = Vec::new();
            {
                let p = lock(owned);
                let mut bytes = 0usize;
                for (tenant, first) in due {
                    if bytes >= ROUND_BYTES {
                        break;
                    }
                    match tally_projection::read_flush(p.ledger(), &tenant, first, ROUND_BYTES - bytes) {
                        Ok(Some(input)) => {
                            bytes += input.bytes();
                            inputs.push(input);
                        }
                        Ok(None) => caught_up.push((tenant, first)),
                        Err(e) => failed(&mut out, partition, Some(&tenant), &e.to_string()),
                    }
                }
            }
            // An erasure's keys are gone (the commit that made it durable deleted them), but rows
            // written before may show what it erased: those are rewritten first.
            for tenant in inputs.iter().filter(|i| i.has_erasure()).map(|i| i.tenant().to_string()).collect::<Vec<_>>() {
                match rewrite(owned, &mut projection, &tenant) {
                    Ok(Some(rows)) => tracing::info!(tenant_id = %tenant, partition, rows, "projection rows rewritten after an erasure"),
                    Ok(None) => {}
                    Err(e) => {
                        failed(&mut out, partition, Some(&tenant), &e.to_string());
                        inputs.retain(|i| i.tenant() != tenant);
                    }
                }
            }
            let tenants: Vec<String> = inputs.iter().map(|i| i.tenant().to_string()).collect();
            let mut written = Vec::new();
            if !inputs.is_empty() {
                match projection.write(inputs) {
                    Ok(report) => {
                        out.records += report.records;
                        out.files += report.files;
                        written = tenants;
                    }
                    Err(e) => failed(&mut out, partition, None, &e.to_string()),
                }
            }
            let mut p = lock(owned);
            for (tenant, next_seq) in caught_up {
                p.projected(&tenant, next_seq);
            }
            for tenant in written {
                if let Ok(0) = projection.behind(&tenant, p.ledger()) {
                    let size = p.committed_size(&tenant);
                    p.projected(&tenant, size);
                }
            }
        }
        let progress = (out.records, out.files) != before;
        if !force || !lock(owned).has_unprojected() || !progress {
            return out;
        }
    }
}

fn failed(out: &mut Projected, partition: i32, tenant: Option<&str>, error: &str) {
    out.errors += 1;
    out.last_error = Some(match tenant {
        Some(tenant) => format!("tenant {tenant} of partition {partition}: {error}"),
        None => format!("partition {partition}: {error}"),
    });
    tracing::error!(tenant_id = tenant, partition, error, "parquet projection failed; retrying at the next pass");
}

/// The thread's loop: every [`TICK`], a pass over every owned partition, until `stop` is
/// dropped or sent to.
pub(crate) fn run(shared: Arc<Shared>, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(TICK) {
        // A full disk fails every flush: shown in `/readyz` and a gauge until a pass has none.
        let mut failure = None;
        for (partition, owned) in shared.owned() {
            let projected = project_partition(&owned, partition, false);
            failure = projected.last_error.clone().or(failure);
            shared.metrics.projected(projected);
            merge_index_files(&owned, partition, &shared.metrics);
        }
        shared.projection_passed(failure);
    }
}

/// Runs the index merges due on one partition's journal (docs/storage.md, "Merged indexes"),
/// holding its lock only to find each merge and to adopt it. A failed merge is logged, counted
/// and tried again at the next pass; reads never depend on it.
pub(crate) fn merge_index_files(owned: &Owned, partition: i32, metrics: &super::metrics::Metrics) {
    loop {
        let due = {
            let p = lock(owned);
            if p.is_closed() {
                return;
            }
            p.ledger().index_merge_due()
        };
        let Some(merge) = due else { return };
        let span = merge.span();
        let adopted = merge.run().map_err(crate::error::Error::from).and_then(|merged| {
            let mut p = lock(owned);
            // A partition revoked meanwhile belongs to its next owner: its files are left as they
            // are (the merged one is valid, and that owner's next open uses or removes it).
            if p.is_closed() {
                return Ok(false);
            }
            p.adopt_index_merge(merged)
        });
        match adopted {
            Ok(true) => {
                metrics.index_merges.inc();
                tracing::debug!(partition, first = span.first, segments = span.segments, "journal index files merged");
            }
            Ok(false) => return,
            Err(e) => {
                metrics.index_merge_errors.inc();
                tracing::error!(partition, first = span.first, segments = span.segments, error = %e, "journal index merge failed; retrying at the next pass");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::partition::test_delivery;
    use crate::service::Metrics;
    use crate::service::{OwnedPartition, PartitionLedger};
    use tally_log::TenantEntries;

    #[test]
    fn the_background_pass_merges_index_files_without_losing_a_record_and_leaves_revoked_partitions_alone() {
        let dir = tempfile::tempdir().unwrap();
        let key = tally_log::LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open_with(dir.path(), "events", 3, vec![key.clone()], 4096).unwrap();
        let tenants = ["acme", "globex", "initech"];
        for o in 0..600 {
            p.apply(&test_delivery(o, tenants[(o % 3) as usize], &format!("e{o}"), 1)).unwrap();
            if o % 10 == 9 {
                p.commit().unwrap();
            }
        }
        p.commit().unwrap();
        let before = p.ledger().index_spans().len();
        assert!(before >= 2 * tally_log::MERGE_FAN as usize, "{before} index files");
        let projection = tally_projection::Projection::new(&dir.path().join("parquet"), "events-3", Duration::from_secs(1));
        let owned = OwnedPartition::new(0, p, projection).unwrap();
        let metrics = Metrics::new();
        merge_index_files(&owned, 3, &metrics);
        let p = lock(&owned);
        let after = p.ledger().index_spans().len();
        assert!(after < before, "{before} index files, then {after}");
        assert_eq!(metrics.index_merges.get() as usize, (before - after) / (tally_log::MERGE_FAN as usize - 1));
        assert!(p.ledger().index_merge_due().is_none(), "every due merge ran");
        for tenant in tenants {
            assert_eq!(p.committed_size(tenant), 200);
            for seq in 0..200 {
                p.ledger().tenant(tenant).entry(seq).unwrap();
            }
        }
        drop(p);
        // A revoked partition belongs to its next owner: nothing is merged.
        let mut p = lock(&owned);
        for o in 600..1200 {
            p.apply(&test_delivery(o, "acme", &format!("e{o}"), 1)).unwrap();
            if o % 10 == 9 {
                p.commit().unwrap();
            }
        }
        p.commit_closing().unwrap();
        assert!(p.is_closed() && p.ledger().index_merge_due().is_some());
        let spans = p.ledger().index_spans();
        drop(p);
        merge_index_files(&owned, 3, &metrics);
        assert_eq!(lock(&owned).ledger().index_spans(), spans);
    }
}
