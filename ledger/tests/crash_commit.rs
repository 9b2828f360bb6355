//! kill -9 during a group commit that spans 10,000 tenants: nothing is lost, nothing doubled.
//!
//! The test runs itself as a child process (same binary, this test only, `TALLY_CRASH_CHILD`
//! naming the data directory). The child feeds a `PartitionLedger` deliveries `0, 1, 2, …`,
//! delivery `i` being event `e{i}` of tenant `t{i mod 10000}`, and commits every 10,000, so each
//! commit holds one record of every tenant. It prints a line just before each commit; the parent
//! SIGKILLs it a random moment after such a line, so kills land while the commit's frames are
//! written, synced or handed to the store. After each kill the parent reopens the partition and
//! checks that what is durable is exactly the deliveries below the durable next offset: every
//! tenant holds exactly its events among them, in order, each once. The child then resumes there.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tally_ingest::Delivery;
use tally_ledger::service::PartitionLedger;
use tally_ledger::{LedgerKey, TenantEntries};

const TENANTS: i64 = 10_000;
const CHILD: &str = "TALLY_CRASH_CHILD";
const KEY: &str = "key";

fn delivery(offset: i64) -> Delivery {
    let tenant = format!("t{:05}", offset % TENANTS);
    let value = format!(
        r#"{{"event_id":"e{offset}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{{"amount_micros":3,"currency":"USD"}}}}"#
    )
    .into_bytes();
    let outcome = tally_schemas::decode_message(Some(tenant.as_bytes()), &value, &[]);
    Delivery { partition: 0, offset, timestamp_ms: Some(1_700_000_000_000), key: Some(tenant.into_bytes()), value, headers: vec![], outcome }
}

fn open(dir: &Path) -> PartitionLedger {
    let key = LedgerKey::parse(&std::fs::read_to_string(dir.join(KEY)).unwrap()).unwrap();
    PartitionLedger::open(dir, "events", 0, vec![key]).unwrap()
}

/// The child: applies and commits until killed (or for at most a minute, should the parent die).
fn child(dir: &Path) {
    let mut p = open(dir);
    let mut next = p.resume_offset().unwrap_or(0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        for offset in next..next + TENANTS {
            p.apply(&delivery(offset)).unwrap();
        }
        next += TENANTS;
        println!("commit {next}");
        p.commit().unwrap();
    }
}

/// What is durable must be exactly the deliveries below the durable next offset.
fn check(dir: &Path) -> i64 {
    let p = open(dir);
    let next = p.resume_offset().unwrap_or(0);
    assert_eq!(next % TENANTS, 0, "a commit holds whole rounds of deliveries, so progress does too");
    let per_tenant = (next / TENANTS) as u64;
    for t in 0..TENANTS {
        let tenant = format!("t{t:05}");
        assert_eq!(p.committed_size(&tenant), per_tenant, "{tenant} after next offset {next}");
    }
    // Every record of a sample of tenants is its own event, in order, each once.
    for t in (0..TENANTS).step_by(997) {
        let tenant = format!("t{t:05}");
        let log = p.ledger().tenant(&tenant);
        for seq in 0..per_tenant {
            let record: serde_json::Value = serde_json::from_slice(&log.entry(seq).unwrap()).unwrap();
            assert_eq!(record["event"]["event_id"], format!("e{}", seq as i64 * TENANTS + t), "{tenant} seq {seq}");
        }
    }
    next
}

#[test]
fn kill_9_during_a_ten_thousand_tenant_commit_loses_and_doubles_nothing() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(KEY), LedgerKey::generate("tally.example.com").unwrap().to_text().unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id().into());
    let mut progress = Vec::new();
    for kill in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["kill_9_during_a_ten_thousand_tenant_commit_loses_and_doubles_nothing", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let a few commits through, then kill one while it is under way.
        let commits = rng.gen_range(1..=3);
        let mut seen = 0;
        while seen < commits {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("commit ") => seen += 1,
                Some(Ok(_)) => {}
                other => panic!("kill {kill}: the child ended early: {other:?}"),
            }
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..30_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        progress.push(check(dir.path()));
    }
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "durable progress never goes back: {progress:?}");
    assert!(*progress.last().unwrap() >= TENANTS, "commits became durable between kills: {progress:?}");
    eprintln!("6 kills during 10,000-tenant commits; durable next offsets {progress:?}");
}
