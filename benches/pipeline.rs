//! End-to-end ledger benchmark against a real broker, with the real `tally` binary:
//!
//! 1. Publish N events (100 tenants, 8 partitions).
//! 2. Bare rdkafka consume of the same N: the floor, in the same run.
//! 3. `tally ledger` from an empty data directory: from ready (partitions assigned) until all N
//!    are durable in signed checkpoints. Reports events/s and the ratio to the bare consume.
//! 4. Latency, event produced → included in a signed checkpoint: events for 10 tenants at a
//!    steady rate, checkpoints polled every 5 ms; p50/p99 (default commit interval, 100 ms).
//! 5. Restart after `kill -9` with R records on disk (publishing continues during the kill): the
//!    ledger's own recovery (`open_ms` per partition, from its log) and spawn → ready, which also
//!    includes the broker handing the partitions back (bounded by `session.timeout.ms`).
//!
//! Run with `scripts/bench.sh pipeline`. Settings: TALLY_BENCH_EVENTS (200000),
//! TALLY_BENCH_RESTART_RECORDS (1000000), TALLY_BENCH_SESSION_TIMEOUT_MS (6000), KAFKA_BOOTSTRAP (set by scripts/bench.sh).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tally_ingest::{ensure_topics, EventPublisher, KafkaConfig, TopicSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARTITIONS: i32 = 8;
const TENANTS: u64 = 100;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn event(tenant: &str, id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_id": id, "tenant_id": tenant, "occurred_at": "2026-11-02T09:15:00Z", "kind": "llm_call",
        "agent_id": "support-bot", "action": "gpt-5-mini",
        "usage": {"input_tokens": 812, "output_tokens": 97},
        "cost": {"amount_micros": 1234, "currency": "USD"},
    }))
    .unwrap()
}

async fn publish(publisher: &EventPublisher, from: u64, to: u64) {
    let mut pending = Vec::new();
    for i in from..to {
        let tenant = format!("t{:03}", i % TENANTS);
        pending.push(publisher.enqueue(Some(tenant.as_bytes()), &event(&tenant, &format!("e{i}")), &[]).await.unwrap());
        if pending.len() >= 50_000 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
}

fn bare(kafka: &KafkaConfig, topic: &str, n: u64) -> Duration {
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
    let mut got = 0;
    while got < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            assert!(m.payload().is_some());
            got += 1;
        }
    }
    start.elapsed()
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((std::str::from_utf8(response.get(9..12)?).ok()?.parse().ok()?, String::from_utf8_lossy(&response[split + 4..]).into_owned()))
}

async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, text) = get(addr, "/metrics").await?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok())
}

async fn wait_ready(addr: SocketAddr) {
    while !matches!(get(addr, "/readyz").await, Some((200, _))) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the ledger has accepted `n` events in total and signed all of them.
async fn wait_signed(addr: SocketAddr, n: u64) {
    loop {
        let accepted = metric(addr, "tally_ledger_events_accepted_total").await.unwrap_or(0.0) as u64;
        let lag = metric(addr, "tally_ledger_checkpoint_lag_seconds").await.unwrap_or(1.0);
        if accepted >= n && lag == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records in all signed checkpoints of the bench's tenants.
async fn total_signed(addr: SocketAddr) -> u64 {
    let mut total = 0;
    let names = (0..TENANTS).map(|t| format!("t{t:03}")).chain((0..10).map(|t| format!("lat{t}")));
    for t in names {
        if let Some((200, note)) = get(addr, &format!("/t/{t}/checkpoint")).await {
            total += note.lines().nth(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

fn spawn_ledger(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["--config", config.to_str().unwrap(), "ledger"])
        .env("RUST_LOG", "warn,tally_ledger=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = setting("TALLY_BENCH_EVENTS", 200_000);
    let restart_records = setting("TALLY_BENCH_RESTART_RECORDS", 1_000_000).max(n);
    // How long the broker keeps a SIGKILLed member's partitions. 6 s is stock Kafka's minimum
    // (group.min.session.timeout.ms). Below ~4 s Tansu 0.6.0 livelocks: a follower's join sleeps
    // 3 s in the coordinator, heartbeats go unanswered meanwhile, and sessions time out.
    let session_timeout_ms = setting("TALLY_BENCH_SESSION_TIMEOUT_MS", 6_000);
    let kafka = KafkaConfig::with_bootstrap(std::env::var("KAFKA_BOOTSTRAP").expect("KAFKA_BOOTSTRAP (use scripts/bench.sh pipeline)"));
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let topic = format!("bench.pipeline.{run}");
    ensure_topics(&kafka, &[TopicSpec::new(&topic, PARTITIONS), TopicSpec::new(format!("{topic}.dlq"), PARTITIONS)]).await.unwrap();
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();

    let t = Instant::now();
    publish(&publisher, 0, n).await;
    println!("published {n} events in {:.2} s", t.elapsed().as_secs_f64());
    let bare_eps = n as f64 / bare(&kafka, &topic, n).as_secs_f64();
    println!("bare rdkafka consume: {bare_eps:.0} events/s");

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ledger.key");
    tally_ledger::LedgerKey::generate("bench.tally.example").unwrap().write_new(&key).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.path().join("ledger.toml");
    // `statements = false`: the events are dated in a month that has closed, and the restart
    // phase counts exactly one record per event; closing periods is measured on its own.
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap = \"{}\"\n[kafka.librdkafka]\n\"session.timeout.ms\" = \"{session_timeout_ms}\"\n[ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\ngroup = \"{topic}.ledger\"\nlisten = \"{addr}\"\nstatements = false\n",
            kafka.bootstrap,
            dir.path().join("data").display(),
            key.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("ledger.log");
    let mut child = spawn_ledger(&config, &log);
    wait_ready(addr).await;
    let t = Instant::now();
    wait_signed(addr, n).await;
    let ledger_eps = n as f64 / t.elapsed().as_secs_f64();
    println!("tally ledger, Kafka → durable signed logs: {ledger_eps:.0} events/s; ratio to bare consume {:.2}", ledger_eps / bare_eps);

    // Latency: 10 tenants, 1,000 events/s for 5 s; each tenant's checkpoint polled every 5 ms.
    let tenants: Vec<String> = (0..10).map(|t| format!("lat{t}")).collect();
    let mut produced: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    let poller = {
        let tenants = tenants.clone();
        tokio::spawn(async move {
            let mut signed: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && signed.values().map(Vec::len).sum::<usize>() < 5_000 {
                for t in &tenants {
                    if let Some((200, note)) = get(addr, &format!("/t/{t}/checkpoint")).await {
                        let size: usize = note.lines().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                        let seen = signed.entry(t.clone()).or_default();
                        let now = Instant::now();
                        while seen.len() < size {
                            seen.push(now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            signed
        })
    };
    let start = Instant::now();
    for i in 0..5_000u32 {
        tokio::time::sleep_until((start + Duration::from_millis(u64::from(i))).into()).await;
        let t = &tenants[i as usize % tenants.len()];
        produced.entry(t.clone()).or_default().push(Instant::now());
        // The delivery report is not awaited (the poller sees the event land); dropping it does
        // not cancel the send.
        drop(publisher.enqueue(Some(t.as_bytes()), &event(t, &format!("lat{i}")), &[]).await.unwrap());
    }
    let signed = poller.await.unwrap();
    let mut latencies: Vec<Duration> = Vec::new();
    for (t, times) in &produced {
        for (p, s) in times.iter().zip(signed.get(t).map(Vec::as_slice).unwrap_or_default()) {
            latencies.push(s.saturating_duration_since(*p));
        }
    }
    latencies.sort();
    assert_eq!(latencies.len(), 5_000, "every latency event was signed");
    println!(
        "produced → in a signed checkpoint (default commit_interval_ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );

    // Restart after kill -9 with `restart_records` on disk, mid-stream.
    let t = Instant::now();
    publish(&publisher, n, restart_records).await;
    wait_signed(addr, restart_records + 5_000).await;
    println!("grew the ledger to {restart_records} records in {:.1} s", t.elapsed().as_secs_f64());
    let more = {
        let kafka = kafka.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let publisher = EventPublisher::new(&kafka, &topic).unwrap();
            publish(&publisher, restart_records, restart_records + 20_000).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    more.await.unwrap();
    let t = Instant::now();
    let mut child = spawn_ledger(&config, &log); // a fresh log file: only this run's lines
    wait_ready(addr).await;
    let ready = t.elapsed();
    let everything = restart_records + 20_000 + 5_000;
    while total_signed(addr).await < everything {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = t.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let opens: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("partition state opened"))
        .filter_map(|l| l.split("open_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(total_signed(addr).await, everything, "nothing lost or doubled across the kill");
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    child.wait().unwrap();
    println!(
        "restart after kill -9 with {restart_records} records: recovery (open) {} ms for {} partitions (max {} ms each); \
         spawn → ready {:.2} s (includes the broker's rebalance, session.timeout.ms = {session_timeout_ms}); caught up with 20,000 new events in {:.2} s",
        opens.iter().sum::<u64>(),
        opens.len(),
        opens.iter().max().copied().unwrap_or(0),
        ready.as_secs_f64(),
        caught_up.as_secs_f64()
    );
}
