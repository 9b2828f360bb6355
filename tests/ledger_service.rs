//! The ledger service against the real broker: retries recorded once, a conflict kept, bad input
//! dead-lettered without stopping anything, checkpoints served over HTTP within the commit
//! interval, receipts that verify, a restart that doubles nothing, and a replay from scratch that
//! yields byte-identical logs.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;
use tally_ledger::{Checkpoint, NoteVerifier, Receipt};

/// A minimal HTTP/1.0 GET (the test needs no client library): (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    http_get(addr, path).await.expect("ledger answers")
}

async fn start(data: &Path, key: &Path, topic: &str, group: &str) -> Running {
    start_ledger(data, key, topic, group, 100).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_records_each_event_once_and_replays_identically() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, key } = ledger_fixture("ledger", 4).await;

    // 1,000 events for 20 tenants, every 20th resent (a producer retry), one conflicting reuse of
    // an id, and 10 bad messages.
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let producer = raw_producer(&kafka);
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut pending = Vec::new();
    for i in 0..1_000u32 {
        let tenant = format!("t{:02}", i % 20);
        let id = format!("e{i}");
        let value = event_json(&tenant, &id, 100);
        pending.push(publisher.enqueue(Some(tenant.as_bytes()), &value, &[]).await.unwrap());
        if i % 20 == 0 {
            pending.push(publisher.enqueue(Some(tenant.as_bytes()), &value, &[]).await.unwrap());
        }
        expected.entry(tenant).or_default().push(id);
        if i % 100 == 0 {
            send_raw(&producer, &topic, Some(b"t00"), b"{truncated", &[]).await;
        }
    }
    pending.push(publisher.enqueue(Some(b"t07"), &event_json("t07", "e7", 999), &[]).await.unwrap());
    expected.get_mut("t07").unwrap().push("e7 (conflict)".into());
    for p in pending {
        p.await.unwrap();
    }
    let sizes: BTreeMap<String, u64> = expected.iter().map(|(t, ids)| (t.clone(), ids.len() as u64)).collect();

    let data = dir.path().join("data");
    let service = start(&data, &key_path, &topic, &format!("{topic}.a")).await;
    service.wait_for(&sizes).await;

    // Each tenant's log holds exactly its distinct events, in order; t07 ends with the conflict.
    for (tenant, ids) in &expected {
        for (seq, id) in ids.iter().enumerate() {
            let (status, body) = get(service.addr, &format!("/v1/tenants/{tenant}/records/{seq}")).await;
            assert_eq!(status, 200);
            let record: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let want = id.trim_end_matches(" (conflict)");
            assert_eq!(record["event"]["event_id"], want, "{tenant} seq {seq}");
            assert_eq!(record["type"], if id.ends_with("(conflict)") { "conflict" } else { "event" });
            assert_eq!(record["seq"], seq as u64);
        }
    }
    // Receipts verify against the tenant's vkey; the metrics count what happened.
    let vkey = NoteVerifier::parse(&key.signer_for("t03").unwrap().verifier().vkey()).unwrap();
    let (_, receipt) = get(service.addr, "/v1/tenants/t03/receipt/17").await;
    let (_, entry) = get(service.addr, "/v1/tenants/t03/records/17").await;
    let receipt = Receipt::parse(std::str::from_utf8(&receipt).unwrap()).unwrap();
    receipt.verify(&entry, std::slice::from_ref(&vkey), Some("tally.example.com/t/t03")).unwrap();
    let (_, metrics) = get(service.addr, "/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    let (status, by_event) = get(service.addr, "/v1/tenants/t03/receipt?event_id=e343").await;
    assert_eq!(status, 200, "receipt by event id");
    assert_eq!(Receipt::parse(std::str::from_utf8(&by_event).unwrap()).unwrap().index, 17);
    for (name, value) in [
        ("tally_ledger_events_accepted_total", 1000.0),
        ("tally_ledger_events_deduplicated_total", 50.0),
        ("tally_ledger_conflicts_total", 1.0),
        // Labelled by reject code: the sum over every reason.
        ("tally_ledger_dead_lettered_total", 10.0),
        ("tally_ledger_checkpoint_lag_seconds", 0.0),
    ] {
        assert!(metrics.contains(name) && metric_sum(&metrics, name) == value, "{name} is not {value} in:\n{metrics}");
    }
    let (status, body) = get(service.addr, "/t/..%2Fetc/checkpoint").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = get(service.addr, "/t/nobody/checkpoint").await;
    assert_eq!(status, 404);
    let (_, old_note) = get(service.addr, "/t/t03/checkpoint").await;
    service.stop().await;

    // Restart on the same state: 100 more events; nothing already recorded is recorded again.
    let service = start(&data, &key_path, &topic, &format!("{topic}.a")).await;
    let mut more = Vec::new();
    for i in 1_000..1_100u32 {
        let tenant = format!("t{:02}", i % 20);
        more.push(publisher.enqueue(Some(tenant.as_bytes()), &event_json(&tenant, &format!("e{i}"), 100), &[]).await.unwrap());
        expected.get_mut(&tenant).unwrap().push(format!("e{i}"));
    }
    for p in more {
        p.await.unwrap();
    }
    let sizes: BTreeMap<String, u64> = expected.iter().map(|(t, ids)| (t.clone(), ids.len() as u64)).collect();
    service.wait_for(&sizes).await;
    // The new checkpoint provably extends the one served before the restart.
    let old = Checkpoint::open(std::str::from_utf8(&old_note).unwrap(), std::slice::from_ref(&vkey), None).unwrap();
    let (_, new_note) = get(service.addr, "/t/t03/checkpoint").await;
    let new = Checkpoint::open(std::str::from_utf8(&new_note).unwrap(), std::slice::from_ref(&vkey), None).unwrap();
    let (_, proof) = get(service.addr, &format!("/v1/tenants/t03/consistency?old={}&new={}", old.size, new.size)).await;
    let proof: Vec<[u8; 32]> = std::str::from_utf8(&proof)
        .unwrap()
        .lines()
        .map(|l| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(l).unwrap().try_into().unwrap()
        })
        .collect();
    tally_ledger::merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &proof).unwrap();
    service.stop().await;

    // Replay: a fresh ledger over the same topic yields byte-identical entries and checkpoints.
    let replay = dir.path().join("replay");
    let service = start(&replay, &key_path, &topic, &format!("{topic}.b")).await;
    service.wait_for(&sizes).await;
    service.stop().await;
    // Journals may group commits differently; each tenant's log and checkpoint must not differ.
    use tally_ledger::TenantEntries as _;
    let key = tally_ledger::LedgerKey::read(&key_path).unwrap();
    let mut compared = 0;
    for p in 0..4 {
        let part = format!("partitions/{topic}-{p}");
        if !data.join(&part).exists() {
            continue;
        }
        let a = tally_ledger::Ledger::open_read_only(&data.join(&part), vec![key.clone()]).unwrap();
        let b = tally_ledger::Ledger::open_read_only(&replay.join(&part), vec![key.clone()]).unwrap();
        assert_eq!(a.tenant_ids(), b.tenant_ids());
        for t in a.tenant_ids() {
            let (la, lb) = (a.tenant(&t), b.tenant(&t));
            assert_eq!(la.size(), lb.size(), "{t}");
            for seq in 0..la.size() {
                assert!(la.entry(seq).unwrap() == lb.entry(seq).unwrap(), "entry {seq} of {t} differs after replay");
            }
            assert_eq!(a.checkpoint_note(&t).unwrap(), b.checkpoint_note(&t).unwrap(), "checkpoint of {t} differs after replay");
            compared += 1;
        }
    }
    assert_eq!(compared, 20);
}

/// An instance left without partitions leaves and rejoins the group after `rejoin_after_ms`
/// (the guard against brokers that never give a rejoined member its assignment back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_partitions_rejoins_the_group() {
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("rejoin", 1).await;
    let group = format!("{topic}.g");
    let data = dir.path().join("data");
    let mut config = ledger_config(&data, &key_path, &topic, &group, 100);
    config.assignment = tally_ledger::service::AssignmentMode::Group;
    let first = start_service(config).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(first.addr, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "first instance never got the partition");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut config = ledger_config(&data, &key_path, &topic, &group, 100);
    config.assignment = tally_ledger::service::AssignmentMode::Group;
    config.rejoin_after_ms = 1_000;
    let second = start_service(config).await;
    loop {
        let (_, metrics) = http_get(second.addr, "/metrics").await.unwrap_or_default();
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        if !metrics.contains("tally_ledger_rejoins_total 0") && metrics.contains("tally_ledger_rejoins_total") {
            break;
        }
        assert!(Instant::now() < deadline, "the idle instance never rejoined:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    second.stop().await;
    first.stop().await;
}

/// SIGTERM exits even when the broker is gone (librdkafka would otherwise wait to leave the
/// group forever): the durable state is written first, and the process gives up after 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_even_without_a_broker() {
    let broker = PrivateBroker::start();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture_on(&broker.kafka, "term", 1).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("ledger.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap = \"{}\"\n[ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\nlisten = \"127.0.0.1:{port}\"\nstatements = false\n",
            broker.kafka.bootstrap,
            dir.path().join("data").display(),
            key_path.display()
        ),
    )
    .unwrap();
    let mut ledger = spawn_ledger_binary(&config, &dir.path().join("ledger.log"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(addr, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "ledger never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(broker);
    let started = Instant::now();
    ledger.terminate();
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
}

/// Without a consumer group (`assignment = "assign"`, the default) an instance reads exactly the
/// partitions it is given: with `partitions = [1]` only partition 1's tenants are recorded and
/// the others are not served; started again over all partitions it records the rest and doubles
/// nothing, without a group to join or a session to outwait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_instance_reads_exactly_its_partitions() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("assign", 3).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    // Two tenants per partition, three events each.
    let mut by_partition: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let tenant = format!("as{i}");
        let p = tally_ingest::tenant_partition(&tenant, 3);
        let list = by_partition.entry(p).or_default();
        if list.len() < 2 {
            list.push(tenant);
        }
        if by_partition.len() == 3 && by_partition.values().all(|l| l.len() == 2) {
            break;
        }
    }
    for tenant in by_partition.values().flatten() {
        for e in 0..3 {
            publisher.publish(Some(tenant.as_bytes()), &event_json(tenant, &format!("e{e}"), 10), &[]).await.unwrap();
        }
    }
    let data = dir.path().join("data");
    let mut config = ledger_config(&data, &key_path, &topic, "unused", 100);
    config.partitions = Some(vec![1]);
    let only_one = start_service(config).await;
    let ones: BTreeMap<String, u64> = by_partition[&1].iter().map(|t| (t.clone(), 3)).collect();
    only_one.wait_for(&ones).await;
    let (status, body) = get(only_one.addr, "/readyz").await;
    assert_eq!((status, String::from_utf8_lossy(&body).lines().next().unwrap_or_default()), (200, "ready: 1 partitions"));
    for tenant in by_partition[&0].iter().chain(&by_partition[&2]) {
        let (status, _) = get(only_one.addr, &format!("/t/{tenant}/checkpoint")).await;
        assert_ne!(status, 200, "{tenant} is on a partition this instance was not given");
    }
    // Without a group nothing is committed to Kafka, yet the lag is measured (from the read
    // position), once librdkafka's statistics come (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = get(only_one.addr, "/metrics").await;
        if String::from_utf8_lossy(&metrics).lines().any(|l| l == r#"tally_ledger_consumer_lag{partition="1"} 0"#) {
            break;
        }
        assert!(Instant::now() < deadline, "no consumer lag for partition 1:\n{}", String::from_utf8_lossy(&metrics));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    only_one.stop().await;

    let all = start(&data, &key_path, &topic, "unused").await;
    let everyone: BTreeMap<String, u64> = by_partition.values().flatten().map(|t| (t.clone(), 3)).collect();
    all.wait_for(&everyone).await;
    let (_, body) = get(all.addr, "/readyz").await;
    assert!(String::from_utf8_lossy(&body).starts_with("ready: 3 partitions"), "{}", String::from_utf8_lossy(&body));
    all.stop().await;
}

/// Two instances left on the default `assignment = "assign"` over one data directory: the
/// second cannot take the partition the first reads, and says what to configure instead of
/// failing with a bare lock error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_assigned_instance_on_one_data_dir_says_to_use_a_group() {
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("assign2", 1).await;
    let data = dir.path().join("data");
    let first = start(&data, &key_path, &topic, "unused").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(first.addr, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "the first instance never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = start(&data, &key_path, &topic, "unused").await;
    let err = second.ended().await.expect_err("a second reader of the partition must not run").to_string();
    assert!(err.contains("set assignment = \"group\" on all of them"), "{err}");
    first.stop().await;
}
