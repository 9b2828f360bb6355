//! Budget benchmark against a real broker:
//!
//! 1. In-process: `PartitionLedger::authorize` (decision + admission record, no fsync) latency,
//!    and with a durable commit after every call (what one HTTP caller at a time pays).
//! 2. HTTP over loopback (keep-alive) at 1, 16, 64 and 256 concurrent callers against the running
//!    service: authorize latency p50/p99 and decisions/s. Every answer is durable.
//! 3. Event published → the tenant's new state on the budget topic: p50/p99 at 500 events/s.
//! 4. Freeze request → the tenant's state listing it on the budget topic: p50/p99.
//!
//! The service runs as a gateway's would: every tenant has rate quotas (4, never reached) and
//! 10 active freezes (of other agents), and every authorize names its agent, action, kind and
//! tokens, so each decision checks the freezes and counts the quotas.
//!
//! Same-run baselines: a budget read (same server, routing and token check; no record, no
//! commit) at each caller count, and the same events relayed through the same broker by a bare
//! consumer and producer, and for freezes the same topic written by a bare producer (one hop).
//!
//! Run with `scripts/bench.sh budget`. Settings: TALLY_BENCH_AUTHORIZE (20000),
//! TALLY_BENCH_FETCH_WAIT_MS (the ledger consumer's `fetch.wait.max.ms`; default 100), KAFKA_BOOTSTRAP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use tally_ingest::{ensure_topics, EventPublisher, KafkaConfig, TopicSpec};
use tally_ledger::service::{PartitionLedger, ServiceConfig};
use tally_ledger::LedgerKey;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BUDGETS: &str = "default_plan = \"big\"\n[plans.big]\nday_micros = 1_000_000_000_000\nperiod_micros = 1_000_000_000_000_000\n\
ceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n\
[plans.big.quotas]\ncalls = \"1000000000/m\"\ntokens = \"1000000000000/m\"\n\"action:gpt\" = \"1000000000/h\"\n\"kind:llm_call\" = \"1000000000/d\"\n";

/// Active freezes per tenant during the HTTP phase (none covers the benchmark's agent).
const FREEZES_PER_TENANT: usize = 10;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

fn report(what: &str, mut samples: Vec<Duration>, elapsed: Duration) {
    samples.sort();
    println!("{what}: p50 {:.0} µs, p99 {:.0} µs, {:.0} decisions/s", pct(&samples, 0.5), pct(&samples, 0.99), samples.len() as f64 / elapsed.as_secs_f64());
}

/// A keep-alive HTTP/1.1 connection that POSTs JSON and reads the answer.
struct Conn {
    reader: BufReader<tokio::net::TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn { reader: BufReader::new(stream) }
    }

    async fn post(&mut self, path: &str, body: &str) -> (u16, Vec<u8>) {
        let request = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        self.send(&request).await
    }

    async fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")).await
    }

    async fn send(&mut self, request: &str) -> (u16, Vec<u8>) {
        self.reader.get_mut().write_all(request.as_bytes()).await.unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).await.unwrap();
        let status: u16 = line[9..12].parse().unwrap();
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).await.unwrap();
        (status, body)
    }
}

fn in_process(n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let key = LedgerKey::generate("bench.tally.example").unwrap();
    let mut p = PartitionLedger::open(dir.path(), "bench", 0, vec![key]).unwrap();
    let budgets: tally_ledger::budget::BudgetFile = toml::from_str(BUDGETS).unwrap();
    p.set_budget_file(Some(Arc::new(budgets)));
    for (durable, label) in [(false, "in-process authorize (decision + record, no fsync)"), (true, "in-process authorize + durable commit each")] {
        let count = if durable { n / 10 } else { n };
        let mut samples = Vec::with_capacity(count as usize);
        let start = Instant::now();
        for i in 0..count {
            let t = Instant::now();
            let request = tally_ledger::service::AuthorizeRequest {
                task_id: Some(format!("t{}", i % 100)),
                estimated_tokens: Some(100),
                estimate_micros: 1,
                ttl_ms: 60_000,
                ..Default::default()
            };
            let verdict = p.authorize("acme", jiff::Timestamp::now(), &request, &tally_ledger::service::Caller::default()).unwrap().verdict;
            if durable {
                p.commit().unwrap();
            }
            samples.push(t.elapsed());
            assert!(verdict.allowed);
        }
        let elapsed = start.elapsed();
        p.commit().unwrap();
        report(label, samples, elapsed);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = setting("TALLY_BENCH_AUTHORIZE", 20_000);
    tokio::task::block_in_place(|| in_process(n));

    let mut kafka = KafkaConfig::with_bootstrap(std::env::var("KAFKA_BOOTSTRAP").expect("KAFKA_BOOTSTRAP (use scripts/bench.sh budget)"));
    if let Ok(wait) = std::env::var("TALLY_BENCH_FETCH_WAIT_MS") {
        kafka.librdkafka.insert("fetch.wait.max.ms".into(), wait);
    }
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let topic = format!("bench.budget.{run}");
    let budget_topic = format!("{topic}.state");
    ensure_topics(&kafka, &[TopicSpec::new(&topic, 4), TopicSpec::new(format!("{topic}.dlq"), 4), TopicSpec::new(&budget_topic, 4)]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ledger.key");
    LedgerKey::generate("bench.tally.example").unwrap().write_new(&key).unwrap();
    let budgets = dir.path().join("budgets.toml");
    std::fs::write(&budgets, BUDGETS).unwrap();
    let config = ServiceConfig {
        data_dir: dir.path().join("data"),
        keys: vec![key],
        topic: topic.clone(),
        dlq_topic: None,
        assignment: tally_ledger::service::AssignmentMode::Assign,
        partitions: None,
        group: format!("{topic}.ledger"),
        commit_interval_ms: 250,
        listen: "127.0.0.1:0".parse().unwrap(),
        tokens: None,
        budgets: Some(budgets),
        budget_topic: budget_topic.clone(),
        advertise_url: None,
        rejoin_after_ms: 30_000,
        projection_interval_ms: 1000,
        report_time_zones: vec!["UTC".into()],
        statement_grace_ms: 86_400_000,
        statements: true,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(tally_ledger::service::run(config, kafka.clone(), listener, async move {
        let _ = stopped.await;
    }));
    // Ready once every partition is assigned (one instance: all 4).
    loop {
        let mut c = Conn::open(addr).await;
        let (status, _) = c.post("/v1/tenants/warmup/budget/authorize", r#"{"estimate_micros":1,"estimated_tokens":1}"#).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every tenant the callers use gets its freezes before the measurement.
    for t in 0..64 {
        let mut conn = Conn::open(addr).await;
        for f in 0..FREEZES_PER_TENANT {
            let body = format!(r#"{{"reason":"bench","scope":{{"agent_id":"other-{f}"}}}}"#);
            let (status, answer) = conn.post(&format!("/v1/tenants/t{t:03}/freeze"), &body).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        }
    }
    println!("every tenant has 4 rate quotas and {FREEZES_PER_TENANT} active freezes; each authorize names agent, action, kind and tokens");

    for callers in [1usize, 16, 64, 256] {
        let per_caller = (n as usize / 4 / callers).max(10);
        // The same-run baseline: the same server, connections, routing and token check, a budget
        // read (no record, no commit): what this machine's HTTP stack and the client cost.
        for durable in [false, true] {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..callers {
                tasks.push(tokio::spawn(async move {
                    let mut conn = Conn::open(addr).await;
                    let tenant = format!("t{:03}", c % 64);
                    let mut samples = Vec::with_capacity(per_caller);
                    for i in 0..per_caller {
                        // Long TTLs: expiries would otherwise land in the latency phase below.
                        let body = format!(
                            r#"{{"task_id":"task{i}","agent_id":"bench-agent","action":"gpt","kind":"llm_call","estimated_tokens":100,"estimate_micros":1,"ttl_ms":3600000}}"#
                        );
                        let t = Instant::now();
                        let (status, answer) = if durable {
                            conn.post(&format!("/v1/tenants/{tenant}/budget/authorize"), &body).await
                        } else {
                            conn.get(&format!("/v1/tenants/{tenant}/budget")).await
                        };
                        samples.push(t.elapsed());
                        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
                    }
                    samples
                }));
            }
            let mut samples = Vec::new();
            for t in tasks {
                samples.extend(t.await.unwrap());
            }
            let what = if durable { "HTTP authorize (durable answers)" } else { "baseline: HTTP budget read" };
            report(&format!("{what}, {callers} concurrent callers"), samples, start.elapsed());
        }
    }

    // Event → state on the budget topic: each event costs 1 micro, so the state's day spend
    // says which events it includes. The same-run baseline relays the same events through the
    // same broker with a bare consumer (the ledger's `fetch.wait.max.ms`) and producer: two
    // hops of the broker and nothing else.
    let fetch_wait = kafka.librdkafka.get("fetch.wait.max.ms").cloned().unwrap_or_else(|| "100".into());
    let relay_in = format!("{topic}.relay");
    let relay_out = format!("{topic}.relayed");
    ensure_topics(&kafka, &[TopicSpec::new(&relay_in, 4), TopicSpec::new(&relay_out, 4)]).await.unwrap();
    let relay_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = {
        let (kafka, relay_in, relay_out, fetch_wait, relay_stop) =
            (kafka.clone(), relay_in.clone(), relay_out.clone(), fetch_wait.clone(), Arc::clone(&relay_stop));
        tokio::spawn(async move {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &kafka.bootstrap)
                .set("group.id", format!("{relay_in}.relay"))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", &fetch_wait)
                .create()
                .unwrap();
            let mut assignment = rdkafka::TopicPartitionList::new();
            for p in 0..4 {
                assignment.add_partition_offset(&relay_in, p, rdkafka::Offset::Beginning).unwrap();
            }
            consumer.assign(&assignment).unwrap();
            let publisher = EventPublisher::new(&kafka, &relay_out).unwrap();
            while !relay_stop.load(std::sync::atomic::Ordering::Acquire) {
                let message = tokio::task::block_in_place(|| {
                    consumer.poll(Duration::from_millis(10)).map(|m| m.map(|m| (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec))))
                });
                if let Some(Ok((key, payload))) = message {
                    // Not awaited one by one (that would cap the relay at one broker round trip
                    // per event); dropping the delivery report does not cancel the send.
                    drop(publisher.enqueue(key.as_deref(), payload.as_deref().unwrap_or_default(), &[]).await.unwrap());
                }
            }
        })
    };
    let relayed = event_to_topic(&kafka, &relay_in, &relay_out, |value| {
        value["event_id"].as_str().and_then(|id| id.strip_prefix("lat")).and_then(|i| i.parse::<i64>().ok()).map(|i| i + 1)
    })
    .await;
    relay_stop.store(true, std::sync::atomic::Ordering::Release);
    relay.await.unwrap();
    println!(
        "baseline: event published → relayed by a bare consumer and producer (500 events/s): p50 {:.1} ms, p99 {:.1} ms",
        pct(&relayed, 0.5) / 1e3,
        pct(&relayed, 0.99) / 1e3
    );
    let latencies = event_to_topic(&kafka, &topic, &budget_topic, |value| {
        Some(value["levels"].as_array().and_then(|l| l.iter().find(|l| l["level"] == "day")).and_then(|l| l["spent_micros"].as_i64()).unwrap_or(0))
    })
    .await;
    println!(
        "event published → state on the budget topic (500 events/s): p50 {:.1} ms, p99 {:.1} ms ({:.2}× and {:.2}× the relay)",
        pct(&latencies, 0.5) / 1e3,
        pct(&latencies, 0.99) / 1e3,
        pct(&latencies, 0.5) / pct(&relayed, 0.5),
        pct(&latencies, 0.99) / pct(&relayed, 0.99)
    );
    let (direct, frozen) = freeze_to_topic(&kafka, addr, &budget_topic).await;
    println!(
        "baseline: message produced → on the budget topic, bare producer (one hop): p50 {:.1} ms, p99 {:.1} ms",
        pct(&direct, 0.5) / 1e3,
        pct(&direct, 0.99) / 1e3
    );
    println!(
        "freeze request → state listing it on the budget topic: p50 {:.1} ms, p99 {:.1} ms ({:.2}× and {:.2}× the bare hop)",
        pct(&frozen, 0.5) / 1e3,
        pct(&frozen, 0.99) / 1e3,
        pct(&frozen, 0.5) / pct(&direct, 0.5),
        pct(&frozen, 0.99) / pct(&direct, 0.99)
    );
    let _ = stop.send(());
    service.await.unwrap().unwrap();
}

/// Freezes tenant `frz` 200 times, one request after another (20 ms apart), and times each
/// from the request to the first state on the budget topic listing it; the baseline produces 200
/// messages straight to the same topic and times their arrival.
async fn freeze_to_topic(kafka: &KafkaConfig, addr: SocketAddr, budget_topic: &str) -> (Vec<Duration>, Vec<Duration>) {
    const FREEZES: i64 = 200;
    let count = |key: &'static str, field: &'static str| {
        move |k: &[u8], v: &serde_json::Value| {
            (k == key.as_bytes()).then(|| if field == "freezes" { v[field].as_array().map_or(0, |a| a.len() as i64) } else { v[field].as_i64().unwrap_or(0) })
        }
    };
    let publisher = EventPublisher::new(kafka, budget_topic).unwrap();
    let watcher = watch(kafka, budget_topic, FREEZES, count("hop", "n"));
    let mut sent = Vec::new();
    for i in 0..FREEZES {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sent.push(Instant::now());
        drop(publisher.enqueue(Some(b"hop"), serde_json::json!({"n": i + 1}).to_string().as_bytes(), &[]).await.unwrap());
    }
    let direct = arrivals(&sent, tokio::task::block_in_place(|| watcher.join().unwrap()));
    let watcher = watch(kafka, budget_topic, FREEZES, count("frz", "freezes"));
    let mut conn = Conn::open(addr).await;
    let mut sent = Vec::new();
    for i in 0..FREEZES {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sent.push(Instant::now());
        let (status, answer) = conn.post("/v1/tenants/frz/freeze", &format!(r#"{{"reason":"bench {i}","scope":{{"task_id":"t{i}"}}}}"#)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }
    (direct, arrivals(&sent, tokio::task::block_in_place(|| watcher.join().unwrap())))
}

/// Watches `topic` (from its end) until a message says `want` things are included, on a thread:
/// `included` reads that count from a message's key and JSON, `None` for other messages.
fn watch(
    kafka: &KafkaConfig,
    topic: &str,
    want: i64,
    included: impl Fn(&[u8], &serde_json::Value) -> Option<i64> + Send + 'static,
) -> std::thread::JoinHandle<Vec<(i64, Instant)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", format!("{topic}.watch.{want}.{}", std::process::id()))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    // Let the watcher join before measuring.
    let joined = Instant::now();
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 && joined.elapsed() < Duration::from_secs(30) {
        consumer.poll(Duration::from_millis(100));
    }
    // A first poll after the assignment, so "latest" is resolved before anything is sent.
    consumer.poll(Duration::from_millis(200));
    std::thread::spawn(move || {
        let mut seen: Vec<(i64, Instant)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default()) else { continue };
                let Some(count) = included(m.key().unwrap_or_default(), &v) else { continue };
                seen.push((count, Instant::now()));
                if count >= want {
                    break;
                }
            }
        }
        seen
    })
}

/// For each thing sent at `sent[k]`, the time until the first watched message including it.
fn arrivals(sent: &[Instant], seen: Vec<(i64, Instant)>) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for (k, at) in sent.iter().enumerate() {
        if let Some((_, arrived)) = seen.iter().find(|(count, _)| *count > k as i64) {
            latencies.push(arrived.saturating_duration_since(*at));
        }
    }
    latencies.sort();
    assert_eq!(latencies.len(), sent.len(), "every one arrived");
    latencies
}

/// Publishes 2,000 events of tenant `lat` to `events` at 500/s and times each one's arrival on
/// `watched`: `included` reads from a watched message how many of the events it includes.
async fn event_to_topic(
    kafka: &KafkaConfig,
    events: &str,
    watched: &str,
    included: impl Fn(&serde_json::Value) -> Option<i64> + Send + 'static,
) -> Vec<Duration> {
    const EVENTS: u32 = 2_000;
    let watcher = watch(kafka, watched, i64::from(EVENTS), move |key, value| if key == b"lat" { included(value) } else { None });
    let publisher = EventPublisher::new(kafka, events).unwrap();
    let mut produced = Vec::new();
    let start = Instant::now();
    for i in 0..EVENTS {
        tokio::time::sleep_until((start + Duration::from_micros(2_000 * u64::from(i))).into()).await;
        let event = serde_json::json!({"event_id": format!("lat{i}"), "tenant_id": "lat", "occurred_at": jiff::Timestamp::now().to_string(),
            "kind": "llm_call", "cost": {"amount_micros": 1, "currency": "USD"}});
        produced.push(Instant::now());
        // The watcher sees it arrive; dropping the delivery report does not cancel it.
        drop(publisher.enqueue(Some(b"lat"), &serde_json::to_vec(&event).unwrap(), &[]).await.unwrap());
    }
    arrivals(&produced, tokio::task::block_in_place(|| watcher.join().unwrap()))
}
