//! The admission queue of one owned partition: the durable requests (authorize, release,
//! freeze, unfreeze) wait in a bounded queue that one thread per partition drains. It takes
//! every request waiting, decides them all under one acquisition of the partition's lock, makes
//! their records durable with one commit (`commit_owned`: the `fdatasync` runs without the
//! lock), and only then answers them. While it syncs, new requests queue and form the next
//! batch, so concurrent callers share commits without a blocking thread each.
//!
//! Invariants: a request's answer is sent only once the records it appended are durable (or
//! the commit's error is); requests are decided in the order they were queued; the queue holds
//! at most [`QUEUE_CAPACITY`] requests, and one more is refused ([`Enqueued::Full`]) rather than
//! waited for; a panicking request answers nothing (its caller sees its sender dropped) and the
//! thread goes on with the next. The thread holds only a weak reference to its partition and
//! ends once the partition is dropped (its queue's sender goes with it).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Weak};

use super::{commit_owned, lock, CommitTimes, OwnedPartition, PartitionLedger};

/// Most requests waiting on one partition; a burst beyond it is answered 503 `overloaded`
/// rather than holding memory and connections without bound.
pub(crate) const QUEUE_CAPACITY: usize = 4096;

/// Most requests decided under one acquisition of the partition's lock (a few µs each), so a
/// batch never holds readers of the partition for more than a millisecond or two.
const MAX_BATCH: usize = 256;

/// How a request's commit went, handed to its answer.
pub(crate) enum Durability {
    /// Its records are durable. The times of the commit that made them so, given to exactly
    /// one request of that commit (which records them in the metrics, on this thread, whether
    /// or not its caller still waits), `None` to the others and when an earlier commit already
    /// covered them.
    Durable(Option<CommitTimes>),
    /// The commit failed (logged once, with its error, for the whole batch): nothing this
    /// request appended may be reported as done. With the partition's failure, when its storage
    /// failed (the partition is then halted and opens again by itself).
    Failed(Option<String>),
}

/// What a request does once its commit is done: answers its caller.
pub(crate) type Answer = Box<dyn FnOnce(Durability) + Send>;

/// What deciding one request left to do.
pub(crate) enum Decision {
    /// Answered already (refused, failed, or nothing was appended).
    Answered,
    /// Appended `seq` to `tenant`'s log: `answer` once that is durable.
    Appended { tenant: String, seq: u64, answer: Answer },
}

/// One queued request: decides on the partition (under its lock) and says what is left.
pub(crate) type Request = Box<dyn FnOnce(&mut PartitionLedger) -> Decision + Send>;

/// Why a request was not queued.
pub(crate) enum Enqueued {
    Queued,
    /// [`QUEUE_CAPACITY`] requests already wait.
    Full,
    /// The partition's thread is gone (the partition is being dropped).
    Gone,
}

/// The sending side, kept by the partition.
pub(crate) struct AdmissionQueue {
    requests: SyncSender<Request>,
}

/// The receiving side, until its thread takes it.
pub(crate) struct Queued(Receiver<Request>);

impl AdmissionQueue {
    /// An empty queue; [`Queued::spawn`] starts the thread that drains it.
    pub(crate) fn new() -> (AdmissionQueue, Queued) {
        let (requests, queued) = sync_channel(QUEUE_CAPACITY);
        (AdmissionQueue { requests }, Queued(queued))
    }

    pub(crate) fn enqueue(&self, request: Request) -> Enqueued {
        match self.requests.try_send(request) {
            Ok(()) => Enqueued::Queued,
            Err(TrySendError::Full(_)) => Enqueued::Full,
            Err(TrySendError::Disconnected(_)) => Enqueued::Gone,
        }
    }
}

impl Queued {
    /// Starts the thread draining the queue of partition `partition`, which `owned` points to.
    pub(crate) fn spawn(self, owned: Weak<OwnedPartition>, partition: i32) -> std::io::Result<()> {
        std::thread::Builder::new().name(format!("admissions-{partition}")).spawn(move || drain(&self.0, &owned))?;
        Ok(())
    }
}

/// The thread: batch, decide, commit, answer, until the partition is gone. A panic anywhere in
/// a batch (a request, the commit, an answer) costs that batch only: its callers' senders are
/// dropped (they answer 500) and the thread goes on with the next batch.
fn drain(queued: &Receiver<Request>, owned: &Weak<OwnedPartition>) {
    while let Ok(first) = queued.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(request) => batch.push(request),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        // Dropping the batch drops its answers' senders: their callers learn the partition went.
        let Some(owned) = owned.upgrade() else { return };
        if catch_unwind(AssertUnwindSafe(|| run_batch(&owned, batch))).is_err() {
            tracing::error!("an admission batch panicked; its requests were answered as internal errors");
        }
    }
}

/// Decides `batch` under one acquisition of the partition's lock, commits once, answers.
fn run_batch(owned: &Arc<OwnedPartition>, batch: Vec<Request>) {
    let waiting: Vec<(String, u64, Answer)> = {
        let mut p = lock(owned);
        batch
            .into_iter()
            .filter_map(|request| match catch_unwind(AssertUnwindSafe(|| request(&mut p))) {
                Ok(Decision::Appended { tenant, seq, answer }) => Some((tenant, seq, answer)),
                Ok(Decision::Answered) => None,
                Err(_) => {
                    tracing::error!("an admission request panicked; answered as an internal error");
                    None
                }
            })
            .collect()
    };
    if waiting.is_empty() {
        return;
    }
    let covered = |p: &PartitionLedger, waiting: &[(String, u64, Answer)]| waiting.iter().all(|(tenant, seq, _)| p.committed_size(tenant) > *seq);
    // One commit for the batch, unless an earlier commit (the consume loop's, or a retry's first
    // record) already covers every record in it.
    let committed = commit_owned(owned, false, |p| covered(p, &waiting));
    // Whatever the commit says, an answer says "durable" only for records the log now holds: a
    // commit by someone else that failed in between drops the batch's unsynced records, and a
    // commit after it can then succeed with nothing to write.
    let durable = committed.as_ref().is_ok() && covered(&lock(owned), &waiting);
    match committed {
        Ok(done) if durable => {
            let mut times = done.map(|(_, times)| times);
            for (_, _, answer) in waiting {
                answer(Durability::Durable(times.take()));
            }
        }
        outcome => {
            let error = outcome.err().map_or_else(|| "the records were dropped by a failed commit".to_string(), |e| e.to_string());
            tracing::error!(error = %error, requests = waiting.len(), "an admission commit failed");
            // A failed commit stops the partition (it is halted and opened again): its reason,
            // when it is the storage, tells the callers to come back.
            let storage = lock(owned).failure().map(str::to_string);
            for (_, _, answer) in waiting {
                answer(Durability::Failed(storage.clone()));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::mpsc::channel;
    use std::time::Duration;

    use super::*;
    use crate::service::partition::test_delivery;
    use crate::service::Applied;

    fn partition(dir: &std::path::Path) -> Arc<OwnedPartition> {
        let key = tally_log::LedgerKey::generate("tally.example.com").unwrap();
        let p = PartitionLedger::open(dir, "events", 0, vec![key]).unwrap();
        let projection = tally_projection::Projection::new(&dir.join("parquet"), "events-0", Duration::from_secs(1));
        OwnedPartition::new(0, p, projection).unwrap()
    }

    /// A request appending event `offset` of `tenant`, reporting what it saw when answered:
    /// its seq, whether its commit's times came with it, and the tenant's committed size then.
    fn append(offset: i64, tenant: &'static str, owned: &Arc<OwnedPartition>, answers: std::sync::mpsc::Sender<(u64, bool, u64)>) -> Request {
        let weak = Arc::downgrade(owned);
        Box::new(move |p: &mut PartitionLedger| match p.apply(&test_delivery(offset, tenant, &format!("e{offset}"), 1)).unwrap() {
            Applied::Appended { seq, .. } => Decision::Appended {
                tenant: tenant.to_string(),
                seq,
                answer: Box::new(move |durability| {
                    let Durability::Durable(times) = durability else { panic!("the commit failed") };
                    let committed = lock(&weak.upgrade().unwrap()).committed_size(tenant);
                    answers.send((seq, times.is_some(), committed)).unwrap();
                }),
            },
            other => panic!("not appended: {other:?}"),
        })
    }

    /// Fills `queue` with requests that do nothing while its partition's lock is held elsewhere,
    /// until it refuses one twice, 100 ms apart (the thread has taken its one batch and waits
    /// for the lock); returns how many it took.
    pub(crate) fn fill_while_held(queue: &AdmissionQueue) -> usize {
        let mut queued = 0;
        loop {
            let before = queued;
            while matches!(queue.enqueue(Box::new(|_| Decision::Answered)), Enqueued::Queued) {
                queued += 1;
            }
            if queued == before && queued > 0 {
                return queued;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn requests_waiting_together_are_decided_in_order_and_answered_after_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let owned = partition(dir.path());
        let (answers, answered) = channel();
        // Held while the requests queue, so the thread takes them as one batch.
        let guard = lock(&owned);
        for offset in 0..10 {
            assert!(matches!(owned.admissions.enqueue(append(offset, "acme", &owned, answers.clone())), Enqueued::Queued));
        }
        // The thread may have taken the first request already and wait for the lock with it.
        std::thread::sleep(Duration::from_millis(50));
        drop(guard);
        let got: Vec<(u64, bool, u64)> = (0..10).map(|_| answered.recv_timeout(Duration::from_secs(20)).unwrap()).collect();
        let seqs: Vec<u64> = got.iter().map(|a| a.0).collect();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "decided and answered in queue order");
        for (seq, _, committed) in &got {
            assert!(committed > seq, "seq {seq} answered before it was durable (committed size {committed})");
        }
        // At most two commits: one for a first request taken before the lock was held, one for
        // the rest; each commit's times go to exactly one of its requests.
        let commits = got.iter().filter(|a| a.1).count();
        assert!((1..=2).contains(&commits), "{commits} commits for 10 requests");
    }

    #[test]
    fn a_record_dropped_by_someone_elses_failed_commit_is_never_answered_durable() {
        let dir = tempfile::tempdir().unwrap();
        let owned = partition(dir.path());
        let (decided, was_decided) = channel();
        let (outcome, answered) = channel();
        // The commit gate is ours: the thread decides, then waits for it.
        let gate = owned.commits.lock().unwrap();
        let request: Request = Box::new(move |p: &mut PartitionLedger| {
            // An admission moves no consumer offset, so a commit after the failed one has
            // nothing to write and succeeds.
            let request = crate::budget::AuthorizeRequest {
                task_id: None,
                agent_id: None,
                action: None,
                kind: None,
                estimate_micros: 1,
                estimated_tokens: None,
                ttl_ms: 60_000,
            };
            let caller = crate::service::Caller { token: None, idempotency_key: None };
            let seq = p.authorize("acme", jiff::Timestamp::now(), &request, &caller).unwrap().seq;
            decided.send(()).unwrap();
            Decision::Appended {
                tenant: "acme".into(),
                seq,
                answer: Box::new(move |durability| {
                    outcome
                        .send(match durability {
                            Durability::Durable(_) => None,
                            Durability::Failed(why) => Some(why),
                        })
                        .unwrap()
                }),
            }
        });
        assert!(matches!(owned.admissions.enqueue(request), Enqueued::Queued));
        was_decided.recv_timeout(Duration::from_secs(20)).unwrap();
        // Another commit (the consume loop's) carries the record and its sync fails: the record
        // is dropped, the partition stops taking writes.
        let written = lock(&owned).write_commit(false).unwrap();
        let failed = Err(crate::error::Error::Service("injected fsync failure".into()));
        assert!(lock(&owned).finish_commit(written, failed).is_err());
        drop(gate);
        let failed = answered.recv_timeout(Duration::from_secs(20)).unwrap();
        let why = failed.expect("answered durable for a record the log dropped");
        // With the partition's failure: the caller is told the storage failed (503
        // storage_unavailable), not an internal error.
        assert!(why.is_some_and(|why| why.contains("injected fsync failure")));
        assert_eq!(lock(&owned).committed_size("acme"), 0);
    }

    #[test]
    fn a_panicking_request_answers_nothing_and_the_next_is_still_served() {
        let dir = tempfile::tempdir().unwrap();
        let owned = partition(dir.path());
        let (answers, answered) = channel();
        let boom: Request = Box::new(|_| panic!("a bug in one request"));
        assert!(matches!(owned.admissions.enqueue(boom), Enqueued::Queued));
        // A panic after the commit, in an answer, costs its batch only, not the thread.
        let late_boom: Request = Box::new(|p: &mut PartitionLedger| {
            let Applied::Appended { seq, .. } = p.apply(&test_delivery(0, "globex", "g0", 1)).unwrap() else { panic!("not appended") };
            Decision::Appended { tenant: "globex".into(), seq, answer: Box::new(|_| panic!("a bug in an answer")) }
        });
        assert!(matches!(owned.admissions.enqueue(late_boom), Enqueued::Queued));
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(owned.admissions.enqueue(append(1, "acme", &owned, answers)), Enqueued::Queued));
        let (seq, _, committed) = answered.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!((seq, committed), (0, 1));
    }

    #[test]
    fn a_full_queue_refuses_rather_than_waits() {
        let dir = tempfile::tempdir().unwrap();
        let owned = partition(dir.path());
        let guard = lock(&owned);
        let queued = fill_while_held(&owned.admissions);
        // The thread holds one batch (waiting for the lock) outside the queue.
        assert!((QUEUE_CAPACITY + 1..=QUEUE_CAPACITY + MAX_BATCH).contains(&queued), "{queued} queued");
        assert!(matches!(owned.admissions.enqueue(Box::new(|_| Decision::Answered)), Enqueued::Full));
        drop(guard);
    }

    #[test]
    fn the_thread_ends_with_its_partition() {
        let dir = tempfile::tempdir().unwrap();
        let owned = partition(dir.path());
        let (sender, weak) = (owned.admissions.requests.clone(), Arc::downgrade(&owned));
        drop(owned);
        assert!(weak.upgrade().is_none(), "nothing else holds the partition");
        // The thread's receiver is gone once it has seen the partition's sender dropped; ours
        // keeps the channel open, so what ends it is the failed upgrade at its next request.
        let (done, finished) = channel::<()>();
        let probe: Request = Box::new(move |_| {
            let _ = done.send(());
            Decision::Answered
        });
        let _ = sender.try_send(probe);
        assert!(finished.recv_timeout(Duration::from_secs(5)).is_err(), "a request ran on a dropped partition");
    }
}
