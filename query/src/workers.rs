//! Where query work runs, how much of it runs at once, and how much memory it may hold.
//!
//! * Every request's DataFusion work (SQL gate, planning, execution, encoding) runs on a runtime
//!   of its own, [`Workers`], whose threads have a known, large stack ([`WORKER_STACK_BYTES`]):
//!   planning recurses over expressions, and a deep plan must fail in the gate or finish, never
//!   overflow the stack of a thread that also answers `/healthz`. The HTTP runtime only waits.
//! * Admission: at most `max_concurrent_queries` requests run at once, and at most
//!   `max_concurrent_queries_per_tenant` for one tenant (or one billing caller); one more is
//!   answered `429 too_many_queries` at once rather than queued, so a burst costs no memory.
//!   A request's slot is held by the work itself, not by the HTTP handler: work that outlives its
//!   time limit (it is aborted at its next yield point) keeps its slot until it has really ended.
//! * Memory: each query's pool ([`QueryPool`]) is limited to `query_memory_mb` and draws from one
//!   process-wide pool of `query_memory_total_mb`, so many queries together cannot exceed it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryLimit, MemoryPool, MemoryReservation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Stack of each query worker thread. Planning recursion is bounded by the SQL gate; this is the
/// margin that makes the bound safe in debug builds too.
pub const WORKER_STACK_BYTES: usize = 64 << 20;
// The SQL gate runs on these threads too, before planning.
const _: () = assert!(WORKER_STACK_BYTES >= tally_sql_gate::REQUIRED_STACK_BYTES);

/// What a query is told when the process-wide pool, not its own limit, is full.
pub const GLOBAL_POOL_BUSY: &str = "the service's memory for queries is in use by other queries";

/// The query runtime and its admission limits.
pub struct Workers {
    /// `Option` so that `Drop` can shut it down without blocking (a runtime dropped inside an
    /// async context would panic).
    runtime: Option<tokio::runtime::Runtime>,
    slots: Arc<Semaphore>,
    per_caller: usize,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

impl Workers {
    pub fn new(threads: usize, max_concurrent: usize, per_caller: usize) -> Result<Workers> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .max_blocking_threads(threads.max(1) * 4)
            .thread_stack_size(WORKER_STACK_BYTES)
            .thread_name("tally-query")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the query runtime: {e}")))?;
        Ok(Workers { runtime: Some(runtime), slots: Arc::new(Semaphore::new(max_concurrent)), per_caller, running: Arc::new(Mutex::new(HashMap::new())) })
    }

    /// Runs `work` on the query runtime for `caller` (a tenant id, or a billing principal),
    /// within `timeout`. Refuses at once when the caller or the service is at its limit.
    pub async fn run<T: Send + 'static>(&self, caller: &str, timeout: Duration, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let slot = self.admit(caller)?;
        let runtime = self.runtime.as_ref().ok_or_else(|| Error::Internal("the query runtime is shut down".into()))?;
        let handle = runtime.spawn(async move {
            let _slot = slot;
            work.await
        });
        // Aborts the work when this request ends early (time limit, or the client went away).
        let mut guard = AbortOnDrop(handle);
        match tokio::time::timeout(timeout, &mut guard.0).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) if e.is_panic() => Err(Error::Internal(format!("query work panicked: {e}"))),
            Ok(Err(e)) => Err(Error::Internal(format!("query work was cancelled: {e}"))),
            Err(_) => Err(Error::Timeout(timeout.as_millis() as u64)),
        }
    }

    fn admit(&self, caller: &str) -> Result<Slot> {
        let global =
            Arc::clone(&self.slots).try_acquire_owned().map_err(|_| Error::TooManyQueries("the service is running as many queries as it allows".into()))?;
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let count = running.entry(caller.to_string()).or_insert(0);
        if *count >= self.per_caller {
            return Err(Error::TooManyQueries(format!("at most {} queries run at once for one tenant", self.per_caller)));
        }
        *count += 1;
        Ok(Slot { _global: global, caller: caller.to_string(), running: Arc::clone(&self.running) })
    }

    /// Queries running now.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).values().sum()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running query's place in the limits; freed when the work ends.
struct Slot {
    _global: OwnedSemaphorePermit,
    caller: String,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = running.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.caller);
            }
        }
    }
}

/// One query's memory pool: at most `limit` bytes, each also taken from the process-wide pool.
#[derive(Debug)]
pub struct QueryPool {
    limit: usize,
    used: AtomicUsize,
    global: Arc<GreedyMemoryPool>,
}

impl QueryPool {
    pub fn new(limit: usize, global: Arc<GreedyMemoryPool>) -> QueryPool {
        QueryPool { limit, used: AtomicUsize::new(0), global }
    }
}

impl fmt::Display for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "query pool ({} of {} bytes used)", self.used.load(Ordering::Relaxed), self.limit)
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "tally-query"
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.global.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.global.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DfResult<()> {
        self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| used.checked_add(additional).filter(|n| *n <= self.limit)).map_err(|used| {
            DataFusionError::ResourcesExhausted(format!("the query needs {additional} more bytes; {used} of its limit of {} are in use", self.limit))
        })?;
        if let Err(e) = self.global.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!("{GLOBAL_POOL_BUSY} ({e})")));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::MemoryConsumer;

    #[test]
    fn a_query_pool_stops_at_its_limit_and_at_the_global_one() {
        let global = Arc::new(GreedyMemoryPool::new(100));
        let a: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(60, Arc::clone(&global)));
        let b: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(60, Arc::clone(&global)));
        let ra = MemoryConsumer::new("a").register(&a);
        let rb = MemoryConsumer::new("b").register(&b);
        ra.try_grow(60).unwrap();
        assert!(ra.try_grow(1).is_err(), "per-query limit");
        assert!(rb.try_grow(41).is_err(), "process-wide limit: 60 + 41 > 100");
        assert_eq!(b.reserved(), 0, "a refused grow leaves nothing behind");
        rb.try_grow(40).unwrap();
        drop(ra);
        assert_eq!(global.reserved(), 40);
        rb.try_grow(20).unwrap();
    }

    #[tokio::test]
    async fn callers_and_the_service_are_limited_and_slots_come_back() {
        let workers = Workers::new(1, 3, 2).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let hold = |rx: tokio::sync::watch::Receiver<bool>| async move {
            let mut rx = rx;
            let _ = rx.wait_for(|go| *go).await;
            Ok(())
        };
        let workers = Arc::new(workers);
        let mut held = Vec::new();
        for caller in ["acme", "acme", "globex"] {
            let (w, rx) = (Arc::clone(&workers), rx.clone());
            held.push(tokio::spawn(async move { w.run(caller, Duration::from_secs(30), hold(rx)).await }));
        }
        while workers.running() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let third = workers.run("acme", Duration::from_secs(1), async { Ok(()) }).await.unwrap_err();
        assert_eq!(third.code(), "too_many_queries", "{third}");
        let fourth = workers.run("initech", Duration::from_secs(1), async { Ok(()) }).await.unwrap_err();
        assert_eq!(fourth.code(), "too_many_queries", "{fourth}");
        tx.send(true).unwrap();
        for h in held {
            h.await.unwrap().unwrap();
        }
        assert_eq!(workers.running(), 0);
        workers.run("acme", Duration::from_secs(1), async { Ok(()) }).await.unwrap();
    }

    #[tokio::test]
    async fn work_past_its_time_limit_is_answered_and_aborted() {
        let workers = Workers::new(1, 2, 2).unwrap();
        let err = workers.run("acme", Duration::from_millis(50), async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        assert_eq!(err.await.unwrap_err().code(), "query_timeout");
        // The aborted work gives its slot back.
        for _ in 0..200 {
            if workers.running() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(workers.running(), 0);
    }
}
