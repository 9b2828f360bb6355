//! Broker outage (issue #19, item 1): the broker stops for 30 s while events are published and
//! ingested, then starts again on the same storage. Nothing is lost or doubled; `/readyz` and the
//! metrics show the outage while it lasts; authorize goes on deciding, since a decision is durable
//! in the ledger's own journal, not on the broker.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const OUTAGE: Duration = Duration::from_secs(30);

async fn text(addr: std::net::SocketAddr, path: &str) -> String {
    let (_, body) = http_get(addr, path).await.expect("the ledger answers");
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_broker_outage_loses_and_doubles_nothing() {
    let broker = PrivateBroker::start();
    let kafka = broker.kafka.clone();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture_on(&kafka, "outage", 2).await;
    let running = start_service_on(ledger_config(dir.path(), &key_path, &topic, &format!("{topic}.g"), 50), kafka.clone()).await;

    // Events are sent one every 50 ms without waiting for each delivery: those sent while the
    // broker is away wait in the producer and are delivered when it is back.
    let publisher = Arc::new(EventPublisher::new(&kafka, &topic).unwrap());
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let mut deliveries = Vec::new();
    let mut i = 0u64;
    let mut send = |i: u64, sent: &mut BTreeMap<String, u64>| {
        let tenant = TENANTS[(i % 3) as usize];
        *sent.entry(tenant.to_string()).or_default() += 1;
        let publisher = Arc::clone(&publisher);
        deliveries.push(tokio::spawn(async move { publisher.publish(Some(tenant.as_bytes()), &event_json(tenant, &format!("e-{i}"), 10), &[]).await }));
    };
    for _ in 0..60 {
        send(i, &mut sent);
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.wait_for(&sent).await;
    let metrics = text(running.addr, "/metrics").await;
    assert_eq!(metric_sum(&metrics, "tally_ledger_broker_reachable"), 1.0, "{metrics}");

    tokio::task::block_in_place(|| broker.stop());
    let stopped = Instant::now();
    let mut seen_degraded = false;
    let mut authorized_during = 0u64;
    while stopped.elapsed() < OUTAGE {
        send(i, &mut sent);
        i += 1;
        let ready = text(running.addr, "/readyz").await;
        if ready.contains("degraded: broker unreachable") {
            seen_degraded = true;
            // Admissions go on: the decision is made durable in the ledger's journal (for a
            // tenant of its own, whose log holds only admissions).
            let (status, verdict) = http_post(running.addr, "/v1/tenants/hooli/budget/authorize", &serde_json::json!({"estimate_micros": 1})).await.unwrap();
            assert_eq!((status, verdict["decision"].as_str()), (200, Some("allow")), "{verdict}");
            authorized_during += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen_degraded, "/readyz never showed the outage");
    let metrics = text(running.addr, "/metrics").await;
    assert_eq!(metric_sum(&metrics, "tally_ledger_broker_reachable"), 0.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, "tally_ledger_broker_outages_total"), 1.0, "{metrics}");

    tokio::task::block_in_place(|| broker.start_again());
    for _ in 0..40 {
        send(i, &mut sent);
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for delivery in deliveries {
        delivery.await.unwrap().expect("every event is delivered once the broker is back");
    }
    // Every event once, in its tenant's log; hooli's log holds the admissions made meanwhile.
    running.wait_for(&sent).await;
    let hooli = text(running.addr, "/t/hooli/checkpoint").await;
    let hooli: u64 = hooli.lines().nth(1).and_then(|l| l.parse().ok()).expect("hooli's checkpoint");
    assert!(hooli >= authorized_during, "{authorized_during} admissions during the outage, {hooli} records");
    let deadline = Instant::now() + Duration::from_secs(30);
    while text(running.addr, "/readyz").await.contains("broker unreachable") {
        assert!(Instant::now() < deadline, "/readyz still shows the outage after the broker came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = text(running.addr, "/metrics").await;
    assert_eq!(metric_sum(&metrics, "tally_ledger_broker_reachable"), 1.0, "{metrics}");
    running.stop().await;
}
