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
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").expect("KAFKA_BOOTSTRAP is not set: run the tests with scripts/test.sh, which starts a broker");
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

pub async fn send_raw(producer: &FutureProducer, topic: &str, key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])]) -> (i32, i64) {
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

/// A plain consumer (no group offsets committed) reading `partitions` partitions of `topic` from
/// their beginning, for tests that read a topic back.
pub fn topic_reader(kafka: &KafkaConfig, topic: &str, partitions: i32) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer as _;
    let reader: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    reader.assign(&tpl).unwrap();
    reader
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

/// `GET path` over plain HTTP/1.0: (status, body), or `None` while nothing listens.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((std::str::from_utf8(response.get(9..12)?).ok()?.parse().ok()?, response[split + 4..].to_vec()))
}

/// The sum of a metric's samples in Prometheus text (`name value` and `name{labels} value`
/// lines), so a test can count dead letters across reasons.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') { rest.split_once("} ")?.1 } else { rest.strip_prefix(' ')? };
            value.parse::<f64>().ok()
        })
        .sum()
}

/// A topic (and its DLQ) plus a fresh signing key in a temporary directory.
pub struct LedgerFixture {
    pub topic: String,
    pub dir: tempfile::TempDir,
    pub key_path: std::path::PathBuf,
    pub key: tally_ledger::LedgerKey,
}

pub async fn ledger_fixture(prefix: &str, partitions: i32) -> LedgerFixture {
    ledger_fixture_on(&kafka(), prefix, partitions).await
}

pub async fn ledger_fixture_on(kafka: &KafkaConfig, prefix: &str, partitions: i32) -> LedgerFixture {
    let kafka = kafka.clone();
    let topic = unique_topic(prefix);
    create_topic(&kafka, &topic, partitions).await;
    create_topic(&kafka, &format!("{topic}.dlq"), partitions).await;
    // The budget topic `ledger_config` names: the ledger refuses to start without it.
    ensure_topics(&kafka, &[TopicSpec { compacted: true, ..TopicSpec::new(format!("{topic}.budget"), partitions) }]).await.expect("create topic");
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("ledger.key");
    let key = tally_ledger::LedgerKey::generate("tally.example.com").unwrap();
    key.write_new(&key_path).unwrap();
    LedgerFixture { topic, dir, key_path, key }
}

/// A ledger service running in this process.
pub struct Running {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<tally_ledger::Result<()>>,
}

/// The service configuration the tests start from.
pub fn ledger_config(data: &std::path::Path, key: &std::path::Path, topic: &str, group: &str, commit_interval_ms: u64) -> tally_ledger::service::ServiceConfig {
    tally_ledger::service::ServiceConfig {
        data_dir: data.to_path_buf(),
        keys: vec![key.to_path_buf()],
        topic: topic.to_string(),
        dlq_topic: None,
        assignment: tally_ledger::service::AssignmentMode::Assign,
        partitions: None,
        group: group.to_string(),
        commit_interval_ms,
        listen: "127.0.0.1:0".parse().unwrap(),
        tokens: None,
        budgets: None,
        budget_topic: format!("{topic}.budget"),
        advertise_url: None,
        rejoin_after_ms: 30_000,
        projection_interval_ms: 1000,
        report_time_zones: vec!["UTC".into()],
        statement_grace_ms: 86_400_000,
        // These tests count the records their events make; closing periods (docs/billing.md) adds
        // records of its own and is tested on its own (and in the demo).
        statements: false,
    }
}

pub async fn start_ledger(data: &std::path::Path, key: &std::path::Path, topic: &str, group: &str, commit_interval_ms: u64) -> Running {
    start_service(ledger_config(data, key, topic, group, commit_interval_ms)).await
}

pub async fn start_service(config: tally_ledger::service::ServiceConfig) -> Running {
    start_service_on(config, kafka()).await
}

pub async fn start_service_on(config: tally_ledger::service::ServiceConfig, kafka: KafkaConfig) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tally_ledger::service::run(config, kafka, listener, async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

/// `POST path` with a JSON body: (status, parsed JSON body).
pub async fn http_post(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value) -> Option<(u16, serde_json::Value)> {
    http_post_with(addr, path, body, &[]).await
}

/// [`http_post`] with extra request headers.
pub async fn http_post_with(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value, headers: &[(&str, &str)]) -> Option<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let body = body.to_string();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let request = format!("POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = std::str::from_utf8(response.get(9..12)?).ok()?.parse().ok()?;
    Some((status, serde_json::from_slice(&response[split + 4..]).unwrap_or(serde_json::Value::Null)))
}

impl Running {
    /// Waits until every tenant's served checkpoint has the expected size (fails after 90 s, or
    /// as soon as one is larger).
    pub async fn wait_for(&self, sizes: &std::collections::BTreeMap<String, u64>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let mut done = true;
            for (tenant, &size) in sizes {
                let (status, body) = http_get(self.addr, &format!("/t/{tenant}/checkpoint")).await.expect("ledger answers");
                let got = (status == 200).then(|| String::from_utf8(body).unwrap().lines().nth(1).unwrap().parse::<u64>().unwrap());
                done &= got == Some(size);
                assert!(got.is_none_or(|g| g <= size), "{tenant} has {got:?} entries, more than the {size} expected");
            }
            if done {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "checkpoints did not reach {sizes:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the service (as SIGTERM would) and asserts it ran without error.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().expect("service ran without error");
    }

    /// Waits (up to 90 s) for the service to stop by itself, and returns how it ended.
    pub async fn ended(self) -> tally_ledger::Result<()> {
        tokio::time::timeout(Duration::from_secs(90), self.task).await.expect("the service never stopped").unwrap()
    }
}

/// The real `tally ledger` binary, SIGKILLed when dropped, so a failing test never leaves one
/// running.
pub struct LedgerProcess(std::process::Child);

impl LedgerProcess {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM (a clean shutdown), and wait for it.
    pub fn terminate(&mut self) {
        let status = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().unwrap();
        assert!(status.success());
        self.0.wait().unwrap();
    }
}

impl Drop for LedgerProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Starts the real `tally ledger` binary, appending its stderr to `log`.
pub fn spawn_ledger_binary(config: &std::path::Path, log: &std::path::Path) -> LedgerProcess {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["--config", config.to_str().unwrap(), "ledger"])
        .env("RUST_LOG", "warn,tally_ledger=info")
        // The config file names the broker; KAFKA_BOOTSTRAP would override it.
        .env_remove("KAFKA_BOOTSTRAP")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tally ledger");
    LedgerProcess(child)
}

/// A Tansu of this test's own, on a free port with fresh storage, stopped when dropped.
///
/// For the tests that churn consumer groups hardest (kill -9 restarts, two instances): Tansu
/// 0.6.0's group coordinator slows down as groups accumulate over a test run, until heartbeats
/// go unanswered within a session timeout. A fresh broker keeps those tests about the ledger.
pub struct PrivateBroker {
    pub kafka: KafkaConfig,
    port: u16,
    data: tempfile::TempDir,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data = tempfile::tempdir().unwrap();
        let out = Self::script("start", port, data.path());
        assert!(out.status.success(), "kafka.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
        let bootstrap = String::from_utf8(out.stdout).unwrap().trim().to_string();
        PrivateBroker { kafka: KafkaConfig::with_bootstrap(bootstrap), port, data }
    }

    /// Stops the broker, keeping its storage, as an outage would.
    pub fn stop(&self) {
        let out = Self::script("stop", self.port, self.data.path());
        assert!(out.status.success(), "kafka.sh stop failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the broker again on the same port and storage, after [`PrivateBroker::stop`].
    pub fn start_again(&self) {
        let out = Self::script("start", self.port, self.data.path());
        assert!(out.status.success(), "kafka.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn script(action: &str, port: u16, data: &std::path::Path) -> std::process::Output {
        std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .arg(action)
            .env_remove("KAFKA_BOOTSTRAP")
            .env("TALLY_BROKER_PORT", port.to_string())
            .env("TALLY_BROKER_DATA", data)
            .env("TALLY_BROKER_PARTITIONS", "1")
            .output()
            .expect("run scripts/kafka.sh")
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Self::script("stop", self.port, self.data.path());
    }
}

/// Starts `tally_query::run` on a free port over `data`; no tokens (loopback only). Sending on
/// (or dropping) the returned sender stops it.
pub async fn start_query(data: &std::path::Path) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config: tally_query::QueryConfig = toml::from_str(&format!("data_dir = {:?}\n", data)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tally_query::run(config, listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}
