//! Shared helpers for the whole-pipeline tests: the broker address, per-test topic names, a raw
//! producer for messages a well-behaved publisher would never send, and an in-memory sink.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tally_ingest::{ensure_topics, KafkaConfig, PartitionSink, Resume, TopicSpec};

/// The broker the test command started (scripts/test.sh exports KAFKA_BOOTSTRAP).
pub fn kafka() -> KafkaConfig {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP")
        .expect("KAFKA_BOOTSTRAP is not set: run the tests with scripts/test.sh, which starts a broker");
    KafkaConfig::with_bootstrap(bootstrap)
}

/// A topic name no other test (or earlier run) uses.
pub fn unique_topic(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("test.{prefix}.{}.{}.{}", std::process::id(), nanos % 1_000_000_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub async fn create_topic(config: &KafkaConfig, name: &str, partitions: i32) {
    ensure_topics(config, &[TopicSpec::new(name, partitions)]).await.expect("create topic");
}

/// A plain producer that can send anything: no key, any headers, any bytes.
pub fn raw_producer(config: &KafkaConfig) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "2000000")
        .create()
        .expect("raw producer")
}

pub async fn send_raw(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[(&str, &[u8])],
) -> (i32, i64) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header { key: k, value: Some(*v) });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value).headers(owned);
    if let Some(k) = key {
        record = record.key(k);
    }
    let delivery = producer.send(record, Duration::from_secs(30)).await.expect("raw send");
    (delivery.partition, delivery.offset)
}

/// Remembers the next offset per partition, as the ledger's durable state will.
#[derive(Default)]
pub struct MemorySink {
    pub next: Mutex<HashMap<i32, i64>>,
    pub revocations: Mutex<Vec<Vec<i32>>>,
}

impl MemorySink {
    pub fn new() -> Arc<Self> {
        Arc::new(MemorySink::default())
    }

    pub fn processed(&self, partition: i32, offset: i64) {
        self.next.lock().unwrap().insert(partition, offset + 1);
    }
}

impl PartitionSink for MemorySink {
    fn resume(&self, _topic: &str, partition: i32) -> Resume {
        match self.next.lock().unwrap().get(&partition) {
            Some(&o) => Resume::At(o),
            None => Resume::Beginning,
        }
    }

    fn partitions_revoked(&self, _topic: &str, partitions: &[i32]) {
        self.revocations.lock().unwrap().push(partitions.to_vec());
    }
}

/// A valid event as JSON bytes.
pub fn event_json(tenant: &str, id: &str, cost_micros: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_id": id,
        "tenant_id": tenant,
        "occurred_at": "2026-11-02T09:15:00Z",
        "kind": "llm_call",
        "action": "gpt-5-mini",
        "cost": {"amount_micros": cost_micros, "currency": "USD"},
    }))
    .unwrap()
}
