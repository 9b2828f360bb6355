//! Personal data against the real pipeline (docs/privacy.md). Events with personal fields are
//! recorded as commitments; the ledger serves the values back with their salts, and `tally
//! verify` checks them against the receipt's entry. Erasing a subject over HTTP leaves none of
//! its values in any file of the data directory; the audit export shows `"erased"` and still
//! rebuilds the root; every receipt issued before still verifies, with `tally verify` and with
//! the independent verifier in `verifiers/python/`. `tally erase` does the same on a stopped
//! ledger. Retention erases by itself what is past a tenant's window.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;

fn personal_event(id: &str, actor: &str, email: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_id": id,
        "tenant_id": "acme",
        "occurred_at": "2026-11-02T09:15:00Z",
        "kind": "llm_call",
        "actor_id": actor,
        "attributes": {"email": email, "plan": "pro"},
        "cost": {"amount_micros": 1_000, "currency": "USD"},
    }))
    .unwrap()
}

/// Whether any file under `dir` holds `needle`. The service runs meanwhile: a file or
/// directory replaced or removed between listing and reading (a projection merge or rewrite)
/// holds nothing any more, and is skipped.
fn found_under(dir: &Path, needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            found_under(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        }
    })
}

async fn get_ok(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    let (status, body) = http_get(addr, path).await.expect("the service answers");
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    body
}

/// Verifies receipt `seq` in `files` with the personal values in `personal`, by `verifier`
/// (`tally verify` or the independent one): (success, output).
fn run_verifier(mut verifier: Command, files: &Path, vkey: &str, seq: u64, personal: &Path) -> (bool, String) {
    let out = verifier
        .args(["receipt", "--vkey", vkey])
        .arg("--receipt")
        .arg(files.join(format!("{seq}.receipt")))
        .arg("--entry")
        .arg(files.join(format!("{seq}.entry")))
        .arg("--personal")
        .arg(personal)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `tally verify receipt …`.
fn verify_receipt(files: &Path, vkey: &str, seq: u64, personal: &Path) -> (bool, String) {
    let mut tally = Command::new(env!("CARGO_BIN_EXE_tally"));
    tally.arg("verify");
    run_verifier(tally, files, vkey, seq, personal)
}

/// `verifiers/python/tally_verify.py receipt …` (standard library only, no Tally code).
fn independent_verify(files: &Path, vkey: &str, seq: u64, personal: &Path) -> (bool, String) {
    let mut python = Command::new("python3");
    python.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/verifiers/python/tally_verify.py"));
    run_verifier(python, files, vkey, seq, personal)
}

/// `tally verify` and the Python reference verifier, each ready for `export …` arguments.
fn export_verifiers() -> [(&'static str, Command); 2] {
    let mut tally = Command::new(env!("CARGO_BIN_EXE_tally"));
    tally.arg("verify");
    let mut python = Command::new("python3");
    python.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/verifiers/python/tally_verify.py"));
    [("tally", tally), ("python", python)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_subject_leaves_no_value_behind_and_every_proof_still_verifies() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, key } = ledger_fixture("privacy", 1).await;
    let data = dir.path().join("data");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let vkey = key.signer_for("acme").unwrap().verifier().to_string();
    let ledger = start_ledger(&data, &key_path, &topic, &unique_topic("privacy-group"), 100).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let events = [("p0", "user-ann", "ann@example.com"), ("p1", "user-bob", "bob@example.com"), ("p2", "user-ann", "ann.other@example.com")];
    for (id, actor, email) in events {
        publisher.publish(Some(b"acme"), &personal_event(id, actor, email), &[]).await.unwrap();
    }
    ledger.wait_for(&BTreeMap::from([("acme".to_string(), 3)])).await;

    // What a regulator keeps: each record's receipt, entry and personal values.
    for seq in 0..3u64 {
        std::fs::write(files.join(format!("{seq}.receipt")), get_ok(ledger.addr, &format!("/v1/tenants/acme/receipt/{seq}")).await).unwrap();
        let entry = get_ok(ledger.addr, &format!("/v1/tenants/acme/records/{seq}")).await;
        let text = String::from_utf8(entry.clone()).unwrap();
        assert!(!text.contains(events[seq as usize].2) && !text.contains(events[seq as usize].1), "the record holds a value: {text}");
        std::fs::write(files.join(format!("{seq}.entry")), entry).unwrap();
        std::fs::write(files.join(format!("{seq}.personal")), get_ok(ledger.addr, &format!("/v1/tenants/acme/records/{seq}/personal")).await).unwrap();
        let (ok, out) = verify_receipt(&files, &vkey, seq, &files.join(format!("{seq}.personal")));
        assert!(ok && out.contains("all 4 verified against their commitments"), "{out}");
    }
    // A value that is not the one committed to is refused.
    let personal: serde_json::Value = serde_json::from_slice(&std::fs::read(files.join("1.personal")).unwrap()).unwrap();
    assert_eq!(personal["fields"]["attributes.email"]["value"], "bob@example.com", "{personal}");
    let mut forged = personal.clone();
    forged["fields"]["attributes.email"]["value"] = "eve@example.com".into();
    std::fs::write(files.join("forged.personal"), forged.to_string()).unwrap();
    let (ok, out) = verify_receipt(&files, &vkey, 1, &files.join("forged.personal"));
    assert!(!ok && out.contains("does not match its commitment"), "{out}");

    // The projection shows the values until the erasure.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !found_under(&data.join("parquet"), "ann.other@example.com") {
        assert!(Instant::now() < deadline, "the projection never showed the values");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, erased) = http_post(ledger.addr, "/v1/tenants/acme/erase", &serde_json::json!({"subject": "user-ann"})).await.unwrap();
    assert_eq!(status, 200, "{erased}");
    assert_eq!((erased["keys"].as_u64(), erased["records"].as_u64()), (Some(1), Some(2)), "{erased}");
    let erasure_seq = erased["seq"].as_u64().unwrap();

    // None of the subject's values is left in any file; another subject's still are.
    for gone in ["user-ann", "ann@example.com", "ann.other@example.com"] {
        assert!(!found_under(&data, gone), "{gone} is still under the data directory");
    }
    assert!(found_under(&data.join("parquet"), "bob@example.com"), "the scan finds what is there");
    // Every receipt issued before still verifies; the erased record's values say so.
    let after: serde_json::Value = serde_json::from_slice(&get_ok(ledger.addr, "/v1/tenants/acme/records/0/personal").await).unwrap();
    assert_eq!(after["erased"], true, "{after}");
    std::fs::write(files.join("0.erased"), after.to_string()).unwrap();
    let (ok, out) = verify_receipt(&files, &vkey, 0, &files.join("0.erased"));
    assert!(ok && out.contains("erased: actor_id, attributes.email, attributes.plan, payload_sha256"), "{out}");
    let (ok, out) = verify_receipt(&files, &vkey, 1, &files.join("1.personal"));
    assert!(ok, "{out}");
    // And with an independent verifier, written from the formats alone.
    let (ok, out) = independent_verify(&files, &vkey, 0, &files.join("0.erased"));
    assert!(ok && out.contains("valid: entry 0 is in") && out.contains("personal values: erased: actor_id"), "{out}");
    let (ok, out) = independent_verify(&files, &vkey, 1, &files.join("forged.personal"));
    assert!(!ok && out.contains("does not match its commitment"), "{out}");
    // The erasure record names the records, never the subject.
    let record = String::from_utf8(get_ok(ledger.addr, &format!("/v1/tenants/acme/records/{erasure_seq}")).await).unwrap();
    assert!(record.contains(r#""type":"erasure""#) && record.contains(r#""seqs":[0,2]"#) && !record.contains("user-ann"), "{record}");

    // The audit export: erased rows say so, the rest show their values, and it is complete.
    let (query, stop_query) = start_query(&data).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let export = loop {
        if let Some((200, body)) = http_get(query, "/v1/tenants/acme/audit-export").await {
            let export: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if export["to_seq"].as_u64() == Some(erasure_seq) {
                break export;
            }
        }
        assert!(Instant::now() < deadline, "the audit export never reached the erasure");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(export["complete"], true, "{export}");
    let rows = export["rows"].as_array().unwrap();
    assert_eq!(rows[0]["actor_id"], "erased", "{}", rows[0]);
    assert_eq!(rows[1]["actor_id"], "user-bob", "{}", rows[1]);
    assert!(export["personal"].get("0").is_none() && export["personal"]["1"]["actor_id"]["value"] == "user-bob", "{}", export["personal"]);
    // A regulator verifies it offline, with Tally and without: then a changed value is caught.
    std::fs::write(files.join("export.json"), serde_json::to_vec(&export).unwrap()).unwrap();
    let mut forged = export.clone();
    forged["rows"][1]["actor_id"] = "user-eve".into();
    std::fs::write(files.join("forged-export.json"), serde_json::to_vec(&forged).unwrap()).unwrap();
    for (name, mut verifier) in export_verifiers() {
        let out = verifier.args(["export", "--vkey", &vkey]).arg(files.join("export.json")).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let want = format!("valid: seqs 0..={erasure_seq} of ");
        assert!(out.status.success() && text.contains(&want) && text.contains("1 records verified, 2 erased"), "{name}: {text}");
    }
    for (name, mut verifier) in export_verifiers() {
        let out = verifier.args(["export", "--vkey", &vkey]).arg(files.join("forged-export.json")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.code() == Some(1) && text.contains("the row of seq 1 is not what its entry gives"), "{name}: {text}");
    }
    let _ = stop_query.send(());
    ledger.stop().await;

    // On a stopped ledger, `tally erase` erases the rest of the tenant.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["erase", "--data-dir", data.to_str().unwrap(), "--key", key_path.to_str().unwrap(), "--tenant", "acme", "--all-subjects"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("erased 1 key(s) and the personal values of 1 record(s)"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gone in ["user-bob", "bob@example.com"] {
        assert!(!found_under(&data, gone), "{gone} is still under the data directory");
    }
    // Values a reader kept from before still verify against the record.
    let (ok, out) = verify_receipt(&files, &vkey, 1, &files.join("1.personal"));
    assert!(ok && out.contains("all 4 verified"), "{out}");
}

/// Retention runs by itself: with `personal_data_days = 30`, an event from a month wholly past
/// the window loses its values at the ledger's next tick, with an `erasure` record by
/// `retention`, while a recent one keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_erases_values_past_the_window_by_itself() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("retention", 1).await;
    let data = dir.path().join("data");
    let budgets = dir.path().join("budgets.toml");
    std::fs::write(&budgets, "[tenants.acme]\npersonal_data_days = 30\n").unwrap();
    let mut config = ledger_config(&data, &key_path, &topic, &unique_topic("retention-group"), 100);
    config.budgets = Some(budgets);
    let ledger = start_service(config).await;
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    let now = jiff::Timestamp::now();
    let old = now.checked_sub(jiff::SignedDuration::from_hours(24 * 70)).unwrap();
    for (id, at, email) in [("old", old, "old@example.com"), ("new", now, "new@example.com")] {
        let mut event: serde_json::Value = serde_json::from_slice(&personal_event(id, "user-ann", email)).unwrap();
        event["occurred_at"] = at.to_string().into();
        publisher.publish(Some(b"acme"), &serde_json::to_vec(&event).unwrap(), &[]).await.unwrap();
    }
    // The two events, their tenant's `config` record (the policy is part of it), then the erasure.
    let deadline = Instant::now() + Duration::from_secs(60);
    let erasure = loop {
        let checkpoint = http_get(ledger.addr, "/t/acme/checkpoint").await.filter(|(s, _)| *s == 200).map(|(_, b)| String::from_utf8(b).unwrap());
        let size: u64 = checkpoint.as_deref().and_then(|c| c.lines().nth(1)).and_then(|n| n.parse().ok()).unwrap_or(0);
        if size > 0 {
            let last = String::from_utf8(get_ok(ledger.addr, &format!("/v1/tenants/acme/records/{}", size - 1)).await).unwrap();
            if last.contains(r#""type":"erasure""#) {
                break last;
            }
        }
        assert!(Instant::now() < deadline, "no retention erasure within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(erasure.contains(r#""by":"retention""#), "{erasure}");
    let mut states = BTreeMap::new();
    for seq in 0..3u64 {
        let entry = String::from_utf8(get_ok(ledger.addr, &format!("/v1/tenants/acme/records/{seq}")).await).unwrap();
        let personal: serde_json::Value = serde_json::from_slice(&get_ok(ledger.addr, &format!("/v1/tenants/acme/records/{seq}/personal")).await).unwrap();
        if let Some(id) = ["old", "new"].into_iter().find(|id| entry.contains(&format!(r#""event_id":"{id}""#))) {
            states.insert(id, personal["erased"].as_bool().unwrap_or(false));
        }
    }
    assert_eq!(states, BTreeMap::from([("new", false), ("old", true)]), "{erasure}");
    assert!(!found_under(&data.join("partitions"), "old@example.com"));
    // The projector meets the erasure record and rewrites the tenant's rows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while found_under(&data, "old@example.com") || !found_under(&data.join("parquet"), "new@example.com") {
        assert!(Instant::now() < deadline, "the projection still shows the expired value, or not the recent one");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ledger.stop().await;
}
