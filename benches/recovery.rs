//! Recovery benchmark, no broker (run with `scripts/bench.sh recovery`): what a restarted
//! `tally ledger` does between its start and ready, at platform scale.
//!
//! Builds the data directory of P partitions holding T tenants and N records in all through
//! `PartitionLedger`, the service's own write path (each tenant on its murmur2 home partition,
//! a durable group commit per partition every 1,000 records, the state store made durable every
//! 5 s, index files merged after commits as the service's background thread does), then drops
//! every partition without a closing commit, as `kill -9` leaves them. A new process then opens
//! every partition again as the service does when they are assigned to it (as many at once as there
//! are cores), and reports the time of each open and of all of them, and the resident memory.
//!
//! The rest of a restart (process start, the broker's metadata and assignment) does not grow with
//! the data: `scripts/bench.sh pipeline` measures spawn → ready with the real binary.
//!
//! Settings: TALLY_BENCH_RECORDS (10000000), TALLY_BENCH_TENANTS (100000),
//! TALLY_BENCH_PARTITIONS (8), TALLY_BENCH_DIR (build there and keep it; when it already holds
//! the data, only time the opens: to profile them, reopen copies of a kept directory),
//! TALLY_BENCH_BUILD_ONLY (1: build, do not reopen).

use std::time::Instant;

use tally_ingest::Delivery;
use tally_ledger::service::PartitionLedger;
use tally_ledger::LedgerKey;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}

/// The delivery of event `i` of `tenant` at `offset` of `partition`: an `llm_call` of about
/// 300 bytes.
fn delivery(partition: i32, offset: i64, tenant: &str, i: u64) -> Delivery {
    let value = format!(
        r#"{{"event_id":"ev-{i:012}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","agent_id":"support-agent","action":"gpt-large-2026","decision":"allow","usage":{{"input_tokens":{},"output_tokens":{}}},"cost":{{"amount_micros":{},"currency":"USD"}}}}"#,
        1000 + i % 997,
        200 + i % 101,
        1 + i % 5000
    )
    .into_bytes();
    let outcome = tally_schemas::decode_message(Some(tenant.as_bytes()), &value, &[]);
    if let Err(rejection) = &outcome {
        panic!("the bench's event is invalid: {rejection:?}");
    }
    Delivery { partition, offset, timestamp_ms: Some(1_790_000_000_000 + offset), key: Some(tenant.as_bytes().to_vec()), value, headers: vec![], outcome }
}

fn main() {
    let records = setting("TALLY_BENCH_RECORDS", 10_000_000);
    let tenants = setting("TALLY_BENCH_TENANTS", 100_000);
    let partitions = setting("TALLY_BENCH_PARTITIONS", 8) as i32;
    let temporary = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("TALLY_BENCH_DIR").map_or_else(|| temporary.path().to_path_buf(), std::path::PathBuf::from);
    let key_file = dir.join("bench.key");
    let key = match LedgerKey::read(&key_file) {
        Ok(key) => key,
        Err(_) => {
            std::fs::create_dir_all(&dir).unwrap();
            let key = LedgerKey::generate("bench.tally.example").unwrap();
            key.write_new(&key_file).unwrap();
            key
        }
    };
    let built = dir.join("partitions").is_dir();
    let names: Vec<String> = (0..tenants).map(|t| format!("tenant-{t:06}")).collect();
    let homes: Vec<i32> = names.iter().map(|t| tally_ingest::tenant_partition(t, partitions)).collect();

    if built {
        reopen(&dir, &key, tenants, partitions);
        return;
    }
    build(&dir, &key, &names, &homes, records, partitions);
    if setting("TALLY_BENCH_BUILD_ONLY", 0) == 1 {
        return;
    }
    // The opens run in a new process, as after a real kill -9: nothing of the build's memory,
    // the page cache as the dead process left it.
    let status = std::process::Command::new(std::env::current_exe().unwrap()).env("TALLY_BENCH_DIR", &dir).status().unwrap();
    assert!(status.success(), "the reopening process failed: {status}");
}

fn build(dir: &std::path::Path, key: &LedgerKey, names: &[String], homes: &[i32], records: u64, partitions: i32) {
    let tenants = names.len() as u64;
    let start = Instant::now();
    let mut open: Vec<PartitionLedger> = (0..partitions).map(|p| PartitionLedger::open(dir, "events", p, vec![key.clone()]).unwrap()).collect();
    let mut offsets = vec![0i64; partitions as usize];
    for i in 0..records {
        let t = (i % tenants) as usize;
        let p = homes[t] as usize;
        let applied = open[p].apply(&delivery(p as i32, offsets[p], &names[t], i)).unwrap();
        assert!(matches!(applied, tally_ledger::service::Applied::Appended { .. }), "{applied:?}");
        offsets[p] += 1;
        if offsets[p] % 1_000 == 0 {
            open[p].commit().unwrap();
            open[p].merge_index_files().unwrap();
        }
        if (i + 1) % 1_000_000 == 0 {
            eprintln!("{} records written in {:.0} s", i + 1, start.elapsed().as_secs_f64());
        }
    }
    for p in &mut open {
        p.commit().unwrap();
    }
    println!("built {partitions} partitions, {tenants} tenants, {records} records in {:.1} s", start.elapsed().as_secs_f64());
    // kill -9: no closing commit, so each partition's store is up to 5 s behind its journal.
    drop(open);
}

fn reopen(dir: &std::path::Path, key: &LedgerKey, tenants: u64, partitions: i32) {
    let before = rss_mib();
    let start = Instant::now();
    let mut each = Vec::new();
    let mut reopened = Vec::new();
    // As the service does (tally-ingest's `set_resume_positions`): one worker per core, each
    // taking the next partition.
    let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicI32::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..at_once)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let p = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if p >= partitions {
                            return done;
                        }
                        let t = Instant::now();
                        let opened = PartitionLedger::open(dir, "events", p, vec![key.clone()]).unwrap();
                        done.push((opened, t.elapsed()));
                    }
                })
            })
            .collect();
        for worker in workers {
            for (opened, took) in worker.join().unwrap() {
                reopened.push(opened);
                each.push(took);
            }
        }
    });
    let all = start.elapsed();
    let held: usize = reopened.iter().map(|p| p.tenants().len()).sum();
    let files: usize = reopened.iter().map(|p| p.ledger().index_spans().len()).sum();
    let records: u64 = reopened.iter().map(|p| p.resume_offset().unwrap_or(0) as u64).sum();
    assert_eq!(held as u64, tenants, "every tenant is back");
    println!(
        "restart after kill -9, {partitions} partitions, {tenants} tenants, {records} records: opening every partition {:.0} ms (max {:.0} ms for one; {files} index files in all); resident memory {before:.0} → {:.0} MiB",
        all.as_secs_f64() * 1e3,
        each.iter().max().unwrap().as_secs_f64() * 1e3,
        rss_mib()
    );
}
