//! Budgets end to end against the real broker: cost events published → the tenant's state on the
//! budget topic says `exceeded` → the next authorize is denied; a budgets-file change takes effect
//! without a restart; an unknown model is charged at the ceiling. And admissions across a
//! `kill -9` of the ledger binary: reservations and totals survive, no overshoot, and a retried
//! authorize (same `Idempotency-Key`) never reserves twice, across the kill.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use tally_ingest::EventPublisher;

const BUDGETS: &str = r#"
[plans.standard]
day_micros = 1_000
ceiling = { input_per_million_micros = 10_000_000, output_per_million_micros = 30_000_000 }
[plans.standard.prices."gpt-5-mini"]
input_per_million_micros = 250_000
output_per_million_micros = 2_000_000
[tenants.acme]
plan = "standard"
[tenants.globex]
plan = "standard"
"#;

fn now_event(tenant: &str, id: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut e = serde_json::json!({"event_id": id, "tenant_id": tenant, "occurred_at": jiff::Timestamp::now().to_string(), "kind": "llm_call"});
    e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::to_vec(&e).unwrap()
}

/// Everything read from the budget topic so far, so a wait for one key never loses another's.
struct BudgetWatch {
    consumer: BaseConsumer,
    seen: Vec<(String, serde_json::Value)>,
}

impl BudgetWatch {
    /// Waits for a message with this key whose JSON satisfies `want` (including ones already read).
    fn wait(&mut self, key: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        self.wait_after(0, key, want)
    }

    /// [`BudgetWatch::wait`], among the messages read after the first `skip`.
    fn wait_after(&mut self, skip: usize, key: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((_, v)) = self.seen.iter().skip(skip).find(|(k, v)| k == key && want(v)) {
                return v.clone();
            }
            assert!(Instant::now() < deadline, "no matching budget state for {key}; saw {:?}", self.seen);
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(200)) {
                let k = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                self.seen.push((k, serde_json::from_slice(m.payload().unwrap()).unwrap()));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeded_state_reaches_the_budget_topic_and_the_next_authorize_is_denied() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("budget", 4).await;
    create_topic(&kafka, &format!("{topic}.budget"), 4).await;
    let budgets = dir.path().join("budgets.toml");
    std::fs::write(&budgets, BUDGETS).unwrap();
    let mut config = ledger_config(&dir.path().join("data"), &key_path, &topic, &format!("{topic}.g"), 100);
    config.budgets = Some(budgets.clone());
    let service = start_service(config).await;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", format!("{topic}.watch"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{topic}.budget")]).unwrap();
    let mut watch = BudgetWatch { consumer, seen: Vec::new() };

    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    for i in 0..3 {
        let cost = serde_json::json!({"cost": {"amount_micros": 400, "currency": "USD"}});
        publisher.publish(Some(b"acme"), &now_event("acme", &format!("a{i}"), cost), &[]).await.unwrap();
    }
    // An unpriced call with a model missing from the table: charged at the ceiling, flagged.
    let unpriced = serde_json::json!({"action": "mystery-9", "usage": {"input_tokens": 10, "output_tokens": 10}});
    publisher.publish(Some(b"globex"), &now_event("globex", "g0", unpriced), &[]).await.unwrap();

    let state = tokio::task::block_in_place(|| watch.wait("acme", |v| v["status"] == "exceeded"));
    let day = state["levels"].as_array().unwrap().iter().find(|l| l["level"] == "day").unwrap().clone();
    assert_eq!((day["spent_micros"].as_i64(), day["limit_micros"].as_i64()), (Some(1_200), Some(1_000)), "{state}");
    let globex = tokio::task::block_in_place(|| watch.wait("globex", |v| v["ceiling_priced_events"] == 1));
    let day = globex["levels"].as_array().unwrap().iter().find(|l| l["level"] == "day").unwrap().clone();
    assert_eq!(day["spent_micros"].as_i64(), Some(100 + 300), "never $0: {globex}");

    let (status, verdict) = http_post(service.addr, "/v1/tenants/acme/budget/authorize", &serde_json::json!({"estimate_micros": 1})).await.unwrap();
    assert_eq!((status, verdict["decision"].as_str(), verdict["denied_by"].as_str()), (200, Some("deny"), Some("day")), "{verdict}");
    // The exceeded decision is in acme's signed log (seq 0 is its config record), right after
    // the event that crossed.
    let (_, record) = http_get(service.addr, "/v1/tenants/acme/records/4").await.unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!((record["type"].as_str(), record["status"].as_str(), record["level"].as_str()), (Some("budget"), Some("exceeded"), Some("day")), "{record}");

    // Raising the limit takes effect without a restart: a config record, then `restored`.
    std::fs::write(&budgets, BUDGETS.replace("day_micros = 1_000", "day_micros = 10_000")).unwrap();
    let raised = |v: &serde_json::Value| v["levels"].as_array().is_some_and(|l| l.iter().any(|l| l["level"] == "day" && l["limit_micros"] == 10_000));
    let state = tokio::task::block_in_place(|| watch.wait("acme", raised));
    assert_eq!(state["status"], "ok", "{state}");
    let (_, verdict) = http_post(service.addr, "/v1/tenants/acme/budget/authorize", &serde_json::json!({"estimate_micros": 1})).await.unwrap();
    assert_eq!(verdict["decision"], "allow", "{verdict}");

    // Settlement on the topic: a reservation for a task, then the event that settles it. The
    // task's key shows the hold, then the hold gone and the real charge spent.
    let body = serde_json::json!({"task_id": "t-settle", "estimate_micros": 500});
    let (_, verdict) = http_post(service.addr, "/v1/tenants/acme/budget/authorize", &body).await.unwrap();
    let reservation = verdict["reservation_id"].as_str().unwrap().to_string();
    let task = |v: &serde_json::Value, reserved: i64, spent: i64| {
        v["levels"].as_array().is_some_and(|l| l.iter().any(|l| l["level"] == "task" && l["reserved_micros"] == reserved && l["spent_micros"] == spent))
    };
    tokio::task::block_in_place(|| watch.wait("acme/t-settle", |v| task(v, 500, 0)));
    let settle = serde_json::json!({"task_id": "t-settle", "reservation_id": reservation, "cost": {"amount_micros": 300, "currency": "USD"}});
    publisher.publish(Some(b"acme"), &now_event("acme", "a-settle", settle), &[]).await.unwrap();
    tokio::task::block_in_place(|| watch.wait("acme/t-settle", |v| task(v, 0, 300)));

    // A freeze wakes the consume loop, which publishes acme's state listing it; an unfreeze the
    // state without it.
    let (status, frozen) = http_post(service.addr, "/v1/tenants/acme/freeze", &serde_json::json!({"reason": "test"})).await.unwrap();
    assert_eq!(status, 200, "{frozen}");
    let id = frozen["freeze_id"].as_str().unwrap().to_string();
    tokio::task::block_in_place(|| watch.wait("acme", |v| v["freezes"][0]["freeze_id"] == id.as_str()));
    let (status, _) = http_post(service.addr, "/v1/tenants/acme/unfreeze", &serde_json::json!({"freeze_id": id})).await.unwrap();
    assert_eq!(status, 200);
    let seen = watch.seen.len();
    tokio::task::block_in_place(|| watch.wait_after(seen, "acme", |v| v["freezes"].as_array().is_some_and(Vec::is_empty)));
    service.stop().await;
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(addr, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "ledger not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A ledger binary with a $5 period budget for acme on `topic`, its HTTP address and log file.
async fn admission_ledger(prefix: &str) -> (LedgerFixture, SocketAddr, std::path::PathBuf, std::path::PathBuf) {
    let kafka = kafka();
    let fixture = ledger_fixture(prefix, 2).await;
    let (topic, dir, key_path) = (&fixture.topic, &fixture.dir, &fixture.key_path);
    create_topic(&kafka, &format!("{topic}.budget"), 2).await;
    let budgets = dir.path().join("budgets.toml");
    std::fs::write(&budgets, "[tenants.acme]\nperiod_micros = 5_000_000\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.path().join("ledger.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap = \"{}\"\n\
             [ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\ngroup = \"{topic}.g\"\nlisten = \"{addr}\"\n\
             budgets = \"{}\"\nbudget_topic = \"{topic}.budget\"\n",
            kafka.bootstrap,
            dir.path().join("data").display(),
            key_path.display(),
            budgets.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("ledger.log");
    (fixture, addr, config, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_and_totals_survive_kill_9_without_overshoot() {
    let (_fixture, addr, config, log) = admission_ledger("admit").await;

    // 1,000 authorize calls of $0.10 against $5, 16 at a time; the ledger is SIGKILLed after the
    // first 300 answers and restarted. A call in flight at the kill gets no answer (as a gateway
    // would see a connection error); it may or may not have made a reservation.
    let mut child = spawn_ledger_binary(&config, &log);
    wait_ready(addr).await;
    let mut allowed = 0u32;
    let mut answered = 0u32;
    let mut next = 0u32;
    let mut killed = false;
    while next < 1_000 {
        let mut batch = Vec::new();
        for _ in 0..16 {
            if next < 1_000 {
                let body = serde_json::json!({"task_id": format!("t{next}"), "estimate_micros": 100_000, "ttl_ms": 3_600_000});
                batch.push(tokio::spawn(async move { http_post(addr, "/v1/tenants/acme/budget/authorize", &body).await }));
                next += 1;
            }
        }
        for call in batch {
            if let Some((200, v)) = call.await.unwrap() {
                answered += 1;
                if v["decision"] == "allow" {
                    allowed += 1;
                }
            }
        }
        if !killed && answered >= 300 {
            child.kill(); // SIGKILL
            killed = true;
            child = spawn_ledger_binary(&config, &log);
            wait_ready(addr).await;
            // Reservations made before the kill are still held after it.
            let (_, state) = http_get(addr, "/v1/tenants/acme/budget").await.unwrap();
            let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
            let period = state["levels"].as_array().unwrap().iter().find(|l| l["level"] == "period").unwrap().clone();
            assert!(period["reserved_micros"].as_i64().unwrap() >= i64::from(allowed) * 100_000, "{state} after {allowed} allowed");
        }
    }
    assert!(killed);
    assert!(allowed <= 50, "overshoot: {allowed} reservations of $0.10 against $5");
    let (_, state) = http_get(addr, "/v1/tenants/acme/budget").await.unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    let period = state["levels"].as_array().unwrap().iter().find(|l| l["level"] == "period").unwrap().clone();
    // Every answered allow is still held (nothing a gateway was told about was lost), the cap is
    // fully used by the 1,000 calls, and never exceeded.
    let reserved = period["reserved_micros"].as_i64().unwrap();
    assert!(reserved >= i64::from(allowed) * 100_000, "{state} after {allowed} allowed");
    assert_eq!(reserved, 5_000_000, "{state}");
    assert_eq!(period["remaining_micros"].as_i64(), Some(0), "{state}");
    child.terminate();
}

/// 1,000 authorizes of $0.10 against $5, each with its own `Idempotency-Key`; 20% of them are
/// sent twice at once (a retry racing its original), the ledger is SIGKILLed in the middle, and
/// every call left without an answer is retried with its key after the restart. The cap ends
/// exactly full, every key got one answer however often it was sent, and no reservation was made
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_retries_across_kill_9_never_reserve_twice() {
    let (_fixture, addr, config, log) = admission_ledger("idem").await;
    let mut child = spawn_ledger_binary(&config, &log);
    wait_ready(addr).await;
    let ask = |i: u32| async move {
        let key = format!("req-{i}");
        let body = serde_json::json!({"task_id": format!("t{i}"), "estimate_micros": 100_000, "ttl_ms": 3_600_000});
        (i, http_post_with(addr, "/v1/tenants/acme/budget/authorize", &body, &[("Idempotency-Key", &key)]).await)
    };
    let mut answers: std::collections::BTreeMap<u32, Vec<serde_json::Value>> = std::collections::BTreeMap::new();
    let mut unanswered = std::collections::BTreeSet::new();
    let (mut next, mut killed) = (0u32, false);
    while next < 1_000 {
        let mut batch = Vec::new();
        for _ in 0..16 {
            if next < 1_000 {
                batch.push(tokio::spawn(ask(next)));
                if next % 5 == 0 {
                    batch.push(tokio::spawn(ask(next)));
                }
                next += 1;
            }
        }
        for call in batch {
            match call.await.unwrap() {
                (i, Some((200, v))) => answers.entry(i).or_default().push(v),
                (i, _) => {
                    unanswered.insert(i);
                }
            }
        }
        if !killed && answers.len() >= 300 {
            child.kill(); // SIGKILL
            killed = true;
            child = spawn_ledger_binary(&config, &log);
            wait_ready(addr).await;
        }
    }
    assert!(killed);
    // A gateway retries what it got no answer for, with the same key.
    for i in unanswered {
        if let (i, Some((200, v))) = ask(i).await {
            answers.entry(i).or_default().push(v);
        }
    }
    // And every key once more after everything: still its first answer.
    for i in (0..1_000).step_by(7) {
        if let (i, Some((200, v))) = ask(i).await {
            answers.entry(i).or_default().push(v);
        }
    }
    assert_eq!(answers.len(), 1_000, "every request was answered in the end");
    let mut reservations = std::collections::BTreeSet::new();
    for (i, seen) in &answers {
        let first = &seen[0];
        for other in seen {
            assert_eq!(
                (&other["decision"], &other["reservation_id"], &other["seq"]),
                (&first["decision"], &first["reservation_id"], &first["seq"]),
                "req-{i}: {seen:?}"
            );
        }
        if first["decision"] == "allow" {
            assert!(reservations.insert(first["reservation_id"].as_str().unwrap().to_string()), "req-{i} shares a reservation");
        }
    }
    assert_eq!(reservations.len(), 50, "exactly the cap: 50 reservations of $0.10 against $5");
    let (_, state) = http_get(addr, "/v1/tenants/acme/budget").await.unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    let period = state["levels"].as_array().unwrap().iter().find(|l| l["level"] == "period").unwrap().clone();
    assert_eq!((period["reserved_micros"].as_i64(), period["remaining_micros"].as_i64()), (Some(5_000_000), Some(0)), "{state}");
    child.terminate();
}
