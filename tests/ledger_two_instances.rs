//! Two ledger instances in one consumer group over a shared data directory: 200,000 events for
//! 100 tenants on 8 partitions, with 5% of them resent as producer retries would. The second
//! instance joins mid-stream, so partitions move between instances while events flow.
//!
//! Checked independently of the service: every message is read back from the topic, retries are
//! dropped by (tenant, event_id), the expected records are rebuilt in partition order, and each
//! tenant's root is recomputed with a naive RFC 6962 Merkle tree hash. Every record's receipt
//! verifies against the tenant's vkey.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tally_ingest::EventPublisher;
use tally_ledger::{event_record, EventInput, Ledger, Receipt, Source, TenantEntries};

const EVENTS: u32 = 200_000;
const TENANTS: u32 = 100;
const PARTITIONS: i32 = 8;

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get(addr, path).await.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let Some((200, text)) = get(addr, "/metrics").await else { return 0 };
    metric_sum(&text, name) as u64
}

/// One message read back: (offset, timestamp, key, value).
type Read = (i64, Option<i64>, Vec<u8>, Vec<u8>);

/// Every message of the topic, per partition in offset order.
fn read_topic(kafka: &tally_ingest::KafkaConfig, topic: &str) -> BTreeMap<i32, Vec<Read>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = BTreeMap::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        high.insert(p, consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1);
    }
    consumer.assign(&tpl).unwrap();
    let mut out: BTreeMap<i32, Vec<_>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while high.iter().any(|(p, h)| out.get(p).and_then(|v| v.last()).map_or(0, |m: &(i64, _, _, _)| m.0 + 1) < *h) {
        assert!(Instant::now() < deadline, "could not read the topic back");
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            assert!(m.headers().is_none_or(|h| h.count() == 0));
            out.entry(m.partition()).or_default().push((m.offset(), m.timestamp().to_millis(), m.key().unwrap().to_vec(), m.payload().unwrap().to_vec()));
        }
    }
    out
}

/// RFC 6962 Merkle tree hash, written the slow, obvious way.
fn mth(leaves: &[Vec<u8>]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => Sha256::digest([&[0u8][..], &leaves[0]].concat()).into(),
        n => {
            let k = n.next_power_of_two() / 2;
            Sha256::digest([&[1u8][..], &mth(&leaves[..k]), &mth(&leaves[k..])].concat()).into()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_partitions_and_record_each_event_once() {
    let broker = PrivateBroker::start();
    let kafka = broker.kafka.clone();
    let LedgerFixture { topic, dir, key_path, key } = ledger_fixture_on(&kafka, "two", PARTITIONS).await;
    let data = dir.path().join("data");

    // The first instance starts on an empty topic; the second joins once events are flowing.
    let group = format!("{topic}.ledger");
    let in_group = || {
        let mut config = ledger_config(&data, &key_path, &topic, &group, 200);
        config.assignment = tally_ledger::service::AssignmentMode::Group;
        config
    };
    let a = start_service_on(in_group(), kafka.clone()).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut retries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut pending = Vec::new();
    let mut b = None;
    for i in 0..EVENTS {
        let tenant = format!("t{:03}", i % TENANTS);
        let value = event_json(&tenant, &format!("e{i}"), i64::from(i % 1_000));
        pending.push(publisher.enqueue(Some(tenant.as_bytes()), &value, &[]).await.unwrap());
        if rng.gen_bool(0.05) {
            retries.push((tenant, value));
        }
        // Resend a retry some time after its original.
        if !retries.is_empty() && rng.gen_bool(0.05) {
            let (t, v) = retries.swap_remove(rng.gen_range(0..retries.len()));
            pending.push(publisher.enqueue(Some(t.as_bytes()), &v, &[]).await.unwrap());
        }
        if i == EVENTS / 4 {
            b = Some(start_service_on(in_group(), kafka.clone()).await);
        }
    }
    for (t, v) in retries.drain(..) {
        pending.push(publisher.enqueue(Some(t.as_bytes()), &v, &[]).await.unwrap());
    }
    let sent = pending.len();
    for p in pending {
        p.await.unwrap();
    }
    let b = b.unwrap();

    // Both instances together accept every distinct event once and sign all of it.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let accepted = metric(a.addr, "tally_ledger_events_accepted_total").await + metric(b.addr, "tally_ledger_events_accepted_total").await;
        let deduplicated = metric(a.addr, "tally_ledger_events_deduplicated_total").await + metric(b.addr, "tally_ledger_events_deduplicated_total").await;
        assert!(accepted <= u64::from(EVENTS), "accepted {accepted} of {EVENTS} distinct events");
        if accepted == u64::from(EVENTS) && accepted + deduplicated == sent as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "accepted {accepted}, deduplicated {deduplicated} of {sent} sent");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let owned_a = metric(a.addr, "tally_ledger_partitions").await;
    let owned_b = metric(b.addr, "tally_ledger_partitions").await;
    assert_eq!(owned_a + owned_b, PARTITIONS as u64);
    assert!(owned_a > 0 && owned_b > 0, "both instances own partitions: {owned_a} + {owned_b}");
    // Each instance serves the tenants of its partitions and nothing else.
    let (status_a, _) = get(a.addr, "/t/t001/checkpoint").await.unwrap();
    let (status_b, _) = get(b.addr, "/t/t001/checkpoint").await.unwrap();
    assert_eq!([status_a, status_b].iter().filter(|s| **s == 200).count(), 1, "{status_a} {status_b}");
    a.stop().await;
    b.stop().await;

    // The independent recomputation, from the topic itself.
    let messages = read_topic(&kafka, &topic);
    assert_eq!(messages.values().map(Vec::len).sum::<usize>(), sent);
    let mut expected: BTreeMap<String, (i32, Vec<Vec<u8>>)> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (&partition, msgs) in &messages {
        for (offset, timestamp_ms, key, value) in msgs {
            let decoded = tally_schemas::decode_message(Some(key), value, &[]).unwrap();
            let tenant = decoded.event.tenant_id.clone();
            if !seen.insert((tenant.clone(), decoded.event.event_id.clone())) {
                continue;
            }
            let (_, records) = expected.entry(tenant).or_insert((partition, Vec::new()));
            let source = Source::Kafka { topic: topic.clone(), partition, offset: *offset, timestamp_ms: *timestamp_ms };
            let input = EventInput { event: &decoded.event, ce_source: None, payload_sha256: &decoded.payload_sha256, source: &source };
            // No budgets here: a cost is charged as itself, in its UTC month.
            let charge = tally_ledger::budget::BudgetState::default().rate(&decoded.event);
            records.push(event_record(records.len() as u64, input, charge.as_ref()).unwrap());
        }
    }
    assert_eq!(expected.len() as u32, TENANTS);

    let mut receipts = 0;
    for (tenant, (partition, records)) in &expected {
        let ledger = Ledger::open_read_only(&data.join("partitions").join(format!("{topic}-{partition}")), vec![key.clone()]).unwrap();
        let vkey = tally_ledger::NoteVerifier::parse(&key.signer_for(tenant).unwrap().verifier().vkey()).unwrap();
        let log = ledger.tenant(tenant);
        assert_eq!(log.size(), records.len() as u64, "{tenant}");
        for (seq, record) in records.iter().enumerate() {
            assert!(log.entry(seq as u64).unwrap() == *record, "{tenant} seq {seq} differs from the recomputation");
        }
        assert_eq!(log.root_at(log.size()).unwrap(), mth(records), "{tenant}: root differs from the independent recomputation");
        for seq in 0..records.len() as u64 {
            let (receipt, entry) = ledger.receipt(tenant, seq).unwrap();
            Receipt::parse(&receipt.to_text()).unwrap().verify(&entry, std::slice::from_ref(&vkey), Some(&format!("tally.example.com/t/{tenant}"))).unwrap();
            receipts += 1;
        }
    }
    assert_eq!(receipts, EVENTS);
}
