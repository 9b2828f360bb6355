//! kill -9 harness: the `tally ledger` binary is SIGKILLed at random moments (at least 10 times)
//! while 100,000 events are published and consumed, and restarted each time. At the end every
//! event is in its tenant's log exactly once and in order, and every checkpoint observed along
//! the way is consistent with the final log. The Parquet projection written meanwhile holds exactly
//! the final logs' records, with no temporary file left behind.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use tally_ingest::EventPublisher;
use tally_ledger::{Checkpoint, Ledger, TenantEntries};

const EVENTS: u32 = 100_000;
const TENANTS: u32 = 100;
const PARTITIONS: i32 = 4;
/// Long enough for at least 10 kill/restart cycles to fall inside the run.
const PUBLISH_FOR: Duration = Duration::from_secs(60);

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    http_get(addr, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let broker = PrivateBroker::start();
    let kafka = broker.kafka.clone();
    let LedgerFixture { topic, dir, key_path, key } = ledger_fixture_on(&kafka, "crash", PARTITIONS).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("ledger.toml");
    // Each run joins a fresh consumer group. Where the ledger resumes never depends on the group
    // (that is what this test proves), and Tansu 0.6.0 cannot be relied on to hand a restarted
    // member its partitions while SIGKILLed members linger in the group (their sessions time
    // out, and its coordinator stalls meanwhile); tests/budget_service.rs restarts in one group.
    let write_config = |run: u32| {
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbootstrap = \"{}\"\n\
                 [ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\ngroup = \"{topic}.g{run}\"\ncommit_interval_ms = 50\nlisten = \"{addr}\"\nstatements = false\n",
                kafka.bootstrap,
                data.display(),
                key_path.display()
            ),
        )
        .unwrap();
    };
    let log = dir.path().join("ledger.log");

    // Publish in the background, paced so that the run spans all the kills.
    let publishing = {
        let kafka = kafka.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let publisher = EventPublisher::new(&kafka, &topic).unwrap();
            let mut pending = Vec::new();
            let started = Instant::now();
            for i in 0..EVENTS {
                let tenant = format!("t{:03}", i % TENANTS);
                pending.push(publisher.enqueue(Some(tenant.as_bytes()), &event_json(&tenant, &format!("e{i}"), 1), &[]).await.unwrap());
                if i % 1_000 == 999 {
                    let due = started + PUBLISH_FOR * (i + 1) / EVENTS;
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            for p in pending {
                p.await.unwrap();
            }
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(port));
    let mut observed: Vec<(String, String)> = Vec::new();
    let mut kills = 0;
    let mut ready_after = Vec::new();
    while kills < 10 || !publishing.is_finished() {
        let started = Instant::now();
        write_config(kills);
        let mut child = spawn_ledger_binary(&config, &log);
        // Most kills land while the ledger is consuming; some during its start-up.
        let alive_for = Duration::from_millis(rng.gen_range(0..2_000));
        if rng.gen_bool(0.8) {
            while !matches!(get(addr, "/readyz").await, Some((200, _))) {
                assert!(started.elapsed() < Duration::from_secs(60), "not ready after 60 s; log:\n{}", log_tail(&log));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ready_after.push(started.elapsed());
        }
        let until = Instant::now() + alive_for;
        while Instant::now() < until {
            let tenant = format!("t{:03}", rng.gen_range(0..TENANTS));
            if let Some((200, note)) = get(addr, &format!("/t/{tenant}/checkpoint")).await {
                observed.push((tenant, String::from_utf8(note).unwrap()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill(); // SIGKILL
        kills += 1;
        assert!(kills < 100, "publishing did not finish");
    }
    eprintln!("ready after restart: {ready_after:?}");
    publishing.await.unwrap();

    // A last run to the end, then SIGTERM.
    write_config(kills + 1);
    let mut child = spawn_ledger_binary(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut total = 0u64;
        for t in 0..TENANTS {
            if let Some((200, note)) = get(addr, &format!("/t/t{t:03}/checkpoint")).await {
                total += String::from_utf8(note).unwrap().lines().nth(1).unwrap().parse::<u64>().unwrap();
            }
        }
        if total == u64::from(EVENTS) {
            break;
        }
        assert!(total <= u64::from(EVENTS), "more records ({total}) than events");
        if Instant::now() >= deadline {
            panic!("only {total} of {EVENTS} recorded; ledger log tail:\n{}", log_tail(&log));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    child.terminate();

    // Every tenant's log: exactly its events, in publish order, each once.
    // Each tenant, with the index of its partition's ledger in `ledgers`.
    let mut finals: BTreeMap<String, usize> = BTreeMap::new();
    let mut ledgers = Vec::new();
    for p in 0..PARTITIONS {
        let dir = data.join("partitions").join(format!("{topic}-{p}"));
        if !dir.exists() {
            continue;
        }
        let ledger = Ledger::open_read_only(&dir, vec![key.clone()]).unwrap();
        for tenant in ledger.tenant_ids() {
            let log = ledger.tenant(&tenant);
            let n: u32 = tenant[1..].parse().unwrap();
            assert_eq!(log.size(), u64::from(EVENTS / TENANTS), "{tenant}");
            for seq in 0..log.size() {
                let record: serde_json::Value = serde_json::from_slice(&log.entry(seq).unwrap()).unwrap();
                assert_eq!(record["event"]["event_id"], format!("e{}", seq as u32 * TENANTS + n), "{tenant} seq {seq}");
            }
            finals.insert(tenant, ledgers.len());
        }
        ledgers.push(ledger);
    }
    assert_eq!(finals.len() as u32, TENANTS);

    // The Parquet projection survived every kill: no temporary file is left, and each tenant's
    // visible rows are exactly its log's records, once each, with their leaf hashes.
    let root = data.join("parquet");
    for (tenant, &at) in &finals {
        use arrow_array::{Array, FixedSizeBinaryArray, StringArray, UInt64Array};
        use tally_ledger::projection::{list_files, read_parquet, read_watermark, unit_of_tenant, Tree};
        let log = ledgers[at].tenant(tenant);
        // The tenants of a partition share its projection's files.
        let unit = unit_of_tenant(&data, tenant).unwrap();
        assert_eq!(read_watermark(&root, &unit, tenant).unwrap().next_seq, log.size(), "{tenant}'s projection is behind its log");
        let mut rows = Vec::new();
        for file in list_files(&root, Tree::Events, &unit, |_| true).unwrap() {
            for b in read_parquet(&file.path).unwrap() {
                let owner = b.column_by_name("tenant_id").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
                let seq = b.column_by_name("seq").unwrap().as_any().downcast_ref::<UInt64Array>().unwrap().clone();
                let leaf = b.column_by_name("leaf_hash").unwrap().as_any().downcast_ref::<FixedSizeBinaryArray>().unwrap().clone();
                rows.extend((0..b.num_rows()).filter(|&i| owner.value(i) == tenant).map(|i| (seq.value(i), leaf.value(i).to_vec())));
            }
        }
        rows.sort();
        assert_eq!(rows.len() as u64, log.size(), "{tenant}: projected rows");
        for (i, (seq, leaf)) in rows.iter().enumerate() {
            assert_eq!(*seq, i as u64, "{tenant}: a seq is missing or doubled in the projection");
            assert_eq!(leaf.as_slice(), tally_ledger::merkle::leaf_hash(&log.entry(*seq).unwrap()).as_slice(), "{tenant} seq {seq}");
        }
    }
    fn temporaries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .flat_map(|e| {
                if e.path().is_dir() {
                    temporaries(&e.path())
                } else if e.file_name().to_string_lossy().ends_with(".tmp") {
                    vec![e.path()]
                } else {
                    vec![]
                }
            })
            .collect()
    }
    assert_eq!(temporaries(&root), Vec::<std::path::PathBuf>::new());

    // Every checkpoint seen during the crashes is a prefix of the final log.
    let mut verified = 0;
    for (tenant, note) in &observed {
        let verifiers = vec![key.signer_for(tenant).unwrap().verifier()];
        let old = Checkpoint::open(note, &verifiers, None).unwrap();
        let log = ledgers[finals[tenant]].tenant(tenant);
        let size = log.size();
        let root = log.root_at(size).unwrap();
        if old.size == 0 {
            continue;
        }
        let proof = log.consistency_proof(old.size, size).unwrap();
        tally_ledger::merkle::verify_consistency(old.size, size, &old.root, &root, &proof)
            .unwrap_or_else(|e| panic!("{tenant}: checkpoint at {} inconsistent with the final log: {e}", old.size));
        verified += 1;
    }
    assert!(kills >= 10);
    assert!(verified > 0, "no checkpoint was observed between kills; log:\n{}", log_tail(&log));
    eprintln!("{kills} kills, {verified} observed checkpoints consistent with the final logs");
}

fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
