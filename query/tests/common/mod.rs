//! A ledger directory with real signed logs and their Parquet projection, and a query router
//! over it, for in-process API tests (no broker needed: the projection is what is queried).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tally_auth::Role;
use tally_log::{event_record, Charge, EventInput, Ledger, LedgerKey, Source};
use tally_projection::Projection;

/// The projection unit of the fixture's one partition directory.
pub const UNIT: &str = "tally.events-0";
use tally_query::QueryConfig;
use tally_schemas::Event;
use tower::ServiceExt;

pub const ORIGIN: &str = "tally.test";

/// Zones the fixture keeps daily roll-ups for; reports in other zones use 15-minute buckets.
pub const DAILY_ZONES: [&str; 3] = ["UTC", "Europe/Paris", "Asia/Kathmandu"];

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: LedgerKey,
    /// Token by name: `acme` (tenant acme), `globex` (tenant globex), `billing`, `regulator`
    /// (acme only), `admin`, `metrics`.
    pub tokens: HashMap<&'static str, String>,
}

/// An event of `tenant` as the gateway would publish it.
// Each argument is a field a test varies, in the event's own order.
#[allow(clippy::too_many_arguments)]
pub fn event(tenant: &str, id: &str, at: jiff::Timestamp, kind: &str, agent: &str, action: &str, task: &str, cost: Option<(i64, &str)>) -> Event {
    let mut v = serde_json::json!({
        "event_id": id, "tenant_id": tenant, "occurred_at": at.to_string(), "kind": kind, "decision": "allow",
        "agent_id": agent, "action": action, "task_id": task, "usage": {"input_tokens": 3, "output_tokens": 5},
    });
    if let Some((micros, currency)) = cost {
        v["cost"] = serde_json::json!({"amount_micros": micros, "currency": currency});
    }
    serde_json::from_value(v).unwrap()
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate(ORIGIN).unwrap();
        let mut tokens = HashMap::new();
        let mut file = String::new();
        for (name, role, tenants) in [
            ("acme", Role::Tenant, vec!["acme"]),
            ("globex", Role::Tenant, vec!["globex"]),
            ("billing", Role::Billing, vec![]),
            ("regulator", Role::Regulator, vec!["acme"]),
            ("admin", Role::Admin, vec![]),
            ("metrics", Role::Metrics, vec![]),
            ("gateway", Role::Gateway, vec!["acme"]),
            ("expired", Role::Admin, vec![]),
        ] {
            // `expired` is an admin token whose time ran out in 2025.
            let expires_at = (name == "expired").then(|| "2025-12-31T23:59:59Z".parse().unwrap());
            let (token, entry) = tally_auth::new_token_expiring(name, role, tenants.into_iter().map(String::from).collect(), expires_at).unwrap();
            file.push_str(&tally_auth::stanza(&entry).unwrap());
            tokens.insert(name, token);
        }
        std::fs::write(dir.path().join("tokens.toml"), file).unwrap();
        Fixture { dir, key, tokens }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Appends `events` to their tenants' logs (partition dir `tally.events-0`), commits (signing
    /// checkpoints) and projects everything.
    pub fn ingest(&self, events: &[Event]) {
        self.ingest_with_zones(events, &DAILY_ZONES);
    }

    /// As [`Fixture::ingest`], keeping daily roll-ups for `zones` only. Records carry no
    /// `charge`, as before rating: the projection takes each event's cost as its charge.
    pub fn ingest_with_zones(&self, events: &[Event], zones: &[&str]) {
        let charged: Vec<(Event, Option<Charge>)> = events.iter().map(|e| (e.clone(), None)).collect();
        self.ingest_charged(&charged, zones);
    }

    /// Writes each event with the `charge` the ledger would have rated it (the ledger's rating
    /// needs Kafka-side crates this one must not pull), then projects them.
    pub fn ingest_charged(&self, charged: &[(Event, Option<Charge>)], zones: &[&str]) {
        let partitions = self.data_dir().join("partitions");
        let ledger_dir = partitions.join("tally.events-0");
        // One partition, pinned as the ledger service pins it: readers find a tenant's log
        // through the count.
        std::fs::create_dir_all(&partitions).unwrap();
        std::fs::write(partitions.join("tally.events.partition-count"), "1\n").unwrap();
        let mut ledger = Ledger::open(&ledger_dir, vec![LedgerKey::parse(&self.key.to_text().unwrap()).unwrap()]).unwrap();
        for (i, (e, charge)) in charged.iter().enumerate() {
            let seq = ledger.next_seq(&e.tenant_id);
            let source = Source::Kafka { topic: "tally.events".into(), partition: 0, offset: i as i64, timestamp_ms: Some(1_700_000_000_000) };
            let input = EventInput { event: e, ce_source: None, payload_sha256: &[1; 32], source: &source };
            ledger.append(&e.tenant_id, &event_record(seq, input, charge.as_ref()).unwrap()).unwrap();
        }
        ledger.commit(Some(charged.len() as i64)).unwrap();
        let zones = tally_projection::report_zones(&zones.iter().map(|z| z.to_string()).collect::<Vec<_>>()).unwrap();
        Projection::new(&self.data_dir().join("parquet"), UNIT, Duration::ZERO).with_zones(zones).catch_up(&ledger).unwrap();
    }

    /// Appends a `statement` record to `tenant`'s log, as the ledger's period close writes it,
    /// and projects it; returns its seq.
    pub fn append_statement(&self, tenant: &str, statement: &tally_log::Statement) -> u64 {
        let ledger_dir = self.data_dir().join("partitions/tally.events-0");
        let mut ledger = Ledger::open(&ledger_dir, vec![LedgerKey::parse(&self.key.to_text().unwrap()).unwrap()]).unwrap();
        let seq = ledger.next_seq(tenant);
        let mut record = serde_json::json!({ "type": "statement", "seq": seq });
        record
            .as_object_mut()
            .unwrap()
            .extend(serde_json::to_value(tally_log::Statement { tree_size: seq, ..statement.clone() }).unwrap().as_object().unwrap().clone());
        ledger.append(tenant, &tally_log::budget_record(&record).unwrap()).unwrap();
        ledger.commit(None).unwrap();
        Projection::new(&self.data_dir().join("parquet"), UNIT, Duration::ZERO).catch_up(&ledger).unwrap();
        seq
    }

    pub fn config(&self) -> QueryConfig {
        toml::from_str(&format!("data_dir = {:?}\ntokens = {:?}\n", self.data_dir(), self.dir.path().join("tokens.toml"))).unwrap()
    }

    pub fn router(&self) -> axum::Router {
        tally_query::router_for_tests(self.config()).unwrap()
    }

    pub fn verifiers(&self, tenant: &str) -> Vec<tally_log::NoteVerifier> {
        vec![self.key.signer_for(tenant).unwrap().verifier()]
    }

    /// Every file path under the data directory, with its length.
    pub fn snapshot(&self) -> Vec<(PathBuf, u64)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push((p.clone(), e.metadata().unwrap().len()));
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out.sort();
        out
    }
}

/// Sends a request; returns status and body.
pub async fn send(router: &axum::Router, method: &str, uri: &str, token: Option<&str>, body: Option<serde_json::Value>) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let response = router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, bytes)
}

pub async fn get_json(router: &axum::Router, uri: &str, token: &str) -> serde_json::Value {
    let (status, body) = send(router, "GET", uri, Some(token), None).await;
    assert_eq!(status, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}
