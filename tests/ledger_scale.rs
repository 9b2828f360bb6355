//! A hundred thousand tenants through `tally ledger` from the broker, one instance, the default
//! descriptor limit: 3 events each. Every tenant ends with a log of 3 records whose checkpoint,
//! as the service serves it, is signed at size 3; the process's open descriptors are sampled
//! throughout and must stay under 1,000 (tenants are keys in a partition journal, not files).
//! `TALLY_SCALE_TENANTS` overrides the tenant count.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;
use tally_ledger::{Checkpoint, Ledger};

const PARTITIONS: i32 = 4;
const ROUNDS: usize = 3;
const MAX_DESCRIPTORS: usize = 1_000;

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_tenants_through_the_ledger_cost_no_descriptors() {
    let tenants: usize = std::env::var("TALLY_SCALE_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let broker = PrivateBroker::start();
    let kafka = broker.kafka.clone();
    let LedgerFixture { topic, dir, key_path, key } = ledger_fixture_on(&kafka, "scale", PARTITIONS).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("ledger.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap = \"{}\"\n[ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\ngroup = \"{topic}.g\"\nlisten = \"{addr}\"\nstatements = false\n",
            kafka.bootstrap,
            data.display(),
            key_path.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let mut pending = Vec::with_capacity(tenants * ROUNDS);
    for round in 0..ROUNDS {
        for t in 0..tenants {
            let tenant = format!("t{t:06}");
            pending.push(publisher.enqueue(Some(tenant.as_bytes()), &event_json(&tenant, &format!("e{round}"), 1), &[]).await.unwrap());
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let published_in = started.elapsed();

    let log = dir.path().join("ledger.log");
    let mut ledger = spawn_ledger_binary(&config, &log);
    let pid = ledger.id();
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    let expected = (tenants * ROUNDS) as f64;
    loop {
        peak = peak.max(descriptors(pid));
        let accepted = match http_get(addr, "/metrics").await {
            Some((200, body)) => metric_sum(&String::from_utf8_lossy(&body), "tally_ledger_events_accepted_total"),
            _ => 0.0,
        };
        if accepted >= expected {
            break;
        }
        assert!(Instant::now() < deadline, "{accepted} of {expected} events accepted; ledger log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The last commit: everything accepted is durable within a commit interval.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let consumed_in = started.elapsed() - published_in;
    // Checkpoints as served, for a sample of tenants across every partition.
    let step = (tenants / 1_000).max(1);
    for t in (0..tenants).step_by(step) {
        let tenant = format!("t{t:06}");
        let (status, body) = http_get(addr, &format!("/t/{tenant}/checkpoint")).await.expect("the ledger answers");
        assert_eq!(status, 200, "{tenant}: {}", String::from_utf8_lossy(&body));
        let vkey = key.signer_for(&tenant).unwrap().verifier();
        let checkpoint = Checkpoint::open(&String::from_utf8(body).unwrap(), &[vkey], None).unwrap();
        assert_eq!(checkpoint.size, ROUNDS as u64, "{tenant}");
    }
    peak = peak.max(descriptors(pid));
    ledger.kill();

    // Every tenant, from the journals the service wrote: 3 records, its checkpoint at size 3.
    let mut seen = 0;
    for p in 0..PARTITIONS {
        let dir = data.join("partitions").join(format!("{topic}-{p}"));
        let journal = Ledger::open_read_only(&dir, vec![key.clone()]).unwrap();
        for tenant in journal.tenant_ids() {
            let (checkpoint, _) = journal.checkpoint(&tenant).unwrap();
            assert_eq!(checkpoint.size, ROUNDS as u64, "{tenant}");
            seen += 1;
        }
    }
    assert_eq!(seen, tenants);
    eprintln!("{tenants} tenants × {ROUNDS} events: published in {published_in:?}, consumed and committed in {consumed_in:?}, peak open descriptors of tally ledger {peak}");
    assert!(peak < MAX_DESCRIPTORS, "tally ledger held {peak} descriptors for {tenants} tenants");
}
