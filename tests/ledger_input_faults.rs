//! The ledger service against the real broker, fed what a careless producer or operator sends:
//! events off their tenant's home partition, events dated after their message or ahead of the ledger, a message too large to dead-letter whole, a budget
//! topic that does not exist, and a topic recreated under the ledger. Each reproduces a defect
//! from the outside review: a forked log, a partition stopped for good, a late crash, offsets
//! silently skipped.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tally_ingest::{tenant_partition, EventPublisher, HEADER_DLQ_FORM, HEADER_ERROR_CODE};

/// Every message of `topic` (all `partitions`), as (headers, value), once `want` have arrived.
fn read_topic(kafka: &tally_ingest::KafkaConfig, topic: &str, partitions: i32, want: usize) -> Vec<(BTreeMap<String, String>, Vec<u8>)> {
    let reader = topic_reader(kafka, topic, partitions);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let Some(msg) = reader.poll(Duration::from_millis(200)) else { continue };
        let msg = msg.unwrap();
        let headers = msg
            .headers()
            .map(|hs| hs.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
            .unwrap_or_default();
        out.push((headers, msg.payload().unwrap_or_default().to_vec()));
    }
    out
}

/// Waits until `tenant`'s served checkpoint has `size` records.
async fn wait_for_size(running: &Running, tenant: &str, size: u64) {
    running.wait_for(&BTreeMap::from([(tenant.to_string(), size)])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_off_their_home_partition_are_dead_lettered_never_a_second_log() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("wrongpart", 4).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    for i in 0..5 {
        publisher.publish(Some(b"initech"), &event_json("initech", &format!("home-{i}"), 10), &[]).await.unwrap();
    }
    // A gateway on librdkafka's default partitioner puts some of initech's events elsewhere.
    let home = tenant_partition("initech", 4);
    let elsewhere = (home + 1) % 4;
    let producer = raw_producer(&kafka);
    for i in 0..3 {
        let value = event_json("initech", &format!("stray-{i}"), 10);
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).key(&b"initech"[..]).payload(&value[..]).partition(elsewhere);
        producer.send(record, Duration::from_secs(30)).await.unwrap();
    }
    publisher.publish(Some(b"initech"), &event_json("initech", "home-last", 10), &[]).await.unwrap();

    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    wait_for_size(&running, "initech", 6).await;
    let dlq = read_topic(&kafka, &format!("{topic}.dlq"), 4, 3);
    assert_eq!(dlq.len(), 3, "each stray event is dead-lettered");
    for (headers, _) in &dlq {
        assert_eq!(headers.get(HEADER_ERROR_CODE).map(String::as_str), Some("wrong_partition"), "{headers:?}");
    }
    running.stop().await;
    // One log for initech, under its home partition only.
    let key = tally_ledger::LedgerKey::read(&key_path).unwrap();
    let logs: Vec<i32> = (0..4)
        .filter(|p| {
            let dir = dir.path().join("partitions").join(format!("{topic}-{p}"));
            dir.exists() && tally_ledger::Ledger::open_read_only(&dir, vec![key.clone()]).unwrap().has_tenant("initech")
        })
        .collect();
    assert_eq!(logs, vec![home], "initech has exactly one log");
}

/// An event dated more than an hour after its message was published, or whose message is stamped
/// more than an hour ahead of the ledger's clock, is a broken clock: it is dead-lettered
/// (`occurred_after_publish`, `timestamp_in_future`), so it opens no billing period or budget
/// window in the future and does not move the clock periods close on; the events around it are
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dated_after_their_message_or_ahead_of_the_ledger_are_dead_lettered() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("ahead", 1).await;
    let producer = raw_producer(&kafka);
    // event_json's events occurred at 2026-11-02T09:15:00Z.
    let occurred_ms = 1_793_610_900_000;
    let in_2099 = serde_json::to_vec(&serde_json::json!({
        "event_id": "future", "tenant_id": "acme", "occurred_at": "2099-01-01T00:00:00Z", "kind": "llm_call",
    }))
    .unwrap();
    let messages = [
        (event_json("acme", "before", 10), occurred_ms + 1_000),
        (event_json("acme", "skewed", 10), occurred_ms - 3_600_000),
        (event_json("acme", "ahead", 10), occurred_ms - 3_601_000),
        (in_2099, 4_070_908_800_000),
        (event_json("acme", "after", 10), occurred_ms + 2_000),
    ];
    for (value, published_ms) in &messages {
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).key(&b"acme"[..]).payload(&value[..]).timestamp(*published_ms);
        producer.send(record, Duration::from_secs(30)).await.unwrap();
    }
    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    wait_for_size(&running, "acme", 3).await;
    let dlq = read_topic(&kafka, &format!("{topic}.dlq"), 1, 2);
    let codes: Vec<(String, String)> = dlq
        .iter()
        .map(|(headers, value)| {
            let id = serde_json::from_slice::<serde_json::Value>(value).ok().and_then(|v| v["event_id"].as_str().map(str::to_string)).unwrap_or_default();
            (id, headers.get(HEADER_ERROR_CODE).cloned().unwrap_or_default())
        })
        .collect();
    assert_eq!(codes, [("ahead".to_string(), "occurred_after_publish".to_string()), ("future".to_string(), "timestamp_in_future".to_string())]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_to_dead_letter_whole_goes_in_bounded_form_and_the_partition_goes_on() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("hugedlq", 1).await;
    let producer = raw_producer(&kafka);
    // 1.04 MB: within what the broker takes, past it once the DLQ's headers are added.
    let huge = vec![b'x'; 1_040_000];
    let mut owned = OwnedHeaders::new();
    owned = owned.insert(Header { key: "trace", value: Some(&b"t-1"[..]) });
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).key(&b"acme"[..]).payload(&huge[..]).headers(owned);
    producer.send(record, Duration::from_secs(30)).await.unwrap();
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    publisher.publish(Some(b"acme"), &event_json("acme", "after-the-huge-one", 10), &[]).await.unwrap();

    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    wait_for_size(&running, "acme", 1).await;
    let dlq = read_topic(&kafka, &format!("{topic}.dlq"), 1, 1);
    assert_eq!(dlq.len(), 1);
    let (headers, value) = &dlq[0];
    assert_eq!(headers.get(HEADER_ERROR_CODE).map(String::as_str), Some("too_large"));
    assert!(value.len() < 16 * 1024, "a bounded form is small, not {} bytes", value.len());
    let form = headers.get(HEADER_DLQ_FORM).cloned();
    let json: serde_json::Value = serde_json::from_slice(value).unwrap_or(serde_json::Value::Null);
    assert_eq!((form.as_deref(), json["value_bytes"].as_u64()), (Some("bounded"), Some(1_040_000)), "{json}");
    assert_eq!(headers.get("trace").map(String::as_str), Some("t-1"), "small original headers are kept");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_budget_or_dlq_topic_is_named_at_start() {
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("notopic", 1).await;
    let mut config = ledger_config(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100);
    config.budget_topic = format!("{topic}.no-such-budget-topic");
    config.dlq_topic = Some(format!("{topic}.no-such-dlq"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = tally_ledger::service::run(config, kafka(), listener, std::future::pending::<()>());
    let err = tokio::time::timeout(Duration::from_secs(60), started).await.expect("refused at start, not later").unwrap_err().to_string();
    assert!(err.contains("ledger.budget_topic") && err.contains("no-such-budget-topic"), "{err}");
    assert!(err.contains("ledger.dlq_topic") && err.contains("no-such-dlq"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_recreated_under_the_ledger_stops_it_with_a_clear_error() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("recreated", 1).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    for i in 0..5 {
        publisher.publish(Some(b"acme"), &event_json("acme", &format!("e{i}"), 10), &[]).await.unwrap();
    }
    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    wait_for_size(&running, "acme", 5).await;
    running.stop().await;

    // The same name, recreated empty but for one message: what the ledger sees after a topic
    // is deleted and created again. (A fresh topic stands in for it; the data directory is
    // moved to its name.)
    let LedgerFixture { topic: again, .. } = ledger_fixture("recreated", 1).await;
    let parts = dir.path().join("partitions");
    std::fs::rename(parts.join(format!("{topic}-0")), parts.join(format!("{again}-0"))).unwrap();
    std::fs::rename(parts.join(format!("{topic}.partition-count")), parts.join(format!("{again}.partition-count"))).unwrap();
    EventPublisher::new(&kafka, &again).unwrap().publish(Some(b"acme"), &event_json("acme", "new-0", 10), &[]).await.unwrap();
    let config = ledger_config(dir.path(), &key_path, &again, &format!("{again}.g"), 100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = tally_ledger::service::run(config, kafka.clone(), listener, std::future::pending::<()>());
    let err = tokio::time::timeout(Duration::from_secs(90), run).await.expect("stops by itself").unwrap_err().to_string();
    assert!(err.contains("recreated") && err.contains("below 5"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_is_refused_at_start() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("regrown", 2).await;
    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    running.stop().await;
    assert_eq!(std::fs::read_to_string(dir.path().join("partitions").join(format!("{topic}.partition-count"))).unwrap().trim(), "2");
    // The same data directory on a topic of another partition count.
    let LedgerFixture { topic: wider, .. } = ledger_fixture("regrown", 4).await;
    let parts = dir.path().join("partitions");
    std::fs::rename(parts.join(format!("{topic}.partition-count")), parts.join(format!("{wider}.partition-count"))).unwrap();
    let config = ledger_config(dir.path(), &key_path, &wider, &format!("{wider}.g"), 100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tally_ledger::service::run(config, kafka, listener, std::future::pending::<()>()).await.unwrap_err().to_string();
    assert!(err.contains("has 4 partitions") && err.contains("built with 2"), "{err}");
}

/// One hostile message of kind `i % 12` (kinds 0 to 2 are valid events): what a broken or
/// malicious producer sends, mixed at volume.
fn hostile_message(i: u64, tenant: &str, rng: &mut rand::rngs::StdRng) -> (Vec<u8>, Vec<(&'static str, Vec<u8>)>) {
    use rand::Rng as _;
    let valid = || event_json(tenant, &format!("v-{i}"), 10);
    match i % 12 {
        0..=2 => (valid(), Vec::new()),
        // Random bytes.
        3 => ((0..rng.gen_range(1..200)).map(|_| rng.gen::<u8>()).collect(), Vec::new()),
        // Truncated JSON.
        4 => {
            let v = valid();
            let cut = rng.gen_range(1..v.len() - 1);
            (v[..cut].to_vec(), Vec::new())
        }
        // Nested past the decoder's depth.
        5 => (format!(r#"{{"tenant_id":"{tenant}","x":{}1{}}}"#, "[".repeat(300), "]".repeat(300)).into_bytes(), Vec::new()),
        // A member twice, the second another tenant.
        6 => (format!(r#"{{"event_id":"d-{i}","tenant_id":"{tenant}","tenant_id":"other","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call"}}"#).into_bytes(), Vec::new()),
        // Numbers past every integer type.
        7 => (
            format!(r#"{{"event_id":"n-{i}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{{"amount_micros":1{},"currency":"USD"}}}}"#, "0".repeat(400))
                .into_bytes(),
            Vec::new(),
        ),
        // Invalid UTF-8 in a member name.
        8 => (b"{\"event_id\":\"u\",\"tenant_\xff\xfe\":\"x\"}".to_vec(), Vec::new()),
        // Invalid UTF-8 in a CloudEvents header.
        9 => (valid(), vec![("ce_specversion", b"\xff\xfe".to_vec()), ("ce_id", format!("v-{i}").into_bytes())]),
        // A CloudEvent with the wrong spec version and no source.
        10 => (valid(), vec![("ce_specversion", b"0.3".to_vec()), ("ce_id", format!("v-{i}").into_bytes()), ("ce_type", b"x".to_vec())]),
        // Over the size limit (rarely: they are large), else a string where micros belong.
        _ if i % 1_000 == 11 => (vec![b' '; 62 * 1024], Vec::new()),
        _ => (
            format!(r#"{{"event_id":"s-{i}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{{"amount_micros":"10","currency":"USD"}}}}"#).into_bytes(),
            Vec::new(),
        ),
    }
}

/// Hostile messages the broker-level test sends. Tansu 0.6 (the test broker, shared by every
/// test running at once) stalled at 100% CPU after 100,000 such messages on the 2-core machine:
/// it stopped answering even topic creation. So the 100,000 go through the decoder every
/// consumer runs, in process, and a slice of the same mix through the real broker and service.
const BROKER_MESSAGES: u64 = 3_600;

/// One message of the mix, keyed by its tenant.
struct Hostile {
    tenant: String,
    value: Vec<u8>,
    headers: Vec<(&'static str, Vec<u8>)>,
    valid: bool,
}

/// The first `n` messages of the mix, over `tenants` tenants, always the same.
fn hostile_mix(n: u64, tenants: u64) -> Vec<Hostile> {
    use rand::SeedableRng as _;
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    (0..n)
        .map(|i| {
            let tenant = format!("t{}", i % tenants);
            let (value, headers) = hostile_message(i, &tenant, &mut rng);
            Hostile { tenant, value, headers, valid: i % 12 <= 2 }
        })
        .collect()
}

/// 100,000 messages mixing random bytes, truncated JSON, deep nesting, repeated members, huge
/// numbers, invalid UTF-8 in member names and headers, values over the limit and wrong
/// CloudEvents headers with valid events, through the decoder every consumer runs: no panic,
/// every hostile one refused with a code, every valid one decoded.
#[test]
fn a_hundred_thousand_hostile_messages_each_get_a_code_and_the_valid_ones_decode() {
    let (mut by_code, mut hostile) = (BTreeMap::<&'static str, usize>::new(), 0);
    for Hostile { tenant, value, headers, valid } in hostile_mix(100_000, 10) {
        hostile += usize::from(!valid);
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, &v[..])).collect();
        match tally_schemas::decode_message(Some(tenant.as_bytes()), &value, &headers) {
            Ok(decoded) => {
                assert!(valid && decoded.event.tenant_id == tenant, "a hostile message decoded: {}", String::from_utf8_lossy(&value[..value.len().min(200)]))
            }
            Err(rejection) => {
                assert!(!valid, "a valid event was refused: {rejection:?}");
                *by_code.entry(rejection.code.as_str()).or_default() += 1;
            }
        }
    }
    assert_eq!((by_code.values().sum::<usize>(), hostile), (74_998, 74_998), "{by_code:?}");
    for code in ["malformed_json", "duplicate_key", "wrong_type", "bad_cloudevent", "too_large"] {
        assert!(by_code.contains_key(code), "no {code} among {by_code:?}");
    }
}

/// The same mix on the real broker and service: every hostile message reaches the DLQ once with
/// a code, every valid one lands in its tenant's log, and the service neither stops nor stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_the_broker_are_dead_lettered_with_a_code_and_the_valid_ones_land() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("hostile", 2).await;
    let producer = raw_producer(&kafka);
    let (mut pending, mut valid, mut hostile) = (Vec::new(), BTreeMap::<String, u64>::new(), 0usize);
    for Hostile { tenant, value, headers, valid: is_valid } in hostile_mix(BROKER_MESSAGES, 10) {
        if is_valid {
            *valid.entry(tenant.clone()).or_default() += 1;
        } else {
            hostile += 1;
        }
        let mut owned = OwnedHeaders::new();
        for (k, v) in &headers {
            owned = owned.insert(Header { key: k, value: Some(&v[..]) });
        }
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&topic).key(tenant.as_bytes()).payload(&value[..]).headers(owned).partition(tenant_partition(&tenant, 2));
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in pending.drain(..) {
        delivery.await.unwrap().unwrap();
    }

    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    running.wait_for(&valid).await;
    let dlq = read_topic(&kafka, &format!("{topic}.dlq"), 2, hostile);
    assert_eq!(dlq.len(), hostile, "every hostile message is dead-lettered once");
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for (headers, _) in &dlq {
        let code = headers.get(HEADER_ERROR_CODE).cloned().unwrap_or_default();
        assert!(!code.is_empty(), "a dead letter without a code: {headers:?}");
        *by_code.entry(code).or_default() += 1;
    }
    for code in ["malformed_json", "duplicate_key", "wrong_type", "bad_cloudevent", "too_large"] {
        assert!(by_code.contains_key(code), "no {code} among {by_code:?}");
    }
    // Still serving, and still taking events.
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    publisher.publish(Some(b"t0"), &event_json("t0", "after-the-storm", 10), &[]).await.unwrap();
    *valid.get_mut("t0").unwrap() += 1;
    running.wait_for(&valid).await;
    running.stop().await;
}

/// `tally …` against the test broker: (success, stdout + stderr).
fn tally(args: &[&str]) -> (bool, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_tally")).args(args).env("KAFKA_BOOTSTRAP", kafka().bootstrap).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// An operator reads the DLQ (counts by code, samples, an export), replays a stray event once
/// its producer is fixed, and replays a malformed one after fixing it in the export: each is
/// recorded once, even when replayed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_inspected_by_code_and_replayed_once_fixed() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("dlqtools", 2).await;
    let dlq = format!("{topic}.dlq");
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    for i in 0..3 {
        publisher.publish(Some(b"initech"), &event_json("initech", &format!("ok-{i}"), 10), &[]).await.unwrap();
    }
    // On the wrong partition (a producer without the murmur2 partitioner), and a string where
    // integer micros belong.
    let producer = raw_producer(&kafka);
    let stray = event_json("initech", "stray", 10);
    let wrong = (tenant_partition("initech", 2) + 1) % 2;
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).key(&b"initech"[..]).payload(&stray[..]).partition(wrong);
    producer.send(record, Duration::from_secs(30)).await.unwrap();
    let malformed =
        br#"{"event_id":"fixme","tenant_id":"initech","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{"amount_micros":"10","currency":"USD"}}"#;
    publisher.publish(Some(b"initech"), malformed, &[("trace", b"t-9")]).await.unwrap();

    let running = start_ledger(dir.path(), &key_path, &topic, &format!("{topic}.g"), 100).await;
    let mut sizes = BTreeMap::from([("initech".to_string(), 3u64)]);
    running.wait_for(&sizes).await;
    assert_eq!(read_topic(&kafka, &dlq, 2, 2).len(), 2);

    let (ok, out) = tally(&["dlq", "inspect", "--dlq-topic", &dlq]);
    assert!(ok && out.contains("2 dead letters"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("wrong_partition") && l.trim_end().ends_with(" 1")), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("wrong_type") && l.trim_end().ends_with(" 1")), "{out}");
    assert!(out.contains("key=initech") && out.contains("fixme"), "samples show the key and the value: {out}");

    // The stray event, as it is: the publisher puts it on its tenant's partition. Twice.
    for _ in 0..2 {
        let (ok, out) = tally(&["dlq", "replay", "--topic", &topic, "--dlq-topic", &dlq, "--code", "wrong_partition"]);
        assert!(ok && out.contains("replayed 1 to"), "{out}");
    }
    // The malformed one, fixed in an export of it.
    let export = dir.path().join("wrong_type.jsonl");
    let (ok, out) = tally(&["dlq", "inspect", "--dlq-topic", &dlq, "--code", "wrong_type", "--export", export.to_str().unwrap()]);
    assert!(ok && out.contains("wrote 1 to"), "{out}");
    let fixed = std::fs::read_to_string(&export).unwrap().replace(r#"\"amount_micros\":\"10\""#, r#"\"amount_micros\":10"#);
    assert!(fixed.contains(r#"\"amount_micros\":10"#) && fixed.contains(r#""trace""#), "{fixed}");
    std::fs::write(&export, fixed).unwrap();
    for _ in 0..2 {
        let (ok, out) = tally(&["dlq", "replay", "--topic", &topic, "--file", export.to_str().unwrap()]);
        assert!(ok && out.contains("replayed 1 to"), "{out}");
    }
    // Each recorded once: a marker published after the replays lands as the sixth record.
    publisher.publish(Some(b"initech"), &event_json("initech", "marker", 10), &[]).await.unwrap();
    sizes.insert("initech".into(), 6);
    running.wait_for(&sizes).await;
    for (seq, id) in [(3, "stray"), (4, "fixme"), (5, "marker")] {
        let (status, record) = http_get(running.addr, &format!("/v1/tenants/initech/records/{seq}")).await.unwrap();
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        assert_eq!((status, record["event"]["event_id"].as_str()), (200, Some(id)), "{record}");
    }
    running.stop().await;
}
