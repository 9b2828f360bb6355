//! Whole-pipeline tests of the ingest layer against the real broker (scripts/test.sh starts one).
//! Each test uses its own topics, so they run in parallel.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Headers, Message};
use tally_ingest::{
    DeadLetterQueue, Delivery, EventConsumer, EventPublisher, HEADER_ERROR_CODE, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};
use tally_schemas::RejectCode;

/// Consumes until `want` deliveries arrived (or panics after `limit`).
async fn consume_n(consumer: &EventConsumer, want: usize, limit: Duration, mut each: impl FnMut(&Delivery)) -> Vec<Delivery> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while out.len() < want {
        assert!(Instant::now() < deadline, "timed out with {} of {want} deliveries", out.len());
        for d in consumer.next_batch().await.expect("poll") {
            each(&d);
            out.push(d);
        }
    }
    out
}

/// Publishes `n` valid events `e<i>` for tenants `t<i % tenants>` and waits for every delivery.
async fn publish_events(kafka: &tally_ingest::KafkaConfig, topic: &str, n: u32, tenants: u32) {
    let publisher = EventPublisher::new(kafka, topic).unwrap();
    let mut pending = Vec::new();
    for i in 0..n {
        let tenant = format!("t{}", i % tenants);
        pending.push(publisher.enqueue(Some(tenant.as_bytes()), &event_json(&tenant, &format!("e{i}"), 1), &[]).await.unwrap());
    }
    for p in pending {
        p.await.expect("delivery");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_fifty_tenants_arrive_once_in_order_on_one_partition_each() {
    let kafka = kafka();
    let topic = unique_topic("order");
    create_topic(&kafka, &topic, 8).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let mut pending = Vec::new();
    for i in 0..10_000u32 {
        let tenant = format!("tenant-{:02}", i % 50);
        let id = format!("{tenant}:{:05}", i / 50);
        let value = event_json(&tenant, &id, 10);
        pending.push(publisher.enqueue(Some(tenant.as_bytes()), &value, &[]).await.unwrap());
    }
    for p in pending {
        p.await.expect("delivery");
    }

    let sink = MemorySink::new();
    let consumer = EventConsumer::new(&kafka, &format!("{topic}.g"), &topic, sink.clone(), 2_000, Duration::from_millis(200)).unwrap();
    let deliveries = consume_n(&consumer, 10_000, Duration::from_secs(120), |d| sink.processed(d.partition, d.offset)).await;
    consumer.close().await.unwrap();

    assert_eq!(deliveries.len(), 10_000);
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut next_seq: HashMap<String, u32> = HashMap::new();
    let mut seen = HashSet::new();
    for d in &deliveries {
        let event = &d.outcome.as_ref().expect("all events are valid").event;
        assert!(seen.insert(event.event_id.clone()), "duplicate {}", event.event_id);
        let p = *partition_of.entry(event.tenant_id.clone()).or_insert(d.partition);
        assert_eq!(p, d.partition, "tenant {} seen on two partitions", event.tenant_id);
        let seq: u32 = event.event_id.rsplit(':').next().unwrap().parse().unwrap();
        let expected = next_seq.entry(event.tenant_id.clone()).or_insert(0);
        assert_eq!(seq, *expected, "tenant {} out of order", event.tenant_id);
        *expected += 1;
    }
    assert_eq!(partition_of.len(), 50);
    assert!(next_seq.values().all(|&n| n == 200));
    let used: HashSet<i32> = partition_of.values().copied().collect();
    assert!(used.len() > 1, "50 tenants should spread over several of 8 partitions");
}

/// A message as sent: key, value, headers, and the code it must be dead-lettered with.
type BadMessage = (Option<Vec<u8>>, Vec<u8>, Vec<(&'static str, Vec<u8>)>, RejectCode);

/// One bad message per kind the issue names, with the code it must get.
fn bad_message(i: usize) -> BadMessage {
    let tenant = format!("bad-{}", i % 7);
    let good = event_json(&tenant, &format!("bad-{i}"), 1);
    match i % 7 {
        0 => (Some(tenant.into_bytes()), b"{not json at all".to_vec(), vec![], RejectCode::MalformedJson),
        1 => (Some(tenant.into_bytes()), good[..good.len() / 2].to_vec(), vec![], RejectCode::MalformedJson),
        2 => {
            let v = serde_json::json!({"event_id": 5, "tenant_id": tenant, "occurred_at": "2026-11-02T09:15:00Z", "kind": "llm_call"});
            (Some(tenant.into_bytes()), serde_json::to_vec(&v).unwrap(), vec![("x-trace", b"t-1".to_vec())], RejectCode::WrongType)
        }
        3 => {
            let v = serde_json::json!({"event_id": format!("big-{i}"), "tenant_id": tenant, "occurred_at": "2026-11-02T09:15:00Z",
                "kind": "llm_call", "attributes": {"blob": "x".repeat(70_000)}});
            (Some(tenant.into_bytes()), serde_json::to_vec(&v).unwrap(), vec![], RejectCode::TooLarge)
        }
        4 => (Some(b"someone-else".to_vec()), good, vec![], RejectCode::TenantMismatch),
        5 => (None, good, vec![], RejectCode::MissingKey),
        _ => {
            let data: serde_json::Value = serde_json::from_slice(&good).unwrap();
            let ce = serde_json::json!({"specversion": "1.0", "source": "gw", "type": "tally.event", "data": data});
            (
                Some(tenant.into_bytes()),
                serde_json::to_vec(&ce).unwrap(),
                vec![("content-type", b"application/cloudevents+json".to_vec())],
                RejectCode::BadCloudEvent,
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_messages_go_to_the_dlq_once_with_code_bytes_and_headers() {
    let kafka = kafka();
    let topic = unique_topic("dlq");
    let dlq_topic = DeadLetterQueue::topic_for(&topic);
    create_topic(&kafka, &topic, 4).await;
    create_topic(&kafka, &dlq_topic, 4).await;
    let producer = raw_producer(&kafka);

    // Interleave: 2 good events, then 1 bad message, 1,000 times.
    let mut expected_bad: HashMap<(i32, i64), BadMessage> = HashMap::new();
    let mut good_ids = Vec::new();
    for i in 0..1_000usize {
        for j in 0..2 {
            let tenant = format!("good-{}", (i + j) % 10);
            let id = format!("g-{i}-{j}");
            send_raw(&producer, &topic, Some(tenant.as_bytes()), &event_json(&tenant, &id, 5), &[]).await;
            good_ids.push(id);
        }
        let (key, value, headers, code) = bad_message(i);
        let header_refs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let at = send_raw(&producer, &topic, key.as_deref(), &value, &header_refs).await;
        expected_bad.insert(at, (key, value, headers, code));
    }

    let sink = MemorySink::new();
    let consumer = EventConsumer::new(&kafka, &format!("{topic}.g"), &topic, sink.clone(), 1_000, Duration::from_millis(200)).unwrap();
    let dlq = DeadLetterQueue::new(&kafka, &dlq_topic).unwrap();
    let deliveries = consume_n(&consumer, 3_000, Duration::from_secs(120), |_| {}).await;
    let mut accepted = Vec::new();
    for d in &deliveries {
        match &d.outcome {
            Ok(decoded) => accepted.push(decoded.event.event_id.clone()),
            Err(rejection) => {
                dlq.send(&topic, d, rejection).await;
            }
        }
    }
    consumer.close().await.unwrap();
    accepted.sort();
    good_ids.sort();
    assert_eq!(accepted, good_ids, "good events are unaffected by the bad ones");

    // Read the whole DLQ back with a plain consumer.
    let reader = topic_reader(&kafka, &dlq_topic, 4);
    let mut found: HashMap<(i32, i64), usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut total = 0;
    while total < 1_000 && Instant::now() < deadline {
        let Some(msg) = reader.poll(Duration::from_millis(200)) else { continue };
        let msg = msg.unwrap();
        total += 1;
        let headers: BTreeMap<String, Vec<u8>> =
            msg.headers().map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default();
        let text = |k: &str| String::from_utf8(headers.get(k).cloned().unwrap_or_default()).unwrap();
        assert_eq!(text(HEADER_SOURCE_TOPIC), topic);
        let at: (i32, i64) = (text(HEADER_SOURCE_PARTITION).parse().unwrap(), text(HEADER_SOURCE_OFFSET).parse().unwrap());
        let (key, value, original_headers, code) = expected_bad.get(&at).unwrap_or_else(|| panic!("unexpected DLQ entry for {at:?}"));
        assert_eq!(text(HEADER_ERROR_CODE), code.as_str(), "code for message at {at:?}");
        assert_eq!(msg.payload().unwrap_or_default(), value.as_slice(), "original bytes at {at:?}");
        assert_eq!(msg.key().map(<[u8]>::to_vec), *key, "original key at {at:?}");
        for (k, v) in original_headers {
            assert_eq!(headers.get(*k), Some(v), "original header {k} at {at:?}");
        }
        *found.entry(at).or_default() += 1;
    }
    assert_eq!(total, 1_000, "every bad message reaches the DLQ");
    assert_eq!(found.len(), 1_000, "each bad message once");
    assert!(found.values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_restarted_from_its_sink_offsets_loses_and_repeats_nothing() {
    let kafka = kafka();
    let topic = unique_topic("restart");
    create_topic(&kafka, &topic, 4).await;
    publish_events(&kafka, &topic, 4_000, 13).await;

    let sink = MemorySink::new();
    let mut seen: Vec<String> = Vec::new();
    let first = EventConsumer::new(&kafka, &format!("{topic}.a"), &topic, sink.clone(), 500, Duration::from_millis(200)).unwrap();
    // Stop after at least 1,500: whatever the first consumer handed out is "processed".
    for d in consume_n(&first, 1_500, Duration::from_secs(60), |d| sink.processed(d.partition, d.offset)).await {
        seen.push(d.outcome.unwrap().event.event_id);
    }
    first.close().await.unwrap();
    assert!(!sink.revocations.lock().unwrap().is_empty(), "the sink is told of the revocation on close");

    // A different group: nothing is committed there, so only the sink's offsets can resume it.
    let second = EventConsumer::new(&kafka, &format!("{topic}.b"), &topic, sink.clone(), 500, Duration::from_millis(200)).unwrap();
    let rest = 4_000 - seen.len();
    for d in consume_n(&second, rest, Duration::from_secs(60), |d| sink.processed(d.partition, d.offset)).await {
        seen.push(d.outcome.unwrap().event.event_id);
    }
    // Nothing more may arrive: a short extra poll must come back empty.
    let extra = second.next_batch().await.unwrap();
    second.close().await.unwrap();
    assert!(extra.is_empty(), "{} repeated deliveries after restart", extra.len());
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 4_000, "nothing repeated");
    assert_eq!(unique.len(), 4_000, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_partitions_and_resume_each_other_without_repeats() {
    let kafka = kafka();
    let topic = unique_topic("group");
    create_topic(&kafka, &topic, 4).await;
    publish_events(&kafka, &topic, 2_000, 20).await;
    let group = format!("{topic}.g");
    // One shared sink stands for the shared durable state a partition's next owner resumes from.
    let sink = MemorySink::new();
    let a = Arc::new(EventConsumer::new(&kafka, &group, &topic, sink.clone(), 200, Duration::from_millis(200)).unwrap());
    let b = Arc::new(EventConsumer::new(&kafka, &group, &topic, sink.clone(), 200, Duration::from_millis(200)).unwrap());
    // Both members poll until the group settles with both holding partitions and all 2,000 arrived.
    let mut ids: HashMap<String, i32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (ra, rb) = tokio::join!(a.next_batch(), b.next_batch());
        for d in ra.unwrap().into_iter().chain(rb.unwrap()) {
            sink.processed(d.partition, d.offset);
            let id = d.outcome.unwrap().event.event_id;
            assert!(ids.insert(id.clone(), d.partition).is_none(), "{id} delivered twice");
        }
        let (pa, pb) = (a.assignment().unwrap(), b.assignment().unwrap());
        if ids.len() == 2_000 && !pa.is_empty() && !pb.is_empty() {
            let all: HashSet<i32> = pa.iter().chain(pb.iter()).copied().collect();
            assert_eq!(all.len(), 4, "partitions split without overlap: {pa:?} {pb:?}");
            assert_eq!(pa.len() + pb.len(), 4);
            break;
        }
        assert!(Instant::now() < deadline, "group did not settle: {} events, {pa:?} {pb:?}", ids.len());
    }
}
