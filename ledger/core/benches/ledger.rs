//! Ledger benchmark (run with `scripts/bench.sh ledger`). Reports, in one run:
//! * the floor: raw SHA-256 leaf hashing of the same 300-byte entries;
//! * appends/s on one core with group commit, one tenant, and the fraction of that floor;
//! * appends/s spread over many tenants: a file set per tenant (`TenantLog`, the pre-journal
//!   layout) beside one partition journal (`Ledger`);
//! * inclusion and consistency proof latency p50/p99 read from disk at 10^6 leaves (and at
//!   TALLY_BENCH_LARGE leaves when set);
//! * bytes on disk per entry, and the time to reopen the log.
//!
//! Settings: TALLY_BENCH_APPENDS (1000000), TALLY_BENCH_TENANTS (5000), TALLY_BENCH_LARGE (unset).

mod support;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::{entry, env, COMMIT_EVERY, ENTRY_BYTES};
use tally_log::merkle::{leaf_hash, verify_consistency, verify_inclusion};
use tally_log::{TenantEntries, TenantLog};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    ["entries", "hashes", "index", "head"].iter().map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0)).sum()
}

fn fill(dir: &std::path::Path, n: u64) -> (TenantLog, Duration) {
    let mut log = TenantLog::open(dir).unwrap();
    let mut buf = Vec::with_capacity(ENTRY_BYTES);
    let start = Instant::now();
    for i in 0..n {
        entry(i, &mut buf);
        log.append(&buf).unwrap();
        if (i + 1) % COMMIT_EVERY == 0 {
            log.commit().unwrap();
        }
    }
    log.commit().unwrap();
    (log, start.elapsed())
}

fn proofs(log: &TenantLog, label: &str) {
    let n = log.size();
    let root = log.root();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut inclusion = Vec::new();
    let mut consistency = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..10_000 {
        let i = rng.gen_range(0..n);
        let t = Instant::now();
        let proof = log.inclusion_proof(i, n).unwrap();
        inclusion.push(t.elapsed());
        entry(i, &mut buf);
        verify_inclusion(&leaf_hash(&buf), i, n, &proof, &root).unwrap();
        let m = rng.gen_range(1..=n);
        let t = Instant::now();
        let proof = log.consistency_proof(m, n).unwrap();
        consistency.push(t.elapsed());
        verify_consistency(m, n, &log.root_at(m).unwrap(), &root, &proof).unwrap();
    }
    println!(
        "proofs at {label} leaves (10,000 each, read from disk): inclusion p50 {:?} p99 {:?}; consistency p50 {:?} p99 {:?}",
        percentile(&mut inclusion, 0.5),
        percentile(&mut inclusion, 0.99),
        percentile(&mut consistency, 0.5),
        percentile(&mut consistency, 0.99)
    );
}

fn main() {
    let n = env("TALLY_BENCH_APPENDS", 1_000_000);
    let tenants = env("TALLY_BENCH_TENANTS", 5_000);
    let mut buf = Vec::with_capacity(ENTRY_BYTES);

    // Floor: hashing alone.
    let start = Instant::now();
    let mut acc = 0u8;
    for i in 0..n {
        entry(i, &mut buf);
        acc ^= leaf_hash(&buf)[0];
    }
    let sha = start.elapsed();
    let sha_rate = n as f64 / sha.as_secs_f64();
    println!("raw SHA-256 leaf hashing, {ENTRY_BYTES}-byte entries: {sha_rate:.0}/s ({:.0} MB/s) [{acc}]", sha_rate * ENTRY_BYTES as f64 / 1e6);

    let dir = tempfile::tempdir().unwrap();
    let (log, took) = fill(dir.path(), n);
    let rate = n as f64 / took.as_secs_f64();
    println!(
        "appends, 1 tenant, commit every {COMMIT_EVERY}: {rate:.0}/s = {:.2} of the SHA-256 floor; {:.1} bytes on disk per entry",
        rate / sha_rate,
        disk_bytes(dir.path()) as f64 / n as f64
    );
    proofs(&log, &n.to_string());
    drop(log);
    let start = Instant::now();
    let reopened = TenantLog::open(dir.path()).unwrap();
    println!("reopen of the {n}-entry log: {:?} (size {})", start.elapsed(), reopened.size());
    drop(reopened);

    // Many tenants: round-robin appends, one group commit (every tenant) per 10 appends each.
    let dir = tempfile::tempdir().unwrap();
    let mut logs: Vec<TenantLog> = (0..tenants).map(|t| TenantLog::open(&dir.path().join(format!("t{t}"))).unwrap()).collect();
    let total = (n / tenants).max(20) * tenants;
    let start = Instant::now();
    for i in 0..total {
        entry(i, &mut buf);
        logs[(i % tenants) as usize].append(&buf).unwrap();
        if (i + 1) % (tenants * 10) == 0 {
            for log in &mut logs {
                log.commit().unwrap();
            }
        }
    }
    for log in &mut logs {
        log.commit().unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    println!(
        "appends, {tenants} tenants, group commit every 10 appends per tenant, one tenant at a time: {rate:.0}/s = {:.2} of the SHA-256 floor",
        rate / sha_rate
    );
    drop(logs);

    // The same through the `Ledger` the service writes: every tenant in one partition journal,
    // one fdatasync per group commit (every 10 appends per tenant, as above).
    let dir = tempfile::tempdir().unwrap();
    let key = tally_log::LedgerKey::generate("bench.tally.example").unwrap();
    let mut ledger = tally_log::Ledger::open(dir.path(), vec![key]).unwrap();
    let names: Vec<String> = (0..tenants).map(|t| format!("t{t}")).collect();
    let start = Instant::now();
    for i in 0..total {
        entry(i, &mut buf);
        ledger.append(&names[(i % tenants) as usize], &buf).unwrap();
        if (i + 1) % (tenants * 10) == 0 {
            ledger.commit(None).unwrap();
        }
    }
    ledger.commit(None).unwrap();
    let journal = total as f64 / start.elapsed().as_secs_f64();
    println!("appends, {tenants} tenants, one partition journal (Ledger): {journal:.0}/s = {:.2}x a file set per tenant", journal / rate);
    drop(ledger);

    if let Some(large) = std::env::var("TALLY_BENCH_LARGE").ok().and_then(|v| v.parse::<u64>().ok()) {
        let dir = tempfile::tempdir().unwrap();
        let (log, took) = fill(dir.path(), large);
        println!("appends, 1 tenant, {large} entries: {:.0}/s", large as f64 / took.as_secs_f64());
        proofs(&log, &large.to_string());
    }
}
