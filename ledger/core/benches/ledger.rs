//! Ledger benchmark (run with `scripts/bench.sh ledger`): the log core as the ledger service
//! writes it, one partition journal (`Ledger`), no broker. Reports, in one run:
//! * the floors: raw SHA-256 leaf hashing of the same 300-byte entries, and Ed25519 checkpoint
//!   signatures per second;
//! * appends/s with durable group commits (one `fdatasync` each) for 1 tenant, and round-robin
//!   over 10,000 and 100,000 tenants, with checkpoints signed as the product promises them: every
//!   tenant with new records gets a signed checkpoint within 1 s (here: each changed tenant's
//!   checkpoint is signed at most once per second, as if a client read it that often; the
//!   service itself signs only when read). Each figure is given as a fraction of the SHA-256
//!   floor, with the signatures it spent;
//! * bytes on disk per entry, resident memory after the 100,000-tenant run, the time to reopen;
//! * inclusion and consistency proof latency p50/p99 read from the journal at 10^6 leaves.
//!
//! Each tenant count runs twice: with no checkpoint read (the commit path alone: the service
//! signs only when read), and with every changed tenant's checkpoint signed at most once per
//! second (as if every tenant were read that often).
//!
//! Settings: TALLY_BENCH_APPENDS (1000000), TALLY_BENCH_COMMIT (10000 appends per group commit),
//! TALLY_BENCH_TENANT_COUNTS (`1,10000,100000`), TALLY_BENCH_SIGNED (1; 0 skips the signed runs).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::{entry, env, ENTRY_BYTES};
use tally_log::merkle::{leaf_hash, verify_consistency, verify_inclusion};
use tally_log::{Ledger, LedgerKey, TenantEntries};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}

/// What one run of appends did.
struct Run {
    rate: f64,
    commits: u64,
    signatures: u64,
    bytes_per_entry: f64,
    /// Share of the run spent merging index files.
    merging: f64,
}

/// Appends `n` entries round-robin over `tenants`, a durable group commit every `commit_every`,
/// and after each commit signs the checkpoint of every changed tenant not signed in the last
/// second. Leaves the ledger in `dir`.
fn run(dir: &std::path::Path, key: &LedgerKey, tenants: u64, n: u64, commit_every: u64, sign: bool) -> (Ledger, Run) {
    let mut ledger = Ledger::open(dir, vec![key.clone()]).unwrap();
    let names: Vec<String> = (0..tenants).map(|t| format!("t{t:06}")).collect();
    let mut signed_at: HashMap<String, Instant> = HashMap::new();
    let mut buf = Vec::with_capacity(ENTRY_BYTES);
    let (mut commits, mut signatures) = (0u64, 0u64);
    let mut merge_time = Duration::ZERO;
    let mut sign_changed = |ledger: &mut Ledger, changed: Vec<String>, signatures: &mut u64| {
        if !sign {
            return;
        }
        let now = Instant::now();
        for tenant in changed {
            if signed_at.get(&tenant).is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1)) {
                std::hint::black_box(ledger.checkpoint_note(&tenant).unwrap());
                *signatures += 1;
                signed_at.insert(tenant, now);
            }
        }
    };
    let start = Instant::now();
    for i in 0..n {
        entry(i, &mut buf);
        ledger.append(&names[(i % tenants) as usize], &buf).unwrap();
        if (i + 1) % commit_every == 0 {
            let changed = ledger.commit(Some(i as i64 + 1)).unwrap();
            // The service merges index files on its background thread; here, in line.
            let merging = Instant::now();
            ledger.merge_indexes().unwrap();
            merge_time += merging.elapsed();
            commits += 1;
            sign_changed(&mut ledger, changed, &mut signatures);
        }
    }
    let changed = ledger.commit(Some(n as i64)).unwrap();
    commits += 1;
    sign_changed(&mut ledger, changed, &mut signatures);
    let elapsed = start.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    let merging = merge_time.as_secs_f64() / elapsed.as_secs_f64();
    let bytes_per_entry = dir_bytes(&dir.join(tally_log::JOURNAL_DIR)) as f64 / n as f64;
    (ledger, Run { rate, commits, signatures, bytes_per_entry, merging })
}

fn proofs(ledger: &Ledger, tenant: &str, label: &str) {
    let log = ledger.tenant(tenant);
    let n = log.size();
    let root = log.root_at(n).unwrap();
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
        "proofs at {label} leaves (10,000 each, read from the journal): inclusion p50 {:?} p99 {:?}; consistency p50 {:?} p99 {:?}",
        percentile(&mut inclusion, 0.5),
        percentile(&mut inclusion, 0.99),
        percentile(&mut consistency, 0.5),
        percentile(&mut consistency, 0.99)
    );
}

fn main() {
    let n = env("TALLY_BENCH_APPENDS", 1_000_000);
    let commit_every = env("TALLY_BENCH_COMMIT", 10_000);
    let mut buf = Vec::with_capacity(ENTRY_BYTES);

    // Floor: hashing alone.
    let start = Instant::now();
    let mut acc = 0u8;
    for i in 0..n {
        entry(i, &mut buf);
        acc ^= leaf_hash(&buf)[0];
    }
    let sha_rate = n as f64 / start.elapsed().as_secs_f64();
    println!("raw SHA-256 leaf hashing, {ENTRY_BYTES}-byte entries: {sha_rate:.0}/s ({:.0} MB/s) [{acc}]", sha_rate * ENTRY_BYTES as f64 / 1e6);

    // Floor: signing a tenant checkpoint (one key).
    let key = LedgerKey::generate("bench.tally.example").unwrap();
    let signers: Vec<_> = (0..1000).map(|t| key.signer_for(&format!("t{t:06}")).unwrap()).collect();
    let checkpoint = |t: usize| tally_log::Checkpoint { origin: format!("bench.tally.example/t/t{t:06}"), size: t as u64 + 1, root: [t as u8; 32] };
    let start = Instant::now();
    let signed = 20_000;
    for i in 0..signed {
        std::hint::black_box(checkpoint(i % 1000).sign(std::slice::from_ref(&signers[i % 1000])).unwrap());
    }
    let sign_rate = signed as f64 / start.elapsed().as_secs_f64();
    println!("Ed25519 checkpoint signatures: {sign_rate:.0}/s");

    let counts = std::env::var("TALLY_BENCH_TENANT_COUNTS").unwrap_or_else(|_| "1,10000,100000".into());
    for tenants in counts.split(',').filter_map(|c| c.trim().parse::<u64>().ok()) {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, r) = run(dir.path(), &key, tenants, n, commit_every, false);
        println!(
            "appends, {tenants} tenant(s), durable group commit every {commit_every} ({} commits, one fdatasync each), no checkpoint read: {:.0}/s = {:.2} of the SHA-256 floor; {:.1} bytes on disk per entry; {:.1}% of the run merging index files",
            r.commits,
            r.rate,
            r.rate / sha_rate,
            r.bytes_per_entry,
            r.merging * 100.0
        );
        if tenants == 100_000 {
            println!("resident memory with {tenants} tenants open: {:.0} MiB", rss_mib());
        }
        if env("TALLY_BENCH_SIGNED", 1) == 0 {
            reopen(ledger, dir.path(), &key, tenants, n);
            continue;
        }
        let signed_dir = tempfile::tempdir().unwrap();
        let (_, s) = run(signed_dir.path(), &key, tenants, n, commit_every, true);
        println!(
            "appends, {tenants} tenant(s), the same, each changed tenant's checkpoint signed ≤ 1/s: {:.0}/s = {:.2} of the SHA-256 floor; {} signatures ({:.0}% of the run at the measured signing rate)",
            s.rate,
            s.rate / sha_rate,
            s.signatures,
            100.0 * (s.signatures as f64 / sign_rate) / (n as f64 / s.rate)
        );
        if tenants == 1 {
            proofs(&ledger, "t000000", &n.to_string());
        }
        reopen(ledger, dir.path(), &key, tenants, n);
    }
}

/// Closes the ledger and times opening it again.
fn reopen(ledger: Ledger, dir: &std::path::Path, key: &LedgerKey, tenants: u64, n: u64) {
    drop(ledger);
    let before = rss_mib();
    let start = Instant::now();
    let reopened = Ledger::open(dir, vec![key.clone()]).unwrap();
    let took = start.elapsed();
    println!(
        "reopen of {tenants} tenant(s), {n} entries: {took:?} ({} tenants, {} index files); resident memory {before:.0} → {:.0} MiB",
        reopened.tenant_ids().len(),
        reopened.index_spans().len(),
        rss_mib()
    );
}
