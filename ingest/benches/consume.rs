//! Ingest throughput against a real broker: publish N events, then consume the same topic with a
//! bare rdkafka loop (the floor) and through `EventConsumer` (decode + validate + batch), twice
//! each, alternating, and report events/s and the ratio. Run with `scripts/bench.sh ingest`.
//! Settings: TALLY_BENCH_EVENTS (200000), KAFKA_BOOTSTRAP (set by scripts/bench.sh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tally_ingest::{ensure_topics, EventConsumer, EventPublisher, KafkaConfig, PartitionSink, Resume, TopicSpec};

const PARTITIONS: i32 = 8;

struct FromStart;
impl PartitionSink for FromStart {
    fn resume(&self, _: &str, _: i32) -> Resume {
        Resume::Beginning
    }
    fn partitions_revoked(&self, _: &str, _: &[i32]) {}
}

fn bare(kafka: &KafkaConfig, topic: &str, n: usize) -> Duration {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", format!("{topic}.bare"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let start = Instant::now();
    let (mut got, mut bytes) = (0usize, 0usize);
    while got < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            bytes += m.payload().map_or(0, <[u8]>::len);
            got += 1;
        }
    }
    assert!(bytes > 0);
    start.elapsed()
}

async fn ingest(kafka: &KafkaConfig, topic: &str, group: &str, n: usize) -> Duration {
    let consumer = EventConsumer::new(kafka, group, topic, Arc::new(FromStart), 5_000, Duration::from_millis(100)).unwrap();
    // Group join is not part of the throughput: start the clock at the first delivery.
    let mut got = 0usize;
    let mut start = None;
    while got < n {
        let batch = consumer.next_batch().await.unwrap();
        if !batch.is_empty() && start.is_none() {
            start = Some(Instant::now());
        }
        got += batch.iter().filter(|d| d.outcome.is_ok()).count();
    }
    let elapsed = start.unwrap().elapsed();
    consumer.close().await.unwrap();
    elapsed
}

#[tokio::main]
async fn main() {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").expect("run via scripts/bench.sh ingest (sets KAFKA_BOOTSTRAP)");
    let n: usize = std::env::var("TALLY_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let kafka = KafkaConfig::with_bootstrap(bootstrap);
    let topic = format!("bench.ingest.{}", std::process::id());
    ensure_topics(&kafka, &[TopicSpec::new(&topic, PARTITIONS)]).await.unwrap();

    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let start = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let tenant = format!("tenant-{:03}", i % 100);
        let value = serde_json::to_vec(&serde_json::json!({
            "event_id": format!("evt-{i:09}"), "tenant_id": tenant, "occurred_at": "2026-11-02T09:15:00.123Z",
            "kind": "llm_call", "decision": "allow", "agent_id": "support-bot", "task_id": format!("run-{}", i % 1000),
            "action": "gpt-5-mini", "usage": {"input_tokens": 1200, "output_tokens": 340},
            "cost": {"amount_micros": 4210, "currency": "USD"}
        }))
        .unwrap();
        pending.push(publisher.enqueue(Some(tenant.as_bytes()), &value, &[]).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
    let publish = start.elapsed();
    println!("published {n} events (~250 B) in {:.2}s: {:.0} events/s", publish.as_secs_f64(), n as f64 / publish.as_secs_f64());

    let mut best_bare = Duration::MAX;
    let mut best_ingest = Duration::MAX;
    for round in 0..2 {
        let b = tokio::task::block_in_place(|| bare(&kafka, &topic, n));
        let i = ingest(&kafka, &topic, &format!("{topic}.ingest{round}"), n).await;
        println!("round {round}: bare rdkafka {:.0} events/s, ingest EventConsumer {:.0} events/s", n as f64 / b.as_secs_f64(), n as f64 / i.as_secs_f64());
        best_bare = best_bare.min(b);
        best_ingest = best_ingest.min(i);
    }
    let (b, i) = (n as f64 / best_bare.as_secs_f64(), n as f64 / best_ingest.as_secs_f64());
    println!("best: bare {b:.0} events/s, ingest {i:.0} events/s, ratio ingest/bare = {:.2}", i / b);
}
