//! The query service against the real pipeline: events published to Kafka are served by
//! `/events` within 5 s (the ledger projects every second), and `tally parquet rebuild`
//! regenerates a damaged projection from the logs — refusing while a ledger owns the partition.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;

/// The event ids `/events` serves for `tenant`, in seq order.
async fn served_ids(addr: SocketAddr, tenant: &str) -> Vec<String> {
    let Some((200, body)) = http_get(addr, &format!("/v1/tenants/{tenant}/events?record_type=event&limit=10000")).await else { return Vec::new() };
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    page["rows"].as_array().unwrap().iter().map(|r| r["event_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_are_queryable_within_five_seconds_and_rebuilds_restore_the_projection() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("query", 2).await;
    let data = dir.path().join("data");
    let ledger = start_ledger(&data, &key_path, &topic, &unique_topic("query-group"), 100).await;
    let (query, stop_query) = start_query(&data).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();

    // Warm up: the group join and first assignment are not what freshness measures.
    publisher.publish(Some(b"fresh"), &event_json("fresh", "warmup", 1), &[]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !served_ids(query, "fresh").await.contains(&"warmup".to_string()) {
        assert!(Instant::now() < deadline, "the warm-up event never became queryable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut latencies = Vec::new();
    for i in 0..5 {
        let id = format!("e{i}");
        let sent = Instant::now();
        publisher.publish(Some(b"fresh"), &event_json("fresh", &id, 1_000), &[]).await.unwrap();
        loop {
            if served_ids(query, "fresh").await.contains(&id) {
                latencies.push(sent.elapsed());
                break;
            }
            assert!(sent.elapsed() < Duration::from_secs(5), "{id} was not queryable within 5 s of its publish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("publish → /events latencies: {latencies:?}");
    let before = served_ids(query, "fresh").await;
    assert_eq!(before, ["warmup", "e0", "e1", "e2", "e3", "e4"]);

    // The partition is owned: a rebuild must refuse rather than race the ledger.
    let tally = env!("CARGO_BIN_EXE_tally");
    let busy = std::process::Command::new(tally)
        .args(["parquet", "rebuild", "--data-dir", data.to_str().unwrap(), "--key", key_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("locked by another ledger instance"), "{}", String::from_utf8_lossy(&busy.stderr));

    ledger.stop().await;
    // The whole projection goes; the rebuild of fresh's partition brings its rows back.
    std::fs::remove_dir_all(data.join("parquet")).unwrap();
    assert!(served_ids(query, "fresh").await.is_empty());
    let rebuilt = std::process::Command::new(tally)
        .args(["parquet", "rebuild", "--data-dir", data.to_str().unwrap(), "--key", key_path.to_str().unwrap(), "--tenant", "fresh"])
        .output()
        .unwrap();
    assert!(rebuilt.status.success(), "{}", String::from_utf8_lossy(&rebuilt.stderr));
    assert!(String::from_utf8_lossy(&rebuilt.stdout).contains("rebuilt the projection of 1 partition(s)"), "{}", String::from_utf8_lossy(&rebuilt.stdout));
    assert_eq!(served_ids(query, "fresh").await, before);
    let costs = http_get(query, "/v1/tenants/fresh/costs?from=2026-11-01&to=2026-11-30").await.unwrap();
    let costs: serde_json::Value = serde_json::from_slice(&costs.1).unwrap();
    assert_eq!(costs["totals"][0]["cost_micros"].as_i64(), Some(5_001), "{costs}");
    let _ = stop_query.send(());
}
