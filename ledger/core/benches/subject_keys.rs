//! Subject key store benchmark (run with `scripts/bench.sh subject-keys`): what a commit pays to
//! make new subjects' keys durable (`SubjectKeys::persist`) in a partition that already holds
//! many keys, against the baseline of the same run: an erasure of one key in each of the same
//! shards, which writes those shards whole (what every new key cost before appends).
//!
//! Settings: TALLY_BENCH_KEYS (1000000 keys already in the store), TALLY_BENCH_NEW (100 new
//! subjects per commit), TALLY_BENCH_COMMITS (50 commits of each kind).

use std::time::{Duration, Instant};

use tally_log::{KeyRef, SubjectKeys};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

fn main() {
    let existing = env("TALLY_BENCH_KEYS", 1_000_000);
    let new_per_commit = env("TALLY_BENCH_NEW", 100);
    let commits = env("TALLY_BENCH_COMMITS", 50);
    let dir = tempfile::tempdir().unwrap();
    let mut keys = SubjectKeys::open(dir.path()).unwrap();
    let started = Instant::now();
    for i in 0..existing {
        keys.key_for(&format!("t{:05}", i % 100_000), &format!("user-{i}"), "2026-11").unwrap();
    }
    keys.persist().unwrap();
    let store_bytes = dir_bytes(dir.path());
    println!(
        "store: {existing} keys in 256 shards, {:.1} MiB ({:.0} bytes per key), built in {:.1} s",
        store_bytes as f64 / 1048576.0,
        store_bytes as f64 / existing as f64,
        started.elapsed().as_secs_f64()
    );

    let (mut append, mut rewrite) = (Vec::new(), Vec::new());
    let mut appended_bytes = 0u64;
    let mut next = existing;
    for _ in 0..commits {
        // A commit bringing `new_per_commit` new subjects: their keys are appended.
        let before = dir_bytes(dir.path());
        let mut created = Vec::new();
        for _ in 0..new_per_commit {
            let tenant = format!("t{:05}", next % 100_000);
            let subject = format!("user-{next}");
            let key = keys.key_for(&tenant, &subject, "2026-12").unwrap();
            created.push((tenant.clone(), KeyRef { shard: SubjectKeys::shard_of(&tenant, &subject), id: key.id() }));
            next += 1;
        }
        let t = Instant::now();
        keys.persist().unwrap();
        append.push(t.elapsed());
        appended_bytes += dir_bytes(dir.path()).saturating_sub(before);
        // The baseline: the same shards written whole (an erasure of one key in each).
        for (tenant, key) in &created {
            keys.forget(tenant, *key).unwrap();
        }
        let t = Instant::now();
        keys.persist().unwrap();
        rewrite.push(t.elapsed());
    }
    let total = |s: &[Duration]| s.iter().sum::<Duration>().as_secs_f64();
    let (sum_append, sum_rewrite) = (total(&append), total(&rewrite));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (a50, a99) = (percentile(&mut append, 0.5), percentile(&mut append, 0.99));
    let (r50, r99) = (percentile(&mut rewrite, 0.5), percentile(&mut rewrite, 0.99));
    println!("commits of {new_per_commit} new subjects ({commits} each):");
    println!("  append new keys (persist):        p50 {:8.2} ms  p99 {:8.2} ms", ms(a50), ms(a99));
    println!("  baseline, same shards whole:      p50 {:8.2} ms  p99 {:8.2} ms", ms(r50), ms(r99));
    println!("  ratio append / whole (total time): {:.3}", sum_append / sum_rewrite);
    println!("  bytes written per new key: {:.0}", appended_bytes as f64 / (commits * new_per_commit) as f64);
}
