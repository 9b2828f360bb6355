//! The Parquet projection of the owned partitions, on a thread of its own: it follows what
//! commits made durable, and never holds a partition's lock while it writes files, so reads,
//! admissions and commits never wait for Parquet.
//!
//! A pass over a partition works in rounds of up to [`TENANTS_PER_ROUND`] tenants with
//! unprojected records: which of them are due is decided without the partition's lock (loading a
//! tenant's watermark the first time touches only its projection files); their records are read
//! under the lock, at most [`ROUND_BYTES`] of entries per round, so memory stays bounded whatever
//! the backlog; the files are written without it; and tenants whose projection reached their
//! committed size are forgotten under it again.
//!
//! Invariants: one pass at a time per partition (the partition's projection mutex, taken before
//! its lock); a closed partition (revoked, or the service stopping) is projected only by the
//! forced pass of whoever closed it, never by the thread, so the projection of a tenant is never
//! written by two owners at once. A failure is logged and counted and retried at the next pass: the
//! log is the truth, and the projection can be rebuilt from it.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::{lock, Owned, Shared};

/// Tenants looked at per round.
const TENANTS_PER_ROUND: usize = 256;
/// Entry bytes read per round, at most (past the first tenant's first record).
const ROUND_BYTES: usize = 16 << 20;
/// How often the thread looks for due tenants.
const TICK: Duration = Duration::from_millis(200);

/// What one projection pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Projected {
    pub records: u64,
    pub files: usize,
    pub errors: usize,
}

/// Projects the due tenants of one partition; with `force`, every tenant, whatever its last
/// flush, until none is left behind (or a pass makes no progress).
pub(crate) fn project_partition(owned: &Owned, partition: i32, force: bool) -> Projected {
    let mut projection = owned.projection.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = Projected::default();
    if !force && lock(owned).is_closed() {
        return out;
    }
    loop {
        let before = out;
        let mut after = String::new();
        loop {
            let round = lock(owned).unprojected_after(&after, TENANTS_PER_ROUND);
            let Some(last) = round.last() else { break };
            after = last.clone();
            let mut due = Vec::with_capacity(round.len());
            for tenant in round {
                match projection.due(&tenant, force) {
                    Ok(Some(first)) => due.push((tenant, first)),
                    Ok(None) => {}
                    Err(e) => failed(&mut out, partition, &tenant, &e.to_string()),
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
                            inputs.push((tenant, input));
                        }
                        Ok(None) => caught_up.push((tenant, first)),
                        Err(e) => failed(&mut out, partition, &tenant, &e.to_string()),
                    }
                }
            }
            let mut written = Vec::with_capacity(inputs.len());
            for (tenant, input) in inputs {
                match projection.write(input) {
                    Ok(report) => {
                        out.records += report.records;
                        out.files += report.files;
                        written.push(tenant);
                    }
                    Err(e) => failed(&mut out, partition, &tenant, &e.to_string()),
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
        let progress = out.records != before.records || out.files != before.files;
        if !force || !lock(owned).has_unprojected() || !progress {
            return out;
        }
    }
}

fn failed(out: &mut Projected, partition: i32, tenant: &str, error: &str) {
    out.errors += 1;
    tracing::error!(tenant_id = %tenant, partition, error, "parquet projection failed; retrying at the next pass");
}

/// The thread's loop: every [`TICK`], a pass over every owned partition, until `stop` is
/// dropped or sent to.
pub(crate) fn run(shared: Arc<Shared>, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(TICK) {
        for (partition, owned) in shared.owned() {
            let projected = project_partition(&owned, partition, false);
            shared.metrics.projected(projected);
        }
    }
}
