//! Known answer: a fixed input through a partition ledger, and the exact bytes that must come
//! out. It pins what outsiders see (record bytes, leaf hashes, roots, signed checkpoints,
//! receipts) so a change of storage underneath (issue #13, the partition journal) can prove it
//! changed nothing: this test passes before and after.
//!
//! The input covers what a partition meets: several tenants, a budgets file with plans, prices
//! and limits, soft and hard budget decisions, retries (deduplicated), a conflicting resend,
//! rejected messages, admissions allowed and denied, a release, an expiry at a tick, rated
//! charges (event, table, ceiling) and the statements that close November, group
//! commits between batches, and a reopen (recovery) halfway. Every instant is part of the input:
//! Ed25519 signatures are deterministic, so the whole signed notes are fixed.
//!
//! When a change is meant to alter these bytes (a new record format), regenerate the expected
//! file with `TALLY_KAT_WRITE=1 cargo test -p tally-ledger --test known_answer` and say why in
//! the commit; otherwise a difference here is a bug.

use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;
use sha2::{Digest, Sha256};
use tally_ingest::Delivery;
use tally_ledger::budget::BudgetFile;
use tally_ledger::service::{AuthorizeRequest, Caller, PartitionLedger};
use tally_ledger::{LedgerKey, TenantEntries};

/// A test-only signing key (never used outside this file).
const KEY: &str = include_str!("known_answer/ledger.key");
const EXPECTED: &str = "tests/known_answer/expected.txt";
const PARTITION: i32 = 3;

const BUDGETS: &str = r#"
default_plan = "standard"

[plans.standard]
task_micros = 9_000
day_micros = 20_000
period_micros = 60_000
soft_threshold = 0.5
ceiling = { input_per_million_micros = 15_000_000, output_per_million_micros = 60_000_000 }

[plans.standard.prices."gpt-5-mini"]
input_per_million_micros = 250_000
output_per_million_micros = 2_000_000

[plans.open]

[tenants.globex]
plan = "open"

[tenants.initech]
day_micros = 3_000
time_zone = "Europe/Berlin"
"#;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// The message at `offset`, as the consumer would hand it over (key = tenant).
fn delivery(offset: i64, key: &str, value: &str) -> Delivery {
    let value = value.as_bytes().to_vec();
    let outcome = tally_schemas::decode_message(Some(key.as_bytes()), &value, &[]);
    Delivery {
        partition: PARTITION,
        offset,
        // Published from 2026-11-03T10:00:00Z on, a second apart: after every November event.
        timestamp_ms: Some(1_793_700_000_000 + offset * 1_000),
        key: Some(key.as_bytes().to_vec()),
        value,
        headers: vec![],
        outcome,
    }
}

fn event(tenant: &str, id: &str, at: &str, rest: &str) -> String {
    format!(r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"{at}","kind":"llm_call"{rest}}}"#)
}

fn cost(micros: i64) -> String {
    format!(r#","cost":{{"amount_micros":{micros},"currency":"USD"}}"#)
}

/// The messages of the topic, in offset order.
fn messages() -> Vec<Delivery> {
    let usage = r#","action":"gpt-5-mini","usage":{"input_tokens":4000,"output_tokens":1000}"#;
    let unpriced = r#","action":"mystery-model","usage":{"input_tokens":100,"output_tokens":50}"#;
    let bodies = [
        ("acme", event("acme", "a1", "2026-11-02T09:00:00Z", &format!(r#"{}{}"#, cost(4_000), r#","task_id":"t1""#))),
        ("globex", event("globex", "g1", "2026-11-02T09:00:01Z", &cost(70_000))),
        ("acme", event("acme", "a2", "2026-11-02T09:01:00Z", &format!(r#"{usage},"task_id":"t1","agent_id":"planner""#))),
        ("initech", event("initech", "i1", "2026-11-02T22:30:00Z", unpriced)),
        // A retry of a1, byte for byte: recorded once.
        ("acme", event("acme", "a1", "2026-11-02T09:00:00Z", &format!(r#"{}{}"#, cost(4_000), r#","task_id":"t1""#))),
        // Not JSON, and a tenant id that is not one: rejected, nothing recorded.
        ("acme", "{not json".to_string()),
        ("bad tenant!", event("bad tenant!", "x1", "2026-11-02T09:02:00Z", "")),
        ("acme", event("acme", "a3", "2026-11-02T09:03:00Z", &format!(r#"{}{}"#, cost(6_000), r#","task_id":"t2","actor_id":"user-7""#))),
        // a2 again, with other content: a conflict record.
        ("acme", event("acme", "a2", "2026-11-02T09:01:00Z", &cost(1))),
        ("initech", event("initech", "i2", "2026-11-02T23:10:00Z", &cost(2_500))),
        ("acme", event("acme", "a4", "2026-11-03T08:00:00Z", &format!(r#"{}{}"#, cost(12_000), r#","task_id":"t3""#))),
        ("globex", event("globex", "g2", "2026-11-03T08:00:00Z", r#","decision":"deny","reason_code":"policy.blocked","attributes":{"b":"2","a":"1"}"#)),
        ("acme", event("acme", "a5", "2026-11-03T09:00:00Z", &format!(r#"{}{}"#, cost(9_500), r#","task_id":"t4""#))),
    ];
    let mut messages: Vec<Delivery> = bodies.iter().enumerate().map(|(i, (key, value))| delivery(i as i64, key, value)).collect();
    // December's first calls, published then: the input clock passes November's end plus the
    // default grace of a day, so every tenant with charges in November gets its `statement`
    // before the first of them.
    for (i, tenant) in ["acme", "globex", "initech"].into_iter().enumerate() {
        let mut d = delivery(messages.len() as i64, tenant, &event(tenant, &format!("dec-{i}"), "2026-12-02T00:00:00Z", &cost(1_000)));
        d.timestamp_ms = Some(ts("2026-12-02T00:00:01Z").as_millisecond() + i as i64);
        messages.push(d);
    }
    messages
}

fn request(task_id: Option<&str>, estimate_micros: i64, ttl_ms: i64) -> AuthorizeRequest {
    AuthorizeRequest { task_id: task_id.map(str::to_string), estimate_micros, ttl_ms, ..AuthorizeRequest::default() }
}

/// Runs the input into a partition ledger under `dir`; returns what outsiders can see.
fn run(dir: &Path) -> String {
    let key = LedgerKey::parse(KEY).unwrap();
    let budgets: Arc<BudgetFile> = Arc::new(toml::from_str(BUDGETS).unwrap());
    let open = || {
        let mut p = PartitionLedger::open(dir, "events", PARTITION, vec![key.clone()]).unwrap();
        p.set_budget_file(Some(Arc::clone(&budgets)));
        // Subject keys derived from their ids: commitments to personal fields are then the
        // same bytes every run (a real store's keys are random).
        p.ledger().subject_keys().derive_new_keys_for_tests(|tenant, subject, period| {
            tally_log::SubjectKey::from_bytes(Sha256::digest(format!("kat subject key {tenant} {subject} {period}")).into())
        });
        p
    };
    let messages = messages();
    let mut p = open();
    for d in &messages[..5] {
        p.apply(d).unwrap();
    }
    let anonymous = Caller::default();
    let decided = p.authorize("acme", ts("2026-11-02T09:05:00Z"), &request(Some("t2"), 3_000, 60_000), &anonymous).unwrap();
    assert!(decided.verdict.allowed);
    let reservation = decided.admission.reservation_id.unwrap();
    p.authorize("initech", ts("2026-11-02T22:40:00Z"), &request(None, 5_000, 60_000), &anonymous).unwrap();
    p.commit().unwrap();
    for d in &messages[5..9] {
        p.apply(d).unwrap();
    }
    p.release("acme", &reservation, ts("2026-11-02T09:06:00Z"), &anonymous).unwrap();
    let decided = p.authorize("acme", ts("2026-11-02T09:07:00Z"), &request(Some("t9"), 2_000, 1_000), &anonymous).unwrap();
    assert!(decided.verdict.allowed);
    p.commit().unwrap();
    // Recovery: the partition is closed and opened again in the middle of the input.
    drop(p);
    let mut p = open();
    // The reservation of t9 expires (on the wall clock). Days end on the input clock: initech's
    // `exceeded` is restored once the records' times pass its midnight.
    p.tick(ts("2026-11-03T00:30:00Z")).unwrap();
    for d in &messages[9..13] {
        p.apply(d).unwrap();
    }
    let decided = p.authorize("acme", ts("2026-11-03T09:30:00Z"), &request(None, 50_000, 1_000), &anonymous).unwrap();
    assert!(!decided.verdict.allowed, "the period limit denies it");
    p.tick(ts("2026-11-04T00:00:01Z")).unwrap();
    for d in &messages[13..] {
        p.apply(d).unwrap();
    }
    p.commit().unwrap();

    let mut out = String::new();
    let tenants = p.tenants();
    for tenant in &tenants {
        let ledger = p.ledger();
        let note = ledger.checkpoint_note(tenant).unwrap();
        let log = ledger.tenant(tenant);
        let size = log.size();
        let mut entries = Sha256::new();
        let mut records = String::new();
        for seq in 0..size {
            let entry = log.entry(seq).unwrap();
            entries.update((entry.len() as u64).to_be_bytes());
            entries.update(&entry);
            records.push_str(&format!("{}\n", String::from_utf8(entry).unwrap()));
            // The values and salts that open a record's commitments (docs/privacy.md).
            if let Some(tally_log::Revealed::Open(fields)) = ledger.revealed(tenant, seq).unwrap() {
                records.push_str(&format!("   personal {}\n", serde_json::to_string(&fields).unwrap()));
            }
        }
        let (receipt, _) = ledger.receipt(tenant, size - 1).unwrap();
        out.push_str(&format!(
            "== tenant {tenant}\nsize {size}\nentries sha256 {}\n-- checkpoint\n{note}-- receipt of seq {}\n{}-- records\n{records}",
            hex::encode(entries.finalize()),
            size - 1,
            receipt.to_text()
        ));
    }
    out
}

#[test]
fn a_fixed_input_gives_the_known_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let got = run(dir.path());
    // The same input into a fresh directory gives the same bytes (nothing depends on the clock).
    let again = tempfile::tempdir().unwrap();
    assert_eq!(run(again.path()), got, "two runs of the same input differ");
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXPECTED);
    if std::env::var_os("TALLY_KAT_WRITE").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    if got != expected {
        let first = got.lines().zip(expected.lines()).position(|(a, b)| a != b).unwrap_or(got.lines().count().min(expected.lines().count()));
        panic!(
            "the known answer changed (first difference at line {}):\n  expected: {:?}\n  got:      {:?}\nIf the change is meant (a new record format), regenerate with TALLY_KAT_WRITE=1 and say why in the commit.",
            first + 1,
            expected.lines().nth(first),
            got.lines().nth(first)
        );
    }
}
